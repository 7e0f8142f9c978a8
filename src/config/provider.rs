//! `[providers.NAME]`: a `ProviderConfig` built from the provider's preset (`providers/`)
//! and what the file overrides; its credential entries (file, directory, glob) and how
//! they expand; static API keys and key files.

use std::path::{Path, PathBuf};

use http::HeaderName;
use secrecy::SecretString;
use url::Url;

use super::raw::{RawApiKey, RawCredentialEntry, RawProvider};
use super::values::expand_tilde;
use super::{ConfigError, Validator};
use crate::providers::{self, dashscope, google, qwen, vertex, KeyHeader, ProviderKind};
use crate::quota::limits::{Declared, Limit};

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub upstream: Url,
    /// The OAuth token endpoint; `None` for a provider of API keys only (`dashscope`).
    pub token_url: Option<Url>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub scopes: Vec<String>,
    pub credentials: Vec<CredentialEntry>,
    pub api_keys: Vec<ApiKey>,
    /// One key per line, reloaded like credential files.
    pub api_keys_file: Option<PathBuf>,
    /// How this provider's static keys go upstream.
    pub key_header: KeyHeader,
    /// An upstream with `{location}` (Vertex AI): the host is chosen per request from the
    /// path's location, among `locations`.
    pub upstream_template: Option<String>,
    pub locations: Vec<String>,
    /// Host → address overrides for upstream connections (like curl's `--resolve`).
    pub resolve: Vec<(String, std::net::IpAddr)>,
    /// `tokenrelay login`: the authorization endpoint (loopback flow), the device-code
    /// endpoint (device flow), and the scopes a sign-in asks for.
    pub authorize_url: Option<Url>,
    pub device_url: Option<Url>,
    pub login_scopes: Vec<String>,
    /// Declared limits (`[providers.NAME.limits]`), counted before requests go upstream.
    pub limits: crate::quota::limits::Declared,
}

/// One configured static key and its id (configured, else a hash of the key).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: Option<String>,
    pub key: SecretString,
    /// The Google Cloud project whose quota the key spends (`project = "…"`).
    pub project: Option<String>,
}

impl ProviderConfig {
    /// What gets this provider a fresh credential (the provider's own hint).
    pub fn reauth_hint(&self) -> String {
        self.kind.reauth_hint(self.token_url.as_ref())
    }

    /// What replaces one credential of this provider, by its kind (`api_key`,
    /// `service_account`, `authorized_user`, …).
    pub fn hint_for(&self, credential_kind: &str) -> String {
        self.kind.hint_for(credential_kind, self.token_url.as_ref())
    }

    /// Whether its refresh tokens may rotate (see `ProviderKind::rotates_refresh_tokens`).
    pub fn rotates_refresh_tokens(&self) -> bool {
        self.kind.rotates_refresh_tokens()
    }

    /// The upstream base for a credential with this `resource_url` (or none).
    pub fn base_url(&self, resource_url: Option<&str>) -> Result<Url, String> {
        providers::base_url(&self.upstream, &self.name, resource_url)
    }
}

/// One `credentials` entry: a file, a directory (its `*.json` files) or a glob.
#[derive(Debug, Clone)]
pub struct CredentialEntry {
    /// As written, for messages.
    pub spec: String,
    /// `~` expanded.
    pub pattern: PathBuf,
    pub id: Option<String>,
    /// A missing file is fine (the presets' default locations, `optional = true`).
    pub optional: bool,
    /// The config key or environment variable it came from.
    pub origin: String,
}

/// A credential file found by expanding the entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialPath {
    pub path: PathBuf,
    pub id: Option<String>,
}

impl CredentialEntry {
    /// Expands the entry into files. A required literal file that does not exist is an
    /// error; a glob or directory may match nothing.
    pub fn resolve(&self) -> Result<Vec<CredentialPath>, String> {
        let spec = self.pattern.to_string_lossy();
        if spec.contains(['*', '?', '[']) {
            let paths = glob::glob(&spec).map_err(|e| format!("bad glob {:?}: {e}", self.spec))?;
            let mut out: Vec<_> = paths
                .filter_map(Result::ok)
                .filter(|p| p.is_file() && !is_hidden(p))
                .map(|path| CredentialPath { path, id: None })
                .collect();
            out.sort_by(|a, b| a.path.cmp(&b.path));
            return Ok(out);
        }
        if self.pattern.is_dir() {
            let entries = std::fs::read_dir(&self.pattern)
                .map_err(|e| format!("cannot list directory {:?}: {e}", self.spec))?;
            let mut out: Vec<_> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().is_some_and(|x| x == "json") && p.is_file() && !is_hidden(p)
                })
                .map(|path| CredentialPath { path, id: None })
                .collect();
            out.sort_by(|a, b| a.path.cmp(&b.path));
            return Ok(out);
        }
        if self.pattern.is_file() {
            return Ok(vec![CredentialPath {
                path: self.pattern.clone(),
                id: self.id.clone(),
            }]);
        }
        if self.optional {
            return Ok(Vec::new());
        }
        Err(format!(
            "credential file {:?} does not exist (create it, fix the path, or mark the entry `{{ path = \"...\", optional = true }}`)",
            self.spec
        ))
    }
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

