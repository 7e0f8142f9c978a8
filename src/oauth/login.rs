//! Re-authentication: the OAuth 2.0 installed-app flow (RFC 8252) with PKCE (RFC 7636,
//! S256) against the user's own Google "Desktop app" client, and the device authorization
//! flow (RFC 8628) with PKCE as Qwen Code runs it. The engine has no terminal I/O: the CLI
//! (`ops/cli.rs`) and the operator page drive the same steps.
//!
//! Invariants: `state` and the PKCE verifier are 32 random bytes (base64url); the verifier
//! never leaves the process except to the token endpoint; `state` is compared in constant
//! time and used once; tokens are never logged or printed. What a flow yields is a
//! credential document in the shape tokenrelay reads (`authorized_user`, or Qwen Code's).

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use url::Url;

use crate::providers::google::{CLOUD_PLATFORM_SCOPE, FOREIGN_CLIENTS, RETRIEVER_SCOPE};

/// Why a login did not end with a credential. `exit_code` is the CLI's: 2 when the user
/// declined or ran out of time, 1 otherwise.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("the sign-in was declined ({0}); run the command again and allow access")]
    Denied(String),
    #[error("no answer within {0:?}; run the command again (add --timeout for more time)")]
    TimedOut(Duration),
    #[error("the redirect's state does not match this login: it belongs to another attempt or was forged. Start again")]
    StateMismatch,
    #[error("the redirect carries no authorization code: {0}")]
    NoCode(String),
    #[error("{0}")]
    Client(String),
    #[error("the token endpoint refused the code: {0}")]
    Exchange(String),
    #[error("no refresh token in the answer: consent was not forced (prompt=consent) or the client is not a Desktop app client. Remove tokenrelay's access at https://myaccount.google.com/permissions and sign in again")]
    NoRefreshToken,
    #[error("the cloud-platform scope was not granted (it was unticked on the consent page); sign in again and keep it ticked")]
    ScopeMissing,
    #[error("this credential belongs to {existing}, but the sign-in was {signed_in}; sign in with {existing} or pass --force to replace it")]
    WrongAccount { existing: String, signed_in: String },
    #[error("the device code expired before it was approved; start again")]
    Expired,
    #[error("Qwen's OAuth endpoint answered {0} instead of JSON: Qwen closed its free OAuth tier on 2026-04-15. Use DashScope API keys with the `dashscope` preset ([providers.dashscope] api_keys = [\"env:DASHSCOPE_API_KEY\"])")]
    QwenClosed(String),
    #[error("{0}")]
    Network(String),
}

impl LoginError {
    pub fn exit_code(&self) -> i32 {
        match self {
            LoginError::Denied(_) | LoginError::TimedOut(_) | LoginError::Expired => 2,
            _ => 1,
        }
    }
}

/// 32 random bytes, base64url without padding.
pub fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// The S256 challenge of a PKCE verifier.
pub fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// A user's own OAuth client.
#[derive(Clone)]
pub struct Client {
    pub id: String,
    pub secret: Option<SecretString>,
}

impl Client {
    /// Refuses clients that belong to other programs, naming the command that fits.
    pub fn check_own(&self) -> Result<(), LoginError> {
        if let Some((_, owner)) = FOREIGN_CLIENTS.iter().find(|(id, _)| *id == self.id) {
            return Err(LoginError::Client(format!(
                "client {} belongs to {owner}; tokenrelay uses only your own OAuth client. Make a Desktop app client (Google Cloud console → APIs & Services → Credentials) and pass --client-secret, or sign in with gcloud itself: gcloud auth application-default login --client-id-file=client_secret.json --scopes={CLOUD_PLATFORM_SCOPE},{RETRIEVER_SCOPE}",
                self.id
            )));
        }
        Ok(())
    }

