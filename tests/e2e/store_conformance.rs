//! One conformance suite for the `QuotaStore` trait, run against every
//! backend: the memory store, one real redis-server, and a real three-master
//! Redis Cluster.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tollgate::org::{OrgId, OrgRecord};
use tollgate::period::Period;
use tollgate::quota::{Amounts, Decided, Decision, Dimension, Exceeded, Limits, MAX_AMOUNT, Mode};
use tollgate::store::{
    CatalogChange, CatalogNotice, KeyRecord, MemoryStore, QuotaStore, RedisStore, RedisTarget,
    ReservationId, ReserveRequest, Settlement, StoreError,
};

use crate::support::redis::{
    Cut, CuttingProxy, RedisCluster, RedisServer, counter_key, next_period, this_period,
};

const TOKENS: Dimension = Dimension::Tokens;
const RUNS: Dimension = Dimension::PlaybookRuns;
const SEATS: Dimension = Dimension::Seats;

/// A store under test, and whatever must stay alive for it.
pub struct Backend {
    pub store: Arc<dyn QuotaStore>,
    _servers: Box<dyn std::any::Any>,
}

impl Backend {
    pub async fn memory() -> Backend {
        Backend {
            store: Arc::new(MemoryStore::new()),
            _servers: Box::new(()),
        }
    }

    pub async fn redis() -> Backend {
        let server = RedisServer::start().await;
        let store = single_server_store(&server);
        Backend {
            store: Arc::new(store),
            _servers: Box::new(server),
        }
    }

    pub async fn redis_cluster() -> Backend {
        let cluster = RedisCluster::start().await;
        let store = cluster_store(&cluster);
        Backend {
            store: Arc::new(store),
            _servers: Box::new(cluster),
        }
    }
}

fn org(id: &str) -> OrgId {
    OrgId::parse(id).unwrap()
}

async fn reserve(
    store: &dyn QuotaStore,
    org: &OrgId,
    period: Period,
    limits: Limits,
    cost: Amounts,
    mode: Mode,
) -> (ReservationId, Decision) {
    let (id, decided) = reserve_decided(store, org, period, limits, cost, mode).await;
    (id, decided.decision)
}

/// [`reserve`], with the counters the reservation left.
async fn reserve_decided(
    store: &dyn QuotaStore,
    org: &OrgId,
    period: Period,
    limits: Limits,
    cost: Amounts,
    mode: Mode,
) -> (ReservationId, Decided) {
    let id = ReservationId::next();
    let request = ReserveRequest {
        id,
        org: org.clone(),
        period,
        limits,
        cost,
        mode,
    };
    (id, store.reserve(&request).await.unwrap())
}

/// Reserves `tokens` for `org` in November, with no limit; its id.
async fn reserve_tokens(store: &dyn QuotaStore, org: &OrgId, tokens: i64) -> ReservationId {
    let cost = Amounts::ZERO.with(TOKENS, tokens);
    reserve(
        store,
        org,
        this_period(),
        Limits::UNLIMITED,
        cost,
        Mode::Enforce,
    )
    .await
    .0
}

async fn enforce(
    store: &dyn QuotaStore,
    org: &OrgId,
    period: Period,
    limits: Limits,
    cost: Amounts,
) -> Decision {
    reserve(store, org, period, limits, cost, Mode::Enforce)
        .await
        .1
}

async fn all_or_nothing_over_two_dimensions(store: &dyn QuotaStore) {
    let org = org("org_two_dims");
    let limits = Limits::UNLIMITED.with(TOKENS, 100).with(RUNS, 10);
    enforce(
        store,
        &org,
        this_period(),
        limits,
        Amounts::ZERO.with(TOKENS, 95),
    )
    .await;

    let decision = enforce(
        store,
        &org,
        this_period(),
        limits,
        Amounts::ZERO.with(TOKENS, 10).with(RUNS, 1),
    )
    .await;

    assert_eq!(
        decision,
        Decision::Deny(Exceeded {
            dimension: TOKENS,
            current: 95,
            limit: 100,
            requested: 10
        })
    );
    assert_eq!(
        store.usage(&org, this_period()).await.unwrap(),
        Amounts::ZERO.with(TOKENS, 95),
        "runs moved though tokens were short"
    );
    let fits = enforce(
        store,
        &org,
        this_period(),
        limits,
        Amounts::ZERO.with(TOKENS, 5).with(RUNS, 1),
    )
    .await;
    assert!(matches!(fits, Decision::Admit { over: None, .. }));
    assert_eq!(
        store.usage(&org, this_period()).await.unwrap(),
        Amounts::ZERO.with(TOKENS, 100).with(RUNS, 1)
    );
}

