//! The scriptable fake vLLM engine: records every request it gets and answers as a prefill or a
//! decode engine would (llm-d's mock contract), unless the test scripted something else. It
//! runs on a thread of its own, so sync tests, the embedded proxy and child processes can all
//! talk to it; it stops when dropped.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status with `{"error":"scripted STATUS"}`.
    Status(u16),
    Json(u16, Value),
    /// Event-stream frames sent one by one with `gap` before each.
    Sse {
        frames: Vec<String>,
        gap: Duration,
    },
    /// Headers, then data frames until the client goes away (then `aborted` is set).
    Endless,
    /// Waits, then answers as the role does.
    Delay(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Role {
    /// 400 unless `kv_transfer_params` has the shape a P/D proxy must send to a prefill;
    /// otherwise [`prefill_answer`] with cached_tokens 7.
    Prefill,
    /// JSON, or an event stream when a `/v1/` request says `"stream": true`; cached_tokens 49.
    Decode,
}

/// Decides the answer to request number `n` (from 0); `None` leaves it to the role.
pub type Script = dyn Fn(usize, &Seen) -> Option<Reply> + Send + Sync;

pub struct Fake {
    pub addr: SocketAddr,
    pub port: u16,
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    queue: Arc<Mutex<VecDeque<Reply>>>,
    /// Set when an `Endless` answer was dropped by the peer (the proxy cancelled the leg).
    pub aborted: Arc<AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fake {
    pub fn start(role: Role) -> Fake {
        Fake::scripted(role, |_, _| None)
    }

    /// An engine whose answers `script` decides first; replies queued with [`Fake::push`] come
    /// before both.
    pub fn scripted(
        role: Role,
        script: impl Fn(usize, &Seen) -> Option<Reply> + Send + Sync + 'static,
    ) -> Fake {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, queue, aborted) = (Arc::default(), Arc::default(), Arc::default());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let state = State {
            role,
            seen: Arc::clone(&seen),
            queue: Arc::clone(&queue),
            aborted: Arc::clone(&aborted),
            script: Arc::new(script),
        };
        let thread = super::on_own_runtime(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tokio::select! {
                _ = stopped => {}
                _ = accept_forever(listener, state) => {}
            }
        });
        Fake {
            addr,
            port: addr.port(),
            url: format!("http://{addr}"),
            seen,
            queue,
            aborted,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Queues a one-off answer for the next request.
    pub fn push(&self, reply: Reply) {
        self.queue.lock().unwrap().push_back(reply);
    }

    pub fn clear_queue(&self) {
        self.queue.lock().unwrap().clear();
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn was_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a prefill answers: NixlConnector's parameters (and a field no proxy knows, which must
/// reach the decode verbatim) and usage with `cached` prompt tokens found in its cache.
pub fn prefill_answer(cached: u64) -> Value {
    json!({"kv_transfer_params": {"remote_block_ids": [1, 2, 3],
             "remote_engine_id": "5b5fb28f-3f30-4bdd-9a36-958d52459200", "remote_host": "ahost",
             "remote_port": 4032, "future_field": {"kept": true}},
           "usage": {"prompt_tokens": 64, "completion_tokens": 1, "total_tokens": 65,
                     "prompt_tokens_details": {"cached_tokens": cached}}})
}

/// What a decode streams: a token, the usage chunk split inside its JSON, and `[DONE]`.
pub fn decode_sse_frames() -> Vec<String> {
    vec![
        "data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}],\"usage\":null}\n\n".into(),
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":64,\"completion_tokens\":1,".into(),
        "\"total_tokens\":65,\"prompt_tokens_details\":{\"cached_tokens\":49}}}\n\n".into(),
        "data: [DONE]\n\n".into(),
    ]
}

#[derive(Clone)]
struct State {
    role: Role,
    seen: Arc<Mutex<Vec<Seen>>>,
    queue: Arc<Mutex<VecDeque<Reply>>>,
    aborted: Arc<AtomicBool>,
    script: Arc<Script>,
}

async fn accept_forever(listener: tokio::net::TcpListener, state: State) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn answer(state: &State, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let seen = Seen {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    };
    let n = {
        let mut log = state.seen.lock().unwrap();
        log.push(seen.clone());
        log.len() - 1
    };
    let queued = state.queue.lock().unwrap().pop_front();
    let mut reply = queued.or_else(|| (state.script)(n, &seen));
    if let Some(Reply::Delay(d)) = reply {
        tokio::time::sleep(d).await;
        reply = None;
    }
    match reply {
        Some(Reply::Status(status)) => full(status, format!(r#"{{"error":"scripted {status}"}}"#)),
        Some(Reply::Json(status, v)) => full(status, v.to_string()),
        Some(Reply::Sse { frames, gap }) => sse(frames, gap),
        Some(Reply::Endless) => {
            let flag = DropFlag(Arc::clone(&state.aborted));
            let frames = stream::unfold(flag, |flag| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let frame = Frame::data(Bytes::from_static(b"data: {\"choices\":[]}\n\n"));
                Some((Ok::<_, Infallible>(frame), flag))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(frames)))
                .unwrap()
        }
        Some(Reply::Delay(_)) | None => by_role(state.role, &seen),
    }
}

fn sse(frames: Vec<String>, gap: Duration) -> Response<Body> {
    let frames = stream::unfold(frames.into_iter(), move |mut it| async move {
        let frame = it.next()?;
        tokio::time::sleep(gap).await;
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(frame))), it))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .unwrap()
}

fn by_role(role: Role, seen: &Seen) -> Response<Body> {
    if seen.method != "POST" {
        return full(
            200,
            json!({"object": "list", "path": seen.path}).to_string(),
        );
    }
    let Ok(body) = serde_json::from_slice::<Value>(&seen.body) else {
        return full(400, "{}");
    };
    match role {
        Role::Prefill => {
            let kv = &body["kv_transfer_params"];
            let nulls = [
                "remote_engine_id",
                "remote_block_ids",
                "remote_host",
                "remote_port",
            ];
            let ok = kv["do_remote_decode"] == true
                && kv["do_remote_prefill"] == false
                && nulls.iter().all(|k| kv.get(*k) == Some(&Value::Null));
            if ok {
                full(200, prefill_answer(7).to_string())
            } else {
                full(400, r#"{"error":"bad prefill request"}"#)
            }
        }
        Role::Decode if seen.path.starts_with("/v1/") && body["stream"] == true => {
            sse(decode_sse_frames(), Duration::from_millis(5))
        }
        Role::Decode => full(
            200,
            json!({"id": "chatcmpl-test", "object": "chat.completion", "choices": [],
                   "usage": {"prompt_tokens": 64, "completion_tokens": 10, "total_tokens": 74,
                             "prompt_tokens_details": {"cached_tokens": 49}}})
            .to_string(),
        ),
    }
}
