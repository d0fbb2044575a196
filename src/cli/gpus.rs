//! `pdctl gpus` and the `--gpus` flag other commands reuse.

use comfy_table::{presets, Table};

use super::exit::CliResult;
use super::OutputFormat;
use crate::gpu::{GpuError, GpuInfo, GpuInventory};

/// `--gpus SPEC` / `PDCTL_GPUS`: a fixed inventory instead of NVML.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GpuArg {
    /// Use this GPU inventory instead of NVML: `4xH100-80GB`, `2xA100-40GB,2xL4-24GB`, or a
    /// JSON file as printed by `pdctl gpus -o json`.
    #[arg(long = "gpus", env = "PDCTL_GPUS", value_name = "SPEC")]
    pub gpus: Option<String>,
}

impl GpuArg {
    pub fn inventory(&self) -> Result<Box<dyn GpuInventory>, GpuError> {
        crate::gpu::from_flag(self.gpus.as_deref())
    }
}

#[derive(Debug, clap::Args)]
pub struct GpusArgs {
    #[command(flatten)]
    pub gpu: GpuArg,
    /// `json` prints the full machine-readable form.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn run(args: GpusArgs) -> CliResult {
    let gpus = args.gpu.inventory()?.gpus()?;
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&gpus).expect("GpuInfo serialises")
        ),
        OutputFormat::Table => println!("{}", table(&gpus)),
    }
    Ok(())
}

pub fn table(gpus: &[GpuInfo]) -> String {
    if gpus.is_empty() {
        return "no GPUs".into();
    }
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header([
        "INDEX",
        "NAME",
        "MEMORY",
        "UUID",
        "PCI",
        "NUMA",
        "NVLINK PEERS",
    ]);
    for g in gpus {
        let opt = |o: Option<String>| o.unwrap_or_else(|| "-".into());
        let peers: Vec<String> = g.nvlink_peers.iter().map(u32::to_string).collect();
        t.add_row([
            g.index.to_string(),
            g.name.clone(),
            if g.memory_bytes == 0 {
                "-".into()
            } else {
                format!("{} GiB", g.memory_bytes >> 30)
            },
            g.uuid.clone(),
            opt(g.pci_bus_id.clone()),
            opt(g.numa_node.map(|n| n.to_string())),
            if peers.is_empty() {
                "-".into()
            } else {
                peers.join(",")
            },
        ]);
    }
    t.trim_fmt()
}
