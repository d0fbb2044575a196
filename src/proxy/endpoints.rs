//! The live set of READY engine endpoints the proxy routes to. The daemon's reconciler publishes
//! it on a `tokio::sync::watch` channel; `pdctl proxy` builds a fixed one from its flags.
//! The daemon hands the receiving end to `serve_embedded` (see `server.rs`).

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
