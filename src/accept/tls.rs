//! TLS termination on the listener: the handshake, run inside the
//! connection's own task and bounded by `handshake_timeout`, so that a
//! client that stalls or fails it holds nothing but its own task; and the
//! HTTP version ALPN chose for what follows.
//!
//! Each connection handshakes with the settings of the config snapshot of
//! the moment it reaches its worker (see [`Tls::current`]): a reload's new
//! certificate is used by the next handshake, and connections already open
//! keep theirs.
//!
//! A client that speaks plain HTTP to the port is told so, as nginx does:
//! when its first bytes are clearly a request line, it gets one 400 (made
//! by [`Tls::plain_http`]) and the connection is closed; anything else that
//! is not a TLS record is closed at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::Response;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::Body;
use crate::config::TlsConfig;
use crate::metrics::Metrics;

/// TLS on the listener, as the worker threads see it.
#[derive(Clone)]
pub struct Tls {
    /// The settings for the next handshake: the current config's.
    pub current: Arc<dyn Fn() -> TlsConfig + Send + Sync>,
    /// The answer to a plain HTTP request on this port.
    pub plain_http: fn() -> Response<Body>,
}

/// What a connection's first bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FirstBytes {
    /// A TLS handshake record.
    Handshake,
    /// A plain HTTP/1.x request line: a method of capital letters, then a
    /// space.
    PlainHttp,
    /// Neither, or too little to tell.
    Other,
}

/// How many bytes are looked at: enough for the longest standard method
/// (`OPTIONS`, `CONNECT`) and its space.
const SNIFF: usize = 8;

/// A TLS record of type handshake (22), as every ClientHello begins.
const HANDSHAKE_RECORD: u8 = 0x16;

fn sniff(first: &[u8]) -> FirstBytes {
    if first.first() == Some(&HANDSHAKE_RECORD) {
        return FirstBytes::Handshake;
    }
    let method = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match first.get(method) {
        Some(b' ') if method >= 3 => FirstBytes::PlainHttp,
        _ => FirstBytes::Other,
    }
}

/// The TLS session on `stream`, once its handshake is done; `None` when
/// it failed, stalled past the timeout, or was plain HTTP (answered), each
/// counted in `metrics` and logged at debug.
pub(super) async fn handshake(
    stream: TcpStream,
    settings: TlsConfig,
    plain_http: fn() -> Response<Body>,
    peer: SocketAddr,
    metrics: &Metrics,
) -> Option<TlsStream<TcpStream>> {
    let timeout = settings.handshake_timeout;
    let acceptor = TlsAcceptor::from(settings.server.0);
    let opened = tokio::time::timeout(timeout, async {
        let mut first = [0u8; SNIFF];
        let read = stream.peek(&mut first).await?;
        match sniff(&first[..read]) {
            FirstBytes::Handshake => acceptor.accept(stream).await,
            FirstBytes::PlainHttp => {
                refuse_plain_http(stream, plain_http).await;
                Err(std::io::Error::other("a plain HTTP request"))
            }
            FirstBytes::Other => Err(std::io::Error::other("not a TLS handshake")),
        }
    })
    .await;
    match opened {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(error)) => {
            metrics.tls_handshake_errors.inc();
            tracing::debug!(%peer, %error, "TLS handshake failed");
            None
        }
        Err(_) => {
            metrics.tls_handshake_timeouts.inc();
            tracing::debug!(%peer, ?timeout, "TLS handshake did not finish in time");
            None
        }
    }
}

/// Answers the plain HTTP request on `stream` with `answer`, then closes.
/// hyper reads the request, so the client is not reset before it has read
/// the answer.
async fn refuse_plain_http(stream: TcpStream, answer: fn() -> Response<Body>) {
    let service = hyper::service::service_fn(move |_| async move { Ok::<_, Infallible>(answer()) });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// `builder`, held to the HTTP version ALPN agreed on `stream`; with none
/// agreed, the client's first bytes still choose.
pub(super) fn for_alpn(
    builder: auto::Builder<TokioExecutor>,
    stream: &TlsStream<TcpStream>,
) -> auto::Builder<TokioExecutor> {
    match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => builder.http2_only(),
        Some(b"http/1.1") => builder.http1_only(),
        _ => builder,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_hello_is_a_handshake() {
        assert_eq!(
            sniff(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            FirstBytes::Handshake
        );
        assert_eq!(sniff(&[0x16]), FirstBytes::Handshake);
    }

    #[test]
    fn a_request_line_is_plain_http() {
        for line in ["GET / HT", "POST /v1", "OPTIONS ", "PRI * HT", "DELETE /"] {
            assert_eq!(sniff(line.as_bytes()), FirstBytes::PlainHttp, "{line}");
        }
    }

    #[test]
    fn anything_else_or_too_little_is_neither() {
        for first in [
            &b""[..],
            b"GE",
            b"GET",
            b"get / HT",
            b"AB /",
            b"\x00\x01",
            b"SSH-2.0-",
        ] {
            assert_eq!(sniff(first), FirstBytes::Other, "{first:?}");
        }
    }
}
