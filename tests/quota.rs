//! Quota intelligence against fakes answering with the real shapes: windows, projects,
//! the half-open probe and declared limits on one process (three replicas on a real Redis
//! are in `fleet.rs`).

use std::time::Duration;

use serde_json::Value;

use crate::keys::{gemini_body, relay, Key, KeyUpstream};

fn generate(model: &str) -> String {
    format!("/gemini/v1beta/models/{model}:generateContent")
}

async fn call(t: &crate::helpers::TestApp, model: &str) -> reqwest::Response {
    t.http
        .post(format!("{}{}", t.proxy, generate(model)))
        .json(&gemini_body())
        .send()
        .await
        .unwrap()
}

/// Waits until the clock minute has at least `margin` seconds left, so that a test's
/// requests fall in one minute window.
pub async fn early_in_a_minute(margin: i64) {
    while 60 - (crate::helpers::now_ms() / 1000) % 60 < margin {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Key a (answering as `a`) and key b (good), tried in that order; both of `project`
/// when given.
async fn a_then_b(a: Key, project: Option<&str>) -> (KeyUpstream, crate::helpers::TestApp) {
    let up = KeyUpstream::start(false, &[("AIza-a", a), ("AIza-b", Key::Good)]).await;
    let p = project.map_or(String::new(), |p| format!(", project = \"{p}\""));
    let t = relay(
        "gemini",
        &up.url,
        &format!(
            r#"api_keys = [{{ key = "AIza-a", id = "a"{p} }}, {{ key = "AIza-b", id = "b"{p} }}]"#
        ),
        "[pool]\nstrategy = \"fill_first\"",
    )
    .await;
    (up, t)
}

fn cooldown<'a>(c: &'a Value, model: &str) -> &'a Value {
    c["cooldowns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["model"] == model)
        .unwrap_or_else(|| panic!("no cool-down for {model}: {c}"))
}

#[tokio::test]
async fn a_per_project_quota_cools_the_model_on_every_key_of_the_project() {
    let up = KeyUpstream::start(
        false,
        &[
            (
                "AIza-a",
                Key::Limited {
                    model: "gemini-2.5-flash",
                    delay: "30s",
                },
            ),
            ("AIza-b", Key::Good),
            ("AIza-c", Key::Good),
        ],
    )
    .await;
    let t = relay(
        "gemini",
        &up.url,
        r#"api_keys = [{ key = "AIza-a", id = "a", project = "p1" }, { key = "AIza-b", id = "b", project = "p1" }, { key = "AIza-c", id = "c", project = "p2" }]"#,
        "[pool]\nstrategy = \"fill_first\"",
    )
    .await;
    // a is refused for the project's per-minute quota: b (same project) is not tried, c serves.
    assert_eq!(call(&t, "gemini-2.5-flash").await.status(), 200);
    assert_eq!(up.hits_for("AIza-a"), 1);
    assert_eq!(
        up.hits_for("AIza-b"),
        0,
        "b shares a's project quota: not extra capacity"
    );
    assert_eq!(up.hits_for("AIza-c"), 1);
    for id in ["a", "b"] {
        let c = t.credential(id).await;
        let cool = cooldown(&c, "gemini-2.5-flash");
        assert_eq!(cool["reason"], "per_minute", "{c}");
        assert_eq!(cool["scope"], "project", "{c}");
        assert!(
            (28..=30).contains(&cool["seconds"].as_u64().unwrap()),
            "{c}"
        );
        assert_eq!(c["state"], "ready", "other models still go through {id}");
    }
    assert!(t.credential("c").await["cooldowns"]
        .as_array()
        .unwrap()
        .is_empty());
    // Other models still use the project's keys.
    assert_eq!(call(&t, "gemini-2.5-pro").await.status(), 200);
    assert_eq!(up.hits_for("AIza-a"), 2);
    t.assert_metric(
        r#"tokenrelay_cooldowns_total{provider="gemini",reason="per_minute",scope="project"} 2"#,
    )
    .await;
    t.assert_metric(
        r#"tokenrelay_cooldowns_active{provider="gemini",reason="per_minute",scope="project"} 2"#,
    )
    .await;
}

#[tokio::test]
async fn an_undeclared_project_is_learned_from_the_answer() {
    let up = KeyUpstream::start(
        false,
        &[(
            "AIza-a",
            Key::Limited {
                model: "gemini-2.5-flash",
                delay: "30s",
            },
        )],
    )
    .await;
    let t = relay(
        "gemini",
        &up.url,
        r#"api_keys = [{ key = "AIza-a", id = "a" }]"#,
        "",
    )
    .await;
    assert_eq!(call(&t, "gemini-2.5-flash").await.status(), 429);
    let c = t.credential("a").await;
    assert_eq!(
        c["project"], "123456789012",
        "ErrorInfo.metadata.consumer names it"
    );
    // Learned with this answer: the scope becomes the project's on the next one.
    assert_eq!(cooldown(&c, "gemini-2.5-flash")["scope"], "project");
}

#[tokio::test]
async fn a_spent_day_cools_down_until_pacific_midnight_not_for_the_retry_hint() {
    let up = KeyUpstream::start(false, &[("AIza-a", Key::QuotaFor("gemini-2.5-pro"))]).await;
    let t = relay(
        "gemini",
        &up.url,
        r#"api_keys = [{ key = "AIza-a", id = "a" }]"#,
        "",
    )
    .await;
    let resp = call(&t, "gemini-2.5-pro").await;
    assert_eq!(resp.status(), 429);
    let midnight = tokenrelay::quota::window::next_pacific_midnight_ms(crate::helpers::now_ms());
    let retry: i64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (retry * 1000 - (midnight - crate::helpers::now_ms())).abs() < 5_000,
        "Retry-After {retry}s is the time to midnight in Los Angeles"
    );
    let c = t.credential("a").await;
    let cool = cooldown(&c, "gemini-2.5-pro");
    assert_eq!(cool["reason"], "per_day");
    assert!(
        (cool["until_ms"].as_i64().unwrap() - midnight).abs() < 5_000,
        "{cool}"
    );
    // The status command shows the reason and scope.
    let admin = t.admin.clone();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tokenrelay"))
            .args(["status", "--admin", &admin])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(
        out.contains("gemini-2.5-pro") && out.contains("per_day/credential"),
        "{out}"
    );
}

