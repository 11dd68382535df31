//! Per-team instances on whichever engine their challenge runs on: the one face
//! [`crate::instances`] drives. A challenge on Docker gets containers on host ports of the agent's
//! range ([`super::docker::instances`]); one on Kubernetes gets a pod and a NodePort Service of
//! its own ([`super::kube::instances`]).
//!
//! Each call is routed by the template's engine, or, for an instance whose version is no longer
//! known, by the engine its record names.

use crate::descriptor::ObjectRef;
use crate::descriptor::model::{ChallengeSpec, Engine, Instanced, SolveCheck};

use super::docker::{self, DockerBackend};
pub use super::instance::{
    InstanceContainer, InstanceObjects, InstanceTrouble, NewInstance, Started,
};
use super::kube::{self, KubeBackend};
use super::solving::{SolveFlags, Unsolved};

/// One version of an instanced challenge, as its engine makes instances of it.
#[derive(Debug, Clone)]
pub enum InstanceTemplate {
    /// Containers on the Docker Engine.
    Docker(docker::ChallengeTemplate),
    /// Pods on the cluster.
    Kubernetes {
        /// The challenge on the cluster.
        template: kube::challenge::ChallengeTemplate,
        /// Its version (see [`kube::challenge::ChallengeTemplate::version`]), worked out once.
        version: String,
    },
}

impl InstanceTemplate {
    /// A challenge on the cluster, as its instances are made.
    pub fn kubernetes(template: kube::challenge::ChallengeTemplate) -> InstanceTemplate {
        let version = template.version();
        InstanceTemplate::Kubernetes { template, version }
    }

    /// `Challenge/name`.
    pub fn key(&self) -> &ObjectRef {
        match self {
            InstanceTemplate::Docker(template) => &template.key,
            InstanceTemplate::Kubernetes { template, .. } => &template.key,
        }
    }

    /// The challenge's spec.
    pub fn spec(&self) -> &ChallengeSpec {
        match self {
            InstanceTemplate::Docker(template) => &template.spec,
            InstanceTemplate::Kubernetes { template, .. } => template.spec(),
        }
    }

    /// The version: the hash its pass records, which instances made of it carry.
    pub fn version(&self) -> &str {
        match self {
            InstanceTemplate::Docker(template) => template.main_hash(),
            InstanceTemplate::Kubernetes { version, .. } => version,
        }
    }

    /// The engine it runs on.
    pub fn engine(&self) -> Engine {
        match self {
            InstanceTemplate::Docker(_) => Engine::Docker,
            InstanceTemplate::Kubernetes { .. } => Engine::Kubernetes,
        }
    }

    /// Its `instanced` (only instanced challenges are templates of instances).
    pub fn instanced(&self) -> &Instanced {
        self.spec()
            .instanced
            .as_ref()
            .expect("only instanced challenges are instance templates")
    }

    /// How many host ports of the agent's range an instance holds: one per port on Docker, none
    /// on Kubernetes (NodePorts are the cluster's).
    pub fn host_ports_held(&self) -> usize {
        match self {
            InstanceTemplate::Docker(template) => template.spec.ports.len(),
            InstanceTemplate::Kubernetes { .. } => 0,
        }
    }
}

/// The engines listed, and every instance's main container on them.
pub type Listed = (Vec<Engine>, Vec<(Engine, InstanceContainer)>);

/// The engines instances are made on, once a pass has connected to them.
#[derive(Clone, Default)]
pub struct InstanceEngines {
    docker: Option<DockerBackend>,
    kube: Option<KubeBackend>,
}

impl InstanceEngines {
    /// The engines a pass connected to.
    pub fn new(docker: Option<DockerBackend>, kube: Option<KubeBackend>) -> InstanceEngines {
        InstanceEngines { docker, kube }
    }

    /// Whether a pass has connected to any engine.
    pub fn any(&self) -> bool {
        self.docker.is_some() || self.kube.is_some()
    }

    fn docker(&self) -> Result<&DockerBackend, InstanceTrouble> {
        self.docker.as_ref().ok_or_else(|| {
            InstanceTrouble::EngineGone("no pass has reached the Docker Engine".into())
        })
    }

    fn kube(&self) -> Result<&KubeBackend, InstanceTrouble> {
        self.kube.as_ref().ok_or_else(|| {
            InstanceTrouble::EngineGone("no pass has reached the Kubernetes API server".into())
        })
    }

    /// Whether instances of `template` can be made now (its image is there, its engine known).
    pub fn ready(&self, template: &InstanceTemplate) -> Result<(), InstanceTrouble> {
        match template {
            InstanceTemplate::Docker(template) => {
                self.docker()?.instance_image(template).map(|_| ())
            }
            InstanceTemplate::Kubernetes { .. } => self.kube().map(|_| ()),
        }
    }

    /// The name of instance `id`'s main container (or pod) at the template's version.
    pub fn container_name(
        &self,
        template: &InstanceTemplate,
        id: &str,
    ) -> Result<String, InstanceTrouble> {
        match template {
            InstanceTemplate::Docker(template) => {
                Ok(self.docker()?.instance_container_name(template, id))
            }
            InstanceTemplate::Kubernetes { template, version } => {
                Ok(kube::instances::pod_name(template, version, id))
            }
        }
    }

    /// Makes and starts an instance of `template`; what did not start is removed again.
    pub async fn start(
        &self,
        template: &InstanceTemplate,
        new: NewInstance<'_>,
    ) -> Result<Started, InstanceTrouble> {
        match template {
            InstanceTemplate::Docker(template) => {
                let container = self.docker()?.start_instance(template, new).await?;
                Ok(Started {
                    container,
                    host_ports: new.host_ports.to_vec(),
                })
            }
            InstanceTemplate::Kubernetes { template, version } => {
                self.kube()?.start_instance(template, version, new).await
            }
        }
    }

