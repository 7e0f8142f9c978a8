//! `Fleet`: one process's connection to Redis and the credentials registered with it:
//! `RedisStore` (one credential's record: compare-and-set, re-assert, delayed writes) and
//! `SharedKey` (an API key's shared cool-downs and verdicts).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

use super::scripts::{CAS, COOL, REASSERT, RESEAL};
use super::{store_error, FleetEvent, FleetMetrics, RedisConfig};
use crate::clock;
use crate::common::state::{CoolReason, CoolScope};
use crate::store::shape::{self, CredentialFile};
use crate::store::{FileStore, Shares, StoreError};

/// A record's key, and whether it opened sealed with the current key (or why it did not).
pub type RecordCheck = (String, Result<bool, String>);

/// One process's connection to the fleet: shared by every `RedisStore`.
pub struct Fleet {
    pub(super) client: redis::Client,
    conn: Mutex<Option<redis::Connection>>,
    pub(super) cfg: RedisConfig,
    /// `hostname-pid-random`: who wrote a record, who holds a lease.
    pub replica: String,
    up: AtomicBool,
    metrics: Arc<dyn FleetMetrics>,
    pub(super) events: tokio::sync::broadcast::Sender<FleetEvent>,
    /// Registered credentials, by `provider/id`, for the poller and the subscriber.
    pub(super) members: Mutex<HashMap<String, Member>>,
    /// The `invalid` verdicts this replica wrote and nobody has replaced: written back if
    /// Redis loses them.
    pub(super) verdicts: Mutex<HashMap<String, String>>,
    /// The connection that counts limits, opened on first need.
    counts: std::sync::OnceLock<Arc<super::SharedCounts>>,
    /// Seals credential records (`store.encryption_key`); `None`: stored plain.
    pub(super) sealer: Option<super::seal::Sealer>,
}

#[derive(Clone)]
pub(super) enum Member {
    Record(std::sync::Weak<RedisStore>),
    Key(std::sync::Weak<SharedKey>),
}

pub(super) enum Live {
    Record(Arc<RedisStore>),
    Key(Arc<SharedKey>),
}

impl Member {
    pub(super) fn upgrade(&self) -> Option<Live> {
        match self {
            Member::Record(w) => w.upgrade().map(Live::Record),
            Member::Key(w) => w.upgrade().map(Live::Key),
        }
    }
}

impl Live {
    /// What an `invalid` verdict must be tagged with to be about this credential as it is.
    pub(super) fn tag(&self) -> String {
        match self {
            Live::Record(s) => format!("v{}", s.seen.load(Ordering::Acquire)),
            Live::Key(k) => k.tag.clone(),
        }
    }
}

