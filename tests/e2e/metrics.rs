//! The metrics the gateway exposes, read as a scraper reads them, after a
//! known sequence of requests on the memory store and on Redis; and the
//! access log, read from the binary's JSON log.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tollgate::quota::Dimension;

use crate::support::provider::{OPENAI_USAGE, Provider};
use crate::support::redis::RedisServer;
use crate::support::{Gateway, Upstream, client, count, eventually, metric, run_clock, within};

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
upstream_timeout = "2s"

[store]
backend = "memory"
timeout = "200ms"
on_error = "allow"

[identity]
sources = ["header"]

[identity.header]
name = "x-org-id"
trusted_peers = ["127.0.0.1/32"]

[upstreams.api]
url = "http://${UPSTREAM}"

[upstreams.openai]
url = "http://${PROVIDER}"

[upstreams.dead]
url = "http://${DEAD_UPSTREAM}"

[[routes]]
name = "run"
method = "POST"
path = "/run"
upstream = "api"
cost = { playbook_runs = 1 }

[[routes]]
name = "gone"
method = "POST"
path = "/gone"
upstream = "dead"
cost = { playbook_runs = 1 }

[[routes]]
name = "chat"
method = "POST"
path = "/v1/chat/completions"
upstream = "openai"
cost = { tokens = "estimate" }

[[routes]]
name = "health"
method = "GET"
path = "/health"
upstream = "api"

[orgs.org_m]
limits = { playbook_runs = 3 }
"#;

struct Setup {
    gateway: Gateway,
    _upstream: Upstream,
    _provider: Provider,
}

async fn setup(redis: Option<&RedisServer>) -> Setup {
    let (upstream, provider) = (Upstream::start().await, Provider::start().await);
    let mut vars = vec![("PROVIDER", provider.addr.to_string())];
    let config = match redis {
        None => CONFIG.to_owned(),
        Some(redis) => {
            vars.push(("REDIS_URL", redis.url()));
            CONFIG.replace(
                "backend = \"memory\"",
                "backend = \"redis\"\nurl = \"${REDIS_URL}\"",
            )
        }
    };
    let gateway = Gateway::launch(&config, &upstream, &vars, run_clock()).await;
    Setup {
        gateway,
        _upstream: upstream,
        _provider: provider,
    }
}

async fn send(gateway: &Gateway, method: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut request = client().request(method.parse().unwrap(), gateway.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if path == "/v1/chat/completions" {
        request = request.json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}));
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    response.bytes().await.unwrap();
    status
}

const ORG: (&str, &str) = ("x-org-id", "org_m");

fn requests(gateway: &Gateway, route: &str, outcome: &str) -> u64 {
    count(
        &gateway.app,
        "tollgate_requests_total",
        &[("route", route), ("outcome", outcome)],
    )
}

fn by_route(gateway: &Gateway, name: &str, route: &str) -> u64 {
    count(&gateway.app, name, &[("route", route)])
}

