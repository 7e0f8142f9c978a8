//! Wiring: builds the shared HTTP clients, metrics and pool from a `Config`, binds the
//! proxy and admin listeners, and runs them until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, StoreConfig};
use crate::lifecycle::pool::Pool;
use crate::lifecycle::Refresher;
use crate::ops::admin::{self, AdminState};
use crate::ops::console::Console;
use crate::ops::reload::Reloader;
use crate::proxy::browser::{BrowserGuard, Listener};
use crate::proxy::server::{self, Limits};
use crate::proxy::upstream::{Upstream, UpstreamOptions};
use crate::proxy::{self, ProxyState};
use crate::store::redis::{Fleet, FleetEvent, FleetMetrics};
use crate::store::sqlite::UsageDb;
use crate::telemetry::alert::Alerter;
use crate::telemetry::metrics::Metrics;
use crate::usage::ledger::{Backend, Ledger};

/// A running tokenrelay: its bound addresses and a handle to stop it.
pub struct App {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    /// SIGHUP and `POST /admin/reload`.
    pub reloader: Arc<Reloader>,
    pub ledger: Arc<Ledger>,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    grace: Duration,
    /// Watches the credential directories; dropping it stops the watch.
    _watcher: Option<notify::RecommendedWatcher>,
}

impl App {
    /// Loads the credentials, binds both listeners and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<App> {
        let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);
        let refresh_client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.refresh.timeout)
            .timeout(config.refresh.timeout)
            .user_agent(concat!("tokenrelay/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot build the token-endpoint HTTP client")?;
        let alerter = Alerter::start(&config.alerts, refresh_client.clone());
        let fleet = match &config.store {
            StoreConfig::File => None,
            StoreConfig::Redis(cfg) => {
                let fleet = Fleet::new(cfg.clone(), Arc::clone(&metrics) as Arc<dyn FleetMetrics>)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", config.source))?;
                tracing::info!(target: "tokenrelay::store", replica = %fleet.replica, prefix = %cfg.key_prefix, "fleet mode: credentials are shared through Redis");
                Some(fleet)
            }
        };
        let refresher = Arc::new(Refresher {
            alerter,
            alert_after_failures: config.alerts.after_failures,
            expiry_warning: config.alerts.expiry_warning,
            fleet: fleet.clone(),
            ..Refresher::new(refresh_client, config.refresh.clone(), Arc::clone(&metrics))
        });
        let pool = Arc::new(Pool::load(&config, &refresher)?);
        pool.start_schedulers();
        if let Some(fleet) = &fleet {
            tokio::spawn(follow_fleet(fleet.subscribe(), Arc::downgrade(&pool)));
            fleet.start();
        }
        tokio::spawn(watch_expiry(Arc::downgrade(&pool)));
        let watcher = watch_credentials(&pool);
        let clients = Arc::new(arc_swap::ArcSwap::from_pointee(
            crate::usage::clients::Clients::new(&config.clients, &config.server.client_keys)
                .with_shared(fleet.as_ref().map(|f| f.counts())),
        ));
        let ledger = match &fleet {
            Some(f) => Ledger::new(Backend::Fleet(f.usage())),
            None => Ledger::new(Backend::Db(Arc::new(open_usage_db(&config)?))),
        };
        ledger
            .restore(&clients.load(), crate::clock::now_ms())
            .await;
        ledger.start();
        let reloader = Arc::new(Reloader {
            pool: Arc::clone(&pool),
            clients: Arc::clone(&clients),
            ledger: Arc::clone(&ledger),
            config_path: config.path.clone(),
        });

        let proxy_listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| {
                format!("cannot listen on {} (server.listen)", config.server.listen)
            })?;
        let admin_listener = TcpListener::bind(config.server.admin_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (server.admin_listen)",
                    config.server.admin_listen
                )
            })?;
        let proxy_addr = proxy_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let admin_app = admin::router(Arc::new(AdminState {
            pool: Arc::clone(&pool),
            metrics: Arc::clone(&metrics),
            admin_token: config.server.admin_token.clone(),
            browser: BrowserGuard::new(
                Listener::Admin,
                admin_addr,
                &config.server.allowed_hosts,
                &config.server.allowed_origins,
            ),
            console: Arc::new(Console {
                pool: Arc::clone(&pool),
                logins: Default::default(),
                logins_enabled: admin_addr.ip().is_loopback()
                    || config.server.admin_token.is_some(),
                http: reqwest::Client::new(),
                state_dir: config.refresh.state_dir.clone(),
                admin_port: admin_addr.port(),
            }),
            fleet: fleet.clone(),
            reloader: Arc::clone(&reloader),
            ledger: Arc::clone(&ledger),
        }));

        let (shutdown, _) = watch::channel(false);
        let limits = Limits {
            max_connections: config.server.max_connections,
            max_header_bytes: config.server.max_header_bytes,
            max_headers: config.server.max_headers,
            header_read_timeout: config.server.header_read_timeout,
        };
        let grace = config.server.shutdown_grace;
        let mut servers = vec![tokio::spawn(server::serve(
            admin_listener,
            admin_app,
            limits,
            shutdown.subscribe(),
            grace,
        ))];
        // The proxy: connections are handed to one single-threaded runtime per thread,
        // each with its own upstream connection pool, so a request and its upstream
        // exchange never change threads.
        let proxy_guard = BrowserGuard::new(
            Listener::Proxy,
            proxy_addr,
            &config.server.allowed_hosts,
            &config.server.allowed_origins,
        );
        // `resolve` overrides of every provider, for the upstream clients.
        let resolve: std::collections::HashMap<String, std::net::IpAddr> = config
            .providers
            .iter()
            .flat_map(|p| p.resolve.iter().cloned())
            .collect();
        let upgrades = Arc::new(tokio::sync::Semaphore::new(config.server.max_connections));
        let apps = (0..config.server.proxy_threads)
            .map(|_| {
                let state = Arc::new(ProxyState {
                    pool: Arc::clone(&pool),
                    client: Upstream::with_resolve(UpstreamOptions {
                        connect_timeout: config.server.upstream_connect_timeout,
                        idle_timeout: config.server.upstream_idle_timeout,
                        keepalive: config.server.upstream_keepalive,
                        overrides: resolve.clone(),
                        extra_roots: &config.server.upstream_ca,
                    }),
                    metrics: Arc::clone(&metrics),
                    max_request_body: config.server.max_request_body,
                    max_upload_body: config.server.max_upload_body,
                    upgrades: Arc::clone(&upgrades),
                    clients: Arc::clone(&clients),
                    ledger: Arc::clone(&ledger),
                    pool_config: config.pool.clone(),
                    browser: proxy_guard.clone(),
                });
                proxy::ProxyService(state)
            })
            .collect();
        let stop = shutdown.subscribe();
        servers.push(tokio::spawn(async move {
            if let Err(e) =
                server::serve_on_threads(proxy_listener, apps, limits, stop, grace).await
            {
                tracing::error!(error = %e, "cannot start the proxy threads");
            }
        }));
        tracing::info!(proxy = %proxy_addr, admin = %admin_addr, config = %config.source, "tokenrelay listening");
        Ok(App {
            proxy_addr,
            admin_addr,
            pool,
            metrics,
            reloader,
            ledger,
            shutdown,
            servers,
            grace: config.server.shutdown_grace,
            _watcher: watcher,
        })
    }

    /// Stops accepting connections, lets in-flight requests finish for up to
    /// `server.shutdown_grace`, then returns.
    pub async fn shutdown(self) {
        self.pool.retire_all();
        let _ = self.shutdown.send(true);
        // Each server drains its connections for up to the grace period.
        let all = futures_util::future::join_all(self.servers);
        let _ = tokio::time::timeout(self.grace + Duration::from_secs(1), all).await;
        // What the last answers spent is written before the process ends.
        if let Err(e) = self.ledger.flush().await {
            tracing::error!(target: "tokenrelay::usage", error = %e, "usage of the last second not written");
        }
    }
}