async fn exact_admission_under_five_hundred_concurrent_reserves(store: Arc<dyn QuotaStore>) {
    let org = org("org_concurrent");
    let limits = Limits::UNLIMITED.with(RUNS, 137);
    let tasks = (0..500).map(|_| {
        let (store, org) = (store.clone(), org.clone());
        tokio::spawn(async move {
            enforce(
                &*store,
                &org,
                this_period(),
                limits,
                Amounts::ZERO.with(RUNS, 1),
            )
            .await
        })
    });

    let decisions: Vec<Decision> = join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    let admitted = decisions
        .iter()
        .filter(|d| matches!(d, Decision::Admit { .. }))
        .count();
    assert_eq!(admitted, 137);
    assert_eq!(
        store.usage(&org, this_period()).await.unwrap().get(RUNS),
        137
    );
}

async fn a_settlement_applies_once(store: &dyn QuotaStore) {
    let org = org("org_settle");
    let id = reserve_tokens(store, &org, 100).await;
    let settlement = Settlement::new(
        id,
        org.clone(),
        this_period(),
        Amounts::ZERO.with(TOKENS, -40),
    );

    store.settle(&settlement).await.unwrap();
    store.settle(&settlement).await.unwrap();

    assert_eq!(
        store.usage(&org, this_period()).await.unwrap().get(TOKENS),
        60
    );
    let other = reserve_tokens(store, &org, 10).await;
    let correction = Amounts::ZERO.with(TOKENS, 5);
    store
        .settle(&Settlement::new(
            other,
            org.clone(),
            this_period(),
            correction,
        ))
        .await
        .unwrap();
    assert_eq!(
        store.usage(&org, this_period()).await.unwrap().get(TOKENS),
        75,
        "another reservation's settlement was ignored"
    );
}

async fn a_new_period_starts_from_zero_but_seats_carry_over(store: &dyn QuotaStore) {
    let org = org("org_rollover");
    let limits = Limits::UNLIMITED.with(RUNS, 2).with(SEATS, 5);
    for _ in 0..2 {
        enforce(
            store,
            &org,
            this_period(),
            limits,
            Amounts::ZERO.with(RUNS, 1).with(SEATS, 1),
        )
        .await;
    }
    assert!(matches!(
        enforce(
            store,
            &org,
            this_period(),
            limits,
            Amounts::ZERO.with(RUNS, 1)
        )
        .await,
        Decision::Deny(_)
    ));

    let december_run = enforce(
        store,
        &org,
        next_period(),
        limits,
        Amounts::ZERO.with(RUNS, 1),
    )
    .await;

    assert!(matches!(december_run, Decision::Admit { over: None, .. }));
    assert_eq!(
        store.usage(&org, next_period()).await.unwrap(),
        Amounts::ZERO.with(RUNS, 1).with(SEATS, 2)
    );
    assert_eq!(
        store.usage(&org, this_period()).await.unwrap(),
        Amounts::ZERO.with(RUNS, 2).with(SEATS, 2)
    );
}

async fn seats_are_a_gauge_that_never_goes_below_zero(store: &dyn QuotaStore) {
    let org = org("org_seats");
    let limits = Limits::UNLIMITED.with(SEATS, 3);
    let take = Amounts::ZERO.with(SEATS, 1);
    let release = Amounts::ZERO.with(SEATS, -1);
    for _ in 0..3 {
        assert!(matches!(
            enforce(store, &org, this_period(), limits, take).await,
            Decision::Admit { .. }
        ));
    }
    assert_eq!(
        enforce(store, &org, this_period(), limits, take).await,
        Decision::Deny(Exceeded {
            dimension: SEATS,
            current: 3,
            limit: 3,
            requested: 1
        })
    );
    for _ in 0..3 {
        assert_eq!(
            enforce(store, &org, this_period(), limits, release).await,
            Decision::Admit {
                applied: release,
                over: None
            }
        );
    }

    let clamped = enforce(store, &org, this_period(), limits, release).await;

    assert_eq!(
        clamped,
        Decision::Admit {
            applied: Amounts::ZERO,
            over: None
        }
    );
    assert_eq!(
        store.usage(&org, this_period()).await.unwrap().get(SEATS),
        0
    );
}

