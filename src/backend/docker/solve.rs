//! Solvers: a challenge's `healthcheck.solve`, a program that solves it (as kCTF's healthchecks
//! do), run now and then in a container of its own that shares the challenge container's network
//! (so it reaches it on `127.0.0.1`, whatever walls the challenge has, and nothing else it could
//! not). Its last result is the challenge container's health: a jail that broke, or a flag that
//! went missing, shows as Degraded where a port check would pass.
//!
//! A pass's diagnosis reads what each solver last found and starts the runs that are due; a run
//! goes on in the background, so no pass waits for one. What was found is kept in this process's
//! memory: a berth that starts again solves again before it calls a challenge Healthy. A per-team
//! instance's container is solved the same way, its runs started by the instance manager
//! ([`crate::instances`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{LogsOptions, WaitContainerOptions};
use futures_util::StreamExt;
use serde_json::Value;

use super::template::{INSTANCES_PART, contained};
use super::{DockerBackend, DockerError, Trouble, is_status, remove_container};
use crate::backend::solving::{
    OUTPUT_LIMIT, SolveFlags, SolveState, Unsolved, bounded, flag_values, verdict,
};
use crate::backend::{LABEL_KIND, masked};
use crate::descriptor::ObjectRef;
use crate::descriptor::model::SolveCheck;
use crate::descriptor::security::Resources;
use crate::descriptor::values::{SecretRef, Size};
use crate::plan::{ObservedObject, PartState, Slot};

/// The kind label of a solver's container: it is never taken for a part of its challenge.
pub(super) const SOLVER_KIND: &str = "ChallengeSolver";
/// Label on a solver's container naming the challenge container it solves.
const LABEL_SOLVES: &str = "berth.solves";
/// The solvers' states, by the challenge container they solve. Cloning shares them.
pub(super) type Solves = Arc<Mutex<HashMap<String, SolveState>>>;

/// One run to make.
struct SolveRun {
    key: ObjectRef,
    /// The challenge container solved.
    container: String,
    check: SolveCheck,
    port: u16,
    /// The challenge's secret values: masked in what the solver says, and (with `expectFlag`)
    /// what it must print one of.
    flags: Vec<String>,
    /// Other secrets, masked in what it says but never taken for its flag.
    hidden: Vec<String>,
}

impl DockerBackend {
    /// Gives each running main container of `observed` whose challenge has a solve check the
    /// health its solver last found (Progressing until a first run ends), and starts the runs
    /// that are due: none going on, and the last older than the check's interval.
    pub(super) fn judge_by_solvers(
        &self,
        observed: &mut [ObservedObject],
        wanted: &HashSet<&ObjectRef>,
    ) {
        let mut seen = HashSet::new();
        let mut due = Vec::new();
        {
            let mut solves = self.solves.lock().expect("solves");
            let objects = observed
                .iter_mut()
                .filter(|o| o.engine == crate::plan::Engine::Docker && wanted.contains(&o.key));
            for object in objects {
                // An instanced challenge's own part is its instances' network: its instances are
                // solved one by one by the instance manager.
                let parts = object.parts.iter_mut().filter(|p| {
                    Slot::of(&p.id) == Slot::Main
                        && p.id != INSTANCES_PART
                        && p.state == PartState::Running
                });
                for part in parts {
                    let Some(check) = part
                        .spec
                        .pointer("/healthcheck/solve")
                        .and_then(|v| serde_json::from_value::<SolveCheck>(v.clone()).ok())
                    else {
                        continue;
                    };
                    seen.insert(part.name.clone());
                    let state = solves.entry(part.name.clone()).or_default();
                    if let Some((health, why)) = state.judged(&check, part.health, self.solving) {
                        part.health = health;
                        part.detail = Some(why);
                    }
                    if !state.due(&check) || !self.solving {
                        continue;
                    }
                    state.running = true;
                    let port = part
                        .spec
                        .pointer("/ports/0/container")
                        .and_then(Value::as_u64)
                        .and_then(|p| u16::try_from(p).ok())
                        .unwrap_or_default();
                    let flags = flags_of(&part.spec);
                    due.push(SolveRun {
                        key: object.key.clone(),
                        container: part.name.clone(),
                        check,
                        port,
                        flags,
                        hidden: Vec::new(),
                    });
                }
            }
            // Containers gone (replaced, removed) are forgotten, but for runs still going on.
            solves.retain(|name, state| state.running || seen.contains(name));
        }
        for run in due {
            let backend = self.clone();
            tokio::spawn(async move {
                let found = backend.run_bounded(&run).await;
                let mut solves = backend.solves.lock().expect("solves");
                solves
                    .entry(run.container.clone())
                    .or_default()
                    .ended(found);
            });
        }
    }

