//! The routing proxy: NIXL-v2 P/D routing for the daemon (embedded), `pdctl proxy` and
//! `pdctl sidecar`. One engine, two front doors: in pool mode pdctl picks both legs from a live
//! [`EndpointSet`]; in sidecar mode the prefill comes from `x-prefiller-host-port` (llm-d).
//! See docs/proxy.md.

mod body;
pub mod cli;
pub mod endpoints;
mod load;
mod metrics;
pub mod pd;
mod pick;
mod policy;
pub mod security;
mod server;
mod sse;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use endpoints::{Endpoint, EndpointSet};
pub use server::{FALLBACK_HEADER, PATH_HEADER};

use crate::spec::proxy::ProxySection;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("environment variable {name} (proxy.api_key_env) is not set or empty")]
    ApiKeyEnv { name: String },
    #[error("bad SSRF allowlist")]
    Allowlist(#[from] security::BadEntry),
    #[error("cannot read {path}")]
    ReadFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// The daemon's entry point: serves the OpenAI API on `listener`, routing over the READY
/// endpoints published on `endpoints`, until `shutdown` is cancelled; then stops accepting and
/// lets in-flight requests finish (bounded, 30 s).
///
/// # Errors
/// [`ProxyError::ApiKeyEnv`] when `section.api_key_env` names an unset variable.
pub async fn serve_embedded(
    listener: TcpListener,
    section: ProxySection,
    endpoints: watch::Receiver<EndpointSet>,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    let mut settings = server::Settings::new(section, server::Mode::Pool);
    if let Some(name) = &settings.section.api_key_env {
        match std::env::var(name) {
            Ok(k) if !k.is_empty() => settings.api_key = Some(k.into_bytes()),
            _ => return Err(ProxyError::ApiKeyEnv { name: name.clone() }),
        }
    }
    server::serve(listener, settings, endpoints, shutdown).await
}
