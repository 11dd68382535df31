//! The long-running agent: triggers in, passes out. Each pass fetches the config repo and, when the
//! revision moved (or drift checking is on), validates, plans and applies it as `berth apply` does,
//! then commits the status to the repo.
//!
//! Passes never overlap: one loop takes a batch of triggers, runs one pass, and takes the next
//! batch. An invalid revision applies nothing (the last good one keeps running); a transient error
//! (git server or engine down) marks the agent not ready and retries with backoff; a status push
//! that fails is retried on the next pass, so no status is lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::apply::StepReport;
use crate::backend::{Desired, Engines};
use crate::config::{AgentConfig, ConfigError, Secrets};
use crate::descriptor;
use crate::metrics::Metrics;
use crate::plan::{Health, Policy};
use crate::queue::workers::{Pipelines, Setup};
use crate::reconcile::{self, ApplyOptions};
use crate::server::{Readiness, ServerState, Shared};
use crate::source::{Published, Source, SourceError};
use crate::status::{self, PassRecord, PassResult, StatusSet, now, short_revision};
use crate::triggers::{self, Trigger, TriggerSender};

/// Longest wait between retries after transient failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Longest wait for another berth's apply lock before the pass counts as transient and is retried:
/// short, so the agent's loop (and its webhooks) are never held for long.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// Longest wait between checks of objects still settling.
const MAX_RECHECK: Duration = Duration::from_secs(30);

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration or a secret file is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP server could not listen.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The state folder is in use or unusable.
    #[error(transparent)]
    State(#[from] SourceError),
    /// The run queue cannot be opened.
    #[error(transparent)]
    Runs(#[from] crate::queue::store::StoreError),
    /// The local repo could not be watched.
    #[error("cannot watch {path}: {source}")]
    Watch {
        /// The folder.
        path: String,
        /// Why.
        source: notify::Error,
    },
    /// The leader election cannot start.
    #[error(transparent)]
    Election(#[from] crate::leader::ElectionError),
}

/// The revision being applied, loaded and translated; kept between passes so a drift check needs
/// no reload.
struct Current {
    revision: String,
    /// The checkout the revision was loaded from (build contexts are read from it). It always holds
    /// this revision: a rejected revision is checked out only while it is loaded.
    root: std::path::PathBuf,
    desired: Desired,
}

/// How a pass ended, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PassOutcome {
    Applied,
    Failed,
    Rejected,
    Transient,
    Broken,
    Unchanged,
}

impl PassOutcome {
    fn as_str(self) -> &'static str {
        match self {
            PassOutcome::Applied => "applied",
            PassOutcome::Failed => "failed",
            PassOutcome::Rejected => "rejected",
            PassOutcome::Transient => "transient",
            PassOutcome::Broken => "broken",
            PassOutcome::Unchanged => "unchanged",
        }
    }
}

struct Agent {
    config: AgentConfig,
    source: Source,
    /// Held for writing while the clone's checkout changes: runs read folders of it.
    checkout: Arc<tokio::sync::RwLock<()>>,
    pipelines: Pipelines,
    metrics: Metrics,
    shared: Arc<Shared>,
    sender: TriggerSender,
    engines: Option<Engines>,
    current: Option<Current>,
    /// Content id (tree without `.berth`) of the revision last looked at.
    last_content: Option<String>,
    /// Status as of the last pass; shared with the server and `published`, never copied.
    status: Arc<StatusSet>,
    /// Status as on the remote; `None` until read (or when there is none).
    published: Option<Arc<StatusSet>>,
    status_read: bool,
    backoff: Duration,
    retry_scheduled: Arc<AtomicBool>,
    /// Delay before the next check of settling objects; grows while they keep settling.
    recheck: Duration,
    /// When objects started settling; rechecks stop after the config's `wait`.
    settling_since: Option<Instant>,
    recheck_scheduled: Arc<AtomicBool>,
}

