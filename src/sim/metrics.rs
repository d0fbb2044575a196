//! The simulator's `/metrics`, in Prometheus text format with vLLM's names. Rendered by hand:
//! the hot path only bumps atomics, and vLLM's `vllm:` names carry a colon that the OpenMetrics
//! encoder of prometheus-client is not meant for.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// vLLM's TTFT buckets (seconds).
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

pub const FINISH_REASONS: &[&str] = &["stop", "length", "abort"];

/// vLLM's `source` label of `vllm:prompt_tokens_by_source_total`: computed here, found in the
/// local prefix cache, or pulled from a prefill engine.
pub const PROMPT_TOKEN_SOURCES: &[&str] =
    &["local_compute", "local_cache_hit", "external_kv_transfer"];

#[derive(Default)]
pub struct Metrics {
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    /// Indexed like `FINISH_REASONS`.
    pub success: [AtomicU64; 3],
    /// Indexed like `PROMPT_TOKEN_SOURCES`.
    pub prompt_tokens_by_source: [AtomicU64; 3],
    ttft_buckets: [AtomicU64; 22],
    ttft_count: AtomicU64,
    ttft_sum_micros: AtomicU64,
    pub kv_transfers_served: AtomicU64,
    pub kv_transfers_rejected: AtomicU64,
    pub kv_pulls_ok: AtomicU64,
    pub kv_pulls_failed: AtomicU64,
    pub kv_blocks_expired: AtomicU64,
    pub requests_aborted: AtomicU64,
    pub requests_failed_injected: AtomicU64,
}

/// Gauges sampled from the engine at scrape time.
pub struct Gauges {
    pub running: usize,
    pub waiting: usize,
    pub kv_usage: f64,
    pub pending_transfers: usize,
}

