//! The request path: `ANY /{provider}/{rest}` → the credential's upstream base + `/{rest}`
//! + query, with the credential's token attached and the answer streamed back.
//!
//! Invariants:
//! - No global lock and no file I/O: tokens come from memory (`Credential::fresh_token`),
//!   credentials from an `ArcSwap` snapshot.
//! - The upstream is decided by configuration and the credential, never by the client: only
//!   the path after the provider segment and the query are taken from the request.
//! - Each credential is tried at most once per request (plus one replay after its 401
//!   refresh); what happens on each upstream answer is decided before anything is sent
//!   to the client, and nothing is retried once the response has started.
//! - Client credentials (`Authorization`, `x-api-key`, `x-goog-api-key`) and hop-by-hop
//!   headers never reach the upstream.

pub mod browser;
pub mod error;
pub mod retry_after;
pub mod server;
pub mod upstream;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use crate::config::PoolConfig;
use crate::lifecycle::pool::{looked_at, Pool, ProviderPool};
use crate::oauth::{error_chain, RefreshError};
use crate::ops::metrics::Metrics;
use crate::proxy::error::{ProxyError, Reason};
use browser::{BrowserGuard, Verdict};

use crate::lifecycle::{Credential, State as CredState, Token};
use crate::proxy::upstream::{BodyError, Upstream};

pub struct ProxyState {
    pub pool: Arc<Pool>,
    pub client: Upstream,
    pub metrics: Arc<Metrics>,
    pub max_request_body: usize,
    pub client_keys: Vec<SecretString>,
    pub pool_config: PoolConfig,
    pub browser: BrowserGuard,
}

static CREDENTIAL_HEADER: HeaderName = HeaderName::from_static("x-tokenrelay-credential");
static GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");
static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies still see.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub async fn handle(State(s): State<Arc<ProxyState>>, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let cors = match s.browser.check(&parts.method, &parts.uri, &parts.headers) {
        Verdict::Pass(cors) => cors,
        Verdict::Answer(refused) => return refused,
    };
    if parts.method == http::Method::CONNECT {
        return ProxyError::new(
            Reason::BadRequest,
            "tokenrelay is a reverse proxy for configured providers, not a forward proxy: CONNECT is refused",
        )
        .into_response();
    }
    let Some((provider, rest)) = split_path(parts.uri.path()) else {
        return ProxyError::new(
            Reason::UnknownProvider,
            format!(
                "no provider in the path; use /{{provider}}/... with one of: {}",
                provider_names(&s.pool)
            ),
        )
        .into_response();
    };
    let Some(pool) = s.pool.provider(provider) else {
        return ProxyError::new(
            Reason::UnknownProvider,
            format!(
                "unknown provider {provider:?}; configured providers: {}",
                provider_names(&s.pool)
            ),
        )
        .into_response();
    };
    let provider = pool.config.name.as_str();
    let deadline = s.pool_config.request_deadline;
    let outcome = match tokio::time::timeout(deadline, serve(&s, pool, &parts, rest, body)).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => Outcome {
            response: e.into_response(),
            credential: None,
            attempts: 0,
        },
        Err(_) => Outcome {
            response: ProxyError::new(
                Reason::DeadlineExceeded,
                format!("no upstream answer within pool.request_deadline ({deadline:?})"),
            )
            .into_response(),
            credential: None,
            attempts: 0,
        },
    };
    let status = outcome.response.status();
    let elapsed = started.elapsed();
    s.metrics
        .requests
        .with_label_values(&[provider, status.as_str()])
        .inc();
    s.metrics
        .request_duration
        .with_label_values(&[provider])
        .observe(elapsed.as_secs_f64());
    tracing::info!(target: "tokenrelay::proxy", provider, credential = outcome.credential.as_deref().unwrap_or("-"),
        method = %parts.method, path = parts.uri.path(), status = status.as_u16(), attempts = outcome.attempts,
        duration_ms = elapsed.as_secs_f64() * 1000.0, "request");
    let mut response = outcome.response;
    if let Some(origin) = cors {
        browser::allow_origin(&mut response, origin);
    }
    response
}

