//! The real binary: `pdctl proxy` between two `pdctl sim` engines (every request must show a
//! successful KV pull; client disconnects must abort the engines' requests), and `pdctl sidecar`
//! with llm-d's flags against fake engines.

mod proxy_support;

use std::time::Duration;

use proxy_support::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(c: &TestClient, base: &str) -> String {
    send(c, "GET", &format!("{base}/metrics"), &[], "")
        .await
        .body
}

struct Stack {
    _children: Vec<Child>,
    p: String,
    d: String,
    proxy: String,
}

async fn sim_stack(c: &TestClient) -> Stack {
    let (pp, dp, xp) = (free_port(), free_port(), free_port());
    let (ps, ds) = (free_port(), free_port());
    let p = spawn_pdctl(&[
        "sim",
        "serve",
        "sim-model",
        "--port",
        &pp.to_string(),
        "--side-channel-port",
        &ps.to_string(),
        "--prefill-time-per-token",
        "5ms",
    ]);
    let d = spawn_pdctl(&[
        "sim",
        "serve",
        "sim-model",
        "--port",
        &dp.to_string(),
        "--side-channel-port",
        &ds.to_string(),
        "--inter-token-latency",
        "20ms",
    ]);
    let (pu, du) = (
        format!("http://127.0.0.1:{pp}"),
        format!("http://127.0.0.1:{dp}"),
    );
    let x = spawn_pdctl(&[
        "proxy",
        "--listen",
        &format!("127.0.0.1:{xp}"),
        "--prefill",
        &pu,
        "--decode",
        &du,
    ]);
    let xu = format!("http://127.0.0.1:{xp}");
    for u in [&pu, &du, &xu] {
        wait_status(c, &format!("{u}/health"), 200).await;
    }
    Stack {
        _children: vec![p, d, x],
        p: pu,
        d: du,
        proxy: xu,
    }
}

/// Every request, streamed or not, completions or chat, goes P then D and D pulls the KV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_pair_every_request_pulls_kv() {
    let c = client();
    let s = sim_stack(&c).await;
    let mut n = 0;
    for stream in [false, true] {
        for i in 0..3 {
            let a = post(&c, &format!("{}/v1/completions", s.proxy), json!({"model":"sim-model","prompt":format!("Tell me a story number {i} please"),"max_tokens":4,"stream":stream})).await;
            assert_eq!(a.status, 200, "{}", a.body);
            let a = post(&c, &format!("{}/v1/chat/completions", s.proxy), json!({"model":"sim-model","messages":[{"role":"user","content":format!("Hi {i}, a chat [eos] here")}],"max_tokens":4,"stream":stream,"stream_options": if stream { json!({"include_usage":true}) } else { json!(null) }})).await;
            assert_eq!(a.status, 200, "{}", a.body);
            if stream {
                assert!(
                    a.body.contains("prompt_tokens_details")
                        && a.body.ends_with("data: [DONE]\n\n"),
                    "{}",
                    a.body
                );
            }
            n += 2;
        }
    }
    let dm = metrics(&c, &s.d).await;
    assert_eq!(metric(&dm, "pdctl_sim_kv_pulls_ok_total"), n as f64, "{dm}");
    // The chat prompts contain `[eos]`: without ignore_eos on the prefill leg the sim would
    // hand over no KV for them and the pull count above would fall short.
    assert_eq!(metric(&dm, "pdctl_sim_kv_pulls_failed_total"), 0.0);
    let pm = metrics(&c, &s.p).await;
    assert_eq!(metric(&pm, "pdctl_sim_kv_transfers_served_total"), n as f64);
}

async fn open_stream(
    base: &str,
    path: &str,
    body: serde_json::Value,
    want: usize,
) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    let body = body.to_string();
    let req = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let mut got = 0;
    while got < want {
        let n = s.read(&mut buf[got..]).await.unwrap();
        assert!(n > 0, "closed early");
        got += n;
    }
    s
}

