//! The instance manager: what the API asks of instances (spawn, renew, kill, check a flag). Its
//! background work is in [`super::upkeep`].
//!
//! A record is written before its container is made and removed before its container is, so the
//! background work never takes a spawn or a kill in progress for a lost container; and a spawn
//! runs to its end in a task of its own, so a client that goes away leaves no half-made instance.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::sync::{Notify, Semaphore};

use super::store::{Admission, Admitted, InstanceStore, Still, StoreError};
use super::{FlagKey, Instance, InstanceHealth, InstanceState, Team, renewed_expiry};
use crate::backend::instances::{InstanceEngines, InstanceTemplate, InstanceTrouble, NewInstance};
use crate::descriptor::model::RunState;
use crate::metrics::Metrics;
use crate::status::InstanceCounts;
use crate::triggers::TriggerSender;

/// Most containers made at once for spawns on the Docker Engine, where the agent's own calls
/// make each one; more wait their turn.
const DOCKER_SPAWNS_AT_ONCE: usize = 8;
/// Most pods made at once for spawns on a cluster: the agent's part is a few API calls and a wait
/// while the nodes start them, so more go at once.
const KUBE_SPAWNS_AT_ONCE: usize = 32;
/// Most solver runs of instances at once (`healthcheck.solve`): every instance of a challenge
/// falls due together, and each run is a container or a pod of its own.
pub(super) const SOLVES_AT_ONCE: usize = 4;
/// Seconds a client is told to wait when a challenge is full.
pub const RETRY_AFTER_FULL: u64 = 30;

/// Why an instance request was refused or failed. Each says what to do, names no team but the
/// asker's, and holds no flag.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The challenge is not declared, or has no `instanced`.
    #[error("{0} is not an instanced challenge of this agent's repo")]
    NotInstanced(String),
    /// The challenge is `state: stopped`.
    #[error("{0} is stopped: it takes no spawns")]
    Stopped(String),
    /// The team name is not one.
    #[error("team: {0}")]
    BadTeam(super::NotATeam),
    /// The team has `perTeam` live instances of the challenge.
    #[error("the team has {} live instance(s) of this challenge, its limit; kill one or wait for it to expire", .0.len())]
    TeamAtLimit(Vec<InstanceView>),
    /// The challenge has `max` live instances.
    #[error("{challenge} has {max} live instances, its limit; retry later")]
    Full {
        /// The challenge.
        challenge: String,
        /// Its `max`.
        max: u32,
    },
    /// The host port range is used up.
    #[error("no free host ports are left in instances.hostPorts; retry later")]
    NoPorts,
    /// No such instance.
    #[error("no instance {0}")]
    NotFound(String),
    /// The instance has reached its `maxLifetime`.
    #[error("instance {0} has reached its maxLifetime and cannot be renewed")]
    AtMaxLifetime(String),
    /// The challenge gives no flag per team.
    #[error("{0} has no per-team flag (instanced.flag)")]
    NoFlag(String),
    /// Instances cannot be served yet: no pass has connected to the engine, or the challenge's
    /// image is not ready.
    #[error("instances are not served yet: {0}; retry later")]
    NotReady(String),
    /// The engine failed or refused.
    #[error("the engine: {0}")]
    Engine(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a team connects to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// The host name.
    pub host: String,
    /// The host port.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
}

/// An instance, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceView {
    /// Its id.
    pub id: String,
    /// The challenge.
    pub challenge: String,
    /// The team; none while pooled.
    pub team: Option<Team>,
    /// `starting`, `live` or `pooled`.
    pub state: InstanceState,
    /// Where to connect.
    pub endpoints: Vec<Endpoint>,
    /// When it goes, unless renewed (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// When renewals stop (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renewable_until: Option<String>,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// The version (template hash) it runs.
    pub version: String,
    /// What its challenge's solver last found of it; none without a solve check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<InstanceHealth>,
}

/// The answer to a flag check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlagCheck {
    /// Whether it is the team's flag.
    pub correct: bool,
    /// The team whose flag it is, when it is another team's: a shared flag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_from: Option<Team>,
}

/// The instanced challenges of one revision, by name.
type Templates = Arc<BTreeMap<String, Arc<InstanceTemplate>>>;

/// The instance manager. Cloning shares it.
#[derive(Clone)]
pub struct Instances {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for Instances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instances")
            .field("host", &self.inner.host)
            .field("range", &self.inner.range)
            .finish_non_exhaustive()
    }
}

