//! The JSON the admin API answers with, field for field as DESIGN.md's
//! "Operations" gives it: dashboards and scripts are written against it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::catalog::{Effective, KeyInfo, NewKey};
use crate::org::OrgId;
use crate::period::rfc3339;
use crate::quota::{Dimension, MAX_AMOUNT, whole};
pub use crate::usage::{Summary, Usage};

/// `GET /v1/orgs/{org}`: the policy in effect, and where it comes from.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrgView {
    pub org: OrgId,
    pub plan: Arc<str>,
    pub billing_status: Arc<str>,
    pub period_anchor_day: u32,
    pub enforcement: &'static str,
    pub limits: LimitsView,
    pub source: &'static str,
}

#[derive(Debug, Serialize)]
pub struct LimitsView {
    pub tokens: Option<i64>,
    pub playbook_runs: Option<i64>,
    pub seats: Option<i64>,
}

impl OrgView {
    pub fn new(effective: &Effective) -> OrgView {
        let Effective {
            org,
            policy,
            source,
        } = effective;
        let limits = &policy.limits;
        OrgView {
            org: org.clone(),
            plan: policy.plan.clone(),
            billing_status: policy.billing_status.clone(),
            period_anchor_day: policy.period_anchor_day,
            enforcement: policy.mode.as_str(),
            limits: LimitsView {
                tokens: limits.get(Dimension::Tokens),
                playbook_runs: limits.get(Dimension::PlaybookRuns),
                seats: limits.get(Dimension::Seats),
            },
            source: source.as_str(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct OrgList {
    pub orgs: Vec<OrgView>,
}

/// `GET /v1/usage`: the summary of every org `GET /v1/orgs` lists.
#[derive(Debug, Serialize)]
pub struct UsageList {
    pub orgs: Vec<Summary>,
}

/// `POST /v1/orgs/{org}/usage-link`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LinkRequest {
    pub expires_in: Option<Whole>,
}

/// `POST /v1/orgs/{org}/usage-link`'s answer: the link's path and query.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkView {
    pub org: OrgId,
    pub url: String,
    pub expires_at: String,
}

/// A whole number as JSON Schema counts one: `3` or `3.0`, not `3.5`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Whole(pub i64);

impl<'de> Deserialize<'de> for Whole {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Whole, D::Error> {
        let number = serde_json::Number::deserialize(deserializer)?;
        whole(&number).map(Whole).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{number} is not a whole number from 0 to {MAX_AMOUNT}"
            ))
        })
    }
}

/// `POST /v1/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    pub org: String,
    pub name: String,
}

/// `POST /v1/keys`'s answer: the key, this once.
#[derive(Debug, Serialize)]
pub struct CreatedKey {
    pub id: String,
    pub key: String,
    pub org: OrgId,
    pub name: String,
}

impl From<NewKey> for CreatedKey {
    fn from(NewKey { id, key, org, name }: NewKey) -> CreatedKey {
        CreatedKey { id, key, org, name }
    }
}

/// A key as `GET /v1/keys` lists it: never the key.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyView {
    pub id: String,
    pub org: OrgId,
    pub name: String,
    pub created_at: String,
}

impl From<KeyInfo> for KeyView {
    fn from(key: KeyInfo) -> KeyView {
        KeyView {
            id: key.id,
            org: key.org,
            name: key.name,
            created_at: rfc3339(key.created_at),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
}

/// `PUT /v1/orgs/{org}/usage/{dimension}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetUsage {
    pub used: Whole,
}

/// `POST /v1/check`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    pub org: String,
    #[serde(default)]
    pub cost: std::collections::BTreeMap<String, Whole>,
}

/// `POST /v1/reload`, when it took effect.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadAnswer {
    pub reloaded: bool,
    /// Keys whose change waits for a restart.
    pub restart_required: Vec<&'static str>,
}
