//! Counting what an answer cost: its body is wrapped in `Metered`, which hands every frame
//! on at once (nothing is held back: an SSE event reaches the client as it arrives) after
//! showing it to a `Scanner`; when the body ends (or the client leaves), the usage found
//! is counted for the provider, model, client and credential, or the answer is counted as
//! one without usage.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::clients::Client;
use super::ledger::{Key, Ledger, Sums};
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
    /// none); its token limits are spent when the answer ends.
    pub client: Option<Arc<Client>>,
    /// The provider's counter of answers without usage, resolved once.
    pub unknown: prometheus::IntCounter,
}

impl Tally {
    /// Counts an answer that ended, with the usage it carried (if any): in the metrics,
    /// the client's limits and the ledger.
    pub fn count(&self, usage: Option<Usage>) {
        let now_ms = crate::clock::now_ms();
        let cred = &self.credential;
        let provider = &cred.provider.name;
        let client = self.client.as_ref().map_or("-", |c| &*c.name);
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
                if let Some(c) = &self.client {
                    c.spend(u.billed(), now_ms);
                }
            }
            None => self.unknown.inc(),
        }
        self.ledger.record(
            Key {
                minute: now_ms.div_euclid(60_000) * 60,
                client: Arc::clone(&counters.client),
                provider: Arc::clone(&counters.provider),
                model: Arc::clone(&counters.model),
                credential: resolved
                    .map_or_else(|| Arc::from(cred.id.as_str()), |(id, _)| Arc::clone(id)),
            },
            Sums::of(usage.as_ref()),
        );
    }
}

/// An answer's body, scanned for usage as it passes.
pub struct Metered<B> {
    inner: B,
    scanner: Scanner,
    /// Taken when counted (at the end, or on drop).
    tally: Option<Tally>,
}

impl<B> Metered<B> {
    pub fn new(inner: B, tally: Tally) -> Metered<B> {
        Metered {
            inner,
            scanner: Scanner::default(),
            tally: Some(tally),
        }
    }

    fn finish(&mut self) {
        if let Some(t) = self.tally.take() {
            t.count(self.scanner.last());
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
                    this.scanner.feed(data);
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
