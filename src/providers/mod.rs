//! What is special about each provider, in one room per provider: its preset (default
//! upstream, token URL and client, where its credential files live), how a credential's
//! upstream base is derived, which extra headers go upstream, and how to re-authenticate.
//!
//! `config.rs` builds a `ProviderConfig` from `preset`; the proxy and the lifecycle ask the
//! provider (`ProviderConfig::reauth_hint`, `base_url`, `upstream_headers`) instead of
//! matching on its kind themselves. This module depends on no other subsystem but the
//! credential file shapes.

pub mod custom;
pub mod google;
pub mod qwen;

use http::{HeaderName, HeaderValue};
use url::Url;

use crate::store::shape::CredentialFile;

/// Which family a provider belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Gemini,
    Qwen,
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

impl ProviderKind {
    /// What gets a provider of this kind a fresh credential, for errors, `/readyz`, logs
    /// and alerts.
    pub fn reauth_hint(self, token_url: &Url) -> String {
        match self {
            ProviderKind::Gemini => google::reauth_hint(),
            ProviderKind::Qwen => qwen::reauth_hint(),
            ProviderKind::Custom => custom::reauth_hint(token_url),
        }
    }

    /// Whether a refresh may hand out a new refresh token that kills the old one (so a
    /// read-only file without `state_dir` loses the account on restart). Google never
    /// rotates; Qwen does; a custom OAuth server may.
    pub fn rotates_refresh_tokens(self) -> bool {
        self != ProviderKind::Gemini
    }
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
