//! The tower stack: cross-cutting layers from tower-http around the
//! [`Gateway`] service, which runs the steps of the request path in order.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{AUTHORIZATION, COOKIE, HeaderName, HeaderValue, PROXY_AUTHORIZATION};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::map_response_body::MapResponseBodyLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

use arc_swap::ArcSwap;

use crate::accept::{ClientAddr, HttpService, client_body};
use crate::config::Config;
use crate::error::{GatewayError, RateLimitHeaders};
use crate::forward::{self, Forwarder};
use crate::identify::Identifier;
use crate::live::Live;
use crate::meter::Meter;
use crate::route::Router;
use crate::settle;
use crate::{Body, BoxError};

/// Response header naming the quota a shadow-mode request went past.
pub const SHADOW_EXCEEDED: HeaderName = HeaderName::from_static("x-tollgate-shadow-exceeded");

/// Wraps the gateway in its layers, outermost first. None of them depends
/// on the config, so a reload rebuilds only the gateway's steps.
pub fn build(gateway: Gateway) -> HttpService {
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
        .service(gateway);
    BoxCloneSyncService::new(stack)
}

/// The request path: route, identify, meter, forward, settle, on the steps
/// built from the config snapshot that is current when a request starts.
#[derive(Clone)]
pub struct Gateway {
    worker: Arc<Worker>,
}

/// Builds one worker's steps from a config snapshot.
pub type BuildSteps = Box<dyn Fn(Arc<Config>) -> Result<Steps, BoxError> + Send + Sync>;

/// One worker's steps, and how to build them again after a reload.
struct Worker {
    live: Arc<Live>,
    steps: ArcSwap<Steps>,
    build: BuildSteps,
}

/// The steps of the request path, built from one config snapshot.
pub struct Steps {
    config: Arc<Config>,
    router: Router,
    identifier: Identifier,
    meter: Meter,
    forwarder: Forwarder,
}

impl Steps {
    pub fn new(
        config: Arc<Config>,
        router: Router,
        identifier: Identifier,
        meter: Meter,
        forwarder: Forwarder,
    ) -> Steps {
        Steps {
            config,
            router,
            identifier,
            meter,
            forwarder,
        }
    }
}

impl Gateway {
    /// The gateway of one worker, on steps built by `build` from the
    /// current snapshot of `live`, and built again whenever it changes.
    pub fn new(live: Arc<Live>, build: BuildSteps) -> Result<Gateway, BoxError> {
        let steps = build(live.config())?;
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
        if worker.live.is_current(&steps.config) {
            return steps;
        }
        let config = worker.live.config();
        match (worker.build)(config) {
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

    async fn handle(self, request: Request<Incoming>) -> Result<Response<Body>, GatewayError> {
        let steps = self.steps();
        let steps = &*steps;
        // The steps see one request body type: the client's, boxed.
        let body_read_timeout = steps.config.server.body_read_timeout;
        let mut request = request.map(|body| client_body(body, body_read_timeout));
        let client = request.extensions_mut().remove::<ClientAddr>();
        // First, so that no header the client names in `Connection` can take
        // away one the gateway sets later: the org header, X-Forwarded-*, an
        // upstream's `headers`.
        forward::remove_hop_by_hop(request.headers_mut());
        let peer = client.as_ref().map(|c| c.ip);
        let route = steps
            .router
            .route(&mut request)?
            .ok_or(GatewayError::NoRoute)?;

        let Some(cost) = &route.cost else {
            steps
                .identifier
                .pass_unmetered(request.headers_mut(), peer)?;
            return steps
                .forwarder
                .forward(route.upstream, request, client)
                .await;
        };

        let org = steps.identifier.identify(request.headers_mut(), peer)?;
        let admitted = steps.meter.admit(route, cost, org, request).await?;
        let forwarded = steps
            .forwarder
            .forward(route.upstream, admitted.request, client)
            .await;

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

impl Service<Request<Incoming>> for Gateway {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let gateway = self.clone();
        // The one place where the gateway's own errors become responses.
        Box::pin(async move {
            Ok(gateway
                .handle(request)
                .await
                .unwrap_or_else(GatewayError::into_response))
        })
    }
}
