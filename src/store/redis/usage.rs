//! Usage history for the fleet: every replica adds its rows to one hash per bucket,
//! `{prefix}:m:{minute start}` (kept 48 hours) and `{prefix}:h:{hour start}` (kept 400
//! days), field `client␟provider␟model␟credential␟kind` (kind: `a` answers, `u` without
//! usage, `p` prompt, `c` completion, `k` cached, `t` thoughts, `n` tokens). Written by the
//! ledger's task (never by a request) on a multiplexed connection of its own, each call
//! bounded by `store.op_timeout`.
//!
//! Rows go in batches of at most `BATCH_ROWS`, each with a random id, applied once by the
//! `USAGE_ADD` script (its marker `{prefix}:{use}:batch:{id}` says it was): a batch whose
//! answer was lost (a timeout after Redis applied it) is kept and sent again first, and
//! not counted twice. Rows not sent go back to the ledger, which merges them with newer
//! ones. Every usage key is under the `{use}` hash tag: one script call's keys share a
//! Redis Cluster slot.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Script;

use super::scripts::USAGE_ADD;
use crate::store::usage::{Key, Stored, Sums, KEEP_HOURS_S, KEEP_MINUTES_S};

const SEP: char = '\u{1f}';
/// Rows per batch (one script call).
const BATCH_ROWS: usize = 500;

/// Rows sent together, applied once.
struct Batch {
    id: u64,
    rows: Vec<(Key, Sums)>,
}

pub struct SharedUsage {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// The last failure, for messages.
    last_error: Mutex<Option<String>>,
    /// Batches sent but not confirmed (each may have been applied), oldest first.
    queue: tokio::sync::Mutex<VecDeque<Batch>>,
    script: Script,
}

impl SharedUsage {
    pub fn new(client: redis::Client, prefix: String, timeout: Duration) -> SharedUsage {
        SharedUsage {
            client,
            prefix,
            timeout,
            conn: tokio::sync::Mutex::new(None),
            last_error: Mutex::new(None),
            queue: tokio::sync::Mutex::new(VecDeque::new()),
            script: Script::new(USAGE_ADD),
        }
    }

    async fn conn(&self) -> Result<MultiplexedConnection, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(self.timeout, self.client.get_multiplexed_async_connection())
            .await
            .map_err(|_| "the fleet store did not accept a connection in time".to_string())?
            .map_err(|e| format!("cannot connect to the fleet store: {}", e.category()))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn failed(&self, e: String) -> String {
        *self.conn.lock().await = None;
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
        e
    }

    fn bucket(&self, span: i64, start: i64) -> String {
        let kind = if span == 60 { "m" } else { "h" };
        format!("{}:{{use}}:{kind}:{start}", self.prefix)
    }

    /// Sends rows in batches. A batch that was sent and not confirmed may have been
    /// applied: it is kept as it is and sent again first next time (its marker makes that
    /// safe). Rows not sent yet are handed back, for the ledger to merge with newer ones.
    pub async fn add(&self, rows: Vec<(Key, Sums)>) -> Result<(), (String, Vec<(Key, Sums)>)> {
        let mut sent_before = self.queue.lock().await;
        while let Some(batch) = sent_before.front() {
            if let Err(e) = self.send(batch).await {
                return Err((e, rows));
            }
            sent_before.pop_front();
        }
        let mut rows = rows;
        while !rows.is_empty() {
            let rest = rows.split_off(rows.len().min(BATCH_ROWS));
            let batch = Batch {
                id: rand::random(),
                rows,
            };
            if let Err(e) = self.send(&batch).await {
                sent_before.push_back(batch);
                return Err((e, rest));
            }
            rows = rest;
        }
        Ok(())
    }

    /// Whether batches wait for Redis.
    pub async fn has_queued(&self) -> bool {
        !self.queue.lock().await.is_empty()
    }

