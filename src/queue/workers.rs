//! The agent's pipeline runs: what queues them (pushes to a pipeline's source, its schedule, a
//! change of its descriptor, a person, a pass that needs its image), the workers that carry them
//! out on the Docker Engine, and their logs on disk, which followers read as they are written.
//!
//! Runs never block a pass: a pass that needs an image asks the queue ([`RunQueue`]) and waits;
//! when a run ends, the worker asks for a pass ([`Trigger::RunEnded`]), which rolls what uses the
//! image and commits the run to status. Everything a run is lives in the [`RunStore`] first, so an
//! agent killed at any moment starts again with nothing lost: runs that were running are marked
//! interrupted and retried once, and their containers, which the killed agent left, are removed.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, broadcast, watch};

use super::store::{Enqueued, RunStore, StoreError};
use super::{Cause, ChangeRun, NewRun, Run, RunState, StepRecord, branch_matches, change_run};
use crate::apply::Outcome;
use crate::backend::docker::DockerBackend;
use crate::backend::docker::run::{RunOptions, RunSource, Runner, Unprepared};
use crate::backend::{Desired, Ownership};
use crate::config::PipelinesConfig;
use crate::descriptor::model::PipelineSpec;
use crate::descriptor::{Kind, ObjectRef};
use crate::metrics::Metrics;
use crate::reconcile::RunQueue;
use crate::run::{RunLog, RunResult};
use crate::source::Source;
use crate::triggers::{Trigger, TriggerSender};
use crate::webhook::PushEvent;

/// How many runs of each pipeline status shows.
pub const HISTORY: usize = 5;

/// Most clients following run logs at once: each holds a connection, and a follower that never
/// reads must not take every connection the server allows.
pub const MAX_FOLLOWERS: usize = 16;

/// How long no run starts after the engine stopped answering under one.
const ENGINE_PAUSE: Duration = Duration::from_secs(10);

/// Pieces of output a slow follower may fall behind by before it is told some were skipped.
const FOLLOW_BACKLOG: usize = 64;

/// A Pipeline of the applied revision, as its runs need it.
#[derive(Debug, Clone)]
struct Declared {
    spec: PipelineSpec,
    hash: String,
}

/// The Pipelines of the applied revision.
#[derive(Debug, Default)]
struct Declaration {
    revision: String,
    pipelines: BTreeMap<String, Declared>,
}

/// A running run: its cancel switch, why it was cancelled, and its log as it is written.
struct Live {
    cancel: watch::Sender<bool>,
    reason: Arc<Mutex<Option<String>>>,
    log: Arc<Mutex<LiveLog>>,
}

/// The log of a running run: the file (up to the cap; the rest is written when the run ends,
/// as the log keeps it) and the followers each new piece is sent to.
struct LiveLog {
    file: Option<std::fs::File>,
    written: usize,
    cap: usize,
    followers: broadcast::Sender<Vec<u8>>,
    /// The slots of this run's followers: freed when the run ends, whether or not a follower
    /// reads on (one that stopped reading would otherwise hold its slot until it disconnects).
    slots: Vec<std::sync::Weak<Mutex<Option<OwnedSemaphorePermit>>>>,
}

impl LiveLog {
    /// Frees the slots of every follower, at the run's end.
    fn release_followers(&mut self) {
        for slot in self.slots.drain(..).filter_map(|slot| slot.upgrade()) {
            slot.lock().expect("lock").take();
        }
    }
}

/// A follower's slot among [`MAX_FOLLOWERS`]: freed when the follower goes, or when its run ends.
pub struct FollowerSlot {
    _held: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
}

impl LiveLog {
    fn write(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Some(file) = &mut self.file
            && self.written < self.cap
        {
            let piece = &bytes[..bytes.len().min(self.cap - self.written)];
            let _ = file.write_all(piece);
            self.written += piece.len();
            if self.written >= self.cap {
                let _ = file.write_all(
                    b"\n[berth: the log reached its cap; its tail is written here when the run ends]\n",
                );
            }
        }
        // No follower is not an error.
        let _ = self.followers.send(bytes.to_vec());
    }
}

/// The agent's pipeline runs. Cloning shares them.
#[derive(Clone)]
pub struct Pipelines {
    inner: Arc<Inner>,
}

