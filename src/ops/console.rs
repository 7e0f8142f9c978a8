//! The operator console: `GET /ui` (static HTML, CSS and vanilla JS compiled into the
//! binary; no CDN, no build step) over the same JSON API the CLI uses, `GET /ui/usage`
//! (tokens over 24 hours and 30 days, drawn as inline SVG from `/admin/usage`), and the
//! login endpoints that drive `oauth::login` from a browser.
//!
//! Security on top of `proxy::browser`: every asset carries a strict CSP (no inline
//! script), `nosniff`, `no-referrer` and `no-store`; the page renders only through
//! `textContent`; the admin token lives in `sessionStorage` and goes as a bearer header,
//! never in a URL or cookie. The browser callback (`/ui/oauth/google/callback`) cannot carry
//! a bearer token: it is gated by the login's single-use, short-lived, unguessable `state`.
//! Login endpoints are off when the admin listener is exposed without a token.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::clock;
use crate::lifecycle::pool::Pool;
use crate::lifecycle::Credential;
use crate::oauth::login::{self, Client, Loopback};
use crate::proxy::error::{ProxyError, Reason};
use crate::store::FileStore;

/// What the console's handlers share: the pool, the logins in progress, and how to reach
/// the operator's browser and the token endpoints.
pub struct Console {
    pub pool: Arc<Pool>,
    /// Logins started from the page.
    pub logins: Logins,
    /// Off when the listener is reachable from other hosts without an admin token.
    pub logins_enabled: bool,
    pub http: reqwest::Client,
    pub state_dir: Option<PathBuf>,
    pub admin_port: u16,
}

/// The page, its assets and Google's redirect back: open routes (the redirect cannot carry
/// a bearer token; the login's `state` gates it).
pub fn pages<S: Clone + Send + Sync + 'static>(console: Arc<Console>) -> Router<S> {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/app.js", get(app_js))
        .route("/ui/app.css", get(app_css))
        .route("/ui/usage", get(usage_page))
        .route("/ui/usage.js", get(usage_js))
        .route("/ui/oauth/google/callback", get(callback))
        .with_state(console)
}

/// The login endpoints under `/admin/`; the admin router puts them behind the admin token.
pub fn api<S: Clone + Send + Sync + 'static>(console: Arc<Console>) -> Router<S> {
    Router::new()
        .route("/admin/credentials/{provider}/{id}/login", post(start))
        .route("/admin/login/{session}", get(status))
        .route("/admin/login/{session}/callback", post(pasted))
        .with_state(console)
}

const INDEX: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");
const USAGE: &str = include_str!("ui/usage.html");
const USAGE_JS: &str = include_str!("ui/usage.js");

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// How long a login may wait for the operator.
const LOGIN_TTL: Duration = Duration::from_secs(600);