    /// Sends one batch (applied once, however often it is sent).
    async fn send(&self, batch: &Batch) -> Result<(), String> {
        let now_s = crate::clock::now_ms() / 1000;
        // bucket key -> (ttl, fields)
        let mut buckets: std::collections::BTreeMap<String, (i64, Vec<(String, u64)>)> =
            Default::default();
        for (k, s) in &batch.rows {
            let group = format!(
                "{}{SEP}{}{SEP}{}{SEP}{}",
                k.client, k.provider, k.model, k.credential
            );
            for (span, start, keep) in [
                (60, k.minute, KEEP_MINUTES_S),
                (3600, k.minute.div_euclid(3600) * 3600, KEEP_HOURS_S),
            ] {
                // Rows that waited long still expire with their bucket, never at once.
                let ttl = (start + keep + 3600 - now_s).max(3600);
                let entry = buckets
                    .entry(self.bucket(span, start))
                    .or_insert_with(|| (ttl, Vec::new()));
                for (kind, n) in [
                    ('a', s.answers),
                    ('u', s.unknown),
                    ('p', s.prompt),
                    ('c', s.completion),
                    ('k', s.cached),
                    ('t', s.thoughts),
                    ('n', s.tokens),
                ] {
                    if n > 0 {
                        entry
                            .1
                            .push((format!("{group}{SEP}{kind}"), n.min(i64::MAX as u64)));
                    }
                }
            }
        }
        let mut call = self.script.prepare_invoke();
        // Retries come within seconds while Redis answers; an hour is ample.
        call.key(format!("{}:{{use}}:batch:{:016x}", self.prefix, batch.id))
            .arg(3600);
        for (bucket, (ttl, fields)) in &buckets {
            call.key(bucket).arg(*ttl).arg(fields.len());
            for (field, n) in fields {
                call.arg(field).arg(*n);
            }
        }
        let mut conn = self.conn().await?;
        match tokio::time::timeout(self.timeout, call.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self
                .failed(format!("the fleet store refused usage: {}", e.category()))
                .await),
            Err(_) => Err(self
                .failed("the fleet store did not take usage in time".to_string())
                .await),
        }
    }

    /// The rows of one resolution whose bucket starts in `[since, until)`.
    pub async fn rows(&self, span: i64, since: i64, until: i64) -> Result<Vec<Stored>, String> {
        let starts: Vec<i64> = (0..)
            .map(|i| since + i * span)
            .take_while(|s| *s < until)
            .take(50_000)
            .collect();
        let mut pipe = redis::pipe();
        for s in &starts {
            pipe.hgetall(self.bucket(span, *s));
        }
        let mut conn = self.conn().await?;
        let hashes: Vec<Vec<(String, u64)>> =
            match tokio::time::timeout(self.timeout * 4, pipe.query_async(&mut conn)).await {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    return Err(self
                        .failed(format!(
                            "cannot read usage from the fleet store: {}",
                            e.category()
                        ))
                        .await)
                }
                Err(_) => {
                    return Err(self
                        .failed("the fleet store did not answer a usage query in time".to_string())
                        .await)
                }
            };
        let mut out = Vec::new();
        for (start, fields) in starts.into_iter().zip(hashes) {
            let mut rows: std::collections::HashMap<String, Sums> = Default::default();
            for (field, n) in fields {
                let Some((group, kind)) = field.rsplit_once(SEP) else {
                    continue;
                };
                let s = rows.entry(group.to_string()).or_default();
                match kind {
                    "a" => s.answers += n,
                    "u" => s.unknown += n,
                    "p" => s.prompt += n,
                    "c" => s.completion += n,
                    "k" => s.cached += n,
                    "t" => s.thoughts += n,
                    "n" => s.tokens += n,
                    _ => {}
                }
            }
            for (group, sums) in rows {
                let mut parts = group.split(SEP);
                let mut next = || Arc::<str>::from(parts.next().unwrap_or("-"));
                let key = Key {
                    minute: start,
                    client: next(),
                    provider: next(),
                    model: next(),
                    credential: next(),
                };
                out.push((start, key, sums));
            }
        }
        Ok(out)
    }
}
