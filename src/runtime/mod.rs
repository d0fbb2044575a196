//! Module `runtime`: see architecture.md.
