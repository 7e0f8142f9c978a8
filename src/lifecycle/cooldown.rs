//! Cool-downs and their half-open end. A rate-limited credential (or one of its models)
//! is out of rotation until its window turns; then exactly one request probes it (per
//! replica) while the others keep to other credentials, and the probe's answer decides:
//! served → back in rotation; refused again → a new cool-down, doubled when the answer
//! gave no hint.
//!
//! Entries live in the credential's `Status` (few per credential: a linear scan beats a
//! map). The whole credential's cool-down is the entry whose `model` is `None`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Credential;
use crate::clock;
use crate::common::state::{CoolReason, CoolScope, CooldownView};

/// A probe that never answers (a stuck upstream, a dropped task) frees its claim after
/// this, so the next request probes instead.
const PROBE_TIMEOUT: Duration = Duration::from_secs(120);
/// Ended entries nobody probed (no more traffic for that model) are dropped after this.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub(super) struct Cooldown {
    pub(super) model: Option<String>,
    pub(super) until: Instant,
    pub(super) until_ms: i64,
    pub(super) reason: CoolReason,
    pub(super) scope: CoolScope,
    /// How long it was: a probe refused without a hint cools for twice this.
    pub(super) length: Duration,
    /// When the half-open probe was handed out.
    pub(super) probe: Option<Instant>,
}

/// A cool-down to start.
#[derive(Debug, Clone)]
pub struct Cool {
    pub model: Option<String>,
    /// How long; `doubling` makes it at least twice the ended cool-down it replaces.
    pub length: Duration,
    pub reason: CoolReason,
    pub scope: CoolScope,
    /// The answer gave no hint: a probe refused again waits twice as long, within `cap`.
    pub doubling: bool,
    pub cap: Duration,
}

/// What a credential's cool-downs say about one request.
pub enum Gate {
    Open,
    /// This request is the half-open probe; it must report how it went.
    Probe(Probe),
    /// Cooling down (for `left`, zero while another request probes).
    Closed {
        model: Option<String>,
        left: Duration,
        reason: CoolReason,
    },
}

impl Credential {
    /// Starts a cool-down here and (fleet mode) in every replica. It never shortens a
    /// longer one; it ends a probe.
    pub fn cool(&self, c: &Cool) {
        let length = self.cool_locally(c);
        let until_ms = clock::now_ms() + length.as_millis() as i64;
        let model = c.model.clone();
        let (reason, scope) = (c.reason, c.scope);
        self.tell_peers(move |p| p.share_cooldown(model.as_deref(), until_ms, reason, scope));
    }

    /// Starts a cool-down in this replica only; returns its length.
    fn cool_locally(&self, c: &Cool) -> Duration {
        let now = Instant::now();
        let mut st = self.lock_status();
        st.cooldowns
            .retain(|e| e.until + FORGET_AFTER > now || e.probe.is_some());
        let existing = st.cooldowns.iter().position(|e| e.model == c.model);
        let mut length = c.length;
        if let (true, Some(i)) = (c.doubling, existing) {
            let prev = &st.cooldowns[i];
            if prev.until <= now {
                length = length.max(prev.length.saturating_mul(2)).min(c.cap);
            }
        }
        let entry = Cooldown {
            model: c.model.clone(),
            until: now + length,
            until_ms: clock::now_ms() + length.as_millis() as i64,
            reason: c.reason,
            scope: c.scope,
            length,
            probe: None,
        };
        match existing {
            Some(i) if st.cooldowns[i].until > entry.until => st.cooldowns[i].probe = None,
            Some(i) => {
                // A running cool-down raised (a peer's copy of ours comes back a few ms
                // later): its length, which a refused probe doubles, is kept.
                let running = st.cooldowns[i].until > now;
                let kept = st.cooldowns[i].length;
                st.cooldowns[i] = entry;
                if running {
                    st.cooldowns[i].length = kept.max(length);
                }
            }
            None => st.cooldowns.push(entry),
        }
        length
    }

