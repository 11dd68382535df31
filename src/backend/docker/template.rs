//! A Challenge as container templates: what each slot (`main-1`, `sidecar-db`) runs, with which
//! labels, limits, walls and health check. Pure: no engine, no file system; build digests come
//! from the loader and secret values from the caller.

use std::collections::{BTreeMap, HashMap};

use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, HostConfig, NetworkingConfig, PortBinding,
    ResourcesUlimits, RestartPolicy as DockerRestart, RestartPolicyNameEnum,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::network::Wall;
use super::{DockerBackend, LABEL_SECRETS, LABEL_SLOT, LABEL_SPEC};
use crate::descriptor::model::{
    ChallengeSpec, FILE_KEY_PREFIX, RestartPolicy, RunState, Sidecar, VolumeMount, VolumeSource,
};
use crate::descriptor::security::{Resources, Security};
use crate::descriptor::values::SecretRef;
use crate::descriptor::{ContentDigest, Descriptor, ObjectRef, Spec};
use crate::plan::{DesiredObject, Part, Products, Slot, TargetState, Vocabulary};

/// The one part a pass plans for an instanced challenge: its current version, ready for spawns.
pub const INSTANCES_PART: &str = "instances";
/// What starts the name of a volume holding a repo folder's copy, after the challenge's name.
pub(super) const FOLDER_VOLUME: &str = "folder.";

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
    pub build_digest: Option<ContentDigest>,
    /// Digests of the repo folders its volumes copy in, by folder.
    pub folders: BTreeMap<String, ContentDigest>,
    /// Digests of its sidecars' build contexts, by sidecar, for those that build.
    pub sidecar_builds: BTreeMap<String, ContentDigest>,
    /// The slots, with their hashes and specs.
    pub parts: Vec<Part>,
}

impl ChallengeTemplate {
    /// The main container's template hash: the challenge's version.
    pub fn main_hash(&self) -> &str {
        &self.parts[0].hash
    }

    /// Whether new containers may start before old ones stop: only when nothing is published on
    /// a host port, which two containers cannot hold at once.
    pub fn start_first(&self) -> bool {
        self.spec
            .all_ports()
            .iter()
            .all(|at| at.port.host.is_none())
    }

    /// The network its containers join: its own when it has replicas or sidecars to reach, else
    /// the instance's shared one, where containers reach nobody.
    pub fn wall(&self) -> Wall {
        wall_of(&self.key, &self.spec)
    }

    /// Its sidecars in the order they start: each after those in its `dependsOn`, else as
    /// written.
    pub(super) fn sidecar_order(&self) -> Vec<&Sidecar> {
        let sidecars = &self.spec.sidecars;
        let mut placed: Vec<&Sidecar> = Vec::new();
        let is_placed =
            |placed: &[&Sidecar], name: &str| placed.iter().any(|p| p.name.as_str() == name);
        while placed.len() < sidecars.len() {
            let ready = sidecars.iter().find(|s| {
                !is_placed(&placed, s.name.as_str())
                    && s.depends_on.iter().all(|d| is_placed(&placed, d.as_str()))
            });
            match ready {
                Some(sidecar) => placed.push(sidecar),
                // A circle or a name of no sidecar (validation refuses both): the rest as written.
                None => {
                    let rest: Vec<&Sidecar> = sidecars
                        .iter()
                        .filter(|s| !is_placed(&placed, s.name.as_str()))
                        .collect();
                    placed.extend(rest);
                }
            }
        }
        placed
    }

    /// Its parts in the order they start: sidecars in [`Self::sidecar_order`], then the main
    /// containers, which wait for every sidecar.
    pub(super) fn start_order(&self) -> Vec<&Part> {
        let mut order: Vec<&Part> = self
            .sidecar_order()
            .iter()
            .filter_map(|sidecar| {
                let slot = Slot::sidecar_id(sidecar.name.as_str());
                self.parts.iter().find(|p| p.id == slot)
            })
            .collect();
        order.extend(self.parts.iter().filter(|p| Slot::of(&p.id) == Slot::Main));
        order
    }

