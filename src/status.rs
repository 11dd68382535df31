//! Status: what berth last saw and did, per object and per pass, and the files that carry it in
//! the config repo (`status/agent.yaml` and `status/<kind>/<name>.yaml`).
//!
//! Everything here is pure. [`after_pass`] computes the next status from the previous one and what
//! a pass planned, did and observed; [`StatusSet::files`] renders it; [`StatusSet::parse`] reads
//! it back (for `berth status`, `berth plan --against-status` and an agent's restart). Each object
//! moves through the [`Phase`] state machine, whose legal moves are [`Phase::may_follow`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::apply::{Outcome, StepReport};
use crate::descriptor::{Kind, ObjectRef, Problem, yaml};
use crate::plan::{
    Action, DesiredObject, Engine, Health, ObservedObject, ObservedPart, Part, PartState, Plan,
    ProducedImage, TargetState,
};

/// Where an object is in its life, after DM/octopod: pending phases while a step runs, settled
/// phases between passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Being created.
    CreatePending,
    /// Being updated, started or stopped.
    UpdatePending,
    /// Being deleted.
    DeletePending,
    /// Being archived (Stagings).
    ArchivePending,
    /// Applied and meant to run.
    Running,
    /// Applied and meant to be stopped (`state: stopped`).
    Stopped,
    /// Archived: scaled to zero, volumes kept (Stagings).
    Archived,
    /// The last step for it failed; see the message.
    Failure,
    /// Deleting it failed; some of it may remain.
    CleanupFailed,
}

impl Phase {
    /// Every phase, in the order summaries list them.
    pub const ALL: [Phase; 9] = [
        Phase::CreatePending,
        Phase::UpdatePending,
        Phase::DeletePending,
        Phase::ArchivePending,
        Phase::Running,
        Phase::Stopped,
        Phase::Archived,
        Phase::Failure,
        Phase::CleanupFailed,
    ];

    /// The phase's name, as status files write it: `Running`, `CreatePending`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::CreatePending => "CreatePending",
            Phase::UpdatePending => "UpdatePending",
            Phase::DeletePending => "DeletePending",
            Phase::ArchivePending => "ArchivePending",
            Phase::Running => "Running",
            Phase::Stopped => "Stopped",
            Phase::Archived => "Archived",
            Phase::Failure => "Failure",
            Phase::CleanupFailed => "CleanupFailed",
        }
    }

    /// Whether the phase lasts between passes (as opposed to while a step runs).
    pub fn is_settled(self) -> bool {
        !matches!(
            self,
            Phase::CreatePending
                | Phase::UpdatePending
                | Phase::DeletePending
                | Phase::ArchivePending
        )
    }

    /// Whether an object may move from `from` (`None`: not known before) to `to`. Staying put is
    /// always legal; every other move goes through a pending phase or settles one.
    pub fn may_follow(from: Option<Phase>, to: Phase) -> bool {
        use Phase::*;
        if from == Some(to) {
            return true;
        }
        match from {
            // First sight (no status recorded yet): anything but a failed cleanup, which needs a
            // delete first.
            None => to != CleanupFailed,
            Some(CreatePending) => matches!(to, Running | Stopped | Archived | Failure),
            // An archived staging whose objects changed is updated and stays archived.
            Some(UpdatePending) => matches!(to, Running | Stopped | Archived | Failure),
            Some(ArchivePending) => matches!(to, Archived | Failure),
            Some(DeletePending) => matches!(to, CleanupFailed),
            // Running turns into a Failure without a step when it stays Progressing past its
            // readyTimeout.
            Some(Running) => matches!(
                to,
                CreatePending | UpdatePending | DeletePending | ArchivePending | Failure
            ),
            Some(Stopped | Failure) => {
                matches!(
                    to,
                    CreatePending | UpdatePending | DeletePending | ArchivePending
                )
            }
            Some(Archived) => matches!(to, CreatePending | UpdatePending | DeletePending),
            // Declared again after its cleanup failed, it takes whatever step its remains need.
            Some(CleanupFailed) => !to.is_settled(),
        }
    }

    /// The pending phase a step passes through. A restore is a create of the workloads again
    /// (after DM/octopod: Archived → CreatePending).
    pub fn pending_for(action: Action) -> Option<Phase> {
        match action {
            Action::Create | Action::Restore => Some(Phase::CreatePending),
            Action::Update | Action::Start | Action::Stop => Some(Phase::UpdatePending),
            Action::Archive => Some(Phase::ArchivePending),
            Action::Delete => Some(Phase::DeletePending),
            Action::Noop | Action::Orphan | Action::Skip | Action::Wait | Action::Refuse => None,
        }
    }

    /// The phase an object settles in when its steps succeed.
    pub fn settled_for(target: TargetState) -> Phase {
        match target {
            TargetState::Running => Phase::Running,
            TargetState::Stopped => Phase::Stopped,
            TargetState::Archived => Phase::Archived,
        }
    }
}

/// One part (a container slot) as last observed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PartStatus {
    /// Which part: `main-1`, `sidecar-db`.
    pub id: String,
    /// Hash of the template it was made from.
    pub hash: String,
    /// What it is doing.
    pub state: PartState,
    /// Its health.
    pub health: Health,
    /// The template it was made from (secrets only as references); shared with the desired part
    /// of the same hash, so a thousand objects do not hold their templates twice.
    pub spec: Arc<Value>,
}

/// What berth knows of one object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectStatus {
    /// The kind.
    pub kind: Kind,
    /// The name.
    pub name: String,
    /// Its phase; absent when no backend here applies the kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Its health, from the engine.
    pub health: Health,
    /// The revision whose spec is live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The descriptor's spec hash at that revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,
    /// Where it can be reached: published host ports (`10101/tcp`), a staging's NodePorts and
    /// Ingress URLs (`http://shop.example/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// The last thing berth did or found, or why it could not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the phase last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<String>,
    /// The engine it runs on, when it is not its kind's usual one (a Challenge on Kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<Engine>,
    /// Its parts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<PartStatus>,
    /// A Pipeline's newest runs, newest first (their logs stay with the agent, never in git).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<crate::run::Run>,
    /// An instanced Challenge's per-team instances, counted (never named by team).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<InstanceCounts>,
}

/// How many instances an instanced Challenge has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceCounts {
    /// Teams' instances.
    pub live: usize,
    /// Started and ready for the next teams.
    pub pooled: usize,
    /// Of those, the ones whose last solver run failed (`healthcheck.solve`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub degraded: usize,
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

/// How a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PassResult {
    /// The revision was applied; every step succeeded.
    Applied,
    /// The revision was applied, but some steps failed (see the objects).
    Failed,
    /// The revision is invalid; nothing was applied (see `problems`).
    Rejected,
    /// The engine or git server could not be used; the pass will be retried.
    Transient,
    /// The agent's own checkout could not be read (disk, a corrupt clone): not retried on its
    /// own, since retrying cannot fix it; see the message for what to do.
    Broken,
}

