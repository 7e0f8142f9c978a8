//! Quotas: what a rate-limit answer means and for how long (`decide`), when quota windows
//! turn (`window`), and the declared limits that are counted before a request goes
//! upstream so that a predictable 429 is never spent (`limits`).
//!
//! The providers' rooms read their own answers into `Violation`s (Google's
//! `QuotaFailure.quotaId`, DashScope's error codes); this module decides from those, never
//! from message text, and the lifecycle keeps the resulting cool-downs.

pub mod limits;
pub mod window;

use std::time::Duration;

use crate::common::state::CoolReason;
use crate::providers::{QuotaWindow, Violation};

/// A cool-down to start, as decided from one answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// `None`: the whole credential.
    pub model: Option<String>,
    pub length: Duration,
    pub reason: CoolReason,
    /// The quota is the project's: every credential of the project cools down.
    pub per_project: bool,
    /// The answer gave no hint: a probe refused again waits twice as long.
    pub doubling: bool,
}

/// The retry hints of an answer: Google's `RetryInfo.retryDelay` (fractional seconds)
/// and the `Retry-After` header.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hints {
    pub retry_info: Option<Duration>,
    pub retry_after: Option<Duration>,
}

impl Hints {
    /// A per-minute quota's: `retryDelay` first (the quota's own), then `Retry-After`.
    fn for_quota(self) -> Option<Duration> {
        self.retry_info.or(self.retry_after)
    }

    /// An unclassified rate limit's: `Retry-After` as given, then `retryDelay`.
    fn for_answer(self) -> Option<Duration> {
        self.retry_after.or(self.retry_info)
    }
}

/// The pool's bounds on cool-downs.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub default_cooldown: Duration,
    pub max_cooldown: Duration,
}

