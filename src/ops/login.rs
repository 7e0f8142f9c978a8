//! `tokenrelay login gemini|qwen`: the terminal side of `oauth::login`. Shows the sign-in
//! link (and the `ssh -L` hint), opens a browser only where there is a display and no SSH
//! session, waits for the loopback callback or a pasted redirect URL, writes the credential
//! through the store, and asks a running instance to reload.
//!
//! Exit codes: 0 signed in, 2 declined or timed out, 1 any other error. No token is ever
//! printed.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse, Response};
use axum::Router;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::clock;
use crate::config::{Config, ProviderConfig};
use crate::lifecycle::pool;
use crate::oauth::login::{self, Client, Granted, LoginError, Loopback};
use crate::providers::ProviderKind;
use crate::store::FileStore;

/// What `tokenrelay login` was asked (the CLI's arguments, parsed by clap in `main.rs`).
#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// `gemini` or `qwen`.
    pub flow: String,
    /// The credential to re-authenticate, as PROVIDER/ID.
    pub target: Option<String>,
    /// Write a new credential file here instead.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Your Desktop app client (a Google client_secret.json).
    #[arg(long)]
    pub client_secret: Option<PathBuf>,
    /// Do not try to open a browser.
    #[arg(long)]
    pub no_browser: bool,
    /// The loopback port for the redirect (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// The quota project (`quota_project_id`) to record.
    #[arg(long)]
    pub project: Option<String>,
    /// How long to wait for the sign-in.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Replace a credential of another account.
    #[arg(long)]
    pub force: bool,
    /// The admin listener to ask for a reload (default: server.admin_listen).
    #[arg(long)]
    pub admin: Option<String>,
}

/// Runs the login; prints what it did; returns the exit code.
pub async fn login(config: &Config, args: LoginArgs) -> i32 {
    match run(config, &args).await {
        Ok(msg) => {
            println!("{msg}");
            0
        }
        Err(e) => {
            eprintln!("tokenrelay login: {e}");
            e.exit_code()
        }
    }
}

/// The provider, the file to write, and its state copy.
fn target(
    config: &Config,
    args: &LoginArgs,
) -> Result<(ProviderConfig, PathBuf, Option<PathBuf>), LoginError> {
    let (provider_name, id) = match &args.target {
        Some(t) => match t.split_once('/') {
            Some((p, id)) => (p.to_string(), Some(id.to_string())),
            None => (t.clone(), None),
        },
        None => (args.flow.clone(), None),
    };
    let provider = config
        .providers
        .iter()
        .find(|p| p.name == provider_name)
        .cloned()
        .ok_or_else(|| {
            LoginError::Client(format!(
                "no provider {provider_name:?} in {}",
                config.source
            ))
        })?;
    let fits = match args.flow.as_str() {
        "gemini" => provider.authorize_url.is_some(),
        "qwen" => provider.device_url.is_some(),
        other => {
            return Err(LoginError::Client(format!(
                "unknown login {other:?}: use `tokenrelay login gemini` (Google, loopback) or `tokenrelay login qwen` (device flow)"
            )))
        }
    };
    if !fits {
        return Err(LoginError::Client(format!(
            "providers.{} has no {} for `tokenrelay login {}`",
            provider.name,
            if args.flow == "qwen" {
                "device_url"
            } else {
                "authorize_url"
            },
            args.flow
        )));
    }
    let paths = pool::credential_paths(&provider).map_err(LoginError::Client)?;
    let (id, path) = match (&args.out, id) {
        (Some(out), _) => ("login".to_string(), out.clone()),
        (None, Some(id)) => paths
            .into_iter()
            .find(|(i, _)| *i == id)
            .ok_or_else(|| LoginError::Client(format!("no credential {provider_name}/{id}; `tokenrelay check` lists them, or write a new file with --out PATH")))?,
        (None, None) => match provider.credentials.first() {
            Some(entry) if entry.pattern.extension().is_some_and(|e| e == "json") && !entry.pattern.to_string_lossy().contains('*') => {
                let path = entry.pattern.clone();
                let id = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                (id, path)
            }
            _ => {
                return Err(LoginError::Client(format!(
                    "say which credential to sign in: PROVIDER/ID, or --out PATH (providers.{}.credentials has no single file)",
                    provider.name
                )))
            }
        },
    };
    let state = config
        .refresh
        .state_dir
        .as_ref()
        .map(|d| d.join(&provider.name).join(format!("{id}.json")));
    Ok((provider, path, state))
}

