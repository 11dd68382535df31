//! Challenges on Kubernetes, as berth applies them. Pure: no API server.
//!
//! A Challenge with `target: kubernetes` is a Deployment and, when it has ports, a Service of the
//! same name in the agent's challenge namespace; `secretEnv` goes through a Secret `NAME-env`.
//! The translation keeps what the Challenge means on Docker:
//! - the main container and each sidecar are containers of one pod, so sidecars are reachable on
//!   `localhost`, as on the challenge's own Docker network they are by name;
//! - a published host port is a NodePort (validation keeps it in the cluster's range), a port
//!   without one is reachable in the cluster only;
//! - the health check is a readiness probe, so a Service sends traffic only to ready pods;
//! - `state: stopped` scales the Deployment to 0, keeping it;
//! - an update rolls one new pod at a time and takes an old one away only once a new one is ready
//!   (`maxUnavailable: 0`), so an update that never becomes ready leaves the old version serving;
//! - `$` in env values, command and entrypoint is doubled: Kubernetes expands `$(NAME)` there,
//!   Docker does not;
//! - the walls: every container runs without privilege escalation and without `NET_RAW`, with
//!   what its `security` adds (capabilities, read-only root, user, tmpfs as memory-backed
//!   `emptyDir`s); and a NetworkPolicy lets in only the challenge's own ports and lets out only
//!   to the internet, never to cluster-internal ranges (other pods, Services, the API server),
//!   except DNS and the challenges named in `network.allowConnectTo`, as kCTF does. With
//!   `network.egress: false` nothing goes out at all. Enforcing the policy is the network
//!   plugin's job (Calico, Cilium, …).
//! - volumes: a named volume is a PersistentVolumeClaim `NAME-VOLUME` (kept across updates,
//!   deleted only with the challenge), a folder of the repo a ConfigMap `NAME-folder-DIGEST`
//!   (named by its content, so a change rolls the pods), mounted read-only, its files at their
//!   paths.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{Value, json};

use super::{OBJECT, hash};
use crate::backend::{LABEL_INSTANCE, LABEL_INSTANCE_ID, LABEL_KIND, LABEL_NAME};
use crate::descriptor::model::{
    ChallengeSpec, Engine, HealthCheck, ImageSource, PortMapping, Protocol, RunState, VolumeMount,
    VolumeSource,
};
use crate::descriptor::security::Resources;
use crate::descriptor::security::Security;
use crate::descriptor::values::{SecretRef, Size};
use crate::descriptor::{Descriptor, FolderCopy, ObjectRef, Spec};
use crate::plan::{DesiredObject, Part, Products, TargetState};

/// Address ranges a challenge's pods never connect to (unless named in `allowConnectTo`): the
/// private and link-local ranges where clusters keep pods, Services, nodes and the API server.
pub const CLUSTER_RANGES: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
];

/// Pod annotation: the id of the image a Pipeline produced, so a rebuilt tag rolls the pods.
const ANNOTATION_IMAGE_ID: &str = "berth.image-id";
/// Pod annotation: the ids of the images Pipelines produced for sidecars, by sidecar (JSON).
const ANNOTATION_SIDECAR_IMAGE_IDS: &str = "berth.sidecar-image-ids";

/// What applying one Challenge on Kubernetes needs beyond its plan.
#[derive(Debug, Clone)]
pub struct ChallengeTemplate {
    /// `Challenge/name`.
    pub key: ObjectRef,
    spec: ChallengeSpec,
    labels: BTreeMap<String, String>,
    /// The image's id when a Pipeline produced it (the tag may be built again).
    image_id: Option<String>,
    /// The same for sidecars, by sidecar.
    sidecar_image_ids: BTreeMap<String, String>,
    /// The repo folders its volumes copy in, as the loader read them.
    folders: BTreeMap<String, FolderCopy>,
}

/// The size of a named volume's claim unless its mount says.
const DEFAULT_CLAIM: u64 = 1024 * 1024 * 1024;
/// The most a folder copied in may hold: what a ConfigMap holds, less room for its metadata.
const FOLDER_LIMIT: u64 = crate::descriptor::model::KUBE_FOLDER_LIMIT;
/// Label on the ConfigMaps that hold repo folders: the old ones go after an apply.
pub const LABEL_FOLDER: &str = "berth.folder";

/// The desired object and template of a Challenge that runs on Kubernetes; `None` for every
/// other descriptor.
pub fn desired_object(descriptor: &Descriptor) -> Option<(DesiredObject, ChallengeTemplate)> {
    let Spec::Challenge(spec) = &descriptor.spec else {
        return None;
    };
    if spec.target != Some(Engine::Kubernetes) {
        return None;
    }
    let template = ChallengeTemplate {
        key: descriptor.key(),
        spec: (**spec).clone(),
        labels: descriptor.metadata.labels.clone(),
        image_id: None,
        sidecar_image_ids: BTreeMap::new(),
        folders: descriptor.folders.clone(),
    };
    Some((template.desired(descriptor.dependencies()), template))
}

/// Why a repo folder a challenge's containers mount cannot go in a ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FolderRefused {
    /// The folder cannot be read.
    #[error("cannot read the folder {folder}: {why}")]
    Unreadable {
        /// The folder.
        folder: String,
        /// Why.
        why: String,
    },
    /// A file of it cannot be read.
    #[error("cannot read {path}: {why}")]
    UnreadableFile {
        /// The file, from the repo's root.
        path: String,
        /// Why.
        why: String,
    },
    /// Its files hold more than a ConfigMap can.
    #[error(
        "the folder {folder} holds {bytes} bytes; on kubernetes it goes in a ConfigMap, which holds at most {FOLDER_LIMIT}: keep what is copied in small, or put it in the image"
    )]
    TooLarge {
        /// The folder.
        folder: String,
        /// Its files' bytes together.
        bytes: u64,
    },
}

impl ChallengeTemplate {
    /// The same challenge running the images its Pipelines produced, in the main container and
    /// in sidecars: a cluster pulls by name, so each tag goes in the pod, and each id rolls the
    /// pods when its tag is built again; `None` when one is missing.
    pub fn with_products(&self, products: &Products) -> Option<ChallengeTemplate> {
        let mut template = self.clone();
        for (container, product) in products.put_into(&mut template.spec, |product| &product.tag)? {
            let id = product.id.clone();
            match container {
                None => template.image_id = Some(id),
                Some(sidecar) => {
                    template.sidecar_image_ids.insert(sidecar.to_string(), id);
                }
            }
        }
        Some(template)
    }

    /// The plan's view of it.
    pub fn desired(&self, dependencies: Vec<ObjectRef>) -> DesiredObject {
        DesiredObject {
            key: self.key.clone(),
            engine: Engine::Kubernetes,
            target: match self.spec.state {
                RunState::Running => TargetState::Running,
                RunState::Stopped => TargetState::Stopped,
            },
            parts: self.parts(),
            dependencies,
            start_first: true,
            hold: None,
            words: OBJECT,
            ttl: None,
            ready_timeout: None,
        }
    }

    /// The descriptor's own labels, copied onto everything made for it.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// The challenge's spec.
    pub fn spec(&self) -> &ChallengeSpec {
        &self.spec
    }

