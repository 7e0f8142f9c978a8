//! Counting what an answer cost: its body is wrapped in `Metered`, which hands every frame
//! on at once (nothing is held back: an SSE event reaches the client as it arrives) after
//! showing it to a `Scanner`; when the body ends (or the client leaves), the usage found
//! is counted for the provider, model, client and credential, or the answer is counted as
//! one without usage.
//!
//! An answer the upstream compressed (`gzip`, `deflate`: SDKs ask for them) is inflated
//! beside the stream, a frame at a time, for the scanner only: the client gets the
//! upstream's bytes as they came. At most `MAX_INFLATED` bytes are inflated per answer;
//! beyond that, or for another encoding, or on an inflate error, the answer counts as one
//! without usage.

use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::clients::Hold;
use super::ledger::{sums_of, Key, Ledger, Sums};
use super::scan::{Scanner, Usage};
use crate::lifecycle::Credential;
use crate::telemetry::metrics::Metrics;

/// The request's model, or the body to read it from when the answer turns out to carry
/// usage (most answers without usage never need it).
pub enum ModelOf {
    Known(String),
    InBody(Bytes),
}

impl ModelOf {
    fn name(&self) -> String {
        match self {
            ModelOf::Known(m) => m.clone(),
            ModelOf::InBody(b) => {
                crate::providers::request_model("", b).unwrap_or_else(|| "other".to_string())
            }
        }
    }
}

/// Who and what an answer is counted for.
pub struct Tally {
    pub metrics: Arc<Metrics>,
    pub ledger: Arc<Ledger>,
    /// The credential that served the answer (and its provider).
    pub credential: Arc<Credential>,
    /// The request's model.
    pub model: ModelOf,
    /// The named client that sent the request (its name labels the tokens, `-` for
    /// none) and its held estimate: settled with the tokens when the answer ends.
    pub hold: Option<Hold>,
    /// The provider's counter of answers without usage, resolved once.
    pub unknown: prometheus::IntCounter,
    /// Whether the request asked for generation (its answer should carry usage): one
    /// without readable usage then spends its estimate; another (count tokens, embed)
    /// spends nothing.
    pub generation: bool,
}

impl Tally {
    /// Counts an answer that ended, with the usage it carried (if any): in the metrics,
    /// the client's limits and the ledger.
    pub fn count(mut self, usage: Option<Usage>) {
        let now_ms = crate::clock::now_ms();
        // Tokens spent on an estimate (no readable usage): kept in the row too, so that a
        // restart restores them.
        let mut estimated = 0;
        let cred = &self.credential;
        let provider = &cred.provider.name;
        let client = self.hold.as_ref().map_or("-", |h| &*h.client().name);
        let counters = self
            .metrics
            .usage_counters(provider, &self.model.name(), client);
        // A credential that left the pool keeps no series (none is created for it).
        let retired = cred.is_retired();
        let resolved = if retired {
            cred.usage.get()
        } else {
            Some(cred.usage.get_or_init(|| {
                (
                    Arc::from(cred.id.as_str()),
                    self.metrics.credential_token_counters(provider, &cred.id),
                )
            }))
        };
        match &usage {
            Some(u) => {
                let n = [u.prompt, u.completion, u.cached, u.thoughts];
                for (i, n) in n.into_iter().enumerate() {
                    counters.kinds[i].inc_by(n);
                    if let Some((_, by_credential)) = resolved.filter(|_| !retired) {
                        by_credential[i].inc_by(n);
                    }
                }
                if let Some(h) = self.hold.take() {
                    h.settle(u.billed(), now_ms);
                }
            }
            None => {
                self.unknown.inc();
                if let Some(h) = self.hold.take() {
                    if self.generation {
                        estimated = h.tokens();
                        h.settle_unknown(now_ms);
                    } else {
                        h.settle(0, now_ms);
                    }
                }
            }
        }
        let sums = sums_of(usage.as_ref());
        self.ledger.record(
            Key {
                minute: now_ms.div_euclid(60_000) * 60,
                client: Arc::clone(&counters.client),
                provider: Arc::clone(&counters.provider),
                model: Arc::clone(&counters.model),
                credential: resolved
                    .map_or_else(|| Arc::from(cred.id.as_str()), |(id, _)| Arc::clone(id)),
            },
            Sums {
                tokens: sums.tokens.max(estimated),
                ..sums
            },
        );
    }
}

/// The most bytes inflated from one compressed answer (a bound on what a decompression
/// bomb costs: CPU, never memory).
const MAX_INFLATED: u64 = 64 << 20;

/// How an answer's body is encoded, from its `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    /// HTTP's `deflate`: zlib-wrapped.
    Deflate,
    /// One tokenrelay does not inflate (`br`, `zstd`, several).
    Other,
}

