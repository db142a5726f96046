//! The production store: counters in Redis (or a Redis Cluster), shared by
//! every gateway instance.
//!
//! A reservation runs in a Lua script, in one round trip: it reads every
//! counter the cost names, applies [`quota::decide`]'s rule, and increments
//! all or none. A settlement runs in another script that applies it only if
//! its reservation id is not yet marked settled, and marks it, so a
//! settlement retried after a timeout changes nothing the second time. On a
//! single server, reservations (and settlements) that queue up while
//! earlier ones are on their way go together in one script call, each still
//! applied all or none, in order; a key holding something tollgate did not
//! write there (say, a counter set by hand to `nan`: a counter must hold a
//! decimal integer within [`MAX_AMOUNT`](crate::quota::MAX_AMOUNT) either way) fails only the items
//! that touch it, with [`StoreError::DamagedKey`], never the rest of their
//! call. There, too, a reservation call whose reply was lost is asked about
//! afterwards, so that its outcome is known either way ([`CallRecord`]).
//! Scripts go by `EVALSHA` and are reloaded when Redis answers `NOSCRIPT`
//! (after a restart or `SCRIPT FLUSH`).
//!
//! On a single server reached by TCP, each of the two sender tasks (one
//! for reservations, one for settlements) has a plain connection of its
//! own, as it sends one call at a time ([`wire`], [`resp`]); everything
//! else (usage reads, the catalog, pings, a unix socket's calls, the
//! cluster) goes by the crate's multiplexed connection.
//!
//! Keys carry the org as a hash tag, so one org's keys share a cluster slot
//! and a script can touch all of them:
//!
//! - `{prefix}:{org}:{period start}:{dimension}` for period counters, expiring
//!   [`PERIOD_KEY_GRACE`] after the period ends;
//! - `{prefix}:{org}:{dimension}` for gauges (seats), never expiring;
//! - `{prefix}:{org}:settled:{unix time}` for settlement markers: a hash
//!   whose fields are the ids of the reservations whose settlements were
//!   made in the [`SETTLED_BUCKET_SECONDS`] from that time on, kept
//!   `store.settle_retry_for` and [`SETTLED_MARKER_MARGIN_SECONDS`] after
//!   its last write;
//! - `{prefix}:{org}:reserved:{reservation id}` on a cluster only: the reply
//!   to a reservation, kept a few seconds, since the cluster client resends a
//!   call whose connection failed and the script must not run twice;
//! - `{prefix}:calls:{connection id}` on a single server only: the number
//!   and reply of a connection's last reservation call ([`CallRecord`]),
//!   kept as long as settlement markers after its last write;
//! - the runtime orgs and keys under `{prefix}:{:catalog}:`, and their
//!   notice channel (see the `catalog` module).
//!
//! [`quota::decide`]: crate::quota::decide

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::{ErrorKind, IntoConnectionInfo, RedisError, Script, ScriptInvocation, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use wire::Failure;

mod catalog;
pub mod reply;
mod resp;
mod wire;

use super::{
    Begun, CatalogNotice, CatalogWrite, KeyRecord, QuotaStore, Reply, Report, ReservationId,
    ReserveRequest, SettleBegun, Settlement, StoreError, StoredCatalog,
};
use crate::org::{OrgId, OrgRecord};
use crate::period::Period;
use crate::quota::{Amounts, Decided, Dimension, Mode};

/// How long a period's counters outlive it, so last period's usage can still
/// be read during the whole next one.
pub const PERIOD_KEY_GRACE: chrono::TimeDelta = chrono::TimeDelta::days(35);

/// How much longer than `store.settle_retry_for` a settlement marker is
/// kept. The outbox sends no attempt of a settlement after its retry
/// window; this covers an attempt that waits past it in Redis' socket (a
/// stalled Redis runs it when it resumes). See [`crate::ledger::outbox`]
/// for the whole argument.
const SETTLED_MARKER_MARGIN_SECONDS: u64 = 10 * 60;

/// Settlement markers are kept by the time the settlement was made, one
/// hash per org per this many seconds: a field costs Redis less to write,
/// keep and expire than a key of its own, and a batch of settlements is
/// checked with one `HMGET` and marked with one `HSET`. Short, so that no
/// hash grows so large that freeing it at its expiry stalls Redis.
const SETTLED_BUCKET_SECONDS: u64 = 10;

/// What both scripts share. Each counter is read once and written once per
/// call, however many of the call's items touch it (a busy org's usually
/// all do): a script runs alone, so keeping running values here is the same
/// as incrementing each time. Every write waits for `flush` at the end, so a
/// script that fails midway has changed nothing, and retrying it is safe.
///
/// A key holding what tollgate did not write there (anything but a decimal
/// integer within [`MAX_AMOUNT`](crate::quota::MAX_AMOUNT) either way, a key of another type) fails
/// only the items that touch it, each answered `E`: one org's damaged key
/// must not fail another org's requests, nor the same org's that do not
/// touch it.
///
/// The scripts' shared part (src/store/redis/ledger.lua), then each one's
/// own (reserve.lua, settle.lua, ask.lua beside it).
fn script(own: &str) -> Lua {
    let code = [include_str!("redis/ledger.lua"), own].concat();
    let script = Script::new(&code);
    let evalsha = [
        resp::encoded(b"EVALSHA"),
        resp::encoded(script.get_hash().as_bytes()),
    ]
    .concat();
    Lua {
        script,
        evalsha,
        code,
    }
}

/// A script, for the crate's invocations and for the store's own
/// connections (which load it by its text when Redis has not got it).
struct Lua {
    script: Script,
    /// `EVALSHA` and the script's SHA1, as the first items of a command.
    evalsha: Vec<u8>,
    code: String,
}

impl Lua {
    fn wire(&self) -> wire::Script<'_> {
        wire::Script {
            evalsha: &self.evalsha,
            code: &self.code,
        }
    }
}

