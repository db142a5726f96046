//! The source system's enforcement points, modes and overrides.

use futures_util::future::join_all;
use serde_json::json;
use tollgate::quota::Dimension;

use crate::support::{Gateway, KEY_ACME, Upstream, client, config, config_with, envelope, post};

#[tokio::test]
async fn the_eleventh_playbook_run_on_free_is_refused_with_the_documented_402() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    for run in 1..=10 {
        let response = post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_a").await;
        assert_eq!(response.status(), 200, "run {run}");
    }
    let response = post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_a").await;
    let body = envelope(response, 402, "QUOTA_EXCEEDED").await;

    assert_eq!(
        body["error"],
        json!({
            "code": "QUOTA_EXCEEDED",
            "message": "Playbook run quota exceeded: 10 of 10 used this period, 1 requested",
            "details": {
                "type": "quota_exceeded",
                "quotaType": "playbook_runs",
                "currentUsage": 10,
                "limit": 10,
                "requested": 1,
                "billingStatus": "active",
                "planSlug": "free",
                "periodStart": "2026-11-01T00:00:00Z",
                "periodEnd": "2026-12-01T00:00:00Z"
            }
        })
    );
    assert_eq!(upstream.hits(), 10, "the refused run reached the upstream");
    assert_eq!(gateway.used("org_a", Dimension::PlaybookRuns).await, 10);
}

#[tokio::test]
async fn briefs_cost_ten_thousand_tokens_and_rewrites_eight_thousand_from_one_budget() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    for _ in 0..9 {
        assert_eq!(
            post(&gateway, "/api/v1/content/briefs/generate", "org_t")
                .await
                .status(),
            200
        );
    }
    assert_eq!(gateway.used("org_t", Dimension::Tokens).await, 90_000);
    assert_eq!(
        post(&gateway, "/api/v1/content/rewrite", "org_t")
            .await
            .status(),
        200
    );
    assert_eq!(gateway.used("org_t", Dimension::Tokens).await, 98_000);

    let rewrite = envelope(
        post(&gateway, "/api/v1/content/rewrite", "org_t").await,
        402,
        "QUOTA_EXCEEDED",
    )
    .await;
    assert_eq!(rewrite["error"]["details"]["quotaType"], "tokens");
    assert_eq!(rewrite["error"]["details"]["currentUsage"], 98_000);
    assert_eq!(rewrite["error"]["details"]["requested"], 8_000);
    assert_eq!(
        rewrite["error"]["message"],
        "Token quota exceeded: 98000 of 100000 used this period, 8000 requested"
    );
    let brief = envelope(
        post(&gateway, "/api/v1/content/briefs/generate", "org_t").await,
        402,
        "QUOTA_EXCEEDED",
    )
    .await;
    assert_eq!(brief["error"]["details"]["requested"], 10_000);
    assert_eq!(gateway.used("org_t", Dimension::Tokens).await, 98_000);
    assert_eq!(upstream.hits(), 10);
}

#[tokio::test]
async fn an_estimate_route_reserves_the_prompt_plus_the_completion_bound() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;
    // system: 10 chars -> 3 tokens; user: 5 chars -> 2 tokens; max_tokens 100.
    let body = r#"{"model":"gpt-4o","messages":[{"role":"system","content":"0123456789"},{"role":"user","content":"hello"}],"max_tokens":100}"#;

    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY_ACME}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(gateway.used("org_acme", Dimension::Tokens).await, 105);
    let seen = upstream.seen();
    assert_eq!(
        seen[0].body,
        body.as_bytes(),
        "the body was not forwarded unchanged"
    );
}

#[tokio::test]
async fn an_estimate_route_without_a_bound_uses_the_route_default() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;
    let body = r#"{"messages":[{"role":"user","content":"abcd"}]}"#;

    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("x-org-id", "org_e")
        .body(body)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(gateway.used("org_e", Dimension::Tokens).await, 1 + 4096);
}

#[tokio::test]
async fn seats_are_taken_and_released_as_a_gauge() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;
    let add = || post(&gateway, "/api/v1/orgs/org_s/members", "org_s");
    let remove = || async {
        client()
            .delete(gateway.url("/api/v1/orgs/org_s/members/m1"))
            .header("x-org-id", "org_s")
            .send()
            .await
            .unwrap()
    };

    for _ in 0..3 {
        assert_eq!(add().await.status(), 200);
    }
    let refused = envelope(add().await, 402, "QUOTA_EXCEEDED").await;
    assert_eq!(refused["error"]["details"]["quotaType"], "seats");
    assert_eq!(
        refused["error"]["message"],
        "Seat quota exceeded: 3 of 3 in use, 1 requested"
    );

    assert_eq!(remove().await.status(), 200);
    assert_eq!(gateway.used("org_s", Dimension::Seats).await, 2);
    assert_eq!(add().await.status(), 200);
    assert_eq!(gateway.used("org_s", Dimension::Seats).await, 3);
}

#[tokio::test]
async fn releasing_a_seat_never_takes_the_gauge_below_zero() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    let response = client()
        .delete(gateway.url("/api/v1/orgs/org_z/members/m1"))
        .header("x-org-id", "org_z")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(gateway.used("org_z", Dimension::Seats).await, 0);
}

