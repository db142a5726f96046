//! The admin endpoints: each reads its request, asks the [`App`], and
//! answers in the shapes of [`super::views`].

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::views::{CheckRequest, ReloadAnswer, SetUsage, Summary, Usage, Whole};
use super::{Endpoint, READ_TIMEOUT, json, with_type};
use crate::app::App;
use crate::error::{Denial, GatewayError};
use crate::live::ReloadError;
use crate::org::OrgId;
use crate::quota::{self, Amounts, Decision, Dimension, MAX_AMOUNT, Mode};
use crate::{Body, metrics};

/// The admin API's own description, served at `GET /v1/openapi.json`.
const OPENAPI: &str = include_str!("../../docs/admin-openapi.json");

/// The largest admin request body: a few fields of JSON.
const MAX_BODY_BYTES: usize = 64 * 1024;

pub(super) async fn handle(
    app: &App,
    endpoint: Endpoint<'_>,
    request: Request<Incoming>,
) -> Result<Response<Body>, GatewayError> {
    let ok = StatusCode::OK;
    match endpoint {
        Endpoint::Healthz => Ok(json(ok, &json!({"status": "ok"}))),
        Endpoint::Readyz => Ok(readiness(app).await),
        Endpoint::Metrics => Ok(with_type(
            ok,
            Bytes::from(app.metrics().encode()),
            metrics::CONTENT_TYPE,
        )),
        Endpoint::OpenApi => Ok(with_type(
            ok,
            Bytes::from_static(OPENAPI.as_bytes()),
            "application/json",
        )),
        Endpoint::Usage(org) => Ok(json(ok, &summary(app, &org_id(org)?).await?)),
        Endpoint::SetUsage(org, dimension) => {
            let (org, dimension) = (org_id(org)?, dimension_named(dimension)?);
            let SetUsage { used: Whole(used) } = read_json(request).await?;
            app.set_usage(&org, dimension, amount("used", used)?)
                .await
                .map_err(|_| GatewayError::StoreUnavailable)?;
            Ok(json(ok, &summary(app, &org).await?))
        }
        Endpoint::ResetUsage(org) => {
            let org = org_id(org)?;
            app.reset_usage(&org)
                .await
                .map_err(|_| GatewayError::StoreUnavailable)?;
            Ok(json(ok, &summary(app, &org).await?))
        }
        Endpoint::Check => check(app, read_json(request).await?).await,
        Endpoint::Reload => reload(app),
        Endpoint::Orgs
        | Endpoint::Org(_)
        | Endpoint::PutOrg(_)
        | Endpoint::DeleteOrg(_)
        | Endpoint::CreateKey
        | Endpoint::Keys
        | Endpoint::RevokeKey(_) => Err(GatewayError::NoEndpoint),
    }
}

/// `GET /readyz`: ready while the store answers within `store.timeout`.
async fn readiness(app: &App) -> Response<Body> {
    match app.ready().await {
        Ok(()) => json(StatusCode::OK, &json!({"status": "ready", "store": "ok"})),
        Err(_) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "not_ready", "store": "unreachable"}),
        ),
    }
}

/// An org's summary, its counters read from the store (never a cache).
async fn summary(app: &App, org: &OrgId) -> Result<Summary, GatewayError> {
    let (policy, period) = app.policy_now(org);
    let used = app
        .usage(org)
        .await
        .map_err(|_| GatewayError::StoreUnavailable)?;
    Ok(Summary::new(org.clone(), &policy, period, &used))
}

/// `POST /v1/check`: the decision a reservation of `cost` would get now,
/// by the same pure rule, with nothing reserved.
async fn check(app: &App, asked: CheckRequest) -> Result<Response<Body>, GatewayError> {
    let org = org_id(&asked.org)?;
    let mut cost = Amounts::ZERO;
    for (name, &Whole(value)) in &asked.cost {
        cost.set(dimension_named(name)?, amount(name, value)?);
    }
    let (policy, period) = app.policy_now(&org);
    let used = app
        .usage(&org)
        .await
        .map_err(|_| GatewayError::StoreUnavailable)?;
    let decision = match policy.mode {
        // Nothing is counted, so nothing is refused.
        Mode::Off => None,
        mode => Some(quota::decide(&policy.limits, &used, &cost, mode)),
    };
    let answer = match decision {
        Some(Decision::Deny(exceeded)) => {
            let denial = Denial {
                exceeded,
                policy,
                period,
            };
            let refused = GatewayError::QuotaExceeded(Box::new(denial));
            json!({"allowed": false, "error": refused.error_object()})
        }
        _ => json!({"allowed": true, "usage": Usage::of(&policy.limits, &used)}),
    };
    Ok(json(StatusCode::OK, &answer))
}

/// `POST /v1/reload`: as SIGHUP.
fn reload(app: &App) -> Result<Response<Body>, GatewayError> {
    match app.reload() {
        Ok(reloaded) => Ok(json(
            StatusCode::OK,
            &ReloadAnswer {
                reloaded: true,
                restart_required: reloaded.restart_required,
            },
        )),
        Err(ReloadError::NoFile) => Err(GatewayError::ReloadUnavailable),
        Err(ReloadError::Config(error)) => Err(GatewayError::ConfigRejected(
            error.to_string().lines().map(str::to_string).collect(),
        )),
    }
}

fn org_id(text: &str) -> Result<OrgId, GatewayError> {
    OrgId::parse(text).ok_or(GatewayError::InvalidOrgId)
}

fn dimension_named(name: &str) -> Result<Dimension, GatewayError> {
    Dimension::parse(name).ok_or_else(|| {
        GatewayError::InvalidBody(format!(
            "{name:?} is not a dimension: use tokens, playbook_runs or seats"
        ))
    })
}

/// An amount an operator sets or asks about: 0 to 2^53 − 1.
fn amount(what: &str, value: i64) -> Result<i64, GatewayError> {
    if (0..=MAX_AMOUNT).contains(&value) {
        Ok(value)
    } else {
        Err(GatewayError::InvalidBody(format!(
            "{what} must be a whole number from 0 to {MAX_AMOUNT} (got {value})"
        )))
    }
}

/// The request's JSON body, read within [`READ_TIMEOUT`] and up to
/// [`MAX_BODY_BYTES`].
async fn read_json<T: DeserializeOwned>(request: Request<Incoming>) -> Result<T, GatewayError> {
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES).collect();
    let bytes = match tokio::time::timeout(READ_TIMEOUT, body).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            return Err(GatewayError::BodyTooLarge {
                limit: MAX_BODY_BYTES as u64,
            });
        }
        Ok(Err(_)) => return Err(GatewayError::ClientBody),
        Err(_) => return Err(GatewayError::BodyTimeout),
    };
    serde_json::from_slice(&bytes)
        .map_err(|error| GatewayError::InvalidBody(format!("the request body: {error}")))
}
