//! The HTTP server loops, with the limits a public-facing proxy needs: a cap on concurrent
//! connections (accepting pauses at the cap), a deadline for a client to send its request
//! headers (slowloris), and caps on header size and count. Shutdown stops accepting, then
//! lets open connections finish their requests (and streams) for up to the grace period.
//!
//! The proxy listener is served by [`serve_on_threads`]: one accept loop (so the cap is
//! exact) hands each connection to one of N threads, each running a single-threaded
//! runtime with its own upstream connection pool, so a request and its upstream exchange
//! never change threads. The admin listener uses [`serve`] on the main runtime.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
}

/// hyper's own limit on request headers when none is set.
const HYPER_MAX_HEADERS: usize = 100;

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let mut http1 = builder.http1();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    // Set only when it differs from hyper's default: with a limit set, hyper fills two
    // heap vectors of that many slots for every request it parses (about 1,700
    // instructions); without, it uses arrays on the stack.
    if limits.max_headers != HYPER_MAX_HEADERS {
        http1.max_headers(limits.max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

async fn stopped(stop: &watch::Receiver<bool>) {
    let mut stop = stop.clone();
    let _ = stop.wait_for(|s| *s).await;
}

/// Accepts connections while there are permits, handing each to `handle`.
async fn accept_loop(
    listener: TcpListener,
    max_connections: usize,
    stop: &watch::Receiver<bool>,
    mut handle: impl FnMut(TcpStream, OwnedSemaphorePermit),
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        // At the cap, stop accepting: the kernel's backlog holds new connections.
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = stopped(stop) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(stop) => break,
        };
        let _ = stream.set_nodelay(true);
        handle(stream, permit);
    }
}

fn spawn_connection<S>(
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    service: S,
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
) where
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .into_owned();
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        drop(permit);
    });
}

async fn drain(graceful: GracefulShutdown, grace: Duration) {
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "shutdown grace period over; closing remaining connections"
        );
    }
}

/// Serves `app` on `listener` until `stop` turns true, then drains for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let builder = builder(&limits);
    accept_loop(listener, limits.max_connections, &stop, |stream, permit| {
        let service = TowerToHyperService::new(app.clone());
        spawn_connection(&builder, &graceful, service, stream, permit);
    })
    .await;
    drain(graceful, grace).await;
}

/// Serves the proxy: one accept loop on the calling runtime, connections handed round
/// robin to one thread per entry of `apps` (each carries that thread's upstream client).
/// Returns when every thread has drained.
pub async fn serve_on_threads(
    listener: TcpListener,
    apps: Vec<super::ProxyService>,
    limits: Limits,
    stop: watch::Receiver<bool>,
    grace: Duration,
) -> std::io::Result<()> {
    let mut queues = Vec::new();
    let mut finished = Vec::new();
    for (i, app) in apps.into_iter().enumerate() {
        let (tx, mut rx) = mpsc::unbounded_channel::<(std::net::TcpStream, OwnedSemaphorePermit)>();
        let (done, wait) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("tokenrelay-proxy-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let graceful = GracefulShutdown::new();
                    let builder = builder(&limits);
                    // The accept loop closes the queue when it stops.
                    while let Some((stream, permit)) = rx.recv().await {
                        match TcpStream::from_std(stream) {
                            Ok(s) => spawn_connection(&builder, &graceful, app.clone(), s, permit),
                            Err(e) => tracing::warn!(error = %e, "cannot take over a connection"),
                        }
                    }
                    drain(graceful, grace).await;
                });
                let _ = done.send(());
            })?;
        queues.push(tx);
        finished.push(wait);
    }
    let mut next = 0;
    accept_loop(listener, limits.max_connections, &stop, |stream, permit| {
        // Moved to the thread's own runtime (deregistered from this one).
        match stream.into_std() {
            Ok(s) => {
                let _ = queues[next % queues.len()].send((s, permit));
                next += 1;
            }
            Err(e) => tracing::warn!(error = %e, "cannot hand over a connection"),
        }
    })
    .await;
    drop(queues);
    for f in finished {
        let _ = f.await;
    }
    Ok(())
}
