//! What the end-to-end tests share: the real `pdctl` binary as a child process that dies with
//! the test, one HTTP/1.1 client, one scriptable fake engine, the embedded proxy on a listener
//! the test bound, daemon deployments, and `eventually`.
//!
//! Ports: a server in the test process binds `127.0.0.1:0` and keeps its listener (nobody can
//! take the port between bind and use). A child process that must be told its port up front
//! gets one from [`ports::reserve`], which never hands out a port the kernel could give anyone
//! else (see there).
#![allow(dead_code)]

pub mod deployment;
pub mod embedded;
pub mod engine;
pub mod http;
pub mod ports;
pub mod process;

use std::future::Future;
use std::time::{Duration, Instant};

/// Runs `task` to its end on a single-threaded tokio runtime of its own thread, so servers in
/// the test process keep serving while the test blocks on its client.
pub fn on_own_runtime<F>(task: F) -> std::thread::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(task)
    })
}

/// The tests' one polling loop: checks `holds` every `every` until it is true (then returns
/// true) or `limit` has passed (then false, after one last check).
pub fn poll(limit: Duration, every: Duration, mut holds: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if holds() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Polls `holds` every 20 ms until it is true; fails the test after 10 s naming `what`.
pub fn eventually(what: &str, holds: impl FnMut() -> bool) {
    let held = poll(Duration::from_secs(10), Duration::from_millis(20), holds);
    assert!(held, "timed out waiting for: {what}");
}

/// The sum of every sample of metric `name` (all label sets) on a Prometheus text page. A
/// metric missing from the page fails the test, so a misspelt name cannot pass for a zero.
pub fn metric(page: &str, name: &str) -> f64 {
    let values: Vec<f64> = page
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| series.split('{').next() == Some(name))
        .filter_map(|(_, value)| value.parse().ok())
        .collect();
    assert!(!values.is_empty(), "metric {name} missing from:\n{page}");
    values.iter().sum()
}
