//! Startup, readiness and liveness probes with Kubernetes semantics: the startup probe gates
//! the other two; each probe turns a run of `success_threshold` successes or
//! `failure_threshold` failures into a verdict; liveness or startup failure asks for a
//! restart (the reconciler decides; health never restarts anything itself).

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::plan::{Probe, Probes};
use crate::spec::ProbeKind;

pub mod http;

/// What the prober has concluded so far about one running instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    pub started: bool,
    pub ready: bool,
    /// Set once the startup or liveness probe has failed `failure_threshold` times in a row.
    pub failed: Option<&'static str>,
}

/// Consecutive-result counting for one probe.
#[derive(Debug, Clone)]
struct Counter {
    probe: Probe,
    successes: u32,
    failures: u32,
}

impl Counter {
    fn new(probe: &Probe) -> Self {
        Counter {
            probe: probe.clone(),
            successes: 0,
            failures: 0,
        }
    }

    /// `Some(true)` when the success threshold is reached, `Some(false)` for the failure one.
    fn record(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes += 1;
            (self.successes >= self.probe.success_threshold.max(1)).then_some(true)
        } else {
            self.successes = 0;
            self.failures += 1;
            (self.failures >= self.probe.failure_threshold.max(1)).then_some(false)
        }
    }
}

/// The pure state machine: feed it probe results, read [`Health`].
#[derive(Debug, Clone)]
pub struct Machine {
    startup: Counter,
    readiness: Counter,
    liveness: Counter,
    health: Health,
}

