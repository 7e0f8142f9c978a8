//! Nobody gets in, nothing leaks: secrets never reach logs, metrics, admin answers or error
//! bodies; the proxy cannot be steered to another host; limits hold.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;
use crate::process::{write_config, Proc};

/// Runs tokenrelay at TOKENRELAY_LOG=trace through refreshes, rotation, 401s, revocation,
/// reloads, manual refreshes and errors, then searches everything it said for every
/// secret that existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_metrics_admin_answers_or_error_bodies() {
    let t = spawn_app(Flavor::Qwen).start().await;
    let dir = t.dir.path().join("leak");
    std::fs::create_dir(&dir).unwrap();
    let mut secrets = vec![
        "initial-access-SECRET".to_string(),
        "initial-refresh-SECRET".to_string(),
        "rejected-access-SECRET".to_string(),
        "doomed-refresh-SECRET".to_string(),
        "client-key-SECRET".to_string(),
        "admin-token-SECRET".to_string(),
        "client-secret-SECRET".to_string(),
        "webhook-path-SECRET".to_string(),
    ];
    t.tokens.allow_refresh_token("initial-refresh-SECRET");
    write_cred(
        &dir,
        "expired.json",
        &expired_qwen("initial-refresh-SECRET"),
    );
    // Upstream rejects this one's token: 401 → refresh (dead) → needs_reauth.
    write_cred(
        &dir,
        "doomed.json",
        &qwen_cred("rejected-access-SECRET", "doomed-refresh-SECRET"),
    );
    let hook = format!("{}/hooks/webhook-path-SECRET", t.upstream.url);
    let extra = format!(
        "client_keys = [\"client-key-SECRET\"]\nadmin_token = \"admin-token-SECRET\"\n[[alerts.webhooks]]\nurl = \"{hook}\"\n[providers.qwen.x]\n"
    )
    .replace("[providers.qwen.x]\n", "");
    let config = write_config(
        t.dir.path(),
        "leak.toml",
        "qwen",
        &t.upstream.url,
        &t.tokens.url,
        &dir,
        &extra,
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("client_secret = \"client-secret-SECRET\"\n");
    std::fs::write(&config, text).unwrap();

    let log = t.dir.path().join("leak.log");
    let mut cmd = std::process::Command::new(crate::process::BIN);
    cmd.arg("--config")
        .arg(&config)
        .env("TOKENRELAY_LOG", "trace")
        .env("RUST_BACKTRACE", "1");
    let p = Proc::spawn_cmd(cmd, &log);
    let mut said = Vec::new();
    let auth = |r: reqwest::RequestBuilder| r.header("x-api-key", "client-key-SECRET");
    let url = |path: &str| format!("{}{path}", p.proxy);
    for i in 0..6 {
        said.push(
            body_of(auth(t.http.post(url("/qwen/v1/chat/completions"))).json(&json!({"i": i})))
                .await,
        );
    }
    // Errors of every kind.
    for path in ["/nope/v1/x", "/qwen/v1/%2e%2e/x"] {
        said.push(body_of(auth(t.http.post(url(path)))).await);
    }
    said.push(
        body_of(
            t.http
                .post(url("/qwen/v1/x"))
                .header("authorization", "Bearer wrong-key"),
        )
        .await,
    );
    said.push(
        auth(t.http.post(format!("{}/qwen/v1/x", p.proxy)))
            .body(vec![b'x'; 40 << 20])
            .send()
            .await
            .map(|r| r.status().to_string())
            .unwrap_or_default(),
    );
    let admin = |path: &str, post: bool| {
        let url = format!("{}{path}", p.admin);
        let req = if post {
            t.http.post(url)
        } else {
            t.http.get(url)
        };
        body_of(req.bearer_auth("admin-token-SECRET"))
    };
    for (path, post) in [
        ("/admin/refresh", true),
        ("/admin/credentials/qwen/expired/refresh", true),
        ("/admin/reload", true),
        ("/admin/credentials", false),
        ("/readyz", false),
        ("/metrics", false),
    ] {
        said.push(admin(path, post).await);
    }
    said.push(body_of(t.http.get(format!("{}/admin/credentials", p.admin))).await);
    // Revoke everything and ask again: the all-failed error names credentials, not tokens.
    for s in t.tokens.state.issued_secrets.lock().unwrap().iter() {
        t.tokens.revoke(s);
        t.upstream.state.valid.remove(s);
    }
    said.push(admin("/admin/refresh", true).await);
    said.push(body_of(auth(t.http.post(url("/qwen/v1/x")))).await);
    tokio::time::sleep(Duration::from_millis(300)).await;

    secrets.extend(
        t.tokens
            .state
            .issued_secrets
            .lock()
            .unwrap()
            .iter()
            .cloned(),
    );
    assert!(secrets.len() > 10, "refreshes happened: {secrets:?}");
    let logs = p.logs();
    assert!(
        logs.contains("TRACE") || logs.contains("\"level\":\"TRACE\""),
        "trace logging was on"
    );
    assert!(logs.contains("token refreshed"));
    assert!(
        logs.lines().count() > 100,
        "trace output from tokenrelay and its HTTP stack"
    );
    assert!(
        logs.contains("refresh failed permanently"),
        "the doomed credential was revoked"
    );
    eprintln!(
        "searched {} log lines and {} answers for {} secrets",
        logs.lines().count(),
        said.len(),
        secrets.len()
    );
    let everything = format!("{logs}\n{}", said.join("\n"));
    for s in &secrets {
        assert!(
            !everything.contains(s.as_str()),
            "secret {s} leaked:\n{}",
            context(&everything, s)
        );
    }
}

