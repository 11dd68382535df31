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
//! of the challenge's pods, nor selected by its Service. A solver parses what the challenge
//! sends, so a player may own it: a NetworkPolicy of its run's own, made before the pod, lets
//! nothing in and lets it out only to the pods behind the Service it solves through (not another
//! team's instance, the API server, the node or the internet). Both are deleted when the run
//! ends; ones left by a berth that was killed are deleted before the next run, and with the
//! challenge when it is deleted (an instance's, with the instance); the pod's
//! `activeDeadlineSeconds` ends it meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
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
/// How often a run's pod is looked at while it runs (and while it goes).
const POLL: Duration = Duration::from_millis(500);
/// Longest wait for a deleted solver pod to be gone before its NetworkPolicy is deleted.
const POD_GONE_WAIT: Duration = Duration::from_secs(30);

/// What the solvers last found, by challenge and the Deployment's version, and the pods of the
/// runs this process has going. Cloning shares them.
#[derive(Debug, Clone, Default)]
pub(super) struct Solves {
    found: Arc<Mutex<HashMap<(ObjectRef, String), SolveState>>>,
    pods: Arc<Mutex<HashSet<String>>>,
}

/// Label on a solver's pod and NetworkPolicy naming its run, so the policy selects that pod alone.
const LABEL_RUN: &str = "berth.solver-run";

/// How a solver reaches what it solves: the Service's cluster address, and the labels of the
/// pods behind it (the only pods its run may reach).
#[derive(Debug, Clone)]
pub(super) struct Reach {
    host: String,
    pods: serde_json::Value,
}

impl Reach {
    /// Read from a Service object: `None` for one without a cluster address or a selector.
    pub(super) fn of_service(service: &serde_json::Value) -> Option<Reach> {
        let host = service.pointer("/spec/clusterIP")?.as_str()?;
        let pods = service.pointer("/spec/selector")?;
        let usable = !host.is_empty() && host != "None" && !pods.as_object()?.is_empty();
        usable.then(|| Reach {
            host: host.to_string(),
            pods: pods.clone(),
        })
    }
}

/// One run to make.
struct SolveRun {
    key: ObjectRef,
    /// What its pod's `berth.solves` names, and a berth that starts a run again deletes the
    /// pods of: the challenge's name, or an instance's objects' name.
    solves: String,
    version: String,
    /// The run's own id, chosen when the run is: a run cut short still knows its pod and
    /// policy, both named [`SolveRun::name`].
    id: String,
    check: SolveCheck,
    reach: Reach,
    port: u16,
    /// The challenge's secret values: masked in what the solver says, and (with `expectFlag`)
    /// what it must print one of.
    flags: Vec<String>,
    /// Other secrets, masked in what it says but never taken for its flag.
    hidden: Vec<String>,
}

impl SolveRun {
    /// The name of the run's pod and NetworkPolicy.
    fn name(&self) -> String {
        format!("{}-solver-{}", self.solves, self.id)
    }
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
                let Some(reach) = self.service_reach(key.name.as_str()) else {
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
                    id: super::random_suffix(),
                    check,
                    reach,
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
        let (solves, reach) = self.instance_address(key.name.as_str(), id).await?;
        self.run_bounded(&SolveRun {
            key: key.clone(),
            id: super::random_suffix(),
            solves,
            version: String::new(),
            check: check.clone(),
            reach,
            port,
            flags: flags.expected,
            hidden: flags.hidden,
        })
        .await
    }

    /// One run, bounded by its check's timeout and an image pull; a run stuck past it has its
    /// pod and policy deleted.
    async fn run_bounded(&self, run: &SolveRun) -> Option<Result<(), Unsolved>> {
        bounded(&run.check, self.run_solver(run), || {
            self.end_solver_run(run.name())
        })
        .await
    }

    /// How a solver reaches the challenge `name`: through its Service, as the last observation
    /// saw it.
    fn service_reach(&self, name: &str) -> Option<Reach> {
        let live = self.live.lock().expect("live objects");
        Reach::of_service(live.get(&format!("{}/Service/{name}", self.challenge_namespace))?)
    }

