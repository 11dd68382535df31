//! The Docker backend: Challenges as containers on a Docker Engine, through its API (bollard).
//!
//! A challenge with sidecars gets a network of its own, where its containers reach each other by
//! name; one without runs on the engine's default bridge, as `docker run` does.
//!
//! It owns the translation of a Challenge into container templates (pure, [`templates`]), observing
//! what this berth instance runs (one list call, by label), and converging one object at a time.
//! It never touches a container, network or image without the `berth.instance` label of its own
//! instance, and every name it makes is derived from the instance, the object, the slot and the
//! template's hash, so a pass killed at any point and run again converges without duplicates.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerSummary, ContainerSummaryStateEnum, EndpointSettings,
    HealthConfig, HostConfig, NetworkCreateRequest, NetworkingConfig, PortBinding,
    RestartPolicy as DockerRestart, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, CreateImageOptions, ListContainersOptions,
    ListImagesOptions, RemoveContainerOptions, RemoveImageOptions, StopContainerOptions,
};
use futures_util::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::build_context::BuildContext;
use crate::descriptor::model::{ChallengeSpec, ImageSource, RestartPolicy, RunState, Sidecar};
use crate::descriptor::values::SecretRef;
use crate::descriptor::{Descriptor, Kind, ObjectRef, Spec};
use crate::plan::{DesiredObject, Health, Member, ObservedMember, ObservedObject};

/// Label naming the berth instance that owns an object.
pub const LABEL_INSTANCE: &str = "berth.instance";
/// Label naming the owning descriptor's kind.
pub const LABEL_KIND: &str = "berth.kind";
/// Label naming the owning descriptor.
pub const LABEL_NAME: &str = "berth.name";
/// Label with the hash of the container's template.
pub const LABEL_SPEC_HASH: &str = "berth.spec-hash";
/// Label naming the container's slot (`main-1`, `sidecar-db`).
pub const LABEL_SLOT: &str = "berth.slot";
/// Label with the container's template as JSON (secrets only as references).
pub const LABEL_SPEC: &str = "berth.spec";

/// Why the engine could not be used at all (as opposed to one object failing).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No engine answered.
    #[error(
        "cannot reach the Docker Engine at {host}: {reason}; is the daemon running? Set DOCKER_HOST to point berth at it"
    )]
    Unreachable {
        /// Where berth looked.
        host: String,
        /// What went wrong.
        reason: String,
    },
}

/// One challenge, as containers.
#[derive(Debug, Clone)]
pub struct ChallengeTemplate {
    /// `Challenge/name`.
    pub key: ObjectRef,
    /// The spec.
    pub spec: ChallengeSpec,
    /// Labels from the descriptor, copied onto everything made for it.
    pub labels: BTreeMap<String, String>,
    /// Digest of the build context, for built images.
    pub build_digest: Option<String>,
    /// The slots, with their hashes and specs.
    pub members: Vec<Member>,
}

impl ChallengeTemplate {
    fn main_hash(&self) -> &str {
        &self.members[0].hash
    }

    /// Whether new containers may start before old ones stop: only when nothing is published on
    /// a host port, which two containers cannot hold at once.
    pub fn start_first(&self) -> bool {
        self.spec.ports.iter().all(|p| p.host.is_none())
    }
}

fn short_hash(value: &Value) -> String {
    let digest = Sha256::digest(serde_json::to_vec(value).expect("json serializes"));
    hex::encode(&digest[..8])
}

