//! The admin endpoints: each reads its request, asks the [`App`], and
//! answers in the shapes of [`super::views`].

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::views::{
    CheckRequest, CreatedKey, KeyList, KeyRequest, KeyView, LinkRequest, LinkView, OrgList,
    OrgView, ReloadAnswer, SetUsage, Summary, Usage, UsageList, Whole,
};
use super::{Endpoint, READ_TIMEOUT, json, with_type};
use crate::app::App;
use crate::catalog::{CatalogError, Effective};
use crate::error::{Denial, GatewayError};
use crate::live::ReloadError;
use crate::org::OrgId;
use crate::quota::{self, Amounts, Decision, Dimension, MAX_AMOUNT, Mode};
use crate::usage_link::{DEFAULT_LINK_SECONDS, MAX_LINK_SECONDS, UsageLink};
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
        Endpoint::OpenApi => Ok(json(ok, &openapi(app))),
        Endpoint::Usage(org) => Ok(json(ok, &summary(app, &org_id(org)?).await?)),
        Endpoint::SetUsage(org, dimension) => {
            let (org, dimension) = (org_id(org)?, dimension_named(dimension)?);
            let SetUsage { used: Whole(used) } = read_json(request).await?;
            app.set_usage(&org, dimension, amount("used", used)?)
                .await?;
            Ok(json(ok, &summary(app, &org).await?))
        }
        Endpoint::ResetUsage(org) => {
            let org = org_id(org)?;
            app.reset_usage(&org).await?;
            Ok(json(ok, &summary(app, &org).await?))
        }
        Endpoint::UsageAll => {
            let orgs = all_summaries(app, &app.catalog().orgs()).await?;
            Ok(json(ok, &UsageList { orgs }))
        }
        Endpoint::UsageLink(org) => usage_link(app, &org_id(org)?, request).await,
        Endpoint::Check => check(app, read_json(request).await?).await,
        Endpoint::Reload => reload(app),
        Endpoint::Orgs => {
            let orgs = app.catalog().orgs().iter().map(OrgView::new).collect();
            Ok(json(ok, &OrgList { orgs }))
        }
        Endpoint::Org(org) => Ok(json(
            ok,
            &OrgView::new(&app.catalog().effective(&org_id(org)?)),
        )),
        Endpoint::PutOrg(org) => {
            let org = org_id(org)?;
            let catalog = app.catalog();
            let record = catalog
                .parse_org(&read_body(request).await?)
                .map_err(CatalogError::from)?;
            let effective = catalog.put_org(&org, record).await?;
            Ok(json(ok, &OrgView::new(&effective)))
        }
        Endpoint::DeleteOrg(org) => {
            let org = org_id(org)?;
            if !app.catalog().delete_org(&org).await? {
                return Err(GatewayError::NotFound(format!(
                    "org {org} has no runtime policy to remove"
                )));
            }
            Ok(json(ok, &OrgView::new(&app.catalog().effective(&org))))
        }
        Endpoint::CreateKey => {
            let asked: KeyRequest = read_json(request).await?;
            let created = app
                .catalog()
                .create_key(&org_id(&asked.org)?, &asked.name)
                .await?;
            Ok(json(StatusCode::CREATED, &CreatedKey::from(created)))
        }
        Endpoint::Keys => {
            let org = org_in_query(request.uri().query())?;
            let keys = app.catalog().keys(&org).into_iter().map(KeyView::from);
            Ok(json(
                ok,
                &KeyList {
                    keys: keys.collect(),
                },
            ))
        }
        Endpoint::RevokeKey(id) => {
            if !app.catalog().revoke_key(id).await? {
                return Err(GatewayError::NotFound(format!(
                    "no runtime key has id {id:?}"
                )));
            }
            Ok(json(ok, &json!({"id": id, "revoked": true})))
        }
        // The pages are answered by super::ui before this.
        Endpoint::UiOverview
        | Endpoint::UiOrg(_)
        | Endpoint::UiLogin
        | Endpoint::UiLoginPost
        | Endpoint::UiLogout => Err(GatewayError::NoEndpoint),
    }
}

/// The `org` of `?org=ORG`, which `GET /v1/keys` needs.
fn org_in_query(query: Option<&str>) -> Result<OrgId, GatewayError> {
    let org = query
        .into_iter()
        .flat_map(|query| query.split('&'))
        .find_map(|pair| pair.strip_prefix("org="))
        .ok_or_else(|| GatewayError::InvalidBody("name the org: /v1/keys?org=ORG".into()))?;
    org_id(org)
}

