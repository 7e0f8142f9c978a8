//! Alert webhooks against a local receiver: one message per transition, retried delivery.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::helpers::*;

#[derive(Default)]
struct Receiver {
    messages: Mutex<Vec<Value>>,
    /// Answer 500 to this many deliveries first.
    fail_first: AtomicUsize,
}

async fn receive(State(r): State<Arc<Receiver>>, Json(v): Json<Value>) -> StatusCode {
    if r.fail_first.load(Ordering::SeqCst) > 0 {
        r.fail_first.fetch_sub(1, Ordering::SeqCst);
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    r.messages.lock().unwrap().push(v);
    StatusCode::NO_CONTENT
}

async fn receiver() -> (Arc<Receiver>, String) {
    let r = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/hook/secret-webhook-token",
        listener.local_addr().unwrap()
    );
    let app = Router::new()
        .route("/hook/{token}", post(receive))
        .with_state(Arc::clone(&r));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (r, url)
}

fn events(r: &Receiver) -> Vec<String> {
    r.messages
        .lock()
        .unwrap()
        .iter()
        .map(|m| m["event"].as_str().unwrap_or("?").to_string())
        .collect()
}

async fn wait_events(r: &Receiver, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while events(r) != want {
        assert!(
            Instant::now() < deadline,
            "got {:?}, want {want:?}",
            events(r)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn repeated_failures_alert_once_and_recovery_is_announced() {
    let (r, url) = receiver().await;
    let t = spawn_app(Flavor::Qwen)
        .toml(&format!(
            "[alerts]\nafter_failures = 2\n[[alerts.webhooks]]\nurl = \"{url}\"\nformat = \"json\""
        ))
        .cred("a.json", expired_qwen("rt-a"))
        .refresh_token("rt-a")
        .token_fault(TokenFault::Status(503, json!({})))
        .start()
        .await;
    // Backoff 1 s, 2 s: the second failure comes within ~3 s; a third must not alert again.
    wait_events(&r, &["refresh_failing"]).await;
    let first = r.messages.lock().unwrap()[0].clone();
    assert_eq!(first["provider"], "qwen");
    assert_eq!(first["credential"], "a");
    assert!(
        first["message"].as_str().unwrap().contains("HTTP 503"),
        "{first}"
    );
    t.tokens.set_fault(None);
    wait_events(&r, &["refresh_failing", "recovered"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(events(&r), ["refresh_failing", "recovered"], "no flood");
}

#[tokio::test]
async fn needs_reauth_alerts_once_with_the_fix_and_delivery_is_retried() {
    let (r, url) = receiver().await;
    r.fail_first.store(1, Ordering::SeqCst);
    let t = spawn_app(Flavor::Qwen)
        .toml(&format!(
            "[[alerts.webhooks]]\nurl = \"{url}\"\nformat = \"json\""
        ))
        .cred("a.json", expired_qwen("rt-revoked"))
        .start()
        .await;
    wait_events(&r, &["needs_reauth"]).await;
    let m = r.messages.lock().unwrap()[0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(m.contains("invalid_request") && m.contains("qwen"), "{m}");
    // More requests hit the dead credential; still one message.
    for _ in 0..3 {
        let _ = t.post("/qwen/v1/chat/completions", json!({})).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(events(&r), ["needs_reauth"]);
}

#[tokio::test]
async fn discord_and_slack_get_their_own_shape() {
    let (discord, durl) = receiver().await;
    let (slack, surl) = receiver().await;
    let _t = spawn_app(Flavor::Qwen)
        .toml(&format!(
            "[[alerts.webhooks]]\nurl = \"{durl}\"\nformat = \"discord\"\n[[alerts.webhooks]]\nurl = \"{surl}\"\nformat = \"slack\"\nmin_interval = \"1s\""
        ))
        .cred("a.json", expired_qwen("rt-revoked"))
        .start()
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while discord.messages.lock().unwrap().is_empty() || slack.messages.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let d = discord.messages.lock().unwrap()[0].clone();
    assert!(
        d["content"]
            .as_str()
            .unwrap()
            .starts_with("🔴 tokenrelay: qwen/a: needs re-authentication"),
        "{d}"
    );
    let s = slack.messages.lock().unwrap()[0].clone();
    assert!(s["text"].as_str().unwrap().contains("qwen/a"), "{s}");
}

#[tokio::test]
async fn a_failing_write_back_alerts_once() {
    let (r, url) = receiver().await;
    let t = spawn_app(Flavor::Qwen).refresh_token("rt-a").start().await;
    let path = write_cred(t.dir.path(), "a.json", &qwen_cred("a-access", "rt-a"));
    let webhook = format!("[[alerts.webhooks]]\nurl = \"{url}\"");
    let (cred, _) = unsavable_credential(&t, &path, "a", true, &webhook);
    for _ in 0..3 {
        cred.force_refresh()
            .await
            .expect("the token is used from memory");
    }
    wait_events(&r, &["persist_failed"]).await;
    let m = r.messages.lock().unwrap()[0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(m.contains("lives only in memory"), "{m}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        events(&r),
        ["persist_failed"],
        "one message for three failures"
    );
}
