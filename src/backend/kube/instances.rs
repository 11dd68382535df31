//! Per-team instances on the cluster: for each, in the agent's challenge namespace, a pod of the
//! challenge's version, a NodePort Service and a NetworkPolicy of its own, a Secret holding its
//! team's flag, and a claim of its own for each named volume (a repo folder is the challenge's
//! ConfigMap, shared read-only). Their `berth.kind` is [`INSTANCE_KIND`], so nothing that
//! selects the challenge's own pods (a Service, another challenge's `allowConnectTo`) selects a
//! team's. The policies, the challenge's (made by its pass) and the instance's, let in only the
//! instance's ports and let out nothing to another pod, so one team's instance reaches no other.
//!
//! The Service selects the instance's pods by its id, not by version: a replacement
//! (`onUpdate: replace`) is a new pod beside the old one, and the Service sends to it once it is
//! ready, on the same NodePorts, before the old one goes.

use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch};
use serde_json::Value;

use super::challenge::{ChallengeTemplate, INSTANCE_KIND};
use super::{
    KubeBackend, Trouble, apply_params, claim_resource, health, pod_resource, secret_resource,
};
use crate::backend::instance::{
    InstanceContainer, InstanceObjects, InstanceTrouble, NewInstance, Started,
};
use crate::backend::{LABEL_INSTANCE_ID, LABEL_KIND, LABEL_NAME, LABEL_SPEC_HASH};
use crate::plan::{Engine, Health};

/// How long a spawn waits for its pod to be ready.
const READY_WAIT: Duration = Duration::from_secs(120);
/// How long a spawn waits for its Service to send to its ready pod.
const ROUTED_WAIT: Duration = Duration::from_secs(10);
/// How often a spawn looks at its pod meanwhile.
const READY_POLL: Duration = Duration::from_millis(250);

impl From<Trouble> for InstanceTrouble {
    fn from(trouble: Trouble) -> InstanceTrouble {
        match trouble {
            Trouble::Gone(why) => InstanceTrouble::EngineGone(why),
            Trouble::Failed(why) => InstanceTrouble::Refused(why),
        }
    }
}

/// The name of instance `id`'s Service and flag Secret: a letter first, as a Service's name
/// needs, then as much of the challenge's name as fits in 63 characters.
fn base_name(challenge: &str, id: &str) -> String {
    let room = 63usize.saturating_sub("inst--".len() + id.len());
    let short = &challenge[..challenge.len().min(room)];
    format!("inst-{}-{id}", short.trim_end_matches('-'))
}

/// The name of instance `id`'s pod at the template's `version`.
pub fn pod_name(template: &ChallengeTemplate, version: &str, id: &str) -> String {
    format!(
        "{}-{}",
        base_name(template.key.name.as_str(), id),
        &version[..8.min(version.len())]
    )
}

fn flag_secret_name(challenge: &str, id: &str) -> String {
    format!("{}-flag", base_name(challenge, id))
}

