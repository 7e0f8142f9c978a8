//! Configuration: a `RawConfig` as serde reads it from TOML, then one function,
//! [`Config::from_raw`], that validates it into a [`Config`] with parsed addresses,
//! URLs, durations, sizes and resolved secrets.
//!
//! Every error names the file, the key and the problem. This module never touches
//! the network and never reads a credential file (it only checks that named files
//! exist); credential parsing lives in `credential`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::oauth::login;
use crate::ops::alert::{AlertsConfig, Format, WebhookConfig};
pub use crate::providers::ProviderKind;
use crate::providers::{self, dashscope, google, vertex, KeyHeader};
use crate::proxy::browser;

/// A configuration problem, always naming where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the config file: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: `{key}`: {problem}")]
    Invalid {
        file: String,
        key: String,
        problem: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    server: RawServer,
    refresh: RawRefresh,
    pool: RawPool,
    alerts: RawAlerts,
    store: RawStore,
    providers: Option<BTreeMap<String, RawProvider>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    kind: Option<String>,
    url: Option<String>,
    key_prefix: Option<String>,
    lease: Option<String>,
    poll_interval: Option<String>,
    grace: Option<String>,
    pubsub: Option<bool>,
    op_timeout: Option<String>,
}

/// Where credentials live: files (one machine), or Redis shared by a fleet.
#[derive(Debug, Clone, Default)]
pub enum StoreConfig {
    #[default]
    File,
    Redis(crate::store::redis::RedisConfig),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAlerts {
    after_failures: Option<u32>,
    expiry_warning: Option<String>,
    webhooks: Vec<RawWebhook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    min_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    client_keys: Vec<String>,
    admin_token: Option<String>,
    allow_unauthenticated: bool,
    max_request_body: Option<String>,
    max_upload_body: Option<String>,
    upstream_ca: Option<String>,
    upstream_connect_timeout: Option<String>,
    upstream_idle_timeout: Option<String>,
    upstream_keepalive: Option<String>,
    shutdown_grace: Option<String>,
    max_connections: Option<usize>,
    max_header_bytes: Option<String>,
    max_headers: Option<usize>,
    header_read_timeout: Option<String>,
    proxy_threads: Option<usize>,
    allowed_hosts: Vec<String>,
    allowed_origins: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRefresh {
    lead_time: Option<String>,
    min_validity: Option<String>,
    timeout: Option<String>,
    max_backoff: Option<String>,
    state_dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPool {
    strategy: Option<String>,
    default_cooldown: Option<String>,
    max_cooldown: Option<String>,
    request_deadline: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawProvider {
    upstream: Option<String>,
    token_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    scopes: Option<Vec<String>>,
    credentials: Option<Vec<RawCredentialEntry>>,
    api_keys: Vec<RawApiKey>,
    api_keys_file: Option<String>,
    api_key_header: Option<String>,
    region: Option<String>,
    locations: Option<Vec<String>>,
    resolve: BTreeMap<String, String>,
    authorize_url: Option<String>,
    device_url: Option<String>,
    login_scopes: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawApiKey {
    Key(String),
    Table(RawApiKeyTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKeyTable {
    key: String,
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawCredentialEntry {
    Path(String),
    Table(RawCredentialTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentialTable {
    path: String,
    id: Option<String>,
    #[serde(default)]
    optional: bool,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration came from (a path, or "built-in defaults").
    pub source: String,
    pub server: ServerConfig,
    pub refresh: RefreshConfig,
    pub pool: PoolConfig,
    pub alerts: AlertsConfig,
    pub store: StoreConfig,
    pub providers: Vec<ProviderConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub client_keys: Vec<SecretString>,
    pub admin_token: Option<SecretString>,
    pub allow_unauthenticated: bool,
    pub max_request_body: usize,
    /// Bodies larger than `max_request_body` up to this stream upstream unbuffered (uploads)
    /// and are sent once.
    pub max_upload_body: u64,
    /// Extra roots to trust for upstream TLS (a private CA, a test upstream), beside the
    /// web PKI roots.
    pub upstream_ca: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub upstream_connect_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    /// The longest an idle upstream connection is kept for reuse (the upstream's own
    /// `Keep-Alive: timeout=` shortens it).
    pub upstream_keepalive: Duration,
    pub shutdown_grace: Duration,
    /// Open connections per listener; accepting pauses at the cap.
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// How long a client may take to send its request headers.
    pub header_read_timeout: Duration,
    /// Proxy threads: single-threaded runtimes that each serve the connections handed to
    /// them, with their own upstream connection pool.
    pub proxy_threads: usize,
    /// More names the listeners answer to (exact, or `*.suffix`); see `proxy::browser`.
    pub allowed_hosts: Vec<String>,
    /// Web origins whose pages may call tokenrelay (CORS); none by default.
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct RefreshConfig {
    pub lead_time: Duration,
    pub min_validity: Duration,
    pub timeout: Duration,
    pub max_backoff: Duration,
    /// Where refreshed tokens of read-only credential files are kept.
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    RoundRobin,
    FillFirst,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub strategy: Strategy,
    pub default_cooldown: Duration,
    pub max_cooldown: Duration,
    /// Bounds the whole attempt sequence of one request (refreshes, failovers) up to the
    /// response headers; a streamed body is not bounded.
    pub request_deadline: Duration,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub upstream: Url,
    /// The OAuth token endpoint; `None` for a provider of API keys only (`dashscope`).
    pub token_url: Option<Url>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub scopes: Vec<String>,
    pub credentials: Vec<CredentialEntry>,
    pub api_keys: Vec<ApiKey>,
    /// One key per line, reloaded like credential files.
    pub api_keys_file: Option<PathBuf>,
    /// How this provider's static keys go upstream.
    pub key_header: KeyHeader,
    /// An upstream with `{location}` (Vertex AI): the host is chosen per request from the
    /// path's location, among `locations`.
    pub upstream_template: Option<String>,
    pub locations: Vec<String>,
    /// Host → address overrides for upstream connections (like curl's `--resolve`).
    pub resolve: Vec<(String, std::net::IpAddr)>,
    /// `tokenrelay login`: the authorization endpoint (loopback flow), the device-code
    /// endpoint (device flow), and the scopes a sign-in asks for.
    pub authorize_url: Option<Url>,
    pub device_url: Option<Url>,
    pub login_scopes: Vec<String>,
}

/// One configured static key and its id (configured, else a hash of the key).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: Option<String>,
    pub key: SecretString,
}

impl ProviderConfig {
    /// What gets this provider a fresh credential (the provider's own hint).
    pub fn reauth_hint(&self) -> String {
        self.kind.reauth_hint(self.token_url.as_ref())
    }

    /// What replaces one credential of this provider, by its kind (`api_key`,
    /// `service_account`, `authorized_user`, …).
    pub fn hint_for(&self, credential_kind: &str) -> String {
        self.kind.hint_for(credential_kind, self.token_url.as_ref())
    }

    /// Whether its refresh tokens may rotate (see `ProviderKind::rotates_refresh_tokens`).
    pub fn rotates_refresh_tokens(&self) -> bool {
        self.kind.rotates_refresh_tokens()
    }

    /// The upstream base for a credential with this `resource_url` (or none).
    pub fn base_url(&self, resource_url: Option<&str>) -> Result<Url, String> {
        providers::base_url(&self.upstream, &self.name, resource_url)
    }
}

/// One `credentials` entry: a file, a directory (its `*.json` files) or a glob.
#[derive(Debug, Clone)]
pub struct CredentialEntry {
    /// As written, for messages.
    pub spec: String,
    /// `~` expanded.
    pub pattern: PathBuf,
    pub id: Option<String>,
    /// A missing file is fine (the presets' default locations, `optional = true`).
    pub optional: bool,
    /// The config key or environment variable it came from.
    pub origin: String,
}

/// A credential file found by expanding the entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialPath {
    pub path: PathBuf,
    pub id: Option<String>,
}

impl CredentialEntry {
    /// Expands the entry into files. A required literal file that does not exist is an
    /// error; a glob or directory may match nothing.
    pub fn resolve(&self) -> Result<Vec<CredentialPath>, String> {
        let spec = self.pattern.to_string_lossy();
        if spec.contains(['*', '?', '[']) {
            let paths = glob::glob(&spec).map_err(|e| format!("bad glob {:?}: {e}", self.spec))?;
            let mut out: Vec<_> = paths
                .filter_map(Result::ok)
                .filter(|p| p.is_file() && !is_hidden(p))
                .map(|path| CredentialPath { path, id: None })
                .collect();
            out.sort_by(|a, b| a.path.cmp(&b.path));
            return Ok(out);
        }
        if self.pattern.is_dir() {
            let entries = std::fs::read_dir(&self.pattern)
                .map_err(|e| format!("cannot list directory {:?}: {e}", self.spec))?;
            let mut out: Vec<_> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().is_some_and(|x| x == "json") && p.is_file() && !is_hidden(p)
                })
                .map(|path| CredentialPath { path, id: None })
                .collect();
            out.sort_by(|a, b| a.path.cmp(&b.path));
            return Ok(out);
        }
        if self.pattern.is_file() {
            return Ok(vec![CredentialPath {
                path: self.pattern.clone(),
                id: self.id.clone(),
            }]);
        }
        if self.optional {
            return Ok(Vec::new());
        }
        Err(format!(
            "credential file {:?} does not exist (create it, fix the path, or mark the entry `{{ path = \"...\", optional = true }}`)",
            self.spec
        ))
    }
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

/// Reads environment variables through a function so tests need not mutate the process
/// environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// The configuration tokenrelay uses when started without arguments: `./config.toml`
    /// when present, else the built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env = |k: &str| std::env::var(k).ok();
        match path {
            Some(p) => Self::from_file(p, &env),
            None if Path::new("config.toml").is_file() => {
                Self::from_file(Path::new("config.toml"), &env)
            }
            None => Self::from_toml("", "built-in defaults", &env),
        }
    }

    pub fn from_file(path: &Path, env: EnvLookup) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::from_toml(&text, &file, env)
    }

    /// Parses and validates TOML text; `file` names it in errors.
    pub fn from_toml(text: &str, file: &str, env: EnvLookup) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Validator { file, env }.config(raw)
    }
}

struct Validator<'a> {
    file: &'a str,
    env: EnvLookup<'a>,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.server(raw.server)?;
        let refresh = RefreshConfig {
            lead_time: self.duration("refresh.lead_time", raw.refresh.lead_time, "5m")?,
            min_validity: self.duration("refresh.min_validity", raw.refresh.min_validity, "60s")?,
            timeout: self.duration("refresh.timeout", raw.refresh.timeout, "15s")?,
            max_backoff: self.duration("refresh.max_backoff", raw.refresh.max_backoff, "5m")?,
            state_dir: match raw.refresh.state_dir.as_deref() {
                None | Some("") => None,
                Some(d) => {
                    Some(expand_tilde(d, self.env).map_err(|p| self.err("refresh.state_dir", p))?)
                }
            },
        };
        if refresh.timeout.is_zero() {
            return Err(self.err("refresh.timeout", "must be greater than zero"));
        }
        let strategy = match raw.pool.strategy.as_deref() {
            None | Some("round_robin") => Strategy::RoundRobin,
            Some("fill_first") => Strategy::FillFirst,
            Some(other) => {
                return Err(self.err(
                    "pool.strategy",
                    format!("unknown strategy {other:?}; use \"round_robin\" or \"fill_first\""),
                ))
            }
        };
        let pool = PoolConfig {
            strategy,
            default_cooldown: self.duration(
                "pool.default_cooldown",
                raw.pool.default_cooldown,
                "60s",
            )?,
            max_cooldown: self.duration("pool.max_cooldown", raw.pool.max_cooldown, "1h")?,
            request_deadline: self.duration(
                "pool.request_deadline",
                raw.pool.request_deadline,
                "10m",
            )?,
        };
        if pool.request_deadline.is_zero() {
            return Err(self.err("pool.request_deadline", "must be greater than zero"));
        }

        let mut raw_providers = raw.providers.unwrap_or_else(|| {
            ["gemini", "qwen"]
                .into_iter()
                .map(|n| (n.to_string(), RawProvider::default()))
                .collect()
        });
        // The environment variables existing deployments use add credentials (and
        // enable the provider when the file did not mention it).
        for (var, name) in [
            ("GEMINI_CLI_OAUTH_CREDENTIALS", "gemini"),
            ("QWEN_CODE_OAUTH_CREDENTIALS", "qwen"),
        ] {
            if (self.env)(var).is_some_and(|v| !v.trim().is_empty()) {
                raw_providers.entry(name.to_string()).or_default();
            }
        }
        let mut providers = Vec::new();
        for (name, p) in raw_providers {
            providers.push(self.provider(&name, p)?);
        }
        let alerts = self.alerts(raw.alerts)?;
        let store = self.store(raw.store, &refresh)?;
        Ok(Config {
            source: self.file.to_string(),
            server,
            refresh,
            pool,
            alerts,
            store,
            providers,
        })
    }

    fn store(&self, raw: RawStore, refresh: &RefreshConfig) -> Result<StoreConfig, ConfigError> {
        match raw.kind.as_deref().unwrap_or("file") {
            "file" => Ok(StoreConfig::File),
            "redis" => {
                let url = match raw.url.as_deref() {
                    Some(u) if !u.is_empty() => self.secret("store.url", u)?,
                    _ => return Err(self.err("store.url", "required with kind = \"redis\" (redis://host:6379, rediss:// for TLS; a password may come from env: or file:)")),
                };
                {
                    use secrecy::ExposeSecret;
                    let u = url.expose_secret();
                    if !(u.starts_with("redis://")
                        || u.starts_with("rediss://")
                        || u.starts_with("unix://"))
                    {
                        return Err(self.err(
                            "store.url",
                            "must start with redis://, rediss:// (TLS) or unix://",
                        ));
                    }
                }
                // The lease outlives one token call with margin; it is renewed while held.
                let lease = match raw.lease {
                    Some(l) => self.duration("store.lease", Some(l), "30s")?,
                    None => (refresh.timeout * 2).max(Duration::from_secs(10)),
                };
                let grace = match raw.grace {
                    Some(g) => self.duration("store.grace", Some(g), "15s")?,
                    None => refresh.timeout,
                };
                Ok(StoreConfig::Redis(crate::store::redis::RedisConfig {
                    url,
                    key_prefix: raw.key_prefix.unwrap_or_else(|| "tokenrelay".into()),
                    lease,
                    poll_interval: self.duration("store.poll_interval", raw.poll_interval, "1s")?,
                    grace,
                    pubsub: raw.pubsub.unwrap_or(true),
                    op_timeout: self.duration("store.op_timeout", raw.op_timeout, "2s")?,
                }))
            }
            other => Err(self.err(
                "store.kind",
                format!("unknown store {other:?}: \"file\" (default) or \"redis\""),
            )),
        }
    }

    fn alerts(&self, raw: RawAlerts) -> Result<AlertsConfig, ConfigError> {
        let mut webhooks = Vec::new();
        for (i, w) in raw.webhooks.into_iter().enumerate() {
            let key = |k: &str| format!("alerts.webhooks[{i}].{k}");
            let url = self.secret(&key("url"), &w.url)?;
            // The URL is a secret (it carries the webhook token): never echo it.
            match Url::parse(url.expose_secret()) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => return Err(self.err(key("url"), "is not an http:// or https:// URL")),
            }
            let format = match w.format.as_deref() {
                None | Some("json") => Format::Json,
                Some("discord") => Format::Discord,
                Some("slack") => Format::Slack,
                Some(other) => {
                    return Err(self.err(
                        key("format"),
                        format!("unknown format {other:?}; use \"discord\", \"slack\" or \"json\""),
                    ))
                }
            };
            let min_interval = self.duration(&key("min_interval"), w.min_interval, "0s")?;
            webhooks.push(WebhookConfig {
                url,
                format,
                min_interval,
            });
        }
        let after_failures = raw.after_failures.unwrap_or(3);
        if after_failures == 0 {
            return Err(self.err("alerts.after_failures", "must be at least 1"));
        }
        Ok(AlertsConfig {
            webhooks,
            after_failures,
            expiry_warning: self.duration("alerts.expiry_warning", raw.expiry_warning, "15m")?,
        })
    }

    fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let listen = self.addr(
            "server.listen",
            "TOKENRELAY_LISTEN",
            raw.listen,
            "127.0.0.1:8080",
        )?;
        let admin_listen = self.addr(
            "server.admin_listen",
            "TOKENRELAY_ADMIN_LISTEN",
            raw.admin_listen,
            "127.0.0.1:9090",
        )?;
        let client_keys = raw
            .client_keys
            .iter()
            .enumerate()
            .map(|(i, k)| self.secret(&format!("server.client_keys[{i}]"), k))
            .collect::<Result<Vec<_>, _>>()?;
        let admin_token = match raw.admin_token.as_deref() {
            None | Some("") => None,
            Some(t) => Some(self.secret("server.admin_token", t)?),
        };
        if !listen.ip().is_loopback() && client_keys.is_empty() && !raw.allow_unauthenticated {
            return Err(self.err(
                "server.listen",
                format!("{listen} is reachable from other hosts but `server.client_keys` is empty: anyone could spend your credentials. Set `server.client_keys`, or set `server.allow_unauthenticated = true` if a network policy protects the port"),
            ));
        }
        if !admin_listen.ip().is_loopback() && admin_token.is_none() && !raw.allow_unauthenticated {
            return Err(self.err(
                "server.admin_listen",
                format!("{admin_listen} is reachable from other hosts but `server.admin_token` is empty. Set `server.admin_token`, or set `server.allow_unauthenticated = true` if a network policy protects the port"),
            ));
        }
        for (i, h) in raw.allowed_hosts.iter().enumerate() {
            browser::validate_host_rule(h)
                .map_err(|p| self.err(format!("server.allowed_hosts[{i}]"), p))?;
        }
        for (i, o) in raw.allowed_origins.iter().enumerate() {
            browser::validate_origin(o)
                .map_err(|p| self.err(format!("server.allowed_origins[{i}]"), p))?;
        }
        let max_request_body = match raw.max_request_body.as_deref() {
            None => 32 << 20,
            Some(s) => parse_size(s).map_err(|p| self.err("server.max_request_body", p))?,
        };
        let max_upload_body = match raw.max_upload_body.as_deref() {
            None => 2 << 30,
            Some(s) => parse_size(s).map_err(|p| self.err("server.max_upload_body", p))? as u64,
        };
        let upstream_ca = match raw.upstream_ca.as_deref() {
            None | Some("") => Vec::new(),
            Some(spec) => {
                use rustls_pki_types::pem::PemObject;
                let path =
                    expand_tilde(spec, self.env).map_err(|p| self.err("server.upstream_ca", p))?;
                let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&path)
                    .map_err(|e| {
                        self.err(
                            "server.upstream_ca",
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?
                    .collect::<Result<_, _>>()
                    .map_err(|e| {
                        self.err(
                            "server.upstream_ca",
                            format!("{}: not PEM certificates: {e}", path.display()),
                        )
                    })?;
                if certs.is_empty() {
                    return Err(self.err(
                        "server.upstream_ca",
                        format!("{} holds no CERTIFICATE block", path.display()),
                    ));
                }
                certs
            }
        };
        Ok(ServerConfig {
            upstream_ca,
            max_upload_body,
            listen,
            admin_listen,
            client_keys,
            admin_token,
            allow_unauthenticated: raw.allow_unauthenticated,
            max_request_body,
            upstream_connect_timeout: self.duration(
                "server.upstream_connect_timeout",
                raw.upstream_connect_timeout,
                "10s",
            )?,
            upstream_idle_timeout: self.duration(
                "server.upstream_idle_timeout",
                raw.upstream_idle_timeout,
                "5m",
            )?,
            upstream_keepalive: self.duration(
                "server.upstream_keepalive",
                raw.upstream_keepalive,
                "30s",
            )?,
            shutdown_grace: self.duration("server.shutdown_grace", raw.shutdown_grace, "30s")?,
            max_connections: match raw.max_connections {
                Some(0) => return Err(self.err("server.max_connections", "must be at least 1")),
                n => n.unwrap_or(4096),
            },
            max_header_bytes: match raw.max_header_bytes.as_deref() {
                None => 64 << 10,
                Some(s) => {
                    match parse_size(s).map_err(|p| self.err("server.max_header_bytes", p))? {
                        n if n < 8192 => {
                            return Err(self.err("server.max_header_bytes", "must be at least 8KiB"))
                        }
                        n => n,
                    }
                }
            },
            max_headers: match raw.max_headers {
                Some(0) => return Err(self.err("server.max_headers", "must be at least 1")),
                n => n.unwrap_or(100),
            },
            proxy_threads: match raw.proxy_threads {
                Some(0) => return Err(self.err("server.proxy_threads", "must be at least 1")),
                Some(n) => n,
                None => std::thread::available_parallelism().map_or(2, |n| n.get()),
            },
            header_read_timeout: self.duration(
                "server.header_read_timeout",
                raw.header_read_timeout,
                "10s",
            )?,
            allowed_hosts: raw.allowed_hosts,
            allowed_origins: raw.allowed_origins,
        })
    }

    fn provider(&self, name: &str, raw: RawProvider) -> Result<ProviderConfig, ConfigError> {
        let key = |k: &str| format!("providers.{name}.{k}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(self.err(
                format!("providers.{name}"),
                "provider names may use only letters, digits, '-' and '_' (they are the first path segment)",
            ));
        }
        let preset = providers::preset(name);
        let (kind, upstream, token_url, client_id, default_creds, env_var) = (
            preset.kind,
            preset.upstream,
            preset.token_url,
            preset.client_id,
            preset.default_credentials,
            preset.env_credentials,
        );
        let region_upstream = match (kind, raw.region.as_deref()) {
            (ProviderKind::Dashscope, region) => {
                let region = region.unwrap_or(dashscope::DEFAULT_REGION);
                match dashscope::upstream_for(region) {
                    Some(u) => Some(u),
                    None => {
                        let known: Vec<&str> = dashscope::REGIONS.iter().map(|(r, _)| *r).collect();
                        return Err(self.err(
                            key("region"),
                            format!(
                                "unknown region {region:?}; one of {} (keys are per region), or set upstream",
                                known.join(", ")
                            ),
                        ));
                    }
                }
            }
            (_, Some(_)) => {
                return Err(self.err(key("region"), "only the dashscope preset has regions"))
            }
            (_, None) => None,
        };
        let raw_upstream = raw.upstream.as_deref().or(upstream).or(region_upstream);
        let upstream_template = raw_upstream
            .filter(|u| u.contains(vertex::PLACEHOLDER))
            .map(str::to_string);
        let upstream = match raw_upstream {
            Some(u) if u.contains(vertex::PLACEHOLDER) => {
                self.url(&key("upstream"), &vertex::base_for(u, "global"))?
            }
            Some(u) => self.url(&key("upstream"), u)?,
            None => {
                return Err(self.err(
                    key("upstream"),
                    "required for a custom provider (e.g. \"https://api.example.com\")",
                ))
            }
        };
        let token_url = match raw.token_url.as_deref().or(token_url) {
            Some(u) => Some(self.url(&key("token_url"), u)?),
            None => None,
        };
        let key_header = match raw.api_key_header.as_deref() {
            None => kind.key_header(None),
            Some(h) if kind == ProviderKind::Custom => {
                let name = HeaderName::from_bytes(h.trim().as_bytes()).map_err(|_| {
                    self.err(key("api_key_header"), format!("{h:?} is not a header name"))
                })?;
                kind.key_header(Some(&name))
            }
            Some(_) => {
                return Err(self.err(
                    key("api_key_header"),
                    "only a custom provider chooses its key header (the presets know theirs)",
                ))
            }
        };
        let client_id = raw
            .client_id
            .filter(|c| !c.is_empty())
            .or(client_id.map(String::from));
        let client_secret = match raw.client_secret.as_deref() {
            None | Some("") => None,
            Some(s) => Some(self.secret(&key("client_secret"), s)?),
        };
        let mut credentials = Vec::new();
        match raw.credentials {
            Some(entries) => {
                for (i, e) in entries.into_iter().enumerate() {
                    let origin = format!("providers.{name}.credentials[{i}]");
                    let (spec, id, optional) = match e {
                        RawCredentialEntry::Path(p) => (p, None, false),
                        RawCredentialEntry::Table(t) => (t.path, t.id, t.optional),
                    };
                    if let Some(id) = &id {
                        validate_id(id).map_err(|p| self.err(format!("{origin}.id"), p))?;
                    }
                    credentials.push(self.entry(spec, id, optional, origin)?);
                }
            }
            None => {
                // The preset's well-known location; skipped when there is no HOME.
                if let Some(Ok(e)) =
                    default_creds.map(|d| self.entry(d.to_string(), None, true, key("credentials")))
                {
                    credentials.push(e);
                }
            }
        }
        if let Some(var) = env_var {
            if let Some(v) = (self.env)(var) {
                for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    credentials.push(self.entry(p.to_string(), None, false, var.to_string())?);
                }
            }
        }
        for c in &credentials {
            c.resolve().map_err(|p| self.err(c.origin.clone(), p))?;
        }
        let mut api_keys = Vec::new();
        for (i, k) in raw.api_keys.into_iter().enumerate() {
            let at = key(&format!("api_keys[{i}]"));
            let (spec, id) = match k {
                RawApiKey::Key(spec) => (spec, None),
                RawApiKey::Table(t) => (t.key, t.id),
            };
            if let Some(id) = &id {
                validate_id(id).map_err(|p| self.err(format!("{at}.id"), p))?;
            }
            api_keys.push(ApiKey {
                id,
                key: self.secret(&at, &spec)?,
            });
        }
        let api_keys_file = match raw.api_keys_file.as_deref() {
            None | Some("") => None,
            Some(spec) => {
                let path =
                    expand_tilde(spec, self.env).map_err(|p| self.err(key("api_keys_file"), p))?;
                read_key_file(&path).map_err(|p| self.err(key("api_keys_file"), p))?;
                Some(path)
            }
        };
        let locations: Vec<String> = match raw.locations.clone() {
            Some(l) => l,
            None => vertex::DEFAULT_LOCATIONS
                .iter()
                .map(|l| l.to_string())
                .collect(),
        };
        for (i, l) in locations.iter().enumerate() {
            if l.is_empty()
                || !l
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(self.err(
                    format!("providers.{name}.locations[{i}]"),
                    format!("{l:?} is not a location (e.g. \"us-central1\", \"global\")"),
                ));
            }
        }
        if upstream_template.is_none() && raw.locations.is_some() {
            return Err(self.err(
                key("locations"),
                "only an upstream with {location} (the vertex preset) chooses a location",
            ));
        }
        let mut resolve = Vec::new();
        for (host, addr) in raw.resolve {
            let ip = addr.parse().map_err(|_| {
                self.err(
                    format!("providers.{name}.resolve.{host}"),
                    format!("{addr:?} is not an IP address"),
                )
            })?;
            resolve.push((host.to_ascii_lowercase(), ip));
        }
        let authorize_url = match raw.authorize_url.as_deref().or(match kind {
            ProviderKind::Gemini | ProviderKind::Vertex => Some(login::GOOGLE_AUTHORIZE_URL),
            _ => None,
        }) {
            Some(u) => Some(self.url(&key("authorize_url"), u)?),
            None => None,
        };
        let device_url = match raw.device_url.as_deref().or(match kind {
            ProviderKind::Qwen => Some(login::QWEN_DEVICE_URL),
            _ => None,
        }) {
            Some(u) => Some(self.url(&key("device_url"), u)?),
            None => None,
        };
        let login_scopes = raw.login_scopes.unwrap_or_else(|| {
            let mut s = match kind {
                ProviderKind::Qwen => vec![login::QWEN_SCOPE.to_string()],
                _ => vec![
                    "openid".to_string(),
                    "https://www.googleapis.com/auth/userinfo.email".to_string(),
                    login::CLOUD_PLATFORM.to_string(),
                ],
            };
            if kind == ProviderKind::Gemini {
                s.push(login::RETRIEVER.to_string());
            }
            s
        });
        if token_url.is_none()
            && (!credentials.is_empty()
                || kind == ProviderKind::Custom && api_keys.is_empty() && api_keys_file.is_none())
        {
            return Err(self.err(
                key("token_url"),
                "required for a provider with credential files (the OAuth token endpoint)",
            ));
        }
        let scopes = raw
            .scopes
            .unwrap_or_else(|| vec![google::CLOUD_PLATFORM_SCOPE.to_string()]);
        Ok(ProviderConfig {
            name: name.to_string(),
            kind,
            upstream,
            token_url,
            client_id,
            client_secret,
            scopes,
            credentials,
            api_keys,
            api_keys_file,
            key_header,
            upstream_template,
            locations,
            resolve,
            authorize_url,
            device_url,
            login_scopes,
        })
    }

    fn entry(
        &self,
        spec: String,
        id: Option<String>,
        optional: bool,
        origin: String,
    ) -> Result<CredentialEntry, ConfigError> {
        if spec.trim().is_empty() {
            return Err(self.err(origin, "empty path"));
        }
        let pattern = expand_tilde(&spec, self.env).map_err(|p| self.err(origin.clone(), p))?;
        Ok(CredentialEntry {
            spec,
            pattern,
            id,
            optional,
            origin,
        })
    }

    fn duration(
        &self,
        key: &str,
        value: Option<String>,
        default: &str,
    ) -> Result<Duration, ConfigError> {
        let s = value.as_deref().unwrap_or(default);
        parse_duration(s).map_err(|p| self.err(key, p))
    }

    fn addr(
        &self,
        key: &str,
        env_var: &str,
        value: Option<String>,
        default: &str,
    ) -> Result<SocketAddr, ConfigError> {
        let (key, s) = match (self.env)(env_var).filter(|v| !v.is_empty()) {
            Some(v) => (env_var.to_string(), v),
            None => (
                key.to_string(),
                value.unwrap_or_else(|| default.to_string()),
            ),
        };
        s.parse().map_err(|_| {
            self.err(
                key,
                format!("{s:?} is not an address like \"127.0.0.1:8080\" or \"[::1]:8080\""),
            )
        })
    }

    fn url(&self, key: &str, s: &str) -> Result<Url, ConfigError> {
        let url = Url::parse(s).map_err(|e| self.err(key, format!("{s:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(self.err(
                key,
                format!("{s:?} must be an http:// or https:// URL with a host"),
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.err(key, "must not carry a user name or password"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(self.err(key, "must not carry a query string or fragment"));
        }
        Ok(url)
    }

    /// A secret given literally, as `env:NAME` or as `file:PATH`.
    fn secret(&self, key: &str, spec: &str) -> Result<SecretString, ConfigError> {
        if let Some(var) = spec.strip_prefix("env:") {
            return match (self.env)(var) {
                Some(v) if !v.trim().is_empty() => Ok(SecretString::from(v.trim().to_string())),
                _ => Err(self.err(
                    key,
                    format!("environment variable {var} is not set or empty"),
                )),
            };
        }
        if let Some(path) = spec.strip_prefix("file:") {
            let p = expand_tilde(path, self.env).map_err(|p| self.err(key, p))?;
            let v = std::fs::read_to_string(&p)
                .map_err(|e| self.err(key, format!("cannot read secret file {path:?}: {e}")))?;
            let v = v.trim();
            if v.is_empty() {
                return Err(self.err(key, format!("secret file {path:?} is empty")));
            }
            return Ok(SecretString::from(v.to_string()));
        }
        if spec.trim().is_empty() {
            return Err(self.err(key, "empty value"));
        }
        Ok(SecretString::from(spec.to_string()))
    }
}

/// Credential ids appear in URLs, metrics and logs.
/// The keys of an `api_keys_file`: one per line, blank lines and `#` comments ignored.
/// Errors name the line, never its content.
pub fn read_key_file(path: &Path) -> Result<Vec<SecretString>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{} line {}: a key may not contain spaces (one key per line)",
                path.display(),
                i + 1
            ));
        }
        keys.push(SecretString::from(line.to_string()));
    }
    Ok(keys)
}

