//! The ledger: usage by minute, client, provider, model and credential, added up in memory
//! as answers end (a short lock; a request never waits for a store) and written by a task
//! of its own every second: to an SQLite file on one machine (`store::sqlite`), to Redis in
//! fleet mode (`store::redis::usage`). Rows that cannot be written stay in memory and go
//! with the next write (up to `MAX_PENDING` of them). Queries write what is pending first,
//! so an answer that ended is in every answer about usage after it.
//!
//! History is kept per minute for 48 hours and per hour for 400 days; a query with a step
//! below an hour reads minutes, and can reach 48 hours back.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::clients::Clients;
use super::Usage;
use crate::store::redis::SharedUsage;
use crate::store::sqlite::UsageDb;
pub use crate::store::usage::{Key, Stored, Sums, KEEP_HOURS_S, KEEP_MINUTES_S};

/// Rows kept in memory when the store cannot take them (then the oldest minute goes).
const MAX_PENDING: usize = 100_000;

/// What one answer adds: itself, and the usage it carried (or that it carried none).
pub fn sums_of(usage: Option<&Usage>) -> Sums {
    match usage {
        Some(u) => Sums {
            answers: 1,
            unknown: 0,
            prompt: u.prompt,
            completion: u.completion,
            cached: u.cached,
            thoughts: u.thoughts,
            tokens: u.billed(),
        },
        None => Sums {
            answers: 1,
            unknown: 1,
            ..Sums::default()
        },
    }
}

/// Where the ledger's rows go.
pub enum Backend {
    Db(Arc<UsageDb>),
    Fleet(Arc<SharedUsage>),
}

/// What to group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Client,
    Provider,
    Model,
    Credential,
}

impl By {
    pub fn parse(s: &str) -> Option<By> {
        Some(match s {
            "client" => By::Client,
            "provider" => By::Provider,
            "model" => By::Model,
            "credential" => By::Credential,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            By::Client => "client",
            By::Provider => "provider",
            By::Model => "model",
            By::Credential => "credential",
        }
    }
}

/// A question about usage: `[since, until)` in unix seconds, grouped by `by`, in buckets
/// of `step` seconds (`None`: one bucket for the whole range), read from rows of `span`
/// seconds (`Query::new` aligns `since` to it).
#[derive(Debug, Clone)]
pub struct Query {
    pub since: i64,
    pub until: i64,
    pub step: Option<i64>,
    pub by: Vec<By>,
    pub span: i64,
}

impl Query {
    /// The query, reading minutes when it needs them and they are still kept, else hours;
    /// `since` moves back to the start of the first row read.
    pub fn new(since: i64, until: i64, step: Option<i64>, by: Vec<By>, now_s: i64) -> Query {
        let fine = match step {
            Some(step) => step % 3600 != 0,
            None => since % 3600 != 0 || until % 3600 != 0,
        };
        let span = if fine && since >= now_s - KEEP_MINUTES_S {
            60
        } else {
            3600
        };
        Query {
            since: since.div_euclid(span) * span,
            until,
            step,
            by,
            span,
        }
    }
}

/// One group in one bucket.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The bucket's start (RFC 3339, UTC).
    pub start: String,
    #[serde(flatten)]
    pub group: BTreeMap<&'static str, String>,
    #[serde(flatten)]
    pub sums: Sums,
}

/// A pending row's key, compared by its names' pointers (the meter hands out the same
/// `Arc`s for the same names, so this is a few words hashed, not four strings). Two
/// pointers with the same name are two rows that the store adds up.
struct Pending(Key);

impl PartialEq for Pending {
    fn eq(&self, o: &Pending) -> bool {
        let (a, b) = (&self.0, &o.0);
        a.minute == b.minute
            && Arc::ptr_eq(&a.client, &b.client)
            && Arc::ptr_eq(&a.provider, &b.provider)
            && Arc::ptr_eq(&a.model, &b.model)
            && Arc::ptr_eq(&a.credential, &b.credential)
    }
}

impl Eq for Pending {}

impl std::hash::Hash for Pending {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        let k = &self.0;
        k.minute.hash(h);
        for name in [&k.client, &k.provider, &k.model, &k.credential] {
            std::ptr::hash(Arc::as_ptr(name) as *const u8, h);
        }
    }
}

pub struct Ledger {
    pending: Mutex<HashMap<Pending, Sums>>,
    backend: Backend,
    /// One write at a time (the task, a query, shutdown).
    writing: tokio::sync::Mutex<()>,
}

impl Ledger {
    pub fn new(backend: Backend) -> Arc<Ledger> {
        Arc::new(Ledger {
            pending: Mutex::default(),
            backend,
            writing: tokio::sync::Mutex::new(()),
        })
    }

