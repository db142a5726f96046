//! JWT identity: the org is read from a claim of a token whose signature,
//! algorithm, expiry, not-before, audience and issuer all check out.
//!
//! Only configured algorithms are accepted, and the key is chosen by the
//! token's algorithm family: HMAC tokens are checked with the secret alone,
//! RSA and EC tokens with the JWKS public keys alone. A public key can thus
//! never be used as an HMAC secret, and `alg: none` is no algorithm at all.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::Value;

use crate::config::JwtConfig;
use crate::error::GatewayError;
use crate::org::OrgId;

/// Whether a bearer credential has the shape of a JWT (three dot-separated
/// parts), as opposed to an opaque API key.
pub(super) fn looks_like_jwt(credential: &str) -> bool {
    credential.split('.').count() == 3
}

/// The org named by `token`'s org claim, once the token is verified.
pub(super) fn verify(config: &JwtConfig, token: &str) -> Result<OrgId, GatewayError> {
    let reject = |reason: &'static str| GatewayError::InvalidToken(reason);
    let header =
        decode_header(token).map_err(|_| reject("malformed token or unsupported algorithm"))?;
    if !config.algorithms.contains(&header.alg) {
        return Err(reject("algorithm not accepted"));
    }
    let key = key_for(config, header.alg, header.kid.as_deref())?;
    let claims = decode::<Value>(token, key, &validation(config, header.alg))
        .map_err(|e| {
            reject(match e.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not valid yet",
                ErrorKind::InvalidAudience => "wrong audience",
                ErrorKind::InvalidIssuer => "wrong issuer",
                ErrorKind::InvalidSignature => "bad signature",
                ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
                _ => "invalid token",
            })
        })?
        .claims;
    let org = config
        .org_claim
        .iter()
        .try_fold(&claims, |value, key| value.get(key));
    match org {
        Some(Value::String(org)) => OrgId::parse(org).ok_or(GatewayError::InvalidOrgId),
        _ => Err(reject("the org claim is missing")),
    }
}

fn key_for<'a>(
    config: &'a JwtConfig,
    algorithm: Algorithm,
    kid: Option<&str>,
) -> Result<&'a DecodingKey, GatewayError> {
    let family = algorithm.family();
    if family == jsonwebtoken::AlgorithmFamily::Hmac {
        return config
            .hmac_secret
            .as_ref()
            .map(|s| &s.0)
            .ok_or(GatewayError::InvalidToken("algorithm not accepted"));
    }
    let mut candidates = config.public_keys.0.iter().filter(|k| k.family == family);
    let key = match kid {
        Some(kid) => candidates.find(|k| k.kid.as_deref() == Some(kid)),
        // Without a kid, only an unambiguous key will do.
        None => match (candidates.next(), candidates.next()) {
            (Some(only), None) => Some(only),
            _ => None,
        },
    };
    key.map(|k| &k.key)
        .ok_or(GatewayError::InvalidToken("unknown signing key"))
}

fn validation(config: &JwtConfig, algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = config.leeway.as_secs();
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    // Left on even without an audience configured: a token that names an
    // audience is then refused, as RFC 7519 asks, rather than accepted for
    // whichever app it was minted for.
    if let Some(audience) = &config.audience {
        validation.set_audience(&[audience]);
        required.push("aud");
    }
    if let Some(issuer) = &config.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation
}
