//! The proxy's Prometheus metrics (prometheus-client: explicit, typed handles; no globals).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// How a request was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathTaken {
    Pd,
    DecodeOnly,
    Fallback,
    Passthrough,
    Local,
}

impl PathTaken {
    pub fn as_str(self) -> &'static str {
        match self {
            PathTaken::Pd => "pd",
            PathTaken::DecodeOnly => "decode_only",
            PathTaken::Fallback => "fallback",
            PathTaken::Passthrough => "passthrough",
            PathTaken::Local => "local",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
    pub path: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndpointLabels {
    pub role: &'static str,
    pub endpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ErrorLabels {
    pub leg: &'static str,
    pub kind: &'static str,
}

pub struct ProxyMetrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub prefill_seconds: Histogram,
    pub first_byte_seconds: Histogram,
    pub request_seconds: Histogram,
    pub in_flight: Family<EndpointLabels, Gauge>,
    pub retries: Counter,
    pub fallbacks: Counter,
    pub upstream_errors: Family<ErrorLabels, Counter>,
    pub client_disconnects: Counter,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pdctl_proxy");
        let latency = || Histogram::new(exponential_buckets(0.0005, 2.0, 20));
        let m = ProxyMetrics {
            requests: Family::default(),
            prefill_seconds: latency(),
            first_byte_seconds: latency(),
            request_seconds: latency(),
            in_flight: Family::default(),
            retries: Counter::default(),
            fallbacks: Counter::default(),
            upstream_errors: Family::default(),
            client_disconnects: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by route, status and path taken (pd, decode_only, fallback, passthrough)",
            m.requests.clone(),
        );
        registry.register(
            "prefill_duration_seconds",
            "Prefill leg latency",
            m.prefill_seconds.clone(),
        );
        registry.register(
            "time_to_first_byte_seconds",
            "From request arrival to the decode's response head",
            m.first_byte_seconds.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "End-to-end latency, until the last byte reached the client",
            m.request_seconds.clone(),
        );
        registry.register(
            "in_flight",
            "Requests in flight per endpoint",
            m.in_flight.clone(),
        );
        registry.register("retries", "Upstream retries", m.retries.clone());
        registry.register(
            "fallbacks",
            "Requests served decode-only after the prefill leg failed",
            m.fallbacks.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures by leg and kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "client_disconnects",
            "Requests whose client went away before the end",
            m.client_disconnects.clone(),
        );
        ProxyMetrics { registry, ..m }
    }
}

impl ProxyMetrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn error(&self, leg: &'static str, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&ErrorLabels { leg, kind })
            .inc();
    }
}
