//! The request path: what goes upstream, what comes back, failover and errors.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::wire::{hostile_upstream, Script, Then};

#[tokio::test]
async fn token_is_injected_and_client_secrets_are_not_forwarded() {
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", qwen_cred("good-access", "rt-a"))
        .access_token("good-access")
        .start()
        .await;
    let r = t
        .http
        .post(format!("{}/qwen/v1/chat/completions?x=1&y=%2F", t.proxy))
        .header("authorization", "Bearer client-dummy-key")
        .header("x-api-key", "client-x-api-key")
        .header("x-goog-api-key", "client-goog-key")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("x-custom", "kept")
        .header("connection", "x-hop")
        .header("x-hop", "dropped")
        .json(&json!({"model": "qwen3-coder-plus"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tokenrelay-credential"], "a");
    let seen = t.upstream.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.method, "POST");
    assert_eq!(s.path_and_query, "/v1/chat/completions?x=1&y=%2F");
    assert_eq!(s.headers["authorization"], "Bearer good-access");
    assert_eq!(s.headers["x-custom"], "kept");
    for dropped in [
        "x-api-key",
        "x-goog-api-key",
        "proxy-authorization",
        "x-hop",
    ] {
        assert!(!s.headers.contains_key(dropped), "{dropped} was forwarded");
    }
    assert_eq!(
        s.body,
        serde_json::to_vec(&json!({"model": "qwen3-coder-plus"})).unwrap()
    );
}

#[tokio::test]
async fn resource_url_chooses_the_upstream() {
    let valid = ValidTokens::default();
    valid.add("other-access");
    let other = FakeUpstream::start(Flavor::Qwen, valid).await;
    let mut cred = qwen_cred("other-access", "rt-a");
    cred["resource_url"] = Value::from(other.url.clone());
    let t = spawn_app(Flavor::Qwen).cred("a.json", cred).start().await;
    let r = t.post("/qwen/v1/chat/completions", json!({})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        other.seen().len(),
        1,
        "the credential's resource_url got the request"
    );
    assert!(
        t.upstream.seen().is_empty(),
        "the provider's upstream did not"
    );
}

#[tokio::test]
async fn unauthorized_upstream_answer_refreshes_once_and_replays_the_same_body() {
    // The file says the token is good for an hour, but upstream no longer accepts it.
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", qwen_cred("revoked-access", "rt-a"))
        .refresh_token("rt-a")
        .start()
        .await;
    let body = json!({"messages": [{"role": "user", "content": "hello ✓"}], "n": 12345});
    let r = t.post("/qwen/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(t.tokens.calls(), 1);
    let seen = t.upstream.seen();
    assert_eq!(seen.len(), 2, "one rejected attempt and one replay");
    assert_eq!(seen[0].body, seen[1].body);
    assert_eq!(seen[1].body, serde_json::to_vec(&body).unwrap());
    assert_ne!(
        seen[0].headers["authorization"],
        seen[1].headers["authorization"]
    );
    let m = t.metrics().await;
    assert!(
        m.contains(r#"tokenrelay_upstream_retries_total{provider="qwen",reason="unauthorized"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(
            r#"tokenrelay_upstream_requests_total{credential="a",provider="qwen",status="401"} 1"#
        ),
        "{m}"
    );
}

#[tokio::test]
async fn revoked_credential_beside_a_good_one_never_fails_a_request() {
    let t = spawn_app(Flavor::Google)
        .cred(
            "good.json",
            json!({
                "type": "authorized_user", "client_id": GOOGLE_CLIENT, "client_secret": "s",
                "refresh_token": "rt-good"
            }),
        )
        .cred(
            "revoked.json",
            json!({
                "type": "authorized_user", "client_id": GOOGLE_CLIENT, "client_secret": "s",
                "refresh_token": "rt-revoked"
            }),
        )
        .refresh_token("rt-good")
        .start()
        .await;
    for _ in 0..20 {
        let r = t
            .post(
                "/gemini/v1beta/models/gemini-2.5-pro:generateContent",
                json!({}),
            )
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-tokenrelay-credential"], "good");
    }
    let revoked = t.credential("revoked").await;
    assert_eq!(revoked["state"], "needs_reauth");
    assert!(
        revoked["last_error"]
            .as_str()
            .unwrap()
            .contains("invalid_grant"),
        "{revoked}"
    );
    // Revoked once, then skipped without asking the token endpoint again.
    assert_eq!(t.tokens.calls(), 2);
}

#[tokio::test]
async fn sse_events_arrive_as_they_are_sent() {
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", qwen_cred("good-access", "rt-a"))
        .access_token("good-access")
        .start()
        .await;
    let start = Instant::now();
    let r = t.post("/qwen/v1/sse", json!({"stream": true})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut stream = r.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        arrivals.push(start.elapsed());
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert_eq!(
        text,
        "data: {\"event\":0}\n\ndata: {\"event\":1}\n\ndata: {\"event\":2}\n\n"
    );
    assert!(arrivals.len() >= 3, "events were merged: {arrivals:?}");
    assert!(
        arrivals[0] < Duration::from_millis(250),
        "first event late: {arrivals:?}"
    );
    assert!(
        arrivals[arrivals.len() - 1] >= Duration::from_millis(550),
        "{arrivals:?}"
    );
}

#[tokio::test]
async fn quota_project_goes_out_as_x_goog_user_project() {
    let t = adc_app().await;
    let r = t
        .post(
            "/gemini/v1/models/gemini-2.5-flash:generateContent",
            json!({}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        t.upstream.seen()[0].headers["x-goog-user-project"],
        "my-gcp-project"
    );
    // The ADC file's own client went to the token endpoint.
    let form = t.tokens.last_form();
    assert_eq!(form["client_id"], GOOGLE_CLIENT);
    assert_eq!(form["client_secret"], "EXAMPLE-client-secret");
    assert_eq!(form["grant_type"], "refresh_token");
}

async fn error_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], status, "{v}");
    assert_eq!(v["error"]["type"], "tokenrelay_error", "{v}");
    assert!(v["error"]["status"].is_string(), "{v}");
    (status, v["error"].clone())
}

#[tokio::test]
async fn unknown_provider_is_404_in_the_error_shape() {
    let t = spawn_app(Flavor::Qwen).start().await;
    let (status, e) = error_of(t.post("/openai/v1/chat/completions", json!({})).await).await;
    assert_eq!(status, 404);
    assert_eq!(e["reason"], "unknown_provider");
    assert!(e["message"].as_str().unwrap().contains("qwen"), "{e}");
}

#[tokio::test]
async fn oversized_body_is_413() {
    // Bodies above max_request_body stream (uploads); above max_upload_body they are refused.
    let t = spawn_app(Flavor::Qwen)
        .toml("max_request_body = \"1KiB\"\nmax_upload_body = \"1500\"")
        .cred("a.json", qwen_cred("good-access", "rt-a"))
        .access_token("good-access")
        .start()
        .await;
    let big = json!({"content": "x".repeat(2000)});
    let (status, e) = error_of(t.post("/qwen/v1/chat/completions", big).await).await;
    assert_eq!(status, 413);
    assert_eq!(e["reason"], "request_too_large");
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains("server.max_upload_body"));
    assert!(
        t.upstream.seen().is_empty(),
        "refused before anything was forwarded"
    );
    // Chunked (no Content-Length) past the upload limit is cut off: the upstream never
    // receives a whole body, the client no success.
    let stream =
        futures_util::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 512])));
    let r = t
        .http
        .post(format!("{}/qwen/v1/chat/completions", t.proxy))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    assert!(r.map_or(true, |r| !r.status().is_success()));
    assert!(t.upstream.seen().iter().all(|s| s.body.len() != 2048));
}