impl PassResult {
    /// The result as status files write it: `applied`, `failed`, `rejected`, `transient`,
    /// `broken`.
    pub fn as_str(self) -> &'static str {
        match self {
            PassResult::Applied => "applied",
            PassResult::Failed => "failed",
            PassResult::Rejected => "rejected",
            PassResult::Transient => "transient",
            PassResult::Broken => "broken",
        }
    }
}

/// The agent's own status: the pass as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentStatus {
    /// The berth instance.
    pub instance: String,
    /// The revision the last pass looked at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempted_revision: Option<String>,
    /// The last revision that was valid and applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_revision: Option<String>,
    /// How the last pass ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<PassResult>,
    /// Why, when it was not applied.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When this status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<String>,
    /// The problems that rejected `lastAttemptedRevision`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<ProblemStatus>,
    /// Objects by phase.
    #[serde(default)]
    pub phases: BTreeMap<Phase, usize>,
}

/// A problem as status records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProblemStatus {
    /// The file, relative to the repo's root.
    pub file: String,
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
    /// What is wrong and what to do, as `berth validate` says it.
    pub message: String,
}

impl From<&Problem> for ProblemStatus {
    fn from(problem: &Problem) -> Self {
        let mut message = problem.to_string();
        let place = format!("{}:{}:{}: ", problem.file, problem.line, problem.column);
        if let Some(rest) = message.strip_prefix(&place) {
            message = rest.to_string();
        }
        ProblemStatus {
            file: problem.file.clone(),
            line: problem.line,
            column: problem.column,
            message,
        }
    }
}

/// The whole status: the agent's and every object's.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusSet {
    /// The pass as a whole.
    pub agent: AgentStatus,
    /// Each object, by `Kind/name`.
    pub objects: BTreeMap<ObjectRef, ObjectStatus>,
}

/// Why status files could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct StatusError {
    /// The file.
    pub file: String,
    /// What is wrong.
    pub message: String,
}

/// The folder, inside a status tree, that holds the files.
pub const STATUS_FOLDER: &str = "status";

/// A Pipeline's newest image as its status records it (the `image` and `id` of its one part),
/// so a plan made from status alone resolves what uses it.
fn recorded_product(key: &ObjectRef, status: &ObjectStatus) -> Option<ProducedImage> {
    if key.kind != Kind::Pipeline {
        return None;
    }
    let spec = &status.parts.first()?.spec;
    let tag = spec.get("image")?.as_str()?;
    let id = spec.get("id").and_then(|id| id.as_str()).unwrap_or(tag);
    Some(ProducedImage {
        tag: tag.to_string(),
        id: id.to_string(),
    })
}

impl StatusSet {
    /// An empty status for `instance`.
    pub fn new(instance: &str) -> StatusSet {
        StatusSet {
            agent: AgentStatus {
                instance: instance.to_string(),
                last_attempted_revision: None,
                last_applied_revision: None,
                result: None,
                message: String::new(),
                updated: None,
                problems: Vec::new(),
                phases: BTreeMap::new(),
            },
            objects: BTreeMap::new(),
        }
    }

    /// The files, as paths relative to the status tree's root (`status/agent.yaml`, …) and YAML.
    pub fn files(&self) -> BTreeMap<String, String> {
        let mut files = BTreeMap::new();
        files.insert(format!("{STATUS_FOLDER}/agent.yaml"), to_yaml(&self.agent));
        for status in self.objects.values() {
            files.insert(object_path(status.kind, &status.name), to_yaml(status));
        }
        files
    }

    /// Reads status back from its files (paths relative to the status tree's root). Files outside
    /// `status/` are ignored: people may keep a README beside it.
    pub fn parse<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<StatusSet, StatusError> {
        let mut agent = None;
        let mut objects = BTreeMap::new();
        for (path, text) in files {
            let Some(relative) = path
                .strip_prefix(STATUS_FOLDER)
                .and_then(|p| p.strip_prefix('/'))
            else {
                continue;
            };
            if relative == "agent.yaml" {
                agent = Some(from_yaml::<AgentStatus>(path, text)?);
            } else if relative.ends_with(".yaml") {
                let status = from_yaml::<ObjectStatus>(path, text).map_err(|mut error| {
                    if error.message.contains("`members`") {
                        error.message = "written by an older berth (container members, not parts); the agent rewrites it on its next pass".into();
                    }
                    error
                })?;
                let name = status.name.parse().map_err(|message| StatusError {
                    file: path.to_string(),
                    message,
                })?;
                let key = ObjectRef {
                    kind: status.kind,
                    name,
                };
                objects.insert(key, status);
            }
        }
        let agent = agent.ok_or_else(|| StatusError {
            file: format!("{STATUS_FOLDER}/agent.yaml"),
            message: "missing; is this a berth status tree?".into(),
        })?;
        Ok(StatusSet { agent, objects })
    }

    /// The recorded state as the planner's observed objects, so a plan can be made with no engine.
    pub fn observed(&self) -> Vec<ObservedObject> {
        self.objects
            .iter()
            .filter(|(_, status)| !status.parts.is_empty())
            .map(|(key, status)| ObservedObject {
                key: key.clone(),
                engine: status.engine.unwrap_or(Engine::usual_for(key.kind)),
                archived_at: None,
                expired: None,
                reach: Vec::new(),
                produced: recorded_product(key, status),
                parts: status
                    .parts
                    .iter()
                    .map(|part| ObservedPart {
                        name: format!("{key} {}", part.id),
                        id: part.id.clone(),
                        hash: part.hash.clone(),
                        spec: (*part.spec).clone(),
                        secrets: None,
                        state: part.state,
                        health: part.health,
                        detail: None,
                    })
                    .collect(),
            })
            .collect()
    }

    fn count_phases(&mut self) {
        let mut phases = BTreeMap::new();
        for status in self.objects.values() {
            if let Some(phase) = status.phase {
                *phases.entry(phase).or_insert(0) += 1;
            }
        }
        self.agent.phases = phases;
    }

    /// This status with each Pipeline's newest runs from `history`; `None` when they are already
    /// what it shows.
    pub fn with_runs(&self, history: &BTreeMap<String, Vec<crate::run::Run>>) -> Option<StatusSet> {
        let unchanged = history.iter().all(|(name, runs)| {
            let shown = self
                .objects
                .iter()
                .find(|(key, _)| key.kind == Kind::Pipeline && key.name.as_str() == name)
                .map_or(&[][..], |(_, status)| status.runs.as_slice());
            shown == runs.as_slice()
        });
        if unchanged {
            return None;
        }
        let mut status = self.clone();
        for (name, runs) in history {
            let Ok(parsed) = name.parse() else { continue };
            let key = ObjectRef {
                kind: Kind::Pipeline,
                name: parsed,
            };
            let object = status.objects.entry(key).or_insert_with(|| ObjectStatus {
                kind: Kind::Pipeline,
                name: name.clone(),
                phase: None,
                health: Health::Unknown,
                revision: None,
                spec_hash: None,
                endpoints: Vec::new(),
                message: String::new(),
                last_transition: None,
                engine: None,
                parts: Vec::new(),
                runs: Vec::new(),
                instances: None,
            });
            object.runs.clone_from(runs);
        }
        Some(status)
    }

