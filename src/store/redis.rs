//! The production store: counters in Redis (or a Redis Cluster), shared by
//! every gateway instance.
//!
//! A reservation is one Lua script, one round trip: it reads every counter
//! the cost names, applies [`quota::decide`]'s rule, and increments all or
//! none. A settlement is another script that first sets a marker for the
//! reservation id (`SET NX`), so a settlement retried after a timeout changes
//! nothing the second time. Scripts go by `EVALSHA` and are reloaded when
//! Redis answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).
//!
//! Keys carry the org as a hash tag, so one org's keys share a cluster slot
//! and a script can touch all of them:
//!
//! - `{prefix}:{org}:{period start}:{dimension}` for period counters, expiring
//!   [`PERIOD_KEY_GRACE`] after the period ends;
//! - `{prefix}:{org}:{dimension}` for gauges (seats), never expiring;
//! - `{prefix}:{org}:settled:{reservation id}` for settlement markers;
//! - `{prefix}:{org}:reserved:{reservation id}` on a cluster only: the reply
//!   to a reservation, kept a few seconds, since the cluster client resends a
//!   call whose connection failed and the script must not run twice.
//!
//! [`quota::decide`]: crate::quota::decide

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::{IntoConnectionInfo, RedisError, Script, ScriptInvocation, Value};

use super::{QuotaStore, ReserveRequest, Settlement, StoreError};
use crate::org::OrgId;
use crate::period::Period;
use crate::quota::{Amounts, Decision, Dimension, Exceeded, Mode};

/// How long a period's counters outlive it, so last period's usage can still
/// be read during the whole next one.
pub const PERIOD_KEY_GRACE: chrono::TimeDelta = chrono::TimeDelta::days(35);

/// How long a settlement marker is kept at least. A settlement is retried
/// within seconds (a few attempts, each bounded by the store timeout), so
/// this is far longer than any retry, yet short enough that one marker per
/// reconciled request does not pile up in Redis' memory.
const SETTLED_MARKER_SECONDS: u64 = 10 * 60;

static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS[1]: this reservation's marker. KEYS[i + 1]: one counter.
-- ARGV[1]: '1' to enforce, '0' for shadow mode. ARGV[2]: unix time period
-- counters expire at. ARGV[3]: seconds to remember this reservation's reply,
-- '0' for not at all.
-- ARGV[3i + 1], ARGV[3i + 2], ARGV[3i + 3]: counter i's cost, limit (-1: none),
-- '1' if a gauge.
-- Reply: {admitted, index of the first exceeded counter or 0, its current
-- value, applied amounts...}
if ARGV[3] ~= '0' then
  -- A client that resends a call it got no reply to gets the first reply.
  local earlier = redis.call('GET', KEYS[1])
  if earlier then
    return cjson.decode(earlier)
  end
end
local counters = #KEYS - 1
local current, exceeded = {}, 0
for i = 1, counters do
  local cost, limit = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  current[i] = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
  if exceeded == 0 and cost > 0 and limit >= 0 and current[i] + cost > limit then
    exceeded = i
  end
end
local reply = {0, exceeded, exceeded > 0 and current[exceeded] or 0}
if exceeded == 0 or ARGV[1] ~= '1' then
  reply[1] = 1
  for i = 1, counters do
    local cost = tonumber(ARGV[3 * i + 1])
    if cost < 0 then
      cost = math.max(cost, -math.max(current[i], 0))
    end
    -- A counter gets its expiry when it is created (it counts up from 0),
    -- not on every reservation.
    if cost ~= 0 and redis.call('INCRBY', KEYS[i + 1], cost) == cost
        and ARGV[3 * i + 3] == '0' then
      redis.call('EXPIREAT', KEYS[i + 1], ARGV[2])
    end
    reply[3 + i] = cost
  end
end
if ARGV[3] ~= '0' then
  redis.call('SET', KEYS[1], cjson.encode(reply), 'EX', ARGV[3])
end
return reply
",
    )
});

