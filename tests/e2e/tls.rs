//! TLS termination on the listener: HTTP/1.1 and HTTP/2 by ALPN, the
//! certificate swapped by a reload while connections stay open, plain HTTP
//! on the TLS port, stalled handshakes, and `check` on broken files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tollgate::quota::Dimension;

use crate::admin::Backing;
use crate::reload::{ConfigFile, base, launch, reload};
use crate::support::{
    Gateway, Upstream, config_with, count, envelope, eventually, within, within_a_second,
};

/// A CA of the test's, and the certificates it signs for `localhost`.
struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: TempDir,
}

/// A certificate and its key, written as PEM files.
struct Issued {
    der: CertificateDer<'static>,
    cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        TestCa {
            issuer,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A new certificate for `localhost`, written to `name.pem` and
    /// `name-key.pem` (over any there).
    fn issue(&self, name: &str) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let issued = Issued {
            der: cert.der().clone(),
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}-key.pem")),
        };
        std::fs::write(&issued.cert, cert.pem()).unwrap();
        std::fs::write(&issued.key, key.serialize_pem()).unwrap();
        issued
    }

    fn client_config(&self, alpn: &[u8]) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        config
    }
}

/// The `[server.tls]` section for `issued`, with `extra` lines.
fn tls_section(issued: &Issued, extra: &str) -> String {
    format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n{extra}\n",
        issued.cert.display(),
        issued.key.display()
    )
}

/// `config` with `section` put after `[server]`'s keys.
fn with_tls(config: &str, section: &str) -> String {
    config.replacen("\n[store]\n", &format!("\n{section}\n[store]\n"), 1)
}

/// One client connection over TLS, speaking what ALPN agreed.
struct TlsClient {
    sender: Sender,
    /// The certificate the gateway served on this connection.
    leaf: CertificateDer<'static>,
    port: u16,
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl TlsClient {
    /// Connects to `port` offering `alpn` alone.
    async fn connect(ca: &TestCa, port: u16, alpn: &[u8]) -> TlsClient {
        let connector = TlsConnector::from(Arc::new(ca.client_config(alpn)));
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let session = tls.get_ref().1;
        assert_eq!(session.alpn_protocol(), Some(alpn), "ALPN agreed");
        let leaf = session.peer_certificates().unwrap()[0].clone();
        let io = TokioIo::new(tls);
        let sender = if alpn == b"h2" {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            Sender::Http2(sender)
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            Sender::Http1(sender)
        };
        TlsClient { sender, leaf, port }
    }

    /// A bodiless POST to `path`, paid for by `org`.
    async fn post(&mut self, path: &str, org: &str) -> Response<Incoming> {
        let request = Request::post(path)
            .header("x-org-id", org)
            .header("host", format!("localhost:{}", self.port));
        match &mut self.sender {
            Sender::Http1(sender) => {
                sender.ready().await.unwrap();
                let request = request.body(Full::default()).unwrap();
                sender.send_request(request).await.unwrap()
            }
            Sender::Http2(sender) => {
                let uri = format!("https://localhost:{}{path}", self.port);
                let request = request.uri(uri).body(Full::default()).unwrap();
                sender.send_request(request).await.unwrap()
            }
        }
    }
}

async fn tls_gateway(ca: &TestCa, upstream: &Upstream, extra: &str) -> Gateway {
    let issued = ca.issue("gateway");
    let config = with_tls(&config_with(|c| c), &tls_section(&issued, extra));
    Gateway::start(&config, upstream).await
}

const RUN: &str = "/api/v1/playbooks/p/execute";

#[tokio::test]
async fn http1_and_http2_over_tls_are_metered_and_forwarded_as_https() {
    let upstream = Upstream::start().await;
    let ca = TestCa::new();
    let gateway = tls_gateway(&ca, &upstream, "").await;
    for (alpn, version, org) in [
        (&b"http/1.1"[..], http::Version::HTTP_11, "org_tls_h1"),
        (b"h2", http::Version::HTTP_2, "org_tls_h2"),
    ] {
        let mut client = TlsClient::connect(&ca, gateway.addr.port(), alpn).await;
        let answer = client.post(RUN, org).await;
        assert_eq!(answer.status(), StatusCode::OK, "{org}");
        assert_eq!(answer.version(), version, "{org}");
        assert_eq!(gateway.used(org, Dimension::PlaybookRuns).await, 1, "{org}");
        let seen = upstream.seen().pop().unwrap();
        assert_eq!(seen.headers["x-forwarded-proto"], "https", "{org}");
        assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1", "{org}");
        assert_eq!(seen.headers["x-org-id"], org);
    }
}

#[tokio::test]
async fn a_reload_swaps_the_certificate_for_new_connections_and_keeps_open_ones() {
    let upstream = Upstream::start().await;
    let ca = TestCa::new();
    let backing = Backing::Memory;
    let first = ca.issue("gateway");
    let file = ConfigFile::new(&backing, &upstream);
    file.write(&with_tls(
        &base(&backing, &upstream),
        &tls_section(&first, ""),
    ));
    let gateway = launch(&backing, &file).await;
    let port = gateway.addr.port();

    let mut open = TlsClient::connect(&ca, port, b"http/1.1").await;
    assert_eq!(open.leaf, first.der);
    assert_eq!(open.post(RUN, "org_swap").await.status(), 200);

    // The same files, with a new certificate and key in them.
    let second = ca.issue("gateway");
    assert_ne!(second.der, first.der);
    let answer = reload(&gateway).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.json::<serde_json::Value>().await.unwrap(),
        json!({"reloaded": true, "restartRequired": []})
    );

