//! The daemon: one per project. It holds the project lock, runs the reconciler, the embedded
//! proxy and the control API, and on Ctrl-C / SIGTERM / `pdctl down` takes everything down:
//! proxy first (drains), then the engines (stop signal, grace, removal).
//!
//! Inside, each file uses only those listed before it: `error` → `state` → `api` →
//! `deployment`, `progress` → `run`, `detach`, `down`.

pub mod api;
mod deployment;
pub mod detach;
pub mod down;
mod error;
pub mod progress;
mod run;
pub mod state;

pub use api::StatusReport;
pub use deployment::{connect_runtime, endpoint_url, stop_all, Deployment};
pub use error::{ClientError, DaemonError};
pub use progress::Observer;
pub use run::{run, Up};
pub use state::{Scale, StateDir};