/// Forwarded, refunded (an upstream 500, an upstream that is not there),
/// denied, unauthorized, not found, unmetered and an LLM reconciliation:
/// each counted where the table says, and the store agreeing.
async fn a_known_sequence(gateway: &Gateway) {
    assert_eq!(send(gateway, "POST", "/run", &[ORG]).await, 200);
    assert_eq!(
        send(gateway, "POST", "/run", &[ORG, ("x-test-status", "500")]).await,
        500
    );
    assert_eq!(send(gateway, "POST", "/gone", &[ORG]).await, 502);
    eventually("the two failures are refunded", async || {
        by_route(gateway, "tollgate_refunds_total", "run") == 1
            && by_route(gateway, "tollgate_refunds_total", "gone") == 1
    })
    .await;
    gateway
        .settles_at("org_m", Dimension::PlaybookRuns, 1)
        .await;
    for _ in 0..2 {
        assert_eq!(send(gateway, "POST", "/run", &[ORG]).await, 200);
    }
    assert_eq!(send(gateway, "POST", "/run", &[ORG]).await, 402);
    gateway
        .settles_at("org_m", Dimension::PlaybookRuns, 3)
        .await;
    assert_eq!(send(gateway, "POST", "/run", &[]).await, 401);
    assert_eq!(send(gateway, "GET", "/nowhere", &[ORG]).await, 404);
    assert_eq!(send(gateway, "GET", "/health", &[]).await, 200);
    assert_eq!(
        send(gateway, "POST", "/v1/chat/completions", &[ORG]).await,
        200
    );
    gateway
        .settles_at("org_m", Dimension::Tokens, OPENAI_USAGE)
        .await;

    // An upstream's own 500 was still forwarded; the missing upstream was not.
    assert_eq!(requests(gateway, "run", "forwarded"), 4);
    assert_eq!(requests(gateway, "gone", "upstream_error"), 1);
    assert_eq!(requests(gateway, "run", "denied"), 1);
    assert_eq!(requests(gateway, "run", "unauthorized"), 1);
    assert_eq!(requests(gateway, "", "not_found"), 1);
    assert_eq!(requests(gateway, "health", "forwarded"), 1);
    assert_eq!(requests(gateway, "chat", "forwarded"), 1);
    assert_eq!(requests(gateway, "run", "fail_open"), 0);
    let denials = &[("route", "run"), ("quota_type", "playbook_runs")];
    assert_eq!(
        count(&gateway.app, "tollgate_quota_denials_total", denials),
        1
    );
    assert_eq!(count(&gateway.app, "tollgate_quota_denials_total", &[]), 1);

    // The estimate was reserved, then replaced by the usage reported.
    assert!(by_route(gateway, "tollgate_tokens_reserved_total", "chat") > OPENAI_USAGE as u64);
    assert_eq!(
        by_route(gateway, "tollgate_tokens_reconciled_total", "chat"),
        OPENAI_USAGE as u64
    );
    assert_eq!(
        by_route(gateway, "tollgate_tokens_reserved_total", "run"),
        0
    );
    assert_eq!(by_route(gateway, "tollgate_refunds_total", "chat"), 0);

    // Seven reservations, each answered; two refunds and the
    // reconciliation settled in the store.
    let reserves = &[("operation", "reserve")];
    assert_eq!(
        count(
            &gateway.app,
            "tollgate_store_duration_seconds_count",
            reserves
        ),
        7
    );
    assert!(
        metric(
            &gateway.app,
            "tollgate_store_duration_seconds_sum",
            reserves
        ) > 0.0
    );
    let settles = &[("operation", "settle")];
    assert_eq!(
        count(
            &gateway.app,
            "tollgate_store_duration_seconds_count",
            settles
        ),
        3
    );
    assert_eq!(count(&gateway.app, "tollgate_store_errors_total", &[]), 0);
    // Four answers from the stand-in (one a 500), one from the provider.
    let api = &[("upstream", "api")];
    assert_eq!(
        count(
            &gateway.app,
            "tollgate_upstream_duration_seconds_count",
            api
        ),
        5
    );
    let openai = &[("upstream", "openai")];
    assert_eq!(
        count(
            &gateway.app,
            "tollgate_upstream_duration_seconds_count",
            openai
        ),
        1
    );
    let dead = &[("upstream", "dead")];
    assert_eq!(
        count(
            &gateway.app,
            "tollgate_upstream_duration_seconds_count",
            dead
        ),
        0
    );
    assert_eq!(count(&gateway.app, "tollgate_reservations_open", &[]), 0);
    assert_eq!(
        count(&gateway.app, "tollgate_settlements_failed_total", &[]),
        0
    );
    assert_eq!(
        count(
            &gateway.app,
            "tollgate_config_reloads_total",
            &[("result", "ok")]
        ),
        0
    );
}

#[tokio::test]
async fn a_known_sequence_on_the_memory_store_is_counted_in_every_family() {
    let s = setup(None).await;
    a_known_sequence(&s.gateway).await;
}

#[tokio::test]
async fn a_known_sequence_on_redis_is_counted_and_a_stopped_redis_fails_open() {
    let mut redis = RedisServer::start().await;
    let s = setup(Some(&redis)).await;
    let gateway = &s.gateway;
    a_known_sequence(gateway).await;

    redis.stop();
    assert_eq!(
        send(gateway, "POST", "/run", &[("x-org-id", "org_other")]).await,
        200
    );
    assert_eq!(requests(gateway, "run", "fail_open"), 1);
    assert_eq!(requests(gateway, "run", "forwarded"), 4);
    let reserves = &[("operation", "reserve")];
    assert_eq!(
        count(&gateway.app, "tollgate_store_errors_total", reserves),
        1
    );
    assert_eq!(
        count(
            &gateway.app,
            "tollgate_store_duration_seconds_count",
            reserves
        ),
        8
    );
    assert_eq!(by_route(gateway, "tollgate_refunds_total", "run"), 1);
}

