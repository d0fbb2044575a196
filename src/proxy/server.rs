//! The proxy's HTTP server: connection handling, routing, local answers and passthrough.
//! The P/D exchange itself is in `pd.rs`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::plan::Role;
use crate::spec::proxy::{PickPolicy, ProxySection};

use super::endpoints::EndpointSet;
use super::metrics::{EndpointLabels, PathTaken, ProxyMetrics, RequestLabels};
use super::pick::{self, Cursors, InFlight, Pools, Upstream};
use super::relay::{Finish, Relay};
use super::rewrite::Api;
use super::security::{authorized, Allowlist};
use super::sse::SseUsageRewriter;
use super::upstream::{self, clean_response_headers, PooledBody, UpstreamClient};
use super::workers::{self, Worker};
use super::{load, pd};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    /// `[proxy] api_key_env` names a variable that is unset or empty: serving without the key
    /// would silently open the endpoint, so the proxy refuses to start.
    #[error("[proxy] api_key_env names {name}, which is unset or empty")]
    ApiKeyEnv { name: String },
    #[error("cannot start the proxy's worker threads: {source}")]
    Workers { source: std::io::Error },
}

/// Where the prefill target comes from.
#[derive(Debug, Clone)]
pub enum Mode {
    /// pdctl knows the pools (embedded in the daemon, or `pdctl proxy`): it picks both legs.
    Pools,
    /// The llm-d routing sidecar: the prefill comes from `x-prefiller-host-port`, the decode is
    /// the pod's own engine. `ssrf`: when set, only allow-listed targets.
    Sidecar { ssrf: Option<Allowlist> },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub section: ProxySection,
    pub mode: Mode,
    pub api_key: Option<String>,
    /// Worker threads, each serving the connections dealt to it with its own engine connections
    /// (0 = one per 4 cores, 1 to 4; see `workers::count`).
    pub workers: usize,
}

pub struct Proxy {
    pub cfg: Config,
    pools: RwLock<Arc<Pools>>,
    pub cursors: Cursors,
    /// For the background load scrape; requests use their worker's own client.
    pub client: UpstreamClient,
    pub metrics: ProxyMetrics,
    next_id: AtomicU64,
    id_seed: u64,
}

impl Proxy {
    pub fn new(cfg: Config) -> Arc<Proxy> {
        let id_seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()) << 32;
        Arc::new(Proxy {
            client: upstream::client(cfg.section.connect_timeout),
            cfg,
            pools: RwLock::new(Arc::new(Pools::default())),
            cursors: Cursors::default(),
            metrics: ProxyMetrics::default(),
            next_id: AtomicU64::new(0),
            id_seed,
        })
    }

    pub fn pools(&self) -> Arc<Pools> {
        self.pools.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes the newest endpoint set. Reading it under the pools' lock keeps two updaters from
    /// ever installing an older set over a newer one.
    pub(super) fn refresh_endpoints(&self, endpoints: &mut watch::Receiver<EndpointSet>) {
        let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
        let set = endpoints.borrow_and_update();
        *pools = Arc::new(Pools::rebuild(&set, &pools));
    }

    /// A fresh id, unique per process run: 32 hex digits.
    pub fn request_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Relaxed);
        format!("{:016x}{:016x}", self.id_seed, n)
    }

    pub fn policy(&self, role: Role) -> PickPolicy {
        match role {
            Role::Prefill => self.cfg.section.prefill_policy,
            Role::Decode => self.cfg.section.decode_policy,
        }
    }

    pub fn pick(&self, role: Role, exclude: &[&str], prefix: Option<u64>) -> Option<Arc<Upstream>> {
        let pools = self.pools();
        pick::pick(
            self.policy(role),
            role,
            pools.of(role),
            exclude,
            &self.cursors,
            prefix,
        )
    }

    /// Counts the request against `upstream` (and its per-endpoint gauge) while alive.
    pub fn in_flight(&self, role: Role, upstream: Arc<Upstream>) -> InFlight {
        upstream.gauge.get_or_init(|| {
            self.metrics
                .in_flight
                .get_or_create(&EndpointLabels {
                    role: role.as_str(),
                    endpoint: upstream.endpoint.id.clone(),
                })
                .clone()
        });
        InFlight::new(upstream)
    }

    pub fn count(&self, route: &'static str, status: StatusCode, path: PathTaken) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                route,
                status: status.as_u16(),
                path: path.as_str(),
            })
            .inc();
    }
}

