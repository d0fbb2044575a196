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

#[test]
fn a_hung_engine_fails_liveness_and_is_restarted() {
    // The decode stops answering /health 1 s after it starts: liveness (period 1 s,
    // threshold 3) must restart it, and the status must say why.
    let d = Deployment::with_decode_extra(
        "hung",
        "kind = \"process\"\ncommand = [\"pdctl\", \"sim\"]",
        1,
        1,
        "args = [\"--hang-health-after\", \"1s\"]\nprobes.liveness.timeout_seconds = 1\n",
    );
    d.up_detached();
    let first = d.instance("decode-0")["id"].as_str().unwrap().to_string();
    let s = d.wait_status("a liveness restart", |s| {
        s["instances"].as_array().unwrap().iter().any(|i| {
            i["instance"].as_str().unwrap().ends_with("decode-0")
                && i["restarts"].as_u64() >= Some(1)
                && i["last_exit"] == "liveness probe failed"
        })
    });
    let row = &s["instances"].as_array().unwrap()[1];
    assert_ne!(
        row["id"].as_str(),
        Some(first.as_str()),
        "a new process: {row}"
    );
    assert!(!proc_alive(&first), "the hung engine was killed");
}

#[test]
fn foreground_up_prints_the_endpoint_and_ctrl_c_takes_everything_down() {
    use std::io::{BufRead, BufReader};
    let d = Deployment::new(
        "fg",
        "kind = \"process\"\ncommand = [\"pdctl\", \"sim\"]",
        1,
        1,
    );
    let file = d.file.display().to_string();
    let mut child = d
        .cmd(&["up", "-f", &file])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let endpoint = format!("OpenAI endpoint: http://127.0.0.1:{}/v1", d.proxy_port);
    assert!(
        lines.any(|l| l.unwrap_or_default().contains(&endpoint)),
        "the banner names the endpoint"
    );
    let pids = ids(&d.status());
    let (code, _) = d.completion();
    assert_eq!(code, 200);
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert!(status.success(), "graceful down exits 0: {status}");
    assert!(pids.iter().all(|p| !proc_alive(p)), "engines stopped");
    assert_eq!(d.run("status", &[]).status.code(), Some(3));
}
