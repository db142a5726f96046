//! The gateway's metrics, in the families of DESIGN.md's "Metrics" table
//! and a few of the gateway's own, all prefixed `tollgate_`.
//!
//! The families are registered once per process, in [`Metrics`], which the
//! app keeps across reloads. The request path never looks a label set up:
//! each build of the per-config parts takes a [`RouteMetrics`] for every
//! configured route (and one, with `route=""`, for requests that matched
//! none), holding the families' counters for that route, so that counting
//! on the path is an atomic add. Route labels are configured route names,
//! hence bounded; an org is never a label.

use std::future::Future;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::quota::Dimension;

/// The `Content-Type` of [`Metrics::encode`]'s text: OpenMetrics 1.0, which
/// Prometheus scrapes as well as its own format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What became of one request, the `outcome` label of
/// `tollgate_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Forwarded,
    /// 402.
    Denied,
    /// Admitted over a limit in shadow mode.
    ShadowExceeded,
    /// The store failed and `on_error = "allow"` forwarded it uncounted.
    FailOpen,
    /// 503: the store failed and the request was refused.
    StoreUnavailable,
    /// 401.
    Unauthorized,
    /// 400, 408, 413: the request could not be taken as sent.
    BadRequest,
    /// 502, 504, or the gateway's own 500: the request could not go on.
    UpstreamError,
    /// 404.
    NotFound,
}

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::Forwarded,
        Outcome::Denied,
        Outcome::ShadowExceeded,
        Outcome::FailOpen,
        Outcome::StoreUnavailable,
        Outcome::Unauthorized,
        Outcome::BadRequest,
        Outcome::UpstreamError,
        Outcome::NotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Denied => "denied",
            Outcome::ShadowExceeded => "shadow_exceeded",
            Outcome::FailOpen => "fail_open",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::Unauthorized => "unauthorized",
            Outcome::BadRequest => "bad_request",
            Outcome::UpstreamError => "upstream_error",
            Outcome::NotFound => "not_found",
        }
    }
}

/// A kind of store call, the `operation` label of the store families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreOp {
    Reserve,
    Settle,
    /// Reading an org's counters (the admin listener's usage reads).
    Usage,
}

