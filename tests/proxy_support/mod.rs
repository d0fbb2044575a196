//! Shared helpers for the proxy tests: scripted fake vLLM engines (hyper on 127.0.0.1:0) that
//! record every request, an HTTP client, and child-process guards.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// One scripted answer; when the script is empty the role's default applies.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    Json(u16, Value),
    /// SSE frames sent one by one with `gap` between them.
    Sse {
        frames: Vec<String>,
        gap: Duration,
    },
    /// Headers, then data frames forever (until the client goes away).
    Endless,
    /// Waits before answering with the default.
    Delay(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Role {
    /// llm-d's prefill mock contract (§12): 400 unless kv_transfer_params has the null keys.
    Prefill,
    /// Answers JSON (or SSE when `stream:true`) with cached_tokens 49.
    Decode,
}

pub struct Fake {
    pub addr: SocketAddr,
    pub url: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub script: Arc<Mutex<VecDeque<Reply>>>,
    /// Set when an `Endless` body was dropped by the peer (the proxy cancelled the leg).
    pub aborted: Arc<AtomicBool>,
}

impl Fake {
    pub async fn start(role: Role) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = Fake {
            addr,
            url: format!("http://{addr}"),
            seen: Default::default(),
            script: Default::default(),
            aborted: Default::default(),
        };
        let (seen, script, aborted) =
            (fake.seen.clone(), fake.script.clone(), fake.aborted.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let (seen, script, aborted) = (seen.clone(), script.clone(), aborted.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (seen, script, aborted) =
                            (seen.clone(), script.clone(), aborted.clone());
                        async move {
                            Ok::<_, Infallible>(answer(role, req, seen, script, aborted).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        fake
    }

    pub fn push(&self, r: Reply) {
        self.script.lock().unwrap().push_back(r);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: u16, ct: &str, b: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", ct)
        .body(Full::new(b.into()).boxed())
        .unwrap()
}

pub const PREFILL_OK: &str = r#"{"kv_transfer_params":{"remote_block_ids":[1,2,3],"remote_engine_id":"5b5fb28f-3f30-4bdd-9a36-958d52459200","remote_host":"ahost","remote_port":4032},"usage":{"prompt_tokens":64,"completion_tokens":1,"total_tokens":65,"prompt_tokens_details":{"cached_tokens":7}}}"#;

pub fn decode_sse_frames() -> Vec<String> {
    vec![
        "data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}],\"usage\":null}\n\n".into(),
        // The usage chunk arrives split inside its JSON.
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":64,\"completion_tokens\":1,".into(),
        "\"total_tokens\":65,\"prompt_tokens_details\":{\"cached_tokens\":49}}}\n\n".into(),
        "data: [DONE]\n\n".into(),
    ]
}

struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn answer(
    role: Role,
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
    aborted: Arc<AtomicBool>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let s = Seen {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    };
    seen.lock().unwrap().push(s.clone());
    let mut reply = script.lock().unwrap().pop_front();
    if let Some(Reply::Delay(d)) = reply {
        tokio::time::sleep(d).await;
        reply = None;
    }
    match reply {
        Some(Reply::Status(st)) => full(
            st,
            "application/json",
            format!(r#"{{"error":"scripted {st}"}}"#),
        ),
        Some(Reply::Json(st, v)) => full(st, "application/json", v.to_string()),
        Some(Reply::Sse { frames, gap }) => sse(frames, gap),
        Some(Reply::Endless) => {
            let flag = DropFlag(aborted);
            let s = stream::unfold(flag, |flag| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(
                        b"data: {\"choices\":[]}\n\n",
                    ))),
                    flag,
                ))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(s)))
                .unwrap()
        }
        Some(Reply::Delay(_)) | None => default_reply(role, &s),
    }
}

fn sse(frames: Vec<String>, gap: Duration) -> Response<Body> {
    let s = stream::unfold(frames.into_iter(), move |mut it| async move {
        let f = it.next()?;
        tokio::time::sleep(gap).await;
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(f))), it))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(BodyExt::boxed(StreamBody::new(s)))
        .unwrap()
}

fn default_reply(role: Role, s: &Seen) -> Response<Body> {
    if s.method != "POST" {
        return full(
            200,
            "application/json",
            json!({"object":"list","path":s.path}).to_string(),
        );
    }
    let Ok(body) = serde_json::from_slice::<Value>(&s.body) else {
        return full(400, "application/json", "{}");
    };
    match role {
        Role::Prefill => {
            let kv = &body["kv_transfer_params"];
            let ok = kv["do_remote_decode"] == true
                && kv["do_remote_prefill"] == false
                && [
                    "remote_engine_id",
                    "remote_block_ids",
                    "remote_host",
                    "remote_port",
                ]
                .iter()
                .all(|k| kv.get(*k) == Some(&Value::Null));
            if ok {
                full(200, "application/json", PREFILL_OK)
            } else {
                full(
                    400,
                    "application/json",
                    r#"{"error":"bad prefill request"}"#,
                )
            }
        }
        Role::Decode if s.path.starts_with("/v1/") && body["stream"] == true => {
            sse(decode_sse_frames(), Duration::from_millis(5))
        }
        Role::Decode => full(
            200,
            "application/json",
            json!({"id":"chatcmpl-test","object":"chat.completion","choices":[],
                   "usage":{"prompt_tokens":64,"completion_tokens":10,"total_tokens":74,
                            "prompt_tokens_details":{"cached_tokens":49}}})
            .to_string(),
        ),
    }
}

pub type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

pub async fn send(
    c: &TestClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c
        .request(b.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

pub async fn post(c: &TestClient, url: &str, body: Value) -> Answer {
    send(
        c,
        "POST",
        url,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

/// Polls `f` every 20 ms for up to 10 s.
pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A child process killed on drop.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn_pdctl(args: &[&str]) -> Child {
    Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_pdctl"))
            .args(args)
            .env("PDCTL_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start pdctl"),
    )
}

pub fn free_port() -> u16 {
    // The port is handed to a child process, which must bind it itself.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `url` answers `want`.
pub async fn wait_status(c: &TestClient, url: &str, want: u16) {
    for _ in 0..300 {
        let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), c.request(req)).await {
            if r.status().as_u16() == want {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    panic!("{url} never answered {want}");
}
