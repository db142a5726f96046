//! Step 3: the org that pays for a request: a gateway API key, a verified
//! JWT (the `jwt` module), or a header set by a trusted auth layer.
//!
//! Each credential header belongs to one source:
//!
//! - `x-api-key`, and the api_key source's `header` (`Authorization` by
//!   default), to the api_key source;
//! - `Authorization`, to the JWT source when no api_key source reads it;
//!   when both do, a bearer token that is not a known key and has the shape
//!   of a JWT (three dot-separated parts) is the JWT source's, and anything
//!   else in it is a key that matches nothing;
//! - the org header, to the header source, and only when the TCP peer is in
//!   `trusted_peers`. From any other peer it is removed on every route, so it
//!   never reaches a backend unverified.
//!
//! Sources are tried in the configured order, and the first with a
//! credential presented decides: a valid one names the org, one that fails
//! (a key that matches nothing, a JWT that does not verify, a malformed org
//! id) is refused, never passed over for a later, weaker source. A source
//! with nothing presented is skipped; when none has anything, the answer is
//! 401 too. The api_key source decides for the org of a known key in either
//! of its headers, leaving a backend credential in the other alone.
//!
//! More than one `Authorization` or `x-api-key` (or api_key `header`) is
//! refused on every route, and more than one org header where it is read:
//! the gateway would check one value while the backend might read another.
//!
//! The api_key source knows the keys of the config's `[identity.api_key]`
//! and the runtime keys of the [`Catalog`], both by their sha256 (see
//! [`lookup`]); a revoked runtime key is gone from the catalog's snapshot
//! the moment it is revoked here, and within a second on every instance.
//! Without an api_key source configured no key header is read, runtime
//! keys included.
//!
//! Gateway API keys are credentials for the gateway alone: a matching key is
//! removed from the request on every route, metered or not, even when
//! another source decided, so it never reaches an upstream. Once the org is
//! known, the org header, if a header source is configured, is set to it, so
//! the backend sees the org that pays; the stack has removed the hop-by-hop
//! headers by then, so no `Connection` header can take it away again. An
//! unmetered route needs no org and refuses nothing else: the backend keeps
//! its own auth.

mod jwt;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use crate::catalog::Catalog;
use crate::config::{HeaderSource, IdentitySource, JwtConfig};
use crate::error::GatewayError;
use crate::org::OrgId;

/// The second header a gateway API key may come in.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// What one source made of a request: `None` when nothing was presented to it.
type Answer = Option<Result<OrgId, GatewayError>>;

enum Source {
    ApiKey,
    Jwt,
    Header,
}

/// The api_key source: its header, and the config's keys by digest.
struct KeySource {
    header: HeaderName,
    by_digest: HashMap<[u8; 32], OrgId>,
}

pub struct Identifier {
    /// The configured order; each source appears once.
    order: Vec<Source>,
    keys: Option<KeySource>,
    /// The runtime keys, read by the api_key source after the config's.
    catalog: Option<Arc<Catalog>>,
    jwt: Option<Arc<JwtConfig>>,
    header: Option<HeaderSource>,
}

impl Identifier {
    pub fn new(sources: Vec<IdentitySource>) -> Identifier {
        let mut identifier = Identifier {
            order: Vec::with_capacity(sources.len()),
            keys: None,
            catalog: None,
            jwt: None,
            header: None,
        };
        for source in sources {
            let kind = match source {
                IdentitySource::ApiKey(keys) => {
                    // A digest listed twice names the org of its last entry.
                    let by_digest = keys.keys.into_iter().map(|k| (k.sha256, k.org)).collect();
                    identifier.keys = Some(KeySource {
                        header: keys.header,
                        by_digest,
                    });
                    Source::ApiKey
                }
                IdentitySource::Jwt(config) => {
                    identifier.jwt = Some(config);
                    Source::Jwt
                }
                IdentitySource::Header(header) => {
                    identifier.header = Some(header);
                    Source::Header
                }
            };
            identifier.order.push(kind);
        }
        identifier
    }