#[tokio::test]
async fn no_usable_credential_names_each_credential_and_why() {
    let t = spawn_app(Flavor::Qwen)
        .cred("alice.json", expired_qwen("rt-dead-1"))
        .cred("bob.json", expired_qwen("rt-dead-2"))
        .start()
        .await;
    let (status, e) = error_of(t.post("/qwen/v1/chat/completions", json!({})).await).await;
    assert_eq!(status, 503);
    assert_eq!(e["reason"], "no_usable_credential");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("qwen/alice") && msg.contains("qwen/bob"),
        "{msg}"
    );
    assert!(msg.contains("invalid_request"), "{msg}");
    assert!(msg.contains("re-authenticate"), "{msg}");
    assert!(!msg.contains("rt-dead"), "a refresh token leaked: {msg}");
    // Second request: both are needs_reauth and skipped without a token-endpoint call.
    let calls = t.tokens.calls();
    let (status, e) = error_of(t.post("/qwen/v1/chat/completions", json!({})).await).await;
    assert_eq!(status, 503);
    assert!(
        e["message"].as_str().unwrap().contains("needs_reauth"),
        "{e}"
    );
    assert_eq!(t.tokens.calls(), calls);
}

#[tokio::test]
async fn token_endpoint_down_is_502_token_endpoint_unreachable() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/token", closed.local_addr().unwrap());
    drop(closed);
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", expired_qwen("rt-a"))
        .token_url(&url)
        .start()
        .await;
    let (status, e) = error_of(t.post("/qwen/v1/chat/completions", json!({})).await).await;
    assert_eq!(status, 502);
    assert_eq!(e["reason"], "token_endpoint_unreachable");
    assert!(e["message"].as_str().unwrap().contains("qwen/a"), "{e}");
    let c = t.credential("a").await;
    assert_eq!(c["state"], "expired");
    assert_eq!(c["consecutive_failures"], 1);
}

#[tokio::test]
async fn other_statuses_pass_through_untouched() {
    let t = spawn_app(Flavor::Qwen)
        .cred("a.json", qwen_cred("good-access", "rt-a"))
        .access_token("good-access")
        .start()
        .await;
    for code in [302u16, 400, 404, 500, 503] {
        let r = t.post(&format!("/qwen/status/{code}"), json!({})).await;
        assert_eq!(r.status().as_u16(), code);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], code);
    }
    assert_eq!(t.tokens.calls(), 0);
    assert!(
        t.upstream
            .seen()
            .iter()
            .all(|s| s.path_and_query != "/followed"),
        "a redirect was followed"
    );
}

