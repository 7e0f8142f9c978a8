//! `spawn_app()` and the fakes it starts on 127.0.0.1:0: a token endpoint that behaves like
//! Google's (no rotation, `invalid_grant` for revoked tokens) or Qwen's (a new refresh
//! token on every refresh, the old one dead afterwards), and an upstream that accepts only
//! access tokens the token endpoint issued (or that a test seeded) and can trickle SSE.
//! `TEST_LOG=1` shows tokenrelay's logs.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Form, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokenrelay::{App, Config};

/// A port nothing listens on right now (for servers the tests start as processes).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn now_ms() -> i64 {
    tokenrelay::clock::now_ms()
}

fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(
                    std::env::var("TEST_LOG")
                        .unwrap_or_default()
                        .replace('1', "debug"),
                ))
                .with_test_writer()
                .try_init();
        }
    });
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Access tokens the fake upstream accepts; shared with the fake token endpoint.
#[derive(Clone, Default)]
pub struct ValidTokens(Arc<Mutex<HashSet<String>>>);

impl ValidTokens {
    pub fn add(&self, t: &str) {
        self.0.lock().unwrap().insert(t.to_string());
    }
    pub fn remove(&self, t: &str) {
        self.0.lock().unwrap().remove(t);
    }
    fn contains(&self, t: &str) -> bool {
        self.0.lock().unwrap().contains(t)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Google,
    Qwen,
}

/// What the fake token endpoint answers besides normal grants.
#[derive(Clone)]
pub enum TokenFault {
    Status(u16, Value),
    /// A status with a body that is not JSON.
    Raw(u16, String),
    /// A status with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    Delay(Duration),
}

pub struct TokenEndpointState {
    flavor: Flavor,
    refresh_tokens: Mutex<HashSet<String>>,
    pub calls: AtomicUsize,
    issued: AtomicUsize,
    lifetime_secs: Mutex<u64>,
    fault: Mutex<Option<TokenFault>>,
    pub forms: Mutex<Vec<HashMap<String, String>>>,
    pub valid: ValidTokens,
    /// Client ids the endpoint accepts.
    clients: Mutex<HashSet<String>>,
    /// Claims of every accepted service-account assertion.
    pub jwt_claims: Mutex<Vec<Value>>,
    /// Answers refusing a refresh token (revoked, or already rotated away).
    pub refused: AtomicUsize,
    /// Refresh tokens whose new access tokens upstream will not accept (a banned account).
    pub unaccepted: Mutex<HashSet<String>>,
    /// Every access and refresh token this endpoint issued (for leak searches).
    pub issued_secrets: Mutex<Vec<String>>,
}

#[derive(Clone)]
pub struct FakeTokenEndpoint {
    pub url: String,
    pub state: Arc<TokenEndpointState>,
}

impl FakeTokenEndpoint {
    pub async fn start(flavor: Flavor, valid: ValidTokens) -> Self {
        let state = Arc::new(TokenEndpointState {
            flavor,
            refresh_tokens: Mutex::default(),
            calls: AtomicUsize::new(0),
            issued: AtomicUsize::new(0),
            lifetime_secs: Mutex::new(3599),
            fault: Mutex::default(),
            forms: Mutex::default(),
            valid,
            clients: Mutex::default(),
            jwt_claims: Mutex::default(),
            refused: AtomicUsize::new(0),
            unaccepted: Mutex::default(),
            issued_secrets: Mutex::default(),
        });
        let app = Router::new()
            .route("/token", post(token))
            .with_state(Arc::clone(&state));
        let addr = serve(app).await;
        FakeTokenEndpoint {
            url: format!("http://{addr}/token"),
            state,
        }
    }

