//! The pure work on a request's path, each beside a baseline measured in
//! the same run, so the note can state costs as ratios:
//!
//! - estimating a 4 KB chat body in the gateway's one pass, and by parsing
//!   it into a tree and walking that, against only parsing it as a
//!   `serde_json::Value`;
//! - scanning an SSE stream for usage, passing it through or rewriting it,
//!   against copying the same pieces;
//! - routing among the reference config's eight routes, and among the same
//!   eight behind 1,000 others; normalizing a path
//!   before it (the common already-normal path, against copying it, and one
//!   that needs work); and the quota decision;
//! - identifying a request by its gateway API key among 1 and 100,000
//!   configured keys, and among 100,000 runtime keys (the catalog's).
//! - the metrics one metered request records: its outcome and tokens on
//!   its route's counters, and the store and upstream times, each read
//!   from the clock and observed in a histogram (which takes a lock).

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::Method;
use std::sync::Arc;

use criterion::BatchSize;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use tollgate::catalog::Catalog;
use tollgate::config::{ApiKey, ApiKeys, IdentitySource};
use tollgate::identify::Identifier;
use tollgate::llm::estimate::{self, EstimateRules};
use tollgate::llm::sse::SseScanner;
use tollgate::llm::{Api, CompletionBound};
use tollgate::metrics::{Metrics, Outcome, StoreOp};
use tollgate::org::OrgId;
use tollgate::quota::{Amounts, Dimension, Limits, Mode, decide};
use tollgate::route::path::{AmbiguousPaths, normalize};
use tollgate::route::{PathRules, Route, Router};
use tollgate::store::{KeyRecord, MemoryStore, QuotaStore};

/// A chat completions body of 4 KB (4,091 bytes): a system prompt, a few
/// turns, a tool. The same content and size as the load benchmark's body
/// (benches/harness.py).
fn chat_body() -> Vec<u8> {
    let turn = "Summarise the quarterly revenue figures for the EMEA region and flag anomalies. "
        .repeat(14);
    let body = serde_json::json!({
        "model": "gpt-4o",
        "max_tokens": 512,
        "messages": [
            {"role": "system", "content": "You are a careful financial analyst. ".repeat(10)},
            {"role": "user", "content": turn},
            {"role": "assistant", "content": turn},
            {"role": "user", "content": [{"type": "text", "text": turn}]},
        ],
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "Look a figure up",
            "parameters": {"type": "object", "properties": {"region": {"type": "string"}}}}}],
    });
    serde_json::to_vec(&body).unwrap()
}

/// An OpenAI stream with usage, in 64-byte pieces.
fn stream_pieces() -> Vec<Bytes> {
    let mut stream = String::new();
    for i in 0..100 {
        stream.push_str(&format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i} \"}}}}],\"usage\":null}}\n\n"
        ));
    }
    stream.push_str("data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":100,\"total_tokens\":109}}\n\ndata: [DONE]\n\n");
    stream
        .as_bytes()
        .chunks(64)
        .map(Bytes::copy_from_slice)
        .collect()
}

fn estimation(c: &mut Criterion) {
    let body = chat_body();
    let mut group = c.benchmark_group("estimate 4 KB chat body");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("baseline: parse JSON only", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(&body)).unwrap()))
    });
    let rules = EstimateRules {
        default_max_tokens: 4096,
        image_tokens: 1600,
    };
    group.bench_function("parse into a tree and estimate", |b| {
        b.iter(|| {
            let request = estimate::parse(black_box(&body)).unwrap();
            black_box(estimate::estimate(Api::ChatCompletions, &request, &rules))
        })
    });
    group.bench_function("estimate in one pass (the gateway's)", |b| {
        b.iter(|| {
            black_box(estimate::scan(
                Api::ChatCompletions,
                black_box(&body),
                &rules,
            ))
        })
    });
    group.finish();
}

