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
mod conns;
pub mod error;
mod h1;
pub mod retry_after;
pub mod rewrite;
pub mod server;
pub mod upstream;
pub mod websocket;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
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
use crate::providers::{self, Refusal};
use crate::proxy::upstream::{BodyError, UpBody, Upstream};

pub struct ProxyState {
    pub pool: Arc<Pool>,
    pub client: Upstream,
    pub metrics: Arc<Metrics>,
    pub max_request_body: usize,
    pub max_upload_body: u64,
    pub client_keys: Vec<SecretString>,
    pub pool_config: PoolConfig,
    pub browser: BrowserGuard,
    /// Open WebSocket splices, shared by every proxy thread (`server.max_connections`).
    pub upgrades: Arc<tokio::sync::Semaphore>,
}

static CREDENTIAL_HEADER: HeaderName = HeaderName::from_static("x-tokenrelay-credential");
static GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");
static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies still see.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The proxy as a hyper service: every request goes to `handle` (one route: no router).
#[derive(Clone)]
pub struct ProxyService(pub Arc<ProxyState>);

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for ProxyService {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response, std::convert::Infallible>> + Send>,
    >;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let s = Arc::clone(&self.0);
        Box::pin(async move { Ok(handle(&s, req.map(Body::new)).await) })
    }
}

/// One proxied request, start to end (the log line and metrics included).
pub async fn handle(s: &ProxyState, req: Request) -> Response {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let upgrade = if websocket::is_upgrade(&parts.method, &parts.headers) {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
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
    let mut trail = Trail::default();
    let response = match tokio::time::timeout(
        deadline,
        serve(s, pool, &parts, rest, body, upgrade, &mut trail),
    )
    .await
    {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => e.into_response(),
        Err(_) => ProxyError::new(
            Reason::DeadlineExceeded,
            format!("no upstream answer within pool.request_deadline ({deadline:?})"),
        )
        .into_response(),
    };
    let status = response.status();
    let elapsed = started.elapsed();
    if status == StatusCode::OK {
        pool.hot
            .ok
            .get_or_init(|| s.metrics.requests.with_label_values(&[provider, "200"]))
            .inc();
    } else {
        s.metrics
            .requests
            .with_label_values(&[provider, status.as_str()])
            .inc();
    }
    pool.hot
        .duration
        .get_or_init(|| s.metrics.request_duration.with_label_values(&[provider]))
        .observe(elapsed.as_secs_f64());
    tracing::info!(target: "tokenrelay::proxy", provider, credential = trail.served.as_ref().map_or("-", |c| c.id.as_str()),
        tried = %Tried(&trail), method = %parts.method, path = parts.uri.path(), status = status.as_u16(),
        attempts = trail.attempts, duration_ms = elapsed.as_secs_f64() * 1000.0, "request");
    let mut response = response;
    if let Some(origin) = cors {
        browser::allow_origin(&mut response, origin);
    }
    response
}

/// What a request did, for its log line: every credential it tried (also when it ended
/// in an error), the one that served, and how many upstream attempts it made.
#[derive(Default)]
struct Trail {
    /// The credentials tried, in order: the first inline (no allocation for the common
    /// single attempt), the rest after it.
    first: Option<Arc<Credential>>,
    more: Vec<Arc<Credential>>,
    served: Option<Arc<Credential>>,
    attempts: u32,
}

impl Trail {
    fn tried(&mut self, c: &Arc<Credential>) {
        match self.first {
            None => self.first = Some(Arc::clone(c)),
            Some(_) => self.more.push(Arc::clone(c)),
        }
    }

    fn served(&mut self, c: &Arc<Credential>) {
        self.served = Some(Arc::clone(c));
    }
}

/// The `tried=` field of the request's log line: ids joined by commas.
struct Tried<'a>(&'a Trail);

