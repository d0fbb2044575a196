//! What the P/D proxy puts on the wire and how it handles engines that fail, through
//! `proxy::serve_embedded` (the daemon's entry point) in the test process, against scripted fake
//! engines on loopback. The command-line front doors are tested in `proxy_cli.rs`.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use pdctl::spec::proxy::{PickPolicy, PrefillFailurePolicy, ProxySection};
use serde_json::{json, Value};
use support::embedded::{endpoint, Embedded};
use support::engine::{prefill_answer, Fake, Reply, Role};
use support::eventually;
use support::http::{get, post, read_partly, request, wait_status};

fn fast() -> ProxySection {
    ProxySection {
        prefill_retry_backoff: Duration::from_millis(1),
        ..ProxySection::default()
    }
}

fn pair() -> (Fake, Fake) {
    (Fake::start(Role::Prefill), Fake::start(Role::Decode))
}

const CHAT: &str = "/v1/chat/completions";

fn hello() -> Value {
    json!({"model":"Qwen/Qwen2-0.5B","messages":[{"role":"user","content":"Hello"}],"max_tokens":50})
}

fn cached_tokens(reply: &support::http::Reply) -> Value {
    reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"].clone()
}

/// One prefill and one decode call with NixlConnector's shapes, one shared request id, and the
/// prefill's cached_tokens in the client's usage.
#[test]
fn both_legs_have_the_nixl_shape() {
    let (p, d) = pair();
    let px = Embedded::start(fast(), &[&p.url], &[&d.url]);
    let mut body = hello();
    body["max_completion_tokens"] = json!(100);
    body["min_tokens"] = json!(5);
    body["stop"] = json!(["\n"]);
    body["custom"] = json!({"keep": [1, null]});
    let a = request(
        px.port,
        "POST",
        CHAT,
        &[
            ("x-request-id", "client-id-1"),
            ("authorization", "Bearer upstream"),
        ],
        &body.to_string(),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(cached_tokens(&a), 7);
    assert_eq!(a.header("x-request-id"), Some("client-id-1"));
    assert_eq!(a.header("x-pdctl-path"), Some("pd"));
    let (ps, ds) = (p.requests(), d.requests());
    assert_eq!((ps.len(), ds.len()), (1, 1));

    let pj = ps[0].json();
    assert_eq!(
        pj["kv_transfer_params"],
        json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
               "remote_block_ids": null, "remote_host": null, "remote_port": null})
    );
    assert_eq!(pj["max_tokens"], 1);
    assert_eq!(pj["max_completion_tokens"], 1);
    assert_eq!(pj["min_tokens"], 1);
    assert_eq!(pj["stream"], false);
    assert_eq!(pj["ignore_eos"], true);
    assert!(pj.get("stream_options").is_none() && pj.get("stop").is_none());
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
    assert_eq!(
        dj["kv_transfer_params"]["future_field"],
        json!({"kept": true}),
        "verbatim"
    );
    assert_eq!(dj["max_tokens"], 50);
    assert_eq!(dj["max_completion_tokens"], 100);
    assert_eq!(dj["min_tokens"], 5);
    assert_eq!(dj["stop"], json!(["\n"]));
    assert!(dj.get("stream").is_none() && dj.get("ignore_eos").is_none());
    for leg in [&ps[0], &ds[0]] {
        assert_eq!(leg.path, CHAT);
        let ids: Vec<_> = leg.headers.get_all("x-request-id").iter().collect();
        assert_eq!(ids, ["client-id-1"]);
        assert_eq!(leg.header("authorization"), Some("Bearer upstream"));
    }

    // Without a client id, one generated id is shared by both legs and the client; limits the
    // client did not set stay absent on the decode leg; a prefill's 0 cached tokens win.
    p.push(Reply::Json(200, prefill_answer(0)));
    let a = post(
        px.port,
        "/v1/completions",
        &json!({"model":"m","prompt":"hi"}),
    );
    assert_eq!(a.status, 200);
    let id = a.header("x-request-id").unwrap().to_string();
    assert!(id.len() >= 16, "{id}");
    assert_eq!(p.requests()[1].header("x-request-id"), Some(id.as_str()));
    assert_eq!(d.requests()[1].header("x-request-id"), Some(id.as_str()));
    let dj = d.requests()[1].json();
    for key in [
        "max_tokens",
        "max_completion_tokens",
        "min_tokens",
        "stream",
        "stream_options",
    ] {
        assert!(dj.get(key).is_none(), "{key} must stay absent on decode");
    }
    assert_eq!(cached_tokens(&a), 0, "P's 0 wins");
}