struct Outcome {
    response: Response,
    credential: Option<String>,
    attempts: u32,
}

fn provider_names(pool: &Pool) -> String {
    let names: Vec<_> = pool
        .providers
        .iter()
        .map(|p| p.config.name.as_str())
        .collect();
    names.join(", ")
}

/// `/{provider}/{rest}` → (provider, "/{rest}"). `rest` keeps its percent-encoding.
fn split_path(path: &str) -> Option<(&str, &str)> {
    let trimmed = path.strip_prefix('/')?;
    let (provider, rest) = match trimmed.find('/') {
        Some(i) => (&trimmed[..i], &trimmed[i..]),
        None => (trimmed, ""),
    };
    (!provider.is_empty()).then_some((provider, rest))
}

/// Rejects dot segments, also percent-encoded or behind a backslash (URL parsers treat
/// `\\` as `/` in http URLs): once normalised they would move the request outside the
/// upstream's base.
fn check_path(rest: &str) -> Result<(), ProxyError> {
    let dot = |piece: &str| piece == "." || piece == "..";
    for seg in rest.split('/') {
        if percent_decode_lower(seg).split(['/', '\\']).any(dot) || seg.split('\\').any(dot) {
            return Err(ProxyError::new(
                Reason::BadRequest,
                "the path may not contain '.' or '..' segments",
            ));
        }
    }
    Ok(())
}

fn percent_decode_lower(seg: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", seg.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn authorized(keys: &[SecretString], headers: &HeaderMap) -> bool {
    if keys.is_empty() {
        return true;
    }
    let presented = [
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            }),
        headers.get(&X_API_KEY).and_then(|v| v.to_str().ok()),
        headers.get(&GOOG_API_KEY).and_then(|v| v.to_str().ok()),
    ];
    presented.into_iter().flatten().any(|p| {
        keys.iter().fold(false, |ok, k| {
            ok | constant_time_eq(p.trim().as_bytes(), k.expose_secret().as_bytes())
        })
    })
}

/// Compares without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ProxyError> {
    let too_large = || {
        ProxyError::new(
            Reason::RequestTooLarge,
            format!("the request body is larger than server.max_request_body ({limit} bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ProxyError::new(
            Reason::BadRequest,
            format!("could not read the request body: {e}"),
        )),
    }
}

/// The request headers to forward: everything but client credentials, `Host`,
/// `Content-Length` (recomputed) and hop-by-hop headers.
fn forwarded_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut out = incoming.clone();
    let named_in_connection: Vec<HeaderName> = incoming
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named_in_connection).chain([
        &header::HOST,
        &header::CONTENT_LENGTH,
        &header::AUTHORIZATION,
        &header::UPGRADE,
        &X_API_KEY,
        &GOOG_API_KEY,
    ]) {
        out.remove(name);
    }
    out
}

/// Why one credential did not serve this request.
enum Miss {
    /// Not tried: its state rules it out.
    Skipped {
        state: CredState,
        detail: String,
        cooldown: Option<Duration>,
    },
    /// The token endpoint failed.
    Refresh(RefreshError),
    /// Upstream could not be reached.
    Connect(String),
    /// Upstream rejected its token even after a refresh (or rejected an API key).
    Rejected,
    /// Upstream rate-limited it.
    RateLimited(Duration),
}

