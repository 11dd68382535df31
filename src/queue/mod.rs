//! The pipeline run queue: the rules that decide which runs (recorded as [`crate::run::Run`]) are
//! admitted, which a newer one supersedes, and which queued run a free
//! worker takes next. The rules are pure, over the runs the store holds; [`store`] keeps the runs
//! in SQLite so that none is lost when the agent stops, even by `kill -9`.
//!
//! A run goes `queued → running → succeeded | failed | cancelled`; one that was running when the
//! agent died becomes `interrupted`, and is queued once more (a second attempt) if it was a first.

pub mod store;
pub mod workers;

use std::collections::HashMap;

pub use crate::run::{Cause, Run, RunState, StepRecord};

/// A run someone asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRun {
    /// The pipeline.
    pub pipeline: String,
    /// What asks.
    pub cause: Cause,
    /// The commit to build; the source's `ref` (or the config repo's applied revision) when absent.
    pub commit: Option<String>,
    /// The branch a push was to.
    pub branch: Option<String>,
    /// The webhook delivery id.
    pub delivery: Option<String>,
    /// The descriptor's spec hash.
    pub spec_hash: Option<String>,
}

/// Whether a run is taken into the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The same delivery, or a push of the same commit, is already queued, running or done.
    Duplicate {
        /// The run that already serves it.
        of: i64,
    },
    /// The pipeline already has [`MAX_QUEUED`] runs waiting: refused, so a flood of pushes
    /// cannot fill the disk or slow every enqueue.
    Full,
    /// Queued; these queued runs are superseded by it, and these running ones are to be
    /// cancelled (`cancelRunning: true`).
    Admitted {
        /// Queued runs it supersedes.
        superseded: Vec<i64>,
        /// Running runs it supersedes.
        cancel_running: Vec<i64>,
    },
}

/// Most runs of one pipeline waiting for a worker.
pub const MAX_QUEUED: usize = 50;

/// Decides whether `new` is admitted, given the runs of its pipeline already in the store
/// (`others`); `cancel_running` is the pipeline's `cancelRunning`.
///
/// - A delivery seen before is a duplicate (providers redeliver on timeouts).
/// - A push of a commit already queued, running or built (succeeded or failed) is a duplicate:
///   only a person (a manual run) builds the same commit again.
/// - A push that names no commit (its branch's tip is built) while one such push of the branch
///   waits, or a schedule while a scheduled run waits, is a duplicate of the waiting one.
/// - A push supersedes the queued pushes of other commits to the same branch; a change supersedes
///   queued changes of another spec. With `cancel_running`, running ones too.
/// - At most [`MAX_QUEUED`] runs of a pipeline wait.
pub fn admit(new: &NewRun, others: &[Run], cancel_running: bool) -> Admission {
    if let Some(delivery) = &new.delivery
        && let Some(seen) = others
            .iter()
            .find(|r| r.delivery.as_ref() == Some(delivery))
    {
        return Admission::Duplicate { of: seen.id };
    }
    if new.cause == Cause::Push
        && let Some(commit) = &new.commit
        && let Some(built) = others.iter().find(|r| {
            r.commit.as_ref() == Some(commit)
                && !matches!(r.state, RunState::Cancelled | RunState::Interrupted)
        })
    {
        return Admission::Duplicate { of: built.id };
    }
    let waiting_alike = others.iter().find(|r| {
        r.state == RunState::Queued
            && r.cause == new.cause
            && match new.cause {
                Cause::Push => new.commit.is_none() && r.commit.is_none() && r.branch == new.branch,
                Cause::Schedule => true,
                _ => false,
            }
    });
    if let Some(waiting) = waiting_alike {
        return Admission::Duplicate { of: waiting.id };
    }
    let same_commit = |run: &Run| run.commit.is_some() && run.commit == new.commit;
    let supersedes = |run: &Run| match new.cause {
        Cause::Push => run.cause == Cause::Push && run.branch == new.branch && !same_commit(run),
        Cause::Change => run.cause == Cause::Change && run.spec_hash != new.spec_hash,
        _ => false,
    };
    let queued = others
        .iter()
        .filter(|r| r.state == RunState::Queued && !supersedes(r))
        .count();
    if queued >= MAX_QUEUED {
        return Admission::Full;
    }
    let mut superseded = Vec::new();
    let mut running = Vec::new();
    for run in others.iter().filter(|r| supersedes(r)) {
        match run.state {
            RunState::Queued => superseded.push(run.id),
            RunState::Running if cancel_running => running.push(run.id),
            _ => {}
        }
    }
    Admission::Admitted {
        superseded,
        cancel_running: running,
    }
}

