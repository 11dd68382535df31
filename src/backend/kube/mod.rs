//! Stagings on Kubernetes, and the backend's shared client (Challenges on Kubernetes are shaped in
//! `challenge` and applied in `deploy`; the Lease of leader election is `crate::leader`'s).
//!
//! A staging is a namespace berth makes, and the objects of its manifests in it, each applied by
//! server-side apply with field manager `berth` and forced, so a hand edit is taken back. Every
//! object carries the ownership labels; the namespace also carries the *inventory*, the kinds
//! berth applied there (as Flux's inventory and kubectl's ApplySet do), so observing is one list
//! per kind for every staging at once, and prune deletes only what berth made. The inventory is
//! widened before objects are applied and narrowed after pruning, so a crash between leaves
//! nothing the next pass cannot find.
//!
//! Archive applies the same objects with workloads at zero replicas (kept in an annotation) and
//! marks the namespace with the time; restore is the plain apply. Cleanup deletes the namespace
//! and waits until it is gone. A staging archived for longer than its `ttl` is cleaned up and a
//! bare namespace is left as a tombstone, so it is not made again while the repo still says
//! `archived`.
//!
//! Helm hooks in the manifests run around the apply (`hooks`): `pre-install`/`pre-upgrade` ones
//! before the other objects, `post-…` ones after, each made anew and its Jobs waited for; test
//! hooks and those of delete and rollback are left out when the manifests are read.
//!
//! Discovery runs once (`Discovery::run`, which 1.20 servers answer) and again only when a kind
//! is not found. No request sends `fieldValidation`, which 1.20 does not know.

pub mod challenge;
mod deploy;
pub mod health;
mod hooks;
pub mod instances;
pub mod objects;
mod solve;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope};
use kube::{Client, Config};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{EngineError, LABEL_INSTANCE, LABEL_KIND, LABEL_NAME, LABEL_SPEC_HASH, Ownership};
use crate::apply::Outcome;
use crate::descriptor::manifests::{self, Hook, Manifest, Rendered, SECRET_NAME};
use crate::descriptor::model::{StagingSpec, StagingState, TagSource};
use crate::descriptor::values::SecretRef;
use crate::descriptor::{Descriptor, Kind, ObjectRef, Spec};
use crate::plan::{
    DesiredObject, Health, Hold, ObservedObject, ObservedPart, Part, PartState, Products,
    SecretDigest, TargetState, Vocabulary,
};

/// The kinds this backend serves: Stagings, and Challenges with `target: kubernetes`.
pub const KINDS: &[Kind] = &[Kind::Staging, Kind::Challenge];

/// The namespace of Challenges on Kubernetes unless the agent's config names another.
pub const DEFAULT_CHALLENGE_NAMESPACE: &str = "berth-challenges";

/// The field manager of every apply.
const FIELD_MANAGER: &str = "berth";
/// Namespace annotation: the kinds berth applied in it, as `apiVersion/Kind` lines.
const ANNOTATION_INVENTORY: &str = "berth.inventory";
/// Namespace annotation: when the staging was archived (RFC 3339).
const ANNOTATION_ARCHIVED_AT: &str = "berth.archived-at";
/// Namespace annotation: when the staging was stopped (RFC 3339).
const ANNOTATION_STOPPED_AT: &str = "berth.stopped-at";
/// Namespace annotation: when the staging was cleaned up after its ttl (RFC 3339).
const ANNOTATION_EXPIRED_AT: &str = "berth.expired-at";
/// How long cleanup waits for a namespace to go.
const CLEANUP_WAIT: Duration = Duration::from_secs(300);
/// How long a namespace may say that finalizers no built-in controller removes hold it before its
/// cleanup is called failed (and tried again on the next pass).
const FINALIZER_GRACE: Duration = Duration::from_secs(20);
/// Objects applied at once within one staging.
const APPLY_CONCURRENCY: usize = 8;

/// How often the plan looks again at the kinds the server serves.
const REDISCOVERY: Duration = Duration::from_secs(60);

/// Label on a staging's Helm hook objects (`pre-install`, `post-install`): made anew at each apply, never
/// observed as parts of the staging.
const LABEL_HOOK: &str = "berth.hook";

/// What plans call the parts of a staging.
pub const OBJECT: Vocabulary = Vocabulary {
    part: "object",
    replaces: false,
};

/// How berth reaches the cluster: a kubeconfig and context, or the usual places (`KUBECONFIG`,
/// `~/.kube/config`, the in-cluster service account).
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// A kubeconfig file.
    pub kubeconfig: Option<PathBuf>,
    /// A context in it.
    pub context: Option<String>,
    /// The namespace Challenges on Kubernetes run in ([`DEFAULT_CHALLENGE_NAMESPACE`] when
    /// `None`).
    pub challenge_namespace: Option<String>,
}

impl Access {
    /// The access the agent's `kube` settings give (the usual places when there are none).
    pub fn of(config: Option<&crate::config::KubeConfig>) -> Access {
        let config = config.cloned().unwrap_or_default();
        Access {
            kubeconfig: config.kubeconfig,
            context: config.context,
            challenge_namespace: config.challenge_namespace.map(|n| n.to_string()),
        }
    }

    /// Whether any cluster is configured at all; without one, stagings are skipped with the
    /// reason rather than failing every pass.
    fn configured(&self) -> bool {
        self.kubeconfig.is_some()
            || std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
            || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
            || std::env::var_os("HOME")
                .is_some_and(|home| PathBuf::from(home).join(".kube/config").is_file())
    }
}

/// What charts are told of a cluster, with the discovery it was made from.
type FactsOf = (Arc<Discovery>, Arc<manifests::ClusterFacts>);

/// What applying one staging needs beyond its plan.
#[derive(Debug, Clone)]
pub struct StagingTemplate {
    namespace: String,
    manifests: Rendered,
    secrets: BTreeMap<String, SecretRef>,
    labels: BTreeMap<String, String>,
    /// For a staging whose tag a Pipeline produces: what its manifests are rendered from once
    /// the tag is known.
    awaits_tag: Option<Arc<RenderSource>>,
}

/// A staging's spec, the checkout its manifests or chart are in, and how they were rendered.
#[derive(Debug)]
struct RenderSource {
    spec: StagingSpec,
    root: PathBuf,
    rendering: manifests::Rendering,
}

/// The desired object and template of a Staging descriptor, loaded from the checkout at `root`
/// and rendered as `rendering` says.
pub fn desired_object(
    descriptor: &Descriptor,
    root: &Path,
    rendering: &manifests::Rendering,
) -> Option<(DesiredObject, StagingTemplate)> {
    let Spec::Staging(spec) = &descriptor.spec else {
        return None;
    };
    let key = descriptor.key();
    let awaits_tag = matches!(spec.tag, Some(TagSource::FromPipeline(_))).then(|| {
        Arc::new(RenderSource {
            spec: spec.clone(),
            root: root.to_path_buf(),
            rendering: rendering.clone(),
        })
    });
    let template = StagingTemplate {
        namespace: spec.namespace.to_string(),
        manifests: descriptor
            .manifests
            .clone()
            .unwrap_or_else(|| Err(manifests::RenderFailure::NotRead)),
        secrets: spec.overrides.secret.clone(),
        labels: descriptor.metadata.labels.clone(),
        awaits_tag,
    };
    let target = match spec.state {
        StagingState::Running => TargetState::Running,
        StagingState::Stopped => TargetState::Stopped,
        StagingState::Archived => TargetState::Archived,
    };
    let mut object = DesiredObject {
        key,
        engine: crate::plan::Engine::Kubernetes,
        target,
        parts: Vec::new(),
        dependencies: descriptor.dependencies(),
        start_first: true,
        hold: None,
        words: OBJECT,
        ttl: spec.ttl.map(|d| d.0),
        ready_timeout: spec.ready_timeout.map(|d| d.0),
    };
    template.shape(&mut object);
    Some((object, template))
}

impl StagingTemplate {
    /// The same staging with the tag of the image its Pipeline produced, its manifests rendered
    /// with it; `None` for a staging that takes no product, or a product missing or with no tag.
    pub fn with_products(&self, products: &Products) -> Option<StagingTemplate> {
        let source = self.awaits_tag.as_ref()?;
        let Some(TagSource::FromPipeline(from)) = &source.spec.tag else {
            return None;
        };
        let mut spec = source.spec.clone();
        spec.tag = Some(TagSource::Tag(products.of(from)?.tag_alone()?.to_string()));
        let manifests = match manifests::render(&source.root, &spec, &source.rendering) {
            Ok(rendered) => rendered,
            Err(problems) => Err(problems.into_iter().next().map_or(
                manifests::RenderFailure::NotRead,
                manifests::RenderFailure::Manifest,
            )),
        };
        Some(StagingTemplate {
            manifests,
            ..self.clone()
        })
    }

