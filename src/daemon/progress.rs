//! What a running daemon reports while it works, for whoever shows it (the CLI draws bars and
//! lines; a detached daemon writes lines to its log).

use std::collections::BTreeMap;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::api::{Control, StatusReport};
use crate::reconcile::InstanceStatus;
use crate::runtime::PullProgress;

/// Receives the daemon's progress. Calls come from the daemon's tasks, so they must not block.
pub trait Observer: Send + Sync {
    /// An image is being made present; the returned watcher sees its pull progress.
    fn pulling(&self, image: &str) -> Box<dyn PullWatcher>;
    /// An instance changed state or restarted.
    fn instance_changed(&self, row: &InstanceStatus);
    /// Every desired instance is ready (once per run).
    fn ready(&self, report: &StatusReport);
    /// The daemon stopped and removed `stopped` engines and is about to exit.
    fn down(&self, project: &str, stopped: usize);
}

/// Progress of one image pull.
pub trait PullWatcher: Send + Sync {
    fn update(&self, progress: &PullProgress);
    fn finish(&self);
}

/// Reports state changes until `stop`, and readiness the first time everything is ready.
pub async fn follow(
    observer: &dyn Observer,
    ctl: &dyn Control,
    mut status: watch::Receiver<Vec<InstanceStatus>>,
    stop: &CancellationToken,
) {
    let mut last: BTreeMap<String, (String, u32)> = BTreeMap::new();
    let mut announced = false;
    loop {
        for row in status.borrow_and_update().iter() {
            let now = (row.state.clone(), row.restarts);
            if last.get(&row.instance) != Some(&now) {
                observer.instance_changed(row);
                last.insert(row.instance.clone(), now);
            }
        }
        let report = ctl.status();
        if report.all_ready() && !announced {
            announced = true;
            observer.ready(&report);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = status.changed() => if changed.is_err() { return },
        }
    }
}
