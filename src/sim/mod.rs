//! Module `sim`: see architecture.md.
