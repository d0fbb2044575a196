//! Placement of replicas on GPUs, ports, and the per-instance spec every runtime consumes.
//!
//! Entry points: [`plan_file`] (read, check, query the inventory only if needed, build),
//! or [`build`] on an already loaded spec and GPU list; [`plan_file_for_cluster`] and
//! [`build_for_cluster`] for a plan without host placement (Kubernetes exports).

use std::path::Path;

pub mod build;
pub mod instance;
pub mod label;
pub mod model;
pub mod placement;
pub mod ports;
#[cfg(test)]
pub mod testing;

pub use build::{build, build_for_cluster, check, gpus_needed, runtime_plan};
pub use instance::{
    full_instance_name, instance_name, kv_transfer_config, labels, spec_hash, ENGINE_HOST,
};
pub use model::*;

use crate::gpu::{GpuError, GpuInfo, GpuInventory};
use crate::spec::{self, LoadedSpec, Spec, SpecError};

/// Docker's network mode that shares the host's network: the default, so that engines bind
/// their planned ports on the host as local processes do.
pub const HOST_NETWORK_MODE: &str = "host";

/// The Docker network mode `spec` asks for.
pub fn network_mode(spec: &Spec) -> &str {
    spec.runtime
        .network_mode
        .as_deref()
        .unwrap_or(HOST_NETWORK_MODE)
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The file is wrong (located diagnostics).
    #[error("{0}")]
    Invalid(#[from] SpecError),
    /// The GPU inventory could not be read.
    #[error("{0}")]
    Gpu(#[from] GpuError),
}

/// Loads `path`, checks it, and reads the GPUs it needs: everything [`build`] takes. The
/// inventory is queried only when some replica needs a GPU, so CPU/simulated deployments plan on
/// machines without a driver.
pub fn load(
    path: &Path,
    inventory: &dyn GpuInventory,
) -> Result<(LoadedSpec, Vec<GpuInfo>), PlanError> {
    let loaded = spec::load(path)?;
    check(&loaded)?;
    let gpus = if gpus_needed(&loaded.spec) > 0 || loaded.spec.gpus.is_some() {
        let gpus = inventory.gpus()?;
        tracing::debug!(count = gpus.len(), "GPU inventory");
        gpus
    } else {
        tracing::debug!("no replica needs a GPU; inventory not queried");
        Vec::new()
    };
    Ok((loaded, gpus))
}

/// Loads `path`, checks it, and builds its plan (see [`load`]).
pub fn plan_file(path: &Path, inventory: &dyn GpuInventory) -> Result<Plan, PlanError> {
    let (loaded, gpus) = load(path, inventory)?;
    build(&loaded, &gpus)
}

/// Loads `path`, checks it, and builds its plan for a cluster: no host placement, so no
/// GPU inventory (see [`build_for_cluster`]).
pub fn plan_file_for_cluster(path: &Path) -> Result<Plan, PlanError> {
    let loaded = spec::load(path)?;
    build_for_cluster(&loaded)
}
