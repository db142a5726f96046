//! What reaches the upstream, streaming, client disconnects and shutdown.

use std::time::Duration;

use futures_util::StreamExt;
use tollgate::quota::Dimension;

use crate::support::{
    Gateway, KEY_ACME, Upstream, client, config, config_with, eventually, within,
};

#[tokio::test]
async fn the_gateway_key_is_stripped_and_forwarding_headers_are_set() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    let response = client()
        .post(gateway.url("/api/v1/playbooks/pb_1/execute?dry=1"))
        .header("authorization", format!("Bearer {KEY_ACME}"))
        .header("connection", "x-private")
        .header("x-private", "hop")
        .header("x-app", "kept")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let seen = &upstream.seen()[0];
    assert_eq!(seen.path, "/api/v1/playbooks/pb_1/execute");
    assert!(
        seen.headers.get("authorization").is_none(),
        "the gateway key reached the upstream"
    );
    assert!(
        seen.headers.get("x-private").is_none(),
        "a header named in Connection was forwarded"
    );
    assert_eq!(seen.headers["x-app"], "kept");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], gateway.addr.to_string());
    assert_eq!(gateway.used("org_acme", Dimension::PlaybookRuns).await, 1);
}

#[tokio::test]
async fn a_gateway_key_never_reaches_the_upstream_of_an_unmetered_route() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    client()
        .get(gateway.url("/api/v1/anything"))
        .header("x-api-key", KEY_ACME)
        .send()
        .await
        .unwrap();
    client()
        .get(gateway.url("/api/v1/anything"))
        .header("authorization", "Bearer app-session")
        .send()
        .await
        .unwrap();

    let seen = upstream.seen();
    assert!(seen[0].headers.get("x-api-key").is_none());
    assert_eq!(
        seen[1].headers["authorization"], "Bearer app-session",
        "the backend's own credential was removed"
    );
}

#[tokio::test]
async fn upstream_headers_replace_what_the_client_sent() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    client()
        .post(gateway.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY_ACME}"))
        .header("api-key", "client-azure-key")
        .body(r#"{"messages":[],"max_tokens":1}"#)
        .send()
        .await
        .unwrap();

    let seen = &upstream.seen()[0];
    assert_eq!(seen.headers["authorization"], "Bearer provider-secret");
    assert_eq!(seen.headers["x-provider"], "openai");
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    assert!(seen.headers.get("api-key").is_none());
}

#[tokio::test]
async fn an_unmetered_hundred_megabyte_upload_streams_through_a_one_megabyte_limit() {
    let upstream = Upstream::start().await;
    // The upstream answers only once it has read all 100 MiB, which on a
    // busy test machine can take longer than the usual 10s.
    let config = config_with(|c| {
        c.replace(
            crate::support::UPSTREAM_TIMEOUT,
            "upstream_timeout = \"30s\"",
        )
    });
    let gateway = Gateway::start(&config, &upstream).await;
    const CHUNK: usize = 256 * 1024;
    const CHUNKS: usize = 400; // 100 MiB
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(receiver));
    let request = tokio::spawn(
        client()
            .put(gateway.url("/api/v1/uploads/big"))
            .header("x-test-hold", "1")
            .body(body)
            .send(),
    );

    // The upstream has the request while most of the body is still unsent:
    // the gateway did not wait for the whole body.
    sender.send(Ok(vec![7u8; CHUNK])).await.unwrap();
    upstream.wait_for_arrivals(1).await;
    for _ in 1..CHUNKS {
        sender.send(Ok(vec![7u8; CHUNK])).await.unwrap();
    }
    drop(sender);
    eventually("the upstream read the whole body", async || {
        upstream.release();
        request.is_finished()
    })
    .await;
    let response = request.await.unwrap().unwrap();

    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["received_bytes"], CHUNK * CHUNKS);
}

fn tokio_stream_from<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx)).boxed()
}

#[tokio::test]
async fn a_client_that_disconnects_mid_request_leaves_its_reservation_settled_once() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    let request = tokio::spawn(
        client()
            .post(gateway.url("/api/v1/content/briefs/generate"))
            .header("x-org-id", "org_gone")
            .header("x-test-hold", "1")
            .send(),
    );
    upstream.wait_for_arrivals(1).await;
    assert_eq!(gateway.app.metrics().open_reservations(), 1);
    request.abort();

    eventually("the dropped request's reservation is settled", async || {
        gateway.app.metrics().open_reservations() == 0
    })
    .await;
    upstream.release();
    // It stands, once: the upstream may have done the work.
    assert_eq!(gateway.used("org_gone", Dimension::Tokens).await, 10_000);
    let next = client()
        .post(gateway.url("/api/v1/content/briefs/generate"))
        .header("x-org-id", "org_gone")
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 200);
    assert_eq!(gateway.used("org_gone", Dimension::Tokens).await, 20_000);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_refuses_new_connections() {
    let upstream = Upstream::start().await;
    let mut gateway = Gateway::start(&config(), &upstream).await;
    let in_flight = tokio::spawn(
        client()
            .post(gateway.url("/api/v1/playbooks/pb_1/execute"))
            .header("x-org-id", "org_sd")
            .header("x-test-hold", "1")
            .send(),
    );
    upstream.wait_for_arrivals(1).await;

    let stopped = tokio::spawn(gateway.shut_down());
    eventually("the listener is closed", async || {
        tokio::net::TcpStream::connect(gateway.addr).await.is_err()
    })
    .await;
    upstream.release();

    let response = within(Duration::from_secs(10), in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    within(Duration::from_secs(10), stopped).await.unwrap();
    assert_eq!(gateway.used("org_sd", Dimension::PlaybookRuns).await, 1);
}

#[tokio::test]
async fn http2_clients_are_served() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();

    let response = h2
        .post(gateway.url("/api/v1/playbooks/pb_1/execute"))
        .header("x-org-id", "org_h2")
        .send()
        .await
        .unwrap();

    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.seen()[0].path, "/api/v1/playbooks/pb_1/execute");
}

