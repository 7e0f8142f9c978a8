//! API-key pools against fakes that answer like the real services: Google takes a key only
//! in `x-goog-api-key` and refuses dead keys with the fixture bodies; DashScope takes
//! `Authorization: Bearer` under `/compatible-mode/v1`. Dead keys leave the rotation,
//! quotas are per key and per model, and key files reload.

use futures_util::StreamExt as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use crate::helpers::*;

/// How the fake treats one key.
#[derive(Clone, Debug)]
pub enum Key {
    Good,
    /// 400 API_KEY_INVALID.
    Invalid,
    /// 403 "reported as leaked" (no ErrorInfo), also on the model list.
    Leaked,
    /// 403 SERVICE_DISABLED for project 123456789012.
    Disabled,
    /// 429 naming this model (QuotaFailure); other models are served.
    QuotaFor(&'static str),
    /// 429 `limit: 0` for this model.
    ZeroFor(&'static str),
    /// DashScope's 401 invalid_api_key.
    DashscopeDead,
    /// This fixture with this status, for requests for `model` ("" for every request).
    Fixture {
        model: &'static str,
        status: u16,
        file: &'static str,
    },
    /// A per-minute, per-project 429 for `model` with this `retryDelay` ("1s").
    Limited {
        model: &'static str,
        delay: &'static str,
    },
    /// Good, after this many milliseconds.
    Slow(u64),
    /// This fixture's bytes as they are (an SSE stream too), 200, in pieces of 7 bytes
    /// 5 ms apart, with this content type.
    Stream {
        file: &'static str,
        content_type: &'static str,
    },
    /// A fixture's bytes sent with `Content-Encoding: encoding` (already encoded).
    Encoded {
        bytes: Vec<u8>,
        encoding: &'static str,
    },
    /// (Internal) the key that started an upload session.
    StartedBy(String),
}

fn behaviour_key(headers: &axum::http::HeaderMap) -> Key {
    Key::StartedBy(
        headers
            .get("x-goog-api-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
    )
}

#[derive(Clone, Debug)]
pub struct Hit {
    pub key: String,
    pub path_and_query: String,
    pub headers: axum::http::HeaderMap,
}

#[derive(Default)]
pub struct KeyState {
    url: Mutex<String>,
    keys: Mutex<HashMap<String, Key>>,
    pub hits: Mutex<Vec<Hit>>,
    dashscope: bool,
}

pub struct KeyUpstream {
    pub url: String,
    pub state: Arc<KeyState>,
}

impl KeyUpstream {
    pub async fn start(dashscope: bool, keys: &[(&str, Key)]) -> KeyUpstream {
        let state = Arc::new(KeyState {
            dashscope,
            ..KeyState::default()
        });
        for (k, b) in keys {
            state.keys.lock().unwrap().insert(k.to_string(), b.clone());
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        *state.url.lock().unwrap() = url.clone();
        let app = Router::new()
            .fallback(answer)
            .with_state(Arc::clone(&state));
        tokio::spawn(async move { axum::serve(listener, app).await });
        KeyUpstream { url, state }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    /// Changes how a key answers from now on.
    pub fn set(&self, key: &str, behaviour: Key) {
        self.state
            .keys
            .lock()
            .unwrap()
            .insert(key.to_string(), behaviour);
    }

    pub fn hits_for(&self, key: &str) -> usize {
        self.hits().iter().filter(|h| h.key == key).count()
    }
}

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/responses/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn status_json(status: u16, v: Value) -> Response {
    (StatusCode::from_u16(status).unwrap(), axum::Json(v)).into_response()
}

/// A Gemini 429 for `model`, from the fixture, with its model swapped in.
fn quota_answer(fixture_name: &str, fixture_model: &str, model: &str) -> Response {
    let text = serde_json::to_string(&fixture(fixture_name))
        .unwrap()
        .replace(fixture_model, model);
    status_json(429, serde_json::from_str(&text).unwrap())
}

async fn answer(State(s): State<Arc<KeyState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let bearer = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let key = if s.dashscope {
        bearer.clone()
    } else {
        parts
            .headers
            .get("x-goog-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    s.hits.lock().unwrap().push(Hit {
        key: key.clone().unwrap_or_default(),
        path_and_query: path_and_query.clone(),
        headers: parts.headers.clone(),
    });
    if !s.dashscope && bearer.is_some() {
        // What Google answers an API key sent as `Authorization: Bearer`.
        return status_json(401, fixture("google_401_bearer_api_key.json"));
    }
    let behaviour = key.and_then(|k| s.keys.lock().unwrap().get(&k).cloned());
    let path = parts.uri.path();
    let model = path
        .split("/models/")
        .nth(1)
        .and_then(|m| m.split(':').next())
        .unwrap_or("");
    match behaviour {
        None if s.dashscope => {
            return status_json(401, fixture("dashscope_401_invalid_api_key.json"))
        }
        None | Some(Key::Invalid) => {
            return status_json(400, fixture("google_400_api_key_invalid.json"))
        }
        Some(Key::Leaked) => return status_json(403, fixture("google_403_api_key_leaked.json")),
        Some(Key::Disabled) => {
            return status_json(403, fixture("google_403_service_disabled.json"))
        }
        Some(Key::DashscopeDead) => {
            return status_json(401, fixture("dashscope_401_invalid_api_key.json"))
        }
        Some(Key::QuotaFor(m)) if m == model => {
            return quota_answer("google_429_quota_per_model.json", "gemini-2.5-pro", m)
        }
        Some(Key::ZeroFor(m)) if m == model => {
            return quota_answer("google_429_model_not_in_tier.json", "gemini-3.1-pro", m)
        }
        Some(Key::Fixture {
            model: m,
            status,
            file,
        }) if m.is_empty() || m == model => return status_json(status, fixture(file)),
        Some(Key::Limited { model: m, delay }) if m == model => {
            let text = serde_json::to_string(&fixture("google_429_per_minute_per_project.json"))
                .unwrap()
                .replace("gemini-2.5-flash", m)
                .replace("\"7s\"", &format!("\"{delay}\""));
            return status_json(429, serde_json::from_str(&text).unwrap());
        }
        Some(Key::Slow(ms)) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Some(Key::Encoded { bytes, encoding }) => {
            let pieces: Vec<Vec<u8>> = bytes.chunks(7).map(<[u8]>::to_vec).collect();
            let stream = futures_util::stream::iter(pieces).then(|p| async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok::<_, std::io::Error>(p)
            });
            return Response::builder()
                .header("content-type", "application/json")
                .header("content-encoding", encoding.to_string())
                .body(Body::from_stream(stream))
                .unwrap();
        }
        Some(Key::Stream { file, content_type }) => {
            let path = format!(
                "{}/tests/fixtures/responses/{file}",
                env!("CARGO_MANIFEST_DIR")
            );
            let bytes = std::fs::read(path).unwrap();
            let pieces: Vec<Vec<u8>> = bytes.chunks(7).map(<[u8]>::to_vec).collect();
            let stream = futures_util::stream::iter(pieces).then(|p| async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<_, std::io::Error>(p)
            });
            return Response::builder()
                .header("content-type", content_type)
                .body(Body::from_stream(stream))
                .unwrap();
        }
        Some(_) => {}
    }
    // Google's resumable upload: `start` gives a session URL on this host; the upload leg
    // must carry the key that started it.
    let command = parts
        .headers
        .get("x-goog-upload-command")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if command == "start" {
        let id = format!("up{}", s.hits.lock().unwrap().len());
        s.keys
            .lock()
            .unwrap()
            .insert(format!("upload:{id}"), behaviour_key(&parts.headers));
        return Response::builder()
            .header(
                "x-goog-upload-url",
                format!(
                    "{}/upload/v1beta/files?upload_id={id}&upload_protocol=resumable",
                    s.url.lock().unwrap()
                ),
            )
            .header("x-goog-upload-status", "active")
            .body(Body::empty())
            .unwrap();
    }
    if command.contains("upload") {
        let id = path_and_query
            .split("upload_id=")
            .nth(1)
            .and_then(|r| r.split('&').next())
            .unwrap_or("");
        let started_by = s.keys.lock().unwrap().get(&format!("upload:{id}")).cloned();
        if !matches!(started_by, Some(Key::StartedBy(k)) if Some(&k) == parts.headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()).map(str::to_string).as_ref())
        {
            return (StatusCode::FORBIDDEN, "not the key that started the upload").into_response();
        }
        let size = body.len();
        return Response::builder()
            .header("x-goog-upload-status", "final")
            .header("content-type", "application/json")
            .body(Body::from(json!({"file": {"name": format!("files/{id}"), "sizeBytes": size.to_string(), "mimeType": "text/plain", "state": "ACTIVE", "uri": "https://example/files/x"}}).to_string()))
            .unwrap();
    }
    if path.starts_with("/v1beta/files/") {
        // Someone else's file: a bare PERMISSION_DENIED about the request, not the key.
        return status_json(
            403,
            json!({"error": {"code": 403, "message": "You do not have permission to access the File or it may not exist.", "status": "PERMISSION_DENIED"}}),
        );
    }
    if path == "/slow" {
        let chunks = futures_util::stream::unfold(0, |i| async move {
            if i == 3 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            Some((Ok::<_, std::io::Error>(format!("data: {i}\n\n")), i + 1))
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(chunks))
            .unwrap();
    }
    if let Some(r) = sdk_answer(path, &body) {
        return r;
    }
    axum::Json(json!({"ok": true, "path": path_and_query})).into_response()
}

/// tokenrelay with one provider `name` over `upstream`, plus `extra` provider keys.
pub async fn relay(name: &str, upstream: &str, provider_keys: &str, top: &str) -> TestApp {
    let mut t = TestApp::empty().await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{top}\n[providers.{name}]\nupstream = \"{upstream}\"\ncredentials = []\n{provider_keys}"
    );
    t.launch(&toml).await;
    t
}

pub fn gemini_body() -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
}

#[tokio::test]
async fn gemini_keys_go_in_x_goog_api_key_and_the_clients_key_never_goes_upstream() {
    let up = KeyUpstream::start(false, &[("AIza-one", Key::Good), ("AIza-two", Key::Good)]).await;
    let t = relay(
        "gemini",
        &up.url,
        "api_keys = [\"AIza-one\", { key = \"AIza-two\", id = \"team-b\" }]",
        "",
    )
    .await;
    for _ in 0..2 {
        let resp = t
            .http
            .post(format!(
                "{}/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=dummy",
                t.proxy
            ))
            .header("x-goog-api-key", "dummy")
            .json(&gemini_body())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let hits = up.hits();
    assert_eq!(hits.len(), 2);
    let keys: Vec<&str> = hits.iter().map(|h| h.key.as_str()).collect();
    assert!(
        keys.contains(&"AIza-one") && keys.contains(&"AIza-two"),
        "{keys:?}"
    );
    for h in &hits {
        assert_eq!(
            h.path_and_query,
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert!(!h.headers.contains_key("authorization"));
    }
    // Ids: the configured one, else a short hash of the key, never the key.
    let (_, creds) = t.admin_json("/admin/credentials").await;
    let ids: Vec<&str> = creds["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"team-b"), "{ids:?}");
    let hashed = ids.iter().find(|i| i.starts_with("key-")).unwrap();
    assert_eq!(hashed.len(), "key-".len() + 8);
    assert!(!creds.to_string().contains("AIza-one"));
}

#[tokio::test]
async fn a_client_key_in_the_query_is_accepted_and_stripped() {
    let up = KeyUpstream::start(false, &[("AIza-one", Key::Good)]).await;
    let t = relay(
        "gemini",
        &up.url,
        "api_keys = [\"AIza-one\"]",
        "client_keys = [\"ck-secret\"]",
    )
    .await;
    let url = |q: &str| format!("{}/gemini/v1beta/models?{q}", t.proxy);
    let resp = t
        .http
        .get(url("key=ck-secret&pageSize=5"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = t.http.get(url("key=wrong")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    // With the client key in a header, a stray ?key= is still not forwarded.
    let resp = t
        .http
        .get(url("key=ck-secret"))
        .header("x-goog-api-key", "ck-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let hits = up.hits();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0].path_and_query, "/v1beta/models?pageSize=5");
    assert_eq!(hits[1].path_and_query, "/v1beta/models");
    for h in &hits {
        assert_eq!(h.key, "AIza-one");
        assert!(!format!("{:?}", h.headers).contains("ck-secret"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_key_among_three_is_tried_once_then_leaves_the_rotation() {
    let up = KeyUpstream::start(
        false,
        &[
            ("AIza-good-1", Key::Good),
            ("AIza-dead", Key::Invalid),
            ("AIza-good-2", Key::Good),
        ],
    )
    .await;
    let (receiver, hook) = alert_receiver().await;
    let t = relay(
        "gemini",
        &up.url,
        "api_keys = [\"AIza-good-1\", { key = \"AIza-dead\", id = \"dead\" }, \"AIza-good-2\"]",
        &format!("[[alerts.webhooks]]\nurl = \"{hook}\"\nformat = \"json\""),
    )
    .await;
    let url = format!(
        "{}/gemini/v1beta/models/gemini-2.5-flash:generateContent",
        t.proxy
    );
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (http, url) = (t.http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut bad = 0;
            for _ in 0..25 {
                let resp = http.post(&url).json(&gemini_body()).send().await.unwrap();
                if resp.status() != 200 {
                    bad += 1;
                }
            }
            bad
        }));
    }
    let mut client_errors = 0;
    for task in tasks {
        client_errors += task.await.unwrap();
    }
    assert_eq!(client_errors, 0, "500 requests, none failed");
    // Only requests already in flight when it was first refused can meet it (at most the
    // 20 concurrent clients); after that it is never tried again.
    let dead_hits = up.hits_for("AIza-dead");
    assert!((1..=20).contains(&dead_hits), "tried {dead_hits} times");
    for _ in 0..50 {
        let resp = t.http.post(&url).json(&gemini_body()).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(up.hits_for("AIza-dead"), dead_hits, "out of rotation");
    let c = t.credential("dead").await;
    assert_eq!(c["state"], "invalid");
    assert_eq!(c["usable"], false);
    let err = c["last_error"].as_str().unwrap();
    assert!(
        err.contains("API_KEY_INVALID") && err.contains("aistudio.google.com"),
        "{err}"
    );
    wait_for("the alert", Duration::from_secs(10), || async {
        receiver
            .lock()
            .unwrap()
            .iter()
            .any(|m| m["event"] == "credential_invalid" && m["credential"] == "dead")
    })
    .await;
    assert_eq!(t.admin_json("/readyz").await.0, 200, "two keys still serve");
    t.assert_metric(
        "tokenrelay_credential_state{credential=\"dead\",provider=\"gemini\",state=\"invalid\"} 1",
    )
    .await;
    // A manual refresh brings it back (to be refused again on its next use).
    let (status, _) = t.admin_post("/admin/credentials/gemini/dead/refresh").await;
    assert_eq!(status, 200);
    assert_eq!(t.credential("dead").await["state"], "ready");
}

#[tokio::test]
async fn when_every_key_is_dead_readyz_says_so_with_what_to_do() {
    let up = KeyUpstream::start(
        false,
        &[("AIza-a", Key::Invalid), ("AIza-b", Key::Disabled)],
    )
    .await;
    let t = relay("gemini", &up.url, "api_keys = [\"AIza-a\", \"AIza-b\"]", "").await;
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
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("API_KEY_INVALID") && msg.contains("SERVICE_DISABLED"),
        "{msg}"
    );
    assert!(msg.contains("project 123456789012"), "{msg}");
    assert!(
        !msg.contains("after a refresh"),
        "no refresh happened: {msg}"
    );
    let (status, ready) = t.admin_json("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    // Later requests spend no upstream call on them.
    let before = up.hits().len();
    let resp = t
        .http
        .get(format!("{}/gemini/v1beta/models", t.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(up.hits().len(), before);
}

#[tokio::test]
async fn a_leaked_key_is_confirmed_by_a_probe_and_a_foreign_file_403_passes_through() {
    let up = KeyUpstream::start(
        false,
        &[("AIza-leaked", Key::Leaked), ("AIza-good", Key::Good)],
    )
    .await;
    let t = relay(
        "gemini",
        &up.url,
        "api_keys = [{ key = \"AIza-leaked\", id = \"leaked\" }, { key = \"AIza-good\", id = \"good\" }]",
        "[pool]\nstrategy = \"fill_first\"",
    )
    .await;
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
    assert_eq!(resp.status(), 200, "the next key served");
    assert_eq!(resp.headers()["x-tokenrelay-credential"], "good");
    assert_eq!(t.credential("leaked").await["state"], "invalid");
    assert!(up
        .hits()
        .iter()
        .any(|h| h.key == "AIza-leaked" && h.path_and_query == "/v1beta/models?pageSize=1"));

    // A 403 about the request (someone else's file): the probe passes, the answer reaches
    // the client, and the key stays in rotation.
    let resp = t
        .http
        .get(format!("{}/gemini/v1beta/files/abc", t.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["status"], "PERMISSION_DENIED");
    assert_eq!(t.credential("good").await["state"], "ready");
}

#[tokio::test]
async fn a_quota_on_one_model_leaves_the_key_serving_other_models() {
    let up = KeyUpstream::start(false, &[("AIza-one", Key::QuotaFor("gemini-2.5-pro"))]).await;
    let t = relay(
        "gemini",
        &up.url,
        "api_keys = [{ key = \"AIza-one\", id = \"one\" }]",
        "",
    )
    .await;
    let call = |model: &str| {
        t.http
            .post(format!(
                "{}/gemini/v1beta/models/{model}:generateContent",
                t.proxy
            ))
            .json(&gemini_body())
            .send()
    };
    let resp = call("gemini-2.5-pro").await.unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // RetryInfo says 36s, but the quota is per day: until midnight in Los Angeles.
    let to_midnight =
        (tokenrelay::quota::window::next_pacific_midnight_ms(crate::helpers::now_ms())
            - crate::helpers::now_ms())
            / 1000;
    assert!(
        retry.abs_diff(to_midnight as u64) <= 5,
        "{retry} vs {to_midnight}"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["reason"], "all_credentials_rate_limited");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gemini-2.5-pro"));

    assert_eq!(
        call("gemini-2.5-flash").await.unwrap().status(),
        200,
        "another model"
    );
    let hits = up.hits().len();
    assert_eq!(call("gemini-2.5-pro").await.unwrap().status(), 429);
    assert_eq!(up.hits().len(), hits, "the cooled pair is not tried again");

    let c = t.credential("one").await;
    assert_eq!(c["state"], "ready");
    assert_eq!(c["model_cooldowns"][0]["model"], "gemini-2.5-pro");
    t.assert_metric(
        "tokenrelay_model_cooldowns_total{model=\"gemini-2.5-pro\",provider=\"gemini\"} 1",
    )
    .await;
}

#[tokio::test]
async fn a_zero_quota_cools_the_model_for_max_cooldown_on_every_key() {
    let up = KeyUpstream::start(
        false,
        &[
            ("AIza-a", Key::ZeroFor("gemini-3.1-pro")),
            ("AIza-b", Key::ZeroFor("gemini-3.1-pro")),
        ],
    )
    .await;
    let t = relay(
        "gemini",
        &up.url,
        "api_keys = [{ key = \"AIza-a\", id = \"a\" }, { key = \"AIza-b\", id = \"b\" }]",
        "[pool]\nmax_cooldown = \"2h\"",
    )
    .await;
    let url = format!(
        "{}/gemini/v1beta/models/gemini-3.1-pro:generateContent",
        t.proxy
    );
    let resp = t.http.post(&url).json(&gemini_body()).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(up.hits().len(), 2);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry > 7000,
        "limit: 0 waits max_cooldown, not the 11 s hint: {retry}"
    );
    for _ in 0..5 {
        let resp = t.http.post(&url).json(&gemini_body()).send().await.unwrap();
        assert_eq!(resp.status(), 429);
    }
    assert_eq!(
        up.hits().len(),
        2,
        "no upstream call per key on a model none may use"
    );
}

#[tokio::test]
async fn the_dashscope_preset_sends_bearer_keys_to_compatible_mode_and_streams() {
    let up = KeyUpstream::start(
        true,
        &[("sk-good", Key::Good), ("sk-dead", Key::DashscopeDead)],
    )
    .await;
    let t = relay(
        "dashscope",
        &format!("{}/compatible-mode", up.url),
        "api_keys = [{ key = \"sk-dead\", id = \"dead\" }, { key = \"sk-good\", id = \"good\" }]",
        "[pool]\nstrategy = \"fill_first\"",
    )
    .await;
    let chat = json!({"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}]});
    let resp = t
        .http
        .post(format!("{}/dashscope/v1/chat/completions", t.proxy))
        .bearer_auth("dummy")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = chat.clone();
    stream["stream"] = json!(true);
    let resp = t
        .http
        .post(format!("{}/dashscope/v1/chat/completions", t.proxy))
        .json(&stream)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert!(resp.text().await.unwrap().contains("[DONE]"));
    let hits = up.hits();
    assert_eq!(
        up.hits_for("sk-dead"),
        1,
        "tried once, then out of rotation"
    );
    for h in &hits {
        assert_eq!(h.path_and_query, "/compatible-mode/v1/chat/completions");
    }
    assert_eq!(
        hits.last().unwrap().headers["authorization"],
        "Bearer sk-good"
    );
    let dead = t.credential("dead").await;
    assert_eq!(dead["state"], "invalid");
    assert!(dead["last_error"]
        .as_str()
        .unwrap()
        .contains("invalid_api_key"));
}

#[test]
fn dashscope_regions_choose_the_documented_hosts() {
    for (region, host) in [
        (
            "intl",
            "https://dashscope-intl.aliyuncs.com/compatible-mode",
        ),
        ("cn", "https://dashscope.aliyuncs.com/compatible-mode"),
        ("us", "https://dashscope-us.aliyuncs.com/compatible-mode"),
        ("coding", "https://coding.dashscope.aliyuncs.com/"),
    ] {
        let c = tokenrelay::Config::from_toml(
            &format!("[providers.dashscope]\nregion = \"{region}\"\napi_keys = [\"sk\"]"),
            "t.toml",
            &|_| None,
        )
        .unwrap();
        let p = c.providers.iter().find(|p| p.name == "dashscope").unwrap();
        assert_eq!(p.upstream.as_str(), host, "{region}");
    }
    let err = tokenrelay::Config::from_toml(
        "[providers.dashscope]\nregion = \"mars\"",
        "t.toml",
        &|_| None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("providers.dashscope.region") && err.contains("intl"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_keys_file_reloads_without_touching_in_flight_requests() {
    let up = KeyUpstream::start(
        false,
        &[
            ("AIza-1", Key::Good),
            ("AIza-2", Key::Good),
            ("AIza-3", Key::Good),
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.txt");
    std::fs::write(&file, "# team keys\nAIza-1\n\nAIza-2\n").unwrap();
    let t = relay(
        "gemini",
        &up.url,
        &format!("api_keys_file = \"{}\"", file.display()),
        "[pool]\nstrategy = \"fill_first\"",
    )
    .await;
    let ids = |v: &Value| -> Vec<String> {
        v["credentials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_string())
            .collect()
    };
    let before = ids(&t.admin_json("/admin/credentials").await.1);
    assert_eq!(before.len(), 2);
    // A slow stream on the first key while that key leaves the file.
    let slow = {
        let (http, url) = (t.http.clone(), format!("{}/gemini/slow", t.proxy));
        tokio::spawn(async move { http.get(url).send().await.unwrap().text().await.unwrap() })
    };
    wait_for("the slow stream", Duration::from_secs(5), || async {
        up.hits_for("AIza-1") == 1
    })
    .await;
    std::fs::write(&file, "AIza-3\nAIza-2\n").unwrap();
    let (status, report) = t.admin_post("/admin/reload").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        slow.await.unwrap(),
        "data: 0\n\ndata: 1\n\ndata: 2\n\n",
        "the stream finished"
    );
    let after = ids(&t.admin_json("/admin/credentials").await.1);
    assert_eq!(after.len(), 2);
    assert!(
        after.contains(&before[1]),
        "a kept key keeps its id: {before:?} {after:?}"
    );
    assert!(!after.contains(&before[0]));
    let resp = t
        .http
        .get(format!("{}/gemini/v1beta/models", t.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.hits().last().unwrap().key,
        "AIza-3",
        "the new first key serves"
    );
}

/// A webhook receiver for alerts; returns the messages and the URL.
async fn alert_receiver() -> (Arc<Mutex<Vec<Value>>>, String) {
    let messages: Arc<Mutex<Vec<Value>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let m = Arc::clone(&messages);
    let app = Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let m = Arc::clone(&m);
            async move {
                m.lock().unwrap().push(v);
                StatusCode::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (messages, url)
}