static RESERVE: LazyLock<Lua> = LazyLock::new(|| script(include_str!("redis/reserve.lua")));

static SETTLE: LazyLock<Lua> = LazyLock::new(|| script(include_str!("redis/settle.lua")));

static ASK: LazyLock<Lua> = LazyLock::new(|| script(include_str!("redis/ask.lua")));

/// Where the store connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    Cluster(Vec<String>),
}

/// One multiplexed connection, cloned per call; both kinds reconnect by
/// themselves.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

pub struct RedisStore {
    redis: Redis,
    /// How long a call may wait in its queue before it is sent.
    timeout: Duration,
    /// On a single server: where reservations and settlements queue for the
    /// tasks that send them, so that those arriving together travel as one
    /// script call. Under load that cuts the calls Redis runs, and the round
    /// trips, to a fraction; on an idle gateway each goes at once, alone.
    /// `None` on a cluster, whose orgs live on different nodes.
    queues: Option<Queues>,
    catalog: catalog::Layout,
    /// Where catalog notices are subscribed to: the server, or each
    /// cluster node in turn until one answers (a cluster passes every
    /// PUBLISH to all its nodes).
    notices_from: Vec<String>,
}

struct Queues {
    reservations: mpsc::UnboundedSender<Queued<ReserveRequest, Outcome<Decided>>>,
    settlements: mpsc::UnboundedSender<Queued<Settlement, SettleAnswer>>,
}

/// The most reservations (or settlements) sent in one script call.
const MAX_BATCH: usize = 64;

/// A call waiting to be sent, where its outcome goes ([`Answer`]), and
/// when it is too late to send it.
type Queued<C, A> = (C, A, Instant);

/// The connection and the key layout: everything a call to Redis needs.
#[derive(Clone)]
struct Redis {
    connection: Connection,
    prefix: Arc<str>,
    /// `{prefix}:{`, how every org's key begins.
    key_open: Arc<[u8]>,
    /// Seconds a reservation's reply is remembered so that a resent call is
    /// not applied twice; 0 where the connection never resends.
    remember_reply_seconds: u64,
    /// Seconds a settlement marker is kept, and a call record.
    settled_marker_seconds: u64,
    /// How long a lost reply's call is asked about: while its record is
    /// sure to be kept.
    ask_for: Duration,
    /// On a single server, where the reservation calls are recorded; `None`
    /// on a cluster, whose client remembers each reservation's reply instead.
    calls: Option<Arc<CallRecord>>,
}

/// The record, in Redis, of the last reserve script call of one
/// connection's sender: the call's number and its reply. A call whose reply
/// was lost (the connection cut, Redis killed, after the script ran or
/// before) is asked about there ([`Redis::ask`]), so that a reservation
/// Redis applied is refunded and one it did not is known never to be
/// applied. Calls go one at a time (`send_batches`), so the record always
/// holds the last one; one write per call, however many reservations it
/// carries, and one key per connection.
struct CallRecord {
    key: String,
    /// The key as an item of a command.
    encoded_key: Vec<u8>,
    /// The number of the last call sent.
    sequence: AtomicU64,
}

impl RedisStore {
    /// Prepares the connection; it is made on first use, so the gateway
    /// starts (and fails open or closed per `on_error`) while Redis is down.
    ///
    /// The gateway bounds its wait for each reservation by `timeout` itself
    /// (a settlement's the sender bounds, by the timeout its report
    /// carries), and a call that could not be sent within it is not sent.
    /// A reservation sent is waited for longer in the background, so that
    /// one the gateway stopped waiting for still gets its reply and can be
    /// undone:
    /// on a single server for as long as the reply takes (a stalled Redis
    /// holds at most one call of each kind per connection, as calls go one
    /// at a time), on a cluster, whose client resends, for ten timeouts.
    /// Settlement markers outlive `settle_retry_for`, the longest a
    /// settlement is retried.
    pub fn new(
        target: &RedisTarget,
        prefix: &str,
        timeout: Duration,
        settle_retry_for: Duration,
    ) -> Result<RedisStore, StoreError> {
        // Each call is a small request awaiting a small reply: never delay it.
        let tcp = TcpSettings::default().set_nodelay(true);
        let connect_timeout = timeout.max(Duration::from_millis(500));
        let response_timeout = (timeout * 10).max(Duration::from_secs(1));
        let (connection, info) = match target {
            RedisTarget::Single(url) => {
                let info = url
                    .as_str()
                    .into_connection_info()
                    .map_err(backend)?
                    .set_tcp_settings(tcp);
                let client = redis::Client::open(info.clone()).map_err(backend)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(None)
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                let manager =
                    ConnectionManager::new_lazy_with_config(client, config).map_err(backend)?;
                (Connection::Single(manager), Some(info))
            }
            RedisTarget::Cluster(nodes) => {
                let client = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                    .tcp_settings(tcp)
                    .connection_timeout(connect_timeout)
                    .response_timeout(response_timeout)
                    .retries(2)
                    .build()
                    .map_err(backend)?;
                let config = redis::cluster::ClusterConfig::new();
                let connection = client.get_pending_async_connection_with_config(config);
                (Connection::Cluster(connection), None)
            }
        };
        // The cluster client resends a call whose connection failed, and the
        // call may have run already; a single connection never resends.
        let remember_reply_seconds = match target {
            RedisTarget::Single(_) => 0,
            RedisTarget::Cluster(_) => response_timeout.as_secs() * 3 + 1,
        };
        let mut redis = Redis {
            connection,
            prefix: prefix.into(),
            key_open: format!("{prefix}:{{").into_bytes().into(),
            remember_reply_seconds,
            settled_marker_seconds: settle_retry_for.as_secs() + SETTLED_MARKER_MARGIN_SECONDS,
            ask_for: settle_retry_for,
            calls: None,
        };
        let queues = match (info, tokio::runtime::Handle::try_current()) {
            (Some(info), Ok(runtime)) => {
                let key = format!("{prefix}:calls:{}", ReservationId::next().hex());
                redis.calls = Some(Arc::new(CallRecord {
                    encoded_key: resp::encoded(key.as_bytes()),
                    key,
                    sequence: AtomicU64::new(0),
                }));
                let lane = || Lane {
                    redis: redis.clone(),
                    wire: wire::Wire::new(&info, connect_timeout),
                };
                let (reservations, queued) = mpsc::unbounded_channel();
                runtime.spawn(send_batches(lane(), queued));
                let (settlements, queued) = mpsc::unbounded_channel();
                runtime.spawn(send_batches(lane(), queued));
                Some(Queues {
                    reservations,
                    settlements,
                })
            }
            _ => None,
        };
        let notices_from = match target {
            RedisTarget::Single(url) => vec![url.clone()],
            RedisTarget::Cluster(nodes) => nodes.clone(),
        };
        Ok(RedisStore {
            redis,
            timeout,
            queues,
            catalog: catalog::Layout::new(prefix),
            notices_from,
        })
    }
}

