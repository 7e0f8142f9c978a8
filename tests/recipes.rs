//! The README's client recipes, each run with the real client (pinned in
//! tests/clients/requirements.txt and package.json, installed by `.ci/run`): the base URL,
//! the dummy credential and the settings each one needs, through one tokenrelay with a
//! Gemini key pool, a DashScope key pool and Vertex AI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::json;

use crate::helpers::*;
use crate::keys::{Key, KeyUpstream};

fn ci_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci")
}

fn recipe(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients/recipes")
        .join(name)
}

/// What a client's run printed, failing the test with it when the client failed.
fn run(mut cmd: Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e} (run .ci/run first)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// (path, authorization) of each request the Vertex stand-in saw.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// Vertex AI stand-in: takes any bearer token, answers like Gemini.
async fn vertex(State(seen): State<Seen>, req: Request) -> Response {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let path = req.uri().path().to_string();
    seen.lock().unwrap().push((path.clone(), auth));
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap();
    sdk_answer(&path, &body).unwrap_or_else(|| axum::Json(json!({})).into_response())
}

struct Recipes {
    t: TestApp,
    gemini: KeyUpstream,
    dashscope: KeyUpstream,
    vertex_seen: Seen,
}

async fn recipes() -> Recipes {
    let gemini = KeyUpstream::start(false, &[("AIza-r1", Key::Good), ("AIza-r2", Key::Good)]).await;
    let dashscope = KeyUpstream::start(true, &[("sk-r1", Key::Good)]).await;
    let vertex_seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let vport = listener.local_addr().unwrap().port();
    let app = Router::new()
        .fallback(vertex)
        .with_state(Arc::clone(&vertex_seen));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut t = TestApp::empty().await;
    let adc = write_cred(
        t.dir.path(),
        "vertex.json",
        &json!({"access_token": "vertex-access", "refresh_token": "r", "expiry_date": now_ms() + 3_600_000}),
    );
    t.launch(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [providers.gemini]\nupstream = \"{g}\"\ncredentials = []\napi_keys = [\"AIza-r1\", \"AIza-r2\"]\n\
         [providers.dashscope]\nupstream = \"{d}/compatible-mode\"\napi_keys = [\"sk-r1\"]\n\
         [providers.vertex]\nupstream = \"http://{{location}}-aiplatform.test:{vport}\"\nclient_id = \"c\"\ncredentials = [\"{adc}\"]\n\
         [providers.vertex.resolve]\n\"us-central1-aiplatform.test\" = \"127.0.0.1\"\n\"aiplatform.test\" = \"127.0.0.1\"\n",
        g = gemini.url,
        d = dashscope.url,
        adc = adc.display(),
    ))
    .await;
    Recipes {
        t,
        gemini,
        dashscope,
        vertex_seen,
    }
}

fn python(script: &str, base: &str) -> Command {
    let mut cmd = Command::new(ci_dir().join("venv/bin/python"));
    cmd.arg(recipe(script)).env("BASE", base);
    cmd
}

/// Scripts import packages from target/ci/node: run them from a copy placed there.
fn node_module_script(script: &str, base: &str) -> Command {
    let dir = ci_dir().join("node/recipes");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(recipe(script), dir.join(script)).unwrap();
    let mut cmd = Command::new("node");
    cmd.arg(dir.join(script)).env("BASE", base);
    cmd
}

