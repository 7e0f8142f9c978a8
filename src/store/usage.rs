//! What a usage store keeps (`sqlite.rs` on one machine, `redis/usage.rs` for a fleet):
//! rows by minute, client, provider, model and credential, and what a client spent in its
//! current windows. The ledger (`usage::ledger`) fills them.

use std::sync::Arc;

use serde::Serialize;

/// Minute rows are kept this long.
pub const KEEP_MINUTES_S: i64 = 48 * 3600;
/// Hour rows are kept this long.
pub const KEEP_HOURS_S: i64 = 400 * 86_400;

/// One row's identity: the minute it started (unix seconds) and what it is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub minute: i64,
    pub client: Arc<str>,
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub credential: Arc<str>,
}

/// What a row adds up. `tokens` is what limits and budgets count (prompt + completion,
/// plus Gemini's thoughts, reported beside them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Sums {
    pub answers: u64,
    /// Answers that carried no usage.
    pub unknown: u64,
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub thoughts: u64,
    pub tokens: u64,
}

impl Sums {
    pub fn add(&mut self, o: &Sums) {
        for (a, b) in [
            (&mut self.answers, o.answers),
            (&mut self.unknown, o.unknown),
            (&mut self.prompt, o.prompt),
            (&mut self.completion, o.completion),
            (&mut self.cached, o.cached),
            (&mut self.thoughts, o.thoughts),
            (&mut self.tokens, o.tokens),
        ] {
            *a = a.saturating_add(b);
        }
    }
}

/// A row as a store returns it: a bucket's start (unix seconds) and its sums.
pub type Stored = (i64, Key, Sums);

/// What a client spent in its current windows (restored after a restart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    pub requests_in_minute: u64,
    pub tokens_in_minute: u64,
    pub tokens_in_day: u64,
    pub tokens_in_month: u64,
}
