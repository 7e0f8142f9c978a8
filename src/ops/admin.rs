//! The admin listener: `/healthz`, `/readyz`, `/metrics` (open, for probes and scrapes)
//! and `/admin/*` (status and control; behind `server.admin_token` when set).
//!
//! Answers describe credentials by provider, id, path, state and times: never a token.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{header, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::json;

use super::console;
use crate::clock;
use crate::common::constant_time_eq;
use crate::lifecycle::pool::{looked_at, Pool, ProviderPool};
use crate::lifecycle::Credential;
use crate::proxy::browser::{self, BrowserGuard, Verdict};
use crate::proxy::error::{ProxyError, Reason};
use crate::telemetry::metrics::Metrics;

pub struct AdminState {
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    pub admin_token: Option<SecretString>,
    /// Host and Origin rules (`proxy::browser`), before routing.
    pub browser: BrowserGuard,
    /// The operator page and its logins (`console`), routed here.
    pub console: Arc<console::Console>,
    /// Fleet mode: the Redis connection, for `/readyz`.
    pub fleet: Option<Arc<crate::store::redis::Fleet>>,
    /// `POST /admin/reload`: the clients and every credential.
    pub reloader: Arc<super::reload::Reloader>,
    /// Usage history (`/admin/usage`).
    pub ledger: Arc<crate::usage::ledger::Ledger>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    let admin = Router::new()
        .route("/admin/credentials", get(credentials))
        .route("/admin/refresh", post(refresh_all))
        .route("/admin/reload", post(reload))
        .route("/admin/usage", get(super::usage::usage))
        .route(
            "/admin/credentials/{provider}/{id}/refresh",
            post(refresh_one),
        )
        .merge(console::api(Arc::clone(&state.console)))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(console::pages(Arc::clone(&state.console)))
        .merge(admin)
        .fallback(|| async {
            ProxyError::new(
                Reason::NotFound,
                "no such admin endpoint; see /healthz, /readyz, /metrics, /admin/credentials",
            )
        })
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            browser_guard,
        ))
        .with_state(state)
}

/// The browser rules of `proxy::browser`, for every admin route.
async fn browser_guard(State(s): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    match s.browser.check(req.method(), req.uri(), req.headers()) {
        Verdict::Answer(refused) => refused,
        Verdict::Pass(cors) => {
            let admin_api = req.uri().path().starts_with("/admin/");
            let mut resp = next.run(req).await;
            if admin_api {
                resp.headers_mut().insert(
                    header::CACHE_CONTROL,
                    http::HeaderValue::from_static("no-store"),
                );
            }
            if let Some(origin) = cors {
                browser::allow_origin(&mut resp, origin);
            }
            resp
        }
    }
}

