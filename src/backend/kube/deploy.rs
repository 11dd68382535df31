//! Challenges on the cluster: observing, applying and removing the Deployments, Services,
//! Secrets and NetworkPolicies that [`super::challenge`] shapes, in the agent's challenge
//! namespace.
//!
//! Observing is five lists for every challenge at once (those four kinds and pods, by the
//! instance's labels). Applying checks everything first (secret values readable, no object of
//! the same name that berth did not make, and, for an existing challenge, a server-side dry run),
//! then applies the Secret, the NetworkPolicy (before any pod), the Deployment and the Service,
//! removes the parts the
//! challenge no longer has, and waits until the rollout is ready: an object moving here from
//! Docker is removed there only after that.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch};
use serde_json::{Value, json};

use super::challenge::ChallengeTemplate;
use super::{
    KubeBackend, Trouble, applied_by_berth, apply_params, health, namespace_resource, pod_resource,
    secret_resource,
};
use crate::apply::Outcome;
use crate::backend::{EngineError, LABEL_INSTANCE, LABEL_KIND, LABEL_NAME, LABEL_SPEC_HASH};
use crate::descriptor::{Kind, ObjectRef};
use crate::plan::{DesiredObject, Engine, Health, ObservedObject, ObservedPart, Part, PartState};

/// Annotation on a challenge's Deployment and Service: the spec berth applied, as the plan shows
/// it, so a change is explained field by field.
const ANNOTATION_SPEC: &str = "berth.spec";
/// On a challenge's pods: the `resourceVersion` of its Secret `NAME-env` when they were made, so
/// a rotated secret rolls them (it reveals nothing of the values).
const ANNOTATION_SECRET_VERSION: &str = "berth.secret-version";
/// How long an apply waits for a challenge's rollout to be ready, unless told otherwise.
pub(super) const ROLLOUT_WAIT: Duration = Duration::from_secs(180);
/// The kinds a challenge is made of, in the order they are applied.
/// The revision the Deployment controller gives a Deployment and its ReplicaSets.
const ANNOTATION_REVISION: &str = "deployment.kubernetes.io/revision";
/// The label the Deployment controller puts on a ReplicaSet's pods.
const LABEL_POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// Label on an instanced challenge's NetworkPolicy: whether it takes spawns (`running`) or is
/// stopped.
const LABEL_STATE: &str = "berth.state";
const RUNNING: &str = "running";
const STOPPED: &str = "stopped";

const CHALLENGE_KINDS: [&str; 4] = ["Secret", "NetworkPolicy", "Deployment", "Service"];
/// What a challenge keeps its volumes in: applied with it, never observed as parts, deleted only
/// with it (and old folder copies once nothing mounts them).
const STORAGE_KINDS: [&str; 2] = ["ConfigMap", "PersistentVolumeClaim"];

fn deployment_resource() -> kube::discovery::ApiResource {
    kube::discovery::ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&())
}

pub(super) fn service_resource() -> kube::discovery::ApiResource {
    kube::discovery::ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&())
}

pub(super) fn network_policy_resource() -> kube::discovery::ApiResource {
    kube::discovery::ApiResource::erase::<k8s_openapi::api::networking::v1::NetworkPolicy>(&())
}

fn resource_of(kind: &str) -> kube::discovery::ApiResource {
    match kind {
        "Secret" => secret_resource(),
        "ConfigMap" => {
            kube::discovery::ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&())
        }
        "PersistentVolumeClaim" => super::claim_resource(),
        "NetworkPolicy" => network_policy_resource(),
        "Deployment" => deployment_resource(),
        _ => service_resource(),
    }
}

