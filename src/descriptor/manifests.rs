//! A Staging's Kubernetes manifests: read from its folder in the repo (or from a chart's rendered
//! output), variables substituted, every document checked, each problem placed at its file, line
//! and column.
//!
//! Substitution is textual, before parsing, as Flux's `postBuild` and `envsubst` do, so a variable
//! can stand for a number as well as a string: `${tag}` and `${overrides.KEY}` (a key of
//! `overrides.app` or `overrides.staging`; `staging` wins). `$${` writes a literal `${`. Secret
//! overrides are never substituted: they live in the Secret [`SECRET_NAME`], which manifests
//! reference with `secretKeyRef` or `envFrom`, so no value is ever written into an object berth
//! shows. Each document must name its apiVersion, kind and name, stay in the staging's namespace,
//! and be of a namespaced kind (berth makes the namespace itself).
//!
//! A `chart:` is rendered with `helm template` when `helm` is on PATH, with the values `tag` and
//! `overrides`; its output goes through the same checks, and then through berth's own apply,
//! inventory and prune, as Argo CD treats charts. A chart that cannot be rendered is not a problem
//! of the revision: that one staging fails with the reason, and the others go on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::model::{StagingSpec, TagSource};
use super::yaml::{self, Position};

/// The Secret in a staging's namespace that holds its `overrides.secret` values.
pub const SECRET_NAME: &str = "berth-overrides";

/// Kinds that are not namespaced, and so cannot be part of a staging.
const CLUSTER_SCOPED: &[&str] = &[
    "APIService",
    "CertificateSigningRequest",
    "ClusterRole",
    "ClusterRoleBinding",
    "ComponentStatus",
    "CSIDriver",
    "CSINode",
    "CustomResourceDefinition",
    "IngressClass",
    "MutatingWebhookConfiguration",
    "Namespace",
    "Node",
    "PersistentVolume",
    "PodSecurityPolicy",
    "PriorityClass",
    "RuntimeClass",
    "StorageClass",
    "ValidatingWebhookConfiguration",
    "VolumeAttachment",
];

/// One object of a staging, ready to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Where it was written, relative to the repo's root (or `chart output`).
    pub file: String,
    /// The line its document starts on.
    pub line: usize,
    /// `apps/v1`.
    pub api_version: String,
    /// `Deployment`.
    pub kind: String,
    /// `metadata.name`.
    pub name: String,
    /// The whole object, variables substituted.
    pub object: Value,
    /// When it is a Helm hook to run around the apply: when, and on which applies.
    pub hook: Option<HookRun>,
}

/// The phase of a Helm hook (`helm.sh/hook`) berth runs, as Argo CD maps hooks to sync phases:
/// `pre-…` hooks before the other objects, `post-…` hooks after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// Before the other objects.
    Before,
    /// After them.
    After,
}

/// A hook's run: its phase, the applies it runs on (`install`: the staging is made; `upgrade`:
/// it is changed), and its `helm.sh/hook-weight` (hooks of a phase run lightest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookRun {
    /// Before or after the other objects.
    pub phase: Hook,
    /// Runs when the staging is made.
    pub on_install: bool,
    /// Runs when the staging is changed.
    pub on_upgrade: bool,
    /// Its weight.
    pub weight: i64,
}

/// The annotation Helm marks its hooks with.
pub const HOOK_ANNOTATION: &str = "helm.sh/hook";
/// The annotation that says when Helm deletes a hook.
pub const HOOK_DELETE_POLICY: &str = "helm.sh/hook-delete-policy";
/// The annotation that orders hooks of one phase.
pub const HOOK_WEIGHT: &str = "helm.sh/hook-weight";

/// Hook events berth leaves out: a chart's tests (only `helm test` runs them), and those of
/// delete and rollback, which berth never does the way Helm does.
const LEFT_OUT_EVENTS: &[&str] = &[
    "test",
    "test-success",
    "test-failure",
    "pre-delete",
    "post-delete",
    "pre-rollback",
    "post-rollback",
];

/// What an object of the manifests is to the staging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// An ordinary object: applied, observed, pruned.
    Object,
    /// A hook run around the apply.
    Hook(HookRun),
    /// A hook berth leaves out (see [`LEFT_OUT_EVENTS`]).
    LeftOut,
    /// A `helm.sh/hook` event Helm does not know (a typo): a problem, never a silent skip.
    Unknown(String),
}

impl Role {
    /// What `object` is, by its `helm.sh/hook` annotation. Pure.
    pub fn of(object: &Value) -> Role {
        let annotations = object.pointer("/metadata/annotations");
        let Some(events) = annotations
            .and_then(|a| a.get(HOOK_ANNOTATION))
            .and_then(Value::as_str)
        else {
            return Role::Object;
        };
        let events: Vec<&str> = events.split(',').map(str::trim).collect();
        let known = ["pre-install", "post-install", "pre-upgrade", "post-upgrade"];
        if let Some(unknown) = events
            .iter()
            .find(|e| !known.contains(e) && !LEFT_OUT_EVENTS.contains(e))
        {
            return Role::Unknown(unknown.to_string());
        }
        let has = |event: &str| events.contains(&event);
        let phase = if has("pre-install") || has("pre-upgrade") {
            Hook::Before
        } else if has("post-install") || has("post-upgrade") {
            Hook::After
        } else {
            return Role::LeftOut;
        };
        let (install, upgrade) = match phase {
            Hook::Before => ("pre-install", "pre-upgrade"),
            Hook::After => ("post-install", "post-upgrade"),
        };
        let weight = annotations
            .and_then(|a| a.get(HOOK_WEIGHT))
            .and_then(|w| match w {
                Value::String(text) => text.trim().parse().ok(),
                other => other.as_i64(),
            })
            .unwrap_or(0);
        Role::Hook(HookRun {
            phase,
            on_install: has(install),
            on_upgrade: has(upgrade),
            weight,
        })
    }