impl std::fmt::Display for Tried<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, c) in self.0.first.iter().chain(&self.0.more).enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&c.id)?;
        }
        Ok(())
    }
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
        // Decoded only when it could hide something (`%2e%2e`, `..%2f`, `%5c`).
        let hidden =
            seg.contains(['%', '+']) && percent_decode_lower(seg).split(['/', '\\']).any(dot);
        if hidden || seg.split('\\').any(dot) {
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

/// Whether and where the client presented one of `server.client_keys`.
enum ClientKey {
    NotNeeded,
    InHeader,
    /// In `?key=` (Google's convention): removed before the request goes upstream.
    InQuery,
    Missing,
}

fn client_key(keys: &[SecretString], headers: &HeaderMap, query: Option<&str>) -> ClientKey {
    if keys.is_empty() {
        return ClientKey::NotNeeded;
    }
    let matches = |p: &str| {
        keys.iter().fold(false, |ok, k| {
            ok | constant_time_eq(p.trim().as_bytes(), k.expose_secret().as_bytes())
        })
    };
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
    if presented.into_iter().flatten().any(matches) {
        return ClientKey::InHeader;
    }
    let in_query = query.is_some_and(|q| {
        url::form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "key" && matches(&v))
    });
    if in_query {
        ClientKey::InQuery
    } else {
        ClientKey::Missing
    }
}

/// The query without its `key` parameters (the client's key), other parameters kept as
/// sent. `None` when nothing is left.
fn without_key_param(query: &str) -> Option<String> {
    if !query
        .split('&')
        .any(|p| p == "key" || p.starts_with("key="))
    {
        return Some(query.to_string());
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| *p != "key" && !p.starts_with("key="))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// Compares without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    upload_limit: u64,
) -> Result<RequestBody, ProxyError> {
    let too_large = || {
        ProxyError::new(
            Reason::RequestTooLarge,
            format!(
                "the request body is larger than server.max_upload_body ({upload_limit} bytes)"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > upload_limit) {
        return Err(too_large());
    }
    if declared.is_some_and(|n| n > limit as u64) {
        // An upload: streamed, never buffered whole.
        return Ok(RequestBody::Streamed(capped(body, upload_limit)));
    }
    // Unknown or small length: buffer up to the replay limit; beyond it, stream on.
    let mut body = body;
    let mut head = Vec::new();
    loop {
        match body.frame().await {
            None => return Ok(RequestBody::Buffered(Bytes::from(head))),
            Some(Err(e)) => {
                return Err(ProxyError::new(
                    Reason::BadRequest,
                    format!("could not read the request body: {e}"),
                ))
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    head.extend_from_slice(&data);
                }
                if head.len() > limit {
                    let first = futures_util::stream::once(async move {
                        Ok::<_, axum::Error>(Bytes::from(head))
                    });
                    let rest = capped(body, upload_limit.saturating_sub(limit as u64));
                    let chained = first.chain(rest.into_data_stream());
                    return Ok(RequestBody::Streamed(Body::from_stream(chained)));
                }
            }
        }
    }
}

/// A streamed body that fails once it passes `limit` bytes.
fn capped(body: Body, limit: u64) -> Body {
    Body::new(Limited::new(
        body,
        usize::try_from(limit).unwrap_or(usize::MAX),
    ))
}

/// The request headers to forward: everything but client credentials, `Host`,
/// `Content-Length` (recomputed) and hop-by-hop headers.
fn forwarded_headers(incoming: &HeaderMap) -> HeaderMap {
    let named_in_connection: Vec<HeaderName> = incoming
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let dropped = |name: &HeaderName| {
        HOP_BY_HOP.contains(name)
            || [
                &header::HOST,
                &header::CONTENT_LENGTH,
                &header::AUTHORIZATION,
                &header::UPGRADE,
                &X_API_KEY,
                &GOOG_API_KEY,
            ]
            .contains(&name)
            || named_in_connection.contains(name)
    };
    // One pass (a copy, then a removal per name, cost more than the copy).
    let mut out = HeaderMap::with_capacity(incoming.len());
    for (name, value) in incoming {
        if !dropped(name) {
            out.append(name, value.clone());
        }
    }
    out
}

/// Why one credential did not serve this request.
enum Miss {
    /// Not tried: its state rules it out (or it cools down for this request's model).
    Skipped {
        state: CredState,
        detail: String,
        cooldown: Option<Duration>,
    },
    /// The token endpoint failed.
    Refresh(RefreshError),
    /// Upstream could not be reached.
    Connect(String),
    /// Upstream answered 401 to its token; `refreshed` says whether a refresh and replay
    /// happened first.
    Rejected { refreshed: bool },
    /// Upstream refused the credential itself; it left the rotation.
    Invalid { reason: String, action: String },
    /// Upstream rate-limited it (for `model`, when the quota is per model).
    RateLimited {
        cooldown: Duration,
        model: Option<String>,
    },
}

/// The model of this request, worked out only when something needs it (a per-model
/// cool-down to honour, or a 429 to attribute): the path, else the buffered body.
struct LazyModel<'a> {
    path: &'a str,
    body: &'a [u8],
    model: Option<Option<String>>,
}

