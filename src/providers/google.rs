//! Google (the Gemini API, Vertex AI): the token endpoint, gcloud's ADC file, the quota
//! project header, and how to get a new credential when a refresh token dies.
//!
//! No client id ships with the preset: Google's terms forbid reusing the Gemini CLI's
//! OAuth client, so credentials carry their own (or `providers.gemini.client_id`).

use http::{HeaderName, HeaderValue};
use serde_json::Value;

use super::{QuotaWindow, Refusal, Violation};

pub const UPSTREAM: &str = "https://generativelanguage.googleapis.com";
pub const TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
pub const DEFAULT_CREDENTIALS: &str = "~/.config/gcloud/application_default_credentials.json";
/// Where existing deployments list OAuth files (comma-separated).
pub const ENV_CREDENTIALS: &str = "GEMINI_CLI_OAUTH_CREDENTIALS";
/// The scope of service-account tokens.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Google's authorization endpoint (`tokenrelay login gemini`).
pub const AUTHORIZE_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
/// The scope that names the signed-in account (a login's `login_scopes`).
pub const USERINFO_EMAIL_SCOPE: &str = "https://www.googleapis.com/auth/userinfo.email";
/// The Gemini API's retrieval scope (a Gemini login's `login_scopes`).
pub const RETRIEVER_SCOPE: &str = "https://www.googleapis.com/auth/generative-language.retriever";

/// Clients that belong to other programs: never used by tokenrelay (Google's terms forbid
/// reusing the Gemini CLI's; gcloud's belongs to gcloud).
pub const FOREIGN_CLIENTS: [(&str, &str); 2] = [
    (
        "764086051850-6qr4p6gpi6hn506pt8ejuq83di341hur.apps.googleusercontent.com",
        "gcloud",
    ),
    (
        "681255809395-oo8ft2oprdrnp9e3aqf6av3hmdib135j.apps.googleusercontent.com",
        "the Gemini CLI",
    ),
];

/// The billing/quota project of an ADC file (`quota_project_id`).
pub static USER_PROJECT: HeaderName = HeaderName::from_static("x-goog-user-project");

pub fn reauth_hint() -> String {
    "run `tokenrelay login gemini PROVIDER/ID` (with --client-secret client_secret.json of your own Desktop OAuth client if the file has none), or `gcloud auth application-default login --client-id-file=client_secret.json --scopes=https://www.googleapis.com/auth/cloud-platform,https://www.googleapis.com/auth/generative-language.retriever`".to_string()
}

/// `x-goog-user-project` from an ADC `quota_project_id`.
pub fn quota_project_header(project: &str) -> Result<(HeaderName, HeaderValue), String> {
    HeaderValue::from_str(project)
        .map(|v| (USER_PROJECT.clone(), v))
        .map_err(|_| "quota_project_id is not a valid header value".to_string())
}

/// Where Google takes an API key (`AIza…`); `Authorization` carries only OAuth tokens
/// (a key there is refused with 401 UNAUTHENTICATED).
pub static API_KEY_HEADER: HeaderName = HeaderName::from_static("x-goog-api-key");

/// A key listing models: what `probe` asks when a 403 does not say why.
pub const PROBE_PATH: &str = "/v1beta/models?pageSize=1";

pub fn key_hint() -> String {
    "replace the key in providers.gemini.api_keys (create one at https://aistudio.google.com/apikey)".to_string()
}

pub fn service_account_hint() -> String {
    "create a new key for the service account (`gcloud iam service-accounts keys create key.json --iam-account=SA_EMAIL`) and replace the file".to_string()
}

/// The `google.rpc.ErrorInfo` reasons of `details[]`, and its metadata.
fn error_infos(body: &Value) -> impl Iterator<Item = &Value> {
    body["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo")
}

/// Whether Google's answer refuses the credential itself, from `error.status` and
/// `ErrorInfo.reason` (never the message): a dead or blocked key, or a project whose API is
/// off. `None` when the answer is about the request.
pub fn refusal(status: u16, body: &Value, static_key: bool) -> Option<Refusal> {
    for info in error_infos(body) {
        let reason = info["reason"].as_str().unwrap_or("");
        let project = info["metadata"]["consumer"]
            .as_str()
            .and_then(|c| c.strip_prefix("projects/"))
            .unwrap_or("the key's project");
        let service = info["metadata"]["service"]
            .as_str()
            .unwrap_or("generativelanguage.googleapis.com");
        let action = match reason {
            "API_KEY_INVALID" | "API_KEY_EXPIRED" if static_key => key_hint(),
            r if static_key && r.starts_with("API_KEY_") && r.ends_with("_BLOCKED") => format!(
                "the key's restrictions block this API: lift them in the Cloud console (APIs & Services → Credentials) or {}",
                key_hint()
            ),
            "SERVICE_DISABLED" => format!(
                "enable {service} in project {project}: https://console.cloud.google.com/apis/api/{service}/overview?project={project}"
            ),
            "BILLING_DISABLED" => format!("enable billing for project {project}"),
            "CONSUMER_SUSPENDED" => format!("project {project} is suspended: use a key or credential of another project"),
            // The credential's kind is refused whatever the request: refreshing or
            // waiting cannot help.
            "ACCESS_TOKEN_TYPE_UNSUPPORTED" => format!(
                "this API does not take this kind of token; {}",
                if static_key { key_hint() } else { "use an API key or a service account for it".to_string() }
            ),
            "UNSUPPORTED_CLIENT" => format!(
                "the OAuth client that issued this credential is not allowed here: sign in again with your own Desktop client ({})",
                reauth_hint()
            ),
            r if r.contains("INELIGIBLE") => format!(
                "the account's tier cannot use this API ({r}): use a credential of an eligible account or project"
            ),
            _ => continue,
        };
        return Some(Refusal::Dead {
            reason: reason.to_string(),
            action,
        });
    }
    // Google blocks a key it found published with a bare 403 PERMISSION_DENIED and no
    // ErrorInfo; the same answer can mean "not your file". Ask Google about the key alone.
    if static_key && status == 403 && body["error"]["status"] == "PERMISSION_DENIED" {
        return Some(Refusal::Probe);
    }
    None
}

