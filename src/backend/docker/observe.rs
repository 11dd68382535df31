//! What this instance runs on the engine: one list call, grouped by challenge, read as parts with
//! state and health; and, for the unwell only, why (exit code, restarts, the last log lines, with
//! secret values masked).

use std::collections::{BTreeMap, HashMap, HashSet};

use bollard::errors::Error as DockerError;
use bollard::models::{ContainerSummary, ContainerSummaryStateEnum};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions, LogsOptions};
use futures_util::StreamExt;
use serde_json::Value;

use super::{DockerBackend, EngineError, LABEL_SECRETS, LABEL_SLOT, LABEL_SPEC, unreachable};
use crate::backend::masked;
use crate::backend::{LABEL_NAME, LABEL_SPEC_HASH};
use crate::descriptor::{Kind, ObjectRef};
use crate::plan::{Health, ObservedObject, ObservedPart, PartState};

/// The label a kubelet on a Docker Engine puts on the containers of its pods.
const KUBELET_POD_LABEL: &str = "io.kubernetes.pod.name";

impl DockerBackend {
    pub(super) async fn containers(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<ContainerSummary>, DockerError> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_string(),
                self.ownership.selector(Kind::Challenge, name),
            )])),
            ..Default::default()
        };
        let mut containers = self.docker.list_containers(Some(options)).await?;
        // A kubelet on this engine (dockershim) copies a pod's labels onto its containers: a
        // Challenge on Kubernetes is the cluster's, never one of these.
        containers.retain(|c| {
            c.labels
                .as_ref()
                .is_none_or(|labels| !labels.contains_key(KUBELET_POD_LABEL))
        });
        Ok(containers)
    }

    /// What this instance runs: one list call, grouped by challenge.
    pub async fn observe(&self) -> Result<Vec<ObservedObject>, EngineError> {
        // Three list calls (containers, instanced challenges' networks, products), asked at once.
        let (containers, instanced, products) = tokio::join!(
            self.containers(None),
            self.observe_instanced(),
            self.observe_products()
        );
        let gone = |e: bollard::errors::Error| unreachable(e.to_string());
        let (containers, instanced, products) = (
            containers.map_err(gone)?,
            instanced.map_err(gone)?,
            products.map_err(gone)?,
        );
        let mut objects: BTreeMap<ObjectRef, Vec<ObservedPart>> = BTreeMap::new();
        for container in &containers {
            // Per-team instances are the instance manager's, not a pass's.
            if label(container, crate::backend::LABEL_INSTANCE_ID).is_some() {
                continue;
            }
            let Some(part) = observed_part(container) else {
                continue;
            };
            let Some(Ok(name)) = label(container, LABEL_NAME).map(str::parse) else {
                continue;
            };
            objects
                .entry(ObjectRef {
                    kind: Kind::Challenge,
                    name,
                })
                .or_default()
                .push(part);
        }
        let mut observed: Vec<ObservedObject> = objects
            .into_iter()
            .map(|(key, parts)| ObservedObject {
                key,
                engine: crate::plan::Engine::Docker,
                parts,
                archived_at: None,
                expired: None,
                reach: Vec::new(),
                produced: None,
            })
            .collect();
        observed.extend(instanced);
        observed.extend(products);
        Ok(observed)
    }

    /// Fills in, for each container of `wanted` (objects meant to run) that is Degraded, its exit
    /// code and the last lines of its log. Progressing ones (just started) are inspected too: one
    /// the engine has restarted is in a crash loop, and so Degraded. Only those containers are
    /// inspected, a few at once, and logs are read only for the unwell, so a quiet pass costs no
    /// more than its list call.
    pub async fn diagnose(&self, observed: &mut [ObservedObject], wanted: &HashSet<&ObjectRef>) {
        let suspects: Vec<&mut ObservedPart> = observed
            .iter_mut()
            .filter(|o| {
                o.key.kind == Kind::Challenge
                    && o.engine == crate::plan::Engine::Docker
                    && wanted.contains(&o.key)
            })
            .flat_map(|o| o.parts.iter_mut())
            .filter(|p| matches!(p.health, Health::Degraded | Health::Progressing))
            .collect();
        let explained: Vec<(&mut ObservedPart, Option<(String, bool)>)> =
            futures_util::stream::iter(suspects)
                .map(|part| async move {
                    let explained = self.explain(&part.name).await;
                    (part, explained)
                })
                .buffer_unordered(8)
                .collect()
                .await;
        for (part, explained) in explained {
            if let Some((detail, restarted)) = explained {
                if restarted {
                    part.health = Health::Degraded;
                }
                if part.health == Health::Degraded {
                    part.detail = Some(detail);
                }
            }
        }
        self.judge_by_solvers(observed, wanted);
    }

    /// `exited with code 1; last log lines: …` for one container, in the engine's words, and
    /// whether the engine has restarted it. What the container wrote is masked: a challenge that
    /// prints its flag as it crashes must not put the flag in the status branch.
    pub(super) async fn explain(&self, container: &str) -> Option<(String, bool)> {
        let inspected = self
            .docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
            .ok()?;
        let secrets = secret_values(inspected.config.as_ref());
        let mask = |text: &str| clip(&masked(text, &secrets));
        let state = inspected.state?;
        let mut detail = Vec::new();
        let running = state.running.unwrap_or(false);
        let restarts = inspected.restart_count.unwrap_or(0);
        let failing_check = state.health.as_ref().and_then(|h| h.status)
            == Some(bollard::models::HealthStatusEnum::UNHEALTHY);
        if running && restarts == 0 && state.restarting != Some(true) && !failing_check {
            // Just started and nothing wrong yet: one inspect, and no log read.
            return None;
        }
        match state.exit_code {
            // Running again after a restart: the engine has reset the exit code to 0 by now.
            Some(_) if restarts > 0 && running && state.restarting != Some(true) => {
                detail.push(format!("crash loop: restarted {restarts} times"))
            }
            Some(code) if restarts > 0 => detail.push(format!(
                "exited with code {code}, restarted {restarts} times"
            )),
            Some(code) if !running || state.restarting == Some(true) => {
                detail.push(format!("exited with code {code}"))
            }
            _ => {}
        }
        if state.oom_killed == Some(true) {
            detail.push("killed for running out of memory".into());
        }
        if let Some(error) = state.error.filter(|e| !e.is_empty()) {
            detail.push(mask(&error));
        }
        if let Some(last) = state
            .health
            .and_then(|h| h.log)
            .and_then(|log| log.into_iter().last())
            .and_then(|probe| probe.output)
            .map(|o| o.trim().to_string())
            .filter(|o| !o.is_empty())
        {
            detail.push(format!("health check: {}", mask(&last)));
        }
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            tail: "5".into(),
            ..Default::default()
        };
        let mut logs = self.docker.logs(container, Some(options));
        let mut lines = Vec::new();
        while let Some(Ok(chunk)) = logs.next().await {
            for line in String::from_utf8_lossy(&chunk.into_bytes()).lines() {
                let line = line.trim();
                if !line.is_empty() {
                    lines.push(mask(line));
                }
            }
        }
        if !lines.is_empty() {
            let tail = &lines[lines.len().saturating_sub(5)..];
            detail.push(format!("last log lines: {}", tail.join(" | ")));
        }
        (!detail.is_empty()).then(|| (detail.join("; "), restarts > 0))
    }
}

