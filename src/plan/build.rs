//! From a validated pools.toml and a GPU list to the [`Plan`]: pure, no I/O.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::model::*;
use super::placement::{self, Request};
use super::ports::{self, Collision};
use super::PlanError;
use crate::gpu::GpuInfo;
use crate::spec::{
    quantity, Diagnostic, GpuSelector, LoadedSpec, ProbeKind, RuntimeKind, Seg, Spec, SpecError,
};

/// vLLM's NixlConnector on both roles; `kv_role` is a placeholder, the proxy decides roles.
pub const KV_TRANSFER_CONFIG: &str = r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#;

/// Where Docker containers see the model: KServe's mount points.
pub const MODEL_MOUNT: &str = "/mnt/models";
pub const HF_CACHE_MOUNT: &str = "/models";

/// Total GPUs the spec asks for.
pub fn gpus_needed(spec: &Spec) -> u32 {
    [&spec.prefill, &spec.decode]
        .iter()
        .map(|p| p.replicas * p.gpus_per_replica)
        .sum()
}

/// The checks that need the whole file but no GPU inventory: port collisions.
pub fn check(l: &LoadedSpec) -> Result<(), PlanError> {
    let proxy_port = l.spec.proxy.listen_port();
    let diags: Vec<Diagnostic> = ports::collisions(&l.spec, proxy_port)
        .into_iter()
        .map(|c| collision_diag(l, c))
        .collect();
    invalid(diags)
}

fn collision_diag(l: &LoadedSpec, c: Collision) -> Diagnostic {
    let s = c.second;
    let with = match c.first {
        Some(f) => f.describe(),
        None => format!("the proxy (listen = \"{}\")", l.spec.proxy.listen),
    };
    l.at(
        &[Seg::Key(s.role.as_str()), Seg::Key(s.kind.key())],
        format!("{} collides with {with}", s.describe()),
    )
}

fn invalid(diags: Vec<Diagnostic>) -> Result<(), PlanError> {
    if diags.is_empty() {
        Ok(())
    } else {
        Err(PlanError::Invalid(SpecError::Invalid(diags)))
    }
}

/// The plan for `l` on `gpus` (the host's inventory; empty is fine when nothing needs a GPU).
pub fn build(l: &LoadedSpec, gpus: &[GpuInfo]) -> Result<Plan, PlanError> {
    check(l)?;
    let spec = &l.spec;
    let usable = usable_gpus(l, gpus)?;
    let assignments = place(l, &usable)?;
    let model = model_plan(l)?;
    let runtime = runtime_plan(spec);
    let mut instances = Vec::new();
    for (role, index, gpus) in assignments {
        instances.push(instance(l, &model, &runtime, role, index, gpus));
    }
    Ok(Plan {
        schema_version: PLAN_SCHEMA_VERSION,
        project: l.project.clone(),
        source: l.path.clone(),
        model,
        runtime,
        proxy: spec.proxy.clone(),
        instances,
    })
}

/// The inventory filtered by `[gpus] devices`, in inventory order.
fn usable_gpus(l: &LoadedSpec, gpus: &[GpuInfo]) -> Result<Vec<GpuInfo>, PlanError> {
    let Some(sel) = &l.spec.gpus else {
        return Ok(gpus.to_vec());
    };
    let mut diags = Vec::new();
    let mut keep = vec![false; gpus.len()];
    for (i, s) in sel.devices.iter().enumerate() {
        let found = gpus.iter().position(|g| match s {
            GpuSelector::Index(x) => g.index == *x,
            GpuSelector::Uuid(u) => &g.uuid == u,
        });
        match found {
            Some(p) => keep[p] = true,
            None => {
                let have: Vec<String> = gpus.iter().map(|g| g.index.to_string()).collect();
                diags.push(l.at(
                    &["gpus".into(), "devices".into(), i.into()],
                    format!(
                        "GPU `{s}` is not on this host (GPUs: {})",
                        if have.is_empty() {
                            "none".into()
                        } else {
                            have.join(", ")
                        }
                    ),
                ));
            }
        }
    }
    invalid(diags)?;
    Ok(gpus
        .iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(g, _)| g.clone())
        .collect())
}

type Assigned = Vec<(Role, u32, Vec<GpuAssignment>)>;

fn place(l: &LoadedSpec, gpus: &[GpuInfo]) -> Result<Assigned, PlanError> {
    let spec = &l.spec;
    let mut reqs = Vec::new();
    for role in [Role::Prefill, Role::Decode] {
        let p = spec.pool(role);
        for index in 0..p.replicas {
            reqs.push(Request {
                role,
                index,
                count: p.gpus_per_replica,
            });
        }
    }
    let placed = placement::place(&reqs, gpus).map_err(|s| {
        let (p, d) = (&spec.prefill, &spec.decode);
        let blame = if p.replicas * p.gpus_per_replica > s.have {
            "prefill"
        } else {
            "decode"
        };
        let limit = if spec.gpus.is_some() {
            " allowed by [gpus] devices"
        } else {
            " available"
        };
        PlanError::Invalid(SpecError::Invalid(vec![l.at(
            &[Seg::Key(blame), Seg::Key("gpus_per_replica")],
            format!(
                "need {} GPUs: prefill {}×{}, decode {}×{}; {}{limit}",
                s.need, p.replicas, p.gpus_per_replica, d.replicas, d.gpus_per_replica, s.have
            ),
        )]))
    })?;
    Ok(reqs
        .iter()
        .zip(placed)
        .map(|(r, pos)| {
            let g = pos
                .into_iter()
                .map(|i| GpuAssignment {
                    index: gpus[i].index,
                    uuid: gpus[i].uuid.clone(),
                })
                .collect();
            (r.role, r.index, g)
        })
        .collect())
}

