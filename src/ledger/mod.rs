//! The ledger: reservations from the moment [`crate::meter`] asks the store
//! for one until [`crate::settle`] has settled it, exactly once.
//!
//! A [`Reservation`] is settled exactly once: each way of settling consumes
//! it (refund, reconcile, stand), and the store ignores a retry of the same
//! settlement. A reservation whose store call the request stopped waiting
//! for is a [`PendingReservation`]: refunded once the store confirms it, so
//! no reservation that no request went on with is left counted.
//!
//! A settlement goes to the store once, from the worker whose request made
//! it; only if the store does not confirm it does it go to the process's
//! [`Outbox`], to be retried until it is applied. A request forwarded with
//! `on_error = "defer"` holds a deferred reservation: its charge waits in
//! the outbox, and its settlement follows the charge there.

pub mod outbox;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_util::task::TaskTracker;

use self::outbox::ChargeKey;
pub use self::outbox::Outbox;
use crate::deadline::Deadlines;
use crate::metrics::{Metrics, RouteMetrics, StoreOp};
use crate::org::OrgId;
use crate::period::Period;
use crate::quota::{Amounts, Decided, Decision, Dimension, MAX_AMOUNT};
use crate::store::{
    Begun, QuotaStore, Reply, Report, ReservationId, ReserveRequest, SettleBegun, Settlement,
    StoreError,
};

type StoreCall = Pin<Box<dyn Future<Output = Result<Decided, StoreError>> + Send>>;

/// A reservation's store call: answered as it was made (the memory
/// store's), queued for the store's sender, or under way in a boxed
/// future. The first two spare a request two boxed futures, one of them
/// `async_trait`'s.
enum Call {
    Decided(Result<Decided, StoreError>),
    Queued(Reply<Decided>),
    Waiting(StoreCall),
}

/// Where reservations are kept and settled: the store, how long one call to
/// it may take, the metrics, the settlements still running in the
/// background (shutdown waits for those, so none is cut off midway), and
/// the process's outbox, for what the store did not confirm.
#[derive(Clone)]
pub struct Ledger {
    pub store: Arc<dyn QuotaStore>,
    /// The store timeout, on the worker's coarse clock for it.
    pub store_deadlines: Deadlines,
    pub metrics: Arc<Metrics>,
    pub settling: TaskTracker,
    pub outbox: Arc<Outbox>,
}

/// Which reservation, the ledger it is kept in and its route's counters:
/// all a settlement needs but the amounts.
#[derive(Clone)]
struct Ticket {
    id: ReservationId,
    org: OrgId,
    period: Period,
    ledger: Ledger,
    route: RouteMetrics,
}

impl Ticket {
    fn admitted(self, applied: Amounts, deferred: Option<ChargeKey>) -> Reservation {
        self.ledger.metrics.reservations_open.inc();
        self.route.reserved(applied.get(Dimension::Tokens));
        Reservation {
            ticket: self,
            applied,
            deferred,
        }
    }

    fn settlement(&self, correction: Amounts) -> Settlement {
        Settlement::new(self.id, self.org.clone(), self.period, correction)
    }
}

/// A reservation asked of the store and not yet answered.
///
/// If the request stops waiting (the store timeout passed, or the client went
/// away and the request was dropped), the store may still apply it. The call
/// is then finished in the background and whatever it applied is refunded,
/// so a reservation no request went on with is never left counted.
pub struct PendingReservation {
    call: Option<Call>,
    ticket: Ticket,
    cost: Amounts,
}

impl PendingReservation {
    /// Starts `request`, for a request on the route counted by `route`, in
    /// the ledger's store.
    pub fn start(
        ledger: &Ledger,
        request: ReserveRequest,
        route: RouteMetrics,
    ) -> PendingReservation {
        let ticket = Ticket {
            id: request.id,
            org: request.org.clone(),
            period: request.period,
            ledger: ledger.clone(),
            route,
        };
        let cost = request.cost;
        let started = tokio::time::Instant::now();
        let call = match ledger.store.begin_reserve(request) {
            Begun::Decided(decided) => {
                let elapsed = started.elapsed();
                ledger.metrics.observe_store(StoreOp::Reserve, elapsed);
                Call::Decided(decided)
            }
            Begun::Queued(reply) => Call::Queued(reply),
            Begun::Later(request) => {
                let store = ledger.store.clone();
                Call::Waiting(Box::pin(async move { store.reserve(&request).await }))
            }
        };
        PendingReservation {
            call: Some(call),
            ticket,
            cost,
        }
    }