async fn run(config: &Config, args: &LoginArgs) -> Result<String, LoginError> {
    let (provider, path, state) = target(config, args)?;
    let mut store = FileStore::new(path.clone());
    if let Some(s) = state {
        store = store.with_state(s);
    }
    let store = Arc::new(store);
    let previous = if path.exists() {
        store.document()
    } else {
        None
    };
    let http = reqwest::Client::new();
    let doc = match args.flow.as_str() {
        "qwen" => qwen(&provider, &http, args).await?,
        _ => gemini(&provider, &http, args, previous.as_ref()).await?,
    };
    let s = Arc::clone(&store);
    let written = tokio::task::spawn_blocking(move || s.replace(&doc, Duration::from_secs(30)))
        .await
        .map_err(|e| LoginError::Client(e.to_string()))?
        .map_err(|e| LoginError::Client(e.to_string()))?;
    let mut msg = format!("signed in; wrote {} (mode 0600)", written.display());
    match reload(config, args.admin.as_deref()).await {
        Some(true) => msg.push_str("; the running tokenrelay reloaded it"),
        Some(false) => msg.push_str(
            "; the running tokenrelay did not accept the reload (its watcher picks the file up)",
        ),
        None => msg.push_str(
            "; no tokenrelay answered on the admin listener (it loads the file when it starts)",
        ),
    }
    Ok(msg)
}

/// The client: `--client-secret`, else the file's own, else the provider's.
fn client(
    provider: &ProviderConfig,
    args: &LoginArgs,
    previous: Option<&Map<String, Value>>,
) -> Result<Client, LoginError> {
    let c = if let Some(f) = &args.client_secret {
        let text = std::fs::read_to_string(f)
            .map_err(|e| LoginError::Client(format!("{}: {e}", f.display())))?;
        Client::from_secret_file(&text, &f.display().to_string())?
    } else if let Some(id) = previous
        .and_then(|p| p.get("client_id"))
        .and_then(Value::as_str)
    {
        Client {
            id: id.to_string(),
            secret: previous
                .and_then(|p| p.get("client_secret"))
                .and_then(Value::as_str)
                .map(|s| secrecy::SecretString::from(s.to_string())),
        }
    } else if let Some(id) = &provider.client_id {
        Client {
            id: id.clone(),
            secret: provider.client_secret.clone(),
        }
    } else {
        return Err(LoginError::Client(format!(
            "no OAuth client: pass --client-secret client_secret.json of your own Desktop app client (Google Cloud console → APIs & Services → Credentials → Create credentials → OAuth client ID → Desktop app), or set providers.{}.client_id",
            provider.name
        )));
    };
    c.check_own()?;
    Ok(c)
}

