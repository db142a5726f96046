//! Every answer the gateway makes itself, and the one place each becomes an
//! HTTP response: the JSON envelope
//! `{"success": false, "error": {"code", "message", "details"?}}`.
//!
//! Messages speak to the caller and never carry internals (addresses, store
//! errors, panics); those go to the log.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::Body;
use crate::accept::ClientFault;
use crate::catalog::CatalogError;
use crate::metrics::Outcome;
use crate::org::OrgPolicy;
use crate::period::{Period, rfc3339};
use crate::quota::Exceeded;
use crate::route::{PathError, TargetError};
use crate::store::StoreError;
use crate::usage_link::LinkRefused;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches this method and path")]
    NoRoute,
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("this route is metered and needs a gateway API key or a verified org")]
    Unauthenticated,
    #[error("the bearer token was not accepted: {0}")]
    InvalidToken(&'static str),
    #[error("the API key is not a gateway API key")]
    UnknownApiKey,
    #[error("the request carries more than one {0} header; send one")]
    DuplicateHeader(http::HeaderName),
    #[error("the org id is malformed (1 to 64 of A-Z a-z 0-9 _ - .)")]
    InvalidOrgId,
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("{0}")]
    InvalidBody(String),
    #[error("the request body could not be read")]
    ClientBody,
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("{}", .0.exceeded.message())]
    QuotaExceeded(Box<Denial>),
    #[error("quota enforcement is unavailable, try again shortly")]
    StoreUnavailable,
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("the gateway failed to handle this request")]
    Internal,
    #[error("this endpoint needs Authorization: Bearer <admin token>")]
    AdminUnauthorized,
    #[error("no admin endpoint has this path")]
    NoEndpoint,
    /// With the methods the path does take, for the `Allow` header.
    #[error("this endpoint does not take this method")]
    MethodNotAllowed(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("the config file has problems; the running config is unchanged")]
    ConfigRejected(Vec<String>),
    #[error("the gateway was started without a config file, so there is nothing to reload")]
    ReloadUnavailable,
    /// Said once, on a TLS listener, before the connection is closed.
    #[error("a plain HTTP request was sent to the HTTPS port; use https://")]
    PlainHttpOnTlsPort,
    #[error("the usage page is off: configure [usage_page] to make usage links")]
    UsagePageOff,
    /// A usage link altered or expired.
    #[error(transparent)]
    LinkRefused(#[from] LinkRefused),
}

/// A request body the client got wrong: 400, or 408 when it went silent.
impl From<ClientFault> for GatewayError {
    fn from(fault: ClientFault) -> GatewayError {
        match fault {
            ClientFault::Unreadable => GatewayError::ClientBody,
            ClientFault::Silent | ClientFault::Late => GatewayError::BodyTimeout,
        }
    }
}

/// A store call outside the request path (the admin API's) that failed;
/// the call itself counted and logged it. The request path decides by
/// `store.on_error` instead, and never converts.
impl From<StoreError> for GatewayError {
    fn from(_: StoreError) -> GatewayError {
        GatewayError::StoreUnavailable
    }
}

/// A change to the runtime catalog that could not be made.
impl From<CatalogError> for GatewayError {
    fn from(error: CatalogError) -> GatewayError {
        match error {
            CatalogError::Invalid(_) | CatalogError::KeyName => {
                GatewayError::InvalidBody(error.to_string())
            }
            CatalogError::Store(error) => {
                tracing::warn!(%error, "the store refused a catalog change");
                error.into()
            }
            CatalogError::Random(error) => {
                tracing::error!(%error, "no random bytes for a new key");
                GatewayError::Internal
            }
        }
    }
}

/// Why a reservation was refused, as the 402 reports it.
#[derive(Debug)]
pub struct Denial {
    pub exceeded: Exceeded,
    pub policy: Arc<OrgPolicy>,
    pub period: Period,
    /// The RateLimit headers of the refused cost's limited dimensions.
    pub rate_limit: Option<RateLimitHeaders>,
}

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The RateLimit headers of a metered answer, made by
/// [`crate::meter::headers`]. Kept here, beside the answers they go on, so
/// that both the 402 and the stack (on a forwarded answer) set them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitHeaders {
    /// `RateLimit-Policy`: each limited dimension's limit and period.
    pub policy: HeaderValue,
    /// `RateLimit`: each limited dimension's remaining amount and the
    /// seconds to its period's end.
    pub state: HeaderValue,
    /// Seconds to the end of the period, rounded up: a 402 on a period
    /// dimension's `Retry-After`.
    pub period_ends_in: u64,
}

