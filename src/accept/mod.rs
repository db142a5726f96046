//! Step 1: accepting connections.
//!
//! The listener's accept loop runs on the caller's runtime and deals the
//! connections it accepts round-robin to `server.workers` threads. Each
//! worker is a single-threaded runtime that drives everything its
//! connections wait on: the client connection, the upstream connections,
//! its Redis connection. A request never changes threads, so it pays for no
//! work stealing and no cross-thread wake-ups; only a new connection crosses
//! once, to its worker. (On the load benchmark this took tollgate's CPU time
//! per unmetered request from 61 to 41 µs; nginx's workers are built the
//! same way.) Dealing connections out, rather than letting every
//! worker accept from the socket, keeps the workers evenly loaded without
//! `SO_REUSEPORT`, which would let a second gateway bind the same port.
//!
//! With `[server.tls]`, each connection first completes a TLS handshake
//! within `handshake_timeout`, in its own task (`tls`). Each connection
//! speaks HTTP/1.1 or HTTP/2 (by ALPN over TLS, else by preface), is one of at
//! most `server.max_connections` (`limit`), must make its first request in
//! time and is closed once idle (`conn`), has its request body read as the
//! client's (`body`), and shuts down gracefully: on the signal the
//! listener closes, open connections finish their in-flight requests,
//! whatever is still open when the grace period ends is dropped, and
//! settlements already started are given the same grace to complete.

mod body;
mod conn;
mod limit;
mod tls;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::body::{ClientBodyError, ClientFault, client_body};
use self::conn::{Activity, ConnectionService, IdleLimits};
use self::limit::ConnectionLimit;
pub use self::tls::Tls;
use crate::Body;
use crate::config::ServerConfig;
use crate::metrics::{BurstLog, Metrics};

/// The answer to one request, as its connection awaits it.
pub type HttpFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// The whole gateway as one service, called by reference with the client's
/// address beside the request. In place of tower's `BoxCloneSyncService`
/// with the address in the request's extensions: that clones a boxed
/// service a request, boxes the boxed future once more, and fills and
/// empties an extension map, five allocations and some 900 instructions a
/// request (callgrind).
#[derive(Clone)]
pub struct HttpService(Arc<dyn Fn(Request<Incoming>, ClientAddr) -> HttpFuture + Send + Sync>);

impl HttpService {
    pub fn new(
        call: impl Fn(Request<Incoming>, ClientAddr) -> HttpFuture + Send + Sync + 'static,
    ) -> HttpService {
        HttpService(Arc::new(call))
    }

    pub fn call(&self, request: Request<Incoming>, client: ClientAddr) -> HttpFuture {
        (self.0)(request, client)
    }
}

/// The client's address, added to each request by the accept step: the TCP
/// peer's IP, which decides whether an org header is believed, and the same
/// IP as an `X-Forwarded-For` entry, rendered once per connection rather
/// than once per request.
#[derive(Clone, Debug)]
pub struct ClientAddr {
    pub ip: IpAddr,
    pub forwarded_for: HeaderValue,
    /// The connection is TLS the gateway terminated (`X-Forwarded-Proto:
    /// https`); known per connection, so it costs a request nothing.
    pub https: bool,
}

impl ClientAddr {
    pub fn new(addr: SocketAddr) -> ClientAddr {
        // On a dual-stack listener an IPv4 client arrives as ::ffff:a.b.c.d;
        // it is matched and reported as the IPv4 address it is.
        let ip = addr.ip().to_canonical();
        // An IP's text is always a valid header value.
        let forwarded_for = HeaderValue::try_from(ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ClientAddr {
            ip,
            forwarded_for,
            https: false,
        }
    }

    /// The same client, over TLS.
    pub fn over_tls(self) -> ClientAddr {
        ClientAddr {
            https: true,
            ..self
        }
    }
}

/// A connection on its way to a worker.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    at: Instant,
    /// Its place under `max_connections`, given back when it closes.
    permit: OwnedSemaphorePermit,
}

