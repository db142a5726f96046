//! Step 5: the request to the upstream, and its response back.
//!
//! Each upstream has pooled keep-alive connections: plain HTTP/1.1 from
//! this worker's own [`pool`], or hyper-util's client for HTTPS through
//! rustls (webpki roots plus the upstream's `ca_file`), with HTTP/2 where
//! ALPN offers it. The request arrives without its hop-by-hop headers (the
//! stack removes them with [`remove_hop_by_hop`] before any step runs) and
//! gains `X-Forwarded-For/-Proto/-Host`. An upstream with configured
//! `headers` (a provider key) gets those in place of every credential the
//! client sent; one without keeps the client's, for the backend's own auth.
//! Bodies stream both ways.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either;
use http_body::{Body as HttpBody, Frame, SizeHint};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

mod pool;
mod upload;

use self::pool::{Http1Pool, Lease};
use crate::accept::{ClientAddr, ClientFault};
use crate::config::Upstream;
use crate::deadline::Deadlines;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::silence::SilenceTimer;
use crate::{Body, BoxError};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Credentials a client may send, none of which reaches an upstream that has
/// credentials of its own configured.
static CLIENT_CREDENTIALS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::COOKIE,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
];

/// How a worker reaches one upstream.
enum Connections {
    /// A plain-HTTP upstream.
    Http1(Http1Pool),
    /// An HTTPS upstream.
    Tls(Box<Client<HttpsConnector<HttpConnector>, Body>>),
}

/// Where the body of a request going up is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upload {
    /// Still with the client: the upstream is timed on its own turns only
    /// (see `upload`).
    FromClient,
    /// In the gateway's hands, read whole (a metered body): the upstream's
    /// time runs from the send, as for a request without a body.
    InHand,
}

pub struct Forwarder {
    upstreams: Vec<(Upstream, Connections)>,
    /// `upstream_timeout`, for the requests with no body still to come from
    /// the client: none at all, or one read whole ([`Upload::InHand`]).
    deadlines: Deadlines,
    timeout: Duration,
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    /// `timeout` bounds the upstream's part of the wait for response headers
    /// (see `upload`), `idle_timeout` each wait for more of a response
    /// body.
    pub fn new(
        upstreams: Vec<Upstream>,
        timeout: Duration,
        idle_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Forwarder, rustls::Error> {
        let upstreams = upstreams
            .into_iter()
            .map(|upstream| {
                let connections =
                    match Http1Pool::for_origin(&upstream.origin, tcp_connector(timeout)) {
                        Some(pool) => Connections::Http1(pool),
                        None => Connections::Tls(Box::new(tls_client_for(&upstream, timeout)?)),
                    };
                Ok((upstream, connections))
            })
            .collect::<Result<_, rustls::Error>>()?;
        Ok(Forwarder {
            upstreams,
            deadlines: Deadlines::new(timeout),
            timeout,
            idle_timeout,
            metrics,
        })
    }

    /// Sends `request` to upstream number `upstream` and returns its response
    /// head as soon as it arrives; the body follows as the upstream sends it.
    ///
    /// Not an `async fn`, nor are the sends below it: one would keep its
    /// arguments twice in its future, and copy them once more.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future"
    )]
    pub fn forward(
        &self,
        upstream: usize,
        mut request: Request<Body>,
        upload: Upload,
        client: Option<ClientAddr>,
    ) -> impl Future<Output = Result<Response<Body>, GatewayError>> {
        async move {
            let (upstream, connections) =
                self.upstreams.get(upstream).ok_or(GatewayError::Internal)?;
            let authority = request
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
            let path = upstream_path(upstream, request.uri())?;
            *request.uri_mut() = match connections {
                // HTTP/1.1 to an origin server takes the path alone.
                Connections::Http1(_) => Uri::from(path),
                Connections::Tls(_) => {
                    let mut parts = upstream.origin.clone().into_parts();
                    parts.path_and_query = Some(path);
                    Uri::from_parts(parts).map_err(|_| GatewayError::Internal)?
                }
            };
            // The client's HTTP version is its own; the upstream connection's is
            // chosen by ALPN (HTTP/2 where offered), else HTTP/1.1.
            *request.version_mut() = Version::HTTP_11;
            let own_host = match connections {
                Connections::Http1(pool) => Some(pool.host().clone()),
                // hyper-util's client sets Host from the URI.
                Connections::Tls(_) => None,
            };
            let headers = request.headers_mut();
            prepare_headers(headers, authority, own_host, upstream, client.as_ref());

            let (mut response, lease) = self.send(upstream, connections, request, upload).await?;
            remove_hop_by_hop(response.headers_mut());
            let idle = self.idle_timeout;
            Ok(response.map(|body| Body::new(UpstreamBody::new(body, idle, lease))))
        }
    }

    /// Sends `request` on `connections`, within `upstream_timeout` of the
    /// upstream's own time (see `upload`).
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future"
    )]
    fn send(
        &self,
        upstream: &Upstream,
        connections: &Connections,
        request: Request<Body>,
        upload: Upload,
    ) -> impl Future<Output = Result<(Response<Incoming>, Option<Lease>), GatewayError>> {
        async move {
            // A request without a body, or with one read whole, has nothing
            // to wait on but the upstream. Its deadline is the worker's
            // shared coarse one (see `deadline`): a metered body's watched
            // upload cost 4,300 instructions a request more (case 16,
            // callgrind).
            if upload == Upload::InHand || request.body().is_end_stream() {
                let sent = self.deadlines.bound(send_on(connections, request)).await;
                let sent = sent.unwrap_or(Err(SendError::TimedOut));
                return sent.map_err(|error| self.failed(upstream, error, None));
            }
            let (parts, body) = request.into_parts();
            let (body, mut clock) = upload::start(body, self.timeout);
            let sent = tokio::select! {
                sent = send_on(connections, Request::from_parts(parts, body)) => sent,
                () = clock.expired() => Err(SendError::TimedOut),
            };
            sent.map_err(|error| self.failed(upstream, error, clock.client_fault()))
        }
    }

    /// The answer to a send that failed: the client's fault when its body
    /// failed, else the upstream's.
    fn failed(
        &self,
        upstream: &Upstream,
        error: SendError,
        client_fault: Option<ClientFault>,
    ) -> GatewayError {
        if let Some(fault) = client_fault {
            self.metrics.client_body_failed(fault);
            return fault.into();
        }
        match error {
            SendError::Failed(error) => {
                tracing::warn!(upstream = %upstream.name, error = %error_chain(&*error), "upstream request failed");
                GatewayError::UpstreamUnreachable
            }
            SendError::TimedOut => {
                tracing::warn!(upstream = %upstream.name, timeout = ?self.timeout, "upstream sent no response in time");
                GatewayError::UpstreamTimeout
            }
        }
    }
}

