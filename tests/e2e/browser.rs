//! The usage pages in a real headless chromium, driven over WebDriver by
//! chromedriver: login, the overview's numbers against the usage API, a
//! refresh without reload, sort and filter, an org's page, and the
//! customer's signed link. Each page's screenshot is saved under
//! target/ui-screenshots/.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::admin::ADMIN_TOKEN;
use crate::support::{Gateway, Upstream, fixed_clock, post};
use crate::usage_page::{LINK_SECRET, page_config};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver on a free port, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start() -> Driver {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "the browser test needs {CHROMIUM} and {CHROMEDRIVER}: install the Debian packages \
             chromium and chromium-driver (apt-get install chromium chromium-driver), or run scripts/test"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver did not start");
        Driver {
            child,
            port,
            _profile: tempfile::tempdir().unwrap(),
        }
    }

    async fn connect(&self) -> Client {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!(
            "--user-data-dir={}",
            self._profile.path().display()
        )])
        .collect::<Vec<_>>();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": CHROMIUM, "args": args}),
        );
        let url = format!("http://127.0.0.1:{}", self.port);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => return client,
                Err(error) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no WebDriver session: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn shot(browser: &Client, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = browser.screenshot().await.unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

async fn text(browser: &Client, css: &str) -> String {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn number(text: &str) -> i64 {
    text.replace(',', "")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {text:?}"))
}

/// Polls the page until `css`'s text is `expected`, within 15 s (the page
/// refreshes every 5).
async fn shows(browser: &Client, css: &str, expected: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = browser.find(Locator::Css(css)).await.ok();
        let seen = match now {
            Some(element) => element.text().await.unwrap_or_default(),
            None => String::new(),
        };
        if seen == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{css} shows {seen:?}, not {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn api_usage(gateway: &Gateway, org: &str) -> Value {
    reqwest::Client::new()
        .get(gateway.admin_url(&format!("/v1/orgs/{org}/usage")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_usage_pages_work_in_a_real_browser() {
    let driver = Driver::start();
    let upstream = Upstream::start().await;
    let gateway = Gateway::launch(&page_config(true), &upstream, &[], fixed_clock()).await;
    post(&gateway, "/api/v1/playbooks/p/execute", "org_custom").await;
    let browser = driver.connect().await;

    // Login through the form.
    browser.goto(&gateway.admin_url("/ui")).await.unwrap();
    assert!(
        browser
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/ui/login")
    );
    shot(&browser, "login").await;
    browser
        .find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(ADMIN_TOKEN)
        .await
        .unwrap();
    browser
        .find(Locator::Css("main button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait()
        .for_element(Locator::Id("orgs"))
        .await
        .unwrap();

    // The page's numbers are the usage API's.
    let row = "tr[data-org=org_custom] td[data-dim=playbook_runs]";
    let api = api_usage(&gateway, "org_custom").await;
    assert_eq!(
        number(&text(&browser, &format!("{row} .used")).await),
        api["usage"]["playbook_runs"]["used"].as_i64().unwrap()
    );
    assert_eq!(
        number(&text(&browser, &format!("{row} .limit")).await),
        api["usage"]["playbook_runs"]["limit"].as_i64().unwrap()
    );
    assert_eq!(
        number(&text(&browser, &format!("{row} .remaining")).await),
        api["usage"]["playbook_runs"]["remaining"].as_i64().unwrap()
    );

    // Closest to a limit first: org_custom (1 of 2 runs) before the rest.
    let first = browser.find(Locator::Css("#orgs tr")).await.unwrap();
    assert_eq!(
        first.attr("data-org").await.unwrap().as_deref(),
        Some("org_custom")
    );

    // A metered request shows without a reload, and the state says so.
    post(&gateway, "/api/v1/playbooks/p/execute", "org_custom").await;
    shows(&browser, &format!("{row} .used"), "2").await;
    shows(&browser, &format!("{row} .state"), "At limit").await;
    shot(&browser, "overview").await;

    // The filter box, as typed in.
    browser
        .find(Locator::Id("q"))
        .await
        .unwrap()
        .send_keys("shadow")
        .await
        .unwrap();
    let visible = browser
        .execute("return Array.from(document.querySelectorAll('#orgs tr')).filter(r => !r.hidden).map(r => r.dataset.org)", vec![])
        .await
        .unwrap();
    assert_eq!(visible, json!(["org_shadow"]));

    // An org's page.
    browser
        .goto(&gateway.admin_url("/ui/orgs/org_custom"))
        .await
        .unwrap();
    assert_eq!(
        text(&browser, "td[data-dim=playbook_runs] .used").await,
        "2"
    );
    assert!(text(&browser, "dl.policy").await.contains("past_due"));
    shot(&browser, "org").await;

    // The customer's page by a signed link: at the limit, the upgrade button.
    let link: Value = reqwest::Client::new()
        .post(gateway.admin_url("/v1/orgs/org_custom/usage-link"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = gateway.url(link["url"].as_str().unwrap());
    browser.goto(&url).await.unwrap();
    assert_eq!(
        text(&browser, "td[data-dim=playbook_runs] .used").await,
        "2"
    );
    let upgrade = browser.find(Locator::Css("#upgrade a")).await.unwrap();
    assert!(upgrade.is_displayed().await.unwrap());
    assert_eq!(
        upgrade.attr("href").await.unwrap().as_deref(),
        Some("https://example.com/billing")
    );
    shot(&browser, "customer").await;

    browser
        .goto(&url.replace("org_custom", "org_acme"))
        .await
        .unwrap();
    assert_eq!(text(&browser, "h1").await, "This link is not valid");
    shot(&browser, "refused").await;

    let expired = tollgate::usage_link::UsageLink {
        org: tollgate::org::OrgId::parse("org_custom").unwrap(),
        expires: (fixed_clock())().timestamp() - 1,
    }
    .query(&tollgate::usage_link::SigningKey::new(
        LINK_SECRET.as_bytes(),
    ));
    browser
        .goto(&gateway.url(&format!("/_tollgate/usage?{expired}")))
        .await
        .unwrap();
    assert_eq!(text(&browser, "h1").await, "This link has expired");

    browser.close().await.unwrap();
}