    /// Whether teams get instances of it rather than one shared Deployment.
    pub fn instanced(&self) -> bool {
        self.spec.instanced.is_some()
    }

    /// Whether it should run (rather than be scaled to zero).
    pub fn running(&self) -> bool {
        self.spec.state == RunState::Running
    }

    fn name(&self) -> &str {
        self.key.name.as_str()
    }

    /// The Secret holding the `secretEnv` values, when there are any.
    pub fn secret_name(&self) -> Option<String> {
        (!self.secrets().is_empty()).then(|| format!("{}-env", self.name()))
    }

    /// Every secret reference, by its key in the Secret: `main.NAME`, `SIDECAR.NAME`.
    pub fn secrets(&self) -> BTreeMap<String, &SecretRef> {
        let mut all: BTreeMap<String, &SecretRef> = self
            .spec
            .secret_env
            .iter()
            .map(|(name, reference)| (format!("main.{name}"), reference))
            .collect();
        for sidecar in &self.spec.sidecars {
            for (name, reference) in &sidecar.secret_env {
                all.insert(format!("{}.{name}", sidecar.name), reference);
            }
        }
        for (index, file) in self.spec.secret_files.iter().enumerate() {
            all.insert(secret_file_key(index), &file.secret);
        }
        all
    }

    /// Every volume mount of its containers: the main one's, then each sidecar's.
    fn mounts(&self) -> impl Iterator<Item = &VolumeMount> {
        self.spec
            .volumes
            .iter()
            .chain(self.spec.sidecars.iter().flat_map(|s| &s.volumes))
    }

    /// The claim of its named volume `volume`.
    fn claim_name(&self, volume: &str) -> String {
        // A `.`, which no name holds: `a` + `b-c` and `a-b` + `c` never meet.
        format!("{}.{volume}", self.name())
    }

    /// The ConfigMap holding the repo folder `folder`, named by its content.
    fn folder_map_name(&self, folder: &str) -> String {
        let digest = self.folders.get(folder).map_or("", |f| f.digest.hashed());
        format!("{}.folder-{}", self.name(), short_digest(digest))
    }

    /// Its named volumes' claims, each once (the size the first mount of it gives), in
    /// `namespace` with `labels`. An instanced challenge has none of its own: each instance has
    /// its [`Self::instance_claims`].
    pub fn claims(
        &self,
        labels: &HashMap<String, String>,
        namespace: &str,
    ) -> Vec<(String, Value)> {
        if self.instanced() {
            return Vec::new();
        }
        self.claims_named(labels, namespace, |volume| self.claim_name(volume))
    }

    /// The claims of the instance whose objects are named `base`: one per named volume, kept
    /// while the instance lives (a replacement of its pod mounts them again) and deleted with
    /// it, so no team ever sees another's data.
    pub fn instance_claims(
        &self,
        labels: &HashMap<String, String>,
        namespace: &str,
        base: &str,
    ) -> Vec<(String, Value)> {
        self.claims_named(labels, namespace, |volume| {
            instance_claim_name(base, volume)
        })
    }

