//! The long-running agent: triggers in, passes out. Each pass fetches the config repo and, when the
//! revision moved (or drift checking is on), validates, plans and applies it as `berth apply` does,
//! then commits the status to the repo.
//!
//! Passes never overlap: one loop takes a batch of triggers, runs one pass, and takes the next
//! batch, no sooner than `minInterval` after the last unless a webhook announces a new commit.
//! A pass returns how it ended and what comes next ([`PassEnd`]); one place ([`Agent::finish`])
//! then writes status, readiness and metrics, and schedules the next pass: a retry with backoff
//! (a git server or engine down, a damaged clone set aside), a recheck of objects still settling,
//! or nothing until a trigger. An invalid revision applies nothing (the last good one keeps
//! running), and status says it was rejected for as long as it is the branch's tip. Pushing status
//! is apart from passes: a push that fails is retried on its own backoff and never re-runs a pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::apply::StepReport;
use crate::backend::{Desired, Engines};
use crate::config::{AgentConfig, ConfigError, Secrets};
use crate::descriptor;
use crate::descriptor::manifests::ClusterFacts;
use crate::instances::Instances;
use crate::live::{Readiness, Shared};
use crate::metrics::Metrics;
use crate::plan::{Health, Policy};
use crate::queue::workers::{Pipelines, Setup};
use crate::reconcile::{self, ApplyOptions};
use crate::server::ServerState;
use crate::source::{Published, Source, SourceError};
use crate::status::{self, PassRecord, PassResult, ProblemStatus, StatusSet, now, short_revision};
use crate::triggers::{self, Trigger, TriggerSender};

/// Longest wait between retries after transient failures, and between status push attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Longest wait for another berth's apply lock before the pass counts as transient and is retried:
/// short, so the agent's loop (and its webhooks) are never held for long.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// Longest wait between checks of objects still settling.
const MAX_RECHECK: Duration = Duration::from_secs(30);
/// How long a pass in progress may go on after SIGTERM before the agent stops without it (what
/// it was doing is left as `kill -9` would leave it, which every pass recovers from).
const STOP_GRACE: Duration = Duration::from_secs(7);
/// How long the status push at a stop may take, after the pass: the stop stays within 10 s.
const LAST_PUSH_WAIT: Duration = Duration::from_secs(2);

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
    /// The instance records or the flag key cannot be opened.
    #[error("instances: {0}")]
    Instances(crate::instances::OpenError),
}

/// The revision being applied, loaded and translated; kept between passes so a drift check needs
/// no reload.
struct Current {
    revision: String,
    /// The checkout the revision was loaded from (build contexts are read from it). It always holds
    /// this revision: a rejected revision is checked out only while it is loaded.
    root: std::path::PathBuf,
    desired: Desired,
    /// The cluster its charts were rendered for: another one that answers since (the first
    /// after the cluster was down, or an upgraded one) renders them again.
    cluster: Option<Arc<ClusterFacts>>,
}

/// The followed branch's tip when it was rejected: status says so after every pass until the tip
/// moves, whatever the passes over the running revision find.
struct Rejection {
    revision: String,
    problems: Vec<ProblemStatus>,
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

/// What runs the next pass when no trigger comes from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NextPass {
    /// A retry after the backoff, which doubles (up to a minute) while passes keep ending so.
    Retry,
    /// A check of objects still settling, after this delay.
    Recheck(Duration),
    /// Whatever was scheduled before this pass (a pass that looked at nothing new).
    AsScheduled,
    /// Nothing: the next trigger.
    Trigger,
}

/// How a pass ended and what comes next: all a pass returns. The status it produced is in
/// [`Agent::status`].
struct PassEnd {
    outcome: PassOutcome,
    /// Why the agent cannot do its job now; `None` when it can.
    unready: Option<String>,
    next: NextPass,
}

impl PassEnd {
    fn ready(outcome: PassOutcome, next: NextPass) -> PassEnd {
        PassEnd {
            outcome,
            unready: None,
            next,
        }
    }

    fn retry(outcome: PassOutcome, why: String) -> PassEnd {
        PassEnd {
            outcome,
            unready: Some(why),
            next: NextPass::Retry,
        }
    }
}

/// A timer that sends one trigger; scheduling another replaces it.
#[derive(Default)]
struct Timer(Option<tokio::task::JoinHandle<()>>);

