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
//! - `…:state` — verdicts: `needs_reauth` = `v|message` (the record at version `v` has a
//!   dead refresh token), `invalid` = `tag|message` (the upstream refused the credential;
//!   an empty message: an operator brought it back). The tag is `v<version>` for a record
//!   and `k<fingerprint>` for an API key, so a verdict never outlives what it was about.
//!
//! API keys have no record (they are configuration), but their cool-downs and refusals are
//! shared the same way, through a `SharedKey`.
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
    /// A peer's verdict on the upstream refusing this credential (`Some`), or an operator
    /// bringing it back (`None`).
    Invalid {
        provider: String,
        id: String,
        message: Option<String>,
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
    /// Registered credentials, by `provider/id`, for the poller and the subscriber.
    members: Mutex<HashMap<String, Member>>,
    /// The `invalid` verdicts this replica wrote and nobody has replaced: written back if
    /// Redis loses them.
    verdicts: Mutex<HashMap<String, String>>,
}

#[derive(Clone)]
enum Member {
    Record(std::sync::Weak<RedisStore>),
    Key(std::sync::Weak<SharedKey>),
}

enum Live {
    Record(Arc<RedisStore>),
    Key(Arc<SharedKey>),
}

impl Member {
    fn upgrade(&self) -> Option<Live> {
        match self {
            Member::Record(w) => w.upgrade().map(Live::Record),
            Member::Key(w) => w.upgrade().map(Live::Key),
        }
    }
}

impl Live {
    /// What an `invalid` verdict must be tagged with to be about this credential as it is.
    fn tag(&self) -> String {
        match self {
            Live::Record(s) => format!("v{}", s.seen.load(Ordering::Acquire)),
            Live::Key(k) => k.tag.clone(),
        }
    }
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
            members: Mutex::default(),
            verdicts: Mutex::default(),
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

    /// The key `part` of credential `name` (`provider/id`), under its hash tag.
    fn key(&self, name: &str, part: &str) -> String {
        format!("{}:{{{name}}}:{part}", self.cfg.key_prefix)
    }

    fn register(&self, name: String, member: Member) {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, member);
    }

    fn member(&self, name: &str) -> Option<Live> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .and_then(Member::upgrade)
    }

    /// Raises the fleet-wide cool-down of `name` (only if later) and tells the peers.
    fn share_cooldown(&self, name: &str, model: Option<&str>, until_ms: i64) {
        let key = self.key(name, "cool");
        let _: Result<i64, _> = self.run("cooldown", |c| {
            Script::new(COOL)
                .key(&key)
                .arg(model.unwrap_or("*"))
                .arg(until_ms)
                .arg(self.channel())
                .arg(name)
                .invoke(c)
        });
    }

    /// Writes the `invalid` verdict on `name` as `tag` knows it and tells the peers.
    fn share_invalid(&self, name: &str, tag: &str, message: Option<&str>) {
        let key = self.key(name, "state");
        let value = format!("{tag}|{}", message.unwrap_or(""));
        let written: Result<(), _> = self.run("state", |c| {
            redis::pipe()
                .hset(&key, "invalid", &value)
                .ignore()
                .publish(self.channel(), format!("{name} verdict"))
                .ignore()
                .query(c)
        });
        let mut mine = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        match message {
            // Kept even when the write failed: the poller writes it once Redis is back.
            Some(_) => {
                mine.insert(name.to_string(), value);
            }
            None => {
                mine.remove(name);
            }
        }
        drop(mine);
        if written.is_err() {
            tracing::debug!(target: "tokenrelay::store", credential = %name, "the verdict waits for the fleet store");
        }
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
                    let Some((name, what)) = payload.rsplit_once(' ') else {
                        continue;
                    };
                    let Some(member) = self.member(name) else {
                        continue;
                    };
                    match (what, &member) {
                        ("cool" | "dead" | "verdict", _) => {
                            let _ = self.read_shared(name, &member);
                        }
                        (_, Live::Record(s)) => {
                            let _ = self.events.send(FleetEvent::Changed {
                                provider: s.provider.clone(),
                                id: s.id.clone(),
                            });
                        }
                        (_, Live::Key(_)) => {}
                    }
                }
                Err(e) if e.is_timeout() => continue,
                Err(_) => return,
            }
        }
    }

    /// One round: every record's version against ours (lost records re-asserted), and
    /// every credential's shared cool-downs and verdicts.
    fn poll_once(&self) {
        let members: Vec<(String, Live)> = {
            let mut map = self.members.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, m| m.upgrade().is_some());
            map.iter()
                .filter_map(|(n, m)| Some((n.clone(), m.upgrade()?)))
                .collect()
        };
        for (name, member) in members {
            if let Live::Record(s) = &member {
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
            }
            if self.read_shared(&name, &member).is_err() {
                return;
            }
        }
    }

    /// Peers' cool-downs and verdicts on one credential, in one round trip, applied here.
    fn read_shared(&self, name: &str, member: &Live) -> Result<(), StoreError> {
        let (provider, id) = name.split_once('/').unwrap_or((name, ""));
        let (cool_key, state_key) = (self.key(name, "cool"), self.key(name, "state"));
        let (cools, (dead, verdict)): (HashMap<String, i64>, (Option<String>, Option<String>)) =
            self.run("shared", |c| {
                redis::pipe()
                    .hgetall(&cool_key)
                    .cmd("HMGET")
                    .arg(&state_key)
                    .arg("needs_reauth")
                    .arg("invalid")
                    .query(c)
            })?;
        let now = clock::now_ms();
        for (model, until) in cools.into_iter().filter(|(_, u)| *u > now) {
            let _ = self.events.send(FleetEvent::Cooldown {
                provider: provider.into(),
                id: id.into(),
                model: (model != "*").then_some(model),
                until_ms: until,
            });
        }
        // Keyed by the version it was found at: a new record (a re-login) is not dead.
        if let (Live::Record(s), Some((v, message))) =
            (member, dead.as_deref().and_then(|d| d.split_once('|')))
        {
            if v.parse::<u64>().ok() == Some(s.seen.load(Ordering::Acquire)) {
                let _ = self.events.send(FleetEvent::NeedsReauth {
                    provider: provider.into(),
                    id: id.into(),
                    message: message.to_string(),
                });
            }
        }
        let mut mine = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        match verdict {
            Some(value) => {
                if mine.get(name).is_some_and(|m| *m != value) {
                    // Someone replaced this replica's verdict (an operator brought it back).
                    mine.remove(name);
                }
                drop(mine);
                if let Some((tag, message)) = value.split_once('|') {
                    if tag == member.tag() {
                        let _ = self.events.send(FleetEvent::Invalid {
                            provider: provider.into(),
                            id: id.into(),
                            message: (!message.is_empty()).then(|| message.to_string()),
                        });
                    }
                }
            }
            // Redis lost it (restarted empty): this replica's verdict goes back.
            None => {
                if let Some(value) = mine.get(name).cloned() {
                    drop(mine);
                    let _: Result<(), _> =
                        self.run("state", |c| c.hset(&state_key, "invalid", &value));
                }
            }
        }
        Ok(())
    }
}

