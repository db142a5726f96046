//! Orgs and what they are billed on: the plan, billing status, period anchor,
//! enforcement mode and limits that apply to one org.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::period::Period;
use crate::quota::{Dimension, Limits, MAX_AMOUNT, Mode, whole};

/// An org id, checked before it reaches a log line or a store key.
///
/// 1 to 64 characters of `[A-Za-z0-9_.-]`: enough for UUIDs and slugs, and
/// nothing that could split or escape a store key (`:`, `{`, `}`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct OrgId(Arc<str>);

impl OrgId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(text: &str) -> Option<OrgId> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
        (!text.is_empty() && text.len() <= Self::MAX_LEN && text.chars().all(valid_char))
            .then(|| OrgId(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// Everything the gateway needs to meter one org.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrgPolicy {
    pub plan: Arc<str>,
    pub billing_status: Arc<str>,
    pub period_anchor_day: u32,
    pub mode: Mode,
    pub limits: Limits,
}

impl OrgPolicy {
    pub fn period(&self, now: DateTime<Utc>) -> Period {
        Period::containing(now, self.period_anchor_day)
    }
}

/// The orgs named in config, by id.
pub(crate) type KnownOrgs = HashMap<OrgId, Arc<OrgPolicy>, foldhash::fast::RandomState>;

/// The orgs named in config, the policy for every other org, and the
/// plans a runtime org may name.
#[derive(Clone, Debug)]
pub struct OrgDirectory {
    /// Hashed with foldhash, not SipHash: every metered request looks its
    /// org up here, and SipHash cost some 450 instructions a lookup
    /// (callgrind). Only the config puts keys in, so a client's org id
    /// can lengthen no probe.
    pub(crate) known: KnownOrgs,
    pub(crate) default: Arc<OrgPolicy>,
    pub(crate) plans: HashMap<Arc<str>, Limits>,
}

impl OrgDirectory {
    pub fn policy(&self, org: &OrgId) -> &Arc<OrgPolicy> {
        self.known.get(org).unwrap_or(&self.default)
    }

    pub fn known(&self) -> impl Iterator<Item = (&OrgId, &Arc<OrgPolicy>)> {
        self.known.iter()
    }

    pub fn is_known(&self, org: &OrgId) -> bool {
        self.known.contains_key(org)
    }

    /// The limits of plan `slug`, if the config has it.
    pub fn plan(&self, slug: &str) -> Option<Limits> {
        self.plans.get(slug).copied()
    }

    /// Whether `record` can apply under this config: every plan it names
    /// exists. (Its own ranges were checked when it was made.)
    /// The slugs of the config's plans, sorted.
    pub fn plan_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.plans.keys().map(|slug| &**slug).collect();
        names.sort_unstable();
        names
    }

    pub fn check(&self, record: &OrgRecord) -> Result<(), InvalidOrg> {
        match &record.plan {
            Some(slug) if !self.plans.contains_key(slug) => {
                Err(InvalidOrg::UnknownPlan(slug.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// `org`'s policy with a runtime `record` over it: each field the
    /// record names replaces the file's (`[orgs.X]`, else `[defaults]`).
    /// A named plan brings its own limits, in place of the file's for the
    /// org; the record's limits then replace those per dimension. A plan
    /// the config no longer has (removed by a reload) is passed over, and
    /// the file's plan stands.
    pub fn resolve(&self, org: &OrgId, record: &OrgRecord) -> OrgPolicy {
        let base = self.policy(org);
        let planned = record
            .plan
            .as_ref()
            .and_then(|slug| Some((slug.clone(), self.plan(slug)?)));
        if let (Some(slug), None) = (&record.plan, &planned) {
            tracing::warn!(org = %org, plan = %slug, "a runtime org names a plan the config does not have; the file's plan applies");
        }
        let (plan, mut limits) = planned.unwrap_or_else(|| (base.plan.clone(), base.limits));
        for (&dimension, &limit) in &record.limits {
            limits.set(dimension, limit);
        }
        OrgPolicy {
            plan,
            billing_status: record
                .billing_status
                .clone()
                .unwrap_or_else(|| base.billing_status.clone()),
            period_anchor_day: record.period_anchor_day.unwrap_or(base.period_anchor_day),
            mode: record.enforcement.unwrap_or(base.mode),
            limits,
        }
    }
}

/// A runtime org, as an operator set it: exactly the fields they named.
/// In `limits`, a dimension not there is not named (the plan's or the
/// file's limit stands), `None` makes it unlimited, `Some(n)` sets `n`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrgRecord {
    pub plan: Option<Arc<str>>,
    pub billing_status: Option<Arc<str>>,
    /// 1 to 31.
    pub period_anchor_day: Option<u32>,
    pub enforcement: Option<Mode>,
    pub limits: BTreeMap<Dimension, Option<i64>>,
}

/// Why an org record cannot be taken: each is the operator's mistake.
#[derive(Debug, thiserror::Error)]
pub enum InvalidOrg {
    #[error("the org body is not valid: {0}")]
    Json(#[source] serde_json::Error),
    #[error("the org body must be a JSON object")]
    NotAnObject,
    #[error("no plan is named {0:?} in the config")]
    UnknownPlan(String),
    #[error("{0} is not a day of the month (1 to 31)")]
    AnchorDay(String),
    #[error("{0:?} is not an enforcement mode: use \"enforce\", \"shadow\" or \"off\"")]
    Mode(String),
    #[error("unknown quota dimension {0:?}: expected tokens, playbook_runs or seats")]
    Dimension(String),
    #[error(
        "the {dimension} limit must be a whole number from 0 to {MAX_AMOUNT}, or null (got {value})"
    )]
    Limit { dimension: Dimension, value: String },
    #[error("a billing status must be 1 to 64 characters")]
    BillingStatus,
}

/// An org record as JSON: the `PUT /v1/orgs/{org}` body, and the form the
/// store keeps it in, so that what is kept is what was named.
#[derive(Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OrgFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plan: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    billing_status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    period_anchor_day: Option<serde_json::Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enforcement: Option<String>,
    /// `Value`, not a number: a float or a string must be refused with
    /// the dimension named, not as a parse error of the whole body.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    limits: BTreeMap<String, serde_json::Value>,
}

impl OrgRecord {
    /// Reads and checks a record from JSON (its own ranges; the plan is
    /// checked against a config by [`OrgDirectory::check`]).
    pub fn from_json(bytes: &[u8]) -> Result<OrgRecord, InvalidOrg> {
        // serde would also read a struct from an array of its fields.
        if !bytes.trim_ascii_start().starts_with(b"{") {
            return Err(InvalidOrg::NotAnObject);
        }
        let fields: OrgFields = serde_json::from_slice(bytes).map_err(InvalidOrg::Json)?;
        let period_anchor_day = match fields.period_anchor_day {
            None => None,
            Some(day) => match whole(&day) {
                Some(day @ 1..=31) => Some(day as u32),
                _ => return Err(InvalidOrg::AnchorDay(day.to_string())),
            },
        };
        let enforcement = match fields.enforcement {
            None => None,
            Some(word) => Some(Mode::parse(&word).ok_or(InvalidOrg::Mode(word))?),
        };
        let billing_status = match fields.billing_status {
            Some(status) if status.is_empty() || status.chars().count() > 64 => {
                return Err(InvalidOrg::BillingStatus);
            }
            status => status.map(Arc::from),
        };
        let mut limits = BTreeMap::new();
        for (name, value) in fields.limits {
            let dimension = Dimension::parse(&name).ok_or(InvalidOrg::Dimension(name))?;
            limits.insert(dimension, limit(dimension, &value)?);
        }
        Ok(OrgRecord {
            plan: fields.plan.map(Arc::from),
            billing_status,
            period_anchor_day,
            enforcement,
            limits,
        })
    }

    pub fn to_json(&self) -> String {
        let fields = OrgFields {
            plan: self.plan.as_deref().map(String::from),
            billing_status: self.billing_status.as_deref().map(String::from),
            period_anchor_day: self.period_anchor_day.map(serde_json::Number::from),
            enforcement: self.enforcement.map(|mode| mode.as_str().to_string()),
            limits: self
                .limits
                .iter()
                .map(|(d, limit)| (d.as_str().to_string(), (*limit).into()))
                .collect(),
        };
        // A map of strings, numbers and nulls always serializes.
        serde_json::to_string(&fields).unwrap_or_default()
    }
}

/// A limit value: `null` (unlimited) or a whole number in range.
fn limit(dimension: Dimension, value: &serde_json::Value) -> Result<Option<i64>, InvalidOrg> {
    if value.is_null() {
        return Ok(None);
    }
    match value.as_number().and_then(whole) {
        Some(n) if n >= 0 => Ok(Some(n)),
        _ => Err(InvalidOrg::Limit {
            dimension,
            value: value.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory() -> OrgDirectory {
        let free = Limits::UNLIMITED
            .with(Dimension::Tokens, 100)
            .with(Dimension::Seats, 3);
        let pro = Limits::UNLIMITED.with(Dimension::Tokens, 5000);
        let default = Arc::new(OrgPolicy {
            plan: "free".into(),
            billing_status: "active".into(),
            period_anchor_day: 1,
            mode: Mode::Enforce,
            limits: free,
        });
        let custom = OrgPolicy {
            plan: "free".into(),
            billing_status: "past_due".into(),
            period_anchor_day: 5,
            mode: Mode::Shadow,
            limits: free.with(Dimension::PlaybookRuns, 2),
        };
        OrgDirectory {
            known: [(org("org_custom"), Arc::new(custom))]
                .into_iter()
                .collect(),
            default,
            plans: HashMap::from([("free".into(), free), ("pro".into(), pro)]),
        }
    }

    fn org(id: &str) -> OrgId {
        OrgId::parse(id).unwrap()
    }

    #[test]
    fn a_record_naming_nothing_leaves_the_file_org_as_it_is() {
        let directory = directory();
        let resolved = directory.resolve(&org("org_custom"), &OrgRecord::default());
        assert_eq!(&resolved, &**directory.policy(&org("org_custom")));
    }

    #[test]
    fn named_fields_replace_the_file_org_and_the_rest_stand() {
        let record =
            OrgRecord::from_json(br#"{"billingStatus":"active","enforcement":"enforce"}"#).unwrap();
        let resolved = directory().resolve(&org("org_custom"), &record);
        assert_eq!(&*resolved.billing_status, "active");
        assert_eq!(resolved.mode, Mode::Enforce);
        assert_eq!(resolved.period_anchor_day, 5);
        assert_eq!(resolved.limits.get(Dimension::PlaybookRuns), Some(2));
    }

    #[test]
    fn a_named_plan_brings_its_limits_and_the_record_limits_override_them() {
        let record =
            OrgRecord::from_json(br#"{"plan":"pro","limits":{"seats":7,"tokens":null}}"#).unwrap();
        let resolved = directory().resolve(&org("org_new"), &record);
        assert_eq!(&*resolved.plan, "pro");
        assert_eq!(resolved.limits.get(Dimension::Tokens), None);
        assert_eq!(resolved.limits.get(Dimension::Seats), Some(7));
        assert_eq!(resolved.limits.get(Dimension::PlaybookRuns), None);
        assert_eq!(&*resolved.billing_status, "active");
    }

    #[test]
    fn a_limit_not_named_differs_from_one_named_unlimited() {
        let named = OrgRecord::from_json(br#"{"limits":{"tokens":null}}"#).unwrap();
        let unnamed = OrgRecord::from_json(br#"{"limits":{}}"#).unwrap();
        let directory = directory();
        let unlimited = directory.resolve(&org("org_x"), &named);
        let kept = directory.resolve(&org("org_x"), &unnamed);
        assert_eq!(unlimited.limits.get(Dimension::Tokens), None);
        assert_eq!(kept.limits.get(Dimension::Tokens), Some(100));
    }

    #[test]
    fn a_record_reads_back_from_its_json_as_it_was() {
        let record = OrgRecord::from_json(
            br#"{"plan":"pro","billingStatus":"trialing","periodAnchorDay":31,"enforcement":"off","limits":{"tokens":null,"seats":0}}"#,
        )
        .unwrap();
        assert_eq!(
            OrgRecord::from_json(record.to_json().as_bytes()).unwrap(),
            record
        );
    }

    #[test]
    fn bodies_out_of_range_are_refused_with_what_is_wrong() {
        let refused = |body: &str| OrgRecord::from_json(body.as_bytes()).unwrap_err();
        assert!(matches!(
            refused(r#"{"periodAnchorDay":0}"#),
            InvalidOrg::AnchorDay(day) if day == "0"
        ));
        assert!(matches!(
            refused(r#"{"periodAnchorDay":32}"#),
            InvalidOrg::AnchorDay(day) if day == "32"
        ));
        assert!(matches!(
            refused(r#"{"periodAnchorDay":5.5}"#),
            InvalidOrg::AnchorDay(day) if day == "5.5"
        ));
        assert!(OrgRecord::from_json(br#"{"periodAnchorDay":5.0}"#).is_ok());
        assert!(matches!(refused("[null]"), InvalidOrg::NotAnObject));
        assert!(matches!(
            refused(r#"{"enforcement":"loud"}"#),
            InvalidOrg::Mode(_)
        ));
        assert!(matches!(
            refused(r#"{"limits":{"bytes":1}}"#),
            InvalidOrg::Dimension(_)
        ));
        for limit in ["-1", "9007199254740992", "1.5", "\"10\""] {
            let body = format!(r#"{{"limits":{{"tokens":{limit}}}}}"#);
            assert!(
                matches!(refused(&body), InvalidOrg::Limit { .. }),
                "{limit}"
            );
        }
        assert!(matches!(
            refused(r#"{"plan":"pro","color":"red"}"#),
            InvalidOrg::Json(_)
        ));
        let largest = format!(r#"{{"limits":{{"tokens":{MAX_AMOUNT}}}}}"#);
        assert!(OrgRecord::from_json(largest.as_bytes()).is_ok());
    }

    #[test]
    fn a_plan_the_config_lacks_is_refused() {
        let record = OrgRecord::from_json(br#"{"plan":"enterprise"}"#).unwrap();
        assert!(matches!(
            directory().check(&record),
            Err(InvalidOrg::UnknownPlan(_))
        ));
        let known = OrgRecord::from_json(br#"{"plan":"pro"}"#).unwrap();
        assert!(directory().check(&known).is_ok());
    }

    #[test]
    fn org_ids_accept_slugs_and_uuids() {
        assert!(OrgId::parse("org_acme").is_some());
        assert!(OrgId::parse("3f1c2a4e-9b7d-4c1e-8f00-1234567890ab").is_some());
        assert!(OrgId::parse("acme.eu-1").is_some());
    }

    #[test]
    fn org_ids_reject_what_could_escape_a_store_key() {
        for bad in [
            "",
            "org:1",
            "{org}",
            "org 1",
            "org/1",
            "ørg",
            &"a".repeat(65),
        ] {
            assert!(OrgId::parse(bad).is_none(), "{bad:?} was accepted");
        }
    }
}
