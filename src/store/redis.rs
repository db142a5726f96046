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

mod catalog;
pub mod reply;

use super::{
    CatalogNotice, CatalogWrite, KeyRecord, QuotaStore, ReservationId, ReserveRequest, Settlement,
    StoreError, StoredCatalog,
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
fn script(own: &str) -> Script {
    Script::new(&[include_str!("redis/ledger.lua"), own].concat())
}

static RESERVE: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/reserve.lua")));

static SETTLE: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/settle.lua")));

static ASK: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/ask.lua")));

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
    reservations: mpsc::UnboundedSender<Queued<ReserveRequest, Decided>>,
    settlements: mpsc::UnboundedSender<Queued<Settlement, ()>>,
}

/// The most reservations (or settlements) sent in one script call.
const MAX_BATCH: usize = 64;

/// A call waiting to be sent, where its outcome goes, and when it is too
/// late to send it.
type Queued<C, O> = (C, Outcome<O>, Instant);

/// The connection and the key layout: everything a call to Redis needs.
#[derive(Clone)]
struct Redis {
    connection: Connection,
    prefix: Arc<str>,
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
    /// The number of the last call sent.
    sequence: AtomicU64,
}

impl RedisStore {
    /// Prepares the connection; it is made on first use, so the gateway
    /// starts (and fails open or closed per `on_error`) while Redis is down.
    ///
    /// The gateway bounds its wait for each call by `timeout` itself, and a
    /// call that could not be sent within it is not sent. A call sent is
    /// waited for longer in the background, so that a reservation the
    /// gateway stopped waiting for still gets its reply and can be undone:
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
        let connection = match target {
            RedisTarget::Single(url) => {
                let info = url
                    .as_str()
                    .into_connection_info()
                    .map_err(backend)?
                    .set_tcp_settings(tcp);
                let client = redis::Client::open(info).map_err(backend)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(None)
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                Connection::Single(
                    ConnectionManager::new_lazy_with_config(client, config).map_err(backend)?,
                )
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
                Connection::Cluster(client.get_pending_async_connection_with_config(config))
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
            remember_reply_seconds,
            settled_marker_seconds: settle_retry_for.as_secs() + SETTLED_MARKER_MARGIN_SECONDS,
            ask_for: settle_retry_for,
            calls: None,
        };
        let queues = match (target, tokio::runtime::Handle::try_current()) {
            (RedisTarget::Single(_), Ok(runtime)) => {
                redis.calls = Some(Arc::new(CallRecord {
                    key: format!("{prefix}:calls:{}", ReservationId::next().hex()),
                    sequence: AtomicU64::new(0),
                }));
                let (reservations, queued) = mpsc::unbounded_channel();
                runtime.spawn(send_batches(redis.clone(), queued, Redis::reserve_all));
                let (settlements, queued) = mpsc::unbounded_channel();
                runtime.spawn(send_batches(redis.clone(), queued, Redis::settle_all));
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
    /// One call: through its batch queue on a single server, alone (by
    /// `send`) on a cluster.
    async fn call<C: Clone, O, Sent>(
        &self,
        queue_of: fn(&Queues) -> &mpsc::UnboundedSender<Queued<C, O>>,
        call: &C,
        send: fn(Redis, Vec<C>) -> Sent,
    ) -> Result<O, StoreError>
    where
        Sent: Future<Output = Result<Vec<Result<O, StoreError>>, StoreError>>,
    {
        match &self.queues {
            Some(queues) => {
                let too_late = Instant::now() + self.timeout;
                queue(queue_of(queues), call.clone(), too_late).await
            }
            None => only(send(self.redis.clone(), vec![call.clone()]).await?)?,
        }
    }
}

/// Sends queued calls with `send`, as many together as have queued up,
/// one script call at a time: the calls that queue while one is under way
/// go together in the next. (On the load benchmark a second call in flight
/// halved the batches, and cost more in Redis' CPU, on the same machine,
/// than it saved in waiting.) A call not sent within the store timeout is
/// not sent at all: its caller has gone on without it, and the calls queued
/// behind a stalled Redis must not all land on it once it is back. Ends
/// with the store.
async fn send_batches<C, O, Sent>(
    redis: Redis,
    mut queued: mpsc::UnboundedReceiver<Queued<C, O>>,
    send: fn(Redis, Vec<C>) -> Sent,
) where
    C: Send + 'static,
    O: Send + 'static,
    Sent: Future<Output = Result<Vec<Result<O, StoreError>>, StoreError>> + Send + 'static,
{
    let mut waiting = VecDeque::new();
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
        let (calls, outcomes): (Vec<C>, Vec<_>) = batch(&mut waiting).into_iter().unzip();
        if calls.is_empty() {
            continue;
        }
        // A request that stopped waiting after its call was sent still
        // awaits the outcome in the background (ledger::PendingReservation).
        let sent = meanwhile(send(redis.clone(), calls), &mut queued, &mut waiting).await;
        deliver(outcomes, sent);
    }
}

type Outcome<O> = oneshot::Sender<Result<O, StoreError>>;

/// Up to [`MAX_BATCH`] calls from the front of `waiting`; those past their
/// time are answered instead.
fn batch<C, O>(waiting: &mut VecDeque<Queued<C, O>>) -> Vec<(C, Outcome<O>)> {
    let now = Instant::now();
    let mut batch = Vec::new();
    while batch.len() < MAX_BATCH {
        let Some((call, outcome, too_late)) = waiting.pop_front() else {
            break;
        };
        if now < too_late {
            batch.push((call, outcome));
        } else {
            let _ = outcome.send(Err(StoreError::Timeout));
        }
    }
    batch
}

/// Awaits `sent`, meanwhile taking in the calls that queue and answering
/// each as its time passes, so that a call held up by a stalled Redis holds
/// up no caller behind it longer than the store timeout.
async fn meanwhile<C, O, T>(
    sent: impl Future<Output = T>,
    queued: &mut mpsc::UnboundedReceiver<Queued<C, O>>,
    waiting: &mut VecDeque<Queued<C, O>>,
) -> T {
    let mut sent = std::pin::pin!(sent);
    let mut expiry = std::pin::pin!(tokio::time::sleep_until(Instant::now()));
    let mut open = true;
    loop {
        // Set only when the first waiting call changes: calls time out in
        // the order they queued.
        if let Some(&(_, _, too_late)) = waiting.front()
            && expiry.deadline() != too_late
        {
            expiry.as_mut().reset(too_late);
        }
        tokio::select! {
            biased;
            result = &mut sent => return result,
            next = queued.recv(), if open => match next {
                Some(next) => waiting.push_back(next),
                None => open = false,
            },
            () = &mut expiry, if !waiting.is_empty() => {
                let now = Instant::now();
                while let Some((_, _, too_late)) = waiting.front()
                    && *too_late <= now
                {
                    if let Some((_, outcome, _)) = waiting.pop_front() {
                        let _ = outcome.send(Err(StoreError::Timeout));
                    }
                }
            }
        }
    }
}

/// Hands each caller its outcome from a batch's `sent` result.
fn deliver<O>(outcomes: Vec<Outcome<O>>, sent: Result<Vec<Result<O, StoreError>>, StoreError>) {
    match sent {
        Ok(results) if results.len() == outcomes.len() => {
            for (outcome, result) in outcomes.into_iter().zip(results) {
                let _ = outcome.send(result);
            }
        }
        Ok(_) => {
            for outcome in outcomes {
                let _ = outcome.send(Err(StoreError::Backend(
                    "a reply for each call was expected".into(),
                )));
            }
        }
        Err(error) => {
            for outcome in outcomes {
                let _ = outcome.send(Err(StoreError::Backend(error.to_string())));
            }
        }
    }
}

/// Queues `call` for its batch sender and waits for its outcome.
async fn queue<C, O>(
    queue: &mpsc::UnboundedSender<Queued<C, O>>,
    call: C,
    too_late: Instant,
) -> Result<O, StoreError> {
    let (sender, outcome) = oneshot::channel();
    let gone = || StoreError::Backend("the store's call queue is gone".into());
    queue.send((call, sender, too_late)).map_err(|_| gone())?;
    outcome.await.map_err(|_| gone())?
}

/// The only outcome of a batch of one.
fn only<O>(outcomes: Vec<O>) -> Result<O, StoreError> {
    outcomes
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::Backend("the store sent no reply".into()))
}

impl Redis {
    /// Runs `requests` through one reserve script call, in order; a
    /// decision for each, or the error that kept it from being made. On a
    /// single server the call is numbered and recorded, and if its reply is
    /// lost, its outcome is asked for.
    async fn reserve_all(
        self,
        requests: Vec<ReserveRequest>,
    ) -> Result<Vec<Result<Decided, StoreError>>, StoreError> {
        let sequence = self
            .calls
            .as_ref()
            .map(|calls| calls.sequence.fetch_add(1, Ordering::Relaxed) + 1);
        let invocation = self.reserve_invocation(&requests, sequence);
        match (self.invoke_raw::<String>(&invocation).await, sequence) {
            (Ok(text), _) => reply::reserve(&text, &requests),
            (Err(error), Some(sequence)) if reply_lost(&error) => {
                self.ask(sequence, &requests, error).await
            }
            (Err(error), _) => Err(backend(error)),
        }
    }

