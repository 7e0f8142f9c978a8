//! Usage history for the fleet: every replica adds its rows to one hash per bucket,
//! `{prefix}:m:{minute start}` (kept 48 hours) and `{prefix}:h:{hour start}` (kept 400
//! days), field `client␟provider␟model␟credential␟kind` (kind: `a` answers, `u` without
//! usage, `p` prompt, `c` completion, `k` cached, `t` thoughts, `n` tokens), by `HINCRBY`
//! in one pipeline per write. Written by the ledger's task (never by a request) on a
//! multiplexed connection of its own, each call bounded by `store.op_timeout`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use crate::store::usage::{Key, Stored, Sums, KEEP_HOURS_S, KEEP_MINUTES_S};

const SEP: char = '\u{1f}';

pub struct SharedUsage {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// The last failure, for messages.
    last_error: Mutex<Option<String>>,
}

impl SharedUsage {
    pub fn new(client: redis::Client, prefix: String, timeout: Duration) -> SharedUsage {
        SharedUsage {
            client,
            prefix,
            timeout,
            conn: tokio::sync::Mutex::new(None),
            last_error: Mutex::new(None),
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
        format!("{}:{kind}:{start}", self.prefix)
    }

    /// Adds rows to their minute's and their hour's hash.
    pub async fn add(&self, rows: &[(Key, Sums)]) -> Result<(), String> {
        let mut pipe = redis::pipe();
        let mut expire = std::collections::HashSet::new();
        for (k, s) in rows {
            for (span, start, keep) in [
                (60, k.minute, KEEP_MINUTES_S),
                (3600, k.minute.div_euclid(3600) * 3600, KEEP_HOURS_S),
            ] {
                let bucket = self.bucket(span, start);
                let group = format!(
                    "{}{SEP}{}{SEP}{}{SEP}{}",
                    k.client, k.provider, k.model, k.credential
                );
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
                        pipe.hincr(&bucket, format!("{group}{SEP}{kind}"), n)
                            .ignore();
                    }
                }
                if expire.insert(bucket.clone()) {
                    pipe.expire(&bucket, start + keep + 3600 - crate::clock::now_ms() / 1000)
                        .ignore();
                }
            }
        }
        let mut conn = self.conn().await?;
        match tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
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
