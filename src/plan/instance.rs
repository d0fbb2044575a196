//! One engine instance from its pool: argv, env, mounts, namespaces, probes, labels, hash.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::model::*;
use super::{label, ports};
use crate::spec::{quantity, LoadedSpec, PoolSection, ProbeKind, Spec};

/// vLLM's NixlConnector on both roles; `kv_role` is a placeholder, the proxy decides roles.
pub const KV_TRANSFER_CONFIG: &str = r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#;

/// Where Docker containers see the model: KServe's mount points.
pub const MODEL_MOUNT: &str = "/mnt/models";
pub const HF_CACHE_MOUNT: &str = "/models";

/// `pdctl-<project>-<role>-<index>`: the container or process name of one replica.
pub fn instance_name(project: &str, role: Role, index: u32) -> String {
    format!("pdctl-{project}-{role}-{index}")
}

/// A name as a user may type it, `<role>-<index>` or the full name, as the full name.
pub fn full_instance_name(project: &str, given: &str) -> String {
    if given.starts_with("pdctl-") {
        given.to_string()
    } else {
        format!("pdctl-{project}-{given}")
    }
}

/// Everything one replica needs; `gpus` come from placement.
pub(super) fn instance(
    l: &LoadedSpec,
    model: &ModelPlan,
    runtime: &RuntimePlan,
    role: Role,
    index: u32,
    gpus: Vec<GpuAssignment>,
) -> Instance {
    let spec = &l.spec;
    let pool = spec.pool(role);
    let (http_port, side_channel_port) = ports::ports(spec, role, index);
    let docker = matches!(runtime, RuntimePlan::Docker { .. });
    // UCX's CUDA IPC between containers needs the host IPC and PID namespaces; processes
    // already share them.
    let ns = if !docker || !gpus.is_empty() {
        NamespaceMode::Host
    } else {
        NamespaceMode::Private
    };
    let probe = |kind| probe(pool, kind, http_port);
    let mut inst = Instance {
        name: instance_name(&l.project, role, index),
        role,
        index,
        http_port,
        side_channel_port,
        image: match runtime {
            RuntimePlan::Docker { image, .. } => Some(image.clone()),
            RuntimePlan::Process { .. } => None,
        },
        argv: argv(spec, pool, model, runtime, http_port),
        env: env(spec, pool, model, docker, side_channel_port, &gpus),
        mounts: mounts(model, docker),
        gpus,
        shm_size: pool.shm_size.clone(),
        // Validated by spec::load.
        shm_size_bytes: quantity::parse_bytes(&pool.shm_size).unwrap_or(0),
        ipc_mode: ns,
        pid_mode: ns,
        probes: Probes {
            startup: probe(ProbeKind::Startup),
            readiness: probe(ProbeKind::Readiness),
            liveness: probe(ProbeKind::Liveness),
        },
        labels: BTreeMap::new(),
        restart_policy: pool.restart_policy,
        stop_signal: "SIGTERM".into(),
        stop_grace_seconds: pool.stop_grace_seconds,
        spec_hash: String::new(),
    };
    inst.spec_hash = spec_hash(&inst);
    inst.labels = labels(&l.project, &inst);
    inst
}

fn argv(
    spec: &Spec,
    pool: &PoolSection,
    model: &ModelPlan,
    runtime: &RuntimePlan,
    http_port: u16,
) -> Vec<String> {
    let (mut argv, model_arg) = match (runtime, &model.source) {
        (RuntimePlan::Process { command }, ModelSource::Path { host_path }) => {
            (command.clone(), host_path.display().to_string())
        }
        (RuntimePlan::Process { command }, ModelSource::HuggingFace { id, .. }) => {
            (command.clone(), id.clone())
        }
        (RuntimePlan::Docker { .. }, source) => (
            spec.runtime
                .command
                .clone()
                .unwrap_or_else(|| vec!["vllm".into()]),
            match source {
                ModelSource::Path { .. } => MODEL_MOUNT.to_string(),
                ModelSource::HuggingFace { id, .. } => id.clone(),
            },
        ),
    };
    argv.extend(["serve".into(), model_arg]);
    argv.extend(["--port".into(), http_port.to_string()]);
    argv.extend(["--served-model-name".into(), model.served_name.clone()]);
    // A user's own --kv-transfer-config replaces ours, as KServe's template does.
    if !pool
        .args
        .iter()
        .any(|a| a.split('=').next() == Some("--kv-transfer-config"))
    {
        argv.extend(["--kv-transfer-config".into(), KV_TRANSFER_CONFIG.into()]);
    }
    let tp = pool.gpus_per_replica.max(1);
    argv.extend(["--tensor-parallel-size".into(), tp.to_string()]);
    argv.extend(pool.args.iter().cloned());
    argv
}

