//! The control loop: level-triggered like kube-runtime's controllers. Every pass lists what
//! the runtime has (by project label), compares it with the plan, acts, and publishes the
//! READY endpoints for the proxy and a status table for the control API. Passes run
//! periodically and whenever the runtime reports a death, an operation completes, a probe
//! verdict changes or the plan changes (scale).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::health::{self, http::HttpProber, Health};
use crate::plan::{Instance, Plan, Role};
use crate::proxy::{Endpoint, EndpointSet};
use crate::runtime::{Observed, RunState, Runtime, RuntimeError};

pub mod decide;

pub use decide::{decide, observe, routable, Action, Backoff, Config, Tracker};

/// How often to look even when nothing wakes the loop (events can be missed).
const RESYNC: Duration = Duration::from_millis(500);

/// One row of `pdctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub instance: String,
    pub role: Option<Role>,
    pub state: String,
    pub ready: bool,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// Container id (12 digits) or pid.
    pub id: Option<String>,
    pub http_port: Option<u16>,
    /// False for leftovers being drained or removed.
    pub desired: bool,
}

/// What the loop asked the runtime to do to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Start,
    Restart,
    Recreate,
    Remove,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Start => "start",
            Op::Restart => "restart",
            Op::Recreate => "recreate",
            Op::Remove => "remove",
        }
    }
}

/// An operation finished (in its own task); the loop folds the outcome into the tracker.
struct Done {
    name: String,
    op: Op,
    result: Result<(), RuntimeError>,
}

struct Probe {
    cancel: CancellationToken,
    health: watch::Receiver<Health>,
}

pub struct Reconciler {
    runtime: Arc<dyn Runtime>,
    cfg: Config,
    trackers: BTreeMap<String, Tracker>,
    probes: HashMap<String, Probe>,
    prober: HttpProber,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    wake_tx: mpsc::UnboundedSender<()>,
    wake_rx: mpsc::UnboundedReceiver<()>,
    desired: Vec<Instance>,
    /// Operations in flight; awaited on shutdown so that none creates an engine after the
    /// daemon has listed what to stop.
    ops: tokio::task::JoinSet<()>,
}