/// The body of an answer (empty if the request failed).
async fn body_of(req: reqwest::RequestBuilder) -> String {
    match req.send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

fn context(text: &str, needle: &str) -> String {
    text.lines()
        .filter(|l| l.contains(needle))
        .take(3)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Sends raw bytes and returns the raw answer (the connection is closed after it).
fn raw(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cannot_steer_the_proxy_to_another_host() {
    // `evil.example` is admitted as a name of the listener here (the Host rule would
    // refuse it otherwise, see browser.rs): even so it cannot pick the upstream.
    let t = spawn_app(Flavor::Qwen)
        .toml("allowed_hosts = [\"evil.example\"]")
        .cred("a.json", qwen_cred("a", "r"))
        .access_token("a")
        .start()
        .await;
    let addr = t.proxy.trim_start_matches("http://").to_string();
    // Absolute-form target and Host / X-Forwarded-Host naming another host: the request
    // still goes to the configured upstream, with the path only.
    let a = addr.clone();
    let answer = tokio::task::spawn_blocking(move || {
        raw(&a, "GET http://evil.example/qwen/v1/models HTTP/1.1\r\nHost: evil.example\r\nX-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n")
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = t.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, "/v1/models");
    assert_ne!(seen[0].headers.get("host").unwrap(), "evil.example");
    // CONNECT is refused.
    let a = addr.clone();
    let answer = tokio::task::spawn_blocking(move || {
        raw(
            &a,
            "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Dot segments, encoded or not, and encoded slashes cannot change provider or escape.
    for path in [
        "/qwen/../gemini/x",
        "/qwen/%2e%2e/x",
        "/qwen/v1/%2E%2e%2fx",
        "/qwen/v1/..%5cx",
    ] {
        let a = addr.clone();
        let p = path.to_string();
        let answer = tokio::task::spawn_blocking(move || {
            raw(
                &a,
                &format!("GET {p} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
            )
        })
        .await
        .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.1 404"),
            "{path}: {answer}"
        );
    }
    let r = t
        .http
        .get(format!("{}/qwen%2f..%2fgemini/x", t.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "an encoded slash does not split the provider segment"
    );
    // Nothing else reached upstream. (Counted by path: under a loaded suite the first,
    // idempotent GET may have gone again on a new connection after a kept-alive one
    // closed under it, which is allowed.)
    let seen = t.upstream.seen();
    assert!(
        !seen.is_empty() && seen.iter().all(|s| s.path_and_query == "/v1/models"),
        "nothing else reached upstream: {:?}",
        seen.iter().map(|s| &s.path_and_query).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_resource_url_may_not_point_anywhere() {
    let t = spawn_app(Flavor::Qwen).start().await;
    let p = tokenrelay::Config::from_toml(
        "[providers.qwen]\ncredentials = []",
        "t.toml",
        &|k: &str| (k == "HOME").then(|| "/h".to_string()),
    )
    .unwrap()
    .providers[0]
        .clone();
    assert_eq!(
        p.base_url(Some("portal.qwen.ai")).unwrap().as_str(),
        "https://portal.qwen.ai/"
    );
    assert!(
        p.base_url(Some("http://portal.qwen.ai")).is_err(),
        "http only when the provider's upstream is http"
    );
    assert!(
        p.base_url(Some("https://user:pw@portal.qwen.ai")).is_err(),
        "no userinfo"
    );
    assert!(p.base_url(Some("ftp://portal.qwen.ai")).is_err());
    drop(t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_or_too_many_headers_are_refused() {
    let t = spawn_app(Flavor::Qwen)
        .toml("max_header_bytes = \"16KiB\"\nmax_headers = 20")
        .cred("a.json", qwen_cred("a", "r"))
        .access_token("a")
        .start()
        .await;
    let big = "x".repeat(32 << 10);
    let r = t
        .http
        .get(format!("{}/qwen/v1/x", t.proxy))
        .header("x-big", big)
        .send()
        .await;
    assert!(
        r.map(|r| r.status().as_u16()).unwrap_or(431) == 431,
        "huge header refused"
    );
    let mut req = t.http.get(format!("{}/qwen/v1/x", t.proxy));
    for i in 0..40 {
        req = req.header(format!("x-h{i}"), "1");
    }
    assert!(
        req.send().await.map(|r| r.status().as_u16()).unwrap_or(431) == 431,
        "too many headers refused"
    );
    assert!(t.upstream.seen().is_empty());
    // Normal requests still work.
    assert_eq!(t.post("/qwen/v1/x", json!({})).await.status(), 200);

    // The default limit (100, which tokenrelay leaves to hyper) holds too.
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", qwen_cred("a", "r"))
        .access_token("a")
        .start()
        .await;
    let with = |n: usize| {
        let mut req = t.http.get(format!("{}/qwen/v1/x", t.proxy));
        for i in 0..n {
            req = req.header(format!("x-h{i}"), "1");
        }
        req.send()
    };
    assert_eq!(with(90).await.unwrap().status(), 200, "90 headers pass");
    assert!(
        with(101).await.map(|r| r.status().as_u16()).unwrap_or(431) == 431,
        "101 headers refused by default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let t = spawn_app(Flavor::Qwen)
        .toml("header_read_timeout = \"500ms\"")
        .start()
        .await;
    let addr = t.proxy.trim_start_matches("http://").to_string();
    let took = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = Instant::now();
        s.write_all(b"GET /qwen/v1/x HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .unwrap();
        let mut buf = [0u8; 1024];
        // The server closes (possibly after a 408) instead of waiting forever.
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        started.elapsed()
    })
    .await
    .unwrap();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_are_capped() {
    let t = spawn_app(Flavor::Qwen)
        .toml("max_connections = 2")
        .cred("a.json", qwen_cred("a", "r"))
        .access_token("a")
        .start()
        .await;
    let addr = t.proxy.trim_start_matches("http://").to_string();
    // Two idle keep-alive connections take both slots.
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /qwen/v1/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            s
        })
        .collect();
    // A third is not served while they are open...
    let a = addr.clone();
    let third = std::thread::spawn(move || {
        let started = Instant::now();
        let answer = raw(
            &a,
            "GET /qwen/v1/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        );
        (answer, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !third.is_finished(),
        "a third connection was served while two were open"
    );
    // ...and is served as soon as one closes.
    held.pop();
    let (answer, waited) = third.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(waited >= Duration::from_millis(450));
}

#[tokio::test]
async fn group_readable_credential_files_get_a_warning_naming_the_fix() {
    let t = spawn_app(Flavor::Qwen).start().await;
    let dir = t.dir.path().join("perm");
    std::fs::create_dir(&dir).unwrap();
    let file = write_cred(&dir, "open.json", &qwen_cred("a", "r")); // mode 0644
    let config = write_config(
        t.dir.path(),
        "perm.toml",
        "qwen",
        &t.upstream.url,
        &t.tokens.url,
        &file,
        "",
    );
    let p = Proc::spawn(&config, &t.dir.path().join("perm.log"));
    let logs = p.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("readable by other users"))
        .unwrap_or_else(|| panic!("{logs}"));
    let v: Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["fix"], format!("chmod 600 {}", file.display()));
    assert_eq!(v["mode"], "644");
}
