//! A staging's objects as berth applies them, and the comparison of that with what runs. Pure.
//!
//! Every object gets the ownership labels and the staging's namespace; the pods of workloads get
//! the ownership labels too, so one list finds them. Archiving applies the same objects with the
//! workloads' replicas at zero and the replicas they had in an annotation, so restore is the
//! plain apply again. [`edited`] finds what someone changed by hand: every field berth applies
//! must still have the value berth gave it (fields others add, and defaults, are theirs).

use std::collections::HashMap;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::health::ANNOTATION_ARCHIVED_REPLICAS;
use crate::descriptor::manifests::Manifest;

/// Kinds berth scales to zero to archive a staging.
pub const WORKLOADS: &[&str] = &["Deployment", "StatefulSet"];

/// Kinds whose pod template gets the ownership labels.
const POD_TEMPLATES: &[&str] = &[
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "ReplicaSet",
];

/// Ports written without `protocol` get the server's default, `TCP`, as upstream manifests
/// leave it out: server-side apply on older API servers refuses a port list whose merge key is
/// missing ("associative list with keys has an element that omits key field protocol").
fn default_port_protocols(object: &mut Value, kind: &str) {
    fn tcp_unless_written(ports: Option<&mut Value>) {
        for port in ports
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .filter_map(Value::as_object_mut)
        {
            port.entry("protocol").or_insert_with(|| "TCP".into());
        }
    }
    let pod = match kind {
        "Service" => return tcp_unless_written(object.pointer_mut("/spec/ports")),
        "Pod" => object.pointer_mut("/spec"),
        "CronJob" => object.pointer_mut("/spec/jobTemplate/spec/template/spec"),
        _ if POD_TEMPLATES.contains(&kind) => object.pointer_mut("/spec/template/spec"),
        _ => None,
    };
    // Read, never indexed into: a pod spec of the wrong shape is left for the server to refuse.
    let Some(pod) = pod.and_then(Value::as_object_mut) else {
        return;
    };
    for containers in ["containers", "initContainers"] {
        let listed = pod.get_mut(containers).and_then(Value::as_array_mut);
        for container in listed.into_iter().flatten() {
            tcp_unless_written(container.get_mut("ports"));
        }
    }
}

/// `manifest` as berth applies it in `namespace`, with `labels`; archived workloads at zero.
pub fn shaped(
    manifest: &Manifest,
    namespace: &str,
    labels: &HashMap<String, String>,
    pod_labels: &HashMap<String, String>,
    archived: bool,
) -> Value {
    let mut object = manifest.object.clone();
    let metadata = entry(&mut object, "metadata");
    metadata.insert("namespace".into(), namespace.into());
    let own = entry_value(metadata, "labels");
    for (key, value) in labels {
        own.insert(key.clone(), value.clone().into());
    }
    let kind = manifest.kind.as_str();
    if POD_TEMPLATES.contains(&kind)
        && let Some(template) = object.pointer_mut("/spec/template")
        && template.is_object()
    {
        let template_metadata = entry(template, "metadata");
        let own = entry_value(template_metadata, "labels");
        for (key, value) in pod_labels {
            own.insert(key.clone(), value.clone().into());
        }
    }
    default_port_protocols(&mut object, kind);
    if archived && WORKLOADS.contains(&kind) {
        let replicas = manifest
            .object
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let annotations = entry_value(entry(&mut object, "metadata"), "annotations");
        annotations.insert(
            ANNOTATION_ARCHIVED_REPLICAS.into(),
            replicas.to_string().into(),
        );
        entry(&mut object, "spec").insert("replicas".into(), 0.into());
    }
    object
}

fn entry<'v>(value: &'v mut Value, key: &str) -> &'v mut Map<String, Value> {
    let map = value.as_object_mut().expect("manifests are mappings");
    entry_value(map, key)
}

fn entry_value<'m>(map: &'m mut Map<String, Value>, key: &str) -> &'m mut Map<String, Value> {
    let slot = map.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut().expect("made a mapping above")
}