impl Reconciler {
    pub fn new(runtime: Arc<dyn Runtime>, cfg: Config) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        Reconciler {
            runtime,
            cfg,
            trackers: BTreeMap::new(),
            probes: HashMap::new(),
            prober: HttpProber::new(),
            done_tx,
            done_rx,
            wake_tx,
            wake_rx,
            desired: Vec::new(),
            ops: tokio::task::JoinSet::new(),
        }
    }

    /// Runs until `shutdown`; then cancels probes and returns (the daemon stops the engines).
    pub async fn run(
        mut self,
        mut plan: watch::Receiver<Plan>,
        endpoints: watch::Sender<EndpointSet>,
        status: watch::Sender<Vec<InstanceStatus>>,
        shutdown: CancellationToken,
    ) {
        let project = plan.borrow().project.clone();
        let mut events = self.runtime.events(&project);
        let mut tick = tokio::time::interval(RESYNC);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let desired = plan.borrow().clone();
            self.pass(&desired, &endpoints, &status).await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                ev = events.next() => match ev {
                    Some(ev) => tracing::info!(instance = %ev.name, action = %ev.action, "runtime event"),
                    None => {
                        // The engine restarted or the stream broke: listen again, gently; the
                        // periodic pass covers the gap.
                        tracing::debug!("runtime event stream ended; resubscribing");
                        tokio::time::sleep(RESYNC).await;
                        events = self.runtime.events(&project);
                    }
                },
                Some(done) = self.done_rx.recv() => self.complete(done),
                Some(()) = self.wake_rx.recv() => {}
                Ok(()) = plan.changed() => tracing::info!("plan changed"),
            }
            while self.ops.try_join_next().is_some() {}
            // Drain what else arrived, so one pass handles a burst.
            while let Ok(done) = self.done_rx.try_recv() {
                self.complete(done);
            }
        }
        for (_, p) in self.probes.drain() {
            p.cancel.cancel();
        }
        while self.ops.join_next().await.is_some() {}
    }

    fn complete(&mut self, done: Done) {
        let now = Instant::now();
        let t = self.trackers.entry(done.name.clone()).or_default();
        t.busy = None;
        match (done.op, done.result) {
            (Op::Remove, Ok(())) => {
                self.trackers.remove(&done.name);
            }
            (_, Ok(())) => {
                t.running_since = Some(now);
                t.draining_since = None;
                t.health = Health::default();
                self.start_probe(&done.name, now);
            }
            (op, Err(e)) => {
                tracing::warn!(instance = %done.name, op = op.as_str(), error = %e, "operation failed");
                t.last_exit = Some(e.to_string());
                t.backoff_until = Some(now + self.cfg.backoff.delay(t.crashes));
                t.crashes += 1;
            }
        }
    }

    fn start_probe(&mut self, name: &str, started_at: Instant) {
        if let Some(old) = self.probes.remove(name) {
            old.cancel.cancel();
        }
        let Some(probes) = self.current_probes(name) else {
            return;
        };
        let (tx, rx) = watch::channel(Health::default());
        let cancel = CancellationToken::new();
        let prober = self.prober.clone();
        let wake = self.wake_tx.clone();
        let mut rx_wake = rx.clone();
        let c = cancel.clone();
        tokio::spawn(async move {
            // Every verdict change wakes a pass: readiness reaches the proxy within a probe.
            while rx_wake.changed().await.is_ok() {
                if wake.send(()).is_err() || c.is_cancelled() {
                    break;
                }
            }
        });
        tokio::spawn(health::run(
            probes,
            started_at,
            move |p| {
                let prober = prober.clone();
                async move { prober.check(&p).await }
            },
            tx,
            cancel.clone(),
        ));
        self.probes
            .insert(name.to_string(), Probe { cancel, health: rx });
    }

    fn current_probes(&self, name: &str) -> Option<crate::plan::Probes> {
        self.desired
            .iter()
            .find(|i| i.name == name)
            .map(|i| i.probes.clone())
    }

    async fn pass(
        &mut self,
        plan: &Plan,
        endpoints: &watch::Sender<EndpointSet>,
        status: &watch::Sender<Vec<InstanceStatus>>,
    ) {
        self.desired = plan.instances.clone();
        let observed = match self.runtime.list(&plan.project).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list instances; retrying");
                return;
            }
        };
        let now = Instant::now();
        // Probe verdicts first, so that `decide` sees liveness failures of this pass.
        for o in &observed {
            let running = o.state == RunState::Running;
            let t = self.trackers.entry(o.name.clone()).or_default();
            match self.probes.get(&o.name) {
                Some(p) if running => t.health = *p.health.borrow(),
                Some(_) if t.busy.is_none() => {
                    if let Some(p) = self.probes.remove(&o.name) {
                        p.cancel.cancel();
                    }
                }
                _ => {}
            }
        }
        observe(&mut self.trackers, &observed, now, &self.cfg.backoff);
        // Adopted instances (found running, no prober yet) get probed from now on.
        let adopt: Vec<String> = observed
            .iter()
            .filter(|o| o.state == RunState::Running && !self.probes.contains_key(&o.name))
            .filter(|o| self.trackers.get(&o.name).is_some_and(|t| t.busy.is_none()))
            .map(|o| o.name.clone())
            .collect();
        for name in adopt {
            tracing::info!(instance = %name, "adopting running instance");
            self.start_probe(&name, now);
        }
        let actions = decide(&plan.instances, &observed, &self.trackers, now, &self.cfg);
        for a in actions {
            self.execute(a, now);
        }
        self.publish(plan, &observed, endpoints, status);
    }

    fn execute(&mut self, action: Action, now: Instant) {
        let rt = self.runtime.clone();
        let done = self.done_tx.clone();
        let report = move |name: String, op: Op, result: Result<(), RuntimeError>| {
            let _ = done.send(Done { name, op, result });
        };
        let grace = |i: &Instance| Duration::from_secs(u64::from(i.stop_grace_seconds));
        match action {
            Action::Drain { name, replace } => {
                tracing::info!(instance = %name, replace, "draining");
                let t = self.trackers.entry(name).or_default();
                t.draining_since = Some(now);
                t.replacing |= replace;
            }
            Action::Create(inst) => {
                self.mark(&inst.name, "creating");
                self.ops.spawn(async move {
                    tracing::info!(instance = %inst.name, "creating");
                    let r = async {
                        rt.ensure_image(&inst, &|_| {}).await?;
                        rt.create(&inst).await?;
                        rt.start(&inst).await
                    }
                    .await;
                    report(inst.name.clone(), Op::Create, r);
                });
            }
            Action::Start { inst, restart } => {
                if restart {
                    let t = self.trackers.entry(inst.name.clone()).or_default();
                    t.restarts += 1;
                }
                self.mark(&inst.name, if restart { "restarting" } else { "starting" });
                self.ops.spawn(async move {
                    tracing::info!(instance = %inst.name, restart, "starting");
                    let r = rt.start(&inst).await;
                    report(inst.name.clone(), Op::Start, r);
                });
            }
            Action::Restart { inst, reason } => {
                let t = self.trackers.entry(inst.name.clone()).or_default();
                t.restarts += 1;
                t.crashes += 1;
                t.last_exit = Some(reason.to_string());
                self.mark(&inst.name, "restarting");
                self.ops.spawn(async move {
                    tracing::warn!(instance = %inst.name, reason, "restarting");
                    let r = async {
                        rt.stop(&inst.name, grace(&inst)).await?;
                        rt.start(&inst).await
                    }
                    .await;
                    report(inst.name.clone(), Op::Restart, r);
                });
            }
            Action::Recreate(inst) => {
                self.mark(&inst.name, "replacing");
                self.ops.spawn(async move {
                    tracing::info!(instance = %inst.name, hash = %inst.spec_hash, "replacing");
                    let r = async {
                        rt.stop(&inst.name, grace(&inst)).await?;
                        rt.remove(&inst.name).await?;
                        rt.ensure_image(&inst, &|_| {}).await?;
                        rt.create(&inst).await?;
                        rt.start(&inst).await
                    }
                    .await;
                    report(inst.name.clone(), Op::Recreate, r);
                });
            }
            Action::Remove(name) => {
                self.mark(&name, "stopping");
                if let Some(p) = self.probes.remove(&name) {
                    p.cancel.cancel();
                }
                // A leftover's grace is not in the plan any more: use the pool default.
                let grace = Duration::from_secs(30);
                self.ops.spawn(async move {
                    tracing::info!(instance = %name, "stopping and removing");
                    let r = async {
                        rt.stop(&name, grace).await?;
                        rt.remove(&name).await
                    }
                    .await;
                    report(name, Op::Remove, r);
                });
            }
        }
    }

    fn mark(&mut self, name: &str, op: &'static str) {
        if let Some(p) = self.probes.remove(name) {
            p.cancel.cancel();
        }
        let t = self.trackers.entry(name.to_string()).or_default();
        t.busy = Some(op);
        t.health = Health::default();
    }

    fn publish(
        &self,
        plan: &Plan,
        observed: &[Observed],
        endpoints: &watch::Sender<EndpointSet>,
        status: &watch::Sender<Vec<InstanceStatus>>,
    ) {
        let seen: BTreeMap<&str, &Observed> =
            observed.iter().map(|o| (o.name.as_str(), o)).collect();
        let mut set = EndpointSet::default();
        for inst in &plan.instances {
            let o = seen.get(inst.name.as_str()).copied();
            if routable(inst, o, self.trackers.get(&inst.name)) {
                let e = Endpoint {
                    id: inst.name.clone(),
                    url: inst.base_url(),
                };
                match inst.role {
                    Role::Prefill => set.prefill.push(e),
                    Role::Decode => set.decode.push(e),
                }
            }
        }
        endpoints.send_if_modified(|cur| {
            let changed = *cur != set;
            if changed {
                tracing::info!(
                    prefill = set.prefill.len(),
                    decode = set.decode.len(),
                    "ready endpoints changed"
                );
                *cur = set;
            }
            changed
        });
        let rows = status_rows(plan, observed, &self.trackers, Instant::now());
        status.send_if_modified(|cur| {
            let changed = *cur != rows;
            *cur = rows;
            changed
        });
    }
}

