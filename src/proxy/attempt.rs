//! One attempt with one credential: the request sent upstream (again on a new connection
//! when the connection, not the upstream, failed it), a 401 to an OAuth token refreshed
//! and replayed once, a small error answer read and judged from its protocol fields
//! (rate limit → cool-down, a refused credential → out of rotation), and the answer that
//! serves the client.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::header::{self, HeaderMap};
use http::request::Parts;
use http::StatusCode;
use http_body_util::BodyExt;

use super::admit::{client_host, forwarded_headers, too_large, upstream_uri, RequestBody};
use super::answer::stream_back;
use super::choose::{LazyModel, Miss};
use super::error::{ProxyError, Reason};
use super::upstream::{BodyError, IdleTimeout, UpBody};
use super::{rewrite, ProxyState, Trail};
use crate::clock;
use crate::common::error_chain;
use crate::common::retry_after;
use crate::common::state::CoolScope;
use crate::lifecycle::pool::ProviderPool;
use crate::lifecycle::{Cool, Credential, Probe, Token};
use crate::providers::{self, Refusal, Violation};
use crate::quota;

/// What every attempt of one request shares.
pub(super) struct Attempts<'a> {
    pub s: &'a ProxyState,
    pub pool: &'a ProviderPool,
    pub parts: &'a Parts,
    pub path_and_query: String,
    pub location_base: Option<String>,
    /// Filtered once; the first attempt takes it, later ones filter again.
    pub headers: Option<HeaderMap>,
    /// Until a streamed body has gone (it goes once).
    pub body: Option<RequestBody>,
}

/// How one attempt ended.
pub(super) enum Outcome {
    Served(Response),
    Missed(Miss),
}

