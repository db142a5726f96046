//! The usage summary: an org's counters against its limits in its current
//! period, as the admin API answers it and the usage pages show it.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::catalog::Catalog;
use crate::meter::Clock;
use crate::org::{OrgId, OrgPolicy};
use crate::period::{Period, rfc3339};
use crate::quota::{Amounts, Dimension, Limits};
use crate::store::{QuotaStore, StoreError};

/// `GET /v1/orgs/{org}/usage`: an org's counters in its current period.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub org: OrgId,
    pub plan: Arc<str>,
    pub billing_status: Arc<str>,
    pub enforcement: &'static str,
    pub period_start: String,
    pub period_end: String,
    pub usage: Usage,
}

/// One entry per dimension.
#[derive(Clone, Debug, Serialize)]
pub struct Usage {
    pub tokens: Used,
    pub playbook_runs: Used,
    pub seats: Used,
}

/// A counter against its limit; `limit` and `remaining` are null when
/// unlimited, and `remaining` never goes below 0.
#[derive(Clone, Debug, Serialize)]
pub struct Used {
    pub used: i64,
    pub limit: Option<i64>,
    pub remaining: Option<i64>,
}

impl Usage {
    pub fn of(limits: &Limits, used: &Amounts) -> Usage {
        let entry = |dimension: Dimension| {
            let (used, limit) = (used.get(dimension), limits.get(dimension));
            Used {
                used,
                limit,
                remaining: limit.map(|limit| limit.saturating_sub(used).max(0)),
            }
        };
        Usage {
            tokens: entry(Dimension::Tokens),
            playbook_runs: entry(Dimension::PlaybookRuns),
            seats: entry(Dimension::Seats),
        }
    }
}

impl Summary {
    pub fn new(org: OrgId, policy: &OrgPolicy, period: Period, used: &Amounts) -> Summary {
        Summary {
            org,
            plan: policy.plan.clone(),
            billing_status: policy.billing_status.clone(),
            enforcement: policy.mode.as_str(),
            period_start: rfc3339(period.start),
            period_end: rfc3339(period.end),
            usage: Usage::of(&policy.limits, used),
        }
    }
}

impl Used {
    /// Whether the counter has reached its limit.
    pub fn at_limit(&self) -> bool {
        self.limit.is_some_and(|limit| self.used >= limit)
    }

    /// `used` over `limit`, when there is one (a limit of 0 counts as full).
    pub fn fraction(&self) -> Option<f64> {
        self.limit.map(|limit| match limit {
            0 => 1.0,
            limit => self.used as f64 / limit as f64,
        })
    }
}

impl Usage {
    /// The dimensions with their names, in the summary's order.
    pub fn entries(&self) -> [(&'static str, &Used); 3] {
        [
            ("tokens", &self.tokens),
            ("playbook_runs", &self.playbook_runs),
            ("seats", &self.seats),
        ]
    }

    /// The highest used/limit fraction of any limited dimension; `None`
    /// when every dimension is unlimited.
    pub fn closest(&self) -> Option<f64> {
        self.entries()
            .iter()
            .filter_map(|(_, used)| used.fraction())
            .reduce(f64::max)
    }

    /// Whether any dimension is at or over its limit.
    pub fn any_at_limit(&self) -> bool {
        self.entries().iter().any(|(_, used)| used.at_limit())
    }
}

/// Reads summaries from one store handle, for a page that is not the
/// admin API (which reads through [`crate::App`]).
#[derive(Clone)]
pub struct UsageReader {
    pub store: Arc<dyn QuotaStore>,
    pub catalog: Arc<Catalog>,
    pub clock: Clock,
    pub timeout: Duration,
}

impl UsageReader {
    /// `org`'s summary now, its counters read from the store within the
    /// store's timeout.
    pub async fn summary(&self, org: &OrgId) -> Result<Summary, StoreError> {
        let policy = self.catalog.policy(org);
        let period = policy.period((self.clock)());
        let used = tokio::time::timeout(self.timeout, self.store.usage(org, period))
            .await
            .unwrap_or(Err(StoreError::Timeout))?;
        Ok(Summary::new(org.clone(), &policy, period, &used))
    }

    /// Now, in Unix seconds, on the gateway's clock.
    pub fn now(&self) -> i64 {
        (self.clock)().timestamp()
    }
}
