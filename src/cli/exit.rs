//! The one map from a failed command to what the user reads on stderr and the exit status.
//! Library modules return their own typed errors; this is the only place that decides which
//! of them are the user's input and how each is shown.

use std::fmt::Display;
use std::process::ExitCode;

use anyhow::anyhow;

use crate::daemon::{ClientError, DaemonError};
use crate::export::ExportError;
use crate::gpu::GpuError;
use crate::plan::PlanError;
use crate::proxy::ProxyError;
use crate::runtime::RuntimeError;
use crate::spec::SpecError;

/// pdctl's exit statuses besides 0 (success). README's "Exit status" lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Anything that is not the input's fault: no GPU driver, Docker unreachable, an engine or
    /// port problem, a daemon that died or refused.
    Failure = 1,
    /// The input is wrong: the deployment file, a flag or an argument (clap's usage errors
    /// exit with 2 as well).
    Invalid = 2,
    /// `status` and `scale`: the project's daemon is not running.
    NotRunning = 3,
}

/// A failed command: its exit status and the message for stderr.
#[derive(Debug)]
pub struct CliError {
    exit: Exit,
    /// Located diagnostics and notices are complete as they are; other errors get `error: `.
    bare: bool,
    error: anyhow::Error,
}

pub type CliResult = Result<(), CliError>;

impl CliError {
    /// Bad input, shown as `error: …`.
    pub fn invalid(message: impl Display) -> Self {
        Self::new(Exit::Invalid, false, anyhow!("{message}"))
    }

    /// Any other failure, shown as `error: …`.
    pub fn failure(error: impl Into<anyhow::Error>) -> Self {
        Self::new(Exit::Failure, false, error.into())
    }

    /// The project's daemon is not running: a notice, not an error message.
    pub fn not_running(notice: impl Display) -> Self {
        Self::new(Exit::NotRunning, true, anyhow!("{notice}"))
    }

    fn new(exit: Exit, bare: bool, error: anyhow::Error) -> Self {
        CliError { exit, bare, error }
    }

    pub fn exit(&self) -> Exit {
        self.exit
    }

    /// What stderr gets.
    pub fn message(&self) -> String {
        if self.bare {
            self.error.to_string()
        } else {
            format!("error: {}", self.error)
        }
    }

    /// Prints the message and gives the process's exit status.
    pub fn report(&self) -> ExitCode {
        eprintln!("{}", self.message());
        ExitCode::from(self.exit as u8)
    }
}

impl From<SpecError> for CliError {
    /// A located diagnostic (or "cannot read FILE") that speaks for itself.
    fn from(e: SpecError) -> Self {
        Self::new(Exit::Invalid, true, e.into())
    }
}

impl From<PlanError> for CliError {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::Invalid(e) => e.into(),
            PlanError::Gpu(e) => e.into(),
        }
    }
}

impl From<DaemonError> for CliError {
    fn from(e: DaemonError) -> Self {
        match e {
            DaemonError::Plan(e) => e.into(),
            e => Self::failure(e),
        }
    }
}

/// Errors that are never the input's fault.
macro_rules! failures {
    ($($t:ty),*) => {$(
        impl From<$t> for CliError {
            fn from(e: $t) -> Self {
                Self::failure(e)
            }
        }
    )*};
}
failures!(
    GpuError,
    ClientError,
    RuntimeError,
    ExportError,
    ProxyError,
    std::io::Error
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Diagnostic;
    use std::path::Path;

    fn spec_error() -> SpecError {
        SpecError::Invalid(vec![Diagnostic::at(
            Path::new("p.toml"),
            "x = 1",
            0..1,
            "bad",
        )])
    }

    #[test]
    fn a_bad_file_is_invalid_input_shown_as_its_diagnostics() {
        for e in [
            CliError::from(spec_error()),
            CliError::from(PlanError::Invalid(spec_error())),
            CliError::from(DaemonError::Plan(PlanError::Invalid(spec_error()))),
        ] {
            assert_eq!(e.exit(), Exit::Invalid);
            assert!(
                e.message().starts_with("p.toml:1:1: bad"),
                "{}",
                e.message()
            );
        }
    }

    #[test]
    fn host_problems_are_failures_prefixed_with_error() {
        let gpu = || GpuError::BadFixed {
            spec: "x".into(),
            reason: "why".into(),
        };
        for e in [
            CliError::from(gpu()),
            CliError::from(PlanError::Gpu(gpu())),
            CliError::from(DaemonError::Plan(PlanError::Gpu(gpu()))),
        ] {
            assert_eq!(e.exit(), Exit::Failure);
            assert_eq!(e.message(), "error: invalid GPU inventory `x`: why");
        }
    }

    #[test]
    fn flags_are_invalid_and_a_stopped_daemon_is_a_notice() {
        let e = CliError::invalid("--port: not a number");
        assert_eq!(
            (e.exit(), e.message().as_str()),
            (Exit::Invalid, "error: --port: not a number")
        );
        let e = CliError::not_running("p is not running");
        assert_eq!(
            (e.exit(), e.message().as_str()),
            (Exit::NotRunning, "p is not running")
        );
        assert_eq!(e.exit() as u8, 3);
    }
}
