//! Talking to engines: keep-alive HTTP/1.1 connections (hyper's connection API, TCP_NODELAY,
//! connect timeout) pooled per proxy worker, and the header hygiene of a reverse proxy.
//!
//! Each worker thread owns one `UpstreamClient`, so a pool is never shared between threads; a
//! connection goes back to its pool when its answer has been read to the end. hyper-util's
//! pooled client did the same with a lock, a SipHash map and extra futures per request, which
//! cost about a sixth of the proxy's CPU.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Idle connections older than this are closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per engine; more are closed when they come back.
const MAX_IDLE_PER_ENGINE: usize = 1024;

#[derive(Clone)]
pub struct UpstreamClient {
    pool: Arc<Pool>,
}

struct Pool {
    connect_timeout: Duration,
    /// Idle connections by engine authority; a handful of engines, so a list beats a map.
    idle: Mutex<Vec<(String, Vec<Idle>)>>,
}

struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

pub fn client(connect_timeout: Duration) -> UpstreamClient {
    UpstreamClient {
        pool: Arc::new(Pool {
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        }),
    }
}

impl Pool {
    fn take(&self, authority: &str) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let (_, list) = idle.iter_mut().find(|(a, _)| a == authority)?;
        while let Some(conn) = list.pop() {
            if conn.since.elapsed() < IDLE_TIMEOUT && !conn.sender.is_closed() {
                return Some(conn.sender);
            }
        }
        None
    }

    fn put(&self, authority: &str, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conn = Idle {
            sender,
            since: Instant::now(),
        };
        match idle.iter_mut().find(|(a, _)| a == authority) {
            Some((_, list)) if list.len() < MAX_IDLE_PER_ENGINE => list.push(conn),
            Some(_) => {}
            None => idle.push((authority.to_string(), vec![conn])),
        }
    }

    async fn connect(&self, authority: &str) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(authority))
            .await
            .map_err(|_| Failure::Connect)?
            .map_err(|e| {
                tracing::debug!(%authority, error = %e, "engine connect failed");
                Failure::Connect
            })?;
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Failure::Connect)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "engine connection ended");
            }
        });
        Ok(sender)
    }
}

impl UpstreamClient {
    /// Sends `request` (origin-form URI, `Host` set; see [`build`]) to `authority` on an idle
    /// connection, or a new one. A pooled connection that turns out closed before the request
    /// was written is dropped and the request tried on the next one, so an engine's keep-alive
    /// timeout never fails a request.
    pub async fn request(
        &self,
        authority: &str,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<PooledBody>, Failure> {
        loop {
            let (mut sender, fresh) = match self.pool.take(authority) {
                Some(sender) => (sender, false),
                None => (self.pool.connect(authority).await?, true),
            };
            if sender.ready().await.is_err() {
                if fresh {
                    return Err(Failure::Connect);
                }
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (head, body) = response.into_parts();
                    let body = PooledBody {
                        inner: body,
                        give_back: Some(GiveBack {
                            pool: self.pool.clone(),
                            authority: authority.to_string(),
                            sender,
                        }),
                    };
                    return Ok(Response::from_parts(head, body));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => request = unsent,
                    _ => {
                        tracing::debug!(error = %e.error(), %authority, "engine exchange failed");
                        return Err(Failure::Transport);
                    }
                },
            }
        }
    }
}

/// An engine's answer body; its connection returns to the pool once the body has ended (one
/// dropped earlier closes its connection instead: hyper cannot reuse it).
pub struct PooledBody {
    inner: Incoming,
    give_back: Option<GiveBack>,
}

struct GiveBack {
    pool: Arc<Pool>,
    authority: String,
    sender: SendRequest<Full<Bytes>>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if frame.is_none() {
            if let Some(back) = self.give_back.take() {
                back.pool.put(&back.authority, back.sender);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl PooledBody {
    /// Reads what is left of the answer on a task of its own, so its connection can go back to
    /// the pool, while the caller is already done with it. An engine that does not end the
    /// body within `limit` loses the connection instead.
    pub fn finish_in_background(mut self, limit: Duration) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let _ = tokio::time::timeout(limit, async {
                while let Some(Ok(_)) = self.frame().await {}
            })
            .await;
        });
    }
}

/// Why an upstream exchange failed before a response head arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Connect,
    Timeout,
    Transport,
}

