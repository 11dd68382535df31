//! The plan: what must change to turn observed state into desired state, one step per object, each
//! with its reasons.
//!
//! [`diff`] is a pure function over every kind. Backends describe each object as *parts*: a
//! container slot (each replica, each sidecar), a Kubernetes object, a pipeline run. Each part has
//! the hash of its own template and its spec as JSON for explaining changes. Comparing parts rather
//! than whole objects means a changed sidecar replaces only that sidecar, and leftovers of an
//! interrupted apply (two containers in one slot) are seen and cleaned. The words of the reasons
//! ("container missing", "object missing") come from the backend through [`Vocabulary`].
//! Rendering (text, markdown, JSON) lives here too; nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::descriptor::{Name, ObjectRef};

/// What an object should be doing once applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    /// Its parts exist and run.
    Running,
    /// Its parts exist and are stopped (a Challenge's `state: stopped`).
    Stopped,
    /// Its workloads are scaled to zero and its volumes kept (a Staging's `state: archived`).
    Archived,
}

pub use crate::descriptor::model::Engine;

/// The words a backend's reasons use for its parts: "container missing", "object missing".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vocabulary {
    /// What one part is called.
    pub part: &'static str,
    /// Whether an update replaces parts (containers), so the plan says how; an object applied
    /// in place (a Kubernetes object) is not replaced.
    pub replaces: bool,
}

impl Vocabulary {
    /// Parts that are containers.
    pub const CONTAINER: Vocabulary = Vocabulary {
        part: "container",
        replaces: true,
    };
}

/// One part an object should have.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// Which part: `main-1`, `sidecar-db`, `Deployment/web`.
    pub id: String,
    /// Hash of the part's template; a different hash means the part is replaced.
    pub hash: String,
    /// The part's spec, for explaining changes (secrets only as references); shared, since
    /// replicas have one spec and desired state is copied into every pass.
    pub spec: std::sync::Arc<Value>,
    /// Keyed digests of the part's secret values, by secret name; `None` where they cannot be
    /// known (a plan against committed status has no secrets), and then they are not compared.
    pub secrets: Option<BTreeMap<String, SecretDigest>>,
    /// Whether the part runs once and exits (`restart: no`): an exited one-shot is done, not stopped.
    pub one_shot: bool,
}

/// Why an object is held back from this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// No backend here applies it: never applied.
    Skip(String),
    /// It needs something that is not there yet (the image a Pipeline has not produced): applied
    /// once it is.
    Wait(String),
    /// It cannot be made as declared (a chart that does not render): its step fails with the
    /// reason and leaves what runs alone.
    Fail(String),
}

/// What an object should be.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredObject {
    /// `Kind/name`.
    pub key: ObjectRef,
    /// The engine it runs on.
    pub engine: Engine,
    /// What its parts should be doing.
    pub target: TargetState,
    /// Its parts.
    pub parts: Vec<Part>,
    /// Objects that must be applied first.
    pub dependencies: Vec<ObjectRef>,
    /// Whether new parts can start before old ones stop (no published host port clashes).
    pub start_first: bool,
    /// Why it is not applied in this pass, if so.
    pub hold: Option<Hold>,
    /// The words its reasons use.
    pub words: Vocabulary,
    /// How long it may stay archived before it is cleaned up (a Staging's `ttl`).
    pub ttl: Option<std::time::Duration>,
    /// How long it may stay Progressing after it was applied before it counts as a Failure (a
    /// Staging's `readyTimeout`); no limit when `None`.
    pub ready_timeout: Option<std::time::Duration>,
}

/// Health of an object or part, as berth reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Health {
    /// Running and passing its health check (or running with none; or a one-shot that succeeded).
    Healthy,
    /// Starting, or its health check has not passed yet.
    Progressing,
    /// Exited, restarting, or failing its health check.
    Degraded,
    /// Not there.
    Missing,
    /// Not known.
    Unknown,
}

impl Health {
    /// Every health, best first.
    pub const ALL: [Health; 5] = [
        Health::Healthy,
        Health::Progressing,
        Health::Degraded,
        Health::Missing,
        Health::Unknown,
    ];

    /// The health's name, as status files write it: `Healthy`, `Degraded`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "Healthy",
            Health::Progressing => "Progressing",
            Health::Degraded => "Degraded",
            Health::Missing => "Missing",
            Health::Unknown => "Unknown",
        }
    }
}

/// What a part is doing, as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartState {
    /// Running (or restarting).
    Running,
    /// Made but not running.
    Stopped,
    /// Scaled to zero with its volumes kept.
    Archived,
    /// A one-shot that ran and exited; see its health for how.
    Completed,
}

impl PartState {
    /// The state's name, as status files write it: `running`, `stopped`, …
    pub fn as_str(self) -> &'static str {
        match self {
            PartState::Running => "running",
            PartState::Stopped => "stopped",
            PartState::Archived => "archived",
            PartState::Completed => "completed",
        }
    }
}

/// One part berth owns, as the engine reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedPart {
    /// The engine's name for it.
    pub name: String,
    /// Which part it is.
    pub id: String,
    /// Hash of the template it was made from.
    pub hash: String,
    /// The spec it was made from.
    pub spec: Value,
    /// Keyed digests of the secret values it was made with; `None` when not recorded.
    pub secrets: Option<BTreeMap<String, String>>,
    /// What it is doing.
    pub state: PartState,
    /// Its health.
    pub health: Health,
    /// Why it is not healthy, in the engine's words (`exited with code 1`), when known.
    pub detail: Option<String>,
}

impl ObservedPart {
    /// `main-1 is Degraded: exited with code 1; …`, as plans, apply and status say it.
    pub fn condition(&self) -> String {
        match &self.detail {
            Some(detail) => format!("{} is {:?}: {detail}", self.id, self.health),
            None => format!("{} is {:?}", self.id, self.health),
        }
    }
}

/// What the engine runs for one object.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedObject {
    /// `Kind/name`.
    pub key: ObjectRef,
    /// The engine that runs it. An object moving between engines is observed on both.
    pub engine: Engine,
    /// Its parts.
    pub parts: Vec<ObservedPart>,
    /// Since when it is archived, when the engine records it.
    pub archived_at: Option<DateTime<Utc>>,
    /// When it was cleaned up after its ttl: only a marker is left.
    pub expired: Option<DateTime<Utc>>,
    /// Where it answers, as the engine reports it beyond its parts' specs: a staging's NodePorts
    /// (`30080/tcp`) and Ingress URLs (`http://shop.example/`).
    pub reach: Vec<String>,
    /// A Pipeline's newest image, which the objects that use its product run.
    pub produced: Option<ProducedImage>,
}

/// The newest image a Pipeline produced: what objects that use its product run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducedImage {
    /// `name:tag`, which a Staging's tag is taken from.
    pub tag: String,
    /// The image's id, which a Challenge on Docker runs (a tag can be built again, an id
    /// cannot).
    pub id: String,
}

impl ProducedImage {
    /// The tag alone (`v2` of `app:v2`), as a Staging's `${tag}` takes it; `None` for a name
    /// with no tag.
    pub fn tag_alone(&self) -> Option<&str> {
        self.tag.rsplit_once(':').map(|(_, tag)| tag)
    }
}

/// The images the Pipelines an object uses produced, by Pipeline: what its `fromPipeline`
/// images become.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Products(BTreeMap<Name, ProducedImage>);