impl LazyModel<'_> {
    fn get(&mut self) -> Option<&str> {
        let (path, body) = (self.path, self.body);
        self.model
            .get_or_insert_with(|| providers::request_model(path, body))
            .as_deref()
    }
}

/// A request body: buffered up to `server.max_request_body` (replayable on another
/// credential), or streamed upstream once (an upload, up to `server.max_upload_body`).
enum RequestBody {
    Buffered(Bytes),
    Streamed(Body),
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    s: &ProxyState,
    pool: &ProviderPool,
    parts: &Parts,
    rest: &str,
    body: Body,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    trail: &mut Trail,
) -> Result<Response, ProxyError> {
    let kind = pool.config.kind;
    let query_key = match client_key(&s.client_keys, &parts.headers, parts.uri.query()) {
        ClientKey::Missing => {
            return Err(ProxyError::new(
                Reason::Unauthorized,
                "missing or wrong client key: send one of server.client_keys as `Authorization: Bearer <key>`, `x-api-key`, `x-goog-api-key` or `?key=`",
            ))
        }
        ClientKey::InQuery => true,
        ClientKey::NotNeeded | ClientKey::InHeader => false,
    };
    check_path(rest)?;
    let location_base = location_base(&pool.config, rest)?;
    // Filtered once; the first attempt takes it, a replay filters again.
    let mut headers = Some(forwarded_headers(&parts.headers));
    // The client's own key never goes upstream, wherever it put it.
    let path_and_query = match parts.uri.query() {
        Some(q) if query_key || kind.key_in_query() => match without_key_param(q) {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_string(),
        },
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    let body = if upgrade.is_some() {
        RequestBody::Buffered(Bytes::new())
    } else {
        read_body(body, &parts.headers, s.max_request_body, s.max_upload_body).await?
    };
    let provider = pool.config.name.as_str();
    // A cheap handle on the buffered bytes (reference counted), for the model lookup.
    let model_bytes = match &body {
        RequestBody::Buffered(b) => b.clone(),
        RequestBody::Streamed(_) => Bytes::new(),
    };
    let mut model = LazyModel {
        path: rest,
        body: &model_bytes,
        model: None,
    };
    let streamed = matches!(body, RequestBody::Streamed(_));
    let mut body = Some(body);
    // The next leg of an upload goes with the credential that started it, or not at all.
    let pinned = rewrite::session_key(&path_and_query).and_then(|k| pool.pinned(&k));
    // Lazy: a request walks the pool only as far as it has to (the first usable
    // credential, usually), never the whole list.
    let order = pinned.is_none().then(|| pool.order());
    let candidates = pinned.iter().cloned().chain(order.into_iter().flatten());
    let mut upgrade = upgrade;
    let mut misses: Vec<(Arc<Credential>, Miss)> = Vec::new();
    for cred in candidates {
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
        if !snap.model_cooldowns.is_empty() {
            if let Some(m) = model.get() {
                if let Some((_, left)) = snap.model_cooldowns.iter().find(|(c, _)| c == m) {
                    misses.push((
                        Arc::clone(&cred),
                        Miss::Skipped {
                            state: CredState::CoolingDown,
                            detail: format!("model {m}"),
                            cooldown: Some(*left),
                        },
                    ));
                    continue;
                }
            }
        }
        trail.tried(&cred);
        let mut token = match cred.fresh_token().await {
            Ok(t) => t,
            Err(e) => {
                misses.push((Arc::clone(&cred), Miss::Refresh(e)));
                continue;
            }
        };
        let base = location_base
            .as_deref()
            .unwrap_or_else(|| token.base.as_str())
            .trim_end_matches('/')
            .to_string();
        if let Some(client) = upgrade.take() {
            trail.attempts += 1;
            let uri = upstream_uri(&base, &path_and_query);
            let filtered = headers
                .take()
                .unwrap_or_else(|| forwarded_headers(&parts.headers));
            match Box::pin(websocket::handshake(s, &token, uri, filtered)).await {
                Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    trail.served(&cred);
                    return Ok(websocket::splice(s, provider, client, resp));
                }
                Ok(resp) => {
                    trail.served(&cred);
                    let resp = resp.map(|b| {
                        Body::new(crate::proxy::upstream::IdleTimeout::new(
                            b,
                            s.client.idle_timeout(),
                        ))
                    });
                    return Ok(stream_back(resp, &cred.id, None));
                }
                Err(e) if e.is_connect() => {
                    upgrade = Some(client);
                    misses.push((Arc::clone(&cred), Miss::Connect(error_chain(&e))));
                    continue;
                }
                Err(e) => {
                    return Err(ProxyError::new(
                        Reason::UpstreamUnreachable,
                        format!(
                            "upstream {base} failed the WebSocket handshake: {}",
                            error_chain(&e)
                        ),
                    ))
                }
            }
        }
        let static_key = cred.is_api_key();
        let mut replayed = false;
        let miss = loop {
            trail.attempts += 1;
            // A buffered body is cloned for each attempt; a streamed one goes once.
            let up_body = match body.as_ref() {
                Some(RequestBody::Buffered(b)) => UpBody::buffered(b.clone()),
                _ => match body.take() {
                    Some(RequestBody::Streamed(b)) => UpBody::Streamed(b),
                    _ => {
                        return Err(ProxyError::new(
                            Reason::UpstreamUnreachable,
                            "the upload was already sent once and cannot be replayed on another credential",
                        ))
                    }
                },
            };
            let filtered = headers
                .take()
                .unwrap_or_else(|| forwarded_headers(&parts.headers));
            let sent = send(s, &token, &base, parts, filtered, &path_and_query, up_body).await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) if e.is_connect() && !streamed => {
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
                            "upstream {base} failed before answering: {}",
                            error_chain(&e)
                        ),
                    ));
                }
            };
            let status = resp.status();
            if status == StatusCode::OK {
                cred.upstream_ok
                    .get_or_init(|| {
                        s.metrics
                            .upstream_requests
                            .with_label_values(&[provider, &cred.id, "200"])
                    })
                    .inc();
            } else {
                s.metrics
                    .upstream_requests
                    .with_label_values(&[provider, &cred.id, status.as_str()])
                    .inc();
            }
            let origins = rewrite::Origins {
                client_host: client_host(parts),
                provider,
                upstream: &base,
            };
            if streamed {
                // Sent once: whatever the upstream answered is the answer.
                trail.served(&cred);
                return Ok(stream_back(
                    resp.map(Body::new),
                    &cred.id,
                    Some((&origins, pool)),
                ));
            }
            if status == StatusCode::UNAUTHORIZED && !static_key {
                // An OAuth token: refresh it once and replay.
                s.metrics
                    .upstream_retries
                    .with_label_values(&[provider, "unauthorized"])
                    .inc();
                if replayed {
                    break Miss::Rejected { refreshed: true };
                }
                match cred.replace_token(token.generation).await {
                    Some(Ok(t)) => {
                        token = t;
                        replayed = true;
                        continue;
                    }
                    Some(Err(e)) => break Miss::Refresh(e),
                    None => break Miss::Rejected { refreshed: false },
                }
            }
            let (resp, verdict) = if needs_inspection(status) {
                // Boxed: a rare path whose state should not weigh on every request's.
                match Box::pin(inspect(resp)).await {
                    Ok(x) => x,
                    Err(e) => break Miss::Connect(error_chain(&e)),
                }
            } else {
                (resp.map(Body::new), None)
            };
            let Some(verdict) = verdict else {
                trail.served(&cred);
                return Ok(stream_back(resp, &cred.id, Some((&origins, pool))));
            };
            match verdict.judge(kind, static_key) {
                Judgement::Pass => {}
                Judgement::RateLimited { hint, models } => {
                    break rate_limited(s, pool, &cred, hint, models, &mut model, status);
                }
                Judgement::Refused(Refusal::Dead { reason, action }) => {
                    break invalid(s, provider, &cred, reason, action);
                }
                Judgement::Refused(Refusal::Probe) => {
                    if let Some(reason) = Box::pin(probe(s, kind, &token, &base)).await {
                        break invalid(s, provider, &cred, reason, pool.config.hint_for(cred.kind));
                    }
                }
            }
            trail.served(&cred);
            return Ok(stream_back(resp, &cred.id, Some((&origins, pool))));
        };
        misses.push((cred, miss));
        if streamed && body.is_none() {
            break;
        }
    }
    if pinned.is_none() && misses.is_empty() && !pool.credentials().is_empty() {
        // Every credential left the pool between choosing and trying.
        return Err(ProxyError::new(
            Reason::NoUsableCredential,
            "no credential left in the pool",
        ));
    }
    Err(exhausted(pool, &misses, model.get()))
}

