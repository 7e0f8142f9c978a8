//! Fleet mode: replicas share credentials through Redis, behind the same `CredentialStore`
//! seam as files. The request path never touches Redis: tokens are served from memory;
//! Redis is read and written only around refreshes, by the poller and by the subscriber.
//!
//! Per credential, every key carries the hash tag `{provider/id}` (Redis Cluster keeps them
//! in one slot) and is passed in `KEYS`:
//! - `…:rec` — the record: `v` (version), `doc` (the credential document as JSON), `src`
//!   (fingerprint of the source file it was imported from), `writer`, `updated_at`,
//!   `attempt` (`fence:v` of the last holder that went to the token endpoint).
//! - `…:lease` — `fence:replica:nonce`, `SET NX PX`, renewed by compare-and-`PEXPIRE`,
//!   released by compare-and-delete; `…:fence` — the `INCR` counter fences come from.
//! - `…:cool` — shared cool-downs: field = model (or `*`), value = until (Unix ms), raised
//!   only if later.
//!
//! Writes are a compare-and-set on `v` (a write derived from version `v` makes `v + 1`);
//! they are not fenced by the lease, so a holder that stalled after the token endpoint
//! answered still lands its write — it holds the only valid refresh token. A successor that
//! finds `attempt` at the current version waits `grace` re-reading before it spends the
//! refresh token again. A file is imported only when there is no record yet or when the
//! file itself changed since it was imported: a stale Secret never overwrites the record.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::{Commands, Script};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

use super::file::fingerprint;
use super::shape::{self, CredentialFile, TokenUpdate};
use super::{CredentialStore, FileStore, LockGuard, StoreError, TryLock};
use crate::clock;

/// `[store]` with `kind = "redis"`.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: SecretString,
    pub key_prefix: String,
    /// Lease length; renewed every third of it while a refresh runs.
    pub lease: Duration,
    /// How often every record's version is polled (pub/sub is only a hint).
    pub poll_interval: Duration,
    /// How long a successor waits, re-reading, after an earlier holder went to the token
    /// endpoint and did not commit (≥ the token call's timeout).
    pub grace: Duration,
    pub pubsub: bool,
    /// Redis calls give up after this (the request path never waits on them).
    pub op_timeout: Duration,
}

/// What changed in the fleet, for the lifecycle to act on.
#[derive(Debug, Clone)]
pub enum FleetEvent {
    /// A record is newer than what this replica has: re-read it.
    Changed { provider: String, id: String },
    /// A peer's cool-down: until (Unix ms) for a model, or the whole credential (`None`).
    Cooldown {
        provider: String,
        id: String,
        model: Option<String>,
        until_ms: i64,
    },
    /// A peer found this credential's refresh token dead at the version this replica
    /// holds: take it out of rotation without spending a call to learn the same.
    NeedsReauth {
        provider: String,
        id: String,
        message: String,
    },
    /// Redis came back: every credential re-reads (and re-asserts what Redis lost).
    Reconnected,
}

/// Counters the fleet reports (the metrics module reads them).
pub trait FleetMetrics: Send + Sync {
    fn operation(&self, op: &str, ok: bool);
    fn up(&self, up: bool);
}

/// One process's connection to the fleet: shared by every `RedisStore`.
pub struct Fleet {
    client: redis::Client,
    conn: Mutex<Option<redis::Connection>>,
    cfg: RedisConfig,
    /// `hostname-pid-random`: who wrote a record, who holds a lease.
    pub replica: String,
    up: AtomicBool,
    metrics: Arc<dyn FleetMetrics>,
    events: tokio::sync::broadcast::Sender<FleetEvent>,
    /// Registered stores, by `provider/id`, for the poller.
    stores: Mutex<HashMap<String, std::sync::Weak<RedisStore>>>,
}