impl Products {
    /// Takes `image` as the product of `pipeline`.
    pub fn insert(&mut self, pipeline: Name, image: ProducedImage) {
        self.0.insert(pipeline, image);
    }

    /// The product of the Pipeline `from` names, if there is one.
    pub fn of(&self, from: &crate::descriptor::model::FromPipeline) -> Option<&ProducedImage> {
        self.0.get(&from.from_pipeline)
    }

    /// Puts in `spec` the images its Pipelines produced, its main container's and its sidecars'
    /// alike, each as `name` names it (by id on Docker, by tag on Kubernetes); the products
    /// taken, by container (`None`: the main one). `None` when one is missing.
    pub fn put_into(
        &self,
        spec: &mut crate::descriptor::ChallengeSpec,
        name: impl Fn(&ProducedImage) -> &str,
    ) -> Option<Vec<(Option<Name>, &ProducedImage)>> {
        use crate::descriptor::model::ImageSource;
        let mut taken = Vec::new();
        let mut take = |image: &mut Option<ImageSource>, container: Option<Name>| {
            if let Some(ImageSource::FromPipeline(from)) = image {
                let product = self.of(from)?;
                *image = Some(ImageSource::Name(name(product).to_string()));
                taken.push((container, product));
            }
            Some(())
        };
        take(&mut spec.image, None)?;
        for sidecar in &mut spec.sidecars {
            take(&mut sidecar.image, Some(sidecar.name.clone()))?;
        }
        Some(taken)
    }
}

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Make what is missing.
    Create,
    /// Replace parts whose template changed.
    Update,
    /// Remove what the repo no longer declares (`--prune`).
    Delete,
    /// Start stopped parts.
    Start,
    /// Stop running parts.
    Stop,
    /// Scale workloads to zero, keeping volumes.
    Archive,
    /// Bring archived workloads back.
    Restore,
    /// Nothing to do.
    Noop,
    /// Owned but no longer declared; kept because prune is off.
    Orphan,
    /// Declared but not applicable here.
    Skip,
    /// Declared, but waits for something not there yet.
    Wait,
    /// Declared, but cannot be made as declared (a chart that does not render, a namespace
    /// someone else made): the apply reports it failed with its reason and leaves what runs
    /// alone.
    Refuse,
}

impl Action {
    /// Whether an apply runs the step: it changes the engine or, refused, fails there with its
    /// reason, so the apply's report and status say so.
    pub fn changes(self) -> bool {
        matches!(
            self,
            Action::Create
                | Action::Update
                | Action::Delete
                | Action::Start
                | Action::Stop
                | Action::Archive
                | Action::Restore
                | Action::Refuse
        )
    }

    /// The action's name, as plans and logs show it: `create`, `update`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Archive => "archive",
            Action::Restore => "restore",
            Action::Noop => "noop",
            Action::Orphan => "orphan",
            Action::Skip => "skip",
            Action::Wait => "wait",
            Action::Refuse => "refuse",
        }
    }
}

/// How an update replaces parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Replacement {
    /// Start the new part, then remove the old one.
    StartFirst,
    /// Stop the old part first (its host ports are needed by the new one); restart it if the new
    /// one cannot start.
    StopFirst,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// The object.
    #[serde(serialize_with = "as_string")]
    pub key: ObjectRef,
    /// What to do.
    pub action: Action,
    /// The engine the step applies to.
    pub engine: Engine,
    /// The engine the object leaves: what runs there is removed once it runs on `engine` (first,
    /// when the object's host ports are needed on `engine`; for a delete, removed there too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<Engine>,
    /// Why.
    pub reasons: Vec<String>,
    /// For updates: how parts are replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replacement: Option<Replacement>,
    /// Objects whose steps must succeed first.
    #[serde(
        serialize_with = "all_as_string",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub dependencies: Vec<ObjectRef>,
    /// Whether the object runs but is not healthy (a `noop` that is not fine).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unhealthy: bool,
}

fn as_string<S: serde::Serializer>(key: &ObjectRef, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(key)
}

fn all_as_string<S: serde::Serializer>(
    keys: &[ObjectRef],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(keys.iter().map(ToString::to_string))
}

/// Steps, sorted by object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// One step per object, desired or observed.
    pub steps: Vec<Step>,
    /// Why the deletes this revision asks for are held, when they are: it would delete every
    /// object the instance owns (see [`Policy::allow_empty`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
}

/// How [`Plan::held`] starts: status keeps it, and an agent that restarts reads it back from
/// there, so a hold outlives the process.
pub const HELD_DELETES: &str = "this revision would delete all";

/// Policy the planner follows.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Delete what berth owns that the repo no longer declares.
    pub prune: bool,
    /// Let a prune delete every object the instance owns. Without it such a revision (one commit
    /// that removed the whole `challenges/` folder) deletes nothing, and the plan says why.
    pub allow_empty: bool,
    /// Deletes already held for the revision being planned, and why: they stay held while it is
    /// the one applied, even once objects it declares exist (the agent remembers it).
    pub held: Option<String>,
    /// The time ttls are measured against; none expire without it.
    pub now: Option<DateTime<Utc>>,
}

/// What a part of an object is, as its id says: a replica of a challenge's main container
/// (`main-1`), one of its sidecars (`sidecar-db`), or a Kubernetes object (`Deployment/web`).
/// Ids are written on the engine (in labels), so they stay strings there; code reads them
/// through this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot<'a> {
    /// A replica of the main container.
    Main,
    /// The sidecar of this name.
    Sidecar(&'a str),
    /// A Kubernetes object, `Kind/name`.
    Object(&'a str),
}

impl<'a> Slot<'a> {
    /// The slot part `id` stands for.
    pub fn of(id: &'a str) -> Slot<'a> {
        match id.strip_prefix("sidecar-") {
            Some(name) => Slot::Sidecar(name),
            None if id.contains('/') => Slot::Object(id),
            None => Slot::Main,
        }
    }

    /// The id of the main container's replica `replica` (from 1).
    pub fn main_id(replica: u32) -> String {
        format!("main-{replica}")
    }

    /// The id of sidecar `name`.
    pub fn sidecar_id(name: &str) -> String {
        format!("sidecar-{name}")
    }
}

/// What a desired part's secret is compared by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretDigest {
    /// The keyed digest of its value, as the engine's labels carry it.
    Of(String),
    /// Its value cannot be read (its file removed, its variable unset): why, naming the file or
    /// variable, never a value. It differs from every digest, so the part is planned as an
    /// update, whose apply fails with the reason before the running container is touched.
    Unreadable(String),
    /// No key to seal it with (the key's volume was removed by hand): it differs from every
    /// digest, so the part is replaced with the current values rather than called unchanged.
    Unsealed,
}

impl SecretDigest {
    /// The digest of secret `name` as `resolve` read it, sealed by `seal`; its reason otherwise.
    pub fn sealed(
        name: &str,
        resolve: Result<String, crate::descriptor::values::SecretError>,
        seal: impl FnOnce(&str) -> String,
    ) -> SecretDigest {
        match resolve {
            Ok(value) => SecretDigest::Of(seal(&value)),
            Err(why) => SecretDigest::Unreadable(format!("secret {name}: {why}")),
        }
    }

    /// Whether it differs from the digest `seen` on the engine (an unreadable one always does).
    fn differs_from(&self, seen: &str) -> bool {
        match self {
            SecretDigest::Of(digest) => digest != seen,
            SecretDigest::Unreadable(_) | SecretDigest::Unsealed => true,
        }
    }
}

/// Observed objects by key. An object seen on two engines (moving between them) is the one on
/// the engine `desired` names for it; an undeclared one, the first seen.
pub fn observed_by_key<'a>(
    desired: &[DesiredObject],
    observed: &'a [ObservedObject],
) -> BTreeMap<&'a ObjectRef, &'a ObservedObject> {
    let engines: BTreeMap<&ObjectRef, Engine> =
        desired.iter().map(|d| (&d.key, d.engine)).collect();
    let mut by_key: BTreeMap<&ObjectRef, &ObservedObject> = BTreeMap::new();
    for object in observed {
        let wanted = engines.get(&object.key) == Some(&object.engine);
        match by_key.get(&object.key) {
            Some(_) if !wanted => {}
            _ => {
                by_key.insert(&object.key, object);
            }
        }
    }
    by_key
}