#[tokio::test]
async fn exactly_one_probe_goes_when_a_cooldown_ends() {
    let (up, t) = a_then_b(
        Key::Limited {
            model: "gemini-2.5-flash",
            delay: "1s",
        },
        None,
    )
    .await;
    assert_eq!(call(&t, "gemini-2.5-flash").await.status(), 200);
    assert_eq!(up.hits_for("AIza-a"), 1);
    // The cool-down ends; a answers again, slowly (3 s), so the probe is still out while
    // 20 more requests arrive at once.
    up.set("AIza-a", Key::Slow(3000));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let burst: Vec<_> = (0..20).map(|_| call(&t, "gemini-2.5-flash")).collect();
    let answers = futures_util::future::join_all(burst).await;
    assert!(answers.iter().all(|r| r.status() == 200));
    assert_eq!(up.hits_for("AIza-a"), 2, "one probe, the others went to b");
    assert_eq!(up.hits_for("AIza-b"), 20);
    // The probe was served: a is back in rotation for that model.
    let c = t.credential("a").await;
    assert!(c["cooldowns"].as_array().unwrap().is_empty(), "{c}");
    up.set("AIza-a", Key::Good);
    assert_eq!(call(&t, "gemini-2.5-flash").await.status(), 200);
    assert_eq!(up.hits_for("AIza-a"), 3);
}

