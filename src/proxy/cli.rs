//! `pdctl proxy` (static endpoint sets) and `pdctl sidecar` (llm-d's flags), both served by the
//! same engine as the daemon's embedded proxy.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgAction, Parser};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::endpoints::{Endpoint, EndpointSet};
use super::security::Allowlist;
use super::server::{self, Mode, Settings};
use crate::spec::proxy::{PickPolicy, PrefillFailurePolicy, ProxySection};

fn kebab<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|e| e.to_string())
}
fn policy(s: &str) -> Result<PickPolicy, String> {
    kebab(s).map_err(|_| {
        "expected round-robin, least-outstanding, load-aware or prefix-affinity".into()
    })
}
fn failure(s: &str) -> Result<PrefillFailurePolicy, String> {
    kebab(s).map_err(|_| "expected fail, retry or fallback".into())
}

/// Flags shared by both front doors; unset ones keep the `[proxy]` defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct Tuning {
    /// round-robin | least-outstanding | load-aware | prefix-affinity
    #[arg(long, value_parser = policy)]
    pub prefill_policy: Option<PickPolicy>,
    /// round-robin | least-outstanding | load-aware | prefix-affinity
    #[arg(long, value_parser = policy)]
    pub decode_policy: Option<PickPolicy>,
    /// Estimated prompt tokens (chars/4) below which requests go decode-only; 0 = always P/D.
    #[arg(long)]
    pub pd_threshold_tokens: Option<u32>,
    /// What a failed prefill leg does: fail | retry | fallback (decode-only, marked and counted).
    #[arg(long, value_parser = failure)]
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
    /// Clients must send `Authorization: Bearer <key>` (compared in constant time).
    #[arg(long, env = "PDCTL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl Tuning {
    fn apply(&self, s: &mut ProxySection) {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.clone() { s.$f = v; } )* };
        }
        set!(
            prefill_policy,
            decode_policy,
            pd_threshold_tokens,
            prefill_failure,
            prefill_max_retries,
            prefill_retry_backoff,
            connect_timeout,
            prefill_timeout,
            decode_first_byte_timeout,
            max_body_bytes
        );
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Address to serve the OpenAI API on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: String,
    /// A prefill engine's base URL (repeat for more).
    #[arg(long = "prefill", value_name = "URL", required = true)]
    pub prefill: Vec<String>,
    /// A decode engine's base URL (repeat for more).
    #[arg(long = "decode", value_name = "URL", required = true)]
    pub decode: Vec<String>,
    #[command(flatten)]
    pub tuning: Tuning,
}

pub fn run_proxy(args: ProxyArgs) -> ExitCode {
    let mut section = ProxySection {
        listen: args.listen.clone(),
        ..ProxySection::default()
    };
    args.tuning.apply(&mut section);
    let eps = |urls: &[String]| {
        urls.iter()
            .map(|u| Endpoint {
                id: u.clone(),
                url: u.clone(),
            })
            .collect()
    };
    let set = EndpointSet {
        prefill: eps(&args.prefill),
        decode: eps(&args.decode),
    };
    let mut settings = Settings::new(section, Mode::Pool);
    settings.api_key = args.tuning.api_key.map(String::into_bytes);
    exit(serve_blocking(args.listen, settings, set))
}

