//! The disk meter of a pipeline run: what its steps wrote, against `pipelines.workspaceLimit`.
//!
//! Docker cannot cap a volume's size on most storage drivers, so the run is measured, and
//! measured where the steps cannot tamper with the count: `du` runs in a container of its own, made
//! from the step image as the engine holds it (what the steps change is in their container, not
//! in the image), as root so no folder can hide from it, without a network, and with every
//! volume of the run container mounted read-only (the workspace and any `VOLUME` the image
//! declares). The run container's own layer is counted by the engine (`SizeRw`).
//!
//! It fails closed: once the meter has measured the run, a measure that fails, says something
//! else than a size, or takes longer than [`MEASURE_TIMEOUT`] counts; [`FAILURES_ALLOWED`] in a row
//! stop the run. A meter that cannot measure at the start (a step image without `sleep` or `du`)
//! is said in the log, and the layer alone counts.

use std::collections::HashMap;
use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptions, InspectContainerOptions};
use futures_util::StreamExt;

use super::template::contained;
use super::{DockerBackend, engine_message};
use crate::descriptor::security::Resources;
use crate::descriptor::security::Security;
use crate::descriptor::values::Size;

/// How often the meter measures while a step runs.
const EVERY: Duration = Duration::from_secs(2);
/// The longest one measure may take.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(20);
/// Failed measures in a row that stop the run.
const FAILURES_ALLOWED: u32 = 3;

/// What a meter may take: it only sleeps and runs `du`.
const METER_RESOURCES: Resources = Resources {
    cpus: Some(0.5),
    memory: Some(Size { bytes: 128 << 20 }),
    pids: Some(32),
};

/// A run's meter: its container and the paths it measures, or none (the layer alone counts).
pub(super) struct Meter {
    run: String,
    container: Option<String>,
    paths: Vec<String>,
}

/// Why a run must stop for its disk use.
pub(super) enum Overrun {
    /// It wrote this many bytes, over the limit.
    Wrote(u64),
    /// What it wrote can no longer be measured.
    Unmeasurable(Unmeasured),
}

/// Why what a run wrote could not be measured.
#[derive(Debug, thiserror::Error)]
pub(super) enum Unmeasured {
    /// The engine did not answer (`what` was being done).
    #[error("{what}: {why}")]
    Engine {
        /// What was being done.
        what: &'static str,
        /// The engine's words.
        why: String,
    },
    /// `du` failed, or said something else than sizes.
    #[error("{0}")]
    Du(String),
    /// Measuring took longer than [`MEASURE_TIMEOUT`].
    #[error("measuring took longer than {}s", MEASURE_TIMEOUT.as_secs())]
    TimedOut,
}

/// The meter's container of the run `run`.
pub(super) fn meter_name(run: &str) -> String {
    format!("{run}-meter")
}

