//! What the usage pages share, the admin's and the customer's: the style
//! and script (inline, allowed by their hashes, so nothing is fetched
//! from elsewhere and the Content-Security-Policy is strict), the security
//! headers, and one dimension's bar as every page draws it.

use std::sync::LazyLock;

use base64::Engine;
use bytes::Bytes;
use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION,
    REFERRER_POLICY, SET_COOKIE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{Response, StatusCode};
use sha2::{Digest, Sha256};

use crate::usage::{Summary, Used};
use crate::{Body, full_body};

/// The pages' style, inlined in every page.
pub const CSS: &str = include_str!("../../templates/usage.css");
/// The pages' script: the refresh from the JSON API, and the filter box.
pub const JS: &str = include_str!("../../templates/usage.js");

/// Nothing but this page's own style and script; JSON from this origin
/// only; never in a frame.
static CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let hash = |text: &str| base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text));
    let policy = format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
         connect-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; \
         frame-ancestors 'none'",
        hash(JS),
        hash(CSS)
    );
    HeaderValue::from_str(&policy).unwrap_or(HeaderValue::from_static("default-src 'none'"))
});

/// The headers every page, and every answer the pages' script reads, carries.
pub fn secure(headers: &mut HeaderMap) {
    headers.insert(CONTENT_SECURITY_POLICY, CSP.clone());
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

/// A page of HTML.
pub fn page(status: StatusCode, html: String) -> Response<Body> {
    let mut response = Response::new(full_body(Bytes::from(html)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure(headers);
    response
}

/// A rendered template as a page, or the gateway's 500 when it could not
/// be written (askama fails only on a failing `Display`).
/// A page that only says something: a 404 of the admin pages, a refused
/// link of the customers'.
#[derive(askama::Template)]
#[template(path = "notice.html")]
pub struct Notice {
    pub css: &'static str,
    pub js: &'static str,
    pub kind: &'static str,
    pub source: &'static str,
    pub heading: &'static str,
    pub message: String,
    /// The customers' header and advice, not the admin pages'.
    pub for_customer: bool,
}

impl Notice {
    pub fn new(
        kind: &'static str,
        heading: &'static str,
        message: String,
        for_customer: bool,
    ) -> Notice {
        Notice {
            css: CSS,
            js: JS,
            kind,
            source: "",
            heading,
            message,
            for_customer,
        }
    }
}

pub fn rendered(status: StatusCode, template: &impl askama::Template) -> Response<Body> {
    match template.render() {
        Ok(html) => page(status, html),
        Err(error) => {
            tracing::error!(%error, "could not render a usage page");
            crate::error::GatewayError::Internal.into_response()
        }
    }
}

/// A 303 to `location`, setting `cookie` when given.
pub fn see_other(location: &str, cookie: Option<&str>) -> Response<Body> {
    let mut response = page(StatusCode::SEE_OTHER, String::new());
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(location) {
        headers.insert(LOCATION, location);
    }
    if let Some(cookie) = cookie.and_then(|c| HeaderValue::from_str(c).ok()) {
        headers.insert(SET_COOKIE, cookie);
    }
    response
}

/// One dimension as a page shows it: the numbers in text, and a bar.
pub struct Bar {
    pub name: &'static str,
    pub label: &'static str,
    pub used: String,
    /// The limit, percent and remaining in text; `None` when unlimited.
    pub limited: Option<Limited>,
}

pub struct Limited {
    pub limit: String,
    pub percent: String,
    pub remaining: String,
    /// The `<meter>`'s max and value: a limit of 0 draws as full.
    pub max: i64,
    pub value: i64,
    /// "At limit" or "Over limit", or empty.
    pub state: &'static str,
}

impl Bar {
    pub fn of(name: &'static str, used: &Used) -> Bar {
        let limited = used.limit.map(|limit| {
            let max = limit.max(1);
            Limited {
                limit: grouped(limit),
                percent: format!("{:.1}", used.fraction().unwrap_or(0.0) * 100.0),
                remaining: grouped(used.remaining.unwrap_or(0)),
                max,
                value: used.used.clamp(0, max),
                state: match used.used.cmp(&limit) {
                    std::cmp::Ordering::Less => "",
                    std::cmp::Ordering::Equal => "At limit",
                    std::cmp::Ordering::Greater => "Over limit",
                },
            }
        });
        Bar {
            name,
            label: label(name),
            used: grouped(used.used),
            limited,
        }
    }

    /// Every dimension of a summary, in its order.
    pub fn all(summary: &Summary) -> Vec<Bar> {
        summary
            .usage
            .entries()
            .iter()
            .map(|(name, used)| Bar::of(name, used))
            .collect()
    }
}

fn label(dimension: &str) -> &'static str {
    match dimension {
        "tokens" => "Tokens",
        "playbook_runs" => "Playbook runs",
        _ => "Seats",
    }
}

/// `1234567` as `1,234,567`, as the script writes it too
/// (`toLocaleString("en-US")`).
pub fn grouped(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        for (n, text) in [
            (0, "0"),
            (999, "999"),
            (1000, "1,000"),
            (8_000_000, "8,000,000"),
            (-12345, "-12,345"),
        ] {
            assert_eq!(grouped(n), text);
        }
    }

    #[test]
    fn a_full_dimension_says_so_in_words() {
        let bar = Bar::of(
            "playbook_runs",
            &Used {
                used: 5,
                limit: Some(5),
                remaining: Some(0),
            },
        );
        let limited = bar.limited.unwrap();
        assert_eq!(
            (limited.state, limited.percent.as_str()),
            ("At limit", "100.0")
        );
    }
}
