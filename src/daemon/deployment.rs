//! A planned deployment and the runtime it runs on.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{DaemonError, Scale, StateDir};
use crate::gpu::{GpuInfo, GpuInventory};
use crate::plan::{self, Plan, PlanError, RuntimePlan};
use crate::runtime::{DockerRuntime, ProcessRuntime, Runtime, RuntimeError};
use crate::spec::LoadedSpec;

/// A loaded pools.toml plus the GPUs it was planned on: enough to re-plan for `scale`.
#[derive(Clone)]
pub struct Deployment {
    pub loaded: LoadedSpec,
    pub gpus: Vec<GpuInfo>,
}

impl Deployment {
    pub fn load(path: &Path, inventory: &dyn GpuInventory) -> Result<Self, PlanError> {
        let (loaded, gpus) = plan::load(path, inventory)?;
        Ok(Deployment { loaded, gpus })
    }

    pub fn project(&self) -> &str {
        &self.loaded.project
    }

    /// The plan with `scale` applied over the file's replica counts.
    pub fn plan(&self, scale: Scale) -> Result<Plan, PlanError> {
        let mut l = self.loaded.clone();
        if let Some(n) = scale.prefill {
            l.spec.prefill.replicas = n;
        }
        if let Some(n) = scale.decode {
            l.spec.decode.replicas = n;
        }
        plan::build(&l, &self.gpus)
    }
}

/// The runtime a plan asks for ([`plan::runtime_plan`] when only listing, stopping or reading
/// logs); local processes keep their records in the project's state directory and start without
/// the `withheld_env` variables of the daemon's environment (containers inherit nothing).
pub async fn connect_runtime(
    runtime: &RuntimePlan,
    state: &StateDir,
    withheld_env: &[String],
) -> Result<Arc<dyn Runtime>, RuntimeError> {
    Ok(match runtime {
        RuntimePlan::Docker {
            pull_policy,
            network_mode,
            ..
        } => Arc::new(DockerRuntime::connect(*pull_policy, network_mode).await?),
        RuntimePlan::Process { .. } => {
            Arc::new(ProcessRuntime::new(&state.dir)?.withholding(withheld_env))
        }
    })
}

/// Stops and removes every instance of `project`, in parallel. Returns how many there were.
pub async fn stop_all(
    rt: &dyn Runtime,
    project: &str,
    grace: Duration,
) -> Result<usize, DaemonError> {
    let found = rt.list(project).await?;
    let n = found.len();
    let stops = found.iter().map(|o| async move {
        if let Err(e) = rt.stop(&o.name, grace).await {
            tracing::warn!(instance = %o.name, error = %e, "stop failed");
        }
        if let Err(e) = rt.remove(&o.name).await {
            tracing::warn!(instance = %o.name, error = %e, "remove failed");
        }
    });
    futures_util::future::join_all(stops).await;
    Ok(n)
}

/// The address clients use: a wildcard listen address is reached on loopback.
pub fn endpoint_url(listen: &str) -> String {
    let host_port = listen
        .replace("0.0.0.0:", "127.0.0.1:")
        .replace("[::]:", "127.0.0.1:");
    format!("http://{host_port}")
}
