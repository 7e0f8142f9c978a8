//! `tokenrelay login`: the real binary against a fake Google authorization server (authorize
//! redirect with code and state; a token endpoint that checks the PKCE verifier, the
//! redirect URI and the client, and issues an ID token) driven by a fake browser, and a
//! fake Qwen device-flow server.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::process::BIN;

#[derive(Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    #[default]
    Ok,
    Denied,
    NoRefreshToken,
    NoCloudScope,
}

#[derive(Default)]
pub struct AuthServer {
    mode: Mutex<Mode>,
    email: Mutex<String>,
    /// code → (challenge, redirect_uri, client_id)
    codes: Mutex<HashMap<String, (String, String, String)>>,
    pub refresh_tokens: Mutex<Vec<String>>,
    /// Device flow: answers to give in order.
    device_script: Mutex<Vec<(u16, Value)>>,
    device_polls: Mutex<Vec<std::time::Instant>>,
    device_html: Mutex<bool>,
}

pub const CLIENT: &str = "desktop-client.apps.googleusercontent.com";
pub const SECRET: &str = "desktop-secret";

async fn authorize(
    State(s): State<Arc<AuthServer>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let redirect = &q["redirect_uri"];
    assert!(
        redirect.starts_with("http://127.0.0.1:"),
        "the IP literal, not localhost: {redirect}"
    );
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["access_type"], "offline");
    assert_eq!(q["prompt"], "consent");
    let state = &q["state"];
    let location = if *s.mode.lock().unwrap() == Mode::Denied {
        format!("{redirect}?error=access_denied&state={state}")
    } else {
        let code = format!("code-{}", s.codes.lock().unwrap().len());
        s.codes.lock().unwrap().insert(
            code.clone(),
            (
                q["code_challenge"].clone(),
                redirect.clone(),
                q["client_id"].clone(),
            ),
        );
        format!("{redirect}?state={state}&code={code}&scope=x")
    };
    (StatusCode::FOUND, [("location", location)]).into_response()
}

fn jwt(email: &str) -> String {
    let part = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.sig",
        part(json!({"alg": "RS256"})),
        part(json!({"email": email, "sub": "1"}))
    )
}

async fn token(
    State(s): State<Arc<AuthServer>>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let bad = |what: &str| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "error_description": what})),
        )
            .into_response()
    };
    match f.get("grant_type").map(String::as_str) {
        Some("authorization_code") => {
            let Some((challenge, redirect, client)) = s.codes.lock().unwrap().remove(&f["code"])
            else {
                return bad("unknown or used code");
            };
            let verifier = f.get("code_verifier").cloned().unwrap_or_default();
            let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
            if URL_SAFE_NO_PAD.encode(digest) != challenge {
                return bad("PKCE verifier does not match");
            }
            if f.get("redirect_uri") != Some(&redirect)
                || client != CLIENT
                || f.get("client_id").map(String::as_str) != Some(CLIENT)
                || f.get("client_secret").map(String::as_str) != Some(SECRET)
            {
                return bad("client or redirect_uri mismatch");
            }
            let mode = *s.mode.lock().unwrap();
            let rt = format!("rt-login-{}", s.refresh_tokens.lock().unwrap().len());
            s.refresh_tokens.lock().unwrap().push(rt.clone());
            let scope = if mode == Mode::NoCloudScope {
                "openid https://www.googleapis.com/auth/userinfo.email"
            } else {
                "openid https://www.googleapis.com/auth/userinfo.email https://www.googleapis.com/auth/cloud-platform"
            };
            let mut answer = json!({"access_token": "at-login", "expires_in": 3599, "scope": scope,
                "token_type": "Bearer", "id_token": jwt(&s.email.lock().unwrap())});
            if mode != Mode::NoRefreshToken {
                answer["refresh_token"] = json!(rt);
            }
            Json(answer).into_response()
        }
        Some("refresh_token") => {
            if !s
                .refresh_tokens
                .lock()
                .unwrap()
                .contains(&f["refresh_token"])
            {
                return bad("Token has been expired or revoked.");
            }
            Json(
                json!({"access_token": "at-refreshed", "expires_in": 3599, "token_type": "Bearer"}),
            )
            .into_response()
        }
        Some("urn:ietf:params:oauth:grant-type:device_code") => {
            s.device_polls
                .lock()
                .unwrap()
                .push(std::time::Instant::now());
            let mut script = s.device_script.lock().unwrap();
            let (status, body) = if script.len() > 1 {
                script.remove(0)
            } else {
                script[0].clone()
            };
            (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
        }
        _ => bad("unsupported grant"),
    }
}

