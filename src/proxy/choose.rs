//! Choosing credentials for a request: the pinned credential of an upload session, else
//! the pool's order walked lazily (the first usable credential, usually); the ones whose
//! state or a cool-down for this request's model rules them out are skipped with the
//! reason; the model worked out only when something needs it.

use std::sync::Arc;
use std::time::Duration;

use crate::clock;
use crate::lifecycle::pool::ProviderPool;
use crate::lifecycle::{Credential, Gate, Probe, State as CredState};
use crate::oauth::RefreshError;
use crate::providers;
use crate::quota::limits::AtLimit;
use crate::telemetry::metrics::Metrics;

use super::rewrite;

/// Why one credential did not serve this request.
pub(super) enum Miss {
    /// Not tried: its state rules it out (or it cools down for this request's model).
    Skipped {
        state: CredState,
        detail: String,
        cooldown: Option<Duration>,
    },
    /// The token endpoint failed.
    Refresh(RefreshError),
    /// Upstream could not be reached, or closed a kept-alive connection before answering.
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
pub(super) struct LazyModel<'a> {
    path: &'a str,
    body: &'a [u8],
    model: Option<Option<String>>,
}

impl<'a> LazyModel<'a> {
    pub(super) fn new(path: &'a str, body: &'a [u8]) -> Self {
        LazyModel {
            path,
            body,
            model: None,
        }
    }

    /// The request's path (after the provider segment).
    pub(super) fn path(&self) -> &'a str {
        self.path
    }

    /// What the answer's meter needs to name the model: the model if it was worked out
    /// already (taken, no copy), else, when the request may name one (`/models/` in the
    /// path, `"model"` in the body), the way to work it out later — only if the answer
    /// carries usage. `None`: the request names no model.
    pub(super) fn for_meter(
        &mut self,
        body: &bytes::Bytes,
    ) -> Option<crate::usage::meter::ModelOf> {
        use crate::usage::meter::ModelOf;
        if let Some(known) = self.model.take() {
            return known.map(ModelOf::Known);
        }
        if self.path.contains("/models/") {
            return providers::request_model(self.path, b"").map(ModelOf::Known);
        }
        static MODEL: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"model\""));
        MODEL.find(body)?;
        // A large body is not kept for the whole answer: its model is read now.
        if body.len() > 4096 {
            return providers::request_model("", body).map(ModelOf::Known);
        }
        Some(ModelOf::InBody(body.clone()))
    }

    pub(super) fn get(&mut self) -> Option<&str> {
        let (path, body) = (self.path, self.body);
        self.model
            .get_or_insert_with(|| providers::request_model(path, body))
            .as_deref()
    }
}

/// The credentials to try, in order: the one an upload session is pinned to (and only
/// it), else the pool's order. Lazy: a request walks the pool only as far as it has to.
pub(super) fn candidates<'p>(
    pool: &'p ProviderPool,
    path_and_query: &str,
) -> (bool, impl Iterator<Item = Arc<Credential>> + 'p) {
    // The next leg of an upload goes with the credential that started it, or not at all.
    let pinned = rewrite::session_key(path_and_query).and_then(|k| pool.pinned(&k));
    let order = pinned.is_none().then(|| pool.order());
    (
        pinned.is_some(),
        pinned.into_iter().chain(order.into_iter().flatten()),
    )
}

/// Why `cred` is not tried for this request, if it is not: its state, a cool-down (the
/// whole credential's or the request's model's; the first request after one ended is its
/// probe), or its project at a declared limit.
pub(super) async fn skipped(
    metrics: &Metrics,
    pool: &ProviderPool,
    cred: &Arc<Credential>,
    model: &mut LazyModel<'_>,
    tokens: u64,
    full: &mut Vec<(String, AtLimit)>,
) -> Result<Option<Probe>, Miss> {
    let snap = cred.snapshot();
    if !snap.usable {
        return Err(Miss::Skipped {
            state: snap.state,
            detail: snap.last_error.clone().unwrap_or_default(),
            cooldown: snap.cooldown_remaining,
        });
    }
    let mut probe = None;
    if !snap.cooldowns.is_empty() {
        match cred.gate(model.get()) {
            Gate::Open => {}
            Gate::Probe(p) => probe = Some(p),
            Gate::Closed {
                model: m,
                left,
                reason,
            } => {
                let what = match &m {
                    Some(m) => format!("model {m}, {}", reason.as_str()),
                    None => reason.as_str().to_string(),
                };
                let (detail, left) = if left.is_zero() {
                    (
                        format!("{what}; another request is probing it"),
                        Duration::from_secs(1),
                    )
                } else {
                    (what, left)
                };
                return Err(Miss::Skipped {
                    state: CredState::CoolingDown,
                    detail,
                    cooldown: Some(left),
                });
            }
        }
    }
    if !pool.limits.is_empty() {
        let project = cred.project();
        let scope = project.as_deref().map_or(cred.own_scope(), String::as_str);
        // A project found full for this request is not asked again for its next key.
        let known = full.iter().find(|(s, _)| s == scope).map(|(_, f)| *f);
        let verdict = match known {
            Some(f) => Err(f),
            None => pool
                .limits
                .take(scope, model.get(), tokens, clock::now_ms())
                .await
                .inspect_err(|f| full.push((scope.to_string(), *f))),
        };
        if let Err(full) = verdict {
            metrics
                .limit_skips
                .with_label_values(&[pool.config.name.as_str(), full.window])
                .inc();
            let whose = match &project {
                Some(p) => format!("project {p}"),
                None => "this credential".to_string(),
            };
            return Err(Miss::Skipped {
                state: CredState::CoolingDown,
                detail: format!(
                    "{whose} is at its declared {} limit for model {}",
                    full.window,
                    model.get().unwrap_or("*")
                ),
                cooldown: Some(full.wait),
            });
        }
    }
    Ok(probe)
}
