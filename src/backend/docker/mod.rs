//! The Docker backend: Challenges as containers on a Docker Engine, through its API (bollard).
//!
//! A challenge with sidecars gets a network of its own, where its containers reach each other by
//! name; one without runs on the engine's default bridge, as `docker run` does.
//!
//! It owns the translation of a Challenge into container templates (pure, [`desired_object`]),
//! observing what this berth instance runs (one list call, by label), converging one object at a
//! time, and the instance's apply lock and secret-digest key, both kept in the engine itself so
//! that berths on other hosts driving the same engine see them. It never touches a container,
//! network or image without the `berth.instance` label of its own instance, and every name it
//! makes is derived from the instance, the object, the slot and the template's hash, so a pass
//! killed at any point and run again converges without duplicates.
//!
//! Everything that can fail is prepared before an old container is touched, and an update whose
//! new container cannot start restarts the old one: a failed update leaves the old version running.

pub mod run;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerSummary, ContainerSummaryStateEnum, EndpointSettings,
    HealthConfig, HostConfig, NetworkCreateRequest, NetworkingConfig, PortBinding,
    RestartPolicy as DockerRestart, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, CreateImageOptions, InspectContainerOptions,
    ListContainersOptions, ListImagesOptions, ListNetworksOptions, LogsOptions,
    RemoveContainerOptions, RemoveImageOptions, StopContainerOptions,
};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{EngineError, LABEL_INSTANCE, LABEL_NAME, LABEL_SPEC_HASH, Ownership};
use crate::apply::Outcome;
use crate::build_context::BuildContext;
use crate::descriptor::model::{ChallengeSpec, ImageSource, RestartPolicy, RunState, Sidecar};
use crate::descriptor::values::SecretRef;
use crate::descriptor::{Descriptor, Kind, ObjectRef, Spec};
use crate::plan::{
    DesiredObject, Health, ObservedObject, ObservedPart, Part, PartState, TargetState, UNREADABLE,
    Vocabulary,
};

/// The kinds this backend serves.
pub const KINDS: &[Kind] = &[Kind::Challenge, Kind::Pipeline];

/// Label naming the container's slot (`main-1`, `sidecar-db`).
pub const LABEL_SLOT: &str = "berth.slot";
/// Label with the container's template as JSON (secrets only as references).
pub const LABEL_SPEC: &str = "berth.spec";
/// Label with keyed digests of the container's secret values, by name (see [`secret_digest`]).
pub const LABEL_SECRETS: &str = "berth.secret-digests";
/// Label on the lock container naming its holder (`host:pid`).
const LABEL_LOCK_HOLDER: &str = "berth.lock-holder";
/// Label on the lock container identifying its holder's process (see [`process_identity`]).
const LABEL_LOCK_PROCESS: &str = "berth.lock-process";
/// Label on the lock container with when it was taken.
const LABEL_LOCK_SINCE: &str = "berth.lock-since";
/// Label on the key container holding the instance's secret-digest key.
const LABEL_DIGEST_KEY: &str = "berth.digest-key";
/// A tiny image (one file, never run) that lock and key containers are made from: a container
/// name is the one thing the engine creates exclusively.
const ANCHOR_IMAGE: &str = "berth-anchor:1";

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
    pub parts: Vec<Part>,
}

impl ChallengeTemplate {
    fn main_hash(&self) -> &str {
        &self.parts[0].hash
    }

    /// Whether new containers may start before old ones stop: only when nothing is published on
    /// a host port, which two containers cannot hold at once.
    pub fn start_first(&self) -> bool {
        self.spec.ports.iter().all(|p| p.host.is_none())
    }

    /// The secret references of a slot.
    fn secrets_of(&self, slot: &str) -> &BTreeMap<String, SecretRef> {
        match slot.strip_prefix("sidecar-") {
            None => &self.spec.secret_env,
            Some(name) => self
                .spec
                .sidecars
                .iter()
                .find(|s| s.name.as_str() == name)
                .map_or(&self.spec.secret_env, |s| &s.secret_env),
        }
    }
}

fn short_hash(value: &Value) -> String {
    let digest = Sha256::digest(serde_json::to_vec(value).expect("json serializes"));
    hex::encode(&digest[..8])
}

/// Translates a Challenge into its desired object and the template to build it. Pure: no engine,
/// no file system (build digests come from the loader). `None` for other kinds.
pub fn desired_object(descriptor: &Descriptor) -> Option<(DesiredObject, ChallengeTemplate)> {
    let Spec::Challenge(spec) = &descriptor.spec else {
        return None;
    };
    let key = descriptor.key();
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
    let one_shot = matches!(spec.restart, RestartPolicy::No | RestartPolicy::OnFailure);
    if one_shot {
        // The engine cannot tell a one-shot berth stopped from one that finished, so a one-shot's
        // state is part of its template: switching it makes a new container (run, or only made),
        // never a restart of an exited one.
        main_object.insert("state".into(), json!(spec.state));
    }
    let main_hash = short_hash(&main);
    let main = std::sync::Arc::new(main);
    let mut parts: Vec<Part> = (1..=spec.replicas)
        .map(|replica| Part {
            id: format!("main-{replica}"),
            hash: main_hash.clone(),
            spec: main.clone(),
            secrets: None,
            one_shot,
        })
        .collect();
    for sidecar in &spec.sidecars {
        let mut sidecar_spec = serde_json::to_value(sidecar).expect("sidecars serialize");
        if !descriptor.metadata.labels.is_empty() {
            sidecar_spec["labels"] = json!(descriptor.metadata.labels);
        }
        parts.push(Part {
            id: format!("sidecar-{}", sidecar.name),
            hash: short_hash(&sidecar_spec),
            spec: sidecar_spec.into(),
            secrets: None,
            one_shot: false,
        });
    }
    let template = ChallengeTemplate {
        key: key.clone(),
        spec: spec.clone(),
        labels: descriptor.metadata.labels.clone(),
        build_digest,
        parts: parts.clone(),
    };
    let object = DesiredObject {
        key,
        engine: crate::plan::Engine::Docker,
        target: match spec.state {
            RunState::Running => TargetState::Running,
            RunState::Stopped => TargetState::Stopped,
        },
        parts,
        dependencies: descriptor.dependencies(),
        start_first: template.start_first(),
        hold: None,
        words: Vocabulary::CONTAINER,
        ttl: None,
        ready_timeout: None,
    };
    Some((object, template))
}