/// Where a live object answers from outside the cluster: a NodePort or LoadBalancer Service's
/// node ports (`30080/tcp`) and balancer addresses (`192.0.2.7:80/tcp`), an Ingress's URLs
/// (`https://shop.example/api`, `*` for any host). Read from what the server holds, so a port the
/// cluster chose is the one shown.
pub fn reach(object: &Value) -> Vec<String> {
    let text = |value: &Value, pointer: &str| {
        value
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let list = |value: &Value, pointer: &str| {
        value
            .pointer(pointer)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let api = object["apiVersion"].as_str().unwrap_or_default();
    match object["kind"].as_str() {
        Some("Service") if api == "v1" => {
            let kind = text(object, "/spec/type").unwrap_or_default();
            if kind != "NodePort" && kind != "LoadBalancer" {
                return Vec::new();
            }
            let ports = list(object, "/spec/ports");
            let protocol = |port: &Value| {
                text(port, "/protocol")
                    .unwrap_or_else(|| "TCP".into())
                    .to_ascii_lowercase()
            };
            let mut reach: Vec<String> = ports
                .iter()
                .filter_map(|port| {
                    Some(format!("{}/{}", port["nodePort"].as_u64()?, protocol(port)))
                })
                .collect();
            for balancer in list(object, "/status/loadBalancer/ingress") {
                let Some(address) = text(&balancer, "/ip").or_else(|| text(&balancer, "/hostname"))
                else {
                    continue;
                };
                reach.extend(ports.iter().filter_map(|port| {
                    Some(format!(
                        "{address}:{}/{}",
                        port["port"].as_u64()?,
                        protocol(port)
                    ))
                }));
            }
            reach
        }
        Some("Ingress")
            if api.starts_with("networking.k8s.io/") || api.starts_with("extensions/") =>
        {
            let secured: Vec<String> = list(object, "/spec/tls")
                .iter()
                .flat_map(|tls| list(tls, "/hosts"))
                .filter_map(|host| host.as_str().map(str::to_string))
                .collect();
            let mut reach = Vec::new();
            for rule in list(object, "/spec/rules") {
                let host = text(&rule, "/host");
                let scheme = match host.as_ref().is_some_and(|h| secured.contains(h)) {
                    true => "https",
                    false => "http",
                };
                let host = host.unwrap_or_else(|| "*".into());
                for path in list(&rule, "/http/paths") {
                    let path = text(&path, "/path").unwrap_or_else(|| "/".into());
                    reach.push(format!("{scheme}://{host}{path}"));
                }
            }
            if reach.is_empty() && object.pointer("/spec/defaultBackend").is_some() {
                reach.push("http://*/".into());
            }
            reach
        }
        _ => Vec::new(),
    }
}

/// What a plan shows of an object: its images and replicas, when it has them.
pub fn summary(object: &Value) -> Value {
    let mut summary = Map::new();
    let containers = object
        .pointer("/spec/template/spec/containers")
        .or_else(|| object.pointer("/spec/containers"))
        .and_then(Value::as_array);
    let images: Vec<&str> = containers
        .into_iter()
        .flatten()
        .filter_map(|c| c["image"].as_str())
        .collect();
    if !images.is_empty() {
        summary.insert("image".into(), images.join(", ").into());
    }
    // Each variable by name (the plan names those that changed, never their values).
    let env: Map<String, Value> = containers
        .into_iter()
        .flatten()
        .flat_map(|c| c["env"].as_array().into_iter().flatten())
        .filter_map(|variable| {
            let name = variable["name"].as_str()?;
            let value = variable.get("value").or(variable.get("valueFrom"))?;
            Some((name.to_string(), value.clone()))
        })
        .collect();
    if !env.is_empty() {
        summary.insert("env".into(), env.into());
    }
    // A ConfigMap's keys, each with a digest of its value: a change says which keys. (Never a
    // Secret's: an unkeyed digest of a short secret can be guessed.)
    let secret = object["kind"] == "Secret";
    let data: Map<String, Value> = ["data", "binaryData"]
        .iter()
        .filter(|_| !secret)
        .filter_map(|field| object.get(*field).and_then(Value::as_object))
        .flatten()
        .map(|(key, value)| {
            let digest = Sha256::digest(value.to_string().as_bytes());
            (key.clone(), hex::encode(&digest[..8]).into())
        })
        .collect();
    if !data.is_empty() {
        summary.insert("data".into(), data.into());
    }
    if recreated(object) {
        summary.insert("recreate".into(), true.into());
    }
    let archived = object
        .pointer(&format!(
            "/metadata/annotations/{ANNOTATION_ARCHIVED_REPLICAS}"
        ))
        .and_then(Value::as_str)
        .and_then(|n| n.parse::<i64>().ok());
    if let Some(replicas) =
        archived.or_else(|| object.pointer("/spec/replicas").and_then(Value::as_i64))
    {
        summary.insert("replicas".into(), replicas.into());
    }
    Value::Object(summary)
}

/// The annotation that asks berth to delete an object and make it again when it changes, for
/// fields the API server will not change in place (a Job's template, a Service's clusterIP).
pub const RECREATE_ANNOTATION: &str = "berth.io/recreate";

/// Whether `object` asks to be made again rather than changed. Pure.
pub fn recreated(object: &Value) -> bool {
    object
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(RECREATE_ANNOTATION))
        .and_then(Value::as_str)
        == Some("true")
}

/// The first field berth applies whose live value differs: `spec.replicas is 3, berth applies 1`.
pub fn edited(applied: &Value, live: &Value) -> Option<String> {
    let mut path = String::new();
    // Lists leave out each item's apiVersion and kind; the object was found by them anyway.
    let mut applied = applied.clone();
    let secret = applied["kind"] == "Secret";
    let workload = applied["kind"].as_str().is_some_and(is_workload);
    if secret && let Some(edit) = secret_data_edited(&applied, live) {
        return Some(edit);
    }
    if let Some(fields) = applied.as_object_mut() {
        fields.remove("apiVersion");
        fields.remove("kind");
        // A Secret's values were compared above, by key, never shown; and `stringData` is not
        // kept by the server, which folds it into `data`.
        if secret {
            fields.remove("data");
            fields.remove("stringData");
        }
    }
    differ(&applied, live, &mut path).or_else(|| {
        added(&applied, live)
            .into_iter()
            .find(|_| workload)
            .map(|extra| format!("{} was added outside berth", extra.shown))
    })
}

/// An item someone added to a list berth applies whole: a container's `env`, a pod's
/// `containers` and `initContainers`. Server-side apply leaves what another manager set, so
/// these stay unless berth takes them out (as `kubectl set env` would leave `FOO` for ever).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    /// Where it is in the live object (a JSON pointer, for a patch that removes it).
    pub pointer: String,
    /// Its name, for a `test` before the removal.
    pub name: String,
    /// `spec.template.spec.containers[web].env FOO`, for people.
    pub shown: String,
}