static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS[1]: the reservation's settlement marker. KEYS[i + 1]: one counter.
-- ARGV[1]: marker lifetime in seconds. ARGV[2]: unix time period counters expire at.
-- ARGV[2i + 1], ARGV[2i + 2]: KEYS[i + 1]'s correction, '1' if a gauge.
-- Reply: 1 if applied, 0 if this reservation was already settled.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
for i = 1, #KEYS - 1 do
  local correction = tonumber(ARGV[2 * i + 1])
  if correction < 0 then
    local current = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
    correction = math.max(correction, -math.max(current, 0))
  end
  if correction ~= 0 and redis.call('INCRBY', KEYS[i + 1], correction) == correction
      and ARGV[2 * i + 2] == '0' then
    redis.call('EXPIREAT', KEYS[i + 1], ARGV[2])
  end
end
return 1
",
    )
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
    connection: Connection,
    prefix: String,
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
        Ok(RedisStore {
            connection,
            prefix: prefix.to_string(),
            remember_reply_seconds,
            settled_marker_seconds: SETTLED_MARKER_SECONDS.max(response_timeout.as_secs() * 10),
        })
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
        let dimensions: Vec<(Dimension, i64)> = request.cost.iter().collect();
        let mut invocation = RESERVE.prepare_invoke();
        invocation
            .key(self.org_key(&request.org, &["reserved", &request.id.hex()]))
            .arg(if request.mode == Mode::Enforce {
                "1"
            } else {
                "0"
            })
            .arg(expire_at(&request.period))
            .arg(self.remember_reply_seconds);
        for &(dimension, cost) in &dimensions {
            invocation.key(self.counter_key(&request.org, &request.period, dimension));
            invocation
                .arg(cost)
                .arg(request.limits.get(dimension).unwrap_or(-1))
                .arg(gauge_flag(dimension));
        }
        let reply: Vec<i64> = self.invoke(&invocation).await?;

        let unexpected = || {
            StoreError::Backend(format!(
                "unexpected reply from the reserve script: {reply:?}"
            ))
        };
        let (&[admitted, exceeded_at, current], applied) =
            reply.split_first_chunk::<3>().ok_or_else(unexpected)?;
        let exceeded = match usize::try_from(exceeded_at).map_err(|_| unexpected())? {
            0 => None,
            position => {
                let index = position - 1;
                let &(dimension, requested) = dimensions.get(index).ok_or_else(unexpected)?;
                let limit = request.limits.get(dimension).ok_or_else(unexpected)?;
                Some(Exceeded {
                    dimension,
                    current,
                    limit,
                    requested,
                })
            }
        };
        if admitted == 0 {
            return exceeded.map(Decision::Deny).ok_or_else(unexpected);
        }
        if applied.len() != dimensions.len() {
            return Err(unexpected());
        }
        let mut amounts = Amounts::ZERO;
        for (&(dimension, _), &amount) in dimensions.iter().zip(applied) {
            amounts.set(dimension, amount);
        }
        Ok(Decision::Admit {
            applied: amounts,
            over: exceeded,
        })
    }

    async fn settle(&self, settlement: &Settlement<'_>) -> Result<(), StoreError> {
        let mut invocation = SETTLE.prepare_invoke();
        invocation
            .key(self.org_key(settlement.org, &["settled", &settlement.id.hex()]))
            .arg(self.settled_marker_seconds)
            .arg(expire_at(&settlement.period));
        for (dimension, correction) in settlement.correction.iter() {
            invocation.key(self.counter_key(settlement.org, &settlement.period, dimension));
            invocation.arg(correction).arg(gauge_flag(dimension));
        }
        let _applied: i64 = self.invoke(&invocation).await?;
        Ok(())
    }

    async fn usage(&self, org: &OrgId, period: Period) -> Result<Amounts, StoreError> {
        let mut command = redis::cmd("MGET");
        for dimension in Dimension::ALL {
            command.arg(self.counter_key(org, &period, dimension));
        }
        let values: Vec<Option<i64>> = self.query(&command).await?;
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
            .arg(self.counter_key(org, &period, dimension))
            .arg(value);
        if !dimension.is_gauge() {
            command.arg("EXAT").arg(expire_at(&period));
        }
        self.query::<()>(&command).await
    }
}
