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
//!   only if later; field `~model` = its reason and scope as a small number.
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
//!
//! Files: `fleet.rs` (`Fleet` and what registers with it: `RedisStore`, `SharedKey`),
//! `poll.rs` (the poller and the subscriber), `record.rs` (`RedisStore` as a
//! `CredentialStore`, and its lease), `scripts.rs` (the Lua scripts), `counts.rs` (declared and client limits counted
//! fleet-wide), `usage.rs` (usage history).

pub mod counts;
mod fleet;
mod poll;
mod record;
mod scripts;
pub mod seal;
mod usage;

use std::time::Duration;

use secrecy::SecretString;

use crate::common::state::{CoolReason, CoolScope};

pub use self::counts::SharedCounts;
pub use self::fleet::{Fleet, RedisStore, SharedKey};
pub use self::record::{release_if_held, renew_if_held};
pub use self::usage::SharedUsage;
use super::StoreError;

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
    /// The one Redis call a request may wait for: counting it against a declared limit
    /// (`[providers.NAME.limits]`). Past this, the replica's own count decides.
    pub limit_timeout: Duration,
    /// Seals every credential record (32 bytes, base64; validated): `seal.rs`.
    pub encryption_key: Option<SecretString>,
    /// Keys records may still be sealed with; they are sealed again with the current one.
    pub previous_keys: Vec<SecretString>,
    /// The CA (PEM) that signed a `rediss://` server's certificate, instead of the public
    /// roots (a private CA).
    pub tls_ca: Option<std::path::PathBuf>,
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
        reason: CoolReason,
        scope: CoolScope,
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

/// A Redis error as an operator reads it: its kind, the server's code, and what to check.
/// Never the URL (its password).
pub fn explain(e: &redis::RedisError) -> String {
    let what = match (e.kind(), e.code()) {
        (redis::ErrorKind::AuthenticationFailed, _) | (_, Some("WRONGPASS" | "NOAUTH")) => {
            "the user or password in store.url was refused: check the ACL user (redis://user:password@host)"
        }
        (_, Some("NOPERM")) => {
            "the ACL user may not do this: grant it the rule README gives (its keys, its channel, scripts)"
        }
        (redis::ErrorKind::Io, _) => {
            "cannot reach it (with rediss://, a TLS failure is one: check store.tls_ca is the CA that signed the server's certificate)"
        }
        _ => e.category(),
    };
    match e.code() {
        Some(code) => format!("{what} ({code})"),
        None => what.to_string(),
    }
}

fn store_error(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        path: "redis".into(),
        op: "reach the fleet store",
        source: std::io::Error::other(format!("{what}: {e}")),
    }
}
