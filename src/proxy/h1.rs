//! tokenrelay's own HTTP/1.1 client side, for an upstream exchange whose request body is
//! in memory (every ordinary API call; a streamed upload goes through hyper).
//!
//! One buffer per connection: the request head and a small body go out in one write, the
//! response head is parsed in place (httparse) and its header values are slices of the
//! bytes read, and body data is handed on as slices of the same buffer. The response body
//! is framed as RFC 9112 §6.3 says, in this order: no body for `HEAD`, 1xx, 204 and 304;
//! `Transfer-Encoding` ending in `chunked`; one `Content-Length` (repeated only with the
//! same value, or the response is refused); otherwise until the upstream closes. A
//! connection is reused only if the response was whole, nothing followed it, neither side
//! asked to close, and its framing was unambiguous (`Content-Length` beside
//! `Transfer-Encoding` is answered but never reused: the two ends may disagree on where
//! the next response starts).

use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

use super::conns::Stream;

/// Response headers beyond this many are refused (as hyper's default).
const MAX_HEADERS: usize = 100;
/// A response head (or a chunk-size line, or the trailers) larger than this is refused.
const MAX_HEAD: usize = 64 * 1024;
/// A body up to this size goes out in the same write as the head.
const COALESCE: usize = 16 * 1024;
/// The first read of an exchange asks for this much; a read that fills its space doubles
/// the next, up to `MAX_READ`.
const FIRST_READ: usize = 4 * 1024;
const MAX_READ: usize = 64 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before the response was complete")]
    Closed,
    #[error("the upstream sent a malformed response: {0}")]
    Malformed(&'static str),
}

/// An HTTP/1.1 connection to an upstream and the bytes read from it but not yet used.
pub struct Conn {
    io: Stream,
    buf: BytesMut,
    next_read: usize,
}

/// A request as it goes on the wire: the head (with the body when it is small), then the
/// body if it is not. Kept until the exchange starts, so it can be sent again on another
/// connection if a pooled one fails to take it.
pub struct Wire {
    head: Vec<u8>,
    body: Option<Bytes>,
}

