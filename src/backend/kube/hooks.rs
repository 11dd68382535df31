//! A staging's Helm hooks (`helm.sh/hook: pre-install,pre-upgrade` and `post-…`), run as Helm
//! and Argo CD run them around an apply: `*-install` hooks when the staging is made, `*-upgrade`
//! hooks when it is changed, lightest `helm.sh/hook-weight` first; each hook object made anew
//! (Helm's default `before-hook-creation`: the one of the last apply is deleted first), then its
//! Jobs waited for until they complete, a failed one failing the staging with its pod's reason
//! before anything after it is applied, and deleted once done when its `hook-delete-policy` says
//! `hook-succeeded` (a Job its own `ttlSecondsAfterFinished` removed counts as done). Hooks are
//! not parts of the staging: they come and go, so the plan never counts them as drift; a digest
//! of them is part of the namespace's hash, so a changed hook is a change.

use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch};
use kube::discovery::ApiResource;
use serde_json::Value;

use super::{KubeBackend, Trouble, applied_by_berth, apply_params, health, pod_resource};
use crate::descriptor::manifests::{HOOK_DELETE_POLICY, Hook, Manifest};
use crate::plan::Health;

/// How long an old hook object may take to go before the new one is made.
const GONE_WAIT: Duration = Duration::from_secs(60);
/// How often a hook's Job is looked at.
const POLL: Duration = Duration::from_millis(500);
/// The least a hook's Job is waited for, whatever the apply's own wait (`--wait 0s` still runs
/// a migration to its end).
const HOOK_WAIT: Duration = Duration::from_secs(300);

/// One hook to run: its manifest, its resource, and the object to apply.
pub(super) struct HookObject<'a> {
    pub manifest: &'a Manifest,
    pub resource: &'a ApiResource,
    pub object: Value,
}

