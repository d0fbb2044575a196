//! Module `proxy`: see architecture.md.
