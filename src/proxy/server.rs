//! The data path: the hyper server, routing, the prefill and decode legs.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::body::RespBody;
use super::endpoints::{Endpoint, EndpointSet};
use super::metrics::{Metrics, ReasonLabels};
use super::pd::{self, Api, PrefillResult};
use super::pick::{Backend, InFlight, Pool, Snapshot};
use super::policy::{decide, Decision, Failure};
use super::security::{self, Allowlist};
use super::ProxyError;
use crate::spec::proxy::{PickPolicy, ProxySection};

pub type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// Marks how a response was produced: `pd`, `decode-only`, `fallback` or `passthrough`.
pub const PATH_HEADER: &str = "x-pdctl-path";
/// On a fallback, why the prefill leg was skipped (`connect`, `status`, `timeout`, ...).
pub const FALLBACK_HEADER: &str = "x-pdctl-fallback";
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Prefill responses are small JSON; anything larger is not a vLLM prefill.
const MAX_PREFILL_RESPONSE: usize = 16 << 20;
const MAX_DECODE_JSON: usize = 256 << 20;

/// Who picks the prefill leg.
#[derive(Debug, Clone)]
pub enum Mode {
    /// pdctl picks both legs from the endpoint set (embedded, `pdctl proxy`).
    Pool,
    /// llm-d sidecar: the decode set is the local engine; the prefill comes from
    /// `x-prefiller-host-port`, checked against `allowlist` when SSRF protection is on.
    Sidecar {
        allowlist: Option<Allowlist>,
        sample: bool,
    },
}

/// Everything the proxy needs besides the endpoints.
#[derive(Debug, Clone)]
pub struct Settings {
    pub section: ProxySection,
    pub api_key: Option<Vec<u8>>,
    pub mode: Mode,
    /// How long in-flight requests may take to finish after shutdown.
    pub drain_grace: Duration,
    pub load_scrape_every: Duration,
}

impl Settings {
    pub fn new(section: ProxySection, mode: Mode) -> Settings {
        Settings {
            section,
            api_key: None,
            mode,
            drain_grace: Duration::from_secs(30),
            load_scrape_every: Duration::from_secs(1),
        }
    }
}

pub fn client(section: &ProxySection) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(section.connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(1024)
        .build(http)
}

struct Proxy {
    s: Settings,
    client: UpstreamClient,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    id_prefix: String,
    next_id: AtomicU64,
    sample: AtomicUsize,
}

