//! What an outage of the store costs billing, measured on a real
//! redis-server: concurrent load on a route costing one token, every tenth
//! answer failing upstream (so refunds are in play), through each fault
//! Redis can have, from 20 clients: stopped (SIGSTOP) for longer than three
//! store timeouts,
//! killed (-9) and restarted on its port, its clients' connections killed,
//! a command blocking it. After each fault the load stops, the outbox
//! drains, and the counter in Redis is compared with the answers that
//! succeeded: the drift, which every policy accounts for to the request.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::support::provider::{OPENAI_USAGE, Provider};
use crate::support::redis::{RedisServer, counter_key};
use crate::support::{
    Gateway, Upstream, client, config_with, count, eventually, held_failing_request, run_clock,
    within,
};

/// The shared test config on Redis with a store timeout of 100ms, the
/// policy `on_error`, `store` lines added, and two routes costing a token:
/// `/one` under the policy, `/one-strict` failing closed.
fn outage_config(on_error: &str, store: &str) -> String {
    config_with(|c| {
        c.replace(
            "backend = \"memory\"",
            &format!(
                "backend = \"redis\"\nurl = \"${{REDIS_URL}}\"\ntimeout = \"100ms\"\n\
                 on_error = \"{on_error}\"\n{store}"
            ),
        )
        .replace(
            "[[routes]]\nname = \"everything-else\"",
            "[[routes]]\nname = \"one-token\"\nmethod = \"POST\"\npath = \"/one\"\nupstream = \"api\"\ncost = { tokens = 1 }\n\n\
             [[routes]]\nname = \"one-token-strict\"\nmethod = \"POST\"\npath = \"/one-strict\"\nupstream = \"api\"\ncost = { tokens = 1 }\non_error = \"deny\"\n\n\
             [[routes]]\nname = \"everything-else\"",
        ) + "\n[orgs.org_load]\nplan = \"pro\"\n"
    })
}

async fn gateway(redis: &RedisServer, upstream: &Upstream, on_error: &str, store: &str) -> Gateway {
    launch(&outage_config(on_error, store), redis, upstream).await
}

async fn launch(config: &str, redis: &RedisServer, upstream: &Upstream) -> Gateway {
    Gateway::launch(config, upstream, &[("REDIS_URL", redis.url())], run_clock()).await
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGSTOP for 1.5 s (fifteen store timeouts), then SIGCONT.
    Stopped,
    /// kill -9, down for 300 ms (three store timeouts), then a new server
    /// on the same port, from its append-only file. Down that long, it
    /// meets calls: a restart quick enough to meet none (the new server up
    /// before any client had run) went unfelt now and then.
    Restarted,
    /// `CLIENT KILL TYPE normal`: every client's connection cut.
    ClientsKilled,
    /// `DEBUG SLEEP 1`: Redis runs nothing else for a second.
    Blocked,
}

const FAULTS: [Fault; 4] = [
    Fault::Stopped,
    Fault::Restarted,
    Fault::ClientsKilled,
    Fault::Blocked,
];

impl Fault {
    async fn apply(self, redis: &mut RedisServer) {
        match self {
            Fault::Stopped => {
                redis.signal("STOP");
                tokio::time::sleep(Duration::from_millis(1500)).await;
                redis.signal("CONT");
            }
            Fault::Restarted => {
                redis.stop();
                tokio::time::sleep(Duration::from_millis(300)).await;
                redis.restart().await;
            }
            Fault::ClientsKilled => {
                let killed = blocking(redis, &["CLIENT", "KILL", "TYPE", "normal"]).await;
                // This command's own connection is one of them.
                assert!(
                    matches!(killed, redis::Value::Int(2..)),
                    "killed {killed:?}"
                );
            }
            Fault::Blocked => {
                blocking(redis, &["DEBUG", "SLEEP", "1"]).await;
            }
        }
    }

    /// Whether every gateway must have seen a store call fail. A cut
    /// connection may be replaced before any call meets it.
    fn always_felt(self) -> bool {
        !matches!(self, Fault::ClientsKilled)
    }
}

/// Runs `args` on a connection of its own, off the runtime, which it may
/// hold for as long as the command blocks Redis; its reply.
async fn blocking(redis: &RedisServer, args: &[&str]) -> redis::Value {
    let url = redis.url();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut connection = redis::Client::open(url).unwrap().get_connection().unwrap();
        let mut command = redis::cmd(&args[0]);
        command.arg(&args[1..]);
        command.query::<redis::Value>(&mut connection).unwrap()
    })
    .await
    .unwrap()
}

