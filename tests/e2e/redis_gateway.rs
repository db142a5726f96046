//! The gateway on the Redis store: exact across instances, and what happens
//! when Redis goes away and comes back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tollgate::quota::Dimension;

use crate::support::redis::{RedisServer, counter_key};
use crate::support::{
    Gateway, Upstream, client, config_with, envelope, eventually, held_failing_request, post,
    run_clock, within,
};

/// The shared test config on Redis, with a route costing 10 tokens, an org
/// allowed 1,000 tokens, and the store's `timeout` and `on_error` as given.
fn redis_config(timeout: &str, on_error: &str) -> String {
    config_with(|c| {
        c.replace(
            "backend = \"memory\"",
            &format!("backend = \"redis\"\nurl = \"${{REDIS_URL}}\"\ntimeout = \"{timeout}\"\non_error = \"{on_error}\""),
        )
        .replace(
            "[[routes]]\nname = \"everything-else\"",
            "[[routes]]\nname = \"ten-tokens\"\nmethod = \"POST\"\npath = \"/ten\"\nupstream = \"api\"\ncost = { tokens = 10 }\n\n\
             [[routes]]\nname = \"ten-tokens-strict\"\nmethod = \"POST\"\npath = \"/ten-strict\"\nupstream = \"api\"\ncost = { tokens = 10 }\non_error = \"deny\"\n\n\
             [[routes]]\nname = \"everything-else\"",
        )
            + "\n[orgs.org_pair]\nplan = \"free\"\nlimits = { tokens = 1000 }\n"
    })
}

/// A gateway on `redis` with a 100ms store timeout.
async fn start(redis: &RedisServer, upstream: &Upstream, on_error: &str) -> Gateway {
    start_with_timeout(redis, upstream, "100ms", on_error).await
}

async fn start_with_timeout(
    redis: &RedisServer,
    upstream: &Upstream,
    timeout: &str,
    on_error: &str,
) -> Gateway {
    let config = redis_config(timeout, on_error);
    Gateway::launch(
        &config,
        upstream,
        &[("REDIS_URL", redis.url())],
        run_clock(),
    )
    .await
}

#[tokio::test]
async fn two_gateways_sharing_one_redis_admit_exactly_the_limit() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    // A generous timeout and fail-closed: a burst of 500 on a 2-core test
    // machine must not turn into uncounted fail-open passes.
    let first = start_with_timeout(&redis, &upstream, "5s", "deny").await;
    let second = start_with_timeout(&redis, &upstream, "5s", "deny").await;
    let client = client();

    let responses = join_all((0..500).map(|i| {
        let gateway = if i % 2 == 0 { &first } else { &second };
        client
            .post(gateway.url("/ten"))
            .header("x-org-id", "org_pair")
            .send()
    }))
    .await;

    let statuses: Vec<u16> = responses
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 100);
    assert_eq!(statuses.iter().filter(|&&s| s == 402).count(), 400);
    assert_eq!(upstream.hits(), 100);
    assert_eq!(
        redis.command::<i64>(&["GET", &counter_key("org_pair", "tokens")]),
        1000
    );
    assert_eq!(
        crate::support::count(&first.app, "tollgate_store_errors_total", &[]),
        0
    );
}

/// Drives `path` from four clients until Redis is stopped partway and twenty
/// more answers have come, returning every status with its latency.
async fn load_while_redis_stops(
    gateway: &Gateway,
    redis: &mut RedisServer,
    path: &str,
) -> (Vec<(u16, Duration)>, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop, answers) = (gateway.url(path), stop.clone(), answers.clone());
            tokio::spawn(async move {
                let client = client();
                // Bounded: at most 2,000 requests per worker.
                for _ in 0..2000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let started = Instant::now();
                    let response = client
                        .post(&url)
                        .header("x-org-id", "org_load")
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    let body = response.text().await.unwrap();
                    answers
                        .lock()
                        .unwrap()
                        .push((status, started.elapsed(), body));
                }
            })
        })
        .collect();

    eventually("some requests pass before Redis stops", async || {
        answers.lock().unwrap().len() >= 20
    })
    .await;
    redis.stop();
    let stopped_at = answers.lock().unwrap().len();
    eventually("twenty answers come after Redis stopped", async || {
        answers.lock().unwrap().len() >= stopped_at + 24
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    join_all(workers).await;

    let answers = answers.lock().unwrap();
    for (status, _, body) in answers.iter() {
        assert!(
            !body.contains("redis") && !body.contains("Connection refused"),
            "an answer leaks internals: {status} {body}"
        );
    }
    (
        answers.iter().map(|(s, d, _)| (*s, *d)).collect(),
        stopped_at,
    )
}

#[tokio::test]
async fn with_on_error_allow_requests_pass_while_redis_is_down() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let gateway = start(&redis, &upstream, "allow").await;

    let (answers, _) = load_while_redis_stops(&gateway, &mut redis, "/ten").await;

    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    assert!(
        crate::support::count(
            &gateway.app,
            "tollgate_requests_total",
            &[("outcome", "fail_open")]
        ) >= 20
    );
    assert_eq!(gateway.app.metrics().open_reservations(), 0);
}