fn expand(l: &LoadedSpec, p: &Path, home: Option<&Path>) -> PathBuf {
    if let (Ok(rest), Some(h)) = (p.strip_prefix("~"), home) {
        return h.join(rest);
    }
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        l.base_dir().join(p)
    }
}

fn model_plan(l: &LoadedSpec) -> Result<ModelPlan, PlanError> {
    let m = &l.spec.model;
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let source = match (&m.path, &m.hf) {
        (Some(p), _) => ModelSource::Path {
            host_path: expand(l, p, home.as_deref()),
        },
        (None, Some(id)) => {
            let cache_dir = match (&m.cache_dir, &home) {
                (Some(c), _) => expand(l, c, home.as_deref()),
                (None, Some(h)) => h.join(".cache/huggingface"),
                (None, None) => {
                    return Err(PlanError::Invalid(SpecError::Invalid(vec![l.at(
                        &["model".into()],
                        "HOME is not set, so there is no default HF cache; set `cache_dir`",
                    )])))
                }
            };
            ModelSource::HuggingFace {
                id: id.clone(),
                cache_dir,
            }
        }
        (None, None) => unreachable!("spec validation requires path or hf"),
    };
    let served_name = m.name.clone().unwrap_or_else(|| match &source {
        ModelSource::HuggingFace { id, .. } => id.clone(),
        ModelSource::Path { host_path } => host_path
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned()),
    });
    Ok(ModelPlan {
        served_name,
        source,
    })
}

fn runtime_plan(spec: &Spec) -> RuntimePlan {
    let r = &spec.runtime;
    match r.kind {
        RuntimeKind::Docker => RuntimePlan::Docker {
            image: r
                .image
                .clone()
                .unwrap_or_else(|| crate::spec::DEFAULT_IMAGE.into()),
            pull_policy: r.pull_policy.unwrap_or(PullPolicy::IfNotPresent),
            network_mode: r.network_mode.clone().unwrap_or_else(|| "host".into()),
        },
        RuntimeKind::Process => RuntimePlan::Process {
            command: r.command.clone().unwrap_or_default(),
        },
    }
}

