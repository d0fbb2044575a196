//! The pure part of the nixlv2 protocol (protocol.md Part 1 and Part 2 §5): prefill and decode
//! bodies, prefill-response parsing, usage rewriting and prompt estimates. No I/O here.
//!
//! Bodies are serialized as a *patched view* of the client's object: the client's keys in their
//! order, with a few top-level keys replaced, removed or appended. Nothing is cloned, unknown
//! fields pass through untouched, and absent keys stay absent on the decode leg for free because
//! the decode body is the original object plus `kv_transfer_params`.

use std::hash::{Hash, Hasher};
use std::sync::OnceLock;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The request shapes routed through prefill then decode.
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

    pub fn label(self) -> &'static str {
        match self {
            Api::Completions => "completions",
            Api::Chat => "chat",
            Api::Responses => "responses",
        }
    }
}

/// `Some(v)` replaces or appends the key, `None` removes it.
type Patch<'a> = (&'static str, Option<&'a Value>);

struct Patched<'a> {
    base: &'a Map<String, Value>,
    patch: &'a [Patch<'a>],
}

impl Serialize for Patched<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.base {
            match self.patch.iter().find(|(pk, _)| *pk == k) {
                Some((_, Some(pv))) => m.serialize_entry(k, pv)?,
                Some((_, None)) => {}
                None => m.serialize_entry(k, v)?,
            }
        }
        for (pk, pv) in self.patch {
            if let Some(pv) = pv {
                if !self.base.contains_key(*pk) {
                    m.serialize_entry(pk, pv)?;
                }
            }
        }
        m.end()
    }
}