/// Translates descriptors into desired objects and the templates to build them. Pure: no engine,
/// no file system (build digests come from the loader).
pub fn templates(descriptors: &[Descriptor]) -> (Vec<DesiredObject>, Vec<ChallengeTemplate>) {
    let kinds: HashMap<ObjectRef, Kind> = descriptors.iter().map(|d| (d.key(), d.kind())).collect();
    let mut desired = Vec::new();
    let mut templates = Vec::new();
    for descriptor in descriptors {
        let key = descriptor.key();
        let dependencies = descriptor.dependencies();
        let Spec::Challenge(spec) = &descriptor.spec else {
            desired.push(DesiredObject {
                key,
                run: true,
                members: Vec::new(),
                dependencies,
                start_first: true,
                skip: Some("skipped (no backend yet)".into()),
            });
            continue;
        };
        let waits_for_other_kind = dependencies
            .iter()
            .find(|d| kinds.get(d).is_some_and(|k| *k != Kind::Challenge));
        let skip =
            waits_for_other_kind.map(|d| format!("skipped: needs {d}, which has no backend yet"));
        let build_digest = descriptor.build_digest.clone();
        let mut main = serde_json::to_value(spec).expect("specs serialize");
        let main_object = main.as_object_mut().expect("spec is an object");
        for not_applied in ["state", "sidecars", "info"] {
            main_object.remove(not_applied);
        }
        if let Some(digest) = &build_digest {
            main_object.insert("buildDigest".into(), Value::String(digest.clone()));
        }
        if !spec.sidecars.is_empty() {
            // Which network the main container joins is part of its template.
            main_object.insert("network".into(), Value::String("own".into()));
        }
        if !descriptor.metadata.labels.is_empty() {
            main_object.insert("labels".into(), json!(descriptor.metadata.labels));
        }
        let main_hash = short_hash(&main);
        let mut members: Vec<Member> = (1..=spec.replicas)
            .map(|replica| Member {
                slot: format!("main-{replica}"),
                hash: main_hash.clone(),
                spec: main.clone(),
            })
            .collect();
        for sidecar in &spec.sidecars {
            let mut sidecar_spec = serde_json::to_value(sidecar).expect("sidecars serialize");
            if !descriptor.metadata.labels.is_empty() {
                sidecar_spec["labels"] = json!(descriptor.metadata.labels);
            }
            members.push(Member {
                slot: format!("sidecar-{}", sidecar.name),
                hash: short_hash(&sidecar_spec),
                spec: sidecar_spec,
            });
        }
        let template = ChallengeTemplate {
            key: key.clone(),
            spec: spec.clone(),
            labels: descriptor.metadata.labels.clone(),
            build_digest,
            members: members.clone(),
        };
        desired.push(DesiredObject {
            key,
            run: spec.state == RunState::Running,
            members,
            dependencies,
            start_first: template.start_first(),
            skip,
        });
        templates.push(template);
    }
    (desired, templates)
}

/// A connection to one Docker Engine, acting for one berth instance.
#[derive(Clone)]
pub struct DockerBackend {
    docker: Docker,
    instance: String,
}

