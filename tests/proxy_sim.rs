//! `pdctl proxy` (the real binary) in front of real `pdctl sim` engines: every request does a
//! real KV pull, streams survive keep-alive, a client hang-up aborts the engine's work, the
//! routing policies spread real traffic, and a real OpenAI client library works through it.

mod support;

use std::time::Duration;

use serde_json::json;
use support::eventually;
use support::http::{hang_up_after, post, Conn};
use support::process::{Proxy, Sim};

fn proxy_for(prefill: &[&Sim], decode: &[&Sim], extra: &[&str]) -> Proxy {
    let mut args = Vec::new();
    for p in prefill {
        args.extend(["--prefill".to_string(), p.url()]);
    }
    for d in decode {
        args.extend(["--decode".to_string(), d.url()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Proxy::start("proxy", &args)
}

/// Every request, streamed or not, completions or chat, goes P then D and D pulls the KV.
#[test]
fn every_request_pulls_its_kv_from_the_prefill() {
    let (p, d) = (Sim::start(&[]), Sim::start(&[]));
    let proxy = proxy_for(&[&p], &[&d], &[]);
    let mut n = 0;
    for stream in [false, true] {
        for i in 0..3 {
            let reply = post(
                proxy.port,
                "/v1/completions",
                &json!({"model": "sim-model", "prompt": format!("request {i}: tell me about KV"),
                        "max_tokens": 4, "stream": stream}),
            );
            assert_eq!(reply.status, 200, "{}", reply.body);
            assert_eq!(reply.header("x-pdctl-path"), Some("pd"));
            if !stream {
                assert_eq!(reply.json()["usage"]["completion_tokens"], 4);
            }
            let options = if stream {
                json!({"include_usage": true})
            } else {
                json!(null)
            };
            let reply = post(
                proxy.port,
                "/v1/chat/completions",
                &json!({"model": "sim-model",
                        "messages": [{"role": "user", "content": format!("Hi {i}, a chat [eos] here")}],
                        "max_tokens": 4, "stream": stream, "stream_options": options}),
            );
            assert_eq!(reply.status, 200, "{}", reply.body);
            if stream {
                assert!(
                    reply.body.contains("prompt_tokens_details")
                        && reply.body.ends_with("data: [DONE]\n\n"),
                    "{}",
                    reply.body
                );
            }
            n += 2;
        }
    }
    // The chat prompts contain `[eos]`: without ignore_eos on the prefill leg the sim would
    // hand over no KV for them and the pull counts would fall short.
    assert_eq!(d.metric("pdctl_sim_kv_pulls_ok_total"), n as f64);
    assert_eq!(d.metric("pdctl_sim_kv_pulls_failed_total"), 0.0);
    assert_eq!(p.metric("pdctl_sim_kv_transfers_served_total"), n as f64);
    assert_eq!(p.metric("pdctl_sim_kv_pending_transfers"), 0.0);
}

#[test]
fn streams_back_to_back_on_one_keep_alive_connection() {
    let (p, d) = (
        Sim::start(&[]),
        Sim::start(&["--inter-token-latency", "2ms"]),
    );
    let proxy = proxy_for(&[&p], &[&d], &[]);
    let mut conn = Conn::open_with_timeout(proxy.port, Duration::from_secs(10));
    for i in 0..3 {
        let body =
            json!({"prompt": format!("stream {i}"), "max_tokens": 20, "stream": true}).to_string();
        let reply = conn.send("POST", "/v1/completions", &[], &body);
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(reply.body.contains("data: [DONE]"));
        assert_eq!(reply.body.matches("\"text\":").count(), 20);
    }
    assert_eq!(d.metric("pdctl_sim_kv_pulls_ok_total"), 3.0);
}

/// A client gone mid-stream aborts the decode request; one gone during the prefill aborts the
/// prefill request; the proxy counts both.
#[test]
fn a_client_hang_up_aborts_the_engine_leg_it_is_waiting_on() {
    let p = Sim::start(&["--prefill-time-per-token", "5ms"]);
    let d = Sim::start(&["--inter-token-latency", "20ms"]);
    let proxy = proxy_for(&[&p], &[&d], &[]);
    hang_up_after(
        proxy.port,
        "/v1/completions",
        &json!({"prompt": "a very long story", "max_tokens": 500, "stream": true}),
        400,
    );
    eventually("the decode engine aborts the request", || {
        d.metric("pdctl_sim_requests_aborted_total") == 1.0
    });
    eventually("the proxy counts the disconnect", || {
        proxy.metric("pdctl_proxy_client_disconnects_total") == 1.0
    });

    // 1000 prompt tokens at 5 ms each: the prefill is still running when the client leaves.
    hang_up_after(
        proxy.port,
        "/v1/completions",
        &json!({"prompt": "abcd".repeat(1000), "max_tokens": 5}),
        0,
    );
    eventually("the prefill engine aborts the request", || {
        p.metric("pdctl_sim_requests_aborted_total") == 1.0
    });
    eventually("the proxy counts the second disconnect", || {
        proxy.metric("pdctl_proxy_client_disconnects_total") == 2.0
    });
}

#[test]
fn load_aware_and_prefix_affinity_route_real_traffic() {
    let (p, d1, d2) = (Sim::start(&[]), Sim::start(&[]), Sim::start(&[]));
    let proxy = proxy_for(
        &[&p],
        &[&d1, &d2],
        &[
            "--prefill-policy",
            "load-aware",
            "--decode-policy",
            "prefix-affinity",
        ],
    );
    let shared = "z".repeat(300);
    for i in 0..6 {
        let reply = post(
            proxy.port,
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
    let proxy = proxy_for(&[&p], &[&d], &[]);
    let out = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openai_client.py"
        ))
        .arg(format!("http://127.0.0.1:{}/v1", proxy.port))
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