async fn serve(
    s: &ProxyState,
    pool: &ProviderPool,
    parts: &Parts,
    rest: &str,
    body: Body,
) -> Result<Outcome, ProxyError> {
    if !authorized(&s.client_keys, &parts.headers) {
        return Err(ProxyError::new(
            Reason::Unauthorized,
            "missing or wrong client key: send one of server.client_keys as `Authorization: Bearer <key>`, `x-api-key` or `x-goog-api-key`",
        ));
    }
    check_path(rest)?;
    let body = read_body(body, &parts.headers, s.max_request_body).await?;
    let headers = forwarded_headers(&parts.headers);
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    let provider = pool.config.name.as_str();
    let mut misses: Vec<(Arc<Credential>, Miss)> = Vec::new();
    let mut attempts = 0;
    for cred in pool.order() {
        let snap = cred.snapshot();
        if !snap.usable {
            let detail = snap.last_error.clone().unwrap_or_default();
            misses.push((
                Arc::clone(&cred),
                Miss::Skipped {
                    state: snap.state,
                    detail,
                    cooldown: snap.cooldown_remaining,
                },
            ));
            continue;
        }
        let mut token = match cred.fresh_token().await {
            Ok(t) => t,
            Err(e) => {
                misses.push((Arc::clone(&cred), Miss::Refresh(e)));
                continue;
            }
        };
        let mut replayed = false;
        let miss = loop {
            attempts += 1;
            let sent = send(s, &token, parts, &headers, &path_and_query, body.clone()).await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) if e.is_connect() => {
                    s.metrics
                        .upstream_retries
                        .with_label_values(&[provider, "connect_error"])
                        .inc();
                    break Miss::Connect(error_chain(&e));
                }
                Err(e) => {
                    return Err(ProxyError::new(
                        Reason::UpstreamUnreachable,
                        format!(
                            "upstream {} failed before answering: {}",
                            token.base,
                            error_chain(&e)
                        ),
                    ));
                }
            };
            let status = resp.status();
            s.metrics
                .upstream_requests
                .with_label_values(&[provider, &cred.id, status.as_str()])
                .inc();
            if status == StatusCode::UNAUTHORIZED {
                s.metrics
                    .upstream_retries
                    .with_label_values(&[provider, "unauthorized"])
                    .inc();
                if replayed {
                    break Miss::Rejected;
                }
                match cred.replace_token(token.generation).await {
                    Some(Ok(t)) => {
                        token = t;
                        replayed = true;
                        continue;
                    }
                    Some(Err(e)) => break Miss::Refresh(e),
                    None => break Miss::Rejected,
                }
            }
            let (resp, rate_limit) = match check_rate_limit(resp).await {
                Ok(x) => x,
                Err(e) => break Miss::Connect(error_chain(&e)),
            };
            if let Some(hint) = rate_limit {
                let cooldown = hint
                    .unwrap_or(s.pool_config.default_cooldown)
                    .min(s.pool_config.max_cooldown);
                cred.cool_down(cooldown);
                s.metrics
                    .upstream_retries
                    .with_label_values(&[provider, "rate_limited"])
                    .inc();
                tracing::warn!(target: "tokenrelay::proxy", provider, credential = %cred.id, status = status.as_u16(),
                    cooldown_s = cooldown.as_secs_f64(), "upstream rate-limited the credential; cooling it down");
                break Miss::RateLimited(cooldown);
            }
            return Ok(Outcome {
                response: stream_back(resp, &cred.id),
                credential: Some(cred.id.clone()),
                attempts,
            });
        };
        misses.push((cred, miss));
    }
    Err(exhausted(pool, &misses))
}

async fn send(
    s: &ProxyState,
    token: &Token,
    parts: &Parts,
    headers: &HeaderMap,
    path_and_query: &str,
    body: Bytes,
) -> Result<http::Response<crate::proxy::upstream::IdleTimeout>, hyper_util::client::legacy::Error>
{
    let base = token.base.as_str().trim_end_matches('/');
    let mut uri = String::with_capacity(base.len() + path_and_query.len());
    uri.push_str(base);
    uri.push_str(path_and_query);
    let mut req = http::Request::new(http_body_util::Full::new(body));
    *req.method_mut() = parts.method.clone();
    // The base is a validated URL and the path and query came in as a valid request target.
    *req.uri_mut() = match http::Uri::try_from(uri) {
        Ok(u) => u,
        Err(_) => http::Uri::from_static("/"),
    };
    *req.headers_mut() = headers.clone();
    let h = req.headers_mut();
    if let Some(b) = &token.bearer {
        h.insert(header::AUTHORIZATION, b.clone());
    }
    for (name, value) in &token.upstream_headers {
        h.insert(name, value.clone());
    }
    s.client.send(req).await
}

