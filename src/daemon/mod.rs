//! The daemon: one per project. It holds the project lock, runs the reconciler, the embedded
//! proxy and the control API, and on Ctrl-C / SIGTERM / `pdctl down` takes everything down:
//! proxy first (drains), then the engines (stop signal, grace, removal).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::gpu::{GpuInfo, GpuInventory};
use crate::plan::{self, Plan, PlanError, Role, RuntimePlan};
use crate::proxy::EndpointSet;
use crate::reconcile::{self, InstanceStatus, Reconciler};
use crate::runtime::{DockerRuntime, ProcessRuntime, Runtime, RuntimeError};
use crate::spec::LoadedSpec;

pub mod api;
pub mod detach;
pub mod down;
pub mod progress;
pub mod state;

pub use api::{ClientError, StatusReport};
pub use progress::Observer;
pub use state::{Scale, StateDir};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("failed to {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the proxy cannot listen on {addr} ([proxy] listen): {source}; is another pdctl or server using it?")]
    ProxyBind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot start the daemon: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the daemon exited during startup ({status}); its log:\n{log}")]
    StartupExit {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("the daemon of {project} (pid {pid:?}) holds the lock but does not answer on {}", socket.display())]
    Unresponsive {
        project: String,
        pid: Option<u32>,
        socket: PathBuf,
    },
}

impl DaemonError {
    pub fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        DaemonError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A loaded pools.toml plus the GPUs it was planned on: enough to re-plan for `scale`.
#[derive(Clone)]
pub struct Deployment {
    pub loaded: LoadedSpec,
    pub gpus: Vec<GpuInfo>,
}

impl Deployment {
    pub fn load(path: &Path, inventory: &dyn GpuInventory) -> Result<Self, PlanError> {
        let (loaded, gpus) = plan::load(path, inventory)?;
        Ok(Deployment { loaded, gpus })
    }

    pub fn project(&self) -> &str {
        &self.loaded.project
    }

    /// The plan with `scale` applied over the file's replica counts.
    pub fn plan(&self, scale: Scale) -> Result<Plan, PlanError> {
        let mut l = self.loaded.clone();
        if let Some(n) = scale.prefill {
            l.spec.prefill.replicas = n;
        }
        if let Some(n) = scale.decode {
            l.spec.decode.replicas = n;
        }
        plan::build(&l, &self.gpus)
    }
}

/// The runtime a plan asks for ([`plan::runtime_plan`] when only listing, stopping or reading
/// logs); local processes keep their records in the project's state directory.
pub async fn connect_runtime(
    runtime: &RuntimePlan,
    state: &StateDir,
) -> Result<Arc<dyn Runtime>, RuntimeError> {
    Ok(match runtime {
        RuntimePlan::Docker {
            pull_policy,
            network_mode,
            ..
        } => Arc::new(DockerRuntime::connect(*pull_policy, network_mode).await?),
        RuntimePlan::Process { .. } => Arc::new(ProcessRuntime::new(&state.dir)?),
    })
}

/// Stops and removes every instance of `project`, in parallel. Returns how many there were.
pub async fn stop_all(
    rt: &dyn Runtime,
    project: &str,
    grace: Duration,
) -> Result<usize, DaemonError> {
    let found = rt.list(project).await?;
    let n = found.len();
    let stops = found.iter().map(|o| async move {
        if let Err(e) = rt.stop(&o.name, grace).await {
            tracing::warn!(instance = %o.name, error = %e, "stop failed");
        }
        if let Err(e) = rt.remove(&o.name).await {
            tracing::warn!(instance = %o.name, error = %e, "remove failed");
        }
    });
    futures_util::future::join_all(stops).await;
    Ok(n)
}

/// The address clients use: a wildcard listen address is reached on loopback.
pub fn endpoint_url(listen: &str) -> String {
    let host_port = listen
        .replace("0.0.0.0:", "127.0.0.1:")
        .replace("[::]:", "127.0.0.1:");
    format!("http://{host_port}")
}

struct Ctl {
    dep: Deployment,
    state: StateDir,
    runtime: &'static str,
    scale: Mutex<Scale>,
    plan_tx: watch::Sender<Plan>,
    status_rx: watch::Receiver<Vec<InstanceStatus>>,
    stop: CancellationToken,
}

impl api::Control for Ctl {
    fn status(&self) -> StatusReport {
        let plan = self.plan_tx.borrow();
        StatusReport {
            project: plan.project.clone(),
            runtime: self.runtime.into(),
            pid: std::process::id(),
            endpoint: endpoint_url(&plan.proxy.listen),
            served_model: plan.model.served_name.clone(),
            api_key_env: plan.proxy.api_key_env.clone(),
            prefill_replicas: plan.instances_of(Role::Prefill).count() as u32,
            decode_replicas: plan.instances_of(Role::Decode).count() as u32,
            instances: self.status_rx.borrow().clone(),
        }
    }