/// The headers every console answer carries.
pub fn secure(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    secure(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

async fn usage_page() -> Response {
    asset("text/html; charset=utf-8", USAGE)
}

async fn usage_js() -> Response {
    asset("text/javascript; charset=utf-8", USAGE_JS)
}

/// Which login a credential supports, if any.
pub fn login_kind(c: &Credential) -> Option<&'static str> {
    c.location()?;
    match c.kind {
        "service_account" => None,
        _ if c.provider.authorize_url.is_some() => Some("gemini"),
        _ if c.provider.device_url.is_some() => Some("qwen"),
        _ => None,
    }
}

enum Phase {
    Loopback(Arc<Loopback>),
    Device,
    Done(String),
    Failed(String),
}

struct Session {
    provider: String,
    credential: String,
    phase: Phase,
    until: Instant,
}

/// Logins started from the page, by session id.
#[derive(Default)]
pub struct Logins {
    sessions: Mutex<HashMap<String, Session>>,
}

impl Logins {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, id: &str, phase: Phase) {
        if let Some(s) = self.lock().get_mut(id) {
            s.phase = phase;
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let reason = match status {
        StatusCode::NOT_FOUND => Reason::NotFound,
        StatusCode::FORBIDDEN => Reason::ForbiddenOrigin,
        _ => Reason::BadRequest,
    };
    let mut resp = ProxyError::new(reason, message).into_response();
    *resp.status_mut() = status;
    resp
}

/// The credential, its file, and its state copy.
fn target(
    s: &Console,
    provider: &str,
    id: &str,
) -> Option<(Arc<Credential>, PathBuf, Option<PathBuf>)> {
    let cred = s.pool.provider(provider)?.find(id)?;
    let path = PathBuf::from(cred.location()?);
    let state = s
        .state_dir
        .as_ref()
        .map(|d| d.join(provider).join(format!("{id}.json")));
    Some((cred, path, state))
}

fn store(path: PathBuf, state: Option<PathBuf>) -> FileStore {
    let s = FileStore::new(path);
    match state {
        Some(st) => s.with_state(st),
        None => s,
    }
}

/// `POST /admin/login/{provider}/{id}`: starts a login; answers the session and what the
/// operator does next (a consent URL, or a device code).
async fn start(
    State(s): State<Arc<Console>>,
    Path((provider, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !s.logins_enabled {
        return error(StatusCode::FORBIDDEN, "logins are off: the admin listener is reachable from other hosts without server.admin_token");
    }
    let Some((cred, path, state)) = target(&s, &provider, &id) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no credential {provider}/{id}"),
        );
    };
    let Some(kind) = login_kind(&cred) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{provider}/{id} has no login; {}",
                cred.provider.hint_for(cred.kind)
            ),
        );
    };
    {
        let now = Instant::now();
        let mut sessions = s.logins.lock();
        sessions.retain(|_, v| v.until > now);
        if sessions.values().any(|v| {
            v.provider == provider
                && v.credential == id
                && matches!(v.phase, Phase::Loopback(_) | Phase::Device)
        }) {
            return error(
                StatusCode::CONFLICT,
                format!("a login for {provider}/{id} is already waiting; finish or let it expire"),
            );
        }
    }
    let session = login::random_token();
    let doc = {
        let st = store(path.clone(), state.clone());
        tokio::task::spawn_blocking(move || st.document())
            .await
            .ok()
            .flatten()
    };
    let config = Arc::clone(&cred.provider);
    match kind {
        "gemini" => {
            let client = match doc
                .as_ref()
                .and_then(|d| d.get("client_id").and_then(Value::as_str).map(|id| (id, d)))
            {
                Some((cid, d)) => Client {
                    id: cid.to_string(),
                    secret: d.get("client_secret").and_then(Value::as_str).map(|x| secrecy::SecretString::from(x.to_string())),
                },
                None => match &config.client_id {
                    Some(cid) => Client { id: cid.clone(), secret: config.client_secret.clone() },
                    None => return error(StatusCode::BAD_REQUEST, "the file has no OAuth client and the provider has no client_id: run `tokenrelay login gemini --client-secret client_secret.json` on the command line"),
                },
            };
            if let Err(e) = client.check_own() {
                return error(StatusCode::BAD_REQUEST, e.to_string());
            }
            let (Some(authorize), Some(token_url)) = (&config.authorize_url, &config.token_url)
            else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "the provider has no authorize_url or token_url",
                );
            };
            // Google redirects back to this listener, as the operator's browser reaches it.
            let origin = headers
                .get(header::ORIGIN)
                .and_then(|v| v.to_str().ok())
                .filter(|o| {
                    o.starts_with("http://127.0.0.1:")
                        || o.starts_with("http://localhost:")
                        || o.starts_with("http://[::1]:")
                })
                .map(|o| o.replace("http://localhost:", "http://127.0.0.1:"))
                .unwrap_or_else(|| format!("http://127.0.0.1:{}", s.admin_port));
            let hint = doc
                .as_ref()
                .and_then(|d| d.get("account"))
                .and_then(Value::as_str);
            let flow = Arc::new(Loopback::new(
                client,
                authorize,
                token_url.clone(),
                format!("{origin}/ui/oauth/google/callback"),
                config.login_scopes.clone(),
                hint,
            ));
            let url = flow.authorization_url().to_string();
            s.logins.lock().insert(
                session.clone(),
                Session {
                    provider,
                    credential: id,
                    phase: Phase::Loopback(flow),
                    until: Instant::now() + LOGIN_TTL,
                },
            );
            secure(
                Json(json!({"session": session, "kind": "loopback", "authorization_url": url}))
                    .into_response(),
            )
        }
        _ => {
            let (Some(device_url), Some(token_url)) = (&config.device_url, &config.token_url)
            else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "the provider has no device_url or token_url",
                );
            };
            let client_id = config
                .client_id
                .clone()
                .unwrap_or_else(|| crate::providers::qwen::CLIENT_ID.to_string());
            let device = match login::device_start(
                &s.http,
                device_url,
                token_url.clone(),
                &client_id,
                &config.login_scopes.join(" "),
            )
            .await
            {
                Ok(d) => d,
                Err(e) => return error(StatusCode::BAD_GATEWAY, e.to_string()),
            };
            let answer = json!({"session": session, "kind": "device", "user_code": device.user_code,
                "verification_uri": device.verification_uri, "verification_uri_complete": device.verification_uri_complete});
            s.logins.lock().insert(
                session.clone(),
                Session {
                    provider: provider.clone(),
                    credential: id.clone(),
                    phase: Phase::Device,
                    until: Instant::now() + device.expires_in,
                },
            );
            let st = Arc::clone(&s);
            tokio::spawn(async move {
                let outcome = device.poll(&st.http).await;
                let phase = match outcome {
                    Ok(g) => {
                        finish(
                            &st,
                            &provider,
                            &id,
                            login::qwen_document(&g, clock::now_ms()),
                        )
                        .await
                    }
                    Err(e) => Phase::Failed(e.to_string()),
                };
                st.logins.set(&session, phase);
            });
            secure(Json(answer).into_response())
        }
    }
}