#[tokio::test]
async fn a_rate_limit_without_a_hint_cools_until_the_next_minute_with_no_upstream_call() {
    // DashScope's per-minute limit carries no hint: until the next minute.
    let up = KeyUpstream::start(
        true,
        &[(
            "sk-a",
            Key::Fixture {
                model: "",
                status: 429,
                file: "dashscope_429_limit_requests.json",
            },
        )],
    )
    .await;
    let t = relay(
        "dashscope",
        &up.url,
        r#"api_keys = [{ key = "sk-a", id = "a" }]"#,
        "[pool]\nmax_cooldown = \"1h\"",
    )
    .await;
    let chat = || {
        t.http
            .post(format!("{}/dashscope/v1/chat/completions", t.proxy))
            .json(&serde_json::json!({"model": "qwen-plus", "messages": []}))
            .send()
    };
    // Until the next minute: start early enough that it has not come by the second call.
    early_in_a_minute(10).await;
    assert_eq!(chat().await.unwrap().status(), 429);
    let c = t.credential("a").await;
    let first = cooldown(&c, "qwen-plus").clone();
    assert_eq!(first["reason"], "per_minute");
    assert!(first["seconds"].as_u64().unwrap() <= 60);
    assert_eq!(up.hits().len(), 1);
    // Still cooling: no upstream call.
    assert_eq!(chat().await.unwrap().status(), 429);
    assert_eq!(up.hits().len(), 1);
}

