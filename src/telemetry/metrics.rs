//! Prometheus metrics. Names and labels are a contract (DESIGN.md): dashboards and alert
//! rules use them. Counters are updated where things happen; gauges that describe a
//! credential (expiry, state, usable) are set from the credentials at scrape time, so they
//! are never stale. Labels carry provider names, credential ids and outcomes, never a
//! secret.

use std::sync::Arc;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::common::state::{CoolReason, CoolScope, Snapshot, State};

pub struct Metrics {
    registry: Registry,
    pub refresh_total: IntCounterVec,
    pub refresh_duration: HistogramVec,
    pub expiry_ts: GaugeVec,
    pub last_success_ts: GaugeVec,
    pub usable: IntGaugeVec,
    pub state: IntGaugeVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_retries: IntCounterVec,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub persist_total: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub model_cooldowns: IntCounterVec,
    pub cooldowns: IntCounterVec,
    pub cooldowns_active: IntGaugeVec,
    pub limit: IntGaugeVec,
    pub limit_used: IntGaugeVec,
    pub limit_skips: IntCounterVec,
    pub source_error: IntGaugeVec,
    pub tokens: IntCounterVec,
    pub credential_tokens: IntCounterVec,
    pub usage_unknown: IntCounterVec,
    pub client_requests: IntCounterVec,
    pub upgrades_open: IntGaugeVec,
    pub store_up: prometheus::IntGauge,
    pub store_operations: IntCounterVec,
    pub upgrade_duration: HistogramVec,
    /// The model labels in use: only models named in upstream answers or requests that
    /// were rate-limited, at most `MAX_MODEL_LABELS`, then `other`.
    model_labels: std::sync::Mutex<std::collections::HashSet<String>>,
    /// `tokenrelay_tokens_total`'s counters by provider, model label and client,
    /// resolved once each (`usage_counters`).
    usage_hot: std::sync::RwLock<std::collections::HashMap<u64, Vec<Arc<UsageCounters>>>>,
}

/// A bound on the `model` label's values.
const MAX_MODEL_LABELS: usize = 64;

pub const TOKEN_KINDS: [&str; 4] = ["prompt", "completion", "cached", "thoughts"];
/// Token counters kept resolved (provider × model label × client).
const MAX_USAGE_HOT: usize = 4096;

fn usage_hash(provider: &str, model: &str, client: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (provider, model, client).hash(&mut h);
    h.finish()
}

/// `tokenrelay_tokens_total`'s counters for one provider, model label and client, in
/// `TOKEN_KINDS` order, with the names the usage ledger keeps.
pub struct UsageCounters {
    pub provider: Arc<str>,
    /// Its label: the model, or `other` (`model_label`).
    pub model: Arc<str>,
    pub client: Arc<str>,
    pub kinds: [prometheus::IntCounter; 4],
}

pub const LIMIT_WINDOWS: [&str; 3] = ["rpm", "rpd", "tpm"];