/// What a pass does for a Pipeline whose product is missing or stale, given the newest run the
/// pass asked for with this spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeRun {
    /// Queue one.
    Queue,
    /// One is queued or running: wait for it.
    Wait(String),
    /// The run for this spec failed: a failure until the spec or the source changes, or a person
    /// runs it again. Never retried on its own, so a broken build does not loop.
    Failed(String),
}

/// See [`ChangeRun`].
pub fn change_run(latest: Option<&Run>) -> ChangeRun {
    let Some(run) = latest else {
        return ChangeRun::Queue;
    };
    match run.state {
        RunState::Queued => ChangeRun::Wait(format!("run {} is queued", run.id)),
        RunState::Running => ChangeRun::Wait(format!("run {} is running", run.id)),
        RunState::Failed => ChangeRun::Failed(format!(
            "run {} failed: {}; push a fix, or start a run by hand (POST /api/v1/pipelines/{}/runs)",
            run.id,
            run.message.as_deref().unwrap_or("no reason recorded"),
            run.pipeline
        )),
        RunState::Cancelled => ChangeRun::Failed(format!(
            "run {} was cancelled ({}); start a run by hand (POST /api/v1/pipelines/{}/runs) or change the spec",
            run.id,
            run.message.as_deref().unwrap_or("no reason recorded"),
            run.pipeline
        )),
        // Its image is gone (removed by hand), or the engine or the agent stopped under it.
        RunState::Succeeded | RunState::Interrupted => ChangeRun::Queue,
    }
}

/// The queued run a free worker takes next: the oldest whose pipeline runs fewer than its
/// `concurrency` at once. `queued` is oldest first, as (id, pipeline).
pub fn next_to_start<'a>(
    queued: impl IntoIterator<Item = (i64, &'a str)>,
    running: &HashMap<String, u32>,
    concurrency: impl Fn(&str) -> u32,
) -> Option<i64> {
    queued
        .into_iter()
        .find(|(_, pipeline)| running.get(*pipeline).copied().unwrap_or(0) < concurrency(pipeline))
        .map(|(id, _)| id)
}

/// Whether a push to `branch` starts a run of a pipeline whose push trigger lists `branches`
/// (every branch when the list is empty).
pub fn branch_matches(branches: &[String], branch: &str) -> bool {
    branches.is_empty() || branches.iter().any(|b| b == branch)
}

