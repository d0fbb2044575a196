//! `pdctl proxy` (static or DNS-discovered pools) and `pdctl sidecar` (llm-d's flags).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{ArgAction, Args};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::exit::{CliError, CliResult};
use crate::spec::proxy::{PickPolicy, PrefillFailurePolicy, ProxySection};

use crate::proxy::discovery::{self, Sources};
use crate::proxy::security::Allowlist;
use crate::proxy::{serve, Config, Endpoint, EndpointSet, Mode, ProxyError};

/// Flags shared by both front doors; each maps onto a `[proxy]` key of pools.toml.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// round-robin | least-outstanding | load-aware
    #[arg(long, value_parser = parse_policy)]
    pub prefill_policy: Option<PickPolicy>,
    /// round-robin | least-outstanding | load-aware | prefix-affinity
    #[arg(long, value_parser = parse_policy)]
    pub decode_policy: Option<PickPolicy>,
    /// Estimated prompt tokens (chars/4) below which requests go decode-only; 0 = always P/D.
    #[arg(long)]
    pub pd_threshold: Option<u32>,
    /// fail | retry | fallback
    #[arg(long, value_parser = parse_failure)]
    pub prefill_failure: Option<PrefillFailurePolicy>,
    #[arg(long)]
    pub prefill_max_retries: Option<u32>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub prefill_retry_backoff: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub prefill_timeout: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub decode_first_byte_timeout: Option<Duration>,
    /// Request bodies above this many bytes get 413.
    #[arg(long)]
    pub max_body_bytes: Option<u64>,
    /// Open client connections; beyond it 503 and close.
    #[arg(long)]
    pub max_client_connections: Option<usize>,
    /// Request bodies being received, all requests together; beyond it 503.
    #[arg(long)]
    pub max_buffered_body_bytes: Option<u64>,
    /// Clients must send `Authorization: Bearer KEY`.
    #[arg(long, env = "PDCTL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Serve `/metrics` and `/pdctl/metrics` without the API key.
    #[arg(long)]
    pub metrics_public: bool,
    /// Worker threads, each with its own connections (0 = one per 4 cores, 1 to 4).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

impl PolicyArgs {
    fn apply(&self, s: &mut ProxySection) {
        macro_rules! set {
            ($($field:ident => $target:ident),*) => {$(
                if let Some(v) = self.$field.clone() { s.$target = v; }
            )*};
        }
        set!(prefill_policy => prefill_policy, decode_policy => decode_policy,
             pd_threshold => pd_threshold_tokens, prefill_failure => prefill_failure,
             prefill_max_retries => prefill_max_retries,
             prefill_retry_backoff => prefill_retry_backoff, connect_timeout => connect_timeout,
             prefill_timeout => prefill_timeout,
             decode_first_byte_timeout => decode_first_byte_timeout,
             max_body_bytes => max_body_bytes,
             max_buffered_body_bytes => max_buffered_body_bytes,
             max_client_connections => max_client_connections);
        s.metrics_public |= self.metrics_public;
    }
}

fn parse_policy(s: &str) -> Result<PickPolicy, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|_| {
        format!("unknown policy {s:?}: use round-robin, least-outstanding, load-aware or prefix-affinity")
    })
}

fn parse_failure(s: &str) -> Result<PrefillFailurePolicy, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("unknown failure policy {s:?}: use fail, retry or fallback"))
}

