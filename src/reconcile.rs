//! One pass, as every driver runs it (`berth plan`, `berth apply`, `berth plan --against-status`,
//! the agent, the benchmarks): load → observe → resolve → diff → apply → outcome.
//!
//! Each stage fails with its own reason: an invalid repo needs a fix by the user
//! ([`PassError::Invalid`]), an engine that does not answer or is locked by another berth needs a
//! retry ([`PassError::Engine`]). Applying happens under the instance's lock in the engine, so two
//! berths (a CLI beside an agent, on any host) never apply at once. Printing and publishing are
//! the callers' business; so is waiting: [`settle`] is for a foreground command, while the agent
//! requeues a check instead of holding the pass.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::apply::{Outcome, StepReport, execute};
use crate::backend::{self, Desired, EngineError, Engines, Ownership};
use crate::descriptor::{self, LoadError, LoadOptions, Loaded, ObjectRef, Problem};
use crate::plan::{
    self, Action, Health, Hold, ObservedObject, ObservedPart, Plan, Policy, ProducedImage,
    Products, TargetState,
};
use crate::status::StatusSet;

/// Why a pass stopped before applying anything.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The repo could not be read at all.
    #[error(transparent)]
    Unreadable(#[from] LoadError),
    /// The repo has problems; nothing is applied until they are fixed.
    #[error("the repo has {} problem(s); nothing was planned", .0.len())]
    Invalid(Vec<Problem>),
    /// An engine cannot be used right now.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Stage 1, load: the repo at `dir`, or why it cannot be planned (unreadable, or every problem).
pub fn load(dir: &Path, options: &LoadOptions) -> Result<Loaded, PassError> {
    let loaded = descriptor::load(dir, options)?;
    for warning in &loaded.warnings {
        tracing::warn!(file = %warning.file, line = warning.line, "{}", crate::printable::field(&warning.message));
    }
    if loaded.is_valid() {
        Ok(loaded)
    } else {
        Err(PassError::Invalid(loaded.problems))
    }
}

/// Where observed state comes from: the engines, or the status an agent committed (for a
/// pull request's plan, with no engine).
pub enum Observer<'a> {
    /// The live engines.
    Engines(&'a Engines),
    /// Status committed to the repo.
    Status(&'a StatusSet),
}

/// A plan, with what it was made from.
#[derive(Debug, Clone)]
pub struct Planned {
    /// What the revision asks for, resolved.
    pub desired: Desired,
    /// What ran when the plan was made.
    pub observed: Vec<ObservedObject>,
    /// The steps.
    pub plan: Plan,
    /// Objects held back because their engine does not answer, with why; the pass is then
    /// transient for them, while the other engines' objects are applied.
    pub unreachable: Vec<(ObjectRef, String)>,
}

/// Stages 2 to 4, observe → resolve → diff.
pub async fn plan(
    mut desired: Desired,
    observer: Observer<'_>,
    policy: Policy,
) -> Result<Planned, EngineError> {
    let mut unreachable = Vec::new();
    let observed = match observer {
        Observer::Engines(engines) => {
            engines.hold_unserved(&mut desired);
            let (mut observed, down) = engines.observe_available().await;
            if down.len() == engines.len()
                && let Some((_, error)) = down.first()
            {
                return Err(error.clone());
            }
            for (engine, error) in &down {
                for object in desired.objects.iter_mut().filter(|o| o.engine == *engine) {
                    if object.hold.is_none() {
                        unreachable.push((object.key.clone(), error.to_string()));
                        object.hold = Some(Hold::Wait(error.to_string()));
                    }
                }
            }
            engines.seal(&mut desired).await?;
            engines.diagnose(&mut observed, &desired).await;
            observed
        }
        Observer::Status(status) => status.observed(),
    };
    resolve(&mut desired, &observed);
    let policy = Policy {
        now: policy.now.or_else(|| Some(chrono::Utc::now())),
        ..policy
    };
    let plan = plan::diff(&desired.objects, &observed, policy);
    Ok(Planned {
        desired,
        observed,
        plan,
        unreachable,
    })
}

/// Stage 3, resolve: fills in references between descriptors. An object that uses the images of
/// Pipelines runs the newest image each produced; until every one has one, it waits, with that
/// reason (not a failure).
pub fn resolve(desired: &mut Desired, observed: &[ObservedObject]) {
    let produced: BTreeMap<&ObjectRef, &ProducedImage> = observed
        .iter()
        .filter_map(|o| Some((&o.key, o.produced.as_ref()?)))
        .collect();
    let references: Vec<(ObjectRef, Vec<ObjectRef>)> = desired
        .pipeline_references
        .iter()
        .map(|(k, p)| (k.clone(), p.clone()))
        .collect();
    for (key, pipelines) in references {
        let held = desired
            .objects
            .iter()
            .any(|o| o.key == key && o.hold.is_some());
        if held {
            continue;
        }
        let mut products = Products::default();
        let mut waiting_for = Vec::new();
        for pipeline in &pipelines {
            match produced.get(pipeline) {
                Some(&image) => products.insert(pipeline.name.clone(), image.clone()),
                None => waiting_for.push(pipeline.to_string()),
            }
        }
        let why = match waiting_for.as_slice() {
            [] if desired.use_products(&key, &products) => continue,
            [] => format!(
                "waits: a {} takes no product of {} yet",
                key.kind,
                pipelines
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            waiting => format!("waits for {} to produce an image", waiting.join(" and ")),
        };
        if let Some(object) = desired.objects.iter_mut().find(|o| o.key == key) {
            object.hold = Some(Hold::Wait(why));
        }
    }
}

/// Where a pass sends the Pipelines it must run (their image is missing, or their spec changed)
/// instead of running them itself: the agent's run queue. `berth apply` has none and runs them in
/// the pass.
pub trait RunQueue: Send + Sync + std::fmt::Debug {
    /// Asks for a run of `pipeline` with the spec `spec_hash`, and says what the step's outcome
    /// is: waiting while a run is queued or running, failed when the run for this spec failed.
    fn request(&self, pipeline: &ObjectRef, spec_hash: &str) -> Outcome;
}

/// How to apply.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Most steps at once.
    pub concurrency: usize,
    /// Longest wait for another berth's lock on the engine.
    pub lock_wait: Duration,
    /// Delete what the repo no longer declares.
    pub policy: Policy,
    /// The run queue Pipelines go to; without one, they run in the pass.
    pub runs: Option<std::sync::Arc<dyn RunQueue>>,
}

/// A pass that applied: its plan, what each step did, and what runs afterwards.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The plan that was carried out.
    pub planned: Planned,
    /// What each changing step did.
    pub reports: Vec<StepReport>,
    /// What runs after the pass.
    pub observed: Vec<ObservedObject>,
}

impl Applied {
    /// A pass whose plan changes nothing: what ran is what runs.
    fn nothing_to_do(planned: Planned) -> Applied {
        Applied {
            observed: planned.observed.clone(),
            reports: unreachable_reports(&planned),
            planned,
        }
    }

    /// The engine's trouble, when a step found the engine gone: the pass is then to be retried.
    pub fn transient(&self) -> Option<&str> {
        self.reports.iter().find_map(|r| match &r.outcome {
            Outcome::Transient(why) => Some(why.as_str()),
            _ => None,
        })
    }
}

/// Stages 2 to 6: observe, resolve, diff, apply, and observe again. `root` is the checkout of the
/// revision `desired` was loaded from; build contexts come from it.
///
/// A plan with no changes ends there, with no write to any engine (not even the lock). Otherwise
/// the instance's lock is taken and the plan made again under it, since another berth may have
/// applied in between.
pub async fn apply(
    desired: Desired,
    engines: &Engines,
    root: &Path,
    options: &ApplyOptions,
    on_report: impl FnMut(&StepReport),
) -> Result<Applied, EngineError> {
    let unlocked = plan(
        desired.clone(),
        Observer::Engines(engines),
        options.policy.clone(),
    )
    .await?;
    if !unlocked.plan.has_changes() {
        return Ok(Applied::nothing_to_do(unlocked));
    }
    let lock = engines.lock(options.lock_wait).await?;
    let result = apply_locked(desired, engines, root, options, on_report).await;
    lock.release().await;
    result
}

async fn apply_locked(
    desired: Desired,
    engines: &Engines,
    root: &Path,
    options: &ApplyOptions,
    mut on_report: impl FnMut(&StepReport),
) -> Result<Applied, EngineError> {
    let mut planned = plan(
        desired.clone(),
        Observer::Engines(engines),
        options.policy.clone(),
    )
    .await?;
    if !planned.plan.has_changes() {
        return Ok(Applied::nothing_to_do(planned));
    }
    let mut reports = execute_plan(&planned, engines, root, options, &mut on_report).await;
    // A Pipeline that produced an image in this pass: what uses it is planned again and rolled
    // to it now, rather than a pass later.
    let produced = reports.iter().any(|r| {
        r.step.key.kind == descriptor::Kind::Pipeline
            && r.step.action != Action::Delete
            && matches!(r.outcome, Outcome::Done(_))
    });
    if produced {
        let again = plan(desired, Observer::Engines(engines), options.policy.clone()).await?;
        if again.plan.has_changes() {
            reports.extend(execute_plan(&again, engines, root, options, &mut on_report).await);
        }
        planned = again;
    }
    let (mut observed, _) = engines.observe_available().await;
    engines.diagnose(&mut observed, &planned.desired).await;
    reports.extend(unreachable_reports(&planned));
    Ok(Applied {
        planned,
        reports,
        observed,
    })
}

async fn execute_plan(
    planned: &Planned,
    engines: &Engines,
    root: &Path,
    options: &ApplyOptions,
    on_report: impl FnMut(&StepReport),
) -> Vec<StepReport> {
    execute(
        &planned.plan,
        options.concurrency,
        |step| {
            let desired = &planned.desired;
            let queued = options.runs.as_ref().and_then(|runs| {
                let hash = desired.spec_hashes.get(&step.key)?;
                let held = desired
                    .objects
                    .iter()
                    .any(|o| o.key == step.key && o.hold.is_some());
                (step.key.kind == descriptor::Kind::Pipeline
                    && step.action != Action::Delete
                    && !held)
                    .then(|| runs.request(&step.key, hash))
            });
            async move {
                match queued {
                    Some(outcome) => outcome,
                    None => engines.apply(&step, desired, root).await,
                }
            }
        },
        on_report,
    )
    .await
}

/// A transient report for each object whose engine did not answer, so status keeps its phase
/// and the agent retries, as when an engine goes away mid-pass.
fn unreachable_reports(planned: &Planned) -> Vec<StepReport> {
    planned
        .unreachable
        .iter()
        .filter_map(|(key, why)| {
            let step = planned.plan.steps.iter().find(|s| &s.key == key)?;
            Some(StepReport {
                step: step.clone(),
                outcome: Outcome::Transient(why.clone()),
                elapsed: Duration::ZERO,
            })
        })
        .collect()
}

/// Objects meant to run that are not healthy in `observed`, each with why (the parts that are
/// not, and the engine's detail). Progressing ones are listed only when `progressing` is set.
pub fn unhealthy(
    planned: &Planned,
    observed: &[ObservedObject],
    progressing: bool,
) -> BTreeMap<ObjectRef, Unwell> {
    let by_key = plan::observed_by_key(&planned.desired.objects, observed);
    let mut unwell = BTreeMap::new();
    for object in &planned.desired.objects {
        if object.hold.is_some() || object.target != TargetState::Running {
            continue;
        }
        let Some(seen) = by_key.get(&object.key) else {
            unwell.insert(
                object.key.clone(),
                Unwell {
                    why: "no containers".into(),
                    starting: false,
                },
            );
            continue;
        };
        let parts: Vec<&ObservedPart> = seen
            .parts
            .iter()
            .filter(|p| match p.health {
                Health::Healthy => false,
                Health::Progressing => progressing,
                _ => true,
            })
            .collect();
        if !parts.is_empty() {
            let why: Vec<String> = parts.iter().map(|p| p.condition()).collect();
            unwell.insert(
                object.key.clone(),
                Unwell {
                    why: why.join(", "),
                    starting: parts.iter().any(|p| p.health == Health::Progressing),
                },
            );
        }
    }
    unwell
}

/// Why an object meant to run is not healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unwell {
    /// Each unwell part's condition: `main-1 is Degraded: exited with code 1`.
    pub why: String,
    /// Whether a part of it is still starting (Progressing), so worth waiting for.
    pub starting: bool,
}

