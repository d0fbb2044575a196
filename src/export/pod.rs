//! From a plan `Instance` to Kubernetes container and pod pieces. The engine (command, model,
//! args, env) comes from the plan as it is; the pod adds its own bindings instead of the host's:
//! every replica has the network to itself, so the engine listens on KServe's fixed ports
//! (prefill 8000; decode 8001 behind the routing sidecar on 8000), its side channel is
//! announced on the pod's IP, and GPUs are a resource count for the scheduler.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, Probe, ResourceRequirements, SeccompProfile,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::plan::{
    Instance, ModelSource, Plan, Role, NIXL_SIDE_CHANNEL_HOST, NIXL_SIDE_CHANNEL_PORT,
};

pub const PREFILL_PORT: u16 = 8000;
pub const DECODE_ENGINE_PORT: u16 = 8001;
pub const SIDECAR_PORT: u16 = 8000;
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// The engine port an instance's pod uses.
pub fn pod_port(role: Role) -> u16 {
    match role {
        Role::Prefill => PREFILL_PORT,
        Role::Decode => DECODE_ENGINE_PORT,
    }
}

/// The engine's env in a pod: the side channel announced on the pod's IP (a decode on another
/// node must reach it) at the planned port, then the engine's own env.
pub fn env_for_pod(instance: &Instance) -> Vec<EnvVar> {
    let value = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let mut env = vec![
        EnvVar {
            name: NIXL_SIDE_CHANNEL_HOST.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "status.podIP".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        value(
            NIXL_SIDE_CHANNEL_PORT,
            instance.side_channel_port.to_string(),
        ),
    ];
    let bound = [NIXL_SIDE_CHANNEL_HOST, NIXL_SIDE_CHANNEL_PORT];
    env.extend(
        instance
            .engine
            .env
            .iter()
            .filter(|e| !bound.contains(&e.name.as_str()))
            .map(|e| value(&e.name, e.value.clone())),
    );
    env
}

fn probe(p: &crate::plan::Probe, port: u16) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(p.path.clone()),
            port: IntOrString::Int(i32::from(port)),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        initial_delay_seconds: (p.initial_delay_seconds > 0)
            .then_some(p.initial_delay_seconds as i32),
        period_seconds: Some(p.period_seconds as i32),
        timeout_seconds: Some(p.timeout_seconds as i32),
        failure_threshold: Some(p.failure_threshold as i32),
        success_threshold: Some(p.success_threshold as i32),
        ..Default::default()
    }
}

/// KServe's container securityContext (the root filesystem stays writable: nvidia-cdi-hook).
pub fn security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(false),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn gpu_resources(count: usize) -> Option<ResourceRequirements> {
    (count > 0).then(|| {
        let gpus = BTreeMap::from([(GPU_RESOURCE.to_string(), Quantity(count.to_string()))]);
        ResourceRequirements {
            limits: Some(gpus.clone()),
            requests: Some(gpus),
            ..Default::default()
        }
    })
}

/// Where the model comes from inside a pod; `None` for a Hugging Face id (the engine downloads
/// it into the cache volume, as locally).
pub fn model_volume(plan: &Plan) -> (Volume, VolumeMount) {
    match &plan.model.source {
        ModelSource::HuggingFace { .. } => (
            Volume {
                name: "model-cache".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            },
            VolumeMount {
                name: "model-cache".into(),
                mount_path: crate::plan::instance::HF_CACHE_MOUNT.into(),
                ..Default::default()
            },
        ),
        ModelSource::Path { .. } => (
            Volume {
                name: "model".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: model_claim(plan),
                    read_only: Some(true),
                }),
                ..Default::default()
            },
            VolumeMount {
                name: "model".into(),
                mount_path: crate::plan::instance::MODEL_MOUNT.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ),
    }
}

/// A host directory cannot travel to a cluster: the export expects it copied to this claim.
pub fn model_claim(plan: &Plan) -> String {
    format!("{}-model", plan.project)
}

pub fn dshm_volume(instance: &Instance) -> (Volume, VolumeMount) {
    (
        Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity(instance.shm_size.clone())),
            }),
            ..Default::default()
        },
        VolumeMount {
            name: "dshm".into(),
            mount_path: "/dev/shm".into(),
            ..Default::default()
        },
    )
}