    /// Sets what `object` plans from this template: its parts, or the failure to render them.
    pub fn shape(&self, object: &mut DesiredObject) {
        match &self.manifests {
            Ok(manifests) => {
                object.parts = self.parts(manifests);
                object.hold = None;
            }
            Err(why) => {
                object.parts = Vec::new();
                object.hold = Some(Hold::Fail(why.to_string()));
            }
        }
    }
}

impl StagingTemplate {
    fn parts(&self, manifests: &[Manifest]) -> Vec<Part> {
        // Hooks are no parts of their own (they come and go): a change to one is a change of
        // the namespace, so it is applied, and run.
        let hooks: Vec<&Value> = manifests
            .iter()
            .filter(|m| m.hook.is_some())
            .map(|m| &m.object)
            .collect();
        let namespace_hash = match hooks.is_empty() {
            true => hash(&[&json!(self.labels)]),
            false => hash(&[&json!(self.labels), &json!(hooks)]),
        };
        let mut parts = vec![Part {
            id: format!("Namespace/{}", self.namespace),
            hash: namespace_hash,
            spec: Arc::new(json!({})),
            secrets: None,
            one_shot: false,
        }];
        if !self.secrets.is_empty() {
            let names: Vec<&String> = self.secrets.keys().collect();
            parts.push(Part {
                id: format!("Secret/{SECRET_NAME}"),
                hash: hash(&[&json!(names), &json!(self.labels)]),
                spec: Arc::new(json!({})),
                secrets: None,
                one_shot: false,
            });
        }
        // Hooks come and go at each apply: part of the spec hash, never of what is observed.
        for manifest in manifests.iter().filter(|m| m.hook.is_none()) {
            parts.push(Part {
                id: manifest.id(),
                hash: hash(&[&manifest.object, &json!(self.labels)]),
                spec: Arc::new(objects::summary(&manifest.object)),
                secrets: None,
                one_shot: manifest.kind == "Job",
            });
        }
        parts
    }
}

/// Each part's hash by its id: made once per staging, so that thousands of objects are not each
/// searched for among thousands of parts.
struct PartHashes<'a>(HashMap<&'a str, &'a str>);

impl<'a> PartHashes<'a> {
    fn of(parts: &'a [Part]) -> PartHashes<'a> {
        PartHashes(
            parts
                .iter()
                .map(|p| (p.id.as_str(), p.hash.as_str()))
                .collect(),
        )
    }

    /// The hash of part `id`; empty for a part not desired.
    fn get(&self, id: &str) -> String {
        self.0.get(id).copied().unwrap_or_default().to_string()
    }
}

fn hash(values: &[&Value]) -> String {
    let mut hasher = Sha256::new();
    for value in values {
        hasher.update(serde_json::to_vec(value).expect("JSON serializes"));
        hasher.update([0]);
    }
    hex::encode(&hasher.finalize()[..16])
}

/// A client of the cluster `access` names, and the cluster's address.
pub async fn client(access: &Access) -> Result<(Client, String), EngineError> {
    let options = kube::config::KubeConfigOptions {
        context: access.context.clone(),
        ..Default::default()
    };
    let where_ = access
        .kubeconfig
        .as_ref()
        .map_or("the kubeconfig".to_string(), |p| p.display().to_string());
    let mut config = match &access.kubeconfig {
        Some(path) => {
            let file =
                kube::config::Kubeconfig::read_from(path).map_err(|e| unreachable(&where_, e))?;
            Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| unreachable(&where_, e))?
        }
        None if access.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| unreachable(&where_, e))?,
        None => Config::infer().await.map_err(|e| unreachable(&where_, e))?,
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(30));
    let cluster = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| unreachable(&cluster, e))?;
    Ok((client, cluster))
}

/// The Kubernetes backend: one API server.
#[derive(Clone)]
pub struct KubeBackend {
    client: Client,
    cluster: String,
    ownership: Ownership,
    /// Where Challenges run.
    challenge_namespace: String,
    discovery: Arc<tokio::sync::Mutex<Option<Arc<Discovery>>>>,
    /// When the plan's look at the served kinds last ran (see [`KubeBackend::observe`]).
    discovered_at: Arc<Mutex<Option<Instant>>>,
    /// What charts are told of the cluster, and the discovery it was made from: made again only
    /// when that is discovered again, so a pass asks nothing more of the server.
    facts: Arc<tokio::sync::Mutex<Option<FactsOf>>>,
    /// The objects the last observation saw, by `namespace/Kind/name`: hand edits are found in them.
    live: Arc<Mutex<HashMap<String, Value>>>,
    /// Every namespace the last observation saw, berth's or not.
    taken: Arc<Mutex<HashSet<String>>>,
    /// Key of the in-memory digests that tell a rotated secret; never stored.
    digest_key: Arc<[u8; 32]>,
    /// How long an apply waits for a challenge's rollout to be ready; zero: not at all.
    rollout_wait: Duration,
    /// What the challenges' solvers last found.
    solves: solve::Solves,
    /// Whether diagnoses start the solvers that are due (an apply and the agent do).
    solving: bool,
}

impl std::fmt::Debug for KubeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeBackend")
            .field("cluster", &self.cluster)
            .finish()
    }
}

fn unreachable(cluster: &str, reason: impl std::fmt::Display) -> EngineError {
    EngineError::Unreachable {
        engine: "the Kubernetes API server",
        host: cluster.to_string(),
        reason: reason.to_string(),
        hint: "Check KUBECONFIG (or kube.kubeconfig in the agent's config) and that the API server runs.",
    }
}

impl KubeBackend {
    /// Lets diagnoses start the challenges' solvers that are due.
    pub fn run_solvers(&mut self) {
        self.solving = true;
    }

    /// Ends the solvers' runs this process has going: their pods go, and no result is taken
    /// from them.
    pub async fn stop_solvers(&self) {
        self.stop_own_solvers().await;
    }