/// The upstream base when the provider's upstream has a `{location}` (Vertex AI): the
/// location the path names, if it is one of `locations`, else `global`.
fn location_base(
    provider: &crate::config::ProviderConfig,
    rest: &str,
) -> Result<Option<String>, ProxyError> {
    let Some(template) = &provider.upstream_template else {
        return Ok(None);
    };
    let location = providers::vertex::path_location(rest).unwrap_or("global");
    if !provider.locations.iter().any(|l| l == location) {
        return Err(ProxyError::new(
            Reason::BadRequest,
            format!(
                "location {location:?} is not in providers.{}.locations; add it there to use it",
                provider.name
            ),
        ));
    }
    Ok(Some(providers::vertex::base_for(template, location)))
}

/// The Host the client reached tokenrelay by (the Host rule has vetted it).
fn client_host(parts: &Parts) -> &str {
    parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("127.0.0.1")
}

fn upstream_uri(base: &str, path_and_query: &str) -> http::Uri {
    let mut uri = String::with_capacity(base.len() + path_and_query.len());
    uri.push_str(base);
    uri.push_str(path_and_query);
    // The base is a validated URL and the path and query came in as a valid request target.
    http::Uri::try_from(uri).unwrap_or_else(|_| http::Uri::from_static("/"))
}