impl Validator<'_> {
    pub(super) fn provider(
        &self,
        name: &str,
        raw: RawProvider,
    ) -> Result<ProviderConfig, ConfigError> {
        let key = |k: &str| format!("providers.{name}.{k}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(self.err(
                format!("providers.{name}"),
                "provider names may use only letters, digits, '-' and '_' (they are the first path segment)",
            ));
        }
        let preset = providers::preset(name);
        let (kind, upstream, token_url, client_id, default_creds, env_var) = (
            preset.kind,
            preset.upstream,
            preset.token_url,
            preset.client_id,
            preset.default_credentials,
            preset.env_credentials,
        );
        let region_upstream = match (kind, raw.region.as_deref()) {
            (ProviderKind::Dashscope, region) => {
                let region = region.unwrap_or(dashscope::DEFAULT_REGION);
                match dashscope::upstream_for(region) {
                    Some(u) => Some(u),
                    None => {
                        let known: Vec<&str> = dashscope::REGIONS.iter().map(|(r, _)| *r).collect();
                        return Err(self.err(
                            key("region"),
                            format!(
                                "unknown region {region:?}; one of {} (keys are per region), or set upstream",
                                known.join(", ")
                            ),
                        ));
                    }
                }
            }
            (_, Some(_)) => {
                return Err(self.err(key("region"), "only the dashscope preset has regions"))
            }
            (_, None) => None,
        };
        let raw_upstream = raw.upstream.as_deref().or(upstream).or(region_upstream);
        let upstream_template = raw_upstream
            .filter(|u| u.contains(vertex::PLACEHOLDER))
            .map(str::to_string);
        let upstream = match raw_upstream {
            Some(u) if u.contains(vertex::PLACEHOLDER) => {
                self.url(&key("upstream"), &vertex::base_for(u, "global"))?
            }
            Some(u) => self.url(&key("upstream"), u)?,
            None => {
                return Err(self.err(
                    key("upstream"),
                    "required for a custom provider (e.g. \"https://api.example.com\")",
                ))
            }
        };
        let token_url = match raw.token_url.as_deref().or(token_url) {
            Some(u) => Some(self.url(&key("token_url"), u)?),
            None => None,
        };
        let key_header = match raw.api_key_header.as_deref() {
            None => kind.key_header(None),
            Some(h) if kind == ProviderKind::Custom => {
                let name = HeaderName::from_bytes(h.trim().as_bytes()).map_err(|_| {
                    self.err(key("api_key_header"), format!("{h:?} is not a header name"))
                })?;
                kind.key_header(Some(&name))
            }
            Some(_) => {
                return Err(self.err(
                    key("api_key_header"),
                    "only a custom provider chooses its key header (the presets know theirs)",
                ))
            }
        };
        let client_id = raw
            .client_id
            .filter(|c| !c.is_empty())
            .or(client_id.map(String::from));
        let client_secret = match raw.client_secret.as_deref() {
            None | Some("") => None,
            Some(s) => Some(self.secret(&key("client_secret"), s)?),
        };
        let mut credentials = Vec::new();
        match raw.credentials {
            Some(entries) => {
                for (i, e) in entries.into_iter().enumerate() {
                    let origin = format!("providers.{name}.credentials[{i}]");
                    let (spec, id, optional) = match e {
                        RawCredentialEntry::Path(p) => (p, None, false),
                        RawCredentialEntry::Table(t) => (t.path, t.id, t.optional),
                    };
                    if let Some(id) = &id {
                        validate_id(id).map_err(|p| self.err(format!("{origin}.id"), p))?;
                    }
                    credentials.push(self.entry(spec, id, optional, origin)?);
                }
            }
            None => {
                // The preset's well-known location; skipped when there is no HOME.
                if let Some(Ok(e)) =
                    default_creds.map(|d| self.entry(d.to_string(), None, true, key("credentials")))
                {
                    credentials.push(e);
                }
            }
        }
        if let Some(var) = env_var {
            if let Some(v) = (self.env)(var) {
                for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    credentials.push(self.entry(p.to_string(), None, false, var.to_string())?);
                }
            }
        }
        for c in &credentials {
            c.resolve().map_err(|p| self.err(c.origin.clone(), p))?;
        }
        let mut api_keys = Vec::new();
        for (i, k) in raw.api_keys.into_iter().enumerate() {
            let at = key(&format!("api_keys[{i}]"));
            let (spec, id, project) = match k {
                RawApiKey::Key(spec) => (spec, None, None),
                RawApiKey::Table(t) => (t.key, t.id, t.project),
            };
            if let Some(id) = &id {
                validate_id(id).map_err(|p| self.err(format!("{at}.id"), p))?;
            }
            if let Some(p) = &project {
                validate_id(p).map_err(|e| self.err(format!("{at}.project"), e))?;
            }
            api_keys.push(ApiKey {
                id,
                key: self.secret(&at, &spec)?,
                project,
            });
        }
        let api_keys_file = match raw.api_keys_file.as_deref() {
            None | Some("") => None,
            Some(spec) => {
                let path =
                    expand_tilde(spec, self.env).map_err(|p| self.err(key("api_keys_file"), p))?;
                read_key_file(&path).map_err(|p| self.err(key("api_keys_file"), p))?;
                Some(path)
            }
        };
        let locations: Vec<String> = match raw.locations.clone() {
            Some(l) => l,
            None => vertex::DEFAULT_LOCATIONS
                .iter()
                .map(|l| l.to_string())
                .collect(),
        };
        for (i, l) in locations.iter().enumerate() {
            if l.is_empty()
                || !l
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(self.err(
                    format!("providers.{name}.locations[{i}]"),
                    format!("{l:?} is not a location (e.g. \"us-central1\", \"global\")"),
                ));
            }
        }
        if upstream_template.is_none() && raw.locations.is_some() {
            return Err(self.err(
                key("locations"),
                "only an upstream with {location} (the vertex preset) chooses a location",
            ));
        }
        let mut resolve = Vec::new();
        for (host, addr) in raw.resolve {
            let ip = addr.parse().map_err(|_| {
                self.err(
                    format!("providers.{name}.resolve.{host}"),
                    format!("{addr:?} is not an IP address"),
                )
            })?;
            resolve.push((host.to_ascii_lowercase(), ip));
        }
        let authorize_url = match raw.authorize_url.as_deref().or(match kind {
            ProviderKind::Gemini | ProviderKind::Vertex => Some(google::AUTHORIZE_URL),
            _ => None,
        }) {
            Some(u) => Some(self.url(&key("authorize_url"), u)?),
            None => None,
        };
        let device_url = match raw.device_url.as_deref().or(match kind {
            ProviderKind::Qwen => Some(qwen::DEVICE_URL),
            _ => None,
        }) {
            Some(u) => Some(self.url(&key("device_url"), u)?),
            None => None,
        };
        let login_scopes = raw.login_scopes.unwrap_or_else(|| {
            let mut s = match kind {
                ProviderKind::Qwen => vec![qwen::SCOPE.to_string()],
                _ => vec![
                    "openid".to_string(),
                    google::USERINFO_EMAIL_SCOPE.to_string(),
                    google::CLOUD_PLATFORM_SCOPE.to_string(),
                ],
            };
            if kind == ProviderKind::Gemini {
                s.push(google::RETRIEVER_SCOPE.to_string());
            }
            s
        });
        if token_url.is_none()
            && (!credentials.is_empty()
                || kind == ProviderKind::Custom && api_keys.is_empty() && api_keys_file.is_none())
        {
            return Err(self.err(
                key("token_url"),
                "required for a provider with credential files (the OAuth token endpoint)",
            ));
        }
        let scopes = raw
            .scopes
            .unwrap_or_else(|| vec![google::CLOUD_PLATFORM_SCOPE.to_string()]);
        let mut limits = Declared::default();
        for (model, l) in raw.limits {
            let at = key(&format!("limits.{model:?}"));
            let limit = Limit {
                rpm: l.rpm,
                rpd: l.rpd,
                tpm: l.tpm,
            };
            if limit == Limit::default() || [l.rpm, l.rpd, l.tpm].contains(&Some(0)) {
                return Err(self.err(
                    at,
                    "give one or more of rpm, rpd, tpm, each above 0 (e.g. { rpm = 10, rpd = 250 })",
                ));
            }
            if model == "*" {
                limits.any = Some(limit);
            } else if model.is_empty() || model.len() > 128 || model.contains(['{', '}']) {
                return Err(self.err(at, "a model name (as requests name it) or \"*\""));
            } else {
                limits.by_model.insert(model, limit);
            }
        }
        Ok(ProviderConfig {
            name: name.to_string(),
            kind,
            upstream,
            token_url,
            client_id,
            client_secret,
            scopes,
            credentials,
            api_keys,
            api_keys_file,
            key_header,
            upstream_template,
            locations,
            resolve,
            authorize_url,
            device_url,
            login_scopes,
            limits,
        })
    }

    fn entry(
        &self,
        spec: String,
        id: Option<String>,
        optional: bool,
        origin: String,
    ) -> Result<CredentialEntry, ConfigError> {
        if spec.trim().is_empty() {
            return Err(self.err(origin, "empty path"));
        }
        let pattern = expand_tilde(&spec, self.env).map_err(|p| self.err(origin.clone(), p))?;
        Ok(CredentialEntry {
            spec,
            pattern,
            id,
            optional,
            origin,
        })
    }
}

/// The keys of an `api_keys_file`: one per line, blank lines and `#` comments ignored.
/// Errors name the line, never its content.
pub fn read_key_file(path: &Path) -> Result<Vec<SecretString>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{} line {}: a key may not contain spaces (one key per line)",
                path.display(),
                i + 1
            ));
        }
        keys.push(SecretString::from(line.to_string()));
    }
    Ok(keys)
}

/// Credential ids appear in URLs, metrics and logs.
pub fn validate_id(id: &str) -> Result<(), String> {
    if !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(())
    } else {
        Err(format!(
            "{id:?} is not a valid id: use 1-128 letters, digits, '-', '_' or '.'"
        ))
    }
}
