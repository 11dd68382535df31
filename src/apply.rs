//! Carrying out a plan: steps in dependency order, a bounded number at once, one failure not
//! stopping the steps that do not depend on it.
//!
//! This module owns ordering and concurrency only; what a step does is the caller's function, so
//! the same executor serves every backend and is tested without an engine.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::descriptor::ObjectRef;
use crate::plan::{Action, Plan, Step};

/// How one step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; what was done.
    Done(String),
    /// Failed; why.
    Failed(String),
    /// Not tried, because a step it depends on did not succeed.
    Blocked(String),
}

/// A step and how it ended.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// The step.
    pub step: Step,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took.
    pub elapsed: Duration,
}

/// Runs every changing step of `plan` with `run`, at most `concurrency` at once, each after the
/// steps of the objects it depends on. `on_report` sees each step as it finishes.
pub async fn execute<F, Fut>(
    plan: &Plan,
    concurrency: usize,
    run: F,
    mut on_report: impl FnMut(&StepReport),
) -> Vec<StepReport>
where
    F: Fn(Step) -> Fut,
    Fut: Future<Output = Result<String, String>>,
{
    let actions: HashMap<&ObjectRef, Action> =
        plan.steps.iter().map(|s| (&s.key, s.action)).collect();
    let mut levels: BTreeMap<usize, Vec<&Step>> = BTreeMap::new();
    let mut memo = HashMap::new();
    for step in plan.steps.iter().filter(|s| s.action.changes()) {
        levels
            .entry(level(&step.key, plan, &mut memo))
            .or_default()
            .push(step);
    }
    let mut failed: HashMap<ObjectRef, String> = HashMap::new();
    let mut reports = Vec::new();
    for (_, steps) in levels {
        let mut runnable = Vec::new();
        for step in steps {
            let blocker = step.dependencies.iter().find_map(|dependency| {
                if let Some(why) = failed.get(dependency) {
                    return Some(format!("{dependency} {why}"));
                }
                match actions.get(dependency) {
                    Some(Action::Skip) => Some(format!("{dependency} was skipped")),
                    _ => None,
                }
            });
            match blocker {
                Some(why) => {
                    let report = StepReport {
                        step: step.clone(),
                        outcome: Outcome::Blocked(format!("waits for {why}")),
                        elapsed: Duration::ZERO,
                    };
                    failed.insert(step.key.clone(), "was not applied".into());
                    on_report(&report);
                    reports.push(report);
                }
                None => runnable.push(step.clone()),
            }
        }
        let mut running = futures_util::stream::iter(runnable.into_iter().map(|step| {
            let started = Instant::now();
            let future = run(step.clone());
            async move {
                let outcome = match future.await {
                    Ok(done) => Outcome::Done(done),
                    Err(why) => Outcome::Failed(why),
                };
                StepReport {
                    step,
                    outcome,
                    elapsed: started.elapsed(),
                }
            }
        }))
        .buffer_unordered(concurrency.max(1));
        while let Some(report) = running.next().await {
            if let Outcome::Failed(_) = report.outcome {
                failed.insert(report.step.key.clone(), "failed".into());
            }
            on_report(&report);
            reports.push(report);
        }
    }
    reports
}

/// Depth of an object in the dependency graph of the plan (0 for no dependencies).
fn level(key: &ObjectRef, plan: &Plan, memo: &mut HashMap<ObjectRef, usize>) -> usize {
    if let Some(depth) = memo.get(key) {
        return *depth;
    }
    // Cycles are rejected by the loader; guard anyway so a bug cannot recurse forever.
    memo.insert(key.clone(), 0);
    let depth = plan
        .steps
        .iter()
        .find(|s| &s.key == key)
        .map(|step| {
            step.dependencies
                .iter()
                .map(|d| level(d, plan, memo) + 1)
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    memo.insert(key.clone(), depth);
    depth
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn step(name: &str, action: Action, dependencies: &[&str]) -> Step {
        Step {
            key: format!("Challenge/{name}").parse().unwrap(),
            action,
            reasons: vec![],
            replacement: None,
            dependencies: dependencies
                .iter()
                .map(|d| format!("Challenge/{d}").parse().unwrap())
                .collect(),
        }
    }

    fn run_plan(
        steps: Vec<Step>,
        failing: &'static [&'static str],
    ) -> (Vec<String>, Vec<(String, Outcome)>) {
        let plan = Plan { steps };
        let order = Arc::new(Mutex::new(Vec::new()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let reports = runtime.block_on(execute(
            &plan,
            2,
            |step| {
                let order = order.clone();
                async move {
                    order.lock().unwrap().push(step.key.name.to_string());
                    if failing.contains(&step.key.name.as_str()) {
                        Err("boom".into())
                    } else {
                        Ok("ok".into())
                    }
                }
            },
            |_| {},
        ));
        let order = order.lock().unwrap().clone();
        (
            order,
            reports
                .into_iter()
                .map(|r| (r.step.key.name.to_string(), r.outcome))
                .collect(),
        )
    }

    #[test]
    fn dependencies_run_first_and_noops_do_not_run() {
        let (order, _) = run_plan(
            vec![
                step("app", Action::Create, &["db"]),
                step("db", Action::Create, &[]),
                step("same", Action::Noop, &[]),
            ],
            &[],
        );
        assert_eq!(order, vec!["db", "app"]);
    }

    #[test]
    fn a_failure_blocks_dependents_but_not_independent_steps() {
        let (order, reports) = run_plan(
            vec![
                step("app", Action::Update, &["db"]),
                step("db", Action::Create, &[]),
                step("other", Action::Create, &[]),
            ],
            &["db"],
        );
        assert_eq!(order.len(), 2);
        assert!(order.contains(&"other".to_string()));
        let app = reports.iter().find(|(name, _)| name == "app").unwrap();
        assert_eq!(
            app.1,
            Outcome::Blocked("waits for Challenge/db failed".into())
        );
        assert!(
            reports
                .iter()
                .any(|(name, outcome)| name == "other" && *outcome == Outcome::Done("ok".into()))
        );
    }

    #[test]
    fn skipped_dependencies_block() {
        let (order, reports) = run_plan(
            vec![
                step("app", Action::Create, &["img"]),
                step("img", Action::Skip, &[]),
            ],
            &[],
        );
        assert!(order.is_empty());
        assert_eq!(
            reports[0].1,
            Outcome::Blocked("waits for Challenge/img was skipped".into())
        );
    }
}