    /// This status with the instance counts of instanced Challenges (by name); `None` when
    /// they are what it shows. Counts of challenges status has no object for are left out.
    pub fn with_instances(&self, counts: &BTreeMap<String, InstanceCounts>) -> Option<StatusSet> {
        let shown = |key: &ObjectRef| {
            (key.kind == Kind::Challenge)
                .then(|| counts.get(key.name.as_str()).copied())
                .flatten()
        };
        if self
            .objects
            .iter()
            .all(|(key, o)| o.instances == shown(key))
        {
            return None;
        }
        let mut status = self.clone();
        for (key, object) in &mut status.objects {
            object.instances = shown(key);
        }
        Some(status)
    }

    /// Whether `other` differs from this status in anything but the time it was written.
    pub fn differs_from(&self, other: &StatusSet) -> bool {
        let mut this = self.agent.clone();
        this.updated.clone_from(&other.agent.updated);
        this != other.agent || self.objects != other.objects
    }
}

/// Now, as status and run records write times (RFC 3339, in seconds).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `status/challenge/web-101.yaml`.
pub fn object_path(kind: Kind, name: &str) -> String {
    format!(
        "{STATUS_FOLDER}/{}/{name}.yaml",
        kind.as_str().to_ascii_lowercase()
    )
}

fn to_yaml(value: &impl Serialize) -> String {
    let json = serde_json::to_value(value).expect("status serializes");
    let mut text = String::new();
    saphyr::YamlEmitter::new(&mut text)
        .dump(&to_saphyr(&json))
        .expect("writing to a String cannot fail");
    // The emitter starts documents with `---`; a status file holds just one.
    let body = text.strip_prefix("---\n").unwrap_or(&text);
    format!("# Written by berth; edits are overwritten on the next pass.\n{body}\n")
}

fn to_saphyr(value: &Value) -> saphyr::Yaml<'static> {
    use saphyr::{Scalar, Yaml};
    match value {
        Value::Null => Yaml::Value(Scalar::Null),
        Value::Bool(b) => Yaml::Value(Scalar::Boolean(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Value(Scalar::Integer(i)),
            None => Yaml::Value(Scalar::FloatingPoint(n.as_f64().unwrap_or(0.0).into())),
        },
        Value::String(s) => Yaml::Value(Scalar::String(s.clone().into())),
        Value::Array(items) => Yaml::Sequence(items.iter().map(to_saphyr).collect()),
        Value::Object(map) => Yaml::Mapping(
            map.iter()
                .map(|(k, v)| (Yaml::Value(Scalar::String(k.clone().into())), to_saphyr(v)))
                .collect(),
        ),
    }
}

fn from_yaml<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, StatusError> {
    let fail = |message: String| StatusError {
        file: file.to_string(),
        message,
    };
    let stream = yaml::parse(text, false);
    if let Some(fatal) = stream.fatal {
        return Err(fail(format!(
            "{}:{}: {}",
            fatal.at.line, fatal.at.column, fatal.message
        )));
    }
    let document = stream
        .documents
        .into_iter()
        .next()
        .ok_or_else(|| fail("empty".into()))?;
    serde_json::from_value(document.value).map_err(|e| fail(e.to_string()))
}

/// What one pass knew, for [`after_pass`].
pub struct PassRecord<'a> {
    /// The revision applied.
    pub revision: &'a str,
    /// When the pass ended (RFC 3339).
    pub now: &'a str,
    /// What the repo declares.
    pub desired: &'a [DesiredObject],
    /// Descriptor spec hashes, by object.
    pub spec_hashes: &'a HashMap<ObjectRef, String>,
    /// The plan that was carried out.
    pub plan: &'a Plan,
    /// What each changing step did.
    pub reports: &'a [StepReport],
    /// What the engine runs after the pass.
    pub observed: &'a [ObservedObject],
}

/// Why the move of an object from `from` through the pending phase of `action` to `to` is one
/// the phase table forbids; `None` when it is legal (or `action` has no pending phase). Pure.
fn illegal_move(from: Option<Phase>, action: Action, to: Option<Phase>) -> Option<String> {
    // A refused step marks no pending phase (nothing is about to change), but what it records
    // moves as the create or the update it stands for would.
    let pending = match (action, from) {
        (Action::Refuse, None) => Phase::CreatePending,
        (Action::Refuse, Some(_)) => Phase::UpdatePending,
        _ => Phase::pending_for(action)?,
    };
    let legal = Phase::may_follow(from, pending)
        && to.is_none_or(|to| Phase::may_follow(Some(pending), to));
    let shown = |phase: Option<Phase>| phase.map_or("nothing", Phase::as_str);
    (!legal).then(|| {
        format!(
            "berth refused to move it from {} through {} to {}, which its phase table forbids (a bug in berth)",
            shown(from),
            pending.as_str(),
            shown(to)
        )
    })
}

