//! The admin listener: health, readiness, the usage API and the dry run,
//! each on the memory store and on a real redis-server, with the exact
//! JSON of DESIGN.md's "Operations".

use serde_json::{Value, json};
use tollgate::org::OrgId;
use tollgate::period::{Period, rfc3339};
use tollgate::quota::Dimension;

use crate::support::redis::RedisServer;
use crate::support::{
    Gateway, KEY_ACME, Upstream, client, config_with, envelope, eventually, fixed_clock, run_clock,
    run_started, sample,
};

/// The admin token of the tests' `[admin]`.
pub const ADMIN_TOKEN: &str = "ops-token-for-tests";

/// `[admin]` on a free port, with [`ADMIN_TOKEN`].
pub fn admin_section() -> String {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(ADMIN_TOKEN.as_bytes()));
    format!(
        "\n[admin]\nlisten = \"127.0.0.1:0\"\ntokens = [{{ sha256 = \"{digest}\", name = \"ops\" }}]\n"
    )
}

/// A store for a test to run on: the memory store, or a redis-server of
/// its own.
pub enum Backing {
    Memory,
    Redis(RedisServer),
}

impl Backing {
    pub async fn both() -> [Backing; 2] {
        [Backing::Memory, Backing::Redis(RedisServer::start().await)]
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backing::Memory => "memory",
            Backing::Redis(_) => "redis",
        }
    }

    /// `config` on this store.
    pub fn config(&self, config: String) -> String {
        match self {
            Backing::Memory => config,
            Backing::Redis(redis) => config.replace(
                "backend = \"memory\"",
                &format!(
                    "backend = \"redis\"\nurl = \"{}\"\ntimeout = \"500ms\"",
                    redis.url()
                ),
            ),
        }
    }

    /// The period the gateway's clock is in for an org anchored on the 1st.
    pub fn period(&self) -> Period {
        match self {
            Backing::Memory => Period::containing((fixed_clock())(), 1),
            Backing::Redis(_) => Period::containing(run_started(), 1),
        }
    }

    /// The shared test config with `[admin]`, served on this store.
    pub async fn gateway(&self, upstream: &Upstream) -> Gateway {
        self.gateway_on(config_with(|c| c + &admin_section()), upstream)
            .await
    }

    pub async fn gateway_on(&self, config: String, upstream: &Upstream) -> Gateway {
        let clock = match self {
            Backing::Memory => fixed_clock(),
            Backing::Redis(_) => run_clock(),
        };
        Gateway::launch(&self.config(config), upstream, &[], clock).await
    }
}