    /// Reads runtime keys from `catalog` too.
    pub fn with_catalog(mut self, catalog: Arc<Catalog>) -> Identifier {
        self.catalog = Some(catalog);
        self
    }

    /// The org of a metered request from `peer`, with its gateway API keys
    /// removed and the org header, if one is configured, set to that org.
    pub fn identify(
        &self,
        headers: &mut HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<OrgId, GatewayError> {
        self.screen(headers, peer)?;
        // Taken first, whatever the order, so that a known key is removed
        // even when an earlier source decides.
        let mut keyed = self.take_api_keys(headers);
        let mut from_header = false;
        let decided = self.order.iter().find_map(|source| match source {
            Source::ApiKey => keyed.take(),
            Source::Jwt => self.read_jwt(headers),
            Source::Header => {
                let read = self.read_org_header(headers);
                from_header = read.is_some();
                read
            }
        });
        let org = decided.unwrap_or(Err(GatewayError::Unauthenticated))?;
        // An org read from the header is that header's one value already,
        // and setting it again cost a hashed insert (callgrind).
        if let Some(source) = &self.header
            && !from_header
            && let Ok(value) = HeaderValue::from_str(org.as_str())
        {
            headers.insert(source.name.clone(), value);
        }
        Ok(org)
    }

    /// Readies a request that needs no org: gateway API keys and an
    /// untrusted org header removed, the rest left for the backend.
    pub fn pass_unmetered(
        &self,
        headers: &mut HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<(), GatewayError> {
        self.screen(headers, peer)?;
        self.take_api_keys(headers);
        Ok(())
    }

    /// What every route checks: at most one of each credential header, and
    /// an org header only from a trusted peer.
    fn screen(&self, headers: &mut HeaderMap, peer: Option<IpAddr>) -> Result<(), GatewayError> {
        let key_header = self.keys.as_ref().map(|keys| &keys.header);
        if let Some(name) = first_repeated(headers, key_header) {
            return Err(GatewayError::DuplicateHeader(name));
        }
        if let Some(source) = &self.header
            && !peer.is_some_and(|ip| source.trusts(ip))
        {
            headers.remove(&source.name);
        }
        Ok(())
    }

    /// Removes every header holding a gateway API key. The api_key source's
    /// answer: the org of the first, the configured header before
    /// `x-api-key`; failing that, a refusal if either header holds anything
    /// (but a JWT left for the JWT source).
    fn take_api_keys(&self, headers: &mut HeaderMap) -> Answer {
        let keys = self.keys.as_ref()?;
        let mut found = None;
        let mut presented = false;
        for header in [&keys.header, &X_API_KEY] {
            let Some(value) = headers.get(header) else {
                continue;
            };
            let org = value
                .to_str()
                .ok()
                .and_then(|text| self.lookup(keys, credential(text)));
            match org {
                Some(org) => {
                    headers.remove(header);
                    found = found.or(Some(org));
                }
                None => presented |= !(self.jwt.is_some() && is_bearer_jwt(header, value)),
            }
        }
        match found {
            Some(org) => Some(Ok(org)),
            None => presented.then_some(Err(GatewayError::UnknownApiKey)),
        }
    }

    /// The org of the key `presented`, looked up by its sha256: the
    /// config's keys, then the runtime ones.
    ///
    /// A lookup by digest, in a hash map, is safe against timing attacks
    /// although it stops at a match and compares bytes as it goes: what it
    /// reads is the digest of the presented key, never the key, so its
    /// timing can at most tell which digest bytes a guess shares with a
    /// stored one; and learning bytes of a sha256 gives no way to a key
    /// that hashes to it. (Comparing with every key in constant time cost
    /// a request 663 µs with 10,000 keys.)
    fn lookup(&self, keys: &KeySource, presented: &str) -> Option<OrgId> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        keys.by_digest
            .get(&digest)
            .cloned()
            .or_else(|| self.catalog.as_ref()?.key_org(&digest))
    }

    /// The JWT source's answer. Runs after [`Self::take_api_keys`], which
    /// has removed an `Authorization` holding a known key.
    fn read_jwt(&self, headers: &HeaderMap) -> Answer {
        let config = self.jwt.as_ref()?;
        let value = headers.get(AUTHORIZATION)?;
        let shared = self
            .keys
            .as_ref()
            .is_some_and(|keys| keys.header == AUTHORIZATION);
        if shared && !is_bearer_jwt(&AUTHORIZATION, value) {
            // The api_key source's: a key that matched nothing.
            return None;
        }
        let token = value
            .to_str()
            .ok()
            .and_then(bearer_token)
            .ok_or(GatewayError::InvalidToken("not a bearer token"));
        Some(token.and_then(|token| jwt::verify(config, token)))
    }

    /// The header source's answer; from an untrusted peer the header is
    /// gone by now.
    fn read_org_header(&self, headers: &HeaderMap) -> Answer {
        let source = self.header.as_ref()?;
        let mut values = headers.get_all(&source.name).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return Some(Err(GatewayError::DuplicateHeader(source.name.clone())));
        }
        let org = value.to_str().ok().and_then(OrgId::parse);
        Some(org.ok_or(GatewayError::InvalidOrgId))
    }
}