    /// The slots that must be healthy before `slot` starts: a sidecar's `dependsOn`, and every
    /// sidecar for a main container.
    pub(super) fn waits_for(&self, slot: &str) -> Vec<String> {
        let sidecars = &self.spec.sidecars;
        match Slot::of(slot) {
            Slot::Sidecar(name) => sidecars
                .iter()
                .find(|s| s.name.as_str() == name)
                .map(|s| {
                    s.depends_on
                        .iter()
                        .map(|d| Slot::sidecar_id(d.as_str()))
                        .collect()
                })
                .unwrap_or_default(),
            Slot::Main | Slot::Object(_) => sidecars
                .iter()
                .map(|s| Slot::sidecar_id(s.name.as_str()))
                .collect(),
        }
    }

    /// Whether any of its containers takes a secret.
    pub fn has_secrets(&self) -> bool {
        !self.spec.secret_env.is_empty()
            || !self.spec.secret_files.is_empty()
            || self.spec.sidecars.iter().any(|s| !s.secret_env.is_empty())
    }

    /// The secret references of a slot: its secret environment by name, and (the main
    /// container's) secret files by [`SecretFile::key`], so a rotated file replaces the container
    /// as a rotated variable does.
    pub(super) fn secrets_of(&self, slot: &str) -> BTreeMap<String, SecretRef> {
        match Slot::of(slot) {
            Slot::Main | Slot::Object(_) => {
                let mut secrets = self.spec.secret_env.clone();
                for file in &self.spec.secret_files {
                    secrets.insert(file.key(), file.secret.clone());
                }
                secrets
            }
            Slot::Sidecar(name) => self
                .spec
                .sidecars
                .iter()
                .find(|s| s.name.as_str() == name)
                .map_or_else(|| self.spec.secret_env.clone(), |s| s.secret_env.clone()),
        }
    }

    /// The main container's secret files as a tar to copy into it before it starts: each at its
    /// path, owned by root and, when the challenge runs as a user of its own, readable by that
    /// user's group (the container gets the group), as Kubernetes gives a Secret's files: a
    /// player with the challenge's shell reads the flag, and can neither change nor remove it
    /// for the others. `values` are the slot's resolved secrets. Pure.
    pub(super) fn secret_files_tar(
        &self,
        values: &BTreeMap<String, String>,
    ) -> Result<Vec<u8>, PackError> {
        let (gid, group_read) = match self.spec.secret_files_group() {
            Some(gid) => (u64::from(gid), 0o040),
            None => (0, 0),
        };
        let files = self
            .spec
            .secret_files
            .iter()
            .map(|file| {
                let value = values
                    .get(&file.key())
                    .ok_or_else(|| PackError::NotRead(file.path.clone()))?;
                Ok((
                    file.path.as_str(),
                    file.mode_bits() | group_read,
                    value.as_bytes(),
                ))
            })
            .collect::<Result<Vec<_>, PackError>>()?;
        root_owned_tar(&files, gid)
    }

    /// Where an instance of it finds its team's flag as a file, when it does.
    pub(super) fn flag_file(&self) -> Option<&str> {
        self.spec.instanced.as_ref()?.flag.as_ref()?.file.as_deref()
    }

    /// The team's flag as a tar to copy into an instance's container: at the challenge's
    /// `instanced.flag.file`, owned by root and readable by the challenge user's group only, as
    /// a secret file is. `None` when the flag is not a file.
    pub(super) fn flag_file_tar(&self, flag: &str) -> Option<Result<Vec<u8>, PackError>> {
        let path = self.flag_file()?;
        let (gid, mode) = match self.spec.secret_files_group() {
            Some(gid) => (u64::from(gid), 0o440),
            None => (0, 0o400),
        };
        Some(root_owned_tar(&[(path, mode, flag.as_bytes())], gid))
    }
}