impl RateLimitHeaders {
    /// Sets both headers, replacing any an upstream sent under these names:
    /// on a metered route the gateway's quota is the one they describe.
    /// Moved, not cloned: a clone of a value made once costs an allocation.
    pub fn set_on(self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_POLICY, self.policy);
        headers.insert(RATELIMIT, self.state);
    }

    /// Removes what an upstream sent under these names, for a metered
    /// answer whose counters the gateway does not know (mode `off`, the
    /// store failed): a client must not read an upstream's figures as its
    /// quota.
    pub fn clear(headers: &mut HeaderMap) {
        headers.remove(RATELIMIT_POLICY);
        headers.remove(RATELIMIT);
    }
}

impl GatewayError {
    /// How `tollgate_requests_total` counts a request answered with this.
    pub fn outcome(&self) -> Outcome {
        match self {
            GatewayError::NoRoute | GatewayError::NoEndpoint | GatewayError::NotFound(_) => {
                Outcome::NotFound
            }
            // The admin API's own answers; no proxy request ends in them.
            GatewayError::MethodNotAllowed(_)
            | GatewayError::ConfigRejected(_)
            | GatewayError::ReloadUnavailable
            | GatewayError::UsagePageOff => Outcome::BadRequest,
            GatewayError::AdminUnauthorized
            | GatewayError::LinkRefused(_)
            | GatewayError::Unauthenticated
            | GatewayError::InvalidToken(_)
            | GatewayError::UnknownApiKey => Outcome::Unauthorized,
            GatewayError::Target(_)
            | GatewayError::InvalidOrgId
            | GatewayError::DuplicateHeader(_)
            | GatewayError::InvalidBody(_)
            | GatewayError::ClientBody
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::BodyTimeout
            | GatewayError::PlainHttpOnTlsPort => Outcome::BadRequest,
            GatewayError::QuotaExceeded(_) => Outcome::Denied,
            GatewayError::StoreUnavailable => Outcome::StoreUnavailable,
            // The gateway's own 500 counts with the upstream's failures: in
            // both, a request that was let in could not go on.
            GatewayError::UpstreamUnreachable
            | GatewayError::UpstreamTimeout
            | GatewayError::Internal => Outcome::UpstreamError,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NoRoute | GatewayError::NoEndpoint | GatewayError::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::ConfigRejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
            GatewayError::ReloadUnavailable | GatewayError::UsagePageOff => StatusCode::CONFLICT,
            GatewayError::LinkRefused(_) => StatusCode::FORBIDDEN,
            GatewayError::AdminUnauthorized
            | GatewayError::Unauthenticated
            | GatewayError::InvalidToken(_)
            | GatewayError::UnknownApiKey => StatusCode::UNAUTHORIZED,
            GatewayError::Target(_)
            | GatewayError::InvalidOrgId
            | GatewayError::DuplicateHeader(_)
            | GatewayError::InvalidBody(_)
            | GatewayError::ClientBody
            | GatewayError::PlainHttpOnTlsPort => StatusCode::BAD_REQUEST,
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::QuotaExceeded(_) => StatusCode::PAYMENT_REQUIRED,
            GatewayError::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::NoRoute | GatewayError::NoEndpoint | GatewayError::NotFound(_) => {
                "NOT_FOUND"
            }
            GatewayError::MethodNotAllowed(_) => "METHOD_NOT_ALLOWED",
            GatewayError::ConfigRejected(_) => "CONFIG_INVALID",
            GatewayError::ReloadUnavailable => "RELOAD_UNAVAILABLE",
            GatewayError::PlainHttpOnTlsPort => "PLAIN_HTTP_ON_TLS_PORT",
            GatewayError::UsagePageOff => "USAGE_PAGE_OFF",
            GatewayError::LinkRefused(LinkRefused::Invalid) => "LINK_INVALID",
            GatewayError::LinkRefused(LinkRefused::Expired) => "LINK_EXPIRED",
            GatewayError::Target(TargetError::Path(PathError::Ambiguous(_))) => "AMBIGUOUS_PATH",
            GatewayError::Target(TargetError::Path(PathError::BadEscape))
            | GatewayError::Target(TargetError::Unforwardable) => "INVALID_PATH",
            GatewayError::Target(TargetError::MethodCase(_)) => "INVALID_METHOD",
            GatewayError::AdminUnauthorized
            | GatewayError::Unauthenticated
            | GatewayError::InvalidToken(_)
            | GatewayError::UnknownApiKey => "UNAUTHORIZED",
            GatewayError::InvalidOrgId => "INVALID_ORG_ID",
            GatewayError::DuplicateHeader(_) => "DUPLICATE_HEADER",
            GatewayError::BodyTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            GatewayError::InvalidBody(_) => "INVALID_BODY",
            GatewayError::ClientBody => "BAD_REQUEST",
            GatewayError::BodyTimeout => "REQUEST_TIMEOUT",
            GatewayError::QuotaExceeded(_) => "QUOTA_EXCEEDED",
            GatewayError::StoreUnavailable => "QUOTA_STORE_UNAVAILABLE",
            GatewayError::UpstreamUnreachable => "BAD_GATEWAY",
            GatewayError::UpstreamTimeout => "GATEWAY_TIMEOUT",
            GatewayError::Internal => "INTERNAL_ERROR",
        }
    }

