//! The NIXL-v2 request shapes (the prefill and decode legs, see docs/proxy.md), as pure functions
//! over the client's JSON body.
//! Unknown fields are preserved in order and byte for byte: only the patched top-level fields
//! are written anew (see `json.rs`).

use serde_json::value::RawValue;
use serde_json::Value;

use super::json::{self, Object, Patch};

/// The OpenAI-style APIs that take the P/D path; they differ in their token-limit fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
    Responses,
}

impl Api {
    pub fn from_path(path: &str) -> Option<Api> {
        match path {
            "/v1/completions" => Some(Api::Completions),
            "/v1/chat/completions" => Some(Api::Chat),
            "/v1/responses" => Some(Api::Responses),
            _ => None,
        }
    }

    /// Every limit is forced to 1 on the prefill leg and restored (or left absent) on decode.
    fn token_limits(self) -> &'static [&'static str] {
        match self {
            Api::Completions | Api::Chat => &["max_tokens", "max_completion_tokens", "min_tokens"],
            Api::Responses => &["max_output_tokens"],
        }
    }
}

/// The fixed params of a prefill request, with the keys present as JSON nulls (vLLM and llm-d's
/// mocks check for them).
const PREFILL_KV_PARAMS: &str = concat!(
    r#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"#,
    r#""remote_block_ids":null,"remote_host":null,"remote_port":null}"#
);

/// The prefill leg's body: one token, not streamed, KV kept for a remote decode. Beyond llm-d,
/// `ignore_eos` and no stop conditions, so a one-token prefill that hits EOS still returns
/// `kv_transfer_params` instead of making the decode recompute the prompt silently.
pub fn prefill_body(client: &Object<'_>, api: Api) -> Vec<u8> {
    let mut patch: Vec<Patch<'_>> = Vec::with_capacity(9);
    patch.extend([
        ("kv_transfer_params", Some(PREFILL_KV_PARAMS)),
        ("stream", Some("false")),
        ("stream_options", None),
    ]);
    patch.extend(api.token_limits().iter().map(|limit| (*limit, Some("1"))));
    if api != Api::Responses {
        patch.extend([
            ("ignore_eos", Some("true")),
            ("stop", None),
            ("stop_token_ids", None),
        ]);
    }
    client.patched(&patch)
}

/// The decode leg's body: the client's own request plus the prefill's params, verbatim (`None`:
/// the prefill returned none, sent as `null`).
pub fn decode_body(client: &Object<'_>, kv_transfer_params: Option<&str>) -> Vec<u8> {
    client.patched(&[(
        "kv_transfer_params",
        Some(kv_transfer_params.unwrap_or("null")),
    )])
}

/// What the decode needs from a successful prefill answer.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillResult {
    /// The params exactly as the prefill wrote them; `None` when it returned none or `null` (the
    /// decode then recomputes; logged).
    pub kv_transfer_params: Option<String>,
    /// The prefill's `usage.prompt_tokens_details.cached_tokens` (0 when absent), which is what
    /// the client should see instead of the decode's near-total count.
    pub cached_tokens: u64,
}

/// Reads a prefill answer; `None` when it is not JSON. Valid JSON that is not an object carries
/// no params. Only the two members used are parsed; the scan finds them (see `find_members`).
pub fn read_prefill(answer: &[u8]) -> Option<PrefillResult> {
    let Some([params, usage]) = json::find_members(answer, ["kv_transfer_params", "usage"]) else {
        return serde_json::from_slice::<serde::de::IgnoredAny>(answer)
            .is_ok()
            .then_some(PrefillResult {
                kv_transfer_params: None,
                cached_tokens: 0,
            });
    };
    let params = match params {
        Some(range) => {
            let raw: &RawValue = serde_json::from_slice(&answer[range]).ok()?;
            (!json::is_null(raw)).then(|| raw.get().to_string())
        }
        None => None,
    };
    let cached_tokens = usage
        .and_then(|range| Object::parse(&answer[range]).ok())
        .and_then(|usage| usage.get("prompt_tokens_details"))
        .and_then(Object::parse_raw)
        .and_then(|details| details.get("cached_tokens"))
        .and_then(|n| n.get().parse::<u64>().ok())
        .unwrap_or(0);
    Some(PrefillResult {
        kv_transfer_params: params,
        cached_tokens,
    })
}

