//! Per-team instances of instanced Challenges: a copy of a challenge for each team that asks,
//! spawned, renewed and killed through the agent's API, each on host ports of its own and with a
//! flag of its own, removed when its time is up.
//!
//! Its rooms:
//! - this file: what an instance is, and the pure decisions (a team's flag, host ports, expiry);
//! - [`store`]: the records, in the agent's state folder (`instances.db`), so that instances
//!   outlive a restart or a `kill -9` of the agent;
//! - [`manager`]: spawns, claims from the warm pool, renewals, kills and flag checks;
//! - `upkeep`: the background work (reaping, refilling pools, replacing old versions, making the
//!   engine match the records);
//! - `solvers`: each instance solved by its challenge's `healthcheck.solve`, and the health that
//!   gives it.
//!
//! The containers themselves are made through [`crate::backend::instances`], on the Docker Engine
//! or the cluster the challenge runs on. A team's name is
//! kept only in the store: never in a label, a log line, status or a metric.

pub mod manager;
mod solvers;
pub mod store;
mod upkeep;

use std::collections::{BTreeSet, HashMap};
use std::ops::RangeInclusive;
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use crate::backend::instances::InstanceObjects;
use crate::backend::solving::SolveState;
use crate::descriptor::model::Engine;
use crate::plan::Health;

pub use manager::{InstanceError, Instances, OpenError};

/// The longest team name taken, in bytes.
pub const MAX_TEAM: usize = 128;

/// A team as the CTF platform names it: 1 to [`MAX_TEAM`] bytes of printable text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Team(String);

impl Team {
    /// The team `name`, or why it cannot be one.
    pub fn new(name: &str) -> Result<Team, NotATeam> {
        if name.is_empty() || name.len() > MAX_TEAM {
            return Err(NotATeam::Length);
        }
        if name.chars().any(|c| c.is_control() || invisible(c)) {
            return Err(NotATeam::Hidden);
        }
        Ok(Team(name.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a name is not a team's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotATeam {
    /// Empty, or longer than [`MAX_TEAM`] bytes.
    #[error("a team is 1 to {MAX_TEAM} bytes")]
    Length,
    /// It holds characters that change how text shows without showing themselves.
    #[error("a team's name holds no control, invisible or direction-changing characters")]
    Hidden,
}

/// Whether `c` changes how text around it shows without showing itself (zero-width characters,
/// direction marks and overrides, the byte order mark), which would let one team's name pass for
/// another's where it is shown.
fn invisible(c: char) -> bool {
    matches!(c, '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}')
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Its container is being made for a team.
    Starting,
    /// A team's, running.
    Live,
    /// Running and ready, no team's yet.
    Pooled,
}

impl InstanceState {
    /// The name the store keeps.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Live => "live",
            InstanceState::Pooled => "pooled",
        }
    }

    /// The state named `name`.
    pub fn from_name(name: &str) -> Option<InstanceState> {
        match name {
            "starting" => Some(InstanceState::Starting),
            "live" => Some(InstanceState::Live),
            "pooled" => Some(InstanceState::Pooled),
            _ => None,
        }
    }
}

/// An instance's health as its challenge's solver found it (`healthcheck.solve`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceHealth {
    /// `Healthy`, `Degraded` (its last run failed) or `Progressing` (no run has ended yet).
    pub state: Health,
    /// Why, when it is not healthy: what the solver said, flags masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What each instance's solver last found, by the instance's container.
type InstanceSolves = Mutex<HashMap<String, SolveState>>;

/// One instance, as the store keeps it. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Its id: 16 hex digits.
    pub id: String,
    /// The challenge.
    pub challenge: String,
    /// The team; none while pooled.
    pub team: Option<Team>,
    /// The version (the challenge's template hash) it runs.
    pub version: String,
    /// Its container's name.
    pub container: String,
    /// Its host ports, one for each of the challenge's ports.
    pub host_ports: Vec<u16>,
    /// Where it is in its life.
    pub state: InstanceState,
    /// When it was made.
    pub created_at: i64,
    /// When its team got it; none while pooled.
    pub claimed_at: Option<i64>,
    /// When it goes, unless renewed; none while pooled.
    pub expires_at: Option<i64>,
    /// The engine it runs on.
    pub engine: Engine,
}

impl Instance {
    /// Whether it was taken from the warm pool (claimed after it was made), and so got its flag
    /// after it started rather than before.
    pub fn from_pool(&self) -> bool {
        self.claimed_at.is_some_and(|at| at != self.created_at)
    }

    /// What an engine holds of it.
    pub fn objects(&self) -> InstanceObjects {
        InstanceObjects {
            engine: self.engine,
            id: self.id.clone(),
            challenge: self.challenge.clone(),
            container: self.container.clone(),
        }
    }