    fn claims_named(
        &self,
        labels: &HashMap<String, String>,
        namespace: &str,
        name_of: impl Fn(&str) -> String,
    ) -> Vec<(String, Value)> {
        let mut sizes: BTreeMap<&str, Option<Size>> = BTreeMap::new();
        for mount in self.mounts() {
            if let Some(name) = mount.named() {
                sizes.entry(name.as_str()).or_insert(mount.size);
            }
        }
        sizes
            .into_iter()
            .map(|(volume, size)| {
                let name = name_of(volume);
                let bytes = size.map_or(DEFAULT_CLAIM, |s| s.bytes);
                let claim = json!({
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": metadata(&name, namespace, labels),
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": { "requests": { "storage": bytes.to_string() } },
                    },
                });
                (name, claim)
            })
            .collect()
    }

    /// The ConfigMaps holding the repo folders its containers mount, each once, their files read
    /// from the repo at `root`, in `namespace` with `labels`. A folder over [`FOLDER_LIMIT`],
    /// or one that cannot be read, is refused with why.
    pub fn folder_maps(
        &self,
        root: &std::path::Path,
        labels: &HashMap<String, String>,
        namespace: &str,
    ) -> Result<Vec<(String, Value)>, FolderRefused> {
        use base64::Engine as _;
        let folders: std::collections::BTreeSet<&str> =
            self.mounts().filter_map(|m| m.from.as_deref()).collect();
        let mut maps = Vec::new();
        for folder in folders {
            let copy = self.folders.get(folder).cloned().unwrap_or_default();
            if let Err(why) = copy.digest.short() {
                return Err(FolderRefused::Unreadable {
                    folder: folder.into(),
                    why: why.to_string(),
                });
            }
            let total: u64 = copy.files.iter().map(|(_, _, size)| size).sum();
            if total > FOLDER_LIMIT {
                return Err(FolderRefused::TooLarge {
                    folder: folder.into(),
                    bytes: total,
                });
            }
            let mut data = serde_json::Map::new();
            for (index, (path, _, _)) in copy.files.iter().enumerate() {
                let bytes = std::fs::read(root.join(folder).join(path)).map_err(|e| {
                    FolderRefused::UnreadableFile {
                        path: format!("{folder}/{path}"),
                        why: e.to_string(),
                    }
                })?;
                data.insert(
                    format!("f{index}"),
                    base64::engine::general_purpose::STANDARD
                        .encode(bytes)
                        .into(),
                );
            }
            let name = self.folder_map_name(folder);
            let mut map_labels = labels.clone();
            map_labels.insert(LABEL_FOLDER.into(), "true".into());
            let map = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": metadata(&name, namespace, &map_labels),
                "immutable": true,
                "binaryData": data,
            });
            maps.push((name, map));
        }
        Ok(maps)
    }

    /// The pod's volumes for its named volumes (the claims `claim_of` names) and folders, each
    /// once, and each container's mounts of them (the main one's first, then each sidecar's).
    fn volume_mounts(&self, claim_of: &dyn Fn(&str) -> String) -> (Vec<Value>, Vec<Vec<Value>>) {
        let mut volumes: BTreeMap<String, Value> = BTreeMap::new();
        let mut mounts_of = |mounts: &[VolumeMount]| -> Vec<Value> {
            mounts
                .iter()
                .filter_map(|mount| {
                    let (volume, read_only) = match mount.source()? {
                        VolumeSource::Named(name) => {
                            let volume = pod_volume_name("v", name.as_str());
                            volumes.entry(volume.clone()).or_insert_with(|| {
                                json!({"name": volume, "persistentVolumeClaim": {"claimName": claim_of(name.as_str())}})
                            });
                            (volume, mount.read_only)
                        }
                        VolumeSource::Folder(folder) => {
                            let copy = self.folders.get(folder).cloned().unwrap_or_default();
                            let volume = pod_volume_name("f", &short_digest(copy.digest.hashed()));
                            let items: Vec<Value> = copy
                                .files
                                .iter()
                                .enumerate()
                                .map(|(index, (path, executable, _))| {
                                    let mode = if *executable { 0o555 } else { 0o444 };
                                    json!({"key": format!("f{index}"), "path": path, "mode": mode})
                                })
                                .collect();
                            volumes.entry(volume.clone()).or_insert_with(|| {
                                json!({"name": volume, "configMap": {"name": self.folder_map_name(folder), "items": items}})
                            });
                            (volume, true)
                        }
                    };
                    Some(json!({"name": volume, "mountPath": mount.path, "readOnly": read_only}))
                })
                .collect()
        };
        let mut per_container = vec![mounts_of(&self.spec.volumes)];
        for sidecar in &self.spec.sidecars {
            per_container.push(mounts_of(&sidecar.volumes));
        }
        (volumes.into_values().collect(), per_container)
    }

    /// The spec as a plan shows it.
    fn summary(&self) -> Value {
        let mut summary = serde_json::to_value(&self.spec).expect("specs serialize");
        if let Some(fields) = summary.as_object_mut() {
            for not_shown in ["state", "target", "info"] {
                fields.remove(not_shown);
            }
            if let Some(id) = &self.image_id {
                fields.insert("imageId".into(), id.clone().into());
            }
            if !self.sidecar_image_ids.is_empty() {
                fields.insert("sidecarImageIds".into(), json!(self.sidecar_image_ids));
            }
        }
        summary
    }

    /// The version of an instanced challenge: a hash of its instances' pod, its NetworkPolicy,
    /// its labels and how a team's flag is given. Its pass records it on the NetworkPolicy, and
    /// each instance's pod carries it.
    pub fn version(&self) -> String {
        let flag = self.spec.instanced.as_ref().map(|i| json!(i.flag));
        hash(&[
            &self.deployment(&HashMap::new(), "", true)["spec"]["template"],
            &self.network_policy(&HashMap::new(), ""),
            &json!(self.labels),
            &flag.unwrap_or_default(),
        ])
    }

    /// The parts: the Deployment, the Service when there are ports, the Secret when there are
    /// secrets. Each hash covers the object as applied, but for replicas (`stopped` scales the
    /// same Deployment) and ownership labels. An instanced challenge has no Deployment or
    /// Service of its own: its NetworkPolicy (which walls in every instance) carries its version.
    pub fn parts(&self) -> Vec<Part> {
        let labels = json!(self.labels);
        let summary = self.summary();
        let mut parts = Vec::new();
        if self.instanced() {
            parts.push(Part {
                id: format!("NetworkPolicy/{}", self.name()),
                hash: self.version(),
                spec: Arc::new(summary),
                secrets: None,
                one_shot: false,
            });
        } else {
            parts.push(Part {
                id: format!("Deployment/{}", self.name()),
                hash: hash(&[&self.deployment(&HashMap::new(), "", true), &labels]),
                spec: Arc::new(summary),
                secrets: None,
                one_shot: false,
            });
            parts.push(Part {
                id: format!("NetworkPolicy/{}", self.name()),
                hash: hash(&[&self.network_policy(&HashMap::new(), ""), &labels]),
                spec: Arc::new(json!({ "network": self.spec.network, "ports": self.ports() })),
                secrets: None,
                one_shot: false,
            });
        }
        if let Some(service) = self
            .service(&HashMap::new(), "")
            .filter(|_| !self.instanced())
        {
            parts.push(Part {
                id: format!("Service/{}", self.name()),
                hash: hash(&[&service, &labels]),
                spec: Arc::new(json!({ "ports": self.ports() })),
                secrets: None,
                one_shot: false,
            });
        }
        if let Some(secret) = self.secret_name() {
            let keys: Vec<String> = self.secrets().into_keys().collect();
            parts.push(Part {
                id: format!("Secret/{secret}"),
                hash: hash(&[&json!(keys), &labels]),
                spec: Arc::new(json!({})),
                secrets: None,
                one_shot: false,
            });
        }
        parts
    }

    /// The Deployment in `namespace` with `labels`; at zero replicas when stopped, unless
    /// `as_running` (what its hash is of).
    pub fn deployment(
        &self,
        labels: &HashMap<String, String>,
        namespace: &str,
        as_running: bool,
    ) -> Value {
        self.deployment_claiming(labels, namespace, as_running, &|volume| {
            self.claim_name(volume)
        })
    }

    /// [`Self::deployment`], its named volumes mounting the claims `claim_of` names.
    fn deployment_claiming(
        &self,
        labels: &HashMap<String, String>,
        namespace: &str,
        as_running: bool,
        claim_of: &dyn Fn(&str) -> String,
    ) -> Value {
        let pod_labels = selector(labels);
        let replicas = match (self.spec.state, as_running) {
            (RunState::Stopped, false) => 0,
            _ => self.spec.replicas,
        };
        let secret = self.secret_name();
        let mut containers = vec![container(
            "main",
            self.spec
                .image
                .as_ref()
                .map_or("", ImageSource::resolved_name),
            &self.spec.entrypoint,
            &self.spec.command,
            env(&self.spec.env, self.spec.secret_env.keys(), "main", &secret),
            &self.spec.resources,
            &self.spec.security,
        )];
        if let Some(fields) = containers[0].as_object_mut() {
            let ports: Vec<Value> = self
                .spec
                .ports
                .iter()
                .map(|p| json!({"containerPort": p.container.0, "protocol": protocol(p.protocol)}))
                .collect();
            if !ports.is_empty() {
                fields.insert("ports".into(), ports.into());
            }
            // A solver is no probe: it runs beside the pod (`super::solve`), and its verdict is
            // the Deployment's health.
            if let Some(check) = self.spec.healthcheck.as_ref().filter(|c| c.solve.is_none()) {
                fields.insert("readinessProbe".into(), probe(check));
            }
            // Each secret file is one key of the Secret, mounted at its path alone.
            if !self.spec.secret_files.is_empty() {
                let mounts = fields
                    .entry("volumeMounts")
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Some(mounts) = mounts.as_array_mut() {
                    for (index, file) in self.spec.secret_files.iter().enumerate() {
                        mounts.push(json!({
                            "name": SECRET_FILES_VOLUME,
                            "mountPath": file.path,
                            "subPath": format!("file-{index}"),
                            "readOnly": true,
                        }));
                    }
                }
            }
        }
        for sidecar in &self.spec.sidecars {
            let mut made = container(
                sidecar.name.as_str(),
                sidecar
                    .image
                    .as_ref()
                    .map_or("", ImageSource::resolved_name),
                &sidecar.entrypoint,
                &sidecar.command,
                env(
                    &sidecar.env,
                    sidecar.secret_env.keys(),
                    sidecar.name.as_str(),
                    &secret,
                ),
                &sidecar.resources,
                &sidecar.security,
            );
            // The pod is ready, and the Service sends to it, only once the sidecar is too.
            if let (Some(check), Some(fields)) = (&sidecar.healthcheck, made.as_object_mut()) {
                fields.insert("readinessProbe".into(), probe(check));
            }
            if !sidecar.ports.is_empty() {
                made["ports"] = sidecar
                    .ports
                    .iter()
                    .map(|p| json!({"containerPort": p.container.0, "protocol": protocol(p.protocol)}))
                    .collect::<Vec<_>>()
                    .into();
            }
            containers.push(made);
        }
        let volumes: Vec<Value> = std::iter::once(("main", &self.spec.security))
            .chain(
                self.spec
                    .sidecars
                    .iter()
                    .map(|s| (s.name.as_str(), &s.security)),
            )
            .flat_map(|(container, security)| {
                security.tmpfs.iter().enumerate().map(move |(index, mount)| {
                    json!({
                        "name": tmpfs_volume(container, index),
                        "emptyDir": { "medium": "Memory", "sizeLimit": mount.size.bytes.to_string() },
                    })
                })
            })
            .collect();
        let mut volumes = volumes;
        let (stored, mounts) = self.volume_mounts(claim_of);
        volumes.extend(stored);
        for (container, mounts) in containers.iter_mut().zip(mounts) {
            if mounts.is_empty() {
                continue;
            }
            let had = container["volumeMounts"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            container["volumeMounts"] = had.into_iter().chain(mounts).collect::<Vec<_>>().into();
        }
        let mut pod_security = json!({});
        if let (false, Some(secret)) = (self.spec.secret_files.is_empty(), &secret) {
            // A user of the container's own reads its files through their group, as Kubernetes
            // gives a Secret's files to the pod's fsGroup.
            let group_read = match self.spec.secret_files_group() {
                Some(group) => {
                    pod_security["fsGroup"] = json!(group);
                    0o040
                }
                None => 0,
            };
            let items: Vec<Value> = self
                .spec
                .secret_files
                .iter()
                .enumerate()
                .map(|(index, file)| {
                    json!({
                        "key": secret_file_key(index),
                        "path": format!("file-{index}"),
                        "mode": file.mode_bits() | group_read,
                    })
                })
                .collect();
            volumes.push(json!({
                "name": SECRET_FILES_VOLUME,
                "secret": { "secretName": secret, "items": items },
            }));
        }
        let mut pod_metadata = json!({ "labels": pod_labels });
        if let Some(id) = &self.image_id {
            pod_metadata["annotations"][ANNOTATION_IMAGE_ID] = json!(id);
        }
        if !self.sidecar_image_ids.is_empty() {
            pod_metadata["annotations"][ANNOTATION_SIDECAR_IMAGE_IDS] =
                json!(json!(self.sidecar_image_ids).to_string());
        }
        let mut deployment = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata(self.name(), namespace, labels),
            "spec": {
                "replicas": replicas,
                "selector": { "matchLabels": pod_labels },
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": { "maxUnavailable": 0, "maxSurge": 1 },
                },
                "template": {
                    "metadata": pod_metadata,
                    "spec": {
                        "containers": containers,
                        "volumes": volumes,
                        // As on Docker: `stopTimeout`, else Docker's own 10 seconds.
                        "terminationGracePeriodSeconds": self.spec.stop_seconds(),
                        "enableServiceLinks": false,
                        "automountServiceAccountToken": false,
                    },
                },
            },
        });
        // Only when there is something to say: a field more on every pod would roll them all.
        if pod_security
            .as_object()
            .is_some_and(|fields| !fields.is_empty())
        {
            deployment["spec"]["template"]["spec"]["securityContext"] = pod_security;
        }
        deployment
    }

    /// The challenge's NetworkPolicy: in, only to its own ports (from anywhere: players come
    /// through the NodePort); out, to the internet but no cluster-internal range, DNS, and the
    /// challenges it names in `allowConnectTo`; with `egress: false`, nothing out at all. An
    /// instanced challenge's selects its teams' pods (labelled [`INSTANCE_KIND`]).
    pub fn network_policy(&self, labels: &HashMap<String, String>, namespace: &str) -> Value {
        let all = self.ports();
        let ingress: Vec<Value> = match all.is_empty() {
            true => Vec::new(),
            false => vec![json!({
                "ports": all
                    .iter()
                    .map(|p| json!({"port": p.container.0, "protocol": protocol(p.protocol)}))
                    .collect::<Vec<_>>(),
            })],
        };
        let instance = labels.get(LABEL_INSTANCE).cloned().unwrap_or_default();
        let mut egress: Vec<Value> = self
            .spec
            .network
            .allow_connect_to
            .iter()
            .map(|target| {
                json!({ "to": [{ "podSelector": { "matchLabels": {
                    LABEL_INSTANCE: instance,
                    LABEL_KIND: "Challenge",
                    LABEL_NAME: target.name.as_str(),
                }}}]})
            })
            .collect();
        if self.spec.network.egress {
            egress.push(
                json!({ "to": [{ "ipBlock": { "cidr": "0.0.0.0/0", "except": CLUSTER_RANGES } }] }),
            );
            egress.push(json!({
                "to": [{ "namespaceSelector": {}, "podSelector": { "matchLabels": { "k8s-app": "kube-dns" } } }],
                "ports": [{ "port": 53, "protocol": "UDP" }, { "port": 53, "protocol": "TCP" }],
            }));
        }
        let mut pods = json!(selector(labels));
        if self.instanced() {
            pods[LABEL_KIND] = INSTANCE_KIND.into();
        }
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": metadata(self.name(), namespace, labels),
            "spec": {
                "podSelector": { "matchLabels": pods },
                "policyTypes": ["Ingress", "Egress"],
                "ingress": ingress,
                "egress": egress,
            },
        })
    }

    /// A Service's ports, one for each of the challenge's, named `port-N`, on the NodePort
    /// `node_port(N)` gives, if any.
    /// Every port of the pod's containers: the main one's, then each sidecar's.
    fn ports(&self) -> Vec<&PortMapping> {
        self.spec
            .all_ports()
            .into_iter()
            .map(|at| at.port)
            .collect()
    }

    fn service_ports(&self, node_port: impl Fn(usize) -> Option<u16>) -> Vec<Value> {
        self.ports()
            .into_iter()
            .enumerate()
            .map(|(index, port)| {
                let mut entry = json!({
                    "name": format!("port-{index}"),
                    "port": port.container.0,
                    "targetPort": port.container.0,
                    "protocol": protocol(port.protocol),
                });
                if let Some(node_port) = node_port(index) {
                    entry["nodePort"] = node_port.into();
                }
                entry
            })
            .collect()
    }

    /// The Service, when the challenge has ports: a NodePort when any is published on the host.
    pub fn service(&self, labels: &HashMap<String, String>, namespace: &str) -> Option<Value> {
        let all = self.ports();
        if all.is_empty() {
            return None;
        }
        let published = all.iter().any(|p| p.host.is_some());
        let ports = self.service_ports(|index| all[index].host.map(|host| host.0));
        let selector = selector(labels);
        Some(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(self.name(), namespace, labels),
            "spec": {
                "type": if published { "NodePort" } else { "ClusterIP" },
                "selector": selector,
                "ports": ports,
            },
        }))
    }

    /// The Secret with `values` (by key, already resolved), when there are secrets.
    pub fn secret(
        &self,
        labels: &HashMap<String, String>,
        namespace: &str,
        values: &BTreeMap<String, String>,
    ) -> Option<Value> {
        use base64::Engine as _;
        let name = self.secret_name()?;
        let data: serde_json::Map<String, Value> = values
            .iter()
            .map(|(key, value)| {
                (
                    key.clone(),
                    base64::engine::general_purpose::STANDARD
                        .encode(value)
                        .into(),
                )
            })
            .collect();
        Some(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata(&name, namespace, labels),
            "type": "Opaque",
            "data": data,
        }))
    }
}