impl RedisStore {
    /// One call: through its batch queue on a single server, alone on a
    /// cluster.
    async fn call<C: Clone, O, A: From<Outcome<O>>>(
        &self,
        queue_of: fn(&Queues) -> &mpsc::UnboundedSender<Queued<C, A>>,
        call: &C,
    ) -> Result<O, StoreError>
    where
        Lane: Sends<C, O>,
    {
        if self.queues.is_some() {
            let (outcome, reply) = Reply::channel();
            if self
                .queued(queue_of, call.clone(), outcome.into(), self.timeout)
                .is_ok()
            {
                return reply.await;
            }
        }
        let mut lane = Lane {
            redis: self.redis.clone(),
            wire: None,
        };
        only(lane.send(std::slice::from_ref(call)).await?)?
    }

    /// `call`, queued for its batch sender, which must have its outcome
    /// within `timeout`, for `answer`; both handed back on a cluster, which
    /// has no queues, or if the sender task is gone.
    fn queued<C, A>(
        &self,
        queue_of: fn(&Queues) -> &mpsc::UnboundedSender<Queued<C, A>>,
        call: C,
        answer: A,
        timeout: Duration,
    ) -> Result<(), (C, A)> {
        let Some(queues) = &self.queues else {
            return Err((call, answer));
        };
        queue_of(queues)
            .send((call, answer, Instant::now() + timeout))
            .map_err(|unsent| (unsent.0.0, unsent.0.1))
    }
}

/// Where a queued call's outcome goes.
trait Answer<C, O>: Send + 'static {
    /// Whether a call sent but unanswered by its time is answered then as
    /// timed out, rather than when Redis replies. Only for calls that may
    /// be sent again, as a settlement may (its marker applies it once):
    /// the outbox sends it again, as it did when each settlement was
    /// awaited by a task that gave up at the store timeout. A reservation's
    /// reply is awaited to the end, so that one applied is refunded.
    const EXPIRES_IN_FLIGHT: bool;

    fn answer(self, call: &C, outcome: Result<O, StoreError>);
}

impl<C, O: Send + 'static> Answer<C, O> for Outcome<O> {
    const EXPIRES_IN_FLIGHT: bool = false;

    fn answer(self, _: &C, outcome: Result<O, StoreError>) {
        let _ = self.send(outcome);
    }
}

/// Where a settlement's outcome goes: a caller awaiting it, or the
/// ledger's report.
enum SettleAnswer {
    Reply(Outcome<()>),
    Report(Report),
}

impl From<Outcome<()>> for SettleAnswer {
    fn from(outcome: Outcome<()>) -> SettleAnswer {
        SettleAnswer::Reply(outcome)
    }
}

impl Answer<Settlement, ()> for SettleAnswer {
    const EXPIRES_IN_FLIGHT: bool = true;

    fn answer(self, settlement: &Settlement, outcome: Result<(), StoreError>) {
        match self {
            SettleAnswer::Reply(reply) => {
                let _ = reply.send(outcome);
            }
            SettleAnswer::Report(report) => report.settled(settlement, outcome),
        }
    }
}

/// What sends one kind of call, many at a time.
trait Sends<C, O>: Send + 'static {
    /// An outcome for each of `calls`, in order, or the error that failed
    /// them all.
    fn send(
        &mut self,
        calls: &[C],
    ) -> impl Future<Output = Result<Vec<Result<O, StoreError>>, StoreError>> + Send;
}

