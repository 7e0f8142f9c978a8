//! Clients: who sent a request (`[[clients]]` by name; `server.client_keys` as unnamed
//! clients), what it may use (providers, model globs), and its limits, counted here:
//! `rpm` when a request is admitted, tokens (prompt + completion, as the upstream reports
//! them) when its answer ends. The request that crosses a token limit is served; the next
//! one is refused until the window turns (`tpm`: the minute; `tokens_per_day`: midnight
//! UTC; `tokens_per_month`: the 1st of the month, UTC).
//!
//! Keys are compared in constant time, against every key (no early exit).
//!
//! In fleet mode the windows are also counted in Redis (`SharedCounts::take_client`), so a
//! limit holds for the fleet: this replica's own count refuses first (it never exceeds
//! the fleet's), then Redis decides within `store.limit_timeout`; when Redis does not
//! answer in time, the replica's own count decides.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::clock::{month_of, next_month_ms};
use crate::common::constant_time_eq;
use crate::config::ClientConfig;
use crate::quota::window;
use crate::store::redis::counts::{ClientFull, ClientTake, SharedCounts};

/// One named client and its counts.
pub struct Client {
    pub name: Arc<str>,
    cfg: ClientConfig,
    /// Shared with the client of the same name after a reload.
    counts: Arc<Mutex<Counts>>,
    /// Fleet mode: the fleet's count.
    shared: Option<Arc<SharedCounts>>,
}

pub use crate::store::usage::Spent;

#[derive(Debug, Default)]
struct Counts {
    minute: i64,
    requests_in_minute: u64,
    tokens_in_minute: u64,
    day: i64,
    tokens_in_day: u64,
    month: i64,
    tokens_in_month: u64,
    /// Estimates of the answers on their way (`Hold`), per window.
    held_in_minute: u64,
    held_in_day: u64,
    held_in_month: u64,
}

/// A request's estimated tokens, counted against its client's token limits while its
/// answer is on its way, so that concurrent requests cannot all pass a nearly spent
/// budget. Settled with what the answer reported (`settle`), or given back when dropped
/// (no answer, an error).
pub struct Hold {
    client: Arc<Client>,
    tokens: u64,
    minute: i64,
    day: i64,
    month: i64,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hold({} holds {} tokens)", self.client.name, self.tokens)
    }
}

impl Hold {
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// The tokens held (the request's estimate, within what was left).
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The answer ended having cost `tokens`: the estimate is given back, the tokens spent.
    pub fn settle(mut self, tokens: u64, now_ms: i64) {
        let client = Arc::clone(&self.client);
        client.spend_releasing(tokens, now_ms, Some(&mut self));
    }

    /// The answer ended and its usage could not be read (an encoding tokenrelay does not
    /// inflate, a stream without usage, a client that left before it came): the estimate
    /// is spent, so a budget still holds for what was sent.
    pub fn settle_unknown(self, now_ms: i64) {
        let tokens = self.tokens;
        self.settle(tokens, now_ms);
    }

    /// Gives the estimate back (once), from the windows it was held in.
    fn release(&mut self, c: &mut Counts) {
        let tokens = std::mem::take(&mut self.tokens);
        if tokens == 0 {
            return;
        }
        if c.minute == self.minute {
            c.held_in_minute = c.held_in_minute.saturating_sub(tokens);
        }
        if c.day == self.day {
            c.held_in_day = c.held_in_day.saturating_sub(tokens);
        }
        if c.month == self.month {
            c.held_in_month = c.held_in_month.saturating_sub(tokens);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.tokens == 0 {
            return;
        }
        let client = Arc::clone(&self.client);
        let mut c = client.counts.lock().unwrap_or_else(|p| p.into_inner());
        self.release(&mut c);
    }
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
    shared: Option<Arc<SharedCounts>>,
}

impl Clients {
    pub fn new(named: &[ClientConfig], unnamed: &[SecretString]) -> Clients {
        Clients::default().reloaded(named, unnamed)
    }

    /// Counts limits fleet-wide too.
    pub fn with_shared(mut self, shared: Option<Arc<SharedCounts>>) -> Clients {
        for c in &mut self.named {
            if let Some(c) = Arc::get_mut(c) {
                c.shared = shared.clone().filter(|_| c.cfg.has_limits());
            }
        }
        self.shared = shared;
        self
    }