/// The quotas a Gemini 429 names (`QuotaFailure.violations[]`): the window and scope from
/// `quotaId` (`…PerDay…`, `…PerMinute…`, `…PerProject…`), the model from
/// `quotaDimensions.model`, and whether the limit is zero (`quotaValue`).
pub fn quota_violations(body: &Value) -> Vec<Violation> {
    let message = body["error"]["message"].as_str().unwrap_or("");
    body["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["@type"] == "type.googleapis.com/google.rpc.QuotaFailure")
        .flat_map(|d| d["violations"].as_array().into_iter().flatten())
        .map(|v| {
            let id = v["quotaId"].as_str().unwrap_or("");
            let model = v["quotaDimensions"]["model"].as_str().map(str::to_string);
            let window = if id.contains("PerDay") {
                QuotaWindow::Day
            } else if id.contains("PerMinute") || id.contains("PerSecond") {
                QuotaWindow::Minute
            } else {
                QuotaWindow::Other
            };
            let zero = match v["quotaValue"].as_str() {
                Some(q) => q == "0",
                // Google often states the limit only in the message. This is the one place
                // tokenrelay reads message text, as a fallback after the structured field:
                // "…, limit: 0, model: gemini-3.1-pro" (pinned by a test).
                None => model
                    .as_deref()
                    .is_some_and(|m| message.contains(&format!("limit: 0, model: {m}"))),
            };
            Violation {
                model,
                window,
                per_project: id.contains("PerProject"),
                zero,
            }
        })
        .collect()
}

/// The project an answer names: `ErrorInfo.metadata.consumer` = `projects/N`.
pub fn consumer_project(body: &Value) -> Option<String> {
    error_infos(body)
        .filter_map(|i| i["metadata"]["consumer"].as_str())
        .find_map(|c| c.strip_prefix("projects/"))
        .filter(|p| !p.is_empty() && p.len() <= 64)
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::fixture;

    #[test]
    fn dead_keys_and_disabled_projects_are_told_by_error_info() {
        let invalid = fixture("google_400_api_key_invalid.json");
        assert!(
            matches!(refusal(400, &invalid, true), Some(Refusal::Dead { reason, .. }) if reason == "API_KEY_INVALID")
        );
        let disabled = fixture("google_403_service_disabled.json");
        match refusal(403, &disabled, false) {
            Some(Refusal::Dead { reason, action }) => {
                assert_eq!(reason, "SERVICE_DISABLED");
                assert!(action.contains("project 123456789012"), "{action}");
            }
            _ => panic!("SERVICE_DISABLED kills a token's project too"),
        }
        let leaked = fixture("google_403_api_key_leaked.json");
        assert!(matches!(refusal(403, &leaked, true), Some(Refusal::Probe)));
        assert!(refusal(403, &leaked, false).is_none());
        for (file, reason) in [
            (
                "google_401_access_token_type_unsupported.json",
                "ACCESS_TOKEN_TYPE_UNSUPPORTED",
            ),
            ("google_403_unsupported_client.json", "UNSUPPORTED_CLIENT"),
        ] {
            match refusal(403, &fixture(file), false) {
                Some(Refusal::Dead { reason: r, .. }) => assert_eq!(r, reason),
                other => panic!("{file}: {other:?}"),
            }
        }
        let unauthenticated = fixture("google_401_unauthenticated.json");
        assert!(refusal(401, &unauthenticated, true).is_none());
    }

    #[test]
    fn quota_answers_name_their_window_scope_model_and_a_zero_limit() {
        let day = quota_violations(&fixture("google_429_quota_per_model.json"));
        assert_eq!(
            day,
            vec![Violation {
                model: Some("gemini-2.5-pro".into()),
                window: QuotaWindow::Day,
                per_project: true,
                zero: false
            }]
        );
        let minute = quota_violations(&fixture("google_429_per_minute_per_project.json"));
        assert_eq!(
            (minute[0].window, minute[0].per_project),
            (QuotaWindow::Minute, true)
        );
        assert_eq!(
            consumer_project(&fixture("google_429_per_minute_per_project.json")).as_deref(),
            Some("123456789012")
        );
        let tokens = quota_violations(&fixture("google_429_input_tokens_per_minute.json"));
        assert_eq!(
            (tokens[0].window, tokens[0].per_project),
            (QuotaWindow::Minute, false)
        );
        assert_eq!(tokens[0].model.as_deref(), Some("gemini-2.5-flash"));
        // No quotaValue: the limit is read from the message, in this format.
        let zero = fixture("google_429_model_not_in_tier.json");
        assert!(zero["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit: 0, model: gemini-3.1-pro"));
        let zero = quota_violations(&zero);
        assert!(zero[0].zero);
        assert_eq!(zero[0].model.as_deref(), Some("gemini-3.1-pro"));
        assert!(quota_violations(&fixture("google_429_resource_exhausted.json")).is_empty());
    }
}