impl Wire {
    /// `method target HTTP/1.1`, `headers`, `Host` if `headers` has none, the length of
    /// `body` (none for an empty body of a method that has none), and `body`.
    pub fn new(
        method: &Method,
        target: &str,
        host: &str,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Wire {
        let body_len = body.len();
        let coalesce = body_len <= COALESCE;
        let mut out = Vec::with_capacity(
            128 + target.len() + 48 * headers.len() + if coalesce { body_len } else { 0 },
        );
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        if !headers.contains_key(header::HOST) {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(host.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        for (name, value) in headers {
            // The caller drops framing headers; these are the body's, written below.
            if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let bodiless = matches!(
            *method,
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
        );
        if body_len > 0 || !bodiless {
            // Writing to a Vec cannot fail.
            let _ = write!(out, "content-length: {body_len}\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if coalesce {
            out.extend_from_slice(body);
            return Wire {
                head: out,
                body: None,
            };
        }
        Wire {
            head: out,
            body: Some(body.clone()),
        }
    }
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
}

/// Where a chunked body's decoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// A parsed response head and what it says about the body and the connection.
pub struct Response {
    pub parts: http::response::Parts,
    pub body: Decoder,
}

/// The state of one response body: how it is framed, and whether the connection can take
/// another request after it.
pub struct Decoder {
    framing: Framing,
    reusable: bool,
}

impl Decoder {
    /// The body has no bytes left to read.
    pub fn is_end(&self) -> bool {
        self.framing == Framing::Empty
    }

    /// Exact when the body is length-delimited.
    pub fn size_hint(&self) -> hyper::body::SizeHint {
        match self.framing {
            Framing::Empty => hyper::body::SizeHint::with_exact(0),
            Framing::Length(n) => hyper::body::SizeHint::with_exact(n),
            _ => hyper::body::SizeHint::default(),
        }
    }
}

impl Conn {
    pub fn new(io: Stream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            next_read: FIRST_READ,
        }
    }

    /// Whether this connection can take another request after the body `d` describes:
    /// the body is whole, its framing allowed reuse, and nothing followed it.
    pub fn reusable_after(&self, d: &Decoder) -> bool {
        d.is_end() && d.reusable && self.buf.is_empty()
    }

    /// Ready to wait in the idle list: a buffer grown by a large answer is let go.
    pub fn into_idle(mut self) -> Conn {
        if self.buf.capacity() > 2 * FIRST_READ {
            self.buf = BytesMut::new();
        }
        self.next_read = FIRST_READ;
        self
    }

    /// Whether an idle connection can take a request: not closed by the upstream and with
    /// nothing unasked-for to read. Never waits.
    pub fn poll_usable(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 8];
        let mut probe = ReadBuf::new(&mut probe);
        // Pending: open and quiet. Anything else (end of stream, bytes, an error) ends it.
        matches!(
            Pin::new(&mut self.io).poll_read(cx, &mut probe),
            Poll::Pending
        )
    }

    /// Writes the request.
    pub async fn send(&mut self, wire: &Wire) -> io::Result<()> {
        self.io.write_all(&wire.head).await?;
        if let Some(body) = &wire.body {
            self.io.write_all(body).await?;
        }
        self.io.flush().await
    }

    /// Reads the response head (skipping interim 1xx answers). `head_request`: the request
    /// was `HEAD`, so no body follows whatever the headers say.
    pub async fn read_head(&mut self, head_request: bool) -> Result<Response, Error> {
        loop {
            if let Some(resp) = parse_head(&mut self.buf, head_request)? {
                return Ok(resp);
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(Error::Malformed("the response head exceeds 64KiB"));
            }
            if std::future::poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                return Err(Error::Closed);
            }
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < self.next_read / 2 {
            self.buf.reserve(self.next_read);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        if n == room {
            self.next_read = (self.next_read * 2).min(MAX_READ);
        }
        Poll::Ready(Ok(n))
    }

    /// The next piece of the body `d` describes: `None` at its end.
    pub fn poll_body(
        &mut self,
        d: &mut Decoder,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Error>>> {
        loop {
            match d.step(&mut self.buf) {
                Ok(Step::Data(bytes)) => return Poll::Ready(Some(Ok(bytes))),
                Ok(Step::End) => return Poll::Ready(None),
                Ok(Step::More) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) if d.framing == Framing::Close => {
                    d.framing = Framing::Empty;
                    return Poll::Ready(None);
                }
                Ok(0) => return Poll::Ready(Some(Err(Error::Closed))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(Error::Io(e)))),
            }
        }
    }
}

/// One complete head from the buffer, or `None` if more bytes are needed.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Response>, Error> {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut slots);
        let len = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::Malformed("more than 100 response headers"))
            }
            Err(_) => return Err(Error::Malformed("not an HTTP/1.1 response head")),
        };
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| Error::Malformed("the status code is not three digits"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::Malformed(
                "101 Switching Protocols was not asked for",
            ));
        }
        if status.is_informational() {
            // 100 Continue, 103 Early Hints: the final answer follows.
            buf.advance(len);
            continue;
        }
        let http10 = parsed.version == Some(0);
        // Where each header's name and value are in the buffer, to slice them out of
        // the frozen head without copying the values.
        let base = buf.as_ptr() as usize;
        let mut spans = Vec::with_capacity(parsed.headers.len());
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| Error::Malformed("a header name is not a token"))?;
            let start = h.value.as_ptr() as usize - base;
            spans.push((name, start, start + h.value.len()));
        }
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(spans.len());
        for (name, start, end) in spans {
            let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                .map_err(|_| Error::Malformed("a header value holds a control byte"))?;
            headers.append(name, value);
        }
        let body = decoder(head_request, status, http10, &mut headers)?;
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = status;
        parts.version = if http10 {
            http::Version::HTTP_10
        } else {
            http::Version::HTTP_11
        };
        parts.headers = headers;
        return Ok(Some(Response { parts, body }));
    }
}

enum Step {
    Data(Bytes),
    End,
    More,
}

impl Decoder {
    /// Takes what it can from `buf`.
    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, Error> {
        loop {
            match &mut self.framing {
                Framing::Empty => return Ok(Step::End),
                // Never 0: a zero length is `Empty`, and the last piece makes it so.
                Framing::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = (*left).min(buf.len() as u64);
                    *left -= n;
                    if *left == 0 {
                        // Known now: the connection can go back with the last piece.
                        self.framing = Framing::Empty;
                    }
                    return Ok(Step::Data(buf.split_to(n as usize).freeze()));
                }
                Framing::Close => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Framing::Chunked(chunk) => match *chunk {
                    Chunk::Size => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(Step::More);
                        };
                        let size = chunk_size(&line)?;
                        *chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return Ok(Step::More);
                        }
                        let n = left.min(buf.len() as u64);
                        *chunk = if n == left {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left - n)
                        };
                        return Ok(Step::Data(buf.split_to(n as usize).freeze()));
                    }
                    Chunk::DataEnd => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(Step::More);
                        };
                        if !line.is_empty() {
                            return Err(Error::Malformed("a chunk is longer than its size"));
                        }
                        *chunk = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        // Trailer fields are read and dropped (no API here sends any).
                        let Some(line) = take_line(buf)? else {
                            return Ok(Step::More);
                        };
                        if line.is_empty() {
                            self.framing = Framing::Empty;
                            return Ok(Step::End);
                        }
                    }
                },
            }
        }
    }
}