    /// The cluster `access` names; `None` when no cluster is configured at all.
    pub async fn connect(
        ownership: &Ownership,
        access: &Access,
    ) -> Result<Option<KubeBackend>, EngineError> {
        if !access.configured() {
            return Ok(None);
        }
        let (client, cluster) = client(access).await?;
        Ok(Some(KubeBackend {
            client,
            cluster,
            ownership: ownership.clone(),
            challenge_namespace: access
                .challenge_namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_CHALLENGE_NAMESPACE.to_string()),
            discovery: Arc::default(),
            discovered_at: Arc::default(),
            facts: Arc::default(),
            live: Arc::default(),
            taken: Arc::default(),
            digest_key: Arc::new(random_key()),
            rollout_wait: deploy::ROLLOUT_WAIT,
            solves: solve::Solves::default(),
            solving: false,
        }))
    }

    /// Waits at most `wait` for each challenge's rollout (`berth apply --wait`); zero does not
    /// wait, and the apply then says the rollout was not waited for.
    pub fn set_rollout_wait(&mut self, wait: Duration) {
        self.rollout_wait = wait;
    }

    /// A step's outcome: done, failed for a reason, or transient when the server did not answer.
    fn outcome(&self, result: Result<String, Trouble>) -> Outcome {
        match result {
            Ok(done) => Outcome::Done(done),
            Err(Trouble::Failed(why)) => Outcome::Failed(why),
            Err(Trouble::Gone(why)) => Outcome::Transient(self.gone(why).to_string()),
        }
    }

    fn gone(&self, error: impl std::fmt::Display) -> EngineError {
        unreachable(&self.cluster, error)
    }

    /// The cluster's kinds, discovered once; again when `refresh` (a kind was not found).
    async fn discovery(&self, refresh: bool) -> Result<Arc<Discovery>, kube::Error> {
        let mut cached = self.discovery.lock().await;
        if let (Some(discovery), false) = (cached.as_ref(), refresh) {
            return Ok(discovery.clone());
        }
        let discovery = Arc::new(Discovery::new(self.client.clone()).run().await?);
        *cached = Some(discovery.clone());
        Ok(discovery)
    }

    /// Discovers the served kinds again when the last look is a rediscovery interval old, so a
    /// CustomResourceDefinition installed since is seen; and only as well as the server
    /// answers: an aggregated API that is down must not stop the observing of everything else.
    async fn rediscover_if_due(&self) {
        let due = self
            .discovered_at
            .lock()
            .expect("discovery time")
            .is_none_or(|at| at.elapsed() >= REDISCOVERY);
        if due {
            match self.discovery(true).await {
                Ok(_) => *self.discovered_at.lock().expect("discovery time") = Some(Instant::now()),
                Err(error) => tracing::debug!(%error, "the served kinds could not be listed"),
            }
        }
    }

    /// What a chart is told of this cluster: its version and what it serves (discovered again
    /// when due, as a plan's look at the served kinds is; the version is read again with it).
    pub async fn cluster_facts(&self) -> Result<Arc<manifests::ClusterFacts>, EngineError> {
        self.rediscover_if_due().await;
        let discovery = self.discovery(false).await.map_err(|e| self.gone(e))?;
        let mut cached = self.facts.lock().await;
        if let Some((from, facts)) = cached.as_ref()
            && Arc::ptr_eq(from, &discovery)
        {
            return Ok(Arc::clone(facts));
        }
        let version = self
            .client
            .apiserver_version()
            .await
            .map_err(|e| self.gone(e))?;
        let served = discovery.groups().flat_map(|group| {
            group.versions().flat_map(move |version| {
                group
                    .versioned_resources(version)
                    .into_iter()
                    .map(|(resource, _)| (resource.api_version, resource.kind))
            })
        });
        let facts = Arc::new(manifests::ClusterFacts {
            kube_version: version.git_version,
            api_versions: api_versions(served),
        });
        *cached = Some((discovery, Arc::clone(&facts)));
        Ok(facts)
    }

    /// The API resource of `apiVersion`/`kind`, rediscovering once when it is not known.
    async fn resource(
        &self,
        api_version: &str,
        kind: &str,
    ) -> Result<Option<(ApiResource, ApiCapabilities)>, kube::Error> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
        if let Some(found) = self.discovery(false).await?.resolve_gvk(&gvk) {
            return Ok(Some(found));
        }
        Ok(self.discovery(true).await?.resolve_gvk(&gvk))
    }

    fn selector(&self, name: Option<&str>) -> String {
        self.ownership.selector(Kind::Staging, name).join(",")
    }

    fn labels(
        &self,
        key: &ObjectRef,
        spec_hash: &str,
        extra: &BTreeMap<String, String>,
    ) -> HashMap<String, String> {
        self.ownership.labels_over(extra, key, spec_hash)
    }

    fn pod_labels(&self, key: &ObjectRef) -> HashMap<String, String> {
        let mut labels = self.ownership.labels(key, "");
        labels.remove(LABEL_SPEC_HASH);
        labels
    }

    /// Every staging and challenge this instance runs here, with the health of each object.
    pub async fn observe(&self) -> Result<Vec<ObservedObject>, EngineError> {
        // The kinds the server serves, known before the plan: an unserved one is refused there.
        self.rediscover_if_due().await;
        let ((mut objects, mut live), (challenges, challenge_objects)) =
            tokio::try_join!(self.observe_stagings(), self.observe_challenges())?;
        objects.extend(challenges);
        live.extend(challenge_objects);
        *self.live.lock().expect("live objects") = live;
        Ok(objects)
    }

    /// Every staging this instance runs, with the health of each object; and the objects as
    /// read, by `namespace/Kind/name`.
    async fn observe_stagings(
        &self,
    ) -> Result<(Vec<ObservedObject>, HashMap<String, Value>), EngineError> {
        let namespaces: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &namespace_resource());
        let params = ListParams::default().labels(&self.selector(None));
        // Every namespace, not only berth's: a staging made next knows without asking whether
        // its namespace is taken.
        let listed = namespaces
            .list(&ListParams::default())
            .await
            .map_err(|e| self.gone(e))?;
        *self.taken.lock().expect("namespace names") = listed
            .items
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let instance = Some(self.ownership.instance());
        // By staging; a staging whose spec.namespace changed has its old namespace here too,
        // as a part the plan removes.
        let mut stagings: BTreeMap<String, ObservedObject> = BTreeMap::new();
        let mut staging_of: HashMap<String, String> = HashMap::new();
        let mut kinds: BTreeSet<(String, String)> = BTreeSet::new();
        let mut rebuild_inventory = false;
        let mut live = HashMap::new();
        for namespace in listed.items {
            let value = serde_json::to_value(&namespace).unwrap_or_default();
            let Some(ns) = namespace.metadata.name.clone() else {
                continue;
            };
            let labels = namespace.metadata.labels.clone().unwrap_or_default();
            let ours = labels.get(LABEL_INSTANCE).map(String::as_str) == instance
                && labels.get(LABEL_KIND).map(String::as_str) == Some(Kind::Staging.as_str());
            let Some(name) = labels.get(LABEL_NAME).cloned().filter(|_| ours) else {
                continue;
            };
            let Ok(key_name) = name.parse() else {
                continue;
            };
            let annotations = namespace.metadata.annotations.clone().unwrap_or_default();
            let inventory_lost = match inventory_of(&annotations) {
                Some(listed) => {
                    kinds.extend(listed);
                    false
                }
                // Deleted or garbled by hand: every kind is looked at, so objects of a kind the
                // manifests dropped are still found (and pruned), never leaked; and the plan
                // writes it back, so the next passes need not look at every kind again.
                None => {
                    rebuild_inventory = true;
                    true
                }
            };
            let time = |key: &str| {
                annotations
                    .get(key)
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc))
            };
            let archived_at = time(ANNOTATION_ARCHIVED_AT);
            let state = Resting::of(&annotations).part_state();
            let terminating = namespace.metadata.deletion_timestamp.is_some();
            let hash = labels.get(LABEL_SPEC_HASH).cloned().unwrap_or_default();
            let (hash, spec) = match inventory_lost {
                true => (
                    format!("edited:{hash}"),
                    json!({"edited": "the berth.inventory annotation was removed or garbled by hand"}),
                ),
                false => (hash, json!({})),
            };
            let part = ObservedPart {
                name: ns.clone(),
                id: format!("Namespace/{ns}"),
                hash,
                spec,
                secrets: None,
                state,
                health: if terminating {
                    Health::Progressing
                } else {
                    Health::Healthy
                },
                detail: terminating.then(|| "being deleted".to_string()),
            };
            live.insert(format!("{ns}/Namespace/{ns}"), value);
            staging_of.insert(ns, name.clone());
            let object = stagings.entry(name).or_insert_with(|| ObservedObject {
                key: ObjectRef {
                    kind: Kind::Staging,
                    name: key_name,
                },
                engine: crate::plan::Engine::Kubernetes,
                parts: Vec::new(),
                archived_at,
                expired: time(ANNOTATION_EXPIRED_AT),
                reach: Vec::new(),
                produced: None,
            });
            object.parts.push(part);
        }
        if stagings.is_empty() {
            return Ok((Vec::new(), live));
        }
        // Kinds looked at only to rebuild an inventory may fail to list (an aggregated API
        // that is down): their objects are then not seen, which never deletes anything.
        let trusted = kinds.clone();
        if rebuild_inventory {
            let discovery = self.discovery(false).await.map_err(|e| self.gone(e))?;
            for group in discovery.groups() {
                for (resource, caps) in group.recommended_resources() {
                    if caps.scope == Scope::Namespaced
                        && caps.supports_operation(kube::discovery::verbs::LIST)
                    {
                        kinds.insert((resource.api_version.clone(), resource.kind.clone()));
                    }
                }
            }
        }
        // Pods, for the reasons a workload does not come up.
        let pods: Api<DynamicObject> = Api::all_with(self.client.clone(), &pod_resource());
        let pods = pods.list(&params).await.map_err(|e| self.gone(e))?;
        let mut pods_by_namespace: HashMap<String, Vec<Value>> = HashMap::new();
        for pod in pods.items {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            pods_by_namespace
                .entry(ns)
                .or_default()
                .push(serde_json::to_value(&pod).unwrap_or_default());
        }
        let lists = futures_util::stream::iter(kinds.into_iter().map(|(api_version, kind)| {
            let params = params.clone();
            async move {
                let resource = match self.resource(&api_version, &kind).await {
                    Ok(Some((resource, _))) => resource,
                    // A kind the server no longer serves cannot be read: its objects are not
                    // observed, so nothing is ever pruned because of it.
                    Ok(None) => return Ok((api_version, kind, Vec::new())),
                    Err(error) => return Err((api_version, kind, error)),
                };
                let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
                match api.list(&params).await {
                    Ok(list) => Ok((api_version, kind, list.items)),
                    Err(error) => Err((api_version, kind, error)),
                }
            }
        }))
        .buffer_unordered(APPLY_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        for listed in lists {
            let (api_version, kind, items) = match listed {
                Ok(listed) => listed,
                Err((api_version, kind, error))
                    if !trusted.contains(&(api_version.clone(), kind.clone())) =>
                {
                    tracing::debug!(%error, %api_version, %kind, "not listed while rebuilding an inventory");
                    continue;
                }
                Err((_, _, error)) => return Err(self.gone(error)),
            };
            for item in items {
                let ns = item.metadata.namespace.clone().unwrap_or_default();
                let Some(staging) = staging_of.get(&ns).and_then(|name| stagings.get_mut(name))
                else {
                    continue;
                };
                let Some(name) = item.metadata.name.clone() else {
                    continue;
                };
                let labels = item.metadata.labels.clone().unwrap_or_default();
                if labels.get(LABEL_NAME).map(String::as_str) != Some(staging.key.name.as_str())
                    || !applied_by_berth(&item.metadata)
                    || labels.contains_key(LABEL_HOOK)
                {
                    continue;
                }
                let mut value = serde_json::to_value(&item).unwrap_or_default();
                // Lists leave out each item's type: kept, so what was seen can be named.
                value["apiVersion"] = json!(api_version);
                value["kind"] = json!(kind);
                let pods: Vec<&Value> = pods_by_namespace
                    .get(&ns)
                    .map(|p| p.iter().collect())
                    .unwrap_or_default();
                let condition = health::of(&kind, &value, &pods);
                // A stopped or archived staging's objects are at rest, as its namespace says (a
                // workload scaled down says only that it is; which rest is the namespace's).
                let resting = namespace_state(staging, &ns);
                let state = match (condition.state, resting) {
                    (
                        PartState::Running | PartState::Archived,
                        PartState::Stopped | PartState::Archived,
                    ) => resting,
                    (state, _) => state,
                };
                let secrets =
                    (kind == "Secret" && name == SECRET_NAME).then(|| self.live_digests(&value));
                staging.parts.push(ObservedPart {
                    name: format!("{ns}/{kind}/{name}"),
                    id: format!("{kind}/{name}"),
                    hash: labels.get(LABEL_SPEC_HASH).cloned().unwrap_or_default(),
                    spec: objects::summary(&value),
                    secrets,
                    state,
                    health: condition.health,
                    detail: condition.detail,
                });
                staging.reach.extend(objects::reach(&value));
                live.insert(format!("{ns}/{kind}/{name}"), value);
            }
        }
        Ok((stagings.into_values().collect(), live))
    }

    fn digest(&self, name: &str, value: &[u8]) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.digest_key.as_slice());
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(value);
        hex::encode(&hasher.finalize()[..16])
    }

    fn live_digests(&self, secret: &Value) -> BTreeMap<String, String> {
        use base64::Engine as _;
        secret["data"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, encoded)| {
                let value = base64::engine::general_purpose::STANDARD
                    .decode(encoded.as_str().unwrap_or_default())
                    .unwrap_or_default();
                (name.clone(), self.digest(name, &value))
            })
            .collect()
    }

    /// Records the digests of the staging's secret values on its Secret part, so a rotated
    /// secret shows as a change (and an unreadable one as an update that fails with the reason).
    pub fn seal(&self, template: &StagingTemplate, object: &mut DesiredObject) {
        // A namespace someone else made is never taken over: the plan says so now, not only the
        // apply.
        let ns = template.namespace.as_str();
        if object.hold.is_none()
            && self.taken.lock().expect("namespace names").contains(ns)
            && !self
                .namespaces_of(&object.key)
                .iter()
                .any(|n| n.metadata.name.as_deref() == Some(ns))
        {
            object.hold = Some(Hold::Fail(format!(
                "namespace {ns} exists and was not made by berth for {}; berth manages only namespaces it makes: choose another spec.namespace",
                object.key
            )));
        }
        // A kind or version the server does not serve is refused in the plan, with the versions
        // it does serve, rather than at the apply.
        if object.hold.is_none()
            && let Ok(manifests) = &template.manifests
            && let Ok(cached) = self.discovery.try_lock()
            && let Some(discovery) = cached.as_ref()
            && let Some(unserved) = manifests.iter().find(|m| {
                let (group, version) = m
                    .api_version
                    .rsplit_once('/')
                    .unwrap_or(("", &m.api_version));
                discovery
                    .resolve_gvk(&kube::api::GroupVersionKind::gvk(group, version, &m.kind))
                    .is_none()
            })
        {
            object.hold = Some(Hold::Fail(unserved_message(discovery, unserved)));
        }
        let id = format!("Secret/{SECRET_NAME}");
        if let Some(part) = object.parts.iter_mut().find(|p| p.id == id) {
            part.secrets = Some(self.sealed(template.secrets.iter().map(|(n, r)| (n.clone(), r))));
        }
    }

    /// The keyed digest of each secret value, by its key; an unreadable one says why instead, so
    /// the plan shows it as a change that fails before anything moves.
    fn sealed<'a>(
        &self,
        secrets: impl Iterator<Item = (String, &'a SecretRef)>,
    ) -> BTreeMap<String, SecretDigest> {
        secrets
            .map(|(key, reference)| {
                let digest = SecretDigest::sealed(&key, reference.resolve(), |value| {
                    self.digest(&key, value.as_bytes())
                });
                (key, digest)
            })
            .collect()
    }

    /// Marks each object someone edited by hand (a field berth applies has another value), so
    /// the plan takes it back and says so.
    pub fn diagnose(
        &self,
        observed: &mut [ObservedObject],
        desired: &HashMap<ObjectRef, (&StagingTemplate, &[Part])>,
    ) {
        let live = self.live.lock().expect("live objects");
        for object in observed.iter_mut() {
            let Some((template, parts)) = desired.get(&object.key) else {
                continue;
            };
            let Ok(manifests) = &template.manifests else {
                continue;
            };
            let scaled_down = namespace_state(object, &template.namespace) != PartState::Running;
            let hashes = PartHashes::of(parts);
            let by_id: HashMap<String, &Manifest> = manifests.iter().map(|m| (m.id(), m)).collect();
            for part in object.parts.iter_mut() {
                let Some(manifest) = by_id.get(&part.id) else {
                    continue;
                };
                if part.hash != hashes.get(&part.id) {
                    continue;
                }
                let Some(seen) = live.get(&part.name) else {
                    continue;
                };
                let labels = self.labels(&object.key, &part.hash, &template.labels);
                let applied = objects::shaped(
                    manifest,
                    &template.namespace,
                    &labels,
                    &self.pod_labels(&object.key),
                    scaled_down,
                );
                if let Some(edit) = objects::edited(&applied, seen) {
                    // Shown as the one change: the summary is what berth applied, plus the edit.
                    let mut spec = objects::summary(&manifest.object);
                    if let Some(fields) = spec.as_object_mut() {
                        fields.insert("edited".into(), edit.into());
                    }
                    part.hash = format!("edited:{}", part.hash);
                    part.spec = spec;
                }
            }
        }
    }

    /// Makes the staging what `template` and `target` say: namespace, secret, objects; then
    /// prunes what berth applied before and the manifests no longer hold.
    pub async fn converge(
        &self,
        key: &ObjectRef,
        template: &StagingTemplate,
        parts: &[Part],
        target: TargetState,
    ) -> Outcome {
        self.outcome(self.try_converge(key, template, parts, target).await)
    }

    async fn try_converge(
        &self,
        key: &ObjectRef,
        template: &StagingTemplate,
        parts: &[Part],
        target: TargetState,
    ) -> Result<String, Trouble> {
        let manifests = template
            .manifests
            .as_ref()
            .map_err(|why| Trouble::Failed(why.to_string()))?;
        let ns = template.namespace.as_str();
        // Every kind is resolved before anything is applied: an unknown kind fails the staging
        // and touches nothing.
        let mut resources = Vec::new();
        for manifest in manifests.iter() {
            match self
                .resource(&manifest.api_version, &manifest.kind)
                .await
                .map_err(Trouble::from)?
            {
                Some((resource, caps)) if caps.scope == Scope::Namespaced => {
                    resources.push(resource)
                }
                Some(_) => {
                    return Err(Trouble::Failed(format!(
                        "{}:{}: {} is cluster-scoped on this API server; a staging holds only namespaced objects",
                        manifest.file, manifest.line, manifest.kind
                    )));
                }
                None => {
                    let discovery = self.discovery(false).await.map_err(Trouble::from)?;
                    return Err(Trouble::Failed(unserved_message(&discovery, manifest)));
                }
            }
        }
        // Secret values are read before anything changes: an unreadable one fails the staging.
        let mut secret_data = serde_json::Map::new();
        let mut secret_values = Vec::new();
        for (name, reference) in &template.secrets {
            use base64::Engine as _;
            let value = reference
                .resolve()
                .map_err(|e| Trouble::Failed(e.to_string()))?;
            secret_values.push(value.clone());
            secret_data.insert(
                name.clone(),
                base64::engine::general_purpose::STANDARD
                    .encode(value)
                    .into(),
            );
        }
        let namespaces: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &namespace_resource());
        // The namespaces this staging has, as the plan observed them just before (under the
        // lock); one not among them is asked for, to refuse one berth did not make.
        let mine = self.namespaces_of(key);
        let taken = self.taken.lock().expect("namespace names").contains(ns);
        let existing = match mine.iter().find(|n| n.metadata.name.as_deref() == Some(ns)) {
            Some(known) => Some(known.clone()),
            None if !taken => None,
            None => namespaces.get_opt(ns).await.map_err(Trouble::from)?,
        };
        // A staging made now has nothing to prune.
        let fresh = existing.is_none();
        let mut recorded: Option<(BTreeSet<String>, Resting)> = None;
        let mut inventory: BTreeSet<String> = BTreeSet::new();
        let mut resting = Resting::Running;
        if let Some(existing) = &existing {
            let labels = existing.metadata.labels.clone().unwrap_or_default();
            if labels.get(LABEL_INSTANCE).map(String::as_str) != Some(self.ownership.instance())
                || labels.get(LABEL_NAME).map(String::as_str) != Some(key.name.as_str())
            {
                return Err(Trouble::Failed(format!(
                    "namespace {ns} exists and was not made by berth for {key}; berth manages only namespaces it makes: choose another spec.namespace"
                )));
            }
            if existing.metadata.deletion_timestamp.is_some() {
                return Err(Trouble::Failed(format!(
                    "namespace {ns} is still being deleted; the next pass makes it again"
                )));
            }
            let annotations = existing.metadata.annotations.clone().unwrap_or_default();
            match inventory_of(&annotations) {
                Some(kinds) => inventory.extend(
                    kinds
                        .into_iter()
                        .map(|(api_version, kind)| format!("{api_version}/{kind}")),
                ),
                // Gone or garbled: rebuilt from what the observation found labelled as this
                // staging's in its namespace (it looked at every kind), and written back below.
                None => {
                    let live = self.live.lock().expect("live objects");
                    inventory.extend(
                        live.iter()
                            .filter(|(id, _)| id.starts_with(&format!("{ns}/")))
                            .filter(|(id, _)| !id.contains("/Namespace/"))
                            .filter_map(|(_, v)| {
                                Some(format!(
                                    "{}/{}",
                                    v["apiVersion"].as_str()?,
                                    v["kind"].as_str()?
                                ))
                            }),
                    );
                }
            }
            resting = Resting::of(&annotations);
            recorded = Some((inventory.clone(), resting.clone()));
        }
        let mut wanted: BTreeSet<String> = manifests
            .iter()
            .map(|m| format!("{}/{}", m.api_version, m.kind))
            .collect();
        if !template.secrets.is_empty() {
            wanted.insert("v1/Secret".into());
        }
        let resting = resting.toward(target);
        let scaled_down = resting.scaled_down();
        // The inventory is widened first: a crash after this leaves everything findable.
        let widened: BTreeSet<String> = inventory.union(&wanted).cloned().collect();
        let hashes = PartHashes::of(parts);
        let namespace_hash = hashes.get(&format!("Namespace/{ns}"));
        let labelled = existing
            .as_ref()
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|labels| labels.get(LABEL_SPEC_HASH))
            == Some(&namespace_hash);
        if !(labelled && recorded == Some((widened.clone(), resting.clone()))) {
            self.apply_namespace(key, template, &namespace_hash, &widened, &resting, None)
                .await?;
        }
        if !secret_data.is_empty() {
            let id = format!("Secret/{SECRET_NAME}");
            let secret = json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": SECRET_NAME,
                    "namespace": ns,
                    "labels": self.labels(key, &hashes.get(&id), &template.labels),
                },
                "type": "Opaque",
                "data": secret_data,
            });
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), ns, &secret_resource());
            api.patch(SECRET_NAME, &apply_params(), &Patch::Apply(&secret))
                .await
                .map_err(|e| Trouble::object("Secret", SECRET_NAME, e))?;
        }
        // Things pods need (configuration, claims, accounts) first, then the rest.
        let first = |m: &Manifest| {
            matches!(
                m.kind.as_str(),
                "ConfigMap"
                    | "Secret"
                    | "PersistentVolumeClaim"
                    | "ServiceAccount"
                    | "Role"
                    | "RoleBinding"
            )
        };
        let pod_labels = self.pod_labels(key);
        // A dry run of every object first: what the server refuses (a typo in a field, a
        // quantity it cannot read, an immutable field changed) fails the staging before any
        // object changes, so a bad change never leaves it half applied.
        let mut refused = Vec::new();
        // Hooks of the last apply, and objects marked `berth.io/recreate` that changed, are made
        // anew rather than changed (a Job's template cannot change), so no dry run can try them.
        let mut remade = std::collections::HashSet::new();
        let recreated: Vec<(&Manifest, &ApiResource)> = {
            let live = self.live.lock().expect("live objects");
            manifests
                .iter()
                .zip(&resources)
                .filter(|(m, _)| m.hook.is_none() && objects::recreated(&m.object))
                .filter(|(m, _)| {
                    live.get(&format!("{ns}/{}/{}", m.kind, m.name))
                        .is_some_and(|seen| {
                            seen.pointer(&format!(
                                "/metadata/labels/{}",
                                LABEL_SPEC_HASH.replace('/', "~1")
                            ))
                            .and_then(Value::as_str)
                                != Some(hashes.get(&m.id()).as_str())
                        })
                })
                .collect()
        };
        remade.extend(recreated.iter().map(|(m, _)| m.id()));
        // An object new to the staging may already be there, made by hand (even in a namespace
        // just made, by someone quick): applying would adopt it, and a later prune would delete
        // what berth never made.
        {
            let new_objects: std::collections::HashSet<String> = {
                let live = self.live.lock().expect("live objects");
                manifests
                    .iter()
                    .filter(|m| !live.contains_key(&format!("{ns}/{}/{}", m.kind, m.name)))
                    .map(|m| m.id())
                    .collect()
            };
            for (manifest, resource) in manifests.iter().zip(&resources) {
                if !new_objects.contains(&manifest.id()) {
                    continue;
                }
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), ns, resource);
                match api.get_opt(&manifest.name).await.map_err(Trouble::from)? {
                    Some(found) if !applied_by_berth(&found.metadata) => {
                        refused.push(format!(
                            "{} exists in namespace {ns} and was not made by berth; delete it or rename the manifest's object",
                            manifest.id()
                        ));
                    }
                    Some(_) if manifest.hook.is_some() => {
                        remade.insert(manifest.id());
                    }
                    _ => {}
                }
            }
        }
        // The dry run covers a new staging too: a refused object must not come after others
        // were made.
        let shaped = |manifest: &Manifest| {
            let mut labels = self.labels(key, &hashes.get(&manifest.id()), &template.labels);
            if let Some(hook) = manifest.hook {
                labels.insert(LABEL_HOOK.into(), hook.phase.as_str().into());
            }
            objects::shaped(manifest, ns, &labels, &pod_labels, scaled_down)
        };
        // Hooks run around a running staging's apply; archiving runs none.
        let hooks: Vec<hooks::HookObject> = manifests
            .iter()
            .zip(&resources)
            .filter(|(m, _)| m.hook.is_some() && !scaled_down)
            .map(|(manifest, resource)| hooks::HookObject {
                manifest,
                resource,
                object: shaped(manifest),
            })
            .collect();
        let mut hooks_ran = Vec::new();
        let waves = [None, Some(true), Some(false)];
        for wave in waves {
            let dry_run = wave.is_none();
            let mut params = apply_params();
            params.dry_run = dry_run;
            let results = futures_util::stream::iter(
                manifests
                    .iter()
                    .zip(&resources)
                    .filter(|(m, _)| match wave {
                        None => !remade.contains(&m.id()) && (m.hook.is_none() || !scaled_down),
                        Some(first_wave) => m.hook.is_none() && first(m) == first_wave,
                    })
                    .map(|(manifest, resource)| {
                        let object = shaped(manifest);
                        let api: Api<DynamicObject> =
                            Api::namespaced_with(self.client.clone(), ns, resource);
                        let params = &params;
                        async move {
                            api.patch(&manifest.name, params, &Patch::Apply(&object))
                                .await
                                .map_err(|e| Trouble::object(&manifest.kind, &manifest.name, e))
                        }
                    }),
            )
            .buffer_unordered(APPLY_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
            for result in results {
                match result {
                    Err(Trouble::Failed(why)) if dry_run => refused.push(why),
                    Err(trouble) => return Err(trouble),
                    Ok(_) => {}
                }
            }
            if dry_run && !refused.is_empty() {
                refused.sort();
                let more = match refused.len() {
                    n if n > 5 => format!(" (and {} more)", n - 5),
                    _ => String::new(),
                };
                refused.truncate(5);
                return Err(Trouble::Failed(format!(
                    "{}{more}; nothing was changed (a dry run found it)",
                    refused.join("; ")
                )));
            }
            if dry_run {
                hooks_ran.extend(
                    self.run_hooks(
                        (Hook::Before, fresh),
                        ns,
                        &hooks,
                        (self.rollout_wait, &secret_values),
                    )
                    .await?,
                );
                // What is made again goes first; the waves below make it.
                for (manifest, resource) in &recreated {
                    self.delete_and_wait(ns, manifest, resource).await?;
                }
            }
        }
        // What someone added to a list berth owns (`kubectl set env FOO=bar`) is taken out:
        // server-side apply leaves another manager's items where they are.
        let mut taken_back = Vec::new();
        for (manifest, resource) in manifests
            .iter()
            .zip(&resources)
            .filter(|(m, _)| m.hook.is_none())
        {
            taken_back.extend(
                self.take_back_added(ns, &shaped(manifest), manifest, resource)
                    .await?,
            );
        }
        hooks_ran.extend(
            self.run_hooks(
                (Hook::After, fresh),
                ns,
                &hooks,
                (self.rollout_wait, &secret_values),
            )
            .await?,
        );
        // Prune: what berth labelled in this namespace, of every kind it ever applied here, that
        // the manifests no longer hold.
        let keep: BTreeSet<(String, String)> = manifests
            .iter()
            .map(|m| (m.kind.clone(), m.name.clone()))
            .chain(
                (!template.secrets.is_empty())
                    .then(|| ("Secret".to_string(), SECRET_NAME.to_string())),
            )
            .collect();
        let mut pruned = Vec::new();
        let selector = self.selector(Some(key.name.as_str()));
        for line in widened.iter().filter(|_| !fresh) {
            let Some((api_version, kind)) = line.rsplit_once('/') else {
                continue;
            };
            let Some((resource, _)) = self
                .resource(api_version, kind)
                .await
                .map_err(Trouble::from)?
            else {
                continue;
            };
            let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &resource);
            let listed = api
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(Trouble::from)?;
            for item in listed.items {
                let Some(name) = item.metadata.name.clone() else {
                    continue;
                };
                // Controllers copy labels (a Deployment's onto its ReplicaSets and pods, a
                // Service's onto its Endpoints): only what berth itself applied is berth's.
                if keep.contains(&(kind.to_string(), name.clone()))
                    || !applied_by_berth(&item.metadata)
                {
                    continue;
                }
                api.delete(&name, &DeleteParams::background())
                    .await
                    .map_err(|e| Trouble::object(kind, &name, e))?;
                pruned.push(format!("{kind}/{name}"));
            }
        }
        if widened != wanted {
            self.apply_namespace(key, template, &namespace_hash, &wanted, &resting, None)
                .await?;
        }
        // A namespace the staging had before its spec.namespace changed goes, with all in it.
        for other in mine {
            let Some(name) = other.metadata.name.clone() else {
                continue;
            };
            if name != ns && other.metadata.deletion_timestamp.is_none() {
                namespaces
                    .delete(&name, &DeleteParams::background())
                    .await
                    .map_err(|e| Trouble::object("Namespace", &name, e))?;
                pruned.push(format!("Namespace/{name}"));
            }
        }
        let mut done = format!(
            "applied {} objects in namespace {ns}",
            manifests.iter().filter(|m| m.hook.is_none()).count()
        );
        if !hooks_ran.is_empty() {
            done.push_str(&format!(", ran {}", hooks_ran.join(", ")));
        }
        if !taken_back.is_empty() {
            done.push_str(&format!(", took back {}", taken_back.join(", ")));
        }
        if scaled_down {
            done.push_str(", workloads scaled to zero");
        }
        if !pruned.is_empty() {
            done.push_str(&format!(", pruned {}", pruned.join(", ")));
        }
        Ok(done)
    }

    /// Removes from the live object of `manifest` the items someone added to the lists berth
    /// owns whole (see [`objects::added`]), as one update with the version read, so nothing
    /// changed meanwhile is lost. Says what went.
    async fn take_back_added(
        &self,
        ns: &str,
        applied: &Value,
        manifest: &Manifest,
        resource: &ApiResource,
    ) -> Result<Vec<String>, Trouble> {
        // Workloads only: a bare Pod or a Job cannot change its containers, and custom resources
        // are their operators' to fill.
        if !objects::is_workload(&manifest.kind) {
            return Ok(Vec::new());
        }
        let seen_added = {
            let live = self.live.lock().expect("live objects");
            live.get(&format!("{ns}/{}/{}", manifest.kind, manifest.name))
                .is_some_and(|seen| !objects::added(applied, seen).is_empty())
        };
        if !seen_added {
            return Ok(Vec::new());
        }
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, resource);
        let Some(fresh) = api.get_opt(&manifest.name).await.map_err(Trouble::from)? else {
            return Ok(Vec::new());
        };
        let mut value = serde_json::to_value(&fresh).unwrap_or_default();
        let extras = objects::added(applied, &value);
        // Berth's own apply may have taken out what it dropped: nothing is left to do.
        if extras.is_empty() {
            return Ok(Vec::new());
        }
        for extra in &extras {
            let (parent, index) = extra.pointer.rsplit_once('/').unwrap_or(("", ""));
            if let (Some(Value::Array(items)), Ok(index)) =
                (value.pointer_mut(parent), index.parse::<usize>())
                && index < items.len()
            {
                items.remove(index);
            }
        }
        // The server keeps the fields' managers as they are when none are sent.
        if let Some(metadata) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.remove("managedFields");
        }
        let object: DynamicObject = serde_json::from_value(value)
            .map_err(|e| Trouble::Failed(format!("{}: cannot read it back: {e}", manifest.id())))?;
        // Refused (the object changed since it was read, a webhook's rule): what berth applied
        // stands, and what is left is said in the log, not failed on; the next plan shows it.
        let shown: Vec<String> = extras
            .into_iter()
            .map(|extra| format!("{}: {}", manifest.id(), extra.shown))
            .collect();
        match api
            .replace(&manifest.name, &kube::api::PostParams::default(), &object)
            .await
        {
            Ok(_) => Ok(shown),
            Err(error) => {
                tracing::warn!(%error, object = %manifest.id(), "what was added outside berth could not be taken out");
                Ok(Vec::new())
            }
        }
    }

    async fn apply_namespace(
        &self,
        key: &ObjectRef,
        template: &StagingTemplate,
        spec_hash: &str,
        inventory: &BTreeSet<String>,
        resting: &Resting,
        expired_at: Option<&str>,
    ) -> Result<(), Trouble> {
        let ns = template.namespace.as_str();
        let mut annotations = serde_json::Map::new();
        annotations.insert(
            ANNOTATION_INVENTORY.into(),
            inventory
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
                .into(),
        );
        if let Some((annotation, at)) = resting.annotation() {
            annotations.insert(annotation.into(), at.into());
        }
        if let Some(at) = expired_at {
            annotations.insert(ANNOTATION_EXPIRED_AT.into(), at.into());
        }
        let namespace = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": ns,
                "labels": self.labels(key, spec_hash, &template.labels),
                "annotations": annotations,
            },
        });
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &namespace_resource());
        api.patch(ns, &apply_params(), &Patch::Apply(&namespace))
            .await
            .map_err(|e| Trouble::object("Namespace", ns, e))?;
        Ok(())
    }

    /// The namespaces of `key` the last observation saw.
    fn namespaces_of(&self, key: &ObjectRef) -> Vec<DynamicObject> {
        let live = self.live.lock().expect("live objects");
        live.iter()
            .filter(|(id, _)| id.contains("/Namespace/"))
            .filter_map(|(_, value)| serde_json::from_value::<DynamicObject>(value.clone()).ok())
            .filter(|namespace| {
                namespace
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|labels| labels.get(LABEL_NAME))
                    == Some(&key.name.to_string())
            })
            .collect()
    }

    /// Deletes the staging's namespace and waits until it is gone. With `expired`, the staging
    /// is still declared (archived past its ttl): a bare namespace is left as its tombstone.
    pub async fn delete(
        &self,
        key: &ObjectRef,
        expired: Option<(&StagingTemplate, &[Part])>,
    ) -> Outcome {
        self.outcome(self.try_delete(key, expired).await)
    }

    async fn try_delete(
        &self,
        key: &ObjectRef,
        expired: Option<(&StagingTemplate, &[Part])>,
    ) -> Result<String, Trouble> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &namespace_resource());
        let listed = api
            .list(&ListParams::default().labels(&self.selector(Some(key.name.as_str()))))
            .await
            .map_err(Trouble::from)?;
        let mut deleted = Vec::new();
        for namespace in listed.items {
            let Some(ns) = namespace.metadata.name.clone() else {
                continue;
            };
            if namespace.metadata.deletion_timestamp.is_none() {
                api.delete(&ns, &DeleteParams::background())
                    .await
                    .map_err(|e| Trouble::object("Namespace", &ns, e))?;
            }
            let started = Instant::now();
            loop {
                let Some(found) = api.get_opt(&ns).await.map_err(Trouble::from)? else {
                    break;
                };
                // Held by finalizers nothing will remove: the staging's cleanup fails with the
                // server's reason, and is tried again on later passes, rather than holding this
                // pass (and every other object in it) for minutes.
                let waited = started.elapsed();
                if waited > FINALIZER_GRACE
                    && let Some(why) = held_by_finalizers(&found)
                {
                    return Err(Trouble::Failed(format!(
                        "namespace {ns} cannot be deleted: {why}; remove those finalizers (or what should remove them) and the next pass finishes the cleanup"
                    )));
                }
                if waited > CLEANUP_WAIT {
                    return Err(Trouble::Failed(format!(
                        "namespace {ns} is still being deleted after {}s; see kubectl describe namespace {ns} for what holds it",
                        CLEANUP_WAIT.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            deleted.push(ns);
        }
        if let Some((template, parts)) = expired {
            let ns_hash = PartHashes::of(parts).get(&format!("Namespace/{}", template.namespace));
            let now = Utc::now().to_rfc3339();
            self.apply_namespace(
                key,
                template,
                &ns_hash,
                &BTreeSet::new(),
                &Resting::Archived(now.clone()),
                Some(&now),
            )
            .await?;
            return Ok(format!(
                "cleaned up after its ttl: namespace {} deleted with its volumes; an empty one is kept as a marker",
                template.namespace
            ));
        }
        Ok(match deleted.is_empty() {
            true => "already gone".into(),
            false => format!("namespace {} deleted", deleted.join(", ")),
        })
    }
}

/// Whether a staging's workloads run and, when they rest, since when: written on its namespace
/// as an annotation, so an agent that starts again (or another one) reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resting {
    /// Its workloads run.
    Running,
    /// Scaled to zero until started again (RFC 3339 time).
    Stopped(String),
    /// Scaled to zero, and cleaned up once archived longer than its ttl (RFC 3339 time).
    Archived(String),
}

impl Resting {
    /// What a namespace's annotations say (archived wins over stopped, as the ttl must run).
    fn of(annotations: &BTreeMap<String, String>) -> Resting {
        match (
            annotations.get(ANNOTATION_ARCHIVED_AT),
            annotations.get(ANNOTATION_STOPPED_AT),
        ) {
            (Some(at), _) => Resting::Archived(at.clone()),
            (None, Some(at)) => Resting::Stopped(at.clone()),
            (None, None) => Resting::Running,
        }
    }

    /// Where it moves for `target`: a rest already taken keeps its time (an archive's ttl runs
    /// from when it was first archived), a new one starts now.
    fn toward(self, target: TargetState) -> Resting {
        let now = || Utc::now().to_rfc3339();
        match (self, target) {
            (_, TargetState::Running) => Resting::Running,
            (Resting::Stopped(at), TargetState::Stopped) => Resting::Stopped(at),
            (_, TargetState::Stopped) => Resting::Stopped(now()),
            (Resting::Archived(at), TargetState::Archived) => Resting::Archived(at),
            (_, TargetState::Archived) => Resting::Archived(now()),
        }
    }

    /// Whether its workloads are scaled to zero.
    fn scaled_down(&self) -> bool {
        *self != Resting::Running
    }

    /// The annotation that records it.
    fn annotation(&self) -> Option<(&'static str, &str)> {
        match self {
            Resting::Running => None,
            Resting::Stopped(at) => Some((ANNOTATION_STOPPED_AT, at)),
            Resting::Archived(at) => Some((ANNOTATION_ARCHIVED_AT, at)),
        }
    }

    /// The state its namespace's part is observed in.
    fn part_state(&self) -> PartState {
        match self {
            Resting::Running => PartState::Running,
            Resting::Stopped(_) => PartState::Stopped,
            Resting::Archived(_) => PartState::Archived,
        }
    }
}

/// The state of the staging's namespace `ns` as observed: whether its workloads rest.
fn namespace_state(staging: &ObservedObject, ns: &str) -> PartState {
    staging
        .parts
        .iter()
        .find(|part| part.id.strip_prefix("Namespace/") == Some(ns))
        .map_or(PartState::Running, |part| part.state)
}

/// The kinds a staging's namespace says berth applied there (`apiVersion/Kind` lines); `None`
/// when the annotation is gone or garbled, and so cannot be trusted to name them all.
fn inventory_of(annotations: &BTreeMap<String, String>) -> Option<BTreeSet<(String, String)>> {
    annotations
        .get(ANNOTATION_INVENTORY)?
        .lines()
        .map(|line| {
            let (api_version, kind) = line.rsplit_once('/')?;
            let kind_ok = kind.starts_with(|c: char| c.is_ascii_uppercase())
                && kind.chars().all(|c| c.is_ascii_alphanumeric());
            (kind_ok && !api_version.is_empty())
                .then(|| (api_version.to_string(), kind.to_string()))
        })
        .collect()
}

/// What the namespace controller says holds a namespace being deleted, when it is finalizers
/// that no built-in controller removes (`NamespaceFinalizersRemaining`, naming a finalizer not of
/// `kubernetes.io/`, such as an operator's that is not running): the finalizers and how many
/// objects carry them. Built-in ones (`kubernetes.io/pvc-protection`, waiting for pods to end)
/// go by themselves.
fn held_by_finalizers(namespace: &DynamicObject) -> Option<String> {
    let message = namespace.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "NamespaceFinalizersRemaining" && c["status"] == "True")?["message"]
        .as_str()?;
    // "Some content in the namespace has finalizers remaining: NAME in N resource instances, …"
    let listed = message.split_once(": ").map_or(message, |(_, list)| list);
    // Kubernetes' own (`kubernetes.io/…`, `service.kubernetes.io/…`, `foregroundDeletion`)
    // are removed by its controllers as the objects go.
    let built_in = |finalizer: &str| {
        let domain = finalizer.split('/').next().unwrap_or(finalizer);
        domain == "kubernetes.io"
            || domain.ends_with(".kubernetes.io")
            || domain.ends_with(".k8s.io")
            || matches!(finalizer, "kubernetes" | "foregroundDeletion" | "orphan")
    };
    let foreign = listed
        .split(", ")
        .filter_map(|item| item.split(" in ").next())
        .any(|finalizer| !built_in(finalizer));
    foreign.then(|| message.to_string())
}

/// Why a step could not finish.
enum Trouble {
    /// The staging cannot be applied as it is: the reason says what to do.
    Failed(String),
    /// The API server did not answer.
    Gone(String),
}

impl From<kube::Error> for Trouble {
    fn from(error: kube::Error) -> Trouble {
        match error {
            kube::Error::Api(status) if status.message.contains("field is immutable") => {
                // The refusal quotes the whole object, cut where it would say which field.
                Trouble::Failed(immutable(&status.message))
            }
            kube::Error::Api(status) => {
                // Some refusals quote a whole object: keep the gist.
                let mut message: String = status.message.chars().take(400).collect();
                if status.message.chars().count() > 400 {
                    message.push('…');
                }
                Trouble::Failed(format!("the API server refused: {message}"))
            }
            other => Trouble::Gone(other.to_string()),
        }
    }
}

impl Trouble {
    fn object(kind: &str, name: &str, error: kube::Error) -> Trouble {
        match Trouble::from(error) {
            Trouble::Failed(why) => Trouble::Failed(format!("{kind}/{name}: {why}")),
            gone => gone,
        }
    }
}

/// What to say of an API server's "field is immutable" refusal: which fields, and the way
/// forward. Pure.
fn immutable(message: &str) -> String {
    // `Job.batch "migrate" is invalid: spec.template: Invalid value: core.PodTemplateSpec{…}:
    // field is immutable`, one `FIELD: Invalid value: …` per field, joined by ", ".
    let details = message
        .split_once(" is invalid: ")
        .map_or(message, |(_, d)| d);
    let fields: Vec<&str> = details
        .split(": Invalid value: ")
        .zip(details.split(": Invalid value: ").skip(1))
        .filter(|(_, rest)| rest.contains("field is immutable"))
        .filter_map(|(before, _)| before.rsplit(", ").next())
        .map(|field| field.trim().trim_start_matches('['))
        .filter(|field| !field.is_empty() && field.len() < 120)
        .collect();
    let fields = match fields.is_empty() {
        true => "a field".to_string(),
        false => fields.join(", "),
    };
    format!(
        "the API server refused: {fields} cannot change in place (the field is immutable); add the annotation {}: \"true\" to the manifest to delete the object and make it again",
        objects::RECREATE_ANNOTATION
    )
}

/// Why `manifest` cannot be applied to a server that does not serve its kind in its version:
/// the versions it serves that kind in, when it serves it in any (a `policy/v1`
/// PodDisruptionBudget on a server that has only `policy/v1beta1`), or that a
/// CustomResourceDefinition is missing.
fn unserved_message(discovery: &Discovery, manifest: &Manifest) -> String {
    let served: BTreeSet<String> = discovery
        .groups()
        .flat_map(|group| {
            group
                .versions()
                .flat_map(|version| group.versioned_resources(version))
                .filter(|(resource, _)| resource.kind == manifest.kind)
                .map(|(resource, _)| resource.api_version)
                .collect::<Vec<_>>()
        })
        .collect();
    let (file, line, kind) = (&manifest.file, manifest.line, &manifest.kind);
    let api_version = &manifest.api_version;
    if served.is_empty() {
        format!(
            "{file}:{line}: the API server does not serve kind {kind} in {api_version}; install its CustomResourceDefinition first, or fix apiVersion and kind"
        )
    } else {
        let served: Vec<String> = served.into_iter().collect();
        format!(
            "{file}:{line}: the API server does not serve {kind} in {api_version}; it serves {kind} in {}: write apiVersion: {}",
            served.join(", "),
            served[0]
        )
    }
}

/// Whether berth applied the object itself (its field manager holds an Apply), rather than a
/// controller that made it with labels copied from one of berth's objects.
fn applied_by_berth(metadata: &kube::api::ObjectMeta) -> bool {
    metadata.owner_references.as_ref().is_none_or(Vec::is_empty)
        && metadata.managed_fields.iter().flatten().any(|entry| {
            entry.manager.as_deref() == Some(FIELD_MANAGER)
                && entry.operation.as_deref() == Some("Apply")
        })
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

fn namespace_resource() -> ApiResource {
    ApiResource::erase::<k8s_openapi::api::core::v1::Namespace>(&())
}

fn pod_resource() -> ApiResource {
    ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&())
}

fn secret_resource() -> ApiResource {
    ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&())
}