    /// One run of `check` against the per-team instance container `container` of the challenge
    /// `key`, on its `port`, bounded as a challenge's run is: whether it solved it (printing one
    /// of `flags` when the check expects a flag), or `None` when that could not be told.
    pub(crate) async fn solve_instance(
        &self,
        key: &ObjectRef,
        container: &str,
        (check, port): (&SolveCheck, u16),
        flags: SolveFlags,
    ) -> Option<Result<(), Unsolved>> {
        self.run_bounded(&SolveRun {
            key: key.clone(),
            container: container.to_string(),
            check: check.clone(),
            port,
            flags: flags.expected,
            hidden: flags.hidden,
        })
        .await
    }

    /// One run, bounded by its check's timeout and an image pull; a run stuck past it has its
    /// container removed.
    async fn run_bounded(&self, run: &SolveRun) -> Option<Result<(), Unsolved>> {
        bounded(&run.check, self.run_solver(run), || async {
            let _ = remove_container(&self.docker, &solver_name(&run.container)).await;
        })
        .await
    }

    /// One run of a solver: whether it solved the challenge, or `None` when that could not be
    /// told (the engine gone, the challenge container replaced under it).
    async fn run_solver(&self, run: &SolveRun) -> Option<Result<(), Unsolved>> {
        let name = solver_name(&run.container);
        let _ = remove_container(&self.docker, &name).await;
        let image = match self.named_image(&run.check.image).await {
            Ok(image) => image,
            Err(Trouble::Failed(why)) => return Some(Err(Unsolved::NotStarted(why))),
            Err(Trouble::Transient(_)) => return None,
        };
        let mut labels = self.ownership.labels(&run.key, "");
        labels.insert(LABEL_KIND.into(), SOLVER_KIND.into());
        labels.insert(LABEL_SOLVES.into(), run.container.clone());
        // Bounded as a challenge container is by default: it cannot take the machine.
        let limits = Resources {
            cpus: Some(1.0),
            memory: Some(Size {
                bytes: 512 * 1024 * 1024,
            }),
            pids: Some(512),
        };
        let mut host_config = contained(Some(&limits), &Default::default(), true);
        host_config.network_mode = Some(format!("container:{}", run.container));
        let config = ContainerCreateBody {
            image: Some(image),
            cmd: run.check.command.clone(),
            env: Some(vec![
                "CHALLENGE_HOST=127.0.0.1".into(),
                format!("CHALLENGE_PORT={}", run.port),
            ]),
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        };
        if let Err(trouble) = self.create(&name, config).await {
            return match trouble {
                Trouble::Failed(why) => Some(Err(Unsolved::NotStarted(why))),
                Trouble::Transient(_) => None,
            };
        }
        let found = self.watch_solver(&name, run).await;
        let _ = remove_container(&self.docker, &name).await;
        found
    }

