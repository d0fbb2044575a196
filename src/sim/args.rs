//! `pdctl sim` arguments. The simulator must accept the argv pdctl plans for real vLLM
//! (`serve <model> --port N --kv-transfer-config '{..}' --tensor-parallel-size N ...`), so parsing
//! is by hand: clap cannot ignore unknown flags, and vLLM has hundreds of them.
//!
//! Rule for an unknown flag: `--flag=value` drops both; `--flag` followed by a token that does not
//! start with `-` takes that token as its value; otherwise it is a boolean. Put the model right
//! after `serve` (as vLLM's docs do) so an unknown boolean flag cannot swallow it.

use std::net::IpAddr;
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub host: IpAddr,
    pub port: u16,
    pub model: String,
    pub served_model_name: String,
    pub side_channel_host: String,
    pub side_channel_port: u16,
    pub startup_delay: Duration,
    pub prefill_time_per_token: Duration,
    pub inter_token_latency: Duration,
    pub kv_transfer_latency: Duration,
    pub max_num_seqs: usize,
    pub max_model_len: u32,
    pub block_size: u32,
    pub num_blocks: u32,
    pub seed: u64,
    /// Fraction of requests (0..=1) answered 503, drawn from the seeded generator.
    pub failure_rate: f64,
    /// Exit non-zero after this many answered requests.
    pub crash_after: Option<u64>,
    /// From this long after startup on, `/health` never answers (a hung engine).
    pub hang_health_after: Option<Duration>,
    /// How long a prefill keeps blocks nobody pulled (vLLM: VLLM_NIXL_ABORT_REQUEST_TIMEOUT).
    pub kv_abort_timeout: Duration,
    pub tensor_parallel_size: u32,
    /// Tokio worker threads; 0 = one per core.
    pub workers: usize,
    /// Tokens generated when a request sets no token limit (vLLM would run to max_model_len).
    pub default_max_tokens: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8000,
            model: "sim-model".into(),
            served_model_name: "sim-model".into(),
            side_channel_host: "127.0.0.1".into(),
            side_channel_port: 5600,
            startup_delay: Duration::ZERO,
            prefill_time_per_token: Duration::ZERO,
            inter_token_latency: Duration::ZERO,
            kv_transfer_latency: Duration::ZERO,
            max_num_seqs: 256,
            max_model_len: 32768,
            block_size: 16,
            num_blocks: 65536,
            seed: 0,
            failure_rate: 0.0,
            crash_after: None,
            hang_health_after: None,
            kv_abort_timeout: Duration::from_secs(480),
            tensor_parallel_size: 1,
            workers: 0,
            default_max_tokens: 16,
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum ArgsError {
    #[error("{flag} needs a value")]
    MissingValue { flag: String },
    #[error("{flag}: invalid value {value:?}: {reason}")]
    BadValue {
        flag: String,
        value: String,
        reason: String,
    },
    #[error("unexpected argument {0:?} (the model was already given)")]
    ExtraPositional(String),
    #[error("help requested")]
    Help,
}

pub const USAGE: &str = "\
pdctl sim: a vLLM-compatible engine simulator with P/D (NixlConnector-like) semantics

usage: pdctl sim [serve] [MODEL] [--flag value]...   (also runs as `vllm serve ...`)

  --host ADDR                    listen address (127.0.0.1)
  --port N                       HTTP port (8000)
  --model NAME                   model (or the positional MODEL)
  --served-model-name NAME       name clients send as \"model\" (default: the model)
  --side-channel-port N          KV side channel (env VLLM_NIXL_SIDE_CHANNEL_PORT, else 5600)
  --startup-delay DUR            /health answers 503 until this has passed (0)
  --prefill-time-per-token DUR   prefill compute per uncached prompt token (0)
  --inter-token-latency DUR      time between generated tokens (0)
  --kv-transfer-latency DUR      time a decode spends pulling KV blocks (0)
  --max-num-seqs N               running requests; more wait in a queue (256)
  --max-model-len N              prompt + completion token limit (32768)
  --block-size N                 tokens per KV block (16)
  --num-blocks N                 KV blocks in the cache (65536)
  --seed N                       seed for text and failure injection (0)
  --failure-rate F               fraction of requests answered 503, 0..1 (0)
  --crash-after N                exit with status 3 after N answered requests
  --hang-health-after DUR        /health hangs from DUR after startup on
  --kv-abort-timeout DUR         free unpulled prefill blocks after DUR (env
                                 VLLM_NIXL_ABORT_REQUEST_TIMEOUT seconds, else 480s)
  --workers N                    worker threads (0 = one per core)
  --default-max-tokens N         tokens when a request sets no limit (16)