    /// The store's decision, with the counters it left, or
    /// [`StoreError::Timeout`] after the store timeout.
    pub async fn decision(&mut self) -> Result<Decided, StoreError> {
        if matches!(self.call, Some(Call::Decided(_)))
            && let Some(Call::Decided(decided)) = self.call.take()
        {
            return decided;
        }
        let ledger = &self.ticket.ledger;
        let started = tokio::time::Instant::now();
        let decided = match self.call.as_mut() {
            Some(Call::Queued(reply)) => ledger.store_deadlines.bound(reply).await,
            Some(Call::Waiting(call)) => ledger.store_deadlines.bound(call).await,
            Some(Call::Decided(_)) | None => {
                return Err(StoreError::Backend(
                    "the reservation was already decided".into(),
                ));
            }
        };
        ledger
            .metrics
            .observe_store(StoreOp::Reserve, started.elapsed());
        let decided = decided.ok_or(StoreError::Timeout)?;
        self.call = None;
        decided
    }

    /// The amounts asked for.
    pub fn cost(&self) -> Amounts {
        self.cost
    }

    /// The admitted reservation, holding what the store `applied`.
    pub fn admitted(self, applied: Amounts) -> Reservation {
        self.ticket.clone().admitted(applied, None)
    }

    /// The store did not answer and the request goes on anyway: its cost
    /// is charged from the outbox once the store answers again, and this
    /// reservation, should the store have applied it after all, is refunded
    /// as any other the request stopped waiting for. The deferred
    /// reservation has an id of its own, so that its settlement and this
    /// refund are two settlements, each applied once. `None` when the
    /// outbox is full: nothing was recorded.
    pub fn defer(self) -> Option<Reservation> {
        let ticket = Ticket {
            id: ReservationId::next(),
            ..self.ticket.clone()
        };
        let charge = Settlement::new(
            ReservationId::next(),
            ticket.org.clone(),
            ticket.period,
            self.cost,
        );
        let key = ticket.ledger.outbox.defer(charge)?;
        Some(ticket.admitted(self.cost, Some(key)))
    }
}

impl Drop for PendingReservation {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let ticket = self.ticket.clone();
        let call = match call {
            Call::Waiting(call) => call,
            Call::Queued(reply) => Box::pin(reply),
            Call::Decided(decided) => {
                // Decided at once but never read: applied all the same.
                if let Ok(Decided {
                    decision: Decision::Admit { applied, .. },
                    ..
                }) = decided
                {
                    ticket.admitted(applied, None).refund();
                }
                return;
            }
        };
        let settling = ticket.ledger.settling.clone();
        settling.spawn_on(async move {
            if let Ok(Decided {
                decision: Decision::Admit { applied, .. },
                ..
            }) = call.await
            {
                tracing::debug!(org = %ticket.org, reservation = %ticket.id, "refunding a reservation applied after its request stopped waiting");
                ticket.admitted(applied, None).refund();
            }
        }, &runtime);
    }
}

/// Counters applied in the store for one request, not yet settled; or, for
/// a deferred reservation, a charge waiting in the outbox to be applied.
pub struct Reservation {
    ticket: Ticket,
    applied: Amounts,
    /// The deferred charge this reservation's settlement must follow.
    deferred: Option<ChargeKey>,
}

impl Reservation {
    /// What the store applied for this reservation.
    pub fn applied(&self) -> Amounts {
        self.applied
    }

    /// Leaves the reservation as it is.
    pub fn stand(self) {}

    /// Replaces the estimated tokens with the `tokens` the provider reported.
    pub fn reconcile(self, tokens: i64) {
        let tokens = tokens.clamp(0, MAX_AMOUNT);
        self.ticket.route.reconciled(tokens);
        let estimated = self.applied.get(Dimension::Tokens);
        let correction = Amounts::ZERO.with(Dimension::Tokens, tokens - estimated);
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
            self.ticket.route.refunded();
        }
        let correction = self.applied.negated();
        self.apply(correction);
    }

    /// Applies `correction`: after the deferred charge, if there is one
    /// (the outbox orders the two), else at once.
    fn apply(mut self, correction: Amounts) {
        let settlement = match self.deferred.take() {
            Some(charge) => {
                let settlement = self.ticket.settlement(correction);
                self.ticket.ledger.outbox.follow(charge, settlement)
            }
            None => (!correction.is_zero()).then(|| self.ticket.settlement(correction)),
        };
        if let Some(settlement) = settlement.filter(|s| !s.correction.is_zero()) {
            send(self.ticket.ledger.clone(), settlement);
        }
    }
}

