//! What a challenge's solver (`healthcheck.solve`) found, the same on every engine: whether a run
//! is due, what its last result says of the challenge's health, and how a run's exit and output
//! are judged. Pure: each engine runs the solver its own way (a container in the challenge
//! container's network on Docker, a pod beside the challenge's on Kubernetes).

use std::time::{Duration, Instant};

use crate::backend::masked;
use crate::descriptor::model::SolveCheck;
use crate::descriptor::values::SecretRef;
use crate::plan::Health;

/// The longest a run may take beyond its check's timeout: pulling the solver's image.
pub(crate) const PULL_WAIT: Duration = Duration::from_secs(300);

/// What a run of a per-team instance's solver is judged by: the flags it must print one of
/// (with `expectFlag`: the team's own), and the challenge's other secrets, masked in what it says
/// but never taken for its flag.
#[derive(Debug, Clone, Default)]
pub(crate) struct SolveFlags {
    /// What it must print one of.
    pub expected: Vec<String>,
    /// Masked too, never expected.
    pub hidden: Vec<String>,
}

/// The most of a run's output read, to find the flag in and to quote.
pub(crate) const OUTPUT_LIMIT: usize = 1024 * 1024;

/// What the solver last found for one challenge version, and whether a run is going on.
#[derive(Debug, Clone, Default)]
pub(crate) struct SolveState {
    /// A run is going on.
    pub running: bool,
    /// When the last run ended, and what it found.
    pub last: Option<(Instant, Result<(), Unsolved>)>,
}

impl SolveState {
    /// The health its last result gives a part that is otherwise `health`, with why; `None` to
    /// leave the part as it is. A result older than two rounds (a run that never ended, checks
    /// that stopped) says nothing of now; `solving` says whether this berth runs solvers (an
    /// apply and the agent do, a plan does not).
    pub fn judged(
        &self,
        check: &SolveCheck,
        health: Health,
        solving: bool,
    ) -> Option<(Health, String)> {
        let fresh_for = check.interval.0 * 2 + check.timeout.0 + PULL_WAIT;
        let last = self
            .last
            .as_ref()
            .filter(|(at, _)| at.elapsed() < fresh_for);
        match last {
            Some((_, Ok(()))) => None,
            Some((_, Err(why))) => Some((Health::Degraded, format!("its solver failed: {why}"))),
            None if health == Health::Healthy => Some((
                Health::Progressing,
                match solving {
                    true => "its solver's first run has not ended".into(),
                    false => "not solved yet: an apply or the agent runs its solver".into(),
                },
            )),
            None => None,
        }
    }

    /// A run ended: what it found, or nothing when that could not be told (the engine gone, a
    /// run stuck past its bound), in which case the next look starts one again.
    pub fn ended(&mut self, found: Option<Result<(), Unsolved>>) {
        self.running = false;
        if let Some(found) = found {
            self.last = Some((Instant::now(), found));
        }
    }

    /// Whether a run should start: none going on, and the last older than the interval.
    pub fn due(&self, check: &SolveCheck) -> bool {
        !self.running
            && self
                .last
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() >= check.interval.0)
    }
}

/// One solver run, bounded by its check's timeout and an image pull: what `run` found, or, for a
/// run stuck past the bound (an image pull that never ends), nothing, after `give_up` removed
/// what it left; the next look then starts a run again.
pub(crate) async fn bounded<G: std::future::Future<Output = ()>>(
    check: &SolveCheck,
    run: impl std::future::Future<Output = Option<Result<(), Unsolved>>>,
    give_up: impl FnOnce() -> G,
) -> Option<Result<(), Unsolved>> {
    match tokio::time::timeout(check.timeout.0 + PULL_WAIT, run).await {
        Ok(found) => found,
        Err(_) => {
            give_up().await;
            None
        }
    }
}

/// The flag's possible values: each of the challenge's secrets as read on this host, trimmed,
/// the empty and unreadable ones left out.
pub(crate) fn flag_values<'a>(secrets: impl Iterator<Item = &'a SecretRef>) -> Vec<String> {
    secrets
        .filter_map(|reference| reference.resolve().ok())
        .map(|value| value.trim().to_string())
        .filter(|value| !value.is_empty())
        .collect()
}

