//! tollgate: a reverse proxy that enforces billing quotas.
//!
//! A request meets these modules in this order:
//!
//! 1. [`accept`]: the listener, whose connections are dealt to worker
//!    threads (one single-threaded runtime each); optional TLS (rustls,
//!    the certificate of the current config), HTTP/1.1 and HTTP/2, the
//!    connection limit, the first-request and keep-alive timeouts, the
//!    client's request body (400, 408), graceful shutdown.
//!
//!    Around the steps below, [`stack`]: the tower layers, and the gateway
//!    service that runs the steps in order.
//! 2. [`route`]: method + path to a configured route (404 when none), on
//!    the path in the canonical form it is also forwarded in, with no
//!    method-override header left (400 for an ambiguous path or a standard
//!    method in another letter case).
//! 3. [`identify`]: the org that pays: gateway API key, verified JWT or an
//!    org header from a trusted peer (401; 400 for a repeated credential).
//! 4. [`meter`]: buffer the body (413, 408), price it (an estimate of an
//!    LLM body, with its completion bound, by [`llm`]; 400), reserve it in
//!    the [`store`] by the pure [`quota`] decision for the org's [`period`]
//!    (402, or 503 when the store fails).
//! 5. [`forward`]: the upstream request over HTTP (each worker's own
//!    connection pool) or HTTPS, and its streamed response (502, 504; a
//!    silent body is cut).
//! 6. [`settle`]: refund a reservation whose upstream call failed, or
//!    reconcile an estimate with the usage the response reports
//!    ([`settle::tap`], reading it by [`llm`]).
//!
//!    Between the two, [`ledger`]: a reservation, from the store call that
//!    meter starts to the one settlement that settle makes, and the outbox
//!    where what the store did not confirm waits to be retried.
//!
//! Before the path, [`live`]: the config snapshot a request runs on, swapped
//! whole by a reload; the stack's gateway rebuilds each worker's steps from
//! a new one.
//!
//! Beside the path: [`admin`] (the admin listener: health, metrics, the
//! usage API, runtime orgs and keys, the dry run, reload), [`llm`] (the
//! provider formats: the request side for
//! meter, the response side for settle), [`config`] (two-stage loading), [`org`] (plans and
//! per-org policy), [`catalog`] (the runtime orgs and keys, cached from the
//! store for identify and meter), [`error`] (every gateway-made answer and its JSON
//! envelope), [`metrics`], [`gathered`] (a body read whole, kept as its one
//! frame when it comes in one), [`silence`] (the idle timer of request and
//! response bodies), [`deadline`] (one coarse clock for each of a worker's
//! upstream and store timeouts), [`app`] (wiring a config into a server) and [`demo`].

#![forbid(unsafe_code)]

pub mod accept;
pub mod admin;
pub mod app;
pub mod catalog;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod error;
pub mod forward;
pub mod gathered;
pub mod identify;
pub mod ledger;
pub mod live;
pub mod llm;
pub mod meter;
pub mod metrics;
pub mod org;
pub mod period;
pub mod quota;
pub mod route;
pub mod settle;
pub mod silence;
pub mod stack;
pub mod store;
pub mod usage;
pub mod usage_link;
pub mod usage_page;

pub use app::App;
pub use config::Config;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response inside the gateway.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A body of bytes already in hand.
pub fn full_body(bytes: Bytes) -> Body {
    Body::new(Full::new(bytes).map_err(|never| match never {}))
}
