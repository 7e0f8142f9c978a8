//! `Credential`: one credential in a provider's pool: its token in memory, its status, and
//! how both are read. Refresh is in `refresh.rs`, the background schedule in `schedule.rs`.
//!
//! Invariants:
//! - The request path reads the current token from memory (`ArcSwap`): no lock, no I/O.
//! - At most one refresh per credential is in flight; every request waiting for it shares
//!   its outcome (success or failure), so N waiters cause one token-endpoint call.
//! - A refresh runs in its own task: a client that disconnects cannot cancel it between
//!   the token endpoint's answer and the write-back.
//! - A refresh token returned by the endpoint is saved to the store before the new access
//!   token is published; if saving fails it is kept in memory (never dropped).
//! - Before calling the endpoint the store is re-read: a token another writer stored is
//!   adopted instead of spending the refresh token again.
//! - Permanent failures (`needs_reauth`) stop automatic refresh until the file changes or a
//!   manual refresh succeeds; transient failures back off exponentially with jitter and
//!   never lead to `needs_reauth`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use secrecy::SecretString;
use tokio::time::Instant;

use super::state::Status;
use super::token::{fingerprint, token_from_file, Expiry, Token};
use crate::clock;
use crate::common::state::{Snapshot, State};
use crate::config::{ProviderConfig, RefreshConfig};
use crate::oauth::RefreshError;
use crate::store::redis::SharedKey;
use crate::store::shape::CredentialFile;
use crate::store::{CredentialStore, Shares};
use crate::telemetry::alert::{Alerter, Event, Kind};
use crate::telemetry::metrics::Metrics;

/// What the refresh machinery shares across credentials.
pub struct Refresher {
    pub client: reqwest::Client,
    pub config: RefreshConfig,
    pub metrics: Arc<Metrics>,
    pub alerter: Alerter,
    /// Consecutive transient failures before a `refresh_failing` alert.
    pub alert_after_failures: u32,
    /// How close to expiry a failing credential raises `expiring_soon`.
    pub expiry_warning: Duration,
    /// Where refreshes run: the long-lived main runtime, not a proxy thread's, so that
    /// stopping a proxy thread can never cut a refresh in half.
    pub runtime: Option<tokio::runtime::Handle>,
    /// Fleet mode: credentials live in Redis, shared with the other replicas.
    pub fleet: Option<Arc<crate::store::redis::Fleet>>,
}

impl Refresher {
    /// A refresher without alert webhooks.
    pub fn new(client: reqwest::Client, config: RefreshConfig, metrics: Arc<Metrics>) -> Refresher {
        let defaults = crate::config::AlertsConfig::default();
        Refresher {
            client,
            config,
            metrics,
            alerter: Alerter::default(),
            alert_after_failures: defaults.after_failures,
            expiry_warning: defaults.expiry_warning,
            runtime: tokio::runtime::Handle::try_current().ok(),
            fleet: None,
        }
    }
}

/// Where a credential's secret comes from.
pub enum Source {
    Store(Arc<dyn CredentialStore>),
    ApiKey,
}

/// One credential in a provider's pool.
pub struct Credential {
    pub provider: Arc<ProviderConfig>,
    pub id: String,
    /// `authorized_user`, `cli`, `generic`, `service_account` or `api_key`.
    pub kind: &'static str,
    pub(super) source: Source,
    /// Fleet mode: where the other replicas hear of its cool-downs and verdicts.
    peers: Option<Arc<dyn Shares>>,
    /// The Google Cloud project whose quota it spends: declared (`project =` on a key),
    /// from its file (`quota_project_id`, a service account's `project_id`), or learned
    /// from an answer that names it. Credentials of one project share its quota.
    pub project: ArcSwapOption<String>,
    /// Where declared limits count this credential when it has no project.
    own_scope: String,
    pub(super) refresher: Arc<Refresher>,
    pub(super) token: ArcSwap<Token>,
    pub(super) status: Mutex<Status>,
    pub(super) refreshing: AtomicBool,
    /// Serialises refresh attempts; waiters compare `attempts` to share an outcome.
    pub(super) gate: tokio::sync::Mutex<Option<Result<(), RefreshError>>>,
    pub(super) attempts: AtomicU64,
    /// Fingerprint of the refresh token the store held when we last read or wrote it. A
    /// different one in the store means another writer put it there; the same one after a
    /// failed save means the store is behind us and must not be adopted.
    pub(super) stored_refresh: AtomicU64,
    /// Wakes the background refresh (reload, retire, manual refresh).
    pub(super) wake: tokio::sync::Notify,
    pub(super) retired: AtomicBool,
    /// This credential's share of the refresh spread, in [0, 1).
    pub(super) jitter: f64,
    /// The request path's counter of this credential's upstream `200` answers, resolved on
    /// first use instead of a label lookup per request.
    pub upstream_ok: std::sync::OnceLock<prometheus::IntCounter>,
    /// Its id as the usage ledger keeps it, and its token counters
    /// (`tokenrelay_credential_tokens_total`), resolved on its first answer with usage.
    pub usage: std::sync::OnceLock<(Arc<str>, [prometheus::IntCounter; 4])>,
}