    fn scale(&self, s: Scale) -> Result<StatusReport, DaemonError> {
        let mut cur = self.scale.lock().unwrap_or_else(|p| p.into_inner());
        let next = Scale {
            prefill: s.prefill.or(cur.prefill),
            decode: s.decode.or(cur.decode),
        };
        let plan = self.dep.plan(next)?;
        self.state.set_scale(next)?;
        *cur = next;
        drop(cur);
        tracing::info!(prefill = ?next.prefill, decode = ?next.decode, "scaled");
        self.plan_tx.send_replace(plan);
        Ok(self.status())
    }

    fn down(&self) {
        self.stop.cancel();
    }
}

/// Everything `up` needs once the file is planned and the lock is held.
pub struct Up {
    pub dep: Deployment,
    pub scale: Scale,
    pub state: StateDir,
    pub lock: std::fs::File,
    /// Who is told about pulls, state changes, readiness and the end.
    pub observer: Box<dyn Observer>,
}

/// Runs the daemon in this process until Ctrl-C, SIGTERM or `pdctl down`.
pub async fn run(up: Up) -> Result<(), DaemonError> {
    let Up {
        dep,
        scale,
        state,
        mut lock,
        observer,
    } = up;
    state::write_pid(&mut lock);
    let plan = dep.plan(scale)?;
    // The proxy refuses to run open when its key is missing; say so before any engine starts.
    if let Some(name) = &plan.proxy.api_key_env {
        if std::env::var(name).map_or(true, |v| v.is_empty()) {
            return Err(crate::proxy::ProxyError::ApiKeyEnv { name: name.clone() }.into());
        }
    }
    let listen = plan.proxy.listen.clone();
    // Bind before touching any engine: a busy port is reported at once, nothing to undo.
    let proxy_listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|source| DaemonError::ProxyBind {
            addr: listen.clone(),
            source,
        })?;
    let runtime = connect_runtime(&plan.runtime, &state).await?;
    ensure_images(runtime.as_ref(), &plan, observer.as_ref()).await?;
    let control = api::bind(&state.socket())?;

    let stop = CancellationToken::new();
    let (plan_tx, plan_rx) = watch::channel(plan.clone());
    let (endpoints_tx, endpoints_rx) = watch::channel(EndpointSet::default());
    let (status_tx, status_rx) = watch::channel(Vec::new());
    let ctl = Arc::new(Ctl {
        dep,
        state: state.clone(),
        runtime: runtime.kind(),
        scale: Mutex::new(scale),
        plan_tx,
        status_rx: status_rx.clone(),
        stop: stop.clone(),
    });

    let recon_stop = CancellationToken::new();
    let reconciler = tokio::spawn(
        Reconciler::new(runtime.clone(), reconcile::Config::default()).run(
            plan_rx,
            endpoints_tx,
            status_tx,
            recon_stop.clone(),
        ),
    );
    let proxy_stop = CancellationToken::new();
    let proxy = {
        let (stop, section, proxy_stop) = (stop.clone(), plan.proxy.clone(), proxy_stop.clone());
        tokio::spawn(async move {
            let r = crate::proxy::serve_embedded(proxy_listener, section, endpoints_rx, proxy_stop)
                .await;
            // A proxy that ends on its own leaves nothing to serve: take the engines down too.
            if let Err(e) = &r {
                tracing::error!(error = %e, "the proxy stopped; going down");
            }
            stop.cancel();
            r
        })
    };
    let api_stop = CancellationToken::new();
    let api_task = tokio::spawn(api::serve(control, ctl.clone(), api_stop.clone()));

    {
        let stop = stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: going down"),
                _ = term.recv() => tracing::info!("SIGTERM: going down"),
            }
            stop.cancel();
        });
    }
    progress::follow(observer.as_ref(), ctl.as_ref(), status_rx, &stop).await;

    // Down: routing first (in-flight requests drain), then the engines.
    recon_stop.cancel();
    let _ = reconciler.await;
    proxy_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(35), proxy).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "proxy ended with an error"),
        Err(_) => tracing::warn!("proxy did not drain in time"),
        _ => {}
    }
    let grace = plan
        .instances
        .iter()
        .map(|i| Duration::from_secs(u64::from(i.stop_grace_seconds)))
        .max()
        .unwrap_or(Duration::from_secs(30));
    let n = stop_all(runtime.as_ref(), &plan.project, grace).await?;
    api_stop.cancel();
    let _ = api_task.await;
    let _ = std::fs::remove_file(state.socket());
    state.clear_scale();
    observer.down(&plan.project, n);
    drop(lock);
    Ok(())
}

async fn ensure_images(
    rt: &dyn Runtime,
    plan: &Plan,
    observer: &dyn Observer,
) -> Result<(), DaemonError> {
    let mut done: Vec<Option<String>> = Vec::new();
    for inst in &plan.instances {
        if done.contains(&inst.image) {
            continue;
        }
        done.push(inst.image.clone());
        let bar = observer.pulling(inst.image.as_deref().unwrap_or("-"));
        let r = rt.ensure_image(inst, &|p| bar.update(&p)).await;
        bar.finish();
        r?;
    }
    Ok(())
}
