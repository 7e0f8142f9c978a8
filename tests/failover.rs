//! Rotation and failover: while one credential can serve, clients never see another's
//! failure; when none can, the answer says why and what to do.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;

/// Three Qwen credentials a, b, c with tokens valid for an hour, tried in order a, b, c.
async fn three(strategy: &str) -> TestApp {
    spawn_app(Flavor::Qwen)
        .toml(&format!(
            "[pool]\nstrategy = \"{strategy}\"\ndefault_cooldown = \"7s\"\nmax_cooldown = \"10m\""
        ))
        .cred("a.json", qwen_cred("access-a", "rt-a"))
        .cred("b.json", qwen_cred("access-b", "rt-b"))
        .cred("c.json", qwen_cred("access-c", "rt-c"))
        .access_token("access-a")
        .access_token("access-b")
        .access_token("access-c")
        .refresh_token("rt-a")
        .refresh_token("rt-b")
        .refresh_token("rt-c")
        .start()
        .await
}

async fn served_by(t: &TestApp) -> String {
    let r = t.post("/qwen/v1/chat/completions", json!({})).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    r.headers()["x-tokenrelay-credential"]
        .to_str()
        .unwrap()
        .to_string()
}

fn limit(t: &TestApp, token: &str, l: Limit) {
    t.upstream
        .state
        .rate_limited
        .lock()
        .unwrap()
        .insert(token.to_string(), l);
}

#[tokio::test]
async fn round_robin_spreads_and_fill_first_sticks() {
    let t = three("round_robin").await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(served_by(&t).await);
    }
    ids.sort();
    assert_eq!(ids, ["a", "a", "b", "b", "c", "c"]);
    let t = three("fill_first").await;
    for _ in 0..4 {
        assert_eq!(served_by(&t).await, "a");
    }
}

#[tokio::test]
async fn still_unauthorized_after_a_refresh_moves_to_the_next_credential() {
    let t = three("fill_first").await;
    // Account a is banned: its token is refused, and so is every token it refreshes to.
    t.tokens
        .state
        .unaccepted
        .lock()
        .unwrap()
        .insert("rt-a".into());
    t.tokens.state.valid.remove("access-a");
    let body = json!({"messages": [{"role": "user", "content": "x"}]});
    let r = t.post("/qwen/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tokenrelay-credential"], "b");
    let seen = t.upstream.seen();
    assert_eq!(seen.len(), 3, "a, a after refresh, then b");
    assert!(
        seen.iter()
            .all(|s| s.body == serde_json::to_vec(&body).unwrap()),
        "the same body every time"
    );
    let m = t.metrics().await;
    assert!(
        m.contains(r#"tokenrelay_upstream_retries_total{provider="qwen",reason="unauthorized"} 2"#),
        "{m}"
    );
    assert_eq!(t.tokens.calls(), 1, "one refresh of a");
}

#[tokio::test]
async fn every_kind_of_rate_limit_hint_cools_the_credential_down() {
    // The lower bounds leave two seconds for a loaded machine between the answer and
    // the snapshot; every window still tells the hints apart.
    for (l, low, high) in [
        (Limit::Seconds(120), 116, 120),
        (Limit::HttpDate(300), 293, 300),
        (Limit::RetryInfo, 42, 46),
        (Limit::QuotaForbidden, 5, 7),
    ] {
        let t = three("fill_first").await;
        limit(&t, "access-a", l);
        assert_eq!(served_by(&t).await, "b", "{l:?}");
        let a = t.credential_handle("qwen", "a");
        let left = a.snapshot().cooldown_remaining.unwrap().as_secs();
        assert!((low..=high).contains(&left), "{l:?}: cooldown {left}s");
        assert_eq!(t.credential("a").await["state"], "cooling_down");
        // Cooling down: skipped without another upstream call.
        let before = t.upstream.seen().len();
        assert_eq!(served_by(&t).await, "b");
        assert_eq!(t.upstream.seen().len(), before + 1);
        t.assert_metric(
            r#"tokenrelay_upstream_retries_total{provider="qwen",reason="rate_limited"} 1"#,
        )
        .await;
    }
}

#[tokio::test]
async fn a_year_of_retry_after_is_capped_at_max_cooldown() {
    let t = three("fill_first").await;
    limit(&t, "access-a", Limit::Seconds(365 * 86_400));
    assert_eq!(served_by(&t).await, "b");
    let a = t.credential_handle("qwen", "a");
    assert_eq!(
        a.snapshot()
            .cooldown_remaining
            .unwrap()
            .as_secs()
            .div_ceil(60),
        10
    );
}

#[tokio::test]
async fn a_cooled_credential_serves_again_when_its_time_has_passed() {
    let t = three("fill_first").await;
    limit(&t, "access-a", Limit::Seconds(1));
    assert_eq!(served_by(&t).await, "b");
    assert_eq!(served_by(&t).await, "b");
    t.upstream.state.rate_limited.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(served_by(&t).await, "a");
}