#[tokio::test]
async fn with_on_error_deny_requests_get_a_prompt_503_while_redis_is_down() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let gateway = start(&redis, &upstream, "deny").await;

    let (answers, stopped_at) = load_while_redis_stops(&gateway, &mut redis, "/ten").await;

    assert!(
        answers[..stopped_at]
            .iter()
            .all(|(status, _)| *status == 200)
    );
    let after = &answers[stopped_at..];
    assert!(
        after
            .iter()
            .all(|(status, _)| *status == 200 || *status == 503),
        "{after:?}"
    );
    let refused: Vec<Duration> = after
        .iter()
        .filter(|(s, _)| *s == 503)
        .map(|(_, d)| *d)
        .collect();
    assert!(refused.len() >= 20, "{after:?}");
    // Bounded by store.timeout (100ms), with room for a loaded test machine.
    let slowest = refused.iter().max().unwrap();
    assert!(*slowest < Duration::from_secs(2), "a 503 took {slowest:?}");

    let response = post(&gateway, "/ten", "org_load").await;
    let body = envelope(response, 503, "QUOTA_STORE_UNAVAILABLE").await;
    assert_eq!(
        body["error"]["message"],
        "quota enforcement is unavailable, try again shortly"
    );
}

#[tokio::test]
async fn a_route_can_fail_closed_while_the_gateway_fails_open() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let gateway = start(&redis, &upstream, "allow").await;
    redis.stop();

    assert_eq!(post(&gateway, "/ten", "org_mixed").await.status(), 200);
    envelope(
        post(&gateway, "/ten-strict", "org_mixed").await,
        503,
        "QUOTA_STORE_UNAVAILABLE",
    )
    .await;
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn the_gateway_recovers_by_itself_when_redis_comes_back() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let gateway = start(&redis, &upstream, "allow").await;
    assert_eq!(post(&gateway, "/ten", "org_back").await.status(), 200);
    assert_eq!(gateway.used("org_back", Dimension::Tokens).await, 10);

    redis.stop();
    assert_eq!(post(&gateway, "/ten", "org_back").await.status(), 200);
    assert!(
        crate::support::count(
            &gateway.app,
            "tollgate_requests_total",
            &[("outcome", "fail_open")]
        ) >= 1
    );
    redis.restart().await;

    // The restarted Redis is empty: counting has resumed once a request shows in it.
    eventually("requests are counted again", async || {
        assert_eq!(post(&gateway, "/ten", "org_back").await.status(), 200);
        gateway
            .app
            .usage(&tollgate::org::OrgId::parse("org_back").unwrap())
            .await
            .is_ok_and(|u| u.get(Dimension::Tokens) > 0)
    })
    .await;
}

#[tokio::test]
async fn a_script_flush_is_survived_without_a_store_error() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let gateway = start(&redis, &upstream, "deny").await;
    assert_eq!(post(&gateway, "/ten", "org_flush").await.status(), 200);

    let flushed: String = redis.command(&["SCRIPT", "FLUSH"]);
    assert_eq!(flushed, "OK");

    assert_eq!(post(&gateway, "/ten", "org_flush").await.status(), 200);
    assert_eq!(gateway.used("org_flush", Dimension::Tokens).await, 20);
    assert_eq!(
        crate::support::count(&gateway.app, "tollgate_store_errors_total", &[]),
        0
    );
}

