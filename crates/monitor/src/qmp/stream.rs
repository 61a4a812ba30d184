//! Splits a QMP byte stream into JSON values the way QEMU's streaming parser does: messages
//! need no newline (the `qemu.qmp` client sends none), objects end when their braces balance,
//! and garbage produces an error and the parser carries on. Bounds: a message may be at most
//! `max_len` bytes and nest at most [`MAX_DEPTH`] levels; past either the parser reports once
//! and skips to the next newline. A raw control character inside a string (invalid JSON) ends
//! the broken message at once, so a client can always resynchronize with a newline.

use serde_json::Value;

/// Deepest nesting accepted (serde_json's own recursion limit).
pub const MAX_DEPTH: usize = 128;

/// One thing the stream produced.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonItem {
    /// A well-formed JSON value.
    Value(Value),
    /// Malformed input; the text is QEMU's `JSON parse error, ...` description.
    Error(String),
}

#[derive(Debug)]
pub struct JsonStreamer {
    buf: Vec<u8>,
    max_len: usize,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// A top-level scalar (number, keyword, string) is being collected.
    scalar: bool,
    skip_to_newline: bool,
}

impl JsonStreamer {
    pub fn new(max_len: usize) -> Self {
        JsonStreamer {
            buf: Vec::new(),
            max_len: max_len.max(16),
            depth: 0,
            in_string: false,
            escape: false,
            scalar: false,
            skip_to_newline: false,
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.scalar = false;
    }

    fn emit(&mut self, out: &mut Vec<JsonItem>) {
        let item = match serde_json::from_slice::<Value>(&self.buf) {
            Ok(v) => JsonItem::Value(v),
            Err(e) => JsonItem::Error(format!("JSON parse error, {}", describe(&e))),
        };
        out.push(item);
        self.reset();
    }

    fn fail(&mut self, out: &mut Vec<JsonItem>, why: &str, skip: bool) {
        out.push(JsonItem::Error(format!("JSON parse error, {why}")));
        self.reset();
        self.skip_to_newline = skip;
    }

    /// Feeds bytes, appending every completed value or error to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<JsonItem>) {
        for &b in bytes {
            self.feed_byte(b, out);
        }
    }

    fn feed_byte(&mut self, b: u8, out: &mut Vec<JsonItem>) {
        if self.skip_to_newline {
            if b == b'\n' {
                self.skip_to_newline = false;
            }
            return;
        }
        // A top-level scalar ends at whitespace or a structural character.
        if self.scalar
            && !self.in_string
            && (b.is_ascii_whitespace() || matches!(b, b'{' | b'[' | b'}' | b']'))
        {
            self.emit(out);
        }
        if self.depth == 0 && !self.scalar {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => return,
                b'}' | b']' => {
                    self.fail(out, &format!("stray '{}'", b as char), false);
                    return;
                }
                b'{' | b'[' => {}
                _ => self.scalar = true,
            }
        }
        if self.buf.len() >= self.max_len {
            self.fail(
                out,
                &format!("message longer than {} bytes", self.max_len),
                b != b'\n',
            );
            return;
        }
        self.buf.push(b);
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.scalar {
                    self.emit(out);
                }
            } else if b < 0x20 {
                self.fail(out, "control character in string", false);
            }
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    self.fail(
                        out,
                        &format!("nesting deeper than {MAX_DEPTH} levels"),
                        true,
                    );
                }
            }
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    self.emit(out);
                }
            }
            _ => {}
        }
    }

    /// Called at end of input: an unfinished message is reported.
    pub fn finish(&mut self, out: &mut Vec<JsonItem>) {
        if self.scalar && !self.in_string {
            self.emit(out);
        } else if !self.buf.is_empty() {
            self.fail(out, "unexpected end of input", false);
        }
    }
}

fn describe(e: &serde_json::Error) -> String {
    // serde's messages end with " at line L column C"; keep them, they help to locate the fault.
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn split(input: &[u8]) -> Vec<JsonItem> {
        let mut s = JsonStreamer::new(64);
        let mut out = Vec::new();
        s.feed(input, &mut out);
        s.finish(&mut out);
        out
    }

    fn is_err(i: &JsonItem) -> bool {
        matches!(i, JsonItem::Error(_))
    }

    #[test]
    fn objects_without_newlines_and_split_across_feeds() {
        let mut s = JsonStreamer::new(1024);
        let mut out = Vec::new();
        s.feed(br#"{"execute":"a"}{"execute""#, &mut out);
        assert_eq!(out, [JsonItem::Value(json!({"execute": "a"}))]);
        s.feed(br#":"b", "x": "}{\""}"#, &mut out);
        assert_eq!(
            out[1],
            JsonItem::Value(json!({"execute": "b", "x": "}{\""}))
        );
    }

    #[test]
    fn scalars_and_garbage_produce_items_and_recover() {
        let out = split(b"42 foo {\"a\":1} } [1,2]");
        assert_eq!(out[0], JsonItem::Value(json!(42)));
        assert!(is_err(&out[1]));
        assert_eq!(out[2], JsonItem::Value(json!({"a": 1})));
        assert!(is_err(&out[3]));
        assert_eq!(out[4], JsonItem::Value(json!([1, 2])));
        let out = split(b"{\"a\": }\n{\"b\":2}");
        assert!(is_err(&out[0]));
        assert_eq!(out[1], JsonItem::Value(json!({"b": 2})));
    }

    #[test]
    fn oversized_and_deep_messages_skip_to_newline() {
        let mut big = b"{\"a\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', 200));
        big.extend_from_slice(b"\"}\n{\"ok\":1}");
        let out = split(&big);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(is_err(&out[0]));
        assert_eq!(out[1], JsonItem::Value(json!({"ok": 1})));

        let mut s = JsonStreamer::new(1 << 20);
        let mut out = Vec::new();
        s.feed(&[b'['; 1000], &mut out);
        s.feed(b"\n{\"ok\":1}", &mut out);
        assert_eq!(out.len(), 2);
        assert!(is_err(&out[0]));
    }

    #[test]
    fn newline_inside_string_resyncs() {
        let out = split(b"{\"execute\": \"broken\n{\"ok\":1}");
        assert!(is_err(&out[0]));
        assert_eq!(out[1], JsonItem::Value(json!({"ok": 1})));
    }
}
