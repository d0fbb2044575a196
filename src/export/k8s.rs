//! Plain Kubernetes for clusters without KServe: per role a Deployment and a headless Service
//! (whose DNS name resolves to the ready pods), the decode pods with `pdctl sidecar` as a native
//! sidecar, and a router Deployment + Service running `pdctl proxy`, which discovers both pools
//! through the headless Services.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, HTTPGetAction, PodSpec, PodTemplateSpec, Probe, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::plan::{Instance, Plan, Role};

use super::pod::{self, Sidecar, SIDECAR_PORT};
use super::{ExportError, Options};

/// Either kind of object, serialized with its own `apiVersion` and `kind`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Object {
    Deployment(Box<Deployment>),
    Service(Box<Service>),
}

const ROUTER_PORT: u16 = 8000;

pub fn workload_name(plan: &Plan, role: Role) -> String {
    format!("{}-{}", plan.project, role.as_str())
}

fn meta(name: &str, labels: &BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        labels: Some(labels.clone()),
        ..Default::default()
    }
}

fn deployment(
    name: &str,
    replicas: i32,
    labels: BTreeMap<String, String>,
    pod: PodSpec,
) -> Deployment {
    Deployment {
        metadata: meta(name, &labels),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn service(name: &str, labels: BTreeMap<String, String>, port: u16, headless: bool) -> Service {
    Service {
        metadata: meta(name, &labels),
        spec: Some(ServiceSpec {
            cluster_ip: headless.then(|| "None".to_string()),
            selector: Some(labels),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: i32::from(port),
                target_port: Some(IntOrString::Int(i32::from(port))),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod of one pool: its first instance stands for every replica (replicas differ locally
/// only in host ports and GPU ids, which a pod does not need).
pub fn pool_pod(plan: &Plan, instance: &Instance, opts: &Options) -> PodSpec {
    let (dshm, _) = pod::dshm_volume(instance);
    let (model, _) = pod::model_volume(plan);
    let init_containers = (instance.role == Role::Decode).then(|| {
        let image = match &opts.sidecar {
            Sidecar::Pdctl(image) => image.clone(),
            Sidecar::LlmD => opts.pdctl_image.clone(),
        };
        // The router does P/D itself and never sends x-prefiller-host-port: refuse any.
        vec![pod::sidecar_container(
            &Sidecar::Pdctl(image),
            vec![
                "--enable-ssrf-protection=true".into(),
                "--ssrf-deny-all".into(),
            ],
        )]
    });
    PodSpec {
        containers: vec![pod::engine_container(
            plan,
            instance,
            &instance.engine.model,
        )],
        init_containers,
        volumes: Some(vec![dshm, model]),
        termination_grace_period_seconds: Some(i64::from(instance.stop_grace_seconds)),
        ..Default::default()
    }
}

fn router_labels(plan: &Plan) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/component".to_string(),
            "llminferenceservice-router".to_string(),
        ),
        ("app.kubernetes.io/name".to_string(), plan.project.clone()),
        (
            "app.kubernetes.io/part-of".to_string(),
            "llminferenceservice".to_string(),
        ),
    ])
}

/// `pdctl proxy` flags equivalent to the plan's `[proxy]` section (all but where to listen,
/// what to route to and the API key, which each target passes its own way).
pub fn policy_args(plan: &Plan) -> Vec<String> {
    let p = &plan.proxy;
    let mut args = vec![
        format!("--prefill-policy={}", kebab(&p.prefill_policy)),
        format!("--decode-policy={}", kebab(&p.decode_policy)),
        format!("--pd-threshold={}", p.pd_threshold_tokens),
        format!("--prefill-failure={}", kebab(&p.prefill_failure)),
        format!("--prefill-max-retries={}", p.prefill_max_retries),
        duration_flag("--prefill-retry-backoff", p.prefill_retry_backoff),
        duration_flag("--connect-timeout", p.connect_timeout),
        duration_flag("--prefill-timeout", p.prefill_timeout),
        duration_flag("--decode-first-byte-timeout", p.decode_first_byte_timeout),
        format!("--max-body-bytes={}", p.max_body_bytes),
        format!("--max-buffered-body-bytes={}", p.max_buffered_body_bytes),
        format!("--max-client-connections={}", p.max_client_connections),
    ];
    if p.metrics_public {
        args.push("--metrics-public".into());
    }
    args
}

fn duration_flag(flag: &str, value: std::time::Duration) -> String {
    format!("{flag}={}", humantime::format_duration(value))
}

/// The kebab-case name serde gives a policy enum (as pools.toml spells it).
fn kebab<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn router_pod(plan: &Plan, opts: &Options) -> PodSpec {
    let dns = |role| {
        format!(
            "{}:{}",
            workload_name(plan, role),
            match role {
                Role::Prefill => pod::PREFILL_PORT,
                Role::Decode => SIDECAR_PORT,
            }
        )
    };
    let mut argv = vec![
        "pdctl".to_string(),
        "proxy".into(),
        format!("--listen=0.0.0.0:{ROUTER_PORT}"),
        format!("--prefill-dns={}", dns(Role::Prefill)),
        format!("--decode-dns={}", dns(Role::Decode)),
    ];
    argv.extend(policy_args(plan));
    if let Some(env) = &plan.proxy.api_key_env {
        // Kubernetes expands `$(VAR)` in args from the container's environment.
        argv.push(format!("--api-key=$({env})"));
    }
    let health = |period, failures| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/health".into()),
            port: IntOrString::Int(i32::from(ROUTER_PORT)),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(1),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    PodSpec {
        containers: vec![Container {
            name: "router".into(),
            image: Some(opts.pdctl_image.clone()),
            image_pull_policy: Some("IfNotPresent".into()),
            command: Some(argv),
            ports: Some(vec![ContainerPort {
                container_port: i32::from(ROUTER_PORT),
                name: Some("http".into()),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            // Ready only with a ready prefill AND decode behind it (pair-aware /health).
            readiness_probe: Some(health(2, 2)),
            security_context: Some(pod::security_context()),
            lifecycle: Some(pod::pre_stop_sleep()),
            ..Default::default()
        }],
        termination_grace_period_seconds: Some(60),
        ..Default::default()
    }
}

pub fn render(plan: &Plan, opts: &Options) -> Result<Vec<Object>, ExportError> {
    let mut objects = Vec::new();
    for role in [Role::Prefill, Role::Decode] {
        let instance = plan
            .instances
            .iter()
            .find(|i| i.role == role)
            .ok_or(ExportError::NoInstance(role))?;
        let replicas = plan.instances.iter().filter(|i| i.role == role).count() as i32;
        let name = workload_name(plan, role);
        let labels = pod::kserve_labels(instance);
        let port = match role {
            Role::Prefill => pod::PREFILL_PORT,
            Role::Decode => SIDECAR_PORT,
        };
        objects.push(Object::Deployment(Box::new(deployment(
            &name,
            replicas,
            labels.clone(),
            pool_pod(plan, instance, opts),
        ))));
        objects.push(Object::Service(Box::new(service(
            &name, labels, port, true,
        ))));
    }
    let name = format!("{}-router", plan.project);
    let labels = router_labels(plan);
    objects.push(Object::Deployment(Box::new(deployment(
        &name,
        1,
        labels.clone(),
        router_pod(plan, opts),
    ))));
    objects.push(Object::Service(Box::new(service(
        &plan.project,
        labels,
        ROUTER_PORT,
        false,
    ))));
    Ok(objects)
}