impl DockerBackend {
    /// Starts the meter of the run container `run`, made of `image`, to live at most `seconds`
    /// (the run's timeout and a minute). With it, why the volumes cannot be measured, if they
    /// cannot (the layer alone counts then).
    pub(super) async fn start_meter(
        &self,
        run: &str,
        image: &str,
        labels: &HashMap<String, String>,
        seconds: u64,
    ) -> (Meter, Option<String>) {
        let mut meter = Meter {
            run: run.to_string(),
            container: None,
            paths: Vec::new(),
        };
        let inspected = self
            .docker
            .inspect_container(run, None::<InspectContainerOptions>)
            .await;
        meter.paths = inspected
            .ok()
            .and_then(|c| c.mounts)
            .into_iter()
            .flatten()
            .filter_map(|mount| mount.destination)
            .collect();
        let name = meter_name(run);
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            entrypoint: Some(vec!["sleep".into()]),
            cmd: Some(vec![seconds.to_string()]),
            user: Some("0".into()),
            labels: Some(labels.clone()),
            host_config: Some(HostConfig {
                volumes_from: Some(vec![format!("{run}:ro")]),
                network_mode: Some("none".into()),
                ..contained(Some(&METER_RESOURCES), &Security::default(), true)
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        let started = async {
            self.docker.create_container(Some(options), body).await?;
            self.docker
                .start_container(
                    &name,
                    None::<bollard::query_parameters::StartContainerOptions>,
                )
                .await
        };
        if let Err(error) = started.await {
            return (meter, Some(engine_message(&error)));
        }
        meter.container = Some(name);
        // It must measure once now, or it never counts.
        if let Err(why) = self.measure(&meter).await {
            meter.container = None;
            return (meter, Some(why.to_string()));
        }
        (meter, None)
    }

    /// Resolves once the run has written more than the workspace limit, or can no longer be
    /// measured; never otherwise.
    pub(super) async fn overrun(&self, meter: &Meter) -> Overrun {
        let mut failures = 0;
        loop {
            tokio::time::sleep(EVERY).await;
            match self.measure(meter).await {
                Ok(written) if written > self.workspace_limit => return Overrun::Wrote(written),
                Ok(_) => failures = 0,
                Err(why) => {
                    failures += 1;
                    if failures >= FAILURES_ALLOWED {
                        return Overrun::Unmeasurable(why);
                    }
                }
            }
        }
    }

    /// What the run wrote to disk, in bytes: its volumes as `du` in the meter counts them, and
    /// its container's own layer as the engine does; or why that cannot be said.
    pub(super) async fn measure(&self, meter: &Meter) -> Result<u64, Unmeasured> {
        let measured = async {
            let layer = self
                .docker
                .inspect_container(&meter.run, Some(InspectContainerOptions { size: true }))
                .await
                .map_err(|e| Unmeasured::Engine {
                    what: "cannot read the container's size",
                    why: engine_message(&e),
                })?
                .size_rw
                .and_then(|size| u64::try_from(size).ok())
                .unwrap_or(0);
            let volumes = match &meter.container {
                Some(container) => self.disk_usage(container, &meter.paths).await?,
                None => 0,
            };
            Ok(layer.saturating_add(volumes))
        };
        tokio::time::timeout(MEASURE_TIMEOUT, measured)
            .await
            .unwrap_or(Err(Unmeasured::TimedOut))
    }

    /// The bytes under `paths` as `du -sk` in the container `meter` counts them; a `du` that
    /// fails (a folder it cannot read, a crash) is an error, never a smaller count.
    async fn disk_usage(&self, meter: &str, paths: &[String]) -> Result<u64, Unmeasured> {
        let failed = |what: &'static str, e: bollard::errors::Error| Unmeasured::Engine {
            what,
            why: engine_message(&e),
        };
        let mut cmd = vec!["du".to_string(), "-sk".to_string()];
        cmd.extend(paths.iter().cloned());
        let exec = self
            .docker
            .create_exec(
                meter,
                CreateExecOptions::<String> {
                    cmd: Some(cmd),
                    attach_stdout: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| failed("cannot run du", e))?;
        let started = self
            .docker
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| failed("cannot run du", e))?;
        let StartExecResults::Attached { mut output, .. } = started else {
            return Err(Unmeasured::Du("du gave no output".into()));
        };
        let mut text = Vec::new();
        while let Some(chunk) = output.next().await {
            let chunk = chunk.map_err(|e| failed("du's output stopped", e))?;
            text.extend_from_slice(&chunk.into_bytes());
            if text.len() > 64 * 1024 {
                return Err(Unmeasured::Du("du said more than a size per path".into()));
            }
        }
        let code = self
            .docker
            .inspect_exec(&exec.id)
            .await
            .map_err(|e| failed("cannot read du's exit code", e))?
            .exit_code;
        if code != Some(0) {
            return Err(Unmeasured::Du(format!(
                "du exited with code {}",
                code.map_or("?".to_string(), |c| c.to_string())
            )));
        }
        let text = String::from_utf8_lossy(&text);
        let mut total: u64 = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let kib: u64 = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Unmeasured::Du("du said something else than a size".into()))?;
            total = total.saturating_add(kib.saturating_mul(1024));
        }
        Ok(total)
    }
}