/// The `berth.kind` label of everything made for a team's instance: neither the challenge's
/// shared Service (were it made shared again) nor another challenge's `allowConnectTo` selects
/// those pods, which are labelled `Challenge`.
pub const INSTANCE_KIND: &str = "ChallengeInstance";
/// A team's instance idles nearly all the time: its containers request a hundredth of their CPU
/// limit (at least 1m) rather than a challenge's tenth, so a node schedules a hundred instances
/// per CPU instead of ten. The limits stay as declared.
fn idle_cpu_requests(pod: &mut Value) {
    let Some(containers) = pod["containers"].as_array_mut() else {
        return;
    };
    for container in containers {
        let limit = container
            .pointer("/resources/limits/cpu")
            .and_then(Value::as_str)
            .and_then(|cpu| cpu.strip_suffix('m'))
            .and_then(|millis| millis.parse::<u64>().ok());
        if let Some(limit) = limit {
            container["resources"]["requests"]["cpu"] = format!("{}m", (limit / 100).max(1)).into();
        }
    }
}

/// The claim of the named volume `volume` of the instance whose objects are named `base`: a `.`
/// between, as for a challenge's own claims.
pub fn instance_claim_name(base: &str, volume: &str) -> String {
    format!("{base}.{volume}")
}

/// The volume of an instance's flag file.
const FLAG_VOLUME: &str = "berth-flag";
/// The key of the flag in an instance's flag Secret.
const FLAG_KEY: &str = "flag";

