//! The Docker runtime, through bollard 0.21 only (never the docker CLI). Every bollard type is
//! confined to this file.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, DeviceRequest, HostConfig, Mount, MountType,
    PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::Docker;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};

use super::{
    role_of, ExitInfo, Observed, Progress, PullProgress, RunState, Runtime, RuntimeError,
    RuntimeEvent, LABEL_PROJECT, LABEL_SPEC_HASH,
};
use crate::plan::{Instance, NamespaceMode, PullPolicy};

/// The client timeout covers only "until response headers" (streams are not cut), but a stop
/// with a long grace holds the answer back, so it must exceed the largest grace we ask for.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(330);

pub struct DockerRuntime {
    docker: Docker,
    pull_policy: PullPolicy,
    network_mode: String,
}

fn policy_name(p: PullPolicy) -> &'static str {
    match p {
        PullPolicy::Always => "always",
        PullPolicy::IfNotPresent => "if-not-present",
        PullPolicy::Never => "never",
    }
}

impl DockerRuntime {
    /// Connects through `DOCKER_HOST` (unix, tcp) or the local socket, negotiates the API
    /// version (the engine here speaks 1.41, bollard defaults to 1.53) and pings.
    pub async fn connect(
        pull_policy: PullPolicy,
        network_mode: &str,
    ) -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_defaults().map_err(RuntimeError::Connect)?;
        let docker = docker
            .with_timeout(CLIENT_TIMEOUT)
            .negotiate_version()
            .await
            .map_err(RuntimeError::Connect)?;
        docker.ping().await.map_err(RuntimeError::Connect)?;
        Ok(DockerRuntime {
            docker,
            pull_policy,
            network_mode: network_mode.to_string(),
        })
    }

    async fn image_present(&self, image: &str) -> bool {
        self.docker.inspect_image(image).await.is_ok()
    }

    async fn pull(&self, image: &str, progress: Progress<'_>) -> Result<(), RuntimeError> {
        let policy = policy_name(self.pull_policy);
        let opts = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let mut stream = self.docker.create_image(Some(opts), None, None);
        let mut failure = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    let (current, total) = info
                        .progress_detail
                        .map(|d| (d.current.unwrap_or(0), d.total.unwrap_or(0)))
                        .unwrap_or((0, 0));
                    progress(PullProgress {
                        status: info.status.unwrap_or_default(),
                        current: current.max(0) as u64,
                        total: total.max(0) as u64,
                    });
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        // bollard 0.21 can end a successful pull with "bytes remaining on stream" (#292):
        // the image being there afterwards is what counts.
        match failure {
            Some(_) if self.image_present(image).await => Ok(()),
            Some(source) => Err(RuntimeError::Pull {
                image: image.into(),
                policy,
                source,
            }),
            None => Ok(()),
        }
    }

    fn err(op: &'static str, name: &str) -> impl FnOnce(BollardError) -> RuntimeError {
        let name = name.to_string();
        move |source| RuntimeError::Docker { op, name, source }
    }
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Docker's answer "already stopped/started" (304) is success for an idempotent runtime.
fn is_not_modified(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 304,
            ..
        }
    )
}

