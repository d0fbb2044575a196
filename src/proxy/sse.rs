//! Rewrites `usage.prompt_tokens_details.cached_tokens` inside an SSE stream without holding the
//! stream back: complete lines go out as soon as they arrive; only a partial trailing line waits
//! for its next chunk.

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem;

use super::rewrite::rewrite_json_body;

pub struct SseUsageRewriter {
    cached_tokens: u64,
    partial: BytesMut,
}

impl SseUsageRewriter {
    pub fn new(cached_tokens: u64) -> Self {
        SseUsageRewriter {
            cached_tokens,
            partial: BytesMut::new(),
        }
    }

    /// Takes the next upstream chunk; returns what can be sent now (possibly empty). A chunk of
    /// whole lines without a usage object is passed on as the same buffer, without a copy.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        let Some(last_newline) = chunk.iter().rposition(|b| *b == b'\n') else {
            self.partial.extend_from_slice(&chunk);
            return Bytes::new();
        };
        let complete = if self.partial.is_empty() {
            chunk.slice(..=last_newline)
        } else {
            let mut joined = std::mem::take(&mut self.partial);
            joined.extend_from_slice(&chunk[..=last_newline]);
            joined.freeze()
        };
        self.partial.extend_from_slice(&chunk[last_newline + 1..]);
        // Fast path: most chunks carry no usage object (`"usage":null` is common and untouched).
        let Some(found) = find_usage_object(&complete) else {
            return complete;
        };
        // Lines before the one with the usage object are copied as they are.
        let line_start = memchr::memrchr(b'\n', &complete[..found]).map_or(0, |i| i + 1);
        let mut out = BytesMut::with_capacity(complete.len() + 32);
        out.extend_from_slice(&complete[..line_start]);
        for line in complete[line_start..].split_inclusive(|b| *b == b'\n') {
            self.rewrite_line(line, &mut out);
        }
        out.freeze()
    }

    /// No partial line is waiting for the rest of it.
    pub fn holds_nothing(&self) -> bool {
        self.partial.is_empty()
    }

    /// The end of the stream: a last line without a newline is flushed (rewritten if it can be).
    pub fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.partial);
        let mut out = BytesMut::with_capacity(rest.len());
        if !rest.is_empty() {
            self.rewrite_line(&rest, &mut out);
        }
        out.freeze()
    }

    fn rewrite_line(&self, line: &[u8], out: &mut BytesMut) {
        let body_end = line
            .iter()
            .rposition(|b| *b != b'\n' && *b != b'\r')
            .map_or(0, |i| i + 1);
        let (content, ending) = line.split_at(body_end);
        if let Some(json) = content.strip_prefix(b"data:") {
            let json = json.strip_prefix(b" ").unwrap_or(json);
            // Only a line with a usage object is parsed; every other line is copied as is.
            if !has_usage_object(json) {
                out.extend_from_slice(line);
                return;
            }
            if let Some(rewritten) = rewrite_json_body(json, self.cached_tokens) {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&rewritten);
                out.extend_from_slice(ending);
                return;
            }
        }
        out.extend_from_slice(line);
    }
}

/// Whether some `"usage"` key is followed by an object (`"usage": {`), tolerating whitespace.
fn has_usage_object(haystack: &[u8]) -> bool {
    find_usage_object(haystack).is_some()
}

/// Where the first `"usage"` key followed by an object starts. The scan is SIMD (memchr): it runs
/// over every streamed byte.
fn find_usage_object(haystack: &[u8]) -> Option<usize> {
    const KEY: &[u8] = b"\"usage\"";
    // Built once: building a searcher costs more than running it over a typical chunk.
    static FINDER: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(KEY));
    FINDER.find_iter(haystack).find(|&at| {
        let mut after = haystack[at + KEY.len()..]
            .iter()
            .skip_while(|b| b.is_ascii_whitespace());
        after.next() == Some(&b':') && after.find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}]}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"prompt_tokens_details\":{\"cached_tokens\":49}}}\n\n\
        data: [DONE]\n\n";

    fn run(chunks: &[&[u8]]) -> String {
        let mut r = SseUsageRewriter::new(7);
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&r.push(Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&r.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn rewrites_usage_and_keeps_everything_else() {
        let out = run(&[STREAM.as_bytes()]);
        assert!(out.contains("\"content\":\"hello\""));
        assert!(out.contains("\"cached_tokens\":7"));
        assert!(!out.contains("\"cached_tokens\":49"));
        assert!(out.ends_with("data: [DONE]\n\n"));
        assert_eq!(out.matches("\n\n").count(), 3, "frame boundaries kept");
    }

    #[test]
    fn split_anywhere_gives_the_same_output() {
        let whole = run(&[STREAM.as_bytes()]);
        let bytes = STREAM.as_bytes();
        for cut in 1..bytes.len() {
            assert_eq!(run(&[&bytes[..cut], &bytes[cut..]]), whole, "cut at {cut}");
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(run(&singles), whole);
    }

    #[test]
    fn usage_without_details_gets_them_and_non_json_lines_pass() {
        let out =
            run(&[b"data: {\"usage\":{\"prompt_tokens\":1}}\n\ndata: not json\n: comment\n\n"]);
        assert!(out.contains("\"prompt_tokens_details\":{\"cached_tokens\":7}"));
        assert!(out.contains("data: not json\n: comment\n\n"));
    }

    #[test]
    fn a_trailing_line_without_newline_is_flushed_rewritten() {
        let out = run(&[b"data: {\"usage\":{\"prompt_tokens_details\":{\"cached_tokens\":3}}}"]);
        assert_eq!(
            out,
            "data: {\"usage\":{\"prompt_tokens_details\":{\"cached_tokens\":7}}}"
        );
    }

    #[test]
    fn lines_without_usage_are_not_held_back() {
        let mut r = SseUsageRewriter::new(7);
        assert_eq!(
            &r.push(Bytes::from_static(b"data: {\"a\":1}\n\ndata: {\"b\""))[..],
            b"data: {\"a\":1}\n\n"
        );
        assert_eq!(
            &r.push(Bytes::from_static(b":2}\n\n"))[..],
            b"data: {\"b\":2}\n\n"
        );
    }

    #[test]
    fn usage_null_lines_are_not_parsed_and_pass_without_a_copy() {
        let mut r = SseUsageRewriter::new(7);
        let chunk = Bytes::from_static(b"data: {\"choices\":[],\"usage\":null}\n\n");
        let out = r.push(chunk.clone());
        assert_eq!(out, chunk);
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        let spaced = run(&[b"data: {\"usage\" :  {\"prompt_tokens\":1}}\n\n"]);
        assert!(spaced.contains("\"cached_tokens\":7"), "{spaced}");
        assert!(has_usage_object(b"x \"usage\":null, \"usage\":{}"));
        assert!(!has_usage_object(b"\"usage\":null \"usage\""));
    }
}