/// A 429, or a quota error some upstreams answer with 403 (Qwen `insufficient_quota`) or
/// 400/403 with Google's `RESOURCE_EXHAUSTED`. Returns the answer (re-assembled if its
/// body had to be read) and, when rate-limited, the retry hint if there was one.
async fn check_rate_limit(
    resp: http::Response<crate::proxy::upstream::IdleTimeout>,
) -> Result<(http::Response<Body>, Option<Option<Duration>>), BodyError> {
    let status = resp.status();
    if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::FORBIDDEN {
        return Ok((resp.map(Body::new), None));
    }
    let header_hint = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(retry_after::parse);
    // Error bodies are small: read up to 64 KiB to look for a quota code or RetryInfo.
    // A longer one is not an API error answer; it passes through whole.
    const INSPECT: usize = 64 << 10;
    let (head_parts, mut rest) = resp.into_parts();
    let mut head = Vec::new();
    let mut complete = false;
    while head.len() <= INSPECT {
        match rest.frame().await {
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    head.extend_from_slice(&data);
                }
            }
            None => {
                complete = true;
                break;
            }
        }
    }
    let head = Bytes::from(head);
    let (quota, hint) = if complete {
        (
            status == StatusCode::TOO_MANY_REQUESTS || is_quota_error(&head),
            header_hint.or_else(|| retry_after::google_retry_delay(&head)),
        )
    } else {
        (status == StatusCode::TOO_MANY_REQUESTS, header_hint)
    };
    let body = if complete {
        Body::from(head)
    } else {
        let first =
            futures_util::stream::once(
                async move { Ok::<_, BodyError>(http_body::Frame::data(head)) },
            );
        let frames = first.chain(http_body_util::BodyStream::new(rest));
        Body::new(http_body_util::StreamBody::new(frames))
    };
    Ok((
        http::Response::from_parts(head_parts, body),
        quota.then_some(hint),
    ))
}

fn is_quota_error(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let e = &v["error"];
    e["code"] == "insufficient_quota"
        || e["type"] == "insufficient_quota"
        || e["status"] == "RESOURCE_EXHAUSTED"
}

/// Streams the upstream answer to the client as it arrives.
fn stream_back(mut resp: http::Response<Body>, credential: &str) -> Response {
    let headers = resp.headers_mut();
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    if let Ok(v) = HeaderValue::from_str(credential) {
        headers.insert(&CREDENTIAL_HEADER, v);
    }
    resp
}

