//! Pipeline runs on the Docker Engine: the workspace copied into a volume (so a remote engine
//! works as well as a local one: no host path is mounted), every step run in turn in one
//! container of the step image, each as an exec whose output is streamed into the run's log and
//! whose exit code and duration are recorded, the container killed at the timeout, and, when the
//! run succeeds and `produces` is set, the image built from the workspace and tagged with the
//! ownership labels. The volume and the container are removed however the run ends.
//!
//! The workspace streams both ways, into the volume and from it into the build, a few chunks at a
//! time: the agent's memory does not follow its size. Its size is bounded
//! (`pipelines.workspaceLimit`): a source over the limit never starts, and while the steps run a
//! meter measures what they wrote (the volume, from a container of the untouched step image that
//! the steps cannot reach, and the step container's own layer, from the engine) and stops the run
//! past the limit.

use std::collections::BTreeMap;
use std::time::Instant;

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, VolumeCreateRequest};
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, DownloadFromContainerOptions,
    RemoveContainerOptions, RemoveVolumeOptions, UploadToContainerOptions,
};
use futures_util::StreamExt;

use super::images::confine_build;
use super::meter::{Overrun, meter_name};
use super::network::Wall;
use super::template::contained;
use super::{Attempt, DockerBackend, Trouble};
use crate::apply::Outcome;
use crate::descriptor::model::{PipelineSpec, StepImage};
use crate::descriptor::security::Security;
use crate::descriptor::values::Size;
use crate::descriptor::{Kind, Name, ObjectRef};
use crate::plan::{
    DesiredObject, Health, Hold, ObservedObject, ObservedPart, Part, PartState, ProducedImage,
    TargetState, Vocabulary,
};
use crate::run::{RunLog, RunReport, RunResult, StepRun};

/// Where the workspace is in the step container.
const WORKSPACE: &str = "/workspace";

/// Label on a run's container and volume (not on what it produces): who runs it.
const LABEL_RUN: &str = "berth.run";
/// Label on a produced image: when its run made it.
const LABEL_PRODUCED_AT: &str = "berth.produced-at";

/// Label on a run's disk meter: the run it measures.
const LABEL_METER: &str = "berth.run-meter";

/// Label on a step image built from the repo: the pipeline it is for.
const LABEL_STEP_IMAGE: &str = "berth.step-image";

/// Label on an agent's run containers: which agent (its host and state folder), so an agent
/// that starts removes only the runs its own killed predecessor left, never another agent's.
const LABEL_RUN_OWNER: &str = "berth.run-owner";

/// One run to carry out.
pub struct RunRequest {
    /// The pipeline's name.
    pub pipeline: Name,
    /// Its spec.
    pub spec: PipelineSpec,
    /// The source's `context` folder, streamed into the run's volume.
    pub workspace: crate::source::Workspace,
    /// The source commit.
    pub commit: String,
    /// The secret environment, read.
    pub secrets: BTreeMap<String, String>,
    /// The step image's build context, for `image: {build: …}`: its digest and its files.
    pub step_image: Option<(String, crate::build_context::BuildContext)>,
    /// Held while the files of a folder of the config repo's checkout are read (the workspace,
    /// the step image's context), so no pass checks out another revision under them; let go
    /// once they are in the engine.
    checkout: std::sync::Mutex<Option<tokio::sync::OwnedRwLockReadGuard<()>>>,
}

impl RunRequest {
    /// The run of `spec` on the config repo at `root`: its secrets read and its workspace made
    /// (cloned at `commit`, a branch or tag, or the source's `ref`; or the context folder), or why
    /// it cannot start. `credentials` clones the source as the agent fetches its config repo.
    fn prepare(
        pipeline: &Name,
        spec: &PipelineSpec,
        root: &std::path::Path,
        commit: Option<&str>,
        credentials: Option<&crate::source::Source>,
    ) -> Result<RunRequest, PrepareError> {
        let secrets = crate::descriptor::values::resolve_all(&spec.secret_env)?;
        let (workspace, commit) =
            crate::source::pipeline_workspace(root, spec, commit, credentials)?;
        // A step image built from a folder of the config repo (whatever the source is).
        let step_image = match &spec.image {
            StepImage::Name(_) => None,
            StepImage::Build(image) => {
                let build = &image.build;
                let folder = crate::descriptor::repo_folder(root, &build.context)
                    .map_err(PrepareError::StepImageFolder)?;
                let unreadable = |source| PrepareError::StepImageFiles {
                    context: build.context.clone(),
                    source,
                };
                let context = crate::build_context::BuildContext::read(&folder, &build.dockerfile)
                    .map_err(unreadable)?;
                Some((context.digest().map_err(unreadable)?, context))
            }
        };
        Ok(RunRequest {
            pipeline: pipeline.clone(),
            spec: spec.clone(),
            workspace,
            commit,
            secrets,
            step_image,
            checkout: std::sync::Mutex::new(None),
        })
    }

    /// The request, holding `checkout` (the agent's lock on its checkout) until its files are
    /// in the engine.
    pub fn holding(self, checkout: Option<tokio::sync::OwnedRwLockReadGuard<()>>) -> RunRequest {
        *self.checkout.lock().expect("checkout guard") = checkout;
        self
    }