impl Timer {
    fn set(&mut self, delay: Duration, sender: &TriggerSender, trigger: Trigger) {
        self.cancel();
        let sender = sender.clone();
        self.0 = Some(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            sender.send(trigger);
        }));
    }

    fn cancel(&mut self) {
        if let Some(timer) = self.0.take() {
            timer.abort();
        }
    }
}

/// A delay that doubles on each use, from one second up to [`MAX_BACKOFF`].
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(Duration::from_secs(1))
    }

    fn next(&mut self) -> Duration {
        let delay = self.0;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        delay
    }

    fn reset(&mut self) {
        self.0 = Duration::from_secs(1);
    }
}

struct Agent {
    config: AgentConfig,
    source: Source,
    /// Held for writing while the clone's checkout changes: runs read folders of it.
    checkout: Arc<tokio::sync::RwLock<()>>,
    pipelines: Pipelines,
    /// Per-team instances of instanced Challenges.
    instances: Instances,
    metrics: Metrics,
    shared: Arc<Shared>,
    sender: TriggerSender,
    engines: Option<Engines>,
    current: Option<Current>,
    /// The followed branch's tip, when it was rejected.
    rejection: Option<Rejection>,
    /// The followed branch's tip as last fetched.
    tip: Option<String>,
    /// Whether the last pass ran early for a webhook's commit and did not find it at the tip: a
    /// sender of made-up commits gets no more early passes until an ordinary one ran.
    false_announcement: bool,
    /// Content id (tree without `.berth`) of the revision last looked at.
    last_content: Option<String>,
    /// Why the clone was set aside, until a pass over a fresh one succeeds.
    healing: Option<String>,
    /// Status as of the last pass; shared with the server and `published`, never copied.
    status: Arc<StatusSet>,
    /// Status as on the remote (or the same in all but the time it was made); `None` until read
    /// (or when there is none).
    published: Option<Arc<StatusSet>>,
    status_read: bool,
    /// When the last pass ended.
    last_pass: Option<Instant>,
    /// The revision whose deletes were held (it would have deleted everything), and why.
    held_deletes: Option<(String, String)>,
    /// When the last pass that ran early for a webhook's new commit started.
    last_early_pass: Option<Instant>,
    /// The next pass without an outside trigger (a retry or a recheck): one at a time.
    next_pass: Timer,
    retry_backoff: Backoff,
    /// Delay before the next check of settling objects; grows while they keep settling.
    recheck: Duration,
    /// When objects started settling; rechecks stop after the config's `wait`.
    settling_since: Option<Instant>,
    /// The next attempt to push status that failed to push.
    next_push: Timer,
    push_backoff: Backoff,
}

