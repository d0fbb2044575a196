//! Module `export`: see architecture.md.
