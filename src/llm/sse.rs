//! Server-sent event streams, read for usage as they pass, holding back at
//! most one incomplete event; and, when the gateway asked an OpenAI stream
//! for usage the client did not, rewritten to hide it.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::usage::Tally;

/// The largest event held back while it arrives; a stream with a larger one
/// is passed on unread.
const MAX_EVENT_BYTES: usize = 1 << 20;

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
                if reports_usage(&event) {
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

    /// What the stream has reported, if it was read whole so far.
    pub fn tally(&self) -> Option<&Tally> {
        (!self.gave_up).then_some(&self.tally)
    }

    fn scan(&mut self, event: &[u8]) -> Option<(Value, bool)> {
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
        // Only an event that names usage needs parsing.
        let scanned = memchr::memmem::find(&event, b"usage").and_then(|_| self.scan(&event));
        match scanned {
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

/// Whether `event` may change the tally: every event that reports usage
/// names it with a value other than null, and Anthropic's `message_stop`
/// (a short event) closes the report. The rest need no parsing.
fn reports_usage(event: &[u8]) -> bool {
    memchr::memmem::find_iter(event, br#""usage":"#).any(|at| !event[at + 8..].starts_with(b"null"))
        || (event.len() < 128 && memchr::memmem::find(event, br#""message_stop""#).is_some())
}

pub fn concat(first: Bytes, second: Bytes) -> Bytes {
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
        let tokens = scanner.tally().and_then(Tally::so_far);
        (String::from_utf8(out).unwrap(), tokens)
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

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// One event of an OpenAI stream the gateway asked usage of, and
        /// what the client must get of it.
        fn event() -> impl Strategy<Value = (String, String)> {
            let text = "\\PC{0,12}";
            (0..5usize, text, any::<bool>()).prop_map(|(kind, text, crlf)| {
                let text = serde_json::to_string(&text).unwrap();
                let chunk = format!(r#"{{"id":"c","choices":[{{"delta":{{"content":{text}}}}}]"#);
                let (sent, kept) = match kind {
                    // A chunk carrying the `"usage":null` the client did not ask for.
                    0 => (
                        format!("data: {chunk},\"usage\":null}}\n\n"),
                        format!("data: {chunk}}}\n\n"),
                    ),
                    // Events the rewrite must keep byte for byte.
                    1 => (
                        format!("data: {chunk}}}\n\n"),
                        format!("data: {chunk}}}\n\n"),
                    ),
                    2 => (
                        "event: ping\ndata: {}\n\n".to_string(),
                        "event: ping\ndata: {}\n\n".to_string(),
                    ),
                    3 => (
                        ": keep-alive\n\n".to_string(),
                        ": keep-alive\n\n".to_string(),
                    ),
                    _ => (
                        "data: [DONE]\n\n".to_string(),
                        "data: [DONE]\n\n".to_string(),
                    ),
                };
                if crlf {
                    (sent.replace('\n', "\r\n"), kept.replace('\n', "\r\n"))
                } else {
                    (sent, kept)
                }
            })
        }

        /// What the client gets of `sent`, fed to `scanner` in pieces of
        /// the lengths `cuts` gives, then the rest.
        fn feed_cut(scanner: &mut SseScanner, sent: &[u8], cuts: &[usize]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut rest = sent;
            for &cut in cuts {
                let (piece, after) = rest.split_at(cut.min(rest.len()));
                out.extend_from_slice(&scanner.feed(Bytes::copy_from_slice(piece)));
                rest = after;
            }
            out.extend_from_slice(&scanner.feed(Bytes::copy_from_slice(rest)));
            out.extend_from_slice(&scanner.finish());
            out
        }

        proptest! {
            #[test]
            fn the_rewrite_keeps_every_event_but_the_usage_it_hides_at_any_split(
                events in proptest::collection::vec(event(), 0..8),
                cuts in proptest::collection::vec(1..64usize, 0..40),
            ) {
                let usage = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"total_tokens\":7}}\n\n";
                let mut sent: String = events.iter().map(|(s, _)| s.as_str()).collect();
                let kept: String = events.iter().map(|(_, k)| k.as_str()).collect();
                sent.push_str(usage);
                let mut scanner = SseScanner::new(true);
                let out = feed_cut(&mut scanner, sent.as_bytes(), &cuts);
                prop_assert_eq!(String::from_utf8(out).unwrap(), kept);
                prop_assert_eq!(scanner.tally().and_then(Tally::final_tokens), Some(7));
            }

            #[test]
            fn pass_through_changes_no_byte_at_any_split(
                events in proptest::collection::vec(event(), 0..8),
                cuts in proptest::collection::vec(1..64usize, 0..40),
            ) {
                let sent: String = events.iter().map(|(s, _)| s.as_str()).collect();
                let mut scanner = SseScanner::new(false);
                let out = feed_cut(&mut scanner, sent.as_bytes(), &cuts);
                prop_assert_eq!(String::from_utf8(out).unwrap(), sent);
            }
        }
    }
}
