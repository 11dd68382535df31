//! Backends: the parts that observe and change one family of resources, behind one interface.
//!
//! Every backend does the same five things: says which [`Kind`]s it serves, turns descriptors into
//! [`DesiredObject`]s (pure), observes what this berth instance owns, applies one step, and tells
//! the health of what it runs. [`Backend`] is that interface, as an enum over the backends (simpler
//! than trait objects with async methods): [`docker`] runs Challenges and Pipelines on the Docker
//! Engine, [`kube`] runs Stagings and Challenges with `target: kubernetes` on a cluster.
//! [`Engines`] is the registry a pass uses: it routes each descriptor and step by kind and engine,
//! and holds back what an absent engine would run. The ownership labels every backend puts on what it makes are built here, once
//! ([`Ownership`]).
//!
//! Nothing outside this module names an engine's types: the rest of berth sees [`DesiredObject`],
//! [`ObservedObject`], [`Outcome`] and [`EngineError`].

pub mod docker;
pub mod instance;
pub mod instances;
pub mod kube;
pub(crate) mod solving;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use crate::apply::Outcome;
use crate::descriptor::load::Loaded;
use crate::descriptor::{Kind, ObjectRef};
use crate::plan::{
    DesiredObject, Engine, Hold, ObservedObject, Products, Step, TargetState, Vocabulary,
};

/// `text` with every secret value, and each line of one of several lines, shown as `<secret>`:
/// what a container or a pod says (logs, health output) before it is shown anywhere. Longest
/// first, so a secret that begins another never leaves the other's tail. Pure.
pub(crate) fn masked(text: &str, secrets: &[String]) -> String {
    let mut pieces: Vec<&str> = secrets
        .iter()
        .flat_map(|value| std::iter::once(value.as_str()).chain(value.lines()))
        .map(str::trim)
        .filter(|piece| !piece.is_empty())
        .collect();
    pieces.sort_by_key(|piece| std::cmp::Reverse(piece.len()));
    pieces.into_iter().fold(text.to_string(), |text, piece| {
        text.replace(piece, "<secret>")
    })
}

/// Label naming the berth instance that owns an object.
pub const LABEL_INSTANCE: &str = "berth.instance";
/// Label naming the owning descriptor's kind.
pub const LABEL_KIND: &str = "berth.kind";
/// Label naming the owning descriptor.
pub const LABEL_NAME: &str = "berth.name";
/// Label with the hash of the object's (or part's) template.
pub const LABEL_SPEC_HASH: &str = "berth.spec-hash";
/// Label naming the per-team instance an object is made for (its id in the agent's store).
pub const LABEL_INSTANCE_ID: &str = "berth.team-instance";

/// 32 bytes from the kernel's random source: keys that tell rotated secrets, unique names.
pub(crate) fn random_bytes() -> std::io::Result<[u8; 32]> {
    use std::io::Read as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Who owns what: one berth instance, and the labels that say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    instance: String,
}

impl Ownership {
    /// Ownership by `instance`.
    pub fn new(instance: &str) -> Ownership {
        Ownership {
            instance: instance.to_string(),
        }
    }