/// Sends queued calls with `sender`, as many together as have queued up,
/// one script call at a time: the calls that queue while one is under way
/// go together in the next. (On the load benchmark a second call in flight
/// halved the batches, and cost more in Redis' CPU, on the same machine,
/// than it saved in waiting.) A call not sent within the store timeout is
/// not sent at all: its caller has gone on without it, and the calls queued
/// behind a stalled Redis must not all land on it once it is back. Ends
/// with the store.
async fn send_batches<C, O, A, S>(mut sender: S, mut queued: mpsc::UnboundedReceiver<Queued<C, A>>)
where
    C: Send + Sync + 'static,
    O: Send + 'static,
    A: Answer<C, O>,
    S: Sends<C, O>,
{
    let mut waiting = VecDeque::new();
    // Kept from one call to the next, as their allocations are.
    let mut calls = Vec::with_capacity(MAX_BATCH);
    let mut answers = Vec::with_capacity(MAX_BATCH);
    loop {
        if waiting.is_empty() {
            let Some(first) = queued.recv().await else {
                return;
            };
            waiting.push_back(first);
        }
        while let Ok(next) = queued.try_recv() {
            waiting.push_back(next);
        }
        batch(&mut waiting, &mut calls, &mut answers);
        if calls.is_empty() {
            continue;
        }
        // A request that stopped waiting after its call was sent still
        // awaits the outcome in the background (ledger::PendingReservation).
        let in_flight = InFlight {
            calls: &calls,
            answers: &mut answers,
        };
        let sent = meanwhile(sender.send(&calls), &mut queued, &mut waiting, in_flight).await;
        deliver(&calls, answers.drain(..).map(|(answer, _)| answer), sent);
        calls.clear();
    }
}

type Outcome<O> = oneshot::Sender<Result<O, StoreError>>;

/// Up to [`MAX_BATCH`] calls from the front of `waiting`, each answer with
/// its call's time; those past their time are answered instead.
fn batch<C, O, A: Answer<C, O>>(
    waiting: &mut VecDeque<Queued<C, A>>,
    calls: &mut Vec<C>,
    answers: &mut Vec<(Option<A>, Instant)>,
) {
    let now = Instant::now();
    while calls.len() < MAX_BATCH {
        let Some((call, answer, too_late)) = waiting.pop_front() else {
            break;
        };
        if now < too_late {
            calls.push(call);
            answers.push((Some(answer), too_late));
        } else {
            answer.answer(&call, Err(StoreError::Timeout));
        }
    }
}

/// The calls of the batch being sent, and their answers (`None` once
/// given), each with its call's time.
struct InFlight<'a, C, A> {
    calls: &'a [C],
    answers: &'a mut [(Option<A>, Instant)],
}

impl<C, A> InFlight<'_, C, A> {
    /// The earliest time of a call not yet answered.
    fn next(&self) -> Option<Instant> {
        self.answers
            .iter()
            .filter(|(answer, _)| answer.is_some())
            .map(|&(_, too_late)| too_late)
            .min()
    }

    /// Answers each call whose time is over at `now` as timed out.
    fn expire<O>(&mut self, now: Instant)
    where
        A: Answer<C, O>,
    {
        for (call, (answer, too_late)) in self.calls.iter().zip(self.answers.iter_mut()) {
            if *too_late <= now
                && let Some(answer) = answer.take()
            {
                answer.answer(call, Err(StoreError::Timeout));
            }
        }
    }
}

/// Awaits `sent`, meanwhile taking in the calls that queue and answering
/// each as its time passes, so that a call held up by a stalled Redis holds
/// up no caller behind it longer than the store timeout; and, of a kind
/// whose calls in flight expire ([`Answer::EXPIRES_IN_FLIGHT`]), answering
/// each call of the batch in flight as timed out once its time passes.
async fn meanwhile<C, O, A: Answer<C, O>, T>(
    sent: impl Future<Output = T>,
    queued: &mut mpsc::UnboundedReceiver<Queued<C, A>>,
    waiting: &mut VecDeque<Queued<C, A>>,
    mut in_flight: InFlight<'_, C, A>,
) -> T {
    let mut sent = std::pin::pin!(sent);
    let mut expiry = std::pin::pin!(tokio::time::sleep_until(Instant::now()));
    let mut open = true;
    loop {
        // Calls wait to be sent in the order they queued.
        let first_waiting = waiting.front().map(|&(_, _, too_late)| too_late);
        let first_in_flight = if A::EXPIRES_IN_FLIGHT {
            in_flight.next()
        } else {
            None
        };
        let next = match (first_waiting, first_in_flight) {
            (Some(waiting), Some(in_flight)) => Some(waiting.min(in_flight)),
            (waiting, in_flight) => waiting.or(in_flight),
        };
        // Reset only when the next time changes.
        if let Some(next) = next
            && expiry.deadline() != next
        {
            expiry.as_mut().reset(next);
        }
        tokio::select! {
            biased;
            result = &mut sent => return result,
            next = queued.recv(), if open => match next {
                Some(next) => waiting.push_back(next),
                None => open = false,
            },
            () = &mut expiry, if next.is_some() => {
                let now = Instant::now();
                while let Some((_, _, too_late)) = waiting.front()
                    && *too_late <= now
                {
                    if let Some((call, answer, _)) = waiting.pop_front() {
                        answer.answer(&call, Err(StoreError::Timeout));
                    }
                }
                if A::EXPIRES_IN_FLIGHT {
                    in_flight.expire(now);
                }
            }
        }
    }
}

