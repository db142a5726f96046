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
}

impl App {
    /// Builds the gateway's parts. Nothing connects yet: a Redis store
    /// connects on first use.
    pub fn new(config: Config) -> Result<App, StoreError> {
        let store: Arc<dyn QuotaStore> = match &config.store.backend {
            Backend::Memory => Arc::new(MemoryStore::new()),
            Backend::Redis(Redacted(target)) => Arc::new(RedisStore::new(
                target,
                &config.store.key_prefix,
                config.store.timeout,
            )?),
        };
        Ok(App {
            config,
            store,
            metrics: Arc::default(),
            clock: Arc::new(Utc::now),
        })
    }

    /// Replaces the wall clock, for tests that move time.
    pub fn with_clock(mut self, clock: Clock) -> App {
        self.clock = clock;
        self
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

    /// The tower stack for this config.
    pub fn service(&self) -> stack::HttpService {
        let config = &self.config;
        let meter = Meter {
            store: self.store.clone(),
            orgs: config.orgs.clone(),
            max_body_bytes: config.server.max_body_bytes,
            body_read_timeout: config.server.body_read_timeout,
            store_timeout: config.store.timeout,
            on_store_error: config.store.on_error,
            metrics: self.metrics.clone(),
            clock: self.clock.clone(),
        };
        stack::build(Gateway::new(
            Router::new(&config.routes),
            Identifier::new(config.identity.clone()),
            meter,
            Forwarder::new(config.upstreams.clone(), config.server.upstream_timeout),
        ))
    }

    /// Serves on `listener` until `shutdown` completes, then drains.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        crate::accept::serve(listener, self.service(), &self.config.server, shutdown).await;
    }
}
