//! Leader election: of several agents following one repo (the replicas of a Deployment), one
//! leads and applies; the others stand by.
//!
//! The leader holds a `coordination.k8s.io/v1` Lease in the agent's namespace, renewed well
//! before it runs out (through `kube-lease-manager`). A standby answers `/readyz` with 503
//! `standby`, so a Service sends webhooks to the leader only, and refuses what would change
//! anything (a webhook, a reconcile, a run). When the leader stops, it gives the Lease up; when it
//! dies (`kill -9`, a lost node), a standby takes the Lease once it expires and runs a full pass,
//! which converges whatever the old leader left half done.
//!
//! Without `leaderElection` in the config there is no Lease, and the agent always leads.

use std::time::Duration;

use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;

use crate::backend::kube::Access;
use crate::config::LeaderElectionConfig;

/// Whether this agent leads, kept current.
pub struct Leadership {
    /// `None` when there is no election (always the leader), or while this agent is out of it
    /// (its election stopped, and it is joining again): then it does not lead.
    state: Option<watch::Receiver<bool>>,
    task: Option<tokio::task::JoinHandle<kube_lease_manager::Result<LeaseManager>>>,
    /// Whether there is an election at all.
    elected: bool,
    identity: String,
    /// Where the Lease is read to confirm the lead: the client, its namespace and name.
    lease: Option<(kube::Client, String, String)>,
    /// How the election is joined (again, after it stopped), when to try next, and the wait
    /// after a try that fails. The time is kept here, so a try cut short by other work keeps
    /// its place rather than waiting afresh.
    joining: Option<(Joining, tokio::time::Instant, Duration)>,
}

/// What joining the election takes: built once, used again whenever the election stops (an API
/// server out of reach ends it), so an agent cut off is back as a standby once it is reachable.
#[derive(Clone)]
struct Joining {
    client: kube::Client,
    namespace: String,
    lease: String,
    identity: String,
    seconds: u64,
}

/// Longest wait between tries to join the election again.
const REJOIN_MAX: Duration = Duration::from_secs(30);

impl Joining {
    async fn join(
        &self,
    ) -> kube_lease_manager::Result<(
        watch::Receiver<bool>,
        tokio::task::JoinHandle<kube_lease_manager::Result<LeaseManager>>,
    )> {
        let manager = LeaseManagerBuilder::new(self.client.clone(), self.lease.clone())
            .with_namespace(self.namespace.clone())
            .with_identity(self.identity.clone())
            .with_field_manager(format!("berth-{}", self.identity))
            .with_duration(self.seconds)
            // Renewed when a third of the Lease is left: a slow API server is not a lost lead.
            .with_grace((self.seconds / 3).max(1))
            .build()
            .await?;
        Ok(manager.watch().await)
    }
}

/// Why the election could not start.
#[derive(Debug, thiserror::Error)]
#[error("leader election in namespace {namespace} cannot start: {reason}")]
pub struct ElectionError {
    namespace: String,
    reason: String,
}

impl Leadership {
    /// No election: this agent always leads.
    pub fn sole() -> Leadership {
        Leadership {
            state: None,
            task: None,
            elected: false,
            identity: identity(),
            lease: None,
            joining: None,
        }
    }

    /// Joins the election `config` describes, on the cluster `access` names, for agents of
    /// `instance`. A Lease an agent of another instance holds is refused at once: sharing it, this
    /// agent would stand by for ever, applying nothing.
    pub async fn elect(
        config: &LeaderElectionConfig,
        access: &Access,
        instance: &str,
    ) -> Result<Leadership, ElectionError> {
        let namespace = config.namespace.to_string();
        let failed = |reason: String| ElectionError {
            namespace: namespace.clone(),
            reason,
        };
        let (client, _) = crate::backend::kube::client(access)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let identity = format!("{instance}{INSTANCE_END}{}", identity());
        let resource =
            kube::discovery::ApiResource::erase::<k8s_openapi::api::coordination::v1::Lease>(&());
        let api: kube::Api<kube::api::DynamicObject> =
            kube::Api::namespaced_with(client.clone(), &namespace, &resource);
        if let Ok(Some(lease)) = api.get_opt(config.lease.as_str()).await
            && let Some(holder) = lease.data["spec"]["holderIdentity"].as_str()
            && let Some((other, _)) = holder.split_once(INSTANCE_END)
            && other != instance
            && held(&lease.data["spec"])
        {
            return Err(failed(format!(
                "the Lease {} is held by an agent of instance {other:?}, and this agent is of instance {instance:?}: agents sharing a Lease must be of one instance; give this one its own leaderElection.lease",
                config.lease
            )));
        }
        let joining = Joining {
            client: client.clone(),
            namespace: namespace.clone(),
            lease: config.lease.to_string(),
            identity: identity.clone(),
            seconds: config.lease_duration.0.as_secs().max(3),
        };
        let (state, task) = joining.join().await.map_err(|e| failed(e.to_string()))?;
        tracing::info!(%identity, lease = %config.lease, %namespace, "joined the leader election");
        Ok(Leadership {
            state: Some(state),
            task: Some(task),
            elected: true,
            identity,
            lease: Some((client, namespace, config.lease.to_string())),
            joining: Some((joining, tokio::time::Instant::now(), Duration::from_secs(1))),
        })
    }

