//! Step 1: accepting connections.
//!
//! HTTP/1.1 and HTTP/2 (by preface) on one listener, a deadline for request
//! headers, and graceful shutdown: on the signal the listener closes, open
//! connections finish their in-flight requests, and whatever is still open
//! when the grace period ends is dropped.

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower_http::add_extension::AddExtension;

use crate::config::ServerConfig;
use crate::stack::{ClientAddr, HttpService};

/// Serves `service` on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    service: HttpService,
    server: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    // Held so that connections still open when the grace period ends can be
    // cut; finished ones are reaped as new ones arrive.
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
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
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let service =
            TowerToHyperService::new(AddExtension::new(service.clone(), ClientAddr(peer)));
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, error = %error, "connection ended with an error");
            }
        });
    }

    drop(listener);
    tracing::info!(grace = ?server.shutdown_grace, "shutting down: no new connections, draining");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(server.shutdown_grace) => {
            tracing::warn!(open = connections.len(), "grace period over, dropping open connections");
        }
    }
    connections.abort_all();
}
