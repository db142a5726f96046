//! The embedded store: counters in this process, for a single instance and
//! for trying the gateway with nothing else installed.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hashbrown::HashTable;

use super::{
    Begun, CatalogChange, CatalogWrite, KeyRecord, QuotaStore, Report, ReservationId,
    ReserveRequest, SettleBegun, Settlement, StoreError, StoredCatalog,
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
    counters: Counters,
    settled: HashMap<ReservationId, Instant>,
    last_sweep: Option<Instant>,
}

/// The counters of one org: those of one period (`start` its first second),
/// or its gauges (`start` is [`GAUGES`]). 40 bytes: each kind keeps only its
/// own dimensions, in the slots [`slot`] gives, and the period's start in
/// seconds rather than as a date and time (a counter was 56 bytes). `org`
/// is `None` in a slot a sweep emptied, until a new counter takes it.
struct Counter {
    org: Option<OrgId>,
    start: i64,
    counts: [i64; 2],
}

/// The `start` of an org's gauges, which no period's start can be.
const GAUGES: i64 = i64::MIN;

/// Where a dimension is kept in its counter: among the dimensions counted
/// in a period, or among the gauges.
fn slot(dimension: Dimension) -> usize {
    match dimension {
        Dimension::Tokens => 0,
        Dimension::PlaybookRuns => 1,
        Dimension::Seats => 0,
    }
}

/// The key of a period's counters, or of the gauges (`None`).
fn start_of(start: Option<DateTime<Utc>>) -> i64 {
    start.map_or(GAUGES, |start| start.timestamp())
}

impl Counter {
    /// The dimensions this counter keeps.
    fn kind(&self) -> impl Iterator<Item = Dimension> + use<> {
        let gauges = self.start == GAUGES;
        Dimension::ALL
            .into_iter()
            .filter(move |d| d.is_gauge() == gauges)
    }

    fn amounts(&self) -> Amounts {
        self.kind().fold(Amounts::ZERO, |amounts, d| {
            amounts.with(d, self.counts[slot(d)])
        })
    }

    /// Keeps those of `amounts` that are of this counter's kind.
    fn keep(&mut self, amounts: &Amounts) {
        for d in self.kind() {
            self.counts[slot(d)] = amounts.get(d);
        }
    }
}

/// Counters under `(org, period start)`, hashed by the org alone so that a
/// reservation hashes its org once for its reads and its writes rather than
/// once per lookup (three or more SipHash runs, some 450 instructions each
/// under callgrind). An org's few entries (its gauges, this period, the last
/// one the sweep keeps) share a hash and are told apart on compare.
///
/// The counters sit in chunks that never move, and the hash table holds
/// only their positions, 5 bytes a slot with its control byte: a table of
/// the counters themselves is between half and seven eighths full, and a
/// vector of them leaves its last copy behind each time it grows. 500,000
/// orgs cost 135 bytes each that way and 60 this way, a million 63
/// (`examples/org_footprint`): the counter's 40, the table's slots (there
/// are twice as many as counters just after it doubles), and the smaller
/// tables it grew out of, not yet given back by the allocator.
///
/// The hash stays SipHash under a per-process key, not foldhash: an org id
/// reaches the store from a trusted peer's org header as well as from the
/// config and verified credentials, and a trusted auth layer may pass on ids
/// its own users picked; an unknown org is served on the default policy, so
/// whoever picks those ids picks keys here, and must not be able to aim them
/// at one probe sequence.
#[derive(Default)]
struct Counters {
    index: HashTable<u32>,
    chunks: Vec<Vec<Counter>>,
    /// Positions a sweep emptied, taken before the chunks grow.
    vacant: Vec<u32>,
    hasher: RandomState,
}

/// Counters per chunk: 40 KiB, a power of two for the position's split.
const CHUNK: usize = 1024;

impl Counters {
    fn hash(&self, org: &OrgId) -> u64 {
        self.hasher.hash_one(org)
    }

    fn at(&self, position: u32) -> Option<&Counter> {
        in_chunks(&self.chunks, position)
    }

    fn find(&self, hash: u64, org: &OrgId, start: i64) -> Option<u32> {
        let is = |position: &u32| {
            self.at(*position)
                .is_some_and(|c| c.start == start && c.org.as_ref() == Some(org))
        };
        self.index.find(hash, is).copied()
    }

    fn get(&self, hash: u64, org: &OrgId, start: Option<DateTime<Utc>>) -> Amounts {
        self.find(hash, org, start_of(start))
            .and_then(|position| self.at(position))
            .map_or(Amounts::ZERO, Counter::amounts)
    }