/// The label a kubelet on a Docker Engine puts on the containers of its pods.
const KUBELET_POD_LABEL: &str = "io.kubernetes.pod.name";

/// What went wrong with one engine call: the engine gone (transient), or this object (failed).
enum Trouble {
    Transient(String),
    Failed(String),
}

impl From<Trouble> for Outcome {
    fn from(trouble: Trouble) -> Outcome {
        match trouble {
            Trouble::Transient(why) => Outcome::Transient(why),
            Trouble::Failed(why) => Outcome::Failed(why),
        }
    }
}

type Attempt<T> = Result<T, Trouble>;

/// Whether the error means the engine did not answer, rather than answered "no".
fn engine_gone(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::IOError { .. }
            | DockerError::HyperResponseError { .. }
            | DockerError::HyperLegacyError { .. }
            | DockerError::HttpClientError { .. }
            | DockerError::RequestTimeoutError
            | DockerError::SocketNotFoundError(_)
    )
}

/// The engine's own words for an error, without bollard's wrapping.
fn engine_message(error: &DockerError) -> String {
    match error {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        DockerError::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

fn is_status(error: &DockerError, code: u16) -> bool {
    matches!(error, DockerError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

/// Where berth looks for the engine: `DOCKER_HOST`, or the local socket.
fn engine_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
}

fn unreachable(reason: String) -> EngineError {
    EngineError::Unreachable {
        engine: "the Docker Engine",
        host: engine_host(),
        reason,
        hint: "Set DOCKER_HOST to point berth at it.",
    }
}

/// A keyed digest of one secret value: reveals nothing about the value to anyone without the
/// key (a plain hash of a short flag could be brute-forced from the status branch).
pub fn secret_digest(key: &[u8], name: &str, value: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(name.as_bytes());
    mac.update(&[0]);
    mac.update(value.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..12])
}

/// The lock an apply holds in the engine; remove it with [`ApplyLock::release`] (or on drop).
/// It is removed by the id of the container this berth made, never by name: by then the name may
/// belong to another berth's lock.
pub struct ApplyLock {
    docker: Docker,
    id: String,
    released: bool,
}

impl ApplyLock {
    /// Removes the lock from the engine.
    pub async fn release(mut self) {
        self.released = true;
        let _ = remove_container(&self.docker, &self.id).await;
    }
}

impl Drop for ApplyLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (docker, id) = (self.docker.clone(), self.id.clone());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = remove_container(&docker, &id).await;
            });
        }
    }
}

async fn remove_container(docker: &Docker, name: &str) -> Result<(), DockerError> {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    match docker.remove_container(name, Some(options)).await {
        Err(error) if is_status(&error, 404) => Ok(()),
        other => other,
    }
}

/// `host:pid` of this process, as lock holders are named.
fn this_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

/// When process `pid` of this pid namespace started (clock ticks since boot), if it runs.
fn process_start(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; the fields after it do not.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19).map(str::to_string)
}

/// `boot/pid-namespace/pid/start` of process `pid`: what tells a process apart from every other
/// one, on any machine (a host name does not: `localhost` and `ubuntu` repeat) and in any
/// container (pids repeat across pid namespaces), even once its pid is reused.
fn process_identity(pid: u32) -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let namespace = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let namespace = namespace
        .to_str()?
        .strip_prefix("pid:[")?
        .strip_suffix(']')?;
    let start = process_start(pid)?;
    Some(format!("{}/{namespace}/{pid}/{start}", boot.trim()))
}

/// Whether a lock's holder, by its `process` label ([`process_identity`]), is a process that has
/// died (kill -9 mid-apply). Only a process of this boot and pid namespace can be known dead; a
/// lock without the label (made by someone else) never is.
fn holder_is_dead(process: Option<&str>) -> bool {
    let fields = |identity: &str| -> Option<[String; 4]> {
        let parts: Vec<String> = identity.split('/').map(str::to_string).collect();
        parts.try_into().ok()
    };
    let (Some([boot, namespace, pid, start]), Some([this_boot, this_namespace, ..])) = (
        process.and_then(fields),
        process_identity(std::process::id())
            .as_deref()
            .and_then(fields),
    ) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    boot == this_boot
        && namespace == this_namespace
        && process_start(pid).is_none_or(|now| now != start)
}

/// A connection to one Docker Engine, acting for one berth instance.
#[derive(Clone)]
pub struct DockerBackend {
    docker: Docker,
    ownership: Ownership,
    digest_key: std::sync::Arc<std::sync::OnceLock<Vec<u8>>>,
}