#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// Address to serve the OpenAI-compatible API on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// A prefill engine's base URL (repeatable).
    #[arg(long = "prefill", value_name = "URL")]
    pub prefill: Vec<String>,
    /// A decode engine's base URL (repeatable).
    #[arg(long = "decode", value_name = "URL")]
    pub decode: Vec<String>,
    /// NAME:PORT resolved every 5s to all its addresses, e.g. a headless Service (repeatable).
    #[arg(long, value_name = "NAME:PORT")]
    pub prefill_dns: Vec<String>,
    #[arg(long, value_name = "NAME:PORT")]
    pub decode_dns: Vec<String>,
    /// A path beyond the built-in routes to forward to a decode unchanged (repeatable, or
    /// comma-separated; exact match, GET/HEAD/POST). Every other path is 404.
    #[arg(long = "passthrough-path", value_name = "PATH", value_delimiter = ',')]
    pub passthrough_paths: Vec<String>,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SidecarArgs {
    /// Port the sidecar serves on (all interfaces, as in a pod).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[arg(long, default_value = "0.0.0.0")]
    pub host: std::net::IpAddr,
    /// The local decode engine's port.
    #[arg(
        long = "vllm-port",
        visible_alias = "model-server-port",
        default_value_t = 8001
    )]
    pub vllm_port: u16,
    #[arg(
        long = "kv-connector",
        visible_alias = "connector",
        default_value = "nixlv2"
    )]
    pub kv_connector: String,
    /// Only allow-listed prefill targets (`--enable-ssrf-protection` or `=true`).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          default_value = "false", action = ArgAction::Set)]
    pub enable_ssrf_protection: bool,
    /// host or host:port entries, comma-separated (repeatable); a port, when given, is checked.
    #[arg(long, value_delimiter = ',')]
    pub ssrf_allowlist: Vec<String>,
    /// A file of allowlist entries, one per line (`#` comments).
    #[arg(long)]
    pub ssrf_allowlist_file: Option<std::path::PathBuf>,
    /// With SSRF protection: refuse every header-chosen prefill (for pods behind a router that
    /// does P/D itself and never sends the header).
    #[arg(long)]
    pub ssrf_deny_all: bool,
    /// Serve HTTPS. pdctl's sidecar serves plain HTTP: terminate TLS in front of it.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          default_value = "false", action = ArgAction::Set)]
    pub secure_proxy: bool,
    /// llm-d's InferencePool-based allowlist; pdctl uses --ssrf-allowlist instead (accepted so
    /// KServe's template arguments parse; logged).
    #[arg(long)]
    pub inference_pool: Option<String>,
    #[arg(long)]
    pub pool_group: Option<String>,
    #[arg(long)]
    pub cert_path: Option<String>,
    #[arg(long)]
    pub enable_tls: Vec<String>,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// Go's flag package also takes `-flag=value`; KServe's templates leave empty arguments behind.
