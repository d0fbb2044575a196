//! A Compose file equivalent to the local Docker run: one service per planned instance, with
//! the same argv, env, namespaces, shm, mounts and GPUs (explicit `device_ids`), plus the router.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::plan::{NamespaceMode, Plan, RuntimePlan};

use super::{ExportError, Options};

#[derive(Debug, Serialize)]
pub struct Compose {
    name: String,
    services: BTreeMap<String, ComposeService>,
}

#[derive(Debug, Default, Serialize)]
struct ComposeService {
    image: String,
    entrypoint: Vec<String>,
    command: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    environment: Vec<String>,
    network_mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipc: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shm_size: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    volumes: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    stop_signal: String,
    stop_grace_period: String,
    restart: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    deploy: Option<Deploy>,
}

#[derive(Debug, Serialize)]
struct Deploy {
    resources: Resources,
}

#[derive(Debug, Serialize)]
struct Resources {
    reservations: Reservations,
}

#[derive(Debug, Serialize)]
struct Reservations {
    devices: Vec<Device>,
}

#[derive(Debug, Serialize)]
struct Device {
    driver: &'static str,
    device_ids: Vec<String>,
    capabilities: Vec<&'static str>,
}

pub fn render(plan: &Plan, opts: &Options) -> Result<Compose, ExportError> {
    let (image, network_mode) = match &plan.runtime {
        RuntimePlan::Docker {
            image,
            network_mode,
            ..
        } => (image.clone(), network_mode.clone()),
        RuntimePlan::Process { .. } => (opts.pdctl_image.clone(), "host".to_string()),
    };
    let mut services = BTreeMap::new();
    for instance in &plan.instances {
        let host_ipc = instance.ipc_mode == NamespaceMode::Host;
        let service = ComposeService {
            image: instance.image.clone().unwrap_or_else(|| image.clone()),
            entrypoint: instance.argv[..1].to_vec(),
            command: instance.argv[1..].to_vec(),
            environment: instance
                .env
                .iter()
                .map(|e| format!("{}={}", e.name, e.value))
                .collect(),
            network_mode: network_mode.clone(),
            ipc: host_ipc.then_some("host"),
            pid: (instance.pid_mode == NamespaceMode::Host).then_some("host"),
            // With the host's IPC namespace the host's /dev/shm is used: no size to set.
            shm_size: (!host_ipc).then_some(instance.shm_size_bytes),
            volumes: instance
                .mounts
                .iter()
                .map(|m| {
                    let ro = if m.read_only { ":ro" } else { "" };
                    format!("{}:{}{ro}", m.source.display(), m.target.display())
                })
                .collect(),
            labels: instance.labels.clone(),
            stop_signal: instance.stop_signal.clone(),
            stop_grace_period: format!("{}s", instance.stop_grace_seconds),
            restart: match instance.restart_policy {
                crate::plan::RestartPolicy::Always => "always",
                crate::plan::RestartPolicy::OnFailure => "on-failure",
                crate::plan::RestartPolicy::Never => "no",
            },
            deploy: (!instance.gpus.is_empty()).then(|| Deploy {
                resources: Resources {
                    reservations: Reservations {
                        devices: vec![Device {
                            driver: "nvidia",
                            device_ids: instance.gpus.iter().map(|g| g.index.to_string()).collect(),
                            capabilities: vec!["gpu"],
                        }],
                    },
                },
            }),
        };
        services.insert(instance.name.clone(), service);
    }
    let urls = |role| {
        plan.instances_of(role)
            .map(|i| format!("--{}={}", role.as_str(), i.base_url()))
            .collect::<Vec<_>>()
    };
    let mut command = vec![
        "proxy".to_string(),
        format!("--listen={}", plan.proxy.listen),
    ];
    command.extend(urls(crate::plan::Role::Prefill));
    command.extend(urls(crate::plan::Role::Decode));
    command.extend(super::k8s::policy_args(plan));
    services.insert(
        format!("pdctl-{}-router", plan.project),
        ComposeService {
            image: opts.pdctl_image.clone(),
            entrypoint: vec!["pdctl".into()],
            command,
            network_mode: "host".into(),
            stop_signal: "SIGTERM".into(),
            stop_grace_period: "30s".into(),
            restart: "always",
            ..Default::default()
        },
    );
    Ok(Compose {
        name: plan.project.clone(),
        services,
    })
}
