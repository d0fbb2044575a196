//! Module `reconcile`: see architecture.md.