    /// Whether this agent leads now.
    pub fn leads(&self) -> bool {
        match &self.state {
            Some(state) => *state.borrow(),
            None => !self.elected,
        }
    }

    /// Whether this agent leads, read from the Lease itself: it names this agent and was renewed
    /// within its duration. A leader cut off from the API server cannot renew, and a standby may
    /// take the Lease once it runs out; the election alone would not tell the old leader, so each
    /// pass asks, and a Lease that cannot be read is not a lead.
    pub async fn confirm(&self) -> bool {
        if !self.leads() {
            return false;
        }
        let Some((client, namespace, name)) = &self.lease else {
            return true;
        };
        let resource =
            kube::discovery::ApiResource::erase::<k8s_openapi::api::coordination::v1::Lease>(&());
        let api: kube::Api<kube::api::DynamicObject> =
            kube::Api::namespaced_with(client.clone(), namespace, &resource);
        let lease = match tokio::time::timeout(Duration::from_secs(5), api.get(name)).await {
            Ok(Ok(lease)) => lease,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot read the Lease; standing by for this pass");
                return false;
            }
            Err(_) => {
                tracing::warn!("the Lease did not answer within 5s; standing by for this pass");
                return false;
            }
        };
        let spec = &lease.data["spec"];
        spec["holderIdentity"].as_str() == Some(self.identity.as_str()) && held(spec)
    }

    /// This agent's name in the election: the host (a pod's name) and the process.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Resolves when leadership changes; never without an election. When the election stops
    /// (its task ends: the API server out of reach), this agent stands by and joins it again,
    /// trying every second, then less often, up to every [`REJOIN_MAX`]; it resolves when it
    /// stood by and when it is back in. Cancel-safe: a try cut short is made again.
    pub async fn changed(&mut self) {
        if let Some(state) = self.state.as_mut() {
            if state.changed().await.is_ok() {
                return;
            }
            // Stand by rather than lead blind.
            tracing::warn!(
                "the leader election stopped (is the API server reachable?); standing by, and joining it again"
            );
            self.state = None;
            self.task = None;
            if let Some((_, next, wait)) = self.joining.as_mut() {
                *next = tokio::time::Instant::now() + *wait;
            }
            return;
        }
        let Some((joining, next, wait)) = self.joining.clone() else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(next).await;
        match joining.join().await {
            Ok((state, task)) => {
                tracing::info!(identity = %joining.identity, lease = %joining.lease, namespace = %joining.namespace, "joined the leader election");
                self.state = Some(state);
                self.task = Some(task);
                self.joining = Some((joining, next, Duration::from_secs(1)));
            }
            Err(error) => {
                tracing::warn!(%error, "cannot join the leader election yet");
                let longer = (wait * 2).min(REJOIN_MAX);
                self.joining = Some((joining, tokio::time::Instant::now() + longer, longer));
            }
        }
    }

    /// Gives the Lease up, so a standby takes over at once instead of after the Lease runs out.
    pub async fn resign(mut self) {
        self.state.take();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// Ends the instance at the start of an identity in the election (`INSTANCE/HOST-PID`).
const INSTANCE_END: char = '/';

/// Whether a Lease's spec was renewed within its duration.
fn held(spec: &serde_json::Value) -> bool {
    let renewed = spec["renewTime"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
    let seconds = spec["leaseDurationSeconds"].as_i64().unwrap_or(0);
    renewed.is_some_and(|at| at + chrono::Duration::seconds(seconds) > chrono::Utc::now())
}

fn identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