#[tokio::test]
async fn connections_still_open_when_the_grace_period_ends_are_cut() {
    let upstream = Upstream::start().await;
    let config = crate::support::config_with(|c| {
        c.replace(
            crate::support::UPSTREAM_TIMEOUT,
            "upstream_timeout = \"60s\"\nshutdown_grace = \"200ms\"",
        )
    });
    let mut gateway = Gateway::start(&config, &upstream).await;
    let stuck = tokio::spawn(
        client()
            .get(gateway.url("/api/v1/slow"))
            .header("x-test-hold", "1")
            .send(),
    );
    upstream.wait_for_arrivals(1).await;

    within(Duration::from_secs(10), gateway.shut_down()).await;

    let outcome = within(Duration::from_secs(10), stuck).await.unwrap();
    assert!(
        outcome.is_err(),
        "the held request was not cut: {outcome:?}"
    );
    upstream.release();
}

#[tokio::test]
async fn the_catch_all_route_also_serves_the_root_path() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    let response = client().get(gateway.url("/")).send().await.unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(upstream.seen()[0].path, "/");
}

/// A bare HTTP/1.1 upstream that counts the connections it accepts and
/// answers every request `ok` (a HEAD with its headers only, a request for
/// `/counted/no-content` with a 204, one for `/counted/chunked` with `ok` in
/// two chunks); with `close_after_answer` it closes each connection after
/// its first answer, as a keep-alive timeout would, without announcing it.
struct CountingUpstream {
    addr: std::net::SocketAddr,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingUpstream {
    async fn start(close_after_answer: bool) -> CountingUpstream {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut received = Vec::new();
                    let mut chunk = [0; 4096];
                    loop {
                        let Ok(read) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        received.extend_from_slice(&chunk[..read]);
                        // Bodiless requests: each ends with its blank line.
                        while let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = received.drain(..end + 4).collect();
                            let answer: &[u8] = if head.starts_with(b"HEAD ") {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
                            } else if head.starts_with(b"GET /counted/no-content ") {
                                b"HTTP/1.1 204 No Content\r\n\r\n"
                            } else if head.starts_with(b"GET /counted/chunked ") {
                                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\no\r\n1\r\nk\r\n0\r\n\r\n"
                            } else {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            };
                            if stream.write_all(answer).await.is_err() || close_after_answer {
                                return;
                            }
                        }
                    }
                });
            }
        });
        CountingUpstream { addr, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// [`config`] with this upstream serving `/counted/…`.
    fn config(&self) -> String {
        config_with(|c| {
            c.replace(
                "[[routes]]\nname = \"everything-else\"",
                &format!(
                    "[upstreams.counted]\nurl = \"http://{}\"\n\n[[routes]]\nname = \"counted\"\npath = \"/counted/{{*rest}}\"\nupstream = \"counted\"\n\n[[routes]]\nname = \"everything-else\"",
                    self.addr
                ),
            )
        })
    }
}

/// GETs `/counted/{n}` and expects the counting upstream's `ok`.
async fn gets_ok(client: &reqwest::Client, gateway: &Gateway, n: usize) {
    let response = client
        .get(gateway.url(&format!("/counted/{n}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "request {n}");
    assert_eq!(response.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn requests_one_after_another_share_one_upstream_connection() {
    let counted = CountingUpstream::start(false).await;
    let gateway = Gateway::start(&counted.config(), &Upstream::start().await).await;
    let client = client();

    for n in 0..5 {
        gets_ok(&client, &gateway, n).await;
    }

    assert_eq!(counted.connections(), 1);
}

#[tokio::test]
async fn answers_without_a_body_or_in_chunks_give_their_upstream_connection_back() {
    let counted = CountingUpstream::start(false).await;
    let gateway = Gateway::start(&counted.config(), &Upstream::start().await).await;
    let client = client();

    let head = client.head(gateway.url("/counted/0")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "2");
    assert_eq!(head.text().await.unwrap(), "");
    let get = |path| client.get(gateway.url(path)).send();
    let no_content = get("/counted/no-content").await.unwrap();
    assert_eq!(no_content.status(), 204);
    assert_eq!(no_content.text().await.unwrap(), "");
    let chunked = get("/counted/chunked").await.unwrap();
    assert_eq!(chunked.status(), 200);
    assert_eq!(chunked.text().await.unwrap(), "ok");
    gets_ok(&client, &gateway, 1).await;

    assert_eq!(counted.connections(), 1);
}

#[tokio::test]
async fn a_request_after_the_upstream_closed_its_idle_connection_goes_on_a_new_one() {
    let counted = CountingUpstream::start(true).await;
    let gateway = Gateway::start(&counted.config(), &Upstream::start().await).await;
    let client = client();

    for n in 0..3 {
        gets_ok(&client, &gateway, n).await;
    }

    assert_eq!(counted.connections(), 3);
}

#[tokio::test]
async fn an_upstream_named_by_host_name_is_reached_on_the_address_that_answers() {
    // `localhost` may resolve to ::1 first; the stand-in listens on 127.0.0.1 only.
    let counted = CountingUpstream::start(false).await;
    let config = counted.config().replace(
        &format!("http://{}", counted.addr),
        &format!("http://localhost:{}", counted.addr.port()),
    );
    let gateway = Gateway::start(&config, &Upstream::start().await).await;

    gets_ok(&client(), &gateway, 0).await;

    assert_eq!(counted.connections(), 1);
}