/// Runs the agent until `shutdown` resolves: then finishes the pass in progress (for at most a few
/// seconds), pushes status and returns.
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
    let instances = Instances::open(&config.state_dir, &config.instances, &metrics)
        .map_err(AgentError::Instances)?;
    instances.push_status_through(sender.clone());
    // Only the leader runs pipelines and tends instances: a standby starts them when it takes
    // over.
    let mut leadership = match &config.leader_election {
        Some(election) => {
            let access = crate::backend::kube::Access::of(config.kube.as_ref());
            crate::leader::Leadership::elect(election, &access, &config.instance.to_string())
                .await?
        }
        None => crate::leader::Leadership::sole(),
    };
    let mut leading = leadership.leads();
    let mut pipelines_started = false;
    instances.set_leading(leading);
    tokio::spawn(instances.clone().run());
    if leading {
        pipelines.start().await;
        pipelines_started = true;
    }
    let shared = Arc::new(Shared::new(Arc::new(StatusSet::new(
        &config.instance.to_string(),
    ))));
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
    // Changes of desired state from the console: committed by this loop, between passes.
    let (changes_sender, mut changes) = tokio::sync::mpsc::channel(CHANGES_WAITING);
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
                instances: Some(instances.clone()),
                repo_url: config.repo.url.clone(),
                deliveries: Default::default(),
                console: crate::console::Console::new(
                    crate::console::Tokens {
                        operator: secrets.api_token.clone(),
                        viewer: secrets.viewer_token.clone(),
                    },
                    config.http.secure_cookies,
                    &config.instance.to_string(),
                    config.repo.web_url.as_deref(),
                )
                .with_changes(changes_sender.clone(), &config.repo.branch)
                .with_history(
                    source.workdir().to_path_buf(),
                    source.status_target().clone(),
                ),
            };
            let limits = crate::server::Limits::new(&config);
            if let Some(address) = config.http.health_listen {
                let listener = tokio::net::TcpListener::bind(address)
                    .await
                    .map_err(|source| AgentError::Listen { address, source })?;
                let stopping = stopping.clone();
                tracing::info!(%address, "health probes listening");
                tokio::spawn(crate::server::serve(
                    listener,
                    crate::server::health_router(state.clone()),
                    crate::server::HEALTH_LIMITS,
                    async move { stopping.notified().await },
                ));
            }
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
        instances,
        status: Arc::new(StatusSet::new(&config.instance.to_string())),
        config,
        metrics,
        shared,
        sender,
        engines: None,
        current: None,
        rejection: None,
        tip: None,
        false_announcement: false,
        last_content: None,
        healing: None,
        published: None,
        status_read: false,
        last_pass: None,
        last_early_pass: None,
        held_deletes: None,
        next_pass: Timer::default(),
        retry_backoff: Backoff::new(),
        recheck: Duration::from_secs(1),
        settling_since: None,
        next_push: Timer::default(),
        push_backoff: Backoff::new(),
    };
    let mut notified_ready = false;
    if !leading {
        agent.stand_by(&leadership);
        notified_ready = true;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }
    let stop = || {
        let stopping = stopping.clone();
        let stop_requested = stop_requested.clone();
        async move {
            if !stop_requested.load(Ordering::SeqCst) {
                stopping.notified().await;
            }
        }
    };
    // Resolves STOP_GRACE after a stop was asked for: what is still running then is left.
    let past_grace = || {
        let stopped = stop();
        async move {
            stopped.await;
            tokio::time::sleep(STOP_GRACE).await;
        }
    };
    let mut abandoned = false;
    loop {
        let batch = tokio::select! {
            Some(change) = changes.recv() => {
                // The Lease itself says whether this agent still leads, as before a pass.
                let leads = leading && leadership.confirm().await;
                tokio::select! {
                    () = agent.commit_change(change, leads) => {}
                    () = stop() => break,
                }
                continue;
            }
            batch = triggers.next_batch() => batch,
            () = stop() => None,
            () = leadership.changed() => {
                match (leading, leadership.leads()) {
                    (false, true) => {
                        tracing::info!(identity = leadership.identity(), "took the lead; a full pass converges what the last leader left");
                        *agent.shared.readiness.write().expect("lock") = Readiness::Starting;
                        if !pipelines_started {
                            agent.pipelines.start().await;
                            pipelines_started = true;
                        }
                        agent.instances.set_leading(true);
                        agent.sender.send(Trigger::Startup);
                    }
                    (true, false) => {
                        tracing::warn!(identity = leadership.identity(), "lost the lead; standing by");
                        agent.instances.set_leading(false);
                        agent.stand_by(&leadership);
                    }
                    _ => {}
                }
                leading = leadership.leads();
                continue;
            }
        };
        let Some(mut batch) = batch else { break };
        if stop_requested.load(Ordering::SeqCst) {
            break;
        }
        if !leading {
            tracing::debug!(triggers = batch.len(), "standing by: no pass");
            continue;
        }
        if batch.iter().all(|t| *t == Trigger::PushStatus) {
            let pushed = tokio::select! {
                () = agent.publish() => true,
                () = past_grace() => false,
            };
            if !pushed {
                abandoned = true;
                break;
            }
            continue;
        }
        let announced = agent.announced(&batch);
        if let Some(wait) = agent.too_soon(announced.is_some()) {
            tracing::debug!(
                wait_ms = wait.as_millis() as u64,
                "passes are at least minInterval apart"
            );
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop() => break,
            }
            batch.extend(triggers.waiting());
        }
        if !leadership.confirm().await {
            tracing::warn!(
                identity = leadership.identity(),
                "the Lease does not confirm the lead; no pass"
            );
            agent.stand_by(&leadership);
            let delay = agent.retry_backoff.next();
            agent.next_pass.set(delay, &agent.sender, Trigger::Retry);
            continue;
        }
        let finished = {
            let pass = agent.pass(&batch, announced);
            tokio::pin!(pass);
            tokio::select! {
                () = &mut pass => true,
                () = past_grace() => false,
            }
        };
        if !finished {
            tracing::warn!(
                grace_s = STOP_GRACE.as_secs(),
                "stopping before the pass in progress ended; the next start converges what it left"
            );
            abandoned = true;
            break;
        }
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
    agent.next_pass.cancel();
    agent.next_push.cancel();
    agent.pipelines.shutdown().await;
    // An abandoned pass may still hold git's one blocking thread: status waits for the next start.
    // Bounded like a pass: a git server that stalls the push does not hold the stop.
    if !abandoned
        && leadership.confirm().await
        && tokio::time::timeout(LAST_PUSH_WAIT, agent.publish())
            .await
            .is_err()
    {
        tracing::warn!("the last status push did not end in time; the next start pushes it");
    }
    leadership.resign().await;
    if let Some(server) = server {
        let _ = server.await;
    }
    Ok(())
}

