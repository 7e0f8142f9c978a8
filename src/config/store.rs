//! `[store]`: credential files on one machine (the default), or Redis shared by a fleet.

use std::time::Duration;

use secrecy::SecretString;

use super::raw::RawStore;
use super::{ConfigError, RefreshConfig, Validator};

/// Where credentials live: files (one machine), or Redis shared by a fleet.
#[derive(Debug, Clone, Default)]
pub enum StoreConfig {
    #[default]
    File,
    Redis(crate::store::redis::RedisConfig),
}

impl Validator<'_> {
    pub(super) fn store(
        &self,
        raw: RawStore,
        refresh: &RefreshConfig,
    ) -> Result<StoreConfig, ConfigError> {
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
                let key = |name: &str, text: &str| -> Result<SecretString, ConfigError> {
                    let secret = self.secret(name, text)?;
                    crate::store::redis::seal::parse_key(&secret).map_err(|p| self.err(name, p))?;
                    Ok(secret)
                };
                let encryption_key = match raw.encryption_key.as_deref() {
                    None | Some("") => None,
                    Some(k) => Some(key("store.encryption_key", k)?),
                };
                let previous_keys = raw
                    .previous_keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| key(&format!("store.previous_keys[{i}]"), k))
                    .collect::<Result<Vec<_>, _>>()?;
                if encryption_key.is_none() && !previous_keys.is_empty() {
                    return Err(self.err(
                        "store.previous_keys",
                        "needs store.encryption_key: records are sealed again with it",
                    ));
                }
                let tls_ca = match raw.tls_ca.as_deref() {
                    None | Some("") => None,
                    Some(p) => {
                        use secrecy::ExposeSecret;
                        if !url.expose_secret().starts_with("rediss://") {
                            return Err(
                                self.err("store.tls_ca", "is for TLS: use a rediss:// store.url")
                            );
                        }
                        let path = super::values::expand_tilde(p, self.env)
                            .map_err(|e| self.err("store.tls_ca", e))?;
                        if !path.is_file() {
                            return Err(self.err(
                                "store.tls_ca",
                                format!("{} does not exist: the CA certificate (PEM) that signed the Redis server's", path.display()),
                            ));
                        }
                        Some(path)
                    }
                };
                Ok(StoreConfig::Redis(crate::store::redis::RedisConfig {
                    url,
                    key_prefix: raw.key_prefix.unwrap_or_else(|| "tokenrelay".into()),
                    lease,
                    poll_interval: self.duration("store.poll_interval", raw.poll_interval, "1s")?,
                    grace,
                    pubsub: raw.pubsub.unwrap_or(true),
                    op_timeout: self.duration("store.op_timeout", raw.op_timeout, "2s")?,
                    limit_timeout: self.duration(
                        "store.limit_timeout",
                        raw.limit_timeout,
                        "100ms",
                    )?,
                    encryption_key,
                    previous_keys,
                    tls_ca,
                }))
            }
            other => Err(self.err(
                "store.kind",
                format!("unknown store {other:?}: \"file\" (default) or \"redis\""),
            )),
        }
    }
}
