//! The typed descriptor model: the envelope every descriptor shares and the spec of each kind.
//!
//! These types are the single source of truth for what a descriptor may say. The JSON Schemas in
//! `schema/` are generated from them (doc comments become descriptions), and the loader checks a
//! document against those schemas before deserializing it into these types. They hold no I/O.

use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use super::security::{Defaults, NetworkSpec, Resources, Security};
use super::values::{
    CronExpr, Duration, MEMORY_LIMIT_FORMAT, NONZERO_DURATION_FORMAT, Name, ObjectRef, Port,
    SecretRef, Size, VARIABLE_NAME_PATTERN,
};

/// The schema of a map from variable names to `V` (environment variables, build arguments): its
/// keys must be portable names, or a process would get a surprising variable (`PATH=/evil:/bin`
/// from a key `PATH=/evil:/bin`) or the engine would refuse it.
fn variables<V: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<BTreeMap<String, V>>();
    schema.insert(
        "propertyNames".into(),
        serde_json::json!({
            "pattern": VARIABLE_NAME_PATTERN,
            "description": "a variable name is letters, digits and _, not starting with a digit (POSIX), e.g. LOG_LEVEL"
        }),
    );
    schema
}

/// The only apiVersion berth reads.
pub const API_VERSION: &str = "berth/v1";

/// The identity every descriptor carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// Unique name among descriptors of the same kind (a DNS-1123 label).
    pub name: Name,
    /// Free-form labels, copied onto everything berth creates for this descriptor. Keys starting
    /// with `berth.` are berth's own and refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Descriptors (as `Kind/name`) that must be ready before this one is applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<ObjectRef>,
}

/// Whether a Challenge's containers should run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RunState {
    /// Containers exist and run.
    #[default]
    Running,
    /// Containers exist but are stopped.
    Stopped,
}

/// A Challenge: one or more long-running containers on a Docker host, with optional sidecars on
/// the challenge's own network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ChallengeSpec {
    /// `running` (the default) or `stopped`: a stopped challenge keeps its containers.
    #[serde(default)]
    pub state: RunState,
    /// Where it runs: `docker` (the default, or the agent's `defaultTarget`) or `kubernetes`,
    /// as a Deployment and a Service in the agent's challenge namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Engine>,
    /// The image to run: a local or pullable image name, or `{fromPipeline: NAME}` for the image a
    /// Pipeline produces. Exactly one of `image` and `build` is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
    /// Build the image from a folder of this repo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildSpec>,
    /// Overrides the image's command, in exec form (a list of strings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Overrides the image's entrypoint, in exec form (a list of strings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Environment variables, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "variables::<String>")]
    pub env: BTreeMap<String, String>,
    /// Environment variables whose values are secrets, read on the agent's host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "variables::<SecretRef>", extend("writeOnly" = true))]
    pub secret_env: BTreeMap<String, SecretRef>,
    /// Secrets as files in the main container (a flag at `/flag.txt`), read on the agent's host
    /// and written into each container as it is made, never into an image layer; owned by the
    /// container's `security.user`, mode `0400` unless set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_files: Vec<SecretFile>,
    /// Named volumes mounted into the main container: what is written there outlives updates
    /// and restarts, and goes only with the challenge (removed with prune). Sidecars mount them
    /// by the same name (a database's data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// Ports the container listens on, and where they are published on the host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// Limits on CPU, memory and process count, per container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// How to tell that a container is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthCheck>,
    /// What Docker does when a container exits; `unlessStopped` by default.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How many copies of the main container to run (published host ports allow only one).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: u32,
    /// Extra containers on the challenge's own network, such as a database.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sidecars: Vec<Sidecar>,
    /// What the main container's processes may do beyond the usual: capabilities, read-only
    /// root, user, tmpfs, ulimits, privileged.
    #[serde(default, skip_serializing_if = "is_default")]
    pub security: Security,
    /// Whether the containers may connect out; they never reach other challenges or the agent.
    #[serde(default, skip_serializing_if = "NetworkSpec::is_default")]
    pub network: NetworkSpec,
    /// Run an init as PID 1 that passes signals on and reaps zombies (a challenge that forks per
    /// connection, or a server that ignores SIGTERM, stops at once); `true` by default.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub init: bool,
    /// How long a stop (or a stop-first update) waits for the containers to exit after SIGTERM
    /// before they are killed: 10s by default, as Docker's; `terminationGracePeriodSeconds` on
    /// Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<Duration>,
    /// Free-form information (category, points, author…): shown in status and the API, never applied.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub info: serde_json::Map<String, serde_json::Value>,
    /// A copy per team instead of one for all: spawned, renewed and killed through the agent's
    /// API, each with its own host ports, its own flag, and a time to live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instanced: Option<Instanced>,
}

