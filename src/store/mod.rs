//! Where credentials live. The token lifecycle talks to a [`CredentialStore`] (load, lock,
//! save) and never to the file system directly; [`FileStore`] is the first
//! implementation; [`redis::RedisStore`] shares credentials across a fleet of replicas
//! behind the same trait with the same guarantees.
//!
//! Store methods block (file I/O); callers run them on the blocking pool. Guarantees of
//! `FileStore`:
//! - `save` replaces a file atomically (temp file in the same directory, fsync, rename,
//!   fsync of the directory): a crash leaves the old or the new file, never a truncated
//!   one. Every field the file had survives; the mode is 0600 or stricter; symlinks are
//!   followed so the file they point at is replaced.
//! - `try_lock` is the protocol Qwen Code uses: `<stem>.lock` beside the file, created
//!   with O_EXCL, holding a random id; older than 30 s it is stale and is broken by
//!   renaming it aside first, so only the stale file is ever removed. A lock is released
//!   only by its owner (the id must match).
//! - A read-only source (a Kubernetes Secret mount) with a `state_dir` keeps refreshed
//!   tokens in `state_dir/<provider>/<id>.json` (0600), tagged with a fingerprint of the
//!   source. The copy is used while the source is unchanged; once the source changes (the
//!   user re-authenticated) the source wins.

pub mod file;
pub mod redis;
pub mod shape;
pub mod sqlite;
pub mod usage;

pub use file::{write_atomically, FileStore, LOCK_STALE_AFTER};

use shape::{CredentialFile, ParseError, TokenUpdate};

use crate::common::state::{CoolReason, CoolScope};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: cannot {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: ParseError,
    },
}

/// Held while refreshing; dropping it releases the lock.
pub type LockGuard = Box<dyn Send + Sync>;

pub enum TryLock {
    Acquired(LockGuard),
    /// Someone else holds it; try again shortly.
    Busy,
    /// The store cannot be locked (read-only directory): nobody else can write it either.
    Unavailable,
}

/// What a fleet tells its replicas about a credential besides its token: no-ops on one
/// machine. Called off the request path (these may wait on the network).
pub trait Shares: Send + Sync + 'static {
    /// Shares a cool-down (until, Unix ms; for a model or the whole credential), with why
    /// and for whom it was decided.
    fn share_cooldown(
        &self,
        _model: Option<&str>,
        _until_ms: i64,
        _reason: CoolReason,
        _scope: CoolScope,
    ) {
    }
    /// This credential's refresh token is dead: the others stop using it without spending
    /// a call each to find out.
    fn share_needs_reauth(&self, _message: &str) {}
    /// The upstream refused this credential (`Some(message)`), or an operator brought it
    /// back (`None`): the others take it out of rotation, or back in, without a request.
    fn share_invalid(&self, _message: Option<&str>) {}
}

/// What a store holds for one credential.
pub trait CredentialStore: Shares {
    /// Where it lives, for logs and the admin API (a path, never a secret).
    fn location(&self) -> String;
    /// Reads the credential as it is now.
    fn load(&self) -> Result<CredentialFile, StoreError>;
    /// Stores a refreshed token in the credential's own shape. `Ok(false)` when the
    /// stored shape has nothing to update.
    fn save(&self, update: &TokenUpdate) -> Result<bool, StoreError>;
    /// Whether the credential's own file can be written back (a read-only Kubernetes
    /// Secret mount cannot).
    fn writable(&self) -> bool;
    /// Whether refreshed tokens survive a restart (the file or a state copy).
    fn persistent(&self) -> bool {
        self.writable()
    }
    /// One attempt at the cross-process refresh lock.
    fn try_lock(&self) -> Result<TryLock, StoreError> {
        Ok(TryLock::Unavailable)
    }
    /// Whether refreshing without the lock is unsafe when the lock cannot be had (a
    /// rotating credential shared by a fleet: two refreshes would spend one refresh token).
    fn lock_required(&self) -> bool {
        false
    }
    /// Called under the lock right before the refresh token is spent. `Ok(true)`: the
    /// record moved meanwhile (re-read it instead of redeeming). Fleet mode marks the
    /// attempt here and, if an earlier holder's attempt at this version never committed,
    /// waits for its late write first.
    fn before_redeem(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// What the store knows about the record (version, last writer), for operators.
    fn describe(&self) -> Option<serde_json::Value> {
        None
    }
}
