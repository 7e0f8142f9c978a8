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
    /// Every cool-down: the whole credential's (`model: None`) and per model, including
    /// ended ones that wait for their half-open probe.
    pub cooldowns: Vec<CooldownView>,
    pub retry_in: Option<Duration>,
    pub usable: bool,
}

/// Why a credential (or one of its models) cools down, from the upstream's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CoolReason {
    /// A per-minute (or per-second) quota: its retry hint, else the next minute.
    PerMinute,
    /// A per-day quota: until the next midnight in America/Los_Angeles.
    PerDay,
    /// The tier has no quota for the model at all (`limit: 0`).
    NoAccess,
    /// A rate limit the answer did not classify: its `Retry-After`/`RetryInfo`, else
    /// `pool.default_cooldown`.
    RetryAfter,
}

impl CoolReason {
    pub const ALL: [CoolReason; 4] = [
        CoolReason::PerMinute,
        CoolReason::PerDay,
        CoolReason::NoAccess,
        CoolReason::RetryAfter,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CoolReason::PerMinute => "per_minute",
            CoolReason::PerDay => "per_day",
            CoolReason::NoAccess => "no_access",
            CoolReason::RetryAfter => "retry_after",
        }
    }
}

/// Whom a cool-down was decided for: this credential, or every credential of its project
/// (a per-project quota).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CoolScope {
    Credential,
    Project,
}

impl CoolScope {
    pub const ALL: [CoolScope; 2] = [CoolScope::Credential, CoolScope::Project];

    pub fn as_str(self) -> &'static str {
        match self {
            CoolScope::Credential => "credential",
            CoolScope::Project => "project",
        }
    }
}

/// One cool-down as the admin API shows it.
#[derive(Debug, Clone)]
pub struct CooldownView {
    /// `None`: the whole credential.
    pub model: Option<String>,
    pub until_ms: i64,
    /// Zero once it has ended (it waits for its probe).
    pub left: Duration,
    pub reason: CoolReason,
    pub scope: CoolScope,
    /// A request is probing it now (half-open).
    pub probing: bool,
}