/// The values of a container's secret variables (named by its secret-digest label) and files, to
/// be masked wherever the container's own words are shown (logs, health output).
fn secret_values(config: Option<&bollard::models::ContainerConfig>) -> Vec<String> {
    let Some(config) = config else {
        return Vec::new();
    };
    let names: BTreeMap<String, String> = config
        .labels
        .as_ref()
        .and_then(|labels| labels.get(LABEL_SECRETS))
        .and_then(|digests| serde_json::from_str(digests).ok())
        .unwrap_or_default();
    let mut values: Vec<String> = config
        .env
        .iter()
        .flatten()
        .filter_map(|pair| pair.split_once('='))
        .filter(|(name, value)| names.contains_key(*name) && !value.is_empty())
        .map(|(_, value)| value.to_string())
        .collect();
    // Its secret files are in no environment: their references are in the spec it was made
    // from, and read again here, so a challenge that prints its flag file never shows it.
    let files = config
        .labels
        .as_ref()
        .and_then(|labels| labels.get(LABEL_SPEC))
        .and_then(|spec| serde_json::from_str::<Value>(spec).ok())
        .and_then(|spec| spec.get("secretFiles").cloned());
    for file in files.iter().filter_map(Value::as_array).flatten() {
        if let Some(value) = file
            .get("secret")
            .and_then(|s| {
                serde_json::from_value::<crate::descriptor::values::SecretRef>(s.clone()).ok()
            })
            .and_then(|reference| reference.resolve().ok())
            .filter(|value| !value.is_empty())
        {
            values.push(value);
        }
    }
    values
}

