//! Reading the tokens a provider reports it used, from a JSON response or
//! from a server-sent event stream as it passes.
//!
//! Understood: OpenAI `usage` (chat completions, completions, embeddings,
//! responses, and the final chunk of a stream with
//! `stream_options.include_usage`), Anthropic `message_start` and
//! `message_delta` events (cache reads and writes count as input), and the
//! responses API's `response.completed` event.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use crate::meter::json::Json;

/// The largest event held back while it arrives; a stream with a larger one
/// is passed on unread.
const MAX_EVENT_BYTES: usize = 1 << 20;

/// Tokens in one `usage` object: its `total_tokens`, else the sum of the
/// parts it names.
pub fn tokens_in_usage(usage: &Value) -> Option<i64> {
    tokens_reported(|key| usage.get(key).and_then(Value::as_i64))
}

/// A token count as the provider reported it; a negative one counts as zero.
fn count(usage: &Value, key: &str) -> Option<i64> {
    usage.get(key).and_then(Value::as_i64).map(|n| n.max(0))
}

/// [`tokens_in_usage`] for a usage object whose integer members `count`
/// gives by name.
fn tokens_reported(count: impl Fn(&str) -> Option<i64>) -> Option<i64> {
    // A negative count, as the provider reported it, counts as zero.
    let counted = |key: &str| count(key).map(|n| n.max(0));
    if let Some(total) = counted("total_tokens") {
        return Some(total);
    }
    let parts = [
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "prompt_tokens",
        "completion_tokens",
    ];
    parts
        .iter()
        .filter_map(|p| counted(p))
        .reduce(i64::saturating_add)
}

/// The tokens a whole JSON response body reports.
pub fn tokens_in_json(body: &[u8]) -> Option<i64> {
    /// Only `usage` is built, borrowing from the body; the rest of the
    /// answer (the long part) is checked and skipped without allocating.
    #[derive(serde::Deserialize)]
    struct Answer<'a> {
        #[serde(borrow)]
        usage: Option<Json<'a>>,
    }
    let answer: Answer<'_> = serde_json::from_slice(body).ok()?;
    let usage = answer.usage?;
    tokens_reported(|key| usage.get(key).and_then(Json::as_i64))
}

/// What the events of one stream have reported so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    /// A complete figure (OpenAI's usage chunk, `response.completed`).
    total: Option<i64>,
    /// Anthropic's input, from `message_start`.
    input: Option<i64>,
    /// Anthropic's output, cumulative: the last `message_delta` wins.
    output: Option<i64>,
}

impl Tally {
    fn tokens(&self) -> Option<i64> {
        self.total.or(match (self.input, self.output) {
            (None, None) => None,
            (input, output) => Some(input.unwrap_or(0).saturating_add(output.unwrap_or(0))),
        })
    }

    /// Takes in one event's data. Returns whether the event is OpenAI's
    /// usage-only chunk (no choices), which exists only because the gateway
    /// asked for it.
    fn observe(&mut self, data: &Value) -> bool {
        match data.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                if let Some(usage) = data.pointer("/message/usage") {
                    let input = [
                        "input_tokens",
                        "cache_creation_input_tokens",
                        "cache_read_input_tokens",
                    ]
                    .iter()
                    .filter_map(|p| count(usage, p))
                    .fold(0, i64::saturating_add);
                    self.input = Some(input);
                    self.output = count(usage, "output_tokens").or(self.output);
                }
                false
            }
            Some("message_delta") => {
                if let Some(output) = data.get("usage").and_then(|u| count(u, "output_tokens")) {
                    self.output = Some(output);
                }
                false
            }
            Some("response.completed") => {
                if let Some(tokens) = data.pointer("/response/usage").and_then(tokens_in_usage) {
                    self.total = Some(tokens);
                }
                false
            }
            _ => match data
                .get("usage")
                .filter(|u| u.is_object())
                .and_then(tokens_in_usage)
            {
                Some(tokens) => {
                    self.total = Some(tokens);
                    data.get("choices")
                        .and_then(Value::as_array)
                        .is_some_and(Vec::is_empty)
                }
                None => false,
            },
        }
    }
}

/// Scans a server-sent event stream for usage as it passes, holding back at
/// most one incomplete event.
///
/// In pass-through mode the bytes go to the client as they arrive. When the
/// gateway itself asked an OpenAI stream for usage, the client did not, so
/// the stream is rewritten event by event into the one the provider would
/// have sent: the usage-only chunk is dropped and the `"usage": null` that
/// every other chunk then carries is removed. (Usually as text, from a
/// compact chunk's tail; a chunk that has to be re-serialized instead keeps
/// its content, with its keys in sorted order.)
#[derive(Debug, Default)]
pub struct SseScanner {
    hide_requested_usage: bool,
    /// Bytes of the event in progress.
    pending: BytesMut,
    /// How much of `pending` is known to hold no event end.
    searched: usize,
    /// An event outgrew [`MAX_EVENT_BYTES`]: the stream passes unread.
    gave_up: bool,
    tally: Tally,
}