    pub fn allow_refresh_token(&self, rt: &str) {
        self.state
            .refresh_tokens
            .lock()
            .unwrap()
            .insert(rt.to_string());
    }
    pub fn revoke(&self, rt: &str) {
        self.state.refresh_tokens.lock().unwrap().remove(rt);
    }
    pub fn allow_client(&self, id: &str) {
        self.state.clients.lock().unwrap().insert(id.to_string());
    }
    pub fn set_fault(&self, f: Option<TokenFault>) {
        *self.state.fault.lock().unwrap() = f;
    }
    #[allow(dead_code)] // for lifecycle tests with short-lived tokens
    pub fn set_lifetime(&self, secs: u64) {
        *self.state.lifetime_secs.lock().unwrap() = secs;
    }
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }
    pub fn last_form(&self) -> HashMap<String, String> {
        self.state
            .forms
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

async fn token(
    State(s): State<Arc<TokenEndpointState>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    s.calls.fetch_add(1, Ordering::SeqCst);
    s.forms.lock().unwrap().push(form.clone());
    let fault = s.fault.lock().unwrap().clone();
    match fault {
        Some(TokenFault::Status(code, body)) => {
            return (StatusCode::from_u16(code).unwrap(), Json(body)).into_response();
        }
        Some(TokenFault::Raw(code, body)) => {
            return (StatusCode::from_u16(code).unwrap(), body).into_response();
        }
        Some(TokenFault::RetryAfter(code, secs)) => {
            return (
                StatusCode::from_u16(code).unwrap(),
                [("retry-after", secs.to_string())],
                Json(json!({"error": "rate_limited"})),
            )
                .into_response();
        }
        Some(TokenFault::Delay(d)) => tokio::time::sleep(d).await,
        None => {}
    }
    let dead = || {
        s.refused.fetch_add(1, Ordering::SeqCst);
        match s.flavor {
        Flavor::Google => (StatusCode::BAD_REQUEST, Json(json!({"error":"invalid_grant","error_description":"Token has been expired or revoked."}))).into_response(),
        Flavor::Qwen => (StatusCode::BAD_REQUEST, Json(json!({"error":"invalid_request","error_description":"Invalid refresh token or client_id"}))).into_response(),
    }
    };
    if form.get("grant_type").map(String::as_str)
        == Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return jwt_bearer(&s, form.get("assertion").map(String::as_str).unwrap_or(""));
    }
    if form.get("grant_type").map(String::as_str) != Some("refresh_token") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error":"unsupported_grant_type"})),
        )
            .into_response();
    }
    let client_ok = form
        .get("client_id")
        .is_some_and(|c| s.clients.lock().unwrap().contains(c));
    if !client_ok {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error":"invalid_client","error_description":"The OAuth client was not found."}))).into_response();
    }
    let Some(rt) = form.get("refresh_token") else {
        return dead();
    };
    if !s.refresh_tokens.lock().unwrap().contains(rt) {
        return dead();
    }
    let n = s.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let access = format!("access-{n}-{}", rand_suffix());
    s.issued_secrets.lock().unwrap().push(access.clone());
    if !s.unaccepted.lock().unwrap().contains(rt) {
        s.valid.add(&access);
    }
    let lifetime = *s.lifetime_secs.lock().unwrap();
    match s.flavor {
        Flavor::Google => Json(json!({
            "access_token": access, "expires_in": lifetime,
            "scope": "https://www.googleapis.com/auth/cloud-platform", "token_type": "Bearer"
        }))
        .into_response(),
        Flavor::Qwen => {
            let new_rt = format!("refresh-{n}-{}", rand_suffix());
            s.issued_secrets.lock().unwrap().push(new_rt.clone());
            {
                let mut rts = s.refresh_tokens.lock().unwrap();
                rts.remove(rt);
                rts.insert(new_rt.clone());
            }
            Json(json!({
                "access_token": access, "refresh_token": new_rt, "token_type": "Bearer",
                "expires_in": lifetime, "resource_url": Value::Null
            }))
            .into_response()
        }
    }
}

