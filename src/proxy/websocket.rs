//! WebSocket pass-through (the Gemini Live API's `BidiGenerateContent`, realtime APIs):
//! the handshake goes upstream over HTTP/1.1 with the credential attached the way the
//! provider takes it on any request — Gemini: `x-goog-api-key` or an OAuth bearer (Google's
//! Live API guide, https://ai.google.dev/gemini-api/docs/live-api/get-started-websocket,
//! shows the key as `?key=`; Google's APIs take the same key in `x-goog-api-key`, which keeps
//! it out of URLs and upstream logs, and is what the google-genai SDK sends) — then bytes
//! are spliced both ways until either side closes or both are silent for
//! `server.upstream_idle_timeout`. No failover once the upstream answered the handshake.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::error::{ProxyError, Reason};
use super::upstream::UpBody;
use super::ProxyState;
use crate::lifecycle::Token;

/// Whether a request asks for a WebSocket upgrade.
pub fn is_upgrade(method: &http::Method, headers: &HeaderMap) -> bool {
    method == http::Method::GET
        && headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Sends the handshake with `token` to `uri`. `Ok(Err(resp))`: the upstream answered
/// without upgrading (passed to the client as it is); `Err`: it could not be reached.
pub async fn handshake(
    s: &ProxyState,
    token: &Token,
    uri: http::Uri,
    headers: HeaderMap,
) -> Result<http::Response<hyper::body::Incoming>, crate::proxy::upstream::SendError> {
    let mut req = http::Request::new(UpBody::empty());
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let h = req.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Some((name, value)) = &token.auth {
        h.insert(name, value.clone());
    }
    for (name, value) in &token.upstream_headers {
        h.insert(name, value.clone());
    }
    s.client.send_upgrade(req).await
}

/// Answers the client's handshake with the upstream's 101 and splices the two upgraded
/// connections in a task of their own.
pub fn splice(
    s: &ProxyState,
    provider: &str,
    client: OnUpgrade,
    mut upstream: http::Response<hyper::body::Incoming>,
) -> Response {
    let Ok(permit) = Arc::clone(&s.upgrades).try_acquire_owned() else {
        return ProxyError::new(
            Reason::UpstreamUnreachable,
            "too many open WebSocket connections (server.max_connections); try again later",
        )
        .into_response();
    };
    let upstream_io = hyper::upgrade::on(&mut upstream);
    let mut answer = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    for (name, value) in upstream.headers() {
        answer = answer.header(name, value);
    }
    let answer = answer
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response());
    let idle = s.client.idle_timeout();
    let metrics = Arc::clone(&s.metrics);
    let provider = provider.to_string();
    tokio::spawn(async move {
        let _permit = permit;
        let (client, upstream) = match tokio::join!(client, upstream_io) {
            (Ok(c), Ok(u)) => (TokioIo::new(c), TokioIo::new(u)),
            (c, u) => {
                tracing::warn!(target: "tokenrelay::proxy", provider, client_ok = c.is_ok(), upstream_ok = u.is_ok(),
                    "WebSocket upgrade did not complete");
                return;
            }
        };
        let open = metrics.upgrades_open.with_label_values(&[&provider]);
        open.inc();
        let started = Instant::now();
        let (sent, received) = pipe(client, upstream, idle).await;
        open.dec();
        metrics
            .upgrade_duration
            .with_label_values(&[&provider])
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(target: "tokenrelay::proxy", provider, bytes_up = sent, bytes_down = received,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0, "WebSocket closed");
    });
    answer
}

/// Copies both ways until each side has closed, or nothing moved for `idle`. Returns the
/// bytes sent upstream and received.
async fn pipe<A, B>(client: A, upstream: B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    let up = copy(cr, uw, &last, epoch);
    let down = copy(ur, cw, &last, epoch);
    tokio::pin!(up, down);
    let watchdog = async {
        loop {
            let quiet = epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    // A WebSocket has no half-open state: once one side has closed, the other gets a moment
    // to finish its close frame, then both go.
    const LINGER: Duration = Duration::from_secs(2);
    tokio::select! {
        sent = &mut up => {
            let received = tokio::time::timeout(LINGER, &mut down).await.unwrap_or(0);
            (sent, received)
        }
        received = &mut down => {
            let sent = tokio::time::timeout(LINGER, &mut up).await.unwrap_or(0);
            (sent, received)
        }
        () = watchdog => {
            tracing::info!(target: "tokenrelay::proxy", ?idle, "WebSocket idle; closing both sides");
            (0, 0)
        }
    }
}

async fn copy<R, W>(mut from: R, mut to: W, last: &AtomicU64, epoch: Instant) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 << 10];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total += n as u64;
        last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
    total
}
