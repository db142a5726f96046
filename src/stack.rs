//! The tower stack: cross-cutting layers from tower-http around the
//! [`Gateway`] service, which runs the steps of the request path in order.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{AUTHORIZATION, COOKIE, HeaderName, HeaderValue, PROXY_AUTHORIZATION};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use prometheus_client::metrics::histogram::Histogram;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::map_request_body::MapRequestBodyLayer;
use tower_http::map_response_body::MapResponseBodyLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

use crate::accept::{ClientAddr, HttpService, client_body};
use crate::error::GatewayError;
use crate::forward::{self, Forwarder};
use crate::identify::Identifier;
use crate::meter::{Admitted, Meter};
use crate::metrics::{Outcome, RouteMetrics};
use crate::org::OrgId;
use crate::quota::{Amounts, Dimension};
use crate::route::{Route, Router};
use crate::settle;
use crate::{Body, BoxError};

/// Response header naming the quota a shadow-mode request went past.
pub const SHADOW_EXCEEDED: HeaderName = HeaderName::from_static("x-tollgate-shadow-exceeded");

/// Wraps the gateway in its layers, outermost first; a request body that
/// sends nothing for `body_read_timeout` is cut.
pub fn build(gateway: Gateway, body_read_timeout: Duration) -> HttpService {
    let stack = ServiceBuilder::new()
        // One body type leaves the stack, whatever the layers below wrap it in.
        .layer(MapResponseBodyLayer::new(|body| {
            Body::new(BodyExt::map_err(body, Into::<BoxError>::into))
        }))
        // Credentials are marked sensitive before anything can log them.
        .layer(SetSensitiveRequestHeadersLayer::new([
            AUTHORIZATION,
            PROXY_AUTHORIZATION,
            COOKIE,
            HeaderName::from_static("x-api-key"),
        ]))
        // Tracing sits outside everything that can fail, so every answer,
        // including a caught panic, is traced with its status and latency.
        // Failures (5xx) are traced at debug like the rest: the steps that
        // fail log them once per cause, and a store outage must not turn
        // into an error line per request.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(Level::DEBUG)))
        // A panic becomes the gateway's 500 envelope rather than a dropped
        // connection (and a reservation it held stands, as for a client gone).
        .layer(CatchPanicLayer::custom(|_panic| {
            GatewayError::Internal.into_response()
        }))
        // The steps see one request body type: the client's, boxed.
        .layer(MapRequestBodyLayer::new(move |body| {
            client_body(body, body_read_timeout)
        }))
        .service(gateway);
    BoxCloneSyncService::new(stack)
}

/// The request path: route, identify, meter, forward, settle.
#[derive(Clone)]
pub struct Gateway {
    steps: Arc<Steps>,
}

struct Steps {
    router: Router,
    identifier: Identifier,
    meter: Meter,
    forwarder: Forwarder,
    observer: Observer,
}

/// What the gateway records of each request, built with the other
/// per-config parts so that a reload changes it with them.
pub struct Observer {
    /// The counters of requests that matched no route (`route=""`).
    pub unrouted: RouteMetrics,
    /// Time to the response headers, by upstream (the config's order).
    pub upstreams: Vec<Histogram>,
    /// `server.access_log`: one line per request.
    pub access_log: bool,
}

/// What one request came to, as far as the steps got: its outcome is
/// counted, and its access line written, from this.
struct Trail<'s> {
    route: Option<&'s Route>,
    /// How a request that the upstream answered counts.
    forwarded_as: Outcome,
    /// The org and the amounts reserved, kept for the access log only.
    org: Option<OrgId>,
    reserved: Option<Amounts>,
    /// Time to the upstream's response headers.
    upstream: Option<Duration>,
}

impl Gateway {
    pub fn new(
        router: Router,
        identifier: Identifier,
        meter: Meter,
        forwarder: Forwarder,
        observer: Observer,
    ) -> Gateway {
        Gateway {
            steps: Arc::new(Steps {
                router,
                identifier,
                meter,
                forwarder,
                observer,
            }),
        }
    }
}

