//! A configured gateway: the parts built from a [`Config`], and the server
//! that runs them.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use chrono::Utc;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::BoxError;
use crate::accept::{HttpService, Tls};
use crate::catalog::Catalog;
use crate::config::{Backend, Config, Redacted};
use crate::deadline::Deadlines;
use crate::error::GatewayError;
use crate::forward::Forwarder;
use crate::identify::Identifier;
use crate::ledger::{Ledger, Outbox};
use crate::live::{Live, ReloadError, Reloaded};
use crate::meter::{Clock, Meter};
use crate::metrics::{Metrics, StoreOp};
use crate::org::{OrgId, OrgPolicy};
use crate::period::Period;
use crate::quota::{Amounts, Dimension};
use crate::route::{Route, Router};
use crate::stack::{self, BuildSteps, Gateway, Observer, Steps};
use crate::store::{MemoryStore, QuotaStore, RedisStore, StoreError};
use crate::usage::UsageReader;
use crate::usage_page::UsagePage;

/// The parts every worker shares. Cloning is cheap: it shares them.
#[derive(Clone)]
pub struct App {
    /// The config new requests run on, swapped by a reload.
    live: Arc<Live>,
    /// The memory store every worker uses, or this handle's own connection
    /// to Redis (each worker opens another).
    store: Arc<dyn QuotaStore>,
    metrics: Arc<Metrics>,
    clock: Clock,
    settling: TaskTracker,
    /// The one outbox of the process, shared by every worker.
    outbox: Arc<Outbox>,
    /// The runtime orgs and keys, kept fresh from the store; outlives a
    /// reload, which hands it the new config's orgs
    /// ([`Catalog::set_directory`]).
    catalog: Arc<Catalog>,
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
    #[error("building a worker's steps: {0}")]
    Steps(BoxError),
}

impl App {
    /// Builds the gateway's parts on the wall clock. Nothing connects yet:
    /// upstreams and a Redis store connect on first use.
    pub fn new(config: Config) -> Result<App, StartError> {
        App::with_clock(config, Arc::new(Utc::now))
    }

    /// [`App::new`] with a clock of the caller's, for tests that move time.
    pub fn with_clock(config: Config, clock: Clock) -> Result<App, StartError> {
        App::build(config, None, clock)
    }

    /// A gateway on `config`, read from `path`, which a reload reads again.
    pub fn reloadable(config: Config, path: PathBuf, clock: Clock) -> Result<App, StartError> {
        App::build(config, Some(path), clock)
    }

