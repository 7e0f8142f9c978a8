//! When a quota window turns: the next minute, and the next midnight in
//! America/Los_Angeles (where Google's requests-per-day quotas reset), daylight saving
//! included. Times are Unix milliseconds so that tests can pass any clock.
//!
//! The time zone comes from the tz database that `jiff` carries in the binary
//! (`tzdb-bundle-always`): a scratch container without `/usr/share/zoneinfo` still knows
//! Pacific time.

use std::sync::OnceLock;

use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan as _};

/// Where Google's per-day quotas reset.
pub const QUOTA_DAY_ZONE: &str = "America/Los_Angeles";

fn pacific() -> &'static TimeZone {
    static TZ: OnceLock<TimeZone> = OnceLock::new();
    TZ.get_or_init(|| {
        // The bundled database always has it; a fixed UTC−8 is the fallback that can
        // only be an hour early in summer, never late.
        TimeZone::get(QUOTA_DAY_ZONE).unwrap_or_else(|_| TimeZone::fixed(jiff::tz::offset(-8)))
    })
}

/// The start of the next minute after `now_ms` (Unix ms).
pub fn next_minute_ms(now_ms: i64) -> i64 {
    (now_ms.div_euclid(60_000) + 1) * 60_000
}

/// The minute `now_ms` falls in, as a number that changes when the window turns.
pub fn minute_of(now_ms: i64) -> i64 {
    now_ms.div_euclid(60_000)
}

/// The next midnight in America/Los_Angeles after `now_ms` (Unix ms). On the days the
/// clocks change the day is 23 or 25 hours long; midnight is still midnight.
pub fn next_pacific_midnight_ms(now_ms: i64) -> i64 {
    let Ok(ts) = Timestamp::from_millisecond(now_ms) else {
        return now_ms + 86_400_000;
    };
    let zoned = ts.to_zoned_datetime(pacific().clone());
    let midnight = zoned
        .date()
        .checked_add(1.day())
        .ok()
        .and_then(|d| d.to_zoned_datetime(pacific().clone()).ok());
    match midnight {
        Some(m) => m.timestamp().as_millisecond(),
        None => now_ms + 86_400_000,
    }
}

/// The Pacific day `now_ms` falls in (days since 1970-01-01 in that zone), a number that
/// changes at Pacific midnight. The request path asks for it on every limited request:
/// the day's bounds are kept per thread, so the time zone is consulted once a day.
pub fn pacific_day_of(now_ms: i64) -> i64 {
    pacific_day_and_end(now_ms).0
}

/// The Pacific day `now_ms` falls in and when it ends (the next Pacific midnight).
pub fn pacific_day_and_end(now_ms: i64) -> (i64, i64) {
    thread_local! {
        /// (start, end, day): `day` holds for `start <= now_ms < end`.
        static TODAY: std::cell::Cell<(i64, i64, i64)> = const { std::cell::Cell::new((0, 0, 0)) };
    }
    let (start, end, day) = TODAY.get();
    if start <= now_ms && now_ms < end {
        return (day, end);
    }
    let day = compute_pacific_day(now_ms);
    let end = next_pacific_midnight_ms(now_ms);
    // Held from now (earlier times are computed again) to the next midnight.
    TODAY.set((now_ms, end, day));
    (day, end)
}

fn compute_pacific_day(now_ms: i64) -> i64 {
    let Ok(ts) = Timestamp::from_millisecond(now_ms) else {
        return now_ms.div_euclid(86_400_000);
    };
    let date = ts.to_zoned_datetime(pacific().clone()).date();
    let epoch = jiff::civil::date(1970, 1, 1);
    date.since(epoch).map(|s| s.get_days() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        rfc3339.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn per_day_quotas_reset_at_pacific_midnight_on_both_sides_of_dst() {
        for (now, midnight, why) in [
            (
                "2026-01-15T20:00:00Z",
                "2026-01-16T08:00:00Z",
                "winter, PST (UTC−8)",
            ),
            (
                "2026-07-15T20:00:00Z",
                "2026-07-16T07:00:00Z",
                "summer, PDT (UTC−7)",
            ),
            // Spring forward: Sunday 2026-03-08 02:00 PST → 03:00 PDT.
            (
                "2026-03-07T20:00:00Z",
                "2026-03-08T08:00:00Z",
                "the evening before: still PST",
            ),
            (
                "2026-03-08T08:00:00Z",
                "2026-03-09T07:00:00Z",
                "that Sunday: a 23-hour day",
            ),
            // Fall back: Sunday 2026-11-01 02:00 PDT → 01:00 PST.
            (
                "2026-10-31T20:00:00Z",
                "2026-11-01T07:00:00Z",
                "the evening before: still PDT",
            ),
            (
                "2026-11-01T07:00:00Z",
                "2026-11-02T08:00:00Z",
                "that Sunday: a 25-hour day",
            ),
            (
                "2026-11-02T07:59:59.999Z",
                "2026-11-02T08:00:00Z",
                "a millisecond before",
            ),
        ] {
            assert_eq!(
                next_pacific_midnight_ms(ms(now)),
                ms(midnight),
                "{why}: {now}"
            );
        }
    }

    #[test]
    fn the_pacific_day_turns_at_pacific_midnight() {
        let before = pacific_day_of(ms("2026-07-16T06:59:59Z"));
        assert_eq!(pacific_day_of(ms("2026-07-16T07:00:00Z")), before + 1);
        // 2026-07-16 UTC 03:00 is still July 15th in Los Angeles.
        let july15 = jiff::civil::date(2026, 7, 15)
            .since(jiff::civil::date(1970, 1, 1))
            .unwrap()
            .get_days() as i64;
        assert_eq!(before, july15);
    }

    #[test]
    fn the_kept_day_is_the_computed_day() {
        for t in [
            "2026-03-08T07:59:59Z",
            "2026-03-08T08:00:00Z",
            "2026-11-01T06:59:59Z",
            "2026-11-01T07:00:00Z",
            "2026-11-02T07:59:59Z",
            "2026-11-02T08:00:00Z",
        ] {
            assert_eq!(pacific_day_of(ms(t)), compute_pacific_day(ms(t)), "{t}");
        }
    }

    #[test]
    fn minutes_turn_on_the_minute() {
        assert_eq!(
            next_minute_ms(ms("2026-07-16T06:59:59.5Z")),
            ms("2026-07-16T07:00:00Z")
        );
        assert_eq!(
            next_minute_ms(ms("2026-07-16T07:00:00Z")),
            ms("2026-07-16T07:01:00Z")
        );
        assert_eq!(
            minute_of(ms("2026-07-16T07:00:59Z")),
            minute_of(ms("2026-07-16T07:00:00Z"))
        );
    }
}
