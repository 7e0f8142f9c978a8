//! The credential pools, one per provider: loading them from the configuration,
//! reloading them without a restart, and choosing the order in which a request tries them.
//!
//! Selection is lock-free: the credential list is an `ArcSwap` snapshot (a reload replaces
//! it while requests keep the one they took, so in-flight requests finish on removed
//! credentials) and the round-robin cursor is an atomic.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::config::{Config, CredentialPath, ProviderConfig, Strategy};
use crate::lifecycle::{Credential, Refresher};
use crate::quota::limits::Limits;
use crate::store::redis::RedisStore;
use crate::store::{CredentialStore, FileStore};

/// Problems loading credential files, each naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

pub struct ProviderPool {
    pub config: Arc<ProviderConfig>,
    credentials: ArcSwap<Vec<Arc<Credential>>>,
    cursor: AtomicUsize,
    strategy: Strategy,
    /// Sessions bound to one credential (a resumable upload): key → (credential id, until).
    pins: std::sync::Mutex<HashMap<String, (String, tokio::time::Instant)>>,
    /// The request path's metric handles for this provider, resolved on first use (a
    /// label lookup per request costs more than the request's own logic spends elsewhere).
    pub hot: HotMetrics,
    /// The declared limits' counts (`[providers.NAME.limits]`).
    pub limits: Limits,
}

/// Metric handles resolved once: the counter of `200` answers and the duration histogram.
#[derive(Default)]
pub struct HotMetrics {
    pub ok: std::sync::OnceLock<prometheus::IntCounter>,
    /// Answers without usage (`tokenrelay_usage_unknown_total`).
    pub usage_unknown: std::sync::OnceLock<prometheus::IntCounter>,
    pub duration: std::sync::OnceLock<prometheus::Histogram>,
}

/// How long an upload session stays bound to its credential (Google keeps a resumable
/// session for a week; an upload that takes longer than this starts over).
const PIN_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// A bound on pinned sessions; expired ones go first, then the oldest.
const MAX_PINS: usize = 10_000;

impl ProviderPool {
    pub fn credentials(&self) -> Arc<Vec<Arc<Credential>>> {
        self.credentials.load_full()
    }

    /// The credentials in the order this request should try them: round robin starts one
    /// further each request; fill first always starts at the first.
    pub fn order(&self) -> impl Iterator<Item = Arc<Credential>> {
        let list = self.credentials.load_full();
        let n = list.len();
        let start = match self.strategy {
            Strategy::RoundRobin if n > 0 => self.cursor.fetch_add(1, Ordering::Relaxed) % n,
            _ => 0,
        };
        (0..n).map(move |i| Arc::clone(&list[(start + i) % n]))
    }

    /// Binds a session (an upload) to the credential that started it.
    pub fn pin(&self, session: String, credential: &str) {
        let now = tokio::time::Instant::now();
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if pins.len() >= MAX_PINS {
            pins.retain(|_, (_, until)| *until > now);
            if pins.len() >= MAX_PINS {
                if let Some(oldest) = pins
                    .iter()
                    .min_by_key(|(_, (_, u))| *u)
                    .map(|(k, _)| k.clone())
                {
                    pins.remove(&oldest);
                }
            }
        }
        pins.insert(session, (credential.to_string(), now + PIN_TTL));
    }

    /// The credential a session is bound to, while it is in the pool.
    pub fn pinned(&self, session: &str) -> Option<Arc<Credential>> {
        let pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        let (id, until) = pins.get(session)?;
        (*until > tokio::time::Instant::now())
            .then(|| self.find(id))
            .flatten()
    }

    pub fn find(&self, id: &str) -> Option<Arc<Credential>> {
        self.credentials.load().iter().find(|c| c.id == id).cloned()
    }
}

/// What a reload changed.
#[derive(Debug, Default, Serialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub kept: usize,
    pub errors: Vec<String>,
}

