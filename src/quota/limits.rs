//! Declared limits (`[providers.NAME.limits]`): requests per minute, per day (Pacific)
//! and tokens per minute, per model (or `"*"`), counted per project (or per credential
//! where no project is known). A credential whose project is at a limit is skipped with
//! no upstream call until the window turns.
//!
//! Counting happens when a credential is chosen for a request, before it is sent: a sent
//! request counts whatever the upstream answers (it counted it too). Tokens are the
//! request's input estimated from its body (bytes / 4, rounded up): the limit must be
//! decided before the answer exists.
//!
//! In fleet mode the replica's own count is checked first (it can only be lower than the
//! fleet's), then the fleet's in Redis (`store::redis::SharedCounts`); when Redis does
//! not answer within `store.limit_timeout`, the replica's own count decides.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::window;
use crate::store::redis::{counts::Full, counts::Take, SharedCounts};

/// The limits of one model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limit {
    pub rpm: Option<u64>,
    pub rpd: Option<u64>,
    pub tpm: Option<u64>,
}

/// A provider's declared limits: by model name, and `"*"` for the others.
#[derive(Debug, Clone, Default)]
pub struct Declared {
    pub by_model: HashMap<String, Limit>,
    pub any: Option<Limit>,
}

impl Declared {
    pub fn is_empty(&self) -> bool {
        self.by_model.is_empty() && self.any.is_none()
    }

    /// The limit for a request's model: its own entry, else `"*"`.
    pub fn for_model(&self, model: Option<&str>) -> Option<Limit> {
        model
            .and_then(|m| self.by_model.get(m))
            .or(self.any.as_ref())
            .copied()
    }

    /// Every declared entry (`"*"` included), for the gauges.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Limit)> {
        self.by_model
            .iter()
            .map(|(m, l)| (m.as_str(), l))
            .chain(self.any.as_ref().map(|l| ("*", l)))
    }
}

/// Which window is full, and how long until it turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtLimit {
    pub window: &'static str,
    pub wait: Duration,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    minute: i64,
    requests_in_minute: u64,
    tokens_in_minute: u64,
    day: i64,
    requests_in_day: u64,
}

/// One scope's counts, by model.
type ByModel = HashMap<Arc<str>, Counts>;

/// Models counted per scope: past this, pairs whose windows have turned are dropped, then
/// new models count together (a client can name any model).
const MAX_MODELS: usize = 1024;
/// Longer model names count as one.
const MAX_MODEL_LEN: usize = 128;

/// One provider's counts of its declared limits.
pub struct Limits {
    provider: String,
    pub declared: Declared,
    /// scope → model → counts (looked up by `&str`, allocated only for a new pair).
    local: Mutex<HashMap<Arc<str>, ByModel>>,
    shared: Option<Arc<SharedCounts>>,
}

/// What the gauges show for one declared entry: the highest use of each window among the
/// projects (or credentials) counted, as a fraction of its limit.
#[derive(Debug, Clone, Default)]
pub struct Use {
    pub model: String,
    pub rpm: Option<(u64, u64)>,
    pub tpm: Option<(u64, u64)>,
    pub rpd: Option<(u64, u64)>,
}

