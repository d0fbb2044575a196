//! Endpoint picking. Each endpoint carries live counters (in-flight requests, scraped load); a
//! pick is a pure function of those numbers and the policy, so it is unit-testable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use prometheus_client::metrics::gauge::Gauge;

use crate::spec::proxy::PickPolicy;
use crate::spec::Role;

use super::endpoints::{Endpoint, EndpointSet};
use super::rewrite::fnv1a;

#[derive(Debug)]
pub struct Upstream {
    pub endpoint: Endpoint,
    /// `host:port` of the URL, for matching `x-prefiller-host-port` and building URIs.
    pub authority: String,
    pub in_flight: AtomicUsize,
    /// `vllm:num_requests_waiting`, scraped.
    pub waiting: AtomicU64,
    /// `vllm:kv_cache_usage_perc` × 10⁶, scraped.
    pub kv_usage_micros: AtomicU64,
    /// This endpoint's in-flight gauge, looked up once rather than on every request.
    pub gauge: OnceLock<Gauge>,
}

impl Upstream {
    pub fn new(endpoint: Endpoint) -> Self {
        let authority = authority_of(&endpoint.url);
        Upstream {
            endpoint,
            authority,
            in_flight: AtomicUsize::new(0),
            waiting: AtomicU64::new(0),
            kv_usage_micros: AtomicU64::new(0),
            gauge: OnceLock::new(),
        }
    }

    fn load_score(&self) -> u64 {
        // Waiting requests dominate; KV pressure and our own in-flight count break ties.
        self.waiting.load(Relaxed) * 1_000_000
            + self.kv_usage_micros.load(Relaxed)
            + self.in_flight.load(Relaxed) as u64 * 1_000
    }
}

/// `http://127.0.0.1:8100/` → `127.0.0.1:8100` (default port 80 when absent).
pub fn authority_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap_or(rest);
    let has_port = match host_port.rfind(']') {
        Some(bracket) => host_port[bracket..].contains(':'),
        None => host_port.contains(':'),
    };
    if has_port {
        host_port.to_string()
    } else {
        format!("{host_port}:80")
    }
}

/// The ready endpoints of both roles, rebuilt when the set changes; counters survive a rebuild
/// for endpoints that stay.
#[derive(Debug, Default)]
pub struct Pools {
    pub prefill: Vec<Arc<Upstream>>,
    pub decode: Vec<Arc<Upstream>>,
}

impl Pools {
    pub fn rebuild(set: &EndpointSet, previous: &Pools) -> Pools {
        let mut known: HashMap<&str, &Arc<Upstream>> = HashMap::new();
        for u in previous.prefill.iter().chain(&previous.decode) {
            known.insert(u.endpoint.url.as_str(), u);
        }
        let build = |eps: &[Endpoint]| -> Vec<Arc<Upstream>> {
            eps.iter()
                .map(|e| match known.get(e.url.as_str()) {
                    Some(u) if u.endpoint == *e => Arc::clone(u),
                    _ => Arc::new(Upstream::new(e.clone())),
                })
                .collect()
        };
        Pools {
            prefill: build(&set.prefill),
            decode: build(&set.decode),
        }
    }

    pub fn of(&self, role: Role) -> &[Arc<Upstream>] {
        match role {
            Role::Prefill => &self.prefill,
            Role::Decode => &self.decode,
        }
    }
}

/// Round-robin cursors, one per role (shared across rebuilds).
#[derive(Debug, Default)]
pub struct Cursors {
    prefill: AtomicUsize,
    decode: AtomicUsize,
}

impl Cursors {
    fn next(&self, role: Role) -> usize {
        match role {
            Role::Prefill => self.prefill.fetch_add(1, Relaxed),
            Role::Decode => self.decode.fetch_add(1, Relaxed),
        }
    }
}

/// Picks an endpoint of `candidates` not in `exclude`. `prefix` feeds prefix affinity (a request
/// without one falls back to least-outstanding).
pub fn pick(
    policy: PickPolicy,
    role: Role,
    candidates: &[Arc<Upstream>],
    exclude: &[&str],
    cursors: &Cursors,
    prefix: Option<u64>,
) -> Option<Arc<Upstream>> {
    let eligible = |u: &&Arc<Upstream>| !exclude.contains(&u.endpoint.url.as_str());
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    let start = cursors.next(role) % n;
    // Rotated so that ties go round-robin instead of always to the first endpoint.
    let mut rotated = candidates[start..].iter().chain(&candidates[..start]);
    let chosen = match (policy, prefix) {
        (PickPolicy::RoundRobin, _) => rotated.find(eligible),
        (PickPolicy::LeastOutstanding, _) | (PickPolicy::PrefixAffinity, None) => rotated
            .filter(eligible)
            .min_by_key(|u| u.in_flight.load(Relaxed)),
        (PickPolicy::LoadAware, _) => rotated.filter(eligible).min_by_key(|u| u.load_score()),
        // Rendezvous hashing: a prefix keeps its endpoint while the set changes around it.
        (PickPolicy::PrefixAffinity, Some(key)) => {
            candidates.iter().filter(eligible).max_by_key(|u| {
                fnv1a(
                    &[
                        key.to_le_bytes(),
                        fnv1a(u.endpoint.url.as_bytes()).to_le_bytes(),
                    ]
                    .concat(),
                )
            })
        }
    };
    chosen.cloned()
}

/// Counts a request against an endpoint (and its gauge, once set) for as long as it lives.
pub struct InFlight {
    pub upstream: Arc<Upstream>,
}