/// Whether objects of `kind` are workloads whose pod template berth owns whole (what others add
/// to its lists is taken back): not a bare Pod or a Job, which cannot change their containers,
/// nor a custom resource, which its operator fills. Pure.
pub fn is_workload(kind: &str) -> bool {
    matches!(
        kind,
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "CronJob"
    )
}

/// The lists whose items berth owns whole, by their key.
const OWNED_LISTS: &[&str] = &["env", "containers", "initContainers"];

/// Items of the lists berth owns whole that the live object has and `applied` does not, last
/// first (so removing them in order keeps the earlier pointers right). Pure.
pub fn added(applied: &Value, live: &Value) -> Vec<Added> {
    let mut found = Vec::new();
    walk_added(
        applied,
        live,
        &mut String::new(),
        &mut String::new(),
        &mut found,
    );
    found.reverse();
    found
}

fn walk_added(
    applied: &Value,
    live: &Value,
    pointer: &mut String,
    shown: &mut String,
    found: &mut Vec<Added>,
) {
    let name = |item: &Value| item.get("name").and_then(Value::as_str).map(str::to_string);
    match (applied, live) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, value) in want {
                let Some(there) = have.get(key) else { continue };
                let (pointer_len, shown_len) = (pointer.len(), shown.len());
                pointer.push('/');
                pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
                if !shown.is_empty() {
                    shown.push('.');
                }
                shown.push_str(key);
                if let (true, Value::Array(want), Value::Array(have)) =
                    (OWNED_LISTS.contains(&key.as_str()), value, there)
                    && want.iter().all(|item| name(item).is_some())
                {
                    for (index, item) in have.iter().enumerate() {
                        let Some(item_name) = name(item) else {
                            continue;
                        };
                        if !want
                            .iter()
                            .any(|w| name(w).as_deref() == Some(item_name.as_str()))
                        {
                            found.push(Added {
                                pointer: format!("{pointer}/{index}"),
                                name: item_name.clone(),
                                shown: format!("{shown} {item_name}"),
                            });
                        }
                    }
                }
                walk_added(value, there, pointer, shown, found);
                pointer.truncate(pointer_len);
                shown.truncate(shown_len);
            }
        }
        (Value::Array(want), Value::Array(have)) => {
            let by_name = want.iter().all(|item| name(item).is_some());
            for (index, value) in want.iter().enumerate() {
                let there = match by_name {
                    true => have
                        .iter()
                        .position(|item| name(item) == name(value))
                        .map(|at| (at, &have[at])),
                    false => have.get(index).map(|item| (index, item)),
                };
                let Some((at, there)) = there else { continue };
                let (pointer_len, shown_len) = (pointer.len(), shown.len());
                pointer.push_str(&format!("/{at}"));
                match name(value) {
                    Some(item) => shown.push_str(&format!("[{item}]")),
                    None => shown.push_str(&format!("[{index}]")),
                }
                walk_added(value, there, pointer, shown, found);
                pointer.truncate(pointer_len);
                shown.truncate(shown_len);
            }
        }
        _ => {}
    }
}

