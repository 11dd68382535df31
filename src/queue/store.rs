//! The run queue on disk: one SQLite database in the agent's state folder (`runs.db`), in WAL mode,
//! so that every queued run and every result is on disk before the agent answers for it, and a
//! `kill -9` at any moment loses nothing: a transaction is either in the log or not at all.
//!
//! Why SQLite: the queue is read far more than it is written (the API, `berth runs`, each pass's
//! status), it needs a few indexed queries and atomic read-decide-write steps (admit a run and
//! supersede older ones), and an operator can open it with the `sqlite3` shell. Writes are a few per
//! run, so one connection behind a mutex is plenty; `synchronous=NORMAL` keeps every commit across
//! a process crash (only a power cut may lose the last ones).
//!
//! Only this module writes SQL. The decisions are [`super::admit`] and [`super::next_to_start`].

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use crate::database::Database;

use super::{Admission, Cause, NewRun, Run, RunState, StepRecord, admit, next_to_start};

/// How many finished runs of each pipeline are kept; older ones (and their logs) are removed when
/// the agent starts.
pub const KEEP_FINISHED: usize = 500;

/// Why the store failed.
pub type StoreError = crate::database::DatabaseError;

/// What [`RunStore::enqueue`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// A new run, and the running runs its pipeline's `cancelRunning` asks to stop.
    Queued {
        /// The run.
        id: i64,
        /// Queued runs it superseded (now cancelled).
        superseded: Vec<i64>,
        /// Running runs to cancel.
        cancel_running: Vec<i64>,
    },
    /// Already served by this run.
    Duplicate(i64),
    /// Refused: the pipeline has [`super::MAX_QUEUED`] runs waiting.
    Full,
}

/// What the agent found when it started: runs interrupted by its stop, and their retries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Runs that were running, now `interrupted`, each with the run that retries it (none for
    /// a second attempt).
    pub interrupted: Vec<(i64, Option<i64>)>,
    /// Runs removed as older than [`KEEP_FINISHED`] of their pipeline: their logs can go too.
    pub forgotten: Vec<i64>,
}

/// The runs of one agent.
#[derive(Debug, Clone)]
pub struct RunStore {
    database: Database,
    /// Made at random with the store (empty for a store older than this): run ids restart with a
    /// new store, so its run logs go to a folder of this name and never mix with an old one's.
    id: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline TEXT NOT NULL,
    state TEXT NOT NULL,
    cause TEXT NOT NULL,
    commit_id TEXT,
    branch TEXT,
    delivery TEXT,
    spec_hash TEXT,
    attempt INTEGER NOT NULL DEFAULT 1,
    retry_of INTEGER,
    queued_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    duration_ms INTEGER,
    message TEXT,
    image TEXT,
    steps TEXT NOT NULL DEFAULT '[]',
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_pipeline ON runs (pipeline, id);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs (state, id);
CREATE TABLE IF NOT EXISTS store (id TEXT NOT NULL);
";

const COLUMNS: &str = "id, pipeline, state, cause, commit_id, branch, delivery, spec_hash, attempt, \
    retry_of, queued_at, started_at, finished_at, duration_ms, message, image, steps";

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn read_run(row: &Row<'_>) -> rusqlite::Result<Run> {
    let text = |i: usize| row.get::<_, String>(i);
    let state: String = text(2)?;
    let cause: String = text(3)?;
    let steps: String = text(16)?;
    let unknown = |i: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("unknown {what}").into(),
        )
    };
    Ok(Run {
        id: row.get(0)?,
        pipeline: text(1)?,
        state: RunState::from_name(&state).ok_or_else(|| unknown(2, "state"))?,
        cause: Cause::from_name(&cause).ok_or_else(|| unknown(3, "cause"))?,
        commit: row.get(4)?,
        branch: row.get(5)?,
        delivery: row.get(6)?,
        spec_hash: row.get(7)?,
        attempt: row.get(8)?,
        retry_of: row.get(9)?,
        queued_at: text(10)?,
        started_at: row.get(11)?,
        finished_at: row.get(12)?,
        duration_ms: row.get::<_, Option<i64>>(13)?.map(|ms| ms.max(0) as u64),
        message: row.get(14)?,
        image: row.get(15)?,
        steps: serde_json::from_str(&steps).unwrap_or_default(),
    })
}

