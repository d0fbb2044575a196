//! `pdctl up | status | scale | logs | down` on the process runtime with `pdctl sim` engines.

mod daemon_support;

use std::process::Command;

use daemon_support::*;

#[test]
fn process_runtime_lifecycle() {
    let d = Deployment::new(
        "proc",
        "kind = \"process\"\ncommand = [\"pdctl\", \"sim\"]",
        1,
        2,
    );
    lifecycle(
        &d,
        &|pid| {
            assert!(Command::new("kill")
                .args(["-9", pid])
                .status()
                .unwrap()
                .success());
        },
        &|pids| pids.iter().all(|p| !proc_alive(p)),
    );
}

#[test]
fn a_busy_proxy_port_is_reported_before_anything_starts() {
    let d = Deployment::new(
        "busy",
        "kind = \"process\"\ncommand = [\"pdctl\", \"sim\"]",
        1,
        1,
    );
    let _held = std::net::TcpListener::bind(("127.0.0.1", d.proxy_port)).unwrap();
    let out = d.run("up", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on 127.0.0.1:"), "{err}");
    assert!(err.contains("[proxy] listen"), "{err}");
    let records = d.state_dir().join(&d.project).join("instances");
    let n = std::fs::read_dir(records).map(|r| r.count()).unwrap_or(0);
    assert_eq!(n, 0, "no engine was started");
}