    /// Lets go of the checkout: the files are in the engine.
    fn release_checkout(&self) {
        self.checkout.lock().expect("checkout guard").take();
    }
}

/// Why a run could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A secret of its environment could not be read.
    #[error(transparent)]
    Secret(#[from] crate::descriptor::values::SecretUnread),
    /// Its workspace could not be made.
    #[error(transparent)]
    Workspace(#[from] crate::source::WorkspaceError),
    /// The step image's context is no folder of the repo.
    #[error("spec.image.build.context: {0}")]
    StepImageFolder(crate::descriptor::RepoPathError),
    /// The step image's context could not be read.
    #[error("cannot read the step image's context {context}: {source}")]
    StepImageFiles {
        /// `spec.image.build.context`.
        context: String,
        /// Why.
        source: crate::build_context::ContextError,
    },
}

/// Everything a run of a Pipeline is prepared from, however it was asked for (a pass, the run
/// queue).
pub struct RunSource {
    /// The pipeline's name.
    pub pipeline: Name,
    /// Its spec.
    pub spec: PipelineSpec,
    /// The config repo's checkout.
    pub root: std::path::PathBuf,
    /// The commit, branch or tag of the source to build; `None`: the source's `ref`.
    pub wanted: Option<String>,
    /// What clones the source, as the agent fetches its config repo.
    pub credentials: Option<crate::source::Source>,
}

/// Why a run never reached its steps.
#[derive(Debug, thiserror::Error)]
pub enum Unprepared {
    /// Its source, secrets or step image could not be had.
    #[error(transparent)]
    Failed(#[from] PrepareError),
    /// Its timeout passed first, after this many seconds.
    #[error(
        "timed out after {0}s (its timeout) before its steps: the source did not arrive in time"
    )]
    TimedOut(u64),
    /// Preparing it panicked (a bug in berth).
    #[error("preparing the run panicked: {0}")]
    Panicked(String),
    /// It was cancelled while its source was cloned.
    #[error("cancelled while its source was cloned")]
    Cancelled,
}

