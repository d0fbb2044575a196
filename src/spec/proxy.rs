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
    /// Name of an environment variable holding the API key clients must send (never the key).
    pub api_key_env: Option<String>,
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
            api_key_env: None,
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
