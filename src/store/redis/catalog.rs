//! The catalog of runtime orgs and keys in Redis. Its keys share one hash
//! tag, `{:catalog}` (no org id holds a `:`, so no org's keys share it by
//! name), so each script touches one slot and runs on a cluster too:
//!
//! - `{prefix}:{:catalog}:orgs`: a hash, org id → the org record's JSON
//!   (the fields of `PUT /v1/orgs/{org}` that were named);
//! - `{prefix}:{:catalog}:keys`: a hash, key id → the key record's JSON
//!   (`id`, `org`, `name`, `sha256` in hex, `createdAt`), never a key;
//! - `{prefix}:{:catalog}:version`: the number of changes, INCRed by each;
//! - the pub/sub channel `{prefix}:{:catalog}:changes`: on each change,
//!   `"{version} org {org}"` or `"{version} key {id}"`, then a newline and
//!   the record's JSON when it was set (nothing after the id: removed).
//!
//! Every change is one script (catalog_write.lua): the write, the INCR and
//! the PUBLISH together.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use redis::Script;
use serde::{Deserialize, Serialize};

use super::super::{CatalogChange, CatalogNotice, KeyRecord, StoreError, StoredCatalog};
use crate::org::{OrgId, OrgRecord};

pub(super) static WRITE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("catalog_write.lua")));

pub(super) static READ: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("catalog_read.lua")));

/// The catalog's key names under one prefix.
#[derive(Clone, Debug)]
pub(super) struct Layout {
    pub orgs: String,
    pub keys: String,
    pub version: String,
    pub channel: String,
}

impl Layout {
    pub fn new(prefix: &str) -> Layout {
        let key = |name: &str| format!("{prefix}:{{:catalog}}:{name}");
        Layout {
            orgs: key("orgs"),
            keys: key("keys"),
            version: key("version"),
            channel: key("changes"),
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyFields {
    id: String,
    org: String,
    name: String,
    sha256: String,
    /// RFC 3339, UTC.
    created_at: String,
}

pub(super) fn key_json(key: &KeyRecord) -> String {
    let fields = KeyFields {
        id: key.id.clone(),
        org: key.org.to_string(),
        name: key.name.clone(),
        sha256: hex::encode(key.sha256),
        created_at: key
            .created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    serde_json::to_string(&fields).unwrap_or_default()
}

fn key_record(json: &str) -> Option<KeyRecord> {
    let fields: KeyFields = serde_json::from_str(json).ok()?;
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(&fields.sha256, &mut sha256).ok()?;
    Some(KeyRecord {
        id: fields.id,
        org: OrgId::parse(&fields.org)?,
        name: fields.name,
        sha256,
        created_at: fields.created_at.parse::<DateTime<Utc>>().ok()?,
    })
}

/// The read script's reply. A record that does not read (written by hand,
/// or by another version of tollgate) is left out, and said so in the log:
/// one bad record must not keep every other from applying.
pub(super) fn catalog(
    (version, orgs, keys): (String, Vec<String>, Vec<String>),
) -> Result<StoredCatalog, StoreError> {
    let version = version
        .parse()
        .map_err(|_| StoreError::Backend(format!("the catalog version is {version:?}")))?;
    let mut catalog = StoredCatalog {
        version,
        ..StoredCatalog::default()
    };
    for pair in orgs.chunks_exact(2) {
        let record = OrgRecord::from_json(pair[1].as_bytes()).ok();
        match (OrgId::parse(&pair[0]), record) {
            (Some(org), Some(record)) => {
                catalog.orgs.insert(org, record);
            }
            _ => {
                tracing::warn!(org = %pair[0], "a runtime org record in the store does not read; left out")
            }
        }
    }
    for pair in keys.chunks_exact(2) {
        match key_record(&pair[1]) {
            Some(key) if key.id == pair[0] => {
                catalog.keys.insert(key.id.clone(), key);
            }
            _ => {
                tracing::warn!(id = %pair[0], "a runtime key record in the store does not read; left out")
            }
        }
    }
    Ok(catalog)
}

/// A notice's payload, read (see the module's layout for its form).
pub(super) fn notice(payload: &str) -> CatalogNotice {
    read_notice(payload).unwrap_or(CatalogNotice::Unreadable)
}

fn read_notice(payload: &str) -> Option<CatalogNotice> {
    let (head, json) = match payload.split_once('\n') {
        Some((head, json)) => (head, Some(json)),
        None => (payload, None),
    };
    let mut words = head.split(' ');
    let version = words.next()?.parse().ok()?;
    let kind = words.next()?;
    let id = words.next()?;
    // A record sent that does not read makes the notice unreadable.
    let change = match kind {
        "org" => {
            let record = match json {
                Some(json) => Some(OrgRecord::from_json(json.as_bytes()).ok()?),
                None => None,
            };
            CatalogChange::Org(OrgId::parse(id)?, record)
        }
        "key" => {
            let record = match json {
                Some(json) => Some(key_record(json)?),
                None => None,
            };
            CatalogChange::Key(id.to_string(), record)
        }
        _ => return None,
    };
    Some(CatalogNotice::Changed { version, change })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Dimension;

    #[test]
    fn a_notice_of_a_set_org_carries_its_record() {
        let notice = notice("7 org org_a\n{\"plan\":\"pro\",\"limits\":{\"tokens\":null}}");
        let CatalogNotice::Changed { version, change } = notice else {
            panic!("unread");
        };
        assert_eq!(version, 7);
        let CatalogChange::Org(org, Some(record)) = change else {
            panic!("{change:?}");
        };
        assert_eq!(org.as_str(), "org_a");
        assert_eq!(record.plan.as_deref(), Some("pro"));
        assert_eq!(record.limits.get(&Dimension::Tokens), Some(&None));
    }

    #[test]
    fn a_notice_of_a_removed_key_has_no_record() {
        assert_eq!(
            notice("9 key 00ff"),
            CatalogNotice::Changed {
                version: 9,
                change: CatalogChange::Key("00ff".into(), None)
            }
        );
    }

    #[test]
    fn a_notice_whose_record_does_not_read_asks_for_a_reload() {
        assert_eq!(notice("3 org org_a\n{not json"), CatalogNotice::Unreadable);
        assert_eq!(notice("x org org_a"), CatalogNotice::Unreadable);
        assert_eq!(notice("3 plan org_a"), CatalogNotice::Unreadable);
    }

    #[test]
    fn a_key_record_reads_back_as_written() {
        let key = KeyRecord {
            id: "ab".repeat(16),
            org: OrgId::parse("org_a").unwrap(),
            name: "ci".into(),
            sha256: [7; 32],
            created_at: "2026-11-05T10:00:00Z".parse().unwrap(),
        };
        assert_eq!(key_record(&key_json(&key)), Some(key));
    }
}
