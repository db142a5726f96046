//! The method routes are matched on is the method the backend runs.
//!
//! Two ways a client could make them differ: a method-override header, which
//! Express's `method-override`, Rails, Laravel and others obey on a POST, so
//! that a POST metered as one route runs as a PUT or DELETE on another; and a
//! standard method in another letter case (`post`), which matches no route
//! here but which Werkzeug upper-cases and runs.

use http::{HeaderMap, HeaderName, Method};

/// The headers with which frameworks let a client choose another method.
static OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// The methods of RFC 9110 and PATCH.
static STANDARD: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::CONNECT,
    Method::OPTIONS,
    Method::TRACE,
    Method::PATCH,
];

/// Removes every method-override header.
pub fn remove_overrides(headers: &mut HeaderMap) {
    // Nearly no request carries one: one pass over the names it does carry
    // is cheaper than a hashed removal of each.
    if headers.keys().any(|name| OVERRIDES.contains(name)) {
        for name in &OVERRIDES {
            headers.remove(name);
        }
    }
}

/// The standard method, or one of `configured`, that `method` spells in
/// another letter case.
pub fn miscased<'a>(method: &Method, configured: &'a [Method]) -> Option<&'a Method> {
    let name = method.as_str();
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return None;
    }
    STANDARD
        .iter()
        .chain(configured)
        .find(|known| known.as_str().eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_override_header_is_removed_and_nothing_else() {
        let mut headers = HeaderMap::new();
        for name in [
            "X-HTTP-Method-Override",
            "x-http-method",
            "X-Method-Override",
        ] {
            headers.append(name, "PUT".parse().unwrap());
        }
        headers.append("x-http-method-override", "DELETE".parse().unwrap());
        headers.insert("x-kept", "1".parse().unwrap());
        remove_overrides(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers["x-kept"], "1");
    }

    #[test]
    fn a_standard_or_configured_method_in_another_letter_case_is_named() {
        let purge = Method::from_bytes(b"PURGE").unwrap();
        let configured = [purge.clone()];
        let method = |name: &str| Method::from_bytes(name.as_bytes()).unwrap();
        assert_eq!(miscased(&method("post"), &configured), Some(&Method::POST));
        assert_eq!(
            miscased(&method("Delete"), &configured),
            Some(&Method::DELETE)
        );
        assert_eq!(miscased(&method("purge"), &configured), Some(&purge));
        for fine in ["POST", "PURGE", "PROPFIND", "brew"] {
            assert_eq!(miscased(&method(fine), &configured), None, "{fine}");
        }
    }
}
