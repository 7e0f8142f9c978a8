//! The token lifecycle: background refresh, failure classes, recovery, locks across
//! processes, crash safety, read-only files, reload and service accounts.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;
use crate::process::{write_config, Proc};

fn qwen_expiring_in(ms: i64, refresh: &str) -> Value {
    json!({
        "access_token": "soon-stale", "token_type": "Bearer", "refresh_token": refresh,
        "expiry_date": now_ms() + ms
    })
}

#[tokio::test]
async fn tokens_are_refreshed_ahead_of_expiry_without_traffic() {
    let t = spawn_app(Flavor::Qwen)
        .toml("[refresh]\nlead_time = \"2s\"\nmin_validity = \"100ms\"")
        .cred("a.json", qwen_expiring_in(3_000, "rt-a"))
        .refresh_token("rt-a")
        .start()
        .await;
    assert_eq!(t.tokens.calls(), 0, "not due yet");
    // The endpoint counts the call before tokenrelay has written the answer back and
    // released its lock: wait for the file and the state too.
    wait_for("a background refresh", Duration::from_secs(5), || async {
        t.tokens.calls() == 1
            && read_json(&t.cred_path("a.json"))["access_token"]
                .as_str()
                .is_some_and(|a| a.starts_with("access-"))
            && t.credential("a").await["state"] == "ready"
    })
    .await;
    assert_eq!(t.tokens.calls(), 1);
    let file = read_json(&t.cred_path("a.json"));
    assert!(file["access_token"]
        .as_str()
        .unwrap()
        .starts_with("access-"));
    assert!(t.upstream.seen().is_empty(), "no request was needed");
    let c = t.credential("a").await;
    assert_eq!(c["state"], "ready");
    assert!(c["last_refresh_at"].is_string());
}

#[tokio::test]
async fn credentials_loaded_together_do_not_refresh_together() {
    let mut spawn = spawn_app(Flavor::Qwen);
    let expiry = now_ms() + 2 * 3_600_000;
    for i in 0..20 {
        spawn = spawn.cred(
            &format!("c{i}.json"),
            json!({"access_token": "x", "refresh_token": "r", "expiry_date": expiry}),
        );
    }
    let t = spawn.start().await;
    let pool = &t.app.as_ref().unwrap().pool;
    // How long before the expiry each refresh is due, in seconds. Measured against the
    // expiry itself, not against the start of the test: a slow start-up (a loaded CI
    // machine) must not move the figures.
    let now = now_ms();
    let ahead: Vec<i64> = pool
        .all_credentials()
        .map(|c| (expiry - now - c.next_refresh_in().unwrap().as_millis() as i64) / 1_000)
        .collect();
    let (min, max) = (*ahead.iter().min().unwrap(), *ahead.iter().max().unwrap());
    // lead_time 5m plus up to 20 % jitter: due between 6 and 5 minutes before expiry
    // (one second either side for the clock reads of this test).
    assert!(min >= 299 && max <= 361, "{ahead:?}");
    assert!(max - min >= 20, "refreshes are spread: {ahead:?}");
}

/// One credential whose first background refresh meets `fault`; returns the app once
/// that attempt has been recorded.
async fn first_attempt_meets(fault: TokenFault, extra: &str) -> TestApp {
    let t = spawn_app(Flavor::Qwen)
        .toml(extra)
        .cred("a.json", expired_qwen("rt-a"))
        .refresh_token("rt-a")
        .token_fault(fault)
        .start()
        .await;
    wait_for(
        "the first refresh attempt",
        Duration::from_secs(5),
        || async { t.credential("a").await["consecutive_failures"].as_u64() == Some(1) },
    )
    .await;
    t
}

/// Whether `tokenrelay_token_refresh_total` counted at least one `outcome` for credential a.
fn has(metrics: &str, outcome: &str) -> bool {
    let series = format!(
        r#"tokenrelay_token_refresh_total{{credential="a",outcome="{outcome}",provider="qwen"}} "#
    );
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&series))
        .any(|n| n.parse::<u64>().is_ok_and(|n| n >= 1))
}