/// The status after a pass that applied `record.revision`.
pub fn after_pass(previous: &StatusSet, record: &PassRecord<'_>) -> StatusSet {
    let desired: HashMap<&ObjectRef, &DesiredObject> =
        record.desired.iter().map(|d| (&d.key, d)).collect();
    let observed = crate::plan::observed_by_key(record.desired, record.observed);
    let reports: HashMap<&ObjectRef, &StepReport> =
        record.reports.iter().map(|r| (&r.step.key, r)).collect();
    let mut next = StatusSet {
        agent: previous.agent.clone(),
        objects: BTreeMap::new(),
    };
    for step in &record.plan.steps {
        let key = &step.key;
        let before = previous.objects.get(key);
        let kept_phase = before.and_then(|b| b.phase);
        let parts = observed
            .get(key)
            .map(|o| {
                let made_from = desired.get(key).map_or(&[][..], |d| &d.parts[..]);
                part_statuses(&o.parts, made_from)
            })
            .unwrap_or_default();
        let outcome = reports.get(key).map(|r| &r.outcome);
        let settled = desired
            .get(key)
            .map_or(Phase::Running, |d| Phase::settled_for(d.target));
        let reasons = step.reasons.join("; ");
        let (phase, message, applied) = match (step.action, outcome) {
            (Action::Skip, _) => (None, reasons, false),
            (Action::Wait, _) => (kept_phase, format!("waiting: {reasons}"), false),
            (Action::Delete, Some(Outcome::Done(_))) => continue,
            // The engine went away: nothing is known to have changed, so nothing is marked.
            (_, Some(Outcome::Transient(why))) => (kept_phase, why.clone(), false),
            (Action::Delete, Some(Outcome::Failed(why) | Outcome::Skipped(why))) => {
                (Some(Phase::CleanupFailed), why.clone(), false)
            }
            (Action::Orphan, _) => {
                let running = parts.iter().any(|p| p.state == PartState::Running);
                let phase = if running {
                    Phase::Running
                } else {
                    Phase::Stopped
                };
                (Some(phase), reasons, false)
            }
            (_, Some(Outcome::Failed(why) | Outcome::Skipped(why))) => {
                (Some(Phase::Failure), why.clone(), false)
            }
            (_, Some(Outcome::Waiting(why))) => (kept_phase, format!("waiting: {why}"), false),
            (action, Some(Outcome::Done(_))) => {
                let verb = match action {
                    Action::Create => "created",
                    Action::Start => "started",
                    Action::Stop => "stopped",
                    Action::Archive => "archived",
                    Action::Restore => "restored",
                    _ => "updated",
                };
                let message = match reasons.is_empty() {
                    true => verb.to_string(),
                    false => format!("{verb}: {reasons}"),
                };
                (Some(settled), message, true)
            }
            (_, None) if step.unhealthy => (Some(settled), reasons, false),
            (_, None) => {
                // Nothing to do: keep what was recorded, settling a phase left pending by a crash.
                let message = before.map(|b| b.message.clone()).unwrap_or_default();
                (Some(settled), message, false)
            }
        };
        let (phase, message) = past_ready_timeout(
            desired.get(key).and_then(|d| d.ready_timeout),
            before,
            object_health(&parts, phase),
            applied,
            record.now,
        )
        .map_or((phase, message.clone()), |why| {
            (Some(Phase::Failure), format!("{why}; {message}"))
        });
        // A step that ran moves the object through its pending phase; a move the phase table
        // forbids is a bug in berth, and is refused rather than recorded: the phase stays, and
        // the message says what was refused.
        let (phase, message) = match outcome {
            Some(Outcome::Done(_) | Outcome::Failed(_) | Outcome::Skipped(_)) => {
                match illegal_move(kept_phase, step.action, phase) {
                    Some(refused) => {
                        tracing::error!(object = %key, %refused, "illegal phase move refused (a bug in berth)");
                        (kept_phase, format!("{refused}; {message}"))
                    }
                    None => (phase, message),
                }
            }
            _ => (phase, message),
        };
        let revision = match applied {
            true => Some(record.revision.to_string()),
            false => before
                .and_then(|b| b.revision.clone())
                .or_else(|| Some(record.revision.to_string()).filter(|_| phase.is_some())),
        };
        let spec_hash = match applied || before.is_none() {
            true => record.spec_hashes.get(key).cloned(),
            false => before.and_then(|b| b.spec_hash.clone()),
        };
        let last_transition = match before {
            Some(b) if b.phase == phase => b.last_transition.clone(),
            _ => Some(record.now.to_string()),
        };
        let health = object_health(&parts, phase);
        let message = match unwell_parts(observed.get(key).copied(), health) {
            Some(why) if !message.contains(&why) => match message.is_empty() {
                true => why,
                false => format!("{message}; {why}"),
            },
            _ => message,
        };
        let status = ObjectStatus {
            kind: key.kind,
            name: key.name.to_string(),
            phase,
            health,
            revision,
            spec_hash,
            endpoints: endpoints(&parts, observed.get(key).copied()),
            message,
            last_transition,
            engine: Some(step.engine).filter(|e| *e != Engine::usual_for(key.kind)),
            parts,
            // Runs and instances are the queue's and the instance manager's to say; a pass keeps
            // what status showed.
            runs: previous
                .objects
                .get(key)
                .map(|o| o.runs.clone())
                .unwrap_or_default(),
            instances: previous.objects.get(key).and_then(|o| o.instances),
        };
        next.objects.insert(key.clone(), status);
    }
    let transient = record
        .reports
        .iter()
        .find(|r| matches!(r.outcome, Outcome::Transient(_)));
    let failed = record
        .reports
        .iter()
        .any(|r| matches!(r.outcome, Outcome::Failed(_) | Outcome::Skipped(_)));
    next.agent.last_attempted_revision = Some(record.revision.to_string());
    // Deletes held back are the one thing a pass that applied everything has to say.
    next.agent.message = record.plan.held.clone().unwrap_or_default();
    next.agent.result = Some(match (transient, failed) {
        (Some(report), _) => {
            next.agent.message = report.outcome.detail().to_string();
            PassResult::Transient
        }
        (None, true) => PassResult::Failed,
        (None, false) => PassResult::Applied,
    });
    if transient.is_none() {
        next.agent.last_applied_revision = Some(record.revision.to_string());
    }
    next.agent.problems.clear();
    next.count_phases();
    stamp(next, previous, record.now)
}