    /// The instance's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The labels on everything made for `key` from a template with `spec_hash`: instance, kind,
    /// name and hash. Backends add their own (slot, spec) beside these.
    pub fn labels(&self, key: &ObjectRef, spec_hash: &str) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_INSTANCE.to_string(), self.instance.clone()),
            (LABEL_KIND.to_string(), key.kind.to_string()),
            (LABEL_NAME.to_string(), key.name.to_string()),
            (LABEL_SPEC_HASH.to_string(), spec_hash.to_string()),
        ])
    }

    /// [`Ownership::labels`] laid over a descriptor's own `labels` (which cannot hold `berth.`
    /// keys, so none is overwritten).
    pub fn labels_over(
        &self,
        labels: &BTreeMap<String, String>,
        key: &ObjectRef,
        spec_hash: &str,
    ) -> HashMap<String, String> {
        let mut all: HashMap<String, String> = labels.clone().into_iter().collect();
        all.extend(self.labels(key, spec_hash));
        all
    }

    /// The label on what the instance keeps for itself (an engine's apply lock, its key), which
    /// belongs to no descriptor.
    pub fn instance_labels(&self) -> HashMap<String, String> {
        HashMap::from([(LABEL_INSTANCE.to_string(), self.instance.clone())])
    }

    /// Label selectors (`key=value`) matching what this instance owns of `kind`, or of one object.
    pub fn selector(&self, kind: Kind, name: Option<&str>) -> Vec<String> {
        let mut selector = vec![
            format!("{LABEL_INSTANCE}={}", self.instance),
            format!("{LABEL_KIND}={kind}"),
        ];
        if let Some(name) = name {
            selector.push(format!("{LABEL_NAME}={name}"));
        }
        selector
    }
}

/// Why an engine could not be used at all (as opposed to one object failing). Always transient:
/// the agent retries with backoff and leaves what runs alone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// No engine answered.
    #[error("{engine} at {host} is not answering ({reason}); is it running? {hint}")]
    Unreachable {
        /// Which engine: "the Docker Engine".
        engine: &'static str,
        /// Where berth looked.
        host: String,
        /// What went wrong, in the client's words.
        reason: String,
        /// What the user can do.
        hint: &'static str,
    },
    /// A setting for the engine is wrong: nothing is tried until it is fixed.
    #[error("{0}")]
    Misconfigured(String),
    /// Another berth is applying to the same engine for the same instance.
    #[error(
        "waiting for the apply lock held by another berth ({holder}, since {since}) applying instance {instance} on this engine; gave up after {waited}s, to try again. If that berth is gone, remove its lock: docker rm -f {lock}"
    )]
    Locked {
        /// The instance.
        instance: String,
        /// Who holds the lock: host and process.
        holder: String,
        /// Since when (RFC 3339).
        since: String,
        /// How long this berth waited.
        waited: u64,
        /// The lock's name in the engine.
        lock: String,
    },
}

/// A template, kept per object so a step can be applied: what a backend needs beyond the plan.
#[derive(Debug, Clone)]
enum Template {
    Challenge(Box<docker::ChallengeTemplate>),
    KubeChallenge(Box<kube::challenge::ChallengeTemplate>),
    Pipeline(Box<docker::run::PipelineTemplate>),
    Staging(Box<kube::StagingTemplate>),
}

/// Longest wait for a cluster to tell its version and what it serves, for its charts.
const CLUSTER_FACTS_WAIT: Duration = Duration::from_secs(5);

/// The desired state of one revision, ready for planning and applying.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    /// What each descriptor asks for, in plan form.
    pub objects: Vec<DesiredObject>,
    /// Descriptor spec hashes, by object (for status).
    pub spec_hashes: HashMap<ObjectRef, String>,
    /// The Pipelines whose products each object uses: resolved before planning.
    pub pipeline_references: BTreeMap<ObjectRef, Vec<ObjectRef>>,
    /// Shared: desired state is copied into every pass, its templates need not be.
    templates: std::sync::Arc<HashMap<ObjectRef, Template>>,
}

impl Template {
    /// The same template taking the images its Pipelines produced; `None` for one that cannot
    /// take them (a product missing, a tag a Staging cannot read).
    fn with_products(&self, products: &Products) -> Option<Template> {
        Some(match self {
            Template::Challenge(t) => Template::Challenge(Box::new(t.with_products(products)?)),
            Template::KubeChallenge(t) => {
                Template::KubeChallenge(Box::new(t.with_products(products)?))
            }
            Template::Staging(t) => Template::Staging(Box::new(t.with_products(products)?)),
            Template::Pipeline(_) => return None,
        })
    }