/// A tar of one symbolic link at `path` (absolute) to `target`, owned by root.
pub(super) fn link_tar(path: &str, target: &str) -> Result<Vec<u8>, PackError> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_mode(0o777);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(0);
    builder
        .append_link(&mut header, path.trim_start_matches('/'), target)
        .map_err(PackError::packing(path))?;
    builder.into_inner().map_err(PackError::packing(path))
}

/// Why files to copy into a container could not be packed.
#[derive(Debug, thiserror::Error)]
pub(super) enum PackError {
    /// A secret file's value was not read before (a bug in berth).
    #[error("secret file {0} was not read")]
    NotRead(String),
    /// The tar could not be written.
    #[error("cannot pack {path}: {source}")]
    Io {
        /// The file or link.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

impl PackError {
    fn packing(path: &str) -> impl FnOnce(std::io::Error) -> PackError {
        let path = path.to_string();
        move |source| PackError::Io { path, source }
    }
}

/// Files as a tar of regular files owned by root and group `gid`: (absolute path, mode, bytes).
fn root_owned_tar(files: &[(&str, u32, &[u8])], gid: u64) -> Result<Vec<u8>, PackError> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, mode, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(*mode);
        header.set_uid(0);
        header.set_gid(gid);
        header.set_mtime(0);
        header.set_size(bytes.len() as u64);
        builder
            .append_data(&mut header, path.trim_start_matches('/'), *bytes)
            .map_err(PackError::packing(path))?;
    }
    builder
        .into_inner()
        .map_err(PackError::packing("the files"))
}

fn wall_of(key: &ObjectRef, spec: &ChallengeSpec) -> Wall {
    let egress = spec.network.egress;
    if spec.instanced.is_some() {
        // Its version is not known yet (this is part of it); only its size and egress count.
        return Wall::Instances {
            key: key.clone(),
            version: String::new(),
            egress,
            containers: capacity(spec),
        };
    }
    // Replicas and sidecars reach each other by name on a network of their own; a lone
    // container needs none, and shares one where it reaches nobody.
    match spec.sidecars.is_empty() && spec.replicas == 1 {
        true => Wall::Challenges { egress },
        false => Wall::Own {
            key: key.clone(),
            egress,
            containers: spec.replicas as usize + spec.sidecars.len(),
        },
    }
}

/// How many containers an instanced challenge's network holds at most: `max` and `pool`.
pub(super) fn capacity(spec: &ChallengeSpec) -> usize {
    spec.instanced
        .as_ref()
        .map_or(1, |i| (i.max + i.pool) as usize)
}

pub(super) fn short_hash(value: &Value) -> String {
    let digest = Sha256::digest(serde_json::to_vec(value).expect("json serializes"));
    hex::encode(&digest[..8])
}

/// Translates a Challenge into its desired object and the template to build it. Pure: no engine,
/// no file system (build digests come from the loader). `None` for other kinds.
pub fn desired_object(descriptor: &Descriptor) -> Option<(DesiredObject, ChallengeTemplate)> {
    let Spec::Challenge(spec) = &descriptor.spec else {
        return None;
    };
    let mut template = ChallengeTemplate {
        key: descriptor.key(),
        spec: spec.as_ref().clone(),
        labels: descriptor.metadata.labels.clone(),
        build_digest: descriptor.build_digest.clone(),
        folders: descriptor
            .folders
            .iter()
            .map(|(folder, copy)| (folder.clone(), copy.digest.clone()))
            .collect(),
        sidecar_builds: descriptor.sidecar_builds.clone(),
        parts: Vec::new(),
    };
    template.parts = template.slots();
    let object = template.desired(descriptor.dependencies());
    Some((object, template))
}

impl ChallengeTemplate {
    /// The same challenge running the images its Pipelines produced, by their ids (a tag can be
    /// built again, an id cannot), in the main container and in sidecars alike; `None` when one
    /// is missing.
    pub fn with_products(&self, products: &Products) -> Option<ChallengeTemplate> {
        let mut template = self.clone();
        products.put_into(&mut template.spec, |product| &product.id)?;
        template.parts = template.slots();
        Some(template)
    }

