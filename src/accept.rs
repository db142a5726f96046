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
//! Each connection speaks HTTP/1.1 or HTTP/2 (by preface), must send its
//! request headers in time, and shuts down gracefully: on the signal the
//! listener closes, open connections finish their in-flight requests,
//! whatever is still open when the grace period ends is dropped, and
//! settlements already started are given the same grace to complete.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::thread::JoinHandle;
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;
use tower::util::BoxCloneSyncService;
use tower_http::add_extension::AddExtension;

use crate::Body;
use crate::config::ServerConfig;

/// The whole gateway as one cloneable HTTP service.
pub type HttpService = BoxCloneSyncService<Request<Incoming>, Response<Body>, Infallible>;

/// The client's address, added to each request by the accept step: the TCP
/// peer's IP, which decides whether an org header is believed, and the same
/// IP as an `X-Forwarded-For` entry, rendered once per connection rather
/// than once per request.
#[derive(Clone, Debug)]
pub struct ClientAddr {
    pub ip: IpAddr,
    pub forwarded_for: HeaderValue,
}

impl ClientAddr {
    pub fn new(addr: SocketAddr) -> ClientAddr {
        // On a dual-stack listener an IPv4 client arrives as ::ffff:a.b.c.d;
        // it is matched and reported as the IPv4 address it is.
        let ip = addr.ip().to_canonical();
        // An IP's text is always a valid header value.
        let forwarded_for = HeaderValue::try_from(ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ClientAddr { ip, forwarded_for }
    }
}

/// A connection on its way to a worker.
type Accepted = (std::net::TcpStream, SocketAddr);

/// Serves `listener` on `server.workers` threads, each running the service
/// `service_for_worker` builds on it, until `shutdown` completes; then
/// drains every worker and waits for the `settling` tasks.
///
/// Returns an error, with every worker stopped, if one could not start:
/// the error `service_for_worker` gave, or why a thread or runtime could not.
pub async fn serve_on_workers<E>(
    listener: std::net::TcpListener,
    server: &ServerConfig,
    service_for_worker: impl Fn() -> Result<HttpService, E> + Send + Sync + 'static,
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
        accept(&listener, &queues, shutdown).await;
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

/// Accepts until `shutdown`, dealing connections to the worker queues in turn.
async fn accept(
    listener: &TcpListener,
    queues: &[mpsc::UnboundedSender<Accepted>],
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small request/response exchanges must not wait on Nagle's algorithm.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let mut connection = Some((stream, peer));
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

/// One worker thread: its queue of connections, and what it needs to drain.
struct Worker {
    connections: mpsc::UnboundedReceiver<Accepted>,
    server: ServerConfig,
    settling: TaskTracker,
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
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(server.header_read_timeout)
            .keep_alive(true);
        builder.http2().timer(TokioTimer::new());
        let graceful = GracefulShutdown::new();
        // Held so that connections still open when the grace period ends can
        // be cut; finished ones are reaped as new ones arrive.
        let mut open = JoinSet::new();

        while let Some((stream, peer)) = self.connections.recv().await {
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::debug!(%peer, %error, "could not take on a connection");
                    continue;
                }
            };
            let service =
                TowerToHyperService::new(AddExtension::new(service.clone(), ClientAddr::new(peer)));
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let connection = graceful.watch(connection);
            while open.try_join_next().is_some() {}
            open.spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%peer, error = %error, "connection ended with an error");
                }
            });
        }

        let deadline = tokio::time::Instant::now() + server.shutdown_grace;
        tokio::select! {
            () = graceful.shutdown() => tracing::debug!("all connections drained"),
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(open = open.len(), "grace period over, dropping open connections");
            }
        }
        open.abort_all();
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