async fn device(
    State(s): State<Arc<AuthServer>>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    if *s.device_html.lock().unwrap() {
        return (
            [("content-type", "text/html")],
            "<!doctype html><html><body>Qwen Chat</body></html>",
        )
            .into_response();
    }
    assert_eq!(f["code_challenge_method"], "S256");
    Json(json!({"device_code": "dc-1", "user_code": "ABCD-1234", "verification_uri": "https://chat.qwen.ai/authorize",
        "verification_uri_complete": "https://chat.qwen.ai/authorize?user_code=ABCD-1234", "expires_in": 30, "interval": 1}))
    .into_response()
}

pub async fn auth_server() -> (Arc<AuthServer>, String) {
    let s = Arc::new(AuthServer::default());
    *s.email.lock().unwrap() = "alice@example.com".into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/auth", get(authorize))
        .route("/token", post(token))
        .route("/device", post(device))
        .with_state(Arc::clone(&s));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (s, url)
}

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    secret: PathBuf,
}

fn setup(auth: &str, extra_provider: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client_secret.json");
    std::fs::write(
        &secret,
        json!({"installed": {"client_id": CLIENT, "client_secret": SECRET, "redirect_uris": ["http://localhost"]}}).to_string(),
    )
    .unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:1\"\n[providers.gemini]\nupstream = \"http://127.0.0.1:9\"\nauthorize_url = \"{auth}/auth\"\ntoken_url = \"{auth}/token\"\ncredentials = []\n{extra_provider}\n[providers.qwen]\ntoken_url = \"{auth}/token\"\ndevice_url = \"{auth}/device\"\ncredentials = []\n"
        ),
    )
    .unwrap();
    Setup {
        dir,
        config,
        secret,
    }
}

struct Login {
    child: Child,
    url: Option<String>,
}

fn start_login(config: &Path, args: &[&str]) -> Login {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(config).arg("login").args(args);
    start_login_cmd(cmd)
}

/// Runs a login command, reading its output up to the sign-in link (or device code).
fn start_login_cmd(mut cmd: Command) -> Login {
    let mut child = cmd
        .env("HOME", "/nonexistent-home")
        .env_remove("DISPLAY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut url = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(u) = line.trim().strip_prefix("http") {
            url = Some(format!("http{u}"));
            break;
        }
        if line.contains("enter the code") {
            break;
        }
    }
    // Keep reading so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Login { child, url }
}

/// Waits for the login to end: (exit code, stderr).
fn finish(mut l: Login) -> (i32, String) {
    let status = l.child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut l.child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code().unwrap_or(-1), err)
}

/// The fake browser: follows the authorization URL to its redirect, and returns the
/// redirect URL (without visiting it).
pub async fn consent(url: &str) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = http.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 302);
    resp.headers()["location"].to_str().unwrap().to_string()
}

