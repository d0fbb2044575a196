//! The `[proxy]` table of pools.toml. Parsed and validated by `spec`; consumed by `proxy`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// Where the OpenAI-compatible endpoint listens.
    pub listen: String,
    pub prefill_policy: PickPolicy,
    pub decode_policy: PickPolicy,
    /// Estimated prompt tokens (chars / 4) below which a request goes decode-only; 0 = always P/D.
    pub pd_threshold_tokens: u32,
    pub prefill_failure: PrefillFailurePolicy,
    pub prefill_max_retries: u32,
    #[serde(with = "humantime_serde")]
    pub prefill_retry_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub prefill_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub decode_first_byte_timeout: Duration,
    /// Request bodies above this many bytes get 413.
    pub max_body_bytes: u64,
    /// Open client connections; beyond it new ones get 503 and are closed (also kept below
    /// three quarters of the process's file descriptor limit).
    pub max_client_connections: usize,
    /// Request bodies being received, all requests together; beyond it new ones get 503.
    pub max_buffered_body_bytes: u64,
    /// Name of an environment variable holding the API key clients must send (never the key).
    pub api_key_env: Option<String>,
    /// `/metrics` and `/pdctl/metrics` without the API key (they list the engines' URLs, so
    /// they are behind the key by default).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub metrics_public: bool,
    /// Paths beyond the built-in routes that pools mode forwards to a decode unchanged (exact
    /// matches, GET/HEAD/POST); every other path is 404.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub passthrough_paths: Vec<String>,
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            listen: "127.0.0.1:8000".into(),
            prefill_policy: PickPolicy::LeastOutstanding,
            decode_policy: PickPolicy::LeastOutstanding,
            pd_threshold_tokens: 0,
            prefill_failure: PrefillFailurePolicy::Retry,
            prefill_max_retries: 2,
            prefill_retry_backoff: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(5),
            prefill_timeout: Duration::from_secs(300),
            decode_first_byte_timeout: Duration::from_secs(300),
            max_body_bytes: 32 * 1024 * 1024,
            max_buffered_body_bytes: 256 * 1024 * 1024,
            max_client_connections: 10_000,
            api_key_env: None,
            metrics_public: false,
            passthrough_paths: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PickPolicy {
    RoundRobin,
    LeastOutstanding,
    /// From the engines' `/metrics` (waiting requests, KV cache usage), scraped in the background.
    LoadAware,
    /// Hash of the first prompt blocks; meaningful for decode (prefix cache reuse).
    PrefixAffinity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefillFailurePolicy {
    /// Answer the client with the prefill's error.
    Fail,
    /// Retry on another ready prefill (502/503/504/connect errors), then fail.
    Retry,
    /// Retry as above, then serve decode-only with the original body (counted, marked).
    Fallback,
}

impl ProxySection {
    /// Semantic checks serde cannot express, as `(key, message)` pairs so that pools.toml can
    /// point at the key and `pdctl proxy` can name its flag.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Err(e) = self.listen.parse::<std::net::SocketAddr>() {
            out.push((
                "listen",
                format!(
                    "`{}` is not a socket address ({e}); expected e.g. `127.0.0.1:8000`",
                    self.listen
                ),
            ));
        }
        if self.prefill_policy == PickPolicy::PrefixAffinity {
            out.push((
                "prefill_policy",
                "`prefix-affinity` applies only to `decode_policy` (prefix cache reuse happens on decode)"
                    .into(),
            ));
        }
        for (key, d) in [
            ("connect_timeout", self.connect_timeout),
            ("prefill_timeout", self.prefill_timeout),
            ("decode_first_byte_timeout", self.decode_first_byte_timeout),
        ] {
            if d.is_zero() {
                out.push((key, format!("`{key}` must be more than 0")));
            }
        }
        if self.prefill_max_retries > 16 {
            out.push((
                "prefill_max_retries",
                format!(
                    "{} retries is too many (at most 16)",
                    self.prefill_max_retries
                ),
            ));
        }
        if self.max_body_bytes == 0 {
            out.push((
                "max_body_bytes",
                "`max_body_bytes` must be more than 0".into(),
            ));
        }
        if self.max_client_connections == 0 {
            out.push((
                "max_client_connections",
                "`max_client_connections` must be more than 0".into(),
            ));
        }
        if self.max_buffered_body_bytes < self.max_body_bytes {
            out.push((
                "max_buffered_body_bytes",
                format!(
                    "`max_buffered_body_bytes` ({}) must be at least `max_body_bytes` ({})",
                    self.max_buffered_body_bytes, self.max_body_bytes
                ),
            ));
        }
        if let Some(name) = &self.api_key_env {
            if !crate::spec::is_env_name(name) {
                out.push((
                    "api_key_env",
                    format!(
                        "`{name}` is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
                    ),
                ));
            }
        }
        for path in &self.passthrough_paths {
            if !path.starts_with('/') || path.contains(['?', '#']) {
                out.push((
                    "passthrough_paths",
                    format!("`{path}` is not a path: it must start with `/` and have no query"),
                ));
            }
        }
        out
    }

    /// The listen port, when `listen` parses.
    pub fn listen_port(&self) -> Option<u16> {
        self.listen
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(ProxySection::default().problems().is_empty());
        assert_eq!(ProxySection::default().listen_port(), Some(8000));
    }

    #[test]
    fn reports_each_bad_field_by_key() {
        let p = ProxySection {
            listen: "localhost".into(),
            prefill_policy: PickPolicy::PrefixAffinity,
            connect_timeout: Duration::ZERO,
            max_body_bytes: 0,
            api_key_env: Some("1KEY".into()),
            prefill_max_retries: 100,
            passthrough_paths: vec!["/ok".into(), "score".into()],
            ..ProxySection::default()
        };
        let keys: Vec<_> = p.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "listen",
                "prefill_policy",
                "connect_timeout",
                "prefill_max_retries",
                "max_body_bytes",
                "api_key_env",
                "passthrough_paths"
            ]
        );
    }
}