fn env(
    spec: &Spec,
    pool: &PoolSection,
    model: &ModelPlan,
    docker: bool,
    side_channel_port: u16,
    gpus: &[GpuAssignment],
) -> Vec<EnvVar> {
    let mut env: Vec<EnvVar> = Vec::new();
    let mut set = |name: &str, value: String| match env.iter_mut().find(|e| e.name == name) {
        Some(e) => e.value = value,
        None => env.push(EnvVar {
            name: name.into(),
            value,
        }),
    };
    set("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1".into());
    set("VLLM_NIXL_SIDE_CHANNEL_PORT", side_channel_port.to_string());
    let ucx = if gpus.is_empty() {
        "tcp"
    } else {
        "cuda_ipc,cuda_copy,tcp"
    };
    set("UCX_TLS", ucx.into());
    match (&model.source, docker) {
        (ModelSource::HuggingFace { .. }, true) => set("HF_HOME", HF_CACHE_MOUNT.into()),
        (ModelSource::HuggingFace { cache_dir, .. }, false) if spec.model.cache_dir.is_some() => {
            set("HF_HOME", cache_dir.display().to_string())
        }
        _ => {}
    }
    if !docker {
        // NVML indices are PCI bus order; CUDA's default order is "fastest first".
        set("CUDA_DEVICE_ORDER", "PCI_BUS_ID".into());
        let ids: Vec<String> = gpus.iter().map(|g| g.index.to_string()).collect();
        set("CUDA_VISIBLE_DEVICES", ids.join(","));
    }
    for (k, v) in &pool.env {
        set(k, v.clone());
    }
    env
}

fn mounts(model: &ModelPlan, docker: bool) -> Vec<Mount> {
    match (&model.source, docker) {
        (ModelSource::Path { host_path }, true) => vec![Mount {
            source: host_path.clone(),
            target: MODEL_MOUNT.into(),
            read_only: true,
        }],
        (ModelSource::HuggingFace { cache_dir, .. }, true) => vec![Mount {
            source: cache_dir.clone(),
            target: HF_CACHE_MOUNT.into(),
            read_only: false,
        }],
        _ => Vec::new(),
    }
}

fn probe(pool: &PoolSection, kind: ProbeKind, port: u16) -> Probe {
    let s = pool.probes.get(kind);
    let (delay, period, timeout, failure) = kind.defaults();
    Probe {
        path: s.path.clone().unwrap_or_else(|| "/health".into()),
        port,
        initial_delay_seconds: s.initial_delay_seconds.unwrap_or(delay),
        period_seconds: s.period_seconds.unwrap_or(period),
        timeout_seconds: s.timeout_seconds.unwrap_or(timeout),
        failure_threshold: s.failure_threshold.unwrap_or(failure),
        success_threshold: 1,
    }
}

/// sha256 over the instance with labels and hash blanked, first 16 hex digits. Labels are
/// left out because they carry the hash and the pdctl version, neither of which changes
/// what runs.
pub fn spec_hash(inst: &Instance) -> String {
    let mut bare = inst.clone();
    bare.labels.clear();
    bare.spec_hash.clear();
    let json = serde_json::to_vec(&bare).expect("plan types serialise");
    let digest = Sha256::digest(&json);
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// pdctl's own labels plus the ones KServe's controller puts on P/D workloads, so that an
/// llm-d scheduler would tell the roles apart the same way.
pub fn labels(project: &str, inst: &Instance) -> BTreeMap<String, String> {
    let component = match inst.role {
        Role::Prefill => "llminferenceservice-workload-prefill",
        Role::Decode => "llminferenceservice-workload",
    };
    [
        (label::PROJECT, project.to_string()),
        (label::ROLE, inst.role.to_string()),
        (label::INDEX, inst.index.to_string()),
        (label::SPEC_HASH, inst.spec_hash.clone()),
        (label::VERSION, env!("CARGO_PKG_VERSION").to_string()),
        ("app.kubernetes.io/name", project.to_string()),
        (
            "app.kubernetes.io/part-of",
            "llminferenceservice".to_string(),
        ),
        ("app.kubernetes.io/component", component.to_string()),
        ("kserve.io/component", "workload".to_string()),
        ("llm-d.ai/role", inst.role.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}