fn assert_pool_keys_only(up: &KeyUpstream, keys: &[&str]) {
    let hits = up.hits();
    assert!(!hits.is_empty());
    for h in &hits {
        assert!(
            keys.contains(&h.key.as_str()),
            "{} reached the upstream with {:?}",
            h.path_and_query,
            h.key
        );
        assert!(
            !h.path_and_query.contains("key=unused"),
            "{}",
            h.path_and_query
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipe_google_genai_python_gemini_upload_and_vertex() {
    let r = recipes().await;
    let base = r.t.proxy.clone();
    tokio::task::spawn_blocking(move || run(python("genai_python.py", &base), "google-genai"))
        .await
        .unwrap();
    assert_pool_keys_only(&r.gemini, &["AIza-r1", "AIza-r2"]);
    let hits = r.gemini.hits();
    assert!(
        hits.iter().any(|h| h.path_and_query.contains("upload_id=")),
        "the upload leg came back through tokenrelay: {hits:?}"
    );
    let vertex = r.vertex_seen.lock().unwrap().clone();
    assert_eq!(vertex.len(), 1, "{vertex:?}");
    assert!(vertex[0]
        .0
        .contains("/projects/my-project/locations/us-central1/"));
    assert_eq!(
        vertex[0].1, "Bearer vertex-access",
        "the dummy token was replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipe_google_genai_js() {
    let r = recipes().await;
    let base = r.t.proxy.clone();
    tokio::task::spawn_blocking(move || {
        run(node_module_script("genai_js.mjs", &base), "@google/genai")
    })
    .await
    .unwrap();
    assert_pool_keys_only(&r.gemini, &["AIza-r1", "AIza-r2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipe_vercel_ai_sdk() {
    let r = recipes().await;
    let base = r.t.proxy.clone();
    tokio::task::spawn_blocking(move || {
        run(
            node_module_script("vercel_ai.mjs", &base),
            "the Vercel AI SDK",
        )
    })
    .await
    .unwrap();
    assert_pool_keys_only(&r.gemini, &["AIza-r1", "AIza-r2"]);
    assert_pool_keys_only(&r.dashscope, &["sk-r1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipe_litellm() {
    let r = recipes().await;
    let base = r.t.proxy.clone();
    tokio::task::spawn_blocking(move || run(python("litellm_client.py", &base), "litellm"))
        .await
        .unwrap();
    assert_pool_keys_only(&r.gemini, &["AIza-r1", "AIza-r2"]);
    assert_pool_keys_only(&r.dashscope, &["sk-r1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipe_langchain() {
    let r = recipes().await;
    let base = r.t.proxy.clone();
    tokio::task::spawn_blocking(move || run(python("langchain_client.py", &base), "langchain"))
        .await
        .unwrap();
    assert_pool_keys_only(&r.gemini, &["AIza-r1", "AIza-r2"]);
    assert_pool_keys_only(&r.dashscope, &["sk-r1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipe_gemini_cli_headless() {
    let r = recipes().await;
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join(".gemini")).unwrap();
    std::fs::write(
        home.path().join(".gemini/settings.json"),
        json!({
            "security": {"auth": {"selectedType": "gemini-api-key"}},
            "general": {"disableAutoUpdate": true, "disableUpdateNag": true},
            "privacy": {"usageStatisticsEnabled": false},
            "telemetry": {"enabled": false}
        })
        .to_string(),
    )
    .unwrap();
    let base = r.t.proxy.clone();
    let home_path = home.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(ci_dir().join("node/node_modules/.bin/gemini"));
        cmd.args(["-p", "hi", "-m", "gemini-2.5-flash"])
            .env("HOME", &home_path)
            .env("GEMINI_API_KEY", "unused")
            .env("GOOGLE_GEMINI_BASE_URL", format!("{base}/gemini"))
            .env("NO_BROWSER", "true")
            // Headless: trust the (empty) working directory without asking.
            .env("GEMINI_CLI_TRUST_WORKSPACE", "true")
            .current_dir(&home_path);
        run(cmd, "gemini-cli")
    })
    .await
    .unwrap();
    assert!(out.contains("Hello"), "{out}");
    assert_pool_keys_only(&r.gemini, &["AIza-r1", "AIza-r2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipe_curl() {
    let r = recipes().await;
    let base = r.t.proxy.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--fail",
            &format!("{base}/gemini/v1beta/models/gemini-2.5-flash:generateContent?key=unused"),
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#,
        ]);
        let gemini = run(cmd, "curl (gemini)");
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--fail",
            &format!("{base}/dashscope/v1/chat/completions"),
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"model":"qwen-plus","messages":[{"role":"user","content":"hi"}]}"#,
        ]);
        gemini + &run(cmd, "curl (dashscope)")
    })
    .await
    .unwrap();
    assert!(
        out.contains("Hello from the fake Gemini.")
            && out.contains("Hello from the fake upstream."),
        "{out}"
    );
    assert_pool_keys_only(&r.gemini, &["AIza-r1", "AIza-r2"]);
    assert_pool_keys_only(&r.dashscope, &["sk-r1"]);
}
