//! The instance records on disk: one SQLite database in the agent's state folder
//! (`instances.db`), in WAL mode, so an instance answered for is on disk and a `kill -9` loses
//! none. Host ports are rows of their own with the port as key, so two spawns can never hold one.
//!
//! Only this module writes SQL. The decisions ([`super::free_ports`], [`super::renewed_expiry`])
//! are pure functions of the parent module.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::{Instance, InstanceState, Team, free_ports};
use crate::backend::instances::Started;
use crate::database::Database;
use crate::descriptor::model::Engine;

/// Why the store failed.
pub type StoreError = crate::database::DatabaseError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    challenge TEXT NOT NULL,
    team TEXT,
    version TEXT NOT NULL,
    container TEXT NOT NULL,
    ports TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    claimed_at INTEGER,
    expires_at INTEGER,
    engine TEXT NOT NULL DEFAULT 'docker'
);
CREATE INDEX IF NOT EXISTS instances_by_challenge ON instances (challenge, team);
CREATE INDEX IF NOT EXISTS instances_by_expiry ON instances (expires_at);
CREATE TABLE IF NOT EXISTS ports (port INTEGER PRIMARY KEY, instance TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS teams (challenge TEXT NOT NULL, team TEXT NOT NULL, PRIMARY KEY (challenge, team));
";

const COLUMNS: &str = "id, challenge, team, version, container, ports, state, created_at, claimed_at, expires_at, engine";

/// Stores made before instances ran on Kubernetes have no `engine` column: theirs are Docker's.
fn add_engine_column(connection: &Connection) -> rusqlite::Result<()> {
    let has: i64 = connection.query_row(
        "SELECT count(*) FROM pragma_table_info('instances') WHERE name = 'engine'",
        [],
        |row| row.get(0),
    )?;
    if has == 0 {
        connection.execute_batch(
            "ALTER TABLE instances ADD COLUMN engine TEXT NOT NULL DEFAULT 'docker'",
        )?;
    }
    Ok(())
}

fn engine_named(name: &str) -> Option<Engine> {
    [Engine::Docker, Engine::Kubernetes]
        .into_iter()
        .find(|engine| engine.as_str() == name)
}

fn read(row: &Row<'_>) -> rusqlite::Result<Instance> {
    let team: Option<String> = row.get(2)?;
    let ports: String = row.get(5)?;
    let state: String = row.get(6)?;
    let engine: String = row.get(10)?;
    let broken = |i: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("unreadable {what}").into(),
        )
    };
    Ok(Instance {
        id: row.get(0)?,
        challenge: row.get(1)?,
        team: team
            .map(|t| Team::new(&t).map_err(|_| broken(2, "team")))
            .transpose()?,
        version: row.get(3)?,
        container: row.get(4)?,
        host_ports: serde_json::from_str(&ports).map_err(|_| broken(5, "ports"))?,
        state: InstanceState::from_name(&state).ok_or_else(|| broken(6, "state"))?,
        created_at: row.get(7)?,
        claimed_at: row.get(8)?,
        expires_at: row.get(9)?,
        engine: engine_named(&engine).ok_or_else(|| broken(10, "engine"))?,
    })
}

/// What a record must still be for [`InstanceStore::remove_if`] to remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Still {
    /// Whatever it is.
    Any,
    /// Pooled, not claimed meanwhile.
    Pooled,
    /// Expired at this time, not renewed meanwhile.
    Expired(i64),
}

/// What [`InstanceStore::admit`] decided for a spawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// A pooled instance, now the team's.
    Claimed(Instance),
    /// A new record, `starting`, with its host ports held: its container is to be made.
    New(Instance),
    /// The team has `perTeam` live instances already: these.
    TeamAtLimit(Vec<Instance>),
    /// The challenge has `max` live instances.
    Full,
    /// No host ports left in the range.
    NoPorts,
}