impl StoreOp {
    pub const ALL: [StoreOp; 3] = [StoreOp::Reserve, StoreOp::Settle, StoreOp::Usage];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Reserve => "reserve",
            StoreOp::Settle => "settle",
            StoreOp::Usage => "usage",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteOutcome {
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteQuota {
    route: String,
    quota_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

/// Store calls take well under a millisecond on loopback; a second is
/// far past any `store.timeout` worth setting.
const STORE_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// From a loopback upstream's fraction of a millisecond to an LLM's
/// first byte after a minute.
const UPSTREAM_BUCKETS: [f64; 16] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 60.0,
];

fn store_histogram() -> Histogram {
    Histogram::new(STORE_BUCKETS)
}

fn upstream_histogram() -> Histogram {
    Histogram::new(UPSTREAM_BUCKETS)
}

/// Every family of the process, and the log pacing that goes with them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteOutcome, Counter>,
    quota_denials: Family<RouteQuota, Counter>,
    tokens_reserved: Family<RouteLabel, Counter>,
    tokens_reconciled: Family<RouteLabel, Counter>,
    reconciliations: Family<RouteLabel, Counter>,
    refunds: Family<RouteLabel, Counter>,
    upstream_duration: HistogramFamily<UpstreamLabel>,
    /// [`StoreOp::ALL`]'s handles of `store_errors` and `store_duration`.
    store_error_counts: [Counter; 3],
    store_durations: [Histogram; 3],
    config_reloads: Family<ResultLabel, Counter>,
    /// Reservations made and not yet settled.
    pub reservations_open: Gauge<i64, AtomicI64>,
    /// Settlements and deferred charges given up (each logged with its org
    /// and amounts): the outbox was full, the store did not confirm one
    /// within `store.settle_retry_for`, a key of its org was damaged, or the
    /// shutdown's grace period ended.
    pub settlements_failed: Counter,
    /// Settlements the store did not confirm, queued in the outbox.
    pub settlements_queued: Counter,
    /// Settlements and deferred charges applied from the outbox.
    pub settlements_retried: Counter,
    /// Settlements and deferred charges waiting in the outbox now.
    pub settlements_pending: Gauge<i64, AtomicI64>,
    /// Metered requests forwarded because the store failed, with their
    /// cost queued in the outbox to be charged (`on_error = "defer"`).
    pub deferred_charges: Counter,
    /// Connections closed as soon as they were accepted, past
    /// `server.max_connections`.
    pub connections_refused: Counter,
    /// Accepts that failed (out of descriptors, say).
    pub accept_errors: Counter,
    /// Requests whose body the client sent malformed, cut off or not at all.
    pub client_body_faults: Counter,
    /// TLS handshakes that did not finish within `handshake_timeout`.
    pub tls_handshake_timeouts: Counter,
    /// TLS handshakes that failed: a client rustls refused, plain HTTP or
    /// anything else that is not TLS, a client gone mid-handshake.
    pub tls_handshake_errors: Counter,
    /// Paces the log lines about store failures.
    pub store_error_log: BurstLog,
    /// Paces the log lines about clients' bodies.
    pub client_fault_log: BurstLog,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every family, as the process starts.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tollgate");
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests by configured route (\"\" when none matched) and outcome",
            Family::clone(&requests),
        );
        let quota_denials = Family::default();
        registry.register(
            "quota_denials",
            "Metered requests refused with a 402, by route and the quota they went past",
            Family::clone(&quota_denials),
        );
        let store_errors = Family::<OperationLabel, Counter>::default();
        registry.register(
            "store_errors",
            "Store calls that failed or timed out",
            store_errors.clone(),
        );
        let store_duration: HistogramFamily<OperationLabel> =
            Family::new_with_constructor(store_histogram);
        registry.register_with_unit(
            "store_duration",
            "Time a store call took, timeouts included",
            Unit::Seconds,
            store_duration.clone(),
        );
        let upstream_duration: HistogramFamily<UpstreamLabel> =
            Family::new_with_constructor(upstream_histogram);
        registry.register_with_unit(
            "upstream_duration",
            "Time from sending a request upstream to its response headers",
            Unit::Seconds,
            upstream_duration.clone(),
        );
        let route_family = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<RouteLabel, Counter>::default();
            registry.register(name, help, family.clone());
            family
        };
        let tokens_reserved = route_family(
            &mut registry,
            "tokens_reserved",
            "Tokens reserved for metered requests",
        );
        let tokens_reconciled = route_family(
            &mut registry,
            "tokens_reconciled",
            "Tokens the providers reported, replacing estimates",
        );
        let reconciliations = route_family(
            &mut registry,
            "reconciliations",
            "Estimate reservations corrected to the usage the provider reported",
        );
        let refunds = route_family(
            &mut registry,
            "refunds",
            "Reservations given back: the upstream failed, or the store applied one after its request stopped waiting",
        );
        let config_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads, by result",
            config_reloads.clone(),
        );
        let tls_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on the listener that failed, by reason (timeout, error)",
            tls_failures.clone(),
        );
        let metrics = Metrics {
            tls_handshake_timeouts: tls_failures
                .get_or_create_owned(&ReasonLabel { reason: "timeout" }),
            tls_handshake_errors: tls_failures
                .get_or_create_owned(&ReasonLabel { reason: "error" }),
            store_error_counts: StoreOp::ALL.map(|op| {
                store_errors.get_or_create_owned(&OperationLabel {
                    operation: op.as_str(),
                })
            }),
            store_durations: StoreOp::ALL.map(|op| {
                store_duration.get_or_create_owned(&OperationLabel {
                    operation: op.as_str(),
                })
            }),
            registry,
            requests,
            quota_denials,
            tokens_reserved,
            tokens_reconciled,
            reconciliations,
            refunds,
            upstream_duration,
            config_reloads,
            reservations_open: Gauge::default(),
            settlements_failed: Counter::default(),
            settlements_queued: Counter::default(),
            settlements_retried: Counter::default(),
            settlements_pending: Gauge::default(),
            deferred_charges: Counter::default(),
            connections_refused: Counter::default(),
            accept_errors: Counter::default(),
            client_body_faults: Counter::default(),
            store_error_log: BurstLog::default(),
            client_fault_log: BurstLog::default(),
        };
        metrics.register_plain()
    }

    /// Registers the families without labels, and the reload results, so
    /// that each is written from the start, at 0.
    fn register_plain(mut self) -> Metrics {
        for result in ["ok", "error"] {
            self.config_reloads
                .get_or_create_owned(&ResultLabel { result });
        }
        let r = &mut self.registry;
        r.register(
            "reservations_open",
            "Reservations made and not yet settled",
            self.reservations_open.clone(),
        );
        r.register(
            "settlements_failed",
            "Settlements and deferred charges given up after retries",
            self.settlements_failed.clone(),
        );
        r.register(
            "settlements_queued",
            "Settlements the store did not confirm, queued to be retried",
            self.settlements_queued.clone(),
        );
        r.register(
            "settlements_retried",
            "Settlements and deferred charges applied from the outbox",
            self.settlements_retried.clone(),
        );
        r.register(
            "settlements_pending",
            "Settlements and deferred charges waiting in the outbox",
            self.settlements_pending.clone(),
        );
        r.register(
            "deferred_charges",
            "Requests forwarded while the store failed, their cost queued to be charged",
            self.deferred_charges.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed on accept, past server.max_connections",
            self.connections_refused.clone(),
        );
        r.register(
            "accept_errors",
            "Accepts that failed",
            self.accept_errors.clone(),
        );
        r.register(
            "client_body_faults",
            "Request bodies the client sent malformed, cut off or too late",
            self.client_body_faults.clone(),
        );
        self
    }

    /// The counters of the route named `route` (`""`: requests that matched
    /// no route), taken once per build of the per-config parts.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let named = RouteLabel {
            route: route.to_owned(),
        };
        let outcomes = Outcome::ALL.map(|outcome| {
            self.requests.get_or_create_owned(&RouteOutcome {
                route: route.to_owned(),
                outcome: outcome.as_str(),
            })
        });
        let denials = Dimension::ALL.map(|dimension| {
            self.quota_denials.get_or_create_owned(&RouteQuota {
                route: route.to_owned(),
                quota_type: dimension.as_str(),
            })
        });
        RouteMetrics(Arc::new(RouteCounters {
            outcomes,
            denials,
            tokens_reserved: self.tokens_reserved.get_or_create_owned(&named),
            tokens_reconciled: self.tokens_reconciled.get_or_create_owned(&named),
            reconciliations: self.reconciliations.get_or_create_owned(&named),
            refunds: self.refunds.get_or_create_owned(&named),
        }))
    }

    /// The histogram of the upstream named `upstream`, taken once per build.
    pub fn upstream(&self, upstream: &str) -> Histogram {
        self.upstream_duration.get_or_create_owned(&UpstreamLabel {
            upstream: upstream.to_owned(),
        })
    }

    /// Records that one `op` store call took `took`.
    pub fn observe_store(&self, op: StoreOp, took: Duration) {
        self.store_durations[op as usize].observe(took.as_secs_f64());
    }

    /// Runs the store call `call`, recording how long it took as `op`.
    pub async fn timed<T>(&self, op: StoreOp, call: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let answer = call.await;
        self.observe_store(op, started.elapsed());
        answer
    }

    /// Counts a config reload, `ok` or not.
    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.config_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn open_reservations(&self) -> i64 {
        self.reservations_open.get()
    }

    /// The text exposition of every family: OpenMetrics, as
    /// prometheus-client writes it, served with [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String fails only if a value cannot be written; what
        // was written is still worth serving.
        if let Err(error) = text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "could not write every metric");
        }
        text
    }

    /// Counts a failed `op` store call and logs it, at most once per burst.
    pub fn store_failed(&self, op: StoreOp, error: &dyn std::fmt::Display) {
        self.store_error_counts[op as usize].inc();
        if let Some(held_back) = self.store_error_log.admit() {
            tracing::warn!(
                %error,
                held_back,
                "quota store failed ({}); further failures within {:?} are counted, not logged",
                op.as_str(),
                self.store_error_log.window
            );
        }
    }

    /// Counts a request body the client got wrong and logs it, at most once
    /// per burst: a client's fault is not the operator's, and a flood of
    /// them must not flood the log.
    pub fn client_body_failed(&self, fault: impl std::fmt::Display) {
        self.client_body_faults.inc();
        if let Some(held_back) = self.client_fault_log.admit() {
            tracing::info!(
                %fault,
                held_back,
                "a client's request body failed (answered 400 or 408); \
                 further ones within {:?} are counted, not logged",
                self.client_fault_log.window
            );
        }
    }
}

