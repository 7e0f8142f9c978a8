//! The token lifecycle of one credential: the token in memory, its state, and refresh.
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

use arc_swap::ArcSwap;
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use url::Url;

use crate::alert::{Alerter, Event, Kind};
use crate::clock;
use crate::config::{ProviderConfig, RefreshConfig};
use crate::credential::{CredentialFile, ServiceAccountKey, Shape, TokenUpdate};
use crate::metrics::Metrics;
use crate::oauth::{self, Grant, RefreshError};
use crate::store::{CredentialStore, LockGuard, TryLock};

/// When the access token stops working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Static API keys and tokens without an expiry and nothing to refresh them with.
    Never,
    /// Unix milliseconds.
    At(i64),
    /// No token, or a token whose lifetime is unknown but which can be refreshed.
    Unknown,
}

/// An immutable snapshot of a credential's token; replaced whole on refresh.
pub struct Token {
    /// Increases with every replacement; a 401 on generation `g` refreshes only if the
    /// token is still generation `g`.
    pub generation: u64,
    access: Option<SecretString>,
    /// `Authorization: Bearer …`, built once, marked sensitive.
    pub bearer: Option<HeaderValue>,
    pub expiry: Expiry,
    refresh: Option<SecretString>,
    client_id: Option<String>,
    client_secret: Option<SecretString>,
    resource_url: Option<String>,
    /// Where requests with this token go.
    pub base: Url,
    /// `x-goog-user-project` from an ADC `quota_project_id`.
    pub user_project: Option<HeaderValue>,
    /// Service accounts mint tokens with their key instead of a refresh token.
    service_account: Option<ServiceAccountKey>,
}

impl Token {
    /// Whether the token stays valid for at least `min_validity` from `now_ms`.
    pub fn is_fresh(&self, now_ms: i64, min_validity: Duration) -> bool {
        self.bearer.is_some()
            && match self.expiry {
                Expiry::Never => true,
                Expiry::At(t) => t - now_ms >= min_validity.as_millis() as i64,
                Expiry::Unknown => false,
            }
    }

    /// Whether it is valid at all right now.
    pub fn is_valid(&self, now_ms: i64) -> bool {
        self.is_fresh(now_ms, Duration::ZERO)
    }

    pub fn expires_at_ms(&self) -> Option<i64> {
        match self.expiry {
            Expiry::At(t) => Some(t),
            _ => None,
        }
    }

    fn same_access(&self, other: &Token) -> bool {
        match (&self.access, &other.access) {
            (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
            (None, None) => true,
            _ => false,
        }
    }

    fn same_refresh(&self, other: &Token) -> bool {
        match (&self.refresh, &other.refresh) {
            (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
            (None, None) => true,
            _ => false,
        }
    }
}

fn bearer(token: &SecretString) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret())).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// The upstream base for a credential: its `resource_url` (scheme added when missing) or
/// the provider's `upstream`. A `resource_url` must be https without userinfo, unless the
/// provider's own upstream is http.
pub fn base_url(provider: &ProviderConfig, resource_url: Option<&str>) -> Result<Url, String> {
    let Some(r) = resource_url else {
        return Ok(provider.upstream.clone());
    };
    let with_scheme = if r.contains("://") {
        r.to_string()
    } else {
        format!("https://{r}")
    };
    let url =
        Url::parse(&with_scheme).map_err(|e| format!("resource_url {r:?} is not a URL: {e}"))?;
    let scheme_ok =
        url.scheme() == "https" || (url.scheme() == "http" && provider.allows_http_resource_url());
    if !scheme_ok {
        return Err(format!(
            "resource_url {r:?} must use https (http only when providers.{}.upstream is http)",
            provider.name
        ));
    }
    if url.host().is_none() || !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "resource_url {r:?} must name a host and carry no user name or password"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "resource_url {r:?} must not carry a query or fragment"
        ));
    }
    Ok(url)
}

/// The states of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Ready,
    Refreshing,
    Backoff,
    CoolingDown,
    Expired,
    NeedsReauth,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Ready,
        State::Refreshing,
        State::Backoff,
        State::CoolingDown,
        State::Expired,
        State::NeedsReauth,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::Refreshing => "refreshing",
            State::Backoff => "backoff",
            State::CoolingDown => "cooling_down",
            State::Expired => "expired",
            State::NeedsReauth => "needs_reauth",
        }
    }
}

#[derive(Debug, Default)]
struct Status {
    needs_reauth: bool,
    consecutive_failures: u32,
    /// The last failure, as a message fit for operators (no secrets).
    last_error: Option<String>,
    /// Whether the last failure was a transient token-endpoint failure.
    last_error_transient: bool,
    last_refresh_at_ms: Option<i64>,
    /// No automatic refresh attempt before this (transient backoff).
    retry_at: Option<Instant>,
    /// Not used for requests before this (upstream 429).
    cooldown_until: Option<Instant>,
    /// Alerts already sent for the current trouble: one message per transition.
    alerted: Alerted,
}

