//! Step 6: correcting a reservation once the upstream has answered.
//!
//! A [`Reservation`] is settled exactly once: each way of settling consumes
//! it, and the store ignores a repeated settlement of the same id. What the
//! gateway saw decides the correction:
//!
//! - the upstream failed (no answer, timeout, non-2xx): refund all of it;
//! - the upstream succeeded: the reservation stands;
//! - the client went away first: it stands too, since the upstream may
//!   already have done the work (a refund here would let a client have any
//!   amount of work for free by hanging up just before the answer).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::org::OrgId;
use crate::period::Period;
use crate::quota::Amounts;
use crate::store::{QuotaStore, ReservationId, Settlement, StoreError};

/// How many times a settlement is tried before the reservation is left to stand.
const SETTLE_ATTEMPTS: u32 = 3;

/// Counters applied in the store for one request, not yet settled.
pub struct Reservation {
    id: ReservationId,
    org: OrgId,
    period: Period,
    applied: Amounts,
    store: Arc<dyn QuotaStore>,
    store_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Reservation {
    pub(crate) fn new(
        id: ReservationId,
        org: OrgId,
        period: Period,
        applied: Amounts,
        store: Arc<dyn QuotaStore>,
        store_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Reservation {
        metrics.reservations_open.fetch_add(1, Ordering::Relaxed);
        Reservation {
            id,
            org,
            period,
            applied,
            store,
            store_timeout,
            metrics,
        }
    }

    /// Leaves the reservation as it is.
    pub fn stand(self) {}

    /// Gives back everything the reservation took.
    pub fn refund(self) -> JoinHandle<()> {
        Metrics::count(&self.metrics.refunds);
        let correction = self.applied.negated();
        self.apply(correction)
    }

    /// Applies `correction` in a task of its own, so that it completes even
    /// if the request that asked for it is dropped midway.
    fn apply(self, correction: Amounts) -> JoinHandle<()> {
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let (id, org, period, timeout) =
            (self.id, self.org.clone(), self.period, self.store_timeout);
        tokio::spawn(async move {
            if correction.is_zero() {
                return;
            }
            let settlement = Settlement {
                id,
                org: &org,
                period,
                correction,
            };
            // The store applies a settlement once per id, so retrying one whose
            // answer was lost cannot count it twice.
            for attempt in 1..=SETTLE_ATTEMPTS {
                let error = match tokio::time::timeout(timeout, store.settle(&settlement)).await {
                    Ok(Ok(())) => return,
                    Ok(Err(error)) => error,
                    Err(_elapsed) => StoreError::Timeout,
                };
                metrics.store_failed("settle", &error);
                if attempt < SETTLE_ATTEMPTS {
                    tokio::time::sleep(timeout).await;
                }
            }
            tracing::warn!(org = %org, reservation = %id, "gave up settling a reservation; it stands");
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.metrics
            .reservations_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}
