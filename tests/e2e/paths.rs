//! The path and method the upstream runs are the ones that were metered:
//! a hostile client's encodings, dot segments, slashes, letter case,
//! trailing slashes and method overrides are charged or refused, never
//! forwarded uncharged to a metered handler.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use tollgate::quota::Dimension;

use crate::support::backends::{self, MeteredRoute};
use crate::support::{Gateway, Upstream, config_with, eventually, send_raw};

/// Has no playbook run left, as the tricks on the execute route are tried.
const NO_RUNS: &str = "org_no_runs";
/// Has nothing left of anything: whatever reaches the upstream was unmetered.
const NOTHING: &str = "org_nothing";
/// Has room for everything.
const ROOMY: &str = "org_roomy";

/// The tests' config with `server` added to `[server]`, a metered PUT route
/// (for method overrides) and the orgs above.
fn paths_config(server: &str) -> String {
    config_with(|config| {
        let config = config
            .replace(
                crate::support::UPSTREAM_TIMEOUT,
                &format!("{}\n{server}", crate::support::UPSTREAM_TIMEOUT),
            )
            .replace(
                "[[routes]]\nname = \"everything-else\"",
                "[[routes]]\nname = \"playbook-schedule\"\nmethod = \"PUT\"\n\
                 path = \"/api/v1/playbooks/{id}/schedule\"\nupstream = \"api\"\n\
                 cost = { playbook_runs = 1 }\n\n[[routes]]\nname = \"everything-else\"",
            );
        format!(
            "{config}\n[orgs.{NO_RUNS}]\nlimits = {{ playbook_runs = 0 }}\n\n\
             [orgs.{NOTHING}]\nlimits = {{ playbook_runs = 0, tokens = 0, seats = 0 }}\n\n\
             [orgs.{ROOMY}]\nplan = \"pro\"\n"
        )
    })
}

/// One request a hostile client might send.
#[derive(Clone, Debug)]
struct Trick {
    method: &'static str,
    target: String,
    override_method: Option<&'static str>,
}

impl Trick {
    fn post(target: &str) -> Trick {
        Trick {
            method: "POST",
            target: target.to_string(),
            override_method: None,
        }
    }

    async fn send(&self, gateway: &Gateway, org: &str) -> crate::support::RawAnswer {
        let mut headers = vec![("x-org-id", org)];
        if let Some(method) = self.override_method {
            headers.push(("x-http-method-override", method));
        }
        send_raw(gateway, self.method, &self.target, &headers).await
    }
}

/// Every trick seen to run the execute handler uncharged, with the answer
/// the gateway owes it at a limit of 0: 402 (charged) or 400 (refused).
fn execute_tricks() -> Vec<(Trick, u16, &'static str)> {
    let charged = |target: &str| (Trick::post(target), 402, "QUOTA_EXCEEDED");
    let ambiguous = |target: &str| (Trick::post(target), 400, "AMBIGUOUS_PATH");
    vec![
        ambiguous("/api/v1/playbooks/pb1%2Fexecute"),
        ambiguous("/api/v1/playbooks/pb1%2fexecute"),
        ambiguous("/api/v1/playbooks/pb1%5Cexecute"),
        ambiguous("/api/v1/playbooks/pb1\\execute"),
        ambiguous("/api/v1/playbooks/pb1/execute%00"),
        ambiguous("/api/v1/%2e/playbooks/pb1/execute"),
        ambiguous("/api/v1/x/%2e%2e/playbooks/pb1/execute"),
        ambiguous("/api/v1/x/.%2E/playbooks/pb1/execute"),
        (
            Trick::post("/api/v1/playbooks/pb1/execute%"),
            400,
            "INVALID_PATH",
        ),
        charged("/api/v1/playbooks/pb1/%65xecute"),
        charged("/api/v1/playbooks/pb1/execut%65"),
        charged("/%61pi/v1/playbooks/pb1/execute"),
        charged("/%41PI/v1/playbooks/pb1/execute"),
        charged("//api/v1/playbooks/pb1/execute"),
        charged("/api/v1//playbooks/pb1/execute"),
        charged("/api/v1/./playbooks/pb1/execute"),
        charged("/api/v1/x/../playbooks/pb1/execute"),
        charged("/api/v1/playbooks/pb1/execute/"),
        charged("/API/v1/playbooks/pb1/execute"),
        charged("/api/v1/playbooks/pb1/EXECUTE"),
        charged("/api/v1/playbooks/pb1/execute?next=/x/../y"),
        (
            Trick {
                override_method: Some("PUT"),
                ..Trick::post("/api/v1/playbooks/pb1/execute")
            },
            402,
            "QUOTA_EXCEEDED",
        ),
        (
            Trick {
                method: "post",
                ..Trick::post("/api/v1/playbooks/pb1/execute")
            },
            400,
            "INVALID_METHOD",
        ),
        (
            Trick {
                method: "Post",
                ..Trick::post("/api/v1/playbooks/pb1/execute")
            },
            400,
            "INVALID_METHOD",
        ),
    ]
}