/// Sends `settlement` to the store: seen to by the store itself where it
/// can (applied at once, or sent with its batch), else awaited in a task
/// of its own, so that it completes even if the request that made it is
/// dropped midway. Either way its outcome goes to the outbox
/// (as [`crate::store::Settled`]), which keeps it if the store did not
/// confirm it; and shutdown waits for it, by its hold on `settling`.
fn send(ledger: Ledger, settlement: Settlement) {
    let report = Report {
        to: ledger.outbox.clone(),
        hold: ledger.settling.token(),
        begun: tokio::time::Instant::now(),
        timeout: ledger.store_deadlines.limit(),
    };
    let SettleBegun::Later(settlement, report) = ledger.store.begin_settle(settlement, report)
    else {
        return;
    };
    ledger.settling.clone().spawn(async move {
        let settling = ledger
            .store_deadlines
            .bound(ledger.store.settle(&settlement));
        let outcome = settling.await.unwrap_or(Err(StoreError::Timeout));
        report.settled(&settlement, outcome);
    });
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let ledger = &self.ticket.ledger;
        ledger.metrics.reservations_open.dec();
        // A deferred reservation left to stand: its charge alone is applied.
        if let Some(charge) = self.deferred.take() {
            let _ = ledger
                .outbox
                .follow(charge, self.ticket.settlement(Amounts::ZERO));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::quota::{Limits, Mode};
    use crate::store::MemoryStore;

    fn ledger(store: Arc<MemoryStore>) -> Ledger {
        let metrics = Arc::new(Metrics::new());
        Ledger {
            store,
            store_deadlines: Deadlines::new(Duration::from_secs(1)),
            metrics: metrics.clone(),
            settling: TaskTracker::new(),
            outbox: Arc::new(Outbox::new(16, Duration::from_secs(1), metrics)),
        }
    }

    fn one_run(org: &OrgId, period: Period) -> ReserveRequest {
        ReserveRequest {
            id: ReservationId::next(),
            org: org.clone(),
            period,
            limits: Limits::UNLIMITED.with(Dimension::PlaybookRuns, 5),
            cost: Amounts::ZERO.with(Dimension::PlaybookRuns, 1),
            mode: Mode::Enforce,
        }
    }

    async fn runs(store: &MemoryStore, org: &OrgId, period: Period) -> i64 {
        let usage = store.usage(org, period).await.unwrap();
        usage.get(Dimension::PlaybookRuns)
    }

    #[tokio::test]
    async fn a_store_that_answers_at_once_is_read_without_waiting() {
        let store = Arc::new(MemoryStore::new());
        let ledger = ledger(store.clone());
        let org = OrgId::parse("org_at_once").unwrap();
        let period = Period::containing(chrono::Utc::now(), 1);
        let mut pending =
            PendingReservation::start(&ledger, one_run(&org, period), RouteMetrics::default());
        assert!(matches!(pending.call, Some(Call::Decided(_))));
        let decided = pending.decision().await.unwrap();
        assert!(matches!(decided.decision, Decision::Admit { .. }));
        pending
            .admitted(Amounts::ZERO.with(Dimension::PlaybookRuns, 1))
            .stand();
        assert_eq!(runs(&store, &org, period).await, 1);
    }

    #[tokio::test]
    async fn a_reservation_answered_at_once_but_never_read_is_given_back() {
        let store = Arc::new(MemoryStore::new());
        let ledger = ledger(store.clone());
        let org = OrgId::parse("org_dropped").unwrap();
        let period = Period::containing(chrono::Utc::now(), 1);
        let pending =
            PendingReservation::start(&ledger, one_run(&org, period), RouteMetrics::default());
        assert_eq!(runs(&store, &org, period).await, 1);
        drop(pending);
        ledger.settling.close();
        ledger.settling.wait().await;
        assert_eq!(runs(&store, &org, period).await, 0);
    }
}