/// Sets `usage.prompt_tokens_details.cached_tokens` in a JSON object's text, creating the details
/// object if missing or not an object; every other byte is kept. `None` when the body is not a
/// JSON object with a `usage` object (it then passes unchanged).
pub fn rewrite_json_body(body: &[u8], cached_tokens: u64) -> Option<Vec<u8>> {
    let [usage_at] = json::find_members(body, ["usage"])?;
    let usage_at = usage_at?;
    let usage = Object::parse(&body[usage_at.clone()]).ok()?;
    let cached = cached_tokens.to_string();
    let details = match usage
        .get("prompt_tokens_details")
        .and_then(Object::parse_raw)
    {
        Some(details) => details.patched(&[("cached_tokens", Some(&cached))]),
        None => format!(r#"{{"cached_tokens":{cached}}}"#).into_bytes(),
    };
    let details = String::from_utf8(details).expect("patched JSON text stays UTF-8");
    let mut out = Vec::with_capacity(body.len() + 48);
    out.extend_from_slice(&body[..usage_at.start]);
    usage.write_patched(&[("prompt_tokens_details", Some(&details))], &mut out);
    out.extend_from_slice(&body[usage_at.end..]);
    Some(out)
}

/// A top-level field parsed as a tree, for the rare paths that need one.
fn tree(body: &Object<'_>, key: &str) -> Option<Value> {
    serde_json::from_str(body.get(key)?.get()).ok()
}

/// The length a string field counts for: its characters; any other value, its compact JSON.
fn text_len(body: &Object<'_>, key: &str) -> usize {
    match body.get(key) {
        None => 0,
        Some(raw) => match json::as_str(raw) {
            Some(s) => s.chars().count(),
            None => tree(body, key).map_or(0, |v| v.to_string().len()),
        },
    }
}

/// Estimated prompt tokens (characters / 4) for the selective-disaggregation threshold; for chat
/// the JSON of `messages`, as llm-d's decider does.
pub fn estimate_prompt_tokens(body: &Object<'_>, api: Api) -> u64 {
    let chars = match api {
        Api::Completions => text_len(body, "prompt"),
        Api::Chat => tree(body, "messages").map_or(0, |m| m.to_string().len()),
        Api::Responses => text_len(body, "input"),
    };
    (chars as u64).div_ceil(4)
}

/// The text that identifies a prompt's prefix, for decode prefix affinity.
pub fn prefix_key(body: &Object<'_>, api: Api, chars: usize) -> Option<u64> {
    let text = match api {
        Api::Completions => json::as_str(body.get("prompt")?)?.into_owned(),
        Api::Chat => tree(body, "messages")?.to_string(),
        Api::Responses => tree(body, "input")?.to_string(),
    };
    let prefix: String = text.chars().take(chars).collect();
    Some(fnv1a(prefix.as_bytes()))
}

pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A client body as the proxy sees it (leaked: tests only).
    fn map(v: Value) -> Object<'static> {
        Object::parse(Box::leak(v.to_string().into_boxed_str()).as_bytes()).unwrap()
    }

    fn parsed(b: Vec<u8>) -> serde_json::Map<String, Value> {
        match serde_json::from_slice(&b).unwrap() {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn prefill_leg_has_explicit_nulls_one_token_and_no_stream_options() {
        let client = map(
            json!({"model": "m", "messages": [], "max_tokens": 50, "stream": true,
                                "stream_options": {"include_usage": true}, "stop": ["x"],
                                "custom_field": {"kept": 1}}),
        );
        let p = parsed(prefill_body(&client, Api::Chat));
        assert_eq!(
            p["kv_transfer_params"],
            json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                   "remote_block_ids": null, "remote_host": null, "remote_port": null})
        );
        assert_eq!(p["max_tokens"], 1);
        assert_eq!(p["max_completion_tokens"], 1);
        assert_eq!(p["min_tokens"], 1);
        assert_eq!(p["stream"], false);
        assert_eq!(p["ignore_eos"], true);
        assert!(!p.contains_key("stream_options"));
        assert!(!p.contains_key("stop"));
        assert!(!p.contains_key("do_remote_decode"), "never top level");
        assert_eq!(p["custom_field"], json!({"kept": 1}));
    }

    #[test]
    fn patched_bodies_keep_the_client_key_order() {
        let client = map(json!({"z": 1, "model": "m", "max_tokens": 9, "a": [null]}));
        let p = String::from_utf8(prefill_body(&client, Api::Completions)).unwrap();
        assert!(
            p.starts_with(r#"{"z":1,"model":"m","max_tokens":1,"a":[null],"kv_transfer_params":{"#),
            "{p}"
        );
        let d = String::from_utf8(decode_body(&client, Some(r#"{"x":1}"#))).unwrap();
        assert_eq!(
            d,
            r#"{"z":1,"model":"m","max_tokens":9,"a":[null],"kv_transfer_params":{"x":1}}"#
        );
    }

    #[test]
    fn decode_leg_restores_the_client_fields_exactly() {
        let client =
            map(json!({"prompt": "p", "max_tokens": 100, "min_tokens": 5, "stream": true}));
        let params = json!({"remote_block_ids": [1, 2], "remote_engine_id": "e", "extra": "kept"});
        let d = parsed(decode_body(&client, Some(&params.to_string())));
        assert_eq!(d["max_tokens"], 100);
        assert_eq!(d["min_tokens"], 5);
        assert_eq!(d["stream"], true);
        assert_eq!(d["kv_transfer_params"], params);
        let bare = parsed(decode_body(&map(json!({"prompt": "p"})), None));
        assert!(!bare.contains_key("max_completion_tokens") && !bare.contains_key("max_tokens"));
        assert!(!bare.contains_key("stream"));
        assert_eq!(bare["kv_transfer_params"], Value::Null);
    }

    #[test]
    fn responses_api_caps_max_output_tokens_only() {
        let client = map(
            json!({"model": "gpt-4o", "input": "Hello", "max_output_tokens": 50,
                                "stream": true}),
        );
        let p = parsed(prefill_body(&client, Api::Responses));
        assert_eq!(p["max_output_tokens"], 1);
        assert_eq!(p["stream"], false);
        assert!(!p.contains_key("max_tokens"));
        let d = parsed(decode_body(&client, Some("{}")));
        assert_eq!(d["max_output_tokens"], 50);
        assert_eq!(d["stream"], true);
    }

    #[test]
    fn prefill_answer_without_params_or_usage() {
        let r = read_prefill(br#"{"usage": {"prompt_tokens_details": {}}}"#).unwrap();
        assert_eq!(r.kv_transfer_params, None);
        assert_eq!(r.cached_tokens, 0);
        let r = read_prefill(
            br#"{"kv_transfer_params": {"a": 1,  "b":[ 2]},
                 "usage": {"prompt_tokens_details": {"cached_tokens": 7}}}"#,
        )
        .unwrap();
        assert_eq!(r.cached_tokens, 7);
        assert_eq!(
            r.kv_transfer_params.as_deref(),
            Some(r#"{"a": 1,  "b":[ 2]}"#),
            "verbatim"
        );
        let r = read_prefill(br#"{"kv_transfer_params": null, "usage": null}"#).unwrap();
        assert_eq!((r.kv_transfer_params, r.cached_tokens), (None, 0));
        let r = read_prefill(b"[1]").unwrap();
        assert_eq!((r.kv_transfer_params, r.cached_tokens), (None, 0));
        assert_eq!(read_prefill(b"<html>"), None);
    }

    #[test]
    fn usage_rewrite_sets_or_creates_cached_tokens() {
        for usage in [
            json!({"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": 49}}),
            json!({"prompt_tokens": 1, "prompt_tokens_details": {}}),
            json!({"prompt_tokens": 1}),
            json!({"prompt_tokens": 1, "prompt_tokens_details": null}),
        ] {
            let body = json!({"choices": [], "usage": usage}).to_string();
            let v: Value =
                serde_json::from_slice(&rewrite_json_body(body.as_bytes(), 7).unwrap()).unwrap();
            assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 7);
            assert_eq!(v["usage"]["prompt_tokens"], 1);
            assert_eq!(v["choices"], json!([]));
        }
        assert_eq!(rewrite_json_body(br#"{"choices": []}"#, 7), None);
        assert_eq!(rewrite_json_body(br#"{"usage": null}"#, 7), None);
        assert_eq!(rewrite_json_body(b"not json", 7), None);
        let out = rewrite_json_body(
            br#"{"id": "x", "usage": {"total_tokens": 3, "prompt_tokens_details": {"cached_tokens": 49, "audio": 0}}, "z": 1.50}"#,
            7,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"id": "x", "usage": {"total_tokens":3,"prompt_tokens_details":{"cached_tokens":7,"audio":0}}, "z": 1.50}"#,
            "only the usage member is written anew"
        );
        // A "usage" key below the top level, or inside a string, is not the one.
        let nested = br#"{"choices":[{"text":"say \"usage\": {", "usage": {"x": 1}}]}"#;
        assert_eq!(rewrite_json_body(nested, 7), None);
        let out = rewrite_json_body(
            br#"{"usage":{"prompt_tokens_details":{"cached_tokens":49}}}"#,
            0,
        )
        .unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .contains(r#""cached_tokens":0"#));
    }

    #[test]
    fn token_estimates_follow_chars_over_four() {
        assert_eq!(
            estimate_prompt_tokens(&map(json!({"prompt": "abcdefgh"})), Api::Completions),
            2
        );
        assert_eq!(estimate_prompt_tokens(&map(json!({})), Api::Completions), 0);
        let messages = json!([{"role": "user", "content": "hi"}]);
        let chat = map(json!({ "messages": messages }));
        assert_eq!(
            estimate_prompt_tokens(&chat, Api::Chat),
            (messages.to_string().len() as u64).div_ceil(4)
        );
        let spaced = Object::parse(br#"{"prompt": [1,  2]}"#).unwrap();
        assert_eq!(estimate_prompt_tokens(&spaced, Api::Completions), 2);
    }

    #[test]
    fn prefix_keys_match_on_shared_prefixes_only() {
        let a = map(json!({"prompt": format!("{}tail-a", "x".repeat(300))}));
        let b = map(json!({"prompt": format!("{}tail-b", "x".repeat(300))}));
        let c = map(json!({"prompt": "something else"}));
        let key = |m| prefix_key(m, Api::Completions, 256);
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&a), key(&c));
    }
}