impl InFlight {
    pub fn new(upstream: Arc<Upstream>) -> Self {
        upstream.in_flight.fetch_add(1, Relaxed);
        if let Some(gauge) = upstream.gauge.get() {
            gauge.inc();
        }
        InFlight { upstream }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.in_flight.fetch_sub(1, Relaxed);
        if let Some(gauge) = self.upstream.gauge.get() {
            gauge.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ups(n: usize) -> Vec<Arc<Upstream>> {
        (0..n)
            .map(|i| {
                Arc::new(Upstream::new(Endpoint {
                    id: format!("e{i}"),
                    url: format!("http://127.0.0.1:{}", 8000 + i),
                }))
            })
            .collect()
    }

    fn pick_url(policy: PickPolicy, c: &[Arc<Upstream>], cur: &Cursors, ex: &[&str]) -> String {
        pick(policy, Role::Decode, c, ex, cur, None)
            .unwrap()
            .endpoint
            .url
            .clone()
    }

    #[test]
    fn round_robin_cycles_and_skips_excluded() {
        let c = ups(3);
        let cur = Cursors::default();
        let got: Vec<String> = (0..4)
            .map(|_| pick_url(PickPolicy::RoundRobin, &c, &cur, &[]))
            .collect();
        assert_eq!(got[0], got[3]);
        assert_ne!(got[0], got[1]);
        assert_ne!(got[1], got[2]);
        for _ in 0..5 {
            assert_ne!(
                pick_url(PickPolicy::RoundRobin, &c, &cur, &["http://127.0.0.1:8001"]),
                "http://127.0.0.1:8001"
            );
        }
        let all: Vec<&str> = c.iter().map(|u| u.endpoint.url.as_str()).collect();
        assert!(pick(PickPolicy::RoundRobin, Role::Decode, &c, &all, &cur, None).is_none());
        assert!(pick(PickPolicy::RoundRobin, Role::Decode, &[], &[], &cur, None).is_none());
    }

    #[test]
    fn least_outstanding_follows_the_guards() {
        let c = ups(2);
        let cur = Cursors::default();
        let g = InFlight::new(c[0].clone());
        for _ in 0..3 {
            assert_eq!(
                pick_url(PickPolicy::LeastOutstanding, &c, &cur, &[]),
                c[1].endpoint.url
            );
        }
        let g2 = InFlight::new(c[1].clone());
        let _g3 = InFlight::new(c[1].clone());
        assert_eq!(
            pick_url(PickPolicy::LeastOutstanding, &c, &cur, &[]),
            c[0].endpoint.url
        );
        drop((g, g2));
        assert_eq!(c[0].in_flight.load(Relaxed), 0);
        assert_eq!(c[1].in_flight.load(Relaxed), 1);
    }

    #[test]
    fn load_aware_prefers_fewer_waiting_then_less_kv() {
        let c = ups(3);
        let cur = Cursors::default();
        c[0].waiting.store(3, Relaxed);
        c[1].kv_usage_micros.store(900_000, Relaxed);
        c[2].kv_usage_micros.store(100_000, Relaxed);
        assert_eq!(
            pick_url(PickPolicy::LoadAware, &c, &cur, &[]),
            c[2].endpoint.url
        );
    }

    #[test]
    fn prefix_affinity_is_sticky_and_survives_membership_changes() {
        let c = ups(4);
        let cur = Cursors::default();
        let chosen = |c: &[Arc<Upstream>], key| {
            pick(
                PickPolicy::PrefixAffinity,
                Role::Decode,
                c,
                &[],
                &cur,
                Some(key),
            )
            .unwrap()
            .endpoint
            .url
            .clone()
        };
        let keys: Vec<u64> = (0..64).collect();
        let before: Vec<String> = keys.iter().map(|k| chosen(&c, *k)).collect();
        assert_eq!(
            before,
            keys.iter().map(|k| chosen(&c, *k)).collect::<Vec<_>>()
        );
        let spread: std::collections::HashSet<_> = before.iter().collect();
        assert!(spread.len() >= 3, "keys spread over endpoints");
        // Removing one endpoint moves only the keys that were on it.
        let removed = c[3].endpoint.url.clone();
        for (k, was) in keys.iter().zip(&before) {
            if *was != removed {
                assert_eq!(&chosen(&c[..3], *k), was);
            }
        }
    }

    #[test]
    fn rebuild_keeps_counters_of_endpoints_that_stay() {
        let set = |urls: &[&str]| EndpointSet {
            prefill: vec![],
            decode: urls
                .iter()
                .map(|u| Endpoint {
                    id: u.to_string(),
                    url: u.to_string(),
                })
                .collect(),
        };
        let first = Pools::rebuild(&set(&["http://a:1", "http://b:2"]), &Pools::default());
        let _g = InFlight::new(first.decode[1].clone());
        let second = Pools::rebuild(&set(&["http://b:2", "http://c:3"]), &first);
        assert_eq!(second.decode[0].in_flight.load(Relaxed), 1);
        assert_eq!(second.decode[1].in_flight.load(Relaxed), 0);
    }

    #[test]
    fn authorities() {
        assert_eq!(authority_of("http://127.0.0.1:8100"), "127.0.0.1:8100");
        assert_eq!(authority_of("http://host:8100/v1"), "host:8100");
        assert_eq!(authority_of("http://host"), "host:80");
        assert_eq!(authority_of("http://[::1]:8000"), "[::1]:8000");
        assert_eq!(authority_of("http://[::1]"), "[::1]:80");
    }
}
