//! The tower stack: cross-cutting layers from tower-http around the
//! [`Gateway`] service, which runs the steps of the request path in order.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{AUTHORIZATION, COOKIE, HeaderName, HeaderValue, PROXY_AUTHORIZATION};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus_client::metrics::histogram::Histogram;
use tower::{Service, ServiceBuilder};
use tower_http::map_response_body::MapResponseBodyLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

use arc_swap::ArcSwap;

use crate::accept::{ClientAddr, HttpFuture, HttpService, client_body};
use crate::config::Config;
use crate::error::{GatewayError, RateLimitHeaders};
use crate::forward::{self, Forwarder, Upload};
use crate::identify::{Identifier, X_API_KEY};
use crate::live::Live;
use crate::meter::{Admitted, Meter};
use crate::metrics::{Outcome, RouteMetrics};
use crate::org::OrgId;
use crate::quota::{Amounts, Dimension};
use crate::route::{Route, Router};
use crate::settle;
use crate::usage_page::UsagePage;
use crate::{Body, BoxError};

/// Response header naming the quota a shadow-mode request went past.
pub const SHADOW_EXCEEDED: HeaderName = HeaderName::from_static("x-tollgate-shadow-exceeded");

/// Wraps the gateway in its layers, outermost first. None of them depends
/// on the config, so a reload rebuilds only the gateway's steps.
pub fn build(gateway: Gateway) -> HttpService {
    // Innermost, the gateway catches its own panics (see [`Caught`]): a
    // panic becomes the gateway's 500 envelope rather than a dropped
    // connection (and a reservation it held stands, as for a client gone).
    //
    // Tracing sits outside everything that can fail, so every answer,
    // including a caught panic, is traced with its status and latency.
    // Failures (5xx) are traced at debug like the rest: the steps that fail
    // log them once per cause, and a store outage must not turn into an
    // error line per request. The layer is left out when the subscriber
    // takes nothing of it (the default `info`): it reads the clock twice a
    // request and builds a span, some 500 instructions (callgrind) for
    // nothing.
    if !tracing::enabled!(target: "tower_http::trace::on_response", Level::DEBUG) {
        return HttpService::new(move |request, client| gateway.answer(request, Some(client)));
    }
    let traced = ServiceBuilder::new()
        // It leaves with the one body type of the stack.
        .layer(MapResponseBodyLayer::new(boxed))
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(Level::DEBUG)))
        .service(gateway);
    HttpService::new(move |mut request, client| {
        // A tower service takes the request alone: here the client's
        // address rides in its extensions, for the gateway to take out.
        request.extensions_mut().insert(client);
        // Every layer is ready whenever the gateway is, which is always.
        let answered = traced.clone().call(request);
        Box::pin(async move {
            match answered.await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        })
    })
}

/// Marks the credential headers sensitive, before anything can log them,
/// and so that an HTTP/2 upstream never indexes them in HPACK. One pass
/// over the headers: tower-http's `SetSensitiveRequestHeadersLayer` looks
/// each name up with the entry API, some 900 instructions a request
/// (callgrind), where this costs a tenth of it.
fn mark_credentials_sensitive(headers: &mut http::HeaderMap) {
    for (name, value) in headers.iter_mut() {
        if *name == AUTHORIZATION
            || *name == PROXY_AUTHORIZATION
            || *name == COOKIE
            || *name == X_API_KEY
        {
            value.set_sensitive(true);
        }
    }
}

/// A response body of any layer's type as the stack's one body type.
fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Body::new(BodyExt::map_err(body, Into::<BoxError>::into))
}

/// The request path: route, identify, meter, forward, settle, on the steps
/// built from the config snapshot that is current when a request starts.
#[derive(Clone)]
pub struct Gateway {
    worker: Arc<Worker>,
}

/// Builds one worker's steps from a config snapshot.
pub type BuildSteps = Box<dyn Fn(u64, Arc<Config>) -> Result<Steps, BoxError> + Send + Sync>;

/// One worker's steps, and how to build them again after a reload.
struct Worker {
    live: Arc<Live>,
    steps: ArcSwap<Steps>,
    build: BuildSteps,
}