Durations are like 10ms, 1.5s, 2m, or bare seconds. Unknown vLLM flags are ignored.
Tokens are estimated as prompt characters / 4 (at least 1).";

/// Reads the environment the way vLLM does; passed in so tests need not touch process env.
pub struct Env<'a> {
    pub side_channel_host: Option<&'a str>,
    pub side_channel_port: Option<&'a str>,
    pub abort_timeout_secs: Option<&'a str>,
}

impl Env<'static> {
    pub fn none() -> Self {
        Env {
            side_channel_host: None,
            side_channel_port: None,
            abort_timeout_secs: None,
        }
    }
}

pub fn parse(args: &[String], env: &Env<'_>) -> Result<SimConfig, ArgsError> {
    let mut cfg = SimConfig::default();
    if let Some(host) = env.side_channel_host.filter(|h| !h.is_empty()) {
        cfg.side_channel_host = host.to_string();
    }
    if let Some(port) = env.side_channel_port {
        cfg.side_channel_port = number("VLLM_NIXL_SIDE_CHANNEL_PORT", port)?;
    }
    if let Some(secs) = env.abort_timeout_secs {
        cfg.kv_abort_timeout = duration("VLLM_NIXL_ABORT_REQUEST_TIMEOUT", secs)?;
    }
    let mut model: Option<String> = None;
    let mut served: Option<String> = None;
    let mut rest = args.iter().peekable();
    if rest.peek().map(|a| a.as_str()) == Some("serve") {
        rest.next();
    }
    while let Some(arg) = rest.next() {
        if arg == "--help" || arg == "-h" {
            return Err(ArgsError::Help);
        }
        if !arg.starts_with('-') {
            if model.is_some() {
                return Err(ArgsError::ExtraPositional(arg.clone()));
            }
            model = Some(arg.clone());
            continue;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        if !is_known(&flag) {
            let value = match inline {
                Some(v) => Some(v),
                None => rest.next_if(|next| !next.starts_with('-')).cloned(),
            };
            tracing::debug!(
                flag,
                ?value,
                "ignoring vLLM flag the simulator does not model"
            );
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => rest
                .next()
                .cloned()
                .ok_or_else(|| ArgsError::MissingValue { flag: flag.clone() })?,
        };
        apply(&mut cfg, &flag, &value, &mut model, &mut served)?;
    }
    if let Some(m) = model {
        cfg.model = m;
    }
    cfg.served_model_name = served.unwrap_or_else(|| cfg.model.clone());
    Ok(cfg)
}

const KNOWN: &[&str] = &[
    "--host",
    "--port",
    "--model",
    "--served-model-name",
    "--side-channel-port",
    "--startup-delay",
    "--prefill-time-per-token",
    "--inter-token-latency",
    "--kv-transfer-latency",
    "--max-num-seqs",
    "--max-model-len",
    "--block-size",
    "--num-blocks",
    "--seed",
    "--failure-rate",
    "--crash-after",
    "--hang-health-after",
    "--kv-abort-timeout",
    "--tensor-parallel-size",
    "-tp",
    "--workers",
    "--default-max-tokens",
];

fn is_known(flag: &str) -> bool {
    KNOWN.contains(&flag)
}

fn apply(
    cfg: &mut SimConfig,
    flag: &str,
    value: &str,
    model: &mut Option<String>,
    served: &mut Option<String>,
) -> Result<(), ArgsError> {
    match flag {
        "--host" => cfg.host = parsed(flag, value)?,
        "--port" => cfg.port = number(flag, value)?,
        "--model" => *model = Some(value.to_string()),
        "--served-model-name" => *served = Some(value.to_string()),
        "--side-channel-port" => cfg.side_channel_port = number(flag, value)?,
        "--startup-delay" => cfg.startup_delay = duration(flag, value)?,
        "--prefill-time-per-token" => cfg.prefill_time_per_token = duration(flag, value)?,
        "--inter-token-latency" => cfg.inter_token_latency = duration(flag, value)?,
        "--kv-transfer-latency" => cfg.kv_transfer_latency = duration(flag, value)?,
        "--max-num-seqs" => cfg.max_num_seqs = positive(flag, value)?,
        "--max-model-len" => cfg.max_model_len = positive(flag, value)?,
        "--block-size" => cfg.block_size = positive(flag, value)?,
        "--num-blocks" => cfg.num_blocks = positive(flag, value)?,
        "--seed" => cfg.seed = number(flag, value)?,
        "--failure-rate" => {
            let rate: f64 = parsed(flag, value)?;
            if !(0.0..=1.0).contains(&rate) {
                return Err(bad(flag, value, "must be between 0 and 1"));
            }
            cfg.failure_rate = rate;
        }
        "--crash-after" => cfg.crash_after = Some(positive(flag, value)?),
        "--hang-health-after" => cfg.hang_health_after = Some(duration(flag, value)?),
        "--kv-abort-timeout" => cfg.kv_abort_timeout = duration(flag, value)?,
        "--tensor-parallel-size" | "-tp" => cfg.tensor_parallel_size = positive(flag, value)?,
        "--workers" => cfg.workers = number(flag, value)?,
        "--default-max-tokens" => cfg.default_max_tokens = positive(flag, value)?,
        _ => unreachable!("flag {flag} is in KNOWN but not handled"),
    }
    Ok(())
}

fn bad(flag: &str, value: &str, reason: impl ToString) -> ArgsError {
    ArgsError::BadValue {
        flag: flag.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn parsed<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, ArgsError>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e| bad(flag, value, e))
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, ArgsError>
where
    T::Err: std::fmt::Display,
{
    parsed(flag, value)
}

fn positive<T>(flag: &str, value: &str) -> Result<T, ArgsError>
where
    T: std::str::FromStr + PartialEq + Default,
    T::Err: std::fmt::Display,
{
    let n: T = parsed(flag, value)?;
    if n == T::default() {
        return Err(bad(flag, value, "must be at least 1"));
    }
    Ok(n)
}

/// `10ms`, `1.5s`, `2m`, or bare (possibly fractional) seconds as vLLM's env vars use.
pub fn duration(flag: &str, value: &str) -> Result<Duration, ArgsError> {
    if let Ok(secs) = value.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(bad(flag, value, "must not be negative"));
    }
    humantime::parse_duration(value).map_err(|e| bad(flag, value, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn accepts_the_planned_vllm_argv() {
        let cfg = parse(
            &args(&[
                "serve",
                "/mnt/models",
                "--port",
                "8200",
                "--served-model-name",
                "qwen",
                "--kv-transfer-config",
                r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#,
                "--tensor-parallel-size",
                "2",
                "--enforce-eager",
                "--gpu-memory-utilization=0.9",
                "--max-model-len",
                "4096",
            ]),
            &Env {
                side_channel_host: Some("127.0.0.2"),
                side_channel_port: Some("5701"),
                abort_timeout_secs: Some("30"),
            },
        )
        .unwrap();
        assert_eq!(cfg.model, "/mnt/models");
        assert_eq!(cfg.served_model_name, "qwen");
        assert_eq!(cfg.port, 8200);
        assert_eq!(cfg.tensor_parallel_size, 2);
        assert_eq!(cfg.max_model_len, 4096);
        assert_eq!(cfg.side_channel_host, "127.0.0.2");
        assert_eq!(cfg.side_channel_port, 5701);
        assert_eq!(cfg.kv_abort_timeout, Duration::from_secs(30));
    }

    #[test]
    fn flags_override_env_and_durations_parse() {
        let cfg = parse(
            &args(&[
                "--model",
                "m",
                "--side-channel-port=6000",
                "--inter-token-latency",
                "5ms",
                "--startup-delay",
                "1.5",
            ]),
            &Env {
                side_channel_host: None,
                side_channel_port: Some("5700"),
                abort_timeout_secs: None,
            },
        )
        .unwrap();
        assert_eq!(cfg.side_channel_port, 6000);
        assert_eq!(cfg.served_model_name, "m");
        assert_eq!(cfg.inter_token_latency, Duration::from_millis(5));
        assert_eq!(cfg.startup_delay, Duration::from_millis(1500));
    }

    #[test]
    fn bad_values_are_reported_with_their_flag() {
        let err = parse(&args(&["--port", "x"]), &Env::none()).unwrap_err();
        assert!(err.to_string().starts_with("--port: invalid value \"x\""));
        assert_eq!(
            parse(&args(&["--port"]), &Env::none()).unwrap_err(),
            ArgsError::MissingValue {
                flag: "--port".into()
            }
        );
        assert!(parse(&args(&["--failure-rate", "2"]), &Env::none()).is_err());
        assert!(parse(&args(&["--max-num-seqs", "0"]), &Env::none()).is_err());
        assert_eq!(
            parse(&args(&["a", "b"]), &Env::none()).unwrap_err(),
            ArgsError::ExtraPositional("b".into())
        );
    }

    #[test]
    fn unknown_flag_takes_a_following_value_but_not_a_flag() {
        let cfg = parse(
            &args(&["m", "--dtype", "bfloat16", "--enforce-eager", "--port", "9"]),
            &Env::none(),
        )
        .unwrap();
        assert_eq!(cfg.model, "m");
        assert_eq!(cfg.port, 9);
    }
}
