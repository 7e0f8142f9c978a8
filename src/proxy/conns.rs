//! Upstream connections, owned by the proxy thread that uses them.
//!
//! HTTP/1.1 and HTTP/2 are spoken by hyper. An HTTP/1.1 exchange runs inside the request's
//! own task: the connection's I/O future is polled by whoever waits on it — the task
//! awaiting the response head, then the response body as the server connection reads it —
//! and goes back to this thread's idle list when the body ends (as Pingora does). There is
//! no connection task and no channel hop between the request and its upstream bytes.
//!
//! Pool hygiene (DESIGN.md, "On the wire"):
//! - a connection is reused only after a whole answer that hyper framed without doubt; a
//!   HEAD, 204 or 304 answer (whose end the upstream may get wrong) and `Content-Length`
//!   beside `Transfer-Encoding` end their connection;
//! - idle connections live no longer than `server.upstream_keepalive` or the upstream's
//!   `Keep-Alive: timeout=`; a reaper task per thread polls them (outside any request's
//!   cooperative budget), so a close or stray bytes end them at once, and every checkout
//!   polls the connection once more;
//! - a request a reused connection did not take goes out on a new one; one that failed on
//!   it before any answer goes again on a new connection when nothing was written or it is
//!   idempotent ([`Replay`]); otherwise the caller learns it may have been sent.
//!
//! An HTTPS upstream that offers HTTP/2 (ALPN) gets one multiplexed connection per thread
//! and origin, driven by a task of its own on this thread (many requests share it); a
//! stream refused by `GOAWAY` or `REFUSED_STREAM` goes again on a new connection. A
//! streamed upload and a WebSocket handshake each get a new HTTP/1.1 connection driven by
//! a task of its own, not pooled.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
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

use super::body::UpBody;
use crate::common::keep_alive;

/// Idle connections kept per origin and thread.
const MAX_IDLE: usize = 256;
/// How often the reaper looks at idle connections besides when one of them wakes it.
const REAP_EVERY: Duration = Duration::from_secs(1);

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
    /// The exchange failed before any answer, on a connection that had served before
    /// (the upstream closed it as the request went out): the request may have reached the
    /// upstream, so it is not sent again with the same credential.
    #[error("the upstream closed a kept-alive connection before answering: {0}")]
    Stale(#[source] hyper::Error),
    /// The connection failed during the exchange.
    #[error("the upstream exchange failed: {0}")]
    Request(#[from] hyper::Error),
    #[error("not an http or https URL: {0}")]
    BadUri(String),
}

impl SendError {
    /// Whether the upstream never answered this request on a connection where that is
    /// expected now and then (could not connect, or a kept-alive connection closed under
    /// it): another credential may serve it.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. } | SendError::Stale(_))
    }
}

/// Builds the same request again (a buffered body is cheap to clone): `None` when it
/// cannot be (a streamed body went with the first one).
pub type Replay<'a> = &'a (dyn Fn() -> Option<http::Request<UpBody>> + Sync);

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
/// polled by the task using it (or by the reaper while it is idle).
struct H1 {
    send: http1::SendRequest<UpBody>,
    /// Boxed once per connection: the pool and the body move `H1`s around.
    io: Option<Pin<Box<http1::Connection<Io, UpBody>>>>,
    /// The upstream's `Keep-Alive: timeout=` from its last answer, less a margin.
    hint: Option<Duration>,
    /// Not used after this.
    until: Instant,
}

