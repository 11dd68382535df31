//! What the console's pages show, worked out from status, runs and instances: rows, filters and
//! words. Pure: the templates only lay these out, and escape every value as they do.

use crate::descriptor::Kind;
use crate::plan::Health;
use crate::status::{ObjectStatus, Phase, StatusSet, short_revision};

/// The overview's filters, as its form sends them (`?kind=&phase=&health=&q=`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Filters {
    /// Only this kind (`Challenge`, `Pipeline`, `Staging`).
    #[serde(default)]
    pub kind: String,
    /// Only this phase.
    #[serde(default)]
    pub phase: String,
    /// Only this health.
    #[serde(default)]
    pub health: String,
    /// Only names holding this.
    #[serde(default)]
    pub q: String,
}

impl Filters {
    /// Whether `object` passes every filter that is set.
    pub fn keep(&self, object: &ObjectStatus) -> bool {
        let phase = object.phase.map_or("", Phase::as_str);
        (self.kind.is_empty() || object.kind.as_str() == self.kind)
            && (self.phase.is_empty() || phase == self.phase)
            && (self.health.is_empty() || object.health.as_str() == self.health)
            && (self.q.is_empty() || object.name.contains(self.q.trim()))
    }
}

/// One object as the overview lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRow {
    /// `Challenge`, `Pipeline`, `Staging`.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// Its phase, or `-` when no backend here applies its kind.
    pub phase: &'static str,
    /// Its health.
    pub health: &'static str,
    /// A word for the health's colour: `good`, `busy`, `bad`, `none` (the word is shown too).
    pub tone: &'static str,
    /// Where it answers.
    pub endpoints: Vec<String>,
    /// The revision live for it, short.
    pub revision: String,
    /// When its phase last changed.
    pub since: String,
    /// Its page.
    pub href: String,
    /// Live and pooled per-team instances, for an instanced challenge.
    pub instances: Option<String>,
}

/// The tone of a health or phase: what colour it is given beside its word.
pub fn tone(health: Health, phase: Option<Phase>) -> &'static str {
    match (phase, health) {
        (Some(Phase::Failure | Phase::CleanupFailed), _) => "bad",
        (_, Health::Degraded | Health::Missing) => "bad",
        (_, Health::Progressing) => "busy",
        (Some(p), _) if !p.is_settled() => "busy",
        (_, Health::Healthy) => "good",
        _ => "none",
    }
}

/// An object's page.
pub fn object_href(kind: Kind, name: &str) -> String {
    format!("/objects/{}/{}", kind.as_str(), name)
}

impl ObjectRow {
    /// The row of `object`.
    pub fn of(object: &ObjectStatus) -> ObjectRow {
        ObjectRow {
            kind: object.kind.as_str(),
            name: object.name.clone(),
            phase: object.phase.map_or("-", Phase::as_str),
            health: object.health.as_str(),
            tone: tone(object.health, object.phase),
            endpoints: object.endpoints.clone(),
            revision: object
                .revision
                .as_deref()
                .map(|r| short_revision(r).to_string())
                .unwrap_or_default(),
            since: object.last_transition.clone().unwrap_or_default(),
            href: object_href(object.kind, &object.name),
            instances: object.instances.map(|c| match c.degraded {
                0 => format!("{} live, {} pooled", c.live, c.pooled),
                failing => format!(
                    "{} live, {} pooled, {failing} failing its solver",
                    c.live, c.pooled
                ),
            }),
        }
    }
}

/// The objects `filters` keep, in kind and name order.
pub fn rows(status: &StatusSet, filters: &Filters) -> Vec<ObjectRow> {
    status
        .objects
        .values()
        .filter(|o| filters.keep(o))
        .map(ObjectRow::of)
        .collect()
}

/// The choices of the overview's filters: kinds, phases and healths, each with whether it is
/// the one chosen.
pub fn choices<'a>(all: impl Iterator<Item = &'a str>, chosen: &str) -> Vec<(&'a str, bool)> {
    all.map(|value| (value, value == chosen)).collect()
}

/// The state buttons an object's page offers, as (state, words): a Challenge stops or starts, a
/// Staging stops, starts, is archived or restored; only those that change something.
pub fn state_buttons(kind: Kind, phase: Option<Phase>) -> Vec<(&'static str, &'static str)> {
    match (kind, phase) {
        (Kind::Challenge, Some(Phase::Stopped)) => vec![("running", "Start")],
        (Kind::Challenge, _) => vec![("stopped", "Stop")],
        (Kind::Staging, Some(Phase::Archived)) => vec![("running", "Restore")],
        (Kind::Staging, Some(Phase::Stopped)) => {
            vec![("running", "Start"), ("archived", "Archive")]
        }
        (Kind::Staging, _) => vec![("stopped", "Stop"), ("archived", "Archive")],
        (Kind::Pipeline, _) => Vec::new(),
    }
}