/// Which key of a Secret's values someone changed or removed, naming the key and never a value:
/// `data` (base64) and `stringData` (plain) as applied, against the live `data`.
fn secret_data_edited(applied: &Value, live: &Value) -> Option<String> {
    use base64::Engine as _;
    let decode = |text: &str| {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact)
            .ok()
    };
    let mut wanted: Vec<(&String, Option<Vec<u8>>)> = Vec::new();
    if let Some(data) = applied.get("data").and_then(Value::as_object) {
        wanted.extend(data.iter().map(|(k, v)| (k, v.as_str().and_then(decode))));
    }
    if let Some(data) = applied.get("stringData").and_then(Value::as_object) {
        wanted.extend(
            data.iter()
                .map(|(k, v)| (k, v.as_str().map(|v| v.as_bytes().to_vec()))),
        );
    }
    let live = live.get("data").and_then(Value::as_object);
    for (key, value) in wanted {
        match live.and_then(|data| data.get(key)).and_then(Value::as_str) {
            None => return Some(format!("data.{key} was removed")),
            Some(there) if decode(there) != value => {
                return Some(format!("data.{key} was changed (values are not shown)"));
            }
            Some(_) => {}
        }
    }
    None
}

fn differ(applied: &Value, live: &Value, path: &mut String) -> Option<String> {
    match (applied, live) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, value) in want {
                let length = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                let found = match have.get(key) {
                    Some(there) => differ(value, there, path),
                    None if empty(value) => None,
                    None => Some(format!("{path} was removed")),
                };
                path.truncate(length);
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        (Value::Array(want), Value::Array(have)) => {
            // Lists of named items (containers, env, volumes) are matched by name, as the API
            // server merges them: an item someone else inserted does not shift berth's.
            let name = |item: &Value| item.get("name").and_then(Value::as_str).map(str::to_string);
            let by_name = want.iter().all(|item| name(item).is_some());
            for (index, value) in want.iter().enumerate() {
                let length = path.len();
                path.push_str(&format!("[{index}]"));
                let there = match by_name {
                    true => have.iter().find(|item| name(item) == name(value)),
                    false => have.get(index),
                };
                let found = match there {
                    Some(there) => differ(value, there, path),
                    None => Some(format!("{path} was removed")),
                };
                path.truncate(length);
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        (want, have) if same_scalar(want, have) => None,
        (want, _) if empty(want) => None,
        (want, have) => Some(format!(
            "{path} is {}, berth applies {}",
            short(have),
            short(want)
        )),
    }
}

/// Whether two scalars mean the same (`8080` and `"8080"`, as the API server may write either).
fn same_scalar(want: &Value, have: &Value) -> bool {
    want == have
        || match (want, have) {
            (Value::Number(a), Value::String(b)) | (Value::String(b), Value::Number(a)) => {
                a.to_string() == *b
            }
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            _ => false,
        }
        || quantity(want).zip(quantity(have)).is_some_and(|(a, b)| {
            a == b || (a - b).abs() <= f64::EPSILON * a.abs().max(b.abs()) * 8.0
        })
}

/// A Kubernetes quantity's value (`500m`, `1Gi`, `0.5`, `1e3`), which the API server writes in
/// its own canonical form: `0.5` comes back as `500m`, `1024Mi` as `1Gi`.
fn quantity(value: &Value) -> Option<f64> {
    let text = match value {
        Value::Number(number) => return number.as_f64(),
        Value::String(text) => text.as_str(),
        _ => return None,
    };
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, scale) = SUFFIXES
        .iter()
        .find_map(|(suffix, scale)| text.strip_suffix(suffix).map(|n| (n, *scale)))
        .unwrap_or((text, 1.0));
    let starts_numeric =
        number.starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '-' || c == '+');
    if !starts_numeric {
        return None;
    }
    number.parse::<f64>().ok().map(|n| n * scale)
}

