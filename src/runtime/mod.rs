//! Runtimes that run a plan's instances: the Docker container spec lives here (pure), shared
//! by the Docker runtime and the export's equivalence check.

pub mod container;
