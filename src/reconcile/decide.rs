//! The pure half of the reconciler: what pdctl remembers per instance ([`Tracker`]), how it
//! learns from what the runtime reports ([`observe`]), and what to do next ([`decide`]).
//! No I/O, no clock: `now` is a parameter, so every rule is unit-tested below.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::health::Health;
use crate::plan::{Instance, RestartPolicy};
use crate::runtime::{Observed, RunState};

/// CrashLoopBackOff, faster than Kubernetes' 10 s start so a crashed engine comes back soon.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// A run at least this long forgets earlier crashes.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(120),
        }
    }
}

impl Backoff {
    /// Delay before the restart that follows crash number `crashes` (0-based).
    pub fn delay(&self, crashes: u32) -> Duration {
        let factor = 1u32.checked_shl(crashes.min(20)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub backoff: Backoff,
    /// How long a draining instance stays out of routing before it is stopped, so requests
    /// already routed to it can finish.
    pub drain: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backoff: Backoff::default(),
            drain: Duration::from_secs(5),
        }
    }
}

/// What pdctl remembers about one instance between passes.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    pub restarts: u32,
    /// Crashes since the last stable run: the backoff exponent.
    pub crashes: u32,
    pub last_exit: Option<String>,
    pub backoff_until: Option<Instant>,
    pub running_since: Option<Instant>,
    pub health: Health,
    pub draining_since: Option<Instant>,
    /// Drained to be replaced by a new spec (gates "one replacement at a time").
    pub replacing: bool,
    /// An operation on it is in flight; `decide` leaves it alone meanwhile.
    pub busy: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create and start a missing instance.
    Create(Instance),
    /// Start an existing stopped instance (`restart`: it had run and exited).
    Start { inst: Instance, restart: bool },
    /// Stop and start again a running instance that failed its probes.
    Restart {
        inst: Instance,
        reason: &'static str,
    },
    /// Stop, remove and create anew (changed spec, or a state we do not restart from).
    Recreate(Instance),
    /// Take out of routing now; stop after the drain period.
    Drain { name: String, replace: bool },
    /// Stop and remove an instance that is no longer wanted.
    Remove(String),
}

/// Updates trackers from a fresh observation: notices deaths and schedules their backoff.
pub fn observe(
    trackers: &mut BTreeMap<String, Tracker>,
    observed: &[Observed],
    now: Instant,
    backoff: &Backoff,
) {
    for o in observed {
        let t = trackers.entry(o.name.clone()).or_default();
        if t.busy.is_some() {
            continue;
        }
        match o.state {
            RunState::Running if t.running_since.is_none() => t.running_since = Some(now),
            RunState::Exited | RunState::Other if t.running_since.is_some() => {
                let ran = now - t.running_since.take().unwrap_or(now);
                if ran >= backoff.reset_after {
                    t.crashes = 0;
                }
                t.backoff_until = Some(now + backoff.delay(t.crashes));
                t.crashes += 1;
                if let Some(exit) = &o.exit {
                    t.last_exit = Some(exit.to_string());
                }
                t.health = Health::default();
            }
            _ => {}
        }
        // The replacement is done once the *new* instance is ready: while the old one drains
        // it may well still pass its probes.
        if t.health.ready && t.draining_since.is_none() && t.busy.is_none() {
            t.replacing = false;
        }
    }
}

/// An engine is a server: it never finishes its work, so an exit the daemon did not ask for is
/// a failure whatever its status (vLLM exits 0 when its engine core or a worker dies). So
/// `on-failure` restarts after status 0 too, like `always`; only `never` leaves it down.
fn restartable(inst: &Instance, _o: &Observed) -> bool {
    match inst.restart_policy {
        RestartPolicy::Always | RestartPolicy::OnFailure => true,
        RestartPolicy::Never => false,
    }
}

