//! The instance manager: what the API asks of instances (spawn, renew, kill, check a flag), and
//! the background work that keeps the engine and the records in step (reap on time, refill warm
//! pools, replace old versions, remove what has no record and respawn what lost its container).
//!
//! A record is written before its container is made and removed before its container is, so the
//! background work never takes a spawn or a kill in progress for a lost container.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::sync::{Notify, Semaphore};

use super::store::{Admission, Admitted, InstanceStore, StoreError};
use super::{FlagKey, Instance, InstanceState, Team, renewed_expiry};
use crate::backend::docker::instances::{InstanceTrouble, NewInstance};
use crate::backend::docker::{ChallengeTemplate, DockerBackend};
use crate::descriptor::model::{Instanced, OnUpdate, RunState};
use crate::metrics::Metrics;
use crate::status::InstanceCounts;

/// How often expiries are looked for: an instance goes within this (and a removal) of its time.
const REAP_EVERY: Duration = Duration::from_secs(1);
/// Most containers made at once for spawns; more wait their turn.
const SPAWNS_AT_ONCE: usize = 8;
/// Most pooled instances made, or live ones replaced, per challenge in one round of background
/// work, so reaping is never late behind a long refill.
const BACKGROUND_BATCH: usize = 4;
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
    BadTeam(String),
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
    /// Instances cannot be served yet: no pass has connected to the Docker Engine.
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
type Templates = Arc<BTreeMap<String, Arc<ChallengeTemplate>>>;

