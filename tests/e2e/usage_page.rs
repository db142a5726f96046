//! The usage pages over HTTP: the admin pages' login and session, the
//! signed customer link, and their security headers.

use serde_json::Value;

use crate::admin::{ADMIN_TOKEN, admin_section};
use crate::support::{Gateway, Upstream, config_with, envelope, fixed_clock, post};

pub const LINK_SECRET: &str = "a-usage-link-secret-of-32-bytes-or-more";

/// The shared config without its catch-all route (which would match the
/// page's path), with `[admin]` and, when `page`, `[usage_page]`.
pub fn page_config(page: bool) -> String {
    config_with(|c| {
        let c = c.replace(
            "[[routes]]\nname = \"everything-else\"\npath = \"/{*rest}\"\nupstream = \"api\"\n",
            "",
        );
        let page = if page {
            format!(
                "\n[usage_page]\npath = \"/_tollgate/usage\"\nsecret = \"{LINK_SECRET}\"\nupgrade_url = \"https://example.com/billing\"\n"
            )
        } else {
            String::new()
        };
        c + &admin_section() + &page
    })
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs in through the form; the session cookie's `name=value`.
pub async fn login(gateway: &Gateway) -> String {
    let answer = no_redirects()
        .post(gateway.admin_url("/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 303);
    assert_eq!(answer.headers()["location"], "/ui");
    let cookie = answer.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly; SameSite=Strict; Path=/"),
        "{cookie}"
    );
    assert!(!cookie.contains(ADMIN_TOKEN));
    cookie.split(';').next().unwrap().to_string()
}

fn assert_secure(headers: &reqwest::header::HeaderMap) {
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("default-src 'none'; script-src 'sha256-"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("connect-src 'self'"));
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["referrer-policy"], "no-referrer");
}

async fn link(gateway: &Gateway, org: &str, body: &str) -> reqwest::Response {
    no_redirects()
        .post(gateway.admin_url(&format!("/v1/orgs/{org}/usage-link")))
        .bearer_auth(ADMIN_TOKEN)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn link_url(gateway: &Gateway, org: &str) -> String {
    let answer = link(gateway, org, "").await;
    assert_eq!(answer.status(), 201);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["org"], org);
    body["url"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn the_pages_need_a_session_and_a_wrong_token_gets_the_login_page_again() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::launch(&page_config(true), &upstream, &[], fixed_clock()).await;
    let client = no_redirects();

    let answer = client.get(gateway.admin_url("/ui")).send().await.unwrap();
    assert_eq!(answer.status(), 303);
    assert_eq!(answer.headers()["location"], "/ui/login");

    let wrong = client
        .post(gateway.admin_url("/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    assert_secure(wrong.headers());
    assert!(
        wrong
            .text()
            .await
            .unwrap()
            .contains("not one of the admin tokens")
    );

    let cookie = login(&gateway).await;
    let page = client
        .get(gateway.admin_url("/ui"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_secure(page.headers());
    let html = page.text().await.unwrap();
    assert!(html.contains("org_custom") && html.contains("<html lang=\"en\">"));

    let missing = client
        .get(gateway.admin_url("/ui/orgs/org_nobody"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn the_session_reads_the_json_api_but_changes_nothing() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::launch(&page_config(true), &upstream, &[], fixed_clock()).await;
    let cookie = login(&gateway).await;
    let client = no_redirects();

    let usage = client
        .get(gateway.admin_url("/v1/usage"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(usage.status(), 200);
    let body: Value = usage.json().await.unwrap();
    let orgs = body["orgs"].as_array().unwrap();
    assert!(
        orgs.iter()
            .any(|o| o["org"] == "org_custom" && o["usage"]["playbook_runs"]["limit"] == 2)
    );

    let put = client
        .put(gateway.admin_url("/v1/orgs/org_custom/usage/tokens"))
        .header("cookie", &cookie)
        .body(r#"{"used": 5}"#)
        .send()
        .await
        .unwrap();
    envelope(put, 401, "UNAUTHORIZED").await;
    let forged = client
        .get(gateway.admin_url("/v1/usage"))
        .header("cookie", "tollgate_ui=6f7073.99999999999.00")
        .send()
        .await
        .unwrap();
    envelope(forged, 401, "UNAUTHORIZED").await;
}

#[tokio::test]
async fn a_signed_link_shows_its_org_and_an_altered_or_expired_one_is_refused() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::launch(&page_config(true), &upstream, &[], fixed_clock()).await;
    assert_eq!(
        post(&gateway, "/api/v1/playbooks/p/execute", "org_custom")
            .await
            .status(),
        200
    );
    assert_eq!(
        gateway
            .used("org_custom", tollgate::quota::Dimension::PlaybookRuns)
            .await,
        1
    );

    let url = link_url(&gateway, "org_custom").await;
    assert!(
        url.starts_with("/_tollgate/usage?org=org_custom&expires="),
        "{url}"
    );
    let page = reqwest::get(gateway.url(&url)).await.unwrap();
    assert_eq!(page.status(), 200);
    assert_secure(page.headers());
    let html = page.text().await.unwrap();
    assert!(
        html.contains("<span class=\"used\">1</span> of <span class=\"limit\">2</span>"),
        "{html}"
    );

    let data: Value = reqwest::get(gateway.url(&format!("{url}&format=json")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(data["usage"]["playbook_runs"]["used"], 1);
    assert!(data.get("plan").is_none());

    let altered = reqwest::get(gateway.url(&url.replace("org_custom", "org_acme")))
        .await
        .unwrap();
    assert_eq!(altered.status(), 403);
    assert_secure(altered.headers());
    assert!(
        altered
            .text()
            .await
            .unwrap()
            .contains("This link is not valid")
    );
    let altered_json =
        reqwest::get(gateway.url(&format!("{}&format=json", url.replace("sig=", "sig=0"))))
            .await
            .unwrap();
    envelope(altered_json, 403, "LINK_INVALID").await;

    // Another org's signature does not open this org.
    let other = link_url(&gateway, "org_acme").await;
    let sig = other.split("sig=").nth(1).unwrap();
    let expires = url
        .split("expires=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let other_expires = other
        .split("expires=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    assert_eq!(expires, other_expires);
    let forged = format!("/_tollgate/usage?org=org_custom&expires={expires}&sig={sig}");
    assert_eq!(
        reqwest::get(gateway.url(&forged)).await.unwrap().status(),
        403
    );

    // Signed by the gateway's secret, but expired by the gateway's clock.
    let now = (fixed_clock())().timestamp();
    let expired = tollgate::usage_link::UsageLink {
        org: tollgate::org::OrgId::parse("org_custom").unwrap(),
        expires: now - 1,
    }
    .query(&tollgate::usage_link::SigningKey::new(
        LINK_SECRET.as_bytes(),
    ));
    let page = reqwest::get(gateway.url(&format!("/_tollgate/usage?{expired}")))
        .await
        .unwrap();
    assert_eq!(page.status(), 403);
    assert!(page.text().await.unwrap().contains("This link has expired"));
    let json = reqwest::get(gateway.url(&format!("/_tollgate/usage?{expired}&format=json")))
        .await
        .unwrap();
    envelope(json, 403, "LINK_EXPIRED").await;
}

#[tokio::test]
async fn a_link_asks_for_a_life_within_ninety_days() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::launch(&page_config(true), &upstream, &[], fixed_clock()).await;
    for body in [r#"{"expiresIn": 0}"#, r#"{"expiresIn": 7776001}"#] {
        envelope(
            link(&gateway, "org_custom", body).await,
            400,
            "INVALID_BODY",
        )
        .await;
    }
    let answer = link(&gateway, "org_custom", r#"{"expiresIn": 60}"#).await;
    assert_eq!(answer.status(), 201);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["expiresAt"], "2026-11-27T12:01:00Z");
}

#[tokio::test]
async fn without_a_usage_page_its_path_is_a_route_miss_and_links_are_refused() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::launch(&page_config(false), &upstream, &[], fixed_clock()).await;
    let answer = reqwest::get(gateway.url("/_tollgate/usage?org=org_custom&expires=1&sig=00"))
        .await
        .unwrap();
    envelope(answer, 404, "NOT_FOUND").await;
    envelope(
        link(&gateway, "org_custom", "").await,
        409,
        "USAGE_PAGE_OFF",
    )
    .await;
}
