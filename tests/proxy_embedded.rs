//! The P/D engine through `proxy::serve_embedded` (the daemon's entry point) against scripted
//! fake engines on loopback: protocol.md §12 behaviours, failure policies, security limits.

mod proxy_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use pdctl::proxy::{serve_embedded, Endpoint, EndpointSet};
use pdctl::spec::proxy::{PickPolicy, PrefillFailurePolicy, ProxySection};
use proxy_support::*;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

struct Proxy {
    url: String,
    tx: watch::Sender<EndpointSet>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), pdctl::proxy::ProxyError>>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn ep(url: &str) -> Endpoint {
    Endpoint {
        id: url.to_string(),
        url: url.to_string(),
    }
}

async fn proxy(section: ProxySection, prefill: &[&str], decode: &[&str]) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let set = EndpointSet {
        prefill: prefill.iter().map(|u| ep(u)).collect(),
        decode: decode.iter().map(|u| ep(u)).collect(),
    };
    let (tx, rx) = watch::channel(set);
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve_embedded(listener, section, rx, stop.clone()));
    Proxy {
        url,
        tx,
        stop,
        task: Some(task),
    }
}

fn fast() -> ProxySection {
    ProxySection {
        prefill_retry_backoff: Duration::from_millis(1),
        ..ProxySection::default()
    }
}

const CHAT: &str = "/v1/chat/completions";

fn hello() -> Value {
    json!({"model":"Qwen/Qwen2-0.5B","messages":[{"role":"user","content":"Hello"}],"max_tokens":50})
}

/// §12 cases 9-12, 16: one prefill and one decode call with the nixlv2 shapes, one shared
/// request id, and the prefill's cached_tokens in the client's usage.
#[tokio::test]
async fn pd_happy_path_wire_shape() {
    let (p, d) = (
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Decode).await,
    );
    let px = proxy(fast(), &[&p.url], &[&d.url]).await;
    let c = client();
    let mut body = hello();
    body["max_completion_tokens"] = json!(100);
    body["custom"] = json!({"keep": [1, null]});
    let a = send(
        &c,
        "POST",
        &format!("{}{CHAT}", px.url),
        &[
            ("content-type", "application/json"),
            ("x-request-id", "client-id-1"),
            ("authorization", "Bearer upstream"),
        ],
        body.to_string(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        7
    );
    assert_eq!(a.header("x-request-id"), "client-id-1");
    assert_eq!(a.header("x-pdctl-path"), "pd");
    let (ps, ds) = (p.seen(), d.seen());
    assert_eq!((ps.len(), ds.len()), (1, 1));
    let pj = ps[0].json();
    assert_eq!(pj["max_tokens"], 1);
    assert_eq!(pj["max_completion_tokens"], 1);
    assert_eq!(pj["stream"], false);
    assert!(pj.get("stream_options").is_none());
    assert!(pj.get("do_remote_decode").is_none());
    assert_eq!(pj["custom"], json!({"keep": [1, null]}));
    let dj = ds[0].json();
    assert_eq!(
        dj["kv_transfer_params"]["remote_block_ids"],
        json!([1, 2, 3])
    );
    assert_eq!(
        dj["kv_transfer_params"]["remote_engine_id"],
        "5b5fb28f-3f30-4bdd-9a36-958d52459200"
    );
    assert_eq!(dj["max_tokens"], 50);
    assert_eq!(dj["max_completion_tokens"], 100);
    assert!(dj.get("ignore_eos").is_none());
    for s in [&ps[0], &ds[0]] {
        assert_eq!(s.path, CHAT);
        let ids: Vec<_> = s.headers.get_all("x-request-id").iter().collect();
        assert_eq!(ids, ["client-id-1"]);
        assert_eq!(s.headers["authorization"], "Bearer upstream");
    }
    // Without a client id, one generated id is shared by both legs and the client.
    let a = post(
        &c,
        &format!("{}/v1/completions", px.url),
        json!({"model":"m","prompt":"hi"}),
    )
    .await;
    let id = a.header("x-request-id").to_string();
    assert!(!id.is_empty());
    assert_eq!(p.seen()[1].headers["x-request-id"], id.as_str());
    assert_eq!(d.seen()[1].headers["x-request-id"], id.as_str());
    let dj = d.seen()[1].json();
    assert!(
        dj.get("max_tokens").is_none()
            && dj.get("max_completion_tokens").is_none()
            && dj.get("min_tokens").is_none()
    );
}

