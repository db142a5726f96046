//! The customers' usage page, on the main listener under `[usage_page]
//! path`: one org's counters, reached by a signed, expiring link
//! ([`crate::usage_link`]) that the admin API hands out. The stack looks at
//! it before routing, with one string compare; nothing else of the request
//! path runs for it, and it is never a route.
//!
//! The same link with `&format=json` answers the page's numbers as JSON,
//! which the page's script refreshes from.

pub mod html;

use askama::Template;
use http::header::ALLOW;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::Body;
use crate::config::UsagePageConfig;
use crate::error::GatewayError;
use crate::org::OrgId;
use crate::period::rfc3339;
use crate::usage::{Summary, Usage, UsageReader};
use crate::usage_link::{LinkRefused, UsageLink};
use html::Bar;

/// The usage page of one config snapshot.
pub struct UsagePage {
    config: UsagePageConfig,
    reader: UsageReader,
}

#[derive(Template)]
#[template(path = "customer.html")]
struct CustomerPage<'a> {
    css: &'static str,
    js: &'static str,
    kind: &'static str,
    source: &'static str,
    org: &'a OrgId,
    period_end: String,
    bars: Vec<Bar>,
    upgrade_url: Option<&'a str>,
    at_limit: bool,
    expires_at: String,
    problem: &'static str,
}

/// The page's JSON: the org's numbers, without its plan or policy.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CustomerUsage<'a> {
    org: &'a OrgId,
    period_start: &'a str,
    period_end: &'a str,
    usage: &'a Usage,
}

impl UsagePage {
    pub fn new(config: UsagePageConfig, reader: UsageReader) -> UsagePage {
        UsagePage { config, reader }
    }

    /// Whether a request for `path` is the page's.
    pub fn serves(&self, path: &str) -> bool {
        path == self.config.path
    }

    /// The page, its JSON, or why the link is refused.
    pub async fn answer<B>(&self, request: &Request<B>) -> Response<Body> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = GatewayError::MethodNotAllowed("GET, HEAD").into_response();
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            html::secure(response.headers_mut());
            return response;
        }
        let query = request.uri().query().unwrap_or("");
        let json = query.split('&').any(|pair| pair == "format=json");
        let link = UsageLink::from_query(query, &self.config.secret, self.reader.now());
        let summary = match &link {
            Ok(link) => Some(self.reader.summary(&link.org).await),
            Err(_) => None,
        };
        match (link, summary, json) {
            (Err(refused), _, false) => refused_page(refused),
            (Err(refused), _, true) => with_headers(GatewayError::LinkRefused(refused)),
            (Ok(_), Some(Ok(summary)), true) => self.data(&summary),
            (Ok(link), Some(Ok(summary)), false) => self.page(&link, Some(&summary)),
            (Ok(_), _, true) => with_headers(GatewayError::StoreUnavailable),
            (Ok(link), _, false) => self.page(&link, None),
        }
    }

    fn data(&self, summary: &Summary) -> Response<Body> {
        let body = CustomerUsage {
            org: &summary.org,
            period_start: &summary.period_start,
            period_end: &summary.period_end,
            usage: &summary.usage,
        };
        match serde_json::to_vec(&body) {
            Ok(bytes) => {
                let mut response = html::page(StatusCode::OK, String::new());
                *response.body_mut() = crate::full_body(bytes.into());
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            }
            Err(_) => GatewayError::Internal.into_response(),
        }
    }

    /// The org's page; without a summary (the store did not answer), the
    /// page says so and shows no numbers.
    fn page(&self, link: &UsageLink, summary: Option<&Summary>) -> Response<Body> {
        let expires_at = chrono::DateTime::from_timestamp(link.expires, 0)
            .map(rfc3339)
            .unwrap_or_default();
        let page = CustomerPage {
            css: html::CSS,
            js: html::JS,
            kind: "customer",
            source: "",
            org: &link.org,
            period_end: summary.map(|s| s.period_end.clone()).unwrap_or_default(),
            bars: summary.map(Bar::all).unwrap_or_default(),
            upgrade_url: self.config.upgrade_url.as_deref(),
            at_limit: summary.is_some_and(|s| s.usage.any_at_limit()),
            expires_at,
            problem: match summary {
                Some(_) => "",
                None => "Your usage could not be read just now. Try again in a moment.",
            },
        };
        let status = match summary {
            Some(_) => StatusCode::OK,
            None => StatusCode::SERVICE_UNAVAILABLE,
        };
        html::rendered(status, &page)
    }
}

/// The 403 page of a link altered or expired.
fn refused_page(refused: LinkRefused) -> Response<Body> {
    let heading = match refused {
        LinkRefused::Invalid => "This link is not valid",
        LinkRefused::Expired => "This link has expired",
    };
    let page = html::Notice::new("refused", heading, as_sentence(&refused.to_string()), true);
    html::rendered(StatusCode::FORBIDDEN, &page)
}

/// An error's message, which reads as part of a line in the logs, as a
/// sentence of its own on the page.
fn as_sentence(message: &str) -> String {
    let mut chars = message.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).chain(['.']).collect(),
        None => String::new(),
    }
}

fn with_headers(error: GatewayError) -> Response<Body> {
    let mut response = error.into_response();
    html::secure(response.headers_mut());
    response
}