/// `pdctl sidecar`: llm-d routing sidecar flags, also in Go's `-flag=value` form.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "pdctl sidecar",
    about = "Drop-in for the llm-d routing sidecar (nixlv2)"
)]
pub struct SidecarArgs {
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// The local decode engine's port (llm-d RT name; default 8200 as in RT).
    #[arg(long)]
    pub model_server_port: Option<u16>,
    /// Deprecated llm-d name of --model-server-port.
    #[arg(long)]
    pub vllm_port: Option<u16>,
    /// KV connector protocol; only nixlv2 is implemented.
    #[arg(long, alias = "connector", default_value = "nixlv2")]
    pub kv_connector: String,
    /// Refuse prefill targets outside the allowlist (403). Accepts `--enable-ssrf-protection=true`.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", action = ArgAction::Set)]
    pub enable_ssrf_protection: bool,
    /// Allowed prefill hosts or host:port pairs (comma-separated, repeatable). A bare host
    /// allows any port; host:port only that port.
    #[arg(long = "ssrf-allowlist", value_name = "HOSTS")]
    pub ssrf_allowlist: Vec<String>,
    /// File with allowlist entries (one or more per line, `#` comments).
    #[arg(long = "ssrf-allowlist-file", value_name = "FILE")]
    pub ssrf_allowlist_file: Option<PathBuf>,
    /// Rotate over several prefill candidates in the header instead of taking the first.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", action = ArgAction::Set)]
    pub enable_prefiller_sampling: bool,
    /// Serve HTTPS. Not implemented: only `--secure-proxy=false` is accepted.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", action = ArgAction::Set)]
    pub secure_proxy: bool,
    /// Directory with tls.crt/tls.key (only with --secure-proxy, which is not implemented).
    #[arg(long)]
    pub cert_path: Option<PathBuf>,
    /// Upstream TLS stages (not implemented; any value is refused).
    #[arg(long)]
    pub enable_tls: Vec<String>,
    /// Accepted for KServe's template; pods are not watched: use --ssrf-allowlist(-file).
    #[arg(long)]
    pub inference_pool: Option<String>,
    /// Accepted for KServe's template (see --inference-pool).
    #[arg(long)]
    pub pool_group: Option<String>,
    /// Only 1 (no data-parallel rank listeners).
    #[arg(long, default_value_t = 1)]
    pub data_parallel_size: u32,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// Go's flag package spells long flags with one dash (`-port=8000`); clap wants two.
pub fn normalize_go_flags(args: &[String]) -> Vec<String> {
    args.iter()
        .map(|a| {
            let single = a.starts_with('-') && !a.starts_with("--");
            let name_len = a[1..].split('=').next().map_or(0, str::len);
            if single && name_len > 1 && a.as_bytes().get(1).is_some_and(u8::is_ascii_alphabetic) {
                format!("-{a}")
            } else {
                a.clone()
            }
        })
        .collect()
}

pub fn run_sidecar(raw: &[String]) -> ExitCode {
    let argv = std::iter::once("pdctl sidecar".to_string()).chain(normalize_go_flags(raw));
    let args = match SidecarArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    exit(sidecar(args))
}

fn sidecar(args: SidecarArgs) -> anyhow::Result<()> {
    if args.kv_connector != "nixlv2" {
        bail!(
            "--kv-connector {:?} is not supported: pdctl sidecar speaks nixlv2 only",
            args.kv_connector
        );
    }
    if args.secure_proxy || args.cert_path.is_some() || !args.enable_tls.is_empty() {
        bail!("TLS is not implemented in pdctl sidecar; pass --secure-proxy=false and no --cert-path/--enable-tls");
    }
    if args.data_parallel_size != 1 {
        bail!(
            "--data-parallel-size {} is not supported (only 1)",
            args.data_parallel_size
        );
    }
    let allowlist = if args.enable_ssrf_protection {
        let mut sources = args.ssrf_allowlist.clone();
        if let Some(p) = &args.ssrf_allowlist_file {
            sources.push(
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
            );
        }
        let list = Allowlist::parse(sources.iter().map(String::as_str))?;
        if list.is_empty() {
            bail!(
                "--enable-ssrf-protection needs --ssrf-allowlist or --ssrf-allowlist-file \
                 (pdctl does not watch InferencePool pods)"
            );
        }
        Some(list)
    } else {
        None
    };
    let port = args.model_server_port.or(args.vllm_port).unwrap_or(8200);
    let mut section = ProxySection {
        listen: format!("{}:{}", args.host, args.port),
        // llm-d RT: retries only when asked, then the prefill's error goes to the client.
        prefill_failure: PrefillFailurePolicy::Retry,
        prefill_max_retries: 0,
        prefill_retry_backoff: Duration::from_millis(200),
        ..ProxySection::default()
    };
    args.tuning.apply(&mut section);
    let url = format!("http://127.0.0.1:{port}");
    let set = EndpointSet {
        prefill: vec![],
        decode: vec![Endpoint {
            id: "decode".into(),
            url,
        }],
    };
    let listen = section.listen.clone();
    let mut settings = Settings::new(
        section,
        Mode::Sidecar {
            allowlist,
            sample: args.enable_prefiller_sampling,
        },
    );
    settings.api_key = args.tuning.api_key.map(String::into_bytes);
    serve_blocking(listen, settings, set)
}

fn exit(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve_blocking(listen: String, settings: Settings, set: EndpointSet) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            stop.cancel();
        });
        // The sender lives as long as the server: a static set never changes.
        let (_tx, rx) = watch::channel(set);
        server::serve(listener, settings, rx, shutdown).await?;
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
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

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn go_style_flags() {
        assert_eq!(
            normalize_go_flags(&s(&[
                "-port=8000",
                "--vllm-port",
                "1",
                "-h",
                "-connector",
                "nixlv2",
                "-1"
            ])),
            s(&[
                "--port=8000",
                "--vllm-port",
                "1",
                "-h",
                "--connector",
                "nixlv2",
                "-1"
            ])
        );
    }

    #[test]
    fn sidecar_flags_parse_like_llmd() {
        let argv = [
            "x",
            "--port=8000",
            "--vllm-port=8001",
            "--kv-connector=nixlv2",
            "--enable-ssrf-protection=true",
            "--pool-group=inference.networking.x-k8s.io",
            "--inference-pool=ns/pool",
            "--secure-proxy=false",
            "--prefill-max-retries=2",
            "--prefill-retry-backoff=1ms",
            "--ssrf-allowlist=a,b:1",
        ];
        let a = SidecarArgs::try_parse_from(argv).unwrap();
        assert!(a.enable_ssrf_protection);
        assert!(!a.secure_proxy);
        assert_eq!(a.vllm_port, Some(8001));
        assert_eq!(a.tuning.prefill_max_retries, Some(2));
        assert_eq!(
            a.tuning.prefill_retry_backoff,
            Some(Duration::from_millis(1))
        );
        let b =
            SidecarArgs::try_parse_from(["x", "--enable-ssrf-protection", "--connector", "nixlv2"])
                .unwrap();
        assert!(b.enable_ssrf_protection);
        let go: Vec<String> = normalize_go_flags(&s(&["-port=9", "-enable-ssrf-protection=false"]));
        let c = SidecarArgs::try_parse_from(std::iter::once("x".to_string()).chain(go)).unwrap();
        assert_eq!(c.port, 9);
        assert!(!c.enable_ssrf_protection);
    }

    #[test]
    fn sidecar_refuses_what_it_cannot_do() {
        let parse = |v: &[&str]| {
            SidecarArgs::try_parse_from(std::iter::once("x").chain(v.iter().copied())).unwrap()
        };
        assert!(sidecar(parse(&["--kv-connector=sglang"])).is_err());
        assert!(sidecar(parse(&["--secure-proxy"])).is_err());
        assert!(sidecar(parse(&["--enable-ssrf-protection"])).is_err());
    }
}
