//! The request path: `ANY /{provider}/{rest}` → the credential's upstream base + `/{rest}`
//! + query, with the credential's token attached and the answer streamed back.
//!
//! Read as its steps, one room each: `admit.rs` (client key, path, headers, body),
//! `choose.rs` (the candidates in order, the model, what rules a credential out),
//! `attempt.rs` (one credential: send, replay after a refresh, judge an error answer),
//! `answer.rs` (stream back, or say why nothing served); `upstream.rs` and `conns.rs` own
//! the upstream connections.
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

mod admit;
mod answer;
mod attempt;
mod body;
pub mod browser;
mod choose;
mod conns;
pub mod error;
pub mod rewrite;
pub mod server;
pub mod upstream;
pub mod websocket;

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::request::Parts;
use http::StatusCode;
use tokio::time::Instant;

use crate::common::error_chain;
use crate::config::PoolConfig;
use crate::lifecycle::pool::{Pool, ProviderPool};
use crate::lifecycle::Credential;
use crate::proxy::error::{ProxyError, Reason};
use crate::telemetry::metrics::Metrics;
use crate::usage::clients::{Clients, Hold, Refused, Who};
use crate::usage::ledger::Ledger;
use crate::usage::meter::{Encoding, Metered, Tally};
use admit::{provider_names, split_path, Admitted, RequestBody};
use attempt::{Attempts, Outcome};
use browser::{BrowserGuard, Verdict};
use choose::{LazyModel, Miss};
use upstream::{IdleTimeout, Upstream};

