//! Alert webhooks: a message when a credential needs re-authentication, keeps failing to
//! refresh, cannot be written back, is about to expire without a successful refresh, and
//! when it recovers. One message per transition (the token lifecycle decides transitions;
//! this module only delivers), formatted for Discord, Slack or as plain JSON.
//!
//! Delivery never blocks the proxy or a refresh: events go into a bounded queue per
//! webhook and a task sends them, retrying with backoff and pacing by `min_interval`.
//! Webhook URLs carry secrets (Discord and Slack put the token in the path): they are
//! `SecretString`s and only their host is ever logged.

use std::time::Duration;

use secrecy::ExposeSecret;
use serde_json::json;
use tokio::sync::mpsc;

use crate::clock;
use crate::config::{AlertsConfig, WebhookConfig, WebhookFormat};

/// What happened to a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NeedsReauth,
    Invalid,
    RefreshFailing,
    PersistFailed,
    ExpiringSoon,
    /// The credential's file cannot be read or parsed (it serves from memory).
    SourceBroken,
    Recovered,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NeedsReauth => "needs_reauth",
            Kind::Invalid => "credential_invalid",
            Kind::RefreshFailing => "refresh_failing",
            Kind::PersistFailed => "persist_failed",
            Kind::ExpiringSoon => "expiring_soon",
            Kind::SourceBroken => "credential_file_broken",
            Kind::Recovered => "recovered",
        }
    }

    fn icon(self) -> &'static str {
        match self {
            Kind::NeedsReauth | Kind::Invalid => "🔴",
            Kind::RefreshFailing
            | Kind::ExpiringSoon
            | Kind::PersistFailed
            | Kind::SourceBroken => "🟠",
            Kind::Recovered => "🟢",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Event {
    pub kind: Kind,
    pub provider: String,
    pub credential: String,
    /// For people: what happened and what to do. Never a secret.
    pub message: String,
}

/// Hands events to the webhook tasks. Cloning is cheap; with no webhooks it does nothing.
#[derive(Clone, Default)]
pub struct Alerter {
    queues: Vec<mpsc::Sender<Event>>,
}

const QUEUE: usize = 256;

impl Alerter {
    /// Starts one delivery task per webhook.
    pub fn start(config: &AlertsConfig, client: reqwest::Client) -> Alerter {
        let queues = config
            .webhooks
            .iter()
            .map(|hook| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(deliver(hook.clone(), client.clone(), rx));
                tx
            })
            .collect();
        Alerter { queues }
    }

    /// Queues an event for every webhook; drops it (with a warning) if a queue is full.
    pub fn send(&self, event: Event) {
        tracing::info!(target: "tokenrelay::alert", kind = event.kind.as_str(), provider = %event.provider,
            credential = %event.credential, "{}", event.message);
        for q in &self.queues {
            if q.try_send(event.clone()).is_err() {
                tracing::warn!(target: "tokenrelay::alert", kind = event.kind.as_str(), "alert queue full; message dropped");
            }
        }
    }
}

fn body(format: WebhookFormat, e: &Event) -> serde_json::Value {
    let text = format!(
        "{} tokenrelay: {}/{}: {}",
        e.kind.icon(),
        e.provider,
        e.credential,
        e.message
    );
    match format {
        WebhookFormat::Discord => json!({ "content": text }),
        WebhookFormat::Slack => json!({ "text": text }),
        WebhookFormat::Json => json!({
            "event": e.kind.as_str(),
            "provider": e.provider,
            "credential": e.credential,
            "message": e.message,
            "timestamp": clock::rfc3339(clock::now_ms()),
        }),
    }
}

async fn deliver(hook: WebhookConfig, client: reqwest::Client, mut rx: mpsc::Receiver<Event>) {
    let host = reqwest::Url::parse(hook.url.expose_secret())
        .ok()
        .and_then(|u| u.host_str().map(String::from))
        .unwrap_or_default();
    while let Some(event) = rx.recv().await {
        let payload = body(hook.format, &event);
        let mut delay = Duration::from_secs(1);
        for attempt in 1..=5 {
            let sent = client
                .post(hook.url.expose_secret())
                .timeout(Duration::from_secs(10))
                .json(&payload)
                .send()
                .await;
            let retry_after = match sent {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => {
                    tracing::warn!(target: "tokenrelay::alert", webhook = %host, status = r.status().as_u16(), attempt,
                        "webhook refused the alert");
                    r.headers()
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(crate::common::retry_after::parse)
                }
                Err(e) => {
                    tracing::warn!(target: "tokenrelay::alert", webhook = %host, attempt,
                        error = %crate::common::error_chain(&e.without_url()), "webhook unreachable");
                    None
                }
            };
            if attempt == 5 {
                tracing::error!(target: "tokenrelay::alert", webhook = %host, kind = event.kind.as_str(), "alert not delivered");
                break;
            }
            tokio::time::sleep(retry_after.unwrap_or(delay).min(Duration::from_secs(60))).await;
            delay *= 2;
        }
        if !hook.min_interval.is_zero() {
            tokio::time::sleep(hook.min_interval).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_fit_each_service() {
        let e = Event {
            kind: Kind::NeedsReauth,
            provider: "qwen".into(),
            credential: "work".into(),
            message: "run `qwen`".into(),
        };
        assert_eq!(
            body(WebhookFormat::Discord, &e)["content"],
            "🔴 tokenrelay: qwen/work: run `qwen`"
        );
        assert_eq!(
            body(WebhookFormat::Slack, &e)["text"],
            "🔴 tokenrelay: qwen/work: run `qwen`"
        );
        let j = body(WebhookFormat::Json, &e);
        assert_eq!(j["event"], "needs_reauth");
        assert_eq!(j["credential"], "work");
    }
}
