//! A configured gateway: the parts built from a [`Config`], and the server
//! that runs them.

use std::future::Future;
use std::sync::Arc;

use chrono::Utc;
use tokio::net::TcpListener;

use crate::config::{Backend, Config, Redacted};
use crate::forward::Forwarder;
use crate::identify::Identifier;
use crate::meter::{Clock, Meter};
use crate::metrics::Metrics;
use crate::org::OrgId;
use crate::quota::Amounts;
use crate::route::Router;
use crate::stack::{self, Gateway};
use crate::store::{MemoryStore, QuotaStore, RedisStore, StoreError};

pub struct App {
    config: Config,
    store: Arc<dyn QuotaStore>,
    metrics: Arc<Metrics>,
    clock: Clock,
    service: stack::HttpService,
}

/// Why a valid config could not be turned into a running gateway.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("quota store: {0}")]
    Store(#[from] StoreError),
    #[error("upstream TLS: {0}")]
    Tls(#[from] rustls::Error),
}

impl App {
    /// Builds the gateway's parts on the wall clock. Nothing connects yet:
    /// upstreams and a Redis store connect on first use.
    pub fn new(config: Config) -> Result<App, StartError> {
        App::with_clock(config, Arc::new(Utc::now))
    }

    /// [`App::new`] with a clock of the caller's, for tests that move time.
    pub fn with_clock(config: Config, clock: Clock) -> Result<App, StartError> {
        let store: Arc<dyn QuotaStore> = match &config.store.backend {
            Backend::Memory => Arc::new(MemoryStore::new()),
            Backend::Redis(Redacted(target)) => Arc::new(RedisStore::new(
                target,
                &config.store.key_prefix,
                config.store.timeout,
            )?),
        };
        let metrics = Arc::<Metrics>::default();
        let meter = Meter {
            store: store.clone(),
            orgs: config.orgs.clone(),
            max_body_bytes: config.server.max_body_bytes,
            body_read_timeout: config.server.body_read_timeout,
            store_timeout: config.store.timeout,
            on_store_error: config.store.on_error,
            metrics: metrics.clone(),
            clock: clock.clone(),
        };
        let service = stack::build(Gateway::new(
            Router::new(&config.routes),
            Identifier::new(config.identity.clone()),
            meter,
            Forwarder::new(
                config.upstreams.clone(),
                config.server.upstream_timeout,
                config.server.idle_timeout,
            )?,
        ));
        Ok(App {
            config,
            store,
            metrics,
            clock,
            service,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn QuotaStore> {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// `org`'s counters in its current billing period.
    pub async fn usage(&self, org: &OrgId) -> Result<Amounts, StoreError> {
        let period = self.config.orgs.policy(org).period((self.clock)());
        self.store.usage(org, period).await
    }

    /// Serves on `listener` until `shutdown` completes, then drains.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        crate::accept::serve(
            listener,
            self.service.clone(),
            &self.config.server,
            shutdown,
        )
        .await;
    }
}
