//! `pdctl plan`, `validate` and `gpus` on the shipped files, end to end, with snapshots of
//! the JSON contract (`tests/snapshots/plan_cli__*.snap`).

use std::path::Path;

use assert_cmd::Command;
use pdctl::plan::{Plan, Role};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs pdctl in the repo root with a fixed HOME, so default HF cache paths are stable.
fn pdctl(args: &[&str]) -> std::process::Output {
    Command::cargo_bin("pdctl")
        .unwrap()
        .current_dir(ROOT)
        .env("HOME", "/home/user")
        .env_remove("PDCTL_GPUS")
        .args(args)
        .output()
        .unwrap()
}

fn plan_json(file: &str, gpus: Option<&str>) -> String {
    let mut args = vec!["plan", "-f", file, "--output", "json"];
    if let Some(g) = gpus {
        args.extend(["--gpus", g]);
    }
    let out = pdctl(&args);
    assert!(
        out.status.success(),
        "{file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The version label changes with every release; nothing else in a plan depends on the
/// machine once HOME is fixed.
fn redact(json: &str) -> String {
    json.replace(
        &format!("\"pdctl.version\": \"{}\"", env!("CARGO_PKG_VERSION")),
        "\"pdctl.version\": \"[version]\"",
    )
}

fn snapshot(name: &str, file: &str, gpus: Option<&str>) {
    let json = plan_json(file, gpus);
    let plan: Plan = serde_json::from_str(&json).expect("plan JSON parses back into Plan");
    assert_eq!(
        serde_json::to_string_pretty(&plan).unwrap(),
        json.trim_end()
    );
    insta::assert_snapshot!(name, redact(&json));
}

#[test]
fn plan_json_of_pools_toml() {
    snapshot("pools", "pools.toml", Some("2xH100-80GB"));
}

#[test]
fn plan_json_of_sim_example_needs_no_gpus() {
    snapshot("sim", "examples/sim.toml", None);
}

#[test]
fn plan_json_of_4gpu_example() {
    snapshot("4gpu", "examples/4gpu.toml", Some("4xH100-80GB"));
}

#[test]
fn every_shipped_file_validates() {
    let mut files = vec![Path::new(ROOT).join("pools.toml")];
    for e in std::fs::read_dir(Path::new(ROOT).join("examples")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            files.push(p);
        }
    }
    assert!(files.len() >= 3);
    for f in files {
        let out = pdctl(&["validate", "-f", f.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
    }
}

#[test]
fn table_shows_instances_ports_and_the_host_shm_note() {
    let out = pdctl(&["plan", "-f", "pools.toml", "--gpus", "2xH100-80GB"]);
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    for want in [
        "pdctl-qwen-prefill-0",
        "pdctl-qwen-decode-0",
        "8100",
        "5700",
        "host/host",
        "shm_size does not apply",
        "'{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_producer\"}'",
        "'{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_consumer\"}'",
        "--host 127.0.0.1",
        "--disable-access-log-for-endpoints /health",
    ] {
        assert!(s.contains(want), "missing {want:?} in\n{s}");
    }
}

#[test]
fn topology_from_a_json_inventory_keeps_tp_groups_on_nvlink() {
    // GPUs 0-3 and 1-2 are NVLink pairs: the TP2 decode must get one of the pairs.
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("gpus.json");
    let gpu = |i: u32, peer: u32| {
        serde_json::json!({"index": i, "uuid": format!("GPU-{i}"), "name": "H100",
            "numa_node": 0, "nvlink_peers": [peer]})
    };
    let all = serde_json::json!([gpu(0, 3), gpu(1, 2), gpu(2, 1), gpu(3, 0)]);
    std::fs::write(&inv, all.to_string()).unwrap();
    let json = plan_json("examples/4gpu.toml", Some(inv.to_str().unwrap()));
    let plan: Plan = serde_json::from_str(&json).unwrap();
    let decode = plan
        .instances
        .iter()
        .find(|i| i.role == Role::Decode)
        .unwrap();
    let ids: Vec<u32> = decode.gpus.iter().map(|g| g.index).collect();
    assert!(ids == [0, 3] || ids == [1, 2], "{ids:?}");
}

#[test]
fn plan_without_gpus_or_driver_fails_plainly() {
    let out = pdctl(&["plan", "-f", "pools.toml"]);
    if out.status.success() {
        return; // a machine with an NVIDIA driver and 2+ GPUs
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("no NVIDIA driver") {
        assert_eq!(out.status.code(), Some(1));
        assert!(
            err.contains("libnvidia-ml.so.1") && err.contains("--gpus"),
            "{err}"
        );
    }
}

#[test]
fn gpus_lists_a_fixed_inventory_and_reports_a_missing_driver() {
    let out = pdctl(&["gpus", "--gpus", "2xH100-80GB", "-o", "json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[1]["uuid"], "GPU-fixed-1");

    let out = pdctl(&["gpus"]);
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && err.contains("no NVIDIA driver") {
        assert!(err.contains("libnvidia-ml.so.1"), "{err}");
    }
}

#[test]
fn bad_gpus_flag_is_an_error() {
    let out = pdctl(&["plan", "-f", "pools.toml", "--gpus", "twoxH100"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid GPU inventory"));
}

#[test]
fn the_readme_reference_is_a_valid_pools_toml() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let section = readme.split("## pools.toml reference").nth(1).unwrap();
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("reference.toml");
    std::fs::write(&f, block).unwrap();
    let out = pdctl(&["validate", "-f", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
