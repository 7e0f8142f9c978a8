//! Wall-clock time as Unix milliseconds. Token expiry is wall-clock (it is written in
//! files and compared across processes); waiting and scheduling use `tokio::time`.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> i64 {
    system_time_ms(SystemTime::now())
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
