//! The outbox: settlements the store did not confirm, and the charges of
//! requests forwarded by `on_error = "defer"`, kept in this process and
//! retried until the store applies them, for up to `store.settle_retry_for`
//! each, at most `store.max_pending_settlements` at once. One given up (the
//! outbox full, its window over, a key of its org damaged, the shutdown's
//! grace over) is counted and logged with its org and amounts: the log is
//! what an operator corrects the org's usage from.
//!
//! # Why a retry cannot count a settlement twice
//!
//! Every attempt of a settlement sends the same [`Settlement`]: the same
//! reservation id, the same `made_at`. The store applies a settlement and
//! marks its id settled in one atomic step, and applies nothing for an id
//! it finds marked (on Redis: a field named by the id, in the hash of the
//! ten seconds `made_at` falls in, written by the script that changes the
//! counters). So of the attempts that reach the store while the marker is
//! kept, at most one is applied, and a retry of one that was applied but
//! whose answer was lost (a timeout, a connection cut) changes nothing.
//! How long the marker must be kept: it is written when an attempt is
//! first applied, which is after the first attempt was sent; no attempt is
//! sent later than `settle_retry_for` after the settlement came to the
//! outbox, at most one store timeout after its first attempt. The store
//! keeps markers for `settle_retry_for` and a margin of ten minutes after
//! their last write (`RedisStore::new`), so every attempt finds the marker
//! of one applied before it, unless it lay in the store's socket for longer
//! than the margin before the store ran it.
//!
//! # A deferred charge and its settlement
//!
//! A deferred charge is a settlement too: a correction by the request's
//! cost under an id of its own, applied once however often it is sent. The
//! request's own settlement (a refund, a reconciliation) is another, under
//! the deferred reservation's id, and must not be applied before the
//! charge: a refund applied first would be clamped at what the counter
//! holds, and the charge then added in full. So while the charge has never
//! been sent, and so certainly not applied, the settlement is folded into
//! it (a refund cancels it); once sent, the settlement waits in the
//! charge's entry and joins the outbox when the charge is confirmed; after
//! that, it goes to the store as any other. If the charge is given up, so
//! is its settlement: refunding a charge that may never have been made
//! would take from the org's other charges.
//!
//! # One outbox, one task
//!
//! One outbox serves the whole process, shared by the workers; its lock is
//! taken only when a store call failed, never on the normal path. One task
//! retries it, [`Outbox::run`], on the runtime that accepts connections
//! (see `App::serve`): that runtime has little else to do, so retries take
//! no worker's time from its requests, and it outlives the workers at
//! shutdown, when the outbox is drained after they have stopped
//! ([`Outbox::drain`]). While the store fails the task pauses between
//! attempts, from one store timeout doubling up to [`LONGEST_PAUSE`], and
//! sends one settlement to learn whether the store is back; once it is,
//! the rest go in rounds of [`ROUND`].

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::metrics::{Metrics, StoreOp};
use crate::quota::Dimension;
use crate::store::{QuotaStore, Settled, Settlement, StoreError};

/// The longest pause between two attempts while the store fails: a store
/// that is back is noticed within this.
pub const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// How many settlements are sent together once the store answers.
pub const ROUND: usize = 256;

/// How often every waiting settlement is checked for the end of its retry
/// window (each is also checked when its turn comes).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the retry task: a settlement arrived.
    arrived: Notify,
    /// Cuts the retry task's pause short: a drain began.
    hurry: Notify,
    /// Wakes a drain: the outbox emptied.
    emptied: Notify,
    capacity: usize,
    retry_for: Duration,
    metrics: Arc<Metrics>,
}

/// A deferred charge in the outbox, held by its reservation.
#[derive(Debug)]
pub struct ChargeKey(u64);

/// Why a settlement was given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUp {
    Full,
    WindowOver,
    DamagedKey,
    ChargeGivenUp,
    Shutdown,
}

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GiveUp::Full => "the outbox is full",
            GiveUp::WindowOver => "the store did not confirm it within settle_retry_for",
            GiveUp::DamagedKey => "a key of the org holds what tollgate did not write there",
            GiveUp::ChargeGivenUp => "the deferred charge it follows was given up",
            GiveUp::Shutdown => "the shutdown's grace period ended first",
        })
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<u64, Entry>,
    /// The order entries are tried in; a key whose entry is gone is passed over.
    order: VecDeque<u64>,
    /// Deferred charges out of the outbox whose reservation has not settled
    /// yet: whether each was applied (or given up).
    charges: HashMap<u64, bool>,
    next_key: u64,
    last_sweep: Option<Instant>,
}