/// Gives each call its outcome from its batch's `sent` result, where it
/// has not been answered already.
fn deliver<C, O, A: Answer<C, O>>(
    calls: &[C],
    answers: impl Iterator<Item = Option<A>>,
    sent: Result<Vec<Result<O, StoreError>>, StoreError>,
) {
    let failed = |message: String| {
        move |(call, answer): (&C, Option<A>)| {
            if let Some(answer) = answer {
                answer.answer(call, Err(StoreError::Backend(message.clone())));
            }
        }
    };
    match sent {
        Ok(results) if results.len() == calls.len() => {
            for ((call, answer), result) in calls.iter().zip(answers).zip(results) {
                if let Some(answer) = answer {
                    answer.answer(call, result);
                }
            }
        }
        Ok(_) => calls
            .iter()
            .zip(answers)
            .for_each(failed("a reply for each call was expected".into())),
        Err(error) => calls
            .iter()
            .zip(answers)
            .for_each(failed(error.to_string())),
    }
}

/// The only outcome of a batch of one.
fn only<O>(outcomes: Vec<O>) -> Result<O, StoreError> {
    outcomes
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::Backend("the store sent no reply".into()))
}

/// One sender task's way to Redis: its own connection on a single server
/// reached by TCP ([`wire`]), else the crate's shared one.
struct Lane {
    redis: Redis,
    wire: Option<wire::Wire>,
}

impl Sends<ReserveRequest, Decided> for Lane {
    fn send(
        &mut self,
        calls: &[ReserveRequest],
    ) -> impl Future<Output = Result<Vec<Result<Decided, StoreError>>, StoreError>> + Send {
        self.reserve_all(calls)
    }
}

impl Sends<Settlement, ()> for Lane {
    fn send(
        &mut self,
        calls: &[Settlement],
    ) -> impl Future<Output = Result<Vec<Result<(), StoreError>>, StoreError>> + Send {
        self.settle_all(calls)
    }
}

impl Lane {
    /// Runs `requests` through one reserve script call, in order; a
    /// decision for each, or the error that kept it from being made. On a
    /// single server the call is numbered and recorded, and if its reply is
    /// lost, its outcome is asked for.
    async fn reserve_all(
        &mut self,
        requests: &[ReserveRequest],
    ) -> Result<Vec<Result<Decided, StoreError>>, StoreError> {
        let Lane { redis, wire } = self;
        let sequence = redis
            .calls
            .as_ref()
            .map(|calls| calls.sequence.fetch_add(1, Ordering::Relaxed) + 1);
        let call = ReserveCall {
            redis,
            requests,
            sequence,
        };
        match (
            run(wire, redis, &call, |text| reply::reserve(text, requests)).await,
            sequence,
        ) {
            (Ok(decisions), _) => decisions,
            (Err(Failure::Lost(lost)), Some(sequence)) => {
                ask(wire, redis, sequence, requests, lost).await
            }
            (Err(failure), _) => Err(failure.into()),
        }
    }

    /// Applies `settlements` through one settle script call, in order; for
    /// each, whether it is settled.
    async fn settle_all(
        &mut self,
        settlements: &[Settlement],
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let Lane { redis, wire } = self;
        let call = SettleCall { redis, settlements };
        run(wire, redis, &call, |text| reply::settle(text, settlements)).await?
    }
}

