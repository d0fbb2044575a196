//! pdctl: disaggregated prefill/decode LLM serving on one GPU host, exportable to Kubernetes.
//!
//! The plan is the one model of a deployment that every other module consumes. Imports only
//! point down this list (a module uses those below it, never those above):
//!
//! | layer | modules | role |
//! |---|---|---|
//! | front door | [`cli`] | clap commands, tables, progress, the error → exit status map |
//! | lifecycle | [`daemon`] | one process per project: lock, control socket, detach, down |
//! | control loop | [`reconcile`] | desired plan vs observed instances: create, restart, remove |
//! | execution | [`runtime`], [`health`] | Docker or local processes; probes |
//! | rendering | [`export`] | KServe, Kubernetes and Compose manifests from a plan |
//! | model | [`plan`] | placement, ports, the exact spec of every instance |
//! | host | [`gpu`] | the GPU inventory (NVML or fixed) |
//! | input | [`spec`] | pools.toml, its validation and the shared vocabulary |
//!
//! [`proxy`] (P/D routing) and [`sim`] (an engine simulator) stand beside the stack: they use
//! only `spec`, neither imports the other, and neither imports `runtime`. `docs/architecture.md`
//! explains the map; `tests/layering.rs` checks it against the source.

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
