//! Beside the request path: the runtime orgs and API keys an operator
//! sets through the admin API, kept in the store and cached here.
//!
//! Every instance holds the whole catalog in one immutable [`Snapshot`]
//! behind an `ArcSwap`, with each runtime org's policy already resolved
//! against the config and each runtime key indexed by its digest: a request
//! costs one atomic load and hash lookups, never a store round trip.
//!
//! A change made through this instance's [`Catalog`] applies to its
//! snapshot as soon as the store confirms it. Changes made elsewhere reach
//! it by [`Catalog::keep_fresh`], the watcher task: a store notice of each
//! change, applied alone when it follows the version held (a gap, or a
//! notice that does not read, reads the whole catalog again); and, since a
//! notice can be lost (a subscription that dropped, a node that failed
//! over), a check of the store's version every [`CHECK_EVERY`], so that a
//! change is enforced everywhere within a second either way. While the
//! store is out the last catalog stays in force, and the checks go on.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::org::{InvalidOrg, OrgDirectory, OrgId, OrgPolicy, OrgRecord};
use crate::store::{
    CatalogChange, CatalogNotice, CatalogWrite, KeyRecord, QuotaStore, StoreError, StoredCatalog,
};

/// How often the watcher compares its version with the store's: well
/// inside the second within which every instance must enforce a change.
pub const CHECK_EVERY: Duration = Duration::from_millis(300);

/// The longest key name taken.
pub const MAX_KEY_NAME: usize = 128;

/// Where an org's effective policy comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The file's `[orgs.X]`.
    Config,
    /// A runtime record, over the file's org or `[defaults]`.
    Runtime,
    /// `[defaults]`: the org is named nowhere.
    Defaults,
}

impl Source {
    /// The word the admin API answers with.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Runtime => "runtime",
            Source::Defaults => "defaults",
        }
    }
}

/// An org's policy as it is enforced, and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effective {
    pub org: OrgId,
    pub policy: Arc<OrgPolicy>,
    pub source: Source,
}

/// A key just made: the only time its secret is seen.
#[derive(Clone, Debug)]
pub struct NewKey {
    pub id: String,
    pub key: String,
    pub org: OrgId,
    pub name: String,
}

/// A key as listed: never its secret, nor its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub org: OrgId,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Invalid(#[from] InvalidOrg),
    #[error("a key name must be 1 to {MAX_KEY_NAME} characters")]
    KeyName,
    #[error("the catalog could not be changed in the store: {0}")]
    Store(#[from] StoreError),
    #[error("the system's random number generator failed: {0}")]
    Random(#[source] getrandom::Error),
}

/// The catalog as one instance enforces it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    records: StoredCatalog,
    directory: Arc<OrgDirectory>,
    /// Each runtime org's policy, resolved against `directory`.
    policies: HashMap<OrgId, Arc<OrgPolicy>>,
    /// Each runtime key's org, by the key's sha256.
    by_digest: HashMap<[u8; 32], OrgId>,
}

impl Snapshot {
    fn build(records: StoredCatalog, directory: Arc<OrgDirectory>) -> Snapshot {
        let policies = records
            .orgs
            .iter()
            .map(|(org, record)| (org.clone(), Arc::new(directory.resolve(org, record))))
            .collect();
        let by_digest = records
            .keys
            .values()
            .map(|key| (key.sha256, key.org.clone()))
            .collect();
        Snapshot {
            records,
            directory,
            policies,
            by_digest,
        }
    }

    /// This snapshot with `change` applied, as of `version`; only what the
    /// change touches is resolved again.
    fn changed(&self, version: u64, change: &CatalogChange) -> Snapshot {
        let mut next = self.clone();
        match change {
            CatalogChange::Org(org, Some(record)) => {
                let policy = Arc::new(self.directory.resolve(org, record));
                next.policies.insert(org.clone(), policy);
            }
            CatalogChange::Org(org, None) => {
                next.policies.remove(org);
            }
            CatalogChange::Key(id, key) => {
                if let Some(old) = self.records.keys.get(id) {
                    next.by_digest.remove(&old.sha256);
                }
                if let Some(key) = key {
                    next.by_digest.insert(key.sha256, key.org.clone());
                }
            }
        }
        next.records.apply(change);
        next.records.version = version;
        next
    }

