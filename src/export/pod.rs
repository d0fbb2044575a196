//! From a plan `Instance` to Kubernetes container and pod pieces. Everything comes from the
//! plan; the one deliberate difference is the engine port: in a pod every replica has the
//! network to itself, so the engine listens on KServe's fixed ports instead of the host's
//! per-replica ports (prefill 8000; decode 8001 behind the routing sidecar on 8000).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, Probe, ResourceRequirements, SeccompProfile,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::plan::{Instance, ModelSource, Plan, Role};

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

/// The plan's argv with the `--port` value replaced by the pod's port.
pub fn argv_for_pod(instance: &Instance) -> Vec<String> {
    let port = pod_port(instance.role).to_string();
    let mut argv = instance.argv.clone();
    let mut i = 0;
    while i < argv.len() {
        if argv[i] == "--port" && i + 1 < argv.len() {
            argv[i + 1] = port.clone();
            i += 1;
        } else if argv[i].starts_with("--port=") {
            argv[i] = format!("--port={port}");
        }
        i += 1;
    }
    argv
}

/// The plan's env, with the side-channel host taken from the pod's IP (a decode on another
/// node must reach it) instead of the host's loopback.
pub fn env_for_pod(instance: &Instance) -> Vec<EnvVar> {
    instance
        .env
        .iter()
        .filter(|e| !e.name.starts_with("CUDA_"))
        .map(|e| {
            if e.name == "VLLM_NIXL_SIDE_CHANNEL_HOST" {
                EnvVar {
                    name: e.name.clone(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "status.podIP".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            } else {
                EnvVar {
                    name: e.name.clone(),
                    value: Some(e.value.clone()),
                    ..Default::default()
                }
            }
        })
        .collect()
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

/// The engine container (`main`, as KServe names it) of an instance's pod.
pub fn engine_container(plan: &Plan, instance: &Instance) -> Container {
    let port = pod_port(instance.role);
    let argv = argv_for_pod(instance);
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
        resources: gpu_resources(instance.gpus.len()),
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

    #[test]
    fn port_is_remapped_in_both_spellings() {
        let mut i: Instance =
            serde_json::from_value(crate::export::tests::instance_json()).unwrap();
        i.argv = ["vllm", "serve", "m", "--port", "8201", "--x", "--port=8201"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            argv_for_pod(&i),
            ["vllm", "serve", "m", "--port", "8001", "--x", "--port=8001"]
        );
    }
}
