//! Keep-alive HTTP/1.1 connections to one plain-HTTP upstream, held by one
//! worker.
//!
//! hyper-util's pooled client serves HTTPS upstreams, where TLS and ALPN
//! (HTTP/2 to providers) need it. For a plain-HTTP upstream, usually the
//! product's own API next to the gateway, its generality costs more than
//! the rest of the forward step together: a hashed pool key per request,
//! a connect future raced against every checkout, a task spawned per
//! response to wait for the connection to come back, and a `Host` header
//! formatted per request. Here a worker keeps its idle connections in a
//! list (the worker's own, so its lock is never contended), takes the most
//! recently used one that is ready, and gets it back when the response body
//! ends; one whose body is dropped unfinished is closed instead.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use http::header::HeaderValue;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::{Body, BoxError};

/// How long a connection may sit unused before it is closed.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Http1Pool {
    origin: Uri,
    connector: HttpConnector,
    /// The `Host` header of every request, rendered once.
    host: HeaderValue,
    idle: Arc<Mutex<VecDeque<Idle>>>,
}

/// A connection waiting for its next request.
struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// A connection busy with a response body, and where it goes back once the
/// body has ended.
pub struct Lease {
    sender: SendRequest<Body>,
    idle: Weak<Mutex<VecDeque<Idle>>>,
}

impl Http1Pool {
    /// A pool for `origin`, an `http://` URI, whose connections `connector`
    /// makes; `None` for any other scheme.
    pub fn for_origin(origin: &Uri, connector: HttpConnector) -> Option<Http1Pool> {
        if origin.scheme_str() != Some("http") {
            return None;
        }
        let host = origin.host()?;
        let port = origin.port_u16();
        let host_header = match port {
            Some(port) if port != 80 => format!("{host}:{port}"),
            _ => host.to_string(),
        };
        Some(Http1Pool {
            origin: origin.clone(),
            connector,
            host: HeaderValue::try_from(host_header).ok()?,
            idle: Arc::default(),
        })
    }

    /// The `Host` header of every request to this upstream, which the
    /// caller sets (in the client's Host's place).
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// Sends `request` (its URI in origin form, its Host [`Self::host`]) on an idle connection, or a
    /// new one. A request that an idle connection turned away unsent (the
    /// upstream had closed it) goes again, on another idle connection or a
    /// new one; a request that was sent is never sent twice.
    ///
    /// Not an `async fn`, which would keep `request` twice in its future.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future"
    )]
    pub fn send(
        &self,
        mut request: Request<Body>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Lease), BoxError>> {
        async move {
            let mut pooled = self.checkout();
            loop {
                let was_pooled = pooled.is_some();
                let mut sender = match pooled.take() {
                    Some(sender) => sender,
                    // Boxed: the connect future (resolver, connector, handshake)
                    // is most of this one's size, and every request's future
                    // around it would carry and copy it (callgrind).
                    None => Box::pin(self.connect()).await?,
                };
                match sender.try_send_request(request).await {
                    Ok(response) => {
                        let lease = Lease {
                            sender,
                            idle: Arc::downgrade(&self.idle),
                        };
                        return Ok((response, lease));
                    }
                    Err(mut error) => match error.take_message() {
                        // Only a request that never left can go again.
                        Some(unsent) if was_pooled => {
                            tracing::debug!(error = %error.error(), "an idle upstream connection had closed; trying another");
                            request = unsent;
                            pooled = self.checkout();
                        }
                        _ => return Err(error.into_error().into()),
                    },
                }
            }
        }
    }

    /// The most recently used idle connection that is ready for a request.
    /// Closed and long-unused ones are dropped on the way.
    fn checkout(&self) -> Option<SendRequest<Body>> {
        let mut idle = lock(&self.idle);
        let now = Instant::now();
        while idle
            .front()
            .is_some_and(|oldest| now.duration_since(oldest.since) > IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        let mut index = idle.len();
        while index > 0 {
            index -= 1;
            let sender = &idle[index].sender;
            if sender.is_ready() {
                return idle.remove(index).map(|idle| idle.sender);
            }
            if sender.is_closed() {
                idle.remove(index);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Body>, BoxError> {
        let stream = self.connector.clone().oneshot(self.origin.clone()).await?;
        let (sender, connection) = http1::handshake(stream).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

impl Lease {
    /// Puts the connection back in its pool, unless it is closing.
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        if let Some(idle) = self.idle.upgrade() {
            lock(&idle).push_back(Idle {
                sender: self.sender,
                since: Instant::now(),
            });
        }
    }
}

fn lock(idle: &Mutex<VecDeque<Idle>>) -> MutexGuard<'_, VecDeque<Idle>> {
    // The list is valid whatever a panicking holder was doing.
    idle.lock().unwrap_or_else(PoisonError::into_inner)
}
