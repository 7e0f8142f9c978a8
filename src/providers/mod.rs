//! What is special about each provider, in one room per provider: its preset (default
//! upstream, token URL and client, where its credential files live), how a credential's
//! upstream base is derived, which extra headers go upstream, and how to re-authenticate.
//!
//! `config/provider.rs` builds a `ProviderConfig` from `preset`; the proxy and the lifecycle ask the
//! provider (`ProviderConfig::reauth_hint`, `base_url`, `upstream_headers`) instead of
//! matching on its kind themselves. This module depends on no other subsystem but the
//! credential file shapes.

pub mod custom;
pub mod dashscope;
pub mod google;
pub mod qwen;
pub mod vertex;

use http::{header, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use url::Url;

use crate::store::shape::CredentialFile;

/// Which family a provider belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Gemini,
    Qwen,
    Dashscope,
    Vertex,
    Custom,
}

/// The defaults a provider name brings.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub kind: ProviderKind,
    pub upstream: Option<&'static str>,
    pub token_url: Option<&'static str>,
    pub client_id: Option<&'static str>,
    /// The well-known credential file, used when `credentials` is not configured.
    pub default_credentials: Option<&'static str>,
    /// An environment variable that adds credential files.
    pub env_credentials: Option<&'static str>,
}

/// The preset for a provider name: `gemini` and `qwen` are known; any other name is a
/// custom provider that must configure everything.
pub fn preset(name: &str) -> Preset {
    match name {
        "gemini" => Preset {
            kind: ProviderKind::Gemini,
            upstream: Some(google::UPSTREAM),
            token_url: Some(google::TOKEN_URL),
            client_id: None,
            default_credentials: Some(google::DEFAULT_CREDENTIALS),
            env_credentials: Some(google::ENV_CREDENTIALS),
        },
        "qwen" => Preset {
            kind: ProviderKind::Qwen,
            upstream: Some(qwen::UPSTREAM),
            token_url: Some(qwen::TOKEN_URL),
            client_id: Some(qwen::CLIENT_ID),
            default_credentials: Some(qwen::DEFAULT_CREDENTIALS),
            env_credentials: Some(qwen::ENV_CREDENTIALS),
        },
        "vertex" => Preset {
            kind: ProviderKind::Vertex,
            upstream: Some(vertex::UPSTREAM),
            token_url: Some(google::TOKEN_URL),
            client_id: None,
            default_credentials: Some(google::DEFAULT_CREDENTIALS),
            env_credentials: None,
        },
        "dashscope" => Preset {
            kind: ProviderKind::Dashscope,
            // Chosen by `region` (dashscope::REGIONS) unless `upstream` is set.
            upstream: None,
            token_url: None,
            client_id: None,
            default_credentials: None,
            env_credentials: None,
        },
        _ => Preset {
            kind: ProviderKind::Custom,
            upstream: None,
            token_url: None,
            client_id: None,
            default_credentials: None,
            env_credentials: None,
        },
    }
}

/// How a static API key goes upstream. OAuth access tokens always go as
/// `Authorization: Bearer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyHeader {
    /// `Authorization: Bearer <key>` (OpenAI-compatible upstreams).
    Bearer,
    /// The bare key in this header (Google's `x-goog-api-key`, or a custom one).
    Named(HeaderName),
}

impl KeyHeader {
    /// The header that carries `secret`, marked sensitive. `None` when the secret cannot be
    /// a header value.
    pub fn attach(&self, secret: &SecretString) -> Option<(HeaderName, HeaderValue)> {
        let (name, mut value) = match self {
            KeyHeader::Bearer => (header::AUTHORIZATION, bearer_value(secret)?),
            KeyHeader::Named(n) => (
                n.clone(),
                HeaderValue::from_str(secret.expose_secret()).ok()?,
            ),
        };
        value.set_sensitive(true);
        Some((name, value))
    }
}

/// `Bearer <secret>`.
pub fn bearer_value(secret: &SecretString) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", secret.expose_secret())).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// What an upstream's refusal means for the credential that was used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The credential is dead for this upstream: out of rotation until its key or file
    /// changes or a manual refresh. `reason` is the protocol code; `action` says what to do.
    Dead { reason: String, action: String },
    /// The answer does not say whether the key or the request is at fault: ask the
    /// upstream about the key alone (`probe_path`).
    Probe,
}

