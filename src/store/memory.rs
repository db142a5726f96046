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
    /// Each org's counters, under the org alone: a reservation reads and
    /// adds with one hashed lookup. Keyed by `(org, period)`, the read and
    /// the add took three, each with a clone of the org, some 2,000
    /// instructions a request (callgrind).
    counters: HashMap<OrgId, OrgCounters>,
    settled: HashMap<ReservationId, Instant>,
    last_sweep: Option<Instant>,
}

/// One org's counters.
#[derive(Default)]
struct OrgCounters {
    /// By period start; the sweep keeps the current period and the last.
    periods: Vec<(DateTime<Utc>, Amounts)>,
    gauges: Amounts,
}

impl OrgCounters {
    fn read(&self, period: &Period) -> Amounts {
        let mut usage = self
            .periods
            .iter()
            .find(|(start, _)| *start == period.start)
            .map_or_else(Amounts::default, |(_, amounts)| *amounts);
        for d in Dimension::ALL.into_iter().filter(|d| d.is_gauge()) {
            usage.set(d, self.gauges.get(d));
        }
        usage
    }

    /// The counters of `period`, or of the gauges for a gauge `dimension`.
    fn of(&mut self, period: &Period, dimension: Dimension) -> &mut Amounts {
        if dimension.is_gauge() {
            return &mut self.gauges;
        }
        let at = match self.periods.iter().position(|(s, _)| *s == period.start) {
            Some(at) => at,
            None => {
                self.periods.push((period.start, Amounts::default()));
                self.periods.len() - 1
            }
        };
        &mut self.periods[at].1
    }

    fn add(&mut self, period: &Period, amounts: &Amounts) {
        for (d, amount) in amounts.iter() {
            let counters = self.of(period, d);
            counters.set(d, counters.get(d).saturating_add(amount));
        }
    }
}

impl State {
    fn read(&self, org: &OrgId, period: &Period) -> Amounts {
        self.counters
            .get(org)
            .map_or_else(Amounts::default, |counters| counters.read(period))
    }

    fn org_mut(&mut self, org: &OrgId) -> &mut OrgCounters {
        self.counters.entry(org.clone()).or_default()
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
        let oldest = period.start - chrono::Months::new(1);
        self.counters.retain(|_, counters| {
            counters.periods.retain(|(start, _)| *start >= oldest);
            !counters.periods.is_empty() || counters.gauges != Amounts::default()
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
        let counters = state.org_mut(&request.org);
        let current = counters.read(&request.period);
        let decided = decide(&request.limits, &current, &request.cost, request.mode);
        if let Decision::Admit { applied, .. } = &decided.decision {
            counters.add(&request.period, applied);
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
            let counters = state.org_mut(&settlement.org);
            let current = counters.read(&settlement.period);
            let correction = crate::quota::clamp_releases(&current, &settlement.correction);
            counters.add(&settlement.period, &correction);
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
        state
            .org_mut(org)
            .of(&period, dimension)
            .set(dimension, value);
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