fn claim_resource() -> ApiResource {
    ApiResource::erase::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(&())
}

/// Eight hex digits from the kernel's random source, for names made anew each time.
fn random_suffix() -> String {
    hex::encode(&random_key()[..4])
}

/// 32 bytes from the kernel's random source, for keys that never leave the process.
fn random_key() -> [u8; 32] {
    super::random_bytes().unwrap_or_else(|_| {
        let seed = format!("{:?}{:?}", std::time::SystemTime::now(), std::process::id());
        Sha256::digest(seed.as_bytes()).into()
    })
}

/// What a cluster serves as `helm template --api-versions` lists it: each `group/version` and
/// each `group/version/Kind` (the core group's as `v1` and `v1/Kind`), sorted, each once. Pure.
fn api_versions(served: impl Iterator<Item = (String, String)>) -> Vec<String> {
    let mut listed = BTreeSet::new();
    for (api_version, kind) in served {
        listed.insert(format!("{api_version}/{kind}"));
        listed.insert(api_version);
    }
    listed.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_told_each_served_version_and_kind_once() {
        let served = [
            ("v1", "Service"),
            ("apps/v1", "Deployment"),
            ("apps/v1", "StatefulSet"),
            ("policy/v1beta1", "PodDisruptionBudget"),
        ]
        .map(|(version, kind)| (version.to_string(), kind.to_string()));
        assert_eq!(
            api_versions(served.into_iter()),
            [
                "apps/v1",
                "apps/v1/Deployment",
                "apps/v1/StatefulSet",
                "policy/v1beta1",
                "policy/v1beta1/PodDisruptionBudget",
                "v1",
                "v1/Service",
            ]
        );
    }

    /// A staging's rest is read back from its namespace, keeps its time while it lasts (an
    /// archive's ttl runs from when it was first archived), and stopping never starts a ttl.
    #[test]
    fn a_rest_is_read_back_and_keeps_its_time() {
        let annotated = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let at = "2026-12-01T00:00:00+00:00";
        let stopped = Resting::of(&annotated(&[(ANNOTATION_STOPPED_AT, at)]));
        assert_eq!(stopped, Resting::Stopped(at.into()));
        assert_eq!(stopped.part_state(), PartState::Stopped);
        assert_eq!(
            stopped.clone().toward(TargetState::Stopped),
            Resting::Stopped(at.into())
        );
        assert_eq!(stopped.annotation(), Some((ANNOTATION_STOPPED_AT, at)));
        let archived = stopped.toward(TargetState::Archived);
        assert!(matches!(&archived, Resting::Archived(when) if when != at));
        assert!(archived.scaled_down());
        let both = annotated(&[(ANNOTATION_STOPPED_AT, at), (ANNOTATION_ARCHIVED_AT, at)]);
        assert_eq!(Resting::of(&both), Resting::Archived(at.into()));
        let running = Resting::of(&both).toward(TargetState::Running);
        assert_eq!((running.annotation(), running.scaled_down()), (None, false));
        assert_eq!(Resting::of(&BTreeMap::new()), Resting::Running);
    }

    /// A refusal of an immutable change names the fields, even past the quoted object, and the
    /// way forward.
    #[test]
    fn an_immutable_field_is_named_with_the_way_forward() {
        let quoted = "x".repeat(2000);
        let one = format!(
            "Job.batch \"migrate\" is invalid: spec.template: Invalid value: core.PodTemplateSpec{{{quoted}, Labels:map[]}}: field is immutable"
        );
        let said = immutable(&one);
        assert!(
            said.starts_with("the API server refused: spec.template cannot change in place"),
            "{said}"
        );
        assert!(said.contains("berth.io/recreate: \"true\""), "{said}");
        assert!(said.len() < 300, "{said}");
        let two = format!(
            "Deployment.apps \"web\" is invalid: [spec.selector: Invalid value: v1.LabelSelector{{{quoted}}}: field is immutable, spec.template.metadata.labels: Invalid value: map[string]string{{\"app\":\"x\"}}: `selector` does not match template `labels`]"
        );
        assert!(
            immutable(&two).contains("spec.selector cannot change"),
            "{}",
            immutable(&two)
        );
    }
}
