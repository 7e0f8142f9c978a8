//! Real clients through tokenrelay: the official openai and google-genai Python SDKs, and
//! a real OAuth 2 server (the npm package oauth2-mock-server) as a custom provider's token
//! endpoint. `.ci/run` installs them (pinned) under target/ci/.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::helpers::*;
use crate::keys::{Key, KeyUpstream};

fn ci_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci")
}

fn python() -> PathBuf {
    let p = ci_dir().join("venv/bin/python");
    assert!(
        p.is_file(),
        "{} is missing: run .ci/run (it installs the pinned SDKs)",
        p.display()
    );
    p
}

fn run_python(script: &str, env: &[(&str, String)]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let out = Command::new(python())
        .arg(&path)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} failed:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_completes_streams_and_sees_typed_errors() {
    let good = spawn_app(Flavor::Qwen)
        .cred("work.json", qwen_cred("good", "rt"))
        .access_token("good")
        .start()
        .await;
    let dead = spawn_app(Flavor::Qwen)
        .cred("revoked.json", expired_qwen("rt-revoked"))
        .start()
        .await;
    let env = [
        ("BASE_URL", format!("{}/qwen/v1", good.proxy)),
        ("DEAD_BASE_URL", format!("{}/qwen/v1", dead.proxy)),
    ];
    tokio::task::spawn_blocking(move || run_python("openai_client.py", &env))
        .await
        .unwrap();
    let seen = good.upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.path_and_query, "/v1/chat/completions");
        assert_eq!(
            s.headers["authorization"], "Bearer good",
            "the SDK's dummy key was replaced"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_genai_sdk_generates_and_streams() {
    let t = adc_app().await;
    let env = [("BASE_URL", format!("{}/gemini", t.proxy))];
    tokio::task::spawn_blocking(move || run_python("genai_client.py", &env))
        .await
        .unwrap();
    let seen = t.upstream.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen[0]
            .path_and_query
            .contains("/models/gemini-2.5-flash:generateContent"),
        "{}",
        seen[0].path_and_query
    );
    assert!(seen[1].path_and_query.contains(":streamGenerateContent"));
    for s in &seen {
        assert!(
            !s.headers.contains_key("x-goog-api-key"),
            "the SDK's dummy key was dropped"
        );
        assert!(s.headers["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Bearer access-"));
        assert_eq!(s.headers["x-goog-user-project"], "my-gcp-project");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_genai_sdk_works_with_a_gemini_key_pool() {
    let up = KeyUpstream::start(
        false,
        &[("AIza-pool-1", Key::Good), ("AIza-pool-2", Key::Good)],
    )
    .await;
    let mut t = TestApp::empty().await;
    t.launch(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[providers.gemini]\nupstream = \"{}\"\ncredentials = []\napi_keys = [\"AIza-pool-1\", \"AIza-pool-2\"]",
        up.url
    ))
    .await;
    let env = [("BASE_URL", format!("{}/gemini", t.proxy))];
    tokio::task::spawn_blocking(move || run_python("genai_client.py", &env))
        .await
        .unwrap();
    let hits = up.hits();
    assert_eq!(hits.len(), 2, "{hits:?}");
    for h in &hits {
        assert!(
            h.key.starts_with("AIza-pool-"),
            "the SDK's dummy key was replaced"
        );
        assert!(!h.headers.contains_key("authorization"));
    }
    assert_ne!(hits[0].key, hits[1].key, "round robin over the pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_works_against_the_dashscope_preset() {
    let up = KeyUpstream::start(true, &[("sk-ds", Key::Good)]).await;
    let mut t = TestApp::empty().await;
    t.launch(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[providers.dashscope]\nupstream = \"{}/compatible-mode\"\napi_keys = [\"sk-ds\"]",
        up.url
    ))
    .await;
    let env = [("BASE_URL", format!("{}/dashscope/v1", t.proxy))];
    tokio::task::spawn_blocking(move || run_python("openai_dashscope.py", &env))
        .await
        .unwrap();
    let hits = up.hits();
    assert_eq!(hits.len(), 2);
    for h in &hits {
        assert_eq!(h.path_and_query, "/compatible-mode/v1/chat/completions");
        assert_eq!(h.headers["authorization"], "Bearer sk-ds");
    }
}

/// An upstream that accepts only RS256 JWTs signed by the OAuth server's key (its JWKS).
async fn jwt_upstream(jwks_url: String) -> String {
    async fn handle(State(jwks_url): State<String>, req: Request) -> axum::response::Response {
        let token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .to_string();
        let jwks: Value = reqwest::get(&jwks_url).await.unwrap().json().await.unwrap();
        match verify(&token, &jwks) {
            Ok(claims) => Json(json!({"ok": true, "sub": claims["sub"]})).into_response(),
            Err(why) => (StatusCode::UNAUTHORIZED, Json(json!({"error": why}))).into_response(),
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new().fallback(handle).with_state(jwks_url);
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn verify(token: &str, jwks: &Value) -> Result<Value, String> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let parts: Vec<&str> = token.split('.').collect();
    let [header, claims, sig] = parts[..] else {
        return Err("not a JWT".into());
    };
    let b64 = |s: &str| URL_SAFE_NO_PAD.decode(s).map_err(|e| e.to_string());
    let header: Value = serde_json::from_slice(&b64(header)?).map_err(|e| e.to_string())?;
    let key = jwks["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["kid"] == header["kid"]))
        .ok_or("unknown kid")?;
    let public = ring::signature::RsaPublicKeyComponents {
        n: b64(key["n"].as_str().ok_or("no n")?)?,
        e: b64(key["e"].as_str().ok_or("no e")?)?,
    };
    let signed = format!("{}.{}", parts[0], parts[1]);
    public
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            signed.as_bytes(),
            &b64(sig)?,
        )
        .map_err(|_| "bad signature")?;
    let claims: Value = serde_json::from_slice(&b64(claims)?).map_err(|e| e.to_string())?;
    if claims["exp"].as_i64().unwrap_or(0) * 1000 <= now_ms() {
        return Err("expired".into());
    }
    Ok(claims)
}

struct Node(std::process::Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_oauth2_server_backs_a_custom_provider() {
    let server = ci_dir().join("node/node_modules/oauth2-mock-server/dist/oauth2-mock-server.mjs");
    assert!(
        server.is_file(),
        "{} is missing: run .ci/run",
        server.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("oauth2.log");
    let node = Node(
        Command::new("node")
            .arg(&server)
            .args(["-a", "127.0.0.1", "-p", "0"])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("node"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let base = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(i) = text.find("listening on http://") {
            let rest = &text[i + "listening on ".len()..];
            break rest.split_whitespace().next().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "oauth2-mock-server did not start: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let upstream = jwt_upstream(format!("{base}/jwks")).await;
    let creds = dir.path().join("acme.json");
    write_cred(
        dir.path(),
        "acme.json",
        &json!({"access_token": "stale", "refresh_token": "rt-acme", "expires_at": 1}),
    );
    let config = TestApp::config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[providers.acme]\nupstream = \"{upstream}\"\ntoken_url = \"{base}/token\"\nclient_id = \"acme-client\"\ncredentials = [\"{}\"]\n",
        creds.display()
    ));
    let app = tokenrelay::App::start(config).await.unwrap();
    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://{}/acme/v1/things", app.proxy_addr))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["sub"], "johndoe",
        "the JWT oauth2-mock-server issued was verified upstream"
    );
    let file = read_json(&creds);
    assert!(
        file["access_token"].as_str().unwrap().starts_with("eyJ"),
        "written back: {file}"
    );
    app.shutdown().await;
    drop(node);
}
