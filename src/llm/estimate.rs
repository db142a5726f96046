//! Token estimates for LLM request bodies, before the provider has seen them.
//!
//! The rule is the source system's: text counts `ceil(chars / 4)` tokens,
//! taken per piece (the system prompt, each message, the tool definitions),
//! plus the completion bound (the largest of `max_completion_tokens`,
//! `max_tokens` and `max_output_tokens` the body names, else the route's
//! default), times the number of choices (`n`, `best_of`).
//!
//! Every piece of text the provider bills counts, whatever block it sits in
//! (text, documents with a text or base64 source, tool use inputs, tool
//! results, thinking, message names): a body's members are read as prompt
//! unless they are known to be settings (`model`, `temperature`, ...) or
//! labels (`type`, `role`, ids). Schemas (`tools`, `functions`,
//! `response_format`, `text.format`, `tool_choice`) count as their JSON
//! text. An image counts the route's `image_tokens`, whatever its size.
//! Over-counting is the safe side: the estimate is replaced by the usage
//! the provider reports.
//!
//! A completion bound or choice count that is not a whole number from 1 to
//! [`MAX_AMOUNT`] is refused rather than read as a default, so that no body
//! can be priced lower than what it asks for.

mod fast;
mod pass;

use super::Api;
use super::json::{Json, Object};
use crate::quota::MAX_AMOUNT;

/// What a request body is expected to cost in tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub prompt_tokens: i64,
    /// Tokens one choice may produce: the bound the body names, else the
    /// route's default (0 where the API produces no completion).
    pub completion_bound: i64,
    /// Completions produced at once (`n`, `best_of`; at least 1).
    pub choices: i64,
    /// Whether the body names its own bound.
    pub bound_named: bool,
}

impl Estimate {
    /// Prompt and every completion together, capped at [`MAX_AMOUNT`] so
    /// that an absurd `max_tokens` or `n` is refused by the limit, not by
    /// overflow.
    pub fn total(&self) -> i64 {
        self.prompt_tokens
            .saturating_add(self.completion_bound.saturating_mul(self.choices))
            .min(MAX_AMOUNT)
    }
}

/// What an estimate needs from the route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EstimateRules {
    /// The completion bound of a body that names none.
    pub default_max_tokens: i64,
    /// What one image counts.
    pub image_tokens: i64,
}

/// Why a body could not be estimated; the message is shown to the caller.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EstimateError(String);

/// The keys a body names its completion bound under.
pub const BOUND_KEYS: [&str; 3] = ["max_completion_tokens", "max_tokens", "max_output_tokens"];

/// The keys a body names a number of choices under.
const CHOICE_KEYS: [&str; 2] = ["n", "best_of"];

/// Top-level members that are settings, not text sent to the model.
fn is_setting(key: &[u8]) -> bool {
    // A `match`, not a list's `contains`: it dispatches on the length
    // rather than comparing every entry, for every member of every body.
    matches!(
        key,
        b"model"
            | b"max_completion_tokens"
            | b"max_tokens"
            | b"max_output_tokens"
            | b"n"
            | b"best_of"
            | b"stream"
            | b"stream_options"
            | b"temperature"
            | b"top_p"
            | b"top_k"
            | b"frequency_penalty"
            | b"presence_penalty"
            | b"repetition_penalty"
            | b"logit_bias"
            | b"logprobs"
            | b"top_logprobs"
            | b"echo"
            | b"seed"
            | b"stop"
            | b"stop_sequences"
            | b"user"
            | b"metadata"
            | b"service_tier"
            | b"store"
            | b"parallel_tool_calls"
            | b"reasoning_effort"
            | b"reasoning"
            | b"thinking"
            | b"modalities"
            | b"audio"
            | b"truncation"
            | b"include"
            | b"previous_response_id"
            | b"background"
            | b"safety_identifier"
            | b"prompt_cache_key"
            | b"encoding_format"
            | b"dimensions"
    )
}

/// Top-level members sent to the model as their JSON text.
fn is_schema(key: &[u8]) -> bool {
    matches!(
        key,
        b"tools" | b"functions" | b"tool_choice" | b"response_format" | b"text" | b"prediction"
    )
}