impl H1 {
    /// Polls the connection's I/O; false once it has ended (closed or failed).
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(io) = &mut self.io else {
            return false;
        };
        if io.as_mut().poll(cx).is_ready() {
            self.io = None;
            return false;
        }
        true
    }

    /// Whether this idle connection is still good: not expired, its I/O polled (a close
    /// or stray bytes end it), and ready for a request. Called outside any cooperative
    /// budget, so a spent budget cannot make a closed socket look quiet.
    fn alive(&mut self, now: Instant, cx: &mut Context<'_>) -> bool {
        if now >= self.until || !self.drive(cx) || self.send.is_closed() {
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
    /// One shared HTTP/2 connection per origin, with when it was last used.
    h2: Mutex<HashMap<Origin, (http2::SendRequest<UpBody>, Instant)>>,
    /// ALPN `h2`, `http/1.1`.
    tls: TlsConnector,
    /// ALPN `http/1.1` only (WebSocket upgrades).
    tls_h1: TlsConnector,
    overrides: Arc<HashMap<String, IpAddr>>,
    connect_timeout: Duration,
    /// `server.upstream_keepalive`: the longest an idle connection is kept.
    keepalive: Duration,
    /// Whether this thread's reaper task runs (started with the first idle connection).
    reaping: AtomicBool,
}

impl Connections {
    pub fn new(
        tls: rustls::ClientConfig,
        overrides: Arc<HashMap<String, IpAddr>>,
        connect_timeout: Duration,
        keepalive: Duration,
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
            keepalive,
            reaping: AtomicBool::new(false),
        })
    }

    /// Sends `req` (absolute URI) and returns the answer whose body drives the connection.
    /// `again` builds the request anew when it must go again on a new connection.
    pub async fn send(
        self: &Arc<Self>,
        req: http::Request<UpBody>,
        again: Replay<'_>,
    ) -> Result<http::Response<Driven>, SendError> {
        let origin = Origin::of(req.uri())?;
        if origin.tls {
            let shared = self.lock_h2().get_mut(&origin).map(|(h2, used)| {
                *used = Instant::now();
                h2.clone()
            });
            if let Some(h2) = shared {
                let idempotent = is_idempotent(req.method());
                match send_h2(h2, req).await {
                    Ok(resp) => return Ok(resp),
                    Err(e) => {
                        // A connection that is going away makes room for a new one (only
                        // this one: another request may have put a newer one there).
                        {
                            let mut shared = self.lock_h2();
                            if shared.get(&origin).is_some_and(|(c, _)| c.is_closed()) {
                                shared.remove(&origin);
                            }
                        }
                        let req = unsent_or_again(e, again, idempotent)?;
                        if matches!(req.body(), UpBody::Streamed(_)) {
                            return Box::pin(self.send_streamed(origin, req)).await;
                        }
                        return Box::pin(self.send_new(origin, req)).await;
                    }
                }
            }
        }
        if matches!(req.body(), UpBody::Streamed(_)) {
            // Boxed: a streamed upload is the rare case.
            return Box::pin(self.send_streamed(origin, req)).await;
        }
        let mut req = Some(req);
        while let Some(h1) = self.take_idle(&origin).await {
            let Some(r) = req.take() else { break };
            match self.exchange(origin.clone(), h1, r).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => {
                    if let Some(unsent) = e.take_message() {
                        // Closed before the request went out: another connection (built
                        // anew: the one handed back is already in origin form).
                        req = again().or(Some(unsent));
                        continue;
                    }
                    let e = e.into_error();
                    if !closed_before_answer(&e) {
                        // The upstream answered something hyper refused: not a race.
                        return Err(SendError::Request(e));
                    }
                    // Something may have been written: again only if that is harmless.
                    match again().filter(|r| is_idempotent(r.method())) {
                        Some(r) => req = Some(r),
                        None => return Err(SendError::Stale(e)),
                    }
                    break;
                }
            }
        }
        let req = match req.or_else(again) {
            Some(r) => r,
            None => return Err(origin.connect_error(io::Error::other("the request body is gone"))),
        };
        // Boxed: a new connection (and its TLS handshake) is the rare case.
        Box::pin(self.send_new(origin, req)).await
    }

    /// `req` on a new connection (HTTP/2 if the upstream offers it).
    async fn send_new(
        self: &Arc<Self>,
        origin: Origin,
        req: http::Request<UpBody>,
    ) -> Result<http::Response<Driven>, SendError> {
        match self.connect(&origin, true).await? {
            Fresh::H1(h1) => self
                .exchange(origin, h1, req)
                .await
                .map_err(|e| SendError::Request(e.into_error())),
            Fresh::H2(h2) => self.first_on_h2(origin, h2, req).await,
        }
    }

    /// The first request on a new HTTP/2 connection, which becomes the shared one to
    /// `origin` (reaped once idle too long).
    async fn first_on_h2(
        self: &Arc<Self>,
        origin: Origin,
        h2: http2::SendRequest<UpBody>,
        req: http::Request<UpBody>,
    ) -> Result<http::Response<Driven>, SendError> {
        self.lock_h2().insert(origin, (h2.clone(), Instant::now()));
        self.start_reaper();
        send_h2(h2, req)
            .await
            .map_err(|e| SendError::Request(e.into_error()))
    }

    /// A streamed upload, on a new HTTP/1.1 connection driven by a task of its own (its
    /// body is read while the answer may already be coming), or on the shared HTTP/2
    /// connection a new one offers.
    async fn send_streamed(
        self: &Arc<Self>,
        origin: Origin,
        req: http::Request<UpBody>,
    ) -> Result<http::Response<Driven>, SendError> {
        match self.connect(&origin, true).await? {
            Fresh::H1(h1) => Ok(spawned_h1(&origin, h1, req, false)
                .await?
                .map(Driven::plain)),
            Fresh::H2(h2) => self.first_on_h2(origin, h2, req).await,
        }
    }

    /// A WebSocket handshake on a new HTTP/1.1 connection that may be upgraded.
    pub async fn send_upgrade(
        &self,
        req: http::Request<UpBody>,
    ) -> Result<http::Response<Incoming>, SendError> {
        let origin = Origin::of(req.uri())?;
        let Fresh::H1(h1) = self.connect(&origin, false).await? else {
            return Err(origin.connect_error(io::Error::other("no HTTP/1.1 connection")));
        };
        spawned_h1(&origin, h1, req, true).await
    }

    /// One HTTP/1.1 exchange on `h1`, driven by this task until the response head; the
    /// body keeps driving it and returns it to the idle list when it ends, if it may be
    /// used again.
    async fn exchange(
        self: &Arc<Self>,
        origin: Origin,
        mut h1: H1,
        mut req: http::Request<UpBody>,
    ) -> Result<http::Response<Driven>, TrySendError<http::Request<UpBody>>> {
        origin_form(&mut req, &origin);
        let bodyless_by_method = req.method() == http::Method::HEAD;
        let mut answer = pin!(h1.send.try_send_request(req));
        let mut resp = poll_fn(|cx| {
            h1.drive(cx);
            answer.as_mut().poll(cx)
        })
        .await?;
        h1.hint = resp
            .headers()
            .get("keep-alive")
            .and_then(|v| v.to_str().ok())
            .and_then(keep_alive::timeout);
        let status = resp.status();
        let headers = resp.headers_mut();
        // Content-Length beside Transfer-Encoding (RFC 9112 §6.3): hyper reads the chunked
        // body; the stale length must not reach the client, and the connection ends.
        let ambiguous = headers.contains_key(http::header::TRANSFER_ENCODING)
            && headers.remove(http::header::CONTENT_LENGTH).is_some();
        // No body by status or method: an upstream that sends one anyway would have it
        // read as the next answer on this connection, so it is not used again.
        let keep = !(ambiguous
            || bodyless_by_method
            || status == http::StatusCode::NO_CONTENT
            || status == http::StatusCode::NOT_MODIFIED);
        let mut back = Some(Back {
            conns: Arc::clone(self),
            origin,
            h1,
            keep,
        });
        if resp.body().is_end_stream() {
            release(&mut back);
        }
        Ok(resp.map(|body| Driven { body, back }))
    }

    fn lock_h2(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Origin, (http2::SendRequest<UpBody>, Instant)>> {
        self.h2.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, HashMap<Origin, Vec<H1>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection to `origin` that is still good. Each is
    /// polled with a budget of its own (tokio's cooperative budget, once this task has
    /// spent it, would make a socket that holds a close or bytes read as quiet).
    async fn take_idle(&self, origin: &Origin) -> Option<H1> {
        let now = Instant::now();
        let take = |cx: &mut Context<'_>| {
            let mut idle = self.lock_idle();
            let list = idle.get_mut(origin)?;
            // The warmest first: the least likely to have been closed.
            while let Some(mut h1) = list.pop() {
                if h1.alive(now, cx) {
                    return Some(h1);
                }
            }
            None
        };
        tokio::task::unconstrained(poll_fn(|cx| Poll::Ready(take(cx)))).await
    }

    fn put_idle(self: &Arc<Self>, origin: Origin, mut h1: H1) {
        if h1.io.is_none() || h1.send.is_closed() {
            return;
        }
        let keep = h1.hint.map_or(self.keepalive, |h| h.min(self.keepalive));
        h1.until = Instant::now() + keep;
        let mut idle = self.lock_idle();
        let list = idle.entry(origin).or_default();
        if list.len() < MAX_IDLE {
            list.push(h1);
        }
        drop(idle);
        self.start_reaper();
    }

    /// Ends idle connections that expired, were closed by the upstream or received bytes
    /// nobody asked for. Each one's I/O registers `cx`, so such an event wakes the reaper.
    fn reap(&self, cx: &mut Context<'_>) {
        let now = Instant::now();
        // A shared HTTP/2 connection idle past the keep-alive bound, or closed, goes too.
        let keepalive = self.keepalive;
        self.lock_h2()
            .retain(|_, (h2, used)| !h2.is_closed() && now.duration_since(*used) < keepalive);
        self.lock_idle().retain(|_, list| {
            list.retain_mut(|h1| h1.alive(now, cx));
            !list.is_empty()
        });
    }

    /// The reaper of this thread's idle connections: a task that reaps on every wake (an
    /// idle connection's socket, or the timer) and ends with the pool.
    fn start_reaper(self: &Arc<Self>) {
        if self.reaping.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.reaping.store(false, Ordering::Relaxed);
            return;
        };
        let conns: Weak<Connections> = Arc::downgrade(self);
        let mut tick = tokio::time::interval(REAP_EVERY);
        runtime.spawn(tokio::task::unconstrained(poll_fn(move |cx| {
            let Some(conns) = conns.upgrade() else {
                return Poll::Ready(());
            };
            while tick.poll_tick(cx).is_ready() {}
            conns.reap(cx);
            Poll::Pending
        })));
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
            io: Some(Box::pin(conn)),
            hint: None,
            until: Instant::now(),
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

fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(method)
}

