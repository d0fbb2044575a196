//! Helpers shared by the end-to-end tests: free loopback ports, child processes that die with
//! the test, and a minimal HTTP/1.1 client that can also hang up mid-response.
#![allow(dead_code)]

pub mod fake;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A child process killed when the test ends, pass or fail.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `pdctl proxy` (or `pdctl sidecar`) with `args` on a fresh port; returns it and the port.
pub fn start_proxy(sub: &str, args: &[String]) -> (Proc, u16) {
    let port = free_port();
    let listen: Vec<String> = if sub == "sidecar" {
        vec![format!("--port={port}"), "--host=127.0.0.1".into()]
    } else {
        vec!["--listen".into(), format!("127.0.0.1:{port}")]
    };
    let child = pdctl()
        .arg(sub)
        .args(listen)
        .args(args)
        .env("PDCTL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pdctl proxy starts");
    let proc = Proc(child);
    wait_listening(port);
    (proc, port)
}

pub fn pdctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pdctl"))
}

/// Starts `pdctl sim` on fresh ports; returns it with its HTTP and side-channel ports.
pub struct Sim {
    pub proc: Proc,
    pub port: u16,
    pub side_port: u16,
}

impl Sim {
    pub fn start(extra: &[&str]) -> Sim {
        let (port, side_port) = (free_port(), free_port());
        let child = pdctl()
            .args(["sim", "serve", "sim-model", "--port", &port.to_string()])
            .args(["--side-channel-port", &side_port.to_string()])
            .args(extra)
            .env("PDCTL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pdctl sim starts");
        let sim = Sim {
            proc: Proc(child),
            port,
            side_port,
        };
        wait_listening(port);
        sim
    }

    pub fn metric(&self, name: &str) -> f64 {
        let page = get(self.port, "/metrics").body;
        pdctl::sim::metrics::sample(&page, name, "")
            .unwrap_or_else(|| panic!("metric {name} missing from:\n{page}"))
    }
}

pub fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until `f` holds (for counters updated just after a response was sent).
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn get(port: u16, path: &str) -> Reply {
    request(port, "GET", path, &[], "")
}

pub fn post(port: u16, path: &str, body: &serde_json::Value) -> Reply {
    request(port, "POST", path, &[], &body.to_string())
}

pub fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    parse(&raw)
}

fn parse(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete HTTP head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Sends a request and hangs up after `read_bytes` bytes of the response arrived, or, with 0,
/// a moment after sending (once the server is surely working on it).
pub fn hang_up_after(port: u16, path: &str, body: &serde_json::Value, read_bytes: usize) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    if read_bytes == 0 {
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut got = 0;
    let mut buf = [0u8; 256];
    while got < read_bytes {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    drop(stream);
}
