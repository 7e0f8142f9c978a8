//! Upstream connections, owned by the proxy thread that uses them.
//!
//! An HTTP/1.1 exchange runs entirely inside the request's own task: the connection's I/O
//! future is polled by whoever waits on it — the task awaiting the response head, then the
//! response body as the server connection reads it — and goes back to this thread's idle
//! list when the body ends (as Pingora does). There is no connection task and no channel
//! hop between the request and its upstream bytes. A connection taken from the idle list is
//! polled once first: one the upstream closed meanwhile is dropped, and a request it could
//! not start is handed back and sent on another.
//!
//! An HTTPS upstream that offers HTTP/2 (ALPN) gets one multiplexed connection per thread
//! and origin, driven by a task of its own on this thread (many requests share it).

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::upstream::UpBody;

/// How long an idle connection is kept (upstreams close theirs after about a minute or
/// more; one closed meanwhile is noticed on checkout).
const IDLE_FOR: Duration = Duration::from_secs(90);
/// Idle connections kept per origin and thread.
const MAX_IDLE: usize = 1024;

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Nothing was sent: the upstream could not be reached (DNS, TCP, TLS).
    #[error("cannot connect to {origin}: {source}")]
    Connect {
        origin: String,
        #[source]
        source: io::Error,
    },
    /// The connection failed during the exchange.
    #[error("the upstream connection failed: {0}")]
    Request(#[from] hyper::Error),
    #[error("not an http or https URL: {0}")]
    BadUri(String),
}

impl SendError {
    /// Whether the upstream was never reached (another credential or attempt may be).
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. })
    }
}

/// Where a connection goes: scheme and authority.
#[derive(Clone)]
struct Origin {
    tls: bool,
    authority: Authority,
}

// Compared and hashed as the bytes of the authority, in one piece. `Authority`'s own
// `Hash` and `Eq` fold case byte by byte (a hash write per byte: about 1,000 instructions
// per lookup, twice per request); an upstream spelled in two cases only gets two pools.
impl PartialEq for Origin {
    fn eq(&self, other: &Origin) -> bool {
        self.tls == other.tls && self.authority.as_str() == other.authority.as_str()
    }
}

impl Eq for Origin {}

impl std::hash::Hash for Origin {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.tls.hash(state);
        self.authority.as_str().hash(state);
    }
}

impl Origin {
    fn of(uri: &http::Uri) -> Result<Origin, SendError> {
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(SendError::BadUri(uri.to_string())),
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| SendError::BadUri(uri.to_string()))?;
        Ok(Origin { tls, authority })
    }

    fn host(&self) -> &str {
        let h = self.authority.host();
        h.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(h)
    }

    fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.tls { 443 } else { 80 })
    }

    fn connect_error(&self, source: io::Error) -> SendError {
        SendError::Connect {
            origin: format!(
                "{}://{}",
                if self.tls { "https" } else { "http" },
                self.authority
            ),
            source,
        }
    }
}

/// A TCP or TLS stream to the upstream.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, b),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type Io = TokioIo<Stream>;

/// An HTTP/1.1 connection: the handle requests are sent on, and the future doing its I/O,
/// polled by the task using it.
struct H1 {
    send: http1::SendRequest<UpBody>,
    /// Boxed once per connection: the pool and the body move `H1`s around.
    io: Option<Box<http1::Connection<Io, UpBody>>>,
    idle_since: Instant,
}

impl H1 {
    /// Polls the connection's I/O; false once it has ended (closed or failed).
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(io) = &mut self.io else {
            return false;
        };
        if Pin::new(io.as_mut()).poll(cx).is_ready() {
            self.io = None;
            return false;
        }
        true
    }

    /// One poll: whether this pooled connection can take a request now.
    fn usable(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.drive(cx) || self.send.is_closed() {
            return false;
        }
        self.send.is_ready() || matches!(self.send.poll_ready(cx), Poll::Ready(Ok(())))
    }
}

enum Fresh {
    H1(H1),
    H2(http2::SendRequest<UpBody>),
}

