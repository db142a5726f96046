//! The least a reverse proxy built from tollgate's own crates can do, for
//! the load benchmarks (`benches/run`): hyper's HTTP/1.1 server, and per
//! client connection one upstream connection from hyper's HTTP/1.1 client,
//! on one single-threaded runtime per worker as tollgate runs. No routing,
//! no header rewriting, no tower layers, no pool, no timeouts (not even
//! for reading a request's head), HTTP/1.1 only (tollgate's server also
//! detects HTTP/2), no metering. What tollgate costs above this is what its
//! own code costs; what this costs above nginx is what hyper and tokio cost.
//!
//! Its workers all accept from the one listening socket, as nginx's do by
//! default, where tollgate's acceptor hands connections out round-robin: with
//! few long-lived connections (a load generator's) one worker may get more
//! than its share here.
//!
//! Usage: bare_proxy LISTEN_ADDR UPSTREAM_ADDR WORKERS

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type Failure = Box<dyn std::error::Error + Send + Sync>;

async fn proxy(
    upstream: Arc<Mutex<SendRequest<Incoming>>>,
    request: Request<Incoming>,
) -> Result<Response<Incoming>, Failure> {
    // HTTP/1.1 requests on one connection come one at a time, so the lock
    // is never contended; it only lets the service be called through `&`.
    let lock = || upstream.lock().map_err(|_| Failure::from("poisoned"));
    poll_fn(|cx| lock()?.poll_ready(cx).map_err(Failure::from)).await?;
    let response = lock()?.send_request(request);
    Ok(response.await?)
}

async fn serve(client: TcpStream, upstream_addr: SocketAddr) -> Result<(), Failure> {
    client.set_nodelay(true)?;
    let upstream = TcpStream::connect(upstream_addr).await?;
    upstream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(upstream)).await?;
    tokio::spawn(connection);
    let sender = Arc::new(Mutex::new(sender));
    hyper::server::conn::http1::Builder::new()
        .serve_connection(
            TokioIo::new(client),
            service_fn(move |request| proxy(sender.clone(), request)),
        )
        .await?;
    Ok(())
}

fn main() -> Result<(), Failure> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_proxy LISTEN_ADDR UPSTREAM_ADDR WORKERS";
    let (Some(listen), Some(upstream), Some(workers)) = (args.next(), args.next(), args.next())
    else {
        return Err(usage.into());
    };
    let upstream: SocketAddr = upstream.parse()?;
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let threads = (0..workers.parse::<usize>()?)
        .map(|_| {
            let listener = listener.try_clone()?;
            Ok(std::thread::spawn(move || -> Result<(), Failure> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    // Every worker accepts from the one socket.
                    let listener = TcpListener::from_std(listener)?;
                    loop {
                        let (client, _) = listener.accept().await?;
                        tokio::spawn(async move {
                            let _ = serve(client, upstream).await;
                        });
                    }
                })
            }))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    for thread in threads {
        thread.join().map_err(|_| "a worker panicked")??;
    }
    Ok(())
}