impl KubeBackend {
    fn instance_api(&self, resource: &kube::discovery::ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.challenge_namespace, resource)
    }

    fn instance_selector(&self, id: Option<&str>) -> String {
        let instance = format!("{}={}", super::LABEL_INSTANCE, self.ownership.instance());
        match id {
            Some(id) => format!("{instance},{LABEL_INSTANCE_ID}={id}"),
            None => format!("{instance},{LABEL_INSTANCE_ID}"),
        }
    }

    /// Makes instance `new.id` of `template`: its flag's Secret, its pod, its Service; then waits
    /// until the pod is ready. A pod that does not come up is deleted again (and, for a new
    /// instance, its Service and Secret), with the reason.
    pub async fn start_instance(
        &self,
        template: &ChallengeTemplate,
        version: &str,
        new: NewInstance<'_>,
    ) -> Result<Started, InstanceTrouble> {
        let pod = pod_name(template, version, new.id);
        match self.try_start_instance(template, version, new, &pod).await {
            Ok(host_ports) => Ok(Started {
                container: pod,
                host_ports,
            }),
            Err(trouble) => {
                let _ = self.remove_instance_pod(&pod).await;
                if new.host_ports.is_empty() {
                    let _ = self
                        .remove_instance(template.key.name.as_str(), new.id)
                        .await;
                }
                Err(trouble.into())
            }
        }
    }

    async fn try_start_instance(
        &self,
        template: &ChallengeTemplate,
        version: &str,
        new: NewInstance<'_>,
        pod: &str,
    ) -> Result<Vec<u16>, Trouble> {
        let challenge = template.key.name.as_str();
        let ns = &self.challenge_namespace;
        let mut labels = self
            .ownership
            .labels_over(template.labels(), &template.key, version);
        labels.insert(LABEL_KIND.into(), INSTANCE_KIND.into());
        labels.insert(LABEL_INSTANCE_ID.into(), new.id.into());
        let params = apply_params();
        let base = base_name(challenge, new.id);
        // The walls first: the pod never runs a moment without its own policy.
        let policy = template.instance_policy(&labels, ns, &base, new.id);
        self.instance_api(&super::deploy::network_policy_resource())
            .patch(&base, &params, &Patch::Apply(&policy))
            .await
            .map_err(|e| Trouble::object("NetworkPolicy", &base, e))?;
        let secret = flag_secret_name(challenge, new.id);
        let mut flag_secret = None;
        if let Some(flag) = new.flag
            && let Some(value) = template.flag_secret(&labels, ns, &secret, flag)
        {
            self.instance_api(&secret_resource())
                .patch(&secret, &params, &Patch::Apply(&value))
                .await
                .map_err(|e| Trouble::object("Secret", &secret, e))?;
            flag_secret = Some(secret.as_str());
        }
        // Its claims, before the pod that mounts them: made once, kept while the instance lives
        // (a replacement mounts them again), never changed after (the API server refuses most
        // changes to a claim).
        let claims = self.instance_api(&claim_resource());
        for (claim, value) in template.instance_claims(&labels, ns, &base) {
            if claims
                .get_opt(&claim)
                .await
                .map_err(Trouble::from)?
                .is_none()
            {
                claims
                    .patch(&claim, &params, &Patch::Apply(&value))
                    .await
                    .map_err(|e| Trouble::object("PersistentVolumeClaim", &claim, e))?;
            }
        }
        let shape = template.instance_pod(&labels, ns, (&base, pod), flag_secret);
        self.instance_api(&pod_resource())
            .patch(pod, &params, &Patch::Apply(&shape))
            .await
            .map_err(|e| Trouble::object("Pod", pod, e))?;
        let service = template.instance_service(&labels, ns, &base, new.id, new.host_ports);
        // A new instance's Service is made as its pod starts, so the node's proxy routes it by
        // the time it is ready; one made again (a replacement, a respawn) changes only once the
        // new pod is ready, so a replacement that fails leaves the old pod served as it was.
        let node_ports = match new.host_ports.is_empty() {
            true => {
                let ports = self
                    .apply_instance_service(&base, &service, template)
                    .await?;
                self.wait_pod_ready(pod).await?;
                ports
            }
            false => {
                self.wait_pod_ready(pod).await?;
                self.apply_instance_service(&base, &service, template)
                    .await?
            }
        };
        self.wait_routed(&base, pod).await;
        Ok(node_ports)
    }

    /// Applies an instance's Service; its NodePorts, in the order of the challenge's ports.
    async fn apply_instance_service(
        &self,
        name: &str,
        service: &Value,
        template: &ChallengeTemplate,
    ) -> Result<Vec<u16>, Trouble> {
        let applied = self
            .instance_api(&super::deploy::service_resource())
            .patch(name, &apply_params(), &Patch::Apply(service))
            .await
            .map_err(|e| Trouble::object("Service", name, e))?;
        let applied = serde_json::to_value(&applied).unwrap_or_default();
        node_ports(&applied, template.spec().ports.len())
            .ok_or_else(|| Trouble::Failed(format!("Service/{name} was given no NodePort")))
    }

    /// Waits (a few seconds at most) until the Service's endpoints name the ready `pod`, so a
    /// team that connects at once is sent to it. The node's proxy still takes a moment to follow
    /// (about a second with kube-proxy's defaults), which no API shows.
    async fn wait_routed(&self, service: &str, pod: &str) {
        let endpoints = self.instance_api(&kube::discovery::ApiResource::erase::<
            k8s_openapi::api::core::v1::Endpoints,
        >(&()));
        let started = Instant::now();
        while started.elapsed() < ROUTED_WAIT {
            if let Ok(Some(found)) = endpoints.get_opt(service).await {
                let named = found
                    .data
                    .pointer("/subsets")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|subset| subset["addresses"].as_array())
                    .flatten()
                    .any(|address| address.pointer("/targetRef/name") == Some(&Value::from(pod)));
                if named {
                    return;
                }
            }
            tokio::time::sleep(READY_POLL).await;
        }
        tracing::warn!(%service, %pod, "the Service does not name the ready pod yet; answering anyway");
    }

    /// Waits until `pod` is ready; a pod that will not come up by waiting fails it at once. An
    /// API server that does not answer for a moment is asked again until the wait is over.
    async fn wait_pod_ready(&self, pod: &str) -> Result<(), Trouble> {
        let pods = self.instance_api(&pod_resource());
        let started = Instant::now();
        loop {
            let found = match pods.get_opt(pod).await {
                Ok(found) => found,
                Err(error) => match Trouble::object("Pod", pod, error) {
                    Trouble::Gone(_) if started.elapsed() < READY_WAIT => {
                        tokio::time::sleep(READY_POLL).await;
                        continue;
                    }
                    trouble => return Err(trouble),
                },
            };
            let found = found
                .ok_or_else(|| Trouble::Failed(format!("pod {pod} was deleted as it started")))?;
            let value = serde_json::to_value(&found).unwrap_or_default();
            let condition = health::pod(&value);
            match condition.health {
                Health::Healthy => return Ok(()),
                Health::Degraded => {
                    return Err(Trouble::Failed(condition.detail.unwrap_or_default()));
                }
                _ if started.elapsed() > READY_WAIT => {
                    return Err(Trouble::Failed(format!(
                        "pod {pod} not ready after {}s: {}",
                        READY_WAIT.as_secs(),
                        condition.detail.unwrap_or_default()
                    )));
                }
                _ => tokio::time::sleep(READY_POLL).await,
            }
        }
    }

    /// The name of instance `id`'s objects and how a solver reaches it (its Service's cluster
    /// address, and the pods behind it); `None` while it has no Service (or the API server does
    /// not answer).
    pub(super) async fn instance_address(
        &self,
        challenge: &str,
        id: &str,
    ) -> Option<(String, super::solve::Reach)> {
        let base = base_name(challenge, id);
        let service = self
            .instance_api(&super::deploy::service_resource())
            .get_opt(&base)
            .await
            .ok()??;
        Some((base, super::solve::Reach::of_service(&service.data)?))
    }

    /// Deletes one pod of an instance (gone already is fine): the one a replacement took over
    /// from, or one that did not come up.
    pub async fn remove_instance_pod(&self, pod: &str) -> Result<(), InstanceTrouble> {
        delete(&self.instance_api(&pod_resource()), "Pod", pod).await
    }

    /// Deletes instance `id` of `challenge`: its pods, claims, Service and flag Secret (gone
    /// already is fine). A claim goes once its pods have (the cluster keeps one a pod uses).
    pub async fn remove_instance(&self, challenge: &str, id: &str) -> Result<(), InstanceTrouble> {
        let of_instance = ListParams::default().labels(&self.instance_selector(Some(id)));
        let pods = self
            .instance_api(&pod_resource())
            .list(&of_instance)
            .await
            .map_err(|e| InstanceTrouble::from(Trouble::from(e)))?;
        for pod in pods.items.iter().filter_map(|p| p.metadata.name.as_deref()) {
            self.remove_instance_pod(pod).await?;
        }
        let base = base_name(challenge, id);
        // A solver's pod a berth killed mid-run left behind.
        self.remove_solvers(&base).await;
        let claims = self.instance_api(&claim_resource());
        let listed = claims
            .list(&of_instance)
            .await
            .map_err(|e| InstanceTrouble::from(Trouble::from(e)))?;
        for claim in listed
            .items
            .iter()
            .filter_map(|c| c.metadata.name.as_deref())
        {
            delete(&claims, "PersistentVolumeClaim", claim).await?;
        }
        delete(
            &self.instance_api(&super::deploy::service_resource()),
            "Service",
            &base,
        )
        .await?;
        let secret = flag_secret_name(challenge, id);
        delete(&self.instance_api(&secret_resource()), "Secret", &secret).await?;
        // The walls last, once nothing of the instance is left to run behind them.
        delete(
            &self.instance_api(&super::deploy::network_policy_resource()),
            "NetworkPolicy",
            &base,
        )
        .await
    }

    /// Removes every instance of `challenge` (a challenge pruned from the repo): its pods at
    /// once, without a grace period, then the rest of each. How many instances there were.
    pub async fn remove_instances_of(&self, challenge: &str) -> Result<usize, InstanceTrouble> {
        let mine = |found: Vec<InstanceObjects>| -> Vec<String> {
            found
                .into_iter()
                .filter(|o| o.challenge == challenge)
                .map(|o| o.id)
                .collect()
        };
        let mut ids: std::collections::BTreeSet<String> =
            mine(self.instance_leftovers().await?).into_iter().collect();
        let pods = self.instance_pods().await?;
        ids.extend(
            pods.into_iter()
                .filter(|p| p.challenge == challenge)
                .map(|p| p.id),
        );
        if ids.is_empty() {
            return Ok(0);
        }
        let selector = format!("{},{LABEL_NAME}={challenge}", self.instance_selector(None));
        let at_once = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::background()
        };
        self.instance_api(&pod_resource())
            .delete_collection(&at_once, &ListParams::default().labels(&selector))
            .await
            .map_err(|e| InstanceTrouble::from(Trouble::from(e)))?;
        for id in &ids {
            self.remove_instance(challenge, id).await?;
        }
        Ok(ids.len())
    }

    /// Every instance's pod this berth has, of every challenge, but those on their way out.
    pub async fn instance_pods(&self) -> Result<Vec<InstanceContainer>, InstanceTrouble> {
        let pods = self
            .instance_api(&pod_resource())
            .list(&ListParams::default().labels(&self.instance_selector(None)))
            .await
            .map_err(|e| InstanceTrouble::from(Trouble::from(e)))?;
        Ok(pods
            .items
            .iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .filter_map(|pod| {
                let labels = pod.metadata.labels.as_ref()?;
                let phase = pod.data.pointer("/status/phase").and_then(Value::as_str);
                Some(InstanceContainer {
                    id: labels.get(LABEL_INSTANCE_ID)?.clone(),
                    challenge: labels.get(LABEL_NAME)?.clone(),
                    container: pod.metadata.name.clone()?,
                    version: labels.get(LABEL_SPEC_HASH)?.clone(),
                    running: !matches!(phase, Some("Failed" | "Succeeded")),
                })
            })
            .collect())
    }

    /// The instances that have a Service, a flag Secret, a NetworkPolicy or a claim here: to
    /// find what is left of instances with no record (an agent killed mid-removal).
    pub async fn instance_leftovers(&self) -> Result<Vec<InstanceObjects>, InstanceTrouble> {
        let params = ListParams::default().labels(&self.instance_selector(None));
        let (services, secrets, policies, claims) = (
            self.instance_api(&super::deploy::service_resource()),
            self.instance_api(&secret_resource()),
            self.instance_api(&super::deploy::network_policy_resource()),
            self.instance_api(&claim_resource()),
        );
        let (services, secrets, policies, claims) = tokio::try_join!(
            services.list(&params),
            secrets.list(&params),
            policies.list(&params),
            claims.list(&params)
        )
        .map_err(|e| InstanceTrouble::from(Trouble::from(e)))?;
        let mut found: Vec<InstanceObjects> = services
            .items
            .iter()
            .chain(&secrets.items)
            .chain(&policies.items)
            .chain(&claims.items)
            .filter_map(|object| {
                let labels = object.metadata.labels.as_ref()?;
                Some(InstanceObjects {
                    engine: Engine::Kubernetes,
                    id: labels.get(LABEL_INSTANCE_ID)?.clone(),
                    challenge: labels.get(LABEL_NAME)?.clone(),
                    container: object.metadata.name.clone()?,
                })
            })
            .collect();
        found.sort();
        found.dedup_by(|a, b| a.id == b.id);
        Ok(found)
    }
}

