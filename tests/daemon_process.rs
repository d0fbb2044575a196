//! `pdctl up | status | scale | logs | down` on the process runtime with `pdctl sim` engines.

mod support;

use std::process::Command;

use support::deployment::*;

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
fn a_hung_engine_fails_its_probes_and_is_restarted() {
    // The decode stops answering /health 2 s after it starts. Whether it hangs before its
    // startup probe passed (startup failure) or after (liveness failure) depends on how fast
    // this machine is; either way the probes, not an exit, must get it restarted.
    let d = Deployment::with_decode_extra(
        "hung",
        "kind = \"process\"\ncommand = [\"pdctl\", \"sim\"]",
        1,
        1,
        "args = [\"--hang-health-after\", \"2s\"]\nprobes.startup.failure_threshold = 3\n",
    );
    let file = d.file.display().to_string();
    // Foreground, so the test does not wait for a readiness the engine may never reach.
    let mut daemon = d.spawn_up(std::process::Stdio::null());
    let mut first = None;
    let started = support::poll(
        std::time::Duration::from_secs(60),
        std::time::Duration::from_millis(50),
        || {
            assert!(daemon.try_wait().unwrap().is_none(), "the daemon died");
            let out = d.cmd(&["status", "-f", &file, "-o", "json"]).output();
            let status = out
                .ok()
                .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok());
            first = status.and_then(|s| s["instances"][1]["id"].as_str().map(String::from));
            first.is_some()
        },
    );
    assert!(started, "the decode never showed up in `status`");
    let first = first.unwrap();
    let s = d.wait_status("a probe-driven restart", |s| {
        let row = &s["instances"][1];
        row["restarts"].as_u64() >= Some(1)
            && ["liveness probe failed", "startup probe failed"]
                .contains(&row["last_exit"].as_str().unwrap_or(""))
    });
    let row = &s["instances"][1];
    assert!(row["instance"].as_str().unwrap().ends_with("decode-0"));
    // The restart is recorded when the stop begins; the stop itself may take a moment more.
    let killed = support::poll(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(50),
        || !proc_alive(&first),
    );
    assert!(killed, "the hung engine was killed: {row}");
    let pid = daemon.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(daemon.wait().unwrap().success());
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
    let mut child = d.spawn_up(std::process::Stdio::piped());
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

#[test]
fn a_changed_spec_replaces_only_the_changed_instances() {
    let d = Deployment::new(
        "repl",
        "kind = \"process\"\ncommand = [\"pdctl\", \"sim\"]",
        1,
        2,
    );
    d.up_detached();
    let before = d.status();
    let old = ids(&before);
    // Kill the daemon, change the decode pool only, start again.
    kill_daemon(&before);
    let text = std::fs::read_to_string(&d.file).unwrap();
    let changed = text.replacen("[decode]\n", "[decode]\nargs = [\"--seed\", \"7\"]\n", 1);
    assert_ne!(text, changed);
    std::fs::write(&d.file, changed).unwrap();
    d.up_detached();
    let after = d.status();
    let new = ids(&after);
    assert_eq!(
        new[0], old[0],
        "the prefill's spec did not change: adopted, not replaced"
    );
    assert_ne!(new[1], old[1]);
    assert_ne!(new[2], old[2]);
    assert!(
        old[1..].iter().all(|p| !proc_alive(p)),
        "old decodes are gone"
    );
    // One at a time: the daemon log shows the two replacements strictly in sequence.
    let log = d.daemon_log();
    let first_done = log.find("decode-0: ready").or(log.find("decode-1: ready"));
    let second_start = log.rfind(": replacing");
    assert!(
        matches!((first_done, second_start), (Some(a), Some(b)) if a < b),
        "{log}"
    );
}
