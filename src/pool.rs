//! The credential pools, one per provider: loading them from the configuration and
//! choosing the order in which a request tries them.
//!
//! Selection is lock-free: the credential list is an `ArcSwap` snapshot (so a reload can
//! replace it while requests hold the old one) and the round-robin cursor an atomic.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Config, ProviderConfig, Strategy};
use crate::store::{CredentialStore, FileStore};
use crate::token::{Credential, Refresher};

/// Problems loading credential files, each naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

pub struct ProviderPool {
    pub config: Arc<ProviderConfig>,
    credentials: ArcSwap<Vec<Arc<Credential>>>,
    cursor: AtomicUsize,
    strategy: Strategy,
}

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

    pub fn find(&self, id: &str) -> Option<Arc<Credential>> {
        self.credentials.load().iter().find(|c| c.id == id).cloned()
    }
}

pub struct Pool {
    pub providers: Vec<Arc<ProviderPool>>,
}

impl Pool {
    pub fn provider(&self, name: &str) -> Option<&Arc<ProviderPool>> {
        self.providers.iter().find(|p| p.config.name == name)
    }

    pub fn all_credentials(&self) -> impl Iterator<Item = Arc<Credential>> + '_ {
        self.providers.iter().flat_map(|p| p.credentials().to_vec())
    }

    /// Loads every provider's credentials. A file that cannot be read or parsed is an
    /// error naming it: at start-up, a broken credential should be fixed, not ignored.
    pub fn load(config: &Config, refresher: &Arc<Refresher>) -> Result<Pool, LoadError> {
        let mut providers = Vec::new();
        for p in &config.providers {
            let provider = Arc::new(p.clone());
            refresher.metrics.init_provider(&provider.name);
            let creds = load_provider(&provider, refresher)?;
            if creds.is_empty() {
                let looked: Vec<String> = looked_at(&provider)
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                tracing::warn!(target: "tokenrelay::credentials", provider = %provider.name, looked_at = %looked.join(", "),
                    hint = %provider.reauth_hint(), "provider has no credentials");
            }
            for c in &creds {
                refresher.metrics.init_credential(&provider.name, &c.id);
            }
            providers.push(Arc::new(ProviderPool {
                config: provider,
                credentials: ArcSwap::from_pointee(creds),
                cursor: AtomicUsize::new(0),
                strategy: config.pool.strategy,
            }));
        }
        Ok(Pool { providers })
    }
}

fn load_provider(
    provider: &Arc<ProviderConfig>,
    refresher: &Arc<Refresher>,
) -> Result<Vec<Arc<Credential>>, LoadError> {
    let mut ids = HashSet::new();
    let mut seen_paths = HashSet::new();
    let mut out = Vec::new();
    for entry in &provider.credentials {
        let paths = entry
            .resolve()
            .map_err(|p| LoadError(format!("{}: {p}", entry.origin)))?;
        for found in paths {
            let canonical =
                std::fs::canonicalize(&found.path).unwrap_or_else(|_| found.path.clone());
            if !seen_paths.insert(canonical) {
                continue;
            }
            let id = unique_id(&mut ids, found.id.clone(), &found.path);
            let store: Arc<dyn CredentialStore> = Arc::new(FileStore::new(found.path.clone()));
            let file = store.load().map_err(|e| {
                LoadError(format!(
                    "{e} (credential of provider {}; fix the file or remove it from {})",
                    provider.name, entry.origin
                ))
            })?;
            let shape = file.shape;
            let cred = Credential::from_store(
                Arc::clone(provider),
                id,
                Arc::clone(&store),
                file,
                Arc::clone(refresher),
            )
            .map_err(|p| LoadError(format!("{}: {p}", found.path.display())))?;
            let snap = cred.snapshot();
            tracing::info!(target: "tokenrelay::credentials", provider = %provider.name, credential = %cred.id,
                path = %found.path.display(), shape = shape.as_str(), writable = store.writable(),
                expires_at = %snap.expires_at_ms.map(crate::clock::rfc3339).unwrap_or_else(|| "unknown".into()),
                "credential loaded");
            if let Some(problem) = &snap.last_error {
                tracing::error!(target: "tokenrelay::credentials", provider = %provider.name, credential = %cred.id,
                    path = %found.path.display(), %problem, "credential cannot be refreshed");
            }
            out.push(Arc::new(cred));
        }
    }
    for (i, key) in provider.api_keys.iter().enumerate() {
        let id = unique_id(&mut ids, Some(format!("api-key-{}", i + 1)), Path::new(""));
        out.push(Arc::new(Credential::api_key(
            Arc::clone(provider),
            id,
            key,
            Arc::clone(refresher),
        )));
    }
    Ok(out)
}

/// The configured id, else the file stem made safe; suffixed `-2`, `-3`… when taken.
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

/// Paths the presets look at, for the readiness message when nothing was found.
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
}