async fn shadow_mode_applies_past_the_limit_and_says_so(store: &dyn QuotaStore) {
    let org = org("org_shadow");
    let limits = Limits::UNLIMITED.with(RUNS, 1);
    let one = Amounts::ZERO.with(RUNS, 1);
    reserve(store, &org, this_period(), limits, one, Mode::Shadow).await;

    let (_, decision) = reserve(store, &org, this_period(), limits, one, Mode::Shadow).await;

    let over = Exceeded {
        dimension: RUNS,
        current: 1,
        limit: 1,
        requested: 1,
    };
    assert_eq!(
        decision,
        Decision::Admit {
            applied: one,
            over: Some(over)
        }
    );
    assert_eq!(store.usage(&org, this_period()).await.unwrap().get(RUNS), 2);
}

async fn usage_can_be_set_and_is_then_enforced(store: &dyn QuotaStore) {
    let org = org("org_set");
    store
        .set_usage(&org, this_period(), TOKENS, 95_000)
        .await
        .unwrap();
    store
        .set_usage(&org, this_period(), SEATS, 2)
        .await
        .unwrap();

    let decision = enforce(
        store,
        &org,
        this_period(),
        Limits::UNLIMITED.with(TOKENS, 100_000),
        Amounts::ZERO.with(TOKENS, 10_000),
    )
    .await;

    assert_eq!(
        decision,
        Decision::Deny(Exceeded {
            dimension: TOKENS,
            current: 95_000,
            limit: 100_000,
            requested: 10_000
        })
    );
    assert_eq!(
        store.usage(&org, this_period()).await.unwrap(),
        Amounts::ZERO.with(TOKENS, 95_000).with(SEATS, 2)
    );
}

fn record(json: &str) -> OrgRecord {
    OrgRecord::from_json(json.as_bytes()).unwrap()
}

fn key_record(id: &str, org_id: &str) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        org: org(org_id),
        name: "ci".into(),
        sha256: [id.len() as u8; 32],
        created_at: "2026-11-05T10:00:00.250Z".parse().unwrap(),
    }
}

