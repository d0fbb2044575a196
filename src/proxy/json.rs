//! A JSON object seen to its top level only: keys decoded, values kept as the sender's own bytes.
//! The P/D legs change a handful of top-level fields and copy everything else byte for byte,
//! which is several times cheaper than building a `serde_json::Value` tree and re-serializing
//! it (the proxy's hottest cost), and truer to "unknown fields preserved".

use std::borrow::Cow;
use std::fmt;

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

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
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