pub struct Pool {
    pub providers: Vec<Arc<ProviderPool>>,
    refresher: Arc<Refresher>,
    /// One reload at a time (file watcher, SIGHUP and the admin API may race).
    reloading: tokio::sync::Mutex<()>,
}

impl Pool {
    pub fn provider(&self, name: &str) -> Option<&Arc<ProviderPool>> {
        self.providers.iter().find(|p| p.config.name == name)
    }

    pub fn all_credentials(&self) -> impl Iterator<Item = Arc<Credential>> + '_ {
        self.providers.iter().flat_map(|p| p.credentials().to_vec())
    }

    /// Loads every provider's credentials. At start-up a file that cannot be read or
    /// parsed is an error naming it: a broken credential should be fixed, not ignored.
    pub fn load(config: &Config, refresher: &Arc<Refresher>) -> Result<Pool, LoadError> {
        let mut providers = Vec::new();
        // One counting connection per process, opened only when a limit is declared.
        let shared_counts = refresher
            .fleet
            .as_ref()
            .filter(|_| config.providers.iter().any(|p| !p.limits.is_empty()))
            .map(|f| f.counts());
        for p in &config.providers {
            let provider = Arc::new(p.clone());
            refresher.metrics.init_provider(&provider.name);
            let mut ids = HashSet::new();
            let mut creds = Vec::new();
            for found in resolve(&provider).map_err(LoadError)? {
                let cred =
                    load_credential(&provider, &found, &mut ids, refresher).map_err(LoadError)?;
                creds.push(cred);
            }
            for k in api_keys(&provider).map_err(LoadError)? {
                creds.push(Arc::new(Credential::api_key(
                    Arc::clone(&provider),
                    k.id,
                    &k.key,
                    k.project,
                    Arc::clone(refresher),
                )));
            }
            if creds.is_empty() {
                tracing::warn!(target: "tokenrelay::credentials", provider = %provider.name,
                    looked_at = %looked_at(&provider).iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
                    hint = %provider.reauth_hint(), "provider has no credentials");
            }
            for c in &creds {
                refresher.metrics.init_credential(&provider.name, &c.id);
            }
            let limits = Limits::new(
                &provider.name,
                provider.limits.clone(),
                shared_counts.clone(),
            );
            providers.push(Arc::new(ProviderPool {
                config: provider,
                credentials: ArcSwap::from_pointee(creds),
                cursor: AtomicUsize::new(0),
                strategy: config.pool.strategy,
                pins: std::sync::Mutex::default(),
                hot: HotMetrics::default(),
                limits,
            }));
        }
        Ok(Pool {
            providers,
            refresher: Arc::clone(refresher),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// Starts the background refresh of every credential.
    pub fn start_schedulers(&self) {
        for c in self.all_credentials().filter(|c| !c.is_api_key()) {
            tokio::spawn(Arc::clone(&c).run_scheduler());
        }
    }

    /// Stops every background refresh (shutdown).
    pub fn retire_all(&self) {
        for c in self.all_credentials() {
            c.retire();
        }
    }

    /// Re-expands the credential entries: new files join the pool, removed ones leave it
    /// (requests already using them finish), and every kept one re-reads its file, so a
    /// re-authenticated `needs_reauth` credential comes back. A file that no longer parses
    /// is reported and keeps its credential as it was.
    pub async fn reload(&self) -> ReloadReport {
        let _one = self.reloading.lock().await;
        let mut report = ReloadReport::default();
        for pool in &self.providers {
            let provider = &pool.config;
            let current = pool.credentials();
            let found = match resolve(provider) {
                Ok(f) => f,
                Err(e) => {
                    // A listed file went missing: the others still count.
                    report.errors.push(e.clone());
                    resolve_lenient(provider)
                }
            };
            let mut by_path: HashMap<String, Arc<Credential>> = current
                .iter()
                .filter_map(|c| c.location().map(|l| (l, Arc::clone(c))))
                .collect();
            let mut ids: HashSet<String> = current.iter().map(|c| c.id.clone()).collect();
            let mut next = Vec::new();
            for f in &found {
                match by_path.remove(&f.path.display().to_string()) {
                    Some(c) => {
                        if let Err(problem) = c.reload().await {
                            report
                                .errors
                                .push(format!("{}/{}: {problem}", provider.name, c.id));
                        }
                        next.push(c);
                        report.kept += 1;
                    }
                    None => match load_credential(provider, f, &mut ids, &self.refresher) {
                        Ok(c) => {
                            self.refresher
                                .metrics
                                .init_credential(&provider.name, &c.id);
                            tokio::spawn(Arc::clone(&c).run_scheduler());
                            report.added.push(format!("{}/{}", provider.name, c.id));
                            next.push(c);
                        }
                        Err(e) => {
                            tracing::error!(target: "tokenrelay::credentials", provider = %provider.name, error = %e,
                                "credential not loaded");
                            report.errors.push(e);
                        }
                    },
                }
            }
            // API keys: the configured ones stay; an `api_keys_file` is re-read. A key keeps
            // its credential (and state) while it is listed; new keys join, gone ones leave.
            let mut keys_now: HashMap<String, Arc<Credential>> = current
                .iter()
                .filter(|c| c.is_api_key())
                .map(|c| (c.id.clone(), Arc::clone(c)))
                .collect();
            match api_keys(provider) {
                Ok(keys) => {
                    for FoundKey { id, key, project } in keys {
                        match keys_now.remove(&id) {
                            Some(c) => {
                                next.push(c);
                                report.kept += 1;
                            }
                            None => {
                                let c = Arc::new(Credential::api_key(
                                    Arc::clone(provider),
                                    id,
                                    &key,
                                    project,
                                    Arc::clone(&self.refresher),
                                ));
                                self.refresher
                                    .metrics
                                    .init_credential(&provider.name, &c.id);
                                report.added.push(format!("{}/{}", provider.name, c.id));
                                next.push(c);
                            }
                        }
                    }
                }
                Err(e) => {
                    // An unreadable key file keeps the keys as they were.
                    tracing::error!(target: "tokenrelay::credentials", provider = %provider.name, error = %e,
                        "api keys not reloaded");
                    report.errors.push(e);
                    next.extend(keys_now.drain().map(|(_, c)| c));
                }
            }
            for (id, gone) in keys_now {
                gone.retire();
                self.refresher
                    .metrics
                    .forget_credential(&provider.name, &id);
                tracing::info!(target: "tokenrelay::credentials", provider = %provider.name, credential = %id,
                    "api key left the pool");
                report.removed.push(format!("{}/{}", provider.name, id));
            }
            for (path, gone) in by_path {
                gone.retire();
                self.refresher
                    .metrics
                    .forget_credential(&provider.name, &gone.id);
                tracing::info!(target: "tokenrelay::credentials", provider = %provider.name, credential = %gone.id,
                    path = %path, "credential left the pool");
                report
                    .removed
                    .push(format!("{}/{}", provider.name, gone.id));
            }
            pool.credentials.store(Arc::new(next));
        }
        tracing::info!(target: "tokenrelay::credentials", added = report.added.len(), removed = report.removed.len(),
            kept = report.kept, errors = report.errors.len(), "credentials reloaded");
        report
    }

    /// The directories whose changes should trigger a reload.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self
            .providers
            .iter()
            .flat_map(|p| p.config.credentials.iter())
            .filter_map(|e| watch_dir(&e.pattern))
            .chain(
                self.providers
                    .iter()
                    .filter_map(|p| p.config.api_keys_file.as_deref())
                    .filter_map(watch_dir),
            )
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

/// The directory to watch for an entry: the directory itself, a file's directory, or a
/// glob's longest literal prefix.
fn watch_dir(pattern: &Path) -> Option<PathBuf> {
    if pattern.is_dir() {
        return Some(pattern.to_path_buf());
    }
    let literal: PathBuf = pattern
        .components()
        .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
        .collect();
    let dir = if literal == pattern {
        pattern.parent()?
    } else {
        literal.as_path()
    };
    dir.is_dir().then(|| dir.to_path_buf())
}

/// Every credential file of a provider, duplicates (same file twice) removed.
pub fn resolve(provider: &ProviderConfig) -> Result<Vec<CredentialPath>, String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for entry in &provider.credentials {
        for found in entry
            .resolve()
            .map_err(|p| format!("{}: {p}", entry.origin))?
        {
            let canonical =
                std::fs::canonicalize(&found.path).unwrap_or_else(|_| found.path.clone());
            if seen.insert(canonical) {
                out.push(found);
            }
        }
    }
    Ok(out)
}

/// Like `resolve`, skipping entries that fail.
fn resolve_lenient(provider: &ProviderConfig) -> Vec<CredentialPath> {
    let mut seen = HashSet::new();
    provider
        .credentials
        .iter()
        .filter_map(|e| e.resolve().ok())
        .flatten()
        .filter(|f| seen.insert(std::fs::canonicalize(&f.path).unwrap_or_else(|_| f.path.clone())))
        .collect()
}

fn load_credential(
    provider: &Arc<ProviderConfig>,
    found: &CredentialPath,
    ids: &mut HashSet<String>,
    refresher: &Arc<Refresher>,
) -> Result<Arc<Credential>, String> {
    let mut candidate_ids = ids.clone();
    let id = unique_id(&mut candidate_ids, found.id.clone(), &found.path);
    let store: Arc<dyn CredentialStore> = match &refresher.fleet {
        // Fleet mode: the record in Redis; the file is where the credential enters.
        Some(fleet) => RedisStore::new(
            fleet,
            found.path.clone(),
            &provider.name,
            &id,
            provider.rotates_refresh_tokens(),
        ),
        None => {
            let mut file_store = FileStore::new(found.path.clone());
            if let Some(dir) = &refresher.config.state_dir {
                file_store =
                    file_store.with_state(dir.join(&provider.name).join(format!("{id}.json")));
            }
            Arc::new(file_store)
        }
    };
    let file = store.load().map_err(|e| {
        format!(
            "{e} (a credential of provider {}; fix the file or remove it from the configuration)",
            provider.name
        )
    })?;
    let shape = file.shape;
    warn_if_readable_by_others(&found.path);
    let cred = Credential::from_store(
        Arc::clone(provider),
        id,
        Arc::clone(&store),
        file,
        Arc::clone(refresher),
    )
    .map_err(|p| format!("{}: {p}", found.path.display()))?;
    ids.insert(cred.id.clone());
    let snap = cred.snapshot();
    let writable = store.writable();
    tracing::info!(target: "tokenrelay::credentials", provider = %provider.name, credential = %cred.id,
        path = %found.path.display(), shape = shape.as_str(), writable,
        expires_at = %snap.expires_at_ms.map(crate::clock::rfc3339).unwrap_or_else(|| "unknown".into()),
        "credential loaded");
    if let Some(problem) = &snap.last_error {
        tracing::error!(target: "tokenrelay::credentials", provider = %provider.name, credential = %cred.id,
            path = %found.path.display(), %problem, "credential cannot be refreshed");
    }
    if !store.persistent() {
        if provider.rotates_refresh_tokens() {
            tracing::warn!(target: "tokenrelay::credentials", provider = %provider.name, credential = %cred.id,
                path = %found.path.display(),
                "READ-ONLY credential with a rotating refresh token and no [refresh] state_dir: each refresh replaces the refresh token, and the new one lives only in memory. After a restart the file's old token is dead and the account must re-authenticate. Set [refresh] state_dir to a writable directory.");
        } else {
            tracing::info!(target: "tokenrelay::credentials", provider = %provider.name, credential = %cred.id,
                path = %found.path.display(), "read-only credential: refreshed tokens are kept in memory");
        }
    }
    Ok(Arc::new(cred))
}

/// A credential readable by group or others leaks to every local user (and container).
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // `metadata` follows symlinks: the mode of the file itself (Kubernetes mounts).
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(target: "tokenrelay::credentials", path = %path.display(), mode = %format!("{mode:o}"),
                fix = %format!("chmod 600 {}", path.display()),
                "credential file is readable by other users; restrict it (Kubernetes: defaultMode: 0400 on the Secret volume)");
        }
    }
}