#[tokio::test]
async fn shadow_mode_forwards_past_the_limit_and_names_the_quota_in_a_header() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    for _ in 0..10 {
        let response = post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_shadow").await;
        assert!(
            response
                .headers()
                .get("x-tollgate-shadow-exceeded")
                .is_none()
        );
    }
    let response = post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_shadow").await;

    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-tollgate-shadow-exceeded"],
        "playbook_runs"
    );
    assert_eq!(upstream.hits(), 11);
    assert_eq!(
        gateway.used("org_shadow", Dimension::PlaybookRuns).await,
        11,
        "shadow mode still counts"
    );
    assert_eq!(
        crate::support::count(
            &gateway.app,
            "tollgate_requests_total",
            &[("outcome", "shadow_exceeded")]
        ),
        1
    );
}

#[tokio::test]
async fn off_mode_forwards_everything_and_counts_nothing() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    for _ in 0..12 {
        assert_eq!(
            post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_off")
                .await
                .status(),
            200
        );
    }

    assert_eq!(upstream.hits(), 12);
    assert_eq!(gateway.used("org_off", Dimension::PlaybookRuns).await, 0);
}

#[tokio::test]
async fn a_global_shadow_mode_applies_to_orgs_without_an_override() {
    let upstream = Upstream::start().await;
    let config =
        config_with(|c| c.replace("[store]", "[enforcement]\nmode = \"shadow\"\n\n[store]"));
    let gateway = Gateway::start(&config, &upstream).await;

    for _ in 0..11 {
        assert_eq!(
            post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_any")
                .await
                .status(),
            200
        );
    }
    assert_eq!(gateway.used("org_any", Dimension::PlaybookRuns).await, 11);
}

#[tokio::test]
async fn an_org_override_sets_its_own_limit_plan_status_and_period() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    for _ in 0..2 {
        assert_eq!(
            post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_custom")
                .await
                .status(),
            200
        );
    }
    let body = envelope(
        post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_custom").await,
        402,
        "QUOTA_EXCEEDED",
    )
    .await;

    let details = &body["error"]["details"];
    assert_eq!(details["limit"], 2);
    assert_eq!(details["planSlug"], "pro");
    assert_eq!(details["billingStatus"], "past_due");
    assert_eq!(details["periodStart"], "2026-11-05T00:00:00Z");
    assert_eq!(details["periodEnd"], "2026-12-05T00:00:00Z");
    // The plan's other limits still apply: pro allows far more than free's tokens.
    for _ in 0..11 {
        assert_eq!(
            post(&gateway, "/api/v1/content/briefs/generate", "org_custom")
                .await
                .status(),
            200
        );
    }
}

#[tokio::test]
async fn two_hundred_simultaneous_requests_against_a_limit_of_fifty_admit_exactly_fifty() {
    let upstream = Upstream::start().await;
    let config = config_with(|c| c.replace("playbook_runs = 10", "playbook_runs = 50"));
    let gateway = Gateway::start(&config, &upstream).await;
    let client = client();

    let responses = join_all((0..200).map(|_| {
        client
            .post(gateway.url("/api/v1/playbooks/pb_1/execute"))
            .header("x-org-id", "org_c")
            .send()
    }))
    .await;

    let statuses: Vec<u16> = responses
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 50);
    assert_eq!(statuses.iter().filter(|&&s| s == 402).count(), 150);
    assert_eq!(upstream.hits(), 50);
    assert_eq!(gateway.used("org_c", Dimension::PlaybookRuns).await, 50);
}

#[tokio::test]
async fn orgs_do_not_share_counters() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(), &upstream).await;

    for _ in 0..10 {
        post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_one").await;
    }

    assert_eq!(
        post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_two")
            .await
            .status(),
        200
    );
    assert_eq!(
        post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_one")
            .await
            .status(),
        402
    );
}

#[tokio::test]
async fn a_new_billing_period_admits_what_the_last_one_refused() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};
    let upstream = Upstream::start().await;
    let now = Arc::new(AtomicI64::new(
        "2026-11-30T23:59:59Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
            .timestamp(),
    ));
    let clock_now = now.clone();
    let clock: tollgate::meter::Clock = Arc::new(move || {
        chrono::DateTime::from_timestamp(clock_now.load(Ordering::Relaxed), 0).unwrap()
    });
    let gateway = Gateway::launch(&config(), &upstream, &[], clock).await;
    for _ in 0..10 {
        assert_eq!(
            post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_p")
                .await
                .status(),
            200
        );
    }
    let refused = envelope(
        post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_p").await,
        402,
        "QUOTA_EXCEEDED",
    )
    .await;
    assert_eq!(
        refused["error"]["details"]["periodEnd"],
        "2026-12-01T00:00:00Z"
    );

    now.fetch_add(1, Ordering::Relaxed);

    assert_eq!(
        post(&gateway, "/api/v1/playbooks/pb_1/execute", "org_p")
            .await
            .status(),
        200
    );
    assert_eq!(gateway.used("org_p", Dimension::PlaybookRuns).await, 1);
}
