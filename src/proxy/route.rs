//! One request at the proxy's door: local answers (health, metrics), the API key, the body
//! limit, then the P/D exchange (`pd.rs`) or a decode passthrough.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::budget::Reservation;
use super::metrics::PathTaken;
use super::pd::{self, client_request_id};
use super::respond::{error, respond, Body, BoxError};
use super::rewrite::Api;
use super::security::authorized;
use super::state::{Health, Proxy, Worker};
use super::upstream::UpstreamClient;

pub async fn handle(
    proxy: Arc<Proxy>,
    worker: Arc<Worker>,
    req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    worker.refresh(&proxy);
    let engines = &worker.client;
    let path = req.uri().path().to_string();
    if req.method() == Method::GET && path == "/health" {
        return health(&proxy);
    }
    if let Some(refused) = check_route(&proxy, req.method(), &path) {
        return refused;
    }
    // Metrics name every engine: behind the key too, unless `metrics_public` says otherwise.
    let metrics_path = path == "/metrics" || path == "/pdctl/metrics";
    let open = metrics_path && proxy.cfg.section.metrics_public;
    if let Some(key) = proxy.cfg.api_key.as_ref().filter(|_| !open) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !authorized(given, key) {
            proxy.count("auth", StatusCode::UNAUTHORIZED, PathTaken::Local);
            return error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
        }
    }
    match (req.method(), path.as_str()) {
        (&Method::GET, "/pdctl/metrics") => return metrics(&proxy),
        (&Method::GET, "/metrics") if proxy.serves_metrics_at_root() => return metrics(&proxy),
        _ => {}
    }
    let limit = proxy.cfg.section.max_body_bytes;
    // A declared length over the limit is refused before a byte of the body is read (and before
    // hyper answers `Expect: 100-continue`); bodies without one are cut off by `Limited`.
    if declared_length(&req).is_some_and(|length| length > limit) {
        return too_large(&proxy, limit);
    }
    // Held until the response head exists: retries and the decode leg still use the body.
    let budget = proxy.clone();
    let mut held = budget.bodies.reserve();
    let declared = declared_length(&req);
    if declared.is_some_and(|length| !held.grow(length)) {
        return over_budget(&proxy);
    }
    let (parts, body) = req.into_parts();
    let read = match declared {
        Some(_) => Limited::new(body, limit as usize)
            .collect()
            .await
            .map(|collected| collected.to_bytes()),
        None => read_undeclared(Limited::new(body, limit as usize), &mut held).await,
    };
    let body = match read {
        Ok(body) => body,
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(&proxy, limit),
        Err(e) if e.is::<OverBudget>() => return over_budget(&proxy),
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")),
    };
    // Until a response exists, a client that goes away drops this future (and with it the
    // prefill leg): count that here, the response body counts it afterwards.
    let gone = ClientGone(Some(proxy.clone()));
    let response = match Api::from_path(&path) {
        Some(api) if parts.method == Method::POST => {
            pd::handle(proxy, engines, parts, body, api, start).await
        }
        _ => passthrough(proxy, engines, parts, body, start).await,
    };
    gone.disarm();
    response
}

fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[derive(Debug, thiserror::Error)]
#[error("the proxy's budget for buffered request bodies is spent")]
struct OverBudget;

/// A body without `Content-Length` (chunked) takes its share of the budget frame by frame.
async fn read_undeclared(
    mut body: Limited<Incoming>,
    held: &mut Reservation<'_>,
) -> Result<Bytes, BoxError> {
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if !held.grow(data.len() as u64) {
                return Err(OverBudget.into());
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}

fn over_budget(proxy: &Proxy) -> Response<Body> {
    proxy.count("body", StatusCode::SERVICE_UNAVAILABLE, PathTaken::Local);
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many request bodies are being received at once; retry shortly",
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    response
}

fn too_large(proxy: &Proxy, limit: u64) -> Response<Body> {
    proxy.count("body", StatusCode::PAYLOAD_TOO_LARGE, PathTaken::Local);
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request body is larger than {limit} bytes"),
    )
}

/// 404 for a path the proxy does not serve, 405 (with `Allow`) for a method it does not take
/// there: vLLM's admin endpoints (`/reset_prefix_cache`, `/sleep`, …) stay off the public port.
fn check_route(proxy: &Proxy, method: &Method, path: &str) -> Option<Response<Body>> {
    let Some(allowed) = proxy.allowed_methods(path) else {
        proxy.count("route", StatusCode::NOT_FOUND, PathTaken::Local);
        return Some(error(
            StatusCode::NOT_FOUND,
            &format!("no route for {path}"),
        ));
    };
    if allowed.is_empty() || allowed.split(", ").any(|m| m == method.as_str()) {
        return None;
    }
    proxy.count("route", StatusCode::METHOD_NOT_ALLOWED, PathTaken::Local);
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("{method} is not allowed on {path} (allowed: {allowed})"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, http::HeaderValue::from_static(allowed));
    Some(response)
}

struct ClientGone(Option<Arc<Proxy>>);

impl ClientGone {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for ClientGone {
    fn drop(&mut self) {
        if let Some(proxy) = &self.0 {
            proxy.metrics.client_disconnects.inc();
        }
    }
}

fn health(proxy: &Proxy) -> Response<Body> {
    match proxy.health() {
        Health::Ready => respond(StatusCode::OK, "application/json", Bytes::new()),
        Health::NotReady { prefill, decode } => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "not ready: {prefill} ready prefill and {decode} ready decode endpoints (need at least one each)"
            ),
        ),
    }
}

fn metrics(proxy: &Proxy) -> Response<Body> {
    respond(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        Bytes::from(proxy.metrics.render()),
    )
}

/// Anything that is not a P/D request goes to a decode engine unchanged.
async fn passthrough(
    proxy: Arc<Proxy>,
    engines: &UpstreamClient,
    parts: http::request::Parts,
    body: Bytes,
    start: Instant,
) -> Response<Body> {
    let request_id = client_request_id(&parts.headers).unwrap_or_else(|| proxy.request_id());
    pd::to_decode(
        proxy,
        engines,
        &parts,
        body,
        &request_id,
        pd::DecodeLeg {
            route: "passthrough",
            path: PathTaken::Passthrough,
            cached_tokens: None,
            prefix: None,
            start,
        },
    )
    .await
}
