//! The agent's Prometheus metrics, all named `berth_…`, served by `GET /metrics` in the text format.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    action: String,
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    provider: String,
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    pipeline: String,
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipelineLabel {
    pipeline: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChallengeResult {
    challenge: String,
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChallengeState {
    challenge: String,
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpawnKind {
    pooled: String,
}

/// The agent's metrics. Cloning shares them.
#[derive(Debug, Clone)]
pub struct Metrics {
    passes: Family<ResultLabel, Counter>,
    pass_duration: Histogram,
    steps: Family<StepLabels, Counter>,
    objects: Family<PhaseLabel, Gauge>,
    webhooks: Family<WebhookLabels, Counter>,
    runs: Family<RunLabels, Counter>,
    run_duration: Family<PipelineLabel, Histogram>,
    queue_depth: Gauge,
    status_pushes: Family<ResultLabel, Counter>,
    instances: Family<ChallengeState, Gauge>,
    spawns: Family<ChallengeResult, Counter>,
    kills: Family<ChallengeResult, Counter>,
    spawn_latency: Family<SpawnKind, Histogram>,
    registry: std::sync::Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Fresh metrics, registered.
    pub fn new() -> Metrics {
        let passes = Family::<ResultLabel, Counter>::default();
        // 1 ms to about 65 s.
        let pass_duration = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let steps = Family::<StepLabels, Counter>::default();
        let objects = Family::<PhaseLabel, Gauge>::default();
        let webhooks = Family::<WebhookLabels, Counter>::default();
        let runs = Family::<RunLabels, Counter>::default();
        // 100 ms to about 55 min.
        let run_duration = Family::<PipelineLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.1, 2.0, 16))
        });
        let queue_depth = Gauge::default();
        let status_pushes = Family::<ResultLabel, Counter>::default();
        let instances = Family::<ChallengeState, Gauge>::default();
        let spawns = Family::<ChallengeResult, Counter>::default();
        let kills = Family::<ChallengeResult, Counter>::default();
        // 1 ms to about 65 s.
        let spawn_latency = Family::<SpawnKind, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 17))
        });
        let mut registry = Registry::default();
        registry.register(
            "berth_instances",
            "Per-team instances, by challenge and state (live, pooled)",
            instances.clone(),
        );
        registry.register(
            "berth_instance_spawns",
            "Spawn requests, by challenge and result (created, claimed, team_limit, full, failed)",
            spawns.clone(),
        );
        registry.register(
            "berth_instance_kills",
            "Instances removed, by challenge and cause (killed, expired, removed, failed)",
            kills.clone(),
        );
        registry.register(
            "berth_instance_spawn_seconds",
            "From a spawn request to its answer, by whether a pooled instance was claimed",
            spawn_latency.clone(),
        );
        registry.register(
            "berth_passes",
            "Reconcile passes, by result (applied, failed, rejected, transient, unchanged)",
            passes.clone(),
        );
        registry.register(
            "berth_pass_duration_seconds",
            "How long a pass took, fetch to status pushed",
            pass_duration.clone(),
        );
        registry.register(
            "berth_steps",
            "Plan steps carried out, by action and result",
            steps.clone(),
        );
        registry.register(
            "berth_objects",
            "Objects by phase, as of the last pass",
            objects.clone(),
        );
        registry.register(
            "berth_webhook_requests",
            "Webhook deliveries, by provider and result",
            webhooks.clone(),
        );
        registry.register(
            "berth_pipeline_runs",
            "Pipeline runs ended, by pipeline and result (succeeded, failed, cancelled, interrupted)",
            runs.clone(),
        );
        registry.register(
            "berth_pipeline_run_duration_seconds",
            "How long a pipeline run took, from a worker taking it to its end",
            run_duration.clone(),
        );
        registry.register(
            "berth_pipeline_queue_depth",
            "Pipeline runs waiting for a worker",
            queue_depth.clone(),
        );
        registry.register(
            "berth_status_pushes",
            "Attempts to push status to the config repo, by result (pushed, failed)",
            status_pushes.clone(),
        );
        Metrics {
            instances,
            spawns,
            kills,
            spawn_latency,
            status_pushes,
            runs,
            run_duration,
            queue_depth,
            passes,
            pass_duration,
            steps,
            objects,
            webhooks,
            registry: std::sync::Arc::new(registry),
        }
    }

    /// Sets the live and pooled instance gauges, by challenge.
    pub fn instances(
        &self,
        counts: &std::collections::BTreeMap<String, crate::status::InstanceCounts>,
    ) {
        self.instances.clear();
        for (challenge, counted) in counts {
            for (state, count) in [("live", counted.live), ("pooled", counted.pooled)] {
                self.instances
                    .get_or_create(&ChallengeState {
                        challenge: challenge.clone(),
                        state: state.into(),
                    })
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
    }

    /// Counts a spawn request; `took` for those answered with an instance.
    pub fn spawn(&self, challenge: &str, result: &str, took: Option<(Duration, bool)>) {
        self.spawns
            .get_or_create(&ChallengeResult {
                challenge: challenge.into(),
                result: result.into(),
            })
            .inc();
        if let Some((took, pooled)) = took {
            self.spawn_latency
                .get_or_create(&SpawnKind {
                    pooled: pooled.to_string(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// Counts an instance removed, and why.
    pub fn kill(&self, challenge: &str, cause: &str) {
        self.kills
            .get_or_create(&ChallengeResult {
                challenge: challenge.into(),
                result: cause.into(),
            })
            .inc();
    }

    /// Counts an attempt to push status.
    pub fn status_push(&self, result: &str) {
        self.status_pushes
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Counts a pass and its duration.
    pub fn pass(&self, result: &str, took: Duration) {
        self.passes
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
        self.pass_duration.observe(took.as_secs_f64());
    }

    /// Counts a step.
    pub fn step(&self, action: &str, result: &str) {
        self.steps
            .get_or_create(&StepLabels {
                action: action.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Sets the objects-by-phase gauges.
    pub fn objects(&self, phases: &std::collections::BTreeMap<crate::status::Phase, usize>) {
        self.objects.clear();
        for (phase, count) in phases {
            self.objects
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str().to_string(),
                })
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// Counts a webhook delivery.
    pub fn webhook(&self, provider: &str, result: &str) {
        self.webhooks
            .get_or_create(&WebhookLabels {
                provider: provider.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Counts a pipeline run that ended, and its duration.
    pub fn run(&self, pipeline: &str, result: &str, took: Duration) {
        self.runs
            .get_or_create(&RunLabels {
                pipeline: pipeline.into(),
                result: result.into(),
            })
            .inc();
        self.run_duration
            .get_or_create(&PipelineLabel {
                pipeline: pipeline.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// Sets how many runs wait for a worker.
    pub fn queue_depth(&self, depth: u64) {
        self.queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_with_berth_names_and_labels() {
        let metrics = Metrics::new();
        metrics.pass("applied", Duration::from_millis(20));
        metrics.webhook("github", "unauthorized");
        let text = metrics.render();
        assert!(
            text.contains("berth_passes_total{result=\"applied\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "berth_webhook_requests_total{provider=\"github\",result=\"unauthorized\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("berth_pass_duration_seconds_count 1"),
            "{text}"
        );
    }
}