    pub fn version(&self) -> u64 {
        self.records.version
    }

    pub fn policy(&self, org: &OrgId) -> &Arc<OrgPolicy> {
        // With no runtime orgs, as most deployments run, one hash lookup.
        if self.policies.is_empty() {
            return self.directory.policy(org);
        }
        self.policies
            .get(org)
            .unwrap_or_else(|| self.directory.policy(org))
    }

    pub fn effective(&self, org: &OrgId) -> Effective {
        let source = if self.policies.contains_key(org) {
            Source::Runtime
        } else if self.directory.is_known(org) {
            Source::Config
        } else {
            Source::Defaults
        };
        Effective {
            org: org.clone(),
            policy: self.policy(org).clone(),
            source,
        }
    }

    /// The org of the runtime key whose sha256 is `digest`.
    ///
    /// A map lookup is safe here although the digest comes from a secret:
    /// its timing depends on the digest's bytes (their hash, and the
    /// comparison of the entries that share a bucket), never on the key's
    /// own, and learning bytes of a sha256 gives no way back to a key that
    /// hashes to it, nor to any other key in the map.
    pub fn key_org(&self, digest: &[u8; 32]) -> Option<&OrgId> {
        self.by_digest.get(digest)
    }
}

/// The cache every instance enforces runtime orgs and keys from, and the
/// admin API's way to change them. Shared by the App across reloads.
pub struct Catalog {
    store: Arc<dyn QuotaStore>,
    snapshot: ArcSwap<Snapshot>,
    /// Held while a new snapshot is made from the current one, so that two
    /// updates never build on the same one and lose each other's change.
    updating: Mutex<()>,
}

/// What became of a change noted at a version.
#[derive(Debug, PartialEq, Eq)]
enum Noted {
    Applied,
    /// The snapshot has it already.
    Held,
    /// Changes between the one held and this one are missing.
    Gap,
}

impl Catalog {
    /// An empty catalog over `store`, resolving against `directory` (the
    /// config's orgs). It reads the store on [`Catalog::refresh`] or when
    /// [`Catalog::keep_fresh`] starts.
    pub fn new(store: Arc<dyn QuotaStore>, directory: OrgDirectory) -> Catalog {
        let snapshot = Snapshot::build(StoredCatalog::default(), Arc::new(directory));
        Catalog {
            store,
            snapshot: ArcSwap::from_pointee(snapshot),
            updating: Mutex::new(()),
        }
    }

    /// The snapshot in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Resolves every runtime org against a reloaded config's orgs.
    pub fn set_directory(&self, directory: OrgDirectory) {
        let directory = Arc::new(directory);
        self.update(|current| Some(Snapshot::build(current.records.clone(), directory.clone())));
    }

    /// `org`'s policy: the request path's one question of the catalog.
    pub fn policy(&self, org: &OrgId) -> Arc<OrgPolicy> {
        self.snapshot.load().policy(org).clone()
    }

    /// The org of the runtime key whose sha256 is `digest` (see
    /// [`Snapshot::key_org`] on why a lookup by digest is safe).
    pub fn key_org(&self, digest: &[u8; 32]) -> Option<OrgId> {
        self.snapshot.load().key_org(digest).cloned()
    }

    /// `org`'s effective policy and its source (`GET /v1/orgs/{org}`).
    pub fn effective(&self, org: &OrgId) -> Effective {
        self.snapshot.load().effective(org)
    }

    /// Every org of the config and every runtime org, by id (`GET /v1/orgs`).
    pub fn orgs(&self) -> Vec<Effective> {
        let snapshot = self.snapshot.load();
        let ids: BTreeSet<&OrgId> = snapshot
            .directory
            .known()
            .map(|(org, _)| org)
            .chain(snapshot.records.orgs.keys())
            .collect();
        ids.into_iter().map(|org| snapshot.effective(org)).collect()
    }