/// §12 cases 13-14: min_tokens, and the responses API with streaming.
#[tokio::test]
async fn token_limits_and_responses_api() {
    let (p, d) = (
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Decode).await,
    );
    let px = proxy(fast(), &[&p.url], &[&d.url]).await;
    let c = client();
    let a = post(
        &c,
        &format!("{}/v1/completions", px.url),
        json!({"model":"m","prompt":"x","max_tokens":100,"min_tokens":5}),
    )
    .await;
    assert_eq!(a.status, 200);
    let (pj, dj) = (p.seen()[0].json(), d.seen()[0].json());
    assert_eq!(
        (pj["max_tokens"].clone(), pj["min_tokens"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(
        (dj["max_tokens"].clone(), dj["min_tokens"].clone()),
        (json!(100), json!(5))
    );

    let a = post(
        &c,
        &format!("{}/v1/responses", px.url),
        json!({"model":"gpt-4o","input":"Hello","max_output_tokens":100,"stream":true}),
    )
    .await;
    assert_eq!(a.status, 200);
    let (pj, dj) = (p.seen()[1].json(), d.seen()[1].json());
    assert_eq!(p.seen()[1].path, "/v1/responses");
    assert_eq!(pj["max_output_tokens"], 1);
    assert_eq!(pj["stream"], false);
    assert_eq!(dj["max_output_tokens"], 100);
    assert_eq!(dj["stream"], true);
}

/// §12 case 19: SSE with the usage chunk split inside its JSON; the usage is rewritten.
#[tokio::test]
async fn streaming_usage_rewrite() {
    let (p, d) = (
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Decode).await,
    );
    let px = proxy(fast(), &[&p.url], &[&d.url]).await;
    let c = client();
    let mut body = hello();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    // Several streams over one keep-alive connection: none stalls.
    for _ in 0..5 {
        let a = post(&c, &format!("{}{CHAT}", px.url), body.clone()).await;
        assert_eq!(a.status, 200);
        assert!(a.header("content-type").contains("text/event-stream"));
        assert!(a.body.contains("\"content\":\"hello\""));
        assert!(a.body.contains("\"cached_tokens\":7"), "{}", a.body);
        assert!(!a.body.contains("\"cached_tokens\":49"));
        assert!(a.body.ends_with("data: [DONE]\n\n"));
    }
    let pj = p.seen()[0].json();
    assert!(pj.get("stream_options").is_none());
    assert_eq!(
        d.seen()[0].json()["stream_options"],
        json!({"include_usage": true})
    );
}

/// §12 cases 1-2 and 7: passthrough to decode, body untouched, prefiller headers stripped.
#[tokio::test]
async fn passthrough_and_header_stripping() {
    let (p, d) = (
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Decode).await,
    );
    let px = proxy(fast(), &[&p.url], &[&d.url]).await;
    let c = client();
    for path in ["/v1/models", "/v1/chat/completions", "/score", "/healthz"] {
        let a = send(&c, "GET", &format!("{}{path}?q=1", px.url), &[], "").await;
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(a.header("x-pdctl-path"), "passthrough");
    }
    let raw = r#"{"model":"m",  "input":"x"}"#;
    let a = send(
        &c,
        "POST",
        &format!("{}/v1/embeddings", px.url),
        &[("x-prefiller-host-port", "evil:1")],
        raw,
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(p.count(), 0);
    let ds = d.seen();
    assert_eq!(ds.len(), 5);
    assert_eq!(ds[0].path, "/v1/models?q=1");
    assert_eq!(ds[4].body, raw.as_bytes());
    assert!(ds[4].headers.get("x-prefiller-host-port").is_none());

    // A header naming an unknown prefill is ignored (and stripped); a known one is used.
    let p2 = Fake::start(Role::Prefill).await;
    px.tx.send_modify(|s| s.prefill.push(ep(&p2.url)));
    for _ in 0..4 {
        let a = send(
            &c,
            "POST",
            &format!("{}{CHAT}", px.url),
            &[("x-prefiller-host-port", &p2.addr.to_string())],
            hello().to_string(),
        )
        .await;
        assert_eq!(a.status, 200);
    }
    assert_eq!(p2.count(), 4);
    assert!(p2
        .seen()
        .iter()
        .all(|s| s.headers.get("x-prefiller-host-port").is_none()));
    assert!(d
        .seen()
        .iter()
        .all(|s| s.headers.get("x-prefiller-host-port").is_none()));
}

/// §12 cases 21-24: retry on 502/503/504 (each retry on another prefill), not on 500.
#[tokio::test]
async fn retry_policy() {
    let (p1, p2, d) = (
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Decode).await,
    );
    let sec = ProxySection {
        prefill_failure: PrefillFailurePolicy::Retry,
        prefill_max_retries: 2,
        prefill_policy: PickPolicy::RoundRobin,
        ..fast()
    };
    let px = proxy(sec, &[&p1.url, &p2.url], &[&d.url]).await;
    let c = client();
    // First try lands on p1 (round-robin starts there), fails, retry goes to p2.
    p1.push(Reply::Status(503));
    let a = post(&c, &format!("{}{CHAT}", px.url), hello()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!((p1.count(), p2.count(), d.count()), (1, 1, 1));
    assert_eq!(
        d.seen()[0].json()["kv_transfer_params"]["remote_host"],
        "ahost"
    );

    for f in [&p1, &p2] {
        f.push(Reply::Status(500));
    }
    let a = post(&c, &format!("{}{CHAT}", px.url), hello()).await;
    assert_eq!(a.status, 500);
    assert_eq!(p1.count() + p2.count(), 3, "500 is not retried");
    assert_eq!(d.count(), 1);
    p1.script.lock().unwrap().clear();
    p2.script.lock().unwrap().clear();

    for f in [&p1, &p2, &p1, &p2] {
        f.push(Reply::Status(502));
    }
    let a = post(&c, &format!("{}{CHAT}", px.url), hello()).await;
    assert_eq!(a.status, 502);
    assert_eq!(p1.count() + p2.count(), 6, "1 try + 2 retries");
    assert_eq!(d.count(), 1, "decode never called");
    let m = send(&c, "GET", &format!("{}/metrics", px.url), &[], "")
        .await
        .body;
    assert!(m.contains("pdctl_proxy_retries_total 3"), "{m}");
}

/// §12 case 22 and `fail`: no retries; the prefill's status and body reach the client.
#[tokio::test]
async fn fail_policy() {
    let (p, d) = (
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Decode).await,
    );
    let sec = ProxySection {
        prefill_failure: PrefillFailurePolicy::Fail,
        prefill_max_retries: 5,
        ..fast()
    };
    let px = proxy(sec, &[&p.url], &[&d.url]).await;
    p.push(Reply::Status(502));
    let a = post(&client(), &format!("{}{CHAT}", px.url), hello()).await;
    assert_eq!(a.status, 502);
    assert!(a.body.contains("scripted 502"));
    assert_eq!((p.count(), d.count()), (1, 0));
}