impl Steps {
    async fn handle<'s>(
        &'s self,
        mut request: Request<Body>,
        trail: &mut Trail<'s>,
    ) -> Result<Response<Body>, GatewayError> {
        let client = request.extensions_mut().remove::<ClientAddr>();
        // First, so that no header the client names in `Connection` can take
        // away one the gateway sets later: the org header, X-Forwarded-*, an
        // upstream's `headers`.
        forward::remove_hop_by_hop(request.headers_mut());
        let peer = client.as_ref().map(|c| c.ip);
        let route = self
            .router
            .route(&mut request)?
            .ok_or(GatewayError::NoRoute)?;
        trail.route = Some(route);

        let Some(cost) = &route.cost else {
            self.identifier
                .pass_unmetered(request.headers_mut(), peer)?;
            return self.forward(route, request, client, trail).await;
        };

        let org = self.identifier.identify(request.headers_mut(), peer)?;
        if self.observer.access_log {
            trail.org = Some(org.clone());
        }
        let admitted = self.meter.admit(route, cost, org, request).await?;
        trail.admitted(&admitted, self.observer.access_log);
        let forwarded = self.forward(route, admitted.request, client, trail).await;

        let mut response =
            settle::settle(route, admitted.reservation, admitted.reading, forwarded)?;
        if let Some(over) = admitted.over {
            response.headers_mut().insert(
                SHADOW_EXCEEDED,
                HeaderValue::from_static(over.dimension.as_str()),
            );
        }
        Ok(response)
    }

    /// Forwards `request`, timing the upstream to its response headers.
    async fn forward(
        &self,
        route: &Route,
        request: Request<Body>,
        client: Option<ClientAddr>,
        trail: &mut Trail<'_>,
    ) -> Result<Response<Body>, GatewayError> {
        let started = Instant::now();
        let forwarded = self
            .forwarder
            .forward(route.upstream, request, client)
            .await;
        if forwarded.is_ok() {
            let took = started.elapsed();
            if let Some(histogram) = self.observer.upstreams.get(route.upstream) {
                histogram.observe(took.as_secs_f64());
            }
            trail.upstream = Some(took);
        }
        forwarded
    }

    /// The answer for the client, counted (and logged) by its outcome: the
    /// one place where the gateway's own errors become responses.
    fn answer(
        &self,
        answered: Result<Response<Body>, GatewayError>,
        trail: &Trail<'_>,
    ) -> Response<Body> {
        let outcome = match &answered {
            Ok(_) => trail.forwarded_as,
            Err(error) => error.outcome(),
        };
        let counters = trail.route.map_or(&self.observer.unrouted, |r| &r.metrics);
        counters.counted(outcome);
        let response = answered.unwrap_or_else(GatewayError::into_response);
        if self.observer.access_log {
            trail.log(response.status());
        }
        response
    }
}

impl<'s> Trail<'s> {
    fn new() -> Trail<'s> {
        Trail {
            route: None,
            forwarded_as: Outcome::Forwarded,
            org: None,
            reserved: None,
            upstream: None,
        }
    }

    /// Notes how the meter let the request in.
    fn admitted(&mut self, admitted: &Admitted, access_log: bool) {
        if admitted.over.is_some() {
            self.forwarded_as = Outcome::ShadowExceeded;
        } else if admitted.fail_open {
            self.forwarded_as = Outcome::FailOpen;
        }
        if access_log {
            self.reserved = admitted.reservation.as_ref().map(|r| r.applied());
        }
    }

    /// Writes the request's access line; an amount not reserved, or an
    /// upstream that never answered, leaves its field out.
    fn log(&self, status: StatusCode) {
        let reserved = |dimension| {
            self.reserved
                .map(|amounts| amounts.get(dimension))
                .filter(|&amount| amount != 0)
        };
        tracing::info!(
            target: "tollgate::access",
            route = self.route.map_or("", |r| &*r.name),
            org = self.org.as_ref().map(OrgId::as_str),
            status = status.as_u16(),
            cost.tokens = reserved(Dimension::Tokens),
            cost.playbook_runs = reserved(Dimension::PlaybookRuns),
            cost.seats = reserved(Dimension::Seats),
            upstream_ms = self.upstream.map(|took| took.as_secs_f64() * 1000.0),
            "request"
        );
    }
}

impl Service<Request<Body>> for Gateway {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let gateway = self.clone();
        Box::pin(async move {
            let steps = &*gateway.steps;
            let mut trail = Trail::new();
            let answered = steps.handle(request, &mut trail).await;
            Ok(steps.answer(answered, &trail))
        })
    }
}
