//! Choosing credentials for a request: the pinned credential of an upload session, else
//! the pool's order walked lazily (the first usable credential, usually); the ones whose
//! state or a cool-down for this request's model rules them out are skipped with the
//! reason; the model worked out only when something needs it.

use std::sync::Arc;
use std::time::Duration;

use crate::lifecycle::pool::ProviderPool;
use crate::lifecycle::{Credential, State as CredState};
use crate::oauth::RefreshError;
use crate::providers;

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

/// Why `cred` is not tried for this request, if it is not: its state, or a cool-down for
/// the request's model.
pub(super) fn skipped(cred: &Credential, model: &mut LazyModel<'_>) -> Option<Miss> {
    let snap = cred.snapshot();
    if !snap.usable {
        return Some(Miss::Skipped {
            state: snap.state,
            detail: snap.last_error.clone().unwrap_or_default(),
            cooldown: snap.cooldown_remaining,
        });
    }
    if snap.model_cooldowns.is_empty() {
        return None;
    }
    let m = model.get()?;
    let (_, left) = snap.model_cooldowns.iter().find(|(c, _)| c == m)?;
    Some(Miss::Skipped {
        state: CredState::CoolingDown,
        detail: format!("model {m}"),
        cooldown: Some(*left),
    })
}