/// The instance manager. Cloning shares it.
#[derive(Clone)]
pub struct Instances {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Instances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instances")
            .field("host", &self.inner.host)
            .field("range", &self.inner.range)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: InstanceStore,
    key: FlagKey,
    range: RangeInclusive<u16>,
    host: String,
    metrics: Metrics,
    /// The engine, once a pass has connected to it.
    docker: RwLock<Option<DockerBackend>>,
    /// The instanced challenges of the revision last applied, by name; `None` before the first.
    templates: RwLock<Option<Templates>>,
    /// Wakes the background work early (a claim to refill, a new revision).
    work: Notify,
    spawning: Semaphore,
    /// Replacements that failed, by instance and version: not tried again for that version.
    failed_rolls: std::sync::Mutex<HashSet<(String, String)>>,
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
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

fn new_id() -> Result<String, InstanceError> {
    crate::backend::random_bytes()
        .map(|bytes| hex::encode(&bytes[..8]))
        .map_err(|e| InstanceError::Engine(format!("cannot make an id: {e}")))
}

fn engine(trouble: InstanceTrouble) -> InstanceError {
    InstanceError::Engine(trouble.to_string())
}

/// The key flags are derived from: the configured file, else one made at random in the state
/// folder on first use.
fn flag_key(file: Option<&Path>, state_dir: &Path) -> Result<FlagKey, String> {
    let read = |path: &Path| {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the flag key {}: {e}", path.display()))?;
        let trimmed = bytes.trim_ascii_end();
        match trimmed.len() >= 16 {
            true => Ok(FlagKey::new(trimmed.to_vec())),
            false => Err(format!(
                "the flag key {} is shorter than 16 bytes; write 32 random bytes or more",
                path.display()
            )),
        }
    };
    if let Some(file) = file {
        return read(file);
    }
    let path = state_dir.join("instance-flags.key");
    if !path.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let bytes = crate::backend::random_bytes().map_err(|e| e.to_string())?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut file) => file
                .write_all(hex::encode(bytes).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("cannot write the flag key {}: {e}", path.display()))?,
            // Made meanwhile: read it.
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => {
                return Err(format!(
                    "cannot make the flag key {}: {error}",
                    path.display()
                ));
            }
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
    ) -> Result<Instances, String> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| format!("cannot make {}: {e}", state_dir.display()))?;
        let store =
            InstanceStore::open(&state_dir.join("instances.db")).map_err(|e| e.to_string())?;
        let key = flag_key(config.flag_key_file.as_deref(), state_dir)?;
        Ok(Instances {
            inner: Arc::new(Inner {
                store,
                key,
                range: config.host_ports(),
                host: config.host.clone().unwrap_or_else(host_name),
                metrics: metrics.clone(),
                docker: RwLock::new(None),
                templates: RwLock::new(None),
                work: Notify::new(),
                spawning: Semaphore::new(SPAWNS_AT_ONCE),
                failed_rolls: Default::default(),
            }),
        })
    }

    /// After a pass: the engine, and the instanced challenges of the revision it applied
    /// (resolved: a Pipeline's product named). The background work then brings the instances in
    /// line with them.
    pub fn declare(&self, templates: Vec<ChallengeTemplate>, docker: Option<DockerBackend>) {
        let templates: BTreeMap<String, Arc<ChallengeTemplate>> = templates
            .into_iter()
            .map(|t| (t.key.name.to_string(), Arc::new(t)))
            .collect();
        *self.inner.templates.write().expect("lock") = Some(Arc::new(templates));
        if let Some(docker) = docker {
            *self.inner.docker.write().expect("lock") = Some(docker);
        }
        self.inner.work.notify_one();
    }

    fn docker(&self) -> Result<DockerBackend, InstanceError> {
        self.inner
            .docker
            .read()
            .expect("lock")
            .clone()
            .ok_or_else(|| InstanceError::NotReady("no pass has reached the Docker Engine".into()))
    }

    fn templates(&self) -> Option<Templates> {
        self.inner.templates.read().expect("lock").clone()
    }

    /// The template of an instanced challenge that takes spawns.
    fn template(&self, challenge: &str) -> Result<Arc<ChallengeTemplate>, InstanceError> {
        let templates = self.templates().ok_or_else(|| {
            InstanceError::NotReady("the agent has not applied a revision yet".into())
        })?;
        let template = templates
            .get(challenge)
            .cloned()
            .ok_or_else(|| InstanceError::NotInstanced(challenge.to_string()))?;
        match template.spec.state {
            RunState::Running => Ok(template),
            RunState::Stopped => Err(InstanceError::Stopped(challenge.to_string())),
        }
    }

    fn flag(&self, template: &ChallengeTemplate, team: &Team) -> Option<String> {
        let flag = instanced(template).flag.as_ref()?;
        Some(
            self.inner
                .key
                .flag(template.key.name.as_str(), team, &flag.format),
        )
    }

    /// What the API shows of `instance`.
    pub fn view(&self, instance: &Instance) -> InstanceView {
        let templates = self.templates();
        let template = templates.as_ref().and_then(|t| t.get(&instance.challenge));
        let protocols: Vec<&'static str> = template
            .map(|t| t.spec.ports.iter().map(|p| p.protocol.as_str()).collect())
            .unwrap_or_default();
        let max_lifetime = template.map(|t| millis(instanced(t).max_lifetime()));
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
        }
    }

    /// A team's instance of `challenge`: a pooled one claimed, or a new one started.
    pub async fn spawn(&self, challenge: &str, team: &str) -> Result<InstanceView, InstanceError> {
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
            Err(InstanceError::NotInstanced(_) | InstanceError::BadTeam(_)) => {}
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
        let docker = self.docker()?;
        docker.instance_image(&template).map_err(engine)?;
        let settings = instanced(&template);
        let id = new_id()?;
        let container = docker.instance_container_name(&template, &id);
        let admitted = self.inner.store.admit(&Admission {
            challenge,
            team: &team,
            version: template.main_hash(),
            per_team: settings.per_team,
            max: settings.max,
            ports: template.spec.ports.len(),
            range: self.inner.range.clone(),
            id: &id,
            container: &container,
            now: now_ms(),
            ttl_ms: millis(settings.ttl.0),
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
                // Refilled in the background.
                self.inner.work.notify_one();
                if let Some(flag) = &flag
                    && let Err(trouble) =
                        docker.give_flag(&instance.container, &template, flag).await
                {
                    self.remove(&instance, "failed").await;
                    return Err(engine(trouble));
                }
                tracing::info!(instance = %instance.id, %challenge, "pooled instance claimed");
                Ok((self.view(&instance), true))
            }
            Admitted::New(instance) => {
                let _turn = self.inner.spawning.acquire().await.expect("never closed");
                let new = NewInstance {
                    id: &instance.id,
                    host_ports: &instance.host_ports,
                    flag: flag.as_deref(),
                };
                if let Err(trouble) = docker.start_instance(&template, new).await {
                    self.inner.store.remove(&instance.id)?;
                    return Err(engine(trouble));
                }
                self.inner.store.mark_live(&instance.id)?;
                tracing::info!(instance = %instance.id, %challenge, ports = ?instance.host_ports, "instance started");
                let live = Instance {
                    state: InstanceState::Live,
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

    /// Gives an instance another `ttl` from now, up to its `maxLifetime`.
    pub fn renew(&self, id: &str) -> Result<InstanceView, InstanceError> {
        let mut instance = self
            .inner
            .store
            .get(id)?
            .filter(|i| i.team.is_some())
            .ok_or_else(|| InstanceError::NotFound(id.to_string()))?;
        let template = self
            .templates()
            .and_then(|t| t.get(&instance.challenge).cloned())
            .ok_or_else(|| InstanceError::NotInstanced(instance.challenge.clone()))?;
        let settings = instanced(&template);
        let now = now_ms();
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
        self.remove(&instance, "killed").await;
        Ok(())
    }

    /// Whether `flag` is `team`'s flag for `challenge`; when it is another team's, which one.
    pub fn check_flag(
        &self,
        challenge: &str,
        team: &str,
        flag: &str,
    ) -> Result<FlagCheck, InstanceError> {
        let team = Team::new(team).map_err(InstanceError::BadTeam)?;
        let template = self
            .templates()
            .and_then(|t| t.get(challenge).cloned())
            .ok_or_else(|| InstanceError::NotInstanced(challenge.to_string()))?;
        let format = &instanced(&template)
            .flag
            .as_ref()
            .ok_or_else(|| InstanceError::NoFlag(challenge.to_string()))?
            .format;
        let matches = |other: &Team| {
            bool::from(
                self.inner
                    .key
                    .flag(challenge, other, format)
                    .as_bytes()
                    .ct_eq(flag.as_bytes()),
            )
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
            let entry = counts.entry(instance.challenge).or_default();
            match instance.state {
                InstanceState::Pooled => entry.pooled += 1,
                _ => entry.live += 1,
            }
        }
        Ok(counts)
    }

    /// Removes `instance`: its record first (so the background work never takes it for a lost
    /// container), then its container.
    async fn remove(&self, instance: &Instance, cause: &str) {
        match self.inner.store.remove(&instance.id) {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                tracing::error!(%error, instance = %instance.id, "cannot remove an instance's record");
                return;
            }
        }
        self.inner.metrics.kill(&instance.challenge, cause);
        if let Ok(docker) = self.docker()
            && let Err(error) = docker.remove_instance(&instance.container).await
        {
            // Found without a record by the next round of background work, and removed then.
            tracing::warn!(%error, instance = %instance.id, "cannot remove an instance's container");
        }
        tracing::info!(instance = %instance.id, challenge = %instance.challenge, cause, "instance removed");
    }

    /// The background work, for as long as the agent runs: expiries every second; and after each
    /// pass and claim, the engine brought in line with the records, pools refilled and old
    /// versions replaced.
    pub async fn run(self) {
        let mut first = true;
        loop {
            tokio::select! {
                () = tokio::time::sleep(REAP_EVERY) => {}
                () = self.inner.work.notified() => {}
            }
            let (Ok(docker), Some(templates)) = (self.docker(), self.templates()) else {
                continue;
            };
            self.reap().await;
            if let Err(error) = self.sync(&docker, &templates, first).await {
                tracing::warn!(%error, "cannot bring instances in line with their records");
                continue;
            }
            first = false;
            let mut more = false;
            for template in templates.values() {
                more |= self.fill_pool(&docker, template).await;
                more |= self.roll(&docker, template).await;
            }
            if more {
                self.inner.work.notify_one();
            }
            if let Ok(counts) = self.counts() {
                self.inner.metrics.instances(&counts);
            }
        }
    }

    async fn reap(&self) {
        let expired = match self.inner.store.expired(now_ms()) {
            Ok(expired) => expired,
            Err(error) => {
                tracing::error!(%error, "cannot read expiries");
                return;
            }
        };
        for instance in expired {
            self.remove(&instance, "expired").await;
        }
    }

    /// The engine in line with the records: containers without a record removed; records
    /// without a container respawned when their challenge still takes instances, else dropped.
    /// At the agent's start, spawns its stop interrupted are settled too.
    async fn sync(
        &self,
        docker: &DockerBackend,
        templates: &BTreeMap<String, Arc<ChallengeTemplate>>,
        at_start: bool,
    ) -> Result<(), InstanceError> {
        // Containers first: a spawn's record is written before its container is made.
        let containers = docker.instance_containers().await.map_err(engine)?;
        let records = self.inner.store.list(None, None)?;
        let mut by_id: HashMap<&str, _> = containers.iter().map(|c| (c.id.as_str(), c)).collect();
        for record in &records {
            let container = by_id.remove(record.id.as_str());
            let template = templates
                .get(&record.challenge)
                .filter(|t| t.spec.state == RunState::Running);
            match (container, template, record.state) {
                (Some(_), _, InstanceState::Starting) if at_start => {
                    self.inner.store.mark_live(&record.id)?;
                }
                (Some(_), None, InstanceState::Pooled) => self.remove(record, "removed").await,
                (Some(_), _, _) => {}
                // A spawn in progress.
                (None, _, InstanceState::Starting) if !at_start => {}
                (None, Some(template), InstanceState::Live) => {
                    tracing::warn!(instance = %record.id, challenge = %record.challenge, "an instance's container is gone; respawning it");
                    self.respawn(docker, template, record).await;
                }
                (None, _, _) => {
                    tracing::warn!(instance = %record.id, challenge = %record.challenge, "an instance's container is gone, and its challenge takes no instances now; its record is dropped");
                    self.remove(record, "removed").await;
                }
            }
        }
        for stray in by_id.values() {
            tracing::warn!(container = %stray.container, "an instance container without a record; removing it");
            if let Err(error) = docker.remove_instance(&stray.container).await {
                tracing::warn!(%error, container = %stray.container, "cannot remove it");
            }
        }
        Ok(())
    }

    async fn respawn(
        &self,
        docker: &DockerBackend,
        template: &ChallengeTemplate,
        record: &Instance,
    ) {
        let flag = record
            .team
            .as_ref()
            .and_then(|team| self.flag(template, team));
        let new = NewInstance {
            id: &record.id,
            host_ports: &record.host_ports,
            flag: flag.as_deref(),
        };
        match docker.start_instance(template, new).await {
            Ok(container) => {
                if let Err(error) =
                    self.inner
                        .store
                        .replaced(&record.id, template.main_hash(), &container)
                {
                    tracing::error!(%error, "cannot record a respawn");
                }
            }
            Err(error) => {
                tracing::warn!(%error, instance = %record.id, "cannot respawn it; its record is dropped");
                self.remove(record, "failed").await;
            }
        }
    }

    /// Pooled instances of older versions removed, and the pool topped up (a few at a time);
    /// whether more is left to do.
    async fn fill_pool(&self, docker: &DockerBackend, template: &ChallengeTemplate) -> bool {
        let settings = instanced(template);
        let challenge = template.key.name.as_str();
        let Ok(records) = self.inner.store.list(Some(challenge), None) else {
            return false;
        };
        let pooled: Vec<&Instance> = records
            .iter()
            .filter(|i| i.state == InstanceState::Pooled)
            .collect();
        let running = template.spec.state == RunState::Running;
        let mut current = 0;
        for instance in pooled {
            if running && instance.version == template.main_hash() {
                current += 1;
            } else {
                self.remove(instance, "removed").await;
            }
        }
        let wanted = if running { settings.pool as usize } else { 0 };
        let missing = wanted.saturating_sub(current);
        for _ in 0..missing.min(BACKGROUND_BATCH) {
            let Ok(id) = new_id() else { return false };
            let container = docker.instance_container_name(template, &id);
            let record = match self.inner.store.add_pooled(
                &id,
                challenge,
                template.main_hash(),
                &container,
                template.spec.ports.len(),
                &self.inner.range,
                now_ms(),
            ) {
                Ok(Some(record)) => record,
                Ok(None) => {
                    tracing::warn!(%challenge, "no free host ports left for its pool");
                    return false;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot record a pooled instance");
                    return false;
                }
            };
            let new = NewInstance {
                id: &record.id,
                host_ports: &record.host_ports,
                flag: None,
            };
            if let Err(error) = docker.start_instance(template, new).await {
                tracing::warn!(%error, %challenge, "cannot start a pooled instance");
                let _ = self.inner.store.remove(&record.id);
                return false;
            }
        }
        missing > BACKGROUND_BATCH
    }

    /// With `onUpdate: replace`, live instances of older versions replaced by the current one
    /// (a few at a time), keeping their id, team, ports, flag and expiry; a replacement that does
    /// not start leaves the old container running. Whether more is left to do.
    async fn roll(&self, docker: &DockerBackend, template: &ChallengeTemplate) -> bool {
        if instanced(template).on_update != OnUpdate::Replace
            || template.spec.state != RunState::Running
        {
            return false;
        }
        let version = template.main_hash();
        let Ok(records) = self
            .inner
            .store
            .list(Some(template.key.name.as_str()), None)
        else {
            return false;
        };
        let stale: Vec<&Instance> = {
            let failed = self.inner.failed_rolls.lock().expect("lock");
            records
                .iter()
                .filter(|i| i.state == InstanceState::Live && i.version != version)
                .filter(|i| !failed.contains(&(i.id.clone(), version.to_string())))
                .collect()
        };
        for instance in stale.iter().take(BACKGROUND_BATCH) {
            // The new container takes the old one's host ports: the old one stops first.
            if let Err(error) = docker.stop_instance(&instance.container).await {
                tracing::warn!(%error, instance = %instance.id, "cannot stop it for its replacement");
                continue;
            }
            let flag = instance
                .team
                .as_ref()
                .and_then(|team| self.flag(template, team));
            let new = NewInstance {
                id: &instance.id,
                host_ports: &instance.host_ports,
                flag: flag.as_deref(),
            };
            match docker.start_instance(template, new).await {
                Ok(container) => {
                    if let Err(error) = self.inner.store.replaced(&instance.id, version, &container)
                    {
                        tracing::error!(%error, "cannot record a replacement");
                    }
                    let _ = docker.remove_instance(&instance.container).await;
                    tracing::info!(instance = %instance.id, %version, "instance replaced by the new version");
                }
                Err(error) => {
                    tracing::warn!(%error, instance = %instance.id, "its replacement did not start; the old version keeps running");
                    let _ = docker.restart_instance(&instance.container).await;
                    self.inner
                        .failed_rolls
                        .lock()
                        .expect("lock")
                        .insert((instance.id.clone(), version.to_string()));
                }
            }
        }
        stale.len() > BACKGROUND_BATCH
    }
}

/// The `instanced` of a template the manager holds (only instanced ones are declared).
fn instanced(template: &ChallengeTemplate) -> &Instanced {
    template
        .spec
        .instanced
        .as_ref()
        .expect("only instanced challenges are declared")
}