/// The request to send again after a shared HTTP/2 connection failed it: the one hyper
/// hands back when it never went out, else a new one when the stream was refused unread
/// (`GOAWAY` above its last stream id, `REFUSED_STREAM`: RFC 9113 §8.7).
fn unsent_or_again(
    mut e: TrySendError<http::Request<UpBody>>,
    again: Replay<'_>,
    idempotent: bool,
) -> Result<http::Request<UpBody>, SendError> {
    if let Some(req) = e.take_message() {
        return Ok(req);
    }
    let e = e.into_error();
    if refused_unread(&e) || (idempotent && closed_before_answer(&e)) {
        if let Some(req) = again() {
            return Ok(req);
        }
    }
    if closed_before_answer(&e) {
        // It may have reached the upstream: not again with the same credential.
        return Err(SendError::Stale(e));
    }
    Err(SendError::Request(e))
}

/// Whether an exchange failed for want of an answer (the connection closed, reset or
/// went away), not because the upstream's answer was refused (a parse error) or the
/// request's own body failed.
fn closed_before_answer(e: &hyper::Error) -> bool {
    !(e.is_parse()
        || e.is_parse_status()
        || e.is_parse_too_large()
        || e.is_user()
        || e.is_body_write_aborted()
        || e.is_timeout())
}

