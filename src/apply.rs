//! Carrying out a plan: each step starts as soon as the steps it depends on are done, a bounded
//! number at once, and one failure stops only the steps that depend on it.
//!
//! This module owns ordering, concurrency and the typed [`Outcome`] of a step; what a step does is
//! the caller's function, so the same executor serves every backend and is tested without an
//! engine. Ordering is Kahn's algorithm over the plan's dependency edges: linear in steps and
//! edges, with no waiting for a whole "level" of the graph.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use crate::descriptor::ObjectRef;
use crate::plan::{Action, Plan, Step};

/// How one step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; what was done.
    Done(String),
    /// Failed; why, in words that say what the user can do. The object is marked `Failure`.
    Failed(String),
    /// Not done yet, and not a failure: it waits for something (an image a Pipeline has not
    /// produced, a rollout in progress). Retried on a later pass.
    Waiting(String),
    /// The engine could not be used (it stopped answering). Not the object's fault: the pass is
    /// retried with backoff, and the object keeps its phase.
    Transient(String),
    /// Not tried, because a step it depends on did not succeed.
    Skipped(String),
}

impl Outcome {
    /// The outcome's name, as logs and metrics show it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Done(_) => "done",
            Outcome::Failed(_) => "failed",
            Outcome::Waiting(_) => "waiting",
            Outcome::Transient(_) => "transient",
            Outcome::Skipped(_) => "skipped",
        }
    }

    /// What was done, or why not.
    pub fn detail(&self) -> &str {
        match self {
            Outcome::Done(text)
            | Outcome::Failed(text)
            | Outcome::Waiting(text)
            | Outcome::Transient(text)
            | Outcome::Skipped(text) => text,
        }
    }
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

/// Why a step cannot start, from the plan alone: a dependency that the plan holds back, or one
/// that needs no change but is not healthy.
fn held_dependency(step: &Step, actions: &HashMap<&ObjectRef, &Step>) -> Option<String> {
    step.dependencies.iter().find_map(|dependency| {
        let held = actions.get(dependency)?;
        let why = match held.action {
            Action::Skip => "was skipped",
            Action::Wait => "is waiting",
            Action::Refuse => "was refused",
            // Not ready, as a dependency must be: the same as a dependency whose step failed.
            Action::Noop if held.unhealthy => "is unhealthy",
            _ => return None,
        };
        Some(format!("dependency {dependency} {why}"))
    })
}

