//! Everything that can start a pass (the cron schedule, a webhook, a change in a local repo, an
//! API call, a retry), as one stream. Triggers that arrive while a pass runs are coalesced: the
//! next [`Triggers::next_batch`] returns them all, and they cause one follow-up pass.

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::descriptor::values::CronExpr;

/// Why a pass runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The agent started.
    Startup,
    /// The cron schedule fired.
    Schedule,
    /// A verified webhook announced a push to the followed branch (the server logs which
    /// provider's).
    Webhook {
        /// The commit it announced, if it said.
        commit: Option<String>,
    },
    /// The local repo changed on disk.
    FileChange,
    /// `POST /api/v1/reconcile`.
    Api,
    /// The console committed a change of desired state to the followed branch.
    ConsoleCommit,
    /// A retry after a transient failure.
    Retry,
    /// A check of objects still settling (a rollout, a health check not yet passed): the agent
    /// requeues one instead of holding a pass while it waits.
    Recheck,
    /// A pipeline run ended: what uses its image rolls to it, and status shows the run.
    RunEnded,
    /// Another attempt to push status that failed to push: no pass, only the push.
    PushStatus,
}

impl Trigger {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Schedule => "schedule",
            Trigger::Webhook { .. } => "webhook",
            Trigger::FileChange => "file-change",
            Trigger::Api => "api",
            Trigger::ConsoleCommit => "console-commit",
            Trigger::Retry => "retry",
            Trigger::Recheck => "recheck",
            Trigger::RunEnded => "run-ended",
            Trigger::PushStatus => "push-status",
        }
    }
}

/// Sends triggers; cheap to clone.
#[derive(Debug, Clone)]
pub struct TriggerSender(mpsc::UnboundedSender<Trigger>);

impl TriggerSender {
    /// Asks for a pass. Never blocks; a trigger sent while the agent is stopping is dropped.
    pub fn send(&self, trigger: Trigger) {
        let _ = self.0.send(trigger);
    }
}

/// The receiving end, owned by the agent's loop.
#[derive(Debug)]
pub struct Triggers(mpsc::UnboundedReceiver<Trigger>);

/// A connected sender and receiver.
pub fn channel() -> (TriggerSender, Triggers) {
    let (sender, receiver) = mpsc::unbounded_channel();
    (TriggerSender(sender), Triggers(receiver))
}

impl Triggers {
    /// Waits for a trigger, then takes every other one already waiting: one pass serves them all.
    pub async fn next_batch(&mut self) -> Option<Vec<Trigger>> {
        let first = self.0.recv().await?;
        let mut batch = vec![first];
        while let Ok(more) = self.0.try_recv() {
            batch.push(more);
        }
        Some(batch)
    }

    /// Every trigger waiting now, without waiting for one.
    pub fn waiting(&mut self) -> Vec<Trigger> {
        std::iter::from_fn(|| self.0.try_recv().ok()).collect()
    }
}

/// Sends [`Trigger::Schedule`] at every time `schedule` names, until the receiver is gone.
pub fn spawn_schedule(schedule: CronExpr, sender: TriggerSender) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let now = chrono::Utc::now();
            let Ok(next) = schedule.schedule().find_next_occurrence(&now, false) else {
                tracing::warn!(%schedule, "the schedule names no future time; scheduled passes stop");
                return;
            };
            let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            if sender.0.send(Trigger::Schedule).is_err() {
                return;
            }
        }
    })
}

/// How long a local repo must be quiet after a change before a pass starts: an editor's save or
/// a commit touches several files.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Watches the local repo at `path` and sends one [`Trigger::FileChange`] per burst of changes.
/// Changes to git's object store alone (a gc, a fetch into it) are not changes to act on.
pub fn watch_local_repo(
    path: &Path,
    sender: TriggerSender,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let (changes, mut changed) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            let text = p.to_string_lossy();
            !(text.contains("/.git/objects/") || text.ends_with(".lock"))
        });
        if relevant {
            let _ = changes.send(());
        }
    })?;
    watcher.watch(path, RecursiveMode::Recursive)?;
    tokio::spawn(async move {
        while changed.recv().await.is_some() {
            // Wait for quiet, swallowing the rest of the burst.
            loop {
                match tokio::time::timeout(DEBOUNCE, changed.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if sender.0.send(Trigger::FileChange).is_err() {
                return;
            }
        }
    });
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn triggers_waiting_during_a_pass_become_one_batch() {
        let (sender, mut triggers) = channel();
        sender.send(Trigger::Startup);
        assert_eq!(triggers.next_batch().await.unwrap(), [Trigger::Startup]);
        // A pass runs; meanwhile three triggers arrive.
        sender.send(Trigger::Schedule);
        sender.send(Trigger::Api);
        sender.send(Trigger::Webhook { commit: None });
        let batch = triggers.next_batch().await.unwrap();
        assert_eq!(batch.len(), 3, "one follow-up pass serves them all");
    }
}