impl DockerBackend {
    /// Connects through `DOCKER_HOST` or the local socket and agrees on an API version.
    pub async fn connect(instance: &str) -> Result<DockerBackend, EngineError> {
        let host = engine_host();
        let unreachable = |reason: String| EngineError::Unreachable {
            host: host.clone(),
            reason,
        };
        let docker = Docker::connect_with_defaults().map_err(|e| unreachable(e.to_string()))?;
        // The engine may be older than bollard's default API version: agree on one both speak.
        let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| unreachable("no answer within 10s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(DockerBackend {
            docker,
            instance: instance.to_string(),
        })
    }

    /// The instance this backend acts for.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn ownership_filter(&self, name: Option<&str>) -> HashMap<String, Vec<String>> {
        let mut labels = vec![
            format!("{LABEL_INSTANCE}={}", self.instance),
            format!("{LABEL_KIND}=Challenge"),
        ];
        if let Some(name) = name {
            labels.push(format!("{LABEL_NAME}={name}"));
        }
        HashMap::from([("label".to_string(), labels)])
    }

    async fn containers(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<ContainerSummary>, bollard::errors::Error> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(self.ownership_filter(name)),
            ..Default::default()
        };
        self.docker.list_containers(Some(options)).await
    }

    /// What this instance runs: one list call, grouped by challenge.
    pub async fn observe(&self) -> Result<Vec<ObservedObject>, EngineError> {
        let containers = self
            .containers(None)
            .await
            .map_err(|e| EngineError::Unreachable {
                host: engine_host(),
                reason: e.to_string(),
            })?;
        let mut objects: BTreeMap<ObjectRef, Vec<ObservedMember>> = BTreeMap::new();
        for container in &containers {
            let Some(member) = observed_member(container) else {
                continue;
            };
            let labels = container
                .labels
                .as_ref()
                .expect("observed_member checked labels");
            let Ok(name) = labels[LABEL_NAME].parse() else {
                continue;
            };
            objects
                .entry(ObjectRef {
                    kind: Kind::Challenge,
                    name,
                })
                .or_default()
                .push(member);
        }
        Ok(objects
            .into_iter()
            .map(|(key, members)| ObservedObject { key, members })
            .collect())
    }

    fn container_name(&self, key: &ObjectRef, member: &Member) -> String {
        format!(
            "berth-{}-{}-{}-{}",
            self.instance, key.name, member.slot, member.hash
        )
    }

    fn network_name(&self, key: &ObjectRef) -> String {
        format!("berth-{}-{}", self.instance, key.name)
    }

    fn labels(&self, template: &ChallengeTemplate, member: &Member) -> HashMap<String, String> {
        let mut labels: HashMap<String, String> = template.labels.clone().into_iter().collect();
        labels.insert(LABEL_INSTANCE.into(), self.instance.clone());
        labels.insert(LABEL_KIND.into(), "Challenge".into());
        labels.insert(LABEL_NAME.into(), template.key.name.to_string());
        labels.insert(LABEL_SLOT.into(), member.slot.clone());
        labels.insert(LABEL_SPEC_HASH.into(), member.hash.clone());
        labels.insert(LABEL_SPEC.into(), member.spec.to_string());
        labels
    }

    /// Makes the challenge match its template: image, network, then each slot's container,
    /// replacing changed ones the way `start_first` allows, and removing what is left over.
    /// Returns what was done.
    pub async fn converge(
        &self,
        template: &ChallengeTemplate,
        repo_root: &Path,
    ) -> Result<String, String> {
        let image = self.ensure_image(template, repo_root).await?;
        // A challenge gets a network of its own only when it has sidecars to reach by name: the
        // engine's default address pools hold about 30 networks, and a CTF runs more challenges.
        let network = match template.spec.sidecars.is_empty() {
            true => None,
            false => Some(self.ensure_network(template).await?),
        };
        let main_env = resolve_env(&template.spec.env, &template.spec.secret_env)?;
        let run = template.spec.state == RunState::Running;
        let existing = self
            .containers(Some(template.key.name.as_str()))
            .await
            .map_err(|e| e.to_string())?;
        let mut by_slot: BTreeMap<String, Vec<&ContainerSummary>> = BTreeMap::new();
        for container in &existing {
            let slot = container
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SLOT))
                .cloned()
                .unwrap_or_default();
            by_slot.entry(slot).or_default().push(container);
        }
        let mut done = Vec::new();
        for member in &template.members {
            let present = by_slot.remove(&member.slot).unwrap_or_default();
            let (current, old): (Vec<&ContainerSummary>, Vec<&ContainerSummary>) = present
                .into_iter()
                .partition(|c| label(c, LABEL_SPEC_HASH) == Some(member.hash.as_str()));
            if let Some(container) = current.first() {
                for duplicate in &current[1..] {
                    self.remove(duplicate).await?;
                }
                for stale in &old {
                    self.remove(stale).await?;
                }
                let running = matches!(container.state, Some(ContainerSummaryStateEnum::RUNNING));
                let name = container_name_of(container);
                if run && !running {
                    self.start(&name).await?;
                    done.push(format!("started {}", member.slot));
                } else if !run && running {
                    self.stop(&name).await?;
                    done.push(format!("stopped {}", member.slot));
                }
                continue;
            }
            let config = match member.slot.strip_prefix("sidecar-") {
                None => self.main_config(template, member, &image, network.as_deref(), &main_env),
                Some(name) => {
                    let sidecar = template
                        .spec
                        .sidecars
                        .iter()
                        .find(|s| s.name.as_str() == name)
                        .expect("slot from spec");
                    let network = network
                        .as_deref()
                        .expect("challenges with sidecars have a network");
                    self.sidecar_config(template, member, sidecar, network)?
                }
            };
            let start_first = template.start_first();
            if !start_first {
                for stale in &old {
                    self.remove(stale).await?;
                }
            }
            let name = self.container_name(&template.key, member);
            self.create(&name, config).await?;
            if run && let Err(error) = self.start(&name).await {
                // Leave nothing half-made: the next pass would otherwise see a stopped container
                // of the right template and merely try to start it again.
                let _ = self.remove_by_name(&name).await;
                return Err(error);
            }
            if start_first {
                for stale in &old {
                    self.remove(stale).await?;
                }
            }
            done.push(if old.is_empty() {
                format!("created {}", member.slot)
            } else {
                format!("replaced {}", member.slot)
            });
        }
        for (slot, leftovers) in by_slot {
            for container in leftovers {
                self.remove(container).await?;
            }
            done.push(format!("removed {slot}"));
        }
        Ok(done.join(", "))
    }

    /// Removes everything this instance made for the challenge: containers, network, built images.
    pub async fn delete(&self, key: &ObjectRef) -> Result<String, String> {
        let existing = self
            .containers(Some(key.name.as_str()))
            .await
            .map_err(|e| e.to_string())?;
        for container in &existing {
            self.remove(container).await?;
        }
        match self.docker.remove_network(&self.network_name(key)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(error) => {
                return Err(format!(
                    "cannot remove network {}: {}",
                    self.network_name(key),
                    engine_message(&error)
                ));
            }
        }
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_INSTANCE}={}", self.instance),
                format!("{LABEL_NAME}={}", key.name),
            ],
        )]);
        let images = self
            .docker
            .list_images(Some(ListImagesOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| e.to_string())?;
        for image in images {
            let options = RemoveImageOptions {
                force: true,
                ..Default::default()
            };
            let _ = self
                .docker
                .remove_image(&image.id, Some(options), None)
                .await;
        }
        Ok(format!("removed {} container(s)", existing.len()))
    }

    async fn ensure_image(
        &self,
        template: &ChallengeTemplate,
        repo_root: &Path,
    ) -> Result<String, String> {
        match (&template.spec.image, &template.spec.build) {
            (Some(ImageSource::Name(name)), _) => {
                if self.docker.inspect_image(name).await.is_ok() {
                    return Ok(name.clone());
                }
                let options = CreateImageOptions {
                    from_image: Some(name.clone()),
                    ..Default::default()
                };
                let mut pull = self.docker.create_image(Some(options), None, None);
                while let Some(progress) = pull.next().await {
                    let progress = progress
                        .map_err(|e| format!("cannot pull image {name}: {}", engine_message(&e)))?;
                    if let Some(detail) = progress.error_detail {
                        return Err(format!(
                            "cannot pull image {name}: {}",
                            detail.message.unwrap_or_default()
                        ));
                    }
                }
                Ok(name.clone())
            }
            (Some(ImageSource::FromPipeline(from)), _) => Err(format!(
                "the image comes from Pipeline/{}, which has no backend yet",
                from.from_pipeline
            )),
            (None, Some(build)) => {
                let digest = template.build_digest.clone().unwrap_or_default();
                let tag = format!(
                    "berth-{}-{}:{}",
                    self.instance,
                    template.key.name,
                    &digest[..digest.len().min(16)]
                );
                if self.docker.inspect_image(&tag).await.is_ok() {
                    return Ok(tag);
                }
                let context_dir: PathBuf = repo_root.join(&build.context);
                let tar = BuildContext::read(&context_dir, &build.dockerfile)
                    .and_then(|c| c.tar())
                    .map_err(|e| format!("cannot read build context {}: {e}", build.context))?;
                let labels = HashMap::from([
                    (LABEL_INSTANCE.to_string(), self.instance.clone()),
                    (LABEL_KIND.to_string(), "Challenge".to_string()),
                    (LABEL_NAME.to_string(), template.key.name.to_string()),
                    (
                        LABEL_SPEC_HASH.to_string(),
                        template.main_hash().to_string(),
                    ),
                ]);
                let options = BuildImageOptions {
                    dockerfile: build.dockerfile.clone(),
                    t: Some(tag.clone()),
                    buildargs: Some(build.args.clone().into_iter().collect()),
                    labels: Some(labels),
                    rm: true,
                    forcerm: true,
                    ..Default::default()
                };
                let mut output =
                    self.docker
                        .build_image(options, None, Some(bollard::body_full(tar.into())));
                let mut log: Vec<String> = Vec::new();
                while let Some(item) = output.next().await {
                    let failed = |reason: String, log: &[String]| {
                        let tail: Vec<&str> = log
                            .iter()
                            .rev()
                            .take(3)
                            .rev()
                            .map(|l| l.trim())
                            .filter(|l| !l.is_empty())
                            .collect();
                        format!(
                            "build of {} failed: {reason}{}",
                            build.context,
                            if tail.is_empty() {
                                String::new()
                            } else {
                                format!(" (after: {})", tail.join(" | "))
                            }
                        )
                    };
                    let info = item.map_err(|e| failed(engine_message(&e), &log))?;
                    if let Some(detail) = info.error_detail {
                        return Err(failed(detail.message.unwrap_or_default(), &log));
                    }
                    if let Some(line) = info.stream {
                        log.push(line);
                    }
                }
                Ok(tag)
            }
            (None, None) => Err("no image and no build".into()),
        }
    }

    async fn ensure_network(&self, template: &ChallengeTemplate) -> Result<String, String> {
        let name = self.network_name(&template.key);
        if self
            .docker
            .inspect_network(
                &name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
            .is_ok()
        {
            return Ok(name);
        }
        let labels = HashMap::from([
            (LABEL_INSTANCE.to_string(), self.instance.clone()),
            (LABEL_KIND.to_string(), "Challenge".to_string()),
            (LABEL_NAME.to_string(), template.key.name.to_string()),
            (
                LABEL_SPEC_HASH.to_string(),
                template.main_hash().to_string(),
            ),
        ]);
        let request = NetworkCreateRequest {
            name: name.clone(),
            labels: Some(labels),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(name),
            // Made by a concurrent or interrupted pass: it is ours by name and label.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(name),
            Err(error) => Err(format!(
                "cannot create network {name}: {}",
                engine_message(&error)
            )),
        }
    }

    fn main_config(
        &self,
        template: &ChallengeTemplate,
        member: &Member,
        image: &str,
        network: Option<&str>,
        env: &[String],
    ) -> ContainerCreateBody {
        let spec = &template.spec;
        let exposed: Vec<String> = spec
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.container, p.protocol.as_str()))
            .collect();
        let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        for port in &spec.ports {
            if let Some(host) = port.host {
                bindings
                    .entry(format!("{}/{}", port.container, port.protocol.as_str()))
                    .or_default()
                    .get_or_insert_default()
                    .push(PortBinding {
                        host_ip: None,
                        host_port: Some(host.to_string()),
                    });
            }
        }
        let healthcheck = spec.healthcheck.as_ref().map(|check| {
            let probe = match (&check.tcp, &check.http) {
                (Some(port), _) => {
                    format!("nc -w 1 127.0.0.1 {port} </dev/null >/dev/null 2>&1 || exit 1")
                }
                (None, Some(http)) => format!(
                    "wget -q -O /dev/null http://127.0.0.1:{}{} || exit 1",
                    http.port, http.path
                ),
                (None, None) => "true".into(),
            };
            HealthConfig {
                test: Some(vec!["CMD-SHELL".into(), probe]),
                interval: Some(check.interval.0.as_nanos() as i64),
                timeout: Some(check.timeout.0.as_nanos() as i64),
                retries: Some(i64::from(check.retries)),
                // Check early and often while starting, so `apply --wait` sees health quickly.
                start_period: Some(check.interval.0.as_nanos() as i64),
                start_interval: None,
            }
        });
        let mut host_config = resource_limits(spec.resources.as_ref());
        host_config.port_bindings = Some(bindings);
        host_config.network_mode = Some(network.unwrap_or("bridge").to_string());
        host_config.restart_policy = Some(restart_policy(spec.restart));
        ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: spec.command.clone(),
            entrypoint: spec.entrypoint.clone(),
            env: Some(env.to_vec()),
            labels: Some(self.labels(template, member)),
            exposed_ports: Some(exposed),
            healthcheck,
            host_config: Some(host_config),
            networking_config: network
                .map(|network| network_aliases(network, template.key.name.as_str())),
            ..Default::default()
        }
    }

    fn sidecar_config(
        &self,
        template: &ChallengeTemplate,
        member: &Member,
        sidecar: &Sidecar,
        network: &str,
    ) -> Result<ContainerCreateBody, String> {
        let env = resolve_env(&sidecar.env, &sidecar.secret_env)?;
        let mut host_config = resource_limits(sidecar.resources.as_ref());
        host_config.network_mode = Some(network.to_string());
        host_config.restart_policy = Some(restart_policy(RestartPolicy::UnlessStopped));
        Ok(ContainerCreateBody {
            image: Some(sidecar.image.clone()),
            cmd: sidecar.command.clone(),
            entrypoint: sidecar.entrypoint.clone(),
            env: Some(env),
            labels: Some(self.labels(template, member)),
            host_config: Some(host_config),
            networking_config: Some(network_aliases(network, sidecar.name.as_str())),
            ..Default::default()
        })
    }

    async fn create(&self, name: &str, config: ContainerCreateBody) -> Result<(), String> {
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        match self.docker.create_container(Some(options), config).await {
            Ok(_) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message,
            }) => Err(format!("cannot create {name}: image not found ({message})")),
            Err(error) => Err(format!("cannot create {name}: {}", engine_message(&error))),
        }
    }

    async fn start(&self, name: &str) -> Result<(), String> {
        self.docker
            .start_container(
                name,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(|e| format!("cannot start {name}: {}", engine_message(&e)))
    }

    async fn stop(&self, name: &str) -> Result<(), String> {
        let options = StopContainerOptions {
            t: Some(10),
            ..Default::default()
        };
        self.docker
            .stop_container(name, Some(options))
            .await
            .map_err(|e| format!("cannot stop {name}: {}", engine_message(&e)))
    }

    async fn remove(&self, container: &ContainerSummary) -> Result<(), String> {
        self.remove_by_name(&container_name_of(container)).await
    }

    async fn remove_by_name(&self, name: &str) -> Result<(), String> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match self.docker.remove_container(name, Some(options)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(error) => Err(format!("cannot remove {name}: {}", engine_message(&error))),
        }
    }

    /// Waits until every listed challenge is healthy, or `limit` passes. Returns, per challenge
    /// that did not get there, why.
    pub async fn wait_healthy(
        &self,
        keys: &[ObjectRef],
        limit: Duration,
    ) -> BTreeMap<ObjectRef, String> {
        let deadline = Instant::now() + limit;
        loop {
            let mut pending = BTreeMap::new();
            match self.observe().await {
                Ok(observed) => {
                    let by_key: HashMap<&ObjectRef, &ObservedObject> =
                        observed.iter().map(|o| (&o.key, o)).collect();
                    for key in keys {
                        let Some(object) = by_key.get(key) else {
                            pending.insert(key.clone(), "no containers".to_string());
                            continue;
                        };
                        let unwell: Vec<String> = object
                            .members
                            .iter()
                            .filter(|m| m.health != Health::Healthy)
                            .map(|m| format!("{} is {:?}", m.slot, m.health))
                            .collect();
                        if !unwell.is_empty() {
                            pending.insert(key.clone(), unwell.join(", "));
                        }
                    }
                }
                Err(error) => {
                    for key in keys {
                        pending.insert(key.clone(), error.to_string());
                    }
                }
            }
            if pending.is_empty() || Instant::now() >= deadline {
                return pending
                    .into_iter()
                    .map(|(key, why)| {
                        (
                            key,
                            format!("not healthy after {}s: {why}", limit.as_secs()),
                        )
                    })
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Where berth looks for the engine: `DOCKER_HOST`, or the local socket.
fn engine_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
}

fn label<'a>(container: &'a ContainerSummary, name: &str) -> Option<&'a str> {
    container.labels.as_ref()?.get(name).map(String::as_str)
}