/// One line (without its CRLF, or a bare LF) from the front of `buf`, if it is all there.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, Error> {
    let Some(at) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_HEAD {
            return Err(Error::Malformed(
                "a chunk-size or trailer line exceeds 64KiB",
            ));
        }
        return Ok(None);
    };
    let mut line = buf.split_to(at + 1);
    line.truncate(at);
    if line.last() == Some(&b'\r') {
        line.truncate(at - 1);
    }
    Ok(Some(line))
}

/// The hexadecimal size at the start of a chunk-size line: digits, optional blanks, then
/// the end or `;` and extensions (ignored).
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line
        .iter()
        .position(|&b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = line[digits..].trim_ascii_start();
    let malformed = Error::Malformed("a chunk size is not a hexadecimal number");
    // 15 hex digits fit in a u64 with room to spare.
    if digits == 0 || digits > 15 || !(rest.is_empty() || rest[0] == b';') {
        return Err(malformed);
    }
    std::str::from_utf8(&line[..digits])
        .ok()
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or(malformed)
}

/// Whether a comma-separated header list holds `token` (case-insensitive).
fn lists(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// How a response is framed and whether its connection survives it (RFC 9112 §6.3, §9.3).
fn decoder(
    head_request: bool,
    status: StatusCode,
    http10: bool,
    headers: &mut HeaderMap,
) -> Result<Decoder, Error> {
    let mut reusable = if http10 {
        lists(headers, &header::CONNECTION, "keep-alive")
    } else {
        !lists(headers, &header::CONNECTION, "close")
    };
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Decoder {
            framing: Framing::Empty,
            reusable,
        });
    }
    let framing = if headers.contains_key(header::TRANSFER_ENCODING) {
        // The chunked length is the length: a stale `Content-Length` must not reach the
        // client beside a body of another size, nor the connection be trusted again.
        if headers.remove(header::CONTENT_LENGTH).is_some() {
            reusable = false;
        }
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
            .map(<[u8]>::trim_ascii);
        if last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")) && !http10 {
            Framing::Chunked(Chunk::Size)
        } else {
            reusable = false;
            Framing::Close
        }
    } else if headers.contains_key(header::CONTENT_LENGTH) {
        let mut length = None;
        for v in headers.get_all(header::CONTENT_LENGTH) {
            for part in v.as_bytes().split(|&b| b == b',') {
                let part = part.trim_ascii();
                let n = std::str::from_utf8(part)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(Error::Malformed("Content-Length is not a number"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Error::Malformed("two different Content-Length values"));
                }
                length = Some(n);
            }
        }
        match length {
            Some(0) | None => Framing::Empty,
            Some(n) => Framing::Length(n),
        }
    } else {
        reusable = false;
        Framing::Close
    };
    Ok(Decoder { framing, reusable })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `head`, then decodes the body arriving in `body`'s pieces: the body, and
    /// whether the connection could be reused after it.
    fn decode(head: &str, body: &[&[u8]]) -> Result<(Vec<u8>, bool), Error> {
        let mut buf = BytesMut::from(head.as_bytes());
        let Some(Response { body: mut d, .. }) = parse_head(&mut buf, false)? else {
            panic!("partial head");
        };
        let mut out = Vec::new();
        let mut pieces = body.iter();
        loop {
            match d.step(&mut buf)? {
                Step::Data(b) => out.extend_from_slice(&b),
                Step::End => return Ok((out, d.reusable && buf.is_empty())),
                Step::More => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None if d.framing == Framing::Close => return Ok((out, false)),
                    None => return Err(Error::Closed),
                },
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_across_every_split() {
        let wire: &[u8] = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n";
        for cut in 0..wire.len() {
            let (a, b) = wire.split_at(cut);
            let (body, reusable) = decode(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                &[a, b],
            )
            .unwrap();
            assert_eq!(body, b"hello, world", "cut at {cut}");
            assert!(reusable);
        }
    }

    #[test]
    fn length_close_and_empty_framing() {
        let (b, r) = decode(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            &[b"he", b"llo"],
        )
        .unwrap();
        assert_eq!((b.as_slice(), r), (&b"hello"[..], true));
        let (b, r) = decode("HTTP/1.1 200 OK\r\n\r\n", &[b"until", b" close"]).unwrap();
        assert_eq!((b.as_slice(), r), (&b"until close"[..], false));
        let (b, r) = decode("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n", &[]).unwrap();
        assert_eq!((b.len(), r), (0, true));
        let (_, r) = decode(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive, close\r\ncontent-length: 0\r\n\r\n",
            &[],
        )
        .unwrap();
        assert!(!r, "connection: close is honoured");
        let (_, r) = decode("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", &[]).unwrap();
        assert!(!r, "HTTP/1.0 closes unless it says keep-alive");
        let (_, r) = decode(
            "HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\ncontent-length: 2\r\n\r\n",
            &[b"ok"],
        )
        .unwrap();
        assert!(r, "the same length repeated is one length");
    }

    #[test]
    fn ambiguous_or_broken_framing_is_refused_or_never_reused() {
        for head in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
        ] {
            assert!(
                matches!(decode(head, &[b"hello!"]), Err(Error::Malformed(_))),
                "{head:?}"
            );
        }
        // Both: chunked wins and the connection is not reused.
        let (b, r) = decode(
            "HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n",
            &[b"2\r\nok\r\n0\r\n\r\n"],
        )
        .unwrap();
        assert_eq!((b.as_slice(), r), (&b"ok"[..], false));
        // A coding after chunked: read to the close.
        let (b, r) = decode(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            &[b"raw"],
        )
        .unwrap();
        assert_eq!((b.as_slice(), r), (&b"raw"[..], false));
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX\r\n",
            b"1234567890abcdef0\r\n",
        ] {
            assert!(
                matches!(
                    decode(
                        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                        &[bad]
                    ),
                    Err(Error::Malformed(_))
                ),
                "{bad:?}"
            );
        }
        // Cut short: an error, never a body that looks whole.
        assert!(matches!(
            decode("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", &[b"short"]),
            Err(Error::Closed)
        ));
        assert!(matches!(
            decode(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                &[b"5\r\nhel"]
            ),
            Err(Error::Closed)
        ));
    }

    #[test]
    fn random_bodies_never_panic_the_decoders() {
        let alphabet = b"0123456789abcdefxz;\r\n \t";
        for round in 0..20_000u32 {
            let len = (round % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rand::random::<u32>() as usize % alphabet.len()])
                .collect();
            let (a, b) = bytes.split_at(len / 3);
            for head in [
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                "HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n",
            ] {
                let _ = decode(head, &[a, b]);
            }
        }
    }

    #[tokio::test]
    async fn a_response_read_from_a_socket_skips_interim_answers_and_keeps_one_length() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, server) = tokio::join!(client, listener.accept());
        let (mut server, _) = server.unwrap();
        let mut conn = Conn::new(Stream::Plain(client.unwrap()));
        let answer = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-Up: v\r\n\
                      content-length: 99\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        // The answer arrives in two pieces, the cut inside the head.
        let (a, b) = answer.split_at(40);
        server.write_all(a.as_bytes()).await.unwrap();
        let reading = tokio::spawn(async move {
            let r = conn.read_head(false).await.map(|r| (r.parts, r.body));
            (conn, r)
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        server.write_all(b.as_bytes()).await.unwrap();
        let (mut conn, r) = reading.await.unwrap();
        let (parts, mut d) = r.unwrap();
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["x-up"], "v");
        assert!(!parts.headers.contains_key(header::CONTENT_LENGTH));
        let body = std::future::poll_fn(|cx| conn.poll_body(&mut d, cx)).await;
        assert_eq!(body.unwrap().unwrap(), "ok");
        assert!(std::future::poll_fn(|cx| conn.poll_body(&mut d, cx))
            .await
            .is_none());
        assert!(
            !conn.reusable_after(&d),
            "Content-Length beside chunked: never reused"
        );
        // An idle connection the upstream closed is not usable.
        drop(server);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!std::future::poll_fn(|cx| Poll::Ready(conn.poll_usable(cx))).await);
    }

    #[test]
    fn the_request_head_carries_host_and_the_bodys_length() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let post = Wire::new(
            &Method::POST,
            "/v1/x?y=1",
            "up:8080",
            &h,
            &Bytes::from("{}"),
        );
        assert_eq!(
            String::from_utf8(post.head).unwrap(),
            "POST /v1/x?y=1 HTTP/1.1\r\nhost: up:8080\r\nx-a: 1\r\ncontent-length: 2\r\n\r\n{}"
        );
        assert!(post.body.is_none(), "a small body goes in the same write");
        h.insert(header::HOST, HeaderValue::from_static("given"));
        let get = Wire::new(&Method::GET, "/", "up", &h, &Bytes::new());
        assert_eq!(
            String::from_utf8(get.head).unwrap(),
            "GET / HTTP/1.1\r\nx-a: 1\r\nhost: given\r\n\r\n"
        );
        let big = Bytes::from(vec![b'x'; COALESCE + 1]);
        let put = Wire::new(&Method::PUT, "/u", "up", &HeaderMap::new(), &big);
        assert!(String::from_utf8(put.head)
            .unwrap()
            .ends_with("content-length: 16385\r\n\r\n"));
        assert_eq!(put.body, Some(big));
    }
}