impl SseScanner {
    pub fn new(hide_requested_usage: bool) -> SseScanner {
        SseScanner {
            hide_requested_usage,
            ..SseScanner::default()
        }
    }

    /// Takes in `chunk` and returns the bytes the client gets now.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.gave_up {
            return chunk;
        }
        let out = self.scan_events(chunk);
        if self.pending.len() > MAX_EVENT_BYTES {
            // Not an event stream this scanner understands: pass the rest on
            // unread, and let the estimate stand.
            self.gave_up = true;
            let held = self.pending.split().freeze();
            return if self.hide_requested_usage {
                concat(out, held)
            } else {
                out
            };
        }
        out
    }

    fn scan_events(&mut self, chunk: Bytes) -> Bytes {
        if !self.hide_requested_usage {
            // Scan a copy of complete events; pass the chunk on untouched.
            self.pending.extend_from_slice(&chunk);
            while let Some(event) = self.take_event() {
                // Every event that reports usage names it, with a value other
                // than null; the rest need no parsing.
                let reports = memchr::memmem::find_iter(&event, br#""usage":"#)
                    .any(|at| !event[at + 8..].starts_with(b"null"));
                if reports {
                    self.scan(&event);
                }
            }
            return chunk;
        }
        self.pending.extend_from_slice(&chunk);
        let mut out = BytesMut::new();
        while let Some(event) = self.take_event() {
            out.extend_from_slice(&self.rewrite(event));
        }
        out.freeze()
    }

    /// Splits the first complete event (through its blank line) off the
    /// pending bytes, searching only what was not searched before.
    fn take_event(&mut self) -> Option<Bytes> {
        // Back up two bytes: a blank line's "\n\r\n" may straddle pieces.
        let from = self.searched.saturating_sub(2);
        match find_event_end(&self.pending[from..]) {
            Some(end) => {
                self.searched = 0;
                Some(self.pending.split_to(from + end).freeze())
            }
            None => {
                self.searched = self.pending.len();
                None
            }
        }
    }

    /// The end of the stream: whatever is left is passed on as it is.
    pub fn finish(&mut self) -> Bytes {
        let rest = self.pending.split().freeze();
        if self.hide_requested_usage {
            rest
        } else {
            Bytes::new()
        }
    }

    /// The tokens reported so far, if any were and the stream was read whole.
    pub fn tokens(&self) -> Option<i64> {
        if self.gave_up {
            None
        } else {
            self.tally.tokens()
        }
    }

    fn scan(&mut self, event: &[u8]) -> Option<(Value, bool)> {
        memchr::memmem::find(event, b"usage")?;
        let data = event_data(event)?;
        let value: Value = serde_json::from_slice(&data).ok()?;
        let usage_only = self.tally.observe(&value);
        Some((value, usage_only))
    }

    fn rewrite(&mut self, event: Bytes) -> Bytes {
        // The common case, a compact chunk ending in `"usage":null}`, loses
        // those bytes without a parse.
        for terminator in [&b"\n\n"[..], b"\r\n\r\n"] {
            if let Some(json) = event
                .strip_suffix(terminator)
                .and_then(|e| e.strip_prefix(b"data: "))
                && let Some(kept) = json.strip_suffix(br#","usage":null}"#)
                && !kept.contains(&b'\n')
            {
                let mut out = BytesMut::with_capacity(event.len());
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(kept);
                out.extend_from_slice(b"}");
                out.extend_from_slice(terminator);
                return out.freeze();
            }
        }
        match self.scan(&event) {
            Some((_, true)) => Bytes::new(),
            Some((Value::Object(mut chunk), false)) if chunk.get("usage") == Some(&Value::Null) => {
                chunk.remove("usage");
                let Ok(json) = serde_json::to_string(&chunk) else {
                    return event;
                };
                // The event's other fields stay; its data lines become one.
                let newline = if event.ends_with(b"\r\n\r\n") {
                    "\r\n"
                } else {
                    "\n"
                };
                let mut out = String::with_capacity(event.len());
                let mut data_written = false;
                for line in event.split(|&b| b == b'\n') {
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if line.is_empty() {
                        continue;
                    }
                    if !line.starts_with(b"data:") {
                        out.push_str(&String::from_utf8_lossy(line));
                        out.push_str(newline);
                    } else if !data_written {
                        out.push_str("data: ");
                        out.push_str(&json);
                        out.push_str(newline);
                        data_written = true;
                    }
                }
                out.push_str(newline);
                Bytes::from(out)
            }
            _ => event,
        }
    }
}

pub(super) fn concat(first: Bytes, second: Bytes) -> Bytes {
    if first.is_empty() {
        return second;
    }
    if second.is_empty() {
        return first;
    }
    let mut joined = BytesMut::with_capacity(first.len() + second.len());
    joined.extend_from_slice(&first);
    joined.extend_from_slice(&second);
    joined.freeze()
}

/// The end of the first event in `bytes`: just past its blank line, whether
/// lines end in `\n` or `\r\n`.
fn find_event_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes)
        .skip(1)
        .find_map(|i| match bytes[..i] {
            [.., b'\n'] => Some(i + 1),
            [.., b'\n', b'\r'] => Some(i + 1),
            _ => None,
        })
}

