//! The background refresh of one credential: when it is due (`lead_time` plus jitter
//! before expiry, halfway through short lifetimes, at the end of a backoff), the loop
//! that never spins, the backoff itself, and the periodic expiry check that alerts.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::credential::Credential;
use super::token::Expiry;
use crate::clock;
use crate::telemetry::alert::Kind;

impl Credential {
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
            let _ = self.refresh_unless_replaced(generation).await;
        }
    }

    /// Stops the background refresh (the credential left the pool).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.wake.notify_one();
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
    use crate::common::state::{CoolReason, CoolScope};
    use crate::config::Config;
    use crate::lifecycle::{Cool, Gate, Refresher, State};
    use crate::oauth::RefreshError;
    use crate::store::CredentialStore;
    use crate::store::FileStore;
    use crate::telemetry::metrics::Metrics;

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
        c.cool(&whole(30));
        c.cool(&whole(10)); // a shorter hint never shortens a cooldown
        let snap = c.snapshot();
        assert_eq!(snap.state, State::CoolingDown);
        assert!(!snap.usable);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!c.is_usable());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(c.is_usable());
        assert_eq!(c.snapshot().state, State::Ready);
    }

    fn whole(secs: u64) -> Cool {
        Cool {
            model: None,
            length: Duration::from_secs(secs),
            reason: CoolReason::RetryAfter,
            scope: CoolScope::Credential,
            doubling: true,
            cap: Duration::from_secs(3600),
        }
    }

    fn model_cool(secs: u64, doubling: bool) -> Cool {
        Cool {
            model: Some("m".into()),
            doubling,
            ..whole(secs)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn exactly_one_probe_goes_when_a_cooldown_ends() {
        let dir = tempfile::tempdir().unwrap();
        let c = Arc::new(credential(dir.path(), clock::now_ms() + 3_600_000));
        c.cool(&model_cool(30, true));
        assert!(matches!(c.gate(Some("m")), Gate::Closed { .. }));
        assert!(
            matches!(c.gate(Some("other")), Gate::Open),
            "other models keep serving"
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        let probe = match c.gate(Some("m")) {
            Gate::Probe(p) => p,
            _ => panic!("the first request after the cool-down probes"),
        };
        for _ in 0..10 {
            assert!(
                matches!(c.gate(Some("m")), Gate::Closed { left, .. } if left.is_zero()),
                "the others wait for the probe"
            );
        }
        // The probe's connection failed: the claim is freed, the next request probes.
        drop(probe);
        let probe = match c.gate(Some("m")) {
            Gate::Probe(p) => p,
            _ => panic!("a dropped probe frees its claim"),
        };
        // Refused again without a hint: twice as long.
        c.cool(&model_cool(30, true));
        probe.answered(true);
        let snap = c.snapshot();
        assert_eq!(snap.cooldowns[0].left, Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(61)).await;
        match c.gate(Some("m")) {
            Gate::Probe(p) => p.answered(false),
            _ => panic!("probe"),
        }
        assert!(
            c.snapshot().cooldowns.is_empty(),
            "a served probe ends the cool-down"
        );
        assert!(matches!(c.gate(Some("m")), Gate::Open));
        // With a hint there is no doubling.
        c.cool(&model_cool(30, false));
        tokio::time::advance(Duration::from_secs(31)).await;
        let Gate::Probe(p) = c.gate(Some("m")) else {
            panic!("probe")
        };
        c.cool(&model_cool(30, false));
        p.answered(true);
        assert_eq!(c.snapshot().cooldowns[0].left, Duration::from_secs(30));
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
