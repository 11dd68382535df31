//! Health of the objects of a staging, computed from what the API server reports, as kstatus
//! does: a Deployment or StatefulSet by its observed generation and its updated, ready and
//! available replicas; a Job by its conditions; a PersistentVolumeClaim by being bound. A
//! workload still rolling out whose pods crash-loop or cannot get their image is Degraded, with
//! the pod's reason. Pure.

use serde_json::Value;

use crate::plan::{Health, PartState};

/// Annotation on an archived workload: the replicas it had, kept for restore.
pub const ANNOTATION_ARCHIVED_REPLICAS: &str = "berth.archived-replicas";

/// Container reasons that say a pod will not come up by waiting.
const STUCK: &[&str] = &[
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// What one object is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Running, archived (scaled to zero by berth) or completed (a Job).
    pub state: PartState,
    /// Its health.
    pub health: Health,
    /// Why it is not healthy, when it is not.
    pub detail: Option<String>,
}

impl Condition {
    fn healthy(state: PartState) -> Condition {
        Condition {
            state,
            health: Health::Healthy,
            detail: None,
        }
    }

    fn progressing(state: PartState, detail: String) -> Condition {
        Condition {
            state,
            health: Health::Progressing,
            detail: Some(detail),
        }
    }

    fn degraded(state: PartState, detail: String) -> Condition {
        Condition {
            state,
            health: Health::Degraded,
            detail: Some(detail),
        }
    }
}

fn int(object: &Value, pointer: &str) -> Option<i64> {
    object.pointer(pointer).and_then(Value::as_i64)
}

/// The condition of `object` of `kind`; `pods` are the pods of its staging (matched to the
/// workload by its selector, and counted only when the workload owns them).
pub fn of(kind: &str, object: &Value, pods: &[&Value]) -> Condition {
    match kind {
        "Deployment" | "StatefulSet" => workload(kind, object, pods),
        "Job" => job(object, pods),
        "PersistentVolumeClaim" => match object.pointer("/status/phase").and_then(Value::as_str) {
            Some("Bound") => Condition::healthy(PartState::Running),
            Some("Lost") => Condition::degraded(PartState::Running, "its volume is lost".into()),
            phase => Condition::progressing(
                PartState::Running,
                format!("claim {} (no volume bound yet)", phase.unwrap_or("Pending")),
            ),
        },
        _ => Condition::healthy(PartState::Running),
    }
}

fn workload(kind: &str, object: &Value, pods: &[&Value]) -> Condition {
    let wanted = int(object, "/spec/replicas").unwrap_or(1);
    let archived = object
        .pointer(&format!(
            "/metadata/annotations/{ANNOTATION_ARCHIVED_REPLICAS}"
        ))
        .is_some();
    let state = if archived && wanted == 0 {
        PartState::Archived
    } else {
        PartState::Running
    };
    let generation = int(object, "/metadata/generation").unwrap_or(0);
    let observed = int(object, "/status/observedGeneration").unwrap_or(0);
    if observed < generation {
        return Condition::progressing(
            state,
            "the change is not yet picked up by its controller".into(),
        );
    }
    if kind == "Deployment"
        && let Some(conditions) = object
            .pointer("/status/conditions")
            .and_then(Value::as_array)
        && let Some(stalled) = conditions
            .iter()
            .find(|c| c["type"] == "Progressing" && c["status"] == "False")
    {
        let message = stalled["message"].as_str().unwrap_or("rollout stalled");
        return Condition::degraded(state, message.to_string());
    }
    let current = int(object, "/status/replicas").unwrap_or(0);
    let updated = int(object, "/status/updatedReplicas").unwrap_or(0);
    let ready = int(object, "/status/readyReplicas").unwrap_or(0);
    let available = match kind {
        "Deployment" => int(object, "/status/availableReplicas").unwrap_or(0),
        _ => ready,
    };
    let waiting = if updated < wanted {
        Some(format!("{updated} of {wanted} replicas updated"))
    } else if current > wanted {
        Some(format!(
            "{} old replicas still terminating",
            current - wanted
        ))
    } else if available < wanted {
        Some(format!("{available} of {wanted} replicas available"))
    } else if kind == "StatefulSet"
        && object.pointer("/status/updateRevision") != object.pointer("/status/currentRevision")
        && object.pointer("/status/updateRevision").is_some()
    {
        Some("rolling out a new revision".into())
    } else {
        None
    };
    let Some(waiting) = waiting else {
        return Condition::healthy(state);
    };
    match stuck_pod(kind, object, pods) {
        Some(reason) => Condition::degraded(state, reason),
        None => Condition::progressing(state, waiting),
    }
}