pub fn validate_id(id: &str) -> Result<(), String> {
    if !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(())
    } else {
        Err(format!(
            "{id:?} is not a valid id: use 1-128 letters, digits, '-', '_' or '.'"
        ))
    }
}

fn expand_tilde(spec: &str, env: EnvLookup) -> Result<PathBuf, String> {
    if spec == "~" || spec.starts_with("~/") {
        let home = env("HOME")
            .filter(|h| !h.is_empty())
            .ok_or("`~` used but HOME is not set")?;
        return Ok(PathBuf::from(format!("{home}{}", &spec[1..])));
    }
    Ok(PathBuf::from(spec))
}

/// Parses "90s", "5m", "1h30m", "250ms".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like \"30s\", \"5m\" or \"1h\": {e}"))
}

/// Parses "32MiB", "512KiB", "10MB", "1048576".
pub fn parse_size(s: &str) -> Result<usize, String> {
    let bad =
        || format!("{s:?} is not a size like \"32MiB\", \"512KiB\", \"10MB\" or a number of bytes");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(k: &str) -> Option<String> {
        (k == "HOME").then(|| "/nonexistent".to_string())
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("32MiB"), Ok(32 << 20));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5x").is_err());
    }

    #[test]
    fn defaults_give_both_presets_with_optional_default_files() {
        let c = Config::from_toml("", "built-in defaults", &no_env).unwrap();
        let names: Vec<_> = c.providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["gemini", "qwen"]);
        assert!(c
            .providers
            .iter()
            .all(|p| p.credentials.iter().all(|e| e.optional)));
        assert_eq!(c.server.max_request_body, 32 << 20);
    }
}
