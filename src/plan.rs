//! The plan: what must change to turn observed state into desired state, one step per object, each
//! with its reasons.
//!
//! [`diff`] is a pure function. Backends describe each object as *members* (one per container
//! slot: each replica, each sidecar), each with the hash of its own template and its spec as JSON
//! for explaining changes. Comparing members rather than whole objects means a changed sidecar
//! replaces only that sidecar, and leftovers of an interrupted apply (two containers in one slot)
//! are seen and cleaned. Rendering (text, markdown, JSON) lives here too; nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::descriptor::ObjectRef;

/// One container slot an object should have.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The slot: `main-1`, `main-2`, `sidecar-db`.
    pub slot: String,
    /// Hash of the slot's template; a different hash means the container is replaced.
    pub hash: String,
    /// The slot's spec, for explaining changes (secrets only as references).
    pub spec: Value,
}

/// What an object should be.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredObject {
    /// `Kind/name`.
    pub key: ObjectRef,
    /// Whether its containers should run (`state: running`).
    pub run: bool,
    /// Its container slots.
    pub members: Vec<Member>,
    /// Objects that must be applied first.
    pub dependencies: Vec<ObjectRef>,
    /// Whether new containers can start before old ones stop (no published host port clashes).
    pub start_first: bool,
    /// Why it cannot be applied by any backend here, if so.
    pub skip: Option<String>,
}

/// Health of an object or container, as berth reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub enum Health {
    /// Running and passing its health check (or running with none).
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

/// One container berth owns, as the engine reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedMember {
    /// The engine's name for it.
    pub name: String,
    /// The slot it fills.
    pub slot: String,
    /// Hash of the template it was made from.
    pub hash: String,
    /// The spec it was made from.
    pub spec: Value,
    /// Whether it runs.
    pub running: bool,
    /// Its health.
    pub health: Health,
}

/// What the engine runs for one object.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedObject {
    /// `Kind/name`.
    pub key: ObjectRef,
    /// Its containers.
    pub members: Vec<ObservedMember>,
}

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Make what is missing.
    Create,
    /// Replace containers whose template changed.
    Update,
    /// Remove what the repo no longer declares (`--prune`).
    Delete,
    /// Start stopped containers.
    Start,
    /// Stop running containers.
    Stop,
    /// Nothing to do.
    Noop,
    /// Owned but no longer declared; kept because prune is off.
    Orphan,
    /// Declared but not applicable here.
    Skip,
}

impl Action {
    /// Whether the step changes the engine.
    pub fn changes(self) -> bool {
        matches!(
            self,
            Action::Create | Action::Update | Action::Delete | Action::Start | Action::Stop
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
            Action::Noop => "noop",
            Action::Orphan => "orphan",
            Action::Skip => "skip",
        }
    }
}

/// How an update replaces containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Replacement {
    /// Start the new container, then remove the old one.
    StartFirst,
    /// Stop the old container first (its host ports are needed by the new one).
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
    /// Why.
    pub reasons: Vec<String>,
    /// For updates: how containers are replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replacement: Option<Replacement>,
    /// Objects whose steps must succeed first.
    #[serde(
        serialize_with = "all_as_string",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub dependencies: Vec<ObjectRef>,
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
}

/// Policy the planner follows.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Delete what berth owns that the repo no longer declares.
    pub prune: bool,
}

/// The pure diff of desired and observed state.
pub fn diff(desired: &[DesiredObject], observed: &[ObservedObject], policy: Policy) -> Plan {
    let observed_by_key: BTreeMap<&ObjectRef, &ObservedObject> =
        observed.iter().map(|o| (&o.key, o)).collect();
    let mut steps = Vec::new();
    for object in desired {
        let (action, reasons) = match &object.skip {
            Some(reason) => (Action::Skip, vec![reason.clone()]),
            None => compare(object, observed_by_key.get(&object.key).copied()),
        };
        let replacement = (action == Action::Update).then_some(if object.start_first {
            Replacement::StartFirst
        } else {
            Replacement::StopFirst
        });
        steps.push(Step {
            key: object.key.clone(),
            action,
            reasons,
            replacement,
            dependencies: object.dependencies.clone(),
        });
    }
    let declared: BTreeSet<&ObjectRef> = desired.iter().map(|d| &d.key).collect();
    for object in observed.iter().filter(|o| !declared.contains(&o.key)) {
        let (action, reason) = if policy.prune {
            (Action::Delete, "removed from repo".to_string())
        } else {
            (
                Action::Orphan,
                "removed from repo; kept (apply with --prune to delete)".to_string(),
            )
        };
        steps.push(Step {
            key: object.key.clone(),
            action,
            reasons: vec![reason],
            replacement: None,
            dependencies: Vec::new(),
        });
    }
    steps.sort_by(|a, b| a.key.cmp(&b.key));
    Plan { steps }
}