/// How a challenge's per-team copies (instances) live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Instanced {
    /// How long an instance lives after its spawn or its last renewal: `30m`.
    #[schemars(extend("format" = NONZERO_DURATION_FORMAT))]
    pub ttl: Duration,
    /// The longest an instance lives, renewals included; four times `ttl` unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = NONZERO_DURATION_FORMAT))]
    pub max_lifetime: Option<Duration>,
    /// Live instances a team may have at once.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 10))]
    pub per_team: u32,
    /// Live instances of this challenge at once, all teams together.
    #[serde(default = "default_max_instances")]
    #[schemars(range(min = 1, max = 5000))]
    pub max: u32,
    /// Instances kept started and ready for the next teams, which get one at once. Needs the flag
    /// in a file: a pooled instance takes its team's flag when claimed, without a restart.
    #[serde(default)]
    #[schemars(range(min = 0, max = 50))]
    pub pool: u32,
    /// A flag per team, given to each instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<InstanceFlag>,
    /// What a changed spec does to live instances: `keep` them as they are until they expire
    /// (the default; new spawns get the new version), or `replace` them.
    #[serde(default)]
    pub on_update: OnUpdate,
}

fn default_max_instances() -> u32 {
    100
}

impl Instanced {
    /// The longest an instance lives, renewals included.
    pub fn max_lifetime(&self) -> std::time::Duration {
        self.max_lifetime
            .map_or(self.ttl.0.saturating_mul(4), |limit| limit.0)
    }
}

/// Where an instance finds its team's flag, and what it looks like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InstanceFlag {
    /// An environment variable of the main container: `FLAG`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub env: Option<String>,
    /// A file in the main container, written before it starts (or when a pooled instance is
    /// claimed), owned by root and readable by the challenge's user: `/flag.txt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The flag, with `%s` where the team's part goes: `flag{heap_%s}`. The part is 32 hex digits
    /// of an HMAC-SHA-256, under the agent's flag key, of the challenge and the team.
    #[serde(default = "default_flag_format")]
    #[schemars(length(min = 2, max = 200))]
    pub format: String,
}

fn default_flag_format() -> String {
    "flag{%s}".into()
}

/// What a changed spec does to live instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnUpdate {
    /// They run on as they are until they expire; new spawns get the new version.
    #[default]
    Keep,
    /// They are replaced by the new version, keeping their team, ports, flag and expiry.
    Replace,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// The engine an object runs on: a Challenge's `target`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// A Docker Engine: Challenges (by default) and Pipelines.
    #[default]
    Docker,
    /// A Kubernetes cluster: Stagings, and Challenges with `target: kubernetes`.
    Kubernetes,
}

