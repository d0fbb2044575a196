//! The module map in `src/lib.rs` and `docs/architecture.md`, checked against the source: every
//! `crate::` path in a module (its tests included) points down the layers, and no two files of
//! one module import each other, directly or through others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, top first: a module may use the modules of any layer below its own, never one of
/// its own layer or above.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["daemon"],
    &["reconcile"],
    &["runtime", "health", "export"],
    &["plan"],
    &["gpu"],
    &["spec"],
];

/// Modules beside the stack: what each may use, and who may use it. (The control loop
/// publishes ready engines to the proxy's endpoint set; the CLI runs the simulator.)
const BESIDE: &[(&str, &[&str], &[&str])] = &[
    ("proxy", &["spec"], &["cli", "daemon", "reconcile"]),
    ("sim", &["spec"], &["cli"]),
];

fn may_use(module: &str, used: &str) -> bool {
    if let Some((_, uses, _)) = BESIDE.iter().find(|(m, _, _)| *m == module) {
        return uses.contains(&used);
    }
    if let Some((_, _, users)) = BESIDE.iter().find(|(m, _, _)| *m == used) {
        return users.contains(&module);
    }
    let layer = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    matches!((layer(module), layer(used)), (Some(a), Some(b)) if b > a)
}

fn known_modules() -> BTreeSet<&'static str> {
    let beside = BESIDE.iter().map(|(m, _, _)| *m);
    LAYERS
        .iter()
        .flat_map(|l| l.iter().copied())
        .chain(beside)
        .collect()
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// Identifiers named right after `prefix` (`prefix::name` or `prefix::{a, b::c}`).
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().last();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let first = item.trim().split("::").next().unwrap_or("");
                names.insert(first.trim().to_string());
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

fn without_comments(text: &str) -> String {
    text.lines()
        .filter(|l| {
            let t = l.trim_start();
            !t.starts_with("//")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn modules_import_only_down_the_documented_layers() {
    let known = known_modules();
    let mut wrong = Vec::new();
    for module in &known {
        let dir = src().join(module);
        assert!(dir.is_dir(), "src/{module} is in the map but not in src/");
        for file in rust_files(&dir) {
            let text = without_comments(&std::fs::read_to_string(&file).unwrap());
            for used in names_after(&text, "crate::") {
                if used != *module && known.contains(used.as_str()) && !may_use(module, &used) {
                    wrong.push(format!(
                        "{} uses crate::{used}",
                        file.strip_prefix(src()).unwrap().display()
                    ));
                }
            }
        }
    }
    let top: BTreeSet<String> = std::fs::read_dir(src())
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            path.is_dir()
                .then(|| path.file_name().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    for module in &top {
        assert!(
            known.contains(module.as_str()),
            "src/{module} is not in the module map; add it to lib.rs, docs/architecture.md and this test"
        );
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

/// `a` reaches `b` through the edges.
fn reaches(edges: &BTreeMap<String, BTreeSet<String>>, a: &str, b: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut todo = vec![a.to_string()];
    while let Some(next) = todo.pop() {
        for to in edges.get(&next).into_iter().flatten() {
            if to == b {
                return true;
            }
            if seen.insert(to.clone()) {
                todo.push(to.clone());
            }
        }
    }
    false
}

#[test]
fn no_two_files_of_a_module_import_each_other() {
    let mut cycles = Vec::new();
    for entry in std::fs::read_dir(src()).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let module = dir.file_name().unwrap().to_string_lossy().into_owned();
        let files: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let path = e.unwrap().path();
                let stem = path.file_stem()?.to_string_lossy().into_owned();
                (path.extension()? == "rs" && stem != "mod").then_some(stem)
            })
            .collect();
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in &files {
            let text =
                without_comments(&std::fs::read_to_string(dir.join(format!("{file}.rs"))).unwrap());
            let mut used = names_after(&text, "super::");
            used.extend(names_after(&text, &format!("crate::{module}::")));
            used.retain(|u| u != file && files.contains(u));
            edges.insert(file.clone(), used);
        }
        for (file, used) in &edges {
            for other in used {
                if file < other && reaches(&edges, other, file) {
                    cycles.push(format!("src/{module}: {file}.rs <-> {other}.rs"));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles between files:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_rules_read_as_documented() {
    assert!(may_use("cli", "daemon") && may_use("plan", "spec") && may_use("reconcile", "proxy"));
    assert!(!may_use("spec", "plan") && !may_use("runtime", "export") && !may_use("plan", "plan"));
    assert!(
        !may_use("proxy", "runtime") && !may_use("proxy", "sim") && !may_use("runtime", "proxy")
    );
}

#[test]
fn the_scanner_sees_imports_in_both_forms() {
    let text =
        "use crate::{plan::Plan, spec};\nlet x = crate::proxy::Thing;\nuse super::{a, b::C};";
    let crate_names = names_after(text, "crate::");
    assert_eq!(
        crate_names,
        ["plan", "proxy", "spec"].map(String::from).into()
    );
    assert_eq!(
        names_after(text, "super::"),
        ["a", "b"].map(String::from).into()
    );
}