    /// One run: whether the solver solved the challenge, or `None` when that could not be told
    /// (the API server gone).
    async fn run_solver(&self, run: &SolveRun) -> Option<Result<(), Unsolved>> {
        self.remove_solvers(&run.solves).await;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.challenge_namespace);
        let policies: Api<NetworkPolicy> =
            Api::namespaced(self.client.clone(), &self.challenge_namespace);
        let name = run.name();
        let instance = self.ownership.instance();
        let policy = serde_json::from_value(solver_policy(instance, run)).expect("a policy");
        let pod: Pod = serde_json::from_value(solver_pod(instance, run)).expect("a pod serializes");
        self.solves
            .pods
            .lock()
            .expect("solver pods")
            .insert(name.clone());
        // The walls first: a pod made without them would run unwalled until they came.
        let made = match policies.create(&PostParams::default(), &policy).await {
            Ok(_) => pods.create(&PostParams::default(), &pod).await.map(drop),
            Err(error) => Err(error),
        };
        if let Err(error) = made {
            self.end_solver_run(name).await;
            return match error {
                kube::Error::Api(refusal) if refusal.code < 500 => {
                    Some(Err(Unsolved::NotStarted(refusal.message)))
                }
                _ => None,
            };
        }
        let found = self.watch_solver(&pods, &name, run).await;
        self.end_solver_run(name).await;
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
        for run in own {
            self.end_solver_run(run).await;
        }
    }

    /// Deletes the pod and then the NetworkPolicy of the run `name`, which this process made,
    /// and forgets them.
    async fn end_solver_run(&self, name: String) {
        self.remove_solver_run(&name).await;
        self.solves.pods.lock().expect("solver pods").remove(&name);
    }

    /// Deletes the solver pod `name` and, once the pod is gone, its NetworkPolicy: a pod is never
    /// left without its walls. A pod still there after [`POD_GONE_WAIT`] keeps its policy, for
    /// the next run of its challenge (or the instance's removal) to delete.
    async fn remove_solver_run(&self, name: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.challenge_namespace);
        let now = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::background()
        };
        let _ = pods.delete(name, &now).await;
        let waiting = Instant::now();
        loop {
            match pods.get_opt(name).await {
                Ok(None) => break,
                Ok(Some(_)) if waiting.elapsed() < POD_GONE_WAIT => {
                    tokio::time::sleep(POLL).await;
                }
                _ => return,
            }
        }
        let policies: Api<NetworkPolicy> =
            Api::namespaced(self.client.clone(), &self.challenge_namespace);
        let _ = policies.delete(name, &DeleteParams::background()).await;
    }

    /// Deletes the solver pods, and then their NetworkPolicies, of the challenge (or instance)
    /// `name` a berth that was killed left.
    pub(super) async fn remove_solvers(&self, name: &str) {
        let selector = format!(
            "{LABEL_INSTANCE}={},{LABEL_KIND}={SOLVER_KIND},{LABEL_SOLVES}={name}",
            self.ownership.instance()
        );
        let listing = ListParams::default().labels(&selector);
        // Runs are named after their pods and policies alike: either may be what is left.
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.challenge_namespace);
        let policies: Api<NetworkPolicy> =
            Api::namespaced(self.client.clone(), &self.challenge_namespace);
        let (Ok(pods), Ok(policies)) = (pods.list(&listing).await, policies.list(&listing).await)
        else {
            return;
        };
        let left: std::collections::BTreeSet<String> = pods
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .chain(policies.items.into_iter().filter_map(|p| p.metadata.name))
            .collect();
        for run in left {
            self.remove_solver_run(&run).await;
        }
    }
}

/// The labels of a solver run's pod and NetworkPolicy.
fn run_labels(instance: &str, run: &SolveRun) -> serde_json::Value {
    json!({
        LABEL_INSTANCE: instance,
        LABEL_KIND: SOLVER_KIND,
        LABEL_SOLVES: run.solves,
        LABEL_RUN: run.id,
    })
}

/// The NetworkPolicy of one run: it selects the run's pod alone, lets nothing in, and lets it out
/// only to the pods behind the Service it solves through (no DNS: it is given an address).
fn solver_policy(instance: &str, run: &SolveRun) -> serde_json::Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": run.name(), "labels": run_labels(instance, run)},
        "spec": {
            "podSelector": {"matchLabels": run_labels(instance, run)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [{"to": [{"podSelector": {"matchLabels": run.reach.pods}}]}],
        },
    })
}

/// The pod of one run: the solver's image and command, the challenge's address in its
/// environment, bounded as a challenge container is by default, with no rights in the cluster,
/// and ended by the cluster at the check's timeout.
fn solver_pod(instance: &str, run: &SolveRun) -> serde_json::Value {
    let mut container = json!({
        "name": "solver",
        "image": run.check.image,
        "imagePullPolicy": "IfNotPresent",
        "env": [
            {"name": "CHALLENGE_HOST", "value": run.reach.host},
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
        "metadata": {"name": run.name(), "labels": run_labels(instance, run)},
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

    fn jail_run() -> SolveRun {
        SolveRun {
            key: "Challenge/jail".parse().unwrap(),
            solves: "jail".into(),
            version: "v1".into(),
            id: "abc".into(),
            check: serde_json::from_value(json!({
                "image": "solver:1", "command": ["sh", "-c", "solve"], "timeout": "30s"
            }))
            .unwrap(),
            reach: Reach::of_service(&json!({"spec": {
                "clusterIP": "10.0.0.7",
                "selector": {"berth.instance": "ctf", "berth.kind": "Challenge", "berth.name": "jail"},
            }}))
            .unwrap(),
            port: 1337,
            flags: vec!["flag{x}".into()],
            hidden: Vec::new(),
        }
    }

    #[test]
    fn a_solver_pod_is_not_the_challenges_and_has_its_address_and_no_rights() {
        let run = jail_run();
        let pod = solver_pod("ctf", &run);
        assert_eq!(pod["metadata"]["name"], "jail-solver-abc");
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

    #[test]
    fn a_solver_run_is_walled_in_to_the_pods_it_solves_and_nothing_else() {
        let run = jail_run();
        let (pod, policy) = (solver_pod("ctf", &run), solver_policy("ctf", &run));
        assert_eq!(policy["metadata"]["name"], pod["metadata"]["name"]);
        // It selects this run's pod, not another run's (nor the challenge's pods).
        assert_eq!(
            policy["spec"]["podSelector"]["matchLabels"],
            pod["metadata"]["labels"]
        );
        assert_eq!(
            policy["spec"]["podSelector"]["matchLabels"]["berth.solver-run"],
            "abc"
        );
        assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(policy["spec"]["ingress"], json!([]), "nothing comes in");
        // Out only to the pods behind the challenge's Service: no DNS, no ranges, no internet.
        assert_eq!(
            policy["spec"]["egress"],
            json!([{"to": [{"podSelector": {"matchLabels": {
                "berth.instance": "ctf", "berth.kind": "Challenge", "berth.name": "jail"
            }}}]}])
        );
        // A Service that selects nothing gives no way to wall a run in: no run.
        let headless = json!({"spec": {"clusterIP": "10.0.0.7", "selector": {}}});
        assert!(Reach::of_service(&headless).is_none());
    }
}
