//! The response body sent to clients: a buffered body, or the decode stream passed through
//! frame by frame (optionally with the SSE usage rewrite). It owns the decode leg's in-flight
//! guard, so the count lasts as long as the stream; dropping it (client gone) drops the
//! upstream body, which closes the upstream connection and makes vLLM abort the request.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use super::metrics::Metrics;
use super::pick::InFlight;
use super::sse::SseUsageRewriter;

pub struct RespBody {
    inner: Inner,
    _guard: Option<InFlight>,
    end: Option<EndHook>,
}

enum Inner {
    Full(Option<Bytes>),
    Stream {
        body: Incoming,
        sse: Option<SseUsageRewriter>,
    },
}

/// Records the end-to-end latency when the body completes, or a client disconnect when the
/// body is dropped before that.
struct EndHook {
    metrics: Arc<Metrics>,
    start: Instant,
    done: bool,
}

impl EndHook {
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.metrics
                .request_seconds
                .observe(self.start.elapsed().as_secs_f64());
        }
    }
}

impl Drop for EndHook {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.client_disconnects.inc();
        }
    }
}

impl RespBody {
    pub fn full(b: impl Into<Bytes>) -> RespBody {
        RespBody {
            inner: Inner::Full(Some(b.into())),
            _guard: None,
            end: None,
        }
    }

    pub fn empty() -> RespBody {
        RespBody {
            inner: Inner::Full(None),
            _guard: None,
            end: None,
        }
    }

    pub fn stream(body: Incoming, sse: Option<SseUsageRewriter>) -> RespBody {
        RespBody {
            inner: Inner::Stream { body, sse },
            _guard: None,
            end: None,
        }
    }

    pub fn tracked(mut self, guard: InFlight, metrics: Arc<Metrics>, start: Instant) -> RespBody {
        self._guard = Some(guard);
        let mut end = EndHook {
            metrics,
            start,
            done: false,
        };
        if let Inner::Full(_) = self.inner {
            // hyper may never poll a known-length body again after its one frame.
            end.finish();
        }
        self.end = Some(end);
        self
    }

    fn finished(&mut self) {
        if let Some(e) = &mut self.end {
            e.finish();
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let (body, sse) = match &mut this.inner {
            Inner::Full(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream { body, sse } => (body, sse),
        };
        loop {
            match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                Some(Ok(frame)) => match (frame.into_data(), sse.as_mut()) {
                    (Ok(data), Some(rw)) => {
                        let out = rw.push(data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    (Ok(data), None) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    (Err(frame), _) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => {
                    if let Some(end) = &this.end {
                        end.metrics.upstream_error("decode", "io");
                    }
                    this.finished();
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    let rest = sse.as_mut().and_then(SseUsageRewriter::finish);
                    this.finished();
                    return Poll::Ready(rest.map(|b| Ok(Frame::data(b))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Stream { body, sse: None } => body.is_end_stream(),
            Inner::Stream { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Stream { body, sse: None } => body.size_hint(),
            Inner::Stream { .. } => SizeHint::default(),
        }
    }
}