    /// When renewals stop: its claim plus the challenge's `maxLifetime`.
    pub fn deadline(&self, max_lifetime_ms: i64) -> Option<i64> {
        self.claimed_at.map(|at| at.saturating_add(max_lifetime_ms))
    }
}

/// The expiry a renewal at `now` gives: `ttl` from now, but never past the `deadline`. `None`
/// when the deadline is reached already (it is not renewed).
pub fn renewed_expiry(now: i64, ttl_ms: i64, expires_at: i64, deadline: i64) -> Option<i64> {
    let renewed = now.saturating_add(ttl_ms).min(deadline);
    (renewed > expires_at).then_some(renewed)
}

/// Host ports free in `range` for `count` ports, taken from `start` on (wrapping). `None` when
/// fewer are free.
pub fn free_ports(
    range: &RangeInclusive<u16>,
    used: &BTreeSet<u16>,
    start: u16,
    count: usize,
) -> Option<Vec<u16>> {
    let (first, last) = (*range.start(), *range.end());
    let start = if (first..=last).contains(&start) {
        start
    } else {
        first
    };
    let after = start..=last;
    let before = first..start;
    let ports: Vec<u16> = after
        .chain(before)
        .filter(|port| !used.contains(port))
        .take(count)
        .collect();
    (ports.len() == count).then_some(ports)
}

/// The key flags are derived from.
#[derive(Clone)]
pub struct FlagKey(Vec<u8>);

impl std::fmt::Debug for FlagKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlagKey(<secret>)")
    }
}

impl FlagKey {
    /// A key of these bytes.
    pub fn new(bytes: Vec<u8>) -> FlagKey {
        FlagKey(bytes)
    }

    /// The team's flag for the challenge: `format` with its `%s` replaced by 32 hex digits of
    /// HMAC-SHA-256(key, challenge, NUL, team). Another team's flag differs; without the key,
    /// none can be guessed from another.
    pub fn flag(&self, challenge: &str, team: &Team, format: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(challenge.as_bytes());
        mac.update(&[0]);
        mac.update(team.as_str().as_bytes());
        let digest = hex::encode(mac.finalize().into_bytes());
        format.replacen("%s", &digest[..32], 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn team(name: &str) -> Team {
        Team::new(name).unwrap()
    }

    #[test]
    fn each_team_and_challenge_has_a_flag_of_its_own_in_the_format() {
        let key = FlagKey::new(b"k".to_vec());
        let flag = key.flag("heap", &team("t42"), "flag{heap_%s}");
        assert!(flag.starts_with("flag{heap_") && flag.ends_with('}'));
        assert_eq!(flag.len(), "flag{heap_}".len() + 32);
        assert_eq!(flag, key.flag("heap", &team("t42"), "flag{heap_%s}"));
        assert_ne!(flag, key.flag("heap", &team("t17"), "flag{heap_%s}"));
        assert_ne!(flag, key.flag("stack", &team("t42"), "flag{heap_%s}"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            key.flag("ab", &team("c"), "%s"),
            key.flag("a", &team("bc"), "%s")
        );
        assert_ne!(
            flag,
            FlagKey::new(b"other".to_vec()).flag("heap", &team("t42"), "flag{heap_%s}")
        );
    }

    #[test]
    fn teams_are_short_printable_names() {
        assert!(Team::new("").is_err());
        assert!(Team::new(&"a".repeat(MAX_TEAM + 1)).is_err());
        assert!(Team::new("a\nb").is_err());
        assert!(Team::new("admin\u{202E}nimda").is_err());
        assert!(Team::new("t\u{200B}42").is_err());
        assert!(Team::new("Équipe 7 🚩").is_ok());
    }

    #[test]
    fn ports_are_taken_from_the_start_and_wrap() {
        let range = 100..=104;
        let used = BTreeSet::from([101, 103]);
        assert_eq!(free_ports(&range, &used, 101, 2), Some(vec![102, 104]));
        assert_eq!(free_ports(&range, &used, 104, 2), Some(vec![104, 100]));
        assert_eq!(free_ports(&range, &used, 0, 1), Some(vec![100]));
        assert_eq!(free_ports(&range, &used, 100, 4), None);
    }

    #[test]
    fn a_renewal_never_passes_the_deadline() {
        assert_eq!(renewed_expiry(1_000, 500, 1_200, 10_000), Some(1_500));
        assert_eq!(renewed_expiry(1_000, 500, 1_200, 1_300), Some(1_300));
        assert_eq!(renewed_expiry(1_000, 500, 1_300, 1_300), None);
    }
}
