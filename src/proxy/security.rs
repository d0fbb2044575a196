//! Request admission: the SSRF allowlist for sidecar prefill targets (ports checked), the
//! `x-prefiller-host-port` header, and the API key check.

use std::net::IpAddr;

use http::HeaderMap;

pub const PREFILLER_HEADER: &str = "x-prefiller-host-port";
/// RS's legacy name for the same target.
pub const PREFILLER_URL_HEADER: &str = "x-prefiller-url";
pub const ENCODER_HEADER: &str = "x-encoder-hosts-ports";

/// Splits `host[:port]` / `[v6]:port` / bare v6, after trimming a literal `http://` as llm-d does.
pub fn split_host_port(target: &str) -> (&str, Option<u16>) {
    let t = target.strip_prefix("http://").unwrap_or(target);
    let t = t.trim_end_matches('/');
    if let Some(rest) = t.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
            return (host, port);
        }
    }
    if t.parse::<IpAddr>().is_ok() {
        return (t, None);
    }
    match t.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (t, None),
        },
        _ => (t, None),
    }
}

/// Hosts (any port) and host:port pairs a sidecar may send prefill legs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    entries: Vec<(String, Option<u16>)>,
}

#[derive(Debug, thiserror::Error)]
#[error("allowlist entry {entry:?} is not host, host:port or [ipv6]:port")]
pub struct BadEntry {
    pub entry: String,
}

impl Allowlist {
    /// Entries separated by commas, whitespace or newlines; `#` starts a comment (for files).
    pub fn parse<'a>(sources: impl IntoIterator<Item = &'a str>) -> Result<Allowlist, BadEntry> {
        let mut entries = Vec::new();
        for src in sources {
            for line in src.lines() {
                let line = line.split('#').next().unwrap_or("");
                for e in line.split(|c: char| c == ',' || c.is_whitespace()) {
                    if e.is_empty() {
                        continue;
                    }
                    let (host, port) = split_host_port(e);
                    if host.is_empty() || host.contains('/') || (e.ends_with(':') && port.is_none())
                    {
                        return Err(BadEntry { entry: e.into() });
                    }
                    entries.push((host.to_ascii_lowercase(), port));
                }
            }
        }
        Ok(Allowlist { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn allows(&self, target: &str) -> bool {
        let (host, port) = split_host_port(target);
        self.entries.iter().any(|(h, p)| {
            h.eq_ignore_ascii_case(host)
                && match p {
                    None => true,
                    Some(p) => port == Some(*p),
                }
        })
    }
}

/// The prefill target named by the headers: one header line is split on commas, several lines
/// are one candidate each (llm-d IS/RT); `sample` rotates over the candidates instead of taking
/// the first. Empty → no disaggregation.
pub fn prefill_target(headers: &HeaderMap, sample: Option<usize>) -> Option<String> {
    let mut values = headers.get_all(PREFILLER_HEADER).iter();
    let first = values
        .next()
        .or_else(|| headers.get(PREFILLER_URL_HEADER))?;
    let mut cands: Vec<&str> = Vec::new();
    let rest: Vec<_> = values.collect();
    if rest.is_empty() {
        cands.extend(first.to_str().ok()?.split(','));
    } else {
        for v in std::iter::once(first).chain(rest) {
            cands.push(v.to_str().ok()?);
        }
    }
    let i = sample.map_or(0, |s| s % cands.len());
    let t = cands[i].trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Constant-time comparison of `Authorization: Bearer <key>` with the expected key.
pub fn api_key_ok(expected: &[u8], headers: &HeaderMap) -> bool {
    let got = headers
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| {
            v.strip_prefix(b"Bearer ")
                .or_else(|| v.strip_prefix(b"bearer "))
        })
        .unwrap_or(b"");
    // Length is not secret; every byte of equal-length keys is compared.
    if got.len() != expected.len() {
        return false;
    }
    got.iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn host_extraction_like_llmd() {
        assert_eq!(
            split_host_port("10.244.1.100:8000"),
            ("10.244.1.100", Some(8000))
        );
        assert_eq!(split_host_port("valid-pod"), ("valid-pod", None));
        assert_eq!(split_host_port("[::1]:8000"), ("::1", Some(8000)));
        assert_eq!(split_host_port("::1"), ("::1", None));
        assert_eq!(split_host_port("http://h:9"), ("h", Some(9)));
    }

    /// §12 case 26, with ports: a bare host allows any port, host:port only that port.
    #[test]
    fn allowlist_with_ports() {
        let a = Allowlist::parse([
            "10.244.1.100, valid-pod\nvalid-pod.test-namespace.svc.cluster.local # fqdn",
            "pinned:8000,[fd00::1]:9",
        ])
        .unwrap();
        for ok in [
            "10.244.1.100:8000",
            "10.244.1.100:8001",
            "valid-pod:8000",
            "valid-pod:9999",
            "valid-pod.test-namespace.svc.cluster.local:8000",
            "http://valid-pod:1",
            "pinned:8000",
            "[fd00::1]:9",
        ] {
            assert!(a.allows(ok), "{ok}");
        }
        for bad in [
            "malicious.example.com:8080",
            "10.0.0.1:8000",
            "evil-pod:8000",
            "pinned:8001",
            "pinned",
            "[fd00::1]:10",
            "http://evil.host/ssrf",
        ] {
            assert!(!a.allows(bad), "{bad}");
        }
        assert!(Allowlist::parse(["host:"]).is_err());
        assert!(Allowlist::parse(["a/b"]).is_err());
        assert!(Allowlist::parse(["# only a comment\n"]).unwrap().is_empty());
    }

    fn hdrs(vals: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in vals {
            h.append(PREFILLER_HEADER, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// §12 cases 3-6.
    #[test]
    fn header_parsing() {
        assert_eq!(prefill_target(&hdrs(&[]), None), None);
        assert_eq!(prefill_target(&hdrs(&["a"]), None).as_deref(), Some("a"));
        assert_eq!(prefill_target(&hdrs(&["a,b"]), None).as_deref(), Some("a"));
        assert_eq!(
            prefill_target(&hdrs(&["a,b"]), Some(1)).as_deref(),
            Some("b")
        );
        assert_eq!(
            prefill_target(&hdrs(&[" a, b"]), Some(0)).as_deref(),
            Some("a")
        );
        assert_eq!(
            prefill_target(&hdrs(&[" a, b"]), Some(1)).as_deref(),
            Some("b")
        );
        assert_eq!(
            prefill_target(&hdrs(&["a", "b"]), Some(1)).as_deref(),
            Some("b")
        );
        assert_eq!(
            prefill_target(&hdrs(&["a", "b"]), None).as_deref(),
            Some("a")
        );
        assert_eq!(prefill_target(&hdrs(&[""]), None), None);
        assert_eq!(prefill_target(&hdrs(&["", ""]), Some(1)), None);
        let mut legacy = HeaderMap::new();
        legacy.insert(PREFILLER_URL_HEADER, HeaderValue::from_static("http://p:1"));
        assert_eq!(prefill_target(&legacy, None).as_deref(), Some("http://p:1"));
    }

    #[test]
    fn api_key() {
        let mut h = HeaderMap::new();
        assert!(!api_key_ok(b"k1", &h));
        h.insert("authorization", HeaderValue::from_static("Bearer k1"));
        assert!(api_key_ok(b"k1", &h));
        assert!(!api_key_ok(b"k2", &h));
        assert!(!api_key_ok(b"k11", &h));
    }
}