const CAS: &str = r#"
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return {0, v} end
redis.call('HSET', KEYS[1], 'v', v + 1, 'doc', ARGV[2], 'writer', ARGV[3], 'updated_at', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'src', ARGV[5]) end
redis.call('PUBLISH', ARGV[6], ARGV[7] .. ' ' .. (v + 1))
return {1, v + 1}
"#;

/// Puts back a record Redis lost (or holds an older version of): only if absent or lower.
const REASSERT: &str = r#"
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'doc', ARGV[2], 'writer', ARGV[3], 'updated_at', ARGV[4], 'src', ARGV[5])
return 1
"#;

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

const COOL: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) <= cur then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIREAT', KEYS[1], math.max(tonumber(ARGV[2]), tonumber(redis.call('PEXPIRETIME', KEYS[1]))))
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' cool')
return 1
"#;

fn store_error(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        path: "redis".into(),
        op: "reach the fleet store",
        source: std::io::Error::other(format!("{what}: {e}")),
    }
}

impl Fleet {
    /// Connects lazily: a Redis that is down at start-up is reported, not fatal.
    pub fn new(cfg: RedisConfig, metrics: Arc<dyn FleetMetrics>) -> Result<Arc<Fleet>, String> {
        let client = redis::Client::open(cfg.url.expose_secret())
            .map_err(|e| format!("store.url is not a Redis URL: {}", e.category()))?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "replica".into());
        let replica = format!(
            "{host}-{}-{:04x}",
            std::process::id(),
            rand::random::<u16>()
        );
        let (events, _) = tokio::sync::broadcast::channel(1024);
        Ok(Arc::new(Fleet {
            client,
            conn: Mutex::new(None),
            cfg,
            replica,
            up: AtomicBool::new(false),
            metrics,
            events,
            stores: Mutex::default(),
        }))
    }

    pub fn config(&self) -> &RedisConfig {
        &self.cfg
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<FleetEvent> {
        self.events.subscribe()
    }

    fn channel(&self) -> String {
        format!("{}:updates", self.cfg.key_prefix)
    }

    fn set_up(&self, up: bool) {
        let was = self.up.swap(up, Ordering::Relaxed);
        self.metrics.up(up);
        if up && !was {
            let _ = self.events.send(FleetEvent::Reconnected);
        } else if !up && was {
            tracing::warn!(target: "tokenrelay::store", "the fleet store (Redis) is unreachable: rotating credentials do not refresh until it is back; tokens keep serving from memory");
        }
    }

    /// Runs one operation on the shared connection (reconnecting when needed), counting it.
    fn run<T>(
        &self,
        op: &str,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            match self.client.get_connection_with_timeout(self.cfg.op_timeout) {
                Ok(c) => {
                    let _ = c.set_read_timeout(Some(self.cfg.op_timeout));
                    let _ = c.set_write_timeout(Some(self.cfg.op_timeout));
                    *guard = Some(c);
                }
                Err(e) => {
                    self.metrics.operation(op, false);
                    drop(guard);
                    self.set_up(false);
                    return Err(store_error("connect", e.category()));
                }
            }
        }
        let conn = guard.as_mut().expect("connected above");
        match f(conn) {
            Ok(v) => {
                self.metrics.operation(op, true);
                drop(guard);
                self.set_up(true);
                Ok(v)
            }
            Err(e) => {
                self.metrics.operation(op, false);
                if e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                {
                    *guard = None;
                    drop(guard);
                    self.set_up(false);
                }
                Err(store_error(op, e.category()))
            }
        }
    }

    /// The poller and the subscriber, on threads of their own (blocking Redis calls never
    /// run on the runtime).
    pub fn start(self: &Arc<Self>) {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("tokenrelay-fleet-poll".into())
            .spawn(move || loop {
                std::thread::sleep(me.cfg.poll_interval);
                if Arc::strong_count(&me) == 1 {
                    return;
                }
                me.poll_once();
            })
            .ok();
        if self.cfg.pubsub {
            let me = Arc::clone(self);
            std::thread::Builder::new()
                .name("tokenrelay-fleet-sub".into())
                .spawn(move || loop {
                    if Arc::strong_count(&me) == 1 {
                        return;
                    }
                    me.listen();
                    std::thread::sleep(Duration::from_secs(1));
                })
                .ok();
        }
    }

    fn listen(&self) {
        let Ok(mut conn) = self.client.get_connection_with_timeout(self.cfg.op_timeout) else {
            return;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut pubsub = conn.as_pubsub();
        if pubsub.subscribe(self.channel()).is_err() {
            return;
        }
        // (Re)subscribed: whatever was published meanwhile is caught up by re-reading.
        let _ = self.events.send(FleetEvent::Reconnected);
        loop {
            match pubsub.get_message() {
                Ok(msg) => {
                    let payload: String = msg.get_payload().unwrap_or_default();
                    let name = payload.split(' ').next().unwrap_or("");
                    if let Some((provider, id)) = name.split_once('/') {
                        let _ = self.events.send(FleetEvent::Changed {
                            provider: provider.into(),
                            id: id.into(),
                        });
                        if payload.ends_with(" cool") {
                            self.read_cooldowns(name);
                        }
                        if payload.ends_with(" dead") {
                            let store = self
                                .stores
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get(name)
                                .and_then(std::sync::Weak::upgrade);
                            if let Some(store) = store {
                                self.read_dead(&store);
                            }
                        }
                    }
                }
                Err(e) if e.is_timeout() => continue,
                Err(_) => return,
            }
        }
    }

    /// One round: every record's version against ours; lost records re-asserted; peers'
    /// cool-downs applied.
    fn poll_once(&self) {
        let stores: Vec<Arc<RedisStore>> = {
            let mut map = self.stores.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, w| w.strong_count() > 0);
            map.values().filter_map(std::sync::Weak::upgrade).collect()
        };
        for s in stores {
            let key = s.rec_key();
            let v: Result<Option<u64>, _> = self.run("poll", |c| c.hget(&key, "v"));
            match v {
                Ok(Some(v)) if v > s.seen.load(Ordering::Acquire) => {
                    let _ = self.events.send(FleetEvent::Changed {
                        provider: s.provider.clone(),
                        id: s.id.clone(),
                    });
                }
                Ok(stored) => {
                    if stored.unwrap_or(0) < s.seen.load(Ordering::Acquire) {
                        s.reassert();
                    }
                }
                Err(_) => return,
            }
            self.read_cooldowns(&s.name());
            self.read_dead(&s);
        }
    }

    /// A peer's verdict that the record at the version this replica holds is dead.
    fn read_dead(&self, s: &RedisStore) {
        let key = s.key("state");
        let Ok(Some(dead)) = self.run("state", |c| {
            c.hget::<_, _, Option<String>>(&key, "needs_reauth")
        }) else {
            return;
        };
        let Some((v, message)) = dead.split_once('|') else {
            return;
        };
        if v.parse::<u64>().ok() == Some(s.seen.load(Ordering::Acquire)) {
            let _ = self.events.send(FleetEvent::NeedsReauth {
                provider: s.provider.clone(),
                id: s.id.clone(),
                message: message.to_string(),
            });
        }
    }

    fn read_cooldowns(&self, name: &str) {
        let Some((provider, id)) = name.split_once('/') else {
            return;
        };
        let key = format!("{}:{{{name}}}:cool", self.cfg.key_prefix);
        let Ok(all) = self.run("cooldowns", |c| c.hgetall::<_, HashMap<String, i64>>(&key)) else {
            return;
        };
        let now = clock::now_ms();
        for (model, until) in all.into_iter().filter(|(_, u)| *u > now) {
            let _ = self.events.send(FleetEvent::Cooldown {
                provider: provider.into(),
                id: id.into(),
                model: (model != "*").then_some(model),
                until_ms: until,
            });
        }
    }
}