/// The outcome of reserve call `sequence`, whose reply was `lost`: its
/// recorded reply if it ran; if it did not, it is recorded as not run (so
/// that it runs nothing should Redis still receive it) and each request
/// fails. Asked again until Redis answers, pausing from 50ms doubling up to
/// a second, for `settle_retry_for` (the record is kept longer); the calls
/// queued meanwhile wait, and those past the store timeout are not sent.
async fn ask(
    wire: &mut Option<wire::Wire>,
    redis: &Redis,
    sequence: u64,
    requests: &[ReserveRequest],
    lost: String,
) -> Result<Vec<Result<Decided, StoreError>>, StoreError> {
    let Some(calls) = &redis.calls else {
        return Err(StoreError::Backend(lost));
    };
    let until = Instant::now() + redis.ask_for;
    let mut pause = Duration::from_millis(50);
    let call = AskCall {
        calls,
        sequence,
        keep_seconds: redis.settled_marker_seconds,
    };
    let read = |text: &str| (text != NOT_RUN).then(|| reply::reserve(text, requests));
    loop {
        match run(wire, redis, &call, read).await {
            Ok(None) => return Err(StoreError::Backend(lost)),
            Ok(Some(decisions)) => return decisions,
            Err(failure) if !failure.may_pass() || Instant::now() >= until => {
                let error = failure.message();
                tracing::error!(%error, reservations = requests.len(), "could not learn whether Redis applied reservations whose reply was lost; they stand if it did");
                return Err(StoreError::Backend(lost));
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Runs `call` on `wire` if the lane has one, else on the crate's
/// connection; `read` takes the script's reply.
async fn run<R>(
    wire: &mut Option<wire::Wire>,
    redis: &Redis,
    call: &impl ScriptCall,
    read: impl FnOnce(&str) -> R,
) -> Result<R, Failure> {
    match wire {
        Some(wire) => {
            let script = call.lua().wire();
            let write = |command: &mut resp::Command<'_>| call.write(command);
            wire.eval(&script, call.numkeys(), write, read).await
        }
        None => {
            let mut invocation = call.lua().script.prepare_invoke();
            call.write(&mut invocation);
            match redis.invoke_raw::<String>(&invocation).await {
                Ok(text) => Ok(read(&text)),
                Err(error) if reply_lost(&error) => Err(Failure::Lost(error.to_string())),
                Err(error) => Err(Failure::Answered(error.to_string())),
            }
        }
    }
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> StoreError {
        match failure {
            Failure::Unsent { message, .. }
            | Failure::Lost(message)
            | Failure::Answered(message) => StoreError::Backend(message),
        }
    }
}

/// Where a script call's keys and arguments go: the store's own
/// connection's buffer (keys, then arguments, in the order written), or
/// the crate's invocation.
trait Args {
    /// A key made of `parts` one after another.
    fn key(&mut self, parts: &[&[u8]]);
    /// A key given both as it is and encoded as an item of a command.
    fn encoded_key(&mut self, key: &str, encoded: &[u8]);
    fn text(&mut self, text: &[u8]);
    fn int(&mut self, value: i64);
    /// `1` or `0`.
    fn flag(&mut self, on: bool);
}

impl Args for resp::Command<'_> {
    fn key(&mut self, parts: &[&[u8]]) {
        self.joined(parts);
    }

    fn encoded_key(&mut self, _: &str, encoded: &[u8]) {
        self.encoded(encoded, 1);
    }

    fn text(&mut self, text: &[u8]) {
        self.bulk(text);
    }

    fn int(&mut self, value: i64) {
        resp::Command::int(self, value);
    }

    fn flag(&mut self, on: bool) {
        self.encoded(if on { b"$1\r\n1\r\n" } else { b"$1\r\n0\r\n" }, 1);
    }
}

impl Args for ScriptInvocation<'_> {
    fn key(&mut self, parts: &[&[u8]]) {
        ScriptInvocation::key(self, parts.concat());
    }

    fn encoded_key(&mut self, key: &str, _: &[u8]) {
        ScriptInvocation::key(self, key);
    }

    fn text(&mut self, text: &[u8]) {
        self.arg(text);
    }

    fn int(&mut self, value: i64) {
        self.arg(value);
    }

    fn flag(&mut self, on: bool) {
        self.arg(if on { "1" } else { "0" });
    }
}

/// One script call: which script, how many keys, and its keys then its
/// arguments.
trait ScriptCall: Sync {
    fn lua(&self) -> &'static Lua;
    fn numkeys(&self) -> usize;
    fn write(&self, args: &mut impl Args);
}

/// A call of reserve.lua (see it for the layout).
struct ReserveCall<'a> {
    redis: &'a Redis,
    requests: &'a [ReserveRequest],
    sequence: Option<u64>,
}

impl ScriptCall for ReserveCall<'_> {
    fn lua(&self) -> &'static Lua {
        &RESERVE
    }

    fn numkeys(&self) -> usize {
        let markers = usize::from(self.redis.remember_reply_seconds > 0);
        let counters: usize = self
            .requests
            .iter()
            .map(|request| markers + request.cost.iter().count())
            .sum();
        usize::from(self.redis.calls.is_some()) + counters
    }

    fn write(&self, args: &mut impl Args) {
        let redis = self.redis;
        if let Some(calls) = &redis.calls {
            args.encoded_key(&calls.key, &calls.encoded_key);
        }
        for request in self.requests {
            let org = request.org.as_str().as_bytes();
            if redis.remember_reply_seconds > 0 {
                let id = request.id.hex_bytes();
                args.key(&[&redis.key_open, org, b"}:reserved:", &id]);
            }
            let middle = key_middle(&request.period);
            for (dimension, _) in request.cost.iter() {
                redis.counter_key_into(args, org, &middle, dimension);
            }
        }
        args.int(i64::try_from(redis.remember_reply_seconds).unwrap_or(i64::MAX));
        args.int(i64::try_from(self.sequence.unwrap_or(0)).unwrap_or(i64::MAX));
        args.int(i64::try_from(redis.settled_marker_seconds).unwrap_or(i64::MAX));
        for request in self.requests {
            args.flag(request.mode == Mode::Enforce);
            args.int(expire_at(&request.period));
            args.int(request.cost.iter().count() as i64);
            for (dimension, amount) in request.cost.iter() {
                args.int(amount);
                args.int(request.limits.get(dimension).unwrap_or(-1));
                args.flag(dimension.is_gauge());
            }
        }
    }
}

/// A call of settle.lua (see it for the layout).
struct SettleCall<'a> {
    redis: &'a Redis,
    settlements: &'a [Settlement],
}

impl ScriptCall for SettleCall<'_> {
    fn lua(&self) -> &'static Lua {
        &SETTLE
    }

    fn numkeys(&self) -> usize {
        self.settlements
            .iter()
            .map(|settlement| 1 + settlement.correction.iter().count())
            .sum()
    }

    fn write(&self, args: &mut impl Args) {
        let redis = self.redis;
        for settlement in self.settlements {
            let org = settlement.org.as_str().as_bytes();
            let bucket = settlement.made_at - settlement.made_at % SETTLED_BUCKET_SECONDS;
            let mut digits = itoa::Buffer::new();
            let bucket = digits.format(bucket).as_bytes();
            args.key(&[&redis.key_open, org, b"}:settled:", bucket]);
            let middle = key_middle(&settlement.period);
            for (dimension, _) in settlement.correction.iter() {
                redis.counter_key_into(args, org, &middle, dimension);
            }
        }
        args.int(i64::try_from(redis.settled_marker_seconds).unwrap_or(i64::MAX));
        for settlement in self.settlements {
            args.text(&settlement.id.hex_bytes());
            args.int(expire_at(&settlement.period));
            args.int(settlement.correction.iter().count() as i64);
            for (dimension, correction) in settlement.correction.iter() {
                args.int(correction);
                args.flag(dimension.is_gauge());
            }
        }
    }
}

/// A call of ask.lua.
struct AskCall<'a> {
    calls: &'a CallRecord,
    sequence: u64,
    keep_seconds: u64,
}

