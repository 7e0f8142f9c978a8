//! Configuration: a `RawConfig` as serde reads it from TOML (`raw.rs`), then one
//! `Validator` that turns it into a [`Config`] with parsed addresses, URLs, durations,
//! sizes and resolved secrets. One file per section: `server.rs`, `provider.rs`,
//! `store.rs`, `alerts.rs`; text values (durations, sizes, `~`) in `values.rs`.
//!
//! Every error names the file, the key and the problem. This module never touches
//! the network and never reads a credential file (it only checks that named files
//! exist); credential parsing lives in `store::shape`. It depends only on `providers`
//! (presets) and `store::redis::RedisConfig`.

mod alerts;
mod clients;
mod provider;
mod raw;
mod server;
mod store;
mod usage;
mod values;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

pub use self::alerts::{AlertsConfig, WebhookConfig, WebhookFormat};
pub use self::clients::ClientConfig;
pub use self::provider::{
    read_key_file, validate_id, ApiKey, CredentialEntry, CredentialPath, ProviderConfig,
};
pub use self::server::{validate_host_rule, validate_origin, ServerConfig};
pub use self::store::StoreConfig;
pub use self::usage::UsageConfig;
pub use self::values::{parse_duration, parse_size};
pub use crate::providers::ProviderKind;
use raw::{RawConfig, RawProvider};
use values::expand_tilde;

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
    /// `[[clients]]`: named clients with their keys, scopes and limits.
    pub clients: Vec<ClientConfig>,
    /// `[usage]`: where usage and budgets are kept on one machine.
    pub usage: UsageConfig,
    /// The file this came from (`None`: built-in defaults or text): re-read on reload
    /// for `[[clients]]` and `server.client_keys`.
    pub path: Option<PathBuf>,
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
        let mut config = Self::from_toml(&text, &file, env)?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates TOML text; `file` names it in errors.
    pub fn from_toml(text: &str, file: &str, env: EnvLookup) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            message: parse_message(&e, text),
        })?;
        Validator { file, env }.config(raw)
    }
}

/// A TOML error as its position and message, without the source line toml quotes (the
/// line may hold a literal secret: a key, a token, a URL with a password).
fn parse_message(e: &toml::de::Error, text: &str) -> String {
    let message = without_quoted(e.message().trim_end());
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// A message with its double-quoted parts (values serde quotes: `invalid type: string
/// "…"`) elided: a value may be a secret.
fn without_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        if c == '"' {
            if !quoted {
                out.push_str("\"…\"");
            }
            quoted = !quoted;
        } else if !quoted {
            out.push(c);
        }
    }
    out
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
        let names: Vec<String> = providers.iter().map(|p| p.name.clone()).collect();
        let clients = self.clients(raw.clients, &names, &server.client_keys)?;
        let usage = self.usage(raw.usage, &refresh)?;
        Ok(Config {
            source: self.file.to_string(),
            server,
            refresh,
            pool,
            alerts,
            store,
            providers,
            clients,
            usage,
            path: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(k: &str) -> Option<String> {
        (k == "HOME").then(|| "/nonexistent".to_string())
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