/// The limits and times a spawn is admitted with.
#[derive(Debug, Clone)]
pub struct Admission<'a> {
    /// The challenge.
    pub challenge: &'a str,
    /// The team.
    pub team: &'a Team,
    /// The version new instances run; a pooled one is claimed only at this version.
    pub version: &'a str,
    /// The engine new instances run on.
    pub engine: Engine,
    /// Live instances a team may have.
    pub per_team: u32,
    /// Live instances of the challenge, all teams.
    pub max: u32,
    /// How many host ports of `range` an instance holds.
    pub ports: usize,
    /// The host ports instances take.
    pub range: RangeInclusive<u16>,
    /// The new instance's id (and container name), if one is made.
    pub id: &'a str,
    /// Its container's name.
    pub container: &'a str,
    /// Now.
    pub now: i64,
    /// Its ttl, in milliseconds.
    pub ttl_ms: i64,
}

/// A record for the pool, before its instance is made.
#[derive(Debug, Clone, Copy)]
pub struct Pooled<'a> {
    /// Its id.
    pub id: &'a str,
    /// The challenge.
    pub challenge: &'a str,
    /// The version it runs.
    pub version: &'a str,
    /// Its main container's name.
    pub container: &'a str,
    /// The engine it runs on.
    pub engine: Engine,
    /// How many host ports of the range it holds.
    pub ports: usize,
}

/// The instance records of one agent.
#[derive(Debug, Clone)]
pub struct InstanceStore {
    database: Database,
}

impl InstanceStore {
    /// Opens (or makes) the store at `path`.
    pub fn open(path: &Path) -> Result<InstanceStore, StoreError> {
        let (database, ()) = Database::open(path, "the instance store", |connection| {
            connection.execute_batch(SCHEMA)?;
            add_engine_column(connection)
        })?;
        Ok(InstanceStore { database })
    }