    /// The clients of a new configuration; one that keeps its name keeps its counts.
    pub fn reloaded(&self, named: &[ClientConfig], unnamed: &[SecretString]) -> Clients {
        Clients {
            named: named
                .iter()
                .map(|cfg| {
                    let counts = self
                        .named
                        .iter()
                        .find(|old| *old.name == *cfg.name)
                        .map_or_else(Arc::default, |old| Arc::clone(&old.counts));
                    Arc::new(Client {
                        name: Arc::from(cfg.name.as_str()),
                        shared: self.shared.clone().filter(|_| cfg.has_limits()),
                        cfg: cfg.clone(),
                        counts,
                    })
                })
                .collect(),
            unnamed: unnamed.to_vec(),
            shared: self.shared.clone(),
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

    /// Admits one request now (counting it against `rpm`, and holding `estimate` tokens
    /// against the token limits until its answer ends), or says which limit refuses it and
    /// until when. In fleet mode Redis is asked too (within `store.limit_timeout`).
    pub async fn admit(self: &Arc<Self>, now_ms: i64, estimate: u64) -> Result<Hold, Refused> {
        let hold = self.admit_locally(now_ms, estimate)?;
        let Some(shared) = &self.shared else {
            return Ok(hold);
        };
        let take = ClientTake {
            minute: window::minute_of(now_ms),
            day: now_ms.div_euclid(86_400_000),
            month: month_of(now_ms),
            rpm: self.cfg.rpm.unwrap_or(0),
            tpm: self.cfg.tpm.unwrap_or(0),
            tpd: self.cfg.tokens_per_day.unwrap_or(0),
            tpmo: self.cfg.tokens_per_month.unwrap_or(0),
        };
        match shared.take_client(&self.name, take).await {
            Ok(Some(full)) => {
                let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
                if c.minute == hold.minute {
                    c.requests_in_minute = c.requests_in_minute.saturating_sub(1);
                }
                drop(c);
                Err(self.refusal(full, now_ms))
            }
            // Taken, or Redis did not answer in time: this replica's count decided.
            Ok(None) | Err(()) => Ok(hold),
        }
    }

    fn admit_locally(self: &Arc<Self>, now_ms: i64, estimate: u64) -> Result<Hold, Refused> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        roll(&mut c, now_ms);
        // The token windows: (which, limit, spent, held).
        let windows = [
            (
                ClientFull::Month,
                self.cfg.tokens_per_month,
                c.tokens_in_month,
                c.held_in_month,
            ),
            (
                ClientFull::Day,
                self.cfg.tokens_per_day,
                c.tokens_in_day,
                c.held_in_day,
            ),
            (
                ClientFull::Tpm,
                self.cfg.tpm,
                c.tokens_in_minute,
                c.held_in_minute,
            ),
        ];
        // Spent first (until the window turns), then rpm, then what answers on their way
        // hold (a short wait: they may cost less).
        for (full, limit, spent, _) in windows {
            if limit.is_some_and(|l| spent >= l) {
                return Err(self.refusal(full, now_ms));
            }
        }
        if self.cfg.rpm.is_some_and(|l| c.requests_in_minute >= l) {
            return Err(self.refusal(ClientFull::Rpm, now_ms));
        }
        for (full, limit, spent, held) in windows {
            let Some(limit) = limit else { continue };
            if spent.saturating_add(held) >= limit {
                return Err(Refused::RateLimited(
                    format!(
                        "client {}'s answers on their way hold the rest of its {limit} tokens ({}); try again when they end",
                        self.name,
                        match full {
                            ClientFull::Month => "this month",
                            ClientFull::Day => "today",
                            _ => "this minute",
                        }
                    ),
                    Duration::from_secs(1),
                ));
            }
        }
        c.requests_in_minute += 1;
        // Held: the estimate, within what is left in the fullest window (one large body
        // cannot hold more than the budget has).
        let room = windows
            .iter()
            .filter_map(|(_, limit, spent, held)| {
                limit.map(|l| l.saturating_sub(spent.saturating_add(*held)))
            })
            .min();
        let tokens = room.map_or(0, |r| estimate.min(r));
        c.held_in_minute = c.held_in_minute.saturating_add(tokens);
        c.held_in_day = c.held_in_day.saturating_add(tokens);
        c.held_in_month = c.held_in_month.saturating_add(tokens);
        Ok(Hold {
            client: Arc::clone(self),
            tokens,
            minute: c.minute,
            day: c.day,
            month: c.month,
        })
    }

    /// What the client is told when `full` refuses it, and for how long.
    fn refusal(&self, full: ClientFull, now_ms: i64) -> Refused {
        let name = &self.name;
        let to_minute = until(now_ms, window::next_minute_ms(now_ms));
        let limit = |l: Option<u64>| l.unwrap_or(0);
        match full {
            ClientFull::Month => Refused::BudgetExhausted(
                format!(
                    "client {name} has spent its {} tokens of this month (UTC)",
                    limit(self.cfg.tokens_per_month)
                ),
                until(now_ms, next_month_ms(now_ms)),
            ),
            ClientFull::Day => Refused::BudgetExhausted(
                format!(
                    "client {name} has spent its {} tokens of today (UTC)",
                    limit(self.cfg.tokens_per_day)
                ),
                until(now_ms, (now_ms.div_euclid(86_400_000) + 1) * 86_400_000),
            ),
            ClientFull::Tpm => Refused::RateLimited(
                format!(
                    "client {name} has spent its {} tokens of this minute",
                    limit(self.cfg.tpm)
                ),
                to_minute,
            ),
            ClientFull::Rpm => Refused::RateLimited(
                format!(
                    "client {name} has made its {} requests of this minute",
                    limit(self.cfg.rpm)
                ),
                to_minute,
            ),
        }
    }

    /// Counts the tokens an answer reported (prompt + completion), here and in the fleet.
    pub fn spend(&self, tokens: u64, now_ms: i64) {
        self.spend_releasing(tokens, now_ms, None);
    }

    /// `spend`, giving back a hold's estimate under the same lock (so the answer is never
    /// counted twice, held and spent, for an instant).
    fn spend_releasing(&self, tokens: u64, now_ms: i64, hold: Option<&mut Hold>) {
        {
            let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            roll(&mut c, now_ms);
            if let Some(h) = hold {
                h.release(&mut c);
            }
            c.tokens_in_minute = c.tokens_in_minute.saturating_add(tokens);
            c.tokens_in_day = c.tokens_in_day.saturating_add(tokens);
            c.tokens_in_month = c.tokens_in_month.saturating_add(tokens);
        }
        if let Some(shared) = &self.shared {
            if tokens > 0 {
                shared.spend_client(
                    &self.name,
                    tokens,
                    window::minute_of(now_ms),
                    now_ms.div_euclid(86_400_000),
                    month_of(now_ms),
                );
            }
        }
    }

    /// Sets what was spent before a restart (only ever raises a count).
    pub fn restore(&self, spent: Spent, now_ms: i64) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        roll(&mut c, now_ms);
        c.requests_in_minute = c.requests_in_minute.max(spent.requests_in_minute);
        c.tokens_in_minute = c.tokens_in_minute.max(spent.tokens_in_minute);
        c.tokens_in_day = c.tokens_in_day.max(spent.tokens_in_day);
        c.tokens_in_month = c.tokens_in_month.max(spent.tokens_in_month);
    }