fn job(object: &Value, pods: &[&Value]) -> Condition {
    let conditions = object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let holds = |kind: &str| {
        conditions
            .iter()
            .find(|c| c["type"] == kind && c["status"] == "True")
    };
    if holds("Complete").is_some() {
        return Condition::healthy(PartState::Completed);
    }
    if let Some(failed) = holds("Failed") {
        let message = failed["message"]
            .as_str()
            .or(failed["reason"].as_str())
            .unwrap_or("the job failed");
        return Condition::degraded(PartState::Completed, message.to_string());
    }
    // A pod that cannot start never finishes the job: say which and why, not "running".
    match stuck_pod("Job", object, pods) {
        Some(reason) => Condition::degraded(PartState::Running, reason),
        None => Condition::progressing(PartState::Running, "the job is running".into()),
    }
}

/// Whether `pod` belongs to the workload `name` of `kind` by its owner references, not by its
/// labels alone: a chart's test pod or a hand-made pod may carry the same labels. A Deployment
/// owns its pods through the ReplicaSet named after it and the pods' template hash.
fn owned_by(kind: &str, name: &str, pod: &Value) -> bool {
    let owners = pod
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array);
    owners.into_iter().flatten().any(|owner| {
        let (owner_kind, owner_name) = (owner["kind"].as_str(), owner["name"].as_str());
        match kind {
            "Deployment" => {
                let hash = pod
                    .pointer("/metadata/labels/pod-template-hash")
                    .and_then(Value::as_str);
                owner_kind == Some("ReplicaSet")
                    && hash.is_some_and(|hash| owner_name == Some(&format!("{name}-{hash}")))
            }
            _ => owner_kind == Some(kind) && owner_name == Some(name),
        }
    })
}

/// The first pod of the workload that will not come up by waiting, and why.
fn stuck_pod(kind: &str, workload: &Value, pods: &[&Value]) -> Option<String> {
    let selector = workload
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)?;
    let name = workload.pointer("/metadata/name").and_then(Value::as_str)?;
    let mine = |pod: &&&Value| {
        // A pod on its way out says nothing about the workload any more.
        if pod.pointer("/metadata/deletionTimestamp").is_some() {
            return false;
        }
        let labels = pod.pointer("/metadata/labels").and_then(Value::as_object);
        labels.is_some_and(|labels| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            && owned_by(kind, name, pod)
    };
    pods.iter().filter(mine).find_map(|pod| stuck(pod))
}

/// Why `pod` will not come up by waiting, when one of its containers says so.
fn stuck(pod: &Value) -> Option<String> {
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let statuses = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array);
    for status in statuses.into_iter().flatten() {
        let container = status["name"].as_str().unwrap_or("?");
        let Some(reason) = status
            .pointer("/state/waiting/reason")
            .and_then(Value::as_str)
        else {
            continue;
        };
        if !STUCK.contains(&reason) {
            continue;
        }
        let mut detail = format!("pod {name}: container {container} {reason}");
        if let Some(code) = status
            .pointer("/lastState/terminated/exitCode")
            .and_then(Value::as_i64)
        {
            detail.push_str(&format!(", last exit code {code}"));
        }
        if let Some(restarts) = status["restartCount"].as_i64().filter(|n| *n > 0) {
            detail.push_str(&format!(", restarted {restarts} times"));
        }
        if let Some(message) = status
            .pointer("/state/waiting/message")
            .and_then(Value::as_str)
        {
            let message: String = message.chars().take(200).collect();
            detail.push_str(&format!(" ({message})"));
        }
        return Some(detail);
    }
    None
}

