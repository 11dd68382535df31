//! One reconcile, as the CLI, the benchmarks and (later) the agent run it: load the repo, observe
//! the engine, plan, and carry the plan out.
//!
//! Each stage fails with its own reason ([`ReconcileError`]): an invalid repo needs a fix by the
//! user, an unreachable engine needs a retry. Printing is the caller's business.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crate::apply::{Outcome, StepReport, execute};
use crate::backend::docker::{self, ChallengeTemplate, DockerBackend, EngineError};
use crate::descriptor::model::RunState;
use crate::descriptor::{self, LoadError, LoadOptions, Loaded, Problem};
use crate::plan::{Action, Plan, Policy};

/// Why a reconcile stopped before applying anything.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The repo could not be read at all.
    #[error(transparent)]
    Unreadable(#[from] LoadError),
    /// The repo has problems; nothing is applied until they are fixed.
    #[error("the repo has {} problem(s); nothing was planned", .0.len())]
    Invalid(Vec<Problem>),
    /// The engine cannot be used right now.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Where and how to reconcile.
#[derive(Debug, Clone)]
pub struct Target {
    /// The berth instance acting.
    pub instance: String,
    /// Delete what the repo no longer declares.
    pub prune: bool,
}

/// A plan and everything needed to carry it out.
pub struct Planned {
    /// The loaded repo.
    pub loaded: Loaded,
    /// The engine connection.
    pub backend: DockerBackend,
    /// Container templates, by challenge.
    pub templates: Vec<ChallengeTemplate>,
    /// The plan.
    pub plan: Plan,
}

/// Loads `dir`, or says why it cannot be planned: unreadable, or every problem it has.
pub fn load_valid(dir: &Path, options: &LoadOptions) -> Result<Loaded, ReconcileError> {
    let loaded = descriptor::load(dir, options)?;
    if loaded.is_valid() {
        Ok(loaded)
    } else {
        Err(ReconcileError::Invalid(loaded.problems))
    }
}

/// Loads `dir`, observes the engine and plans.
pub async fn plan(
    dir: &Path,
    options: &LoadOptions,
    target: &Target,
) -> Result<Planned, ReconcileError> {
    let loaded = load_valid(dir, options)?;
    let backend = DockerBackend::connect(&target.instance).await?;
    let observed = backend.observe().await?;
    let (desired, templates) = docker::templates(&loaded.descriptors);
    let plan = crate::plan::diff(
        &desired,
        &observed,
        Policy {
            prune: target.prune,
        },
    );
    Ok(Planned {
        loaded,
        backend,
        templates,
        plan,
    })
}

/// Carries out a plan: steps in dependency order, `concurrency` at once; then waits up to `wait`
/// for started challenges to be healthy, turning those that are not into failures.
pub async fn apply(
    planned: &Planned,
    concurrency: usize,
    wait: Duration,
    on_report: impl FnMut(&StepReport),
) -> Vec<StepReport> {
    let work = Work {
        backend: &planned.backend,
        templates: &planned.templates,
        root: &planned.loaded.root,
    };
    apply_plan(&work, &planned.plan, concurrency, wait, on_report).await
}

/// What carrying out a plan needs besides the plan: the engine, the templates and the checkout
/// that build contexts are read from.
pub struct Work<'a> {
    /// The engine connection.
    pub backend: &'a DockerBackend,
    /// Container templates, by challenge.
    pub templates: &'a [ChallengeTemplate],
    /// The repo's root folder.
    pub root: &'a Path,
}

/// [`apply`], from parts: the agent keeps the loaded repo and the engine connection apart.
pub async fn apply_plan(
    work: &Work<'_>,
    plan: &Plan,
    concurrency: usize,
    wait: Duration,
    on_report: impl FnMut(&StepReport),
) -> Vec<StepReport> {
    let by_key: HashMap<_, _> = work.templates.iter().map(|t| (t.key.clone(), t)).collect();
    let root = work.root;
    let backend = work.backend;
    let mut reports = execute(
        plan,
        concurrency,
        |step| {
            let template = by_key.get(&step.key).copied();
            async move {
                match (step.action, template) {
                    (Action::Delete, _) => backend.delete(&step.key).await,
                    (_, Some(template)) => backend.converge(template, root).await,
                    (_, None) => Err("no template for this object".to_string()),
                }
            }
        },
        on_report,
    )
    .await;
    let started: Vec<_> = reports
        .iter()
        .filter(|r| {
            matches!(r.outcome, Outcome::Done(_))
                && !matches!(r.step.action, Action::Delete | Action::Stop)
        })
        .filter(|r| {
            by_key
                .get(&r.step.key)
                .is_some_and(|t| t.spec.state == RunState::Running)
        })
        .map(|r| r.step.key.clone())
        .collect();
    if !wait.is_zero() && !started.is_empty() {
        let unhealthy = backend.wait_healthy(&started, wait).await;
        for report in reports.iter_mut() {
            if let Some(why) = unhealthy.get(&report.step.key) {
                report.outcome = Outcome::Failed(why.clone());
            }
        }
    }
    reports
}
