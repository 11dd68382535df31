//! The agent's SQLite files (the run queue, the instance records): one connection each behind a
//! mutex, in WAL mode with `synchronous=NORMAL`, so a commit survives a `kill -9` of the process
//! (only a power cut may lose the last ones), and a second process waits for a lock rather than
//! failing at once.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

/// Why a database failed: what it is, where, and SQLite's words.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct DatabaseError {
    what: &'static str,
    path: String,
    source: rusqlite::Error,
}

/// One SQLite file. Cloning shares the connection.
#[derive(Debug, Clone)]
pub struct Database {
    connection: Arc<Mutex<Connection>>,
    path: String,
    what: &'static str,
}

impl Database {
    /// Opens (or makes) the database at `path`, `what` naming it in errors, and runs `setup` on it
    /// (its tables) before anyone else uses it.
    pub fn open<T>(
        path: &Path,
        what: &'static str,
        setup: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<(Database, T), DatabaseError> {
        let shown = path.display().to_string();
        let failed = |source| DatabaseError {
            what,
            path: shown.clone(),
            source,
        };
        let connection = Connection::open(path).map_err(failed)?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;",
            )
            .map_err(failed)?;
        let made = setup(&connection).map_err(failed)?;
        let database = Database {
            connection: Arc::new(Mutex::new(connection)),
            path: shown,
            what,
        };
        Ok((database, made))
    }

    /// Runs `work` on the connection, alone.
    pub fn with<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, DatabaseError> {
        let mut connection = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        work(&mut connection).map_err(|source| DatabaseError {
            what: self.what,
            path: self.path.clone(),
            source,
        })
    }
}