/// The container spec for `inst`: a pure rendering of the plan (unit-tested below).
pub fn container_body(inst: &Instance, network_mode: &str) -> ContainerCreateBody {
    let host_network = network_mode == "host";
    let ports = [inst.http_port, inst.side_channel_port];
    let port_key = |p: u16| format!("{p}/tcp");
    let device_requests = (!inst.gpus.is_empty()).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            // Explicit ids, never `count`: the daemon rejects both together, and a bare
            // capabilities request would hand the container every GPU.
            device_ids: Some(inst.gpus.iter().map(|g| g.uuid.clone()).collect()),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    });
    let ns = |m: NamespaceMode| match m {
        NamespaceMode::Host => "host".to_string(),
        NamespaceMode::Private => "private".to_string(),
    };
    // One /dev/shm mechanism only (moby #35455, compose #5797): the host's when the IPC
    // namespace is shared, otherwise a private one of the planned size.
    let shm_size = (inst.ipc_mode != NamespaceMode::Host).then_some(inst.shm_size_bytes as i64);
    let mounts: Vec<Mount> = inst
        .mounts
        .iter()
        .map(|m| Mount {
            target: Some(m.target.display().to_string()),
            source: Some(m.source.display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(m.read_only),
            ..Default::default()
        })
        .collect();
    let port_bindings = (!host_network).then(|| {
        ports
            .iter()
            .map(|&p| {
                (
                    port_key(p),
                    Some(vec![PortBinding {
                        host_ip: Some("127.0.0.1".into()),
                        host_port: Some(p.to_string()),
                    }]),
                )
            })
            .collect::<HashMap<_, _>>()
    });
    ContainerCreateBody {
        image: inst.image.clone(),
        entrypoint: inst.argv.first().map(|a| vec![a.clone()]),
        cmd: Some(inst.argv.iter().skip(1).cloned().collect()),
        env: Some(
            inst.env
                .iter()
                .map(|e| format!("{}={}", e.name, e.value))
                .collect(),
        ),
        labels: Some(inst.labels.clone().into_iter().collect()),
        exposed_ports: (!host_network).then(|| ports.iter().map(|&p| port_key(p)).collect()),
        stop_signal: Some(inst.stop_signal.clone()),
        stop_timeout: Some(inst.stop_grace_seconds as i64),
        host_config: Some(HostConfig {
            device_requests,
            shm_size,
            ipc_mode: Some(ns(inst.ipc_mode)),
            pid_mode: Some(ns(inst.pid_mode)).filter(|m| m == "host"),
            network_mode: Some(network_mode.to_string()),
            port_bindings,
            mounts: (!mounts.is_empty()).then_some(mounts),
            privileged: Some(false),
            // pdctl supervises: Docker never restarts a running-but-unhealthy container.
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Runtime for DockerRuntime {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn ensure_image<'a>(
        &'a self,
        inst: &'a Instance,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            let image = inst.image.as_deref().unwrap_or_default();
            match self.pull_policy {
                PullPolicy::Never if self.image_present(image).await => Ok(()),
                PullPolicy::Never => Err(RuntimeError::ImageMissing {
                    image: image.into(),
                    policy: policy_name(self.pull_policy),
                }),
                PullPolicy::IfNotPresent if self.image_present(image).await => Ok(()),
                PullPolicy::IfNotPresent | PullPolicy::Always => self.pull(image, progress).await,
            }
        }
        .boxed()
    }

    fn create<'a>(&'a self, inst: &'a Instance) -> BoxFuture<'a, Result<String, RuntimeError>> {
        async move {
            let opts = CreateContainerOptionsBuilder::default()
                .name(&inst.name)
                .build();
            let body = container_body(inst, &self.network_mode);
            let created = self
                .docker
                .create_container(Some(opts), body)
                .await
                .map_err(Self::err("create", &inst.name))?;
            Ok(created.id)
        }
        .boxed()
    }

    fn start<'a>(&'a self, inst: &'a Instance) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            match self.docker.start_container(&inst.name, None).await {
                Err(e) if !is_not_modified(&e) => Err(Self::err("start", &inst.name)(e)),
                _ => Ok(()),
            }
        }
        .boxed()
    }

    fn stop<'a>(
        &'a self,
        name: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            let opts = StopContainerOptionsBuilder::default()
                .t(grace.as_secs().min(300) as i32)
                .build();
            match self.docker.stop_container(name, Some(opts)).await {
                Err(e) if !is_not_modified(&e) && !is_not_found(&e) => {
                    Err(Self::err("stop", name)(e))
                }
                _ => Ok(()),
            }
        }
        .boxed()
    }

    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        async move {
            let opts = RemoveContainerOptionsBuilder::default().force(true).build();
            match self.docker.remove_container(name, Some(opts)).await {
                Err(e) if !is_not_found(&e) => Err(Self::err("remove", name)(e)),
                _ => Ok(()),
            }
        }
        .boxed()
    }

    fn list<'a>(&'a self, project: &'a str) -> BoxFuture<'a, Result<Vec<Observed>, RuntimeError>> {
        async move {
            let filters = HashMap::from([("label", vec![format!("{LABEL_PROJECT}={project}")])]);
            let opts = ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build();
            let found = self
                .docker
                .list_containers(Some(opts))
                .await
                .map_err(Self::err("list", project))?;
            let mut out = Vec::new();
            for c in found {
                let name = c
                    .names
                    .as_ref()
                    .and_then(|n| n.first())
                    .map(|n| n.trim_start_matches('/').to_string())
                    .unwrap_or_default();
                let labels: BTreeMap<String, String> =
                    c.labels.clone().unwrap_or_default().into_iter().collect();
                let state = match c.state {
                    Some(ContainerSummaryStateEnum::CREATED) => RunState::Created,
                    Some(ContainerSummaryStateEnum::RUNNING) => RunState::Running,
                    Some(ContainerSummaryStateEnum::EXITED) => RunState::Exited,
                    _ => RunState::Other,
                };
                let exit = if state == RunState::Exited {
                    // The summary has no exit code; inspect has it and the OOM flag.
                    self.docker
                        .inspect_container(&name, None)
                        .await
                        .ok()
                        .and_then(|i| i.state)
                        .map(|s| ExitInfo {
                            code: s.exit_code,
                            oom_killed: s.oom_killed.unwrap_or(false),
                        })
                } else {
                    None
                };
                out.push(Observed {
                    id: c.id.clone().unwrap_or_default().chars().take(12).collect(),
                    role: role_of(&labels),
                    spec_hash: labels.get(LABEL_SPEC_HASH).cloned().unwrap_or_default(),
                    name,
                    labels,
                    state,
                    exit,
                });
            }
            Ok(out)
        }
        .boxed()
    }

    fn logs(
        &self,
        name: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> BoxStream<'static, Result<Bytes, RuntimeError>> {
        let tail = tail.map_or_else(|| "all".to_string(), |n| n.to_string());
        let opts = LogsOptionsBuilder::default()
            .follow(follow)
            .stdout(true)
            .stderr(true)
            .tail(&tail)
            .build();
        let name = name.to_string();
        self.docker
            .logs(&name, Some(opts))
            .map(move |item| {
                item.map(|o| o.into_bytes())
                    .map_err(|source| RuntimeError::Docker {
                        op: "read logs of",
                        name: name.clone(),
                        source,
                    })
            })
            .boxed()
    }

    fn events(&self, project: &str) -> BoxStream<'static, RuntimeEvent> {
        let filters = HashMap::from([
            ("type", vec!["container".to_string()]),
            ("event", vec!["die".into(), "oom".into()]),
            ("label", vec![format!("{LABEL_PROJECT}={project}")]),
        ]);
        let opts = EventsOptionsBuilder::default().filters(&filters).build();
        self.docker
            .events(Some(opts))
            .filter_map(|item| async move {
                let msg = item.ok()?;
                let name = msg.actor?.attributes?.get("name")?.clone();
                Some(RuntimeEvent {
                    name,
                    action: msg.action.unwrap_or_default(),
                })
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{EnvVar, GpuAssignment, Mount as PlanMount};
    use crate::reconcile::testing::instance;

    #[test]
    fn gpu_container_shares_host_ipc_and_pid_and_names_its_devices() {
        let mut inst = instance("p", crate::plan::Role::Prefill, 0, "h1");
        inst.gpus = vec![GpuAssignment {
            index: 2,
            uuid: "GPU-abc".into(),
        }];
        inst.ipc_mode = NamespaceMode::Host;
        inst.pid_mode = NamespaceMode::Host;
        inst.mounts = vec![PlanMount {
            source: "/srv/m".into(),
            target: "/mnt/models".into(),
            read_only: true,
        }];
        let body = container_body(&inst, "host");
        let hc = body.host_config.unwrap();
        let dr = &hc.device_requests.unwrap()[0];
        assert_eq!(dr.device_ids.as_deref(), Some(&["GPU-abc".to_string()][..]));
        assert_eq!(dr.count, None);
        assert_eq!(dr.capabilities, Some(vec![vec!["gpu".to_string()]]));
        assert_eq!(
            hc.shm_size, None,
            "host IPC: the host's /dev/shm, no shm_size"
        );
        assert_eq!(hc.ipc_mode.as_deref(), Some("host"));
        assert_eq!(hc.pid_mode.as_deref(), Some("host"));
        assert_eq!(hc.port_bindings, None);
        assert_eq!(hc.privileged, Some(false));
        assert_eq!(hc.tmpfs, None);
        let m = &hc.mounts.unwrap()[0];
        assert_eq!(m.read_only, Some(true));
        assert_eq!(m.target.as_deref(), Some("/mnt/models"));
    }

    #[test]
    fn cpu_container_gets_private_shm_of_planned_size_and_loopback_ports() {
        let mut inst = instance("p", crate::plan::Role::Decode, 1, "h1");
        inst.env = vec![EnvVar {
            name: "A".into(),
            value: "b=c".into(),
        }];
        let body = container_body(&inst, "bridge");
        assert_eq!(body.entrypoint, Some(vec!["vllm".to_string()]));
        assert_eq!(body.cmd.as_ref().unwrap()[0], "serve");
        assert_eq!(body.env, Some(vec!["A=b=c".to_string()]));
        assert_eq!(
            body.labels
                .as_ref()
                .unwrap()
                .get("pdctl.spec-hash")
                .map(String::as_str),
            Some("h1")
        );
        let hc = body.host_config.unwrap();
        assert_eq!(
            hc.device_requests, None,
            "no GPUs: no device request at all"
        );
        assert_eq!(hc.shm_size, Some(1 << 30));
        assert_eq!(hc.ipc_mode.as_deref(), Some("private"));
        assert_eq!(hc.pid_mode, None);
        let pb = hc.port_bindings.unwrap();
        let b = &pb[&format!("{}/tcp", inst.http_port)].as_ref().unwrap()[0];
        assert_eq!(b.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(
            hc.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::NO)
        );
        assert_eq!(body.stop_signal.as_deref(), Some("SIGTERM"));
    }
}