/// A static API key in fleet mode. Keys are configuration, not records, but a key's
/// cool-downs and the upstream refusing it are shared like a record's.
pub struct SharedKey {
    fleet: Arc<Fleet>,
    name: String,
    /// `k` + 16 hex digits of the key's SHA-256: a verdict about the key an id named
    /// before the operator replaced it is not about this one.
    tag: String,
}

impl SharedKey {
    pub fn new(fleet: &Arc<Fleet>, provider: &str, id: &str, key: &SecretString) -> Arc<SharedKey> {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.expose_secret().as_bytes());
        let tag: String = std::iter::once("k".to_string())
            .chain(digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")))
            .collect();
        let shared = Arc::new(SharedKey {
            fleet: Arc::clone(fleet),
            name: format!("{provider}/{id}"),
            tag,
        });
        fleet.register(shared.name.clone(), Member::Key(Arc::downgrade(&shared)));
        shared
    }
}

impl super::Shares for SharedKey {
    fn share_cooldown(&self, model: Option<&str>, until_ms: i64) {
        self.fleet.share_cooldown(&self.name, model, until_ms);
    }

    fn share_invalid(&self, message: Option<&str>) {
        self.fleet.share_invalid(&self.name, &self.tag, message);
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
        fleet.register(store.name(), Member::Record(Arc::downgrade(&store)));
        store
    }

    fn name(&self) -> String {
        format!("{}/{}", self.provider, self.id)
    }

    fn key(&self, part: &str) -> String {
        self.fleet.key(&self.name(), part)
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

impl super::Shares for RedisStore {
    fn share_cooldown(&self, model: Option<&str>, until_ms: i64) {
        self.fleet.share_cooldown(&self.name(), model, until_ms);
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

    fn share_invalid(&self, message: Option<&str>) {
        let tag = format!("v{}", self.seen.load(Ordering::Acquire));
        self.fleet.share_invalid(&self.name(), &tag, message);
    }
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
                if let Some(Live::Record(me)) = self.fleet.member(&self.name()) {
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

    fn describe(&self) -> Option<Value> {
        Some(RedisStore::describe(self))
    }
}
