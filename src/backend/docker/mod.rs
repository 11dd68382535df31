//! The Docker backend: Challenges as containers on a Docker Engine, through its API (bollard).
//!
//! Its rooms, one concern each:
//! - [`template`]: a Challenge as container templates (pure);
//! - [`network`]: the walls, the networks every container berth makes is put on;
//! - [`lock`]: the instance's apply lock and secret-digest key, both kept in the engine itself so
//!   that berths on other hosts driving the same engine see them;
//! - [`observe`]: what this instance runs (one list call, by label) and why a container is unwell;
//! - [`solve`]: solvers, run beside a challenge now and then, whose last result is its health;
//! - [`converge`]: making one challenge match its template (replace, roll back, delete);
//! - [`images`]: images named, pulled and built;
//! - [`run`]: pipeline runs and the images they produce;
//! - [`meter`]: what a run wrote to disk, against its workspace limit.
//!
//! This file holds the connection and how engine errors are classed. The backend never touches a
//! container, network or image without the `berth.instance` label of its own instance, and every
//! name it makes is derived from the instance, the object, the slot and the template's hash, so a
//! pass killed at any point and run again converges without duplicates.

mod converge;
mod images;
pub mod instances;
mod lock;
mod meter;
pub mod network;
mod observe;
pub mod run;
mod solve;
mod template;

use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::query_parameters::RemoveContainerOptions;

use super::{EngineError, Ownership};
use crate::apply::Outcome;
use crate::descriptor::Kind;

pub use lock::{ApplyLock, secret_digest};
pub use observe::health_of;
pub use template::{ChallengeTemplate, desired_object};

/// The kinds this backend serves.
pub const KINDS: &[Kind] = &[Kind::Challenge, Kind::Pipeline];

/// Label naming the container's slot (`main-1`, `sidecar-db`).
pub const LABEL_SLOT: &str = "berth.slot";
/// Label with the container's template as JSON (secrets only as references).
pub const LABEL_SPEC: &str = "berth.spec";
/// Label with keyed digests of the container's secret values, by name (see [`secret_digest`]).
pub const LABEL_SECRETS: &str = "berth.secret-digests";
/// What went wrong with one engine call: the engine gone (transient), or this object (failed).
enum Trouble {
    Transient(String),
    Failed(String),
}

impl From<Trouble> for Outcome {
    fn from(trouble: Trouble) -> Outcome {
        match trouble {
            Trouble::Transient(why) => Outcome::Transient(why),
            Trouble::Failed(why) => Outcome::Failed(why),
        }
    }
}

type Attempt<T> = Result<T, Trouble>;

/// Whether the error means the engine did not answer, rather than answered "no".
fn engine_gone(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::IOError { .. }
            | DockerError::HyperResponseError { .. }
            | DockerError::HyperLegacyError { .. }
            | DockerError::HttpClientError { .. }
            | DockerError::RequestTimeoutError
            | DockerError::SocketNotFoundError(_)
    )
}

/// The engine's own words for an error, without bollard's wrapping.
fn engine_message(error: &DockerError) -> String {
    match error {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        DockerError::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

fn is_status(error: &DockerError, code: u16) -> bool {
    matches!(error, DockerError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

/// Where berth looks for the engine: `DOCKER_HOST`, or the local socket.
fn engine_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
}

fn unreachable(reason: String) -> EngineError {
    EngineError::Unreachable {
        engine: "the Docker Engine",
        host: engine_host(),
        reason,
        hint: "Set DOCKER_HOST to point berth at it.",
    }
}

async fn remove_container(docker: &Docker, name: &str) -> Result<(), DockerError> {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    match docker.remove_container(name, Some(options)).await {
        Err(error) if is_status(&error, 404) => Ok(()),
        other => other,
    }
}

/// A connection to one Docker Engine, acting for one berth instance.
#[derive(Clone)]
pub struct DockerBackend {
    docker: Docker,
    ownership: Ownership,
    /// Where the subnets of berth's networks come from (`BERTH_SUBNET_POOL`).
    subnet_pool: network::SubnetPool,
    /// Held while this process makes a network, so the steps of a pass make each one once.
    making_networks: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The most a pipeline run may write to disk, in bytes (`pipelines.workspaceLimit`).
    workspace_limit: u64,
    /// Where the engine keeps its volumes, when this process sees them (the engine's host): a
    /// pooled instance's flag is then written there as it is claimed. Read once.
    local_volumes: std::sync::Arc<tokio::sync::OnceCell<Option<std::path::PathBuf>>>,
    /// What each challenge container's solver last found.
    solves: solve::Solves,
    /// Whether diagnoses start the solvers that are due.
    solving: bool,
}

impl DockerBackend {
    /// Connects through `DOCKER_HOST` or the local socket and agrees on an API version.
    pub async fn connect(ownership: &Ownership) -> Result<DockerBackend, EngineError> {
        let docker = Docker::connect_with_defaults().map_err(|e| unreachable(e.to_string()))?;
        // The engine may be older than bollard's default API version: agree on one both speak.
        let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| unreachable("no answer within 10s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(DockerBackend {
            docker,
            ownership: ownership.clone(),
            subnet_pool: network::SubnetPool::from_env()
                .map_err(|e| EngineError::Misconfigured(e.to_string()))?,
            making_networks: Default::default(),
            local_volumes: Default::default(),
            solves: Default::default(),
            solving: false,
            workspace_limit: crate::config::DEFAULT_WORKSPACE_LIMIT,
        })
    }

    /// Bounds what a pipeline run may write to disk (its workspace and its container's own
    /// layer) to `limit`.
    pub fn set_workspace_limit(&mut self, limit: crate::descriptor::values::Size) {
        self.workspace_limit = limit.bytes;
    }

    /// Lets diagnoses start the solvers that are due.
    pub fn run_solvers(&mut self) {
        self.solving = true;
    }

    fn instance(&self) -> &str {
        self.ownership.instance()
    }

    fn trouble(&self, what: &str, error: DockerError) -> Trouble {
        if engine_gone(&error) {
            Trouble::Transient(unreachable(format!("{what}: {error}")).to_string())
        } else {
            Trouble::Failed(format!("{what}: {}", engine_message(&error)))
        }
    }
}
