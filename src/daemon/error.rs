//! What can go wrong in the daemon and in the commands that drive it.

use std::path::{Path, PathBuf};

use crate::plan::PlanError;
use crate::runtime::RuntimeError;

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

/// Why a request to a project's daemon (over its control socket) failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens: the daemon is not running.
    #[error("cannot connect to {path}: {source}")]
    NotRunning {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control API request failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Refused(String),
    #[error("unexpected answer from the daemon: {0}")]
    Decode(#[from] serde_json::Error),
}
