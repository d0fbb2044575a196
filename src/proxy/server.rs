//! The proxy's front door: starts a proxy on a listener (`serve`, and `serve_embedded` for the
//! daemon), keeps its pools current, and hands the connections to the worker threads.

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::spec::proxy::{PickPolicy, ProxySection};

use super::endpoints::EndpointSet;
use super::load;
use super::state::{Config, Mode, Proxy, ProxyError};
use super::workers;

/// The daemon's entry point: serves the ready endpoints the daemon publishes on `endpoints`
/// until `shutdown`, then drains in-flight requests. The daemon binds `listener` itself, so a
/// busy port is reported before anything starts.
pub async fn serve_embedded(
    listener: TcpListener,
    section: ProxySection,
    endpoints: watch::Receiver<EndpointSet>,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    let api_key = match section.api_key_env.as_deref() {
        None => None,
        Some(name) => match std::env::var(name) {
            Ok(key) if !key.is_empty() => Some(key),
            _ => {
                return Err(ProxyError::ApiKeyEnv {
                    name: name.to_string(),
                })
            }
        },
    };
    let cfg = Config {
        section,
        mode: Mode::Pools,
        api_key,
        workers: 0,
    };
    serve(listener, cfg, endpoints, shutdown).await
}

pub async fn serve(
    listener: TcpListener,
    cfg: Config,
    mut endpoints: watch::Receiver<EndpointSet>,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    let workers = workers::count(cfg.workers);
    let proxy = Proxy::new(cfg);
    proxy.refresh_endpoints(&mut endpoints);
    // Workers also check for a new set before each request (see `Worker::refresh`); this task
    // keeps the pools current for the load scrape while no request comes.
    let watcher = {
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        let mut endpoints = endpoints.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = endpoints.changed() => {
                        if changed.is_err() { return; }
                        proxy.refresh_endpoints(&mut endpoints);
                    }
                    _ = shutdown.cancelled() => return,
                }
            }
        })
    };
    let uses_load = [
        proxy.cfg.section.prefill_policy,
        proxy.cfg.section.decode_policy,
    ]
    .contains(&PickPolicy::LoadAware);
    if uses_load {
        tokio::spawn(load::scrape_forever(proxy.clone(), shutdown.clone()));
    }
    let started = workers::run(listener, &proxy, &endpoints, &shutdown, workers).await;
    watcher.abort();
    started
}
