//! Test harness: a stand-in upstream that records what reaches it, and the
//! real gateway on a free port in front of it.
//!
//! The stand-in is steered per request by headers the gateway forwards:
//! `x-test-status: 500` answers with that status, `x-test-hold: 1` holds the
//! answer until the test releases it (or the connection drops).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tollgate::org::OrgId;
use tollgate::quota::{Amounts, Dimension};
use tollgate::{App, Config};

pub mod backends;
pub mod provider;
pub mod redis;

/// The sum of the samples named `name` whose labels include `labels`, in
/// the app's metrics text, read by a Prometheus text parser as a scraper
/// would read it: a counter's `_total` series, a gauge, or a histogram's
/// `_count` and `_sum`.
pub fn metric(app: &App, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(&app.metrics().encode(), name, labels)
}

/// [`metric`] of a metrics text, as `GET /metrics` serves it.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the metrics text parses");
    scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == name)
        .filter(|sample| labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v)))
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a single value"),
        })
        .sum()
}

/// [`metric`] as a count.
pub fn count(app: &App, name: &str, labels: &[(&str, &str)]) -> u64 {
    metric(app, name, labels) as u64
}

/// What the stand-in upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: http::Method,
    /// The request target as it arrived, undecoded: what a backend reads
    /// its path from ([`backends`] reads it as each would).
    pub target: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
struct UpstreamState {
    seen: Mutex<Vec<Seen>>,
    /// Requests whose head has arrived, counted before any body is read.
    arrived: Notify,
    arrivals: Mutex<usize>,
    release: Notify,
}

pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState::default());
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| answer(state.clone(), request));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, state }
    }

    /// Every request that reached the upstream, in order of completion.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn hits(&self) -> usize {
        self.seen().len()
    }

    /// Waits until `count` request heads have arrived.
    pub async fn wait_for_arrivals(&self, count: usize) {
        within(Duration::from_secs(10), async {
            loop {
                let notified = self.state.arrived.notified();
                if *self.state.arrivals.lock().unwrap() >= count {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }

    /// Lets every held request answer.
    pub fn release(&self) {
        self.state.release.notify_waiters();
    }
}

async fn answer(
    state: Arc<UpstreamState>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    *state.arrivals.lock().unwrap() += 1;
    state.arrived.notify_waiters();
    let release = state.release.notified();
    let (head, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let status = head
        .headers
        .get("x-test-status")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::OK);
    if head.headers.contains_key("x-test-hold") {
        release.await;
    }
    let reply = serde_json::json!({"ok": status.is_success(), "path": head.uri.path(), "received_bytes": body.len()});
    state.seen.lock().unwrap().push(Seen {
        method: head.method.clone(),
        target: head
            .uri
            .path_and_query()
            .map_or_else(|| head.uri.to_string(), |pq| pq.as_str().to_string()),
        path: head.uri.path().to_string(),
        headers: head.headers,
        body,
    });
    let mut response = Response::new(Full::new(Bytes::from(reply.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(response)
}

/// The gateway under test, serving on a free port.
pub struct Gateway {
    pub addr: SocketAddr,
    /// The admin listener's address, when the config has `[admin]`.
    pub admin_addr: Option<SocketAddr>,
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// A clock fixed at 2026-11-27T12:00:00Z, inside the November 2026 period.
/// A loopback port that was free a moment ago, for a process the test
/// starts to bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap()
}

pub fn fixed_clock() -> tollgate::meter::Clock {
    Arc::new(|| "2026-11-27T12:00:00Z".parse().unwrap())
}

/// When this test run started. Tests on Redis count in its period, not in
/// a fixed date's: Redis drops a period's counters at a time set by the
/// period's end, by its own clock, so the counters of a period long past
/// would be gone as soon as they were written. Fixed, so that a run
/// crossing the end of a month stays in one period.
pub fn run_started() -> chrono::DateTime<chrono::Utc> {
    static STARTED: std::sync::LazyLock<chrono::DateTime<chrono::Utc>> =
        std::sync::LazyLock::new(chrono::Utc::now);
    *STARTED
}

/// A clock fixed at [`run_started`], for gateways on Redis.
pub fn run_clock() -> tollgate::meter::Clock {
    Arc::new(run_started)
}

impl Gateway {
    /// Starts the gateway on `config`, where `${UPSTREAM}` is the stand-in's
    /// address and `${DEAD_UPSTREAM}` an address nothing listens on.
    pub async fn start(config: &str, upstream: &Upstream) -> Gateway {
        Gateway::launch(config, upstream, &[], fixed_clock()).await
    }

    /// [`Gateway::start`] with more `${NAME}` values and a clock of the test's.
    pub async fn launch(
        config: &str,
        upstream: &Upstream,
        vars: &[(&str, String)],
        clock: tollgate::meter::Clock,
    ) -> Gateway {
        let dead = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().to_string()
        };
        let mut values: Vec<(String, String)> = vec![
            ("UPSTREAM".into(), upstream.addr.to_string()),
            ("DEAD_UPSTREAM".into(), dead),
        ];
        values.extend(vars.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let env = move |name: &str| {
            values
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let config = Config::parse(config, "test.toml", &env)
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        Gateway::serve(App::with_clock(config, clock).unwrap())
    }

    /// Starts the gateway on the config file at `path`, which a reload
    /// reads again.
    pub async fn launch_file(path: &std::path::Path, clock: tollgate::meter::Clock) -> Gateway {
        let config = Config::load(path).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        Gateway::serve(App::reloadable(config, path.to_owned(), clock).unwrap())
    }

    /// Serves `app` on a free port, and its admin API on `[admin] listen`
    /// (port 0 for a free one) when it has one.
    fn serve(app: App) -> Gateway {
        let app = Arc::new(app);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = app
            .config()
            .admin
            .as_ref()
            .map(|admin| std::net::TcpListener::bind(admin.listen).unwrap());
        let admin_addr = admin.as_ref().map(|l| l.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = app.clone();
        let server = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            tollgate::admin::serve_all(&serving, listener, admin, shutdown)
                .await
                .unwrap();
        });
        Gateway {
            addr,
            admin_addr,
            app,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// The admin listener's URL for `path`.
    pub fn admin_url(&self, path: &str) -> String {
        let addr = self.admin_addr.expect("this gateway has no [admin]");
        format!("http://{addr}{path}")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn usage(&self, org: &str) -> Amounts {
        self.app.usage(&OrgId::parse(org).unwrap()).await.unwrap()
    }

    pub async fn used(&self, org: &str, dimension: Dimension) -> i64 {
        self.usage(org).await.get(dimension)
    }

    /// Waits until `org` has used `expected` of `dimension`, as after a
    /// refund, which is applied in the background.
    pub async fn settles_at(&self, org: &str, dimension: Dimension, expected: i64) {
        eventually(
            &format!("{org} has used {expected} {dimension}"),
            async || self.used(org, dimension).await == expected,
        )
        .await;
        assert_eq!(self.app.metrics().open_reservations(), 0);
    }

    /// Starts a graceful shutdown; the returned future ends when the server has.
    pub fn shut_down(&mut self) -> impl Future<Output = ()> + use<> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let server = self.server.take();
        async move {
            if let Some(server) = server {
                server.await.unwrap();
            }
        }
    }
}

/// Polls `condition` until it holds; fails if that takes over a second,
/// the time within which every instance must enforce a catalog change.
pub async fn within_a_second(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within a second: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Fails the test if `future` does not finish within `limit`.
pub async fn within<T>(limit: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .expect("timed out")
}

/// Polls `condition` until it holds, failing after a deadline.
pub async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A bodiless POST to `path` on `gateway`, paid for by `org` (the org
/// header, trusted from 127.0.0.1).
pub async fn post(gateway: &Gateway, path: &str, org: &str) -> reqwest::Response {
    client()
        .post(gateway.url(path))
        .header("x-org-id", org)
        .send()
        .await
        .unwrap()
}

/// A bodiless POST to `path` for `org` that the upstream holds until
/// released and then fails with `status` (so that its reservation is
/// refunded); returns once the request has reached the upstream.
pub async fn held_failing_request(
    gateway: &Gateway,
    upstream: &Upstream,
    path: &str,
    org: &str,
    status: u16,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    let failing = tokio::spawn(
        client()
            .post(gateway.url(path))
            .header("x-org-id", org)
            .header("x-test-hold", "1")
            .header("x-test-status", status.to_string())
            .send(),
    );
    upstream.wait_for_arrivals(1).await;
    failing
}

/// A raw HTTP/1.1 answer: its status and body.
pub struct RawAnswer {
    pub status: u16,
    pub body: String,
}

/// Sends `method target` to `gateway` byte for byte, as a hostile client
/// would: an HTTP client library would resolve dot segments and fix escapes
/// before sending.
pub async fn send_raw(
    gateway: &Gateway,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> RawAnswer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nhost: {}\r\ncontent-length: 0\r\nconnection: close\r\n",
        gateway.addr
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    within(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    RawAnswer {
        status,
        body: body.to_string(),
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap()
}

/// The envelope of a gateway-made answer, with its status checked.
pub async fn envelope(response: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

/// A gateway API key of org_acme in [`CONFIG`].
pub const KEY_ACME: &str = "key-acme";

/// A config in the reference's shape: the source's four enforcement points,
/// seats, an LLM estimate route and a catch-all, on the memory store. Its
/// upstream timeout is generous, so that a loaded test machine never turns
/// an answer into a 504; [`UPSTREAM_TIMEOUT`] names the line for the tests
/// that set their own.
pub const UPSTREAM_TIMEOUT: &str = "upstream_timeout = \"10s\"";

pub const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
max_body_bytes = 1048576
upstream_timeout = "10s"

[store]
backend = "memory"

[identity]
sources = ["api_key", "header"]

[identity.api_key]
header = "authorization"
keys = [
  { sha256 = "01eb3d0bb8a6b1c86e2cd457fdbc5d1e8b2d0bd6fbd3e2bbf4b5d3f6fc5d53ed", org = "org_unused", name = "unused" },
  { sha256 = "${KEY_ACME_SHA}", org = "org_acme", name = "acme" },
]

[identity.header]
name = "x-org-id"
trusted_peers = ["127.0.0.1/32"]

[upstreams.api]
url = "http://${UPSTREAM}"

[upstreams.openai]
url = "http://${UPSTREAM}"
headers = { authorization = "Bearer provider-secret", x-provider = "openai" }

[upstreams.dead]
url = "http://${DEAD_UPSTREAM}"

[[routes]]
name = "playbook-execute"
method = "POST"
path = "/api/v1/playbooks/{id}/execute"
upstream = "api"
cost = { playbook_runs = 1 }

[[routes]]
name = "brief-generate"
method = "POST"
path = "/api/v1/content/briefs/generate"
upstream = "api"
cost = { tokens = 10000 }

[[routes]]
name = "content-rewrite"
method = "POST"
path = "/api/v1/content/rewrite"
upstream = "api"
cost = { tokens = 8000 }

[[routes]]
name = "member-add"
method = "POST"
path = "/api/v1/orgs/{org}/members"
upstream = "api"
cost = { seats = 1 }

[[routes]]
name = "member-remove"
method = "DELETE"
path = "/api/v1/orgs/{org}/members/{member}"
upstream = "api"
cost = { seats = -1 }

[[routes]]
name = "openai-chat"
method = "POST"
path = "/v1/chat/completions"
upstream = "openai"
cost = { tokens = "estimate" }
default_max_tokens = 4096

[[routes]]
name = "dead-metered"
method = "POST"
path = "/dead/metered"
upstream = "dead"
cost = { playbook_runs = 1 }

[[routes]]
name = "dead-unmetered"
path = "/dead/{*rest}"
upstream = "dead"

[[routes]]
name = "everything-else"
path = "/{*rest}"
upstream = "api"

[plans.free]
tokens = 100000
playbook_runs = 10
seats = 3

[plans.pro]
tokens = 5000000
playbook_runs = 500
seats = 25

[defaults]
plan = "free"
billing_status = "active"

[orgs.org_shadow]
plan = "free"
enforcement = "shadow"

[orgs.org_off]
plan = "free"
enforcement = "off"

[orgs.org_custom]
plan = "pro"
billing_status = "past_due"
period_anchor_day = 5
limits = { playbook_runs = 2 }
"#;

/// [`CONFIG`] with `${KEY_ACME_SHA}` filled in and `edit` applied.
pub fn config_with(edit: impl FnOnce(String) -> String) -> String {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(KEY_ACME.as_bytes()));
    edit(CONFIG.replace("${KEY_ACME_SHA}", &digest))
}

pub fn config() -> String {
    config_with(|c| c)
}
