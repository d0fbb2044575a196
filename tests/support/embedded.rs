//! The proxy as the daemon runs it (`proxy::serve_embedded`), in the test process: on a listener
//! the test bound, on a runtime thread of its own, with an endpoint set the test changes.

use std::time::Duration;

use pdctl::proxy::{serve_embedded, Endpoint, EndpointSet, ProxyError};
use pdctl::spec::proxy::ProxySection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct Embedded {
    pub port: u16,
    endpoints: watch::Sender<EndpointSet>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<Result<(), ProxyError>>>,
}

/// An endpoint whose id is its URL.
pub fn endpoint(url: &str) -> Endpoint {
    Endpoint {
        id: url.to_string(),
        url: url.to_string(),
    }
}

impl Embedded {
    pub fn start(section: ProxySection, prefill: &[&str], decode: &[&str]) -> Embedded {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let set = EndpointSet {
            prefill: prefill.iter().map(|u| endpoint(u)).collect(),
            decode: decode.iter().map(|u| endpoint(u)).collect(),
        };
        let (endpoints, watched) = watch::channel(set);
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = super::on_own_runtime(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            serve_embedded(listener, section, watched, token).await
        });
        Embedded {
            port,
            endpoints,
            stop,
            thread: Some(thread),
        }
    }

    /// Changes the live endpoint set, as the daemon does when readiness changes.
    pub fn change(&self, edit: impl FnOnce(&mut EndpointSet)) {
        self.endpoints.send_modify(edit);
    }

    /// Cancels the proxy and returns what `serve_embedded` returned; fails the test if it does
    /// not return within 10 s.
    pub fn shut_down(mut self) -> Result<(), ProxyError> {
        self.stop.cancel();
        let thread = self.thread.take().unwrap();
        let ended = super::poll(Duration::from_secs(10), Duration::from_millis(20), || {
            thread.is_finished()
        });
        assert!(
            ended,
            "serve_embedded did not return within 10 s of the shutdown"
        );
        thread.join().expect("the proxy thread did not panic")
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
