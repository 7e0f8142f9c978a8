//! The HTTP client for upstream requests: hyper's pooled client over rustls (webpki
//! roots), HTTP/1.1 and HTTP/2 by ALPN, keep-alive, a connect timeout, no redirects (a
//! hyper client never follows them), and an idle timeout on response bodies instead of a
//! total one (streams can be long).
//!
//! Measured against reqwest on this path, hyper directly saves URL parsing (with IDNA),
//! header re-mapping and a timer per body read (see docs/benchmarks.md).

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::{Instant, Sleep};

pub type Connector = hyper_rustls::HttpsConnector<HttpConnector<Resolver>>;

/// A request body going upstream: buffered (replayable) or streamed (an upload larger
/// than `server.max_request_body`, sent once).
pub type UpBody = Either<Full<Bytes>, axum::body::Body>;

/// The shared upstream client.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, UpBody>,
    /// HTTP/1.1 only: a WebSocket upgrade needs it (no RFC 8441 over HTTP/2 upstream).
    http1: Client<Connector, UpBody>,
    idle_timeout: Duration,
}

/// Name resolution with `resolve` overrides (host → address, like curl's `--resolve`:
/// loopback tests and Private Service Connect endpoints), else the system resolver. The
/// port still comes from the URL; TLS still checks the original name.
#[derive(Clone)]
pub struct Resolver {
    overrides: Arc<HashMap<String, IpAddr>>,
    system: GaiResolver,
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.system.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        if let Some(ip) = self.overrides.get(name.as_str()) {
            let addr = SocketAddr::new(*ip, 0);
            return Box::pin(async move { Ok(vec![addr].into_iter()) });
        }
        let lookup = self.system.call(name);
        Box::pin(async move { Ok(lookup.await?.collect::<Vec<_>>().into_iter()) })
    }
}

impl Upstream {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Upstream::with_resolve(connect_timeout, idle_timeout, HashMap::new(), &[])
    }

    /// A client whose name lookups honour `overrides` first.
    pub fn with_resolve(
        connect_timeout: Duration,
        idle_timeout: Duration,
        overrides: HashMap<String, IpAddr>,
        extra_roots: &[rustls_pki_types::CertificateDer<'static>],
    ) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for c in extra_roots {
            // Validated by the config; a certificate rustls cannot use is skipped.
            let _ = roots.add(c.clone());
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        let resolver = Resolver {
            overrides: Arc::new(overrides),
            system: GaiResolver::new(),
        };
        let build = |h2: bool| {
            let mut http = HttpConnector::new_with_resolver(resolver.clone());
            http.set_connect_timeout(Some(connect_timeout));
            http.set_nodelay(true);
            http.enforce_http(false);
            let builder = match &tls {
                Ok(config) => {
                    hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config.clone())
                }
                Err(_) => hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots(),
            }
            .https_or_http()
            .enable_http1();
            let https = if h2 {
                builder.enable_http2().wrap_connector(http)
            } else {
                builder.wrap_connector(http)
            };
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(1024)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .build(https)
        };
        Upstream {
            client: build(true),
            http1: build(false),
            idle_timeout,
        }
    }

    /// Sends a request; the response body times out after `idle_timeout` of silence.
    pub async fn send(
        &self,
        req: http::Request<UpBody>,
    ) -> Result<http::Response<IdleTimeout>, hyper_util::client::legacy::Error> {
        let resp = self.client.request(req).await?;
        let idle = self.idle_timeout;
        Ok(resp.map(|body| IdleTimeout::new(body, idle)))
    }

    /// Sends a WebSocket handshake over HTTP/1.1; a 101 answer can be upgraded with
    /// `hyper::upgrade::on`.
    pub async fn send_upgrade(
        &self,
        req: http::Request<UpBody>,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        self.http1.request(req).await
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }
}

/// A response body that fails when no data arrives for `idle`. The timer is armed only
/// while the body is waiting, so a body that is already there costs no timer at all.
pub struct IdleTimeout {
    inner: Incoming,
    idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimeout {
    pub fn new(inner: Incoming, idle: Duration) -> Self {
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
    Hyper(#[from] hyper::Error),
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
