//! How many client connections the gateway holds, and what happens past
//! that: the descriptor limit is raised as far as the system allows, and a
//! connection past `server.max_connections` is closed as soon as it is
//! accepted, so that the gateway never runs out of descriptors for the
//! connections it already serves, their upstreams and its store.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{BurstLog, Metrics};

/// Descriptors kept back from client connections: the listener, the
/// workers' runtimes, store connections, config and log files.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// Raises the soft limit on open descriptors to the hard limit, and logs
/// it. Returns the limit in force, `None` when it cannot be read.
pub fn raise_descriptor_limit() -> Option<u64> {
    let (soft, hard) = match rlimit::Resource::NOFILE.get() {
        Ok(limits) => limits,
        Err(error) => {
            tracing::warn!(%error, "could not read the descriptor limit");
            return None;
        }
    };
    match rlimit::increase_nofile_limit(hard) {
        Ok(raised) => {
            tracing::info!(was = soft, now = raised, hard, "descriptor limit");
            Some(raised)
        }
        Err(error) => {
            tracing::warn!(%error, soft, hard, "could not raise the descriptor limit");
            Some(soft)
        }
    }
}

/// The default `server.max_connections`: half the descriptors left after
/// [`RESERVED_DESCRIPTORS`], since each client connection may hold an
/// upstream connection too.
pub fn default_max_connections(descriptors: u64) -> usize {
    let half = descriptors.saturating_sub(RESERVED_DESCRIPTORS) / 2;
    usize::try_from(half).unwrap_or(usize::MAX).max(1)
}

/// The open-connection budget the accept loop draws on.
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
    metrics: Arc<Metrics>,
    refusals: BurstLog,
}

impl ConnectionLimit {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> ConnectionLimit {
        let max = max.min(Semaphore::MAX_PERMITS);
        ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
            metrics,
            refusals: BurstLog::default(),
        }
    }

    /// A place for one more connection, held until it closes; `None` at the
    /// limit, counted and logged once per burst.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permits.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.metrics.connections_refused.inc();
            if let Some(held_back) = self.refusals.admit() {
                tracing::warn!(
                    max_connections = self.max,
                    held_back,
                    refused = self.metrics.connections_refused.get(),
                    "connection limit reached: new connections are closed at once; \
                     further refusals within {:?} are counted, not logged",
                    self.refusals.window()
                );
            }
        }
        permit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_keeps_descriptors_back_and_leaves_two_per_connection() {
        assert_eq!(default_max_connections(1024), 384);
        assert_eq!(default_max_connections(1_048_576), 524_160);
        assert_eq!(default_max_connections(100), 1);
    }

    #[test]
    fn a_connection_past_the_limit_is_refused_and_counted_until_one_closes() {
        let metrics = Arc::new(Metrics::default());
        let limit = ConnectionLimit::new(2, metrics.clone());
        let first = limit.admit();
        let second = limit.admit();
        assert!(first.is_some() && second.is_some());
        assert!(limit.admit().is_none());
        assert!(limit.admit().is_none());
        assert_eq!(metrics.connections_refused.get(), 2);
        drop(first);
        assert!(limit.admit().is_some());
    }
}