impl RunSource {
    /// Prepares the run off the async threads (a clone, secrets, a step image's context), by
    /// `deadline`; `cancel` turning true stops the wait.
    pub async fn prepare(
        self,
        deadline: Instant,
        cancel: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Result<RunRequest, Unprepared> {
        let timeout = self.spec.timeout.0.as_secs();
        let preparing = tokio::task::spawn_blocking(move || {
            RunRequest::prepare(
                &self.pipeline,
                &self.spec,
                &self.root,
                self.wanted.as_deref(),
                self.credentials.as_ref(),
            )
        });
        let cancelled = async {
            match cancel {
                Some(mut cancel) => {
                    if cancel.wait_for(|c| *c).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            prepared = preparing => match prepared {
                Ok(prepared) => Ok(prepared?),
                Err(panic) => Err(Unprepared::Panicked(panic.to_string())),
            },
            () = tokio::time::sleep_until(deadline.into()) => Err(Unprepared::TimedOut(timeout)),
            () = cancelled => Err(Unprepared::Cancelled),
        }
    }
}

/// Who carries a run out; the engine's objects of a run say so, so that an agent that starts
/// again can stop the runs its predecessor left, and never a person's foreground run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// `berth run`, in the foreground.
    Foreground,
    /// A pass of `berth apply`.
    Pass,
    /// The agent's run queue.
    Agent,
}

impl Runner {
    fn label(self) -> &'static str {
        match self {
            Runner::Foreground => "foreground",
            Runner::Pass => "pass",
            Runner::Agent => "agent",
        }
    }
}

/// How to carry a run out.
pub struct RunOptions {
    /// Who runs it.
    pub runner: Runner,
    /// The descriptor's spec hash, labelled on what it produces (`""`: not a product a pass
    /// reconciles to, as for a foreground run).
    pub spec_hash: String,
    /// Becomes `true` when the run is to stop (cancelled, or superseded by a newer commit).
    pub cancel: Option<tokio::sync::watch::Receiver<bool>>,
    /// For an agent's runs, which agent (see [`DockerBackend::remove_runs_of`]).
    pub owner: Option<String>,
    /// The branch it builds, when that is not the source's `ref`: unreviewed code, whose image
    /// gets a tag of its own ([`branch_tag`]) and is never a product consumers roll to.
    pub branch: Option<String>,
}

/// Label on an image built from a branch other than the source's `ref`: the branch.
const LABEL_BRANCH: &str = "berth.branch";

/// The tag of a build of `branch` (not the source's `ref`) for a pipeline that `produces`
/// `produced`: the same repository, tagged `branch-NAME-COMMIT`. The tag the pipeline produces
/// from its `ref` (`app:latest`, `app:{commit}`) is never moved by such a build. Pure.
pub fn branch_tag(produced: &str, branch: &str, short_commit: &str) -> String {
    // A tag follows the last ':' after the last '/' (a registry may have a port).
    let repository = match produced.rfind(':') {
        Some(at) if !produced[at..].contains('/') => &produced[..at],
        _ => produced,
    };
    let mut slug: String = branch
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '.' | '_' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .take(64)
        .collect();
    while slug.starts_with(['.', '-']) {
        slug.remove(0);
    }
    format!("{repository}:branch-{slug}-{short_commit}")
}

/// Resolves when `cancel` turns `true`; never without one (or once its sender is gone).
async fn cancelled(cancel: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(receiver) = cancel
        && receiver.wait_for(|c| *c).await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// How a step (or the build) ended when it did not finish by itself.
enum Stopped {
    TimedOut,
    Cancelled,
    /// The steps wrote more than the workspace limit, or can no longer be measured.
    Overrun(Overrun),
}

/// Runs `work` until it ends, the `deadline` passes, or the run is cancelled.
async fn bounded<T>(
    work: impl Future<Output = T>,
    deadline: Instant,
    cancel: &mut Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<T, Stopped> {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::select! {
        done = tokio::time::timeout(left, work) => done.map_err(|_| Stopped::TimedOut),
        () = cancelled(cancel) => Err(Stopped::Cancelled),
    }
}

impl DockerBackend {
    /// Carries out one run, feeding its output to `log`; `shown` gets what the log kept as it
    /// comes (masked): a foreground run prints it, the agent writes it to the run's log file.
    pub async fn run_pipeline(
        &self,
        request: RunRequest,
        log: &mut RunLog,
        mut shown: impl FnMut(&[u8]),
        mut options: RunOptions,
    ) -> RunReport {
        let started = Instant::now();
        let key = ObjectRef {
            kind: Kind::Pipeline,
            name: request.pipeline.clone(),
        };
        let nonce = crate::backend::random_bytes()
            .map(|bytes| hex::encode(&bytes[..6]))
            .unwrap_or_else(|_| format!("{:x}", std::process::id()));
        let name = format!("berth-{}-run-{}-{nonce}", self.instance(), request.pipeline);
        let mut steps = Vec::new();
        let outcome = self
            .carry_out(
                &request,
                &name,
                self.ownership.labels(&key, &options.spec_hash),
                (log, &mut shown),
                &mut steps,
                &mut options,
            )
            .await;
        // Whatever happened, nothing of the run is left on the engine.
        self.remove_run(&name).await;
        let (result, image) = match outcome {
            Ok(done) => done,
            // The engine's words may quote the run's output (a build's last lines): masked too.
            Err(Trouble::Failed(why)) => (RunResult::Error(log.masked(&why)), None),
            Err(Trouble::Transient(why)) => (RunResult::EngineGone(log.masked(&why)), None),
        };
        shown(&log.flush());
        RunReport {
            pipeline: request.pipeline.to_string(),
            commit: request.commit,
            steps,
            result,
            image,
            duration: started.elapsed(),
        }
    }

    /// Removes a run's containers (the steps' and the meter's) and its volume.
    async fn remove_run(&self, name: &str) {
        // The meter first: it holds the run's volumes. Anonymous volumes (an image's `VOLUME`)
        // go with their container.
        for container in [meter_name(name), name.to_string()] {
            let _ = self
                .docker
                .remove_container(
                    &container,
                    Some(RemoveContainerOptions {
                        force: true,
                        v: true,
                        ..Default::default()
                    }),
                )
                .await;
        }
        let _ = self
            .docker
            .remove_volume(name, Some(RemoveVolumeOptions { force: true }))
            .await;
    }

    async fn carry_out(
        &self,
        request: &RunRequest,
        name: &str,
        labels: std::collections::HashMap<String, String>,
        (log, shown): (&mut RunLog, &mut impl FnMut(&[u8])),
        steps: &mut Vec<StepRun>,
        options: &mut RunOptions,
    ) -> Attempt<(RunResult, Option<String>)> {
        let spec = &request.spec;
        // Everything from here counts toward the timeout, and a cancel stops it: a pull from a
        // registry that hangs, a step image's build, the copies in and out.
        let limit = spec.timeout.0;
        let deadline = Instant::now() + limit;
        let workspace_limit = self.workspace_limit;
        let stopped = |why: Stopped, log: &mut RunLog, shown: &mut dyn FnMut(&[u8])| match why {
            Stopped::TimedOut => {
                shown(&log.note(&format!("== timed out after {}s: killed", limit.as_secs())));
                RunResult::TimedOut(limit)
            }
            Stopped::Cancelled => {
                shown(&log.note("== cancelled: killed"));
                RunResult::Cancelled
            }
            Stopped::Overrun(overrun) => {
                let why = match overrun {
                    Overrun::Wrote(written) => format!(
                        "the steps wrote {} to disk, over pipelines.workspaceLimit ({}): killed",
                        Size::approximate(written),
                        Size::approximate(workspace_limit)
                    ),
                    Overrun::Unmeasurable(reason) => format!(
                        "what the steps wrote to disk can no longer be measured ({reason}), so pipelines.workspaceLimit cannot hold: killed"
                    ),
                };
                shown(&log.note(&format!("== {why}")));
                RunResult::Error(why)
            }
        };
        self.clear_leftover_runs().await;
        let source_size = request.workspace.context.size();
        if source_size > self.workspace_limit {
            let why = format!(
                "the workspace (the source's {} folder) holds {}, over pipelines.workspaceLimit ({}); \
                 leave files out with a .dockerignore, or raise the limit",
                spec.context,
                Size::approximate(source_size),
                Size::approximate(self.workspace_limit)
            );
            shown(&log.note(&format!("== {why}")));
            return Ok((RunResult::Error(why), None));
        }
        let short = &request.commit[..request.commit.len().min(12)];
        let tag = spec.produces.as_ref().map(|p| match &options.branch {
            Some(branch) => branch_tag(p, branch, short),
            None => p.replace("{commit}", short),
        });
        if let Some(tag) = &tag {
            self.refuse_foreign_tag(tag).await?;
        }
        let acquired = bounded(
            self.step_image(request, log, shown),
            deadline,
            &mut options.cancel,
        )
        .await;
        let image = match acquired {
            Ok(image) => image?,
            Err(why) => return Ok((stopped(why, log, shown), None)),
        };
        // Steps may be an outsider's code: they run on the steps network, where they reach no
        // challenge, no other run and not the agent, within the step limits.
        let network = self
            .ensure_wall(&Wall::Steps {
                egress: spec.network.egress,
            })
            .await?;
        let mut run_labels = labels.clone();
        run_labels.insert(LABEL_RUN.into(), options.runner.label().into());
        if let Some(owner) = &options.owner {
            run_labels.insert(LABEL_RUN_OWNER.into(), owner.clone());
        }
        self.docker
            .create_volume(VolumeCreateRequest {
                name: Some(name.to_string()),
                labels: Some(run_labels.clone()),
                ..Default::default()
            })
            .await
            .map_err(|e| self.trouble("cannot make the run's volume", e))?;
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            // The container only holds the workspace; each step is an exec in it. It ends by
            // itself a minute after the run's timeout, should berth be killed meanwhile.
            cmd: Some(vec![
                "sleep".into(),
                (spec.timeout.0.as_secs() + 60).to_string(),
            ]),
            working_dir: Some(WORKSPACE.into()),
            labels: Some(run_labels.clone()),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{name}:{WORKSPACE}")]),
                network_mode: Some(network.clone()),
                ..contained(spec.resources.as_ref(), &Security::default(), true)
            }),
            ..Default::default()
        };
        self.docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.to_string()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| {
                self.trouble(
                    &format!("cannot create the run's container from {image}"),
                    e,
                )
            })?;
        self.docker
            .start_container(
                name,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(|e| self.trouble("cannot start the run's container", e))?;
        let upload = self.docker.upload_to_container(
            name,
            Some(UploadToContainerOptions {
                path: WORKSPACE.into(),
                ..Default::default()
            }),
            bollard::body_try_stream(request.workspace.stream()),
        );
        let uploaded = bounded(upload, deadline, &mut options.cancel).await;
        request.release_checkout();
        match uploaded {
            Ok(uploaded) => uploaded
                .map_err(|e| self.trouble("cannot copy the workspace into the run's volume", e))?,
            Err(why) => return Ok((stopped(why, log, shown), None)),
        }
        // The meter is no run: it carries the instance's labels and the run it measures, so an
        // agent that starts again clears it with its run, and nothing counts it as one.
        let mut meter_labels = labels.clone();
        meter_labels.insert(LABEL_METER.into(), name.to_string());
        let (meter, unmeasured) = self
            .start_meter(name, &image, &meter_labels, spec.timeout.0.as_secs() + 60)
            .await;
        if let Some(why) = unmeasured {
            shown(&log.note(&format!(
                "== the run's volumes cannot be measured ({why}): only the container's own layer counts toward pipelines.workspaceLimit"
            )));
        }
        let mut overrun = std::pin::pin!(self.overrun(&meter));
        for step in &spec.steps {
            shown(&log.note(&format!("== step {}", step.name)));
            let began = Instant::now();
            let ran = tokio::select! {
                ran = bounded(
                    self.exec_step(name, step, request, log, shown),
                    deadline,
                    &mut options.cancel,
                ) => ran,
                overrun = &mut overrun => Err(Stopped::Overrun(overrun)),
            };
            let exit_code = match ran {
                Ok(code) => code?,
                Err(why) => {
                    let _ = self
                        .docker
                        .kill_container(
                            name,
                            None::<bollard::query_parameters::KillContainerOptions>,
                        )
                        .await;
                    steps.push(StepRun {
                        name: step.name.to_string(),
                        exit_code: None,
                        duration: began.elapsed(),
                    });
                    return Ok((stopped(why, log, shown), None));
                }
            };
            steps.push(StepRun {
                name: step.name.to_string(),
                exit_code: Some(exit_code),
                duration: began.elapsed(),
            });
            if exit_code != 0 {
                shown(&log.note(&format!(
                    "== step {} exited with code {exit_code}",
                    step.name
                )));
                return Ok((
                    RunResult::Failed {
                        step: step.name.to_string(),
                        exit_code,
                    },
                    None,
                ));
            }
            // A step that wrote fast and ended between two measures is caught here (a measure
            // that fails here is left to the meter's own count of failures).
            match bounded(self.measure(&meter), deadline, &mut options.cancel).await {
                Ok(Ok(written)) if written > self.workspace_limit => {
                    let overrun = Stopped::Overrun(Overrun::Wrote(written));
                    return Ok((stopped(overrun, log, shown), None));
                }
                Ok(_) => {}
                Err(why) => return Ok((stopped(why, log, shown), None)),
            }
        }
        let Some(tag) = tag else {
            return Ok((RunResult::Succeeded, None));
        };
        shown(&log.note(&format!("== building {tag} from the workspace")));
        let tar = self.read_back(name, self.workspace_limit);
        // Each run's product is an image of its own, made now, even when every layer comes from
        // the cache: "the newest product" is then the one this run made (a spec reverted to an
        // older one would otherwise get back the old image, older than the one it replaces).
        let mut labels = labels;
        labels.insert(LABEL_PRODUCED_AT.into(), chrono::Utc::now().to_rfc3339());
        if let Some(branch) = &options.branch {
            labels.insert(LABEL_BRANCH.into(), branch.clone());
            labels.insert(crate::backend::LABEL_SPEC_HASH.into(), String::new());
        }
        let mut build = BuildImageOptions {
            dockerfile: "Dockerfile".into(),
            t: Some(tag.clone()),
            labels: Some(labels),
            rm: true,
            forcerm: true,
            ..Default::default()
        };
        // The workspace's Dockerfile is the source's code too: same walls as the steps.
        confine_build(&mut build, &network, spec.resources.as_ref());
        // The build counts toward the run's timeout too.
        let context = format!("the workspace of Pipeline/{}", request.pipeline);
        match bounded(
            self.build(build, tar, &context),
            deadline,
            &mut options.cancel,
        )
        .await
        {
            Ok(built) => built?,
            Err(why) => return Ok((stopped(why, log, shown), None)),
        }
        Ok((RunResult::Succeeded, Some(tag)))
    }

