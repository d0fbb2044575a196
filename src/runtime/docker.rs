//! The Docker runtime, through bollard 0.21 only (never the docker CLI). Every bollard type is
//! confined to this file.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::ContainerSummaryStateEnum;
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

use super::container::container_body;
use super::{
    ExitInfo, Observed, Progress, PullProgress, RunState, Runtime, RuntimeError, RuntimeEvent,
};
use crate::plan::{label, Instance, PullPolicy};

/// The client timeout covers only "until response headers" (streams are not cut), but a stop
/// with a long grace holds the answer back, so it must exceed the largest grace we ask for.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(330);

pub struct DockerRuntime {
    docker: Docker,
    pull_policy: PullPolicy,
    network_mode: String,
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
        let policy = self.pull_policy.as_str();
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
                    policy: self.pull_policy.as_str(),
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
            let image = inst.image.as_deref().unwrap_or_default();
            let body = container_body(inst, image, &self.network_mode);
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
            let filters = HashMap::from([("label", vec![format!("{}={project}", label::PROJECT)])]);
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
                    role: label::role(&labels),
                    spec_hash: labels.get(label::SPEC_HASH).cloned().unwrap_or_default(),
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
            ("label", vec![format!("{}={project}", label::PROJECT)]),
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
