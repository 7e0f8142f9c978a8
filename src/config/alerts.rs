//! `[alerts]`: the webhooks (`telemetry::alert` delivers to them) and the alert thresholds.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::raw::RawAlerts;
use super::{ConfigError, Validator};

/// How a webhook's message is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    Discord,
    Slack,
    Json,
}

/// One `[[alerts.webhooks]]` entry.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: SecretString,
    pub format: WebhookFormat,
    pub min_interval: Duration,
}

/// `[alerts]`: where alert messages go and when a failing credential is worth one.
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    pub webhooks: Vec<WebhookConfig>,
    pub after_failures: u32,
    pub expiry_warning: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhooks: Vec::new(),
            after_failures: 3,
            expiry_warning: Duration::from_secs(15 * 60),
        }
    }
}

impl Validator<'_> {
    pub(super) fn alerts(&self, raw: RawAlerts) -> Result<AlertsConfig, ConfigError> {
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
                None | Some("json") => WebhookFormat::Json,
                Some("discord") => WebhookFormat::Discord,
                Some("slack") => WebhookFormat::Slack,
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
}