/// The NodePorts of an applied Service, one for each of `count` ports in their order.
fn node_ports(service: &Value, count: usize) -> Option<Vec<u16>> {
    let ports = service.pointer("/spec/ports")?.as_array()?;
    (0..count)
        .map(|index| {
            let name = format!("port-{index}");
            let port = ports.iter().find(|p| p["name"] == name.as_str())?;
            u16::try_from(port["nodePort"].as_u64()?).ok()
        })
        .collect()
}

async fn delete(api: &Api<DynamicObject>, kind: &str, name: &str) -> Result<(), InstanceTrouble> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(Trouble::object(kind, name, error).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_start_with_a_letter_and_fit_a_service_name() {
        let id = "0123456789abcdef";
        assert_eq!(base_name("heap", id), "inst-heap-0123456789abcdef");
        let long = "a".repeat(63);
        let name = base_name(&long, id);
        assert_eq!(name.len(), 63);
        assert!(name.ends_with(id));
        // A cut that ends in a dash drops it: no double dash before the id.
        let dashed = format!("{}-b", "a".repeat(40));
        assert!(
            !base_name(&dashed, id).contains("--"),
            "{}",
            base_name(&dashed, id)
        );
        assert_eq!(base_name("7-seas", id), "inst-7-seas-0123456789abcdef");
    }

    #[test]
    fn node_ports_are_read_by_port_name_in_order() {
        let service = serde_json::json!({"spec": {"ports": [
            {"name": "port-1", "nodePort": 31002},
            {"name": "port-0", "nodePort": 31001},
        ]}});
        assert_eq!(node_ports(&service, 2), Some(vec![31001, 31002]));
        assert_eq!(node_ports(&service, 3), None);
    }
}