fn clip(line: &str) -> String {
    const LONGEST: usize = 200;
    match line.char_indices().nth(LONGEST) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_string(),
    }
}

pub(super) fn label<'a>(container: &'a ContainerSummary, name: &str) -> Option<&'a str> {
    container.labels.as_ref()?.get(name).map(String::as_str)
}

pub(super) fn container_name_of(container: &ContainerSummary) -> String {
    container
        .names
        .as_ref()
        .and_then(|names| names.first())
        .map(|name| name.trim_start_matches('/').to_string())
        .or_else(|| container.id.clone())
        .unwrap_or_default()
}

/// The exit code in Docker's status text: `Exited (137) 2 seconds ago`.
fn exit_code(status: &str) -> Option<i64> {
    let rest = status.strip_prefix("Exited (")?;
    rest.split_once(')')?.0.parse().ok()
}

/// Whether the container's template says it runs once (`restart: no` or `onFailure`).
fn runs_once(container: &ContainerSummary) -> bool {
    label(container, LABEL_SPEC)
        .and_then(|spec| serde_json::from_str::<Value>(spec).ok())
        .and_then(|spec| {
            spec.get("restart")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .is_some_and(|restart| restart == "no" || restart == "onFailure")
}

pub(super) fn container_state(container: &ContainerSummary) -> PartState {
    use ContainerSummaryStateEnum as S;
    match container.state {
        Some(S::RUNNING | S::RESTARTING | S::PAUSED) => PartState::Running,
        Some(S::EXITED) if runs_once(container) => PartState::Completed,
        _ => PartState::Stopped,
    }
}

fn observed_part(container: &ContainerSummary) -> Option<ObservedPart> {
    let labels = container.labels.as_ref()?;
    labels.get(LABEL_NAME)?;
    let status = container.status.as_deref().unwrap_or_default();
    let state = container_state(container);
    let code = exit_code(status);
    let health = match (state, code) {
        (PartState::Completed, Some(0)) => Health::Healthy,
        (PartState::Completed, _) => Health::Degraded,
        _ => health_of(container.state.as_ref(), status),
    };
    let detail = match container.state {
        Some(ContainerSummaryStateEnum::RESTARTING) => Some("restarting (crash loop)".to_string()),
        _ => code
            .filter(|c| *c != 0 || state != PartState::Completed)
            .map(|c| format!("exited with code {c}")),
    };
    Some(ObservedPart {
        name: container_name_of(container),
        id: labels.get(LABEL_SLOT)?.clone(),
        hash: labels.get(LABEL_SPEC_HASH)?.clone(),
        spec: labels
            .get(LABEL_SPEC)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null),
        secrets: Some(
            labels
                .get(LABEL_SECRETS)
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_default(),
        ),
        state,
        health,
        detail: detail.filter(|_| health != Health::Healthy),
    })
}

/// Docker's state and status text (`Up 5 seconds (healthy)`) as berth's health. The list call's
/// status text is read rather than inspecting each container, so observing stays one call.
pub fn health_of(state: Option<&ContainerSummaryStateEnum>, status: &str) -> Health {
    match state {
        Some(ContainerSummaryStateEnum::RUNNING) => {
            if status.contains("(unhealthy)") {
                Health::Degraded
            } else if status.contains("(healthy)") {
                Health::Healthy
            } else if status.contains("(health: starting)") || just_started(status) {
                Health::Progressing
            } else {
                Health::Healthy
            }
        }
        Some(ContainerSummaryStateEnum::CREATED) => Health::Progressing,
        Some(
            ContainerSummaryStateEnum::EXITED
            | ContainerSummaryStateEnum::DEAD
            | ContainerSummaryStateEnum::RESTARTING
            | ContainerSummaryStateEnum::PAUSED
            | ContainerSummaryStateEnum::REMOVING
            | ContainerSummaryStateEnum::STOPPING,
        ) => Health::Degraded,
        _ => Health::Unknown,
    }
}

/// Whether a container came up in the last few seconds (`Up Less than a second`, `Up 2 seconds`):
/// with no health check of its own, it has not yet shown that it stays up, and a crash loop looks
/// like this between restarts.
fn just_started(status: &str) -> bool {
    const SETTLE_SECONDS: u64 = 3;
    let Some(up) = status.strip_prefix("Up ") else {
        return false;
    };
    if up.starts_with("Less than a second") {
        return true;
    }
    let mut words = up.split_whitespace();
    match (words.next().map(str::parse::<u64>), words.next()) {
        (Some(Ok(n)), Some(unit)) => unit.starts_with("second") && n < SETTLE_SECONDS,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    #[test]
    fn health_follows_state_and_status() {
        use ContainerSummaryStateEnum as S;
        assert_eq!(
            health_of(Some(&S::RUNNING), "Up 3 seconds"),
            Health::Healthy
        );
        assert_eq!(
            health_of(Some(&S::RUNNING), "Up Less than a second"),
            Health::Progressing
        );
        assert_eq!(
            health_of(Some(&S::RUNNING), "Up 2 seconds"),
            Health::Progressing
        );
        assert_eq!(
            health_of(Some(&S::RUNNING), "Up 2 minutes"),
            Health::Healthy
        );
        assert_eq!(
            health_of(Some(&S::RUNNING), "Up 3 seconds (healthy)"),
            Health::Healthy
        );
        assert_eq!(
            health_of(Some(&S::RUNNING), "Up 1 second (health: starting)"),
            Health::Progressing
        );
        assert_eq!(
            health_of(Some(&S::RUNNING), "Up 2 minutes (unhealthy)"),
            Health::Degraded
        );
        assert_eq!(
            health_of(Some(&S::EXITED), "Exited (1) 2 seconds ago"),
            Health::Degraded
        );
        assert_eq!(health_of(Some(&S::CREATED), "Created"), Health::Progressing);
        assert_eq!(health_of(None, ""), Health::Unknown);
    }

    #[test]
    fn exit_codes_are_read_from_the_status_text() {
        assert_eq!(exit_code("Exited (137) 2 seconds ago"), Some(137));
        assert_eq!(exit_code("Exited (0) About a minute ago"), Some(0));
        assert_eq!(exit_code("Up 3 seconds"), None);
    }

    /// A container's own words (logs, health output) reach status: its secret values are masked,
    /// other variables are not, and a value of several lines is masked line by line.
    #[test]
    fn secret_values_are_masked_in_what_a_container_says() {
        let config = bollard::models::ContainerConfig {
            env: Some(vec![
                "FLAG=flag{x}".into(),
                "KEY=line one\nline two".into(),
                "PORT=8080".into(),
                "EMPTY=".into(),
            ]),
            labels: Some(HashMap::from([(
                LABEL_SECRETS.to_string(),
                r#"{"FLAG":"d1","KEY":"d2","EMPTY":"d3"}"#.to_string(),
            )])),
            ..Default::default()
        };
        let secrets = secret_values(Some(&config));
        assert_eq!(
            masked("got flag{x} on 8080", &secrets),
            "got <secret> on 8080"
        );
        assert_eq!(masked("line two", &secrets), "<secret>");
        assert_eq!(masked("nothing", &secrets), "nothing");
        assert!(secret_values(None).is_empty());
    }
}
