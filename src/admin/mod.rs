//! The admin listener: health for load balancers, Prometheus metrics, and
//! the operations API under `/v1/` (usage, runtime orgs and keys, the dry
//! run, reload), on an address of its own (`[admin] listen`).
//!
//! It serves nothing of the proxy's routes, and the proxy listener serves
//! none of this. `/healthz`, `/readyz` and `/metrics` need no token, so a
//! load balancer and a scraper can reach them; everything under `/v1/`
//! needs `Authorization: Bearer <token>`, whose sha256 `[admin] tokens`
//! lists. Every error is the gateway's envelope ([`GatewayError`]).
//!
//! The pages under `/ui` ([`ui`]) ask for an admin token once, at
//! `/ui/login`, and then hold a session cookie ([`session`]).
//!
//! It runs on the thread that accepts the proxy's connections, beside the
//! outbox: its traffic is an operator's, a few requests a second at most.

mod api;
pub mod probe;
mod session;
mod ui;
mod views;

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use tokio_util::sync::CancellationToken;

use crate::app::{App, StartError};
use crate::error::GatewayError;
use crate::usage_link::SigningKey;
use crate::{Body, full_body};

/// How long an admin client has to send a request's head, and a request's
/// body: an operator's tool, not a stream.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the proxy on `proxy` and, when given, the admin API on `admin`,
/// until `shutdown` completes; both then drain for `server.shutdown_grace`.
pub async fn serve_all(
    app: &App,
    proxy: std::net::TcpListener,
    admin: Option<std::net::TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let stop = CancellationToken::new();
    let serving_admin = match admin {
        Some(listener) => {
            listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(listener)?;
            let grace = app.config().server.shutdown_grace;
            let stopped = stop.clone().cancelled_owned();
            Some(tokio::spawn(serve(listener, app.clone(), stopped, grace)))
        }
        None => None,
    };
    let served = app
        .serve(proxy, async {
            shutdown.await;
            stop.cancel();
        })
        .await;
    if let Some(serving) = serving_admin {
        let _ = serving.await;
    }
    served
}