/// Most console changes waiting for the agent; more are refused with "busy".
const CHANGES_WAITING: usize = 8;

/// Runs blocking git work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|panic| Err(SourceError::Local(format!("git task panicked: {panic}"))))
}

/// Where a git operation failed: a fetch may fail through the server's fault; a checkout or a
/// load fails only through the clone's or the disk's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GitStage {
    Fetch,
    Checkout,
}

impl Agent {
    /// Commits a console's change of a descriptor's state to the followed branch and answers the
    /// console; a pass follows when it landed there. A standby commits nothing.
    async fn commit_change(&mut self, change: crate::console::StateChange, leading: bool) {
        let crate::console::StateChange {
            key,
            state,
            requested_by,
            reply,
        } = change;
        if !leading {
            let _ = reply.send(Err("this agent stands by; use the leader's console".into()));
            return;
        }
        let source = self.source.clone();
        let side_branch = format!(
            "berth/console/{}-{}-{}-{}",
            key.kind.as_str().to_ascii_lowercase(),
            key.name,
            chrono::Utc::now().format("%Y%m%d%H%M%S"),
            crate::backend::random_bytes()
                .map(|b| hex::encode(&b[..3]))
                .unwrap_or_default()
        );
        let (committing, to) = (key.clone(), side_branch.clone());
        let committed =
            blocking(move || source.commit_state(&committing, state, &requested_by, &to)).await;
        match &committed {
            Ok(crate::source::Committed::Pushed { commit, .. }) => {
                tracing::info!(object = %key, state = state.as_str(), %commit, "the console's change committed; a pass applies it");
                self.sender.send(Trigger::ConsoleCommit);
            }
            Ok(crate::source::Committed::ToSideBranch {
                commit, refused, ..
            }) => {
                tracing::warn!(object = %key, %commit, branch = %side_branch, %refused, "the followed branch refused the console's change; it is on a branch of its own");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(object = %key, %error, "the console's change was not committed")
            }
        }
        let _ = reply.send(committed.map_err(|e| e.to_string()));
    }

    /// `announced`: the new commit a webhook announced, for which this pass runs early.
    async fn pass(&mut self, batch: &[Trigger], announced: Option<String>) {
        let started = Instant::now();
        let span = tracing::info_span!("pass", revision = tracing::field::Empty);
        let names: Vec<&str> = batch.iter().map(Trigger::name).collect();
        let before = Arc::clone(&self.status);
        let end = async {
            tracing::debug!(triggers = ?names, "pass starts");
            // A retry re-runs what failed, which may have been a recheck or a run's roll: it
            // looks at the engines even without drift checks.
            let recheck = batch
                .iter()
                .any(|t| matches!(t, Trigger::Recheck | Trigger::RunEnded | Trigger::Retry));
            self.run_pass(recheck).await
        }
        .instrument(span)
        .await;
        // An early pass whose commit was not at the tip was a false announcement: no more early
        // passes until a webhook's commit is found there.
        let announced_found = batch.iter().any(|t| match t {
            Trigger::Webhook {
                commit: Some(commit),
                ..
            } => self.tip.as_ref() == Some(commit),
            _ => false,
        });
        if announced_found {
            self.false_announcement = false;
        } else if announced.is_some() {
            self.false_announcement = true;
        }
        if announced.is_some() {
            self.last_early_pass = Some(Instant::now());
        }
        self.finish(end, &before, started.elapsed(), &names).await;
    }