fn code_of(body: &str) -> String {
    let envelope: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("not the gateway's envelope ({e}): {body}"));
    assert_eq!(envelope["success"], false, "{envelope}");
    envelope["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn every_trick_on_the_execute_route_is_charged_or_refused_and_none_reaches_the_upstream() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&paths_config(""), &upstream).await;

    for (trick, status, code) in execute_tricks() {
        let answer = trick.send(&gateway, NO_RUNS).await;
        assert_eq!(answer.status, status, "{trick:?}: {}", answer.body);
        assert_eq!(code_of(&answer.body), code, "{trick:?}");
    }

    assert_eq!(upstream.hits(), 0, "{:?}", upstream.seen());
    assert_eq!(gateway.used(NO_RUNS, Dimension::PlaybookRuns).await, 0);
}

#[tokio::test]
async fn a_metered_request_is_charged_once_and_forwarded_with_its_normal_path_and_its_query() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&paths_config(""), &upstream).await;

    let answer = Trick::post("//api/v1/x/../playbooks/./pb1/%65xecut%65?next=/a/../b&c=%2f")
        .send(&gateway, ROOMY)
        .await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(gateway.used(ROOMY, Dimension::PlaybookRuns).await, 1);
    let seen = upstream.seen();
    assert_eq!(
        seen[0].target,
        "/api/v1/playbooks/pb1/execute?next=/a/../b&c=%2f"
    );
}

#[tokio::test]
async fn an_unmetered_request_is_forwarded_with_its_normal_path_too() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&paths_config(""), &upstream).await;

    let answer = send_raw(&gateway, "GET", "/api//v1/./%72eports/x/../weekly%3f", &[]).await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(upstream.seen()[0].target, "/api/v1/reports/weekly%3F");
}

#[tokio::test]
async fn a_path_in_another_case_is_charged_and_refunded_when_a_case_sensitive_backend_answers_404()
{
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&paths_config(""), &upstream).await;

    let answer = send_raw(
        &gateway,
        "POST",
        "/API/v1/playbooks/pb1/Execute",
        &[("x-org-id", ROOMY), ("x-test-status", "404")],
    )
    .await;

    assert_eq!(answer.status, 404);
    assert_eq!(upstream.seen()[0].target, "/API/v1/playbooks/pb1/Execute");
    let refunds = || crate::support::count(&gateway.app, "tollgate_refunds_total", &[]);
    eventually("the reservation is refunded", async || refunds() == 1).await;
    gateway.settles_at(ROOMY, Dimension::PlaybookRuns, 0).await;
}

#[tokio::test]
async fn under_sensitive_path_case_a_path_in_another_case_is_not_the_metered_route() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&paths_config("path_case = \"sensitive\""), &upstream).await;

    let other_case = Trick::post("/API/v1/playbooks/pb1/execute")
        .send(&gateway, NO_RUNS)
        .await;
    let trailing_slash = Trick::post("/api/v1/playbooks/pb1/execute/")
        .send(&gateway, NO_RUNS)
        .await;

    assert_eq!(other_case.status, 200, "{}", other_case.body);
    assert_eq!(trailing_slash.status, 402, "{}", trailing_slash.body);
    assert_eq!(upstream.hits(), 1);
    assert_eq!(gateway.used(NO_RUNS, Dimension::PlaybookRuns).await, 0);
}

#[tokio::test]
async fn under_forward_an_encoded_slash_is_kept_for_the_upstream_and_metered_as_decoded() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&paths_config("ambiguous_paths = \"forward\""), &upstream).await;

    let denied = Trick::post("/api/v1/playbooks/pb1%2fexecute")
        .send(&gateway, NO_RUNS)
        .await;
    let charged = Trick::post("/api/v1/playbooks/pb1%2fexecute")
        .send(&gateway, ROOMY)
        .await;

    assert_eq!(denied.status, 402, "{}", denied.body);
    assert_eq!(charged.status, 200, "{}", charged.body);
    assert_eq!(gateway.used(ROOMY, Dimension::PlaybookRuns).await, 1);
    assert_eq!(upstream.seen()[0].target, "/api/v1/playbooks/pb1%2Fexecute");
}

