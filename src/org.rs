//! Orgs and what they are billed on: the plan, billing status, period anchor,
//! enforcement mode and limits that apply to one org.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::period::Period;
use crate::quota::{Limits, Mode};

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

/// The orgs named in config, and the policy for every other org.
#[derive(Clone, Debug)]
pub struct OrgDirectory {
    pub(crate) known: HashMap<OrgId, Arc<OrgPolicy>>,
    pub(crate) default: Arc<OrgPolicy>,
}

impl OrgDirectory {
    pub fn policy(&self, org: &OrgId) -> &Arc<OrgPolicy> {
        self.known.get(org).unwrap_or(&self.default)
    }

    pub fn known(&self) -> impl Iterator<Item = (&OrgId, &Arc<OrgPolicy>)> {
        self.known.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