    /// What the fleet counted for it in its current windows (fleet mode; `None` when
    /// Redis does not say).
    pub async fn fleet_windows(&self, now_ms: i64) -> Option<Spent> {
        let shared = self.shared.as_ref()?;
        let [r, m, d, mo] = shared
            .client_windows(
                &self.name,
                window::minute_of(now_ms),
                now_ms.div_euclid(86_400_000),
                month_of(now_ms),
            )
            .await?;
        Some(Spent {
            requests_in_minute: r,
            tokens_in_minute: m,
            tokens_in_day: d,
            tokens_in_month: mo,
        })
    }

    /// What it spent in its current windows, and its limits (for `/admin/usage`).
    pub fn windows(&self, now_ms: i64) -> (Spent, &ClientConfig) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        roll(&mut c, now_ms);
        (
            Spent {
                requests_in_minute: c.requests_in_minute,
                tokens_in_minute: c.tokens_in_minute,
                tokens_in_day: c.tokens_in_day,
                tokens_in_month: c.tokens_in_month,
            },
            &self.cfg,
        )
    }
}

/// Moves the windows forward (never back: a clock stepped back does not reset a budget).
fn roll(c: &mut Counts, now_ms: i64) {
    let minute = window::minute_of(now_ms);
    if minute > c.minute {
        c.minute = minute;
        c.requests_in_minute = 0;
        c.tokens_in_minute = 0;
        c.held_in_minute = 0;
    }
    let day = now_ms.div_euclid(86_400_000);
    if day > c.day {
        c.day = day;
        c.tokens_in_day = 0;
        c.held_in_day = 0;
        // A month turns only with a day.
        let month = month_of(now_ms);
        if month > c.month {
            c.month = month;
            c.tokens_in_month = 0;
            c.held_in_month = 0;
        }
    }
}

