//! Which GPUs each replica gets: distinct GPUs, none shared, tensor-parallel groups on
//! NVLink-connected (else same-NUMA) GPUs when topology is known, deterministic.
//!
//! Decode is placed first, from the highest GPU down; then prefill, from the lowest up; each
//! in index order. So a decode replica's GPUs depend only on the decode replicas before it, and
//! a prefill replica's on the decodes and the prefills before it: scaling prefill never moves
//! (and so never restarts) anything else, and scaling decode moves no other decode. Without
//! topology it moves no prefill either, as long as the two ends do not meet.

use crate::gpu::GpuInfo;
use crate::plan::model::Role;

/// One replica's demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub role: Role,
    pub index: u32,
    pub count: u32,
}

/// The demand does not fit; `need` and `have` are GPU counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub need: u32,
    pub have: u32,
}

/// For each request (same order), positions into `gpus`.
pub fn place(requests: &[Request], gpus: &[GpuInfo]) -> Result<Vec<Vec<usize>>, Shortfall> {
    let need: u32 = requests.iter().map(|r| r.count).sum();
    if need as usize > gpus.len() {
        return Err(Shortfall {
            need,
            have: gpus.len() as u32,
        });
    }
    let mut free = vec![true; gpus.len()];
    let mut out = vec![Vec::new(); requests.len()];
    for role in [Role::Decode, Role::Prefill] {
        let mut mine: Vec<usize> = (0..requests.len())
            .filter(|&i| requests[i].role == role)
            .collect();
        mine.sort_by_key(|&i| requests[i].index);
        for i in mine {
            let group = pick(
                requests[i].count as usize,
                &free,
                gpus,
                role == Role::Decode,
            );
            for &g in &group {
                free[g] = false;
            }
            out[i] = group;
        }
    }
    Ok(out)
}

fn linked(gpus: &[GpuInfo], a: usize, b: usize) -> bool {
    gpus[a].nvlink_peers.contains(&gpus[b].index) || gpus[b].nvlink_peers.contains(&gpus[a].index)
}