impl Machine {
    pub fn new(probes: &Probes) -> Self {
        Machine {
            startup: Counter::new(&probes.startup),
            readiness: Counter::new(&probes.readiness),
            liveness: Counter::new(&probes.liveness),
            health: Health::default(),
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    pub fn probe(&self, kind: ProbeKind) -> &Probe {
        match kind {
            ProbeKind::Startup => &self.startup.probe,
            ProbeKind::Readiness => &self.readiness.probe,
            ProbeKind::Liveness => &self.liveness.probe,
        }
    }

    /// The probes that run in the current phase.
    pub fn active(&self) -> &'static [ProbeKind] {
        if self.health.failed.is_some() {
            &[]
        } else if self.health.started {
            &[ProbeKind::Readiness, ProbeKind::Liveness]
        } else {
            &[ProbeKind::Startup]
        }
    }

    pub fn record(&mut self, kind: ProbeKind, ok: bool) -> Health {
        if !self.active().contains(&kind) {
            return self.health;
        }
        match (kind, self.counter(kind).record(ok)) {
            (ProbeKind::Startup, Some(true)) => self.health.started = true,
            (ProbeKind::Startup, Some(false)) => self.health.failed = Some("startup probe failed"),
            (ProbeKind::Readiness, Some(r)) => self.health.ready = r,
            (ProbeKind::Liveness, Some(false)) => {
                self.health.ready = false;
                self.health.failed = Some("liveness probe failed");
            }
            _ => {}
        }
        self.health
    }

    fn counter(&mut self, kind: ProbeKind) -> &mut Counter {
        match kind {
            ProbeKind::Startup => &mut self.startup,
            ProbeKind::Readiness => &mut self.readiness,
            ProbeKind::Liveness => &mut self.liveness,
        }
    }
}

fn secs(s: u32) -> Duration {
    Duration::from_secs(u64::from(s))
}

/// Runs the probes of one instance from `started_at` until `cancel`, publishing every change.
/// `check` performs one probe (HTTP in production, a script in tests) within its timeout.
pub async fn run<F, Fut>(
    probes: Probes,
    started_at: Instant,
    mut check: F,
    out: watch::Sender<Health>,
    cancel: CancellationToken,
) where
    F: FnMut(Probe) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut m = Machine::new(&probes);
    // Next due time per kind; each probe starts after its initial delay, as in Kubernetes.
    let mut due = ProbeKind::ALL.map(|k| started_at + secs(m.probe(k).initial_delay_seconds));
    let idx = |k: ProbeKind| k as usize;
    loop {
        let active = m.active();
        let Some(&kind) = active.iter().min_by_key(|k| due[idx(**k)]) else {
            return;
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(due[idx(kind)]) => {}
        }
        let probe = m.probe(kind).clone();
        let ok = tokio::select! {
            _ = cancel.cancelled() => return,
            ok = tokio::time::timeout(secs(probe.timeout_seconds.max(1)), check(probe.clone())) => ok.unwrap_or(false),
        };
        let before = m.health();
        let after = m.record(kind, ok);
        due[idx(kind)] = Instant::now() + secs(probe.period_seconds.max(1));
        if after.started && !before.started {
            // Readiness and liveness start right after startup succeeds.
            let now = Instant::now();
            due[idx(ProbeKind::Readiness)] = due[idx(ProbeKind::Readiness)].max(now);
            due[idx(ProbeKind::Liveness)] = due[idx(ProbeKind::Liveness)].max(now);
        }
        if after != before {
            out.send_replace(after);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    pub fn probes(period: u32, failure: u32) -> Probes {
        let p = Probe {
            path: "/health".into(),
            port: 1,
            initial_delay_seconds: 0,
            period_seconds: period,
            timeout_seconds: 1,
            failure_threshold: failure,
            success_threshold: 1,
        };
        Probes {
            startup: p.clone(),
            readiness: p.clone(),
            liveness: p,
        }
    }

    #[test]
    fn startup_gates_readiness_and_liveness() {
        let mut m = Machine::new(&probes(1, 3));
        assert_eq!(m.active(), &[ProbeKind::Startup]);
        // Readiness results before startup succeeded are ignored.
        assert!(!m.record(ProbeKind::Readiness, true).ready);
        assert!(!m.record(ProbeKind::Startup, false).started);
        assert!(m.record(ProbeKind::Startup, true).started);
        assert_eq!(m.active(), &[ProbeKind::Readiness, ProbeKind::Liveness]);
        assert!(m.record(ProbeKind::Readiness, true).ready);
    }

    #[test]
    fn thresholds_count_consecutive_results() {
        let mut m = Machine::new(&probes(1, 2));
        m.record(ProbeKind::Startup, true);
        m.record(ProbeKind::Readiness, true);
        // One failure is below the threshold of 2; a success in between resets the count.
        assert!(m.record(ProbeKind::Readiness, false).ready);
        assert!(m.record(ProbeKind::Readiness, true).ready);
        assert!(m.record(ProbeKind::Readiness, false).ready);
        assert!(!m.record(ProbeKind::Readiness, false).ready);
        assert!(
            m.record(ProbeKind::Readiness, true).ready,
            "readiness comes back"
        );
        assert_eq!(m.record(ProbeKind::Liveness, false).failed, None);
        let h = m.record(ProbeKind::Liveness, false);
        assert_eq!(h.failed, Some("liveness probe failed"));
        assert!(!h.ready);
        assert!(m.active().is_empty());
    }

    #[test]
    fn startup_failure_threshold_fails_the_instance() {
        let mut m = Machine::new(&probes(1, 2));
        m.record(ProbeKind::Startup, false);
        assert_eq!(
            m.record(ProbeKind::Startup, false).failed,
            Some("startup probe failed")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_follows_periods_in_virtual_time() {
        // The engine answers from t=3s on and stops answering at t=10s.
        let t0 = Instant::now();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c = calls.clone();
        let check = move |_p: Probe| {
            let c = c.clone();
            async move {
                let t = (Instant::now() - t0).as_secs();
                c.lock().unwrap().push(t);
                (3..10).contains(&t)
            }
        };
        let (tx, mut rx) = watch::channel(Health::default());
        let cancel = CancellationToken::new();
        let mut p = probes(1, 3);
        p.startup.failure_threshold = 10;
        let task = tokio::spawn(run(p, t0, check, tx, cancel.clone()));
        rx.wait_for(|h| h.ready).await.unwrap();
        assert_eq!((Instant::now() - t0).as_secs(), 3);
        let h = *rx.wait_for(|h| h.failed.is_some()).await.unwrap();
        assert_eq!(h.failed, Some("liveness probe failed"));
        // Failures at t=10, 11, 12 (both probes run each second) trip the threshold of 3.
        assert_eq!((Instant::now() - t0).as_secs(), 12);
        task.await.unwrap();
        assert!(calls.lock().unwrap().starts_with(&[0, 1, 2, 3]));
    }
}
