//! The global bound on request bodies being buffered (`[proxy] max_buffered_body_bytes`): the
//! per-request `max_body_bytes` alone lets many slow uploads pin memory together. One atomic add
//! per request (per frame for bodies without `Content-Length`), no lock, no allocation.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub struct BodyBudget {
    used: AtomicU64,
    limit: u64,
}

impl BodyBudget {
    pub fn new(limit: u64) -> BodyBudget {
        BodyBudget {
            used: AtomicU64::new(0),
            limit,
        }
    }

    /// An empty reservation; give it back by dropping it.
    pub fn reserve(&self) -> Reservation<'_> {
        Reservation {
            budget: self,
            bytes: 0,
        }
    }

    #[cfg(test)]
    fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }
}

/// Bytes of the budget held for one request's body, released on drop (also when the client goes
/// away mid-upload and its future is dropped).
pub struct Reservation<'a> {
    budget: &'a BodyBudget,
    bytes: u64,
}

impl Reservation<'_> {
    /// Holds `more` bytes too; false (holding nothing more) when that would pass the budget.
    pub fn grow(&mut self, more: u64) -> bool {
        let before = self.budget.used.fetch_add(more, Relaxed);
        if before.saturating_add(more) > self.budget.limit {
            self.budget.used.fetch_sub(more, Relaxed);
            return false;
        }
        self.bytes += more;
        true
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_budget_and_give_it_back() {
        let budget = BodyBudget::new(100);
        let mut a = budget.reserve();
        assert!(a.grow(60));
        let mut b = budget.reserve();
        assert!(!b.grow(41), "over the budget");
        assert!(b.grow(40));
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(b.grow(60));
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
