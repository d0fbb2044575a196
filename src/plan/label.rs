//! The label keys pdctl puts on every instance it runs. Runtimes find a project's instances
//! and read back their role and spec hash by these keys, so they are defined here only.

use std::collections::BTreeMap;

use super::Role;

/// Every pdctl key starts with it; pdctl's own labels name one host's replica.
pub const PREFIX: &str = "pdctl.";
pub const PROJECT: &str = "pdctl.project";
pub const ROLE: &str = "pdctl.role";
pub const INDEX: &str = "pdctl.index";
pub const SPEC_HASH: &str = "pdctl.spec-hash";
pub const VERSION: &str = "pdctl.version";

/// The role an instance was labelled with.
pub fn role(labels: &BTreeMap<String, String>) -> Option<Role> {
    let value = labels.get(ROLE)?;
    Role::ALL.into_iter().find(|r| r.as_str() == value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_read_back() {
        for r in Role::ALL {
            let labels = BTreeMap::from([(ROLE.to_string(), r.to_string())]);
            assert_eq!(role(&labels), Some(r));
        }
        assert_eq!(role(&BTreeMap::new()), None);
    }
}
