//! Step 3: the org that pays for a request: a gateway API key, a verified
//! JWT (the `jwt` module), or a header set by a trusted auth layer.
//!
//! Sources are tried in configured order and the first that yields an org
//! wins. Gateway API keys are credentials for the gateway alone: a matching
//! key is removed from the request on every route, metered or not, so it
//! never reaches an upstream. A key that matches nothing is left alone, since
//! it may be the backend's own credential.

mod jwt;

use http::HeaderMap;
use http::header::AUTHORIZATION;
use http::header::{HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ApiKeys, IdentitySource};
use crate::error::GatewayError;
use crate::org::OrgId;

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

pub struct Identifier {
    sources: Vec<IdentitySource>,
}

impl Identifier {
    pub fn new(sources: Vec<IdentitySource>) -> Identifier {
        Identifier { sources }
    }

    /// The org of a metered request, with its gateway API keys removed and
    /// the trusted org header, if one is configured, set to that org: the
    /// backend sees the org that pays, whatever the client sent.
    pub fn identify(&self, headers: &mut HeaderMap) -> Result<OrgId, GatewayError> {
        let mut found = None;
        for source in &self.sources {
            match source {
                // Every API-key source strips, even after another source answered.
                IdentitySource::ApiKey(keys) => found = found.or(take_api_keys(keys, headers)),
                IdentitySource::Header(name) if found.is_none() => {
                    if let Some(value) = headers.get(name) {
                        let org = value.to_str().ok().and_then(OrgId::parse);
                        found = Some(org.ok_or(GatewayError::InvalidOrgId)?);
                    }
                }
                IdentitySource::Jwt(config) if found.is_none() => {
                    let bearer = headers
                        .get(AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(bearer_token);
                    if let Some(token) = bearer.filter(|t| jwt::looks_like_jwt(t)) {
                        // A token that fails is refused, not passed over.
                        found = Some(jwt::verify(config, token)?);
                    }
                }
                IdentitySource::Header(_) | IdentitySource::Jwt(_) => {}
            }
        }
        let org = found.ok_or(GatewayError::Unauthenticated)?;
        for source in &self.sources {
            if let IdentitySource::Header(name) = source
                && let Ok(value) = HeaderValue::from_str(org.as_str())
            {
                headers.insert(name.clone(), value);
            }
        }
        Ok(org)
    }

    /// Removes gateway API keys from a request that needs no org.
    pub fn strip_gateway_keys(&self, headers: &mut HeaderMap) {
        for source in &self.sources {
            if let IdentitySource::ApiKey(keys) = source {
                take_api_keys(keys, headers);
            }
        }
    }
}

/// Removes every header holding a gateway API key and returns the org of
/// the first, the configured header before `x-api-key`.
fn take_api_keys(keys: &ApiKeys, headers: &mut HeaderMap) -> Option<OrgId> {
    let mut found = None;
    for header in [&keys.header, &X_API_KEY] {
        let Some(presented) = headers.get(header).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(org) = lookup(keys, credential(presented)) {
            headers.remove(header);
            found = found.or(Some(org));
        }
    }
    found
}

/// The credential in a header value: the token of `Bearer <token>`, or the
/// whole value.
fn credential(value: &str) -> &str {
    bearer_token(value).unwrap_or(value.trim())
}

/// The token of `Bearer <token>`; the scheme is case-insensitive.
fn bearer_token(value: &str) -> Option<&str> {
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Some(token.trim()),
        _ => None,
    }
}

/// Compares the key's digest with every configured digest, in constant time
/// and without stopping at a match, so timing says nothing about which or
/// how many keys are configured.
fn lookup(keys: &ApiKeys, presented: &str) -> Option<OrgId> {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut found = None;
    for key in &keys.keys {
        if bool::from(key.sha256.ct_eq(&digest)) {
            found = Some(key.org.clone());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKey;

    fn identifier() -> Identifier {
        let sha256 = Sha256::digest(b"tg_live_acme").into();
        let keys = ApiKeys {
            header: AUTHORIZATION,
            keys: vec![ApiKey {
                sha256,
                org: OrgId::parse("org_acme").unwrap(),
                name: "acme".into(),
            }],
        };
        Identifier::new(vec![
            IdentitySource::ApiKey(keys),
            IdentitySource::Header(HeaderName::from_static("x-org-id")),
        ])
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn a_bearer_api_key_names_its_org_and_is_removed() {
        let mut h = headers(&[("authorization", "Bearer tg_live_acme")]);
        assert_eq!(identifier().identify(&mut h).unwrap().as_str(), "org_acme");
        assert!(h.get("authorization").is_none());
    }

    #[test]
    fn an_x_api_key_header_is_read_too() {
        let mut h = headers(&[("x-api-key", "tg_live_acme")]);
        assert_eq!(identifier().identify(&mut h).unwrap().as_str(), "org_acme");
        assert!(h.get("x-api-key").is_none());
    }

    #[test]
    fn an_unknown_bearer_token_is_left_for_the_backend_and_the_next_source_answers() {
        let mut h = headers(&[
            ("authorization", "Bearer backend-jwt"),
            ("x-org-id", "org_b"),
        ]);
        assert_eq!(identifier().identify(&mut h).unwrap().as_str(), "org_b");
        assert_eq!(h.get("authorization").unwrap(), "Bearer backend-jwt");
    }

    #[test]
    fn the_first_source_in_order_wins() {
        let mut h = headers(&[
            ("authorization", "Bearer tg_live_acme"),
            ("x-org-id", "org_b"),
        ]);
        assert_eq!(identifier().identify(&mut h).unwrap().as_str(), "org_acme");
    }

    #[test]
    fn no_source_yields_unauthenticated() {
        assert!(matches!(
            identifier().identify(&mut HeaderMap::new()),
            Err(GatewayError::Unauthenticated)
        ));
    }

    #[test]
    fn a_malformed_org_header_is_rejected() {
        let mut h = headers(&[("x-org-id", "org:1")]);
        assert!(matches!(
            identifier().identify(&mut h),
            Err(GatewayError::InvalidOrgId)
        ));
    }

    #[test]
    fn a_key_in_both_headers_is_removed_from_both() {
        let mut h = headers(&[
            ("authorization", "bearer tg_live_acme"),
            ("x-api-key", "tg_live_acme"),
        ]);
        assert_eq!(identifier().identify(&mut h).unwrap().as_str(), "org_acme");
        assert!(h.get("authorization").is_none() && h.get("x-api-key").is_none());
    }

    #[test]
    fn once_a_key_names_the_org_the_org_header_is_overwritten_not_validated() {
        let mut h = headers(&[("x-api-key", "tg_live_acme"), ("x-org-id", "other:org")]);
        assert_eq!(identifier().identify(&mut h).unwrap().as_str(), "org_acme");
        assert_eq!(h["x-org-id"], "org_acme");
    }

    #[test]
    fn unmetered_requests_lose_gateway_keys_but_keep_other_credentials() {
        let mut ours = headers(&[("x-api-key", "tg_live_acme")]);
        identifier().strip_gateway_keys(&mut ours);
        assert!(ours.is_empty());
        let mut theirs = headers(&[("authorization", "Bearer backend-jwt")]);
        identifier().strip_gateway_keys(&mut theirs);
        assert_eq!(theirs.len(), 1);
    }
}
