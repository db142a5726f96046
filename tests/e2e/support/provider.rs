//! A stand-in LLM provider: answers the OpenAI and Anthropic APIs with
//! provider-shaped JSON and server-sent event streams, over HTTP or HTTPS
//! (HTTP/2 by ALPN), sending its bodies in small pieces.
//!
//! Like a provider over a real network, a body ends [`END_DELAY`] after its
//! last byte, so a client that stops reading at `[DONE]` or `message_stop`
//! (as the official SDKs do) may hang up before the body's end.
//!
//! Steered per request by headers: `x-test-status: 500` fails,
//! `x-test-length: 1` answers in one piece with a Content-Length,
//! `x-test-cut: N` ends a stream abruptly after N bytes, `x-test-hold: 1`
//! sends the first piece and then waits for [`Provider::release`],
//! `x-test-pause-at: N` does the same after N bytes, `x-test-input-tokens: N`
//! reports N input tokens in Anthropic's `message_start`, and
//! `x-test-use-bound: 1` answers a chat completion that uses its whole
//! completion bound (`x-test-prompt-tokens` of prompt).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProviderBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Bytes per piece of every response body: prime, so pieces cut events,
/// lines and JSON at awkward places.
const PIECE: usize = 7;

/// How long a streamed body's end follows its last byte.
pub const END_DELAY: std::time::Duration = std::time::Duration::from_millis(50);

pub const OPENAI_USAGE: i64 = 16;
pub const ANTHROPIC_USAGE: i64 = 20 + 4 + 6;
pub const RESPONSES_USAGE: i64 = 10;

/// The chat completion chunks a stream sends, without and with usage.
pub fn openai_stream(include_usage: bool) -> String {
    let usage = if include_usage {
        r#","usage":null"#
    } else {
        ""
    };
    let mut stream = String::new();
    for delta in [
        r#"{"role":"assistant","content":"Hel"}"#,
        r#"{"content":"lo"}"#,
    ] {
        stream.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{delta}}}]{usage}}}\n\n"
        ));
    }
    if include_usage {
        stream.push_str("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":5,\"total_tokens\":16}}\n\n");
    }
    stream.push_str("data: [DONE]\n\n");
    stream
}

pub const ANTHROPIC_STREAM: &str = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude\",\"usage\":{\"input_tokens\":20,\"cache_read_input_tokens\":4,\"output_tokens\":1}}}\r\n\r\n\
event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\r\n\r\n\
event: message_delta\r\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":6}}\r\n\r\n\
event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n";

pub const RESPONSES_STREAM: &str = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\"}}\n\n\
event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n\
event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"usage\":{\"input_tokens\":7,\"output_tokens\":3,\"total_tokens\":10}}}\n\n";

/// What the provider saw of one request.
#[derive(Clone, Debug)]
pub struct ProviderSeen {
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Default)]
struct State {
    seen: Mutex<Vec<ProviderSeen>>,
    release: Notify,
    holding: Notify,
}

pub struct Provider {
    pub addr: SocketAddr,
    /// The CA that signed the HTTPS provider's certificate, as PEM.
    pub ca_pem: Option<String>,
    state: Arc<State>,
}

impl Provider {
    pub async fn start() -> Provider {
        Provider::launch(None).await
    }

    /// An HTTPS provider for `localhost`, its certificate signed by a fresh CA.
    pub async fn start_tls() -> Provider {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
        let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut provider =
            Provider::launch(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await;
        provider.ca_pem = Some(ca.pem());
        provider
    }

    async fn launch(tls: Option<tokio_rustls::TlsAcceptor>) -> Provider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, tls) = (shared.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request| answer(state.clone(), request));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let _ = match tls {
                        Some(tls) => {
                            let Ok(stream) = tls.accept(stream).await else {
                                return;
                            };
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                        None => {
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                    };
                });
            }
        });
        Provider {
            addr,
            ca_pem: None,
            state,
        }
    }

    pub fn seen(&self) -> Vec<ProviderSeen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Waits until a held stream has sent its first piece.
    pub async fn holding(&self) {
        super::within(
            std::time::Duration::from_secs(10),
            self.state.holding.notified(),
        )
        .await;
    }

    pub fn release(&self) {
        self.state.release.notify_waiters();
    }
}

