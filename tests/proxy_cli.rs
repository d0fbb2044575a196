//! `pdctl proxy` and `pdctl sidecar`, the real binary, against scriptable fake engines: each
//! command-line flag reaches the proxy and does what it says, and the sidecar speaks llm-d's
//! flags and header. What the proxy puts on the wire is tested in `proxy_embedded.rs`.

mod support;

use serde_json::{json, Value};
use support::engine::{Fake, Reply, Role};
use support::http::{get, post, request};
use support::process::{pdctl, Child, Proxy};

const CHAT: &str = "/v1/chat/completions";

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "Qwen/Qwen2-0.5B",
                          "messages": [{"role": "user", "content": "Hello"}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap());
    body
}

fn args(p: &[&Fake], d: &[&Fake], extra: &[&str]) -> Vec<String> {
    let mut a = Vec::new();
    for f in p {
        a.extend(["--prefill".to_string(), f.url.clone()]);
    }
    for f in d {
        a.extend(["--decode".to_string(), f.url.clone()]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A prefill that answers `status` with its own error body to its first `times` requests.
fn failing(status: u16, times: usize) -> Fake {
    Fake::scripted(Role::Prefill, move |n, _| {
        (n < times).then(|| {
            Reply::Json(
                status,
                json!({"error": {"message": "busy", "code": status}}),
            )
        })
    })
}

#[test]
fn retry_flags_follow_llm_d() {
    let fast = [
        "--prefill-failure",
        "retry",
        "--prefill-retry-backoff",
        "1ms",
    ];
    for status in [502, 503, 504] {
        let (p, d) = (failing(status, 1), Fake::start(Role::Decode));
        let extra = [&fast[..], &["--prefill-max-retries", "2"]].concat();
        let proxy = Proxy::start("proxy", &args(&[&p], &[&d], &extra));
        assert_eq!(post(proxy.port, CHAT, &chat(json!({}))).status, 200);
        assert_eq!((p.count(), d.count()), (2, 1), "{status}");
        assert!(d.requests()[0].json()["kv_transfer_params"].is_object());
    }
    let cases = [(502, 0, 502, 1), (502, 2, 502, 3), (500, 2, 500, 1)];
    for (status, retries, client_sees, p_calls) in cases {
        let (p, d) = (failing(status, usize::MAX), Fake::start(Role::Decode));
        let r = retries.to_string();
        let extra = [&fast[..], &["--prefill-max-retries", &r]].concat();
        let proxy = Proxy::start("proxy", &args(&[&p], &[&d], &extra));
        let reply = post(proxy.port, CHAT, &chat(json!({})));
        assert_eq!(reply.status, client_sees);
        assert_eq!(reply.json()["error"]["message"], "busy", "P's own body");
        assert_eq!(p.count(), p_calls, "{status} with {retries} retries");
        assert_eq!(d.count(), 0, "decode never called");
    }
}

#[test]
fn round_robin_retries_go_to_another_ready_prefill() {
    let bad = failing(503, usize::MAX);
    let good = Fake::start(Role::Prefill);
    let d = Fake::start(Role::Decode);
    let extra = [
        "--prefill-policy",
        "round-robin",
        "--prefill-retry-backoff",
        "1ms",
    ];
    let proxy = Proxy::start("proxy", &args(&[&bad, &good], &[&d], &extra));
    for _ in 0..4 {
        assert_eq!(post(proxy.port, CHAT, &chat(json!({}))).status, 200);
    }
    assert_eq!(good.count(), 4, "each request ended on the good prefill");
    let first_tries_on_bad = bad.count();
    assert!(
        (1..=4).contains(&first_tries_on_bad),
        "{first_tries_on_bad}"
    );
}

#[test]
fn fallback_flag_serves_decode_only_and_says_so() {
    let (p, d) = (failing(503, usize::MAX), Fake::start(Role::Decode));
    let extra = [
        "--prefill-failure",
        "fallback",
        "--prefill-max-retries",
        "1",
        "--prefill-retry-backoff",
        "1ms",
    ];
    let proxy = Proxy::start("proxy", &args(&[&p], &[&d], &extra));
    let reply = post(proxy.port, CHAT, &chat(json!({"max_tokens": 9})));
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-pdctl-path"), Some("fallback"));
    assert_eq!(p.count(), 2);
    let db = d.requests()[0].json();
    assert!(db.get("kv_transfer_params").is_none(), "the original body");
    assert_eq!(db["max_tokens"], 9);
    let metrics = get(proxy.port, "/metrics").body;
    assert!(
        metrics.contains("pdctl_proxy_fallbacks_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("path=\"fallback\""));
}

#[test]
fn unreachable_decode_is_replaced_and_unreachable_prefill_is_502() {
    let dead = format!("http://127.0.0.1:{}", support::ports::refusing());
    let (p, d) = (Fake::start(Role::Prefill), Fake::start(Role::Decode));
    let mut a = args(&[&p], &[], &["--decode-policy", "round-robin"]);
    a.extend([
        "--decode".into(),
        dead.clone(),
        "--decode".into(),
        d.url.clone(),
    ]);
    let proxy = Proxy::start("proxy", &a);
    for _ in 0..4 {
        assert_eq!(post(proxy.port, CHAT, &chat(json!({}))).status, 200);
    }
    assert_eq!(d.count(), 4);

    let mut a = args(&[], &[&d], &["--prefill-failure", "fail"]);
    a.extend(["--prefill".into(), dead]);
    let proxy = Proxy::start("proxy", &a);
    let reply = post(proxy.port, CHAT, &chat(json!({})));
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["error"]["code"], 502);
}

#[test]
fn prefill_timeout_flag_gives_504() {
    let slow = Fake::scripted(Role::Prefill, |_, _| {
        Some(Reply::Delay(std::time::Duration::from_secs(3)))
    });
    let d = Fake::start(Role::Decode);
    let extra = ["--prefill-timeout", "200ms", "--prefill-failure", "fail"];
    let proxy = Proxy::start("proxy", &args(&[&slow], &[&d], &extra));
    let reply = post(proxy.port, CHAT, &chat(json!({})));
    assert_eq!(reply.status, 504);
    assert_eq!(reply.json()["error"]["type"], "GatewayTimeout");
}

#[test]
fn body_limit_and_api_key_flags_guard_the_proxy() {
    let (p, d) = (Fake::start(Role::Prefill), Fake::start(Role::Decode));
    let extra = ["--max-body-bytes", "300", "--api-key", "s3cret"];
    let proxy = Proxy::start("proxy", &args(&[&p], &[&d], &extra));
    let port = proxy.port;
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
    let reply = request(port, "POST", CHAT, &[auth], &chat(json!({})).to_string());
    assert_eq!(reply.status, 200);
    assert_eq!(p.count(), 1);
    for path in ["/metrics", "/pdctl/metrics"] {
        assert_eq!(get(port, path).status, 401, "{path} is behind the key");
        assert_eq!(
            request(port, "GET", path, &[auth], "").status,
            200,
            "{path}"
        );
    }

    let extra = ["--api-key", "s3cret", "--metrics-public"];
    let proxy = Proxy::start("proxy", &args(&[&p], &[&d], &extra));
    for path in ["/metrics", "/pdctl/metrics"] {
        assert_eq!(
            get(proxy.port, path).status,
            200,
            "{path} with --metrics-public"
        );
    }
    let reply = request(proxy.port, "POST", CHAT, &[], &chat(json!({})).to_string());
    assert_eq!(reply.status, 401, "inference still needs the key");
}

/// `pdctl proxy` serves only its routes plus `--passthrough-path`; the sidecar, like llm-d's,
/// forwards every path to its pod's engine.
#[test]
fn passthrough_path_flag_and_sidecar_forwards_everything() {
    let (p, d) = (Fake::start(Role::Prefill), Fake::start(Role::Decode));
    let extra = ["--passthrough-path", "/score,/tokenize"];
    let proxy = Proxy::start("proxy", &args(&[&p], &[&d], &extra));
    assert_eq!(request(proxy.port, "POST", "/score", &[], "{}").status, 200);
    assert_eq!(get(proxy.port, "/tokenize").status, 200);
    assert_eq!(request(proxy.port, "PUT", "/score", &[], "{}").status, 405);
    assert_eq!(request(proxy.port, "POST", "/sleep", &[], "{}").status, 404);
    assert_eq!(d.count(), 2);

    let port = support::ports::reserve(1);
    let _sidecar = Child::spawn(pdctl().args([
        "sidecar",
        &format!("--port={port}"),
        &format!("--vllm-port={}", d.port),
        "--host=127.0.0.1",
    ]));
    support::http::wait_status(port, "/health", 200);
    let reply = request(port, "POST", "/reset_prefix_cache", &[], "{}");
    assert_eq!(reply.status, 200);
    assert_eq!(d.count(), 3);
}

#[test]
fn threshold_flag_skips_the_prefill_for_short_prompts() {
    let (p, d) = (Fake::start(Role::Prefill), Fake::start(Role::Decode));
    let extra = ["--pd-threshold", "1000"];
    let proxy = Proxy::start("proxy", &args(&[&p], &[&d], &extra));
    let reply = post(
        proxy.port,
        "/v1/completions",
        &json!({"prompt": "short", "max_tokens": 3}),
    );
    assert_eq!(reply.header("x-pdctl-path"), Some("decode_only"));
    assert_eq!(p.count(), 0);
    assert_eq!(d.count(), 1);
}

/// `pdctl sidecar` with llm-d's flags (Go's single-dash form and the empty argument a template
/// leaves too): the header picks the prefill, no header is a passthrough, the SSRF allowlist
/// checks ports, and prefill retries follow the flags.
#[test]
fn sidecar_takes_the_prefill_from_the_header_with_ssrf_ports_checked() {
    let (p, d) = (Fake::start(Role::Prefill), Fake::start(Role::Decode));
    let port = support::ports::reserve(1);
    let allowed = format!("127.0.0.1:{}", p.port);
    let _sidecar = Child::spawn(pdctl().args([
        "sidecar",
        &format!("-port={port}"),
        &format!("-vllm-port={}", d.port),
        "--kv-connector=nixlv2",
        "--enable-ssrf-protection=true",
        "--secure-proxy=false",
        "--inference-pool=ns/pool",
        &format!("--ssrf-allowlist={allowed}"),
        "--prefill-max-retries=2",
        "--prefill-retry-backoff=1ms",
        "--host=127.0.0.1",
        "",
    ]));
    support::http::wait_status(port, "/health", 200);
    let send = |header: Option<&str>| {
        let headers: Vec<(&str, &str)> = header
            .map(|h| ("x-prefiller-host-port", h))
            .into_iter()
            .collect();
        request(port, "POST", CHAT, &headers, &chat(json!({})).to_string())
    };

    let reply = send(None);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-pdctl-path"), Some("decode_only"));
    assert_eq!((p.count(), d.count()), (0, 1), "no header: passthrough");

    for header in [allowed.clone(), format!("http://{allowed}")] {
        let reply = send(Some(&header));
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(
            reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
            7
        );
    }
    assert_eq!((p.count(), d.count()), (2, 3));
    assert!(d
        .requests()
        .iter()
        .chain(p.requests().iter())
        .all(|s| s.header("x-prefiller-host-port").is_none()));
    assert_eq!(
        d.requests()[2].json()["kv_transfer_params"]["remote_port"],
        4032
    );

    let other_port = format!("127.0.0.1:{}", d.port);
    assert_eq!(send(Some(&other_port)).status, 403, "same host, other port");
    assert_eq!(send(Some("127.0.0.1:1")).status, 403);
    assert_eq!(send(Some("evil.example.com:8000")).status, 403);
    assert_eq!((p.count(), d.count()), (2, 3));

    // Retries as the flags say: one 503, then success.
    p.push(Reply::Status(503));
    assert_eq!(send(Some(&allowed)).status, 200);
    assert_eq!(p.count(), 4);
    assert_eq!(get(port, "/health").status, 200);
}

/// Options the sidecar cannot honour are refused at startup (exit 2, with a message), not at
/// the first request.
#[test]
fn sidecar_refuses_what_it_cannot_do() {
    for bad in [
        &["--kv-connector=sglang"][..],
        &["--kv-connector=lmcache"],
        &["--secure-proxy"],
        &["--secure-proxy=true"],
        &["--enable-ssrf-protection"],
        &["--enable-ssrf-protection=true"],
    ] {
        let out = pdctl().arg("sidecar").args(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(!out.stderr.is_empty(), "{bad:?}");
    }
    let out = pdctl().args(["sidecar", "--help"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--enable-ssrf-protection"));
}
