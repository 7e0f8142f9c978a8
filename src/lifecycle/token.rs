//! `Token`: an immutable snapshot of a credential's secret (access token, refresh token,
//! client, service-account key), its `Expiry`, and the upstream it goes to. Built from a
//! parsed credential file by `token_from_file`; replaced whole on refresh.

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::config::ProviderConfig;
use crate::providers;
use crate::store::shape::{CredentialFile, ServiceAccountKey};

/// When the access token stops working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Static API keys and tokens without an expiry and nothing to refresh them with.
    Never,
    /// Unix milliseconds.
    At(i64),
    /// No token, or a token whose lifetime is unknown but which can be refreshed.
    Unknown,
}

/// An immutable snapshot of a credential's token; replaced whole on refresh.
pub struct Token {
    /// Increases with every replacement; a 401 on generation `g` refreshes only if the
    /// token is still generation `g`.
    pub generation: u64,
    pub(super) access: Option<SecretString>,
    /// The header that carries the secret upstream (`Authorization: Bearer …` for OAuth
    /// tokens, the provider's key header for static keys), built once, marked sensitive.
    pub auth: Option<(HeaderName, HeaderValue)>,
    pub expiry: Expiry,
    pub(super) refresh: Option<SecretString>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<SecretString>,
    pub(super) resource_url: Option<String>,
    /// Where requests with this token go.
    pub base: Url,
    /// Headers this credential adds upstream (`providers::upstream_headers`).
    pub upstream_headers: Vec<(HeaderName, HeaderValue)>,
    /// Service accounts mint tokens with their key instead of a refresh token.
    pub(super) service_account: Option<ServiceAccountKey>,
    /// Who the credential signs in as, when the file says (for operators).
    pub account: Option<String>,
}

impl Token {
    /// Whether the token stays valid for at least `min_validity` from `now_ms`.
    pub fn is_fresh(&self, now_ms: i64, min_validity: Duration) -> bool {
        self.auth.is_some()
            && match self.expiry {
                Expiry::Never => true,
                Expiry::At(t) => t - now_ms >= min_validity.as_millis() as i64,
                Expiry::Unknown => false,
            }
    }

    /// Whether it is valid at all right now.
    pub fn is_valid(&self, now_ms: i64) -> bool {
        self.is_fresh(now_ms, Duration::ZERO)
    }

    pub fn expires_at_ms(&self) -> Option<i64> {
        match self.expiry {
            Expiry::At(t) => Some(t),
            _ => None,
        }
    }

    pub(super) fn same_access(&self, other: &Token) -> bool {
        match (&self.access, &other.access) {
            (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
            (None, None) => true,
            _ => false,
        }
    }

    pub(super) fn same_refresh(&self, other: &Token) -> bool {
        match (&self.refresh, &other.refresh) {
            (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
            (None, None) => true,
            _ => false,
        }
    }
}

/// `Authorization: Bearer <token>`, for OAuth access tokens.
pub(super) fn bearer(token: &SecretString) -> Option<(HeaderName, HeaderValue)> {
    providers::bearer_value(token).map(|v| (http::header::AUTHORIZATION, v))
}

/// Builds the in-memory token from a parsed credential file.
pub fn token_from_file(
    provider: &ProviderConfig,
    file: &CredentialFile,
    generation: u64,
) -> Result<Token, String> {
    let base = provider.base_url(file.resource_url.as_deref())?;
    let expiry = match (&file.access_token, file.expires_at_ms, &file.refresh_token) {
        (Some(_), Some(t), _) => Expiry::At(t),
        (Some(_), None, None) => Expiry::Never,
        _ => Expiry::Unknown,
    };
    let upstream_headers = providers::upstream_headers(file)?;
    Ok(Token {
        generation,
        auth: file.access_token.as_ref().and_then(bearer),
        access: file.access_token.clone(),
        expiry,
        refresh: file.refresh_token.clone(),
        client_id: file.client_id.clone(),
        client_secret: file.client_secret.clone(),
        resource_url: file.resource_url.clone(),
        base,
        upstream_headers,
        service_account: file.service_account.clone(),
        account: file.account.clone(),
    })
}

/// A process-local fingerprint of a secret (keyed SipHash), to tell whether a stored
/// refresh token changed without keeping a second copy of it.
pub(super) fn fingerprint(secret: Option<&SecretString>) -> u64 {
    use std::hash::BuildHasher;
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(std::collections::hash_map::RandomState::new);
    secret.map_or(0, |s| keys.hash_one(s.expose_secret()))
}