fn until(now_ms: i64, then_ms: i64) -> Duration {
    Duration::from_millis((then_ms - now_ms).max(1000) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(f: impl FnOnce(&mut ClientConfig)) -> Arc<Client> {
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
        Arc::new(Client {
            name: Arc::from("bot"),
            cfg,
            counts: Arc::default(),
            shared: None,
        })
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
        assert!(c.admit_locally(now, 0).is_ok());
        c.spend(150, now); // crosses the day's budget: that request was served
        match c.admit_locally(now, 0) {
            Err(Refused::BudgetExhausted(_, wait)) => assert_eq!(wait, Duration::from_secs(60)),
            other => panic!("{other:?}"),
        }
        // Midnight UTC, and a new month too.
        let next = ms("2027-01-01T00:00:00Z");
        assert!(c.admit_locally(next, 0).is_ok());
        assert!(c.admit_locally(next, 0).is_ok());
        assert!(
            matches!(c.admit_locally(next, 0), Err(Refused::RateLimited(_, _))),
            "rpm 2"
        );
        c.spend(1000, next + 60_000);
        match c.admit_locally(ms("2027-01-15T12:00:00Z"), 0) {
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
    fn answers_on_their_way_hold_their_estimate_so_a_burst_cannot_pass_a_spent_budget() {
        let c = client(|c| c.tokens_per_day = Some(100));
        let now = ms("2026-12-04T10:00:00Z");
        let a = c.admit_locally(now, 60).unwrap();
        let b = c.admit_locally(now, 60).unwrap(); // holds 40: what is left
        match c.admit_locally(now, 60) {
            // Held, not spent: a short wait, not "until midnight".
            Err(Refused::RateLimited(m, wait)) => {
                assert!(m.contains("on their way"), "{m}");
                assert_eq!(wait, Duration::from_secs(1));
            }
            other => panic!("{other:?}"),
        }
        drop(a); // no answer: its estimate is given back
        let d = c.admit_locally(now, 10).unwrap();
        b.settle(30, now); // 30 spent, 10 held
        assert_eq!(c.windows(now).0.tokens_in_day, 30);
        let e = c.admit_locally(now, 10).unwrap();
        e.settle_unknown(now); // usage unreadable: its estimate is spent
        assert_eq!(c.windows(now).0.tokens_in_day, 40);
        d.settle(80, now); // the request that crosses is served
        match c.admit_locally(now, 0) {
            Err(Refused::BudgetExhausted(_, wait)) => {
                assert_eq!(wait, Duration::from_secs(14 * 3600))
            }
            other => panic!("{other:?}"),
        }
        // A hold from one day given back the next changes nothing there.
        let next_day = ms("2026-12-05T00:00:01Z");
        let f = c.admit_locally(next_day, 50).unwrap();
        drop(f);
        assert_eq!(c.counts.lock().unwrap().held_in_day, 0);
        assert!(c.admit_locally(next_day, 0).is_ok());
    }

    #[test]
    fn keys_identify_named_and_unnamed_clients() {
        let named = client(|_| {}).cfg.clone();
        let clients = Clients::new(&[named], &[SecretString::from("k-old".to_string())]);
        assert!(clients.required());
        assert!(matches!(clients.identify("k-bot"), Some(Who::Named(c)) if &*c.name == "bot"));
        assert!(matches!(clients.identify(" k-old "), Some(Who::Unnamed)));
        assert!(clients.identify("k-nope").is_none());
        assert!(!Clients::new(&[], &[]).required());
    }
}
