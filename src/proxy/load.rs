//! Background scraping of the engines' `/metrics` for the load-aware policy. Off the request
//! path: a pick only reads the numbers stored here.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use tokio_util::sync::CancellationToken;

use super::pick::Upstream;
use super::state::Proxy;

const PERIOD: Duration = Duration::from_secs(1);

pub async fn scrape_forever(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let pools = proxy.pools();
        for upstream in pools.prefill.iter().chain(&pools.decode) {
            if let Some(page) = fetch(&proxy, upstream).await {
                store(upstream, &page);
            }
        }
    }
}

async fn fetch(proxy: &Proxy, upstream: &Upstream) -> Option<String> {
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.method_mut() = Method::GET;
    *request.uri_mut() = Uri::from_static("/metrics");
    request.headers_mut().insert(
        header::HOST,
        HeaderValue::from_str(&upstream.authority).ok()?,
    );
    let response = tokio::time::timeout(PERIOD, proxy.client.request(&upstream.authority, request))
        .await
        .ok()?
        .ok()?;
    let body = tokio::time::timeout(PERIOD, response.into_body().collect())
        .await
        .ok()?
        .ok()?;
    String::from_utf8(body.to_bytes().to_vec()).ok()
}

fn store(upstream: &Upstream, page: &str) {
    if let Some(waiting) = sample(page, "vllm:num_requests_waiting") {
        upstream.waiting.store(waiting.max(0.0) as u64, Relaxed);
    }
    if let Some(kv) = sample(page, "vllm:kv_cache_usage_perc") {
        upstream
            .kv_usage_micros
            .store((kv.clamp(0.0, 1.0) * 1e6) as u64, Relaxed);
    }
}

/// Sums a metric's samples over its label sets (an engine with several model names or ranks).
pub fn sample(page: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let metric = series.split('{').next().unwrap_or(series);
        if metric == name {
            if let Ok(v) = value.parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::Endpoint;

    #[test]
    fn reads_vllm_load_gauges() {
        let page = "# HELP x\nvllm:num_requests_waiting{model_name=\"m\"} 3\n\
                    vllm:num_requests_waiting{model_name=\"n\"} 1\n\
                    vllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n";
        let u = Upstream::new(Endpoint {
            id: "e".into(),
            url: "http://127.0.0.1:1".into(),
        });
        store(&u, page);
        assert_eq!(u.waiting.load(Relaxed), 4);
        assert_eq!(u.kv_usage_micros.load(Relaxed), 250_000);
        assert_eq!(sample(page, "vllm:absent"), None);
    }
}