/// Why a request could not be sent.
enum SendError {
    Failed(BoxError),
    TimedOut,
}

/// Sends `request` on `connections`, with no timeout of its own.
/// Not a future of its own around the client's: that would be one more
/// level to copy the request down and the response up.
fn send_on(
    connections: &Connections,
    request: Request<Body>,
) -> impl Future<Output = Result<(Response<Incoming>, Option<Lease>), SendError>> {
    match connections {
        Connections::Http1(pool) => Either::Left(pool.send(request).map(|sent| {
            sent.map(|(response, lease)| (response, Some(lease)))
                .map_err(SendError::Failed)
        })),
        Connections::Tls(client) => Either::Right(client.request(request).map(|sent| {
            sent.map(|response| (response, None))
                .map_err(|error| SendError::Failed(error.into()))
        })),
    }
}

/// An upstream response body. It fails once it has sent nothing for
/// `idle_timeout`: a stream may run for as long as it keeps moving, but not
/// hang forever. At its end, its connection goes back to the pool.
struct UpstreamBody {
    inner: Incoming,
    silence: SilenceTimer,
    /// The pooled connection the body arrives on, until the body ends.
    lease: Option<Lease>,
}

impl UpstreamBody {
    fn new(inner: Incoming, idle: Duration, lease: Option<Lease>) -> UpstreamBody {
        let mut body = UpstreamBody {
            inner,
            silence: SilenceTimer::new(idle),
            lease,
        };
        // An empty body may never be polled.
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {0:?}")]
struct UpstreamIdle(Duration);

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.silence.moved();
            // The server stops polling once a body says it is at its end.
            let ended = match &frame {
                None => true,
                Some(Ok(_)) => this.inner.is_end_stream(),
                Some(Err(_)) => false,
            };
            if ended {
                this.release();
            }
            return Poll::Ready(frame.map(|f| f.map_err(BoxError::from)));
        }
        match this.silence.poll_expired(cx) {
            Poll::Ready(()) => {
                let idle = this.silence.limit();
                tracing::warn!(?idle, "cutting an upstream body that went idle");
                Poll::Ready(Some(Err(Box::new(UpstreamIdle(idle)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves an upstream's host and connects to it, trying its addresses in
/// turn (IPv6 and IPv4 raced) within `timeout`.
fn tcp_connector(timeout: Duration) -> HttpConnector {
    let mut connector = HttpConnector::new();
    // Small request/response exchanges must not wait on Nagle's algorithm.
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(timeout));
    connector
}

fn tls_client_for(
    upstream: &Upstream,
    timeout: Duration,
) -> Result<Client<HttpsConnector<HttpConnector>, Body>, rustls::Error> {
    let mut http = tcp_connector(timeout);
    http.enforce_http(false);
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // Each was checked to be a usable trust anchor when the config was loaded.
    let _ = roots.add_parsable_certificates(upstream.extra_roots.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_all_versions()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(pool::IDLE_TIMEOUT)
        .build(connector))
}

/// The path and query the upstream is asked for: the client's, after the
/// upstream's prefix.
fn upstream_path(upstream: &Upstream, original: &Uri) -> Result<PathAndQuery, GatewayError> {
    let path_and_query = original.path_and_query();
    if upstream.path_prefix.is_empty() {
        return Ok(path_and_query
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")));
    }
    let rest = path_and_query.map_or("/", PathAndQuery::as_str);
    format!("{}{rest}", upstream.path_prefix)
        .parse()
        .map_err(|_| GatewayError::Internal)
}

/// Sets the forwarding headers. `own_host`: the upstream's `Host`, where
/// the gateway sets it (else the client's is removed, for the client to set
/// its own from the URI).
fn prepare_headers(
    headers: &mut HeaderMap,
    authority: Option<HeaderValue>,
    own_host: Option<HeaderValue>,
    upstream: &Upstream,
    client: Option<&ClientAddr>,
) {
    // The upstream gets its own Host; the one the client asked for (HTTP/1.1
    // Host, or the HTTP/2 authority) travels as X-Forwarded-Host. The Host
    // value is swapped in place, and X-Forwarded-For found once with the
    // entry API: a hashed lookup each saved, some 450 instructions a
    // request (callgrind).
    let client_host = match (headers.get_mut(header::HOST), own_host) {
        (Some(slot), Some(own)) => Some(std::mem::replace(slot, own)),
        (None, Some(own)) => {
            headers.insert(header::HOST, own);
            None
        }
        (_, None) => headers.remove(header::HOST),
    };
    match client_host.or(authority) {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST, host);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
    if let Some(client) = client {
        let ip = &client.forwarded_for;
        match headers.entry(X_FORWARDED_FOR) {
            header::Entry::Occupied(mut earlier) => {
                let mut joined = earlier.get().as_bytes().to_vec();
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(ip.as_bytes());
                if let Ok(value) = HeaderValue::from_bytes(&joined) {
                    // `insert` replaces every earlier value, as before.
                    earlier.insert(value);
                }
            }
            header::Entry::Vacant(slot) => {
                slot.insert(ip.clone());
            }
        }
    }
    let proto = match client {
        Some(client) if client.https => "https",
        _ => "http",
    };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if !upstream.headers.is_empty() {
        for credential in &CLIENT_CREDENTIALS {
            headers.remove(credential);
        }
    }
    for (name, value) in &upstream.headers {
        headers.insert(name.clone(), value.clone());
    }
}

/// Removes the headers that describe the client's connection, not the
/// message, and those its `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these: one pass over the names they do
    // carry is cheaper than a hashed removal for each.
    let carries_any = headers.keys().any(is_hop_by_hop);
    if !carries_any {
        return;
    }
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // `Upgrade` only means something with `Connection: upgrade`, which is gone.
    headers.remove(header::UPGRADE);
}

/// Whether `name` is one of [`HOP_BY_HOP`] or `Upgrade`. One match on the
/// name's text: comparing each name with the nine in turn cost some 600
/// instructions a request, request and response together (callgrind).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// An error and its sources on one line, for the log.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> Upstream {
        let uri: Uri = url.parse().unwrap();
        let prefix = uri.path().trim_end_matches('/').to_string();
        let mut parts = uri.into_parts();
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
        let mut secret = HeaderValue::from_static("Bearer provider-key");
        secret.set_sensitive(true);
        Upstream {
            name: "api".into(),
            origin: Uri::from_parts(parts).unwrap(),
            path_prefix: prefix,
            headers: vec![(header::AUTHORIZATION, secret)],
            extra_roots: Vec::new(),
        }
    }

    #[test]
    fn the_request_path_and_query_follow_the_upstream_prefix() {
        let original: Uri = "/v1/chat/completions?x=1".parse().unwrap();
        assert_eq!(
            upstream_path(&upstream("http://10.0.0.1:3001"), &original).unwrap(),
            "/v1/chat/completions?x=1"
        );
        assert_eq!(
            upstream_path(&upstream("http://h/base/"), &original).unwrap(),
            "/base/v1/chat/completions?x=1"
        );
    }

    #[test]
    fn hop_by_hop_headers_go_and_forwarding_headers_come() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert(header::HOST, "gateway.example".parse().unwrap());
        headers.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        headers.insert(
            header::AUTHORIZATION,
            "Bearer client-supplied".parse().unwrap(),
        );
        headers.insert("x-kept", "yes".parse().unwrap());

        remove_hop_by_hop(&mut headers);
        prepare_headers(
            &mut headers,
            None,
            None,
            &upstream("http://h"),
            Some(&ClientAddr::new("192.0.2.1:5000".parse().unwrap())),
        );

        for gone in ["connection", "x-private", "keep-alive", "te", "host"] {
            assert!(headers.get(gone).is_none(), "{gone} was forwarded");
        }
        assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 192.0.2.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "gateway.example");
        assert_eq!(headers["authorization"], "Bearer provider-key");
        assert_eq!(headers["x-kept"], "yes");
    }

    #[test]
    fn a_client_over_tls_is_forwarded_as_https_with_the_same_address() {
        let mut headers = HeaderMap::new();
        let client = ClientAddr::new("192.0.2.1:5000".parse().unwrap()).over_tls();
        prepare_headers(
            &mut headers,
            None,
            None,
            &upstream("http://h"),
            Some(&client),
        );
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-for"], "192.0.2.1");
    }
}
