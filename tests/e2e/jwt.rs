//! JWT identity: tokens the gateway admits, with the right org, and every
//! way a token is refused, each a 401 in the gateway's envelope.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use tollgate::quota::Dimension;

use crate::support::{Gateway, Upstream, client, config_with, envelope, fixed_clock};

const SECRET: &str = "super-secret-jwt-signing-key-for-tests";
const RSA_KEY: &[u8] = include_bytes!("../fixtures/jwt-rs256-test-key.pem");
/// Unix time now: token expiry is checked against the system clock.
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn gateway(upstream: &Upstream) -> Gateway {
    let config = config_with(|c| {
        c.replace("sources = [\"api_key\", \"header\"]", "sources = [\"api_key\", \"jwt\", \"header\"]").replace(
            "[identity.header]",
            "[identity.jwt]\nalgorithms = [\"HS256\", \"RS256\"]\nsecret = \"${JWT_SECRET}\"\njwks_file = \"${JWKS_FILE}\"\n\
             org_claim = \"app_metadata.org_id\"\naudience = \"authenticated\"\nissuer = \"https://auth.example/v1\"\nleeway = \"5s\"\n\n\
             [identity.header]",
        )
    });
    let vars = [
        ("JWT_SECRET", SECRET.to_string()),
        (
            "JWKS_FILE",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwks.json").to_string(),
        ),
    ];
    Gateway::launch(&config, upstream, &vars, fixed_clock()).await
}

fn claims(org: &str) -> serde_json::Value {
    json!({
        "sub": "user-1",
        "aud": "authenticated",
        "iss": "https://auth.example/v1",
        "exp": now() + 600,
        "nbf": now() - 10,
        "app_metadata": {"org_id": org}
    })
}

fn hs256(claims: &serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn rs256(claims: &serde_json::Value, kid: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_string());
    encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
    )
    .unwrap()
}

async fn run_with(gateway: &Gateway, token: &str) -> reqwest::Response {
    client()
        .post(gateway.url("/api/v1/playbooks/pb_1/execute"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-org-id", "org_spoofed")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn valid_hs256_and_rs256_tokens_are_admitted_with_their_org() {
    let upstream = Upstream::start().await;
    let gateway = gateway(&upstream).await;

    assert_eq!(
        run_with(&gateway, &hs256(&claims("org_hs"))).await.status(),
        200
    );
    assert_eq!(
        run_with(&gateway, &rs256(&claims("org_rs"), "test-rs256"))
            .await
            .status(),
        200
    );

    assert_eq!(gateway.used("org_hs", Dimension::PlaybookRuns).await, 1);
    assert_eq!(gateway.used("org_rs", Dimension::PlaybookRuns).await, 1);
    assert_eq!(
        gateway.used("org_spoofed", Dimension::PlaybookRuns).await,
        0
    );
    let seen = upstream.seen();
    assert_eq!(
        seen[0].headers["x-org-id"], "org_hs",
        "the backend must see the org that pays"
    );
    assert!(
        seen[0].headers["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Bearer ey"),
        "the user's JWT is the backend's to read"
    );
}

async fn refused(token: &str) {
    let upstream = Upstream::start().await;
    let gateway = gateway(&upstream).await;
    let body = envelope(run_with(&gateway, token).await, 401, "UNAUTHORIZED").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("the bearer token was not accepted"),
        "{body}"
    );
    assert_eq!(upstream.hits(), 0);
}

fn b64(value: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

#[tokio::test]
async fn an_unsigned_alg_none_token_is_refused() {
    refused(&format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims("org_x"))
    ))
    .await;
}

#[tokio::test]
async fn an_hs256_token_signed_with_the_rsa_public_key_is_refused() {
    // The classic confusion attack: the public key, which anyone may have,
    // used as an HMAC secret.
    let public_pem = include_bytes!("../fixtures/jwt-rs256-test-public.pem");
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims("org_x"),
        &EncodingKey::from_secret(public_pem),
    )
    .unwrap();
    refused(&forged).await;
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let mut expired = claims("org_x");
    expired["exp"] = json!(now() - 60);
    refused(&hs256(&expired)).await;
}

#[tokio::test]
async fn a_token_not_valid_yet_is_refused() {
    let mut early = claims("org_x");
    early["nbf"] = json!(now() + 3600);
    refused(&hs256(&early)).await;
}

#[tokio::test]
async fn a_token_for_another_audience_is_refused() {
    let mut other = claims("org_x");
    other["aud"] = json!("service_role");
    refused(&hs256(&other)).await;
}

#[tokio::test]
async fn a_token_from_another_issuer_is_refused() {
    let mut other = claims("org_x");
    other["iss"] = json!("https://evil.example");
    refused(&rs256(&other, "test-rs256")).await;
}

#[tokio::test]
async fn a_token_signed_by_an_unknown_key_is_refused() {
    refused(&rs256(&claims("org_x"), "rotated-away")).await;
}

#[tokio::test]
async fn a_token_without_the_org_claim_is_refused() {
    let mut anonymous = claims("org_x");
    anonymous["app_metadata"] = json!({});
    refused(&hs256(&anonymous)).await;
}

#[tokio::test]
async fn a_tampered_token_is_refused() {
    let token = hs256(&claims("org_x"));
    let parts: Vec<&str> = token.split('.').collect();
    refused(&format!(
        "{}.{}.{}",
        parts[0],
        b64(&claims("org_rich")),
        parts[2]
    ))
    .await;
}
