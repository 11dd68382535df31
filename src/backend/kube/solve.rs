//! Solvers on Kubernetes: a challenge's `healthcheck.solve`, run now and then as a pod of its own
//! in the challenge namespace (not a Job: berth waits for the one run and reads its exit code and
//! output itself, as on Docker). `expectFlag` needs the cluster to serve pod logs; where it does
//! not, a run that exited 0 is not taken for solved, and a failed run's last lines come from the
//! kubelet's termination message. The pod reaches the challenge through its Service, on the
//! Service's cluster address and the challenge's first port, as players' traffic does inside the
//! cluster. Its last result is the health of the challenge's Deployment: a jail that broke shows
//! as Degraded where a readiness probe passes.
//!
//! A per-team instance is solved the same way, through its own Service, its runs started by the
//! instance manager ([`crate::instances`]).
//!
//! A solver's pod carries `berth.kind: ChallengeSolver` and `berth.solves: NAME` (an
//! instance's: `inst-NAME-ID`), never the challenge's `berth.name`, so it is never taken for one
//! of the challenge's pods, nor selected by its Service. It is deleted when its run ends; one left
//! by a berth that was killed is deleted before the next run (an instance's, with the instance),
//! and its `activeDeadlineSeconds` ends it meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use serde_json::json;

use super::KubeBackend;
use super::challenge::ChallengeTemplate;
use crate::backend::solving::{
    OUTPUT_LIMIT, PULL_WAIT, SolveFlags, SolveState, Unsolved, bounded, flag_values, verdict,
};
use crate::backend::{LABEL_INSTANCE, LABEL_KIND, masked};
use crate::descriptor::ObjectRef;
use crate::descriptor::model::SolveCheck;
use crate::plan::{ObservedObject, PartState};

/// The kind label of a solver's pod.
const SOLVER_KIND: &str = "ChallengeSolver";
/// Label on a solver's pod naming the challenge it solves.
const LABEL_SOLVES: &str = "berth.solves";
/// How often a run's pod is looked at while it runs.
const POLL: Duration = Duration::from_millis(500);

/// What the solvers last found, by challenge and the Deployment's version, and the pods of the
/// runs this process has going. Cloning shares them.
#[derive(Debug, Clone, Default)]
pub(super) struct Solves {
    found: Arc<Mutex<HashMap<(ObjectRef, String), SolveState>>>,
    pods: Arc<Mutex<HashSet<String>>>,
}

/// One run to make.
struct SolveRun {
    key: ObjectRef,
    /// What its pod's `berth.solves` names, and a berth that starts a run again deletes the
    /// pods of: the challenge's name, or an instance's objects' name.
    solves: String,
    version: String,
    /// The name of the run's pod, chosen when the run is: a run cut short still knows it.
    pod: String,
    check: SolveCheck,
    host: String,
    port: u16,
    /// The challenge's secret values: masked in what the solver says, and (with `expectFlag`)
    /// what it must print one of.
    flags: Vec<String>,
    /// Other secrets, masked in what it says but never taken for its flag.
    hidden: Vec<String>,
}

impl KubeBackend {
    /// Gives the Deployment of each running challenge of `challenges` that has a solve check the
    /// health its solver last found, and starts the runs that are due (in the background: no
    /// pass waits for one).
    pub(crate) fn judge_by_solvers(
        &self,
        observed: &mut [ObservedObject],
        challenges: &[(&ObjectRef, &ChallengeTemplate)],
    ) {
        let mut due = Vec::new();
        let mut seen = HashSet::new();
        {
            let mut solves = self.solves.found.lock().expect("solves");
            for (key, template) in challenges {
                let Some(check) = template
                    .spec()
                    .healthcheck
                    .as_ref()
                    .and_then(|h| h.solve.clone())
                else {
                    continue;
                };
                let Some(object) = observed.iter_mut().find(|o| &o.key == *key) else {
                    continue;
                };
                let deployment = format!("Deployment/{}", key.name);
                let Some(part) = object
                    .parts
                    .iter_mut()
                    .find(|p| p.id == deployment && p.state == PartState::Running)
                else {
                    continue;
                };
                let version = ((*key).clone(), part.hash.clone());
                seen.insert(version.clone());
                let state = solves.entry(version.clone()).or_default();
                if let Some((health, why)) = state.judged(&check, part.health, self.solving) {
                    part.health = health;
                    part.detail = Some(why);
                }
                if !state.due(&check) || !self.solving {
                    continue;
                }
                let Some(host) = self.cluster_address(key.name.as_str()) else {
                    continue;
                };
                let port = template
                    .spec()
                    .all_ports()
                    .first()
                    .map_or(0, |at| at.port.container.0);
                state.running = true;
                let flags = flag_values(template.secrets().into_values());
                due.push(SolveRun {
                    key: (*key).clone(),
                    solves: key.name.to_string(),
                    version: version.1,
                    pod: format!("{}-solver-{}", key.name, super::random_suffix()),
                    check,
                    host,
                    port,
                    flags,
                    hidden: Vec::new(),
                });
            }
            // Versions gone (rolled, removed) are forgotten, but for runs still going on.
            solves.retain(|version, state| state.running || seen.contains(version));
        }
        for run in due {
            let backend = self.clone();
            tokio::spawn(async move {
                let found = backend.run_bounded(&run).await;
                let mut solves = backend.solves.found.lock().expect("solves");
                solves
                    .entry((run.key.clone(), run.version.clone()))
                    .or_default()
                    .ended(found);
            });
        }
    }

