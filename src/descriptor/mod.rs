//! Descriptors: the YAML documents people push to the config repo, and everything needed to turn
//! a folder of them into a checked, typed desired state.
//!
//! - [`model`]: the typed kinds (the source of the JSON Schemas);
//! - [`security`]: the walls a descriptor declares, and the defaults it gets;
//! - [`values`]: durations, sizes, names, ports, cron expressions, secret references;
//! - [`yaml`]: YAML to JSON with positions and hostile-input limits;
//! - [`schema`]: generated schemas and validation messages;
//! - [`load`]: walking a folder, every problem at once with file, line and column (and what was
//!   skipped as plainly not berth's, as warnings);
//! - [`manifests`]: a Staging's manifests or chart, rendered, with its Helm hooks told apart;
//! - [`edit`]: one descriptor's `spec.state` changed in its file, every other byte kept;
//! - `recent`: the last few results of a pure function of a text, remembered per thread.
//!
//! Nothing here talks to an engine.

pub mod edit;
pub mod load;
pub mod manifests;
pub mod model;
mod recent;
pub mod schema;
pub mod security;
mod semantic;

pub(crate) use semantic::{RepoPathError, repo_folder};
pub mod values;
pub mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use load::{LoadError, LoadOptions, Loaded, load};
pub use model::{ChallengeSpec, Metadata, PipelineSpec, StagingSpec};
pub use values::{Name, ObjectRef};

/// The kinds of descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// A CTF challenge's containers, on Docker or Kubernetes.
    Challenge,
    /// A build.
    Pipeline,
    /// An environment on Kubernetes.
    Staging,
}

impl Kind {
    /// Every kind, in the order summaries list them.
    pub const ALL: [Kind; 3] = [Kind::Challenge, Kind::Pipeline, Kind::Staging];

    /// The kind's name as written in descriptors.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Challenge => "Challenge",
            Kind::Pipeline => "Pipeline",
            Kind::Staging => "Staging",
        }
    }

    /// The file name of the kind's schema under `schema/`.
    pub fn schema_file(self) -> &'static str {
        match self {
            Kind::Challenge => "challenge.json",
            Kind::Pipeline => "pipeline.json",
            Kind::Staging => "staging.json",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl JsonSchema for Kind {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Kind".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "enum": ["Challenge", "Pipeline", "Staging"],
            "description": "The kind of descriptor: Challenge (containers on a Docker host), Pipeline (a build) or Staging (an environment on Kubernetes)."
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Kind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| {
                format!("unknown kind \"{text}\", expected one of: Challenge, Pipeline, Staging")
            })
    }
}

/// The spec of a descriptor, by kind. A Challenge's is boxed: it is several times the others'
/// size, and a repo's descriptors are held together.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Spec {
    /// A Challenge's spec.
    Challenge(Box<ChallengeSpec>),
    /// A Pipeline's spec.
    Pipeline(PipelineSpec),
    /// A Staging's spec.
    Staging(StagingSpec),
}

/// A valid descriptor: what one YAML document asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Descriptor {
    /// Name, labels, dependencies.
    pub metadata: Metadata,
    /// What should exist.
    pub spec: Spec,
    /// The file it was read from, relative to the repo's root.
    pub file: String,
    /// The line its document starts on.
    pub line: usize,
    /// Stable hash of the spec, the labels and whatever the spec builds from (a build context's content).
    pub spec_hash: String,
    /// Digest of the Challenge's build context (a Pipeline's folders it builds from), when it
    /// builds one.
    pub build_digest: Option<ContentDigest>,
    /// The repo folders a Challenge's volumes copy in (`from:`), by folder as written.
    pub folders: BTreeMap<String, FolderCopy>,
    /// Digests of the build contexts of a Challenge's sidecars that build, by sidecar.
    pub sidecar_builds: BTreeMap<String, ContentDigest>,
    /// A Staging's objects, rendered from its manifests or chart.
    pub manifests: Option<manifests::Rendered>,
}

/// What a folder of the repo (a build context, a folder copied into a volume) read as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentDigest {
    /// The SHA-256 of its files, in hex.
    Read(String),
    /// Why it could not be read (changed since validation, say): nothing may be made from it.
    Unreadable(String),
}

impl Default for ContentDigest {
    fn default() -> Self {
        ContentDigest::Unreadable("the loader did not read it".into())
    }
}

impl ContentDigest {
    /// What hashes of a spec take: the digest, or the reason, so that mending the folder changes
    /// the object as a change of its files does.
    pub fn hashed(&self) -> &str {
        match self {
            ContentDigest::Read(digest) | ContentDigest::Unreadable(digest) => digest,
        }
    }

    /// Its first 16 hex digits, as image tags and volume names carry them; why the folder could
    /// not be read otherwise.
    pub fn short(&self) -> Result<&str, &str> {
        match self {
            ContentDigest::Read(digest) => Ok(&digest[..digest.len().min(16)]),
            ContentDigest::Unreadable(why) => Err(why),
        }
    }
}

