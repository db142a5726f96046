//! The `tollgate` binary: `check`, `demo`, `health`, and `run` stopped by
//! SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::admin::Backing;
use crate::support::{Upstream, within};

/// The stdout of a run that must have succeeded; its output if not.
pub fn succeeded(output: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

/// Sets the variables the example and reference configs read.
fn with_secrets(command: &mut Command) -> &mut Command {
    command
        .env("OPENAI_API_KEY", "sk-test")
        .env("ANTHROPIC_API_KEY", "sk-ant-test")
        .env("SUPABASE_JWT_SECRET", "a-supabase-style-jwt-secret")
        .env(
            "USAGE_LINK_SECRET",
            "a-usage-link-secret-of-32-bytes-or-more",
        )
}

#[test]
fn check_accepts_the_example_config() {
    let output = with_secrets(tollgate().args(["check", "--config", "config/example.toml"]))
        .output()
        .unwrap();
    let stdout = succeeded(&output);
    assert!(stdout.contains("config/example.toml: ok"), "{stdout}");
}

#[test]
fn check_accepts_the_reference_interface_once_its_placeholder_key_is_real() {
    let reference = std::fs::read_to_string("config/reference.toml").unwrap();
    assert!(
        reference.contains(r#"sha256 = "9f2c...""#),
        "the placeholder this test replaces is gone"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("reference.toml");
    let real = reference
        .replace("9f2c...", &"ab".repeat(32))
        .replace("4b1e...", &"cd".repeat(32));
    std::fs::write(&file, real).unwrap();

    let output = with_secrets(tollgate().arg("check").arg("--config").arg(&file))
        .output()
        .unwrap();

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn check_reports_every_problem_with_its_line_and_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    std::fs::write(
        &file,
        r#"[server]
listen = "nowhere"
upstream_timeout = "soon"
workers = 0

[store]
backend = "redis"

[upstreams.api]
url = "http://127.0.0.1:3001"
headers = { authorization = "Bearer ${TOLLGATE_TEST_UNSET_VARIABLE}" }

[[routes]]
name = "a"
path = "/a"
upstream = "apii"

[[routes]]
name = "a"
path = "no-slash"
upstream = "api"
cost = { tokenz = 5, seats = "many" }

[plans.free]
tokens = -1

[orgs.org_x]
plan = "gold"
period_anchor_day = 32
"#,
    )
    .unwrap();

    let output = tollgate()
        .arg("check")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let path = file.display();
    for expected in [
        format!("{path}:2: server.listen: \"nowhere\" is not an address"),
        format!("{path}:3: server.upstream_timeout: \"soon\" is not a duration"),
        format!("{path}:4: server.workers: must be between 1 and 1024 (got 0)"),
        format!("{path}:6: store.url: backend = \"redis\" needs `url` or a non-empty `cluster`"),
        format!(
            "{path}:11: upstreams.api.headers.authorization: environment variable TOLLGATE_TEST_UNSET_VARIABLE is not set"
        ),
        format!("{path}:16: routes[0].upstream: no upstream is named \"apii\""),
        format!("{path}:19: routes[1].name: the route name \"a\" is used twice"),
        format!("{path}:20: routes[1].path: \"no-slash\" must start with '/'"),
        format!("{path}:22: routes[1].cost.seats: \"many\": use a whole number"),
        format!("{path}:22: routes[1].cost.tokenz: unknown quota dimension \"tokenz\""),
        format!("{path}:25: plans.free.tokens: a limit cannot be negative (got -1)"),
        format!("{path}:28: orgs.org_x.plan: no plan is named \"gold\""),
        format!("{path}:29: orgs.org_x.period_anchor_day: 32 is not a day of the month"),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn check_reports_an_org_header_without_trusted_peers_and_a_malformed_peer() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, text: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let output = tollgate()
            .arg("check")
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        (file, String::from_utf8_lossy(&output.stderr).into_owned())
    };

    let (file, stderr) = check(
        "untrusted.toml",
        "[identity]\nsources = [\"header\"]\n\n[identity.header]\nname = \"x-org-id\"\n",
    );
    let expected = format!(
        "{}:4: identity.header.trusted_peers: missing: list the auth layer's addresses",
        file.display()
    );
    assert!(
        stderr.contains(&expected),
        "missing {expected:?} in:\n{stderr}"
    );

    let (file, stderr) = check(
        "malformed.toml",
        "[identity.header]\nname = \"x-org-id\"\ntrusted_peers = [\"10.0.0.0/8\", \"10.0.0/33\"]\n",
    );
    let expected = format!(
        "{}:3: identity.header.trusted_peers[1]: \"10.0.0/33\" is not an IP address or a CIDR",
        file.display()
    );
    assert!(
        stderr.contains(&expected),
        "missing {expected:?} in:\n{stderr}"
    );
}

#[test]
fn check_rejects_an_unknown_key_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:1\"\nmax_body_byte = 5\n",
    )
    .unwrap();

    let output = tollgate()
        .arg("check")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:3: server.max_body_byte: unknown field `max_body_byte`",
            file.display()
        )),
        "{stderr}"
    );
}

