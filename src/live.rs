//! What the agent publishes between passes for its readers (the HTTP API, the console, probes):
//! the status as of the last pass, whether it is ready, and why status pushes fail.
//!
//! The agent writes it only at a pass's end; readers take a snapshot and follow a counter.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::status::StatusSet;

/// Whether the agent can do its job, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The repo is not cloned yet.
    Starting,
    /// The last pass did not fail on a transient error.
    Ready,
    /// The last pass failed on a transient error (git server or engine down): why.
    Degraded(String),
    /// Another agent leads (leader election): this one applies nothing until it takes over.
    Standby(String),
}

/// What the agent shares with the server: the status as of the last pass, and readiness.
#[derive(Debug)]
pub struct Shared {
    /// Status as of the last pass.
    pub status: RwLock<Arc<StatusSet>>,
    /// Readiness.
    pub readiness: RwLock<Readiness>,
    /// Why the last attempt to push status failed, while it keeps failing.
    pub status_push: RwLock<Option<String>>,
    /// Counts published statuses: the console's pages follow it.
    pub passes: watch::Sender<u64>,
}

impl Shared {
    /// What the agent shares before its first pass: `status`, starting.
    pub fn new(status: Arc<StatusSet>) -> Shared {
        Shared {
            status: RwLock::new(status),
            readiness: RwLock::new(Readiness::Starting),
            status_push: RwLock::new(None),
            passes: watch::Sender::new(0),
        }
    }

    /// Publishes the status as of a pass, and tells whoever follows.
    pub fn publish(&self, status: Arc<StatusSet>) {
        *self.status.write().expect("lock") = status;
        self.passes.send_modify(|count| *count += 1);
    }
}