impl Metrics {
    pub fn observe_ttft(&self, seconds: f64) {
        for (bucket, le) in self.ttft_buckets.iter().zip(TTFT_BUCKETS) {
            if seconds <= *le {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.ttft_count.fetch_add(1, Relaxed);
        self.ttft_sum_micros
            .fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    /// Counts one request's prompt by where its KV came from.
    pub fn prompt_sources(&self, local_compute: u32, local_cache_hit: u32, external: u32) {
        for (counter, n) in
            self.prompt_tokens_by_source
                .iter()
                .zip([local_compute, local_cache_hit, external])
        {
            counter.fetch_add(u64::from(n), Relaxed);
        }
    }

    pub fn finished(&self, reason: &str) {
        if let Some(i) = FINISH_REASONS.iter().position(|r| *r == reason) {
            self.success[i].fetch_add(1, Relaxed);
        }
    }

    pub fn render(&self, model: &str, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let labels = format!("model_name=\"{}\"", escape(model));
        let mut gauge = |name: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        };
        gauge(
            "vllm:num_requests_running",
            "Requests in model execution batches.",
            gauges.running.to_string(),
        );
        gauge(
            "vllm:num_requests_waiting",
            "Requests waiting to be processed.",
            gauges.waiting.to_string(),
        );
        gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            format!("{:.6}", gauges.kv_usage),
        );
        gauge(
            "pdctl_sim_kv_pending_transfers",
            "Prefilled requests whose KV blocks await a pull.",
            gauges.pending_transfers.to_string(),
        );
        let counters: [(&str, &str, &AtomicU64); 11] = [
            (
                "vllm:prompt_tokens_total",
                "Prefill tokens processed.",
                &self.prompt_tokens,
            ),
            (
                "vllm:generation_tokens_total",
                "Generation tokens processed.",
                &self.generation_tokens,
            ),
            (
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in tokens.",
                &self.prefix_queries,
            ),
            (
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in tokens.",
                &self.prefix_hits,
            ),
            (
                "pdctl_sim_kv_transfers_served_total",
                "KV pulls this engine served as a prefill.",
                &self.kv_transfers_served,
            ),
            (
                "pdctl_sim_kv_transfers_rejected_total",
                "KV pulls refused: unknown, stale or mismatched.",
                &self.kv_transfers_rejected,
            ),
            (
                "pdctl_sim_kv_pulls_ok_total",
                "KV pulls this engine made as a decode that succeeded.",
                &self.kv_pulls_ok,
            ),
            (
                "pdctl_sim_kv_pulls_failed_total",
                "Remote-prefill requests that fell back to a local prefill.",
                &self.kv_pulls_failed,
            ),
            (
                "pdctl_sim_kv_blocks_expired_total",
                "Prefilled requests freed unpulled after the abort timeout.",
                &self.kv_blocks_expired,
            ),
            (
                "pdctl_sim_requests_aborted_total",
                "Requests aborted because the client went away.",
                &self.requests_aborted,
            ),
            (
                "pdctl_sim_requests_failed_injected_total",
                "Requests answered with an injected error.",
                &self.requests_failed_injected,
            ),
        ];
        for (name, help, value) in &counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{labels}}} {}",
                value.load(Relaxed)
            );
        }
        let name = "vllm:request_success_total";
        let _ = writeln!(
            out,
            "# HELP {name} Finished requests by finish reason.\n# TYPE {name} counter"
        );
        for (reason, value) in FINISH_REASONS.iter().zip(&self.success) {
            let _ = writeln!(
                out,
                "{name}{{{labels},finish_reason=\"{reason}\"}} {}",
                value.load(Relaxed)
            );
        }
        let name = "vllm:prompt_tokens_by_source_total";
        let _ = writeln!(
            out,
            "# HELP {name} Number of prompt tokens by source.\n# TYPE {name} counter"
        );
        for (source, value) in PROMPT_TOKEN_SOURCES
            .iter()
            .zip(&self.prompt_tokens_by_source)
        {
            let _ = writeln!(
                out,
                "{name}{{{labels},source=\"{source}\"}} {}",
                value.load(Relaxed)
            );
        }
        let name = "vllm:time_to_first_token_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time to first token in seconds.\n# TYPE {name} histogram"
        );
        for (le, bucket) in TTFT_BUCKETS.iter().zip(&self.ttft_buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{le}\"}} {}",
                bucket.load(Relaxed)
            );
        }
        let count = self.ttft_count.load(Relaxed);
        let sum = self.ttft_sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
        out
    }
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Reads one sample (`name{labels} value`) out of a rendered page; for tests and the proxy's
/// load scraper alike. `labels` must be a substring of the sample's label set.
pub fn sample(page: &str, name: &str, labels: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            series.split('{').next() == Some(name) && (labels.is_empty() || series.contains(labels))
        })
        .and_then(|(_, v)| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_vllm_names_and_reads_them_back() {
        let m = Metrics::default();
        m.prompt_tokens.fetch_add(7, Relaxed);
        m.finished("length");
        m.observe_ttft(0.003);
        let page = m.render(
            "q\"m",
            &Gauges {
                running: 2,
                waiting: 1,
                kv_usage: 0.25,
                pending_transfers: 0,
            },
        );
        assert_eq!(sample(&page, "vllm:prompt_tokens_total", ""), Some(7.0));
        assert_eq!(sample(&page, "vllm:num_requests_waiting", ""), Some(1.0));
        assert_eq!(sample(&page, "vllm:kv_cache_usage_perc", ""), Some(0.25));
        assert_eq!(
            sample(
                &page,
                "vllm:request_success_total",
                "finish_reason=\"length\""
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &page,
                "vllm:time_to_first_token_seconds_bucket",
                "le=\"0.001\""
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &page,
                "vllm:time_to_first_token_seconds_bucket",
                "le=\"0.005\""
            ),
            Some(1.0)
        );
        assert!(page.contains("model_name=\"q\\\"m\""));
    }
}
