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

pub use server::SimError;

/// Runs the simulator, as `pdctl sim ARGS...` or pdctl invoked as `vllm ARGS...`, with vLLM's
/// NIXL environment variables, until SIGTERM or Ctrl-C. `SimError::Args(ArgsError::Help)`
/// asks for `args::USAGE`.
pub fn run(args: &[String]) -> Result<(), SimError> {
    let env = |k: &str| std::env::var(k).ok();
    let (host, port, abort) = (
        env("VLLM_NIXL_SIDE_CHANNEL_HOST"),
        env("VLLM_NIXL_SIDE_CHANNEL_PORT"),
        env("VLLM_NIXL_ABORT_REQUEST_TIMEOUT"),
    );
    let cfg = args::parse(
        args,
        &args::Env {
            side_channel_host: host.as_deref(),
            side_channel_port: port.as_deref(),
            abort_timeout_secs: abort.as_deref(),
        },
    )?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if cfg.workers > 0 {
        runtime.worker_threads(cfg.workers);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .map_err(|source| SimError::Runtime { source })?;
    runtime.block_on(async {
        tokio::select! {
            served = server::serve(cfg) => served,
            _ = shutdown_signal() => Ok(()),
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
