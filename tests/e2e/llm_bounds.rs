//! What an estimate route makes of a body's completion bound: refused when
//! it is not a whole positive number, written in (`inject`) when the body
//! names none, lowered to what is left (`fit`); and prompt text priced
//! wherever it sits.

use serde_json::json;
use tollgate::quota::Dimension;

use crate::llm::{call, setup};
use crate::support::envelope;

/// The limit of org_inject and org_fit in the test config.
const LIMIT: i64 = 10_000;

/// "hello": the prompt tokens the estimate counts, and the provider reports.
const PROMPT: i64 = 2;

fn unbounded_chat() -> serde_json::Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]})
}

/// Sends 100 unbounded chats to `path` for `org`, ten at a time, to a
/// provider that always uses the whole bound it was given; returns how many
/// were answered 200, checking after each ten that the org is within its
/// limit.
async fn hundred_calls_using_the_whole_bound(
    s: &crate::llm::Setup,
    path: &str,
    org: &str,
) -> usize {
    let mut admitted = 0;
    for _ in 0..10 {
        let calls = (0..10).map(|_| {
            call(
                &s.gateway,
                path,
                org,
                unbounded_chat(),
                &[("x-test-use-bound", "1"), ("x-test-prompt-tokens", "2")],
            )
        });
        for response in futures_util::future::join_all(calls).await {
            match response.status().as_u16() {
                200 => admitted += 1,
                402 => {
                    envelope(response, 402, "QUOTA_EXCEEDED").await;
                }
                other => panic!("unexpected status {other}"),
            }
        }
        crate::support::eventually("every reservation settled", async || {
            s.gateway.app.metrics().open_reservations() == 0
        })
        .await;
        let used = s.gateway.used(org, Dimension::Tokens).await;
        assert!(used <= LIMIT, "{org} used {used} of {LIMIT}");
    }
    admitted
}

/// The completion bound of each body the provider saw.
fn bounds_seen(s: &crate::llm::Setup) -> Vec<i64> {
    s.provider
        .seen()
        .iter()
        .map(|seen| seen.body["max_completion_tokens"].as_i64().unwrap_or(-1))
        .collect()
}

#[tokio::test]
async fn inject_writes_the_default_bound_so_a_provider_using_it_all_stays_within_the_limit() {
    let s = setup(false, "30s").await;

    let admitted =
        hundred_calls_using_the_whole_bound(&s, "/inject/v1/chat/completions", "org_inject").await;

    // 9 of 1,002 tokens fit in 10,000; the tenth would pass the limit.
    assert_eq!(admitted, 9);
    assert_eq!(bounds_seen(&s), vec![1000; 9]);
    s.gateway
        .settles_at("org_inject", Dimension::Tokens, 9 * (PROMPT + 1000))
        .await;
}

#[tokio::test]
async fn fit_lowers_the_last_bound_to_what_is_left_and_never_passes_the_limit() {
    let s = setup(false, "30s").await;

    let admitted =
        hundred_calls_using_the_whole_bound(&s, "/fit/v1/chat/completions", "org_fit").await;

    let bounds = bounds_seen(&s);
    assert_eq!(bounds.len(), admitted);
    assert!(
        bounds.iter().all(|&b| (100..=1000).contains(&b)),
        "{bounds:?}"
    );
    assert!(
        bounds.iter().any(|&b| b < 1000),
        "no bound was lowered: {bounds:?}"
    );
    let charged: i64 = bounds.iter().map(|b| PROMPT + b).sum();
    s.gateway
        .settles_at("org_fit", Dimension::Tokens, charged)
        .await;
    // Filled to within one smallest completion (and its prompt) of the limit.
    assert!(
        charged > LIMIT - (100 + PROMPT) && charged <= LIMIT,
        "{charged}"
    );
}

#[tokio::test]
async fn a_bound_the_client_named_is_forwarded_as_sent_by_inject() {
    let s = setup(false, "30s").await;
    let mut body = unbounded_chat();
    body["max_tokens"] = json!(10);
    // The provider reports one more prompt token than was estimated, so
    // the counter moves when the answer is reconciled.

    let response = call(
        &s.gateway,
        "/inject/v1/chat/completions",
        "org_named",
        body,
        &[("x-test-use-bound", "1"), ("x-test-prompt-tokens", "3")],
    )
    .await;

    assert_eq!(response.status(), 200);
    let seen = &s.provider.seen()[0].body;
    assert_eq!(seen["max_tokens"], 10);
    assert!(seen.get("max_completion_tokens").is_none(), "{seen}");
    s.gateway
        .settles_at("org_named", Dimension::Tokens, 3 + 10)
        .await;
}

#[tokio::test]
async fn a_bound_or_n_that_is_not_a_whole_positive_number_is_refused_before_anything_is_reserved() {
    let s = setup(false, "30s").await;
    let bad = [
        ("max_tokens", json!(0)),
        ("max_tokens", json!(-1)),
        ("max_tokens", json!(100000.0)),
        ("max_tokens", json!(1e30)),
        ("max_completion_tokens", json!("100")),
        ("n", json!(2.0)),
        ("n", json!(0)),
    ];
    for (key, value) in bad {
        let mut body = unbounded_chat();
        body[key] = value.clone();

        let response = call(
            &s.gateway,
            "/v1/chat/completions",
            "org_bad_bound",
            body,
            &[],
        )
        .await;

        let envelope = envelope(response, 400, "INVALID_BODY").await;
        let message = envelope["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("`{key}` must be a whole number")),
            "{key} = {value}: {message}"
        );
    }
    assert!(s.provider.seen().is_empty(), "a refused body was forwarded");
    assert_eq!(s.gateway.used("org_bad_bound", Dimension::Tokens).await, 0);
}

#[tokio::test]
async fn a_large_document_is_priced_by_its_text() {
    let s = setup(false, "30s").await;
    // 400 KB of text: 100,000 tokens, the whole of the free plan, before
    // the completion bound.
    let document = "x".repeat(400_000);
    let body = json!({"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": document}},
        {"type": "text", "text": "Summarise this."}]}]});

    let response = call(&s.gateway, "/v1/messages", "org_document", body, &[]).await;

    let envelope = envelope(response, 402, "QUOTA_EXCEEDED").await;
    assert_eq!(envelope["error"]["details"]["requested"], 100_000 + 4 + 64);
    assert!(s.provider.seen().is_empty());
    assert_eq!(s.gateway.used("org_document", Dimension::Tokens).await, 0);
}