/// The daemon's entry point (see `endpoints.rs`): serves until `shutdown`, then drains.
pub async fn serve_embedded(
    listener: TcpListener,
    section: ProxySection,
    endpoints: watch::Receiver<EndpointSet>,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    let api_key = match section.api_key_env.as_deref() {
        None => None,
        Some(name) => match std::env::var(name) {
            Ok(key) if !key.is_empty() => Some(key),
            _ => {
                return Err(ProxyError::ApiKeyEnv {
                    name: name.to_string(),
                })
            }
        },
    };
    let cfg = Config {
        section,
        mode: Mode::Pools,
        api_key,
        workers: 0,
    };
    serve(listener, cfg, endpoints, shutdown).await
}

pub async fn serve(
    listener: TcpListener,
    cfg: Config,
    mut endpoints: watch::Receiver<EndpointSet>,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    let workers = workers::count(cfg.workers);
    let proxy = Proxy::new(cfg);
    proxy.refresh_endpoints(&mut endpoints);
    // Workers also check for a new set before each request (see `Worker::refresh`); this task
    // keeps the pools current for the load scrape while no request comes.
    let watcher = {
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        let mut endpoints = endpoints.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = endpoints.changed() => {
                        if changed.is_err() { return; }
                        proxy.refresh_endpoints(&mut endpoints);
                    }
                    _ = shutdown.cancelled() => return,
                }
            }
        })
    };
    let uses_load = [
        proxy.cfg.section.prefill_policy,
        proxy.cfg.section.decode_policy,
    ]
    .contains(&PickPolicy::LoadAware);
    if uses_load {
        tokio::spawn(load::scrape_forever(proxy.clone(), shutdown.clone()));
    }
    let started = workers::run(listener, &proxy, &endpoints, &shutdown, workers).await;
    watcher.abort();
    started
}

pub(super) async fn handle(
    proxy: Arc<Proxy>,
    worker: Arc<Worker>,
    req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    worker.refresh(&proxy);
    let engines = &worker.client;
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/health") => return health(&proxy),
        (&Method::GET, "/pdctl/metrics") => return metrics(&proxy),
        (&Method::GET, "/metrics") if matches!(proxy.cfg.mode, Mode::Pools) => {
            return metrics(&proxy)
        }
        _ => {}
    }
    if let Some(key) = &proxy.cfg.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !authorized(given, key) {
            proxy.count("auth", StatusCode::UNAUTHORIZED, PathTaken::Local);
            return error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
        }
    }
    let (parts, body) = req.into_parts();
    let limit = proxy.cfg.section.max_body_bytes as usize;
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            proxy.count("body", StatusCode::PAYLOAD_TOO_LARGE, PathTaken::Local);
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body is larger than {limit} bytes"),
            );
        }
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
    if let Mode::Sidecar { .. } = proxy.cfg.mode {
        return respond(StatusCode::OK, "application/json", Bytes::new());
    }
    let pools = proxy.pools();
    if pools.prefill.is_empty() || pools.decode.is_empty() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "not ready: {} ready prefill and {} ready decode endpoints (need at least one each)",
                pools.prefill.len(),
                pools.decode.len()
            ),
        );
    }
    respond(StatusCode::OK, "application/json", Bytes::new())
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

pub fn client_request_id(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

pub fn full(body: Bytes) -> Body {
    Full::new(body).map_err(|never| match never {}).boxed()
}

pub fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// vLLM's error body: `{"error":{"message","type","param","code"}}`.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    let kind = match status.as_u16() {
        400 | 413 => "BadRequestError",
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        502 => "BadGateway",
        503 => "ServiceUnavailable",
        504 => "GatewayTimeout",
        _ => "InternalServerError",
    };
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}
    });
    respond(status, "application/json", Bytes::from(body.to_string()))
}

/// Wraps an upstream response for the client (headers cleaned, stream relayed, accounted).
pub fn relay(
    proxy: &Arc<Proxy>,
    upstream: Response<PooledBody>,
    event_stream: bool,
    rewrite: Option<SseUsageRewriter>,
    start: Instant,
    guards: Vec<InFlight>,
) -> Response<Body> {
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