#[tokio::test]
async fn all_rate_limited_answers_429_with_the_soonest_retry_after() {
    let t = three("round_robin").await;
    limit(&t, "access-a", Limit::Seconds(300));
    limit(&t, "access-b", Limit::Seconds(40));
    limit(&t, "access-c", Limit::Seconds(100));
    let r = t
        .post("/qwen/v1/chat/completions", json!({"stream": true}))
        .await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "40");
    assert_eq!(
        r.headers()["content-type"],
        "application/json",
        "plain JSON even for a stream request"
    );
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["reason"], "all_credentials_rate_limited");
    // Asked again: all are cooling down, nothing is sent upstream, the hint shrinks.
    let before = t.upstream.seen().len();
    let r = t.post("/qwen/v1/chat/completions", json!({})).await;
    assert_eq!(r.status(), 429);
    let secs: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((39..=40).contains(&secs), "{secs}");
    assert_eq!(t.upstream.seen().len(), before);
}

#[tokio::test]
async fn connection_refused_moves_to_the_next_credential() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut unreachable = qwen_cred("access-a", "rt-a");
    unreachable["resource_url"] = Value::from(dead);
    let t = spawn_app(Flavor::Qwen)
        .toml("[pool]\nstrategy = \"fill_first\"")
        .cred("a.json", unreachable)
        .cred("b.json", qwen_cred("access-b", "rt-b"))
        .access_token("access-a")
        .access_token("access-b")
        .start()
        .await;
    assert_eq!(served_by(&t).await, "b");
    t.assert_metric(
        r#"tokenrelay_upstream_retries_total{provider="qwen",reason="connect_error"} 1"#,
    )
    .await;
}

#[tokio::test]
async fn nothing_reachable_is_502_upstream_unreachable() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut a = qwen_cred("access-a", "rt-a");
    a["resource_url"] = Value::from(dead);
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", a)
        .access_token("access-a")
        .start()
        .await;
    let r = t.post("/qwen/v1/chat/completions", json!({})).await;
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["reason"], "upstream_unreachable");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("qwen/a"),
        "{e}"
    );
}

#[tokio::test]
async fn a_forbidden_answer_that_is_not_about_quota_passes_through() {
    let t = three("fill_first").await;
    let r = t.post("/qwen/status/403", json!({})).await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-tokenrelay-credential"], "a");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], 403, "the body arrives intact");
    assert_eq!(t.credential("a").await["state"], "ready");
}

#[tokio::test]
async fn a_large_error_page_passes_through_whole() {
    let t = three("fill_first").await;
    let r = t.post("/qwen/big/403", json!({})).await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-tokenrelay-credential"], "a");
    assert_eq!(r.bytes().await.unwrap().len(), 200_000);
    assert_eq!(
        t.credential("a").await["state"],
        "ready",
        "not mistaken for a quota error"
    );
}

#[tokio::test]
async fn the_request_deadline_bounds_the_whole_attempt_sequence() {
    let t = spawn_app(Flavor::Qwen)
        .toml("[pool]\nrequest_deadline = \"300ms\"\n[refresh]\ntimeout = \"5s\"")
        .cred("a.json", expired_qwen("rt-a"))
        .refresh_token("rt-a")
        .token_fault(TokenFault::Delay(Duration::from_secs(3)))
        .start()
        .await;
    let started = Instant::now();
    let r = t.post("/qwen/v1/chat/completions", json!({})).await;
    assert_eq!(r.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(2));
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["reason"], "deadline_exceeded");
}

/// 1,000 requests at concurrency 50 while, midway, one of three credentials is revoked
/// and another is rate-limited: the client sees only 2xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_revocation_and_rate_limit_midway_are_invisible_to_clients() {
    let t = three("round_robin").await;
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(50));
    let mut tasks = Vec::new();
    for i in 0..1000 {
        if i == 300 {
            // a is revoked: its access token stops working and its refresh token is dead.
            t.upstream.state.valid.remove("access-a");
            t.tokens.revoke("rt-a");
        }
        if i == 500 {
            limit(&t, "access-b", Limit::Seconds(3600));
        }
        let permit = std::sync::Arc::clone(&sem).acquire_owned().await.unwrap();
        let (http, url) = (
            t.http.clone(),
            format!("{}/qwen/v1/chat/completions", t.proxy),
        );
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).json(&json!({"i": i})).send().await.unwrap();
            drop(permit);
            r.status().as_u16()
        }));
    }
    let mut non_2xx = Vec::new();
    for task in tasks {
        let status = task.await.unwrap();
        if !(200..300).contains(&status) {
            non_2xx.push(status);
        }
    }
    assert!(
        non_2xx.is_empty(),
        "{} non-2xx answers: {:?}",
        non_2xx.len(),
        &non_2xx[..non_2xx.len().min(10)]
    );
    assert_eq!(t.credential("a").await["state"], "needs_reauth");
    assert_eq!(t.credential("b").await["state"], "cooling_down");
    assert_eq!(t.credential("c").await["state"], "ready");
}