/// min_tokens, and the responses API (streamed and not) capped on the prefill leg.
#[test]
fn token_limits_and_responses_api() {
    let (p, d) = pair();
    let px = Embedded::start(fast(), &[&p.url], &[&d.url]);
    let a = post(
        px.port,
        "/v1/completions",
        &json!({"model":"m","prompt":"x","max_tokens":100,"min_tokens":5}),
    );
    assert_eq!(a.status, 200);
    let (pj, dj) = (p.requests()[0].json(), d.requests()[0].json());
    assert_eq!(
        (pj["max_tokens"].clone(), pj["min_tokens"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(
        (dj["max_tokens"].clone(), dj["min_tokens"].clone()),
        (json!(100), json!(5))
    );

    for (n, stream) in [(1, true), (2, false)] {
        let a = post(
            px.port,
            "/v1/responses",
            &json!({"model":"gpt-4o","input":"Hello","max_output_tokens":100,"stream":stream}),
        );
        assert_eq!(a.status, 200);
        let (pj, dj) = (p.requests()[n].json(), d.requests()[n].json());
        assert_eq!(p.requests()[n].path, "/v1/responses");
        assert_eq!(pj["max_output_tokens"], 1);
        assert!(pj.get("max_tokens").is_none());
        assert_eq!(pj["stream"], false);
        assert_eq!(dj["max_output_tokens"], 100);
        assert_eq!(dj["stream"], stream);
    }
}

/// An event stream with the usage chunk split inside its JSON: the usage is rewritten, and
/// streams follow each other on one kept-alive connection without stalling.
#[test]
fn streaming_usage_rewrite() {
    let (p, d) = pair();
    let px = Embedded::start(fast(), &[&p.url], &[&d.url]);
    let mut body = hello();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let mut conn = support::http::Conn::open(px.port);
    for _ in 0..5 {
        let a = conn.send("POST", CHAT, &[], &body.to_string());
        assert_eq!(a.status, 200);
        assert!(a
            .header("content-type")
            .unwrap()
            .contains("text/event-stream"));
        assert!(a.body.contains("\"content\":\"hello\""));
        assert!(a.body.contains("\"cached_tokens\":7"), "{}", a.body);
        assert!(!a.body.contains("\"cached_tokens\":49"));
        assert!(a.body.ends_with("data: [DONE]\n\n"));
    }
    let pj = p.requests()[0].json();
    assert_eq!(pj["stream"], false);
    assert!(pj.get("stream_options").is_none());
    let dj = d.requests()[0].json();
    assert_eq!(dj["stream"], true);
    assert_eq!(dj["stream_options"], json!({"include_usage": true}));
}

/// Passthrough to decode with the body untouched and the decode's answer returned; prefiller
/// headers stripped; a header naming an unknown prefill is ignored, a known one is used.
#[test]
fn passthrough_and_header_stripping() {
    let (p, d) = pair();
    let sec = ProxySection {
        passthrough_paths: vec!["/score".into(), "/healthz".into(), "/v1/embeddings".into()],
        ..fast()
    };
    let px = Embedded::start(sec, &[&p.url], &[&d.url]);
    for path in ["/v1/models", "/score", "/healthz", "/v1/models"] {
        let a = get(px.port, &format!("{path}?q=1"));
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(a.header("x-pdctl-path"), Some("passthrough"));
        assert_eq!(
            a.json()["path"],
            format!("{path}?q=1"),
            "the decode's answer"
        );
    }
    let raw = r#"{"model":"m",  "input":"x"}"#;
    let a = request(
        px.port,
        "POST",
        "/v1/embeddings",
        &[("x-prefiller-host-port", "evil:1")],
        raw,
    );
    assert_eq!(a.status, 200);
    assert_eq!(p.count(), 0);
    let ds = d.requests();
    assert_eq!(ds.len(), 5);
    assert_eq!(ds[0].path, "/v1/models?q=1");
    assert_eq!(ds[4].body, raw.as_bytes());
    assert!(ds[4].header("x-prefiller-host-port").is_none());

    // P/D with a header naming no known prefill: the known prefill serves, the header is gone.
    let a = request(
        px.port,
        "POST",
        CHAT,
        &[("x-prefiller-host-port", "169.254.169.254:80")],
        &hello().to_string(),
    );
    assert_eq!(a.status, 200);
    assert_eq!(p.count(), 1, "went to the known prefill instead");
    assert!(p.requests()[0].header("x-prefiller-host-port").is_none());

    let p2 = Fake::start(Role::Prefill);
    px.change(|s| s.prefill.push(endpoint(&p2.url)));
    for _ in 0..4 {
        let a = request(
            px.port,
            "POST",
            CHAT,
            &[("x-prefiller-host-port", &p2.addr.to_string())],
            &hello().to_string(),
        );
        assert_eq!(a.status, 200);
    }
    assert_eq!(p2.count(), 4);
    assert!(p2
        .requests()
        .iter()
        .all(|s| s.header("x-prefiller-host-port").is_none()));
    assert!(d
        .requests()
        .iter()
        .all(|s| s.header("x-prefiller-host-port").is_none()));
}

/// Only the inference routes, `/v1/models`, health, metrics and `passthrough_paths` are served:
/// vLLM's admin endpoints are 404, a wrong method is 405 with `Allow`, and nothing refused
/// reaches an engine. Headers the client names in `Connection` do not reach the engines.
#[test]
fn route_allowlist_and_connection_named_headers() {
    let (p, d) = pair();
    let px = Embedded::start(fast(), &[&p.url], &[&d.url]);
    for path in [
        "/reset_prefix_cache",
        "/sleep",
        "/collective_rpc",
        "/v1/embeddings",
        "/pdctl/other",
        "/v1/completions/",
        "/",
    ] {
        let a = request(px.port, "POST", path, &[], "{}");
        assert_eq!(a.status, 404, "{path}");
        assert_eq!(a.json()["error"]["code"], 404);
    }
    for (method, path, allow) in [
        ("GET", CHAT, "POST"),
        ("PUT", "/v1/completions", "POST"),
        ("DELETE", "/v1/responses", "POST"),
        ("OPTIONS", CHAT, "POST"),
        ("TRACE", "/v1/models", "GET"),
        ("POST", "/v1/models", "GET"),
        ("POST", "/health", "GET"),
        ("DELETE", "/metrics", "GET"),
    ] {
        let a = request(px.port, method, path, &[], "");
        assert_eq!(a.status, 405, "{method} {path}");
        assert_eq!(a.header("allow"), Some(allow), "{method} {path}");
    }
    assert_eq!(
        (p.count(), d.count()),
        (0, 0),
        "nothing refused reached an engine"
    );

    let headers = [
        ("connection", "keep-alive, X-Secret"),
        ("x-secret", "s"),
        ("x-kept", "k"),
    ];
    let a = request(px.port, "POST", CHAT, &headers, &hello().to_string());
    assert_eq!(a.status, 200);
    let a = request(px.port, "GET", "/v1/models", &headers, "");
    assert_eq!(a.status, 200);
    let legs = [p.requests(), d.requests()].concat();
    assert_eq!(legs.len(), 3);
    for leg in &legs {
        assert!(leg.header("x-secret").is_none(), "{}", leg.path);
        assert_eq!(leg.header("x-kept"), Some("k"), "{}", leg.path);
    }
}

/// Retry on 502/503/504, each retry on another prefill, not on 500; the prefill's own error
/// reaches the client when retries run out.
#[test]
fn retry_policy() {
    let (p1, p2, d) = (
        Fake::start(Role::Prefill),
        Fake::start(Role::Prefill),
        Fake::start(Role::Decode),
    );
    let sec = ProxySection {
        prefill_failure: PrefillFailurePolicy::Retry,
        prefill_max_retries: 2,
        prefill_policy: PickPolicy::RoundRobin,
        ..fast()
    };
    let px = Embedded::start(sec, &[&p1.url, &p2.url], &[&d.url]);
    // First try lands on p1 (round-robin starts there), fails, the retry goes to p2.
    p1.push(Reply::Status(503));
    let a = post(px.port, CHAT, &hello());
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!((p1.count(), p2.count(), d.count()), (1, 1, 1));
    assert_eq!(
        d.requests()[0].json()["kv_transfer_params"]["remote_host"],
        "ahost"
    );

    for f in [&p1, &p2] {
        f.push(Reply::Status(500));
    }
    let a = post(px.port, CHAT, &hello());
    assert_eq!(a.status, 500);
    assert_eq!(p1.count() + p2.count(), 3, "500 is not retried");
    assert_eq!(d.count(), 1);
    p1.clear_queue();
    p2.clear_queue();

    let busy = |status: u16| {
        Reply::Json(
            status,
            json!({"error": {"message": "busy", "code": status}}),
        )
    };
    for f in [&p1, &p2, &p1, &p2] {
        f.push(busy(502));
    }
    let a = post(px.port, CHAT, &hello());
    assert_eq!(a.status, 502);
    assert_eq!(a.json()["error"]["message"], "busy", "P's own body");
    assert_eq!(p1.count() + p2.count(), 6, "1 try + 2 retries");
    assert_eq!(d.count(), 1, "decode never called");
    let m = get(px.port, "/metrics").body;
    assert!(m.contains("pdctl_proxy_retries_total 3"), "{m}");
    p1.clear_queue();
    p2.clear_queue();

    for status in [502, 503, 504] {
        let before = p1.count() + p2.count();
        p1.push(busy(status));
        p2.push(busy(status));
        let a = post(px.port, CHAT, &hello());
        assert_eq!(a.status, 200, "{status} is retried");
        assert_eq!(
            p1.count() + p2.count(),
            before + 3,
            "{status}: two failures, then success"
        );
        p1.clear_queue();
        p2.clear_queue();
    }
}

/// `fail`: no retries; the prefill's status and body reach the client, and an unreachable
/// prefill is a 502 in vLLM's error shape.
#[test]
fn fail_policy() {
    let (p, d) = pair();
    let sec = ProxySection {
        prefill_failure: PrefillFailurePolicy::Fail,
        prefill_max_retries: 5,
        ..fast()
    };
    let px = Embedded::start(sec, &[&p.url], &[&d.url]);
    p.push(Reply::Status(502));
    let a = post(px.port, CHAT, &hello());
    assert_eq!(a.status, 502);
    assert!(a.body.contains("scripted 502"));
    assert_eq!((p.count(), d.count()), (1, 0));

    let dead = format!("http://127.0.0.1:{}", support::ports::refusing());
    px.change(|s| s.prefill = vec![endpoint(&dead)]);
    let a = post(px.port, CHAT, &hello());
    assert_eq!(a.status, 502);
    assert_eq!(a.json()["error"]["code"], 502);
    assert_eq!(d.count(), 0);
}

/// `fallback`: decode-only with the client's original body, marked (`x-pdctl-path`) and counted.
#[test]
fn fallback_policy() {
    let (p, d) = pair();
    let sec = ProxySection {
        prefill_failure: PrefillFailurePolicy::Fallback,
        prefill_max_retries: 1,
        ..fast()
    };
    let px = Embedded::start(sec, &[&p.url], &[&d.url]);
    p.push(Reply::Status(503));
    p.push(Reply::Status(503));
    let a = post(px.port, CHAT, &hello());
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-pdctl-path"), Some("fallback"));
    assert_eq!(p.count(), 2);
    assert_eq!(
        d.requests()[0].json(),
        hello(),
        "decode gets the original body"
    );
    assert_eq!(cached_tokens(&a), 49, "no rewrite without a prefill");
    // A 4xx is the client's fault: no fallback.
    p.push(Reply::Status(400));
    let a = post(px.port, CHAT, &hello());
    assert_eq!(a.status, 400);
    // An unreachable prefill falls back too.
    let dead = format!("http://127.0.0.1:{}", support::ports::refusing());
    px.change(|s| s.prefill = vec![endpoint(&dead)]);
    let a = post(px.port, CHAT, &hello());
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-pdctl-path"), Some("fallback"));
    let m = get(px.port, "/metrics").body;
    assert!(m.contains("pdctl_proxy_fallbacks_total 2"), "{m}");
    assert!(
        m.contains(
            r#"pdctl_proxy_requests_total{route="chat_completions",status="200",path="fallback"} 2"#
        ),
        "{m}"
    );
}

/// A decode that refuses connections is skipped for another ready decode.
#[test]
fn decode_connect_error_goes_to_another_decode() {
    let (p, d) = pair();
    let dead = format!("http://127.0.0.1:{}", support::ports::refusing());
    let sec = ProxySection {
        decode_policy: PickPolicy::RoundRobin,
        ..fast()
    };
    let px = Embedded::start(sec, &[&p.url], &[&dead, &d.url]);
    for _ in 0..4 {
        assert_eq!(post(px.port, CHAT, &hello()).status, 200);
    }
    assert_eq!(d.count(), 4);
    px.change(|s| s.decode = vec![endpoint(&dead)]);
    let a = post(px.port, CHAT, &hello());
    assert_eq!(a.status, 503);
    assert!(a.body.contains("decode node is not ready"));
}

/// Pair-aware health follows the live endpoint set; shutdown ends serve_embedded.
#[test]
fn health_follows_endpoint_set() {
    let (p, d) = pair();
    let px = Embedded::start(fast(), &[], &[]);
    assert_eq!(get(px.port, "/health").status, 503, "no engines");
    px.change(|s| s.decode.push(endpoint(&d.url)));
    wait_status(px.port, "/health", 503);
    let a = post(px.port, CHAT, &hello());
    assert_eq!(a.status, 503, "no prefill: retry policy answers 503");
    px.change(|s| s.prefill.push(endpoint(&p.url)));
    wait_status(px.port, "/health", 200);
    px.change(|s| s.decode.clear());
    wait_status(px.port, "/health", 503);
    assert!(px.shut_down().is_ok());
}

/// Selective disaggregation: short prompts go decode-only with the original body.
#[test]
fn threshold_sends_short_prompts_decode_only() {
    let (p, d) = pair();
    let sec = ProxySection {
        pd_threshold_tokens: 10,
        ..fast()
    };
    let px = Embedded::start(sec, &[&p.url], &[&d.url]);
    let short = json!({"model":"m","prompt":"a short one"});
    let a = post(px.port, "/v1/completions", &short);
    assert_eq!(a.header("x-pdctl-path"), Some("decode_only"));
    assert_eq!(d.requests()[0].json(), short);
    let long = json!({"model":"m","prompt":"x".repeat(40)});
    let a = post(px.port, "/v1/completions", &long);
    assert_eq!(a.header("x-pdctl-path"), Some("pd"));
    assert_eq!(p.count(), 1);
}

/// 413 above the body limit, 400 on malformed JSON, 401 without the API key, 504 on a prefill
/// timeout — all in vLLM's error shape; an unset `api_key_env` variable refuses to start.
#[test]
fn limits_errors_and_api_key() {
    let (p, d) = pair();
    std::env::set_var("PDCTL_TEST_PROXY_KEY", "s3cret");
    let sec = ProxySection {
        max_body_bytes: 1000,
        api_key_env: Some("PDCTL_TEST_PROXY_KEY".into()),
        prefill_timeout: Duration::from_millis(300),
        prefill_failure: PrefillFailurePolicy::Fail,
        ..fast()
    };
    let px = Embedded::start(sec, &[&p.url], &[&d.url]);
    let auth = ("authorization", "Bearer s3cret");
    let a = request(px.port, "POST", CHAT, &[], &hello().to_string());
    assert_eq!(a.status, 401);
    let a = request(px.port, "POST", CHAT, &[auth], &"x".repeat(2000));
    assert_eq!(a.status, 413);
    assert_eq!(a.json()["error"]["code"], 413);
    // A declared length over the limit is refused at once: the body is never waited for.
    let mut conn = TcpStream::connect(("127.0.0.1", px.port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer s3cret\r\ncontent-length: {}\r\n\r\n{{",
        40 << 20
    );
    conn.write_all(head.as_bytes()).unwrap();
    let mut answer = [0u8; 12];
    conn.read_exact(&mut answer)
        .expect("413 without waiting for the body");
    assert_eq!(&answer, b"HTTP/1.1 413");
    let a = request(px.port, "POST", CHAT, &[auth], "{not json");
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"]["type"], "BadRequestError");
    assert_eq!(a.json()["error"]["code"], 400);
    p.push(Reply::Delay(Duration::from_secs(30)));
    let a = request(px.port, "POST", CHAT, &[auth], &hello().to_string());
    assert_eq!(a.status, 504);
    assert_eq!(a.json()["error"]["type"], "GatewayTimeout");
    assert_eq!(d.count(), 0);
    // Health stays open for probes; metrics (they list the engines) are behind the key.
    assert_eq!(get(px.port, "/health").status, 200);
    for path in ["/metrics", "/pdctl/metrics"] {
        assert_eq!(get(px.port, path).status, 401, "{path}");
        assert_eq!(request(px.port, "GET", path, &[auth], "").status, 200);
    }
    let open = ProxySection {
        api_key_env: Some("PDCTL_TEST_PROXY_KEY".into()),
        metrics_public: true,
        ..fast()
    };
    let open = Embedded::start(open, &[&p.url], &[&d.url]);
    assert_eq!(get(open.port, "/metrics").status, 200, "metrics_public");
    assert_eq!(get(open.port, "/pdctl/metrics").status, 200);
    assert_eq!(post(open.port, CHAT, &hello()).status, 401);
    // An unset key variable is a startup error.
    let sec = ProxySection {
        api_key_env: Some("PDCTL_TEST_UNSET_KEY_VAR".into()),
        ..ProxySection::default()
    };
    assert!(Embedded::start(sec, &[], &[]).shut_down().is_err());
}

/// Bodies being received share `max_buffered_body_bytes`: a stalled upload holds its declared
/// length, so another request that would pass the budget gets 503 (declared or chunked) until the
/// stalled one goes away.
#[test]
fn buffered_bodies_share_one_budget() {
    let (p, d) = pair();
    let sec = ProxySection {
        max_body_bytes: 1000,
        max_buffered_body_bytes: 1500,
        ..fast()
    };
    let px = Embedded::start(sec, &[&p.url], &[&d.url]);
    let mut padded = hello();
    padded["pad"] = json!("x".repeat(600));
    assert_eq!(post(px.port, CHAT, &padded).status, 200, "fits alone");

    let mut stalled = TcpStream::connect(("127.0.0.1", px.port)).unwrap();
    let head = format!("POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{{");
    stalled.write_all(head.as_bytes()).unwrap();
    eventually("a second body is refused while the first stalls", || {
        let a = post(px.port, CHAT, &padded);
        a.status == 503 && a.header("retry-after") == Some("1")
    });
    let mut chunked = TcpStream::connect(("127.0.0.1", px.port)).unwrap();
    chunked
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n384\r\n{}\r\n",
        "x".repeat(900)
    );
    chunked.write_all(head.as_bytes()).unwrap();
    let mut answer = [0u8; 12];
    chunked.read_exact(&mut answer).expect("503 mid-upload");
    assert_eq!(&answer, b"HTTP/1.1 503");
    drop(stalled);
    eventually("the stalled body's share comes back", || {
        post(px.port, CHAT, &padded).status == 200
    });
}

/// Beyond `max_client_connections` open connections, a new one gets 503 and is closed; a slot
/// comes back when a connection ends.
#[test]
fn client_connections_are_capped() {
    let (p, d) = pair();
    let sec = ProxySection {
        max_client_connections: 2,
        ..fast()
    };
    let px = Embedded::start(sec, &[&p.url], &[&d.url]);
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", px.port)).unwrap())
        .collect();
    // Connections are accepted in order, so the third is beyond the cap. It only reads: a
    // request sent to a connection closed unread could be answered by a reset instead.
    let mut third = TcpStream::connect(("127.0.0.1", px.port)).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    third.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""code":503"#), "{answer}");
    drop(idle);
    // Until the proxy has seen those close, a new connection may still be refused (and its
    // request then reset): try with a client that tolerates both.
    eventually("the slots come back", || {
        let body = hello().to_string();
        let request = format!(
            "POST {CHAT} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut answer = String::new();
        TcpStream::connect(("127.0.0.1", px.port))
            .and_then(|mut conn| {
                conn.write_all(request.as_bytes())?;
                conn.read_to_string(&mut answer)
            })
            .is_ok()
            && answer.starts_with("HTTP/1.1 200")
    });
}

/// A client that disconnects mid-stream cancels the decode leg at once.
#[test]
fn client_disconnect_cancels_decode_stream() {
    let (p, d) = pair();
    let px = Embedded::start(fast(), &[&p.url], &[&d.url]);
    d.push(Reply::Endless);
    let body = json!({"model":"m","prompt":"p","stream":true});
    let client = read_partly(px.port, "/v1/completions", &body, 200);
    assert!(!d.was_aborted());
    drop(client);
    eventually("the upstream stream is cancelled", || d.was_aborted());
    let m = get(px.port, "/metrics").body;
    assert!(m.contains("pdctl_proxy_client_disconnects_total 1"), "{m}");
}

/// Reads one request (head and content-length body) off `conn`, keeping what follows in
/// `pending`; false when the connection ends first.
fn read_request(conn: &mut TcpStream, pending: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while pending.len() < head_end + length {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
    pending.drain(..head_end + length);
    true
}

/// An engine that closes every connection after one answer, without saying so (as uvicorn does
/// when its keep-alive timeout fires between requests): a pooled connection found dead before
/// the request was written is replaced, so no request fails.
#[test]
fn engine_closing_idle_connections_fails_no_request() {
    let engine = TcpListener::bind("127.0.0.1:0").unwrap();
    let engine_url = format!("http://{}", engine.local_addr().unwrap());
    let served = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&served);
    let (closed_tx, closed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for mut conn in engine.incoming().flatten() {
            let counter = Arc::clone(&counter);
            let closed_tx = closed_tx.clone();
            std::thread::spawn(move || {
                if !read_request(&mut conn, &mut Vec::new()) {
                    return;
                }
                let body = br#"{"object":"list","data":[]}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes());
                let _ = conn.write_all(body);
                counter.fetch_add(1, Ordering::SeqCst);
                // Closed a moment later without `connection: close`, once the proxy has pooled
                // the connection: it learns of it only from the socket.
                std::thread::sleep(Duration::from_millis(1));
                drop(conn);
                let _ = closed_tx.send(());
            });
        }
    });
    let px = Embedded::start(fast(), &[&engine_url], &[&engine_url]);
    for i in 0..30 {
        let a = get(px.port, "/v1/models");
        assert_eq!(a.status, 200, "request {i}: {}", a.body);
        // The next request goes out only once the engine has closed this one's connection: a
        // request written before the close is lost on a loaded machine (and rightly a 502).
        closed
            .recv_timeout(Duration::from_secs(10))
            .expect("the engine closes each connection");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(served.load(Ordering::SeqCst), 30);
}

/// Permits for the engine below to end a response body, handed out by the test.
#[derive(Default)]
struct Permits(Mutex<usize>, Condvar);

impl Permits {
    fn add(&self) {
        *self.0.lock().unwrap() += 1;
        self.1.notify_all();
    }

    fn take(&self) {
        let mut n = self
            .1
            .wait_while(self.0.lock().unwrap(), |n| *n == 0)
            .unwrap();
        *n -= 1;
    }
}

/// A decode engine whose event-stream body stays open after `data: [DONE]` (uvicorn ends the
/// chunked body in a write of its own): the client's answer is complete at `[DONE]`, and the
/// engine's connection is still read to its end and reused for the next request.
#[test]
fn event_stream_ends_at_done_and_engine_connection_is_reused() {
    let engine = TcpListener::bind("127.0.0.1:0").unwrap();
    let engine_url = format!("http://{}", engine.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let may_end_body = Arc::new(Permits::default());
    let (accepted2, may_end_body2) = (Arc::clone(&accepted), Arc::clone(&may_end_body));
    std::thread::spawn(move || {
        for mut conn in engine.incoming().flatten() {
            accepted2.fetch_add(1, Ordering::SeqCst);
            let may_end_body = Arc::clone(&may_end_body2);
            std::thread::spawn(move || {
                let mut pending = Vec::new();
                while read_request(&mut conn, &mut pending) {
                    let event = "data: {\"choices\":[{\"index\":0,\"text\":\"hi\"}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}\n\n";
                    let done = "data: [DONE]\n\n";
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n{:x}\r\n{done}\r\n",
                        event.len(),
                        done.len()
                    );
                    if conn.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                    may_end_body.take();
                    if conn.write_all(b"0\r\n\r\n").is_err() {
                        return;
                    }
                }
            });
        }
    });
    let p = Fake::start(Role::Prefill);
    let px = Embedded::start(fast(), &[&p.url], &[&engine_url]);
    let body = json!({"model":"m","prompt":"Hello","stream":true});
    for round in 0..2 {
        let (tx, rx) = std::sync::mpsc::channel();
        let port = px.port;
        let sent = body.clone();
        std::thread::spawn(move || {
            let _ = tx.send(post(port, "/v1/completions", &sent));
        });
        let answer = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| {
            panic!("round {round}: the answer waited for the engine's end of body")
        });
        assert_eq!(answer.status, 200);
        assert!(answer.body.ends_with("data: [DONE]\n\n"), "{}", answer.body);
        assert!(
            answer.body.contains("\"cached_tokens\":7"),
            "{}",
            answer.body
        );
        may_end_body.add();
        // The engine's body ends on the proxy's side once it has read the terminator.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "engine connection not reused"
    );
    let m = get(px.port, "/metrics").body;
    assert!(!m.contains("pdctl_proxy_client_disconnects_total 1"), "{m}");
}
