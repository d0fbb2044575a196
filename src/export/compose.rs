//! A Compose file equivalent to the local Docker run: one service per planned instance, with
//! the same argv, env, namespaces, shm, mounts and GPUs (explicit `device_ids`), plus the router.
//!
//! Compose interpolates `$VAR`, `${VAR}` and rejects `$(...)` in every string value; the plan's
//! strings are literal (Docker receives them as they are), so each `$` in them is written `$$`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::plan::{NamespaceMode, Plan, RuntimePlan, HOST_NETWORK_MODE};

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

/// `value` as Compose must see it to pass it on unchanged.
fn literal(value: &str) -> String {
    value.replace('$', "$$")
}

fn literals<'a>(values: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    values.into_iter().map(|v| literal(v)).collect()
}

/// The router reads its key from `PDCTL_API_KEY`, filled in by Compose from the environment
/// of whoever runs it, and refusing to start without it rather than run unprotected.
fn api_key_env(plan: &Plan) -> Vec<String> {
    plan.proxy
        .api_key_env
        .iter()
        .map(|name| format!("PDCTL_API_KEY=${{{name}:?the API key clients must send}}"))
        .collect()
}

pub fn render(plan: &Plan, opts: &Options) -> Result<Compose, ExportError> {
    let (image, network_mode) = match &plan.runtime {
        RuntimePlan::Docker {
            image,
            network_mode,
            ..
        } => (image.clone(), network_mode.clone()),
        RuntimePlan::Process { .. } => (opts.pdctl_image.clone(), HOST_NETWORK_MODE.to_string()),
    };
    let mut services = BTreeMap::new();
    for instance in &plan.instances {
        let argv = instance.argv();
        let host_ipc = instance.ipc_mode == NamespaceMode::Host;
        let service = ComposeService {
            image: literal(instance.image.as_ref().unwrap_or(&image)),
            entrypoint: literals(&argv[..1]),
            command: literals(&argv[1..]),
            // The containers' bindings, as under `pdctl up` with Docker (GPUs by device_ids).
            environment: instance
                .env()
                .iter()
                .map(|e| literal(&format!("{}={}", e.name, e.value)))
                .collect(),
            network_mode: network_mode.clone(),
            ipc: host_ipc.then_some("host"),
            pid: (instance.pid_mode == NamespaceMode::Host).then_some("host"),
            shm_size: instance.private_shm_bytes(),
            volumes: instance
                .mounts
                .iter()
                .map(|m| {
                    let ro = if m.read_only { ":ro" } else { "" };
                    literal(&format!(
                        "{}:{}{ro}",
                        m.source.display(),
                        m.target.display()
                    ))
                })
                .collect(),
            labels: instance
                .labels
                .iter()
                .map(|(k, v)| (literal(k), literal(v)))
                .collect(),
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
            image: literal(&opts.pdctl_image),
            entrypoint: vec!["pdctl".into()],
            command: literals(&command),
            environment: api_key_env(plan),
            network_mode: HOST_NETWORK_MODE.into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::instance;
    use crate::plan::{EnvVar, Role};

    fn plan_with(args: &[&str], env: (&str, &str)) -> Plan {
        let mut prefill = instance("t", Role::Prefill, 0, "h");
        let decode = instance("t", Role::Decode, 0, "h");
        prefill
            .engine
            .args
            .extend(args.iter().map(|a| a.to_string()));
        prefill.engine.env.push(EnvVar::new(env.0, env.1));
        crate::plan::testing::plan(
            RuntimePlan::Docker {
                image: "img".into(),
                pull_policy: crate::plan::PullPolicy::Never,
                network_mode: "host".into(),
            },
            vec![prefill, decode],
        )
    }

    #[test]
    fn dollars_reach_the_engine_unchanged() {
        let plan = plan_with(
            &["--hf-overrides", "$(cat x)", "$HOME"],
            ("PS1", "${USER}$"),
        );
        let text = crate::export::render(crate::export::Kind::Compose, &plan, &Default::default())
            .unwrap();
        assert!(text.contains("- $$(cat x)\n"), "{text}");
        assert!(text.contains("- $$HOME\n"), "{text}");
        assert!(text.contains("- PS1=$${USER}$$\n"), "{text}");
        // Every `$` left is the first of a `$$` pair: nothing for Compose to interpolate.
        assert!(!text.replace("$$", "").contains('$'), "{text}");
    }

    #[test]
    fn the_routers_api_key_comes_from_the_environment_of_compose() {
        let mut plan = plan_with(&[], ("A", "b"));
        plan.proxy.api_key_env = Some("MY_KEY".into());
        let compose = render(&plan, &Default::default()).unwrap();
        let router = &compose.services["pdctl-t-router"];
        assert!(router.command.iter().all(|a| !a.starts_with("--api-key")));
        assert_eq!(
            router.environment,
            ["PDCTL_API_KEY=${MY_KEY:?the API key clients must send}"]
        );
    }
}