/// One route's counters in the families labelled by route. Cloning shares
/// them; the default is a set counted nowhere, for a route not yet bound to
/// the process's [`Metrics`].
#[derive(Clone, Debug, Default)]
pub struct RouteMetrics(Arc<RouteCounters>);

#[derive(Debug, Default)]
struct RouteCounters {
    /// By [`Outcome::ALL`] order.
    outcomes: [Counter; 9],
    /// By [`Dimension::ALL`] order.
    denials: [Counter; 3],
    tokens_reserved: Counter,
    tokens_reconciled: Counter,
    reconciliations: Counter,
    refunds: Counter,
}

/// A token count as a counter adds it: never below zero.
fn tokens(amount: i64) -> u64 {
    u64::try_from(amount).unwrap_or(0)
}

impl RouteMetrics {
    pub fn counted(&self, outcome: Outcome) {
        self.0.outcomes[outcome as usize].inc();
    }

    pub fn denied(&self, quota_type: Dimension) {
        self.0.denials[quota_type as usize].inc();
    }

    pub fn reserved(&self, amount: i64) {
        if amount > 0 {
            self.0.tokens_reserved.inc_by(tokens(amount));
        }
    }

    /// A provider reported `amount` tokens, which replace the estimate.
    pub fn reconciled(&self, amount: i64) {
        self.0.reconciliations.inc();
        self.0.tokens_reconciled.inc_by(tokens(amount));
    }