/// `main-1 is Degraded: exited with code 1; …` for an object whose health is not good.
fn unwell_parts(observed: Option<&ObservedObject>, health: Health) -> Option<String> {
    if health != Health::Degraded {
        return None;
    }
    let parts: Vec<String> = observed?
        .parts
        .iter()
        .filter(|p| p.health == Health::Degraded)
        .map(ObservedPart::condition)
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// The status after a pass that found `revision` invalid: objects as they were, the problems recorded.
pub fn after_rejection(
    previous: &StatusSet,
    revision: &str,
    problems: &[ProblemStatus],
    now: &str,
) -> StatusSet {
    still_rejected(previous.clone(), previous, revision, problems, now)
}

/// `after`, the status at the end of a pass over the running revision, as it reads while the
/// followed branch's tip is still `revision`, which was rejected: a pass over what runs never
/// makes a rejection disappear. What that pass found, when not well, is added to the message.
/// Stamped against `before`, the status the pass started from.
pub fn still_rejected(
    mut after: StatusSet,
    before: &StatusSet,
    revision: &str,
    problems: &[ProblemStatus],
    now: &str,
) -> StatusSet {
    let agent = &mut after.agent;
    if agent.result == Some(PassResult::Rejected)
        && agent.last_attempted_revision.as_deref() == Some(revision)
    {
        // Nothing new from a pass over what runs: what status says stays as it is.
        return stamp(after, before, now);
    }
    let running = agent
        .last_applied_revision
        .as_deref()
        .map_or("(none)", short_revision)
        .to_string();
    let mut message = format!(
        "revision {} rejected ({} problem(s)); nothing of it was applied and revision {running} keeps running",
        short_revision(revision),
        problems.len(),
    );
    match agent.result {
        Some(PassResult::Failed) => message.push_str(&format!(
            "; the last pass over {running} failed for some objects"
        )),
        Some(PassResult::Transient | PassResult::Broken) if !agent.message.is_empty() => message
            .push_str(&format!(
                "; the last pass over {running}: {}",
                agent.message
            )),
        _ => {}
    }
    agent.last_attempted_revision = Some(revision.to_string());
    agent.result = Some(PassResult::Rejected);
    agent.message = message;
    agent.problems = problems.to_vec();
    stamp(after, before, now)
}

/// The status after a pass that applied nothing for a reason outside the repo: an engine or git
/// server that could not be reached ([`PassResult::Transient`]), or an unreadable checkout
/// ([`PassResult::Broken`]). Objects stay as they were.
pub fn after_unapplied(
    previous: &StatusSet,
    revision: &str,
    result: PassResult,
    why: &str,
    now: &str,
) -> StatusSet {
    let mut next = previous.clone();
    next.agent.last_attempted_revision = Some(revision.to_string());
    next.agent.result = Some(result);
    next.agent.message = why.to_string();
    stamp(next, previous, now)
}

fn stamp(mut next: StatusSet, previous: &StatusSet, now: &str) -> StatusSet {
    next.agent.updated = match next.differs_from(previous) {
        true => Some(now.to_string()),
        false => previous.agent.updated.clone(),
    };
    next
}

/// The first 12 characters of a commit id.
pub fn short_revision(revision: &str) -> &str {
    // By characters: a revision read from a status file someone edited may not be hex.
    match revision.char_indices().nth(12) {
        Some((end, _)) => &revision[..end],
        None => revision,
    }
}

/// What status says of `parts`: each with the spec the engine shows for it. Where that is the
/// same as the desired part's (the usual case, between passes), status shares the desired one
/// rather than keeping a copy. The hash alone does not say so: a stopped staging's Deployment
/// has its manifest's hash and zero replicas.
fn part_statuses(parts: &[ObservedPart], desired: &[Part]) -> Vec<PartStatus> {
    let mut statuses: Vec<PartStatus> = parts
        .iter()
        .map(|p| PartStatus {
            id: p.id.clone(),
            hash: p.hash.clone(),
            state: p.state,
            health: p.health,
            spec: desired
                .iter()
                .find(|d| d.id == p.id && d.hash == p.hash && *d.spec == p.spec)
                .map_or_else(|| Arc::new(p.spec.clone()), |d| Arc::clone(&d.spec)),
        })
        .collect();
    statuses.sort_by(|a, b| (&a.id, &a.hash).cmp(&(&b.id, &b.hash)));
    statuses
}

/// Why an object that is still Progressing has failed: it has been Running (or failed for this
/// reason already) for longer than its `readyTimeout` without becoming healthy.
fn past_ready_timeout(
    limit: Option<std::time::Duration>,
    before: Option<&ObjectStatus>,
    health: Health,
    applied: bool,
    now: &str,
) -> Option<String> {
    let limit = limit?;
    let before = before?;
    if health != Health::Progressing || applied {
        return None;
    }
    let why = format!("not ready within its readyTimeout ({}s)", limit.as_secs());
    match before.phase? {
        Phase::Failure if before.message.starts_with(&why) => Some(why),
        Phase::Running => {
            let since =
                chrono::DateTime::parse_from_rfc3339(before.last_transition.as_deref()?).ok()?;
            let now = chrono::DateTime::parse_from_rfc3339(now).ok()?;
            let waited = (now - since).to_std().ok()?;
            (waited > limit).then_some(why)
        }
        _ => None,
    }
}

fn object_health(parts: &[PartStatus], phase: Option<Phase>) -> Health {
    match (phase, parts.iter().map(|p| p.health).max()) {
        (None, _) => Health::Unknown,
        (Some(Phase::Stopped | Phase::Archived), Some(_)) => Health::Healthy,
        (_, Some(worst)) => worst,
        (_, None) => Health::Missing,
    }
}

/// Where an object answers: its parts' published ports, and what the engine reports besides.
fn endpoints(parts: &[PartStatus], observed: Option<&ObservedObject>) -> Vec<String> {
    let mut endpoints: Vec<String> = parts
        .iter()
        .filter(|p| {
            ["main-", "sidecar-", "Service/"]
                .iter()
                .any(|slot| p.id.starts_with(slot))
        })
        .filter_map(|p| p.spec.get("ports")?.as_array().cloned())
        .flatten()
        .filter_map(|port| {
            let host = port.get("host")?.as_u64()?;
            let protocol = port
                .get("protocol")
                .and_then(Value::as_str)
                .unwrap_or("tcp");
            Some(format!("{host}/{protocol}"))
        })
        .chain(observed.into_iter().flat_map(|o| o.reach.iter().cloned()))
        .collect();
    endpoints.sort();
    endpoints.dedup();
    endpoints
}

/// Renders status as a table for `berth status`.
pub fn render_table(status: &StatusSet) -> String {
    use std::fmt::Write as _;
    let agent = &status.agent;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "instance {}: last pass {} at revision {}; applied revision {}{}",
        agent.instance,
        agent.result.map_or("never ran", PassResult::as_str),
        agent
            .last_attempted_revision
            .as_deref()
            .map_or("-", short_revision),
        agent
            .last_applied_revision
            .as_deref()
            .map_or("-", short_revision),
        agent
            .updated
            .as_deref()
            .map_or(String::new(), |t| format!(" (updated {t})")),
    );
    // Messages and file names come from outside (engines, logs, the repo): one field each.
    let field = crate::printable::field;
    if !agent.message.is_empty() {
        let _ = writeln!(out, "{}", field(&agent.message));
    }
    for problem in &agent.problems {
        let _ = writeln!(
            out,
            "{}:{}:{}: {}",
            field(&problem.file),
            problem.line,
            problem.column,
            field(&problem.message)
        );
    }
    let rows: Vec<[String; 6]> = status
        .objects
        .iter()
        .map(|(key, s)| {
            [
                key.to_string(),
                s.phase.map_or("-", Phase::as_str).to_string(),
                s.health.as_str().to_string(),
                s.revision
                    .as_deref()
                    .map_or("-", short_revision)
                    .to_string(),
                field(&s.endpoints.join(",")).into_owned(),
                field(&s.message).into_owned(),
            ]
        })
        .collect();
    let header = [
        "OBJECT",
        "PHASE",
        "HEALTH",
        "REVISION",
        "ENDPOINTS",
        "MESSAGE",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(header.map(String::from)).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Part, Policy, Step, Vocabulary, diff};
    use std::time::Duration;

    fn key(name: &str) -> ObjectRef {
        format!("Challenge/{name}").parse().unwrap()
    }

    fn desired(name: &str, hash: &str, port: u16) -> DesiredObject {
        DesiredObject {
            key: key(name),
            engine: Engine::Docker,
            target: TargetState::Running,
            parts: vec![Part {
                id: "main-1".into(),
                hash: hash.into(),
                spec:
                    serde_json::json!({"image": hash, "ports": [{"container": 80, "host": port}]})
                        .into(),
                secrets: None,
                one_shot: false,
            }],
            dependencies: vec![],
            start_first: false,
            hold: None,
            words: Vocabulary::CONTAINER,
            ttl: None,
            ready_timeout: None,
        }
    }

    fn running(object: &DesiredObject) -> ObservedObject {
        ObservedObject {
            key: object.key.clone(),
            engine: object.engine,
            archived_at: None,
            expired: None,
            reach: Vec::new(),
            produced: None,
            parts: object
                .parts
                .iter()
                .map(|p| ObservedPart {
                    name: format!("c-{}", p.hash),
                    id: p.id.clone(),
                    hash: p.hash.clone(),
                    spec: (*p.spec).clone(),
                    secrets: None,
                    state: PartState::Running,
                    health: Health::Healthy,
                    detail: None,
                })
                .collect(),
        }
    }

    /// The status after the pass that created `object`, at `t1`.
    fn first_pass(object: &DesiredObject) -> StatusSet {
        pass(
            &StatusSet::new("ci"),
            std::slice::from_ref(object),
            &[],
            false,
            "t1",
        )
    }

    fn done(step: &Step) -> StepReport {
        StepReport {
            step: step.clone(),
            outcome: Outcome::Done("ok".into()),
            elapsed: Duration::ZERO,
        }
    }

    fn pass(
        previous: &StatusSet,
        desired: &[DesiredObject],
        before: &[ObservedObject],
        fail: bool,
        now: &str,
    ) -> StatusSet {
        let plan = diff(desired, before, Policy::default());
        let reports: Vec<StepReport> = plan
            .steps
            .iter()
            .filter(|s| s.action.changes())
            .map(|s| match fail {
                false => done(s),
                true => StepReport {
                    outcome: Outcome::Failed("port is already allocated".into()),
                    ..done(s)
                },
            })
            .collect();
        let after: Vec<ObservedObject> = match fail {
            false => desired.iter().map(running).collect(),
            true => before.to_vec(),
        };
        let hashes = desired
            .iter()
            .map(|d| (d.key.clone(), format!("spec-{}", d.parts[0].hash)))
            .collect();
        after_pass(
            previous,
            &PassRecord {
                revision: "rev2",
                now,
                desired,
                spec_hashes: &hashes,
                plan: &plan,
                reports: &reports,
                observed: &after,
            },
        )
    }

    #[test]
    fn a_created_object_is_running_with_its_revision_endpoint_and_transition_time() {
        let web = desired("web", "h1", 10101);
        let status = pass(&StatusSet::new("ci"), &[web], &[], false, "t1");
        let object = &status.objects[&key("web")];
        assert_eq!(object.phase, Some(Phase::Running));
        assert_eq!(object.health, Health::Healthy);
        assert_eq!(object.revision.as_deref(), Some("rev2"));
        assert_eq!(object.endpoints, ["10101/tcp"]);
        assert_eq!(object.message, "created: container missing");
        assert_eq!(object.last_transition.as_deref(), Some("t1"));
        assert_eq!(status.agent.result, Some(PassResult::Applied));
        assert_eq!(status.agent.phases[&Phase::Running], 1);
        assert_eq!(status.agent.updated.as_deref(), Some("t1"));
    }

    #[test]
    fn a_part_shows_the_template_it_was_made_from_and_shares_it_when_that_is_the_desired_one() {
        let web = desired("web", "h1", 10101);
        let status = first_pass(&web);
        let part = &status.objects[&key("web")].parts[0];
        assert!(
            Arc::ptr_eq(&part.spec, &web.parts[0].spec),
            "one copy, not two"
        );

        // A failed update leaves the old container: status shows its template, not the new one.
        let newer = desired("web", "h2", 10102);
        let failed = pass(
            &status,
            std::slice::from_ref(&newer),
            &[running(&web)],
            true,
            "t2",
        );
        let part = &failed.objects[&key("web")].parts[0];
        assert_eq!(part.hash, "h1");
        assert_eq!(part.spec["ports"][0]["host"], 10101);
        assert!(!Arc::ptr_eq(&part.spec, &newer.parts[0].spec));

        // The same template, shown otherwise by the engine (a stopped staging's Deployment keeps
        // its hash and has no replicas): status says what the engine shows.
        let mut scaled = running(&web);
        scaled.parts[0].spec["replicas"] = 0.into();
        // (Nothing to change, so the pass leaves the engine as it found it.)
        let stopped = pass(&status, std::slice::from_ref(&web), &[scaled], true, "t2");
        assert_eq!(stopped.objects[&key("web")].parts[0].spec["replicas"], 0);
    }

    #[test]
    fn an_unchanged_pass_changes_nothing_not_even_the_time() {
        let web = desired("web", "h1", 10101);
        let first = first_pass(&web);
        let second = pass(
            &first,
            std::slice::from_ref(&web),
            &[running(&web)],
            false,
            "t2",
        );
        assert!(!second.differs_from(&first));
        assert_eq!(second, first);
    }

    #[test]
    fn a_failed_step_is_a_failure_with_the_engines_reason_and_the_old_revision() {
        let web = desired("web", "h1", 10101);
        let first = first_pass(&web);
        let mut first_at_rev1 = first.clone();
        first_at_rev1.objects.get_mut(&key("web")).unwrap().revision = Some("rev1".into());
        let changed = desired("web", "h2", 10101);
        let second = pass(&first_at_rev1, &[changed], &[running(&web)], true, "t2");
        let object = &second.objects[&key("web")];
        assert_eq!(object.phase, Some(Phase::Failure));
        assert_eq!(object.message, "port is already allocated");
        assert_eq!(object.revision.as_deref(), Some("rev1"));
        assert_eq!(object.parts[0].hash, "h1", "what runs is what was observed");
        assert_eq!(second.agent.result, Some(PassResult::Failed));
    }

    #[test]
    fn status_files_round_trip_through_yaml() {
        let web = desired("web", "h1", 10101);
        let status = pass(
            &StatusSet::new("ci"),
            &[web],
            &[],
            false,
            "2026-11-22T03:00:00Z",
        );
        let files = status.files();
        assert!(files.contains_key("status/agent.yaml"));
        assert!(files.contains_key("status/challenge/web.yaml"));
        let text = &files["status/challenge/web.yaml"];
        assert!(text.contains("phase: Running"), "{text}");
        let parsed = StatusSet::parse(files.iter().map(|(p, t)| (p.as_str(), t.as_str()))).unwrap();
        assert_eq!(parsed, status);
    }

    #[test]
    fn recorded_status_plans_like_the_engine_would() {
        let web = desired("web", "h1", 10101);
        let status = first_pass(&web);
        let changed = desired("web", "h2", 10102);
        let plan = diff(&[changed], &status.observed(), Policy::default());
        assert_eq!(plan.steps[0].action, Action::Update);
        assert!(
            plan.steps[0]
                .reasons
                .contains(&"ports changed: 10101→10102".to_string()),
            "{:?}",
            plan.steps[0].reasons
        );
    }

    #[test]
    fn a_revision_is_shortened_by_characters_never_inside_one() {
        assert_eq!(short_revision("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_revision("abc"), "abc");
        assert_eq!(short_revision("elevenchars\u{e9}tail"), "elevenchars\u{e9}");
    }

    #[test]
    fn a_rejected_revision_keeps_objects_and_records_problems() {
        let web = desired("web", "h1", 10101);
        let applied = pass(&StatusSet::new("ci"), &[web], &[], false, "t1");
        let problem = Problem {
            file: "challenges/web.yaml".into(),
            line: 7,
            column: 5,
            kind: Some("Challenge".into()),
            name: Some("web".into()),
            path: "/spec/ports".into(),
            message: "spec.ports[0].host: \"abc\" is not an integer".into(),
        };
        let rejected = after_rejection(&applied, "rev3", &[ProblemStatus::from(&problem)], "t2");
        assert_eq!(rejected.objects, applied.objects);
        assert_eq!(
            rejected.agent.last_applied_revision.as_deref(),
            Some("rev2")
        );
        assert_eq!(
            rejected.agent.last_attempted_revision.as_deref(),
            Some("rev3")
        );
        assert_eq!(rejected.agent.problems[0].line, 7);
        assert_eq!(
            rejected.agent.problems[0].message,
            "Challenge/web: spec.ports[0].host: \"abc\" is not an integer"
        );
        assert!(
            rejected
                .agent
                .message
                .starts_with("revision rev3 rejected (1 problem(s))")
        );

        // A later pass over what runs (a drift check, a recheck) keeps saying so, and, finding
        // nothing new, changes nothing, not even the time.
        let web = desired("web", "h1", 10101);
        let again = pass(
            &rejected,
            std::slice::from_ref(&web),
            &[running(&web)],
            false,
            "t3",
        );
        assert_eq!(
            again.agent.result,
            Some(PassResult::Applied),
            "the pass alone"
        );
        let kept = still_rejected(again, &rejected, "rev3", &rejected.agent.problems, "t3");
        assert_eq!(kept, rejected);
    }

    #[test]
    fn a_transient_step_keeps_the_phase_and_does_not_count_as_applied() {
        let web = desired("web", "h1", 10101);
        let first = first_pass(&web);
        let changed = desired("web", "h2", 10101);
        let plan = diff(
            std::slice::from_ref(&changed),
            &[running(&web)],
            Policy::default(),
        );
        let reports: Vec<StepReport> = plan
            .steps
            .iter()
            .map(|s| StepReport {
                outcome: Outcome::Transient("the Docker Engine stopped answering".into()),
                ..done(s)
            })
            .collect();
        let hashes = HashMap::new();
        let next = after_pass(
            &first,
            &PassRecord {
                revision: "rev3",
                now: "t2",
                desired: &[changed],
                spec_hashes: &hashes,
                plan: &plan,
                reports: &reports,
                observed: &[running(&web)],
            },
        );
        let object = &next.objects[&key("web")];
        assert_eq!(object.phase, Some(Phase::Running), "not marked Failure");
        assert_eq!(next.agent.result, Some(PassResult::Transient));
        assert_eq!(next.agent.last_applied_revision.as_deref(), Some("rev2"));
    }

    /// One pass over the staging `x`: a step with `action` ending in `outcome` (none for a step
    /// that changes nothing), after which its one part is `state` and `health`.
    fn staging_pass(
        previous: &StatusSet,
        target: TargetState,
        action: Action,
        outcome: Option<Outcome>,
        seen: Option<(PartState, Health)>,
        now: &str,
    ) -> StatusSet {
        let key: ObjectRef = "Staging/x".parse().unwrap();
        let desired = DesiredObject {
            key: key.clone(),
            target,
            ready_timeout: Some(Duration::from_secs(60)),
            ..desired("x", "h", 80)
        };
        let step = Step {
            key: key.clone(),
            action,
            engine: crate::plan::Engine::Docker,
            from: None,
            reasons: vec![],
            replacement: None,
            dependencies: vec![],
            unhealthy: false,
        };
        let reports: Vec<StepReport> = outcome
            .into_iter()
            .map(|outcome| StepReport {
                outcome,
                ..done(&step)
            })
            .collect();
        let observed: Vec<ObservedObject> = seen
            .into_iter()
            .map(|(state, health)| {
                let mut object = running(&desired);
                object.key = key.clone();
                object.parts[0].state = state;
                object.parts[0].health = health;
                object
            })
            .collect();
        let plan = Plan {
            steps: vec![step],
            held: None,
        };
        after_pass(
            previous,
            &PassRecord {
                revision: "rev",
                now,
                desired: std::slice::from_ref(&desired),
                spec_hashes: &HashMap::new(),
                plan: &plan,
                reports: &reports,
                observed: &observed,
            },
        )
    }

    #[test]
    fn every_transition_of_the_staging_phase_table() {
        use Phase::*;
        let key: ObjectRef = "Staging/x".parse().unwrap();
        let phase = |set: &StatusSet| set.objects.get(&key).and_then(|o| o.phase);
        let up = Some((PartState::Running, Health::Healthy));
        let starting = Some((PartState::Running, Health::Progressing));
        let archived = Some((PartState::Archived, Health::Healthy));
        let failed = || Some(Outcome::Failed("the API server refused".into()));
        let done = || Some(Outcome::Done("applied".into()));
        let (run, keep) = (TargetState::Running, TargetState::Archived);
        let t0 = "2026-11-30T10:00:00Z";
        let empty = StatusSet::new("ci");
        // CreatePending → Running | Failure.
        let running = staging_pass(&empty, run, Action::Create, done(), up, t0);
        assert_eq!(phase(&running), Some(Running));
        assert_eq!(
            phase(&staging_pass(
                &empty,
                run,
                Action::Create,
                failed(),
                None,
                t0
            )),
            Some(Failure)
        );
        // Running → UpdatePending (→ Running | Failure) | ArchivePending (→ Archived) | Failure.
        assert_eq!(
            phase(&staging_pass(&running, run, Action::Update, done(), up, t0)),
            Some(Running)
        );
        assert_eq!(
            phase(&staging_pass(
                &running,
                run,
                Action::Update,
                failed(),
                up,
                t0
            )),
            Some(Failure)
        );
        let archive = staging_pass(&running, keep, Action::Archive, done(), archived, t0);
        assert_eq!(phase(&archive), Some(Archived));
        // Archived → UpdatePending → Archived: a change to an archived staging's objects.
        let changed = staging_pass(&archive, keep, Action::Update, done(), archived, t0);
        assert_eq!(phase(&changed), Some(Archived));
        assert_eq!(changed.objects[&key].message, "updated");
        // Archived → CreatePending (restore) → Running; Archived → DeletePending → gone | CleanupFailed.
        assert_eq!(
            phase(&staging_pass(
                &archive,
                run,
                Action::Restore,
                done(),
                up,
                t0
            )),
            Some(Running)
        );
        let gone = staging_pass(&archive, keep, Action::Delete, done(), None, t0);
        assert!(
            !gone.objects.contains_key(&key),
            "cleaned up: no status left"
        );
        assert_eq!(
            phase(&staging_pass(
                &archive,
                keep,
                Action::Delete,
                failed(),
                archived,
                t0
            )),
            Some(CleanupFailed)
        );
        // CleanupFailed → UpdatePending → Running: declared again, its remains are updated.
        let held = staging_pass(&archive, keep, Action::Delete, failed(), archived, t0);
        assert_eq!(
            phase(&staging_pass(&held, run, Action::Update, done(), up, t0)),
            Some(Running)
        );
        // Running and still Progressing past readyTimeout (60s) → Failure, kept while it lasts.
        let early = staging_pass(
            &running,
            run,
            Action::Noop,
            None,
            starting,
            "2026-11-30T10:00:30Z",
        );
        assert_eq!(
            phase(&early),
            Some(Running),
            "Progressing is visible, not a failure"
        );
        let late = staging_pass(
            &running,
            run,
            Action::Noop,
            None,
            starting,
            "2026-11-30T10:01:01Z",
        );
        assert_eq!(phase(&late), Some(Failure));
        assert!(
            late.objects[&key]
                .message
                .starts_with("not ready within its readyTimeout (60s)")
        );
        let still = staging_pass(
            &late,
            run,
            Action::Noop,
            None,
            starting,
            "2026-11-30T10:05:00Z",
        );
        assert_eq!(phase(&still), Some(Failure));
        assert_eq!(
            phase(&staging_pass(
                &still,
                run,
                Action::Noop,
                None,
                up,
                "2026-11-30T10:06:00Z"
            )),
            Some(Running)
        );
        // The table, edge by edge, as the pass checks it.
        for (from, to) in [
            (None, CreatePending),
            (Some(CreatePending), Running),
            (Some(CreatePending), Failure),
            (Some(Running), UpdatePending),
            (Some(Running), ArchivePending),
            (Some(Running), Failure),
            (Some(ArchivePending), Archived),
            (Some(Archived), CreatePending),
            (Some(Archived), DeletePending),
            (Some(DeletePending), CleanupFailed),
        ] {
            assert!(Phase::may_follow(from, to), "{from:?} → {to:?}");
        }
        assert!(
            !Phase::may_follow(Some(Archived), Running),
            "a restore passes CreatePending"
        );
    }

    #[test]
    fn archive_and_restore_pass_through_their_pending_phases() {
        use Phase::*;
        assert_eq!(Phase::pending_for(Action::Archive), Some(ArchivePending));
        assert_eq!(Phase::pending_for(Action::Restore), Some(CreatePending));
        assert!(Phase::may_follow(Some(Running), ArchivePending));
        assert!(Phase::may_follow(Some(ArchivePending), Archived));
        assert!(Phase::may_follow(Some(Archived), CreatePending));
        assert!(Phase::may_follow(Some(CreatePending), Running));
        assert_eq!(Phase::settled_for(TargetState::Archived), Archived);
        assert_eq!(Phase::pending_for(Action::Wait), None);
    }

    #[test]
    fn status_written_before_parts_says_so() {
        let files = [
            ("status/agent.yaml", "instance: ci\n"),
            (
                "status/challenge/web.yaml",
                "kind: Challenge\nname: web\nhealth: Healthy\nmembers:\n  - {slot: main-1, hash: h, running: true, health: Healthy, spec: {}}\n",
            ),
        ];
        let error = StatusSet::parse(files).unwrap_err();
        assert_eq!(error.file, "status/challenge/web.yaml");
        assert!(error.message.contains("older berth"), "{error}");
    }

    #[test]
    fn legal_phase_moves_go_through_pending_phases() {
        use Phase::*;
        assert!(Phase::may_follow(None, CreatePending));
        assert!(Phase::may_follow(Some(CreatePending), Running));
        assert!(Phase::may_follow(Some(Running), UpdatePending));
        assert!(Phase::may_follow(Some(UpdatePending), Stopped));
        assert!(Phase::may_follow(Some(Running), ArchivePending));
        assert!(Phase::may_follow(Some(ArchivePending), Archived));
        assert!(Phase::may_follow(Some(Archived), UpdatePending));
        assert!(Phase::may_follow(Some(DeletePending), CleanupFailed));
        assert!(Phase::may_follow(Some(Failure), UpdatePending));
        assert!(Phase::may_follow(Some(UpdatePending), Archived));
        assert!(Phase::may_follow(Some(CleanupFailed), UpdatePending));
        for phase in Phase::ALL {
            assert!(Phase::may_follow(Some(phase), phase), "{phase:?} stays");
        }
    }

    #[test]
    fn a_move_the_phase_table_forbids_is_refused_and_said_never_recorded() {
        let key: ObjectRef = "Staging/x".parse().unwrap();
        let up = Some((PartState::Running, Health::Healthy));
        let archived = Some((PartState::Archived, Health::Healthy));
        let done = || Some(Outcome::Done("applied".into()));
        let t0 = "2026-11-30T10:00:00Z";
        let running = staging_pass(
            &StatusSet::new("ci"),
            TargetState::Running,
            Action::Create,
            done(),
            up,
            t0,
        );
        let archive = staging_pass(
            &running,
            TargetState::Archived,
            Action::Archive,
            done(),
            archived,
            t0,
        );
        // An archive of what is archived already, ending Running: no plan makes it, so it is a
        // bug in berth, and status keeps what it knew rather than record it.
        let refused = staging_pass(
            &archive,
            TargetState::Running,
            Action::Archive,
            done(),
            up,
            t0,
        );
        let object = &refused.objects[&key];
        assert_eq!(object.phase, Some(Phase::Archived));
        assert!(
            object.message.starts_with(
                "berth refused to move it from Archived through ArchivePending to Running"
            ),
            "{}",
            object.message
        );
        assert_eq!(
            illegal_move(Some(Phase::Running), Action::Update, Some(Phase::Running)),
            None
        );
        assert_eq!(
            illegal_move(Some(Phase::Archived), Action::Noop, None),
            None
        );
        // A refused step records its failure as the update or create it stands for would.
        for from in [None, Some(Phase::Archived), Some(Phase::Stopped)] {
            assert_eq!(
                illegal_move(from, Action::Refuse, Some(Phase::Failure)),
                None
            );
        }
        assert!(
            illegal_move(
                Some(Phase::Archived),
                Action::Refuse,
                Some(Phase::CleanupFailed)
            )
            .is_some()
        );
    }

    #[test]
    fn illegal_phase_moves_are_refused() {
        use Phase::*;
        let illegal = [
            (None, CleanupFailed),
            (Some(Running), Stopped),
            (Some(Running), Archived),
            (Some(Archived), Running),
            (Some(CreatePending), UpdatePending),
            (Some(DeletePending), Running),
            (Some(CleanupFailed), Running),
            (Some(Stopped), Failure),
        ];
        for (from, to) in illegal {
            assert!(!Phase::may_follow(from, to), "{from:?} → {to:?}");
        }
        // A settled phase is only ever left for a pending one, but for Running turning into a
        // Failure past its readyTimeout.
        for from in Phase::ALL.into_iter().filter(|p| p.is_settled()) {
            for to in Phase::ALL
                .into_iter()
                .filter(|p| p.is_settled() && *p != from)
                .filter(|to| (from, *to) != (Running, Failure))
            {
                assert!(!Phase::may_follow(Some(from), to), "{from:?} → {to:?}");
            }
        }
    }
}