/// A Staging as the stagings page lists it: where it lives, what it runs and where it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingRow {
    /// Its row as the overview has it.
    pub row: ObjectRow,
    /// Its namespace, as observed.
    pub namespace: String,
    /// The images its workloads run (their tags are the staging's tag).
    pub images: Vec<String>,
    /// Its Ingresses' addresses with a host of their own: links.
    pub urls: Vec<String>,
    /// Where else it answers: NodePorts (`30080/tcp`, on any node), balancers, any-host paths.
    pub ports: Vec<String>,
    /// The state buttons for it.
    pub states: Vec<(&'static str, &'static str)>,
}

/// The namespace a staging lives in: of those its status names (an old one lingers, being
/// deleted, after a change of `spec.namespace`), the healthy one.
pub fn namespace_of(object: &ObjectStatus) -> String {
    let namespaces = object
        .parts
        .iter()
        .filter_map(|p| Some((p.id.strip_prefix("Namespace/")?, p.health)));
    namespaces
        .min_by_key(|(_, health)| *health != Health::Healthy)
        .map(|(ns, _)| ns.to_string())
        .unwrap_or_default()
}

/// The images an object's parts run, each once.
pub fn images_of(object: &ObjectStatus) -> Vec<String> {
    let mut images: Vec<String> = object
        .parts
        .iter()
        .filter_map(|p| p.spec.get("image")?.as_str())
        .flat_map(|i| i.split(", "))
        .map(str::to_string)
        .collect();
    images.sort();
    images.dedup();
    images
}