/// `fallback`: decode-only with the client's original body, marked (`x-pdctl-path`) and counted.
#[tokio::test]
async fn fallback_policy() {
    let (p, d) = (
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Decode).await,
    );
    let sec = ProxySection {
        prefill_failure: PrefillFailurePolicy::Fallback,
        prefill_max_retries: 1,
        ..fast()
    };
    let px = proxy(sec, &[&p.url], &[&d.url]).await;
    let c = client();
    p.push(Reply::Status(503));
    p.push(Reply::Status(503));
    let a = post(&c, &format!("{}{CHAT}", px.url), hello()).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-pdctl-path"), "fallback");
    assert_eq!(p.count(), 2);
    assert_eq!(d.seen()[0].json(), hello(), "decode gets the original body");
    assert_eq!(
        a.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        49,
        "no rewrite without a prefill"
    );
    // A 4xx is the client's fault: no fallback.
    p.push(Reply::Status(400));
    let a = post(&c, &format!("{}{CHAT}", px.url), hello()).await;
    assert_eq!(a.status, 400);
    // An unreachable prefill falls back too.
    let dead = format!("http://127.0.0.1:{}", free_port());
    px.tx.send_modify(|s| s.prefill = vec![ep(&dead)]);
    let a = post(&c, &format!("{}{CHAT}", px.url), hello()).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-pdctl-path"), "fallback");
    let m = send(&c, "GET", &format!("{}/metrics", px.url), &[], "")
        .await
        .body;
    assert!(m.contains("pdctl_proxy_fallbacks_total 2"), "{m}");
    assert!(
        m.contains(
            r#"pdctl_proxy_requests_total{route="chat_completions",status="200",path="fallback"} 2"#
        ),
        "{m}"
    );
}

