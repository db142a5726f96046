//! The embedded store: counters in this process, for a single instance and
//! for trying the gateway with nothing else installed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    CatalogChange, CatalogWrite, KeyRecord, QuotaStore, ReservationId, ReserveRequest, Settlement,
    StoreError, StoredCatalog,
};
use crate::org::{OrgId, OrgRecord};
use crate::period::Period;
use crate::quota::{Amounts, Decided, Decision, Dimension, decide};

/// How long a settled reservation id is remembered, so that a repeated
/// settlement is recognised. Not sized from `store.settle_retry_for`: a
/// settlement here fails only on a poisoned lock, which stays poisoned, so
/// none is applied by a retry.
const SETTLED_TTL: Duration = Duration::from_secs(600);

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// Apart from the counters, so that an operator's change never waits
    /// on the request path's lock.
    catalog: Mutex<StoredCatalog>,
}

#[derive(Default)]
struct State {
    /// Period counters under `(org, period start)`; gauges under `(org, None)`.
    counters: HashMap<(OrgId, Option<DateTime<Utc>>), Amounts>,
    settled: HashMap<ReservationId, Instant>,
    last_sweep: Option<Instant>,
}

impl State {
    fn read(&self, org: &OrgId, period: &Period) -> Amounts {
        let mut usage = self
            .counters
            .get(&(org.clone(), Some(period.start)))
            .copied()
            .unwrap_or_default();
        let gauges = self
            .counters
            .get(&(org.clone(), None))
            .copied()
            .unwrap_or_default();
        for d in Dimension::ALL.into_iter().filter(|d| d.is_gauge()) {
            usage.set(d, gauges.get(d));
        }
        usage
    }

    fn add(&mut self, org: &OrgId, period: &Period, amounts: &Amounts) {
        for (d, amount) in amounts.iter() {
            let key = (org.clone(), (!d.is_gauge()).then_some(period.start));
            let counters = self.counters.entry(key).or_default();
            counters.set(d, counters.get(d).saturating_add(amount));
        }
    }

    /// Drops settlement markers past their time and counters of periods that
    /// ended before `period` began, at most once per [`SETTLED_TTL`].
    fn sweep(&mut self, period: &Period) {
        let now = Instant::now();
        if self
            .last_sweep
            .is_some_and(|last| now.duration_since(last) < SETTLED_TTL)
        {
            return;
        }
        self.last_sweep = Some(now);
        self.settled
            .retain(|_, at| now.duration_since(*at) < SETTLED_TTL);
        let current = period.start;
        self.counters.retain(|(_, start), _| {
            start.is_none_or(|start| start >= current - chrono::Months::new(1))
        });
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>, StoreError> {
        // A poisoned lock means a panic mid-update: refuse rather than trust the counters.
        self.state
            .lock()
            .map_err(|_| StoreError::Backend("memory store lock poisoned".into()))
    }

    /// Applies `change`, counting it in the version if it changed anything.
    fn change(&self, change: CatalogChange) -> Result<CatalogWrite, StoreError> {
        let mut catalog = self
            .catalog
            .lock()
            .map_err(|_| StoreError::Backend("memory store catalog lock poisoned".into()))?;
        let changed = catalog.apply(&change);
        catalog.version += u64::from(changed);
        Ok(CatalogWrite {
            version: catalog.version,
            changed,
        })
    }
}

#[async_trait]
impl QuotaStore for MemoryStore {
    async fn reserve(&self, request: &ReserveRequest) -> Result<Decided, StoreError> {
        let mut state = self.state()?;
        state.sweep(&request.period);
        let current = state.read(&request.org, &request.period);
        let decided = decide(&request.limits, &current, &request.cost, request.mode);
        if let Decision::Admit { applied, .. } = &decided.decision {
            state.add(&request.org, &request.period, applied);
        }
        Ok(decided)
    }

    async fn settle(&self, settlement: &Settlement) -> Result<(), StoreError> {
        let mut state = self.state()?;
        if state
            .settled
            .insert(settlement.id, Instant::now())
            .is_none()
        {
            let current = state.read(&settlement.org, &settlement.period);
            let correction = crate::quota::clamp_releases(&current, &settlement.correction);
            state.add(&settlement.org, &settlement.period, &correction);
        }
        Ok(())
    }

    async fn usage(&self, org: &OrgId, period: Period) -> Result<Amounts, StoreError> {
        Ok(self.state()?.read(org, &period))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn set_usage(
        &self,
        org: &OrgId,
        period: Period,
        dimension: Dimension,
        value: i64,
    ) -> Result<(), StoreError> {
        let mut state = self.state()?;
        let key = (org.clone(), (!dimension.is_gauge()).then_some(period.start));
        state.counters.entry(key).or_default().set(dimension, value);
        Ok(())
    }

    async fn put_org(&self, org: &OrgId, record: &OrgRecord) -> Result<CatalogWrite, StoreError> {
        self.change(CatalogChange::Org(org.clone(), Some(record.clone())))
    }

    async fn delete_org(&self, org: &OrgId) -> Result<CatalogWrite, StoreError> {
        self.change(CatalogChange::Org(org.clone(), None))
    }

    async fn put_key(&self, key: &KeyRecord) -> Result<CatalogWrite, StoreError> {
        self.change(CatalogChange::Key(key.id.clone(), Some(key.clone())))
    }

    async fn delete_key(&self, id: &str) -> Result<CatalogWrite, StoreError> {
        self.change(CatalogChange::Key(id.to_string(), None))
    }

    async fn catalog(&self) -> Result<StoredCatalog, StoreError> {
        self.catalog
            .lock()
            .map(|catalog| catalog.clone())
            .map_err(|_| StoreError::Backend("memory store catalog lock poisoned".into()))
    }

    async fn catalog_version(&self) -> Result<u64, StoreError> {
        self.catalog
            .lock()
            .map(|catalog| catalog.version)
            .map_err(|_| StoreError::Backend("memory store catalog lock poisoned".into()))
    }
}