/// The configured id, else the file stem made safe; suffixed `-2`, `-3`… when taken.
/// Every credential file of a provider with the id the pool gives it (the same order and
/// rule as `Pool::load`), for commands that name a credential as PROVIDER/ID offline.
pub fn credential_paths(provider: &ProviderConfig) -> Result<Vec<(String, PathBuf)>, String> {
    let mut ids = HashSet::new();
    Ok(resolve(provider)?
        .into_iter()
        .map(|f| (unique_id(&mut ids, f.id.clone(), &f.path), f.path))
        .collect())
}

/// A provider's static keys with their ids: the configured id, else `key-` and 8 hex
/// digits of the key's SHA-256 (stable across reloads and reorderings, never the key). The
/// same key listed twice is one credential.
/// A configured key, with its id and project.
pub struct FoundKey {
    pub id: String,
    pub key: SecretString,
    pub project: Option<String>,
}

pub fn api_keys(provider: &ProviderConfig) -> Result<Vec<FoundKey>, String> {
    let from_file = match &provider.api_keys_file {
        Some(path) => crate::config::read_key_file(path)
            .map_err(|e| format!("providers.{}.api_keys_file: {e}", provider.name))?,
        None => Vec::new(),
    };
    let listed = provider
        .api_keys
        .iter()
        .map(|k| (k.id.clone(), k.key.clone(), k.project.clone()))
        .chain(from_file.into_iter().map(|k| (None, k, None)));
    let mut seen_ids = HashSet::new();
    let mut seen_keys = HashSet::new();
    let mut out = Vec::new();
    for (id, key, project) in listed {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.expose_secret().as_bytes());
        if !seen_keys.insert(digest.as_ref().to_vec()) {
            continue;
        }
        let id = id.unwrap_or_else(|| {
            let hex: String = digest.as_ref()[..4]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("key-{hex}")
        });
        if !seen_ids.insert(id.clone()) {
            return Err(format!(
                "providers.{}: two api keys have the id {id:?}; give each its own id",
                provider.name
            ));
        }
        out.push(FoundKey { id, key, project });
    }
    Ok(out)
}