#[tokio::test]
async fn permanent_failures_need_reauth_and_stop_retrying() {
    for (status, body) in [
        (
            400,
            json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
        ),
        (401, json!({"error": "invalid_client"})),
        (400, json!({"error": "unauthorized_client"})),
        (
            400,
            json!({"error": "invalid_request", "error_description": "Invalid refresh token or client_id"}),
        ),
    ] {
        let t = first_attempt_meets(TokenFault::Status(status, body.clone()), "").await;
        let c = t.credential("a").await;
        assert_eq!(c["state"], "needs_reauth", "{body}");
        assert!(has(&t.metrics().await, "auth_error"), "{body}");
        let calls = t.tokens.calls();
        // The permanent answer was double-checked against the file once, then no more.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(t.tokens.calls(), calls, "no automatic retries for {body}");
        let (ready, _) = t.admin_json("/readyz").await;
        assert_eq!(ready, 503);
    }
}

#[tokio::test]
async fn transient_failures_back_off_and_keep_the_credential() {
    let cases = [
        (
            TokenFault::Status(500, json!({"error": "backend"})),
            "server_error",
            "HTTP 500",
        ),
        (
            TokenFault::Status(503, json!({})),
            "server_error",
            "HTTP 503",
        ),
        (
            TokenFault::Raw(200, "<html>not json</html>".into()),
            "server_error",
            "malformed",
        ),
        (
            TokenFault::Status(200, json!({"token_type": "Bearer"})),
            "server_error",
            "without an access_token",
        ),
        (
            TokenFault::Status(400, json!({"error": "slow_down"})),
            "server_error",
            "HTTP 400",
        ),
    ];
    for (fault, outcome, text) in cases {
        let t = first_attempt_meets(fault, "").await;
        let c = t.credential("a").await;
        assert_eq!(c["state"], "expired", "{text}: {c}");
        assert!(
            c["last_error"].as_str().unwrap().contains(text),
            "{text}: {c}"
        );
        assert!(has(&t.metrics().await, outcome), "{text}");
    }
}

#[tokio::test]
async fn rate_limited_token_endpoint_retry_after_is_honoured_and_capped() {
    let t = first_attempt_meets(
        TokenFault::RetryAfter(429, 7),
        "[refresh]\nmax_backoff = \"30s\"",
    )
    .await;
    let c = t.credential_handle("qwen", "a");
    let wait = c.next_refresh_in().unwrap();
    assert!(
        wait > Duration::from_secs(5) && wait <= Duration::from_secs(7),
        "{wait:?}"
    );
    let t = first_attempt_meets(
        TokenFault::RetryAfter(429, 86_400 * 365),
        "[refresh]\nmax_backoff = \"30s\"",
    )
    .await;
    let c = t.credential_handle("qwen", "a");
    let wait = c.next_refresh_in().unwrap();
    assert!(
        wait <= Duration::from_secs(30),
        "a year is capped at max_backoff: {wait:?}"
    );
}

#[tokio::test]
async fn a_transient_failure_recovers_in_the_background() {
    let t = first_attempt_meets(TokenFault::Status(502, json!({})), "").await;
    t.tokens.set_fault(None);
    // The first backoff is at most a second; no request is needed to recover.
    wait_for("recovery", Duration::from_secs(4), || async {
        t.credential("a").await["state"] == "ready"
    })
    .await;
    let c = t.credential("a").await;
    assert_eq!(c["consecutive_failures"], 0);
    assert!(c["last_error"].is_null());
}

