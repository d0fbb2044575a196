//! The proxy's Prometheus metrics (prometheus-client; counters get `_total` appended by it).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
    /// pd | decode_only | fallback | passthrough | local
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub role: &'static str,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub role: &'static str,
    /// connect | timeout | status | io | bad_response
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub prefill_seconds: Histogram,
    pub first_byte_seconds: Histogram,
    pub request_seconds: Histogram,
    pub inflight: Family<EndpointLabels, Gauge>,
    pub prefill_retries: Counter,
    pub decode_retries: Counter,
    pub fallbacks: Family<ReasonLabels, Counter>,
    pub upstream_errors: Family<ErrorLabels, Counter>,
    pub client_disconnects: Counter,
    pub prefill_without_kv: Counter,
}

fn latency() -> Histogram {
    // 100 µs .. ~105 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pdctl_proxy");
        let m = Metrics {
            requests: Family::default(),
            prefill_seconds: latency(),
            first_byte_seconds: latency(),
            request_seconds: latency(),
            inflight: Family::default(),
            prefill_retries: Counter::default(),
            decode_retries: Counter::default(),
            fallbacks: Family::default(),
            upstream_errors: Family::default(),
            client_disconnects: Counter::default(),
            prefill_without_kv: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "requests",
            "Requests by route, status and path taken",
            m.requests.clone(),
        );
        r.register(
            "prefill_duration_seconds",
            "Prefill leg latency, retries included",
            m.prefill_seconds.clone(),
        );
        r.register(
            "time_to_first_byte_seconds",
            "Request start to decode response headers",
            m.first_byte_seconds.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Request start to the last byte sent to the client",
            m.request_seconds.clone(),
        );
        r.register(
            "inflight",
            "In-flight requests per endpoint",
            m.inflight.clone(),
        );
        r.register(
            "prefill_retries",
            "Prefill leg retries",
            m.prefill_retries.clone(),
        );
        r.register(
            "decode_retries",
            "Decode legs retried on another decode after a connect error",
            m.decode_retries.clone(),
        );
        r.register(
            "fallbacks",
            "Requests served decode-only after a prefill failure",
            m.fallbacks.clone(),
        );
        r.register(
            "upstream_errors",
            "Upstream failures by leg and kind",
            m.upstream_errors.clone(),
        );
        r.register(
            "client_disconnects",
            "Clients gone before the response ended (upstream legs cancelled)",
            m.client_disconnects.clone(),
        );
        r.register(
            "prefill_without_kv_params",
            "Prefills that returned no kv_transfer_params (decode recomputes the prompt)",
            m.prefill_without_kv.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16, path: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                status,
                path,
            })
            .inc();
    }

    pub fn upstream_error(&self, role: &'static str, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&ErrorLabels { role, kind })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(8192);
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("encode metrics");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        let m = Metrics::default();
        m.request("chat", 200, "pd");
        m.upstream_error("prefill", "connect");
        m.fallbacks
            .get_or_create(&ReasonLabels { reason: "status" })
            .inc();
        m.inflight
            .get_or_create(&EndpointLabels {
                role: "decode",
                endpoint: "d0".into(),
            })
            .inc();
        let s = m.encode();
        assert!(
            s.contains(r#"pdctl_proxy_requests_total{route="chat",status="200",path="pd"} 1"#),
            "{s}"
        );
        assert!(s.contains(r#"pdctl_proxy_upstream_errors_total{role="prefill",kind="connect"} 1"#));
        assert!(s.contains(r#"pdctl_proxy_fallbacks_total{reason="status"} 1"#));
        assert!(s.contains(r#"pdctl_proxy_inflight{role="decode",endpoint="d0"} 1"#));
        assert!(s.contains("pdctl_proxy_prefill_duration_seconds_bucket"));
        assert!(s.ends_with("# EOF\n"));
    }
}
