//! The corpus of bad pools.toml files: every one must exit 2 with `FILE:LINE:COL: message`,
//! the offending line and a caret, and leave nothing behind.
//!
//! Each file starts with two comment lines:
//!   `# args: validate` (or `plan --gpus 4xH100-80GB`): the pdctl command to run;
//!   `# expect: LINE:COL: fragment`: where the first error is and part of its message.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bad");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn header<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
        .unwrap_or_else(|| panic!("missing `# {key}:` header"))
}

fn check(file: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(file).unwrap();
    let args: Vec<&str> = header(&text, "args").split_whitespace().collect();
    let (loc, fragment) = header(&text, "expect").split_once(": ").unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = Command::cargo_bin("pdctl")
        .unwrap()
        .current_dir(work.path())
        .env_remove("PDCTL_GPUS")
        .env("HOME", work.path())
        .args(&args)
        .arg("-f")
        .arg(file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut problems = Vec::new();
    if out.status.code() != Some(2) {
        problems.push(format!("exit status {:?}, want 2", out.status.code()));
    }
    if !out.stdout.is_empty() {
        problems.push("wrote to stdout".into());
    }
    let prefix = format!("{}:{loc}: ", file.display());
    let first = stderr.lines().next().unwrap_or_default();
    if !first.starts_with(&prefix) {
        problems.push(format!("first line does not start with `{prefix}`"));
    }
    if !first.contains(fragment) {
        problems.push(format!("first line lacks `{fragment}`"));
    }
    let lines: Vec<&str> = stderr.lines().collect();
    let line_no = loc.split(':').next().unwrap();
    let caret_ok = lines.len() >= 4
        && lines[2].trim_start().starts_with(&format!("{line_no} | "))
        && lines[3].trim_end().ends_with('^')
        && lines[3].contains(" | ");
    if !caret_ok {
        problems.push("no source line with a caret under it".into());
    }
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    if !left.is_empty() {
        problems.push(format!(
            "created {} file(s) in the working directory",
            left.len()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}\n{stderr}",
            file.display(),
            problems.join("; ")
        ))
    }
}

#[test]
fn every_bad_file_is_rejected_with_a_located_error() {
    let files = corpus();
    assert!(files.len() >= 20, "only {} bad files", files.len());
    let failures: Vec<String> = files.iter().filter_map(|f| check(f).err()).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_harness_rejects_a_valid_file() {
    // Guards the harness itself: a valid file must NOT satisfy `check`.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("good.toml");
    std::fs::write(
        &f,
        "# args: validate\n# expect: 3:1: x\n[model]\nhf = \"a/b\"\n",
    )
    .unwrap();
    assert!(check(&f).is_err());
}

#[test]
fn a_missing_file_is_invalid_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::cargo_bin("pdctl")
        .unwrap()
        .current_dir(dir.path())
        .arg("validate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("cannot read pools.toml:"), "{err}");
}