impl ChallengeTemplate {
    /// An instance's pod `name`: the challenge's pod with `labels` (ownership as
    /// [`INSTANCE_KIND`], the instance's id and version), and, when it has its team's flag, the
    /// key of the Secret `flag_secret` in its environment or at its file (mounted there alone
    /// and read-only). The flag itself is never in the pod's spec.
    pub fn instance_pod(
        &self,
        labels: &HashMap<String, String>,
        namespace: &str,
        (base, name): (&str, &str),
        flag_secret: Option<&str>,
    ) -> Value {
        // Its named volumes are the instance's own claims, never the challenge's.
        let deployment = self.deployment_claiming(labels, namespace, true, &|volume| {
            instance_claim_name(base, volume)
        });
        let template = &deployment["spec"]["template"];
        let mut spec = template["spec"].clone();
        spec["restartPolicy"] = "Always".into();
        idle_cpu_requests(&mut spec);
        let given = self.spec.instanced.as_ref().and_then(|i| i.flag.as_ref());
        if let (Some(given), Some(flag_secret)) = (given, flag_secret) {
            let main = &mut spec["containers"][0];
            if let Some(variable) = &given.env {
                let env = main["env"].as_array().cloned().unwrap_or_default();
                let from = json!({"secretKeyRef": {"name": flag_secret, "key": FLAG_KEY}});
                main["env"] = env
                    .into_iter()
                    .chain([json!({"name": variable, "valueFrom": from})])
                    .collect::<Vec<_>>()
                    .into();
            }
            if let Some(file) = &given.file {
                let mounts = main["volumeMounts"].as_array().cloned().unwrap_or_default();
                main["volumeMounts"] = mounts
                    .into_iter()
                    .chain([json!({"name": FLAG_VOLUME, "mountPath": file, "subPath": FLAG_KEY, "readOnly": true})])
                    .collect::<Vec<_>>()
                    .into();
                // Readable by the challenge's user through its group, as a secret file is.
                let mode = match self.spec.secret_files_group() {
                    Some(group) => {
                        spec["securityContext"]["fsGroup"] = json!(group);
                        0o440
                    }
                    None => 0o400,
                };
                let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
                spec["volumes"] = volumes
                    .into_iter()
                    .chain([json!({
                        "name": FLAG_VOLUME,
                        "secret": { "secretName": flag_secret, "items": [{"key": FLAG_KEY, "path": FLAG_KEY, "mode": mode}] },
                    })])
                    .collect::<Vec<_>>()
                    .into();
            }
        }
        let mut pod_metadata = metadata(name, namespace, labels);
        if let Some(annotations) = template["metadata"].get("annotations") {
            pod_metadata["annotations"] = annotations.clone();
        }
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": pod_metadata, "spec": spec })
    }

    /// An instance's NodePort Service `name`, sending to the pods of instance `id` only: on
    /// `node_ports` when given (an instance made again keeps its ports), else on the ports the
    /// cluster gives.
    pub fn instance_service(
        &self,
        labels: &HashMap<String, String>,
        namespace: &str,
        name: &str,
        id: &str,
        node_ports: &[u16],
    ) -> Value {
        let ports = self.service_ports(|index| node_ports.get(index).copied());
        let instance = labels.get(LABEL_INSTANCE).cloned().unwrap_or_default();
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(name, namespace, labels),
            "spec": {
                "type": "NodePort",
                "selector": { LABEL_INSTANCE: instance, LABEL_INSTANCE_ID: id },
                "ports": ports,
            },
        })
    }

    /// An instance's own NetworkPolicy `name`: the challenge's, for the pods of instance `id`
    /// alone. Policies add up, so an instance of an older version (`onUpdate: keep`) keeps its
    /// own ports open when the challenge's policy moved on to a new version's.
    pub fn instance_policy(
        &self,
        labels: &HashMap<String, String>,
        namespace: &str,
        name: &str,
        id: &str,
    ) -> Value {
        let mut policy = self.network_policy(labels, namespace);
        policy["metadata"]["name"] = name.into();
        let instance = labels.get(LABEL_INSTANCE).cloned().unwrap_or_default();
        policy["spec"]["podSelector"]["matchLabels"] =
            json!({ LABEL_INSTANCE: instance, LABEL_INSTANCE_ID: id });
        policy
    }

    /// An instance's Secret `name` holding the team's flag, when the challenge gives one.
    pub fn flag_secret(
        &self,
        labels: &HashMap<String, String>,
        namespace: &str,
        name: &str,
        flag: &str,
    ) -> Option<Value> {
        use base64::Engine as _;
        self.spec.instanced.as_ref()?.flag.as_ref()?;
        Some(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata(name, namespace, labels),
            "type": "Opaque",
            "data": { FLAG_KEY: base64::engine::general_purpose::STANDARD.encode(flag) },
        }))
    }
}

/// The ownership labels without the spec hash: what the pods carry, and what the Deployment and
/// the Service select them by.
fn selector(labels: &HashMap<String, String>) -> BTreeMap<&String, &String> {
    labels
        .iter()
        .filter(|(key, _)| [LABEL_INSTANCE, LABEL_KIND, LABEL_NAME].contains(&key.as_str()))
        .collect()
}

fn metadata(name: &str, namespace: &str, labels: &HashMap<String, String>) -> Value {
    let labels: BTreeMap<&String, &String> = labels.iter().collect();
    let mut metadata = json!({ "name": name, "labels": labels });
    if !namespace.is_empty() {
        metadata["namespace"] = namespace.into();
    }
    metadata
}