pub fn normalize_go_flags(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .filter(|a| !a.is_empty())
        .map(|a| {
            if a.starts_with('-') && !a.starts_with("--") && a.len() > 2 {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

pub fn run_proxy(args: ProxyArgs) -> CliResult {
    let mut section = ProxySection {
        listen: args.listen.to_string(),
        passthrough_paths: args.passthrough_paths,
        ..ProxySection::default()
    };
    args.policy.apply(&mut section);
    if let Some(problem) = section.problems().into_iter().next() {
        return Err(CliError::invalid(format!("{}: {}", problem.0, problem.1)));
    }
    if args.prefill.is_empty() && args.prefill_dns.is_empty() {
        return Err(CliError::invalid(
            "give at least one --prefill URL or --prefill-dns NAME:PORT",
        ));
    }
    if args.decode.is_empty() && args.decode_dns.is_empty() {
        return Err(CliError::invalid(
            "give at least one --decode URL or --decode-dns NAME:PORT",
        ));
    }
    let sources = Sources {
        prefill: args.prefill,
        decode: args.decode,
        prefill_dns: args.prefill_dns,
        decode_dns: args.decode_dns,
    };
    let cfg = Config {
        section,
        mode: Mode::Pools,
        api_key: args.policy.api_key,
        workers: args.policy.workers,
    };
    run(cfg, args.listen, sources)
}

pub fn run_sidecar(args: SidecarArgs) -> CliResult {
    if args.kv_connector != "nixlv2" {
        return Err(CliError::invalid(format!(
            "--kv-connector {}: pdctl's sidecar speaks nixlv2 only",
            args.kv_connector
        )));
    }
    if args.secure_proxy || !args.enable_tls.is_empty() {
        return Err(CliError::invalid("pdctl's sidecar serves and dials plain HTTP; pass --secure-proxy=false and terminate TLS in front of it"));
    }
    let ssrf = if args.enable_ssrf_protection {
        let mut entries: Vec<String> = args.ssrf_allowlist.clone();
        if let Some(file) = &args.ssrf_allowlist_file {
            match std::fs::read_to_string(file) {
                Ok(text) => entries.extend(text.lines().map(str::to_string)),
                Err(e) => {
                    return Err(CliError::invalid(format!(
                        "--ssrf-allowlist-file {}: {e}",
                        file.display()
                    )))
                }
            }
        }
        let list = match Allowlist::parse(entries.iter().map(String::as_str)) {
            Ok(list) => list,
            Err(e) => return Err(CliError::invalid(e)),
        };
        if list.is_empty() && !args.ssrf_deny_all {
            return Err(CliError::invalid("--enable-ssrf-protection needs --ssrf-allowlist or --ssrf-allowlist-file (pdctl does not watch InferencePools)"));
        }
        Some(list)
    } else {
        None
    };
    if let Some(pool) = &args.inference_pool {
        tracing::info!(%pool, "ignoring --inference-pool: the allowlist comes from --ssrf-allowlist");
    }
    let mut section = ProxySection {
        prefill_max_retries: 0,
        prefill_retry_backoff: Duration::from_millis(200),
        ..ProxySection::default()
    };
    args.policy.apply(&mut section);
    if let Some(problem) = section.problems().into_iter().next() {
        if problem.0 != "listen" {
            return Err(CliError::invalid(format!("{}: {}", problem.0, problem.1)));
        }
    }
    let listen = SocketAddr::new(args.host, args.port);
    section.listen = listen.to_string();
    let sources = Sources {
        decode: vec![format!("http://127.0.0.1:{}", args.vllm_port)],
        ..Sources::default()
    };
    let cfg = Config {
        section,
        mode: Mode::Sidecar { ssrf },
        api_key: args.policy.api_key,
        workers: args.policy.workers,
    };
    run(cfg, listen, sources)
}

fn run(cfg: Config, listen: SocketAddr, sources: Sources) -> CliResult {
    // This runtime only binds, resolves and waits for signals: requests run on the proxy's own
    // worker threads (see `serve`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failure(anyhow::anyhow!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ProxyError::Bind {
                addr: listen.to_string(),
                source,
            })?;
        let initial = discovery::current(&sources).await;
        log_endpoints(&initial);
        let (tx, rx) = watch::channel(initial);
        let shutdown = CancellationToken::new();
        if sources.has_dns() {
            tokio::spawn(discovery::refresh_forever(sources, tx, shutdown.clone()));
        }
        // A static set never changes: with its sender gone the proxy keeps the set it has.
        tracing::info!(%listen, "proxy listening");
        let stop = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down: draining in-flight requests");
            stop.cancel();
        });
        serve(listener, cfg, rx, shutdown).await?;
        Ok::<(), CliError>(())
    })
}

fn log_endpoints(set: &EndpointSet) {
    let urls = |eps: &[Endpoint]| {
        eps.iter()
            .map(|e| e.url.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    tracing::info!(prefill = %urls(&set.prefill), decode = %urls(&set.decode), "endpoints");
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_flags_and_empty_template_args() {
        let got = normalize_go_flags(
            ["-port=8000", "--vllm-port=8001", "", "-x", "value"].map(String::from),
        );
        assert_eq!(got, ["--port=8000", "--vllm-port=8001", "-x", "value"]);
    }

    #[test]
    fn policy_names_parse() {
        assert_eq!(
            parse_policy("prefix-affinity"),
            Ok(PickPolicy::PrefixAffinity)
        );
        assert!(parse_policy("random").is_err());
        assert_eq!(
            parse_failure("fallback"),
            Ok(PrefillFailurePolicy::Fallback)
        );
    }
}