/// Serves until `shutdown`, then drains for at most `drain_grace`.
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    mut endpoints: watch::Receiver<EndpointSet>,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    let metrics = Arc::new(Metrics::default());
    let first = rebuild(
        &endpoints.borrow_and_update(),
        &Snapshot::default(),
        &metrics,
    );
    let (snap_tx, snap_rx) = watch::channel(Arc::new(first));
    {
        let metrics = metrics.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = endpoints.changed() => if changed.is_err() { return },
                }
                let next = rebuild(&endpoints.borrow_and_update(), &snap_tx.borrow(), &metrics);
                snap_tx.send_replace(Arc::new(next));
            }
        });
    }
    let client = client(&settings.section);
    let sec = &settings.section;
    if sec.prefill_policy == PickPolicy::LoadAware || sec.decode_policy == PickPolicy::LoadAware {
        super::load::spawn(
            client.clone(),
            snap_rx.clone(),
            settings.load_scrape_every,
            shutdown.child_token(),
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let drain_grace = settings.drain_grace;
    let proxy = Arc::new(Proxy {
        s: settings,
        client,
        snapshot: snap_rx,
        metrics,
        id_prefix: format!("pdctl-{:x}{:x}", now.as_micros(), std::process::id()),
        next_id: AtomicU64::new(0),
        sample: AtomicUsize::new(0),
    });
    info!(addr = ?listener.local_addr().ok(), "proxy listening");

    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            acc = listener.accept() => match acc {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let p = proxy.clone();
        let svc = hyper::service::service_fn(move |req| {
            let p = p.clone();
            async move { Ok::<_, Infallible>(p.handle(req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let fut = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = fut.await {
                debug!(error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    if timeout(drain_grace, graceful.shutdown()).await.is_err() {
        warn!(grace = ?drain_grace, "in-flight requests still running after the drain grace; closing");
    }
    Ok(())
}

fn rebuild(set: &EndpointSet, prev: &Snapshot, metrics: &Metrics) -> Snapshot {
    let (snap, bad) = Snapshot::build(set, prev, metrics);
    for b in bad {
        warn!(error = %b, "endpoint skipped");
    }
    info!(
        prefill = snap.prefill.backends.len(),
        decode = snap.decode.backends.len(),
        "endpoint set"
    );
    snap
}

/// vLLM's error body (protocol.md §8).
pub fn error(status: StatusCode, kind: &str, message: &str) -> Response<RespBody> {
    let body = serde_json::json!({
        "object": "error", "message": message, "type": kind, "param": "", "code": status.as_u16(),
    });
    let mut r = Response::new(RespBody::full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn failure_response(f: Failure, leg: &str) -> Response<RespBody> {
    match f {
        Failure::Connect => error(
            StatusCode::BAD_GATEWAY,
            "BadGateway",
            &format!("{leg} endpoint unreachable"),
        ),
        Failure::Timeout => error(
            StatusCode::GATEWAY_TIMEOUT,
            "GatewayTimeout",
            &format!("{leg} leg timed out"),
        ),
        Failure::Io => error(
            StatusCode::BAD_GATEWAY,
            "BadGateway",
            &format!("{leg} response could not be read"),
        ),
        Failure::BadResponse => error(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            &format!("{leg} response is not JSON"),
        ),
        Failure::Status(s) => error(s, "BadGateway", &format!("{leg} answered {s}")),
    }
}

fn is_hop_or_internal(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "content-length"
            | "x-request-id"
            | security::PREFILLER_HEADER
            | security::PREFILLER_URL_HEADER
            | security::ENCODER_HEADER
    )
}

fn strip_hop_headers(h: &mut HeaderMap) {
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
    ] {
        h.remove(n);
    }
}

enum PrefillError {
    Respond(Box<Response<RespBody>>),
    Fallback(&'static str),
}

/// One leg's request, rebuilt for each try (bodies are `Bytes`, so clones are refcounts).
struct Leg<'a> {
    method: &'a Method,
    pq: &'a PathAndQuery,
    headers: &'a HeaderMap,
    body: Bytes,
}

impl Leg<'_> {
    fn request(&self, b: &Backend) -> Request<Full<Bytes>> {
        let mut r = Request::new(Full::new(self.body.clone()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = b.uri(self.pq);
        *r.headers_mut() = self.headers.clone();
        r
    }
}

impl Proxy {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<RespBody> {
        let start = Instant::now();
        if req.method() == Method::GET {
            match req.uri().path() {
                "/health" => return self.health(),
                "/metrics" => return self.metrics_response(),
                _ => {}
            }
        }
        let api = if req.method() == Method::POST {
            Api::from_path(req.uri().path())
        } else {
            None
        };
        // A client that goes away drops this future: the guard counts it.
        let mut pending = Pending {
            metrics: &self.metrics,
            done: false,
        };
        let (resp, path) = self.route(req, api, start).await;
        pending.done = true;
        let route = api.map_or("other", Api::label);
        self.metrics.request(route, resp.status().as_u16(), path);
        resp
    }

    fn health(&self) -> Response<RespBody> {
        let snap = self.snapshot.borrow().clone();
        let ok = match self.s.mode {
            // llm-d answers locally; the engine's own probe covers the engine.
            Mode::Sidecar { .. } => true,
            Mode::Pool => !snap.prefill.is_empty() && !snap.decode.is_empty(),
        };
        if ok {
            Response::new(RespBody::empty())
        } else {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                &format!(
                    "no ready prefill/decode pair (prefill: {}, decode: {})",
                    snap.prefill.backends.len(),
                    snap.decode.backends.len()
                ),
            )
        }
    }

    fn metrics_response(&self) -> Response<RespBody> {
        let mut r = Response::new(RespBody::full(self.metrics.encode()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        r
    }

    fn request_id(&self, h: &HeaderMap) -> HeaderValue {
        if let Some(v) = h.get(REQUEST_ID) {
            return v.clone();
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n:x}", self.id_prefix)).expect("ascii id")
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        api: Option<Api>,
        start: Instant,
    ) -> (Response<RespBody>, &'static str) {
        let (parts, body) = req.into_parts();
        if let Some(key) = &self.s.api_key {
            if !security::api_key_ok(key, &parts.headers) {
                let r = error(
                    StatusCode::UNAUTHORIZED,
                    "AuthenticationError",
                    "invalid API key",
                );
                return (r, "local");
            }
        }
        let body = match read_body(body, &parts, self.s.section.max_body_bytes).await {
            Ok(b) => b,
            Err(r) => return (r, "local"),
        };
        let rid = self.request_id(&parts.headers);
        let mut headers = HeaderMap::with_capacity(parts.headers.len() + 1);
        for (k, v) in &parts.headers {
            if !is_hop_or_internal(k) {
                headers.append(k.clone(), v.clone());
            }
        }
        headers.insert(REQUEST_ID, rid.clone());
        let root = PathAndQuery::from_static("/");
        let pq = parts.uri.path_and_query().unwrap_or(&root);
        let snap = self.snapshot.borrow().clone();
        let ctx = Ctx {
            snap: &snap,
            rid: &rid,
            start,
        };
        let leg = |body| Leg {
            method: &parts.method,
            pq,
            headers: &headers,
            body,
        };

        let Some(api) = api else {
            let r = self
                .decode(&ctx, leg(body), None, "passthrough", 0, None)
                .await;
            return (r, "passthrough");
        };

        // Which prefill, if any.
        let mut prefill_first: Option<Arc<Backend>> = None;
        let mut adhoc = Pool::default();
        match &self.s.mode {
            Mode::Sidecar { allowlist, sample } => {
                let n = sample.then(|| self.sample.fetch_add(1, Ordering::Relaxed));
                let Some(target) = security::prefill_target(&parts.headers, n) else {
                    let r = self
                        .decode(&ctx, leg(body), None, "passthrough", 0, None)
                        .await;
                    return (r, "passthrough");
                };
                if let Some(a) = allowlist {
                    if !a.allows(&target) {
                        warn!(%target, "prefill target refused by SSRF protection");
                        let r = error(
                            StatusCode::FORBIDDEN,
                            "Forbidden",
                            "Forbidden: prefill target not allowed by SSRF protection",
                        );
                        return (r, "local");
                    }
                }
                let hostport = target.strip_prefix("http://").unwrap_or(&target);
                let ep = Endpoint {
                    id: hostport.to_string(),
                    url: format!("http://{hostport}"),
                };
                match Backend::new(&ep, Default::default()) {
                    Ok(b) => adhoc = Pool::new(vec![Arc::new(b)]),
                    Err(e) => {
                        let r = error(StatusCode::BAD_GATEWAY, "BadGateway", &e.to_string());
                        return (r, "local");
                    }
                }
            }
            Mode::Pool => {
                // A scheduler may name the prefill; only a known endpoint is honoured.
                if let Some(t) = security::prefill_target(&parts.headers, None) {
                    let hostport = t.strip_prefix("http://").unwrap_or(&t);
                    prefill_first = snap.prefill.find_authority(hostport).cloned();
                }
            }
        }
        let prefill_pool = if adhoc.is_empty() {
            &snap.prefill
        } else {
            &adhoc
        };

        let json: Map<String, Value> = match serde_json::from_slice(&body) {
            Ok(Value::Object(m)) => m,
            _ => {
                let r = error(
                    StatusCode::BAD_REQUEST,
                    "BadRequestError",
                    "request body is not a JSON object",
                );
                return (r, "local");
            }
        };
        let sec = &self.s.section;
        let affinity = if sec.decode_policy == PickPolicy::PrefixAffinity
            || sec.prefill_policy == PickPolicy::PrefixAffinity
        {
            pd::prompt_prefix_hash(api, &json)
        } else {
            0
        };
        if sec.pd_threshold_tokens > 0
            && pd::estimate_prompt_tokens(api, &json) < u64::from(sec.pd_threshold_tokens)
        {
            let r = self
                .decode(&ctx, leg(body), None, "decode-only", affinity, None)
                .await;
            return (r, "decode_only");
        }

        let pbody = Bytes::from(pd::prefill_body(api, &json, body.len()));
        match self
            .prefill(prefill_pool, prefill_first, leg(pbody), affinity)
            .await
        {
            Ok(p) => {
                if p.kv_transfer_params.is_null() {
                    self.metrics.prefill_without_kv.inc();
                    warn!(request_id = ?rid, "prefill returned no kv_transfer_params; decode will recompute the prompt");
                }
                let dbody = Bytes::from(pd::decode_body(&json, &p.kv_transfer_params, body.len()));
                let cached = p.cached_tokens.unwrap_or(0);
                let r = self
                    .decode(&ctx, leg(dbody), Some(cached), "pd", affinity, None)
                    .await;
                (r, "pd")
            }
            Err(PrefillError::Respond(r)) => (*r, "pd"),
            Err(PrefillError::Fallback(reason)) => {
                self.metrics
                    .fallbacks
                    .get_or_create(&ReasonLabels { reason })
                    .inc();
                warn!(request_id = ?rid, reason, "prefill failed; serving decode-only");
                let r = self
                    .decode(&ctx, leg(body), None, "fallback", affinity, Some(reason))
                    .await;
                (r, "fallback")
            }
        }
    }

    async fn prefill(
        &self,
        pool: &Pool,
        first: Option<Arc<Backend>>,
        leg: Leg<'_>,
        affinity: u64,
    ) -> Result<PrefillResult, PrefillError> {
        let sec = &self.s.section;
        let started = Instant::now();
        let mut tried: Vec<Arc<Backend>> = Vec::new();
        let mut next = first;
        for attempt in 0u32.. {
            let excluded: Vec<&Arc<Backend>> = tried.iter().collect();
            // Each retry goes to a different ready prefill while there is one.
            let backend = next
                .take()
                .or_else(|| pool.pick(sec.prefill_policy, affinity, &excluded))
                .or_else(|| pool.pick(sec.prefill_policy, affinity, &[]));
            let Some(backend) = backend else {
                return Err(
                    if sec.prefill_failure == crate::spec::proxy::PrefillFailurePolicy::Fallback {
                        PrefillError::Fallback("no_prefill")
                    } else {
                        PrefillError::Respond(Box::new(error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "ServiceUnavailable",
                            "no ready prefill endpoint",
                        )))
                    },
                );
            };
            let guard = InFlight::new(&backend);
            let req = leg.request(&backend);
            let outcome = timeout(sec.prefill_timeout, async {
                let resp = self.client.request(req).await.map_err(|e| {
                    if e.is_connect() {
                        Failure::Connect
                    } else {
                        Failure::Io
                    }
                })?;
                let (parts, body) = resp.into_parts();
                let bytes = Limited::new(body, MAX_PREFILL_RESPONSE)
                    .collect()
                    .await
                    .map_err(|_| Failure::Io)?
                    .to_bytes();
                Ok((parts, bytes))
            })
            .await
            .unwrap_or(Err(Failure::Timeout));
            drop(guard);
            let (failure, upstream) = match outcome {
                Ok((parts, bytes)) if parts.status.is_success() => {
                    match pd::parse_prefill(&bytes) {
                        Ok(r) => {
                            self.metrics
                                .prefill_seconds
                                .observe(started.elapsed().as_secs_f64());
                            return Ok(r);
                        }
                        Err(_) => (Failure::BadResponse, None),
                    }
                }
                Ok((parts, bytes)) => (Failure::Status(parts.status), Some((parts, bytes))),
                Err(f) => (f, None),
            };
            self.metrics.upstream_error("prefill", failure.kind());
            let decision = decide(
                sec.prefill_failure,
                failure,
                attempt,
                sec.prefill_max_retries,
                sec.prefill_retry_backoff,
            );
            warn!(endpoint = %backend.id, attempt, failure = failure.kind(), ?decision, "prefill leg failed");
            match decision {
                Decision::Retry(wait) => {
                    self.metrics.prefill_retries.inc();
                    tokio::time::sleep(wait).await;
                    tried.push(backend);
                }
                Decision::Fallback => return Err(PrefillError::Fallback(failure.kind())),
                Decision::Fail => {
                    // The prefill's own error (status, headers, body) goes to the client.
                    let r = match upstream {
                        Some((mut parts, bytes)) => {
                            strip_hop_headers(&mut parts.headers);
                            parts.headers.remove(header::CONTENT_LENGTH);
                            Response::from_parts(parts, RespBody::full(bytes))
                        }
                        None => failure_response(failure, "prefill"),
                    };
                    return Err(PrefillError::Respond(Box::new(r)));
                }
            }
        }
        unreachable!("the retry loop returns")
    }

    async fn decode(
        &self,
        ctx: &Ctx<'_>,
        leg: Leg<'_>,
        cached: Option<u64>,
        path: &'static str,
        affinity: u64,
        fallback: Option<&'static str>,
    ) -> Response<RespBody> {
        let sec = &self.s.section;
        let mut tried: Vec<Arc<Backend>> = Vec::new();
        loop {
            let excluded: Vec<&Arc<Backend>> = tried.iter().collect();
            let Some(backend) = ctx.snap.decode.pick(sec.decode_policy, affinity, &excluded) else {
                return if tried.is_empty() {
                    error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        "no ready decode endpoint",
                    )
                } else {
                    error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        "The decode node is not ready. Please check that the vLLM service is running and the port configuration is correct.",
                    )
                };
            };
            let guard = InFlight::new(&backend);
            let req = leg.request(&backend);
            let resp = match timeout(sec.decode_first_byte_timeout, self.client.request(req)).await
            {
                Err(_) => {
                    self.metrics.upstream_error("decode", "timeout");
                    return failure_response(Failure::Timeout, "decode");
                }
                Ok(Err(e)) if e.is_connect() => {
                    // Nothing reached the client yet: another decode may take it.
                    self.metrics.upstream_error("decode", "connect");
                    warn!(endpoint = %backend.id, error = %e, "decode connect failed");
                    self.metrics.decode_retries.inc();
                    tried.push(backend);
                    continue;
                }
                Ok(Err(e)) => {
                    self.metrics.upstream_error("decode", "io");
                    warn!(endpoint = %backend.id, error = %e, "decode leg failed");
                    return failure_response(Failure::Io, "decode");
                }
                Ok(Ok(r)) => r,
            };
            self.metrics
                .first_byte_seconds
                .observe(ctx.start.elapsed().as_secs_f64());
            let (mut parts, body) = resp.into_parts();
            strip_hop_headers(&mut parts.headers);
            parts.headers.insert(REQUEST_ID, ctx.rid.clone());
            parts
                .headers
                .insert(PATH_HEADER, HeaderValue::from_static(path));
            if let Some(reason) = fallback {
                parts
                    .headers
                    .insert(FALLBACK_HEADER, HeaderValue::from_static(reason));
            }
            let body = match cached.filter(|_| parts.status.is_success()) {
                None => RespBody::stream(body, None),
                Some(c) => {
                    let ct = parts
                        .headers
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if ct.starts_with("text/event-stream") {
                        parts.headers.remove(header::CONTENT_LENGTH);
                        RespBody::stream(body, Some(super::sse::SseUsageRewriter::new(c)))
                    } else if ct.contains("json") {
                        let bytes = match Limited::new(body, MAX_DECODE_JSON).collect().await {
                            Ok(b) => b.to_bytes(),
                            Err(_) => {
                                self.metrics.upstream_error("decode", "io");
                                return failure_response(Failure::Io, "decode");
                            }
                        };
                        parts.headers.remove(header::CONTENT_LENGTH);
                        match pd::rewrite_usage_json(&bytes, c) {
                            Some(b) => RespBody::full(b),
                            None => RespBody::full(bytes),
                        }
                    } else {
                        RespBody::stream(body, None)
                    }
                }
            };
            let body = body.tracked(guard, self.metrics.clone(), ctx.start);
            return Response::from_parts(parts, body);
        }
    }
}

struct Ctx<'a> {
    snap: &'a Snapshot,
    rid: &'a HeaderValue,
    start: Instant,
}

struct Pending<'a> {
    metrics: &'a Metrics,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.client_disconnects.inc();
        }
    }
}

async fn read_body(body: Incoming, parts: &Parts, limit: u64) -> Result<Bytes, Response<RespBody>> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            &format!("request body exceeds {limit} bytes"),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            &format!("could not read the request body: {e}"),
        )),
    }
}