/// The next time one of `schedules` fires after `after`, and the pipelines that fire then.
pub fn next_due(
    schedules: &[(String, crate::descriptor::values::CronExpr)],
    after: chrono::DateTime<chrono::Utc>,
) -> Option<(chrono::DateTime<chrono::Utc>, Vec<String>)> {
    let mut due: Option<(chrono::DateTime<chrono::Utc>, Vec<String>)> = None;
    for (pipeline, schedule) in schedules {
        let Ok(next) = schedule.schedule().find_next_occurrence(&after, false) else {
            continue;
        };
        match &mut due {
            Some((when, names)) if *when == next => names.push(pipeline.clone()),
            Some((when, _)) if *when < next => {}
            _ => due = Some((next, vec![pipeline.clone()])),
        }
    }
    due
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A run of `app` with the given id, state and commit, queued by a push to `main`.
    pub(crate) fn run(id: i64, state: RunState, commit: &str) -> Run {
        Run {
            id,
            pipeline: "app".into(),
            state,
            cause: Cause::Push,
            commit: Some(commit.into()),
            branch: Some("main".into()),
            delivery: None,
            spec_hash: Some("h1".into()),
            attempt: 1,
            retry_of: None,
            queued_at: "2026-12-02T00:00:00Z".into(),
            started_at: None,
            finished_at: None,
            duration_ms: None,
            message: None,
            image: None,
            steps: Vec::new(),
        }
    }

    fn push(commit: &str, delivery: Option<&str>) -> NewRun {
        NewRun {
            pipeline: "app".into(),
            cause: Cause::Push,
            commit: Some(commit.into()),
            branch: Some("main".into()),
            delivery: delivery.map(String::from),
            spec_hash: Some("h1".into()),
        }
    }

    #[test]
    fn a_delivery_seen_before_or_a_commit_built_before_is_a_duplicate() {
        let mut seen = run(1, RunState::Running, "c1");
        seen.delivery = Some("d-1".into());
        assert_eq!(
            admit(&push("c9", Some("d-1")), &[seen.clone()], false),
            Admission::Duplicate { of: 1 }
        );
        for state in [
            RunState::Queued,
            RunState::Running,
            RunState::Succeeded,
            RunState::Failed,
        ] {
            let built = run(2, state, "c2");
            assert_eq!(
                admit(&push("c2", Some("d-2")), &[built], false),
                Admission::Duplicate { of: 2 },
                "{state:?}"
            );
        }
        // A cancelled or interrupted run of that commit built nothing: it may be built again.
        for state in [RunState::Cancelled, RunState::Interrupted] {
            assert!(matches!(
                admit(&push("c2", None), &[run(2, state, "c2")], false),
                Admission::Admitted { .. }
            ));
        }
        // A person may build a commit again.
        let mut manual = push("c2", None);
        manual.cause = Cause::Manual;
        assert!(matches!(
            admit(&manual, &[run(2, RunState::Succeeded, "c2")], false),
            Admission::Admitted { .. }
        ));
    }

    #[test]
    fn a_newer_commit_supersedes_queued_runs_of_its_branch_and_running_ones_only_when_asked() {
        let mut other_branch = run(3, RunState::Queued, "c0");
        other_branch.branch = Some("feature".into());
        let others = [
            run(1, RunState::Queued, "c1"),
            run(2, RunState::Running, "c1b"),
            other_branch,
            run(4, RunState::Succeeded, "c0"),
        ];
        assert_eq!(
            admit(&push("c5", None), &others, false),
            Admission::Admitted {
                superseded: vec![1],
                cancel_running: vec![]
            }
        );
        assert_eq!(
            admit(&push("c5", None), &others, true),
            Admission::Admitted {
                superseded: vec![1],
                cancel_running: vec![2]
            }
        );
    }

    /// Hostile findings: scheduled runs piled up behind a long run, one a minute; pushes that
    /// named no commit were built once each; a flood of pushes to new branches filled the queue.
    #[test]
    fn schedules_and_pushes_without_a_commit_wait_once_and_the_queue_is_bounded() {
        let mut scheduled = run(1, RunState::Queued, "c");
        scheduled.cause = Cause::Schedule;
        let tick = NewRun {
            cause: Cause::Schedule,
            commit: None,
            ..push("c", None)
        };
        assert_eq!(
            admit(&tick, &[scheduled], false),
            Admission::Duplicate { of: 1 }
        );
        let mut tip = run(2, RunState::Queued, "c");
        tip.commit = None;
        let another_tip = NewRun {
            commit: None,
            ..push("c", Some("d-9"))
        };
        assert_eq!(
            admit(&another_tip, &[tip.clone()], false),
            Admission::Duplicate { of: 2 }
        );
        // A push that names its commit supersedes the one that did not.
        assert_eq!(
            admit(&push("c7", None), &[tip], false),
            Admission::Admitted {
                superseded: vec![2],
                cancel_running: vec![]
            }
        );
        let many: Vec<Run> = (0..MAX_QUEUED as i64)
            .map(|i| {
                let mut r = run(i, RunState::Queued, &format!("c{i}"));
                r.branch = Some(format!("b{i}"));
                r
            })
            .collect();
        assert_eq!(admit(&push("new", None), &many, false), Admission::Full);
    }

    #[test]
    fn a_change_supersedes_queued_changes_of_another_spec() {
        let mut old = run(1, RunState::Queued, "c1");
        old.cause = Cause::Change;
        let new = NewRun {
            cause: Cause::Change,
            spec_hash: Some("h2".into()),
            commit: None,
            ..push("c1", None)
        };
        assert_eq!(
            admit(&new, &[old], false),
            Admission::Admitted {
                superseded: vec![1],
                cancel_running: vec![]
            }
        );
    }

    #[test]
    fn a_pass_waits_for_a_queued_run_and_never_retries_a_failed_one_by_itself() {
        assert_eq!(change_run(None), ChangeRun::Queue);
        assert!(matches!(
            change_run(Some(&run(1, RunState::Queued, "c"))),
            ChangeRun::Wait(_)
        ));
        let mut failed = run(2, RunState::Failed, "c");
        failed.message = Some("step test exited 2".into());
        match change_run(Some(&failed)) {
            ChangeRun::Failed(why) => assert!(why.contains("step test exited 2"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            change_run(Some(&run(3, RunState::Interrupted, "c"))),
            ChangeRun::Queue
        );
        // A person's cancel holds until the spec changes or a person starts a run.
        assert!(matches!(
            change_run(Some(&run(4, RunState::Cancelled, "c"))),
            ChangeRun::Failed(_)
        ));
    }

    #[test]
    fn the_schedule_fires_each_pipeline_at_its_own_times() {
        use chrono::TimeZone;
        let cron = |text: &str| text.parse::<crate::descriptor::values::CronExpr>().unwrap();
        let schedules = vec![
            ("nightly".to_string(), cron("0 3 * * *")),
            ("hourly".to_string(), cron("0 * * * *")),
            ("also-hourly".to_string(), cron("0 */1 * * *")),
        ];
        let clock = chrono::Utc.with_ymd_and_hms(2026, 12, 2, 1, 30, 0).unwrap();
        let (when, names) = next_due(&schedules, clock).unwrap();
        assert_eq!(
            when,
            chrono::Utc.with_ymd_and_hms(2026, 12, 2, 2, 0, 0).unwrap()
        );
        assert_eq!(names, ["hourly", "also-hourly"]);
        let (when, names) = next_due(&schedules, when + chrono::Duration::minutes(59)).unwrap();
        assert_eq!(
            when,
            chrono::Utc.with_ymd_and_hms(2026, 12, 2, 3, 0, 0).unwrap()
        );
        assert_eq!(names, ["nightly", "hourly", "also-hourly"]);
        // At the very time it fires, the next is the one after.
        let (after, _) = next_due(&schedules, when).unwrap();
        assert_eq!(
            after,
            chrono::Utc.with_ymd_and_hms(2026, 12, 2, 4, 0, 0).unwrap()
        );
        assert_eq!(next_due(&[], clock), None);
    }

    #[test]
    fn a_free_worker_takes_the_oldest_run_whose_pipeline_is_under_its_concurrency() {
        let running = HashMap::from([("a".to_string(), 1), ("b".to_string(), 1)]);
        let concurrency = |p: &str| if p == "b" { 2 } else { 1 };
        let queued = [(1, "a"), (2, "b"), (3, "c")];
        assert_eq!(next_to_start(queued, &running, concurrency), Some(2));
        let full = HashMap::from([("a".to_string(), 1), ("b".to_string(), 2)]);
        assert_eq!(next_to_start(queued, &full, concurrency), Some(3));
        assert_eq!(next_to_start([(1, "a")], &full, concurrency), None);
    }
}