/// Decides the cool-downs for a rate-limited answer: each violation by its window (per
/// minute: the hint, else until the next minute; per day: until the next midnight in
/// America/Los_Angeles, not capped; a zero quota: `max_cooldown`), for the model it
/// names, else the request's model (`per_model` providers), else the whole credential.
/// An answer without violations cools down for its hint, else `default_cooldown`.
pub fn decide(
    violations: &[Violation],
    hints: Hints,
    request_model: Option<&str>,
    per_model: bool,
    now_ms: i64,
    bounds: Bounds,
) -> Vec<Decision> {
    let cap = bounds.max_cooldown;
    let fallback_model = || request_model.filter(|_| per_model).map(str::to_string);
    let hinted = |hint: Option<Duration>, d: Duration| (hint.unwrap_or(d).min(cap), hint.is_none());
    if violations.is_empty() {
        let (length, doubling) = hinted(hints.for_answer(), bounds.default_cooldown);
        return vec![Decision {
            model: fallback_model(),
            length,
            reason: CoolReason::RetryAfter,
            per_project: false,
            doubling,
        }];
    }
    let mut out: Vec<Decision> = Vec::new();
    for v in violations {
        let model = v.model.clone().or_else(fallback_model);
        let (length, reason, doubling) = if v.zero {
            (cap, CoolReason::NoAccess, false)
        } else {
            match v.window {
                QuotaWindow::Day => (
                    Duration::from_millis(
                        (window::next_pacific_midnight_ms(now_ms) - now_ms).max(1) as u64,
                    ),
                    CoolReason::PerDay,
                    false,
                ),
                QuotaWindow::Minute => {
                    let to_next = Duration::from_millis(
                        (window::next_minute_ms(now_ms) - now_ms).max(1) as u64,
                    );
                    let (l, d) = hinted(hints.for_quota(), to_next);
                    (l, CoolReason::PerMinute, d)
                }
                QuotaWindow::Other => {
                    let (l, d) = hinted(hints.for_answer(), bounds.default_cooldown);
                    (l, CoolReason::RetryAfter, d)
                }
            }
        };
        let d = Decision {
            model,
            length,
            reason,
            per_project: v.per_project,
            doubling,
        };
        // One cool-down per model: the longest wins (a spent day outlasts a minute).
        match out.iter_mut().find(|o| o.model == d.model) {
            Some(o) => {
                // A project's quota stays the project's whichever window is longer.
                let per_project = o.per_project || d.per_project;
                if o.length < d.length {
                    *o = d;
                }
                o.per_project = per_project;
            }
            None => out.push(d),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        default_cooldown: Duration::from_secs(60),
        max_cooldown: Duration::from_secs(3600),
    };

    fn ms(rfc3339: &str) -> i64 {
        rfc3339.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    fn info(secs: u64) -> Hints {
        Hints {
            retry_info: Some(Duration::from_secs(secs)),
            retry_after: None,
        }
    }

    #[test]
    fn an_unclassified_limit_takes_retry_after_first_a_quota_retry_info_first() {
        let hints = Hints {
            retry_info: Some(Duration::from_secs(45)),
            retry_after: Some(Duration::from_secs(120)),
        };
        assert_eq!(
            decide(&[], hints, None, false, 0, BOUNDS)[0].length,
            Duration::from_secs(120)
        );
        let quota = decide(
            &[v("m", QuotaWindow::Minute, false, false)],
            hints,
            None,
            true,
            0,
            BOUNDS,
        );
        assert_eq!(quota[0].length, Duration::from_secs(45));
    }

    fn v(model: &str, window: QuotaWindow, per_project: bool, zero: bool) -> Violation {
        Violation {
            model: Some(model.into()),
            window,
            per_project,
            zero,
        }
    }

    #[test]
    fn a_spent_day_waits_for_pacific_midnight_whatever_the_retry_hint() {
        // 36 s of retryDelay, but the day is gone: 2026-07-15 23:00 PDT → midnight is 1 h away.
        let now = ms("2026-07-16T06:00:00Z");
        let d = decide(
            &[v("gemini-2.5-pro", QuotaWindow::Day, true, false)],
            info(36),
            Some("other"),
            true,
            now,
            BOUNDS,
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].model.as_deref(), Some("gemini-2.5-pro"));
        assert_eq!(d[0].reason, CoolReason::PerDay);
        assert_eq!(d[0].length, Duration::from_secs(3600));
        assert!(d[0].per_project);
        // Not capped by max_cooldown: 18 hours before midnight in winter.
        let d = decide(
            &[v("m", QuotaWindow::Day, false, false)],
            Hints::default(),
            None,
            true,
            ms("2026-01-15T14:00:00Z"),
            BOUNDS,
        );
        assert_eq!(d[0].length, Duration::from_secs(18 * 3600));
    }

    #[test]
    fn a_minute_takes_the_hint_else_the_next_minute() {
        let now = ms("2026-07-16T06:00:45Z");
        let hinted = decide(
            &[v("m", QuotaWindow::Minute, false, false)],
            Hints {
                retry_info: Some(Duration::from_millis(11_500)),
                retry_after: Some(Duration::from_secs(30)),
            },
            None,
            true,
            now,
            BOUNDS,
        );
        assert_eq!(
            (hinted[0].length, hinted[0].reason, hinted[0].doubling),
            (Duration::from_millis(11_500), CoolReason::PerMinute, false)
        );
        let bare = decide(
            &[v("m", QuotaWindow::Minute, false, false)],
            Hints::default(),
            None,
            true,
            now,
            BOUNDS,
        );
        assert_eq!(
            (bare[0].length, bare[0].doubling),
            (Duration::from_secs(15), true)
        );
    }

    #[test]
    fn a_zero_quota_is_no_access_and_unnamed_answers_use_the_request_model() {
        let d = decide(
            &[v("gemini-3.1-pro", QuotaWindow::Minute, true, true)],
            info(11),
            None,
            true,
            0,
            BOUNDS,
        );
        assert_eq!(
            (d[0].reason, d[0].length),
            (CoolReason::NoAccess, BOUNDS.max_cooldown)
        );
        let plain = decide(&[], Hints::default(), Some("qwen-max"), true, 0, BOUNDS);
        assert_eq!(plain[0].model.as_deref(), Some("qwen-max"));
        assert_eq!(
            (plain[0].reason, plain[0].length),
            (CoolReason::RetryAfter, BOUNDS.default_cooldown)
        );
        // A provider whose quotas are not per model cools the whole credential.
        assert_eq!(
            decide(&[], Hints::default(), Some("x"), false, 0, BOUNDS)[0].model,
            None
        );
        // Hints are capped.
        assert_eq!(
            decide(&[], info(9999), None, false, 0, BOUNDS)[0].length,
            BOUNDS.max_cooldown
        );
    }

    #[test]
    fn per_model_and_per_day_of_one_model_keep_the_longer() {
        let now = ms("2026-07-16T06:00:00Z");
        let d = decide(
            &[
                v("m", QuotaWindow::Minute, true, false),
                v("m", QuotaWindow::Day, true, false),
            ],
            info(5),
            None,
            true,
            now,
            BOUNDS,
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].reason, CoolReason::PerDay);
    }
}
