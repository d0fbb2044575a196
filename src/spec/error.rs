//! Located diagnostics: `FILE:LINE:COL: message` plus the offending line and a caret, the one
//! error shape for syntax errors (from toml) and semantic ones (from spans we look up).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem at one place in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub col: usize,
    pub message: String,
    /// The offending line, without its newline.
    pub line_text: String,
    /// Caret width in characters (at least 1).
    pub width: usize,
}

impl Diagnostic {
    /// Locates `span` (byte offsets into `src`); a span past the end points at the last line.
    pub fn at(file: &Path, src: &str, span: Range<usize>, message: impl Into<String>) -> Self {
        let start = floor_char_boundary(src, span.start.min(src.len()));
        let line_start = src[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = src[start..].find('\n').map_or(src.len(), |i| start + i);
        let line_text = src[line_start..line_end].trim_end_matches('\r').to_string();
        let line = src[..line_start].matches('\n').count() + 1;
        let col = src[line_start..start].chars().count() + 1;
        let end = floor_char_boundary(src, span.end.clamp(start, line_end));
        let width = src[start..end].chars().count().max(1);
        Diagnostic {
            file: file.to_path_buf(),
            line,
            col,
            message: message.into(),
            line_text,
            width,
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let num = self.line.to_string();
        let pad = " ".repeat(num.len());
        writeln!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )?;
        writeln!(f, "{pad} |")?;
        writeln!(f, "{num} | {}", self.line_text)?;
        // Tabs keep their width so the caret lines up under the offending text.
        let lead: String = self
            .line_text
            .chars()
            .take(self.col - 1)
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        write!(f, "{pad} | {lead}{}", "^".repeat(self.width))
    }
}

/// Everything wrong with one pools.toml, in file order.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
}

impl SpecError {
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            SpecError::Invalid(d) => d,
            SpecError::Read { .. } => &[],
        }
    }
}

fn render(diags: &[Diagnostic]) -> String {
    diags
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_line_col_and_caret() {
        let src = "a = 1\nport = \"x\"\n";
        let d = Diagnostic::at(Path::new("p.toml"), src, 13..16, "bad");
        assert_eq!((d.line, d.col, d.width), (2, 8, 3));
        assert_eq!(
            d.to_string(),
            "p.toml:2:8: bad\n  |\n2 | port = \"x\"\n  |        ^^^"
        );
    }

    #[test]
    fn span_at_end_of_file_is_clamped() {
        let d = Diagnostic::at(Path::new("p"), "x = 1", 99..120, "m");
        assert_eq!((d.line, d.col, d.width), (1, 6, 1));
    }

    #[test]
    fn multiline_span_underlines_to_end_of_first_line() {
        let d = Diagnostic::at(Path::new("p"), "[decode]\nreplicas = 0\n", 0..20, "m");
        assert_eq!((d.line, d.col, d.width), (1, 1, 8));
    }
}
