//! The states of a credential (DESIGN.md), the mutable `Status` behind them, and the
//! read-only `Snapshot` the admin API, metrics and errors are made from.

use std::time::Duration;

use tokio::time::Instant;

/// The states of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Ready,
    Refreshing,
    Backoff,
    CoolingDown,
    Expired,
    NeedsReauth,
    /// The upstream refused the credential itself (a dead or blocked key, a project with
    /// the API off): out of rotation until its key or file changes or a manual refresh.
    Invalid,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Ready,
        State::Refreshing,
        State::Backoff,
        State::CoolingDown,
        State::Expired,
        State::NeedsReauth,
        State::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::Refreshing => "refreshing",
            State::Backoff => "backoff",
            State::CoolingDown => "cooling_down",
            State::Expired => "expired",
            State::NeedsReauth => "needs_reauth",
            State::Invalid => "invalid",
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Status {
    pub(super) needs_reauth: bool,
    /// Refused by the upstream (`State::Invalid`).
    pub(super) invalid: bool,
    /// Per-model cool-downs (a 429 naming a model); the credential serves other models.
    /// Few entries: a linear scan beats a map.
    pub(super) model_cooldowns: Vec<(String, Instant)>,
    pub(super) consecutive_failures: u32,
    /// The last failure, as a message fit for operators (no secrets).
    pub(super) last_error: Option<String>,
    /// Whether the last failure was a transient token-endpoint failure.
    pub(super) last_error_transient: bool,
    pub(super) last_refresh_at_ms: Option<i64>,
    /// No automatic refresh attempt before this (transient backoff).
    pub(super) retry_at: Option<Instant>,
    /// Not used for requests before this (upstream 429).
    pub(super) cooldown_until: Option<Instant>,
    /// Alerts already sent for the current trouble: one message per transition.
    pub(super) alerted: Alerted,
}

#[derive(Debug, Default)]
pub(super) struct Alerted {
    pub(super) reauth: bool,
    pub(super) failing: bool,
    pub(super) expiring: bool,
    pub(super) persist: bool,
}

/// A read-only view of a credential's status, for the admin API, metrics and errors.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: State,
    pub expires_at_ms: Option<i64>,
    pub last_refresh_at_ms: Option<i64>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub cooldown_remaining: Option<Duration>,
    /// Models this credential is cooling down for, and for how long.
    pub model_cooldowns: Vec<(String, Duration)>,
    pub retry_in: Option<Duration>,
    pub usable: bool,
}