    /// The plan's view of it.
    pub fn desired(&self, dependencies: Vec<ObjectRef>) -> DesiredObject {
        DesiredObject {
            key: self.key.clone(),
            engine: crate::plan::Engine::Docker,
            target: match self.spec.state {
                RunState::Running => TargetState::Running,
                RunState::Stopped => TargetState::Stopped,
            },
            parts: self.parts.clone(),
            dependencies,
            start_first: self.start_first(),
            hold: None,
            words: Vocabulary::CONTAINER,
            ttl: None,
            ready_timeout: None,
        }
    }

    /// Its slots, each with the spec its containers are made from and that spec's hash.
    fn slots(&self) -> Vec<Part> {
        let spec = &self.spec;
        let mut main = serde_json::to_value(spec).expect("specs serialize");
        let main_object = main.as_object_mut().expect("spec is an object");
        for not_applied in ["state", "sidecars", "info", "instanced"] {
            main_object.remove(not_applied);
        }
        if let Some(instanced) = &spec.instanced {
            // How the flag reaches an instance is part of its container; its ttl and limits are
            // not (a longer ttl replaces no instance). A stopped challenge's version is another
            // one.
            main_object.insert("flag".into(), json!(instanced.flag));
            main_object.insert("state".into(), json!(spec.state));
        }
        if let Some(digest) = &self.build_digest {
            main_object.insert("buildDigest".into(), Value::String(digest.hashed().into()));
        }
        // The content of a folder a volume copies in is part of the container that mounts it.
        let folders_of = |volumes: &[VolumeMount]| -> Option<Value> {
            let folders: BTreeMap<&str, &str> = volumes
                .iter()
                .filter_map(|v| v.from.as_deref())
                .map(|folder| {
                    let digest = self.folders.get(folder).map_or("", ContentDigest::hashed);
                    (folder, digest)
                })
                .collect();
            (!folders.is_empty()).then(|| json!(folders))
        };
        if let Some(folders) = folders_of(&spec.volumes) {
            main_object.insert("folderDigests".into(), folders);
        }
        // Which network the containers join is part of their templates: a container made before
        // the walls, or on another wall, is replaced onto this one.
        let walls = Value::String(self.wall().describe());
        main_object.insert("walls".into(), walls.clone());
        if !self.labels.is_empty() {
            main_object.insert("labels".into(), json!(self.labels));
        }
        let one_shot = matches!(spec.restart, RestartPolicy::No | RestartPolicy::OnFailure);
        if one_shot {
            // The engine cannot tell a one-shot berth stopped from one that finished, so a
            // one-shot's state is part of its template: switching it makes a new container (run,
            // or only made), never a restart of an exited one.
            main_object.insert("state".into(), json!(spec.state));
        }
        let main_hash = short_hash(&main);
        let main = std::sync::Arc::new(main);
        if spec.instanced.is_some() {
            // One part, the version ready for spawns: the pass makes its network and image, and
            // the instances themselves are made through the agent's API.
            return vec![Part {
                id: INSTANCES_PART.into(),
                hash: main_hash,
                spec: main,
                secrets: None,
                one_shot: false,
            }];
        }
        let mut parts: Vec<Part> = (1..=spec.replicas)
            .map(|replica| Part {
                id: Slot::main_id(replica),
                hash: main_hash.clone(),
                spec: main.clone(),
                secrets: None,
                one_shot,
            })
            .collect();
        for sidecar in &spec.sidecars {
            let mut sidecar_spec = serde_json::to_value(sidecar).expect("sidecars serialize");
            if !self.labels.is_empty() {
                sidecar_spec["labels"] = json!(self.labels);
            }
            sidecar_spec["walls"] = walls.clone();
            if let Some(digest) = self.sidecar_builds.get(sidecar.name.as_str()) {
                sidecar_spec["buildDigest"] = json!(digest.hashed());
            }
            if let Some(folders) = folders_of(&sidecar.volumes) {
                sidecar_spec["folderDigests"] = folders;
            }
            parts.push(Part {
                id: Slot::sidecar_id(sidecar.name.as_str()),
                hash: short_hash(&sidecar_spec),
                spec: sidecar_spec.into(),
                secrets: None,
                one_shot: false,
            });
        }
        parts
    }
}