    fn with<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        self.database.with(work)
    }

    /// Decides a team's spawn in one transaction: the team's limit, the challenge's, then a
    /// pooled instance claimed, or a new record with its host ports held.
    pub fn admit(&self, admission: &Admission<'_>) -> Result<Admitted, StoreError> {
        self.with(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let team = admission.team.as_str();
            let mine: Vec<Instance> = {
                let mut query = transaction.prepare(&format!(
                    "SELECT {COLUMNS} FROM instances WHERE challenge = ?1 AND team = ?2 ORDER BY created_at"
                ))?;
                query
                    .query_map(params![admission.challenge, team], read)?
                    .collect::<rusqlite::Result<_>>()?
            };
            if mine.len() >= admission.per_team as usize {
                return Ok(Admitted::TeamAtLimit(mine));
            }
            let live: i64 = transaction.query_row(
                "SELECT count(*) FROM instances WHERE challenge = ?1 AND team IS NOT NULL",
                [admission.challenge],
                |row| row.get(0),
            )?;
            if live >= i64::from(admission.max) {
                return Ok(Admitted::Full);
            }
            transaction.execute(
                "INSERT OR IGNORE INTO teams (challenge, team) VALUES (?1, ?2)",
                params![admission.challenge, team],
            )?;
            let expires_at = admission.now.saturating_add(admission.ttl_ms);
            let pooled: Option<Instance> = transaction
                .query_row(
                    &format!(
                        "SELECT {COLUMNS} FROM instances WHERE challenge = ?1 AND state = 'pooled' AND version = ?2 ORDER BY created_at LIMIT 1"
                    ),
                    params![admission.challenge, admission.version],
                    read,
                )
                .optional()?;
            if let Some(mut pooled) = pooled {
                transaction.execute(
                    "UPDATE instances SET team = ?2, state = 'live', claimed_at = ?3, expires_at = ?4 WHERE id = ?1",
                    params![pooled.id, team, admission.now, expires_at],
                )?;
                transaction.commit()?;
                pooled.team = Some(admission.team.clone());
                pooled.state = InstanceState::Live;
                pooled.claimed_at = Some(admission.now);
                pooled.expires_at = Some(expires_at);
                return Ok(Admitted::Claimed(pooled));
            }
            let Some(host_ports) =
                take_ports(&transaction, &admission.range, admission.ports, admission.id)?
            else {
                return Ok(Admitted::NoPorts);
            };
            let instance = Instance {
                id: admission.id.to_string(),
                challenge: admission.challenge.to_string(),
                team: Some(admission.team.clone()),
                version: admission.version.to_string(),
                container: admission.container.to_string(),
                host_ports,
                state: InstanceState::Starting,
                created_at: admission.now,
                claimed_at: Some(admission.now),
                expires_at: Some(expires_at),
                engine: admission.engine,
            };
            insert(&transaction, &instance)?;
            transaction.commit()?;
            Ok(Admitted::New(instance))
        })
    }

    /// A new record for the pool, `starting` (no spawn claims it before it runs), with its host
    /// ports held; none when no ports are left.
    pub fn add_pooled(
        &self,
        pooled: &Pooled<'_>,
        range: &RangeInclusive<u16>,
        now: i64,
    ) -> Result<Option<Instance>, StoreError> {
        let Pooled {
            id,
            challenge,
            version,
            container,
            engine,
            ports,
        } = *pooled;
        self.with(|connection| {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(host_ports) = take_ports(&transaction, range, ports, id)? else {
                return Ok(None);
            };
            let instance = Instance {
                id: id.to_string(),
                challenge: challenge.to_string(),
                team: None,
                version: version.to_string(),
                container: container.to_string(),
                host_ports,
                state: InstanceState::Starting,
                created_at: now,
                claimed_at: None,
                expires_at: None,
                engine,
            };
            insert(&transaction, &instance)?;
            transaction.commit()?;
            Ok(Some(instance))
        })
    }

    /// Marks a starting instance as running on `host_ports`: live when it is a team's (until
    /// `expires_at`, when given: a team's time runs from when its instance runs), else pooled
    /// (claimable from now on). False when it is gone (killed while it started).
    pub fn mark_started(
        &self,
        id: &str,
        host_ports: &[u16],
        expires_at: Option<i64>,
    ) -> Result<bool, StoreError> {
        self.with(|connection| {
            let changed = connection.execute(
                "UPDATE instances SET state = CASE WHEN team IS NULL THEN 'pooled' ELSE 'live' END, ports = ?2, expires_at = COALESCE(?3, expires_at) WHERE id = ?1 AND state = 'starting'",
                params![
                    id,
                    serde_json::to_string(host_ports).expect("ports serialize"),
                    expires_at
                ],
            )?;
            Ok(changed > 0)
        })
    }

    /// Records that an instance now runs `version` as `started` (its container and ports).
    pub fn replaced(&self, id: &str, version: &str, started: &Started) -> Result<(), StoreError> {
        self.with(|connection| {
            connection.execute(
                "UPDATE instances SET version = ?2, container = ?3, ports = ?4 WHERE id = ?1",
                params![
                    id,
                    version,
                    started.container,
                    serde_json::to_string(&started.host_ports).expect("ports serialize")
                ],
            )?;
            Ok(())
        })
    }

    /// Sets an instance's expiry, when it still has one.
    pub fn set_expiry(&self, id: &str, expires_at: i64) -> Result<(), StoreError> {
        self.with(|connection| {
            connection.execute(
                "UPDATE instances SET expires_at = ?2 WHERE id = ?1 AND expires_at IS NOT NULL",
                params![id, expires_at],
            )?;
            Ok(())
        })
    }

    /// Removes an instance's record and frees its host ports; whether there was one.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        self.remove_if(id, Still::Any)
    }

    /// Removes an instance's record when it is still as the caller saw it (still expired at
    /// `now`, still pooled): a renewal or a claim that came in between keeps it.
    pub fn remove_if(&self, id: &str, still: Still) -> Result<bool, StoreError> {
        self.with(|connection| {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let removed = match still {
                Still::Any => transaction.execute("DELETE FROM instances WHERE id = ?1", [id])?,
                Still::Pooled => transaction.execute(
                    "DELETE FROM instances WHERE id = ?1 AND state = 'pooled'",
                    [id],
                )?,
                Still::Expired(now) => transaction.execute(
                    "DELETE FROM instances WHERE id = ?1 AND expires_at IS NOT NULL AND expires_at <= ?2",
                    params![id, now],
                )?,
            };
            if removed > 0 {
                transaction.execute("DELETE FROM ports WHERE instance = ?1", [id])?;
            }
            transaction.commit()?;
            Ok(removed > 0)
        })
    }

    /// One instance.
    pub fn get(&self, id: &str) -> Result<Option<Instance>, StoreError> {
        self.with(|connection| {
            connection
                .query_row(
                    &format!("SELECT {COLUMNS} FROM instances WHERE id = ?1"),
                    [id],
                    read,
                )
                .optional()
        })
    }

    /// Every instance, or those of one challenge or team, oldest first.
    pub fn list(
        &self,
        challenge: Option<&str>,
        team: Option<&str>,
    ) -> Result<Vec<Instance>, StoreError> {
        self.with(|connection| {
            let mut query = connection.prepare(&format!(
                "SELECT {COLUMNS} FROM instances WHERE (?1 IS NULL OR challenge = ?1) AND (?2 IS NULL OR team = ?2) ORDER BY created_at, id"
            ))?;
            query
                .query_map(params![challenge, team], read)?
                .collect::<rusqlite::Result<_>>()
        })
    }

    /// Instances whose time was up at `now`; not one still starting, whose time runs from its
    /// start.
    pub fn expired(&self, now: i64) -> Result<Vec<Instance>, StoreError> {
        self.with(|connection| {
            let mut query = connection.prepare(&format!(
                "SELECT {COLUMNS} FROM instances WHERE expires_at IS NOT NULL AND expires_at <= ?1 AND state != 'starting' ORDER BY expires_at"
            ))?;
            query
                .query_map([now], read)?
                .collect::<rusqlite::Result<_>>()
        })
    }

    /// The teams that ever had an instance of the challenge.
    pub fn teams(&self, challenge: &str) -> Result<Vec<Team>, StoreError> {
        self.with(|connection| {
            let mut query =
                connection.prepare("SELECT team FROM teams WHERE challenge = ?1 ORDER BY team")?;
            let names: Vec<String> = query
                .query_map([challenge], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(names
                .iter()
                .filter_map(|name| Team::new(name).ok())
                .collect())
        })
    }
}

