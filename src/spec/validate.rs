//! Semantic rules of one pools.toml on its own (no GPU inventory, no cross-instance ports: those
//! are the planner's). Each rule reports at the key it is about.

use std::collections::HashSet;

use super::spans::Seg;
use super::types::{GpuSelector, RuntimeKind};
use super::vocab::{ProbeKind, Role};
use super::{is_env_name, quantity, Diagnostic, LoadedSpec};

/// Engine flags pdctl derives per instance; setting them in `args` would break the plan.
const MANAGED_FLAGS: &[&str] = &[
    "--port",
    "--served-model-name",
    "--tensor-parallel-size",
    "-tp",
];

/// Env names pdctl sets per instance and that must not be overridden.
const RESERVED_ENV: &[&str] = &["VLLM_NIXL_SIDE_CHANNEL_PORT", "CUDA_VISIBLE_DEVICES"];

pub(super) fn check(l: &LoadedSpec) -> Vec<Diagnostic> {
    let mut d = Vec::new();
    project(l, &mut d);
    model(l, &mut d);
    runtime(l, &mut d);
    for role in [Role::Prefill, Role::Decode] {
        pool(l, role, &mut d);
    }
    gpu_mix(l, &mut d);
    for (key, msg) in l.spec.proxy.problems() {
        d.push(l.at(&["proxy".into(), key.into()], msg));
    }
    gpus(l, &mut d);
    d.sort_by_key(|x| (x.line, x.col));
    d
}

/// A DNS label short enough that `pdctl-<project>-prefill-<index>` stays one.
pub fn is_project_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 40
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

fn project(l: &LoadedSpec, d: &mut Vec<Diagnostic>) {
    if let Some(p) = &l.spec.project {
        if !is_project_name(p) {
            d.push(l.at(
                &["project".into()],
                format!("project `{p}` must be a DNS label of at most 40 characters: lowercase letters, digits and `-`, starting and ending with a letter or digit"),
            ));
        }
    }
}

fn model(l: &LoadedSpec, d: &mut Vec<Diagnostic>) {
    let m = &l.spec.model;
    let k = |key: &'static str| [Seg::Key("model"), Seg::Key(key)];
    match (&m.path, &m.hf) {
        (Some(_), Some(_)) => {
            d.push(l.at_key(&k("hf"), "set either `path` or `hf` in [model], not both"))
        }
        (None, None) => d.push(l.at(
            &["model".into()],
            "[model] needs `path` (a host directory) or `hf` (a Hugging Face id)",
        )),
        (Some(p), None) => {
            if p.as_os_str().is_empty() {
                d.push(l.at(&k("path"), "`path` is empty"));
            }
            if m.cache_dir.is_some() {
                d.push(l.at_key(&k("cache_dir"), "`cache_dir` applies only to `hf` models"));
            }
        }
        (None, Some(id)) => {
            if !is_hf_id(id) {
                d.push(l.at(
                    &k("hf"),
                    format!("`{id}` is not a Hugging Face id (expected `owner/name`)"),
                ));
            }
        }
    }
    if let Some(name) = &m.name {
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            d.push(l.at(
                &k("name"),
                "`name` must be non-empty and contain no whitespace",
            ));
        }
    }
}

fn is_hf_id(id: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    match id.split_once('/') {
        Some((owner, name)) => ok(owner) && ok(name),
        None => ok(id),
    }
}

fn runtime(l: &LoadedSpec, d: &mut Vec<Diagnostic>) {
    let r = &l.spec.runtime;
    let k = |key: &'static str| [Seg::Key("runtime"), Seg::Key(key)];
    match r.kind {
        RuntimeKind::Process => {
            for (key, set) in [
                ("image", r.image.is_some()),
                ("pull_policy", r.pull_policy.is_some()),
                ("network_mode", r.network_mode.is_some()),
            ] {
                if set {
                    d.push(l.at_key(
                        &k(key),
                        format!("`{key}` applies only to kind = \"docker\""),
                    ));
                }
            }
            if r.command.is_none() {
                d.push(l.at(
                    &k("kind"),
                    "kind = \"process\" needs `command`, e.g. [\"pdctl\", \"sim\"] or [\"/opt/venv/bin/vllm\"]",
                ));
            }
        }
        RuntimeKind::Docker => {
            if r.image.as_deref().is_some_and(|i| i.trim().is_empty()) {
                d.push(l.at(&k("image"), "`image` is empty"));
            }
            if r.network_mode.as_deref().is_some_and(str::is_empty) {
                d.push(l.at(&k("network_mode"), "`network_mode` is empty"));
            }
        }
    }
    if let Some(cmd) = &r.command {
        if cmd.is_empty() {
            d.push(l.at(&k("command"), "`command` needs at least the program"));
        }
        for (i, a) in cmd.iter().enumerate() {
            if a.is_empty() {
                d.push(l.at(
                    &[k("command")[0], k("command")[1], i.into()],
                    "empty argument",
                ));
            }
        }
    }
}

