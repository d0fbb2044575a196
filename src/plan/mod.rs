//! Placement of replicas on GPUs, ports, and the per-instance spec every runtime consumes.

pub mod model;

pub use model::*;