fn stream_tap(c: &mut Criterion) {
    let pieces = stream_pieces();
    let total: usize = pieces.iter().map(Bytes::len).sum();
    let mut group = c.benchmark_group("SSE stream of 100 chunks");
    group.throughput(Throughput::Bytes(total as u64));
    group.bench_function("baseline: copy the pieces", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(total);
            for piece in &pieces {
                out.extend_from_slice(black_box(piece));
            }
            black_box(out)
        })
    });
    for (name, hide) in [
        ("scan, pass through", false),
        ("scan, hide requested usage", true),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut scanner = SseScanner::new(hide);
                let mut out = Vec::with_capacity(total);
                for piece in &pieces {
                    out.extend_from_slice(&scanner.feed(piece.clone()));
                }
                black_box((out, scanner.tally().copied()))
            })
        });
    }
    group.finish();
}

fn routing_and_decision(c: &mut Criterion) {
    let route = |name: &str, method: Option<Method>, path: &str| Route {
        name: name.into(),
        method,
        path: path.into(),
        upstream: 0,
        cost: None,
        estimate: EstimateRules {
            default_max_tokens: 4096,
            image_tokens: 1600,
        },
        completion_bound: CompletionBound::AsSent,
        on_store_error: None,
        refund_statuses: None,
        metrics: Default::default(),
    };
    let eight = [
        route(
            "playbook-execute",
            Some(Method::POST),
            "/api/v1/playbooks/{id}/execute",
        ),
        route(
            "brief-generate",
            Some(Method::POST),
            "/api/v1/content/briefs/generate",
        ),
        route(
            "content-rewrite",
            Some(Method::POST),
            "/api/v1/content/rewrite",
        ),
        route(
            "member-add",
            Some(Method::POST),
            "/api/v1/orgs/{org}/members",
        ),
        route(
            "member-remove",
            Some(Method::DELETE),
            "/api/v1/orgs/{org}/members/{member}",
        ),
        route("openai-chat", Some(Method::POST), "/v1/chat/completions"),
        route("anthropic-messages", Some(Method::POST), "/v1/messages"),
        route("everything-else", None, "/{*rest}"),
    ];
    let router = Router::new(&eight, PathRules::default());
    // The same eight behind 1,000 routes of other services: what a large
    // config costs a request, against the eight alone in the same run.
    let others =
        (0..1000).map(|i| route(&format!("svc-{i}"), None, &format!("/svc{i}/items/{{id}}")));
    let thousand: Vec<Route> = others.chain(eight.iter().cloned()).collect();
    let large = Router::new(&thousand, PathRules::default());
    let mut group = c.benchmark_group("per request");
    group.bench_function("route: first of eight, behind 1,000 others", |b| {
        b.iter(|| black_box(large.find(&Method::POST, black_box("/api/v1/playbooks/pb_1/execute"))))
    });
    group.bench_function("route: catch-all, last of 1,008", |b| {
        b.iter(|| black_box(large.find(&Method::GET, black_box("/api/v2/reports/weekly"))))
    });
    group.bench_function("route: first of eight", |b| {
        b.iter(|| {
            black_box(router.find(&Method::POST, black_box("/api/v1/playbooks/pb_1/execute")))
        })
    });
    group.bench_function("route: catch-all, last", |b| {
        b.iter(|| black_box(router.find(&Method::GET, black_box("/api/v2/reports/weekly"))))
    });
    // What the fast path saves: a normalizer that always builds its result.
    group.bench_function("baseline: copy a typical path", |b| {
        b.iter(|| black_box(black_box("/api/v1/playbooks/pb_1/execute").to_string()))
    });
    group.bench_function("normalize a typical path", |b| {
        b.iter(|| {
            black_box(normalize(
                black_box("/api/v1/playbooks/pb_1/execute"),
                AmbiguousPaths::Reject,
            ))
        })
    });
    group.bench_function("normalize a path with escapes and dot segments", |b| {
        b.iter(|| {
            black_box(normalize(
                black_box("//api/v1/./x/../playbooks/pb_1/%65xecute"),
                AmbiguousPaths::Reject,
            ))
        })
    });
    let limits = Limits::UNLIMITED
        .with(Dimension::Tokens, 100_000)
        .with(Dimension::PlaybookRuns, 10);
    let current = Amounts::ZERO.with(Dimension::Tokens, 42_000);
    let cost = Amounts::ZERO
        .with(Dimension::Tokens, 10_000)
        .with(Dimension::PlaybookRuns, 1);
    group.bench_function("quota decision", |b| {
        b.iter(|| {
            black_box(decide(
                black_box(&limits),
                black_box(&current),
                black_box(&cost),
                Mode::Enforce,
            ))
        })
    });
    group.finish();
}