/// One proxy thread's upstream connections (each thread has its own; the locks are never
/// contended).
pub struct Connections {
    idle: Mutex<HashMap<Origin, Vec<H1>>>,
    h2: Mutex<HashMap<Origin, http2::SendRequest<UpBody>>>,
    /// ALPN `h2`, `http/1.1`.
    tls: TlsConnector,
    /// ALPN `http/1.1` only (WebSocket upgrades).
    tls_h1: TlsConnector,
    overrides: Arc<HashMap<String, IpAddr>>,
    connect_timeout: Duration,
}

impl Connections {
    pub fn new(
        tls: rustls::ClientConfig,
        overrides: Arc<HashMap<String, IpAddr>>,
        connect_timeout: Duration,
    ) -> Arc<Connections> {
        let mut both = tls.clone();
        both.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut h1 = tls;
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(Connections {
            idle: Mutex::default(),
            h2: Mutex::default(),
            tls: TlsConnector::from(Arc::new(both)),
            tls_h1: TlsConnector::from(Arc::new(h1)),
            overrides,
            connect_timeout,
        })
    }

    /// Sends `req` (absolute URI) and returns the answer whose body drives the connection.
    pub async fn send(
        self: &Arc<Self>,
        mut req: http::Request<UpBody>,
    ) -> Result<http::Response<Driven>, SendError> {
        let origin = Origin::of(req.uri())?;
        if origin.tls {
            let shared = self.lock_h2().get(&origin).cloned();
            if let Some(h2) = shared {
                match send_h2(h2, req).await {
                    Ok(resp) => return Ok(resp),
                    // The shared connection went away before taking it: a new one.
                    Err(mut e) => {
                        self.lock_h2().remove(&origin);
                        match e.take_message() {
                            Some(r) => req = r,
                            None => return Err(SendError::Request(e.into_error())),
                        }
                    }
                }
            }
        }
        while let Some(mut h1) = self.take_idle(&origin) {
            if !poll_fn(|cx| Poll::Ready(h1.usable(cx))).await {
                continue;
            }
            match self.exchange(origin.clone(), h1, req).await {
                Ok(resp) => return Ok(resp),
                // The upstream closed it before the request went out: send it on another.
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(SendError::Request(e.into_error())),
                },
            }
        }
        // Boxed: a new connection (and its TLS handshake) is the rare case.
        match Box::pin(self.connect(&origin, true)).await? {
            Fresh::H1(h1) => self
                .exchange(origin, h1, req)
                .await
                .map_err(|e| SendError::Request(e.into_error())),
            Fresh::H2(h2) => {
                self.lock_h2().insert(origin, h2.clone());
                send_h2(h2, req)
                    .await
                    .map_err(|e| SendError::Request(e.into_error()))
            }
        }
    }

    /// A WebSocket handshake on a new HTTP/1.1 connection that may be upgraded.
    pub async fn send_upgrade(
        &self,
        mut req: http::Request<UpBody>,
    ) -> Result<http::Response<Incoming>, SendError> {
        let origin = Origin::of(req.uri())?;
        let Fresh::H1(H1 {
            mut send,
            io: Some(io),
            ..
        }) = self.connect(&origin, false).await?
        else {
            return Err(origin.connect_error(io::Error::other("no HTTP/1.1 connection")));
        };
        tokio::spawn(async move {
            let _ = io.with_upgrades().await;
        });
        origin_form(&mut req, &origin);
        Ok(send.send_request(req).await?)
    }

    /// One HTTP/1.1 exchange on `h1`, driven by this task until the response head; the
    /// body keeps driving it and returns it to the idle list when it ends.
    async fn exchange(
        self: &Arc<Self>,
        origin: Origin,
        mut h1: H1,
        mut req: http::Request<UpBody>,
    ) -> Result<http::Response<Driven>, TrySendError<http::Request<UpBody>>> {
        origin_form(&mut req, &origin);
        let mut answer = pin!(h1.send.try_send_request(req));
        let resp = poll_fn(|cx| {
            h1.drive(cx);
            answer.as_mut().poll(cx)
        })
        .await?;
        let mut back = Some(Back {
            conns: Arc::clone(self),
            origin,
            h1,
        });
        if resp.body().is_end_stream() {
            // No body to read (204, 304, HEAD, `content-length: 0`): reusable now.
            release(&mut back);
        }
        Ok(resp.map(|body| Driven { body, back }))
    }

    fn lock_h2(&self) -> std::sync::MutexGuard<'_, HashMap<Origin, http2::SendRequest<UpBody>>> {
        self.h2.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_idle(&self, origin: &Origin) -> Option<H1> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(origin)?;
        // The most recently used first: the warmest, the least likely to have been closed.
        while let Some(h1) = list.pop() {
            if h1.idle_since.elapsed() < IDLE_FOR && !h1.send.is_closed() {
                return Some(h1);
            }
        }
        None
    }

    fn put_idle(&self, origin: Origin, mut h1: H1) {
        if h1.io.is_none() || h1.send.is_closed() {
            return;
        }
        h1.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(origin).or_default();
        if list.len() < MAX_IDLE {
            list.push(h1);
        }
    }

    async fn connect(&self, origin: &Origin, offer_h2: bool) -> Result<Fresh, SendError> {
        let err = |e| origin.connect_error(e);
        let tcp = tokio::time::timeout(self.connect_timeout, self.tcp(origin))
            .await
            .map_err(|_| {
                err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.connect_timeout),
                ))
            })?
            .map_err(err)?;
        let _ = tcp.set_nodelay(true);
        let (stream, h2) = if origin.tls {
            let name = rustls_pki_types::ServerName::try_from(origin.host().to_string())
                .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            let connector = if offer_h2 { &self.tls } else { &self.tls_h1 };
            let tls = tokio::time::timeout(self.connect_timeout, connector.connect(name, tcp))
                .await
                .map_err(|_| {
                    err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no TLS handshake within the connect timeout",
                    ))
                })?
                .map_err(err)?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            (Stream::Tls(Box::new(tls)), h2)
        } else {
            (Stream::Plain(tcp), false)
        };
        let io = TokioIo::new(stream);
        if h2 {
            let (send, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| err(io::Error::other(e)))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return Ok(Fresh::H2(send));
        }
        let (send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| err(io::Error::other(e)))?;
        Ok(Fresh::H1(H1 {
            send,
            io: Some(Box::new(conn)),
            idle_since: Instant::now(),
        }))
    }

    /// A TCP connection to the first address of the origin that answers (`resolve`
    /// overrides first, then IP literals, then the system resolver).
    async fn tcp(&self, origin: &Origin) -> io::Result<TcpStream> {
        let (host, port) = (origin.host(), origin.port());
        let addrs: Vec<SocketAddr> = if let Some(ip) = self.overrides.get(host) {
            vec![SocketAddr::new(*ip, port)]
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            vec![SocketAddr::new(ip, port)]
        } else {
            tokio::net::lookup_host((host, port)).await?.collect()
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

async fn send_h2(
    mut h2: http2::SendRequest<UpBody>,
    req: http::Request<UpBody>,
) -> Result<http::Response<Driven>, TrySendError<http::Request<UpBody>>> {
    let resp = h2.try_send_request(req).await?;
    Ok(resp.map(|body| Driven { body, back: None }))
}

/// HTTP/1.1 wants the path in the request line and the authority in `Host`.
fn origin_form(req: &mut http::Request<UpBody>, origin: &Origin) {
    if req.uri().scheme().is_none() {
        return;
    }
    if let Ok(host) = http::HeaderValue::from_str(origin.authority.as_str()) {
        req.headers_mut().entry(http::header::HOST).or_insert(host);
    }
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *req.uri_mut() = http::Uri::from(path);
}

/// Where a connection goes back to when its response body ends.
struct Back {
    conns: Arc<Connections>,
    origin: Origin,
    h1: H1,
}

fn release(back: &mut Option<Back>) {
    if let Some(b) = back.take() {
        b.conns.put_idle(b.origin, b.h1);
    }
}

/// An upstream response body that drives its HTTP/1.1 connection while it is read, and
/// returns the connection to the idle list at its end. Dropped before its end, it closes
/// the connection (it is mid-message).
pub struct Driven {
    body: Incoming,
    back: Option<Back>,
}

impl Driven {
    /// A body with no pooled connection behind it (a WebSocket handshake's answer).
    pub fn plain(body: Incoming) -> Driven {
        Driven { body, back: None }
    }
}

impl Body for Driven {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(b) = &mut this.back {
            if !b.h1.drive(cx) {
                this.back = None;
            }
        }
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            None => release(&mut this.back),
            Some(Ok(_)) if this.body.is_end_stream() => release(&mut this.back),
            Some(Err(_)) => this.back = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