    fn hook(&self) -> Option<HookRun> {
        match self {
            Role::Hook(hook) => Some(*hook),
            _ => None,
        }
    }
}

impl Hook {
    /// `pre` or `post`, for messages and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Before => "pre",
            Hook::After => "post",
        }
    }
}

impl Manifest {
    /// `Deployment/shop`: how plans and status name the object.
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

/// The manifests of one staging, or why they could not be made (a chart that did not render).
pub type Rendered = Result<Arc<Vec<Manifest>>, RenderFailure>;

/// Why a staging's objects could not be made: that staging fails with it, the others go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderFailure {
    /// The chart's values could not be written for helm.
    #[error("cannot write the chart's values: {0}")]
    Values(String),
    /// A variable in the chart's `values` cannot be substituted.
    #[error("{field}: {message}")]
    Substitution {
        /// The field, dotted (`spec.values.image.tag`).
        field: String,
        /// Why.
        message: String,
    },
    /// helm is not installed.
    #[error(
        "cannot render chart {0}: helm is not on PATH; install helm 3 on the agent's host, or render the chart into a manifests folder"
    )]
    NoHelm(String),
    /// helm could not be started.
    #[error("cannot render chart {chart}: cannot run helm: {why}")]
    HelmUnstartable {
        /// The chart.
        chart: String,
        /// Why.
        why: String,
    },
    /// `helm template` failed.
    #[error("cannot render chart {chart}: helm template {status}: {said}")]
    HelmFailed {
        /// The chart.
        chart: String,
        /// How helm ended.
        status: String,
        /// Its first lines of complaint.
        said: String,
    },
    /// The chart rendered nothing: applying that would empty the staging.
    #[error(
        "chart {0} renders no objects; check its templates and values (berth will not empty a staging because a chart rendered nothing)"
    )]
    Empty(String),
    /// What the chart rendered has problems: how many, and the first.
    #[error(
        "chart {chart} renders {count} problem(s); the first, at line {line} of helm's output: {first}"
    )]
    Problems {
        /// The chart.
        chart: String,
        /// How many.
        count: usize,
        /// The line of helm's output the first is at.
        line: usize,
        /// The first.
        first: String,
    },
    /// A manifest of its folder has a problem, at its place.
    #[error("{}:{}:{}: {}", .0.file, .0.at.line, .0.at.column, .0.message)]
    Manifest(ManifestProblem),
    /// The loader did not render them (a bug in berth).
    #[error("the staging's manifests were not read (a bug in berth)")]
    NotRead,
}

/// Something wrong in a manifest, at its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestProblem {
    /// The file, relative to the repo's root.
    pub file: String,
    /// Where.
    pub at: Position,
    /// What is wrong and what to do.
    pub message: String,
}

/// The values a staging's manifests may use.
#[derive(Debug, Clone, Default)]
pub struct Variables<'a> {
    /// `${tag}`.
    pub tag: Tag<'a>,
    /// `${overrides.KEY}`.
    pub overrides: BTreeMap<&'a str, &'a str>,
    /// Keys of `overrides.secret`: named only to say how to use them instead.
    pub secrets: BTreeSet<&'a str>,
}

impl<'a> Variables<'a> {
    /// The variables `spec` gives its manifests.
    pub fn of(spec: &'a StagingSpec) -> Variables<'a> {
        let mut overrides: BTreeMap<&str, &str> = BTreeMap::new();
        for (key, value) in spec.overrides.app.iter().chain(&spec.overrides.staging) {
            overrides.insert(key, value);
        }
        Variables {
            tag: match &spec.tag {
                None => Tag::Unset,
                Some(TagSource::Tag(tag)) => Tag::Set(tag),
                Some(TagSource::FromPipeline(_)) => Tag::Pending,
            },
            overrides,
            secrets: spec.overrides.secret.keys().map(String::as_str).collect(),
        }
    }
}

/// A chart's `values` with every variable substituted in its strings, or the first variable that
/// cannot be (with the JSON pointer of its string). Pure.
pub fn substituted_values(
    values: &serde_json::Map<String, Value>,
    variables: &Variables<'_>,
) -> Result<serde_json::Map<String, Value>, (String, String)> {
    fn walk(
        value: &Value,
        pointer: &str,
        variables: &Variables<'_>,
    ) -> Result<Value, (String, String)> {
        Ok(match value {
            Value::String(text) => {
                let substituted =
                    substitute(text, |_, name| lookup(name, variables).map(str::to_string));
                match substituted {
                    Ok((text, _)) => Value::String(text),
                    Err(problems) => {
                        let message = problems
                            .into_iter()
                            .next()
                            .map(|(_, m)| m)
                            .unwrap_or_default();
                        return Err((pointer.to_string(), message));
                    }
                }
            }
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| walk(item, &format!("{pointer}/{index}"), variables))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(key, item)| {
                        let pointer =
                            format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1"));
                        Ok((key.clone(), walk(item, &pointer, variables)?))
                    })
                    .collect::<Result<_, (String, String)>>()?,
            ),
            other => other.clone(),
        })
    }
    match walk(&Value::Object(values.clone()), "/spec/values", variables)? {
        Value::Object(map) => Ok(map),
        _ => unreachable!("an object stays an object"),
    }
}

/// Whether a chart staging's `tag` reaches the chart: some template reads `.Values.tag`, or a
/// string of `values` holds `${tag}`. A chart that reads `image.tag` would not see it otherwise.
pub fn chart_reads_tag(root: &Path, chart: &str, spec: &StagingSpec) -> bool {
    let in_values = spec
        .values
        .as_ref()
        .is_some_and(|values| Value::Object(values.clone()).to_string().contains("${tag}"));
    in_values || templates_read(&root.join(chart).join("templates"), ".Values.tag")
}