    pub fn refunded(&self) {
        self.0.refunds.inc();
    }
}

/// Lets the first of a burst of like events be logged, and counts the rest,
/// so that a store outage under load is a few log lines, not one a request.
#[derive(Debug)]
pub struct BurstLog {
    window: Duration,
    state: Mutex<BurstState>,
}

#[derive(Debug, Default)]
struct BurstState {
    opened: Option<Instant>,
    held_back: u64,
}

impl Default for BurstLog {
    fn default() -> BurstLog {
        BurstLog::new(Duration::from_secs(10))
    }
}

impl BurstLog {
    pub fn new(window: Duration) -> BurstLog {
        BurstLog {
            window,
            state: Mutex::default(),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// `Some(n)` when this event should be logged, `n` being how many were
    /// held back since the last one logged; `None` within a burst.
    pub fn admit(&self) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if state
            .opened
            .is_some_and(|opened| now.duration_since(opened) < self.window)
        {
            state.held_back += 1;
            return None;
        }
        state.opened = Some(now);
        Some(std::mem::take(&mut state.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The samples of `text` whose line starts with `prefix`.
    fn lines<'t>(text: &'t str, prefix: &str) -> Vec<&'t str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn the_label_orders_match_the_handles_they_index() {
        for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome as usize, i);
        }
        for (i, op) in StoreOp::ALL.into_iter().enumerate() {
            assert_eq!(op as usize, i);
        }
        for (i, dimension) in Dimension::ALL.into_iter().enumerate() {
            assert_eq!(dimension as usize, i);
        }
    }

