//! Wall-clock time as Unix milliseconds. Token expiry is wall-clock (it is written in
//! files and compared across processes); waiting and scheduling use `tokio::time`.
//!
//! `now_ms` is the later of the system clock and a reading anchored to `tokio::time`: the
//! system clock covers suspend and clock corrections, the anchored reading lets tests with
//! paused tokio time move token expiry forward. Taking the later one never makes a token
//! look younger than it is.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

pub fn now_ms() -> i64 {
    static ANCHOR: OnceLock<(i64, Instant)> = OnceLock::new();
    let wall = system_time_ms(SystemTime::now());
    let (anchor_wall, anchor) = *ANCHOR.get_or_init(|| (wall, Instant::now()));
    let monotonic =
        anchor_wall + Instant::now().saturating_duration_since(anchor).as_millis() as i64;
    wall.max(monotonic)
}

pub fn system_time_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// RFC 3339 with second precision, for the admin API.
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