/// Runs the agent until `shutdown` resolves: then finishes the pass in progress, pushes status and
/// returns.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let secrets = Secrets::read(&config)?;
    let source = Source::new(&config, &secrets);
    let _state_lock = source.take_state_folder()?;
    let (sender, mut triggers) = triggers::channel();
    let metrics = Metrics::new();
    let checkout = Arc::new(tokio::sync::RwLock::new(()));
    let pipelines = Pipelines::open(Setup {
        state_dir: &config.state_dir,
        config: &config.pipelines,
        ownership: &crate::backend::Ownership::new(&config.instance.to_string()),
        metrics: &metrics,
        passes: &sender,
        source: &source,
        checkout: &checkout,
    })?;
    // Only the leader runs pipelines: a standby starts them when it takes over.
    let mut leadership = match &config.leader_election {
        Some(election) => {
            let access = crate::config::KubeConfig::access(config.kube.as_ref());
            crate::leader::Leadership::elect(election, &access).await?
        }
        None => crate::leader::Leadership::sole(),
    };
    let mut leading = leadership.leads();
    let mut pipelines_started = false;
    if leading {
        pipelines.start().await;
        pipelines_started = true;
    }
    let shared = Arc::new(Shared {
        status: RwLock::new(Arc::new(StatusSet::new(&config.instance.to_string()))),
        readiness: RwLock::new(Readiness::Starting),
    });
    let stopping = Arc::new(tokio::sync::Notify::new());
    let stop_requested = Arc::new(AtomicBool::new(false));
    {
        let (stopping, stop_requested) = (stopping.clone(), stop_requested.clone());
        tokio::spawn(async move {
            shutdown.await;
            stop_requested.store(true, Ordering::SeqCst);
            stopping.notify_waiters();
            stopping.notify_one();
        });
    }
    let server = match config.listen {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| AgentError::Listen { address, source })?;
            let state = ServerState {
                triggers: sender.clone(),
                metrics: metrics.clone(),
                shared: shared.clone(),
                webhook_secret: secrets.webhook.clone(),
                api_token: secrets.api_token.clone(),
                branch: config.repo.branch.clone(),
                pipelines: Some(pipelines.clone()),
                repo_url: config.repo.url.clone(),
            };
            let limits = crate::server::Limits::new(&config);
            let app = crate::server::router(state, &limits);
            let stopping = stopping.clone();
            tracing::info!(%address, max_connections = limits.max_connections, "listening");
            Some(tokio::spawn(crate::server::serve(
                listener,
                app,
                limits,
                async move { stopping.notified().await },
            )))
        }
        None => None,
    };
    let _watcher = match config.local_repo() {
        Some(path) => {
            let watcher = triggers::watch_local_repo(&path, sender.clone()).map_err(|source| {
                AgentError::Watch {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            tracing::info!(path = %path.display(), "watching the local repo for changes");
            Some(watcher)
        }
        None => None,
    };
    triggers::spawn_schedule(config.schedule.clone(), sender.clone());
    sender.send(Trigger::Startup);
    let mut agent = Agent {
        source,
        checkout,
        pipelines,
        status: Arc::new(StatusSet::new(&config.instance.to_string())),
        config,
        metrics,
        shared,
        sender,
        engines: None,
        current: None,
        last_content: None,
        published: None,
        status_read: false,
        backoff: Duration::from_secs(1),
        retry_scheduled: Arc::new(AtomicBool::new(false)),
        recheck: Duration::from_secs(1),
        settling_since: None,
        recheck_scheduled: Arc::new(AtomicBool::new(false)),
    };
    let mut notified_ready = false;
    if !leading {
        agent.stand_by(&leadership);
        notified_ready = true;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }
    loop {
        let batch = tokio::select! {
            batch = triggers.next_batch() => batch,
            () = stopping.notified() => None,
            () = leadership.changed() => {
                match (leading, leadership.leads()) {
                    (false, true) => {
                        tracing::info!(identity = leadership.identity(), "took the lead; a full pass converges what the last leader left");
                        *agent.shared.readiness.write().expect("lock") = Readiness::Starting;
                        if !pipelines_started {
                            agent.pipelines.start().await;
                            pipelines_started = true;
                        }
                        agent.sender.send(Trigger::Startup);
                    }
                    (true, false) => {
                        tracing::warn!(identity = leadership.identity(), "lost the lead; standing by");
                        agent.stand_by(&leadership);
                    }
                    _ => {}
                }
                leading = leadership.leads();
                continue;
            }
        };
        let Some(batch) = batch else { break };
        if stop_requested.load(Ordering::SeqCst) {
            break;
        }
        if !leading {
            tracing::debug!(triggers = batch.len(), "standing by: no pass");
            continue;
        }
        if !leadership.confirm().await {
            tracing::warn!(
                identity = leadership.identity(),
                "the Lease does not confirm the lead; no pass"
            );
            agent.stand_by(&leadership);
            agent.schedule_retry();
            continue;
        }
        agent.pass(&batch).await;
        if !notified_ready {
            notified_ready = true;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
        if stop_requested.load(Ordering::SeqCst) {
            break;
        }
    }
    tracing::info!("stopping");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    agent.pipelines.shutdown().await;
    if leadership.confirm().await {
        agent.publish().await;
    }
    leadership.resign().await;
    if let Some(server) = server {
        let _ = server.await;
    }
    Ok(())
}

/// Runs blocking git work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|panic| Err(SourceError::Local(format!("git task panicked: {panic}"))))
}

impl Agent {
    async fn pass(&mut self, batch: &[Trigger]) {
        let started = Instant::now();
        let span = tracing::info_span!("pass", revision = tracing::field::Empty);
        let names: Vec<&str> = batch.iter().map(Trigger::name).collect();
        let outcome = async {
            tracing::debug!(triggers = ?names, "pass starts");
            let recheck = batch
                .iter()
                .any(|t| matches!(t, Trigger::Recheck | Trigger::RunEnded));
            self.run_pass(recheck).await
        }
        .instrument(span)
        .await;
        let took = started.elapsed();
        self.metrics.pass(outcome.as_str(), took);
        self.metrics.objects(&self.status.agent.phases);
        *self.shared.status.write().expect("lock") = Arc::clone(&self.status);
        match outcome {
            PassOutcome::Transient => self.schedule_retry(),
            _ => self.backoff = Duration::from_secs(1),
        }
        tracing::info!(
            result = outcome.as_str(),
            took_ms = took.as_millis() as u64,
            triggers = ?names,
            "pass done"
        );
    }

    fn stand_by(&self, leadership: &crate::leader::Leadership) {
        *self.shared.readiness.write().expect("lock") =
            Readiness::Standby(leadership.identity().to_string());
    }

    fn degraded(&self, why: String) {
        *self.shared.readiness.write().expect("lock") = Readiness::Degraded(why);
    }

    fn schedule_retry(&mut self) {
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        if self.retry_scheduled.swap(true, Ordering::SeqCst) {
            return;
        }
        let (sender, flag) = (self.sender.clone(), self.retry_scheduled.clone());
        tracing::info!(retry_in_s = delay.as_secs(), "will retry");
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            flag.store(false, Ordering::SeqCst);
            sender.send(Trigger::Retry);
        });
    }

    async fn run_pass(&mut self, recheck: bool) -> PassOutcome {
        let source = self.source.clone();
        let revision = match blocking(move || source.fetch()).await {
            Ok(revision) => revision,
            Err(error @ SourceError::NoBranch { .. }) => {
                // Deleted on the server: what runs keeps running, and everyone is told.
                tracing::error!(%error, "the followed branch is gone; what runs is left as it is");
                self.transient(error.to_string());
                self.publish().await;
                return PassOutcome::Transient;
            }
            Err(error) => {
                tracing::warn!(%error, "fetch failed; the running state is left as it is");
                self.degraded(error.to_string());
                return PassOutcome::Transient;
            }
        };
        tracing::Span::current().record("revision", short_revision(&revision));
        if !self.status_read {
            self.read_status().await;
        }
        let source = self.source.clone();
        let at = revision.clone();
        let content = match blocking(move || source.content_id(&at)).await {
            Ok(content) => content,
            Err(error) => {
                self.degraded(error.to_string());
                return PassOutcome::Transient;
            }
        };
        let moved = self.last_content.as_deref() != Some(content.as_str());
        if !moved && (!(self.config.drift_check || recheck) || self.current.is_none()) {
            self.ready();
            self.publish().await;
            return PassOutcome::Unchanged;
        }
        if moved {
            match self.load(&revision).await {
                Ok(Some(current)) => self.current = Some(current),
                Ok(None) => {
                    self.last_content = Some(content);
                    self.ready();
                    self.publish().await;
                    return PassOutcome::Rejected;
                }
                Err(error) => {
                    // Not a network error: a retry cannot fix a disk or a corrupt clone.
                    let why = format!(
                        "the checkout in {} cannot be read ({error}); nothing was applied. Check the disk, or stop the agent and remove that folder to clone afresh",
                        self.source.workdir().display()
                    );
                    tracing::error!(%why, "checkout unreadable; not retrying until the next trigger");
                    self.unapplied(PassResult::Broken, why);
                    self.publish().await;
                    return PassOutcome::Broken;
                }
            }
        }
        let outcome = self.apply_current(moved).await;
        if outcome != PassOutcome::Transient {
            self.last_content = Some(content);
            self.ready();
        }
        self.publish().await;
        outcome
    }

    fn ready(&self) {
        *self.shared.readiness.write().expect("lock") = Readiness::Ready;
    }

    /// Reads the status the remote holds, so a restarted agent continues it.
    async fn read_status(&mut self) {
        let source = self.source.clone();
        match blocking(move || source.status_files()).await {
            Ok(files) if files.is_empty() => self.status_read = true,
            Ok(files) => {
                self.status_read = true;
                match StatusSet::parse(files.iter().map(|(p, t)| (p.as_str(), t.as_str()))) {
                    Ok(status) => {
                        let status = Arc::new(status);
                        self.published = Some(Arc::clone(&status));
                        self.status = status;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the committed status cannot be read; starting afresh")
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the committed status"),
        }
    }

    /// Checks `revision` out and loads it. `Ok(None)`: invalid, and the problems are in status;
    /// the checkout is then put back at the applied revision, so drift correction and retries
    /// build from what is applied, never from the rejected revision.
    async fn load(&mut self, revision: &str) -> Result<Option<Current>, SourceError> {
        let source = self.source.clone();
        let at = revision.to_string();
        let applied = self.current.as_ref().map(|c| c.revision.clone());
        // Runs copying a folder of the checkout finish first, and none starts meanwhile.
        let _checkout = self.checkout.write().await;
        let options = self.config.load_options();
        let loaded = blocking(move || {
            source.checkout(&at)?;
            let loaded = descriptor::load(source.workdir(), &options)
                .map_err(|e| SourceError::Local(e.to_string()))?;
            if let (false, Some(applied)) = (loaded.is_valid(), applied) {
                source.checkout(&applied)?;
            }
            Ok(loaded)
        })
        .await?;
        if !loaded.is_valid() {
            for problem in &loaded.problems {
                tracing::warn!(%problem, "invalid revision");
            }
            tracing::warn!(
                problems = loaded.problems.len(),
                "revision rejected; nothing applied, the last good revision keeps running"
            );
            self.status = Arc::new(status::after_rejection(
                &self.status,
                revision,
                &loaded.problems,
                &now(),
            ));
            return Ok(None);
        }
        let desired = reconcile::desired(&loaded);
        self.pipelines.declare(revision, &desired);
        // Only the translated form is kept: the typed descriptors are not needed between passes.
        Ok(Some(Current {
            revision: revision.to_string(),
            root: loaded.root,
            desired,
        }))
    }

    async fn engines(&mut self) -> Result<Engines, String> {
        if let Some(engines) = &self.engines {
            return Ok(engines.clone());
        }
        let access = crate::config::KubeConfig::access(self.config.kube.as_ref());
        let engines = reconcile::connect(&self.config.instance.to_string(), &access)
            .await
            .map_err(|e| e.to_string())?;
        self.engines = Some(engines.clone());
        Ok(engines)
    }

    async fn apply_current(&mut self, moved: bool) -> PassOutcome {
        let engines = match self.engines().await {
            Ok(engines) => engines,
            Err(why) => return self.transient(why),
        };
        let current = self.current.as_ref().expect("a loaded revision");
        let options = ApplyOptions {
            concurrency: self.config.concurrency,
            lock_wait: LOCK_WAIT,
            policy: Policy {
                prune: self.config.prune,
                now: None,
            },
            runs: Some(Arc::new(self.pipelines.clone())),
        };
        let metrics = self.metrics.clone();
        let on_report = |report: &StepReport| {
            let action = report.step.action.as_str();
            let result = report.outcome.as_str();
            metrics.step(action, result);
            tracing::info!(object = %report.step.key, action, result, detail = report.outcome.detail(), took_ms = report.elapsed.as_millis() as u64, "step");
        };
        let applied = reconcile::apply(
            current.desired.clone(),
            &engines,
            &current.root,
            &options,
            on_report,
        )
        .await;
        let applied = match applied {
            Ok(applied) => applied,
            Err(error) => {
                self.engines = None;
                return self.transient(error.to_string());
            }
        };
        // A drift check that found no drift wrote nothing; status may still change (health).
        let drift_only = !applied.planned.plan.has_changes() && !moved;
        let current = self.current.as_ref().expect("a loaded revision");
        self.status = Arc::new(status::after_pass(
            &self.status,
            &PassRecord {
                revision: &current.revision,
                now: &now(),
                desired: &applied.planned.desired.objects,
                spec_hashes: &applied.planned.desired.spec_hashes,
                plan: &applied.planned.plan,
                reports: &applied.reports,
                observed: &applied.observed,
            },
        ));
        if let Some(why) = applied.transient() {
            // The engine went away mid-pass: nothing is marked failed; the pass is retried.
            self.engines = None;
            tracing::warn!(%why, "engine unavailable mid-pass; will retry");
            self.degraded(why.to_string());
            return PassOutcome::Transient;
        }
        self.schedule_recheck_if_settling();
        match self.status.agent.result {
            _ if drift_only => PassOutcome::Unchanged,
            Some(PassResult::Failed) => PassOutcome::Failed,
            _ => PassOutcome::Applied,
        }
    }

    /// Objects still starting (a health check not yet passed) are checked again soon, with a
    /// growing delay, instead of holding the pass until they settle; for at most `wait`, after
    /// which the schedule, webhooks and drift checks take over.
    fn schedule_recheck_if_settling(&mut self) {
        let settling: Vec<String> = self
            .status
            .objects
            .iter()
            .filter(|(_, o)| o.phase.is_some() && o.health == Health::Progressing)
            .map(|(key, _)| key.to_string())
            .collect();
        if settling.is_empty() {
            self.recheck = Duration::from_secs(1);
            self.settling_since = None;
            return;
        }
        let since = *self.settling_since.get_or_insert_with(Instant::now);
        if since.elapsed() > self.config.wait.0 {
            tracing::warn!(objects = ?settling, wait_s = self.config.wait.0.as_secs(), "still not healthy; no more rechecks until the next pass");
            return;
        }
        let delay = self.recheck;
        self.recheck = (self.recheck * 2).min(MAX_RECHECK);
        if self.recheck_scheduled.swap(true, Ordering::SeqCst) {
            return;
        }
        let (sender, flag) = (self.sender.clone(), self.recheck_scheduled.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            flag.store(false, Ordering::SeqCst);
            sender.send(Trigger::Recheck);
        });
    }

    fn transient(&mut self, why: String) -> PassOutcome {
        tracing::warn!(%why, "engine unavailable; will retry");
        self.unapplied(PassResult::Transient, why);
        PassOutcome::Transient
    }

    /// Records a pass that applied nothing for a reason outside the repo, and says so in `/readyz`.
    fn unapplied(&mut self, result: PassResult, why: String) {
        let revision = self
            .current
            .as_ref()
            .map(|c| c.revision.clone())
            .unwrap_or_default();
        self.status = Arc::new(status::after_unapplied(
            &self.status,
            &revision,
            result,
            &why,
            &now(),
        ));
        self.degraded(why);
    }

    /// Commits and pushes the status when it differs from what the remote holds. A failure is
    /// logged and retried on the next pass.
    async fn publish(&mut self) {
        if let Some(history) = self.pipelines.history_if_changed()
            && let Some(status) = self.status.with_runs(&history)
        {
            self.status = Arc::new(status);
        }
        if self
            .published
            .as_ref()
            .is_some_and(|published| !self.status.differs_from(published))
        {
            return;
        }
        let files = self.status.files();
        let revision = self
            .status
            .agent
            .last_attempted_revision
            .as_deref()
            .map_or("-", short_revision)
            .to_string();
        let result = self
            .status
            .agent
            .result
            .map_or("none".to_string(), |r| format!("{r:?}").to_lowercase());
        let message = format!("berth: status of {revision} ({result})\n");
        let source = self.source.clone();
        let started = Instant::now();
        match blocking(move || source.publish_status(&files, &message)).await {
            Ok(published) => {
                match &published {
                    Published::Pushed {
                        commit,
                        retries,
                        made,
                        stored,
                    } => tracing::info!(
                        commit = short_revision(commit),
                        retries,
                        files = self.status.objects.len() + 1,
                        tree_ms = made.as_secs_f64() * 1000.0,
                        commit_ms = stored.as_secs_f64() * 1000.0,
                        took_ms = started.elapsed().as_millis() as u64,
                        "status pushed"
                    ),
                    Published::Unchanged => tracing::debug!("status already on the remote"),
                }
                self.published = Some(Arc::clone(&self.status));
            }
            Err(error) => {
                tracing::warn!(%error, "status not pushed; will retry on the next pass");
                self.degraded(error.to_string());
                self.schedule_retry();
            }
        }
    }
}