async fn the_catalog_keeps_what_was_set_and_counts_each_change(store: &dyn QuotaStore) {
    let acme = record(r#"{"plan":"pro","periodAnchorDay":5,"limits":{"tokens":null,"seats":4}}"#);
    let first = store.put_org(&org("org_acme"), &acme).await.unwrap();
    assert!(first.changed);
    let key = key_record(&"a1".repeat(16), "org_acme");
    let second = store.put_key(&key).await.unwrap();
    assert_eq!(second.version, first.version + 1);

    let catalog = store.catalog().await.unwrap();
    assert_eq!(catalog.version, second.version);
    assert_eq!(store.catalog_version().await.unwrap(), second.version);
    assert_eq!(catalog.orgs.get(&org("org_acme")), Some(&acme));
    assert_eq!(catalog.keys.get(&key.id), Some(&key));

    // Removing what is not there changes nothing, not even the version.
    let missing = store.delete_key(&"ff".repeat(16)).await.unwrap();
    assert_eq!((missing.changed, missing.version), (false, second.version));

    assert!(store.delete_key(&key.id).await.unwrap().changed);
    assert!(store.delete_org(&org("org_acme")).await.unwrap().changed);
    let emptied = store.catalog().await.unwrap();
    assert!(emptied.orgs.is_empty() && emptied.keys.is_empty());
    assert_eq!(emptied.version, second.version + 2);
}

async fn a_change_is_noticed_with_its_version_and_record(store: &dyn QuotaStore, shared: bool) {
    let Some(mut notices) = store.catalog_notices().await.unwrap() else {
        assert!(!shared, "a shared store must give notice of changes");
        return;
    };
    let acme = record(r#"{"billingStatus":"past_due"}"#);
    let written = store.put_org(&org("org_acme"), &acme).await.unwrap();
    let notice = crate::support::within(Duration::from_secs(5), notices.recv()).await;
    assert_eq!(
        notice,
        Some(CatalogNotice::Changed {
            version: written.version,
            change: CatalogChange::Org(org("org_acme"), Some(acme)),
        })
    );
    let revoked = store.delete_org(&org("org_acme")).await.unwrap();
    let notice = crate::support::within(Duration::from_secs(5), notices.recv()).await;
    assert_eq!(
        notice,
        Some(CatalogNotice::Changed {
            version: revoked.version,
            change: CatalogChange::Org(org("org_acme"), None),
        })
    );
}

async fn a_reservation_reports_the_counters_it_leaves(store: &dyn QuotaStore) {
    let org = &org("org_counters");
    let limits = Limits::UNLIMITED.with(TOKENS, 100).with(RUNS, 2);
    let both = Amounts::ZERO.with(TOKENS, 30).with(RUNS, 1);
    let counters = |mode, cost| async move {
        reserve_decided(store, org, this_period(), limits, cost, mode)
            .await
            .1
    };
    store.set_usage(org, this_period(), SEATS, 4).await.unwrap();

    let first = counters(Mode::Enforce, both).await;
    let second = counters(Mode::Enforce, both).await;
    let denied = counters(Mode::Enforce, both).await;
    let shadow = counters(Mode::Shadow, both).await;
    let seat = counters(Mode::Enforce, Amounts::ZERO.with(SEATS, 1)).await;

    // After applying when admitted; only the cost's dimensions.
    assert_eq!(first.counters, both);
    assert_eq!(
        second.counters,
        Amounts::ZERO.with(TOKENS, 60).with(RUNS, 2)
    );
    // As found when denied.
    assert!(matches!(denied.decision, Decision::Deny(_)));
    assert_eq!(denied.counters, second.counters);
    // Shadow mode applies past the limit, and says where that left them.
    assert!(matches!(
        shadow.decision,
        Decision::Admit { over: Some(_), .. }
    ));
    assert_eq!(
        shadow.counters,
        Amounts::ZERO.with(TOKENS, 90).with(RUNS, 3)
    );
    // A gauge reports its value, whatever the period.
    assert_eq!(seat.counters, Amounts::ZERO.with(SEATS, 5));
    assert_eq!(
        store.usage(org, this_period()).await.unwrap(),
        Amounts::ZERO.with(TOKENS, 90).with(RUNS, 3).with(SEATS, 5)
    );
}

async fn a_release_reports_the_gauge_it_leaves(store: &dyn QuotaStore) {
    let org = org("org_released");
    let limits = Limits::UNLIMITED.with(SEATS, 3);
    let release = Amounts::ZERO.with(SEATS, -1);
    store
        .set_usage(&org, this_period(), SEATS, 1)
        .await
        .unwrap();
    let mut left = Vec::new();
    for _ in 0..2 {
        let (_, decided) =
            reserve_decided(store, &org, this_period(), limits, release, Mode::Enforce).await;
        left.push(decided.counters.get(SEATS));
    }
    assert_eq!(left, [0, 0]);
}

macro_rules! conformance {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn admits_all_or_nothing_over_two_dimensions() {
                all_or_nothing_over_two_dimensions(&*Backend::$backend().await.store).await;
            }

            #[tokio::test]
            async fn admits_exactly_the_limit_under_five_hundred_concurrent_reserves() {
                exact_admission_under_five_hundred_concurrent_reserves(
                    Backend::$backend().await.store.clone(),
                )
                .await;
            }

            #[tokio::test]
            async fn applies_a_settlement_only_once() {
                a_settlement_applies_once(&*Backend::$backend().await.store).await;
            }

            #[tokio::test]
            async fn starts_a_new_period_from_zero_but_carries_seats_over() {
                a_new_period_starts_from_zero_but_seats_carry_over(
                    &*Backend::$backend().await.store,
                )
                .await;
            }

            #[tokio::test]
            async fn keeps_seats_as_a_gauge_that_never_goes_below_zero() {
                seats_are_a_gauge_that_never_goes_below_zero(&*Backend::$backend().await.store)
                    .await;
            }

            #[tokio::test]
            async fn applies_past_the_limit_in_shadow_mode_and_says_so() {
                shadow_mode_applies_past_the_limit_and_says_so(&*Backend::$backend().await.store)
                    .await;
            }

            #[tokio::test]
            async fn reports_the_counters_a_reservation_leaves() {
                a_reservation_reports_the_counters_it_leaves(&*Backend::$backend().await.store)
                    .await;
            }

            #[tokio::test]
            async fn reports_a_released_gauge_at_zero_at_the_least() {
                a_release_reports_the_gauge_it_leaves(&*Backend::$backend().await.store).await;
            }

            #[tokio::test]
            async fn enforces_usage_set_by_an_operator() {
                usage_can_be_set_and_is_then_enforced(&*Backend::$backend().await.store).await;
            }

            #[tokio::test]
            async fn keeps_runtime_orgs_and_keys_and_counts_each_change() {
                the_catalog_keeps_what_was_set_and_counts_each_change(
                    &*Backend::$backend().await.store,
                )
                .await;
            }

            #[tokio::test]
            async fn gives_notice_of_each_catalog_change_when_shared() {
                let shared = stringify!($backend) != "memory";
                a_change_is_noticed_with_its_version_and_record(
                    &*Backend::$backend().await.store,
                    shared,
                )
                .await;
            }
        }
    };
}