/// A folder of the repo a volume copies in, as the loader read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FolderCopy {
    /// The digest of its files, or why they could not be read.
    pub digest: ContentDigest,
    /// Its files, by path from the folder, each with whether it is executable and its size.
    pub files: Vec<(String, bool, u64)>,
}

impl Descriptor {
    /// The descriptor's kind.
    pub fn kind(&self) -> Kind {
        match self.spec {
            Spec::Challenge(_) => Kind::Challenge,
            Spec::Pipeline(_) => Kind::Pipeline,
            Spec::Staging(_) => Kind::Staging,
        }
    }

    /// `Kind/name`, unique in a repo.
    pub fn key(&self) -> ObjectRef {
        ObjectRef {
            kind: self.kind(),
            name: self.metadata.name.clone(),
        }
    }

    /// What this descriptor waits for: its `dependsOn` plus the Pipelines whose images it runs.
    pub fn dependencies(&self) -> Vec<ObjectRef> {
        let mut dependencies = self.metadata.depends_on.clone();
        for pipeline in self.pipelines_used() {
            if !dependencies.contains(&pipeline) {
                dependencies.push(pipeline);
            }
        }
        dependencies
    }

    /// The Pipelines whose products this descriptor uses, each once.
    pub fn pipelines_used(&self) -> Vec<ObjectRef> {
        let mut pipelines: Vec<ObjectRef> = Vec::new();
        for used in self.pipeline_uses() {
            if !pipelines.contains(&used.pipeline) {
                pipelines.push(used.pipeline);
            }
        }
        pipelines
    }

    /// Every place this descriptor uses a Pipeline's product: a Challenge's `image` and its
    /// sidecars' (`{fromPipeline: NAME}`), a Staging's `tag`. The one place that matching is
    /// written.
    pub fn pipeline_uses(&self) -> Vec<PipelineUse> {
        let used = |from: &model::FromPipeline, pointer: String| PipelineUse {
            pipeline: ObjectRef {
                kind: Kind::Pipeline,
                name: from.from_pipeline.clone(),
            },
            pointer,
        };
        match &self.spec {
            Spec::Challenge(spec) => {
                let main = match &spec.image {
                    Some(model::ImageSource::FromPipeline(from)) => {
                        Some(used(from, "/spec/image/fromPipeline".into()))
                    }
                    _ => None,
                };
                let sidecars = spec
                    .sidecars
                    .iter()
                    .enumerate()
                    .filter_map(|(index, sidecar)| match &sidecar.image {
                        Some(model::ImageSource::FromPipeline(from)) => Some(used(
                            from,
                            format!("/spec/sidecars/{index}/image/fromPipeline"),
                        )),
                        _ => None,
                    });
                main.into_iter().chain(sidecars).collect()
            }
            Spec::Staging(StagingSpec {
                tag: Some(model::TagSource::FromPipeline(from)),
                ..
            }) => vec![used(from, "/spec/tag/fromPipeline".into())],
            _ => Vec::new(),
        }
    }
}

/// One place a descriptor uses a Pipeline's product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineUse {
    /// The Pipeline.
    pub pipeline: ObjectRef,
    /// Where the descriptor names it (a JSON pointer), for problems about it.
    pub pointer: String,
}

/// Hash of what makes an object what it is: its kind, labels, spec and any extra inputs (such as
/// a build context's digest). Secret references are hashed as references, never as values.
pub fn spec_hash(kind: Kind, metadata: &Metadata, spec: &impl Serialize, extra: &[&str]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(kind.as_str());
    hasher.update([0]);
    hasher.update(serde_json::to_vec(&metadata.labels).expect("labels serialize"));
    hasher.update([0]);
    hasher.update(serde_json::to_vec(spec).expect("specs serialize"));
    for input in extra {
        hasher.update([0]);
        hasher.update(input);
    }
    hex::encode(&hasher.finalize()[..16])
}

/// One thing wrong in the config repo, placed at the offending key or value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file, relative to the repo's root.
    pub file: String,
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
    /// The descriptor's kind, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The descriptor's name, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// JSON pointer of the offending node inside its document (`""` for the whole document or file).
    pub path: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    /// `FILE:LINE:COLUMN: KIND/NAME: MESSAGE`, the form editors and CI annotations understand.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A file name is the repo author's; it may hold a newline, which must not start a line.
        let file = crate::printable::field(&self.file);
        write!(f, "{file}:{}:{}: ", self.line, self.column)?;
        match (&self.kind, &self.name) {
            (Some(kind), Some(name)) => write!(f, "{kind}/{name}: ")?,
            (Some(kind), None) => write!(f, "{kind}: ")?,
            _ => {}
        }
        f.write_str(&crate::printable::field(&self.message))
    }
}