pub(super) struct Inner {
    pub(super) store: InstanceStore,
    key: FlagKey,
    pub(super) range: RangeInclusive<u16>,
    host: String,
    pub(super) metrics: Metrics,
    /// The engines, once a pass has connected to them.
    engines: RwLock<InstanceEngines>,
    /// The instanced challenges of the revision last applied, by name, whose version is ready
    /// (or the version before, while a new one is not); `None` before the first.
    templates: RwLock<Option<Templates>>,
    /// Instanced challenges whose first version is not ready (its image failed): spawns wait.
    unready: RwLock<BTreeSet<String>>,
    /// Every version declared since the agent started, by its hash: instances of older versions
    /// still run, and their flags and lifetimes follow the version they run.
    versions: Mutex<HashMap<String, Arc<InstanceTemplate>>>,
    /// When this process started (ms): a `starting` record older than that was interrupted.
    pub(super) started_ms: i64,
    /// Whether this agent leads: only a leader does background work.
    pub(super) leading: AtomicBool,
    /// Wakes the background work early (a claim to refill, a new revision).
    pub(super) work: Notify,
    /// Turns for spawns, per engine.
    spawning_docker: Semaphore,
    spawning_kube: Semaphore,
    /// Replacements that failed, by instance and version: not tried again for that version.
    pub(super) failed_rolls: Mutex<HashSet<(String, String)>>,
    /// What each instance's solver last found.
    pub(super) solves: super::InstanceSolves,
    /// The counts last seen by the background work, and where to ask for a status push when
    /// they change (the agent's triggers), so status says how many run without waiting for a
    /// pass.
    pub(super) counted: Mutex<Option<BTreeMap<String, InstanceCounts>>>,
    pub(super) status_pushes: RwLock<Option<TriggerSender>>,
    /// When the counts last asked for a status push: they ask now and then, so a busy CTF's
    /// spawns make a commit every few seconds at most, not one each.
    pub(super) counts_pushed: Mutex<Option<Instant>>,
    /// Turns for solver runs of instances.
    pub(super) solving: Semaphore,
}

/// Milliseconds since the Unix epoch.
pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

pub(super) fn new_id() -> Result<String, InstanceError> {
    crate::backend::random_bytes()
        .map(|bytes| hex::encode(&bytes[..8]))
        .map_err(|e| InstanceError::Engine(format!("cannot make an id: {e}")))
}

pub(super) fn engine(trouble: InstanceTrouble) -> InstanceError {
    InstanceError::Engine(trouble.to_string())
}

/// Why the instance records or the flag key could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The state folder cannot be made.
    #[error("cannot make {}: {source}", .path.display())]
    StateFolder {
        /// The folder.
        path: std::path::PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
    /// The records cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The flag key cannot be read, made or written (`doing` says which).
    #[error("cannot {doing} the flag key {}: {source}", .path.display())]
    FlagKey {
        /// `read`, `make` or `write`.
        doing: &'static str,
        /// The key's file.
        path: std::path::PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
    /// The flag key is too short to be one.
    #[error("the flag key {} is shorter than 16 bytes; write 32 random bytes or more", .0.display())]
    ShortFlagKey(std::path::PathBuf),
}

/// The key flags are derived from: the configured file, else one made at random in the state
/// folder on first use.
fn flag_key(file: Option<&Path>, state_dir: &Path) -> Result<FlagKey, OpenError> {
    let failed = |doing: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| OpenError::FlagKey {
            doing,
            path,
            source,
        }
    };
    let read = |path: &Path| {
        let bytes = std::fs::read(path).map_err(failed("read", path))?;
        let trimmed = bytes.trim_ascii_end();
        match trimmed.len() >= 16 {
            true => Ok(FlagKey::new(trimmed.to_vec())),
            false => Err(OpenError::ShortFlagKey(path.to_path_buf())),
        }
    };
    if let Some(file) = file {
        return read(file);
    }
    let path = state_dir.join("instance-flags.key");
    if !path.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let bytes = crate::backend::random_bytes().map_err(failed("make", &path))?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut file) => file
                .write_all(hex::encode(bytes).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(failed("write", &path))?,
            // Made meanwhile: read it.
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(failed("make", &path)(error)),
        }
    }
    read(&path)
}

