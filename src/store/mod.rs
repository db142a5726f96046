//! The quota store: per-org counters, one atomic reservation at a time.
//!
//! Every backend implements [`QuotaStore`] with the same meaning, checked by
//! one conformance suite: a reservation checks every dimension of a cost and
//! applies all of it or none (by [`quota::decide`]), and a settlement applies
//! its correction at most once per reservation id. Counters of a period
//! dimension are kept per billing period; gauges (seats) are not.
//!
//! [`quota::decide`]: crate::quota::decide

mod memory;
mod redis;

pub use memory::MemoryStore;
/// The Redis scripts' replies, read; public for the fuzz targets in fuzz/.
pub use redis::reply as redis_reply;
pub use redis::{PERIOD_KEY_GRACE, RedisStore, RedisTarget};

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::org::{OrgId, OrgRecord};
use crate::period::Period;
use crate::quota::{Amounts, Decided, Dimension, Limits, Mode};

/// What a metered request gets when the store cannot answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStoreError {
    /// Forward it uncounted (fail open), as the source system did.
    Allow,
    /// Answer 503.
    Deny,
    /// Forward it, and charge its cost once the store answers again,
    /// without a limit check (see [`crate::ledger::outbox`]).
    Defer,
}

/// Names one reservation across every gateway instance sharing a store.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReservationId(u128);

impl ReservationId {
    /// A fresh id: a random per-process half, so instances never collide,
    /// and a counter, so ids within the process never repeat.
    pub fn next() -> ReservationId {
        static PROCESS: LazyLock<u64> =
            LazyLock::new(|| RandomState::new().hash_one(std::process::id()));
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        ReservationId((u128::from(*PROCESS) << 64) | u128::from(count))
    }

    /// The id as 32 lowercase hex digits, as in store keys and logs.
    pub fn hex(&self) -> String {
        String::from_utf8_lossy(&self.hex_bytes()).into_owned()
    }