/// Desired vs observed → actions. Level-triggered: the same inputs give the same answer.
pub fn decide(
    desired: &[Instance],
    observed: &[Observed],
    trackers: &BTreeMap<String, Tracker>,
    now: Instant,
    cfg: &Config,
) -> Vec<Action> {
    let seen: BTreeMap<&str, &Observed> = observed.iter().map(|o| (o.name.as_str(), o)).collect();
    let idle = Tracker::default();
    let tracker = |name: &str| trackers.get(name).unwrap_or(&idle);
    let mut replacing = trackers.values().any(|t| t.replacing);
    let mut actions = Vec::new();
    for inst in desired {
        let t = tracker(&inst.name);
        if t.busy.is_some() {
            continue;
        }
        let Some(o) = seen.get(inst.name.as_str()) else {
            actions.push(Action::Create(inst.clone()));
            continue;
        };
        if o.spec_hash != inst.spec_hash {
            match (o.state, t.draining_since) {
                (RunState::Running, Some(since)) if now - since >= cfg.drain => {
                    actions.push(Action::Recreate(inst.clone()))
                }
                (RunState::Running, Some(_)) => {}
                // One replacement at a time, so capacity never drops by more than one.
                (RunState::Running, None) if !replacing => {
                    replacing = true;
                    actions.push(Action::Drain {
                        name: inst.name.clone(),
                        replace: true,
                    });
                }
                (RunState::Running, None) => {}
                _ => actions.push(Action::Recreate(inst.clone())),
            }
            continue;
        }
        match o.state {
            RunState::Running => {
                if let Some(reason) = t.health.failed {
                    actions.push(Action::Restart {
                        inst: inst.clone(),
                        reason,
                    });
                }
            }
            RunState::Created => actions.push(Action::Start {
                inst: inst.clone(),
                restart: false,
            }),
            RunState::Exited => {
                let waited = t.backoff_until.is_none_or(|until| now >= until);
                if restartable(inst, o) && waited {
                    actions.push(Action::Start {
                        inst: inst.clone(),
                        restart: true,
                    });
                }
            }
            RunState::Other => actions.push(Action::Recreate(inst.clone())),
        }
    }
    for o in observed {
        if desired.iter().any(|i| i.name == o.name) {
            continue;
        }
        let t = tracker(&o.name);
        if t.busy.is_some() {
            continue;
        }
        match (o.state, t.draining_since) {
            (RunState::Running, None) => actions.push(Action::Drain {
                name: o.name.clone(),
                replace: false,
            }),
            (RunState::Running, Some(since)) if now - since < cfg.drain => {}
            _ => actions.push(Action::Remove(o.name.clone())),
        }
    }
    actions
}