    /// Reads a Google `client_secret.json`: only the `installed` (Desktop app) kind.
    pub fn from_secret_file(text: &str, path: &str) -> Result<Client, LoginError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| LoginError::Client(format!("{path}: not JSON: {e}")))?;
        if v.get("web").is_some() {
            return Err(LoginError::Client(format!(
                "{path} is a \"web\" client: its redirect URIs must be registered and cannot be a loopback port chosen at run time. Make a \"Desktop app\" client instead"
            )));
        }
        let c = v.get("installed").ok_or_else(|| {
            LoginError::Client(format!(
                "{path}: no \"installed\" client (download the JSON of a Desktop app client)"
            ))
        })?;
        let id = c["client_id"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| LoginError::Client(format!("{path}: installed.client_id is missing")))?;
        let client = Client {
            id: id.to_string(),
            secret: c["client_secret"]
                .as_str()
                .map(|s| SecretString::from(s.to_string())),
        };
        client.check_own()?;
        Ok(client)
    }
}

/// A loopback login in progress.
pub struct Loopback {
    pub client: Client,
    pub token_url: Url,
    pub redirect_uri: String,
    pub scopes: Vec<String>,
    state: String,
    verifier: SecretString,
    authorization_url: Url,
}

/// What a successful sign-in yields.
pub struct Granted {
    pub refresh_token: SecretString,
    pub access_token: SecretString,
    pub expires_in: u64,
    pub scopes: Vec<String>,
    pub email: Option<String>,
    /// Qwen's `resource_url`.
    pub resource_url: Option<String>,
}

impl Loopback {
    /// A new login whose redirect is `redirect_uri` (`http://127.0.0.1:{port}/…`).
    pub fn new(
        client: Client,
        authorize_url: &Url,
        token_url: Url,
        redirect_uri: String,
        scopes: Vec<String>,
        login_hint: Option<&str>,
    ) -> Loopback {
        let state = random_token();
        let verifier = random_token();
        let mut url = authorize_url.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", &client.id)
                .append_pair("redirect_uri", &redirect_uri)
                .append_pair("response_type", "code")
                .append_pair("scope", &scopes.join(" "))
                .append_pair("state", &state)
                .append_pair("code_challenge", &challenge(&verifier))
                .append_pair("code_challenge_method", "S256")
                .append_pair("access_type", "offline")
                .append_pair("prompt", "consent");
            if let Some(hint) = login_hint {
                q.append_pair("login_hint", hint);
            }
        }
        Loopback {
            client,
            token_url,
            redirect_uri,
            scopes,
            state,
            verifier: SecretString::from(verifier),
            authorization_url: url,
        }
    }

    /// Where the user signs in.
    pub fn authorization_url(&self) -> &Url {
        &self.authorization_url
    }

    /// Whether a redirect's `state` is this login's (constant time).
    pub fn owns_state(&self, state: &str) -> bool {
        crate::common::constant_time_eq(state.as_bytes(), self.state.as_bytes())
    }

    /// Takes the redirect's query (from the loopback callback or a pasted URL), checks it,
    /// and exchanges the code.
    pub async fn complete(
        &self,
        http: &reqwest::Client,
        query: &str,
    ) -> Result<Granted, LoginError> {
        let params: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if !self.owns_state(get("state").unwrap_or("")) {
            return Err(LoginError::StateMismatch);
        }
        if let Some(error) = get("error") {
            return Err(LoginError::Denied(error.to_string()));
        }
        let code =
            get("code").ok_or_else(|| LoginError::NoCode(query.chars().take(80).collect()))?;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &self.redirect_uri),
            ("client_id", &self.client.id),
            ("code_verifier", self.verifier.expose_secret()),
        ];
        if let Some(s) = &self.client.secret {
            form.push(("client_secret", s.expose_secret()));
        }
        let answer = post_form(http, &self.token_url, &form).await?;
        let granted = granted(&answer)?;
        let wants_cloud = self.scopes.iter().any(|s| s == CLOUD_PLATFORM_SCOPE);
        if wants_cloud
            && !granted.scopes.is_empty()
            && !granted.scopes.iter().any(|s| s == CLOUD_PLATFORM_SCOPE)
        {
            return Err(LoginError::ScopeMissing);
        }
        Ok(granted)
    }
}

