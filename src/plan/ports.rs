//! Per-instance ports (base + index) and the collision rules between all of them and the proxy.

use crate::plan::model::Role;
use crate::spec::Spec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    Http,
    SideChannel,
}

impl PortKind {
    pub fn key(self) -> &'static str {
        match self {
            PortKind::Http => "http_port_base",
            PortKind::SideChannel => "side_channel_port_base",
        }
    }

    fn label(self) -> &'static str {
        match self {
            PortKind::Http => "HTTP",
            PortKind::SideChannel => "NIXL side-channel",
        }
    }
}

/// One port one instance uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortUse {
    pub role: Role,
    pub index: u32,
    pub kind: PortKind,
    pub port: u16,
}

impl PortUse {
    pub fn describe(&self) -> String {
        format!(
            "{}-{} {} port {}",
            self.role,
            self.index,
            self.kind.label(),
            self.port
        )
    }
}

/// Instance `index` of `role`: (http, side channel). Bases are validated so this cannot wrap.
pub fn ports(spec: &Spec, role: Role, index: u32) -> (u16, u16) {
    let p = spec.pool(role);
    let add = |base: u16| u16::try_from(u32::from(base) + index).unwrap_or(u16::MAX);
    (
        add(p.http_port_base(role)),
        add(p.side_channel_port_base(role)),
    )
}

/// Every port of every instance, prefill first, in index order.
pub fn all_ports(spec: &Spec) -> Vec<PortUse> {
    let mut out = Vec::new();
    for role in [Role::Prefill, Role::Decode] {
        for index in 0..spec.pool(role).replicas {
            let (http, side) = ports(spec, role, index);
            out.push(PortUse {
                role,
                index,
                kind: PortKind::Http,
                port: http,
            });
            out.push(PortUse {
                role,
                index,
                kind: PortKind::SideChannel,
                port: side,
            });
        }
    }
    out
}

/// A port used twice: `second` is the later use (the one to blame); `first == None` means the
/// proxy's listen port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Collision {
    pub first: Option<PortUse>,
    pub second: PortUse,
}

/// At most one collision per (role, kind) base, so one bad base does not flood the output.
pub fn collisions(spec: &Spec, proxy_port: Option<u16>) -> Vec<Collision> {
    let uses = all_ports(spec);
    let mut out: Vec<Collision> = Vec::new();
    for (i, u) in uses.iter().enumerate() {
        if out
            .iter()
            .any(|c| c.second.role == u.role && c.second.kind == u.kind)
        {
            continue;
        }
        if proxy_port == Some(u.port) {
            out.push(Collision {
                first: None,
                second: *u,
            });
        } else if let Some(f) = uses[..i].iter().find(|f| f.port == u.port) {
            out.push(Collision {
                first: Some(*f),
                second: *u,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{ModelSection, PoolSection};
    use proptest::prelude::*;

    fn spec(p: PoolSection, d: PoolSection) -> Spec {
        Spec {
            project: None,
            model: ModelSection::default(),
            runtime: Default::default(),
            prefill: p,
            decode: d,
            proxy: Default::default(),
            gpus: None,
        }
    }

    fn pool(replicas: u32, http: Option<u16>, side: Option<u16>) -> PoolSection {
        PoolSection {
            replicas,
            http_port_base: http,
            side_channel_port_base: side,
            ..PoolSection::default()
        }
    }

    #[test]
    fn defaults_give_distinct_ports() {
        let s = spec(pool(2, None, None), pool(3, None, None));
        assert_eq!(ports(&s, Role::Prefill, 1), (8101, 5601));
        assert_eq!(ports(&s, Role::Decode, 2), (8202, 5702));
        assert!(collisions(&s, Some(8000)).is_empty());
    }

    #[test]
    fn overlapping_ranges_and_the_proxy_collide() {
        let s = spec(pool(3, Some(8100), None), pool(1, Some(8102), None));
        let c = collisions(&s, Some(8000));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].second.describe(), "decode-0 HTTP port 8102");
        assert_eq!(c[0].first.unwrap().describe(), "prefill-2 HTTP port 8102");
        let s = spec(pool(1, Some(8000), None), pool(1, None, None));
        assert_eq!(collisions(&s, Some(8000))[0].first, None);
        // An HTTP port may not reuse another instance's side-channel port either.
        let s = spec(pool(1, None, None), pool(1, Some(5600), None));
        assert_eq!(
            collisions(&s, None)[0].first.unwrap().kind,
            PortKind::SideChannel
        );
    }

    proptest! {
        #[test]
        fn no_collision_reported_iff_all_ports_distinct(
            pr in 1u32..6, dr in 1u32..6,
            ph in 1000u16..1020, dh in 1000u16..1020,
            ps in 1000u16..1020, ds in 1000u16..1020,
            proxy in proptest::option::of(1000u16..1030),
        ) {
            let s = spec(pool(pr, Some(ph), Some(ps)), pool(dr, Some(dh), Some(ds)));
            let uses = all_ports(&s);
            prop_assert_eq!(uses.len() as u32, 2 * (pr + dr));
            let mut ports: Vec<u16> = uses.iter().map(|u| u.port).collect();
            ports.extend(proxy);
            let n = ports.len();
            ports.sort_unstable();
            ports.dedup();
            prop_assert_eq!(collisions(&s, proxy).is_empty(), ports.len() == n);
            for u in &uses {
                let (h, sc) = super::ports(&s, u.role, u.index);
                prop_assert_eq!(u.port, if u.kind == PortKind::Http { h } else { sc });
            }
        }
    }
}
