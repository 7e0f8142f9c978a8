//! The mutable `Status` behind a credential's `State` (both types the lifecycle reports,
//! `State` and `Snapshot`, live in `common::state`).

use tokio::time::Instant;

use super::cooldown::Cooldown;

#[derive(Debug, Default)]
pub(super) struct Status {
    pub(super) needs_reauth: bool,
    /// Refused by the upstream (`State::Invalid`).
    pub(super) invalid: bool,
    /// Cool-downs (an upstream rate limit): the whole credential's and per model; a
    /// per-model one leaves the credential serving other models. See `cooldown.rs`.
    pub(super) cooldowns: Vec<Cooldown>,
    pub(super) consecutive_failures: u32,
    /// The last failure, as a message fit for operators (no secrets).
    pub(super) last_error: Option<String>,
    /// The credential's file (or record) could not be read or parsed at the last reload:
    /// it keeps serving from memory; this names the file and the problem.
    pub(super) source_error: Option<String>,
    /// Whether the last failure was a transient token-endpoint failure.
    pub(super) last_error_transient: bool,
    pub(super) last_refresh_at_ms: Option<i64>,
    /// No automatic refresh attempt before this (transient backoff).
    pub(super) retry_at: Option<Instant>,
    /// Alerts already sent for the current trouble: one message per transition.
    pub(super) alerted: Alerted,
}

impl Status {
    /// A good token is in hand again (refreshed, or adopted from another writer): the
    /// failure, its count, its backoff and its alerts are over. Whether an alert had gone
    /// (a `recovered` message is then due).
    pub(super) fn recovered(&mut self) -> bool {
        self.needs_reauth = false;
        self.consecutive_failures = 0;
        self.last_error = None;
        self.last_error_transient = false;
        self.retry_at = None;
        let a = &mut self.alerted;
        let was_alerting = a.reauth || a.failing || a.expiring;
        (a.reauth, a.failing, a.expiring) = (false, false, false);
        was_alerting
    }
}

#[derive(Debug, Default)]
pub(super) struct Alerted {
    pub(super) reauth: bool,
    pub(super) failing: bool,
    pub(super) expiring: bool,
    pub(super) persist: bool,
}
