//! Retry hints from upstream answers: `Retry-After` (delay-seconds or an HTTP date,
//! RFC 9110 §10.2.3) and Google's `RetryInfo.retryDelay` ("45.123s") in error bodies.

use std::time::{Duration, SystemTime};

/// Parses a `Retry-After` value. A date in the past means "now" (zero).
pub fn parse(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Finds `RetryInfo.retryDelay` in a Google error body.
pub fn google_retry_delay(body: &[u8]) -> Option<Duration> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    google_retry_delay_of(&v)
}

/// `RetryInfo.retryDelay` in an already parsed Google error body.
pub fn google_retry_delay_of(v: &serde_json::Value) -> Option<Duration> {
    v.pointer("/error/details")?
        .as_array()?
        .iter()
        .filter(|d| {
            d.get("@type")
                .and_then(|t| t.as_str())
                .is_some_and(|t| t.ends_with("google.rpc.RetryInfo"))
        })
        .find_map(|d| d.get("retryDelay")?.as_str().and_then(parse_proto_duration))
}

/// A protobuf JSON duration: "45.123s".
fn parse_proto_duration(s: &str) -> Option<Duration> {
    let secs: f64 = s.strip_suffix('s')?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_dates() {
        assert_eq!(parse("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
        let d = parse(&later).unwrap();
        assert!(
            d > Duration::from_secs(3590) && d <= Duration::from_secs(3600),
            "{d:?}"
        );
        assert_eq!(parse("soon"), None);
    }

    #[test]
    fn google_retry_info() {
        let body =
            include_bytes!("../../tests/fixtures/responses/google_429_resource_exhausted.json");
        assert_eq!(
            google_retry_delay(body),
            Some(Duration::from_millis(45_123))
        );
        assert_eq!(google_retry_delay(b"{}"), None);
    }
}