    /// Gives a pooled instance its team's flag as it is claimed. Pools of challenges whose flag
    /// cannot be given that way are refused by validation.
    pub async fn give_flag(
        &self,
        template: &InstanceTemplate,
        container: &str,
        flag: &str,
    ) -> Result<(), InstanceTrouble> {
        match template {
            InstanceTemplate::Docker(template) => {
                self.docker()?.give_flag(container, template, flag).await
            }
            InstanceTemplate::Kubernetes { .. } => Err(InstanceTrouble::Refused(
                "a pod's flag cannot be given after it started; a pool of a challenge with a flag on kubernetes is refused by validation".into(),
            )),
        }
    }

    /// Writes a claimed pooled instance's flag again where a restart emptied it (Docker only).
    pub async fn keep_flag(&self, template: &InstanceTemplate, container: &str, flag: &str) {
        if let (InstanceTemplate::Docker(template), Ok(docker)) = (template, self.docker()) {
            docker.keep_flag(container, template, flag).await;
        }
    }

    /// Frees what a replacement needs of the old container: on Docker its host ports (it
    /// stops); on Kubernetes nothing (the instance's Service moves to the new pod once ready).
    /// Whether it stopped, and so must start again if the replacement fails.
    pub async fn make_way(&self, engine: Engine, container: &str) -> Result<bool, InstanceTrouble> {
        match engine {
            Engine::Docker => self.docker()?.stop_instance(container).await.map(|()| true),
            Engine::Kubernetes => Ok(false),
        }
    }

    /// Starts an instance's container again (one that stopped, or made way for a replacement
    /// that failed). A pod does not start again: it is refused, and the instance removed.
    pub async fn restart(&self, engine: Engine, container: &str) -> Result<(), InstanceTrouble> {
        match engine {
            Engine::Docker => self.docker()?.restart_instance(container).await,
            Engine::Kubernetes => Err(InstanceTrouble::Refused(format!(
                "pod {container} ended, and a pod does not start again"
            ))),
        }
    }

    /// Removes the container (or pod) an instance ran before its replacement.
    pub async fn retire(&self, engine: Engine, container: &str) -> Result<(), InstanceTrouble> {
        match engine {
            Engine::Docker => self.docker()?.remove_instance(container).await,
            Engine::Kubernetes => self.kube()?.remove_instance_pod(container).await,
        }
    }

    /// One run of `check`, the solver of `template`, against the instance `objects`: whether it
    /// solved it (printing one of the expected `flags` when the check expects a flag), or `None`
    /// when that could not be told (the engine gone, the instance replaced or removed under it).
    pub(crate) async fn solve(
        &self,
        template: &InstanceTemplate,
        objects: &InstanceObjects,
        check: &SolveCheck,
        flags: SolveFlags,
    ) -> Option<Result<(), Unsolved>> {
        let port = template.spec().ports.first()?.container.0;
        let key = template.key();
        match objects.engine {
            Engine::Docker => {
                self.docker
                    .as_ref()?
                    .solve_instance(key, &objects.container, (check, port), flags)
                    .await
            }
            Engine::Kubernetes => {
                self.kube
                    .as_ref()?
                    .solve_instance(key, &objects.id, (check, port), flags)
                    .await
            }
        }
    }

    /// Removes an instance and everything made for it (gone already is fine).
    pub async fn remove(&self, objects: &InstanceObjects) -> Result<(), InstanceTrouble> {
        match objects.engine {
            Engine::Docker => self.docker()?.remove_instance(&objects.container).await,
            Engine::Kubernetes => {
                self.kube()?
                    .remove_instance(&objects.challenge, &objects.id)
                    .await
            }
        }
    }

    /// Every instance's main container on every engine, by engine; and the engines listed (an
    /// engine no pass has reached is not, and says nothing of its instances).
    pub async fn containers(&self) -> Result<Listed, InstanceTrouble> {
        let (mut engines, mut all) = (Vec::new(), Vec::new());
        if let Some(docker) = &self.docker {
            let found = docker.instance_containers().await?;
            engines.push(Engine::Docker);
            all.extend(found.into_iter().map(|c| (Engine::Docker, c)));
        }
        if let Some(kube) = &self.kube {
            let found = kube.instance_pods().await?;
            engines.push(Engine::Kubernetes);
            all.extend(found.into_iter().map(|c| (Engine::Kubernetes, c)));
        }
        Ok((engines, all))
    }

    /// These engines, with each that `newer` has taking the place of this one's: a pass that
    /// did not reach an engine leaves the one before in place.
    pub fn updated(&self, newer: InstanceEngines) -> InstanceEngines {
        InstanceEngines {
            docker: newer.docker.or_else(|| self.docker.clone()),
            kube: newer.kube.or_else(|| self.kube.clone()),
        }
    }

    /// What is left of instances besides their main containers (Docker's sidecars, a pod's
    /// Service and flag Secret): to find what an agent killed mid-removal left.
    pub async fn leftovers(&self) -> Result<Vec<InstanceObjects>, InstanceTrouble> {
        let mut all = Vec::new();
        if let Some(docker) = &self.docker {
            all.extend(docker.sidecar_owners().await?);
        }
        if let Some(kube) = &self.kube {
            all.extend(kube.instance_leftovers().await?);
        }
        Ok(all)
    }
}
