//! Signed, expiring values: the customer's usage link, which the admin API
//! makes and the usage page checks, and the admin pages' session cookie.
//! Both are HMAC-SHA256 tags over a canonical text, checked in constant
//! time, so this is the one place that signs and verifies.

use std::fmt;
use std::sync::Arc;

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::org::OrgId;

type HmacSha256 = hmac::Hmac<Sha256>;

/// The longest a usage link may live: 90 days.
pub const MAX_LINK_SECONDS: i64 = 90 * 24 * 3600;
/// A usage link's life when the request names none: 7 days.
pub const DEFAULT_LINK_SECONDS: i64 = 7 * 24 * 3600;

/// A signing key. `Debug` never shows it.
#[derive(Clone)]
pub struct SigningKey(Arc<[u8]>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl SigningKey {
    pub fn new(secret: &[u8]) -> SigningKey {
        SigningKey(secret.into())
    }

    /// A key of 32 random bytes, for what lives as long as the process.
    pub fn random() -> Result<SigningKey, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(SigningKey::new(&bytes))
    }

    fn mac(&self, fields: &[&str]) -> HmacSha256 {
        // HMAC takes a key of any length; this cannot fail.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| <HmacSha256 as KeyInit>::new(&Default::default()));
        // Each field ends with a newline, which none of them may hold, so
        // no two lists of fields sign the same text.
        for field in fields {
            mac.update(field.as_bytes());
            mac.update(b"\n");
        }
        mac
    }

    /// The hex tag of `fields`.
    pub fn sign(&self, fields: &[&str]) -> String {
        hex::encode(self.mac(fields).finalize().into_bytes())
    }

    /// Whether `tag` (hex) is the tag of `fields`, compared in constant time.
    pub fn verify(&self, fields: &[&str], tag: &str) -> bool {
        if fields.iter().any(|field| field.contains('\n')) {
            return false;
        }
        match hex::decode(tag) {
            Ok(tag) => self.mac(fields).verify_slice(&tag).is_ok(),
            Err(_) => false,
        }
    }
}

/// Why a usage link is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkRefused {
    #[error("this usage link is not valid: it was altered or is incomplete")]
    Invalid,
    #[error("this usage link has expired: ask for a new one")]
    Expired,
}

/// A usage link's content: the org it shows, and until when (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageLink {
    pub org: OrgId,
    pub expires: i64,
}

/// What the link's tag covers; the first field names what is signed, so a
/// session tag can never pass for a link's.
const LINK_PURPOSE: &str = "tollgate-usage-link-v1";

impl UsageLink {
    fn tag(&self, key: &SigningKey) -> String {
        key.sign(&[LINK_PURPOSE, self.org.as_str(), &self.expires.to_string()])
    }

    /// The link's query: `org=..&expires=..&sig=..`. An org id needs no
    /// escaping (`[A-Za-z0-9_.-]`).
    pub fn query(&self, key: &SigningKey) -> String {
        format!(
            "org={}&expires={}&sig={}",
            self.org,
            self.expires,
            self.tag(key)
        )
    }

    /// The link a query names, if its tag is `key`'s and it has not expired
    /// at `now` (Unix seconds). Other query parameters are ignored.
    pub fn from_query(query: &str, key: &SigningKey, now: i64) -> Result<UsageLink, LinkRefused> {
        let (mut org, mut expires, mut sig) = (None, None, None);
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("org", value)) => org = Some(value),
                Some(("expires", value)) => expires = Some(value),
                Some(("sig", value)) => sig = Some(value),
                _ => {}
            }
        }
        let (Some(org), Some(expires_text), Some(sig)) = (org, expires, sig) else {
            return Err(LinkRefused::Invalid);
        };
        let org = OrgId::parse(org).ok_or(LinkRefused::Invalid)?;
        let expires: i64 = expires_text.parse().map_err(|_| LinkRefused::Invalid)?;
        // The tag covers the text as sent, so `+5` or `05` cannot stand for 5.
        if !key.verify(&[LINK_PURPOSE, org.as_str(), expires_text], sig) {
            return Err(LinkRefused::Invalid);
        }
        if expires <= now {
            return Err(LinkRefused::Expired);
        }
        Ok(UsageLink { org, expires })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600;

    fn key() -> SigningKey {
        SigningKey::new(b"0123456789abcdef0123456789abcdef")
    }

    fn link(org: &str) -> UsageLink {
        UsageLink {
            org: OrgId::parse(org).unwrap(),
            expires: NOW + 60,
        }
    }

    #[test]
    fn a_signed_link_reads_back_before_it_expires() {
        let query = link("org_acme").query(&key());
        assert_eq!(
            UsageLink::from_query(&query, &key(), NOW),
            Ok(link("org_acme"))
        );
        assert!(query.starts_with("org=org_acme&expires=1767225660&sig="));
    }

    #[test]
    fn a_link_is_refused_as_expired_from_its_expiry_on() {
        let query = link("org_acme").query(&key());
        assert_eq!(
            UsageLink::from_query(&query, &key(), NOW + 60),
            Err(LinkRefused::Expired)
        );
    }

    #[test]
    fn an_altered_org_expiry_or_tag_is_refused() {
        let query = link("org_acme").query(&key());
        let altered = [
            query.replace("org_acme", "org_beta"),
            query.replace("1767225660", "1767225661"),
            query.replace("1767225660", "+1767225660"),
            format!("{}0", query),
            query.replace("sig=", "sig=zz"),
        ];
        for query in altered {
            assert_eq!(
                UsageLink::from_query(&query, &key(), NOW),
                Err(LinkRefused::Invalid),
                "{query}"
            );
        }
    }

    #[test]
    fn another_orgs_tag_does_not_open_this_org() {
        let beta = link("org_beta").query(&key());
        let sig = beta.split("sig=").nth(1).unwrap();
        let forged = format!("org=org_acme&expires={}&sig={sig}", NOW + 60);
        assert_eq!(
            UsageLink::from_query(&forged, &key(), NOW),
            Err(LinkRefused::Invalid)
        );
    }

    #[test]
    fn a_link_signed_with_another_secret_is_refused() {
        let other = SigningKey::new(b"another secret of thirty-two byte");
        let query = link("org_acme").query(&other);
        assert_eq!(
            UsageLink::from_query(&query, &key(), NOW),
            Err(LinkRefused::Invalid)
        );
    }

    #[test]
    fn a_link_missing_a_part_is_refused() {
        for query in ["", "org=org_acme", "org=org_acme&expires=1767225660"] {
            assert_eq!(
                UsageLink::from_query(query, &key(), NOW),
                Err(LinkRefused::Invalid)
            );
        }
    }
}