fn instance(
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

    let mut argv: Vec<String> = match runtime {
        RuntimePlan::Docker { .. } => spec
            .runtime
            .command
            .clone()
            .unwrap_or_else(|| vec!["vllm".into()]),
        RuntimePlan::Process { command } => command.clone(),
    };
    let model_arg = match (&model.source, docker) {
        (ModelSource::Path { .. }, true) => MODEL_MOUNT.to_string(),
        (ModelSource::Path { host_path }, false) => host_path.display().to_string(),
        (ModelSource::HuggingFace { id, .. }, _) => id.clone(),
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

    let mut env: Vec<EnvVar> = Vec::new();
    let mut set = |name: &str, value: String| {
        env.push(EnvVar {
            name: name.into(),
            value,
        })
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
        match env.iter_mut().find(|e| &e.name == k) {
            Some(e) => e.value = v.clone(),
            None => env.push(EnvVar {
                name: k.clone(),
                value: v.clone(),
            }),
        }
    }

    let mounts = match (&model.source, docker) {
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
    };
    // UCX's CUDA IPC between containers needs the host IPC and PID namespaces; processes
    // already share them.
    let ns = if !docker || !gpus.is_empty() {
        NamespaceMode::Host
    } else {
        NamespaceMode::Private
    };

    let probe = |kind: ProbeKind| {
        let s = pool.probes.get(kind);
        let (delay, period, timeout, failure) = kind.defaults();
        Probe {
            path: s.path.clone().unwrap_or_else(|| "/health".into()),
            port: http_port,
            initial_delay_seconds: s.initial_delay_seconds.unwrap_or(delay),
            period_seconds: s.period_seconds.unwrap_or(period),
            timeout_seconds: s.timeout_seconds.unwrap_or(timeout),
            failure_threshold: s.failure_threshold.unwrap_or(failure),
            success_threshold: 1,
        }
    };

    let mut inst = Instance {
        name: format!("pdctl-{}-{role}-{index}", l.project),
        role,
        index,
        gpus,
        http_port,
        side_channel_port,
        image: match runtime {
            RuntimePlan::Docker { image, .. } => Some(image.clone()),
            RuntimePlan::Process { .. } => None,
        },
        argv,
        env,
        mounts,
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
        ("pdctl.project", project.to_string()),
        ("pdctl.role", inst.role.to_string()),
        ("pdctl.index", inst.index.to_string()),
        ("pdctl.spec-hash", inst.spec_hash.clone()),
        ("pdctl.version", env!("CARGO_PKG_VERSION").to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{FixedInventory, GpuInventory};

    fn plan(src: &str, gpus: &str) -> Plan {
        let l = crate::spec::parse(Path::new("/etc/pdctl/t.toml"), src.into()).unwrap();
        let inv = FixedInventory::parse(gpus).unwrap().gpus().unwrap();
        build(&l, &inv).unwrap()
    }

    fn env<'a>(i: &'a Instance, name: &str) -> Option<&'a str> {
        i.env
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.value.as_str())
    }

    const DOCKER: &str = "[model]\npath = \"models/llama\"\n";

    #[test]
    fn docker_path_model_is_mounted_read_only_and_served_from_the_mount() {
        let p = plan(DOCKER, "2");
        let i = &p.instances[0];
        assert_eq!(i.name, "pdctl-t-prefill-0");
        assert_eq!(
            p.instance("pdctl-t-decode-0").unwrap().base_url(),
            "http://127.0.0.1:8200"
        );
        assert_eq!(p.instances_of(Role::Decode).count(), 1);
        assert_eq!(&i.argv[..3], ["vllm", "serve", MODEL_MOUNT]);
        assert_eq!(i.mounts[0].source, Path::new("/etc/pdctl/models/llama"));
        assert!(i.mounts[0].read_only);
        assert_eq!(p.model.served_name, "llama");
        assert_eq!(
            (i.ipc_mode, i.pid_mode),
            (NamespaceMode::Host, NamespaceMode::Host)
        );
        assert_eq!(env(i, "CUDA_VISIBLE_DEVICES"), None);
        assert_eq!(i.labels["llm-d.ai/role"], "prefill");
        assert_eq!(i.labels["pdctl.spec-hash"], i.spec_hash);
        assert_eq!(i.spec_hash.len(), 16);
    }

    #[test]
    fn process_runtime_pins_gpus_through_cuda_env() {
        let src = "[model]\nhf = \"a/b\"\ncache_dir = \"/cache\"\n[runtime]\nkind = \"process\"\ncommand = [\"/venv/bin/vllm\"]\n[decode]\ngpus_per_replica = 2\n";
        let p = plan(src, "3");
        let d = &p.instances[1];
        assert_eq!(d.argv[..3], ["/venv/bin/vllm", "serve", "a/b"]);
        assert_eq!(env(d, "CUDA_VISIBLE_DEVICES"), Some("1,2"));
        assert_eq!(env(d, "CUDA_DEVICE_ORDER"), Some("PCI_BUS_ID"));
        assert_eq!(env(d, "HF_HOME"), Some("/cache"));
        assert!(d.mounts.is_empty());
        assert_eq!(env(&p.instances[0], "CUDA_VISIBLE_DEVICES"), Some("0"));
    }

    #[test]
    fn user_env_and_kv_config_override_the_defaults() {
        let src = format!(
            "{DOCKER}[prefill]\nenv = {{ UCX_TLS = \"all\", EXTRA = \"1\" }}\nargs = [\"--kv-transfer-config\", \"{{}}\"]\n"
        );
        let p = plan(&src, "2");
        let i = &p.instances[0];
        let names: Vec<&str> = i.env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "VLLM_NIXL_SIDE_CHANNEL_HOST",
                "VLLM_NIXL_SIDE_CHANNEL_PORT",
                "UCX_TLS",
                "EXTRA"
            ]
        );
        assert_eq!(env(i, "UCX_TLS"), Some("all"));
        assert_eq!(
            i.argv
                .iter()
                .filter(|a| *a == "--kv-transfer-config")
                .count(),
            1
        );
        assert!(i
            .argv
            .ends_with(&["--kv-transfer-config".into(), "{}".into()]));
    }

    #[test]
    fn cpu_docker_instances_keep_private_namespaces() {
        let src =
            format!("{DOCKER}[prefill]\ngpus_per_replica = 0\n[decode]\ngpus_per_replica = 0\n");
        let i = &plan(&src, "1").instances[0];
        assert_eq!(i.ipc_mode, NamespaceMode::Private);
        assert_eq!(env(i, "UCX_TLS"), Some("tcp"));
        assert!(i
            .argv
            .ends_with(&["--tensor-parallel-size".into(), "1".into()]));
    }

    #[test]
    fn scaling_one_role_keeps_the_other_roles_hashes() {
        let one = plan(DOCKER, "4");
        let two = plan(&format!("{DOCKER}[prefill]\nreplicas = 2\n"), "4");
        let dec = |p: &Plan| {
            p.instances
                .iter()
                .find(|i| i.role == Role::Decode)
                .unwrap()
                .clone()
        };
        assert_eq!(dec(&one).spec_hash, dec(&two).spec_hash);
        let changed = plan(
            &format!("{DOCKER}[decode]\nargs = [\"--enforce-eager\"]\n"),
            "4",
        );
        assert_ne!(dec(&one).spec_hash, dec(&changed).spec_hash);
    }
}