impl Credential {
    /// A credential backed by a store, from what the store holds now.
    pub fn from_store(
        provider: Arc<ProviderConfig>,
        id: String,
        store: Arc<dyn CredentialStore>,
        file: CredentialFile,
        refresher: Arc<Refresher>,
    ) -> Result<Credential, String> {
        let kind = file.shape.as_str();
        let token = token_from_file(&provider, &file, 0)?;
        let peers = refresher
            .fleet
            .is_some()
            .then(|| Arc::clone(&store) as Arc<dyn Shares>);
        let mut cred = Credential::new(provider, id, kind, Source::Store(store), token, refresher);
        cred.peers = peers;
        cred.project = ArcSwapOption::from(file_project(&file).map(Arc::new));
        cred.stored_refresh
            .store(fingerprint(file.refresh_token.as_ref()), Ordering::Relaxed);
        if let Some(problem) = cred.cannot_refresh_reason(&cred.token.load()) {
            let mut st = cred.lock_status();
            st.last_error = Some(problem.to_string());
            if !cred.token.load().is_valid(clock::now_ms()) {
                st.needs_reauth = true;
            }
        }
        Ok(cred)
    }

    /// A static API key: never expires, never refreshes.
    pub fn api_key(
        provider: Arc<ProviderConfig>,
        id: String,
        key: &SecretString,
        project: Option<String>,
        refresher: Arc<Refresher>,
    ) -> Credential {
        let token = Token {
            generation: 0,
            auth: provider.key_header.attach(key),
            access: Some(key.clone()),
            expiry: Expiry::Never,
            refresh: None,
            client_id: None,
            client_secret: None,
            resource_url: None,
            base: provider.upstream.clone(),
            upstream_headers: Vec::new(),
            service_account: None,
            account: None,
        };
        let peers = refresher
            .fleet
            .as_ref()
            .map(|f| SharedKey::new(f, &provider.name, &id, key) as Arc<dyn Shares>);
        let mut cred = Credential::new(provider, id, "api_key", Source::ApiKey, token, refresher);
        cred.peers = peers;
        cred.project = ArcSwapOption::from(project.map(Arc::new));
        cred
    }

    pub(super) fn new(
        provider: Arc<ProviderConfig>,
        id: String,
        kind: &'static str,
        source: Source,
        token: Token,
        refresher: Arc<Refresher>,
    ) -> Credential {
        Credential {
            own_scope: format!("credential:{id}"),
            provider,
            id,
            kind,
            source,
            peers: None,
            project: ArcSwapOption::empty(),
            refresher,
            token: ArcSwap::from_pointee(token),
            status: Mutex::new(Status::default()),
            refreshing: AtomicBool::new(false),
            gate: tokio::sync::Mutex::new(None),
            attempts: AtomicU64::new(0),
            stored_refresh: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            retired: AtomicBool::new(false),
            jitter: rand::random::<f64>(),
            upstream_ok: std::sync::OnceLock::new(),
            usage: std::sync::OnceLock::new(),
        }
    }

    /// Whether it left the pool (a reload removed it); requests in flight finish on it.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// The project whose quota this credential spends, if known.
    pub fn project(&self) -> Option<Arc<String>> {
        self.project.load_full()
    }

