//! The ledger: reservations from the moment [`crate::meter`] asks the store
//! for one until [`crate::settle`] has settled it, exactly once.
//!
//! A [`Reservation`] is settled exactly once: each way of settling consumes
//! it (refund, reconcile, stand), and the store ignores a retry of the same
//! settlement. A reservation whose store call the request stopped waiting
//! for is a [`PendingReservation`]: refunded once the store confirms it, so
//! no reservation that no request went on with is left counted.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::org::OrgId;
use crate::period::Period;
use crate::quota::{Amounts, Decision, Dimension, MAX_AMOUNT};
use crate::store::{QuotaStore, ReservationId, ReserveRequest, Settlement, StoreError};

type StoreCall = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>;

/// Where reservations are kept and settled: the store, how long one call to
/// it may take, the metrics, and the settlements still running in the
/// background (shutdown waits for those, so none is cut off midway).
#[derive(Clone)]
pub struct Ledger {
    pub store: Arc<dyn QuotaStore>,
    pub store_timeout: Duration,
    pub metrics: Arc<Metrics>,
    pub settling: TaskTracker,
}

/// Which reservation, and the ledger it is kept in: all a settlement needs
/// but the amounts.
#[derive(Clone)]
struct Ticket {
    id: ReservationId,
    org: OrgId,
    period: Period,
    ledger: Ledger,
}

impl Ticket {
    fn admitted(self, applied: Amounts) -> Reservation {
        self.ledger
            .metrics
            .reservations_open
            .fetch_add(1, Ordering::Relaxed);
        Reservation {
            ticket: self,
            applied,
        }
    }
}

/// A reservation asked of the store and not yet answered.
///
/// If the request stops waiting (the store timeout passed, or the client went
/// away and the request was dropped), the store may still apply it. The call
/// is then finished in the background and whatever it applied is refunded,
/// so a reservation no request went on with is never left counted.
pub struct PendingReservation {
    call: Option<StoreCall>,
    ticket: Ticket,
}

impl PendingReservation {
    /// Starts `request` in the ledger's store.
    pub fn start(ledger: &Ledger, request: ReserveRequest) -> PendingReservation {
        let ticket = Ticket {
            id: request.id,
            org: request.org.clone(),
            period: request.period,
            ledger: ledger.clone(),
        };
        let store = ledger.store.clone();
        let call: StoreCall = Box::pin(async move { store.reserve(&request).await });
        PendingReservation {
            call: Some(call),
            ticket,
        }
    }

    /// The store's decision, or [`StoreError::Timeout`] after the store timeout.
    pub async fn decision(&mut self) -> Result<Decision, StoreError> {
        let Some(call) = self.call.as_mut() else {
            return Err(StoreError::Backend(
                "the reservation was already decided".into(),
            ));
        };
        let decided = tokio::time::timeout(self.ticket.ledger.store_timeout, call)
            .await
            .map_err(|_| StoreError::Timeout)?;
        self.call = None;
        decided
    }

    /// The admitted reservation, holding what the store `applied`.
    pub fn admitted(self, applied: Amounts) -> Reservation {
        self.ticket.clone().admitted(applied)
    }
}

impl Drop for PendingReservation {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let ticket = self.ticket.clone();
        let settling = ticket.ledger.settling.clone();
        settling.spawn_on(async move {
            if let Ok(Decision::Admit { applied, .. }) = call.await {
                tracing::debug!(org = %ticket.org, reservation = %ticket.id, "refunding a reservation applied after its request stopped waiting");
                ticket.admitted(applied).refund();
            }
        }, &runtime);
    }
}

/// How many times a settlement is tried before the reservation is left to stand.
const SETTLE_ATTEMPTS: u32 = 3;

/// Counters applied in the store for one request, not yet settled.
pub struct Reservation {
    ticket: Ticket,
    applied: Amounts,
}

impl Reservation {
    /// Leaves the reservation as it is.
    pub fn stand(self) {}

    /// Replaces the estimated tokens with the `tokens` the provider reported.
    pub fn reconcile(self, tokens: i64) {
        Metrics::count(&self.ticket.ledger.metrics.reconciliations);
        let estimated = self.applied.get(Dimension::Tokens);
        let correction =
            Amounts::ZERO.with(Dimension::Tokens, tokens.clamp(0, MAX_AMOUNT) - estimated);
        self.apply(correction);
    }

    /// Charges at least `tokens`: the estimate stands, unless the provider
    /// had already reported more than it.
    pub fn charge_at_least(self, tokens: i64) {
        if tokens > self.applied.get(Dimension::Tokens) {
            self.reconcile(tokens);
        }
    }

    /// Gives back everything the reservation took, in the background.
    pub fn refund(self) {
        if !self.applied.is_zero() {
            Metrics::count(&self.ticket.ledger.metrics.refunds);
        }
        let correction = self.applied.negated();
        self.apply(correction);
    }

    /// Applies `correction` in a task of its own, so that it completes even
    /// if the request that asked for it is dropped midway.
    fn apply(self, correction: Amounts) {
        if correction.is_zero() {
            return;
        }
        let Ticket {
            id,
            org,
            period,
            ledger,
        } = self.ticket.clone();
        ledger.settling.clone().spawn(async move {
            let Ledger {
                store,
                store_timeout,
                metrics,
                ..
            } = ledger;
            let settlement = Settlement::new(id, org, period, correction);
            // The store applies one settlement once, however often it is sent,
            // so retrying one whose answer was lost cannot count it twice.
            for attempt in 1..=SETTLE_ATTEMPTS {
                let error =
                    match tokio::time::timeout(store_timeout, store.settle(&settlement)).await {
                        Ok(Ok(())) => return,
                        Ok(Err(error)) => error,
                        Err(_elapsed) => StoreError::Timeout,
                    };
                metrics.store_failed("settle", &error);
                // A damaged key stays so until someone repairs it.
                if attempt == SETTLE_ATTEMPTS || matches!(error, StoreError::DamagedKey(_)) {
                    break;
                }
                tokio::time::sleep(store_timeout).await;
            }
            tracing::warn!(org = %settlement.org, reservation = %id, "gave up settling a reservation; it stands");
        });
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.ticket
            .ledger
            .metrics
            .reservations_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}