    /// One run of `check` against instance `id` of the challenge `key`, through the instance's
    /// own Service on the challenge's first `port`, bounded as a challenge's run is: whether it
    /// solved it (printing one of `flags` when the check expects a flag), or `None` when that
    /// could not be told (the API server gone, the Service not there yet).
    pub(crate) async fn solve_instance(
        &self,
        key: &ObjectRef,
        id: &str,
        (check, port): (&SolveCheck, u16),
        flags: SolveFlags,
    ) -> Option<Result<(), Unsolved>> {
        let (solves, host) = self.instance_address(key.name.as_str(), id).await?;
        self.run_bounded(&SolveRun {
            key: key.clone(),
            pod: format!("{solves}-solver-{}", super::random_suffix()),
            solves,
            version: String::new(),
            check: check.clone(),
            host,
            port,
            flags: flags.expected,
            hidden: flags.hidden,
        })
        .await
    }

    /// One run, bounded by its check's timeout and an image pull; a run stuck past it has its
    /// pod deleted.
    async fn run_bounded(&self, run: &SolveRun) -> Option<Result<(), Unsolved>> {
        bounded(&run.check, self.run_solver(run), || {
            self.delete_solver_pod(&run.pod)
        })
        .await
    }

    /// The cluster address of the challenge `name`'s Service, as the last observation saw it.
    fn cluster_address(&self, name: &str) -> Option<String> {
        let live = self.live.lock().expect("live objects");
        let service = live.get(&format!("{}/Service/{name}", self.challenge_namespace))?;
        let address = service.pointer("/spec/clusterIP")?.as_str()?;
        (!address.is_empty() && address != "None").then(|| address.to_string())
    }

    /// One run: whether the solver solved the challenge, or `None` when that could not be told
    /// (the API server gone).
    async fn run_solver(&self, run: &SolveRun) -> Option<Result<(), Unsolved>> {
        self.remove_solvers(&run.solves).await;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.challenge_namespace);
        let name = &run.pod;
        let pod = solver_pod(name, self.ownership.instance(), run);
        let pod: Pod = serde_json::from_value(pod).expect("a pod serializes");
        if let Err(error) = pods.create(&PostParams::default(), &pod).await {
            return match error {
                kube::Error::Api(refusal) if refusal.code < 500 => {
                    Some(Err(Unsolved::NotStarted(refusal.message)))
                }
                _ => None,
            };
        }
        self.solves
            .pods
            .lock()
            .expect("solver pods")
            .insert(name.clone());
        let found = self.watch_solver(&pods, name, run).await;
        self.delete_solver_pod(name).await;
        found
    }

    /// Waits for the run in pod `name` to end, and judges it.
    async fn watch_solver(
        &self,
        pods: &Api<Pod>,
        name: &str,
        run: &SolveRun,
    ) -> Option<Result<(), Unsolved>> {
        let started = Instant::now();
        let (code, last_words) = loop {
            tokio::time::sleep(POLL).await;
            let Ok(pod) = pods.get(name).await else {
                return None;
            };
            let status = pod.status.unwrap_or_default();
            let terminated = status
                .container_statuses
                .unwrap_or_default()
                .into_iter()
                .find_map(|s| s.state?.terminated);
            if let Some(terminated) = terminated {
                break (i64::from(terminated.exit_code), terminated.message);
            }
            if status.phase.as_deref() == Some("Failed") {
                return Some(Err(Unsolved::TimedOut {
                    timeout: run.check.timeout.to_string(),
                    reason: Some(status.reason.unwrap_or_default()),
                }));
            }
            if started.elapsed() > run.check.timeout.0 + PULL_WAIT {
                return Some(Err(Unsolved::TimedOut {
                    timeout: run.check.timeout.to_string(),
                    reason: None,
                }));
            }
        };
        let params = LogParams {
            limit_bytes: Some(OUTPUT_LIMIT as i64),
            ..Default::default()
        };
        let output = match pods.logs(name, &params).await {
            Ok(output) => output,
            // A cluster that serves no pod logs (its kubelets unreachable from the API server)
            // cannot tell whether the flag was printed: that is never taken for solved.
            Err(error) if code == 0 && run.check.expect_flag => {
                let why = match error {
                    kube::Error::Api(refusal) => refusal.message,
                    other => other.to_string(),
                };
                return Some(Err(Unsolved::OutputUnread(why)));
            }
            // Else what the kubelet kept of a failed run's last lines will do.
            Err(_) => last_words.unwrap_or_default(),
        };
        let output = masked(&output, &run.hidden);
        Some(verdict(code, &output, &run.check, &run.flags))
    }

    /// Deletes the pods of the runs this process has going (an apply that started them is
    /// ending).
    pub(super) async fn stop_own_solvers(&self) {
        let own: Vec<String> = self
            .solves
            .pods
            .lock()
            .expect("solver pods")
            .iter()
            .cloned()
            .collect();
        for pod in own {
            self.delete_solver_pod(&pod).await;
        }
    }

    /// Deletes the run's pod `name`, which this process made, and forgets it.
    async fn delete_solver_pod(&self, name: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.challenge_namespace);
        let _ = pods.delete(name, &DeleteParams::background()).await;
        self.solves.pods.lock().expect("solver pods").remove(name);
    }

    /// Deletes the solver pods of the challenge (or instance) `name` a berth that was killed
    /// left.
    pub(super) async fn remove_solvers(&self, name: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.challenge_namespace);
        let selector = format!(
            "{LABEL_INSTANCE}={},{LABEL_KIND}={SOLVER_KIND},{LABEL_SOLVES}={name}",
            self.ownership.instance()
        );
        let Ok(found) = pods.list(&ListParams::default().labels(&selector)).await else {
            return;
        };
        for pod in found.items {
            if let Some(pod) = pod.metadata.name {
                let _ = pods.delete(&pod, &DeleteParams::background()).await;
            }
        }
    }
}