impl DockerBackend {
    pub(super) fn container_name(&self, key: &ObjectRef, part: &Part, version: &str) -> String {
        format!(
            "berth-{}-{}-{}-{version}",
            self.instance(),
            key.name,
            part.id
        )
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

    pub(super) fn main_config(
        &self,
        template: &ChallengeTemplate,
        part: &Part,
        image: &str,
        network: &str,
        secrets: &BTreeMap<String, String>,
        digests: &BTreeMap<String, String>,
    ) -> ContainerCreateBody {
        let spec = &template.spec;
        let (exposed, bindings) = published(&spec.ports);
        // A solver is run beside the container, not in it.
        let healthcheck = spec
            .healthcheck
            .as_ref()
            .filter(|check| check.solve.is_none())
            .map(health_config);
        let mut host_config = contained(spec.resources.as_ref(), &spec.security, spec.init);
        // The group its secret files are readable by, whatever groups the image gives the user.
        if let Some(gid) = template.spec.secret_files_group() {
            host_config.group_add = Some(vec![gid.to_string()]);
        }
        host_config.port_bindings = Some(bindings);
        host_config.network_mode = Some(network.to_string());
        host_config.restart_policy = Some(restart_policy(spec.restart));
        host_config.mounts = self.volume_mounts(template, &spec.volumes);
        let own = matches!(template.wall(), Wall::Own { .. });
        ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: spec.command.clone(),
            entrypoint: spec.entrypoint.clone(),
            env: Some(environment(&spec.env, secrets)),
            labels: Some(self.labels(template, part, digests)),
            exposed_ports: Some(exposed),
            healthcheck,
            host_config: Some(host_config),
            user: spec.security.user.map(|user| user.to_string()),
            stop_timeout: Some(i64::try_from(spec.stop_seconds()).unwrap_or(i64::MAX)),
            // On its own network the challenge is reached by its name; on the shared one nobody
            // reaches it at all.
            networking_config: own.then(|| network_aliases(network, template.key.name.as_str())),
            ..Default::default()
        }
    }

    pub(super) fn sidecar_config(
        &self,
        template: &ChallengeTemplate,
        part: &Part,
        sidecar: &Sidecar,
        network: &str,
        secrets: &BTreeMap<String, String>,
        digests: &BTreeMap<String, String>,
    ) -> ContainerCreateBody {
        let mut host_config = contained(sidecar.resources.as_ref(), &sidecar.security, true);
        let (exposed, bindings) = published(&sidecar.ports);
        host_config.port_bindings = (!bindings.is_empty()).then_some(bindings);
        host_config.network_mode = Some(network.to_string());
        host_config.mounts = self.volume_mounts(template, &sidecar.volumes);
        host_config.restart_policy = Some(restart_policy(RestartPolicy::UnlessStopped));
        ContainerCreateBody {
            // Unresolved, it has no image to name: its images were ensured before, and that
            // failed first.
            image: self.sidecar_image(template, sidecar).ok(),
            exposed_ports: (!exposed.is_empty()).then_some(exposed),
            healthcheck: sidecar
                .healthcheck
                .as_ref()
                .filter(|check| check.solve.is_none())
                .map(health_config),
            cmd: sidecar.command.clone(),
            entrypoint: sidecar.entrypoint.clone(),
            env: Some(environment(&sidecar.env, secrets)),
            labels: Some(self.labels(template, part, digests)),
            user: sidecar.security.user.map(|user| user.to_string()),
            stop_timeout: Some(i64::try_from(template.spec.stop_seconds()).unwrap_or(i64::MAX)),
            host_config: Some(host_config),
            networking_config: Some(network_aliases(network, sidecar.name.as_str())),
            ..Default::default()
        }
    }
}