#[tokio::test]
async fn a_refund_on_the_redis_store_gives_the_tokens_back() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let gateway = start(&redis, &upstream, "deny").await;

    let response = client()
        .post(gateway.url("/ten"))
        .header("x-org-id", "org_refund")
        .header("x-test-status", "503")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 503);
    gateway.settles_at("org_refund", Dimension::Tokens, 0).await;
    // One marker, in the hash of the ten seconds the settlement was made
    // in, kept twenty minutes after its last write: settle_retry_for (ten
    // minutes by default) and a margin of ten more.
    let hashes: Vec<String> = redis.command(&["KEYS", "tollgate:{org_refund}:settled:*"]);
    assert_eq!(hashes.len(), 1, "{hashes:?}");
    let markers: i64 = redis.command(&["HLEN", &hashes[0]]);
    assert_eq!(markers, 1, "one settlement marker per settled reservation");
    let ttl: i64 = redis.command(&["TTL", &hashes[0]]);
    assert!(
        (1190..=1200).contains(&ttl),
        "the markers expire in {ttl} s"
    );
}

#[tokio::test]
async fn a_reservation_the_store_confirms_after_its_timeout_is_refunded() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let gateway = start(&redis, &upstream, "allow").await;
    assert_eq!(post(&gateway, "/ten", "org_late").await.status(), 200);

    // Redis holds every other client's commands for 600ms, then runs them.
    let paused: String = redis.command(&["CLIENT", "PAUSE", "600", "ALL"]);
    assert_eq!(paused, "OK");
    assert_eq!(
        post(&gateway, "/ten", "org_late").await.status(),
        200,
        "fails open after 100ms"
    );
    assert_eq!(
        crate::support::count(
            &gateway.app,
            "tollgate_requests_total",
            &[("outcome", "fail_open")]
        ),
        1
    );

    // The late reservation was applied when Redis resumed, then given back.
    eventually("the late reservation is refunded", async || {
        crate::support::count(&gateway.app, "tollgate_refunds_total", &[]) == 1
    })
    .await;
    eventually("the counter holds only the first request", async || {
        redis.command::<i64>(&["GET", &counter_key("org_late", "tokens")]) == 10
    })
    .await;
}

#[tokio::test]
async fn a_refund_due_at_shutdown_reaches_redis_before_the_gateway_exits() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let mut gateway = start(&redis, &upstream, "deny").await;
    let failing = held_failing_request(&gateway, &upstream, "/ten", "org_pair", 503).await;
    assert_eq!(gateway.used("org_pair", Dimension::Tokens).await, 10);

    let stopped = tokio::spawn(gateway.shut_down());
    eventually("the listener is closed", async || {
        tokio::net::TcpStream::connect(gateway.addr).await.is_err()
    })
    .await;
    upstream.release();
    assert_eq!(failing.await.unwrap().unwrap().status(), 503);
    within(Duration::from_secs(10), stopped).await.unwrap();

    // Read at once: the gateway is gone, so the refund came before it went.
    assert_eq!(gateway.used("org_pair", Dimension::Tokens).await, 0);
}

#[tokio::test]
async fn a_refund_against_a_damaged_counter_is_given_up_at_once_and_leaves_the_counter_as_found() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let mut gateway = start(&redis, &upstream, "allow").await;
    let failing = held_failing_request(&gateway, &upstream, "/ten", "org_pair", 503).await;
    // Lua's `tonumber` reads this as a number; written back, it would no
    // longer stop any limit.
    let _: () = redis.command(&["SET", &counter_key("org_pair", "tokens"), "nan"]);
    upstream.release();
    assert_eq!(failing.await.unwrap().unwrap().status(), 503);

    // Shutdown waits for the settlement, retries included.
    within(Duration::from_secs(10), gateway.shut_down()).await;

    let store_errors = crate::support::count(&gateway.app, "tollgate_store_errors_total", &[]);
    assert_eq!(store_errors, 1, "tried once, not retried");
    assert_eq!(
        redis.command::<String>(&["GET", &counter_key("org_pair", "tokens")]),
        "nan"
    );
}

/// A gateway on the Redis at `url`, failing closed, with a 1s store
/// timeout: what it answers is Redis' doing, never a slow test machine's.
async fn start_on(url: &str, upstream: &Upstream) -> Gateway {
    let config = redis_config("1s", "deny");
    Gateway::launch(&config, upstream, &[("REDIS_URL", url.into())], run_clock()).await
}

fn store_errors(gateway: &Gateway) -> u64 {
    crate::support::count(&gateway.app, "tollgate_store_errors_total", &[])
}