impl std::fmt::Display for Unwell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// For a foreground apply: waits up to `limit` for the objects meant to run to be healthy, then
/// turns each step of an object that is not into a failure with the engine's reason (exit code,
/// last log lines). Returns the objects that are not healthy and had no step.
pub async fn settle(
    applied: &mut Applied,
    engines: &Engines,
    limit: Duration,
) -> BTreeMap<ObjectRef, Unwell> {
    let began = Instant::now();
    let deadline = began + limit;
    // An object's own `readyTimeout` (a Staging's) ends its wait sooner.
    let ready_timeouts: BTreeMap<ObjectRef, Duration> = applied
        .planned
        .desired
        .objects
        .iter()
        .filter_map(|d| Some((d.key.clone(), d.ready_timeout?)))
        .collect();
    let past_own_timeout = |key: &ObjectRef| {
        ready_timeouts
            .get(key)
            .is_some_and(|t| began.elapsed() >= *t)
    };
    // A step that failed (refused at its dry run, say) changed nothing worth waiting for.
    let failed: std::collections::BTreeSet<ObjectRef> = applied
        .reports
        .iter()
        .filter(|report| matches!(report.outcome, Outcome::Failed(_)))
        .map(|report| report.step.key.clone())
        .collect();
    loop {
        let pending = unhealthy(&applied.planned, &applied.observed, true);
        let progressing = pending.iter().any(|(key, unwell)| {
            unwell.starting && !past_own_timeout(key) && !failed.contains(key)
        });
        if !progressing || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        // An engine that does not answer keeps what was seen of its objects.
        let (observed, down) = engines.observe_available().await;
        let kept = applied
            .observed
            .iter()
            .filter(|o| down.iter().any(|(engine, _)| *engine == o.engine))
            .cloned();
        let mut observed: Vec<ObservedObject> = observed.into_iter().chain(kept).collect();
        observed.sort_by(|a, b| a.key.cmp(&b.key));
        // Diagnosed each time: a crash loop, or a solver's verdict, is health too.
        engines
            .diagnose(&mut observed, &applied.planned.desired)
            .await;
        applied.observed = observed;
    }
    engines
        .diagnose(&mut applied.observed, &applied.planned.desired)
        .await;
    let mut unwell = unhealthy(&applied.planned, &applied.observed, true);
    for report in applied.reports.iter_mut() {
        let started = !matches!(report.step.action, Action::Delete | Action::Stop);
        if let (Outcome::Done(_), true, Some(why)) =
            (&report.outcome, started, unwell.remove(&report.step.key))
        {
            report.outcome = Outcome::Failed(match ready_timeouts.get(&report.step.key) {
                Some(timeout) if past_own_timeout(&report.step.key) => format!(
                    "not ready within its readyTimeout of {}s: {why}",
                    timeout.as_secs()
                ),
                _ => format!("not healthy after {}s: {why}", began.elapsed().as_secs()),
            });
        }
    }
    unwell
}

