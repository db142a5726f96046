//! What the gateway writes into an LLM request body before forwarding it:
//! a request for the stream's usage, and the completion bound that makes
//! the reservation a true bound.

use super::Api;
use super::estimate::{BOUND_KEYS, Estimate};
use super::json::{Json, Object};
use crate::quota::{Dimension, Exceeded};

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
pub fn ask_for_stream_usage(api: Api, request: &mut Object<'_>) -> StreamUsage {
    if !api.usage_on_request() || request.get("stream") != Some(&Json::Bool(true)) {
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

/// Writes `bound` as the body's completion bound: into every bound field
/// the body names, or else the one its API uses. Returns whether the body
/// now carries it (an API without a bound field cannot).
pub fn set_completion_bound(api: Api, request: &mut Object<'_>, bound: i64) -> bool {
    let Some(field) = api.bound_field() else {
        return false;
    };
    let named: Vec<&'static str> = BOUND_KEYS
        .into_iter()
        .filter(|key| request.get(key).is_some_and(|v| !matches!(v, Json::Null)))
        .collect();
    let fields = if named.is_empty() { vec![field] } else { named };
    for key in fields {
        request.insert(key, Json::Number(bound.into()));
    }
    true
}

/// The lower completion bound that fits what a 402 says is left, when at
/// least `min_completion_tokens` per choice is: `exceeded` is the store's
/// refusal of a reservation of `other_tokens` (fixed tokens of the route)
/// plus `estimate`.
pub fn fitted_bound(
    estimate: &Estimate,
    other_tokens: i64,
    exceeded: &Exceeded,
    min_completion_tokens: i64,
) -> Option<i64> {
    if exceeded.dimension != Dimension::Tokens {
        return None;
    }
    let left = exceeded
        .limit
        .saturating_sub(exceeded.current)
        .saturating_sub(estimate.prompt_tokens)
        .saturating_sub(other_tokens);
    let per_choice = left / estimate.choices.max(1);
    (per_choice >= min_completion_tokens.max(1) && per_choice < estimate.completion_bound)
        .then_some(per_choice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::estimate::parse;

    fn estimate(prompt_tokens: i64, completion_bound: i64, choices: i64) -> Estimate {
        Estimate {
            prompt_tokens,
            completion_bound,
            choices,
            bound_named: true,
        }
    }

    fn tokens_exceeded(current: i64, limit: i64, requested: i64) -> Exceeded {
        Exceeded {
            dimension: Dimension::Tokens,
            current,
            limit,
            requested,
        }
    }

    #[test]
    fn an_openai_stream_is_asked_for_its_usage_once() {
        let mut request = parse(br#"{"stream":true,"messages":[]}"#).unwrap();
        assert_eq!(
            ask_for_stream_usage(Api::ChatCompletions, &mut request),
            StreamUsage::Added
        );
        assert_eq!(
            request
                .get("stream_options")
                .and_then(|options| options.get("include_usage")),
            Some(&Json::Bool(true))
        );
        assert_eq!(
            ask_for_stream_usage(Api::ChatCompletions, &mut request),
            StreamUsage::ClientAsked
        );
    }

    #[test]
    fn other_bodies_are_left_as_they_are() {
        let mut anthropic = parse(br#"{"stream":true,"messages":[]}"#).unwrap();
        assert_eq!(
            ask_for_stream_usage(Api::Messages, &mut anthropic),
            StreamUsage::NotNeeded
        );
        let mut not_streaming = parse(br#"{"messages":[]}"#).unwrap();
        assert_eq!(
            ask_for_stream_usage(Api::ChatCompletions, &mut not_streaming),
            StreamUsage::NotNeeded
        );
        assert!(
            anthropic.get("stream_options").is_none()
                && not_streaming.get("stream_options").is_none()
        );
    }

    #[test]
    fn a_bound_goes_into_the_field_each_api_uses() {
        for (api, field) in [
            (Api::ChatCompletions, "max_completion_tokens"),
            (Api::Completions, "max_tokens"),
            (Api::Responses, "max_output_tokens"),
            (Api::Messages, "max_tokens"),
        ] {
            let mut request = parse(br#"{"model":"m"}"#).unwrap();
            assert!(set_completion_bound(api, &mut request, 256));
            assert_eq!(
                serde_json::to_string(&request).unwrap(),
                format!(r#"{{"model":"m","{field}":256}}"#)
            );
        }
        let mut request = parse(br#"{"input":"x"}"#).unwrap();
        assert!(!set_completion_bound(Api::Embeddings, &mut request, 256));
        assert!(!set_completion_bound(Api::Other, &mut request, 256));
    }

    #[test]
    fn a_lowered_bound_replaces_every_bound_the_body_named() {
        let mut request =
            parse(br#"{"max_tokens":900,"max_completion_tokens":800,"max_tokens":700}"#).unwrap();
        set_completion_bound(Api::ChatCompletions, &mut request, 300);
        assert_eq!(
            serde_json::to_string(&request).unwrap(),
            r#"{"max_completion_tokens":300,"max_tokens":300}"#
        );
    }

    #[test]
    fn fit_lowers_the_bound_to_what_is_left() {
        // 1,000 left of the limit; the prompt takes 100 of it.
        let exceeded = tokens_exceeded(9_000, 10_000, 4_196);
        assert_eq!(
            fitted_bound(&estimate(100, 4096, 1), 0, &exceeded, 256),
            Some(900)
        );
        assert_eq!(
            fitted_bound(&estimate(100, 4096, 3), 0, &exceeded, 256),
            Some(300)
        );
        assert_eq!(
            fitted_bound(&estimate(100, 4096, 1), 50, &exceeded, 256),
            Some(850)
        );
    }

    #[test]
    fn fit_refuses_below_the_minimum_completion() {
        let exceeded = tokens_exceeded(9_800, 10_000, 4_196);
        assert_eq!(
            fitted_bound(&estimate(100, 4096, 1), 0, &exceeded, 256),
            None
        );
        // Over the limit already.
        let exceeded = tokens_exceeded(10_500, 10_000, 4_196);
        assert_eq!(fitted_bound(&estimate(100, 4096, 1), 0, &exceeded, 1), None);
    }

    #[test]
    fn fit_leaves_other_dimensions_to_the_402() {
        let exceeded = Exceeded {
            dimension: Dimension::PlaybookRuns,
            current: 10,
            limit: 10,
            requested: 1,
        };
        assert_eq!(fitted_bound(&estimate(1, 4096, 1), 0, &exceeded, 1), None);
    }
}