#[tokio::test]
async fn service_account_mints_tokens_with_a_signed_jwt() {
    let key: Value = serde_json::from_str(include_str!(
        "fixtures/credentials/service_account_test_key.json"
    ))
    .unwrap();
    let t = spawn_app(Flavor::Google)
        .cred("sa.json", key)
        .provider_keys("scopes = [\"https://www.googleapis.com/auth/cloud-platform\", \"https://www.googleapis.com/auth/generative-language.retriever\"]")
        .start()
        .await;
    let r = t
        .post(
            "/gemini/v1/models/gemini-2.5-pro:generateContent",
            json!({}),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let seen = t.upstream.seen();
    assert!(seen[0].headers["authorization"]
        .to_str()
        .unwrap()
        .starts_with("Bearer sa-access-"));
    let claims = t.tokens.state.jwt_claims.lock().unwrap().clone();
    assert_eq!(
        claims.len(),
        1,
        "signature and claims verified by the fake endpoint"
    );
    assert_eq!(
        claims[0]["scope"],
        "https://www.googleapis.com/auth/cloud-platform https://www.googleapis.com/auth/generative-language.retriever"
    );
    assert_eq!(claims[0]["aud"], t.tokens.url);
    let c = t.credential("sa").await;
    assert_eq!(c["kind"], "service_account");
    assert_eq!(c["state"], "ready");
    // Nothing is written into a key file.
    assert!(read_json(&t.cred_path("sa.json"))
        .get("access_token")
        .is_none());
}

#[tokio::test]
async fn reload_adds_removes_and_revives_credentials() {
    let t = spawn_app(Flavor::Qwen)
        .cred("dead.json", expired_qwen("rt-dead"))
        .cred("gone.json", qwen_cred("gone-access", "rt-gone"))
        .access_token("gone-access")
        .start()
        .await;
    wait_for("needs_reauth", Duration::from_secs(5), || async {
        t.credential("dead").await["state"] == "needs_reauth"
    })
    .await;
    // The user re-authenticates one account, removes another and adds a third.
    t.tokens.allow_refresh_token("rt-relogin");
    write_cred(
        &t.dir.path().join("creds"),
        "dead.json",
        &expired_qwen("rt-relogin"),
    );
    std::fs::remove_file(t.cred_path("gone.json")).unwrap();
    t.tokens.allow_refresh_token("rt-new");
    write_cred(
        &t.dir.path().join("creds"),
        "new.json",
        &expired_qwen("rt-new"),
    );
    let r = t
        .http
        .post(format!("{}/admin/reload", t.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let report: Value = r.json().await.unwrap();
    assert!(report["errors"].as_array().unwrap().is_empty(), "{report}");
    wait_for(
        "revived and new credentials ready",
        Duration::from_secs(5),
        || async {
            t.credential("dead").await["state"] == "ready"
                && t.credential("new").await["state"] == "ready"
        },
    )
    .await;
    assert!(t.credential("gone").await.is_null());
    let m = t.metrics().await;
    assert!(
        !m.contains("credential=\"gone\""),
        "{}",
        m.lines()
            .filter(|l| l.contains("gone"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn kubernetes_style_symlink_swap_is_picked_up_by_the_watcher() {
    let t = spawn_app(Flavor::Qwen).start().await;
    // A Secret volume: files are symlinks through `..data` to a timestamped directory.
    let secret = t.dir.path().join("secret");
    let v1 = secret.join("..2026_v1");
    std::fs::create_dir_all(&v1).unwrap();
    write_cred(&v1, "oauth_creds.json", &expired_qwen("rt-revoked"));
    std::os::unix::fs::symlink("..2026_v1", secret.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/oauth_creds.json", secret.join("oauth_creds.json")).unwrap();
    let config = TestApp::config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[providers.qwen]\nupstream = \"{}\"\ntoken_url = \"{}\"\ncredentials = [\"{}\"]\n",
        t.upstream.url,
        t.tokens.url,
        secret.join("oauth_creds.json").display()
    ));
    let app = tokenrelay::App::start(config).await.unwrap();
    let admin = format!("http://{}", app.admin_addr);
    let state = || async {
        let v: Value = get_json(&t.http, format!("{admin}/admin/credentials")).await;
        v["credentials"][0]["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    wait_for("needs_reauth", Duration::from_secs(5), || async {
        state().await == "needs_reauth"
    })
    .await;
    // The Secret is updated: kubelet writes a new directory and swaps `..data` atomically.
    t.tokens.allow_refresh_token("rt-fresh");
    let v2 = secret.join("..2026_v2");
    std::fs::create_dir_all(&v2).unwrap();
    write_cred(&v2, "oauth_creds.json", &expired_qwen("rt-fresh"));
    std::os::unix::fs::symlink("..2026_v2", secret.join("..data_tmp")).unwrap();
    std::fs::rename(secret.join("..data_tmp"), secret.join("..data")).unwrap();
    wait_for("the watcher's reload", Duration::from_secs(5), || async {
        state().await == "ready"
    })
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn sighup_reloads_and_the_process_keeps_running() {
    let t = spawn_app(Flavor::Qwen).start().await;
    let dir = t.dir.path().join("hup");
    std::fs::create_dir(&dir).unwrap();
    let config = write_config(
        t.dir.path(),
        "hup.toml",
        "qwen",
        &t.upstream.url,
        &t.tokens.url,
        &dir,
        "",
    );
    let p = Proc::spawn(&config, &t.dir.path().join("hup.log"));
    t.tokens.allow_refresh_token("rt-a");
    write_cred(&dir, "a.json", &qwen_cred("a-access", "rt-a"));
    p.signal(libc::SIGHUP);
    let admin = p.admin.clone();
    // Generous: the suite runs soaks beside this test on two cores.
    wait_for("the SIGHUP log line", Duration::from_secs(20), || async {
        p.logs()
            .contains("SIGHUP: reloading clients and credentials")
    })
    .await;
    wait_for("the SIGHUP reload", Duration::from_secs(20), || async {
        let v: Value = get_json(&t.http, format!("{admin}/admin/credentials")).await;
        v["credentials"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    let r = t
        .http
        .get(format!("{}/healthz", p.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still running after SIGHUP");
}

/// Two tokenrelay processes share one rotating (Qwen-like) credential with short token
/// lifetimes under traffic: the lock file and re-read-under-lock mean no refresh token is
/// ever spent twice, and the file is valid JSON at every moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_a_rotating_credential_without_losing_it() {
    let secs: u64 = std::env::var("TOKENRELAY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let t = spawn_app(Flavor::Qwen).refresh_token("rt-0").start().await;
    t.tokens.set_lifetime(3);
    let dir = t.dir.path().join("shared");
    std::fs::create_dir(&dir).unwrap();
    let file = write_cred(&dir, "oauth_creds.json", &expired_qwen("rt-0"));
    let extra = "[refresh]\nlead_time = \"1s\"\nmin_validity = \"500ms\"\ntimeout = \"5s\"";
    let ca = write_config(
        t.dir.path(),
        "a.toml",
        "qwen",
        &t.upstream.url,
        &t.tokens.url,
        &file,
        extra,
    );
    let cb = write_config(
        t.dir.path(),
        "b.toml",
        "qwen",
        &t.upstream.url,
        &t.tokens.url,
        &file,
        extra,
    );
    let a = Proc::spawn(&ca, &t.dir.path().join("a.log"));
    let b = Proc::spawn(&cb, &t.dir.path().join("b.log"));

    let stop = Instant::now() + Duration::from_secs(secs);
    let sampler = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || {
            let (mut samples, mut bad) = (0u64, Vec::new());
            while Instant::now() < stop {
                match std::fs::read(&file) {
                    Ok(bytes) => {
                        samples += 1;
                        if !serde_json::from_slice::<Value>(&bytes)
                            .is_ok_and(|v| v["refresh_token"].is_string())
                        {
                            bad.push(String::from_utf8_lossy(&bytes).into_owned());
                        }
                    }
                    Err(e) => bad.push(format!("read error: {e}")),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (samples, bad)
        })
    };
    let mut statuses = std::collections::BTreeMap::new();
    let mut i = 0u64;
    while Instant::now() < stop {
        let base = if i.is_multiple_of(2) {
            &a.proxy
        } else {
            &b.proxy
        };
        let r = t
            .http
            .post(format!("{base}/qwen/v1/chat/completions"))
            .json(&json!({"i": i}))
            .send()
            .await
            .unwrap();
        *statuses.entry(r.status().as_u16()).or_insert(0u64) += 1;
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (samples, bad) = sampler.await.unwrap();
    let refused = t
        .tokens
        .state
        .refused
        .load(std::sync::atomic::Ordering::SeqCst);
    let diagnostics = || format!("statuses {statuses:?}\nA:\n{}\nB:\n{}", a.logs(), b.logs());
    assert_eq!(
        refused,
        0,
        "a refresh token was spent twice\n{}",
        diagnostics()
    );
    assert!(
        bad.is_empty(),
        "the file was not valid JSON at some moment: {:?}",
        &bad[..bad.len().min(3)]
    );
    assert_eq!(
        statuses.keys().collect::<Vec<_>>(),
        vec![&200],
        "{}",
        diagnostics()
    );
    // Tokens live 3 s and are refreshed ~1 s ahead: many rotations happened.
    let rotations = t.tokens.calls() as u64;
    assert!(
        rotations >= secs / 3,
        "only {rotations} refreshes in {secs} s"
    );
    assert!(samples > 100);
}

/// SIGKILL at random moments while refreshes write the file back: every time, the file
/// that is left parses and the next process starts from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_write_back_leaves_a_whole_file() {
    let t = spawn_app(Flavor::Google)
        .refresh_token("rt-g")
        .start()
        .await;
    let dir = t.dir.path().join("kill");
    std::fs::create_dir(&dir).unwrap();
    let original = json!({
        "type": "authorized_user", "client_id": GOOGLE_CLIENT, "client_secret": "s",
        "refresh_token": "rt-g", "access_token": "old", "expires_at": 1.5, "note": "x".repeat(4096)
    });
    let file = write_cred(&dir, "adc.json", &original);
    let config = write_config(
        t.dir.path(),
        "k.toml",
        "gemini",
        &t.upstream.url,
        &t.tokens.url,
        &file,
        "",
    );
    let mut writes = 0;
    for round in 0..25u64 {
        let mut p = Proc::spawn(&config, &t.dir.path().join("k.log"));
        let admin = p.admin.clone();
        let http = t.http.clone();
        // Hammer forced refreshes (each one writes the file) and kill in the middle.
        let hammer = tokio::spawn(async move {
            loop {
                let _ = http.post(format!("{admin}/admin/refresh")).send().await;
            }
        });
        tokio::time::sleep(Duration::from_millis(40 + (round * 37) % 300)).await;
        p.kill();
        hammer.abort();
        let bytes = std::fs::read(&file).unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "round {round}: truncated file ({e}): {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert_eq!(
            v["note"], original["note"],
            "round {round}: unknown field kept"
        );
        assert_eq!(v["refresh_token"], "rt-g");
        if v["access_token"] != "old" {
            writes += 1;
        }
        // A killed process may leave its lock; a real successor breaks it after 30 s.
        let _ = std::fs::remove_file(dir.join("adc.lock"));
    }
    assert!(writes > 0, "no write-back happened before the kills");
    assert!(
        t.tokens.calls() > 25,
        "refreshes were in flight: {}",
        t.tokens.calls()
    );
}

/// A Kubernetes Secret mount: read-only, rotated credential. With `state_dir` the rotated
/// token survives a restart; once the source changes (re-authentication) it wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_credential_with_state_dir_survives_restart_until_the_source_changes() {
    let t = spawn_app(Flavor::Qwen)
        .refresh_token("rt-orig")
        .start()
        .await;
    let secret = t.dir.path().join("secret");
    let state = t.dir.path().join("state");
    std::fs::create_dir(&secret).unwrap();
    let file = write_cred(
        &secret,
        "oauth_creds.json",
        &qwen_cred("orig-access", "rt-orig"),
    );
    let source_before = std::fs::read(&file).unwrap();
    let extra = format!("[refresh]\nstate_dir = \"{}\"", state.display());
    let config = write_config(
        t.dir.path(),
        "ro.toml",
        "qwen",
        &t.upstream.url,
        &t.tokens.url,
        &file,
        &extra,
    );
    // A private mount namespace where the secret directory is read-only, even for root.
    let refresh = |admin: String| {
        let http = t.http.clone();
        async move {
            let r = http
                .post(format!(
                    "{admin}/admin/credentials/qwen/oauth_creds/refresh"
                ))
                .send()
                .await
                .unwrap();
            let status = r.status();
            let v: Value = r.json().await.unwrap();
            assert_eq!(status, 200, "{v}");
        }
    };

    let mut p = Proc::spawn_read_only(&config, &secret, &t.dir.path().join("ro1.log"));
    let c: Value = get_json(&t.http, format!("{}/admin/credentials", p.admin)).await;
    assert_eq!(c["credentials"][0]["writable"], false, "{c}");
    refresh(p.admin.clone()).await;
    assert_eq!(
        std::fs::read(&file).unwrap(),
        source_before,
        "the read-only source is untouched"
    );
    let state_file = state.join("qwen").join("oauth_creds.json");
    let saved = read_json(&state_file);
    let rotated = saved["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(rotated, "rt-orig");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&state_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    p.kill();

    // Restart: the state copy is used (the source's refresh token is dead by now).
    let mut p = Proc::spawn_read_only(&config, &secret, &t.dir.path().join("ro2.log"));
    refresh(p.admin.clone()).await;
    assert_eq!(t.tokens.last_form()["refresh_token"], rotated);
    p.kill();

    // The user re-authenticates: the source changes and wins over the state copy.
    t.tokens.allow_refresh_token("rt-reauth");
    write_cred(
        &secret,
        "oauth_creds.json",
        &qwen_cred("reauth-access", "rt-reauth"),
    );
    let p = Proc::spawn_read_only(&config, &secret, &t.dir.path().join("ro3.log"));
    refresh(p.admin.clone()).await;
    assert_eq!(t.tokens.last_form()["refresh_token"], "rt-reauth");
}

#[tokio::test]
async fn read_only_rotating_credential_without_state_dir_warns_loudly() {
    let t = spawn_app(Flavor::Qwen).start().await;
    let secret = t.dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    let file = write_cred(&secret, "oauth_creds.json", &qwen_cred("a", "rt"));
    let config = write_config(
        t.dir.path(),
        "w.toml",
        "qwen",
        &t.upstream.url,
        &t.tokens.url,
        &file,
        "",
    );
    let p = Proc::spawn_read_only(&config, &secret, &t.dir.path().join("w.log"));
    let logs = p.logs();
    assert!(
        logs.contains("READ-ONLY credential with a rotating refresh token"),
        "{logs}"
    );
    assert!(logs.contains("state_dir"));
}

/// SIGTERM: stop accepting, let in-flight streams finish, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams_and_exits_cleanly() {
    use futures_util::StreamExt;
    let t = spawn_app(Flavor::Qwen).access_token("a").start().await;
    let dir = t.dir.path().join("term");
    std::fs::create_dir(&dir).unwrap();
    write_cred(&dir, "a.json", &qwen_cred("a", "r"));
    let config = write_config(
        t.dir.path(),
        "term.toml",
        "qwen",
        &t.upstream.url,
        &t.tokens.url,
        &dir,
        "shutdown_grace = \"10s\"",
    );
    let mut p = Proc::spawn(&config, &t.dir.path().join("term.log"));
    let r = t
        .http
        .post(format!("{}/qwen/v1/sse", p.proxy))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: {\"event\":0}"));
    p.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // New connections are refused while the stream goes on.
    let fresh = reqwest::Client::new();
    assert!(
        fresh
            .post(format!("{}/qwen/v1/x", p.proxy))
            .send()
            .await
            .is_err(),
        "still accepting after SIGTERM"
    );
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.expect("the stream is not cut"));
    }
    assert_eq!(
        String::from_utf8(rest).unwrap(),
        "data: {\"event\":1}\n\ndata: {\"event\":2}\n\n"
    );
    let status = p.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", p.logs());
}

#[tokio::test]
async fn a_truncated_credential_file_keeps_serving_and_says_so_where_operators_look() {
    let t = spawn_app(Flavor::Qwen)
        .cred("half.json", qwen_cred("at-good", "rt-good"))
        .access_token("at-good")
        .refresh_token("rt-good")
        .start()
        .await;
    let path = t.cred_path("half.json");
    let whole = read_json(&path);
    // A half-written copy, as an interrupted editor or copy leaves it.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let (status, report) = t.admin_post("/admin/reload").await;
    assert_eq!(status, 422, "a reload with errors: {report}");
    let errors = report["errors"].to_string();
    assert!(
        errors.contains("qwen/half")
            && errors.contains("half.json")
            && errors.contains("not valid JSON"),
        "the reload names the file and the problem: {report}"
    );
    let c = t.credential("half").await;
    assert_eq!(c["usable"], true, "it keeps serving from memory: {c}");
    let error = c["last_error"].as_str().unwrap_or("");
    assert!(
        error.contains("half.json") && error.contains("not valid JSON"),
        "{c}"
    );
    t.assert_metric(r#"tokenrelay_credential_source_error{credential="half",provider="qwen"} 1"#)
        .await;
    assert_eq!(t.post("/qwen/v1/x", json!({})).await.status(), 200);
    // A refresh writes back from the last good copy: never less than the file held.
    let (status, body) = t.admin_post("/admin/credentials/qwen/half/refresh").await;
    assert_eq!(status, 200, "{body}");
    let written = read_json(&path);
    for (k, _) in whole.as_object().unwrap() {
        assert!(written.get(k).is_some(), "{k} kept: {written}");
    }
    // Fixed (the write-back above fixed it): the error goes.
    let (_, report) = t.admin_post("/admin/reload").await;
    assert!(report["errors"].as_array().unwrap().is_empty(), "{report}");
    assert_eq!(t.credential("half").await["last_error"], Value::Null);
    t.assert_metric(r#"tokenrelay_credential_source_error{credential="half",provider="qwen"} 0"#)
        .await;
}
