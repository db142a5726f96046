//! Runtime orgs and API keys through the admin API: the exact JSON, on the
//! memory store and on a real redis-server, and two instances sharing one
//! Redis that enforce each other's changes within a second.

use reqwest::Method;
use serde_json::{Value, json};
use tollgate::quota::Dimension;

use crate::admin::{Backing, admin, admin_section};
use crate::support::redis::RedisServer;
use crate::support::{Gateway, Upstream, client, config_with, envelope, within_a_second};

const RUNS: Dimension = Dimension::PlaybookRuns;

async fn send(gateway: &Gateway, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = admin(method, gateway, path);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// One playbook run for the org named by the trusted org header.
async fn run_as(gateway: &Gateway, org: &str) -> u16 {
    let response = client()
        .post(gateway.url("/api/v1/playbooks/p/execute"))
        .header("x-org-id", org)
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

/// One playbook run with gateway API key `key`.
async fn run_with_key(gateway: &Gateway, key: &str) -> u16 {
    let response = client()
        .post(gateway.url("/api/v1/playbooks/p/execute"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

fn free_defaults(org: &str) -> Value {
    json!({"org": org, "plan": "free", "billingStatus": "active", "periodAnchorDay": 1,
           "enforcement": "enforce", "limits": {"tokens": 100000, "playbook_runs": 10, "seats": 3},
           "source": "defaults"})
}

#[tokio::test]
async fn a_runtime_org_is_shown_enforced_and_removed_through_the_api_on_both_stores() {
    let upstream = Upstream::start().await;
    for backing in Backing::both().await {
        let name = backing.name();
        let gateway = backing.gateway(&upstream).await;
        let path = "/v1/orgs/org_new";
        assert_eq!(
            send(&gateway, Method::GET, path, None).await,
            (200, free_defaults("org_new")),
            "{name}"
        );

        let change = json!({"plan": "pro", "billingStatus": "trialing", "periodAnchorDay": 1,
                            "limits": {"playbook_runs": 2, "seats": null}});
        let runtime = json!({"org": "org_new", "plan": "pro", "billingStatus": "trialing",
            "periodAnchorDay": 1, "enforcement": "enforce",
            "limits": {"tokens": 5000000, "playbook_runs": 2, "seats": null}, "source": "runtime"});
        assert_eq!(
            send(&gateway, Method::PUT, path, Some(change)).await,
            (200, runtime.clone()),
            "{name}"
        );
        assert_eq!(
            send(&gateway, Method::GET, path, None).await,
            (200, runtime.clone()),
            "{name}"
        );

        let (status, list) = send(&gateway, Method::GET, "/v1/orgs", None).await;
        assert_eq!(status, 200);
        let listed: Vec<(String, String)> = list["orgs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["org"].as_str().unwrap().into(),
                    o["source"].as_str().unwrap().into(),
                )
            })
            .collect();
        let expected = [
            ("org_custom", "config"),
            ("org_new", "runtime"),
            ("org_off", "config"),
            ("org_shadow", "config"),
        ];
        assert_eq!(
            listed,
            expected.map(|(o, s)| (o.to_string(), s.to_string())),
            "{name}"
        );
        assert!(list["orgs"].as_array().unwrap().contains(&runtime));

        assert_eq!(run_as(&gateway, "org_new").await, 200, "{name}");
        assert_eq!(run_as(&gateway, "org_new").await, 200, "{name}");
        assert_eq!(run_as(&gateway, "org_new").await, 402, "{name}");
        assert_eq!(gateway.used("org_new", RUNS).await, 2, "{name}");

        assert_eq!(
            send(&gateway, Method::DELETE, path, None).await,
            (200, free_defaults("org_new")),
            "{name}"
        );
        assert_eq!(run_as(&gateway, "org_new").await, 200, "{name}");
        assert_eq!(gateway.used("org_new", RUNS).await, 3, "{name}");
        let (status, gone) = send(&gateway, Method::DELETE, path, None).await;
        assert_eq!(
            (status, gone["error"]["code"].as_str()),
            (404, Some("NOT_FOUND")),
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_key_made_through_the_api_pays_for_its_org_until_it_is_revoked_on_both_stores() {
    let upstream = Upstream::start().await;
    for backing in Backing::both().await {
        let name = backing.name();
        let gateway = backing.gateway(&upstream).await;
        let (status, made) = send(
            &gateway,
            Method::POST,
            "/v1/keys",
            Some(json!({"org": "org_keyed", "name": "ci"})),
        )
        .await;
        assert_eq!(status, 201, "{name}");
        let (id, key) = (made["id"].as_str().unwrap(), made["key"].as_str().unwrap());
        assert_eq!(
            made,
            json!({"id": id, "key": key, "org": "org_keyed", "name": "ci"})
        );
        assert!(key.starts_with("tg_") && key.len() == 67, "{key}");

        assert_eq!(run_with_key(&gateway, key).await, 200, "{name}");
        assert_eq!(gateway.used("org_keyed", RUNS).await, 1, "{name}");
        // The key never reaches the backend.
        let seen = upstream.seen();
        let last = seen.last().unwrap();
        assert!(!last.headers.contains_key("authorization"), "{name}");

        let (status, listed) = send(&gateway, Method::GET, "/v1/keys?org=org_keyed", None).await;
        assert_eq!(status, 200);
        let created_at = listed["keys"][0]["createdAt"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(created_at).is_ok(),
            "{created_at}"
        );
        assert_eq!(
            listed,
            json!({"keys": [{"id": id, "org": "org_keyed", "name": "ci", "createdAt": created_at}]})
        );
        assert!(!listed.to_string().contains(key));
        assert_eq!(
            send(&gateway, Method::GET, "/v1/keys?org=org_other", None).await,
            (200, json!({"keys": []}))
        );

        let revoke = format!("/v1/keys/{id}");
        assert_eq!(
            send(&gateway, Method::DELETE, &revoke, None).await,
            (200, json!({"id": id, "revoked": true}))
        );
        let refused = client()
            .post(gateway.url("/api/v1/playbooks/p/execute"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        envelope(refused, 401, "UNAUTHORIZED").await;
        assert_eq!(gateway.used("org_keyed", RUNS).await, 1, "{name}");
        let (status, _) = send(&gateway, Method::DELETE, &revoke, None).await;
        assert_eq!(status, 404, "{name}");
    }
}

#[tokio::test]
async fn bad_org_and_key_requests_are_400s_that_change_nothing() {
    let upstream = Upstream::start().await;
    let gateway = Backing::Memory.gateway(&upstream).await;
    let cases = [
        (Method::PUT, "/v1/orgs/org_x", json!({"plan": "gold"})),
        (
            Method::PUT,
            "/v1/orgs/org_x",
            json!({"periodAnchorDay": 32}),
        ),
        (
            Method::PUT,
            "/v1/orgs/org_x",
            json!({"limits": {"credits": 5}}),
        ),
        (
            Method::PUT,
            "/v1/orgs/org_x",
            json!({"limits": {"tokens": -1}}),
        ),
        (
            Method::PUT,
            "/v1/orgs/org_x",
            json!({"enforcement": "loud"}),
        ),
        (Method::PUT, "/v1/orgs/org_x", json!([null])),
        (Method::PUT, "/v1/orgs/org_x", json!({"colour": "red"})),
        (Method::POST, "/v1/keys", json!({"org": "org_x"})),
        (
            Method::POST,
            "/v1/keys",
            json!({"org": "org_x", "name": ""}),
        ),
        (
            Method::POST,
            "/v1/keys",
            json!({"org": "org:x", "name": "n"}),
        ),
    ];
    for (method, path, body) in cases {
        let (status, answer) = send(&gateway, method, path, Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["success"], false, "{answer}");
    }
    let (status, _) = send(&gateway, Method::GET, "/v1/keys", None).await;
    assert_eq!(status, 400);
    assert_eq!(
        send(&gateway, Method::GET, "/v1/orgs/org_x", None).await,
        (200, free_defaults("org_x"))
    );
    assert_eq!(
        send(&gateway, Method::GET, "/v1/keys?org=org_x", None).await,
        (200, json!({"keys": []}))
    );
}

#[tokio::test]
async fn two_instances_on_one_redis_enforce_each_others_orgs_and_keys_within_a_second() {
    let upstream = Upstream::start().await;
    let backing = Backing::Redis(RedisServer::start().await);
    let config = || config_with(|c| c + &admin_section());
    let a = backing.gateway_on(config(), &upstream).await;
    let b = backing.gateway_on(config(), &upstream).await;

    let limited = json!({"limits": {"playbook_runs": 1}});
    assert_eq!(
        send(&a, Method::PUT, "/v1/orgs/org_pair", Some(limited))
            .await
            .0,
        200
    );
    within_a_second("B shows A's runtime org", async || {
        send(&b, Method::GET, "/v1/orgs/org_pair", None).await.1["source"] == "runtime"
    })
    .await;
    assert_eq!(run_as(&b, "org_pair").await, 200);
    assert_eq!(run_as(&a, "org_pair").await, 402);
    assert_eq!(run_as(&b, "org_pair").await, 402);
    assert_eq!(b.used("org_pair", RUNS).await, 1);

    let (status, made) = send(
        &a,
        Method::POST,
        "/v1/keys",
        Some(json!({"org": "org_keyed", "name": "shared"})),
    )
    .await;
    assert_eq!(status, 201);
    let (id, key) = (made["id"].as_str().unwrap(), made["key"].as_str().unwrap());
    within_a_second("B accepts A's key", async || {
        run_with_key(&b, key).await == 200
    })
    .await;
    assert_eq!(b.used("org_keyed", RUNS).await, 1);

    assert_eq!(
        send(&b, Method::DELETE, &format!("/v1/keys/{id}"), None)
            .await
            .0,
        200
    );
    assert_eq!(run_with_key(&b, key).await, 401);
    // Until A learns of it, A may still accept the key: each run it
    // accepts is charged, and none after.
    let mut accepted_meanwhile = 0;
    within_a_second("A refuses the key B revoked", async || {
        let status = run_with_key(&a, key).await;
        accepted_meanwhile += i64::from(status == 200);
        status == 401
    })
    .await;
    assert_eq!(a.used("org_keyed", RUNS).await, 1 + accepted_meanwhile);
}