#[tokio::test]
async fn method_override_headers_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&paths_config(""), &upstream).await;

    // A POST that the backend would run as the metered PUT.
    let answer = send_raw(
        &gateway,
        "POST",
        "/api/v1/playbooks/pb1/schedule",
        &[
            ("x-org-id", NO_RUNS),
            ("x-http-method-override", "PUT"),
            ("x-http-method", "PUT"),
            ("x-method-override", "PUT"),
        ],
    )
    .await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    let seen = &upstream.seen()[0];
    assert_eq!(seen.method, "POST");
    for name in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ] {
        assert!(seen.headers.get(name).is_none(), "{name} was forwarded");
    }
    assert_eq!(gateway.used(NO_RUNS, Dimension::PlaybookRuns).await, 0);
}

/// Metered paths with their parameters filled in, for tricks to be played on.
const METERED_PATHS: &[&str] = &[
    "/api/v1/playbooks/pb1/execute",
    "/api/v1/playbooks/pb1/schedule",
    "/api/v1/content/briefs/generate",
    "/api/v1/content/rewrite",
    "/api/v1/orgs/o1/members",
    "/v1/chat/completions",
];

/// `path` with each character or slash changed as `choices` say: most kept,
/// some escaped (either case of hex), upper-cased, doubled, or spelled as a
/// dot segment, an encoded slash or a backslash.
fn disguise(path: &str, choices: &[u8]) -> String {
    let mut out = String::new();
    for (i, c) in path.chars().enumerate() {
        match (c, choices[i % choices.len()]) {
            ('/', 0) => out.push_str("//"),
            ('/', 1) => out.push_str("/./"),
            ('/', 2) => out.push_str("/x/../"),
            ('/', 3) if i > 0 => out.push_str("%2F"),
            ('/', 4) => out.push_str("/%2e/"),
            ('/', 5) if i > 0 => out.push('\\'),
            (c, 6 | 7) if c != '/' => out.push_str(&format!("%{:02x}", u32::from(c))),
            (c, 8) if c != '/' => out.push_str(&format!("%{:02X}", u32::from(c))),
            (c, 9 | 10) => out.push(c.to_ascii_uppercase()),
            (c, _) => out.push(c),
        }
    }
    out
}

fn generated_tricks(count: usize) -> Vec<Trick> {
    let strategy = (
        prop::sample::select(METERED_PATHS),
        prop::collection::vec(0u8..30, 1..40),
        prop::sample::select(&["", "/", "/.", "//", "/x/.."][..]),
        prop::sample::select(&["POST", "PUT", "GET", "post", "Put"][..]),
        prop::sample::select(&[None, Some("PUT"), Some("POST"), Some("GET")][..]),
    )
        .prop_map(|(path, choices, tail, method, override_method)| Trick {
            method,
            target: format!("{}{tail}", disguise(path, &choices)),
            override_method,
        });
    let mut runner = TestRunner::deterministic();
    (0..count)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

/// Whether a path the upstream got is in normal form: no repeated slash,
/// no dot segment, no escaped unreserved character, escapes in upper case.
fn is_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    let escapes_normal = (0..bytes.len()).filter(|&i| bytes[i] == b'%').all(|i| {
        let hex = &path[i + 1..i + 3];
        let value = u8::from_str_radix(hex, 16).unwrap_or(b'a');
        hex == hex.to_ascii_uppercase()
            && !(value.is_ascii_alphanumeric() || b"-._~".contains(&value))
    });
    escapes_normal && !path.contains("//") && !path.split('/').any(|s| s == "." || s == "..")
}

#[tokio::test]
async fn no_request_the_upstream_gets_uncharged_runs_a_metered_handler_on_any_common_backend() {
    let config = paths_config("");
    let metered: Vec<MeteredRoute> = backends::metered_routes(&config);
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config, &upstream).await;
    let mut tricks: Vec<Trick> = execute_tricks().into_iter().map(|(t, ..)| t).collect();
    tricks.extend(generated_tricks(400));

    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for trick in &tricks {
        let answer = trick.send(&gateway, NOTHING).await;
        *statuses.entry(answer.status).or_default() += 1;
    }

    // The org can afford nothing, so all that the upstream got was unmetered.
    for dimension in [Dimension::PlaybookRuns, Dimension::Tokens, Dimension::Seats] {
        assert_eq!(gateway.used(NOTHING, dimension).await, 0, "{dimension}");
    }
    let seen = upstream.seen();
    for request in &seen {
        let path = request.target.split('?').next().unwrap_or_default();
        assert!(is_normal(path), "the upstream got {}", request.target);
        for reading in backends::readings(request) {
            let runs = backends::runs_metered(&reading, &metered);
            assert!(
                runs.is_none(),
                "{} {} reached the upstream uncharged, and {} runs it as {runs:?}",
                request.method,
                request.target,
                reading.backend,
            );
        }
    }
    // Not a vacuous pass: tricks were charged, refused and forwarded.
    for status in [200, 400, 402] {
        assert!(statuses.get(&status) > Some(&10), "{statuses:?}");
    }
    assert_eq!(seen.len(), statuses[&200]);
}
