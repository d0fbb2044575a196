//! The one HTTP/1.1 client of the tests: blocking, on loopback, reading exactly one response per
//! request (by content-length, chunked encoding or the end of the connection) so a connection
//! can be kept alive across requests; it can also hang up in the middle of a response.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

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

    /// Every value of header `name`, in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// One kept-alive client connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(port: u16) -> Conn {
        Conn::open_with_timeout(port, Duration::from_secs(30))
    }

    /// A connection whose reads fail after `limit` without data (a stalled answer fails the
    /// test instead of hanging it).
    pub fn open_with_timeout(port: u16, limit: Duration) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
        stream.set_read_timeout(Some(limit)).unwrap();
        Conn {
            reader: BufReader::new(stream),
        }
    }

    /// Sends one request (a JSON content type unless `headers` names one) and reads its whole
    /// response.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        self.write_request(method, path, headers, body);
        self.read_response(method == "HEAD")
    }

    fn write_request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n");
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            head.push_str("content-type: application/json\r\n");
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
    }

    fn read_response(&mut self, head_only: bool) -> Reply {
        let status_line = self.line();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP status line: {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let body = if head_only || status == 204 || status == 304 {
            Vec::new()
        } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            self.chunked_body()
        } else if let Some(length) = find("content-length") {
            let mut body = vec![0; length.parse().expect("a numeric content-length")];
            self.reader.read_exact(&mut body).expect("the whole body");
            body
        } else {
            let mut body = Vec::new();
            self.reader
                .read_to_end(&mut body)
                .expect("the body up to the close");
            body
        };
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    fn chunked_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let size_line = self.line();
            let size = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
            if size == 0 {
                // Trailers, if any, end with an empty line.
                while !self.line().is_empty() {}
                return body;
            }
            let start = body.len();
            body.resize(start + size, 0);
            self.reader
                .read_exact(&mut body[start..])
                .expect("a whole chunk");
            assert!(self.line().is_empty(), "a chunk ends with CRLF");
        }
    }

    /// One line without its CRLF; fails the test if the connection ends or stalls first.
    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading the response: {e}"));
        assert!(n > 0, "the connection closed before the response ended");
        line.trim_end_matches(['\r', '\n']).to_string()
    }
}

/// One request on a fresh connection.
pub fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    Conn::open(port).send(method, path, headers, body)
}

pub fn get(port: u16, path: &str) -> Reply {
    request(port, "GET", path, &[], "")
}

pub fn post(port: u16, path: &str, body: &serde_json::Value) -> Reply {
    request(port, "POST", path, &[], &body.to_string())
}

/// Waits until something accepts connections on `port` (a child process has bound it).
pub fn wait_serving(port: u16) {
    let listening = super::poll(Duration::from_secs(20), Duration::from_millis(20), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(listening, "nothing listens on {port}");
}

/// Waits until GET `path` answers `status`.
pub fn wait_status(port: u16, path: &str, status: u16) {
    super::eventually(&format!("GET {path} on {port} answers {status}"), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok() && get(port, path).status == status
    });
}

/// Sends a POST and hangs up after `read_bytes` bytes of the response arrived, or, with 0, a
/// moment after sending (once the server is surely working on it).
pub fn hang_up_after(port: u16, path: &str, body: &serde_json::Value, read_bytes: usize) {
    drop(read_partly(port, path, body, read_bytes));
}

/// Sends a POST and returns once `read_bytes` bytes of a 200 response arrived (or, with 0, a
/// moment after sending); the client hangs up when the test drops the returned connection.
pub fn read_partly(
    port: u16,
    path: &str,
    body: &serde_json::Value,
    read_bytes: usize,
) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
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
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < read_bytes {
        match stream.read(&mut buf) {
            Ok(0) => panic!("the server closed after {} bytes", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading the response: {e}"),
        }
    }
    if read_bytes > 0 {
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    stream
}
