//! Step 4, metered routes only: read the body, price it, reserve the price.
//!
//! The body is buffered up to `max_body_bytes` (413 past it, before anything
//! is reserved or forwarded), the cost is the route's fixed amounts plus, on
//! estimate routes, the token [`estimate`] of the body, and one atomic
//! reservation covers every dimension of it.

pub mod estimate;
pub mod json;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::Request;
use http_body_util::{BodyExt, Collected, LengthLimitError, Limited};
use std::future::Future;
use std::pin::Pin;

use crate::config::{Cost, OnStoreError, Route};
use crate::error::{Denial, GatewayError};
use crate::metrics::Metrics;
use crate::org::{OrgDirectory, OrgId};
use crate::quota::{Decision, Dimension, Exceeded, Mode};
use crate::settle::tap::UsageReading;
use crate::settle::{Ledger, PendingReservation, Reservation};
use crate::store::{ReservationId, ReserveRequest};
use crate::{Body, BoxError, full_body};
use estimate::StreamUsage;

/// The source of "now" for billing periods; tests substitute their own.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

pub struct Meter {
    pub(crate) ledger: Ledger,
    pub(crate) orgs: OrgDirectory,
    pub(crate) max_body_bytes: u64,
    pub(crate) body_read_timeout: Duration,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) clock: Clock,
}

/// A metered request that may go on to the upstream.
pub struct Admitted {
    pub request: Request<Body>,
    /// `None` when nothing was counted: mode `off`, or the store failed and
    /// `on_error = "allow"` let the request through.
    pub reservation: Option<Reservation>,
    /// Shadow mode: the limit this request went past.
    pub over: Option<Exceeded>,
    /// Estimate routes: how to read the response for the usage to reconcile.
    pub reading: Option<UsageReading>,
}

impl Meter {
    pub async fn admit(
        &self,
        route: &Route,
        cost: &Cost,
        org: OrgId,
        request: Request<Body>,
    ) -> Result<Admitted, GatewayError> {
        let policy = self.orgs.policy(&org).clone();
        if policy.mode == Mode::Off {
            return Ok(Admitted {
                request,
                reservation: None,
                over: None,
                reading: None,
            });
        }
        let (request, body) = tokio::time::timeout(self.body_read_timeout, self.buffer(request))
            .await
            .map_err(|_| GatewayError::BodyTimeout)??;

        let mut amounts = cost.fixed;
        let mut reading = None;
        let (mut request, mut body) = (request, body);
        if cost.estimate_tokens {
            let path = request.uri().path();
            let mut json =
                estimate::parse(&body).map_err(|e| GatewayError::InvalidBody(e.to_string()))?;
            let estimate = estimate::estimate(path, &json, route.default_max_tokens);
            amounts.set(
                Dimension::Tokens,
                amounts
                    .get(Dimension::Tokens)
                    .saturating_add(estimate.total()),
            );
            let stream_usage = estimate::request_stream_usage(path, &mut json);
            if stream_usage == StreamUsage::Added {
                let rewritten = serde_json::to_vec(&json)
                    .map_err(|e| GatewayError::InvalidBody(e.to_string()))?;
                body = Bytes::from(rewritten);
                request.headers_mut().insert(
                    http::header::CONTENT_LENGTH,
                    http::HeaderValue::from(body.len()),
                );
            }
            // The usage must be readable: no compressed answers.
            request.headers_mut().insert(
                http::header::ACCEPT_ENCODING,
                http::HeaderValue::from_static("identity"),
            );
            reading = Some(UsageReading {
                hide_requested_usage: stream_usage == StreamUsage::Added,
            });
        }
        let request = request.map(|()| full_body(body));

        let period = policy.period((self.clock)());
        let reserve = ReserveRequest {
            id: ReservationId::next(),
            org: org.clone(),
            period,
            limits: policy.limits,
            cost: amounts,
            mode: policy.mode,
        };
        let mut pending = PendingReservation::start(&self.ledger, reserve);
        let decided = pending.decision().await;
        match decided {
            Ok(Decision::Admit { applied, over }) => {
                if let Some(over) = over {
                    Metrics::count(&self.ledger.metrics.shadow_exceeded);
                    tracing::info!(org = %org, route = %route.name, quota_type = %over.dimension, "shadow: quota exceeded, forwarded");
                }
                let reservation = pending.admitted(applied);
                Ok(Admitted {
                    request,
                    reservation: Some(reservation),
                    over,
                    reading,
                })
            }
            Ok(Decision::Deny(exceeded)) => {
                Metrics::count(&self.ledger.metrics.quota_denials);
                tracing::info!(org = %org, route = %route.name, quota_type = %exceeded.dimension, "quota exceeded");
                Err(GatewayError::QuotaExceeded(Box::new(Denial {
                    exceeded,
                    policy,
                    period,
                })))
            }
            Err(error) => self.store_failed(route, request, &error),
        }
    }

    fn store_failed(
        &self,
        route: &Route,
        request: Request<Body>,
        error: &dyn std::error::Error,
    ) -> Result<Admitted, GatewayError> {
        self.ledger.metrics.store_failed("reserve", &error);
        match route.on_store_error.unwrap_or(self.on_store_error) {
            OnStoreError::Allow => {
                Metrics::count(&self.ledger.metrics.fail_open_passes);
                Ok(Admitted {
                    request,
                    reservation: None,
                    over: None,
                    reading: None,
                })
            }
            OnStoreError::Deny => {
                Metrics::count(&self.ledger.metrics.fail_closed_denials);
                Err(GatewayError::StoreUnavailable)
            }
        }
    }

    /// Reads the whole body, refusing one over `max_body_bytes` before
    /// reading it when its declared length already says so.
    async fn buffer(&self, request: Request<Body>) -> Result<(Request<()>, Bytes), GatewayError> {
        let too_large = GatewayError::BodyTooLarge {
            limit: self.max_body_bytes,
        };
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_body_bytes) {
            return Err(too_large);
        }
        let (head, body) = request.into_parts();
        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        // Boxed with its Send bound spelled out: rustc cannot otherwise prove
        // the enclosing future Send across `Limited`'s error conversion.
        let collecting: Pin<Box<dyn Future<Output = Result<Collected<Bytes>, BoxError>> + Send>> =
            Box::pin(Limited::new(body, limit).collect());
        let collected = collecting.await.map_err(|error| {
            if error.downcast_ref::<LengthLimitError>().is_some() {
                too_large
            } else {
                GatewayError::ClientBody
            }
        })?;
        Ok((Request::from_parts(head, ()), collected.to_bytes()))
    }
}