impl Engine {
    /// The engine's name, as plans say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Kubernetes => "kubernetes",
        }
    }

    /// Where objects of `kind` run unless their descriptor says otherwise.
    pub fn usual_for(kind: crate::descriptor::Kind) -> Engine {
        match kind {
            crate::descriptor::Kind::Staging => Engine::Kubernetes,
            _ => Engine::Docker,
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An image by name, or the image a Pipeline produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ImageSource {
    /// An image name such as `busybox:latest`; pulled only when missing locally.
    Name(String),
    /// The image produced by the named Pipeline.
    FromPipeline(FromPipeline),
}

impl ImageSource {
    /// The image's name; empty while it is a Pipeline's product not resolved yet (an object
    /// waiting for it is never applied).
    pub fn resolved_name(&self) -> &str {
        match self {
            ImageSource::Name(name) => name,
            ImageSource::FromPipeline(_) => "",
        }
    }
}

/// The image produced by a Pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FromPipeline {
    /// The Pipeline's name.
    pub from_pipeline: Name,
}

/// An image built from a folder of the config repo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BuildSpec {
    /// The build context: a folder of this repo, relative to the repo's root.
    pub context: String,
    /// The Dockerfile, relative to the context; `Dockerfile` by default.
    #[serde(default = "default_dockerfile")]
    pub dockerfile: String,
    /// Build arguments (`ARG` in the Dockerfile); the build's commands see them as environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "variables::<String>")]
    pub args: BTreeMap<String, String>,
}

fn default_dockerfile() -> String {
    "Dockerfile".into()
}

/// A port a container listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortMapping {
    /// The port inside the container.
    pub container: Port,
    /// The port published on the host; unpublished when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<Port>,
    /// `tcp` (the default) or `udp`.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Where a port is written: the main container's `ports`, or a sidecar's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortPlace {
    /// The sidecar's index, or `None` for the main container.
    pub sidecar: Option<usize>,
    /// The port's index in its container's `ports`.
    pub index: usize,
}

impl PortPlace {
    /// Its JSON pointer: `/spec/ports/0`, `/spec/sidecars/1/ports/0`.
    pub fn pointer(&self) -> String {
        match self.sidecar {
            None => format!("/spec/ports/{}", self.index),
            Some(at) => format!("/spec/sidecars/{at}/ports/{}", self.index),
        }
    }

    /// Its path as problems say it: `spec.ports[0]`, `spec.sidecars[1].ports[0]`.
    pub fn dotted(&self) -> String {
        match self.sidecar {
            None => format!("spec.ports[{}]", self.index),
            Some(at) => format!("spec.sidecars[{at}].ports[{}]", self.index),
        }
    }
}

/// A port of a challenge's containers, and where it is written.
#[derive(Debug, Clone, Copy)]
pub struct PortAt<'a> {
    /// Where it is written.
    pub place: PortPlace,
    /// The port.
    pub port: &'a PortMapping,
}

impl PortAt<'_> {
    /// Its JSON pointer: `/spec/ports/0`, `/spec/sidecars/1/ports/0`.
    pub fn pointer(&self) -> String {
        self.place.pointer()
    }

    /// Its path as problems say it: `spec.ports[0]`, `spec.sidecars[1].ports[0]`.
    pub fn dotted(&self) -> String {
        self.place.dotted()
    }
}

impl ChallengeSpec {
    /// Every port of its containers: the main container's, then each sidecar's.
    pub fn all_ports(&self) -> Vec<PortAt<'_>> {
        let main = self.ports.iter().enumerate().map(|(index, port)| PortAt {
            place: PortPlace {
                sidecar: None,
                index,
            },
            port,
        });
        let sidecars = self.sidecars.iter().enumerate().flat_map(|(at, sidecar)| {
            sidecar
                .ports
                .iter()
                .enumerate()
                .map(move |(index, port)| PortAt {
                    place: PortPlace {
                        sidecar: Some(at),
                        index,
                    },
                    port,
                })
        });
        main.chain(sidecars).collect()
    }
}

