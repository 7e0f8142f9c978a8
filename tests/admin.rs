//! The admin listener: health, readiness, metrics and the credential list.

use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn with_no_credentials_readyz_says_what_is_missing() {
    let t = spawn_app(Flavor::Google).start().await;
    let (status, v) = t.admin_json("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(v["ready"], false);
    let msg = v["providers"][0]["message"].as_str().unwrap();
    assert!(
        msg.contains("no credentials") && msg.contains("gcloud auth application-default login"),
        "{msg}"
    );
    let (status, _) = t.admin_json("/healthz").await;
    assert_eq!(status, 200);
    // Requests get the same explanation.
    let r = t.post("/gemini/v1/models", json!({})).await;
    assert_eq!(r.status(), 503);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"].as_str().unwrap().contains("gcloud"),
        "{e}"
    );
}

#[tokio::test]
async fn credentials_endpoint_has_the_documented_shape_and_no_secrets() {
    let t = spawn_app(Flavor::Qwen)
        .cred(
            "a.json",
            qwen_cred("secret-access-value", "secret-refresh-value"),
        )
        .access_token("secret-access-value")
        .start()
        .await;
    let r = t
        .http
        .get(format!("{}/admin/credentials", t.admin))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(!text.contains("secret-"), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let c = &v["credentials"][0];
    for key in [
        "provider",
        "id",
        "path",
        "kind",
        "state",
        "expires_at",
        "expires_in_seconds",
        "last_refresh_at",
        "last_error",
        "consecutive_failures",
        "writable",
    ] {
        assert!(c.get(key).is_some(), "missing {key}: {c}");
    }
    assert_eq!(c["provider"], "qwen");
    assert_eq!(c["state"], "ready");
    assert_eq!(c["writable"], true);
    let left = c["expires_in_seconds"].as_i64().unwrap();
    assert!((3500..=3600).contains(&left), "{left}");
    let (status, ready) = t.admin_json("/readyz").await;
    assert_eq!(status, 200, "{ready}");
}

#[tokio::test]
async fn metrics_exist_from_start_up_without_secrets() {
    let t = spawn_app(Flavor::Qwen)
        .cred(
            "a.json",
            qwen_cred("secret-access-value", "secret-refresh-value"),
        )
        .start()
        .await;
    let m = t.metrics().await;
    assert!(!m.contains("secret-"));
    for series in [
        r#"tokenrelay_token_refresh_total{credential="a",outcome="auth_error",provider="qwen"} 0"#,
        r#"tokenrelay_token_refresh_total{credential="a",outcome="success",provider="qwen"} 0"#,
        r#"tokenrelay_upstream_retries_total{provider="qwen",reason="rate_limited"} 0"#,
        r#"tokenrelay_credential_usable{credential="a",provider="qwen"} 1"#,
        r#"tokenrelay_credential_state{credential="a",provider="qwen",state="ready"} 1"#,
        r#"tokenrelay_credential_state{credential="a",provider="qwen",state="needs_reauth"} 0"#,
        r#"tokenrelay_token_refresh_duration_seconds_count{provider="qwen"} 0"#,
        r#"tokenrelay_request_duration_seconds_count{provider="qwen"} 0"#,
        r#"tokenrelay_credential_persist_total{credential="a",outcome="failure",provider="qwen"} 0"#,
        "tokenrelay_build_info{version=",
        "tokenrelay_token_expiry_timestamp_seconds{credential=\"a\",provider=\"qwen\"} 1",
    ] {
        assert!(m.contains(series), "missing {series}\n{m}");
    }
}

#[tokio::test]
async fn admin_token_guards_admin_but_not_probes() {
    let t = spawn_app(Flavor::Qwen)
        .toml("admin_token = \"let-me-in\"")
        .start()
        .await;
    let get = |path: &str, token: Option<&str>| {
        let mut r = t.http.get(format!("{}{path}", t.admin));
        if let Some(tok) = token {
            r = r.bearer_auth(tok);
        }
        r.send()
    };
    assert_eq!(get("/admin/credentials", None).await.unwrap().status(), 401);
    assert_eq!(
        get("/admin/credentials", Some("wrong"))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        get("/admin/credentials", Some("let-me-in"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(get("/healthz", None).await.unwrap().status(), 200);
    assert_eq!(get("/metrics", None).await.unwrap().status(), 200);
}

#[tokio::test]
async fn client_keys_are_required_when_configured() {
    let t = spawn_app(Flavor::Qwen)
        .toml("client_keys = [\"team-key\"]")
        .cred("a.json", qwen_cred("good-access", "rt-a"))
        .access_token("good-access")
        .start()
        .await;
    let url = format!("{}/qwen/v1/chat/completions", t.proxy);
    let r = t.http.post(&url).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["reason"], "unauthorized");
    for (h, v) in [
        ("authorization", "Bearer team-key"),
        ("x-api-key", "team-key"),
        ("x-goog-api-key", "team-key"),
    ] {
        let r = t
            .http
            .post(&url)
            .header(h, v)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{h}");
    }
    // The client key itself never goes upstream.
    assert!(t
        .upstream
        .seen()
        .iter()
        .all(|s| s.headers["authorization"] == "Bearer good-access"));
}

#[tokio::test]
async fn a_proxy_port_already_in_use_is_refused() {
    let t = spawn_app(Flavor::Qwen).start().await;
    let taken = t.proxy.trim_start_matches("http://");
    let config = TestApp::config(&format!(
        "[server]\nlisten = \"{taken}\"\nadmin_listen = \"127.0.0.1:0\"\n[providers.qwen]\ncredentials = []"
    ));
    let err = tokenrelay::App::start(config)
        .await
        .err()
        .expect("the port is taken");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("server.listen") && msg.contains(taken),
        "{msg}"
    );
}