struct Inner {
    store: RunStore,
    logs: PathBuf,
    config: PipelinesConfig,
    ownership: Ownership,
    metrics: Metrics,
    passes: TriggerSender,
    /// Clones pipeline sources with the config repo's credentials.
    credentials: Source,
    /// The checkout of the applied revision: a pipeline with no `source` builds its folder.
    root: PathBuf,
    /// Held for reading while a run copies a folder of the checkout; the agent holds it for
    /// writing while it checks out another revision.
    checkout: Arc<tokio::sync::RwLock<()>>,
    declared: RwLock<Arc<Declaration>>,
    redeclared: Notify,
    wake: Notify,
    live: Mutex<HashMap<i64, Live>>,
    docker: tokio::sync::Mutex<Option<DockerBackend>>,
    /// This agent's mark on its run containers: its host and state folder.
    owner: String,
    /// Set when the agent stops: runs still going are left `running` in the store, for the next
    /// agent to mark interrupted and retry, rather than recorded as failed by their killed steps.
    stopping: std::sync::atomic::AtomicBool,
    followers: Arc<tokio::sync::Semaphore>,
    /// Until when no run starts: the engine stopped answering under the last one.
    paused_until: Mutex<Option<Instant>>,
    /// Whether runs changed since status last read them.
    history_stale: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Pipelines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipelines")
            .field("logs", &self.inner.logs)
            .field("workers", &self.inner.config.workers)
            .finish_non_exhaustive()
    }
}

/// Why a manual run was not queued.
#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    /// No such pipeline in the applied revision.
    #[error("no Pipeline {0} in the applied revision")]
    Undeclared(String),
    /// The commit is not a plain revision.
    #[error("commit: not a commit, branch or tag name (letters, digits and -_./+@ only)")]
    BadRevision,
    /// The pipeline has as many runs waiting as it may.
    #[error("Pipeline/{0} already has {max} runs waiting; try again when some have run", max = super::MAX_QUEUED)]
    Full(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the agent needs to start its pipeline runs.
pub struct Setup<'a> {
    /// The agent's state folder: `runs.db` and `runs/` go there.
    pub state_dir: &'a Path,
    /// Workers and the log cap.
    pub config: &'a PipelinesConfig,
    /// The instance's ownership labels.
    pub ownership: &'a Ownership,
    /// The metrics.
    pub metrics: &'a Metrics,
    /// Where passes are asked for.
    pub passes: &'a TriggerSender,
    /// The config repo's clone.
    pub source: &'a Source,
    /// Held while the clone's checkout changes.
    pub checkout: &'a Arc<tokio::sync::RwLock<()>>,
}

impl Pipelines {
    /// Opens the run store in the state folder.
    pub fn open(setup: Setup<'_>) -> Result<Pipelines, StoreError> {
        let store = RunStore::open(&setup.state_dir.join("runs.db"))?;
        let logs = store.logs_folder(&setup.state_dir.join("runs"));
        let owner = {
            use sha2::Digest as _;
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let folder = setup
                .state_dir
                .canonicalize()
                .unwrap_or_else(|_| setup.state_dir.to_path_buf());
            let digest = sha2::Sha256::digest(format!("{}\n{}", host.trim(), folder.display()));
            hex::encode(&digest[..8])
        };
        if let Err(error) = std::fs::create_dir_all(&logs) {
            tracing::warn!(%error, folder = %logs.display(), "cannot make the run log folder; runs will have no log files");
        }
        Ok(Pipelines {
            inner: Arc::new(Inner {
                store,
                logs,
                config: setup.config.clone(),
                ownership: setup.ownership.clone(),
                metrics: setup.metrics.clone(),
                passes: setup.passes.clone(),
                credentials: setup.source.clone(),
                root: setup.source.workdir().to_path_buf(),
                checkout: setup.checkout.clone(),
                declared: RwLock::default(),
                redeclared: Notify::new(),
                wake: Notify::new(),
                live: Mutex::default(),
                docker: tokio::sync::Mutex::new(None),
                owner,
                stopping: std::sync::atomic::AtomicBool::new(false),
                followers: Arc::new(tokio::sync::Semaphore::new(MAX_FOLLOWERS)),
                paused_until: Mutex::new(None),
                history_stale: std::sync::atomic::AtomicBool::new(true),
            }),
        })
    }

