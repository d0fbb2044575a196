//! The routing proxy: NIXL-v2 P/D routing for the daemon (embedded), `pdctl proxy` and
//! `pdctl sidecar`.

pub mod endpoints;

pub use endpoints::{Endpoint, EndpointSet};
