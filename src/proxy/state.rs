//! What every request of a running proxy shares: its configuration, the ready pools, the
//! pickers' cursors, the metrics and request ids (`Proxy`), and what one worker thread owns
//! (`Worker`). The front door's mode is chosen here once, at construction: the request path asks
//! `Proxy` what to do and never matches on the mode itself.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;
use thiserror::Error;
use tokio::sync::watch;

use crate::spec::proxy::{PickPolicy, PrefillFailurePolicy, ProxySection};
use crate::spec::Role;

use super::budget::BodyBudget;
use super::endpoints::{Endpoint, EndpointSet};
use super::metrics::{EndpointLabels, PathTaken, ProxyMetrics, RequestLabels};
use super::pick::{self, Cursors, InFlight, Pools, Upstream};
use super::security::Allowlist;
use super::upstream::{self, UpstreamClient};

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

/// Where a P/D request's prefill leg goes.
pub enum PrefillChoice {
    Target(Arc<Upstream>),
    DecodeOnly,
    /// Pools mode without a ready prefill, and no fallback to decode-only allowed.
    NoneReady,
    /// The sidecar was asked for a target its SSRF allowlist refuses.
    Forbidden,
}

/// `GET /health` in pools mode: ready only with at least one ready prefill and one ready decode.
pub enum Health {
    Ready,
    NotReady { prefill: usize, decode: usize },
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
    /// `[proxy] passthrough_paths`, hashed once so the route check stays O(1) per request.
    passthrough_paths: HashSet<String>,
    /// Request bodies being buffered, all requests together (`max_buffered_body_bytes`).
    pub bodies: BodyBudget,
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
            passthrough_paths: cfg.section.passthrough_paths.iter().cloned().collect(),
            bodies: BodyBudget::new(cfg.section.max_buffered_body_bytes),
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
    pub fn refresh_endpoints(&self, endpoints: &mut watch::Receiver<EndpointSet>) {
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

/// Everything the two front doors do differently, in one place.
impl Proxy {
    /// `GET /metrics` is the proxy's own in pools mode. The sidecar passes it to its engine: the
    /// scheduler scrapes vLLM through the sidecar's port.
    pub fn serves_metrics_at_root(&self) -> bool {
        matches!(self.cfg.mode, Mode::Pools)
    }

    /// The methods pools mode accepts on `path`, or `None` when the path is not served (404).
    /// The sidecar accepts everything (`Some("")`): like llm-d's, it fronts its pod's own engine,
    /// and the scheduler scrapes and probes vLLM through it.
    pub fn allowed_methods(&self, path: &str) -> Option<&'static str> {
        if let Mode::Sidecar { .. } = self.cfg.mode {
            return Some("");
        }
        match path {
            "/v1/completions" | "/v1/chat/completions" | "/v1/responses" => Some("POST"),
            "/v1/models" | "/health" | "/metrics" | "/pdctl/metrics" => Some("GET"),
            _ if self.passthrough_paths.contains(path) => Some("GET, HEAD, POST"),
            _ => None,
        }
    }

    /// The sidecar is healthy while it runs, like llm-d's; pools mode needs a ready pair.
    pub fn health(&self) -> Health {
        if let Mode::Sidecar { .. } = self.cfg.mode {
            return Health::Ready;
        }
        let pools = self.pools();
        if pools.prefill.is_empty() || pools.decode.is_empty() {
            return Health::NotReady {
                prefill: pools.prefill.len(),
                decode: pools.decode.len(),
            };
        }
        Health::Ready
    }

    /// The prefill for a request that asked for `requested` (its `x-prefiller-host-port`).
    pub fn choose_prefill(&self, requested: Option<String>) -> PrefillChoice {
        match &self.cfg.mode {
            Mode::Pools => {
                // A client may only name a prefill pdctl already routes to; anything else is ignored.
                if let Some(target) = requested {
                    let pools = self.pools();
                    if let Some(known) = pools.prefill.iter().find(|u| u.authority == target) {
                        return PrefillChoice::Target(known.clone());
                    }
                    tracing::debug!(%target, "ignoring x-prefiller-host-port that names no known prefill");
                }
                match self.pick(Role::Prefill, &[], None) {
                    Some(target) => PrefillChoice::Target(target),
                    None if self.cfg.section.prefill_failure == PrefillFailurePolicy::Fallback => {
                        self.metrics.fallbacks.inc();
                        PrefillChoice::DecodeOnly
                    }
                    None => PrefillChoice::NoneReady,
                }
            }
            Mode::Sidecar { ssrf } => {
                let Some(target) = requested else {
                    return PrefillChoice::DecodeOnly;
                };
                if let Some(allow) = ssrf {
                    if !allow.allows(&target) {
                        tracing::warn!(%target, "prefill target refused by SSRF protection");
                        return PrefillChoice::Forbidden;
                    }
                }
                PrefillChoice::Target(Arc::new(Upstream::new(Endpoint {
                    id: target.clone(),
                    url: format!("http://{target}"),
                })))
            }
        }
    }

    /// Another ready prefill for a retry, none of `tried`. The sidecar retries the target its
    /// header named: it knows no other.
    pub fn another_prefill(&self, tried: &[String]) -> Option<Arc<Upstream>> {
        match self.cfg.mode {
            Mode::Pools => {
                let exclude: Vec<&str> = tried.iter().map(String::as_str).collect();
                self.pick(Role::Prefill, &exclude, None)
            }
            Mode::Sidecar { .. } => None,
        }
    }
}

/// What a worker thread owns: its engine connections and its view of the endpoint set.
pub struct Worker {
    pub client: UpstreamClient,
    endpoints: std::sync::Mutex<watch::Receiver<EndpointSet>>,
}

impl Worker {
    pub fn new(client: UpstreamClient, endpoints: watch::Receiver<EndpointSet>) -> Worker {
        Worker {
            client,
            endpoints: std::sync::Mutex::new(endpoints),
        }
    }

    /// A set published before a request arrived is in use for that request: the daemon's
    /// readiness changes and tests see no lag.
    pub fn refresh(&self, proxy: &Proxy) {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if endpoints.has_changed().unwrap_or(false) {
            proxy.refresh_endpoints(&mut endpoints);
        }
    }
}
