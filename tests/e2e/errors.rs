//! Every answer the gateway makes itself: the envelope, the status, and that
//! nothing reached the upstream or stayed reserved when it should not have.

use std::time::Duration;

use tollgate::quota::Dimension;

use crate::support::{Gateway, Upstream, client, config, config_with, envelope};

#[tokio::test]
async fn a_metered_route_without_an_org_is_401() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    let response = client()
        .post(gateway.url("/api/v1/playbooks/pb_1/execute"))
        .header("authorization", "Bearer not-a-gateway-key")
        .send()
        .await
        .unwrap();

    envelope(response, 401, "UNAUTHORIZED").await;
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn a_malformed_org_id_is_400() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    let response = client()
        .post(gateway.url("/api/v1/playbooks/pb_1/execute"))
        .header("x-org-id", "org:{x}")
        .send()
        .await
        .unwrap();

    envelope(response, 400, "INVALID_ORG_ID").await;
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn invalid_json_on_an_estimate_route_is_400_and_not_forwarded() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("x-org-id", "org_j")
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();

    let body = envelope(response, 400, "INVALID_BODY").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("the request body is not valid JSON"),
        "{body}"
    );
    assert_eq!(upstream.hits(), 0);
    assert_eq!(gateway.used("org_j", Dimension::Tokens).await, 0);
}

#[tokio::test]
async fn no_matching_route_is_404() {
    let upstream = Upstream::start().await;
    // Without the catch-all, nothing matches an unknown path.
    let config = config_with(|c| c.replace("path = \"/{*rest}\"", "path = \"/only/{*rest}\""));
    let gateway = Gateway::start(&config, &upstream).await;

    let response = client().get(gateway.url("/nowhere")).send().await.unwrap();

    envelope(response, 404, "NOT_FOUND").await;
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn a_metered_body_over_the_limit_is_413_and_never_reaches_the_upstream() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;
    let oversized = vec![b'x'; 1024 * 1024 + 1];

    let declared = client()
        .post(gateway.url("/api/v1/playbooks/pb_1/execute"))
        .header("x-org-id", "org_b")
        .body(oversized.clone())
        .send()
        .await
        .unwrap();
    envelope(declared, 413, "PAYLOAD_TOO_LARGE").await;

    // Chunked, so only reading it shows the size.
    let chunks = oversized
        .chunks(64 * 1024)
        .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
        .collect::<Vec<_>>();
    let chunked = client()
        .post(gateway.url("/api/v1/playbooks/pb_1/execute"))
        .header("x-org-id", "org_b")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    envelope(chunked, 413, "PAYLOAD_TOO_LARGE").await;

    assert_eq!(upstream.hits(), 0);
    assert_eq!(gateway.used("org_b", Dimension::PlaybookRuns).await, 0);
}

#[tokio::test]
async fn an_unreachable_upstream_is_502_and_the_reservation_is_refunded() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    let metered = client()
        .post(gateway.url("/dead/metered"))
        .header("x-org-id", "org_d")
        .send()
        .await
        .unwrap();
    let body = envelope(metered, 502, "BAD_GATEWAY").await;
    let unmetered = client()
        .get(gateway.url("/dead/anything"))
        .send()
        .await
        .unwrap();
    envelope(unmetered, 502, "BAD_GATEWAY").await;

    assert!(
        !body.to_string().contains("127.0.0.1"),
        "the envelope leaks the upstream address: {body}"
    );
    gateway
        .settles_at("org_d", Dimension::PlaybookRuns, 0)
        .await;
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_in_time_is_504_and_the_reservation_is_refunded() {
    let upstream = Upstream::start().await;
    let config = config_with(|c| {
        c.replace(
            crate::support::UPSTREAM_TIMEOUT,
            "upstream_timeout = \"500ms\"",
        )
    });
    let gateway = Gateway::start(&config, &upstream).await;

    let response = client()
        .post(gateway.url("/api/v1/playbooks/pb_1/execute"))
        .header("x-org-id", "org_slow")
        .header("x-test-hold", "1")
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();

    envelope(response, 504, "GATEWAY_TIMEOUT").await;
    gateway
        .settles_at("org_slow", Dimension::PlaybookRuns, 0)
        .await;
}