    assert_eq!(open.post(RUN, "org_swap").await.status(), 200);
    assert_eq!(gateway.used("org_swap", Dimension::PlaybookRuns).await, 2);
    let mut fresh = TlsClient::connect(&ca, port, b"h2").await;
    assert_eq!(fresh.leaf, second.der);
    assert_eq!(fresh.post(RUN, "org_swap").await.status(), 200);
    assert_eq!(gateway.used("org_swap", Dimension::PlaybookRuns).await, 3);
}

#[tokio::test]
async fn a_bad_certificate_at_reload_keeps_the_running_one_and_tls_off_waits_for_a_restart() {
    let upstream = Upstream::start().await;
    let ca = TestCa::new();
    let backing = Backing::Memory;
    let issued = ca.issue("gateway");
    let file = ConfigFile::new(&backing, &upstream);
    let with_cert = with_tls(&base(&backing, &upstream), &tls_section(&issued, ""));
    file.write(&with_cert);
    let gateway = launch(&backing, &file).await;
    let port = gateway.addr.port();

    std::fs::write(&issued.cert, "not a certificate\n").unwrap();
    let answer = envelope(reload(&gateway).await, 422, "CONFIG_INVALID").await;
    let errors = answer["error"]["details"]["errors"].to_string();
    let line = with_cert
        .lines()
        .position(|l| l.starts_with("cert = "))
        .unwrap()
        + 1;
    let at = format!("{}:{line}: server.tls.cert: ", file.path.display());
    assert!(errors.contains(&at), "{errors}");
    assert!(errors.contains("holds no PEM certificate"), "{errors}");
    let mut client = TlsClient::connect(&ca, port, b"h2").await;
    assert_eq!(client.leaf, issued.der);
    assert_eq!(client.post(RUN, "org_bad_cert").await.status(), 200);

    file.write(&base(&backing, &upstream));
    let answer = reload(&gateway).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.json::<serde_json::Value>().await.unwrap(),
        json!({"reloaded": true, "restartRequired": ["server.tls"]})
    );
    let mut client = TlsClient::connect(&ca, port, b"http/1.1").await;
    assert_eq!(client.leaf, issued.der);
    assert_eq!(client.post(RUN, "org_bad_cert").await.status(), 200);
}

/// Writes `bytes` to `port` and reads until the gateway closes.
async fn exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    // A reset after the answer is a close too.
    let _ = within(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    answer
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_400_envelope_and_anything_else_a_close() {
    let upstream = Upstream::start().await;
    let ca = TestCa::new();
    let gateway = tls_gateway(&ca, &upstream, "").await;
    let port = gateway.addr.port();

    let answer = exchange(port, b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n").await;
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], "PLAIN_HTTP_ON_TLS_PORT");

    assert!(exchange(port, b"\x00\x01\x02 hello\r\n").await.is_empty());
    // The count follows the close the client sees.
    within_a_second("both refusals are counted", async || {
        count(
            &gateway.app,
            "tollgate_tls_handshake_failures_total",
            &[("reason", "error")],
        ) == 2
    })
    .await;
    assert_eq!(upstream.hits(), 0);

    let mut client = TlsClient::connect(&ca, port, b"http/1.1").await;
    assert_eq!(client.post(RUN, "org_after_plain").await.status(), 200);
    assert_eq!(
        gateway
            .used("org_after_plain", Dimension::PlaybookRuns)
            .await,
        1
    );
}

