//! Where every key and value of a pools.toml sits, so semantic errors (found after serde has
//! produced plain typed values) can still point at `FILE:LINE:COL`.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

/// A tree of value spans mirroring the document.
#[derive(Debug, Clone, Default)]
pub struct SpanIndex {
    root: Option<Spanned<Node>>,
}

#[derive(Debug, Clone)]
enum Node {
    Table(BTreeMap<String, Spanned<Node>>),
    Array(Vec<Spanned<Node>>),
    Leaf,
}

/// One step of a path into the document: a key or an array index.
#[derive(Debug, Clone, Copy)]
pub enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> From<&'a str> for Seg<'a> {
    fn from(k: &'a str) -> Self {
        Seg::Key(k)
    }
}

impl From<usize> for Seg<'_> {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

impl SpanIndex {
    /// Never fails on a document that toml already parsed; an index that cannot be built only
    /// makes every lookup fall back to the start of the file.
    pub fn build(src: &str) -> Self {
        SpanIndex {
            root: toml::from_str::<Spanned<Node>>(src).ok(),
        }
    }

    /// The span of the value at `path`, or of its deepest ancestor that the file spells out
    /// (defaults have no text of their own, so errors about them point at their table).
    pub fn find(&self, path: &[Seg<'_>]) -> Range<usize> {
        let Some(mut cur) = self.root.as_ref() else {
            return 0..0;
        };
        let mut best = cur.span();
        for seg in path {
            let next = match (seg, cur.get_ref()) {
                (Seg::Key(k), Node::Table(t)) => t.get(*k),
                (Seg::Index(i), Node::Array(a)) => a.get(*i),
                _ => None,
            };
            match next {
                Some(n) => {
                    cur = n;
                    best = n.span();
                }
                None => break,
            }
        }
        // The root table spans the whole file; point at its first character only.
        if path.is_empty() || std::ptr::eq(cur, self.root.as_ref().unwrap()) {
            return best.start..best.start;
        }
        best
    }

    /// The span of the key (not the value) at `path` when the file has it: a key's own text
    /// starts the line the value is on, which is the better place to point at for bad keys.
    pub fn key(&self, path: &[Seg<'_>], src: &str) -> Range<usize> {
        let value = self.find(path);
        let Some(Seg::Key(k)) = path.last() else {
            return value;
        };
        let line_start = src[..value.start.min(src.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        match src[line_start..value.start.min(src.len())].find(*k) {
            Some(off) => line_start + off..line_start + off + k.len(),
            None => value,
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

macro_rules! leaf {
    ($($name:ident: $t:ty),*) => {$(
        fn $name<E: serde::de::Error>(self, _v: $t) -> Result<Node, E> {
            Ok(Node::Leaf)
        }
    )*};
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }

    leaf!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut t = BTreeMap::new();
        while let Some((k, v)) = map.next_entry::<String, Spanned<Node>>()? {
            t.insert(k, v);
        }
        Ok(Node::Table(t))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut a = Vec::new();
        while let Some(v) = seq.next_element::<Spanned<Node>>()? {
            a.push(v);
        }
        Ok(Node::Array(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "project = \"x\"\n[decode]\nreplicas = 0\nargs = [\"a\", \"b\"]\n";

    fn text(r: Range<usize>) -> &'static str {
        &SRC[r]
    }

    #[test]
    fn finds_values_keys_and_array_items() {
        let idx = SpanIndex::build(SRC);
        assert_eq!(text(idx.find(&["decode".into(), "replicas".into()])), "0");
        assert_eq!(
            text(idx.key(&["decode".into(), "replicas".into()], SRC)),
            "replicas"
        );
        assert_eq!(
            text(idx.find(&["decode".into(), "args".into(), 1.into()])),
            "\"b\""
        );
    }

    #[test]
    fn missing_keys_fall_back_to_the_nearest_ancestor() {
        let idx = SpanIndex::build(SRC);
        let r = idx.find(&["decode".into(), "shm_size".into()]);
        assert!(SRC[r.start..].starts_with("[decode]") || SRC[r.start..].starts_with("replicas"));
        assert_eq!(idx.find(&["prefill".into(), "replicas".into()]), 0..0);
    }
}
