//! The admin pages under `/ui`: every org's usage, and one org's, drawn on
//! the server (every number is in the HTML) and refreshed by the page's
//! script from the JSON API. Reached after one login with an admin token
//! ([`super::session`]).

use askama::Template;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::api::{all_summaries, org_id, read_body, summary};
use super::session;
use super::views::OrgView;
use crate::Body;
use crate::app::App;
use crate::catalog::Effective;
use crate::error::GatewayError;
use crate::usage::Summary;
use crate::usage_link::SigningKey;
use crate::usage_page::html::{self, Bar, CSS, JS};

#[derive(Template)]
#[template(path = "ui_login.html")]
struct Login<'a> {
    css: &'static str,
    js: &'static str,
    kind: &'static str,
    source: &'static str,
    error: &'a str,
}

#[derive(Template)]
#[template(path = "ui_overview.html")]
struct Overview<'a> {
    css: &'static str,
    js: &'static str,
    kind: &'static str,
    source: &'static str,
    q: &'a str,
    rows: Vec<Row>,
    problem: &'static str,
}

/// One org on the overview.
struct Row {
    org: String,
    plan: String,
    source: &'static str,
    /// Its highest used/limit fraction; -1 when nothing is limited.
    closest: f64,
    bars: Vec<Bar>,
    period_end: String,
}

#[derive(Template)]
#[template(path = "ui_org.html")]
struct OrgPage {
    css: &'static str,
    js: &'static str,
    kind: &'static str,
    source: String,
    org: String,
    policy: OrgView,
    limits: Vec<(&'static str, String)>,
    period_start: String,
    period_end: String,
    bars: Vec<Bar>,
    problem: &'static str,
}

const STORE_DOWN: &str = "The quota store did not answer, so no usage can be shown just now. This page tries again every 5 seconds.";

pub(super) fn login_page(status: StatusCode, error: &str) -> Response<Body> {
    let page = Login {
        css: CSS,
        js: JS,
        kind: "login",
        source: "",
        error,
    };
    html::rendered(status, &page)
}

/// `POST /ui/login`: the form's `token`, checked as a bearer token is.
pub(super) async fn login(
    app: &App,
    key: &SigningKey,
    request: Request<Incoming>,
) -> Result<Response<Body>, GatewayError> {
    let body = read_body(request).await?;
    let token = form_urlencoded::parse(&body)
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    Ok(match super::token_name(app, &token) {
        Some(name) => {
            let cookie = session::issue(key, &name, super::now(app));
            html::see_other("/ui", Some(&cookie))
        }
        None => login_page(
            StatusCode::UNAUTHORIZED,
            "That token is not one of the admin tokens. Try again.",
        ),
    })
}

/// Where a page sends a browser without a session.
pub(super) fn see_login() -> Response<Body> {
    html::see_other("/ui/login", None)
}

pub(super) fn logout() -> Response<Body> {
    html::see_other("/ui/login", Some(&session::cleared()))
}

/// `GET /ui?q=`: every org, closest to a limit first.
pub(super) async fn overview(app: &App, query: Option<&str>) -> Response<Body> {
    let q = query
        .map(|query| form_urlencoded::parse(query.as_bytes()))
        .and_then(|mut pairs| pairs.find(|(name, _)| name == "q"))
        .map(|(_, value)| value.trim().to_string())
        .unwrap_or_default();
    let orgs = app.catalog().orgs();
    let (rows, problem, status) = match all_summaries(app, &orgs).await {
        Ok(summaries) => (rows(&orgs, summaries, &q), "", StatusCode::OK),
        Err(_) => (Vec::new(), STORE_DOWN, StatusCode::SERVICE_UNAVAILABLE),
    };
    let page = Overview {
        css: CSS,
        js: JS,
        kind: "overview",
        source: "/v1/usage",
        q: &q,
        rows,
        problem,
    };
    html::rendered(status, &page)
}

/// The overview's rows: those whose id or plan holds `q` (any letter case),
/// sorted by their highest used/limit fraction, unlimited last.
fn rows(orgs: &[Effective], summaries: Vec<Summary>, q: &str) -> Vec<Row> {
    let q = q.to_lowercase();
    let mut rows: Vec<Row> = orgs
        .iter()
        .zip(summaries)
        .map(|(effective, summary)| Row {
            org: summary.org.to_string(),
            plan: summary.plan.to_string(),
            source: effective.source.as_str(),
            closest: summary.usage.closest().unwrap_or(-1.0),
            bars: Bar::all(&summary),
            period_end: summary.period_end,
        })
        .filter(|row| {
            q.is_empty()
                || row.org.to_lowercase().contains(&q)
                || row.plan.to_lowercase().contains(&q)
        })
        .collect();
    rows.sort_by(|a, b| b.closest.total_cmp(&a.closest).then(a.org.cmp(&b.org)));
    rows
}

/// `GET /ui/orgs/{org}`: its policy, period and numbers.
pub(super) async fn org_page(app: &App, org: &str) -> Response<Body> {
    let Ok(org) = org_id(org) else {
        return not_found(format!("{org:?} is not an org id."));
    };
    if !app.catalog().orgs().iter().any(|listed| listed.org == org) {
        return not_found(format!(
            "No org {org} is configured, in the file or at runtime."
        ));
    }
    let effective = app.catalog().effective(&org);
    let policy = OrgView::new(&effective);
    let limits = [
        ("tokens", policy.limits.tokens),
        ("playbook_runs", policy.limits.playbook_runs),
        ("seats", policy.limits.seats),
    ]
    .map(|(name, limit)| (name, limit.map_or("unlimited".into(), html::grouped)));
    let read = summary(app, &org).await;
    let (period_start, period_end, bars, problem, status) = match read {
        Ok(summary) => {
            let bars = Bar::all(&summary);
            (
                summary.period_start,
                summary.period_end,
                bars,
                "",
                StatusCode::OK,
            )
        }
        Err(_) => {
            let (_, period) = app.policy_now(&org);
            let (start, end) = (
                crate::period::rfc3339(period.start),
                crate::period::rfc3339(period.end),
            );
            (
                start,
                end,
                Vec::new(),
                STORE_DOWN,
                StatusCode::SERVICE_UNAVAILABLE,
            )
        }
    };
    let page = OrgPage {
        css: CSS,
        js: JS,
        kind: "org",
        source: format!("/v1/orgs/{org}/usage"),
        org: org.to_string(),
        policy,
        limits: limits.into(),
        period_start,
        period_end,
        bars,
        problem,
    };
    html::rendered(status, &page)
}

/// The 404 page of an admin page that is not there.
pub(super) fn not_found(message: String) -> Response<Body> {
    let page = html::Notice::new("message", "Not found", message, false);
    html::rendered(StatusCode::NOT_FOUND, &page)
}
