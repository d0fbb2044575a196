//! A JSON object seen to its top level only: keys decoded, values kept as the sender's own bytes.
//! The P/D legs change a handful of top-level fields and copy everything else byte for byte,
//! which is several times cheaper than building a `serde_json::Value` tree and re-serializing
//! it (the proxy's hottest cost), and truer to "unknown fields preserved".

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The top-level fields of a JSON object, in order. A repeated key keeps its first position and
/// its last value, as `serde_json::Map` with `preserve_order` does.
#[derive(Debug)]
pub struct Object<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

/// A top-level key replaced or appended (`Some`, raw JSON text) or removed (`None`).
pub type Patch<'p> = (&'p str, Option<&'p str>);

impl<'a> Object<'a> {
    /// Fails unless `bytes` is exactly one JSON object (surrounding whitespace allowed).
    pub fn parse(bytes: &'a [u8]) -> Result<Object<'a>, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let object = de.deserialize_map(ObjectVisitor)?;
        de.end()?;
        Ok(object)
    }

    /// Like [`Object::parse`], for a value already known to be JSON text.
    pub fn parse_raw(raw: &'a RawValue) -> Option<Object<'a>> {
        Object::parse(raw.get().as_bytes()).ok()
    }

    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, value)| *value)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.fields.len()
    }

    /// The object with `patch` applied: its own keys in order (patched ones in place, removed
    /// ones gone), then the patched keys it did not have, in `patch` order.
    pub fn write_patched(&self, patch: &[Patch<'_>], out: &mut Vec<u8>) {
        out.push(b'{');
        let mut first = true;
        let mut field = |out: &mut Vec<u8>, key: &str, value: &str| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            write_key(out, key);
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
        };
        for (key, value) in &self.fields {
            match patch.iter().find(|(k, _)| k == key) {
                Some((_, Some(new))) => field(out, key, new),
                Some((_, None)) => {}
                None => field(out, key, value.get()),
            }
        }
        for (key, value) in patch {
            if let Some(value) = value {
                if !self.contains(key) {
                    field(out, key, value);
                }
            }
        }
        out.push(b'}');
    }

    pub fn patched(&self, patch: &[Patch<'_>]) -> Vec<u8> {
        let size: usize = self
            .fields
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>()
            + patch
                .iter()
                .map(|(k, v)| k.len() + v.map_or(0, str::len) + 4)
                .sum::<usize>();
        let mut out = Vec::with_capacity(size + 2);
        self.write_patched(patch, &mut out);
        out
    }
}

fn write_key(out: &mut Vec<u8>, key: &str) {
    let plain = key.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
    if plain {
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, key).expect("a string serializes");
    }
}

/// Where the values of `keys` lie among a JSON object's top-level members (the last one wins for
/// a repeated key), found by a structural scan: strings, escapes and nesting are tracked, the
/// bytes in between are not validated. For engine answers only: the values acted on are then
/// parsed, and thereby validated, on their own; the rest passes on as unchanged as any proxied
/// body. `None` when `doc` is not shaped like one object.
pub fn find_members<const N: usize>(
    doc: &[u8],
    keys: [&str; N],
) -> Option<[Option<Range<usize>>; N]> {
    let mut found: [Option<Range<usize>>; N] = std::array::from_fn(|_| None);
    let mut at = skip_space(doc, 0);
    if doc.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_space(doc, at + 1);
    if doc.get(at) == Some(&b'}') {
        return (skip_space(doc, at + 1) == doc.len()).then_some(found);
    }
    loop {
        if doc.get(at) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(doc, at + 1)?;
        let key = &doc[at + 1..key_end - 1];
        at = skip_space(doc, key_end);
        if doc.get(at) != Some(&b':') {
            return None;
        }
        let value_start = skip_space(doc, at + 1);
        let value_end = value_end(doc, value_start)?;
        if let Some(slot) = keys.iter().position(|k| k.as_bytes() == key) {
            found[slot] = Some(value_start..value_end);
        }
        at = skip_space(doc, value_end);
        match doc.get(at) {
            Some(b',') => at = skip_space(doc, at + 1),
            Some(b'}') => {
                return (skip_space(doc, at + 1) == doc.len()).then_some(found);
            }
            _ => return None,
        }
    }
}

