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