impl Failure {
    pub fn kind(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Transport => "transport",
        }
    }
}

pub async fn send(
    client: &UpstreamClient,
    authority: &str,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Response<PooledBody>, Failure> {
    tokio::time::timeout(timeout, client.request(authority, request))
        .await
        .unwrap_or(Err(Failure::Timeout))
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Routing headers that must never reach an engine.
pub const PREFILLER_HEADER: &str = "x-prefiller-host-port";

pub fn build(
    method: Method,
    authority: &str,
    path_and_query: &str,
    client_headers: &HeaderMap,
    request_id: &str,
    body: Bytes,
) -> Request<Full<Bytes>> {
    // Origin form: the connection already goes to the engine.
    let uri = Uri::try_from(path_and_query).unwrap_or_else(|_| Uri::from_static("/"));
    let mut request = Request::new(Full::new(body.clone()));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    let has_connection = client_headers.contains_key(header::CONNECTION);
    for (name, value) in client_headers {
        if forwardable(name) && !(has_connection && named_in_connection(client_headers, name)) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    if let Ok(host) = HeaderValue::from_str(authority) {
        headers.insert(header::HOST, host);
    }
    request
}

fn forwardable(name: &HeaderName) -> bool {
    let n = name.as_str();
    !(HOP_BY_HOP.contains(&n)
        || n == "host"
        || n == "content-length"
        || n == "x-request-id"
        || n == PREFILLER_HEADER)
}

/// RFC 9110 §7.6.1: a header the sender lists in `Connection` is hop-by-hop too. Only called when
/// a `Connection` header is present; no allocation.
fn named_in_connection(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|value| {
        value.to_str().is_ok_and(|listed| {
            listed
                .split(',')
                .any(|option| option.trim().eq_ignore_ascii_case(name.as_str()))
        })
    })
}

/// Drops hop-by-hop headers (with those named in `Connection`) from an upstream response before
/// it goes to the client.
pub fn clean_response_headers(headers: &mut HeaderMap) {
    // Engines rarely send any: one pass over the few names present beats nine hashed removals.
    if !headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(&name.as_str()))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|option| HeaderName::from_bytes(option.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_response_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        clean_response_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["content-type"], "application/json");

        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert(
            "connection",
            HeaderValue::from_static("close, X-Engine-Secret"),
        );
        h.insert("x-engine-secret", HeaderValue::from_static("s"));
        clean_response_headers(&mut h);
        assert_eq!(h.len(), 1);
    }

    fn post_to_engine(
        path: &str,
        client: &HeaderMap,
        id: &str,
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        build(Method::POST, "127.0.0.1:9", path, client, id, body)
    }

    #[test]
    fn headers_named_in_connection_are_not_forwarded() {
        let mut client = HeaderMap::new();
        client.append(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        client.append("connection", HeaderValue::from_static("x-other"));
        client.insert("x-secret", HeaderValue::from_static("s"));
        client.insert("x-other", HeaderValue::from_static("o"));
        client.insert("x-kept", HeaderValue::from_static("k"));
        let r = post_to_engine("/v1/completions", &client, "id", Bytes::new());
        let h = r.headers();
        assert!(h.get("x-secret").is_none());
        assert!(h.get("x-other").is_none());
        assert_eq!(h["x-kept"], "k");
    }

    #[test]
    fn forwards_end_to_end_headers_only() {
        let mut client = HeaderMap::new();
        client.insert("authorization", HeaderValue::from_static("Bearer k"));
        client.insert("connection", HeaderValue::from_static("keep-alive"));
        client.insert("x-prefiller-host-port", HeaderValue::from_static("evil:1"));
        client.insert("x-request-id", HeaderValue::from_static("client-id"));
        client.insert("host", HeaderValue::from_static("proxy"));
        let r = post_to_engine(
            "/v1/completions?x=1",
            &client,
            "shared-id",
            Bytes::from_static(b"{}"),
        );
        assert_eq!(r.uri(), "/v1/completions?x=1");
        assert_eq!(r.headers()["host"], "127.0.0.1:9");
        let h = r.headers();
        assert_eq!(h["authorization"], "Bearer k");
        assert_eq!(h["x-request-id"], "shared-id");
        assert_eq!(h["content-length"], "2");
        assert!(h.get("connection").is_none());
        assert!(h.get(PREFILLER_HEADER).is_none());
    }
}
