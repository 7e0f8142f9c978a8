//! Upstream connections, owned by the proxy thread that uses them.
//!
//! An HTTP/1.1 exchange runs entirely inside the request's own task, on tokenrelay's own
//! codec (`h1.rs`): the request goes out in one write, the task reads the response head,
//! and the response body reads the connection as the server connection pulls it; at the
//! body's end the connection goes back to this thread's idle list (as Pingora does).
//! There is no connection task and no channel hop between the request and its upstream
//! bytes. A connection taken from the idle list is polled once first: one the upstream
//! closed meanwhile is dropped, and a request it could not take goes out on another.
//!
//! hyper speaks for the rest: an HTTPS upstream that offers HTTP/2 (ALPN) gets one
//! multiplexed connection per thread and origin, driven by a task of its own on this
//! thread (many requests share it); a streamed upload and a WebSocket handshake each get a
//! new HTTP/1.1 connection of hyper's, not pooled.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
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

use super::h1;
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
    #[error("the upstream exchange failed: {0}")]
    Request(#[from] ExchangeError),
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

/// An idle HTTP/1.1 connection in the pool.
struct Idle {
    conn: h1::Conn,
    since: Instant,
}

enum Fresh {
    /// HTTP/1.1 (plain, or TLS without `h2`): the caller chooses the codec.
    H1(Stream),
    H2(http2::SendRequest<UpBody>),
}

/// One proxy thread's upstream connections (each thread has its own; the locks are never
/// contended).
pub struct Connections {
    idle: Mutex<HashMap<Origin, Vec<Idle>>>,
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
                            None => return Err(SendError::Request(e.into_error().into())),
                        }
                    }
                }
            }
        }
        let (parts, body) = req.into_parts();
        let body = match body {
            UpBody::Buffered(bytes) => bytes.unwrap_or_default(),
            // Boxed: a streamed upload is the rare case.
            streamed @ UpBody::Streamed(_) => {
                let req = http::Request::from_parts(parts, streamed);
                return Box::pin(self.send_streamed(origin, req)).await;
            }
        };
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let wire = h1::Wire::new(
            &parts.method,
            target,
            origin.authority.as_str(),
            &parts.headers,
            &body,
        );
        let head_request = parts.method == http::Method::HEAD;
        while let Some(mut idle) = self.take_idle(&origin) {
            if !poll_fn(|cx| Poll::Ready(idle.conn.poll_usable(cx))).await {
                continue;
            }
            // A pooled connection that fails to take the whole request cannot have
            // answered it: the request goes out on another.
            if idle.conn.send(&wire).await.is_err() {
                continue;
            }
            return self.answer(origin, idle.conn, head_request).await;
        }
        // Boxed: a new connection (and its TLS handshake) is the rare case.
        match Box::pin(self.connect(&origin, true)).await? {
            Fresh::H1(stream) => {
                let mut conn = h1::Conn::new(stream);
                conn.send(&wire)
                    .await
                    .map_err(|e| SendError::Request(h1::Error::from(e).into()))?;
                self.answer(origin, conn, head_request).await
            }
            Fresh::H2(h2) => {
                let req = http::Request::from_parts(parts, UpBody::buffered(body));
                self.share_h2(origin, h2, req).await
            }
        }
    }

    /// The first request on a new HTTP/2 connection, which later requests share.
    async fn share_h2(
        &self,
        origin: Origin,
        h2: http2::SendRequest<UpBody>,
        req: http::Request<UpBody>,
    ) -> Result<http::Response<Driven>, SendError> {
        self.lock_h2().insert(origin, h2.clone());
        send_h2(h2, req)
            .await
            .map_err(|e| SendError::Request(e.into_error().into()))
    }

    /// Reads the answer to a request sent on `conn`; its body returns `conn` to the idle
    /// list when it ends.
    async fn answer(
        self: &Arc<Self>,
        origin: Origin,
        mut conn: h1::Conn,
        head_request: bool,
    ) -> Result<http::Response<Driven>, SendError> {
        let h1::Response { parts, body } = conn
            .read_head(head_request)
            .await
            .map_err(|e| SendError::Request(e.into()))?;
        let mut driven = Driven(Inner::H1 {
            decoder: body,
            held: Some(Held {
                conn,
                conns: Arc::clone(self),
                origin,
            }),
        });
        driven.release_if_done();
        Ok(http::Response::from_parts(parts, driven))
    }

    /// A streamed upload, on a new HTTP/1.1 connection of hyper's (its body is read while
    /// the answer may already be coming), or on the shared HTTP/2 connection it offers.
    async fn send_streamed(
        &self,
        origin: Origin,
        req: http::Request<UpBody>,
    ) -> Result<http::Response<Driven>, SendError> {
        match self.connect(&origin, true).await? {
            Fresh::H1(stream) => Ok(hyper_h1(&origin, stream, req, false)
                .await?
                .map(|body| Driven(Inner::Hyper(body)))),
            Fresh::H2(h2) => self.share_h2(origin, h2, req).await,
        }
    }

    /// A WebSocket handshake on a new HTTP/1.1 connection that may be upgraded.
    pub async fn send_upgrade(
        &self,
        req: http::Request<UpBody>,
    ) -> Result<http::Response<Incoming>, SendError> {
        let origin = Origin::of(req.uri())?;
        let Fresh::H1(stream) = self.connect(&origin, false).await? else {
            return Err(origin.connect_error(io::Error::other("no HTTP/1.1 connection")));
        };
        hyper_h1(&origin, stream, req, true).await
    }

    fn lock_h2(&self) -> std::sync::MutexGuard<'_, HashMap<Origin, http2::SendRequest<UpBody>>> {
        self.h2.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_idle(&self, origin: &Origin) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(origin)?;
        // The most recently used first: the warmest, the least likely to have been closed.
        while let Some(i) = list.pop() {
            if i.since.elapsed() < IDLE_FOR {
                return Some(i);
            }
        }
        None
    }

    fn put_idle(&self, origin: Origin, conn: h1::Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(origin).or_default();
        if list.len() < MAX_IDLE {
            list.push(Idle {
                conn: conn.into_idle(),
                since: Instant::now(),
            });
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
        if !origin.tls {
            return Ok(Fresh::H1(Stream::Plain(tcp)));
        }
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
        let stream = Stream::Tls(Box::new(tls));
        if !h2 {
            return Ok(Fresh::H1(stream));
        }
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| err(io::Error::other(e)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Fresh::H2(send))
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
    Ok(resp.map(|body| Driven(Inner::Hyper(body))))
}

/// One request on a new HTTP/1.1 connection of hyper's, driven by a task of its own (which
/// keeps it for an upgrade when `upgrades`). Not pooled.
async fn hyper_h1(
    origin: &Origin,
    stream: Stream,
    mut req: http::Request<UpBody>,
    upgrades: bool,
) -> Result<http::Response<Incoming>, SendError> {
    let (mut send, conn) = http1::Builder::new()
        .handshake::<Io, UpBody>(TokioIo::new(stream))
        .await
        .map_err(|e| origin.connect_error(io::Error::other(e)))?;
    tokio::spawn(async move {
        let _ = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
    });
    origin_form(&mut req, origin);
    send.send_request(req)
        .await
        .map_err(|e| SendError::Request(e.into()))
}

/// HTTP/1.1 wants the path in the request line and the authority in `Host` (for the
/// requests hyper sends: streamed uploads, WebSocket handshakes).
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

/// Why an exchange failed once under way.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error(transparent)]
    Http1(#[from] h1::Error),
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

/// An upstream response body. An HTTP/1.1 one reads its connection as it is read and
/// returns the connection to the idle list at its end; dropped before its end, it closes
/// the connection (it is mid-message).
pub struct Driven(Inner);

enum Inner {
    H1 {
        decoder: h1::Decoder,
        /// Until the body ends or fails.
        held: Option<Held>,
    },
    Hyper(Incoming),
}

/// A connection lent to one response body, and where it goes back to.
struct Held {
    conn: h1::Conn,
    conns: Arc<Connections>,
    origin: Origin,
}

impl Driven {
    /// A body with no pooled connection behind it (a WebSocket handshake's answer).
    pub fn plain(body: Incoming) -> Driven {
        Driven(Inner::Hyper(body))
    }

    /// Returns the connection to the pool once the body has been read to its end.
    fn release_if_done(&mut self) {
        if let Inner::H1 { decoder, held } = &mut self.0 {
            if !decoder.is_end() {
                return;
            }
            if let Some(h) = held.take() {
                if h.conn.reusable_after(decoder) {
                    h.conns.put_idle(h.origin, h.conn);
                }
            }
        }
    }
}

impl Body for Driven {
    type Data = bytes::Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, ExchangeError>>> {
        let this = &mut *self;
        match &mut this.0 {
            Inner::Hyper(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(ExchangeError::from))),
            Inner::H1 { decoder, held } => {
                let Some(h) = held else {
                    return Poll::Ready(None);
                };
                match ready!(h.conn.poll_body(decoder, cx)) {
                    Some(Ok(data)) => {
                        this.release_if_done();
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    None => {
                        this.release_if_done();
                        Poll::Ready(None)
                    }
                    Some(Err(e)) => {
                        *held = None;
                        Poll::Ready(Some(Err(e.into())))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Hyper(body) => body.is_end_stream(),
            Inner::H1 { decoder, held } => held.is_none() || decoder.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Hyper(body) => body.size_hint(),
            Inner::H1 { decoder, .. } => decoder.size_hint(),
        }
    }
}
