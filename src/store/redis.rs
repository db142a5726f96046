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
//! decimal integer within [`MAX_AMOUNT`] either way) fails only the items
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

use super::{QuotaStore, ReserveRequest, Settlement, StoreError};
use crate::org::OrgId;
use crate::period::Period;
use crate::quota::{Amounts, Decision, Dimension, Exceeded, MAX_AMOUNT, Mode};

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
/// integer within [`MAX_AMOUNT`] either way, a key of another type) fails
/// only the items that touch it, each answered `E`: one org's damaged key
/// must not fail another org's requests, nor the same org's that do not
/// touch it.
macro_rules! lua_ledger {
    () => {
        r"
local values, written, later = {}, {}, {}
-- The most a counter holds (`quota::MAX_AMOUNT`, 2^53 - 1): past it a
-- double no longer counts by ones. Compared as text too, since a double
-- cannot tell 2^53 from it.
local MOST_TEXT = '9007199254740991'
local MOST = tonumber(MOST_TEXT)
-- The number `text` is if it is the decimal integer text tollgate writes,
-- within MOST either way; else nil. (`tonumber` alone would take 'nan',
-- 'inf', '1.5', '1e3', '0x10' and ' 7', and the first two would then be
-- written back as numbers no limit stops.)
local function integer(text)
  local digits = type(text) == 'string' and string.match(text, '^%-?(%d+)$')
  if not digits or #digits > #MOST_TEXT or (#digits == #MOST_TEXT and digits > MOST_TEXT) then
    return nil
  end
  return tonumber(text)
end
-- Whether a `redis.pcall` reply is Redis refusing a key of another type.
-- Any other error (an ACL's, say) is raised: it is no damaged key, and the
-- whole call fails, to be retried.
local function wrong_type(reply)
  if type(reply) == 'table' and reply.err then
    if string.find(reply.err, '^WRONGTYPE') then
      return true
    end
    error(reply)
  end
  return false
end
-- A counter's value so far in this call; false if it holds what tollgate
-- does not write there.
local function value(counter)
  if values[counter] == nil then
    local stored = redis.pcall('GET', counter)
    if wrong_type(stored) then
      values[counter] = false
    elseif not stored then
      values[counter] = 0
    else
      values[counter] = integer(stored) or false
    end
  end
  return values[counter]
end
-- Whether every counter of an item (KEYS[first + 1 .. first + n]) holds
-- what tollgate writes there.
local function intact(first, n)
  for i = 1, n do
    if value(KEYS[first + i]) == false then
      return false
    end
  end
  return true
end
-- Adds `amount` to a counter; a release never takes it below zero, nor an
-- increment past MOST. A gauge ('1') keeps no expiry; a period counter
-- expires at `expire_at`. Returns the amount added.
local function add(counter, amount, gauge, expire_at)
  local current = value(counter)
  if amount < 0 then
    amount = math.max(amount, -math.max(current, 0))
  else
    amount = math.min(amount, MOST - current)
  end
  if amount ~= 0 then
    values[counter] = current + amount
    written[counter] = gauge == '1' and 'gauge' or expire_at
  end
  return amount
end
-- A write other than a counter's (a whole command), made at the end.
local function write_later(...)
  later[#later + 1] = {...}
end
local function flush()
  for counter, expiry in pairs(written) do
    local text = string.format('%d', values[counter])
    if expiry == 'gauge' then
      redis.call('SET', counter, text, 'KEEPTTL')
    else
      redis.call('SET', counter, text, 'EXAT', expiry)
    end
  end
  for _, command in ipairs(later) do
    redis.call(unpack(command))
  end
end
"
    };
}

static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_ledger!(),
        r"
-- Reservations one after another, each checked and applied all or none.
-- KEYS: per reservation, its marker (only if remembered), then its counters.
-- ARGV[1]: seconds to remember each reservation's reply, '0' for not at all.
-- Then per reservation: '1' to enforce or '0' for shadow mode; the unix time
-- its period counters expire at; its number of counters n; and n times the
-- counter's cost, limit (-1: none), '1' if a gauge.
-- Reply: one string, a part per reservation, separated by ';'. The usual
-- outcome, admitted with nothing exceeded and every cost applied as asked,
-- is '1'; 'E' is a reservation not made, as its marker or a counter holds
-- what tollgate did not write there. Any other is integers separated by
-- spaces: admitted (1 or 0), the index of its first exceeded counter or 0,
-- that counter's value, then the amount applied to each counter.
-- (Converting numbers to and from text is most of what a reservation costs
-- Redis, hence also each cost parsed once into `costs`; reading an array of
-- integers is most of what the reply costs the gateway.)
-- The reply a marker remembers, or false if it holds no reply of a
-- reservation of `counters` counters.
local function remembered(text, counters)
  local decoded, reply = pcall(cjson.decode, text)
  if not decoded or type(reply) ~= 'table' or #reply ~= 3 + counters then
    return false
  end
  for i = 1, #reply do
    local part = reply[i]
    if type(part) ~= 'number' or part ~= math.floor(part) or math.abs(part) > MOST then
      return false
    end
  end
  if (reply[1] ~= 0 and reply[1] ~= 1) or reply[2] < 0 or reply[2] > counters then
    return false
  end
  return reply
end
local remember = ARGV[1]
local markers = remember ~= '0' and 1 or 0
local replies, costs, key, arg = {}, {}, 1, 2
while arg <= #ARGV do
  local enforce, expire_at, counters = ARGV[arg] == '1', ARGV[arg + 1], tonumber(ARGV[arg + 2])
  -- Counter i is KEYS[first + i].
  local first = key + markers - 1
  for i = 1, counters do
    costs[i] = tonumber(ARGV[arg + 3 * i])
  end
  local reply = nil
  if markers == 1 then
    -- A client that resends a call it got no reply to gets the first reply.
    local earlier = redis.pcall('GET', KEYS[key])
    if wrong_type(earlier) then
      reply = 'E'
    elseif earlier then
      reply = remembered(earlier, counters) or 'E'
    end
  end
  if not reply and not intact(first, counters) then
    reply = 'E'
  elseif not reply then
    local exceeded, exceeded_value = 0, 0
    for i = 1, counters do
      if exceeded == 0 and costs[i] > 0 then
        local limit, current = tonumber(ARGV[arg + 3 * i + 1]), value(KEYS[first + i])
        if limit >= 0 and current + costs[i] > limit then
          exceeded, exceeded_value = i, current
        end
      end
    end
    reply = {0, exceeded, exceeded_value}
    local admitted = exceeded == 0 or not enforce
    if admitted then
      reply[1] = 1
    end
    for i = 1, counters do
      reply[3 + i] = admitted
        and add(KEYS[first + i], costs[i], ARGV[arg + 3 * i + 2], expire_at)
        or 0
    end
    if markers == 1 then
      write_later('SET', KEYS[key], cjson.encode(reply), 'EX', remember)
    end
  end
  local usual = reply ~= 'E' and reply[1] == 1 and reply[2] == 0
  for i = 1, counters do
    usual = usual and reply[3 + i] == costs[i]
  end
  if reply == 'E' then
    replies[#replies + 1] = 'E'
  elseif usual then
    replies[#replies + 1] = '1'
  else
    local parts = {}
    for i, part in ipairs(reply) do
      parts[i] = string.format('%d', part)
    end
    replies[#replies + 1] = table.concat(parts, ' ')
  end
  key = key + markers + counters
  arg = arg + 3 + 3 * counters
end
flush()
return table.concat(replies, ';')
",
    ))
});

static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_ledger!(),
        r"
-- Settlements one after another, each applied at most once per reservation.
-- KEYS: per settlement, the hash its reservation's settlement marker goes
-- in, then its counters.
-- ARGV[1]: seconds a marker hash is kept after its last write (relative,
-- so that no clock but Redis' own decides when markers go). Then per
-- settlement: its reservation id; the unix time its period counters expire
-- at; its number of counters n; and n times the counter's correction, '1'
-- if a gauge.
-- Reply, one string with a character per settlement: 1 if applied, 0 if
-- that reservation was settled before, E if not applied because its marker
-- hash or one of its counters holds what tollgate did not write there.
local function each(visit)
  local key, arg = 1, 2
  while arg <= #ARGV do
    local counters = tonumber(ARGV[arg + 2])
    visit(key, arg, counters)
    key = key + 1 + counters
    arg = arg + 3 + 2 * counters
  end
end
-- Which of the ids are marked already: one HMGET per marker hash.
local asked = {}
each(function(key, arg)
  local ids = asked[KEYS[key]] or {}
  ids[#ids + 1] = ARGV[arg]
  asked[KEYS[key]] = ids
end)
local settled, damaged = {}, {}
for hash, ids in pairs(asked) do
  local found = redis.pcall('HMGET', hash, unpack(ids))
  if wrong_type(found) then
    damaged[hash] = true
  else
    for i, id in ipairs(ids) do
      if found[i] then
        settled[hash .. ' ' .. id] = true
      end
    end
  end
end
-- Then each settlement, in order.
local marks, replies = {}, {}
each(function(key, arg, counters)
  local hash, id = KEYS[key], ARGV[arg]
  local marker = hash .. ' ' .. id
  if settled[marker] then
    replies[#replies + 1] = '0'
    return
  end
  if damaged[hash] or not intact(key, counters) then
    replies[#replies + 1] = 'E'
    return
  end
  settled[marker] = true
  local fields = marks[hash] or {}
  fields[#fields + 1] = id
  fields[#fields + 1] = '1'
  marks[hash] = fields
  for i = 1, counters do
    add(KEYS[key + i], tonumber(ARGV[arg + 1 + 2 * i]), ARGV[arg + 2 + 2 * i], ARGV[arg + 1])
  end
  replies[#replies + 1] = '1'
end)
for hash, fields in pairs(marks) do
  write_later('HSET', hash, unpack(fields))
  write_later('EXPIRE', hash, ARGV[1])
end
flush()
return table.concat(replies)
",
    ))
});

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
        let mut costs = Vec::with_capacity(requests.len());
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
            costs.push(cost);
        }
        let text: String = self.invoke(&invocation).await?;
        let unexpected = || {
            StoreError::Backend(format!(
                "unexpected reply from the reserve script: {text:?}"
            ))
        };
        let mut parts = text.split(';');
        let mut decisions = Vec::with_capacity(requests.len());
        for (request, cost) in requests.iter().zip(&costs) {
            let part = parts.next().ok_or_else(unexpected)?;
            if part == "1" {
                decisions.push(Ok(Decision::Admit {
                    applied: request.cost,
                    over: None,
                }));
                continue;
            }
            if part == "E" {
                decisions.push(Err(StoreError::DamagedKey(request.org.clone())));
                continue;
            }
            let reply = part
                .split(' ')
                .map(str::parse)
                .collect::<Result<Vec<i64>, _>>()
                .map_err(|_| unexpected())?;
            let Some((&[admitted, exceeded_at, current], applied)) = reply.split_first_chunk::<3>()
            else {
                return Err(unexpected());
            };
            if applied.len() != cost.len()
                || !(0..=1).contains(&admitted)
                || applied.iter().any(|amount| amount.abs() > MAX_AMOUNT)
            {
                return Err(unexpected());
            }
            let exceeded = match usize::try_from(exceeded_at).map_err(|_| unexpected())? {
                0 => None,
                position => {
                    let &(dimension, requested) = cost.get(position - 1).ok_or_else(unexpected)?;
                    let limit = request.limits.get(dimension).ok_or_else(unexpected)?;
                    Some(Exceeded {
                        dimension,
                        current,
                        limit,
                        requested,
                    })
                }
            };
            decisions.push(Ok(if admitted == 0 {
                Decision::Deny(exceeded.ok_or_else(unexpected)?)
            } else {
                let mut amounts = Amounts::ZERO;
                for (&(dimension, _), &amount) in cost.iter().zip(applied) {
                    amounts.set(dimension, amount);
                }
                Decision::Admit {
                    applied: amounts,
                    over: exceeded,
                }
            }));
        }
        if parts.next().is_some() {
            return Err(unexpected());
        }
        Ok(decisions)
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
        // A character per settlement, 1 if applied, 0 if settled before:
        // either way, settled; E if not.
        let applied: String = self.invoke(&invocation).await?;
        let unexpected = || {
            StoreError::Backend(format!(
                "unexpected reply from the settle script: {applied:?}"
            ))
        };
        if applied.len() != settlements.len() {
            return Err(unexpected());
        }
        settlements
            .iter()
            .zip(applied.chars())
            .map(|(settlement, outcome)| match outcome {
                '0' | '1' => Ok(Ok(())),
                'E' => Ok(Err(StoreError::DamagedKey(settlement.org.clone()))),
                _ => Err(unexpected()),
            })
            .collect()
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