/// The steps of the request path, built from one config snapshot.
pub struct Steps {
    /// The [`Live`] generation of `config`.
    generation: u64,
    config: Arc<Config>,
    router: Router,
    identifier: Identifier,
    meter: Meter,
    forwarder: Forwarder,
    observer: Observer,
    /// `[usage_page]`, looked at before routing.
    usage_page: Option<UsagePage>,
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

impl Steps {
    #[expect(
        clippy::too_many_arguments,
        reason = "one argument per step of the path, each built by the caller"
    )]
    pub fn new(
        generation: u64,
        config: Arc<Config>,
        router: Router,
        identifier: Identifier,
        meter: Meter,
        forwarder: Forwarder,
        observer: Observer,
        usage_page: Option<UsagePage>,
    ) -> Steps {
        Steps {
            generation,
            config,
            router,
            identifier,
            meter,
            forwarder,
            observer,
            usage_page,
        }
    }
}

impl Gateway {
    /// The gateway of one worker, on steps built by `build` from the
    /// current snapshot of `live`, and built again whenever it changes.
    pub fn new(live: Arc<Live>, build: BuildSteps) -> Result<Gateway, BoxError> {
        let (generation, config) = live.snapshot();
        let steps = build(generation, config)?;
        Ok(Gateway {
            worker: Arc::new(Worker {
                live,
                steps: ArcSwap::from_pointee(steps),
                build,
            }),
        })
    }

    /// The steps of the current snapshot. A request holds them to its end,
    /// so one that began before a reload finishes on the config it began
    /// with.
    fn steps(&self) -> Arc<Steps> {
        let worker = &*self.worker;
        let steps = worker.steps.load_full();
        if worker.live.is_current(steps.generation) {
            return steps;
        }
        let (generation, config) = worker.live.snapshot();
        match (worker.build)(generation, config) {
            Ok(built) => {
                let built = Arc::new(built);
                worker.steps.store(built.clone());
                built
            }
            Err(error) => {
                // Building can fail only on what validation already read
                // (upstream certificates), so this is rare; the old steps
                // go on serving.
                tracing::error!(%error, "could not apply the reloaded config on a worker");
                steps
            }
        }
    }
}

// The steps below are not `async fn`s: those move each argument once
// more, into a local of their future, and keep it there beside the
// captured one (the future's layout does not overlap the two), so a
// request was held and copied twice at every step. An `async move` block
// uses what it captured in place.
impl Steps {
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future"
    )]
    fn handle<'s>(
        &'s self,
        mut request: Request<Body>,
        client: Option<ClientAddr>,
        trail: &mut Trail<'s>,
    ) -> impl Future<Output = Result<Response<Body>, GatewayError>> {
        async move {
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

            let admitted = match &route.cost {
                None => {
                    self.identifier
                        .pass_unmetered(request.headers_mut(), peer)?;
                    None
                }
                Some(cost) => {
                    let org = self.identifier.identify(request.headers_mut(), peer)?;
                    if self.observer.access_log {
                        trail.org = Some(org.clone());
                    }
                    let admitted = self.meter.admit(route, cost, org, &mut request).await?;
                    trail.admitted(&admitted, self.observer.access_log);
                    Some(admitted)
                }
            };
            // One forward for both kinds of route, awaited here rather than
            // in a step of its own: each level of futures copies the
            // request on its way down and the response on its way up.
            let upload = match &admitted {
                Some(admitted) if admitted.body_in_hand => Upload::InHand,
                _ => Upload::FromClient,
            };
            let started = Instant::now();
            let forwarded = self
                .forwarder
                .forward(route.upstream, request, upload, client)
                .await;
            if forwarded.is_ok() {
                self.upstream_answered(route, started.elapsed(), trail);
            }
            let Some(admitted) = admitted else {
                return forwarded;
            };

            let mut response =
                settle::settle(route, admitted.reservation, admitted.reading, forwarded)?;
            // The gateway's quota replaces whatever an upstream sent by these names.
            match admitted.rate_limit {
                Some(rate_limit) => rate_limit.set_on(response.headers_mut()),
                None => RateLimitHeaders::clear(response.headers_mut()),
            }
            if let Some(over) = admitted.over {
                response.headers_mut().insert(
                    SHADOW_EXCEEDED,
                    HeaderValue::from_static(over.dimension.as_str()),
                );
            }
            Ok(response)
        }
    }

    /// Records that the upstream sent its response headers `took` after
    /// the request was forwarded.
    fn upstream_answered(&self, route: &Route, took: Duration, trail: &mut Trail<'_>) {
        if let Some(histogram) = self.observer.upstreams.get(route.upstream) {
            histogram.observe(took.as_secs_f64());
        }
        trail.upstream = Some(took);
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

pin_project_lite::pin_project! {
    /// The gateway's answer, or its 500 envelope if the steps panic. In
    /// place of tower-http's `CatchPanicLayer`, which boxes the response
    /// body once more (and the stack then a second time, for its body
    /// type), and its future: three allocations and two layers of every
    /// body poll, counted in with `HttpService`'s figure.
    pub struct Caught<F> {
        #[pin]
        future: F,
        panicked: bool,
    }
}

impl<F: Future<Output = Response<Body>>> Future for Caught<F> {
    type Output = Response<Body>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        let this = self.project();
        if *this.panicked {
            return Poll::Ready(GatewayError::Internal.into_response());
        }
        let future = this.future;
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(polled) => polled,
            Err(_panic) => {
                // What the panic left is not polled again.
                *this.panicked = true;
                Poll::Ready(GatewayError::Internal.into_response())
            }
        }
    }
}