/// Whether an HTTP/2 stream was refused before the upstream processed it.
fn refused_unread(e: &hyper::Error) -> bool {
    let Some(h2) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>()) else {
        return false;
    };
    (h2.is_go_away() && h2.is_remote()) || h2.reason() == Some(h2::Reason::REFUSED_STREAM)
}

async fn send_h2(
    mut h2: http2::SendRequest<UpBody>,
    req: http::Request<UpBody>,
) -> Result<http::Response<Driven>, TrySendError<http::Request<UpBody>>> {
    let resp = h2.try_send_request(req).await?;
    Ok(resp.map(Driven::plain))
}

/// One request on a new HTTP/1.1 connection driven by a task of its own (which keeps it
/// for an upgrade when `upgrades`). Not pooled.
async fn spawned_h1(
    origin: &Origin,
    h1: H1,
    mut req: http::Request<UpBody>,
    upgrades: bool,
) -> Result<http::Response<Incoming>, SendError> {
    let H1 {
        mut send,
        io: Some(io),
        ..
    } = h1
    else {
        return Err(origin.connect_error(io::Error::other("the connection closed at once")));
    };
    tokio::spawn(async move {
        let io = Pin::into_inner(io);
        let _ = if upgrades {
            io.with_upgrades().await
        } else {
            io.await
        };
    });
    origin_form(&mut req, origin);
    send.send_request(req).await.map_err(SendError::Request)
}