    /// A peer's cool-down (fleet mode), until `until_ms` (Unix ms).
    pub fn cool_from_peer(
        &self,
        model: Option<String>,
        until_ms: i64,
        reason: CoolReason,
        scope: CoolScope,
    ) {
        let left = until_ms - clock::now_ms();
        if left <= 0 {
            return;
        }
        let length = Duration::from_millis(left as u64);
        self.cool_locally(&Cool {
            model,
            length,
            reason,
            scope,
            doubling: false,
            cap: length,
        });
    }

    /// Whether a request for `model` may use this credential now, as far as cool-downs go
    /// (the whole credential's and the model's). The first request after they ended is
    /// the probe; the others wait for its answer.
    pub fn gate(self: &Arc<Self>, model: Option<&str>) -> Gate {
        let now = Instant::now();
        let mut st = self.lock_status();
        if st.cooldowns.is_empty() {
            return Gate::Open;
        }
        let mut ended = false;
        for e in st.cooldowns.iter().filter(|e| applies(e, model)) {
            if e.until > now {
                return Gate::Closed {
                    model: e.model.clone(),
                    left: e.until - now,
                    reason: e.reason,
                };
            }
            if e.probe
                .is_some_and(|at| now.duration_since(at) < PROBE_TIMEOUT)
            {
                return Gate::Closed {
                    model: e.model.clone(),
                    left: Duration::ZERO,
                    reason: e.reason,
                };
            }
            ended = true;
        }
        if !ended {
            return Gate::Open;
        }
        for e in st.cooldowns.iter_mut().filter(|e| applies(e, model)) {
            e.probe = Some(now);
        }
        Gate::Probe(Probe {
            cred: Arc::clone(self),
            model: model.map(str::to_string),
            claimed: now,
            done: false,
        })
    }

    /// Ends the cool-downs that a request for `model` just passed (its probe was served).
    fn lift_cooldown(&self, model: Option<&str>) {
        let now = Instant::now();
        self.lock_status()
            .cooldowns
            .retain(|e| !(e.until <= now && applies(e, model)));
    }

    /// Frees the claims of the probe handed out at `claimed` (and only those: a later
    /// probe, after this one timed out, keeps its own).
    fn release_probe(&self, model: Option<&str>, claimed: Instant) {
        for e in self
            .lock_status()
            .cooldowns
            .iter_mut()
            .filter(|e| applies(e, model) && e.probe == Some(claimed))
        {
            e.probe = None;
        }
    }

    /// The cool-downs for the admin API (ended ones that wait for a probe included).
    pub(super) fn cooldown_views(&self, entries: &[Cooldown], now: Instant) -> Vec<CooldownView> {
        entries
            .iter()
            .map(|e| CooldownView {
                model: e.model.clone(),
                until_ms: e.until_ms,
                left: e.until.saturating_duration_since(now),
                reason: e.reason,
                scope: e.scope,
                probing: e.probe.is_some(),
            })
            .collect()
    }
}

/// Whether a cool-down keeps a request for `model` off the credential.
fn applies(e: &Cooldown, model: Option<&str>) -> bool {
    match (&e.model, model) {
        (None, _) => true,
        (Some(m), Some(want)) => m == want,
        (Some(_), None) => false,
    }
}

/// The half-open probe of a cool-down that ended: the one request allowed through. Its
/// answer decides (`answered`); dropped without one (the connection failed, the client
/// left), the claim is freed and the next request probes.
pub struct Probe {
    cred: Arc<Credential>,
    model: Option<String>,
    claimed: Instant,
    done: bool,
}

impl Probe {
    /// The upstream answered the probe. Not rate-limited: the cool-down is over. Rate
    /// limited: the caller has started a new cool-down already.
    pub fn answered(mut self, rate_limited: bool) {
        self.done = true;
        if rate_limited {
            // The entries the new cool-down replaced are unclaimed already; any other it
            // claimed (the whole credential's, a model the answer did not name) is freed.
            self.cred.release_probe(self.model.as_deref(), self.claimed);
        } else {
            self.cred.lift_cooldown(self.model.as_deref());
            tracing::info!(target: "tokenrelay::proxy", provider = %self.cred.provider.name, credential = %self.cred.id,
                model = self.model.as_deref().unwrap_or("*"), "the probe after a cool-down was served; back in rotation");
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if !self.done {
            self.cred.release_probe(self.model.as_deref(), self.claimed);
        }
    }
}
