//! Every answer the gateway makes itself, and the one place each becomes an
//! HTTP response: the JSON envelope
//! `{"success": false, "error": {"code", "message", "details"?}}`.
//!
//! Messages speak to the caller and never carry internals (addresses, store
//! errors, panics); those go to the log.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use crate::Body;
use crate::accept::ClientFault;
use crate::metrics::Outcome;
use crate::org::OrgPolicy;
use crate::period::Period;
use crate::quota::Exceeded;
use crate::route::{PathError, TargetError};

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

/// Why a reservation was refused, as the 402 reports it.
#[derive(Debug)]
pub struct Denial {
    pub exceeded: Exceeded,
    pub policy: Arc<OrgPolicy>,
    pub period: Period,
}

impl GatewayError {
    /// How `tollgate_requests_total` counts a request answered with this.
    pub fn outcome(&self) -> Outcome {
        match self {
            GatewayError::NoRoute => Outcome::NotFound,
            GatewayError::Unauthenticated
            | GatewayError::InvalidToken(_)
            | GatewayError::UnknownApiKey => Outcome::Unauthorized,
            GatewayError::Target(_)
            | GatewayError::InvalidOrgId
            | GatewayError::DuplicateHeader(_)
            | GatewayError::InvalidBody(_)
            | GatewayError::ClientBody
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::BodyTimeout => Outcome::BadRequest,
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
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::Unauthenticated
            | GatewayError::InvalidToken(_)
            | GatewayError::UnknownApiKey => StatusCode::UNAUTHORIZED,
            GatewayError::Target(_)
            | GatewayError::InvalidOrgId
            | GatewayError::DuplicateHeader(_)
            | GatewayError::InvalidBody(_)
            | GatewayError::ClientBody => StatusCode::BAD_REQUEST,
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
            GatewayError::NoRoute => "NOT_FOUND",
            GatewayError::Target(TargetError::Path(PathError::Ambiguous(_))) => "AMBIGUOUS_PATH",
            GatewayError::Target(TargetError::Path(PathError::BadEscape))
            | GatewayError::Target(TargetError::Unforwardable) => "INVALID_PATH",
            GatewayError::Target(TargetError::MethodCase(_)) => "INVALID_METHOD",
            GatewayError::Unauthenticated
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

    pub fn into_response(self) -> Response<Body> {
        let details = match &self {
            GatewayError::QuotaExceeded(denial) => Some(QuotaDetails::from(denial.as_ref())),
            _ => None,
        };
        let envelope = Envelope {
            success: false,
            error: ErrorBody {
                code: self.code(),
                message: self.to_string(),
                details,
            },
        };
        // Serializing these plain structs cannot fail; the fallback keeps the
        // request path free of panics all the same.
        let json = serde_json::to_vec(&envelope)
            .unwrap_or_else(|_| br#"{"success":false,"error":{"code":"INTERNAL_ERROR"}}"#.to_vec());
        let mut response = Response::new(crate::full_body(Bytes::from(json)));
        *response.status_mut() = self.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

#[derive(Serialize)]
struct Envelope {
    success: bool,
    error: ErrorBody,
}

#[derive(Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<QuotaDetails>,
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

impl From<&Denial> for QuotaDetails {
    fn from(denial: &Denial) -> QuotaDetails {
        let rfc3339 =
            |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
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

    async fn json(error: GatewayError) -> (StatusCode, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn the_402_body_is_exactly_the_documented_shape() {
        let policy = Arc::new(OrgPolicy {
            plan: "free".into(),
            billing_status: "active".into(),
            period_anchor_day: 1,
            mode: Mode::Enforce,
            limits: Limits::UNLIMITED,
        });
        let denial = Denial {
            exceeded: Exceeded {
                dimension: Dimension::Tokens,
                current: 95000,
                limit: 100000,
                requested: 10000,
            },
            period: policy.period("2026-11-27T20:46:00Z".parse().unwrap()),
            policy,
        };
        let (status, body) = json(GatewayError::QuotaExceeded(Box::new(denial))).await;
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
        let policy = Arc::new(OrgPolicy {
            plan: "free".into(),
            billing_status: "active".into(),
            period_anchor_day: 1,
            mode: Mode::Enforce,
            limits: Limits::UNLIMITED,
        });
        let denial = Denial {
            exceeded: Exceeded {
                dimension: Dimension::Tokens,
                current: 1,
                limit: 1,
                requested: 1,
            },
            period: policy.period("2026-11-27T20:46:00Z".parse().unwrap()),
            policy,
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
            GatewayError::QuotaExceeded(Box::new(denial)),
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