/// An admin request with the token.
pub fn admin(method: reqwest::Method, gateway: &Gateway, path: &str) -> reqwest::RequestBuilder {
    client()
        .request(method, gateway.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
}

async fn body(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.unwrap()
}

async fn get(gateway: &Gateway, path: &str) -> Value {
    body(
        admin(reqwest::Method::GET, gateway, path)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await
}

/// Runs `org`'s playbook `times` times through the proxy.
async fn run_playbooks(gateway: &Gateway, times: usize) {
    for _ in 0..times {
        let response = client()
            .post(gateway.url("/api/v1/playbooks/p/execute"))
            .bearer_auth(KEY_ACME)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}

fn acme() -> OrgId {
    OrgId::parse("org_acme").unwrap()
}

/// The summary of org_acme on the free plan after `runs` playbook runs,
/// `tokens` tokens and `seats` seats.
fn acme_summary(period: Period, tokens: i64, runs: i64, seats: i64) -> Value {
    json!({
        "org": "org_acme", "plan": "free", "billingStatus": "active", "enforcement": "enforce",
        "periodStart": rfc3339(period.start), "periodEnd": rfc3339(period.end),
        "usage": {
            "tokens": { "used": tokens, "limit": 100000, "remaining": 100000 - tokens },
            "playbook_runs": { "used": runs, "limit": 10, "remaining": (10 - runs).max(0) },
            "seats": { "used": seats, "limit": 3, "remaining": (3 - seats).max(0) }
        }
    })
}

#[tokio::test]
async fn health_and_readiness_answer_without_a_token_on_both_stores() {
    let upstream = Upstream::start().await;
    for backing in Backing::both().await {
        let gateway = backing.gateway(&upstream).await;
        let health = client()
            .get(gateway.admin_url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            body(health, 200).await,
            json!({"status": "ok"}),
            "{}",
            backing.name()
        );
        let ready = client()
            .get(gateway.admin_url("/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            body(ready, 200).await,
            json!({"status": "ready", "store": "ok"}),
            "{}",
            backing.name()
        );
    }
}

#[tokio::test]
async fn readiness_turns_503_while_redis_is_stopped_and_200_when_it_returns() {
    let upstream = Upstream::start().await;
    let backing = Backing::Redis(RedisServer::start().await);
    let gateway = backing.gateway(&upstream).await;
    let ready = async |status: u16| {
        let response = client()
            .get(gateway.admin_url("/readyz"))
            .send()
            .await
            .unwrap();
        response.status() == status
    };
    assert!(ready(200).await);
    let Backing::Redis(mut redis) = backing else {
        unreachable!()
    };
    redis.stop();
    let answer = client()
        .get(gateway.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        body(answer, 503).await,
        json!({"status": "not_ready", "store": "unreachable"})
    );
    redis.restart().await;
    eventually("/readyz is 200 again", async || ready(200).await).await;
}

#[tokio::test]
async fn every_v1_endpoint_refuses_a_request_without_the_right_token() {
    let upstream = Upstream::start().await;
    let gateway = Backing::Memory.gateway(&upstream).await;
    let endpoints = [
        (reqwest::Method::GET, "/v1/orgs"),
        (reqwest::Method::GET, "/v1/orgs/org_acme"),
        (reqwest::Method::PUT, "/v1/orgs/org_acme"),
        (reqwest::Method::DELETE, "/v1/orgs/org_acme"),
        (reqwest::Method::GET, "/v1/orgs/org_acme/usage"),
        (reqwest::Method::PUT, "/v1/orgs/org_acme/usage/tokens"),
        (reqwest::Method::DELETE, "/v1/orgs/org_acme/usage"),
        (reqwest::Method::POST, "/v1/keys"),
        (reqwest::Method::GET, "/v1/keys"),
        (reqwest::Method::DELETE, "/v1/keys/abc"),
        (reqwest::Method::POST, "/v1/check"),
        (reqwest::Method::POST, "/v1/reload"),
        (reqwest::Method::GET, "/v1/openapi.json"),
    ];
    for (method, path) in endpoints {
        for token in [None, Some("wrong-token"), Some("")] {
            let mut request = client().request(method.clone(), gateway.admin_url(path));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.body("{}").send().await.unwrap();
            envelope(response, 401, "UNAUTHORIZED").await;
        }
    }
    assert_eq!(gateway.usage("org_acme").await.get(Dimension::Tokens), 0);
}

#[tokio::test]
async fn the_usage_summary_is_read_from_the_store_on_both_stores() {
    let upstream = Upstream::start().await;
    for backing in Backing::both().await {
        let gateway = backing.gateway(&upstream).await;
        assert_eq!(
            get(&gateway, "/v1/orgs/org_acme/usage").await,
            acme_summary(backing.period(), 0, 0, 0),
            "{}",
            backing.name()
        );
        run_playbooks(&gateway, 3).await;
        assert_eq!(gateway.used("org_acme", Dimension::PlaybookRuns).await, 3);
        assert_eq!(
            get(&gateway, "/v1/orgs/org_acme/usage").await,
            acme_summary(backing.period(), 0, 3, 0),
            "{}",
            backing.name()
        );
    }
}

#[tokio::test]
async fn an_operator_sets_a_counter_and_resets_the_period_but_not_the_seats() {
    let upstream = Upstream::start().await;
    for backing in Backing::both().await {
        let gateway = backing.gateway(&upstream).await;
        let put = async |dimension: &str, used: i64| {
            let path = format!("/v1/orgs/org_acme/usage/{dimension}");
            let response = admin(reqwest::Method::PUT, &gateway, &path)
                .json(&json!({"used": used}))
                .send()
                .await
                .unwrap();
            body(response, 200).await
        };
        let period = backing.period();
        assert_eq!(
            put("tokens", 95000).await,
            acme_summary(period, 95000, 0, 0)
        );
        assert_eq!(put("seats", 2).await, acme_summary(period, 95000, 0, 2));
        // Past the limit reads as nothing remaining, never a negative.
        assert_eq!(
            put("playbook_runs", 12).await,
            acme_summary(period, 95000, 12, 2)
        );
        let usage = gateway.usage("org_acme").await;
        assert_eq!(
            (
                usage.get(Dimension::Tokens),
                usage.get(Dimension::PlaybookRuns),
                usage.get(Dimension::Seats)
            ),
            (95000, 12, 2)
        );

        let reset = admin(reqwest::Method::DELETE, &gateway, "/v1/orgs/org_acme/usage")
            .send()
            .await
            .unwrap();
        assert_eq!(body(reset, 200).await, acme_summary(period, 0, 0, 2));
        assert_eq!(gateway.used("org_acme", Dimension::Tokens).await, 0);
        assert_eq!(gateway.used("org_acme", Dimension::Seats).await, 2);
        run_playbooks(&gateway, 1).await;
        assert_eq!(gateway.used("org_acme", Dimension::PlaybookRuns).await, 1);
    }
}

#[tokio::test]
async fn the_dry_run_answers_as_a_reservation_would_and_reserves_nothing() {
    let upstream = Upstream::start().await;
    for backing in Backing::both().await {
        let gateway = backing.gateway(&upstream).await;
        let check = async |cost: Value| {
            let response = admin(reqwest::Method::POST, &gateway, "/v1/check")
                .json(&json!({"org": "org_acme", "cost": cost}))
                .send()
                .await
                .unwrap();
            body(response, 200).await
        };
        gateway
            .app
            .set_usage(&acme(), Dimension::Tokens, 95000)
            .await
            .unwrap();
        let allowed = check(json!({"tokens": 5000})).await;
        assert_eq!(
            allowed,
            json!({"allowed": true, "usage": acme_summary(backing.period(), 95000, 0, 0)["usage"]}),
            "{}",
            backing.name()
        );
        let period = backing.period();
        let refused = check(json!({"tokens": 10000, "playbook_runs": 1})).await;
        assert_eq!(
            refused,
            json!({"allowed": false, "error": {
                "code": "QUOTA_EXCEEDED",
                "message": "Token quota exceeded: 95000 of 100000 used this period, 10000 requested",
                "details": {
                    "type": "quota_exceeded", "quotaType": "tokens", "currentUsage": 95000,
                    "limit": 100000, "requested": 10000, "billingStatus": "active",
                    "planSlug": "free", "periodStart": rfc3339(period.start),
                    "periodEnd": rfc3339(period.end)
                }
            }}),
            "{}",
            backing.name()
        );
        // The same request through the proxy is refused with the same error.
        let response = client()
            .post(gateway.url("/api/v1/content/briefs/generate"))
            .bearer_auth(KEY_ACME)
            .send()
            .await
            .unwrap();
        let proxied = envelope(response, 402, "QUOTA_EXCEEDED").await;
        assert_eq!(proxied["error"], refused["error"]);
        let usage = gateway.usage("org_acme").await;
        assert_eq!(usage.get(Dimension::Tokens), 95000, "{}", backing.name());
        assert_eq!(usage.get(Dimension::PlaybookRuns), 0, "{}", backing.name());
    }
}

#[tokio::test]
async fn bad_admin_requests_are_answered_in_the_envelope() {
    let upstream = Upstream::start().await;
    let gateway = Backing::Memory.gateway(&upstream).await;
    use reqwest::Method;
    let cases: [(Method, &str, &str, u16, &str); 10] = [
        (Method::GET, "/v1/nothing", "", 404, "NOT_FOUND"),
        (
            Method::POST,
            "/v1/orgs/org_acme/usage",
            "",
            405,
            "METHOD_NOT_ALLOWED",
        ),
        (
            Method::GET,
            "/v1/orgs/org:1/usage",
            "",
            400,
            "INVALID_ORG_ID",
        ),
        (
            Method::PUT,
            "/v1/orgs/org_acme/usage/credits",
            r#"{"used":1}"#,
            400,
            "INVALID_BODY",
        ),
        (
            Method::PUT,
            "/v1/orgs/org_acme/usage/tokens",
            r#"{"used":-1}"#,
            400,
            "INVALID_BODY",
        ),
        (
            Method::PUT,
            "/v1/orgs/org_acme/usage/tokens",
            r#"{"used":1.5}"#,
            400,
            "INVALID_BODY",
        ),
        (
            Method::PUT,
            "/v1/orgs/org_acme/usage/tokens",
            r#"{"used":1e300}"#,
            400,
            "INVALID_BODY",
        ),
        (
            Method::PUT,
            "/v1/orgs/org_acme/usage/tokens",
            r#"{"used":1,"x":2}"#,
            400,
            "INVALID_BODY",
        ),
        (
            Method::POST,
            "/v1/check",
            r#"{"org":"org_acme","cost":{"tokens":"many"}}"#,
            400,
            "INVALID_BODY",
        ),
        (Method::POST, "/v1/check", "not json", 400, "INVALID_BODY"),
    ];
    for (method, path, sent, status, code) in cases {
        let response = admin(method, &gateway, path)
            .body(sent.to_string())
            .send()
            .await
            .unwrap();
        envelope(response, status, code).await;
    }
    let too_large = admin(Method::POST, &gateway, "/v1/check")
        .body(vec![b' '; 100_000])
        .send()
        .await
        .unwrap();
    envelope(too_large, 413, "PAYLOAD_TOO_LARGE").await;
    assert_eq!(gateway.used("org_acme", Dimension::Tokens).await, 0);
}

#[tokio::test]
async fn the_proxy_never_answers_admin_paths_and_the_admin_never_proxies() {
    let upstream = Upstream::start().await;
    let gateway = Backing::Memory.gateway(&upstream).await;
    // On the proxy listener, /healthz is the catch-all route's: forwarded.
    let proxied = client().get(gateway.url("/healthz")).send().await.unwrap();
    assert_eq!(proxied.status(), 200);
    assert_eq!(upstream.hits(), 1);
    let hits = upstream.hits();
    for path in ["/api/v1/playbooks/p/execute", "/anything"] {
        let response = client()
            .post(gateway.admin_url(path))
            .bearer_auth(KEY_ACME)
            .send()
            .await
            .unwrap();
        envelope(response, 404, "NOT_FOUND").await;
    }
    assert_eq!(upstream.hits(), hits);
    assert_eq!(gateway.used("org_acme", Dimension::PlaybookRuns).await, 0);
}

#[tokio::test]
async fn metrics_are_served_without_a_token_and_count_what_happened_on_both_stores() {
    let upstream = Upstream::start().await;
    for backing in Backing::both().await {
        let name = backing.name();
        let gateway = backing.gateway(&upstream).await;
        gateway
            .app
            .set_usage(&acme(), Dimension::PlaybookRuns, 9)
            .await
            .unwrap();
        run_playbooks(&gateway, 1).await;
        let refused = client()
            .post(gateway.url("/api/v1/playbooks/p/execute"))
            .bearer_auth(KEY_ACME)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 402);
        // Started without a file: a reload that did not happen.
        let reload = admin(reqwest::Method::POST, &gateway, "/v1/reload")
            .send()
            .await
            .unwrap();
        assert_eq!(reload.status(), 409);

        let response = client()
            .get(gateway.admin_url("/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text"),
            "{name}"
        );
        let text = response.text().await.unwrap();
        assert!(text.ends_with("# EOF\n"), "{name}");
        let route = ("route", "playbook-execute");
        let requests = "tollgate_requests_total";
        assert_eq!(
            sample(&text, requests, &[route, ("outcome", "forwarded")]),
            1.0,
            "{name}"
        );
        assert_eq!(
            sample(&text, requests, &[route, ("outcome", "denied")]),
            1.0,
            "{name}"
        );
        assert_eq!(
            sample(
                &text,
                "tollgate_quota_denials_total",
                &[route, ("quota_type", "playbook_runs")]
            ),
            1.0,
            "{name}"
        );
        assert_eq!(
            sample(
                &text,
                "tollgate_config_reloads_total",
                &[("result", "error")]
            ),
            1.0
        );
        assert_eq!(
            sample(&text, "tollgate_reservations_open", &[]),
            0.0,
            "{name}"
        );
        assert!(!text.contains("org_acme"), "an org is never a label");
        assert_eq!(
            gateway.used("org_acme", Dimension::PlaybookRuns).await,
            10,
            "{name}"
        );
    }
}