/// `text` as Kubernetes passes it on literally: it expands `$(NAME)` and reads `$$` as `$`.
fn literal(text: &str) -> String {
    text.replace('$', "$$")
}

/// A pod volume's name: `PREFIX-TEXT`, within a DNS label's 63 characters (a long text is cut,
/// and a digest of it keeps it apart).
fn pod_volume_name(prefix: &str, text: &str) -> String {
    let name = format!("{prefix}-{text}");
    if name.len() <= 63 {
        return name;
    }
    let cut: String = text.chars().take(50).collect();
    format!(
        "{prefix}-{}-{}",
        cut.trim_end_matches('-'),
        &hash(&[&json!(text)])[..8]
    )
}

/// The first 16 letters and digits of a digest, lower-case, for a name.
fn short_digest(digest: &str) -> String {
    digest
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(16)
        .collect()
}

fn tmpfs_volume(container: &str, index: usize) -> String {
    format!("tmpfs-{container}-{index}")
}

/// The volume of a challenge's secret files.
const SECRET_FILES_VOLUME: &str = "berth-secret-files";

/// The key of the challenge's secret file `index` in its Secret.
fn secret_file_key(index: usize) -> String {
    format!("main.file-{index}")
}

/// A container's `securityContext`: no privilege escalation and no `NET_RAW` unless asked for,
/// and what its `security` declares.
fn security_context(security: &Security) -> Value {
    let mut context = json!({
        "capabilities": {
            "drop": security.capabilities.dropped(),
            "add": security.capabilities.added(),
        },
        "readOnlyRootFilesystem": security.read_only_root_filesystem,
        "privileged": security.privileged,
    });
    // The API server refuses privileged with allowPrivilegeEscalation: false.
    if !security.privileged {
        context["allowPrivilegeEscalation"] = false.into();
    }
    if let Some(user) = security.user {
        context["runAsUser"] = user.uid.into();
        if let Some(gid) = user.gid {
            context["runAsGroup"] = gid.into();
        }
    }
    context
}

fn container(
    name: &str,
    image: &str,
    entrypoint: &Option<Vec<String>>,
    command: &Option<Vec<String>>,
    env: Vec<Value>,
    resources: &Option<Resources>,
    security: &Security,
) -> Value {
    let mut container = json!({
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "securityContext": security_context(security),
    });
    if !security.tmpfs.is_empty() {
        container["volumeMounts"] = security
            .tmpfs
            .iter()
            .enumerate()
            .map(|(index, mount)| json!({"name": tmpfs_volume(name, index), "mountPath": mount.path}))
            .collect::<Vec<_>>()
            .into();
    }
    let words = |list: &Vec<String>| -> Vec<String> { list.iter().map(|w| literal(w)).collect() };
    // Docker's entrypoint is Kubernetes' command; Docker's command is its args.
    if let Some(entrypoint) = entrypoint {
        container["command"] = json!(words(entrypoint));
    }
    if let Some(command) = command {
        container["args"] = json!(words(command));
    }
    if !env.is_empty() {
        container["env"] = env.into();
    }
    if let Some(resources) = resources {
        let mut limits = serde_json::Map::new();
        if let Some(cpus) = resources.cpus {
            limits.insert(
                "cpu".into(),
                format!("{}m", (cpus * 1000.0).round() as u64).into(),
            );
        }
        if let Some(memory) = &resources.memory {
            limits.insert("memory".into(), memory.bytes.to_string().into());
        }
        if !limits.is_empty() {
            // Requests are a tenth of the limits: a node schedules by requests, and limits taken
            // as requests (Kubernetes' default) would let a 2-CPU node hold one challenge of two
            // containers and no rolling update of it. Challenges idle most of the time.
            let mut requests = serde_json::Map::new();
            if let Some(cpus) = resources.cpus {
                requests.insert(
                    "cpu".into(),
                    format!("{}m", (cpus * 100.0).round().max(1.0) as u64).into(),
                );
            }
            if let Some(memory) = &resources.memory {
                requests.insert("memory".into(), (memory.bytes / 10).to_string().into());
            }
            container["resources"] = json!({ "limits": limits, "requests": requests });
        }
    }
    container
}

fn env<'a>(
    plain: &BTreeMap<String, String>,
    secret_names: impl Iterator<Item = &'a String>,
    container: &str,
    secret: &Option<String>,
) -> Vec<Value> {
    let mut env: Vec<Value> = plain
        .iter()
        .map(|(name, value)| json!({"name": name, "value": literal(value)}))
        .collect();
    for name in secret_names {
        env.push(json!({
            "name": name,
            "valueFrom": { "secretKeyRef": {
                "name": secret.as_deref().unwrap_or_default(),
                "key": format!("{container}.{name}"),
            }},
        }));
    }
    env
}