    /// The run store.
    pub fn store(&self) -> &RunStore {
        &self.inner.store
    }

    /// The file holding run `id`'s log.
    pub fn log_path(&self, id: i64) -> PathBuf {
        self.inner.logs.join(format!("{id}.log"))
    }

    /// Takes back what a stopped agent left (runs it was running are interrupted and retried
    /// once; their containers are removed) and starts the workers and the schedule. Runs start
    /// once the first revision is declared.
    pub async fn start(&self) {
        match self.inner.store.recover() {
            Ok(recovered) => {
                for (id, retry) in &recovered.interrupted {
                    let note = match retry {
                        Some(retry) => format!(
                            "\n== the agent stopped during this run; run {retry} retries it\n"
                        ),
                        None => {
                            "\n== the agent stopped during this run's second attempt; not retried\n"
                                .into()
                        }
                    };
                    append(&self.log_path(*id), note.as_bytes());
                    tracing::warn!(run = id, retry, "run interrupted by the agent's stop");
                }
                for id in &recovered.forgotten {
                    let _ = std::fs::remove_file(self.log_path(*id));
                }
            }
            Err(error) => tracing::error!(%error, "cannot recover the run queue"),
        }
        if let Ok(docker) = self.docker().await {
            let removed = docker.remove_runs_of(&self.inner.owner).await;
            if removed > 0 {
                tracing::info!(
                    removed,
                    "removed the containers of runs a stopped agent left"
                );
            }
        }
        tokio::spawn(self.clone().dispatch());
        tokio::spawn(self.clone().schedule());
    }

    /// Stops with the agent: runs still going are killed and left `running` in the store, so the
    /// next agent marks them interrupted and retries them, as after a `kill -9`.
    pub async fn shutdown(&self) {
        self.inner
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let running = self.inner.live.lock().expect("lock").len();
        if running == 0 {
            return;
        }
        if let Ok(docker) = self.docker().await {
            let removed = docker.remove_runs_of(&self.inner.owner).await;
            tracing::info!(
                runs = running,
                removed,
                "stopping: runs in progress were stopped; the next start retries them"
            );
        }
    }

