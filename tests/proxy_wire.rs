//! What `pdctl proxy` puts on the wire and how it handles failing engines, checked against
//! scriptable fake engines (protocol.md §12).

mod common;

use std::time::Duration;

use common::fake::{Answer, Fake, Seen};
use common::{get, post, request, start_proxy};
use serde_json::{json, Value};

fn prefill_ok(cached: u64) -> impl Fn(usize, &Seen) -> Answer + Send + Sync + 'static {
    move |_, _| {
        Answer::json(
            200,
            json!({"kv_transfer_params": {"remote_block_ids": [1, 2, 3],
                     "remote_engine_id": "5b5fb28f", "remote_host": "ahost", "remote_port": 4032,
                     "future_field": {"kept": true}},
                   "usage": {"prompt_tokens": 64, "completion_tokens": 1, "total_tokens": 65,
                             "prompt_tokens_details": {"cached_tokens": cached}}}),
        )
    }
}

fn decode_ok() -> impl Fn(usize, &Seen) -> Answer + Send + Sync + 'static {
    |_, seen| {
        if seen.json()["stream"] == true {
            return Answer::sse(
                "data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}]}\n\n\
                 data: {\"choices\":[],\"usage\":{\"prompt_tokens\":64,\"prompt_tokens_details\":{\"cached_tokens\":49}}}\n\n\
                 data: [DONE]\n\n",
            );
        }
        Answer::json(
            200,
            json!({"id": "chatcmpl-test", "object": "chat.completion", "choices": [],
                   "usage": {"prompt_tokens": 64, "prompt_tokens_details": {"cached_tokens": 49}}}),
        )
    }
}

