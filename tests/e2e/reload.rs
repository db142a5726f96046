//! Reload: a new config file applies to new requests, in-flight requests
//! finish on the one they began with, counters stay, and a broken file
//! changes nothing.

use std::path::PathBuf;

use reqwest::Method;
use serde_json::json;
use tempfile::TempDir;
use tollgate::quota::Dimension;

use crate::admin::{ADMIN_TOKEN, Backing, admin, admin_section};
use crate::support::{
    Gateway, KEY_ACME, Upstream, client, config_with, count, envelope, fixed_clock, run_clock,
};

/// A config file a gateway runs on, rewritten by the test.
pub struct ConfigFile {
    _dir: TempDir,
    pub path: PathBuf,
}

impl ConfigFile {
    /// The shared test config with `[admin]` on `backing`, with the
    /// upstream's address written in (a reload reads the file with the
    /// process's environment, which has no `${UPSTREAM}`).
    pub fn new(backing: &Backing, upstream: &Upstream) -> ConfigFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.toml");
        let file = ConfigFile { _dir: dir, path };
        file.write(&base(backing, upstream));
        file
    }

    pub fn write(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }
}

pub fn base(backing: &Backing, upstream: &Upstream) -> String {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = dead.local_addr().unwrap().to_string();
    backing.config(config_with(|c| {
        (c + &admin_section())
            .replace("${UPSTREAM}", &upstream.addr.to_string())
            .replace("${DEAD_UPSTREAM}", &dead)
    }))
}

pub async fn launch(backing: &Backing, file: &ConfigFile) -> Gateway {
    let clock = match backing {
        Backing::Memory => fixed_clock(),
        Backing::Redis(_) => run_clock(),
    };
    Gateway::launch_file(&file.path, clock).await
}

pub async fn reload(gateway: &Gateway) -> reqwest::Response {
    admin(Method::POST, gateway, "/v1/reload")
        .send()
        .await
        .unwrap()
}

