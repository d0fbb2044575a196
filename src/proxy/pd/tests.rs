use serde_json::{json, Map, Value};

use super::*;

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

fn parse(b: &[u8]) -> Map<String, Value> {
    obj(serde_json::from_slice(b).unwrap())
}

/// protocol.md §12 case 10/12: the prefill body of llm-d's happy-path request.
#[test]
fn prefill_body_chat_matches_llmd_mock_contract() {
    let req = obj(
        json!({"model":"Qwen/Qwen2-0.5B","messages":[{"role":"user","content":"Hello"}],
        "max_tokens":50,"stream":true,"stream_options":{"include_usage":true},"stop":["x"],
        "stop_token_ids":[2],"x_unknown":{"a":1}}),
    );
    let p = parse(&prefill_body(Api::Chat, &req, 0));
    assert_eq!(
        p["kv_transfer_params"],
        json!({"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,
               "remote_block_ids":null,"remote_host":null,"remote_port":null})
    );
    assert_eq!(p["max_tokens"], 1);
    assert_eq!(p["max_completion_tokens"], 1);
    assert_eq!(p["min_tokens"], 1);
    assert_eq!(p["stream"], false);
    assert_eq!(p["ignore_eos"], true);
    assert!(!p.contains_key("stream_options"));
    assert!(!p.contains_key("stop"));
    assert!(!p.contains_key("stop_token_ids"));
    assert!(!p.contains_key("do_remote_decode"));
    assert_eq!(p["x_unknown"], json!({"a":1}));
    assert_eq!(p["messages"], req["messages"]);
}

