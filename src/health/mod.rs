//! Module `health`: see architecture.md.