async fn require_token(State(s): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    if let Some(expected) = &s.admin_token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), expected.expose_secret().as_bytes()) {
            return ProxyError::new(
                Reason::Unauthorized,
                "send `Authorization: Bearer <server.admin_token>`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

#[derive(Serialize)]
struct CredentialView {
    provider: String,
    id: String,
    path: Option<String>,
    kind: &'static str,
    state: &'static str,
    usable: bool,
    expires_at: Option<String>,
    expires_in_seconds: Option<i64>,
    last_refresh_at: Option<String>,
    last_error: Option<String>,
    consecutive_failures: u32,
    writable: bool,
    /// Every cool-down: `model` (null: the whole credential), `until`, `seconds` left,
    /// `reason` (per_minute, per_day, no_access, retry_after), `scope` (credential,
    /// project) and `probe` (`waiting` for the first request after it ended, `running`).
    cooldowns: Vec<serde_json::Value>,
    /// The per-model ones, as earlier versions listed them.
    model_cooldowns: Vec<serde_json::Value>,
    /// The Google Cloud project whose quota it spends, when known.
    project: Option<String>,
    /// What replaces this credential when it is dead: the same text as `tokenrelay status`.
    hint: String,
    /// Who it signs in as, where the file says.
    account: Option<String>,
    /// `tokenrelay login` flow this credential supports (`gemini`, `qwen`), if any.
    login: Option<&'static str>,
    /// Fleet mode: the record's version, which replica wrote it last and when.
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<serde_json::Value>,
}

fn view(c: &Credential) -> CredentialView {
    let snap = c.snapshot();
    let now = clock::now_ms();
    CredentialView {
        provider: c.provider.name.clone(),
        id: c.id.clone(),
        path: c.location(),
        kind: c.kind,
        state: snap.state.as_str(),
        usable: snap.usable,
        expires_at: snap.expires_at_ms.map(clock::rfc3339),
        expires_in_seconds: snap.expires_at_ms.map(|t| (t - now).div_euclid(1000)),
        last_refresh_at: snap.last_refresh_at_ms.map(clock::rfc3339),
        last_error: snap.last_error,
        consecutive_failures: snap.consecutive_failures,
        writable: c.writable(),
        cooldowns: snap
            .cooldowns
            .iter()
            .map(|c| {
                json!({
                    "model": c.model,
                    "until": clock::rfc3339(c.until_ms),
                    "until_ms": c.until_ms,
                    "seconds": c.left.as_secs_f64().ceil() as u64,
                    "reason": c.reason.as_str(),
                    "scope": c.scope.as_str(),
                    "probe": match (c.left.is_zero(), c.probing) {
                        (false, _) => serde_json::Value::Null,
                        (true, false) => json!("waiting"),
                        (true, true) => json!("running"),
                    },
                })
            })
            .collect(),
        model_cooldowns: snap
            .cooldowns
            .iter()
            .filter(|c| !c.left.is_zero())
            .filter_map(|c| {
                let m = c.model.as_ref()?;
                Some(json!({"model": m, "seconds": c.left.as_secs_f64().ceil() as u64, "reason": c.reason.as_str(), "scope": c.scope.as_str()}))
            })
            .collect(),
        project: c.project().map(|p| p.to_string()),
        account: c.current().account.clone(),
        login: console::login_kind(c),
        store: c.store_view(),
        hint: c
            .provider
            .hint_for(c.kind)
            .replace("PROVIDER/ID", &format!("{}/{}", c.provider.name, c.id)),
    }
}

async fn credentials(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    // Fleet mode asks Redis for each record: off the runtime's threads.
    let pool = Arc::clone(&s.pool);
    let list: Vec<_> =
        tokio::task::spawn_blocking(move || pool.all_credentials().map(|c| view(&c)).collect())
            .await
            .unwrap_or_default();
    Json(
        json!({ "server_time": clock::rfc3339(clock::now_ms()), "server_time_ms": clock::now_ms(), "credentials": list }),
    )
}

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    let now = clock::now_ms();
    for p in &s.pool.providers {
        let snaps: Vec<_> = p
            .credentials()
            .iter()
            .map(|c| (c.id.clone(), c.snapshot()))
            .collect();
        for (id, snap) in &snaps {
            s.metrics.observe_credential(&p.config.name, id, snap);
        }
        s.metrics
            .observe_cooldowns(&p.config.name, snaps.iter().map(|(_, snap)| snap));
        s.metrics
            .observe_limits(&p.config.name, &p.limits.usage(now));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// Ready when every provider with credentials has a usable one, and at least one
/// provider has credentials at all.
async fn readyz(State(s): State<Arc<AdminState>>) -> Response {
    let mut ready = true;
    let mut any = false;
    let providers: Vec<_> = s
        .pool
        .providers
        .iter()
        .map(|p| {
            let (report, has, ok) = provider_readiness(p);
            any |= has;
            ready &= !has || ok;
            report
        })
        .collect();
    let ready = ready && any;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Fleet mode: Redis being down does not stop serving (tokens are in memory), but it
    // stops rotating credentials from refreshing: say so.
    let mut store = match &s.fleet {
        None => json!({"kind": "file", "up": true}),
        Some(f) if f.is_up() => json!({"kind": "redis", "up": true, "replica": f.replica}),
        Some(f) => json!({"kind": "redis", "up": false, "replica": f.replica,
            "message": "Redis is unreachable: rotating credentials do not refresh (they serve until expiry), cool-downs are local; nothing is lost when it is back"}),
    };
    // Fleet mode: whether credential records are sealed, and with which key.
    if let Some(f) = &s.fleet {
        store["sealed"] = json!(f.sealed_with().is_some());
        if let Some(id) = f.sealed_with() {
            store["key_id"] = json!(id);
        } else {
            store["sealing"] = json!("records are not sealed: set store.encryption_key");
        }
    }
    // Declared and client limits in fleet mode: counted fleet-wide only while their
    // connection is up.
    if let Some(f) = &s.fleet {
        store["limits_shared"] = json!(f.counts().connected());
    }
    // Where usage and client budgets are kept: "sqlite", "memory" or "redis".
    store["usage"] = json!(s.ledger.kind());
    (
        status,
        Json(json!({ "ready": ready, "providers": providers, "store": store })),
    )
        .into_response()
}

fn provider_readiness(p: &ProviderPool) -> (serde_json::Value, bool, bool) {
    let creds = p.credentials();
    let usable = creds.iter().filter(|c| c.is_usable()).count();
    let message = if creds.is_empty() {
        let looked: Vec<String> = looked_at(&p.config)
            .iter()
            .map(|p| format!("{} (missing)", p.display()))
            .collect();
        format!(
            "no credentials{}; to add one, {}",
            if looked.is_empty() {
                String::new()
            } else {
                format!(" (looked at {})", looked.join(", "))
            },
            p.config.reauth_hint()
        )
    } else if usable == 0 {
        let why: Vec<String> = creds
            .iter()
            .map(|c| {
                let snap = c.snapshot();
                match snap.last_error {
                    Some(e) => format!("{}: {} ({e})", c.id, snap.state.as_str()),
                    None => format!("{}: {}", c.id, snap.state.as_str()),
                }
            })
            .collect();
        format!("no usable credential: {}", why.join("; "))
    } else {
        format!("{usable} of {} credentials usable", creds.len())
    };
    let report = json!({
        "provider": p.config.name,
        "credentials": creds.len(),
        "usable": usable,
        "message": message,
    });
    (report, !creds.is_empty(), usable > 0)
}

#[derive(Serialize)]
struct RefreshOutcome {
    provider: String,
    id: String,
    ok: bool,
    state: &'static str,
    expires_at: Option<String>,
    error: Option<String>,
}

async fn refresh_credential(c: Arc<Credential>) -> RefreshOutcome {
    // For an API key this only brings a refused key back into rotation.
    let result = c.force_refresh().await;
    let snap = c.snapshot();
    RefreshOutcome {
        provider: c.provider.name.clone(),
        id: c.id.clone(),
        ok: result.is_ok(),
        state: snap.state.as_str(),
        expires_at: snap.expires_at_ms.map(clock::rfc3339),
        error: result.err().map(|e| e.to_string()),
    }
}

async fn reload(State(s): State<Arc<AdminState>>) -> Response {
    let report = s.reloader.reload().await;
    let status = if report.errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (status, Json(report)).into_response()
}

async fn refresh_all(State(s): State<Arc<AdminState>>) -> Response {
    let tasks: Vec<_> = s
        .pool
        .all_credentials()
        .filter(|c| !c.is_api_key())
        .map(refresh_credential)
        .collect();
    let results = futures_util::future::join_all(tasks).await;
    let ok = results.iter().all(|r| r.ok);
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    (status, Json(json!({ "ok": ok, "results": results }))).into_response()
}

async fn refresh_one(
    State(s): State<Arc<AdminState>>,
    Path((provider, id)): Path<(String, String)>,
) -> Response {
    let Some(c) = s.pool.provider(&provider).and_then(|p| p.find(&id)) else {
        return ProxyError::new(
            Reason::NotFound,
            format!("no credential {provider}/{id}; GET /admin/credentials lists them"),
        )
        .into_response();
    };
    let outcome = refresh_credential(c).await;
    let status = if outcome.ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    (status, Json(outcome)).into_response()
}
