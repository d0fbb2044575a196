//! A GPU inventory given on the command line: `4xH100-80GB`, `2xA100-40GB,2xL4-24GB`, `4`, or
//! a JSON file holding a list of [`GpuInfo`] (the output of `pdctl gpus --output json`).

use std::path::Path;

use super::{GpuError, GpuInfo, GpuInventory};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedInventory {
    gpus: Vec<GpuInfo>,
}

impl FixedInventory {
    pub fn new(gpus: Vec<GpuInfo>) -> Self {
        FixedInventory { gpus }
    }

    pub fn parse(spec: &str) -> Result<Self, GpuError> {
        let spec = spec.trim();
        if spec.ends_with(".json") || Path::new(spec).is_file() {
            return Self::from_json_file(Path::new(spec));
        }
        let bad = |reason: String| GpuError::BadFixed {
            spec: spec.to_string(),
            reason,
        };
        let mut gpus = Vec::new();
        for group in spec.split(',').map(str::trim) {
            let (count, name) = match group.split_once(['x', '×']) {
                Some((n, name)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => {
                    (n, name)
                }
                _ => (group, "GPU"),
            };
            let count: u32 = count
                .parse()
                .map_err(|_| bad(format!("`{group}` is not COUNTxNAME (e.g. 4xH100-80GB)")))?;
            if count == 0 || name.is_empty() {
                return Err(bad(format!("`{group}` has no GPUs")));
            }
            for _ in 0..count {
                let index = gpus.len() as u32;
                gpus.push(GpuInfo {
                    index,
                    uuid: format!("GPU-fixed-{index}"),
                    name: name.to_string(),
                    memory_bytes: memory_from_name(name),
                    pci_bus_id: None,
                    numa_node: None,
                    nvlink_peers: Vec::new(),
                });
            }
        }
        if gpus.len() > 1024 {
            return Err(bad("more than 1024 GPUs".into()));
        }
        Ok(FixedInventory { gpus })
    }

    fn from_json_file(path: &Path) -> Result<Self, GpuError> {
        let err = |reason: String| GpuError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let gpus: Vec<GpuInfo> = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        for g in &gpus {
            if !seen.insert(g.index) {
                return Err(err(format!("GPU index {} appears twice", g.index)));
            }
        }
        Ok(FixedInventory { gpus })
    }
}

/// `H100-80GB` → 80 GiB; names without a size report 0 (unknown).
fn memory_from_name(name: &str) -> u64 {
    name.rsplit('-')
        .next()
        .and_then(|s| s.strip_suffix("GB"))
        .and_then(|n| n.parse::<u64>().ok())
        .map_or(0, |gb| gb << 30)
}

impl GpuInventory for FixedInventory {
    fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Ok(self.gpus.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_and_name_groups() {
        let inv = FixedInventory::parse("2xH100-80GB, 1xL4").unwrap();
        let g = inv.gpus().unwrap();
        assert_eq!(g.len(), 3);
        assert_eq!(
            (g[0].index, g[0].name.as_str(), g[0].memory_bytes),
            (0, "H100-80GB", 80 << 30)
        );
        assert_eq!(
            (g[2].index, g[2].uuid.as_str(), g[2].memory_bytes),
            (2, "GPU-fixed-2", 0)
        );
        assert_eq!(FixedInventory::parse("4").unwrap().gpus().unwrap().len(), 4);
    }

    #[test]
    fn rejects_nonsense() {
        for s in ["", "0xH100", "xH100", "fourxH100", "4x"] {
            assert!(FixedInventory::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn json_file_round_trips_topology() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gpus.json");
        let gpus = vec![GpuInfo {
            index: 0,
            uuid: "GPU-a".into(),
            name: "H100".into(),
            memory_bytes: 1,
            pci_bus_id: Some("00000000:18:00.0".into()),
            numa_node: Some(0),
            nvlink_peers: vec![1],
        }];
        std::fs::write(&p, serde_json::to_string(&gpus).unwrap()).unwrap();
        let inv = FixedInventory::parse(p.to_str().unwrap()).unwrap();
        assert_eq!(inv.gpus().unwrap(), gpus);
        std::fs::write(&p, "[{\"index\":0}]").unwrap();
        assert!(FixedInventory::parse(p.to_str().unwrap()).is_err());
    }
}