    /// The one place a pass ends: status (a rejected tip stays rejected), readiness, metrics, the
    /// status push and the next pass.
    async fn finish(
        &mut self,
        end: PassEnd,
        before: &StatusSet,
        took: Duration,
        triggers: &[&str],
    ) {
        if let Some(rejection) = &self.rejection {
            self.status = Arc::new(status::still_rejected(
                (*self.status).clone(),
                before,
                &rejection.revision,
                &rejection.problems,
                &now(),
            ));
        }
        self.metrics.pass(end.outcome.as_str(), took);
        self.metrics.objects(&self.status.agent.phases);
        self.shared.publish(Arc::clone(&self.status));
        *self.shared.readiness.write().expect("lock") = match &end.unready {
            Some(why) => Readiness::Degraded(why.clone()),
            None => Readiness::Ready,
        };
        if end.unready.is_none()
            && let Some(why) = self.healing.take()
        {
            tracing::info!(%why, "recovered: the clone made afresh works");
        }
        match end.next {
            NextPass::Retry => {
                let delay = self.retry_backoff.next();
                tracing::info!(retry_in_s = delay.as_secs(), "will retry");
                self.next_pass.set(delay, &self.sender, Trigger::Retry);
            }
            NextPass::Recheck(delay) => {
                self.retry_backoff.reset();
                self.next_pass.set(delay, &self.sender, Trigger::Recheck);
            }
            NextPass::AsScheduled => {}
            NextPass::Trigger => {
                self.retry_backoff.reset();
                self.next_pass.cancel();
            }
        }
        self.last_pass = Some(Instant::now());
        tracing::info!(
            result = end.outcome.as_str(),
            took_ms = took.as_millis() as u64,
            triggers = ?triggers,
            "pass done"
        );
        self.publish().await;
        crate::heap::give_back_freed();
    }

    /// A commit a webhook in `batch` announced that is not the tip last fetched: its pass may run
    /// early, at most once per `minInterval`, and not while the last early pass found its
    /// announcement false.
    fn announced(&self, batch: &[Trigger]) -> Option<String> {
        let early_lately = self
            .last_early_pass
            .is_some_and(|at| at.elapsed() < self.config.min_interval.0);
        if self.false_announcement || early_lately {
            return None;
        }
        batch.iter().find_map(|trigger| match trigger {
            Trigger::Webhook {
                commit: Some(commit),
                ..
            } if self.tip.as_ref() != Some(commit) => Some(commit.clone()),
            _ => None,
        })
    }

    /// How long the next pass must wait to keep passes `minInterval` apart; `None` when it may
    /// run now: the first pass, or one for a new commit a webhook announced.
    fn too_soon(&self, new_commit: bool) -> Option<Duration> {
        let since = self.last_pass?.elapsed();
        let wait = self.config.min_interval.0.checked_sub(since)?;
        (!new_commit).then_some(wait)
    }

    fn stand_by(&self, leadership: &crate::leader::Leadership) {
        *self.shared.readiness.write().expect("lock") =
            Readiness::Standby(leadership.identity().to_string());
    }

    async fn run_pass(&mut self, recheck: bool) -> PassEnd {
        let source = self.source.clone();
        let revision = match blocking(move || source.fetch()).await {
            Ok(revision) => revision,
            Err(error) => return self.git_failed(GitStage::Fetch, error).await,
        };
        tracing::Span::current().record("revision", short_revision(&revision));
        self.tip = Some(revision.clone());
        if !self.status_read {
            self.read_status().await;
        }
        let source = self.source.clone();
        let at = revision.clone();
        let content = match blocking(move || source.content_id(&at)).await {
            Ok(content) => content,
            Err(error) => return self.git_failed(GitStage::Fetch, error).await,
        };
        let cluster = match self.engines().await {
            Ok(engines) => engines.cluster_facts().await,
            Err(_) => None,
        };
        let cluster_changed = cluster.is_some()
            && self
                .current
                .as_ref()
                .is_some_and(|current| current.cluster != cluster);
        let moved = self.last_content.as_deref() != Some(content.as_str()) || cluster_changed;
        if !moved && (!(self.config.drift_check || recheck) || self.current.is_none()) {
            return PassEnd::ready(PassOutcome::Unchanged, NextPass::AsScheduled);
        }
        if moved {
            match self.load(&revision, cluster.clone()).await {
                Ok(Some(current)) => {
                    self.current = Some(current);
                    self.rejection = None;
                }
                Ok(None) => {
                    self.last_content = Some(content);
                    self.keep_running_after_restart(cluster).await;
                    return PassEnd::ready(PassOutcome::Rejected, NextPass::AsScheduled);
                }
                Err(error) => return self.git_failed(GitStage::Checkout, error).await,
            }
        }
        let end = self.apply_current(moved).await;
        if end.outcome != PassOutcome::Transient {
            self.last_content = Some(content);
        }
        end
    }