/// The engine container (`main`, as KServe names it) of an instance's pod, serving `model`
/// (where the pod finds the model may differ from the host: KServe's storage initializer).
pub fn engine_container(plan: &Plan, instance: &Instance, model: &str) -> Container {
    let port = pod_port(instance.role);
    let argv = instance.engine.argv(model, port);
    let (_, model_mount) = model_volume(plan);
    let (_, dshm_mount) = dshm_volume(instance);
    Container {
        name: "main".into(),
        image: instance.image.clone().or_else(|| plan_image(plan)),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(argv[..1].to_vec()),
        args: Some(argv[1..].to_vec()),
        env: Some(env_for_pod(instance)),
        ports: Some(vec![ContainerPort {
            container_port: i32::from(port),
            name: Some("http".into()),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: gpu_resources(instance.gpu_count as usize),
        startup_probe: Some(probe(&instance.probes.startup, port)),
        readiness_probe: Some(probe(&instance.probes.readiness, port)),
        liveness_probe: Some(probe(&instance.probes.liveness, port)),
        lifecycle: Some(pre_stop_sleep()),
        security_context: Some(security_context()),
        volume_mounts: Some(vec![dshm_mount, model_mount]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// Process-runtime plans name no image; their engine is pdctl itself (the simulator).
pub fn plan_image(plan: &Plan) -> Option<String> {
    match &plan.runtime {
        crate::plan::RuntimePlan::Docker { image, .. } => Some(image.clone()),
        crate::plan::RuntimePlan::Process { .. } => Some(pdctl_image()),
    }
}

/// pdctl's own image (the simulator, `pdctl proxy`, `pdctl sidecar`). A placeholder name until
/// the project publishes one; override with `--pdctl-image`.
pub fn pdctl_image() -> String {
    format!("ghcr.io/pdctl/pdctl:{}", env!("CARGO_PKG_VERSION"))
}

/// KServe's preStop: give the endpoint controllers time to stop routing before shutdown.
pub fn pre_stop_sleep() -> Lifecycle {
    Lifecycle {
        pre_stop: Some(LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(vec!["/bin/sleep".into(), "15".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The labels KServe puts on a workload's pods, from the plan's labels (pdctl's own dropped:
/// they name one host's replica).
pub fn kserve_labels(instance: &Instance) -> BTreeMap<String, String> {
    instance
        .labels
        .iter()
        .filter(|(k, _)| !k.starts_with(crate::plan::label::PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Where the routing sidecar comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sidecar {
    /// llm-d's routing sidecar (KServe's default image).
    LlmD,
    /// `pdctl sidecar` from the given image.
    Pdctl(String),
}

pub const LLMD_SIDECAR_IMAGE: &str = "ghcr.io/llm-d/llm-d-router-disagg-sidecar:v0.10.0";
/// KServe's controller finds the sidecar by this exact name.
pub const SIDECAR_NAME: &str = "llm-d-routing-sidecar";

/// The routing sidecar as a native sidecar (an init container that keeps running).
pub fn sidecar_container(sidecar: &Sidecar, ssrf_args: Vec<String>) -> Container {
    let (image, mut command) = match sidecar {
        Sidecar::LlmD => (
            LLMD_SIDECAR_IMAGE.to_string(),
            vec!["/app/pd-sidecar".to_string()],
        ),
        Sidecar::Pdctl(image) => (image.clone(), vec!["pdctl".into(), "sidecar".into()]),
    };
    command.extend([
        format!("--port={SIDECAR_PORT}"),
        format!("--vllm-port={DECODE_ENGINE_PORT}"),
        "--kv-connector=nixlv2".into(),
    ]);
    command.extend(ssrf_args);
    command.push("--secure-proxy=false".into());
    let health = |initial, timeout, failures| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/health".into()),
            port: IntOrString::Int(i32::from(SIDECAR_PORT)),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        initial_delay_seconds: Some(initial),
        period_seconds: Some(10),
        timeout_seconds: Some(timeout),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(image),
        image_pull_policy: Some("IfNotPresent".into()),
        restart_policy: Some("Always".into()),
        command: Some(command),
        ports: Some(vec![ContainerPort {
            container_port: i32::from(SIDECAR_PORT),
            name: Some("sidecar".into()),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        liveness_probe: Some(health(10, 10, 3)),
        readiness_probe: Some(health(10, 5, 10)),
        security_context: Some(security_context()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::instance;

    fn plan(instances: Vec<Instance>) -> Plan {
        crate::plan::testing::plan(
            crate::plan::RuntimePlan::Process {
                command: vec!["vllm".into()],
            },
            instances,
        )
    }

    #[test]
    fn the_pod_binds_its_own_port_side_channel_host_and_gpu_count() {
        let mut i = instance("t", Role::Decode, 1, "h");
        i.engine.args = ["--x", "1"].map(String::from).to_vec();
        i.engine.env = vec![crate::plan::EnvVar::new("CUDA_LAUNCH_BLOCKING", "1")];
        i.gpu_count = 2;
        let main = engine_container(&plan(vec![i.clone()]), &i, "/mnt/models");
        assert_eq!(main.command.unwrap(), ["vllm"]);
        assert_eq!(
            main.args.unwrap(),
            ["serve", "/mnt/models", "--port", "8001", "--x", "1"]
        );
        let env = main.env.unwrap();
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                NIXL_SIDE_CHANNEL_HOST,
                NIXL_SIDE_CHANNEL_PORT,
                "CUDA_LAUNCH_BLOCKING"
            ]
        );
        assert!(env[0].value_from.is_some());
        assert_eq!(env[1].value.as_deref(), Some("5701"));
        let gpus = &main.resources.unwrap().limits.unwrap()[GPU_RESOURCE];
        assert_eq!(gpus.0, "2", "no host GPUs needed: the count is the plan's");
    }
}
