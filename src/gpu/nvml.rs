//! The real inventory, from NVML (libnvidia-ml.so.1, loaded at run time).

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

use super::{GpuError, GpuInfo, GpuInventory};

/// NVML is initialised on each query: pdctl asks once per command, and keeping the library
/// loaded would tie `Device` lifetimes to a long-lived handle for no gain.
#[derive(Debug, Clone, Copy, Default)]
pub struct NvmlInventory;

/// Only a missing library means "no driver here"; permission and driver errors must surface.
pub fn init() -> Result<Nvml, GpuError> {
    Nvml::init().map_err(|e| match e {
        NvmlError::LibloadingError(l) => GpuError::NoDriver(l.to_string()),
        other => GpuError::Nvml(other),
    })
}

impl GpuInventory for NvmlInventory {
    fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let nvml = init()?;
        let count = nvml.device_count()?;
        let mut gpus = Vec::new();
        let mut peer_bus_ids = Vec::new();
        for i in 0..count {
            let dev = nvml.device_by_index(i)?;
            let pci_bus_id = dev.pci_info().ok().map(|p| normalise_bus_id(&p.bus_id));
            let mut peers = Vec::new();
            // NVML has no link count query; links are numbered densely and the first
            // unsupported/invalid index ends them.
            for link in 0..18 {
                let l = dev.link_wrapper_for(link);
                match l.is_active() {
                    Ok(true) => {
                        if let Ok(remote) = l.remote_pci_info() {
                            peers.push(normalise_bus_id(&remote.bus_id));
                        }
                    }
                    Ok(false) => {}
                    Err(_) => break,
                }
            }
            peer_bus_ids.push(peers);
            gpus.push(GpuInfo {
                index: dev.index().unwrap_or(i),
                uuid: dev.uuid()?,
                name: dev.name()?,
                memory_bytes: dev.memory_info().map(|m| m.total).unwrap_or(0),
                pci_bus_id,
                numa_node: dev.numa_node_id().ok(),
                nvlink_peers: Vec::new(),
            });
        }
        resolve_peers(&mut gpus, &peer_bus_ids);
        Ok(gpus)
    }
}

/// NVML spells bus ids with 8 or 4 domain digits and mixed case depending on the call.
fn normalise_bus_id(s: &str) -> String {
    let s = s.trim_end_matches('\0').to_ascii_lowercase();
    match s.split_once(':') {
        Some((domain, rest)) if domain.len() > 4 => {
            format!("{}:{rest}", &domain[domain.len() - 4..])
        }
        _ => s,
    }
}

/// Turns each GPU's NVLink remote bus ids into GPU indices (links to NVSwitches or CPUs
/// have no GPU behind them and are dropped).
fn resolve_peers(gpus: &mut [GpuInfo], peer_bus_ids: &[Vec<String>]) {
    let by_bus: Vec<(String, u32)> = gpus
        .iter()
        .filter_map(|g| g.pci_bus_id.clone().map(|b| (b, g.index)))
        .collect();
    for (g, peers) in gpus.iter_mut().zip(peer_bus_ids) {
        let mut idx: Vec<u32> = peers
            .iter()
            .filter_map(|b| by_bus.iter().find(|(bb, _)| bb == b).map(|(_, i)| *i))
            .filter(|i| *i != g.index)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        g.nvlink_peers = idx;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, bus: &str) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-{index}"),
            name: "H100".into(),
            memory_bytes: 0,
            pci_bus_id: Some(normalise_bus_id(bus)),
            numa_node: None,
            nvlink_peers: vec![],
        }
    }

    #[test]
    fn peers_resolve_by_bus_id_and_drop_switches() {
        let mut g = vec![gpu(0, "00000000:18:00.0"), gpu(1, "0000:2A:00.0")];
        let peers = vec![
            vec![
                "0000:2a:00.0".to_string(),
                "0000:2a:00.0".into(),
                "0000:99:00.0".into(),
            ],
            vec![normalise_bus_id("00000000:18:00.0")],
        ];
        resolve_peers(&mut g, &peers);
        assert_eq!(g[0].nvlink_peers, vec![1]);
        assert_eq!(g[1].nvlink_peers, vec![0]);
    }

    #[test]
    fn without_a_driver_the_error_names_the_library() {
        // On machines with a driver this test has nothing to check.
        if let Err(GpuError::NoDriver(m)) = NvmlInventory.gpus() {
            let shown = GpuError::NoDriver(m).to_string();
            assert!(shown.contains("libnvidia-ml.so.1"), "{shown}");
        }
    }
}
