//! Choosing an endpoint: round-robin, least-outstanding, load-aware and prefix affinity, over a
//! snapshot of the ready endpoints. In-flight counts are held by RAII guards, so a request that
//! is cancelled anywhere (client gone, timeout) gives its slot back.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use prometheus_client::metrics::gauge::Gauge;

use super::endpoints::{Endpoint, EndpointSet};
use super::metrics::{EndpointLabels, Metrics};
use crate::spec::proxy::PickPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

/// One upstream engine with its live counters.
#[derive(Debug)]
pub struct Backend {
    pub id: String,
    pub url: String,
    scheme: Scheme,
    pub authority: Authority,
    /// Path prefix of the base URL without the trailing slash (usually empty).
    prefix: String,
    inflight: AtomicUsize,
    gauge: Gauge,
    /// f64 bits, written by the load scraper.
    waiting: AtomicU64,
    kv_usage: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
#[error("endpoint URL {url:?} is not an absolute http:// URL")]
pub struct BadUrl {
    pub url: String,
}

impl Backend {
    pub fn new(ep: &Endpoint, gauge: Gauge) -> Result<Backend, BadUrl> {
        let bad = || BadUrl {
            url: ep.url.clone(),
        };
        let uri: Uri = ep.url.parse().map_err(|_| bad())?;
        let scheme = uri.scheme().cloned().ok_or_else(bad)?;
        if scheme != Scheme::HTTP {
            return Err(bad());
        }
        let authority = uri.authority().cloned().ok_or_else(bad)?;
        Ok(Backend {
            id: ep.id.clone(),
            url: ep.url.clone(),
            scheme,
            authority,
            prefix: uri.path().trim_end_matches('/').to_string(),
            inflight: AtomicUsize::new(0),
            gauge,
            waiting: AtomicU64::new(0f64.to_bits()),
            kv_usage: AtomicU64::new(0f64.to_bits()),
        })
    }

    /// The upstream URI for a client's path and query.
    pub fn uri(&self, pq: &PathAndQuery) -> Uri {
        let pq = if self.prefix.is_empty() {
            pq.clone()
        } else {
            let joined = format!("{}{}", self.prefix, pq.as_str());
            joined.parse().unwrap_or_else(|_| pq.clone())
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .expect("scheme, authority and path are valid")
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn set_load(&self, waiting: f64, kv_usage: f64) {
        self.waiting.store(waiting.to_bits(), Ordering::Relaxed);
        self.kv_usage.store(kv_usage.to_bits(), Ordering::Relaxed);
    }

    fn load_score(&self) -> f64 {
        let waiting = f64::from_bits(self.waiting.load(Ordering::Relaxed));
        let kv = f64::from_bits(self.kv_usage.load(Ordering::Relaxed));
        // Queued requests dominate; KV usage (0..1) breaks ties between equally queued engines.
        waiting + self.inflight() as f64 + kv
    }
}

/// Counts one in-flight request on a backend until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn new(b: &Arc<Backend>) -> InFlight {
        b.inflight.fetch_add(1, Ordering::Relaxed);
        b.gauge.inc();
        InFlight(b.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        self.0.gauge.dec();
    }
}

/// The ready backends of one role.
#[derive(Debug, Default)]
pub struct Pool {
    pub backends: Vec<Arc<Backend>>,
    cursor: AtomicUsize,
}

impl Pool {
    pub fn new(backends: Vec<Arc<Backend>>) -> Pool {
        Pool {
            backends,
            cursor: AtomicUsize::new(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    pub fn find_authority(&self, hostport: &str) -> Option<&Arc<Backend>> {
        self.backends
            .iter()
            .find(|b| b.authority.as_str().eq_ignore_ascii_case(hostport))
    }

    /// Picks a backend not in `exclude`; `affinity` is the prompt-prefix hash.
    pub fn pick(
        &self,
        policy: PickPolicy,
        affinity: u64,
        exclude: &[&Arc<Backend>],
    ) -> Option<Arc<Backend>> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let ok = |b: &&Arc<Backend>| !exclude.iter().any(|e| Arc::ptr_eq(e, b));
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let mut rotated = (0..n).map(|i| &self.backends[(start + i) % n]);
        let chosen = match policy {
            PickPolicy::RoundRobin => rotated.find(ok),
            // Rotating the start spreads ties evenly instead of piling onto the first backend.
            PickPolicy::LeastOutstanding => rotated.filter(ok).min_by_key(|b| b.inflight()),
            PickPolicy::LoadAware => rotated
                .filter(ok)
                .min_by(|a, b| a.load_score().total_cmp(&b.load_score())),
            // Rendezvous hashing: stable under endpoints joining or leaving.
            PickPolicy::PrefixAffinity => self.backends.iter().filter(ok).max_by_key(|b| {
                let mut h = std::hash::DefaultHasher::new();
                affinity.hash(&mut h);
                b.id.hash(&mut h);
                h.finish()
            }),
        };
        chosen.cloned()
    }
}

/// What requests route over: rebuilt whenever the endpoint set changes.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub prefill: Pool,
    pub decode: Pool,
}

impl Snapshot {
    /// Keeps the `Backend` (and so its counters) of every endpoint that is still there.
    /// Endpoints with a bad URL are skipped and returned for logging.
    pub fn build(set: &EndpointSet, prev: &Snapshot, metrics: &Metrics) -> (Snapshot, Vec<BadUrl>) {
        let mut bad = Vec::new();
        let mut pool = |role: Role, eps: &[Endpoint], old: &Pool| {
            let by_key: HashMap<(&str, &str), &Arc<Backend>> = old
                .backends
                .iter()
                .map(|b| ((b.id.as_str(), b.url.as_str()), b))
                .collect();
            let mut out = Vec::with_capacity(eps.len());
            for ep in eps {
                if let Some(b) = by_key.get(&(ep.id.as_str(), ep.url.as_str())) {
                    out.push(Arc::clone(b));
                    continue;
                }
                let gauge = metrics
                    .inflight
                    .get_or_create(&EndpointLabels {
                        role: role.label(),
                        endpoint: ep.id.clone(),
                    })
                    .clone();
                match Backend::new(ep, gauge) {
                    Ok(b) => out.push(Arc::new(b)),
                    Err(e) => bad.push(e),
                }
            }
            Pool::new(out)
        };
        let snap = Snapshot {
            prefill: pool(Role::Prefill, &set.prefill, &prev.prefill),
            decode: pool(Role::Decode, &set.decode, &prev.decode),
        };
        (snap, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: &str) -> Endpoint {
        Endpoint {
            id: id.into(),
            url: format!("http://127.0.0.1:{}", 8000 + id.len()),
        }
    }

    fn pool(ids: &[&str]) -> Pool {
        Pool::new(
            ids.iter()
                .map(|i| Arc::new(Backend::new(&ep(i), Gauge::default()).unwrap()))
                .collect(),
        )
    }

    fn ids(p: &Pool, policy: PickPolicy, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| p.pick(policy, 0, &[]).unwrap().id.clone())
            .collect()
    }