/// Runs every changing step of `plan` with `run`, at most `concurrency` at once, each as soon as
/// the steps of the objects it depends on are done. `on_report` sees each step as it finishes.
///
/// After a [`Outcome::Transient`] no new step starts: the engine is gone, and the steps not yet
/// started are reported transient too, so the whole pass is retried.
pub async fn execute<F, Fut>(
    plan: &Plan,
    concurrency: usize,
    run: F,
    mut on_report: impl FnMut(&StepReport),
) -> Vec<StepReport>
where
    F: Fn(Step) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let by_key: HashMap<&ObjectRef, &Step> = plan.steps.iter().map(|s| (&s.key, s)).collect();
    let changing: Vec<&Step> = plan.steps.iter().filter(|s| s.action.changes()).collect();
    let index: HashMap<&ObjectRef, usize> = changing
        .iter()
        .enumerate()
        .map(|(i, s)| (&s.key, i))
        .collect();
    let mut unfinished = vec![0usize; changing.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); changing.len()];
    for (i, step) in changing.iter().enumerate() {
        for dependency in &step.dependencies {
            if let Some(&d) = index.get(dependency) {
                unfinished[i] += 1;
                dependents[d].push(i);
            }
        }
    }
    let mut reports = Vec::with_capacity(changing.len());
    let mut finished = vec![false; changing.len()];
    let mut ready: VecDeque<usize> = VecDeque::new();
    // Steps that cannot run, and why; their dependents cannot run either.
    let mut cascade: Vec<(usize, String)> = Vec::new();
    for (i, step) in changing.iter().enumerate() {
        if let Some(why) = held_dependency(step, &by_key) {
            cascade.push((i, why));
        } else if unfinished[i] == 0 {
            ready.push_back(i);
        }
    }
    let mut transient: Option<String> = None;
    let mut running = FuturesUnordered::new();
    loop {
        while let Some((i, why)) = cascade.pop() {
            if std::mem::replace(&mut finished[i], true) {
                continue;
            }
            let report = StepReport {
                step: changing[i].clone(),
                outcome: Outcome::Skipped(why),
                elapsed: Duration::ZERO,
            };
            on_report(&report);
            reports.push(report);
            let key = &changing[i].key;
            for &dependent in &dependents[i] {
                cascade.push((dependent, format!("dependency {key} was skipped")));
            }
        }
        while running.len() < concurrency.max(1) && transient.is_none() {
            let Some(i) = ready.pop_front() else { break };
            if finished[i] {
                continue;
            }
            let step = changing[i].clone();
            let started = Instant::now();
            let future = run(step);
            running.push(async move { (i, future.await, started.elapsed()) });
        }
        let Some((i, outcome, elapsed)) = running.next().await else {
            break;
        };
        finished[i] = true;
        let key = &changing[i].key;
        match &outcome {
            Outcome::Done(_) => {
                for &dependent in &dependents[i] {
                    unfinished[dependent] -= 1;
                    if unfinished[dependent] == 0 {
                        ready.push_back(dependent);
                    }
                }
            }
            Outcome::Transient(why) => {
                transient.get_or_insert_with(|| why.clone());
            }
            Outcome::Failed(_) | Outcome::Skipped(_) => {
                for &dependent in &dependents[i] {
                    cascade.push((dependent, format!("dependency {key} failed")));
                }
            }
            Outcome::Waiting(_) => {
                for &dependent in &dependents[i] {
                    cascade.push((dependent, format!("dependency {key} is waiting")));
                }
            }
        }
        let report = StepReport {
            step: changing[i].clone(),
            outcome,
            elapsed,
        };
        on_report(&report);
        reports.push(report);
    }
    if let Some(why) = transient {
        for (i, step) in changing.iter().enumerate() {
            if std::mem::replace(&mut finished[i], true) {
                continue;
            }
            let report = StepReport {
                step: (*step).clone(),
                outcome: Outcome::Transient(format!("not tried: {why}")),
                elapsed: Duration::ZERO,
            };
            on_report(&report);
            reports.push(report);
        }
    }
    reports
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn step(name: &str, action: Action, dependencies: &[&str]) -> Step {
        Step {
            key: format!("Challenge/{name}").parse().unwrap(),
            action,
            engine: crate::plan::Engine::Docker,
            from: None,
            reasons: vec![],
            replacement: None,
            dependencies: dependencies
                .iter()
                .map(|d| format!("Challenge/{d}").parse().unwrap())
                .collect(),
            unhealthy: false,
        }
    }

    /// Runs a plan whose steps end as `outcome_of` says, each after `delay_of` milliseconds.
    fn run_plan_with(
        steps: Vec<Step>,
        concurrency: usize,
        outcome_of: impl Fn(&str) -> Outcome,
        delay_of: impl Fn(&str) -> u64,
    ) -> (Vec<String>, Vec<(String, Outcome)>) {
        let plan = Plan { steps, held: None };
        let order = Arc::new(Mutex::new(Vec::new()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let reports = runtime.block_on(execute(
            &plan,
            concurrency,
            |step| {
                let order = order.clone();
                let name = step.key.name.to_string();
                let outcome = outcome_of(&name);
                let delay = delay_of(&name);
                async move {
                    order.lock().unwrap().push(format!("start {name}"));
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    order.lock().unwrap().push(format!("end {name}"));
                    outcome
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

    fn run_plan(
        steps: Vec<Step>,
        failing: &'static [&'static str],
    ) -> (Vec<String>, Vec<(String, Outcome)>) {
        run_plan_with(
            steps,
            2,
            |name| match failing.contains(&name) {
                true => Outcome::Failed("boom".into()),
                false => Outcome::Done("ok".into()),
            },
            |_| 0,
        )
    }

    fn outcome_of<'a>(reports: &'a [(String, Outcome)], name: &str) -> &'a Outcome {
        &reports.iter().find(|(n, _)| n == name).unwrap().1
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
        assert_eq!(order, vec!["start db", "end db", "start app", "end app"]);
    }

    #[test]
    fn a_step_starts_when_its_own_dependencies_are_done_not_a_whole_level() {
        // slow (level 0) takes long; fast (level 0) → next (level 1) must not wait for slow.
        let (order, _) = run_plan_with(
            vec![
                step("slow", Action::Create, &[]),
                step("fast", Action::Create, &[]),
                step("next", Action::Create, &["fast"]),
            ],
            4,
            |_| Outcome::Done("ok".into()),
            |name| if name == "slow" { 200 } else { 1 },
        );
        let position = |what: &str| order.iter().position(|o| o == what).unwrap();
        assert!(
            position("start next") < position("end slow"),
            "next waited for an unrelated step: {order:?}"
        );
    }

    #[test]
    fn a_failure_skips_dependents_but_not_independent_steps() {
        let (order, reports) = run_plan(
            vec![
                step("app", Action::Update, &["db"]),
                step("db", Action::Create, &[]),
                step("other", Action::Create, &[]),
                step("web", Action::Create, &["app"]),
            ],
            &["db"],
        );
        assert!(!order.contains(&"start app".to_string()));
        assert!(order.contains(&"start other".to_string()));
        assert_eq!(
            outcome_of(&reports, "app"),
            &Outcome::Skipped("dependency Challenge/db failed".into())
        );
        assert_eq!(
            outcome_of(&reports, "web"),
            &Outcome::Skipped("dependency Challenge/app was skipped".into())
        );
        assert_eq!(outcome_of(&reports, "other"), &Outcome::Done("ok".into()));
    }

    #[test]
    fn held_dependencies_skip_their_dependents() {
        let (order, reports) = run_plan(
            vec![
                step("app", Action::Create, &["img"]),
                step("img", Action::Wait, &[]),
                step("tool", Action::Create, &["gone"]),
                step("gone", Action::Skip, &[]),
            ],
            &[],
        );
        assert!(order.is_empty());
        assert_eq!(
            outcome_of(&reports, "app"),
            &Outcome::Skipped("dependency Challenge/img is waiting".into())
        );
        assert_eq!(
            outcome_of(&reports, "tool"),
            &Outcome::Skipped("dependency Challenge/gone was skipped".into())
        );
    }

    #[test]
    fn a_transient_outcome_stops_new_steps_and_marks_the_rest_transient() {
        let (order, reports) = run_plan_with(
            vec![
                step("a", Action::Create, &[]),
                step("b", Action::Create, &["a"]),
                step("c", Action::Create, &[]),
            ],
            1,
            |name| match name {
                "a" => Outcome::Transient("the Docker Engine stopped answering".into()),
                _ => Outcome::Done("ok".into()),
            },
            |_| 0,
        );
        assert_eq!(order, vec!["start a", "end a"]);
        assert_eq!(reports.len(), 3);
        for (_, outcome) in &reports {
            assert!(matches!(outcome, Outcome::Transient(_)), "{outcome:?}");
        }
    }

    #[test]
    fn ten_thousand_chained_steps_are_ordered_without_quadratic_work() {
        let steps: Vec<Step> = (0..10_000)
            .map(|i| {
                let name = format!("s{i}");
                let before = format!("s{}", i.max(1) - 1);
                let deps: Vec<&str> = if i == 0 { vec![] } else { vec![&before] };
                step(&name, Action::Create, &deps)
            })
            .collect();
        let (order, reports) = run_plan_with(steps, 8, |_| Outcome::Done("ok".into()), |_| 0);
        assert_eq!(reports.len(), 10_000);
        assert_eq!(order[0], "start s0");
        assert_eq!(order[order.len() - 1], "end s9999");
    }
}