impl ProviderKind {
    /// What gets a provider of this kind a fresh credential, for errors, `/readyz`, logs
    /// and alerts, when no credential kind is known (a provider without credentials).
    pub fn reauth_hint(self, token_url: Option<&Url>) -> String {
        match self {
            ProviderKind::Gemini => format!(
                "add Gemini API keys to providers.gemini.api_keys, or {}",
                google::reauth_hint()
            ),
            ProviderKind::Qwen => qwen::reauth_hint(),
            ProviderKind::Vertex => format!(
                "add a service-account key or an ADC file (Vertex AI needs only the cloud-platform scope), or express-mode API keys to providers.vertex.api_keys; {}",
                google::reauth_hint()
            ),
            ProviderKind::Dashscope => "add DashScope keys to providers.dashscope.api_keys (Model Studio console → API keys); keys work only in their own region and plan, so check providers.dashscope.region".to_string(),
            ProviderKind::Custom => custom::reauth_hint(token_url),
        }
    }

    /// The hint for one credential kind (`authorized_user`, `cli`, `generic`,
    /// `service_account`, `api_key`): what replaces that credential.
    pub fn hint_for(self, credential_kind: &str, token_url: Option<&Url>) -> String {
        match (self, credential_kind) {
            (ProviderKind::Gemini, "api_key") => google::key_hint(),
            (ProviderKind::Vertex, "api_key") => vertex::key_hint(),
            (_, "service_account") => google::service_account_hint(),
            (ProviderKind::Gemini | ProviderKind::Vertex, _) => google::reauth_hint(),
            (ProviderKind::Dashscope, _) => dashscope::key_hint(),
            (ProviderKind::Qwen, "api_key") => dashscope::key_hint(),
            (ProviderKind::Qwen, _) => qwen::reauth_hint(),
            (ProviderKind::Custom, "api_key") => {
                "replace the key in this provider's api_keys".to_string()
            }
            (ProviderKind::Custom, _) => custom::reauth_hint(token_url),
        }
    }

    /// Whether a refresh may hand out a new refresh token that kills the old one (so a
    /// read-only file without `state_dir` loses the account on restart). Google never
    /// rotates; Qwen does; a custom OAuth server may.
    pub fn rotates_refresh_tokens(self) -> bool {
        !self.is_google()
    }

    /// The Gemini API and Vertex AI: Google's keys, errors and quotas.
    pub fn is_google(self) -> bool {
        matches!(self, ProviderKind::Gemini | ProviderKind::Vertex)
    }

    /// How this kind's static keys go upstream; a custom provider names its header.
    pub fn key_header(self, custom: Option<&HeaderName>) -> KeyHeader {
        match (self, custom) {
            (ProviderKind::Gemini | ProviderKind::Vertex, _) => {
                KeyHeader::Named(google::API_KEY_HEADER.clone())
            }
            (_, Some(h)) if *h != header::AUTHORIZATION => KeyHeader::Named(h.clone()),
            _ => KeyHeader::Bearer,
        }
    }

    /// Whether the client's `?key=` is a credential on this kind's paths (Google's
    /// convention): it is removed before the request goes upstream.
    pub fn key_in_query(self) -> bool {
        self.is_google()
    }

    /// Whether this kind's quotas are per model, so a 429 cools (credential, model) and
    /// not the whole credential.
    pub fn quota_per_model(self) -> bool {
        matches!(
            self,
            ProviderKind::Gemini | ProviderKind::Vertex | ProviderKind::Dashscope
        )
    }

    /// A cheap request that only a live key passes (see `Refusal::Probe`).
    pub fn probe_path(self) -> Option<&'static str> {
        match self {
            ProviderKind::Gemini => Some(google::PROBE_PATH),
            _ => None,
        }
    }

    /// Reads an upstream refusal (400/401/403) of the credential's own standing, from
    /// protocol fields only. `static_key`: the credential is an API key (a 401 to a key is
    /// final; a 401 to an OAuth token is refreshed by the caller first).
    pub fn refusal(self, status: u16, body: &Value, static_key: bool) -> Option<Refusal> {
        if let Some(r) = google::refusal(status, body, static_key) {
            if self == ProviderKind::Gemini || matches!(r, Refusal::Dead { .. }) {
                // (Vertex has no model-list probe for keys: a bare 403 passes through.)
                return Some(r);
            }
        }
        let code = body["error"]["code"].as_str().unwrap_or("");
        if static_key && status == 401 {
            let reason = if code.is_empty() { "HTTP 401" } else { code };
            let action = match self {
                ProviderKind::Dashscope | ProviderKind::Qwen => dashscope::key_hint(),
                ProviderKind::Gemini => google::key_hint(),
                ProviderKind::Vertex => vertex::key_hint(),
                ProviderKind::Custom => "replace the key in this provider's api_keys".into(),
            };
            return Some(Refusal::Dead {
                reason: reason.to_string(),
                action,
            });
        }
        if let Some((reason, action)) = dashscope::account_refusal(body) {
            return Some(Refusal::Dead { reason, action });
        }
        if static_key && dashscope::is_dead_key_code(code) {
            return Some(Refusal::Dead {
                reason: code.to_string(),
                action: dashscope::key_hint(),
            });
        }
        None
    }
}

