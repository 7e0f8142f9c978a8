//! The request body that goes upstream: buffered (replayable on another credential or
//! connection) or streamed (an upload, sent once).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// A request body going upstream: buffered (replayable on another credential or a new
/// connection) or streamed (an upload larger than `server.max_request_body`, sent once).
pub enum UpBody {
    Buffered(Option<Bytes>),
    Streamed(axum::body::Body),
}

impl UpBody {
    pub fn buffered(bytes: Bytes) -> UpBody {
        UpBody::Buffered(Some(bytes))
    }

    pub fn empty() -> UpBody {
        UpBody::Buffered(None)
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        match self.get_mut() {
            UpBody::Buffered(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            UpBody::Streamed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Buffered(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            UpBody::Streamed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            UpBody::Streamed(body) => body.size_hint(),
        }
    }
}