/// Cools a rate-limited credential down: for the models the answer names (or the
/// request's model, where the provider's quotas are per model), else whole. A zero quota
/// (the key's tier has none for that model) cools the pair for `pool.max_cooldown`.
fn rate_limited(
    s: &ProxyState,
    pool: &ProviderPool,
    cred: &Credential,
    hint: Option<Duration>,
    named: Vec<(String, bool)>,
    model: &mut LazyModel,
    status: StatusCode,
) -> Miss {
    let provider = pool.config.name.as_str();
    let cap = s.pool_config.max_cooldown;
    let cooldown = hint.unwrap_or(s.pool_config.default_cooldown).min(cap);
    s.metrics
        .upstream_retries
        .with_label_values(&[provider, "rate_limited"])
        .inc();
    let mut models = named;
    if models.is_empty() && pool.config.kind.quota_per_model() {
        if let Some(m) = model.get() {
            models.push((m.to_string(), false));
        }
    }
    if models.is_empty() {
        cred.cool_down(cooldown);
        tracing::warn!(target: "tokenrelay::proxy", provider, credential = %cred.id, status = status.as_u16(),
            cooldown_s = cooldown.as_secs_f64(), "upstream rate-limited the credential; cooling it down");
        return Miss::RateLimited {
            cooldown,
            model: None,
        };
    }
    let mut longest = Duration::ZERO;
    for (m, zero) in &models {
        let d = if *zero { cap } else { cooldown };
        longest = longest.max(d);
        cred.cool_down_model(m, d);
        s.metrics.count_model_cooldown(provider, m);
        tracing::warn!(target: "tokenrelay::proxy", provider, credential = %cred.id, model = %m, status = status.as_u16(),
            cooldown_s = d.as_secs_f64(), zero_quota = *zero, "upstream rate-limited the credential for one model; other models keep using it");
    }
    Miss::RateLimited {
        cooldown: longest,
        model: models.into_iter().next().map(|(m, _)| m),
    }
}