/// Every family of DESIGN.md's table, with its type.
const FAMILIES: [(&str, &str); 11] = [
    ("tollgate_requests", "counter"),
    ("tollgate_quota_denials", "counter"),
    ("tollgate_store_errors", "counter"),
    ("tollgate_store_duration_seconds", "histogram"),
    ("tollgate_upstream_duration_seconds", "histogram"),
    ("tollgate_tokens_reserved", "counter"),
    ("tollgate_tokens_reconciled", "counter"),
    ("tollgate_refunds", "counter"),
    ("tollgate_settlements_failed", "counter"),
    ("tollgate_reservations_open", "gauge"),
    ("tollgate_config_reloads", "counter"),
];

#[tokio::test]
async fn a_serving_gateway_writes_every_family_of_the_table_from_the_start() {
    let s = setup(None).await;
    let declared = |text: &str| {
        FAMILIES
            .iter()
            .all(|(family, kind)| text.contains(&format!("# TYPE {family} {kind}\n")))
    };
    eventually("every family is declared", async || {
        declared(&s.gateway.app.metrics().encode())
    })
    .await;
    let text = s.gateway.app.metrics().encode();
    assert!(text.ends_with("# EOF\n"));
    assert!(text.contains("tollgate_requests_total{route=\"run\",outcome=\"denied\"} 0\n"));
    assert!(text.contains("tollgate_requests_total{route=\"\",outcome=\"not_found\"} 0\n"));
    assert!(tollgate::metrics::CONTENT_TYPE.starts_with("application/openmetrics-text"));
}

/// The JSON log lines of a `tollgate run` child, one a call.
struct Log(std::io::Lines<BufReader<std::process::ChildStderr>>);

impl Log {
    /// The next line with target `tollgate::access`.
    fn next_access(&mut self) -> Value {
        for line in self.0.by_ref() {
            let line: Value = serde_json::from_str(&line.unwrap()).unwrap();
            if line["target"] == "tollgate::access" {
                return line;
            }
        }
        panic!("the log ended before an access line");
    }
}

#[tokio::test]
async fn the_access_log_writes_one_json_line_per_request_with_its_fields() {
    let upstream = Upstream::start().await;
    let port = crate::support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.toml");
    let config = CONFIG
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\"\naccess_log = true"),
        )
        .replace("${UPSTREAM}", &upstream.addr.to_string())
        .replace("${PROVIDER}", "127.0.0.1:9")
        .replace("${DEAD_UPSTREAM}", "127.0.0.1:9");
    std::fs::write(&file, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--log-json", "run", "--config"])
        .arg(&file)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = Log(BufReader::new(child.stderr.take().unwrap()).lines());
    eventually("the gateway listens", async || {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let ran = client()
        .post(url("/run"))
        .header("x-org-id", "org_m")
        .send()
        .await
        .unwrap();
    assert_eq!(ran.status(), 200);
    let missing = client().get(url("/nowhere")).send().await.unwrap();
    assert_eq!(missing.status(), 404);

    let (ran, missing) = within(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || (log.next_access(), log.next_access())),
    )
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();

    let fields = &ran["fields"];
    assert_eq!(ran["level"], "INFO");
    assert_eq!(fields["route"], "run");
    assert_eq!(fields["org"], "org_m");
    assert_eq!(fields["status"], 200);
    assert_eq!(fields["cost.playbook_runs"], 1);
    assert!(fields.get("cost.tokens").is_none(), "{ran}");
    assert!(fields["upstream_ms"].as_f64().unwrap() > 0.0, "{ran}");

    let fields = &missing["fields"];
    assert_eq!(fields["route"], "");
    assert_eq!(fields["status"], 404);
    assert!(fields.get("org").is_none(), "{missing}");
    assert!(fields.get("upstream_ms").is_none(), "{missing}");
}
