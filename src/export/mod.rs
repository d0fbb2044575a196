//! Renders a plan as Kubernetes or Compose manifests. The exporter never re-derives what the
//! plan knows: images, argv, env, probes, shm and GPU counts all come from its instances, so
//! a local run and a cluster run stay equivalent by construction (see tests/export_*.rs).

pub mod compose;
pub mod k8s;
pub mod kserve;
pub mod pod;
mod yaml;

use thiserror::Error;

use crate::plan::{Plan, Role};

pub use pod::Sidecar;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// KServe LLMInferenceService (+ LLMInferenceServiceConfig with --with-configs).
    Kserve,
    /// Plain Deployments and Services, with `pdctl proxy` as the router.
    K8s,
    /// A Compose file equivalent to the local Docker run.
    Compose,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub with_configs: bool,
    pub sidecar: Sidecar,
    /// The image that runs pdctl itself (router, sidecar, simulator).
    pub pdctl_image: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            with_configs: false,
            sidecar: Sidecar::LlmD,
            pdctl_image: pod::pdctl_image(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("the plan has no {0} instance")]
    NoInstance(Role),
    #[error("writing YAML: {0}")]
    Yaml(#[from] serde_saphyr::SerializeError),
}

/// The YAML text for `kind`, header comment included; deterministic for a given plan.
pub fn render(kind: Kind, plan: &Plan, opts: &Options) -> Result<String, ExportError> {
    let mut out = yaml::header(plan, kind);
    match kind {
        Kind::Kserve => yaml::documents(&mut out, &kserve::render(plan, opts)?)?,
        Kind::K8s => yaml::documents(&mut out, &k8s::render(plan, opts)?)?,
        Kind::Compose => yaml::document(&mut out, &compose::render(plan, opts)?)?,
    }
    Ok(out)
}