/// HTTP/1.1 wants the path in the request line (`/` when the path is empty, also before
/// a query) and the authority in `Host`.
fn origin_form(req: &mut http::Request<UpBody>, origin: &Origin) {
    if req.uri().scheme().is_none() {
        return;
    }
    // hyper sends no length for an empty body; a POST without one is 411 at some front
    // ends (RFC 9110 §8.6: a user agent should send `Content-Length: 0` there).
    let bodyless_method = matches!(
        *req.method(),
        http::Method::GET | http::Method::HEAD | http::Method::DELETE | http::Method::OPTIONS
    ) || req.method() == http::Method::TRACE;
    if req.body().is_end_stream() && !bodyless_method {
        req.headers_mut()
            .entry(http::header::CONTENT_LENGTH)
            .or_insert(http::HeaderValue::from_static("0"));
    }
    if !req.headers().contains_key(http::header::HOST) {
        if let Ok(host) = http::HeaderValue::from_str(origin.authority.as_str()) {
            req.headers_mut().insert(http::header::HOST, host);
        }
    }
    let target = match req.uri().path_and_query() {
        Some(p) if p.as_str().starts_with('/') => Ok(p.clone()),
        Some(p) => format!("/{}", p.as_str()).parse(),
        None => Ok(http::uri::PathAndQuery::from_static("/")),
    };
    if let Ok(target) = target {
        *req.uri_mut() = http::Uri::from(target);
    }
}

/// The connection a response body drives, and where it goes back to when the body ends
/// (if it may be used again).
struct Back {
    conns: Arc<Connections>,
    origin: Origin,
    h1: H1,
    keep: bool,
}

fn release(back: &mut Option<Back>) {
    if let Some(b) = back.take() {
        if b.keep {
            b.conns.put_idle(b.origin, b.h1);
        }
    }
}

/// An upstream response body. An HTTP/1.1 one drives its connection while it is read
/// and returns the connection to the idle list at its end; dropped before its end, it
/// closes the connection (it is mid-message).
pub struct Driven {
    body: Incoming,
    back: Option<Back>,
}

impl Driven {
    /// A body with no pooled connection behind it.
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
                // Ended (closed or failed): whatever it delivered is read, then it is gone.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_path_goes_out_as_a_slash() {
        let origin = Origin::of(&"http://up.example:81".parse().unwrap()).unwrap();
        for (uri, target) in [
            ("http://up.example:81?alt=sse", "/?alt=sse"),
            ("http://up.example:81", "/"),
            ("http://up.example:81/v1/x?y=1", "/v1/x?y=1"),
        ] {
            let mut req = http::Request::new(UpBody::empty());
            *req.uri_mut() = uri.parse().unwrap();
            origin_form(&mut req, &origin);
            assert_eq!(req.uri().to_string(), target, "{uri}");
            assert_eq!(req.headers()["host"], "up.example:81");
        }
    }

    #[test]
    fn idempotent_methods_are_the_rfc_ones() {
        assert!(is_idempotent(&http::Method::GET));
        assert!(is_idempotent(&http::Method::PUT));
        assert!(!is_idempotent(&http::Method::POST));
        assert!(!is_idempotent(&http::Method::PATCH));
    }
}
