//! `down` from outside the daemon: ask a running daemon to go down, or, when none runs, clean
//! up what a dead one left behind.

use std::time::Duration;

use super::api;
use super::{connect_runtime, stop_all, ClientError, DaemonError, StateDir};
use crate::plan;
use crate::spec::LoadedSpec;

/// How long engines left behind by a dead daemon get to stop before they are killed.
const LEFTOVER_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    /// The daemon drained the proxy, stopped its engines and exited.
    Stopped,
    /// No daemon was running; this many engines it left behind were stopped and removed.
    CleanedUp { leftovers: usize },
}

/// Takes the project down. `stopping` is called once the daemon has accepted the request,
/// before the wait for it to finish.
pub async fn down(
    loaded: &LoadedSpec,
    state: &StateDir,
    stopping: impl FnOnce(),
) -> Result<Down, DaemonError> {
    match api::down(&state.socket()).await {
        Ok(_) => {
            stopping();
            // The daemon releases the lock as its very last step.
            while state.try_lock()?.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Down::Stopped)
        }
        Err(ClientError::NotRunning { .. }) => clean_up(loaded, state).await,
        Err(e) => Err(e.into()),
    }
}

/// Stops and removes the engines of a daemon that is gone (never started, or killed).
async fn clean_up(loaded: &LoadedSpec, state: &StateDir) -> Result<Down, DaemonError> {
    let Some(_lock) = state.try_lock()? else {
        return Err(DaemonError::Unresponsive {
            project: loaded.project.clone(),
            pid: state.holder_pid(),
            socket: state.socket(),
        });
    };
    let stopped = async {
        let runtime = connect_runtime(&plan::runtime_plan(&loaded.spec), state, &[]).await?;
        stop_all(runtime.as_ref(), &loaded.project, LEFTOVER_GRACE).await
    }
    .await;
    let _ = std::fs::remove_file(state.socket());
    state.clear_scale();
    Ok(Down::CleanedUp {
        leftovers: stopped?,
    })
}