/// A client gone mid-stream aborts the decode request; one gone during the prefill aborts the
/// prefill request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_pair_disconnects_abort_upstream() {
    let c = client();
    let s = sim_stack(&c).await;
    let aborted = "pdctl_sim_requests_aborted_total";
    let stream = open_stream(
        &s.proxy,
        "/v1/completions",
        json!({"model":"sim-model","prompt":"a long story","max_tokens":5000,"stream":true}),
        400,
    )
    .await;
    drop(stream);
    let mut ok = false;
    for _ in 0..250 {
        if metric(&metrics(&c, &s.d).await, aborted) >= 1.0 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(ok, "decode sim never saw the abort");

    // 1000 prompt tokens at 5 ms each: the prefill is still running when the client leaves.
    let body = json!({"model":"sim-model","prompt":"abcd".repeat(1000),"max_tokens":5}).to_string();
    let mut st = tokio::net::TcpStream::connect(s.proxy.trim_start_matches("http://"))
        .await
        .unwrap();
    let req = format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    st.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(st);
    let mut ok = false;
    for _ in 0..250 {
        if metric(&metrics(&c, &s.p).await, aborted) >= 1.0 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(ok, "prefill sim never saw the abort");
    let xm = metrics(&c, &s.proxy).await;
    assert!(
        metric(&xm, "pdctl_proxy_client_disconnects_total") >= 2.0,
        "{xm}"
    );
}

/// `pdctl sidecar` with llm-d's flags (Go single-dash form too): the header picks the prefill,
/// no header is a passthrough, the SSRF allowlist checks ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_llmd_flags_header_and_ssrf() {
    let c = client();
    let (p, d) = (
        Fake::start(Role::Prefill).await,
        Fake::start(Role::Decode).await,
    );
    let port = free_port();
    let _sc = spawn_pdctl(&[
        "sidecar",
        &format!("-port={port}"),
        &format!("--vllm-port={}", d.addr.port()),
        "--kv-connector=nixlv2",
        "--enable-ssrf-protection=true",
        "--secure-proxy=false",
        "--inference-pool=ns/pool",
        &format!("--ssrf-allowlist=127.0.0.1:{}", p.addr.port()),
        "--prefill-max-retries=2",
        "--prefill-retry-backoff=1ms",
        "--host=127.0.0.1",
    ]);
    let base = format!("http://127.0.0.1:{port}");
    wait_status(&c, &format!("{base}/health"), 200).await;
    let body = json!({"model":"m","messages":[{"role":"user","content":"Hello"}],"max_tokens":50})
        .to_string();
    let url = format!("{base}/v1/chat/completions");
    let ct = ("content-type", "application/json");

    let a = send(&c, "POST", &url, &[ct], body.clone()).await;
    assert_eq!(a.status, 200);
    assert_eq!((p.count(), d.count()), (0, 1), "no header: passthrough");

    let target = p.addr.to_string();
    for h in [target.clone(), format!("http://{target}")] {
        let a = send(
            &c,
            "POST",
            &url,
            &[ct, ("x-prefiller-host-port", &h)],
            body.clone(),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(
            a.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
            7
        );
    }
    assert_eq!((p.count(), d.count()), (2, 3));
    assert!(d
        .seen()
        .iter()
        .chain(p.seen().iter())
        .all(|s| s.headers.get("x-prefiller-host-port").is_none()));
    assert_eq!(
        d.seen()[2].json()["kv_transfer_params"]["remote_port"],
        4032
    );

    // Same host, another port: refused.
    let a = send(
        &c,
        "POST",
        &url,
        &[ct, ("x-prefiller-host-port", "127.0.0.1:1")],
        body.clone(),
    )
    .await;
    assert_eq!(a.status, 403);
    let a = send(
        &c,
        "POST",
        &url,
        &[ct, ("x-prefiller-host-port", "evil.example.com:8000")],
        body.clone(),
    )
    .await;
    assert_eq!(a.status, 403);
    assert_eq!((p.count(), d.count()), (2, 3));

    // RT retries: one 503 then success.
    p.push(Reply::Status(503));
    let a = send(
        &c,
        "POST",
        &url,
        &[ct, ("x-prefiller-host-port", &target)],
        body.clone(),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(p.count(), 4);
}

/// Bad sidecar configurations are refused at startup, not at the first request.
#[test]
fn sidecar_refuses_unsupported_options() {
    for args in [
        &["sidecar", "--kv-connector=sglang"][..],
        &["sidecar", "--secure-proxy"],
        &["sidecar", "--enable-ssrf-protection"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pdctl"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pdctl"))
        .args(["sidecar", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--enable-ssrf-protection"));
}
