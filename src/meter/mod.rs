//! Step 4, metered routes only: read the body, price it, reserve the price.
//!
//! The body is buffered up to `max_body_bytes` (413 past it, before anything
//! is reserved or forwarded), the cost is the route's fixed amounts plus, on
//! estimate routes, the token estimate of the body ([`crate::llm`]), and one
//! atomic reservation covers every dimension of it. An estimate route's
//! `completion_bound` may write the bound into the body before it goes on,
//! and lower it (`fit`) to what the org has left. The store's answer also
//! gives the counters the reservation left, from which [`headers`] makes
//! the answer's RateLimit headers.

pub mod headers;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::Request;
use http_body::Body as _;
use std::pin::Pin;
use std::task::{Poll, ready};

use http::HeaderValue;

use crate::accept::ClientFault;
use crate::catalog::Catalog;
use crate::error::{Denial, GatewayError, RateLimitHeaders};
use crate::gathered::{Gathered, OverLimit};
use crate::ledger::{Ledger, PendingReservation, Reservation};
use crate::llm::estimate::{self, Estimate, EstimateError};
use crate::llm::request::{self, StreamUsage};
use crate::llm::{Api, CompletionBound, Reading};
use crate::metrics::StoreOp;
use crate::org::{OrgId, OrgPolicy};
use crate::period::{Period, PeriodCache};
use crate::quota::{Amounts, Decided, Decision, Dimension, Exceeded, Mode};
use crate::route::{Cost, Route};
use crate::store::{OnStoreError, ReservationId, ReserveRequest, StoreError};
use crate::{Body, full_body};

/// The source of "now" for billing periods; tests substitute their own.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

pub struct Meter {
    pub(crate) ledger: Ledger,
    /// The worker's last `RateLimit-Policy` value.
    pub(crate) rate_limit_policies: headers::PolicyCache,
    /// The worker's last billing period.
    pub(crate) periods: PeriodCache,
    /// Where org policies come from: the config's orgs, with the runtime
    /// ones over them.
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) max_body_bytes: u64,
    pub(crate) body_read_timeout: Duration,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) clock: Clock,
}

/// How a metered request may go on to the upstream.
pub struct Admitted {
    /// The body was read whole, as every counted request's is: no part of
    /// it waits on the client any more.
    pub body_in_hand: bool,
    /// `None` when nothing was counted: mode `off`, or the store failed and
    /// `on_error = "allow"` let the request through. With `on_error =
    /// "defer"`, a deferred reservation.
    pub reservation: Option<Reservation>,
    /// Shadow mode: the limit this request went past.
    pub over: Option<Exceeded>,
    /// Estimate routes: how to read the response for the usage to reconcile.
    pub reading: Option<Reading>,
    /// The RateLimit headers for the answer; `None` when no counters are
    /// known (with `reservation` `None`, or deferred) or no dimension of
    /// the cost has a limit.
    pub rate_limit: Option<RateLimitHeaders>,
    /// Forwarded uncounted because the store failed (`on_error = "allow"`).
    pub fail_open: bool,
}

impl Admitted {
    /// Forwarded with nothing counted.
    fn uncounted() -> Admitted {
        Admitted {
            body_in_hand: false,
            reservation: None,
            over: None,
            reading: None,
            rate_limit: None,
            fail_open: false,
        }
    }
}

/// Who pays for one request, on which route, in which period.
struct Charge<'a> {
    route: &'a Route,
    org: OrgId,
    policy: Arc<OrgPolicy>,
    period: Period,
    /// The meter's clock when the request was priced: the period's and
    /// the RateLimit headers' "now".
    now: DateTime<Utc>,
}

/// Gives back what a reservation took, for a request that cannot go on
/// after all.
fn give_back(pending: PendingReservation, decided: Result<Decided, StoreError>) {
    if let Ok(Decided {
        decision: Decision::Admit { applied, .. },
        ..
    }) = decided
    {
        pending.admitted(applied).refund();
    }
}

/// How many times a `fit` route lowers its bound to what is left.
const FIT_ATTEMPTS: usize = 3;