/// Runs tokenrelay until SIGTERM or Ctrl-C, then drains and returns. SIGHUP reloads the
/// clients and the credentials.
pub async fn run(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed before the listeners open: a signal that arrives as soon as tokenrelay
    // answers must reload or drain, never meet the default action (terminate).
    let hup = signal(SignalKind::hangup());
    let term = signal(SignalKind::terminate());
    let app = App::start(config).await?;
    let reloader = Arc::clone(&app.reloader);
    let hup = tokio::spawn(async move {
        let Ok(mut hup) = hup else {
            tracing::warn!("cannot listen for SIGHUP; reload with POST /admin/reload");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!(target: "tokenrelay::credentials", "SIGHUP: reloading clients and credentials");
            reloader.reload().await;
        }
    });
    wait_for_stop_signal(term).await;
    hup.abort();
    tracing::info!("shutting down: draining in-flight requests");
    app.shutdown().await;
    Ok(())
}

/// The usage database of `[usage] path`. One that was written in the file must open;
/// the default one falls back to memory, with a warning.
fn open_usage_db(config: &Config) -> anyhow::Result<UsageDb> {
    let cfg = &config.usage;
    match UsageDb::open(cfg.path.as_deref()) {
        Ok(db) => {
            tracing::info!(target: "tokenrelay::usage", place = %db.place, "usage and client budgets are kept here");
            Ok(db)
        }
        Err(e) if cfg.explicit => Err(anyhow::anyhow!("{}: usage.path: {e}", config.source)),
        Err(e) => {
            tracing::warn!(target: "tokenrelay::usage", error = %e,
                "usage and client budgets are kept in memory only (lost on restart); set [usage] path to a writable file");
            UsageDb::open(None).map_err(|e| anyhow::anyhow!(e))
        }
    }
}