    /// A git operation failed. The clone is checked first: a damaged one is set aside and cloned
    /// afresh on a retry. With a whole clone, a fetch failed through the server's fault (or the
    /// network's), which is retried with backoff and leaves status alone; a checkout failed
    /// through the disk's or the folder's, which a retry cannot fix, so the next pass waits for a
    /// trigger.
    async fn git_failed(&mut self, stage: GitStage, error: SourceError) -> PassEnd {
        let why = error.to_string();
        match error {
            SourceError::NoBranch { .. } => {
                // Deleted on the server: what runs keeps running, and everyone is told. When it
                // comes back, even at the same commit, it is loaded again.
                self.last_content = None;
                tracing::error!(%why, "the followed branch is gone; what runs is left as it is");
                self.unapplied(PassResult::Transient, &why);
                return PassEnd::retry(PassOutcome::Transient, why);
            }
            SourceError::Push { .. } => return PassEnd::retry(PassOutcome::Transient, why),
            // A host key not known, or credentials refused: what runs keeps running, status and
            // readiness say what to fix, and no retry hammers the server meanwhile.
            SourceError::Refused { .. } => {
                tracing::error!(%why, "the git server refused us; not retrying until the next trigger");
                self.unapplied(PassResult::Broken, &why);
                return PassEnd {
                    outcome: PassOutcome::Broken,
                    unready: Some(why),
                    next: NextPass::Trigger,
                };
            }
            // A fetch fails on a damaged clone too (its own objects, or a pack whose bases are in
            // them), in words much like a server's: the clone is checked whatever git said.
            SourceError::Unreachable { .. } | SourceError::Local(_) => {}
        }
        let source = self.source.clone();
        let checkout = Arc::clone(&self.checkout);
        let _checkout = checkout.write().await;
        let damaged = blocking(move || Ok(source.check_clone().err())).await;
        if let Ok(Some(damage)) = damaged {
            let source = self.source.clone();
            let why = match blocking(move || source.set_aside()).await {
                Ok(aside) => format!(
                    "the clone in {} is damaged ({damage}; {why}); it was moved to {} and is cloned afresh",
                    self.source.workdir().display(),
                    aside.display()
                ),
                Err(error) => format!(
                    "the clone in {} is damaged ({damage}) and cannot be moved aside: {error}",
                    self.source.workdir().display()
                ),
            };
            tracing::error!(%why, "damaged clone");
            // The fresh clone must be checked out again, whatever its content.
            self.last_content = None;
            self.healing = Some(why.clone());
            self.unapplied(PassResult::Broken, &why);
            return PassEnd::retry(PassOutcome::Broken, why);
        }
        if stage == GitStage::Fetch {
            tracing::warn!(%why, "the git server cannot be used; the running state is left as it is");
            return PassEnd::retry(PassOutcome::Transient, why);
        }
        let why = format!(
            "the checkout in {} cannot be written or read ({why}); nothing was applied. Check the disk, or stop the agent and remove that folder to clone afresh",
            self.source.workdir().display()
        );
        tracing::error!(%why, "checkout unusable; not retrying until the next trigger");
        self.unapplied(PassResult::Broken, &why);
        PassEnd {
            outcome: PassOutcome::Broken,
            unready: Some(why),
            next: NextPass::Trigger,
        }
    }