struct Entry {
    settlement: Settlement,
    /// Not sent after this.
    until: Instant,
    /// Sent at least once, so the store may have applied it.
    sent: bool,
    next: Next,
}

/// What follows an entry once it is applied.
enum Next {
    /// Nothing: a settlement, or a deferred charge whose reservation has
    /// settled with nothing more to apply.
    Nothing,
    /// A deferred charge whose reservation has not settled yet.
    Open,
    /// A deferred charge's reservation's settlement.
    Then(Settlement),
}

impl State {
    fn push(&mut self, entry: Entry) -> u64 {
        let key = self.next_key;
        self.next_key += 1;
        self.entries.insert(key, entry);
        self.order.push_back(key);
        key
    }
}

/// A settlement's first attempt, reported by the store or the task that
/// awaited it: timed, and kept here if the store did not confirm it.
impl Settled for Outbox {
    fn settled(&self, settlement: &Settlement, outcome: Result<(), StoreError>, took: Duration) {
        self.metrics.observe_store(StoreOp::Settle, took);
        let Err(error) = outcome else { return };
        self.metrics.store_failed(StoreOp::Settle, &error);
        match error {
            // A damaged key stays so until someone repairs it.
            StoreError::DamagedKey(_) => self.give_up(settlement, GiveUp::DamagedKey),
            _ => self.retry(settlement.clone()),
        }
    }
}

impl Outbox {
    pub fn new(capacity: usize, retry_for: Duration, metrics: Arc<Metrics>) -> Outbox {
        Outbox {
            state: Mutex::default(),
            arrived: Notify::new(),
            hurry: Notify::new(),
            emptied: Notify::new(),
            capacity,
            retry_for,
            metrics,
        }
    }

    /// How many wait: settlements and deferred charges (a charge's own
    /// settlement, waiting with it, is not counted apart).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues `settlement`, which the store did not confirm, to be retried;
    /// gives it up if the outbox is full.
    pub fn retry(&self, settlement: Settlement) {
        match self.queue(settlement, Next::Nothing) {
            Ok(_) => {
                self.metrics.settlements_queued.inc();
            }
            Err(settlement) => self.give_up(&settlement, GiveUp::Full),
        }
    }

    /// Queues a deferred `charge`; `None` if the outbox is full, and nothing
    /// was queued.
    pub fn defer(&self, charge: Settlement) -> Option<ChargeKey> {
        let key = self.queue(charge, Next::Open).ok()?;
        self.metrics.deferred_charges.inc();
        Some(ChargeKey(key))
    }

    /// Records the `settlement` of the deferred reservation whose charge is
    /// `charge`, to be applied after it; returns it if the charge was
    /// applied already, for the caller to send it now.
    pub fn follow(&self, charge: ChargeKey, settlement: Settlement) -> Option<Settlement> {
        let mut state = self.lock();
        if let Some(entry) = state.entries.get_mut(&charge.0) {
            if entry.sent {
                entry.next = if settlement.correction.is_zero() {
                    Next::Nothing
                } else {
                    Next::Then(settlement)
                };
                return None;
            }
            entry.settlement.correction = entry.settlement.correction.plus(&settlement.correction);
            entry.next = Next::Nothing;
            if entry.settlement.correction.is_zero() {
                self.remove(&mut state, charge.0);
            }
            return None;
        }
        match state.charges.remove(&charge.0) {
            Some(true) => Some(settlement),
            Some(false) => {
                drop(state);
                if !settlement.correction.is_zero() {
                    self.give_up(&settlement, GiveUp::ChargeGivenUp);
                }
                None
            }
            None => None,
        }
    }

