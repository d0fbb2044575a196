//! The same lifecycle on real Docker containers of the simulator image
//! (`scripts/build-sim-image.sh`). Without an engine or the image the test skips loudly, but
//! under `CI` it fails: CI builds the image (scripts/ci/30-sim-image.sh) before `cargo test`.

mod support;

use std::process::Command;

use support::deployment::*;

const IMAGE: &str = "pdctl-sim:dev";

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI runs")
}

/// `false` = skip (with a message); panics under CI.
fn docker_ready() -> bool {
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    let problem = match Command::new("docker").arg("info").output() {
        Ok(o) if o.status.success() => {
            if docker(&["image", "inspect", IMAGE]).status.success() {
                return true;
            }
            format!("image {IMAGE} is missing: run scripts/build-sim-image.sh")
        }
        _ => "no Docker Engine answers".to_string(),
    };
    assert!(!ci, "CI is set and the Docker tests cannot run: {problem}");
    eprintln!("\n!!! SKIPPING Docker test: {problem} !!!\n");
    false
}

fn containers(project: &str) -> Vec<String> {
    let out = docker(&[
        "ps",
        "-a",
        "-q",
        "--filter",
        &format!("label=pdctl.project={project}"),
    ]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn inspect(name: &str, format: &str) -> String {
    let out = docker(&["inspect", "-f", format, name]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn docker_runtime_lifecycle() {
    if !docker_ready() {
        return;
    }
    let runtime = format!(
        "kind = \"docker\"\nimage = \"{IMAGE}\"\npull_policy = \"never\"\nnetwork_mode = \"host\""
    );
    let d = Deployment::new("dock", &runtime, 1, 2);
    let project = d.project.clone();
    let checked = std::cell::Cell::new(false);
    lifecycle(
        &d,
        &|id| {
            // First kill: the containers are as planned (checked here, while all run).
            if !checked.replace(true) {
                let name = format!("pdctl-{project}-decode-0");
                let labels = inspect(&name, "{{json .Config.Labels}}");
                for want in [
                    format!("\"pdctl.project\":\"{project}\""),
                    "\"pdctl.role\":\"decode\"".into(),
                    "\"pdctl.index\":\"0\"".into(),
                    "\"pdctl.spec-hash\":".into(),
                ] {
                    assert!(labels.contains(&want), "{want} in {labels}");
                }
                assert_eq!(
                    inspect(&name, "{{.HostConfig.ShmSize}}"),
                    (128u64 << 20).to_string()
                );
                assert_eq!(inspect(&name, "{{.HostConfig.IpcMode}}"), "private");
                assert_eq!(inspect(&name, "{{.HostConfig.NetworkMode}}"), "host");
                assert_eq!(inspect(&name, "{{.HostConfig.Privileged}}"), "false");
                assert_eq!(inspect(&name, "{{.HostConfig.RestartPolicy.Name}}"), "no");
                let args = inspect(&name, "{{json .Args}}");
                assert!(
                    args.contains(&format!("\"--port\",\"{}\"", d.decode_base)),
                    "{args}"
                );
                let mounts = inspect(&name, "{{json .Mounts}}");
                assert!(
                    mounts.contains("\"Destination\":\"/mnt/models\""),
                    "{mounts}"
                );
                assert!(mounts.contains("\"RW\":false"), "{mounts}");
                assert_eq!(containers(&project).len(), 3);
            }
            assert!(docker(&["kill", id]).status.success());
        },
        &|_| containers(&project).is_empty(),
    );
}

#[test]
fn a_missing_image_is_a_clear_error_naming_image_and_policy() {
    if !docker_ready() {
        return;
    }
    for (policy, want) in [
        ("never", "forbids pulling it"),
        // No registry is reachable here: the pull fails, and says which image and policy.
        (
            "if-not-present",
            "pulling image pdctl-missing:none (pull policy `if-not-present`) failed",
        ),
    ] {
        let runtime = format!(
            "kind = \"docker\"\nimage = \"pdctl-missing:none\"\npull_policy = \"{policy}\""
        );
        let d = Deployment::new("miss", &runtime, 1, 1);
        let out = d.run("up", &[]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("pdctl-missing:none") && err.contains(want),
            "{err}"
        );
        assert!(containers(&d.project).is_empty());
    }
}