impl KubeBackend {
    /// Runs the hooks of `phase` in namespace `ns` that run on this apply (`fresh`: the staging
    /// is made now), lightest first, each made anew, and waits for each Job among them to
    /// complete. Says what ran. A failed Job's log lines are shown with the staging's `secrets`
    /// masked.
    pub(super) async fn run_hooks(
        &self,
        (phase, fresh): (Hook, bool),
        ns: &str,
        hooks: &[HookObject<'_>],
        (wait, secrets): (Duration, &[String]),
    ) -> Result<Vec<String>, Trouble> {
        let wait = wait.max(HOOK_WAIT);
        let event = format!(
            "{}-{}",
            phase.as_str(),
            if fresh { "install" } else { "upgrade" }
        );
        let mut due: Vec<&HookObject> = hooks
            .iter()
            .filter(|h| {
                h.manifest.hook.is_some_and(|run| {
                    run.phase == phase
                        && if fresh {
                            run.on_install
                        } else {
                            run.on_upgrade
                        }
                })
            })
            .collect();
        due.sort_by_key(|h| {
            (
                h.manifest.hook.map_or(0, |run| run.weight),
                h.manifest.name.clone(),
            )
        });
        let mut ran = Vec::new();
        for hook in due {
            let name = hook.manifest.name.as_str();
            let kind = hook.manifest.kind.as_str();
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), ns, hook.resource);
            self.delete_and_wait(ns, hook.manifest, hook.resource)
                .await?;
            api.patch(name, &apply_params(), &Patch::Apply(&hook.object))
                .await
                .map_err(|e| Trouble::object(kind, name, e))?;
            if kind == "Job" {
                self.wait_for_job(&api, (ns, name), &event, (wait, secrets))
                    .await?;
                if deleted_when_done(&hook.object) {
                    match api.delete(name, &DeleteParams::background()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(status)) if status.code == 404 => {}
                        Err(e) => return Err(Trouble::object(kind, name, e)),
                    }
                }
            }
            ran.push(format!("{event} hook {kind}/{name}"));
        }
        Ok(ran)
    }

    /// Deletes the object of `manifest`, when berth made it, and waits until it is gone, so a
    /// new one of the same name can be made.
    pub(super) async fn delete_and_wait(
        &self,
        ns: &str,
        manifest: &Manifest,
        resource: &ApiResource,
    ) -> Result<(), Trouble> {
        let (kind, name) = (manifest.kind.as_str(), manifest.name.as_str());
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, resource);
        if let Some(old) = api.get_opt(name).await.map_err(Trouble::from)?
            && applied_by_berth(&old.metadata)
        {
            api.delete(name, &DeleteParams::foreground())
                .await
                .map_err(|e| Trouble::object(kind, name, e))?;
            self.wait_until_gone(&api, kind, name).await?;
        }
        Ok(())
    }

    async fn wait_until_gone(
        &self,
        api: &Api<DynamicObject>,
        kind: &str,
        name: &str,
    ) -> Result<(), Trouble> {
        let started = Instant::now();
        while api.get_opt(name).await.map_err(Trouble::from)?.is_some() {
            if started.elapsed() > GONE_WAIT {
                return Err(Trouble::Failed(format!(
                    "{kind}/{name}: the one of the last apply was not deleted within {}s; the new one cannot be made",
                    GONE_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    /// Waits until the hook Job `name` completes; its failure, a pod of it that cannot start,
    /// or `wait` passing fails the staging, saying which and why.
    async fn wait_for_job(
        &self,
        api: &Api<DynamicObject>,
        (ns, name): (&str, &str),
        event: &str,
        (wait, secrets): (Duration, &[String]),
    ) -> Result<(), Trouble> {
        let pods: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &pod_resource());
        let started = Instant::now();
        loop {
            // Gone already: its own `ttlSecondsAfterFinished` removed it once it was done.
            let Some(job) = api.get_opt(name).await.map_err(Trouble::from)? else {
                return Ok(());
            };
            let job = serde_json::to_value(&job).unwrap_or_default();
            let listed = pods
                .list(&ListParams::default().labels(&format!("job-name={name}")))
                .await
                .map_err(Trouble::from)?;
            let listed: Vec<Value> = listed
                .items
                .iter()
                .map(|pod| serde_json::to_value(pod).unwrap_or_default())
                .collect();
            let condition = health::of("Job", &job, &listed.iter().collect::<Vec<_>>());
            match condition.health {
                Health::Healthy => return Ok(()),
                Health::Degraded => {
                    let said = self.last_words(ns, &listed, secrets).await;
                    return Err(Trouble::Failed(format!(
                        "{event} hook Job/{name} failed: {}{said}; nothing after it was applied",
                        condition.detail.unwrap_or_default()
                    )));
                }
                _ if started.elapsed() > wait => {
                    return Err(Trouble::Failed(format!(
                        "{event} hook Job/{name} did not complete within {}s ({}); nothing after it was applied",
                        wait.as_secs(),
                        condition.detail.unwrap_or_default()
                    )));
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }
}

impl KubeBackend {
    /// What the first of `pods` that ended with an error left: its exit code and last log
    /// lines (escaped, as any text from outside), as `(pod P: exit code N; last lines: …)`, or
    /// nothing when no pod ended so or the cluster cannot serve logs.
    async fn last_words(&self, ns: &str, pods: &[Value], secrets: &[String]) -> String {
        let ended = pods.iter().find_map(|pod| {
            let statuses = pod.pointer("/status/containerStatuses")?.as_array()?;
            statuses.iter().find_map(|status| {
                let code = status.pointer("/state/terminated/exitCode")?.as_i64()?;
                if code == 0 {
                    return None;
                }
                let pod = pod.pointer("/metadata/name")?.as_str()?.to_string();
                let container = status["name"].as_str()?.to_string();
                Some((pod, container, code))
            })
        });
        let Some((pod, container, code)) = ended else {
            return String::new();
        };
        let logs: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client.clone(), ns);
        let params = kube::api::LogParams {
            container: Some(container),
            tail_lines: Some(LOG_LINES),
            limit_bytes: Some(2048),
            ..Default::default()
        };
        let lines = match logs.logs(&pod, &params).await {
            Ok(text) if !text.trim().is_empty() => {
                let lines: Vec<String> = crate::backend::masked(&text, secrets)
                    .lines()
                    .map(|line| crate::printable::field(line).into_owned())
                    .collect();
                format!("; last lines: {}", lines.join(" | "))
            }
            _ => String::new(),
        };
        format!(" (pod {pod}: exit code {code}{lines})")
    }
}

/// Log lines of a failed hook shown.
const LOG_LINES: i64 = 5;

/// Whether the hook asks to be deleted once it succeeded (`hook-succeeded`). Pure.
fn deleted_when_done(object: &Value) -> bool {
    object
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(HOOK_DELETE_POLICY))
        .and_then(Value::as_str)
        .is_some_and(|policy| policy.split(',').any(|p| p.trim() == "hook-succeeded"))
}