    #[test]
    fn round_robin_cycles() {
        let p = pool(&["a", "bb", "ccc"]);
        assert_eq!(ids(&p, PickPolicy::RoundRobin, 4), ["a", "bb", "ccc", "a"]);
    }

    #[test]
    fn least_outstanding_follows_guards() {
        let p = pool(&["a", "bb"]);
        let g = InFlight::new(&p.backends[0]);
        assert_eq!(ids(&p, PickPolicy::LeastOutstanding, 3), ["bb", "bb", "bb"]);
        drop(g);
        assert_eq!(p.backends[0].inflight(), 0);
        let both = ids(&p, PickPolicy::LeastOutstanding, 2);
        assert!(both.contains(&"a".to_string()) && both.contains(&"bb".to_string()));
    }

    #[test]
    fn load_aware_prefers_short_queues() {
        let p = pool(&["a", "bb"]);
        p.backends[0].set_load(5.0, 0.1);
        p.backends[1].set_load(0.0, 0.9);
        assert_eq!(ids(&p, PickPolicy::LoadAware, 3), ["bb", "bb", "bb"]);
        p.backends[1].set_load(0.0, 0.9);
        p.backends[0].set_load(0.0, 0.2);
        assert_eq!(ids(&p, PickPolicy::LoadAware, 2), ["a", "a"]);
    }

    #[test]
    fn prefix_affinity_is_stable_and_spreads() {
        let p = pool(&["a", "bb", "ccc", "dddd"]);
        let pick = |k| {
            p.pick(PickPolicy::PrefixAffinity, k, &[])
                .unwrap()
                .id
                .clone()
        };
        assert_eq!(pick(42), pick(42));
        let distinct: std::collections::HashSet<_> = (0..64).map(pick).collect();
        assert!(distinct.len() > 1);
        // Removing an unrelated backend keeps the choice.
        let chosen = pick(7);
        let all = ["a", "bb", "ccc", "dddd"];
        let other = all.into_iter().find(|i| *i != chosen).unwrap();
        let rest: Vec<&str> = all.into_iter().filter(|i| *i != other).collect();
        let q = pool(&rest);
        assert_eq!(
            q.pick(PickPolicy::PrefixAffinity, 7, &[]).unwrap().id,
            chosen
        );
    }

    #[test]
    fn exclusion_and_empty() {
        let p = pool(&["a", "bb"]);
        let a = p.backends[0].clone();
        for policy in [
            PickPolicy::RoundRobin,
            PickPolicy::LeastOutstanding,
            PickPolicy::LoadAware,
            PickPolicy::PrefixAffinity,
        ] {
            assert_eq!(p.pick(policy, 1, &[&a]).unwrap().id, "bb");
            assert!(p.pick(policy, 1, &[&a, &p.backends[1]]).is_none());
        }
        assert!(Pool::default()
            .pick(PickPolicy::RoundRobin, 0, &[])
            .is_none());
    }

    #[test]
    fn snapshot_keeps_counters_of_surviving_endpoints() {
        let m = Metrics::default();
        let set = EndpointSet {
            prefill: vec![ep("a")],
            decode: vec![
                ep("bb"),
                Endpoint {
                    id: "x".into(),
                    url: "ftp://nope".into(),
                },
            ],
        };
        let (s1, bad) = Snapshot::build(&set, &Snapshot::default(), &m);
        assert_eq!(bad.len(), 1);
        let _g = InFlight::new(&s1.prefill.backends[0]);
        let (s2, _) = Snapshot::build(&set, &s1, &m);
        assert_eq!(s2.prefill.backends[0].inflight(), 1);
        assert!(Arc::ptr_eq(&s1.decode.backends[0], &s2.decode.backends[0]));
    }

    #[test]
    fn uri_joins_prefix() {
        let b = Backend::new(
            &Endpoint {
                id: "p".into(),
                url: "http://h:1/base/".into(),
            },
            Gauge::default(),
        )
        .unwrap();
        assert_eq!(
            b.uri(&"/v1/models?x=1".parse().unwrap()).to_string(),
            "http://h:1/base/v1/models?x=1"
        );
        let b = Backend::new(&ep("a"), Gauge::default()).unwrap();
        assert_eq!(
            b.uri(&"/v1/models".parse().unwrap()).to_string(),
            "http://127.0.0.1:8001/v1/models"
        );
    }
}
