//! The proxy's worker threads. The listener deals accepted connections to the workers in turn;
//! each worker is a thread with a single-threaded runtime, the connections dealt to it and its
//! own pool of engine connections, so a request and both of its legs run on one thread.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::endpoints::EndpointSet;
use super::route::handle;
use super::state::{Proxy, ProxyError, Worker};
use super::upstream;

/// How long in-flight requests may take to finish once shutdown begins.
const DRAIN: Duration = Duration::from_secs(30);

/// Starts `workers` threads and deals them the listener's connections until `shutdown`; returns
/// once every worker has drained.
pub async fn run(
    listener: TcpListener,
    proxy: &Arc<Proxy>,
    endpoints: &watch::Receiver<EndpointSet>,
    shutdown: &CancellationToken,
    workers: usize,
) -> Result<(), ProxyError> {
    // A worker that cannot start stops the others without cancelling the caller's token.
    let shutdown = shutdown.child_token();
    let mut lanes = Vec::with_capacity(workers);
    let mut finished = Vec::with_capacity(workers);
    let mut started = Ok(());
    for index in 0..workers {
        let (lane, connections) = mpsc::unbounded_channel();
        match spawn(index, connections, proxy, endpoints, &shutdown) {
            Ok(done) => {
                lanes.push(lane);
                finished.push(done);
            }
            Err(source) => {
                started = Err(ProxyError::Workers { source });
                shutdown.cancel();
                break;
            }
        }
    }
    // Connections are dealt to the workers in turn: a worker that won more accept races would
    // serve more clients on one core and lengthen their tail latency.
    let mut turn = 0usize;
    let cap = connection_cap(proxy.cfg.section.max_client_connections);
    let open = Arc::new(AtomicUsize::new(0));
    while started.is_ok() {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Some(slot) = Slot::take(&open, cap) else {
            // Beyond the cap: a short answer and close, rather than file descriptors running out
            // for everyone (and `accept` failing in a loop).
            let _ = stream.try_write(BUSY);
            continue;
        };
        let _ = stream.set_nodelay(true);
        match stream.into_std() {
            Ok(stream) => {
                let _ = lanes[turn % lanes.len()].send((stream, slot));
                turn = turn.wrapping_add(1);
            }
            Err(e) => tracing::warn!(error = %e, "cannot hand a connection to a worker"),
        }
    }
    drop(listener);
    drop(lanes);
    for done in finished {
        let _ = done.await;
    }
    started
}

const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 123\r\n\r\n{\"error\":{\"message\":\"too many open client connections; retry shortly\",\"type\":\"ServiceUnavailable\",\"param\":null,\"code\":503}}";

/// One open client connection counted against the cap; released when the connection ends.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>, cap: usize) -> Option<Slot> {
        if open.fetch_add(1, Relaxed) >= cap {
            open.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// `max_client_connections`, kept below three quarters of the file descriptors the process may
/// open, after raising its soft limit to the hard one: engine connections need some too.
fn connection_cap(configured: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return configured;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    let by_fds = usize::try_from(limit.rlim_cur / 4 * 3).unwrap_or(usize::MAX);
    configured.min(by_fds.max(1))
}

/// Worker threads when the caller leaves it to us: one per four cores, from 1 to 4. One worker
/// already relays well over 10,000 requests a second, more than the engines of a whole host
/// answer, and the cores left over belong to the engines' own CPU work (their API servers and
/// tokenizers); a second worker on a 2-core machine measurably lengthened the tail (p99) of
/// every request, since it competes with them for the same cores.
pub fn count(asked: usize) -> usize {
    match asked {
        0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).clamp(1, 4)),
        n => n,
    }
}

/// A worker owns a thread with a single-threaded runtime, the connections dealt to it and its
/// own pool of engine connections: a request and both of its legs run on one thread from the
/// first byte to the last, with no cross-thread wakeups.
fn spawn(
    index: usize,
    connections: mpsc::UnboundedReceiver<(std::net::TcpStream, Slot)>,
    proxy: &Arc<Proxy>,
    endpoints: &watch::Receiver<EndpointSet>,
    shutdown: &CancellationToken,
) -> std::io::Result<oneshot::Receiver<()>> {
    let endpoints = endpoints.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (proxy, shutdown) = (proxy.clone(), shutdown.clone());
    let (done, finished) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("pdctl-proxy-{index}"))
        .spawn(move || {
            runtime.block_on(serve_connections(connections, proxy, endpoints, shutdown));
            let _ = done.send(());
        })?;
    Ok(finished)
}

async fn serve_connections(
    mut connections: mpsc::UnboundedReceiver<(std::net::TcpStream, Slot)>,
    proxy: Arc<Proxy>,
    endpoints: watch::Receiver<EndpointSet>,
    shutdown: CancellationToken,
) {
    let worker = Arc::new(Worker::new(
        upstream::client(proxy.cfg.section.connect_timeout),
        endpoints,
    ));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            stream = connections.recv() => match stream {
                Some(accepted) => accepted,
                None => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (stream, slot) = stream;
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "proxy worker cannot take a connection");
                continue;
            }
        };
        let (proxy, worker) = (proxy.clone(), worker.clone());
        let service = hyper::service::service_fn(move |req| {
            let (proxy, worker) = (proxy.clone(), worker.clone());
            async move { Ok::<_, Infallible>(handle(proxy, worker, req).await) }
        });
        let conn = auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(connections);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {DRAIN:?}");
    }
}
