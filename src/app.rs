//! A configured gateway: the parts built from a [`Config`], and the server
//! that runs them.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use chrono::Utc;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::accept::HttpService;
use crate::config::{Backend, Config, Redacted};
use crate::forward::Forwarder;
use crate::identify::Identifier;
use crate::ledger::{Ledger, Outbox};
use crate::meter::{Clock, Meter};
use crate::metrics::{Metrics, StoreOp};
use crate::org::OrgId;
use crate::quota::Amounts;
use crate::route::{Route, Router};
use crate::stack::{self, Gateway, Observer};
use crate::store::{MemoryStore, QuotaStore, RedisStore, StoreError};

/// The parts every worker shares. Cloning is cheap: it shares them.
#[derive(Clone)]
pub struct App {
    config: Arc<Config>,
    /// The memory store every worker uses, or this handle's own connection
    /// to Redis (each worker opens another).
    store: Arc<dyn QuotaStore>,
    metrics: Arc<Metrics>,
    clock: Clock,
    settling: TaskTracker,
    /// The one outbox of the process, shared by every worker.
    outbox: Arc<Outbox>,
}

/// Why a valid config could not be turned into a running gateway.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("quota store: {0}")]
    Store(#[from] StoreError),
    #[error("upstream TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("starting a worker: {0}")]
    Worker(#[from] std::io::Error),
}

impl App {
    /// Builds the gateway's parts on the wall clock. Nothing connects yet:
    /// upstreams and a Redis store connect on first use.
    pub fn new(config: Config) -> Result<App, StartError> {
        App::with_clock(config, Arc::new(Utc::now))
    }

    /// [`App::new`] with a clock of the caller's, for tests that move time.
    pub fn with_clock(config: Config, clock: Clock) -> Result<App, StartError> {
        let metrics = Arc::<Metrics>::default();
        let outbox = Outbox::new(
            config.store.max_pending_settlements,
            config.store.settle_retry_for,
            metrics.clone(),
        );
        Ok(App {
            store: open_store(&config)?,
            config: Arc::new(config),
            metrics,
            clock,
            settling: TaskTracker::new(),
            outbox: Arc::new(outbox),
        })
    }

    /// The service one worker runs, built on that worker's runtime.
    ///
    /// Upstream connections are the worker's own, and so is its Redis
    /// connection: everything a request waits on is driven by the thread
    /// that serves it. A memory store is one, shared by all.
    fn worker_service(&self) -> Result<HttpService, StartError> {
        let config = &self.config;
        let store = match config.store.backend {
            Backend::Memory => self.store.clone(),
            Backend::Redis(_) => open_store(config)?,
        };
        let meter = Meter {
            ledger: Ledger {
                store,
                store_timeout: config.store.timeout,
                metrics: self.metrics.clone(),
                settling: self.settling.clone(),
                outbox: self.outbox.clone(),
            },
            orgs: config.orgs.clone(),
            max_body_bytes: config.server.max_body_bytes,
            body_read_timeout: config.server.body_read_timeout,
            on_store_error: config.store.on_error,
            clock: self.clock.clone(),
        };
        let forwarder = Forwarder::new(
            config.upstreams.clone(),
            config.server.upstream_timeout,
            config.server.idle_timeout,
            self.metrics.clone(),
        )?;
        let gateway = Gateway::new(
            Router::new(&self.bound_routes(), config.server.paths),
            Identifier::new(config.identity.clone()),
            meter,
            forwarder,
            self.observer(),
        );
        Ok(stack::build(gateway, config.server.body_read_timeout))
    }

    /// The config's routes, each holding its counters in the process's
    /// families: looked up here, once a build, never on a request.
    fn bound_routes(&self) -> Vec<Route> {
        self.config
            .routes
            .iter()
            .map(|route| Route {
                metrics: self.metrics.route(&route.name),
                ..route.clone()
            })
            .collect()
    }

    fn observer(&self) -> Observer {
        let config = &self.config;
        Observer {
            unrouted: self.metrics.route(""),
            upstreams: config
                .upstreams
                .iter()
                .map(|upstream| self.metrics.upstream(&upstream.name))
                .collect(),
            access_log: config.server.access_log,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Settlements not yet confirmed by the store: those on their first
    /// attempt, and those waiting in the outbox.
    pub fn unsettled(&self) -> usize {
        self.settling.len() + self.outbox.len()
    }

    /// `org`'s counters in its current billing period.
    pub async fn usage(&self, org: &OrgId) -> Result<Amounts, StoreError> {
        let period = self.config.orgs.policy(org).period((self.clock)());
        let usage = self
            .metrics
            .timed(StoreOp::Usage, self.store.usage(org, period))
            .await;
        if let Err(error) = &usage {
            self.metrics.store_failed(StoreOp::Usage, error);
        }
        usage
    }

    /// Serves on `listener` with `server.workers` threads until `shutdown`
    /// completes, then drains: open requests get `shutdown_grace` to finish,
    /// and settlements already begun, and those in the outbox, get what is
    /// left of it to reach the store.
    ///
    /// The outbox is retried on this runtime, the one that accepts
    /// connections (see [`crate::ledger::outbox`]), through the app's own
    /// store handle.
    pub async fn serve(
        &self,
        listener: std::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartError> {
        let outbox = self.outbox.clone();
        let (store, timeout) = (self.store.clone(), self.config.store.timeout);
        let retrying = tokio::spawn(async move { outbox.run(store, timeout).await });
        let (shutdown, asked) = noting_when(shutdown);
        let app = self.clone();
        let served = crate::accept::serve_on_workers(
            listener,
            &self.config.server,
            self.metrics.clone(),
            move || app.worker_service(),
            self.settling.clone(),
            shutdown,
        )
        .await;
        let asked = asked.get().copied().unwrap_or_else(Instant::now);
        self.outbox
            .drain(asked + self.config.server.shutdown_grace)
            .await;
        retrying.abort();
        served
    }
}

/// `shutdown`, and when it completed, once it has.
fn noting_when(
    shutdown: impl Future<Output = ()>,
) -> (impl Future<Output = ()>, Arc<OnceLock<Instant>>) {
    let when = Arc::new(OnceLock::new());
    let noted = when.clone();
    let shutdown = async move {
        shutdown.await;
        let _ = noted.set(Instant::now());
    };
    (shutdown, when)
}

fn open_store(config: &Config) -> Result<Arc<dyn QuotaStore>, StoreError> {
    Ok(match &config.store.backend {
        Backend::Memory => Arc::new(MemoryStore::new()),
        Backend::Redis(Redacted(target)) => Arc::new(RedisStore::new(
            target,
            &config.store.key_prefix,
            config.store.timeout,
            config.store.settle_retry_for,
        )?),
    })
}