/// The engines for `instance`, with the ownership they act under: the Docker Engine, and the
/// Kubernetes cluster `access` names (or the usual places: `KUBECONFIG`, in-cluster) if any.
pub async fn connect(
    instance: &str,
    access: &backend::kube::Access,
) -> Result<Engines, EngineError> {
    Engines::connect(&Ownership::new(instance), access).await
}

/// What a loaded revision asks for, as the pass plans it. Pure: no engine, so a pull request's
/// plan against committed status can make it too.
pub fn desired(loaded: &Loaded) -> Desired {
    backend::desired(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::ProducedImage;

    /// A repo with a Pipeline, a Challenge on Docker that runs its image and a Staging that takes
    /// its tag into a manifest, loaded as a pass loads it.
    fn consumers_of_a_pipeline() -> (tempfile::TempDir, Loaded) {
        let repo = tempfile::tempdir().unwrap();
        let files = [
            (
                "site.yaml",
                "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {name: site}\nspec:\n  context: site\n  image: busybox:latest\n  steps: [{name: render, run: 'true'}]\n  produces: 'site:{commit}'\n",
            ),
            ("site/Dockerfile", "FROM busybox:latest\n"),
            (
                "web.yaml",
                "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: web}\nspec:\n  image: {fromPipeline: site}\n",
            ),
            (
                "shop.yaml",
                "apiVersion: berth/v1\nkind: Staging\nmetadata: {name: shop}\nspec:\n  namespace: shop\n  tag: {fromPipeline: site}\n  manifests: m\n",
            ),
            (
                "m/web.yaml",
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: 'site:${tag}'}]\n",
            ),
        ];
        for (path, text) in files {
            let path = repo.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let loaded = descriptor::load(repo.path(), &LoadOptions::default()).unwrap();
        assert!(loaded.is_valid(), "{:?}", loaded.problems);
        (repo, loaded)
    }

    fn object<'a>(desired: &'a Desired, key: &str) -> &'a plan::DesiredObject {
        let key: ObjectRef = key.parse().unwrap();
        desired.objects.iter().find(|o| o.key == key).unwrap()
    }

    fn produced(tag: &str, id: &str) -> ObservedObject {
        ObservedObject {
            key: "Pipeline/site".parse().unwrap(),
            engine: plan::Engine::Docker,
            parts: Vec::new(),
            archived_at: None,
            expired: None,
            reach: Vec::new(),
            produced: Some(ProducedImage {
                tag: tag.into(),
                id: id.into(),
            }),
        }
    }

    #[test]
    fn what_uses_a_product_waits_for_it_then_runs_its_image_and_takes_its_tag() {
        let (_repo, loaded) = consumers_of_a_pipeline();
        let mut waiting = desired(&loaded);
        resolve(&mut waiting, &[]);
        for key in ["Challenge/web", "Staging/shop"] {
            assert_eq!(
                object(&waiting, key).hold,
                Some(Hold::Wait(
                    "waits for Pipeline/site to produce an image".into()
                )),
                "{key}"
            );
        }

        let mut first = desired(&loaded);
        resolve(&mut first, &[produced("site:v1", "sha256:one")]);
        let web = object(&first, "Challenge/web");
        assert_eq!(web.hold, None);
        // On Docker the image runs by its id, which a rebuild of the tag cannot change.
        assert_eq!(web.parts[0].spec["image"], "sha256:one");
        let shop = object(&first, "Staging/shop");
        assert_eq!(shop.hold, None);
        let deployment = shop
            .parts
            .iter()
            .find(|p| p.id == "Deployment/web")
            .unwrap();
        assert_eq!(deployment.spec["image"], "site:v1");

        // The next product is a change of both.
        let mut second = desired(&loaded);
        resolve(&mut second, &[produced("site:v2", "sha256:two")]);
        assert_ne!(
            object(&second, "Challenge/web").parts[0].hash,
            web.parts[0].hash
        );
        let rolled = object(&second, "Staging/shop")
            .parts
            .iter()
            .find(|p| p.id == "Deployment/web")
            .unwrap();
        assert_eq!(rolled.spec["image"], "site:v2");
        assert_ne!(rolled.hash, deployment.hash);
    }

    #[test]
    fn a_plan_from_status_alone_resolves_the_recorded_product() {
        let (_repo, loaded) = consumers_of_a_pipeline();
        // The engine's view: the Pipeline's image as the Docker backend observes it.
        let mut pipeline = produced("site:v1", "sha256:one");
        pipeline.parts.push(ObservedPart {
            name: "site:v1".into(),
            id: "image".into(),
            hash: "h".into(),
            spec: serde_json::json!({"image": "site:v1", "id": "sha256:one"}),
            secrets: None,
            state: plan::PartState::Completed,
            health: Health::Healthy,
            detail: None,
        });
        let observed = [pipeline];
        let mut from_engine = desired(&loaded);
        resolve(&mut from_engine, &observed);

        // What a pass records of it, written out and read back as a pull request's plan reads it.
        let plan = plan::diff(&from_engine.objects, &observed, Policy::default());
        let recorded = crate::status::after_pass(
            &StatusSet::new("t"),
            &crate::status::PassRecord {
                revision: "abc",
                now: "t1",
                desired: &from_engine.objects,
                spec_hashes: &from_engine.spec_hashes,
                plan: &plan,
                reports: &[],
                observed: &observed,
            },
        );
        let files = recorded.files();
        let read = StatusSet::parse(files.iter().map(|(p, t)| (p.as_str(), t.as_str()))).unwrap();
        let mut from_status = desired(&loaded);
        resolve(&mut from_status, &read.observed());
        for key in ["Challenge/web", "Staging/shop"] {
            assert_eq!(
                object(&from_status, key).parts,
                object(&from_engine, key).parts,
                "{key}"
            );
        }
    }
}
