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
//! call.
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
//!   [`SETTLED_MARKER_SECONDS`] (or longer) after its last write;
//! - `{prefix}:{org}:reserved:{reservation id}` on a cluster only: the reply
//!   to a reservation, kept a few seconds, since the cluster client resends a
//!   call whose connection failed and the script must not run twice.
//!
//! [`quota::decide`]: crate::quota::decide

use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::{IntoConnectionInfo, RedisError, Script, ScriptInvocation, Value};
use tokio::sync::{mpsc, oneshot};

pub mod reply;

use super::{QuotaStore, ReserveRequest, Settlement, StoreError};
use crate::org::OrgId;
use crate::period::Period;
use crate::quota::{Amounts, Decision, Dimension, Mode};

/// How long a period's counters outlive it, so last period's usage can still
/// be read during the whole next one.
pub const PERIOD_KEY_GRACE: chrono::TimeDelta = chrono::TimeDelta::days(35);

/// How long a settlement marker is kept at least. A settlement is retried
/// within seconds (a few attempts, each bounded by the store timeout), so
/// this is far longer than any retry, yet short enough that one marker per
/// reconciled request does not pile up in Redis' memory.
const SETTLED_MARKER_SECONDS: u64 = 10 * 60;

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
/// own (reserve.lua, settle.lua beside it).
fn script(own: &str) -> Script {
    Script::new(&[include_str!("redis/ledger.lua"), own].concat())
}

static RESERVE: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/reserve.lua")));

static SETTLE: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/settle.lua")));

/// Where the store connects.
#[derive(Clone, Debug)]
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
    /// On a single server: where reservations and settlements queue for the
    /// tasks that send them, so that those arriving together travel as one
    /// script call. Under load that cuts the calls Redis runs, and the round
    /// trips, to a fraction; on an idle gateway each goes at once, alone.
    /// `None` on a cluster, whose orgs live on different nodes.
    queues: Option<Queues>,
}

struct Queues {
    reservations: mpsc::UnboundedSender<Queued<ReserveRequest, Decision>>,
    settlements: mpsc::UnboundedSender<Queued<Settlement, ()>>,
}

/// The most reservations (or settlements) sent in one script call.
const MAX_BATCH: usize = 64;

/// A call waiting to be sent, and where its outcome goes.
type Queued<C, O> = (C, oneshot::Sender<Result<O, StoreError>>);

/// The connection and the key layout: everything a call to Redis needs.
#[derive(Clone)]
struct Redis {
    connection: Connection,
    prefix: Arc<str>,
    /// Seconds a reservation's reply is remembered so that a resent call is
    /// not applied twice; 0 where the connection never resends.
    remember_reply_seconds: u64,
    /// Seconds a settlement marker is kept.
    settled_marker_seconds: u64,
}

impl RedisStore {
    /// Prepares the connection; it is made on first use, so the gateway
    /// starts (and fails open or closed per `on_error`) while Redis is down.
    ///
    /// The gateway bounds each call by `timeout` itself; the connection's
    /// own response timeout is longer, so that a call the gateway stopped
    /// waiting for still gets its reply and a late reservation can be undone.
    pub fn new(
        target: &RedisTarget,
        prefix: &str,
        timeout: Duration,
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
                    .set_response_timeout(Some(response_timeout))
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
        let redis = Redis {
            connection,
            prefix: prefix.into(),
            remember_reply_seconds,
            settled_marker_seconds: SETTLED_MARKER_SECONDS.max(response_timeout.as_secs() * 10),
        };
        let queues = match (target, tokio::runtime::Handle::try_current()) {
            (RedisTarget::Single(_), Ok(runtime)) => {
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
        Ok(RedisStore { redis, queues })
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
            Some(queues) => queue(queue_of(queues), call.clone()).await,
            None => only(send(self.redis.clone(), vec![call.clone()]).await?)?,
        }
    }
}

/// Sends queued calls with `send`, as many together as have queued up,
/// one script call at a time: the calls that queue while one is under way
/// go together in the next. (On the load benchmark a second call in flight
/// halved the batches, and cost more in Redis' CPU, on the same machine,
/// than it saved in waiting.) Ends with the store.
async fn send_batches<C, O, Sent>(
    redis: Redis,
    mut queued: mpsc::UnboundedReceiver<Queued<C, O>>,
    send: fn(Redis, Vec<C>) -> Sent,
) where
    C: Send + 'static,
    O: Send + 'static,
    Sent: Future<Output = Result<Vec<Result<O, StoreError>>, StoreError>> + Send + 'static,
{
    while let Some(first) = queued.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queued.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (calls, outcomes): (Vec<C>, Vec<_>) = batch.into_iter().unzip();
        // A request that stops waiting still awaits its outcome in the
        // background (settle::PendingReservation), so every one is sent.
        match send(redis.clone(), calls).await {
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
}

/// Queues `call` for its batch sender and waits for its outcome.
async fn queue<C, O>(
    queue: &mpsc::UnboundedSender<Queued<C, O>>,
    call: C,
) -> Result<O, StoreError> {
    let (sender, outcome) = oneshot::channel();
    let gone = || StoreError::Backend("the store's call queue is gone".into());
    queue.send((call, sender)).map_err(|_| gone())?;
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
    /// decision for each, or the error that kept it from being made.
    async fn reserve_all(
        self,
        requests: Vec<ReserveRequest>,
    ) -> Result<Vec<Result<Decision, StoreError>>, StoreError> {
        let mut invocation = RESERVE.prepare_invoke();
        invocation.arg(self.remember_reply_seconds);
        for request in &requests {
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
        let text: String = self.invoke(&invocation).await?;
        reply::reserve(&text, &requests)
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
        match self.connection.clone() {
            Connection::Single(mut connection) => invocation.invoke_async(&mut connection).await,
            Connection::Cluster(mut connection) => invocation.invoke_async(&mut connection).await,
        }
        .map_err(backend)
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
    async fn reserve(&self, request: &ReserveRequest) -> Result<Decision, StoreError> {
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
