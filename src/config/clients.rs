//! `[[clients]]`: named clients, each with its key, what it may use (providers, model
//! globs) and its limits (`rpm`, `tpm`, `tokens_per_day`, `tokens_per_month`).

use secrecy::{ExposeSecret, SecretString};

use super::raw::RawClient;
use super::{ConfigError, Validator};

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// In logs, metrics and the admin API; never the key.
    pub name: String,
    pub key: SecretString,
    /// The providers it may use (`None`: all).
    pub providers: Option<Vec<String>>,
    /// Model globs it may use (`None`: all).
    pub models: Option<Vec<glob::Pattern>>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub tokens_per_month: Option<u64>,
}

impl ClientConfig {
    /// Whether any window limits it.
    pub fn has_limits(&self) -> bool {
        self.rpm.is_some()
            || self.tpm.is_some()
            || self.tokens_per_day.is_some()
            || self.tokens_per_month.is_some()
    }
}

impl Validator<'_> {
    pub(super) fn clients(
        &self,
        raw: Vec<RawClient>,
        providers: &[String],
        unnamed: &[SecretString],
    ) -> Result<Vec<ClientConfig>, ConfigError> {
        let mut out: Vec<ClientConfig> = Vec::new();
        for (i, c) in raw.into_iter().enumerate() {
            let at = |field: &str| format!("clients[{i}].{field}");
            super::provider::validate_id(&c.name).map_err(|p| self.err(at("name"), p))?;
            if c.name == "-" || out.iter().any(|o| o.name == c.name) {
                return Err(self.err(
                    at("name"),
                    format!("{:?} is taken: give every client its own name", c.name),
                ));
            }
            let key = self.secret(&at("key"), &c.key)?;
            // One key, one client: a shared key could never tell them apart.
            let taken = out
                .iter()
                .map(|o| &o.key)
                .chain(unnamed)
                .any(|k| k.expose_secret() == key.expose_secret());
            if taken {
                return Err(self.err(
                    at("key"),
                    "this key is already another client's (or one of server.client_keys): give every client its own key",
                ));
            }
            if let Some(list) = &c.providers {
                if let Some(unknown) = list.iter().find(|p| !providers.contains(p)) {
                    return Err(self.err(
                        at("providers"),
                        format!(
                            "{unknown:?} is not a configured provider (configured: {})",
                            providers.join(", ")
                        ),
                    ));
                }
            }
            let models = match c.models {
                None => None,
                Some(globs) => Some(
                    globs
                        .iter()
                        .map(|g| {
                            glob::Pattern::new(g).map_err(|e| {
                                self.err(at("models"), format!("{g:?} is not a glob: {e}"))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            for (field, v) in [
                ("rpm", c.rpm),
                ("tpm", c.tpm),
                ("tokens_per_day", c.tokens_per_day),
                ("tokens_per_month", c.tokens_per_month),
            ] {
                if v == Some(0) {
                    return Err(self.err(at(field), "must be above 0 (leave it out for no limit)"));
                }
            }
            out.push(ClientConfig {
                name: c.name,
                key,
                providers: c.providers,
                models,
                rpm: c.rpm,
                tpm: c.tpm,
                tokens_per_day: c.tokens_per_day,
                tokens_per_month: c.tokens_per_month,
            });
        }
        Ok(out)
    }
}
