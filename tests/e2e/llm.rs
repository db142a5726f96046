//! The LLM provider path: estimates reconciled to the usage providers report,
//! in JSON and in streams cut at awkward places, over HTTP and HTTPS.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tollgate::quota::Dimension;

use crate::support::provider::{
    ANTHROPIC_STREAM, ANTHROPIC_USAGE, OPENAI_USAGE, Provider, RESPONSES_STREAM, RESPONSES_USAGE,
    openai_stream,
};
use crate::support::{Gateway, KEY_ACME, Upstream, client, eventually, fixed_clock};

fn llm_config(provider: &Provider, idle_timeout: &str) -> String {
    let (scheme, host, ca) = match &provider.ca_pem {
        Some(_) => (
            "https",
            format!("localhost:{}", provider.addr.port()),
            "ca_file = \"${CA_FILE}\"\n",
        ),
        None => ("http", provider.addr.to_string(), ""),
    };
    crate::support::config_with(|c| {
        c.replace(crate::support::UPSTREAM_TIMEOUT, &format!("upstream_timeout = \"5s\"\nidle_timeout = \"{idle_timeout}\""))
            .replace(
                "[upstreams.openai]\nurl = \"http://${UPSTREAM}\"",
                &format!("[upstreams.openai]\nurl = \"{scheme}://{host}\"\n{ca}"),
            )
            .replace(
                "[upstreams.dead]",
                &format!(
                    "[upstreams.anthropic]\nurl = \"{scheme}://{host}\"\n{ca}headers = {{ x-api-key = \"anthropic-secret\" }}\n\n[upstreams.dead]"
                ),
            )
            .replace(
                "[[routes]]\nname = \"dead-metered\"",
                "[[routes]]\nname = \"anthropic-messages\"\nmethod = \"POST\"\npath = \"/v1/messages\"\nupstream = \"anthropic\"\ncost = { tokens = \"estimate\" }\n\n\
                 [[routes]]\nname = \"openai-responses\"\nmethod = \"POST\"\npath = \"/v1/responses\"\nupstream = \"openai\"\ncost = { tokens = \"estimate\" }\n\n\
                 [[routes]]\nname = \"openai-embeddings\"\nmethod = \"POST\"\npath = \"/v1/embeddings\"\nupstream = \"openai\"\ncost = { tokens = \"estimate\" }\n\n\
                 [[routes]]\nname = \"inject-chat\"\nmethod = \"POST\"\npath = \"/inject/v1/chat/completions\"\nupstream = \"openai\"\ncost = { tokens = \"estimate\" }\ndefault_max_tokens = 1000\ncompletion_bound = \"inject\"\n\n\
                 [[routes]]\nname = \"fit-chat\"\nmethod = \"POST\"\npath = \"/fit/v1/chat/completions\"\nupstream = \"openai\"\ncost = { tokens = \"estimate\" }\ndefault_max_tokens = 1000\ncompletion_bound = \"fit\"\nmin_completion_tokens = 100\n\n\
                 [[routes]]\nname = \"dead-metered\"",
            )
            .replace(
                "[orgs.org_shadow]",
                "[orgs.org_inject]\nlimits = { tokens = 10000 }\n\n[orgs.org_fit]\nlimits = { tokens = 10000 }\n\n[orgs.org_shadow]",
            )
    })
}

pub struct Setup {
    pub provider: Provider,
    pub gateway: Gateway,
    _upstream: Upstream,
    _ca: Option<tempfile::NamedTempFile>,
}

pub async fn setup(tls: bool, idle_timeout: &str) -> Setup {
    let provider = if tls {
        Provider::start_tls().await
    } else {
        Provider::start().await
    };
    let upstream = Upstream::start().await;
    let ca = provider.ca_pem.as_ref().map(|pem| {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), pem).unwrap();
        file
    });
    let vars: Vec<(&str, String)> = ca
        .iter()
        .map(|f| ("CA_FILE", f.path().display().to_string()))
        .collect();
    let gateway = Gateway::launch(
        &llm_config(&provider, idle_timeout),
        &upstream,
        &vars,
        fixed_clock(),
    )
    .await;
    Setup {
        provider,
        gateway,
        _upstream: upstream,
        _ca: ca,
    }
}

pub async fn call(
    gateway: &Gateway,
    path: &str,
    org: &str,
    body: serde_json::Value,
    extra: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = client()
        .post(gateway.url(path))
        .header("x-org-id", org)
        .json(&body);
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

fn chat(stream: bool) -> serde_json::Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100, "stream": stream})
}

/// The estimate of [`chat`]: "hello" is 2 tokens, plus 100.
const CHAT_ESTIMATE: i64 = 102;

