//! Declared limits counted fleet-wide: one script call per request that a limit applies
//! to, on an async multiplexed connection (the only Redis call a request ever waits for,
//! at most `store.limit_timeout`). The connection is opened in a task of its own (at
//! start-up, and again after a failure), never inside a request's wait; until it is up,
//! or for a second after a failure, the replica's own count decides (see `quota::limits`).
//!
//! Keys: `{prefix}:{provider/scope/model}:m:{minute}` (a hash: `r` requests, `t` tokens)
//! and `…:d:{pacific day}` (requests): one hash tag, one Redis Cluster slot; each expires
//! after its window.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Script;

use super::scripts::TAKE;
use crate::clock;

/// Which window refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Rpm,
    Tpm,
    Rpd,
}

/// One count to take: the windows it falls in, the limits (0: none) and the tokens.
#[derive(Debug, Clone, Copy)]
pub struct Take {
    pub minute: i64,
    pub day: i64,
    pub rpm: u64,
    pub tpm: u64,
    pub rpd: u64,
    pub tokens: u64,
    /// How long the day's key must live (to the next Pacific midnight, plus margin).
    pub day_ttl: Duration,
}

pub struct SharedCounts {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    /// How long the connecting task may take (`store.op_timeout`).
    connect_timeout: Duration,
    conn: Mutex<Option<MultiplexedConnection>>,
    connecting: AtomicBool,
    /// Unix ms before which Redis is not asked (it failed just now).
    quiet_until: AtomicI64,
    script: Script,
}

impl SharedCounts {
    /// Starts connecting at once when a runtime is at hand (else on first use).
    pub fn new(
        client: redis::Client,
        prefix: String,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Arc<SharedCounts> {
        let counts = Arc::new(SharedCounts {
            client,
            prefix,
            timeout,
            connect_timeout,
            conn: Mutex::new(None),
            connecting: AtomicBool::new(false),
            quiet_until: AtomicI64::new(0),
            script: Script::new(TAKE),
        });
        counts.connect_in_background();
        counts
    }

    /// Whether the counting connection is up.
    pub fn connected(&self) -> bool {
        self.conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Opens the connection in a task of its own (one at a time).
    fn connect_in_background(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = Arc::clone(self);
        rt.spawn(async move {
            let conn = tokio::time::timeout(
                me.connect_timeout,
                me.client.get_multiplexed_async_connection(),
            )
            .await;
            match conn {
                Ok(Ok(c)) => *me.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(c),
                Ok(Err(e)) => {
                    tracing::warn!(target: "tokenrelay::store", error = %e.category(),
                        "cannot open the connection that counts declared limits in the fleet store; this replica's own count decides meanwhile");
                    me.quiet_until
                        .store(clock::now_ms() + 1000, Ordering::Relaxed);
                }
                Err(_) => {
                    tracing::warn!(target: "tokenrelay::store",
                        "the fleet store did not accept the connection that counts declared limits in time; this replica's own count decides meanwhile");
                    me.quiet_until
                        .store(clock::now_ms() + 1000, Ordering::Relaxed);
                }
            }
            me.connecting.store(false, Ordering::Release);
        });
    }

    /// Takes `t` from the fleet's count of `name` (`provider/scope/model`): `Ok(None)`
    /// taken, `Ok(Some(window))` that window is full (nothing taken), `Err(())` Redis did
    /// not answer in time (the caller's own count decides).
    pub async fn take(self: &Arc<Self>, name: &str, t: Take) -> Result<Option<Full>, ()> {
        if clock::now_ms() < self.quiet_until.load(Ordering::Relaxed) {
            return Err(());
        }
        let existing = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(conn) = existing else {
            self.connect_in_background();
            return Err(());
        };
        let result = tokio::time::timeout(self.timeout, self.call(conn, name, t)).await;
        match result {
            Ok(Ok(code)) => Ok(match code {
                1 => Some(Full::Rpm),
                2 => Some(Full::Tpm),
                3 => Some(Full::Rpd),
                _ => None,
            }),
            Ok(Err(e)) => {
                tracing::warn!(target: "tokenrelay::store", error = %e.category(),
                    "could not count a declared limit in the fleet store; this replica's own count decides for a second");
                self.quiet(true);
                Err(())
            }
            Err(_) => {
                tracing::warn!(target: "tokenrelay::store", timeout_ms = self.timeout.as_millis() as u64,
                    "the fleet store did not count a declared limit in time; this replica's own count decides for a second");
                self.quiet(false);
                Err(())
            }
        }
    }

    fn quiet(&self, drop_conn: bool) {
        self.quiet_until
            .store(clock::now_ms() + 1000, Ordering::Relaxed);
        if drop_conn {
            *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    async fn call(
        &self,
        mut conn: MultiplexedConnection,
        name: &str,
        t: Take,
    ) -> redis::RedisResult<i64> {
        // Braces would move the key to another hash slot.
        let tag: String = name.chars().filter(|c| !matches!(c, '{' | '}')).collect();
        let base = format!("{}:{{{tag}}}", self.prefix);
        self.script
            .key(format!("{base}:m:{}", t.minute))
            .key(format!("{base}:d:{}", t.day))
            .arg(t.rpm)
            .arg(t.tpm)
            .arg(t.rpd)
            .arg(t.tokens)
            .arg(120_000)
            .arg(t.day_ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
    }
}