fn unique_id(taken: &mut HashSet<String>, configured: Option<String>, path: &Path) -> String {
    let base = configured.unwrap_or_else(|| {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let safe: String = stem
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if safe.is_empty() {
            "credential".into()
        } else {
            safe
        }
    });
    let mut id = base.clone();
    let mut n = 2;
    while !taken.insert(id.clone()) {
        id = format!("{base}-{n}");
        n += 1;
    }
    id
}

/// Where a provider looks for credentials, for "nothing found" messages.
pub fn looked_at(provider: &ProviderConfig) -> Vec<PathBuf> {
    provider
        .credentials
        .iter()
        .map(|e| e.pattern.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_stems_and_stay_unique() {
        let mut taken = HashSet::new();
        assert_eq!(
            unique_id(&mut taken, None, Path::new("/a/oauth_creds.json")),
            "oauth_creds"
        );
        assert_eq!(
            unique_id(&mut taken, None, Path::new("/b/oauth_creds.json")),
            "oauth_creds-2"
        );
        assert_eq!(
            unique_id(&mut taken, None, Path::new("/c/my creds.json")),
            "my_creds"
        );
        assert_eq!(
            unique_id(&mut taken, Some("work".into()), Path::new("/x.json")),
            "work"
        );
    }

    #[test]
    fn globs_are_watched_at_their_literal_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(watch_dir(&d.join("*.json")), Some(d.to_path_buf()));
        assert_eq!(watch_dir(&d.join("creds.json")), Some(d.to_path_buf()));
        assert_eq!(watch_dir(d), Some(d.to_path_buf()));
        assert_eq!(watch_dir(Path::new("/nonexistent/x.json")), None);
    }
}
