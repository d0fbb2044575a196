//! The decode response on its way to the client: frames pass as they arrive (SSE usage lines
//! rewritten on the fly), and the request's bookkeeping ends when the last byte left — or the
//! client went away, which drops the upstream body and so aborts the decode at once.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::pick::InFlight;
use super::respond::{self, BoxError};
use super::sse::SseUsageRewriter;
use super::state::Proxy;
use super::upstream::{clean_response_headers, PooledBody};

/// Wraps an upstream response for the client (headers cleaned, stream relayed, accounted).
pub fn to_client(
    proxy: &Arc<Proxy>,
    upstream: Response<PooledBody>,
    event_stream: bool,
    rewrite: Option<SseUsageRewriter>,
    start: Instant,
    guards: Vec<InFlight>,
) -> Response<respond::Body> {
    let (mut parts, body) = upstream.into_parts();
    clean_response_headers(&mut parts.headers);
    if rewrite.is_some() {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let finish = Finish {
        proxy: proxy.clone(),
        start,
        completed: false,
        _in_flight: guards,
    };
    let body = Relay::new(body, event_stream, rewrite, finish);
    Response::from_parts(parts, BodyExt::boxed(body))
}

/// Ends a request's accounting: latency when it completes, a disconnect when dropped before.
struct Finish {
    proxy: Arc<Proxy>,
    start: Instant,
    completed: bool,
    _in_flight: Vec<InFlight>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        if self.completed {
            self.proxy
                .metrics
                .request_seconds
                .observe(self.start.elapsed().as_secs_f64());
        } else {
            self.proxy.metrics.client_disconnects.inc();
        }
    }
}

struct Relay {
    /// Taken away once the answer is complete for the client.
    inner: Option<PooledBody>,
    /// An OpenAI event stream: its `data: [DONE]` event is the answer's end.
    event_stream: bool,
    /// Set when the client must see the prefill's cached-token count.
    rewrite: Option<SseUsageRewriter>,
    finish: Option<Finish>,
    ended: bool,
}

impl Relay {
    fn new(
        inner: PooledBody,
        event_stream: bool,
        rewrite: Option<SseUsageRewriter>,
        finish: Finish,
    ) -> Self {
        Relay {
            inner: Some(inner),
            event_stream,
            rewrite,
            finish: Some(finish),
            ended: false,
        }
    }

    /// The answer is complete: whatever the rewriter still holds goes out last.
    fn end(&mut self) -> Bytes {
        self.ended = true;
        if let Some(mut finish) = self.finish.take() {
            finish.completed = true;
        }
        self.rewrite
            .as_mut()
            .map_or_else(Bytes::new, SseUsageRewriter::finish)
    }

    /// No partial line waits in the rewriter.
    fn holds_nothing(&self) -> bool {
        self.rewrite
            .as_ref()
            .is_none_or(SseUsageRewriter::holds_nothing)
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            let next = match this.inner.as_mut() {
                Some(inner) => ready!(Pin::new(inner).poll_frame(cx)),
                None => None,
            };
            match next {
                Some(Ok(frame)) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    };
                    let out = match &mut this.rewrite {
                        None => data,
                        Some(rewriter) => rewriter.push(data),
                    };
                    if out.is_empty() {
                        continue;
                    }
                    if this.event_stream && ends_with_done(&out) && this.holds_nothing() {
                        // The client's answer ends here, so hyper writes this chunk and the
                        // chunked terminator in one system call; the engine's own end of body
                        // (a separate hop through hyper's body channel) is read afterwards.
                        if let Some(inner) = this.inner.take() {
                            inner.finish_in_background(DRAIN_AFTER_DONE);
                        }
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Some(Err(e)) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                None => {
                    let rest = this.end();
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended {
            return SizeHint::with_exact(0);
        }
        match (&self.rewrite, &self.inner) {
            (None, Some(inner)) => inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

/// How long an engine may take to end its body after `data: [DONE]`.
const DRAIN_AFTER_DONE: Duration = Duration::from_secs(10);

fn ends_with_done(chunk: &[u8]) -> bool {
    chunk.ends_with(b"data: [DONE]\n\n") || chunk.ends_with(b"data: [DONE]\r\n\r\n")
}