pub const REFRESH_OUTCOMES: [&str; 4] = ["success", "auth_error", "network_error", "server_error"];
pub const RETRY_REASONS: [&str; 4] = [
    "unauthorized",
    "rate_limited",
    "connect_error",
    "invalid_credential",
];

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge =
            |name: &str, help: &str, labels: &[&str]| -> Result<GaugeVec, prometheus::Error> {
                let g = GaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let int_gauge =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
                let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let histogram = |name: &str,
                         help: &str,
                         buckets: Vec<f64>|
         -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets),
                &["provider"],
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let pc = &["provider", "credential"];
        let m = Metrics {
            refresh_total: counter(
                "tokenrelay_token_refresh_total",
                "Token refresh attempts by outcome (auth_error means re-authenticate).",
                &["provider", "credential", "outcome"],
            )?,
            refresh_duration: histogram(
                "tokenrelay_token_refresh_duration_seconds",
                "Time taken by token-endpoint calls.",
                vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            )?,
            expiry_ts: gauge(
                "tokenrelay_token_expiry_timestamp_seconds",
                "When the current access token expires (Unix seconds; 0 if unknown).",
                pc,
            )?,
            last_success_ts: gauge(
                "tokenrelay_token_last_refresh_success_timestamp_seconds",
                "When the token was last refreshed successfully (Unix seconds; 0 if never).",
                pc,
            )?,
            usable: int_gauge(
                "tokenrelay_credential_usable",
                "1 if the credential can serve requests now.",
                pc,
            )?,
            state: int_gauge(
                "tokenrelay_credential_state",
                "1 for the credential's current state.",
                &["provider", "credential", "state"],
            )?,
            upstream_requests: counter(
                "tokenrelay_upstream_requests_total",
                "Requests sent upstream, by credential and upstream status.",
                &["provider", "credential", "status"],
            )?,
            upstream_retries: counter(
                "tokenrelay_upstream_retries_total",
                "Upstream attempts retried with another token or credential.",
                &["provider", "reason"],
            )?,
            requests: counter(
                "tokenrelay_requests_total",
                "Client requests by the status tokenrelay answered.",
                &["provider", "status"],
            )?,
            request_duration: histogram(
                "tokenrelay_request_duration_seconds",
                "Time from request to response headers.",
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ],
            )?,
            persist_total: counter(
                "tokenrelay_credential_persist_total",
                "Write-backs of refreshed tokens to the credential store.",
                &["provider", "credential", "outcome"],
            )?,
            build_info: int_gauge(
                "tokenrelay_build_info",
                "Always 1; the version label says which build.",
                &["version"],
            )?,
            model_cooldowns: counter(
                "tokenrelay_model_cooldowns_total",
                "Per-model cool-downs started by an upstream 429 that named or implied a model.",
                &["provider", "model"],
            )?,
            cooldowns: counter(
                "tokenrelay_cooldowns_total",
                "Cool-downs started by upstream rate limits, by reason (per_minute, per_day, no_access, retry_after) and scope (credential, project: one per credential cooled).",
                &["provider", "reason", "scope"],
            )?,
            cooldowns_active: int_gauge(
                "tokenrelay_cooldowns_active",
                "Cool-downs running now (credential or credential and model), by reason and scope.",
                &["provider", "reason", "scope"],
            )?,
            limit: int_gauge(
                "tokenrelay_limit",
                "Declared limits ([providers.NAME.limits]) by model entry and window (rpm, rpd, tpm).",
                &["provider", "model", "window"],
            )?,
            limit_used: int_gauge(
                "tokenrelay_limit_used",
                "Use of a declared limit in its current window: the highest among projects (or credentials), counted by this replica.",
                &["provider", "model", "window"],
            )?,
            limit_skips: counter(
                "tokenrelay_limit_skips_total",
                "Credentials skipped for a request because their project was at a declared limit (no upstream call).",
                &["provider", "window"],
            )?,
            source_error: int_gauge(
                "tokenrelay_credential_source_error",
                "1 while the credential's file cannot be read or parsed (it keeps serving from memory).",
                &["provider", "credential"],
            )?,
            tokens: counter(
                "tokenrelay_tokens_total",
                "Tokens the upstream reported in answers (usageMetadata, usage), by the request's model, the client and kind (prompt, completion, cached, thoughts; as reported, nothing subtracted).",
                &["provider", "model", "client", "kind"],
            )?,
            credential_tokens: counter(
                "tokenrelay_credential_tokens_total",
                "Tokens the upstream reported, by the credential that served the answer and kind.",
                &["provider", "credential", "kind"],
            )?,
            usage_unknown: counter(
                "tokenrelay_usage_unknown_total",
                "Successful answers to requests for a model that carried no usage (an OpenAI-compatible stream without stream_options.include_usage, a client that left early).",
                &["provider"],
            )?,
            client_requests: counter(
                "tokenrelay_client_requests_total",
                "Requests by client (its [[clients]] name, - for unnamed server.client_keys), provider and the status answered (only when client keys are configured).",
                &["client", "provider", "status"],
            )?,
            upgrades_open: int_gauge(
                "tokenrelay_upgrades_open",
                "WebSocket connections spliced through now.",
                &["provider"],
            )?,
            upgrade_duration: histogram(
                "tokenrelay_upgrade_duration_seconds",
                "How long WebSocket connections stayed open.",
                vec![1.0, 10.0, 60.0, 300.0, 900.0, 3600.0],
            )?,
            store_up: {
                let g = prometheus::IntGauge::new(
                    "tokenrelay_store_up",
                    "1 while the credential store answers (always 1 for files; Redis in fleet mode).",
                )?;
                registry.register(Box::new(g.clone()))?;
                g.set(1);
                g
            },
            store_operations: counter(
                "tokenrelay_store_operations_total",
                "Operations on the fleet store (Redis), by operation and outcome.",
                &["op", "outcome"],
            )?,
            model_labels: std::sync::Mutex::default(),
            usage_hot: std::sync::RwLock::default(),
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(m)
    }

    /// Creates every provider-labelled series at zero.
    pub fn init_provider(&self, provider: &str) {
        self.refresh_duration.with_label_values(&[provider]);
        self.request_duration.with_label_values(&[provider]);
        for r in RETRY_REASONS {
            self.upstream_retries.with_label_values(&[provider, r]);
        }
        self.requests.with_label_values(&[provider, "200"]);
        self.upgrades_open.with_label_values(&[provider]);
        for r in CoolReason::ALL {
            for sc in CoolScope::ALL {
                self.cooldowns
                    .with_label_values(&[provider, r.as_str(), sc.as_str()]);
                self.cooldowns_active
                    .with_label_values(&[provider, r.as_str(), sc.as_str()]);
            }
        }
        for w in LIMIT_WINDOWS {
            self.limit_skips.with_label_values(&[provider, w]);
        }
        self.usage_unknown.with_label_values(&[provider]);
        self.upgrade_duration.with_label_values(&[provider]);
    }

    /// Counts a cool-down by reason and scope (and by model, bounded, when per model).
    pub fn count_cooldown(
        &self,
        provider: &str,
        reason: CoolReason,
        scope: CoolScope,
        model: Option<&str>,
        credentials: u64,
    ) {
        self.cooldowns
            .with_label_values(&[provider, reason.as_str(), scope.as_str()])
            .inc_by(credentials);
        if let Some(m) = model {
            self.count_model_cooldown(provider, m);
        }
    }

    /// Sets the cool-down gauges of one provider from its credentials' snapshots.
    pub fn observe_cooldowns<'a>(&self, provider: &str, snaps: impl Iterator<Item = &'a Snapshot>) {
        let mut counts = std::collections::HashMap::new();
        for snap in snaps {
            for c in snap.cooldowns.iter().filter(|c| !c.left.is_zero()) {
                *counts.entry((c.reason, c.scope)).or_insert(0i64) += 1;
            }
        }
        for r in CoolReason::ALL {
            for sc in CoolScope::ALL {
                self.cooldowns_active
                    .with_label_values(&[provider, r.as_str(), sc.as_str()])
                    .set(counts.get(&(r, sc)).copied().unwrap_or(0));
            }
        }
    }

    /// Sets the declared limits' gauges of one provider.
    pub fn observe_limits(&self, provider: &str, usage: &[crate::quota::limits::Use]) {
        for u in usage {
            for (w, v) in [("rpm", u.rpm), ("rpd", u.rpd), ("tpm", u.tpm)] {
                if let Some((used, limit)) = v {
                    self.limit
                        .with_label_values(&[provider, &u.model, w])
                        .set(limit as i64);
                    self.limit_used
                        .with_label_values(&[provider, &u.model, w])
                        .set(used as i64);
                }
            }
        }
    }

    /// Counts a per-model cool-down; the label set stays bounded.
    pub fn count_model_cooldown(&self, provider: &str, model: &str) {
        let label = self.model_label(model);
        self.model_cooldowns
            .with_label_values(&[provider, label])
            .inc();
    }

    /// A model name as a label: the first `MAX_MODEL_LABELS` sane names, then `other`
    /// (model names come from requests).
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        let sane = !model.is_empty()
            && model.len() <= 80
            && model.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'@' | b'/' | b':')
            });
        let mut seen = self.model_labels.lock().unwrap_or_else(|p| p.into_inner());
        if sane && (seen.contains(model) || seen.len() < MAX_MODEL_LABELS) {
            if !seen.contains(model) {
                seen.insert(model.to_string());
            }
            model
        } else {
            "other"
        }
    }

    /// The token counters of a provider, model (as the request named it: its label is
    /// `model_label`'s) and client, resolved once: an answer costs one map lookup, not
    /// four label lookups. At most `MAX_USAGE_HOT` are kept; beyond, each is resolved.
    pub fn usage_counters(&self, provider: &str, model: &str, client: &str) -> Arc<UsageCounters> {
        if let Some(c) = self.hot_usage(provider, model, client) {
            return c;
        }
        // A name that is not its own label (junk from a request, or past the 64th) is not
        // kept: its label's counters are, and are shared.
        let label = self.model_label(model);
        if label != model {
            if let Some(c) = self.hot_usage(provider, label, client) {
                return c;
            }
        }
        let counters = Arc::new(UsageCounters {
            provider: Arc::from(provider),
            model: Arc::from(label),
            client: Arc::from(client),
            kinds: TOKEN_KINDS
                .map(|k| self.tokens.with_label_values(&[provider, label, client, k])),
        });
        let mut hot = self.usage_hot.write().unwrap_or_else(|p| p.into_inner());
        if hot.len() < MAX_USAGE_HOT {
            hot.entry(usage_hash(provider, label, client))
                .or_default()
                .push(Arc::clone(&counters));
        }
        counters
    }

    fn hot_usage(&self, provider: &str, model: &str, client: &str) -> Option<Arc<UsageCounters>> {
        let hot = self.usage_hot.read().unwrap_or_else(|p| p.into_inner());
        hot.get(&usage_hash(provider, model, client))?
            .iter()
            .find(|c| &*c.provider == provider && &*c.model == model && &*c.client == client)
            .cloned()
    }

    /// A credential's token counters (`tokenrelay_credential_tokens_total`).
    pub fn credential_token_counters(
        &self,
        provider: &str,
        credential: &str,
    ) -> [prometheus::IntCounter; 4] {
        TOKEN_KINDS.map(|k| {
            self.credential_tokens
                .with_label_values(&[provider, credential, k])
        })
    }

    /// Creates every series of a credential at zero.
    pub fn init_credential(&self, provider: &str, credential: &str) {
        for o in REFRESH_OUTCOMES {
            self.refresh_total
                .with_label_values(&[provider, credential, o]);
        }
        for o in ["success", "failure"] {
            self.persist_total
                .with_label_values(&[provider, credential, o]);
        }
        self.upstream_requests
            .with_label_values(&[provider, credential, "200"]);
        self.last_success_ts
            .with_label_values(&[provider, credential]);
        self.source_error.with_label_values(&[provider, credential]);
        for kind in TOKEN_KINDS {
            self.credential_tokens
                .with_label_values(&[provider, credential, kind]);
        }
    }

    /// Removes a credential's series (it left the pool).
    pub fn forget_credential(&self, provider: &str, credential: &str) {
        let _ = self.expiry_ts.remove_label_values(&[provider, credential]);
        let _ = self
            .last_success_ts
            .remove_label_values(&[provider, credential]);
        let _ = self.usable.remove_label_values(&[provider, credential]);
        let _ = self
            .source_error
            .remove_label_values(&[provider, credential]);
        for kind in TOKEN_KINDS {
            let _ = self
                .credential_tokens
                .remove_label_values(&[provider, credential, kind]);
        }
        for s in State::ALL {
            let _ = self
                .state
                .remove_label_values(&[provider, credential, s.as_str()]);
        }
        for o in REFRESH_OUTCOMES {
            let _ = self
                .refresh_total
                .remove_label_values(&[provider, credential, o]);
        }
        for o in ["success", "failure"] {
            let _ = self
                .persist_total
                .remove_label_values(&[provider, credential, o]);
        }
        // Upstream statuses are open-ended: find the ones this credential has.
        use prometheus::core::Collector;
        let statuses: Vec<String> = self
            .upstream_requests
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter(|m| {
                let labels = m.get_label();
                labels
                    .iter()
                    .any(|l| l.name() == "provider" && l.value() == provider)
                    && labels
                        .iter()
                        .any(|l| l.name() == "credential" && l.value() == credential)
            })
            .filter_map(|m| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == "status")
                    .map(|l| l.value().to_string())
            })
            .collect();
        for status in statuses {
            let _ = self
                .upstream_requests
                .remove_label_values(&[provider, credential, &status]);
        }
    }

    /// Sets the gauges that describe credentials, from their current snapshot.
    pub fn observe_credential(&self, p: &str, id: &str, snap: &Snapshot) {
        self.expiry_ts
            .with_label_values(&[p, id])
            .set(snap.expires_at_ms.map_or(0.0, |ms| ms as f64 / 1000.0));
        self.usable
            .with_label_values(&[p, id])
            .set(i64::from(snap.usable));
        for s in State::ALL {
            self.state
                .with_label_values(&[p, id, s.as_str()])
                .set(i64::from(s == snap.state));
        }
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl crate::store::redis::FleetMetrics for Metrics {
    fn operation(&self, op: &str, ok: bool) {
        self.store_operations
            .with_label_values(&[op, if ok { "success" } else { "failure" }])
            .inc();
    }

    fn up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }
}