fn container_name_of(container: &ContainerSummary) -> String {
    container
        .names
        .as_ref()
        .and_then(|names| names.first())
        .map(|name| name.trim_start_matches('/').to_string())
        .or_else(|| container.id.clone())
        .unwrap_or_default()
}

fn observed_member(container: &ContainerSummary) -> Option<ObservedMember> {
    let labels = container.labels.as_ref()?;
    labels.get(LABEL_NAME)?;
    let running = matches!(container.state, Some(ContainerSummaryStateEnum::RUNNING));
    Some(ObservedMember {
        name: container_name_of(container),
        slot: labels.get(LABEL_SLOT)?.clone(),
        hash: labels.get(LABEL_SPEC_HASH)?.clone(),
        spec: labels
            .get(LABEL_SPEC)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null),
        running,
        health: health_of(
            container.state.as_ref(),
            container.status.as_deref().unwrap_or_default(),
        ),
    })
}

/// Docker's state and status text (`Up 5 seconds (healthy)`) as berth's health. The list call's
/// status text is read rather than inspecting each container, so observing stays one call.
pub fn health_of(state: Option<&ContainerSummaryStateEnum>, status: &str) -> Health {
    match state {
        Some(ContainerSummaryStateEnum::RUNNING) => {
            if status.contains("(unhealthy)") {
                Health::Degraded
            } else if status.contains("(health: starting)") {
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

fn resolve_env(
    env: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, SecretRef>,
) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for (name, reference) in secrets {
        let value = reference
            .resolve()
            .map_err(|e| format!("secret {name}: {e}"))?;
        out.push(format!("{name}={value}"));
    }
    Ok(out)
}

fn resource_limits(resources: Option<&crate::descriptor::model::Resources>) -> HostConfig {
    let mut config = HostConfig::default();
    if let Some(resources) = resources {
        config.nano_cpus = resources.cpus.map(|cpus| (cpus * 1e9) as i64);
        config.memory = resources.memory.map(|m| m.bytes as i64);
        config.pids_limit = resources.pids;
    }
    config
}

fn restart_policy(policy: RestartPolicy) -> DockerRestart {
    let name = match policy {
        RestartPolicy::No => RestartPolicyNameEnum::NO,
        RestartPolicy::Always => RestartPolicyNameEnum::ALWAYS,
        RestartPolicy::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
        RestartPolicy::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
    };
    DockerRestart {
        name: Some(name),
        maximum_retry_count: None,
    }
}

fn network_aliases(network: &str, alias: &str) -> NetworkingConfig {
    let endpoint = EndpointSettings {
        aliases: Some(vec![alias.to_string()]),
        ..Default::default()
    };
    NetworkingConfig {
        endpoints_config: Some(HashMap::from([(network.to_string(), endpoint)])),
    }
}

/// The engine's own words for an error, without bollard's wrapping.
fn engine_message(error: &bollard::errors::Error) -> String {
    match error {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_state_and_status() {
        use ContainerSummaryStateEnum as S;
        assert_eq!(
            health_of(Some(&S::RUNNING), "Up 3 seconds"),
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
}
