//! Reading token usage out of an answer as it streams past, without holding the answer:
//! Gemini's `usageMetadata` and OpenAI-style `usage`, in a JSON answer or in any SSE
//! event (the last one that carries it wins), across chunk boundaries.
//!
//! The scanner looks for the key (`"usageMetadata"` or `"usage"`, a quote not escaped
//! before it) followed by `:` and `{`, then captures that object up to its matching brace
//! (string- and escape-aware), at most `MAX_OBJECT` bytes, and parses only that. Text a
//! model wrote cannot pose as the key: inside a JSON string its quotes are escaped. The
//! bytes are untrusted: every path is bounded and fuzzed (`fuzz/fuzz_targets/usage.rs`).

use memchr::memchr;
use serde_json::Value;

/// Tokens as the upstream reports them (nothing is subtracted: OpenAI's completion
/// tokens already include reasoning, Gemini's candidates exclude thoughts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub thoughts: u64,
    /// Gemini reports thoughts beside the candidates (OpenAI's completion includes
    /// reasoning): they are output the upstream bills, so limits count them too.
    pub thoughts_apart: bool,
}

impl Usage {
    /// What `tpm` and budgets count: prompt + completion (+ Gemini's thoughts, which its
    /// completion count leaves out).
    pub fn billed(&self) -> u64 {
        let out = if self.thoughts_apart {
            self.completion.saturating_add(self.thoughts)
        } else {
            self.completion
        };
        self.prompt.saturating_add(out)
    }

    /// Reads a `usageMetadata` (Gemini) or `usage` (OpenAI-style) object.
    fn from_object(key: Key, v: &Value) -> Option<Usage> {
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let u = match key {
            Key::UsageMetadata => Usage {
                prompt: n(&v["promptTokenCount"]),
                completion: n(&v["candidatesTokenCount"]),
                cached: n(&v["cachedContentTokenCount"]),
                thoughts: n(&v["thoughtsTokenCount"]),
                thoughts_apart: true,
            },
            // Chat Completions names them prompt/completion; the Responses API
            // input/output.
            Key::Usage => {
                let either = |a: &Value, b: &Value| a.as_u64().or(b.as_u64()).unwrap_or(0);
                Usage {
                    prompt: either(&v["prompt_tokens"], &v["input_tokens"]),
                    completion: either(&v["completion_tokens"], &v["output_tokens"]),
                    cached: either(
                        &v["prompt_tokens_details"]["cached_tokens"],
                        &v["input_tokens_details"]["cached_tokens"],
                    ),
                    thoughts: either(
                        &v["completion_tokens_details"]["reasoning_tokens"],
                        &v["output_tokens_details"]["reasoning_tokens"],
                    ),
                    thoughts_apart: false,
                }
            }
        };
        // An object with none of the counts (some other "usage") is not usage.
        let known = match key {
            Key::UsageMetadata => v.get("promptTokenCount").is_some(),
            Key::Usage => v.get("prompt_tokens").is_some() || v.get("input_tokens").is_some(),
        };
        known.then_some(u)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    UsageMetadata,
    Usage,
}

/// `usage`, searched once per chunk (built once: a searcher costs more than a search).
static USAGE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"usage"));

/// The longest usage object captured; longer ones are not usage.
const MAX_OBJECT: usize = 4096;
/// Bytes kept from one chunk to the next, so that a key split across chunks is found.
const CARRY: usize = 24;

/// Where the scanner is.
#[derive(Debug)]
enum Mode {
    /// Looking for a key.
    Seek,
    /// After a key: whitespace, then `:`, whitespace, then `{`.
    AfterKey { key: Key, colon: bool },
    /// Inside the object: its bytes so far, the brace depth, whether in a string, and
    /// whether the previous byte was a backslash inside a string.
    Object {
        key: Key,
        buf: Vec<u8>,
        depth: u32,
        in_string: bool,
        escaped: bool,
    },
}

/// Feeds on an answer's bytes; `last()` is the usage of the last object that parsed.
#[derive(Debug)]
pub struct Scanner {
    mode: Mode,
    /// The tail of what was scanned in `Seek` mode (a key may straddle two chunks).
    carry: Vec<u8>,
    last: Option<Usage>,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            mode: Mode::Seek,
            carry: Vec::with_capacity(CARRY),
            last: None,
        }
    }
}

