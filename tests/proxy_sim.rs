//! `pdctl proxy` in front of two real `pdctl sim` engines: every request does a real KV pull,
//! streams survive keep-alive, a client hang-up aborts the engine's work, and a real OpenAI
//! client library works through it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{eventually, get, hang_up_after, post, start_proxy, Sim};
use serde_json::json;

fn proxy_for(p: &Sim, d: &Sim, extra: &[&str]) -> (common::Proc, u16) {
    let mut args = vec![
        "--prefill".to_string(),
        format!("http://127.0.0.1:{}", p.port),
        "--decode".to_string(),
        format!("http://127.0.0.1:{}", d.port),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    start_proxy("proxy", &args)
}

#[test]
fn every_request_pulls_its_kv_from_the_prefill() {
    let (p, d) = (Sim::start(&[]), Sim::start(&[]));
    let (_proxy, port) = proxy_for(&p, &d, &[]);
    for i in 0..5 {
        let reply = post(
            port,
            "/v1/completions",
            &json!({"model": "sim-model", "prompt": format!("request {i}: tell me about KV"),
                    "max_tokens": 4}),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.header("x-pdctl-path"), Some("pd"));
        assert_eq!(reply.json()["usage"]["completion_tokens"], 4);
    }
    let reply = post(
        port,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "stream [eos] please"}],
                "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert!(reply.body.contains("data: [DONE]"));
    // The prefill prompt holds "[eos]": ignore_eos on the prefill leg still got params back.
    assert_eq!(d.metric("pdctl_sim_kv_pulls_ok_total"), 6.0);
    assert_eq!(d.metric("pdctl_sim_kv_pulls_failed_total"), 0.0);
    assert_eq!(p.metric("pdctl_sim_kv_transfers_served_total"), 6.0);
    assert_eq!(p.metric("pdctl_sim_kv_pending_transfers"), 0.0);
}

/// Reads one chunked response off a kept-alive connection (up to its terminating chunk).
fn read_chunked(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"\r\n0\r\n\r\n") {
        let n = stream.read(&mut buf).expect("the stream stalled");
        assert!(n > 0, "connection closed early");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

#[test]
fn streams_back_to_back_on_one_keep_alive_connection() {
    let (p, d) = (
        Sim::start(&[]),
        Sim::start(&["--inter-token-latency", "2ms"]),
    );
    let (_proxy, port) = proxy_for(&p, &d, &[]);
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for i in 0..3 {
        let body =
            json!({"prompt": format!("stream {i}"), "max_tokens": 20, "stream": true}).to_string();
        write!(
            stream,
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let response = read_chunked(&mut stream);
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("data: [DONE]"));
        assert_eq!(response.matches("\"text\":").count(), 20);
    }
    assert_eq!(d.metric("pdctl_sim_kv_pulls_ok_total"), 3.0);
}

#[test]
fn a_client_hang_up_mid_stream_aborts_the_decode() {
    let (p, d) = (
        Sim::start(&[]),
        Sim::start(&["--inter-token-latency", "20ms"]),
    );
    let (_proxy, port) = proxy_for(&p, &d, &[]);
    hang_up_after(
        port,
        "/v1/completions",
        &json!({"prompt": "a very long story", "max_tokens": 500, "stream": true}),
        400,
    );
    eventually("the decode engine aborts the request", || {
        d.metric("pdctl_sim_requests_aborted_total") == 1.0
    });
    eventually("the proxy counts the disconnect", || {
        get(port, "/metrics")
            .body
            .contains("pdctl_proxy_client_disconnects_total 1")
    });

    // Hanging up during a slow prefill aborts the prefill leg too.
    let slow_p = Sim::start(&["--prefill-time-per-token", "100ms"]);
    let (_proxy2, port2) = proxy_for(&slow_p, &d, &[]);
    hang_up_after(
        port2,
        "/v1/completions",
        &json!({"prompt": "x".repeat(400), "max_tokens": 5}),
        0,
    );
    eventually("the prefill engine aborts the request", || {
        slow_p.metric("pdctl_sim_requests_aborted_total") == 1.0
    });
}

#[test]
fn load_aware_and_prefix_affinity_route_real_traffic() {
    let (p, d1, d2) = (Sim::start(&[]), Sim::start(&[]), Sim::start(&[]));
    let args = vec![
        "--prefill".to_string(),
        format!("http://127.0.0.1:{}", p.port),
        "--decode".into(),
        format!("http://127.0.0.1:{}", d1.port),
        "--decode".into(),
        format!("http://127.0.0.1:{}", d2.port),
        "--prefill-policy".into(),
        "load-aware".into(),
        "--decode-policy".into(),
        "prefix-affinity".into(),
    ];
    let (_proxy, port) = start_proxy("proxy", &args);
    let shared = "z".repeat(300);
    for i in 0..6 {
        let reply = post(
            port,
            "/v1/completions",
            &json!({"prompt": format!("{shared} question {i}"), "max_tokens": 1}),
        );
        assert_eq!(reply.status, 200);
    }
    let (a, b) = (
        d1.metric("pdctl_sim_kv_pulls_ok_total"),
        d2.metric("pdctl_sim_kv_pulls_ok_total"),
    );
    assert_eq!(a + b, 6.0);
    assert!(
        a == 0.0 || b == 0.0,
        "one shared prefix stays on one decode: {a} / {b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_health_is_pair_aware_and_follows_the_endpoint_set() {
    use pdctl::proxy::{serve_embedded, Endpoint, EndpointSet};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::watch::channel(EndpointSet::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(serve_embedded(
        listener,
        Default::default(),
        rx,
        shutdown.clone(),
    ));
    let health = move || async move {
        tokio::task::spawn_blocking(move || get(port, "/health").status)
            .await
            .unwrap()
    };
    assert_eq!(health().await, 503);
    let ep = |n: u16| Endpoint {
        id: format!("e{n}"),
        url: format!("http://127.0.0.1:{n}"),
    };
    tx.send(EndpointSet {
        prefill: vec![ep(1)],
        decode: vec![],
    })
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(health().await, 503, "a prefill alone is not a pair");
    tx.send(EndpointSet {
        prefill: vec![ep(1)],
        decode: vec![ep(2)],
    })
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(health().await, 200);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns after shutdown")
        .unwrap()
        .unwrap();
}

#[test]
fn the_openai_python_client_works_through_the_proxy() {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let has_openai = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run this test: scripts/ci/20-python-venv.sh should have made .venv"
        );
        eprintln!("SKIPPED: no .venv with openai (run scripts/ci/20-python-venv.sh)");
        return;
    }
    let (p, d) = (Sim::start(&[]), Sim::start(&[]));
    let (_proxy, port) = proxy_for(&p, &d, &[]);
    let out = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openai_client.py"
        ))
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .arg("sim-model")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    assert_eq!(d.metric("pdctl_sim_kv_pulls_ok_total"), 4.0);
}