/// Serves the admin API on `listener` until `shutdown` completes, then
/// gives open requests `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    // Sessions are signed under a key of this process alone: a restart
    // ends them, and nothing needs configuring.
    let sessions = match SigningKey::random() {
        Ok(key) => key,
        Err(error) => {
            tracing::error!(%error, "no randomness for the admin pages' sessions; they are off");
            SigningKey::new(&[])
        }
    };
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin listener could not accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (app, sessions) = (app.clone(), sessions.clone());
        let service = hyper::service::service_fn(move |request| {
            let (app, sessions) = (app.clone(), sessions.clone());
            async move { Ok::<_, Infallible>(answer(&app, &sessions, request).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("admin connections still open at the end of the grace period");
    }
}

/// One admin request's answer.
async fn answer(app: &App, sessions: &SigningKey, request: Request<Incoming>) -> Response<Body> {
    // The endpoint borrows from the path; the request goes on to the handler.
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let endpoint = match Endpoint::of(&method, uri.path()) {
        Ok(endpoint) => endpoint,
        Err(error) => return error.into_response(),
    };
    let in_session = || {
        let config = app.config();
        let tokens = config.admin.as_ref().map_or(&[][..], |admin| &admin.tokens);
        session::valid(sessions, request.headers(), now(app), tokens)
    };
    match endpoint.access() {
        Access::Open => {}
        Access::Token if bearer(app, &request) => {}
        // The page's script reads the JSON API with the session cookie,
        // for safe methods only. SameSite=Strict keeps the cookie off
        // every request another site starts, so a read cannot be forged
        // (and a cross-site page could not read the answer anyway), while
        // a change (PUT, POST, DELETE) still needs the bearer token, which
        // no browser sends by itself.
        Access::TokenOrSession if bearer(app, &request) || in_session() => {}
        Access::Token | Access::TokenOrSession => {
            return GatewayError::AdminUnauthorized.into_response();
        }
        Access::Page if in_session() => {}
        Access::Page => return ui::see_login(),
    }
    let answered = match endpoint {
        Endpoint::UiLogin => Ok(ui::login_page(StatusCode::OK, "")),
        Endpoint::UiLoginPost => ui::login(app, sessions, request).await,
        Endpoint::UiLogout => Ok(ui::logout()),
        Endpoint::UiOverview => Ok(ui::overview(app, uri.query()).await),
        Endpoint::UiOrg(org) => Ok(ui::org_page(app, org).await),
        endpoint => api::handle(app, endpoint, request).await,
    };
    answered.unwrap_or_else(GatewayError::into_response)
}

/// Now, in Unix seconds, on the gateway's clock.
fn now(app: &App) -> i64 {
    (app.clock())().timestamp()
}

/// Whether the request's bearer token is one of `[admin] tokens`.
fn bearer(app: &App, request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .and_then(|token| token_name(app, token))
        .is_some()
}

/// The name of the admin token `token` is, if it is one. Each digest is
/// compared in constant time, and with every token, so the time taken
/// tells nothing of how close a guess came.
fn token_name(app: &App, token: &str) -> Option<String> {
    let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
    let config = app.config();
    let tokens = config.admin.iter().flat_map(|admin| &admin.tokens);
    tokens.fold(None, |found, known| {
        let matched = bool::from(known.sha256.0.ct_eq(&digest));
        if matched {
            Some(known.name.clone())
        } else {
            found
        }
    })
}

/// Who may ask for an endpoint.
#[derive(Debug, PartialEq, Eq)]
enum Access {
    /// Anyone: health, readiness, metrics, the login page.
    Open,
    /// A bearer token.
    Token,
    /// A bearer token, or the pages' session (reads of the JSON API).
    TokenOrSession,
    /// The pages' session; without one, the login page.
    Page,
}

/// What an admin request asks for: its method and path, read.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint<'a> {
    Healthz,
    Readyz,
    Metrics,
    OpenApi,
    Usage(&'a str),
    SetUsage(&'a str, &'a str),
    ResetUsage(&'a str),
    Orgs,
    Org(&'a str),
    PutOrg(&'a str),
    DeleteOrg(&'a str),
    CreateKey,
    Keys,
    RevokeKey(&'a str),
    Check,
    Reload,
    UsageAll,
    UsageLink(&'a str),
    UiOverview,
    UiOrg(&'a str),
    UiLogin,
    UiLoginPost,
    UiLogout,
}

impl<'a> Endpoint<'a> {
    fn of(method: &Method, path: &'a str) -> Result<Endpoint<'a>, GatewayError> {
        let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        let (get, put, post, delete) = (
            method == Method::GET,
            method == Method::PUT,
            method == Method::POST,
            method == Method::DELETE,
        );
        let endpoint = match segments.as_slice() {
            ["healthz"] if get => Endpoint::Healthz,
            ["readyz"] if get => Endpoint::Readyz,
            ["metrics"] if get => Endpoint::Metrics,
            ["v1", "openapi.json"] if get => Endpoint::OpenApi,
            ["v1", "orgs"] if get => Endpoint::Orgs,
            ["v1", "orgs", org] if get => Endpoint::Org(org),
            ["v1", "orgs", org] if put => Endpoint::PutOrg(org),
            ["v1", "orgs", org] if delete => Endpoint::DeleteOrg(org),
            ["v1", "orgs", org, "usage"] if get => Endpoint::Usage(org),
            ["v1", "orgs", org, "usage"] if delete => Endpoint::ResetUsage(org),
            ["v1", "orgs", org, "usage", dimension] if put => Endpoint::SetUsage(org, dimension),
            ["v1", "keys"] if post => Endpoint::CreateKey,
            ["v1", "keys"] if get => Endpoint::Keys,
            ["v1", "keys", id] if delete => Endpoint::RevokeKey(id),
            ["v1", "check"] if post => Endpoint::Check,
            ["v1", "reload"] if post => Endpoint::Reload,
            ["v1", "usage"] if get => Endpoint::UsageAll,
            ["v1", "orgs", org, "usage-link"] if post => Endpoint::UsageLink(org),
            ["ui"] if get => Endpoint::UiOverview,
            ["ui", "orgs", org] if get => Endpoint::UiOrg(org),
            ["ui", "login"] if get => Endpoint::UiLogin,
            ["ui", "login"] if post => Endpoint::UiLoginPost,
            ["ui", "logout"] if post => Endpoint::UiLogout,
            path => {
                return Err(match allowed_methods(path) {
                    Some(allowed) => GatewayError::MethodNotAllowed(allowed),
                    None => GatewayError::NoEndpoint,
                });
            }
        };
        Ok(endpoint)
    }

    fn access(&self) -> Access {
        match self {
            Endpoint::Healthz
            | Endpoint::Readyz
            | Endpoint::Metrics
            | Endpoint::UiLogin
            | Endpoint::UiLoginPost
            | Endpoint::UiLogout => Access::Open,
            Endpoint::UiOverview | Endpoint::UiOrg(_) => Access::Page,
            Endpoint::OpenApi
            | Endpoint::Usage(_)
            | Endpoint::Orgs
            | Endpoint::Org(_)
            | Endpoint::Keys
            | Endpoint::UsageAll => Access::TokenOrSession,
            _ => Access::Token,
        }
    }
}

/// The methods a path of the API takes, for a 405's `Allow`; `None` for a
/// path that is none of the API's.
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    Some(match segments {
        ["healthz" | "readyz" | "metrics"] | ["v1", "openapi.json" | "orgs" | "usage"] => "GET",
        ["ui"] | ["ui", "orgs", _] => "GET",
        ["ui", "login"] => "GET, POST",
        ["ui", "logout"] | ["v1", "orgs", _, "usage-link"] => "POST",
        ["v1", "check" | "reload"] => "POST",
        ["v1", "orgs", _] => "GET, PUT, DELETE",
        ["v1", "orgs", _, "usage"] => "GET, DELETE",
        ["v1", "orgs", _, "usage", _] => "PUT",
        ["v1", "keys"] => "GET, POST",
        ["v1", "keys", _] => "DELETE",
        _ => return None,
    })
}

/// A JSON answer.
fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => with_type(status, Bytes::from(bytes), "application/json"),
        Err(error) => {
            tracing::error!(%error, "could not write an admin answer");
            GatewayError::Internal.into_response()
        }
    }
}

fn with_type(status: StatusCode, body: Bytes, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_endpoints_and_only_with_their_methods() {
        assert_eq!(
            Endpoint::of(&Method::GET, "/v1/orgs/acme/usage").unwrap(),
            Endpoint::Usage("acme")
        );
        assert_eq!(
            Endpoint::of(&Method::PUT, "/v1/orgs/acme/usage/tokens").unwrap(),
            Endpoint::SetUsage("acme", "tokens")
        );
        assert!(matches!(
            Endpoint::of(&Method::POST, "/v1/orgs/acme/usage"),
            Err(GatewayError::MethodNotAllowed("GET, DELETE"))
        ));
        assert!(matches!(
            Endpoint::of(&Method::GET, "/v1/orgs/acme/usage/tokens/x"),
            Err(GatewayError::NoEndpoint)
        ));
        assert!(matches!(
            Endpoint::of(&Method::GET, "/chat/completions"),
            Err(GatewayError::NoEndpoint)
        ));
    }

    #[test]
    fn only_health_readiness_and_metrics_go_without_a_token() {
        for (path, open) in [
            ("/healthz", true),
            ("/readyz", true),
            ("/metrics", true),
            ("/v1/orgs", false),
            ("/v1/openapi.json", false),
        ] {
            let endpoint = Endpoint::of(&Method::GET, path).unwrap();
            assert_eq!(endpoint.access() == Access::Open, open, "{path}");
        }
    }
}
