//! Port numbers for child processes that must be told their port before they start (`pdctl sim
//! --port`, `pdctl proxy --listen`, the port bases of a pools.toml).
//!
//! Binding `127.0.0.1:0` and dropping the listener is racy: the kernel hands the same ephemeral
//! port to the next `bind(:0)` or outgoing connection of any process before the child binds it.
//! So ports come from 10000 up to the start of the kernel's ephemeral range (read from
//! /proc/sys/net/ipv4/ip_local_port_range, 32768 by default; at most 32000), which the kernel
//! never assigns on its own. Each test process starts at an offset taken from its pid and walks
//! forward, so concurrent test binaries (and tests in one binary) do not pick the same numbers;
//! a run that is in use right now is skipped.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u32 = 10_000;

/// How many ports lie between `FIRST` and the ephemeral range.
fn span() -> u32 {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let end = ephemeral_start.min(32_000);
    assert!(
        end >= FIRST + 1_000,
        "the ephemeral port range starts at {ephemeral_start}: no room below it for test ports"
    );
    end - FIRST
}

static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

/// The first of `n` consecutive loopback ports that are free now and handed out to no other
/// caller of this function in this process.
pub fn reserve(n: u16) -> u16 {
    let n = u32::from(n.max(1));
    let span = span();
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (u64::from(std::process::id()) * 7919 % u64::from(span)) as u32,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..200 {
        let offset = NEXT.fetch_add(n, Ordering::SeqCst) % span;
        if offset + n > span {
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
        FIRST + span
    );
}

/// A loopback port where nothing listens (connections are refused), for "unreachable engine"
/// cases.
pub fn refusing() -> u16 {
    reserve(1)
}