/// Unknown fields keep their position; the explicit nulls survive the byte level too.
#[test]
fn prefill_body_keeps_key_order_and_nulls() {
    let req = obj(json!({"z":1,"model":"m","prompt":"hi","a":2,"max_tokens":9}));
    let s = String::from_utf8(prefill_body(Api::Completions, &req, 0)).unwrap();
    assert!(
        s.starts_with(r#"{"z":1,"model":"m","prompt":"hi","a":2,"max_tokens":1,"#),
        "{s}"
    );
    assert!(s.contains(r#""remote_engine_id":null"#));
}

/// §12 case 14: the responses API caps `max_output_tokens` only.
#[test]
fn prefill_body_responses() {
    let req = obj(json!({"model":"gpt-4o","input":"Hello","max_output_tokens":50,"stream":true}));
    let p = parse(&prefill_body(Api::Responses, &req, 0));
    assert_eq!(p["max_output_tokens"], 1);
    assert_eq!(p["stream"], false);
    assert!(!p.contains_key("max_tokens"));
    let d = parse(&decode_body(&req, &json!({"x":1}), 0));
    assert_eq!(d["max_output_tokens"], 50);
    assert_eq!(d["stream"], true);
}

/// §12 cases 11-13: decode restores the client's limits exactly, absent stays absent, and the
/// prefill's params are passed verbatim.
#[test]
fn decode_body_restores_and_copies_params() {
    let kv = json!({"do_remote_prefill":true,"remote_block_ids":["DUMMY"],"remote_engine_id":"e",
                    "remote_request_id":"r","remote_host":"h","remote_port":1,"future_field":[1]});
    let req = obj(
        json!({"model":"m","prompt":"p","max_completion_tokens":100,"min_tokens":5,
        "stream":true,"stream_options":{"include_usage":true},"kv_transfer_params":{"evil":1}}),
    );
    let d = parse(&decode_body(&req, &kv, 0));
    assert_eq!(d["kv_transfer_params"], kv);
    assert_eq!(d["max_completion_tokens"], 100);
    assert_eq!(d["min_tokens"], 5);
    assert_eq!(d["stream_options"], json!({"include_usage":true}));
    assert!(!d.contains_key("max_tokens"));
    let bare = obj(json!({"model":"m","prompt":"p"}));
    let d = parse(&decode_body(&bare, &Value::Null, 0));
    assert_eq!(d.len(), 3);
    assert_eq!(d["kv_transfer_params"], Value::Null);
}

#[test]
fn parse_prefill_reads_params_and_cached_tokens() {
    let r = parse_prefill(br#"{"kv_transfer_params":{"remote_block_ids":[1,2,3]},"usage":{"prompt_tokens":64,"prompt_tokens_details":{"cached_tokens":7}}}"#).unwrap();
    assert_eq!(r.kv_transfer_params, json!({"remote_block_ids":[1,2,3]}));
    assert_eq!(r.cached_tokens, Some(7));
    let r = parse_prefill(br#"{"usage":{"prompt_tokens_details":{}}}"#).unwrap();
    assert_eq!(r.kv_transfer_params, Value::Null);
    assert_eq!(r.cached_tokens, None);
    let r = parse_prefill(br#"{"kv_transfer_params":null,"usage":null}"#).unwrap();
    assert_eq!(r.cached_tokens, None);
    assert!(parse_prefill(b"not json").is_err());
}

/// §12 cases 16-18.
#[test]
fn usage_rewrite_json() {
    let out = rewrite_usage_json(
        br#"{"id":"x","usage":{"prompt_tokens":64,"prompt_tokens_details":{"cached_tokens":49}}}"#,
        7,
    )
    .unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 7);
    assert_eq!(v["usage"]["prompt_tokens"], 64);
    for body in [
        &br#"{"usage":{"prompt_tokens_details":{}}}"#[..],
        br#"{"usage":{"prompt_tokens":1}}"#,
        br#"{"usage":{"prompt_tokens_details":null}}"#,
    ] {
        let v: Value = serde_json::from_slice(&rewrite_usage_json(body, 0).unwrap()).unwrap();
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    }
    assert!(rewrite_usage_json(br#"{"usage":null}"#, 1).is_none());
    assert!(rewrite_usage_json(b"[1]", 1).is_none());
    assert!(rewrite_usage_json(b"oops", 1).is_none());
}

#[test]
fn estimates_tokens_like_the_simulator() {
    let c = obj(json!({"prompt":"abcdefgh"}));
    assert_eq!(estimate_prompt_tokens(Api::Completions, &c), 2);
    let ids = obj(json!({"prompt":[1,2,3]}));
    assert_eq!(estimate_prompt_tokens(Api::Completions, &ids), 3);
    // "user: " (6) + 10 + "\n" (1) = 17 chars
    let chat = obj(json!({"messages":[{"role":"user","content":"0123456789"}]}));
    assert_eq!(estimate_prompt_tokens(Api::Chat, &chat), 4);
    let parts =
        obj(json!({"messages":[{"role":"user","content":[{"type":"text","text":"0123456789"}]}]}));
    assert_eq!(estimate_prompt_tokens(Api::Chat, &parts), 4);
    let resp = obj(json!({"input":"0123456789abcdef"}));
    assert_eq!(estimate_prompt_tokens(Api::Responses, &resp), 4);
}

#[test]
fn prefix_hash_depends_only_on_the_prefix() {
    let long = "x".repeat(AFFINITY_PREFIX_CHARS);
    let a = obj(json!({"prompt": format!("{long}tail one")}));
    let b = obj(json!({"prompt": format!("{long}tail two")}));
    let c = obj(json!({"prompt": "y".repeat(300)}));
    let h = |m| prompt_prefix_hash(Api::Completions, m);
    assert_eq!(h(&a), h(&b));
    assert_ne!(h(&a), h(&c));
}

#[test]
fn api_from_path() {
    assert_eq!(Api::from_path("/v1/chat/completions"), Some(Api::Chat));
    assert_eq!(Api::from_path("/v1/completions"), Some(Api::Completions));
    assert_eq!(Api::from_path("/v1/responses"), Some(Api::Responses));
    assert_eq!(Api::from_path("/v1/embeddings"), None);
}
