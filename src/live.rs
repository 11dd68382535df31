//! What the agent publishes between passes for its readers (the HTTP API, the console, probes):
//! the status as of the last pass, whether it is ready, and why status pushes fail.
//!
//! The agent writes it only at a pass's end; readers take a snapshot and follow a counter, and a
//! snapshot says which count it is of.

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

    /// Publishes the status as of a pass, and tells whoever follows. The count moves under the
    /// status's lock, so [`Shared::published`] never pairs a status with another pass's count.
    pub fn publish(&self, status: Arc<StatusSet>) {
        let mut published = self.status.write().expect("lock");
        *published = status;
        self.passes.send_modify(|count| *count += 1);
    }

    /// The status as of the last pass, with that pass's count.
    pub fn published(&self) -> Published {
        let status = self.status.read().expect("lock");
        Published {
            status: Arc::clone(&status),
            pass: *self.passes.borrow(),
        }
    }

    /// How many statuses were published so far.
    pub fn pass(&self) -> u64 {
        *self.passes.borrow()
    }
}

/// A status as published, with the count of the pass that published it: a page shows the count
/// of what it shows, and a page that missed a pass learns so from it.
#[derive(Debug, Clone)]
pub struct Published {
    /// The status.
    pub status: Arc<StatusSet>,
    /// The count of the pass that published it.
    pub pass: u64,
}