fn args(p: &[&Fake], d: &[&Fake], extra: &[&str]) -> Vec<String> {
    let mut a = Vec::new();
    for f in p {
        a.extend(["--prefill".to_string(), f.url()]);
    }
    for f in d {
        a.extend(["--decode".to_string(), f.url()]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

const CHAT: &str = "/v1/chat/completions";

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "Qwen/Qwen2-0.5B",
                          "messages": [{"role": "user", "content": "Hello"}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap());
    body
}

#[test]
fn both_legs_have_the_nixl_v2_shape() {
    let (p, d) = (Fake::start(prefill_ok(7)), Fake::start(decode_ok()));
    let (_proxy, port) = start_proxy("proxy", &args(&[&p], &[&d], &[]));
    let reply = request(
        port,
        "POST",
        CHAT,
        &[
            ("x-request-id", "client-id-1"),
            ("authorization", "Bearer engine-key"),
        ],
        &chat(
            json!({"max_tokens": 100, "max_completion_tokens": 100, "min_tokens": 5,
                     "stop": ["\n"], "custom": [1, 2]}),
        )
        .to_string(),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-pdctl-path"), Some("pd"));
    assert_eq!(reply.header("x-request-id"), Some("client-id-1"));
    let (ps, ds) = (p.requests(), d.requests());
    assert_eq!((ps.len(), ds.len()), (1, 1));

    let pb = ps[0].json();
    assert_eq!(
        pb["kv_transfer_params"],
        json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
               "remote_block_ids": null, "remote_host": null, "remote_port": null})
    );
    assert_eq!(
        (
            pb["max_tokens"].clone(),
            pb["max_completion_tokens"].clone()
        ),
        (json!(1), json!(1))
    );
    assert_eq!(pb["min_tokens"], 1);
    assert_eq!(pb["stream"], false);
    assert_eq!(pb["ignore_eos"], true);
    assert!(pb.get("stream_options").is_none() && pb.get("stop").is_none());
    assert!(pb.get("do_remote_decode").is_none());
    assert_eq!(pb["custom"], json!([1, 2]));
    assert_eq!(ps[0].path, CHAT);

    let db = ds[0].json();
    assert_eq!(db["max_tokens"], 100);
    assert_eq!(db["max_completion_tokens"], 100);
    assert_eq!(db["min_tokens"], 5);
    assert_eq!(db["stop"], json!(["\n"]));
    assert_eq!(
        db["kv_transfer_params"]["remote_block_ids"],
        json!([1, 2, 3])
    );
    assert_eq!(
        db["kv_transfer_params"]["future_field"],
        json!({"kept": true}),
        "verbatim"
    );
    assert!(db.get("stream").is_none() && db.get("ignore_eos").is_none());

    for leg in [&ps[0], &ds[0]] {
        assert_eq!(leg.header("x-request-id"), Some("client-id-1"));
        assert_eq!(leg.header("authorization"), Some("Bearer engine-key"));
    }
    assert_eq!(
        reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        7
    );
}

#[test]
fn absent_limits_stay_absent_and_one_id_is_shared() {
    let (p, d) = (Fake::start(prefill_ok(0)), Fake::start(decode_ok()));
    let (_proxy, port) = start_proxy("proxy", &args(&[&p], &[&d], &[]));
    let reply = post(port, CHAT, &chat(json!({})));
    assert_eq!(reply.status, 200);
    let db = d.requests()[0].json();
    for key in [
        "max_tokens",
        "max_completion_tokens",
        "min_tokens",
        "stream",
        "stream_options",
    ] {
        assert!(db.get(key).is_none(), "{key} must stay absent on decode");
    }
    let id = reply.header("x-request-id").unwrap().to_string();
    assert!(id.len() >= 16);
    assert_eq!(p.requests()[0].header("x-request-id"), Some(id.as_str()));
    assert_eq!(d.requests()[0].header("x-request-id"), Some(id.as_str()));
    assert_eq!(
        reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        0,
        "P's 0 wins"
    );
}

#[test]
fn streaming_usage_is_rewritten_and_responses_api_is_capped() {
    let (p, d) = (Fake::start(prefill_ok(7)), Fake::start(decode_ok()));
    let (_proxy, port) = start_proxy("proxy", &args(&[&p], &[&d], &[]));
    let reply = post(
        port,
        CHAT,
        &chat(json!({"stream": true, "stream_options": {"include_usage": true}})),
    );
    assert!(reply
        .header("content-type")
        .unwrap()
        .contains("text/event-stream"));
    assert!(reply.body.contains("\"content\":\"hello\""));
    assert!(reply.body.contains("\"cached_tokens\":7"));
    assert!(!reply.body.contains("\"cached_tokens\":49"));
    assert!(reply.body.contains("data: [DONE]"));
    assert_eq!(p.requests()[0].json()["stream"], false);
    assert_eq!(d.requests()[0].json()["stream"], true);
    assert_eq!(
        d.requests()[0].json()["stream_options"],
        json!({"include_usage": true})
    );

    let reply = post(
        port,
        "/v1/responses",
        &json!({"model": "gpt-4o", "input": "Hello", "max_output_tokens": 50}),
    );
    assert_eq!(reply.status, 200);
    let (pb, db) = (p.requests()[1].json(), d.requests()[1].json());
    assert_eq!(pb["max_output_tokens"], 1);
    assert_eq!(db["max_output_tokens"], 50);
    assert!(pb.get("max_tokens").is_none());
}

fn failing(status: u16, times: usize) -> impl Fn(usize, &Seen) -> Answer + Send + Sync + 'static {
    let ok = prefill_ok(0);
    move |n, seen| {
        if n < times {
            Answer::json(
                status,
                json!({"error": {"message": "busy", "code": status}}),
            )
        } else {
            ok(n, seen)
        }
    }
}

#[test]
fn retry_policy_like_llm_d() {
    let fast = [
        "--prefill-failure",
        "retry",
        "--prefill-retry-backoff",
        "1ms",
    ];
    for status in [502, 503, 504] {
        let (p, d) = (Fake::start(failing(status, 1)), Fake::start(decode_ok()));
        let extra = [&fast[..], &["--prefill-max-retries", "2"]].concat();
        let (_proxy, port) = start_proxy("proxy", &args(&[&p], &[&d], &extra));
        assert_eq!(post(port, CHAT, &chat(json!({}))).status, 200);
        assert_eq!((p.requests().len(), d.requests().len()), (2, 1), "{status}");
        assert!(d.requests()[0].json()["kv_transfer_params"].is_object());
    }
    let cases = [(502, 0, 502, 1), (502, 2, 502, 3), (500, 2, 500, 1)];
    for (status, retries, client_sees, p_calls) in cases {
        let (p, d) = (
            Fake::start(failing(status, usize::MAX)),
            Fake::start(decode_ok()),
        );
        let r = retries.to_string();
        let extra = [&fast[..], &["--prefill-max-retries", &r]].concat();
        let (_proxy, port) = start_proxy("proxy", &args(&[&p], &[&d], &extra));
        let reply = post(port, CHAT, &chat(json!({})));
        assert_eq!(reply.status, client_sees);
        assert_eq!(reply.json()["error"]["message"], "busy", "P's own body");
        assert_eq!(
            p.requests().len(),
            p_calls,
            "{status} with {retries} retries"
        );
        assert_eq!(d.requests().len(), 0, "decode never called");
    }
}