/// Serves `listener` on `server.workers` threads, each running the service
/// `service_for_worker` builds on it, until `shutdown` completes; then
/// drains every worker and waits for the `settling` tasks. With `tls`, every
/// connection is TLS first. Refused connections, failed accepts and failed
/// handshakes are counted in `metrics`.
///
/// Returns an error, with every worker stopped, if one could not start:
/// the error `service_for_worker` gave, or why a thread or runtime could not.
pub async fn serve_on_workers<E>(
    listener: std::net::TcpListener,
    server: &ServerConfig,
    metrics: Arc<Metrics>,
    service_for_worker: impl Fn() -> Result<HttpService, E> + Send + Sync + 'static,
    tls: Option<Tls>,
    settling: TaskTracker,
    shutdown: impl Future<Output = ()>,
) -> Result<(), E>
where
    E: From<std::io::Error> + Send + 'static,
{
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let service_for_worker = std::sync::Arc::new(service_for_worker);
    let (ready, mut started) = mpsc::unbounded_channel();
    let mut workers = Vec::with_capacity(server.workers);
    let mut queues = Vec::with_capacity(server.workers);
    let mut failed = None;
    for index in 0..server.workers {
        let (queue, connections) = mpsc::unbounded_channel();
        let worker = Worker {
            connections,
            server: server.clone(),
            settling: settling.clone(),
            tls: tls.clone(),
            metrics: metrics.clone(),
        };
        let service_for_worker = service_for_worker.clone();
        let ready = ready.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("tollgate-worker-{index}"))
            .spawn(move || worker.run(&*service_for_worker, &ready));
        match spawned {
            Ok(handle) => {
                workers.push(handle);
                queues.push(queue);
            }
            Err(error) => {
                failed = Some(E::from(error));
                break;
            }
        }
    }
    drop(ready);
    for _ in 0..workers.len() {
        match started.recv().await {
            Some(Ok(())) => {}
            Some(Err(error)) => {
                failed.get_or_insert(error);
            }
            None => break,
        }
    }
    if failed.is_none() {
        let limit = ConnectionLimit::new(max_connections(server), metrics.clone());
        accept(&listener, &queues, &limit, &metrics, shutdown).await;
    }
    // Closing the socket refuses new connections at once; closing the queues
    // tells each worker to drain.
    tracing::info!(grace = ?server.shutdown_grace, "shutting down: no new connections, draining");
    drop(listener);
    drop(queues);
    // Settlements still running may finish; once the workers are done, none
    // can start.
    settling.close();
    join(workers).await;
    failed.map_or(Ok(()), Err)
}

/// `server.max_connections`, or the default the descriptor limit allows,
/// once that limit is raised as far as it goes.
fn max_connections(server: &ServerConfig) -> usize {
    let descriptors = limit::raise_descriptor_limit();
    let max = match (server.max_connections, descriptors) {
        (Some(max), Some(descriptors)) => {
            if max > limit::default_max_connections(descriptors) {
                tracing::warn!(
                    max_connections = max,
                    descriptors,
                    "max_connections is more than the descriptor limit leaves room for; \
                     accepts may fail before it is reached"
                );
            }
            max
        }
        (Some(max), None) => max,
        (None, Some(descriptors)) => limit::default_max_connections(descriptors),
        (None, None) => limit::default_max_connections(1024),
    };
    tracing::info!(max_connections = max, "connection limit");
    max
}

/// Accepts until `shutdown`, dealing connections to the worker queues in
/// turn; a connection past the limit is closed at once.
async fn accept(
    listener: &TcpListener,
    queues: &[mpsc::UnboundedSender<Accepted>],
    limit: &ConnectionLimit,
    metrics: &Metrics,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = AcceptBackoff::default();
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                metrics.accept_errors.inc();
                backoff.pause(&error).await;
                continue;
            }
        };
        backoff.reset();
        let at = Instant::now();
        let Some(permit) = limit.admit() else {
            drop(stream);
            continue;
        };
        // Small request/response exchanges must not wait on Nagle's algorithm.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let mut connection = Some(Accepted {
            stream,
            peer,
            at,
            permit,
        });
        // A worker that is gone (its thread panicked) is passed over.
        for _ in 0..queues.len() {
            let queue = &queues[next % queues.len()];
            next = next.wrapping_add(1);
            match connection.take().map(|c| queue.send(c)) {
                Some(Err(mpsc::error::SendError(returned))) => connection = Some(returned),
                _ => break,
            }
        }
        if connection.is_some() {
            tracing::error!("no worker is left to serve connections");
            return;
        }
    }
}

/// The pause after a failed accept: out of descriptors or memory, the
/// next accept would fail at once too. It doubles from 5 ms to 1 s while
/// accepts keep failing, as Go's `net/http` does, and the failures are
/// logged once per burst.
struct AcceptBackoff {
    delay: Duration,
    log: BurstLog,
}