fn skip_space(doc: &[u8], mut at: usize) -> usize {
    while matches!(doc.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// The index just past the closing quote of a string whose content starts at `at`.
fn string_end(doc: &[u8], mut at: usize) -> Option<usize> {
    loop {
        at += memchr::memchr2(b'"', b'\\', doc.get(at..)?)?;
        if doc[at] == b'"' {
            return Some(at + 1);
        }
        at += 2;
    }
}

/// The index just past the value starting at `at`.
fn value_end(doc: &[u8], at: usize) -> Option<usize> {
    match doc.get(at)? {
        b'"' => string_end(doc, at + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            while let Some(byte) = doc.get(i) {
                match byte {
                    b'"' => {
                        i = string_end(doc, i + 1)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let len = doc[at..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(doc.len() - at);
            (len > 0).then_some(at + len)
        }
    }
}

/// Whether a raw value is JSON `null`.
pub fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// A raw string value decoded (borrowed when it has no escapes); `None` for other types.
pub fn as_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de.deserialize_str(KeyVisitor).ok()
}

struct ObjectVisitor;

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = Object<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Object<'de>, M::Error> {
        let mut fields: Vec<(Cow<'de, str>, &'de RawValue)> =
            Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value: &'de RawValue = map.next_value()?;
            match fields.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None => fields.push((key, value)),
            }
        }
        Ok(Object { fields })
    }
}

/// Deserializes a string borrowing from the input when it can (serde's own `Cow<str>` always
/// allocates).
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn obj(text: &str) -> Object<'_> {
        Object::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn keeps_values_byte_for_byte_and_keys_in_order() {
        let text = r#" {"z": 1.50, "a\"b": {"n": [1, 2 ]}, "s": "\u00e9"} "#;
        let o = obj(text);
        assert_eq!(o.len(), 3);
        assert_eq!(o.get("z").unwrap().get(), "1.50");
        assert_eq!(o.get("a\"b").unwrap().get(), r#"{"n": [1, 2 ]}"#);
        let out = String::from_utf8(o.patched(&[])).unwrap();
        assert_eq!(out, r#"{"z":1.50,"a\"b":{"n": [1, 2 ]},"s":"\u00e9"}"#);
        let reparsed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(reparsed, json!({"z": 1.5, "a\"b": {"n": [1, 2]}, "s": "é"}));
    }

    #[test]
    fn patches_replace_in_place_remove_and_append() {
        let o = obj(r#"{"a":1,"b":2,"c":3}"#);
        let out = o.patched(&[("b", Some("true")), ("c", None), ("d", Some("null"))]);
        assert_eq!(out, br#"{"a":1,"b":true,"d":null}"#);
        assert_eq!(obj("{}").patched(&[("x", None)]), b"{}");
    }

    #[test]
    fn a_repeated_key_keeps_its_place_and_last_value() {
        let o = obj(r#"{"a":1,"b":2,"a":3}"#);
        assert_eq!(o.patched(&[]), br#"{"a":3,"b":2}"#);
    }

    #[test]
    fn refuses_anything_but_one_object() {
        for bad in [
            "",
            "[]",
            "1",
            "\"s\"",
            "{",
            r#"{"a":1} {}"#,
            r#"{"a":}"#,
            "{1:2}",
        ] {
            assert!(Object::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn member_scan_finds_top_level_values_only() {
        let doc = br#" {"a": {"usage": 1, "s": "}\"{"}, "usage" : [1, {"b": "]"}] , "n": -1.5e3, "z": null } "#;
        let [usage, n, a, missing] = find_members(doc, ["usage", "n", "a", "nope"]).unwrap();
        let text =
            |r: Option<Range<usize>>| std::str::from_utf8(&doc[r.unwrap()]).unwrap().to_string();
        assert_eq!(text(usage), r#"[1, {"b": "]"}]"#);
        assert_eq!(text(n), "-1.5e3");
        assert_eq!(text(a), r#"{"usage": 1, "s": "}\"{"}"#);
        assert_eq!(missing, None);
        assert_eq!(find_members(b"{}", ["a"]).unwrap(), [None]);
        for bad in [
            &b""[..],
            b"[]",
            b"{",
            b"{\"a\":1",
            b"{\"a\" 1}",
            b"{\"a\":1} x",
            b"{\"a\":\"x}",
            b"<html>",
        ] {
            assert!(
                find_members(bad, ["a"]).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            // Eighths print and parse back exactly; arbitrary floats need serde_json's
            // float_roundtrip to compare equal, which is not what this test is about.
            (-8000i32..8000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
            "[a-z\"\\\\{}\\[\\]:, é\\n]{0,12}".prop_map(Value::String),
            Just(Value::String(r#""usage":{"#.to_string())),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::vec(("[a-z]{1,3}|usage", inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// The scan agrees with serde_json on every top-level member, compact or pretty.
        #[test]
        fn member_scan_agrees_with_serde(
            members in proptest::collection::vec(("[a-c]|usage", json_value()), 0..6),
            pretty in proptest::bool::ANY,
        ) {
            let object: serde_json::Map<String, Value> = members.into_iter().collect();
            let doc = if pretty {
                serde_json::to_vec_pretty(&object).unwrap()
            } else {
                serde_json::to_vec(&object).unwrap()
            };
            let keys = ["a", "b", "c", "usage"];
            let found = find_members(&doc, keys).unwrap();
            for (key, range) in keys.iter().zip(found) {
                let scanned: Option<Value> =
                    range.map(|r| serde_json::from_slice(&doc[r]).unwrap());
                proptest::prop_assert_eq!(scanned.as_ref(), object.get(*key));
            }
        }
    }

    #[test]
    fn strings_decode_with_or_without_escapes() {
        let o = obj(r#"{"p":"plain","q":"tab\there","n":3}"#);
        assert!(matches!(
            as_str(o.get("p").unwrap()),
            Some(Cow::Borrowed("plain"))
        ));
        assert_eq!(as_str(o.get("q").unwrap()).unwrap(), "tab\there");
        assert_eq!(as_str(o.get("n").unwrap()), None);
        assert!(is_null(obj(r#"{"x":null}"#).get("x").unwrap()));
    }
}
