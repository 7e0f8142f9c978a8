//! Google (the Gemini API, Vertex AI): the token endpoint, gcloud's ADC file, the quota
//! project header, and how to get a new credential when a refresh token dies.
//!
//! No client id ships with the preset: Google's terms forbid reusing the Gemini CLI's
//! OAuth client, so credentials carry their own (or `providers.gemini.client_id`).

use http::{HeaderName, HeaderValue};

pub const UPSTREAM: &str = "https://generativelanguage.googleapis.com";
pub const TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
pub const DEFAULT_CREDENTIALS: &str = "~/.config/gcloud/application_default_credentials.json";
/// Where existing deployments list OAuth files (comma-separated).
pub const ENV_CREDENTIALS: &str = "GEMINI_CLI_OAUTH_CREDENTIALS";
/// The scope of service-account tokens.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The billing/quota project of an ADC file (`quota_project_id`).
pub static USER_PROJECT: HeaderName = HeaderName::from_static("x-goog-user-project");

pub fn reauth_hint() -> String {
    "run `gcloud auth application-default login --client-id-file=client_secret.json --scopes=https://www.googleapis.com/auth/cloud-platform,https://www.googleapis.com/auth/generative-language.retriever` with your own OAuth client".to_string()
}

/// `x-goog-user-project` from an ADC `quota_project_id`.
pub fn quota_project_header(project: &str) -> Result<(HeaderName, HeaderValue), String> {
    HeaderValue::from_str(project)
        .map(|v| (USER_PROJECT.clone(), v))
        .map_err(|_| "quota_project_id is not a valid header value".to_string())
}