/// The error when no credential served the request.
fn exhausted(pool: &ProviderPool, misses: &[(Arc<Credential>, Miss)]) -> ProxyError {
    let provider = &pool.config;
    if misses.is_empty() {
        let looked: Vec<String> = looked_at(provider)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let mut msg = format!("provider {} has no credentials", provider.name);
        if !looked.is_empty() {
            let _ = write!(msg, " (looked at: {})", looked.join(", "));
        }
        let _ = write!(msg, "; to add one, {}", provider.reauth_hint());
        return ProxyError::new(Reason::NoUsableCredential, msg);
    }
    let mut lines = Vec::new();
    let mut needs_reauth = false;
    for (c, m) in misses {
        let why = match m {
            Miss::Skipped {
                state,
                detail,
                cooldown,
            } => {
                needs_reauth |= *state == CredState::NeedsReauth;
                match cooldown {
                    Some(d) => format!("{} for {}s", state.as_str(), d.as_secs().max(1)),
                    None if detail.is_empty() => state.as_str().to_string(),
                    None => format!("{}: {detail}", state.as_str()),
                }
            }
            Miss::Refresh(e) => {
                needs_reauth |= e.is_permanent();
                let state = if e.is_permanent() {
                    "needs_reauth"
                } else {
                    "refresh failed"
                };
                format!("{state}: {e}")
            }
            Miss::Connect(e) => format!("upstream unreachable: {e}"),
            Miss::Rejected => {
                "upstream rejected its token (HTTP 401) even after a refresh".to_string()
            }
            Miss::RateLimited(d) => format!(
                "rate-limited by upstream; cooling down for {}s",
                d.as_secs().max(1)
            ),
        };
        lines.push(format!("{}/{}: {why}", provider.name, c.id));
    }
    let mut message = format!(
        "no credential of provider {} could serve this request: {}",
        provider.name,
        lines.join("; ")
    );
    if needs_reauth {
        let _ = write!(message, ". To re-authenticate: {}", provider.reauth_hint());
    }
    let all = |f: fn(&Miss) -> bool| misses.iter().all(|(_, m)| f(m));
    let cooldowns = misses.iter().filter_map(|(_, m)| match m {
        Miss::RateLimited(d) => Some(*d),
        Miss::Skipped {
            state: CredState::CoolingDown,
            cooldown,
            ..
        } => *cooldown,
        _ => None,
    });
    if all(|m| {
        matches!(
            m,
            Miss::RateLimited(_)
                | Miss::Skipped {
                    state: CredState::CoolingDown,
                    ..
                }
        )
    }) {
        return ProxyError {
            reason: Reason::AllCredentialsRateLimited,
            message,
            retry_after: cooldowns.min(),
        };
    }
    if all(|m| matches!(m, Miss::Connect(_))) {
        return ProxyError::new(Reason::UpstreamUnreachable, message);
    }
    let transient = |m: &Miss| match m {
        Miss::Refresh(e) => !e.is_permanent(),
        Miss::Skipped { state, .. } => matches!(state, CredState::Expired | CredState::Backoff),
        _ => false,
    };
    if all(transient) {
        return ProxyError::new(Reason::TokenEndpointUnreachable, message);
    }
    ProxyError::new(Reason::NoUsableCredential, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_at_the_provider() {
        assert_eq!(
            split_path("/qwen/v1/chat/completions"),
            Some(("qwen", "/v1/chat/completions"))
        );
        assert_eq!(split_path("/gemini"), Some(("gemini", "")));
        assert_eq!(split_path("/"), None);
    }

    #[test]
    fn dot_segments_are_refused_even_encoded() {
        assert!(check_path("/v1/../x").is_err());
        assert!(check_path("/v1/%2e%2E/x").is_err());
        assert!(check_path("/v1/%2E/x").is_err());
        assert!(check_path("/v1/..%2fx").is_err());
        assert!(check_path("/v1/..%5Cx").is_err());
        assert!(check_path("/v1/x\\..\\y").is_err());
        assert!(check_path("/v1/models/gemini-2.5:generate").is_ok());
    }

    #[test]
    fn client_credentials_and_hop_by_hop_are_dropped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer dummy"),
            ("x-api-key", "k"),
            ("x-goog-api-key", "k"),
            ("connection", "keep-alive, x-custom-hop"),
            ("x-custom-hop", "1"),
            ("host", "evil.example"),
            ("content-type", "application/json"),
            ("proxy-authorization", "Basic x"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = forwarded_headers(&h);
        let names: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type"]);
    }

    #[test]
    fn quota_errors_are_recognised() {
        assert!(is_quota_error(include_bytes!(
            "../../tests/fixtures/responses/qwen_403_insufficient_quota.json"
        )));
        assert!(is_quota_error(include_bytes!(
            "../../tests/fixtures/responses/google_429_resource_exhausted.json"
        )));
        assert!(!is_quota_error(include_bytes!(
            "../../tests/fixtures/responses/qwen_401_invalid_api_key.json"
        )));
    }
}