/// A decode that refuses connections is skipped for another ready decode.
#[tokio::test]
async fn decode_connect_error_goes_to_another_decode() {
    let (p, d) = (
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Decode).await,
    );
    let dead = format!("http://127.0.0.1:{}", free_port());
    let sec = ProxySection {
        decode_policy: PickPolicy::RoundRobin,
        ..fast()
    };
    let px = proxy(sec, &[&p.url], &[&dead, &d.url]).await;
    let c = client();
    for _ in 0..4 {
        let a = post(&c, &format!("{}{CHAT}", px.url), hello()).await;
        assert_eq!(a.status, 200);
    }
    assert_eq!(d.count(), 4);
    px.tx.send_modify(|s| s.decode = vec![ep(&dead)]);
    let a = post(&c, &format!("{}{CHAT}", px.url), hello()).await;
    assert_eq!(a.status, 503);
    assert!(a.body.contains("decode node is not ready"));
}

/// Pair-aware health follows the live endpoint set; shutdown ends serve_embedded.
#[tokio::test]
async fn health_follows_endpoint_set() {
    let (p, d) = (
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Decode).await,
    );
    let px = proxy(fast(), &[], &[&d.url]).await;
    let c = client();
    let health = format!("{}/health", px.url);
    assert_eq!(send(&c, "GET", &health, &[], "").await.status, 503);
    let a = post(&c, &format!("{}{CHAT}", px.url), hello()).await;
    assert_eq!(a.status, 503, "no prefill: retry policy answers 503");
    px.tx.send_modify(|s| s.prefill.push(ep(&p.url)));
    wait_status(&c, &health, 200).await;
    px.tx.send_modify(|s| s.decode.clear());
    wait_status(&c, &health, 503).await;
    px.stop.cancel();
    let mut px = px;
    let task = px.task.take().unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .is_ok());
}

/// Selective disaggregation: short prompts go decode-only with the original body.
#[tokio::test]
async fn threshold_sends_short_prompts_decode_only() {
    let (p, d) = (
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Decode).await,
    );
    let sec = ProxySection {
        pd_threshold_tokens: 10,
        ..fast()
    };
    let px = proxy(sec, &[&p.url], &[&d.url]).await;
    let c = client();
    let short = json!({"model":"m","prompt":"a short one"});
    let a = post(&c, &format!("{}/v1/completions", px.url), short.clone()).await;
    assert_eq!(a.header("x-pdctl-path"), "decode_only");
    assert_eq!(d.seen()[0].json(), short);
    let long = json!({"model":"m","prompt":"x".repeat(40)});
    let a = post(&c, &format!("{}/v1/completions", px.url), long).await;
    assert_eq!(a.header("x-pdctl-path"), "pd");
    assert_eq!(p.count(), 1);
}

/// 413 above the body limit, 400 on malformed JSON, 401 without the API key, 504 on a prefill
/// timeout — all in vLLM's error shape; an unset `api_key_env` variable refuses to start.
#[tokio::test]
async fn limits_errors_and_api_key() {
    let (p, d) = (
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Decode).await,
    );
    std::env::set_var("PDCTL_TEST_PROXY_KEY", "s3cret");
    let sec = ProxySection {
        max_body_bytes: 1000,
        api_key_env: Some("PDCTL_TEST_PROXY_KEY".into()),
        prefill_timeout: Duration::from_millis(300),
        prefill_failure: PrefillFailurePolicy::Fail,
        ..fast()
    };
    let px = proxy(sec, &[&p.url], &[&d.url]).await;
    let c = client();
    let url = format!("{}{CHAT}", px.url);
    let auth = ("authorization", "Bearer s3cret");
    let a = send(&c, "POST", &url, &[], hello().to_string()).await;
    assert_eq!(a.status, 401);
    let a = send(&c, "POST", &url, &[auth], "x".repeat(2000)).await;
    assert_eq!(a.status, 413);
    assert_eq!(a.json()["error"]["code"], 413);
    let a = send(&c, "POST", &url, &[auth], "{not json").await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["type"], "BadRequestError");
    assert_eq!(a.json()["error"]["code"], 400);
    p.push(Reply::Delay(Duration::from_secs(30)));
    let a = send(&c, "POST", &url, &[auth], hello().to_string()).await;
    assert_eq!(a.status, 504);
    assert_eq!(d.count(), 0);
    // Health and metrics stay open for probes.
    assert_eq!(
        send(&c, "GET", &format!("{}/health", px.url), &[], "")
            .await
            .status,
        200
    );
    // An unset key variable is a startup error.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (_tx, rx) = watch::channel(EndpointSet::default());
    let sec = ProxySection {
        api_key_env: Some("PDCTL_TEST_UNSET_KEY_VAR".into()),
        ..ProxySection::default()
    };
    assert!(serve_embedded(listener, sec, rx, CancellationToken::new())
        .await
        .is_err());
}