/// The `data` of one event, its `data:` lines joined by newlines.
fn event_data(event: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            let joined = data.get_or_insert_with(Vec::new);
            if !joined.is_empty() {
                joined.push(b'\n');
            }
            joined.extend_from_slice(value);
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` cut at every `step` bytes; returns what the client got.
    fn run(stream: &str, hide: bool, step: usize) -> (String, Option<i64>) {
        let mut scanner = SseScanner::new(hide);
        let mut out = Vec::new();
        for piece in stream.as_bytes().chunks(step) {
            out.extend_from_slice(&scanner.feed(Bytes::copy_from_slice(piece)));
        }
        out.extend_from_slice(&scanner.finish());
        (String::from_utf8(out).unwrap(), scanner.tokens())
    }

    const OPENAI_WITH_USAGE: &str = "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
        data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn reads_the_openai_usage_chunk_at_every_cut() {
        for step in 1..=OPENAI_WITH_USAGE.len() {
            let (out, tokens) = run(OPENAI_WITH_USAGE, false, step);
            assert_eq!(tokens, Some(12), "cut every {step} bytes");
            assert_eq!(out, OPENAI_WITH_USAGE, "pass-through changed the bytes");
        }
    }

    #[test]
    fn hides_the_usage_the_gateway_asked_for_at_every_cut() {
        let expected = "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n";
        for step in 1..=OPENAI_WITH_USAGE.len() {
            assert_eq!(
                run(OPENAI_WITH_USAGE, true, step),
                (expected.to_string(), Some(12)),
                "cut every {step} bytes"
            );
        }
    }

    #[test]
    fn adds_anthropic_input_with_cache_to_the_last_output() {
        let stream = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":5,\"cache_creation_input_tokens\":2,\"output_tokens\":1}}}\r\n\r\n\
            event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"x\"}}\r\n\r\n\
            event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\r\n\r\n\
            event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\r\n\r\n\
            event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n";
        for step in [1, 7, 64, stream.len()] {
            assert_eq!(run(stream, false, step).1, Some(17 + 9));
        }
    }

    #[test]
    fn reads_response_completed() {
        let stream = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\n\n\
            event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":4,\"output_tokens\":6,\"total_tokens\":10}}}\n\n";
        assert_eq!(run(stream, false, 5).1, Some(10));
    }

    #[test]
    fn a_stream_cut_before_its_usage_reports_none() {
        let cut = &OPENAI_WITH_USAGE[..60];
        assert_eq!(run(cut, false, 3).1, None);
        assert_eq!(
            run(cut, true, 3).0,
            cut,
            "an unfinished event is passed on at the end"
        );
    }

    #[test]
    fn an_event_that_never_ends_is_passed_on_unread() {
        let endless = format!(
            "data: {{\"usage\":{{\"total_tokens\":5}}, \"pad\":\"{}",
            "x".repeat(MAX_EVENT_BYTES + 10)
        );
        for hide in [false, true] {
            let (out, tokens) = run(&endless, hide, 4096);
            assert_eq!(out, endless, "hide = {hide}");
            assert_eq!(tokens, None);
        }
    }

    #[test]
    fn a_rewritten_event_keeps_its_other_fields() {
        let stream =
            "event: chunk\nid: 7\ndata: {\"choices\":[{\"delta\":{}}], \"usage\": null}\n\n";
        let (out, _) = run(stream, true, 5);
        assert_eq!(
            out,
            "event: chunk\nid: 7\ndata: {\"choices\":[{\"delta\":{}}]}\n\n"
        );
    }

    #[test]
    fn multi_line_data_is_joined() {
        let stream = "data: {\"usage\":\ndata: {\"total_tokens\":5}}\n\n";
        assert_eq!(run(stream, false, 4).1, Some(5));
    }

    #[test]
    fn json_bodies_report_their_usage() {
        assert_eq!(
            tokens_in_json(
                br#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#
            ),
            Some(7)
        );
        assert_eq!(
            tokens_in_json(br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#),
            Some(7)
        );
        assert_eq!(
            tokens_in_json(br#"{"usage":{"prompt_tokens":8,"total_tokens":8}}"#),
            Some(8)
        );
        assert_eq!(tokens_in_json(br#"{"choices":[]}"#), None);
        assert_eq!(tokens_in_json(b"not json"), None);
    }
}
