//! Fresh tokens: inline refresh, single flight, write-back and rotation.

use std::os::unix::fs::PermissionsExt;

use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn hundred_concurrent_requests_on_an_expired_token_cause_one_refresh() {
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", expired_qwen("rt-a"))
        .refresh_token("rt-a")
        .start()
        .await;
    let requests = (0..100).map(|_| t.post("/qwen/v1/chat/completions", json!({"q": 1})));
    let responses = futures_util::future::join_all(requests).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    assert_eq!(t.tokens.calls(), 1);
    t.assert_metric(
        r#"tokenrelay_token_refresh_total{credential="a",outcome="success",provider="qwen"} 1"#,
    )
    .await;
}

#[tokio::test]
async fn write_back_keeps_unknown_fields_expiry_unit_and_tightens_mode() {
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", expired_qwen("rt-a"))
        .refresh_token("rt-a")
        .start()
        .await;
    let before = now_ms();
    assert_eq!(
        t.post("/qwen/v1/chat/completions", json!({}))
            .await
            .status(),
        200
    );
    let path = t.cred_path("a.json");
    let file = read_json(&path);
    let access = file["access_token"].as_str().unwrap();
    assert!(access.starts_with("access-"), "new token written: {file}");
    assert_eq!(
        t.upstream.seen()[0].headers["authorization"],
        format!("Bearer {access}")
    );
    assert_eq!(file["custom_field"], json!({"kept": true}));
    assert_eq!(file["token_type"], "Bearer");
    let expiry = file["expiry_date"]
        .as_i64()
        .expect("expiry_date stays an integer");
    assert!(
        expiry > before + 3_500_000 && expiry < before + 3_700_000,
        "expiry_date stays milliseconds: {expiry}"
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // No temp files left behind.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[tokio::test]
async fn seed_shapes_keep_seconds_and_expires_in() {
    let t = spawn_app(Flavor::Google)
        .cred("seed.json", json!({
            "type": "authorized_user", "client_id": GOOGLE_CLIENT, "client_secret": "s",
            "refresh_token": "rt-seed", "access_token": "old", "expires_at": 1645123456.1234, "expires_in": 3600
        }))
        .cred("relative.json", json!({"access_token": "old2", "refresh_token": "rt-rel", "expires_in": 1}))
        .refresh_token("rt-seed")
        .refresh_token("rt-rel")
        .provider_keys(&format!("client_id = \"{GOOGLE_CLIENT}\""))
        .start()
        .await;
    let r = t
        .http
        .post(format!("{}/admin/refresh", t.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let seed = read_json(&t.cred_path("seed.json"));
    let secs = seed["expires_at"].as_f64().unwrap();
    let now = now_ms() as f64 / 1000.0;
    assert!(
        secs > now + 3500.0 && secs < now + 3700.0,
        "expires_at stays seconds: {secs}"
    );
    assert_eq!(seed["expires_in"], 3599);
    assert_eq!(seed["type"], "authorized_user");
    let rel = read_json(&t.cred_path("relative.json"));
    assert_eq!(rel["expires_in"], 3599);
    assert!(
        rel.get("expires_at").is_none(),
        "a file with only expires_in keeps only expires_in: {rel}"
    );
}

#[tokio::test]
async fn qwen_rotation_is_persisted_and_survives_a_restart() {
    let mut t = spawn_app(Flavor::Qwen)
        .cred("a.json", expired_qwen("rt-original"))
        .refresh_token("rt-original")
        .start()
        .await;
    assert_eq!(
        t.post("/qwen/v1/chat/completions", json!({}))
            .await
            .status(),
        200
    );
    let file = read_json(&t.cred_path("a.json"));
    let rotated = file["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(rotated, "rt-original");
    assert_eq!(
        t.tokens.last_form()["client_id"],
        QWEN_CLIENT,
        "the provider's client refreshes a file without one"
    );

    // Restart on the same file with the token expired: the rotated refresh token works,
    // the original one would have been refused.
    let mut expired = file.clone();
    expired["expiry_date"] = Value::from(now_ms() - 1000);
    write_cred(t.cred_path("a.json").parent().unwrap(), "a.json", &expired);
    t.app.take().unwrap().shutdown().await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[providers.qwen]\nupstream = \"{}\"\ntoken_url = \"{}\"\ncredentials = [\"{}\"]\n",
        t.upstream.url,
        t.tokens.url,
        t.cred_path("a.json").display()
    );
    let app = tokenrelay::App::start(TestApp::config(&toml))
        .await
        .unwrap();
    t.proxy = format!("http://{}", app.proxy_addr);
    t.app = Some(app);
    assert_eq!(
        t.post("/qwen/v1/chat/completions", json!({}))
            .await
            .status(),
        200
    );
    assert_eq!(t.tokens.calls(), 2);
    assert_eq!(t.tokens.last_form()["refresh_token"], rotated);
}

#[tokio::test]
async fn symlinked_credential_is_written_through_the_link() {
    let t = spawn_app(Flavor::Qwen).refresh_token("rt-a").start().await;
    let real_dir = t.dir.path().join("real");
    std::fs::create_dir(&real_dir).unwrap();
    let real = write_cred(&real_dir, "creds.json", &expired_qwen("rt-a"));
    let link = t.dir.path().join("link.json");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[providers.qwen]\nupstream = \"{}\"\ntoken_url = \"{}\"\ncredentials = [{{ path = \"{}\", id = \"linked\" }}]\n",
        t.upstream.url,
        t.tokens.url,
        link.display()
    );
    let app = tokenrelay::App::start(TestApp::config(&toml))
        .await
        .unwrap();
    let r = t
        .http
        .post(format!("http://{}/qwen/v1/x", app.proxy_addr))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tokenrelay-credential"], "linked");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link stays a link"
    );
    assert_ne!(
        read_json(&real)["refresh_token"],
        "rt-a",
        "the target holds the rotated token"
    );
}

#[tokio::test]
async fn credential_without_a_client_id_is_reported_at_start_up() {
    let mut gemini_cli: Value = serde_json::from_str(include_str!(
        "fixtures/credentials/gemini_cli_oauth_creds.json"
    ))
    .unwrap();
    gemini_cli["expiry_date"] = Value::from(now_ms() - 1000);
    let t = spawn_app(Flavor::Google)
        .cred("oauth_creds.json", gemini_cli)
        .start()
        .await;
    // Before any request: the admin API already says what is wrong and how to fix it.
    let c = t.credential("oauth_creds").await;
    assert_eq!(c["state"], "needs_reauth");
    assert_eq!(c["kind"], "cli");
    let err = c["last_error"].as_str().unwrap();
    assert!(
        err.contains("client_id") && err.contains("providers.gemini.client_id"),
        "{err}"
    );
    let (status, ready) = t.admin_json("/readyz").await;
    assert_eq!(status, 503);
    assert!(
        ready["providers"][0]["message"]
            .as_str()
            .unwrap()
            .contains("oauth_creds"),
        "{ready}"
    );
    assert_eq!(t.tokens.calls(), 0);
}

#[tokio::test]
async fn manual_refresh_answers_the_outcome() {
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", qwen_cred("good-access", "rt-a"))
        .access_token("good-access")
        .refresh_token("rt-a")
        .start()
        .await;
    let (status, v) = t.admin_post("/admin/credentials/qwen/a/refresh").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["state"], "ready");
    assert_eq!(
        t.tokens.calls(),
        1,
        "forced even though the token was fresh"
    );
    let r = t
        .http
        .post(format!("{}/admin/credentials/qwen/nope/refresh", t.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The rotated token is dead now: a second forced refresh with the old one is refused.
    t.tokens.revoke(
        read_json(&t.cred_path("a.json"))["refresh_token"]
            .as_str()
            .unwrap(),
    );
    let (status, v) = t.admin_post("/admin/credentials/qwen/a/refresh").await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["ok"], false);
    assert_eq!(v["state"], "needs_reauth");
}

#[tokio::test]
async fn transient_token_endpoint_failure_backs_off_then_recovers() {
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", expired_qwen("rt-a"))
        .refresh_token("rt-a")
        .token_fault(TokenFault::Status(500, json!({"error": "internal"})))
        .start()
        .await;
    let r = t.post("/qwen/v1/chat/completions", json!({})).await;
    assert_eq!(r.status(), 502);
    let c = t.credential("a").await;
    assert_eq!(c["state"], "expired");
    assert!(
        c["last_error"].as_str().unwrap().contains("HTTP 500"),
        "{c}"
    );
    let m = t.metrics().await;
    assert!(m.contains(r#"tokenrelay_token_refresh_total{credential="a",outcome="server_error",provider="qwen"} 1"#), "{m}");
    // During the backoff the credential is skipped without calling the endpoint.
    let r = t.post("/qwen/v1/chat/completions", json!({})).await;
    assert_eq!(r.status(), 502);
    assert_eq!(t.tokens.calls(), 1);
    // The endpoint heals; after the (first, ≤ 1 s) backoff the next request refreshes.
    t.tokens.set_fault(None);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = t.post("/qwen/v1/chat/completions", json!({})).await;
    assert_eq!(r.status(), 200);
    let c = t.credential("a").await;
    assert_eq!(c["state"], "ready");
    assert_eq!(c["consecutive_failures"], 0);
    assert!(c["last_error"].is_null());
}

#[tokio::test]
async fn slow_token_endpoint_times_out_as_a_network_error() {
    let t = spawn_app(Flavor::Qwen)
        .toml("[refresh]\ntimeout = \"200ms\"")
        .cred("a.json", expired_qwen("rt-a"))
        .refresh_token("rt-a")
        .token_fault(TokenFault::Delay(std::time::Duration::from_secs(2)))
        .start()
        .await;
    let started = std::time::Instant::now();
    let r = t.post("/qwen/v1/chat/completions", json!({})).await;
    assert_eq!(r.status(), 502);
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    let m = t.metrics().await;
    assert!(m.contains(r#"tokenrelay_token_refresh_total{credential="a",outcome="network_error",provider="qwen"} 1"#), "{m}");
    // Transient: never needs_reauth.
    assert_eq!(t.credential("a").await["state"], "expired");
}

#[tokio::test]
async fn rotated_refresh_token_is_kept_in_memory_when_the_file_cannot_be_written() {
    let t = spawn_app(Flavor::Qwen)
        .refresh_token("rt-original")
        .start()
        .await;
    let path = write_cred(t.dir.path(), "ro.json", &expired_qwen("rt-original"));
    let before = std::fs::read(&path).unwrap();
    let (cred, metrics) = unsavable_credential(&t, &path, "ro", false, "");

    // Each refresh rotates; the second and third succeed only if the rotated token in
    // memory is used, not the dead one still in the file.
    for _ in 0..3 {
        cred.force_refresh()
            .await
            .expect("refresh with the token from memory");
    }
    assert_eq!(t.tokens.calls(), 3);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file was not touched"
    );
    assert!(!cred.writable());
    let m = metrics.render();
    assert!(m.contains(r#"tokenrelay_credential_persist_total{credential="ro",outcome="failure",provider="qwen"} 3"#), "{m}");
}