    /// [`ReservationId::hex`] without a `String`, for keys and arguments
    /// written straight into a buffer.
    pub fn hex_bytes(&self) -> [u8; 32] {
        let mut hex = [b'0'; 32];
        // The only error is a buffer of the wrong size, and 16 bytes take 32.
        let _ = hex::encode_to_slice(self.0.to_be_bytes(), &mut hex);
        hex
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Reserve `cost` for `org` in `period`, against `limits`.
#[derive(Clone, Debug)]
pub struct ReserveRequest {
    pub id: ReservationId,
    pub org: OrgId,
    pub period: Period,
    pub limits: Limits,
    pub cost: Amounts,
    /// [`Mode::Enforce`] denies past a limit; [`Mode::Shadow`] applies the
    /// cost anyway and reports the limit it passed.
    pub mode: Mode,
}

/// Correct reservation `id` by `correction` (negative refunds).
///
/// Made once and retried as it is: a store may file the record that it was
/// applied under `made_at`, and every retry finds it there.
#[derive(Clone, Debug)]
pub struct Settlement {
    pub id: ReservationId,
    pub org: OrgId,
    pub period: Period,
    pub correction: Amounts,
    /// When the settlement was made, in seconds since the Unix epoch.
    pub made_at: u64,
}

impl Settlement {
    /// A settlement made now.
    pub fn new(id: ReservationId, org: OrgId, period: Period, correction: Amounts) -> Settlement {
        let made_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        Settlement {
            id,
            org,
            period,
            correction,
            made_at,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the quota store did not answer in time")]
    Timeout,
    #[error("the quota store failed: {0}")]
    Backend(String),
    /// A key of the org's holds what tollgate did not write there: the
    /// store works, but not for this org until someone repairs the key.
    #[error("a quota key of org {0} holds something tollgate did not write there")]
    DamagedKey(OrgId),
}

/// A reservation as [`QuotaStore::begin_reserve`] left it.
pub enum Begun {
    /// Decided as it was asked.
    Decided(Result<Decided, StoreError>),
    /// On its way: the decision comes on this reply.
    Queued(Reply<Decided>),
    /// Not begun: the caller awaits [`QuotaStore::reserve`] with it.
    Later(ReserveRequest),
}

/// Where the outcome of a settlement goes when the store sees to it
/// itself ([`QuotaStore::begin_settle`]): the ledger's outbox, which
/// keeps what the store did not confirm.
pub trait Settled: Send + Sync + 'static {
    /// `settlement` was applied (`Ok`), or not confirmed, `took` after it
    /// was begun.
    fn settled(&self, settlement: &Settlement, outcome: Result<(), StoreError>, took: Duration);
}

/// A settlement as [`QuotaStore::begin_settle`] left it.
pub enum SettleBegun {
    /// The store sees to it, its outcome to the report.
    Taken,
    /// Handed back, for the caller to await [`QuotaStore::settle`].
    Later(Settlement, Report),
}

/// Whom a settlement's outcome is reported to, the hold on the ledger's
/// tracker that keeps shutdown waiting until it has been, and how long the
/// store has to confirm it (`store.timeout`, as the config now says).
pub struct Report {
    pub to: Arc<dyn Settled>,
    pub hold: TaskTrackerToken,
    pub begun: tokio::time::Instant,
    pub timeout: Duration,
}

impl Report {
    /// Reports `outcome` of `settlement`, letting go of the hold.
    pub fn settled(self, settlement: &Settlement, outcome: Result<(), StoreError>) {
        self.to.settled(settlement, outcome, self.begun.elapsed());
    }
}

/// The outcome of a call a store's sender task makes, once it has.
pub struct Reply<T>(oneshot::Receiver<Result<T, StoreError>>);

impl<T> Reply<T> {
    /// A reply and where its outcome is sent.
    pub fn channel() -> (oneshot::Sender<Result<T, StoreError>>, Reply<T>) {
        let (sender, receiver) = oneshot::channel();
        (sender, Reply(receiver))
    }
}

impl<T> Future for Reply<T> {
    type Output = Result<T, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|outcome| {
            outcome.unwrap_or_else(|_| {
                Err(StoreError::Backend("the store's call queue is gone".into()))
            })
        })
    }
}

/// A runtime API key: only its digest is kept, never the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// 32 lowercase hex digits, random.
    pub id: String,
    pub org: OrgId,
    pub name: String,
    pub sha256: [u8; 32],
    pub created_at: DateTime<Utc>,
}

/// Every runtime org and key in the store, as of `version`: the number of
/// changes made to them, which only grows while the store keeps its data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredCatalog {
    pub version: u64,
    pub orgs: HashMap<OrgId, OrgRecord>,
    /// By key id.
    pub keys: HashMap<String, KeyRecord>,
}

/// One change to the catalog: a record set, or removed (`None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CatalogChange {
    Org(OrgId, Option<OrgRecord>),
    Key(String, Option<KeyRecord>),
}

impl StoredCatalog {
    /// Applies `change`; whether it changed anything.
    pub fn apply(&mut self, change: &CatalogChange) -> bool {
        match change {
            CatalogChange::Org(org, Some(record)) => {
                self.orgs.insert(org.clone(), record.clone()) != Some(record.clone())
            }
            CatalogChange::Org(org, None) => self.orgs.remove(org).is_some(),
            CatalogChange::Key(id, Some(key)) => {
                self.keys.insert(id.clone(), key.clone()) != Some(key.clone())
            }
            CatalogChange::Key(id, None) => self.keys.remove(id).is_some(),
        }
    }
}

/// What a catalog write did: the catalog's version after it, and whether
/// it changed anything (removing what is not there does not, and leaves
/// the version as it was).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatalogWrite {
    pub version: u64,
    pub changed: bool,
}

