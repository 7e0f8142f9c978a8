//! Usage read from real answer shapes as they stream past: sums in the metrics equal
//! what the fakes reported, an SSE stream still arrives whole and in pieces, and answers
//! without usage are counted as such.

use crate::keys::{gemini_body, relay, Key, KeyUpstream};

#[tokio::test]
async fn usage_in_json_and_sse_answers_is_counted_by_model_client_and_credential() {
    let up = KeyUpstream::start(
        false,
        &[
            (
                "AIza-json",
                Key::Stream {
                    file: "gemini_generate_content_usage.json",
                    content_type: "application/json",
                },
            ),
            (
                "AIza-sse",
                Key::Stream {
                    file: "gemini_stream_usage.sse",
                    content_type: "text/event-stream",
                },
            ),
        ],
    )
    .await;
    let t = relay(
        "gemini",
        &up.url,
        r#"api_keys = [{ key = "AIza-json", id = "json" }, { key = "AIza-sse", id = "sse" }]"#,
        "[pool]\nstrategy = \"round_robin\"",
    )
    .await;
    let sse_fixture = std::fs::read(format!(
        "{}/tests/fixtures/responses/gemini_stream_usage.sse",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    // Round robin: two answers from each key.
    for _ in 0..4 {
        let resp = t
            .http
            .post(format!(
                "{}/gemini/v1beta/models/gemini-2.5-flash:generateContent",
                t.proxy
            ))
            .json(&gemini_body())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let from = resp.headers()["x-tokenrelay-credential"]
            .to_str()
            .unwrap()
            .to_string();
        let body = resp.bytes().await.unwrap();
        if from == "sse" {
            assert_eq!(
                body.as_ref(),
                sse_fixture.as_slice(),
                "the stream arrives whole"
            );
        }
    }
    // JSON: 12 prompt, 34 completion, 2 cached, 6 thoughts; SSE (its last event): 12, 41, 0, 7.
    for (kind, n) in [
        ("prompt", 48),
        ("completion", 150),
        ("cached", 4),
        ("thoughts", 26),
    ] {
        t.assert_metric(&format!(
            r#"tokenrelay_tokens_total{{client="-",kind="{kind}",model="gemini-2.5-flash",provider="gemini"}} {n}"#
        ))
        .await;
    }
    t.assert_metric(r#"tokenrelay_credential_tokens_total{credential="json",kind="completion",provider="gemini"} 68"#).await;
    t.assert_metric(r#"tokenrelay_credential_tokens_total{credential="sse",kind="completion",provider="gemini"} 82"#).await;
    t.assert_metric(r#"tokenrelay_usage_unknown_total{provider="gemini"} 0"#)
        .await;
    // The same sums in /admin/usage, by credential and in minute buckets.
    let (status, usage) = t
        .admin_json("/admin/usage?by=client,model,credential&since=1h")
        .await;
    assert_eq!(status, 200, "{usage}");
    let rows = usage["rows"].as_array().unwrap();
    let row = |cred: &str| {
        rows.iter()
            .find(|r| r["credential"] == cred)
            .unwrap_or_else(|| panic!("{usage}"))
    };
    assert_eq!(
        (
            row("json")["prompt"].as_u64(),
            row("json")["completion"].as_u64()
        ),
        (Some(24), Some(68))
    );
    assert_eq!(row("sse")["completion"], 82);
    assert_eq!(row("sse")["model"], "gemini-2.5-flash");
    assert_eq!(row("sse")["client"], "-");
    assert_eq!(usage["total"]["prompt"], 48);
    assert_eq!(usage["total"]["thoughts"], 26);
    assert_eq!(usage["total"]["answers"], 4);
    let (_, stepped) = t.admin_json("/admin/usage?by=model&since=1h&step=1m").await;
    let sum: u64 = stepped["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["completion"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, 150, "{stepped}");
    assert_eq!(stepped["resolution_seconds"], 60);
    let (status, bad) = t.admin_json("/admin/usage?by=user").await;
    assert_eq!(status, 400);
    assert!(
        bad["error"]["message"].as_str().unwrap().contains("by"),
        "{bad}"
    );
}

#[tokio::test]
async fn a_stream_without_usage_is_counted_as_such_and_one_with_a_final_usage_chunk_is_read() {
    let up = KeyUpstream::start(
        true,
        &[
            (
                "sk-a",
                Key::Stream {
                    file: "openai_stream_usage.sse",
                    content_type: "text/event-stream",
                },
            ),
            ("sk-b", Key::Good),
        ],
    )
    .await;
    let t = relay(
        "dashscope",
        &up.url,
        r#"api_keys = [{ key = "sk-a", id = "a" }]"#,
        "",
    )
    .await;
    let chat = |model: &str| {
        t.http
            .post(format!("{}/dashscope/v1/chat/completions", t.proxy))
            .json(&serde_json::json!({"model": model, "stream": true, "messages": [], "stream_options": {"include_usage": true}}))
            .send()
    };
    let resp = chat("qwen-plus").await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.bytes().await.unwrap();
    t.assert_metric(r#"tokenrelay_tokens_total{client="-",kind="prompt",model="qwen-plus",provider="dashscope"} 21"#).await;
    t.assert_metric(r#"tokenrelay_tokens_total{client="-",kind="cached",model="qwen-plus",provider="dashscope"} 16"#).await;
    t.assert_metric(r#"tokenrelay_tokens_total{client="-",kind="thoughts",model="qwen-plus",provider="dashscope"} 3"#).await;
    t.assert_metric(r#"tokenrelay_usage_unknown_total{provider="dashscope"} 0"#)
        .await;
    // An answer with no usage in it (a stream asked without include_usage, here the
    // fake's plain JSON): counted as such.
    let plain = relay(
        "dashscope",
        &up.url,
        r#"api_keys = [{ key = "sk-b", id = "b" }]"#,
        "",
    )
    .await;
    let resp = plain
        .http
        .post(format!("{}/dashscope/v1/responses", plain.proxy))
        .json(&serde_json::json!({"model": "qwen-max", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.bytes().await.unwrap();
    plain
        .assert_metric(r#"tokenrelay_usage_unknown_total{provider="dashscope"} 1"#)
        .await;
}

/// A whole request: the answer's status, once its body has been read to its end (usage
/// is counted when an answer ends).
pub async fn generate_as(t: &crate::helpers::TestApp, key: &str, model: &str) -> Answer {
    let r = t
        .http
        .post(format!(
            "{}/gemini/v1beta/models/{model}:generateContent",
            t.proxy
        ))
        .header("x-goog-api-key", key)
        .json(&gemini_body())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = r.bytes().await.unwrap();
    Answer {
        status,
        retry_after,
        body: serde_json::from_slice(&body).unwrap_or_default(),
    }
}

/// A Gemini key `AIza-a` whose answers carry usage: 12 prompt, 34 completion, 6 thoughts
/// (52 tokens as limits count them), sent in 7-byte pieces.
pub async fn usage_upstream() -> KeyUpstream {
    KeyUpstream::start(
        false,
        &[(
            "AIza-a",
            Key::Stream {
                file: "gemini_generate_content_usage.json",
                content_type: "application/json",
            },
        )],
    )
    .await
}

/// The status of a whole `gemini-2.5-flash` request sent with `key`.
async fn flash(t: &crate::helpers::TestApp, key: &str) -> u16 {
    generate_as(t, key, "gemini-2.5-flash").await.status
}

pub struct Answer {
    pub status: u16,
    pub retry_after: Option<i64>,
    pub body: serde_json::Value,
}

#[tokio::test]
async fn clients_are_held_to_their_scopes_limits_and_budgets() {
    let up = usage_upstream().await;
    let t = relay(
        "gemini",
        &up.url,
        r#"api_keys = [{ key = "AIza-a", id = "a" }]"#,
        r#"client_keys = ["old-shared-key"]
[[clients]]
name = "bot"
key = "ck-bot"
providers = ["gemini"]
models = ["gemini-2.5-*"]
tokens_per_day = 100
[[clients]]
name = "agent"
key = "ck-agent"
rpm = 2"#,
    )
    .await;
    // No key, or a wrong one: 401. The unnamed server.client_keys still work.
    assert_eq!(flash(&t, "nope").await, 401);
    assert_eq!(flash(&t, "old-shared-key").await, 200);
    // Scopes.
    let r = generate_as(&t, "ck-bot", "gemini-3.1-pro").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.body["error"]["reason"], "client_forbidden");
    assert!(
        !r.body.to_string().contains("ck-bot"),
        "the key never appears"
    );
    assert_eq!(up.hits().len(), 1, "refused without an upstream call");
    // Budget: each answer reports 12 + 34 (+ 6 thoughts, billed output) = 52 tokens. The
    // one that crosses 100 is served, the next refused until midnight UTC.
    assert_eq!(flash(&t, "ck-bot").await, 200);
    assert_eq!(flash(&t, "ck-bot").await, 200);
    let r = generate_as(&t, "ck-bot", "gemini-2.5-flash").await;
    assert_eq!(r.status, 429);
    let retry = r.retry_after.unwrap();
    let now = crate::helpers::now_ms();
    let to_midnight = ((now / 86_400_000 + 1) * 86_400_000 - now) / 1000;
    assert!((retry - to_midnight).abs() <= 2, "{retry} vs {to_midnight}");
    assert_eq!(r.body["error"]["reason"], "client_budget_exhausted");
    // rpm: the third request of the minute is refused (unless the minute turned).
    let minute = now / 60_000;
    let statuses: Vec<u16> = futures_util::future::join_all(
        (0..3).map(|_| generate_as(&t, "ck-agent", "gemini-2.5-flash")),
    )
    .await
    .iter()
    .map(|r| r.status)
    .collect();
    if crate::helpers::now_ms() / 60_000 == minute {
        assert_eq!(
            statuses.iter().filter(|s| **s == 429).count(),
            1,
            "{statuses:?}"
        );
    }
    t.assert_metric(r#"tokenrelay_tokens_total{client="bot",kind="prompt",model="gemini-2.5-flash",provider="gemini"} 24"#).await;
    t.assert_metric(r#"tokenrelay_tokens_total{client="-",kind="prompt",model="gemini-2.5-flash",provider="gemini"} 12"#).await;
    t.assert_metric(
        r#"tokenrelay_client_requests_total{client="bot",provider="gemini",status="200"} 2"#,
    )
    .await;
    t.assert_metric(
        r#"tokenrelay_client_requests_total{client="bot",provider="gemini",status="403"} 1"#,
    )
    .await;
    t.assert_metric(
        r#"tokenrelay_client_requests_total{client="bot",provider="gemini",status="429"} 1"#,
    )
    .await;
    assert!(!t.metrics().await.contains("ck-"), "no key in the metrics");
}

/// The TOML of one Gemini key answering with usage, a client with a day budget of 100
/// tokens (each answer costs 52), and usage kept in `db`.
fn budget_toml(upstream: &str, db: &std::path::Path) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[usage]
path = "{}"
[[clients]]
name = "bot"
key = "ck-bot"
tokens_per_day = 100
[providers.gemini]
upstream = "{upstream}"
credentials = []
api_keys = [{{ key = "AIza-a", id = "a" }}]"#,
        db.display()
    )
}

#[tokio::test]
async fn usage_and_budgets_survive_a_restart() {
    let up = usage_upstream().await;
    let mut t = crate::helpers::TestApp::empty().await;
    let db = t.dir.path().join("state/usage.db");
    let toml = budget_toml(&up.url, &db);
    t.launch(&toml).await;
    for _ in 0..2 {
        assert_eq!(flash(&t, "ck-bot").await, 200);
    }
    assert_eq!(flash(&t, "ck-bot").await, 429);
    t.app.take().unwrap().shutdown().await;
    // A new process on the same file: the day's budget is still spent.
    t.launch(&toml).await;
    let (_, ready) = t.admin_json("/readyz").await;
    assert_eq!(ready["store"]["usage"], "sqlite", "{ready}");
    let r = generate_as(&t, "ck-bot", "gemini-2.5-flash").await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["error"]["reason"], "client_budget_exhausted");
    assert_eq!(up.hits().len(), 2, "refused without an upstream call");
    let (_, usage) = t.admin_json("/admin/usage?since=2h").await;
    assert_eq!(usage["store"], "sqlite");
    assert_eq!(usage["total"]["tokens"], 104, "{usage}");
    assert_eq!(usage["total"]["answers"], 2, "{usage}");
    assert_eq!(usage["clients"][0]["spent"]["tokens_today"], 104, "{usage}");
    assert_eq!(
        usage["clients"][0]["limits"]["tokens_per_day"], 100,
        "{usage}"
    );
}

#[tokio::test]
async fn clients_are_reloaded_from_the_file_and_keep_their_counts() {
    let up = KeyUpstream::start(false, &[("AIza-a", Key::Good)]).await;
    let mut t = crate::helpers::TestApp::empty().await;
    let file = t.dir.path().join("config.toml");
    let base = format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[usage]
path = ":memory:"
[providers.gemini]
upstream = "{}"
credentials = []
api_keys = [{{ key = "AIza-a", id = "a" }}]
"#,
        up.url
    );
    std::fs::write(
        &file,
        format!("{base}[[clients]]\nname = \"bot\"\nkey = \"ck-one\"\nrpm = 2\n"),
    )
    .unwrap();
    let env = |k: &str| std::env::var(k).ok();
    let app = tokenrelay::App::start(tokenrelay::Config::from_file(&file, &env).unwrap())
        .await
        .unwrap();
    t.proxy = format!("http://{}", app.proxy_addr);
    t.admin = format!("http://{}", app.admin_addr);
    t.app = Some(app);
    crate::quota::early_in_a_minute(15).await;
    assert_eq!(flash(&t, "ck-one").await, 200);
    assert_eq!(flash(&t, "ck-new").await, 401);
    // The key changes, a client joins.
    std::fs::write(
        &file,
        format!("{base}[[clients]]\nname = \"bot\"\nkey = \"ck-two\"\nrpm = 2\n[[clients]]\nname = \"new\"\nkey = \"ck-new\"\n"),
    )
    .unwrap();
    let (status, report) = t.admin_post("/admin/reload").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(flash(&t, "ck-one").await, 401);
    assert_eq!(flash(&t, "ck-new").await, 200);
    // bot kept its count: one request before the reload, one now, the third refused.
    assert_eq!(flash(&t, "ck-two").await, 200);
    assert_eq!(flash(&t, "ck-two").await, 429);
    // A file that no longer validates: reported, and the clients stay as they were.
    std::fs::write(
        &file,
        format!("{base}[[clients]]\nname = \"bot\"\nkey = \"ck-two\"\nrpm = 0\n"),
    )
    .unwrap();
    let (status, report) = t.admin_post("/admin/reload").await;
    assert_eq!(status, 422, "{report}");
    let errors = report["errors"].to_string();
    assert!(
        errors.contains("clients[0].rpm") && errors.contains("clients not reloaded"),
        "{errors}"
    );
    assert_eq!(flash(&t, "ck-new").await, 200);
}

#[tokio::test]
async fn a_compressed_answer_reaches_the_client_as_sent_and_its_usage_is_counted() {
    use std::io::Write as _;
    let json = std::fs::read(format!(
        "{}/tests/fixtures/responses/gemini_generate_content_usage.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&json).unwrap();
    let gzipped = gz.finish().unwrap();
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&json).unwrap();
    let deflated = z.finish().unwrap();
    let up = KeyUpstream::start(
        false,
        &[
            (
                "AIza-gz",
                Key::Encoded {
                    bytes: gzipped.clone(),
                    encoding: "gzip",
                },
            ),
            (
                "AIza-z",
                Key::Encoded {
                    bytes: deflated.clone(),
                    encoding: "deflate",
                },
            ),
            (
                "AIza-br",
                Key::Encoded {
                    bytes: b"not inflated".to_vec(),
                    encoding: "br",
                },
            ),
        ],
    )
    .await;
    for (key, sent, prompt, unknown) in [
        ("AIza-gz", &gzipped, 12, 0),
        ("AIza-z", &deflated, 12, 0),
        ("AIza-br", &b"not inflated".to_vec(), 0, 1),
    ] {
        let t = relay(
            "gemini",
            &up.url,
            &format!(r#"api_keys = [{{ key = "{key}", id = "k" }}]"#),
            "",
        )
        .await;
        let resp = t
            .http
            .post(format!(
                "{}/gemini/v1beta/models/gemini-2.5-flash:generateContent",
                t.proxy
            ))
            .header("accept-encoding", "gzip, deflate, br")
            .json(&gemini_body())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().contains_key("content-encoding"));
        let body = resp.bytes().await.unwrap();
        assert_eq!(
            body.as_ref(),
            sent.as_slice(),
            "{key}: the upstream's bytes, as sent"
        );
        t.assert_metric(&format!(
            r#"tokenrelay_tokens_total{{client="-",kind="prompt",model="gemini-2.5-flash",provider="gemini"}} {prompt}"#
        ))
        .await;
        t.assert_metric(&format!(
            r#"tokenrelay_usage_unknown_total{{provider="gemini"}} {unknown}"#
        ))
        .await;
    }
}

#[tokio::test]
async fn concurrent_requests_cannot_all_pass_a_nearly_spent_budget() {
    // Each request's body is ~240 bytes: an estimate of ~60 tokens is held while its
    // (slow, streamed) answer is on its way; the day's budget is 100.
    let up = usage_upstream().await;
    let t = relay(
        "gemini",
        &up.url,
        r#"api_keys = [{ key = "AIza-a", id = "a" }]"#,
        "[[clients]]\nname = \"bot\"\nkey = \"ck-bot\"\ntokens_per_day = 100",
    )
    .await;
    let body =
        serde_json::json!({"contents": [{"role": "user", "parts": [{"text": "x".repeat(180)}]}]});
    let one = || async {
        let r = t
            .http
            .post(format!(
                "{}/gemini/v1beta/models/gemini-2.5-flash:generateContent",
                t.proxy
            ))
            .header("x-goog-api-key", "ck-bot")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let _ = r.bytes().await;
        status
    };
    let statuses = futures_util::future::join_all((0..5).map(|_| one())).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "two estimates of ~60 fill a budget of 100: {statuses:?}"
    );
    assert_eq!(up.hits().len(), 2);
}

#[tokio::test]
async fn a_metered_stream_for_a_limited_client_still_arrives_event_by_event() {
    // The first event at once, the one with usage 1.5 s later: the client must get the
    // first while the upstream waits, and the usage is counted at the end.
    use axum::response::Response;
    let app = axum::Router::new().fallback(|| async {
        let stream = futures_util::stream::unfold(0, |i| async move {
            let event = match i {
                0 => r#"data: {"candidates":[{"content":{"parts":[{"text":"Hi"}]}}]}"#,
                1 => {
                    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
                    r#"data: {"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":7}}"#
                }
                _ => return None,
            };
            Some((Ok::<_, std::io::Error>(format!("{event}\n\n")), i + 1))
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from_stream(stream))
            .unwrap()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let t = relay(
        "gemini",
        &format!("http://{addr}"),
        r#"api_keys = [{ key = "AIza-a", id = "a" }]"#,
        "[[clients]]\nname = \"bot\"\nkey = \"ck-bot\"\ntpm = 100000\ntokens_per_day = 1000000",
    )
    .await;
    let started = std::time::Instant::now();
    let mut resp = t
        .http
        .post(format!(
            "{}/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            t.proxy
        ))
        .header("x-goog-api-key", "ck-bot")
        .json(&gemini_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(first.starts_with(b"data: {\"candidates\""), "{first:?}");
    assert!(
        first_at < std::time::Duration::from_millis(1000),
        "the first event waited for the rest: {first_at:?}"
    );
    while resp.chunk().await.unwrap().is_some() {}
    assert!(started.elapsed() >= std::time::Duration::from_millis(1400));
    t.assert_metric(r#"tokenrelay_tokens_total{client="bot",kind="prompt",model="gemini-2.5-flash",provider="gemini"} 5"#).await;
    let (_, usage) = t.admin_json("/admin/usage").await;
    assert_eq!(usage["clients"][0]["spent"]["tokens_today"], 12, "{usage}");
}

#[tokio::test]
async fn an_answer_without_usage_spends_its_estimate_only_for_generation() {
    // The DashScope fake answers these without usage. Embeddings spend nothing; a
    // generation whose usage cannot be read spends its request's estimate (and the row
    // keeps it, for a restart to restore).
    let up = KeyUpstream::start(true, &[("sk-a", Key::Good)]).await;
    let t = relay(
        "dashscope",
        &up.url,
        r#"api_keys = [{ key = "sk-a", id = "a" }]"#,
        "[[clients]]\nname = \"bot\"\nkey = \"ck-bot\"\ntokens_per_day = 100000",
    )
    .await;
    let body = serde_json::json!({"model": "qwen-max", "input": "x".repeat(360)});
    let bytes = serde_json::to_vec(&body).unwrap().len() as u64;
    for path in ["embeddings", "responses"] {
        let r = t
            .http
            .post(format!("{}/dashscope/v1/{path}", t.proxy))
            .bearer_auth("ck-bot")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
    }
    let estimate = bytes.div_ceil(4);
    let (_, usage) = t.admin_json("/admin/usage").await;
    assert_eq!(
        usage["clients"][0]["spent"]["tokens_today"], estimate,
        "{usage}"
    );
    assert_eq!(usage["total"]["tokens"], estimate, "{usage}");
    assert_eq!(usage["total"]["unknown"], 2, "{usage}");
}
