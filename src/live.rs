//! The config the gateway runs on now, and its reload.
//!
//! One immutable [`Config`] snapshot, swapped whole and atomically (the
//! `arc-swap` crate): a request reads the snapshot once, with no lock, and
//! keeps the parts it started with until it ends, so a reload changes what
//! new requests see and never what an in-flight one does. Each worker
//! rebuilds its parts from a new snapshot on its next request (see
//! [`crate::stack::Gateway`]).
//!
//! Some keys are read once, when the listeners, workers and store
//! connections start; a reload that changes one keeps the running value
//! and names the key in its answer, as needing a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use crate::config::{Config, ConfigError};

/// The running config, and the file it is reloaded from.
pub struct Live {
    current: ArcSwap<Config>,
    /// Counts the swaps, so that a worker tells a new snapshot with one
    /// atomic load.
    generation: AtomicU64,
    path: Option<PathBuf>,
}

/// A reload that took effect.
#[derive(Debug, PartialEq, Eq)]
pub struct Reloaded {
    /// Keys the new file changed that only a restart applies; the running
    /// values stay.
    pub restart_required: Vec<&'static str>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the gateway was started without a config file, so there is nothing to reload")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl Live {
    /// `config`, as read from `path` (none: it cannot be reloaded).
    pub fn new(config: Config, path: Option<PathBuf>) -> Live {
        Live {
            current: ArcSwap::from_pointee(config),
            generation: AtomicU64::new(0),
            path,
        }
    }

    /// The snapshot new requests run on.
    pub fn config(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// The snapshot new requests run on, with its generation: read in this
    /// order, so that a reload in between leaves the generation older
    /// than the snapshot (and the next request builds again), never newer.
    pub fn snapshot(&self) -> (u64, Arc<Config>) {
        let generation = self.generation.load(Ordering::Acquire);
        (generation, self.current.load_full())
    }

    /// Whether a snapshot of `generation` is still the current one: one
    /// atomic load, cheap enough for every request.
    pub fn is_current(&self, generation: u64) -> bool {
        self.generation.load(Ordering::Acquire) == generation
    }

    /// Reads the file again and, if it is valid, makes it the config of
    /// new requests. An invalid file changes nothing.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
        let mut next = Config::load(path)?;
        let running = self.current.load_full();
        let restart_required = keep_restart_only(&running, &mut next);
        self.current.store(Arc::new(next));
        self.generation.fetch_add(1, Ordering::Release);
        Ok(Reloaded { restart_required })
    }
}

/// Copies into `next` every restart-only value of `running` that `next`
/// changed, naming each: the listeners, the workers and their connection
/// handling, and the store's address and outbox, are set up once at start.
fn keep_restart_only(running: &Config, next: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($name:literal, $($field:tt)+) => {
            if running.$($field)+ != next.$($field)+ {
                next.$($field)+ = running.$($field)+.clone();
                changed.push($name);
            }
        };
    }
    keep!("server.listen", server.listen);
    keep!("server.workers", server.workers);
    keep!("server.max_connections", server.max_connections);
    keep!("server.header_read_timeout", server.header_read_timeout);
    keep!("server.keepalive_timeout", server.keepalive_timeout);
    keep!("server.shutdown_grace", server.shutdown_grace);
    keep!("store.key_prefix", store.key_prefix);
    keep!("store.settle_retry_for", store.settle_retry_for);
    keep!(
        "store.max_pending_settlements",
        store.max_pending_settlements
    );
    // The certificate and key, and the handshake timeout, apply to the next
    // handshake; only a listener with TLS or without it is set up once.
    if running.server.tls.is_some() != next.server.tls.is_some() {
        next.server.tls = running.server.tls.clone();
        changed.push("server.tls");
    }
    if running.store.backend != next.store.backend {
        next.store.backend = running.store.backend.clone();
        changed.push("store.backend");
    }
    let listen = |config: &Config| config.admin.as_ref().map(|admin| admin.listen);
    if listen(running) != listen(next) {
        match (&running.admin, &mut next.admin) {
            (Some(old), Some(new)) => new.listen = old.listen,
            // Turning the admin listener on or off needs a restart; until
            // then its tokens still change.
            (old, new) => *new = old.clone(),
        }
        changed.push("admin.listen");
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, "t.toml", &|_| None).unwrap()
    }

    #[test]
    fn a_changed_listener_keeps_its_running_address_and_is_named() {
        let running = config("[server]\nlisten = \"127.0.0.1:8080\"\n");
        let mut next = config("[server]\nlisten = \"127.0.0.1:9999\"\nmax_body_bytes = 7\n");
        assert_eq!(keep_restart_only(&running, &mut next), ["server.listen"]);
        assert_eq!(next.server.listen, running.server.listen);
        assert_eq!(next.server.max_body_bytes, 7);
    }

    #[test]
    fn a_new_store_backend_waits_for_a_restart() {
        let running = config("");
        let mut next = config("[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:1\"\n");
        assert_eq!(keep_restart_only(&running, &mut next), ["store.backend"]);
        assert_eq!(next.store.backend, running.store.backend);
    }

    #[test]
    fn an_unchanged_file_needs_no_restart() {
        let text = "[server]\nworkers = 2\n";
        assert!(keep_restart_only(&config(text), &mut config(text)).is_empty());
    }

    #[test]
    fn turning_tls_on_or_off_waits_for_a_restart_and_a_new_certificate_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let tls = crate::config::test_tls_section(dir.path());
        let running = config("");
        let mut next = config(&tls);
        assert_eq!(keep_restart_only(&running, &mut next), ["server.tls"]);
        assert!(next.server.tls.is_none());

        let running = config(&tls);
        let mut next = config("");
        assert_eq!(keep_restart_only(&running, &mut next), ["server.tls"]);
        assert!(next.server.tls.is_some());

        let renewed = crate::config::test_tls_section(dir.path());
        let mut next = config(&renewed);
        assert!(keep_restart_only(&running, &mut next).is_empty());
    }
}