impl DockerBackend {
    /// Connects through `DOCKER_HOST` or the local socket and agrees on an API version.
    pub async fn connect(ownership: &Ownership) -> Result<DockerBackend, EngineError> {
        let docker = Docker::connect_with_defaults().map_err(|e| unreachable(e.to_string()))?;
        // The engine may be older than bollard's default API version: agree on one both speak.
        let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| unreachable("no answer within 10s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(DockerBackend {
            docker,
            ownership: ownership.clone(),
            digest_key: Default::default(),
        })
    }

    fn instance(&self) -> &str {
        self.ownership.instance()
    }

    fn trouble(&self, what: &str, error: DockerError) -> Trouble {
        if engine_gone(&error) {
            Trouble::Transient(unreachable(format!("{what}: {error}")).to_string())
        } else {
            Trouble::Failed(format!("{what}: {}", engine_message(&error)))
        }
    }

    async fn containers(&self, name: Option<&str>) -> Result<Vec<ContainerSummary>, DockerError> {
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
        let containers = self
            .containers(None)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut objects: BTreeMap<ObjectRef, Vec<ObservedPart>> = BTreeMap::new();
        for container in &containers {
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
            })
            .collect();
        observed.extend(
            self.observe_products()
                .await
                .map_err(|e| unreachable(e.to_string()))?,
        );
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
    }

    /// `exited with code 1; last log lines: …` for one container, in the engine's words, and
    /// whether the engine has restarted it. What the container wrote is masked: a challenge that
    /// prints its flag as it crashes must not put the flag in the status branch.
    async fn explain(&self, container: &str) -> Option<(String, bool)> {
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

    /// The instance's secret-digest key, made once and kept in the engine (a label of a container
    /// that never runs), so every berth driving this engine for the instance digests alike. Anyone
    /// who can read it can already read the containers' environment, where the secrets are. With
    /// `make` unset (planning), a missing key is `None`: a plan writes nothing. A key can go
    /// missing after containers carry digests made with it (`docker container prune`); [`seal`]
    /// then marks their digests unknown, so they are replaced rather than called unchanged.
    ///
    /// [`seal`]: DockerBackend::seal
    async fn digest_key(&self, make: bool) -> Result<Option<Vec<u8>>, EngineError> {
        if let Some(key) = self.digest_key.get() {
            return Ok(Some(key.clone()));
        }
        let name = format!("berth-{}-key", self.instance());
        loop {
            match self
                .docker
                .inspect_container(&name, None::<InspectContainerOptions>)
                .await
            {
                Ok(container) => {
                    let key = container
                        .config
                        .and_then(|c| c.labels)
                        .and_then(|l| l.get(LABEL_DIGEST_KEY).cloned())
                        .and_then(|k| hex::decode(k).ok());
                    match key {
                        Some(key) if key.len() >= 16 => {
                            let _ = self.digest_key.set(key.clone());
                            return Ok(Some(key));
                        }
                        // Not a key berth made: replace it.
                        _ if make => remove_container(&self.docker, &name)
                            .await
                            .map_err(|e| unreachable(e.to_string()))?,
                        _ => return Ok(None),
                    }
                }
                Err(error) if is_status(&error, 404) && !make => return Ok(None),
                Err(error) if is_status(&error, 404) => {
                    let key = super::random_bytes().map_err(|e| unreachable(e.to_string()))?;
                    let mut labels = self.ownership.instance_labels();
                    labels.insert(LABEL_DIGEST_KEY.to_string(), hex::encode(key));
                    // Two berths may race here: the engine keeps one, and both then read it.
                    match self.create_anchored(&name, labels).await {
                        Ok(_) => {}
                        Err(error) if is_status(&error, 409) => {}
                        Err(error) => return Err(unreachable(engine_message(&error))),
                    }
                }
                Err(error) => return Err(unreachable(engine_message(&error))),
            }
        }
    }

    /// Records on `object`'s parts the keyed digests of their secret values. A secret that cannot
    /// be read leaves the digests unknown; applying then fails with the reason.
    pub async fn seal(
        &self,
        template: &ChallengeTemplate,
        object: &mut DesiredObject,
    ) -> Result<(), EngineError> {
        let needs_key = object
            .parts
            .iter()
            .any(|p| !template.secrets_of(&p.id).is_empty());
        let key = match needs_key {
            true => self.digest_key(false).await?,
            false => Some(Vec::new()),
        };
        for part in &mut object.parts {
            let secrets = template.secrets_of(&part.id);
            part.secrets = match &key {
                // A secret that cannot be read (its file removed, its variable unset) must not
                // pass as unchanged: its digest says why, so the plan shows an update that fails
                // with the reason and leaves the running container as it is.
                Some(key) => Some(
                    secrets
                        .iter()
                        .map(|(name, reference)| {
                            let digest = match reference.resolve() {
                                Ok(value) => secret_digest(key, name, &value),
                                Err(why) => format!("{UNREADABLE}secret {name}: {why}"),
                            };
                            (name.clone(), digest)
                        })
                        .collect(),
                ),
                // The key is gone (`docker container prune` removes never-run containers), so no
                // digest can be checked: unknown ones differ from any a container carries, and
                // the part is replaced with the current values rather than called unchanged.
                None => Some(
                    secrets
                        .keys()
                        .map(|name| (name.clone(), "unknown: no digest key".to_string()))
                        .collect(),
                ),
            };
        }
        Ok(())
    }

    /// Makes a container that never runs from the anchor image: the engine creates a container
    /// name exactly once, which makes it a lock or a key holder. Returns the container's id.
    async fn create_anchored(
        &self,
        name: &str,
        labels: HashMap<String, String>,
    ) -> Result<String, DockerError> {
        self.ensure_anchor().await?;
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(ANCHOR_IMAGE.into()),
            cmd: Some(vec!["/berth-anchor".into()]),
            labels: Some(labels),
            network_disabled: Some(true),
            ..Default::default()
        };
        self.docker
            .create_container(Some(options), body)
            .await
            .map(|created| created.id)
    }

    async fn ensure_anchor(&self) -> Result<(), DockerError> {
        match self.docker.inspect_image(ANCHOR_IMAGE).await {
            Ok(_) => return Ok(()),
            Err(error) if !is_status(&error, 404) => return Err(error),
            Err(_) => {}
        }
        let mut tar = tar::Builder::new(Vec::new());
        let text = b"berth: lock and key holder; never run\n";
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "berth-anchor", &text[..])
            .map_err(|source| DockerError::IOError { err: source })?;
        let tar = tar
            .into_inner()
            .map_err(|source| DockerError::IOError { err: source })?;
        let (repo, tag) = ANCHOR_IMAGE.split_once(':').expect("name:tag");
        let options = CreateImageOptions {
            from_src: Some("-".into()),
            repo: Some(repo.into()),
            tag: Some(tag.into()),
            ..Default::default()
        };
        let mut import =
            self.docker
                .create_image(Some(options), Some(bollard::body_full(tar.into())), None);
        while let Some(progress) = import.next().await {
            progress?;
        }
        Ok(())
    }

    /// Takes the instance's apply lock in the engine, waiting up to `wait` for another holder. A
    /// lock left by a dead process of this host (kill -9) is taken over at once.
    pub async fn lock(&self, wait: Duration) -> Result<ApplyLock, EngineError> {
        let name = format!("berth-{}-lock", self.instance());
        let started = Instant::now();
        let holder = this_holder();
        let process = process_identity(std::process::id());
        let mut announced = false;
        loop {
            let mut labels = self.ownership.instance_labels();
            labels.insert(LABEL_LOCK_HOLDER.to_string(), holder.clone());
            if let Some(process) = &process {
                labels.insert(LABEL_LOCK_PROCESS.to_string(), process.clone());
            }
            labels.insert(
                LABEL_LOCK_SINCE.to_string(),
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            );
            match self.create_anchored(&name, labels).await {
                Ok(id) => {
                    return Ok(ApplyLock {
                        docker: self.docker.clone(),
                        id,
                        released: false,
                    });
                }
                Err(error) if is_status(&error, 409) => {}
                Err(error) => return Err(unreachable(engine_message(&error))),
            }
            let found = self
                .docker
                .inspect_container(&name, None::<InspectContainerOptions>)
                .await
                .ok();
            let found_id = found.as_ref().and_then(|c| c.id.clone());
            let labels = found
                .and_then(|c| c.config)
                .and_then(|c| c.labels)
                .unwrap_or_default();
            let other = labels.get(LABEL_LOCK_HOLDER).cloned().unwrap_or_default();
            if let (true, Some(dead)) = (
                holder_is_dead(labels.get(LABEL_LOCK_PROCESS).map(String::as_str)),
                found_id,
            ) {
                tracing::warn!(holder = %other, "taking over the apply lock of a process that died");
                // By id: another berth may have taken the name over since it was read.
                remove_container(&self.docker, &dead)
                    .await
                    .map_err(|e| unreachable(engine_message(&e)))?;
                continue;
            }
            if started.elapsed() >= wait {
                return Err(EngineError::Locked {
                    instance: self.instance().to_string(),
                    holder: other,
                    since: labels.get(LABEL_LOCK_SINCE).cloned().unwrap_or_default(),
                    waited: started.elapsed().as_secs(),
                    lock: name,
                });
            }
            if !announced {
                announced = true;
                tracing::info!(holder = %other, "another berth is applying; waiting for it");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn container_name(&self, key: &ObjectRef, part: &Part, version: &str) -> String {
        format!(
            "berth-{}-{}-{}-{version}",
            self.instance(),
            key.name,
            part.id
        )
    }

    fn network_name(&self, key: &ObjectRef) -> String {
        format!("berth-{}-{}", self.instance(), key.name)
    }

    fn labels(
        &self,
        template: &ChallengeTemplate,
        part: &Part,
        secrets: &BTreeMap<String, String>,
    ) -> HashMap<String, String> {
        let mut labels = self
            .ownership
            .labels_over(&template.labels, &template.key, &part.hash);
        labels.insert(LABEL_SLOT.into(), part.id.clone());
        labels.insert(LABEL_SPEC.into(), part.spec.to_string());
        if !secrets.is_empty() {
            labels.insert(
                LABEL_SECRETS.into(),
                serde_json::to_string(secrets).expect("digests serialize"),
            );
        }
        labels
    }

    /// Makes the challenge match its template: image, network, then each slot's container,
    /// replacing changed ones the way `start_first` allows, and removing what is left over.
    pub async fn converge(&self, template: &ChallengeTemplate, repo_root: &Path) -> Outcome {
        match self.try_converge(template, repo_root).await {
            Ok(mut done) => {
                // Each change of a build context makes an image: keep the newest few (a quick
                // way back) and the one running, so months of changes do not fill the disk.
                if template.spec.build.is_some() {
                    let removed = self
                        .collect_products(&template.key, run::KEEP_PRODUCTS)
                        .await;
                    if removed > 0 {
                        done.push_str(&format!("; {removed} older build(s) removed"));
                    }
                }
                Outcome::Done(done)
            }
            Err(trouble) => trouble.into(),
        }
    }

    async fn try_converge(
        &self,
        template: &ChallengeTemplate,
        repo_root: &Path,
    ) -> Attempt<String> {
        // Everything that can fail is prepared before any container is touched.
        let image = self.ensure_image(template, repo_root).await?;
        // A challenge gets a network of its own only when it has sidecars to reach by name: the
        // engine's default address pools hold about 30 networks, and a CTF runs more challenges.
        let network = match template.spec.sidecars.is_empty() {
            true => None,
            false => Some(self.ensure_network(&template.key).await?),
        };
        let key = match template
            .parts
            .iter()
            .any(|p| !template.secrets_of(&p.id).is_empty())
        {
            true => self
                .digest_key(true)
                .await
                .map_err(|e| Trouble::Transient(e.to_string()))?
                .unwrap_or_default(),
            false => Vec::new(),
        };
        let run = template.spec.state == RunState::Running;
        let existing = self
            .containers(Some(template.key.name.as_str()))
            .await
            .map_err(|e| self.trouble("cannot list containers", e))?;
        let mut by_slot: BTreeMap<String, Vec<&ContainerSummary>> = BTreeMap::new();
        for container in &existing {
            let slot = label(container, LABEL_SLOT).unwrap_or_default().to_string();
            by_slot.entry(slot).or_default().push(container);
        }
        let mut done = Vec::new();
        for part in &template.parts {
            let secrets = template.secrets_of(&part.id);
            let env_values = resolve_secrets(secrets).map_err(Trouble::Failed)?;
            let digests: BTreeMap<String, String> = env_values
                .iter()
                .map(|(name, value)| (name.clone(), secret_digest(&key, name, value)))
                .collect();
            let present = by_slot.remove(&part.id).unwrap_or_default();
            let wanted_digests = (!digests.is_empty())
                .then(|| serde_json::to_string(&digests).expect("digests serialize"));
            let (current, old): (Vec<&ContainerSummary>, Vec<&ContainerSummary>) =
                present.into_iter().partition(|c| {
                    label(c, LABEL_SPEC_HASH) == Some(part.hash.as_str())
                        && label(c, LABEL_SECRETS) == wanted_digests.as_deref()
                });
            if let Some(container) = current.first() {
                for stale in current[1..].iter().chain(&old) {
                    self.remove(stale).await?;
                }
                let name = container_name_of(container);
                // An exited one-shot is `Completed`, not `Stopped`: it is done, not started again.
                match (run, container_state(container)) {
                    (true, PartState::Stopped) => {
                        self.start(&name).await?;
                        done.push(format!("started {}", part.id));
                    }
                    (false, PartState::Running) => {
                        self.stop(&name).await?;
                        done.push(format!("stopped {}", part.id));
                    }
                    _ => {}
                }
                continue;
            }
            let config = match part.id.strip_prefix("sidecar-") {
                None => self.main_config(
                    template,
                    part,
                    &image,
                    network.as_deref(),
                    &env_values,
                    &digests,
                ),
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
                    self.sidecar_config(template, part, sidecar, network, &env_values, &digests)
                }
            };
            let version = match digests.is_empty() {
                true => part.hash.clone(),
                false => short_hash(&json!([part.hash, digests])),
            };
            let name = self.container_name(&template.key, part, &version);
            // Created, not started: a create that fails (a value the engine rejects) has touched
            // nothing that runs.
            self.create(&name, config).await?;
            self.replace(&name, &old, run, template.start_first(), part.one_shot)
                .await?;
            done.push(match (old.is_empty(), run) {
                (true, true) => format!("created {}", part.id),
                (true, false) => format!("created {} (stopped)", part.id),
                (false, _) => format!("replaced {}", part.id),
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

    /// Puts the created container `new` in place of `old`. Start-first starts the new one, then
    /// removes the old. Stop-first (host ports) stops the old first. Either way, when there is an
    /// old version, the new one must start and stay up for a moment ([`Self::stays_up`]) before
    /// the old one is removed; if it does not, it is removed and the old one keeps (or is started
    /// again to keep) running, so a failed update leaves the old version running.
    async fn replace(
        &self,
        new: &str,
        old: &[&ContainerSummary],
        run: bool,
        start_first: bool,
        one_shot: bool,
    ) -> Attempt<()> {
        if !run {
            for stale in old {
                self.remove(stale).await?;
            }
            return Ok(());
        }
        let was_running: Vec<String> = old
            .iter()
            .filter(|c| container_state(c) == PartState::Running)
            .map(|c| container_name_of(c))
            .collect();
        let mut stopped: Vec<&String> = Vec::new();
        if !start_first {
            for name in &was_running {
                if let Err(trouble) = self.stop(name).await {
                    // Put back what this update stopped before it could not go on.
                    self.roll_back(new, &stopped).await;
                    return Err(trouble);
                }
                stopped.push(name);
            }
        }
        let started = match self.start(new).await {
            // A one-shot is meant to exit; there is nothing to watch.
            Ok(()) if old.is_empty() || one_shot => Ok(()),
            Ok(()) => self.stays_up(new).await,
            Err(trouble) => Err(trouble),
        };
        match started {
            Ok(()) => {
                for stale in old {
                    self.remove(stale).await?;
                }
                Ok(())
            }
            Err(trouble) => {
                let restarted = self.roll_back(new, &stopped).await;
                let why = match trouble {
                    Trouble::Failed(why) | Trouble::Transient(why) => why,
                };
                let note = match (old.is_empty(), restarted) {
                    (true, _) => "",
                    (false, true) => "; the old container keeps running",
                    (false, false) => "; the old container could not be restarted",
                };
                Err(Trouble::Failed(format!("{why}{note}")))
            }
        }
    }

    /// Removes the new container of a failed update and starts the old ones it stopped; whether
    /// they all started.
    async fn roll_back(&self, new: &str, stopped: &[&String]) -> bool {
        let _ = remove_container(&self.docker, new).await;
        let mut all = true;
        for name in stopped {
            all &= self.start(name).await.is_ok();
        }
        all
    }

    /// Whether a replacement that has just started keeps running for a few seconds: one that
    /// exits at once (a bad command, a missing file, a crash on start) must not take the old
    /// version's place. Bounded, so it never holds a pass for long.
    async fn stays_up(&self, name: &str) -> Attempt<()> {
        const WATCH: Duration = Duration::from_secs(3);
        let started = Instant::now();
        while started.elapsed() < WATCH {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let inspected = self
                .docker
                .inspect_container(name, None::<InspectContainerOptions>)
                .await
                .map_err(|e| self.trouble(&format!("cannot inspect {name}"), e))?;
            let restarts = inspected.restart_count.unwrap_or(0);
            let running = inspected
                .state
                .as_ref()
                .and_then(|s| s.running)
                .unwrap_or(false);
            if !running || restarts > 0 {
                let why = self
                    .explain(name)
                    .await
                    .map_or_else(|| "it stopped".to_string(), |(detail, _)| detail);
                return Err(Trouble::Failed(format!(
                    "the new container {name} did not stay up: {why}"
                )));
            }
        }
        Ok(())
    }

    /// Removes everything this instance made for the challenge: containers, network, built images.
    pub async fn delete(&self, key: &ObjectRef) -> Outcome {
        match self.try_delete(key).await {
            Ok(done) => Outcome::Done(done),
            Err(trouble) => trouble.into(),
        }
    }

    async fn try_delete(&self, key: &ObjectRef) -> Attempt<String> {
        let existing = self
            .containers(Some(key.name.as_str()))
            .await
            .map_err(|e| self.trouble("cannot list containers", e))?;
        for container in &existing {
            self.remove(container).await?;
        }
        for network in self.networks(key).await? {
            let id = network.id.unwrap_or_default();
            match self.docker.remove_network(&id).await {
                Err(error) if !is_status(&error, 404) => {
                    return Err(self.trouble(
                        &format!("cannot remove network {}", self.network_name(key)),
                        error,
                    ));
                }
                _ => {}
            }
        }
        let filters = HashMap::from([(
            "label".to_string(),
            self.ownership
                .selector(Kind::Challenge, Some(key.name.as_str())),
        )]);
        let images = self
            .docker
            .list_images(Some(ListImagesOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| self.trouble("cannot list images", e))?;
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
    ) -> Attempt<String> {
        match (&template.spec.image, &template.spec.build) {
            (Some(ImageSource::Name(name)), _) => self.named_image(name).await,
            (Some(ImageSource::FromPipeline(from)), _) => Err(Trouble::Failed(format!(
                "the image comes from Pipeline/{}, which has not produced one",
                from.from_pipeline
            ))),
            (None, Some(build)) => {
                let digest = template.build_digest.clone().unwrap_or_default();
                let tag = format!(
                    "berth-{}-{}:{}",
                    self.instance(),
                    template.key.name,
                    &digest[..digest.len().min(16)]
                );
                let labels = self.ownership.labels(&template.key, template.main_hash());
                let context = repo_root.join(&build.context);
                self.build_unless_present(tag, build, labels, || {
                    BuildContext::read(&context, &build.dockerfile).and_then(|c| c.tar())
                })
                .await
            }
            (None, None) => Err(Trouble::Failed("no image and no build".into())),
        }
    }

    /// The image `tag`, built from a folder of the repo (`build`, whose context `tar` makes) when
    /// the engine does not have it yet: the tag names the context's digest, so an image the
    /// engine has is the one this context builds.
    async fn build_unless_present(
        &self,
        tag: String,
        build: &crate::descriptor::model::BuildSpec,
        labels: std::collections::HashMap<String, String>,
        tar: impl FnOnce() -> Result<Vec<u8>, String>,
    ) -> Attempt<String> {
        match self.docker.inspect_image(&tag).await {
            Ok(_) => return Ok(tag),
            Err(error) if is_status(&error, 404) => {}
            Err(error) => {
                return Err(self.trouble(&format!("cannot inspect image {tag}"), error));
            }
        }
        let tar = tar().map_err(|e| {
            Trouble::Failed(format!("cannot read build context {}: {e}", build.context))
        })?;
        let options = BuildImageOptions {
            dockerfile: build.dockerfile.clone(),
            t: Some(tag.clone()),
            buildargs: Some(build.args.clone().into_iter().collect()),
            labels: Some(labels),
            rm: true,
            forcerm: true,
            ..Default::default()
        };
        self.build(options, tar, &build.context).await?;
        Ok(tag)
    }

    /// The image `name`, pulled only when the engine says it lacks it: any other failure to
    /// inspect is reported, never papered over with a registry pull.
    async fn named_image(&self, name: &str) -> Attempt<String> {
        match self.docker.inspect_image(name).await {
            Ok(_) => return Ok(name.to_string()),
            Err(error) if is_status(&error, 404) => {}
            Err(error) => {
                return Err(self.trouble(&format!("cannot inspect image {name}"), error));
            }
        }
        let options = CreateImageOptions {
            from_image: Some(name.to_string()),
            ..Default::default()
        };
        let mut pull = self.docker.create_image(Some(options), None, None);
        while let Some(progress) = pull.next().await {
            progress.map_err(|e| {
                self.trouble(
                    &format!("cannot pull image {name} (it is not on the engine)"),
                    e,
                )
            })?;
        }
        Ok(name.to_string())
    }

    /// Builds an image from the context `tar` (named `context` in errors, with the build's last
    /// lines).
    async fn build(&self, options: BuildImageOptions, tar: Vec<u8>, context: &str) -> Attempt<()> {
        let mut output =
            self.docker
                .build_image(options, None, Some(bollard::body_full(tar.into())));
        let mut log: Vec<String> = Vec::new();
        while let Some(item) = output.next().await {
            let info = match item {
                Ok(info) => info,
                Err(error) if engine_gone(&error) => {
                    return Err(self.trouble("build interrupted", error));
                }
                Err(error) => {
                    return Err(Trouble::Failed(build_failed(
                        context,
                        &engine_message(&error),
                        &log,
                    )));
                }
            };
            if let Some(detail) = info.error_detail {
                return Err(Trouble::Failed(build_failed(
                    context,
                    &detail.message.unwrap_or_default(),
                    &log,
                )));
            }
            if let Some(line) = info.stream {
                log.push(line);
            }
        }
        Ok(())
    }

    async fn networks(&self, key: &ObjectRef) -> Attempt<Vec<bollard::models::Network>> {
        let name = self.network_name(key);
        let filters = HashMap::from([
            ("name".to_string(), vec![name.clone()]),
            (
                "label".to_string(),
                self.ownership
                    .selector(Kind::Challenge, Some(key.name.as_str())),
            ),
        ]);
        let mut networks = self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(|e| self.trouble("cannot list networks", e))?;
        // The engine's name filter matches substrings.
        networks.retain(|n| n.name.as_deref() == Some(name.as_str()));
        networks.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
        Ok(networks)
    }

    /// The challenge's network, by id. The engine accepts two networks of one name (two applies
    /// racing before the lock existed); the oldest is kept, and the others are removed along with
    /// the containers on them, which this pass then makes again on the kept one.
    async fn ensure_network(&self, key: &ObjectRef) -> Attempt<String> {
        let name = self.network_name(key);
        let mut networks = self.networks(key).await?;
        if networks.is_empty() {
            let request = NetworkCreateRequest {
                name: name.clone(),
                labels: Some(self.ownership.labels(key, "")),
                ..Default::default()
            };
            let created = self
                .docker
                .create_network(request)
                .await
                .map_err(|e| self.trouble(&format!("cannot create network {name}"), e))?;
            return Ok(created.id);
        }
        let keep = networks.remove(0);
        for duplicate in networks {
            let id = duplicate.id.unwrap_or_default();
            tracing::warn!(network = %name, %id, "removing a duplicate network");
            let attached = self
                .docker
                .inspect_network(
                    &id,
                    None::<bollard::query_parameters::InspectNetworkOptions>,
                )
                .await
                .ok()
                .and_then(|n| n.containers)
                .unwrap_or_default();
            for container in attached.keys() {
                // Only this challenge's own containers are removed (made again on the kept
                // network); anything else someone attached is disconnected and left alone.
                let owned = self
                    .docker
                    .inspect_container(container, None::<InspectContainerOptions>)
                    .await
                    .ok()
                    .and_then(|c| c.config)
                    .and_then(|c| c.labels)
                    .is_some_and(|labels| {
                        labels.get(LABEL_INSTANCE).map(String::as_str) == Some(self.instance())
                            && labels.get(LABEL_NAME).map(String::as_str) == Some(key.name.as_str())
                    });
                let result = match owned {
                    true => remove_container(&self.docker, container).await,
                    false => {
                        let request = bollard::models::NetworkDisconnectRequest {
                            container: container.clone(),
                            force: Some(true),
                        };
                        self.docker.disconnect_network(&id, request).await
                    }
                };
                result.map_err(|e| self.trouble("cannot clear a duplicate network", e))?;
            }
            match self.docker.remove_network(&id).await {
                Err(error) if !is_status(&error, 404) => {
                    return Err(self.trouble("cannot remove a duplicate network", error));
                }
                _ => {}
            }
        }
        Ok(keep.id.unwrap_or(name))
    }

    fn main_config(
        &self,
        template: &ChallengeTemplate,
        part: &Part,
        image: &str,
        network: Option<&str>,
        secrets: &BTreeMap<String, String>,
        digests: &BTreeMap<String, String>,
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
            env: Some(environment(&spec.env, secrets)),
            labels: Some(self.labels(template, part, digests)),
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
        part: &Part,
        sidecar: &Sidecar,
        network: &str,
        secrets: &BTreeMap<String, String>,
        digests: &BTreeMap<String, String>,
    ) -> ContainerCreateBody {
        let mut host_config = resource_limits(sidecar.resources.as_ref());
        host_config.network_mode = Some(network.to_string());
        host_config.restart_policy = Some(restart_policy(RestartPolicy::UnlessStopped));
        ContainerCreateBody {
            image: Some(sidecar.image.clone()),
            cmd: sidecar.command.clone(),
            entrypoint: sidecar.entrypoint.clone(),
            env: Some(environment(&sidecar.env, secrets)),
            labels: Some(self.labels(template, part, digests)),
            host_config: Some(host_config),
            networking_config: Some(network_aliases(network, sidecar.name.as_str())),
            ..Default::default()
        }
    }

    async fn create(&self, name: &str, config: ContainerCreateBody) -> Attempt<()> {
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        match self.docker.create_container(Some(options), config).await {
            Ok(_) => Ok(()),
            // Made by an interrupted pass, with these very labels (the name holds the hash).
            Err(error) if is_status(&error, 409) => Ok(()),
            Err(error) => Err(self.trouble(&format!("cannot create {name}"), error)),
        }
    }

    async fn start(&self, name: &str) -> Attempt<()> {
        self.docker
            .start_container(
                name,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(|e| self.trouble(&format!("cannot start {name}"), e))
    }

    async fn stop(&self, name: &str) -> Attempt<()> {
        let options = StopContainerOptions {
            t: Some(10),
            ..Default::default()
        };
        match self.docker.stop_container(name, Some(options)).await {
            // 304: already stopped.
            Err(error) if !is_status(&error, 304) => {
                Err(self.trouble(&format!("cannot stop {name}"), error))
            }
            _ => Ok(()),
        }
    }

    async fn remove(&self, container: &ContainerSummary) -> Attempt<()> {
        let name = container_name_of(container);
        remove_container(&self.docker, &name)
            .await
            .map_err(|e| self.trouble(&format!("cannot remove {name}"), e))
    }
}

fn build_failed(context: &str, reason: &str, log: &[String]) -> String {
    let tail: Vec<&str> = log
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    format!(
        "build of {context} failed: {reason}{}",
        if tail.is_empty() {
            String::new()
        } else {
            format!(" (after: {})", tail.join(" | "))
        }
    )
}

/// The values of a container's secret variables (named by its secret-digest label), longest
/// first, to be masked wherever the container's own words are shown (logs, health output).
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
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values
}

/// `text` with every secret value (and each of its lines, for values of several lines) shown as
/// `<secret>`.
fn masked(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_string();
    for value in secrets {
        for piece in std::iter::once(value.as_str()).chain(value.lines()) {
            let piece = piece.trim();
            if !piece.is_empty() {
                text = text.replace(piece, "<secret>");
            }
        }
    }
    text
}

fn clip(line: &str) -> String {
    const LONGEST: usize = 200;
    match line.char_indices().nth(LONGEST) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_string(),
    }
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

fn container_state(container: &ContainerSummary) -> PartState {
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

/// Reads each secret's value; the error names the secret and its reference, never a value.
fn resolve_secrets(
    secrets: &BTreeMap<String, SecretRef>,
) -> Result<BTreeMap<String, String>, String> {
    secrets
        .iter()
        .map(|(name, reference)| {
            reference
                .resolve()
                .map(|value| (name.clone(), value))
                .map_err(|e| format!("secret {name}: {e}"))
        })
        .collect()
}

fn environment(env: &BTreeMap<String, String>, secrets: &BTreeMap<String, String>) -> Vec<String> {
    env.iter()
        .chain(secrets)
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
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

    #[test]
    fn secret_digests_are_keyed_and_name_bound() {
        let a = secret_digest(b"key-one", "FLAG", "flag{x}");
        assert_eq!(a, secret_digest(b"key-one", "FLAG", "flag{x}"));
        assert_ne!(a, secret_digest(b"key-two", "FLAG", "flag{x}"));
        assert_ne!(a, secret_digest(b"key-one", "OTHER", "flag{x}"));
        assert_ne!(a, secret_digest(b"key-one", "FLAG", "flag{y}"));
        let plain = hex::encode(Sha256::digest(b"flag{x}"));
        assert!(!plain.starts_with(&a), "not a plain hash of the value");
    }

    /// Only a holder of this boot and pid namespace whose process is gone (or whose pid now
    /// belongs to a later process) is dead; junk and other machines' holders never are.
    #[test]
    fn lock_holders_are_dead_only_when_known_to_be() {
        let this = process_identity(std::process::id()).expect("linux");
        assert!(!holder_is_dead(Some(&this)));
        let [boot, namespace, _, start]: [&str; 4] =
            this.split('/').collect::<Vec<_>>().try_into().unwrap();
        assert!(holder_is_dead(Some(&format!(
            "{boot}/{namespace}/4194000/1"
        ))));
        let pid = std::process::id();
        assert!(holder_is_dead(Some(&format!(
            "{boot}/{namespace}/{pid}/{start}0"
        ))));
        let other_boot = format!("00000000-0000-4000-8000-000000000000/{namespace}/4194000/1");
        assert!(!holder_is_dead(Some(&other_boot)));
        assert!(!holder_is_dead(Some(&format!("{boot}/1/4194000/1"))));
        for junk in [
            "",
            "x",
            "a/b/c",
            &format!("{boot}/{namespace}/../1/1"),
            "h:1",
        ] {
            assert!(!holder_is_dead(Some(junk)), "{junk}");
        }
        assert!(!holder_is_dead(None));
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