#[test]
fn retries_go_to_another_ready_prefill() {
    let bad = Fake::start(failing(503, usize::MAX));
    let good = Fake::start(prefill_ok(0));
    let d = Fake::start(decode_ok());
    let extra = [
        "--prefill-policy",
        "round-robin",
        "--prefill-retry-backoff",
        "1ms",
    ];
    let (_proxy, port) = start_proxy("proxy", &args(&[&bad, &good], &[&d], &extra));
    for _ in 0..4 {
        assert_eq!(post(port, CHAT, &chat(json!({}))).status, 200);
    }
    assert_eq!(
        good.requests().len(),
        4,
        "each request ended on the good prefill"
    );
    let first_tries_on_bad = bad.requests().len();
    assert!(
        (1..=4).contains(&first_tries_on_bad),
        "{first_tries_on_bad}"
    );
}

#[test]
fn fallback_policy_serves_decode_only_and_says_so() {
    let (p, d) = (
        Fake::start(failing(503, usize::MAX)),
        Fake::start(decode_ok()),
    );
    let extra = [
        "--prefill-failure",
        "fallback",
        "--prefill-max-retries",
        "1",
        "--prefill-retry-backoff",
        "1ms",
    ];
    let (_proxy, port) = start_proxy("proxy", &args(&[&p], &[&d], &extra));
    let reply = post(port, CHAT, &chat(json!({"max_tokens": 9})));
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-pdctl-path"), Some("fallback"));
    assert_eq!(p.requests().len(), 2);
    let db = d.requests()[0].json();
    assert!(db.get("kv_transfer_params").is_none(), "the original body");
    assert_eq!(db["max_tokens"], 9);
    let metrics = get(port, "/metrics").body;
    assert!(
        metrics.contains("pdctl_proxy_fallbacks_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("path=\"fallback\""));
}

#[test]
fn unreachable_decode_is_replaced_and_unreachable_prefill_is_502() {
    let dead = common::free_port();
    let (p, d) = (Fake::start(prefill_ok(0)), Fake::start(decode_ok()));
    let mut a = args(&[&p], &[], &["--decode-policy", "round-robin"]);
    a.extend([
        "--decode".into(),
        format!("http://127.0.0.1:{dead}"),
        "--decode".into(),
        d.url(),
    ]);
    let (_proxy, port) = start_proxy("proxy", &a);
    for _ in 0..4 {
        assert_eq!(post(port, CHAT, &chat(json!({}))).status, 200);
    }
    assert_eq!(d.requests().len(), 4);

    let extra = ["--prefill-failure", "fail"];
    let mut a = args(&[], &[&d], &extra);
    a.extend(["--prefill".into(), format!("http://127.0.0.1:{dead}")]);
    let (_proxy, port) = start_proxy("proxy", &a);
    let reply = post(port, CHAT, &chat(json!({})));
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["error"]["code"], 502);
}

#[test]
fn a_slow_prefill_times_out_with_504() {
    let slow = Fake::start(|n, s| Answer {
        delay: Duration::from_secs(3),
        ..prefill_ok(0)(n, s)
    });
    let d = Fake::start(decode_ok());
    let extra = ["--prefill-timeout", "200ms", "--prefill-failure", "fail"];
    let (_proxy, port) = start_proxy("proxy", &args(&[&slow], &[&d], &extra));
    let reply = post(port, CHAT, &chat(json!({})));
    assert_eq!(reply.status, 504);
    assert_eq!(reply.json()["error"]["type"], "GatewayTimeout");
}