    /// The image the steps run in: named, or built from a folder of the repo.
    async fn step_image(
        &self,
        request: &RunRequest,
        log: &mut RunLog,
        shown: &mut impl FnMut(&[u8]),
    ) -> Attempt<String> {
        match (&request.spec.image, &request.step_image) {
            (StepImage::Name(image), _) => self.named_image(image).await,
            (StepImage::Build(image), Some((digest, context))) => {
                // Not labelled as the pipeline's: it is no product, and product GC must not
                // count it.
                let tag = format!(
                    "berth-{}-{}-steps:{}",
                    self.instance(),
                    request.pipeline,
                    crate::git_url::short(digest)
                );
                let labels = std::collections::HashMap::from([
                    (
                        crate::backend::LABEL_INSTANCE.to_string(),
                        self.instance().to_string(),
                    ),
                    (LABEL_STEP_IMAGE.to_string(), request.pipeline.to_string()),
                ]);
                shown(&log.note(&format!("== step image {tag}")));
                let build = &image.build;
                // The step image comes from the config repo, which is reviewed; it builds on the
                // steps network all the same, never on the default bridge.
                let network = self.ensure_wall(&Wall::Steps { egress: true }).await?;
                let confined = (network.as_str(), request.spec.resources.as_ref());
                let built = self
                    .build_unless_present(tag, build, labels, confined, || Ok(context.clone()))
                    .await?;
                self.remove_older_step_images(&request.pipeline, &built)
                    .await;
                Ok(built)
            }
            (StepImage::Build(_), None) => Err(Trouble::Failed(
                "the step image's context was not read".into(),
            )),
        }
    }