    /// The envelope's `error` object, as a 402 (or any other answer)
    /// carries it; the admin's dry run shows the same.
    pub fn error_object(&self) -> serde_json::Value {
        serde_json::to_value(self.error_body()).unwrap_or(serde_json::Value::Null)
    }

    fn error_body(&self) -> ErrorBody<'_> {
        let details = match self {
            GatewayError::QuotaExceeded(denial) => {
                Some(Details::Quota(QuotaDetails::from(denial.as_ref())))
            }
            GatewayError::ConfigRejected(errors) => Some(Details::Config { errors }),
            _ => None,
        };
        ErrorBody {
            code: self.code(),
            message: self.to_string(),
            details,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let json = match &self {
            GatewayError::QuotaExceeded(denial) => quota_envelope(denial),
            _ => {
                let envelope = Envelope {
                    success: false,
                    error: self.error_body(),
                };
                // Serializing these plain structs cannot fail; the fallback
                // keeps the request path free of panics all the same.
                serde_json::to_vec(&envelope).unwrap_or_else(|_| {
                    br#"{"success":false,"error":{"code":"INTERNAL_ERROR"}}"#.to_vec()
                })
            }
        };
        let mut response = Response::new(crate::full_body(Bytes::from(json)));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            GatewayError::QuotaExceeded(denial) => denial_headers(*denial, headers),
            // The store is usually back within a second (a restart, a
            // failover); a client waiting longer would only wait.
            GatewayError::StoreUnavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            GatewayError::MethodNotAllowed(allowed) => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allowed));
            }
            _ => {}
        }
        response
    }
}

/// A 402's RateLimit headers and, when a period dimension refused it,
/// `Retry-After`: that quota comes back when the period ends. A gauge's
/// (seats) comes back only when a seat is released, at no time the
/// gateway can tell.
fn denial_headers(denial: Denial, headers: &mut HeaderMap) {
    let Some(rate_limit) = denial.rate_limit else {
        return;
    };
    let period_ends_in = rate_limit.period_ends_in;
    rate_limit.set_on(headers);
    if !denial.exceeded.dimension.is_gauge() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(period_ends_in));
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    success: bool,
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Details<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Details<'a> {
    Quota(QuotaDetails),
    /// A reload's every problem, one line each, with file, line and key.
    Config {
        errors: &'a [String],
    },
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct QuotaDetails {
    r#type: &'static str,
    quota_type: &'static str,
    current_usage: i64,
    limit: i64,
    requested: i64,
    billing_status: Arc<str>,
    plan_slug: Arc<str>,
    period_start: String,
    period_end: String,
}