/// Members inside the prompt that label it rather than say anything.
fn is_label(key: &[u8]) -> bool {
    matches!(
        key,
        b"type"
            | b"role"
            | b"id"
            | b"tool_call_id"
            | b"tool_use_id"
            | b"call_id"
            | b"cache_control"
            | b"media_type"
            | b"detail"
            | b"status"
            | b"signature"
    )
}

/// Content blocks that are images, each counted as `image_tokens`.
const IMAGE_TYPES: [&str; 3] = ["image", "image_url", "input_image"];

/// What one reading of a request body found: its estimate, and what the
/// gateway needs to know to decide whether to write into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scan {
    pub estimate: Estimate,
    /// The body's `stream` is `true`.
    pub streams: bool,
    /// The body's `stream_options.include_usage` is `true`.
    pub usage_asked: bool,
}

/// Estimates `body`, a body of `api`, in one pass over its bytes: what
/// [`parse`] then [`estimate`] give, with the same refusals, without
/// building the tree.
pub fn scan(api: Api, body: &[u8], rules: &EstimateRules) -> Result<Scan, EstimateError> {
    // The hand-written pass reads the bodies clients send; serde_json's,
    // the rest, and gives every refusal.
    let found = match fast::read(body, rules.image_tokens) {
        Some(found) => found,
        None => match pass::read(body, rules.image_tokens) {
            Ok(Some(found)) => found,
            Ok(None) => return Err(not_an_object()),
            Err(e) => return Err(not_json(&e)),
        },
    };
    let amount = |key: &str| {
        let slot = pass::AMOUNT_KEYS.iter().position(|k| *k == key)?;
        found.amounts[slot].as_ref()
    };
    Ok(Scan {
        estimate: priced(api, found.prompt_tokens, amount, rules)?,
        streams: found.streams,
        usage_asked: found.usage_asked,
    })
}

fn not_an_object() -> EstimateError {
    EstimateError("the request body must be a JSON object".into())
}

fn not_json(error: &serde_json::Error) -> EstimateError {
    EstimateError(format!("the request body is not valid JSON: {error}"))
}

/// The request body as a JSON object, or why it is not one.
pub fn parse(body: &[u8]) -> Result<Object<'_>, EstimateError> {
    match serde_json::from_slice(body) {
        Ok(Json::Object(request)) => Ok(request),
        Ok(_) => Err(not_an_object()),
        Err(e) => Err(not_json(&e)),
    }
}

/// Estimates `request`, a body of `api`, parsed into a tree: the reference
/// that [`scan`] is checked against.
pub fn estimate(
    api: Api,
    request: &Object<'_>,
    rules: &EstimateRules,
) -> Result<Estimate, EstimateError> {
    let mut prompt_tokens = 0i64;
    for (key, value) in request.iter() {
        let tokens = if is_setting(key.as_bytes()) {
            0
        } else if is_schema(key.as_bytes()) {
            text_tokens(json_chars(value))
        } else {
            prompt_tokens_of(value, rules.image_tokens, false)
        };
        prompt_tokens = prompt_tokens.saturating_add(tokens);
    }
    priced(api, prompt_tokens, |key| request.get(key), rules)
}

/// The estimate of a body whose prompt counts `prompt_tokens`, and whose
/// member `key`, for the bound and choice keys, `amount` gives.
fn priced<'j, 'a: 'j>(
    api: Api,
    prompt_tokens: i64,
    amount: impl Fn(&str) -> Option<&'j Json<'a>>,
    rules: &EstimateRules,
) -> Result<Estimate, EstimateError> {
    let mut named_bound = None;
    for key in BOUND_KEYS {
        // Where a body names more than one, the provider may keep to any.
        named_bound = named_bound.max(positive_integer(key, amount(key))?);
    }
    let mut choices = 1;
    for key in CHOICE_KEYS {
        choices = choices.max(positive_integer(key, amount(key))?.unwrap_or(1));
    }
    let completion_bound = match (api, named_bound) {
        // Embeddings produce no completion, so nothing is reserved for one.
        (Api::Embeddings, _) => 0,
        (_, Some(bound)) => bound,
        (_, None) => rules.default_max_tokens,
    };
    Ok(Estimate {
        prompt_tokens,
        completion_bound,
        choices,
        bound_named: named_bound.is_some(),
    })
}