    /// `org`'s runtime record, as it was set.
    pub fn record(&self, org: &OrgId) -> Option<OrgRecord> {
        self.snapshot.load().records.orgs.get(org).cloned()
    }

    /// Reads a `PUT /v1/orgs/{org}` body and checks it against the config.
    pub fn parse_org(&self, body: &[u8]) -> Result<OrgRecord, InvalidOrg> {
        let record = OrgRecord::from_json(body)?;
        self.snapshot.load().directory.check(&record)?;
        Ok(record)
    }

    /// Makes `record` runtime org `org`'s, replacing any it had; its
    /// effective policy once applied here.
    pub async fn put_org(&self, org: &OrgId, record: OrgRecord) -> Result<Effective, CatalogError> {
        self.snapshot.load().directory.check(&record)?;
        let written = self.store.put_org(org, &record).await?;
        self.after_write(written, CatalogChange::Org(org.clone(), Some(record)))
            .await;
        Ok(self.effective(org))
    }

    /// Removes runtime org `org`, back to the file or `[defaults]`;
    /// whether there was one.
    pub async fn delete_org(&self, org: &OrgId) -> Result<bool, CatalogError> {
        let written = self.store.delete_org(org).await?;
        self.after_write(written, CatalogChange::Org(org.clone(), None))
            .await;
        Ok(written.changed)
    }

    /// A new key for `org`: `tg_` and 32 random bytes in hex, from the
    /// system's generator, under a random id. Only its sha256 is kept.
    pub async fn create_key(&self, org: &OrgId, name: &str) -> Result<NewKey, CatalogError> {
        if name.is_empty() || name.chars().count() > MAX_KEY_NAME {
            return Err(CatalogError::KeyName);
        }
        let key = format!("tg_{}", hex::encode(random::<32>()?));
        let record = KeyRecord {
            id: hex::encode(random::<16>()?),
            org: org.clone(),
            name: name.to_string(),
            sha256: Sha256::digest(key.as_bytes()).into(),
            created_at: Utc::now(),
        };
        let written = self.store.put_key(&record).await?;
        let id = record.id.clone();
        self.after_write(written, CatalogChange::Key(id.clone(), Some(record)))
            .await;
        Ok(NewKey {
            id,
            key,
            org: org.clone(),
            name: name.to_string(),
        })
    }

    /// `org`'s runtime keys, oldest first (`GET /v1/keys?org=`).
    pub fn keys(&self, org: &OrgId) -> Vec<KeyInfo> {
        let snapshot = self.snapshot.load();
        let mut keys: Vec<KeyInfo> = snapshot
            .records
            .keys
            .values()
            .filter(|key| key.org == *org)
            .map(|key| KeyInfo {
                id: key.id.clone(),
                org: key.org.clone(),
                name: key.name.clone(),
                created_at: key.created_at,
            })
            .collect();
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        keys
    }

    /// Revokes key `id`; whether there was one. Refused here from the
    /// moment the store confirms it.
    pub async fn revoke_key(&self, id: &str) -> Result<bool, CatalogError> {
        let is_id = id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !is_id {
            return Ok(false);
        }
        let written = self.store.delete_key(id).await?;
        self.after_write(written, CatalogChange::Key(id.to_string(), None))
            .await;
        Ok(written.changed)
    }

