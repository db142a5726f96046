//! The LLM provider formats, both sides of one call, in one place: adding a
//! provider touches this folder only. [`crate::meter`] calls the request
//! side, [`crate::settle`] the response side.
//!
//! Request side:
//! - [`estimate`]: the prompt tokens of a body, and its completion bound,
//!   read in one pass over its bytes (`scan`);
//! - [`json`]: the body as a JSON tree that borrows its strings, built only
//!   for a body the gateway writes into;
//! - [`request`]: what the gateway writes into a body before forwarding it
//!   (`stream_options.include_usage`, the completion bound); a body it
//!   writes nothing into goes on as the bytes it arrived as.
//!
//! Both sides:
//! - [`scan`]: a pass over JSON bytes written by hand, which builds no
//!   tree, for the bodies clients send and the answers providers give; on
//!   anything it is not sure of, serde_json reads the body.
//!
//! Response side:
//! - [`usage`]: the tokens a JSON answer or a stream's events report, and
//!   when a stream's report is final;
//! - [`sse`]: the stream scanner, which reads usage as events pass and
//!   hides the usage chunk the gateway asked for on the client's behalf.
//!
//! The APIs understood, and the field each uses for its completion bound:
//!
//! | API | path ends with | bound field |
//! |---|---|---|
//! | OpenAI chat completions | `/chat/completions` | `max_completion_tokens` (`max_tokens` also read) |
//! | OpenAI completions | `/completions` | `max_tokens` |
//! | OpenAI responses | `/responses` | `max_output_tokens` |
//! | OpenAI embeddings | `/embeddings` | none: no completion |
//! | Anthropic messages | `/messages` | `max_tokens` |

pub mod estimate;
pub mod json;
pub mod request;
mod scan;
pub mod sse;
pub mod usage;

/// Which provider API a request speaks, known from its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    ChatCompletions,
    Completions,
    Responses,
    Embeddings,
    Messages,
    /// Another path: estimated by the same rules, its bound left as sent.
    Other,
}

impl Api {
    pub fn of_path(path: &str) -> Api {
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Api::ChatCompletions
        } else if path.ends_with("/completions") {
            Api::Completions
        } else if path.ends_with("/responses") {
            Api::Responses
        } else if path.ends_with("/embeddings") {
            Api::Embeddings
        } else if path.ends_with("/messages") {
            Api::Messages
        } else {
            Api::Other
        }
    }

    /// The field the gateway writes a completion bound into; `None` where
    /// the API produces no completion or is not known.
    pub fn bound_field(self) -> Option<&'static str> {
        match self {
            Api::ChatCompletions => Some("max_completion_tokens"),
            Api::Completions | Api::Messages => Some("max_tokens"),
            Api::Responses => Some("max_output_tokens"),
            Api::Embeddings | Api::Other => None,
        }
    }

    /// Whether a stream of this API reports usage only when asked
    /// (`stream_options.include_usage`).
    pub fn usage_on_request(self) -> bool {
        matches!(self, Api::ChatCompletions | Api::Completions)
    }
}

/// How an estimate route's response is read for its usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    /// The gateway asked an OpenAI stream for usage that the client did not,
    /// so the stream is rewritten to hide it.
    pub hide_requested_usage: bool,
}

/// What a route does with the completion bound of a body (`completion_bound`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionBound {
    /// Forwarded as the client sent it; a body naming none is reserved at
    /// the route's default, which the provider need not keep to.
    AsSent,
    /// A body naming none gets the route's default written in, so the
    /// provider cannot produce more than was reserved.
    Inject,
    /// As `Inject`; and when the org has less left than the bound, but at
    /// least `min_completion_tokens`, the bound is lowered to what is left
    /// instead of a 402.
    Fit { min_completion_tokens: i64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_is_known_from_the_end_of_the_path() {
        assert_eq!(Api::of_path("/v1/chat/completions"), Api::ChatCompletions);
        assert_eq!(
            Api::of_path("/openai/v1/chat/completions/"),
            Api::ChatCompletions
        );
        assert_eq!(Api::of_path("/v1/completions"), Api::Completions);
        assert_eq!(Api::of_path("/v1/responses"), Api::Responses);
        assert_eq!(Api::of_path("/v1/embeddings"), Api::Embeddings);
        assert_eq!(Api::of_path("/v1/messages"), Api::Messages);
        assert_eq!(Api::of_path("/v1/other"), Api::Other);
    }
}
