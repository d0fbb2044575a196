//! KServe `LLMInferenceService` (serving.kserve.io/v1alpha2): the decode pool is the top-level
//! workload, the prefill pool is `spec.prefill`. With configs, the pod templates move into two
//! `LLMInferenceServiceConfig` objects referenced by `baseRefs`.

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::plan::{Instance, ModelSource, Plan, Role};

use super::pod::{self, Sidecar};
use super::{ExportError, Options};

const API_VERSION: &str = "serving.kserve.io/v1alpha2";

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Object {
    api_version: &'static str,
    kind: &'static str,
    metadata: ObjectMeta,
    spec: Spec,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<Model>,
    #[serde(flatten)]
    workload: Workload,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefill: Option<Workload>,
    #[serde(skip_serializing_if = "Option::is_none")]
    router: Option<Router>,
    #[serde(skip_serializing_if = "Option::is_none")]
    base_refs: Option<Vec<BaseRef>>,
}

#[derive(Debug, Serialize)]
struct Model {
    uri: String,
    name: String,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Workload {
    #[serde(skip_serializing_if = "Option::is_none")]
    replicas: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallelism: Option<Parallelism>,
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<PodSpec>,
}

#[derive(Debug, Serialize)]
struct Parallelism {
    tensor: i32,
}

/// `{}` for each: the controller manages the HTTPRoute, the Gateway binding and the scheduler.
#[derive(Debug, Serialize)]
struct Router {
    route: Empty,
    gateway: Empty,
    scheduler: Empty,
}

#[derive(Debug, Serialize)]
struct Empty {}

#[derive(Debug, Serialize)]
struct BaseRef {
    name: String,
}

pub fn model_uri(plan: &Plan) -> String {
    match &plan.model.source {
        ModelSource::HuggingFace { id, .. } => format!("hf://{id}"),
        ModelSource::Path { .. } => format!("pvc://{}/", pod::model_claim(plan)),
    }
}

fn first(plan: &Plan, role: Role) -> Result<&Instance, ExportError> {
    plan.instances
        .iter()
        .find(|i| i.role == role)
        .ok_or(ExportError::NoInstance(role))
}

fn replicas(plan: &Plan, role: Role) -> i32 {
    plan.instances.iter().filter(|i| i.role == role).count() as i32
}

fn parallelism(instance: &Instance) -> Parallelism {
    Parallelism {
        tensor: instance.gpu_count.max(1) as i32,
    }
}

/// The engine container for KServe: the model lives at /mnt/models (where KServe's storage
/// initializer puts `model.uri`), so the model argument points there.
fn kserve_pod(plan: &Plan, instance: &Instance, opts: &Options) -> PodSpec {
    let mut main = pod::engine_container(plan, instance, crate::plan::instance::MODEL_MOUNT);
    // KServe's storage initializer provides /mnt/models; only shm is ours to declare.
    let (dshm, dshm_mount) = pod::dshm_volume(instance);
    main.volume_mounts = Some(vec![dshm_mount]);
    let init_containers = (instance.role == Role::Decode).then(|| {
        let ssrf = match &opts.sidecar {
            // KServe's preset watches the legacy x-k8s pool group, which stock installs lack;
            // the v1 pool the controller creates is in inference.networking.k8s.io.
            Sidecar::LlmD => vec![
                "--enable-ssrf-protection=true".into(),
                "--pool-group=inference.networking.k8s.io".into(),
                format!(
                    "--inference-pool=$(INFERENCE_POOL_NAMESPACE)/{}-inference-pool",
                    plan.project
                ),
            ],
            // pdctl's sidecar cannot watch InferencePools (see docs/export.md).
            Sidecar::Pdctl(_) => vec!["--enable-ssrf-protection=false".into()],
        };
        let mut sidecar = pod::sidecar_container(&opts.sidecar, ssrf);
        sidecar.env = Some(vec![EnvVar {
            name: "INFERENCE_POOL_NAMESPACE".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.namespace".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        vec![sidecar]
    });
    PodSpec {
        containers: vec![main],
        init_containers,
        volumes: Some(vec![dshm]),
        termination_grace_period_seconds: Some(i64::from(instance.stop_grace_seconds)),
        ..Default::default()
    }
}

fn metadata(plan: &Plan, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        labels: Some(
            [
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "pdctl".to_string(),
                ),
                ("app.kubernetes.io/name".to_string(), plan.project.clone()),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

pub fn render(plan: &Plan, opts: &Options) -> Result<Vec<Object>, ExportError> {
    let (prefill, decode) = (first(plan, Role::Prefill)?, first(plan, Role::Decode)?);
    let prefill_pod = kserve_pod(plan, prefill, opts);
    let decode_pod = kserve_pod(plan, decode, opts);
    let mut objects = Vec::new();
    let (prefill_template, decode_template, base_refs) = if opts.with_configs {
        let names = [
            format!("{}-prefill-template", plan.project),
            format!("{}-decode-template", plan.project),
        ];
        objects.push(Object {
            api_version: API_VERSION,
            kind: "LLMInferenceServiceConfig",
            metadata: metadata(plan, names[0].clone()),
            spec: Spec {
                prefill: Some(Workload {
                    template: Some(prefill_pod),
                    ..Default::default()
                }),
                ..Default::default()
            },
        });
        objects.push(Object {
            api_version: API_VERSION,
            kind: "LLMInferenceServiceConfig",
            metadata: metadata(plan, names[1].clone()),
            spec: Spec {
                workload: Workload {
                    template: Some(decode_pod),
                    ..Default::default()
                },
                ..Default::default()
            },
        });
        let refs = names.into_iter().map(|name| BaseRef { name }).collect();
        (None, None, Some(refs))
    } else {
        (Some(prefill_pod), Some(decode_pod), None)
    };
    objects.push(Object {
        api_version: API_VERSION,
        kind: "LLMInferenceService",
        metadata: metadata(plan, plan.project.clone()),
        spec: Spec {
            model: Some(Model {
                uri: model_uri(plan),
                name: plan.model.served_name.clone(),
            }),
            workload: Workload {
                replicas: Some(replicas(plan, Role::Decode)),
                parallelism: Some(parallelism(decode)),
                template: decode_template,
            },
            prefill: Some(Workload {
                replicas: Some(replicas(plan, Role::Prefill)),
                parallelism: Some(parallelism(prefill)),
                template: prefill_template,
            }),
            router: Some(Router {
                route: Empty {},
                gateway: Empty {},
                scheduler: Empty {},
            }),
            base_refs,
        },
    });
    Ok(objects)
}
