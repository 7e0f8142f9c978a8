//! The `Keep-Alive` response header (RFC 2068 §19.7.1, still sent by nginx, Apache and
//! many load balancers): how long the upstream keeps an idle connection open.

use std::time::Duration;

/// `timeout=N` (seconds) of a `Keep-Alive` value, less a margin for the time an answer and
/// the next request spend in flight (the upstream counts from when it answered): N − 1 s,
/// at least half of N. `None` when the value names no timeout.
pub fn timeout(value: &str) -> Option<Duration> {
    let secs: u64 = value.split(',').find_map(|param| {
        let (name, v) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("timeout")
            .then(|| v.trim().trim_matches('"').parse().ok())?
    })?;
    let ms = secs.saturating_mul(1000);
    Some(Duration::from_millis(ms.saturating_sub(1000).max(ms / 2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_timeouts_are_read_with_a_margin() {
        assert_eq!(timeout("timeout=1"), Some(Duration::from_millis(500)));
        assert_eq!(timeout("timeout=5, max=100"), Some(Duration::from_secs(4)));
        assert_eq!(
            timeout("max=100, Timeout = 2"),
            Some(Duration::from_secs(1))
        );
        assert_eq!(timeout("timeout=\"3\""), Some(Duration::from_secs(2)));
        assert_eq!(timeout("max=100"), None);
        assert_eq!(timeout("timeout=soon"), None);
        assert_eq!(timeout("timeout=99999999999999999999"), None);
        assert_eq!(timeout(""), None);
    }
}