/// One credential in the fleet store.
pub struct RedisStore {
    fleet: Arc<Fleet>,
    /// The source file credentials enter the fleet from (read, never written).
    source: FileStore,
    source_path: PathBuf,
    provider: String,
    id: String,
    /// Whether refreshing without the lease could spend a rotating refresh token twice.
    rotating: bool,
    /// The version this replica last read or wrote: writes are derived from it.
    seen: AtomicU64,
    doc: Mutex<Option<Map<String, Value>>>,
    /// The source's fingerprint as recorded.
    src: Mutex<String>,
    /// A committed token whose write has not landed (Redis was down): retried.
    retrying: AtomicBool,
    /// The lease this replica holds now (fence, value), for the attempt marker.
    lease: Mutex<Option<(u64, String)>>,
}

impl RedisStore {
    pub fn new(
        fleet: &Arc<Fleet>,
        source: PathBuf,
        provider: &str,
        id: &str,
        rotating: bool,
    ) -> Arc<RedisStore> {
        let store = Arc::new(RedisStore {
            fleet: Arc::clone(fleet),
            source: FileStore::new(source.clone()),
            source_path: source,
            provider: provider.into(),
            id: id.into(),
            rotating,
            seen: AtomicU64::new(0),
            doc: Mutex::new(None),
            src: Mutex::new(String::new()),
            retrying: AtomicBool::new(false),
            lease: Mutex::new(None),
        });
        fleet
            .stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(store.name(), Arc::downgrade(&store));
        store
    }

