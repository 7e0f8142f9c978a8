//! The OAuth 2 token endpoint: one refresh-token grant (RFC 6749 §6, form-encoded) and
//! the classification of its answer into success, permanent failure (the user must
//! re-authenticate) or transient failure (retry later).
//!
//! Classification is by protocol fields (HTTP status, the `error` code), never by the
//! wording of messages. Nothing here stores state or touches files.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::store::shape::{ServiceAccountKey, TokenUpdate};

/// Why a refresh did not produce a token. Messages never contain a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// The endpoint refused the grant: the refresh token or client is dead.
    #[error("token endpoint rejected the refresh token: HTTP {status} {code}{}", describe(.description))]
    Rejected {
        status: u16,
        code: String,
        description: Option<String>,
    },
    #[error("the credential has no refresh token")]
    NoRefreshToken,
    #[error("no OAuth client id to refresh with: put your own OAuth client in the file (`client_id`, `client_secret`) or set `providers.{provider}.client_id`")]
    NoClientId { provider: String },
    #[error("providers.{provider}.token_url is not set: this provider takes API keys only")]
    NoTokenUrl { provider: String },
    #[error("token endpoint unreachable: {0}")]
    Network(String),
    #[error("token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("token endpoint answered HTTP {status}")]
    Server {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("token endpoint sent a malformed answer: {0}")]
    Malformed(String),
    #[error("the service-account private key is unusable: {0}")]
    BadKey(String),
    #[error("another process has held the refresh lock {0} for too long")]
    LockBusy(String),
    /// Fleet mode: Redis did not answer, and a rotating credential is not refreshed
    /// without its lease (it could spend the refresh token twice).
    #[error(
        "the fleet store is unreachable ({0}); a rotating credential is not refreshed without it"
    )]
    StoreUnreachable(String),
}

fn describe(d: &Option<String>) -> String {
    d.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
}

impl RefreshError {
    /// Permanent failures need the user to re-authenticate; retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            RefreshError::Rejected { .. }
                | RefreshError::NoRefreshToken
                | RefreshError::NoClientId { .. }
                | RefreshError::NoTokenUrl { .. }
                | RefreshError::BadKey(_)
        )
    }

    /// The `outcome` label of `tokenrelay_token_refresh_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            RefreshError::Rejected { .. }
            | RefreshError::NoRefreshToken
            | RefreshError::NoClientId { .. }
            | RefreshError::NoTokenUrl { .. }
            | RefreshError::BadKey(_) => "auth_error",
            RefreshError::Network(_)
            | RefreshError::Timeout(_)
            | RefreshError::LockBusy(_)
            | RefreshError::StoreUnreachable(_) => "network_error",
            RefreshError::Server { .. } | RefreshError::Malformed(_) => "server_error",
        }
    }

    /// A retry hint the endpoint gave (429/503 `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RefreshError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// OAuth error codes that mean the grant or client is dead (RFC 6749 §5.2). Qwen answers a
/// dead refresh token with `invalid_request`; tokenrelay builds its requests correctly, so
/// from this endpoint that code means the same thing.
const PERMANENT_CODES: &[&str] = &[
    "invalid_grant",
    "invalid_client",
    "unauthorized_client",
    "invalid_request",
];

/// The grants tokenrelay sends to a token endpoint.
pub enum Grant<'a> {
    /// RFC 6749 §6.
    RefreshToken {
        refresh_token: &'a SecretString,
        client_id: &'a str,
        client_secret: Option<&'a SecretString>,
    },
    /// RFC 7523 §2.1, as Google service accounts use it.
    JwtBearer { assertion: SecretString },
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
    resource_url: Option<String>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: Option<String>,
    error_description: Option<String>,
}

/// Sends one grant to `token_url`, form-encoded, and classifies the answer.
pub async fn request_token(
    client: &reqwest::Client,
    token_url: &Url,
    grant: Grant<'_>,
    timeout: Duration,
) -> Result<TokenUpdate, RefreshError> {
    let form: Vec<(&str, &str)> = match &grant {
        Grant::RefreshToken {
            refresh_token,
            client_id,
            client_secret,
        } => {
            let mut form = vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.expose_secret()),
                ("client_id", *client_id),
            ];
            if let Some(s) = client_secret {
                form.push(("client_secret", s.expose_secret()));
            }
            form
        }
        Grant::JwtBearer { assertion } => vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion.expose_secret()),
        ],
    };
    let body = serde_urlencoded_form(&form);
    let send = client
        .post(token_url.clone())
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(http::header::ACCEPT, "application/json")
        .body(body)
        .send();
    let response = match tokio::time::timeout(timeout, send).await {
        Err(_) => return Err(RefreshError::Timeout(timeout)),
        Ok(Err(e)) => return Err(network_error(&e, timeout)),
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::common::retry_after::parse);
    let bytes = match tokio::time::timeout(timeout, response.bytes()).await {
        Err(_) => return Err(RefreshError::Timeout(timeout)),
        Ok(Err(e)) => return Err(network_error(&e, timeout)),
        Ok(Ok(b)) => b,
    };
    classify(status.as_u16(), retry_after, &bytes)
}