fn write(base: &Map<String, Value>, patch: &[Patch<'_>], size_hint: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size_hint + 256);
    // A map of plain JSON values into a Vec cannot fail to serialize.
    serde_json::to_writer(&mut out, &Patched { base, patch }).expect("JSON to memory");
    out
}

/// The fixed `kv_transfer_params` of a prefill request: explicit nulls, as vLLM and llm-d's
/// mocks require the keys to be present.
fn prefill_kv_params() -> &'static Value {
    static KV: OnceLock<Value> = OnceLock::new();
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

/// The prefill leg's body: `stream:false`, no `stream_options`, every token limit 1, and (beyond
/// llm-d) `ignore_eos:true` without `stop`/`stop_token_ids`, so that a one-token prefill that
/// hits EOS still returns `kv_transfer_params` instead of making decode recompute silently.
pub fn prefill_body(api: Api, req: &Map<String, Value>, size_hint: usize) -> Vec<u8> {
    let one = Value::from(1u8);
    let no = Value::Bool(false);
    let yes = Value::Bool(true);
    let kv = prefill_kv_params();
    match api {
        Api::Completions | Api::Chat => write(
            req,
            &[
                ("kv_transfer_params", Some(kv)),
                ("stream", Some(&no)),
                ("stream_options", None),
                ("max_tokens", Some(&one)),
                ("max_completion_tokens", Some(&one)),
                ("min_tokens", Some(&one)),
                ("ignore_eos", Some(&yes)),
                ("stop", None),
                ("stop_token_ids", None),
            ],
            size_hint,
        ),
        Api::Responses => write(
            req,
            &[
                ("kv_transfer_params", Some(kv)),
                ("stream", Some(&no)),
                ("stream_options", None),
                ("max_output_tokens", Some(&one)),
            ],
            size_hint,
        ),
    }
}

/// The decode leg's body: the client's object with the prefill's `kv_transfer_params` verbatim
/// (JSON `null` when the prefill returned none: vLLM then prefills locally).
pub fn decode_body(req: &Map<String, Value>, kv: &Value, size_hint: usize) -> Vec<u8> {
    write(req, &[("kv_transfer_params", Some(kv))], size_hint)
}

/// What the decode leg needs from a prefill response.
#[derive(Debug, PartialEq)]
pub struct PrefillResult {
    pub kv_transfer_params: Value,
    /// `usage.prompt_tokens_details.cached_tokens`; `None` when the prefill reported none.
    pub cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct PrefillWire {
    #[serde(default)]
    kv_transfer_params: Value,
    #[serde(default)]
    usage: Option<UsageWire>,
}

#[derive(Deserialize)]
struct UsageWire {
    #[serde(default)]
    prompt_tokens_details: Option<DetailsWire>,
}

#[derive(Deserialize)]
struct DetailsWire {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

/// Parses a prefill response; `choices`, `id` and every other field are skipped unread.
pub fn parse_prefill(body: &[u8]) -> Result<PrefillResult, serde_json::Error> {
    let w: PrefillWire = serde_json::from_slice(body)?;
    let cached_tokens = w
        .usage
        .and_then(|u| u.prompt_tokens_details)
        .and_then(|d| d.cached_tokens);
    Ok(PrefillResult {
        kv_transfer_params: w.kv_transfer_params,
        cached_tokens,
    })
}

/// Sets `usage.prompt_tokens_details.cached_tokens`, creating the details object if needed.
/// Returns false when `usage` is not an object (absent or null): nothing to rewrite.
pub fn set_cached_tokens(doc: &mut Value, cached: u64) -> bool {
    let Some(Value::Object(usage)) = doc.get_mut("usage") else {
        return false;
    };
    let details = usage
        .entry("prompt_tokens_details")
        .or_insert_with(|| Value::Object(Map::new()));
    if !details.is_object() {
        *details = Value::Object(Map::new());
    }
    if let Value::Object(d) = details {
        d.insert("cached_tokens".into(), Value::from(cached));
    }
    true
}

/// Rewrites the usage of a whole JSON response; `None` when it is not JSON or has no usage.
pub fn rewrite_usage_json(body: &[u8], cached: u64) -> Option<Vec<u8>> {
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    if !set_cached_tokens(&mut doc, cached) {
        return None;
    }
    serde_json::to_vec(&doc).ok()
}

/// Visits the prompt text the way the simulator and llm-d's scheduler count it.
fn for_each_prompt_piece(api: Api, req: &Map<String, Value>, f: &mut dyn FnMut(&str) -> bool) {
    fn content(v: &Value, f: &mut dyn FnMut(&str) -> bool) -> bool {
        match v {
            Value::String(s) => f(s),
            Value::Array(parts) => parts.iter().all(|p| match p {
                Value::String(s) => f(s),
                Value::Object(o) => o.get("text").and_then(Value::as_str).is_none_or(&mut *f),
                _ => true,
            }),
            _ => true,
        }
    }
    match api {
        Api::Completions => {
            if let Some(p) = req.get("prompt") {
                content(p, f);
            }
        }
        Api::Chat => {
            for m in req
                .get("messages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let role = m.get("role").and_then(Value::as_str).unwrap_or("");
                if !f(role) || !f(": ") {
                    return;
                }
                if let Some(c) = m.get("content") {
                    if !content(c, f) {
                        return;
                    }
                }
                if !f("\n") {
                    return;
                }
            }
        }
        Api::Responses => match req.get("input") {
            Some(Value::Array(items)) => {
                for it in items {
                    let c = it.get("content").unwrap_or(it);
                    if !content(c, f) {
                        return;
                    }
                }
            }
            Some(v) => {
                content(v, f);
            }
            None => {}
        },
    }
}

/// Estimated prompt tokens: characters / 4 (token-id prompts count one per id).
pub fn estimate_prompt_tokens(api: Api, req: &Map<String, Value>) -> u64 {
    let mut chars = 0u64;
    for_each_prompt_piece(api, req, &mut |s| {
        chars += s.chars().count() as u64;
        true
    });
    let mut ids = 0u64;
    if api == Api::Completions {
        if let Some(Value::Array(p)) = req.get("prompt") {
            ids = p.iter().filter(|v| v.is_number()).count() as u64;
        }
    }
    chars / 4 + ids
}

/// Characters of prompt prefix hashed for decode prefix affinity: four 16-token blocks.
pub const AFFINITY_PREFIX_CHARS: usize = 256;

/// A stable hash of the prompt's first [`AFFINITY_PREFIX_CHARS`] bytes, so that requests
/// sharing a prefix land on the decode engine that has it cached.
pub fn prompt_prefix_hash(api: Api, req: &Map<String, Value>) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    let mut left = AFFINITY_PREFIX_CHARS;
    for_each_prompt_piece(api, req, &mut |s| {
        let b = s.as_bytes();
        let n = b.len().min(left);
        b[..n].hash(&mut h);
        left -= n;
        left > 0
    });
    h.finish()
}

#[cfg(test)]
mod tests;