#[tokio::test]
async fn dashscope_spent_quota_is_no_access_and_arrears_take_the_key_out() {
    let up = KeyUpstream::start(
        true,
        &[
            (
                "sk-free",
                Key::Fixture {
                    model: "",
                    status: 403,
                    file: "dashscope_403_free_tier_only.json",
                },
            ),
            (
                "sk-owing",
                Key::Fixture {
                    model: "",
                    status: 400,
                    file: "dashscope_400_arrearage.json",
                },
            ),
        ],
    )
    .await;
    let t = relay(
        "dashscope",
        &up.url,
        r#"api_keys = [{ key = "sk-free", id = "free" }, { key = "sk-owing", id = "owing" }]"#,
        "[pool]\nstrategy = \"fill_first\"",
    )
    .await;
    let resp = t
        .http
        .post(format!("{}/dashscope/v1/chat/completions", t.proxy))
        .json(&serde_json::json!({"model": "qwen-max", "messages": []}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_client_error() || resp.status().is_server_error());
    let free = t.credential("free").await;
    assert_eq!(cooldown(&free, "qwen-max")["reason"], "no_access", "{free}");
    let owing = t.credential("owing").await;
    assert_eq!(owing["state"], "invalid", "{owing}");
    assert!(owing["last_error"].as_str().unwrap().contains("Arrearage"));
}

#[tokio::test]
async fn credential_level_refusals_are_invalid_never_a_cooldown() {
    let (_up, t) = a_then_b(
        Key::Fixture {
            model: "",
            status: 401,
            file: "google_401_access_token_type_unsupported.json",
        },
        None,
    )
    .await;
    assert_eq!(call(&t, "gemini-2.5-flash").await.status(), 200);
    let a = t.credential("a").await;
    assert_eq!(a["state"], "invalid");
    assert!(a["cooldowns"].as_array().unwrap().is_empty());
    assert!(a["last_error"]
        .as_str()
        .unwrap()
        .contains("ACCESS_TOKEN_TYPE_UNSUPPORTED"));
}

#[tokio::test]
async fn a_declared_limit_is_never_sent_upstream() {
    let up = KeyUpstream::start(
        false,
        &[
            ("AIza-a", Key::Good),
            ("AIza-b", Key::Good),
            ("AIza-c", Key::Good),
        ],
    )
    .await;
    let t = relay(
        "gemini",
        &up.url,
        r#"api_keys = [{ key = "AIza-a", id = "a", project = "p1" }, { key = "AIza-b", id = "b", project = "p1" }, { key = "AIza-c", id = "c" }]
[providers.gemini.limits]
"gemini-2.5-pro" = { rpm = 3 }
"*" = { rpd = 1000 }"#,
        "",
    )
    .await;
    // Project p1 (a and b together) and c alone: 3 + 3 a minute for gemini-2.5-pro.
    early_in_a_minute(15).await;
    let started = tokenrelay::quota::window::minute_of(crate::helpers::now_ms());
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(call(&t, "gemini-2.5-pro").await.status().as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        6,
        "{statuses:?}"
    );
    assert_eq!(up.hits().len(), 6, "the refused ones never went upstream");
    let resp = call(&t, "gemini-2.5-pro").await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "until the minute turns: {retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["reason"], "all_credentials_rate_limited");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("project p1 is at its declared rpm limit"),
        "{message}"
    );
    // Another model is not limited by gemini-2.5-pro's entry.
    assert_eq!(call(&t, "gemini-2.5-flash").await.status(), 200);
    t.assert_metric(r#"tokenrelay_limit{model="gemini-2.5-pro",provider="gemini",window="rpm"} 3"#)
        .await;
    t.assert_metric(
        r#"tokenrelay_limit_used{model="gemini-2.5-pro",provider="gemini",window="rpm"} 3"#,
    )
    .await;
    let m = t.metrics().await;
    assert!(
        m.contains(r#"tokenrelay_limit_skips_total{provider="gemini",window="rpm"}"#),
        "{m}"
    );
    assert_eq!(
        tokenrelay::quota::window::minute_of(crate::helpers::now_ms()),
        started,
        "the test ran within one minute"
    );
}

#[tokio::test]
async fn the_console_shows_each_cooldowns_reason_and_scope() {
    let (_up, t) = a_then_b(
        Key::Limited {
            model: "gemini-2.5-flash",
            delay: "300s",
        },
        Some("p1"),
    )
    .await;
    // a is refused for its project's per-minute quota; b, of the same project, is not tried.
    assert_eq!(call(&t, "gemini-2.5-flash").await.status(), 429);
    let b = crate::webdriver::Browser::start().await;
    b.goto(&format!("{}/ui", t.admin)).await;
    b.wait_until(
        "rows",
        "document.querySelectorAll('#rows tr').length === 2",
        Duration::from_secs(10),
    )
    .await;
    let cell = b
        .script("return document.querySelector('tr[data-id=b] [data-role=cooldowns]').textContent;")
        .await;
    let cell = cell.as_str().unwrap();
    assert!(
        cell.contains("gemini-2.5-flash")
            && cell.contains("per minute")
            && cell.contains("project p1"),
        "{cell}"
    );
    assert_eq!(
        b.script("return document.querySelector('tr[data-id=a] [data-role=cooldowns] [data-reason]').dataset.scope;")
            .await,
        "project"
    );
}

#[tokio::test]
async fn an_oauth_token_of_a_kind_the_api_refuses_is_invalid_without_a_refresh() {
    let t = crate::helpers::adc_app().await;
    // The first request refreshes the ADC file (it carries no access token).
    assert_eq!(
        t.post("/gemini/v1/x", serde_json::json!({})).await.status(),
        200
    );
    let calls = t.tokens.calls();
    let resp = t
        .post(
            "/gemini/fixture/google_401_access_token_type_unsupported.json/401",
            serde_json::json!({}),
        )
        .await;
    assert_eq!(resp.status(), 503, "the only credential left the rotation");
    assert_eq!(t.tokens.calls(), calls, "no refresh: it cannot help");
    let c = t.credential("adc").await;
    assert_eq!(c["state"], "invalid", "{c}");
    assert!(c["last_error"]
        .as_str()
        .unwrap()
        .contains("ACCESS_TOKEN_TYPE_UNSUPPORTED"));
}