/// Whether a request asks for generation, whose answer carries usage (Gemini's and Code
/// Assist's `generateContent`/`streamGenerateContent`, OpenAI-style chat, completions and
/// responses); counting tokens, embeddings and the like do not.
pub fn is_generation(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    path.ends_with(":generateContent")
        || path.ends_with(":streamGenerateContent")
        || path.ends_with("/chat/completions")
        || path.ends_with("/completions")
        || path.ends_with("/responses")
}

/// The model a request is for: `…/models/{model}:verb` in the path (Gemini API and
/// Vertex AI), else an OpenAI-style body's `"model"`.
pub fn request_model(path: &str, body: &[u8]) -> Option<String> {
    if let Some(i) = path.find("/models/") {
        let rest = &path[i + "/models/".len()..];
        let end = rest.find([':', '/', '?']).unwrap_or(rest.len());
        if end > 0 {
            return Some(rest[..end].to_string());
        }
    }
    #[derive(serde::Deserialize)]
    struct WithModel {
        model: Option<String>,
    }
    if body.first().is_some_and(|b| *b == b'{') {
        return serde_json::from_slice::<WithModel>(body).ok()?.model;
    }
    None
}

/// The window of a quota an answer says was exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaWindow {
    /// Per minute (or per second): it turns within a minute.
    Minute,
    /// Per day: Google's turn at midnight in America/Los_Angeles.
    Day,
    /// Not named by the answer.
    Other,
}

/// One quota an upstream's answer says was exceeded, read from its protocol fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The model the quota is for, when the answer names it.
    pub model: Option<String>,
    pub window: QuotaWindow,
    /// The quota belongs to the project (every key and token of the project shares it).
    pub per_project: bool,
    /// The limit is zero: the tier has no access to the model at all.
    pub zero: bool,
}

impl ProviderKind {
    /// Whether an answer is a rate limit or a spent quota (a cool-down, not a refusal of
    /// the credential): 429, or a quota code in another status (Google's
    /// `RESOURCE_EXHAUSTED`, OpenAI-style `insufficient_quota`, DashScope's codes).
    pub fn is_quota_answer(self, status: u16, body: &Value) -> bool {
        let e = &body["error"];
        status == 429
            || e["status"] == "RESOURCE_EXHAUSTED"
            || e["code"] == "insufficient_quota"
            || e["type"] == "insufficient_quota"
            || dashscope::quota_code(body).is_some()
    }

    /// The quotas a rate-limit answer names (none: a plain rate limit).
    pub fn quota_violations(self, body: &Value) -> Vec<Violation> {
        let mut v = google::quota_violations(body);
        if v.is_empty() {
            v.extend(dashscope::quota_violation(body));
        }
        v
    }
}

/// The project an answer names (Google's `ErrorInfo.metadata.consumer`, `projects/N`).
pub fn answer_project(body: &Value) -> Option<String> {
    google::consumer_project(body)
}

/// The upstream base for a credential: its `resource_url` (Qwen's rule, see
/// `qwen::resource_base`) or the provider's `upstream`.
pub fn base_url(upstream: &Url, provider: &str, resource_url: Option<&str>) -> Result<Url, String> {
    qwen::resource_base(upstream, provider, resource_url)
}

/// Headers a credential adds to every upstream request: the quota project of a Google
/// ADC file (`x-goog-user-project`), whichever provider pools it.
pub fn upstream_headers(file: &CredentialFile) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut headers = Vec::new();
    if let Some(p) = &file.quota_project_id {
        headers.push(google::quota_project_header(p)?);
    }
    Ok(headers)
}

/// A response fixture (`tests/fixtures/responses/`), for the providers' unit tests.
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/responses/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("fixture JSON")
}
