//! The plan: the single model of a deployment that the runtimes, the proxy and the Kubernetes
//! exporter all consume. It is pure data, serialised as the `pdctl plan --output json` contract,
//! so every field here is part of a documented, stable interface (see README "Plan JSON").

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::proxy::ProxySection;
pub use crate::spec::vocab::{PullPolicy, RestartPolicy, Role};

/// Bumped only on an incompatible change of the JSON shape. 2: an instance's engine (command,
/// model, args, env) is separate from its host bindings; `argv`/`env` are gone, `gpu_count` new.
pub const PLAN_SCHEMA_VERSION: u32 = 2;

/// vLLM's NIXL side channel: where peers reach an engine to pull its KV blocks.
pub const NIXL_SIDE_CHANNEL_HOST: &str = "VLLM_NIXL_SIDE_CHANNEL_HOST";
pub const NIXL_SIDE_CHANNEL_PORT: &str = "VLLM_NIXL_SIDE_CHANNEL_PORT";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub schema_version: u32,
    /// Deployment name: container names, labels, state directory and exported object names.
    pub project: String,
    /// The pools.toml this plan was computed from (as given on the command line).
    pub source: PathBuf,
    pub model: ModelPlan,
    pub runtime: RuntimePlan,
    pub proxy: ProxySection,
    /// Prefill instances first, then decode, each ordered by index.
    pub instances: Vec<Instance>,
}

impl Plan {
    /// The instances of one role, by index.
    pub fn instances_of(&self, role: Role) -> impl Iterator<Item = &Instance> {
        self.instances.iter().filter(move |i| i.role == role)
    }

