//! The RateLimit headers of metered answers and the Retry-After of the 402
//! and the 503, on the memory store and on a real redis-server: the figures
//! come from the reservation's own reply, and match the store's counters.

use chrono::{DateTime, Utc};
use reqwest::Response;
use serde_json::json;
use tollgate::period::Period;
use tollgate::quota::Dimension;

use crate::support::redis::RedisServer;
use crate::support::{
    Gateway, Upstream, client, config_with, envelope, fixed_clock, post, run_clock, run_started,
};

const TOKENS: Dimension = Dimension::Tokens;
const RUNS: Dimension = Dimension::PlaybookRuns;

/// The shared config with a route costing tokens and a playbook run at once.
fn config(store: &str) -> String {
    config_with(|c| {
        c.replace("backend = \"memory\"", store).replace(
            "[[routes]]\nname = \"everything-else\"",
            "[[routes]]\nname = \"generated-run\"\nmethod = \"POST\"\npath = \"/two\"\nupstream = \"api\"\ncost = { tokens = 1000, playbook_runs = 1 }\n\n\
             [[routes]]\nname = \"brief-strict\"\nmethod = \"POST\"\npath = \"/strict\"\nupstream = \"api\"\ncost = { tokens = 10000 }\non_error = \"deny\"\n\n\
             [[routes]]\nname = \"everything-else\"",
        )
    })
}

/// A gateway on one store, and the instant its clock stands at.
struct Setup {
    gateway: Gateway,
    now: DateTime<Utc>,
    redis: Option<RedisServer>,
    _upstream: Upstream,
}

impl Setup {
    /// On the memory store, by the support's fixed clock.
    async fn memory() -> Setup {
        let upstream = Upstream::start().await;
        let gateway = Gateway::launch(
            &config("backend = \"memory\""),
            &upstream,
            &[],
            fixed_clock(),
        )
        .await;
        Setup {
            gateway,
            now: fixed_clock()(),
            redis: None,
            _upstream: upstream,
        }
    }

    /// On a real redis-server, by the run's clock: Redis expires a period's
    /// counters by its own clock, so the period must be a current one.
    async fn redis() -> Setup {
        let redis = RedisServer::start().await;
        let upstream = Upstream::start().await;
        let store = "backend = \"redis\"\nurl = \"${REDIS_URL}\"\ntimeout = \"200ms\"";
        let gateway = Gateway::launch(
            &config(store),
            &upstream,
            &[("REDIS_URL", redis.url())],
            run_clock(),
        )
        .await;
        Setup {
            gateway,
            now: run_started(),
            redis: Some(redis),
            _upstream: upstream,
        }
    }

    /// Seconds from the clock to the end of the default (1st-anchored) period, rounded up.
    fn to_period_end(&self) -> i64 {
        let left = Period::containing(self.now, 1).end - self.now;
        left.num_seconds() + i64::from(left.subsec_nanos() > 0)
    }

    /// The default period's length in seconds.
    fn window(&self) -> i64 {
        let period = Period::containing(self.now, 1);
        (period.end - period.start).num_seconds()
    }
}

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

async fn a_fixed_cost_counts_down_to_a_402_that_says_when_to_retry(s: Setup) {
    let (window, reset) = (s.window(), s.to_period_end());
    // The free plan allows 100,000 tokens; a brief costs 10,000.
    for n in 1..=10 {
        let response = post(&s.gateway, "/api/v1/content/briefs/generate", "org_brief").await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "ratelimit-policy").as_deref(),
            Some(format!("\"tokens\";q=100000;w={window}").as_str())
        );
        let remaining = 100_000 - n * 10_000;
        assert_eq!(
            header(&response, "ratelimit").as_deref(),
            Some(format!("\"tokens\";r={remaining};t={reset}").as_str())
        );
        assert_eq!(header(&response, "retry-after"), None);
        assert_eq!(s.gateway.used("org_brief", TOKENS).await, n * 10_000);
    }

    let refused = post(&s.gateway, "/api/v1/content/briefs/generate", "org_brief").await;

    assert_eq!(header(&refused, "retry-after"), Some(reset.to_string()));
    assert_eq!(
        header(&refused, "ratelimit").as_deref(),
        Some(format!("\"tokens\";r=0;t={reset}").as_str())
    );
    assert_eq!(
        header(&refused, "ratelimit-policy").as_deref(),
        Some(format!("\"tokens\";q=100000;w={window}").as_str())
    );
    envelope(refused, 402, "QUOTA_EXCEEDED").await;
    assert_eq!(s.gateway.used("org_brief", TOKENS).await, 100_000);
}