/// The member `key`, `value`, as a whole number from 1 to [`MAX_AMOUNT`];
/// `None` when absent or null.
fn positive_integer(key: &str, value: Option<&Json<'_>>) -> Result<Option<i64>, EstimateError> {
    let value = match value {
        None | Some(Json::Null) => return Ok(None),
        Some(value) => value,
    };
    let number = match value {
        Json::Number(number) => number.as_u64().and_then(|n| i64::try_from(n).ok()),
        _ => None,
    };
    match number {
        Some(n @ 1..=MAX_AMOUNT) => Ok(Some(n)),
        _ => Err(EstimateError(format!(
            "`{key}` must be a whole number from 1 to {MAX_AMOUNT}, not {}",
            serde_json::to_string(value).unwrap_or_default()
        ))),
    }
}

fn text_tokens(chars: usize) -> i64 {
    i64::try_from(chars.div_ceil(4)).unwrap_or(i64::MAX)
}

/// A prompt-like value: a list is one piece per entry (a number in a list is
/// a token id, one token), anything else one piece.
fn prompt_tokens_of(value: &Json<'_>, image_tokens: i64, in_list: bool) -> i64 {
    match value {
        Json::Number(_) if in_list => 1,
        Json::Array(items) => items
            .iter()
            .map(|item| prompt_tokens_of(item, image_tokens, true))
            .fold(0, i64::saturating_add),
        piece => {
            let mut found = Piece::default();
            found.read(piece);
            found.tokens(image_tokens)
        }
    }
}

/// The text and images of one piece of prompt.
#[derive(Default)]
struct Piece {
    chars: usize,
    images: i64,
}

impl Piece {
    fn tokens(&self, image_tokens: i64) -> i64 {
        text_tokens(self.chars).saturating_add(self.images.saturating_mul(image_tokens))
    }

    /// Takes in every string of `value` but labels; an image block counts
    /// as one image, and a tool's input as its JSON text.
    fn read(&mut self, value: &Json<'_>) {
        match value {
            Json::String(text) => self.chars += text.chars().count(),
            Json::Array(items) => items.iter().for_each(|item| self.read(item)),
            Json::Object(block) => {
                let kind = block.get("type").and_then(Json::as_str);
                if kind.is_some_and(|kind| IMAGE_TYPES.contains(&kind)) {
                    self.images += 1;
                    return;
                }
                for (key, member) in block.iter() {
                    match (key, member) {
                        (label, _) if is_label(label.as_bytes()) => {}
                        ("input", Json::Object(_)) => self.chars += json_chars(member),
                        _ => self.read(member),
                    }
                }
            }
            Json::Number(_) | Json::Bool(_) | Json::Null => {}
        }
    }
}