    fn name(&self) -> String {
        format!("{}/{}", self.provider, self.id)
    }

    fn key(&self, part: &str) -> String {
        format!("{}:{{{}}}:{part}", self.fleet.cfg.key_prefix, self.name())
    }

    fn rec_key(&self) -> String {
        self.key("rec")
    }

    /// The record's version, as this replica last saw it.
    pub fn version(&self) -> u64 {
        self.seen.load(Ordering::Acquire)
    }

    fn remember(&self, v: u64, doc: Map<String, Value>) {
        self.seen.store(v, Ordering::Release);
        *self.doc.lock().unwrap_or_else(|p| p.into_inner()) = Some(doc);
    }

    fn parse_doc(
        &self,
        doc: &str,
        updated_at_ms: i64,
    ) -> Result<(CredentialFile, Map<String, Value>), StoreError> {
        shape::parse(doc.as_bytes(), updated_at_ms).map_err(|source| StoreError::Parse {
            path: format!("redis record {}", self.name()),
            source,
        })
    }

    /// Compare-and-set from version `from`; `Ok(Some(v))` the new version, `Ok(None)`
    /// someone else wrote first.
    fn cas(
        &self,
        from: u64,
        doc: &Map<String, Value>,
        src: &str,
    ) -> Result<Option<u64>, StoreError> {
        let json = serde_json::to_string(doc).map_err(|e| store_error("encode", e))?;
        let (ok, v): (i64, u64) = self.fleet.run("write", |c| {
            Script::new(CAS)
                .key(self.rec_key())
                .arg(from)
                .arg(&json)
                .arg(&self.fleet.replica)
                .arg(clock::now_ms())
                .arg(src)
                .arg(self.fleet.channel())
                .arg(self.name())
                .invoke(c)
        })?;
        Ok((ok == 1).then_some(v))
    }