/// Whether an endpoint is an address a browser can open: http(s), with a host of its own.
pub fn is_link(endpoint: &str) -> bool {
    (endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        && !endpoint.contains("://*")
        && !endpoint
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
}

impl StagingRow {
    /// The row of the Staging `object`; its buttons only when `may_change`.
    pub fn of(object: &ObjectStatus, may_change: bool) -> StagingRow {
        // A staging at rest answers nowhere, whatever its Services say.
        let answering = !matches!(object.phase, Some(Phase::Stopped | Phase::Archived));
        let (urls, ports) = object
            .endpoints
            .iter()
            .filter(|_| answering)
            .cloned()
            .partition(|e| is_link(e));
        StagingRow {
            row: ObjectRow::of(object),
            namespace: namespace_of(object),
            images: images_of(object),
            urls,
            ports,
            states: match may_change {
                true => state_buttons(object.kind, object.phase),
                false => Vec::new(),
            },
        }
    }
}

/// Every Staging in status, in name order.
pub fn stagings(status: &StatusSet, may_change: bool) -> Vec<StagingRow> {
    status
        .objects
        .values()
        .filter(|o| o.kind == Kind::Staging)
        .map(|o| StagingRow::of(o, may_change))
        .collect()
}

/// A run's step as its page lists it: `build: exit code 0 in 2.5 s`, or killed.
pub fn step_line(step: &crate::queue::StepRecord) -> String {
    let ended = match step.exit_code {
        Some(code) => format!("exit code {code}"),
        None => "killed".to_string(),
    };
    format!(
        "{}: {ended} in {:.1} s",
        step.name,
        step.duration_ms as f64 / 1000.0
    )
}

/// Every kind, as the filter offers it.
pub const KINDS: [&str; 3] = ["Challenge", "Pipeline", "Staging"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::InstanceCounts;

    fn object(kind: Kind, name: &str, phase: Phase, health: Health) -> ObjectStatus {
        ObjectStatus {
            kind,
            name: name.into(),
            phase: Some(phase),
            health,
            revision: Some("0123456789abcdef0123".into()),
            spec_hash: None,
            endpoints: vec!["10101/tcp".into()],
            message: String::new(),
            last_transition: Some("2026-12-05T10:00:00Z".into()),
            engine: None,
            parts: Vec::new(),
            runs: Vec::new(),
            instances: None,
        }
    }

    #[test]
    fn filters_keep_what_matches_every_one_set() {
        let web = object(Kind::Challenge, "web", Phase::Running, Health::Healthy);
        let qa = object(Kind::Staging, "qa-login", Phase::Failure, Health::Degraded);
        let all = Filters::default();
        assert!(all.keep(&web) && all.keep(&qa));
        let failing = Filters {
            phase: "Failure".into(),
            ..Filters::default()
        };
        assert!(!failing.keep(&web) && failing.keep(&qa));
        let named = Filters {
            kind: "Staging".into(),
            q: " login ".into(),
            ..Filters::default()
        };
        assert!(!named.keep(&web) && named.keep(&qa));
        let healthy = Filters {
            health: "Healthy".into(),
            ..Filters::default()
        };
        assert!(healthy.keep(&web) && !healthy.keep(&qa));
    }

    /// A staging's row names its namespace, the images it runs, its Ingress URLs as links (and
    /// nothing else as one), and the buttons its phase allows.
    #[test]
    fn a_staging_row_says_where_it_lives_what_it_runs_and_where_it_answers() {
        use crate::plan::PartState;
        use crate::status::PartStatus;
        let part = |id: &str, health: Health, spec: serde_json::Value| PartStatus {
            id: id.into(),
            hash: "h".into(),
            state: PartState::Stopped,
            health,
            spec: spec.into(),
        };
        let mut shop = object(Kind::Staging, "shop", Phase::Stopped, Health::Healthy);
        shop.parts = vec![
            part(
                "Deployment/api",
                Health::Healthy,
                serde_json::json!({"image": "shop/api:login-3f2a, sidecar:1"}),
            ),
            part(
                "Deployment/web",
                Health::Healthy,
                serde_json::json!({"image": "shop/web:login-3f2a"}),
            ),
            part(
                "Namespace/qa-old",
                Health::Progressing,
                serde_json::json!({}),
            ),
            part("Namespace/qa-shop", Health::Healthy, serde_json::json!({})),
        ];
        shop.endpoints = vec![
            "30080/tcp".into(),
            "http://*/".into(),
            "https://shop.example/api".into(),
            "javascript:alert(1)".into(),
        ];
        let row = StagingRow::of(&shop, true);
        assert!(
            row.urls.is_empty() && row.ports.is_empty(),
            "a stopped staging answers nowhere"
        );
        shop.phase = Some(Phase::Running);
        let row = StagingRow::of(&shop, true);
        shop.phase = Some(Phase::Stopped);
        assert_eq!(row.namespace, "qa-shop");
        assert_eq!(
            row.images,
            ["shop/api:login-3f2a", "shop/web:login-3f2a", "sidecar:1"]
        );
        assert_eq!(row.urls, ["https://shop.example/api"]);
        assert_eq!(row.ports, ["30080/tcp", "http://*/", "javascript:alert(1)"]);
        assert_eq!(row.states, [("stopped", "Stop"), ("archived", "Archive")]);
        let row = StagingRow::of(&shop, true);
        assert_eq!(row.states, [("running", "Start"), ("archived", "Archive")]);
        assert!(StagingRow::of(&shop, false).states.is_empty());
        let archived = state_buttons(Kind::Staging, Some(Phase::Archived));
        assert_eq!(archived, [("running", "Restore")]);
        let running = state_buttons(Kind::Staging, Some(Phase::Running));
        assert_eq!(running, [("stopped", "Stop"), ("archived", "Archive")]);
    }

    #[test]
    fn a_step_says_how_it_ended_and_how_long_it_took() {
        let step = crate::queue::StepRecord {
            name: "build".into(),
            exit_code: Some(2),
            duration_ms: 2_500,
        };
        assert_eq!(step_line(&step), "build: exit code 2 in 2.5 s");
        let killed = crate::queue::StepRecord {
            exit_code: None,
            ..step
        };
        assert_eq!(step_line(&killed), "build: killed in 2.5 s");
    }

    #[test]
    fn a_row_says_its_state_in_words_and_tone() {
        let mut heap = object(Kind::Challenge, "heap", Phase::Running, Health::Healthy);
        heap.instances = Some(InstanceCounts {
            live: 3,
            pooled: 2,
            degraded: 0,
        });
        let row = ObjectRow::of(&heap);
        assert_eq!(row.href, "/objects/Challenge/heap");
        assert_eq!(
            (row.phase, row.health, row.tone),
            ("Running", "Healthy", "good")
        );
        assert_eq!(row.revision, short_revision("0123456789abcdef0123"));
        assert_eq!(row.instances.as_deref(), Some("3 live, 2 pooled"));
        assert_eq!(tone(Health::Healthy, Some(Phase::Failure)), "bad");
        assert_eq!(tone(Health::Healthy, Some(Phase::CreatePending)), "busy");
        assert_eq!(tone(Health::Unknown, Some(Phase::Stopped)), "none");
    }
}