/// A transport protocol.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The protocol as Docker writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A health check: run inside the container by Docker (`tcp`, `http`; the image needs
/// `/bin/sh` and `nc` or `wget`, as busybox has), or a solver run beside it (`solve`, as kCTF's
/// healthchecks are). Exactly one of `tcp`, `http` and `solve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    /// Healthy when this port accepts a TCP connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<Port>,
    /// Healthy when an HTTP GET of this port and path succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// Healthy when a program that solves the challenge succeeds against it (Docker only):
    /// a broken jail or a lost flag shows as Degraded, where a port check would pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solve: Option<SolveCheck>,
    /// Time between checks; 10s by default, at least 1ms.
    #[serde(default = "ten_seconds")]
    #[schemars(extend("format" = NONZERO_DURATION_FORMAT))]
    pub interval: Duration,
    /// Time one check may take; 3s by default, at least 1ms.
    #[serde(default = "three_seconds")]
    #[schemars(extend("format" = NONZERO_DURATION_FORMAT))]
    pub timeout: Duration,
    /// Failed checks in a row before the container counts as unhealthy; 3 by default.
    #[serde(default = "three")]
    #[schemars(range(min = 1, max = 100))]
    pub retries: u32,
    /// How long after a start failed checks do not count (a database filling its data folder);
    /// one `interval` by default. Docker only: on kubernetes a readiness probe that fails while
    /// starting only keeps the pod unready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = NONZERO_DURATION_FORMAT))]
    pub start_period: Option<Duration>,
}

fn ten_seconds() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}
fn three_seconds() -> Duration {
    Duration(std::time::Duration::from_secs(3))
}
fn three() -> u32 {
    3
}

/// A solver run against the challenge, in a container of its own that shares the challenge's
/// network (it reaches it at `CHALLENGE_HOST`, `127.0.0.1`, on `CHALLENGE_PORT`, the first
/// port), now and then; healthy while its last run exited 0 (and printed the flag, with
/// `expectFlag`). Its output is masked as a container's is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SolveCheck {
    /// The solver's image, with its tools (pwntools, a browser): a local or pullable name.
    pub image: String,
    /// Its command, in exec form; the image's own when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Time between runs; 5m by default, at least 1ms.
    #[serde(default = "five_minutes")]
    #[schemars(extend("format" = NONZERO_DURATION_FORMAT))]
    pub interval: Duration,
    /// Time one run may take before it counts as failed; 60s by default.
    #[serde(default = "sixty_seconds")]
    #[schemars(extend("format" = NONZERO_DURATION_FORMAT))]
    pub timeout: Duration,
    /// The run must also print the flag: a value of the challenge's `secretEnv` or
    /// `secretFiles`, never handed to the solver.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expect_flag: bool,
}

fn five_minutes() -> Duration {
    Duration(std::time::Duration::from_secs(300))
}
fn sixty_seconds() -> Duration {
    Duration(std::time::Duration::from_secs(60))
}

/// An HTTP health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpCheck {
    /// The port inside the container.
    pub port: Port,
    /// The path to GET; `/` by default.
    #[serde(default = "root_path")]
    pub path: String,
}

fn root_path() -> String {
    "/".into()
}

/// What Docker does when a container exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RestartPolicy {
    /// Never restart.
    No,
    /// Always restart.
    Always,
    /// Restart unless stopped by berth or by hand.
    #[default]
    UnlessStopped,
    /// Restart only when the container exits with an error.
    OnFailure,
}

/// An extra container on the challenge's network, reachable there by its name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Sidecar {
    /// The sidecar's name, also its host name on the challenge's network.
    pub name: Name,
    /// The image to run: a local or pullable name, or `{fromPipeline: NAME}` for the image a
    /// Pipeline produced last (on either engine; the sidecar rolls when it is built again).
    /// Exactly one of `image` and `build`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
    /// Build the sidecar's image from a folder of this repo (Docker only), as the main
    /// container's `build`: an admin bot of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildSpec>,
    /// Overrides the image's command, in exec form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Overrides the image's entrypoint, in exec form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Environment variables, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "variables::<String>")]
    pub env: BTreeMap<String, String>,
    /// Environment variables whose values are secrets, read on the agent's host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "variables::<SecretRef>", extend("writeOnly" = true))]
    pub secret_env: BTreeMap<String, SecretRef>,
    /// Limits for the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Named volumes mounted into the sidecar; a name the main container mounts too is the same
    /// volume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// What the sidecar's processes may do beyond the usual.
    #[serde(default, skip_serializing_if = "is_default")]
    pub security: Security,
    /// How to tell that the sidecar is healthy, as the main container's healthcheck. On docker
    /// the main containers start only once every sidecar is healthy (or, without a healthcheck,
    /// running); on kubernetes it is the sidecar's readiness probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthCheck>,
    /// Other sidecars of this challenge that must be healthy before this one starts (docker
    /// only: a pod's containers start together).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<Name>,
    /// Ports the sidecar listens on, published on the host where `host` is set (an admin bot
    /// that players hand URLs to), as the main container's are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
}

