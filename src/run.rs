//! A pipeline run as berth records it: its state, what queued it, each step's exit code and
//! duration ([`Run`]), how the run ended, the image it produced, and its log, capped and with
//! secret values masked. Pure: the Docker
//! backend runs the steps and feeds output in; the CLI and the agent show and keep what is here.
//!
//! The log keeps its head and its tail when a run says more than the cap (as CI systems do),
//! with a marker where the middle was dropped. Output is masked line by line, so a secret split
//! across two chunks of the engine's stream is still masked.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest log kept per run by default, in bytes.
pub const DEFAULT_LOG_CAP: usize = 10 << 20;

/// What stands in for a secret value in a log.
pub const MASK: &str = "***";

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Waiting for a worker.
    Queued,
    /// A worker carries it out.
    Running,
    /// Every step exited 0, and the image (if any) was built.
    Succeeded,
    /// A step failed, it timed out, or it could not be carried out.
    Failed,
    /// Cancelled by a person or superseded by a newer commit.
    Cancelled,
    /// It was running when the agent stopped.
    Interrupted,
}

impl RunState {
    /// Every state, in order of a run's life.
    pub const ALL: [RunState; 6] = [
        RunState::Queued,
        RunState::Running,
        RunState::Succeeded,
        RunState::Failed,
        RunState::Cancelled,
        RunState::Interrupted,
    ];

    /// The state's name, as the store, the API and metrics show it.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::Interrupted => "interrupted",
        }
    }

    /// The state named `name`.
    pub fn from_name(name: &str) -> Option<RunState> {
        RunState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether the run is over.
    pub fn is_final(self) -> bool {
        !matches!(self, RunState::Queued | RunState::Running)
    }
}

/// What queued a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    /// A webhook announced a push to the pipeline's source repo.
    Push,
    /// The pipeline's cron schedule.
    Schedule,
    /// The descriptor (or, with no `source`, its folder of the config repo) changed, or the image
    /// it produces is missing: the pass asks for it.
    Change,
    /// A person: `POST /api/v1/pipelines/{name}/runs`.
    Manual,
    /// A second attempt of a run the agent's stop interrupted.
    Retry,
}

impl Cause {
    /// Every cause.
    pub const ALL: [Cause; 5] = [
        Cause::Push,
        Cause::Schedule,
        Cause::Change,
        Cause::Manual,
        Cause::Retry,
    ];

    /// The cause's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Push => "push",
            Cause::Schedule => "schedule",
            Cause::Change => "change",
            Cause::Manual => "manual",
            Cause::Retry => "retry",
        }
    }

    /// The cause named `name`.
    pub fn from_name(name: &str) -> Option<Cause> {
        Cause::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

/// One step as it ran, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    /// The step's name.
    pub name: String,
    /// Its exit code; absent when it was killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
}

/// A run, as the store, the API and `berth runs` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    /// Its number, unique in this agent's state folder.
    pub id: i64,
    /// The pipeline's name.
    pub pipeline: String,
    /// Where it is.
    pub state: RunState,
    /// What queued it.
    pub cause: Cause,
    /// The source commit: known from a push, or once the run cloned its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The branch a push was to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The webhook delivery that queued it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
    /// The descriptor's spec hash it was queued for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,
    /// 1, or 2 for the retry of an interrupted run.
    pub attempt: u32,
    /// The interrupted run this one retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<i64>,
    /// When it was queued (RFC 3339).
    pub queued_at: String,
    /// When a worker took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// How long it ran, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// How it ended, in words (which step failed, what superseded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The image it produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Its steps as they ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepRecord>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunResult {
    /// Every step exited 0 (and the image, if any, was built).
    Succeeded,
    /// A step exited non-zero: its name and exit code.
    Failed {
        /// The step.
        step: String,
        /// Its exit code.
        exit_code: i64,
    },
    /// The run took longer than its timeout and was killed.
    TimedOut(Duration),
    /// The run was cancelled (by a person, or a newer commit) and killed.
    Cancelled,
    /// The run could not be carried out (the image is missing, the build failed); what to do is
    /// in the message.
    Error(String),
    /// The engine stopped answering: not the pipeline's fault, so the agent runs it again.
    EngineGone(String),
}

impl RunResult {
    /// `succeeded`, `failed`, `timed out` or `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RunResult::Succeeded => "succeeded",
            RunResult::Failed { .. } => "failed",
            RunResult::TimedOut(_) => "timed out",
            RunResult::Cancelled => "cancelled",
            RunResult::Error(_) => "error",
            RunResult::EngineGone(_) => "engine gone",
        }
    }
}