/// The condition of one pod of its own (a per-team instance): healthy once ready, degraded when
/// it will not come up by waiting or has ended, else progressing.
pub fn pod(pod: &Value) -> Condition {
    if let Some(reason) = stuck(pod) {
        return Condition::degraded(PartState::Running, reason);
    }
    let phase = pod
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending");
    if matches!(phase, "Failed" | "Succeeded") {
        return Condition::degraded(PartState::Running, format!("the pod ended ({phase})"));
    }
    let ready = pod
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    match ready {
        true => Condition::healthy(PartState::Running),
        false => {
            Condition::progressing(PartState::Running, format!("the pod is {phase}, not ready"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(status: Value) -> Value {
        json!({
            "metadata": {"name": "shop", "generation": 2},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "shop"}}},
            "status": status,
        })
    }

    #[test]
    fn a_deployment_is_healthy_when_its_replicas_are_updated_and_available() {
        let ready = deployment(
            json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}),
        );
        assert_eq!(of("Deployment", &ready, &[]).health, Health::Healthy);
        let stale = deployment(
            json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}),
        );
        assert_eq!(of("Deployment", &stale, &[]).health, Health::Progressing);
        let rolling = deployment(
            json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2}),
        );
        let condition = of("Deployment", &rolling, &[]);
        assert_eq!(condition.health, Health::Progressing);
        assert_eq!(
            condition.detail.as_deref(),
            Some("1 old replicas still terminating")
        );
    }

    #[test]
    fn a_crash_looping_pod_makes_its_deployment_degraded_with_the_reason() {
        let rolling = deployment(
            json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 1}),
        );
        let pod = json!({
            "metadata": {"name": "shop-1", "labels": {"app": "shop", "pod-template-hash": "5d9f"},
                "ownerReferences": [{"kind": "ReplicaSet", "name": "shop-5d9f", "controller": true}]},
            "status": {"containerStatuses": [{"name": "shop", "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                "lastState": {"terminated": {"exitCode": 3}}}]}
        });
        let other = json!({"metadata": {"name": "db-1", "labels": {"app": "db"}},
            "status": {"containerStatuses": [{"name": "db", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        // A chart's test pod with the workload's labels, but no owner: never blamed.
        let test_pod = json!({"metadata": {"name": "shop-test", "labels": {"app": "shop"}},
            "status": {"containerStatuses": [{"name": "t", "state": {"waiting": {"reason": "ErrImagePull"}}}]}});
        let condition = of("Deployment", &rolling, &[&other, &test_pod, &pod]);
        assert_eq!(condition.health, Health::Degraded);
        assert_eq!(
            condition.detail.as_deref(),
            Some(
                "pod shop-1: container shop CrashLoopBackOff, last exit code 3, restarted 4 times (back-off 40s)"
            )
        );
    }

    #[test]
    fn an_archived_workload_scaled_to_zero_is_archived_and_healthy() {
        let object = json!({"metadata": {"generation": 3, "annotations": {ANNOTATION_ARCHIVED_REPLICAS: "2"}},
            "spec": {"replicas": 0}, "status": {"observedGeneration": 3}});
        let condition = of("Deployment", &object, &[]);
        assert_eq!(
            (condition.state, condition.health),
            (PartState::Archived, Health::Healthy)
        );
    }

    #[test]
    fn jobs_and_claims() {
        let done = json!({"status": {"conditions": [{"type": "Complete", "status": "True"}]}});
        assert_eq!(
            of("Job", &done, &[]),
            Condition::healthy(PartState::Completed)
        );
        let failed = json!({"status": {"conditions": [{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]}});
        assert_eq!(of("Job", &failed, &[]).health, Health::Degraded);
        // A job whose pod cannot get its image says so, rather than "running".
        let running = json!({"metadata": {"name": "migrate"},
            "spec": {"selector": {"matchLabels": {"controller-uid": "u1"}}}, "status": {"active": 1}});
        let pod = json!({"metadata": {"name": "migrate-x1", "labels": {"controller-uid": "u1"},
                "ownerReferences": [{"kind": "Job", "name": "migrate", "controller": true}]},
            "status": {"containerStatuses": [{"name": "m", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]}});
        let stuck = of("Job", &running, &[&pod]);
        assert_eq!(stuck.health, Health::Degraded);
        assert_eq!(
            stuck.detail.as_deref(),
            Some("pod migrate-x1: container m ImagePullBackOff (no such image)")
        );
        assert_eq!(of("Job", &running, &[]).health, Health::Progressing);
        let pending = json!({"status": {"phase": "Pending"}});
        assert_eq!(
            of("PersistentVolumeClaim", &pending, &[]).health,
            Health::Progressing
        );
        let bound = json!({"status": {"phase": "Bound"}});
        assert_eq!(
            of("PersistentVolumeClaim", &bound, &[]).health,
            Health::Healthy
        );
    }
}