    /// Reads the whole catalog from the store, and takes it if it is newer
    /// than the one held.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let records = self.store.catalog().await?;
        self.install(records, false);
        Ok(())
    }

    /// Keeps the snapshot fresh for as long as it runs: the watcher task,
    /// started beside the outbox's. Never ends; abort it.
    pub async fn keep_fresh(self: Arc<Self>) {
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut notices = None;
        let mut failing = false;
        loop {
            // Decided first, acted on after: acting may replace `notices`,
            // which the waiting borrows.
            let event = tokio::select! {
                notice = next_notice(&mut notices) => Some(notice),
                _ = check.tick() => None,
            };
            match event {
                Some(Some(notice)) => self.take(notice).await,
                // The subscription ended; the next check subscribes again.
                Some(None) => notices = None,
                None => {
                    if notices.is_none() {
                        notices = self.subscribe().await;
                    }
                    let checked = self.check().await;
                    report(&mut failing, checked);
                }
            }
        }
    }

    async fn subscribe(&self) -> Option<mpsc::UnboundedReceiver<CatalogNotice>> {
        self.store.catalog_notices().await.unwrap_or_else(|error| {
            tracing::debug!(%error, "could not subscribe to catalog changes; the version checks go on");
            None
        })
    }

    /// Compares the version held with the store's, and reads the catalog
    /// anew when they differ: a newer one, or an older one after the store
    /// lost its data (it holds what is true).
    async fn check(&self) -> Result<(), StoreError> {
        let version = self.store.catalog_version().await?;
        let held = self.snapshot.load().version();
        if version != held {
            let records = self.store.catalog().await?;
            self.install(records, version < held);
        }
        Ok(())
    }

    async fn take(&self, notice: CatalogNotice) {
        let gap = match notice {
            CatalogNotice::Changed { version, change } => self.note(version, &change) == Noted::Gap,
            CatalogNotice::Unreadable => true,
        };
        if gap && let Err(error) = self.refresh().await {
            tracing::debug!(%error, "could not read the catalog; the version checks go on");
        }
    }

    /// Applies a change this instance made, once the store confirmed it. If
    /// other changes came between, the catalog is read whole; failing that
    /// the change applies at the version held, and the checks read the rest.
    async fn after_write(&self, written: CatalogWrite, change: CatalogChange) {
        if !written.changed || self.note(written.version, &change) != Noted::Gap {
            return;
        }
        if self.refresh().await.is_err() {
            self.update(|current| Some(current.changed(current.version(), &change)));
        }
    }

    fn note(&self, version: u64, change: &CatalogChange) -> Noted {
        let mut noted = Noted::Held;
        self.update(|current| {
            let held = current.version();
            if version <= held {
                return None;
            }
            if version > held + 1 {
                noted = Noted::Gap;
                return None;
            }
            noted = Noted::Applied;
            Some(current.changed(version, change))
        });
        noted
    }

    /// Takes `records` if newer than what is held (or, `older_too`, if
    /// different at all).
    fn install(&self, records: StoredCatalog, older_too: bool) {
        self.update(|current| {
            let held = current.version();
            let take = records.version > held || (older_too && records.version != held);
            take.then(|| Snapshot::build(records.clone(), current.directory.clone()))
        });
    }

    /// Replaces the snapshot with what `next` makes of the current one, if
    /// anything.
    fn update(&self, next: impl FnOnce(&Snapshot) -> Option<Snapshot>) {
        // A panic while building poisons nothing the snapshot depends on.
        let _updating = self.updating.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(snapshot) = next(&self.snapshot.load()) {
            self.snapshot.store(Arc::new(snapshot));
        }
    }
}

/// The next notice, or `None` once the subscription ended; with no
/// subscription, never.
async fn next_notice(
    notices: &mut Option<mpsc::UnboundedReceiver<CatalogNotice>>,
) -> Option<CatalogNotice> {
    match notices {
        Some(notices) => notices.recv().await,
        None => std::future::pending().await,
    }
}

/// Logs a store outage as it begins and as it ends, not at every check.
fn report(failing: &mut bool, checked: Result<(), StoreError>) {
    match (checked, *failing) {
        (Err(error), false) => {
            tracing::warn!(%error, "the catalog cannot be read from the store; the last one stays in force");
            *failing = true;
        }
        (Ok(()), true) => {
            tracing::info!("the catalog is read from the store again");
            *failing = false;
        }
        _ => {}
    }
}

