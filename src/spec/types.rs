//! The pools.toml schema. Every table rejects unknown keys; absent keys take the defaults of
//! KServe's P/D templates (see README "pools.toml reference"). Role-dependent defaults are
//! `Option`s resolved by the accessor methods, so one `PoolSection` serves both roles.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::proxy::ProxySection;
use crate::spec::vocab::{ProbeKind, PullPolicy, RestartPolicy, Role};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Deployment name; default: the file's stem, sanitised to a DNS label.
    #[serde(default)]
    pub project: Option<String>,
    pub model: ModelSection,
    #[serde(default)]
    pub runtime: RuntimeSection,
    #[serde(default)]
    pub prefill: PoolSection,
    #[serde(default)]
    pub decode: PoolSection,
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub gpus: Option<GpusSection>,
}

impl Spec {
    pub fn pool(&self, role: Role) -> &PoolSection {
        match role {
            Role::Prefill => &self.prefill,
            Role::Decode => &self.decode,
        }
    }
}

/// Exactly one of `path` and `hf`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Served model name (`--served-model-name`); default: the HF id or the directory name.
    pub name: Option<String>,
    /// A host directory holding the weights (relative paths are relative to pools.toml).
    pub path: Option<PathBuf>,
    /// A Hugging Face model id, e.g. `Qwen/Qwen2.5-7B-Instruct`.
    pub hf: Option<String>,
    /// Host directory for HF downloads; default `$HOME/.cache/huggingface`.
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    #[default]
    Docker,
    Process,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    #[serde(default)]
    pub kind: RuntimeKind,
    /// Docker only; default [`DEFAULT_IMAGE`].
    pub image: Option<String>,
    /// Docker only; default `if-not-present`.
    pub pull_policy: Option<PullPolicy>,
    /// Docker only; default `host`.
    pub network_mode: Option<String>,
    /// The engine's argv prefix. Process: required. Docker: default `["vllm"]`.
    pub command: Option<Vec<String>>,
}

/// The image of KServe's `config-llm-template` and `config-llm-prefill-template` presets (kserve
/// commit aaac4e29, the one the CRDs in `tests/data/kserve/` come from).
pub const DEFAULT_IMAGE: &str = "ghcr.io/llm-d/llm-d-cuda:v0.9.0";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSection {
    pub replicas: u32,
    /// Tensor-parallel size; 0 only for CPU/simulated engines.
    pub gpus_per_replica: u32,
    /// Instance i listens on base + i; default 8100 (prefill) / 8200 (decode).
    pub http_port_base: Option<u16>,
    /// Instance i uses base + i; default 5600 (prefill) / 5700 (decode).
    pub side_channel_port_base: Option<u16>,
    /// Appended to the engine's argv.
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Kubernetes quantity.
    pub shm_size: String,
    pub restart_policy: RestartPolicy,
    pub stop_grace_seconds: u32,
    pub probes: ProbesSection,
}

impl Default for PoolSection {
    fn default() -> Self {
        PoolSection {
            replicas: 1,
            gpus_per_replica: 1,
            http_port_base: None,
            side_channel_port_base: None,
            args: Vec::new(),
            env: BTreeMap::new(),
            shm_size: "1Gi".into(),
            restart_policy: RestartPolicy::Always,
            // KServe's templates: terminationGracePeriodSeconds 60.
            stop_grace_seconds: 60,
            probes: ProbesSection::default(),
        }
    }
}

impl PoolSection {
    pub fn http_port_base(&self, role: Role) -> u16 {
        self.http_port_base.unwrap_or(match role {
            Role::Prefill => 8100,
            Role::Decode => 8200,
        })
    }

    /// Fixed per-role bases (not "after the last prefill") so that scaling one role never
    /// moves the other's ports, which would change its spec hash and restart it.
    pub fn side_channel_port_base(&self, role: Role) -> u16 {
        self.side_channel_port_base.unwrap_or(match role {
            Role::Prefill => 5600,
            Role::Decode => 5700,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesSection {
    pub startup: ProbeSection,
    pub readiness: ProbeSection,
    pub liveness: ProbeSection,
}

impl ProbesSection {
    pub fn get(&self, kind: ProbeKind) -> &ProbeSection {
        match kind {
            ProbeKind::Startup => &self.startup,
            ProbeKind::Readiness => &self.readiness,
            ProbeKind::Liveness => &self.liveness,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSection {
    /// Default `/health`.
    pub path: Option<String>,
    pub initial_delay_seconds: Option<u32>,
    pub period_seconds: Option<u32>,
    pub timeout_seconds: Option<u32>,
    pub failure_threshold: Option<u32>,
}

/// Restricts placement to these GPUs (NVML index or UUID).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpusSection {
    pub devices: Vec<GpuSelector>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GpuSelector {
    Index(u32),
    Uuid(String),
}

impl std::fmt::Display for GpuSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuSelector::Index(i) => write!(f, "{i}"),
            GpuSelector::Uuid(u) => f.write_str(u),
        }
    }
}