/// The API's description, with the plans a runtime org may name now: the
/// running config's.
fn openapi(app: &App) -> serde_json::Value {
    let mut document: serde_json::Value = serde_json::from_str(OPENAPI).unwrap_or_default();
    let config = app.config();
    let mut plans: Vec<serde_json::Value> = config
        .orgs
        .plan_names()
        .into_iter()
        .map(Into::into)
        .collect();
    // null: the field is not named.
    plans.push(serde_json::Value::Null);
    document["components"]["schemas"]["OrgChange"]["properties"]["plan"]["enum"] = plans.into();
    document
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

/// The summary of each of `orgs`, in their order.
pub(super) async fn all_summaries(
    app: &App,
    orgs: &[Effective],
) -> Result<Vec<Summary>, GatewayError> {
    let mut summaries = Vec::with_capacity(orgs.len());
    for effective in orgs {
        summaries.push(summary(app, &effective.org).await?);
    }
    Ok(summaries)
}

/// `POST /v1/orgs/{org}/usage-link`: a signed link to the org's usage page,
/// as a path and query (this listener does not know the public host).
async fn usage_link(
    app: &App,
    org: &OrgId,
    request: Request<Incoming>,
) -> Result<Response<Body>, GatewayError> {
    let config = app.config();
    let page = config
        .usage_page
        .as_ref()
        .ok_or(GatewayError::UsagePageOff)?;
    let body = read_body(request).await?;
    let asked: LinkRequest = if body.iter().all(u8::is_ascii_whitespace) {
        LinkRequest::default()
    } else {
        parse_json(&body)?
    };
    let seconds = asked.expires_in.map_or(DEFAULT_LINK_SECONDS, |Whole(s)| s);
    if !(1..=MAX_LINK_SECONDS).contains(&seconds) {
        return Err(GatewayError::InvalidBody(format!(
            "expiresIn must be from 1 to {MAX_LINK_SECONDS} seconds (got {seconds})"
        )));
    }
    let link = UsageLink {
        org: org.clone(),
        expires: super::now(app) + seconds,
    };
    let expires_at = chrono::DateTime::from_timestamp(link.expires, 0)
        .map(crate::period::rfc3339)
        .unwrap_or_default();
    let view = LinkView {
        org: org.clone(),
        url: format!("{}?{}", page.path, link.query(&page.secret)),
        expires_at,
    };
    Ok(json(StatusCode::CREATED, &view))
}

/// An org's summary, its counters read from the store (never a cache).
pub(super) async fn summary(app: &App, org: &OrgId) -> Result<Summary, GatewayError> {
    let (policy, period, used) = app.usage_now(org).await?;
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
    let (policy, period, used) = app.usage_now(&org).await?;
    let decision = match policy.mode {
        // Nothing is counted, so nothing is refused.
        Mode::Off => None,
        mode => Some(quota::decide(&policy.limits, &used, &cost, mode).decision),
    };
    let answer = match decision {
        Some(Decision::Deny(exceeded)) => {
            // A dry run answers in JSON alone: no headers.
            let denial = Denial {
                exceeded,
                policy,
                period,
                rate_limit: None,
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

pub(super) fn org_id(text: &str) -> Result<OrgId, GatewayError> {
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

/// The request's JSON body.
async fn read_json<T: DeserializeOwned>(request: Request<Incoming>) -> Result<T, GatewayError> {
    parse_json(&read_body(request).await?)
}

/// A JSON object body as `T`.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, GatewayError> {
    let invalid = |error| GatewayError::InvalidBody(format!("the request body: {error}"));
    // serde would also read a struct from an array of its fields.
    match serde_json::from_slice(bytes).map_err(invalid)? {
        object @ serde_json::Value::Object(_) => T::deserialize(object).map_err(invalid),
        _ => Err(GatewayError::InvalidBody(
            "the request body must be a JSON object".into(),
        )),
    }
}

/// The request's body, read within [`READ_TIMEOUT`] and up to
/// [`MAX_BODY_BYTES`].
pub(super) async fn read_body(request: Request<Incoming>) -> Result<Bytes, GatewayError> {
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
    Ok(bytes)
}