/// The pure diff of desired and observed state.
///
/// An object declared on one engine and still running on another is *moving*: its step makes it
/// on the new engine and names the old one in [`Step::from`], whose parts are removed only once
/// the new ones run (never while the object is held back).
pub fn diff(desired: &[DesiredObject], observed: &[ObservedObject], policy: Policy) -> Plan {
    let observed_by_key = observed_by_key(desired, observed);
    let mut steps = Vec::new();
    for object in desired {
        let elsewhere = observed
            .iter()
            .find(|o| o.key == object.key && o.engine != object.engine && !o.parts.is_empty())
            .map(|o| o.engine);
        let here = observed_by_key
            .get(&object.key)
            .copied()
            .filter(|o| o.engine == object.engine);
        let (mut action, mut reasons) = match &object.hold {
            Some(Hold::Skip(reason)) => (Action::Skip, vec![reason.clone()]),
            Some(Hold::Wait(reason)) => (Action::Wait, vec![reason.clone()]),
            Some(Hold::Fail(reason)) => (Action::Refuse, vec![reason.clone()]),
            None => compare(object, here, policy.now),
        };
        if matches!(action, Action::Create | Action::Update)
            && let Some(privileged) = privileged_parts(object)
        {
            reasons.push(format!(
                "runs privileged: {privileged} (allowed by the agent's allowPrivileged)"
            ));
        }
        let from = elsewhere.filter(|_| object.hold.is_none());
        if let Some(from) = from {
            let moving = format!("moves from {from} to {}", object.engine);
            match action {
                Action::Noop => {
                    action = Action::Update;
                    reasons = vec![format!(
                        "{moving}: runs on {}; what is left on {from} is removed",
                        object.engine
                    )];
                }
                _ if object.start_first => reasons.insert(
                    0,
                    format!("{moving}: made there first, removed from {from} once it runs"),
                ),
                _ => reasons.insert(
                    0,
                    format!(
                        "{moving}: removed from {from} first (its host ports are needed here), then made here"
                    ),
                ),
            }
        }
        let replaced = action == Action::Update && object.words.replaces && from.is_none();
        let replacement = replaced.then_some(if object.start_first {
            Replacement::StartFirst
        } else {
            Replacement::StopFirst
        });
        let unhealthy =
            action == Action::Noop && !reasons.is_empty() && object.target == TargetState::Running;
        steps.push(Step {
            key: object.key.clone(),
            action,
            engine: object.engine,
            from,
            reasons,
            replacement,
            dependencies: object.dependencies.clone(),
            unhealthy,
        });
    }
    let declared: BTreeSet<&ObjectRef> = desired.iter().map(|d| &d.key).collect();
    let mut undeclared: BTreeMap<&ObjectRef, Vec<Engine>> = BTreeMap::new();
    for object in observed.iter().filter(|o| !declared.contains(&o.key)) {
        undeclared
            .entry(&object.key)
            .or_default()
            .push(object.engine);
    }
    // Deleting everything the instance owns is far more often a mistake (a folder removed, a
    // branch reset) than a wish, so it is held unless asked for.
    let owned: BTreeSet<&ObjectRef> = observed
        .iter()
        .filter(|o| !o.parts.is_empty())
        .map(|o| &o.key)
        .collect();
    let held = (policy.prune
        && !policy.allow_empty
        && !owned.is_empty()
        && owned.iter().all(|key| !declared.contains(key)))
    .then(|| {
        format!(
            "{HELD_DELETES} {} objects the instance owns, so nothing is deleted; set pruneAllowEmpty: true in the agent config (berth apply --allow-empty) if that is meant",
            owned.len()
        )
    })
    .or_else(|| policy.held.clone().filter(|_| policy.prune && !policy.allow_empty));
    for (key, engines) in undeclared {
        let (action, reason) = if let Some(held) = &held {
            (Action::Orphan, format!("removed from repo; kept: {held}"))
        } else if policy.prune {
            (Action::Delete, "removed from repo".to_string())
        } else {
            (
                Action::Orphan,
                "removed from repo; kept (apply with --prune to delete)".to_string(),
            )
        };
        steps.push(Step {
            key: key.clone(),
            action,
            engine: engines[0],
            from: engines.get(1).copied(),
            reasons: vec![reason],
            replacement: None,
            dependencies: Vec::new(),
            unhealthy: false,
        });
    }
    steps.sort_by(|a, b| a.key.cmp(&b.key));
    Plan { steps, held }
}

/// The parts of `object` that ask to run privileged, named, if any: a wall opened on purpose is
/// always shown in the plan.
fn privileged_parts(object: &DesiredObject) -> Option<String> {
    let mut names: Vec<&str> = object
        .parts
        .iter()
        .filter(|part| part.spec.pointer("/security/privileged") == Some(&Value::Bool(true)))
        .map(|part| part.id.as_str())
        .collect();
    names.dedup_by(|a, b| Slot::of(a) == Slot::Main && Slot::of(b) == Slot::Main);
    (!names.is_empty()).then(|| names.join(", "))
}

