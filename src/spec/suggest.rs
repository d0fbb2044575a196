//! "Did you mean" hints for unknown keys and enum values, added to serde's messages.

/// Edit distance, by characters.
fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate, if it is close enough to be a plausible typo.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let norm = |s: &str| s.to_ascii_lowercase().replace(['-', '_'], "");
    candidates
        .into_iter()
        .map(|c| {
            let (nw, nc) = (norm(word), norm(c));
            let d = if nw == nc {
                0
            } else if nw.len() >= 4 && (nc.starts_with(&nw) || nw.starts_with(&nc)) {
                1
            } else {
                levenshtein(word, c)
            };
            (d, c)
        })
        .filter(|(d, c)| *d <= (c.chars().count() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" (and the same for variants)
/// into a message with a hint: "unknown key `x` (did you mean `a`?); expected one of ...".
pub fn improve(message: &str) -> String {
    if message.contains("untagged enum GpuSelector") {
        return "expected a GPU index (0, 1, ...) or a GPU UUID string".into();
    }
    let (kind, rest) = if let Some(r) = message.strip_prefix("unknown field `") {
        ("key", r)
    } else if let Some(r) = message.strip_prefix("unknown variant `") {
        ("value", r)
    } else {
        return message.to_string();
    };
    let Some((word, tail)) = rest.split_once('`') else {
        return message.to_string();
    };
    let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
    let hint = closest(word, expected.iter().copied())
        .map(|c| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default();
    let list = expected
        .iter()
        .map(|e| format!("`{e}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if list.is_empty() {
        format!("unknown {kind} `{word}`{hint}")
    } else {
        format!("unknown {kind} `{word}`{hint}; expected one of {list}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_near_misses_only() {
        let keys = ["replicas", "gpus_per_replica", "shm_size"];
        assert_eq!(closest("replcas", keys), Some("replicas"));
        assert_eq!(closest("shm-size", keys), Some("shm_size"));
        assert_eq!(closest("banana", keys), None);
        assert_eq!(closest("gpus", keys), Some("gpus_per_replica"));
    }

    #[test]
    fn rewrites_serde_messages() {
        let m = improve("unknown field `replcas`, expected one of `replicas`, `args`");
        assert_eq!(
            m,
            "unknown key `replcas` (did you mean `replicas`?); expected one of `replicas`, `args`"
        );
        let v = improve("unknown variant `round_robin`, expected `round-robin` or `load-aware`");
        assert!(v.contains("did you mean `round-robin`?"), "{v}");
        assert_eq!(improve("invalid type"), "invalid type");
    }
}