/// The ports a container exposes (`8080/tcp`), and those of them published on host ports.
#[allow(clippy::type_complexity)]
fn published(
    ports: &[crate::descriptor::model::PortMapping],
) -> (Vec<String>, HashMap<String, Option<Vec<PortBinding>>>) {
    let exposed = ports
        .iter()
        .map(|p| format!("{}/{}", p.container, p.protocol.as_str()))
        .collect();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for port in ports {
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
    (exposed, bindings)
}

/// A healthcheck as Docker runs it inside the container.
fn health_config(check: &crate::descriptor::model::HealthCheck) -> HealthConfig {
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
        // Failures while starting do not count; a success counts at once, so `apply --wait`
        // sees health quickly.
        start_period: Some(check.start_period.unwrap_or(check.interval).0.as_nanos() as i64),
        start_interval: None,
    }
}

impl DockerBackend {
    /// The engine's name for the challenge `key`'s volume `name`. The parts are names, which
    /// hold no `_`, so two challenges' volumes never share one (`a-b` and `c`, `a` and `b-c`).
    pub(super) fn volume_name(&self, key: &ObjectRef, name: &str) -> String {
        format!("berth-{}_{}_{name}", self.instance(), key.name)
    }

    /// The engine's name for the volume holding a copy of a repo folder whose content has
    /// `digest`, for the challenge `key`: named by content, so a changed folder is a new volume
    /// and a container never sees a half-made one. The [`FOLDER_VOLUME`] mark holds a `.`, which
    /// no name does, so it never meets a named volume's.
    pub(super) fn folder_volume_name(&self, key: &ObjectRef, digest: &str) -> String {
        let digest: String = digest
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(16)
            .collect();
        self.volume_name(key, &format!("{FOLDER_VOLUME}{digest}"))
    }

    /// `volumes` as mounts of the challenge's named volumes and of its folders' copies (those
    /// read-only, always).
    fn volume_mounts(
        &self,
        template: &ChallengeTemplate,
        volumes: &[VolumeMount],
    ) -> Option<Vec<bollard::models::Mount>> {
        let mounts: Vec<bollard::models::Mount> = volumes
            .iter()
            .filter_map(|volume| {
                let (source, read_only) = match volume.source()? {
                    VolumeSource::Named(name) => (
                        self.volume_name(&template.key, name.as_str()),
                        volume.read_only,
                    ),
                    VolumeSource::Folder(folder) => {
                        let digest = template
                            .folders
                            .get(folder)
                            .map_or("", ContentDigest::hashed);
                        (self.folder_volume_name(&template.key, digest), true)
                    }
                };
                Some(bollard::models::Mount {
                    target: Some(volume.path.clone()),
                    source: Some(source),
                    typ: Some(bollard::models::MountType::VOLUME),
                    read_only: Some(read_only),
                    ..Default::default()
                })
            })
            .collect();
        (!mounts.is_empty()).then_some(mounts)
    }
}

