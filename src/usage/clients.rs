//! Clients: who sent a request (`[[clients]]` by name; `server.client_keys` as unnamed
//! clients), what it may use (providers, model globs), and its limits, counted here:
//! `rpm` when a request is admitted, tokens (prompt + completion, as the upstream reports
//! them) when its answer ends. The request that crosses a token limit is served; the next
//! one is refused until the window turns (`tpm`: the minute; `tokens_per_day`: midnight
//! UTC; `tokens_per_month`: the 1st of the month, UTC).
//!
//! Keys are compared in constant time, against every key (no early exit).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::common::constant_time_eq;
use crate::config::ClientConfig;
use crate::quota::window;

/// One named client and its counts.
pub struct Client {
    pub name: Arc<str>,
    cfg: ClientConfig,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    minute: i64,
    requests_in_minute: u64,
    tokens_in_minute: u64,
    day: i64,
    tokens_in_day: u64,
    month: i64,
    tokens_in_month: u64,
}

/// Who sent a request.
pub enum Who {
    /// No client keys are configured: anyone may.
    Anyone,
    /// One of `server.client_keys`.
    Unnamed,
    Named(Arc<Client>),
}

/// Why a client's request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Outside its providers or models.
    Forbidden(String),
    /// Over `rpm` or `tpm`, until the minute turns.
    RateLimited(String, Duration),
    /// Over a token budget, until the day or month turns (UTC).
    BudgetExhausted(String, Duration),
}

/// Every client, from the configuration.
#[derive(Default)]
pub struct Clients {
    named: Vec<Arc<Client>>,
    unnamed: Vec<SecretString>,
}

impl Clients {
    pub fn new(named: &[ClientConfig], unnamed: &[SecretString]) -> Clients {
        Clients {
            named: named
                .iter()
                .map(|c| {
                    Arc::new(Client {
                        name: Arc::from(c.name.as_str()),
                        cfg: c.clone(),
                        counts: Mutex::default(),
                    })
                })
                .collect(),
            unnamed: unnamed.to_vec(),
        }
    }

    /// Whether every request must carry a known key.
    pub fn required(&self) -> bool {
        !self.named.is_empty() || !self.unnamed.is_empty()
    }

    /// The client whose key this is, if any. Every key is compared, in constant time.
    pub fn identify(&self, presented: &str) -> Option<Who> {
        let presented = presented.trim().as_bytes();
        let mut found: Option<Who> = None;
        for c in &self.named {
            if constant_time_eq(presented, c.cfg.key.expose_secret().as_bytes()) && found.is_none()
            {
                found = Some(Who::Named(Arc::clone(c)));
            }
        }
        let mut unnamed = false;
        for k in &self.unnamed {
            unnamed |= constant_time_eq(presented, k.expose_secret().as_bytes());
        }
        found.or(unnamed.then_some(Who::Unnamed))
    }

    pub fn named(&self) -> &[Arc<Client>] {
        &self.named
    }
}