fn invalid(
    s: &ProxyState,
    provider: &str,
    cred: &Credential,
    reason: String,
    action: String,
) -> Miss {
    s.metrics
        .upstream_retries
        .with_label_values(&[provider, "invalid_credential"])
        .inc();
    cred.mark_invalid(&reason, &action);
    Miss::Invalid { reason, action }
}

/// Asks the upstream about the key alone (a refusal that did not say whether the key or
/// the request was at fault). `Some(reason)` when the key is refused there too.
async fn probe(
    s: &ProxyState,
    kind: providers::ProviderKind,
    token: &Token,
    base: &str,
) -> Option<String> {
    let path = kind.probe_path()?;
    let mut req = http::Request::new(UpBody::empty());
    *req.uri_mut() = upstream_uri(base, path);
    if let Some((name, value)) = &token.auth {
        req.headers_mut().insert(name, value.clone());
    }
    let resp = s.client.send(req).await.ok()?;
    let status = resp.status();
    matches!(status.as_u16(), 400 | 401 | 403)
        .then(|| format!("HTTP {} to a plain model list", status.as_u16()))
}

async fn send(
    s: &ProxyState,
    token: &Token,
    base: &str,
    parts: &Parts,
    headers: HeaderMap,
    path_and_query: &str,
    body: UpBody,
) -> Result<http::Response<crate::proxy::upstream::IdleTimeout>, crate::proxy::upstream::SendError>
{
    let mut req = http::Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = upstream_uri(base, path_and_query);
    *req.headers_mut() = headers;
    let h = req.headers_mut();
    if let Some((name, value)) = &token.auth {
        h.insert(name, value.clone());
    }
    for (name, value) in &token.upstream_headers {
        h.insert(name, value.clone());
    }
    s.client.send(req).await
}

/// The parts of a small upstream error answer that decide what happens next.
struct ErrorAnswer {
    status: StatusCode,
    retry_after: Option<Duration>,
    /// The JSON body, when it was read whole and parsed.
    body: Option<serde_json::Value>,
}

enum Judgement {
    Pass,
    RateLimited {
        hint: Option<Duration>,
        models: Vec<(String, bool)>,
    },
    Refused(Refusal),
}

