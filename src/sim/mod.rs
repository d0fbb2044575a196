//! `pdctl sim`: a vLLM-compatible engine simulator with NixlConnector-like P/D semantics.
//! It runs the whole P/D flow without a GPU (the quick start, the tests, the Docker test image,
//! the proxy benchmarks) and is strict where a broken proxy would otherwise go unnoticed: a
//! decode really pulls the prefill's KV blocks over a side channel, and a failed pull is counted.
//! It shares no request-handling code with the proxy, so it cannot hide the proxy's bugs.
//!
//! Layers, each importing only from the ones below it: `server` (listeners and routing) →
//! `completions` (the OpenAI endpoints) → `kv` (the side channel) → `state` (one engine's shared
//! state) → `engine`, `metrics`, `args`, `respond` (leaves).

pub mod args;
mod completions;
pub mod engine;
pub mod kv;
pub mod metrics;
mod respond;
mod server;
mod state;

use std::process::ExitCode;

pub use server::SimError;

/// Entry point for `pdctl sim ARGS...` and for pdctl invoked as `vllm ARGS...`.
pub fn run(args: &[String]) -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let (host, port, abort) = (
        env("VLLM_NIXL_SIDE_CHANNEL_HOST"),
        env("VLLM_NIXL_SIDE_CHANNEL_PORT"),
        env("VLLM_NIXL_ABORT_REQUEST_TIMEOUT"),
    );
    let cfg = match args::parse(
        args,
        &args::Env {
            side_channel_host: host.as_deref(),
            side_channel_port: port.as_deref(),
            abort_timeout_secs: abort.as_deref(),
        },
    ) {
        Ok(cfg) => cfg,
        Err(args::ArgsError::Help) => {
            println!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if cfg.workers > 0 {
        runtime.worker_threads(cfg.workers);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        tokio::select! {
            served = server::serve(cfg) => match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
            _ = shutdown_signal() => ExitCode::SUCCESS,
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