/// Connects to `port`, sends `bytes`, and waits for the gateway to close
/// the connection; the time that took.
async fn closed_after(port: u16, bytes: &[u8]) -> Duration {
    let started = tokio::time::Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut rest = Vec::new();
    let read = within(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok_and(|n| n == 0), "the gateway sent something");
    started.elapsed()
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_at_its_timeout_and_the_next_client_connects() {
    let upstream = Upstream::start().await;
    let ca = TestCa::new();
    let gateway = tls_gateway(&ca, &upstream, "handshake_timeout = \"300ms\"").await;
    let port = gateway.addr.port();
    // A ClientHello's record and handshake headers, and nothing of its body.
    let partial_hello = [
        0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03,
    ];

    for sent in [&[][..], &partial_hello] {
        let took = closed_after(port, sent).await;
        assert!(took >= Duration::from_millis(290), "closed after {took:?}");
    }
    eventually("both timeouts are counted", async || {
        count(
            &gateway.app,
            "tollgate_tls_handshake_failures_total",
            &[("reason", "timeout")],
        ) == 2
    })
    .await;
    let mut client = TlsClient::connect(&ca, port, b"h2").await;
    assert_eq!(client.post(RUN, "org_after_stall").await.status(), 200);
    assert_eq!(
        gateway
            .used("org_after_stall", Dimension::PlaybookRuns)
            .await,
        1
    );
}

#[tokio::test]
async fn sighup_swaps_the_certificate_of_a_running_binary_and_keeps_open_connections() {
    let upstream = Upstream::start().await;
    let ca = TestCa::new();
    let first = ca.issue("gateway");
    let port = crate::support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n{}\n[identity]\nsources = [\"header\"]\n\
             [identity.header]\nname = \"x-org-id\"\ntrusted_peers = [\"127.0.0.1\"]\n\
             [upstreams.api]\nurl = \"http://{}\"\n[[routes]]\nname = \"all\"\npath = \"/{{*rest}}\"\nupstream = \"api\"\n",
            tls_section(&first, ""),
            upstream.addr
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("run")
        .arg("--config")
        .arg(&file)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("the gateway listens", async || {
        TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;

    let mut open = TlsClient::connect(&ca, port, b"h2").await;
    assert_eq!(open.leaf, first.der);
    assert_eq!(open.post("/one", "org_hup").await.status(), 200);
    let second = ca.issue("gateway");
    let sent = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut served = None;
    eventually("a new connection gets the new certificate", async || {
        let client = TlsClient::connect(&ca, port, b"http/1.1").await;
        let swapped = client.leaf == second.der;
        served = Some(client);
        swapped
    })
    .await;
    assert_eq!(open.post("/two", "org_hup").await.status(), 200);
    let mut fresh = served.unwrap();
    assert_eq!(fresh.post("/three", "org_hup").await.status(), 200);
    let seen: Vec<_> = upstream.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(seen, ["/one", "/two", "/three"]);
    child.kill().unwrap();
    let _ = child.wait();
}

/// `tollgate check` on `config`, written to `dir`: its stderr, having failed.
fn check_fails(dir: &Path, config: &str) -> (PathBuf, String) {
    let file = dir.join("tls.toml");
    std::fs::write(&file, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    (file, String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn check_reports_a_missing_a_garbage_and_a_mismatched_certificate_with_the_key_path() {
    let ca = TestCa::new();
    let good = ca.issue("good");
    let other = ca.issue("other");
    let dir = ca.dir.path();
    let garbage = dir.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = dir.join("missing.pem");
    let config = |cert: &Path, key: &Path| {
        format!(
            "[server]\nlisten = \"127.0.0.1:1\"\n\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        )
    };
    for (cert, key, expected) in [
        (
            &missing,
            &good.key,
            format!(
                ":5: server.tls.cert: cannot read {:?}: ",
                missing.display().to_string()
            ),
        ),
        (
            &good.cert,
            &missing,
            format!(
                ":6: server.tls.key: cannot read {:?}: ",
                missing.display().to_string()
            ),
        ),
        (
            &garbage,
            &good.key,
            format!(
                ":5: server.tls.cert: {:?} is not PEM certificates: ",
                garbage.display().to_string()
            ),
        ),
        (
            &good.cert,
            &good.cert,
            format!(
                ":6: server.tls.key: {:?} holds no PEM private key",
                good.cert.display().to_string()
            ),
        ),
        (
            &good.cert,
            &other.key,
            format!(
                ":6: server.tls.key: the private key in {:?} does not match the certificate in {:?}",
                other.key.display().to_string(),
                good.cert.display().to_string()
            ),
        ),
    ] {
        let (file, stderr) = check_fails(dir, &config(cert, key));
        let expected = format!("{}{expected}", file.display());
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn check_accepts_a_good_certificate_and_says_the_listener_is_tls() {
    let ca = TestCa::new();
    let good = ca.issue("good");
    let file = ca.dir.path().join("ok.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:1\"\n\n{}",
            tls_section(&good, "handshake_timeout = \"2s\"")
        ),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = crate::cli::succeeded(&output);
    assert!(stdout.contains("listen 127.0.0.1:1 (TLS)"), "{stdout}");
}