/// Why a solver's run did not solve the challenge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unsolved {
    /// Its image could not be had, or its container or pod could not start: the engine's words.
    #[error("cannot start: {0}")]
    NotStarted(String),
    /// It ran past its check's timeout (with the engine's reason, when it gave one).
    #[error("did not finish within {timeout}{}", .reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
    TimedOut {
        /// The check's timeout, as written.
        timeout: String,
        /// Why the engine ended it.
        reason: Option<String>,
    },
    /// It exited with a failure.
    #[error("exited with code {code}{}", quoted(.last))]
    Exited {
        /// Its exit code.
        code: i64,
        /// Its last lines, every flag masked.
        last: Vec<String>,
    },
    /// It exited 0, but the flag is not in what it printed.
    #[error("exited 0 without printing the flag{}", quoted(.0))]
    NoFlag(Vec<String>),
    /// It exited 0, but its output cannot be read to find the flag: never taken for solved.
    #[error(
        "exited 0, but whether it printed the flag is unknown: its output cannot be read ({0})"
    )]
    OutputUnread(String),
}

/// `; last lines: a | b` for a run's last lines; nothing without any.
fn quoted(last: &[String]) -> String {
    match last.is_empty() {
        true => String::new(),
        false => format!("; last lines: {}", last.join(" | ")),
    }
}

/// How a run that ended with `code` and printed `output` is judged: it must exit 0, and with
/// `expectFlag` print one of `flags`. What it printed is quoted (its last lines, every flag
/// masked) when it failed.
pub(crate) fn verdict(
    code: i64,
    output: &str,
    check: &SolveCheck,
    flags: &[String],
) -> Result<(), Unsolved> {
    let last = || {
        let shown: Vec<String> = output
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| masked(l, flags))
            .collect();
        shown[shown.len().saturating_sub(3)..].to_vec()
    };
    match code {
        0 if !check.expect_flag => Ok(()),
        0 if flags
            .iter()
            .any(|flag| !flag.is_empty() && output.contains(flag.as_str())) =>
        {
            Ok(())
        }
        0 => Err(Unsolved::NoFlag(last())),
        code => Err(Unsolved::Exited { code, last: last() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(expect_flag: bool) -> SolveCheck {
        serde_json::from_value(serde_json::json!({"image": "s:1", "expectFlag": expect_flag}))
            .unwrap()
    }

    #[test]
    fn a_run_must_exit_0_and_print_the_flag_when_asked_and_the_flag_is_never_quoted() {
        let flags = ["flag{x}".to_string()];
        assert_eq!(verdict(0, "got flag{x}\n", &check(true), &flags), Ok(()));
        assert_eq!(verdict(0, "nothing\n", &check(false), &flags), Ok(()));
        assert_eq!(
            verdict(0, "nope\n", &check(true), &flags)
                .unwrap_err()
                .to_string(),
            "exited 0 without printing the flag; last lines: nope"
        );
        let failed = verdict(3, "a\nb\nleaked flag{x}\nd\n", &check(false), &flags).unwrap_err();
        assert_eq!(
            failed.to_string(),
            "exited with code 3; last lines: b | leaked <secret> | d"
        );
    }

    #[test]
    fn a_fresh_failure_degrades_and_no_result_yet_is_progressing() {
        let mut state = SolveState::default();
        let check = check(false);
        assert!(state.due(&check));
        assert_eq!(
            state.judged(&check, Health::Healthy, true).unwrap().0,
            Health::Progressing
        );
        let failed = Unsolved::Exited {
            code: 1,
            last: Vec::new(),
        };
        state.last = Some((Instant::now(), Err(failed)));
        assert_eq!(
            state.judged(&check, Health::Healthy, true),
            Some((
                Health::Degraded,
                "its solver failed: exited with code 1".into()
            ))
        );
        assert!(!state.due(&check), "the interval has not passed");
        state.last = Some((Instant::now(), Ok(())));
        assert_eq!(state.judged(&check, Health::Healthy, true), None);
        state.running = true;
        assert!(!state.due(&check));
    }
}