    /// Writes this replica's newer record back (Redis lost it, or restarted empty).
    fn reassert(&self) {
        let Some(doc) = self.doc.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return;
        };
        let v = self.seen.load(Ordering::Acquire);
        let Ok(json) = serde_json::to_string(&doc) else {
            return;
        };
        let src = self.src.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let put: Result<i64, _> = self.fleet.run("reassert", |c| {
            Script::new(REASSERT)
                .key(self.rec_key())
                .arg(v)
                .arg(&json)
                .arg(&self.fleet.replica)
                .arg(clock::now_ms())
                .arg(&src)
                .invoke(c)
        });
        if matches!(put, Ok(1)) {
            tracing::warn!(target: "tokenrelay::store", credential = %self.name(), version = v,
                "the fleet store had lost this credential's record (or held an older one); wrote this replica's back");
        }
    }

    /// Retries a write that could not land until it does, or another writer is ahead.
    fn retry_write(self: &Arc<Self>, from: u64, doc: Map<String, Value>) {
        if self.retrying.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            let mut wait = Duration::from_millis(200);
            loop {
                std::thread::sleep(wait);
                let src = me.src.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match me.cas(from, &doc, &src) {
                    Ok(Some(v)) => {
                        me.remember(v, doc);
                        tracing::info!(target: "tokenrelay::store", credential = %me.name(), version = v, "the delayed write landed");
                        break;
                    }
                    Ok(None) => break,
                    Err(_) => wait = (wait * 2).min(Duration::from_secs(5)),
                }
            }
            me.retrying.store(false, Ordering::Release);
        });
    }

    /// What the record says, for `/admin/credentials`.
    pub fn describe(&self) -> Value {
        let key = self.rec_key();
        let meta: Result<Vec<Option<String>>, _> = self.fleet.run("describe", |c| {
            redis::cmd("HMGET")
                .arg(&key)
                .arg("v")
                .arg("writer")
                .arg("updated_at")
                .query(c)
        });
        match meta {
            Ok(m) => serde_json::json!({
                "kind": "redis",
                "up": true,
                "version": m.first().cloned().flatten().and_then(|v| v.parse::<u64>().ok()),
                "last_writer": m.get(1).cloned().flatten(),
                "updated_at": m.get(2).cloned().flatten().and_then(|t| t.parse::<i64>().ok()).map(clock::rfc3339),
            }),
            Err(_) => serde_json::json!({"kind": "redis", "up": false, "version": self.version()}),
        }
    }

    /// Raises the fleet-wide cool-down (only if later) and tells the peers.
    pub fn share_cooldown(&self, model: Option<&str>, until_ms: i64) {
        let key = self.key("cool");
        let _: Result<i64, _> = self.fleet.run("cooldown", |c| {
            Script::new(COOL)
                .key(&key)
                .arg(model.unwrap_or("*"))
                .arg(until_ms)
                .arg(self.fleet.channel())
                .arg(self.name())
                .invoke(c)
        });
    }
}

/// The lease: renewed while held, released by compare-and-delete on drop. A renewal or
/// release after another replica took over is a no-op.
struct Lease {
    stop: Arc<AtomicBool>,
    fleet: Arc<Fleet>,
    key: String,
    value: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let (key, value) = (self.key.clone(), self.value.clone());
        let _: Result<i64, _> = self.fleet.run("release", |c| {
            Script::new(RELEASE).key(&key).arg(&value).invoke(c)
        });
    }
}

/// Releases or renews `lease` only if it still holds `value` (public for the takeover test).
pub fn release_if_held(fleet: &Fleet, key: &str, value: &str) -> Result<bool, StoreError> {
    let n: i64 = fleet.run("release", |c| {
        Script::new(RELEASE).key(key).arg(value).invoke(c)
    })?;
    Ok(n == 1)
}

pub fn renew_if_held(fleet: &Fleet, key: &str, value: &str, ms: u64) -> Result<bool, StoreError> {
    let n: i64 = fleet.run("renew", |c| {
        Script::new(RENEW).key(key).arg(value).arg(ms).invoke(c)
    })?;
    Ok(n == 1)
}

impl CredentialStore for RedisStore {
    fn location(&self) -> String {
        self.source_path.display().to_string()
    }