impl Attempts<'_> {
    /// The upstream base for `token`: the location's (Vertex AI), else the credential's.
    pub(super) fn base(&self, token: &Token) -> String {
        self.location_base
            .as_deref()
            .unwrap_or_else(|| token.base.as_str())
            .trim_end_matches('/')
            .to_string()
    }

    /// The forwarded headers: the ones filtered up front for the first attempt.
    pub(super) fn headers(&mut self) -> HeaderMap {
        self.headers
            .take()
            .unwrap_or_else(|| forwarded_headers(&self.parts.headers))
    }

    pub(super) fn is_streamed(&self) -> bool {
        !matches!(self.body, Some(RequestBody::Buffered(_)))
    }

    /// Serves the request with `cred` (whose fresh token is `token`), or says why not.
    pub(super) async fn with(
        &mut self,
        cred: &Arc<Credential>,
        mut token: Arc<Token>,
        model: &mut LazyModel<'_>,
        trail: &mut Trail,
        mut half_open: Option<Probe>,
    ) -> Result<Outcome, ProxyError> {
        let (s, pool) = (self.s, self.pool);
        let provider = pool.config.name.as_str();
        let kind = pool.config.kind;
        let base = self.base(&token);
        let streamed = self.is_streamed();
        let static_key = cred.is_api_key();
        let mut replayed = false;
        let miss = loop {
            trail.attempts += 1;
            // A buffered body is cloned for each attempt; a streamed one goes once.
            let (up_body, overrun) = match self.body.as_ref() {
                Some(RequestBody::Buffered(b)) => (UpBody::buffered(b.clone()), None),
                _ => match self.body.take() {
                    Some(RequestBody::Streamed(b, overrun)) => (UpBody::Streamed(b), Some(overrun)),
                    _ => {
                        return Err(ProxyError::new(
                            Reason::UpstreamUnreachable,
                            "the upload was already sent once and cannot be replayed on another credential",
                        ))
                    }
                },
            };
            let uri = upstream_uri(&base, &self.path_and_query);
            let req = upstream_request(&token, uri, &self.parts.method, self.headers(), up_body);
            let (parts, path_and_query) = (self.parts, &self.path_and_query);
            let buffered = match &self.body {
                Some(RequestBody::Buffered(b)) => Some(b.clone()),
                _ => None,
            };
            let again = || {
                Some(upstream_request(
                    &token,
                    upstream_uri(&base, path_and_query),
                    &parts.method,
                    forwarded_headers(&parts.headers),
                    UpBody::buffered(buffered.clone()?),
                ))
            };
            let resp = match s.client.send(req, &again).await {
                Ok(r) => r,
                // The client's upload passed the limit: its own error, not the upstream's.
                Err(_) if overrun.as_ref().is_some_and(|o| o.happened()) => {
                    return Err(too_large(s.max_upload_body));
                }
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
                client_host: client_host(self.parts),
                provider,
                upstream: &base,
            };
            if streamed {
                // Sent once: whatever the upstream answered is the answer.
                if status != StatusCode::TOO_MANY_REQUESTS {
                    settle(&mut half_open, false);
                }
                trail.served(cred);
                return Ok(Outcome::Served(stream_back(
                    resp.map(Body::new),
                    &cred.id,
                    Some((&origins, pool)),
                )));
            }
            if status == StatusCode::UNAUTHORIZED && !static_key {
                // A 401 that refuses the kind of credential (ACCESS_TOKEN_TYPE_UNSUPPORTED):
                // no refresh can help. Read from the small error body, as any refusal.
                if let Ok((_, Some(verdict))) = Box::pin(inspect(resp)).await {
                    if let Judgement::Refused(Refusal::Dead { reason, action }) =
                        verdict.judge(kind, static_key)
                    {
                        break invalid(s, provider, cred, reason, action);
                    }
                }
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
                settle(&mut half_open, false);
                trail.served(cred);
                return Ok(Outcome::Served(stream_back(
                    resp,
                    &cred.id,
                    Some((&origins, pool)),
                )));
            };
            if let Some(p) = verdict.body.as_ref().and_then(providers::answer_project) {
                cred.learn_project(&p);
            }
            match verdict.judge(kind, static_key) {
                Judgement::Pass => {}
                Judgement::RateLimited { hints, violations } => {
                    let miss = rate_limited(s, pool, cred, hints, &violations, model, status);
                    settle(&mut half_open, true);
                    break miss;
                }
                Judgement::Refused(Refusal::Dead { reason, action }) => {
                    break invalid(s, provider, cred, reason, action);
                }
                Judgement::Refused(Refusal::Probe) => {
                    if let Some(reason) = Box::pin(probe(s, kind, &token, &base)).await {
                        break invalid(s, provider, cred, reason, pool.config.hint_for(cred.kind));
                    }
                }
            }
            settle(&mut half_open, false);
            trail.served(cred);
            return Ok(Outcome::Served(stream_back(
                resp,
                &cred.id,
                Some((&origins, pool)),
            )));
        };
        Ok(Outcome::Missed(miss))
    }
}

/// Reports a half-open probe's answer (see `lifecycle::cooldown`).
fn settle(probe: &mut Option<Probe>, rate_limited: bool) {
    if let Some(p) = probe.take() {
        p.answered(rate_limited);
    }
}

