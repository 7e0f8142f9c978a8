//! A credential's state as the lifecycle reports it: `State` (the states of DESIGN.md) and
//! the read-only `Snapshot` the admin API, metrics and errors are made from. Here rather
//! than in `lifecycle/` so that `telemetry::metrics`, which the lifecycle counts into, can read
//! snapshots without importing the lifecycle back. The lifecycle re-exports both.

use std::time::Duration;

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