/// Whether a file under `folder` holds `needle`.
fn templates_read(folder: &Path, needle: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => templates_read(&path, needle),
            Ok(kind) if kind.is_file() => {
                std::fs::read_to_string(&path).is_ok_and(|t| t.contains(needle))
            }
            _ => false,
        }
    })
}

/// A staging's `${tag}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tag<'a> {
    /// The staging sets none: reading `${tag}` is a problem.
    #[default]
    Unset,
    /// It comes from a Pipeline that has produced nothing yet: the staging waits for it.
    Pending,
    /// This tag.
    Set(&'a str),
}

impl<'a> Tag<'a> {
    /// The tag, or `pending` while a Pipeline has produced none (the staging waits meanwhile).
    fn or_pending(self) -> Option<&'a str> {
        match self {
            Tag::Unset => None,
            Tag::Pending => Some("pending"),
            Tag::Set(tag) => Some(tag),
        }
    }
}

/// Where a staging's manifests go.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The staging's namespace.
    pub namespace: &'a str,
    /// Largest file read, in bytes.
    pub max_file_size: u64,
}

/// What a chart is told of the cluster it goes to, as `helm template --kube-version
/// --api-versions` tell it: the server's version, and every `group/version` and
/// `group/version/Kind` it serves. So a chart's `kubeVersion` and its `.Capabilities` checks
/// answer for that cluster, not for helm's own defaults (as Argo CD renders for its destination).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterFacts {
    /// The server's version, `v1.20.2`.
    pub kube_version: String,
    /// What it serves, sorted.
    pub api_versions: Vec<String>,
}

/// How a staging's manifests are rendered, beyond its spec: the largest file read, and the
/// cluster a chart is rendered for (`None`: none known, as for `berth validate`; helm's defaults).
#[derive(Debug, Clone, Default)]
pub struct Rendering {
    /// Largest file read, in bytes.
    pub max_file_size: u64,
    /// The cluster charts are rendered for.
    pub cluster: Option<Arc<ClusterFacts>>,
}

/// The manifests of `spec`: its folder rendered, or its chart. Problems in the folder's files are
/// the revision's problems; a chart that does not render is that staging's failure.
pub fn render(
    root: &Path,
    spec: &StagingSpec,
    rendering: &Rendering,
) -> Result<Rendered, Vec<ManifestProblem>> {
    let variables = Variables::of(spec);
    let target = Target {
        namespace: spec.namespace.as_str(),
        max_file_size: rendering.max_file_size,
    };
    match (&spec.manifests, &spec.chart) {
        (Some(folder), _) => {
            render_folder(root, folder, target, &variables).map(|m| Ok(Arc::new(m)))
        }
        (None, Some(chart)) => Ok(render_chart(
            root,
            chart,
            spec,
            (target, rendering.cluster.as_deref()),
            &variables,
        )),
        (None, None) => Ok(Ok(Arc::new(Vec::new()))),
    }
}

/// Runs `helm template` on `chart` and checks its output. Values go in as helm merges them, each
/// over the ones before: berth's own (`tag`, `overrides`), `valuesFiles` in order, `values`.
fn render_chart(
    root: &Path,
    chart: &str,
    spec: &StagingSpec,
    (target, cluster): (Target<'_>, Option<&ClusterFacts>),
    variables: &Variables<'_>,
) -> Rendered {
    let written = |values: &Value| -> Result<tempfile::NamedTempFile, RenderFailure> {
        let failed = |error: std::io::Error| RenderFailure::Values(error.to_string());
        let mut file = tempfile::NamedTempFile::new().map_err(failed)?;
        std::io::Write::write_all(&mut file, values.to_string().as_bytes()).map_err(failed)?;
        Ok(file)
    };
    let own = written(&serde_json::json!({
        "tag": variables.tag.or_pending(),
        "overrides": variables.overrides,
    }))?;
    let values = match &spec.values {
        Some(values) => {
            let values = substituted_values(values, variables).map_err(|(pointer, message)| {
                RenderFailure::Substitution {
                    field: super::schema::dotted(&pointer),
                    message,
                }
            })?;
            Some(written(&Value::Object(values))?)
        }
        None => None,
    };
    let mut command = std::process::Command::new("helm");
    command
        .args([
            "template",
            "berth",
            chart,
            "--namespace",
            target.namespace,
            "--values",
        ])
        .arg(own.path());
    for file in &spec.values_files {
        // Checked at validate to be a file inside the repo.
        command.arg("--values").arg(root.join(file));
    }
    if let Some(values) = &values {
        command.arg("--values").arg(values.path());
    }
    if let Some(cluster) = cluster {
        command.args(["--kube-version", &cluster.kube_version]);
        if !cluster.api_versions.is_empty() {
            command.args(["--api-versions", &cluster.api_versions.join(",")]);
        }
    }
    let output = command
        .current_dir(root)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => RenderFailure::NoHelm(chart.into()),
            _ => RenderFailure::HelmUnstartable {
                chart: chart.into(),
                why: error.to_string(),
            },
        })?;
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stderr);
        let said: Vec<&str> = said
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(5)
            .collect();
        return Err(RenderFailure::HelmFailed {
            chart: chart.into(),
            status: output.status.to_string(),
            said: said.join("; "),
        });
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let origin = format!("{chart} (rendered)");
    let (manifests, problems) = documents(&origin, yaml::parse(&text, true), target);
    match problems.first() {
        // Nothing rendered would mean deleting everything the staging has.
        None if manifests.is_empty() => Err(RenderFailure::Empty(chart.into())),
        None => Ok(Arc::new(manifests)),
        Some(first) => Err(RenderFailure::Problems {
            chart: chart.into(),
            count: problems.len(),
            line: first.at.line,
            first: first.message.clone(),
        }),
    }
}