impl Limits {
    pub fn new(provider: &str, declared: Declared, shared: Option<Arc<SharedCounts>>) -> Limits {
        Limits {
            provider: provider.to_string(),
            declared,
            local: Mutex::default(),
            shared,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.declared.is_empty()
    }

    /// Takes one request of `tokens` input tokens for `model` from `scope`'s windows (a
    /// project, or `credential:ID`), or says which window is full.
    pub async fn take(
        &self,
        scope: &str,
        model: Option<&str>,
        tokens: u64,
        now_ms: i64,
    ) -> Result<(), AtLimit> {
        // A request that names no model (a model list, an upload leg, the files API) is
        // not what per-model quotas count.
        let Some(model) = model else {
            return Ok(());
        };
        let Some(limit) = self.declared.for_model(Some(model)) else {
            return Ok(());
        };
        // A client can name any model: long names count as one.
        let model = if model.len() > MAX_MODEL_LEN {
            "*long*"
        } else {
            model
        };
        let minute = window::minute_of(now_ms);
        let (day, midnight) = window::pacific_day_and_end(now_ms);
        self.take_locally(scope, model, limit, tokens, minute, day, now_ms)?;
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let to_midnight = midnight - now_ms;
        let take = Take {
            minute,
            day,
            rpm: limit.rpm.unwrap_or(0),
            tpm: limit.tpm.unwrap_or(0),
            rpd: limit.rpd.unwrap_or(0),
            tokens,
            day_ttl: Duration::from_millis(to_midnight.max(0) as u64 + 3_600_000),
        };
        let name = format!("{}/{scope}/{model}", self.provider);
        // Boxed: only limited requests in fleet mode carry this future's state.
        match Box::pin(shared.take(&name, take)).await {
            Ok(Some(full)) => {
                // The fleet's count is full: what this replica counted above was not sent.
                self.untake_locally(scope, model, tokens, minute, day);
                Err(at_limit(
                    match full {
                        Full::Rpm => "rpm",
                        Full::Tpm => "tpm",
                        Full::Rpd => "rpd",
                    },
                    now_ms,
                ))
            }
            // Taken, or Redis did not answer: the local count (taken above) decides.
            Ok(None) | Err(()) => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn take_locally(
        &self,
        scope: &str,
        model: &str,
        limit: Limit,
        tokens: u64,
        minute: i64,
        day: i64,
        now_ms: i64,
    ) -> Result<(), AtLimit> {
        let mut map = self.local.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(scope) {
            // Scopes are credentials and projects: configuration, not clients.
            map.insert(Arc::from(scope), HashMap::new());
        }
        let models = map.get_mut(scope).expect("inserted above");
        let mut model = model;
        if !models.contains_key(model) {
            if models.len() >= MAX_MODELS {
                // Pairs whose windows have turned go first (a day counts only with rpd).
                models.retain(|_, c| {
                    c.minute == minute
                        || (c.requests_in_day > 0 && c.day == day && limit.rpd.is_some())
                });
            }
            if models.len() >= MAX_MODELS {
                // Still full (a client naming model after model): the rest count as one.
                model = "*other*";
            }
            if !models.contains_key(model) {
                models.insert(Arc::from(model), Counts::default());
            }
        }
        let c = models.get_mut(model).expect("inserted above");
        if c.minute != minute {
            c.minute = minute;
            c.requests_in_minute = 0;
            c.tokens_in_minute = 0;
        }
        if c.day != day {
            c.day = day;
            c.requests_in_day = 0;
        }
        if limit.rpm.is_some_and(|l| c.requests_in_minute + 1 > l) {
            return Err(at_limit("rpm", now_ms));
        }
        if limit
            .tpm
            .is_some_and(|l| c.tokens_in_minute > 0 && c.tokens_in_minute + tokens > l)
        {
            return Err(at_limit("tpm", now_ms));
        }
        if limit.rpd.is_some_and(|l| c.requests_in_day + 1 > l) {
            return Err(at_limit("rpd", now_ms));
        }
        c.requests_in_minute += 1;
        c.tokens_in_minute += tokens;
        c.requests_in_day += 1;
        Ok(())
    }

    /// Gives back what `take_locally` took (the fleet refused the request).
    fn untake_locally(&self, scope: &str, model: &str, tokens: u64, minute: i64, day: i64) {
        let mut map = self.local.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get_mut(scope).and_then(|m| m.get_mut(model)) {
            if c.minute == minute {
                c.requests_in_minute = c.requests_in_minute.saturating_sub(1);
                c.tokens_in_minute = c.tokens_in_minute.saturating_sub(tokens);
            }
            if c.day == day {
                c.requests_in_day = c.requests_in_day.saturating_sub(1);
            }
        }
    }

    /// This replica's use of each declared entry: the highest among its scopes.
    pub fn usage(&self, now_ms: i64) -> Vec<Use> {
        let minute = window::minute_of(now_ms);
        let day = window::pacific_day_of(now_ms);
        let map = self.local.lock().unwrap_or_else(|p| p.into_inner());
        self.declared
            .entries()
            .map(|(name, limit)| {
                let mut u = Use {
                    model: name.to_string(),
                    ..Use::default()
                };
                let counted = map
                    .values()
                    .flat_map(|models| models.iter())
                    .filter(|(m, _)| {
                        if name == "*" {
                            !self.declared.by_model.contains_key(&***m)
                        } else {
                            &***m == name
                        }
                    });
                let (mut rpm, mut tpm, mut rpd) = (0, 0, 0);
                for (_, c) in counted {
                    if c.minute == minute {
                        rpm = rpm.max(c.requests_in_minute);
                        tpm = tpm.max(c.tokens_in_minute);
                    }
                    if c.day == day {
                        rpd = rpd.max(c.requests_in_day);
                    }
                }
                u.rpm = limit.rpm.map(|l| (rpm, l));
                u.tpm = limit.tpm.map(|l| (tpm, l));
                u.rpd = limit.rpd.map(|l| (rpd, l));
                u
            })
            .collect()
    }
}

fn at_limit(window: &'static str, now_ms: i64) -> AtLimit {
    let turns = match window {
        "rpd" => window::next_pacific_midnight_ms(now_ms),
        _ => window::next_minute_ms(now_ms),
    };
    AtLimit {
        window,
        wait: Duration::from_millis((turns - now_ms).max(1) as u64),
    }
}

/// A request's input tokens, estimated from its body: about four bytes a token.
pub fn estimate_tokens(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: Option<u64>, rpd: Option<u64>, tpm: Option<u64>) -> Limits {
        let mut by_model = HashMap::new();
        by_model.insert("gemini-2.5-pro".to_string(), Limit { rpm, rpd, tpm });
        Limits::new(
            "gemini",
            Declared {
                by_model,
                any: None,
            },
            None,
        )
    }

    fn ms(rfc3339: &str) -> i64 {
        rfc3339.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    #[tokio::test]
    async fn a_minute_limit_holds_per_project_and_model_until_the_minute_turns() {
        let l = limits(Some(2), None, None);
        let now = ms("2026-07-16T06:00:10Z");
        let m = Some("gemini-2.5-pro");
        assert!(l.take("p1", m, 1, now).await.is_ok());
        assert!(l.take("p1", m, 1, now).await.is_ok());
        let full = l.take("p1", m, 1, now).await.unwrap_err();
        assert_eq!((full.window, full.wait), ("rpm", Duration::from_secs(50)));
        // Another project, another model (none declared): their own counts.
        assert!(l.take("p2", m, 1, now).await.is_ok());
        assert!(l.take("p1", Some("gemini-2.5-flash"), 1, now).await.is_ok());
        // The next minute.
        assert!(l.take("p1", m, 1, ms("2026-07-16T06:01:00Z")).await.is_ok());
    }

    #[tokio::test]
    async fn a_day_limit_turns_at_pacific_midnight() {
        let l = limits(None, Some(1), None);
        let m = Some("gemini-2.5-pro");
        // 23:30 PDT on July 15th.
        let now = ms("2026-07-16T06:30:00Z");
        assert!(l.take("p", m, 1, now).await.is_ok());
        let full = l
            .take("p", m, 1, ms("2026-07-16T06:59:00Z"))
            .await
            .unwrap_err();
        assert_eq!((full.window, full.wait), ("rpd", Duration::from_secs(60)));
        assert!(l.take("p", m, 1, ms("2026-07-16T07:00:00Z")).await.is_ok());
    }

    #[tokio::test]
    async fn tokens_per_minute_count_the_estimate_but_never_refuse_an_empty_minute() {
        let l = limits(None, None, Some(100));
        let m = Some("gemini-2.5-pro");
        let now = ms("2026-07-16T06:00:00Z");
        assert!(l.take("p", m, 500, now).await.is_ok());
        assert_eq!(l.take("p", m, 1, now).await.unwrap_err().window, "tpm");
        assert_eq!(estimate_tokens(401), 101);
        let u = l.usage(now);
        assert_eq!(u[0].tpm, Some((500, 100)));
    }
}
