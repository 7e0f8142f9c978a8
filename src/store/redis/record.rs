//! `RedisStore` as a `CredentialStore`: load (import from the file only when it changed,
//! re-assert after Redis lost the record), the compare-and-set save, the fenced lease
//! renewed while held, and the attempt marker checked before a refresh token is spent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Commands, Script};
use serde_json::Value;

use super::fleet::{Fleet, Live, RedisStore};
use super::scripts::{RELEASE, RENEW};
use super::store_error;
use crate::clock;
use crate::store::file::fingerprint;
use crate::store::shape::{self, CredentialFile, TokenUpdate};
use crate::store::{CredentialStore, LockGuard, StoreError, TryLock};

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
        if import && v > 0 {
            // A changed file replaces the record, but never one sealed with a key this
            // replica lacks (its peers' record would be lost to a replica misconfigured).
            // A record that is corrupt or bound to another name may be replaced: that is
            // the remedy its error names.
            let stored = rec.get("doc").cloned().unwrap_or_default();
            match super::seal::open(self.fleet.sealer.as_ref(), &stored, &self.rec_key()) {
                Err(
                    e @ (super::seal::SealError::NoKey | super::seal::SealError::UnknownKey(_)),
                ) => {
                    return Err(StoreError::Io {
                        path: format!("redis record {} ({})", self.name(), self.rec_key()),
                        op: "open",
                        source: std::io::Error::other(format!(
                            "{e}; the changed credential file was not imported over it"
                        )),
                    });
                }
                Err(e) => {
                    tracing::warn!(target: "tokenrelay::store", credential = %self.name(), error = %e,
                        "the record does not open; the changed credential file replaces it");
                }
                Ok(_) => {}
            }
        }
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
        let stored = rec.get("doc").cloned().unwrap_or_default();
        let (doc_json, stale) = self.opened(&stored)?;
        let (file, doc) = self.parse_doc(&doc_json, updated)?;
        *self.src.lock().unwrap_or_else(|p| p.into_inner()) = recorded_src.clone();
        if stale && self.reseal(v, &stored, &doc) {
            // Plain, or sealed with a previous key: sealed again with the current one, in
            // place (the same version: a refresh in flight commits as it would have).
            tracing::info!(target: "tokenrelay::store", credential = %self.name(), version = v,
                "sealed the credential's record with the current store.encryption_key");
        }
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
