//! Where engines run: the [`Runtime`] trait and its two implementations, Docker (bollard) and
//! local processes. The reconciler only sees this trait, so bollard's API churn (0.22 changes
//! `start`/`stop` return types) touches `docker.rs` alone.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::plan::{Instance, Role};

pub mod container;
pub mod docker;
pub mod process;

pub use docker::DockerRuntime;
pub use process::ProcessRuntime;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot reach the Docker Engine: {0}")]
    Connect(#[source] bollard::errors::Error),
    #[error("image {image} is not present and pull policy `{policy}` forbids pulling it")]
    ImageMissing { image: String, policy: &'static str },
    #[error("pulling image {image} (pull policy `{policy}`) failed: {source}")]
    Pull {
        image: String,
        policy: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("failed to {op} container {name}: {source}")]
    Docker {
        op: &'static str,
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("failed to {op} process {name}: {source}")]
    Process {
        op: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("instance {0} is unknown to the runtime")]
    NotFound(String),
    #[error("instance {name} has an empty argv")]
    EmptyArgv { name: String },
}

/// Coarse lifecycle as the runtime reports it; health is the prober's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Created,
    Running,
    Exited,
    /// Restarting, paused, dead, removing: not ours to fix, the reconciler replaces it.
    Other,
}

/// One instance found by [`Runtime::list`]: a container or a process with pdctl's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub name: String,
    /// Container id or pid.
    pub id: String,
    pub role: Option<Role>,
    pub spec_hash: String,
    pub labels: BTreeMap<String, String>,
    pub state: RunState,
    pub exit: Option<ExitInfo>,
}

/// Why an instance stopped, as far as the runtime knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i64>,
    pub oom_killed: bool,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.oom_killed {
            return f.write_str("OOM killed");
        }
        match self.code {
            // Shells and Docker report death by signal N as 128 + N.
            Some(c) if c > 128 && c < 160 => write!(f, "exit code {c} ({})", signal_name(c - 128)),
            Some(c) => write!(f, "exit code {c}"),
            None => f.write_str("exited (status unknown: not a child of this daemon)"),
        }
    }
}

fn signal_name(n: i64) -> String {
    match n {
        1 => "SIGHUP".into(),
        2 => "SIGINT".into(),
        6 => "SIGABRT".into(),
        9 => "SIGKILL".into(),
        11 => "SIGSEGV".into(),
        15 => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

/// Something happened to an instance; the reconciler wakes up and looks (level-triggered:
/// the event only says "look now", the truth comes from [`Runtime::list`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeEvent {
    pub name: String,
    pub action: String,
}

/// Pull progress for the UI: `current`/`total` bytes when the engine reports them.
#[derive(Debug, Clone, Default)]
pub struct PullProgress {
    pub status: String,
    pub current: u64,
    pub total: u64,
}

pub type Progress<'a> = &'a (dyn Fn(PullProgress) + Send + Sync);

pub trait Runtime: Send + Sync {
    fn kind(&self) -> &'static str;
    /// Makes the instance's image available (Docker) or checks the program exists (process).
    fn ensure_image<'a>(
        &'a self,
        inst: &'a Instance,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;
    /// Creates (does not start) the instance; returns its id.
    fn create<'a>(&'a self, inst: &'a Instance) -> BoxFuture<'a, Result<String, RuntimeError>>;
    fn start<'a>(&'a self, inst: &'a Instance) -> BoxFuture<'a, Result<(), RuntimeError>>;
    /// The stop signal, then SIGKILL after `grace`. Stopping a stopped instance is fine.
    fn stop<'a>(
        &'a self,
        name: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;
    /// Removes a stopped instance; removing an absent one is fine.
    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>>;
    /// Everything labelled `pdctl.project=<project>`, running or not.
    fn list<'a>(&'a self, project: &'a str) -> BoxFuture<'a, Result<Vec<Observed>, RuntimeError>>;
    /// The last `tail` lines (all when `None`), then new output while `follow`.
    fn logs(
        &self,
        name: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> BoxStream<'static, Result<Bytes, RuntimeError>>;
    /// Deaths and OOM kills of the project's instances. Best effort: may end or miss events.
    fn events(&self, project: &str) -> BoxStream<'static, RuntimeEvent>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_read_like_kubectl() {
        let e = |code, oom| ExitInfo {
            code,
            oom_killed: oom,
        };
        assert_eq!(e(Some(137), false).to_string(), "exit code 137 (SIGKILL)");
        assert_eq!(e(Some(3), false).to_string(), "exit code 3");
        assert_eq!(e(Some(137), true).to_string(), "OOM killed");
        assert!(e(None, false).to_string().contains("unknown"));
    }
}