/// Caller guarantees at least `k` free GPUs. `from_top` searches from the highest position.
fn pick(k: usize, free: &[bool], gpus: &[GpuInfo], from_top: bool) -> Vec<usize> {
    let mut avail: Vec<usize> = (0..gpus.len()).filter(|&i| free[i]).collect();
    if from_top {
        avail.reverse();
    }
    let done = |mut g: Vec<usize>| {
        g.sort_unstable();
        g
    };
    if k <= 1 {
        return avail.into_iter().take(k).collect();
    }
    for &seed in &avail {
        let mut group = vec![seed];
        for &c in &avail {
            if group.len() == k {
                break;
            }
            if c != seed && group.iter().all(|&g| linked(gpus, g, c)) {
                group.push(c);
            }
        }
        if group.len() == k {
            return done(group);
        }
    }
    let mut by_numa: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for &i in &avail {
        if let Some(n) = gpus[i].numa_node {
            by_numa.entry(n).or_default().push(i);
        }
    }
    if let Some(same) = by_numa.values().find(|v| v.len() >= k) {
        return done(same[..k].to_vec());
    }
    done(avail[..k].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gpu(index: u32, numa: Option<u32>, peers: &[u32]) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-{index}"),
            name: "H100".into(),
            memory_bytes: 0,
            pci_bus_id: None,
            numa_node: numa,
            nvlink_peers: peers.to_vec(),
        }
    }

    fn req(role: Role, index: u32, count: u32) -> Request {
        Request { role, index, count }
    }

    #[test]
    fn tp_groups_land_on_nvlink_pairs() {
        // 0-2 and 1-3 are linked pairs; a TP2 group must not take 2 and 3.
        let g = vec![
            gpu(0, None, &[2]),
            gpu(1, None, &[3]),
            gpu(2, None, &[0]),
            gpu(3, None, &[1]),
        ];
        let reqs = [req(Role::Prefill, 0, 1), req(Role::Decode, 0, 2)];
        let p = place(&reqs, &g).unwrap();
        assert_eq!(p[1], vec![1, 3]);
        assert_eq!(p[0], vec![0]);
    }

    #[test]
    fn tp_groups_fall_back_to_one_numa_node() {
        let g = vec![
            gpu(0, Some(0), &[]),
            gpu(1, Some(1), &[]),
            gpu(2, Some(1), &[]),
        ];
        let p = place(&[req(Role::Decode, 0, 2)], &g).unwrap();
        assert_eq!(p[0], vec![1, 2]);
    }

    #[test]
    fn shortfall_counts_everything() {
        let g: Vec<_> = (0..4).map(|i| gpu(i, None, &[])).collect();
        let reqs = [
            req(Role::Prefill, 0, 1),
            req(Role::Prefill, 1, 1),
            req(Role::Decode, 0, 2),
            req(Role::Decode, 1, 2),
        ];
        assert_eq!(place(&reqs, &g), Err(Shortfall { need: 6, have: 4 }));
    }

    fn topology() -> impl Strategy<Value = Vec<GpuInfo>> {
        (0usize..10).prop_flat_map(|n| {
            (
                proptest::collection::vec(proptest::option::of(0u32..2), n),
                proptest::collection::vec(proptest::collection::vec(0u32..10, 0..4), n),
            )
                .prop_map(move |(numa, peers)| {
                    (0..n)
                        .map(|i| {
                            let p: Vec<u32> = peers[i]
                                .iter()
                                .copied()
                                .filter(|&p| (p as usize) < n)
                                .collect();
                            gpu(
                                i as u32 * 2,
                                numa[i],
                                &p.iter().map(|p| p * 2).collect::<Vec<_>>(),
                            )
                        })
                        .collect()
                })
        })
    }

    proptest! {
        #[test]
        fn placement_is_exact_disjoint_and_deterministic(
            gpus in topology(),
            counts in proptest::collection::vec(0u32..4, 0..6),
        ) {
            let reqs: Vec<Request> = counts.iter().enumerate()
                .map(|(i, &c)| req(if i % 2 == 0 { Role::Prefill } else { Role::Decode }, i as u32, c))
                .collect();
            let need: u32 = counts.iter().sum();
            match place(&reqs, &gpus) {
                Ok(p) => {
                    prop_assert!(need as usize <= gpus.len());
                    let mut all: Vec<usize> = p.iter().flatten().copied().collect();
                    for (r, g) in reqs.iter().zip(&p) {
                        prop_assert_eq!(g.len(), r.count as usize);
                    }
                    let n = all.len();
                    all.sort_unstable();
                    all.dedup();
                    prop_assert_eq!(all.len(), n, "a GPU was given twice");
                    prop_assert!(all.iter().all(|&i| i < gpus.len()));
                    prop_assert_eq!(place(&reqs, &gpus).unwrap(), p.clone());
                    let no_topology = gpus.iter().all(|g| g.numa_node.is_none() && g.nvlink_peers.is_empty());
                    for role in [Role::Prefill, Role::Decode] {
                        // Scaling a role down by one leaves the rest where it was.
                        let Some(last) = reqs.iter().rposition(|r| r.role == role) else { continue };
                        let mut fewer = reqs.clone();
                        fewer.remove(last);
                        let mut expect = p.clone();
                        expect.remove(last);
                        let got = place(&fewer, &gpus).unwrap();
                        for (i, r) in fewer.iter().enumerate() {
                            if r.role == Role::Decode || role == Role::Prefill || no_topology {
                                prop_assert_eq!(&got[i], &expect[i]);
                            }
                        }
                    }
                }
                Err(s) => {
                    prop_assert_eq!(s, Shortfall { need, have: gpus.len() as u32 });
                    prop_assert!(need as usize > gpus.len());
                }
            }
        }
    }
}
