//! Refresh: one attempt at a time per credential, shared by every waiter, run in its own
//! task under the store's lock; the store is re-read first (adoption), a rotated refresh
//! token is saved before the new access token is published, and failures are classified
//! into backoff or `needs_reauth`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::credential::{Credential, Source};
use super::schedule::backoff;
use super::state::Status;
use super::token::{bearer, fingerprint, token_from_file, Expiry, Token};
use crate::clock;
use crate::oauth::{self, Grant, RefreshError};
use crate::store::shape::{Shape, TokenUpdate};
use crate::store::{CredentialStore, LockGuard, TryLock};
use crate::telemetry::alert::Kind;

/// What a caller needs from a refresh.
#[derive(Clone, Copy)]
pub(super) enum Want {
    /// A token fresh for `min_validity`.
    Fresh,
    /// A token other than generation `g` (which upstream rejected).
    Replace(u64),
    /// A token-endpoint call even if the token is fresh (manual refresh).
    Forced,
}

impl Credential {
    /// A token valid for at least `refresh.min_validity`, refreshed inline if needed. If
    /// the refresh fails, a token that is still valid is used while it lasts.
    pub async fn fresh_token(self: &Arc<Self>) -> Result<Arc<Token>, RefreshError> {
        let token = self.token.load_full();
        if token.is_fresh(clock::now_ms(), self.refresher.config.min_validity) {
            return Ok(token);
        }
        // Boxed: the refresh's state stays out of every request's future.
        match Box::pin(self.refresh_shared(Want::Fresh)).await {
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
        Some(Box::pin(self.refresh_shared(Want::Replace(rejected))).await)
    }

    /// A manual refresh: calls the token endpoint even if the token is fresh, and clears
    /// `needs_reauth` and backoff first.
    pub async fn force_refresh(self: &Arc<Self>) -> Result<Arc<Token>, RefreshError> {
        // An operator asking for it is the way back for a refused key (there is nothing to
        // refresh) and for a token whose project was fixed.
        self.clear_invalid();
        if self.is_api_key() {
            return Ok(self.token.load_full());
        }
        self.refresh_shared(Want::Forced).await
    }

    /// Re-reads the store (its file changed, or a reload was asked for): a newer token or a
    /// new refresh token is adopted, which also brings a `needs_reauth` credential back.
    /// A file that cannot be read or parsed is the `Err`: the credential keeps serving
    /// from memory and shows the problem (see `source_problem`).
    pub async fn reload(self: &Arc<Self>) -> Result<(), String> {
        let mut result = Ok(());
        if let Source::Store(store) = &self.source {
            let _gate = self.gate.lock().await;
            let current = self.token.load_full();
            if self.adopt_from_store(store, &current).await.is_some() {
                // A new file: whatever the upstream refused is gone with the old one.
                self.clear_invalid();
            }
            if let Some(problem) = self.lock_status().source_error.clone() {
                result = Err(problem);
            }
        }
        self.wake.notify_one();
        result
    }

    /// Records whether the store could be read: a broken file is shown where operators
    /// look (`last_error`, the reload's `errors`, a metric, an alert), once per breakage.
    fn source_problem(&self, problem: Option<String>) {
        if self.is_retired() {
            // Out of the pool: its series are gone and must not come back.
            return;
        }
        let changed = {
            let mut st = self.lock_status();
            let changed = st.source_error != problem;
            st.source_error = problem.clone();
            changed
        };
        self.refresher
            .metrics
            .source_error
            .with_label_values(&[&self.provider.name, &self.id])
            .set(i64::from(problem.is_some()));
        match problem {
            Some(p) if changed => {
                tracing::error!(target: "tokenrelay::credentials", provider = %self.provider.name, credential = %self.id, problem = %p,
                    "the credential's file cannot be read; serving the token in memory until it is fixed (it is never written back with less than it held)");
                self.alert(
                    Kind::SourceBroken,
                    format!("its file cannot be read ({p}); it serves the token in memory until the file is fixed"),
                );
            }
            None if changed => {
                tracing::info!(target: "tokenrelay::credentials", provider = %self.provider.name, credential = %self.id,
                    "the credential's file reads again");
            }
            _ => {}
        }
    }

    /// The background refresh's request: a token other than generation `g`, so a token
    /// someone else refreshed meanwhile is not refreshed again.
    pub(super) async fn refresh_unless_replaced(
        self: &Arc<Self>,
        g: u64,
    ) -> Result<Arc<Token>, RefreshError> {
        self.refresh_shared(Want::Replace(g)).await
    }

    pub(super) async fn refresh_shared(
        self: &Arc<Self>,
        want: Want,
    ) -> Result<Arc<Token>, RefreshError> {
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

    pub(super) fn satisfies(&self, t: &Token, want: Want) -> bool {
        match want {
            Want::Fresh => t.is_fresh(clock::now_ms(), self.refresher.config.min_validity),
            Want::Replace(g) => t.generation != g && t.is_valid(clock::now_ms()),
            Want::Forced => false,
        }
    }

    /// Runs with the gate held.
    pub(super) async fn refresh_locked(&self, want: Want) -> Result<Arc<Token>, RefreshError> {
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

    pub(super) async fn refresh_under_lock(
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
            if let Some(pause) = test_pause("TOKENRELAY_TEST_PAUSE_BEFORE_REDEEM_MS") {
                // Test hook (off unless set): the lock is held, the token not yet asked for.
                tokio::time::sleep(pause).await;
            }
            // Fleet mode: mark the attempt; if the record moved meanwhile, take it instead.
            let s = Arc::clone(store);
            match tokio::task::spawn_blocking(move || s.before_redeem()).await {
                Ok(Ok(true)) => {
                    if let Some(adopted) = self.adopt_from_store(store, &current).await {
                        if self.satisfies(&adopted, want) {
                            return Ok(adopted);
                        }
                        current = adopted;
                    }
                }
                Ok(Err(e)) if store.lock_required() => {
                    let e = RefreshError::StoreUnreachable(e.to_string());
                    self.record_failure(&e, Duration::ZERO);
                    return Err(e);
                }
                _ => {}
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
    pub(super) async fn call_token_endpoint(
        &self,
        current: &Token,
    ) -> Result<TokenUpdate, RefreshError> {
        let cfg = &self.refresher.config;
        let Some(token_url) = &self.provider.token_url else {
            return Err(RefreshError::NoTokenUrl {
                provider: self.provider.name.clone(),
            });
        };
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
    pub(super) async fn lock_store(
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
                Ok(Err(e)) if store.lock_required() => {
                    // A rotating credential shared by a fleet: refreshing without the lease
                    // could spend its refresh token twice. Serve the current token; retry.
                    return Err(RefreshError::StoreUnreachable(e.to_string()));
                }
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

    /// Saves the refreshed token, then publishes it.
    pub(super) async fn install(
        &self,
        store: &Arc<dyn CredentialStore>,
        current: &Token,
        update: TokenUpdate,
        took: Duration,
    ) -> Arc<Token> {
        if let Some(pause) = test_pause("TOKENRELAY_TEST_PAUSE_BEFORE_COMMIT_MS") {
            // Test hook (off unless TOKENRELAY_TEST_PAUSE_BEFORE_COMMIT_MS is set): a window
            // between the token endpoint's answer and the commit, to stall the process in.
            tokio::time::sleep(pause).await;
        }
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
        let base = match self.provider.base_url(resource_url.as_deref()) {
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
            auth: bearer(&update.access_token),
            access: Some(update.access_token),
            expiry: Expiry::At(expires_at),
            refresh: update.refresh_token.or_else(|| current.refresh.clone()),
            client_id: current.client_id.clone(),
            client_secret: current.client_secret.clone(),
            resource_url,
            base,
            upstream_headers: current.upstream_headers.clone(),
            service_account: current.service_account.clone(),
            account: current.account.clone(),
        });
        self.token.store(Arc::clone(&token));
        // The background refresh reschedules from the new expiry (and resumes after a
        // manual refresh brought a `needs_reauth` credential back).
        self.wake.notify_one();
        let recovered = {
            let mut st = self.lock_status();
            st.last_refresh_at_ms = Some(now);
            st.recovered()
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

    pub(super) fn record_failure(&self, e: &RefreshError, took: Duration) {
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
            let message = e.to_string();
            self.tell_peers(move |p| p.share_needs_reauth(&message));
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
    pub(super) fn remembered_error(&self, st: &Status) -> RefreshError {
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

    /// An adopted token fixes what it fixes: a fresh access token ends a transient
    /// failure (backoff, expired: another writer refreshed while we could not), a new
    /// refresh token also ends `needs_reauth`. Their error, count and alerts go with them.
    fn adopted(&self, newer_access: bool, new_refresh: bool) {
        let recovered = {
            let mut st = self.lock_status();
            let transient = st.last_error_transient && newer_access;
            let reauth = st.needs_reauth && new_refresh;
            if new_refresh {
                st.retry_at = None;
            }
            if !transient && !reauth {
                return;
            }
            st.recovered()
        };
        if recovered {
            self.alert(
                Kind::Recovered,
                "serving a token another writer refreshed; the earlier refresh failures are over"
                    .to_string(),
            );
        }
    }

    /// Re-reads the store; adopts its token when it differs from ours (another writer
    /// refreshed, or the user re-authenticated). Returns the adopted token.
    pub(super) async fn adopt_from_store(
        &self,
        store: &Arc<dyn CredentialStore>,
        current: &Arc<Token>,
    ) -> Option<Arc<Token>> {
        let s = Arc::clone(store);
        let file = match tokio::task::spawn_blocking(move || s.load()).await {
            Ok(Ok(f)) => {
                self.source_problem(None);
                // A file that names another project now (an edited quota_project_id).
                if let Some(p) = super::credential::file_project(&f) {
                    if self.project().as_deref() != Some(&p) {
                        self.project.store(Some(Arc::new(p)));
                    }
                }
                f
            }
            Ok(Err(e)) => {
                self.source_problem(Some(e.to_string()));
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
                auth: current.auth.clone(),
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
        self.adopted(newer_access, new_refresh);
        tracing::info!(target: "tokenrelay::credentials", provider = %self.provider.name, credential = %self.id,
            new_access_token = newer_access, new_refresh_token = new_refresh, "adopted a token stored by another writer");
        Some(adopted)
    }
}

/// A test hook's pause from the environment, read once per variable (off unless set).
fn test_pause(var: &'static str) -> Option<Duration> {
    static PAUSES: std::sync::OnceLock<[Option<Duration>; 2]> = std::sync::OnceLock::new();
    let read = |v: &str| {
        std::env::var(v)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis)
    };
    let pauses = PAUSES.get_or_init(|| {
        [
            read("TOKENRELAY_TEST_PAUSE_BEFORE_REDEEM_MS"),
            read("TOKENRELAY_TEST_PAUSE_BEFORE_COMMIT_MS"),
        ]
    });
    match var {
        "TOKENRELAY_TEST_PAUSE_BEFORE_REDEEM_MS" => pauses[0],
        _ => pauses[1],
    }
}

pub(super) struct ResetOnDrop<'a>(&'a AtomicBool);

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}