impl ScriptCall for AskCall<'_> {
    fn lua(&self) -> &'static Lua {
        &ASK
    }

    fn numkeys(&self) -> usize {
        1
    }

    fn write(&self, args: &mut impl Args) {
        args.encoded_key(&self.calls.key, &self.calls.encoded_key);
        args.int(i64::try_from(self.sequence).unwrap_or(i64::MAX));
        args.int(i64::try_from(self.keep_seconds).unwrap_or(i64::MAX));
    }
}

impl Redis {
    /// A counter's key, written into `args` without being made first;
    /// `middle` is [`key_middle`] of its period.
    fn counter_key_into(
        &self,
        args: &mut impl Args,
        org: &[u8],
        middle: &[u8],
        dimension: Dimension,
    ) {
        let name = dimension.as_str().as_bytes();
        if dimension.is_gauge() {
            args.key(&[&self.key_open, org, b"}:", name]);
        } else {
            args.key(&[&self.key_open, org, middle, name]);
        }
    }

    fn counter_key(&self, org: &OrgId, period: &Period, dimension: Dimension) -> String {
        if dimension.is_gauge() {
            self.org_key(org, &[dimension.as_str()])
        } else {
            self.org_key(org, &[&period.key(), dimension.as_str()])
        }
    }

    /// `{prefix}:{org}:` and `parts` joined by colons. Built by hand: keys
    /// are made on every call, and `format!` cost more than the call's
    /// other work.
    fn org_key(&self, org: &OrgId, parts: &[&str]) -> String {
        let length = parts.iter().map(|p| p.len() + 1).sum::<usize>();
        let mut key = String::with_capacity(self.prefix.len() + org.as_str().len() + 3 + length);
        key.push_str(&self.prefix);
        key.push_str(":{");
        key.push_str(org.as_str());
        key.push('}');
        for part in parts {
            key.push(':');
            key.push_str(part);
        }
        key
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.invoke_raw(invocation).await.map_err(backend)
    }

    async fn invoke_raw<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        match self.connection.clone() {
            Connection::Single(mut connection) => invocation.invoke_async(&mut connection).await,
            Connection::Cluster(mut connection) => invocation.invoke_async(&mut connection).await,
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, StoreError> {
        async fn on(
            connection: &mut impl ConnectionLike,
            command: &redis::Cmd,
        ) -> Result<Value, RedisError> {
            connection.req_packed_command(command).await
        }
        let value = match self.connection.clone() {
            Connection::Single(mut connection) => on(&mut connection, command).await,
            Connection::Cluster(mut connection) => on(&mut connection, command).await,
        }
        .map_err(backend)?;
        redis::from_redis_value(value).map_err(|e| StoreError::Backend(e.to_string()))
    }
}

/// What ask.lua answers for a call that did not run.
const NOT_RUN: &str = "V";

/// Whether the call failed in the connection (cut, reset, refused), so
/// that Redis may have run it without its reply arriving. Any other error
/// is Redis' answer, or the client's before it sent anything.
fn reply_lost(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Io
}

fn backend(error: RedisError) -> StoreError {
    StoreError::Backend(error.to_string())
}

/// What goes between the org and the dimension in a period counter's key:
/// `}:2026-11-05:`.
fn key_middle(period: &Period) -> [u8; 13] {
    let mut middle = *b"}:0000-00-00:";
    middle[2..12].copy_from_slice(&period.key_bytes());
    middle
}

/// Whole seconds, without chrono's date arithmetic: the same instant.
fn expire_at(period: &Period) -> i64 {
    period.end.timestamp() + PERIOD_KEY_GRACE.num_seconds()
}

#[async_trait]
impl QuotaStore for RedisStore {
    async fn reserve(&self, request: &ReserveRequest) -> Result<Decided, StoreError> {
        self.call(|queues| &queues.reservations, request).await
    }

    fn begin_reserve(&self, request: ReserveRequest) -> Begun {
        let (outcome, reply) = Reply::channel();
        match self.queued(
            |queues| &queues.reservations,
            request,
            outcome,
            self.timeout,
        ) {
            Ok(()) => Begun::Queued(reply),
            Err((request, _)) => Begun::Later(request),
        }
    }

    fn begin_settle(&self, settlement: Settlement, report: Report) -> SettleBegun {
        let timeout = report.timeout;
        let answer = SettleAnswer::Report(report);
        match self.queued(|queues| &queues.settlements, settlement, answer, timeout) {
            Err((settlement, SettleAnswer::Report(report))) => {
                SettleBegun::Later(settlement, report)
            }
            // The answer handed back is the one given, never a reply.
            Ok(()) | Err((_, SettleAnswer::Reply(_))) => SettleBegun::Taken,
        }
    }

    async fn settle(&self, settlement: &Settlement) -> Result<(), StoreError> {
        self.call(|queues| &queues.settlements, settlement).await
    }

    async fn usage(&self, org: &OrgId, period: Period) -> Result<Amounts, StoreError> {
        let mut command = redis::cmd("MGET");
        for dimension in Dimension::ALL {
            command.arg(self.redis.counter_key(org, &period, dimension));
        }
        let values: Vec<Option<i64>> = self.redis.query(&command).await?;
        let mut usage = Amounts::ZERO;
        for (dimension, value) in Dimension::ALL.into_iter().zip(values) {
            usage.set(dimension, value.unwrap_or(0));
        }
        Ok(usage)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.redis.query::<()>(&redis::cmd("PING")).await
    }

    async fn set_usage(
        &self,
        org: &OrgId,
        period: Period,
        dimension: Dimension,
        value: i64,
    ) -> Result<(), StoreError> {
        let mut command = redis::cmd("SET");
        command
            .arg(self.redis.counter_key(org, &period, dimension))
            .arg(value);
        if !dimension.is_gauge() {
            command.arg("EXAT").arg(expire_at(&period));
        }
        self.redis.query::<()>(&command).await
    }