#[tokio::test]
async fn a_json_answer_replaces_the_estimate_with_its_usage() {
    let s = setup(false, "30s").await;

    let response = call(
        &s.gateway,
        "/v1/chat/completions",
        "org_json",
        chat(false),
        &[],
    )
    .await;

    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["total_tokens"], 16);
    s.gateway
        .settles_at("org_json", Dimension::Tokens, OPENAI_USAGE)
        .await;
}

#[tokio::test]
async fn a_json_answer_with_a_content_length_is_reconciled_too() {
    let s = setup(false, "30s").await;

    let response = call(
        &s.gateway,
        "/v1/chat/completions",
        "org_length",
        chat(false),
        &[("x-test-length", "1")],
    )
    .await;

    assert!(response.headers().contains_key("content-length"));
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap()["usage"]["total_tokens"],
        16
    );
    s.gateway
        .settles_at("org_length", Dimension::Tokens, OPENAI_USAGE)
        .await;
    assert_eq!(
        s.provider.seen()[0].headers["accept-encoding"],
        "identity",
        "the usage must come uncompressed"
    );
}

#[tokio::test]
async fn an_openai_stream_reports_usage_the_client_never_sees_unless_it_asked() {
    let s = setup(false, "30s").await;

    let response = call(
        &s.gateway,
        "/v1/chat/completions",
        "org_hidden",
        chat(true),
        &[],
    )
    .await;

    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(
        response.text().await.unwrap(),
        openai_stream(false),
        "the client saw the usage it did not ask for"
    );
    assert_eq!(
        s.provider.seen()[0].body["stream_options"]["include_usage"],
        true,
        "the gateway did not ask for usage"
    );
    s.gateway
        .settles_at("org_hidden", Dimension::Tokens, OPENAI_USAGE)
        .await;
}

#[tokio::test]
async fn an_openai_stream_whose_client_asked_for_usage_passes_byte_for_byte() {
    let s = setup(false, "30s").await;
    let mut body = chat(true);
    body["stream_options"] = json!({"include_usage": true});

    let response = call(&s.gateway, "/v1/chat/completions", "org_asked", body, &[]).await;

    assert_eq!(response.text().await.unwrap(), openai_stream(true));
    s.gateway
        .settles_at("org_asked", Dimension::Tokens, OPENAI_USAGE)
        .await;
}

#[tokio::test]
async fn an_anthropic_stream_counts_input_cache_and_the_last_output() {
    let s = setup(false, "30s").await;
    let body = json!({"model": "claude", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "hi"}]});

    let response = call(
        &s.gateway,
        "/v1/messages",
        "org_claude",
        body,
        &[("cookie", "session=client-token")],
    )
    .await;

    assert_eq!(response.text().await.unwrap(), ANTHROPIC_STREAM);
    s.gateway
        .settles_at("org_claude", Dimension::Tokens, ANTHROPIC_USAGE)
        .await;
    let seen = &s.provider.seen()[0];
    assert_eq!(seen.headers["x-api-key"], "anthropic-secret");
    assert!(
        seen.headers.get("cookie").is_none(),
        "the client's credential reached the provider"
    );
    assert!(
        seen.body.get("stream_options").is_none(),
        "an Anthropic body was given OpenAI options"
    );
}

#[tokio::test]
async fn a_responses_stream_counts_its_completed_usage() {
    let s = setup(false, "30s").await;
    let body = json!({"model": "gpt-4o", "input": "hi", "max_output_tokens": 20, "stream": true});

    let response = call(&s.gateway, "/v1/responses", "org_resp", body, &[]).await;

    assert_eq!(response.text().await.unwrap(), RESPONSES_STREAM);
    s.gateway
        .settles_at("org_resp", Dimension::Tokens, RESPONSES_USAGE)
        .await;
}

#[tokio::test]
async fn embeddings_reconcile_from_their_json_usage() {
    let s = setup(false, "30s").await;

    let response = call(
        &s.gateway,
        "/v1/embeddings",
        "org_embed",
        json!({"model": "e", "input": ["abcdefgh", "a"]}),
        &[],
    )
    .await;

    assert_eq!(response.status(), 200);
    s.gateway
        .settles_at("org_embed", Dimension::Tokens, 8)
        .await;
}