#[test]
fn guards_body_limit_json_api_key_and_foreign_prefill_header() {
    let (p, d) = (Fake::start(prefill_ok(0)), Fake::start(decode_ok()));
    let extra = ["--max-body-bytes", "300", "--api-key", "s3cret"];
    let (_proxy, port) = start_proxy("proxy", &args(&[&p], &[&d], &extra));
    let auth = ("authorization", "Bearer s3cret");
    assert_eq!(
        request(port, "POST", CHAT, &[], &chat(json!({})).to_string()).status,
        401
    );
    assert_eq!(get(port, "/health").status, 200, "health needs no key");
    let big = chat(json!({"pad": "x".repeat(400)})).to_string();
    assert_eq!(request(port, "POST", CHAT, &[auth], &big).status, 413);
    let bad = request(port, "POST", CHAT, &[auth], "{nope");
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["type"], "BadRequestError");
    let reply = request(
        port,
        "POST",
        CHAT,
        &[auth, ("x-prefiller-host-port", "169.254.169.254:80")],
        &chat(json!({})).to_string(),
    );
    assert_eq!(reply.status, 200);
    assert_eq!(p.requests().len(), 1, "went to the known prefill instead");
    assert!(p.requests()[0].header("x-prefiller-host-port").is_none());
    assert!(d.requests()[0].header("x-prefiller-host-port").is_none());
}

#[test]
fn threshold_and_passthrough_skip_the_prefill() {
    let (p, d) = (
        Fake::start(prefill_ok(0)),
        Fake::start(|_, _| Answer::json(200, json!({"ok": 1}))),
    );
    let (_proxy, port) = start_proxy("proxy", &args(&[&p], &[&d], &["--pd-threshold", "1000"]));
    let reply = post(
        port,
        "/v1/completions",
        &json!({"prompt": "short", "max_tokens": 3}),
    );
    assert_eq!(reply.header("x-pdctl-path"), Some("decode_only"));
    assert_eq!(get(port, "/v1/models").json(), json!({"ok": 1}));
    let reply = request(port, "GET", "/v1/completions", &[], "");
    assert_eq!(reply.status, 200, "a GET on a P/D path is passed through");
    assert!(p.requests().is_empty());
    assert_eq!(d.requests().len(), 3);
    assert_eq!(d.requests()[1].path, "/v1/models");
}

#[test]
fn sidecar_takes_the_prefill_from_the_header_with_ssrf_ports_checked() {
    let (p, d) = (Fake::start(prefill_ok(7)), Fake::start(decode_ok()));
    let allowed = format!("127.0.0.1:{}", p.port);
    let sidecar_args: Vec<String> = vec![
        format!("-vllm-port={}", d.port),
        "--kv-connector=nixlv2".into(),
        "--enable-ssrf-protection=true".into(),
        format!("--ssrf-allowlist={allowed}"),
        "--inference-pool=ns/pool".into(),
        String::new(),
    ];
    let (_sidecar, port) = start_proxy("sidecar", &sidecar_args);
    let send = |header: Option<&str>| {
        let headers: Vec<(&str, &str)> = header
            .map(|h| ("x-prefiller-host-port", h))
            .into_iter()
            .collect();
        request(port, "POST", CHAT, &headers, &chat(json!({})).to_string())
    };
    let reply = send(Some(&allowed));
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        7
    );
    assert_eq!(p.requests().len(), 1);
    assert!(d.requests()[0].header("x-prefiller-host-port").is_none());
    let reply = send(Some(&format!("http://{allowed}")));
    assert_eq!(reply.status, 200);
    let other_port = format!("127.0.0.1:{}", d.port);
    assert_eq!(send(Some(&other_port)).status, 403, "same host, other port");
    assert_eq!(send(Some("evil.example:80")).status, 403);
    let reply = send(None);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-pdctl-path"), Some("decode_only"));
    assert_eq!(p.requests().len(), 2);
    assert_eq!(get(port, "/health").status, 200);
}

#[test]
fn sidecar_refuses_what_it_cannot_do() {
    for bad in [
        vec!["--kv-connector=lmcache"],
        vec!["--secure-proxy=true"],
        vec!["--enable-ssrf-protection=true"],
    ] {
        let out = common::pdctl().arg("sidecar").args(&bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(!out.stderr.is_empty());
    }
}