/// The pod of one run: the solver's image and command, the challenge's address in its
/// environment, bounded as a challenge container is by default, with no rights in the cluster,
/// and ended by the cluster at the check's timeout.
fn solver_pod(name: &str, instance: &str, run: &SolveRun) -> serde_json::Value {
    let mut container = json!({
        "name": "solver",
        "image": run.check.image,
        "imagePullPolicy": "IfNotPresent",
        "env": [
            {"name": "CHALLENGE_HOST", "value": run.host},
            {"name": "CHALLENGE_PORT", "value": run.port.to_string()},
        ],
        "resources": {
            "limits": {"cpu": "1", "memory": "512Mi"},
            "requests": {"cpu": "100m", "memory": "51Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["NET_RAW"]},
        },
        // A failed run's last lines stay in its status even where pod logs cannot be read.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    if let Some(command) = &run.check.command {
        // As on Docker, the command takes the place of the image's, after its entrypoint.
        container["args"] = json!(command);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                LABEL_INSTANCE: instance,
                LABEL_KIND: SOLVER_KIND,
                LABEL_SOLVES: run.solves,
            },
        },
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": run.check.timeout.0.as_secs().max(1) + PULL_WAIT.as_secs(),
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "containers": [container],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_solver_pod_is_not_the_challenges_and_has_its_address_and_no_rights() {
        let run = SolveRun {
            key: "Challenge/jail".parse().unwrap(),
            solves: "jail".into(),
            version: "v1".into(),
            pod: "jail-solver-abc".into(),
            check: serde_json::from_value(json!({
                "image": "solver:1", "command": ["sh", "-c", "solve"], "timeout": "30s"
            }))
            .unwrap(),
            host: "10.0.0.7".into(),
            port: 1337,
            flags: vec!["flag{x}".into()],
            hidden: Vec::new(),
        };
        let pod = solver_pod("jail-solver-abc", "ctf", &run);
        let labels = &pod["metadata"]["labels"];
        assert_eq!(labels["berth.kind"], SOLVER_KIND);
        assert_eq!(labels["berth.solves"], "jail");
        assert!(
            labels.get("berth.name").is_none(),
            "never one of the challenge's pods"
        );
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["args"], json!(["sh", "-c", "solve"]));
        assert_eq!(container["env"][0]["value"], "10.0.0.7");
        assert_eq!(container["env"][1]["value"], "1337");
        assert!(
            !pod.to_string().contains("flag{x}"),
            "the flag is never handed over"
        );
        assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
        assert_eq!(pod["spec"]["restartPolicy"], "Never");
        assert_eq!(pod["spec"]["activeDeadlineSeconds"], 330);
    }
}