/// Google's JWT bearer grant: the assertion must be signed by the service account's key
/// (checked against the fixture key's public half) and carry the right claims.
fn jwt_bearer(s: &TokenEndpointState, assertion: &str) -> Response {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let bad = |why: &str| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "error_description": why})),
        )
            .into_response()
    };
    let parts: Vec<&str> = assertion.split('.').collect();
    if parts.len() != 3 {
        return bad("not a JWT");
    }
    let signed = format!("{}.{}", parts[0], parts[1]);
    let Ok(sig) = URL_SAFE_NO_PAD.decode(parts[2]) else {
        return bad("bad signature encoding");
    };
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        service_account_public_key(),
    );
    if public.verify(signed.as_bytes(), &sig).is_err() {
        return bad("Invalid JWT Signature.");
    }
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let now = now_ms() / 1000;
    let iat = claims["iat"].as_i64().unwrap_or(0);
    let exp = claims["exp"].as_i64().unwrap_or(0);
    if header["alg"] != "RS256"
        || claims["iss"] != "tokenrelay-test@my-gcp-project.iam.gserviceaccount.com"
        || !claims["aud"]
            .as_str()
            .is_some_and(|a| a.ends_with("/token"))
        || claims["scope"].as_str().is_none_or(|sc| sc.is_empty())
        || (iat - now).abs() > 60
        || exp - iat != 3600
    {
        return bad(&format!("bad claims: {header} {claims}"));
    }
    s.jwt_claims.lock().unwrap().push(claims);
    let n = s.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let access = format!("sa-access-{n}-{}", rand_suffix());
    s.valid.add(&access);
    Json(json!({"access_token": access, "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

/// The public half of the fixture service-account key, as RSAPublicKey DER.
pub fn service_account_public_key() -> Vec<u8> {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use ring::signature::KeyPair as _;
    let key: Value = serde_json::from_str(include_str!(
        "fixtures/credentials/service_account_test_key.json"
    ))
    .unwrap();
    let pem = key["private_key"].as_str().unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = STANDARD.decode(b64).unwrap();
    let pair = ring::signature::RsaKeyPair::from_pkcs8(&der).unwrap();
    pair.public_key().as_ref().to_vec()
}

fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// How the fake upstream refuses a rate-limited token.
#[derive(Clone, Copy, Debug)]
pub enum Limit {
    /// 429 with `Retry-After: <seconds>` and Google's body.
    Seconds(u64),
    /// 429 with `Retry-After: <HTTP date this many seconds ahead>`.
    HttpDate(u64),
    /// 429 with only Google's `RetryInfo.retryDelay` ("45.123s") in the body.
    RetryInfo,
    /// Qwen's 403 `insufficient_quota`, no hint.
    QuotaForbidden,
}

impl Limit {
    fn answer(self) -> Response {
        let google = include_str!("fixtures/responses/google_429_resource_exhausted.json");
        let json = ("content-type", "application/json".to_string());
        match self {
            Limit::Seconds(secs) => (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", secs.to_string()), json],
                google,
            )
                .into_response(),
            Limit::HttpDate(secs) => {
                let when = httpdate::fmt_http_date(
                    std::time::SystemTime::now() + Duration::from_secs(secs),
                );
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", when), json],
                    google,
                )
                    .into_response()
            }
            Limit::RetryInfo => (StatusCode::TOO_MANY_REQUESTS, [json], google).into_response(),
            Limit::QuotaForbidden => (
                StatusCode::FORBIDDEN,
                [json],
                include_str!("fixtures/responses/qwen_403_insufficient_quota.json"),
            )
                .into_response(),
        }
    }
}

/// One request as the fake upstream saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct UpstreamState {
    pub valid: ValidTokens,
    pub seen: Mutex<Vec<Seen>>,
    flavor: Flavor,
    /// Tokens that get a 429 (with this Retry-After, seconds) instead of an answer.
    pub rate_limited: Mutex<HashMap<String, Limit>>,
}

#[derive(Clone)]
pub struct FakeUpstream {
    pub url: String,
    pub state: Arc<UpstreamState>,
}

impl FakeUpstream {
    pub async fn start(flavor: Flavor, valid: ValidTokens) -> Self {
        let state = Arc::new(UpstreamState {
            valid,
            seen: Mutex::default(),
            flavor,
            rate_limited: Mutex::default(),
        });
        let addr = serve(
            Router::new()
                .fallback(upstream)
                .with_state(Arc::clone(&state)),
        )
        .await;
        FakeUpstream {
            url: format!("http://{addr}"),
            state,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

/// Accepts valid bearer tokens only. `/sse` trickles three events 300 ms apart;
/// `/status/{code}` answers that status; everything else echoes what it saw.
async fn upstream(State(s): State<Arc<UpstreamState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    s.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path_and_query: path_and_query.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let token = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !s.valid.contains(token) {
        let body = match s.flavor {
            Flavor::Google => include_str!("fixtures/responses/google_401_unauthenticated.json"),
            Flavor::Qwen => include_str!("fixtures/responses/qwen_401_invalid_api_key.json"),
        };
        return (
            StatusCode::UNAUTHORIZED,
            [("content-type", "application/json")],
            body,
        )
            .into_response();
    }
    if let Some(limit) = s.rate_limited.lock().unwrap().get(token) {
        return limit.answer();
    }
    let path = parts.uri.path();
    if let Some(answer) = sdk_answer(path, &body) {
        return answer;
    }
    if path.ends_with("/sse") {
        let stream = async_stream(3, Duration::from_millis(300));
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    if let Some(code) = path.strip_prefix("/big/") {
        // A large error page (200,000 bytes), sent in pieces.
        let code = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        let chunks = futures_util::stream::iter(
            (0..50).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 4000]))),
        );
        return (code, Body::from_stream(chunks)).into_response();
    }
    if let Some((name, code)) = path
        .strip_prefix("/fixture/")
        .and_then(|r| r.split_once('/'))
    {
        // A fixture of tests/fixtures/responses with this status.
        let file = format!(
            "{}/tests/fixtures/responses/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let code = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        return (
            code,
            [("content-type", "application/json")],
            std::fs::read(file).unwrap_or_default(),
        )
            .into_response();
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let code = code.parse().unwrap_or(500);
        return (
            StatusCode::from_u16(code).unwrap(),
            Json(json!({"status": code})),
        )
            .into_response();
    }
    Json(json!({"ok": true, "path": path_and_query, "bytes": body.len()})).into_response()
}

/// What the real APIs answer, in the shapes the official SDKs parse: OpenAI chat
/// completions (JSON or SSE ending in `[DONE]`) and Gemini generateContent (JSON or SSE).
pub fn sdk_answer(path: &str, body: &[u8]) -> Option<Response> {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let sse = |events: Vec<Value>, done: bool| {
        let mut text: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
        if done {
            text.push_str("data: [DONE]\n\n");
        }
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from(text))
            .unwrap()
    };
    if path.ends_with("/chat/completions") && request.get("messages").is_some() {
        let chunk = |content: Value, finish: Value| {
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "qwen3-coder-plus",
                   "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]})
        };
        if request["stream"] == true {
            return Some(sse(
                vec![
                    chunk(json!("Hello, "), Value::Null),
                    chunk(json!("streamed."), json!("stop")),
                ],
                true,
            ));
        }
        return Some(
            Json(json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "qwen3-coder-plus",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fake upstream."}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
            }))
            .into_response(),
        );
    }
    let candidate = |text: &str| {
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}],
               "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 4, "totalTokenCount": 5}})
    };
    if path.ends_with(":streamGenerateContent") {
        return Some(sse(
            vec![candidate("Hello, "), candidate("streamed Gemini.")],
            false,
        ));
    }
    if path.ends_with(":generateContent") && request.get("contents").is_some() {
        return Some(Json(candidate("Hello from the fake Gemini.")).into_response());
    }
    None
}

