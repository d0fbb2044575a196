//! The decode response on its way to the client: frames pass as they arrive (SSE usage lines
//! rewritten on the fly), and the request's bookkeeping ends when the last byte left — or the
//! client went away, which drops the upstream body and so aborts the decode at once.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::pick::InFlight;
use super::server::{BoxError, Proxy};
use super::sse::SseUsageRewriter;
use super::upstream::PooledBody;

pub enum Rewrite {
    None,
    Sse(SseUsageRewriter),
}

/// Ends a request's accounting: latency when it completes, a disconnect when dropped before.
pub struct Finish {
    pub proxy: Arc<Proxy>,
    pub start: Instant,
    pub completed: bool,
    pub _in_flight: Vec<InFlight>,
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

pub struct Relay {
    inner: PooledBody,
    rewrite: Rewrite,
    finish: Option<Finish>,
    ended: bool,
}

impl Relay {
    pub fn new(inner: PooledBody, rewrite: Rewrite, finish: Finish) -> Self {
        Relay {
            inner,
            rewrite,
            finish: Some(finish),
            ended: false,
        }
    }

    fn complete(&mut self) {
        if let Some(mut finish) = self.finish.take() {
            finish.completed = true;
        }
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
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    };
                    let out = match &mut this.rewrite {
                        Rewrite::None => data,
                        Rewrite::Sse(rewriter) => rewriter.push(data),
                    };
                    if out.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Some(Err(e)) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                None => {
                    this.ended = true;
                    let rest = match &mut this.rewrite {
                        Rewrite::None => Bytes::new(),
                        Rewrite::Sse(rewriter) => rewriter.finish(),
                    };
                    this.complete();
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
        match self.rewrite {
            Rewrite::None => self.inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}