#[test]
fn check_reports_an_unknown_key_an_unknown_upstream_a_negative_limit_an_unreachable_route_and_a_colon_param_at_once()
 {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mixed.toml");
    std::fs::write(
        &file,
        r#"[server]
listen = "127.0.0.1:1"
max_body_byte = 5

[upstreams.api]
url = "http://127.0.0.1:3001"

[[routes]]
name = "users"
path = "/users/:id"
upstream = "api"

[[routes]]
name = "everything"
path = "/{*rest}"
upstream = "ap"

[[routes]]
name = "health"
method = "GET"
path = "/healthz"
upstream = "api"

[plans.free]
tokens = -1

[defaults]
plan = "free"
"#,
    )
    .unwrap();

    let output = tollgate()
        .arg("check")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let path = file.display();
    let expected = [
        format!(
            "{path}:3: server.max_body_byte: unknown field `max_body_byte`; did you mean `max_body_bytes`?"
        ),
        format!(
            "{path}:10: routes[0].path: \"/users/:id\" has an express-style `:name` parameter, which would only match that text literally; write \"/users/{{id}}\""
        ),
        format!("{path}:16: routes[1].upstream: no upstream is named \"ap\" under [upstreams]"),
        format!(
            "{path}:21: routes[2].path: route \"health\" can never match: route \"everything\" (routes[1]) comes first and takes every request it could"
        ),
        format!("{path}:25: plans.free.tokens: a limit cannot be negative (got -1)"),
    ];
    for line in &expected {
        assert!(
            stderr.lines().any(|l| l.ends_with(line.as_str())),
            "missing {line:?} in:\n{stderr}"
        );
    }
    assert_eq!(stderr.lines().count(), expected.len(), "{stderr}");
}

#[test]
fn the_demo_shows_requests_passing_and_then_a_402() {
    let output = tollgate()
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--exit-after-tour")
        .output()
        .unwrap();

    let stdout = succeeded(&output);
    assert_eq!(stdout.matches("-> 200 OK").count(), 3, "{stdout}");
    assert!(
        stdout.contains("run 4: POST /api/v1/playbooks/pb_1/execute -> 402 Payment Required"),
        "{stdout}"
    );
    assert!(stdout.contains("\"code\": \"QUOTA_EXCEEDED\""), "{stdout}");
    assert!(
        stdout.contains("admin listener on http://127.0.0.1:"),
        "{stdout}"
    );
}

/// `tollgate health --url URL`, run to its exit.
async fn health(url: String) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["health", "--timeout", "5s", "--url", &url])
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn health_exits_zero_when_the_admin_listener_answers_200() {
    let upstream = Upstream::start().await;
    let gateway = Backing::Memory.gateway(&upstream).await;

    let output = health(gateway.admin_url("/healthz")).await;

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn health_fails_on_an_answer_other_than_200() {
    let upstream = Upstream::start().await;
    let gateway = Backing::Memory.gateway(&upstream).await;

    let output = health(gateway.admin_url("/no-such-endpoint")).await;

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("answered 404 Not Found, not 200"),
        "{stderr}"
    );
}

#[tokio::test]
async fn health_fails_when_nothing_listens() {
    // A port that was free a moment ago, with its listener closed.
    let port = crate::support::free_port();

    let output = health(format!("http://127.0.0.1:{port}/healthz")).await;

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot connect to 127.0.0.1:"), "{stderr}");
}

#[tokio::test]
async fn health_fails_at_its_timeout_when_the_listener_never_answers() {
    // Accepted by the kernel's backlog, never read: the probe must give up.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/healthz", silent.local_addr().unwrap());

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["health", "--timeout", "200ms", "--url", &url])
        .output()
        .await
        .unwrap();

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no answer within 200ms"), "{stderr}");
    drop(silent);
}

