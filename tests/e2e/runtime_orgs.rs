//! Runtime orgs and keys, set through an instance's catalog (what the admin
//! API calls): enforced at once by that instance, within a second by every
//! other sharing its Redis, and kept across a restart.

use tollgate::org::{OrgId, OrgRecord};
use tollgate::quota::Dimension;

use crate::support::redis::{RedisServer, counter_key};
use crate::support::{Gateway, Upstream, client, config, config_with, run_clock, within_a_second};

const RUNS: Dimension = Dimension::PlaybookRuns;
const EXECUTE: &str = "/api/v1/playbooks/p1/execute";

fn redis_config() -> String {
    config_with(|c| {
        c.replace(
            "backend = \"memory\"",
            "backend = \"redis\"\nurl = \"${REDIS_URL}\"\ntimeout = \"500ms\"\non_error = \"deny\"",
        )
    })
}

async fn on_redis(redis: &RedisServer, upstream: &Upstream) -> Gateway {
    let vars = [("REDIS_URL", redis.url())];
    Gateway::launch(&redis_config(), upstream, &vars, run_clock()).await
}

fn org(id: &str) -> OrgId {
    OrgId::parse(id).unwrap()
}

fn record(json: &str) -> OrgRecord {
    OrgRecord::from_json(json.as_bytes()).unwrap()
}

/// Runs one playbook for `org`, named by the org header; the status.
async fn execute_as(gateway: &Gateway, org: &str) -> u16 {
    let response = client()
        .post(gateway.url(EXECUTE))
        .header("x-org-id", org)
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

/// Runs one playbook with gateway API key `key`; the status.
async fn execute_with_key(gateway: &Gateway, key: &str) -> u16 {
    let response = client()
        .post(gateway.url(EXECUTE))
        .header("authorization", format!("Bearer {key}"))
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

/// Sets org_rt to two runs a period, then runs three: the third is refused.
async fn a_runtime_limit_is_enforced(gateway: &Gateway) {
    let catalog = gateway.app.catalog();
    let limited = catalog
        .parse_org(br#"{"limits":{"playbook_runs":2}}"#)
        .unwrap();
    catalog.put_org(&org("org_rt"), limited).await.unwrap();
    assert_eq!(execute_as(gateway, "org_rt").await, 200);
    assert_eq!(execute_as(gateway, "org_rt").await, 200);
    assert_eq!(execute_as(gateway, "org_rt").await, 402);
    assert_eq!(gateway.used("org_rt", RUNS).await, 2);
}

#[tokio::test]
async fn a_runtime_org_sets_the_limit_of_a_metered_request_on_the_memory_store() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;
    a_runtime_limit_is_enforced(&gateway).await;
    assert_eq!(upstream.hits(), 2);

    // Removed, the org is back on [defaults]: free, ten runs.
    assert!(
        gateway
            .app
            .catalog()
            .delete_org(&org("org_rt"))
            .await
            .unwrap()
    );
    assert_eq!(execute_as(&gateway, "org_rt").await, 200);
    assert_eq!(gateway.used("org_rt", RUNS).await, 3);
}

#[tokio::test]
async fn a_runtime_org_sets_the_limit_of_a_metered_request_on_redis() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let gateway = on_redis(&redis, &upstream).await;
    a_runtime_limit_is_enforced(&gateway).await;
    let stored: i64 = redis.command(&["GET", &counter_key("org_rt", "playbook_runs")]);
    assert_eq!(stored, 2);
}

#[tokio::test]
async fn an_org_changed_through_one_instance_is_enforced_by_another_within_a_second() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let a = on_redis(&redis, &upstream).await;
    let b = on_redis(&redis, &upstream).await;
    assert_eq!(execute_as(&b, "org_pair").await, 200);

    let closed = record(r#"{"limits":{"playbook_runs":1}}"#);
    a.app
        .catalog()
        .put_org(&org("org_pair"), closed)
        .await
        .unwrap();
    // Polled in B's cache: a request admitted meanwhile would count.
    within_a_second("B takes org_pair's new limit", async || {
        b.app.catalog().policy(&org("org_pair")).limits.get(RUNS) == Some(1)
    })
    .await;
    assert_eq!(execute_as(&b, "org_pair").await, 402);
    assert_eq!(execute_as(&a, "org_pair").await, 402);
    let stored: i64 = redis.command(&["GET", &counter_key("org_pair", "playbook_runs")]);
    assert_eq!(stored, 1);
    assert_eq!(
        b.app.catalog().effective(&org("org_pair")).source.as_str(),
        "runtime"
    );
}

#[tokio::test]
async fn a_key_made_on_one_instance_is_accepted_by_another_and_refused_by_both_once_revoked() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let a = on_redis(&redis, &upstream).await;
    let b = on_redis(&redis, &upstream).await;
    let made = a
        .app
        .catalog()
        .create_key(&org("org_keyed"), "ci")
        .await
        .unwrap();
    assert_eq!(execute_with_key(&a, &made.key).await, 200);
    within_a_second("B accepts the new key", async || {
        execute_with_key(&b, &made.key).await == 200
    })
    .await;
    let seen = upstream.seen();
    let last = seen.last().unwrap();
    assert!(last.headers.get("authorization").is_none());
    assert_eq!(last.headers["x-org-id"], "org_keyed");
    let stored: i64 = redis.command(&["GET", &counter_key("org_keyed", "playbook_runs")]);
    assert_eq!(stored, 2);

    assert!(a.app.catalog().revoke_key(&made.id).await.unwrap());
    assert_eq!(execute_with_key(&a, &made.key).await, 401);
    within_a_second("B refuses the revoked key", async || {
        execute_with_key(&b, &made.key).await == 401
    })
    .await;
    assert!(b.app.catalog().keys(&org("org_keyed")).is_empty());
}

