//! The NIXL-v2 request shapes (protocol.md §5), as pure functions over the client's JSON body.
//! Unknown fields are preserved in order (serde_json's `preserve_order`).

use serde_json::{Map, Value};

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

/// The prefill leg's body: one token, not streamed, KV kept for a remote decode. Beyond llm-d,
/// `ignore_eos` and no stop conditions, so a one-token prefill that hits EOS still returns
/// `kv_transfer_params` instead of making the decode recompute the prompt silently.
pub fn prefill_body(client: &Map<String, Value>, api: Api) -> Vec<u8> {
    let one = Value::from(1u8);
    let no = Value::Bool(false);
    let yes = Value::Bool(true);
    let mut patch: Vec<Patch<'_>> = Vec::with_capacity(9);
    patch.extend([
        ("kv_transfer_params", Some(prefill_kv_params())),
        ("stream", Some(&no)),
        ("stream_options", None),
    ]);
    patch.extend(api.token_limits().iter().map(|limit| (*limit, Some(&one))));
    if api != Api::Responses {
        patch.extend([
            ("ignore_eos", Some(&yes)),
            ("stop", None),
            ("stop_token_ids", None),
        ]);
    }
    write_patched(client, &patch)
}

/// The decode leg's body: the client's own request plus the prefill's params, verbatim.
pub fn decode_body(client: &Map<String, Value>, kv_transfer_params: &Value) -> Vec<u8> {
    write_patched(client, &[("kv_transfer_params", Some(kv_transfer_params))])
}

/// The fixed params of a prefill request, with the keys present as JSON nulls (vLLM and llm-d's
/// mocks check for them).
fn prefill_kv_params() -> &'static Value {
    static KV: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    KV.get_or_init(|| {
        serde_json::json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        })
    })
}

/// A top-level key replaced or appended (`Some`) or removed (`None`).
type Patch<'a> = (&'static str, Option<&'a Value>);

/// Serializes the client's object with a few top-level keys patched, without cloning it: the
/// client's keys in their order, then the added ones.
fn write_patched(base: &Map<String, Value>, patch: &[Patch<'_>]) -> Vec<u8> {
    use serde::ser::{Serialize, SerializeMap, Serializer};
    struct Patched<'a>(&'a Map<String, Value>, &'a [Patch<'a>]);
    impl Serialize for Patched<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(None)?;
            for (k, v) in self.0 {
                match self.1.iter().find(|(pk, _)| *pk == k) {
                    Some((_, Some(pv))) => m.serialize_entry(k, pv)?,
                    Some((_, None)) => {}
                    None => m.serialize_entry(k, v)?,
                }
            }
            for (pk, pv) in self.1 {
                if let Some(pv) = pv {
                    if !self.0.contains_key(*pk) {
                        m.serialize_entry(pk, pv)?;
                    }
                }
            }
            m.end()
        }
    }
    let mut out = Vec::with_capacity(512);
    serde_json::to_writer(&mut out, &Patched(base, patch)).expect("JSON values serialize");
    out
}

/// What the decode needs from a successful prefill answer.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillResult {
    /// `null` when the prefill returned none (the decode then recomputes; logged).
    pub kv_transfer_params: Value,
    /// The prefill's `usage.prompt_tokens_details.cached_tokens` (0 when absent), which is what
    /// the client should see instead of the decode's near-total count.
    pub cached_tokens: u64,
}

