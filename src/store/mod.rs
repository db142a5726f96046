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

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::org::OrgId;
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
        hex::encode(self.0.to_be_bytes())
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

#[async_trait]
pub trait QuotaStore: Send + Sync + 'static {
    /// Checks and applies `request.cost` atomically: all of it or none.
    /// The answer carries the counters of the cost's dimensions after the
    /// call, from the same atomic step (see [`Decided`]).
    async fn reserve(&self, request: &ReserveRequest) -> Result<Decided, StoreError>;

    /// Applies a settlement's correction, once: repeating the same
    /// settlement (a clone of it, as a retry sends) changes nothing, and
    /// neither does a second settlement of the same reservation made in
    /// the same moment. Each reservation is settled by one `Settlement`.
    async fn settle(&self, settlement: &Settlement) -> Result<(), StoreError>;

    /// The org's counters in `period` (seats: the current gauge).
    async fn usage(&self, org: &OrgId, period: Period) -> Result<Amounts, StoreError>;

    /// Overwrites one counter, for operators correcting or resetting usage.
    async fn set_usage(
        &self,
        org: &OrgId,
        period: Period,
        dimension: Dimension,
        value: i64,
    ) -> Result<(), StoreError>;
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