/// A Pipeline: a build that clones a source repo at a commit, runs steps in a container, keeps
/// their logs and may produce an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PipelineSpec {
    /// The repository to build; without it, the config repo itself at the applied revision (a
    /// monorepo, or a repo that holds its challenges' sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// The folder of the source the steps run in (and whose Dockerfile `produces` builds);
    /// the source's root by default.
    #[serde(default = "root_folder")]
    pub context: String,
    /// Secret environment variables for every step, read on the agent's host; their values are
    /// masked as `***` in logs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "variables::<SecretRef>", extend("writeOnly" = true))]
    pub secret_env: BTreeMap<String, SecretRef>,
    /// What starts a run.
    #[serde(default)]
    pub triggers: Triggers,
    /// The image the steps run in: an image name, or `{build: …}` from a folder of this repo.
    pub image: StepImage,
    /// The steps, run in order in one container; the run stops at the first that fails.
    #[schemars(length(min = 1))]
    pub steps: Vec<Step>,
    /// Longest a run may take; 30m by default, at least 1ms.
    #[serde(default = "thirty_minutes")]
    #[schemars(extend("format" = NONZERO_DURATION_FORMAT))]
    pub timeout: Duration,
    /// Most runs of this pipeline at once; 1 by default.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub concurrency: u32,
    /// Whether a push of a newer commit to a branch also cancels a run of an older one that is
    /// already running (queued ones are always superseded).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_running: bool,
    /// The image tag a successful run produces, e.g. `app:{commit}`; `{commit}` is the source commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub produces: Option<String>,
    /// Limits on the step container (and the `produces` build); the agent's `defaults.step`
    /// fill in what is left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Whether steps may connect out; they never reach challenges, other runs or the agent.
    #[serde(default, skip_serializing_if = "NetworkSpec::is_default")]
    pub network: NetworkSpec,
}

fn thirty_minutes() -> Duration {
    Duration(std::time::Duration::from_secs(1800))
}

/// Where a pipeline's source comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    /// Clone URL (https://, ssh://, git@host:path or file://).
    pub url: String,
    /// Branch, tag or commit to build; `main` by default.
    #[serde(default = "main_branch", rename = "ref")]
    pub reference: String,
}

fn main_branch() -> String {
    "main".into()
}

fn root_folder() -> String {
    ".".into()
}

/// What starts a pipeline run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Triggers {
    /// Run when the provider's webhook reports a push to one of these branches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushTrigger>,
    /// Run on this cron schedule (5 fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<CronExpr>,
    /// Run when this descriptor changes.
    #[serde(default)]
    pub on_change: bool,
}

/// A push trigger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PushTrigger {
    /// Branches whose pushes start a run; every branch when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branches: Vec<String>,
}

/// The image a pipeline's steps run in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum StepImage {
    /// An image name.
    Name(String),
    /// An image built from a folder of this repo.
    Build(StepImageBuild),
}

/// An image built for a pipeline's steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StepImageBuild {
    /// How to build it.
    pub build: BuildSpec,
}

/// One step of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Step {
    /// The step's name, shown in logs and status.
    pub name: Name,
    /// Shell commands, run with `/bin/sh -c` in the source checkout.
    pub run: String,
    /// Environment variables for this step.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "variables::<String>")]
    pub env: BTreeMap<String, String>,
}

