//! The daemon's life: from a planned, locked project to the engines running behind the proxy,
//! and down again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::api::{self, StatusReport};
use super::progress::{self, Observer};
use super::{
    connect_runtime, endpoint_url, state, stop_all, DaemonError, Deployment, Scale, StateDir,
};
use crate::plan::{Plan, Role};
use crate::proxy::EndpointSet;
use crate::reconcile::{self, InstanceStatus, Reconciler};
use crate::runtime::Runtime;

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
    // The proxy's API key stays with the proxy: engines do not inherit its variable.
    let runtime = connect_runtime(&plan.runtime, &state, plan.proxy.api_key_env.as_slice()).await?;
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
