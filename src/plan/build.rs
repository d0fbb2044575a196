//! From a validated pools.toml and a GPU list to the [`Plan`]: pure, no I/O.

use std::path::{Path, PathBuf};

use super::instance::instance;
use super::model::*;
use super::placement::{self, Request};
use super::ports::{self, Collision};
use super::PlanError;
use crate::gpu::GpuInfo;
use crate::spec::{Diagnostic, GpuSelector, LoadedSpec, RuntimeKind, Seg, Spec, SpecError};

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
    let usable = usable_gpus(l, gpus)?;
    let assignments = place(l, &usable)?;
    assemble(l, assignments)
}

/// The plan without host placement, for a cluster that schedules GPUs itself: every instance
/// has its `gpu_count` and no `gpus`; no inventory is read and `[gpus] devices` does not apply.
pub fn build_for_cluster(l: &LoadedSpec) -> Result<Plan, PlanError> {
    check(l)?;
    let assignments = requests(&l.spec)
        .into_iter()
        .map(|r| (r.role, r.index, Vec::new()))
        .collect();
    assemble(l, assignments)
}

fn assemble(l: &LoadedSpec, assignments: Assigned) -> Result<Plan, PlanError> {
    let spec = &l.spec;
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

/// Every replica, prefill first, each role by index.
fn requests(spec: &Spec) -> Vec<Request> {
    let mut reqs = Vec::new();
    for role in Role::ALL {
        let p = spec.pool(role);
        for index in 0..p.replicas {
            reqs.push(Request {
                role,
                index,
                count: p.gpus_per_replica,
            });
        }
    }
    reqs
}

fn place(l: &LoadedSpec, gpus: &[GpuInfo]) -> Result<Assigned, PlanError> {
    let spec = &l.spec;
    let reqs = requests(spec);
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

/// Where the instances of `spec` run; needs no GPUs, so commands that only list, stop or read
/// logs can reach the runtime without planning placement.
pub fn runtime_plan(spec: &Spec) -> RuntimePlan {
    let r = &spec.runtime;
    match r.kind {
        RuntimeKind::Docker => RuntimePlan::Docker {
            image: r
                .image
                .clone()
                .unwrap_or_else(|| crate::spec::DEFAULT_IMAGE.into()),
            pull_policy: r.pull_policy.unwrap_or(PullPolicy::IfNotPresent),
            network_mode: super::network_mode(spec).to_string(),
        },
        RuntimeKind::Process => RuntimePlan::Process {
            command: r.command.clone().unwrap_or_default(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{FixedInventory, GpuInventory};
    use crate::plan::instance::MODEL_MOUNT;

    fn plan(src: &str, gpus: &str) -> Plan {
        let l = crate::spec::parse(Path::new("/etc/pdctl/t.toml"), src.into()).unwrap();
        let inv = FixedInventory::parse(gpus).unwrap().gpus().unwrap();
        build(&l, &inv).unwrap()
    }

    /// The env on this host (the plan's host bindings and the engine's own).
    fn env(i: &Instance, name: &str) -> Option<String> {
        i.env()
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| e.value)
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
        assert_eq!(&i.argv()[..3], ["vllm", "serve", MODEL_MOUNT]);
        assert_eq!(i.mounts[0].source, Path::new("/etc/pdctl/models/llama"));
        assert!(i.mounts[0].read_only);
        assert_eq!(p.model.served_name, "llama");
        assert_eq!(
            (i.ipc_mode, i.pid_mode),
            (NamespaceMode::Host, NamespaceMode::Host)
        );
        assert_eq!(env(i, "CUDA_VISIBLE_DEVICES"), None);
        assert_eq!(
            env(i, "VLLM_NIXL_SIDE_CHANNEL_PORT").as_deref(),
            Some("5600")
        );
        assert_eq!(i.labels["llm-d.ai/role"], "prefill");
        assert_eq!(i.labels["pdctl.spec-hash"], i.spec_hash);
        assert_eq!(i.spec_hash.len(), 16);
    }

    #[test]
    fn process_runtime_pins_gpus_through_cuda_env() {
        let src = "[model]\nhf = \"a/b\"\ncache_dir = \"/cache\"\n[runtime]\nkind = \"process\"\ncommand = [\"/venv/bin/vllm\"]\n[decode]\ngpus_per_replica = 2\n";
        let p = plan(src, "3");
        let d = &p.instances[1];
        assert_eq!(d.argv()[..3], ["/venv/bin/vllm", "serve", "a/b"]);
        // The process runtime pins these GPUs through CUDA_VISIBLE_DEVICES (see its tests).
        let indices = |i: &Instance| i.gpus.iter().map(|g| g.index).collect::<Vec<_>>();
        assert_eq!(indices(d), [1, 2]);
        assert_eq!(d.gpu_count, 2);
        assert_eq!(env(d, "HF_HOME").as_deref(), Some("/cache"));
        assert!(d.mounts.is_empty());
        assert_eq!(indices(&p.instances[0]), [0]);
    }

    #[test]
    fn user_env_and_kv_config_override_the_defaults() {
        let src = format!(
            "{DOCKER}[prefill]\nenv = {{ UCX_TLS = \"all\", EXTRA = \"1\" }}\nargs = [\"--kv-transfer-config\", \"{{}}\"]\n"
        );
        let p = plan(&src, "2");
        let i = &p.instances[0];
        let names: Vec<String> = i.env().into_iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                "VLLM_NIXL_SIDE_CHANNEL_HOST",
                "VLLM_NIXL_SIDE_CHANNEL_PORT",
                "UCX_TLS",
                "EXTRA"
            ]
        );
        assert_eq!(env(i, "UCX_TLS").as_deref(), Some("all"));
        assert_eq!(
            i.argv()
                .iter()
                .filter(|a| *a == "--kv-transfer-config")
                .count(),
            1
        );
        assert!(i
            .argv()
            .ends_with(&["--kv-transfer-config".into(), "{}".into()]));
    }

    #[test]
    fn cpu_docker_instances_keep_private_namespaces() {
        let src =
            format!("{DOCKER}[prefill]\ngpus_per_replica = 0\n[decode]\ngpus_per_replica = 0\n");
        let i = &plan(&src, "1").instances[0];
        assert_eq!(i.ipc_mode, NamespaceMode::Private);
        assert_eq!(env(i, "UCX_TLS").as_deref(), Some("tcp"));
        assert!(i
            .argv()
            .ends_with(&["--tensor-parallel-size".into(), "1".into()]));
    }

    fn flag(i: &Instance, name: &str) -> Option<String> {
        let argv = i.argv();
        let at = argv.iter().position(|a| a == name)?;
        argv.get(at + 1).cloned()
    }

    #[test]
    fn each_role_gets_its_own_kv_role() {
        let p = plan(DOCKER, "2");
        let kv = |role| flag(p.instances_of(role).next().unwrap(), "--kv-transfer-config");
        assert_eq!(
            kv(Role::Prefill).as_deref(),
            Some(r#"{"kv_connector":"NixlConnector","kv_role":"kv_producer"}"#)
        );
        assert_eq!(
            kv(Role::Decode).as_deref(),
            Some(r#"{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}"#)
        );
    }

    #[test]
    fn engines_listen_on_loopback_unless_the_pool_or_a_bridge_network_says_otherwise() {
        let p = plan(DOCKER, "2");
        assert_eq!(
            flag(&p.instances[0], "--host").as_deref(),
            Some("127.0.0.1")
        );
        let own = plan(
            &format!("{DOCKER}[decode]\nargs = [\"--host=0.0.0.0\"]\n"),
            "2",
        );
        let d = own.instances_of(Role::Decode).next().unwrap();
        assert_eq!(flag(d, "--host"), None);
        assert!(d.argv().contains(&"--host=0.0.0.0".to_string()));
        let bridged = plan(
            &format!("{DOCKER}[runtime]\nnetwork_mode = \"bridge\"\n"),
            "2",
        );
        assert_eq!(flag(&bridged.instances[0], "--host"), None);
    }

    #[test]
    fn probe_paths_stay_out_of_the_access_log() {
        let p = plan(DOCKER, "2");
        assert_eq!(
            flag(&p.instances[0], "--disable-access-log-for-endpoints").as_deref(),
            Some("/health")
        );
        let src = format!("{DOCKER}[prefill.probes.readiness]\npath = \"/v1/models\"\n");
        let p = plan(&src, "2");
        assert_eq!(
            flag(&p.instances[0], "--disable-access-log-for-endpoints").as_deref(),
            Some("/health,/v1/models")
        );
    }

    #[test]
    fn a_cluster_plan_needs_no_gpus_and_matches_the_host_plan_but_for_placement() {
        let src = format!("{DOCKER}[decode]\ngpus_per_replica = 2\n[gpus]\ndevices = [7]\n");
        let l = crate::spec::parse(Path::new("/etc/pdctl/t.toml"), src).unwrap();
        let cluster = build_for_cluster(&l).unwrap();
        let d = &cluster.instances[1];
        assert!(d.gpus.is_empty());
        assert_eq!(d.gpu_count, 2);
        assert_eq!(env(d, "UCX_TLS").as_deref(), Some("cuda_ipc,cuda_copy,tcp"));
        let inv = FixedInventory::parse("8").unwrap().gpus().unwrap();
        let l = crate::spec::parse(
            Path::new("/etc/pdctl/t.toml"),
            format!("{DOCKER}[decode]\ngpus_per_replica = 2\n"),
        )
        .unwrap();
        let host = build(&l, &inv).unwrap();
        for (c, h) in cluster.instances.iter().zip(&host.instances) {
            assert_eq!(c.engine, h.engine);
            assert_eq!((c.ipc_mode, c.gpu_count), (h.ipc_mode, h.gpus.len() as u32));
        }
    }

    #[test]
    fn the_engine_is_separate_from_the_host_bindings() {
        let p = plan(DOCKER, "2");
        let i = &p.instances[0];
        assert_eq!(i.engine.model, MODEL_MOUNT);
        assert!(!i.engine.args.iter().any(|a| a.contains("8100")));
        assert!(!i.engine.env.iter().any(|e| e.name.starts_with("VLLM_NIXL")));
        assert_eq!(i.argv()[3..5], ["--port", "8100"]);
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