/// Writes a signed-in document through the store and reloads the pool.
async fn finish(
    s: &Console,
    provider: &str,
    id: &str,
    doc: serde_json::Map<String, Value>,
) -> Phase {
    let Some((_, path, state)) = target(s, provider, id) else {
        return Phase::Failed(format!("{provider}/{id} left the pool"));
    };
    let st = store(path, state);
    match tokio::task::spawn_blocking(move || st.replace(&doc, Duration::from_secs(30))).await {
        Ok(Ok(written)) => {
            s.pool.reload().await;
            tracing::info!(target: "tokenrelay::credentials", provider, credential = id, path = %written.display(), "signed in from the console");
            Phase::Done(format!("signed in; wrote {}", written.display()))
        }
        Ok(Err(e)) => Phase::Failed(e.to_string()),
        Err(e) => Phase::Failed(e.to_string()),
    }
}

/// Completes a loopback login from the redirect's query (callback or pasted).
async fn complete(s: &Console, query: &str) -> Result<String, (StatusCode, String)> {
    let state = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    // Single use: the session leaves the pending set before anything else happens.
    let (session_id, provider, id, flow) = {
        let now = Instant::now();
        let mut sessions = s.logins.lock();
        let found = sessions.iter_mut().find_map(|(sid, v)| match &v.phase {
            Phase::Loopback(f) if v.until > now && f.owns_state(&state) => Some((
                sid.clone(),
                v.provider.clone(),
                v.credential.clone(),
                Arc::clone(f),
            )),
            _ => None,
        });
        let Some(found) = found else {
            return Err((
                StatusCode::BAD_REQUEST,
                "unknown, used or expired sign-in state: start the login again from the console"
                    .into(),
            ));
        };
        if let Some(v) = sessions.get_mut(&found.0) {
            v.phase = Phase::Failed("in progress".into());
        }
        found
    };
    let result = match flow.complete(&s.http, query).await {
        Ok(g) => {
            let Some((_, path, st)) = target(s, &provider, &id) else {
                return Err((StatusCode::NOT_FOUND, "the credential left the pool".into()));
            };
            let previous = {
                let store = store(path, st);
                tokio::task::spawn_blocking(move || store.document())
                    .await
                    .ok()
                    .flatten()
            };
            match login::check_account(previous.as_ref(), &g, false) {
                Ok(()) => {
                    let doc = login::authorized_user(&flow.client, &g, previous.as_ref(), None);
                    finish(s, &provider, &id, doc).await
                }
                Err(e) => Phase::Failed(e.to_string()),
            }
        }
        Err(e) => Phase::Failed(e.to_string()),
    };
    let outcome = match &result {
        Phase::Done(m) => Ok(m.clone()),
        Phase::Failed(m) => Err((StatusCode::BAD_REQUEST, m.clone())),
        _ => Ok(String::new()),
    };
    s.logins.set(&session_id, result);
    outcome
}

/// `GET /ui/oauth/google/callback`: Google's redirect. No bearer token here; the `state`
/// is the credential.
async fn callback(
    State(s): State<Arc<Console>>,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(q.iter())
        .finish();
    let (status, ok, message) = match complete(&s, &query).await {
        Ok(m) => (StatusCode::OK, true, m),
        Err((status, m)) => (status, false, m),
    };
    let mut resp = Html(login::callback_page(
        ok,
        &format!("{message}. Return to the console; the row updates by itself."),
    ))
    .into_response();
    *resp.status_mut() = status;
    secure(resp)
}

#[derive(Deserialize)]
struct Pasted {
    url: String,
}

/// `POST /admin/login/{session}/callback`: the redirect URL pasted into the page.
async fn pasted(
    State(s): State<Arc<Console>>,
    Path(session): Path<String>,
    Json(p): Json<Pasted>,
) -> Response {
    if !s.logins.lock().contains_key(&session) {
        return error(StatusCode::NOT_FOUND, "no such login session");
    }
    let Some(query) = login::pasted_query(&p.url) else {
        return error(StatusCode::BAD_REQUEST, "paste the whole address from the browser (http://127.0.0.1:…/ui/oauth/google/callback?state=…&code=…)");
    };
    match complete(&s, &query).await {
        Ok(m) => secure(Json(json!({"status": "done", "message": m})).into_response()),
        Err((status, m)) => error(status, m),
    }
}

/// `GET /admin/login/{session}`: pending, done or error.
async fn status(State(s): State<Arc<Console>>, Path(session): Path<String>) -> Response {
    let sessions = s.logins.lock();
    let Some(v) = sessions.get(&session) else {
        return error(StatusCode::NOT_FOUND, "no such login session");
    };
    let (status, message) = match &v.phase {
        Phase::Loopback(_) | Phase::Device => ("pending", String::new()),
        Phase::Done(m) => ("done", m.clone()),
        Phase::Failed(m) => ("error", m.clone()),
    };
    secure(Json(json!({"status": status, "message": message, "provider": v.provider, "id": v.credential})).into_response())
}