impl ErrorAnswer {
    /// Decides from protocol fields: the status, `error.status`/`error.code`/`type`, and
    /// Google's `ErrorInfo`, `QuotaFailure` and `RetryInfo`.
    fn judge(&self, kind: providers::ProviderKind, static_key: bool) -> Judgement {
        let null = serde_json::Value::Null;
        let body = self.body.as_ref().unwrap_or(&null);
        let quota = self.status == StatusCode::TOO_MANY_REQUESTS || is_quota_error(body);
        if quota {
            return Judgement::RateLimited {
                hint: self
                    .retry_after
                    .or_else(|| retry_after::google_retry_delay_of(body)),
                models: providers::quota_models(body),
            };
        }
        match kind.refusal(self.status.as_u16(), body, static_key) {
            Some(r) => Judgement::Refused(r),
            None => Judgement::Pass,
        }
    }
}

fn needs_inspection(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 401 | 403 | 429)
}

/// Reads a small error answer that may mean "next credential" (a status for which
/// `needs_inspection` holds) up to 64 KiB and parses it; a longer body (not an API error
/// answer) passes through untouched. Returns the answer (re-assembled if its body was read).
async fn inspect(
    resp: http::Response<crate::proxy::upstream::IdleTimeout>,
) -> Result<(http::Response<Body>, Option<ErrorAnswer>), BodyError> {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(retry_after::parse);
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
    let parsed = if complete {
        serde_json::from_slice(&head).ok()
    } else {
        None
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
        Some(ErrorAnswer {
            status,
            retry_after,
            body: parsed,
        }),
    ))
}

fn is_quota_error(v: &serde_json::Value) -> bool {
    let e = &v["error"];
    e["code"] == "insufficient_quota"
        || e["type"] == "insufficient_quota"
        || e["status"] == "RESOURCE_EXHAUSTED"
}