const KEYS: [(&[u8], Key); 2] = [
    (b"\"usageMetadata\"", Key::UsageMetadata),
    (b"\"usage\"", Key::Usage),
];

impl Scanner {
    pub fn last(&self) -> Option<Usage> {
        self.last
    }

    /// Scans one chunk of the answer.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            chunk = match &mut self.mode {
                Mode::Seek => self.seek(chunk),
                Mode::AfterKey { .. } => self.after_key(chunk),
                Mode::Object { .. } => self.object(chunk),
            };
        }
    }

    /// Finds the next key; returns what follows it in `chunk` (or nothing).
    fn seek<'a>(&mut self, chunk: &'a [u8]) -> &'a [u8] {
        // A key that began in the previous chunk: look in carry + the chunk's head.
        if !self.carry.is_empty() {
            let mut joined = [0u8; 2 * CARRY];
            let head = &chunk[..chunk.len().min(CARRY)];
            let carried = self.carry.len();
            joined[..carried].copy_from_slice(&self.carry);
            joined[carried..carried + head.len()].copy_from_slice(head);
            let joined = &joined[..carried + head.len()];
            for start in 0..carried {
                if let Some((key, len)) = key_at(joined, start) {
                    if start + len > carried {
                        self.carry.clear();
                        self.mode = Mode::AfterKey { key, colon: false };
                        return &chunk[start + len - carried..];
                    }
                }
            }
        }
        // Most chunks hold no key at all: one vectorised pass says so.
        if USAGE.find(chunk).is_none() {
            self.carry
                .extend_from_slice(&chunk[chunk.len().saturating_sub(CARRY)..]);
            let cut = self.carry.len().saturating_sub(CARRY);
            self.carry.drain(..cut);
            return &[];
        }
        let prev = self.carry.last().copied();
        let mut at = 0;
        while let Some(i) = memchr(b'"', &chunk[at..]).map(|i| i + at) {
            let escaped = if i == 0 {
                prev == Some(b'\\')
            } else {
                chunk[i - 1] == b'\\'
            };
            if !escaped {
                if let Some((key, len)) = key_at(chunk, i) {
                    self.carry.clear();
                    self.mode = Mode::AfterKey { key, colon: false };
                    return &chunk[i + len..];
                }
            }
            at = i + 1;
        }
        // Keep the tail: a key may begin there and end in the next chunk.
        self.carry
            .extend_from_slice(&chunk[chunk.len().saturating_sub(CARRY)..]);
        let cut = self.carry.len().saturating_sub(CARRY);
        self.carry.drain(..cut);
        &[]
    }

    fn after_key<'a>(&mut self, chunk: &'a [u8]) -> &'a [u8] {
        let Mode::AfterKey { key, colon } = &mut self.mode else {
            return chunk;
        };
        for (i, &b) in chunk.iter().enumerate() {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b':' if !*colon => *colon = true,
                b'{' if *colon => {
                    self.mode = Mode::Object {
                        key: *key,
                        buf: vec![b'{'],
                        depth: 1,
                        in_string: false,
                        escaped: false,
                    };
                    return &chunk[i + 1..];
                }
                // Not `key: {`: look for the next key from here.
                _ => {
                    self.mode = Mode::Seek;
                    return &chunk[i..];
                }
            }
        }
        &[]
    }

    fn object<'a>(&mut self, chunk: &'a [u8]) -> &'a [u8] {
        let Mode::Object {
            key,
            buf,
            depth,
            in_string,
            escaped,
        } = &mut self.mode
        else {
            return chunk;
        };
        for (i, &b) in chunk.iter().enumerate() {
            if *in_string {
                match (b, *escaped) {
                    (_, true) => *escaped = false,
                    (b'\\', false) => *escaped = true,
                    (b'"', false) => *in_string = false,
                    _ => {}
                }
            } else {
                match b {
                    b'"' => *in_string = true,
                    b'{' => *depth += 1,
                    b'}' => *depth -= 1,
                    _ => {}
                }
            }
            if buf.len() >= MAX_OBJECT {
                // Too long to be usage: give up on it and seek on.
                self.mode = Mode::Seek;
                return &chunk[i..];
            }
            buf.push(b);
            if *depth == 0 {
                let key = *key;
                let parsed = serde_json::from_slice::<Value>(buf)
                    .ok()
                    .and_then(|v| Usage::from_object(key, &v));
                if let Some(u) = parsed {
                    self.last = Some(u);
                }
                self.mode = Mode::Seek;
                return &chunk[i + 1..];
            }
        }
        &[]
    }
}

