//! What the gateway writes into an LLM request body before forwarding it:
//! a request for the stream's usage, and the completion bound that makes
//! the reservation a true bound.

use super::Api;
use super::estimate::{self, BOUND_KEYS, Estimate, EstimateError, Scan};
use super::json::{Json, Object};
use crate::quota::{Dimension, Exceeded};

/// A request body on its way to the provider: forwarded as the bytes it
/// arrived as, unless the gateway writes into it, when it is parsed into a
/// tree (once) and written back.
pub struct Outgoing<'a> {
    bytes: &'a [u8],
    tree: Option<Result<Object<'a>, EstimateError>>,
    changed: bool,
}

/// Why a body the gateway wrote into could not be written back.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Parse(EstimateError),
    #[error("{0}")]
    Write(serde_json::Error),
}

impl<'a> Outgoing<'a> {
    pub fn new(bytes: &'a [u8]) -> Outgoing<'a> {
        Outgoing {
            bytes,
            tree: None,
            changed: false,
        }
    }

    /// The body as a tree; `None` if it does not parse, which a body that
    /// was [`estimate::scan`]ned does (the failure is given by `into_written`).
    fn tree(&mut self) -> Option<&mut Object<'a>> {
        let bytes = self.bytes;
        self.tree
            .get_or_insert_with(|| estimate::parse(bytes))
            .as_mut()
            .ok()
    }

    /// [`set_completion_bound`] on this body.
    pub fn set_completion_bound(&mut self, api: Api, bound: i64) -> bool {
        if api.bound_field().is_none() {
            return false;
        }
        let Some(tree) = self.tree() else {
            return false;
        };
        let set = set_completion_bound(api, tree, bound);
        self.changed |= set;
        set
    }

    /// [`ask_for_stream_usage`] on this body, which `scan` read: parsed only
    /// when the request must be added.
    pub fn ask_for_stream_usage(&mut self, api: Api, scan: &Scan) -> StreamUsage {
        if !api.usage_on_request() || !scan.streams {
            return StreamUsage::NotNeeded;
        }
        if scan.usage_asked {
            return StreamUsage::ClientAsked;
        }
        let Some(tree) = self.tree() else {
            return StreamUsage::NotNeeded;
        };
        let usage = ask_for_stream_usage(api, tree);
        self.changed |= usage == StreamUsage::Added;
        usage
    }

    /// The body written back, when the gateway changed it; `None` when it
    /// goes on as it arrived.
    pub fn into_written(self) -> Result<Option<Vec<u8>>, WriteError> {
        match self.tree {
            Some(Err(error)) => Err(WriteError::Parse(error)),
            Some(Ok(tree)) if self.changed => serde_json::to_vec(&tree)
                .map(Some)
                .map_err(WriteError::Write),
            _ => Ok(None),
        }
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

    const RULES: estimate::EstimateRules = estimate::EstimateRules {
        default_max_tokens: 4096,
        image_tokens: 1000,
    };

    /// The body `Outgoing` forwards after asking for stream usage and, with
    /// `bound`, writing it; `None` for the bytes as they arrived.
    fn forwarded(api: Api, body: &[u8], bound: Option<i64>) -> (StreamUsage, Option<String>) {
        let scan = estimate::scan(api, body, &RULES).unwrap();
        let mut outgoing = Outgoing::new(body);
        if let Some(bound) = bound {
            outgoing.set_completion_bound(api, bound);
        }
        let usage = outgoing.ask_for_stream_usage(api, &scan);
        let written = outgoing.into_written().unwrap();
        (
            usage,
            written.map(|bytes| String::from_utf8(bytes).unwrap()),
        )
    }

    #[test]
    fn a_body_the_gateway_does_not_write_into_goes_on_as_it_arrived() {
        let body = br#"{"messages":[] , "max_tokens":5}"#;
        assert_eq!(
            forwarded(Api::ChatCompletions, body, None),
            (StreamUsage::NotNeeded, None)
        );
        let asked = br#"{"stream":true,"stream_options":{"include_usage":true}}"#;
        assert_eq!(
            forwarded(Api::ChatCompletions, asked, None),
            (StreamUsage::ClientAsked, None)
        );
        assert_eq!(
            forwarded(Api::Embeddings, br#"{"input":"x"}"#, Some(9)),
            (StreamUsage::NotNeeded, None)
        );
    }

    #[test]
    fn a_body_the_gateway_writes_into_is_written_back_once() {
        let body = br#"{"stream":true, "messages":[]}"#;
        assert_eq!(
            forwarded(Api::ChatCompletions, body, Some(64)),
            (
                StreamUsage::Added,
                Some(
                    r#"{"stream":true,"messages":[],"max_completion_tokens":64,"stream_options":{"include_usage":true}}"#
                        .to_owned()
                )
            )
        );
        assert_eq!(
            forwarded(Api::Messages, br#"{"stream":true}"#, Some(64)),
            (
                StreamUsage::NotNeeded,
                Some(r#"{"stream":true,"max_tokens":64}"#.to_owned())
            )
        );
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
