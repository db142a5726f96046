//! Identity that cannot be talked around: a failed credential is never
//! passed over for a weaker source, the org header is believed only from
//! trusted peers, repeated credential headers are refused, and the org
//! header the gateway sets survives whatever `Connection` names.

use std::net::{IpAddr, Ipv4Addr};

use tollgate::quota::Dimension;

use crate::support::{Gateway, KEY_ACME, Upstream, client, config, config_with, envelope};

const RUN: &str = "/api/v1/playbooks/pb_1/execute";
const UNMETERED: &str = "/api/v1/anything";
/// Trusted by [`trusting_127_0_0_2`]; 127.0.0.1 is not.
const AUTH_LAYER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// The usual gateway, but with the org header believed from 127.0.0.2 only.
async fn trusting_127_0_0_2(upstream: &Upstream) -> Gateway {
    let config = config_with(|c| {
        c.replace(
            "trusted_peers = [\"127.0.0.1/32\"]",
            "trusted_peers = [\"10.0.0.0/8\", \"127.0.0.2\"]",
        )
    });
    Gateway::start(&config, upstream).await
}

/// A client whose connections come from `ip`.
fn client_from(ip: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip)
        .build()
        .unwrap()
}

#[tokio::test]
async fn an_unknown_key_with_an_org_header_is_401_and_nothing_is_counted() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    for (header, value) in [
        ("authorization", "Bearer not-a-gateway-key"),
        ("x-api-key", "not-a-gateway-key"),
    ] {
        let response = client()
            .post(gateway.url(RUN))
            .header(header, value)
            .header("x-org-id", "org_victim")
            .send()
            .await
            .unwrap();
        envelope(response, 401, "UNAUTHORIZED").await;
    }

    assert_eq!(upstream.hits(), 0);
    assert_eq!(gateway.used("org_victim", Dimension::PlaybookRuns).await, 0);
}

#[tokio::test]
async fn the_org_header_counts_only_from_a_trusted_peer_on_a_metered_route() {
    let upstream = Upstream::start().await;
    let gateway = trusting_127_0_0_2(&upstream).await;

    let untrusted = client()
        .post(gateway.url(RUN))
        .header("x-org-id", "org_victim")
        .send()
        .await
        .unwrap();
    envelope(untrusted, 401, "UNAUTHORIZED").await;
    assert_eq!(upstream.hits(), 0);
    assert_eq!(gateway.used("org_victim", Dimension::PlaybookRuns).await, 0);

    let trusted = client_from(AUTH_LAYER)
        .post(gateway.url(RUN))
        .header("x-org-id", "org_victim")
        .send()
        .await
        .unwrap();
    assert_eq!(trusted.status(), 200);
    assert_eq!(gateway.used("org_victim", Dimension::PlaybookRuns).await, 1);
}

#[tokio::test]
async fn the_org_header_from_an_untrusted_peer_never_reaches_the_backend() {
    let upstream = Upstream::start().await;
    let gateway = trusting_127_0_0_2(&upstream).await;

    for sender in [client(), client_from(AUTH_LAYER)] {
        let response = sender
            .get(gateway.url(UNMETERED))
            .header("x-org-id", "org_claimed")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    let seen = upstream.seen();
    assert!(
        seen[0].headers.get("x-org-id").is_none(),
        "a client's unverified org reached the backend"
    );
    assert_eq!(seen[1].headers["x-org-id"], "org_claimed");
}

#[tokio::test]
async fn two_authorization_headers_are_400_and_nothing_reaches_the_upstream() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    for (method, path) in [
        (reqwest::Method::POST, RUN),
        (reqwest::Method::GET, UNMETERED),
    ] {
        let response = client()
            .request(method, gateway.url(path))
            .header("authorization", "Bearer junk")
            .header("authorization", format!("Bearer {KEY_ACME}"))
            .send()
            .await
            .unwrap();
        let body = envelope(response, 400, "DUPLICATE_HEADER").await;
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("more than one authorization header"),
            "{body}"
        );
    }

    assert_eq!(upstream.hits(), 0);
    assert_eq!(gateway.used("org_acme", Dimension::PlaybookRuns).await, 0);
}

#[tokio::test]
async fn two_x_api_key_headers_are_400_and_nothing_reaches_the_upstream() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    for (method, path) in [
        (reqwest::Method::POST, RUN),
        (reqwest::Method::GET, UNMETERED),
    ] {
        let response = client()
            .request(method, gateway.url(path))
            .header("x-api-key", KEY_ACME)
            .header("x-api-key", "backend-key")
            .send()
            .await
            .unwrap();
        envelope(response, 400, "DUPLICATE_HEADER").await;
    }

    assert_eq!(upstream.hits(), 0);
    assert_eq!(gateway.used("org_acme", Dimension::PlaybookRuns).await, 0);
}

#[tokio::test]
async fn connection_naming_the_org_header_still_delivers_the_gateways_org() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    let response = client()
        .post(gateway.url(RUN))
        .header("authorization", format!("Bearer {KEY_ACME}"))
        .header("connection", "x-org-id, x-forwarded-proto")
        .header("x-org-id", "org_victim")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let seen = &upstream.seen()[0];
    assert_eq!(seen.headers["x-org-id"], "org_acme");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(gateway.used("org_acme", Dimension::PlaybookRuns).await, 1);
}

#[tokio::test]
async fn a_bad_jwt_with_an_org_header_is_401_and_nothing_is_counted() {
    let upstream = Upstream::start().await;
    let config = config_with(|c| {
        c.replace(
            "sources = [\"api_key\", \"header\"]",
            "sources = [\"jwt\", \"header\"]",
        )
        .replace(
            "[identity.header]",
            "[identity.jwt]\nalgorithms = [\"HS256\"]\nsecret = \"jwt-secret-for-tests\"\n\
             org_claim = \"org_id\"\n\n[identity.header]",
        )
    });
    let gateway = Gateway::start(&config, &upstream).await;

    // One token with a JWT's shape and one without: both are the JWT
    // source's credential, and both fail.
    for token in ["eyJhbGciOiJIUzI1NiJ9.e30.forged", "not-a-jwt"] {
        let response = client()
            .post(gateway.url(RUN))
            .header("authorization", format!("Bearer {token}"))
            .header("x-org-id", "org_victim")
            .send()
            .await
            .unwrap();
        envelope(response, 401, "UNAUTHORIZED").await;
    }

    assert_eq!(upstream.hits(), 0);
    assert_eq!(gateway.used("org_victim", Dimension::PlaybookRuns).await, 0);
}
