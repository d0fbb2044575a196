//! Line-buffered rewrite of `usage.prompt_tokens_details.cached_tokens` in an SSE stream.
//!
//! Chunks are forwarded as soon as they hold complete lines; only the unterminated tail of a
//! chunk waits for the next one. Chunks without a `"usage"` key are passed on as the same
//! `Bytes` (no copy), which is every chunk but the last on a vLLM stream.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

use super::pd::set_cached_tokens;

pub struct SseUsageRewriter {
    cached: u64,
    pending: BytesMut,
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

impl SseUsageRewriter {
    pub fn new(cached: u64) -> Self {
        SseUsageRewriter {
            cached,
            pending: BytesMut::new(),
        }
    }

    /// Feeds one upstream chunk; returns what may go to the client now (possibly empty).
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        let data = if self.pending.is_empty() {
            chunk
        } else {
            self.pending.extend_from_slice(&chunk);
            self.pending.split().freeze()
        };
        let Some(last_nl) = data.iter().rposition(|&b| b == b'\n') else {
            self.pending.extend_from_slice(&data);
            return Bytes::new();
        };
        if last_nl + 1 < data.len() {
            self.pending.extend_from_slice(&data[last_nl + 1..]);
        }
        let complete = data.slice(..=last_nl);
        if !contains(&complete, b"\"usage\"") {
            return complete;
        }
        let mut out = BytesMut::with_capacity(complete.len() + 64);
        for line in complete.split_inclusive(|&b| b == b'\n') {
            self.rewrite_line(line, &mut out);
        }
        out.freeze()
    }

    /// The stream ended: a last line without a newline is rewritten and flushed.
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.pending.is_empty() {
            return None;
        }
        let rest = self.pending.split();
        let mut out = BytesMut::with_capacity(rest.len() + 64);
        self.rewrite_line(&rest, &mut out);
        Some(out.freeze())
    }

    fn rewrite_line(&self, line: &[u8], out: &mut BytesMut) {
        let body_len = line
            .iter()
            .rposition(|&b| b != b'\n' && b != b'\r')
            .map_or(0, |i| i + 1);
        let (body, ending) = line.split_at(body_len);
        if let Some(json) = body.strip_prefix(b"data:") {
            let json = json.trim_ascii_start();
            if json.first() == Some(&b'{') && contains(json, b"\"usage\"") {
                if let Ok(mut doc) = serde_json::from_slice::<Value>(json) {
                    if set_cached_tokens(&mut doc, self.cached) {
                        out.extend_from_slice(b"data: ");
                        // Serializing a parsed Value into memory cannot fail.
                        serde_json::to_writer((&mut *out).writer(), &doc).expect("JSON to memory");
                        out.extend_from_slice(ending);
                        return;
                    }
                }
            }
        }
        out.extend_from_slice(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":64,\"prompt_tokens_details\":{\"cached_tokens\":49}}}\n\n",
        "data: [DONE]\n\n"
    );

    fn run(chunks: &[&[u8]], cached: u64) -> String {
        let mut r = SseUsageRewriter::new(cached);
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&r.push(Bytes::copy_from_slice(c)));
        }
        if let Some(rest) = r.finish() {
            out.extend_from_slice(&rest);
        }
        String::from_utf8(out).unwrap()
    }

    /// §12 case 19.
    #[test]
    fn rewrites_the_usage_chunk_only() {
        let out = run(&[STREAM.as_bytes()], 7);
        assert!(out.contains("\"content\":\"hello\""));
        assert!(out.contains("\"cached_tokens\":7"));
        assert!(!out.contains("\"cached_tokens\":49"));
        assert!(out.ends_with("data: [DONE]\n\n"));
        assert!(out.contains("\"usage\":null}\n\n"));
    }

    /// §12 case 20: every split point, including inside `data:` and inside the JSON.
    #[test]
    fn any_split_gives_the_same_output() {
        let whole = run(&[STREAM.as_bytes()], 7);
        let b = STREAM.as_bytes();
        for i in 0..b.len() {
            assert_eq!(run(&[&b[..i], &b[i..]], 7), whole, "split at {i}");
        }
        for i in (0..b.len()).step_by(7) {
            let chunks: Vec<&[u8]> = b.chunks(i.max(1)).collect();
            assert_eq!(run(&chunks, 7), whole, "chunks of {i}");
        }
    }

    #[test]
    fn creates_details_and_keeps_other_lines() {
        let out = run(
            &[b"event: x\ndata: not json \"usage\"\ndata: {\"usage\":{\"prompt_tokens\":3}}\n"],
            5,
        );
        assert!(out.starts_with("event: x\ndata: not json \"usage\"\n"));
        assert!(out.contains("\"prompt_tokens_details\":{\"cached_tokens\":5}"));
    }

    #[test]
    fn flushes_a_trailing_line_without_newline() {
        let out = run(&[b"data: {\"usage\":{}}"], 2);
        assert_eq!(
            out,
            "data: {\"usage\":{\"prompt_tokens_details\":{\"cached_tokens\":2}}}"
        );
        assert_eq!(run(&[b"data: [DONE]"], 2), "data: [DONE]");
    }

    #[test]
    fn crlf_line_endings_survive() {
        let out = run(&[b"data: {\"usage\":{}}\r\n\r\n"], 1);
        assert!(out.ends_with("}}}\r\n\r\n"), "{out}");
    }

    #[test]
    fn chunks_without_usage_pass_through_unchanged() {
        let mut r = SseUsageRewriter::new(1);
        let c = Bytes::from_static(b"data: {\"choices\":[]}\n\n");
        let out = r.push(c.clone());
        assert_eq!(out, c);
        assert_eq!(out.as_ptr(), c.as_ptr(), "no copy on the fast path");
    }
}
