//! The HTTP GET prober: any status in 200..400 is a success, as in Kubernetes.

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::plan::Probe;

#[derive(Clone)]
pub struct HttpProber {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for HttpProber {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpProber {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        HttpProber {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// One probe of the engine on loopback; the caller bounds it with the probe's timeout.
    pub async fn check(&self, probe: &Probe) -> bool {
        let Ok(uri) = format!("http://127.0.0.1:{}{}", probe.port, probe.path).parse() else {
            return false;
        };
        match self.client.get(uri).await {
            Ok(resp) => (200..400).contains(&resp.status().as_u16()),
            Err(_) => false,
        }
    }
}