    /// Where rows are kept, for `/readyz` and `/admin/usage`.
    pub fn kind(&self) -> &'static str {
        match &self.backend {
            Backend::Db(db) if db.in_memory() => "memory",
            Backend::Db(_) => "sqlite",
            Backend::Fleet(_) => "redis",
        }
    }

    /// Adds one answer (called when it ends; never waits for a store).
    pub fn record(&self, key: Key, sums: Sums) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        p.entry(Pending(key)).or_default().add(&sums);
    }

    /// Writes what is pending. What the store does not take stays pending.
    pub async fn flush(&self) -> Result<(), String> {
        let _one = self.writing.lock().await;
        let rows: Vec<(Key, Sums)> = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            p.drain().map(|(k, s)| (k.0, s)).collect()
        };
        if rows.is_empty() {
            // Nothing new; in a fleet, a batch may still wait for Redis.
            return match &self.backend {
                Backend::Fleet(redis) if redis.has_queued().await => {
                    redis.add(rows).await.map_err(|(e, _)| e)
                }
                _ => Ok(()),
            };
        }
        let written = match &self.backend {
            Backend::Db(db) => {
                let db = Arc::clone(db);
                match tokio::task::spawn_blocking(move || (db.add(&rows), rows)).await {
                    Ok(done) => done,
                    Err(e) => (Err(format!("the writer stopped: {e}")), Vec::new()),
                }
            }
            // The fleet's store keeps a batch it sent unconfirmed; the rest comes back.
            Backend::Fleet(redis) => match redis.add(rows).await {
                Ok(()) => (Ok(()), Vec::new()),
                Err((e, rest)) => (Err(e), rest),
            },
        };
        match written {
            (Ok(()), _) => Ok(()),
            (Err(e), rows) => {
                self.keep(rows);
                Err(e)
            }
        }
    }

    /// Puts rows that could not be written back (bounded: the oldest minutes go first).
    fn keep(&self, rows: Vec<(Key, Sums)>) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (k, s) in rows {
            p.entry(Pending(k)).or_default().add(&s);
        }
        if p.len() > MAX_PENDING {
            let mut minutes: Vec<i64> = p.keys().map(|k| k.0.minute).collect();
            minutes.sort_unstable();
            let before = p.len();
            let keep_from = minutes[before - MAX_PENDING];
            p.retain(|k, _| k.0.minute >= keep_from);
            tracing::error!(target: "tokenrelay::usage", dropped = before - p.len(),
                "usage rows could not be written for too long; the oldest were dropped");
        }
    }

    /// Answers a question about usage (after writing what is pending).
    pub async fn query(&self, q: &Query) -> Result<Vec<Row>, String> {
        if let Err(e) = self.flush().await {
            tracing::warn!(target: "tokenrelay::usage", error = %e, "usage not written before a query; the answer lacks the last second");
        }
        let (span, since) = (q.span, q.since);
        let stored = match &self.backend {
            Backend::Db(db) => {
                let db = Arc::clone(db);
                let until = q.until;
                tokio::task::spawn_blocking(move || db.rows(span, since, until))
                    .await
                    .unwrap_or_else(|e| Err(format!("the reader stopped: {e}")))?
            }
            Backend::Fleet(redis) => redis.rows(span, since, q.until).await?,
        };
        Ok(group(q, stored))
    }

    /// Tokens and answers each named client spent in its current windows (a restart
    /// restores them; in fleet mode Redis holds them and nothing is restored).
    pub async fn restore(&self, clients: &Clients, now_ms: i64) {
        let Backend::Db(db) = &self.backend else {
            return;
        };
        if clients.named().is_empty() {
            return;
        }
        let db = Arc::clone(db);
        let spent = match tokio::task::spawn_blocking(move || db.spent(now_ms)).await {
            Ok(r) => r,
            Err(e) => Err(format!("the reader stopped: {e}")),
        };
        match spent {
            Ok(spent) => {
                for (name, s) in spent {
                    if let Some(c) = clients.named().iter().find(|c| *c.name == *name) {
                        c.restore(s, now_ms);
                    }
                }
            }
            Err(e) => tracing::error!(target: "tokenrelay::usage", error = %e,
                "cannot read what clients spent before the restart; their budgets start from zero"),
        }
    }

    /// Writes every second until the ledger is dropped; prunes old rows every hour.
    pub fn start(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut pruned_at = 0;
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                if let Err(e) = me.flush().await {
                    tracing::warn!(target: "tokenrelay::usage", error = %e, "usage not written; kept in memory for the next try");
                }
                let now_s = crate::clock::now_ms() / 1000;
                if now_s - pruned_at >= 3600 {
                    pruned_at = now_s;
                    if let Backend::Db(db) = &me.backend {
                        let db = Arc::clone(db);
                        let _ = tokio::task::spawn_blocking(move || db.prune(now_s)).await;
                    }
                }
            }
        });
    }
}

/// Adds stored rows up into the query's groups and buckets, in order of time then group.
fn group(q: &Query, stored: Vec<Stored>) -> Vec<Row> {
    let mut out: BTreeMap<(i64, Vec<Arc<str>>), Sums> = BTreeMap::new();
    for (start, key, sums) in stored {
        if start >= q.until {
            continue;
        }
        let bucket = match q.step {
            Some(step) => start.div_euclid(step) * step,
            None => q.since,
        };
        let group =
            q.by.iter()
                .map(|b| match b {
                    By::Client => Arc::clone(&key.client),
                    By::Provider => Arc::clone(&key.provider),
                    By::Model => Arc::clone(&key.model),
                    By::Credential => Arc::clone(&key.credential),
                })
                .collect();
        out.entry((bucket, group)).or_default().add(&sums);
    }
    out.into_iter()
        .map(|((start, group), sums)| Row {
            start: crate::clock::rfc3339(start * 1000),
            group: q
                .by
                .iter()
                .zip(group)
                .map(|(b, v)| (b.name(), v.to_string()))
                .collect(),
            sums,
        })
        .collect()
}