conformance!(memory);
conformance!(redis);
conformance!(redis_cluster);

/// A store on `target` with the `tollgate` prefix and a 2 s timeout.
fn store_on(target: RedisTarget) -> RedisStore {
    RedisStore::new(
        &target,
        "tollgate",
        Duration::from_secs(2),
        Duration::from_secs(600),
    )
    .unwrap()
}

fn single_server_store(server: &RedisServer) -> RedisStore {
    store_on(RedisTarget::Single(server.url()))
}

fn cluster_store(cluster: &RedisCluster) -> RedisStore {
    store_on(RedisTarget::Cluster(cluster.urls()))
}

/// How many scripts `server` has run.
fn script_calls(server: &RedisServer) -> u64 {
    let stats: String = server.command(&["INFO", "commandstats"]);
    stats
        .lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| {
            line.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test]
async fn redis_keys_carry_the_org_as_hash_tag_and_period_keys_expire_after_the_period() {
    let server = RedisServer::start().await;
    let store = single_server_store(&server);
    let org = org("org_42");
    let cost = Amounts::ZERO.with(TOKENS, 7).with(SEATS, 1);
    enforce(&store, &org, this_period(), Limits::UNLIMITED, cost).await;

    assert_eq!(
        server.command::<i64>(&["GET", &counter_key("org_42", "tokens")]),
        7
    );
    assert_eq!(
        server.command::<i64>(&["GET", "tollgate:{org_42}:seats"]),
        1
    );
    let expires_at: i64 = server.command(&["EXPIRETIME", &counter_key("org_42", "tokens")]);
    assert_eq!(
        expires_at,
        (this_period().end + tollgate::store::PERIOD_KEY_GRACE).timestamp()
    );
    assert_eq!(
        server.command::<i64>(&["TTL", "tollgate:{org_42}:seats"]),
        -1,
        "the seat gauge must not expire"
    );
}

#[tokio::test]
async fn reservations_and_settlements_arriving_together_share_script_calls_and_stay_exact() {
    let server = RedisServer::start().await;
    let store: Arc<dyn QuotaStore> = Arc::new(single_server_store(&server));
    let org = org("org_batched");
    let limits = Limits::UNLIMITED.with(TOKENS, 1000);
    let reserved = join_all((0..200).map(|_| {
        reserve_decided(
            &*store,
            &org,
            this_period(),
            limits,
            Amounts::ZERO.with(TOKENS, 10),
            Mode::Enforce,
        )
    }))
    .await;

    let admitted: Vec<ReservationId> = reserved
        .iter()
        .filter(|(_, d)| matches!(d.decision, Decision::Admit { .. }))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(admitted.len(), 100);
    for (_, decided) in &reserved {
        if let Decision::Deny(denied) = decided.decision {
            assert_eq!(
                (denied.current, denied.limit, denied.requested),
                (1000, 1000, 10)
            );
            assert_eq!(decided.counters.get(TOKENS), 1000);
        }
    }
    // Each admission in a shared call sees the counter as it left it.
    let mut after: Vec<i64> = reserved
        .iter()
        .filter(|(_, d)| matches!(d.decision, Decision::Admit { .. }))
        .map(|(_, d)| d.counters.get(TOKENS))
        .collect();
    after.sort_unstable();
    assert_eq!(after, (1..=100).map(|n| n * 10).collect::<Vec<_>>());
    assert_eq!(
        store.usage(&org, this_period()).await.unwrap().get(TOKENS),
        1000
    );
    let reserve_calls = script_calls(&server);
    assert!(
        (1..=20).contains(&reserve_calls),
        "200 reservations took {reserve_calls} script calls"
    );

    // Each admitted reservation is reconciled one token up, the first twice
    // over in the same burst: it still counts once.
    let mut settlements: Vec<Settlement> = admitted
        .iter()
        .map(|&id| {
            Settlement::new(
                id,
                org.clone(),
                this_period(),
                Amounts::ZERO.with(TOKENS, 1),
            )
        })
        .collect();
    settlements.push(settlements[0].clone());
    let settled = join_all(settlements.into_iter().map(|s| {
        let store = store.clone();
        async move { store.settle(&s).await }
    }))
    .await;

    assert!(settled.iter().all(Result::is_ok));
    assert_eq!(
        store.usage(&org, this_period()).await.unwrap().get(TOKENS),
        1100
    );
    let settle_calls = script_calls(&server) - reserve_calls;
    assert!(
        (1..=20).contains(&settle_calls),
        "101 settlements took {settle_calls} script calls"
    );
}

#[tokio::test]
async fn a_settlement_redis_refuses_for_memory_is_applied_once_by_its_retry() {
    let server = RedisServer::start().await;
    let store = single_server_store(&server);
    let org = org("org_full");
    let id = reserve_tokens(&store, &org, 100).await;
    let settlement = Settlement::new(
        id,
        org.clone(),
        this_period(),
        Amounts::ZERO.with(TOKENS, 1),
    );

    // Out of memory, Redis refuses the script's first write, after its reads.
    let _: () = server.command(&["CONFIG", "SET", "maxmemory", "1"]);
    assert!(store.settle(&settlement).await.is_err());
    let _: () = server.command(&["CONFIG", "SET", "maxmemory", "0"]);
    let settled_before: Vec<String> = server.command(&["KEYS", "tollgate:{org_full}:settled:*"]);
    store.settle(&settlement).await.unwrap();
    store.settle(&settlement).await.unwrap();

    assert!(settled_before.is_empty(), "{settled_before:?}");
    assert_eq!(
        store.usage(&org, this_period()).await.unwrap().get(TOKENS),
        101
    );
}

#[tokio::test]
async fn a_key_tollgate_did_not_write_fails_only_the_calls_of_its_own_org() {
    let server = RedisServer::start().await;
    let store = single_server_store(&server);
    let (good, marked, hashed) = (org("org_good"), org("org_marked"), org("org_hashed"));
    // Texts that are no counter tollgate wrote, though Lua's `tonumber`
    // takes all but the first for numbers (the last two are one past
    // `MAX_AMOUNT`, which a double no longer tells from its neighbours).
    let texts = [
        "lots",
        "nan",
        "inf",
        "1.5",
        "1e3",
        "0x10",
        " 7",
        "9007199254740992",
        "-9007199254740992",
    ];
    let texted: Vec<OrgId> = (0..texts.len())
        .map(|i| org(&format!("org_texted_{i}")))
        .collect();
    for (org, text) in texted.iter().zip(texts) {
        let _: () = server.command(&["SET", &counter_key(org.as_str(), "tokens"), text]);
    }
    let _: () = server.command(&["HSET", &counter_key("org_hashed", "tokens"), "a", "1"]);
    // Settlements made at 1790000000 keep their markers in this hash.
    let _: () = server.command(&["SET", "tollgate:{org_marked}:settled:1790000000", "x"]);
    let good_id = reserve_tokens(&store, &good, 100).await;
    let marked_id = reserve_tokens(&store, &marked, 100).await;
    let damaged: Vec<&OrgId> = texted.iter().chain([&hashed]).collect();
    let orgs: Vec<&OrgId> = [&good, &marked]
        .into_iter()
        .chain(damaged.iter().copied())
        .collect();
    let reservations: Vec<ReserveRequest> = orgs
        .iter()
        .map(|org| ReserveRequest {
            id: ReservationId::next(),
            org: (*org).clone(),
            period: this_period(),
            limits: Limits::UNLIMITED,
            cost: Amounts::ZERO.with(TOKENS, 10),
            mode: Mode::Enforce,
        })
        .collect();
    let settlements: Vec<Settlement> = orgs
        .iter()
        .enumerate()
        .map(|(i, org)| {
            let id = [good_id, marked_id]
                .get(i)
                .copied()
                .unwrap_or_else(ReservationId::next);
            let mut settlement = Settlement::new(
                id,
                (*org).clone(),
                this_period(),
                Amounts::ZERO.with(TOKENS, 1),
            );
            settlement.made_at = 1_790_000_000;
            settlement
        })
        .collect();

    // Loads the settle script, whose first use takes more than one call.
    let warm_up = Settlement::new(
        ReservationId::next(),
        org("org_warm"),
        this_period(),
        Amounts::ZERO,
    );
    store.settle(&warm_up).await.unwrap();
    let calls_before = script_calls(&server);
    let reserved = join_all(reservations.iter().map(|r| store.reserve(r))).await;
    let reserve_calls = script_calls(&server) - calls_before;
    let settled = join_all(settlements.iter().map(|s| store.settle(s))).await;
    let settle_calls = script_calls(&server) - calls_before - reserve_calls;

    assert_eq!(
        (reserve_calls, settle_calls),
        (1, 1),
        "each burst is one script call"
    );
    for admitted in &reserved[..2] {
        assert!(
            matches!(
                admitted,
                Ok(Decided {
                    decision: Decision::Admit { .. },
                    ..
                })
            ),
            "{admitted:?}"
        );
    }
    assert!(settled[0].is_ok());
    assert!(matches!(&settled[1], Err(StoreError::DamagedKey(o)) if *o == marked));
    for (i, org) in damaged.iter().enumerate() {
        assert!(
            matches!(&reserved[2 + i], Err(StoreError::DamagedKey(o)) if o == *org),
            "{org}: {:?}",
            reserved[2 + i]
        );
        assert!(
            matches!(&settled[2 + i], Err(StoreError::DamagedKey(o)) if o == *org),
            "{org}: {:?}",
            settled[2 + i]
        );
        let markers: Vec<String> =
            server.command(&["KEYS", &format!("tollgate:{{{org}}}:settled:*")]);
        assert!(markers.is_empty(), "{org}: {markers:?}");
    }
    assert_eq!(
        store.usage(&good, this_period()).await.unwrap().get(TOKENS),
        111
    );
    assert_eq!(
        store
            .usage(&marked, this_period())
            .await
            .unwrap()
            .get(TOKENS),
        110
    );
    for (org, text) in texted.iter().zip(texts) {
        let stored: String = server.command(&["GET", &counter_key(org.as_str(), "tokens")]);
        assert_eq!(stored, text, "{org}");
    }
    let kind: String = server.command(&["TYPE", &counter_key("org_hashed", "tokens")]);
    assert_eq!(kind, "hash");
    let marker: String = server.command(&["GET", "tollgate:{org_marked}:settled:1790000000"]);
    assert_eq!(marker, "x");
}

#[tokio::test]
async fn a_counter_at_the_most_it_holds_admits_without_growing() {
    let server = RedisServer::start().await;
    let store = single_server_store(&server);
    let org = org("org_brim");
    let most = MAX_AMOUNT.to_string();
    let _: () = server.command(&["SET", &counter_key("org_brim", "tokens"), &most]);

    let decision = enforce(
        &store,
        &org,
        this_period(),
        Limits::UNLIMITED,
        Amounts::ZERO.with(TOKENS, 10),
    )
    .await;

    assert_eq!(
        decision,
        Decision::Admit {
            applied: Amounts::ZERO,
            over: None
        }
    );
    let stored: String = server.command(&["GET", &counter_key("org_brim", "tokens")]);
    assert_eq!(stored, most);
}

#[tokio::test]
async fn a_settlement_made_by_a_clock_far_behind_redis_still_applies_once() {
    let server = RedisServer::start().await;
    let store = single_server_store(&server);
    let org = org("org_skewed");
    let id = reserve_tokens(&store, &org, 100).await;
    // Made, by the gateway's clock, a day before Redis' now.
    let mut settlement = Settlement::new(
        id,
        org.clone(),
        this_period(),
        Amounts::ZERO.with(TOKENS, -40),
    );
    settlement.made_at -= 24 * 60 * 60;

    store.settle(&settlement).await.unwrap();
    store.settle(&settlement).await.unwrap();

    assert_eq!(
        store.usage(&org, this_period()).await.unwrap().get(TOKENS),
        60
    );
    let hashes: Vec<String> = server.command(&["KEYS", "tollgate:{org_skewed}:settled:*"]);
    assert_eq!(hashes.len(), 1, "{hashes:?}");
    // settle_retry_for (ten minutes) and a margin of ten more.
    let ttl: i64 = server.command(&["TTL", &hashes[0]]);
    assert!((1190..=1200).contains(&ttl), "the marker is kept {ttl} s");
}

/// A store on one server reached through a [`CuttingProxy`], holding five
/// tokens of `org` (so its connection is up and its scripts loaded).
async fn store_behind_a_proxy(server: &RedisServer, org: &OrgId) -> (RedisStore, CuttingProxy) {
    let proxy = CuttingProxy::start(server).await;
    let store = store_on(RedisTarget::Single(proxy.url()));
    reserve_tokens(&store, org, 5).await;
    (store, proxy)
}

async fn tokens_of(store: &dyn QuotaStore, org: &OrgId) -> i64 {
    store.usage(org, this_period()).await.unwrap().get(TOKENS)
}

#[tokio::test]
async fn a_reservation_whose_reply_is_lost_is_asked_about_and_its_decision_learned() {
    let server = RedisServer::start().await;
    let org = org("org_lost_reply");
    let (store, proxy) = store_behind_a_proxy(&server, &org).await;

    proxy.cut_next(Cut::Reply);
    let limits = Limits::UNLIMITED.with(TOKENS, 100);
    let (_, decided) = reserve_decided(
        &store,
        &org,
        this_period(),
        limits,
        Amounts::ZERO.with(TOKENS, 7),
        Mode::Enforce,
    )
    .await;

    assert!(proxy.cut_made());
    assert_eq!(
        decided,
        Decided {
            decision: Decision::Admit {
                applied: Amounts::ZERO.with(TOKENS, 7),
                over: None
            },
            // The recorded reply carries the counters too.
            counters: Amounts::ZERO.with(TOKENS, 12),
        }
    );
    assert_eq!(tokens_of(&store, &org).await, 12);
}

#[tokio::test]
async fn a_reservation_cut_off_before_redis_read_it_is_known_never_to_apply() {
    let server = RedisServer::start().await;
    let org = org("org_lost_request");
    let (store, proxy) = store_behind_a_proxy(&server, &org).await;

    proxy.cut_next(Cut::Request);
    let request = ReserveRequest {
        id: ReservationId::next(),
        org: org.clone(),
        period: this_period(),
        limits: Limits::UNLIMITED,
        cost: Amounts::ZERO.with(TOKENS, 7),
        mode: Mode::Enforce,
    };
    let lost = store.reserve(&request).await;

    assert!(proxy.cut_made());
    assert!(lost.is_err(), "{lost:?}");
    assert_eq!(tokens_of(&store, &org).await, 5);
    // The connection's record took the call's number, so the call would
    // run nothing should it still reach Redis.
    let records: Vec<String> = server.command(&["KEYS", "tollgate:calls:*"]);
    assert_eq!(records.len(), 1, "{records:?}");
    let record: String = server.command(&["GET", &records[0]]);
    assert_eq!(record, "2 V");
    reserve_tokens(&store, &org, 1).await;
    assert_eq!(tokens_of(&store, &org).await, 6);
}

#[tokio::test]
async fn a_reservation_the_cluster_client_resends_is_applied_once() {
    let cluster = RedisCluster::start().await;
    let store = cluster_store(&cluster);
    let org = org("org_resent");
    let request = ReserveRequest {
        id: ReservationId::next(),
        org: org.clone(),
        period: this_period(),
        limits: Limits::UNLIMITED.with(RUNS, 1),
        cost: Amounts::ZERO.with(RUNS, 1),
        mode: Mode::Enforce,
    };

    let first = store.reserve(&request).await.unwrap();
    let resent = store.reserve(&request).await.unwrap();

    assert_eq!(
        first,
        Decided {
            decision: Decision::Admit {
                applied: Amounts::ZERO.with(RUNS, 1),
                over: None
            },
            counters: Amounts::ZERO.with(RUNS, 1),
        }
    );
    assert_eq!(
        resent, first,
        "a resent call must get the first reply, counters and all, not a denial"
    );
    assert_eq!(store.usage(&org, this_period()).await.unwrap().get(RUNS), 1);
}

#[tokio::test]
async fn a_reply_marker_tollgate_did_not_write_fails_only_its_own_reservation() {
    let cluster = RedisCluster::start().await;
    let store = cluster_store(&cluster);
    let org = org("org_remarked");
    let request = |id| ReserveRequest {
        id,
        org: org.clone(),
        period: this_period(),
        limits: Limits::UNLIMITED,
        cost: Amounts::ZERO.with(RUNS, 1),
        mode: Mode::Enforce,
    };
    let (garbled, other_type, good) = (
        ReservationId::next(),
        ReservationId::next(),
        ReservationId::next(),
    );
    let marker = |id: ReservationId| format!("tollgate:{{org_remarked}}:reserved:{}", id.hex());
    let _: () = cluster.command(&["SET", &marker(garbled), "[1, 0"]);
    let _: () = cluster.command(&["HSET", &marker(other_type), "a", "1"]);

    let refused = [
        store.reserve(&request(garbled)).await,
        store.reserve(&request(other_type)).await,
    ];
    let admitted = store.reserve(&request(good)).await;

    for outcome in &refused {
        assert!(
            matches!(outcome, Err(StoreError::DamagedKey(o)) if *o == org),
            "{outcome:?}"
        );
    }
    assert!(
        matches!(
            admitted,
            Ok(Decided {
                decision: Decision::Admit { .. },
                ..
            })
        ),
        "{admitted:?}"
    );
    assert_eq!(store.usage(&org, this_period()).await.unwrap().get(RUNS), 1);
    assert_eq!(
        cluster.command::<String>(&["GET", &marker(garbled)]),
        "[1, 0"
    );
}
