//! Who may send what where: the SSRF allowlist for header-chosen prefill targets, and the API key.

use std::collections::HashSet;

use thiserror::Error;

/// An allowlist entry that names no valid target.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("allowlist entry {entry:?}: bad port {port:?}")]
pub struct AllowlistError {
    pub entry: String,
    pub port: String,
}

/// `host` entries allow any port; `host:port` entries allow exactly that port (llm-d checks hosts
/// only — an open gap, llm-d/llm-d-router#979 — we check ports too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    hosts: HashSet<String>,
    host_ports: HashSet<(String, u16)>,
}

impl Allowlist {
    pub fn parse<'a>(
        entries: impl IntoIterator<Item = &'a str>,
    ) -> Result<Allowlist, AllowlistError> {
        let mut list = Allowlist::default();
        for raw in entries {
            let entry = raw.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            match split_host_port(entry) {
                (host, Some(port)) => {
                    let port = port.parse().map_err(|_| AllowlistError {
                        entry: entry.to_string(),
                        port: port.to_string(),
                    })?;
                    list.host_ports.insert((host.to_string(), port));
                }
                (host, None) => {
                    list.hosts.insert(host.to_string());
                }
            }
        }
        Ok(list)
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.host_ports.is_empty()
    }

    /// `target` is a header value: `host:port`, `http://host:port`, `[v6]:port` or a bare host.
    pub fn allows(&self, target: &str) -> bool {
        let target = target.trim().trim_start_matches("http://");
        let (host, port) = split_host_port(target);
        if self.hosts.contains(host) {
            return true;
        }
        let port = port.and_then(|p| p.parse::<u16>().ok()).unwrap_or(80);
        self.host_ports.contains(&(host.to_string(), port))
    }
}

/// `10.0.0.1:8000` → (`10.0.0.1`, Some(`8000`)); `[::1]:8000` → (`::1`, Some); `::1` → (`::1`, None).
pub fn split_host_port(value: &str) -> (&str, Option<&str>) {
    if let Some(rest) = value.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            return (host, after.strip_prefix(':'));
        }
    }
    match value.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (value, None),
    }
}

/// Compares without an early exit, so response timing does not reveal how much of a guess matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// `Authorization: Bearer KEY` against the configured key.
pub fn authorized(header: Option<&str>, key: &str) -> bool {
    header
        .and_then(|h| h.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_extraction_like_llm_d() {
        assert_eq!(
            split_host_port("10.244.1.100:8000"),
            ("10.244.1.100", Some("8000"))
        );
        assert_eq!(split_host_port("valid-pod"), ("valid-pod", None));
        assert_eq!(split_host_port("[::1]:8000"), ("::1", Some("8000")));
        assert_eq!(split_host_port("::1"), ("::1", None));
    }

    #[test]
    fn hosts_allow_any_port_host_ports_only_theirs() {
        let list = Allowlist::parse([
            "10.244.1.100",
            "valid-pod",
            "valid-pod.test-namespace.svc.cluster.local",
            "10.0.0.9:8000",
        ])
        .unwrap();
        for ok in [
            "10.244.1.100:8000",
            "10.244.1.100:8001",
            "valid-pod:8000",
            "valid-pod:9999",
            "valid-pod.test-namespace.svc.cluster.local:8000",
            "http://10.0.0.9:8000",
        ] {
            assert!(list.allows(ok), "{ok}");
        }
        for denied in [
            "malicious.example.com:8080",
            "10.0.0.1:8000",
            "evil-pod:8000",
            "10.0.0.9:8001",
        ] {
            assert!(!list.allows(denied), "{denied}");
        }
        assert_eq!(
            Allowlist::parse(["h:notaport"]).unwrap_err().to_string(),
            r#"allowlist entry "h:notaport": bad port "notaport""#
        );
    }

    #[test]
    fn api_key_checks() {
        assert!(authorized(Some("Bearer s3cret"), "s3cret"));
        assert!(!authorized(Some("Bearer s3cre"), "s3cret"));
        assert!(!authorized(Some("Bearer s3cretX"), "s3cret"));
        assert!(!authorized(Some("s3cret"), "s3cret"));
        assert!(!authorized(None, "s3cret"));
    }
}