/// The key whose opening quote is at `hay[start]`, if one is there in full (and the quote
/// is not escaped), with its length.
fn key_at(hay: &[u8], start: usize) -> Option<(Key, usize)> {
    if hay.get(start) != Some(&b'"') || (start > 0 && hay[start - 1] == b'\\') {
        return None;
    }
    KEYS.iter()
        .find(|(pattern, _)| hay[start..].starts_with(pattern))
        .map(|(pattern, key)| (*key, pattern.len()))
}

/// The usage in a whole answer, fed in one piece (tests, the fuzz target).
pub fn usage_of(bytes: &[u8]) -> Option<Usage> {
    let mut s = Scanner::default();
    s.feed(bytes);
    s.last()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/responses/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// The same usage however the answer is cut: at every byte into two pieces, and
    /// into pieces of every size up to 40 bytes.
    fn every_cut(bytes: &[u8]) -> Option<Usage> {
        let whole = usage_of(bytes);
        for cut in 0..=bytes.len() {
            let mut s = Scanner::default();
            s.feed(&bytes[..cut]);
            s.feed(&bytes[cut..]);
            assert_eq!(s.last(), whole, "cut at {cut}");
        }
        for size in 1..=40 {
            let mut s = Scanner::default();
            for piece in bytes.chunks(size) {
                s.feed(piece);
            }
            assert_eq!(s.last(), whole, "pieces of {size}");
        }
        whole
    }

    fn u(prompt: u64, completion: u64, cached: u64, thoughts: u64, apart: bool) -> Option<Usage> {
        Some(Usage {
            prompt,
            completion,
            cached,
            thoughts,
            thoughts_apart: apart,
        })
    }

    #[test]
    fn gemini_json_and_sse_answers_report_their_usage_however_they_are_cut() {
        let json = every_cut(&fixture("gemini_generate_content_usage.json"));
        assert_eq!(
            json,
            u(12, 34, 2, 6, true),
            "the escaped key in the model's text is not usage"
        );
        let sse = every_cut(&fixture("gemini_stream_usage.sse"));
        assert_eq!(sse, u(12, 41, 0, 7, true), "the last event's");
        assert_eq!(
            sse.unwrap().billed(),
            60,
            "Gemini's thoughts are billed output"
        );
    }

    #[test]
    fn openai_style_answers_report_their_usage_however_they_are_cut() {
        let sse = every_cut(&fixture("openai_stream_usage.sse"));
        assert_eq!(sse, u(21, 9, 16, 3, false));
        assert_eq!(
            sse.unwrap().billed(),
            30,
            "completion already includes reasoning"
        );
        let json = every_cut(&fixture("openai_chat_completion_usage.json"));
        assert_eq!(json, u(25, 5, 0, 0, false));
        // The Responses API's names.
        let responses = every_cut(
            br#"{"output":[],"usage":{"input_tokens":7,"output_tokens":4,"total_tokens":11,"output_tokens_details":{"reasoning_tokens":2}}}"#,
        );
        assert_eq!(responses.map(|u| (u.billed(), u.thoughts)), Some((11, 2)));
    }

    #[test]
    fn answers_without_usage_or_with_something_else_called_usage_report_none() {
        assert_eq!(every_cut(br#"{"ok":true}"#), None);
        assert_eq!(every_cut(br#"data: {"usage":null}"#), None);
        assert_eq!(every_cut(br#"{"usage":{"storage_bytes":5}}"#), None);
        // A key that ends in `usage` inside a string: the quote before it is escaped.
        assert_eq!(
            every_cut(br#"{"a":{"x\"usage":{"prompt_tokens":3}}}"#),
            None
        );
        assert_eq!(
            every_cut(br#"{"text":"\"usage\":{\"prompt_tokens\":3}"}"#),
            None
        );
        // A usage object too long to be one is skipped; a later one still counts.
        let mut long = br#"{"usage":{"prompt_tokens":1,"x":""#.to_vec();
        long.extend(std::iter::repeat_n(b'a', 5000));
        long.extend_from_slice(br#""}} {"usage":{"prompt_tokens":2,"completion_tokens":3}}"#);
        assert_eq!(every_cut(&long).map(|u| u.billed()), Some(5));
    }
}
