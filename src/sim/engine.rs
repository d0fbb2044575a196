//! The engine model, free of I/O: running slots, KV blocks, the prefix cache and the text a
//! request generates. The server holds one `Engine` behind a mutex and never awaits while
//! holding it.

use std::collections::{BTreeMap, HashMap};

/// Tokens are estimated as characters / 4 (at least 1): the same rule the proxy and llm-d's
/// scheduler use, so thresholds line up across the system.
pub fn estimate_tokens(text: &str) -> u32 {
    (text.chars().count() as u32).div_ceil(4).max(1)
}

/// A prompt containing this marker makes the first generated token EOS (unless `ignore_eos`):
/// the deterministic way to reach vLLM's "prefill ended on EOS → null kv_transfer_params".
pub const EOS_MARKER: &str = "[eos]";

#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    pub max_num_seqs: usize,
    pub block_size: u32,
    pub num_blocks: u32,
}

/// Why a request can never be admitted (as opposed to "not now": it waits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    pub blocks_needed: u32,
    pub num_blocks: u32,
}

pub struct Engine {
    limits: EngineLimits,
    running: usize,
    free_blocks: Vec<u32>,
    prefix: PrefixCache,
}

impl Engine {
    pub fn new(limits: EngineLimits) -> Self {
        Engine {
            limits,
            running: 0,
            // Popping from the end hands out low block ids first, which reads well in tests.
            free_blocks: (0..limits.num_blocks).rev().collect(),
            prefix: PrefixCache::new(limits.num_blocks as usize),
        }
    }

    pub fn blocks_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.limits.block_size).max(1)
    }

    pub fn check_fits(&self, tokens: u32) -> Result<(), TooLarge> {
        let blocks_needed = self.blocks_for(tokens);
        if blocks_needed > self.limits.num_blocks {
            return Err(TooLarge {
                blocks_needed,
                num_blocks: self.limits.num_blocks,
            });
        }
        Ok(())
    }

    /// Takes a running slot and the blocks for `tokens`, or returns None (the caller waits).
    pub fn try_admit(&mut self, tokens: u32) -> Option<Vec<u32>> {
        let needed = self.blocks_for(tokens) as usize;
        if self.running >= self.limits.max_num_seqs || self.free_blocks.len() < needed {
            return None;
        }
        self.running += 1;
        let at = self.free_blocks.len() - needed;
        Some(self.free_blocks.split_off(at))
    }

    /// Ends a running request's compute; its blocks may live on (a prefill awaiting its pull).
    pub fn finish_slot(&mut self) {
        self.running = self.running.saturating_sub(1);
    }

    pub fn free(&mut self, blocks: Vec<u32>) {
        self.free_blocks.extend(blocks);
    }

    pub fn running(&self) -> usize {
        self.running
    }

    pub fn kv_usage(&self) -> f64 {
        let total = self.limits.num_blocks as f64;
        (total - self.free_blocks.len() as f64) / total
    }

    /// Returns how many prompt tokens were already cached, and caches the prompt's full blocks.
    pub fn prefix_lookup_and_insert(&mut self, prompt: &str) -> u32 {
        let hashes = block_hashes(prompt, self.limits.block_size);
        let hits = self.prefix.lookup_and_insert(&hashes);
        hits as u32 * self.limits.block_size
    }
}

/// Chained hashes of the prompt's full blocks: block i's hash covers blocks 0..=i, like vLLM's.
fn block_hashes(prompt: &str, block_size: u32) -> Vec<u64> {
    let chars_per_block = block_size as usize * 4;
    let bytes = prompt.as_bytes();
    let mut hashes = Vec::with_capacity(bytes.len() / chars_per_block.max(1));
    let mut parent = 0xcbf2_9ce4_8422_2325u64;
    for chunk in bytes.chunks_exact(chars_per_block.max(1)) {
        parent = fnv1a(parent, chunk);
        hashes.push(parent);
    }
    hashes
}

pub fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// An LRU set of block hashes bounded by the KV cache size.
struct PrefixCache {
    capacity: usize,
    tick: u64,
    last_use: HashMap<u64, u64>,
    by_age: BTreeMap<u64, u64>,
}

impl PrefixCache {
    fn new(capacity: usize) -> Self {
        PrefixCache {
            capacity,
            tick: 0,
            last_use: HashMap::new(),
            by_age: BTreeMap::new(),
        }
    }

    fn lookup_and_insert(&mut self, hashes: &[u64]) -> usize {
        let hits = hashes
            .iter()
            .take_while(|h| self.last_use.contains_key(h))
            .count();
        for &hash in hashes {
            self.touch(hash);
        }
        hits
    }

