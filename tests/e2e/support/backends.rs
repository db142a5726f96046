//! How common backends read a request, applied to what the stand-in
//! upstream recorded undecoded, so that a test can ask which route each of
//! them would run.
//!
//! - Werkzeug (Flask, under its own server or gunicorn): every escape
//!   decoded (`%2F` too), repeated slashes merged (its rules redirect to the
//!   merged path), the method upper-cased; a missing trailing slash
//!   redirects to the rule that has one.
//! - uvicorn and Starlette (FastAPI): every escape decoded; a trailing
//!   slash added or removed by redirect.
//! - Express: the path as sent, undecoded, matched case-insensitively with
//!   an optional trailing slash; `method-override` turns a POST into the
//!   method its header names.
//! - nginx: every escape decoded, dot segments resolved, slashes merged;
//!   locations are case-sensitive.

use super::Seen;

/// One backend's reading of a request.
#[derive(Debug)]
pub struct Reading {
    pub backend: &'static str,
    pub method: String,
    pub path: String,
    pub case_insensitive: bool,
    pub trailing_slash_optional: bool,
}

/// The readings of `seen` by every backend above.
pub fn readings(seen: &Seen) -> Vec<Reading> {
    let path = seen.target.split('?').next().unwrap_or_default();
    let method = seen.method.as_str();
    let overridden = seen
        .headers
        .get("x-http-method-override")
        .filter(|_| method == "POST")
        .and_then(|v| v.to_str().ok())
        .map_or(method.to_string(), str::to_ascii_uppercase);
    vec![
        Reading {
            backend: "werkzeug",
            method: method.to_ascii_uppercase(),
            path: merge_slashes(&decode_all(path)),
            case_insensitive: false,
            trailing_slash_optional: true,
        },
        Reading {
            backend: "starlette",
            method: method.to_string(),
            path: decode_all(path),
            case_insensitive: false,
            trailing_slash_optional: true,
        },
        Reading {
            backend: "express",
            method: overridden,
            path: path.to_string(),
            case_insensitive: true,
            trailing_slash_optional: true,
        },
        Reading {
            backend: "nginx",
            method: method.to_string(),
            path: resolve_dots(&merge_slashes(&decode_all(path))),
            case_insensitive: false,
            trailing_slash_optional: false,
        },
    ]
}

/// A metered route as the config names it.
pub struct MeteredRoute {
    pub method: Option<String>,
    pub pattern: String,
}

/// The metered routes of a config file.
pub fn metered_routes(config: &str) -> Vec<MeteredRoute> {
    let config: toml::Table = config.parse().unwrap();
    config["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|route| route.get("cost").is_some())
        .map(|route| MeteredRoute {
            method: route
                .get("method")
                .and_then(|m| m.as_str())
                .map(str::to_string),
            pattern: route["path"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// The metered route whose handler `reading` runs, if any.
pub fn runs_metered<'a>(reading: &Reading, routes: &'a [MeteredRoute]) -> Option<&'a str> {
    let comparable = |text: &str| {
        let text = if reading.case_insensitive {
            text.to_ascii_lowercase()
        } else {
            text.to_string()
        };
        match text.strip_suffix('/') {
            Some(rest) if reading.trailing_slash_optional && !rest.is_empty() => rest.to_string(),
            _ => text,
        }
    };
    routes
        .iter()
        .find(|route| {
            let method_matches = route.method.as_deref().is_none_or(|m| m == reading.method);
            let mut matcher = matchit::Router::new();
            matcher.insert(comparable(&route.pattern), ()).unwrap();
            method_matches && matcher.at(&comparable(&reading.path)).is_ok()
        })
        .map(|route| route.pattern.as_str())
}

/// Every `%XX` decoded, as bytes, read back as UTF-8 where it is.
pub fn decode_all(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escape = bytes
            .get(at + 1..at + 3)
            .filter(|_| bytes[at] == b'%')
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escape {
            Some(value) => {
                out.push(value);
                at += 3;
            }
            None => {
                out.push(bytes[at]);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

fn resolve_dots(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut kept: Vec<&str> = Vec::new();
    for segment in &segments {
        match *segment {
            "." | "" => {}
            ".." => {
                kept.pop();
            }
            other => kept.push(other),
        }
    }
    let trailing = matches!(segments.last(), Some(&("" | "." | "..")));
    let mut out = format!("/{}", kept.join("/"));
    if trailing && !kept.is_empty() {
        out.push('/');
    }
    out
}