/// Whether a Staging runs or is archived.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StagingState {
    /// Workloads run.
    #[default]
    Running,
    /// Workloads are scaled to zero, everything else kept, for as long as it says so (no ttl):
    /// a QA environment paused overnight.
    Stopped,
    /// Workloads are scaled to zero; persistent volumes are kept; cleaned up after `ttl`.
    Archived,
}

/// A Staging: a per-feature environment on Kubernetes, made from a folder of manifests or a chart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StagingSpec {
    /// `running` (the default), `stopped` (workloads scaled to zero until started again) or
    /// `archived` (scaled to zero, volumes kept, cleaned up after `ttl`); `running` again restores.
    #[serde(default)]
    pub state: StagingState,
    /// The namespace the staging lives in.
    pub namespace: Name,
    /// The image tag to deploy, substituted for `${tag}` in the manifests (the chart's `tag`
    /// value), or `{fromPipeline: NAME}` for the tag of the image that Pipeline produced last.
    /// Needed only when a manifest reads `${tag}` (validation says where one does without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<TagSource>,
    /// A folder of Kubernetes YAML in this repo, with `${tag}` and `${overrides.KEY}` substituted.
    /// Exactly one of `manifests` and `chart` is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifests: Option<String>,
    /// A Helm chart folder in this repo, rendered with `helm template` where helm is installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chart: Option<String>,
    /// Values for the chart, merged over its `values.yaml` and `valuesFiles` as `helm template
    /// --values` merges them, with `${tag}` and `${overrides.KEY}` substituted in their strings:
    /// `{image: {tag: "${tag}"}, replicaCount: 2}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<serde_json::Map<String, serde_json::Value>>,
    /// Files of chart values in this repo (paths from the repo's root), merged in order over the
    /// chart's `values.yaml`, before `values`, as `helm template -f` does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values_files: Vec<String>,
    /// Values substituted into the manifests.
    #[serde(default)]
    pub overrides: Overrides,
    /// How long an archived staging is kept before it is cleaned up; at least 1ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = NONZERO_DURATION_FORMAT))]
    pub ttl: Option<Duration>,
    /// How long the staging may stay Progressing after a change before it counts as a Failure;
    /// no limit by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = NONZERO_DURATION_FORMAT))]
    pub ready_timeout: Option<Duration>,
}

impl ChallengeSpec {
    /// Seconds a stop waits after SIGTERM before it kills: `stopTimeout`, else Docker's own 10.
    pub fn stop_seconds(&self) -> u64 {
        self.stop_timeout.map_or(10, |timeout| timeout.0.as_secs())
    }

    /// The group the secret files (and an instance's flag file) are readable by: the challenge
    /// user's group (or its uid as a group), when it runs as a user of its own and has such files.
    pub fn secret_files_group(&self) -> Option<u32> {
        let user = self.security.user?;
        let flag_file = self
            .instanced
            .as_ref()
            .and_then(|i| i.flag.as_ref())
            .is_some_and(|f| f.file.is_some());
        (!self.secret_files.is_empty() || flag_file).then(|| user.gid.unwrap_or(user.uid))
    }
}

/// A volume mounted into a container: a named volume of the challenge's, or a folder of this
/// repo copied in. Exactly one of `name` and `from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeMount {
    /// A named volume, one per challenge: `data`. Kept across updates, removed only with the
    /// challenge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    /// A folder of this repo, copied into a volume of its own and mounted read-only: a
    /// database's init scripts (`challenges/shop/initdb`). A change to its files is an update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Where it is mounted, an absolute path: `/var/lib/mysql`.
    pub path: String,
    /// Mount it read-only (a folder from the repo always is).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// On Kubernetes, the size of a named volume's claim (1Gi by default); Docker's volumes
    /// have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = MEMORY_LIMIT_FORMAT))]
    pub size: Option<Size>,
}

/// The most a folder copied into a challenge on Kubernetes may hold, in bytes: what one ConfigMap
/// holds, less room for its metadata.
pub const KUBE_FOLDER_LIMIT: u64 = 1000 * 1024;