fn compare(
    desired: &DesiredObject,
    observed: Option<&ObservedObject>,
    now: Option<DateTime<Utc>>,
) -> (Action, Vec<String>) {
    let noun = desired.words.part;
    let Some(observed) = observed.filter(|o| !o.parts.is_empty()) else {
        return (Action::Create, vec![format!("{noun} missing")]);
    };
    if desired.target == TargetState::Archived {
        if let Some(at) = observed.expired {
            return (
                Action::Noop,
                vec![format!(
                    "cleaned up at {} after its ttl; remove it from the repo, or set state: running to make it anew",
                    at.format("%Y-%m-%d %H:%M UTC")
                )],
            );
        }
        if let (Some(ttl), Some(since), Some(now)) = (desired.ttl, observed.archived_at, now)
            && chrono::Duration::from_std(ttl).is_ok_and(|ttl| since + ttl <= now)
        {
            return (
                Action::Delete,
                vec![format!(
                    "archived since {}, longer than its ttl: cleaned up, volumes too",
                    since.format("%Y-%m-%d %H:%M UTC")
                )],
            );
        }
    }
    let mut by_id: BTreeMap<&str, Vec<&ObservedPart>> = BTreeMap::new();
    for part in &observed.parts {
        by_id.entry(part.id.as_str()).or_default().push(part);
    }
    let mut changed = Vec::new();
    let mut missing = Vec::new();
    for part in &desired.parts {
        let present = by_id
            .get(part.id.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let same =
            |seen: &ObservedPart| seen.hash == part.hash && secrets_changed(part, seen).is_empty();
        match present {
            [] => missing.push(part.id.clone()),
            [one] if same(one) => {}
            several if several.iter().any(|seen| same(seen)) => {
                changed.push(format!(
                    "{}: leftover {noun}s from an interrupted apply",
                    part.id
                ));
            }
            [old, ..] => {
                if old.hash != part.hash {
                    changed.extend(explain(&part.id, &old.spec, &part.spec));
                }
                let prefix = part_prefix(&part.id);
                for name in secrets_changed(part, old) {
                    let wanted = part.secrets.as_ref().and_then(|s| s.get(name));
                    match wanted {
                        Some(SecretDigest::Unreadable(why)) => {
                            changed.push(format!("{prefix}{why}"))
                        }
                        _ => changed.push(format!("{prefix}secret {name} changed")),
                    }
                }
            }
        }
    }
    let desired_ids: BTreeSet<&str> = desired.parts.iter().map(|p| p.id.as_str()).collect();
    for id in by_id.keys().filter(|id| !desired_ids.contains(*id)) {
        changed.push(format!("{id} removed"));
    }
    let moved = state_change(desired.target, observed, noun);
    if !changed.is_empty() {
        let mut reasons = Vec::new();
        for reason in changed {
            if !reasons.contains(&reason) {
                reasons.push(reason);
            }
        }
        // A change and a move of state in one revision say both; an archive or a restore stays
        // one, as its phases are an archive's or a restore's.
        let action = match moved {
            Some((action @ (Action::Archive | Action::Restore), reason)) => {
                reasons.push(reason);
                action
            }
            Some((_, reason)) => {
                reasons.push(reason);
                Action::Update
            }
            None => Action::Update,
        };
        return (action, reasons);
    }
    if !missing.is_empty() {
        let shown = match missing.len() {
            n if n > 10 => format!("{} and {} more", missing[..10].join(", "), n - 10),
            _ => missing.join(", "),
        };
        return (Action::Create, vec![format!("{noun} missing: {shown}")]);
    }
    match moved {
        Some((action, reason)) => (action, vec![reason]),
        None => (Action::Noop, unwell(desired.target, observed)),
    }
}

/// The move from the state its parts are in to `target`, and why; `None` when none is needed.
fn state_change(
    target: TargetState,
    observed: &ObservedObject,
    noun: &str,
) -> Option<(Action, String)> {
    let any = |state: PartState| observed.parts.iter().any(|p| p.state == state);
    match target {
        TargetState::Running if any(PartState::Archived) => {
            Some((Action::Restore, "archived; state: running".into()))
        }
        TargetState::Running if any(PartState::Stopped) => {
            Some((Action::Start, format!("{noun} stopped")))
        }
        TargetState::Stopped if any(PartState::Running) || any(PartState::Archived) => {
            Some((Action::Stop, "state: stopped".into()))
        }
        TargetState::Archived if any(PartState::Running) || any(PartState::Stopped) => {
            Some((Action::Archive, "state: archived".into()))
        }
        _ => None,
    }
}

/// Why an object that needs no change is still not fine: each part that is not healthy.
fn unwell(target: TargetState, observed: &ObservedObject) -> Vec<String> {
    if target != TargetState::Running {
        return Vec::new();
    }
    observed
        .parts
        .iter()
        .filter(|p| matches!(p.health, Health::Degraded | Health::Missing))
        .map(ObservedPart::condition)
        .collect()
}

/// Names of the secrets whose values differ, when both sides know them.
fn secrets_changed<'a>(part: &'a Part, seen: &'a ObservedPart) -> Vec<&'a str> {
    let (Some(want), Some(have)) = (&part.secrets, &seen.secrets) else {
        return Vec::new();
    };
    want.iter()
        .filter(|(name, digest)| have.get(*name).is_some_and(|d| digest.differs_from(d)))
        .map(|(name, _)| name.as_str())
        .collect()
}

fn part_prefix(id: &str) -> String {
    match Slot::of(id) {
        Slot::Sidecar(name) => format!("sidecar {name}: "),
        Slot::Object(id) => format!("{id}: "),
        Slot::Main => String::new(),
    }
}

/// Why a part's template changed, field by field: `image changed: a→b`, `ports changed: 10001→10002`.
fn explain(id: &str, old: &Value, new: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let old_fields = old.as_object().unwrap_or(&empty);
    let new_fields = new.as_object().unwrap_or(&empty);
    let keys: BTreeSet<&String> = old_fields.keys().chain(new_fields.keys()).collect();
    let prefix = part_prefix(id);
    let mut reasons = Vec::new();
    for key in keys {
        let (before, after) = (old_fields.get(key), new_fields.get(key));
        if before == after {
            continue;
        }
        let detail = match key.as_str() {
            "image" | "replicas" | "restart" | "walls" => {
                format!(": {}→{}", short(before), short(after))
            }
            "network" => {
                let egress = |v: Option<&Value>| match v.and_then(|v| v.get("egress")) {
                    Some(Value::Bool(false)) => "egress off",
                    _ => "egress on",
                };
                format!(": {}→{}", egress(before), egress(after))
            }
            "ports" => format!(": {}→{}", ports(before), ports(after)),
            // Said once, below, whether or not it changed.
            "recreate" => continue,
            "edited" => {
                reasons.push(format!(
                    "{prefix}edited outside berth ({}); a forced apply takes it back",
                    short(before)
                ));
                continue;
            }
            "env" | "secretEnv" | "data" => {
                let names = changed_keys(before, after);
                if names.is_empty() {
                    String::new()
                } else {
                    format!(": {names}")
                }
            }
            _ => String::new(),
        };
        reasons.push(format!("{prefix}{key} changed{detail}"));
    }
    if reasons.is_empty() {
        reasons.push(format!("{prefix}template changed"));
    }
    if new_fields.get("recreate") == Some(&Value::Bool(true)) {
        reasons.push(format!(
            "{prefix}deleted and made again (berth.io/recreate)"
        ));
    }
    reasons
}

fn short(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "none".into(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

fn ports(value: Option<&Value>) -> String {
    let Some(Value::Array(list)) = value else {
        return "none".into();
    };
    let shown: Vec<String> = list
        .iter()
        .map(|port| {
            let number = port
                .get("host")
                .or_else(|| port.get("container"))
                .map_or_else(String::new, |p| p.to_string());
            match port.get("protocol").and_then(Value::as_str) {
                Some("udp") => format!("{number}/udp"),
                _ => number,
            }
        })
        .collect();
    if shown.is_empty() {
        "none".into()
    } else {
        shown.join(",")
    }
}

fn changed_keys(before: Option<&Value>, after: Option<&Value>) -> String {
    let empty = serde_json::Map::new();
    let before = before.and_then(Value::as_object).unwrap_or(&empty);
    let after = after.and_then(Value::as_object).unwrap_or(&empty);
    let keys: BTreeSet<&String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    keys.into_iter().cloned().collect::<Vec<_>>().join(", ")
}

/// Counts of steps by action, for the summary line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Steps that create.
    pub create: usize,
    /// Steps that update.
    pub update: usize,
    /// Steps that delete.
    pub delete: usize,
    /// Steps that start.
    pub start: usize,
    /// Steps that stop.
    pub stop: usize,
    /// Steps that archive.
    pub archive: usize,
    /// Steps that restore.
    pub restore: usize,
    /// Objects that need nothing and are healthy.
    pub unchanged: usize,
    /// Objects that need no change but are not healthy.
    pub unhealthy: usize,
    /// Objects owned but no longer declared, kept.
    pub orphaned: usize,
    /// Objects that cannot be applied here.
    pub skipped: usize,
    /// Objects waiting for something not there yet.
    pub waiting: usize,
    /// Objects that cannot be made as declared.
    pub refused: usize,
}

impl Plan {
    /// Whether an apply has any step to run (see [`Action::changes`]).
    pub fn has_changes(&self) -> bool {
        self.steps.iter().any(|s| s.action.changes())
    }

    /// Counts of steps by action.
    pub fn summary(&self) -> Summary {
        let mut summary = Summary::default();
        for step in &self.steps {
            let count = match step.action {
                Action::Create => &mut summary.create,
                Action::Update => &mut summary.update,
                Action::Delete => &mut summary.delete,
                Action::Start => &mut summary.start,
                Action::Stop => &mut summary.stop,
                Action::Archive => &mut summary.archive,
                Action::Restore => &mut summary.restore,
                Action::Noop if step.unhealthy => &mut summary.unhealthy,
                Action::Noop => &mut summary.unchanged,
                Action::Orphan => &mut summary.orphaned,
                Action::Skip => &mut summary.skipped,
                Action::Wait => &mut summary.waiting,
                Action::Refuse => &mut summary.refused,
            };
            *count += 1;
        }
        summary
    }

    /// `2 to create, 1 to update, 0 to delete, 5 unchanged`, with the other counts when there are
    /// any.
    pub fn summary_line(&self) -> String {
        let s = self.summary();
        let mut line = format!(
            "{} to create, {} to update, {} to delete",
            s.create, s.update, s.delete
        );
        let optional = |line: &mut String, counts: &[(usize, &str)]| {
            for (count, what) in counts {
                if *count > 0 {
                    write!(line, ", {count} {what}").expect("write to string");
                }
            }
        };
        optional(
            &mut line,
            &[
                (s.start, "to start"),
                (s.stop, "to stop"),
                (s.archive, "to archive"),
                (s.restore, "to restore"),
            ],
        );
        write!(line, ", {} unchanged", s.unchanged).expect("write to string");
        optional(
            &mut line,
            &[
                (s.unhealthy, "unhealthy"),
                (s.orphaned, "orphaned"),
                (s.skipped, "skipped"),
                (s.waiting, "waiting"),
                (s.refused, "refused"),
            ],
        );
        line
    }

    fn describe(step: &Step) -> String {
        let mut reason = step.reasons.join("; ");
        if step.engine != Engine::usual_for(step.key.kind) && step.from.is_none() {
            reason = match reason.is_empty() {
                true => format!("on {}", step.engine),
                false => format!("on {}: {reason}", step.engine),
            };
        }
        if let Some(replacement) = step.replacement {
            let how = match replacement {
                Replacement::StartFirst => "replace, start new first",
                Replacement::StopFirst => "replace, stop old first",
            };
            if reason.is_empty() {
                reason = format!("({how})");
            } else {
                write!(reason, " ({how})").expect("write to string");
            }
        }
        reason
    }

    /// One line per object, then the summary.
    pub fn render_text(&self) -> String {
        let width = self
            .steps
            .iter()
            .map(|s| s.key.to_string().len())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for step in &self.steps {
            let reason = Self::describe(step);
            let reason = crate::printable::field(&reason);
            let line = format!(
                "{:<width$}  {:<7} {reason}",
                step.key.to_string(),
                step.action.as_str()
            );
            writeln!(out, "{}", line.trim_end()).expect("write to string");
        }
        if let Some(held) = &self.held {
            writeln!(out, "deletes held: {held}").expect("write to string");
        }
        writeln!(out, "{}", self.summary_line()).expect("write to string");
        out
    }

    /// A table fit for a pull-request comment. Everything taken from descriptors is escaped, so
    /// a hostile value cannot inject HTML, links or table cells into the comment.
    pub fn render_markdown(&self) -> String {
        let mut out =
            String::from("### berth plan\n\n| Object | Action | Reason |\n|---|---|---|\n");
        for step in &self.steps {
            writeln!(
                out,
                "| {} | {} | {} |",
                markdown_text(&step.key.to_string()),
                step.action.as_str(),
                markdown_text(&Self::describe(step))
            )
            .expect("write to string");
        }
        if let Some(held) = &self.held {
            writeln!(out, "\n**Deletes held:** {}", markdown_text(held)).expect("write to string");
        }
        writeln!(out, "\n**{}**", self.summary_line()).expect("write to string");
        out
    }

    /// The plan and its summary as JSON.
    pub fn render_json(&self) -> String {
        let document = serde_json::json!({ "steps": self.steps, "held": self.held, "summary": self.summary() });
        serde_json::to_string_pretty(&document).expect("plans serialize")
    }
}

/// Text as Markdown shows it literally inside a table cell: HTML and Markdown punctuation become
/// entities or escapes, and line breaks become spaces.
pub fn markdown_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '|' | '\\' | '`' | '*' | '_' | '[' | ']' | '(' | ')' | '!' | '#' | '~' | '{' | '}' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' | '\t' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(name: &str) -> ObjectRef {
        format!("Challenge/{name}").parse().unwrap()
    }

    fn member(id: &str, hash: &str, spec: Value) -> Part {
        Part {
            id: id.into(),
            hash: hash.into(),
            spec: spec.into(),
            secrets: None,
            one_shot: false,
        }
    }

    fn desired(name: &str, run: bool, parts: Vec<Part>) -> DesiredObject {
        let target = if run {
            TargetState::Running
        } else {
            TargetState::Stopped
        };
        targeted(name, target, parts)
    }

    fn targeted(name: &str, target: TargetState, parts: Vec<Part>) -> DesiredObject {
        DesiredObject {
            key: key(name),
            engine: Engine::Docker,
            target,
            parts,
            dependencies: vec![],
            start_first: true,
            hold: None,
            words: Vocabulary::CONTAINER,
            ttl: None,
            ready_timeout: None,
        }
    }

    fn seen(id: &str, hash: &str, spec: Value, running: bool) -> ObservedPart {
        let state = if running {
            PartState::Running
        } else {
            PartState::Stopped
        };
        in_state(id, hash, spec, state, Health::Healthy)
    }

    fn in_state(
        id: &str,
        hash: &str,
        spec: Value,
        state: PartState,
        health: Health,
    ) -> ObservedPart {
        ObservedPart {
            name: format!("c-{id}-{hash}"),
            id: id.into(),
            hash: hash.into(),
            spec,
            secrets: None,
            state,
            health,
            detail: None,
        }
    }

    fn observed(name: &str, parts: Vec<ObservedPart>) -> ObservedObject {
        ObservedObject {
            key: key(name),
            engine: Engine::Docker,
            parts,
            archived_at: None,
            expired: None,
            reach: Vec::new(),
            produced: None,
        }
    }

    fn only_step(
        desired: Vec<DesiredObject>,
        observed: Vec<ObservedObject>,
        prune: bool,
    ) -> (Action, Vec<String>) {
        let plan = diff(
            &desired,
            &observed,
            Policy {
                prune,
                // Single objects: the guard against deleting everything has its own test.
                allow_empty: true,
                held: None,
                now: None,
            },
        );
        assert_eq!(plan.steps.len(), 1, "{plan:?}");
        (plan.steps[0].action, plan.steps[0].reasons.clone())
    }

    fn on(engine: Engine, mut object: ObservedObject) -> ObservedObject {
        object.engine = engine;
        object
    }

    #[test]
    fn a_challenge_moving_to_kubernetes_is_made_there_and_then_removed_from_docker() {
        let mut wanted = desired("web", true, vec![member("Deployment/web", "k1", json!({}))]);
        wanted.engine = Engine::Kubernetes;
        let on_docker = observed("web", vec![seen("main-1", "d1", json!({}), true)]);
        // Not yet on the cluster: one step makes it there and names where it comes from.
        let plan = diff(
            std::slice::from_ref(&wanted),
            std::slice::from_ref(&on_docker),
            Policy::default(),
        );
        assert_eq!(plan.steps.len(), 1, "{plan:?}");
        let step = &plan.steps[0];
        assert_eq!(
            (step.action, step.engine, step.from),
            (Action::Create, Engine::Kubernetes, Some(Engine::Docker))
        );
        assert!(
            step.reasons[0].starts_with("moves from docker to kubernetes"),
            "{step:?}"
        );
        assert!(
            plan.render_text()
                .contains("moves from docker to kubernetes")
        );
        // Made on the cluster, but a crash left the containers: the move finishes.
        let on_cluster = on(
            Engine::Kubernetes,
            observed("web", vec![seen("Deployment/web", "k1", json!({}), true)]),
        );
        let plan = diff(
            std::slice::from_ref(&wanted),
            &[on_docker.clone(), on_cluster.clone()],
            Policy::default(),
        );
        assert_eq!(
            (plan.steps[0].action, plan.steps[0].from),
            (Action::Update, Some(Engine::Docker))
        );
        assert_eq!(plan.steps[0].replacement, None);
        // Only on the cluster: nothing to do, and the plan says where it runs.
        let plan = diff(
            std::slice::from_ref(&wanted),
            std::slice::from_ref(&on_cluster),
            Policy::default(),
        );
        assert_eq!(
            (plan.steps[0].action, plan.steps[0].from),
            (Action::Noop, None)
        );
        assert!(
            plan.render_text().contains("on kubernetes"),
            "{}",
            plan.render_text()
        );
        // Held back (its image not produced yet): what runs on Docker is left alone.
        wanted.hold = Some(Hold::Wait("waits for Pipeline/app".into()));
        let plan = diff(&[wanted], &[on_docker], Policy::default());
        assert_eq!(
            (plan.steps[0].action, plan.steps[0].from),
            (Action::Wait, None)
        );
    }

    #[test]
    fn an_undeclared_object_on_two_engines_is_one_delete_of_both() {
        let on_docker = observed("web", vec![seen("main-1", "d1", json!({}), true)]);
        let on_cluster = on(
            Engine::Kubernetes,
            observed("web", vec![seen("Deployment/web", "k1", json!({}), true)]),
        );
        let plan = diff(
            &[],
            &[on_docker, on_cluster],
            Policy {
                prune: true,
                allow_empty: true,
                held: None,
                now: None,
            },
        );
        assert_eq!(plan.steps.len(), 1, "{plan:?}");
        assert_eq!(
            (
                plan.steps[0].action,
                plan.steps[0].engine,
                plan.steps[0].from
            ),
            (Action::Delete, Engine::Docker, Some(Engine::Kubernetes))
        );
    }

    #[test]
    fn a_prune_that_would_delete_everything_owned_is_held_unless_allowed() {
        let owned = || {
            vec![
                observed("web", vec![seen("main-1", "d1", json!({}), true)]),
                observed("pwn", vec![seen("main-1", "d2", json!({}), true)]),
            ]
        };
        let prune = Policy {
            prune: true,
            ..Policy::default()
        };
        // One commit removed every descriptor: nothing is deleted, and the plan says why.
        let plan = diff(&[], &owned(), prune.clone());
        assert!(plan.steps.iter().all(|s| s.action == Action::Orphan));
        assert!(!plan.has_changes());
        let held = plan.held.clone().expect("held");
        assert!(held.contains("all 2 objects") && held.contains("pruneAllowEmpty"));
        assert!(
            plan.render_text().contains("deletes held: "),
            "{}",
            plan.render_text()
        );
        assert!(plan.steps[0].reasons[0].contains("kept"));
        // Asked for: they go.
        let allowed = Policy {
            allow_empty: true,
            ..prune.clone()
        };
        let plan = diff(&[], &owned(), allowed);
        assert!(plan.steps.iter().all(|s| s.action == Action::Delete));
        assert_eq!(plan.held, None);
        // Something still declared: an ordinary prune of the rest.
        let web = desired("web", true, vec![member("main-1", "d1", json!({}))]);
        let plan = diff(&[web], &owned(), prune.clone());
        assert_eq!(plan.held, None);
        assert_eq!(plan.summary().delete, 1);
        // Without prune nothing would be deleted anyway: no note.
        let plan = diff(&[], &owned(), Policy::default());
        assert_eq!(plan.held, None);
        // Held for this revision before (its new object made since): still held.
        let new = desired("new", true, vec![member("main-1", "n1", json!({}))]);
        let mut with_new = owned();
        with_new.push(observed("new", vec![seen("main-1", "n1", json!({}), true)]));
        let remembered = Policy {
            held: Some("held before".into()),
            ..prune
        };
        let plan = diff(std::slice::from_ref(&new), &with_new, remembered);
        assert_eq!(plan.summary().delete, 0, "{plan:?}");
        assert_eq!(plan.held.as_deref(), Some("held before"));
    }

    #[test]
    fn table_of_single_object_cases() {
        let spec = json!({"image": "busybox:1", "ports": [{"container": 80, "host": 10001}], "env": {"A": "1"}});
        let spec_v2 = json!({"image": "busybox:2", "ports": [{"container": 80, "host": 10002}], "env": {"A": "2", "B": "x"}});
        let main = |hash: &str, spec: &Value| member("main-1", hash, spec.clone());
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            &str,
            Vec<DesiredObject>,
            Vec<ObservedObject>,
            bool,
            Action,
            Vec<&str>,
        )> = vec![
            (
                "new object",
                vec![desired("a", true, vec![main("h1", &spec)])],
                vec![],
                false,
                Action::Create,
                vec!["container missing"],
            ),
            (
                "unchanged",
                vec![desired("a", true, vec![main("h1", &spec)])],
                vec![observed(
                    "a",
                    vec![seen("main-1", "h1", spec.clone(), true)],
                )],
                false,
                Action::Noop,
                vec![],
            ),
            (
                "template changed",
                vec![desired("a", true, vec![main("h2", &spec_v2)])],
                vec![observed(
                    "a",
                    vec![seen("main-1", "h1", spec.clone(), true)],
                )],
                false,
                Action::Update,
                vec![
                    "env changed: A, B",
                    "image changed: busybox:1→busybox:2",
                    "ports changed: 10001→10002",
                ],
            ),
            (
                "container removed by hand",
                vec![desired(
                    "a",
                    true,
                    vec![main("h1", &spec), member("main-2", "h1", spec.clone())],
                )],
                vec![observed(
                    "a",
                    vec![seen("main-1", "h1", spec.clone(), true)],
                )],
                false,
                Action::Create,
                vec!["container missing: main-2"],
            ),
            (
                "stopped by hand",
                vec![desired("a", true, vec![main("h1", &spec)])],
                vec![observed(
                    "a",
                    vec![seen("main-1", "h1", spec.clone(), false)],
                )],
                false,
                Action::Start,
                vec!["container stopped"],
            ),
            (
                "state stopped",
                vec![desired("a", false, vec![main("h1", &spec)])],
                vec![observed(
                    "a",
                    vec![seen("main-1", "h1", spec.clone(), true)],
                )],
                false,
                Action::Stop,
                vec!["state: stopped"],
            ),
            (
                "already stopped",
                vec![desired("a", false, vec![main("h1", &spec)])],
                vec![observed(
                    "a",
                    vec![seen("main-1", "h1", spec.clone(), false)],
                )],
                false,
                Action::Noop,
                vec![],
            ),
            (
                "replica removed",
                vec![desired("a", true, vec![main("h1", &spec)])],
                vec![observed(
                    "a",
                    vec![
                        seen("main-1", "h1", spec.clone(), true),
                        seen("main-2", "h1", spec.clone(), true),
                    ],
                )],
                false,
                Action::Update,
                vec!["main-2 removed"],
            ),
            (
                "leftover after a crash",
                vec![desired("a", true, vec![main("h2", &spec_v2)])],
                vec![observed(
                    "a",
                    vec![
                        seen("main-1", "h1", spec.clone(), true),
                        seen("main-1", "h2", spec_v2.clone(), true),
                    ],
                )],
                false,
                Action::Update,
                vec!["main-1: leftover containers from an interrupted apply"],
            ),
            (
                "removed from repo, no prune",
                vec![],
                vec![observed(
                    "a",
                    vec![seen("main-1", "h1", spec.clone(), true)],
                )],
                false,
                Action::Orphan,
                vec!["removed from repo; kept (apply with --prune to delete)"],
            ),
            (
                "removed from repo, prune",
                vec![],
                vec![observed(
                    "a",
                    vec![seen("main-1", "h1", spec.clone(), true)],
                )],
                true,
                Action::Delete,
                vec!["removed from repo"],
            ),
            (
                "sidecar changed",
                vec![desired(
                    "a",
                    true,
                    vec![
                        main("h1", &spec),
                        member("sidecar-db", "s2", json!({"image": "db:2"})),
                    ],
                )],
                vec![observed(
                    "a",
                    vec![
                        seen("main-1", "h1", spec.clone(), true),
                        seen("sidecar-db", "s1", json!({"image": "db:1"}), true),
                    ],
                )],
                false,
                Action::Update,
                vec!["sidecar db: image changed: db:1→db:2"],
            ),
        ];
        for (name, desired, observed, prune, action, reasons) in cases {
            let (got_action, got_reasons) = only_step(desired, observed, prune);
            assert_eq!(
                (got_action, got_reasons),
                (
                    action,
                    reasons.into_iter().map(String::from).collect::<Vec<_>>()
                ),
                "case: {name}"
            );
        }
    }

    #[test]
    fn table_of_target_states_and_health() {
        let spec = json!({"image": "busybox:1"});
        let part = || member("main-1", "h1", spec.clone());
        let at = |state, health| {
            vec![observed(
                "a",
                vec![in_state("main-1", "h1", spec.clone(), state, health)],
            )]
        };
        let one_shot = || Part {
            one_shot: true,
            ..part()
        };
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, DesiredObject, Vec<ObservedObject>, Action, Vec<&str>)> = vec![
            (
                "archive a running object",
                targeted("a", TargetState::Archived, vec![part()]),
                at(PartState::Running, Health::Healthy),
                Action::Archive,
                vec!["state: archived"],
            ),
            (
                "already archived",
                targeted("a", TargetState::Archived, vec![part()]),
                at(PartState::Archived, Health::Healthy),
                Action::Noop,
                vec![],
            ),
            (
                "an archive and a change in one revision say both",
                targeted(
                    "a",
                    TargetState::Archived,
                    vec![member("main-1", "h2", json!({"image": "busybox:2"}))],
                ),
                at(PartState::Running, Health::Healthy),
                Action::Archive,
                vec!["image changed: busybox:1→busybox:2", "state: archived"],
            ),
            (
                "a restore and a change in one revision say both",
                targeted(
                    "a",
                    TargetState::Running,
                    vec![member("main-1", "h2", json!({"image": "busybox:2"}))],
                ),
                at(PartState::Archived, Health::Healthy),
                Action::Restore,
                vec![
                    "image changed: busybox:1→busybox:2",
                    "archived; state: running",
                ],
            ),
            (
                "a stop and a change are an update that says both",
                targeted(
                    "a",
                    TargetState::Stopped,
                    vec![member("main-1", "h2", json!({"image": "busybox:2"}))],
                ),
                at(PartState::Running, Health::Healthy),
                Action::Update,
                vec!["image changed: busybox:1→busybox:2", "state: stopped"],
            ),
            (
                "stop an archived staging: it rests with no ttl",
                targeted("a", TargetState::Stopped, vec![part()]),
                at(PartState::Archived, Health::Healthy),
                Action::Stop,
                vec!["state: stopped"],
            ),
            (
                "archive a stopped staging",
                targeted("a", TargetState::Archived, vec![part()]),
                at(PartState::Stopped, Health::Healthy),
                Action::Archive,
                vec!["state: archived"],
            ),
            (
                "restore an archived object",
                targeted("a", TargetState::Running, vec![part()]),
                at(PartState::Archived, Health::Healthy),
                Action::Restore,
                vec!["archived; state: running"],
            ),
            (
                "a one-shot that completed is done, not stopped",
                targeted("a", TargetState::Running, vec![one_shot()]),
                at(PartState::Completed, Health::Healthy),
                Action::Noop,
                vec![],
            ),
            (
                "a one-shot that failed is not restarted, and says so",
                targeted("a", TargetState::Running, vec![one_shot()]),
                vec![observed(
                    "a",
                    vec![ObservedPart {
                        detail: Some("exited with code 3".into()),
                        ..in_state(
                            "main-1",
                            "h1",
                            spec.clone(),
                            PartState::Completed,
                            Health::Degraded,
                        )
                    }],
                )],
                Action::Noop,
                vec!["main-1 is Degraded: exited with code 3"],
            ),
            (
                "running but unhealthy is not unchanged",
                targeted("a", TargetState::Running, vec![part()]),
                at(PartState::Running, Health::Degraded),
                Action::Noop,
                vec!["main-1 is Degraded"],
            ),
            (
                "progressing is not yet unhealthy",
                targeted("a", TargetState::Running, vec![part()]),
                at(PartState::Running, Health::Progressing),
                Action::Noop,
                vec![],
            ),
        ];
        for (name, desired, observed, action, reasons) in cases {
            let (got_action, got_reasons) = only_step(vec![desired], observed, false);
            assert_eq!(
                (got_action, got_reasons),
                (
                    action,
                    reasons.into_iter().map(String::from).collect::<Vec<_>>()
                ),
                "case: {name}"
            );
        }
    }

    #[test]
    fn unhealthy_objects_are_counted_apart_from_unchanged_ones() {
        let spec = json!({});
        let plan = diff(
            &[desired(
                "a",
                true,
                vec![member("main-1", "h", spec.clone())],
            )],
            &[observed(
                "a",
                vec![in_state(
                    "main-1",
                    "h",
                    spec,
                    PartState::Running,
                    Health::Degraded,
                )],
            )],
            Policy::default(),
        );
        assert!(plan.steps[0].unhealthy);
        assert_eq!(
            plan.summary_line(),
            "0 to create, 0 to update, 0 to delete, 0 unchanged, 1 unhealthy"
        );
    }

    #[test]
    fn a_rotated_secret_replaces_the_part_and_names_only_the_secret() {
        let spec = json!({"secretEnv": {"FLAG": {"file": "/run/flag"}}});
        let sealed = |digest: SecretDigest| Part {
            secrets: Some(BTreeMap::from([("FLAG".to_string(), digest)])),
            ..member("main-1", "h1", spec.clone())
        };
        let with = |digest: &str| sealed(SecretDigest::Of(digest.to_string()));
        let running = |digest: &str| {
            vec![observed(
                "a",
                vec![ObservedPart {
                    secrets: Some(BTreeMap::from([("FLAG".to_string(), digest.to_string())])),
                    ..seen("main-1", "h1", spec.clone(), true)
                }],
            )]
        };
        let (action, reasons) = only_step(
            vec![desired("a", true, vec![with("new")])],
            running("old"),
            false,
        );
        assert_eq!(action, Action::Update);
        assert_eq!(reasons, vec!["secret FLAG changed"]);
        let (action, _) = only_step(
            vec![desired("a", true, vec![with("same")])],
            running("same"),
            false,
        );
        assert_eq!(action, Action::Noop);
        // A secret that cannot be read is a change whose reason says why, never "unchanged".
        let why = SecretDigest::Unreadable("secret FLAG: /run/flag: not found".into());
        let (action, reasons) = only_step(
            vec![desired("a", true, vec![sealed(why)])],
            running("same"),
            false,
        );
        assert_eq!(action, Action::Update);
        assert_eq!(reasons, vec!["secret FLAG: /run/flag: not found"]);
        let (action, _) = only_step(
            vec![desired("a", true, vec![sealed(SecretDigest::Unsealed)])],
            running("same"),
            false,
        );
        assert_eq!(action, Action::Update);
        // A plan with no access to the secrets (against committed status) cannot tell.
        let (action, _) = only_step(
            vec![desired(
                "a",
                true,
                vec![member("main-1", "h1", spec.clone())],
            )],
            running("old"),
            false,
        );
        assert_eq!(action, Action::Noop);
    }

    #[test]
    fn waiting_objects_say_why_and_change_nothing() {
        let mut object = desired("a", true, vec![]);
        object.hold = Some(Hold::Wait(
            "waits for Pipeline/img to produce an image".into(),
        ));
        let plan = diff(&[object], &[], Policy::default());
        assert_eq!(plan.steps[0].action, Action::Wait);
        assert!(!plan.has_changes());
        assert_eq!(
            plan.summary_line(),
            "0 to create, 0 to update, 0 to delete, 0 unchanged, 1 waiting"
        );
    }

    #[test]
    fn an_object_that_cannot_be_made_is_planned_refused_never_to_create_or_update() {
        let why = "cannot render chart shop: helm template exited with 1: needs Kubernetes 1.21";
        let refused = |name: &str| {
            let mut object = desired(name, true, vec![]);
            object.hold = Some(Hold::Fail(why.into()));
            object
        };
        // One new, one already running (its old version stays, and is not "updated").
        let plan = diff(
            &[refused("new"), refused("old")],
            &[observed("old", vec![seen("main", "h1", json!({}), true)])],
            Policy::default(),
        );
        assert!(
            plan.steps
                .iter()
                .all(|s| s.action == Action::Refuse && s.reasons == [why]),
            "{plan:?}"
        );
        // The apply runs the steps, so their failure is reported and recorded.
        assert!(plan.has_changes());
        assert_eq!(
            plan.summary_line(),
            "0 to create, 0 to update, 0 to delete, 0 unchanged, 2 refused"
        );
        assert!(
            plan.render_text()
                .contains("refuse  cannot render chart shop")
        );
    }

    #[test]
    fn markdown_escapes_everything_taken_from_descriptors() {
        let hostile = "<img src=x onerror=alert(1)> | [click](http://evil) `code` **bold**\nnext";
        let mut object = desired("a", true, vec![]);
        object.hold = Some(Hold::Skip(hostile.into()));
        let markdown = diff(&[object], &[], Policy::default()).render_markdown();
        assert!(!markdown.contains("<img"), "{markdown}");
        assert!(!markdown.contains("](http"), "{markdown}");
        assert!(
            markdown.contains("&lt;img src=x onerror=alert\\(1\\)&gt;"),
            "{markdown}"
        );
        let row = markdown.lines().find(|l| l.contains("Challenge")).unwrap();
        assert_eq!(
            row.matches(" | ").count(),
            2,
            "one row of three cells: {row}"
        );
        assert_eq!(markdown.lines().filter(|l| l.starts_with('|')).count(), 3);
    }

    #[test]
    fn skipped_objects_say_why_and_change_nothing() {
        let mut object = desired("a", true, vec![]);
        object.hold = Some(Hold::Skip("skipped (no backend yet)".into()));
        let plan = diff(&[object], &[], Policy::default());
        assert_eq!(plan.steps[0].action, Action::Skip);
        assert!(!plan.has_changes());
        assert_eq!(
            plan.summary_line(),
            "0 to create, 0 to update, 0 to delete, 0 unchanged, 1 skipped"
        );
    }

    #[test]
    fn updates_say_how_they_replace() {
        let mut object = desired("a", true, vec![member("main-1", "h2", json!({}))]);
        object.start_first = false;
        let plan = diff(
            &[object],
            &[observed("a", vec![seen("main-1", "h1", json!({}), true)])],
            Policy::default(),
        );
        assert_eq!(plan.steps[0].replacement, Some(Replacement::StopFirst));
        assert!(
            plan.render_text()
                .contains("update  template changed (replace, stop old first)"),
            "{}",
            plan.render_text()
        );
    }

    #[test]
    fn renderings_agree_on_the_summary() {
        let plan = diff(
            &[
                desired("new", true, vec![member("main-1", "h", json!({}))]),
                desired("same", true, vec![member("main-1", "h", json!({}))]),
            ],
            &[observed("same", vec![seen("main-1", "h", json!({}), true)])],
            Policy::default(),
        );
        assert_eq!(
            plan.summary_line(),
            "1 to create, 0 to update, 0 to delete, 1 unchanged"
        );
        assert!(
            plan.render_text()
                .ends_with("1 to create, 0 to update, 0 to delete, 1 unchanged\n")
        );
        assert!(
            plan.render_markdown()
                .contains("| Challenge/new | create | container missing |")
        );
        let json: Value = serde_json::from_str(&plan.render_json()).unwrap();
        assert_eq!(json["summary"]["create"], 1);
        assert_eq!(json["steps"][0]["key"], "Challenge/new");
        assert!(plan.has_changes());
    }

    /// Every field that changed is a reason, not only the first; values of env never shown.
    #[test]
    fn every_changed_field_is_a_reason() {
        let old =
            json!({"replicas": 1, "env": {"LEVEL": "info", "PORT": "80"}, "data": {"a": "1"}});
        let new =
            json!({"replicas": 3, "env": {"LEVEL": "debug", "PORT": "80"}, "data": {"a": "2"}});
        assert_eq!(
            explain("Deployment/web", &old, &new),
            vec![
                "Deployment/web: data changed: a",
                "Deployment/web: env changed: LEVEL",
                "Deployment/web: replicas changed: 1→3",
            ]
        );
    }
}
