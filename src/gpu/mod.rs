//! GPU inventory: what GPUs this host has and how they are connected. Placement is the
//! planner's; this module only reports.

use serde::{Deserialize, Serialize};

pub mod fixed;
pub mod nvml;

pub use fixed::FixedInventory;
pub use nvml::NvmlInventory;

/// One GPU as NVML (or a fixed inventory) reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuInfo {
    /// NVML index (PCI bus order); the plan sets `CUDA_DEVICE_ORDER=PCI_BUS_ID` to match it.
    pub index: u32,
    pub uuid: String,
    pub name: String,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub pci_bus_id: Option<String>,
    #[serde(default)]
    pub numa_node: Option<u32>,
    /// Indices of GPUs reachable over an active NVLink.
    #[serde(default)]
    pub nvlink_peers: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The only condition under which callers may carry on without GPUs.
    #[error("no NVIDIA driver: libnvidia-ml.so.1 could not be loaded ({0}); use --gpus (e.g. --gpus 4xH100-80GB) or PDCTL_GPUS to plan for GPUs this machine does not have")]
    NoDriver(String),
    #[error("NVML: {0}")]
    Nvml(#[from] nvml_wrapper::error::NvmlError),
    #[error("invalid GPU inventory `{spec}`: {reason}")]
    BadFixed { spec: String, reason: String },
    #[error("cannot read GPU inventory {path}: {reason}")]
    File { path: String, reason: String },
}

/// Where GPUs come from. `gpus` may block (NVML can take seconds on a sick GPU).
pub trait GpuInventory {
    fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError>;
}

/// `--gpus`/`PDCTL_GPUS` when given, else NVML.
pub fn from_flag(flag: Option<&str>) -> Result<Box<dyn GpuInventory>, GpuError> {
    match flag {
        Some(s) => Ok(Box::new(FixedInventory::parse(s)?)),
        None => Ok(Box::new(NvmlInventory)),
    }
}