/// What the clients saw during one fault.
#[derive(Default)]
struct Answers {
    sent: AtomicUsize,
    answered: AtomicUsize,
    succeeded: AtomicUsize,
    /// 503s on `/one`, the route under the policy.
    refused: AtomicUsize,
    /// Any other status, and whether it was a failing request's.
    unexpected: Mutex<Vec<(u16, bool)>>,
}

impl Answers {
    fn count(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }
}

/// One row of the drift table.
struct Row {
    fault: Fault,
    requests: usize,
    succeeded: usize,
    refused: usize,
    failed_open: u64,
    deferred: u64,
    store_errors: u64,
    drift: i64,
}

/// Load from `clients` clients spread over `gateways`, each sending one
/// request after another until `stop`; every tenth fails upstream, by
/// `failing_path`.
fn load(
    gateways: &[Gateway],
    clients: usize,
    failing_path: &'static str,
    answers: &Arc<Answers>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|i| {
            let gateway = &gateways[i % gateways.len()];
            let (one, failing) = (gateway.url("/one"), gateway.url(failing_path));
            let (answers, stop) = (answers.clone(), stop.clone());
            tokio::spawn(async move {
                let client = client();
                while !stop.load(Ordering::Relaxed) {
                    let fails = answers.sent.fetch_add(1, Ordering::Relaxed) % 10 == 9;
                    let request = if fails {
                        client.post(&failing).header("x-test-status", "500")
                    } else {
                        client.post(&one)
                    };
                    let status = request
                        .header("x-org-id", "org_load")
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16();
                    answers.answered.fetch_add(1, Ordering::Relaxed);
                    let counter = match (status, fails) {
                        (200, false) => &answers.succeeded,
                        (500, true) => continue,
                        (503, true) if failing_path == "/one-strict" => continue,
                        (503, _) => &answers.refused,
                        _ => {
                            answers.unexpected.lock().unwrap().push((status, fails));
                            continue;
                        }
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

fn counter(redis: &RedisServer) -> i64 {
    redis
        .command::<Option<i64>>(&["GET", &counter_key("org_load", "tokens")])
        .unwrap_or(0)
}

fn total(gateways: &[Gateway], name: &str, labels: &[(&str, &str)]) -> u64 {
    gateways.iter().map(|g| count(&g.app, name, labels)).sum()
}

const FAIL_OPEN: (&str, &[(&str, &str)]) = ("tollgate_requests_total", &[("outcome", "fail_open")]);
const DEFERRED: (&str, &[(&str, &str)]) = ("tollgate_deferred_charges_total", &[]);
const STORE_ERRORS: (&str, &[(&str, &str)]) = ("tollgate_store_errors_total", &[]);

/// Waits until no gateway has a settlement left to apply: none on its
/// first attempt, none in its outbox, no reservation open.
async fn settled(gateways: &[Gateway]) {
    eventually("every settlement is applied", async || {
        gateways
            .iter()
            .all(|g| g.app.unsettled() == 0 && g.app.metrics().open_reservations() == 0)
    })
    .await;
}

/// Load through `fault`: 200 answers before it, 200 after it is over.
async fn through(
    fault: Fault,
    redis: &mut RedisServer,
    gateways: &[Gateway],
    failing_path: &'static str,
) -> Row {
    let counted = counter(redis);
    let failed_open = total(gateways, FAIL_OPEN.0, FAIL_OPEN.1);
    let deferred = total(gateways, DEFERRED.0, DEFERRED.1);
    let store_errors = total(gateways, STORE_ERRORS.0, STORE_ERRORS.1);
    let (answers, stop) = (
        Arc::new(Answers::default()),
        Arc::new(AtomicBool::new(false)),
    );
    let clients = load(gateways, 20, failing_path, &answers, &stop);

    eventually("200 answers before the fault", async || {
        answers.count() >= 200
    })
    .await;
    fault.apply(redis).await;
    let before = answers.count();
    eventually("200 answers after the fault", async || {
        answers.count() >= before + 200
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    settled(gateways).await;

    let unexpected = answers.unexpected.lock().unwrap().clone();
    assert!(unexpected.is_empty(), "{fault:?}: {unexpected:?}");
    let succeeded = answers.succeeded.load(Ordering::Relaxed);
    Row {
        fault,
        requests: answers.sent.load(Ordering::Relaxed),
        succeeded,
        refused: answers.refused.load(Ordering::Relaxed),
        failed_open: total(gateways, FAIL_OPEN.0, FAIL_OPEN.1) - failed_open,
        deferred: total(gateways, DEFERRED.0, DEFERRED.1) - deferred,
        store_errors: total(gateways, STORE_ERRORS.0, STORE_ERRORS.1) - store_errors,
        drift: counter(redis) - counted - succeeded as i64,
    }
}

/// Every fault in turn, under `on_error`, on `instances` gateways sharing
/// one Redis; the drift table, printed.
async fn drift_table(on_error: &str, instances: usize) -> Vec<Row> {
    let mut redis = RedisServer::start_durable().await;
    let upstream = Upstream::start().await;
    let mut gateways = Vec::new();
    for _ in 0..instances {
        gateways.push(gateway(&redis, &upstream, on_error, "").await);
    }
    // Under "allow", the failing tenth fails closed: every request let
    // through uncounted is then one that succeeded, and the drift is
    // exactly the fail-open count.
    let failing_path = if on_error == "allow" {
        "/one-strict"
    } else {
        "/one"
    };
    let mut rows = Vec::new();
    for fault in FAULTS {
        rows.push(through(fault, &mut redis, &gateways, failing_path).await);
    }
    print_table(on_error, instances, &rows);
    for row in rows.iter().filter(|row| row.fault.always_felt()) {
        assert!(row.store_errors > 0, "{:?} was not felt", row.fault);
    }
    rows
}

/// Prints `rows` at once, so that the tables of tests running side by side
/// stay whole.
fn print_table(on_error: &str, instances: usize, rows: &[Row]) {
    let mut table = format!(
        "on_error = {on_error:?}, {instances} gateway(s):\n\
         fault          requests  successes  503s  fail-open  deferred  store errors  drift\n"
    );
    for row in rows {
        table += &format!(
            "{:<14} {:>8} {:>10} {:>5} {:>10} {:>9} {:>13} {:>6}\n",
            format!("{:?}", row.fault),
            row.requests,
            row.succeeded,
            row.refused,
            row.failed_open,
            row.deferred,
            row.store_errors,
            row.drift
        );
    }
    println!("{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_deny_no_fault_of_redis_invents_or_loses_a_charge() {
    for row in drift_table("deny", 1).await {
        assert_eq!(row.drift, 0, "{:?}", row.fault);
        assert_eq!(row.failed_open + row.deferred, 0, "{:?}", row.fault);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_defer_every_request_is_forwarded_and_charged_once_through_every_fault() {
    for row in drift_table("defer", 1).await {
        assert_eq!(row.drift, 0, "{:?}", row.fault);
        assert_eq!(row.refused, 0, "{:?}: no request is refused", row.fault);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_allow_the_drift_is_exactly_the_requests_let_through_uncounted() {
    for row in drift_table("allow", 1).await {
        assert_eq!(row.drift, -(row.failed_open as i64), "{:?}", row.fault);
        assert_eq!(row.refused, 0, "{:?}", row.fault);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_redis_invent_or_lose_no_charge_with_deny_or_defer() {
    for on_error in ["deny", "defer"] {
        for row in drift_table(on_error, 2).await {
            assert_eq!(row.drift, 0, "{on_error}: {:?}", row.fault);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_deferred_while_redis_is_stopped_are_applied_at_shutdown_once_it_is_back() {
    let redis = RedisServer::start_durable().await;
    let upstream = Upstream::start().await;
    let mut gateway = gateway(&redis, &upstream, "defer", "").await;
    redis.signal("STOP");
    for _ in 0..3 {
        let response = client()
            .post(gateway.url("/one"))
            .header("x-org-id", "org_load")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let metrics = gateway.app.metrics().clone();
    assert_eq!(metrics.settlements_pending.get(), 3);

    let stopped = tokio::spawn(gateway.shut_down());
    eventually("the listener is closed", async || {
        tokio::net::TcpStream::connect(gateway.addr).await.is_err()
    })
    .await;
    assert!(
        !stopped.is_finished(),
        "the outbox cannot drain into a stopped Redis"
    );
    redis.signal("CONT");
    within(Duration::from_secs(10), stopped).await.unwrap();

    // Read at once: the gateway is gone, so the charges came before it went.
    assert_eq!(counter(&redis), 3);
    assert_eq!(metrics.settlements_retried.get(), 3);
    assert_eq!(metrics.settlements_failed.get(), 0);
}

#[tokio::test]
async fn with_defer_a_full_outbox_refuses_requests_rather_than_forward_them_uncounted() {
    let mut redis = RedisServer::start_durable().await;
    let upstream = Upstream::start().await;
    let gateway = gateway(&redis, &upstream, "defer", "max_pending_settlements = 2").await;
    redis.stop();

    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = client()
            .post(gateway.url("/one"))
            .header("x-org-id", "org_load")
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }

    assert_eq!(statuses, [200, 200, 503, 503]);
    assert_eq!(upstream.hits(), 2);
    redis.restart().await;
    settled(std::slice::from_ref(&gateway)).await;
    assert_eq!(counter(&redis), 2);
}

#[tokio::test]
async fn a_charge_redis_does_not_confirm_within_settle_retry_for_is_given_up_and_counted() {
    let mut redis = RedisServer::start_durable().await;
    let upstream = Upstream::start().await;
    let gateway = gateway(&redis, &upstream, "defer", "settle_retry_for = \"1s\"").await;
    redis.stop();
    let response = client()
        .post(gateway.url("/one"))
        .header("x-org-id", "org_load")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let metrics = gateway.app.metrics();
    eventually("the charge is given up", async || {
        metrics.settlements_failed.get() == 1
    })
    .await;

    redis.restart().await;
    settled(std::slice::from_ref(&gateway)).await;
    assert_eq!(counter(&redis), 0);
    assert_eq!(metrics.settlements_retried.get(), 0);
}

#[tokio::test]
async fn deferred_chat_completions_are_charged_the_usage_reported_and_refunded_when_they_fail() {
    let mut redis = RedisServer::start_durable().await;
    let upstream = Upstream::start().await;
    let provider = Provider::start().await;
    let config = outage_config("defer", "").replace(
        "[upstreams.openai]\nurl = \"http://${UPSTREAM}\"",
        &format!("[upstreams.openai]\nurl = \"http://{}\"", provider.addr),
    );
    let gateway = launch(&config, &redis, &upstream).await;
    redis.stop();

    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100});
    for status in ["200", "500"] {
        let response = client()
            .post(gateway.url("/v1/chat/completions"))
            .header("x-org-id", "org_load")
            .header("x-test-status", status)
            .json(&chat)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_str(), status);
        response.text().await.unwrap();
    }

    let metrics = gateway.app.metrics();
    assert_eq!(metrics.deferred_charges.get(), 2);
    redis.restart().await;
    settled(std::slice::from_ref(&gateway)).await;
    assert_eq!(counter(&redis), OPENAI_USAGE);
    assert_eq!(metrics.settlements_failed.get(), 0);
}

#[tokio::test]
async fn behind_a_stopped_redis_only_the_call_under_way_waits_for_it() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    // One worker, so one connection to Redis.
    let config = outage_config("deny", "").replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nworkers = 1",
    );
    let gateway = launch(&config, &redis, &upstream).await;
    let one = || {
        client()
            .post(gateway.url("/one"))
            .header("x-org-id", "org_load")
            .send()
    };
    // The first call connects and loads the script, which on a loaded
    // machine may take longer than the store timeout.
    eventually("a request is admitted", async || {
        one().await.unwrap().status() == 200
    })
    .await;

    redis.signal("STOP");
    for _ in 0..20 {
        assert_eq!(one().await.unwrap().status(), 503);
    }
    // The calls queued behind the one Redis holds were answered at the
    // store timeout, and will never be sent.
    eventually("one reservation waits for Redis", async || {
        gateway.app.unsettled() == 1
    })
    .await;
    redis.signal("CONT");

    settled(std::slice::from_ref(&gateway)).await;
    assert_eq!(counter(&redis), 1);
}

#[tokio::test]
async fn a_settlement_redis_holds_past_the_store_timeout_goes_to_the_outbox_and_is_applied_once() {
    let redis = RedisServer::start_durable().await;
    let upstream = Upstream::start().await;
    let gateway = gateway(&redis, &upstream, "deny", "").await;
    // Admitted, then failed upstream: its refund is the settlement.
    let request = held_failing_request(&gateway, &upstream, "/one", "org_load", 500).await;
    assert_eq!(counter(&redis), 1);
    redis.signal("STOP");
    upstream.release();
    let response = within(Duration::from_secs(10), request)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 500);

    // Sent to a Redis that runs nothing, the refund is unconfirmed at the
    // store timeout (100 ms) and goes to the outbox, though still in flight.
    let metrics = gateway.app.metrics();
    eventually("the refund Redis holds is in the outbox", async || {
        metrics.settlements_queued.get() == 1
    })
    .await;
    redis.signal("CONT");
    settled(std::slice::from_ref(&gateway)).await;
    // Applied once: by the call in flight or by the outbox's, not by both.
    assert_eq!(counter(&redis), 0);
    assert_eq!(metrics.settlements_failed.get(), 0);
}