/// Whether `inst` may receive traffic: running the desired spec, ready, not draining.
pub fn routable(inst: &Instance, o: Option<&Observed>, t: Option<&Tracker>) -> bool {
    let (Some(o), Some(t)) = (o, t) else {
        return false;
    };
    o.state == RunState::Running
        && o.spec_hash == inst.spec_hash
        && t.health.ready
        && t.health.failed.is_none()
        && t.draining_since.is_none()
        && t.busy.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::instance;
    use crate::plan::Role;
    use crate::reconcile::testing::observed;
    use crate::runtime::ExitInfo;

    fn cfg() -> Config {
        Config::default()
    }

    #[test]
    fn backoff_doubles_and_caps_at_five_minutes() {
        let b = Backoff::default();
        let secs: Vec<u64> = (0..12).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(b.delay(1000), Duration::from_secs(300));
    }

    #[test]
    fn missing_instances_are_created_and_matching_ones_adopted() {
        let now = Instant::now();
        let p0 = instance("d", Role::Prefill, 0, "h");
        let d0 = instance("d", Role::Decode, 0, "h");
        let seen = [observed(&d0, RunState::Running, None)];
        let mut trackers = BTreeMap::new();
        observe(&mut trackers, &seen, now, &Backoff::default());
        let actions = decide(&[p0.clone(), d0.clone()], &seen, &trackers, now, &cfg());
        // The running decode with the same spec hash is adopted: nothing to do for it.
        assert_eq!(actions, vec![Action::Create(p0)]);
        assert_eq!(trackers["pdctl-d-decode-0"].running_since, Some(now));
    }

    #[test]
    fn an_exit_waits_for_its_backoff_which_grows_and_resets_after_a_stable_run() {
        let b = Backoff::default();
        let t0 = Instant::now();
        let d0 = instance("d", Role::Decode, 0, "h");
        let running = [observed(&d0, RunState::Running, None)];
        let exit = Some(ExitInfo {
            code: Some(137),
            oom_killed: false,
        });
        let dead = [observed(&d0, RunState::Exited, exit)];
        let mut tr = BTreeMap::new();
        observe(&mut tr, &running, t0, &b);
        observe(&mut tr, &dead, t0 + Duration::from_secs(5), &b);
        let t = &tr[&d0.name];
        assert_eq!(t.last_exit.as_deref(), Some("exit code 137 (SIGKILL)"));
        assert_eq!(t.backoff_until, Some(t0 + Duration::from_secs(6)));
        let early = decide(
            std::slice::from_ref(&d0),
            &dead,
            &tr,
            t0 + Duration::from_secs(5),
            &cfg(),
        );
        assert!(early.is_empty(), "still backing off: {early:?}");
        let later = decide(
            std::slice::from_ref(&d0),
            &dead,
            &tr,
            t0 + Duration::from_secs(6),
            &cfg(),
        );
        assert_eq!(
            later,
            vec![Action::Start {
                inst: d0.clone(),
                restart: true
            }]
        );
        // A second quick crash doubles the delay.
        observe(&mut tr, &running, t0 + Duration::from_secs(6), &b);
        observe(&mut tr, &dead, t0 + Duration::from_secs(7), &b);
        assert_eq!(
            tr[&d0.name].backoff_until,
            Some(t0 + Duration::from_secs(9))
        );
        // A stable run forgets them.
        observe(&mut tr, &running, t0 + Duration::from_secs(10), &b);
        observe(&mut tr, &dead, t0 + Duration::from_secs(200), &b);
        assert_eq!(
            tr[&d0.name].backoff_until,
            Some(t0 + Duration::from_secs(201))
        );
    }

    #[test]
    fn restart_policy_is_honoured() {
        let now = Instant::now();
        let mut d0 = instance("d", Role::Decode, 0, "h");
        let clean = [observed(
            &d0,
            RunState::Exited,
            Some(ExitInfo {
                code: Some(0),
                oom_killed: false,
            }),
        )];
        // A server that exits 0 on its own has failed too.
        let mut actions = |policy| {
            d0.restart_policy = policy;
            decide(
                std::slice::from_ref(&d0),
                &clean,
                &BTreeMap::new(),
                now,
                &cfg(),
            )
            .len()
        };
        assert_eq!(actions(RestartPolicy::OnFailure), 1);
        assert_eq!(actions(RestartPolicy::Never), 0);
        assert_eq!(actions(RestartPolicy::Always), 1);
    }

    #[test]
    fn liveness_failure_restarts_a_running_instance() {
        let now = Instant::now();
        let d0 = instance("d", Role::Decode, 0, "h");
        let seen = [observed(&d0, RunState::Running, None)];
        let mut tr = BTreeMap::new();
        observe(&mut tr, &seen, now, &Backoff::default());
        tr.get_mut(&d0.name).unwrap().health.failed = Some("liveness probe failed");
        assert_eq!(
            decide(std::slice::from_ref(&d0), &seen, &tr, now, &cfg()),
            vec![Action::Restart {
                inst: d0,
                reason: "liveness probe failed"
            }]
        );
    }

    #[test]
    fn changed_specs_are_replaced_one_at_a_time_after_draining() {
        let now = Instant::now();
        let old: Vec<Instance> = (0..2)
            .map(|i| instance("d", Role::Decode, i, "old"))
            .collect();
        let new: Vec<Instance> = (0..2)
            .map(|i| instance("d", Role::Decode, i, "new"))
            .collect();
        let seen: Vec<Observed> = old
            .iter()
            .map(|i| observed(i, RunState::Running, None))
            .collect();
        let mut tr = BTreeMap::new();
        observe(&mut tr, &seen, now, &Backoff::default());
        let a = decide(&new, &seen, &tr, now, &cfg());
        assert_eq!(
            a,
            vec![Action::Drain {
                name: new[0].name.clone(),
                replace: true
            }]
        );
        let t = tr.get_mut(&new[0].name).unwrap();
        t.draining_since = Some(now);
        t.replacing = true;
        // The old engine still passes its probes while draining: that must not end the
        // replacement and let the second one start.
        tr.get_mut(&new[0].name).unwrap().health.ready = true;
        observe(&mut tr, &seen, now, &Backoff::default());
        assert!(decide(&new, &seen, &tr, now + Duration::from_secs(1), &cfg()).is_empty());
        assert_eq!(
            decide(&new, &seen, &tr, now + cfg().drain, &cfg()),
            vec![Action::Recreate(new[0].clone())]
        );
    }

    #[test]
    fn scale_down_drains_then_removes() {
        let now = Instant::now();
        let d0 = instance("d", Role::Decode, 0, "h");
        let d1 = instance("d", Role::Decode, 1, "h");
        let seen = [
            observed(&d0, RunState::Running, None),
            observed(&d1, RunState::Running, None),
        ];
        let mut tr = BTreeMap::new();
        observe(&mut tr, &seen, now, &Backoff::default());
        let a = decide(std::slice::from_ref(&d0), &seen, &tr, now, &cfg());
        assert_eq!(
            a,
            vec![Action::Drain {
                name: d1.name.clone(),
                replace: false
            }]
        );
        tr.get_mut(&d1.name).unwrap().draining_since = Some(now);
        assert!(!routable(&d1, Some(&seen[1]), tr.get(&d1.name)));
        assert!(decide(
            std::slice::from_ref(&d0),
            &seen,
            &tr,
            now + Duration::from_secs(1),
            &cfg()
        )
        .is_empty());
        assert_eq!(
            decide(&[d0], &seen, &tr, now + cfg().drain, &cfg()),
            vec![Action::Remove(d1.name.clone())]
        );
    }

    #[test]
    fn busy_instances_are_left_alone() {
        let now = Instant::now();
        let d0 = instance("d", Role::Decode, 0, "h");
        let mut tr = BTreeMap::new();
        tr.insert(
            d0.name.clone(),
            Tracker {
                busy: Some("creating"),
                ..Tracker::default()
            },
        );
        assert!(decide(&[d0], &[], &tr, now, &cfg()).is_empty());
    }
}
