//! The configuration file as serde reads it: every table refuses unknown keys, and every
//! value is still text. `Validator` (in `mod.rs` and each section's file) turns it into
//! the typed `Config`.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    pub(super) refresh: RawRefresh,
    pub(super) pool: RawPool,
    pub(super) alerts: RawAlerts,
    pub(super) store: RawStore,
    pub(super) providers: Option<BTreeMap<String, RawProvider>>,
    pub(super) clients: Vec<RawClient>,
    pub(super) usage: RawUsage,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUsage {
    pub(super) path: Option<String>,
}

/// One `[[clients]]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    pub(super) name: String,
    pub(super) key: String,
    pub(super) providers: Option<Vec<String>>,
    pub(super) models: Option<Vec<String>>,
    pub(super) rpm: Option<u64>,
    pub(super) tpm: Option<u64>,
    pub(super) tokens_per_day: Option<u64>,
    pub(super) tokens_per_month: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStore {
    pub(super) kind: Option<String>,
    pub(super) url: Option<String>,
    pub(super) key_prefix: Option<String>,
    pub(super) lease: Option<String>,
    pub(super) poll_interval: Option<String>,
    pub(super) grace: Option<String>,
    pub(super) pubsub: Option<bool>,
    pub(super) op_timeout: Option<String>,
    pub(super) limit_timeout: Option<String>,
    pub(super) encryption_key: Option<String>,
    pub(super) previous_keys: Vec<String>,
    pub(super) tls_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAlerts {
    pub(super) after_failures: Option<u32>,
    pub(super) expiry_warning: Option<String>,
    pub(super) webhooks: Vec<RawWebhook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub(super) url: String,
    #[serde(default)]
    pub(super) format: Option<String>,
    #[serde(default)]
    pub(super) min_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) client_keys: Vec<String>,
    pub(super) admin_token: Option<String>,
    pub(super) allow_unauthenticated: bool,
    pub(super) max_request_body: Option<String>,
    pub(super) max_upload_body: Option<String>,
    pub(super) upstream_ca: Option<String>,
    pub(super) upstream_connect_timeout: Option<String>,
    pub(super) upstream_idle_timeout: Option<String>,
    pub(super) upstream_keepalive: Option<String>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_header_bytes: Option<String>,
    pub(super) max_headers: Option<usize>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) proxy_threads: Option<usize>,
    pub(super) allowed_hosts: Vec<String>,
    pub(super) allowed_origins: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRefresh {
    pub(super) lead_time: Option<String>,
    pub(super) min_validity: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) max_backoff: Option<String>,
    pub(super) state_dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPool {
    pub(super) strategy: Option<String>,
    pub(super) default_cooldown: Option<String>,
    pub(super) max_cooldown: Option<String>,
    pub(super) request_deadline: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawProvider {
    pub(super) upstream: Option<String>,
    pub(super) token_url: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<String>,
    pub(super) scopes: Option<Vec<String>>,
    pub(super) credentials: Option<Vec<RawCredentialEntry>>,
    pub(super) api_keys: Vec<RawApiKey>,
    pub(super) api_keys_file: Option<String>,
    pub(super) api_key_header: Option<String>,
    pub(super) region: Option<String>,
    pub(super) locations: Option<Vec<String>>,
    pub(super) resolve: BTreeMap<String, String>,
    pub(super) authorize_url: Option<String>,
    pub(super) device_url: Option<String>,
    pub(super) login_scopes: Option<Vec<String>>,
    /// Declared limits by model name (or `"*"`).
    pub(super) limits: BTreeMap<String, RawLimit>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimit {
    pub(super) rpm: Option<u64>,
    pub(super) rpd: Option<u64>,
    pub(super) tpm: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawApiKey {
    Key(String),
    Table(RawApiKeyTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApiKeyTable {
    pub(super) key: String,
    pub(super) id: Option<String>,
    pub(super) project: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawCredentialEntry {
    Path(String),
    Table(RawCredentialTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredentialTable {
    pub(super) path: String,
    pub(super) id: Option<String>,
    #[serde(default)]
    pub(super) optional: bool,
}