    /// Runs `change` on the counters of `org` at `start`, made at zero if
    /// there were none, and keeps what it leaves there.
    fn update<T>(
        &mut self,
        hash: u64,
        org: &OrgId,
        start: Option<DateTime<Utc>>,
        change: impl FnOnce(&mut Amounts) -> T,
    ) -> T {
        let start = start_of(start);
        let position = match self.find(hash, org, start) {
            Some(position) => position,
            None => self.add(hash, org, start),
        };
        let Some(counter) = in_chunks_mut(&mut self.chunks, position) else {
            // Not reached: a position the table holds is in a chunk.
            let mut unkept = Amounts::ZERO;
            return change(&mut unkept);
        };
        let mut amounts = counter.amounts();
        let changed = change(&mut amounts);
        counter.keep(&amounts);
        changed
    }

    /// Adds zeroed counters for `org` at `start`, in a vacant slot if there
    /// is one, and returns their position.
    fn add(&mut self, hash: u64, org: &OrgId, start: i64) -> u32 {
        let counter = Counter {
            org: Some(org.clone()),
            start,
            counts: [0; 2],
        };
        let vacant = self.vacant.pop();
        let slot = vacant.and_then(|at| in_chunks_mut(&mut self.chunks, at));
        let position = match (vacant, slot) {
            (Some(at), Some(slot)) => {
                *slot = counter;
                at
            }
            _ => self.push(counter),
        };
        let (hasher, chunks) = (&self.hasher, &self.chunks);
        let rehash = |position: &u32| {
            in_chunks(chunks, *position)
                .and_then(|c| c.org.as_ref())
                .map_or(0, |org| hasher.hash_one(org))
        };
        self.index.insert_unique(hash, position, rehash);
        position
    }

    fn push(&mut self, counter: Counter) -> u32 {
        let count =
            self.chunks.len().saturating_sub(1) * CHUNK + self.chunks.last().map_or(0, Vec::len);
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push(counter),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(counter);
                self.chunks.push(chunk);
            }
        }
        // Four billion counters are 160 GB: the memory gives out first.
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// Keeps the counters whose start `keep` keeps. The slots of the others
    /// are emptied for new counters to take: nothing moves, and nothing is
    /// hashed again.
    fn retain(&mut self, keep: impl Fn(i64) -> bool) {
        let (chunks, vacant) = (&mut self.chunks, &mut self.vacant);
        self.index.retain(|position| {
            let Some(counter) = in_chunks_mut(chunks, *position) else {
                return false;
            };
            if keep(counter.start) {
                return true;
            }
            counter.org = None;
            vacant.push(*position);
            false
        });
    }
}

/// The counter at `position` in `chunks`.
fn in_chunks(chunks: &[Vec<Counter>], position: u32) -> Option<&Counter> {
    let position = position as usize;
    chunks.get(position / CHUNK)?.get(position % CHUNK)
}

fn in_chunks_mut(chunks: &mut [Vec<Counter>], position: u32) -> Option<&mut Counter> {
    let position = position as usize;
    chunks.get_mut(position / CHUNK)?.get_mut(position % CHUNK)
}

impl State {
    fn read(&self, hash: u64, org: &OrgId, period: &Period) -> Amounts {
        let mut usage = self.counters.get(hash, org, Some(period.start));
        let gauges = self.counters.get(hash, org, None);
        for d in Dimension::ALL.into_iter().filter(|d| d.is_gauge()) {
            usage.set(d, gauges.get(d));
        }
        usage
    }

    fn add(&mut self, hash: u64, org: &OrgId, period: &Period, amounts: &Amounts) {
        for (d, amount) in amounts.iter() {
            let start = (!d.is_gauge()).then_some(period.start);
            self.counters.update(hash, org, start, |counters| {
                counters.set(d, counters.get(d).saturating_add(amount));
            });
        }
    }

