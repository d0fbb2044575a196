//! pdctl: disaggregated prefill/decode LLM serving on one GPU host, exportable to Kubernetes.
//! See `../shared/docs/architecture.md` for the module map; the plan is the one model of a
//! deployment that every other module consumes.

pub mod cli;
pub mod daemon;
pub mod export;
pub mod gpu;
pub mod health;
pub mod plan;
pub mod proxy;
pub mod reconcile;
pub mod runtime;
pub mod sim;
pub mod spec;
