//! `tollgate demo`: the gateway on the memory store in front of a built-in
//! stand-in backend, with a short scripted tour that ends in a 402.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError};

/// The demo's config, shipped in the binary so the demo runs from anywhere.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");
const DEMO_KEY: &str = "demo-key-acme";
/// org_globex's key: a pro plan in shadow mode.
const GLOBEX_KEY: &str = "demo-key-globex";

/// The admin token of the demo's `[admin]` section.
pub const DEMO_ADMIN_TOKEN: &str = "demo-admin-token";

/// Loads the demo config with the stand-in backend at `upstream`, the
/// gateway on `listen` and its admin listener on `admin`.
pub fn config(
    upstream: SocketAddr,
    listen: SocketAddr,
    admin: SocketAddr,
) -> Result<Config, ConfigError> {
    let upstream = upstream.to_string();
    let env = |name: &str| (name == "TOLLGATE_DEMO_UPSTREAM").then(|| upstream.clone());
    let mut config = Config::parse(DEMO_CONFIG, "config/demo.toml", &env)?;
    config.server.listen = listen;
    if let Some(section) = config.admin.as_mut() {
        section.listen = admin;
    }
    Ok(config)
}

/// Serves the stand-in backend on `listener` until the process ends: every
/// API route answers 200 with what it received, and `/v1/chat/completions`
/// answers like OpenAI, with a `usage` block.
pub async fn stand_in_backend(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(stand_in_answer);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn stand_in_answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let body = if path == "/v1/chat/completions" {
        serde_json::json!({
            "id": "chatcmpl-demo",
            "object": "chat.completion",
            "model": "stand-in",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the stand-in."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}
        })
    } else {
        serde_json::json!({"ok": true, "method": method.as_str(), "path": path})
    };
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Prints how to try the gateway at `gateway`, then walks org_acme through
/// its playbook-run quota until the gateway answers 402.
pub async fn tour(gateway: SocketAddr) -> Result<(), crate::BoxError> {
    let base = format!("http://{gateway}");
    println!("Try it yourself (org_acme's key is {DEMO_KEY}):");
    println!(
        "  curl -i -X POST {base}/api/v1/playbooks/pb_1/execute -H 'authorization: Bearer {DEMO_KEY}'"
    );
    println!(
        "  curl -i -X POST {base}/api/v1/content/briefs/generate -H 'authorization: Bearer {DEMO_KEY}'"
    );
    println!(
        "  curl -i {base}/v1/chat/completions -H 'authorization: Bearer {DEMO_KEY}' -H 'content-type: application/json' \\\n       -d '{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":100}}'"
    );
    println!(
        "  curl -i -X POST {base}/api/v1/playbooks/pb_1/execute -H 'authorization: Bearer {GLOBEX_KEY}'   # org_globex, shadow mode: never blocked"
    );
    println!("  curl -i {base}/api/v1/anything   # unmetered: forwarded as it is");
    println!();
    println!("The tour: org_acme is on the \"demo\" plan, 3 playbook runs per period.");

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for run in 1..=4 {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{base}/api/v1/playbooks/pb_1/execute"))
            .header("authorization", format!("Bearer {DEMO_KEY}"))
            .body(Full::new(Bytes::new()))?;
        let response = client.request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        println!("  run {run}: POST /api/v1/playbooks/pb_1/execute -> {status}");
        if status == StatusCode::PAYMENT_REQUIRED {
            let pretty = serde_json::from_slice::<serde_json::Value>(&body)
                .and_then(|json| serde_json::to_string_pretty(&json))
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            println!("{pretty}");
        }
    }
    Ok(())
}