/// Characters of `value` written as compact JSON, counted as it is written.
fn json_chars(value: &Json<'_>) -> usize {
    struct CharCount(usize);
    impl std::io::Write for CharCount {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            // Every UTF-8 character has one byte that is not a continuation.
            self.0 += bytes.iter().filter(|&&b| (b & 0xC0) != 0x80).count();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    if matches!(value, Json::Null) {
        return 0;
    }
    let mut count = CharCount(0);
    serde_json::to_writer(&mut count, value).map_or(0, |()| count.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: EstimateRules = EstimateRules {
        default_max_tokens: 4096,
        image_tokens: 1000,
    };

    /// What the tree gives for `body`: [`parse`], [`estimate`], and the
    /// stream members read from the tree.
    fn by_tree(api: Api, body: &[u8]) -> Result<Scan, EstimateError> {
        let request = parse(body)?;
        let estimate = estimate(api, &request, &RULES)?;
        let usage = request
            .get("stream_options")
            .and_then(|options| options.get("include_usage"));
        Ok(Scan {
            estimate,
            streams: request.get("stream") == Some(&Json::Bool(true)),
            usage_asked: usage == Some(&Json::Bool(true)),
        })
    }

    /// [`scan`]'s answer for `body`, checked against the tree's.
    fn scanned(api: Api, body: &[u8]) -> Result<Scan, EstimateError> {
        let scanned = scan(api, body, &RULES);
        assert_eq!(
            scanned,
            by_tree(api, body),
            "{}",
            String::from_utf8_lossy(body)
        );
        scanned
    }

    fn tokens(path: &str, body: &str) -> Estimate {
        scanned(Api::of_path(path), body.as_bytes())
            .unwrap()
            .estimate
    }

    fn prompt(path: &str, body: &str) -> i64 {
        tokens(path, body).prompt_tokens
    }

    fn refused(body: &str) -> String {
        scanned(Api::ChatCompletions, body.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_scan_reads_the_stream_members_the_gateway_writes_into() {
        let body = br#"{"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
        let found = scanned(Api::ChatCompletions, body).unwrap();
        assert!(found.streams && found.usage_asked);
        // Of a member given twice, the last counts.
        let body = br#"{"stream":true,"stream":false,"stream_options":{"include_usage":true,"include_usage":1}}"#;
        let found = scanned(Api::ChatCompletions, body).unwrap();
        assert!(!found.streams && !found.usage_asked);
    }

    #[test]
    fn the_scan_refuses_what_the_parser_refuses_inside_a_setting() {
        let deep = format!(r#"{{"metadata":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        for body in [
            deep.as_bytes(),
            br#"{"metadata":1e400}"#,
            b"{\"user\":\"\xff\"}",
            br#"{"model":"m"} x"#,
            br#"{"model":"m""#,
        ] {
            let error = scanned(Api::ChatCompletions, body).unwrap_err();
            assert!(
                error
                    .to_string()
                    .starts_with("the request body is not valid JSON")
            );
        }
    }

    #[test]
    fn the_hand_written_pass_reads_the_bodies_clients_send() {
        let bodies = [
            r#"{"model":"gpt-4o","max_tokens":512,"messages":[{"role":"system","content":"Be brief.\nThank you \u00e9"},
                {"role":"user","content":[{"type":"text","text":"1234"},{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}],
                "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","required":["a"],"minItems":-3}}}],
                "stream":true,"stream_options":{"include_usage":true},"n":null}"#,
            r#"{"model":"claude","system":[{"type":"text","text":"x","cache_control":{"type":"ephemeral"}}],
                "messages":[{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"get","input":{"q":"\"quoted\""}}]}],
                "max_tokens":1024}"#,
            r#"{"prompt":[[1,2,3],[4]],"max_tokens":2,"best_of":3}"#,
        ];
        for body in bodies {
            let fast = fast::read(body.as_bytes(), RULES.image_tokens);
            assert!(fast.is_some(), "{body}");
            assert_eq!(
                fast,
                pass::read(body.as_bytes(), RULES.image_tokens).unwrap()
            );
            scanned(Api::ChatCompletions, body.as_bytes()).unwrap();
        }
    }

    #[test]
    fn schemas_count_as_serde_json_writes_them() {
        // Escapes written back, numbers as serde_json writes them, keys given
        // twice twice, whitespace dropped.
        let body = r#"{"tools":[{"d":"a\u0001\n\"\/","x":1E2,"y":-0,"z":[],"z":{}, "w": null,"v":false}]}"#;
        let tools = r#"[{"d":"a\u0001\n\"/","x":100.0,"y":-0.0,"z":[],"z":{},"w":null,"v":false}]"#;
        assert_eq!(tools.len(), 74);
        assert_eq!(prompt("/v1/chat/completions", body), 74 / 4 + 1);
    }

    #[test]
    fn the_source_rule_counts_system_and_user_separately_plus_max_tokens() {
        // 10 chars -> 3 tokens, 5 chars -> 2 tokens.
        let body = r#"{"model":"gpt-4o","messages":[{"role":"system","content":"0123456789"},{"role":"user","content":"hello"}],"max_tokens":100}"#;
        assert_eq!(
            tokens("/v1/chat/completions", body),
            Estimate {
                prompt_tokens: 5,
                completion_bound: 100,
                choices: 1,
                bound_named: true,
            }
        );
    }

    #[test]
    fn the_route_default_bounds_a_body_that_names_none() {
        let body = r#"{"messages":[{"role":"user","content":"abcd"}]}"#;
        let estimate = tokens("/v1/chat/completions", body);
        assert_eq!(estimate.total(), 1 + 4096);
        assert!(!estimate.bound_named);
    }

    #[test]
    fn the_largest_named_bound_counts_and_n_multiplies_it() {
        let body = r#"{"messages":[],"max_completion_tokens":50,"max_tokens":999,"n":3}"#;
        let estimate = tokens("/v1/chat/completions", body);
        assert_eq!((estimate.completion_bound, estimate.choices), (999, 3));
        assert_eq!(estimate.total(), 2997);
    }

    #[test]
    fn text_parts_count_and_each_image_counts_the_image_bound() {
        let body = r#"{"messages":[{"role":"user","content":[
            {"type":"text","text":"12345678"},
            {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},
            {"type":"text","text":"1234"}]}],"max_tokens":1}"#;
        assert_eq!(prompt("/v1/chat/completions", body), 3 + 1000);
    }

    #[test]
    fn anthropic_images_and_responses_input_images_count_the_image_bound() {
        let body = r#"{"messages":[{"role":"user","content":[
            {"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0KGgoAAAA"}}]}],"max_tokens":1}"#;
        assert_eq!(prompt("/v1/messages", body), 1000);
        let body = r#"{"input":[{"role":"user","content":[{"type":"input_image","image_url":"https://x/y.png"}]}]}"#;
        assert_eq!(prompt("/v1/responses", body), 1000);
    }

    #[test]
    fn anthropic_documents_count_their_text_and_base64_sources() {
        let text = "x".repeat(400_000);
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"document","source":{{"type":"text","media_type":"text/plain","data":"{text}"}}}}]}}],"max_tokens":1}}"#
        );
        assert_eq!(prompt("/v1/messages", &body), 100_000);
        let pdf = "J".repeat(4000);
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"document","title":"Q3","source":{{"type":"base64","media_type":"application/pdf","data":"{pdf}"}}}}]}}],"max_tokens":1}}"#
        );
        assert_eq!(prompt("/v1/messages", &body), 4002usize.div_ceil(4) as i64);
    }

    #[test]
    fn tool_use_inputs_and_tool_results_count() {
        let body = r#"{"messages":[
            {"role":"assistant","content":[{"type":"tool_use","id":"toolu_1","name":"get","input":{"q":"abcd"}}]},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":[{"type":"text","text":"12345678"}]}]},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_2","content":"1234"}]}
        ],"max_tokens":1}"#;
        // "get" + {"q":"abcd"} = 3 + 10 chars -> 4; 8 chars -> 2; 4 chars -> 1.
        assert_eq!(prompt("/v1/messages", body), 4 + 2 + 1);
    }

    #[test]
    fn message_names_and_openai_tool_calls_count() {
        let body = r#"{"messages":[
            {"role":"user","name":"12345678","content":"1234"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},
            {"role":"tool","tool_call_id":"call_1","content":"123"}
        ],"max_tokens":1}"#;
        // 12 chars -> 3; "f" + 7 chars -> 2; 3 chars -> 1.
        assert_eq!(prompt("/v1/chat/completions", body), 3 + 2 + 1);
    }

    #[test]
    fn content_given_as_an_object_counts() {
        let body = r#"{"messages":[{"role":"user","content":{"type":"text","text":"12345678"}}],"max_tokens":1}"#;
        assert_eq!(prompt("/v1/chat/completions", body), 2);
    }

    #[test]
    fn response_format_and_text_format_schemas_count_as_their_json() {
        let schema =
            r#"{"type":"json_schema","json_schema":{"name":"r","schema":{"type":"object"}}}"#;
        let body = format!(r#"{{"messages":[],"response_format":{schema},"max_tokens":1}}"#);
        assert_eq!(
            prompt("/v1/chat/completions", &body),
            schema.len().div_ceil(4) as i64
        );
        let format = r#"{"format":{"type":"json_schema","name":"r","schema":{"type":"object"}}}"#;
        let body = format!(r#"{{"input":"","text":{format},"max_output_tokens":1}}"#);
        assert_eq!(
            prompt("/v1/responses", &body),
            format.len().div_ceil(4) as i64
        );
    }

    #[test]
    fn tool_definitions_count_as_their_json() {
        let tools = r#"[{"type":"function","function":{"name":"f"}}]"#;
        let body = format!(r#"{{"messages":[],"tools":{tools},"max_tokens":1}}"#);
        assert_eq!(
            prompt("/v1/chat/completions", &body),
            tools.len().div_ceil(4) as i64
        );
    }

    #[test]
    fn tool_definitions_count_characters_not_bytes() {
        // Written compactly: 14 characters in 18 bytes, so 4 tokens, not 5.
        let body = r#"{"tools": [ {"d": "éééé"} ],"max_tokens":1}"#;
        assert_eq!(prompt("/v1/chat/completions", body), 4);
    }

    #[test]
    fn anthropic_system_blocks_and_max_tokens() {
        let body = r#"{"model":"claude","system":[{"type":"text","text":"12345","cache_control":{"type":"ephemeral"}}],
            "messages":[{"role":"user","content":"123"}],"max_tokens":1024}"#;
        let estimate = tokens("/v1/messages", body);
        assert_eq!(
            (estimate.prompt_tokens, estimate.completion_bound),
            (2 + 1, 1024)
        );
    }

    #[test]
    fn completions_prompts_may_be_lists_or_token_ids() {
        assert_eq!(
            prompt(
                "/v1/completions",
                r#"{"prompt":["1234","12345"],"max_tokens":2}"#
            ),
            3
        );
        assert_eq!(
            prompt(
                "/v1/completions",
                r#"{"prompt":[[1,2,3],[4]],"max_tokens":2}"#
            ),
            4
        );
    }

    #[test]
    fn best_of_bounds_completions() {
        let body = r#"{"prompt":"","max_tokens":10,"best_of":4}"#;
        assert_eq!(tokens("/v1/completions", body).total(), 40);
    }

    #[test]
    fn embeddings_reserve_no_completion() {
        let estimate = tokens("/v1/embeddings", r#"{"input":["12345678","1"]}"#);
        assert_eq!((estimate.prompt_tokens, estimate.total()), (3, 3));
    }

    #[test]
    fn responses_bodies_count_instructions_input_items_and_max_output_tokens() {
        let body = r#"{"instructions":"1234","input":[{"role":"user","content":[{"type":"input_text","text":"12345"}]},
            {"type":"function_call_output","call_id":"c1","output":"12345678"}],
            "max_output_tokens":64}"#;
        let estimate = tokens("/v1/responses", body);
        assert_eq!(
            (estimate.prompt_tokens, estimate.completion_bound),
            (1 + 2 + 2, 64)
        );
    }

    #[test]
    fn an_unknown_member_is_read_as_prompt() {
        let body = r#"{"preamble":"12345678","documents":[{"text":"1234"}],"temperature":0.5,"max_tokens":1}"#;
        assert_eq!(prompt("/v1/chat", body), 2 + 1);
    }

    #[test]
    fn characters_not_bytes_are_counted() {
        assert_eq!(
            prompt("/v1/completions", r#"{"prompt":"éééé","max_tokens":1}"#),
            1
        );
    }

    #[test]
    fn a_bound_that_is_not_a_whole_positive_number_is_refused() {
        for bad in [
            "0",
            "-1",
            "100000.0",
            "1e30",
            "1.5",
            "\"100\"",
            "9007199254740992",
            "true",
        ] {
            for key in BOUND_KEYS {
                let message = refused(&format!(r#"{{"messages":[],"{key}":{bad}}}"#));
                assert!(
                    message.starts_with(&format!("`{key}` must be a whole number from 1 to")),
                    "{key} = {bad}: {message}"
                );
            }
        }
    }

    #[test]
    fn a_choice_count_that_is_not_a_whole_positive_number_is_refused() {
        for bad in ["0", "-2", "2.0", "\"2\""] {
            let message = refused(&format!(r#"{{"messages":[],"max_tokens":5,"n":{bad}}}"#));
            assert!(
                message.starts_with("`n` must be a whole number"),
                "{message}"
            );
        }
        assert!(refused(r#"{"prompt":"","best_of":0}"#).starts_with("`best_of`"));
    }

    #[test]
    fn a_null_bound_is_no_bound() {
        let body = r#"{"messages":[],"max_tokens":null,"n":null}"#;
        assert_eq!(tokens("/v1/chat/completions", body).total(), 4096);
    }

    #[test]
    fn the_largest_bound_is_accepted() {
        let body = format!(r#"{{"messages":[],"max_tokens":{MAX_AMOUNT},"n":2}}"#);
        assert_eq!(tokens("/v1/chat/completions", &body).total(), MAX_AMOUNT);
    }

    #[test]
    fn invalid_json_is_explained() {
        let error = parse(b"{not json").unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("the request body is not valid JSON"),
            "{error}"
        );
        assert_eq!(
            parse(b"[1]").unwrap_err().to_string(),
            "the request body must be a JSON object"
        );
    }

    mod properties {
        use super::*;
        use crate::llm::scan::arbitrary;
        use proptest::prelude::*;

        /// A message whose text sits in one of the places a provider reads.
        fn message() -> impl Strategy<Value = (serde_json::Value, usize)> {
            let text = "\\PC{0,40}";
            (text, text, 0..6usize).prop_map(|(a, b, shape)| {
                let chars = a.chars().count() + b.chars().count();
                let value = match shape {
                    0 => serde_json::json!({"role": "user", "content": a, "name": b}),
                    1 => serde_json::json!({"role": "user", "content": [
                        {"type": "text", "text": a}, {"type": "text", "text": b}]}),
                    2 => serde_json::json!({"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": a}]},
                        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": b}}]}),
                    3 => serde_json::json!({"role": "assistant", "content": {"type": "text", "text": a},
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": b, "arguments": ""}}]}),
                    4 => serde_json::json!({"role": "user", "content": [
                        {"type": "thinking", "thinking": a, "signature": "s"},
                        {"type": "input_text", "text": b}]}),
                    _ => serde_json::json!({"type": "function_call_output", "call_id": "c", "output": a, "extra": b}),
                };
                (value, chars)
            })
        }

        /// A body: mostly an object, of keys the estimate knows.
        fn body() -> impl Strategy<Value = Vec<u8>> {
            arbitrary::body(vec![
                "model",
                "messages",
                "system",
                "prompt",
                "input",
                "instructions",
                "content",
                "text",
                "type",
                "role",
                "name",
                "id",
                "tools",
                "functions",
                "tool_choice",
                "response_format",
                "prediction",
                "max_tokens",
                "max_completion_tokens",
                "max_output_tokens",
                "n",
                "best_of",
                "stream",
                "stream_options",
                "include_usage",
                "metadata",
                "temperature",
                "cache_control",
                "source",
                "data",
            ])
        }

        fn api() -> impl Strategy<Value = Api> {
            proptest::sample::select(vec![
                Api::ChatCompletions,
                Api::Completions,
                Api::Responses,
                Api::Embeddings,
                Api::Messages,
                Api::Other,
            ])
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn the_scan_estimates_every_body_as_the_tree_does(body in body(), api in api()) {
                prop_assert_eq!(scan(api, &body, &RULES), by_tree(api, &body));
            }

            #[test]
            fn the_hand_written_pass_reads_what_it_reads_as_serde_jsons_does(body in body()) {
                if let Some(fast) = fast::read(&body, RULES.image_tokens) {
                    let slow = pass::read(&body, RULES.image_tokens).ok().flatten();
                    prop_assert_eq!(Some(fast), slow, "{}", String::from_utf8_lossy(&body));
                }
            }

            #[test]
            fn the_scan_refuses_a_broken_body_as_the_tree_does(
                body in body(),
                api in api(),
                at in any::<prop::sample::Index>(),
                how in 0..3u8,
                byte in arbitrary::byte(),
            ) {
                let body = arbitrary::broken(body, at, how, byte);
                let (scanned, tree) = (scan(api, &body, &RULES), by_tree(api, &body));
                prop_assert_eq!(&scanned, &tree, "{}", String::from_utf8_lossy(&body));
                if let Some(fast) = fast::read(&body, RULES.image_tokens) {
                    let slow = pass::read(&body, RULES.image_tokens).ok().flatten();
                    prop_assert_eq!(Some(fast), slow, "{}", String::from_utf8_lossy(&body));
                }
            }
        }

        proptest! {
            #[test]
            fn no_body_estimates_below_a_quarter_of_its_text(
                messages in proptest::collection::vec(message(), 0..6),
                system in "\\PC{0,40}",
                api in prop_oneof![Just("/v1/chat/completions"), Just("/v1/messages"), Just("/v1/responses")],
            ) {
                let chars: usize = messages.iter().map(|(_, c)| c).sum::<usize>() + system.chars().count();
                let items: Vec<_> = messages.into_iter().map(|(m, _)| m).collect();
                let key = if api == "/v1/responses" { "input" } else { "messages" };
                let body = serde_json::json!({"system": system, key: items, "max_tokens": 1});
                let bytes = serde_json::to_vec(&body).unwrap();
                let estimate = scanned(Api::of_path(api), &bytes).unwrap().estimate;
                prop_assert!(estimate.prompt_tokens >= chars.div_ceil(4) as i64,
                    "{} tokens for {} chars in {}", estimate.prompt_tokens, chars, body);
                prop_assert!(chars == 0 || estimate.prompt_tokens > 0);
            }
        }
    }
}
