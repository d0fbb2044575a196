//! Module `gpu`: see architecture.md.
