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

// The UTC calendar of client budgets (a month turns at 00:00 UTC on the 1st).

/// Months since 1970-01 (UTC).
pub fn month_of(now_ms: i64) -> i64 {
    let (y, m) = year_month(now_ms);
    (y - 1970) * 12 + (m - 1)
}

fn year_month(now_ms: i64) -> (i64, i64) {
    match jiff::Timestamp::from_millisecond(now_ms) {
        Ok(ts) => {
            let d = ts.to_zoned_datetime(jiff::tz::TimeZone::UTC).date();
            (i64::from(d.year()), i64::from(d.month()))
        }
        Err(_) => (1970, 1),
    }
}

/// The start of this month, UTC.
pub fn month_start_ms(now_ms: i64) -> i64 {
    let (y, m) = year_month(now_ms);
    month_start(y, m).unwrap_or(now_ms - 31 * 86_400_000)
}

fn month_start(y: i64, m: i64) -> Option<i64> {
    i16::try_from(y)
        .ok()
        .and_then(|y| jiff::civil::Date::new(y, m as i8, 1).ok())
        .and_then(|d| d.to_zoned_datetime(jiff::tz::TimeZone::UTC).ok())
        .map(|z| z.timestamp().as_millisecond())
}

/// The start of the next month, UTC.
pub fn next_month_ms(now_ms: i64) -> i64 {
    let (y, m) = year_month(now_ms);
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    month_start(y, m).unwrap_or(now_ms + 31 * 86_400_000)
}