/// The status table: desired instances in plan order, then leftovers.
pub fn status_rows(
    plan: &Plan,
    observed: &[Observed],
    trackers: &BTreeMap<String, Tracker>,
    now: Instant,
) -> Vec<InstanceStatus> {
    let seen: BTreeMap<&str, &Observed> = observed.iter().map(|o| (o.name.as_str(), o)).collect();
    let idle = Tracker::default();
    let row = |name: &str, inst: Option<&Instance>| {
        let o = seen.get(name).copied();
        let t = trackers.get(name).unwrap_or(&idle);
        let ready = inst.is_some_and(|i| routable(i, o, Some(t)));
        let state = if let Some(op) = t.busy {
            op.to_string()
        } else if t.draining_since.is_some() {
            "draining".into()
        } else {
            match o.map(|o| o.state) {
                None => "pending".into(),
                Some(RunState::Running) if ready => "ready".into(),
                Some(RunState::Running) if !t.health.started => "starting".into(),
                Some(RunState::Running) => "running".into(),
                Some(RunState::Exited) if t.backoff_until.is_some_and(|u| u > now) => {
                    "backoff".into()
                }
                Some(RunState::Exited) => "exited".into(),
                Some(RunState::Created) => "created".into(),
                Some(RunState::Other) => "unknown".into(),
            }
        };
        InstanceStatus {
            instance: name.to_string(),
            role: inst.map(|i| i.role).or_else(|| o.and_then(|o| o.role)),
            state,
            ready,
            restarts: t.restarts,
            last_exit: t.last_exit.clone(),
            id: o.map(|o| o.id.clone()).filter(|i| !i.is_empty()),
            http_port: inst.map(|i| i.http_port),
            desired: inst.is_some(),
        }
    };
    let mut rows: Vec<InstanceStatus> = plan
        .instances
        .iter()
        .map(|i| row(&i.name, Some(i)))
        .collect();
    for o in observed {
        if plan.instance(&o.name).is_none() {
            rows.push(row(&o.name, None));
        }
    }
    rows
}

/// What a runtime would report about a planned instance, for unit tests of the loop.
#[cfg(test)]
pub mod testing {
    use crate::plan::Instance;
    use crate::runtime::{ExitInfo, Observed, RunState};

    pub fn observed(inst: &Instance, state: RunState, exit: Option<ExitInfo>) -> Observed {
        Observed {
            name: inst.name.clone(),
            id: "c0ffee".into(),
            role: Some(inst.role),
            spec_hash: inst.spec_hash.clone(),
            labels: inst.labels.clone(),
            state,
            exit,
        }
    }
}