async fn an_estimate_route_reports_the_estimate_it_reserved(s: Setup) {
    let reset = s.to_period_end();
    // "hello" is 2 tokens, plus the 100 asked for; the stand-in reports no
    // usage, so the estimate stands.
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100});

    let response = client()
        .post(s.gateway.url("/v1/chat/completions"))
        .header("x-org-id", "org_chat")
        .json(&body)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "ratelimit").as_deref(),
        Some(format!("\"tokens\";r=99898;t={reset}").as_str())
    );
    s.gateway.settles_at("org_chat", TOKENS, 102).await;
}

async fn a_cost_of_two_dimensions_gives_an_item_for_each(s: Setup) {
    let (window, reset) = (s.window(), s.to_period_end());

    let response = post(&s.gateway, "/two", "org_two").await;

    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "ratelimit-policy").as_deref(),
        Some(format!("\"tokens\";q=100000;w={window},\"playbook_runs\";q=10;w={window}").as_str())
    );
    assert_eq!(
        header(&response, "ratelimit").as_deref(),
        Some(format!("\"tokens\";r=99000;t={reset},\"playbook_runs\";r=9;t={reset}").as_str())
    );
    let usage = s.gateway.usage("org_two").await;
    assert_eq!((usage.get(TOKENS), usage.get(RUNS)), (1000, 1));
}

async fn an_unmetered_route_has_no_ratelimit_headers(s: Setup) {
    let response = post(&s.gateway, "/anything/else", "org_free").await;

    assert_eq!(response.status(), 200);
    for name in ["ratelimit", "ratelimit-policy", "retry-after"] {
        assert_eq!(header(&response, name), None, "{name}");
    }
    assert!(s.gateway.usage("org_free").await.is_zero());
}

async fn mode_off_counts_nothing_and_reports_nothing(s: Setup) {
    let response = post(&s.gateway, "/api/v1/content/briefs/generate", "org_off").await;

    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "ratelimit"), None);
    assert_eq!(header(&response, "ratelimit-policy"), None);
    assert!(s.gateway.usage("org_off").await.is_zero());
}

async fn shadow_mode_reports_past_the_limit_as_nothing_left(s: Setup) {
    let reset = s.to_period_end();
    // The free plan allows 10 playbook runs.
    for _ in 0..11 {
        let response = post(&s.gateway, "/api/v1/playbooks/p/execute", "org_shadow").await;
        assert_eq!(response.status(), 200);
    }
    let response = post(&s.gateway, "/api/v1/playbooks/p/execute", "org_shadow").await;

    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "ratelimit").as_deref(),
        Some(format!("\"playbook_runs\";r=0;t={reset}").as_str())
    );
    assert_eq!(s.gateway.used("org_shadow", RUNS).await, 12);
}

macro_rules! on_each_store {
    ($($test:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(#[tokio::test] async fn $test() { super::$test(Setup::memory().await).await; })*
        }
        mod redis {
            use super::*;
            $(#[tokio::test] async fn $test() { super::$test(Setup::redis().await).await; })*
        }
    };
}

on_each_store!(
    a_fixed_cost_counts_down_to_a_402_that_says_when_to_retry,
    an_estimate_route_reports_the_estimate_it_reserved,
    a_cost_of_two_dimensions_gives_an_item_for_each,
    an_unmetered_route_has_no_ratelimit_headers,
    mode_off_counts_nothing_and_reports_nothing,
    shadow_mode_reports_past_the_limit_as_nothing_left,
);

#[tokio::test]
async fn a_503_from_a_stopped_store_says_to_retry_in_a_second() {
    let mut s = Setup::redis().await;
    if let Some(redis) = s.redis.as_mut() {
        redis.stop();
    }

    let response = post(&s.gateway, "/strict", "org_strict").await;

    assert_eq!(header(&response, "retry-after").as_deref(), Some("1"));
    assert_eq!(header(&response, "ratelimit"), None);
    envelope(response, 503, "QUOTA_STORE_UNAVAILABLE").await;
}