    /// Takes the Pipelines of a newly applied revision: queued runs of pipelines no longer
    /// declared are cancelled, `onChange` pipelines whose spec is new get a run, and the schedule
    /// is made again.
    pub fn declare(&self, revision: &str, desired: &Desired) {
        let pipelines: BTreeMap<String, Declared> = desired
            .pipelines()
            .map(|(name, template)| {
                let declared = Declared {
                    spec: template.spec().clone(),
                    hash: template.hash().to_string(),
                };
                (name.to_string(), declared)
            })
            .collect();
        let names: Vec<String> = pipelines.keys().cloned().collect();
        let declaration = Arc::new(Declaration {
            revision: revision.to_string(),
            pipelines,
        });
        *self.inner.declared.write().expect("lock") = Arc::clone(&declaration);
        self.runs_changed();
        match self.inner.store.cancel_undeclared(&names) {
            Ok(cancelled) if !cancelled.is_empty() => {
                tracing::info!(runs = ?cancelled, "cancelled queued runs of pipelines no longer declared")
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot cancel runs of undeclared pipelines"),
        }
        // A producing pipeline's changes are run by the pass that needs its image.
        for (name, declared) in &declaration.pipelines {
            let spec = &declared.spec;
            if !spec.triggers.on_change || spec.produces.is_some() {
                continue;
            }
            match self.inner.store.latest_change(name, &declared.hash) {
                Ok(None) => {
                    let _ = self.enqueue(NewRun {
                        pipeline: name.to_string(),
                        cause: Cause::Change,
                        commit: None,
                        branch: None,
                        delivery: None,
                        spec_hash: Some(declared.hash.clone()),
                    });
                }
                Ok(Some(_)) => {}
                Err(error) => tracing::warn!(%error, pipeline = name, "cannot read the run queue"),
            }
        }
        self.inner.redeclared.notify_one();
        self.inner.wake.notify_one();
    }

    fn declaration(&self) -> Arc<Declaration> {
        Arc::clone(&self.inner.declared.read().expect("lock"))
    }

    fn enqueue(&self, new: NewRun) -> Result<Enqueued, StoreError> {
        let cancel_running = self
            .declaration()
            .pipelines
            .get(&new.pipeline)
            .is_some_and(|d| d.spec.cancel_running);
        self.runs_changed();
        let enqueued = self.inner.store.enqueue(&new, cancel_running).inspect_err(
            |error| tracing::error!(%error, pipeline = new.pipeline, "cannot queue a run"),
        )?;
        match &enqueued {
            Enqueued::Queued {
                id,
                superseded,
                cancel_running,
            } => {
                tracing::info!(run = id, pipeline = new.pipeline, cause = new.cause.as_str(), commit = ?new.commit, superseded = ?superseded, "run queued");
                for running in cancel_running {
                    self.stop(*running, format!("superseded by run {id}"));
                }
                self.inner.wake.notify_one();
            }
            Enqueued::Duplicate(of) => {
                tracing::info!(pipeline = new.pipeline, duplicate_of = of, delivery = ?new.delivery, "run not queued: a duplicate")
            }
            Enqueued::Full => tracing::warn!(
                pipeline = new.pipeline,
                cause = new.cause.as_str(),
                "run not queued: the pipeline has as many runs waiting as it may"
            ),
        }
        self.inner
            .metrics
            .queue_depth(self.inner.store.queue_depth().unwrap_or(0));
        Ok(enqueued)
    }

    /// Queues a run of each pipeline whose source the push was to, on a branch its push trigger
    /// names; returns each pipeline with what became of its run.
    pub fn on_push(&self, push: &PushEvent) -> Vec<(String, Enqueued)> {
        let declaration = self.declaration();
        let mut queued = Vec::new();
        // A deleted branch has nothing to build; a commit that is no plain revision is not
        // passed on to git.
        if push.deleted
            || push
                .commit
                .as_deref()
                .is_some_and(|c| !crate::git_url::valid_revision(c))
        {
            return queued;
        }
        for (name, declared) in &declaration.pipelines {
            let spec = &declared.spec;
            let (Some(source), Some(trigger)) = (&spec.source, &spec.triggers.push) else {
                continue;
            };
            let ours = push
                .repository_urls
                .iter()
                .any(|url| crate::git_url::same_repository(url, &source.url));
            if !ours || !branch_matches(&trigger.branches, &push.branch) {
                continue;
            }
            let new = NewRun {
                pipeline: name.clone(),
                cause: Cause::Push,
                commit: push.commit.clone(),
                branch: Some(push.branch.clone()),
                delivery: push.delivery.clone(),
                spec_hash: Some(declared.hash.clone()),
            };
            if let Ok(enqueued) = self.enqueue(new) {
                queued.push((name.clone(), enqueued));
            }
        }
        queued
    }

    /// Queues a run a person asked for, at `commit` (a commit, branch or tag of the source) or
    /// the source's `ref`.
    pub fn manual(&self, pipeline: &str, commit: Option<String>) -> Result<i64, ManualError> {
        let declaration = self.declaration();
        let Some(declared) = declaration.pipelines.get(pipeline) else {
            return Err(ManualError::Undeclared(pipeline.to_string()));
        };
        if commit
            .as_deref()
            .is_some_and(|c| !crate::git_url::valid_revision(c))
        {
            return Err(ManualError::BadRevision);
        }
        let new = NewRun {
            pipeline: pipeline.to_string(),
            cause: Cause::Manual,
            commit,
            branch: None,
            delivery: None,
            spec_hash: Some(declared.hash.clone()),
        };
        match self.enqueue(new)? {
            Enqueued::Queued { id, .. } | Enqueued::Duplicate(id) => Ok(id),
            Enqueued::Full => Err(ManualError::Full(pipeline.to_string())),
        }
    }

    /// Cancels run `id`: a queued run at once, a running one by killing its container. Returns
    /// its state before, or `None` when there is no such run.
    pub fn cancel(&self, id: i64) -> Result<Option<RunState>, StoreError> {
        self.runs_changed();
        let before = self.inner.store.cancel(id, "cancelled by a person")?;
        if before == Some(RunState::Running) {
            self.stop(id, "cancelled by a person".into());
        }
        self.inner
            .metrics
            .queue_depth(self.inner.store.queue_depth().unwrap_or(0));
        Ok(before)
    }

    fn stop(&self, id: i64, why: String) {
        if let Some(live) = self.inner.live.lock().expect("lock").get(&id) {
            *live.reason.lock().expect("lock") = Some(why);
            let _ = live.cancel.send(true);
        }
    }

    /// For a running run: its log so far and what is written from now on, with nothing lost or
    /// repeated between the two, and a follower's slot to hold while following.
    pub fn follow(&self, id: i64) -> Follow {
        let Some(log) = self
            .inner
            .live
            .lock()
            .expect("lock")
            .get(&id)
            .map(|live| Arc::clone(&live.log))
        else {
            return Follow::Ended;
        };
        let Ok(slot) = Arc::clone(&self.inner.followers).try_acquire_owned() else {
            return Follow::Busy;
        };
        let mut log = log.lock().expect("lock");
        let so_far = std::fs::read(self.log_path(id)).unwrap_or_default();
        let slot = Arc::new(Mutex::new(Some(slot)));
        log.slots.retain(|slot| slot.strong_count() > 0);
        log.slots.push(Arc::downgrade(&slot));
        Follow::Running(Following {
            so_far,
            rest: log.followers.subscribe(),
            slot: FollowerSlot { _held: slot },
        })
    }

    /// Notes that runs or the declared pipelines changed, so status must show them again.
    fn runs_changed(&self) {
        self.inner
            .history_stale
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The newest runs of each declared pipeline, for status; `None` when nothing changed since
    /// the last call, so a pass that ran nothing reads nothing.
    pub fn history_if_changed(&self) -> Option<BTreeMap<String, Vec<Run>>> {
        if !self
            .inner
            .history_stale
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return None;
        }
        let declaration = self.declaration();
        let history = declaration
            .pipelines
            .keys()
            .filter_map(|name| {
                let runs = self.inner.store.list(Some(name), HISTORY).ok()?;
                Some((name.clone(), runs))
            })
            .collect();
        Some(history)
    }

    async fn docker(&self) -> Result<DockerBackend, String> {
        let mut docker = self.inner.docker.lock().await;
        if let Some(docker) = docker.as_ref() {
            return Ok(docker.clone());
        }
        let mut connected = DockerBackend::connect(&self.inner.ownership)
            .await
            .map_err(|e| e.to_string())?;
        connected.set_workspace_limit(self.inner.config.workspace_limit);
        *docker = Some(connected.clone());
        Ok(connected)
    }

    /// Starts queued runs while workers are free, whenever something may have freed one.
    async fn dispatch(self) {
        loop {
            // Nothing runs before a revision is declared (a run needs its pipeline's spec), once
            // the agent stops, or while the engine is not answering.
            let declaration = self.declaration();
            let paused = *self.inner.paused_until.lock().expect("lock");
            if let Some(until) = paused.filter(|until| *until > Instant::now()) {
                let wake = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(until.into()).await;
                    wake.inner.wake.notify_one();
                });
            } else if !declaration.revision.is_empty()
                && !self
                    .inner
                    .stopping
                    .load(std::sync::atomic::Ordering::SeqCst)
            {
                let concurrency = |pipeline: &str| {
                    declaration
                        .pipelines
                        .get(pipeline)
                        .map_or(1, |d| d.spec.concurrency)
                };
                loop {
                    match self
                        .inner
                        .store
                        .start_next(self.inner.config.workers, concurrency)
                    {
                        Ok(Some(run)) => {
                            self.runs_changed();
                            // Known as live before its task starts, so a cancel that comes at
                            // once reaches it.
                            let live = self.register(run.id);
                            tokio::spawn(self.clone().carry_out(run, live));
                        }
                        Ok(None) => break,
                        Err(error) => {
                            tracing::error!(%error, "cannot take a run from the queue");
                            break;
                        }
                    }
                }
                self.inner
                    .metrics
                    .queue_depth(self.inner.store.queue_depth().unwrap_or(0));
            }
            self.inner.wake.notified().await;
        }
    }

    /// Queues the runs the pipelines' `schedule`s ask for, at their times.
    async fn schedule(self) {
        // The last time fired: a wall clock that steps back must not fire it again.
        let mut fired: Option<chrono::DateTime<chrono::Utc>> = None;
        loop {
            let schedules: Vec<(String, crate::descriptor::values::CronExpr)> = self
                .declaration()
                .pipelines
                .iter()
                .filter_map(|(name, d)| Some((name.clone(), d.spec.triggers.schedule.clone()?)))
                .collect();
            let now = chrono::Utc::now();
            let due = super::next_due(&schedules, fired.map_or(now, |fired| fired.max(now)));
            let wait = due
                .as_ref()
                .map_or(Duration::from_secs(86_400), |(when, _)| {
                    (*when - now).to_std().unwrap_or(Duration::ZERO)
                });
            tokio::select! {
                () = tokio::time::sleep(wait) => {
                    fired = due.as_ref().map(|(when, _)| *when);
                    for pipeline in due.map(|(_, names)| names).unwrap_or_default() {
                        let hash = self.declaration().pipelines.get(&pipeline).map(|d| d.hash.clone());
                        let _ = self.enqueue(NewRun {
                            pipeline,
                            cause: Cause::Schedule,
                            commit: None,
                            branch: None,
                            delivery: None,
                            spec_hash: hash,
                        });
                    }
                }
                () = self.inner.redeclared.notified() => {}
            }
        }
    }

    /// Run `id` is no longer live: its followers' slots are freed, and they end with its log.
    fn retire(&self, id: i64) {
        if let Some(live) = self.inner.live.lock().expect("lock").remove(&id) {
            live.log.lock().expect("lock").release_followers();
        }
    }

    /// Makes run `id` live: its cancel switch and its log file, opened for appending.
    fn register(&self, id: i64) -> Registered {
        let (cancel, cancelled) = watch::channel(false);
        let reason = Arc::new(Mutex::new(None));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .map_err(|error| tracing::warn!(%error, run = id, "cannot write the run's log file"))
            .ok();
        let log = Arc::new(Mutex::new(LiveLog {
            file,
            written: 0,
            cap: self.inner.config.log_cap,
            followers: broadcast::channel(FOLLOW_BACKLOG).0,
            slots: Vec::new(),
        }));
        self.inner.live.lock().expect("lock").insert(
            id,
            Live {
                cancel,
                reason: reason.clone(),
                log: log.clone(),
            },
        );
        Registered {
            cancelled,
            reason,
            log,
        }
    }

    /// Carries out a run the store marked running, records how it ended, and asks for a pass.
    async fn carry_out(self, run: Run, live: Registered) {
        let started = Instant::now();
        let Registered {
            cancelled,
            reason,
            log,
        } = live;
        tracing::info!(
            run = run.id,
            pipeline = run.pipeline,
            cause = run.cause.as_str(),
            "run starts"
        );
        let ended = match self.inner.store.cancel_requested(run.id) {
            Ok(true) => {
                Ended::without_steps(RunState::Cancelled, "cancelled before it started".into())
            }
            _ => self.execute(&run, cancelled, &log).await,
        };
        let took = started.elapsed();
        self.runs_changed();
        if self
            .inner
            .stopping
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            // The agent stops: the run stays `running` for the next agent to retry.
            return;
        }
        if ended.state == RunState::Interrupted {
            // The engine stopped answering: not the pipeline's doing. The run goes back to the
            // queue, and none starts for a while.
            tracing::warn!(run = run.id, why = %ended.message, "the engine is not answering; the run waits in the queue");
            let _ = self.inner.store.requeue(run.id);
            append(
                &self.log_path(run.id),
                format!(
                    "\n== the engine stopped answering ({}); the run waits to start again\n",
                    ended.message
                )
                .as_bytes(),
            );
            self.retire(run.id);
            *self.inner.paused_until.lock().expect("lock") = Some(Instant::now() + ENGINE_PAUSE);
            self.inner.wake.notify_one();
            return;
        }
        let mut message = ended.message;
        if ended.state == RunState::Cancelled
            && let Some(why) = reason.lock().expect("lock").take()
        {
            message = format!("{message} ({why})");
        }
        if let Err(error) = self.inner.store.finish(
            run.id,
            ended.state,
            &message,
            ended.image.as_deref(),
            &ended.steps,
            took.as_millis() as u64,
        ) {
            tracing::error!(%error, run = run.id, "cannot record how the run ended");
        }
        // Followers end with the sender.
        self.retire(run.id);
        match self.inner.store.forget_old(&run.pipeline) {
            Ok(forgotten) => {
                for id in forgotten {
                    let _ = std::fs::remove_file(self.log_path(id));
                }
            }
            Err(error) => tracing::warn!(%error, "cannot forget old runs"),
        }
        self.inner
            .metrics
            .run(&run.pipeline, ended.state.as_str(), took);
        tracing::info!(run = run.id, pipeline = run.pipeline, result = ended.state.as_str(), took_ms = took.as_millis() as u64, %message, "run ended");
        self.inner.passes.send(Trigger::RunEnded);
        self.inner.wake.notify_one();
    }

    async fn execute(
        &self,
        run: &Run,
        cancelled: watch::Receiver<bool>,
        live: &Arc<Mutex<LiveLog>>,
    ) -> Ended {
        let declaration = self.declaration();
        let Some(declared) = declaration.pipelines.get(&run.pipeline).cloned() else {
            return Ended::without_steps(
                RunState::Cancelled,
                format!("Pipeline/{} is no longer declared", run.pipeline),
            );
        };
        let docker = match self.docker().await {
            Ok(docker) => docker,
            Err(why) => return Ended::without_steps(RunState::Interrupted, why),
        };
        let key = match run.pipeline.parse() {
            Ok(name) => ObjectRef {
                kind: Kind::Pipeline,
                name,
            },
            Err(_) => {
                return Ended::without_steps(RunState::Failed, "not a pipeline name".into());
            }
        };
        let name = key.name.clone();
        // A retry, or a run queued for a push, builds the commit it names; a pipeline with no
        // source builds the applied revision's folder.
        let wanted = match declared.spec.source {
            Some(_) => run.commit.clone().or_else(|| run.branch.clone()),
            None => None,
        };
        // The clone counts toward the run's timeout, and a cancel stops the wait for it (a
        // server that never answers is given up by libgit2 after its own timeout).
        let deadline = Instant::now() + declared.spec.timeout.0;
        // Only a pipeline that builds a folder of the checkout holds it still, until its files
        // are in the engine (the run lets go of it then); a clone of a source must not hold back
        // the passes.
        let reads_checkout = declared.spec.source.is_none()
            || matches!(
                declared.spec.image,
                crate::descriptor::model::StepImage::Build(_)
            );
        let checkout = match reads_checkout {
            true => Some(self.inner.checkout.clone().read_owned().await),
            false => None,
        };
        let source = RunSource {
            pipeline: name,
            spec: declared.spec.clone(),
            root: self.inner.root.clone(),
            wanted,
            credentials: Some(self.inner.credentials.clone()),
        };
        let request = match source.prepare(deadline, Some(cancelled.clone())).await {
            Ok(request) => request.holding(checkout),
            Err(why @ Unprepared::Cancelled) => {
                return Ended::without_steps(RunState::Cancelled, why.to_string());
            }
            Err(why) => return Ended::without_steps(RunState::Failed, why.to_string()),
        };
        if let Err(error) = self.inner.store.set_commit(run.id, &request.commit) {
            tracing::warn!(%error, run = run.id, "cannot record the run's commit");
        }
        let mut log = RunLog::new(self.inner.config.log_cap, request.secrets.values().cloned());
        let header = format!(
            "== run {} of Pipeline/{} at {} ({}, attempt {}), {}",
            run.id,
            run.pipeline,
            request.commit,
            run.cause.as_str(),
            run.attempt,
            crate::status::now()
        );
        live.lock().expect("lock").write(&log.note(&header));
        // A push to another branch builds, but its image is not the product consumers roll to:
        // that comes from the source's `ref`.
        let of_ref = match (&declared.spec.source, &run.branch) {
            (Some(source), Some(branch)) => *branch == source.reference,
            _ => true,
        };
        let options = RunOptions {
            runner: Runner::Agent,
            spec_hash: if of_ref {
                declared.hash.clone()
            } else {
                String::new()
            },
            cancel: Some(cancelled),
            owner: Some(self.inner.owner.clone()),
            branch: (!of_ref).then(|| run.branch.clone()).flatten(),
        };
        let (report, _) = docker
            .run_to_end(
                &key,
                request,
                &mut log,
                |bytes| live.lock().expect("lock").write(bytes),
                options,
            )
            .await;
        // The file holds the head as it came; when the log outgrew its cap, it becomes the log as
        // kept: head, marker, tail.
        let over_cap = live.lock().expect("lock").written >= self.inner.config.log_cap;
        if over_cap {
            write_whole(&self.log_path(run.id), &log.contents());
        }
        let steps = report
            .steps
            .iter()
            .map(|s| StepRecord {
                name: s.name.clone(),
                exit_code: s.exit_code,
                duration_ms: s.duration.as_millis() as u64,
            })
            .collect();
        let state = match &report.result {
            RunResult::Succeeded => RunState::Succeeded,
            RunResult::Cancelled => RunState::Cancelled,
            RunResult::EngineGone(_) => RunState::Interrupted,
            RunResult::Failed { .. } | RunResult::TimedOut(_) | RunResult::Error(_) => {
                RunState::Failed
            }
        };
        // The summary only: the message goes to status in git, where a log's lines must not.
        let message = match state {
            RunState::Failed => format!("{}; its log: berth logs {}", report.summary(), run.id),
            _ => report.summary(),
        };
        if state == RunState::Interrupted {
            // Not the pipeline's fault: the engine went away. Drop the connection; the next run
            // (or the pass that asks for this one again) connects afresh.
            *self.inner.docker.lock().await = None;
        }
        Ended {
            state,
            message,
            image: report.image,
            steps,
        }
    }
}