/// This machine's host name, for endpoints when `instances.host` is not set.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Instances {
    /// Opens the records in `state_dir` and reads (or makes) the flag key.
    pub fn open(
        state_dir: &Path,
        config: &crate::config::InstancesConfig,
        metrics: &Metrics,
    ) -> Result<Instances, OpenError> {
        std::fs::create_dir_all(state_dir).map_err(|source| OpenError::StateFolder {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let store = InstanceStore::open(&state_dir.join("instances.db"))?;
        let key = flag_key(config.flag_key_file.as_deref(), state_dir)?;
        Ok(Instances {
            inner: Arc::new(Inner {
                store,
                key,
                range: config.host_ports(),
                host: config.host.clone().unwrap_or_else(host_name),
                metrics: metrics.clone(),
                engines: RwLock::new(InstanceEngines::default()),
                templates: RwLock::new(None),
                unready: RwLock::new(BTreeSet::new()),
                versions: Mutex::new(HashMap::new()),
                started_ms: now_ms(),
                leading: AtomicBool::new(false),
                work: Notify::new(),
                spawning_docker: Semaphore::new(DOCKER_SPAWNS_AT_ONCE),
                spawning_kube: Semaphore::new(KUBE_SPAWNS_AT_ONCE),
                failed_rolls: Default::default(),
                solves: Default::default(),
                counted: Mutex::new(None),
                status_pushes: RwLock::new(None),
                counts_pushed: Mutex::new(None),
                solving: Semaphore::new(SOLVES_AT_ONCE),
            }),
        })
    }

    /// After a pass: the engine, and the instanced challenges of the revision it applied
    /// (resolved: a Pipeline's product named). A version is taken only when `ready` says its
    /// pass made it (its image and network); until then the version before goes on serving. The
    /// background work then brings the instances in line.
    pub fn declare(
        &self,
        templates: Vec<InstanceTemplate>,
        ready: impl Fn(&InstanceTemplate) -> bool,
        engines: InstanceEngines,
    ) {
        let before = self.templates().unwrap_or_default();
        let mut taken = BTreeMap::new();
        let mut unready = BTreeSet::new();
        for template in templates {
            let name = template.key().name.to_string();
            if ready(&template) {
                let template = Arc::new(template);
                self.inner
                    .versions
                    .lock()
                    .expect("lock")
                    .insert(template.version().to_string(), Arc::clone(&template));
                taken.insert(name, template);
            } else if let Some(previous) = before.get(&name) {
                tracing::warn!(challenge = %name, "its new version is not ready; spawns get the version before");
                taken.insert(name, Arc::clone(previous));
            } else {
                unready.insert(name);
            }
        }
        *self.inner.templates.write().expect("lock") = Some(Arc::new(taken));
        *self.inner.unready.write().expect("lock") = unready;
        {
            let mut known = self.inner.engines.write().expect("lock");
            *known = known.updated(engines);
        }
        self.inner.work.notify_one();
    }

    /// Where to ask for a status push when the counts change (spawns, kills, expiries, a solver
    /// that finds an instance broken or mended).
    pub fn push_status_through(&self, triggers: TriggerSender) {
        *self.inner.status_pushes.write().expect("lock") = Some(triggers);
    }

    /// Starts (or pauses) the background work: only the leader tends instances.
    pub fn set_leading(&self, leading: bool) {
        self.inner.leading.store(leading, Ordering::SeqCst);
        self.inner.work.notify_one();
    }

    /// The template of the version `instance` runs, when it was declared since the agent started.
    pub(super) fn declared_version(&self, instance: &Instance) -> Option<Arc<InstanceTemplate>> {
        self.inner
            .versions
            .lock()
            .expect("lock")
            .get(&instance.version)
            .cloned()
    }

    /// The template of the version `instance` runs: its own when known, else the current one.
    pub(super) fn version_of(&self, instance: &Instance) -> Option<Arc<InstanceTemplate>> {
        self.declared_version(instance)
            .or_else(|| self.templates()?.get(&instance.challenge).cloned())
    }

    pub(super) fn engines(&self) -> Result<InstanceEngines, InstanceError> {
        let engines = self.inner.engines.read().expect("lock").clone();
        match engines.any() {
            true => Ok(engines),
            false => Err(InstanceError::NotReady(
                "no pass has reached an engine".into(),
            )),
        }
    }

    pub(super) fn templates(&self) -> Option<Templates> {
        self.inner.templates.read().expect("lock").clone()
    }

    /// The template of an instanced challenge that takes spawns.
    fn template(&self, challenge: &str) -> Result<Arc<InstanceTemplate>, InstanceError> {
        let templates = self.templates().ok_or_else(|| {
            InstanceError::NotReady("the agent has not applied a revision yet".into())
        })?;
        if self.inner.unready.read().expect("lock").contains(challenge) {
            return Err(InstanceError::NotReady(format!(
                "the image of {challenge} is not ready (see its status)"
            )));
        }
        let template = templates
            .get(challenge)
            .cloned()
            .ok_or_else(|| InstanceError::NotInstanced(challenge.to_string()))?;
        match template.spec().state {
            RunState::Running => Ok(template),
            RunState::Stopped => Err(InstanceError::Stopped(challenge.to_string())),
        }
    }

    pub(super) fn flag(&self, template: &InstanceTemplate, team: &Team) -> Option<String> {
        let flag = template.instanced().flag.as_ref()?;
        Some(
            self.inner
                .key
                .flag(template.key().name.as_str(), team, &flag.format),
        )
    }

    /// What the API shows of `instance`.
    pub fn view(&self, instance: &Instance) -> InstanceView {
        let template = self.version_of(instance);
        let template = template.as_deref();
        let protocols: Vec<&'static str> = template
            .map(|t| t.spec().ports.iter().map(|p| p.protocol.as_str()).collect())
            .unwrap_or_default();
        let max_lifetime = template.map(|t| millis(t.instanced().max_lifetime()));
        InstanceView {
            id: instance.id.clone(),
            challenge: instance.challenge.clone(),
            team: instance.team.clone(),
            state: instance.state,
            endpoints: instance
                .host_ports
                .iter()
                .enumerate()
                .map(|(index, port)| Endpoint {
                    host: self.inner.host.clone(),
                    port: *port,
                    protocol: protocols.get(index).copied().unwrap_or("tcp"),
                })
                .collect(),
            expires_at: instance.expires_at.map(rfc3339),
            renewable_until: max_lifetime
                .and_then(|limit| instance.deadline(limit))
                .map(rfc3339),
            created_at: rfc3339(instance.created_at),
            version: instance.version.clone(),
            health: self.solved_health(instance),
        }
    }

    /// A team's instance of `challenge`: a pooled one claimed, or a new one started. The work
    /// runs in a task of its own: a client that goes away mid-spawn leaves a whole instance
    /// (listed for its team), never half of one.
    pub async fn spawn(&self, challenge: &str, team: &str) -> Result<InstanceView, InstanceError> {
        let this = self.clone();
        let (challenge, team) = (challenge.to_string(), team.to_string());
        tokio::spawn(async move { this.spawn_here(&challenge, &team).await })
            .await
            .unwrap_or_else(|error| {
                Err(InstanceError::Engine(format!(
                    "the spawn broke off: {error}"
                )))
            })
    }

    async fn spawn_here(&self, challenge: &str, team: &str) -> Result<InstanceView, InstanceError> {
        let started = Instant::now();
        let result = self.try_spawn(challenge, team).await;
        let metrics = &self.inner.metrics;
        match &result {
            Ok((_, pooled)) => metrics.spawn(
                challenge,
                if *pooled { "claimed" } else { "created" },
                Some((started.elapsed(), *pooled)),
            ),
            Err(InstanceError::TeamAtLimit(_)) => metrics.spawn(challenge, "team_limit", None),
            Err(InstanceError::Full { .. } | InstanceError::NoPorts) => {
                metrics.spawn(challenge, "full", None)
            }
            // A name from the URL that is no challenge's gets no series of its own.
            Err(
                InstanceError::NotInstanced(_)
                | InstanceError::BadTeam(_)
                | InstanceError::NotReady(_),
            ) => {}
            Err(_) => metrics.spawn(challenge, "failed", None),
        }
        result.map(|(view, _)| view)
    }

    async fn try_spawn(
        &self,
        challenge: &str,
        team: &str,
    ) -> Result<(InstanceView, bool), InstanceError> {
        let team = Team::new(team).map_err(InstanceError::BadTeam)?;
        let template = self.template(challenge)?;
        let engines = self.engines()?;
        engines.ready(&template).map_err(engine)?;
        let settings = template.instanced();
        let ttl_ms = millis(settings.ttl.0);
        let id = new_id()?;
        let container = engines.container_name(&template, &id).map_err(engine)?;
        let admitted = self.inner.store.admit(&Admission {
            challenge,
            team: &team,
            version: template.version(),
            engine: template.engine(),
            per_team: settings.per_team,
            max: settings.max,
            ports: template.host_ports_held(),
            range: self.inner.range.clone(),
            id: &id,
            container: &container,
            now: now_ms(),
            ttl_ms,
        })?;
        let flag = self.flag(&template, &team);
        match admitted {
            Admitted::TeamAtLimit(mine) => Err(InstanceError::TeamAtLimit(
                mine.iter().map(|i| self.view(i)).collect(),
            )),
            Admitted::Full => Err(InstanceError::Full {
                challenge: challenge.to_string(),
                max: settings.max,
            }),
            Admitted::NoPorts => Err(InstanceError::NoPorts),
            Admitted::Claimed(instance) => {
                if let Some(flag) = &flag
                    && let Err(trouble) = engines
                        .give_flag(&template, &instance.container, flag)
                        .await
                {
                    self.remove(&instance, Still::Any, "failed").await;
                    return Err(engine(trouble));
                }
                // Refilled in the background, once the claim no longer waits on the engine.
                self.inner.work.notify_one();
                tracing::info!(instance = %instance.id, %challenge, "pooled instance claimed");
                Ok((self.view(&instance), true))
            }
            Admitted::New(instance) => {
                let turns = match template.engine() {
                    crate::descriptor::model::Engine::Docker => &self.inner.spawning_docker,
                    crate::descriptor::model::Engine::Kubernetes => &self.inner.spawning_kube,
                };
                let _turn = turns.acquire().await.expect("never closed");
                let new = NewInstance {
                    id: &instance.id,
                    host_ports: &instance.host_ports,
                    flag: flag.as_deref(),
                };
                let started = match engines.start(&template, new).await {
                    Ok(started) => started,
                    Err(trouble) => {
                        self.inner.store.remove(&instance.id)?;
                        return Err(engine(trouble));
                    }
                };
                let expires_at = now_ms().saturating_add(ttl_ms);
                if !self.inner.store.mark_started(
                    &instance.id,
                    &started.host_ports,
                    Some(expires_at),
                )? {
                    // Killed (or reaped) while it started: its container goes too.
                    let _ = engines.remove(&instance.objects()).await;
                    return Err(InstanceError::NotFound(instance.id));
                }
                tracing::info!(instance = %instance.id, %challenge, ports = ?started.host_ports, "instance started");
                let live = Instance {
                    state: InstanceState::Live,
                    host_ports: started.host_ports,
                    expires_at: Some(expires_at),
                    ..instance
                };
                Ok((self.view(&live), false))
            }
        }
    }

    /// The instances, of one challenge or team when given.
    pub fn list(
        &self,
        challenge: Option<&str>,
        team: Option<&str>,
    ) -> Result<Vec<InstanceView>, InstanceError> {
        Ok(self
            .inner
            .store
            .list(challenge, team)?
            .iter()
            .map(|i| self.view(i))
            .collect())
    }

    /// One instance.
    pub fn get(&self, id: &str) -> Result<InstanceView, InstanceError> {
        self.inner
            .store
            .get(id)?
            .map(|i| self.view(&i))
            .ok_or_else(|| InstanceError::NotFound(id.to_string()))
    }

    /// Gives an instance another `ttl` from now, up to its `maxLifetime`: the settings of the
    /// version it runs. Not once it expired, nor while its challenge is stopped.
    pub fn renew(&self, id: &str) -> Result<InstanceView, InstanceError> {
        let now = now_ms();
        let mut instance = self
            .inner
            .store
            .get(id)?
            .filter(|i| i.team.is_some() && i.expires_at.is_some_and(|at| at > now))
            .ok_or_else(|| InstanceError::NotFound(id.to_string()))?;
        if let Some(current) = self
            .templates()
            .and_then(|t| t.get(&instance.challenge).cloned())
            && current.spec().state == RunState::Stopped
        {
            return Err(InstanceError::Stopped(instance.challenge));
        }
        let template = self
            .version_of(&instance)
            .ok_or_else(|| InstanceError::NotInstanced(instance.challenge.clone()))?;
        let settings = template.instanced();
        let (Some(expires_at), Some(deadline)) = (
            instance.expires_at,
            instance.deadline(millis(settings.max_lifetime())),
        ) else {
            return Err(InstanceError::NotFound(id.to_string()));
        };
        let renewed = renewed_expiry(now, millis(settings.ttl.0), expires_at, deadline)
            .ok_or_else(|| InstanceError::AtMaxLifetime(id.to_string()))?;
        self.inner.store.set_expiry(id, renewed)?;
        instance.expires_at = Some(renewed);
        Ok(self.view(&instance))
    }

    /// Removes an instance now.
    pub async fn kill(&self, id: &str) -> Result<(), InstanceError> {
        let instance = self
            .inner
            .store
            .get(id)?
            .ok_or_else(|| InstanceError::NotFound(id.to_string()))?;
        self.remove(&instance, Still::Any, "killed").await;
        Ok(())
    }

    /// Whether `flag` is `team`'s flag for `challenge`; when it is another team's, which one.
    /// Every flag format of the challenge's versions since the agent started counts, so an
    /// instance still on an older version (`onUpdate: keep`) gives a correct flag.
    pub fn check_flag(
        &self,
        challenge: &str,
        team: &str,
        flag: &str,
    ) -> Result<FlagCheck, InstanceError> {
        let team = Team::new(team).map_err(InstanceError::BadTeam)?;
        let formats: BTreeSet<String> = self
            .inner
            .versions
            .lock()
            .expect("lock")
            .values()
            .filter(|t| t.key().name.as_str() == challenge)
            .filter_map(|t| Some(t.instanced().flag.as_ref()?.format.clone()))
            .collect();
        if formats.is_empty() {
            let known = self.templates().is_some_and(|t| t.contains_key(challenge));
            return Err(match known {
                true => InstanceError::NoFlag(challenge.to_string()),
                false => InstanceError::NotInstanced(challenge.to_string()),
            });
        }
        let matches = |other: &Team| {
            formats.iter().any(|format| {
                bool::from(
                    self.inner
                        .key
                        .flag(challenge, other, format)
                        .as_bytes()
                        .ct_eq(flag.as_bytes()),
                )
            })
        };
        if matches(&team) {
            return Ok(FlagCheck {
                correct: true,
                shared_from: None,
            });
        }
        let shared_from = self
            .inner
            .store
            .teams(challenge)?
            .into_iter()
            .find(|other| *other != team && matches(other));
        Ok(FlagCheck {
            correct: false,
            shared_from,
        })
    }

    /// Live and pooled instances, by challenge: every instanced challenge of the revision last
    /// applied, and any other that still has instances.
    pub fn counts(&self) -> Result<BTreeMap<String, InstanceCounts>, InstanceError> {
        let mut counts: BTreeMap<String, InstanceCounts> = self
            .templates()
            .map(|t| {
                t.keys()
                    .map(|name| (name.clone(), InstanceCounts::default()))
                    .collect()
            })
            .unwrap_or_default();
        for instance in self.inner.store.list(None, None)? {
            let solved = self.solved_health(&instance);
            let entry = counts.entry(instance.challenge).or_default();
            // A team's counts as live from its spawn; one for the pool only once it runs.
            match (&instance.team, instance.state) {
                (Some(_), _) => entry.live += 1,
                (None, InstanceState::Pooled) => entry.pooled += 1,
                (None, _) => {}
            }
            if solved.is_some_and(|health| health.state == crate::plan::Health::Degraded) {
                entry.degraded += 1;
            }
        }
        Ok(counts)
    }

    /// Removes `instance` when it is still as `still` says: its record first (so the background
    /// work never takes it for a lost container), then its container.
    pub(super) async fn remove(&self, instance: &Instance, still: Still, cause: &str) {
        match self.inner.store.remove_if(&instance.id, still) {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                tracing::error!(%error, instance = %instance.id, "cannot remove an instance's record");
                return;
            }
        }
        self.inner.metrics.kill(&instance.challenge, cause);
        if let Ok(engines) = self.engines()
            && let Err(error) = engines.remove(&instance.objects()).await
        {
            // Found without a record by the next round of background work, and removed then.
            tracing::warn!(%error, instance = %instance.id, "cannot remove an instance's container");
        }
        tracing::info!(instance = %instance.id, challenge = %instance.challenge, cause, "instance removed");
    }
}