/// One step as it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRun {
    /// The step's name.
    pub name: String,
    /// Its exit code; `None` when it was killed.
    pub exit_code: Option<i64>,
    /// How long it took.
    pub duration: Duration,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// The pipeline.
    pub pipeline: String,
    /// The source commit (or `local` for a folder that is not a git checkout).
    pub commit: String,
    /// The steps that ran, in order.
    pub steps: Vec<StepRun>,
    /// How it ended.
    pub result: RunResult,
    /// The image it produced, when it succeeded and produces one.
    pub image: Option<String>,
    /// How long it took in all.
    pub duration: Duration,
}

impl RunReport {
    /// `Pipeline/x at abc1234: failed at step test (exit code 2) after 1.2s`.
    pub fn summary(&self) -> String {
        let commit = &self.commit[..self.commit.len().min(12)];
        let took = format!("{:.1}s", self.duration.as_secs_f64());
        match &self.result {
            RunResult::Succeeded => match &self.image {
                Some(image) => format!(
                    "Pipeline/{} at {commit}: succeeded in {took}, produced {image}",
                    self.pipeline
                ),
                None => format!(
                    "Pipeline/{} at {commit}: succeeded in {took}",
                    self.pipeline
                ),
            },
            RunResult::Failed { step, exit_code } => format!(
                "Pipeline/{} at {commit}: failed at step {step} (exit code {exit_code}) after {took}",
                self.pipeline
            ),
            RunResult::TimedOut(limit) => format!(
                "Pipeline/{} at {commit}: timed out after {}s (its timeout); the container was killed",
                self.pipeline,
                limit.as_secs()
            ),
            RunResult::Cancelled => format!(
                "Pipeline/{} at {commit}: cancelled after {took}; the container was killed",
                self.pipeline
            ),
            RunResult::Error(why) | RunResult::EngineGone(why) => {
                format!("Pipeline/{} at {commit}: error: {why}", self.pipeline)
            }
        }
    }
}

impl RunReport {
    /// The summary of a run that did not succeed, with the log's last lines, which say why;
    /// short enough for status and the API (a step's one huge line does not come with it).
    pub fn failure(&self, log: &mut RunLog) -> String {
        let contents = log.contents();
        let text = String::from_utf8_lossy(&contents);
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        let mut tail: String = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
        if tail.chars().count() > 2000 {
            let end: String = tail.chars().rev().take(2000).collect();
            tail = format!("…{}", end.chars().rev().collect::<String>());
        }
        format!("{}; last lines: {tail}", self.summary())
    }
}

/// A run's log: masked, and capped to its head and tail.
#[derive(Debug)]
pub struct RunLog {
    secrets: Vec<String>,
    cap: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    dropped: usize,
    /// A line not yet ended, held until it is, so it is masked whole.
    partial: Vec<u8>,
}