    async fn put_org(&self, org: &OrgId, record: &OrgRecord) -> Result<CatalogWrite, StoreError> {
        let hash = &self.catalog.orgs;
        self.change(hash, "org", org.as_str(), Some(record.to_json()))
            .await
    }

    async fn delete_org(&self, org: &OrgId) -> Result<CatalogWrite, StoreError> {
        self.change(&self.catalog.orgs, "org", org.as_str(), None)
            .await
    }

    async fn put_key(&self, key: &KeyRecord) -> Result<CatalogWrite, StoreError> {
        let json = catalog::key_json(key);
        self.change(&self.catalog.keys, "key", &key.id, Some(json))
            .await
    }

    async fn delete_key(&self, id: &str) -> Result<CatalogWrite, StoreError> {
        self.change(&self.catalog.keys, "key", id, None).await
    }

    async fn catalog(&self) -> Result<StoredCatalog, StoreError> {
        let mut invocation = catalog::READ.prepare_invoke();
        invocation
            .key(&self.catalog.orgs)
            .key(&self.catalog.keys)
            .key(&self.catalog.version);
        let reply = self.bounded(self.redis.invoke(&invocation)).await?;
        catalog::catalog(reply)
    }

    async fn catalog_version(&self) -> Result<u64, StoreError> {
        let mut command = redis::cmd("GET");
        command.arg(&self.catalog.version);
        let version: Option<u64> = self.bounded(self.redis.query(&command)).await?;
        Ok(version.unwrap_or(0))
    }

    async fn catalog_notices(
        &self,
    ) -> Result<Option<tokio::sync::mpsc::UnboundedReceiver<CatalogNotice>>, StoreError> {
        let pubsub = self.subscribe().await?;
        let (sender, notices) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(pass_notices(pubsub, sender));
        Ok(Some(notices))
    }
}

impl RedisStore {
    /// Runs one catalog change through the write script.
    async fn change(
        &self,
        hash: &str,
        kind: &str,
        id: &str,
        json: Option<String>,
    ) -> Result<CatalogWrite, StoreError> {
        let mut invocation = catalog::WRITE.prepare_invoke();
        invocation
            .key(hash)
            .key(&self.catalog.version)
            .arg(&self.catalog.channel)
            .arg(kind)
            .arg(id)
            .arg(json.unwrap_or_default());
        let (version, changed): (u64, u8) = self.bounded(self.redis.invoke(&invocation)).await?;
        Ok(CatalogWrite {
            version,
            changed: changed == 1,
        })
    }

    /// `call`, given up after the store timeout: a catalog call does not
    /// go through the batch queues that bound the others.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| StoreError::Timeout)?
    }

    /// A subscription to the notice channel on the first node that takes it.
    async fn subscribe(&self) -> Result<redis::aio::PubSub, StoreError> {
        let mut last = StoreError::Backend("no Redis address to subscribe on".into());
        for url in &self.notices_from {
            let subscribed = async {
                let client = redis::Client::open(url.as_str()).map_err(backend)?;
                let mut pubsub = client.get_async_pubsub().await.map_err(backend)?;
                pubsub
                    .subscribe(&self.catalog.channel)
                    .await
                    .map_err(backend)?;
                Ok(pubsub)
            };
            match self.bounded(subscribed).await {
                Ok(pubsub) => return Ok(pubsub),
                Err(error) => last = error,
            }
        }
        Err(last)
    }
}

/// Passes each notice of `pubsub` on to `notices`, until the subscription
/// ends (its connection closed) or no one listens.
async fn pass_notices(
    pubsub: redis::aio::PubSub,
    notices: tokio::sync::mpsc::UnboundedSender<CatalogNotice>,
) {
    use futures_util::StreamExt;
    let mut messages = pubsub.into_on_message();
    while let Some(message) = messages.next().await {
        let notice = match message.get_payload::<String>() {
            Ok(payload) => catalog::notice(&payload),
            Err(_) => CatalogNotice::Unreadable,
        };
        if notices.send(notice).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::MAX_AMOUNT;

    #[test]
    fn a_call_in_flight_times_out_at_its_own_time_not_at_its_batch_first() {
        let now = Instant::now();
        let (first, mut first_reply) = oneshot::channel::<Result<(), StoreError>>();
        let (second, mut second_reply) = oneshot::channel::<Result<(), StoreError>>();
        let (early, late) = (
            now + Duration::from_millis(100),
            now + Duration::from_millis(200),
        );
        let calls = [1_u8, 2];
        let mut answers = [(Some(first), early), (Some(second), late)];
        let mut in_flight = InFlight {
            calls: &calls,
            answers: &mut answers,
        };
        assert_eq!(in_flight.next(), Some(early));

        in_flight.expire(now + Duration::from_millis(150));
        assert!(matches!(
            first_reply.try_recv(),
            Ok(Err(StoreError::Timeout))
        ));
        assert!(second_reply.try_recv().is_err(), "answered before its time");
        assert_eq!(in_flight.next(), Some(late));

        in_flight.expire(late);
        assert!(matches!(
            second_reply.try_recv(),
            Ok(Err(StoreError::Timeout))
        ));
        assert_eq!(in_flight.next(), None);
    }

    #[test]
    fn the_scripts_hold_counters_to_max_amount() {
        let line = format!("local MOST_TEXT = '{MAX_AMOUNT}'");
        assert!(include_str!("redis/ledger.lua").contains(&line));
    }
}