async fn post(gateway: &Gateway, path: &str) -> u16 {
    client()
        .post(gateway.url(path))
        .bearer_auth(KEY_ACME)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A metered route on `/reports`, before the catch-all.
fn with_reports_route(config: &str) -> String {
    config.replace(
        "[[routes]]\nname = \"everything-else\"",
        "[[routes]]\nname = \"reports\"\nmethod = \"POST\"\npath = \"/reports\"\nupstream = \"api\"\ncost = { playbook_runs = 1 }\n\n\
         [[routes]]\nname = \"everything-else\"",
    )
}

#[tokio::test]
async fn a_reload_adds_a_route_and_lowers_a_limit_and_keeps_the_counters() {
    let upstream = Upstream::start().await;
    for backing in Backing::both().await {
        let file = ConfigFile::new(&backing, &upstream);
        let gateway = launch(&backing, &file).await;
        let name = backing.name();
        // Before: /reports is the unmetered catch-all's.
        assert_eq!(post(&gateway, "/reports").await, 200, "{name}");
        assert_eq!(gateway.used("org_acme", Dimension::PlaybookRuns).await, 0);
        assert_eq!(post(&gateway, "/api/v1/playbooks/p/execute").await, 200);

        let next = with_reports_route(&base(&backing, &upstream)).replace(
            "[plans.free]\ntokens = 100000\nplaybook_runs = 10",
            "[plans.free]\ntokens = 100000\nplaybook_runs = 3",
        );
        file.write(&next);
        let answer = reload(&gateway).await;
        assert_eq!(answer.status(), 200, "{name}");
        assert_eq!(
            answer.json::<serde_json::Value>().await.unwrap(),
            json!({"reloaded": true, "restartRequired": []})
        );

        let reloads = count(
            &gateway.app,
            "tollgate_config_reloads_total",
            &[("result", "ok")],
        );
        assert_eq!(reloads, 1, "{name}");
        // The counter survived, the new route is metered, the new limit holds.
        assert_eq!(
            gateway.used("org_acme", Dimension::PlaybookRuns).await,
            1,
            "{name}"
        );
        assert_eq!(post(&gateway, "/reports").await, 200, "{name}");
        assert_eq!(post(&gateway, "/reports").await, 200, "{name}");
        assert_eq!(post(&gateway, "/reports").await, 402, "{name}");
        assert_eq!(
            gateway.used("org_acme", Dimension::PlaybookRuns).await,
            3,
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_broken_file_keeps_the_running_config_and_answers_every_problem() {
    let upstream = Upstream::start().await;
    let backing = Backing::Memory;
    let file = ConfigFile::new(&backing, &upstream);
    let gateway = launch(&backing, &file).await;
    let broken = base(&backing, &upstream)
        .replace("playbook_runs = 10", "playbook_runs = -10")
        .replace(
            crate::support::UPSTREAM_TIMEOUT,
            "upstream_timeout = \"soon\"",
        );
    file.write(&broken);

    let answer = envelope(reload(&gateway).await, 422, "CONFIG_INVALID").await;
    let errors: Vec<String> = answer["error"]["details"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    let at = file.path.display().to_string();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with(&format!(
            "{at}:5: server.upstream_timeout: \"soon\" is not a duration"
        )),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("plans.free.playbook_runs: a limit cannot be negative"),
        "{errors:?}"
    );

    let reloads = |result| {
        count(
            &gateway.app,
            "tollgate_config_reloads_total",
            &[("result", result)],
        )
    };
    assert_eq!((reloads("ok"), reloads("error")), (0, 1));
    // The running config is untouched: the free plan still allows 10 runs.
    for _ in 0..10 {
        assert_eq!(post(&gateway, "/api/v1/playbooks/p/execute").await, 200);
    }
    assert_eq!(post(&gateway, "/api/v1/playbooks/p/execute").await, 402);
    assert_eq!(gateway.used("org_acme", Dimension::PlaybookRuns).await, 10);
}

#[tokio::test]
async fn a_changed_listen_address_is_named_as_needing_a_restart() {
    let upstream = Upstream::start().await;
    let backing = Backing::Memory;
    let file = ConfigFile::new(&backing, &upstream);
    let gateway = launch(&backing, &file).await;
    let moved = base(&backing, &upstream)
        .replace(
            "listen = \"127.0.0.1:0\"\nmax_body",
            "listen = \"127.0.0.1:1\"\nmax_body",
        )
        .replace(
            "backend = \"memory\"",
            "backend = \"redis\"\nurl = \"redis://127.0.0.1:1\"",
        );
    file.write(&moved);
    let answer = reload(&gateway).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.json::<serde_json::Value>().await.unwrap(),
        json!({"reloaded": true, "restartRequired": ["server.listen", "store.backend"]})
    );
    assert_eq!(gateway.app.config().server.listen.port(), 0);
    assert_eq!(post(&gateway, "/api/v1/playbooks/p/execute").await, 200);
    assert_eq!(gateway.used("org_acme", Dimension::PlaybookRuns).await, 1);
}

#[tokio::test]
async fn a_request_in_flight_finishes_on_the_config_it_began_with() {
    let upstream = Upstream::start().await;
    let backing = Backing::Memory;
    let file = ConfigFile::new(&backing, &upstream);
    let gateway = launch(&backing, &file).await;
    let held = tokio::spawn({
        let url = gateway.url("/api/v1/content/briefs/generate");
        async move {
            let response = client()
                .post(url)
                .bearer_auth(KEY_ACME)
                .header("x-test-hold", "1")
                .header("x-test-status", "500")
                .send()
                .await
                .unwrap();
            response.status().as_u16()
        }
    });
    upstream.wait_for_arrivals(1).await;
    assert_eq!(gateway.used("org_acme", Dimension::Tokens).await, 10000);
    // The new config refunds briefs only on a 502 and prices them at 1
    // token; the held request keeps the rules it began with.
    file.write(&base(&backing, &upstream).replace(
        "cost = { tokens = 10000 }",
        "cost = { tokens = 1 }\nrefund_statuses = [502]",
    ));
    assert_eq!(reload(&gateway).await.status(), 200);
    upstream.release();
    assert_eq!(held.await.unwrap(), 500);
    // Refunded, as the route it began on said of a 500.
    gateway.settles_at("org_acme", Dimension::Tokens, 0).await;
    // A new request runs on the new route: 1 token, and a 500 stands.
    let failed = client()
        .post(gateway.url("/api/v1/content/briefs/generate"))
        .bearer_auth(KEY_ACME)
        .header("x-test-status", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    gateway.settles_at("org_acme", Dimension::Tokens, 1).await;
}

#[tokio::test]
async fn a_gateway_started_without_a_file_says_there_is_nothing_to_reload() {
    let upstream = Upstream::start().await;
    let gateway = Backing::Memory.gateway(&upstream).await;
    let response = client()
        .post(gateway.admin_url("/v1/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    envelope(response, 409, "RELOAD_UNAVAILABLE").await;
}

/// A route `/load` costing 1 token, for org_acme allowed a billion.
fn with_load_route(config: &str) -> String {
    config.replace(
        "[[routes]]\nname = \"everything-else\"",
        "[[routes]]\nname = \"load\"\nmethod = \"GET\"\npath = \"/load\"\nupstream = \"api\"\ncost = { tokens = 1 }\n\n\
         [[routes]]\nname = \"everything-else\"",
    ) + "\n[orgs.org_acme]\nplan = \"free\"\nlimits = { tokens = 1000000000 }\n"
}

#[tokio::test]
async fn reloads_under_load_fail_no_request_and_take_effect() {
    let upstream = Upstream::start().await;
    for backing in Backing::both().await {
        let name = backing.name();
        let config = with_load_route(&base(&backing, &upstream));
        let file = ConfigFile::new(&backing, &upstream);
        file.write(&config);
        let gateway = launch(&backing, &file).await;
        let load_hits = || upstream.seen().iter().filter(|s| s.path == "/load").count();
        let before = load_hits();
        let wrk = std::process::Command::new("wrk")
            .args(["-t1", "-c8", "-d3s", "-H"])
            .arg(format!("authorization: Bearer {KEY_ACME}"))
            .arg(gateway.url("/load"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("wrk is not installed: scripts/test installs it");
        crate::support::eventually("the load is running", async || load_hits() > before + 200)
            .await;

        file.write(&with_reports_route(&config));
        assert_eq!(reload(&gateway).await.status(), 200, "{name}");
        let lowered =
            with_reports_route(&config).replace("playbook_runs = 10", "playbook_runs = 1");
        file.write(&lowered);
        assert_eq!(reload(&gateway).await.status(), 200, "{name}");
        file.write("[server]\nworkers = 0\n");
        envelope(reload(&gateway).await, 422, "CONFIG_INVALID").await;

        let output = tokio::task::spawn_blocking(move || wrk.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{report}");
        assert!(report.contains("requests in"), "{report}");
        assert!(!report.contains("Non-2xx"), "{name}: {report}");
        assert!(!report.contains("Socket errors"), "{name}: {report}");

        // The lowered limit and the new route hold; the broken file changed neither.
        let runs = async |org: &str| {
            client()
                .post(gateway.url("/reports"))
                .header("x-org-id", org)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        };
        let org = format!("org_after_load_{name}");
        assert_eq!(runs(&org).await, 200, "{name}");
        assert_eq!(runs(&org).await, 402, "{name}");
        assert_eq!(gateway.used(&org, Dimension::PlaybookRuns).await, 1);
        // Every request that reached the upstream was charged once; when
        // wrk stops, each of its 8 connections may leave one request that
        // was charged and cut before the upstream answered (its charge
        // stands, as for any client that leaves mid-request).
        let charged = gateway.used("org_acme", Dimension::Tokens).await;
        let reached = (load_hits() - before) as i64;
        assert!(
            (reached..=reached + 8).contains(&charged),
            "{name}: {charged} charged for {reached} forwarded"
        );
    }
}