pub fn read_prefill(answer: &Value) -> PrefillResult {
    PrefillResult {
        kv_transfer_params: answer
            .get("kv_transfer_params")
            .cloned()
            .unwrap_or(Value::Null),
        cached_tokens: answer
            .pointer("/usage/prompt_tokens_details/cached_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    }
}

/// Sets `usage.prompt_tokens_details.cached_tokens`, creating the details object if missing.
/// Returns whether the value had a `usage` object.
pub fn rewrite_usage(value: &mut Value, cached_tokens: u64) -> bool {
    let Some(usage) = value.get_mut("usage").and_then(Value::as_object_mut) else {
        return false;
    };
    let details = usage
        .entry("prompt_tokens_details")
        .or_insert_with(|| Value::Object(Map::new()));
    if !details.is_object() {
        *details = Value::Object(Map::new());
    }
    details
        .as_object_mut()
        .expect("made an object above")
        .insert("cached_tokens".into(), Value::from(cached_tokens));
    true
}

/// Rewrites a whole JSON body; bodies that are not JSON objects with `usage` pass unchanged.
pub fn rewrite_json_body(body: &[u8], cached_tokens: u64) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    rewrite_usage(&mut value, cached_tokens).then(|| value.to_string().into_bytes())
}

/// Estimated prompt tokens (characters / 4) for the selective-disaggregation threshold; for chat
/// the JSON of `messages`, as llm-d's decider does.
pub fn estimate_prompt_tokens(body: &Map<String, Value>, api: Api) -> u64 {
    let chars = match api {
        Api::Completions => match body.get("prompt") {
            Some(Value::String(s)) => s.chars().count(),
            Some(other) => other.to_string().len(),
            None => 0,
        },
        Api::Chat => body.get("messages").map_or(0, |m| m.to_string().len()),
        Api::Responses => match body.get("input") {
            Some(Value::String(s)) => s.chars().count(),
            Some(other) => other.to_string().len(),
            None => 0,
        },
    };
    (chars as u64).div_ceil(4)
}

/// The text that identifies a prompt's prefix, for decode prefix affinity.
pub fn prefix_key(body: &Map<String, Value>, api: Api, chars: usize) -> Option<u64> {
    let text = match api {
        Api::Completions => body.get("prompt")?.as_str().map(str::to_string)?,
        Api::Chat => body.get("messages")?.to_string(),
        Api::Responses => body.get("input")?.to_string(),
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

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn parsed(b: Vec<u8>) -> Map<String, Value> {
        map(serde_json::from_slice(&b).unwrap())
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
        let d = String::from_utf8(decode_body(&client, &json!({"x": 1}))).unwrap();
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
        let d = parsed(decode_body(&client, &params));
        assert_eq!(d["max_tokens"], 100);
        assert_eq!(d["min_tokens"], 5);
        assert_eq!(d["stream"], true);
        assert_eq!(d["kv_transfer_params"], params);
        let bare = parsed(decode_body(&map(json!({"prompt": "p"})), &Value::Null));
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
        let d = parsed(decode_body(&client, &json!({})));
        assert_eq!(d["max_output_tokens"], 50);
        assert_eq!(d["stream"], true);
    }

    #[test]
    fn prefill_answer_without_params_or_usage() {
        let r = read_prefill(&json!({"usage": {"prompt_tokens_details": {}}}));
        assert_eq!(r.kv_transfer_params, Value::Null);
        assert_eq!(r.cached_tokens, 0);
        let r = read_prefill(&json!({"kv_transfer_params": {"a": 1},
                                     "usage": {"prompt_tokens_details": {"cached_tokens": 7}}}));
        assert_eq!(r.cached_tokens, 7);
        assert_eq!(r.kv_transfer_params, json!({"a": 1}));
    }

    #[test]
    fn usage_rewrite_sets_or_creates_cached_tokens() {
        for usage in [
            json!({"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": 49}}),
            json!({"prompt_tokens": 1, "prompt_tokens_details": {}}),
            json!({"prompt_tokens": 1}),
            json!({"prompt_tokens": 1, "prompt_tokens_details": null}),
        ] {
            let mut v = json!({"choices": [], "usage": usage});
            assert!(rewrite_usage(&mut v, 7));
            assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 7);
        }
        let mut v = json!({"choices": []});
        assert!(!rewrite_usage(&mut v, 7));
        assert_eq!(rewrite_json_body(b"not json", 7), None);
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
        let chat = map(json!({"messages": [{"role": "user", "content": "hi"}]}));
        assert_eq!(
            estimate_prompt_tokens(&chat, Api::Chat),
            (chat["messages"].to_string().len() as u64).div_ceil(4)
        );
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
