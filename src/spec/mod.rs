//! pools.toml: types, defaults (mirroring KServe's P/D templates) and validation.
//!
//! `load(path)` reads, parses and checks one file; every error it returns is located
//! (`FILE:LINE:COL`). Cross-instance rules (ports) and the GPU fit are the planner's.

use std::ops::Range;
use std::path::{Path, PathBuf};

pub mod error;
pub mod proxy;
pub mod quantity;
pub mod spans;
mod suggest;
pub mod types;
mod validate;
pub mod vocab;

pub use error::{Diagnostic, SpecError};
pub use spans::{Seg, SpanIndex};
pub use types::*;
pub use validate::is_project_name;
pub use vocab::{ProbeKind, PullPolicy, RestartPolicy, Role};

/// A parsed, validated pools.toml together with what is needed to point into it.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    /// As given (used verbatim in messages and in `Plan::source`).
    pub path: PathBuf,
    pub source: String,
    pub spec: Spec,
    pub spans: SpanIndex,
    /// `spec.project`, or the file stem sanitised to a DNS label.
    pub project: String,
}

impl LoadedSpec {
    /// A diagnostic at the value at `path` (or its nearest spelled-out ancestor).
    pub fn at(&self, path: &[Seg<'_>], message: impl Into<String>) -> Diagnostic {
        self.at_span(self.spans.find(path), message)
    }

    /// A diagnostic at the key of `path`, for "this key should not be here" errors.
    pub fn at_key(&self, path: &[Seg<'_>], message: impl Into<String>) -> Diagnostic {
        self.at_span(self.spans.key(path, &self.source), message)
    }

    pub fn at_span(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        Diagnostic::at(&self.path, &self.source, span, message)
    }

    /// The directory relative model paths are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        let dir = self.path.parent().unwrap_or(Path::new(""));
        if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(dir)
        }
    }
}

/// Reads and checks `path`.
pub fn load(path: &Path) -> Result<LoadedSpec, SpecError> {
    let source = std::fs::read_to_string(path).map_err(|e| SpecError::Read {
        path: path.to_path_buf(),
        source: std::sync::Arc::new(e),
    })?;
    parse(path, source)
}

/// Parses and checks `source` as if read from `path`.
pub fn parse(path: &Path, source: String) -> Result<LoadedSpec, SpecError> {
    let spec: Spec = match toml::from_str(&source) {
        Ok(s) => s,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let msg = suggest::improve(e.message().trim_end());
            return Err(SpecError::Invalid(vec![Diagnostic::at(
                path, &source, span, msg,
            )]));
        }
    };
    let spans = SpanIndex::build(&source);
    let project = spec
        .project
        .clone()
        .unwrap_or_else(|| project_from_path(path));
    let loaded = LoadedSpec {
        path: path.to_path_buf(),
        source,
        spec,
        spans,
        project,
    };
    let diags = validate::check(&loaded);
    if diags.is_empty() {
        Ok(loaded)
    } else {
        Err(SpecError::Invalid(diags))
    }
}

/// `examples/My Model.toml` → `my-model`; `pdctl` when nothing usable is left.
pub fn project_from_path(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let mut out = String::new();
    for c in stem.chars() {
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if !(c == '-' && (out.is_empty() || out.ends_with('-'))) {
            out.push(c);
        }
    }
    out.truncate(40);
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "pdctl".into()
    } else {
        out
    }
}

/// POSIX portable environment variable name.
pub fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(src: &str) -> Result<LoadedSpec, SpecError> {
        parse(Path::new("t.toml"), src.to_string())
    }

    const MIN: &str = "[model]\nhf = \"Qwen/Qwen2.5-7B-Instruct\"\n";

    #[test]
    fn minimal_file_takes_template_defaults() {
        let l = parse_str(MIN).unwrap();
        assert_eq!(l.project, "t");
        assert_eq!(l.spec.runtime.kind, RuntimeKind::Docker);
        assert_eq!(l.spec.prefill.replicas, 1);
        assert_eq!(l.spec.decode.gpus_per_replica, 1);
        assert_eq!(l.spec.decode.shm_size, "1Gi");
        assert_eq!(l.spec.decode.http_port_base(Role::Decode), 8200);
    }

    #[test]
    fn syntax_and_type_errors_are_located() {
        let e = parse_str(&format!("{MIN}[decode]\nreplicas = \"two\"\n")).unwrap_err();
        let d = &e.diagnostics()[0];
        assert_eq!((d.line, d.col), (4, 12));
        let e = parse_str("[model\n").unwrap_err();
        assert_eq!(e.diagnostics()[0].line, 1);
    }

    #[test]
    fn unknown_keys_get_a_hint() {
        let e = parse_str(&format!("{MIN}[decode]\nreplcas = 2\n")).unwrap_err();
        let d = &e.diagnostics()[0];
        assert_eq!((d.line, d.col), (4, 1));
        assert!(
            d.message.contains("did you mean `replicas`?"),
            "{}",
            d.message
        );
    }

    #[test]
    fn semantic_errors_point_at_their_key() {
        let e = parse_str(&format!(
            "{MIN}[decode]\nreplicas = 0\nshm_size = \"1GB\"\n"
        ))
        .unwrap_err();
        let d = e.diagnostics();
        assert_eq!(d.len(), 2, "{e}");
        assert_eq!((d[0].line, d[0].col), (4, 12));
        assert_eq!((d[1].line, d[1].col), (5, 12));
    }

    #[test]
    fn defaults_errors_point_at_the_table() {
        let e = parse_str(&format!("{MIN}[runtime]\nkind = \"process\"\n")).unwrap_err();
        let d = &e.diagnostics()[0];
        assert_eq!(d.line, 4, "{e}");
    }

    #[test]
    fn project_from_path_sanitises() {
        assert_eq!(
            project_from_path(Path::new("a/My Model_v2.toml")),
            "my-model-v2"
        );
        assert_eq!(project_from_path(Path::new("___.toml")), "pdctl");
    }

    #[test]
    fn env_names() {
        assert!(is_env_name("UCX_TLS") && is_env_name("_x1"));
        assert!(!is_env_name("1A") && !is_env_name("A-B") && !is_env_name(""));
    }
}
