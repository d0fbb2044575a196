//! One engine instance from its pool: argv, env, mounts, namespaces, probes, labels, hash.

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::model::*;
use super::{label, ports};
use crate::spec::{quantity, LoadedSpec, PoolSection, ProbeKind, Spec};

/// vLLM's NixlConnector, with the role vLLM asks for: it deprecates `kv_both` ("set
/// kv_role='kv_producer' for prefill instances and 'kv_consumer' for decode instances").
pub fn kv_transfer_config(role: Role) -> &'static str {
    match role {
        Role::Prefill => r#"{"kv_connector":"NixlConnector","kv_role":"kv_producer"}"#,
        Role::Decode => r#"{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}"#,
    }
}

/// Where an engine listens on this host unless its pool's `args` name a `--host`: vLLM binds
/// every interface without one, and only pdctl's daemon and proxy on this host need it.
pub const ENGINE_HOST: &str = "127.0.0.1";

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

/// Everything one replica needs; `gpus` come from placement (empty when not placed on a host).
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
    let gpu_count = pool.gpus_per_replica;
    // UCX's CUDA IPC between containers needs the host IPC and PID namespaces; processes
    // already share them.
    let ns = if !docker || gpu_count > 0 {
        NamespaceMode::Host
    } else {
        NamespaceMode::Private
    };
    let probe = |kind| probe(pool, kind, http_port);
    let mut inst = Instance {
        name: instance_name(&l.project, role, index),
        role,
        index,
        gpus,
        gpu_count,
        http_port,
        side_channel_port,
        image: match runtime {
            RuntimePlan::Docker { image, .. } => Some(image.clone()),
            RuntimePlan::Process { .. } => None,
        },
        listen_host: listen_host(pool, runtime),
        engine: engine(spec, pool, model, runtime, role, http_port),
        mounts: mounts(model, docker),
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

fn user_sets(pool: &PoolSection, flag: &str) -> bool {
    pool.args.iter().any(|a| a.split('=').next() == Some(flag))
}

/// Behind a Docker bridge network the engine is reached through published ports, so it must
/// listen on the container's own interfaces: no `--host` then.
fn listen_host(pool: &PoolSection, runtime: &RuntimePlan) -> Option<String> {
    let bridged = matches!(runtime, RuntimePlan::Docker { network_mode, .. }
        if network_mode != super::HOST_NETWORK_MODE);
    (!bridged && !user_sets(pool, "--host")).then(|| ENGINE_HOST.to_string())
}

fn engine(
    spec: &Spec,
    pool: &PoolSection,
    model: &ModelPlan,
    runtime: &RuntimePlan,
    role: Role,
    http_port: u16,
) -> Engine {
    let (command, model_arg) = match (runtime, &model.source) {
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
    let mut args = vec!["--served-model-name".into(), model.served_name.clone()];
    // A user's own --kv-transfer-config replaces ours, as KServe's template does.
    if !user_sets(pool, "--kv-transfer-config") {
        args.extend([
            "--kv-transfer-config".into(),
            kv_transfer_config(role).into(),
        ]);
    }
    // The probes ask every second or so; each would be an access-log line.
    if !user_sets(pool, "--disable-access-log-for-endpoints") {
        let mut paths: Vec<String> = ProbeKind::ALL
            .iter()
            .map(|&k| probe(pool, k, http_port).path)
            .collect();
        paths.sort();
        paths.dedup();
        args.extend(["--disable-access-log-for-endpoints".into(), paths.join(",")]);
    }
    let tp = pool.gpus_per_replica.max(1);
    args.extend(["--tensor-parallel-size".into(), tp.to_string()]);
    args.extend(pool.args.iter().cloned());
    Engine {
        command,
        model: model_arg,
        args,
        env: env(
            spec,
            pool,
            model,
            matches!(runtime, RuntimePlan::Docker { .. }),
        ),
    }
}

/// The engine's own env; the host's bindings (side channel, GPU pinning) are added by whoever
/// runs it.
fn env(spec: &Spec, pool: &PoolSection, model: &ModelPlan, docker: bool) -> Vec<EnvVar> {
    let ucx = if pool.gpus_per_replica == 0 {
        "tcp"
    } else {
        "cuda_ipc,cuda_copy,tcp"
    };
    let mut env = vec![EnvVar::new("UCX_TLS", ucx)];
    match (&model.source, docker) {
        (ModelSource::HuggingFace { .. }, true) => env.push(EnvVar::new("HF_HOME", HF_CACHE_MOUNT)),
        (ModelSource::HuggingFace { cache_dir, .. }, false) if spec.model.cache_dir.is_some() => {
            env.push(EnvVar::new("HF_HOME", cache_dir.display().to_string()))
        }
        _ => {}
    }
    let pool_env: Vec<EnvVar> = pool
        .env
        .iter()
        .map(|(k, v)| EnvVar::new(k, v.clone()))
        .collect();
    merge_env(env, &pool_env)
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

/// sha256 over what runs on this host, first 16 hex digits. Labels are left out because they
/// carry the hash and the pdctl version, neither of which changes what runs. The hashed form
/// keeps the layout of plan schema 1 (full argv and env), so that a pdctl whose plan JSON
/// changed shape adopts the engines it started before instead of replacing them.
pub fn spec_hash(inst: &Instance) -> String {
    #[derive(Serialize)]
    struct Run<'a> {
        name: &'a str,
        role: Role,
        index: u32,
        gpus: &'a [GpuAssignment],
        http_port: u16,
        side_channel_port: u16,
        image: &'a Option<String>,
        argv: Vec<String>,
        env: Vec<EnvVar>,
        mounts: &'a [Mount],
        shm_size: &'a str,
        shm_size_bytes: u64,
        ipc_mode: NamespaceMode,
        pid_mode: NamespaceMode,
        probes: &'a Probes,
        labels: BTreeMap<String, String>,
        restart_policy: RestartPolicy,
        stop_signal: &'a str,
        stop_grace_seconds: u32,
        spec_hash: &'a str,
    }
    let run = Run {
        name: &inst.name,
        role: inst.role,
        index: inst.index,
        gpus: &inst.gpus,
        http_port: inst.http_port,
        side_channel_port: inst.side_channel_port,
        image: &inst.image,
        argv: inst.argv(),
        env: inst.env(),
        mounts: &inst.mounts,
        shm_size: &inst.shm_size,
        shm_size_bytes: inst.shm_size_bytes,
        ipc_mode: inst.ipc_mode,
        pid_mode: inst.pid_mode,
        probes: &inst.probes,
        labels: BTreeMap::new(),
        restart_policy: inst.restart_policy,
        stop_signal: &inst.stop_signal,
        stop_grace_seconds: inst.stop_grace_seconds,
        spec_hash: "",
    };
    let json = serde_json::to_vec(&run).expect("plan types serialise");
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
