//! Reload without a restart (SIGHUP, `POST /admin/reload`): the configuration file is
//! re-read for `[[clients]]` and `server.client_keys` (a client that keeps its name keeps
//! its counts; one added back gets what it spent from the usage store), then every
//! provider's credentials are re-read (`Pool::reload`). A file
//! that no longer validates leaves the clients as they were and is reported. Other
//! settings need a restart.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::lifecycle::pool::{Pool, ReloadReport};
use crate::usage::clients::Clients;
use crate::usage::ledger::Ledger;

pub struct Reloader {
    pub pool: Arc<Pool>,
    pub clients: Arc<ArcSwap<Clients>>,
    /// A client that joins (or comes back) gets what it spent from here.
    pub ledger: Arc<Ledger>,
    /// The configuration file (`None`: started from built-in defaults).
    pub config_path: Option<PathBuf>,
}

impl Reloader {
    pub async fn reload(&self) -> ReloadReport {
        let mut clients_error = None;
        if let Some(path) = &self.config_path {
            let env = |k: &str| std::env::var(k).ok();
            match Config::from_file(path, &env) {
                Ok(cfg) => {
                    let next = self
                        .clients
                        .load()
                        .reloaded(&cfg.clients, &cfg.server.client_keys);
                    tracing::info!(target: "tokenrelay::clients", clients = cfg.clients.len(),
                        client_keys = cfg.server.client_keys.len(), "clients reloaded");
                    // A client added back gets what it spent before it is admitted
                    // (counts only ever rise); in a fleet, Redis holds its windows.
                    if self.ledger.kind() != "redis" {
                        let _ = self.ledger.flush().await;
                    }
                    self.ledger.restore(&next, crate::clock::now_ms()).await;
                    self.clients.store(Arc::new(next));
                }
                Err(e) => {
                    tracing::error!(target: "tokenrelay::clients", error = %e,
                        "configuration not reloaded; the clients stay as they were");
                    clients_error = Some(format!(
                        "{e} (clients not reloaded: they stay as they were)"
                    ));
                }
            }
        }
        let mut report = self.pool.reload().await;
        report.errors.splice(0..0, clients_error);
        report
    }
}