    /// Counts and logs `settlement` as given up, with its org and amounts.
    pub fn give_up(&self, settlement: &Settlement, why: GiveUp) {
        self.metrics.settlements_failed.inc();
        let amount = |dimension| settlement.correction.get(dimension);
        tracing::warn!(
            org = %settlement.org,
            reservation = %settlement.id,
            period_start = %settlement.period.start,
            tokens = amount(Dimension::Tokens),
            playbook_runs = amount(Dimension::PlaybookRuns),
            seats = amount(Dimension::Seats),
            "gave up a settlement ({why}): the org's usage may lack this correction"
        );
    }

    /// Retries what waits, in `store`, each attempt bounded by
    /// `store_timeout`, for as long as the task runs.
    pub async fn run(&self, store: Arc<dyn QuotaStore>, store_timeout: Duration) {
        let mut pause = Pause::new(store_timeout);
        loop {
            self.something_waits().await;
            pause.wait(&self.hurry).await;
            let failed = self.round(&store, store_timeout, pause.probing()).await;
            pause.after(failed, self.is_empty());
        }
    }

    /// Waits until the outbox is empty or `deadline` has come; then gives up
    /// whatever is left. The retry task must be running.
    pub async fn drain(&self, deadline: Instant) {
        self.hurry.notify_one();
        let emptied = tokio::time::timeout_at(deadline, async {
            loop {
                let emptied = self.emptied.notified();
                if self.is_empty() {
                    return;
                }
                emptied.await;
            }
        });
        if emptied.await.is_ok() {
            return;
        }
        let left = std::mem::take(&mut self.lock().entries);
        tracing::warn!(
            left = left.len(),
            "shutdown: the grace period ended with settlements unapplied"
        );
        for (key, entry) in left {
            self.give_up_entry(key, entry, GiveUp::Shutdown);
        }
        self.changed(&self.lock());
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code holding the lock panics, so the state is whole even then.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn queue(&self, settlement: Settlement, next: Next) -> Result<u64, Settlement> {
        let mut state = self.lock();
        if state.entries.len() >= self.capacity {
            return Err(settlement);
        }
        let key = state.push(Entry {
            settlement,
            until: Instant::now() + self.retry_for,
            sent: false,
            next,
        });
        self.changed(&state);
        drop(state);
        self.arrived.notify_one();
        Ok(key)
    }

    fn remove(&self, state: &mut State, key: u64) -> Option<Entry> {
        let entry = state.entries.remove(&key);
        self.changed(state);
        entry
    }

    /// Publishes how many wait, and wakes a drain once none do.
    fn changed(&self, state: &State) {
        let waiting = i64::try_from(state.entries.len()).unwrap_or(i64::MAX);
        self.metrics.settlements_pending.set(waiting);
        if state.entries.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    async fn something_waits(&self) {
        loop {
            let arrived = self.arrived.notified();
            if !self.is_empty() {
                return;
            }
            arrived.await;
        }
    }

    /// Sends up to [`ROUND`] settlements (one, if `probing`) at once;
    /// whether any failed.
    async fn round(&self, store: &Arc<dyn QuotaStore>, timeout: Duration, probing: bool) -> bool {
        let mut sending = JoinSet::new();
        let mut keys = HashMap::new();
        for (key, settlement) in self.take(if probing { 1 } else { ROUND }) {
            let (store, metrics) = (store.clone(), self.metrics.clone());
            let attempt = sending.spawn(async move {
                let settling = tokio::time::timeout(timeout, store.settle(&settlement));
                metrics
                    .timed(StoreOp::Settle, settling)
                    .await
                    .unwrap_or(Err(StoreError::Timeout))
            });
            keys.insert(attempt.id(), key);
        }
        let mut failed = false;
        while let Some(joined) = sending.join_next_with_id().await {
            let (id, outcome) = match joined {
                Ok((id, outcome)) => (id, outcome),
                Err(error) => (
                    error.id(),
                    Err(StoreError::Backend(format!(
                        "a settlement attempt failed: {error}"
                    ))),
                ),
            };
            if let Some(key) = keys.remove(&id) {
                failed |= self.attempted(key, outcome);
            }
        }
        failed
    }

    /// The next `count` settlements to send, marked sent; those past their
    /// window are given up instead.
    fn take(&self, count: usize) -> Vec<(u64, Settlement)> {
        let now = Instant::now();
        let mut state = self.lock();
        let mut over = self.sweep(&mut state, now);
        let mut taken = Vec::with_capacity(count.min(state.entries.len()));
        while taken.len() < count {
            let Some(key) = state.order.pop_front() else {
                break;
            };
            let Some(entry) = state.entries.get_mut(&key) else {
                continue;
            };
            if entry.until <= now {
                over.extend(self.remove(&mut state, key).map(|entry| (key, entry)));
                continue;
            }
            entry.sent = true;
            taken.push((key, entry.settlement.clone()));
        }
        drop(state);
        for (key, entry) in over {
            self.give_up_entry(key, entry, GiveUp::WindowOver);
        }
        taken
    }

    /// Takes out every entry past its window, at most once per
    /// [`SWEEP_EVERY`].
    fn sweep(&self, state: &mut State, now: Instant) -> Vec<(u64, Entry)> {
        if state
            .last_sweep
            .is_some_and(|last| now.duration_since(last) < SWEEP_EVERY)
        {
            return Vec::new();
        }
        state.last_sweep = Some(now);
        let over: Vec<u64> = state
            .entries
            .iter()
            .filter(|(_, entry)| entry.until <= now)
            .map(|(&key, _)| key)
            .collect();
        over.into_iter()
            .filter_map(|key| self.remove(state, key).map(|entry| (key, entry)))
            .collect()
    }

    /// Takes in the `outcome` of sending entry `key`; whether it failed in
    /// a way that may pass.
    fn attempted(&self, key: u64, outcome: Result<(), StoreError>) -> bool {
        let mut state = self.lock();
        match outcome {
            Ok(()) => {
                if let Some(entry) = self.remove(&mut state, key) {
                    self.metrics.settlements_retried.inc();
                    self.confirmed(&mut state, key, entry.next);
                }
                false
            }
            Err(error @ StoreError::DamagedKey(_)) => {
                self.metrics.store_failed(StoreOp::Settle, &error);
                let entry = self.remove(&mut state, key);
                drop(state);
                if let Some(entry) = entry {
                    self.give_up_entry(key, entry, GiveUp::DamagedKey);
                }
                false
            }
            Err(error) => {
                self.metrics.store_failed(StoreOp::Settle, &error);
                if state.entries.contains_key(&key) {
                    state.order.push_back(key);
                }
                true
            }
        }
    }

    /// A deferred charge (`key`) is applied: what follows it may go.
    fn confirmed(&self, state: &mut State, key: u64, next: Next) {
        match next {
            Next::Nothing => {}
            Next::Open => {
                state.charges.insert(key, true);
            }
            Next::Then(settlement) => {
                state.push(Entry {
                    settlement,
                    until: Instant::now() + self.retry_for,
                    sent: false,
                    next: Next::Nothing,
                });
                self.changed(state);
            }
        }
    }

    /// Gives up `entry`, that of `key`, and what follows it.
    fn give_up_entry(&self, key: u64, entry: Entry, why: GiveUp) {
        self.give_up(&entry.settlement, why);
        match entry.next {
            Next::Nothing => {}
            Next::Open => {
                self.lock().charges.insert(key, false);
            }
            Next::Then(settlement) => self.give_up(&settlement, GiveUp::ChargeGivenUp),
        }
    }
}

/// The retry task's pause between rounds.
struct Pause {
    first: Duration,
    next: Duration,
    failing: bool,
}

impl Pause {
    fn new(first: Duration) -> Pause {
        Pause {
            first,
            next: first,
            failing: false,
        }
    }

    /// Whether the store failed last time: then one settlement is sent,
    /// to find out whether it is back.
    fn probing(&self) -> bool {
        self.failing
    }

    async fn wait(&self, hurry: &Notify) {
        if self.next.is_zero() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(self.next) => {}
            () = hurry.notified() => {}
        }
    }

    /// After a round: doubling while the store fails; none while it works
    /// and settlements wait; one store timeout for the next to arrive, which
    /// comes just after the store failed a call.
    fn after(&mut self, failed: bool, empty: bool) {
        self.failing = failed;
        self.next = if failed {
            (self.next * 2).clamp(self.first, LONGEST_PAUSE.max(self.first))
        } else if empty {
            self.first
        } else {
            Duration::ZERO
        };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::org::OrgId;
    use crate::period::Period;
    use crate::quota::{Amounts, Decided};
    use crate::store::{
        CatalogWrite, KeyRecord, MemoryStore, ReservationId, ReserveRequest, StoredCatalog,
    };

    const TIMEOUT: Duration = Duration::from_millis(100);
    const TOKENS: Dimension = Dimension::Tokens;

    /// The memory store, with every settlement failing while `failing` is
    /// set, and a record of when each was tried.
    #[derive(Default)]
    struct Flaky {
        store: MemoryStore,
        failing: AtomicBool,
        tried: Mutex<Vec<(Instant, ReservationId)>>,
    }

    #[async_trait]
    impl QuotaStore for Flaky {
        async fn reserve(&self, request: &ReserveRequest) -> Result<Decided, StoreError> {
            self.store.reserve(request).await
        }

        async fn settle(&self, settlement: &Settlement) -> Result<(), StoreError> {
            self.tried
                .lock()
                .unwrap()
                .push((Instant::now(), settlement.id));
            if self.failing.load(Ordering::Relaxed) {
                return Err(StoreError::Backend("refused by the test".into()));
            }
            self.store.settle(settlement).await
        }

        async fn usage(&self, org: &OrgId, period: Period) -> Result<Amounts, StoreError> {
            self.store.usage(org, period).await
        }

        async fn ping(&self) -> Result<(), StoreError> {
            self.store.ping().await
        }

        async fn set_usage(
            &self,
            org: &OrgId,
            period: Period,
            dimension: Dimension,
            value: i64,
        ) -> Result<(), StoreError> {
            self.store.set_usage(org, period, dimension, value).await
        }

        async fn put_org(
            &self,
            org: &OrgId,
            record: &crate::org::OrgRecord,
        ) -> Result<CatalogWrite, StoreError> {
            self.store.put_org(org, record).await
        }

        async fn delete_org(&self, org: &OrgId) -> Result<CatalogWrite, StoreError> {
            self.store.delete_org(org).await
        }

        async fn put_key(&self, key: &KeyRecord) -> Result<CatalogWrite, StoreError> {
            self.store.put_key(key).await
        }

        async fn delete_key(&self, id: &str) -> Result<CatalogWrite, StoreError> {
            self.store.delete_key(id).await
        }

        async fn catalog(&self) -> Result<StoredCatalog, StoreError> {
            self.store.catalog().await
        }

        async fn catalog_version(&self) -> Result<u64, StoreError> {
            self.store.catalog_version().await
        }
    }

    impl Flaky {
        fn fail(&self, failing: bool) {
            self.failing.store(failing, Ordering::Relaxed);
        }

        fn tried(&self) -> Vec<(Instant, ReservationId)> {
            self.tried.lock().unwrap().clone()
        }

        async fn tokens(&self) -> i64 {
            self.store
                .usage(&org(), period())
                .await
                .unwrap()
                .get(TOKENS)
        }
    }

    fn org() -> OrgId {
        OrgId::parse("org_test").unwrap()
    }

    fn period() -> Period {
        Period::containing("2026-11-27T12:00:00Z".parse().unwrap(), 1)
    }

    fn tokens(amount: i64) -> Settlement {
        Settlement::new(
            ReservationId::next(),
            org(),
            period(),
            Amounts::ZERO.with(TOKENS, amount),
        )
    }

    /// An outbox of `capacity` and `window`, a store holding 100 tokens,
    /// and the outbox's retry task on it.
    async fn outbox(capacity: usize, window: Duration) -> (Arc<Outbox>, Arc<Flaky>) {
        let outbox = Arc::new(Outbox::new(capacity, window, Arc::default()));
        let store = Arc::new(Flaky::default());
        store
            .set_usage(&org(), period(), TOKENS, 100)
            .await
            .unwrap();
        let (retrying, on) = (outbox.clone(), store.clone());
        tokio::spawn(async move { retrying.run(on, TIMEOUT).await });
        (outbox, store)
    }

    /// Polls `condition` on paused time, failing after a virtual hour.
    async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(3600);
        while !condition() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn count(counter: &prometheus_client::metrics::counter::Counter) -> u64 {
        counter.get()
    }

    /// The log lines written while `f` runs on this thread.
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture_logs() -> (tracing::subscriber::DefaultGuard, Arc<Mutex<Vec<u8>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Captured(writer.clone()))
            .finish();
        (tracing::subscriber::set_default(subscriber), lines)
    }

    fn text(lines: &Mutex<Vec<u8>>) -> String {
        String::from_utf8_lossy(&lines.lock().unwrap()).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn a_settlement_is_retried_with_pauses_doubling_to_the_longest_until_applied() {
        let (outbox, store) = outbox(10, Duration::from_secs(600)).await;
        store.fail(true);
        let queued = Instant::now();
        outbox.retry(tokens(-10));

        eventually("eight attempts", || store.tried().len() >= 8).await;
        store.fail(false);
        eventually("the outbox empties", || outbox.is_empty()).await;

        let at: Vec<Duration> = store.tried().iter().map(|(at, _)| *at - queued).collect();
        let ms = |ms: u64| Duration::from_millis(ms);
        assert_eq!(
            at[..8],
            [
                ms(100),
                ms(300),
                ms(700),
                ms(1500),
                ms(3100),
                ms(5100),
                ms(7100),
                ms(9100)
            ]
        );
        assert_eq!(store.tokens().await, 90);
        assert_eq!(count(&outbox.metrics.settlements_queued), 1);
        assert_eq!(count(&outbox.metrics.settlements_retried), 1);
        assert_eq!(count(&outbox.metrics.settlements_failed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn while_the_store_fails_one_settlement_at_a_time_finds_out_whether_it_is_back() {
        let (outbox, store) = outbox(100, Duration::from_secs(600)).await;
        store.fail(true);
        for _ in 0..10 {
            outbox.retry(tokens(-1));
        }

        eventually("a round and three probes", || store.tried().len() >= 13).await;
        store.fail(false);
        eventually("the outbox empties", || outbox.is_empty()).await;

        let tried = store.tried();
        let first = tried[0].0;
        assert!(tried[..10].iter().all(|(at, _)| *at == first), "{tried:?}");
        let probes: Vec<Instant> = tried[10..13].iter().map(|(at, _)| *at).collect();
        assert!(probes.windows(2).all(|pair| pair[0] < pair[1]), "{tried:?}");
        assert_eq!(store.tokens().await, 90);
    }

    #[tokio::test(start_paused = true)]
    async fn a_settlement_is_given_up_once_its_window_is_over_and_is_counted_and_logged() {
        let (_guard, lines) = capture_logs();
        let window = Duration::from_secs(10);
        let (outbox, store) = outbox(10, window).await;
        store.fail(true);
        let queued = Instant::now();
        outbox.retry(tokens(-10));

        eventually("it is given up", || {
            count(&outbox.metrics.settlements_failed) == 1
        })
        .await;

        assert!(Instant::now() - queued <= window + LONGEST_PAUSE);
        assert!(outbox.is_empty());
        let tried = store.tried();
        assert!(tried.len() > 3, "{tried:?}");
        assert!(
            tried.iter().all(|(at, _)| *at - queued < window),
            "{tried:?}"
        );
        let logged = text(&lines);
        assert!(logged.contains("gave up a settlement"), "{logged}");
        assert!(logged.contains("within settle_retry_for"), "{logged}");
        assert!(logged.contains("org=org_test"), "{logged}");
        assert!(logged.contains("tokens=-10"), "{logged}");
        store.fail(false);
        assert_eq!(store.tokens().await, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn past_its_bound_the_outbox_gives_a_settlement_up_and_takes_no_deferred_charge() {
        let (_guard, lines) = capture_logs();
        let (outbox, store) = outbox(2, Duration::from_secs(600)).await;
        store.fail(true);
        outbox.retry(tokens(-1));
        outbox.retry(tokens(-2));
        outbox.retry(tokens(-3));

        assert_eq!(outbox.len(), 2);
        assert!(outbox.defer(tokens(5)).is_none());
        assert_eq!(count(&outbox.metrics.settlements_failed), 1);
        assert_eq!(count(&outbox.metrics.deferred_charges), 0);
        let logged = text(&lines);
        assert!(logged.contains("the outbox is full"), "{logged}");
        assert!(logged.contains("tokens=-3"), "{logged}");

        store.fail(false);
        eventually("the outbox empties", || outbox.is_empty()).await;
        assert_eq!(store.tokens().await, 97);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refund_of_a_deferred_charge_never_sent_cancels_it_and_a_reconciliation_joins_it() {
        let outbox = Outbox::new(10, Duration::from_secs(600), Arc::default());
        let refunded = outbox.defer(tokens(10)).unwrap();
        let reconciled = outbox.defer(tokens(10)).unwrap();

        assert!(outbox.follow(refunded, tokens(-10)).is_none());
        assert!(outbox.follow(reconciled, tokens(5)).is_none());

        assert_eq!(outbox.len(), 1);
        let waiting = outbox.lock();
        let entry = waiting.entries.values().next().unwrap();
        assert_eq!(entry.settlement.correction.get(TOKENS), 15);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refund_of_a_deferred_charge_already_sent_is_applied_after_the_charge() {
        let (outbox, store) = outbox(10, Duration::from_secs(600)).await;
        store.fail(true);
        let charge = tokens(10);
        let charge_id = charge.id;
        let key = outbox.defer(charge).unwrap();
        eventually("the charge was sent", || !store.tried().is_empty()).await;

        let refund = tokens(-10);
        let refund_id = refund.id;
        assert!(outbox.follow(key, refund).is_none());
        store.fail(false);
        eventually("the outbox empties", || outbox.is_empty()).await;

        assert_eq!(store.tokens().await, 100);
        let order: Vec<ReservationId> = store.tried().iter().map(|(_, id)| *id).collect();
        let last_charge = order.iter().rposition(|id| *id == charge_id).unwrap();
        assert_eq!(order[last_charge + 1..], [refund_id]);
        assert_eq!(count(&outbox.metrics.settlements_retried), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_settlement_of_a_charge_already_applied_is_handed_back_to_be_sent() {
        let (outbox, store) = outbox(10, Duration::from_secs(600)).await;
        let key = outbox.defer(tokens(10)).unwrap();
        eventually("the charge is applied", || outbox.is_empty()).await;
        assert_eq!(store.tokens().await, 110);

        let refund = tokens(-10);
        let id = refund.id;
        assert_eq!(outbox.follow(key, refund).map(|s| s.id), Some(id));
    }

    #[tokio::test(start_paused = true)]
    async fn a_settlement_of_a_deferred_charge_given_up_is_given_up_too() {
        let (_guard, lines) = capture_logs();
        let (outbox, store) = outbox(10, Duration::from_secs(1)).await;
        store.fail(true);
        let key = outbox.defer(tokens(10)).unwrap();
        eventually("the charge is given up", || {
            count(&outbox.metrics.settlements_failed) == 1
        })
        .await;

        assert!(outbox.follow(key, tokens(-10)).is_none());

        assert_eq!(count(&outbox.metrics.settlements_failed), 2);
        assert!(text(&lines).contains("the deferred charge it follows was given up"));
        store.fail(false);
        assert_eq!(store.tokens().await, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_cuts_the_pause_short_once_the_store_is_back() {
        let (outbox, store) = outbox(10, Duration::from_secs(600)).await;
        store.fail(true);
        outbox.retry(tokens(-10));
        eventually("the pause has grown past a second", || {
            store.tried().len() >= 5
        })
        .await;
        store.fail(false);

        let began = Instant::now();
        outbox.drain(began + Duration::from_secs(30)).await;

        assert!(Instant::now() - began < Duration::from_millis(100));
        assert!(outbox.is_empty());
        assert_eq!(store.tokens().await, 90);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_gives_up_what_is_left_at_its_deadline() {
        let (_guard, lines) = capture_logs();
        let (outbox, store) = outbox(10, Duration::from_secs(600)).await;
        store.fail(true);
        outbox.retry(tokens(-10));
        outbox.retry(tokens(-20));

        let deadline = Instant::now() + Duration::from_secs(3);
        outbox.drain(deadline).await;

        assert_eq!(Instant::now(), deadline);
        assert!(outbox.is_empty());
        assert_eq!(count(&outbox.metrics.settlements_failed), 2);
        assert_eq!(outbox.metrics.settlements_pending.get(), 0);
        let logged = text(&lines);
        assert!(logged.contains("grace period ended with settlements unapplied"));
        assert!(logged.contains("tokens=-20"), "{logged}");
    }
}
