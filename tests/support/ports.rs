//! Port numbers for child processes that must be told their port before they start (`pdctl sim
//! --port`, `pdctl proxy --listen`, the port bases of a pools.toml).
//!
//! Binding `127.0.0.1:0` and dropping the listener is racy: the kernel hands the same ephemeral
//! port to the next `bind(:0)` or outgoing connection of any process before the child binds it.
//! So ports come from 20000..32000, below Linux's ephemeral range (32768..60999 by default),
//! which the kernel never assigns on its own. Each test process starts at an offset taken from
//! its pid and walks forward, so concurrent test binaries (and tests in one binary) do not pick
//! the same numbers; a run that is in use right now is skipped.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u32 = 20_000;
const SPAN: u32 = 12_000;

static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

/// The first of `n` consecutive loopback ports that are free now and handed out to no other
/// caller of this function in this process.
pub fn reserve(n: u16) -> u16 {
    let n = u32::from(n.max(1));
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 7919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..200 {
        let offset = NEXT.fetch_add(n, Ordering::SeqCst) % SPAN;
        if offset + n > SPAN {
            continue;
        }
        let first = FIRST + offset;
        let free = (first..first + n).all(|p| TcpListener::bind(("127.0.0.1", p as u16)).is_ok());
        if free {
            return first as u16;
        }
    }
    panic!(
        "no {n} consecutive free loopback ports in {FIRST}..{}",
        FIRST + SPAN
    );
}

/// A loopback port where nothing listens (connections are refused), for "unreachable engine"
/// cases.
pub fn refusing() -> u16 {
    reserve(1)
}