impl Gateway {
    /// The answer to `request` from `client`, its panics caught.
    pub fn answer(&self, request: Request<Incoming>, client: Option<ClientAddr>) -> HttpFuture {
        let Ok(steps) = std::panic::catch_unwind(AssertUnwindSafe(|| self.steps())) else {
            return Box::pin(std::future::ready(GatewayError::Internal.into_response()));
        };
        // Allocated before the future is made, so that it is written in
        // place: `Box::pin` moves the whole state (some 5 KB, though only
        // its arguments are live) from the stack into the box.
        let boxed = Box::write(
            Box::new_uninit(),
            Caught {
                future: steps.answer_from(request, client),
                panicked: false,
            },
        );
        Box::into_pin(boxed)
    }
}

impl Steps {
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future"
    )]
    fn answer_from(
        self: Arc<Steps>,
        mut request: Request<Incoming>,
        client: Option<ClientAddr>,
    ) -> impl Future<Output = Response<Body>> {
        async move {
            // The customers' page is no route: it is neither counted nor
            // metered, and costs the proxy's requests this one compare.
            if let Some(page) = &self.usage_page
                && page.serves(request.uri().path())
            {
                return page.answer(&request).await;
            }
            mark_credentials_sensitive(request.headers_mut());
            // The steps see one request body type: the client's, boxed.
            let body_read_timeout = self.config.server.body_read_timeout;
            let mut trail = Trail::new();
            let answered = self
                .handle(
                    request.map(|body| client_body(body, body_read_timeout)),
                    client,
                    &mut trail,
                )
                .await;
            self.answer(answered, &trail)
        }
    }
}

/// The gateway under tower layers (tracing), the client's address in the
/// request's extensions.
impl Service<Request<Incoming>> for Gateway {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures_util::future::Map<
        HttpFuture,
        fn(Response<Body>) -> Result<Response<Body>, Infallible>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let client = request.extensions_mut().remove::<ClientAddr>();
        futures_util::FutureExt::map(self.answer(request, client), Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_the_steps_is_answered_with_the_500_envelope() {
        let panicking = Caught {
            future: async {
                let step = || -> Response<Body> { panic!("a step that panics") };
                step()
            },
            panicked: false,
        };
        let response = panicking.await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains("\"code\":\"INTERNAL_ERROR\""),
            "{body:?}"
        );
    }

    #[test]
    fn every_credential_value_is_marked_sensitive_and_nothing_else() {
        let mut headers = http::HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer a"),
            ("authorization", "Bearer b"),
            ("x-api-key", "k"),
            ("cookie", "c=1"),
            ("proxy-authorization", "Basic x"),
            ("x-org-id", "org_acme"),
        ] {
            headers.append(name, value.parse().unwrap());
        }
        mark_credentials_sensitive(&mut headers);
        let marked: Vec<(&str, bool)> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.is_sensitive()))
            .collect();
        assert_eq!(
            marked,
            [
                ("authorization", true),
                ("authorization", true),
                ("x-api-key", true),
                ("cookie", true),
                ("proxy-authorization", true),
                ("x-org-id", false),
            ]
        );
    }
}
