//! `up -d`: the daemon re-run in the background (own process group, output to the state
//! directory's daemon.log), and the wait until it reports every engine ready, or dies.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::api::{self, StatusReport};
use super::{DaemonError, StateDir};

/// A daemon started in the background, not yet known to be ready.
pub struct Detached {
    child: Child,
    log: PathBuf,
}

/// Starts `exe args` as the project's daemon, detached from this terminal: its own process
/// group (Ctrl-C here does not reach it), no stdin, stdout and stderr into `daemon.log`.
pub fn spawn(exe: &Path, args: &[OsString], state: &StateDir) -> Result<Detached, DaemonError> {
    let log_path = state.log();
    let log =
        std::fs::File::create(&log_path).map_err(|e| DaemonError::io("create", &log_path, e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| DaemonError::io("open", &log_path, e))?;
    use std::os::unix::process::CommandExt;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .spawn()
        .map_err(DaemonError::Spawn)?;
    Ok(Detached {
        child,
        log: log_path,
    })
}

impl Detached {
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Polls the daemon's status until every engine is ready; `progress` sees every report.
    /// A daemon that exits first is an error carrying its log.
    pub async fn wait_ready(
        &mut self,
        state: &StateDir,
        mut progress: impl FnMut(&StatusReport),
    ) -> Result<StatusReport, DaemonError> {
        let socket = state.socket();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(DaemonError::StartupExit { status, log });
            }
            if let Ok(r) = api::status(&socket).await {
                progress(&r);
                if r.all_ready() {
                    return Ok(r);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
