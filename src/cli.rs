//! Command line: clap commands, human output and exit codes. No business logic here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Validate(crate::plan::cli::ValidateArgs),
    /// Show what would run where: placement, ports and the exact engine specs.
    Plan(crate::plan::cli::PlanArgs),
    /// List this host's GPUs (NVML) or the inventory given with --gpus.
    Gpus(crate::gpu::cli::GpusArgs),
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
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Validate(a) => crate::plan::cli::validate(a),
        Command::Plan(a) => crate::plan::cli::plan(a),
        Command::Gpus(a) => crate::gpu::cli::run(a),
    }
}