    fn touch(&mut self, hash: u64) {
        self.tick += 1;
        if let Some(old) = self.last_use.insert(hash, self.tick) {
            self.by_age.remove(&old);
        } else if self.last_use.len() > self.capacity {
            if let Some((_, oldest)) = self.by_age.pop_first() {
                self.last_use.remove(&oldest);
            }
        }
        self.by_age.insert(self.tick, hash);
    }
}

/// Deterministic text: the same seed and prompt always give the same words (one token each,
/// with its leading space, as BPE tokens come).
pub struct TextGen {
    state: u64,
}

const WORDS: &[&str] = &[
    " the", " model", " prefill", " decode", " cache", " block", " token", " stream", " fast",
    " quiet", " river", " stone", " light", " paper", " north", " garden", " signal", " window",
    " orbit", " amber", " copper", " field", " harbor", " lantern", " meadow", " pixel", " quartz",
    " ribbon", " summit", " timber", " velvet", " willow",
];

impl TextGen {
    pub fn new(seed: u64, prompt: &str) -> Self {
        TextGen {
            state: fnv1a(seed ^ 0x9e37_79b9_7f4a_7c15, prompt.as_bytes()),
        }
    }

    pub fn next_token(&mut self) -> &'static str {
        WORDS[(splitmix64(&mut self.state) % WORDS.len() as u64) as usize]
    }
}

pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(max_num_seqs: usize, num_blocks: u32) -> Engine {
        Engine::new(EngineLimits {
            max_num_seqs,
            block_size: 4,
            num_blocks,
        })
    }

    #[test]
    fn tokens_are_chars_over_four_rounded_up() {
        assert_eq!(estimate_tokens(""), 1);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(estimate_tokens(&"x".repeat(400)), 100);
    }

    #[test]
    fn admission_is_bounded_by_slots_and_blocks() {
        let mut e = engine(2, 4);
        let a = e.try_admit(8).expect("2 blocks");
        assert_eq!(a, vec![1, 0]);
        assert!(e.try_admit(12).is_none(), "3 blocks needed, 2 free");
        let b = e.try_admit(5).expect("2 blocks");
        assert!(e.try_admit(1).is_none(), "no slot left");
        assert_eq!(e.running(), 2);
        assert_eq!(e.kv_usage(), 1.0);
        e.finish_slot();
        e.free(a);
        assert_eq!(e.kv_usage(), 0.5);
        assert!(e.try_admit(4).is_some());
        e.free(b);
    }

    #[test]
    fn blocks_outlive_the_slot_until_freed() {
        let mut e = engine(1, 8);
        let held = e.try_admit(16).unwrap();
        e.finish_slot();
        assert_eq!(e.running(), 0);
        assert_eq!(e.kv_usage(), 0.5);
        e.free(held);
        assert_eq!(e.kv_usage(), 0.0);
    }

    #[test]
    fn oversized_requests_are_rejected_up_front() {
        let e = engine(1, 2);
        assert_eq!(
            e.check_fits(9),
            Err(TooLarge {
                blocks_needed: 3,
                num_blocks: 2
            })
        );
        assert!(e.check_fits(8).is_ok());
    }

    #[test]
    fn prefix_cache_counts_leading_full_blocks() {
        let mut e = engine(4, 64);
        // block_size 4 tokens = 16 chars per block.
        let shared = "a".repeat(32);
        assert_eq!(e.prefix_lookup_and_insert(&format!("{shared}first")), 0);
        assert_eq!(
            e.prefix_lookup_and_insert(&format!("{shared}second one here!")),
            8
        );
        assert_eq!(
            e.prefix_lookup_and_insert("b"),
            0,
            "partial blocks never hit"
        );
    }

    #[test]
    fn prefix_cache_evicts_least_recently_used() {
        let mut cache = PrefixCache::new(2);
        cache.lookup_and_insert(&[1]);
        cache.lookup_and_insert(&[2]);
        cache.lookup_and_insert(&[1]);
        cache.lookup_and_insert(&[3]);
        assert_eq!(cache.lookup_and_insert(&[2]), 0, "2 was the oldest");
        assert!(cache.last_use.len() <= 3);
    }

    #[test]
    fn text_is_deterministic_per_seed_and_prompt() {
        let take = |seed, prompt| {
            let mut g = TextGen::new(seed, prompt);
            (0..8).map(|_| g.next_token()).collect::<Vec<_>>()
        };
        assert_eq!(take(1, "hi"), take(1, "hi"));
        assert_ne!(take(1, "hi"), take(2, "hi"));
        assert_ne!(take(1, "hi"), take(1, "ho"));
    }
}