    fn reserve_invocation(
        &self,
        requests: &[ReserveRequest],
        sequence: Option<u64>,
    ) -> ScriptInvocation<'static> {
        let mut invocation = RESERVE.prepare_invoke();
        invocation
            .arg(self.remember_reply_seconds)
            .arg(sequence.unwrap_or(0))
            .arg(self.settled_marker_seconds);
        if let Some(calls) = &self.calls {
            invocation.key(&calls.key);
        }
        for request in requests {
            let cost: Vec<(Dimension, i64)> = request.cost.iter().collect();
            if self.remember_reply_seconds > 0 {
                invocation.key(self.org_key(&request.org, &["reserved", &request.id.hex()]));
            }
            invocation
                .arg(if request.mode == Mode::Enforce {
                    "1"
                } else {
                    "0"
                })
                .arg(expire_at(&request.period))
                .arg(cost.len());
            for &(dimension, amount) in &cost {
                invocation
                    .key(self.counter_key(&request.org, &request.period, dimension))
                    .arg(amount)
                    .arg(request.limits.get(dimension).unwrap_or(-1))
                    .arg(gauge_flag(dimension));
            }
        }
        invocation
    }

    /// The outcome of reserve call `sequence`, whose reply was `lost`: its
    /// recorded reply if it ran; if it did not, it is recorded as not run
    /// (so that it runs nothing should Redis still receive it) and each
    /// request fails. Asked again until Redis answers, pausing from 50ms
    /// doubling up to a second, for `settle_retry_for` (the record is kept
    /// longer); the calls queued meanwhile wait, and those past the store
    /// timeout are not sent.
    async fn ask(
        &self,
        sequence: u64,
        requests: &[ReserveRequest],
        lost: RedisError,
    ) -> Result<Vec<Result<Decided, StoreError>>, StoreError> {
        let Some(calls) = &self.calls else {
            return Err(backend(lost));
        };
        let until = Instant::now() + self.ask_for;
        let mut pause = Duration::from_millis(50);
        let mut invocation = ASK.prepare_invoke();
        invocation
            .key(&calls.key)
            .arg(sequence)
            .arg(self.settled_marker_seconds);
        loop {
            match self.invoke_raw::<String>(&invocation).await {
                Ok(text) if text == NOT_RUN => return Err(backend(lost)),
                Ok(text) => return reply::reserve(&text, requests),
                Err(error) if !reply_lost(&error) || Instant::now() >= until => {
                    tracing::error!(%error, reservations = requests.len(), "could not learn whether Redis applied reservations whose reply was lost; they stand if it did");
                    return Err(backend(lost));
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Applies `settlements` through one settle script call, in order; for
    /// each, whether it is settled.
    async fn settle_all(
        self,
        settlements: Vec<Settlement>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let mut invocation = SETTLE.prepare_invoke();
        invocation.arg(self.settled_marker_seconds);
        for settlement in &settlements {
            let corrections: Vec<(Dimension, i64)> = settlement.correction.iter().collect();
            let bucket = settlement.made_at - settlement.made_at % SETTLED_BUCKET_SECONDS;
            invocation
                .key(self.org_key(&settlement.org, &["settled", &bucket.to_string()]))
                .arg(settlement.id.hex())
                .arg(expire_at(&settlement.period))
                .arg(corrections.len());
            for (dimension, correction) in corrections {
                invocation
                    .key(self.counter_key(&settlement.org, &settlement.period, dimension))
                    .arg(correction)
                    .arg(gauge_flag(dimension));
            }
        }
        let applied: String = self.invoke(&invocation).await?;
        reply::settle(&applied, &settlements)
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

fn expire_at(period: &Period) -> i64 {
    (period.end + PERIOD_KEY_GRACE).timestamp()
}

fn gauge_flag(dimension: Dimension) -> &'static str {
    if dimension.is_gauge() { "1" } else { "0" }
}

#[async_trait]
impl QuotaStore for RedisStore {
    async fn reserve(&self, request: &ReserveRequest) -> Result<Decided, StoreError> {
        self.call(|queues| &queues.reservations, request, Redis::reserve_all)
            .await
    }

    async fn settle(&self, settlement: &Settlement) -> Result<(), StoreError> {
        self.call(|queues| &queues.settlements, settlement, Redis::settle_all)
            .await
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
    use crate::quota::MAX_AMOUNT;

    #[test]
    fn the_scripts_hold_counters_to_max_amount() {
        let line = format!("local MOST_TEXT = '{MAX_AMOUNT}'");
        assert!(include_str!("redis/ledger.lua").contains(&line));
    }
}