/// Values the API server drops when they are empty.
fn empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(_) => false,
    }
}

fn short(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.chars().count() > 60 {
        format!("{}…", text.chars().take(60).collect::<String>())
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A staging shows where it answers as the server holds it: the NodePort the cluster chose,
    /// a balancer's address, an Ingress's hosts (https where its tls names them); a ClusterIP
    /// Service answers nowhere outside.
    #[test]
    fn reach_is_read_from_the_live_object() {
        let node_port = json!({"apiVersion": "v1", "kind": "Service", "spec": {"type": "NodePort", "ports": [
            {"port": 80, "nodePort": 30080}, {"port": 53, "nodePort": 30053, "protocol": "UDP"}]}});
        assert_eq!(reach(&node_port), ["30080/tcp", "30053/udp"]);
        let balancer = json!({"apiVersion": "v1", "kind": "Service",
            "spec": {"type": "LoadBalancer", "ports": [{"port": 443, "nodePort": 31443}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]}}});
        assert_eq!(reach(&balancer), ["31443/tcp", "192.0.2.7:443/tcp"]);
        let inside =
            json!({"apiVersion": "v1", "kind": "Service", "spec": {"ports": [{"port": 80}]}});
        assert!(reach(&inside).is_empty());
        // A custom resource that calls itself an Ingress gives no link.
        let lookalike = json!({"apiVersion": "evil.example/v1", "kind": "Ingress", "spec": {
            "rules": [{"host": "phish.example", "http": {"paths": [{"path": "/"}]}}]}});
        assert!(reach(&lookalike).is_empty());
        let ingress = json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "spec": {
            "tls": [{"hosts": ["shop.example"]}],
            "rules": [
                {"host": "shop.example", "http": {"paths": [{"path": "/api"}, {"path": "/"}]}},
                {"host": "plain.example", "http": {"paths": [{"path": "/"}]}},
                {"http": {"paths": [{"pathType": "Prefix"}]}}]}});
        assert_eq!(
            reach(&ingress),
            [
                "https://shop.example/api",
                "https://shop.example/",
                "http://plain.example/",
                "http://*/"
            ]
        );
    }

    /// The plan names every field that changed: replicas and env together, a ConfigMap's keys;
    /// a Secret's values never reach the summary, not even as digests.
    #[test]
    fn an_env_variable_added_outside_berth_is_found_with_where_to_remove_it() {
        let applied = json!({"kind": "Deployment", "spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "shop:1", "env": [{"name": "LEVEL", "value": "info"}]}
        ]}}}});
        let live = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "proxy", "image": "envoy"},
            {"name": "web", "image": "shop:1", "env": [{"name": "FOO", "value": "bar"}, {"name": "LEVEL", "value": "info"}, {"name": "BAZ", "value": "1"}]}
        ]}}}});
        let found = added(&applied, &live);
        let pointers: Vec<&str> = found.iter().map(|a| a.pointer.as_str()).collect();
        assert_eq!(
            pointers,
            vec![
                "/spec/template/spec/containers/1/env/2",
                "/spec/template/spec/containers/1/env/0",
                "/spec/template/spec/containers/0",
            ]
        );
        assert_eq!(found[1].shown, "spec.template.spec.containers[web].env FOO");
        assert_eq!(
            edited(&applied, &live).as_deref(),
            Some("spec.template.spec.containers[web].env BAZ was added outside berth")
        );
        assert!(added(&applied, &applied).is_empty());
        // A Job cannot change its containers: what others added to one is not berth's to fight.
        let mut job = applied.clone();
        job["kind"] = json!("Job");
        assert_eq!(edited(&job, &live), None);
    }

    #[test]
    fn a_summary_holds_every_field_the_plan_names() {
        let deployment = |replicas: i64, level: &str| {
            summary(
                &json!({"kind": "Deployment", "spec": {"replicas": replicas, "template": {"spec": {"containers": [
                    {"name": "web", "image": "shop:1", "env": [{"name": "LEVEL", "value": level}, {"name": "PORT", "value": "80"}]}
                ]}}}}),
            )
        };
        let (before, after) = (deployment(1, "info"), deployment(3, "debug"));
        assert_eq!(before["env"]["LEVEL"], "info");
        assert_ne!(before["env"], after["env"]);
        assert_ne!(before["replicas"], after["replicas"]);
        let config = |greeting: &str| {
            summary(&json!({"kind": "ConfigMap", "data": {"greeting": greeting, "other": "x"}}))
        };
        assert_ne!(
            config("hello")["data"]["greeting"],
            config("changed")["data"]["greeting"]
        );
        assert_eq!(
            config("hello")["data"]["other"],
            config("changed")["data"]["other"]
        );
        let secret = summary(&json!({"kind": "Secret", "data": {"TOKEN": "c2VjcmV0"}}));
        assert!(secret.get("data").is_none(), "{secret}");
    }

    fn manifest(object: Value) -> Manifest {
        Manifest {
            file: "m.yaml".into(),
            line: 1,
            api_version: object["apiVersion"].as_str().unwrap().into(),
            kind: object["kind"].as_str().unwrap().into(),
            name: object["metadata"]["name"].as_str().unwrap().into(),
            object,
            hook: None,
        }
    }

    fn deployment() -> Manifest {
        manifest(
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "shop"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "shop"}},
                "template": {"metadata": {"labels": {"app": "shop"}},
                    "spec": {"containers": [{"name": "shop", "image": "shop:v1", "env": [{"name": "A", "value": ""}]}]}}}}),
        )
    }

    #[test]
    fn shaping_labels_objects_and_pods_and_archives_by_scaling_to_zero() {
        let labels = HashMap::from([("berth.name".to_string(), "login".to_string())]);
        let running = shaped(&deployment(), "stg", &labels, &labels, false);
        assert_eq!(running.pointer("/metadata/namespace"), Some(&json!("stg")));
        assert_eq!(
            running.pointer("/metadata/labels/berth.name"),
            Some(&json!("login"))
        );
        assert_eq!(
            running.pointer("/spec/template/metadata/labels/berth.name"),
            Some(&json!("login"))
        );
        assert_eq!(
            running.pointer("/spec/template/metadata/labels/app"),
            Some(&json!("shop"))
        );
        assert_eq!(running.pointer("/spec/replicas"), Some(&json!(2)));
        let archived = shaped(&deployment(), "stg", &labels, &labels, true);
        assert_eq!(archived.pointer("/spec/replicas"), Some(&json!(0)));
        assert_eq!(
            archived.pointer("/metadata/annotations/berth.archived-replicas"),
            Some(&json!("2"))
        );
        assert_eq!(
            summary(&archived),
            json!({"image": "shop:v1", "env": {"A": ""}, "replicas": 2})
        );
    }

    #[test]
    fn a_hand_edit_of_an_applied_field_is_found_and_defaults_are_not() {
        let applied = shaped(
            &deployment(),
            "stg",
            &HashMap::new(),
            &HashMap::new(),
            false,
        );
        let mut live = applied.clone();
        live["status"] = json!({"replicas": 2});
        live["spec"]["strategy"] = json!({"type": "RollingUpdate"});
        live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] =
            json!("IfNotPresent");
        live["spec"]["template"]["spec"]["containers"][0]["env"][0] = json!({"name": "A"});
        assert_eq!(edited(&applied, &live), None);
        live["spec"]["replicas"] = json!(5);
        assert_eq!(
            edited(&applied, &live).as_deref(),
            Some("spec.replicas is 5, berth applies 2")
        );
        live["spec"]["replicas"] = json!(2);
        live["spec"]["template"]["spec"]["containers"][0]["image"] = json!("evil:1");
        assert_eq!(
            edited(&applied, &live).as_deref(),
            Some("spec.template.spec.containers[0].image is evil:1, berth applies shop:v1")
        );
    }

    /// Hostile finding: quantities the server rewrites, and an item inserted ahead of berth's,
    /// made every plan an update that never settled.
    #[test]
    fn quantities_in_the_servers_form_are_not_edits_and_an_inserted_item_shifts_nothing() {
        let applied = json!({"kind": "Deployment", "spec": {"resources": {"cpu": 0.5, "memory": "1024Mi", "other": "1000m"},
            "env": [{"name": "A", "value": "1"}]}});
        let live = json!({"spec": {"resources": {"cpu": "500m", "memory": "1Gi", "other": "1"},
            "env": [{"name": "A", "value": "1"}]}});
        assert_eq!(edited(&applied, &live), None);
        // An item inserted before berth's is matched by name: it is the insertion that is said,
        // not a change of berth's item (issue 20: what others add to berth's lists is drift).
        let inserted = json!({"spec": {"resources": {"cpu": "500m", "memory": "1Gi", "other": "1"},
            "env": [{"name": "INSERTED", "value": "x"}, {"name": "A", "value": "1"}]}});
        assert_eq!(
            edited(&applied, &inserted).as_deref(),
            Some("spec.env INSERTED was added outside berth")
        );
        let changed = json!({"spec": {"resources": {"cpu": "600m", "memory": "1Gi", "other": "1"},
            "env": [{"name": "A", "value": "1"}]}});
        assert_eq!(
            edited(&applied, &changed).as_deref(),
            Some("spec.resources.cpu is 600m, berth applies 0.5")
        );
    }

    #[test]
    fn ports_without_a_protocol_get_tcp_as_the_server_would() {
        let service = manifest(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]}}));
        let applied = shaped(&service, "stg", &HashMap::new(), &HashMap::new(), false);
        assert_eq!(applied["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(applied["spec"]["ports"][1]["protocol"], "UDP");
        let deployment = manifest(json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d"}, "spec": {"template": {"spec": {"containers":
            [{"name": "web", "image": "x", "ports": [{"containerPort": 8080}]}]}}}}));
        let applied = shaped(&deployment, "stg", &HashMap::new(), &HashMap::new(), false);
        assert_eq!(
            applied["spec"]["template"]["spec"]["containers"][0]["ports"][0]["protocol"],
            "TCP"
        );
        assert_eq!(
            applied["spec"]["template"]["spec"].get("initContainers"),
            None
        );
        // A pod spec of the wrong shape is left as written, for the server to refuse.
        for broken in [json!([]), json!("x"), json!({"containers": "x"})] {
            let pod = manifest(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p"}, "spec": broken.clone()}));
            let applied = shaped(&pod, "stg", &HashMap::new(), &HashMap::new(), false);
            assert_eq!(applied["spec"], broken);
        }
    }

    /// Hostile finding: a Secret's edited value was printed in the plan.
    #[test]
    fn a_secrets_values_are_never_compared_or_shown() {
        let secret = manifest(
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
            "type": "Opaque", "stringData": {"pw": "hunter2"}}),
        );
        let applied = shaped(&secret, "stg", &HashMap::new(), &HashMap::new(), false);
        let mut live = applied.clone();
        live.as_object_mut().unwrap().remove("stringData");
        // As the server keeps it: the same value, in `data`.
        live["data"] = json!({"pw": "aHVudGVyMg=="});
        assert_eq!(edited(&applied, &live), None);
        // Changed by hand (issue 19, item 17): shown as a change of that key, values never.
        live["data"] = json!({"pw": "c3RvbGVu"});
        let edit = edited(&applied, &live).unwrap();
        assert_eq!(edit, "data.pw was changed (values are not shown)");
        assert!(!edit.contains("hunter2") && !edit.contains("c3RvbGVu"));
        live["data"] = json!({});
        assert_eq!(
            edited(&applied, &live).as_deref(),
            Some("data.pw was removed")
        );
        live["data"] = json!({"pw": "aHVudGVyMg=="});
        live["type"] = json!("kubernetes.io/tls");
        let edit = edited(&applied, &live).unwrap();
        assert_eq!(edit, "type is kubernetes.io/tls, berth applies Opaque");
    }
}