#[tokio::test]
async fn runtime_orgs_and_keys_outlive_a_restart_of_the_gateway() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let mut first = on_redis(&redis, &upstream).await;
    let catalog = first.app.catalog();
    let closed = record(r#"{"plan":"pro","limits":{"playbook_runs":0}}"#);
    catalog.put_org(&org("org_kept"), closed).await.unwrap();
    let made = catalog.create_key(&org("org_other"), "ci").await.unwrap();
    first.shut_down().await;

    let second = on_redis(&redis, &upstream).await;
    within_a_second("the restarted gateway knows the runtime org", async || {
        execute_as(&second, "org_kept").await == 402
    })
    .await;
    assert_eq!(execute_with_key(&second, &made.key).await, 200);
    let effective = second.app.catalog().effective(&org("org_kept"));
    assert_eq!(&*effective.policy.plan, "pro");
}

#[tokio::test]
async fn a_change_whose_notice_is_lost_is_found_by_the_version_check() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let gateway = on_redis(&redis, &upstream).await;
    assert_eq!(execute_as(&gateway, "org_quiet").await, 200);

    // Written as the write script does, but with no PUBLISH.
    let _: i64 = redis.command(&[
        "HSET",
        "tollgate:{:catalog}:orgs",
        "org_quiet",
        r#"{"limits":{"playbook_runs":1}}"#,
    ]);
    let _: i64 = redis.command(&["INCR", "tollgate:{:catalog}:version"]);
    // Polled in the cache, not by requests: each admitted one would count
    // toward the plan's limit of ten, reached before a check is due.
    let catalog = gateway.app.catalog();
    within_a_second("the unpublished change is taken", async || {
        catalog.policy(&org("org_quiet")).limits.get(RUNS) == Some(1)
    })
    .await;
    assert_eq!(execute_as(&gateway, "org_quiet").await, 402);
    assert_eq!(gateway.used("org_quiet", RUNS).await, 1);
}