/// Extracts a query from what a user pasted: the full redirect URL from the browser's
/// address bar, or just its query.
pub fn pasted_query(line: &str) -> Option<String> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let query = match Url::parse(line) {
        Ok(u) => u.query().unwrap_or("").to_string(),
        Err(_) => line.trim_start_matches('?').to_string(),
    };
    (query.contains("state=")).then_some(query)
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<Value>,
    scope: Option<String>,
    id_token: Option<String>,
    resource_url: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

async fn post_form(
    http: &reqwest::Client,
    url: &Url,
    form: &[(&str, &str)],
) -> Result<(u16, Vec<u8>), LoginError> {
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let resp = http
        .post(url.clone())
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(http::header::ACCEPT, "application/json")
        .timeout(Duration::from_secs(30))
        .body(body)
        .send()
        .await
        .map_err(|e| {
            LoginError::Network(format!(
                "{url} unreachable: {}",
                crate::common::error_chain(&e)
            ))
        })?;
    let status = resp.status().as_u16();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| LoginError::Network(format!("{url}: {}", crate::common::error_chain(&e))))?;
    Ok((status, bytes.to_vec()))
}

fn granted((status, body): &(u16, Vec<u8>)) -> Result<Granted, LoginError> {
    let a: TokenAnswer = serde_json::from_slice(body)
        .map_err(|_| LoginError::Exchange(format!("HTTP {status}, not a JSON token answer")))?;
    if let Some(e) = a.error {
        let d = a
            .error_description
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        return Err(LoginError::Exchange(format!("HTTP {status} {e}{d}")));
    }
    let access = a
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| LoginError::Exchange(format!("HTTP {status} without an access_token")))?;
    let refresh = a
        .refresh_token
        .filter(|t| !t.is_empty())
        .ok_or(LoginError::NoRefreshToken)?;
    let expires_in = match a.expires_in {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(3600),
        Some(Value::String(s)) => s.parse().unwrap_or(3600),
        _ => 3600,
    };
    Ok(Granted {
        refresh_token: SecretString::from(refresh),
        access_token: SecretString::from(access),
        expires_in,
        scopes: a
            .scope
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default(),
        email: a.id_token.as_deref().and_then(id_token_email),
        resource_url: a.resource_url,
    })
}

/// The `email` claim of an ID token's payload. The token came straight from the token
/// endpoint over TLS, so its signature is not needed to read who signed in.
fn id_token_email(jwt: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v["email"].as_str().map(str::to_string)
}

