//! Background scraper of the engines' `/metrics` for the load-aware policy: queued requests
//! (`vllm:num_requests_waiting`) and KV cache usage (`vllm:kv_cache_usage_perc`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::pick::Snapshot;
use super::server::UpstreamClient;

/// Sum of `vllm:num_requests_waiting` and max of `vllm:kv_cache_usage_perc` over all label sets
/// (several engines or data-parallel ranks may share one endpoint).
pub fn parse_load(text: &str) -> Option<(f64, f64)> {
    let mut waiting = None::<f64>;
    let mut kv = None::<f64>;
    for line in text.lines() {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let value = || line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        match name {
            "vllm:num_requests_waiting" => {
                if let Some(v) = value() {
                    *waiting.get_or_insert(0.0) += v;
                }
            }
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                if let Some(v) = value() {
                    kv = Some(kv.map_or(v, |k: f64| k.max(v)));
                }
            }
            _ => {}
        }
    }
    waiting.map(|w| (w, kv.unwrap_or(0.0)))
}

pub fn spawn(
    client: UpstreamClient,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    every: Duration,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let snap = snapshot.borrow().clone();
            let backends = snap.prefill.backends.iter().chain(&snap.decode.backends);
            let scrapes = backends.map(|b| {
                let client = client.clone();
                let b = b.clone();
                async move {
                    let uri = b.uri(&http::uri::PathAndQuery::from_static("/metrics"));
                    let req = Request::builder()
                        .method(Method::GET)
                        .uri(uri)
                        .body(Full::new(Bytes::new()))
                        .expect("valid request");
                    let fetch = async {
                        let resp = client.request(req).await.ok()?;
                        let body = Limited::new(resp.into_body(), 4 << 20)
                            .collect()
                            .await
                            .ok()?;
                        let text = String::from_utf8(body.to_bytes().to_vec()).ok()?;
                        parse_load(&text)
                    };
                    match tokio::time::timeout(every, fetch).await {
                        Ok(Some((w, kv))) => b.set_load(w, kv),
                        _ => tracing::debug!(endpoint = %b.id, "no load figures from /metrics"),
                    }
                }
            });
            futures_util::future::join_all(scrapes).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_metrics() {
        let text = "# HELP vllm:num_requests_waiting x\n# TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3.0\n\
            vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 2\n\
            vllm:num_requests_waiting_other 100\n\
            vllm:kv_cache_usage_perc{engine=\"0\"} 0.25\nvllm:kv_cache_usage_perc{engine=\"1\"} 0.5\n";
        assert_eq!(parse_load(text), Some((5.0, 0.5)));
        assert_eq!(
            parse_load("vllm:num_requests_waiting 1\n"),
            Some((1.0, 0.0))
        );
        assert_eq!(parse_load("nothing here"), None);
    }
}