impl KubeBackend {
    fn challenge_api(&self, kind: &str) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &self.challenge_namespace,
            &resource_of(kind),
        )
    }

    /// Where challenges' objects of `kind` are looked for: every namespace, so that copies
    /// outside the configured one (it was changed) are found, moved and pruned; but Secrets and
    /// NetworkPolicies only in the configured one, so berth needs no rights on them anywhere
    /// else.
    fn all_api(&self, kind: &str) -> Api<DynamicObject> {
        match kind {
            "Secret" | "NetworkPolicy" | "ConfigMap" | "PersistentVolumeClaim" => {
                self.challenge_api(kind)
            }
            _ => Api::all_with(self.client.clone(), &resource_of(kind)),
        }
    }

    fn challenge_selector(&self, name: Option<&str>) -> String {
        self.ownership.selector(Kind::Challenge, name).join(",")
    }

    /// Every challenge this instance runs on the cluster, with the health of each part; and the
    /// objects as read, by `namespace/Kind/name`.
    pub(super) async fn observe_challenges(
        &self,
    ) -> Result<(Vec<ObservedObject>, HashMap<String, Value>), EngineError> {
        let params = ListParams::default().labels(&self.challenge_selector(None));
        let pods: Api<DynamicObject> = Api::all_with(self.client.clone(), &pod_resource());
        let (deployments, services, secrets, policies) = (
            self.all_api("Deployment"),
            self.all_api("Service"),
            self.all_api("Secret"),
            self.all_api("NetworkPolicy"),
        );
        let (deployments, services, secrets, policies, pods) = tokio::try_join!(
            deployments.list(&params),
            services.list(&params),
            secrets.list(&params),
            policies.list(&params),
            pods.list(&params),
        )
        .map_err(|e| self.gone(e))?;
        let pods: Vec<Value> = pods
            .items
            .iter()
            .map(|p| serde_json::to_value(p).unwrap_or_default())
            .collect();
        let mut challenges: BTreeMap<String, ObservedObject> = BTreeMap::new();
        let mut live = HashMap::new();
        let listed = [
            ("Deployment", deployments.items),
            ("Service", services.items),
            ("Secret", secrets.items),
            ("NetworkPolicy", policies.items),
        ];
        for (kind, items) in listed {
            for item in items {
                let labels = item.metadata.labels.clone().unwrap_or_default();
                let (Some(name), Some(owner)) =
                    (item.metadata.name.clone(), labels.get(LABEL_NAME))
                else {
                    continue;
                };
                let Ok(challenge) = owner.parse() else {
                    continue;
                };
                if !applied_by_berth(&item.metadata) {
                    continue;
                }
                let value = serde_json::to_value(&item).unwrap_or_default();
                let spec = item
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_SPEC))
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or_else(|| json!({}));
                let (state, health, detail) = match kind {
                    "Deployment" => {
                        let mine: Vec<&Value> = pods
                            .iter()
                            .filter(|p| {
                                p.pointer(&format!("/metadata/labels/{LABEL_NAME}"))
                                    .and_then(Value::as_str)
                                    == Some(owner)
                                    && p.pointer("/metadata/namespace")
                                        == value.pointer("/metadata/namespace")
                            })
                            .collect();
                        let condition = health::of(kind, &value, &mine);
                        let stopped =
                            value.pointer("/spec/replicas").and_then(Value::as_i64) == Some(0);
                        let state = if stopped {
                            PartState::Stopped
                        } else {
                            PartState::Running
                        };
                        (state, condition.health, condition.detail)
                    }
                    // An instanced challenge's policy says whether it takes spawns.
                    "NetworkPolicy"
                        if labels.get(LABEL_STATE).map(String::as_str) == Some(STOPPED) =>
                    {
                        (PartState::Stopped, Health::Healthy, None)
                    }
                    _ => (PartState::Running, Health::Healthy, None),
                };
                let secrets = (kind == "Secret").then(|| self.live_digests(&value));
                let ns = item.metadata.namespace.clone().unwrap_or_default();
                // A copy outside the configured namespace is a part the plan removes.
                let id = match ns == self.challenge_namespace {
                    true => format!("{kind}/{name}"),
                    false => format!("{kind}/{name} in namespace {ns}"),
                };
                challenges
                    .entry(owner.clone())
                    .or_insert_with(|| ObservedObject {
                        key: ObjectRef {
                            kind: Kind::Challenge,
                            name: challenge,
                        },
                        engine: Engine::Kubernetes,
                        parts: Vec::new(),
                        archived_at: None,
                        expired: None,
                        reach: Vec::new(),
                        produced: None,
                    })
                    .parts
                    .push(ObservedPart {
                        name: format!("{ns}/{kind}/{name}"),
                        id,
                        hash: labels.get(LABEL_SPEC_HASH).cloned().unwrap_or_default(),
                        spec,
                        secrets,
                        state,
                        health,
                        detail,
                    });
                live.insert(format!("{ns}/{kind}/{name}"), value);
            }
        }
        // A Service or Secret has no state of its own: it is stopped with its Deployment (or,
        // for an instanced challenge, its NetworkPolicy).
        for challenge in challenges.values_mut() {
            let stopped = challenge
                .parts
                .iter()
                .any(|p| p.state == PartState::Stopped);
            if stopped {
                for part in &mut challenge.parts {
                    part.state = PartState::Stopped;
                }
            }
        }
        Ok((challenges.into_values().collect(), live))
    }

    /// Records the digests of the challenge's secret values on its Secret part, so a rotated
    /// secret shows as a change (and an unreadable one as an update that fails with the reason).
    pub fn seal_challenge(&self, template: &ChallengeTemplate, object: &mut DesiredObject) {
        let Some(secret) = template.secret_name() else {
            return;
        };
        let id = format!("Secret/{secret}");
        if let Some(part) = object.parts.iter_mut().find(|p| p.id == id) {
            part.secrets = Some(self.sealed(template.secrets().into_iter()));
        }
    }

    /// Makes the challenge what `template` says, and waits until it is ready.
    pub async fn converge_challenge(
        &self,
        template: &ChallengeTemplate,
        parts: &[Part],
        root: &std::path::Path,
    ) -> Outcome {
        self.outcome(self.try_converge_challenge(template, parts, root).await)
    }

    async fn try_converge_challenge(
        &self,
        template: &ChallengeTemplate,
        parts: &[Part],
        root: &std::path::Path,
    ) -> Result<String, Trouble> {
        let key = &template.key;
        let ns = self.challenge_namespace.clone();
        // Secret values are read before anything changes: an unreadable one fails the challenge.
        let mut values = BTreeMap::new();
        for (name, reference) in template.secrets() {
            values.insert(
                name,
                reference
                    .resolve()
                    .map_err(|e| Trouble::Failed(e.to_string()))?,
            );
        }
        let hash_of = |id: &str| {
            parts
                .iter()
                .find(|p| p.id == id)
                .map(|p| (p.hash.clone(), p.spec.to_string()))
                .unwrap_or_default()
        };
        let labeled = |id: &str| {
            let (hash, _) = hash_of(id);
            self.ownership.labels_over(template.labels(), key, &hash)
        };
        let name = key.name.as_str();
        let mut objects: Vec<(&str, String, Value)> = Vec::new();
        if let Some(secret_name) = template.secret_name() {
            let labels = labeled(&format!("Secret/{secret_name}"));
            if let Some(secret) = template.secret(&labels, &ns, &values) {
                objects.push(("Secret", secret_name, secret));
            }
        }
        let policy_id = format!("NetworkPolicy/{name}");
        let mut policy_labels = labeled(&policy_id);
        if template.instanced() {
            let state = if template.running() { RUNNING } else { STOPPED };
            policy_labels.insert(LABEL_STATE.into(), state.into());
        }
        let mut policy = template.network_policy(&policy_labels, &ns);
        policy["metadata"]["annotations"] = json!({ ANNOTATION_SPEC: hash_of(&policy_id).1 });
        // Before the pods: they never run a moment without their walls.
        objects.push(("NetworkPolicy", name.to_string(), policy));
        // What the pods mount, before them: claims and the folders' copies. A claim is made
        // once and never changed after (the API server refuses most changes to one, and data
        // is in it): a new size is for the claim of a challenge made anew.
        let storage_labels = self.ownership.labels_over(template.labels(), key, "");
        for (claim, value) in template.claims(&storage_labels, &ns) {
            let found = self
                .challenge_api("PersistentVolumeClaim")
                .get_opt(&claim)
                .await
                .map_err(Trouble::from)?;
            if !found
                .as_ref()
                .is_some_and(|found| self.made_for(&found.metadata, name))
            {
                objects.push(("PersistentVolumeClaim", claim, value));
            }
        }
        let folder_maps = template
            .folder_maps(root, &storage_labels, &ns)
            .map_err(|e| Trouble::Failed(e.to_string()))?;
        let wanted_maps: Vec<String> = folder_maps.iter().map(|(n, _)| n.clone()).collect();
        for (map, value) in folder_maps {
            objects.push(("ConfigMap", map, value));
        }
        // An instanced challenge's pods are its teams' instances, made by the instance manager.
        if !template.instanced() {
            let deployment_id = format!("Deployment/{name}");
            let mut deployment = template.deployment(&labeled(&deployment_id), &ns, false);
            deployment["metadata"]["annotations"] =
                json!({ ANNOTATION_SPEC: hash_of(&deployment_id).1 });
            objects.push(("Deployment", name.to_string(), deployment));
            let service_id = format!("Service/{name}");
            if let Some(mut service) = template.service(&labeled(&service_id), &ns) {
                service["metadata"]["annotations"] =
                    json!({ ANNOTATION_SPEC: hash_of(&service_id).1 });
                objects.push(("Service", name.to_string(), service));
            }
        }
        // What the last observation saw of this challenge, in any namespace: only what berth
        // applied for this instance's Challenge of this name (a Staging's objects in the same
        // namespace are never this challenge's).
        let seen: Vec<(String, Value)> = {
            let live = self.live.lock().expect("live objects");
            let label = |v: &Value, key: &str| {
                v.pointer(&format!("/metadata/labels/{}", key.replace('/', "~1")))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            live.iter()
                .filter(|(id, _)| {
                    CHALLENGE_KINDS
                        .iter()
                        .any(|kind| id.split('/').nth(1) == Some(kind))
                })
                .filter(|(_, v)| {
                    label(v, LABEL_NAME).as_deref() == Some(name)
                        && label(v, LABEL_KIND).as_deref() == Some(Kind::Challenge.as_str())
                        && label(v, LABEL_INSTANCE).as_deref() == Some(self.ownership.instance())
                })
                .map(|(id, v)| (id.clone(), v.clone()))
                .collect()
        };
        let exists = |kind: &str, object: &str| {
            seen.iter()
                .any(|(id, _)| id == &format!("{}/{kind}/{object}", self.challenge_namespace))
        };
        if !self.taken.lock().expect("namespace names").contains(&ns) {
            self.make_challenge_namespace(&ns).await?;
        }
        // An object of the same name that berth did not make here is never taken over.
        for (kind, object, _) in objects.iter().filter(|(k, o, _)| !exists(k, o)) {
            if let Some(found) = self
                .challenge_api(kind)
                .get_opt(object)
                .await
                .map_err(Trouble::from)?
                && !self.made_for(&found.metadata, name)
            {
                return Err(Trouble::Failed(format!(
                    "{kind}/{object} exists in namespace {ns} and was not made by berth for {key}; delete it, or rename the challenge"
                )));
            }
        }
        // A copy in another namespace (the configured one changed) goes first: its NodePorts
        // are needed here.
        let mut removed = Vec::new();
        for (id, _) in seen
            .iter()
            .filter(|(id, _)| !id.starts_with(&format!("{ns}/")))
        {
            removed.push(self.remove_live_object(id).await?);
        }
        // Everything is checked by a dry run first: what the server refuses fails the challenge
        // before anything changes, so nothing is left half made and a running version stays.
        let updating = exists("Deployment", name);
        for dry_run in [true, false] {
            let mut params = apply_params();
            params.dry_run = dry_run;
            // Environment from a Secret is read when a container starts: the pods carry the
            // Secret's version, so a rotated value rolls them (the Secret goes first).
            let mut secret_version = None;
            for (kind, object, value) in &objects {
                let mut value = value.clone();
                if *kind == "Deployment"
                    && let Some(version) = &secret_version
                {
                    value["spec"]["template"]["metadata"]["annotations"]
                        [ANNOTATION_SECRET_VERSION] = json!(version);
                }
                let applied = self
                    .challenge_api(kind)
                    .patch(object, &params, &Patch::Apply(&value))
                    .await
                    .map_err(|e| Trouble::object(kind, object, e))?;
                if *kind == "Secret" {
                    secret_version = applied.metadata.resource_version;
                }
            }
        }
        // Parts the challenge no longer has (its ports, its secrets) go.
        for (id, value) in seen
            .iter()
            .filter(|(id, _)| id.starts_with(&format!("{ns}/")))
        {
            let mut pieces = id.splitn(3, '/').skip(1);
            let (Some(kind), Some(object)) = (pieces.next(), pieces.next()) else {
                continue;
            };
            if objects.iter().any(|(k, o, _)| k == &kind && o == object)
                || value.pointer("/metadata/deletionTimestamp").is_some()
            {
                continue;
            }
            removed.push(self.remove_live_object(id).await?);
        }
        let mut done = format!(
            "applied {} in namespace {ns}",
            objects
                .iter()
                .map(|(kind, object, _)| format!("{kind}/{object}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        // Copies of folders the pods no longer mount (the folder changed) go: a pod of the old
        // version keeps what it mounted.
        if !removed.is_empty() {
            done.push_str(&format!(", removed {}", removed.join(", ")));
        }
        if template.instanced() {
            done.push_str(match template.running() {
                true => "; ready for instances",
                false => "; stopped: no spawns, and its instances go",
            });
        } else if template.running() && self.rollout_wait.is_zero() {
            done.push_str("; its rollout was not waited for (--wait 0s)");
        } else if template.running() {
            let ready = self.wait_ready(name, updating).await?;
            done.push_str(&format!("; ready in {:.1}s", ready.as_secs_f64()));
        } else {
            done.push_str("; scaled to 0");
        }
        // Copies of folders the pods no longer mount go once the new pods are ready (an update
        // that never got ready keeps them, for the old pods); a later apply takes them.
        let old_maps = self.remove_old_folder_maps(name, &wanted_maps).await?;
        if !old_maps.is_empty() {
            done.push_str(&format!("; removed {}", old_maps.join(", ")));
        }
        Ok(done)
    }

    /// Whether berth applied the object of `metadata` for this instance's challenge `name`.
    fn made_for(&self, metadata: &kube::api::ObjectMeta, name: &str) -> bool {
        let labels = metadata.labels.as_ref();
        let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
        applied_by_berth(metadata)
            && label(LABEL_INSTANCE) == Some(self.ownership.instance())
            && label(LABEL_NAME) == Some(name)
    }

    /// Deletes the ConfigMaps holding copies of challenge `name`'s folders but those `wanted`,
    /// and says which.
    async fn remove_old_folder_maps(
        &self,
        name: &str,
        wanted: &[String],
    ) -> Result<Vec<String>, Trouble> {
        let selector = format!(
            "{},{}=true",
            self.challenge_selector(Some(name)),
            super::challenge::LABEL_FOLDER
        );
        let api = self.challenge_api("ConfigMap");
        let listed = api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(Trouble::from)?;
        let mut removed = Vec::new();
        for map in listed.items {
            let Some(map_name) = map.metadata.name.clone() else {
                continue;
            };
            if wanted.contains(&map_name) || !applied_by_berth(&map.metadata) {
                continue;
            }
            match api.delete(&map_name, &DeleteParams::background()).await {
                Ok(_) => removed.push(format!("ConfigMap/{map_name}")),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => return Err(Trouble::from(error)),
            }
        }
        Ok(removed)
    }

    /// Deletes the object the last observation saw as `namespace/Kind/name`, only if it is still
    /// that object (its uid), and says which.
    async fn remove_live_object(&self, id: &str) -> Result<String, Trouble> {
        let mut pieces = id.splitn(3, '/');
        let (Some(ns), Some(kind), Some(object)) = (pieces.next(), pieces.next(), pieces.next())
        else {
            return Ok(String::new());
        };
        let uid = self
            .live
            .lock()
            .expect("live objects")
            .get(id)
            .and_then(|v| {
                v.pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .map(String::from)
            });
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &resource_of(kind));
        let mut params = DeleteParams::background();
        params.preconditions = uid.map(|uid| kube::api::Preconditions {
            uid: Some(uid),
            resource_version: None,
        });
        match api.delete(object, &params).await {
            Err(kube::Error::Api(status)) if matches!(status.code, 404 | 409) => {}
            result => {
                result.map_err(|e| Trouble::object(kind, object, e))?;
            }
        }
        Ok(match ns == self.challenge_namespace {
            true => format!("{kind}/{object}"),
            false => format!("{kind}/{object} in namespace {ns}"),
        })
    }

    /// Makes the challenge namespace, labelled as this instance's.
    async fn make_challenge_namespace(&self, ns: &str) -> Result<(), Trouble> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &namespace_resource());
        if api.get_opt(ns).await.map_err(Trouble::from)?.is_some() {
            return Ok(());
        }
        let namespace = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": ns, "labels": self.ownership.instance_labels() },
        });
        api.patch(ns, &apply_params(), &Patch::Apply(&namespace))
            .await
            .map_err(|e| Trouble::object("Namespace", ns, e))?;
        self.taken
            .lock()
            .expect("namespace names")
            .insert(ns.to_string());
        Ok(())
    }

    /// Waits until the challenge's Deployment has rolled out and its pods are ready. A pod that
    /// cannot start (a crash loop, an image that is not there) fails it at once, with the reason;
    /// the old pods keep serving either way.
    async fn wait_ready(&self, name: &str, updating: bool) -> Result<Duration, Trouble> {
        let kept = match updating {
            true => "; the old version keeps serving",
            false => "",
        };
        let started = Instant::now();
        let pods: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.challenge_namespace,
            &pod_resource(),
        );
        let replica_sets: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.challenge_namespace,
            &ApiResource::erase::<k8s_openapi::api::apps::v1::ReplicaSet>(&()),
        );
        let params = ListParams::default().labels(&self.challenge_selector(Some(name)));
        loop {
            let deployment = self
                .challenge_api("Deployment")
                .get(name)
                .await
                .map_err(Trouble::from)?;
            // Only the pods of this revision count: an old one failing to pull its image must
            // not fail the fix that replaces it.
            let revision = deployment
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_REVISION).cloned());
            let current = replica_sets
                .list(&params)
                .await
                .map_err(Trouble::from)?
                .items
                .into_iter()
                .find(|set| {
                    revision.is_some()
                        && set
                            .metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get(ANNOTATION_REVISION))
                            == revision.as_ref()
                })
                .and_then(|set| set.metadata.labels?.get(LABEL_POD_TEMPLATE_HASH).cloned());
            let listed = pods.list(&params).await.map_err(Trouble::from)?;
            let values: Vec<Value> = listed
                .items
                .iter()
                .filter(|pod| {
                    current.is_some()
                        && pod
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(LABEL_POD_TEMPLATE_HASH))
                            == current.as_ref()
                })
                .map(|p| serde_json::to_value(p).unwrap_or_default())
                .collect();
            let value = serde_json::to_value(&deployment).unwrap_or_default();
            let condition = health::of("Deployment", &value, &values.iter().collect::<Vec<_>>());
            let waited = started.elapsed();
            match condition.health {
                Health::Healthy => return Ok(waited),
                Health::Degraded => {
                    return Err(Trouble::Failed(format!(
                        "the new version does not become ready: {}{kept}",
                        condition.detail.unwrap_or_default()
                    )));
                }
                _ if waited > self.rollout_wait => {
                    return Err(Trouble::Failed(format!(
                        "not ready after {}s: {}{kept}",
                        waited.as_secs(),
                        condition.detail.unwrap_or_default()
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Removes the challenge's objects from the cluster.
    pub async fn delete_challenge(&self, key: &ObjectRef) -> Outcome {
        let params =
            ListParams::default().labels(&self.challenge_selector(Some(key.name.as_str())));
        let mut deleted = Vec::new();
        // Its solver runs, with any a berth that was killed left: no later run of a challenge
        // that is gone would clean them up.
        self.remove_solvers(key.name.as_str()).await;
        // Its teams' instances first: none runs a moment without the challenge's policy.
        match self.remove_instances_of(key.name.as_str()).await {
            Ok(0) => {}
            Ok(removed) => deleted.push(format!("{removed} team instance(s)")),
            Err(error) => return Outcome::Transient(error.to_string()),
        }
        for kind in CHALLENGE_KINDS.iter().rev().chain(&STORAGE_KINDS) {
            let listed = match self.all_api(kind).list(&params).await {
                Ok(listed) => listed,
                Err(error) => return Outcome::Transient(self.gone(error).to_string()),
            };
            for item in listed.items {
                let Some(name) = item.metadata.name.clone() else {
                    continue;
                };
                if !applied_by_berth(&item.metadata) {
                    continue;
                }
                let ns = item.metadata.namespace.clone().unwrap_or_default();
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &ns, &resource_of(kind));
                match api.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => deleted.push(format!("{kind}/{name}")),
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(kube::Error::Api(status)) => {
                        return Outcome::Failed(format!(
                            "{kind}/{name}: the API server refused: {}",
                            status.message
                        ));
                    }
                    Err(error) => return Outcome::Transient(self.gone(error).to_string()),
                }
            }
        }
        Outcome::Done(match deleted.is_empty() {
            true => "already gone from the cluster".into(),
            false => format!(
                "deleted {} in namespace {}",
                deleted.join(", "),
                self.challenge_namespace
            ),
        })
    }
}