fn random<const N: usize>() -> Result<[u8; N], CatalogError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(CatalogError::Random)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn catalog() -> Catalog {
        let config = crate::Config::parse(
            "[plans.free]\ntokens = 100\n[plans.pro]\ntokens = 5000\n[defaults]\nplan = \"free\"\n[orgs.org_file]\nplan = \"free\"\n",
            "test.toml",
            &|_: &str| None,
        )
        .unwrap();
        Catalog::new(Arc::new(MemoryStore::new()), config.orgs)
    }

    fn org(id: &str) -> OrgId {
        OrgId::parse(id).unwrap()
    }

    #[tokio::test]
    async fn a_runtime_org_applies_at_once_and_its_removal_goes_back_to_the_file() {
        let catalog = catalog();
        let record = catalog.parse_org(br#"{"plan":"pro"}"#).unwrap();
        let effective = catalog.put_org(&org("org_file"), record).await.unwrap();
        assert_eq!(effective.source, Source::Runtime);
        assert_eq!(
            catalog
                .policy(&org("org_file"))
                .limits
                .get(crate::quota::Dimension::Tokens),
            Some(5000)
        );
        assert!(catalog.delete_org(&org("org_file")).await.unwrap());
        assert_eq!(catalog.effective(&org("org_file")).source, Source::Config);
        assert_eq!(
            catalog.effective(&org("org_other")).source,
            Source::Defaults
        );
        assert!(!catalog.delete_org(&org("org_file")).await.unwrap());
    }

    #[tokio::test]
    async fn a_created_key_is_found_by_its_digest_until_it_is_revoked() {
        let catalog = catalog();
        let made = catalog.create_key(&org("org_a"), "ci").await.unwrap();
        assert!(made.key.starts_with("tg_") && made.key.len() == 67);
        let digest: [u8; 32] = Sha256::digest(made.key.as_bytes()).into();
        assert_eq!(catalog.key_org(&digest), Some(org("org_a")));
        let listed = catalog.keys(&org("org_a"));
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, made.id);
        assert!(catalog.revoke_key(&made.id).await.unwrap());
        assert_eq!(catalog.key_org(&digest), None);
        assert!(catalog.keys(&org("org_a")).is_empty());
    }

    #[tokio::test]
    async fn the_org_list_holds_config_and_runtime_orgs_once_each() {
        let catalog = catalog();
        for id in ["org_file", "org_new"] {
            let record = catalog
                .parse_org(br#"{"billingStatus":"trialing"}"#)
                .unwrap();
            catalog.put_org(&org(id), record).await.unwrap();
        }
        let listed: Vec<_> = catalog
            .orgs()
            .into_iter()
            .map(|e| (e.org.to_string(), e.source))
            .collect();
        assert_eq!(
            listed,
            [
                ("org_file".into(), Source::Runtime),
                ("org_new".into(), Source::Runtime)
            ]
        );
    }

    #[test]
    fn a_change_after_a_gap_is_not_applied_on_its_own() {
        let catalog = catalog();
        let change = CatalogChange::Org(org("org_x"), Some(OrgRecord::default()));
        assert_eq!(catalog.note(2, &change), Noted::Gap);
        assert_eq!(catalog.note(1, &change), Noted::Applied);
        assert_eq!(catalog.note(1, &change), Noted::Held);
        assert_eq!(catalog.snapshot().version(), 1);
    }

    #[test]
    fn a_reloaded_config_resolves_the_runtime_orgs_again() {
        let catalog = catalog();
        let record = OrgRecord {
            plan: Some("pro".into()),
            ..OrgRecord::default()
        };
        catalog.note(1, &CatalogChange::Org(org("org_x"), Some(record)));
        let reloaded = crate::Config::parse(
            "[plans.pro]\ntokens = 7\n[defaults]\nplan = \"pro\"\n",
            "test.toml",
            &|_: &str| None,
        )
        .unwrap();
        catalog.set_directory(reloaded.orgs);
        assert_eq!(
            catalog
                .policy(&org("org_x"))
                .limits
                .get(crate::quota::Dimension::Tokens),
            Some(7)
        );
    }
}