fn protocol(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

/// The health check as a readiness probe: the kubelet checks from outside the container, so the
/// image needs no `nc` or `wget`.
fn probe(check: &HealthCheck) -> Value {
    let seconds = |d: &crate::descriptor::values::Duration| d.0.as_secs().max(1);
    let mut probe = json!({
        "periodSeconds": seconds(&check.interval),
        "timeoutSeconds": seconds(&check.timeout),
        "failureThreshold": check.retries,
    });
    if let Some(port) = check.tcp {
        probe["tcpSocket"] = json!({ "port": port.0 });
    } else if let Some(http) = &check.http {
        probe["httpGet"] = json!({ "port": http.port.0, "path": http.path });
    }
    probe
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Ownership;
    use crate::plan::ProducedImage;

    fn template(yaml_spec: Value) -> ChallengeTemplate {
        let mut spec = json!({"image": "web:1", "target": "kubernetes"});
        spec.as_object_mut()
            .unwrap()
            .extend(yaml_spec.as_object().unwrap().clone());
        ChallengeTemplate {
            key: "Challenge/web".parse().unwrap(),
            spec: serde_json::from_value(spec).unwrap(),
            labels: BTreeMap::new(),
            image_id: None,
            sidecar_image_ids: BTreeMap::new(),
            folders: BTreeMap::new(),
        }
    }

    /// A named volume is a claim the main container and a sidecar share by name; a folder is a
    /// ConfigMap named by its content, its files (nested too) at their paths, read-only.
    #[test]
    fn volumes_are_claims_and_folders_config_maps() {
        let mut t = template(json!({
            "volumes": [{"name": "data", "path": "/data", "size": "64Mi"}, {"from": "web/seed", "path": "/seed"}],
            "sidecars": [{"name": "db", "image": "db:1", "volumes": [{"name": "data", "path": "/var/lib/db", "readOnly": true}]}],
        }));
        t.folders.insert(
            "web/seed".into(),
            FolderCopy {
                digest: crate::descriptor::ContentDigest::Read("ABCDEF0123456789abcdef".into()),
                files: vec![("01.sql".into(), false, 9), ("bin/run.sh".into(), true, 5)],
            },
        );
        let pod = &t.deployment(&labels(), "ns", false)["spec"]["template"]["spec"];
        assert_eq!(
            pod["volumes"],
            json!([
                {"name": "f-abcdef0123456789", "configMap": {"name": "web.folder-abcdef0123456789", "items": [
                    {"key": "f0", "path": "01.sql", "mode": 0o444},
                    {"key": "f1", "path": "bin/run.sh", "mode": 0o555}]}},
                {"name": "v-data", "persistentVolumeClaim": {"claimName": "web.data"}},
            ])
        );
        assert_eq!(
            pod["containers"][0]["volumeMounts"],
            json!([{"name": "v-data", "mountPath": "/data", "readOnly": false},
                   {"name": "f-abcdef0123456789", "mountPath": "/seed", "readOnly": true}])
        );
        assert_eq!(
            pod["containers"][1]["volumeMounts"],
            json!([{"name": "v-data", "mountPath": "/var/lib/db", "readOnly": true}])
        );
        let claims = t.claims(&labels(), "ns");
        assert_eq!(claims.len(), 1, "one claim for the volume both mount");
        assert_eq!(
            claims[0].1["spec"]["resources"]["requests"]["storage"],
            "67108864"
        );
        let long = pod_volume_name("v", &"x".repeat(63));
        assert!(
            long.len() <= 63 && long != pod_volume_name("v", &"x".repeat(62)),
            "{long}"
        );
    }

    fn labels() -> HashMap<String, String> {
        Ownership::new("ctf").labels(&"Challenge/web".parse().unwrap(), "h")
    }

    /// A flag file on Kubernetes: one key of the challenge's Secret, mounted at its path alone,
    /// readable by the challenge's user through the pod's fsGroup; without secret files the
    /// pod has no securityContext of its own (nothing rolls for them).
    #[test]
    fn a_secret_file_is_a_key_of_the_secret_mounted_at_its_path() {
        let t = template(json!({
            "security": {"user": "1000:1000"},
            "secretFiles": [{"path": "/home/ctf/flag.txt", "secret": {"file": "/f"}, "mode": "0400"}],
        }));
        assert!(t.secrets().contains_key("main.file-0"));
        let deployment = t.deployment(&labels(), "ns", false);
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"], json!({"fsGroup": 1000}));
        assert_eq!(
            pod["volumes"][0],
            json!({"name": "berth-secret-files", "secret": {"secretName": "web-env",
                "items": [{"key": "main.file-0", "path": "file-0", "mode": 0o440}]}})
        );
        assert_eq!(
            pod["containers"][0]["volumeMounts"][0],
            json!({"name": "berth-secret-files", "mountPath": "/home/ctf/flag.txt", "subPath": "file-0", "readOnly": true})
        );
        let plain = template(json!({}));
        assert!(
            plain.deployment(&labels(), "ns", false)["spec"]["template"]["spec"]
                .get("securityContext")
                .is_none()
        );
    }

    #[test]
    fn a_challenge_becomes_a_deployment_whose_sidecars_share_the_pod() {
        let t = template(json!({
            "replicas": 2,
            "command": ["serve", "$(NOT_A_VAR)"],
            "env": {"MODE": "a$b"},
            "secretEnv": {"FLAG": {"file": "/f"}},
            "ports": [{"container": 8080, "host": 30080}],
            "healthcheck": {"http": {"port": 8080, "path": "/ready"}, "interval": "500ms"},
            "resources": {"cpus": 0.5, "memory": "64Mi"},
            "sidecars": [{"name": "db", "image": "redis:7", "secretEnv": {"PASS": {"env": "P"}},
                "healthcheck": {"tcp": 6379}, "ports": [{"container": 6379, "host": 30379}]}],
        }));
        let deployment = t.deployment(&labels(), "ns", false);
        assert_eq!(deployment["spec"]["replicas"], 2);
        assert_eq!(
            deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
            0
        );
        let containers = deployment["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(containers.len(), 2, "the sidecar is a container of the pod");
        let main = &containers[0];
        assert_eq!(main["args"], json!(["serve", "$$(NOT_A_VAR)"]));
        assert_eq!(main["env"][0], json!({"name": "MODE", "value": "a$$b"}));
        assert_eq!(
            main["env"][1]["valueFrom"]["secretKeyRef"],
            json!({"name": "web-env", "key": "main.FLAG"})
        );
        assert_eq!(
            main["readinessProbe"],
            json!({"httpGet": {"port": 8080, "path": "/ready"}, "periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 3})
        );
        assert_eq!(
            main["resources"]["limits"],
            json!({"cpu": "500m", "memory": "67108864"})
        );
        assert_eq!(
            containers[1]["readinessProbe"]["tcpSocket"],
            json!({"port": 6379}),
            "the pod is ready only once its sidecar is"
        );
        assert_eq!(
            containers[1]["env"][0]["valueFrom"]["secretKeyRef"]["key"],
            "db.PASS"
        );
        let selector = &deployment["spec"]["selector"]["matchLabels"];
        assert_eq!(selector.as_object().unwrap().len(), 3, "{selector}");
        assert_eq!(
            deployment["spec"]["template"]["metadata"]["labels"],
            *selector
        );
        let service = t.service(&labels(), "ns").unwrap();
        assert_eq!(service["spec"]["type"], "NodePort");
        assert_eq!(service["spec"]["ports"][0]["nodePort"], 30080);
        assert_eq!(service["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(
            (
                &service["spec"]["ports"][1]["port"],
                &service["spec"]["ports"][1]["nodePort"]
            ),
            (&json!(6379), &json!(30379)),
            "the sidecar's port is the Service's too"
        );
        let ids: Vec<String> = t.parts().into_iter().map(|p| p.id).collect();
        assert_eq!(
            ids,
            [
                "Deployment/web",
                "NetworkPolicy/web",
                "Service/web",
                "Secret/web-env"
            ]
        );
    }

    #[test]
    fn stopping_scales_to_zero_without_changing_the_hash() {
        let running = template(json!({}));
        let stopped = template(json!({"state": "stopped"}));
        assert_eq!(
            stopped.deployment(&labels(), "ns", false)["spec"]["replicas"],
            0
        );
        assert_eq!(running.parts()[0].hash, stopped.parts()[0].hash);
        let other_image = template(json!({"image": "web:2"}));
        assert_ne!(running.parts()[0].hash, other_image.parts()[0].hash);
    }

    #[test]
    fn without_ports_there_is_no_service_and_unpublished_ports_stay_in_the_cluster() {
        assert!(template(json!({})).service(&labels(), "ns").is_none());
        let inside = template(json!({"ports": [{"container": 6379, "protocol": "udp"}]}));
        let service = inside.service(&labels(), "ns").unwrap();
        assert_eq!(service["spec"]["type"], "ClusterIP");
        assert_eq!(service["spec"]["ports"][0]["protocol"], "UDP");
    }

    /// An instanced challenge has no Deployment or Service: its policy carries the version, and
    /// each team's pod carries its id and its flag, which its own Service selects it by.
    #[test]
    fn an_instance_is_a_pod_with_its_teams_flag_behind_a_node_port_of_its_own() {
        let env = template(json!({
            "ports": [{"container": 1337}],
            "instanced": {"ttl": "10m", "flag": {"env": "FLAG", "format": "f{%s}"}},
        }));
        let ids: Vec<String> = env.parts().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, ["NetworkPolicy/web"]);
        assert_eq!(env.parts()[0].hash, env.version());
        let mut labels = labels();
        labels.insert(LABEL_INSTANCE_ID.into(), "abc".into());
        labels.insert(LABEL_KIND.into(), INSTANCE_KIND.into());
        let pod = env.instance_pod(&labels, "ns", ("inst-web-abc", "inst-web-abc-1"), Some("s"));
        assert_eq!(pod["kind"], "Pod");
        assert_eq!(pod["metadata"]["labels"][LABEL_INSTANCE_ID], "abc");
        assert_eq!(
            pod["spec"]["containers"][0]["env"],
            json!([{"name": "FLAG", "valueFrom": {"secretKeyRef": {"name": "s", "key": "flag"}}}])
        );
        // The challenge's policy and the instance's own select the pod; a shared challenge's
        // Service of the same name would not.
        let selects = |policy: &Value| {
            let selected = policy["spec"]["podSelector"]["matchLabels"]
                .as_object()
                .unwrap();
            selected
                .iter()
                .all(|(k, v)| pod["metadata"]["labels"][k] == *v)
        };
        assert!(selects(&env.network_policy(&labels, "ns")));
        assert!(selects(&env.instance_policy(
            &labels,
            "ns",
            "inst-web-abc",
            "abc"
        )));
        let shared = template(json!({"ports": [{"container": 1337}]}));
        let service = shared.service(&super::tests::labels(), "ns").unwrap();
        let service_selects = service["spec"]["selector"]
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| pod["metadata"]["labels"][k] == *v);
        assert!(
            !service_selects,
            "a shared Service would send players to a team's pod"
        );
        let service = env.instance_service(&labels, "ns", "inst-web-abc", "abc", &[]);
        assert_eq!(service["spec"]["type"], "NodePort");
        assert_eq!(service["spec"]["selector"][LABEL_INSTANCE_ID], "abc");
        assert!(service["spec"]["ports"][0].get("nodePort").is_none());
        let again = env.instance_service(&labels, "ns", "inst-web-abc", "abc", &[31999]);
        assert_eq!(again["spec"]["ports"][0]["nodePort"], 31999);
        assert!(env.flag_secret(&labels, "ns", "s", "f{x}").is_some());
        assert!(shared.flag_secret(&labels, "ns", "s", "f{x}").is_none());

        let file = template(json!({
            "ports": [{"container": 1337}],
            "security": {"user": "1000:1000", "readOnlyRootFilesystem": true},
            "instanced": {"ttl": "10m", "flag": {"file": "/flag.txt"}},
        }));
        assert_ne!(file.version(), env.version());
        let pod = file.instance_pod(
            &labels,
            "ns",
            ("inst-web-abc", "p"),
            Some("inst-web-abc-flag"),
        );
        assert_eq!(
            pod["spec"]["containers"][0]["volumeMounts"],
            json!([{"name": "berth-flag", "mountPath": "/flag.txt", "subPath": "flag", "readOnly": true}])
        );
        assert_eq!(pod["spec"]["securityContext"], json!({"fsGroup": 1000}));
        assert_eq!(
            pod["spec"]["volumes"],
            json!([{"name": "berth-flag", "secret": {"secretName": "inst-web-abc-flag", "items": [{"key": "flag", "path": "flag", "mode": 0o440}]}}])
        );
        let secret = file
            .flag_secret(&labels, "ns", "inst-web-abc-flag", "f{x}")
            .unwrap();
        assert_eq!(secret["data"]["flag"], "Znt4fQ==");
        // A pooled pod has no flag at all.
        let pooled = file.instance_pod(&labels, "ns", ("inst-web-abc", "p"), None);
        assert_eq!(pooled["spec"]["volumes"], json!([]));

        // An instance requests a hundredth of its CPU limit: a node holds many idle ones.
        let limited = template(json!({
            "ports": [{"container": 1337}],
            "resources": {"cpus": 0.5, "memory": "64Mi"},
            "instanced": {"ttl": "10m"},
        }));
        let pod = limited.instance_pod(&labels, "ns", ("inst-web-abc", "p"), None);
        assert_eq!(
            pod["spec"]["containers"][0]["resources"],
            json!({"limits": {"cpu": "500m", "memory": "67108864"}, "requests": {"cpu": "5m", "memory": "6710886"}})
        );

        // Each instance's named volume is a claim of its own; a folder is the challenge's one
        // copy, shared read-only; the challenge itself has no claim.
        let stored = template(json!({
            "ports": [{"container": 1337}],
            "volumes": [{"name": "data", "path": "/data", "size": "64Mi"}],
            "instanced": {"ttl": "10m"},
        }));
        assert!(stored.claims(&labels, "ns").is_empty());
        let claims = stored.instance_claims(&labels, "ns", "inst-web-abc");
        let names: Vec<&str> = claims.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["inst-web-abc.data"]);
        assert_eq!(claims[0].1["metadata"]["labels"][LABEL_INSTANCE_ID], "abc");
        let pod = stored.instance_pod(&labels, "ns", ("inst-web-abc", "p"), None);
        assert_eq!(
            pod["spec"]["volumes"],
            json!([{"name": "v-data", "persistentVolumeClaim": {"claimName": "inst-web-abc.data"}}])
        );
        let other = stored.instance_pod(&labels, "ns", ("inst-web-xyz", "q"), None);
        assert_eq!(
            other["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "inst-web-xyz.data"
        );
    }

    #[test]
    fn a_rebuilt_product_rolls_the_pods_whether_the_main_container_or_a_sidecar_runs_it() {
        let products = |app: &str, bot: &str| {
            let mut products = Products::default();
            let image = |tag: &str, id: &str| ProducedImage {
                tag: tag.into(),
                id: id.into(),
            };
            products.insert("app".parse().unwrap(), image("app:v1", app));
            products.insert("bot".parse().unwrap(), image("bot:v1", bot));
            products
        };
        let spec = json!({
            "image": {"fromPipeline": "app"},
            "sidecars": [{"name": "admin", "image": {"fromPipeline": "bot"}}],
        });
        let first = template(spec.clone())
            .with_products(&products("sha256:a", "sha256:b"))
            .unwrap();
        let deployment = first.deployment(&HashMap::new(), "ns", true);
        let containers = &deployment["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers[0]["image"], "app:v1");
        assert_eq!(
            containers[1]["image"], "bot:v1",
            "the sidecar runs its product"
        );
        assert_eq!(
            deployment["spec"]["template"]["metadata"]["annotations"][ANNOTATION_SIDECAR_IMAGE_IDS],
            r#"{"admin":"sha256:b"}"#
        );
        let main_again = template(spec.clone())
            .with_products(&products("sha256:c", "sha256:b"))
            .unwrap();
        let sidecar_again = template(spec.clone())
            .with_products(&products("sha256:a", "sha256:d"))
            .unwrap();
        assert_ne!(first.parts()[0].hash, main_again.parts()[0].hash);
        assert_ne!(first.parts()[0].hash, sidecar_again.parts()[0].hash);

        let mut missing = Products::default();
        missing.insert(
            "app".parse().unwrap(),
            ProducedImage {
                tag: "app:v1".into(),
                id: "sha256:a".into(),
            },
        );
        assert!(
            template(spec).with_products(&missing).is_none(),
            "without the sidecar's product it takes none"
        );
    }
}