impl RunLog {
    /// A log keeping at most about `cap` bytes, masking each of `secrets`.
    pub fn new(cap: usize, secrets: impl IntoIterator<Item = String>) -> RunLog {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        // Each line of a multi-line secret (a PEM key) too: output is masked line by line, and
        // a program may print it a line at a time.
        let lines: Vec<String> = secrets
            .iter()
            .filter(|s| s.contains('\n'))
            .flat_map(|s| {
                s.lines()
                    .map(str::trim)
                    .filter(|l| l.len() >= 3)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        secrets.extend(lines);
        secrets.dedup();
        // The longest first, so a secret that contains another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        RunLog {
            secrets,
            cap: cap.max(64),
            head: Vec::new(),
            tail: VecDeque::new(),
            dropped: 0,
            partial: Vec::new(),
        }
    }

    /// Adds output; returns the masked, complete lines it finished, to show as they come.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.partial.extend_from_slice(bytes);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            // A line longer than the cap is let through in pieces rather than held for ever.
            if self.partial.len() < self.cap / 2 {
                return Vec::new();
            }
            // What may be the start of a secret stays back, to be masked with the rest of it.
            let longest = self.secrets.first().map_or(0, String::len);
            let cut = self.partial.len().saturating_sub(longest.saturating_sub(1));
            let piece: Vec<u8> = self.partial.drain(..cut).collect();
            return self.keep(&piece);
        };
        let lines: Vec<u8> = self.partial.drain(..=end).collect();
        self.keep(&lines)
    }

    /// Adds a line of berth's own (`== step test`), not masked: it holds no output.
    pub fn note(&mut self, line: &str) -> Vec<u8> {
        let mut flushed = self.flush();
        let text = format!("{line}\n").into_bytes();
        self.store(&text);
        flushed.extend(text);
        flushed
    }

    /// Masks and keeps what is held back of a line not yet ended.
    pub fn flush(&mut self) -> Vec<u8> {
        let piece = std::mem::take(&mut self.partial);
        if piece.is_empty() {
            return Vec::new();
        }
        self.keep(&piece)
    }

    fn keep(&mut self, bytes: &[u8]) -> Vec<u8> {
        let masked = self.mask(bytes);
        self.store(&masked);
        masked
    }

    /// `text` with every secret masked: for what berth says about a run (an error, a build's
    /// last lines), which may quote the run's output.
    pub fn masked(&self, text: &str) -> String {
        String::from_utf8(self.mask(text.as_bytes())).unwrap_or_default()
    }

    fn mask(&self, bytes: &[u8]) -> Vec<u8> {
        let mut text = String::from_utf8_lossy(bytes).into_owned();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), MASK);
            }
        }
        // Kept and shown escaped: whoever reads the log (a terminal, the console) never obeys
        // what a step printed.
        crate::printable::text(&text).into_owned().into_bytes()
    }

    fn store(&mut self, bytes: &[u8]) {
        let half = self.cap / 2;
        let room = half.saturating_sub(self.head.len());
        let (into_head, rest) = bytes.split_at(room.min(bytes.len()));
        self.head.extend_from_slice(into_head);
        self.tail.extend(rest);
        while self.tail.len() > half {
            self.tail.pop_front();
            self.dropped += 1;
        }
    }

    /// The log as kept: the head, a marker if anything was dropped, and the tail.
    pub fn contents(&mut self) -> Vec<u8> {
        self.flush();
        let mut out = self.head.clone();
        if self.dropped > 0 {
            out.extend_from_slice(
                format!(
                    "\n[berth: {} bytes of output dropped here; the log keeps its first and last {} bytes]\n",
                    self.dropped,
                    self.cap / 2
                )
                .as_bytes(),
            );
        }
        out.extend(self.tail.iter());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_even_when_split_across_chunks() {
        let mut log = RunLog::new(1 << 20, ["hunter2".to_string(), "hunter2-long".to_string()]);
        let mut shown = log.push(b"token=hun");
        shown.extend(log.push(b"ter2 and hunter2-long\nnext"));
        shown.extend(log.flush());
        assert_eq!(String::from_utf8(shown).unwrap(), "token=*** and ***\nnext");
        assert!(
            !String::from_utf8(log.contents())
                .unwrap()
                .contains("hunter")
        );
    }

    /// Hostile findings: a PEM key printed a line at a time, and a secret cut where a long line
    /// is let through in pieces, were shown in clear.
    #[test]
    fn multi_line_secrets_and_secrets_across_a_long_line_cut_are_masked() {
        let key = "-----BEGIN KEY-----\nAAAAsecretline\n-----END KEY-----".to_string();
        let mut log = RunLog::new(100, [key, "s3cr3tVAL".to_string()]);
        let mut shown = log.push(b"AAAAsecretline\n");
        shown.extend(log.push(format!("{}s3cr", "0".repeat(60)).as_bytes()));
        shown.extend(log.push(b"3tVAL\n"));
        let text = String::from_utf8(shown).unwrap();
        assert!(
            !text.contains("secretline") && !text.contains("3tVAL"),
            "{text}"
        );
        assert_eq!(log.masked("build said s3cr3tVAL"), "build said ***");
    }

    #[test]
    fn a_long_log_keeps_its_head_and_tail_with_a_marker() {
        let mut log = RunLog::new(1000, Vec::new());
        for line in 0..1000 {
            log.push(format!("line {line:04}\n").as_bytes());
        }
        let text = String::from_utf8(log.contents()).unwrap();
        assert!(text.starts_with("line 0000\n"));
        assert!(text.ends_with("line 0999\n"));
        assert!(text.contains("bytes of output dropped here"));
        assert!(text.len() < 1200, "{}", text.len());
    }

    #[test]
    fn summaries_say_how_a_run_ended() {
        let mut report = RunReport {
            pipeline: "app".into(),
            commit: "0123456789abcdef".into(),
            steps: vec![],
            result: RunResult::Failed {
                step: "test".into(),
                exit_code: 2,
            },
            image: None,
            duration: Duration::from_millis(1200),
        };
        assert_eq!(
            report.summary(),
            "Pipeline/app at 0123456789ab: failed at step test (exit code 2) after 1.2s"
        );
        report.result = RunResult::Succeeded;
        report.image = Some("app:0123456".into());
        assert!(report.summary().ends_with("produced app:0123456"));
    }
}