async fn visit(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(
        resp.headers()
            .get("cache-control")
            .map(|v| v.to_str().unwrap()),
        Some("no-store")
    );
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// `tokenrelay login qwen --out OUT --no-browser --timeout 30s` to its end: (exit, stderr).
async fn qwen_device_login(s: &Setup, out: &Path) -> (i32, String) {
    let (config, out) = (s.config.clone(), out.to_path_buf());
    blocking(move || {
        finish(start_login(
            &config,
            &[
                "qwen",
                "--out",
                out.to_str().unwrap(),
                "--no-browser",
                "--timeout",
                "30s",
            ],
        ))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_sign_in_writes_a_file_tokenrelay_loads_and_refreshes() {
    let (auth, url) = auth_server().await;
    let s = setup(&url, "");
    let out = s.dir.path().join("creds/adc.json");
    let (config, secret, o) = (s.config.clone(), s.secret.clone(), out.clone());
    let l = blocking(move || {
        start_login(
            &config,
            &[
                "gemini",
                "--out",
                o.to_str().unwrap(),
                "--client-secret",
                secret.to_str().unwrap(),
                "--no-browser",
                "--project",
                "my-proj",
                "--timeout",
                "20s",
            ],
        )
    })
    .await;
    let auth_url = l.url.clone().expect("the sign-in link was printed");
    assert!(!auth_url.contains("code_verifier"));
    // A stray request on the loopback listener (the browser's favicon) ends nothing.
    let port = auth_url
        .split("127.0.0.1%3A")
        .nth(1)
        .unwrap()
        .split('%')
        .next()
        .unwrap()
        .to_string();
    let favicon = reqwest::get(format!("http://127.0.0.1:{port}/favicon.ico"))
        .await
        .unwrap();
    assert_eq!(favicon.status(), 404);
    let redirect = consent(&auth_url).await;
    let (status, page) = visit(&redirect).await;
    assert_eq!(status, 200);
    assert!(
        !page.contains("rt-login") && !page.contains("at-login"),
        "no token on the page"
    );
    let (code, err) = blocking(move || finish(l)).await;
    assert_eq!(code, 0, "{err}");
    let doc = read_json(&out);
    assert_eq!(doc["type"], "authorized_user");
    assert_eq!(doc["client_id"], CLIENT);
    assert_eq!(doc["client_secret"], SECRET);
    assert_eq!(doc["refresh_token"], "rt-login-0");
    assert_eq!(doc["account"], "alice@example.com");
    assert_eq!(doc["quota_project_id"], "my-proj");
    assert_eq!(doc["universe_domain"], "googleapis.com");
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // tokenrelay loads it and refreshes it at the same token endpoint.
    let mut t = TestApp::empty().await;
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_url = format!("http://{}", echo.local_addr().unwrap());
    let app = Router::new().fallback(|headers: axum::http::HeaderMap| async move {
        Json(json!({"authorization": headers.get("authorization").and_then(|v| v.to_str().ok()), "project": headers.get("x-goog-user-project").and_then(|v| v.to_str().ok())}))
    });
    tokio::spawn(async move { axum::serve(echo, app).await });
    t.launch(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[providers.gemini]\nupstream = \"{echo_url}\"\ntoken_url = \"{url}/token\"\ncredentials = [\"{}\"]",
        out.display()
    ))
    .await;
    let v = get_json(&t.http, format!("{}/gemini/v1beta/models", t.proxy)).await;
    assert_eq!(v["authorization"], "Bearer at-refreshed");
    assert_eq!(v["project"], "my-proj");
    drop(auth);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_instance_revives_a_needs_reauth_credential_after_login() {
    let (auth, url) = auth_server().await;
    let s = setup(&url, "");
    let creds = s.dir.path().join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    let file = write_cred(
        &creds,
        "work.json",
        &json!({"type": "authorized_user", "client_id": CLIENT, "client_secret": SECRET, "refresh_token": "rt-revoked", "account": "alice@example.com"}),
    );
    let mut t = TestApp::empty().await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[providers.gemini]\nupstream = \"http://127.0.0.1:9\"\nauthorize_url = \"{url}/auth\"\ntoken_url = \"{url}/token\"\ncredentials = [\"{}\"]\n[providers.qwen]\ncredentials = []\n",
        file.display()
    );
    std::fs::write(&s.config, &toml).unwrap();
    t.launch(&toml).await;
    wait_for("needs_reauth", Duration::from_secs(5), || async {
        t.credential("work").await["state"] == "needs_reauth"
    })
    .await;
    let hint = t.credential("work").await["hint"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(hint.contains("tokenrelay login gemini"), "{hint}");
    let admin = t.admin.trim_start_matches("http://").to_string();
    let config = s.config.clone();
    // The file's own client signs in again (no --client-secret), with its account as hint.
    let l = blocking(move || {
        start_login(
            &config,
            &[
                "gemini",
                "gemini/work",
                "--no-browser",
                "--admin",
                &admin,
                "--timeout",
                "20s",
            ],
        )
    })
    .await;
    let auth_url = l.url.clone().unwrap();
    assert!(
        auth_url.contains("login_hint=alice%40example.com"),
        "{auth_url}"
    );
    let redirect = consent(&auth_url).await;
    visit(&redirect).await;
    let (code, err) = blocking(move || finish(l)).await;
    assert_eq!(code, 0, "{err}");
    wait_for("ready again", Duration::from_secs(5), || async {
        t.credential("work").await["state"] == "ready"
    })
    .await;
    drop(auth);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_headless_path_takes_a_pasted_redirect_url() {
    let (_auth, url) = auth_server().await;
    let s = setup(&url, "");
    let out = s.dir.path().join("pasted.json");
    let (config, secret, o) = (s.config.clone(), s.secret.clone(), out.clone());
    let mut l = blocking(move || {
        start_login(
            &config,
            &[
                "gemini",
                "--out",
                o.to_str().unwrap(),
                "--client-secret",
                secret.to_str().unwrap(),
                "--no-browser",
                "--timeout",
                "20s",
            ],
        )
    })
    .await;
    let redirect = consent(l.url.as_deref().unwrap()).await;
    // The browser on the laptop cannot load 127.0.0.1 of the server; the user pastes it.
    let mut stdin = l.child.stdin.take().unwrap();
    writeln!(stdin, "{redirect}").unwrap();
    let (code, err) = blocking(move || finish(l)).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(read_json(&out)["refresh_token"], "rt-login-0");
}

/// Runs a login that is expected to fail: (exit code, stderr), and that nothing was written.
async fn failing(
    auth: &Arc<AuthServer>,
    url: &str,
    mode: Mode,
    args: &[&str],
    redirect_tweak: impl Fn(String) -> String,
) -> (i32, String) {
    *auth.mode.lock().unwrap() = mode;
    let s = setup(url, "");
    let out = s.dir.path().join("never.json");
    let mut all: Vec<String> = vec![
        "gemini".into(),
        "--out".into(),
        out.display().to_string(),
        "--no-browser".into(),
    ];
    all.push("--client-secret".into());
    all.push(s.secret.display().to_string());
    all.extend(
        args.iter()
            .filter(|a| **a != "--no-visit")
            .map(|a| a.to_string()),
    );
    let config = s.config.clone();
    let l = blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        start_login(&config, &args)
    })
    .await;
    if let Some(u) = l.url.clone() {
        if !args.contains(&"--no-visit") {
            let redirect = redirect_tweak(consent(&u).await);
            let _ = reqwest::get(&redirect).await;
        }
    }
    let result = blocking(move || finish(l)).await;
    assert!(!out.exists(), "nothing is written on failure");
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_names_its_cause_and_writes_nothing() {
    let (auth, url) = auth_server().await;
    let same = |r: String| r;
    let (code, err) = failing(&auth, &url, Mode::Denied, &["--timeout", "20s"], same).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("declined"), "{err}");
    let (code, err) = failing(&auth, &url, Mode::Ok, &["--timeout", "20s"], |r| {
        r.replace("state=", "state=forged")
    })
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("state does not match"), "{err}");
    let (code, err) = failing(
        &auth,
        &url,
        Mode::NoRefreshToken,
        &["--timeout", "20s"],
        same,
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("no refresh token") && err.contains("consent"),
        "{err}"
    );
    let (code, err) = failing(&auth, &url, Mode::NoCloudScope, &["--timeout", "20s"], same).await;
    assert_eq!(code, 1);
    assert!(err.contains("cloud-platform"), "{err}");
    let (code, err) = failing(
        &auth,
        &url,
        Mode::Ok,
        &["--timeout", "1s", "--no-visit"],
        same,
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no answer within"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_account_is_refused_unless_forced() {
    let (auth, url) = auth_server().await;
    *auth.email.lock().unwrap() = "mallory@example.com".into();
    let s = setup(&url, "");
    let out = write_cred(
        s.dir.path(),
        "alice.json",
        &json!({"type": "authorized_user", "client_id": CLIENT, "client_secret": SECRET, "refresh_token": "old", "account": "alice@example.com"}),
    );
    for (force, want) in [(false, 1), (true, 0)] {
        let (config, o) = (s.config.clone(), out.clone());
        let l = blocking(move || {
            let mut args = vec![
                "gemini",
                "--out",
                o.to_str().unwrap(),
                "--no-browser",
                "--timeout",
                "20s",
            ];
            if force {
                args.push("--force");
            }
            start_login(&config, &args)
        })
        .await;
        let redirect = consent(l.url.as_deref().unwrap()).await;
        let _ = reqwest::get(&redirect).await;
        let (code, err) = blocking(move || finish(l)).await;
        assert_eq!(code, want, "{err}");
        if !force {
            assert!(
                err.contains("belongs to alice@example.com") && err.contains("--force"),
                "{err}"
            );
            assert_eq!(read_json(&out)["refresh_token"], "old", "the file was kept");
        }
    }
    assert_eq!(read_json(&out)["account"], "mallory@example.com");
}

#[tokio::test]
async fn web_clients_and_other_programs_clients_are_refused() {
    let (_auth, url) = auth_server().await;
    let s = setup(&url, "");
    let web = s.dir.path().join("web.json");
    std::fs::write(
        &web,
        json!({"web": {"client_id": "w", "client_secret": "s"}}).to_string(),
    )
    .unwrap();
    let gcloud = s.dir.path().join("gcloud.json");
    std::fs::write(&gcloud, json!({"installed": {"client_id": "764086051850-6qr4p6gpi6hn506pt8ejuq83di341hur.apps.googleusercontent.com", "client_secret": "s"}}).to_string()).unwrap();
    for (file, want) in [
        (web, "Desktop app"),
        (gcloud, "gcloud auth application-default login"),
    ] {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&s.config)
            .args([
                "login",
                "gemini",
                "--out",
                "/tmp/never-written.json",
                "--no-browser",
                "--client-secret",
            ])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{err}");
    }
}

fn pending() -> (u16, Value) {
    (400, json!({"error": "authorization_pending"}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qwen_device_flow_polls_slows_down_and_writes_the_qwen_shape() {
    let (auth, url) = auth_server().await;
    *auth.device_script.lock().unwrap() = vec![
        pending(),
        (429, json!({"error": "slow_down"})),
        pending(),
        (
            200,
            json!({"access_token": "qa", "refresh_token": "qr", "expires_in": 3600, "resource_url": "portal.qwen.ai", "token_type": "Bearer"}),
        ),
    ];
    let s = setup(&url, "");
    let out = s.dir.path().join("oauth_creds.json");
    let (code, err) = qwen_device_login(&s, &out).await;
    assert_eq!(code, 0, "{err}");
    let doc = read_json(&out);
    assert_eq!(doc["refresh_token"], "qr");
    assert_eq!(doc["resource_url"], "portal.qwen.ai");
    assert!(
        doc["expiry_date"].as_i64().unwrap() > now_ms() + 3_500_000,
        "expiry_date in ms"
    );
    let polls = auth.device_polls.lock().unwrap().clone();
    assert_eq!(polls.len(), 4);
    let gap = |i: usize| polls[i + 1].duration_since(polls[i]);
    // The first waits are the server's interval (1 s); after slow_down, at least 1.5 s.
    assert!(
        gap(2) >= Duration::from_millis(1450),
        "slow_down stretched the interval: {:?} then {:?}",
        gap(0),
        gap(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qwen_device_flow_stops_on_denial_and_explains_an_html_answer() {
    let (auth, url) = auth_server().await;
    let s = setup(&url, "");
    *auth.device_script.lock().unwrap() = vec![pending(), (400, json!({"error": "access_denied"}))];
    let (code, err) = qwen_device_login(&s, Path::new("/tmp/never-qwen.json")).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("declined"), "{err}");
    *auth.device_html.lock().unwrap() = true;
    let (code, err) = qwen_device_login(&s, Path::new("/tmp/never-qwen.json")).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("closed its free OAuth tier") && err.contains("dashscope"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_device_code_starts_again() {
    let (auth, url) = auth_server().await;
    *auth.device_script.lock().unwrap() = vec![
        (400, json!({"error": "expired_token"})),
        (
            200,
            json!({"access_token": "qa2", "refresh_token": "qr2", "expires_in": 3600}),
        ),
    ];
    let s = setup(&url, "");
    let out = s.dir.path().join("again.json");
    let (code, err) = qwen_device_login(&s, &out).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(read_json(&out)["refresh_token"], "qr2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_target_gets_the_new_credential_in_state_dir() {
    let (_auth, url) = auth_server().await;
    let s = setup(&url, "");
    let secret_dir = s.dir.path().join("secret");
    std::fs::create_dir_all(&secret_dir).unwrap();
    let file = write_cred(
        &secret_dir,
        "work.json",
        &json!({"type": "authorized_user", "client_id": CLIENT, "client_secret": SECRET, "refresh_token": "rt-revoked"}),
    );
    let state = s.dir.path().join("state");
    std::fs::write(
        &s.config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:1\"\n[refresh]\nstate_dir = \"{}\"\n[providers.gemini]\nupstream = \"http://127.0.0.1:9\"\nauthorize_url = \"{url}/auth\"\ntoken_url = \"{url}/token\"\ncredentials = [\"{}\"]\n[providers.qwen]\ncredentials = []\n",
            state.display(),
            file.display()
        ),
    )
    .unwrap();
    let (config, dir) = (s.config.clone(), secret_dir.clone());
    // As a Kubernetes Secret volume is: read-only even for root (a private mount namespace).
    let l = blocking(move || {
        let mut cmd = crate::process::read_only_cmd(&config, &dir);
        cmd.args([
            "login",
            "gemini",
            "gemini/work",
            "--no-browser",
            "--timeout",
            "20s",
        ]);
        start_login_cmd(cmd)
    })
    .await;
    let redirect = consent(l.url.as_deref().unwrap()).await;
    visit(&redirect).await;
    let (code, err) = blocking(move || finish(l)).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        read_json(&file)["refresh_token"],
        "rt-revoked",
        "the read-only source is untouched"
    );
    let copy = read_json(&state.join("gemini/work.json"));
    assert_eq!(copy["refresh_token"], "rt-login-0");
    assert!(
        copy["tokenrelay_source_fingerprint"].is_string(),
        "tied to the source as it is now"
    );
}