fn environment(env: &BTreeMap<String, String>, secrets: &BTreeMap<String, String>) -> Vec<String> {
    env.iter()
        .chain(
            secrets
                .iter()
                .filter(|(name, _)| !name.starts_with(FILE_KEY_PREFIX)),
        )
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

/// The walls of one container, whoever runs in it: its limits, `no-new-privileges`, `NET_RAW`
/// dropped (unless added back), and what its `security` asks for. Every container berth makes
/// (challenges, sidecars, pipeline steps) starts from this.
pub(super) fn contained(
    resources: Option<&Resources>,
    security: &Security,
    init: bool,
) -> HostConfig {
    let mut config = HostConfig::default();
    if let Some(resources) = resources {
        config.nano_cpus = resources.cpus.map(|cpus| (cpus * 1e9) as i64);
        config.memory = resources.memory.map(|m| m.bytes as i64);
        // Swap is no way around the memory limit.
        config.memory_swap = config.memory;
        config.pids_limit = resources.pids;
    }
    config.security_opt = Some(vec!["no-new-privileges".into()]);
    config.cap_drop = Some(security.capabilities.dropped());
    let added = security.capabilities.added();
    config.cap_add = (!added.is_empty()).then_some(added);
    config.readonly_rootfs = Some(security.read_only_root_filesystem);
    config.privileged = Some(security.privileged);
    config.init = Some(init);
    if !security.tmpfs.is_empty() {
        config.tmpfs = Some(
            security
                .tmpfs
                .iter()
                .map(|mount| {
                    (
                        mount.path.clone(),
                        format!("rw,nosuid,nodev,size={}", mount.size.bytes),
                    )
                })
                .collect(),
        );
    }
    let ulimits: Vec<ResourcesUlimits> = [
        ("nofile", security.ulimits.nofile),
        ("nproc", security.ulimits.nproc),
    ]
    .into_iter()
    .filter_map(|(name, limit)| {
        limit.map(|limit| ResourcesUlimits {
            name: Some(name.into()),
            soft: Some(i64::from(limit)),
            hard: Some(i64::from(limit)),
        })
    })
    .collect();
    config.ulimits = (!ulimits.is_empty()).then_some(ulimits);
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

pub(super) fn network_aliases(network: &str, alias: &str) -> NetworkingConfig {
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

    fn template(sidecars: serde_json::Value) -> ChallengeTemplate {
        let spec: ChallengeSpec =
            serde_json::from_value(json!({"image": "web:1", "replicas": 2, "sidecars": sidecars}))
                .unwrap();
        let slot = |id: &str| Part {
            id: id.into(),
            hash: "h".into(),
            spec: json!({}).into(),
            secrets: None,
            one_shot: false,
        };
        let mut parts = vec![slot("main-1"), slot("main-2")];
        parts.extend(
            spec.sidecars
                .iter()
                .map(|s| slot(&format!("sidecar-{}", s.name))),
        );
        ChallengeTemplate {
            key: "Challenge/shop".parse().unwrap(),
            spec,
            labels: BTreeMap::new(),
            build_digest: None,
            folders: BTreeMap::new(),
            sidecar_builds: BTreeMap::new(),
            parts,
        }
    }

    /// A database starts before what needs it: sidecars after those they depend on, the main
    /// containers last, waiting for every sidecar.
    #[test]
    fn sidecars_start_after_what_they_depend_on_and_the_main_containers_last() {
        let shop = template(json!([
            {"name": "web", "image": "nginx:1", "dependsOn": ["api"]},
            {"name": "api", "image": "api:1", "dependsOn": ["db", "cache"]},
            {"name": "cache", "image": "redis:7"},
            {"name": "db", "image": "mysql:8"},
        ]));
        let order: Vec<&str> = shop.start_order().iter().map(|p| p.id.as_str()).collect();
        assert_eq!(
            order,
            [
                "sidecar-cache",
                "sidecar-db",
                "sidecar-api",
                "sidecar-web",
                "main-1",
                "main-2"
            ]
        );
        assert_eq!(
            shop.waits_for("sidecar-api"),
            ["sidecar-db", "sidecar-cache"]
        );
        assert_eq!(shop.waits_for("sidecar-db"), Vec::<String>::new());
        assert_eq!(shop.waits_for("main-2").len(), 4);
        // A circle (which validation refuses) still starts everything, as written.
        let circle = template(json!([
            {"name": "a", "image": "x:1", "dependsOn": ["b"]},
            {"name": "b", "image": "x:1", "dependsOn": ["a"]},
        ]));
        assert_eq!(circle.start_order().len(), 4);
    }
}
