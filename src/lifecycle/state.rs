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
}

impl State {
    pub const ALL: [State; 6] = [
        State::Ready,
        State::Refreshing,
        State::Backoff,
        State::CoolingDown,
        State::Expired,
        State::NeedsReauth,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::Refreshing => "refreshing",
            State::Backoff => "backoff",
            State::CoolingDown => "cooling_down",
            State::Expired => "expired",
            State::NeedsReauth => "needs_reauth",
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Status {
    pub(super) needs_reauth: bool,
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
    pub retry_in: Option<Duration>,
    pub usable: bool,
}
