//! Module `daemon`: see architecture.md.
