//! Counters the gateway keeps about itself.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

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
    /// Reservations refunded because the upstream failed.
    pub refunds: AtomicU64,
}

impl Metrics {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn open_reservations(&self) -> i64 {
        self.reservations_open.load(Ordering::Relaxed)
    }
}
