//! `pdctl export kserve|k8s|compose -f FILE [-o DIR]`.

use std::path::PathBuf;

use super::exit::{CliError, CliResult};
use super::gpus::GpuArg;
use super::FileArg;
use crate::export::{render, Kind, Options, Sidecar};

/// What to render (clap's names and help for [`Kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// KServe LLMInferenceService (+ LLMInferenceServiceConfig with --with-configs).
    Kserve,
    /// Plain Deployments and Services, with `pdctl proxy` as the router.
    K8s,
    /// A Compose file equivalent to the local Docker run.
    Compose,
}

impl From<KindArg> for Kind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Kserve => Kind::Kserve,
            KindArg::K8s => Kind::K8s,
            KindArg::Compose => Kind::Compose,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// What to render.
    #[arg(value_enum)]
    pub kind: KindArg,
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
    let kind = Kind::from(args.kind);
    let plan = match kind {
        Kind::Compose => crate::plan::plan_file(&args.file.file, args.gpu.inventory()?.as_ref())?,
        Kind::Kserve | Kind::K8s => crate::plan::plan_file_for_cluster(&args.file.file)?,
    };
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
    let text = render(kind, &plan, &opts)?;
    match args.output {
        None => print!("{text}"),
        Some(dir) => {
            let kind = format!("{kind:?}").to_lowercase();
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