    #[test]
    fn a_route_counts_under_its_name_with_every_outcome_written_from_zero() {
        let metrics = Metrics::new();
        let chat = metrics.route("chat");
        chat.counted(Outcome::Denied);
        chat.counted(Outcome::Denied);
        chat.denied(Dimension::Tokens);
        chat.reserved(120);
        chat.reconciled(80);
        chat.refunded();
        metrics.route("").counted(Outcome::NotFound);
        let text = metrics.encode();
        assert!(text.contains("# TYPE tollgate_requests counter\n"));
        assert_eq!(
            lines(&text, "tollgate_requests_total{route=\"chat\"").len(),
            9
        );
        assert!(text.contains("tollgate_requests_total{route=\"chat\",outcome=\"denied\"} 2\n"));
        assert!(text.contains("tollgate_requests_total{route=\"chat\",outcome=\"forwarded\"} 0\n"));
        assert!(text.contains("tollgate_requests_total{route=\"\",outcome=\"not_found\"} 1\n"));
        assert!(
            text.contains("tollgate_quota_denials_total{route=\"chat\",quota_type=\"tokens\"} 1\n")
        );
        assert!(text.contains("tollgate_tokens_reserved_total{route=\"chat\"} 120\n"));
        assert!(text.contains("tollgate_tokens_reconciled_total{route=\"chat\"} 80\n"));
        assert!(text.contains("tollgate_refunds_total{route=\"chat\"} 1\n"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn two_builds_of_a_route_count_in_the_same_series() {
        let metrics = Metrics::new();
        metrics.route("chat").refunded();
        metrics.route("chat").refunded();
        assert!(
            metrics
                .encode()
                .contains("tollgate_refunds_total{route=\"chat\"} 2\n")
        );
    }

    #[test]
    fn store_calls_are_timed_and_counted_by_operation() {
        let metrics = Metrics::new();
        metrics.observe_store(StoreOp::Reserve, Duration::from_micros(70));
        metrics.store_failed(StoreOp::Settle, &"down");
        let text = metrics.encode();
        assert!(text.contains("# UNIT tollgate_store_duration_seconds seconds\n"));
        assert!(text.contains(
            "tollgate_store_duration_seconds_bucket{le=\"0.0001\",operation=\"reserve\"} 1\n"
        ));
        assert!(text.contains(
            "tollgate_store_duration_seconds_bucket{le=\"0.00005\",operation=\"reserve\"} 0\n"
        ));
        assert!(text.contains("tollgate_store_duration_seconds_count{operation=\"usage\"} 0\n"));
        assert!(text.contains("tollgate_store_errors_total{operation=\"settle\"} 1\n"));
        assert!(text.contains("tollgate_store_errors_total{operation=\"reserve\"} 0\n"));
    }

    #[test]
    fn the_process_families_are_written_with_their_values() {
        let metrics = Metrics::new();
        metrics.reservations_open.inc();
        metrics.settlements_failed.inc();
        metrics.reloaded(true);
        metrics.reloaded(false);
        metrics.reloaded(false);
        metrics.upstream("api").observe(0.003);
        let text = metrics.encode();
        for line in [
            "tollgate_reservations_open 1",
            "tollgate_settlements_failed_total 1",
            "tollgate_config_reloads_total{result=\"ok\"} 1",
            "tollgate_config_reloads_total{result=\"error\"} 2",
            "tollgate_upstream_duration_seconds_count{upstream=\"api\"} 1",
            "tollgate_connections_refused_total 0",
            "tollgate_settlements_pending 0",
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} in\n{text}");
        }
    }

    #[test]
    fn a_burst_logs_once_and_the_next_line_carries_the_count() {
        let log = BurstLog::new(Duration::from_millis(50));
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), None);
        assert_eq!(log.admit(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(log.admit(), Some(2));
    }
}