    /// Decides `request` and applies what it admits. A cost of one kind of
    /// dimension, as nearly every one is (counted in the period, or seats),
    /// finds its one counter once and decides on it in place: a lookup
    /// fewer to read, and one for all its dimensions to write (case 4: the
    /// store's part of a request went from 919 instructions to 670).
    fn reserve(&mut self, hash: u64, request: &ReserveRequest) -> Decided {
        let names = |gauge: bool| request.cost.iter().any(|(d, _)| d.is_gauge() == gauge);
        let start = match (names(false), names(true)) {
            (true, false) => Some(request.period.start),
            (false, true) => None,
            _ => {
                let current = self.read(hash, &request.org, &request.period);
                let decided = decide(&request.limits, &current, &request.cost, request.mode);
                if let Decision::Admit { applied, .. } = &decided.decision {
                    self.add(hash, &request.org, &request.period, applied);
                }
                return decided;
            }
        };
        self.counters.update(hash, &request.org, start, |counter| {
            let decided = decide(&request.limits, counter, &request.cost, request.mode);
            if let Decision::Admit { applied, .. } = &decided.decision {
                for (d, amount) in applied.iter() {
                    counter.set(d, counter.get(d).saturating_add(amount));
                }
            }
            decided
        })
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
        let kept_from = (period.start - chrono::Months::new(1)).timestamp();
        self.counters
            .retain(|start| start == GAUGES || start >= kept_from);
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

    /// A reservation, decided under the lock with nothing to wait for.
    fn reserve_now(&self, request: &ReserveRequest) -> Result<Decided, StoreError> {
        let mut state = self.state()?;
        state.sweep(&request.period);
        let hash = state.counters.hash(&request.org);
        Ok(state.reserve(hash, request))
    }

    /// A settlement, applied under the lock with nothing to wait for.
    fn settle_now(&self, settlement: &Settlement) -> Result<(), StoreError> {
        let mut state = self.state()?;
        if state
            .settled
            .insert(settlement.id, Instant::now())
            .is_none()
        {
            let hash = state.counters.hash(&settlement.org);
            let current = state.read(hash, &settlement.org, &settlement.period);
            let correction = crate::quota::clamp_releases(&current, &settlement.correction);
            state.add(hash, &settlement.org, &settlement.period, &correction);
        }
        Ok(())
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
        self.reserve_now(request)
    }

    fn begin_reserve(&self, request: ReserveRequest) -> Begun {
        Begun::Decided(self.reserve_now(&request))
    }

    async fn settle(&self, settlement: &Settlement) -> Result<(), StoreError> {
        self.settle_now(settlement)
    }

    fn begin_settle(&self, settlement: Settlement, report: Report) -> SettleBegun {
        let outcome = self.settle_now(&settlement);
        report.settled(&settlement, outcome);
        SettleBegun::Taken
    }

    async fn usage(&self, org: &OrgId, period: Period) -> Result<Amounts, StoreError> {
        let state = self.state()?;
        Ok(state.read(state.counters.hash(org), org, &period))
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
        let hash = state.counters.hash(org);
        let start = (!dimension.is_gauge()).then_some(period.start);
        state
            .counters
            .update(hash, org, start, |counters| counters.set(dimension, value));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::{Limits, Mode};

    fn org(id: &str) -> OrgId {
        OrgId::parse(id).unwrap()
    }

    #[test]
    fn an_orgs_gauges_and_periods_keep_apart_from_each_other_and_from_other_orgs() {
        let now = Utc::now();
        let this = Period::containing(now, 1);
        let last = Period::containing(this.start - chrono::Duration::seconds(1), 1);
        let mut state = State::default();
        let (a, b) = (org("org_a"), org("org_b"));
        let (hash_a, hash_b) = (state.counters.hash(&a), state.counters.hash(&b));
        let runs_and_seats = Amounts::ZERO
            .with(Dimension::PlaybookRuns, 2)
            .with(Dimension::Seats, 3);
        state.add(hash_a, &a, &this, &runs_and_seats);
        state.add(
            hash_a,
            &a,
            &last,
            &Amounts::ZERO.with(Dimension::PlaybookRuns, 5),
        );
        state.add(
            hash_b,
            &b,
            &this,
            &Amounts::ZERO.with(Dimension::PlaybookRuns, 7),
        );

        let a_now = state.read(hash_a, &a, &this);
        assert_eq!(a_now.get(Dimension::PlaybookRuns), 2);
        assert_eq!(a_now.get(Dimension::Seats), 3);
        let a_before = state.read(hash_a, &a, &last);
        assert_eq!(a_before.get(Dimension::PlaybookRuns), 5);
        assert_eq!(
            a_before.get(Dimension::Seats),
            3,
            "a gauge is not per period"
        );
        let b_now = state.read(hash_b, &b, &this);
        assert_eq!(b_now.get(Dimension::PlaybookRuns), 7);
        assert_eq!(b_now.get(Dimension::Seats), 0);
    }

    #[test]
    fn a_cost_of_one_kind_or_of_both_is_decided_on_the_same_counters() {
        let period = Period::containing(Utc::now(), 1);
        let limits = Limits::UNLIMITED
            .with(Dimension::PlaybookRuns, 3)
            .with(Dimension::Seats, 2);
        let reserve = |state: &mut State, runs, seats| {
            let request = ReserveRequest {
                id: ReservationId::next(),
                org: org("org_a"),
                period,
                limits,
                cost: Amounts::ZERO
                    .with(Dimension::PlaybookRuns, runs)
                    .with(Dimension::Seats, seats),
                mode: Mode::Enforce,
            };
            let hash = state.counters.hash(&request.org);
            let decided = state.reserve(hash, &request);
            let admitted = matches!(decided.decision, Decision::Admit { .. });
            (admitted, decided.counters)
        };
        let mut state = State::default();
        let runs = |n| Amounts::ZERO.with(Dimension::PlaybookRuns, n);
        let seats = |n| Amounts::ZERO.with(Dimension::Seats, n);
        assert_eq!(reserve(&mut state, 2, 0), (true, runs(2)));
        assert_eq!(reserve(&mut state, 0, 1), (true, seats(1)));
        assert_eq!(
            reserve(&mut state, 1, 1),
            (true, runs(3).with(Dimension::Seats, 2))
        );
        assert_eq!(reserve(&mut state, 1, 0), (false, runs(3)));
        assert_eq!(reserve(&mut state, 0, 1), (false, seats(2)));
        assert_eq!(reserve(&mut state, 0, -1), (true, seats(1)));
        let hash = state.counters.hash(&org("org_a"));
        assert_eq!(
            state.read(hash, &org("org_a"), &period),
            runs(3).with(Dimension::Seats, 1)
        );
    }

    #[test]
    fn a_sweep_drops_periods_ended_over_a_month_ago_and_keeps_gauges() {
        let this = Period::containing(Utc::now(), 1);
        let old = Period::containing(this.start - chrono::Duration::days(70), 1);
        let mut state = State::default();
        let a = org("org_a");
        let hash = state.counters.hash(&a);
        let runs_and_seats = Amounts::ZERO
            .with(Dimension::PlaybookRuns, 4)
            .with(Dimension::Seats, 1);
        state.add(hash, &a, &old, &runs_and_seats);
        state.sweep(&this);
        assert_eq!(state.read(hash, &a, &old).get(Dimension::PlaybookRuns), 0);
        assert_eq!(state.read(hash, &a, &this).get(Dimension::Seats), 1);
    }

    #[test]
    fn a_sweep_that_drops_counters_leaves_every_other_count_where_it_is_found() {
        let this = Period::containing(Utc::now(), 1);
        let old = Period::containing(this.start - chrono::Duration::days(70), 1);
        let mut state = State::default();
        // Over two chunks, old and current counters interleaved.
        let orgs: Vec<OrgId> = (0..CHUNK + CHUNK / 2)
            .map(|i| org(&format!("org_{i}")))
            .collect();
        for (i, org) in orgs.iter().enumerate() {
            let hash = state.counters.hash(org);
            let runs = Amounts::ZERO.with(Dimension::PlaybookRuns, i as i64 + 1);
            state.add(hash, org, &old, &runs);
            if i % 3 == 0 {
                state.add(hash, org, &this, &runs.with(Dimension::Seats, 2));
            }
        }
        state.sweep(&this);
        for (i, org) in orgs.iter().enumerate() {
            let hash = state.counters.hash(org);
            let runs = |period| state.read(hash, org, period).get(Dimension::PlaybookRuns);
            assert_eq!(runs(&old), 0, "{org}'s old period stays dropped");
            let (now, seats) = if i % 3 == 0 {
                (i as i64 + 1, 2)
            } else {
                (0, 0)
            };
            assert_eq!(runs(&this), now, "{org}'s period");
            assert_eq!(state.read(hash, org, &this).get(Dimension::Seats), seats);
        }
        let slots = |state: &State| state.counters.chunks.iter().map(Vec::len).sum::<usize>();
        let before = slots(&state);
        let newcomer = org("org_new");
        let hash = state.counters.hash(&newcomer);
        state.add(
            hash,
            &newcomer,
            &this,
            &Amounts::ZERO.with(Dimension::Tokens, 9),
        );
        assert_eq!(state.read(hash, &newcomer, &this).get(Dimension::Tokens), 9);
        assert_eq!(slots(&state), before, "a new counter takes an emptied slot");
        let hash = state.counters.hash(&orgs[3]);
        assert_eq!(
            state
                .read(hash, &orgs[3], &this)
                .get(Dimension::PlaybookRuns),
            4
        );
    }
}
