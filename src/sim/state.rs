//! State shared by the HTTP server and the KV side channel of one simulated engine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::args::SimConfig;
use super::engine::{fnv1a, Engine, EngineLimits};
use super::metrics::{Gauges, Metrics};

/// A prefilled request whose KV blocks wait for the decode's pull.
pub struct Pending {
    pub blocks: Vec<u32>,
    pub num_tokens: u32,
    pub expires: Instant,
}

pub struct Shared {
    pub cfg: SimConfig,
    pub engine: Mutex<Engine>,
    /// Woken whenever a slot or blocks are given back.
    pub freed: Notify,
    pub waiting: AtomicUsize,
    pub pending: Mutex<HashMap<String, Pending>>,
    pub metrics: Metrics,
    /// Stable per (seed, side channel): a restarted engine keeps its id, another engine differs.
    pub engine_id: String,
    pub started: Instant,
    pub answered: AtomicU64,
    next_request: AtomicU64,
}

impl Shared {
    pub fn new(cfg: SimConfig) -> Arc<Self> {
        let engine = Engine::new(EngineLimits {
            max_num_seqs: cfg.max_num_seqs,
            block_size: cfg.block_size,
            num_blocks: cfg.num_blocks,
        });
        let id = fnv1a(
            cfg.seed,
            format!("{}:{}", cfg.side_channel_host, cfg.side_channel_port).as_bytes(),
        );
        Arc::new(Shared {
            engine_id: format!("sim-{id:016x}"),
            engine: Mutex::new(engine),
            freed: Notify::new(),
            waiting: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            started: Instant::now(),
            answered: AtomicU64::new(0),
            next_request: AtomicU64::new(0),
            cfg,
        })
    }

    pub fn next_request_number(&self) -> u64 {
        self.next_request.fetch_add(1, Relaxed)
    }

    pub fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        // A panic while holding the lock leaves plain counters behind; keep serving.
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn free_blocks(&self, blocks: Vec<u32>) {
        self.engine().free(blocks);
        self.freed.notify_waiters();
    }

    pub fn ready(&self) -> bool {
        self.started.elapsed() >= self.cfg.startup_delay
    }

    pub fn health_hung(&self) -> bool {
        self.cfg
            .hang_health_after
            .is_some_and(|after| self.started.elapsed() >= self.cfg.startup_delay + after)
    }

    pub fn gauges(&self) -> Gauges {
        let (running, kv_usage) = {
            let engine = self.engine();
            (engine.running(), engine.kv_usage())
        };
        Gauges {
            running,
            waiting: self.waiting.load(Relaxed),
            kv_usage,
            pending_transfers: self.pending().len(),
        }
    }

    /// Frees the blocks of prefills nobody pulled in time (vLLM's abort timeout).
    pub fn expire_pending(&self, now: Instant) {
        let expired: Vec<Pending> = {
            let mut pending = self.pending();
            let ids: Vec<String> = pending
                .iter()
                .filter(|(_, p)| p.expires <= now)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| pending.remove(id)).collect()
        };
        for p in expired {
            self.metrics.kv_blocks_expired.fetch_add(1, Relaxed);
            self.free_blocks(p.blocks);
        }
    }

    pub fn sweep_interval(&self) -> Duration {
        (self.cfg.kv_abort_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}