/// Reloads the pool when a file in a credential directory changes. Watching the
/// directory (not the file) also sees Kubernetes swapping its `..data` symlink.
fn watch_credentials(pool: &Arc<Pool>) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let dirs = pool.watched_dirs();
    if dirs.is_empty() {
        return None;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let handler = move |event: notify::Result<notify::Event>| {
        let relevant =
            event.is_ok_and(|e| !e.kind.is_access() && e.paths.iter().any(|p| !is_own_artifact(p)));
        if relevant {
            let _ = tx.send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(target: "tokenrelay::credentials", error = %e,
                "cannot watch credential files; reload with SIGHUP or POST /admin/reload");
            return None;
        }
    };
    for dir in &dirs {
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                tracing::debug!(target: "tokenrelay::credentials", dir = %dir.display(), "watching")
            }
            Err(e) => {
                tracing::warn!(target: "tokenrelay::credentials", dir = %dir.display(), error = %e, "cannot watch")
            }
        }
    }
    let pool = Arc::clone(pool);
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Let a burst of events (an editor's save, a symlink swap) settle first.
            tokio::time::sleep(Duration::from_millis(250)).await;
            while rx.try_recv().is_ok() {}
            pool.reload().await;
        }
    });
    Some(watcher)
}

/// Raises `expiring_soon` alerts: every 15 s, each credential checks its expiry.
async fn watch_expiry(pool: std::sync::Weak<Pool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        for c in pool.all_credentials() {
            c.check_expiry();
        }
    }
}

/// Files tokenrelay itself creates beside credentials: temp files, locks, stale locks.
fn is_own_artifact(p: &std::path::Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    name.ends_with(".tmp") || name.ends_with(".lock") || name.contains(".stale.")
}

async fn wait_for_stop_signal(term: std::io::Result<tokio::signal::unix::Signal>) {
    let mut term = match term {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; stopping only on Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Fleet mode: what the other replicas did reaches this one. A newer record is re-read
/// (and adopted), a peer's cool-down is applied locally, and after a reconnect everything
/// is re-read (which also re-asserts records Redis lost).
async fn follow_fleet(
    mut events: tokio::sync::broadcast::Receiver<FleetEvent>,
    pool: std::sync::Weak<Pool>,
) {
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => FleetEvent::Reconnected,
            Err(_) => return,
        };
        let Some(pool) = pool.upgrade() else { return };
        match event {
            FleetEvent::Changed { provider, id } => {
                if let Some(c) = pool.provider(&provider).and_then(|p| p.find(&id)) {
                    let _ = c.reload().await;
                }
            }
            FleetEvent::Cooldown {
                provider,
                id,
                model,
                until_ms,
                reason,
                scope,
            } => {
                if let Some(c) = pool.provider(&provider).and_then(|p| p.find(&id)) {
                    c.cool_from_peer(model, until_ms, reason, scope);
                }
            }
            FleetEvent::NeedsReauth {
                provider,
                id,
                message,
            } => {
                if let Some(c) = pool.provider(&provider).and_then(|p| p.find(&id)) {
                    c.needs_reauth_from_peer(&message);
                }
            }
            FleetEvent::Invalid {
                provider,
                id,
                message,
            } => {
                if let Some(c) = pool.provider(&provider).and_then(|p| p.find(&id)) {
                    c.invalid_from_peer(message.as_deref());
                }
            }
            FleetEvent::Reconnected => {
                for c in pool.all_credentials().filter(|c| !c.is_api_key()) {
                    let _ = c.reload().await;
                }
            }
        }
    }
}