#[tokio::test]
async fn a_metered_body_read_whole_is_cut_at_the_upstream_timeout_and_refunded() {
    let upstream = Upstream::start().await;
    let config = config_with(|c| {
        c.replace(
            crate::support::UPSTREAM_TIMEOUT,
            "upstream_timeout = \"400ms\"",
        )
    });
    let gateway = Gateway::start(&config, &upstream).await;

    let started = std::time::Instant::now();
    let response = client()
        .post(gateway.url("/api/v1/playbooks/pb_1/execute"))
        .header("x-org-id", "org_slow_body")
        .header("x-test-hold", "1")
        .header("content-type", "application/json")
        .body(r#"{"inputs":{"region":"emea"}}"#)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();

    // Never before its limit; within a few seconds even on a loaded machine.
    assert!(took >= Duration::from_millis(400), "cut after {took:?}");
    assert!(took < Duration::from_secs(5), "cut after {took:?}");
    envelope(response, 504, "GATEWAY_TIMEOUT").await;
    gateway
        .settles_at("org_slow_body", Dimension::PlaybookRuns, 0)
        .await;
    upstream.release();
}

#[tokio::test]
async fn an_upstream_error_status_passes_through_and_refunds_the_reservation() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    let response = client()
        .post(gateway.url("/api/v1/content/briefs/generate"))
        .header("x-org-id", "org_f")
        .header("x-test-status", "500")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 500);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body["path"], "/api/v1/content/briefs/generate",
        "the upstream's own body is passed through"
    );
    assert_eq!(upstream.hits(), 1);
    gateway.settles_at("org_f", Dimension::Tokens, 0).await;
    assert_eq!(
        crate::support::count(&gateway.app, "tollgate_refunds_total", &[]),
        1
    );
}

#[tokio::test]
async fn a_refunded_seat_release_gives_the_seat_back() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;
    let add = client()
        .post(gateway.url("/api/v1/orgs/o/members"))
        .header("x-org-id", "org_r")
        .send()
        .await
        .unwrap();
    assert_eq!(add.status(), 200);

    let failed_remove = client()
        .delete(gateway.url("/api/v1/orgs/o/members/m"))
        .header("x-org-id", "org_r")
        .header("x-test-status", "409")
        .send()
        .await
        .unwrap();

    assert_eq!(failed_remove.status(), 409);
    gateway.settles_at("org_r", Dimension::Seats, 1).await;
}

#[tokio::test]
async fn a_metered_body_that_stalls_is_408_and_never_reaches_the_upstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let config = config_with(|c| {
        c.replace(
            "max_body_bytes = 1048576",
            "max_body_bytes = 1048576\nbody_read_timeout = \"200ms\"",
        )
    });
    let gateway = Gateway::start(&config, &upstream).await;
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();

    // Ten bytes announced, two sent, then nothing.
    stream
        .write_all(b"POST /api/v1/playbooks/pb_1/execute HTTP/1.1\r\nhost: t\r\nx-org-id: org_stall\r\ncontent-length: 10\r\n\r\nab")
        .await
        .unwrap();
    let mut answer = Vec::new();
    crate::support::within(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .unwrap();

    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"REQUEST_TIMEOUT""#), "{answer}");
    assert_eq!(upstream.hits(), 0);
    assert_eq!(gateway.used("org_stall", Dimension::PlaybookRuns).await, 0);
}

#[tokio::test]
async fn a_route_can_name_the_upstream_statuses_that_refund() {
    let upstream = Upstream::start().await;
    let config = config_with(|c| {
        c.replace(
            "path = \"/api/v1/content/briefs/generate\"\nupstream = \"api\"\ncost = { tokens = 10000 }",
            "path = \"/api/v1/content/briefs/generate\"\nupstream = \"api\"\ncost = { tokens = 10000 }\nrefund_statuses = [503]",
        )
    });
    let gateway = Gateway::start(&config, &upstream).await;
    let brief = |status: &'static str| {
        client()
            .post(gateway.url("/api/v1/content/briefs/generate"))
            .header("x-org-id", "org_q")
            .header("x-test-status", status)
            .send()
    };

    assert_eq!(brief("500").await.unwrap().status(), 500);
    assert_eq!(brief("503").await.unwrap().status(), 503);

    // The 500 was not in the list: its 10,000 tokens stand; the 503's came back.
    gateway.settles_at("org_q", Dimension::Tokens, 10_000).await;
    assert_eq!(
        crate::support::count(&gateway.app, "tollgate_refunds_total", &[]),
        1
    );
}

#[tokio::test]
async fn an_unmetered_request_to_an_upstream_that_never_answers_is_cut_at_its_timeout() {
    let upstream = Upstream::start().await;
    let config = config_with(|c| {
        c.replace(
            crate::support::UPSTREAM_TIMEOUT,
            "upstream_timeout = \"400ms\"",
        )
    });
    let gateway = Gateway::start(&config, &upstream).await;

    // Two at once: the second waits on the clock the first started.
    let held = |path: &'static str| {
        let url = gateway.url(path);
        async move {
            let started = std::time::Instant::now();
            let response = client()
                .get(url)
                .header("x-test-hold", "1")
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .unwrap();
            (response, started.elapsed())
        }
    };
    let ((first, first_took), (second, second_took)) =
        tokio::join!(held("/api/v1/held/a"), held("/api/v1/held/b"));

    for (response, took) in [(first, first_took), (second, second_took)] {
        // Never before its limit; within a few seconds even on a loaded
        // machine.
        assert!(took >= Duration::from_millis(400), "cut after {took:?}");
        assert!(took < Duration::from_secs(5), "cut after {took:?}");
        envelope(response, 504, "GATEWAY_TIMEOUT").await;
    }
    upstream.release();
}
