//! Endpoint sources for `pdctl proxy`: static URLs, and DNS names re-resolved periodically (a
//! Kubernetes headless Service resolves to one address per ready pod).

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::endpoints::{Endpoint, EndpointSet};

const RESOLVE_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub prefill: Vec<String>,
    pub decode: Vec<String>,
    /// `name:port` entries, resolved to every address behind the name.
    pub prefill_dns: Vec<String>,
    pub decode_dns: Vec<String>,
}

impl Sources {
    pub fn has_dns(&self) -> bool {
        !(self.prefill_dns.is_empty() && self.decode_dns.is_empty())
    }
}

fn urls(list: &[String]) -> Vec<Endpoint> {
    list.iter()
        .map(|u| {
            let url = if u.contains("://") {
                u.trim_end_matches('/').to_string()
            } else {
                format!("http://{}", u.trim_end_matches('/'))
            };
            Endpoint {
                id: url.clone(),
                url,
            }
        })
        .collect()
}

async fn resolve(names: &[String]) -> Vec<Endpoint> {
    let mut found = Vec::new();
    for name in names {
        match tokio::net::lookup_host(name.as_str()).await {
            Ok(addrs) => found.extend(addrs.map(|a| {
                let url = format!("http://{a}");
                Endpoint {
                    id: format!("{name}/{a}"),
                    url,
                }
            })),
            Err(e) => tracing::warn!(%name, error = %e, "cannot resolve endpoint name"),
        }
    }
    found.sort_by(|a, b| a.url.cmp(&b.url));
    found.dedup_by(|a, b| a.url == b.url);
    found
}

pub async fn current(sources: &Sources) -> EndpointSet {
    let mut set = EndpointSet {
        prefill: urls(&sources.prefill),
        decode: urls(&sources.decode),
    };
    set.prefill.extend(resolve(&sources.prefill_dns).await);
    set.decode.extend(resolve(&sources.decode_dns).await);
    set
}

pub async fn refresh_forever(
    sources: Sources,
    tx: watch::Sender<EndpointSet>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RESOLVE_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        let set = current(&sources).await;
        tx.send_if_modified(|old| {
            let changed = *old != set;
            if changed {
                *old = set;
            }
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_urls_and_localhost_names() {
        let sources = Sources {
            prefill: vec!["127.0.0.1:8100".into()],
            decode: vec!["http://127.0.0.1:8200/".into()],
            prefill_dns: vec!["localhost:8101".into()],
            decode_dns: vec![],
        };
        let set = current(&sources).await;
        assert_eq!(set.decode[0].url, "http://127.0.0.1:8200");
        assert_eq!(set.prefill[0].url, "http://127.0.0.1:8100");
        assert!(set.prefill.iter().any(|e| e.url.ends_with(":8101")));
    }
}