/// The most files such a folder may hold: each is an item of the pod's volume.
pub const KUBE_FOLDER_FILES: usize = 1000;

/// What a volume mount holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeSource<'a> {
    /// The challenge's named volume.
    Named(&'a Name),
    /// A folder of the repo, by its path from the repo's root.
    Folder(&'a str),
}

impl VolumeMount {
    /// What it holds; `None` when it names neither or both (validation refuses that).
    pub fn source(&self) -> Option<VolumeSource<'_>> {
        match (&self.name, &self.from) {
            (Some(name), None) => Some(VolumeSource::Named(name)),
            (None, Some(folder)) => Some(VolumeSource::Folder(folder)),
            _ => None,
        }
    }

    /// The named volume it mounts, if it does.
    pub fn named(&self) -> Option<&Name> {
        match self.source()? {
            VolumeSource::Named(name) => Some(name),
            VolumeSource::Folder(_) => None,
        }
    }
}

/// A secret written as a file into a challenge's container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretFile {
    /// Where, an absolute path: `/flag.txt`, `/home/ctf/flag`.
    pub path: String,
    /// The secret: `{file: PATH}` or `{env: VAR}` on the agent's host.
    #[schemars(extend("writeOnly" = true))]
    pub secret: SecretRef,
    /// Its mode, in octal: `"0400"` (the default) to `"0777"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^0?[0-7]{3}$"))]
    pub mode: Option<String>,
}

impl SecretFile {
    /// The key its value and digest go under beside the secret environment's names
    /// (`file:/flag.txt`): no variable name holds a `:`.
    pub fn key(&self) -> String {
        format!("{FILE_KEY_PREFIX}{}", self.path)
    }

    /// Its mode as a number (0o400 unless set).
    pub fn mode_bits(&self) -> u32 {
        self.mode
            .as_deref()
            .and_then(|mode| u32::from_str_radix(mode, 8).ok())
            .unwrap_or(0o400)
    }
}

/// What starts the key of a secret file among a container's secrets.
pub const FILE_KEY_PREFIX: &str = "file:";

/// A Staging's image tag: written out, or the one a Pipeline produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum TagSource {
    /// A tag such as `login-3f2a1c`.
    Tag(String),
    /// The tag of the image the named Pipeline produced last.
    FromPipeline(FromPipeline),
}

/// Values substituted into a staging's manifests as `${overrides.KEY}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Overrides {
    /// Application settings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub app: BTreeMap<String, String>,
    /// Settings of this staging environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub staging: BTreeMap<String, String>,
    /// Secret settings, read on the agent's host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("writeOnly" = true))]
    pub secret: BTreeMap<String, SecretRef>,
}

/// A descriptor of one kind: the common envelope around that kind's spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Envelope<S> {
    /// Always `berth/v1`.
    #[schemars(extend("const" = "berth/v1"))]
    pub api_version: String,
    /// The kind of descriptor.
    pub kind: super::Kind,
    /// Name, labels and dependencies.
    pub metadata: Metadata,
    /// What should exist.
    pub spec: S,
}

impl ChallengeSpec {
    /// Fills the challenge's (and its sidecars') limits from the defaults. On Kubernetes, where a
    /// pod cannot limit processes, `pids` stays as written (validation refuses it there).
    pub fn settle_limits(&mut self, defaults: &Defaults) {
        let with_pids = self.target != Some(Engine::Kubernetes);
        let sidecars = self
            .sidecars
            .iter_mut()
            .map(|sidecar| &mut sidecar.resources);
        for resources in std::iter::once(&mut self.resources).chain(sidecars) {
            resources
                .get_or_insert_with(Resources::empty)
                .fill_from(&defaults.challenge, with_pids);
        }
    }
}

impl PipelineSpec {
    /// Fills the step containers' limits from the defaults.
    pub fn settle_limits(&mut self, defaults: &Defaults) {
        self.resources
            .get_or_insert_with(Resources::empty)
            .fill_from(&defaults.step, true);
    }
}