async fn gemini(
    provider: &ProviderConfig,
    http: &reqwest::Client,
    args: &LoginArgs,
    previous: Option<&Map<String, Value>>,
) -> Result<Map<String, Value>, LoginError> {
    let client = client(provider, args, previous)?;
    let (Some(authorize), Some(token_url)) = (&provider.authorize_url, &provider.token_url) else {
        return Err(LoginError::Client(format!(
            "providers.{} needs authorize_url and token_url",
            provider.name
        )));
    };
    // Bind first: the redirect URI names the port.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .map_err(|e| {
            LoginError::Client(format!("cannot listen on 127.0.0.1:{}: {e}", args.port))
        })?;
    let port = listener
        .local_addr()
        .map_err(|e| LoginError::Client(e.to_string()))?
        .port();
    let hint = previous
        .and_then(|p| p.get("account"))
        .and_then(Value::as_str);
    let flow = Arc::new(Loopback::new(
        client.clone(),
        authorize,
        token_url.clone(),
        format!("http://127.0.0.1:{port}/oauth2callback"),
        provider.login_scopes.clone(),
        hint,
    ));
    println!(
        "Sign in with your Google account at:\n\n  {}\n",
        flow.authorization_url()
    );
    println!("On a machine without a browser, forward the port first: ssh -L {port}:127.0.0.1:{port} <this host>");
    println!("or open the link anywhere and paste the address your browser ends on (http://127.0.0.1:{port}/oauth2callback?...) here.");
    let _ = std::io::stdout().flush();
    if !args.no_browser {
        open_browser(flow.authorization_url().as_str());
    }
    let (tx, mut rx) = mpsc::channel::<String>(4);
    let server = {
        let tx = tx.clone();
        let flow = Arc::clone(&flow);
        let app = Router::new()
            .route("/oauth2callback", axum::routing::get(callback))
            .fallback(|| async { (http::StatusCode::NOT_FOUND, "not found") })
            .with_state((tx, flow));
        tokio::spawn(async move { axum::serve(listener, app).await })
    };
    // A plain thread, not the runtime's blocking pool: a read of the terminal cannot be
    // cancelled, and the process must not wait for one when the callback came first.
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if let Some(q) = login::pasted_query(&line) {
                if tx.blocking_send(q).is_err() {
                    return;
                }
            }
        }
    });
    let result = tokio::time::timeout(args.timeout, async {
        loop {
            let Some(query) = rx.recv().await else {
                return Err(LoginError::TimedOut(args.timeout));
            };
            match flow.complete(http, &query).await {
                // A stray request (another tab, a replayed link): keep waiting.
                Err(LoginError::NoCode(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .unwrap_or(Err(LoginError::TimedOut(args.timeout)));
    server.abort();
    let granted: Granted = result?;
    login::check_account(previous, &granted, args.force)?;
    Ok(login::authorized_user(
        &client,
        &granted,
        previous,
        args.project.as_deref(),
    ))
}

type CallbackState = (mpsc::Sender<String>, Arc<Loopback>);

/// The loopback redirect: hands the query to the waiting flow, answers a page with no
/// token in it. A redirect with another `state` is answered but ends nothing.
async fn callback(
    State((tx, flow)): State<CallbackState>,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let state = q
        .iter()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let (ok, message) = if !flow.owns_state(state) {
        (
            false,
            "This sign-in link belongs to another attempt. Start again from the terminal.",
        )
    } else if q.iter().any(|(k, _)| k == "error") {
        (
            false,
            "Access was declined. Run tokenrelay login again to retry.",
        )
    } else {
        (
            true,
            "tokenrelay has the authorization; the terminal says what happens next.",
        )
    };
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(q.iter())
        .finish();
    let _ = tx.send(query).await;
    let mut resp = Html(login::callback_page(ok, message)).into_response();
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}

async fn qwen(
    provider: &ProviderConfig,
    http: &reqwest::Client,
    args: &LoginArgs,
) -> Result<Map<String, Value>, LoginError> {
    let (Some(device_url), Some(token_url)) = (&provider.device_url, &provider.token_url) else {
        return Err(LoginError::Client(format!(
            "providers.{} needs device_url and token_url",
            provider.name
        )));
    };
    let client_id = provider
        .client_id
        .clone()
        .unwrap_or_else(|| crate::providers::qwen::CLIENT_ID.to_string());
    let scope = provider.login_scopes.join(" ");
    let run = async {
        loop {
            let device =
                login::device_start(http, device_url, token_url.clone(), &client_id, &scope)
                    .await?;
            let link = device
                .verification_uri_complete
                .clone()
                .unwrap_or_else(|| device.verification_uri.clone());
            println!(
                "Open {link}\nand enter the code {} (valid for {} min).",
                device.user_code,
                device.expires_in.as_secs() / 60
            );
            let _ = std::io::stdout().flush();
            if !args.no_browser {
                open_browser(&link);
            }
            match device.poll(http).await {
                Err(LoginError::Expired) => {
                    println!("The code expired; here is a new one.");
                    continue;
                }
                other => return other,
            }
        }
    };
    let granted = tokio::time::timeout(args.timeout, run)
        .await
        .unwrap_or(Err(LoginError::TimedOut(args.timeout)))?;
    if provider.kind == ProviderKind::Qwen && granted.resource_url.is_none() {
        tracing::debug!(
            "the device flow answered without resource_url; the provider's upstream applies"
        );
    }
    Ok(login::qwen_document(&granted, clock::now_ms()))
}

/// Opens a browser where one can be shown: a display, and not over SSH.
fn open_browser(url: &str) {
    let display =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    let ssh = std::env::var_os("SSH_CONNECTION").is_some() || std::env::var_os("SSH_TTY").is_some();
    if display && !ssh {
        let _ = std::process::Command::new("xdg-open")
            .arg(url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

/// Asks a running instance to reload: `Some(true)` it did, `Some(false)` it answered with
/// an error, `None` nothing answered.
async fn reload(config: &Config, admin: Option<&str>) -> Option<bool> {
    match super::cli::call(config, admin, reqwest::Method::POST, "/admin/reload").await {
        Ok((code, _)) => Some(code == 200),
        Err(_) => None,
    }
}
