//! The simulator as a real process: vLLM's surface, P/D by hand between two engines with a real
//! KV pull, and the failure modes a proxy must not hide.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::eventually;
use support::http::{get, hang_up_after, post, request};
use support::process::{pdctl, Child, Sim};

const PROMPT: &str = "Explain disaggregated prefill and decode in two sentences, please.";

fn prefill_params() -> Value {
    json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
           "remote_block_ids": null, "remote_host": null, "remote_port": null})
}

fn prefill(sim: &Sim, prompt: &str, extra: Value) -> Value {
    let mut body = json!({"model": "sim-model", "prompt": prompt, "max_tokens": 1,
                          "stream": false, "kv_transfer_params": prefill_params()});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    let reply = post(sim.port, "/v1/completions", &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// The decode's `vllm:prompt_tokens_by_source_total` for one source.
fn prompt_tokens_from(sim: &Sim, source: &str) -> f64 {
    let page = get(sim.port, "/metrics").body;
    let label = format!("source=\"{source}\"");
    page.lines()
        .filter(|l| l.starts_with("vllm:prompt_tokens_by_source_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .next()
        .unwrap_or_else(|| panic!("no {source} sample in:\n{page}"))
}

fn decode(sim: &Sim, params: &Value) -> Value {
    let reply = post(
        sim.port,
        "/v1/completions",
        &json!({"model": "sim-model", "prompt": PROMPT, "max_tokens": 4,
                "kv_transfer_params": params}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

#[test]
fn pd_by_hand_pulls_the_blocks_once() {
    let (p, d) = (Sim::start(&[]), Sim::start(&[]));
    let answer = prefill(&p, PROMPT, json!({}));
    let params = &answer["kv_transfer_params"];
    assert_eq!(params["do_remote_prefill"], true);
    assert_eq!(params["do_remote_decode"], false);
    assert_eq!(params["remote_port"], p.side_port);
    assert_eq!(params["remote_host"], "127.0.0.1");
    assert_eq!(params["tp_size"], 1);
    // The real engine's shape (vLLM 0.32, NixlConnector in pull mode).
    assert!(
        params["remote_block_ids"][0][0].is_u64(),
        "one list of block ids per KV cache group: {params}"
    );
    assert_eq!(params["dcp_size"], 1);
    assert_eq!(params["pp_size"], 1);
    assert_eq!(params["transfer_mode"], "pull");
    assert_eq!(params["remote_blocks_expiry_time"], Value::Null);
    assert_eq!(
        params["remote_num_tokens"],
        answer["usage"]["prompt_tokens"]
    );
    assert!(params["remote_prefill_cached_tokens"].is_u64(), "{params}");
    assert!(params["remote_engine_id"].is_string() && params["remote_request_id"].is_string());
    assert!(
        p.metric("vllm:kv_cache_usage_perc") > 0.0,
        "blocks held for the pull"
    );

    let out = decode(&d, params);
    assert_eq!(out["choices"][0]["finish_reason"], "length");
    assert_eq!(out["usage"]["completion_tokens"], 4);
    let prompt = out["usage"]["prompt_tokens"].as_f64().unwrap();
    assert_eq!(
        [
            prompt_tokens_from(&d, "external_kv_transfer"),
            prompt_tokens_from(&d, "local_compute")
        ],
        [prompt, 0.0],
        "the whole prompt came from the transfer, as the real decode counts it"
    );
    assert_eq!(d.metric("pdctl_sim_kv_pulls_ok_total"), 1.0);
    assert_eq!(d.metric("pdctl_sim_kv_pulls_failed_total"), 0.0);
    assert_eq!(p.metric("pdctl_sim_kv_transfers_served_total"), 1.0);
    assert_eq!(p.metric("pdctl_sim_kv_pending_transfers"), 0.0);
    assert_eq!(
        p.metric("vllm:kv_cache_usage_perc"),
        0.0,
        "freed after the pull"
    );

    // The same params again are stale: the decode recomputes and says so.
    decode(&d, params);
    assert_eq!(prompt_tokens_from(&d, "external_kv_transfer"), prompt);
    assert!(prompt_tokens_from(&d, "local_compute") > 0.0);
    assert_eq!(d.metric("pdctl_sim_kv_pulls_failed_total"), 1.0);
    assert_eq!(p.metric("pdctl_sim_kv_transfers_rejected_total"), 1.0);
}

#[test]
fn mangled_params_are_counted_failures() {
    let (p, d) = (Sim::start(&[]), Sim::start(&[]));
    let manglings: [fn(&mut Value); 4] = [
        |v| v["remote_engine_id"] = json!("someone-else"),
        |v| v["remote_block_ids"] = json!([999_999]),
        |v| {
            v.as_object_mut().unwrap().remove("remote_request_id");
        },
        |v| v["remote_block_ids"] = json!(["0"]),
    ];
    for (i, mangle) in manglings.iter().enumerate() {
        let mut params =
            prefill(&p, &format!("{PROMPT} #{i}"), json!({}))["kv_transfer_params"].clone();
        mangle(&mut params);
        let out = decode(&d, &params);
        assert_eq!(
            out["choices"][0]["finish_reason"], "length",
            "still answered"
        );
        assert_eq!(d.metric("pdctl_sim_kv_pulls_failed_total"), (i + 1) as f64);
    }
    assert_eq!(d.metric("pdctl_sim_kv_pulls_ok_total"), 0.0);
    assert_eq!(p.metric("pdctl_sim_kv_transfers_served_total"), 0.0);
}

#[test]
fn eos_on_the_prefill_token_gives_null_params_unless_ignore_eos() {
    let p = Sim::start(&[]);
    let answer = prefill(&p, "stop right here [eos]", json!({}));
    assert_eq!(answer["kv_transfer_params"], Value::Null);
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(p.metric("vllm:kv_cache_usage_perc"), 0.0, "nothing kept");

    let answer = prefill(&p, "stop right here [eos]", json!({"ignore_eos": true}));
    assert_eq!(answer["kv_transfer_params"]["do_remote_prefill"], true);
}

#[test]
fn unpulled_blocks_expire_after_the_abort_timeout() {
    let (p, d) = (
        Sim::start(&["--kv-abort-timeout", "150ms"]),
        Sim::start(&[]),
    );
    let params = prefill(&p, PROMPT, json!({}))["kv_transfer_params"].clone();
    eventually("the prefill frees expired blocks", || {
        p.metric("pdctl_sim_kv_blocks_expired_total") == 1.0
    });
    assert_eq!(p.metric("vllm:kv_cache_usage_perc"), 0.0);
    decode(&d, &params);
    assert_eq!(d.metric("pdctl_sim_kv_pulls_failed_total"), 1.0);
}

#[test]
fn prefill_refuses_streaming() {
    let p = Sim::start(&[]);
    let reply = post(
        p.port,
        "/v1/completions",
        &json!({"prompt": "x", "stream": true, "kv_transfer_params": prefill_params()}),
    );
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["type"], "BadRequestError");
}

#[test]
fn chat_streams_with_usage_and_done() {
    let sim = Sim::start(&[]);
    let reply = post(
        sim.port,
        "/v1/chat/completions",
        &json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi there"}],
                "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(reply.status, 200);
    assert!(reply
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let frames: Vec<&str> = reply
        .body
        .split("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .collect();
    assert_eq!(frames.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks.len(), 1 + 3 + 1, "role, 3 tokens, usage");
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
    let usage = &chunks[4];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
}

#[test]
fn prefix_cache_reports_cached_tokens() {
    let sim = Sim::start(&["--block-size", "4"]);
    let long = "a".repeat(160);
    let ask = |suffix: &str| {
        post(
            sim.port,
            "/v1/completions",
            &json!({"prompt": format!("{long}{suffix}"), "max_tokens": 1}),
        )
        .json()
    };
    assert_eq!(
        ask("one")["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );
    assert_eq!(
        ask("two")["usage"]["prompt_tokens_details"]["cached_tokens"],
        40
    );
    assert!(sim.metric("vllm:prefix_cache_hits_total") >= 40.0);
}

#[test]
fn client_disconnect_aborts_streaming_and_waiting_requests() {
    let sim = Sim::start(&["--inter-token-latency", "20ms"]);
    hang_up_after(
        sim.port,
        "/v1/completions",
        &json!({"prompt": "tell me a long story", "max_tokens": 500, "stream": true}),
        300,
    );
    eventually("the streamed request is aborted", || {
        sim.metric("pdctl_sim_requests_aborted_total") == 1.0
    });
    eventually("its slot is freed", || {
        sim.metric("vllm:num_requests_running") == 0.0
    });

    let slow = Sim::start(&["--prefill-time-per-token", "200ms"]);
    hang_up_after(
        slow.port,
        "/v1/completions",
        &json!({"prompt": "x".repeat(400), "max_tokens": 1}),
        0,
    );
    eventually("the non-streaming request is aborted", || {
        slow.metric("pdctl_sim_requests_aborted_total") == 1.0
    });
    assert_eq!(slow.metric("vllm:kv_cache_usage_perc"), 0.0);
}

#[test]
fn crash_after_exits_non_zero() {
    let mut sim = Sim::start(&["--crash-after", "2"]);
    for _ in 0..2 {
        post(sim.port, "/v1/completions", &json!({"prompt": "x"}));
    }
    let status = sim.child.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(3));
}

#[test]
fn startup_delay_refuses_health_then_serves() {
    let sim = Sim::start(&["--startup-delay", "700ms"]);
    assert_eq!(get(sim.port, "/health").status, 503);
    assert_eq!(
        post(sim.port, "/v1/completions", &json!({"prompt": "x"})).status,
        503
    );
    eventually("health turns 200", || {
        get(sim.port, "/health").status == 200
    });
}

#[test]
fn vllm_error_shape_and_request_checks() {
    let sim = Sim::start(&["--max-model-len", "64"]);
    let cases = [
        (
            json!({"prompt": "x", "stream_options": {"include_usage": true}}),
            400,
        ),
        (
            json!({"prompt": "x", "max_tokens": 1, "min_tokens": 2}),
            400,
        ),
        (json!({"prompt": "x".repeat(400)}), 400),
        (json!({"model": "other", "prompt": "x"}), 404),
        (json!({"prompt": "x", "max_tokens": 0}), 400),
    ];
    for (body, status) in cases {
        let reply = post(sim.port, "/v1/completions", &body);
        assert_eq!(reply.status, status, "{body}: {}", reply.body);
        let err = &reply.json()["error"];
        assert_eq!(err["code"], status);
        assert!(err["message"].is_string() && err["type"].is_string());
    }
    let reply = request(sim.port, "POST", "/v1/completions", &[], "{not json");
    assert_eq!(reply.status, 400);
    assert_eq!(get(sim.port, "/nope").status, 404);
    let forced = request(
        sim.port,
        "POST",
        "/v1/completions",
        &[("x-return-error", "503")],
        r#"{"prompt":"x"}"#,
    );
    assert_eq!(forced.status, 503);
    let models = get(sim.port, "/v1/models").json();
    assert_eq!(models["data"][0]["id"], "sim-model");
    assert_eq!(models["data"][0]["max_model_len"], 64);
}

#[test]
fn echoes_the_request_id() {
    let sim = Sim::start(&[]);
    let reply = request(
        sim.port,
        "POST",
        "/v1/chat/completions",
        &[("x-request-id", "abc-123")],
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#,
    );
    assert_eq!(reply.header("x-request-id"), Some("abc-123"));
    assert_eq!(reply.json()["id"], "chatcmpl-abc-123");
}

#[test]
fn runs_as_vllm_with_the_planned_argv() {
    let dir = tempfile::tempdir().unwrap();
    let vllm = dir.path().join("vllm");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_pdctl"), &vllm).unwrap();
    let port = support::ports::reserve(2);
    let side = port + 1;
    let _guard = Child::spawn(
        std::process::Command::new(&vllm)
            .args(["serve", "/mnt/models", "--port", &port.to_string()])
            .args(["--served-model-name", "qwen", "--tensor-parallel-size", "2"])
            .args([
                "--kv-transfer-config",
                r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#,
            ])
            .args(["--enforce-eager", "--gpu-memory-utilization", "0.9"])
            .env("VLLM_NIXL_SIDE_CHANNEL_PORT", side.to_string()),
    );
    support::http::wait_serving(port);
    assert_eq!(get(port, "/v1/models").json()["data"][0]["id"], "qwen");
    let answer = post(
        port,
        "/v1/completions",
        &json!({"model": "qwen", "prompt": "hello", "max_tokens": 1, "kv_transfer_params": prefill_params()}),
    )
    .json();
    assert_eq!(answer["kv_transfer_params"]["remote_port"], side);
    assert_eq!(answer["kv_transfer_params"]["tp_size"], 2);
}

#[test]
fn bad_flags_exit_2_and_help_exits_0() {
    let out = pdctl().args(["sim", "--port", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--port: invalid value"));
    let out = pdctl().args(["sim", "--help"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--inter-token-latency"));
}