impl Encoding {
    pub fn of(headers: &http::HeaderMap) -> Encoding {
        let mut values = headers.get_all(http::header::CONTENT_ENCODING).iter();
        let (Some(v), None) = (values.next(), values.next()) else {
            return if headers.contains_key(http::header::CONTENT_ENCODING) {
                Encoding::Other
            } else {
                Encoding::Identity
            };
        };
        match v.to_str().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            Ok("" | "identity") => Encoding::Identity,
            Ok("gzip" | "x-gzip") => Encoding::Gzip,
            Ok("deflate") => Encoding::Deflate,
            _ => Encoding::Other,
        }
    }
}

/// Where inflated bytes go: the scanner, counted.
struct Inflated {
    scanner: Scanner,
    bytes: u64,
}

impl std::io::Write for Inflated {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes += buf.len() as u64;
        if self.bytes > MAX_INFLATED {
            return Err(std::io::Error::other("inflated past MAX_INFLATED"));
        }
        self.scanner.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What reads an answer's bytes for usage.
enum Reader {
    Plain(Scanner),
    Gzip(Box<flate2::write::GzDecoder<Inflated>>),
    Deflate(Box<flate2::write::ZlibDecoder<Inflated>>),
    /// Could not be read (inflate error, too large): no usage.
    Broken,
}

impl Reader {
    fn new(encoding: Encoding) -> Reader {
        let sink = || Inflated {
            scanner: Scanner::default(),
            bytes: 0,
        };
        match encoding {
            Encoding::Identity => Reader::Plain(Scanner::default()),
            Encoding::Gzip => Reader::Gzip(Box::new(flate2::write::GzDecoder::new(sink()))),
            Encoding::Deflate => Reader::Deflate(Box::new(flate2::write::ZlibDecoder::new(sink()))),
            Encoding::Other => Reader::Broken,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        let ok = match self {
            Reader::Plain(s) => {
                s.feed(data);
                true
            }
            Reader::Gzip(d) => d.write_all(data).is_ok(),
            Reader::Deflate(d) => d.write_all(data).is_ok(),
            Reader::Broken => true,
        };
        if !ok {
            *self = Reader::Broken;
        }
    }

    /// The usage found (once the answer ended: what is buffered is inflated first).
    fn last(&mut self) -> Option<Usage> {
        match self {
            Reader::Plain(s) => s.last(),
            Reader::Gzip(d) => {
                let _ = d.try_finish();
                d.get_ref().scanner.last()
            }
            Reader::Deflate(d) => {
                let _ = d.try_finish();
                d.get_ref().scanner.last()
            }
            Reader::Broken => None,
        }
    }
}

/// An answer's body, scanned for usage as it passes.
pub struct Metered<B> {
    inner: B,
    reader: Reader,
    /// Taken when counted (at the end, or on drop).
    tally: Option<Tally>,
}

impl<B> Metered<B> {
    pub fn new(inner: B, tally: Tally, encoding: Encoding) -> Metered<B> {
        Metered {
            inner,
            reader: Reader::new(encoding),
            tally: Some(tally),
        }
    }

    fn finish(&mut self) {
        if let Some(t) = self.tally.take() {
            t.count(self.reader.last());
        }
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        // A client that left mid-answer: what was seen is what is counted.
        self.finish();
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.reader.feed(data);
                }
            }
            Poll::Ready(None) => this.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_is_read_from_one_content_encoding() {
        let of = |values: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append(http::header::CONTENT_ENCODING, v.parse().unwrap());
            }
            Encoding::of(&h)
        };
        assert_eq!(of(&[]), Encoding::Identity);
        assert_eq!(of(&["identity"]), Encoding::Identity);
        assert_eq!(of(&["GZIP"]), Encoding::Gzip);
        assert_eq!(of(&["x-gzip"]), Encoding::Gzip);
        assert_eq!(of(&["deflate"]), Encoding::Deflate);
        assert_eq!(of(&["br"]), Encoding::Other);
        assert_eq!(of(&["gzip, br"]), Encoding::Other);
        assert_eq!(of(&["gzip", "gzip"]), Encoding::Other);
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_bound_and_reads_as_no_usage() {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(MAX_INFLATED >> 20) + 1 {
            gz.write_all(&zeros).unwrap();
        }
        gz.write_all(br#"{"usage":{"prompt_tokens":1}}"#).unwrap();
        let bomb = gz.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        let mut r = Reader::new(Encoding::Gzip);
        for piece in bomb.chunks(16 << 10) {
            r.feed(piece);
        }
        assert!(matches!(r, Reader::Broken));
        assert_eq!(r.last(), None);
    }
}