/// Cools a rate-limited credential down as `quota::decide` reads the answer: per model
/// where the answer names one (or the provider's quotas are per model), for the window it
/// names; a per-project quota cools the model on every credential of the project.
fn rate_limited(
    s: &ProxyState,
    pool: &ProviderPool,
    cred: &Arc<Credential>,
    hints: quota::Hints,
    violations: &[Violation],
    model: &mut LazyModel<'_>,
    status: StatusCode,
) -> Miss {
    let provider = pool.config.name.as_str();
    s.metrics
        .upstream_retries
        .with_label_values(&[provider, "rate_limited"])
        .inc();
    let bounds = quota::Bounds {
        default_cooldown: s.pool_config.default_cooldown,
        max_cooldown: s.pool_config.max_cooldown,
    };
    let decisions = quota::decide(
        violations,
        hints,
        model.get(),
        pool.config.kind.quota_per_model(),
        clock::now_ms(),
        bounds,
    );
    let project = cred.project();
    let mut longest = Duration::ZERO;
    for d in &decisions {
        let shared = d.per_project && project.is_some();
        let scope = if shared {
            CoolScope::Project
        } else {
            CoolScope::Credential
        };
        let cool = Cool {
            model: d.model.clone(),
            length: d.length,
            reason: d.reason,
            scope,
            doubling: d.doubling,
            cap: bounds.max_cooldown,
        };
        cred.cool(&cool);
        let mut cooled = 1;
        if let (true, Some(p)) = (shared, &project) {
            // Keys of one project are one quota, not extra capacity.
            for other in pool.credentials().iter() {
                if other.id != cred.id && other.project().as_deref() == Some(p) {
                    other.cool(&cool);
                    cooled += 1;
                }
            }
        }
        longest = longest.max(d.length);
        s.metrics
            .count_cooldown(provider, d.reason, scope, d.model.as_deref(), cooled);
        tracing::warn!(target: "tokenrelay::proxy", provider, credential = %cred.id, status = status.as_u16(),
            model = d.model.as_deref().unwrap_or("*"), reason = d.reason.as_str(), scope = scope.as_str(),
            project = project.as_deref().map(String::as_str).unwrap_or("-"), credentials = cooled,
            cooldown_s = d.length.as_secs_f64(), "upstream rate-limited the credential; cooling it down");
    }
    Miss::RateLimited {
        cooldown: longest,
        model: decisions.into_iter().find_map(|d| d.model),
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
    let build = || {
        let mut req = http::Request::new(UpBody::empty());
        *req.uri_mut() = upstream_uri(base, path);
        if let Some((name, value)) = &token.auth {
            req.headers_mut().insert(name, value.clone());
        }
        Some(req)
    };
    let req = build()?;
    let resp = s.client.send(req, &build).await.ok()?;
    let status = resp.status();
    matches!(status.as_u16(), 400 | 401 | 403)
        .then(|| format!("HTTP {} to a plain model list", status.as_u16()))
}

/// The upstream request for one attempt: the client's method, the upstream URI, the
/// forwarded headers and the credential's own.
fn upstream_request(
    token: &Token,
    uri: http::Uri,
    method: &http::Method,
    headers: HeaderMap,
    body: UpBody,
) -> http::Request<UpBody> {
    let mut req = http::Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let h = req.headers_mut();
    if let Some((name, value)) = &token.auth {
        h.insert(name, value.clone());
    }
    for (name, value) in &token.upstream_headers {
        h.insert(name, value.clone());
    }
    req
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
        hints: quota::Hints,
        violations: Vec<Violation>,
    },
    Refused(Refusal),
}

impl ErrorAnswer {
    /// Decides from protocol fields: the status, `error.status`/`error.code`/`type`, and
    /// Google's `ErrorInfo`, `QuotaFailure` and `RetryInfo`.
    fn judge(&self, kind: providers::ProviderKind, static_key: bool) -> Judgement {
        let null = serde_json::Value::Null;
        let body = self.body.as_ref().unwrap_or(&null);
        if kind.is_quota_answer(self.status.as_u16(), body) {
            return Judgement::RateLimited {
                hints: quota::Hints {
                    retry_info: retry_after::google_retry_delay_of(body),
                    retry_after: self.retry_after,
                },
                violations: kind.quota_violations(body),
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
    resp: http::Response<IdleTimeout>,
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

#[cfg(test)]
mod tests {
    use crate::providers::ProviderKind;

    #[test]
    fn quota_errors_are_recognised() {
        let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
        let q = |status, b: &[u8]| ProviderKind::Qwen.is_quota_answer(status, &json(b));
        assert!(q(
            403,
            include_bytes!("../../tests/fixtures/responses/qwen_403_insufficient_quota.json")
        ));
        assert!(q(
            400,
            include_bytes!("../../tests/fixtures/responses/google_429_resource_exhausted.json")
        ));
        assert!(q(
            403,
            include_bytes!("../../tests/fixtures/responses/dashscope_403_free_tier_only.json")
        ));
        assert!(!q(
            401,
            include_bytes!("../../tests/fixtures/responses/qwen_401_invalid_api_key.json")
        ));
        assert!(!q(
            400,
            include_bytes!("../../tests/fixtures/responses/dashscope_400_arrearage.json")
        ));
    }
}
