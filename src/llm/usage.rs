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
use super::scan::{Scalar, Scanner};

/// Tokens in one `usage` object: its `total_tokens`, else the sum of the
/// parts it names.
pub fn tokens_in_usage(usage: &Value) -> Option<i64> {
    tokens_reported(|key| usage.get(key).and_then(Value::as_i64))
}

/// A token count as the provider reported it; a negative one counts as zero.
fn count(usage: &Value, key: &str) -> Option<i64> {
    usage.get(key).and_then(Value::as_i64).map(|n| n.max(0))
}

/// The members of a usage object that count: `total_tokens`, else the sum
/// of the others it names.
const COUNTED: [&str; 7] = [
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "prompt_tokens",
    "completion_tokens",
];

/// [`tokens_in_usage`] for a usage object whose integer members `count`
/// gives by name.
fn tokens_reported(count: impl Fn(&str) -> Option<i64>) -> Option<i64> {
    // A negative count, as the provider reported it, counts as zero.
    let counted = |key: &str| count(key).map(|n| n.max(0));
    let [total, parts @ ..] = COUNTED;
    if let Some(total) = counted(total) {
        return Some(total);
    }
    parts
        .iter()
        .filter_map(|p| counted(p))
        .reduce(i64::saturating_add)
}

/// The tokens a whole JSON response body reports.
pub fn tokens_in_json(body: &[u8]) -> Option<i64> {
    let Some(counts) = Scanner::whole(body, usage_counts) else {
        return tokens_in_json_tree(body);
    };
    tokens_reported(|key| {
        let slot = COUNTED.iter().position(|counted| *counted == key)?;
        counts[slot]
    })
}

/// The integer members of [`COUNTED`] in the `usage` of the answer here,
/// read without a tree: on the load benchmark's 230-byte answer (case 16),
/// 5,530 instructions through serde_json and the tree, 3,360 here. `None`
/// where the scanner gives up, or where the tree must say (a second
/// `usage`, which serde_json refuses; one that is no object).
fn usage_counts(scanner: &mut Scanner<'_>) -> Option<[Option<i64>; COUNTED.len()]> {
    let mut counts = [None; COUNTED.len()];
    let mut seen = false;
    scanner.members(|s, key| {
        if key.name()? != b"usage" {
            return s.skip();
        }
        if std::mem::replace(&mut seen, true) || s.peek()? != b'{' {
            return None;
        }
        s.members(|s, key| {
            let key = key.name()?;
            let Some(slot) = COUNTED.iter().position(|k| k.as_bytes() == key) else {
                return s.skip();
            };
            // Of a key given twice, the last counts, as in the tree.
            counts[slot] = match s.peek()? {
                b'{' | b'[' => s.skip().map(|()| None)?,
                _ => match s.scalar()? {
                    Scalar::Integer(n, _) => Some(n),
                    _ => None,
                },
            };
            Some(())
        })
        .map(drop)
    })?;
    Some(counts)
}

/// [`tokens_in_json`] through serde_json and the tree.
fn tokens_in_json_tree(body: &[u8]) -> Option<i64> {
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

    /// What the pass without a tree reads from `body`, where it does not
    /// give up.
    fn scanned(body: &[u8]) -> Option<Option<i64>> {
        let counts = Scanner::whole(body, usage_counts)?;
        Some(tokens_reported(|key| {
            counts[COUNTED.iter().position(|counted| *counted == key)?]
        }))
    }

    #[test]
    fn the_answers_providers_give_are_read_without_a_tree() {
        let answers: [&[u8]; 4] = [
            br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok \u00e9"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1000,"completion_tokens":20,"total_tokens":1020,"prompt_tokens_details":{"cached_tokens":0}}}"#,
            br#"{"id":"msg_1","type":"message","content":[{"type":"text","text":"ok"}],"stop_reason":"end_turn","usage":{"input_tokens":30,"cache_read_input_tokens":5,"output_tokens":7}}"#,
            b"{\n  \"object\": \"list\",\n  \"data\": [],\n  \"usage\": {\"prompt_tokens\": 8, \"total_tokens\": 8}\n}\n",
            br#"{"choices":[]}"#,
        ];
        for (answer, tokens) in answers
            .into_iter()
            .zip([Some(1020), Some(42), Some(8), None])
        {
            assert_eq!(
                scanned(answer),
                Some(tokens),
                "{}",
                String::from_utf8_lossy(answer)
            );
            assert_eq!(tokens_in_json(answer), tokens);
        }
    }

    #[test]
    fn what_the_pass_is_not_sure_of_is_read_by_the_tree() {
        let cases: [(&[u8], Option<i64>); 6] = [
            (
                br#"{"usage":{"total_tokens":7},"usage":{"total_tokens":9}}"#,
                None,
            ),
            (br#"{"usage":null}"#, None),
            (
                br#"{"usage":{"total_tokens":7.0,"prompt_tokens":2}}"#,
                Some(2),
            ),
            (br#"{"us\u0061ge":{"total_tokens":7}}"#, Some(7)),
            (
                br#"{"usage":{"total_tokens":99999999999999999999,"prompt_tokens":3}}"#,
                Some(3),
            ),
            (br#"[{"total_tokens":5}]"#, Some(5)),
        ];
        for (answer, tokens) in cases {
            assert_eq!(scanned(answer), None, "{}", String::from_utf8_lossy(answer));
            assert_eq!(
                tokens_in_json(answer),
                tokens,
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[test]
    fn of_a_count_given_twice_the_last_counts() {
        let answer = br#"{"usage":{"total_tokens":7,"total_tokens":"x","prompt_tokens":1,"prompt_tokens":4}}"#;
        assert_eq!(scanned(answer), Some(Some(4)));
        assert_eq!(tokens_in_json_tree(answer), Some(4));
    }

    mod properties {
        use super::*;
        use crate::llm::scan::arbitrary;
        use proptest::prelude::*;

        fn answer() -> impl Strategy<Value = Vec<u8>> {
            let mut keys = COUNTED.to_vec();
            keys.extend([
                "usage",
                "choices",
                "id",
                "message",
                "content",
                "cached_tokens",
            ]);
            arbitrary::body(keys)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn the_pass_reads_usage_as_the_tree_does(body in answer()) {
                if let Some(tokens) = scanned(&body) {
                    prop_assert_eq!(tokens, tokens_in_json_tree(&body), "{}", String::from_utf8_lossy(&body));
                }
                prop_assert_eq!(tokens_in_json(&body), tokens_in_json_tree(&body));
            }

            #[test]
            fn a_broken_answer_reports_as_the_tree_says(
                body in answer(),
                at in any::<prop::sample::Index>(),
                how in 0..3u8,
                byte in arbitrary::byte(),
            ) {
                let body = arbitrary::broken(body, at, how, byte);
                prop_assert_eq!(tokens_in_json(&body), tokens_in_json_tree(&body), "{}", String::from_utf8_lossy(&body));
            }
        }
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
