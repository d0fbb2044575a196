//! The routing proxy: NIXL-v2 P/D routing for the daemon (embedded), `pdctl proxy` and
//! `pdctl sidecar`. One engine, two front doors: in pools mode pdctl picks both legs; in
//! sidecar mode the prefill comes from `x-prefiller-host-port` (llm-d's contract).

pub(crate) mod discovery;
pub mod endpoints;
mod json;
mod load;
pub mod metrics;
mod pd;
pub mod pick;
mod relay;
mod respond;
pub mod rewrite;
mod route;
pub mod security;
mod server;
pub mod sse;
mod state;
mod upstream;
mod workers;

pub use endpoints::{Endpoint, EndpointSet};
pub use pd::PATH_HEADER;
pub use server::{serve, serve_embedded};
pub use state::{Config, Mode, ProxyError};