/// The first of `Authorization`, `X-Api-Key` and `key_header` that
/// `headers` holds more than once. One pass over the headers, where a
/// hashed lookup of each cost some 250 instructions a request more
/// (callgrind).
fn first_repeated(headers: &HeaderMap, key_header: Option<&HeaderName>) -> Option<HeaderName> {
    let api_key = X_API_KEY;
    let names = [Some(&AUTHORIZATION), Some(&api_key), key_header];
    let mut seen = [0u8; 3];
    for (name, _) in headers.iter() {
        for (at, wanted) in names.iter().enumerate() {
            if *wanted == Some(name) {
                seen[at] = seen[at].saturating_add(1);
            }
        }
    }
    names
        .into_iter()
        .zip(seen)
        .find_map(|(name, count)| name.filter(|_| count > 1).cloned())
}

/// Whether `value`, in `header`, is a bearer token shaped like a JWT.
fn is_bearer_jwt(header: &HeaderName, value: &HeaderValue) -> bool {
    *header == AUTHORIZATION
        && value
            .to_str()
            .ok()
            .and_then(bearer_token)
            .is_some_and(jwt::looks_like_jwt)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ApiKey, ApiKeys, Redacted};

    const TRUSTED: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    const UNTRUSTED: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3)));

    fn api_keys() -> IdentitySource {
        let sha256 = Sha256::digest(b"tg_live_acme").into();
        IdentitySource::ApiKey(ApiKeys {
            header: AUTHORIZATION,
            keys: vec![ApiKey {
                sha256,
                org: OrgId::parse("org_acme").unwrap(),
                name: "acme".into(),
            }],
        })
    }

    fn jwt() -> IdentitySource {
        IdentitySource::Jwt(Arc::new(JwtConfig {
            algorithms: vec![jsonwebtoken::Algorithm::HS256],
            hmac_secret: Some(Redacted(jsonwebtoken::DecodingKey::from_secret(b"secret"))),
            public_keys: Redacted(Vec::new()),
            org_claim: vec!["org".into()],
            audience: None,
            issuer: None,
            leeway: std::time::Duration::ZERO,
        }))
    }

    fn org_header() -> IdentitySource {
        IdentitySource::Header(HeaderSource {
            name: HeaderName::from_static("x-org-id"),
            trusted_peers: vec!["127.0.0.1/32".parse().unwrap()],
        })
    }

    fn identifier() -> Identifier {
        Identifier::new(vec![api_keys(), org_header()])
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    fn org(answer: Result<OrgId, GatewayError>) -> String {
        answer.unwrap().as_str().to_string()
    }

    #[test]
    fn a_bearer_api_key_names_its_org_and_is_removed() {
        let mut h = headers(&[("authorization", "Bearer tg_live_acme")]);
        assert_eq!(org(identifier().identify(&mut h, TRUSTED)), "org_acme");
        assert!(h.get("authorization").is_none());
    }

    #[test]
    fn an_x_api_key_header_is_read_too() {
        let mut h = headers(&[("x-api-key", "tg_live_acme")]);
        assert_eq!(org(identifier().identify(&mut h, TRUSTED)), "org_acme");
        assert!(h.get("x-api-key").is_none());
    }

    #[test]
    fn a_known_key_in_one_header_decides_and_a_backend_token_in_the_other_is_left() {
        let mut h = headers(&[
            ("authorization", "Bearer backend-session"),
            ("x-api-key", "tg_live_acme"),
        ]);
        assert_eq!(org(identifier().identify(&mut h, TRUSTED)), "org_acme");
        assert_eq!(h["authorization"], "Bearer backend-session");
    }

    #[test]
    fn an_unknown_bearer_key_is_refused_not_passed_over_for_the_org_header() {
        let mut h = headers(&[("authorization", "Bearer not-a-key"), ("x-org-id", "org_b")]);
        assert!(matches!(
            identifier().identify(&mut h, TRUSTED),
            Err(GatewayError::UnknownApiKey)
        ));
    }

    #[test]
    fn an_unknown_x_api_key_is_refused_not_passed_over_for_the_org_header() {
        let mut h = headers(&[("x-api-key", "not-a-key"), ("x-org-id", "org_b")]);
        assert!(matches!(
            identifier().identify(&mut h, TRUSTED),
            Err(GatewayError::UnknownApiKey)
        ));
    }

    #[test]
    fn a_jwt_shaped_bearer_that_is_no_key_goes_to_the_jwt_source_and_fails_there() {
        let both = Identifier::new(vec![api_keys(), jwt(), org_header()]);
        let mut h = headers(&[
            ("authorization", "Bearer aaa.bbb.ccc"),
            ("x-org-id", "org_b"),
        ]);
        assert!(matches!(
            both.identify(&mut h, TRUSTED),
            Err(GatewayError::InvalidToken(_))
        ));
    }

    #[test]
    fn an_opaque_bearer_that_is_no_key_fails_as_a_key_even_with_a_jwt_source_first() {
        let jwt_first = Identifier::new(vec![jwt(), api_keys(), org_header()]);
        let mut h = headers(&[("authorization", "Bearer not-a-key"), ("x-org-id", "org_b")]);
        assert!(matches!(
            jwt_first.identify(&mut h, TRUSTED),
            Err(GatewayError::UnknownApiKey)
        ));
    }

    #[test]
    fn a_known_key_is_not_taken_for_a_jwt_whatever_the_order() {
        let jwt_first = Identifier::new(vec![jwt(), api_keys()]);
        let mut h = headers(&[("authorization", "Bearer tg_live_acme")]);
        assert_eq!(org(jwt_first.identify(&mut h, TRUSTED)), "org_acme");
    }

    #[test]
    fn the_first_source_in_order_wins() {
        let mut h = headers(&[
            ("authorization", "Bearer tg_live_acme"),
            ("x-org-id", "org_b"),
        ]);
        assert_eq!(org(identifier().identify(&mut h, TRUSTED)), "org_acme");

        // Listed first, a trusted header decides before a key is looked at;
        // a credential that matches nothing is then the backend's.
        let header_first = Identifier::new(vec![org_header(), api_keys()]);
        let mut h = headers(&[("authorization", "Bearer app"), ("x-org-id", "org_b")]);
        assert_eq!(org(header_first.identify(&mut h, TRUSTED)), "org_b");
        assert_eq!(h["authorization"], "Bearer app");
    }

    #[test]
    fn no_source_yields_unauthenticated() {
        assert!(matches!(
            identifier().identify(&mut HeaderMap::new(), TRUSTED),
            Err(GatewayError::Unauthenticated)
        ));
    }

    #[test]
    fn the_org_header_is_believed_only_from_a_trusted_peer() {
        let mut trusted = headers(&[("x-org-id", "org_b")]);
        assert_eq!(org(identifier().identify(&mut trusted, TRUSTED)), "org_b");

        for peer in [UNTRUSTED, None] {
            let mut h = headers(&[("x-org-id", "org_b")]);
            assert!(matches!(
                identifier().identify(&mut h, peer),
                Err(GatewayError::Unauthenticated)
            ));
            let mut h = headers(&[("x-org-id", "org_b")]);
            identifier().pass_unmetered(&mut h, peer).unwrap();
            assert!(h.is_empty(), "an untrusted org header was kept");
        }
    }

    #[test]
    fn a_key_from_an_untrusted_peer_still_names_its_org_in_the_org_header() {
        let mut h = headers(&[("x-api-key", "tg_live_acme"), ("x-org-id", "org_b")]);
        assert_eq!(org(identifier().identify(&mut h, UNTRUSTED)), "org_acme");
        assert_eq!(h["x-org-id"], "org_acme");
    }

    #[test]
    fn a_repeated_credential_header_is_refused_on_every_route() {
        for name in ["authorization", "x-api-key"] {
            let pairs = [(name, "junk"), (name, "Bearer tg_live_acme")];
            let refused = |result: Result<(), GatewayError>| matches!(result, Err(GatewayError::DuplicateHeader(h)) if h == name);
            assert!(refused(
                identifier()
                    .identify(&mut headers(&pairs), TRUSTED)
                    .map(drop)
            ));
            assert!(refused(
                identifier().pass_unmetered(&mut headers(&pairs), TRUSTED)
            ));
        }
    }

    #[test]
    fn a_repeated_org_header_is_refused() {
        let mut h = headers(&[("x-org-id", "org_a"), ("x-org-id", "org_b")]);
        assert!(matches!(
            identifier().identify(&mut h, TRUSTED),
            Err(GatewayError::DuplicateHeader(_))
        ));
    }

    #[test]
    fn a_malformed_org_header_is_rejected() {
        let mut h = headers(&[("x-org-id", "org:1")]);
        assert!(matches!(
            identifier().identify(&mut h, TRUSTED),
            Err(GatewayError::InvalidOrgId)
        ));
    }

    #[test]
    fn a_key_in_both_headers_is_removed_from_both() {
        let mut h = headers(&[
            ("authorization", "bearer tg_live_acme"),
            ("x-api-key", "tg_live_acme"),
        ]);
        assert_eq!(org(identifier().identify(&mut h, TRUSTED)), "org_acme");
        assert!(h.get("authorization").is_none() && h.get("x-api-key").is_none());
    }

    #[test]
    fn once_a_key_names_the_org_the_org_header_is_overwritten_not_validated() {
        let mut h = headers(&[("x-api-key", "tg_live_acme"), ("x-org-id", "other:org")]);
        assert_eq!(org(identifier().identify(&mut h, TRUSTED)), "org_acme");
        assert_eq!(h["x-org-id"], "org_acme");
    }

    #[test]
    fn unmetered_requests_lose_gateway_keys_but_keep_other_credentials() {
        let mut ours = headers(&[("x-api-key", "tg_live_acme")]);
        identifier().pass_unmetered(&mut ours, TRUSTED).unwrap();
        assert!(ours.is_empty());
        let mut theirs = headers(&[
            ("authorization", "Bearer backend-jwt"),
            ("x-api-key", "backend-key"),
        ]);
        identifier().pass_unmetered(&mut theirs, TRUSTED).unwrap();
        assert_eq!(theirs.len(), 2);
    }
}
