//! Hostile and faulty clients: silent, idle and surplus connections, and
//! request bodies that are malformed, slow or stalled. The gateway runs in
//! the test process where its counters are read, and as the real binary
//! where its descriptor limit and its log are the point.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate::quota::Dimension;

use crate::support::{Gateway, Upstream, client, config_with, envelope, eventually, within};

/// The test config with `server` keys added.
fn config_with_server(keys: &str) -> String {
    config_with(|c| {
        c.replace(
            crate::support::UPSTREAM_TIMEOUT,
            &format!("{}\n{keys}", crate::support::UPSTREAM_TIMEOUT),
        )
    })
}

/// Reads until the peer closes; how long that took from `since`.
async fn closed_after(stream: &mut TcpStream, since: Instant) -> (Duration, Vec<u8>) {
    let mut received = Vec::new();
    within(Duration::from_secs(10), stream.read_to_end(&mut received))
        .await
        .unwrap();
    (since.elapsed(), received)
}

/// Writes `request` on a new connection and reads one response: its status
/// line and headers, and its body of `content-length` bytes.
async fn exchange(gateway: &Gateway, request: &[u8]) -> (String, String) {
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_response(&mut stream).await
}

async fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut received = Vec::new();
    let mut chunk = [0; 4096];
    within(Duration::from_secs(10), async {
        loop {
            let read = stream.read(&mut chunk).await.unwrap();
            assert!(read > 0, "closed mid-response: {received:?}");
            received.extend_from_slice(&chunk[..read]);
            let text = String::from_utf8_lossy(&received);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")?
                        .parse()
                        .ok()
                })
                .unwrap_or(0);
            if body.len() >= length {
                return (head.to_string(), body.to_string());
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_header_read_timeout() {
    let upstream = Upstream::start().await;
    let config = config_with_server("header_read_timeout = \"300ms\"");
    let gateway = Gateway::start(&config, &upstream).await;

    let opened = Instant::now();
    let mut silent = TcpStream::connect(gateway.addr).await.unwrap();
    let (after, received) = closed_after(&mut silent, opened).await;

    assert!(received.is_empty(), "{received:?}");
    assert!(
        after >= Duration::from_millis(300),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn a_connection_that_trickles_its_header_is_closed_at_header_read_timeout_from_accept() {
    let upstream = Upstream::start().await;
    let config = config_with_server("header_read_timeout = \"300ms\"");
    let gateway = Gateway::start(&config, &upstream).await;

    let opened = Instant::now();
    let stream = TcpStream::connect(gateway.addr).await.unwrap();
    let (mut reading, mut writing) = stream.into_split();
    // A byte every 50 ms: never idle, never a whole head.
    let trickle = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_millis(50));
        let mut sent = writing.write_all(b"GET / HTTP/1.1\r\n").await;
        while sent.is_ok() {
            ticks.tick().await;
            sent = writing.write_all(b"x").await;
        }
    });
    let mut received = Vec::new();
    // Closed or reset: a socket closed with unread bytes is reset.
    let _ = within(Duration::from_secs(10), reading.read_to_end(&mut received)).await;
    let after = opened.elapsed();
    trickle.abort();

    assert!(
        after >= Duration::from_millis(300),
        "closed after {after:?}"
    );
    assert!(after < Duration::from_secs(3), "closed after {after:?}");
}

/// Writes `pieces` one at a time, each after the gateway has had 50 ms to
/// read the last, as a client on a slow link sends them.
async fn trickle(stream: &mut TcpStream, pieces: &[&[u8]]) {
    let mut ticks = tokio::time::interval(Duration::from_millis(50));
    for piece in pieces {
        ticks.tick().await;
        stream.write_all(piece).await.unwrap();
    }
}

#[tokio::test]
async fn requests_whose_first_bytes_could_begin_the_http2_preface_are_served_as_http1() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config_with_server(""), &upstream).await;

    // `P` alone, and `PR`, begin `PRI * HTTP/2.0` as well as these methods:
    // the gateway cannot tell the protocol from the first piece, and must
    // lose none of it choosing.
    let requests = [
        [
            &b"P"[..],
            b"OST /api/v1/playbooks/pb_1/execute HTTP/1.1\r\n",
        ],
        [&b"PR"[..], b"OPFIND /elsewhere HTTP/1.1\r\n"],
    ];
    for pieces in requests {
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        trickle(&mut stream, &pieces).await;
        let rest =
            "host: t\r\nx-org-id: org_acme\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        stream.write_all(rest.as_bytes()).await.unwrap();
        let (head, body) = read_response(&mut stream).await;
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "{pieces:?}: {head}\n{body}"
        );
    }

    let seen: Vec<String> = upstream
        .seen()
        .iter()
        .map(|seen| format!("{} {}", seen.method, seen.path))
        .collect();
    assert_eq!(
        seen,
        ["POST /api/v1/playbooks/pb_1/execute", "PROPFIND /elsewhere"]
    );
    assert_eq!(gateway.used("org_acme", Dimension::PlaybookRuns).await, 1);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_keepalive_timeout_not_at_header_read_timeout() {
    let upstream = Upstream::start().await;
    let config =
        config_with_server("header_read_timeout = \"200ms\"\nkeepalive_timeout = \"800ms\"");
    let gateway = Gateway::start(&config, &upstream).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();

    stream
        .write_all(b"GET /api/v1/first HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let answered = Instant::now();
    let (after, received) = closed_after(&mut stream, answered).await;

    assert!(received.is_empty(), "{received:?}");
    // The server's idle time began just before the client had the answer.
    assert!(
        after >= Duration::from_millis(750),
        "closed after {after:?}"
    );
    assert!(after < Duration::from_secs(5), "closed after {after:?}");
}

/// An HTTP/2 connection to `gateway`, and its driver, which ends when the
/// gateway closes the connection.
async fn http2_connection(
    gateway: &Gateway,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let stream = TcpStream::connect(gateway.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    (sender, tokio::spawn(connection))
}

#[tokio::test]
async fn an_http2_connection_that_makes_no_request_is_closed_at_header_read_timeout() {
    let upstream = Upstream::start().await;
    let config = config_with_server("header_read_timeout = \"300ms\"");
    let gateway = Gateway::start(&config, &upstream).await;

    let opened = Instant::now();
    let (_sender, connection) = http2_connection(&gateway).await;
    let ended = within(Duration::from_secs(10), connection).await.unwrap();
    let after = opened.elapsed();

    assert!(ended.is_ok(), "{ended:?}");
    assert!(
        after >= Duration::from_millis(300),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn an_idle_http2_connection_is_sent_away_at_keepalive_timeout() {
    let upstream = Upstream::start().await;
    let config =
        config_with_server("header_read_timeout = \"200ms\"\nkeepalive_timeout = \"800ms\"");
    let gateway = Gateway::start(&config, &upstream).await;
    let (mut sender, connection) = http2_connection(&gateway).await;

    let request = http::Request::get(gateway.url("/api/v1/first"))
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let answered = Instant::now();
    let ended = within(Duration::from_secs(10), connection).await.unwrap();
    let after = answered.elapsed();

    assert!(
        ended.is_ok(),
        "a GOAWAY ends the connection cleanly: {ended:?}"
    );
    assert!(
        after >= Duration::from_millis(750),
        "closed after {after:?}"
    );
    assert!(sender.is_closed());
}

#[tokio::test]
async fn past_max_connections_a_new_connection_is_closed_at_once_and_counted() {
    let upstream = Upstream::start().await;
    let config = config_with_server("max_connections = 2\nheader_read_timeout = \"30s\"");
    let gateway = Gateway::start(&config, &upstream).await;
    let first = TcpStream::connect(gateway.addr).await.unwrap();
    let _second = TcpStream::connect(gateway.addr).await.unwrap();

    let opened = Instant::now();
    let mut third = TcpStream::connect(gateway.addr).await.unwrap();
    let (after, received) = closed_after(&mut third, opened).await;
    assert!(received.is_empty());
    assert!(after < Duration::from_secs(5), "closed after {after:?}");
    let refused = || gateway.app.metrics().connections_refused.get();
    assert_eq!(refused(), 1);

    // A connection that closes makes room for the next.
    drop(first);
    let client = client();
    eventually("a new connection is served", async || {
        let response = client.get(gateway.url("/api/v1/after")).send().await;
        response.is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test]
async fn a_malformed_chunked_body_on_an_unmetered_route_is_400_not_502() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config_with_server(""), &upstream).await;

    let (head, body) = exchange(
        &gateway,
        b"POST /api/v1/uploads/x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    )
    .await;

    assert!(head.starts_with("HTTP/1.1 400"), "{head}\n{body}");
    assert!(body.contains(r#""code":"BAD_REQUEST""#), "{body}");
    let faults = gateway.app.metrics().client_body_faults.get();
    assert_eq!(faults, 1);
}

#[tokio::test]
async fn a_silent_upload_on_an_unmetered_route_is_408() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(
        &config_with_server("body_read_timeout = \"200ms\""),
        &upstream,
    )
    .await;

    // Ten bytes announced, two sent, then nothing.
    let (head, body) = exchange(
        &gateway,
        b"POST /api/v1/uploads/x HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nab",
    )
    .await;

    assert!(head.starts_with("HTTP/1.1 408"), "{head}\n{body}");
    assert!(body.contains(r#""code":"REQUEST_TIMEOUT""#), "{body}");
}

#[tokio::test]
async fn a_slow_but_moving_upload_on_an_unmetered_route_is_not_timed_as_the_upstreams() {
    let upstream = Upstream::start().await;
    let config = config_with(|c| {
        c.replace(
            crate::support::UPSTREAM_TIMEOUT,
            "upstream_timeout = \"500ms\"\nbody_read_timeout = \"1500ms\"",
        )
    });
    let gateway = Gateway::start(&config, &upstream).await;
    // A byte every 100 ms for 2 s: four times the upstream's timeout, and
    // never silent for long enough to meet the body's, even on a loaded
    // machine.
    let bytes = futures_util::stream::unfold(0, |sent| async move {
        if sent == 20 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, std::io::Error>(vec![b'x']), sent + 1))
    });

    let response = client()
        .put(gateway.url("/api/v1/uploads/slow"))
        .body(reqwest::Body::wrap_stream(bytes))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["received_bytes"], 20);
}

#[tokio::test]
async fn an_upstream_that_stalls_after_a_streamed_upload_is_still_504() {
    let upstream = Upstream::start().await;
    let config = config_with(|c| {
        c.replace(
            crate::support::UPSTREAM_TIMEOUT,
            "upstream_timeout = \"500ms\"",
        )
    });
    let gateway = Gateway::start(&config, &upstream).await;
    let bytes = futures_util::stream::iter([Ok::<_, std::io::Error>(vec![b'x'; 10])]);

    let response = client()
        .put(gateway.url("/api/v1/uploads/held"))
        .header("x-test-hold", "1")
        .body(reqwest::Body::wrap_stream(bytes))
        .send()
        .await
        .unwrap();

    envelope(response, 504, "GATEWAY_TIMEOUT").await;
    upstream.release();
}

/// The real binary, its stderr (JSON log lines) collected as it runs.
struct Binary {
    child: Child,
    port: u16,
    log: Log,
    reader: std::thread::JoinHandle<()>,
}

/// A gateway's log entries, as read so far.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<serde_json::Value>>>);

impl Log {
    /// The entries whose message contains `text`.
    fn saying(&self, text: &str) -> Vec<serde_json::Value> {
        let entries = self.0.lock().unwrap();
        entries
            .iter()
            .filter(|entry| {
                entry["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(text))
            })
            .cloned()
            .collect()
    }

    fn collect_from(&self, stderr: impl std::io::Read) {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let entry = serde_json::from_str(&line)
                .unwrap_or_else(|_| serde_json::json!({"fields": {"message": line}}));
            self.0.lock().unwrap().push(entry);
        }
    }
}

impl Binary {
    /// Runs `tollgate run` on `config` (with `${PORT}` and `${UPSTREAM}`
    /// filled in) under a soft descriptor limit of `soft_limit`, and waits
    /// until it accepts.
    async fn start(config: &str, upstream: &Upstream, soft_limit: u32) -> Binary {
        let port = crate::support::free_port();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        let config = config
            .replace("${PORT}", &port.to_string())
            .replace("${UPSTREAM}", &upstream.addr.to_string());
        std::fs::write(&file, config).unwrap();
        // The shell lowers the soft limit and leaves the hard one as it is.
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(format!("ulimit -Sn {soft_limit} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_tollgate"))
            .args(["--log-json", "run", "--config"])
            .arg(&file)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Log::default();
        let stderr = child.stderr.take().unwrap();
        let collecting = log.clone();
        let reader = std::thread::spawn(move || collecting.collect_from(stderr));
        // Logged once the config is read and the workers run; the listener
        // is bound before it.
        eventually("the gateway accepts", async || {
            !log.saying("connection limit").is_empty()
        })
        .await;
        drop(dir);
        Binary {
            child,
            port,
            log,
            reader,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port)).await.unwrap()
    }

    /// Stops the gateway with SIGTERM; its whole log once it has exited.
    async fn stop(self) -> Log {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let Binary {
            mut child, reader, ..
        } = self;
        let exited = tokio::task::spawn_blocking(move || {
            let status = child.wait();
            reader.join().unwrap();
            status
        });
        let status = within(Duration::from_secs(20), exited)
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "exit status {status}");
        self.log
    }
}

/// A config for the binary: everything to the stand-in upstream, unmetered.
fn binary_config(server_keys: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:${{PORT}}\"\nworkers = 2\nshutdown_grace = \"1s\"\n{server_keys}\n\
         [upstreams.api]\nurl = \"http://${{UPSTREAM}}\"\n\
         [[routes]]\nname = \"all\"\npath = \"/{{*rest}}\"\nupstream = \"api\"\n"
    )
}

/// How many descriptors process `pid` has open.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |fds| fds.count())
}

#[tokio::test]
async fn under_a_soft_descriptor_limit_of_512_a_request_is_served_beside_600_silent_connections() {
    let upstream = Upstream::start().await;
    let gateway = Binary::start(&binary_config(""), &upstream, 512).await;
    let raised = gateway.log.saying("descriptor limit");
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!(raised[0]["fields"]["was"], 512);
    assert!(
        raised[0]["fields"]["now"].as_u64().unwrap() > 700,
        "{raised:?}"
    );

    let mut silent = Vec::new();
    for _ in 0..600 {
        silent.push(gateway.connect().await);
    }
    let pid = gateway.child.id();
    eventually("the gateway holds the 600 connections", async || {
        open_descriptors(pid) > 600
    })
    .await;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .get(gateway.url("/api/v1/normal"))
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    drop(silent);
    let log = gateway.stop().await;
    assert!(log.saying("accept failed").is_empty());
}

#[tokio::test]
async fn refusals_past_max_connections_are_logged_once_per_burst() {
    let upstream = Upstream::start().await;
    let gateway = Binary::start(&binary_config("max_connections = 2"), &upstream, 1024).await;
    let _held = [gateway.connect().await, gateway.connect().await];

    for _ in 0..20 {
        let mut refused = gateway.connect().await;
        let (_, received) = closed_after(&mut refused, Instant::now()).await;
        assert!(received.is_empty());
    }

    let log = gateway.stop().await;
    let logged = log.saying("connection limit reached");
    assert_eq!(logged.len(), 1, "{logged:?}");
}

#[tokio::test]
async fn malformed_chunked_bodies_on_an_unmetered_route_are_400_and_logged_once_per_burst() {
    let upstream = Upstream::start().await;
    let gateway = Binary::start(&binary_config(""), &upstream, 1024).await;

    for _ in 0..50 {
        let mut stream = gateway.connect().await;
        stream
            .write_all(
                b"POST /upload HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            )
            .await
            .unwrap();
        let (head, _) = read_response(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    }

    let log = gateway.stop().await;
    let logged = log.saying("request body failed");
    assert_eq!(logged.len(), 1, "{logged:?}");
    let blamed = log.saying("upstream request failed");
    assert!(blamed.is_empty(), "{blamed:?}");
}
