//! The routing proxy: NIXL-v2 P/D routing for the daemon (embedded), `pdctl proxy` and
//! `pdctl sidecar`. One engine, two front doors: in pools mode pdctl picks both legs; in
//! sidecar mode the prefill comes from `x-prefiller-host-port` (llm-d's contract). How it is
//! built for speed: docs/proxy.md.
//!
//! Layers, each importing only from the ones below it (the proxy imports `spec` and nothing
//! else of pdctl):
//! - `server` — the front door: `serve`, `serve_embedded`; starts the workers and the load scrape;
//! - `workers` — threads with their own runtimes and engine connections, fed by the listener;
//! - `route` — one request at the door: local answers, API key, body limit, dispatch;
//! - `pd` — the P/D exchange and the decode leg; `relay` — the decode answer on its way out;
//! - `load` — the background `/metrics` scrape for the load-aware picker;
//! - `state` — `Config`, `Mode` and `Proxy` (all the shared state, and every decision that
//!   depends on the front door's mode), `Worker`; `respond` — the proxy's own answers;
//! - `pick`, `upstream`, `rewrite` / `json` / `sse`, `security`, `metrics`, `discovery`,
//!   `endpoints` — leaves.

mod budget;
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
