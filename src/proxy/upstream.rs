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

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::{Instant, Sleep};

pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The shared upstream client.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, Full<Bytes>>,
    idle_timeout: Duration,
}

impl Upstream {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Upstream {
            client,
            idle_timeout,
        }
    }

    /// Sends a request; the response body times out after `idle_timeout` of silence.
    pub async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<IdleTimeout>, hyper_util::client::legacy::Error> {
        let resp = self.client.request(req).await?;
        let idle = self.idle_timeout;
        Ok(resp.map(|body| IdleTimeout::new(body, idle)))
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
    fn new(inner: Incoming, idle: Duration) -> Self {
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