#[tokio::test]
async fn rate_limited_credential_cools_down_and_the_next_one_serves() {
    let t = spawn_app(Flavor::Qwen)
        .toml("[pool]\nstrategy = \"fill_first\"")
        .cred("a.json", qwen_cred("limited-access", "rt-a"))
        .cred("b.json", qwen_cred("good-access", "rt-b"))
        .access_token("limited-access")
        .access_token("good-access")
        .start()
        .await;
    t.upstream
        .state
        .rate_limited
        .lock()
        .unwrap()
        .insert("limited-access".into(), Limit::Seconds(30));
    for _ in 0..3 {
        let r = t.post("/qwen/v1/chat/completions", json!({})).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-tokenrelay-credential"], "b");
    }
    assert_eq!(t.credential("a").await["state"], "cooling_down");
    // Only the first request touched the rate-limited credential.
    let limited = t
        .upstream
        .seen()
        .iter()
        .filter(|s| s.headers["authorization"] == "Bearer limited-access")
        .count();
    assert_eq!(limited, 1);
}

#[tokio::test]
async fn a_stream_that_goes_silent_is_cut_after_the_idle_timeout() {
    let t = spawn_app(Flavor::Qwen)
        .toml("upstream_idle_timeout = \"150ms\"")
        .cred("a.json", qwen_cred("good-access", "rt-a"))
        .access_token("good-access")
        .start()
        .await;
    // Events come 300 ms apart: the first arrives, then the silence is too long.
    let r = t.post("/qwen/v1/sse", json!({})).await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: {\"event\":0}"));
    let started = Instant::now();
    let mut failed = false;
    while let Some(chunk) = stream.next().await {
        if chunk.is_err() {
            failed = true;
            break;
        }
    }
    assert!(
        failed,
        "the stream should end in an error, not look complete"
    );
    assert!(
        started.elapsed() < Duration::from_millis(290),
        "{:?}",
        started.elapsed()
    );
}

/// tokenrelay with one proxy thread (so one connection pool) and one DashScope key in
/// front of `upstream`.
async fn one_key_on(upstream: &str) -> TestApp {
    let mut t = TestApp::empty().await;
    t.launch(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nproxy_threads = 1\n[providers.dashscope]\nupstream = \"{upstream}\"\napi_keys = [\"sk-one\"]"
    ))
    .await;
    t
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_used_for_the_next_request() {
    // Every answer is followed by a close.
    let (upstream, seen) = hostile_upstream(
        |_| {
            Script::answer(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}".to_vec(),
            )
            .then(Then::Close)
        },
        None,
    )
    .await;
    let t = one_key_on(&upstream).await;
    for _ in 0..3 {
        let resp = t
            .http
            .get(format!("{}/dashscope/v1/models", t.proxy))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            200,
            "a closed pooled connection is never an error"
        );
        assert_eq!(resp.text().await.unwrap(), r#"{"ok":true}"#);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(seen.accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test]
async fn upstream_answers_are_framed_strictly_and_ambiguous_ones_end_their_connection() {
    use std::sync::atomic::Ordering::SeqCst;
    // `/ok` well formed; `/smuggle` both Content-Length and chunked; `/conflict` two
    // different lengths; `/cut` a body shorter than its length, then a close.
    let (upstream, seen) = hostile_upstream(
        |r| {
            let bytes: &[u8] = match r.path.as_str() {
                "/v1/ok" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                "/v1/smuggle" => b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                "/v1/conflict" => {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!"
                }
                _ => return Script::answer(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b".to_vec()).then(Then::Close),
            };
            Script::answer(bytes.to_vec())
        },
        None,
    )
    .await;
    let t = one_key_on(&upstream).await;
    let get = |path: &str| {
        t.http
            .get(format!("{}/dashscope/v1/{path}", t.proxy))
            .send()
    };
    for _ in 0..2 {
        assert_eq!(get("ok").await.unwrap().text().await.unwrap(), "ok");
    }
    assert_eq!(
        seen.accepted.load(SeqCst),
        1,
        "a well-framed answer keeps its connection"
    );

    // Content-Length beside chunked: the chunked body, without the stale length, and the
    // connection is not used again.
    let r = get("smuggle").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("content-length").is_none(),
        "{:?}",
        r.headers()
    );
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(get("ok").await.unwrap().text().await.unwrap(), "ok");
    assert_eq!(
        seen.accepted.load(SeqCst),
        2,
        "a new connection after the ambiguous answer"
    );

    // Two lengths: a 502 in the error shape, never a guess.
    let r = get("conflict").await.unwrap();
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["reason"], "upstream_unreachable", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("content-length"),
        "{e}"
    );

    // A body cut short ends in an error at the client, not in a short body that looks whole.
    // (If hyper has not flushed the head when the body fails, the whole exchange fails.)
    let whole = match get("cut").await {
        Ok(r) => r.bytes().await.is_ok(),
        Err(_) => false,
    };
    assert!(!whole, "a cut body must not look complete");
    assert_eq!(get("ok").await.unwrap().text().await.unwrap(), "ok");
}