/// The 402's envelope, the same JSON serde writes of [`Envelope`] (a test
/// holds the two equal), written by hand: a client past its limit hammers
/// this path, and the derived serializer costs some 8,000 instructions a
/// body (callgrind), this about a quarter of it.
fn quota_envelope(denial: &Denial) -> Vec<u8> {
    let Denial {
        exceeded, policy, ..
    } = denial;
    let mut out = Vec::with_capacity(400);
    let mut numbers = itoa::Buffer::new();
    let string = |out: &mut Vec<u8>, text: &str| {
        // A string always serializes; escaped as serde_json escapes it.
        let _ = serde_json::to_writer(&mut *out, text);
    };
    out.extend_from_slice(br#"{"success":false,"error":{"code":"QUOTA_EXCEEDED","message":"#);
    string(&mut out, &exceeded.message());
    out.extend_from_slice(br#","details":{"type":"quota_exceeded","quotaType":"#);
    string(&mut out, exceeded.dimension.as_str());
    for (key, value) in [
        (&br#","currentUsage":"#[..], exceeded.current),
        (br#","limit":"#, exceeded.limit),
        (br#","requested":"#, exceeded.requested),
    ] {
        out.extend_from_slice(key);
        out.extend_from_slice(numbers.format(value).as_bytes());
    }
    out.extend_from_slice(br#","billingStatus":"#);
    string(&mut out, &policy.billing_status);
    out.extend_from_slice(br#","planSlug":"#);
    string(&mut out, &policy.plan);
    out.extend_from_slice(br#","periodStart":"#);
    string(&mut out, &rfc3339(denial.period.start));
    out.extend_from_slice(br#","periodEnd":"#);
    string(&mut out, &rfc3339(denial.period.end));
    out.extend_from_slice(b"}}}");
    out
}

impl From<&Denial> for QuotaDetails {
    fn from(denial: &Denial) -> QuotaDetails {
        QuotaDetails {
            r#type: "quota_exceeded",
            quota_type: denial.exceeded.dimension.as_str(),
            current_usage: denial.exceeded.current,
            limit: denial.exceeded.limit,
            requested: denial.exceeded.requested,
            billing_status: denial.policy.billing_status.clone(),
            plan_slug: denial.policy.plan.clone(),
            period_start: rfc3339(denial.period.start),
            period_end: rfc3339(denial.period.end),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::{Dimension, Limits, Mode};
    use http_body_util::BodyExt;

    /// A 402 of org plan `plan` (anchored on the 1st, in November 2026) for
    /// `exceeded`.
    fn quota_exceeded(plan: &str, billing_status: &str, exceeded: Exceeded) -> GatewayError {
        let policy = Arc::new(OrgPolicy {
            plan: plan.into(),
            billing_status: billing_status.into(),
            period_anchor_day: 1,
            mode: Mode::Enforce,
            limits: Limits::UNLIMITED,
        });
        GatewayError::QuotaExceeded(Box::new(Denial {
            exceeded,
            period: policy.period("2026-11-27T20:46:00Z".parse().unwrap()),
            policy,
            rate_limit: None,
        }))
    }

    async fn json(error: GatewayError) -> (StatusCode, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn the_402_body_is_exactly_the_documented_shape() {
        let denial = quota_exceeded(
            "free",
            "active",
            Exceeded {
                dimension: Dimension::Tokens,
                current: 95000,
                limit: 100000,
                requested: 10000,
            },
        );
        let (status, body) = json(denial).await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(
            body,
            serde_json::json!({
              "success": false,
              "error": {
                "code": "QUOTA_EXCEEDED",
                "message": "Token quota exceeded: 95000 of 100000 used this period, 10000 requested",
                "details": {
                  "type": "quota_exceeded",
                  "quotaType": "tokens",
                  "currentUsage": 95000,
                  "limit": 100000,
                  "requested": 10000,
                  "billingStatus": "active",
                  "planSlug": "free",
                  "periodStart": "2026-11-01T00:00:00Z",
                  "periodEnd": "2026-12-01T00:00:00Z"
                }
              }
            })
        );
    }

    #[test]
    fn the_hand_written_402_is_what_serde_writes_even_for_names_to_escape() {
        for (plan, status) in [("free", "active"), ("pro \"2\"\\", "past_due\n\u{1}ü")] {
            let seats = Exceeded {
                dimension: Dimension::Seats,
                current: 3,
                limit: 3,
                requested: 1,
            };
            let denial = quota_exceeded(plan, status, seats);
            let GatewayError::QuotaExceeded(quota) = &denial else {
                unreachable!()
            };
            let by_hand = quota_envelope(quota);
            let by_serde = serde_json::to_vec(&Envelope {
                success: false,
                error: denial.error_body(),
            })
            .unwrap();
            assert_eq!(
                String::from_utf8(by_hand).unwrap(),
                String::from_utf8(by_serde).unwrap()
            );
        }
    }

    #[tokio::test]
    async fn other_errors_share_the_envelope_without_details() {
        let (status, body) = json(GatewayError::UpstreamTimeout).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            body,
            serde_json::json!({"success": false, "error": {"code": "GATEWAY_TIMEOUT", "message": "the upstream did not answer in time"}})
        );
    }

    #[test]
    fn each_answer_counts_as_the_outcome_its_status_names() {
        let tokens = Exceeded {
            dimension: Dimension::Tokens,
            current: 1,
            limit: 1,
            requested: 1,
        };
        let answers = [
            GatewayError::NoRoute,
            GatewayError::Target(TargetError::Unforwardable),
            GatewayError::Unauthenticated,
            GatewayError::InvalidToken("expired"),
            GatewayError::UnknownApiKey,
            GatewayError::DuplicateHeader(http::header::AUTHORIZATION),
            GatewayError::InvalidOrgId,
            GatewayError::BodyTooLarge { limit: 1 },
            GatewayError::InvalidBody("bad".into()),
            GatewayError::ClientBody,
            GatewayError::BodyTimeout,
            quota_exceeded("free", "active", tokens),
            GatewayError::StoreUnavailable,
            GatewayError::UpstreamUnreachable,
            GatewayError::UpstreamTimeout,
            GatewayError::Internal,
        ];
        for answer in answers {
            let expected = match answer.status().as_u16() {
                404 => Outcome::NotFound,
                400 | 408 | 413 => Outcome::BadRequest,
                401 => Outcome::Unauthorized,
                402 => Outcome::Denied,
                503 => Outcome::StoreUnavailable,
                500 | 502 | 504 => Outcome::UpstreamError,
                other => panic!("no outcome is documented for {other}"),
            };
            assert_eq!(answer.outcome(), expected, "{answer:?}");
        }
    }
}
