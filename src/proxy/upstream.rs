//! The HTTP client for upstream requests: this proxy thread's own connections (see
//! `conns.rs`: an HTTP/1.1 exchange is driven inside the request's task; HTTPS upstreams
//! that offer HTTP/2 share one multiplexed connection per thread), rustls with webpki
//! roots plus `server.upstream_ca`, `resolve` overrides, keep-alive, a connect timeout, no
//! redirects, and an idle timeout on response bodies instead of a total one (streams can
//! be long).

use std::collections::HashMap;
use std::future::Future as _;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

pub use super::body::UpBody;
use super::conns::{Connections, Driven};
pub use super::conns::{Replay, SendError};

/// How an upstream client is set up (from `[server]`).
pub struct UpstreamOptions<'a> {
    pub connect_timeout: Duration,
    /// The longest silence inside a response body.
    pub idle_timeout: Duration,
    /// The longest an idle connection is kept (`server.upstream_keepalive`).
    pub keepalive: Duration,
    pub overrides: HashMap<String, IpAddr>,
    pub extra_roots: &'a [rustls_pki_types::CertificateDer<'static>],
}

/// One proxy thread's upstream client.
#[derive(Clone)]
pub struct Upstream {
    conns: Arc<Connections>,
    idle_timeout: Duration,
}

impl Upstream {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Upstream::with_resolve(UpstreamOptions {
            connect_timeout,
            idle_timeout,
            keepalive: Duration::from_secs(30),
            overrides: HashMap::new(),
            extra_roots: &[],
        })
    }

    /// A client whose name lookups honour `overrides` (host → address, like curl's
    /// `--resolve`: the port still comes from the URL, TLS still checks the original
    /// name) and that also trusts `extra_roots`.
    pub fn with_resolve(o: UpstreamOptions<'_>) -> Self {
        let UpstreamOptions {
            connect_timeout,
            idle_timeout,
            keepalive,
            overrides,
            extra_roots,
        } = o;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for c in extra_roots {
            // Validated by the config; a certificate rustls cannot use is skipped.
            let _ = roots.add(c.clone());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|_| {
                // ring supports the default versions; this branch is not reachable.
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("ring supports TLS 1.3")
            })
            .with_root_certificates(roots)
            .with_no_client_auth();
        Upstream {
            conns: Connections::new(tls, Arc::new(overrides), connect_timeout, keepalive),
            idle_timeout,
        }
    }

    /// Sends a request; the response body times out after `idle_timeout` of silence.
    /// `again` builds it anew if it must go again on a new connection (see `conns.rs`).
    pub async fn send(
        &self,
        req: http::Request<UpBody>,
        again: Replay<'_>,
    ) -> Result<http::Response<IdleTimeout>, SendError> {
        let resp = self.conns.send(req, again).await?;
        let idle = self.idle_timeout;
        Ok(resp.map(|body| IdleTimeout::driven(body, idle)))
    }

    /// Sends a WebSocket handshake over HTTP/1.1; a 101 answer can be upgraded with
    /// `hyper::upgrade::on`.
    pub async fn send_upgrade(
        &self,
        req: http::Request<UpBody>,
    ) -> Result<http::Response<Incoming>, SendError> {
        self.conns.send_upgrade(req).await
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }
}

/// A response body that fails when no data arrives for `idle`. The timer is armed only
/// while the body is waiting, so a body that is already there costs no timer at all.
pub struct IdleTimeout {
    inner: Driven,
    idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimeout {
    pub fn new(inner: Incoming, idle: Duration) -> Self {
        IdleTimeout::driven(Driven::plain(inner), idle)
    }

    fn driven(inner: Driven, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            sleep: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream sent nothing for {0:?}")]
    Idle(Duration),
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
}

impl Body for IdleTimeout {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                Poll::Ready(frame.map(|f| f.map_err(BodyError::from)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let sleep = this.sleep.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(Instant::now() + idle))
                });
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Idle(idle)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
