//! Token estimates for LLM request bodies, before the provider has seen them.
//!
//! The rule is the source system's: text counts `ceil(chars / 4)` tokens,
//! taken per piece (the system prompt, each message, the tool definitions),
//! and the completion bound the body names (`max_completion_tokens`,
//! `max_tokens` or `max_output_tokens`, times `n`) is added, else the route's
//! default. Bodies of the OpenAI chat completions, completions, embeddings
//! and responses APIs and of the Anthropic messages API are understood; the
//! estimate is what is reserved and charged.

use super::json::{Json, Object};
use crate::quota::MAX_AMOUNT;

/// What a request body is expected to cost in tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub prompt_tokens: i64,
    pub completion_bound: i64,
}

impl Estimate {
    /// Prompt and completion together, capped at [`MAX_AMOUNT`] so that an
    /// absurd `max_tokens` or `n` is refused by the limit, not by overflow.
    pub fn total(&self) -> i64 {
        self.prompt_tokens
            .saturating_add(self.completion_bound)
            .min(MAX_AMOUNT)
    }
}

/// Why a body could not be estimated; the message is shown to the caller.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EstimateError(String);

/// The request body as a JSON object, or why it is not one.
pub fn parse(body: &[u8]) -> Result<Object<'_>, EstimateError> {
    match serde_json::from_slice(body) {
        Ok(Json::Object(request)) => Ok(request),
        Ok(_) => Err(EstimateError(
            "the request body must be a JSON object".into(),
        )),
        Err(e) => Err(EstimateError(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// Estimates `request`, sent to `path`, with `default_max_tokens` as the
/// completion bound when it names none.
pub fn estimate(path: &str, request: &Object<'_>, default_max_tokens: i64) -> Estimate {
    let mut prompt_tokens = 0i64;
    for key in ["system", "instructions", "prompt", "input"] {
        if let Some(value) = request.get(key) {
            prompt_tokens += pieces_tokens(value);
        }
    }
    if let Some(Json::Array(messages)) = request.get("messages") {
        for message in messages {
            prompt_tokens += message_tokens(message);
        }
    }
    for key in ["tools", "functions"] {
        if let Some(definitions) = request.get(key).filter(|v| !v.is_null()) {
            prompt_tokens += text_tokens(json_chars(definitions));
        }
    }

    let named_bound = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|key| request.get(key).and_then(Json::as_i64))
        .map(|bound| bound.max(0));
    let choices = ["n", "best_of"]
        .iter()
        .filter_map(|key| request.get(key).and_then(Json::as_i64))
        .max()
        .unwrap_or(1)
        .max(1);
    // Embeddings produce no completion, so nothing is reserved for one.
    let default_bound = if path.ends_with("/embeddings") {
        0
    } else {
        default_max_tokens
    };
    let completion_bound = named_bound.unwrap_or(default_bound).saturating_mul(choices);

    Estimate {
        prompt_tokens,
        completion_bound,
    }
}

/// What the gateway did to have a stream report its usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamUsage {
    /// Not an OpenAI stream: usage comes as it would anyway.
    NotNeeded,
    /// The client asked for usage itself.
    ClientAsked,
    /// The gateway set `stream_options.include_usage` for itself.
    Added,
}

/// Asks an OpenAI chat completions or completions stream to report its
/// usage, which it only does when `stream_options.include_usage` is set.
pub fn request_stream_usage(path: &str, request: &mut Object<'_>) -> StreamUsage {
    let openai = path.ends_with("/chat/completions") || path.ends_with("/completions");
    if !openai || request.get("stream") != Some(&Json::Bool(true)) {
        return StreamUsage::NotNeeded;
    }
    let options = request.entry_or_insert("stream_options", Json::Object(Object::default()));
    if !matches!(options, Json::Object(_)) {
        *options = Json::Object(Object::default());
    }
    let Json::Object(options) = options else {
        return StreamUsage::NotNeeded;
    };
    let include_usage = options.entry_or_insert("include_usage", Json::Null);
    if *include_usage == Json::Bool(true) {
        StreamUsage::ClientAsked
    } else {
        *include_usage = Json::Bool(true);
        StreamUsage::Added
    }
}

fn text_tokens(chars: usize) -> i64 {
    i64::try_from(chars.div_ceil(4)).unwrap_or(i64::MAX)
}

/// A prompt-like value: one string is one piece; a list is one piece per
/// entry (a list of token ids counts one token per id).
fn pieces_tokens(value: &Json<'_>) -> i64 {
    match value {
        Json::String(text) => text_tokens(text.chars().count()),
        Json::Number(_) => 1,
        Json::Array(items) => items.iter().map(pieces_tokens).sum(),
        Json::Object(_) => message_tokens(value),
        _ => 0,
    }
}

/// One message (or responses-API input item) as one piece: its text
/// content and any tool calls it carries.
fn message_tokens(message: &Json<'_>) -> i64 {
    let mut chars = 0;
    if let Some(content) = message.get("content") {
        chars += content_chars(content);
    }
    if let Some(text) = message.get("text").and_then(Json::as_str) {
        chars += text.chars().count();
    }
    for key in ["tool_calls", "function_call", "arguments", "output"] {
        if let Some(value) = message.get(key) {
            chars += match value {
                Json::String(text) => text.chars().count(),
                other => json_chars(other),
            };
        }
    }
    text_tokens(chars)
}

/// Characters of text in message content: a string, or parts whose `text`
/// counts (images and other media do not), with tool inputs and nested tool
/// results counted by their JSON.
fn content_chars(content: &Json<'_>) -> usize {
    match content {
        Json::String(text) => text.chars().count(),
        Json::Array(parts) => parts.iter().map(content_chars).sum(),
        Json::Object(part) => {
            let text = part
                .get("text")
                .and_then(Json::as_str)
                .map_or(0, |t| t.chars().count());
            let nested = part.get("content").map_or(0, content_chars);
            let input = part.get("input").map_or(0, json_chars);
            text + nested + input
        }
        _ => 0,
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
    let mut count = CharCount(0);
    serde_json::to_writer(&mut count, value).map_or(0, |()| count.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(path: &str, body: &str) -> Estimate {
        estimate(path, &parse(body.as_bytes()).unwrap(), 4096)
    }

    #[test]
    fn the_source_rule_counts_system_and_user_separately_plus_max_tokens() {
        // 10 chars -> 3 tokens, 5 chars -> 2 tokens.
        let body = r#"{"messages":[{"role":"system","content":"0123456789"},{"role":"user","content":"hello"}],"max_tokens":100}"#;
        assert_eq!(
            tokens("/v1/chat/completions", body),
            Estimate {
                prompt_tokens: 5,
                completion_bound: 100
            }
        );
    }

    #[test]
    fn the_route_default_bounds_a_body_that_names_none() {
        let body = r#"{"messages":[{"role":"user","content":"abcd"}]}"#;
        assert_eq!(tokens("/v1/chat/completions", body).total(), 1 + 4096);
    }

    #[test]
    fn max_completion_tokens_wins_and_n_multiplies_it() {
        let body = r#"{"messages":[],"max_completion_tokens":50,"max_tokens":999,"n":3}"#;
        assert_eq!(tokens("/v1/chat/completions", body).completion_bound, 150);
    }

    #[test]
    fn text_parts_count_and_images_do_not() {
        let body = r#"{"messages":[{"role":"user","content":[
            {"type":"text","text":"12345678"},
            {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},
            {"type":"text","text":"1234"}]}],"max_tokens":1}"#;
        assert_eq!(tokens("/v1/chat/completions", body).prompt_tokens, 3);
    }

    #[test]
    fn tool_definitions_count_as_their_json() {
        let tools = r#"[{"type":"function","function":{"name":"f"}}]"#;
        let body = format!(r#"{{"messages":[],"tools":{tools},"max_tokens":0}}"#);
        let expected =
            serde_json::to_string(&serde_json::from_str::<serde_json::Value>(tools).unwrap())
                .unwrap()
                .len();
        assert_eq!(
            tokens("/v1/chat/completions", &body).prompt_tokens,
            expected.div_ceil(4) as i64
        );
    }

    #[test]
    fn tool_definitions_count_characters_not_bytes() {
        // Written compactly: 14 characters in 18 bytes, so 4 tokens, not 5.
        let body = r#"{"tools": [ {"d": "éééé"} ],"max_tokens":0}"#;
        assert_eq!(tokens("/v1/chat/completions", body).prompt_tokens, 4);
    }

    #[test]
    fn anthropic_system_blocks_and_max_tokens() {
        let body = r#"{"model":"claude","system":[{"type":"text","text":"12345"}],
            "messages":[{"role":"user","content":"123"}],"max_tokens":1024}"#;
        assert_eq!(
            tokens("/v1/messages", body),
            Estimate {
                prompt_tokens: 2 + 1,
                completion_bound: 1024
            }
        );
    }

    #[test]
    fn completions_prompts_may_be_lists_or_token_ids() {
        assert_eq!(
            tokens(
                "/v1/completions",
                r#"{"prompt":["1234","12345"],"max_tokens":2}"#
            )
            .prompt_tokens,
            3
        );
        assert_eq!(
            tokens(
                "/v1/completions",
                r#"{"prompt":[[1,2,3],[4]],"max_tokens":2}"#
            )
            .prompt_tokens,
            4
        );
    }

    #[test]
    fn best_of_bounds_completions() {
        assert_eq!(
            tokens(
                "/v1/completions",
                r#"{"prompt":"","max_tokens":10,"best_of":4}"#
            )
            .completion_bound,
            40
        );
    }

    #[test]
    fn embeddings_reserve_no_completion() {
        assert_eq!(
            tokens("/v1/embeddings", r#"{"input":["12345678","1"]}"#),
            Estimate {
                prompt_tokens: 3,
                completion_bound: 0
            }
        );
    }

    #[test]
    fn responses_bodies_count_instructions_input_items_and_max_output_tokens() {
        let body = r#"{"instructions":"1234","input":[{"role":"user","content":[{"type":"input_text","text":"12345"}]}],
            "max_output_tokens":64}"#;
        assert_eq!(
            tokens("/v1/responses", body),
            Estimate {
                prompt_tokens: 1 + 2,
                completion_bound: 64
            }
        );
    }

    #[test]
    fn characters_not_bytes_are_counted() {
        assert_eq!(
            tokens(
                "/v1/chat/completions",
                r#"{"prompt":"éééé","max_tokens":0}"#
            )
            .prompt_tokens,
            1
        );
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

    #[test]
    fn an_openai_stream_is_asked_for_its_usage_once() {
        let mut request = parse(br#"{"stream":true,"messages":[]}"#).unwrap();
        assert_eq!(
            request_stream_usage("/v1/chat/completions", &mut request),
            StreamUsage::Added
        );
        assert_eq!(
            request
                .get("stream_options")
                .and_then(|options| options.get("include_usage")),
            Some(&Json::Bool(true))
        );
        assert_eq!(
            request_stream_usage("/v1/chat/completions", &mut request),
            StreamUsage::ClientAsked
        );
    }

    #[test]
    fn other_bodies_are_left_as_they_are() {
        let mut anthropic = parse(br#"{"stream":true,"messages":[]}"#).unwrap();
        assert_eq!(
            request_stream_usage("/v1/messages", &mut anthropic),
            StreamUsage::NotNeeded
        );
        let mut not_streaming = parse(br#"{"messages":[]}"#).unwrap();
        assert_eq!(
            request_stream_usage("/v1/chat/completions", &mut not_streaming),
            StreamUsage::NotNeeded
        );
        assert!(
            anthropic.get("stream_options").is_none()
                && not_streaming.get("stream_options").is_none()
        );
    }
}