#[tokio::test]
async fn run_stops_cleanly_on_sigterm() {
    let port = crate::support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[upstreams.api]\nurl = \"http://127.0.0.1:9\"\n[[routes]]\nname = \"all\"\npath = \"/{{*rest}}\"\nupstream = \"api\"\n"
        ),
    )
    .unwrap();
    let child = tollgate()
        .arg("run")
        .arg("--config")
        .arg(&file)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    crate::support::eventually("the gateway listens", async || {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let status = terminate(child).await;

    assert!(status.success(), "exit status {status}");
}

/// Sends the gateway SIGTERM and waits for it to exit.
async fn terminate(mut child: std::process::Child) -> std::process::ExitStatus {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    within(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .unwrap()
    .unwrap()
}

#[tokio::test]
async fn sighup_reloads_the_file_and_a_broken_one_leaves_the_gateway_running() {
    let port = crate::support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.toml");
    let config = |routes: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[upstreams.api]\nurl = \"http://127.0.0.1:9\"\n{routes}"
        )
    };
    let route = |name: &str| {
        format!("[[routes]]\nname = \"{name}\"\npath = \"/{name}/{{*rest}}\"\nupstream = \"api\"\n")
    };
    std::fs::write(&file, config(&route("a"))).unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = tollgate()
        .arg("run")
        .arg("--config")
        .arg(&file)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status_of = async |path: &str| {
        reqwest::get(format!("http://127.0.0.1:{port}{path}"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    crate::support::eventually("the gateway listens", async || {
        status_of("/b/x").await == 404
    })
    .await;
    let hangup = |pid: u32| {
        let sent = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };

    // A second route: /b/ now reaches the (dead) upstream, a 502, not a 404.
    std::fs::write(&file, config(&(route("a") + &route("b")))).unwrap();
    hangup(child.id());
    crate::support::eventually("the new route serves", async || {
        status_of("/b/x").await == 502
    })
    .await;

    std::fs::write(&file, config("[[routes]]\nname = 5\n")).unwrap();
    hangup(child.id());
    let logged = || std::fs::read_to_string(&log).unwrap();
    crate::support::eventually("the broken file is reported", async || {
        logged().contains("config not reloaded")
    })
    .await;
    assert!(logged().contains("routes[0].name"), "{}", logged());
    assert_eq!(child.try_wait().unwrap(), None, "SIGHUP ended the process");
    assert_eq!(status_of("/b/x").await, 502);

    let status = terminate(child).await;
    assert!(status.success(), "{status:?}");
}

/// The JSON-array commands on the lines of `text` that start with `prefix`.
fn commands(text: &str, prefix: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix(prefix))
        .map(|array| serde_json::from_str(array).unwrap_or_else(|e| panic!("{array}: {e}")))
        .collect()
}

#[test]
fn the_container_files_run_commands_the_binary_accepts() {
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    let compose = std::fs::read_to_string("compose.yaml").unwrap();
    let mut all = commands(&dockerfile, "CMD ");
    all.extend(commands(&compose, "command: "));
    // The image's entrypoint is the binary; the health check names it.
    for command in &mut all {
        if command.first().map(String::as_str) == Some("tollgate") {
            command.remove(0);
        }
    }
    assert_eq!(all.len(), 5, "{all:?}");

    for command in all.iter().filter(|c| c[0] != "redis-server") {
        let output = tollgate().args(command).arg("--help").output().unwrap();
        assert!(
            output.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_container_builds_on_the_projects_toolchain() {
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    let rust_version = env!("CARGO_PKG_RUST_VERSION");
    assert!(
        dockerfile.contains(&format!("FROM rust:{rust_version}-slim-bookworm AS build")),
        "the builder stage is not rust {rust_version}"
    );
}

#[test]
fn check_accepts_the_compose_config() {
    let output = tollgate()
        .args(["check", "--config", "config/compose.toml"])
        .env("TOLLGATE_REDIS_URL", "redis://redis:6379")
        .env("TOLLGATE_DEMO_UPSTREAM", "backend:3001")
        .output()
        .unwrap();
    let stdout = succeeded(&output);
    assert!(stdout.contains("store redis"), "{stdout}");
}