    fn build(config: Config, path: Option<PathBuf>, clock: Clock) -> Result<App, StartError> {
        let metrics = Arc::<Metrics>::default();
        let outbox = Outbox::new(
            config.store.max_pending_settlements,
            config.store.settle_retry_for,
            metrics.clone(),
        );
        let store = open_store(&config)?;
        let catalog = Arc::new(Catalog::new(store.clone(), config.orgs.clone()));
        Ok(App {
            store,
            catalog,
            live: Arc::new(Live::new(config, path)),
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
        let store = match self.live.config().store.backend {
            Backend::Memory => self.store.clone(),
            Backend::Redis(_) => open_store(&self.live.config())?,
        };
        let app = self.clone();
        let build: BuildSteps =
            Box::new(move |generation, config| app.steps(generation, config, store.clone()));
        let gateway = Gateway::new(self.live.clone(), build).map_err(StartError::Steps)?;
        Ok(stack::build(gateway))
    }

    /// One worker's steps on `config`, with the worker's `store`.
    fn steps(
        &self,
        generation: u64,
        config: Arc<Config>,
        store: Arc<dyn QuotaStore>,
    ) -> Result<Steps, BoxError> {
        let meter = Meter {
            ledger: Ledger {
                store,
                store_deadlines: Deadlines::new(config.store.timeout),
                metrics: self.metrics.clone(),
                settling: self.settling.clone(),
                outbox: self.outbox.clone(),
            },
            rate_limit_policies: Default::default(),
            periods: Default::default(),
            catalog: self.catalog.clone(),
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
        let usage_page = config.usage_page.clone().map(|page| {
            let reader = UsageReader {
                store: meter.ledger.store.clone(),
                catalog: self.catalog.clone(),
                clock: self.clock.clone(),
                timeout: config.store.timeout,
            };
            UsagePage::new(page, reader)
        });
        Ok(Steps::new(
            generation,
            config.clone(),
            Router::new(&self.bound_routes(&config), config.server.paths),
            Identifier::new(config.identity.clone()).with_catalog(self.catalog.clone()),
            meter,
            forwarder,
            self.observer(&config),
            usage_page,
        ))
    }

    /// The config new requests run on.
    pub fn config(&self) -> Arc<Config> {
        self.live.config()
    }

    /// Reads the config file again and applies it to new requests; a file
    /// with problems changes nothing, and each problem is logged.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let reloaded = self.live.reload();
        self.metrics.reloaded(reloaded.is_ok());
        if reloaded.is_ok() {
            // Runtime orgs resolve against the file's plans, orgs and defaults.
            self.catalog.set_directory(self.live.config().orgs.clone());
        }
        match &reloaded {
            Ok(Reloaded { restart_required }) if restart_required.is_empty() => {
                tracing::info!("config reloaded");
            }
            Ok(Reloaded { restart_required }) => tracing::warn!(
                keys = ?restart_required,
                "config reloaded; changes to these keys apply only after a restart"
            ),
            Err(error) => {
                for line in error.to_string().lines() {
                    tracing::error!("config not reloaded: {line}");
                }
            }
        }
        reloaded
    }

    /// The runtime orgs and keys: what the admin API reads and changes.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The config's routes, each holding its counters in the process's
    /// families: looked up here, once a build, never on a request.
    fn bound_routes(&self, config: &Config) -> Vec<Route> {
        config
            .routes
            .iter()
            .map(|route| Route {
                metrics: self.metrics.route(&route.name),
                ..route.clone()
            })
            .collect()
    }

    fn observer(&self, config: &Config) -> Observer {
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

    /// The gateway's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
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
        Ok(self.usage_now(org).await?.2)
    }

    /// `org`'s policy now, its current period, and its counters in that
    /// period, read from the store: the three of one moment.
    pub async fn usage_now(
        &self,
        org: &OrgId,
    ) -> Result<(Arc<OrgPolicy>, Period, Amounts), StoreError> {
        let (policy, period) = self.policy_now(org);
        let used = self.store_call(self.store.usage(org, period)).await?;
        Ok((policy, period, used))
    }

    /// The policy `org` is metered on now, and its current period.
    pub fn policy_now(&self, org: &OrgId) -> (Arc<OrgPolicy>, Period) {
        let policy = self.catalog.policy(org);
        let period = policy.period((self.clock)());
        (policy, period)
    }

    /// Sets one of `org`'s counters in its current period (seats: the gauge).
    pub async fn set_usage(
        &self,
        org: &OrgId,
        dimension: Dimension,
        value: i64,
    ) -> Result<(), StoreError> {
        let (_, period) = self.policy_now(org);
        self.store_call(self.store.set_usage(org, period, dimension, value))
            .await
    }

    /// Sets every period counter of `org`'s current period to 0; seats,
    /// held rather than used, stay.
    pub async fn reset_usage(&self, org: &OrgId) -> Result<(), StoreError> {
        for dimension in Dimension::ALL.into_iter().filter(|d| !d.is_gauge()) {
            self.set_usage(org, dimension, 0).await?;
        }
        Ok(())
    }

    /// Whether the store answers within `store.timeout`.
    pub async fn ready(&self) -> Result<(), StoreError> {
        self.store_call(self.store.ping()).await
    }

    /// One call to the store from outside the request path, bounded by
    /// `store.timeout` like those on it.
    async fn store_call<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let timeout = self.live.config().store.timeout;
        let timed = self.metrics.timed(StoreOp::Usage, call);
        let result = tokio::time::timeout(timeout, timed)
            .await
            .unwrap_or(Err(StoreError::Timeout));
        if let Err(error) = &result {
            self.metrics.store_failed(StoreOp::Usage, error);
        }
        result
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
        let config = self.live.config();
        let (store, timeout) = (self.store.clone(), config.store.timeout);
        let retrying = tokio::spawn(async move { outbox.run(store, timeout).await });
        // Only a shared store changes under this process's feet; the memory
        // store's catalog changes through this catalog alone.
        let watching = matches!(config.store.backend, Backend::Redis(_))
            .then(|| tokio::spawn(self.catalog.clone().keep_fresh()));
        let (shutdown, asked) = noting_when(shutdown);
        let app = self.clone();
        let served = crate::accept::serve_on_workers(
            listener,
            &config.server,
            self.metrics.clone(),
            move || app.worker_service(),
            self.tls(&config),
            self.settling.clone(),
            shutdown,
        )
        .await;
        let asked = asked.get().copied().unwrap_or_else(Instant::now);
        self.outbox
            .drain(asked + config.server.shutdown_grace)
            .await;
        retrying.abort();
        if let Some(watching) = watching {
            watching.abort();
        }
        served
    }
}

impl App {
    /// TLS on the listener, when `config` (the config it starts with) has
    /// it: each handshake takes the current config's certificate. Whether
    /// there is TLS at all stays as it started (see [`crate::live`]).
    fn tls(&self, config: &Config) -> Option<Tls> {
        let started = config.server.tls.clone()?;
        let live = self.live.clone();
        let current = move || {
            live.config()
                .server
                .tls
                .clone()
                .unwrap_or_else(|| started.clone())
        };
        Some(Tls {
            current: Arc::new(current),
            plain_http: || GatewayError::PlainHttpOnTlsPort.into_response(),
        })
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