/// What a store tells its watchers of each catalog change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CatalogNotice {
    /// `change` made the catalog `version`.
    Changed { version: u64, change: CatalogChange },
    /// A notice came that could not be read: the catalog must be read anew.
    Unreadable,
}

#[async_trait]
pub trait QuotaStore: Send + Sync + 'static {
    /// Checks and applies `request.cost` atomically: all of it or none.
    /// The answer carries the counters of the cost's dimensions after the
    /// call, from the same atomic step (see [`Decided`]).
    async fn reserve(&self, request: &ReserveRequest) -> Result<Decided, StoreError>;

    /// Begins [`QuotaStore::reserve`] without a future of its own where
    /// the store can: decided at once (the memory store), or queued for a
    /// sender whose reply is awaited (Redis on a single server). The ledger
    /// then boxes no future for it, nor does `async_trait`; the default
    /// hands `request` back to go through `reserve`.
    fn begin_reserve(&self, request: ReserveRequest) -> Begun {
        Begun::Later(request)
    }

    /// Applies a settlement's correction, once: repeating the same
    /// settlement (a clone of it, as a retry sends) changes nothing, and
    /// neither does a second settlement of the same reservation made in
    /// the same moment. Each reservation is settled by one `Settlement`.
    async fn settle(&self, settlement: &Settlement) -> Result<(), StoreError>;

    /// Sees to `settlement` without a task of the caller's where the store
    /// can: applied at once (the memory store), or queued for its sender
    /// (Redis on a single server, which sends settlements in batches); its
    /// outcome goes to `report` either way. Else both are handed back, for
    /// the caller to await [`QuotaStore::settle`]. Spares each settlement a
    /// spawned task, its boxed future and `async_trait`'s.
    fn begin_settle(&self, settlement: Settlement, report: Report) -> SettleBegun {
        SettleBegun::Later(settlement, report)
    }

    /// The org's counters in `period` (seats: the current gauge).
    async fn usage(&self, org: &OrgId, period: Period) -> Result<Amounts, StoreError>;

    /// Answers when the store does: what readiness checks.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Overwrites one counter, for operators correcting or resetting usage.
    async fn set_usage(
        &self,
        org: &OrgId,
        period: Period,
        dimension: Dimension,
        value: i64,
    ) -> Result<(), StoreError>;

    /// Sets runtime org `org` to `record`, replacing any record it had.
    async fn put_org(&self, org: &OrgId, record: &OrgRecord) -> Result<CatalogWrite, StoreError>;

    /// Removes runtime org `org`.
    async fn delete_org(&self, org: &OrgId) -> Result<CatalogWrite, StoreError>;

    /// Adds (or replaces) the key record with `key.id`.
    async fn put_key(&self, key: &KeyRecord) -> Result<CatalogWrite, StoreError>;

    /// Removes key `id`: it is revoked.
    async fn delete_key(&self, id: &str) -> Result<CatalogWrite, StoreError>;

    /// Every runtime org and key, read at one moment.
    async fn catalog(&self) -> Result<StoredCatalog, StoreError>;

    /// The catalog's version now: cheaper than [`QuotaStore::catalog`], to
    /// learn whether anything changed.
    async fn catalog_version(&self) -> Result<u64, StoreError>;

    /// A notice of each change made from now on, by any instance, while the
    /// subscription lasts: the channel closes when it ends, and notices may
    /// be lost before that (a watcher checks the version as well). `None`
    /// for a store that no other process shares, where every change is
    /// made through the one catalog cache that watches it.
    async fn catalog_notices(
        &self,
    ) -> Result<Option<mpsc::UnboundedReceiver<CatalogNotice>>, StoreError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_id_reads_as_32_hex_digits() {
        let id = ReservationId((0xabc << 64) | 0x12);
        assert_eq!(id.hex(), format!("{:032x}", id.0));
        assert_eq!(id.to_string(), "0000000000000abc0000000000000012");
    }
}