/// The `authorized_user` document of a Google sign-in (gcloud's ADC shape), keeping the
/// quota project of the file it replaces (or `project`).
pub fn authorized_user(
    client: &Client,
    g: &Granted,
    previous: Option<&Map<String, Value>>,
    project: Option<&str>,
) -> Map<String, Value> {
    let mut doc = Map::new();
    doc.insert("type".into(), json!("authorized_user"));
    doc.insert("client_id".into(), json!(client.id));
    if let Some(s) = &client.secret {
        doc.insert("client_secret".into(), json!(s.expose_secret()));
    }
    doc.insert(
        "refresh_token".into(),
        json!(g.refresh_token.expose_secret()),
    );
    if let Some(e) = &g.email {
        doc.insert("account".into(), json!(e));
    }
    doc.insert("universe_domain".into(), json!("googleapis.com"));
    let quota = project.map(str::to_string).or_else(|| {
        previous
            .and_then(|p| p.get("quota_project_id"))
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    if let Some(q) = quota {
        doc.insert("quota_project_id".into(), json!(q));
    }
    doc
}

/// Refuses to replace a credential of another account unless forced.
pub fn check_account(
    previous: Option<&Map<String, Value>>,
    g: &Granted,
    force: bool,
) -> Result<(), LoginError> {
    let existing = previous
        .and_then(|p| p.get("account"))
        .and_then(Value::as_str);
    match (existing, &g.email) {
        (Some(e), Some(s)) if !force && !e.eq_ignore_ascii_case(s) => {
            Err(LoginError::WrongAccount {
                existing: e.to_string(),
                signed_in: s.to_string(),
            })
        }
        _ => Ok(()),
    }
}

/// A device authorization in progress (Qwen Code's flow).
pub struct Device {
    pub user_code: String,
    pub verification_uri: String,
    /// The link with the code filled in, when the server gives one.
    pub verification_uri_complete: Option<String>,
    device_code: SecretString,
    verifier: SecretString,
    interval: Duration,
    pub expires_in: Duration,
    client_id: String,
    token_url: Url,
}

#[derive(Deserialize)]
struct DeviceAnswer {
    device_code: String,
    user_code: String,
    verification_uri: String,
    verification_uri_complete: Option<String>,
    expires_in: Option<u64>,
    interval: Option<u64>,
}

/// Starts a device authorization at `device_url`.
pub async fn device_start(
    http: &reqwest::Client,
    device_url: &Url,
    token_url: Url,
    client_id: &str,
    scope: &str,
) -> Result<Device, LoginError> {
    let verifier = random_token();
    let form = [
        ("client_id", client_id),
        ("scope", scope),
        ("code_challenge", &challenge(&verifier)),
        ("code_challenge_method", "S256"),
    ];
    let (status, body) = post_form(http, device_url, &form).await?;
    let a: DeviceAnswer = serde_json::from_slice(&body).map_err(|_| not_json(status, &body))?;
    Ok(Device {
        user_code: a.user_code,
        verification_uri: a.verification_uri,
        verification_uri_complete: a.verification_uri_complete,
        device_code: SecretString::from(a.device_code),
        verifier: SecretString::from(verifier),
        interval: Duration::from_secs(a.interval.unwrap_or(2).max(1)),
        expires_in: Duration::from_secs(a.expires_in.unwrap_or(600)),
        client_id: client_id.to_string(),
        token_url,
    })
}

fn not_json(status: u16, body: &[u8]) -> LoginError {
    let looks_html = body.iter().take(200).any(|b| *b == b'<');
    if looks_html {
        LoginError::QwenClosed(format!("HTTP {status} with an HTML page"))
    } else {
        LoginError::QwenClosed(format!("HTTP {status} with a body that is not JSON"))
    }
}

impl Device {
    /// Polls until the user approved, declined, or the code expired. `slow_down` (Qwen
    /// answers it with HTTP 429) stretches the interval ×1.5 up to 10 s.
    pub async fn poll(&self, http: &reqwest::Client) -> Result<Granted, LoginError> {
        let deadline = tokio::time::Instant::now() + self.expires_in;
        let mut interval = self.interval;
        loop {
            tokio::time::sleep(interval).await;
            if tokio::time::Instant::now() >= deadline {
                return Err(LoginError::Expired);
            }
            let form = [
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("client_id", self.client_id.as_str()),
                ("device_code", self.device_code.expose_secret()),
                ("code_verifier", self.verifier.expose_secret()),
            ];
            let (status, body) = post_form(http, &self.token_url, &form).await?;
            let answer: TokenAnswer =
                serde_json::from_slice(&body).map_err(|_| not_json(status, &body))?;
            match answer.error.as_deref() {
                None => return granted(&(status, body)),
                Some("authorization_pending") => {}
                Some("slow_down") => {
                    interval = interval.mul_f64(1.5).min(Duration::from_secs(10));
                }
                Some("expired_token") => return Err(LoginError::Expired),
                Some("access_denied") => return Err(LoginError::Denied("access_denied".into())),
                Some(other) => {
                    return Err(LoginError::Exchange(format!("HTTP {status} {other}")));
                }
            }
        }
    }
}

/// The Qwen Code document of a device sign-in (`expiry_date` in ms, `resource_url`).
pub fn qwen_document(g: &Granted, now_ms: i64) -> Map<String, Value> {
    let mut doc = Map::new();
    doc.insert("access_token".into(), json!(g.access_token.expose_secret()));
    doc.insert(
        "refresh_token".into(),
        json!(g.refresh_token.expose_secret()),
    );
    doc.insert("token_type".into(), json!("Bearer"));
    if let Some(r) = &g.resource_url {
        doc.insert("resource_url".into(), json!(r));
    }
    doc.insert(
        "expiry_date".into(),
        json!(now_ms + g.expires_in as i64 * 1000),
    );
    doc
}

/// The small page the browser gets on the loopback callback: no token, no caching.
pub fn callback_page(ok: bool, message: &str) -> String {
    let title = if ok { "Signed in" } else { "Sign-in failed" };
    let escaped: String = message
        .chars()
        .map(|c| match c {
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '&' => "&amp;".into(),
            '"' => "&quot;".into(),
            c => c.to_string(),
        })
        .collect();
    format!("<!doctype html><meta charset=utf-8><title>tokenrelay: {title}</title><h1>{title}</h1><p>{escaped}</p><p>You can close this tab.</p>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_is_s256_of_the_verifier() {
        // RFC 7636 appendix B.
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let a = random_token();
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
        assert_ne!(a, random_token());
    }

    #[test]
    fn the_authorization_url_asks_for_offline_access_with_consent() {
        let l = Loopback::new(
            Client {
                id: "mine.apps.googleusercontent.com".into(),
                secret: None,
            },
            &Url::parse(crate::providers::google::AUTHORIZE_URL).unwrap(),
            Url::parse("https://oauth2.googleapis.com/token").unwrap(),
            "http://127.0.0.1:5555/oauth2callback".into(),
            vec!["openid".into(), CLOUD_PLATFORM_SCOPE.into()],
            Some("me@example.com"),
        );
        let q: std::collections::HashMap<_, _> =
            l.authorization_url().query_pairs().into_owned().collect();
        assert_eq!(q["access_type"], "offline");
        assert_eq!(q["prompt"], "consent");
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["redirect_uri"], "http://127.0.0.1:5555/oauth2callback");
        assert_eq!(q["login_hint"], "me@example.com");
        assert!(l.owns_state(&q["state"]));
        assert!(!l.owns_state("forged"));
        assert!(!l
            .authorization_url()
            .as_str()
            .contains(l.verifier.expose_secret()));
    }

    #[test]
    fn web_and_foreign_clients_are_refused() {
        let web = r#"{"web":{"client_id":"x","client_secret":"y"}}"#;
        assert!(
            matches!(Client::from_secret_file(web, "c.json"), Err(LoginError::Client(m)) if m.contains("Desktop app"))
        );
        let gcloud = r#"{"installed":{"client_id":"764086051850-6qr4p6gpi6hn506pt8ejuq83di341hur.apps.googleusercontent.com","client_secret":"s"}}"#;
        assert!(
            matches!(Client::from_secret_file(gcloud, "c.json"), Err(LoginError::Client(m)) if m.contains("gcloud auth application-default login"))
        );
        let mine = r#"{"installed":{"client_id":"mine","client_secret":"s"}}"#;
        assert_eq!(Client::from_secret_file(mine, "c.json").unwrap().id, "mine");
    }

    #[test]
    fn a_pasted_redirect_url_yields_its_query() {
        assert_eq!(
            pasted_query("  http://127.0.0.1:1/oauth2callback?state=s&code=c \n").as_deref(),
            Some("state=s&code=c")
        );
        assert_eq!(
            pasted_query("?code=c&state=s").as_deref(),
            Some("code=c&state=s")
        );
        assert_eq!(pasted_query("hello"), None);
    }
}
