//! Command line: clap commands, human output and exit codes. No business logic here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod daemon;
pub mod exit;
pub mod export;
pub mod gpus;
pub mod plan;
mod progress;
pub mod proxy;

#[derive(Debug, Parser)]
#[command(
    name = "pdctl",
    version,
    about = "Disaggregated prefill/decode LLM serving on one GPU host"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PDCTL_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a pools.toml without looking at GPUs or Docker.
    Validate(plan::ValidateArgs),
    /// Show what would run where: placement, ports and the exact engine specs.
    Plan(plan::PlanArgs),
    /// List this host's GPUs (NVML) or the inventory given with --gpus.
    Gpus(gpus::GpusArgs),
    /// Render the deployment for Kubernetes (KServe or plain) or Compose.
    Export(export::ExportArgs),
    /// The P/D routing proxy alone, in front of engines started elsewhere.
    Proxy(proxy::ProxyArgs),
    /// Drop-in for llm-d's routing sidecar in a Kubernetes decode pod (llm-d's flag names).
    Sidecar(proxy::SidecarArgs),
    /// Start the deployment (engines, health, proxy) and keep it running; `-d` detaches.
    Up(daemon::UpArgs),
    /// Stop the deployment: the proxy drains, engines stop, nothing is left behind.
    Down(daemon::DownArgs),
    /// Instances with state, readiness, restarts and last exit reason.
    Status(daemon::StatusArgs),
    /// An instance's output (`-f` follows).
    Logs(daemon::LogsArgs),
    /// Change replica counts of the running deployment: `pdctl scale prefill=2 decode=1`.
    Scale(daemon::ScaleArgs),
    /// Run a simulated vLLM engine (P/D semantics, no GPU); `pdctl sim --help` for its flags.
    #[command(disable_help_flag = true)]
    Sim {
        /// vLLM-style arguments: `[serve] [MODEL] [--flag value]...`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// `-f/--file` for every command that works on a deployment.
#[derive(Debug, Clone, clap::Args)]
pub struct FileArg {
    /// The deployment file.
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        default_value = "pools.toml"
    )]
    pub file: std::path::PathBuf,
}

/// `-o/--output` for commands that print either a table or JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
}

/// Logs go to stderr so that stdout stays machine-readable (`--output json`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PDCTL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

pub fn main() -> ExitCode {
    // A container image can put pdctl where vLLM would be: invoked as `vllm`, it is the simulator.
    let mut argv = std::env::args();
    let invoked_as = argv.next().unwrap_or_default();
    if std::path::Path::new(&invoked_as).file_name() == Some(std::ffi::OsStr::new("vllm")) {
        init_logging(LogFormat::Text);
        return match sim(&argv.collect::<Vec<_>>()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => e.report(),
        };
    }
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("sidecar") {
        let rest = proxy::normalize_go_flags(args.split_off(2));
        args.extend(rest);
    }
    let cli = Cli::parse_from(args);
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Validate(a) => plan::validate(a),
        Command::Plan(a) => plan::plan(a),
        Command::Gpus(a) => gpus::run(a),
        Command::Up(a) => daemon::up(a),
        Command::Down(a) => daemon::down(a),
        Command::Status(a) => daemon::status(a),
        Command::Logs(a) => daemon::logs(a),
        Command::Scale(a) => daemon::scale(a),
        Command::Sim { args } => sim(&args),
        Command::Proxy(a) => proxy::run_proxy(a),
        Command::Export(a) => export::run(a),
        Command::Sidecar(a) => proxy::run_sidecar(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    }
}

/// `pdctl sim`, or pdctl invoked as `vllm`: bad arguments show the usage as well.
fn sim(args: &[String]) -> exit::CliResult {
    use crate::sim::args::{ArgsError, USAGE};
    use crate::sim::SimError;
    match crate::sim::run(args) {
        Err(SimError::Args(ArgsError::Help)) => {
            println!("{USAGE}");
            Ok(())
        }
        Err(SimError::Args(e)) => Err(exit::CliError::invalid(format!("{e}\n\n{USAGE}"))),
        result => result.map_err(exit::CliError::failure),
    }
}