/// A client that disconnects mid-stream cancels the decode leg at once.
#[tokio::test]
async fn client_disconnect_cancels_decode_stream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (p, d) = (
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Decode).await,
    );
    let px = proxy(fast(), &[&p.url], &[&d.url]).await;
    d.push(Reply::Endless);
    let addr = px.url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = json!({"model":"m","prompt":"p","stream":true}).to_string();
    let req = format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = 0;
    while got < 200 {
        got += s.read(&mut buf[got..]).await.unwrap();
    }
    assert!(String::from_utf8_lossy(&buf[..got]).starts_with("HTTP/1.1 200"));
    assert!(!d.aborted.load(Ordering::SeqCst));
    drop(s);
    assert!(
        eventually(|| d.aborted.load(Ordering::SeqCst)).await,
        "upstream stream not cancelled"
    );
    let c = client();
    let m = send(&c, "GET", &format!("{}/metrics", px.url), &[], "")
        .await
        .body;
    assert!(m.contains("pdctl_proxy_client_disconnects_total 1"), "{m}");
}

/// An engine that closes every connection after one answer, without saying so (as uvicorn does
/// when its keep-alive timeout fires between requests): a pooled connection found dead before
/// the request was written is replaced, so no request fails.
#[tokio::test]
async fn engine_closing_idle_connections_fails_no_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let engine = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let engine_url = format!("http://{}", engine.local_addr().unwrap());
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = engine.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = br#"{"object":"list","data":[]}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
                let _ = conn.write_all(body).await;
                counter.fetch_add(1, Ordering::SeqCst);
                // Closed a moment later without `connection: close`, once the proxy has pooled
                // the connection: it learns of it only from the socket.
                tokio::time::sleep(Duration::from_millis(1)).await;
            });
        }
    });
    let px = proxy(fast(), &[&engine_url], &[&engine_url]).await;
    let c = client();
    for i in 0..30 {
        let a = send(&c, "GET", &format!("{}/v1/models", px.url), &[], "").await;
        assert_eq!(a.status, 200, "request {i}: {}", a.body);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(served.load(Ordering::SeqCst), 30);
}

/// A decode engine whose SSE body stays open after `data: [DONE]` (uvicorn ends the chunked
/// body in a write of its own): the client's answer is complete at `[DONE]`, and the engine's
/// connection is still read to its end and reused for the next request.
#[tokio::test]
async fn event_stream_ends_at_done_and_engine_connection_is_reused() {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Semaphore;
    let engine = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let engine_url = format!("http://{}", engine.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let may_end_body = Arc::new(Semaphore::new(0));
    let (accepted2, may_end_body2) = (accepted.clone(), may_end_body.clone());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = engine.accept().await {
            accepted2.fetch_add(1, Ordering::SeqCst);
            let may_end_body = may_end_body2.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let head_end = loop {
                        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&pending[..head_end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while pending.len() < head_end + length {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                    }
                    pending.drain(..head_end + length);
                    let event = "data: {\"choices\":[{\"index\":0,\"text\":\"hi\"}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}\n\n";
                    let done = "data: [DONE]\n\n";
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n{:x}\r\n{done}\r\n",
                        event.len(),
                        done.len()
                    );
                    if conn.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    may_end_body.acquire().await.unwrap().forget();
                    if conn.write_all(b"0\r\n\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let p = Fake::start(Role::Prefill).await;
    let px = proxy(fast(), &[&p.url], &[&engine_url]).await;
    let c = client();
    let body = json!({"model":"m","prompt":"Hello","stream":true});
    for round in 0..2 {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            post(&c, &format!("{}/v1/completions", px.url), body.clone()),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("round {round}: the answer waited for the engine's end of body")
        });
        assert_eq!(answer.status, 200);
        assert!(answer.body.ends_with("data: [DONE]\n\n"), "{}", answer.body);
        assert!(
            answer.body.contains("\"cached_tokens\":7"),
            "{}",
            answer.body
        );
        may_end_body.add_permits(1);
        // The engine's body ends on the proxy's side once it has read the terminator.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "engine connection not reused"
    );
    let m = send(&c, "GET", &format!("{}/metrics", px.url), &[], "")
        .await
        .body;
    assert!(!m.contains("pdctl_proxy_client_disconnects_total 1"), "{m}");
}
