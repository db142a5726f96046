//! The admin pages' session: after one login with an admin token, a cookie
//! holding the token's name and an expiry, signed under a key of this
//! process's own (so a restart logs everyone out), never the token itself.

use http::HeaderMap;
use http::header::COOKIE;

use crate::config::AdminToken;
use crate::usage_link::SigningKey;

pub const COOKIE_NAME: &str = "tollgate_ui";
/// How long a login lasts: 12 hours.
pub const LIFE_SECONDS: i64 = 12 * 3600;
const PURPOSE: &str = "tollgate-ui-session-v1";

/// The `Set-Cookie` value of a session for the token named `name`.
pub fn issue(key: &SigningKey, name: &str, now: i64) -> String {
    let (name, expires) = (hex::encode(name), (now + LIFE_SECONDS).to_string());
    let sig = key.sign(&[PURPOSE, &name, &expires]);
    format!(
        "{COOKIE_NAME}={name}.{expires}.{sig}; HttpOnly; SameSite=Strict; Path=/; Max-Age={LIFE_SECONDS}"
    )
}

/// The `Set-Cookie` value that ends a session.
pub fn cleared() -> String {
    format!("{COOKIE_NAME}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// Whether the request carries a session signed by `key`, not expired at
/// `now`, of a token `[admin] tokens` still lists.
pub fn valid(key: &SigningKey, headers: &HeaderMap, now: i64, tokens: &[AdminToken]) -> bool {
    let values = headers.get_all(COOKIE).iter();
    let pairs = values
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix(COOKIE_NAME)?.strip_prefix('='));
    pairs
        .into_iter()
        .any(|session| holds(key, session, now, tokens))
}

fn holds(key: &SigningKey, session: &str, now: i64, tokens: &[AdminToken]) -> bool {
    let mut parts = session.splitn(3, '.');
    let (Some(name), Some(expires), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    if !key.verify(&[PURPOSE, name, expires], sig) {
        return false;
    }
    let live = expires.parse::<i64>().is_ok_and(|expires| expires > now);
    let named = hex::decode(name)
        .ok()
        .and_then(|name| String::from_utf8(name).ok());
    live && named.is_some_and(|name| tokens.iter().any(|token| token.name == name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Redacted;

    const NOW: i64 = 1_767_225_600;

    fn tokens() -> Vec<AdminToken> {
        vec![AdminToken {
            sha256: Redacted([0; 32]),
            name: "ops".into(),
        }]
    }

    fn cookie_header(set_cookie: &str) -> HeaderMap {
        let pair = set_cookie.split(';').next().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, format!("other=1; {pair}").parse().unwrap());
        headers
    }

    #[test]
    fn a_session_holds_until_twelve_hours_after_login() {
        let key = SigningKey::new(b"k");
        let headers = cookie_header(&issue(&key, "ops", NOW));
        assert!(valid(&key, &headers, NOW + LIFE_SECONDS - 1, &tokens()));
        assert!(!valid(&key, &headers, NOW + LIFE_SECONDS, &tokens()));
    }

    #[test]
    fn a_session_of_another_process_or_a_removed_token_does_not_hold() {
        let key = SigningKey::new(b"k");
        let headers = cookie_header(&issue(&key, "ops", NOW));
        assert!(!valid(&SigningKey::new(b"other"), &headers, NOW, &tokens()));
        assert!(!valid(&key, &headers, NOW, &[]));
        let forged = cookie_header(&issue(&key, "ops", NOW).replace(".1767", ".2767"));
        assert!(!valid(&key, &forged, NOW, &tokens()));
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_never_holds_the_token() {
        let cookie = issue(&SigningKey::new(b"k"), "ops", NOW);
        assert!(cookie.contains("HttpOnly; SameSite=Strict; Path=/"));
        assert!(cookie.starts_with("tollgate_ui=6f7073."));
    }
}