/// Reads every `.yaml`, `.yml` and `.json` file under `folder` (sorted, hidden ones skipped),
/// substitutes `variables`, and checks each document.
pub fn render_folder(
    root: &Path,
    folder: &str,
    target: Target<'_>,
    variables: &Variables<'_>,
) -> Result<Vec<Manifest>, Vec<ManifestProblem>> {
    let mut files = Vec::new();
    let base = root.join(folder);
    let mut problems = Vec::new();
    let ignored = [berthignore(root), berthignore(&base)];
    collect(&base, &ignored, &mut files).map_err(|error| {
        vec![ManifestProblem {
            file: folder.to_string(),
            at: Position { line: 1, column: 1 },
            message: format!("cannot read the manifests folder: {error}"),
        }]
    })?;
    files.sort();
    let mut manifests = Vec::new();
    for path in files {
        let relative = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .replace('\\', "/");
        let size = path.metadata().map(|m| m.len()).unwrap_or(0);
        if size > target.max_file_size {
            problems.push(ManifestProblem {
                file: relative,
                at: Position { line: 1, column: 1 },
                message: format!(
                    "the file has {size} bytes, more than the {} a manifest may have; split it",
                    target.max_file_size
                ),
            });
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let (found, wrong) = render_text(&relative, &text, target, variables);
                manifests.extend(found);
                problems.extend(wrong);
            }
            Err(error) => problems.push(ManifestProblem {
                file: relative,
                at: Position { line: 1, column: 1 },
                message: format!("cannot read the file: {error}"),
            }),
        }
    }
    problems.extend(duplicates(&manifests));
    if manifests.is_empty() && problems.is_empty() {
        problems.push(ManifestProblem {
            file: folder.to_string(),
            at: Position { line: 1, column: 1 },
            message:
                "the manifests folder holds no Kubernetes objects (.yaml, .yml or .json files)"
                    .into(),
        });
    }
    if problems.is_empty() {
        Ok(manifests)
    } else {
        Err(problems)
    }
}

/// The patterns of `FOLDER/.berthignore`, relative to `folder` (none when it has no such file).
pub(super) fn berthignore(folder: &Path) -> ignore::gitignore::Gitignore {
    let mut builder = ignore::gitignore::GitignoreBuilder::new(folder);
    let path = folder.join(".berthignore");
    if path.is_file() {
        // A broken pattern is skipped; the rest still apply.
        let _ = builder.add(path);
    }
    builder
        .build()
        .unwrap_or_else(|_| ignore::gitignore::Gitignore::empty())
}

/// The manifest files under `folder`, but those that a `.berthignore` (the repo's, or the
/// folder's own) leaves out: an upstream example's `all-in-one/` that repeats its other files.
fn collect(
    folder: &Path,
    ignored: &[ignore::gitignore::Gitignore],
    files: &mut Vec<std::path::PathBuf>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(folder)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let kind = entry.file_type()?;
        let path = entry.path();
        if ignored.iter().any(|patterns| {
            path.starts_with(patterns.path())
                && patterns
                    .matched_path_or_any_parents(&path, kind.is_dir())
                    .is_ignore()
        }) {
            continue;
        }
        if kind.is_dir() {
            collect(&path, ignored, files)?;
        } else if kind.is_file()
            && [".yaml", ".yml", ".json"]
                .iter()
                .any(|ext| name.ends_with(ext))
        {
            files.push(entry.path());
        }
    }
    Ok(())
}

/// Substitutes and checks one file's documents (or a chart's output, named `file`).
pub fn render_text(
    file: &str,
    text: &str,
    target: Target<'_>,
    variables: &Variables<'_>,
) -> (Vec<Manifest>, Vec<ManifestProblem>) {
    let problem = |at: Position, message: String| ManifestProblem {
        file: file.to_string(),
        at,
        message,
    };
    let substituted = substitute(text, |_, name| lookup(name, variables).map(str::to_string));
    match substituted {
        Ok((substituted, occurrences)) => {
            // Read once, with positions: the shape check and the manifests share it.
            let read = yaml::parse(&substituted, true);
            if let Err((at, message)) = shape_kept(text, &read, &occurrences) {
                return (Vec::new(), vec![problem(at, message)]);
            }
            documents(file, read, target)
        }
        Err(found) => (
            Vec::new(),
            found.into_iter().map(|(at, m)| problem(at, m)).collect(),
        ),
    }
}

/// A text with its variables replaced, and where each one stood.
type Substituted = (String, Vec<Occurrence>);

/// One `${…}` replaced in a text, and what it was replaced with.
#[derive(Debug, Clone)]
struct Occurrence {
    at: Position,
    name: String,
    value: String,
}

/// Checks that substituting changed no manifest's shape: with each variable replaced by a marker
/// (plain letters, one scalar wherever they stand) the text must parse into the same documents,
/// mappings and sequences as the substituted text did (`actual`), each variable standing for one scalar (or, in a
/// key, for the key its value makes). A value with a line break, `: `, `- `, `{`, `,` or a quote
/// that would add a key, an item or a whole document (a RoleBinding, a privileged Pod) is refused
/// at the variable that carried it.
fn shape_kept(
    text: &str,
    actual: &yaml::Stream,
    occurrences: &[Occurrence],
) -> Result<(), (Position, String)> {
    if occurrences.is_empty() {
        return Ok(());
    }
    let mut marker = String::from("berthvalue");
    while text.contains(&marker) {
        marker.push('x');
    }
    let markers = Markers {
        marker: &marker,
        occurrences,
    };
    let Ok((marked, _)) = substitute(text, |index, _| Ok(markers.of(index))) else {
        return Ok(());
    };
    let blame = |index: Option<usize>| {
        let occurrence = index
            .and_then(|i| occurrences.get(i))
            .unwrap_or(&occurrences[0]);
        let whose = match index {
            Some(_) => format!("the value of ${{{}}}", occurrence.name),
            None => "a value substituted here".to_string(),
        };
        (
            occurrence.at,
            format!(
                "{whose} changes the manifest's shape (a line break, or YAML syntax such as `: `, `- `, `{{`, `,`, `#` or a quote); a value stands for one scalar, so change the value"
            ),
        )
    };
    let template = marked_template(&marked);
    match (template.fatal.is_some(), actual.fatal.is_some()) {
        // The text itself is not YAML: parsing the substituted text reports it.
        (true, true) => return Ok(()),
        // Only a value made it YAML (`key: |${X}`): its shape is the value's, never allowed.
        (true, false) => return Err(blame(None)),
        (false, true) => return Err(blame(None)),
        (false, false) => {}
    }
    if actual.documents.len() != template.documents.len() {
        return Err(blame(None));
    }
    for (template, actual) in template.documents.iter().zip(&actual.documents) {
        markers
            .same_shape(&template.value, &actual.value)
            .map_err(|index| blame(index.or_else(|| markers.first_in(&template.value))))?;
    }
    Ok(())
}

