//! `pdctl` as a child process: a guard that kills it when the test ends, pass or fail, and the
//! two long-running commands the tests start by hand (`sim serve`, `proxy`/`sidecar`).

use std::process::{Command, Stdio};
use std::time::Duration;

use super::{http, ports};

pub fn pdctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pdctl"))
}

/// A child process killed (and reaped) on drop.
pub struct Child(pub std::process::Child);

impl Child {
    /// Starts `cmd` with stdout discarded and stderr inherited, logging errors only: a failing
    /// test shows what went wrong in the child, while the warnings that tests provoke on
    /// purpose (a failing engine, a client hanging up) stay out of the output.
    pub fn spawn(cmd: &mut Command) -> Child {
        let child = cmd
            .env("PDCTL_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Child(child)
    }

    /// The exit status once the child ends by itself; fails the test after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut status = None;
        super::poll(limit, Duration::from_millis(20), || {
            status = self.0.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap_or_else(|| panic!("still running after {limit:?}"))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `pdctl sim serve sim-model` on reserved ports, serving once this returns.
pub struct Sim {
    pub child: Child,
    pub port: u16,
    pub side_port: u16,
}

impl Sim {
    pub fn start(extra: &[&str]) -> Sim {
        let port = ports::reserve(2);
        let side_port = port + 1;
        let child = Child::spawn(
            pdctl()
                .args(["sim", "serve", "sim-model", "--port", &port.to_string()])
                .args(["--side-channel-port", &side_port.to_string()])
                .args(extra),
        );
        http::wait_serving(port);
        Sim {
            child,
            port,
            side_port,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The sum of metric `name` on this engine's /metrics.
    pub fn metric(&self, name: &str) -> f64 {
        super::metric(&http::get(self.port, "/metrics").body, name)
    }
}

/// `pdctl proxy` (listening on `--listen`) or `pdctl sidecar` (on `--port`) with `args`, on a
/// reserved port, serving once this returns.
pub struct Proxy {
    pub child: Child,
    pub port: u16,
}

impl Proxy {
    pub fn start(sub: &str, args: &[String]) -> Proxy {
        let port = ports::reserve(1);
        let listen: Vec<String> = if sub == "sidecar" {
            vec![format!("--port={port}"), "--host=127.0.0.1".into()]
        } else {
            vec!["--listen".into(), format!("127.0.0.1:{port}")]
        };
        let child = Child::spawn(pdctl().arg(sub).args(listen).args(args));
        http::wait_serving(port);
        Proxy { child, port }
    }

    pub fn metric(&self, name: &str) -> f64 {
        super::metric(&http::get(self.port, "/metrics").body, name)
    }
}