impl Default for AcceptBackoff {
    fn default() -> AcceptBackoff {
        AcceptBackoff {
            delay: Duration::ZERO,
            log: BurstLog::default(),
        }
    }
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const LONGEST: Duration = Duration::from_secs(1);

    async fn pause(&mut self, error: &std::io::Error) {
        self.delay = (self.delay * 2).clamp(Self::FIRST, Self::LONGEST);
        if let Some(held_back) = self.log.admit() {
            tracing::warn!(
                %error,
                held_back,
                "accept failed; retrying after a pause of up to {:?}, \
                 further failures within {:?} are counted, not logged",
                Self::LONGEST,
                self.log.window()
            );
        }
        tokio::time::sleep(self.delay).await;
    }

    fn reset(&mut self) {
        self.delay = Duration::ZERO;
    }
}

/// One worker thread: its queue of connections, and what it needs to drain.
struct Worker {
    connections: mpsc::UnboundedReceiver<Accepted>,
    server: ServerConfig,
    settling: TaskTracker,
    tls: Option<Tls>,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run<E: From<std::io::Error>>(
        self,
        service_for_worker: &dyn Fn() -> Result<HttpService, E>,
        ready: &mpsc::UnboundedSender<Result<(), E>>,
    ) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                let _ = ready.send(Err(error.into()));
                return;
            }
        };
        runtime.block_on(async move {
            match service_for_worker() {
                Ok(service) => {
                    let _ = ready.send(Ok(()));
                    self.serve(service).await;
                }
                Err(error) => {
                    let _ = ready.send(Err(error));
                }
            }
        });
    }

    /// Serves each connection dealt to this worker until the queue closes,
    /// then drains.
    async fn serve(mut self, service: HttpService) {
        let server = &self.server;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper's own header timer is off: it would cut idle keep-alive
        // connections at `header_read_timeout` and miss silent ones (see
        // `conn`, which times both).
        builder.http1().header_read_timeout(None).keep_alive(true);
        builder.http2().timer(TokioTimer::new());
        // The same HTTP/1.1 server, for connections that cannot be HTTP/2.
        let mut http1 = http1::Builder::new();
        http1.header_read_timeout(None).keep_alive(true);
        let servers = Servers {
            http1,
            auto: builder,
        };
        let limits = IdleLimits {
            first_request: server.header_read_timeout,
            between_requests: server.keepalive_timeout,
            // A client gets as long to finish a close as to send a head.
            close: server.header_read_timeout,
        };
        let shutdown = CancellationToken::new();
        // Held so that connections still open when the grace period ends can
        // be cut; finished ones are reaped as new ones arrive.
        let mut open = JoinSet::new();

        while let Some(accepted) = self.connections.recv().await {
            while open.try_join_next().is_some() {}
            let Some(opened) = Opened::new(service.clone(), accepted) else {
                continue;
            };
            let (limits, shutdown) = (limits, shutdown.clone());
            match &self.tls {
                None => open.spawn(opened.serve(&servers, limits, shutdown)),
                Some(tls) => {
                    let (builder, metrics) = (servers.auto.clone(), self.metrics.clone());
                    open.spawn(opened.serve_tls(tls, builder, metrics, limits, shutdown))
                }
            };
        }

        shutdown.cancel();
        let deadline = Instant::now() + server.shutdown_grace;
        drain(open, deadline).await;
        // This runtime drives the settlements its requests started; it must
        // outlive them, or they would be dropped unfinished.
        if tokio::time::timeout_at(deadline, self.settling.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.settling.len(),
                "grace period over with settlements still running"
            );
        }
    }
}

/// Waits for the `open` connections to finish closing, and cuts those still
/// open at `deadline`.
async fn drain(mut open: JoinSet<()>, deadline: Instant) {
    let drained = tokio::time::timeout_at(deadline, async {
        while open.join_next().await.is_some() {}
    });
    match drained.await {
        Ok(()) => tracing::debug!("all connections drained"),
        Err(_) => {
            tracing::warn!(
                open = open.len(),
                "grace period over, dropping open connections"
            );
            open.abort_all();
        }
    }
}

/// A worker's servers of plain connections: hyper's HTTP/1.1 one, and
/// hyper-util's, which reads the first bytes itself to choose between
/// HTTP/1.1 and HTTP/2.
struct Servers {
    http1: http1::Builder,
    auto: auto::Builder<TokioExecutor>,
}