    /// Removes the pipeline's step images but `current`: those of older contents of its folder.
    /// One a run still uses stays (the engine refuses to remove it) until a later run.
    async fn remove_older_step_images(&self, pipeline: &Name, current: &str) {
        let filters = std::collections::HashMap::from([(
            "label".to_string(),
            vec![
                format!("{}={}", crate::backend::LABEL_INSTANCE, self.instance()),
                format!("{LABEL_STEP_IMAGE}={pipeline}"),
            ],
        )]);
        let Ok(images) = self
            .docker
            .list_images(Some(bollard::query_parameters::ListImagesOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await
        else {
            return;
        };
        let older = images
            .iter()
            .filter(|image| !image.repo_tags.iter().any(|t| t == current));
        self.remove_images(older).await;
    }

    /// Runs one step as an exec and returns its exit code.
    async fn exec_step(
        &self,
        container: &str,
        step: &crate::descriptor::model::Step,
        request: &RunRequest,
        log: &mut RunLog,
        shown: &mut impl FnMut(&[u8]),
    ) -> Attempt<i64> {
        let env: Vec<String> = step
            .env
            .iter()
            .chain(&request.secrets)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let exec = self
            .docker
            .create_exec(
                container,
                CreateExecOptions {
                    cmd: Some(vec!["sh".to_string(), "-c".to_string(), step.run.clone()]),
                    env: Some(env),
                    working_dir: Some(WORKSPACE.to_string()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.trouble(&format!("cannot start step {}", step.name), e))?;
        let started = self
            .docker
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| self.trouble(&format!("cannot start step {}", step.name), e))?;
        if let StartExecResults::Attached { mut output, .. } = started {
            while let Some(chunk) = output.next().await {
                let chunk = chunk.map_err(|e| self.trouble("the step's output stopped", e))?;
                shown(&log.push(&chunk.into_bytes()));
            }
        }
        let inspected =
            self.docker.inspect_exec(&exec.id).await.map_err(|e| {
                self.trouble(&format!("cannot read step {}'s exit code", step.name), e)
            })?;
        Ok(inspected.exit_code.unwrap_or(-1))
    }

    /// The run's workspace as a tar, read back from its container as the reader takes it (a
    /// few chunks at a time), for the build of its product; cut off with an error past `limit`
    /// bytes, since a sparse file (which `du` counts as the little it holds) is read back whole.
    fn read_back(
        &self,
        run: &str,
        limit: u64,
    ) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let docker = self.docker.clone();
        let run = run.to_string();
        tokio::spawn(async move {
            let mut pieces = docker.download_from_container(
                &run,
                Some(DownloadFromContainerOptions {
                    path: format!("{WORKSPACE}/."),
                }),
            );
            let mut read: u64 = 0;
            while let Some(piece) = pieces.next().await {
                let piece = piece
                    .map_err(|e| std::io::Error::other(format!("cannot read the workspace back: {e}")))
                    .and_then(|piece| {
                        read += piece.len() as u64;
                        match read > limit {
                            true => Err(std::io::Error::other(format!(
                                "the workspace reads back as more than pipelines.workspaceLimit ({}); a sparse file counts whole here",
                                Size::approximate(limit)
                            ))),
                            false => Ok(piece),
                        }
                    });
                let failed = piece.is_err();
                if sender.send(piece).await.is_err() || failed {
                    break;
                }
            }
        });
        crate::build_context::received(receiver)
    }
}

/// What applying a Pipeline needs: it is reconciled to *an image produced from this spec and
/// this source*, so a Pipeline whose product is missing (or whose spec or context changed) runs,
/// and the objects that use its image follow.
#[derive(Debug, Clone)]
pub struct PipelineTemplate {
    key: ObjectRef,
    spec: PipelineSpec,
    hash: String,
}

impl PipelineTemplate {
    /// The pipeline's spec.
    pub fn spec(&self) -> &PipelineSpec {
        &self.spec
    }

    /// The descriptor's spec hash (with no `source`, its folder's digest is part of it).
    pub fn hash(&self) -> &str {
        &self.hash
    }
}

/// The part a producing Pipeline has: its newest image.
pub const PRODUCT: &str = "image";

/// How many produced images of a Pipeline are kept (besides any a container still uses).
pub const KEEP_PRODUCTS: usize = 3;

/// The desired object of a Pipeline that produces an image; one that does not is run by its
/// triggers only, and is held back with that reason.
pub fn desired_pipeline(
    descriptor: &crate::descriptor::Descriptor,
) -> Option<(DesiredObject, PipelineTemplate)> {
    let crate::descriptor::Spec::Pipeline(spec) = &descriptor.spec else {
        return None;
    };
    let key = descriptor.key();
    let hold = spec.produces.is_none().then(|| {
        Hold::Skip(
            "produces no image: the agent runs it on its triggers (push, schedule, onChange, or by hand)"
                .into(),
        )
    });
    let object = DesiredObject {
        key: key.clone(),
        engine: crate::plan::Engine::Docker,
        target: TargetState::Running,
        parts: vec![Part {
            id: PRODUCT.into(),
            hash: descriptor.spec_hash.clone(),
            spec: std::sync::Arc::new(serde_json::json!({"image": spec.produces})),
            secrets: None,
            one_shot: true,
        }],
        dependencies: descriptor.dependencies(),
        start_first: true,
        hold,
        words: Vocabulary {
            part: "image",
            replaces: false,
        },
        ttl: None,
        ready_timeout: None,
    };
    let template = PipelineTemplate {
        key,
        spec: spec.clone(),
        hash: descriptor.spec_hash.clone(),
    };
    Some((object, template))
}

impl DockerBackend {
    /// The newest image each Pipeline of this instance produced.
    pub(super) async fn observe_products(
        &self,
    ) -> Result<Vec<ObservedObject>, bollard::errors::Error> {
        let images = self.products(None).await?;
        let mut newest: BTreeMap<ObjectRef, (i64, ObservedPart, ProducedImage)> = BTreeMap::new();
        for image in images {
            let labels = &image.labels;
            let Some(Ok(name)) = labels.get(crate::backend::LABEL_NAME).map(|n| n.parse()) else {
                continue;
            };
            let Some(tag) = image.repo_tags.iter().find(|t| !t.contains("<none>")) else {
                continue;
            };
            // A foreground `berth run` labels its image with no spec hash, and a branch's build
            // is no product at all: neither is what a pass reconciles to.
            if labels
                .get(crate::backend::LABEL_SPEC_HASH)
                .is_none_or(String::is_empty)
                || labels.contains_key(LABEL_BRANCH)
            {
                continue;
            }
            // Consumers run the image by its id: a tag can be built again (a run of the same
            // commit), an id cannot.
            let produced = ProducedImage {
                tag: tag.clone(),
                id: image.id.clone(),
            };
            let part = ObservedPart {
                name: tag.clone(),
                id: PRODUCT.into(),
                hash: labels
                    .get(crate::backend::LABEL_SPEC_HASH)
                    .cloned()
                    .unwrap_or_default(),
                // What status shows of it.
                spec: serde_json::json!({"image": tag, "id": image.id}),
                secrets: None,
                state: PartState::Completed,
                health: Health::Healthy,
                detail: None,
            };
            let key = ObjectRef {
                kind: Kind::Pipeline,
                name,
            };
            if newest
                .get(&key)
                .is_none_or(|(created, _, _)| image.created > *created)
            {
                newest.insert(key, (image.created, part, produced));
            }
        }
        Ok(newest
            .into_iter()
            .map(|(key, (_, part, produced))| ObservedObject {
                key,
                engine: crate::plan::Engine::Docker,
                parts: vec![part],
                archived_at: None,
                expired: None,
                reach: Vec::new(),
                produced: Some(produced),
            })
            .collect())
    }

    /// Runs the Pipeline on the config repo at `root` and labels what it produces with the
    /// spec's hash, so the next plan sees it produced.
    pub async fn produce(&self, template: &PipelineTemplate, root: &std::path::Path) -> Outcome {
        let source = RunSource {
            pipeline: template.key.name.clone(),
            spec: template.spec.clone(),
            root: root.to_path_buf(),
            wanted: None,
            credentials: None,
        };
        let deadline = Instant::now() + template.spec.timeout.0;
        let request = match source.prepare(deadline, None).await {
            Ok(request) => request,
            Err(why) => return Outcome::Failed(why.to_string()),
        };
        let mut log = RunLog::new(
            crate::run::DEFAULT_LOG_CAP,
            request.secrets.values().cloned(),
        );
        let options = RunOptions {
            runner: Runner::Pass,
            spec_hash: template.hash.clone(),
            cancel: None,
            owner: None,
            branch: None,
        };
        let (report, removed) = self
            .run_to_end(&template.key, request, &mut log, |_| {}, options)
            .await;
        match report.result {
            RunResult::Succeeded => {
                let mut done = report.summary();
                if removed > 0 {
                    done.push_str(&format!("; {removed} older image(s) removed"));
                }
                Outcome::Done(done)
            }
            _ => Outcome::Failed(report.failure(&mut log)),
        }
    }

    /// Carries a prepared run of the Pipeline `key` out, however it was asked for, and once it
    /// produced an image removes its products but the newest [`KEEP_PRODUCTS`]; says how many
    /// went.
    pub async fn run_to_end(
        &self,
        key: &ObjectRef,
        request: RunRequest,
        log: &mut RunLog,
        on_output: impl FnMut(&[u8]),
        options: RunOptions,
    ) -> (RunReport, usize) {
        let report = self.run_pipeline(request, log, on_output, options).await;
        let removed = match report.image {
            Some(_) => self.collect_products(key, KEEP_PRODUCTS).await,
            None => 0,
        };
        (report, removed)
    }

    /// Removes the images berth made for `key` (a Pipeline's products, a Challenge's builds)
    /// but the newest `keep`; an image a container still uses stays whatever its age (the engine
    /// refuses to remove it). Returns how many went.
    pub async fn collect_products(&self, key: &ObjectRef, keep: usize) -> usize {
        let Ok(mut images) = self.images_of(key.kind, Some(key)).await else {
            return 0;
        };
        images.sort_by_key(|image| std::cmp::Reverse(image.created));
        // Builds of branches are kept and collected apart: however many a flood of pushes makes,
        // they never push the current product of `ref` out of the newest few.
        let (branches, products): (Vec<_>, Vec<_>) = images
            .into_iter()
            .partition(|image| image.labels.contains_key(LABEL_BRANCH));
        self.remove_images(products.iter().skip(keep)).await
            + self.remove_images(branches.iter().skip(keep)).await
    }

    /// The images this instance's Pipelines (or one of them) produced.
    async fn products(
        &self,
        key: Option<&ObjectRef>,
    ) -> Result<Vec<bollard::models::ImageSummary>, bollard::errors::Error> {
        self.images_of(Kind::Pipeline, key).await
    }

    /// The images this instance made for objects of `kind` (or one of them).
    async fn images_of(
        &self,
        kind: Kind,
        key: Option<&ObjectRef>,
    ) -> Result<Vec<bollard::models::ImageSummary>, bollard::errors::Error> {
        let name = key.map(|k| k.name.as_str());
        let filters = std::collections::HashMap::from([(
            "label".to_string(),
            self.ownership.selector(kind, name),
        )]);
        self.docker
            .list_images(Some(bollard::query_parameters::ListImagesOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await
    }

    /// Removes `images` but those a container still uses (the engine refuses); returns how
    /// many went.
    async fn remove_images(
        &self,
        images: impl Iterator<Item = &bollard::models::ImageSummary>,
    ) -> usize {
        let mut removed = 0;
        for image in images {
            let options = bollard::query_parameters::RemoveImageOptions {
                force: false,
                ..Default::default()
            };
            if self
                .docker
                .remove_image(&image.id, Some(options), None)
                .await
                .is_ok()
            {
                removed += 1;
            }
        }
        removed
    }

    /// Stops and removes the runs of the agent `owner` on the engine: an agent that starts again
    /// calls this for the runs its killed predecessor left going (they are retried from the
    /// queue), and one that stops for its own.
    pub async fn remove_runs_of(&self, owner: &str) -> usize {
        let label = format!("{LABEL_RUN_OWNER}={owner}");
        let left = self.run_containers(&label, None).await;
        for container in &left {
            for name in container.names.iter().flatten() {
                // Its meter goes with it.
                self.remove_run(name.trim_start_matches('/')).await;
            }
        }
        left.len()
    }

    /// This instance's run containers with the label `label` (`berth.run`, or `berth.run=agent`),
    /// in one of `states` when given; none when the engine does not answer.
    async fn run_containers(
        &self,
        label: &str,
        states: Option<Vec<String>>,
    ) -> Vec<bollard::models::ContainerSummary> {
        let mut selector = self.ownership.selector(Kind::Pipeline, None);
        selector.push(label.to_string());
        let mut filters = std::collections::HashMap::from([("label".to_string(), selector)]);
        if let Some(states) = states {
            filters.insert("status".to_string(), states);
        }
        let options = bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        self.docker
            .list_containers(Some(options))
            .await
            .unwrap_or_default()
    }

    /// Removes what runs killed with berth left: their containers once they have exited (they
    /// end by themselves after the run's timeout) and their volumes once no container uses
    /// them. A run still going keeps both: the engine refuses to remove a volume in use.
    async fn clear_leftover_runs(&self) {
        let ended = vec!["exited".to_string(), "dead".to_string()];
        let mut leftovers = self.run_containers(LABEL_RUN, Some(ended.clone())).await;
        leftovers.extend(self.run_containers(LABEL_METER, Some(ended)).await);
        let mut selector = self.ownership.selector(Kind::Pipeline, None);
        selector.push(LABEL_RUN.to_string());
        for container in leftovers {
            if let Some(id) = container.id {
                let _ = self
                    .docker
                    .remove_container(&id, None::<RemoveContainerOptions>)
                    .await;
            }
        }
        let filters = std::collections::HashMap::from([
            ("label".to_string(), selector),
            ("dangling".to_string(), vec!["true".to_string()]),
        ]);
        // Another run's volume is dangling for a moment too, between its making and its
        // container's: only volumes older than that are leftovers.
        let old = |created: &Option<String>| {
            created
                .as_deref()
                .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok())
                .is_some_and(|c| chrono::Utc::now().signed_duration_since(c).num_seconds() > 600)
        };
        let options = bollard::query_parameters::ListVolumesOptions {
            filters: Some(filters),
        };
        if let Ok(listed) = self.docker.list_volumes(Some(options)).await {
            for volume in listed
                .volumes
                .unwrap_or_default()
                .into_iter()
                .filter(|v| old(&v.created_at))
            {
                let _ = self
                    .docker
                    .remove_volume(&volume.name, None::<RemoveVolumeOptions>)
                    .await;
            }
        }
    }

    /// Fails when `tag` names an image this instance did not produce: a run must not take over
    /// someone's image (or a base image such as `busybox:latest`).
    async fn refuse_foreign_tag(&self, tag: &str) -> Attempt<()> {
        match self.docker.inspect_image(tag).await {
            Ok(image) => {
                let labels = image.config.and_then(|c| c.labels).unwrap_or_default();
                let ours = labels
                    .get(crate::backend::LABEL_INSTANCE)
                    .map(String::as_str)
                    == Some(self.instance())
                    && labels.get(crate::backend::LABEL_KIND).map(String::as_str)
                        == Some(Kind::Pipeline.as_str());
                match ours {
                    true => Ok(()),
                    false => Err(Trouble::Failed(format!(
                        "image {tag} exists and was not produced by berth instance {}; choose another spec.produces",
                        self.instance()
                    ))),
                }
            }
            Err(error) if super::is_status(&error, 404) => Ok(()),
            Err(error) => Err(self.trouble(&format!("cannot inspect image {tag}"), error)),
        }
    }

    /// Removes every image the Pipeline produced (when it is removed from the repo, with prune).
    pub async fn remove_products(&self, key: &ObjectRef) -> Outcome {
        let images = match self.products(Some(key)).await {
            Ok(images) => images,
            Err(error) => return self.trouble("cannot list images", error).into(),
        };
        let removed = self.remove_images(images.iter()).await;
        Outcome::Done(format!("removed {removed} produced image(s)"))
    }
}

#[cfg(test)]
mod tests {
    use super::branch_tag;

    /// A branch's build never moves the tag the source's `ref` produces.
    #[test]
    fn a_branch_build_gets_a_tag_of_its_own_in_the_same_repository() {
        assert_eq!(
            branch_tag("app:latest", "evil", "0123abcd"),
            "app:branch-evil-0123abcd"
        );
        assert_eq!(
            branch_tag("app:{commit}", "feat/x", "0123"),
            "app:branch-feat-x-0123"
        );
        assert_eq!(
            branch_tag("registry:5000/team/app", "Main\n", "01"),
            "registry:5000/team/app:branch-main--01"
        );
        assert_eq!(branch_tag("app", "-.x", "01"), "app:branch-x-01");
    }
}
