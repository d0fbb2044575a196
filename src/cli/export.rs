//! `pdctl export kserve|k8s|compose -f FILE [-o DIR]`.

use std::path::PathBuf;

use super::exit::{CliError, CliResult};
use super::gpus::GpuArg;
use super::FileArg;
use crate::plan::PlanError;

use crate::export::{render, Kind, Options, Sidecar};

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// What to render.
    #[arg(value_enum)]
    pub kind: Kind,
    #[command(flatten)]
    pub file: FileArg,
    /// Write `<project>-<kind>.yaml` into this directory instead of printing to stdout.
    #[arg(short = 'o', long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// kserve: also render LLMInferenceServiceConfig templates, referenced by baseRefs.
    #[arg(long)]
    pub with_configs: bool,
    /// The routing sidecar: `llm-d` (KServe's default image), `pdctl`, or an image running
    /// `pdctl sidecar`.
    #[arg(long, default_value = "llm-d")]
    pub sidecar_image: String,
    /// The image that runs pdctl itself (router, pdctl sidecar, simulator engines).
    #[arg(long)]
    pub pdctl_image: Option<String>,
    /// compose: this host's GPUs (NVML) unless `--gpus` is given, as for `pdctl plan`.
    /// kserve and k8s plan against as many GPUs as needed: the cluster schedules them.
    #[command(flatten)]
    pub gpu: GpuArg,
}

pub fn run(args: ExportArgs) -> CliResult {
    // A cluster schedules GPUs itself: placement on this host only matters to compose.
    let plan = match args.kind {
        Kind::Compose => args
            .gpu
            .inventory()
            .map_err(PlanError::Gpu)
            .and_then(|inventory| crate::plan::plan_file(&args.file.file, inventory.as_ref())),
        Kind::Kserve | Kind::K8s => crate::plan::plan_file_for_cluster(&args.file.file),
    };
    let plan = plan?;
    let pdctl_image = args
        .pdctl_image
        .unwrap_or_else(crate::export::pod::pdctl_image);
    let sidecar = match args.sidecar_image.as_str() {
        "llm-d" => Sidecar::LlmD,
        "pdctl" => Sidecar::Pdctl(pdctl_image.clone()),
        image => Sidecar::Pdctl(image.to_string()),
    };
    let opts = Options {
        with_configs: args.with_configs,
        sidecar,
        pdctl_image,
    };
    let text = render(args.kind, &plan, &opts)?;
    match args.output {
        None => print!("{text}"),
        Some(dir) => {
            let kind = format!("{:?}", args.kind).to_lowercase();
            let path = dir.join(format!("{}-{kind}.yaml", plan.project));
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&path, &text))
                .map_err(|e| {
                    CliError::failure(anyhow::anyhow!("cannot write {}: {e}", path.display()))
                })?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