/// `count` keys, each `key-{i}`, of org `org_{i}`.
fn api_keys(count: usize) -> Vec<ApiKey> {
    (0..count)
        .map(|i| ApiKey {
            sha256: Sha256::digest(format!("key-{i}").as_bytes()).into(),
            org: OrgId::parse(&format!("org_{i}")).unwrap(),
            name: format!("key {i}"),
        })
        .collect()
}

fn key_source(keys: Vec<ApiKey>) -> Vec<IdentitySource> {
    vec![IdentitySource::ApiKey(ApiKeys {
        header: http::header::AUTHORIZATION,
        keys,
    })]
}

/// An identifier whose `count` keys are all runtime ones, in the catalog.
fn runtime_keys(count: usize) -> Identifier {
    let config = tollgate::Config::parse("", "bench.toml", &|_: &str| None).unwrap();
    let store = Arc::new(MemoryStore::new());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let catalog = Arc::new(Catalog::new(store.clone(), config.orgs));
    runtime.block_on(async {
        for (i, key) in api_keys(count).into_iter().enumerate() {
            let record = KeyRecord {
                id: format!("{i:032x}"),
                org: key.org,
                name: key.name,
                sha256: key.sha256,
                created_at: chrono::Utc::now(),
            };
            store.put_key(&record).await.unwrap();
        }
        catalog.refresh().await.unwrap();
    });
    Identifier::new(key_source(Vec::new())).with_catalog(catalog)
}

fn key_lookup(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert("authorization", "Bearer key-0".parse().unwrap());
    let mut group = c.benchmark_group("identify by API key");
    let cases = [
        ("1 configured key", Identifier::new(key_source(api_keys(1)))),
        (
            "100,000 configured keys",
            Identifier::new(key_source(api_keys(100_000))),
        ),
        ("100,000 runtime keys", runtime_keys(100_000)),
    ];
    for (name, identifier) in &cases {
        group.bench_function(*name, |b| {
            b.iter_batched_ref(
                || headers.clone(),
                |headers| black_box(identifier.identify(headers, None).unwrap()),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn metrics(c: &mut Criterion) {
    let metrics = Metrics::new();
    let route = metrics.route("chat");
    let upstream = metrics.upstream("openai");
    let mut group = c.benchmark_group("metrics per request");
    group.bench_function("count an outcome", |b| {
        b.iter(|| route.counted(black_box(Outcome::Forwarded)))
    });
    group.bench_function("observe a histogram", |b| {
        b.iter(|| upstream.observe(black_box(0.0042)))
    });
    group.bench_function("a metered request: outcome, tokens, two timings", |b| {
        b.iter(|| {
            let started = Instant::now();
            metrics.observe_store(StoreOp::Reserve, started.elapsed());
            let started = Instant::now();
            upstream.observe(started.elapsed().as_secs_f64());
            route.reserved(black_box(120));
            route.counted(Outcome::Forwarded);
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    estimation,
    stream_tap,
    routing_and_decision,
    key_lookup,
    metrics
);
criterion_main!(benches);