/// Turns a token-endpoint answer into a token or a classified failure.
pub fn classify(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<TokenUpdate, RefreshError> {
    if (200..300).contains(&status) {
        let answer: TokenAnswer = serde_json::from_slice(body).map_err(|_| {
            RefreshError::Malformed(format!(
                "HTTP {status} with a body that is not a JSON token answer"
            ))
        })?;
        let access_token = answer
            .access_token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                RefreshError::Malformed(format!("HTTP {status} without an access_token"))
            })?;
        let expires_in_secs = match answer.expires_in {
            None => 3600,
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_f64().map(|f| f.max(0.0) as u64))
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| RefreshError::Malformed("expires_in is not a number".into()))?,
        };
        return Ok(TokenUpdate {
            access_token: SecretString::from(access_token),
            expires_in_secs,
            refresh_token: answer
                .refresh_token
                .filter(|t| !t.is_empty())
                .map(SecretString::from),
            resource_url: answer.resource_url.filter(|u| !u.is_empty()),
        });
    }
    let err: Option<ErrorAnswer> = serde_json::from_slice(body).ok();
    let code = err.as_ref().and_then(|e| e.error.clone());
    let permanent_code = code
        .as_deref()
        .is_some_and(|c| PERMANENT_CODES.contains(&c));
    if status == 401 || (status == 400 && permanent_code) || (status == 403 && permanent_code) {
        return Err(RefreshError::Rejected {
            status,
            code: code.unwrap_or_else(|| "unauthorized".into()),
            description: err
                .and_then(|e| e.error_description)
                .map(|d| d.chars().take(200).collect()),
        });
    }
    Err(RefreshError::Server {
        status,
        retry_after,
    })
}

fn network_error(e: &reqwest::Error, timeout: Duration) -> RefreshError {
    if e.is_timeout() {
        return RefreshError::Timeout(timeout);
    }
    RefreshError::Network(crate::common::error_chain(e))
}

/// Signs the JWT a service account exchanges for an access token (RS256): issued by the
/// account, for `scopes`, addressed to the token endpoint, valid for an hour.
pub fn service_account_assertion(
    key: &ServiceAccountKey,
    token_url: &Url,
    scopes: &[String],
    now_secs: i64,
) -> Result<SecretString, RefreshError> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use base64::Engine as _;
    let pem = key.private_key.expose_secret();
    let der_b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    let der = STANDARD
        .decode(der_b64.trim())
        .map_err(|_| RefreshError::BadKey("private_key is not PEM".into()))?;
    let pair = ring::signature::RsaKeyPair::from_pkcs8(&der)
        .map_err(|e| RefreshError::BadKey(format!("private_key is not a PKCS#8 RSA key ({e})")))?;
    let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    if let Some(kid) = &key.private_key_id {
        header["kid"] = kid.clone().into();
    }
    let claims = serde_json::json!({
        "iss": key.client_email,
        "scope": scopes.join(" "),
        "aud": token_url.as_str(),
        "iat": now_secs,
        "exp": now_secs + 3600,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut sig = vec![0; pair.public().modulus_len()];
    pair.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut sig,
    )
    .map_err(|_| RefreshError::BadKey("signing failed".into()))?;
    Ok(SecretString::from(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(sig)
    )))
}

fn serde_urlencoded_form(pairs: &[(&str, &str)]) -> String {
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        ser.append_pair(k, v);
    }
    ser.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOGLE_OK: &[u8] = include_bytes!("../../tests/fixtures/responses/google_token_ok.json");
    const QWEN_OK: &[u8] = include_bytes!("../../tests/fixtures/responses/qwen_token_ok.json");
    const INVALID_GRANT: &[u8] =
        include_bytes!("../../tests/fixtures/responses/google_token_invalid_grant.json");
    const QWEN_DEAD: &[u8] =
        include_bytes!("../../tests/fixtures/responses/qwen_token_invalid_refresh.json");

    #[test]
    fn google_answer_has_no_new_refresh_token() {
        let u = classify(200, None, GOOGLE_OK).unwrap();
        assert_eq!(u.expires_in_secs, 3599);
        assert!(u.refresh_token.is_none());
    }

    #[test]
    fn qwen_answer_rotates_the_refresh_token() {
        let u = classify(200, None, QWEN_OK).unwrap();
        assert_eq!(
            u.refresh_token.unwrap().expose_secret(),
            "example-new-qwen-refresh-token"
        );
        assert_eq!(u.resource_url.as_deref(), Some("portal.qwen.ai"));
    }

    #[test]
    fn dead_refresh_tokens_are_permanent() {
        assert!(classify(400, None, INVALID_GRANT)
            .unwrap_err()
            .is_permanent());
        assert!(classify(400, None, QWEN_DEAD).unwrap_err().is_permanent());
        assert!(classify(401, None, QWEN_DEAD).unwrap_err().is_permanent());
        assert!(classify(401, None, b"").unwrap_err().is_permanent());
    }

    #[test]
    fn everything_else_is_transient() {
        for (status, body) in [
            (500, &b"oops"[..]),
            (429, b"{}"),
            (200, b"not json"),
            (200, b"{\"token_type\":\"Bearer\"}"),
            (400, b"{\"error\":\"slow_down\"}"),
        ] {
            let e = classify(status, None, body).unwrap_err();
            assert!(!e.is_permanent(), "{status}: {e}");
        }
    }
}