#[tokio::test]
async fn a_stream_cut_mid_way_keeps_the_estimate() {
    let s = setup(false, "30s").await;

    let response = call(
        &s.gateway,
        "/v1/chat/completions",
        "org_cut",
        chat(true),
        &[("x-test-cut", "90")],
    )
    .await;

    assert!(
        response.text().await.is_err(),
        "the cut must reach the client as an error"
    );
    s.gateway
        .settles_at("org_cut", Dimension::Tokens, CHAT_ESTIMATE)
        .await;
    assert_eq!(
        crate::support::count(&s.gateway.app, "tollgate_reconciliations_total", &[]),
        0
    );
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_keeps_the_estimate() {
    let s = setup(false, "30s").await;
    // Over HTTP/2 a client that leaves resets its stream, which the gateway
    // sees at once; over HTTP/1.1 it sees it at its next write.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    // Asking for usage, so the stream passes piece by piece, not event by event.
    let mut body = chat(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = h2
        .post(s.gateway.url("/v1/chat/completions"))
        .header("x-org-id", "org_left")
        .header("x-test-hold", "1")
        .json(&body)
        .send()
        .await
        .unwrap();
    s.provider.holding().await;
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(
        first,
        &openai_stream(true).as_bytes()[..7],
        "the first piece did not arrive as sent"
    );

    drop(stream);
    drop(h2);

    eventually("the stream's reservation is let go", async || {
        s.gateway.app.metrics().open_reservations() == 0
    })
    .await;
    s.provider.release();
    assert_eq!(
        s.gateway.used("org_left", Dimension::Tokens).await,
        CHAT_ESTIMATE
    );
    assert_eq!(
        crate::support::count(&s.gateway.app, "tollgate_reconciliations_total", &[]),
        0
    );
}

#[tokio::test]
async fn a_stream_that_goes_quiet_is_cut_after_the_idle_timeout() {
    let s = setup(false, "300ms").await;

    let response = call(
        &s.gateway,
        "/v1/chat/completions",
        "org_idle",
        chat(true),
        &[("x-test-hold", "1")],
    )
    .await;

    let text = crate::support::within(Duration::from_secs(10), response.text()).await;
    assert!(text.is_err(), "the quiet stream was not cut: {text:?}");
    s.provider.release();
    s.gateway
        .settles_at("org_idle", Dimension::Tokens, CHAT_ESTIMATE)
        .await;
}

#[tokio::test]
async fn a_provider_error_refunds_the_estimate() {
    let s = setup(false, "30s").await;

    let response = call(
        &s.gateway,
        "/v1/chat/completions",
        "org_500",
        chat(false),
        &[("x-test-status", "500")],
    )
    .await;

    assert_eq!(response.status(), 500);
    s.gateway.settles_at("org_500", Dimension::Tokens, 0).await;
}

#[tokio::test]
async fn an_https_provider_is_reached_over_http2_with_its_own_key() {
    let s = setup(true, "30s").await;

    let response = call(
        &s.gateway,
        "/v1/chat/completions",
        "org_tls",
        chat(true),
        &[("authorization", format!("Bearer {KEY_ACME}").as_str())],
    )
    .await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), openai_stream(false));
    let seen = &s.provider.seen()[0];
    assert_eq!(seen.version, http::Version::HTTP_2);
    assert_eq!(seen.headers["authorization"], "Bearer provider-secret");
    // The gateway key named org_acme, whatever x-org-id said.
    s.gateway
        .settles_at("org_acme", Dimension::Tokens, OPENAI_USAGE)
        .await;
}