/// `marked` (a manifest's text with its variables replaced by markers) parsed. It is the same for
/// every staging that renders the text, whatever their values, so each thread remembers the last
/// few small ones: fifty stagings of one app parse its manifests' shape once, not fifty times.
fn marked_template(marked: &str) -> std::rc::Rc<yaml::Stream> {
    use std::rc::Rc;
    /// Texts remembered per thread, and the longest remembered: at most 8 × 16 KiB of text and
    /// its trees, on threads that load (the agent's pass, or a loader's readers).
    const REMEMBERED: usize = 8;
    const LONGEST: usize = 16 * 1024;
    thread_local! {
        static RECENT: super::recent::Recent<Rc<yaml::Stream>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    let parse = |text: &str| Rc::new(yaml::parse(text, false));
    match marked.len() > LONGEST {
        true => parse(marked),
        false => super::recent::remembered(&RECENT, REMEMBERED, marked, parse),
    }
}

/// `text` as YAML reads a number: decimal, or `0x`/`0o` integers.
fn parsed_number(text: &str) -> Option<f64> {
    let text = text.trim().replace('_', "");
    if let Some(hex) = text.strip_prefix("0x") {
        return i64::from_str_radix(hex, 16).ok().map(|n| n as f64);
    }
    if let Some(octal) = text.strip_prefix("0o") {
        return i64::from_str_radix(octal, 8).ok().map(|n| n as f64);
    }
    text.parse().ok()
}

/// The markers that stand for the variables of one text while its shape is checked.
struct Markers<'a> {
    marker: &'a str,
    occurrences: &'a [Occurrence],
}