fn insert(connection: &Connection, instance: &Instance) -> rusqlite::Result<()> {
    connection.execute(
        &format!(
            "INSERT INTO instances ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
        ),
        params![
            instance.id,
            instance.challenge,
            instance.team.as_ref().map(Team::as_str),
            instance.version,
            instance.container,
            serde_json::to_string(&instance.host_ports).expect("ports serialize"),
            instance.state.as_str(),
            instance.created_at,
            instance.claimed_at,
            instance.expires_at,
            instance.engine.as_str(),
        ],
    )?;
    Ok(())
}

/// Holds `count` free host ports of `range` for `instance`, taken from a place in the range
/// picked at random, so a team cannot tell another team's ports from its own.
fn take_ports(
    connection: &Connection,
    range: &RangeInclusive<u16>,
    count: usize,
    instance: &str,
) -> rusqlite::Result<Option<Vec<u16>>> {
    let used: BTreeSet<u16> = {
        let mut query = connection.prepare("SELECT port FROM ports")?;
        query
            .query_map([], |row| row.get::<_, u16>(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    let random = crate::backend::random_bytes()
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let span = u32::from(range.end() - range.start()) + 1;
    let offset = u32::from(u16::from_le_bytes([random[0], random[1]])) % span;
    let start = u16::try_from(u32::from(*range.start()) + offset).unwrap_or(*range.start());
    let Some(ports) = free_ports(range, &used, start, count) else {
        return Ok(None);
    };
    for port in &ports {
        connection.execute(
            "INSERT INTO ports (port, instance) VALUES (?1, ?2)",
            params![port, instance],
        )?;
    }
    Ok(Some(ports))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission<'a>(team: &'a Team, id: &'a str, now: i64) -> Admission<'a> {
        Admission {
            challenge: "heap",
            team,
            version: "v1",
            engine: Engine::Docker,
            per_team: 1,
            max: 2,
            ports: 1,
            range: 40000..=40001,
            id,
            container: id,
            now,
            ttl_ms: 1_000,
        }
    }

    #[test]
    fn spawns_are_held_to_the_team_and_challenge_limits_and_ports_are_never_shared() {
        let folder = tempfile::tempdir().unwrap();
        let store = InstanceStore::open(&folder.path().join("instances.db")).unwrap();
        let (a, b, c) = (
            Team::new("a").unwrap(),
            Team::new("b").unwrap(),
            Team::new("c").unwrap(),
        );
        let Admitted::New(first) = store.admit(&admission(&a, "i1", 0)).unwrap() else {
            panic!("a new instance");
        };
        assert_eq!(first.expires_at, Some(1_000));
        // Its time runs from its start: not reaped while it starts, and given its ttl then.
        assert!(store.expired(5_000).unwrap().is_empty());
        assert!(
            store
                .mark_started("i1", &first.host_ports, Some(6_000))
                .unwrap()
        );
        assert!(store.expired(5_000).unwrap().is_empty());
        assert_eq!(store.expired(6_000).unwrap().len(), 1);
        assert!(matches!(
            store.admit(&admission(&a, "i2", 0)).unwrap(),
            Admitted::TeamAtLimit(mine) if mine.len() == 1
        ));
        let Admitted::New(second) = store.admit(&admission(&b, "i3", 0)).unwrap() else {
            panic!("a new instance");
        };
        assert_ne!(first.host_ports, second.host_ports);
        assert_eq!(
            store.admit(&admission(&c, "i4", 0)).unwrap(),
            Admitted::Full
        );
        // A kill frees the team's place and the port (the range has two), which the next
        // spawn takes.
        assert!(store.remove("i1").unwrap());
        let Admitted::New(third) = store.admit(&admission(&c, "i5", 0)).unwrap() else {
            panic!("a new instance");
        };
        assert_eq!(third.host_ports, first.host_ports);
        // Only what is still as it was seen is removed.
        assert!(!store.remove_if("i5", Still::Expired(999)).unwrap());
        assert!(!store.remove_if("i5", Still::Pooled).unwrap());
        assert!(store.remove_if("i5", Still::Expired(1_000)).unwrap());
        assert_eq!(store.teams("heap").unwrap(), vec![a, b, c]);
    }

    #[test]
    fn a_pooled_instance_of_the_version_is_claimed_first_and_records_survive_a_reopen() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("instances.db");
        let store = InstanceStore::open(&path).unwrap();
        let range = 40000..=40009;
        let pooled = |id, version| Pooled {
            id,
            challenge: "heap",
            version,
            container: id,
            engine: Engine::Docker,
            ports: 1,
        };
        let old = store
            .add_pooled(&pooled("old", "v0"), &range, 0)
            .unwrap()
            .unwrap();
        let starting = store
            .add_pooled(&pooled("p1", "v1"), &range, 0)
            .unwrap()
            .unwrap();
        // Not claimed while it starts: the team gets a new instance of its own.
        let early = Team::new("early").unwrap();
        assert!(matches!(
            store
                .admit(&Admission {
                    range: range.clone(),
                    ..admission(&early, "e", 1)
                })
                .unwrap(),
            Admitted::New(_)
        ));
        assert!(store.remove("e").unwrap());
        assert!(store.mark_started("old", &old.host_ports, None).unwrap());
        assert!(
            store
                .mark_started("p1", &starting.host_ports, None)
                .unwrap()
        );
        let team = Team::new("t").unwrap();
        let Admitted::Claimed(claimed) = store.admit(&admission(&team, "n", 5)).unwrap() else {
            panic!("a claim");
        };
        assert_eq!(claimed.id, "p1");
        assert_eq!(claimed.expires_at, Some(1_005));
        drop(store);
        let again = InstanceStore::open(&path).unwrap();
        assert_eq!(again.get("p1").unwrap().unwrap(), claimed);
        assert_eq!(again.expired(1_005).unwrap(), vec![claimed]);
        assert_eq!(again.list(Some("heap"), None).unwrap().len(), 2);
    }
}