impl Fleet {
    /// Connects lazily: a Redis that is down at start-up is reported, not fatal.
    pub fn new(cfg: RedisConfig, metrics: Arc<dyn FleetMetrics>) -> Result<Arc<Fleet>, String> {
        let client = match &cfg.tls_ca {
            None => redis::Client::open(cfg.url.expose_secret()),
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("store.tls_ca {}: cannot read: {e}", ca.display()))?;
                redis::Client::build_with_tls(
                    cfg.url.expose_secret(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
        }
        .map_err(|e| format!("store.url or store.tls_ca cannot be used: {}", e.category()))?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "replica".into());
        let replica = format!(
            "{host}-{}-{:04x}",
            std::process::id(),
            rand::random::<u16>()
        );
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let key = |k: &SecretString| {
            super::seal::parse_key(k).map_err(|p| format!("store.encryption_key {p}"))
        };
        let sealer = match &cfg.encryption_key {
            Some(current) => {
                let previous = cfg
                    .previous_keys
                    .iter()
                    .map(key)
                    .collect::<Result<Vec<_>, _>>()?;
                Some(super::seal::Sealer::new(&key(current)?, &previous))
            }
            None => {
                tracing::warn!(target: "tokenrelay::store",
                    "fleet mode without store.encryption_key: credential records (refresh tokens included) are stored in Redis unsealed; set one (openssl rand -base64 32)");
                None
            }
        };
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
            counts: std::sync::OnceLock::new(),
            sealer,
        }))
    }

    /// Fleet-wide counts of declared limits, on a connection of their own.
    pub fn counts(&self) -> Arc<super::SharedCounts> {
        Arc::clone(self.counts.get_or_init(|| {
            super::SharedCounts::new(
                self.client.clone(),
                format!("{}:lim", self.cfg.key_prefix),
                self.cfg.limit_timeout,
                self.cfg.op_timeout,
            )
        }))
    }

    /// Usage history for the fleet, on a connection of its own.
    pub fn usage(&self) -> Arc<super::SharedUsage> {
        Arc::new(super::SharedUsage::new(
            self.client.clone(),
            format!("{}:use", self.cfg.key_prefix),
            self.cfg.op_timeout,
        ))
    }

    pub fn config(&self) -> &RedisConfig {
        &self.cfg
    }

    /// Connects and pings (for `tokenrelay check`): what is wrong, if anything.
    pub fn ping(&self) -> Result<(), String> {
        let mut conn = self
            .client
            .get_connection_with_timeout(self.cfg.op_timeout)
            .map_err(|e| super::explain(&e))?;
        redis::cmd("PING")
            .query::<String>(&mut conn)
            .map(|_| ())
            .map_err(|e| super::explain(&e))
    }

    /// Every credential record's key and what it holds, opened with the configured keys
    /// (for `tokenrelay check`): (record, Ok(sealed with the current key) or the error).
    pub fn check_records(&self) -> Result<Vec<RecordCheck>, String> {
        let mut conn = self
            .client
            .get_connection_with_timeout(self.cfg.op_timeout)
            .map_err(|e| super::explain(&e))?;
        let pattern = format!("{}:*:rec", self.cfg.key_prefix);
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query(&mut conn)
            .map_err(|e| super::explain(&e))?;
        let mut out = Vec::new();
        for key in keys {
            let doc: Option<String> = redis::cmd("HGET")
                .arg(&key)
                .arg("doc")
                .query(&mut conn)
                .map_err(|e| super::explain(&e))?;
            let Some(doc) = doc else { continue };
            let opened = super::seal::open(self.sealer.as_ref(), &doc, &key)
                .map(|o| matches!(o, super::seal::Opened::Current(_)) && self.sealer.is_some())
                .map_err(|e| e.to_string());
            out.push((key, opened));
        }
        Ok(out)
    }

    /// The current sealing key's id, if records are sealed (for `/readyz`).
    pub fn sealed_with(&self) -> Option<&str> {
        self.sealer.as_ref().map(|s| s.key_id())
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<FleetEvent> {
        self.events.subscribe()
    }

    pub(super) fn channel(&self) -> String {
        format!("{}:updates", self.cfg.key_prefix)
    }

    /// The key `part` of credential `name` (`provider/id`), under its hash tag.
    pub(super) fn key(&self, name: &str, part: &str) -> String {
        format!("{}:{{{name}}}:{part}", self.cfg.key_prefix)
    }

    fn register(&self, name: String, member: Member) {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, member);
    }

    pub(super) fn member(&self, name: &str) -> Option<Live> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .and_then(Member::upgrade)
    }

    /// Raises the fleet-wide cool-down of `name` (only if later) and tells the peers.
    fn share_cooldown(
        &self,
        name: &str,
        model: Option<&str>,
        until_ms: i64,
        reason: CoolReason,
        scope: CoolScope,
    ) {
        let why = why_code(reason, scope);
        let key = self.key(name, "cool");
        let _: Result<i64, _> = self.run("cooldown", |c| {
            Script::new(COOL)
                .key(&key)
                .arg(model.unwrap_or("*"))
                .arg(until_ms)
                .arg(self.channel())
                .arg(name)
                .arg(why)
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
    pub(super) fn run<T>(
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
                    return Err(store_error("connect", super::explain(&e)));
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
                Err(store_error(op, super::explain(&e)))
            }
        }
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

impl Shares for SharedKey {
    fn share_cooldown(
        &self,
        model: Option<&str>,
        until_ms: i64,
        reason: CoolReason,
        scope: CoolScope,
    ) {
        self.fleet
            .share_cooldown(&self.name, model, until_ms, reason, scope);
    }

    fn share_invalid(&self, message: Option<&str>) {
        self.fleet.share_invalid(&self.name, &self.tag, message);
    }
}

/// One credential in the fleet store.
/// (Its `CredentialStore` side and lease are in `record.rs`.)
pub struct RedisStore {
    pub(super) fleet: Arc<Fleet>,
    /// The source file credentials enter the fleet from (read, never written).
    pub(super) source: FileStore,
    pub(super) source_path: PathBuf,
    pub(super) provider: String,
    pub(super) id: String,
    /// Whether refreshing without the lease could spend a rotating refresh token twice.
    pub(super) rotating: bool,
    /// The version this replica last read or wrote: writes are derived from it.
    pub(super) seen: AtomicU64,
    pub(super) doc: Mutex<Option<Map<String, Value>>>,
    /// The source's fingerprint as recorded.
    pub(super) src: Mutex<String>,
    /// A committed token whose write has not landed (Redis was down): retried.
    retrying: AtomicBool,
    /// The lease this replica holds now (fence, value), for the attempt marker.
    pub(super) lease: Mutex<Option<(u64, String)>>,
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

    pub(super) fn name(&self) -> String {
        format!("{}/{}", self.provider, self.id)
    }

    pub(super) fn key(&self, part: &str) -> String {
        self.fleet.key(&self.name(), part)
    }

    pub(super) fn rec_key(&self) -> String {
        self.key("rec")
    }

    /// The record's version, as this replica last saw it.
    pub fn version(&self) -> u64 {
        self.seen.load(Ordering::Acquire)
    }

    pub(super) fn remember(&self, v: u64, doc: Map<String, Value>) {
        self.seen.store(v, Ordering::Release);
        *self.doc.lock().unwrap_or_else(|p| p.into_inner()) = Some(doc);
    }

    pub(super) fn parse_doc(
        &self,
        doc: &str,
        updated_at_ms: i64,
    ) -> Result<(CredentialFile, Map<String, Value>), StoreError> {
        shape::parse(doc.as_bytes(), updated_at_ms).map_err(|source| StoreError::Parse {
            path: format!("redis record {}", self.name()),
            source,
        })
    }

    /// The document as it goes to Redis: sealed for this record when a key is set.
    fn sealed(&self, json: String) -> Result<String, StoreError> {
        match &self.fleet.sealer {
            Some(s) => s
                .seal(&json, &self.rec_key())
                .map_err(|e| store_error("seal", e)),
            None => Ok(json),
        }
    }

    /// The document a record holds, opened; `true` when it must be sealed again (plain,
    /// or sealed with a previous key). An error names the record and what to do.
    pub(super) fn opened(&self, stored: &str) -> Result<(String, bool), StoreError> {
        match super::seal::open(self.fleet.sealer.as_ref(), stored, &self.rec_key()) {
            Ok(super::seal::Opened::Current(json)) => Ok((json, false)),
            Ok(super::seal::Opened::Stale(json)) => Ok((json, true)),
            Err(e) => Err(StoreError::Io {
                path: format!("redis record {} ({})", self.name(), self.rec_key()),
                op: "open",
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    /// Seals the record again with the current key, in place, if it is still version `v`
    /// holding `stored` (see `RESEAL`: no new version, nothing published).
    pub(super) fn reseal(&self, v: u64, stored: &str, doc: &Map<String, Value>) -> bool {
        let Ok(json) = serde_json::to_string(doc) else {
            return false;
        };
        let Ok(sealed) = self.sealed(json) else {
            return false;
        };
        let put: Result<i64, _> = self.fleet.run("reseal", |c| {
            Script::new(RESEAL)
                .key(self.rec_key())
                .arg(v)
                .arg(stored)
                .arg(&sealed)
                .invoke(c)
        });
        matches!(put, Ok(1))
    }

    /// Compare-and-set from version `from`; `Ok(Some(v))` the new version, `Ok(None)`
    /// someone else wrote first.
    pub(super) fn cas(
        &self,
        from: u64,
        doc: &Map<String, Value>,
        src: &str,
    ) -> Result<Option<u64>, StoreError> {
        let json = serde_json::to_string(doc).map_err(|e| store_error("encode", e))?;
        let json = self.sealed(json)?;
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
    pub(super) fn reassert(&self) {
        let Some(doc) = self.doc.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return;
        };
        let v = self.seen.load(Ordering::Acquire);
        let Ok(json) = serde_json::to_string(&doc) else {
            return;
        };
        let Ok(json) = self.sealed(json) else {
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
    pub(super) fn retry_write(self: &Arc<Self>, from: u64, doc: Map<String, Value>) {
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

impl Shares for RedisStore {
    fn share_cooldown(
        &self,
        model: Option<&str>,
        until_ms: i64,
        reason: CoolReason,
        scope: CoolScope,
    ) {
        self.fleet
            .share_cooldown(&self.name(), model, until_ms, reason, scope);
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

/// A cool-down's reason and scope as one small number (the `~model` field).
pub(super) fn why_code(reason: CoolReason, scope: CoolScope) -> i64 {
    let r = CoolReason::ALL
        .iter()
        .position(|x| *x == reason)
        .unwrap_or(0);
    let s = CoolScope::ALL.iter().position(|x| *x == scope).unwrap_or(0);
    (r * CoolScope::ALL.len() + s) as i64
}

/// The reason and scope of a `~model` field (a bare or unknown one: `retry_after`,
/// `credential`).
pub(super) fn why_of(code: Option<i64>) -> (CoolReason, CoolScope) {
    let n = CoolScope::ALL.len();
    code.and_then(|c| usize::try_from(c).ok())
        .and_then(|c| Some((*CoolReason::ALL.get(c / n)?, CoolScope::ALL[c % n])))
        .unwrap_or((CoolReason::RetryAfter, CoolScope::Credential))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_scopes_survive_their_code() {
        for r in CoolReason::ALL {
            for s in CoolScope::ALL {
                assert_eq!(why_of(Some(why_code(r, s))), (r, s));
            }
        }
        assert_eq!(
            why_of(None),
            (CoolReason::RetryAfter, CoolScope::Credential)
        );
        assert_eq!(
            why_of(Some(99)),
            (CoolReason::RetryAfter, CoolScope::Credential)
        );
    }
}