fn pool(l: &LoadedSpec, role: Role, d: &mut Vec<Diagnostic>) {
    let p = l.spec.pool(role);
    let r = role.as_str();
    let k = |key: &'static str| [Seg::Key(r), Seg::Key(key)];
    if p.replicas == 0 {
        d.push(l.at(
            &k("replicas"),
            format!("{r} replicas must be at least 1 (P/D serving needs both pools)"),
        ));
    }
    if p.replicas > 64 {
        d.push(l.at(
            &k("replicas"),
            format!(
                "{} {r} replicas is more than one host can run (at most 64)",
                p.replicas
            ),
        ));
    }
    if p.gpus_per_replica > 64 {
        d.push(l.at(
            &k("gpus_per_replica"),
            format!(
                "{} GPUs per replica is more than one host has (at most 64)",
                p.gpus_per_replica
            ),
        ));
    }
    for (key, base) in [
        ("http_port_base", p.http_port_base(role)),
        ("side_channel_port_base", p.side_channel_port_base(role)),
    ] {
        let last = u32::from(base) + p.replicas.saturating_sub(1);
        if base == 0 {
            d.push(l.at(&k(key), "port 0 is not a usable port"));
        } else if last > u32::from(u16::MAX) {
            d.push(l.at(
                &k(key),
                format!(
                    "{r} instance {} would get port {last}, above 65535",
                    p.replicas - 1
                ),
            ));
        }
    }
    if let Err(e) = quantity::parse_bytes(&p.shm_size) {
        d.push(l.at(&k("shm_size"), e.to_string()));
    }
    for name in p.env.keys() {
        let at = [Seg::Key(r), Seg::Key("env"), Seg::Key(name)];
        if !is_env_name(name) {
            d.push(l.at_key(
                &at,
                format!("`{name}` is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"),
            ));
        } else if RESERVED_ENV.contains(&name.as_str()) {
            d.push(l.at_key(
                &at,
                format!("`{name}` is set by pdctl for each instance and cannot be overridden"),
            ));
        }
    }
    for (i, a) in p.args.iter().enumerate() {
        let flag = a.split('=').next().unwrap_or(a);
        if MANAGED_FLAGS.contains(&flag) {
            d.push(l.at(
                &[Seg::Key(r), Seg::Key("args"), Seg::Index(i)],
                format!("`{flag}` is set by pdctl (from the port bases, [model] and gpus_per_replica); remove it from args"),
            ));
        }
    }
    for kind in ProbeKind::ALL {
        probe(l, role, kind, d);
    }
    if p.stop_grace_seconds > 3600 {
        d.push(l.at(
            &k("stop_grace_seconds"),
            "`stop_grace_seconds` must be at most 3600",
        ));
    }
}

fn probe(l: &LoadedSpec, role: Role, kind: ProbeKind, d: &mut Vec<Diagnostic>) {
    let p = l.spec.pool(role).probes.get(kind);
    let at = |key: &'static str| {
        [
            Seg::Key(role.as_str()),
            Seg::Key("probes"),
            Seg::Key(kind.as_str()),
            Seg::Key(key),
        ]
    };
    if let Some(path) = &p.path {
        if !path.starts_with('/') || path.chars().any(char::is_whitespace) {
            d.push(l.at(
                &at("path"),
                format!("probe path `{path}` must start with `/` and contain no spaces"),
            ));
        }
    }
    for (key, v) in [
        ("period_seconds", p.period_seconds),
        ("timeout_seconds", p.timeout_seconds),
        ("failure_threshold", p.failure_threshold),
    ] {
        if v == Some(0) {
            d.push(l.at(&at(key), format!("`{key}` must be at least 1")));
        }
    }
}

/// KV moves GPU to GPU or CPU to CPU; one pool on GPUs and the other without cannot pair.
fn gpu_mix(l: &LoadedSpec, d: &mut Vec<Diagnostic>) {
    let (p, dc) = (&l.spec.prefill, &l.spec.decode);
    if (p.gpus_per_replica == 0) != (dc.gpus_per_replica == 0) {
        let cpu = if p.gpus_per_replica == 0 {
            "prefill"
        } else {
            "decode"
        };
        d.push(l.at(
            &[Seg::Key(cpu), Seg::Key("gpus_per_replica")],
            format!("{cpu} has gpus_per_replica = 0 but the other pool uses GPUs; 0 is only for CPU/simulated engines in both pools"),
        ));
    }
}

fn gpus(l: &LoadedSpec, d: &mut Vec<Diagnostic>) {
    let Some(g) = &l.spec.gpus else { return };
    if g.devices.is_empty() {
        d.push(l.at(&["gpus".into(), "devices".into()], "`devices` is empty"));
    }
    let mut seen = HashSet::new();
    for (i, sel) in g.devices.iter().enumerate() {
        let key = sel.to_string();
        if !seen.insert(key.clone()) {
            d.push(l.at(
                &["gpus".into(), "devices".into(), i.into()],
                format!("GPU `{key}` is listed twice"),
            ));
        }
        if let GpuSelector::Uuid(u) = sel {
            if u.is_empty() {
                d.push(l.at(
                    &["gpus".into(), "devices".into(), i.into()],
                    "empty GPU UUID",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_are_dns_labels() {
        assert!(is_project_name("qwen-7b"));
        for bad in ["", "-a", "a-", "A", "a_b", &"x".repeat(41)] {
            assert!(!is_project_name(bad), "{bad}");
        }
    }

    #[test]
    fn hf_ids() {
        assert!(is_hf_id("Qwen/Qwen2.5-7B-Instruct"));
        assert!(is_hf_id("gpt2"));
        for bad in ["", "/x", "a/b/c", "a b/c", "a/"] {
            assert!(!is_hf_id(bad), "{bad}");
        }
    }
}