    pub fn instance(&self, name: &str) -> Option<&Instance> {
        self.instances.iter().find(|i| i.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPlan {
    /// The name clients send as `"model"` (vLLM `--served-model-name`).
    pub served_name: String,
    pub source: ModelSource,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSource {
    /// A host directory, bind-mounted read-only at `/mnt/models` (KServe's model mount point).
    Path { host_path: PathBuf },
    /// A Hugging Face id, downloaded by the engine into `cache_dir` (mounted at `/models`).
    HuggingFace { id: String, cache_dir: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuntimePlan {
    Docker {
        image: String,
        pull_policy: PullPolicy,
        network_mode: String,
    },
    Process {
        /// The engine program and its leading arguments (e.g. `["pdctl", "sim"]` or a venv's
        /// `vllm`); each instance's `engine.command` is it.
        command: Vec<String>,
    },
}

/// One engine replica: everything a runtime needs to start it and a prober needs to watch it.
///
/// What the engine runs is in `engine`, the same wherever it runs. Where it runs is in the host
/// bindings `gpus`, `http_port` and `side_channel_port`: Docker and local processes bind them
/// on this host ([`Instance::argv`], [`Instance::env`]), a Kubernetes pod binds its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// `pdctl-<project>-<role>-<index>`: container name, process name, K8s-safe.
    pub name: String,
    pub role: Role,
    pub index: u32,
    /// Host binding: the host's GPUs placement gave this replica. Empty for CPU/simulated
    /// engines, and in a plan built without host placement (for a cluster).
    pub gpus: Vec<GpuAssignment>,
    /// How many GPUs the replica needs (`gpus_per_replica`); `gpus` has as many once placed.
    pub gpu_count: u32,
    /// Host binding: the port the engine's OpenAI server listens on here (vLLM `--port`).
    pub http_port: u16,
    /// Host binding: `VLLM_NIXL_SIDE_CHANNEL_PORT` here.
    pub side_channel_port: u16,
    /// Host binding: the engine's `--host` here (loopback), unless the pool's `args` name one
    /// or a Docker bridge network publishes its ports. A pod listens on its own IP.
    #[serde(default)]
    pub listen_host: Option<String>,
    /// Docker runtime only.
    pub image: Option<String>,
    pub engine: Engine,
    pub mounts: Vec<Mount>,
    /// `/dev/shm` size as written (Kubernetes quantity) and in bytes.
    pub shm_size: String,
    pub shm_size_bytes: u64,
    /// Namespaces UCX needs for CUDA IPC between prefill and decode on one host.
    pub ipc_mode: NamespaceMode,
    pub pid_mode: NamespaceMode,
    pub probes: Probes,
    /// pdctl's labels (project, role, index, spec hash, version) plus KServe-style ones.
    pub labels: BTreeMap<String, String>,
    pub restart_policy: RestartPolicy,
    pub stop_signal: String,
    pub stop_grace_seconds: u32,
    /// Hash of everything above that changes what runs: a changed hash means replace.
    pub spec_hash: String,
}

impl Instance {
    /// The argv on this host: the engine serving its model on `http_port`.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = self.engine.argv(&self.engine.model, self.http_port);
        if let Some(host) = &self.listen_host {
            // Right after `--port PORT`, before the engine's own arguments.
            let at = self.engine.command.len() + 4;
            argv.splice(at..at, ["--host".to_string(), host.clone()]);
        }
        argv
    }

    /// The env bindings of a run on this host: the NIXL side channel on loopback.
    pub fn host_env(&self) -> Vec<EnvVar> {
        vec![
            EnvVar::new(NIXL_SIDE_CHANNEL_HOST, "127.0.0.1"),
            EnvVar::new(NIXL_SIDE_CHANNEL_PORT, self.side_channel_port.to_string()),
        ]
    }

    /// The env on this host: [`Instance::host_env`], then the engine's own.
    pub fn env(&self) -> Vec<EnvVar> {
        merge_env(self.host_env(), &self.engine.env)
    }

    /// The `/dev/shm` size to give the instance: only with a private IPC namespace, because
    /// with the host's the host's `/dev/shm` is used (Docker takes one mechanism only).
    pub fn private_shm_bytes(&self) -> Option<u64> {
        (self.ipc_mode == NamespaceMode::Private).then_some(self.shm_size_bytes)
    }

    /// Where the engine's OpenAI server answers on this host (what the proxy routes to).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }
}

/// What an engine runs, wherever it runs: `COMMAND serve MODEL --port PORT ARGS` with `env`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Engine {
    /// The program and its leading arguments (`["vllm"]`, `["pdctl", "sim"]`). Process runtime:
    /// a leading `pdctl` means the running pdctl executable.
    pub command: Vec<String>,
    /// What `serve` loads: the model's mount point (Docker), its host path (processes) or a
    /// Hugging Face id.
    pub model: String,
    /// Everything after `--port PORT`: served name, KV connector, TP size, the pool's `args`.
    pub args: Vec<String>,
    /// The engine's own environment (UCX transports, HF cache, the pool's `env`): ordered,
    /// names unique.
    pub env: Vec<EnvVar>,
}

impl Engine {
    /// The argv serving `model` on `port`, argv[0] included.
    pub fn argv(&self, model: &str, port: u16) -> Vec<String> {
        let mut argv = self.command.clone();
        argv.extend([
            "serve".into(),
            model.into(),
            "--port".into(),
            port.to_string(),
        ]);
        argv.extend(self.args.iter().cloned());
        argv
    }
}

/// `bindings`, then `env`; a name in both keeps the binding's place and takes `env`'s value.
pub fn merge_env(mut bindings: Vec<EnvVar>, env: &[EnvVar]) -> Vec<EnvVar> {
    for e in env {
        match bindings.iter_mut().find(|b| b.name == e.name) {
            Some(b) => b.value = e.value.clone(),
            None => bindings.push(e.clone()),
        }
    }
    bindings
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuAssignment {
    pub index: u32,
    pub uuid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

impl EnvVar {
    pub fn new(name: &str, value: impl Into<String>) -> Self {
        EnvVar {
            name: name.into(),
            value: value.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NamespaceMode {
    Host,
    Private,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probes {
    pub startup: Probe,
    pub readiness: Probe,
    pub liveness: Probe,
}

/// An HTTP GET probe with Kubernetes semantics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub path: String,
    pub port: u16,
    pub initial_delay_seconds: u32,
    pub period_seconds: u32,
    pub timeout_seconds: u32,
    pub failure_threshold: u32,
    pub success_threshold: u32,
}