    /// After a restart (or a takeover) at a rejected tip, nothing is loaded yet: the revision
    /// status says was applied last is loaded, so what runs is still checked for drift and
    /// rechecked, as it would be had the agent not restarted.
    async fn keep_running_after_restart(&mut self, cluster: Option<Arc<ClusterFacts>>) {
        let (Some(applied), Some(tip)) = (
            self.status
                .agent
                .last_applied_revision
                .clone()
                .filter(|_| self.current.is_none()),
            self.tip.clone(),
        ) else {
            return;
        };
        // Status can be written by anyone who can push to its branch: only a revision of the
        // followed branch's history is taken from it.
        let source = self.source.clone();
        let (at, of) = (applied.clone(), tip);
        if !blocking(move || source.is_ancestor_or_tip(&at, &of))
            .await
            .unwrap_or(false)
        {
            tracing::warn!(
                revision = short_revision(&applied),
                "the last applied revision in status is not of the followed branch's history; nothing is loaded"
            );
            return;
        }
        let rejection = self.rejection.take();
        let status = Arc::clone(&self.status);
        match self.load(&applied, cluster).await {
            Ok(Some(current)) => {
                tracing::info!(
                    revision = short_revision(&applied),
                    "the tip is rejected; the last applied revision is kept converged"
                );
                self.current = Some(current);
            }
            Ok(None) => tracing::warn!(
                revision = short_revision(&applied),
                "the last applied revision does not load either"
            ),
            Err(error) => {
                tracing::warn!(%error, revision = short_revision(&applied), "the last applied revision cannot be checked out")
            }
        }
        // Loading it never changes what status says about the tip.
        self.rejection = rejection;
        self.status = status;
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

    /// Checks `revision` out and loads it. `Ok(None)`: invalid, and the problems are in status
    /// and [`Agent::rejection`]; the checkout is then put back at the applied revision, so drift
    /// correction and retries build from what is applied, never from the rejected revision.
    /// Its charts are rendered for `cluster`.
    async fn load(
        &mut self,
        revision: &str,
        cluster: Option<Arc<ClusterFacts>>,
    ) -> Result<Option<Current>, SourceError> {
        let source = self.source.clone();
        let at = revision.to_string();
        let applied = self.current.as_ref().map(|c| c.revision.clone());
        // Runs copying a folder of the checkout finish first, and none starts meanwhile.
        let _checkout = self.checkout.write().await;
        let options = descriptor::LoadOptions {
            cluster: cluster.clone(),
            ..self.config.load_options()
        };
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
            let problems: Vec<ProblemStatus> =
                loaded.problems.iter().map(ProblemStatus::from).collect();
            self.status = Arc::new(status::after_rejection(
                &self.status,
                revision,
                &problems,
                &now(),
            ));
            self.rejection = Some(Rejection {
                revision: revision.to_string(),
                problems,
            });
            return Ok(None);
        }
        let desired = reconcile::desired(&loaded);
        self.pipelines.declare(revision, &desired);
        // Only the translated form is kept: the typed descriptors are not needed between passes.
        Ok(Some(Current {
            revision: revision.to_string(),
            root: loaded.root,
            desired,
            cluster,
        }))
    }

    async fn engines(&mut self) -> Result<Engines, String> {
        if let Some(engines) = &self.engines {
            return Ok(engines.clone());
        }
        let access = crate::backend::kube::Access::of(self.config.kube.as_ref());
        let mut engines = reconcile::connect(&self.config.instance.to_string(), &access)
            .await
            .map_err(|e| e.to_string())?;
        engines.set_workspace_limit(self.config.pipelines.workspace_limit);
        engines.run_solvers();
        self.engines = Some(engines.clone());
        Ok(engines)
    }

    async fn apply_current(&mut self, moved: bool) -> PassEnd {
        let engines = match self.engines().await {
            Ok(engines) => engines,
            Err(why) => return self.engine_failed(why),
        };
        let current = self.current.as_ref().expect("a loaded revision");
        // A hold recorded in status for the revision applied (by this agent before a restart, or
        // by the leader before a takeover) still holds.
        if self.held_deletes.is_none()
            && self.status.agent.last_applied_revision.as_deref() == Some(current.revision.as_str())
            && self
                .status
                .agent
                .message
                .starts_with(crate::plan::HELD_DELETES)
        {
            self.held_deletes = Some((current.revision.clone(), self.status.agent.message.clone()));
        }
        let options = ApplyOptions {
            concurrency: self.config.concurrency,
            lock_wait: LOCK_WAIT,
            policy: Policy {
                prune: self.config.prune,
                allow_empty: self.config.prune_allow_empty,
                held: self
                    .held_deletes
                    .as_ref()
                    .filter(|(revision, _)| *revision == current.revision)
                    .map(|(_, why)| why.clone()),
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
            Err(error) => return self.engine_failed(error.to_string()),
        };
        // A version whose pass made its network (after its image) is ready for spawns.
        let ready = |template: &crate::backend::instances::InstanceTemplate| {
            applied.observed.iter().any(|object| {
                object.key == *template.key()
                    && object
                        .parts
                        .iter()
                        .any(|part| part.hash == template.version())
            })
        };
        self.instances.declare(
            applied.planned.desired.instanced(),
            ready,
            engines.instance_engines(),
        );
        // Held for as long as this revision is the one applied: once objects it declares are
        // made, a later pass would no longer see it delete everything, and must not prune then.
        let current = self.current.as_ref().expect("a loaded revision");
        self.held_deletes = applied
            .planned
            .plan
            .held
            .clone()
            .map(|why| (current.revision.clone(), why));
        if let Some((_, held)) = &self.held_deletes {
            tracing::warn!(%held, "deletes held");
        }
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
            tracing::warn!(%why, "an engine stopped answering mid-pass; will retry");
            return PassEnd::retry(PassOutcome::Transient, why.to_string());
        }
        let outcome = match self.status.agent.result {
            _ if drift_only => PassOutcome::Unchanged,
            Some(PassResult::Failed) => PassOutcome::Failed,
            _ => PassOutcome::Applied,
        };
        PassEnd::ready(outcome, self.recheck_if_settling())
    }