/// Deletes the finished runs (of one pipeline, or of each) beyond the newest [`KEEP_FINISHED`].
fn forget_old(
    transaction: &rusqlite::Transaction<'_>,
    pipeline: Option<&str>,
) -> rusqlite::Result<Vec<i64>> {
    let forgotten: Vec<i64> = {
        let mut query = transaction.prepare(
            "SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY pipeline ORDER BY id DESC) AS newer \
             FROM runs WHERE state NOT IN ('queued', 'running') AND (?2 IS NULL OR pipeline = ?2)) WHERE newer > ?1",
        )?;
        query
            .query_map(params![KEEP_FINISHED as i64, pipeline], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    for id in &forgotten {
        transaction.execute("DELETE FROM runs WHERE id = ?1", [id])?;
    }
    Ok(forgotten)
}

impl RunStore {
    /// Opens (or makes) the store at `path`.
    pub fn open(path: &Path) -> Result<RunStore, StoreError> {
        let (database, id) = Database::open(path, "the run queue", |connection| {
            // The tables and the id are made in one transaction: two processes opening a new
            // store at once, or a crash between the two, never leave a store without its id.
            connection.execute_batch("BEGIN IMMEDIATE")?;
            // A store that had runs before stores had ids keeps its logs where they were.
            let had_runs: i64 = connection.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'runs'",
                [],
                |row| row.get(0),
            )?;
            connection.execute_batch(SCHEMA)?;
            let id: Option<String> = connection
                .query_row("SELECT id FROM store", [], |row| row.get(0))
                .optional()?;
            let id = match id {
                Some(id) => id,
                None => {
                    let id = match had_runs > 0 {
                        true => String::new(),
                        false => crate::backend::random_bytes()
                            .map(|bytes| hex::encode(&bytes[..6]))
                            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
                    };
                    // Two processes opening a new store at once keep one id: the first written.
                    connection.execute(
                        "INSERT INTO store (id) SELECT ?1 WHERE NOT EXISTS (SELECT 1 FROM store)",
                        [&id],
                    )?;
                    connection.query_row("SELECT id FROM store", [], |row| row.get(0))?
                }
            };
            connection.execute_batch("COMMIT")?;
            Ok(id)
        })?;
        Ok(RunStore { database, id })
    }

    /// The folder of this store's run logs under `root`: never one another store wrote to.
    pub fn logs_folder(&self, root: &Path) -> std::path::PathBuf {
        match self.id.is_empty() {
            true => root.to_path_buf(),
            false => root.join(&self.id),
        }
    }

    fn with<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        self.database.with(work)
    }

    /// Admits `new` by the queue's rules ([`admit`]), in one transaction: either the run is
    /// queued and the runs it supersedes are cancelled, or nothing changes.
    pub fn enqueue(&self, new: &NewRun, cancel_running: bool) -> Result<Enqueued, StoreError> {
        self.with(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let others: Vec<Run> = {
                let mut query = transaction.prepare(&format!(
                    "SELECT {COLUMNS} FROM runs WHERE pipeline = ?1 AND (state IN ('queued', 'running') \
                     OR (delivery IS NOT NULL AND delivery = ?2) OR (commit_id IS NOT NULL AND commit_id = ?3)) ORDER BY id"
                ))?;
                query
                    .query_map(params![new.pipeline, new.delivery, new.commit], read_run)?
                    .collect::<rusqlite::Result<_>>()?
            };
            let (superseded, cancel_running) = match admit(new, &others, cancel_running) {
                Admission::Duplicate { of } => return Ok(Enqueued::Duplicate(of)),
                Admission::Full => return Ok(Enqueued::Full),
                Admission::Admitted {
                    superseded,
                    cancel_running,
                } => (superseded, cancel_running),
            };
            transaction.execute(
                "INSERT INTO runs (pipeline, state, cause, commit_id, branch, delivery, spec_hash, queued_at) \
                 VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    new.pipeline,
                    new.cause.as_str(),
                    new.commit,
                    new.branch,
                    new.delivery,
                    new.spec_hash,
                    now()
                ],
            )?;
            let id = transaction.last_insert_rowid();
            let why = match &new.commit {
                Some(commit) => format!("superseded by run {id} (commit {})", crate::git_url::short(commit)),
                None => format!("superseded by run {id}"),
            };
            for running in &cancel_running {
                transaction.execute(
                    "UPDATE runs SET cancel_requested = 1 WHERE id = ?1 AND state = 'running'",
                    [running],
                )?;
            }
            for old in &superseded {
                transaction.execute(
                    "UPDATE runs SET state = 'cancelled', finished_at = ?2, message = ?3 WHERE id = ?1 AND state = 'queued'",
                    params![old, now(), why],
                )?;
            }
            transaction.commit()?;
            Ok(Enqueued::Queued {
                id,
                superseded,
                cancel_running,
            })
        })
    }

    /// Takes the next run a free worker may start ([`next_to_start`]) and marks it running;
    /// none while `workers` runs are running.
    pub fn start_next(
        &self,
        workers: u32,
        concurrency: impl Fn(&str) -> u32,
    ) -> Result<Option<Run>, StoreError> {
        self.with(|connection| {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let running: HashMap<String, u32> = {
                let mut query = transaction.prepare(
                    "SELECT pipeline, COUNT(*) FROM runs WHERE state = 'running' GROUP BY pipeline",
                )?;
                query
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?
            };
            if running.values().sum::<u32>() >= workers {
                return Ok(None);
            }
            let queued: Vec<(i64, String)> = {
                let mut query = transaction
                    .prepare("SELECT id, pipeline FROM runs WHERE state = 'queued' ORDER BY id")?;
                query
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?
            };
            let next = next_to_start(
                queued.iter().map(|(id, p)| (*id, p.as_str())),
                &running,
                concurrency,
            );
            let Some(id) = next else {
                return Ok(None);
            };
            transaction.execute(
                "UPDATE runs SET state = 'running', started_at = ?2 WHERE id = ?1",
                params![id, now()],
            )?;
            let run = transaction.query_row(
                &format!("SELECT {COLUMNS} FROM runs WHERE id = ?1"),
                [id],
                read_run,
            )?;
            transaction.commit()?;
            Ok(Some(run))
        })
    }

    /// Puts a running run back in the queue: the engine stopped answering under it, which is
    /// not the pipeline's doing. It keeps its place (its number).
    pub fn requeue(&self, id: i64) -> Result<(), StoreError> {
        self.with(|connection| {
            connection.execute(
                "UPDATE runs SET state = 'queued', started_at = NULL WHERE id = ?1 AND state = 'running'",
                [id],
            )?;
            Ok(())
        })
    }

    /// Records the commit a running run resolved (its source's `ref` at the time it cloned).
    pub fn set_commit(&self, id: i64, commit: &str) -> Result<(), StoreError> {
        self.with(|connection| {
            connection.execute(
                "UPDATE runs SET commit_id = ?2 WHERE id = ?1",
                params![id, commit],
            )?;
            Ok(())
        })
    }

    /// Records how a running run ended.
    pub fn finish(
        &self,
        id: i64,
        state: RunState,
        message: &str,
        image: Option<&str>,
        steps: &[StepRecord],
        duration_ms: u64,
    ) -> Result<(), StoreError> {
        let steps = serde_json::to_string(steps).expect("steps serialize");
        self.with(|connection| {
            connection.execute(
                "UPDATE runs SET state = ?2, message = ?3, image = ?4, steps = ?5, duration_ms = ?6, \
                 finished_at = ?7 WHERE id = ?1 AND state = 'running'",
                params![id, state.as_str(), message, image, steps, duration_ms as i64, now()],
            )?;
            Ok(())
        })
    }

    /// Cancels a queued run at once; a running one is marked so that its worker (or, should the
    /// agent stop first, the next agent) ends it as cancelled. Returns the run's state before, or
    /// `None` when there is no such run.
    pub fn cancel(&self, id: i64, why: &str) -> Result<Option<RunState>, StoreError> {
        self.with(|connection| {
            let state: Option<String> = connection
                .query_row("SELECT state FROM runs WHERE id = ?1", [id], |row| row.get(0))
                .optional()?;
            let Some(state) = state.as_deref().and_then(RunState::from_name) else {
                return Ok(None);
            };
            match state {
                RunState::Queued => connection.execute(
                    "UPDATE runs SET state = 'cancelled', finished_at = ?2, message = ?3 WHERE id = ?1 AND state = 'queued'",
                    params![id, now(), why],
                )?,
                RunState::Running => connection.execute(
                    "UPDATE runs SET cancel_requested = 1 WHERE id = ?1",
                    [id],
                )?,
                _ => 0,
            };
            Ok(Some(state))
        })
    }

    /// Whether someone asked to cancel run `id` while it was running.
    pub fn cancel_requested(&self, id: i64) -> Result<bool, StoreError> {
        self.with(|connection| {
            connection
                .query_row(
                    "SELECT cancel_requested FROM runs WHERE id = ?1",
                    [id],
                    |row| row.get::<_, i64>(0),
                )
                .optional()
                .map(|flag| flag == Some(1))
        })
    }

    /// Cancels the queued runs of pipelines no longer declared.
    pub fn cancel_undeclared(&self, declared: &[String]) -> Result<Vec<i64>, StoreError> {
        let queued: Vec<(i64, String)> = self.with(|connection| {
            let mut query =
                connection.prepare("SELECT id, pipeline FROM runs WHERE state = 'queued'")?;
            query
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect()
        })?;
        let mut cancelled = Vec::new();
        for (id, pipeline) in queued {
            if !declared.contains(&pipeline) {
                self.cancel(id, &format!("Pipeline/{pipeline} is no longer declared"))?;
                cancelled.push(id);
            }
        }
        Ok(cancelled)
    }

    /// After a stop: marks the runs that were running `interrupted`, queues a second attempt of
    /// each first attempt, and forgets finished runs beyond [`KEEP_FINISHED`] per pipeline.
    pub fn recover(&self) -> Result<Recovered, StoreError> {
        self.with(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // A run someone cancelled is not brought back by a stop.
            transaction.execute(
                "UPDATE runs SET state = 'cancelled', finished_at = ?1, message = 'cancelled by a person; the agent stopped before the run ended' \
                 WHERE state = 'running' AND cancel_requested = 1",
                [now()],
            )?;
            let running: Vec<Run> = {
                let mut query = transaction.prepare(&format!(
                    "SELECT {COLUMNS} FROM runs WHERE state = 'running' ORDER BY id"
                ))?;
                query.query_map([], read_run)?.collect::<rusqlite::Result<_>>()?
            };
            let mut recovered = Recovered::default();
            for run in running {
                let retried = run.attempt < 2;
                let message = match retried {
                    true => "the agent stopped during this run; it is retried once",
                    false => "the agent stopped during this run's second attempt; not retried again",
                };
                transaction.execute(
                    "UPDATE runs SET state = 'interrupted', finished_at = ?2, message = ?3 WHERE id = ?1",
                    params![run.id, now(), message],
                )?;
                let retry = match retried {
                    true => {
                        transaction.execute(
                            "INSERT INTO runs (pipeline, state, cause, commit_id, branch, spec_hash, attempt, retry_of, queued_at) \
                             VALUES (?1, 'queued', 'retry', ?2, ?3, ?4, 2, ?5, ?6)",
                            params![run.pipeline, run.commit, run.branch, run.spec_hash, run.id, now()],
                        )?;
                        Some(transaction.last_insert_rowid())
                    }
                    false => None,
                };
                recovered.interrupted.push((run.id, retry));
            }
            recovered.forgotten = forget_old(&transaction, None)?;
            transaction.commit()?;
            Ok(recovered)
        })
    }

    /// Forgets the finished runs of `pipeline` beyond the newest [`KEEP_FINISHED`]; returns
    /// their ids, whose logs can go too.
    pub fn forget_old(&self, pipeline: &str) -> Result<Vec<i64>, StoreError> {
        self.with(|connection| {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let forgotten = forget_old(&transaction, Some(pipeline))?;
            transaction.commit()?;
            Ok(forgotten)
        })
    }

    /// One run.
    pub fn get(&self, id: i64) -> Result<Option<Run>, StoreError> {
        self.with(|connection| {
            connection
                .query_row(
                    &format!("SELECT {COLUMNS} FROM runs WHERE id = ?1"),
                    [id],
                    read_run,
                )
                .optional()
        })
    }

    /// The newest `limit` runs, of one pipeline or of all, newest first.
    pub fn list(&self, pipeline: Option<&str>, limit: usize) -> Result<Vec<Run>, StoreError> {
        self.with(|connection| {
            let mut query = connection.prepare(&format!(
                "SELECT {COLUMNS} FROM runs WHERE ?1 IS NULL OR pipeline = ?1 ORDER BY id DESC LIMIT ?2"
            ))?;
            query
                .query_map(params![pipeline, limit as i64], read_run)?
                .collect()
        })
    }

    /// The newest run a pass asked for with this spec ([`super::change_run`] decides on it).
    pub fn latest_change(
        &self,
        pipeline: &str,
        spec_hash: &str,
    ) -> Result<Option<Run>, StoreError> {
        self.with(|connection| {
            connection
                .query_row(
                    &format!(
                        "SELECT {COLUMNS} FROM runs WHERE pipeline = ?1 AND spec_hash = ?2 \
                         AND (cause = 'change' OR (cause = 'retry' AND retry_of IN \
                         (SELECT id FROM runs WHERE cause = 'change'))) ORDER BY id DESC LIMIT 1"
                    ),
                    params![pipeline, spec_hash],
                    read_run,
                )
                .optional()
        })
    }

    /// How many runs wait for a worker.
    pub fn queue_depth(&self) -> Result<u64, StoreError> {
        self.with(|connection| {
            connection.query_row(
                "SELECT COUNT(*) FROM runs WHERE state = 'queued'",
                [],
                |row| row.get::<_, i64>(0),
            )
        })
        .map(|n| n.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_empty_store_file_starts_afresh_with_a_log_folder_of_its_own() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("runs.db");
        let first = super::RunStore::open(&path).unwrap();
        let logs = folder.path().join("runs");
        let first_logs = first.logs_folder(&logs);
        assert_ne!(first_logs, logs);
        drop(first);
        // Reopened: the same folder.
        assert_eq!(
            super::RunStore::open(&path).unwrap().logs_folder(&logs),
            first_logs
        );
        // Truncated to nothing (a full disk, a careless restore): run ids start again at 1, so
        // the logs go elsewhere.
        for leftover in ["runs.db-wal", "runs.db-shm"] {
            let _ = std::fs::remove_file(folder.path().join(leftover));
        }
        std::fs::write(&path, b"").unwrap();
        let again = super::RunStore::open(&path).unwrap();
        assert_ne!(again.logs_folder(&logs), first_logs);
    }

    use super::*;

    fn push(commit: &str, delivery: &str) -> NewRun {
        NewRun {
            pipeline: "app".into(),
            cause: Cause::Push,
            commit: Some(commit.into()),
            branch: Some("main".into()),
            delivery: Some(delivery.into()),
            spec_hash: Some("h".into()),
        }
    }

    fn queued(enqueued: Enqueued) -> i64 {
        match enqueued {
            Enqueued::Queued { id, .. } => id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn runs_survive_a_reopen_and_an_interrupted_run_is_retried_once() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("runs.db");
        let store = RunStore::open(&path).unwrap();
        let first = queued(store.enqueue(&push("c1", "d1"), false).unwrap());
        let started = store.start_next(4, |_| 1).unwrap().unwrap();
        assert_eq!((started.id, started.state), (first, RunState::Running));
        // The agent dies (nothing is closed), and a new one opens the same file.
        drop(store);
        let store = RunStore::open(&path).unwrap();
        let recovered = store.recover().unwrap();
        let retry = recovered.interrupted[0]
            .1
            .expect("a first attempt is retried");
        assert_eq!(recovered.interrupted, vec![(first, Some(retry))]);
        assert_eq!(
            store.get(first).unwrap().unwrap().state,
            RunState::Interrupted
        );
        let second = store.start_next(4, |_| 1).unwrap().unwrap();
        assert_eq!(
            (second.id, second.attempt, second.retry_of),
            (retry, 2, Some(first))
        );
        assert_eq!(second.commit.as_deref(), Some("c1"));
        // The retry of a push is no run a pass asked for: it says nothing of the spec's image.
        assert_eq!(store.latest_change("app", "h").unwrap(), None);
        // Interrupted again: not retried a third time.
        let recovered = store.recover().unwrap();
        assert_eq!(recovered.interrupted, vec![(retry, None)]);
        assert_eq!(store.queue_depth().unwrap(), 0);
    }

    #[test]
    fn duplicates_are_refused_and_a_newer_commit_cancels_the_queued_older_one() {
        let folder = tempfile::tempdir().unwrap();
        let store = RunStore::open(&folder.path().join("runs.db")).unwrap();
        let first = queued(store.enqueue(&push("c1", "d1"), false).unwrap());
        assert_eq!(
            store.enqueue(&push("c1", "d1"), false).unwrap(),
            Enqueued::Duplicate(first)
        );
        assert_eq!(
            store.enqueue(&push("c1", "d2"), false).unwrap(),
            Enqueued::Duplicate(first),
            "the same commit from another delivery"
        );
        let Enqueued::Queued { id, superseded, .. } =
            store.enqueue(&push("c2", "d3"), false).unwrap()
        else {
            panic!()
        };
        assert_eq!(superseded, vec![first]);
        let old = store.get(first).unwrap().unwrap();
        assert_eq!(old.state, RunState::Cancelled);
        assert!(
            old.message
                .unwrap()
                .contains(&format!("superseded by run {id}"))
        );
        assert_eq!(store.queue_depth().unwrap(), 1);
    }

    #[test]
    fn workers_respect_each_pipelines_concurrency() {
        let folder = tempfile::tempdir().unwrap();
        let store = RunStore::open(&folder.path().join("runs.db")).unwrap();
        for (n, pipeline) in ["a", "a", "b"].iter().enumerate() {
            let mut run = push(&format!("c{n}"), &format!("d{n}"));
            run.pipeline = pipeline.to_string();
            // Manual runs supersede nothing.
            run.cause = Cause::Manual;
            store.enqueue(&run, false).unwrap();
        }
        let one = |_: &str| 1;
        assert_eq!(store.start_next(4, one).unwrap().unwrap().pipeline, "a");
        assert_eq!(store.start_next(4, one).unwrap().unwrap().pipeline, "b");
        assert!(
            store.start_next(4, one).unwrap().is_none(),
            "a runs one at a time"
        );
        let running = store.list(Some("a"), 10).unwrap();
        let started = running
            .iter()
            .find(|r| r.state == RunState::Running)
            .unwrap();
        store
            .finish(
                started.id,
                RunState::Succeeded,
                "done",
                Some("app:c0"),
                &[],
                5,
            )
            .unwrap();
        assert_eq!(store.start_next(4, one).unwrap().unwrap().pipeline, "a");
        let done = store.get(started.id).unwrap().unwrap();
        assert_eq!(
            (done.state, done.image.as_deref()),
            (RunState::Succeeded, Some("app:c0"))
        );
    }
}
