//! pools.toml: types, defaults (mirroring KServe's P/D templates) and validation.

pub mod proxy;