    /// Starts the solver `name` and judges how it ends.
    async fn watch_solver(&self, name: &str, run: &SolveRun) -> Option<Result<(), Unsolved>> {
        if let Err(error) = self
            .docker
            .start_container(
                name,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
        {
            // The challenge container went (a pass replaced it): there was nothing to solve.
            if is_status(&error, 404) || error.to_string().contains("No such container") {
                return None;
            }
            return Some(Err(Unsolved::NotStarted(error.to_string())));
        }
        let mut waited = self
            .docker
            .wait_container(name, None::<WaitContainerOptions>);
        let code = match tokio::time::timeout(run.check.timeout.0, waited.next()).await {
            Err(_) => {
                return Some(Err(Unsolved::TimedOut {
                    timeout: run.check.timeout.to_string(),
                    reason: None,
                }));
            }
            Ok(Some(Ok(answer))) => answer.status_code,
            Ok(Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. }))) => code,
            Ok(Some(Err(_)) | None) => return None,
        };
        let output = self.output_of(name).await;
        let output = masked(&output, &run.hidden);
        Some(verdict(code, &output, &run.check, &run.flags))
    }

    /// Removes the solvers of the challenge `key` (it is being deleted), or, with `keep`, those
    /// whose challenge container is not among `keep` (it was replaced, or an apply that started
    /// them ended).
    pub(super) async fn remove_solvers_of(
        &self,
        key: &ObjectRef,
        keep: &[String],
    ) -> Result<(), DockerError> {
        let options = bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![
                    format!("{}={}", crate::backend::LABEL_INSTANCE, self.instance()),
                    format!("{LABEL_KIND}={SOLVER_KIND}"),
                    format!("{}={}", crate::backend::LABEL_NAME, key.name),
                ],
            )])),
            ..Default::default()
        };
        let solvers = self.docker.list_containers(Some(options)).await?;
        for solver in solvers {
            let solves = solver
                .labels
                .as_ref()
                .and_then(|labels| labels.get(LABEL_SOLVES))
                .cloned()
                .unwrap_or_default();
            if keep.contains(&solves) {
                continue;
            }
            let id = solver.id.unwrap_or_default();
            remove_container(&self.docker, &id).await?;
        }
        Ok(())
    }

    /// Ends the runs going on (an apply that started them is ending): their containers go, and
    /// no result is taken from them.
    pub async fn stop_solvers(&self) {
        let running: Vec<String> = {
            let solves = self.solves.lock().expect("solves");
            solves
                .iter()
                .filter(|(_, state)| state.running)
                .map(|(container, _)| container.clone())
                .collect()
        };
        for container in running {
            let _ = remove_container(&self.docker, &solver_name(&container)).await;
        }
    }

    /// What the container `name` wrote, up to [`OUTPUT_LIMIT`].
    async fn output_of(&self, name: &str) -> String {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let mut logs = self.docker.logs(name, Some(options));
        let mut output = Vec::new();
        while let Some(Ok(chunk)) = logs.next().await {
            output.extend_from_slice(&chunk.into_bytes());
            if output.len() > OUTPUT_LIMIT {
                output.truncate(OUTPUT_LIMIT);
                break;
            }
        }
        String::from_utf8_lossy(&output).into_owned()
    }
}

/// The name of the solver of the challenge container `container`.
pub(super) fn solver_name(container: &str) -> String {
    format!("{container}-solver")
}

/// The flag's possible values: each secret the main container's template names (its secret
/// environment and files), read on this host.
pub(crate) fn flags_of(spec: &Value) -> Vec<String> {
    let references = spec
        .get("secretEnv")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|env| env.values().cloned())
        .chain(
            spec.get("secretFiles")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|file| file.get("secret").cloned()),
        );
    let references: Vec<SecretRef> = references
        .filter_map(|reference| serde_json::from_value(reference).ok())
        .collect();
    flag_values(references.iter())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flag a solver must print is any secret the main container's template names, as read
    /// on this host: its secret environment and its secret files alike.
    #[test]
    fn the_flag_is_any_secret_the_template_names() {
        let folder = tempfile::tempdir().unwrap();
        let (env_flag, file_flag) = (folder.path().join("env"), folder.path().join("file"));
        std::fs::write(&env_flag, "flag{from-env}\n").unwrap();
        std::fs::write(&file_flag, "flag{from-file}").unwrap();
        let spec = serde_json::json!({
            "secretEnv": {"FLAG": {"file": env_flag}},
            "secretFiles": [
                {"path": "/flag.txt", "secret": {"file": file_flag}},
                {"path": "/gone", "secret": {"file": folder.path().join("missing")}},
            ],
        });
        assert_eq!(flags_of(&spec), ["flag{from-env}", "flag{from-file}"]);
        assert!(flags_of(&serde_json::json!({"image": "x:1"})).is_empty());
    }
}
