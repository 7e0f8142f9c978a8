//! Reading token usage out of an answer as it streams past, without holding the answer:
//! Gemini's `usageMetadata` and OpenAI-style `usage`, in a JSON answer or in any SSE
//! event (the last one that carries it wins), across chunk boundaries.
//!
//! The scanner looks for the key (`"usageMetadata"` or `"usage"`, a quote not escaped
//! before it) followed by `:` and `{`, then captures that object up to its matching brace
//! (string- and escape-aware), at most `MAX_OBJECT` bytes, and parses only that. Text a
//! model wrote cannot pose as the key: inside a JSON string its quotes are escaped. The
//! bytes are untrusted: every path is bounded and fuzzed (`fuzz/fuzz_targets/usage.rs`).

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
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

    /// Reads a captured object: typed, and only when that cannot decide (an unusual shape:
    /// a count that is null, details that are not an object, a field twice) through a
    /// `Value`, whose reading is the rule. Both read the same usage from any object.
    fn parse(key: Key, object: &[u8]) -> Option<Usage> {
        Usage::typed(key, object)
            .or_else(|| Usage::slow(key, object))
            .map(Usage::clamped)
    }

    /// Counts bounded to `MAX_COUNT` each: they come from the network, and sums of them
    /// must never overflow a counter, an SQLite integer or a Redis one.
    fn clamped(self) -> Usage {
        Usage {
            prompt: self.prompt.min(MAX_COUNT),
            completion: self.completion.min(MAX_COUNT),
            cached: self.cached.min(MAX_COUNT),
            thoughts: self.thoughts.min(MAX_COUNT),
            ..self
        }
    }

    fn slow(key: Key, object: &[u8]) -> Option<Usage> {
        serde_json::from_slice::<Value>(object)
            .ok()
            .and_then(|v| Usage::from_object(key, &v))
    }

    fn typed(key: Key, object: &[u8]) -> Option<Usage> {
        // A derived struct would also read an array; usage is an object.
        if object.first() != Some(&b'{') {
            return None;
        }
        match key {
            Key::UsageMetadata => serde_json::from_slice::<GeminiUsage>(object)
                .ok()
                .filter(|g| g.prompt_token_count.is_some())
                .map(|g| Usage {
                    prompt: g.prompt_token_count.and_then(|c| c.0).unwrap_or(0),
                    completion: g.candidates_token_count.0.unwrap_or(0),
                    cached: g.cached_content_token_count.0.unwrap_or(0),
                    thoughts: g.thoughts_token_count.0.unwrap_or(0),
                    thoughts_apart: true,
                }),
            Key::Usage => serde_json::from_slice::<OpenAiUsage>(object)
                .ok()
                .filter(|o| o.prompt_tokens.is_some() || o.input_tokens.is_some())
                .map(|o| {
                    let either = |a: Option<u64>, b: Option<u64>| a.or(b).unwrap_or(0);
                    let d = |d: &Option<Details>, f: fn(&Details) -> Count| {
                        d.as_ref().and_then(|d| f(d).0)
                    };
                    Usage {
                        prompt: either(
                            o.prompt_tokens.and_then(|c| c.0),
                            o.input_tokens.and_then(|c| c.0),
                        ),
                        completion: either(o.completion_tokens.0, o.output_tokens.0),
                        cached: either(
                            d(&o.prompt_tokens_details, |d| d.cached_tokens),
                            d(&o.input_tokens_details, |d| d.cached_tokens),
                        ),
                        thoughts: either(
                            d(&o.completion_tokens_details, |d| d.reasoning_tokens),
                            d(&o.output_tokens_details, |d| d.reasoning_tokens),
                        ),
                        thoughts_apart: false,
                    }
                }),
        }
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

/// One count as `Value::as_u64` reads it: an unsigned integer, else nothing (any other
/// value, however nested, is consumed and read as nothing).
#[derive(Debug, Clone, Copy, Default)]
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a token count")
            }
            fn visit_u64<E>(self, n: u64) -> Result<Count, E> {
                Ok(Count(Some(n)))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Count, E> {
                // `Value` keeps a non-negative i64 (`-0`) as unsigned.
                Ok(Count(u64::try_from(n).ok()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Count, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Count(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Count, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Count(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Gemini's `usageMetadata`, typed (the fast path; see `Usage::parse`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiUsage {
    prompt_token_count: Option<Count>,
    #[serde(default)]
    candidates_token_count: Count,
    #[serde(default)]
    cached_content_token_count: Count,
    #[serde(default)]
    thoughts_token_count: Count,
}

/// OpenAI-style `usage` (Chat Completions and Responses names), typed.
#[derive(Deserialize)]
struct OpenAiUsage {
    prompt_tokens: Option<Count>,
    input_tokens: Option<Count>,
    #[serde(default)]
    completion_tokens: Count,
    #[serde(default)]
    output_tokens: Count,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
}

/// `…_tokens_details`: an object only (a derived struct would also take an array, which
/// the `Value` reading does not index into).
#[derive(Default)]
struct Details {
    cached_tokens: Count,
    reasoning_tokens: Count,
}

impl<'de> Deserialize<'de> for Details {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Details, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Details;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("token details")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Details, A::Error> {
                let mut d = Details::default();
                let (mut cached, mut reasoning) = (false, false);
                while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                    let seen = match &*k {
                        "cached_tokens" => std::mem::replace(&mut cached, true),
                        "reasoning_tokens" => std::mem::replace(&mut reasoning, true),
                        _ => {
                            m.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    if seen {
                        return Err(serde::de::Error::custom("a field twice"));
                    }
                    let n = m.next_value::<Count>()?;
                    match &*k {
                        "cached_tokens" => d.cached_tokens = n,
                        _ => d.reasoning_tokens = n,
                    }
                }
                Ok(d)
            }
        }
        d.deserialize_map(V)
    }
}

/// `usage`, searched once per chunk (built once: a searcher costs more than a search).
static USAGE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"usage"));

/// The largest token count read from one answer (about 10^12; no answer costs that).
pub const MAX_COUNT: u64 = 1 << 40;

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
        // Every key begins with `"usage`: look only where `usage` is, not at every quote.
        let prev = self.carry.last().copied();
        for p in USAGE.find_iter(chunk) {
            let Some(i) = p.checked_sub(1).filter(|i| chunk[*i] == b'"') else {
                continue;
            };
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
                    let mut buf = Vec::with_capacity(256);
                    buf.push(b'{');
                    self.mode = Mode::Object {
                        key: *key,
                        buf,
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
            if buf.len() + i >= MAX_OBJECT {
                // Too long to be usage: give up on it and seek on.
                self.mode = Mode::Seek;
                return &chunk[i..];
            }
            if *depth == 0 {
                buf.extend_from_slice(&chunk[..=i]);
                if let Some(u) = Usage::parse(*key, buf) {
                    self.last = Some(u);
                }
                self.mode = Mode::Seek;
                return &chunk[i + 1..];
            }
        }
        buf.extend_from_slice(chunk);
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

/// For the fuzz target: where the typed reading of an object decides, it must read what
/// the `Value` reading does (for both keys).
#[doc(hidden)]
pub fn typed_agrees(object: &[u8]) -> bool {
    [Key::UsageMetadata, Key::Usage]
        .into_iter()
        .all(|key| Usage::typed(key, object).is_none_or(|u| Usage::slow(key, object) == Some(u)))
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
    fn the_typed_reading_agrees_with_the_value_reading_on_odd_objects() {
        for object in [
            r#"{"promptTokenCount": 5, "candidatesTokenCount": "7", "thoughtsTokenCount": -1}"#,
            r#"{"promptTokenCount": null, "candidatesTokenCount": 3}"#,
            r#"{"promptTokenCount": 1, "promptTokenCount": 2}"#,
            r#"{"prompt_tokens": -0, "input_tokens": 5, "completion_tokens": 1.5}"#,
            r#"{"prompt_tokens": null, "input_tokens": 4, "prompt_tokens_details": 3}"#,
            r#"{"prompt_tokens": 2, "completion_tokens_details": {"reasoning_tokens": {"a": [1]}}}"#,
            r#"{"input_tokens": 9, "output_tokens": 18446744073709551615, "output_tokens_details": null}"#,
            r#"{"prompt_tokens": 1e2, "completion_tokens": 3}"#,
            r#"[4]"#,
            r#"{"prompt_tokens": 1, "prompt_tokens_details": [3, 4]}"#,
            r#"{"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": 2, "cached_tokens": 3}}"#,
            r#"{"prompt_tokens": 1, "input_tokens_details": {"cached_tokens": 2}, "prompt_tokens_details": {}}"#,
        ] {
            assert!(typed_agrees(object.as_bytes()), "{object}");
            for key in [Key::UsageMetadata, Key::Usage] {
                assert_eq!(
                    Usage::parse(key, object.as_bytes()),
                    Usage::slow(key, object.as_bytes()).map(Usage::clamped),
                    "{object}"
                );
            }
        }
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