async fn answer(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<ProviderBody>, Infallible> {
    let (head, body) = request.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    state.seen.lock().unwrap().push(ProviderSeen {
        version: head.version,
        headers: head.headers.clone(),
        body: json.clone(),
    });
    let header = |name: &str| {
        head.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if header("x-test-status").as_deref() == Some("500") {
        return Ok(respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "application/json",
            r#"{"error":{"message":"boom"}}"#.into(),
            Steering::default(),
            state,
        ));
    }
    if header("x-test-use-bound").is_some() {
        return Ok(respond(
            StatusCode::OK,
            "application/json",
            whole_bound_answer(&json, header("x-test-prompt-tokens")),
            Steering::default(),
            state,
        ));
    }
    let streaming = json["stream"] == Value::Bool(true);
    let (content_type, text) = match (head.uri.path(), streaming) {
        ("/v1/chat/completions", true) => {
            ("text/event-stream", openai_stream(json["stream_options"]["include_usage"] == Value::Bool(true)))
        }
        ("/v1/chat/completions", false) => ("application/json", r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16}}"#.to_string()),
        ("/v1/messages", true) => ("text/event-stream", match header("x-test-input-tokens") {
            Some(tokens) => ANTHROPIC_STREAM.replace("\"input_tokens\":20", &format!("\"input_tokens\":{tokens}")),
            None => ANTHROPIC_STREAM.to_string(),
        }),
        ("/v1/messages", false) => ("application/json", r#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"Hi"}],"usage":{"input_tokens":20,"cache_read_input_tokens":4,"output_tokens":6}}"#.to_string()),
        ("/v1/responses", true) => ("text/event-stream", RESPONSES_STREAM.to_string()),
        ("/v1/responses", false) => ("application/json", r#"{"id":"resp_1","output":[],"usage":{"input_tokens":7,"output_tokens":3,"total_tokens":10}}"#.to_string()),
        ("/v1/embeddings", _) => ("application/json", r#"{"data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#.to_string()),
        _ => ("application/json", r#"{"ok":true}"#.to_string()),
    };
    if header("x-test-length").is_some() {
        // One piece, with a Content-Length: the gateway is not polled for the end.
        let mut response = Response::new(BodyExt::boxed(
            http_body_util::Full::new(Bytes::from(text)).map_err(|never| match never {}),
        ));
        response
            .headers_mut()
            .insert("content-type", content_type.parse().unwrap());
        return Ok(response);
    }
    let steering = Steering {
        cut: header("x-test-cut").and_then(|n| n.parse().ok()),
        pause_at: match header("x-test-hold") {
            Some(_) => Some(PIECE),
            None => header("x-test-pause-at").and_then(|n| n.parse().ok()),
        },
    };
    Ok(respond(StatusCode::OK, content_type, text, steering, state))
}

/// A chat completion that used all of the completion bound its request
/// names (`max_completion_tokens`, else `max_tokens`), times `n`.
fn whole_bound_answer(request: &Value, prompt_tokens: Option<String>) -> String {
    let bound = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|key| request[key].as_i64())
        .unwrap_or(0);
    let completion = bound * request["n"].as_i64().unwrap_or(1);
    let prompt: i64 = prompt_tokens.and_then(|p| p.parse().ok()).unwrap_or(0);
    json!({"id": "chatcmpl-b", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}})
    .to_string()
}

/// How a response body deviates from a plain stream.
#[derive(Clone, Copy, Default)]
struct Steering {
    /// End abruptly, with an error, after this many bytes.
    cut: Option<usize>,
    /// Wait for [`Provider::release`] once this many bytes are out.
    pause_at: Option<usize>,
}

/// A response whose body goes out in [`PIECE`]-byte pieces, and ends
/// [`END_DELAY`] after the last.
fn respond(
    status: StatusCode,
    content_type: &'static str,
    text: String,
    steering: Steering,
    state: Arc<State>,
) -> Response<ProviderBody> {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
    tokio::spawn(async move {
        let bytes = text.into_bytes();
        let end = steering.cut.unwrap_or(bytes.len()).min(bytes.len());
        let mut sent = 0;
        for piece in bytes[..end].chunks(PIECE) {
            if sender
                .send(Ok(Frame::data(Bytes::copy_from_slice(piece))))
                .await
                .is_err()
            {
                return;
            }
            let before = sent;
            sent += piece.len();
            if steering
                .pause_at
                .is_some_and(|at| before < at && sent >= at)
            {
                let released = state.release.notified();
                state.holding.notify_one();
                released.await;
            }
            tokio::task::yield_now().await;
        }
        if steering.cut.is_some() {
            let _ = sender.send(Err("cut on purpose".into())).await;
            return;
        }
        tokio::time::sleep(END_DELAY).await;
    });
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    response
}