pub struct ProxyState {
    pub pool: Arc<Pool>,
    pub client: Upstream,
    pub metrics: Arc<Metrics>,
    pub max_request_body: usize,
    pub max_upload_body: u64,
    /// Named clients (`[[clients]]`) and `server.client_keys` (unnamed ones); replaced
    /// on reload.
    pub clients: Arc<ArcSwap<Clients>>,
    /// Where answers' usage is added up and kept.
    pub ledger: Arc<Ledger>,
    pub pool_config: PoolConfig,
    pub browser: BrowserGuard,
    /// Open WebSocket splices, shared by every proxy thread (`server.max_connections`).
    pub upgrades: Arc<tokio::sync::Semaphore>,
}

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
    if s.clients.load().required() {
        s.metrics
            .client_requests
            .with_label_values(&[
                trail.client.as_deref().unwrap_or("-"),
                provider,
                status.as_str(),
            ])
            .inc();
    }
    tracing::info!(target: "tokenrelay::proxy", provider, client = trail.client.as_deref().unwrap_or("-"), credential = trail.served.as_ref().map_or("-", |c| c.id.as_str()),
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
pub(super) struct Trail {
    /// The credentials tried, in order: the first inline (no allocation for the common
    /// single attempt), the rest after it.
    first: Option<Arc<Credential>>,
    more: Vec<Arc<Credential>>,
    served: Option<Arc<Credential>>,
    /// The named client that sent it.
    pub(super) client: Option<Arc<str>>,
    pub(super) attempts: u32,
}

impl Trail {
    pub(super) fn tried(&mut self, c: &Arc<Credential>) {
        match self.first {
            None => self.first = Some(Arc::clone(c)),
            Some(_) => self.more.push(Arc::clone(c)),
        }
    }

    pub(super) fn served(&mut self, c: &Arc<Credential>) {
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

/// Serves one request: admit it, then try the candidates in order until one serves it.
async fn serve(
    s: &ProxyState,
    pool: &ProviderPool,
    parts: &Parts,
    rest: &str,
    body: Body,
    mut upgrade: Option<hyper::upgrade::OnUpgrade>,
    trail: &mut Trail,
) -> Result<Response, ProxyError> {
    let Admitted {
        path_and_query,
        location_base,
        body,
        who,
    } = admit::admit(s, pool, parts, rest, body, upgrade.is_some()).await?;
    // A cheap handle on the buffered bytes (reference counted), for the model lookup.
    let model_bytes = match &body {
        RequestBody::Buffered(b) => b.clone(),
        RequestBody::Streamed(..) => Bytes::new(),
    };
    let mut model = LazyModel::new(rest, &model_bytes);
    let tokens = crate::quota::limits::estimate_tokens(model_bytes.len());
    let hold = match who {
        Who::Named(c) => {
            trail.client = Some(Arc::clone(&c.name));
            c.may_use(&pool.config.name, model.get()).map_err(refusal)?;
            let hold = c.admit(crate::clock::now_ms(), tokens).await;
            Some(hold.map_err(refusal)?)
        }
        Who::Unnamed | Who::Anyone => None,
    };
    let (pinned, candidates) = choose::candidates(pool, &path_and_query);
    let mut attempts = Attempts {
        s,
        pool,
        parts,
        path_and_query,
        location_base,
        headers: Some(admit::forwarded_headers(&parts.headers)),
        body: Some(body),
    };
    let mut misses: Vec<(Arc<Credential>, Miss)> = Vec::new();
    let mut full_scopes = Vec::new();
    for cred in candidates {
        let probe = match choose::skipped(
            &s.metrics,
            pool,
            &cred,
            &mut model,
            tokens,
            &mut full_scopes,
        )
        .await
        {
            Ok(p) => p,
            Err(miss) => {
                misses.push((cred, miss));
                continue;
            }
        };
        trail.tried(&cred);
        let token = match cred.fresh_token().await {
            Ok(t) => t,
            Err(e) => {
                misses.push((cred, Miss::Refresh(e)));
                continue;
            }
        };
        if let Some(client) = upgrade.take() {
            match Box::pin(upgrade_with(&mut attempts, &cred, &token, client, trail)).await? {
                Ok(resp) => return Ok(resp),
                Err((client, miss)) => {
                    upgrade = Some(client);
                    misses.push((cred, miss));
                    continue;
                }
            }
        }
        match attempts
            .with(&cred, token, &mut model, trail, probe)
            .await?
        {
            Outcome::Served(resp) => {
                return Ok(metered(s, pool, cred, &mut model, &model_bytes, hold, resp))
            }
            Outcome::Missed(miss) => misses.push((cred, miss)),
        }
        if attempts.body.is_none() {
            // A streamed upload went with the attempt that missed: no other can send it.
            break;
        }
    }
    if !pinned && misses.is_empty() && !pool.credentials().is_empty() {
        // Every credential left the pool between choosing and trying.
        return Err(ProxyError::new(
            Reason::NoUsableCredential,
            "no credential left in the pool",
        ));
    }
    Err(answer::exhausted(pool, &misses, model.get()))
}

/// A successful answer to a request for a model, wrapped so that its usage is counted as
/// it streams past (`usage::meter`); any other answer as it is.
fn metered(
    s: &ProxyState,
    pool: &ProviderPool,
    cred: Arc<Credential>,
    model: &mut LazyModel<'_>,
    body: &Bytes,
    hold: Option<Hold>,
    resp: Response,
) -> Response {
    if !resp.status().is_success() {
        return resp;
    }
    let generation = crate::providers::is_generation(model.path());
    let Some(model) = model.for_meter(body) else {
        return resp;
    };
    let unknown = pool
        .hot
        .usage_unknown
        .get_or_init(|| {
            s.metrics
                .usage_unknown
                .with_label_values(&[&pool.config.name])
        })
        .clone();
    let tally = Tally {
        metrics: Arc::clone(&s.metrics),
        ledger: Arc::clone(&s.ledger),
        credential: cred,
        model,
        hold,
        unknown,
        generation,
    };
    // A compressed answer is inflated beside the stream for the scanner (gzip, deflate);
    // another encoding cannot be read: it is counted as one without usage.
    let encoding = Encoding::of(resp.headers());
    if encoding == Encoding::Other {
        tally.count(None);
        return resp;
    }
    resp.map(|body| Body::new(Metered::new(body, tally, encoding)))
}

/// A client's refusal as tokenrelay's error.
fn refusal(refused: Refused) -> ProxyError {
    match refused {
        Refused::Forbidden(m) => ProxyError::new(Reason::ClientForbidden, m),
        Refused::RateLimited(m, wait) => ProxyError {
            retry_after: Some(wait),
            ..ProxyError::new(Reason::ClientRateLimited, m)
        },
        Refused::BudgetExhausted(m, wait) => ProxyError {
            retry_after: Some(wait),
            ..ProxyError::new(Reason::ClientBudgetExhausted, m)
        },
    }
}

/// A WebSocket handshake with `cred`: the splice once the upstream switched protocols, its
/// answer otherwise, or the client's upgrade back when the upstream could not be reached.
async fn upgrade_with(
    a: &mut Attempts<'_>,
    cred: &Arc<Credential>,
    token: &crate::lifecycle::Token,
    client: hyper::upgrade::OnUpgrade,
    trail: &mut Trail,
) -> Result<Result<Response, (hyper::upgrade::OnUpgrade, Miss)>, ProxyError> {
    let s = a.s;
    trail.attempts += 1;
    let base = a.base(token);
    let uri = admit::upstream_uri(&base, &a.path_and_query);
    match websocket::handshake(s, token, uri, a.headers()).await {
        Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            trail.served(cred);
            let provider = a.pool.config.name.as_str();
            Ok(Ok(websocket::splice(s, provider, client, resp)))
        }
        Ok(resp) => {
            trail.served(cred);
            let idle = s.client.idle_timeout();
            let resp = resp.map(|b| Body::new(IdleTimeout::new(b, idle)));
            Ok(Ok(answer::stream_back(resp, &cred.id, None)))
        }
        Err(e) if e.is_connect() => Ok(Err((client, Miss::Connect(error_chain(&e))))),
        Err(e) => Err(ProxyError::new(
            Reason::UpstreamUnreachable,
            format!(
                "upstream {base} failed the WebSocket handshake: {}",
                error_chain(&e)
            ),
        )),
    }
}