impl Meter {
    /// Admits `request`, its body read and put back whole (and, on an
    /// estimate route, maybe rewritten) in place: the request stays where
    /// the caller holds it rather than be moved through every step and
    /// back.
    ///
    /// Not an `async fn`, nor is `read_body`: one would keep its arguments
    /// twice in its future, and copy them once more.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future"
    )]
    pub fn admit(
        &self,
        route: &Route,
        cost: &Cost,
        org: OrgId,
        request: &mut Request<Body>,
    ) -> impl Future<Output = Result<Admitted, GatewayError>> {
        async move {
            let policy = self.catalog.policy(&org);
            if policy.mode == Mode::Off {
                return Ok(Admitted::uncounted());
            }
            let body = self.read_body(request).await?;
            let now = (self.clock)();
            let charge = Charge {
                route,
                org,
                period: self.periods.containing(now, policy.period_anchor_day),
                policy,
                now,
            };
            if cost.estimate_tokens {
                return self.admit_estimated(charge, cost, request, body).await;
            }
            let (pending, decided) = self.reserve(&charge, cost.fixed).await;
            // An empty body goes on unallocated (a boxed `Empty` takes no room).
            if !body.is_empty() {
                *request.body_mut() = full_body(body);
            }
            self.conclude(&charge, pending, decided, None)
        }
    }

    /// The request's whole body, read within the body's time and taken out
    /// of it (an empty one is left in its place). A body already at its
    /// end, as most fixed-cost calls have, has nothing to wait on: skipping
    /// the timer and the collecting saves some 500 instructions a request
    /// (callgrind).
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future"
    )]
    fn read_body(
        &self,
        request: &mut Request<Body>,
    ) -> impl Future<Output = Result<Bytes, GatewayError>> {
        async move {
            let body = std::mem::take(request.body_mut());
            if body.is_end_stream() {
                return Ok(Bytes::new());
            }
            tokio::time::timeout(self.body_read_timeout, self.buffer(request.headers(), body))
                .await
                .map_err(|_| {
                    self.ledger.metrics.client_body_failed(ClientFault::Late);
                    GatewayError::from(ClientFault::Late)
                })?
        }
    }

    /// An estimate route: the body is priced, and may be rewritten, before
    /// it is reserved and forwarded.
    async fn admit_estimated(
        &self,
        charge: Charge<'_>,
        cost: &Cost,
        request: &mut Request<Body>,
        body: Bytes,
    ) -> Result<Admitted, GatewayError> {
        let route = charge.route;
        let api = Api::of_path(request.uri().path());
        let invalid = |e: EstimateError| GatewayError::InvalidBody(e.to_string());
        let scan = estimate::scan(api, &body, &route.estimate).map_err(invalid)?;
        let mut estimate = scan.estimate;
        // Parsed into a tree only if the gateway writes into it.
        let mut json = request::Outgoing::new(&body);
        if route.completion_bound != CompletionBound::AsSent && !estimate.bound_named {
            json.set_completion_bound(api, estimate.completion_bound);
        }
        let stream_usage = json.ask_for_stream_usage(api, &scan);

        let (pending, decided) = self.reserve_estimate(&charge, cost, &estimate).await;
        let (pending, decided) = match (route.completion_bound, &decided) {
            (
                CompletionBound::Fit {
                    min_completion_tokens,
                },
                Ok(Decided {
                    decision: Decision::Deny(refused),
                    ..
                }),
            ) if api.bound_field().is_some() => {
                let refused = *refused;
                match self
                    .fit(&charge, cost, &mut estimate, min_completion_tokens, refused)
                    .await
                {
                    Some(attempt) => {
                        json.set_completion_bound(api, estimate.completion_bound);
                        attempt
                    }
                    None => (pending, decided),
                }
            }
            _ => (pending, decided),
        };

        let written = json.into_written();
        let body = match written {
            Ok(Some(bytes)) => {
                request
                    .headers_mut()
                    .insert(http::header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                Bytes::from(bytes)
            }
            Ok(None) => body,
            Err(error) => {
                tracing::error!(%error, "could not write a request body");
                give_back(pending, decided);
                return Err(GatewayError::Internal);
            }
        };
        // The usage must be readable: no compressed answers.
        request.headers_mut().insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let reading = Reading {
            hide_requested_usage: stream_usage == StreamUsage::Added,
        };
        *request.body_mut() = full_body(body);
        self.conclude(&charge, pending, decided, Some(reading))
    }

    /// Reserves the route's fixed amounts with `estimate`'s tokens added.
    async fn reserve_estimate(
        &self,
        charge: &Charge<'_>,
        cost: &Cost,
        estimate: &Estimate,
    ) -> (PendingReservation, Result<Decided, StoreError>) {
        let tokens = cost
            .fixed
            .get(Dimension::Tokens)
            .saturating_add(estimate.total());
        self.reserve(charge, cost.fixed.with(Dimension::Tokens, tokens))
            .await
    }

    /// A `fit` route was `refused`: lowers the estimate's bound to what the
    /// refusal says is left and tries again, while at least
    /// `min_completion_tokens` is. Each attempt is one atomic reservation,
    /// so the limit holds even when another request takes what was left in
    /// between; this one is then lowered again, or refused. Returns the last
    /// attempt; none when no lower bound fits, and the refusal stands.
    async fn fit(
        &self,
        charge: &Charge<'_>,
        cost: &Cost,
        estimate: &mut Estimate,
        min_completion_tokens: i64,
        mut refused: Exceeded,
    ) -> Option<(PendingReservation, Result<Decided, StoreError>)> {
        let fixed_tokens = cost.fixed.get(Dimension::Tokens);
        let mut last = None;
        for _ in 0..FIT_ATTEMPTS {
            let Some(bound) =
                request::fitted_bound(estimate, fixed_tokens, &refused, min_completion_tokens)
            else {
                break;
            };
            estimate.completion_bound = bound;
            let (pending, decided) = self.reserve_estimate(charge, cost, estimate).await;
            let again = match &decided {
                Ok(Decided {
                    decision: Decision::Deny(exceeded),
                    ..
                }) => Some(*exceeded),
                _ => None,
            };
            last = Some((pending, decided));
            match again {
                Some(exceeded) => refused = exceeded,
                None => break,
            }
        }
        last
    }

    /// Asks the store to reserve `amounts` for the charge's org.
    async fn reserve(
        &self,
        charge: &Charge<'_>,
        amounts: Amounts,
    ) -> (PendingReservation, Result<Decided, StoreError>) {
        let reserve = ReserveRequest {
            id: ReservationId::next(),
            org: charge.org.clone(),
            period: charge.period,
            limits: charge.policy.limits,
            cost: amounts,
            mode: charge.policy.mode,
        };
        let mut pending =
            PendingReservation::start(&self.ledger, reserve, charge.route.metrics.clone());
        let decided = pending.decision().await;
        (pending, decided)
    }

    /// The store's answer, as the request goes on or is refused.
    fn conclude(
        &self,
        charge: &Charge<'_>,
        pending: PendingReservation,
        decided: Result<Decided, StoreError>,
        reading: Option<Reading>,
    ) -> Result<Admitted, GatewayError> {
        let Charge { route, org, .. } = charge;
        let cost = pending.cost();
        let rate_limit = |counters: &Amounts| {
            let limits = &charge.policy.limits;
            headers::rate_limit(
                limits,
                &cost,
                counters,
                &charge.period,
                charge.now,
                &self.rate_limit_policies,
            )
        };
        match decided {
            Ok(Decided {
                decision: Decision::Admit { applied, over },
                counters,
            }) => {
                if let Some(over) = over {
                    tracing::info!(org = %org, route = %route.name, quota_type = %over.dimension, "shadow: quota exceeded, forwarded");
                }
                let rate_limit = rate_limit(&counters);
                Ok(Admitted {
                    body_in_hand: true,
                    reservation: Some(pending.admitted(applied)),
                    over,
                    reading,
                    rate_limit,
                    fail_open: false,
                })
            }
            Ok(Decided {
                decision: Decision::Deny(exceeded),
                counters,
            }) => {
                route.metrics.denied(exceeded.dimension);
                tracing::info!(org = %org, route = %route.name, quota_type = %exceeded.dimension, "quota exceeded");
                Err(GatewayError::QuotaExceeded(Box::new(Denial {
                    exceeded,
                    policy: charge.policy.clone(),
                    period: charge.period,
                    rate_limit: rate_limit(&counters),
                })))
            }
            Err(error) => {
                self.ledger.metrics.store_failed(StoreOp::Reserve, &error);
                self.store_failed(route, pending, reading)
            }
        }
    }

    /// The store did not answer: `store.on_error` (or the route's) decides.
    /// The `pending` reservation is refunded should the store apply it later.
    fn store_failed(
        &self,
        route: &Route,
        pending: PendingReservation,
        reading: Option<Reading>,
    ) -> Result<Admitted, GatewayError> {
        let deferred = match route.on_store_error.unwrap_or(self.on_store_error) {
            OnStoreError::Allow => {
                return Ok(Admitted {
                    body_in_hand: true,
                    fail_open: true,
                    ..Admitted::uncounted()
                });
            }
            OnStoreError::Deny => None,
            // A full outbox refuses the request rather than let it through
            // uncounted: "defer" never loses a charge it forwarded.
            OnStoreError::Defer => pending.defer(),
        };
        let Some(reservation) = deferred else {
            return Err(GatewayError::StoreUnavailable);
        };
        Ok(Admitted {
            body_in_hand: true,
            reservation: Some(reservation),
            over: None,
            reading,
            rate_limit: None,
            fail_open: false,
        })
    }

    /// Reads the whole body, refusing one over `max_body_bytes` before
    /// reading it when its declared length already says so.
    async fn buffer(
        &self,
        headers: &http::HeaderMap,
        mut body: Body,
    ) -> Result<Bytes, GatewayError> {
        let too_large = GatewayError::BodyTooLarge {
            limit: self.max_body_bytes,
        };
        let declared = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_body_bytes) {
            return Err(too_large);
        }
        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        let mut gathered = Gathered::default();
        let read = std::future::poll_fn(|cx| {
            while !body.is_end_stream() {
                match ready!(Pin::new(&mut body).poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        // Trailers of a metered request are not forwarded.
                        if let Ok(data) = frame.into_data() {
                            gathered.push(data, limit).map_err(|OverLimit| None)?;
                        }
                    }
                    Some(Err(error)) => return Poll::Ready(Err(Some(error))),
                    None => break,
                }
            }
            Poll::Ready(Ok(()))
        });
        read.await.map_err(|error| {
            let Some(error) = error else {
                return too_large;
            };
            let fault = ClientFault::of(&*error).unwrap_or(ClientFault::Unreadable);
            self.ledger.metrics.client_body_failed(fault);
            fault.into()
        })?;
        Ok(gathered.into_bytes())
    }
}