    /// What declared limits count this credential under when it has no project.
    pub fn own_scope(&self) -> &str {
        &self.own_scope
    }

    /// An answer named the project: remembered when none was known (a declared or filed
    /// project is not overwritten; Google names projects by number, files by id).
    pub fn learn_project(&self, project: &str) {
        if self.project.load().is_none() {
            self.project.store(Some(Arc::new(project.to_string())));
            tracing::info!(target: "tokenrelay::proxy", provider = %self.provider.name, credential = %self.id,
                project, "learned the credential's project from an upstream answer");
        }
    }

    pub fn location(&self) -> Option<String> {
        match &self.source {
            Source::Store(s) => Some(s.location()),
            Source::ApiKey => None,
        }
    }

    pub fn writable(&self) -> bool {
        match &self.source {
            Source::Store(s) => s.writable(),
            Source::ApiKey => false,
        }
    }

    pub fn is_api_key(&self) -> bool {
        matches!(self.source, Source::ApiKey)
    }

    /// The current token, from memory.
    pub fn current(&self) -> Arc<Token> {
        self.token.load_full()
    }

    pub(super) fn lock_status(&self) -> MutexGuard<'_, Status> {
        // A poisoned status only means a panic elsewhere; the data is still consistent
        // (every update is a plain assignment).
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why this credential cannot refresh at all, if it cannot.
    pub(super) fn cannot_refresh_reason(&self, token: &Token) -> Option<RefreshError> {
        if matches!(self.source, Source::ApiKey)
            || token.expiry == Expiry::Never
            || token.service_account.is_some()
        {
            return None;
        }
        if token.refresh.is_none() {
            return Some(RefreshError::NoRefreshToken);
        }
        if token.client_id.is_none() && self.provider.client_id.is_none() {
            return Some(RefreshError::NoClientId {
                provider: self.provider.name.clone(),
            });
        }
        None
    }

    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let now_ms = clock::now_ms();
        let token = self.token.load();
        let st = self.lock_status();
        let cooldown_remaining = st
            .cooldowns
            .iter()
            .find(|c| c.model.is_none())
            .and_then(|c| c.until.checked_duration_since(now))
            .filter(|d| !d.is_zero());
        let retry_in = st
            .retry_at
            .and_then(|t| t.checked_duration_since(now))
            .filter(|d| !d.is_zero());
        let valid = token.is_valid(now_ms);
        let cooldowns = self.cooldown_views(&st.cooldowns, now);
        let state = if st.invalid {
            State::Invalid
        } else if st.needs_reauth {
            State::NeedsReauth
        } else if cooldown_remaining.is_some() {
            State::CoolingDown
        } else if self.refreshing.load(Ordering::Relaxed) {
            State::Refreshing
        } else if st.consecutive_failures > 0 && st.last_error_transient {
            if valid {
                State::Backoff
            } else {
                State::Expired
            }
        } else {
            State::Ready
        };
        // Usable: can serve a request now, or can try to get a token for one now.
        let usable = match state {
            State::NeedsReauth | State::CoolingDown | State::Invalid => false,
            State::Expired => retry_in.is_none(),
            _ => true,
        };
        Snapshot {
            state,
            expires_at_ms: token.expires_at_ms(),
            last_refresh_at_ms: st.last_refresh_at_ms,
            // A broken file is what an operator must fix first; the token in memory serves.
            last_error: match (&st.source_error, &st.last_error) {
                (Some(s), Some(e)) => Some(format!("{s}; serving the token in memory. Also: {e}")),
                (Some(s), None) => Some(format!("{s}; serving the token in memory")),
                (None, e) => e.clone(),
            },
            consecutive_failures: st.consecutive_failures,
            cooldown_remaining,
            cooldowns,
            retry_in,
            usable,
        }
    }

    /// Whether a request may use this credential now (no network call to decide).
    pub fn is_usable(&self) -> bool {
        self.snapshot().usable
    }

    /// Tells the other replicas (fleet mode), off the request path: the request never
    /// waits on the store.
    pub(super) fn tell_peers(&self, f: impl FnOnce(&dyn Shares) + Send + 'static) {
        let Some(peers) = self.peers.clone() else {
            return;
        };
        let spawn = move || {
            tokio::task::spawn_blocking(move || f(peers.as_ref()));
        };
        match &self.refresher.runtime {
            Some(rt) => {
                let _guard = rt.enter();
                spawn();
            }
            None => spawn(),
        }
    }

    /// The store's own account of this credential (fleet mode: version, last writer).
    pub fn store_view(&self) -> Option<serde_json::Value> {
        match &self.source {
            Source::Store(s) => s.describe(),
            Source::ApiKey => None,
        }
    }

    /// Takes the credential out of rotation: the upstream refused it (`reason`, a protocol
    /// code) and `action` says what fixes it. Warns and alerts once per transition.
    pub fn mark_invalid(&self, reason: &str, action: &str) {
        let message = format!("the upstream refused this credential ({reason}); to fix: {action}");
        let first = {
            let mut st = self.lock_status();
            st.last_error = Some(message.clone());
            st.last_error_transient = false;
            !std::mem::replace(&mut st.invalid, true)
        };
        if first {
            tracing::warn!(target: "tokenrelay::proxy", provider = %self.provider.name, credential = %self.id,
                reason, action, "credential refused by the upstream; taking it out of rotation");
            let shared = message.clone();
            self.tell_peers(move |p| p.share_invalid(Some(&shared)));
            self.alert(Kind::Invalid, message);
        }
    }

    /// A peer's verdict (fleet mode): refused by the upstream (`Some`), out of rotation
    /// here too without a request to learn it; or brought back by an operator (`None`).
    pub fn invalid_from_peer(&self, message: Option<&str>) {
        let Some(m) = message else {
            if self.lift_invalid() {
                tracing::info!(target: "tokenrelay::proxy", provider = %self.provider.name, credential = %self.id,
                    "brought back into rotation by another replica");
            }
            return;
        };
        let mut st = self.lock_status();
        if std::mem::replace(&mut st.invalid, true) {
            return;
        }
        st.last_error = Some(format!("{m} (found by another replica)"));
        st.last_error_transient = false;
        drop(st);
        tracing::warn!(target: "tokenrelay::proxy", provider = %self.provider.name, credential = %self.id,
            "another replica found this credential refused by the upstream; taking it out of rotation");
    }

    /// A peer found the refresh token dead (fleet mode): out of rotation here too, with its
    /// reason; a new record (a re-login) brings it back as a local failure would.
    pub fn needs_reauth_from_peer(&self, message: &str) {
        let first = {
            let mut st = self.lock_status();
            if st.needs_reauth {
                return;
            }
            st.needs_reauth = true;
            st.retry_at = None;
            st.last_error = Some(format!("{message} (found by another replica)"));
            st.last_error_transient = false;
            !std::mem::replace(&mut st.alerted.reauth, true)
        };
        if first {
            tracing::error!(target: "tokenrelay::refresh", provider = %self.provider.name, credential = %self.id,
                error = message, "another replica found the refresh token dead; the credential needs re-authentication");
        }
    }

    /// Brings an `invalid` credential back (its key or file changed, or a manual refresh),
    /// here and (fleet mode) in every replica.
    pub(super) fn clear_invalid(&self) {
        if self.lift_invalid() {
            self.tell_peers(|p| p.share_invalid(None));
        }
    }

    /// Back in rotation here; whether it was `invalid`.
    fn lift_invalid(&self) -> bool {
        let mut st = self.lock_status();
        let was = std::mem::replace(&mut st.invalid, false);
        if was {
            st.last_error = None;
            st.cooldowns.clear();
        }
        was
    }

    pub(super) fn alert(&self, kind: Kind, message: String) {
        self.refresher.alerter.send(Event {
            kind,
            provider: self.provider.name.clone(),
            credential: self.id.clone(),
            message,
        });
    }
}

/// The project a credential file names: an ADC file's `quota_project_id`, else a service
/// account's `project_id`.
pub(super) fn file_project(file: &CredentialFile) -> Option<String> {
    file.quota_project_id
        .clone()
        .or_else(|| file.project_id.clone())
}