    fn load(&self) -> Result<CredentialFile, StoreError> {
        let source = std::fs::read(&self.source_path).ok();
        let src_fp = source.as_deref().map(fingerprint).unwrap_or_default();
        let rec: Result<HashMap<String, String>, _> =
            self.fleet.run("read", |c| c.hgetall(self.rec_key()));
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                // Redis is down: what this replica last read, else the file.
                if let Some(doc) = self.doc.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                    let json = serde_json::to_string(&doc).map_err(|e| store_error("encode", e))?;
                    return Ok(self.parse_doc(&json, clock::now_ms())?.0);
                }
                tracing::warn!(target: "tokenrelay::store", credential = %self.name(), error = %e, "fleet store unreachable; reading the file");
                return self.source.load();
            }
        };
        let v: u64 = rec.get("v").and_then(|v| v.parse().ok()).unwrap_or(0);
        if v < self.seen.load(Ordering::Acquire) {
            // Redis lost the record (restarted empty, failed over): ours is newer than
            // anything in the file; put it back rather than import a stale file.
            self.reassert();
            if let Some(doc) = self.doc.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                let json = serde_json::to_string(&doc).map_err(|e| store_error("encode", e))?;
                return Ok(self.parse_doc(&json, clock::now_ms())?.0);
            }
        }
        let recorded_src = rec.get("src").cloned().unwrap_or_default();
        let import = v == 0 || (!src_fp.is_empty() && recorded_src != src_fp);
        if import {
            let Some(bytes) = source else {
                return Err(StoreError::Io {
                    path: self.location(),
                    op: "import",
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no record in the fleet store and no file to import",
                    ),
                });
            };
            let (file, doc) =
                shape::parse(&bytes, clock::now_ms()).map_err(|source| StoreError::Parse {
                    path: self.location(),
                    source,
                })?;
            match self.cas(v, &doc, &src_fp)? {
                Some(new_v) => {
                    tracing::info!(target: "tokenrelay::store", credential = %self.name(), version = new_v,
                        first = v == 0, "imported the credential file into the fleet store");
                    *self.src.lock().unwrap_or_else(|p| p.into_inner()) = src_fp;
                    self.remember(new_v, doc);
                    return Ok(file);
                }
                // Another replica imported (or wrote) first: read what it wrote.
                None => return self.load(),
            }
        }
        let updated: i64 = rec
            .get("updated_at")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(clock::now_ms);
        let doc_json = rec.get("doc").cloned().unwrap_or_default();
        let (file, doc) = self.parse_doc(&doc_json, updated)?;
        *self.src.lock().unwrap_or_else(|p| p.into_inner()) = recorded_src;
        self.remember(v, doc);
        Ok(file)
    }

    fn save(&self, update: &TokenUpdate) -> Result<bool, StoreError> {
        let from = self.seen.load(Ordering::Acquire);
        let mut doc = match self.doc.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some(d) => d,
            None => return Err(store_error("write", "nothing was read before the write")),
        };
        if !shape::apply_update(&mut doc, update, clock::now_ms()) {
            return Ok(false);
        }
        let src = self.src.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // Commit first: this write happens before anything else that can fail or wait.
        match self.cas(from, &doc, &src) {
            Ok(Some(v)) => {
                self.remember(v, doc);
                Ok(true)
            }
            Ok(None) => Err(StoreError::Io {
                path: self.location(),
                op: "commit",
                source: std::io::Error::other(
                    "another replica committed a newer version first; adopting it",
                ),
            }),
            Err(e) => {
                // Keep it in memory (the lifecycle does) and land it when Redis is back.
                *self.doc.lock().unwrap_or_else(|p| p.into_inner()) = Some(doc.clone());
                if let Some(me) = self
                    .fleet
                    .stores
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&self.name())
                    .and_then(std::sync::Weak::upgrade)
                {
                    me.retry_write(from, doc);
                }
                Err(e)
            }
        }
    }

    fn writable(&self) -> bool {
        true
    }

    fn lock_required(&self) -> bool {
        self.rotating
    }

    fn try_lock(&self) -> Result<TryLock, StoreError> {
        let lease_ms = self.fleet.cfg.lease.as_millis() as u64;
        let fence: u64 = self.fleet.run("fence", |c| c.incr(self.key("fence"), 1))?;
        let value = format!(
            "{fence}:{}:{:08x}",
            self.fleet.replica,
            rand::random::<u32>()
        );
        let lease_key = self.key("lease");
        let got: Option<String> = self.fleet.run("lease", |c| {
            redis::cmd("SET")
                .arg(&lease_key)
                .arg(&value)
                .arg("NX")
                .arg("PX")
                .arg(lease_ms)
                .query(c)
        })?;
        if got.is_none() {
            return Ok(TryLock::Busy);
        }
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some((fence, value.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (stop, fleet, key, value) = (
                Arc::clone(&stop),
                Arc::clone(&self.fleet),
                lease_key.clone(),
                value.clone(),
            );
            std::thread::spawn(move || {
                let every = Duration::from_millis(lease_ms / 3).max(Duration::from_millis(100));
                loop {
                    std::thread::sleep(every);
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    if !matches!(renew_if_held(&fleet, &key, &value, lease_ms), Ok(true)) {
                        tracing::warn!(target: "tokenrelay::store", lease = %key, "lost the refresh lease (expired or taken over)");
                        return;
                    }
                }
            });
        }
        let guard: LockGuard = Box::new(Lease {
            stop,
            fleet: Arc::clone(&self.fleet),
            key: lease_key,
            value,
        });
        Ok(TryLock::Acquired(guard))
    }

    fn before_redeem(&self) -> Result<bool, StoreError> {
        let Some((fence, value)) = self.lease.lock().unwrap_or_else(|p| p.into_inner()).clone()
        else {
            return Ok(false);
        };
        let rec_key = self.rec_key();
        let lease_key = self.key("lease");
        let lease_ms = self.fleet.cfg.lease.as_millis() as u64;
        let (attempt, v): (Option<String>, Option<u64>) = self.fleet.run("read", |c| {
            redis::cmd("HMGET")
                .arg(&rec_key)
                .arg("attempt")
                .arg("v")
                .query::<(Option<String>, Option<u64>)>(c)
        })?;
        let v = v.unwrap_or(0);
        if v > self.seen.load(Ordering::Acquire) {
            return Ok(true);
        }
        // An earlier holder went to the token endpoint at this version and did not commit:
        // it may have spent the refresh token. Give its late write time to land.
        let earlier = attempt.as_deref().and_then(|a| {
            let mut parts = a.split(':');
            let f: u64 = parts.next()?.parse().ok()?;
            let at: u64 = parts.next()?.parse().ok()?;
            Some((f, at))
        });
        if let Some((f, at)) = earlier {
            if at == v && f != fence && self.rotating {
                tracing::info!(target: "tokenrelay::store", credential = %self.name(), attempt = ?attempt,
                    "an earlier refresh of this version did not commit; waiting for its write before spending the refresh token");
                let deadline = Instant::now() + self.fleet.cfg.grace;
                while Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(200));
                    let now_v: Option<u64> = self
                        .fleet
                        .run("read", |c| c.hget(&rec_key, "v"))
                        .unwrap_or(None);
                    if now_v.unwrap_or(0) > v {
                        return Ok(true);
                    }
                    let _ = renew_if_held(&self.fleet, &lease_key, &value, lease_ms);
                }
            }
        }
        let _: () = self.fleet.run("attempt", |c| {
            c.hset(&rec_key, "attempt", format!("{fence}:{v}"))
        })?;
        Ok(false)
    }

    fn share_cooldown(&self, model: Option<&str>, until_ms: i64) {
        RedisStore::share_cooldown(self, model, until_ms);
    }

    fn share_needs_reauth(&self, message: &str) {
        // Keyed by the version it was found at: a new record (a re-login) is not dead.
        let v = self.seen.load(Ordering::Acquire);
        let key = self.key("state");
        let channel = self.fleet.channel();
        let name = self.name();
        let _: Result<(), _> = self.fleet.run("state", |c| {
            redis::pipe()
                .hset(&key, "needs_reauth", format!("{v}|{message}"))
                .ignore()
                .publish(&channel, format!("{name} dead"))
                .ignore()
                .query(c)
        });
    }

    fn describe(&self) -> Option<Value> {
        Some(RedisStore::describe(self))
    }
}