/// Streams the upstream answer to the client as it arrives; absolute URLs on the
/// upstream's origin point back through tokenrelay, and a new upload session is pinned to
/// the credential.
fn stream_back(
    mut resp: http::Response<Body>,
    credential: &str,
    rewrite: Option<(&rewrite::Origins, &ProviderPool)>,
) -> Response {
    let headers = resp.headers_mut();
    // Usually none is there: one look at each header instead of a removal per name.
    if headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        for h in &HOP_BY_HOP {
            headers.remove(h);
        }
    }
    if let Some((origins, pool)) = rewrite {
        if let Some(session) = rewrite::point_back(headers, origins) {
            if let Some(key) = rewrite::session_key(&session) {
                pool.pin(key, credential);
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(credential) {
        headers.insert(&CREDENTIAL_HEADER, v);
    }
    resp
}

/// The error when no credential served the request.
fn exhausted(
    pool: &ProviderPool,
    misses: &[(Arc<Credential>, Miss)],
    model: Option<&str>,
) -> ProxyError {
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
    // Hints for the kinds of credential that need replacing, each once.
    let mut hints: Vec<String> = Vec::new();
    let mut hint = |c: &Credential| {
        let h = provider.hint_for(c.kind);
        if !hints.contains(&h) {
            hints.push(h);
        }
    };
    for (c, m) in misses {
        let why = match m {
            Miss::Skipped {
                state,
                detail,
                cooldown,
            } => {
                if *state == CredState::NeedsReauth {
                    hint(c);
                }
                match cooldown {
                    Some(d) if detail.is_empty() => {
                        format!("{} for {}s", state.as_str(), d.as_secs().max(1))
                    }
                    Some(d) => format!("{} for {}s ({detail})", state.as_str(), d.as_secs().max(1)),
                    None if detail.is_empty() => state.as_str().to_string(),
                    None => format!("{}: {detail}", state.as_str()),
                }
            }
            Miss::Refresh(e) => {
                let state = if e.is_permanent() {
                    hint(c);
                    "needs_reauth"
                } else {
                    "refresh failed"
                };
                format!("{state}: {e}")
            }
            Miss::Connect(e) => format!("upstream unreachable: {e}"),
            Miss::Rejected { refreshed: true } => {
                "upstream rejected its token (HTTP 401) even after a refresh".to_string()
            }
            Miss::Rejected { refreshed: false } => {
                "upstream rejected it (HTTP 401); it cannot be refreshed".to_string()
            }
            Miss::Invalid { reason, action } => {
                format!("refused by the upstream ({reason}), now out of rotation; to fix: {action}")
            }
            Miss::RateLimited {
                cooldown,
                model: Some(m),
            } => format!(
                "rate-limited by upstream for model {m}; cooling down for {}s",
                cooldown.as_secs().max(1)
            ),
            Miss::RateLimited {
                cooldown,
                model: None,
            } => format!(
                "rate-limited by upstream; cooling down for {}s",
                cooldown.as_secs().max(1)
            ),
        };
        lines.push(format!("{}/{}: {why}", provider.name, c.id));
    }
    let mut message = format!(
        "no credential of provider {} could serve this request: {}",
        provider.name,
        lines.join("; ")
    );
    if !hints.is_empty() {
        let _ = write!(message, ". To re-authenticate: {}", hints.join("; or "));
    }
    let all = |f: &dyn Fn(&Miss) -> bool| misses.iter().all(|(_, m)| f(m));
    let cooling = |m: &Miss| {
        matches!(
            m,
            Miss::RateLimited { .. }
                | Miss::Skipped {
                    state: CredState::CoolingDown,
                    ..
                }
        )
    };
    if all(&cooling) {
        let soonest = misses
            .iter()
            .filter_map(|(_, m)| match m {
                Miss::RateLimited { cooldown, .. } => Some(*cooldown),
                Miss::Skipped { cooldown, .. } => *cooldown,
                _ => None,
            })
            .min();
        if let Some(model) = model {
            let per_model = misses.iter().any(|(_, m)| {
                matches!(m, Miss::RateLimited { model: Some(_), .. })
                    || matches!(m, Miss::Skipped { detail, .. } if detail.starts_with("model "))
            });
            if per_model {
                let _ = write!(
                    message,
                    " (for model {model}; other models may still be served)"
                );
            }
        }
        return ProxyError {
            reason: Reason::AllCredentialsRateLimited,
            message,
            retry_after: soonest,
        };
    }
    if all(&|m| matches!(m, Miss::Connect(_))) {
        return ProxyError::new(Reason::UpstreamUnreachable, message);
    }
    let transient = |m: &Miss| match m {
        Miss::Refresh(e) => !e.is_permanent(),
        Miss::Skipped { state, .. } => matches!(state, CredState::Expired | CredState::Backoff),
        _ => false,
    };
    if all(&transient) {
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
        let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
        assert!(is_quota_error(&json(include_bytes!(
            "../../tests/fixtures/responses/qwen_403_insufficient_quota.json"
        ))));
        assert!(is_quota_error(&json(include_bytes!(
            "../../tests/fixtures/responses/google_429_resource_exhausted.json"
        ))));
        assert!(!is_quota_error(&json(include_bytes!(
            "../../tests/fixtures/responses/qwen_401_invalid_api_key.json"
        ))));
    }

    #[test]
    fn the_key_parameter_is_removed_and_the_rest_kept_as_sent() {
        assert_eq!(without_key_param("key=abc"), None);
        assert_eq!(
            without_key_param("alt=sse&key=abc").as_deref(),
            Some("alt=sse")
        );
        assert_eq!(
            without_key_param("key=a&alt=sse&key=b&x=%20").as_deref(),
            Some("alt=sse&x=%20")
        );
        assert_eq!(without_key_param("keys=1").as_deref(), Some("keys=1"));
    }

    #[test]
    fn a_query_key_is_a_client_key() {
        let keys = [SecretString::from("ck-secret".to_string())];
        let none = HeaderMap::new();
        assert!(matches!(
            client_key(&keys, &none, Some("key=ck-secret")),
            ClientKey::InQuery
        ));
        assert!(matches!(
            client_key(&keys, &none, Some("key=wrong")),
            ClientKey::Missing
        ));
        assert!(matches!(client_key(&[], &none, None), ClientKey::NotNeeded));
    }
}
