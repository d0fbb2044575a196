//! Talking to engines: one pooled hyper-util client (keep-alive, TCP_NODELAY, connect timeout)
//! and the header hygiene of a reverse proxy.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

pub fn client(connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(connector)
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
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Response<Incoming>, Failure> {
    match tokio::time::timeout(timeout, client.request(request)).await {
        Err(_) => Err(Failure::Timeout),
        Ok(Err(e)) if e.is_connect() => Err(Failure::Connect),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "upstream transport error");
            Err(Failure::Transport)
        }
        Ok(Ok(response)) => Ok(response),
    }
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
    let uri: Uri = format!("http://{authority}{path_and_query}")
        .parse()
        .unwrap_or_else(|_| Uri::from_static("http://invalid./"));
    let mut request = Request::new(Full::new(body.clone()));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    for (name, value) in client_headers {
        if forwardable(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
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

/// Drops hop-by-hop headers from an upstream response before it goes to the client.
pub fn clean_response_headers(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_end_to_end_headers_only() {
        let mut client = HeaderMap::new();
        client.insert("authorization", HeaderValue::from_static("Bearer k"));
        client.insert("connection", HeaderValue::from_static("keep-alive"));
        client.insert("x-prefiller-host-port", HeaderValue::from_static("evil:1"));
        client.insert("x-request-id", HeaderValue::from_static("client-id"));
        client.insert("host", HeaderValue::from_static("proxy"));
        let r = build(
            Method::POST,
            "127.0.0.1:9",
            "/v1/completions?x=1",
            &client,
            "shared-id",
            Bytes::from_static(b"{}"),
        );
        assert_eq!(r.uri(), "http://127.0.0.1:9/v1/completions?x=1");
        let h = r.headers();
        assert_eq!(h["authorization"], "Bearer k");
        assert_eq!(h["x-request-id"], "shared-id");
        assert_eq!(h["content-length"], "2");
        assert!(h.get("connection").is_none() && h.get("host").is_none());
        assert!(h.get(PREFILLER_HEADER).is_none());
    }
}