/// A live run's handles, for its worker.
struct Registered {
    cancelled: watch::Receiver<bool>,
    reason: Arc<Mutex<Option<String>>>,
    log: Arc<Mutex<LiveLog>>,
}

/// What following a run's log gives.
pub enum Follow {
    /// The run runs: follow it.
    Running(Following),
    /// The run ended (or never started): its log file is whole.
    Ended,
    /// [`MAX_FOLLOWERS`] follow already.
    Busy,
}

/// A follower of a running run's log: what was written before it came, what comes after, and
/// its slot among [`MAX_FOLLOWERS`], held while it follows.
pub struct Following {
    /// The log so far.
    pub so_far: Vec<u8>,
    /// Each piece written from now on; ends with the run.
    pub rest: broadcast::Receiver<Vec<u8>>,
    /// The follower's slot.
    pub slot: FollowerSlot,
}

/// How a run ended.
struct Ended {
    state: RunState,
    message: String,
    image: Option<String>,
    steps: Vec<StepRecord>,
}

impl Ended {
    fn without_steps(state: RunState, message: String) -> Ended {
        Ended {
            state,
            message,
            image: None,
            steps: Vec::new(),
        }
    }
}

fn append(path: &Path, bytes: &[u8]) {
    if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = file.write_all(bytes);
    }
}