/// A client per HTTP version the gateway serves, each with its own
/// connections, so that hanging up closes them.
fn clients() -> [(&'static str, reqwest::Client); 2] {
    [
        ("h1", reqwest::Client::new()),
        (
            "h2",
            reqwest::Client::builder()
                .http2_prior_knowledge()
                .build()
                .unwrap(),
        ),
    ]
}

/// Reads `response` until `marker` has arrived, then hangs up, as the
/// official SDKs do at `[DONE]` and `message_stop`: the provider's end of
/// body comes after (see `provider::END_DELAY`).
async fn read_until_and_hang_up(response: reqwest::Response, marker: &str) -> String {
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(marker) {
        let piece = crate::support::within(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|| panic!("the stream ended before {marker:?}"))
            .unwrap();
        seen.extend_from_slice(&piece);
    }
    String::from_utf8(seen).unwrap()
}

async fn stream_call(
    client: &reqwest::Client,
    gateway: &Gateway,
    path: &str,
    org: &str,
    body: &serde_json::Value,
    extra: &[(&str, String)],
) -> reqwest::Response {
    let mut request = client
        .post(gateway.url(path))
        .header("x-org-id", org)
        .json(body);
    for (name, value) in extra {
        request = request.header(*name, value);
    }
    request.send().await.unwrap()
}

fn anthropic_chat() -> serde_json::Value {
    json!({"model": "claude", "max_tokens": 64, "stream": true, "messages": [{"role": "user", "content": "hello"}]})
}

/// The estimate of [`anthropic_chat`]: "hello" is 2 tokens, plus 64.
const ANTHROPIC_ESTIMATE: i64 = 66;

#[tokio::test]
async fn a_client_that_hangs_up_at_done_is_charged_the_usage_the_stream_reported() {
    let s = setup(false, "30s").await;
    for (version, client) in clients() {
        for asked in [false, true] {
            let org = format!("org_done_{version}_{asked}");
            let mut body = chat(true);
            if asked {
                body["stream_options"] = json!({"include_usage": true});
            }
            let response = stream_call(
                &client,
                &s.gateway,
                "/v1/chat/completions",
                &org,
                &body,
                &[],
            )
            .await;
            let seen = read_until_and_hang_up(response, "data: [DONE]\n\n").await;
            assert_eq!(seen, openai_stream(asked), "{version}, asked: {asked}");
            s.gateway
                .settles_at(&org, Dimension::Tokens, OPENAI_USAGE)
                .await;
        }
    }
}

#[tokio::test]
async fn a_client_that_hangs_up_right_after_the_usage_chunk_is_charged_it() {
    let s = setup(false, "30s").await;
    let mut body = chat(true);
    body["stream_options"] = json!({"include_usage": true});
    for (version, client) in clients() {
        let org = format!("org_usage_{version}");
        let response = stream_call(
            &client,
            &s.gateway,
            "/v1/chat/completions",
            &org,
            &body,
            &[],
        )
        .await;
        read_until_and_hang_up(response, "\"total_tokens\":16}}\n\n").await;
        s.gateway
            .settles_at(&org, Dimension::Tokens, OPENAI_USAGE)
            .await;
    }
}

#[tokio::test]
async fn an_anthropic_client_that_hangs_up_at_message_stop_is_charged_the_reported_usage() {
    let s = setup(false, "30s").await;
    for (version, client) in clients() {
        let org = format!("org_stop_{version}");
        let response = stream_call(
            &client,
            &s.gateway,
            "/v1/messages",
            &org,
            &anthropic_chat(),
            &[],
        )
        .await;
        let seen = read_until_and_hang_up(response, "{\"type\":\"message_stop\"}\r\n\r\n").await;
        assert_eq!(seen, ANTHROPIC_STREAM);
        s.gateway
            .settles_at(&org, Dimension::Tokens, ANTHROPIC_USAGE)
            .await;
    }
}

/// Where [`ANTHROPIC_STREAM`], with `input` input tokens, has sent the
/// whole of its first event of type `event`.
fn anthropic_stream_through(input: i64, event: &str) -> (String, usize) {
    let stream =
        ANTHROPIC_STREAM.replace("\"input_tokens\":20", &format!("\"input_tokens\":{input}"));
    let start = stream.find(&format!("event: {event}\r\n")).unwrap();
    let end = start + stream[start..].find("\r\n\r\n").unwrap() + 4;
    (stream, end)
}

/// Over HTTP/2, where the gateway sees the client's reset at once: a client
/// that leaves while the provider is quiet, after `event`.
async fn leave_anthropic_stream_after(s: &Setup, org: &str, input: i64, event: &str) {
    let (stream, end) = anthropic_stream_through(input, event);
    let (_, h2) = clients().into_iter().nth(1).unwrap();
    let response = stream_call(
        &h2,
        &s.gateway,
        "/v1/messages",
        org,
        &anthropic_chat(),
        &[
            ("x-test-input-tokens", input.to_string()),
            ("x-test-pause-at", end.to_string()),
        ],
    )
    .await;
    s.provider.holding().await;
    let seen = read_until_and_hang_up(response, &stream[end - 40..end]).await;
    // The provider pauses after the piece that completes the event.
    assert!(seen.starts_with(&stream[..end]) && seen.len() < end + 7);
    drop(h2);
    eventually("the stream's reservation is let go", async || {
        s.gateway.app.metrics().open_reservations() == 0
    })
    .await;
    s.provider.release();
}

#[tokio::test]
async fn an_anthropic_client_that_leaves_after_message_start_is_charged_its_input() {
    let s = setup(false, "30s").await;
    leave_anthropic_stream_after(&s, "org_start", 100_000, "message_start").await;
    // Input with its cache reads, and the one output token message_start
    // reports: more than the estimate.
    assert_eq!(
        s.gateway.used("org_start", Dimension::Tokens).await,
        100_000 + 4 + 1
    );
}

#[tokio::test]
async fn an_anthropic_client_that_leaves_before_message_stop_is_charged_the_usage_so_far() {
    let s = setup(false, "30s").await;
    leave_anthropic_stream_after(&s, "org_delta", 100_000, "message_delta").await;
    assert_eq!(
        s.gateway.used("org_delta", Dimension::Tokens).await,
        100_000 + 4 + 6
    );
}

#[tokio::test]
async fn an_anthropic_client_that_leaves_with_less_reported_than_the_estimate_is_charged_the_estimate()
 {
    let s = setup(false, "30s").await;
    leave_anthropic_stream_after(&s, "org_small", 10, "message_start").await;
    assert_eq!(
        s.gateway.used("org_small", Dimension::Tokens).await,
        ANTHROPIC_ESTIMATE
    );
}