impl Markers<'_> {
    /// The marker of the variable at `index`: letters, digits, then `q`, so it ends clearly.
    fn of(&self, index: usize) -> String {
        format!("{}{index}q", self.marker)
    }

    /// The index of the first marker in `text`.
    fn first(&self, text: &str) -> Option<usize> {
        let at = text.find(self.marker)? + self.marker.len();
        self.index_at(&text[at..]).map(|(index, _)| index)
    }

    /// The index that `after` (the text after a marker) starts with, and how long it is with
    /// its closing `q`.
    fn index_at(&self, after: &str) -> Option<(usize, usize)> {
        let digits = after.chars().take_while(char::is_ascii_digit).count();
        let index = after[..digits].parse().ok()?;
        after[digits..]
            .starts_with('q')
            .then_some((index, digits + 1))
    }

    /// `text` with each marker replaced by its variable's value, in one pass over `text`.
    fn expand(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find(self.marker) {
            out.push_str(&rest[..at]);
            let after = &rest[at + self.marker.len()..];
            let value = self
                .index_at(after)
                .and_then(|(index, length)| Some((self.occurrences.get(index)?, length)));
            match value {
                Some((occurrence, length)) => {
                    out.push_str(&occurrence.value);
                    rest = &after[length..];
                }
                None => {
                    out.push_str(self.marker);
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// The first variable (by index) whose marker is in `value`, keys included.
    fn first_in(&self, value: &Value) -> Option<usize> {
        match value {
            Value::String(text) => self.first(text),
            Value::Array(items) => items.iter().find_map(|v| self.first_in(v)),
            Value::Object(map) => map
                .iter()
                .find_map(|(k, v)| self.first(k).or_else(|| self.first_in(v))),
            _ => None,
        }
    }

    /// `Ok` when `actual` is `template` with each marked scalar replaced by one scalar and each
    /// marked key by the key its value makes; otherwise the variable to blame, when known.
    fn same_shape(&self, template: &Value, actual: &Value) -> Result<(), Option<usize>> {
        match (template, actual) {
            // One scalar, and the very one the values make: a value that closes a quote and
            // writes a key of its own (a merge key `<<` overriding another) makes another.
            (Value::String(text), actual) if text.contains(self.marker) => {
                let expanded = self.expand(text);
                let same = match actual {
                    Value::String(actual) => *actual == expanded,
                    // `1.10` reads as the number 1.1, `0x1F` as 31: compared as numbers.
                    Value::Number(number) => {
                        number.to_string() == expanded
                            || parsed_number(&expanded)
                                .zip(number.as_f64())
                                .is_some_and(|(a, b)| a == b)
                    }
                    Value::Bool(flag) => expanded.eq_ignore_ascii_case(&flag.to_string()),
                    Value::Null => matches!(expanded.as_str(), "" | "~" | "null" | "Null" | "NULL"),
                    Value::Array(_) | Value::Object(_) => false,
                };
                match same {
                    true => Ok(()),
                    false => Err(self.first(text)),
                }
            }
            (Value::Array(template), Value::Array(actual)) if template.len() == actual.len() => {
                for (t, a) in template.iter().zip(actual) {
                    self.same_shape(t, a)?;
                }
                Ok(())
            }
            (Value::Object(template), Value::Object(actual)) if template.len() == actual.len() => {
                for (key, value) in template {
                    let (wanted, blamed) = match key.contains(self.marker) {
                        true => (self.expand(key), self.first(key)),
                        false => (key.clone(), None),
                    };
                    let Some(found) = actual.get(&wanted) else {
                        return Err(blamed.or_else(|| self.first_in(value)));
                    };
                    self.same_shape(value, found)?;
                }
                Ok(())
            }
            (template, actual) if template == actual => Ok(()),
            // Keys or items added or gone: the variable inside this node is to blame.
            (template, _) => Err(self.first_in(template)),
        }
    }
}

/// Checks the documents of `stream`, read from the file `file`, as they are.
fn documents(
    file: &str,
    stream: yaml::Stream,
    target: Target<'_>,
) -> (Vec<Manifest>, Vec<ManifestProblem>) {
    let problem = |at: Position, message: String| ManifestProblem {
        file: file.to_string(),
        at,
        message,
    };
    let mut manifests = Vec::new();
    let mut problems: Vec<ManifestProblem> = Vec::new();
    if let Some(fatal) = stream.fatal {
        problems.push(problem(fatal.at, fatal.message));
    }
    for document in stream.documents {
        problems.extend(
            document
                .problems
                .iter()
                .map(|p| problem(p.at, p.message.clone())),
        );
        if document.value.is_null() {
            continue;
        }
        let at = |pointer: &str| {
            document
                .positions
                .get(pointer)
                .map_or(document.start, |p| p.value)
        };
        match check(document.value, target.namespace) {
            Ok((api_version, kind, name, object)) => match Role::of(&object) {
                // A chart's tests, and what helm runs only on delete or rollback, are not part
                // of what the staging runs.
                Role::LeftOut => {}
                Role::Unknown(event) => problems.push(problem(
                    at("/metadata/annotations"),
                    format!(
                        "{HOOK_ANNOTATION}: \"{event}\" is no event Helm knows; write pre-install, post-install, pre-upgrade, post-upgrade, or test, pre-delete, post-delete, pre-rollback, post-rollback (which berth leaves out)"
                    ),
                )),
                role => manifests.push(Manifest {
                    file: file.to_string(),
                    line: document.start.line,
                    api_version,
                    kind,
                    name,
                    object,
                    hook: role.hook(),
                }),
            },
            Err(found) => problems.extend(
                found
                    .into_iter()
                    .map(|(pointer, message)| problem(at(pointer), message)),
            ),
        }
    }
    (manifests, problems)
}

type Identity = (String, String, String, Value);

/// Checks one document: its identity, namespace and scope. Problems come with the JSON pointer
/// of the node they are about.
fn check(object: Value, namespace: &str) -> Result<Identity, Vec<(&'static str, String)>> {
    if !object.is_object() {
        return Err(vec![(
            "",
            "a manifest must be a mapping with apiVersion, kind and metadata.name".into(),
        )]);
    }
    let text = |pointer: &str| {
        object
            .pointer(pointer)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let mut found = Vec::new();
    let api_version = text("/apiVersion");
    let kind = text("/kind");
    let name = text("/metadata/name");
    if api_version.is_none() {
        found.push((
            "",
            "the object has no apiVersion; add one, e.g. apiVersion: apps/v1".into(),
        ));
    }
    if kind.is_none() {
        found.push((
            "",
            "the object has no kind; add one, e.g. kind: Deployment".into(),
        ));
    }
    if name.is_none() {
        found.push((
            "/metadata",
            "the object has no metadata.name; every object needs a name".into(),
        ));
    }
    if let Some(kind) = &kind {
        if CLUSTER_SCOPED.contains(&kind.as_str()) {
            found.push((
                "/kind",
                format!(
                    "{kind} is cluster-scoped, and a staging holds only objects of its own namespace (berth makes the namespace itself); remove it"
                ),
            ));
        } else if kind.ends_with("List") {
            found.push((
                "/kind",
                format!("{kind}: write each object as a document of its own (separated by ---)"),
            ));
        }
    }
    if let Some(theirs) = object.pointer("/metadata/namespace")
        && theirs.as_str() != Some(namespace)
    {
        found.push((
            "/metadata/namespace",
            format!(
                "the object is in namespace {}, but the staging's namespace is {namespace}; remove metadata.namespace (berth sets it)",
                theirs.as_str().map_or_else(|| theirs.to_string(), str::to_string)
            ),
        ));
    }
    if kind.as_deref() == Some("Secret") && name.as_deref() == Some(SECRET_NAME) {
        found.push((
            "/metadata/name",
            format!(
                "{SECRET_NAME} is the Secret berth makes from spec.overrides.secret; name this one otherwise"
            ),
        ));
    }
    if let Some(labels) = object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
    {
        for key in labels.keys().filter(|k| k.starts_with("berth.")) {
            found.push((
                "/metadata/labels",
                format!("label {key}: labels starting with \"berth.\" are berth's own; choose another key"),
            ));
        }
    }
    match (api_version, kind, name) {
        (Some(api_version), Some(kind), Some(name)) if found.is_empty() => {
            Ok((api_version, kind, name, object))
        }
        _ => Err(found),
    }
}

/// Two documents naming the same object: the same kind and name, whatever the API group. A kind
/// served under two groups (an Ingress in `extensions/v1beta1` and in `networking.k8s.io/v1`) is
/// one object to the server, so two documents of it would overwrite each other on every pass; and
/// berth tells a staging's objects apart by kind and name, so two kinds of one name from different
/// groups (an Istio `Gateway` and a Gateway API one) are refused too, rather than confused.
fn duplicates(manifests: &[Manifest]) -> Vec<ManifestProblem> {
    let mut seen: HashMap<(&str, &str), &Manifest> = HashMap::new();
    let mut problems = Vec::new();
    for manifest in manifests {
        let key = (manifest.kind.as_str(), manifest.name.as_str());
        if let Some(first) = seen.insert(key, manifest) {
            problems.push(ManifestProblem {
                file: manifest.file.clone(),
                at: Position {
                    line: manifest.line,
                    column: 1,
                },
                message: format!(
                    "{} is also defined at {}:{}; keep one",
                    manifest.id(),
                    first.file,
                    first.line
                ),
            });
        }
    }
    problems
}

/// Replaces each `${NAME}` with what `value` gives for it (called with the occurrence's index and
/// the name); every variable that cannot be replaced is a problem at its line and column.
fn substitute(
    text: &str,
    value: impl Fn(usize, &str) -> Result<String, String>,
) -> Result<Substituted, Vec<(Position, String)>> {
    if !text.contains("${") {
        return Ok((text.to_string(), Vec::new()));
    }
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    let mut occurrences = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        let mut column = 1;
        while let Some(at) = rest.find("${") {
            let escaped = at > 0 && rest.as_bytes()[at - 1] == b'$';
            let before = &rest[..at];
            column += before.chars().count();
            let position = Position {
                line: index + 1,
                column,
            };
            if escaped {
                out.push_str(&before[..before.len() - 1]);
                out.push_str("${");
                rest = &rest[at + 2..];
                column += 2;
                continue;
            }
            out.push_str(before);
            let Some(end) = rest[at..].find('}') else {
                problems.push((
                    position,
                    "\"${\" without a closing \"}\"; write $${ for a literal ${".to_string(),
                ));
                rest = &rest[at + 2..];
                column += 2;
                continue;
            };
            let name = &rest[at + 2..at + end];
            let replaced = match value(occurrences.len(), name) {
                Ok(value) => value,
                Err(message) => {
                    problems.push((position, message));
                    String::new()
                }
            };
            out.push_str(&replaced);
            occurrences.push(Occurrence {
                at: position,
                name: name.to_string(),
                value: replaced,
            });
            column += rest[at..at + end + 1].chars().count();
            rest = &rest[at + end + 1..];
        }
        out.push_str(rest);
    }
    if problems.is_empty() {
        Ok((out, occurrences))
    } else {
        Err(problems)
    }
}

fn lookup<'v>(name: &str, variables: &Variables<'v>) -> Result<&'v str, String> {
    if name == "tag" {
        // A tag from a Pipeline is not known until it has produced an image; the staging waits
        // until then, so what stands in for it is never applied.
        return variables.tag.or_pending().ok_or_else(|| {
            "${tag} is read here, but the Staging sets no spec.tag; add one (a tag, or {fromPipeline: NAME}), or write $${ for a literal ${".to_string()
        });
    }
    if let Some(key) = name.strip_prefix("overrides.") {
        if let Some(value) = variables.overrides.get(key) {
            return Ok(value);
        }
        if variables.secrets.contains(key) {
            return Err(format!(
                "${{{name}}} is a secret override, and secrets are never written into manifests; use valueFrom: {{secretKeyRef: {{name: {SECRET_NAME}, key: {key}}}}}"
            ));
        }
        return Err(format!(
            "${{{name}}} is not defined; add {key} to spec.overrides.app or spec.overrides.staging, or write $${{ for a literal ${{"
        ));
    }
    Err(format!(
        "${{{name}}} is not a variable berth knows; use ${{tag}} or ${{overrides.KEY}}, or write $${{ for a literal ${{"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Variables<'static> {
        Variables {
            tag: Tag::Set("v2"),
            overrides: BTreeMap::from([("LOG_LEVEL", "debug"), ("REPLICAS", "2")]),
            secrets: BTreeSet::from(["DB_PASSWORD"]),
        }
    }

    const TARGET: Target<'static> = Target {
        namespace: "stg",
        max_file_size: 1 << 20,
    };

    #[test]
    fn variables_are_substituted_before_parsing_so_numbers_stay_numbers() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: ${overrides.REPLICAS}\n  image: shop:${tag}\n  note: cost $${HOME}\n";
        let (manifests, problems) = render_text("m.yaml", text, TARGET, &vars());
        assert!(problems.is_empty(), "{problems:?}");
        let object = &manifests[0].object;
        assert_eq!(object.pointer("/spec/replicas"), Some(&Value::from(2)));
        assert_eq!(object.pointer("/spec/image"), Some(&Value::from("shop:v2")));
        assert_eq!(
            object.pointer("/spec/note"),
            Some(&Value::from("cost ${HOME}"))
        );
    }

    #[test]
    fn a_substituted_value_is_one_scalar_and_never_adds_keys_items_or_documents() {
        let with = |key: &'static str, value: &'static str| Variables {
            tag: Tag::Set("v2"),
            overrides: BTreeMap::from([(key, value)]),
            secrets: BTreeSet::new(),
        };
        let config = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  note: ${overrides.NOTE}\n  quoted: \"a-${overrides.NOTE}\"\n  flow: {x: ${overrides.NOTE}}\n  list: [${overrides.NOTE}]\n";
        let attacks = [
            // A whole document: a RoleBinding to cluster-admin.
            "x\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: own}\nroleRef: {kind: ClusterRole, name: cluster-admin, apiGroup: rbac.authorization.k8s.io}",
            // A key beside the variable's.
            "x\n  injected: yes",
            // Flow syntax: a key or an item of its own.
            "x, y: z",
            "x]\n  evil: [1",
            // A mapping or a sequence where a scalar stood.
            "{a: 1}",
            "[1, 2]",
        ];
        for attack in attacks {
            let (manifests, problems) =
                render_text("m.yaml", config, TARGET, &with("NOTE", attack));
            assert!(manifests.is_empty(), "{attack:?}: {manifests:?}");
            assert_eq!(problems.len(), 1, "{attack:?}: {problems:?}");
            assert_eq!(problems[0].at.line, 5, "{attack:?}: {problems:?}");
            assert!(
                problems[0].message.contains("changes the manifest's shape"),
                "{attack:?}: {problems:?}"
            );
        }
        // What a value may be: any one scalar, with colons, dashes, quotes and numbers.
        for fine in [
            "https://shop.example:8443/x",
            "a-b_c.d",
            "2",
            "true",
            "it's",
            "50%",
        ] {
            let (manifests, problems) = render_text("m.yaml", config, TARGET, &with("NOTE", fine));
            assert!(problems.is_empty(), "{fine:?}: {problems:?}");
            assert_eq!(manifests.len(), 1);
        }
        // The marked text is remembered between stagings that render it: a hostile value after
        // fine ones is refused all the same.
        let (manifests, problems) =
            render_text("m.yaml", config, TARGET, &with("NOTE", attacks[1]));
        assert!(manifests.is_empty(), "{manifests:?}");
        assert_eq!(problems.len(), 1, "{problems:?}");
        // A variable in a key: the key its value makes, and what is under it, are checked too.
        let keyed = |key: &'static str, mode: &'static str| Variables {
            tag: Tag::Set("v2"),
            overrides: BTreeMap::from([("K", key), ("M", mode)]),
            secrets: BTreeSet::new(),
        };
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  app-${overrides.K}: {mode: ${overrides.M}}\n";
        let (manifests, problems) = render_text("m.yaml", text, TARGET, &keyed("web", "ro"));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            manifests[0].object.pointer("/data/app-web/mode"),
            Some(&Value::from("ro"))
        );
        let (_, problems) = render_text(
            "m.yaml",
            text,
            TARGET,
            &keyed("web", "ro, privileged: true"),
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].message.contains("${overrides.M}"),
            "{problems:?}"
        );
        let (_, problems) = render_text("m.yaml", text, TARGET, &keyed("web: {x: 1}, b", "ro"));
        assert_eq!(problems.len(), 1, "{problems:?}");
        // A value that closes its quote and writes a merge key over another key: the key count
        // stays, but the scalar is not the one the value makes.
        let quoted = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: \"${overrides.NOTE}\", image: \"app:${tag}\"}\n";
        let (_, problems) = render_text(
            "m.yaml",
            quoted,
            TARGET,
            &with("NOTE", "\", <<: {image: evil}} #"),
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        let (manifests, problems) = render_text("m.yaml", quoted, TARGET, &with("NOTE", "fine"));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            manifests[0].object.pointer("/data/image"),
            Some(&Value::from("app:v2"))
        );
        // A text that is YAML only with the value in it is refused, never let through.
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  note: |${overrides.NOTE}\n    text\n";
        let (_, problems) = render_text("m.yaml", text, TARGET, &with("NOTE", ""));
        assert_eq!(problems.len(), 1, "{problems:?}");
        // A tag from a Pipeline is substituted the same way.
        let image =
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  image: shop:${tag}\n";
        let variables = Variables {
            tag: Tag::Set("v1\n  extra: key"),
            ..Variables::default()
        };
        let (_, problems) = render_text("m.yaml", image, TARGET, &variables);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("${tag}"), "{problems:?}");
    }

    #[test]
    fn an_undefined_variable_is_placed_at_its_line_and_column() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  a: x-${overrides.NOPE}\n  b: ${overrides.DB_PASSWORD}\n  c: ${home}\n";
        let (_, problems) = render_text("m.yaml", text, TARGET, &vars());
        let places: Vec<(usize, usize)> =
            problems.iter().map(|p| (p.at.line, p.at.column)).collect();
        assert_eq!(places, vec![(5, 8), (6, 6), (7, 6)]);
        assert!(
            problems[0]
                .message
                .contains("add NOPE to spec.overrides.app")
        );
        assert!(problems[1].message.contains("secretKeyRef"));
        assert!(problems[2].message.contains("not a variable berth knows"));
    }

    #[test]
    fn identity_namespace_and_scope_are_checked_at_the_node() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  namespace: other\n---\nkind: Service\nmetadata: {name: s}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n";
        let (manifests, problems) = render_text("m.yaml", text, TARGET, &vars());
        assert!(manifests.is_empty());
        let found: Vec<(usize, &str)> = problems
            .iter()
            .map(|p| (p.at.line, p.message.as_str()))
            .collect();
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0].0, 5);
        assert!(found[0].1.contains("namespace other"));
        assert!(found[1].1.contains("no apiVersion"));
        assert_eq!(found[2].0, 11);
        assert!(found[2].1.contains("cluster-scoped"));
    }

    /// Hostile finding: a manifest Secret named like berth's own took over its values.
    #[test]
    fn a_secret_named_like_berths_own_is_a_problem() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: berth-overrides}\n";
        let (_, problems) = render_text("m.yaml", text, TARGET, &vars());
        assert_eq!(problems.len(), 1);
        assert_eq!((problems[0].at.line, problems[0].at.column), (3, 18));
        assert!(problems[0].message.contains("the Secret berth makes"));
    }

    #[test]
    fn the_same_object_twice_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("m");
        std::fs::create_dir(&folder).unwrap();
        let doc = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n";
        std::fs::write(folder.join("a.yaml"), doc).unwrap();
        std::fs::write(folder.join("b.yml"), doc).unwrap();
        std::fs::write(folder.join(".hidden.yaml"), "not: [valid").unwrap();
        std::fs::write(folder.join("README.md"), "# not a manifest").unwrap();
        let problems = render_folder(dir.path(), "m", TARGET, &vars()).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].file, "m/b.yml");
        assert!(problems[0].message.contains("also defined at m/a.yaml:1"));

        // The same Ingress under two API groups is one object to the server.
        let ingress = |group: &str| {
            format!("apiVersion: {group}\nkind: Ingress\nmetadata: {{name: shop}}\nspec: {{}}\n")
        };
        std::fs::write(folder.join("a.yaml"), ingress("extensions/v1beta1")).unwrap();
        std::fs::write(folder.join("b.yml"), ingress("networking.k8s.io/v1")).unwrap();
        let problems = render_folder(dir.path(), "m", TARGET, &vars()).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .message
                .contains("Ingress/shop is also defined at m/a.yaml:1")
        );
    }
}