fn async_stream(
    n: usize,
    gap: Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(0, move |i| async move {
        if i == n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        let event = format!("data: {{\"event\":{i}}}\n\n");
        Some((Ok(Bytes::from(event)), i + 1))
    })
}

/// A credential file for a test, written with mode 0644 (as users often leave them).
pub fn write_cred(dir: &Path, name: &str, value: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A running tokenrelay in front of the fakes.
pub struct TestApp {
    pub app: Option<App>,
    pub proxy: String,
    pub admin: String,
    pub tokens: FakeTokenEndpoint,
    pub upstream: FakeUpstream,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

pub struct Spawn {
    flavor: Flavor,
    extra_toml: String,
    provider_toml: String,
    files: Vec<(String, Value)>,
    token_url: Option<String>,
    refresh_tokens: Vec<String>,
    access_tokens: Vec<String>,
    fault: Option<TokenFault>,
}

/// Starts the fakes and tokenrelay with one provider named after the flavor
/// (`qwen` or `gemini`) whose credentials are the files added with `.cred()`.
pub fn spawn_app(flavor: Flavor) -> Spawn {
    Spawn {
        flavor,
        extra_toml: String::new(),
        provider_toml: String::new(),
        files: Vec::new(),
        token_url: None,
        refresh_tokens: Vec::new(),
        access_tokens: Vec::new(),
        fault: None,
    }
}

impl Spawn {
    pub fn cred(mut self, name: &str, value: Value) -> Self {
        self.files.push((name.to_string(), value));
        self
    }
    /// Extra TOML appended at top level (e.g. a `[refresh]` table).
    pub fn toml(mut self, t: &str) -> Self {
        self.extra_toml.push_str(t);
        self.extra_toml.push('\n');
        self
    }
    /// Extra keys inside the provider's table.
    pub fn provider_keys(mut self, t: &str) -> Self {
        self.provider_toml.push_str(t);
        self.provider_toml.push('\n');
        self
    }
    /// A refresh token the fake token endpoint accepts.
    pub fn refresh_token(mut self, rt: &str) -> Self {
        self.refresh_tokens.push(rt.to_string());
        self
    }
    /// An access token the fake upstream accepts.
    pub fn access_token(mut self, at: &str) -> Self {
        self.access_tokens.push(at.to_string());
        self
    }
    /// How the token endpoint misbehaves from the start (tokenrelay refreshes in the
    /// background as soon as it starts).
    pub fn token_fault(mut self, f: TokenFault) -> Self {
        self.fault = Some(f);
        self
    }
    pub fn token_url(mut self, url: &str) -> Self {
        self.token_url = Some(url.to_string());
        self
    }

    pub async fn start(self) -> TestApp {
        init_logs();
        let valid = ValidTokens::default();
        let tokens = FakeTokenEndpoint::start(self.flavor, valid.clone()).await;
        let upstream = FakeUpstream::start(self.flavor, valid.clone()).await;
        for rt in &self.refresh_tokens {
            tokens.allow_refresh_token(rt);
        }
        for at in &self.access_tokens {
            valid.add(at);
        }
        tokens.set_fault(self.fault.clone());
        tokens.allow_client(QWEN_CLIENT);
        tokens.allow_client(GOOGLE_CLIENT);
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        for (name, v) in &self.files {
            write_cred(&creds, name, v);
        }
        let name = match self.flavor {
            Flavor::Google => "gemini",
            Flavor::Qwen => "qwen",
        };
        let token_url = self.token_url.clone().unwrap_or_else(|| tokens.url.clone());
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{extra}\n[providers.{name}]\nupstream = \"{up}\"\ntoken_url = \"{token_url}\"\ncredentials = [\"{creds}\"]\n{pk}",
            extra = self.extra_toml,
            up = upstream.url,
            creds = creds.display(),
            pk = self.provider_toml,
        );
        let mut t = TestApp {
            app: None,
            proxy: String::new(),
            admin: String::new(),
            tokens,
            upstream,
            dir,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        };
        t.launch(&toml).await;
        t
    }
}

impl TestApp {
    pub fn config(toml: &str) -> Config {
        let env = |k: &str| (k == "HOME").then(|| "/nonexistent-home".to_string());
        let mut config = Config::from_toml(toml, "test.toml", &env).expect("test config is valid");
        if !toml.contains("[usage]") {
            // Tests share a working directory: usage stays in memory unless a test says where.
            config.usage.path = None;
        }
        config
    }

    /// A TestApp whose fakes run but that tokenrelay does not use yet: the test launches
    /// tokenrelay with its own configuration (`launch`).
    pub async fn empty() -> TestApp {
        init_logs();
        let valid = ValidTokens::default();
        TestApp {
            app: None,
            proxy: String::new(),
            admin: String::new(),
            tokens: FakeTokenEndpoint::start(Flavor::Google, valid.clone()).await,
            upstream: FakeUpstream::start(Flavor::Google, valid).await,
            dir: tempfile::tempdir().unwrap(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        }
    }

    pub async fn launch(&mut self, toml: &str) {
        let app = App::start(Self::config(toml))
            .await
            .expect("tokenrelay starts");
        self.proxy = format!("http://{}", app.proxy_addr);
        self.admin = format!("http://{}", app.admin_addr);
        self.app = Some(app);
    }

    pub fn cred_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("creds").join(name)
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.proxy))
            .json(&body)
            .send()
            .await
            .expect("request reaches tokenrelay")
    }

    pub async fn admin_json(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.admin))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn credential(&self, id: &str) -> Value {
        let (_, v) = self.admin_json("/admin/credentials").await;
        v["credentials"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// The running app's credential `provider/id`, for looking at its state directly.
    pub fn credential_handle(
        &self,
        provider: &str,
        id: &str,
    ) -> std::sync::Arc<tokenrelay::lifecycle::Credential> {
        let app = self.app.as_ref().expect("the app is running");
        app.pool
            .provider(provider)
            .and_then(|p| p.find(id))
            .expect("such a credential")
    }

    /// POSTs to the admin listener; the status and the JSON answer.
    pub async fn admin_post(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.admin))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Asserts that a scrape of `/metrics` contains `series` (a whole line, value included).
    pub async fn assert_metric(&self, series: &str) {
        let m = self.metrics().await;
        assert!(m.contains(series), "missing {series}\n{m}");
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

pub const QWEN_CLIENT: &str = "f0304373b74a44d2b584a3fb70ca9e56";
pub const GOOGLE_CLIENT: &str = "000000000000-example.apps.googleusercontent.com";

/// A CLI-shape (Qwen Code) credential whose token is valid for an hour.
pub fn qwen_cred(access: &str, refresh: &str) -> Value {
    json!({
        "access_token": access, "token_type": "Bearer", "refresh_token": refresh,
        "resource_url": Value::Null, "expiry_date": now_ms() + 3_600_000
    })
}

/// A CLI-shape credential whose token expired a minute ago, with a field tokenrelay
/// does not know.
pub fn expired_qwen(refresh: &str) -> Value {
    json!({
        "access_token": "stale-token", "token_type": "Bearer", "refresh_token": refresh,
        "expiry_date": now_ms() - 60_000, "custom_field": {"kept": true}
    })
}

/// A store that reads its file but whose every save fails: read-only (`writable` false, a
/// Kubernetes mount as root sees it too) or broken (`writable` true: a full disk).
pub struct Unsavable {
    pub inner: tokenrelay::store::FileStore,
    pub claims_writable: bool,
}

impl tokenrelay::store::Shares for Unsavable {}

impl tokenrelay::store::CredentialStore for Unsavable {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn load(
        &self,
    ) -> Result<tokenrelay::store::shape::CredentialFile, tokenrelay::store::StoreError> {
        self.inner.load()
    }
    fn save(
        &self,
        _: &tokenrelay::store::shape::TokenUpdate,
    ) -> Result<bool, tokenrelay::store::StoreError> {
        let kind = if self.claims_writable {
            std::io::ErrorKind::StorageFull
        } else {
            std::io::ErrorKind::ReadOnlyFilesystem
        };
        Err(tokenrelay::store::StoreError::Io {
            path: self.location(),
            op: "write back",
            source: std::io::Error::from(kind),
        })
    }
    fn writable(&self) -> bool {
        self.claims_writable
    }
}

/// A credential built by hand around `Unsavable` for the file at `path`, refreshing
/// against this app's fakes; `extra_toml` may add e.g. alert webhooks.
pub fn unsavable_credential(
    t: &TestApp,
    path: &Path,
    id: &str,
    claims_writable: bool,
    extra_toml: &str,
) -> (
    Arc<tokenrelay::lifecycle::Credential>,
    Arc<tokenrelay::telemetry::metrics::Metrics>,
) {
    use tokenrelay::store::CredentialStore;
    let config = TestApp::config(&format!(
        "[providers.qwen]\nupstream = \"{}\"\ntoken_url = \"{}\"\ncredentials = []\n{extra_toml}",
        t.upstream.url, t.tokens.url
    ));
    let metrics = Arc::new(tokenrelay::telemetry::metrics::Metrics::new().unwrap());
    let refresher = Arc::new(tokenrelay::lifecycle::Refresher {
        alerter: tokenrelay::telemetry::alert::Alerter::start(
            &config.alerts,
            reqwest::Client::new(),
        ),
        ..tokenrelay::lifecycle::Refresher::new(
            reqwest::Client::new(),
            config.refresh.clone(),
            Arc::clone(&metrics),
        )
    });
    let store: Arc<dyn CredentialStore> = Arc::new(Unsavable {
        inner: tokenrelay::store::FileStore::new(path.to_path_buf()),
        claims_writable,
    });
    let file = store.load().unwrap();
    let provider = Arc::new(config.providers[0].clone());
    let cred =
        tokenrelay::lifecycle::Credential::from_store(provider, id.into(), store, file, refresher)
            .unwrap();
    (Arc::new(cred), metrics)
}

/// The gcloud ADC fixture behind the Gemini preset, its refresh token accepted.
pub async fn adc_app() -> TestApp {
    let adc: Value = serde_json::from_str(include_str!(
        "fixtures/credentials/adc_authorized_user.json"
    ))
    .unwrap();
    spawn_app(Flavor::Google)
        .cred("adc.json", adc)
        .refresh_token("1//0example-refresh-token")
        .start()
        .await
}

/// GET a URL and parse its JSON body.
pub async fn get_json(http: &reqwest::Client, url: impl reqwest::IntoUrl) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// Polls `check` every 25 ms until it holds, failing the test after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