    /// Sets what `object` plans from this template: its parts (and a staging's failure to
    /// render them).
    fn shape(&self, object: &mut DesiredObject) {
        match self {
            Template::Challenge(t) => object.parts = t.parts.clone(),
            Template::KubeChallenge(t) => object.parts = t.parts(),
            Template::Staging(t) => t.shape(object),
            Template::Pipeline(_) => {}
        }
    }
}

impl Desired {
    /// The Pipelines, each with what its runs need.
    pub fn pipelines(
        &self,
    ) -> impl Iterator<Item = (&crate::descriptor::Name, &docker::run::PipelineTemplate)> {
        self.templates
            .iter()
            .filter_map(|(key, template)| match template {
                Template::Pipeline(template) => Some((&key.name, template.as_ref())),
                _ => None,
            })
    }

    /// The instanced Challenges, as the revision (resolved) declares them.
    pub fn instanced(&self) -> Vec<instances::InstanceTemplate> {
        self.templates
            .values()
            .filter_map(|template| match template {
                Template::Challenge(t) if t.spec.instanced.is_some() => {
                    Some(instances::InstanceTemplate::Docker(t.as_ref().clone()))
                }
                Template::KubeChallenge(t) if t.instanced() => {
                    Some(instances::InstanceTemplate::kubernetes(t.as_ref().clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Makes `key`, which uses Pipelines' products, run them. False when it cannot take them,
    /// so it keeps waiting.
    pub fn use_products(&mut self, key: &ObjectRef, products: &Products) -> bool {
        let Some(template) = self
            .templates
            .get(key)
            .and_then(|t| t.with_products(products))
        else {
            return false;
        };
        if let Some(object) = self.objects.iter_mut().find(|o| &o.key == key) {
            template.shape(object);
        }
        std::sync::Arc::make_mut(&mut self.templates).insert(key.clone(), template);
        true
    }
}

/// One backend: the interface every engine implements.
#[derive(Clone)]
pub enum Backend {
    /// Challenges as containers on a Docker Engine.
    Docker(docker::DockerBackend),
    /// Stagings as namespaces on a Kubernetes cluster, and Challenges as Deployments there.
    Kube(kube::KubeBackend),
}

/// Which backend serves `kind`, if any here.
fn serves(kind: Kind) -> bool {
    docker::KINDS.contains(&kind) || kube::KINDS.contains(&kind)
}

impl Backend {
    /// The engine it drives.
    pub fn engine(&self) -> Engine {
        match self {
            Backend::Docker(_) => Engine::Docker,
            Backend::Kube(_) => Engine::Kubernetes,
        }
    }

    /// Removes everything of `key` from the engine.
    async fn remove(&self, key: &ObjectRef) -> Outcome {
        match (self, key.kind) {
            (Backend::Docker(docker), Kind::Pipeline) => docker.remove_products(key).await,
            (Backend::Docker(docker), _) => docker.delete(key).await,
            (Backend::Kube(kube), Kind::Challenge) => kube.delete_challenge(key).await,
            (Backend::Kube(kube), _) => kube.delete(key, None).await,
        }
    }

    /// What this instance runs on the engine.
    pub async fn observe(&self) -> Result<Vec<ObservedObject>, EngineError> {
        match self {
            Backend::Docker(docker) => docker.observe().await,
            Backend::Kube(kube) => kube.observe().await,
        }
    }

    /// Applies one step of `object`; `root` is the checkout of the revision being applied.
    async fn apply(
        &self,
        step: &Step,
        object: Option<&DesiredObject>,
        template: Option<&Template>,
        root: &Path,
    ) -> Outcome {
        let delete = step.action == crate::plan::Action::Delete;
        match (self, template) {
            (Backend::Docker(_), _) if delete => self.remove(&step.key).await,
            (Backend::Docker(docker), Some(Template::Pipeline(template))) => {
                docker.produce(template, root).await
            }
            (Backend::Docker(docker), Some(Template::Challenge(template))) => {
                docker.converge(template, root).await
            }
            (Backend::Kube(kube), Some(Template::KubeChallenge(template))) if !delete => {
                let parts = object.map_or(&[][..], |o| o.parts.as_slice());
                kube.converge_challenge(template, parts, root).await
            }
            (Backend::Kube(_), _) if delete && step.key.kind == Kind::Challenge => {
                self.remove(&step.key).await
            }
            (Backend::Kube(kube), template) if delete => {
                // A declared staging is deleted only when its ttl ran out: it leaves a marker.
                let expired = match (template, object) {
                    (Some(Template::Staging(template)), Some(object)) => {
                        Some((template.as_ref(), object.parts.as_slice()))
                    }
                    _ => None,
                };
                kube.delete(&step.key, expired).await
            }
            (Backend::Kube(kube), Some(Template::Staging(template))) => match object {
                Some(object) => {
                    kube.converge(&step.key, template, &object.parts, object.target)
                        .await
                }
                None => Outcome::Failed(format!("{} is not declared (a bug in berth)", step.key)),
            },
            _ => Outcome::Failed(format!("{} has no template (a bug in berth)", step.key)),
        }
    }

    /// Fills in why each unhealthy part of `wanted` objects is unhealthy (exit code, last log
    /// lines, a hand edit), and finds crash loops among parts still starting.
    async fn diagnose(
        &self,
        observed: &mut [ObservedObject],
        wanted: &HashSet<&ObjectRef>,
        desired: &Desired,
    ) {
        match self {
            Backend::Docker(docker) => docker.diagnose(observed, wanted).await,
            Backend::Kube(kube) => {
                // The desired parts carry their hashes already: nothing is hashed again.
                let stagings = desired
                    .objects
                    .iter()
                    .filter_map(|object| match desired.templates.get(&object.key) {
                        Some(Template::Staging(template)) => Some((
                            object.key.clone(),
                            (template.as_ref(), object.parts.as_slice()),
                        )),
                        _ => None,
                    })
                    .collect();
                kube.diagnose(observed, &stagings);
                let challenges: Vec<_> = desired
                    .templates
                    .iter()
                    .filter(|(key, _)| wanted.contains(key))
                    .filter_map(|(key, template)| match template {
                        Template::KubeChallenge(template) => Some((key, template.as_ref())),
                        _ => None,
                    })
                    .collect();
                kube.judge_by_solvers(observed, &challenges);
            }
        }
    }

    /// Records the keyed digests of secret values on the desired parts, so a rotated secret
    /// shows as a change.
    async fn seal(&self, desired: &mut Desired) -> Result<(), EngineError> {
        match self {
            Backend::Docker(docker) => {
                // One read of the key for the whole plan.
                let needs_key = desired
                    .templates
                    .values()
                    .any(|template| matches!(template, Template::Challenge(t) if t.has_secrets()));
                let key = match needs_key {
                    true => docker.digest_key(false).await?,
                    false => None,
                };
                for object in &mut desired.objects {
                    if let Some(Template::Challenge(template)) = desired.templates.get(&object.key)
                    {
                        docker::DockerBackend::seal(template, object, key.as_deref());
                    }
                }
                Ok(())
            }
            Backend::Kube(kube) => {
                for object in &mut desired.objects {
                    match desired.templates.get(&object.key) {
                        Some(Template::Staging(template)) => kube.seal(template, object),
                        Some(Template::KubeChallenge(template)) => {
                            kube.seal_challenge(template, object)
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
        }
    }
}

/// Translates a loaded revision's descriptors into desired state: each routed to the backend of
/// its kind, the rest planned as `skip` with the reason. Pure: no engine; the file system only
/// as the loader left it (a Staging whose tag a Pipeline produces renders from the checkout
/// once the tag is known).
pub fn desired(loaded: &Loaded) -> Desired {
    let mut desired = Desired::default();
    let mut templates = HashMap::new();
    for descriptor in &loaded.descriptors {
        let key = descriptor.key();
        desired
            .spec_hashes
            .insert(key.clone(), descriptor.spec_hash.clone());
        let pipelines = descriptor.pipelines_used();
        if !pipelines.is_empty() {
            desired.pipeline_references.insert(key.clone(), pipelines);
        }
        if !serves(descriptor.kind()) {
            desired.objects.push(DesiredObject {
                engine: Engine::usual_for(key.kind),
                key,
                target: TargetState::Running,
                parts: Vec::new(),
                dependencies: descriptor.dependencies(),
                start_first: true,
                hold: Some(Hold::Skip("skipped (no backend yet)".into())),
                words: Vocabulary::CONTAINER,
                ttl: None,
                ready_timeout: None,
            });
            continue;
        }
        if let Some((object, template)) = kube::challenge::desired_object(descriptor) {
            templates.insert(key, Template::KubeChallenge(Box::new(template)));
            desired.objects.push(object);
        } else if let Some((object, template)) = docker::desired_object(descriptor) {
            templates.insert(key, Template::Challenge(Box::new(template)));
            desired.objects.push(object);
        } else if let Some((object, template)) = docker::run::desired_pipeline(descriptor) {
            templates.insert(key, Template::Pipeline(Box::new(template)));
            desired.objects.push(object);
        } else if let Some((object, template)) =
            kube::desired_object(descriptor, &loaded.root, &loaded.rendering)
        {
            templates.insert(key, Template::Staging(Box::new(template)));
            desired.objects.push(object);
        }
    }
    desired.templates = std::sync::Arc::new(templates);
    desired
}

/// The engines one pass works with: every backend this berth has, routed by kind.
#[derive(Clone)]
pub struct Engines {
    backends: Vec<Backend>,
    /// Engines that did not answer when connecting (the Docker Engine of a pod without its
    /// socket): their objects are held back as if the engine went away, the rest go on.
    absent: Vec<(Engine, EngineError)>,
}

/// How long a pass waits for another berth's lock before giving up.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(120);

/// Held while a pass applies; [`EngineLock::release`] removes it from the engines (dropping it
/// does too, in the background).
pub struct EngineLock {
    locks: Vec<docker::ApplyLock>,
}

impl EngineLock {
    /// Removes the locks from the engines.
    pub async fn release(self) {
        for lock in self.locks {
            lock.release().await;
        }
    }
}

impl Engines {
    /// The Docker Engine's backend, when this berth has one.
    pub fn docker(&self) -> Option<docker::DockerBackend> {
        self.backends.iter().find_map(|backend| match backend {
            Backend::Docker(docker) => Some(docker.clone()),
            Backend::Kube(_) => None,
        })
    }

    /// The engines per-team instances are made on.
    pub fn instance_engines(&self) -> instances::InstanceEngines {
        let kube = self.backends.iter().find_map(|backend| match backend {
            Backend::Kube(kube) => Some(kube.clone()),
            Backend::Docker(_) => None,
        });
        instances::InstanceEngines::new(self.docker(), kube)
    }

    /// Waits at most `wait` for a Kubernetes challenge's rollout when applying it (see
    /// [`kube::KubeBackend::set_rollout_wait`]).
    pub fn set_rollout_wait(&mut self, wait: Duration) {
        for backend in &mut self.backends {
            if let Backend::Kube(kube) = backend {
                kube.set_rollout_wait(wait);
            }
        }
    }

    /// Bounds what a pipeline run may write to disk (see
    /// [`docker::DockerBackend::set_workspace_limit`]).
    pub fn set_workspace_limit(&mut self, limit: crate::descriptor::values::Size) {
        for backend in &mut self.backends {
            if let Backend::Docker(docker) = backend {
                docker.set_workspace_limit(limit);
            }
        }
    }

    /// Lets diagnoses start the challenges' solvers that are due (an agent and an apply do; a
    /// plan, which changes nothing, only reads what they last found).
    pub fn run_solvers(&mut self) {
        for backend in &mut self.backends {
            match backend {
                Backend::Docker(docker) => docker.run_solvers(),
                Backend::Kube(kube) => kube.run_solvers(),
            }
        }
    }

    /// Ends the solvers' runs going on, removing their containers: an apply that started them
    /// is ending, and leaves none behind.
    pub async fn stop_solvers(&self) {
        for backend in &self.backends {
            match backend {
                Backend::Docker(docker) => docker.stop_solvers().await,
                Backend::Kube(kube) => kube.stop_solvers().await,
            }
        }
    }

    /// Connects to every engine this berth drives: the Docker Engine, and the Kubernetes cluster
    /// `access` names when one is configured.
    pub async fn connect(
        ownership: &Ownership,
        access: &kube::Access,
    ) -> Result<Engines, EngineError> {
        let docker = docker::DockerBackend::connect(ownership).await;
        let cluster = kube::KubeBackend::connect(ownership, access).await?;
        let mut backends = Vec::new();
        let mut absent = Vec::new();
        match docker {
            Ok(docker) => backends.push(Backend::Docker(docker)),
            // With a cluster, a missing Docker Engine holds back only what runs on Docker.
            Err(error) if cluster.is_some() => absent.push((Engine::Docker, error)),
            Err(error) => return Err(error),
        }
        if let Some(cluster) = cluster {
            backends.push(Backend::Kube(cluster));
        }
        Ok(Engines { backends, absent })
    }

    /// What Staging charts are told of the cluster, when this berth drives one and it answers;
    /// `None` otherwise, and helm renders for its own defaults.
    pub async fn cluster_facts(
        &self,
    ) -> Option<std::sync::Arc<crate::descriptor::manifests::ClusterFacts>> {
        let Some(Backend::Kube(cluster)) = self.backend(Engine::Kubernetes) else {
            return None;
        };
        // A server that stops answering holds nothing up: the charts keep their last render.
        match tokio::time::timeout(CLUSTER_FACTS_WAIT, cluster.cluster_facts()).await {
            Ok(Ok(facts)) => Some(facts),
            Ok(Err(error)) => {
                tracing::debug!(%error, "the cluster's version could not be read for its charts");
                None
            }
            Err(_) => {
                tracing::debug!("the cluster did not tell its version in time for its charts");
                None
            }
        }
    }

    /// The backend of `engine`, when this berth drives one.
    fn backend(&self, engine: Engine) -> Option<&Backend> {
        self.backends.iter().find(|b| b.engine() == engine)
    }

    /// Holds back the objects whose engine this berth does not drive (stagings, or challenges
    /// with `target: kubernetes`, with no cluster configured), with the reason and what to do.
    pub fn hold_unserved(&self, desired: &mut Desired) {
        for object in desired.objects.iter_mut().filter(|o| o.hold.is_none()) {
            let absent = self
                .absent
                .iter()
                .any(|(engine, _)| *engine == object.engine);
            if self.backend(object.engine).is_none() && !absent {
                object.hold = Some(Hold::Skip(format!(
                    "skipped: no {} is configured (set KUBECONFIG, or kube.kubeconfig in the agent's config)",
                    match object.engine {
                        Engine::Kubernetes => "Kubernetes cluster",
                        Engine::Docker => "Docker Engine",
                    }
                )));
            }
        }
    }

    /// What this instance runs, on every engine, sorted by object.
    pub async fn observe(&self) -> Result<Vec<ObservedObject>, EngineError> {
        let (observed, mut unreachable) = self.observe_available().await;
        match unreachable.pop() {
            Some((_, error)) => Err(error),
            None => Ok(observed),
        }
    }

    /// What this instance runs on every engine that answers, sorted by object, and each engine
    /// that does not, with why: one engine down holds back only its own objects.
    pub async fn observe_available(&self) -> (Vec<ObservedObject>, Vec<(Engine, EngineError)>) {
        let mut observed = Vec::new();
        let mut unreachable = self.absent.clone();
        let seen =
            futures_util::future::join_all(self.backends.iter().map(|backend| backend.observe()))
                .await;
        for (backend, result) in self.backends.iter().zip(seen) {
            match result {
                Ok(objects) => observed.extend(objects),
                Err(error) => unreachable.push((backend.engine(), error)),
            }
        }
        observed.sort_by(|a, b| a.key.cmp(&b.key));
        (observed, unreachable)
    }

    /// How many engines this berth drives (or would, had they answered).
    pub fn len(&self) -> usize {
        self.backends.len() + self.absent.len()
    }

    /// Whether it drives none (never: the Docker Engine is always one).
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// Records secret digests on `desired` (see [`Backend`]'s `seal`).
    pub async fn seal(&self, desired: &mut Desired) -> Result<(), EngineError> {
        for backend in &self.backends {
            backend.seal(desired).await?;
        }
        Ok(())
    }

    /// Explains, in the engine's words, each unhealthy part of the objects `desired` means to run
    /// (a stopped challenge's exited containers are as they should be), and finds crash loops
    /// among parts still starting.
    pub async fn diagnose(&self, observed: &mut [ObservedObject], desired: &Desired) {
        let wanted: HashSet<&ObjectRef> = desired
            .objects
            .iter()
            .filter(|o| o.hold.is_none() && o.target == TargetState::Running)
            .map(|o| &o.key)
            .collect();
        for backend in &self.backends {
            backend.diagnose(observed, &wanted, desired).await;
        }
    }

    /// Applies one step with the backend of its engine. A step that moves the object from
    /// another engine removes it there only once it runs on the new one; a delete removes it from
    /// both.
    pub async fn apply(&self, step: &Step, desired: &Desired, root: &Path) -> Outcome {
        let template = desired.templates.get(&step.key);
        let object = desired.objects.iter().find(|o| o.key == step.key);
        if let Some(Hold::Fail(why)) = object.and_then(|o| o.hold.as_ref()) {
            return Outcome::Failed(why.clone());
        }
        let Some(backend) = self.backend(step.engine) else {
            return Outcome::Failed(format!("no {} engine is configured here", step.engine));
        };
        let old = step.from.and_then(|from| self.backend(from));
        // Host ports cannot be held by both engines: such a move removes the old copy first.
        let stop_first = object.is_some_and(|o| !o.start_first);
        let mut removed_first = None;
        if let (Some(old), true) = (old, stop_first) {
            match old.remove(&step.key).await {
                Outcome::Done(removed) => removed_first = Some(removed),
                other => return other,
            }
        }
        let outcome = backend.apply(step, object, template, root).await;
        let (Outcome::Done(done), Some(from), Some(old)) = (&outcome, step.from, old) else {
            return outcome;
        };
        if let Some(removed) = removed_first {
            return Outcome::Done(format!("from {from}: {removed}; then {done}"));
        }
        match old.remove(&step.key).await {
            Outcome::Done(removed) => Outcome::Done(format!("{done}; from {from}: {removed}")),
            Outcome::Transient(why) => Outcome::Transient(format!(
                "{done}; but {from} did not answer while its copy was removed ({why}); the next pass removes it"
            )),
            other => Outcome::Failed(format!(
                "{done}; but its copy on {from} could not be removed: {}",
                other.detail()
            )),
        }
    }

    /// Takes this instance's apply lock on every engine, waiting up to `wait` for another berth
    /// to finish; the lock lives in the engine, so berths on other hosts see it too.
    pub async fn lock(&self, wait: Duration) -> Result<EngineLock, EngineError> {
        let mut locks = Vec::new();
        for backend in &self.backends {
            match backend {
                Backend::Docker(docker) => locks.push(docker.lock(wait).await?),
                // The Docker Engine's lock serializes the berths of an instance; a cluster
                // shared by instances on different Docker hosts gets a Lease with leader
                // election.
                Backend::Kube(_) => {}
            }
        }
        Ok(EngineLock { locks })
    }
}
