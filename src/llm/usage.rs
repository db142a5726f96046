//! The tokens a provider reports it used: in a JSON answer's `usage`, or in
//! the events of a stream, and when a stream's report is final.
//!
//! Understood: OpenAI `usage` (chat completions, completions, embeddings,
//! responses, and the usage-only chunk that ends a stream with
//! `stream_options.include_usage`), Anthropic `message_start` and
//! `message_delta` events (cache reads and writes count as input), and the
//! responses API's `response.completed` (or `.incomplete`, `.failed`) event.
//!
//! A stream's report is final once the provider says so: OpenAI's usage-only
//! chunk, the responses API's closing event, Anthropic's `message_stop`
//! after its `message_delta`. The official SDKs stop reading soon after
//! (at `[DONE]`, at `message_stop`), often before the body's end arrives,
//! so the settlement must not wait for it.

use serde_json::Value;

use super::json::Json;

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
pub struct Tally {
    /// A complete figure (an OpenAI usage chunk, a `response.*` event's
    /// usage); a later one replaces it.
    total: Option<i64>,
    /// Anthropic's input, from `message_start`.
    input: Option<i64>,
    /// Anthropic's output, cumulative: the last `message_delta` wins.
    output: Option<i64>,
    /// The provider said its report is complete.
    last: bool,
}

impl Tally {
    /// The tokens reported so far, if any were.
    pub fn so_far(&self) -> Option<i64> {
        self.total.or(match (self.input, self.output) {
            (None, None) => None,
            (input, output) => Some(input.unwrap_or(0).saturating_add(output.unwrap_or(0))),
        })
    }

    /// The tokens, once the provider has said its report is complete.
    pub fn final_tokens(&self) -> Option<i64> {
        self.last.then(|| self.so_far()).flatten()
    }

    /// Takes in one event's data. Returns whether the event is OpenAI's
    /// usage-only chunk (no choices), which exists only because the gateway
    /// asked for it.
    pub fn observe(&mut self, data: &Value) -> bool {
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
            Some("message_stop") => {
                self.last = true;
                false
            }
            Some("response.completed" | "response.incomplete" | "response.failed") => {
                if let Some(tokens) = data.pointer("/response/usage").and_then(tokens_in_usage) {
                    self.total = Some(tokens);
                    self.last = true;
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
                    // Some compatible servers report usage on every chunk;
                    // only the chunk without choices closes the report.
                    let usage_only = data
                        .get("choices")
                        .and_then(Value::as_array)
                        .is_some_and(Vec::is_empty);
                    self.last |= usage_only;
                    usage_only
                }
                None => false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

    #[test]
    fn the_openai_usage_only_chunk_is_final() {
        let mut tally = Tally::default();
        let chunk = json!({"choices":[{"delta":{}}],"usage":{"total_tokens":5}});
        assert!(!tally.observe(&chunk));
        assert_eq!((tally.so_far(), tally.final_tokens()), (Some(5), None));
        let last = json!({"choices":[],"usage":{"total_tokens":9}});
        assert!(tally.observe(&last));
        assert_eq!(tally.final_tokens(), Some(9));
    }

    #[test]
    fn anthropic_usage_is_final_at_message_stop() {
        let mut tally = Tally::default();
        tally.observe(&json!({"type":"message_start","message":{"usage":{"input_tokens":100000,"output_tokens":1}}}));
        assert_eq!(
            (tally.so_far(), tally.final_tokens()),
            (Some(100_001), None)
        );
        tally.observe(&json!({"type":"message_delta","usage":{"output_tokens":10}}));
        assert_eq!(
            (tally.so_far(), tally.final_tokens()),
            (Some(100_010), None)
        );
        tally.observe(&json!({"type":"message_stop"}));
        assert_eq!(tally.final_tokens(), Some(100_010));
    }

    #[test]
    fn the_responses_api_is_final_at_its_closing_event() {
        for kind in ["response.completed", "response.incomplete"] {
            let mut tally = Tally::default();
            tally.observe(&json!({"type": kind, "response": {"usage": {"input_tokens": 4, "output_tokens": 6, "total_tokens": 10}}}));
            assert_eq!(tally.final_tokens(), Some(10), "{kind}");
        }
    }
}