impl Client {
    /// Whether it may use `provider` and `model` (a request naming no model passes a model
    /// scope only if the client has none).
    pub fn may_use(&self, provider: &str, model: Option<&str>) -> Result<(), Refused> {
        if let Some(list) = &self.cfg.providers {
            if !list.iter().any(|p| p == provider) {
                return Err(Refused::Forbidden(format!(
                    "client {} may not use provider {provider} (its providers: {})",
                    self.name,
                    list.join(", ")
                )));
            }
        }
        if let Some(globs) = &self.cfg.models {
            let allowed = model.is_some_and(|m| globs.iter().any(|g| g.matches(m)));
            if !allowed {
                let list: Vec<&str> = globs.iter().map(glob::Pattern::as_str).collect();
                return Err(Refused::Forbidden(format!(
                    "client {} may not use model {} (its models: {})",
                    self.name,
                    model.unwrap_or("(none named)"),
                    list.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Admits one request now (counting it against `rpm`), or says which limit refuses it
    /// and until when.
    pub fn admit(&self, now_ms: i64) -> Result<(), Refused> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        roll(&mut c, now_ms);
        let to_minute = until(now_ms, window::next_minute_ms(now_ms));
        if let Some(l) = self
            .cfg
            .tokens_per_month
            .filter(|l| c.tokens_in_month >= *l)
        {
            return Err(Refused::BudgetExhausted(
                format!(
                    "client {} has spent its {l} tokens of this month (UTC)",
                    self.name
                ),
                until(now_ms, next_month_ms(now_ms)),
            ));
        }
        if let Some(l) = self.cfg.tokens_per_day.filter(|l| c.tokens_in_day >= *l) {
            return Err(Refused::BudgetExhausted(
                format!(
                    "client {} has spent its {l} tokens of today (UTC)",
                    self.name
                ),
                until(now_ms, (now_ms.div_euclid(86_400_000) + 1) * 86_400_000),
            ));
        }
        if let Some(l) = self.cfg.tpm.filter(|l| c.tokens_in_minute >= *l) {
            return Err(Refused::RateLimited(
                format!(
                    "client {} has spent its {l} tokens of this minute",
                    self.name
                ),
                to_minute,
            ));
        }
        if let Some(l) = self.cfg.rpm.filter(|l| c.requests_in_minute >= *l) {
            return Err(Refused::RateLimited(
                format!(
                    "client {} has made its {l} requests of this minute",
                    self.name
                ),
                to_minute,
            ));
        }
        c.requests_in_minute += 1;
        Ok(())
    }

    /// Counts the tokens an answer reported (prompt + completion).
    pub fn spend(&self, tokens: u64, now_ms: i64) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        roll(&mut c, now_ms);
        c.tokens_in_minute += tokens;
        c.tokens_in_day += tokens;
        c.tokens_in_month += tokens;
    }
}

/// Moves the windows forward (never back: a clock stepped back does not reset a budget).
fn roll(c: &mut Counts, now_ms: i64) {
    let minute = window::minute_of(now_ms);
    if minute > c.minute {
        c.minute = minute;
        c.requests_in_minute = 0;
        c.tokens_in_minute = 0;
    }
    let day = now_ms.div_euclid(86_400_000);
    if day > c.day {
        c.day = day;
        c.tokens_in_day = 0;
    }
    let month = month_of(now_ms);
    if month > c.month {
        c.month = month;
        c.tokens_in_month = 0;
    }
}

fn until(now_ms: i64, then_ms: i64) -> Duration {
    Duration::from_millis((then_ms - now_ms).max(1000) as u64)
}

/// Months since 1970-01 (UTC).
fn month_of(now_ms: i64) -> i64 {
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

/// The start of the next month, UTC.
fn next_month_ms(now_ms: i64) -> i64 {
    let (y, m) = year_month(now_ms);
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    i16::try_from(y)
        .ok()
        .and_then(|y| jiff::civil::Date::new(y, m as i8, 1).ok())
        .and_then(|d| d.to_zoned_datetime(jiff::tz::TimeZone::UTC).ok())
        .map(|z| z.timestamp().as_millisecond())
        .unwrap_or(now_ms + 31 * 86_400_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(f: impl FnOnce(&mut ClientConfig)) -> Client {
        let mut cfg = ClientConfig {
            name: "bot".into(),
            key: SecretString::from("k-bot".to_string()),
            providers: None,
            models: None,
            rpm: None,
            tpm: None,
            tokens_per_day: None,
            tokens_per_month: None,
        };
        f(&mut cfg);
        Client {
            name: Arc::from("bot"),
            cfg,
            counts: Mutex::default(),
        }
    }

    fn ms(t: &str) -> i64 {
        t.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn scopes_allow_their_providers_and_model_globs_only() {
        let c = client(|c| {
            c.providers = Some(vec!["gemini".into()]);
            c.models = Some(vec![glob::Pattern::new("gemini-2.5-*").unwrap()]);
        });
        assert!(c.may_use("gemini", Some("gemini-2.5-flash")).is_ok());
        assert!(matches!(
            c.may_use("gemini", Some("gemini-3.1-pro")),
            Err(Refused::Forbidden(_))
        ));
        assert!(matches!(
            c.may_use("qwen", Some("gemini-2.5-flash")),
            Err(Refused::Forbidden(_))
        ));
        assert!(matches!(
            c.may_use("gemini", None),
            Err(Refused::Forbidden(_))
        ));
    }

    #[test]
    fn the_request_that_crosses_a_budget_is_served_and_the_next_refused_until_the_window_turns() {
        let c = client(|c| {
            c.rpm = Some(2);
            c.tokens_per_day = Some(100);
            c.tokens_per_month = Some(1000);
        });
        let now = ms("2026-12-31T23:59:00Z");
        assert!(c.admit(now).is_ok());
        c.spend(150, now); // crosses the day's budget: that request was served
        match c.admit(now) {
            Err(Refused::BudgetExhausted(_, wait)) => assert_eq!(wait, Duration::from_secs(60)),
            other => panic!("{other:?}"),
        }
        // Midnight UTC, and a new month too.
        let next = ms("2027-01-01T00:00:00Z");
        assert!(c.admit(next).is_ok());
        assert!(c.admit(next).is_ok());
        assert!(
            matches!(c.admit(next), Err(Refused::RateLimited(_, _))),
            "rpm 2"
        );
        c.spend(1000, next + 60_000);
        match c.admit(ms("2027-01-15T12:00:00Z")) {
            Err(Refused::BudgetExhausted(m, wait)) => {
                assert!(m.contains("month"), "{m}");
                assert_eq!(
                    wait,
                    Duration::from_millis(
                        (ms("2027-02-01T00:00:00Z") - ms("2027-01-15T12:00:00Z")) as u64
                    )
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_identify_named_and_unnamed_clients() {
        let named = client(|_| {}).cfg;
        let clients = Clients::new(&[named], &[SecretString::from("k-old".to_string())]);
        assert!(clients.required());
        assert!(matches!(clients.identify("k-bot"), Some(Who::Named(c)) if &*c.name == "bot"));
        assert!(matches!(clients.identify(" k-old "), Some(Who::Unnamed)));
        assert!(clients.identify("k-nope").is_none());
        assert!(!Clients::new(&[], &[]).required());
    }
}