    /// Objects still starting (a health check not yet passed) are checked again soon, with a
    /// growing delay, instead of holding the pass until they settle; for at most `wait`, after
    /// which the schedule, webhooks and drift checks take over.
    fn recheck_if_settling(&mut self) -> NextPass {
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
            return NextPass::Trigger;
        }
        let since = *self.settling_since.get_or_insert_with(Instant::now);
        if since.elapsed() > self.config.wait.0 {
            tracing::warn!(objects = ?settling, wait_s = self.config.wait.0.as_secs(), "still not healthy; no more rechecks until the next pass");
            return NextPass::Trigger;
        }
        let delay = self.recheck;
        self.recheck = (self.recheck * 2).min(MAX_RECHECK);
        NextPass::Recheck(delay)
    }

    /// An engine could not be used (down, or its lock held by another berth): nothing is applied
    /// and the pass is retried.
    fn engine_failed(&mut self, why: String) -> PassEnd {
        self.engines = None;
        tracing::warn!(%why, "nothing applied; will retry");
        self.unapplied(PassResult::Transient, &why);
        PassEnd::retry(PassOutcome::Transient, why)
    }

    /// Records a pass that applied nothing for a reason outside the repo.
    fn unapplied(&mut self, result: PassResult, why: &str) {
        let revision = self
            .current
            .as_ref()
            .map(|c| c.revision.clone())
            .unwrap_or_default();
        self.status = Arc::new(status::after_unapplied(
            &self.status,
            &revision,
            result,
            why,
            &now(),
        ));
    }

    /// Commits and pushes the status when it differs from what the remote holds. A failure is
    /// shown (`/api/v1/status`, the `berth_status_pushes_total` metric, the log) and retried on
    /// its own backoff, without a pass.
    async fn publish(&mut self) {
        if !self.status_read {
            // Until the remote's status is read, there is nothing to add to it (and an empty
            // status laid over it would remove its files).
            return;
        }
        if let Some(history) = self.pipelines.history_if_changed()
            && let Some(status) = self.status.with_runs(&history)
        {
            self.status = Arc::new(status);
            self.shared.publish(Arc::clone(&self.status));
        }
        if let Ok(counts) = self.instances.counts()
            && let Some(status) = self.status.with_instances(&counts)
        {
            self.status = Arc::new(status);
            self.shared.publish(Arc::clone(&self.status));
        }
        if self
            .published
            .as_ref()
            .is_some_and(|published| !self.status.differs_from(published))
        {
            // The same in all but the time it was made: one copy is kept, not two (at a thousand
            // objects, a copy is megabytes).
            self.published = Some(Arc::clone(&self.status));
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
        let result = self.status.agent.result.map_or("none", PassResult::as_str);
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
                        packed,
                        stored,
                    } => tracing::info!(
                        commit = short_revision(commit),
                        retries,
                        files = self.status.objects.len() + 1,
                        tree_ms = made.as_secs_f64() * 1000.0,
                        pack_ms = packed.as_secs_f64() * 1000.0,
                        commit_ms = stored.as_secs_f64() * 1000.0,
                        took_ms = started.elapsed().as_millis() as u64,
                        "status pushed"
                    ),
                    Published::Unchanged => tracing::debug!("status already on the remote"),
                }
                self.metrics.status_push("pushed");
                self.published = Some(Arc::clone(&self.status));
                self.push_backoff.reset();
                self.next_push.cancel();
                if self
                    .shared
                    .status_push
                    .write()
                    .expect("lock")
                    .take()
                    .is_some()
                {
                    tracing::info!("status pushed again after failures");
                }
            }
            Err(error) => {
                let delay = self.push_backoff.next();
                tracing::warn!(%error, retry_in_s = delay.as_secs(), "status not pushed; applying goes on, the push is retried");
                self.metrics.status_push("failed");
                *self.shared.status_push.write().expect("lock") = Some(error.to_string());
                self.next_push.set(delay, &self.sender, Trigger::PushStatus);
            }
        }
    }
}