/// The first bytes of an HTTP/2 connection with prior knowledge.
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the first bytes `stream` has for reading could begin the HTTP/2
/// preface. `false` also when it closed with none: HTTP/1.1 reads the end.
async fn may_be_http2(stream: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0; HTTP2_PREFACE.len()];
    let seen = stream.peek(&mut first).await?;
    Ok(seen > 0 && first[..seen] == HTTP2_PREFACE[..seen])
}

/// An accepted connection, on its worker's runtime.
struct Opened {
    stream: TcpStream,
    peer: SocketAddr,
    /// When it was accepted, from which its first request is timed.
    accepted_at: Instant,
    activity: Activity,
    service: ConnectionService,
    /// Its place under `max_connections`, given back when it closes.
    permit: OwnedSemaphorePermit,
}

impl Opened {
    fn new(service: HttpService, accepted: Accepted) -> Option<Opened> {
        let Accepted {
            stream,
            peer,
            at,
            permit,
        } = accepted;
        let stream = TcpStream::from_std(stream)
            .map_err(|error| tracing::debug!(%peer, %error, "could not take on a connection"))
            .ok()?;
        let activity = Activity::new(at);
        let service = ConnectionService {
            service,
            client: ClientAddr::new(peer),
            activity: activity.clone(),
        };
        Some(Opened {
            stream,
            peer,
            accepted_at: at,
            activity,
            service,
            permit,
        })
    }

    /// The task that serves this plain connection to its close. Its first
    /// bytes, peeked at, choose the server: hyper's HTTP/1.1 one, unless they
    /// could begin the HTTP/2 preface. So HTTP/1.1 requests are read
    /// without hyper-util's rewinding reader and its choosing, some 120
    /// instructions a request (case 3, callgrind). A connection that sends
    /// nothing in `first_request` is closed, as one that sent part of a
    /// request would be.
    fn serve(
        self,
        servers: &Servers,
        limits: IdleLimits,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (http1, auto) = (servers.http1.clone(), servers.auto.clone());
        let first_bytes_by = self.accepted_at + limits.first_request;
        async move {
            // Bytes first: a request already sent when shutdown begins is
            // answered, as one read before it began would be.
            let peeked = tokio::select! {
                biased;
                peeked = tokio::time::timeout_at(first_bytes_by, may_be_http2(&self.stream)) => peeked,
                () = shutdown.cancelled() => return,
            };
            let Opened {
                stream,
                peer,
                activity,
                service,
                permit,
                ..
            } = self;
            let io = TokioIo::new(stream);
            match peeked {
                Ok(Ok(false)) => {
                    let connection = http1.serve_connection(io, service);
                    drive(connection, activity, limits, shutdown, peer, permit).await;
                }
                Ok(Ok(true)) => {
                    let connection = auto.serve_connection(io, service).into_owned();
                    drive(connection, activity, limits, shutdown, peer, permit).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "connection ended with an error"),
                Err(_silent) => {}
            }
        }
    }

    /// The task that serves this connection to its close, TLS first. The
    /// settings are read now, as the worker takes the connection on.
    fn serve_tls(
        self,
        tls: &Tls,
        builder: auto::Builder<TokioExecutor>,
        metrics: Arc<Metrics>,
        limits: IdleLimits,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (settings, plain_http) = ((tls.current)(), tls.plain_http);
        let Opened {
            stream,
            peer,
            activity,
            mut service,
            permit,
            ..
        } = self;
        async move {
            let handshake = tls::handshake(stream, settings, plain_http, peer, &metrics);
            let Some(stream) = handshake.await else {
                return;
            };
            service.client = service.client.over_tls();
            let builder = tls::for_alpn(builder, &stream);
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            drive(connection, activity, limits, shutdown, peer, permit).await;
        }
    }
}

/// Drives `connection` to its close (see [`conn::drive`]), then gives its
/// place back.
async fn drive<C>(
    connection: C,
    activity: Activity,
    limits: IdleLimits,
    shutdown: CancellationToken,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let ended = conn::drive(
        connection,
        |connection| connection.graceful_shutdown(),
        activity,
        limits,
        shutdown,
    )
    .await;
    if let Err(error) = ended {
        tracing::debug!(%peer, error = %error, "connection ended with an error");
    }
    drop(permit);
}

/// Waits for the worker threads without blocking the caller's runtime.
async fn join(workers: Vec<JoinHandle<()>>) {
    let joined = tokio::task::spawn_blocking(move || {
        for worker in workers {
            if worker.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    });
    let _ = joined.await;
}