#[tokio::test]
async fn a_url_naming_a_user_a_password_and_a_database_is_logged_in_and_counts_there() {
    let redis = RedisServer::start_with_login("tollgate", "s3cret").await;
    let upstream = Upstream::start().await;
    let in_db_3 = format!("{}/3", redis.url());
    let gateway = start_on(&in_db_3, &upstream).await;

    assert_eq!(post(&gateway, "/ten", "org_login").await.status(), 200);
    assert_eq!(post(&gateway, "/ten", "org_login").await.status(), 200);

    let key = counter_key("org_login", "tokens");
    let mut db_3 = redis::Client::open(in_db_3)
        .unwrap()
        .get_connection()
        .unwrap();
    let counted: Option<i64> = redis::cmd("GET").arg(&key).query(&mut db_3).unwrap();
    assert_eq!(counted, Some(20));
    let in_db_0: Option<i64> = redis.command(&["GET", &key]);
    assert_eq!(in_db_0, None);
    gateway.settles_at("org_login", Dimension::Tokens, 20).await;
    assert_eq!(store_errors(&gateway), 0);
}

#[tokio::test]
async fn a_url_with_only_a_password_logs_in_as_the_default_user() {
    let redis = RedisServer::start_with_login("tollgate", "s3cret").await;
    let upstream = Upstream::start().await;
    let url = format!("redis://:s3cret@127.0.0.1:{}", redis.port);
    let gateway = start_on(&url, &upstream).await;

    assert_eq!(post(&gateway, "/ten", "org_default").await.status(), 200);
    let counted: Option<i64> = redis.command(&["GET", &counter_key("org_default", "tokens")]);
    assert_eq!(counted, Some(10));
}

#[tokio::test]
async fn a_wrong_password_fails_each_call_as_a_store_error_and_counts_nothing() {
    let redis = RedisServer::start_with_login("tollgate", "s3cret").await;
    let upstream = Upstream::start().await;
    let url = format!("redis://tollgate:wrong@127.0.0.1:{}", redis.port);
    let gateway = start_on(&url, &upstream).await;

    let response = post(&gateway, "/ten", "org_wrong").await;
    assert_eq!(response.status(), 503);
    assert_eq!(upstream.hits(), 0);
    assert!(store_errors(&gateway) >= 1);
    let counted: Option<i64> = redis.command(&["GET", &counter_key("org_wrong", "tokens")]);
    assert_eq!(counted, None);
}

#[tokio::test]
async fn a_redis_restarted_while_the_gateway_is_idle_fails_no_request() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let gateway = start_on(&redis.url(), &upstream).await;
    assert_eq!(post(&gateway, "/ten", "org_idle").await.status(), 200);

    // Empty, and without the scripts: the closed connection is replaced
    // and each script loaded again before the next call needs them.
    redis.restart().await;

    assert_eq!(post(&gateway, "/ten", "org_idle").await.status(), 200);
    let counted: Option<i64> = redis.command(&["GET", &counter_key("org_idle", "tokens")]);
    assert_eq!(counted, Some(10));
    let response = client()
        .post(gateway.url("/ten"))
        .header("x-org-id", "org_idle")
        .header("x-test-status", "503")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    // Read from Redis itself: the usage read goes by the crate's own
    // connection, which learns of the restart only by failing a call.
    eventually("the refund of the failed request is applied", async || {
        redis.command::<Option<i64>>(&["GET", &counter_key("org_idle", "tokens")]) == Some(10)
    })
    .await;
    assert_eq!(store_errors(&gateway), 0);
}

#[tokio::test]
async fn a_script_flushed_between_calls_is_loaded_again_and_the_count_stays_exact() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let gateway = start_on(&redis.url(), &upstream).await;
    for expected in [10, 20, 30] {
        let flushed: String = redis.command(&["SCRIPT", "FLUSH"]);
        assert_eq!(flushed, "OK");
        assert_eq!(post(&gateway, "/ten", "org_flushed").await.status(), 200);
        let counted: Option<i64> = redis.command(&["GET", &counter_key("org_flushed", "tokens")]);
        assert_eq!(counted, Some(expected), "each call ran once");
    }
    assert_eq!(store_errors(&gateway), 0);
}

#[tokio::test]
async fn a_unix_socket_url_reaches_redis_as_well() {
    let (redis, url) = RedisServer::start_on_unix_socket().await;
    let upstream = Upstream::start().await;
    let gateway = start_on(&url, &upstream).await;

    assert_eq!(post(&gateway, "/ten", "org_unix").await.status(), 200);
    let counted: Option<i64> = redis.command(&["GET", &counter_key("org_unix", "tokens")]);
    assert_eq!(counted, Some(10));
    assert_eq!(store_errors(&gateway), 0);
}