/// Replaces the file at `path` whole, so a reader never sees half of it.
fn write_whole(path: &Path, bytes: &[u8]) {
    let partial = path.with_extension("log.partial");
    if std::fs::write(&partial, bytes).is_ok() {
        let _ = std::fs::rename(&partial, path);
    }
}

impl RunQueue for Pipelines {
    fn request(&self, pipeline: &ObjectRef, spec_hash: &str) -> Outcome {
        let name = pipeline.name.as_str();
        let latest = match self.inner.store.latest_change(name, spec_hash) {
            Ok(latest) => latest,
            Err(error) => return Outcome::Transient(error.to_string()),
        };
        match change_run(latest.as_ref()) {
            ChangeRun::Wait(why) => Outcome::Waiting(why),
            ChangeRun::Failed(why) => Outcome::Failed(why),
            ChangeRun::Queue => {
                let declaration = self.declaration();
                let config_revision = declaration
                    .pipelines
                    .get(name)
                    .filter(|d| d.spec.source.is_none())
                    .map(|_| declaration.revision.clone());
                match self.enqueue(NewRun {
                    pipeline: name.to_string(),
                    cause: Cause::Change,
                    commit: config_revision,
                    branch: None,
                    delivery: None,
                    spec_hash: Some(spec_hash.to_string()),
                }) {
                    Ok(Enqueued::Queued { id, .. } | Enqueued::Duplicate(id)) => {
                        Outcome::Waiting(format!("run {id} is queued to produce its image"))
                    }
                    Ok(Enqueued::Full) => Outcome::Waiting(format!(
                        "Pipeline/{name} has as many runs waiting as it may; its image waits for them"
                    )),
                    Err(error) => Outcome::Transient(error.to_string()),
                }
            }
        }
    }
}
