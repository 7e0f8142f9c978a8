//! Declared limits counted fleet-wide: one script call per request that a limit applies
//! to, on an async multiplexed connection (the only Redis call a request ever waits for,
//! at most `store.limit_timeout`). The connection is opened in a task of its own (at
//! start-up, and again after a failure), never inside a request's wait; until it is up,
//! or for a second after a failure, the replica's own count decides (see `quota::limits`).
//!
//! Keys: `{prefix}:{provider/scope/model}:m:{minute}` (a hash: `r` requests, `t` tokens)
//! and `…:d:{pacific day}` (requests): one hash tag, one Redis Cluster slot; each expires
//! after its window. A client's windows (`[[clients]]`): `{prefix}:{client/NAME}:m:{minute}`
//! (`r`, `t`), `…:d:{UTC day}` and `…:mo:{month}` (tokens); requests are taken when
//! admitted, tokens added when the answer ends.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Script;

use super::scripts::{CLIENT_TAKE, TAKE};
use crate::clock;

/// Which window refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Rpm,
    Tpm,
    Rpd,
}

/// Which of a client's windows refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFull {
    Rpm,
    Tpm,
    Day,
    Month,
}

/// A client's request to take: its windows (minute, UTC day, month since 1970) and its
/// limits (0: none).
#[derive(Debug, Clone, Copy)]
pub struct ClientTake {
    pub minute: i64,
    pub day: i64,
    pub month: i64,
    pub rpm: u64,
    pub tpm: u64,
    pub tpd: u64,
    pub tpmo: u64,
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
    client_script: Script,
    /// Unix ms of the last warning from a call nobody waits for (at most one a second).
    warned_at: AtomicI64,
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
            client_script: Script::new(CLIENT_TAKE),
            warned_at: AtomicI64::new(0),
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
        let code = self
            .run("a declared limit", |conn| self.call(conn, name, t))
            .await?;
        Ok(match code {
            1 => Some(Full::Rpm),
            2 => Some(Full::Tpm),
            3 => Some(Full::Rpd),
            _ => None,
        })
    }

    /// Takes one request from the fleet's count of client `name`, as `take` does.
    pub async fn take_client(
        self: &Arc<Self>,
        name: &str,
        t: ClientTake,
    ) -> Result<Option<ClientFull>, ()> {
        let base = self.client_base(name);
        let code: i64 = self
            .run("a client's limit", |mut conn| async move {
                self.client_script
                    .key(format!("{base}:m:{}", t.minute))
                    .key(format!("{base}:d:{}", t.day))
                    .key(format!("{base}:mo:{}", t.month))
                    .arg(t.rpm)
                    .arg(t.tpm)
                    .arg(t.tpd)
                    .arg(t.tpmo)
                    .arg(120_000)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(match code {
            1 => Some(ClientFull::Rpm),
            2 => Some(ClientFull::Tpm),
            3 => Some(ClientFull::Day),
            4 => Some(ClientFull::Month),
            _ => None,
        })
    }

    /// Adds an answer's tokens to client `name`'s windows in the fleet, in a task of its
    /// own (nobody waits for it; when Redis does not take them, this replica's count
    /// still has them).
    pub fn spend_client(
        self: &Arc<Self>,
        name: &str,
        tokens: u64,
        minute: i64,
        day: i64,
        month: i64,
    ) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let base = self.client_base(name);
        let me = Arc::clone(self);
        rt.spawn(async move {
            let mut pipe = redis::pipe();
            pipe.hincr(format!("{base}:m:{minute}"), "t", tokens)
                .ignore()
                .pexpire(format!("{base}:m:{minute}"), 120_000)
                .ignore()
                .incr(format!("{base}:d:{day}"), tokens)
                .ignore()
                .expire(format!("{base}:d:{day}"), 2 * 86_400)
                .ignore()
                .incr(format!("{base}:mo:{month}"), tokens)
                .ignore()
                .expire(format!("{base}:mo:{month}"), 32 * 86_400)
                .ignore();
            let _ = me
                .aside("a client's tokens", |mut conn| async move {
                    pipe.query_async::<()>(&mut conn).await
                })
                .await;
        });
    }

    /// What client `name` spent in the fleet's windows: (requests this minute, tokens
    /// this minute, today, this month), for the admin API; `None` when Redis does not say.
    pub async fn client_windows(
        self: &Arc<Self>,
        name: &str,
        minute: i64,
        day: i64,
        month: i64,
    ) -> Option<[u64; 4]> {
        let base = self.client_base(name);
        let mut pipe = redis::pipe();
        pipe.hget(format!("{base}:m:{minute}"), "r")
            .hget(format!("{base}:m:{minute}"), "t")
            .get(format!("{base}:d:{day}"))
            .get(format!("{base}:mo:{month}"));
        let read: (Option<u64>, Option<u64>, Option<u64>, Option<u64>) = self
            .aside("a client's windows", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await
            .ok()?;
        Some([read.0, read.1, read.2, read.3].map(|n| n.unwrap_or(0)))
    }

    /// A call nobody on the request path waits for (spends, reads for the admin API):
    /// bounded by `store.op_timeout`, and its failure does not quiet the counting.
    async fn aside<T, F, Fut>(self: &Arc<Self>, what: &'static str, f: F) -> Result<T, ()>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let existing = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(conn) = existing else {
            self.connect_in_background();
            self.warn_aside(what, "no connection to the fleet store yet");
            return Err(());
        };
        match tokio::time::timeout(self.connect_timeout, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.warn_aside(what, e.category());
                Err(())
            }
            Err(_) => {
                self.warn_aside(what, "no answer within store.op_timeout");
                Err(())
            }
        }
    }

    /// A failure of a call nobody waits for: said at most once a second.
    fn warn_aside(&self, what: &'static str, why: &str) {
        let now = clock::now_ms();
        let last = self.warned_at.load(Ordering::Relaxed);
        if now - last >= 1000
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(target: "tokenrelay::store", what, error = why,
                "the fleet store did not take a call; this replica's own count has it (said at most once a second)");
        }
    }

    fn client_base(&self, name: &str) -> String {
        self.tagged(&format!("client/{name}"))
    }

    /// `{prefix}:{name}`: every key of one count under one hash tag (braces in the name
    /// would move it to another slot, so they are left out).
    fn tagged(&self, name: &str) -> String {
        let tag: String = name.chars().filter(|c| !matches!(c, '{' | '}')).collect();
        format!("{}:{{{tag}}}", self.prefix)
    }

    /// Runs one call on the counting connection within `timeout`; on failure, this
    /// replica's own count decides for a second.
    async fn run<T, F, Fut>(self: &Arc<Self>, what: &'static str, f: F) -> Result<T, ()>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if clock::now_ms() < self.quiet_until.load(Ordering::Relaxed) {
            return Err(());
        }
        let existing = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(conn) = existing else {
            self.connect_in_background();
            return Err(());
        };
        match tokio::time::timeout(self.timeout, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::warn!(target: "tokenrelay::store", error = %e.category(), what,
                    "could not count in the fleet store; this replica's own count decides for a second");
                self.quiet(true);
                Err(())
            }
            Err(_) => {
                tracing::warn!(target: "tokenrelay::store", timeout_ms = self.timeout.as_millis() as u64, what,
                    "the fleet store did not count in time; this replica's own count decides for a second");
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
        let base = self.tagged(name);
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