fn compare(desired: &DesiredObject, observed: Option<&ObservedObject>) -> (Action, Vec<String>) {
    let Some(observed) = observed.filter(|o| !o.members.is_empty()) else {
        return (Action::Create, vec!["container missing".into()]);
    };
    let mut by_slot: BTreeMap<&str, Vec<&ObservedMember>> = BTreeMap::new();
    for member in &observed.members {
        by_slot
            .entry(member.slot.as_str())
            .or_default()
            .push(member);
    }
    let mut changed = Vec::new();
    let mut missing = Vec::new();
    for member in &desired.members {
        let present = by_slot
            .get(member.slot.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        match present {
            [] => missing.push(member.slot.clone()),
            [one] if one.hash == member.hash => {}
            several if several.iter().any(|m| m.hash == member.hash) => {
                changed.push(format!(
                    "{}: leftover containers from an interrupted apply",
                    member.slot
                ));
            }
            [old, ..] => changed.extend(explain(&member.slot, &old.spec, &member.spec)),
        }
    }
    let desired_slots: BTreeSet<&str> = desired.members.iter().map(|m| m.slot.as_str()).collect();
    for slot in by_slot.keys().filter(|slot| !desired_slots.contains(*slot)) {
        changed.push(format!("{slot} removed"));
    }
    if !changed.is_empty() {
        let mut reasons = Vec::new();
        for reason in changed {
            if !reasons.contains(&reason) {
                reasons.push(reason);
            }
        }
        return (Action::Update, reasons);
    }
    if !missing.is_empty() {
        return (
            Action::Create,
            vec![format!("container missing: {}", missing.join(", "))],
        );
    }
    let any_running = observed.members.iter().any(|m| m.running);
    let all_running = observed.members.iter().all(|m| m.running);
    match (desired.run, any_running, all_running) {
        (true, _, false) => (Action::Start, vec!["container stopped".into()]),
        (false, true, _) => (Action::Stop, vec!["state: stopped".into()]),
        _ => (Action::Noop, Vec::new()),
    }
}

/// Why a slot's template changed, field by field: `image changed: a→b`, `ports changed: 10001→10002`.
fn explain(slot: &str, old: &Value, new: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let old_fields = old.as_object().unwrap_or(&empty);
    let new_fields = new.as_object().unwrap_or(&empty);
    let keys: BTreeSet<&String> = old_fields.keys().chain(new_fields.keys()).collect();
    let prefix = slot
        .strip_prefix("sidecar-")
        .map(|name| format!("sidecar {name}: "))
        .unwrap_or_default();
    let mut reasons = Vec::new();
    for key in keys {
        let (before, after) = (old_fields.get(key), new_fields.get(key));
        if before == after {
            continue;
        }
        let detail = match key.as_str() {
            "image" | "replicas" | "restart" => format!(": {}→{}", short(before), short(after)),
            "ports" => format!(": {}→{}", ports(before), ports(after)),
            "env" | "secretEnv" => {
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

/// Counts of steps by outcome, for the summary line.
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
    /// Objects that need nothing.
    pub unchanged: usize,
    /// Objects owned but no longer declared, kept.
    pub orphaned: usize,
    /// Objects that cannot be applied here.
    pub skipped: usize,
}

impl Plan {
    /// Whether any step changes the engine.
    pub fn has_changes(&self) -> bool {
        self.steps.iter().any(|s| s.action.changes())
    }

    /// Counts of steps by action.
    pub fn summary(&self) -> Summary {
        let mut summary = Summary::default();
        for step in &self.steps {
            match step.action {
                Action::Create => summary.create += 1,
                Action::Update => summary.update += 1,
                Action::Delete => summary.delete += 1,
                Action::Start => summary.start += 1,
                Action::Stop => summary.stop += 1,
                Action::Noop => summary.unchanged += 1,
                Action::Orphan => summary.orphaned += 1,
                Action::Skip => summary.skipped += 1,
            }
        }
        summary
    }

    /// `2 to create, 1 to update, 0 to delete, 5 unchanged`, with starts, stops, orphans and
    /// skips when there are any.
    pub fn summary_line(&self) -> String {
        let s = self.summary();
        let mut line = format!(
            "{} to create, {} to update, {} to delete",
            s.create, s.update, s.delete
        );
        for (count, what) in [(s.start, "to start"), (s.stop, "to stop")] {
            if count > 0 {
                write!(line, ", {count} {what}").expect("write to string");
            }
        }
        write!(line, ", {} unchanged", s.unchanged).expect("write to string");
        for (count, what) in [(s.orphaned, "orphaned"), (s.skipped, "skipped")] {
            if count > 0 {
                write!(line, ", {count} {what}").expect("write to string");
            }
        }
        line
    }

    fn describe(step: &Step) -> String {
        let mut reason = step.reasons.join("; ");
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
            let line = format!(
                "{:<width$}  {:<7} {reason}",
                step.key.to_string(),
                step.action.as_str()
            );
            writeln!(out, "{}", line.trim_end()).expect("write to string");
        }
        writeln!(out, "{}", self.summary_line()).expect("write to string");
        out
    }

    /// A table fit for a pull-request comment.
    pub fn render_markdown(&self) -> String {
        let mut out =
            String::from("### berth plan\n\n| Object | Action | Reason |\n|---|---|---|\n");
        for step in &self.steps {
            let reason = Self::describe(step).replace('|', "\\|");
            writeln!(
                out,
                "| `{}` | {} | {reason} |",
                step.key,
                step.action.as_str()
            )
            .expect("write to string");
        }
        writeln!(out, "\n**{}**", self.summary_line()).expect("write to string");
        out
    }

    /// The plan and its summary as JSON.
    pub fn render_json(&self) -> String {
        let document = serde_json::json!({ "steps": self.steps, "summary": self.summary() });
        serde_json::to_string_pretty(&document).expect("plans serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(name: &str) -> ObjectRef {
        format!("Challenge/{name}").parse().unwrap()
    }

    fn member(slot: &str, hash: &str, spec: Value) -> Member {
        Member {
            slot: slot.into(),
            hash: hash.into(),
            spec,
        }
    }

    fn desired(name: &str, run: bool, members: Vec<Member>) -> DesiredObject {
        DesiredObject {
            key: key(name),
            run,
            members,
            dependencies: vec![],
            start_first: true,
            skip: None,
        }
    }

    fn seen(slot: &str, hash: &str, spec: Value, running: bool) -> ObservedMember {
        ObservedMember {
            name: format!("c-{slot}-{hash}"),
            slot: slot.into(),
            hash: hash.into(),
            spec,
            running,
            health: Health::Healthy,
        }
    }

    fn observed(name: &str, members: Vec<ObservedMember>) -> ObservedObject {
        ObservedObject {
            key: key(name),
            members,
        }
    }

    fn only_step(
        desired: Vec<DesiredObject>,
        observed: Vec<ObservedObject>,
        prune: bool,
    ) -> (Action, Vec<String>) {
        let plan = diff(&desired, &observed, Policy { prune });
        assert_eq!(plan.steps.len(), 1, "{plan:?}");
        (plan.steps[0].action, plan.steps[0].reasons.clone())
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
    fn skipped_objects_say_why_and_change_nothing() {
        let mut object = desired("a", true, vec![]);
        object.skip = Some("skipped (no backend yet)".into());
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
                .contains("| `Challenge/new` | create | container missing |")
        );
        let json: Value = serde_json::from_str(&plan.render_json()).unwrap();
        assert_eq!(json["summary"]["create"], 1);
        assert_eq!(json["steps"][0]["key"], "Challenge/new");
        assert!(plan.has_changes());
    }
}