#[derive(Debug, Default)]
struct Alerted {
    reauth: bool,
    failing: bool,
    expiring: bool,
    persist: bool,
}

/// A read-only view of a credential's status, for the admin API, metrics and errors.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: State,
    pub expires_at_ms: Option<i64>,
    pub last_refresh_at_ms: Option<i64>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub cooldown_remaining: Option<Duration>,
    pub retry_in: Option<Duration>,
    pub usable: bool,
}

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
}

impl Refresher {
    /// A refresher without alert webhooks.
    pub fn new(client: reqwest::Client, config: RefreshConfig, metrics: Arc<Metrics>) -> Refresher {
        let defaults = crate::alert::AlertsConfig::default();
        Refresher {
            client,
            config,
            metrics,
            alerter: Alerter::default(),
            alert_after_failures: defaults.after_failures,
            expiry_warning: defaults.expiry_warning,
            runtime: tokio::runtime::Handle::try_current().ok(),
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
    source: Source,
    refresher: Arc<Refresher>,
    token: ArcSwap<Token>,
    status: Mutex<Status>,
    refreshing: AtomicBool,
    /// Serialises refresh attempts; waiters compare `attempts` to share an outcome.
    gate: tokio::sync::Mutex<Option<Result<(), RefreshError>>>,
    attempts: AtomicU64,
    /// Fingerprint of the refresh token the store held when we last read or wrote it. A
    /// different one in the store means another writer put it there; the same one after a
    /// failed save means the store is behind us and must not be adopted.
    stored_refresh: AtomicU64,
    /// Wakes the background refresh (reload, retire, manual refresh).
    wake: tokio::sync::Notify,
    retired: AtomicBool,
    /// This credential's share of the refresh spread, in [0, 1).
    jitter: f64,
}

/// What a caller needs from a refresh.
#[derive(Clone, Copy)]
enum Want {
    /// A token fresh for `min_validity`.
    Fresh,
    /// A token other than generation `g` (which upstream rejected).
    Replace(u64),
    /// A token-endpoint call even if the token is fresh (manual refresh).
    Forced,
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
        let cred = Credential::new(provider, id, kind, Source::Store(store), token, refresher);
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
        refresher: Arc<Refresher>,
    ) -> Credential {
        let token = Token {
            generation: 0,
            bearer: bearer(key),
            access: Some(key.clone()),
            expiry: Expiry::Never,
            refresh: None,
            client_id: None,
            client_secret: None,
            resource_url: None,
            base: provider.upstream.clone(),
            user_project: None,
            service_account: None,
        };
        Credential::new(provider, id, "api_key", Source::ApiKey, token, refresher)
    }

    fn new(
        provider: Arc<ProviderConfig>,
        id: String,
        kind: &'static str,
        source: Source,
        token: Token,
        refresher: Arc<Refresher>,
    ) -> Credential {
        Credential {
            provider,
            id,
            kind,
            source,
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

    fn lock_status(&self) -> MutexGuard<'_, Status> {
        // A poisoned status only means a panic elsewhere; the data is still consistent
        // (every update is a plain assignment).
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why this credential cannot refresh at all, if it cannot.
    fn cannot_refresh_reason(&self, token: &Token) -> Option<RefreshError> {
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
            .cooldown_until
            .and_then(|t| t.checked_duration_since(now))
            .filter(|d| !d.is_zero());
        let retry_in = st
            .retry_at
            .and_then(|t| t.checked_duration_since(now))
            .filter(|d| !d.is_zero());
        let valid = token.is_valid(now_ms);
        let state = if st.needs_reauth {
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
            State::NeedsReauth | State::CoolingDown => false,
            State::Expired => retry_in.is_none(),
            _ => true,
        };
        Snapshot {
            state,
            expires_at_ms: token.expires_at_ms(),
            last_refresh_at_ms: st.last_refresh_at_ms,
            last_error: st.last_error.clone(),
            consecutive_failures: st.consecutive_failures,
            cooldown_remaining,
            retry_in,
            usable,
        }
    }

    /// Whether a request may use this credential now (no network call to decide).
    pub fn is_usable(&self) -> bool {
        self.snapshot().usable
    }

    /// Keeps the credential out of rotation for `d` (an upstream rate limit).
    pub fn cool_down(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut st = self.lock_status();
        if st.cooldown_until.is_none_or(|u| u < until) {
            st.cooldown_until = Some(until);
        }
    }

    /// A token valid for at least `refresh.min_validity`, refreshed inline if needed. If
    /// the refresh fails, a token that is still valid is used while it lasts.
    pub async fn fresh_token(self: &Arc<Self>) -> Result<Arc<Token>, RefreshError> {
        let token = self.token.load_full();
        if token.is_fresh(clock::now_ms(), self.refresher.config.min_validity) {
            return Ok(token);
        }
        match self.refresh_shared(Want::Fresh).await {
            Ok(t) => Ok(t),
            Err(e) => {
                let current = self.token.load_full();
                if current.is_valid(clock::now_ms()) && !self.lock_status().needs_reauth {
                    Ok(current)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// After upstream rejected generation `rejected`: a different token, refreshing only if
    /// no one has replaced it meanwhile. `None` when this credential cannot refresh.
    pub async fn replace_token(
        self: &Arc<Self>,
        rejected: u64,
    ) -> Option<Result<Arc<Token>, RefreshError>> {
        if self.is_api_key() || self.token.load().expiry == Expiry::Never {
            return None;
        }
        Some(self.refresh_shared(Want::Replace(rejected)).await)
    }

    /// A manual refresh: calls the token endpoint even if the token is fresh, and clears
    /// `needs_reauth` and backoff first.
    pub async fn force_refresh(self: &Arc<Self>) -> Result<Arc<Token>, RefreshError> {
        self.refresh_shared(Want::Forced).await
    }

    async fn refresh_shared(self: &Arc<Self>, want: Want) -> Result<Arc<Token>, RefreshError> {
        let seen = self.attempts.load(Ordering::Acquire);
        let me = Arc::clone(self);
        // Its own task: dropping the request must not cancel a refresh half-way.
        let work = async move {
            let mut gate = me.gate.lock().await;
            if me.attempts.load(Ordering::Acquire) != seen && !matches!(want, Want::Forced) {
                // An attempt finished while we waited: share its outcome.
                if let Some(outcome) = gate.as_ref() {
                    return outcome.clone().map(|()| me.token.load_full());
                }
            }
            let outcome = me.refresh_locked(want).await;
            *gate = Some(outcome.as_ref().map(|_| ()).map_err(Clone::clone));
            me.attempts.fetch_add(1, Ordering::AcqRel);
            outcome
        };
        let task = match &self.refresher.runtime {
            Some(main) => main.spawn(work),
            None => tokio::spawn(work),
        };
        match task.await {
            Ok(r) => r,
            Err(e) => Err(RefreshError::Network(format!("refresh task failed: {e}"))),
        }
    }

    fn satisfies(&self, t: &Token, want: Want) -> bool {
        match want {
            Want::Fresh => t.is_fresh(clock::now_ms(), self.refresher.config.min_validity),
            Want::Replace(g) => t.generation != g && t.is_valid(clock::now_ms()),
            Want::Forced => false,
        }
    }

    /// Runs with the gate held.
    async fn refresh_locked(&self, want: Want) -> Result<Arc<Token>, RefreshError> {
        let current = self.token.load_full();
        if self.satisfies(&current, want) {
            return Ok(current);
        }
        if let Want::Forced = want {
            let mut st = self.lock_status();
            st.needs_reauth = false;
            st.retry_at = None;
        } else {
            let st = self.lock_status();
            if st.needs_reauth || st.retry_at.is_some_and(|t| t > Instant::now()) {
                return Err(self.remembered_error(&st));
            }
        }
        let Source::Store(store) = &self.source else {
            return Err(RefreshError::NoRefreshToken);
        };

        self.refreshing.store(true, Ordering::Relaxed);
        let _reset = ResetOnDrop(&self.refreshing);
        // One refresher across processes too: the store's lock is held from the re-read
        // to the write-back.
        let lock = match self.lock_store(store).await {
            Ok(lock) => lock,
            Err(e) => {
                self.record_failure(&e, Duration::ZERO);
                return Err(e);
            }
        };
        let result = self.refresh_under_lock(store, current, want).await;
        if let Some(lock) = lock {
            let _ = tokio::task::spawn_blocking(move || drop(lock)).await;
        }
        result
    }

    async fn refresh_under_lock(
        &self,
        store: &Arc<dyn CredentialStore>,
        current: Arc<Token>,
        want: Want,
    ) -> Result<Arc<Token>, RefreshError> {
        // Another process (or the user re-authenticating) may have stored a newer token.
        let mut current = match self.adopt_from_store(store, &current).await {
            Some(adopted) if self.satisfies(&adopted, want) => return Ok(adopted),
            Some(adopted) => adopted,
            None => current,
        };
        let mut reread = false;
        loop {
            if let Some(e) = self.cannot_refresh_reason(&current) {
                self.record_failure(&e, Duration::ZERO);
                return Err(e);
            }
            let started = Instant::now();
            let result = self.call_token_endpoint(&current).await;
            let took = started.elapsed();
            self.refresher
                .metrics
                .refresh_duration
                .with_label_values(&[&self.provider.name])
                .observe(took.as_secs_f64());
            match result {
                Ok(update) => return Ok(self.install(store, &current, update, took).await),
                Err(e) if e.is_permanent() && !reread => {
                    // Before giving up on the credential, look once more: someone may have
                    // stored a new refresh token (a re-login, another tool) just now.
                    reread = true;
                    match self.adopt_from_store(store, &current).await {
                        Some(adopted) if !adopted.same_refresh(&current) => current = adopted,
                        _ => {
                            self.record_failure(&e, took);
                            return Err(e);
                        }
                    }
                }
                Err(e) => {
                    self.record_failure(&e, took);
                    return Err(e);
                }
            }
        }
    }

    /// One grant: the JWT bearer grant for a service account, else the refresh-token
    /// grant with the file's own client or the provider's.
    async fn call_token_endpoint(&self, current: &Token) -> Result<TokenUpdate, RefreshError> {
        let cfg = &self.refresher.config;
        let token_url = &self.provider.token_url;
        let grant = if let Some(sa) = &current.service_account {
            let assertion = oauth::service_account_assertion(
                sa,
                token_url,
                &self.provider.scopes,
                clock::now_ms() / 1000,
            )?;
            Grant::JwtBearer { assertion }
        } else {
            let (Some(refresh_token), Some(client_id)) = (
                current.refresh.as_ref(),
                current
                    .client_id
                    .as_deref()
                    .or(self.provider.client_id.as_deref()),
            ) else {
                return Err(RefreshError::NoRefreshToken);
            };
            // A file's own client goes with its own secret; the provider's with the provider's.
            let client_secret = if current.client_id.is_some() {
                current.client_secret.as_ref()
            } else {
                self.provider.client_secret.as_ref()
            };
            Grant::RefreshToken {
                refresh_token,
                client_id,
                client_secret,
            }
        };
        oauth::request_token(&self.refresher.client, token_url, grant, cfg.timeout).await
    }

    /// Takes the store's cross-process lock, waiting up to `refresh.timeout`. `None` when
    /// the store cannot be locked (read-only: no one else can write it either).
    async fn lock_store(
        &self,
        store: &Arc<dyn CredentialStore>,
    ) -> Result<Option<LockGuard>, RefreshError> {
        let deadline = Instant::now() + self.refresher.config.timeout;
        loop {
            let s = Arc::clone(store);
            match tokio::task::spawn_blocking(move || s.try_lock()).await {
                Ok(Ok(TryLock::Acquired(guard))) => return Ok(Some(guard)),
                Ok(Ok(TryLock::Unavailable)) => return Ok(None),
                Ok(Ok(TryLock::Busy)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(target: "tokenrelay::refresh", provider = %self.provider.name, credential = %self.id, error = %e,
                        "cannot take the refresh lock; refreshing without it");
                    return Ok(None);
                }
                Err(_) => return Ok(None),
            }
            if Instant::now() >= deadline {
                return Err(RefreshError::LockBusy(format!(
                    "beside {}",
                    store.location()
                )));
            }
            let pause = Duration::from_millis(50 + rand::random::<u64>() % 100);
            tokio::time::sleep(pause).await;
        }
    }

    /// How long until the background refresh is due: `lead_time` (plus this credential's
    /// jitter, up to 20 % more) before expiry, or halfway through a lifetime shorter than
    /// that; at the end of a backoff; now for a refreshable credential without a token.
    /// `None` when nothing is scheduled (static tokens, `needs_reauth`).
    pub fn next_refresh_in(&self) -> Option<Duration> {
        if self.is_api_key() {
            return None;
        }
        let token = self.token.load();
        {
            let st = self.lock_status();
            if st.needs_reauth {
                return None;
            }
            let now = Instant::now();
            if let Some(at) = st.retry_at.filter(|at| *at > now) {
                return Some(at - now);
            }
        }
        if self.cannot_refresh_reason(&token).is_some() {
            return None;
        }
        match token.expiry {
            Expiry::Never => None,
            Expiry::Unknown => Some(Duration::ZERO),
            Expiry::At(t) => {
                let remaining = (t - clock::now_ms()).max(0) as u64;
                let lead = self.refresher.config.lead_time.as_millis() as u64;
                let ahead = (lead + (lead as f64 * 0.2 * self.jitter) as u64).min(remaining / 2);
                Some(Duration::from_millis(remaining - ahead))
            }
        }
    }

    /// The background refresh loop of one credential; ends when the credential is retired.
    /// Shares the single flight with inline refreshes: a token someone else refreshed in
    /// the meantime is not refreshed again.
    pub async fn run_scheduler(self: Arc<Self>) {
        const MIN_GAP: Duration = Duration::from_secs(1);
        let mut last_attempt: Option<Instant> = None;
        loop {
            if self.retired.load(Ordering::Acquire) {
                return;
            }
            let generation = self.token.load().generation;
            let woken = self.wake.notified();
            match self.next_refresh_in() {
                None => {
                    woken.await;
                    continue;
                }
                Some(delay) => {
                    let floor = last_attempt
                        .map_or(Duration::ZERO, |t| MIN_GAP.saturating_sub(t.elapsed()));
                    tokio::select! {
                        _ = tokio::time::sleep(delay.max(floor)) => {}
                        _ = woken => continue,
                    }
                }
            }
            if self.retired.load(Ordering::Acquire) {
                return;
            }
            last_attempt = Some(Instant::now());
            let _ = self.refresh_shared(Want::Replace(generation)).await;
        }
    }

    /// Stops the background refresh (the credential left the pool).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Re-reads the store (its file changed, or a reload was asked for): a newer token or a
    /// new refresh token is adopted, which also brings a `needs_reauth` credential back.
    pub async fn reload(self: &Arc<Self>) {
        if let Source::Store(store) = &self.source {
            let _gate = self.gate.lock().await;
            let current = self.token.load_full();
            self.adopt_from_store(store, &current).await;
        }
        self.wake.notify_one();
    }

    /// Saves the refreshed token, then publishes it.
    async fn install(
        &self,
        store: &Arc<dyn CredentialStore>,
        current: &Token,
        update: TokenUpdate,
        took: Duration,
    ) -> Arc<Token> {
        let provider = &self.provider.name;
        let m = &self.refresher.metrics;
        let rotated = update.refresh_token.is_some();
        let save_store = Arc::clone(store);
        let save_update = update.clone();
        let saved = tokio::task::spawn_blocking(move || save_store.save(&save_update))
            .await
            .unwrap_or_else(|e| {
                Err(crate::store::StoreError::Io {
                    path: String::new(),
                    op: "write back",
                    source: std::io::Error::other(e.to_string()),
                })
            });
        match saved {
            Ok(wrote) => {
                if wrote {
                    m.persist_total
                        .with_label_values(&[provider, &self.id, "success"])
                        .inc();
                }
                if let Some(rt) = &update.refresh_token {
                    self.stored_refresh
                        .store(fingerprint(Some(rt)), Ordering::Relaxed);
                }
                self.lock_status().alerted.persist = false;
            }
            Err(e) => {
                m.persist_total
                    .with_label_values(&[provider, &self.id, "failure"])
                    .inc();
                // Only a store that should be writable is worth an alert; a read-only
                // mount without state_dir was announced at start-up.
                let expected = store.persistent();
                if expected && !std::mem::replace(&mut self.lock_status().alerted.persist, true) {
                    let lost = if rotated {
                        " The rotated refresh token lives only in memory: a restart loses the account."
                    } else {
                        ""
                    };
                    self.alert(
                        Kind::PersistFailed,
                        format!("cannot write the refreshed token back: {e}.{lost}"),
                    );
                }
                if rotated {
                    tracing::error!(target: "tokenrelay::refresh", provider = %provider, credential = %self.id, error = %e,
                        "could not save the rotated refresh token; it is kept in memory only and is lost on restart: make the file writable");
                } else {
                    tracing::warn!(target: "tokenrelay::refresh", provider = %provider, credential = %self.id, error = %e,
                        "could not write the refreshed token back; using it from memory");
                }
            }
        }
        let now = clock::now_ms();
        let resource_url = update
            .resource_url
            .clone()
            .or_else(|| current.resource_url.clone());
        let base = match base_url(&self.provider, resource_url.as_deref()) {
            Ok(b) => b,
            Err(problem) => {
                tracing::warn!(target: "tokenrelay::refresh", provider = %provider, credential = %self.id, %problem,
                    "ignoring the resource_url from the token endpoint");
                current.base.clone()
            }
        };
        let expires_at = now + update.expires_in_secs as i64 * 1000;
        let token = Arc::new(Token {
            generation: current.generation + 1,
            bearer: bearer(&update.access_token),
            access: Some(update.access_token),
            expiry: Expiry::At(expires_at),
            refresh: update.refresh_token.or_else(|| current.refresh.clone()),
            client_id: current.client_id.clone(),
            client_secret: current.client_secret.clone(),
            resource_url,
            base,
            user_project: current.user_project.clone(),
            service_account: current.service_account.clone(),
        });
        self.token.store(Arc::clone(&token));
        // The background refresh reschedules from the new expiry (and resumes after a
        // manual refresh brought a `needs_reauth` credential back).
        self.wake.notify_one();
        let recovered = {
            let mut st = self.lock_status();
            st.needs_reauth = false;
            st.consecutive_failures = 0;
            st.last_error = None;
            st.last_error_transient = false;
            st.retry_at = None;
            st.last_refresh_at_ms = Some(now);
            let a = &mut st.alerted;
            let was_alerting = a.reauth || a.failing || a.expiring;
            (a.reauth, a.failing, a.expiring) = (false, false, false);
            was_alerting
        };
        if recovered {
            self.alert(
                Kind::Recovered,
                format!(
                    "refreshed again; the token is valid until {}",
                    clock::rfc3339(expires_at)
                ),
            );
        }
        m.refresh_total
            .with_label_values(&[provider, &self.id, "success"])
            .inc();
        m.last_success_ts
            .with_label_values(&[provider, &self.id])
            .set(now as f64 / 1000.0);
        tracing::info!(target: "tokenrelay::refresh", provider = %provider, credential = %self.id, outcome = "success",
            duration_ms = took.as_millis() as u64, expires_at = %clock::rfc3339(expires_at), rotated, "token refreshed");
        token
    }

    fn alert(&self, kind: Kind, message: String) {
        self.refresher.alerter.send(Event {
            kind,
            provider: self.provider.name.clone(),
            credential: self.id.clone(),
            message,
        });
    }

    /// Raises `expiring_soon` once when the token is within `alerts.expiry_warning` of
    /// expiry and refreshing it is failing (or impossible). Called periodically.
    pub fn check_expiry(&self) {
        let Some(expires) = self.token.load().expires_at_ms() else {
            return;
        };
        let left = expires - clock::now_ms();
        let mut st = self.lock_status();
        let failing = st.needs_reauth || st.consecutive_failures > 0;
        if left < self.refresher.expiry_warning.as_millis() as i64
            && failing
            && !st.alerted.expiring
        {
            st.alerted.expiring = true;
            let why = st.last_error.clone().unwrap_or_default();
            drop(st);
            let when = if left > 0 {
                format!("expires in {} min", left / 60_000)
            } else {
                "has expired".to_string()
            };
            self.alert(
                Kind::ExpiringSoon,
                format!(
                    "the token {when} and refreshing it fails ({why}); {}",
                    self.provider.reauth_hint()
                ),
            );
        }
    }

    fn record_failure(&self, e: &RefreshError, took: Duration) {
        let provider = &self.provider.name;
        self.refresher
            .metrics
            .refresh_total
            .with_label_values(&[provider, &self.id, e.outcome()])
            .inc();
        let mut st = self.lock_status();
        st.consecutive_failures = st.consecutive_failures.saturating_add(1);
        st.last_error = Some(e.to_string());
        st.last_error_transient = !e.is_permanent();
        if e.is_permanent() {
            st.needs_reauth = true;
            st.retry_at = None;
            let first = !std::mem::replace(&mut st.alerted.reauth, true);
            drop(st);
            if first {
                self.alert(
                    Kind::NeedsReauth,
                    format!(
                        "needs re-authentication: {e}. To fix: {}",
                        self.provider.reauth_hint()
                    ),
                );
            }
            tracing::error!(target: "tokenrelay::refresh", provider = %provider, credential = %self.id, outcome = e.outcome(),
                duration_ms = took.as_millis() as u64, error = %e, hint = %self.provider.reauth_hint(),
                "refresh failed permanently; the credential needs re-authentication");
        } else {
            let delay = backoff(
                st.consecutive_failures,
                self.refresher.config.max_backoff,
                e.retry_after(),
            );
            st.retry_at = Some(Instant::now() + delay);
            let failures = st.consecutive_failures;
            let first = failures >= self.refresher.alert_after_failures
                && !std::mem::replace(&mut st.alerted.failing, true);
            drop(st);
            if first {
                self.alert(
                    Kind::RefreshFailing,
                    format!("{failures} refreshes in a row failed: {e}; retrying with backoff"),
                );
            }
            tracing::warn!(target: "tokenrelay::refresh", provider = %provider, credential = %self.id, outcome = e.outcome(),
                duration_ms = took.as_millis() as u64, error = %e, retry_in_ms = delay.as_millis() as u64,
                "refresh failed; will retry");
        }
    }

    /// The error a credential in needs_reauth or backoff answers without a network call.
    fn remembered_error(&self, st: &Status) -> RefreshError {
        let message = st
            .last_error
            .clone()
            .unwrap_or_else(|| "refresh failed".into());
        if st.needs_reauth {
            RefreshError::Rejected {
                status: 0,
                code: "needs_reauth".into(),
                description: Some(message),
            }
        } else {
            RefreshError::Network(format!("{message} (in backoff)"))
        }
    }

    /// Re-reads the store; adopts its token when it differs from ours (another writer
    /// refreshed, or the user re-authenticated). Returns the adopted token.
    async fn adopt_from_store(
        &self,
        store: &Arc<dyn CredentialStore>,
        current: &Arc<Token>,
    ) -> Option<Arc<Token>> {
        let s = Arc::clone(store);
        let file = match tokio::task::spawn_blocking(move || s.load()).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::warn!(target: "tokenrelay::credentials", provider = %self.provider.name, credential = %self.id, error = %e,
                    "could not re-read the credential before refreshing; using the copy in memory");
                return None;
            }
            Err(_) => return None,
        };
        if file.shape == Shape::ServiceAccount {
            return None;
        }
        let candidate = match token_from_file(&self.provider, &file, current.generation + 1) {
            Ok(t) => t,
            Err(problem) => {
                tracing::warn!(target: "tokenrelay::credentials", provider = %self.provider.name, credential = %self.id, %problem,
                    "ignoring the credential file's new contents");
                return None;
            }
        };
        let newer_access = !candidate.same_access(current)
            && candidate.is_valid(clock::now_ms())
            && candidate.expires_at_ms().unwrap_or(i64::MAX)
                >= current.expires_at_ms().unwrap_or(i64::MIN);
        // Only a refresh token another writer put in the store is news; the store holding
        // an older one than memory (our save failed) is not.
        let file_refresh = fingerprint(candidate.refresh.as_ref());
        let store_changed =
            self.stored_refresh.swap(file_refresh, Ordering::Relaxed) != file_refresh;
        let new_refresh =
            store_changed && candidate.refresh.is_some() && !candidate.same_refresh(current);
        if !newer_access && !new_refresh {
            return None;
        }
        // Take from the file only what is news: its access token if better (else ours, with
        // its generation: it is the same token), its refresh token if another writer
        // changed it (else ours, which may be newer than a file we could not write).
        let mut candidate = if newer_access {
            candidate
        } else {
            Token {
                generation: current.generation,
                access: current.access.clone(),
                bearer: current.bearer.clone(),
                expiry: current.expiry,
                ..candidate
            }
        };
        if !new_refresh {
            candidate.refresh = current.refresh.clone();
        }
        let adopted = Arc::new(candidate);
        self.token.store(Arc::clone(&adopted));
        self.wake.notify_one();
        if new_refresh {
            let mut st = self.lock_status();
            st.needs_reauth = false;
            st.retry_at = None;
        }
        tracing::info!(target: "tokenrelay::credentials", provider = %self.provider.name, credential = %self.id,
            new_access_token = newer_access, new_refresh_token = new_refresh, "adopted a token stored by another writer");
        Some(adopted)
    }
}

/// A process-local fingerprint of a secret (keyed SipHash), to tell whether a stored
/// refresh token changed without keeping a second copy of it.
fn fingerprint(secret: Option<&SecretString>) -> u64 {
    use std::hash::BuildHasher;
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(std::collections::hash_map::RandomState::new);
    secret.map_or(0, |s| keys.hash_one(s.expose_secret()))
}

struct ResetOnDrop<'a>(&'a AtomicBool);

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Builds the in-memory token from a parsed credential file.
pub fn token_from_file(
    provider: &ProviderConfig,
    file: &CredentialFile,
    generation: u64,
) -> Result<Token, String> {
    let base = base_url(provider, file.resource_url.as_deref())?;
    let expiry = match (&file.access_token, file.expires_at_ms, &file.refresh_token) {
        (Some(_), Some(t), _) => Expiry::At(t),
        (Some(_), None, None) => Expiry::Never,
        _ => Expiry::Unknown,
    };
    let user_project = match &file.quota_project_id {
        Some(p) => Some(
            HeaderValue::from_str(p)
                .map_err(|_| "quota_project_id is not a valid header value".to_string())?,
        ),
        None => None,
    };
    Ok(Token {
        generation,
        bearer: file.access_token.as_ref().and_then(bearer),
        access: file.access_token.clone(),
        expiry,
        refresh: file.refresh_token.clone(),
        client_id: file.client_id.clone(),
        client_secret: file.client_secret.clone(),
        resource_url: file.resource_url.clone(),
        base,
        user_project,
        service_account: file.service_account.clone(),
    })
}

/// Exponential backoff with full jitter: a random delay in [base/2, base] where base is
/// 1 s · 2^(failures−1), capped at `max`; a server's retry hint is honoured up to `max`.
pub fn backoff(failures: u32, max: Duration, hint: Option<Duration>) -> Duration {
    let exp = Duration::from_secs(1u64 << failures.saturating_sub(1).min(20));
    let base = exp.min(max);
    let jittered = base.mul_f64(0.5 + rand::random::<f64>() * 0.5);
    match hint {
        Some(h) => h.min(max).max(jittered),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::FileStore;

    /// A credential from a real file, with a token endpoint nobody listens on (these tests
    /// never reach it).
    fn credential(dir: &std::path::Path, expiry_ms: i64) -> Arc<Credential> {
        let path = dir.join("c.json");
        let doc = serde_json::json!({"access_token": "a", "refresh_token": "r", "expiry_date": expiry_ms});
        std::fs::write(&path, doc.to_string()).unwrap();
        let env = |_: &str| None;
        let config = Config::from_toml(
            "[providers.qwen]\ntoken_url = \"http://127.0.0.1:9/token\"\ncredentials = []\n[refresh]\nlead_time = \"5m\"\nmax_backoff = \"5m\"",
            "t.toml",
            &env,
        )
        .unwrap();
        let refresher = Arc::new(Refresher::new(
            reqwest::Client::new(),
            config.refresh.clone(),
            Arc::new(Metrics::new().unwrap()),
        ));
        let store: Arc<dyn CredentialStore> = Arc::new(FileStore::new(path));
        let file = store.load().unwrap();
        let provider = Arc::new(config.providers[0].clone());
        Arc::new(Credential::from_store(provider, "c".into(), store, file, refresher).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn background_refresh_is_due_lead_time_before_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let c = credential(dir.path(), clock::now_ms() + 3_600_000);
        let due = c.next_refresh_in().unwrap();
        // 1 h − 5 min − up to 20 % of 5 min of jitter.
        assert!(
            due <= Duration::from_secs(3300) && due >= Duration::from_secs(3240),
            "{due:?}"
        );
        // Paused time moves the clock the expiry is measured with.
        tokio::time::advance(Duration::from_secs(2000)).await;
        let later = c.next_refresh_in().unwrap();
        assert!(
            due - later >= Duration::from_secs(1999) && due - later <= Duration::from_secs(2001),
            "{later:?}"
        );
        tokio::time::advance(Duration::from_secs(1700)).await;
        assert_eq!(c.next_refresh_in(), Some(Duration::ZERO), "overdue: now");
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_back_off_exponentially_then_allow_a_retry() {
        let dir = tempfile::tempdir().unwrap();
        let c = credential(dir.path(), clock::now_ms() - 1000);
        let mut previous_max = Duration::ZERO;
        for failures in 1..=4u32 {
            c.record_failure(
                &RefreshError::Server {
                    status: 503,
                    retry_after: None,
                },
                Duration::ZERO,
            );
            let snap = c.snapshot();
            assert_eq!(snap.state, State::Expired);
            assert!(!snap.usable, "skipped during the backoff");
            assert_eq!(snap.consecutive_failures, failures);
            let wait = c.next_refresh_in().unwrap();
            let base = Duration::from_secs(1 << (failures - 1));
            assert!(
                wait >= base / 2 && wait <= base,
                "failure {failures}: {wait:?}"
            );
            assert!(base > previous_max || failures == 1);
            previous_max = base;
            tokio::time::advance(wait).await;
            assert!(c.snapshot().usable, "usable again once the backoff is over");
            assert_eq!(c.next_refresh_in(), Some(Duration::ZERO));
        }
        // A server's Retry-After of a year is capped at max_backoff.
        let year = Duration::from_secs(365 * 86_400);
        c.record_failure(
            &RefreshError::Server {
                status: 429,
                retry_after: Some(year),
            },
            Duration::ZERO,
        );
        assert_eq!(c.next_refresh_in(), Some(Duration::from_secs(300)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_still_valid_token_keeps_serving_while_refresh_backs_off() {
        let dir = tempfile::tempdir().unwrap();
        let c = credential(dir.path(), clock::now_ms() + 120_000);
        c.record_failure(&RefreshError::Network("refused".into()), Duration::ZERO);
        let snap = c.snapshot();
        assert_eq!(snap.state, State::Backoff);
        assert!(snap.usable);
        tokio::time::advance(Duration::from_secs(121)).await;
        assert_eq!(
            c.snapshot().state,
            State::Expired,
            "the token ran out while the endpoint was down"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooled_down_credential_is_skipped_until_its_time_passes() {
        let dir = tempfile::tempdir().unwrap();
        let c = credential(dir.path(), clock::now_ms() + 3_600_000);
        c.cool_down(Duration::from_secs(30));
        c.cool_down(Duration::from_secs(10)); // a shorter hint never shortens a cooldown
        let snap = c.snapshot();
        assert_eq!(snap.state, State::CoolingDown);
        assert!(!snap.usable);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!c.is_usable());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(c.is_usable());
        assert_eq!(c.snapshot().state, State::Ready);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failure_stops_the_schedule() {
        let dir = tempfile::tempdir().unwrap();
        let c = credential(dir.path(), clock::now_ms() - 1000);
        c.record_failure(
            &RefreshError::Rejected {
                status: 400,
                code: "invalid_grant".into(),
                description: None,
            },
            Duration::ZERO,
        );
        assert_eq!(c.snapshot().state, State::NeedsReauth);
        assert_eq!(c.next_refresh_in(), None);
        tokio::time::advance(Duration::from_secs(86_400)).await;
        assert_eq!(c.snapshot().state, State::NeedsReauth, "no time heals it");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let max = Duration::from_secs(300);
        assert!(backoff(1, max, None) <= Duration::from_secs(1));
        assert!(backoff(4, max, None) >= Duration::from_secs(4));
        assert!(backoff(30, max, None) <= max);
        assert_eq!(backoff(1, max, Some(Duration::from_secs(3600))), max);
    }
}
