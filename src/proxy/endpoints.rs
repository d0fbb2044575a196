//! The live set of READY engine endpoints the proxy routes to. The daemon's reconciler publishes
//! it on a `tokio::sync::watch` channel; `pdctl proxy` builds a fixed one from its flags.
//!
//! Contract between the daemon and the proxy (issue 4 implements it in this module tree):
//! `proxy::serve_embedded(listener: tokio::net::TcpListener, section: ProxySection,
//!  endpoints: watch::Receiver<EndpointSet>, shutdown: tokio_util::sync::CancellationToken)
//!  -> Result<(), ProxyError>` serves until `shutdown` is cancelled, then drains in-flight
//! requests. The daemon binds the listener itself so a busy port is reported before startup.

use serde::{Deserialize, Serialize};

/// One engine the proxy may route to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// The plan's instance name (`pdctl-demo-decode-0`), or the URL for static endpoints.
    pub id: String,
    /// Base URL of the engine's OpenAI server, e.g. `http://127.0.0.1:8200`.
    pub url: String,
}

/// Only READY endpoints are published; an instance leaving readiness or being drained
/// disappears from this set before it is stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSet {
    pub prefill: Vec<Endpoint>,
    pub decode: Vec<Endpoint>,
}
