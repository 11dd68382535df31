//! Stagings against a real single-node Kubernetes cluster where pods really run
//! (`tests/testbed/kube-up.sh`: Debian's own v1.20.2 build, with a kubelet on the local Docker
//! Engine), driving the real `berth` binary through create, update, hand edit, prune, archive,
//! restore, cleanup and ttl, and observing real pods, claims and NodePorts.
//!
//! Without a cluster these tests skip loudly, unless `BERTH_REQUIRE_KUBE=1` (set by `.ci/run`),
//! which makes them fail instead. When the cluster's binaries are cached (or the variable is set),
//! the first test starts the cluster; tests using it run one at a time. Each test is its own berth
//! instance and deletes its namespaces when it ends.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::cluster::{cluster, fetch, node_port, said};
use crate::support::util::{Repo, crate_root, eventually, stdout};

/// What the NodePort answers, retried while kube-proxy's rules catch up.
/// What `port` serves once it serves `expected`, or after 20 s.
fn served_eventually(port: u16, expected: &str) -> String {
    let started = Instant::now();
    loop {
        let served = fetch(port);
        if served == expected || started.elapsed() > Duration::from_secs(20) {
            return served;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn staging(name: &str, namespace: &str, extra: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Staging\nmetadata: {{name: {name}}}\nspec:\n  namespace: {namespace}\n{extra}"
    )
}

const WEB: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: web
          image: busybox:${tag}
          imagePullPolicy: IfNotPresent
          command: [httpd, -f, -p, \"8080\", -h, /data]
          ports: [{containerPort: 8080}]
          readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
          volumeMounts: [{name: data, mountPath: /data}]
          env:
            - name: TOKEN
              valueFrom: {secretKeyRef: {name: berth-overrides, key: TOKEN}}
      volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: ${overrides.NODE_PORT}, protocol: TCP}]
";

const CLAIM: &str = "apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec:
  storageClassName: ${overrides.CLASS}
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Mi}}
";

const EXTRA: &str = "apiVersion: v1
kind: ConfigMap
metadata: {name: extra}
data: {greeting: \"${overrides.GREETING}\"}
";

#[test]
fn a_staging_lives_through_create_update_hand_edit_prune_archive_restore_and_cleanup() {
    let Some(cluster) = cluster() else { return };
    let name = &cluster.instance.name;
    let ns = format!("{name}-shop");
    let port = node_port(name);
    // A volume on the host for the claim (no provisioner here), with the page the pods serve.
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("index.html"), "kept across archive\n").unwrap();
    let pv = format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {name}-pv\n  labels: {{berth.instance: {name}}}\nspec:\n  capacity: {{storage: 1Mi}}\n  accessModes: [ReadWriteOnce]\n  storageClassName: {name}\n  persistentVolumeReclaimPolicy: Retain\n  hostPath: {{path: {}}}\n",
        volume.path().display()
    );
    let pv_file = volume.path().join("pv.yaml");
    std::fs::write(&pv_file, pv).unwrap();
    assert!(
        cluster
            .kubectl(&["apply", "-f", pv_file.to_str().unwrap()])
            .status
            .success()
    );
    let descriptor = |tag: &str, state: &str| {
        staging(
            "shop",
            &ns,
            &format!(
                "  state: {state}\n  tag: {tag}\n  manifests: shop\n  overrides:\n    app: {{GREETING: hello, NODE_PORT: \"{port}\", CLASS: {name}}}\n    secret: {{TOKEN: {{env: BERTH_IT_TOKEN}}}}\n"
            ),
        )
    };
    let repo = Repo::new();
    repo.write("shop.yaml", descriptor("latest", "running"))
        .write("shop/web.yaml", WEB)
        .write("shop/claim.yaml", CLAIM)
        .write("shop/extra.yaml", EXTRA);

    // Create: namespace, secret, objects; pods become ready and the NodePort answers.
    let created = cluster.apply(repo.path(), &[]);
    assert!(created.status.success(), "{}", said(&created));
    assert!(
        !said(&created).contains("s3cr3t"),
        "a secret value was shown"
    );
    assert_eq!(fetch(port), "kept across archive");
    assert_eq!(
        cluster.get(&ns, "configmap/extra", "{.data.greeting}"),
        "hello"
    );
    assert_eq!(
        cluster.get(&ns, "deployment/web", "{.metadata.labels.berth\\.instance}"),
        *name
    );
    let token = cluster.get(&ns, "secret/berth-overrides", "{.data.TOKEN}");
    assert_eq!(
        token, "czNjcjN0LXQwa2VuLXZhbHVl",
        "the Secret holds the override"
    );
    assert!(cluster.plan(repo.path()).contains("1 unchanged"));

    // Update: a new tag rolls the pods out to the new image.
    let tag = format!("{name}-v2");
    crate::support::engine::docker(&["tag", "busybox:latest", &format!("busybox:{tag}")]);
    repo.write("shop.yaml", descriptor(&tag, "running"));
    let plan = cluster.plan(repo.path());
    assert!(
        plan.contains(&format!(
            "Deployment/web: image changed: busybox:latest→busybox:{tag}"
        )),
        "{plan}"
    );
    let updated = cluster.apply(repo.path(), &[]);
    assert!(updated.status.success(), "{}", said(&updated));
    assert_eq!(
        cluster.get(
            &ns,
            "deployment/web",
            "{.status.updatedReplicas} {.status.readyReplicas}"
        ),
        "1 1",
        "apply --wait returns when the rollout is done"
    );
    eventually("the old pod goes", Duration::from_secs(90), || {
        cluster.get(&ns, "pods", "{.items[*].spec.containers[0].image}") == format!("busybox:{tag}")
    });
    assert_eq!(fetch(port), "kept across archive");

    // A hand edit is shown and taken back.
    assert!(
        cluster
            .kubectl(&["scale", "-n", &ns, "deployment/web", "--replicas=2"])
            .status
            .success()
    );
    let plan = cluster.plan(repo.path());
    assert!(
        plan.contains("Deployment/web: edited outside berth (spec.replicas is 2, berth applies 1)"),
        "{plan}"
    );
    let taken = cluster.apply(repo.path(), &[]);
    assert!(taken.status.success(), "{}", said(&taken));
    assert_eq!(cluster.get(&ns, "deployment/web", "{.spec.replicas}"), "1");

    // Prune: an object dropped from the manifests is deleted.
    std::fs::remove_file(repo.path().join("shop/extra.yaml")).unwrap();
    assert!(
        cluster
            .plan(repo.path())
            .contains("ConfigMap/extra removed")
    );
    let pruned = cluster.apply(repo.path(), &[]);
    assert!(pruned.status.success(), "{}", said(&pruned));
    assert!(!cluster.exists(&ns, "configmap/extra"));

    // Archive: pods go, the claim and its data stay.
    repo.write("shop.yaml", descriptor(&tag, "archived"));
    let archived = cluster.apply(repo.path(), &[]);
    assert!(archived.status.success(), "{}", said(&archived));
    // The summary counts it (issue 20, item 9).
    assert!(
        said(&archived).contains(" unchanged, 1 archived; "),
        "{}",
        said(&archived)
    );
    eventually("the pods terminate", Duration::from_secs(90), || {
        cluster
            .get(&ns, "pods", "{.items[*].metadata.name}")
            .is_empty()
    });
    assert_eq!(cluster.get(&ns, "pvc/data", "{.status.phase}"), "Bound");
    assert_eq!(cluster.get(&ns, "deployment/web", "{.spec.replicas}"), "0");
    assert_eq!(
        cluster.get(
            &ns,
            "deployment/web",
            "{.metadata.annotations.berth\\.archived-replicas}"
        ),
        "1"
    );
    assert!(cluster.plan(repo.path()).contains("1 unchanged"));

    // Restore: the pods come back, with the data.
    repo.write("shop.yaml", descriptor(&tag, "running"));
    assert!(cluster.plan(repo.path()).contains("restore"));
    let restored = cluster.apply(repo.path(), &[]);
    assert!(restored.status.success(), "{}", said(&restored));
    assert!(
        said(&restored).contains(" unchanged, 1 restored; "),
        "{}",
        said(&restored)
    );
    assert_eq!(fetch(port), "kept across archive");

    // Stop: scaled to zero like an archive, but with no ttl to run out; start brings it back.
    repo.write("shop.yaml", descriptor(&tag, "stopped"));
    assert!(cluster.plan(repo.path()).contains("1 to stop"));
    let stopped = cluster.apply(repo.path(), &[]);
    assert!(stopped.status.success(), "{}", said(&stopped));
    assert_eq!(cluster.get(&ns, "deployment/web", "{.spec.replicas}"), "0");
    let marks = stdout(&cluster.kubectl(&[
        "get",
        "namespace",
        &ns,
        "-o",
        "jsonpath={.metadata.annotations.berth\\.stopped-at}|{.metadata.annotations.berth\\.archived-at}",
    ]));
    let marks = marks.trim();
    assert!(
        marks.len() > 1 && marks.ends_with('|'),
        "stopped, not archived: {marks}"
    );
    let plan = cluster.plan(repo.path());
    assert!(plan.contains("1 unchanged"), "{plan}");
    repo.write("shop.yaml", descriptor(&tag, "running"));
    assert!(cluster.plan(repo.path()).contains("1 to start"));
    let started = cluster.apply(repo.path(), &[]);
    assert!(started.status.success(), "{}", said(&started));
    assert_eq!(fetch(port), "kept across archive");

    // Cleanup: removed from the repo (its manifests too, or berth would ask what they are), with
    // prune, the namespace is deleted and gone.
    std::fs::remove_file(repo.path().join("shop.yaml")).unwrap();
    std::fs::remove_dir_all(repo.path().join("shop")).unwrap();
    let kept = cluster.apply(repo.path(), &[]);
    assert!(kept.status.success(), "{}", said(&kept));
    assert!(
        cluster.exists(&ns, "deployment/web"),
        "without prune nothing is deleted"
    );
    // It is all this instance owns: a prune alone holds it (issue 19, item 7), and says so.
    let held = cluster.apply(repo.path(), &["--prune"]);
    assert!(held.status.success(), "{}", said(&held));
    assert!(said(&held).contains("deletes held: "), "{}", said(&held));
    assert!(
        cluster.exists(&ns, "deployment/web"),
        "held, nothing deleted"
    );
    let cleaned = cluster.apply(repo.path(), &["--prune", "--allow-empty"]);
    assert!(cleaned.status.success(), "{}", said(&cleaned));
    assert!(
        !cluster.kubectl(&["get", "namespace", &ns]).status.success(),
        "the namespace is gone when apply returns"
    );
    crate::support::engine::docker(&["rmi", &format!("busybox:{tag}")]);
}

#[test]
fn an_archived_staging_past_its_ttl_is_cleaned_up_and_not_made_again() {
    let Some(cluster) = cluster() else { return };
    let ns = format!("{}-ttl", cluster.instance.name);
    let repo = Repo::new();
    let descriptor = |state: &str| {
        staging(
            "old",
            &ns,
            &format!(
                "  state: {state}\n  ttl: 2s\n  tag: x\n  manifests: m\n  overrides: {{app: {{GREETING: hi}}}}\n"
            ),
        )
    };
    repo.write("old.yaml", descriptor("archived"))
        .write("m/extra.yaml", EXTRA);
    let archived = cluster.apply(repo.path(), &[]);
    assert!(archived.status.success(), "{}", said(&archived));
    assert!(cluster.exists(&ns, "configmap/extra"));
    std::thread::sleep(Duration::from_secs(3));
    let plan = cluster.plan(repo.path());
    assert!(plan.contains("longer than its ttl: cleaned up"), "{plan}");
    // No --prune: the user asked for the cleanup with the ttl.
    let expired = cluster.apply(repo.path(), &[]);
    assert!(expired.status.success(), "{}", said(&expired));
    assert!(
        !cluster.exists(&ns, "configmap/extra"),
        "cleaned up, volumes and all"
    );
    let plan = cluster.plan(repo.path());
    assert!(
        plan.contains("cleaned up at") && plan.contains("1 unchanged"),
        "{plan}"
    );
    // Running again makes it anew.
    repo.write("old.yaml", descriptor("running"));
    let made = cluster.apply(repo.path(), &[]);
    assert!(made.status.success(), "{}", said(&made));
    assert_eq!(
        cluster.get(&ns, "configmap/extra", "{.data.greeting}"),
        "hi"
    );
}

/// A repo with one staging `shop` in `ns` whose manifests hold a ConfigMap `settings`.
fn shop_with_settings(ns: &str) -> Repo {
    let repo = Repo::new();
    repo.write(
        "shop.yaml",
        staging("shop", ns, "  tag: x\n  manifests: shop\n"),
    )
    .write(
        "shop/settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {level: info}\n",
    );
    repo
}

/// Issue 19, item 16: the server's dry run covers a staging made now too: an object the server
/// refuses fails the staging before any other object of it is made.
#[test]
fn a_new_staging_with_an_object_the_server_refuses_makes_none_of_its_objects() {
    let Some(cluster) = cluster() else { return };
    let ns = format!("{}-refused", cluster.instance.name);
    let repo = shop_with_settings(&ns);
    repo.write(
        "shop/web.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: -1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: busybox:latest}]}\n",
    );
    let output = cluster.apply(repo.path(), &[]);
    let text = said(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("a dry run found it"), "{text}");
    assert!(text.contains("replicas"), "{text}");
    assert!(
        !cluster.exists(&ns, "configmap/settings"),
        "an object was made before the refusal: {text}"
    );
}

/// Issue 19, item 20: a staging whose namespace a finalizer holds fails its cleanup with the
/// server's reason, soon, while the rest of the apply goes on; once the finalizer is gone, the
/// next apply finishes the cleanup.
#[test]
fn a_staging_held_by_a_finalizer_fails_its_cleanup_and_holds_nothing_else() {
    let Some(cluster) = cluster() else { return };
    let name = &cluster.instance.name;
    let (stuck, other) = (format!("{name}-stuck"), format!("{name}-other"));
    let repo = Repo::new();
    repo.write(
        "stuck.yaml",
        staging("stuck", &stuck, "  tag: x\n  manifests: stuck\n"),
    )
    .write(
        "stuck/held.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held\n  finalizers: [example.com/hold]\ndata: {a: b}\n",
    );
    let made = cluster.apply(repo.path(), &[]);
    assert!(made.status.success(), "{}", said(&made));

    std::fs::remove_file(repo.path().join("stuck.yaml")).unwrap();
    std::fs::remove_dir_all(repo.path().join("stuck")).unwrap();
    repo.write(
        "other.yaml",
        staging("other", &other, "  tag: x\n  manifests: other\n"),
    )
    .write(
        "other/c.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n",
    );
    let started = Instant::now();
    let output = cluster.apply(repo.path(), &["--prune", "--allow-empty"]);
    let took = started.elapsed();
    let text = said(&output);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains(&format!("namespace {stuck} cannot be deleted")),
        "{text}"
    );
    assert!(text.contains("example.com/hold"), "{text}");
    assert!(cluster.exists(&other, "configmap/c"), "{text}");
    assert!(
        took < Duration::from_secs(120),
        "the stuck cleanup held the apply for {took:?}"
    );

    let released = cluster.kubectl(&[
        "patch",
        "configmap",
        "held",
        "-n",
        &stuck,
        "--type=merge",
        "-p",
        "{\"metadata\":{\"finalizers\":null}}",
    ]);
    assert!(released.status.success(), "{}", said(&released));
    let output = cluster.apply(repo.path(), &["--prune", "--allow-empty"]);
    assert!(output.status.success(), "{}", said(&output));
    let started = Instant::now();
    while cluster.exists(&stuck, "configmap/held") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the cleanup never finished"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Issue 19, item 19: `berth apply --wait` bounds a Kubernetes challenge's rollout as it bounds a
/// container's health on Docker, and a Staging's `readyTimeout` ends the apply's wait for it.
#[test]
fn apply_waits_as_long_as_wait_says_and_a_staging_no_longer_than_its_ready_timeout() {
    let Some(cluster) = cluster() else { return };
    let repo = Repo::new();
    // Never ready: its readiness probe asks a port nothing listens on.
    repo.write(
        "never.yaml",
        crate::support::util::challenge(
            "never",
            "  target: kubernetes\n  command: [sleep, \"3600\"]\n  healthcheck: {tcp: 9999, interval: 1s}\n",
        ),
    );
    let started = Instant::now();
    let output = cluster.berth_with(&["apply", "--wait", "5s"], repo.path(), &[]);
    let took = started.elapsed();
    let text = said(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("not ready after"), "{text}");
    assert!(took < Duration::from_secs(60), "--wait 5s waited {took:?}");

    let ns = format!("{}-slow", cluster.instance.name);
    let repo = Repo::new();
    repo.write(
        "slow.yaml",
        staging("slow", &ns, "  tag: x\n  manifests: slow\n  readyTimeout: 5s\n"),
    )
    .write(
        "slow/web.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n        - name: web\n          image: busybox:latest\n          imagePullPolicy: Never\n          command: [sleep, \"3600\"]\n          readinessProbe: {tcpSocket: {port: 9999}, periodSeconds: 1}\n",
    );
    let started = Instant::now();
    let output = cluster.apply(repo.path(), &[]);
    let took = started.elapsed();
    let text = said(&output);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("not ready within its readyTimeout of 5s"),
        "{text}"
    );
    assert!(
        took < Duration::from_secs(60),
        "readyTimeout 5s waited {took:?}"
    );
}

/// Issue 19, item 22: the namespace's `berth.inventory` annotation (the kinds berth applied
/// there) deleted or garbled by hand is rebuilt from what carries berth's labels, so a kind the
/// manifests drop later is still pruned, never leaked.
#[test]
fn a_lost_inventory_is_rebuilt_and_a_dropped_kind_is_still_pruned() {
    let Some(cluster) = cluster() else { return };
    let ns = format!("{}-inventory", cluster.instance.name);
    let repo = shop_with_settings(&ns);
    repo.write(
        "shop/svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: shop}\nspec:\n  selector: {app: shop}\n  ports: [{port: 80}]\n",
    );
    let made = cluster.apply(repo.path(), &[]);
    assert!(made.status.success(), "{}", said(&made));
    assert!(cluster.exists(&ns, "service/shop"));
    for garbling in ["berth.inventory-", "berth.inventory=not an inventory"] {
        let edited = cluster.kubectl(&["annotate", "--overwrite", "namespace", &ns, garbling]);
        assert!(edited.status.success(), "{}", said(&edited));
    }
    std::fs::remove_file(repo.path().join("shop/svc.yaml")).unwrap();
    let pruned = cluster.apply(repo.path(), &["--prune"]);
    assert!(pruned.status.success(), "{}", said(&pruned));
    assert!(!cluster.exists(&ns, "service/shop"), "{}", said(&pruned));
    assert!(cluster.exists(&ns, "configmap/settings"));
    let inventory = cluster.get(
        &ns,
        &format!("namespace/{ns}"),
        "{.metadata.annotations.berth\\.inventory}",
    );
    assert!(
        inventory.contains("v1/ConfigMap"),
        "written back: {inventory}"
    );
}

/// A challenge whose Service the API server refuses (its NodePort is another Service's) leaves
/// nothing behind: the dry run of every object comes before the first write, so no Deployment is
/// made without its Service, and the failure names the port.
#[test]
fn a_challenge_whose_service_is_refused_makes_no_deployment() {
    let Some(cluster) = cluster() else { return };
    let name = cluster.instance.name.clone();
    let foreign = format!("{name}-squatter");
    cluster.namespace_to_clean(&foreign);
    let port = node_port(&name);
    let squatter = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: squatter, namespace: {foreign}}}\nspec:\n  type: NodePort\n  selector: {{app: none}}\n  ports: [{{port: 80, targetPort: 80, nodePort: {port}, protocol: TCP}}]\n"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), squatter).unwrap();
    let made = cluster.kubectl(&["apply", "-f", file.path().to_str().unwrap()]);
    assert!(made.status.success(), "{}", said(&made));
    let repo = Repo::new();
    repo.write(
        "squatted.yaml",
        format!(
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: squatted}}\nspec:\n  target: kubernetes\n  image: busybox:latest\n  command: [httpd, -f, -p, \"8080\"]\n  ports: [{{container: 8080, host: {port}}}]\n"
        ),
    );
    let output = cluster.berth_with(&["apply", "--wait", "10s"], repo.path(), &[]);
    assert!(!output.status.success(), "{}", said(&output));
    assert!(
        said(&output).contains(&format!("{port}: provided port is already allocated")),
        "{}",
        said(&output)
    );
    let ns = cluster.challenges();
    assert!(
        !cluster.exists(&ns, "deployment/squatted"),
        "a Deployment without its Service"
    );
    assert!(!cluster.exists(&ns, "service/squatted"));
}

/// Issue 19, item 22: a staging whose namespace someone else made is refused by the plan as it
/// is by the apply, and the namespace is left alone. The plan counts it refused, not "to
/// create" (it once did, though the apply was sure to fail it).
#[test]
fn the_plan_says_a_namespace_made_by_someone_else_is_refused() {
    let Some(cluster) = cluster() else { return };
    let name = cluster.instance.name.clone();
    let ns = format!("{name}-foreign");
    cluster.namespace_to_clean(&ns);
    let repo = Repo::new();
    repo.write(
        "shop.yaml",
        staging("shop", &ns, "  tag: x\n  manifests: shop\n"),
    )
    .write(
        "shop/c.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n",
    );
    let planned = cluster.plan(repo.path());
    assert!(
        planned.contains(&format!(
            "Staging/shop  refuse  namespace {ns} exists and was not made by berth"
        )),
        "{planned}"
    );
    assert!(
        planned.contains("0 to create, 0 to update, 0 to delete, 0 unchanged, 1 refused"),
        "{planned}"
    );
    let output = cluster.apply(repo.path(), &[]);
    assert!(!output.status.success(), "{}", said(&output));
    assert!(
        said(&output).contains("was not made by berth"),
        "{}",
        said(&output)
    );
    assert!(!cluster.exists(&ns, "configmap/c"));
}

#[test]
fn an_unknown_kind_or_a_chart_without_helm_fails_only_its_own_staging() {
    let Some(cluster) = cluster() else { return };
    let name = &cluster.instance.name;
    let repo = Repo::new();
    repo.write(
        "good.yaml",
        staging(
            "good",
            &format!("{name}-good"),
            "  tag: x\n  manifests: good\n  overrides: {app: {GREETING: fine}}\n",
        ),
    )
    .write("good/extra.yaml", EXTRA)
    .write(
        "widget.yaml",
        staging(
            "widget",
            &format!("{name}-widget"),
            "  tag: x\n  manifests: widget\n",
        ),
    )
    .write(
        "widget/w.yaml",
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n",
    )
    .write(
        "charted.yaml",
        staging(
            "charted",
            &format!("{name}-chart"),
            "  tag: x\n  chart: chart\n",
        ),
    )
    .write(
        "chart/Chart.yaml",
        "apiVersion: v2\nname: demo\nversion: 0.1.0\n",
    )
    .write(
        "chart/templates/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
    );
    let output = cluster.berth(
        &["apply", "--wait", "30s"],
        repo.path(),
        None,
        Some("/usr/sbin:/usr/bin:/sbin:/bin"),
    );
    let text = said(&output);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("the API server does not serve kind Widget in example.com/v1; install its CustomResourceDefinition"),
        "{text}"
    );
    assert!(text.contains("widget/w.yaml:1"), "{text}");
    assert!(text.contains("helm is not on PATH"), "{text}");
    assert_eq!(
        cluster.get(
            &format!("{name}-good"),
            "configmap/extra",
            "{.data.greeting}"
        ),
        "fine"
    );
    assert!(
        !cluster
            .kubectl(&["get", "namespace", &format!("{name}-widget")])
            .status
            .success(),
        "nothing of a failed staging is applied"
    );
}

#[test]
fn a_chart_is_rendered_by_helm_and_applied_by_berth() {
    let Some(cluster) = cluster() else { return };
    // The test's `helm` is a stand-in over the helm-python-sdk wheel (Helm's own template
    // engine as a library): no helm binary can be downloaded here.
    let bin = tempfile::tempdir().unwrap();
    let shim = Command::new("bash")
        .arg(crate_root().join("tests/testbed/helm-shim.sh"))
        .arg(bin.path())
        .output()
        .expect("bash runs");
    assert!(shim.status.success(), "the helm stand-in: {}", said(&shim));
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );
    let ns = format!("{}-chart", cluster.instance.name);
    let repo = Repo::new();
    repo.write("charted.yaml", staging("charted", &ns, "  tag: v7\n  chart: chart\n  overrides: {app: {LEVEL: debug}}\n"))
        .write("chart/Chart.yaml", "apiVersion: v2\nname: demo\nversion: 0.1.0\n")
        .write("chart/values.yaml", "greeting: hello\n")
        .write(
            "chart/templates/cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-settings\ndata:\n  tag: {{ .Values.tag | quote }}\n  level: {{ .Values.overrides.LEVEL | quote }}\n  greeting: {{ .Values.greeting | quote }}\n  kube: {{ .Capabilities.KubeVersion.Version | quote }}\n  deployments: {{ .Capabilities.APIVersions.Has \"apps/v1/Deployment\" | quote }}\n",
        )
        // As common charts pick a PodDisruptionBudget's version: by the cluster's version. For
        // helm's own default version this is policy/v1, which a 1.20 cluster does not serve.
        .write(
            "chart/templates/pdb.yaml",
            "{{- if semverCompare \">=1.21-0\" .Capabilities.KubeVersion.Version }}\napiVersion: policy/v1\n{{- else }}\napiVersion: policy/v1beta1\n{{- end }}\nkind: PodDisruptionBudget\nmetadata:\n  name: {{ .Release.Name }}-web\nspec:\n  maxUnavailable: 1\n  selector: {matchLabels: {app: web}}\n",
        );
    let output = cluster.berth(&["apply", "--wait", "30s"], repo.path(), None, Some(&path));
    assert!(output.status.success(), "{}", said(&output));
    let data = cluster.get(
        &ns,
        "configmap/berth-settings",
        "{.data.tag} {.data.level} {.data.greeting}",
    );
    assert_eq!(data, "v7 debug hello");
    // Rendered for the cluster it went to: its version, and what it serves (a kind is in
    // helm's own defaults only as the cluster serves it).
    let kube = cluster.get(
        &ns,
        "configmap/berth-settings",
        "{.data.kube} {.data.deployments}",
    );
    assert!(
        kube.starts_with("v1.20.") && kube.ends_with(" true"),
        "{kube}"
    );
    assert_eq!(
        cluster.get(&ns, "poddisruptionbudget/berth-web", "{.metadata.name}"),
        "berth-web"
    );
    // A change in the chart's templates is an update of the rendered object.
    repo.write("chart/values.yaml", "greeting: changed\n");
    let plan = stdout(&cluster.berth(&["plan"], repo.path(), None, Some(&path)));
    assert!(
        plan.contains("ConfigMap/berth-settings: data changed: greeting"),
        "{plan}"
    );
}

/// With no cluster to ask (a plan for review, `validate`), the Kubernetes version a chart is
/// rendered for is the one named on the command line, as `helm template --kube-version` takes
/// it: a chart that needs a newer cluster says so in the plan.
#[test]
fn a_chart_is_rendered_for_the_kubernetes_version_the_command_line_names() {
    let Some(_instance) = crate::support::engine::engine() else {
        return;
    };
    let (_bin, path) = helm_on_path();
    let repo = Repo::new();
    repo.write(
        "s.yaml",
        staging("charted", "charted", "  chart: chart\n"),
    )
    .write("chart/Chart.yaml", "apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    .write(
        "chart/templates/cm.yaml",
        "{{- if semverCompare \"<1.21-0\" .Capabilities.KubeVersion.Version }}\n{{- fail \"this chart needs Kubernetes 1.21 or later\" }}\n{{- end }}\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n",
    );
    let home = tempfile::tempdir().unwrap();
    let plan = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("plan")
            .args(extra)
            .arg(repo.path())
            .env("PATH", &path)
            .env("HOME", home.path())
            .env_remove("KUBECONFIG")
            .output()
            .expect("berth runs");
        said(&output)
    };
    let old = plan(&["--kube-version", "v1.20.2"]);
    assert!(
        old.contains("this chart needs Kubernetes 1.21 or later"),
        "{old}"
    );
    let new = plan(&["--kube-version", "v1.25.0", "--api-versions", "v1,apps/v1"]);
    assert!(!new.contains("needs Kubernetes"), "{new}");
}

/// A helm stand-in on PATH (a Python program over Helm's own template engine as a library: no
/// helm binary can be downloaded here), and the PATH that finds it.
fn helm_on_path() -> (tempfile::TempDir, String) {
    let bin = tempfile::tempdir().unwrap();
    let shim = Command::new("bash")
        .arg(crate_root().join("tests/testbed/helm-shim.sh"))
        .arg(bin.path())
        .output()
        .expect("bash runs");
    assert!(shim.status.success(), "the helm stand-in: {}", said(&shim));
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );
    (bin, path)
}

/// A chart as charts are written: it reads `image.tag`, `replicaCount` and `ui.message` from its
/// own values, has a `pre-install,pre-upgrade` Job (a migration) and a `test` Pod whose image
/// does not exist, and a `kubeVersion`. The Staging's `values` (with `${tag}` and an override)
/// win over `valuesFiles`, which win over `values.yaml`; the migration runs before the rest, the
/// test pod is never applied or blamed, the plan settles, and a new tag rolls the Deployment.
#[test]
fn a_chart_as_written_reads_its_values_runs_its_hooks_and_leaves_its_tests_out() {
    let Some(cluster) = cluster() else { return };
    let (_bin, path) = helm_on_path();
    let name = format!("{}-shop", cluster.instance.name);
    let ns = name.clone();
    let repo = Repo::new();
    let descriptor = |tag: &str| {
        staging(
            "shop",
            &ns,
            &format!(
                "  tag: \"{tag}\"\n  chart: charts/shop\n  valuesFiles: [values/staging.yaml]\n  values:\n    replicaCount: 2\n    image: {{tag: \"${{tag}}\"}}\n    ui: {{message: \"${{overrides.MESSAGE}}\"}}\n  overrides: {{app: {{MESSAGE: hello from berth}}}}\n"
            ),
        )
    };
    repo.write("shop.yaml", descriptor("latest"))
        .write("values/staging.yaml", "ui:\n  message: from the values file\n  color: teal\n")
        .write(
            "charts/shop/Chart.yaml",
            "apiVersion: v2\nname: shop\nversion: 1.4.0\nappVersion: \"2.1\"\nkubeVersion: \">=1.19.0-0\"\n",
        )
        .write(
            "charts/shop/values.yaml",
            "replicaCount: 1\nimage:\n  repository: busybox\n  tag: \"\"\n  pullPolicy: IfNotPresent\nui:\n  message: from values.yaml\n  color: grey\n",
        )
        .write(
            "charts/shop/templates/_helpers.tpl",
            "{{- define \"shop.fullname\" -}}{{ .Release.Name }}-{{ .Chart.Name }}{{- end -}}\n{{- define \"shop.labels\" -}}\napp.kubernetes.io/name: {{ .Chart.Name }}\napp.kubernetes.io/instance: {{ .Release.Name }}\n{{- end -}}\n",
        )
        .write(
            "charts/shop/templates/deployment.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {{ include \"shop.fullname\" . }}\n  labels:\n    {{- include \"shop.labels\" . | nindent 4 }}\nspec:\n  replicas: {{ .Values.replicaCount }}\n  selector:\n    matchLabels:\n      {{- include \"shop.labels\" . | nindent 6 }}\n  template:\n    metadata:\n      labels:\n        {{- include \"shop.labels\" . | nindent 8 }}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n        - name: shop\n          image: \"{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}\"\n          imagePullPolicy: {{ .Values.image.pullPolicy }}\n          command: [sh, -c, \"sleep 3600\"]\n          env:\n            - name: MESSAGE\n              value: {{ .Values.ui.message | quote }}\n",
        )
        .write(
            "charts/shop/templates/configmap.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ include \"shop.fullname\" . }}-ui\ndata:\n  message: {{ .Values.ui.message | quote }}\n  color: {{ .Values.ui.color | quote }}\n",
        )
        .write(
            "charts/shop/templates/migrate.yaml",
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {{ include \"shop.fullname\" . }}-migrate\n  annotations:\n    \"helm.sh/hook\": pre-install,pre-upgrade\n    \"helm.sh/hook-weight\": \"-5\"\n    \"helm.sh/hook-delete-policy\": before-hook-creation\nspec:\n  backoffLimit: 0\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n        - name: migrate\n          image: \"{{ .Values.image.repository }}:{{ .Values.image.tag }}\"\n          imagePullPolicy: IfNotPresent\n          command: [sh, -c, \"echo migrated\"]\n",
        )
        .write(
            "charts/shop/templates/once.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ include \"shop.fullname\" . }}-once\n  annotations:\n    \"helm.sh/hook\": pre-install\ndata:\n  made: once\n",
        )
        .write(
            "charts/shop/templates/tests/test-connection.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {{ include \"shop.fullname\" . }}-test-connection\n  labels:\n    {{- include \"shop.labels\" . | nindent 4 }}\n  annotations:\n    \"helm.sh/hook\": test\nspec:\n  restartPolicy: Never\n  containers:\n    - name: wget\n      image: busybox:no-such-tag\n      command: [wget, \"{{ include \"shop.fullname\" . }}:80\"]\n",
        );
    let apply =
        |repo: &Repo| cluster.berth(&["apply", "--wait", "90s"], repo.path(), None, Some(&path));
    let output = apply(&repo);
    let text = said(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("ran pre-install hook Job/berth-shop-migrate"),
        "{text}"
    );
    assert_eq!(
        cluster.get(
            &ns,
            "deployment/berth-shop",
            "{.spec.replicas} {.spec.template.spec.containers[0].image}"
        ),
        "2 busybox:latest"
    );
    assert_eq!(
        cluster.get(
            &ns,
            "configmap/berth-shop-ui",
            "{.data.message} {.data.color}"
        ),
        "hello from berth teal"
    );
    assert_eq!(
        cluster.get(&ns, "job/berth-shop-migrate", "{.status.succeeded}"),
        "1"
    );
    assert!(
        !cluster.exists(&ns, "pod/berth-shop-test-connection"),
        "the chart's test pod was applied"
    );
    let plan = stdout(&cluster.berth(&["plan"], repo.path(), None, Some(&path)));
    assert!(
        plan.contains("1 unchanged"),
        "the plan does not settle:\n{plan}"
    );
    let once = cluster.get(&ns, "configmap/berth-shop-once", "{.metadata.uid}");
    assert!(
        !once.is_empty(),
        "the pre-install hook ConfigMap was not made"
    );

    // A new tag reaches the chart through values: the plan says so, and the apply rolls it,
    // running the migration again first.
    let tag = format!("{name}-v2");
    crate::support::engine::docker(&["tag", "busybox:latest", &format!("busybox:{tag}")]);
    repo.write("shop.yaml", descriptor(&tag));
    let plan = stdout(&cluster.berth(&["plan"], repo.path(), None, Some(&path)));
    assert!(
        plan.contains(&format!("image changed: busybox:latest→busybox:{tag}")),
        "{plan}"
    );
    let output = apply(&repo);
    let text = said(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("ran pre-upgrade hook Job/berth-shop-migrate"),
        "{text}"
    );
    // An install-only hook is not made again on an upgrade.
    assert_eq!(
        cluster.get(&ns, "configmap/berth-shop-once", "{.metadata.uid}"),
        once
    );
    assert_eq!(
        cluster.get(
            &ns,
            "deployment/berth-shop",
            "{.spec.template.spec.containers[0].image}"
        ),
        format!("busybox:{tag}")
    );
    cluster.remove_everything();
}

/// An object of a version the server does not serve is refused in the plan, naming the versions
/// it does serve: 1.20 has PodDisruptionBudget in policy/v1beta1 only.
#[test]
fn an_unserved_version_is_refused_in_the_plan_with_the_versions_served() {
    let Some(cluster) = cluster() else { return };
    let ns = format!("{}-pdb", cluster.instance.name);
    let repo = Repo::new();
    repo.write("s.yaml", staging("pdb", &ns, "  manifests: m\n"))
        .write(
            "m/pdb.yaml",
            "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: web}\nspec:\n  minAvailable: 1\n  selector: {matchLabels: {app: web}}\n",
        );
    let plan = cluster.plan(repo.path());
    assert!(
        plan.contains("m/pdb.yaml:1: the API server does not serve PodDisruptionBudget in policy/v1; it serves PodDisruptionBudget in policy/v1beta1: write apiVersion: policy/v1beta1"),
        "{plan}"
    );
    assert!(!cluster.exists(&ns, "poddisruptionbudget/web"));
}

/// A Job's template cannot change in place: the apply says which field and what to do, and with
/// `berth.io/recreate: "true"` the plan says the Job is made again, and the apply does so.
#[test]
fn a_changed_job_template_names_the_field_and_is_made_again_when_asked() {
    let Some(cluster) = cluster() else { return };
    let ns = format!("{}-job", cluster.instance.name);
    let repo = Repo::new();
    let job = |word: &str, annotations: &str| {
        format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: once\n{annotations}spec:\n  backoffLimit: 0\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n        - {{name: m, image: busybox:latest, imagePullPolicy: IfNotPresent, command: [echo, {word}]}}\n"
        )
    };
    repo.write("s.yaml", staging("job", &ns, "  manifests: m\n"))
        .write("m/job.yaml", job("first", ""));
    let output = cluster.apply(repo.path(), &[]);
    assert!(output.status.success(), "{}", said(&output));
    repo.write("m/job.yaml", job("second", ""));
    let output = cluster.apply(repo.path(), &[]);
    let text = said(&output);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("Job/once: the API server refused: spec.template cannot change in place (the field is immutable); add the annotation berth.io/recreate: \"true\""),
        "{text}"
    );
    repo.write(
        "m/job.yaml",
        job("second", "  annotations: {berth.io/recreate: \"true\"}\n"),
    );
    let plan = cluster.plan(repo.path());
    assert!(
        plan.contains("Job/once: deleted and made again (berth.io/recreate)"),
        "{plan}"
    );
    let output = cluster.apply(repo.path(), &[]);
    assert!(output.status.success(), "{}", said(&output));
    assert_eq!(
        cluster.get(
            &ns,
            "job/once",
            "{.spec.template.spec.containers[0].command[1]}"
        ),
        "second"
    );
    cluster.remove_everything();
}

/// Server-side apply leaves what another manager added: `kubectl set env FOO=bar` on a staging's
/// Deployment is shown by the plan and taken out by the apply, and then the plan settles.
#[test]
fn an_env_variable_added_by_hand_is_shown_and_taken_back() {
    let Some(cluster) = cluster() else { return };
    let ns = format!("{}-setenv", cluster.instance.name);
    let repo = Repo::new();
    repo.write("s.yaml", staging("setenv", &ns, "  manifests: m\n"))
        .write(
            "m/web.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n        - name: web\n          image: busybox:latest\n          imagePullPolicy: IfNotPresent\n          command: [sleep, \"3600\"]\n          env: [{name: LEVEL, value: info}]\n",
        );
    let output = cluster.apply(repo.path(), &[]);
    assert!(output.status.success(), "{}", said(&output));
    let set = cluster.kubectl(&["set", "env", "-n", &ns, "deployment/web", "FOO=bar"]);
    assert!(set.status.success(), "{}", said(&set));
    let plan = cluster.plan(repo.path());
    assert!(
        plan.contains("spec.template.spec.containers[web].env FOO was added outside berth"),
        "{plan}"
    );
    let output = cluster.apply(repo.path(), &[]);
    let text = said(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("took back Deployment/web"), "{text}");
    assert_eq!(
        cluster.get(
            &ns,
            "deployment/web",
            "{.spec.template.spec.containers[0].env[*].name}"
        ),
        "LEVEL"
    );
    assert!(cluster.plan(repo.path()).contains("1 unchanged"));
    cluster.remove_everything();
}

/// A failing `pre-install` hook stops the staging before anything else of it is applied, and
/// says which Job failed and why.
#[test]
fn a_failing_pre_install_hook_applies_nothing_after_it_and_says_why() {
    let Some(cluster) = cluster() else { return };
    let ns = format!("{}-hookfail", cluster.instance.name);
    let repo = Repo::new();
    repo.write("s.yaml", staging("hookfail", &ns, "  manifests: m\n"))
        .write(
            "m/job.yaml",
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: migrate\n  annotations: {\"helm.sh/hook\": pre-install}\nspec:\n  backoffLimit: 0\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n        - {name: m, image: busybox:latest, imagePullPolicy: IfNotPresent, command: [sh, -c, \"echo the schema is locked; exit 4\"]}\n",
        )
        .write(
            "m/cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: after}\ndata: {a: b}\n",
        );
    let output = cluster.apply(repo.path(), &[]);
    let text = said(&output);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("pre-install hook Job/migrate failed"),
        "{text}"
    );
    // Its last log lines follow where the cluster serves logs; this test cluster's API server
    // never dials the kubelet (tests/testbed/kube-up.sh), so here the exit code is what is said.
    assert!(
        text.contains("(pod migrate-") && text.contains(": exit code 4"),
        "the failed pod's exit code is not said: {text}"
    );
    assert!(text.contains("nothing after it was applied"), "{text}");
    assert!(
        !cluster.exists(&ns, "configmap/after"),
        "an object was applied after a failed pre-install hook"
    );
    cluster.remove_everything();
}

#[test]
fn a_crash_looping_pod_makes_its_staging_degraded_with_the_reason() {
    let Some(cluster) = cluster() else { return };
    let ns = format!("{}-crash", cluster.instance.name);
    let repo = Repo::new();
    repo.write("crash.yaml", staging("crash", &ns, "  tag: latest\n  manifests: m\n"))
        .write(
            "m/d.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: crash}\nspec:\n  selector: {matchLabels: {app: crash}}\n  template:\n    metadata: {labels: {app: crash}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n        - {name: main, image: \"busybox:${tag}\", imagePullPolicy: IfNotPresent, command: [sh, -c, \"echo boom; exit 3\"]}\n",
        );
    let output = cluster.apply(repo.path(), &[]);
    let text = said(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("Deployment/crash is Degraded"), "{text}");
    assert!(
        text.contains("CrashLoopBackOff") && text.contains("last exit code 3"),
        "{text}"
    );
}

#[test]
fn an_api_server_that_stops_answering_is_transient_and_running_stagings_stay() {
    let Some(cluster) = cluster() else { return };
    // berth talks to the API server through a TCP front the test cuts, as if it stopped.
    let (proxy, fronted) = cluster.fronted();
    let ns = format!("{}-cut", cluster.instance.name);
    let repo = Repo::new();
    repo.write(
        "cut.yaml",
        staging(
            "cut",
            &ns,
            "  tag: x\n  manifests: m\n  overrides: {app: {GREETING: up}}\n",
        ),
    )
    .write("m/extra.yaml", EXTRA);
    let berth = |args: &[&str]| cluster.berth(args, repo.path(), Some(fronted.path()), None);
    let made = berth(&["apply"]);
    assert!(made.status.success(), "{}", said(&made));
    proxy.set_open(false);
    // A challenge added meanwhile still goes to the Docker Engine: one engine down holds back
    // only its own kinds.
    repo.write(
        "side.yaml",
        crate::support::util::challenge("side", "  command: [sleep, \"3600\"]\n"),
    );
    let gone = format!(
        "the Kubernetes API server at https://127.0.0.1:{}/ is not answering",
        proxy.port
    );
    let plan = said(&berth(&["plan"]));
    assert!(
        plan.contains("Staging/cut") && plan.contains(&gone),
        "{plan}"
    );
    assert!(plan.contains("Challenge/side  create"), "{plan}");
    let output = berth(&["apply"]);
    let text = said(&output);
    assert!(!output.status.success(), "a staging not applied: {text}");
    assert!(text.contains(&gone) && !text.contains("Failure"), "{text}");
    let side = crate::support::engine::docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=berth.instance={}", cluster.instance.name),
        "--filter",
        "label=berth.name=side",
    ]);
    assert!(!side.is_empty(), "the challenge runs: {text}");
    assert_eq!(
        cluster.get(&ns, "configmap/extra", "{.data.greeting}"),
        "up",
        "left alone"
    );
    proxy.set_open(true);
    let back = berth(&["plan"]);
    assert!(
        back.status.success() && stdout(&back).contains("2 unchanged"),
        "{}",
        said(&back)
    );
}

#[test]
fn validate_places_each_manifest_problem_at_its_file_line_and_column() {
    let repo = Repo::new();
    repo.write("s.yaml", staging("s", "stg", "  tag: x\n  manifests: m\n  overrides:\n    secret: {PW: {env: NOPE}}\n"))
        .write(
            "m/a.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: other}\ndata:\n  x: ${overrides.MISSING}\n  y: ${overrides.PW}\n",
        )
        .write("m/b.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n---\nkind: Service\nmetadata: {name: s}\n");
    let output = crate::support::util::berth(&["validate", repo.path().to_str().unwrap()]);
    let text = stdout(&output);
    assert!(!output.status.success(), "{text}");
    for expected in [
        "m/a.yaml:5:6: Staging/s: ${overrides.MISSING} is not defined",
        "m/a.yaml:6:6: Staging/s: ${overrides.PW} is a secret override",
        "m/b.yaml:2:7: Staging/s: Namespace is cluster-scoped",
        "m/b.yaml:5:1: Staging/s: the object has no apiVersion",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // Variables are checked before the document is read, so the namespace is reported once the
    // variables are fixed.
    repo.write(
        "m/a.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: other}\n",
    );
    let text = stdout(&crate::support::util::berth(&[
        "validate",
        repo.path().to_str().unwrap(),
    ]));
    assert!(
        text.contains("m/a.yaml:3:32: Staging/s: the object is in namespace other, but the staging's namespace is stg"),
        "{text}"
    );
}

#[test]
fn the_agent_follows_a_repo_of_stagings_and_commits_their_phases() {
    use crate::support::agent::{Agent, applied};
    use crate::support::gitserver::Origin;
    let Some(cluster) = cluster() else { return };
    let ns = format!("{}-agent", cluster.instance.name);
    let descriptor = |state: &str| {
        staging(
            "shop",
            &ns,
            &format!(
                "  state: {state}\n  tag: latest\n  manifests: m\n  overrides: {{app: {{GREETING: hi}}}}\n"
            ),
        )
    };
    let sleeper = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\nspec:\n  selector: {matchLabels: {app: a}}\n  template:\n    metadata: {labels: {app: a}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n        - {name: main, image: \"busybox:${tag}\", imagePullPolicy: IfNotPresent, command: [sleep, \"3600\"]}\n";
    let origin = Origin::new(&[
        ("shop.yaml", &descriptor("running")),
        ("m/app.yaml", sleeper),
        ("m/extra.yaml", EXTRA),
    ]);
    let first = origin.bare_git(&["rev-parse", "main"]);
    let config = format!(
        "prune: true\npruneAllowEmpty: true\nkube: {{kubeconfig: {}}}\n",
        cluster.kubeconfig.display()
    );
    // The agent follows the bare repo by path, so a commit is a trigger.
    let mut agent = Agent::configure(
        &cluster.instance.name,
        origin.bare().to_str().unwrap(),
        "",
        &config,
    );
    agent.spawn();
    let status = || {
        origin
            .show("berth-status:status/staging/shop.yaml")
            .unwrap_or_default()
    };
    agent.wait_for("the staging running and healthy in status", || {
        applied(&origin, &first)
            && status().contains("phase: Running")
            && status().contains("\nhealth: Healthy\n")
    });
    assert_eq!(
        cluster.get(&ns, "deployment/app", "{.status.readyReplicas}"),
        "1",
        "{}",
        status()
    );
    let archive = origin.commit(
        &[("shop.yaml", Some(&descriptor("archived")))],
        "Archive the staging",
    );
    agent.wait_for("the staging archived in status", || {
        applied(&origin, &archive) && status().contains("phase: Archived")
    });
    assert_eq!(cluster.get(&ns, "deployment/app", "{.spec.replicas}"), "0");
    assert_eq!(
        cluster.get(&ns, "configmap/extra", "{.data.greeting}"),
        "hi",
        "kept while archived"
    );
    let removed = origin.commit(
        &[
            ("shop.yaml", None),
            ("m/app.yaml", None),
            ("m/extra.yaml", None),
        ],
        "Clean up the staging",
    );
    agent.wait_for("the staging gone, status and all", || {
        applied(&origin, &removed)
            && origin
                .show("berth-status:status/staging/shop.yaml")
                .is_none()
    });
    assert!(!cluster.kubectl(&["get", "namespace", &ns]).status.success());
}

/// Hostile finding: controllers copy berth's labels (a Deployment's onto its ReplicaSet and
/// pods), and with a bare Pod in the manifests every apply pruned the Deployment's pods.
#[test]
fn objects_controllers_make_with_berths_labels_are_never_pruned() {
    let Some(cluster) = cluster() else { return };
    let ns = format!("{}-copies", cluster.instance.name);
    let sleeper = |kind_line: &str| {
        format!(
            "{kind_line}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n        - {{name: main, image: \"busybox:${{tag}}\", imagePullPolicy: IfNotPresent, command: [sleep, \"3600\"]}}\n"
        )
    };
    let repo = Repo::new();
    repo.write("s.yaml", staging("copies", &ns, "  tag: latest\n  manifests: m\n"))
        .write(
            "m/app.yaml",
            sleeper("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\nspec:\n  selector: {matchLabels: {app: a}}\n  template:\n    metadata: {labels: {app: a}}"),
        )
        .write(
            "m/lone.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: lone}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n    - {name: main, image: \"busybox:${tag}\", imagePullPolicy: IfNotPresent, command: [sleep, \"3600\"]}\n",
        );
    let first = cluster.apply(repo.path(), &[]);
    assert!(first.status.success(), "{}", said(&first));
    let pods = cluster.get(&ns, "pods", "{.items[*].metadata.name}");
    assert_eq!(pods.split_whitespace().count(), 2, "{pods}");
    let plan = cluster.plan(repo.path());
    assert!(plan.contains("1 unchanged"), "{plan}");
    let again = cluster.apply(repo.path(), &[]);
    assert!(again.status.success(), "{}", said(&again));
    assert_eq!(
        cluster.get(&ns, "pods", "{.items[*].metadata.name}"),
        pods,
        "no pod was pruned"
    );
}

/// A Staging whose tag comes from a Pipeline waits until it has produced an image, then runs
/// it, and rolls out when a new commit produces another.
#[test]
fn a_staging_takes_the_tag_a_pipeline_produced_and_rolls_to_the_next() {
    let Some(cluster) = cluster() else { return };
    let name = cluster.instance.name.clone();
    let ns = format!("{name}-built");
    let port = node_port(&format!("{name}-built"));
    let repo = Repo::new();
    let git = |args: &[&str]| {
        crate::support::net::git(repo.path(), args);
    };
    repo.write(
        "site.yaml",
        format!(
            "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {{name: site}}\nspec:\n  context: site\n  image: busybox:latest\n  steps:\n    - {{name: render, run: \"mkdir -p www && cp page.txt www/index.html\"}}\n  produces: \"{name}-site:{{commit}}\"\n"
        ),
    )
    .write("site/page.txt", "built one\n")
    .write("site/Dockerfile", "FROM busybox:latest\nCOPY www /www\n")
    .write(
        "shop.yaml",
        staging("shop", &ns, &format!("  tag: {{fromPipeline: site}}\n  manifests: m\n  overrides: {{app: {{NODE_PORT: \"{port}\"}}}}\n")),
    )
    .write(
        "m/web.yaml",
        format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n        - name: web\n          image: {name}-site:${{tag}}\n          imagePullPolicy: IfNotPresent\n          command: [httpd, -f, -p, \"8080\", -h, /www]\n          readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  type: NodePort\n  selector: {{app: web}}\n  ports: [{{port: 80, targetPort: 8080, nodePort: ${{overrides.NODE_PORT}}, protocol: TCP}}]\n"),
    );
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "-A"]);
    git(&["commit", "-qm", "one"]);
    let plan = cluster.plan(repo.path());
    assert!(
        plan.contains("Staging/shop   wait    waits for Pipeline/site to produce an image"),
        "{plan}"
    );
    let first = cluster.apply(repo.path(), &[]);
    assert!(first.status.success(), "{}", said(&first));
    assert_eq!(fetch(port), "built one");
    repo.write("site/page.txt", "built two\n");
    git(&["commit", "-qam", "two"]);
    let second = cluster.apply(repo.path(), &[]);
    assert!(second.status.success(), "{}", said(&second));
    assert!(
        said(&second).contains("Staging/shop   update"),
        "{}",
        said(&second)
    );
    // The rollout is complete when apply returns; kube-proxy may route to the old pod a moment
    // longer, while it goes.
    assert_eq!(served_eventually(port, "built two"), "built two");
}

/// A challenge on Kubernetes with an admin bot that a Pipeline builds (a cluster cannot build
/// from the repo): the bot's sidecar runs the product's tag, and the pod rolls when the bot is
/// built again.
#[test]
fn a_challenge_on_kubernetes_runs_a_sidecar_a_pipeline_built_and_rolls_when_it_is_built_again() {
    let Some(cluster) = cluster() else { return };
    let name = cluster.instance.name.clone();
    let port = node_port(&format!("{name}-bot"));
    let repo = Repo::new();
    let git = |args: &[&str]| {
        crate::support::net::git(repo.path(), args);
    };
    // The main container serves what the bot serves it when the pod starts.
    let script = "mkdir -p /w && until wget -qO /w/index.html http://127.0.0.1:9090/index.html; do sleep 0.2; done; exec httpd -f -p 8080 -h /w";
    repo.write(
        "bot.yaml",
        format!(
            "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {{name: bot}}\nspec:\n  context: bot\n  image: busybox:latest\n  steps:\n    - {{name: render, run: \"mkdir -p www && cp page.txt www/index.html\"}}\n  produces: \"{name}-bot:{{commit}}\"\n"
        ),
    )
    .write("bot/page.txt", "bot one\n")
    .write("bot/Dockerfile", "FROM busybox:latest\nCOPY www /www\n")
    .write(
        "web.yaml",
        crate::support::util::challenge(
            "web",
            &format!(
                "  target: kubernetes\n  command: [sh, -c, '{script}']\n  ports: [{{container: 8080, host: {port}}}]\n  healthcheck: {{tcp: 8080, interval: 1s}}\n  sidecars:\n    - name: admin\n      image: {{fromPipeline: bot}}\n      command: [httpd, -f, -p, \"9090\", -h, /www]\n"
            ),
        ),
    );
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "-A"]);
    git(&["commit", "-qm", "one"]);
    let first = cluster.berth_with(&["apply", "--wait", "90s"], repo.path(), &[]);
    assert!(first.status.success(), "{}", said(&first));
    assert_eq!(served_eventually(port, "bot one"), "bot one");
    let ns = cluster.challenges();
    let image = cluster.get(
        &ns,
        "deployment/web",
        "{.spec.template.spec.containers[1].image}",
    );
    assert!(
        image.starts_with(&format!("{name}-bot:")),
        "the sidecar runs the product by its tag: {image}"
    );

    repo.write("bot/page.txt", "bot two\n");
    git(&["commit", "-qam", "two"]);
    let second = cluster.berth_with(&["apply", "--wait", "90s"], repo.path(), &[]);
    assert!(second.status.success(), "{}", said(&second));
    assert!(
        said(&second).contains("Challenge/web  update"),
        "{}",
        said(&second)
    );
    assert_eq!(served_eventually(port, "bot two"), "bot two");
    let pruned = cluster.berth_with(
        &["apply", "--prune", "--allow-empty"],
        Repo::new().path(),
        &[],
    );
    assert!(pruned.status.success(), "{}", said(&pruned));
}

/// Hostile finding: an object made by hand with a manifest's name was adopted, and deleted with
/// all its data when the manifest later dropped it.
#[test]
fn an_object_made_by_hand_is_never_adopted() {
    let Some(cluster) = cluster() else { return };
    let ns = format!("{}-hand", cluster.instance.name);
    let repo = Repo::new();
    repo.write(
        "s.yaml",
        staging(
            "hand",
            &ns,
            "  tag: x\n  manifests: m\n  overrides: {app: {GREETING: hi}}\n",
        ),
    )
    .write("m/extra.yaml", EXTRA);
    let first = cluster.apply(repo.path(), &[]);
    assert!(first.status.success(), "{}", said(&first));
    let made = cluster.kubectl(&[
        "create",
        "configmap",
        "precious",
        "-n",
        &ns,
        "--from-literal=mine=keep",
    ]);
    assert!(made.status.success(), "{}", said(&made));
    repo.write(
        "m/precious.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: precious}\ndata: {theirs: x}\n",
    );
    let refused = cluster.apply(repo.path(), &[]);
    let text = said(&refused);
    assert!(!refused.status.success(), "{text}");
    assert!(
        text.contains("ConfigMap/precious exists in namespace")
            && text.contains("was not made by berth"),
        "{text}"
    );
    assert_eq!(
        cluster.get(&ns, "configmap/precious", "{.data.mine}|{.data.theirs}"),
        "keep|"
    );
}

/// A challenge on Kubernetes serving a page built from a plain and a secret variable, plus the
/// page its sidecar serves on localhost.
fn web_challenge(port: u16, greeting: &str, extra: &str) -> String {
    let script = "mkdir -p /www && echo \"$GREETING $FLAG\" > /www/index.html && until wget -qO /www/side.html http://127.0.0.1:9090/index.html; do sleep 0.2; done; exec httpd -f -p 8080 -h /www";
    crate::support::util::challenge(
        "web",
        &format!(
            "  target: kubernetes\n  command: [sh, -c, '{script}']\n  env: {{GREETING: {greeting}}}\n  secretEnv: {{FLAG: {{env: BERTH_IT_TOKEN}}}}\n  ports: [{{container: 8080, host: {port}}}]\n  healthcheck: {{tcp: 8080, interval: 1s}}\n  sidecars:\n    - name: side\n      image: busybox:latest\n      command: [sh, -c, 'mkdir -p /s && echo from-the-sidecar > /s/index.html && exec httpd -f -p 9090 -h /s']\n{extra}"
        ),
    )
}

fn page(port: u16, path: &str) -> String {
    let output = Command::new("curl")
        .args(["-s", "-m", "3", &format!("http://127.0.0.1:{port}/{path}")])
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn a_challenge_on_kubernetes_serves_on_its_node_port_rolls_keeps_the_old_version_stops_and_is_pruned()
 {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.challenges();
    let port = node_port(&cluster.instance.name);
    let repo = Repo::new();
    repo.write("web.yaml", web_challenge(port, "hello", ""));
    let apply = |extra: &[&str]| {
        let mut args = vec!["apply", "--wait", "90s"];
        args.extend(extra);
        cluster.berth_with(&args, repo.path(), &[])
    };
    let plan = || stdout(&cluster.berth_with(&["plan"], repo.path(), &[]));

    // Create: a Deployment and a NodePort Service in the instance's namespace, which berth
    // makes; the page comes from the plain and the secret variable, and the sidecar answers
    // the main container on localhost.
    let planned = plan();
    assert!(
        planned.contains("Challenge/web  create  on kubernetes"),
        "{planned}"
    );
    let created = apply(&[]);
    assert!(created.status.success(), "{}", said(&created));
    assert!(
        !said(&created).contains("s3cr3t"),
        "a secret value was shown"
    );
    assert_eq!(
        served_eventually(port, "hello s3cr3t-t0ken-value"),
        "hello s3cr3t-t0ken-value"
    );
    assert_eq!(page(port, "side.html"), "from-the-sidecar");
    assert_eq!(cluster.get(&ns, "service/web", "{.spec.type}"), "NodePort");
    assert_eq!(
        cluster.get(
            &ns,
            "deployment/web",
            "{.spec.template.spec.containers[0].readinessProbe.tcpSocket.port}"
        ),
        "8080"
    );
    assert!(!cluster.get(&ns, "secret/web-env", "{.data}").is_empty());
    let planned = plan();
    assert!(planned.contains("1 unchanged"), "{planned}");

    // Update: a changed variable is explained, rolled, and served.
    repo.write("web.yaml", web_challenge(port, "bye", ""));
    let planned = plan();
    assert!(planned.contains("env changed: GREETING"), "{planned}");
    let updated = apply(&[]);
    assert!(updated.status.success(), "{}", said(&updated));
    assert_eq!(
        served_eventually(port, "bye s3cr3t-t0ken-value"),
        "bye s3cr3t-t0ken-value"
    );

    // A rotated secret reaches the running containers (environment from a Secret is read only
    // when a container starts, so the pods roll), and back.
    let rotated = [("BERTH_IT_TOKEN", "r0tated-t0ken-value")];
    let planned = stdout(&cluster.berth_with(&["plan"], repo.path(), &rotated));
    assert!(planned.contains("Challenge/web  update"), "{planned}");
    let updated = cluster.berth_with(&["apply", "--wait", "90s"], repo.path(), &rotated);
    assert!(updated.status.success(), "{}", said(&updated));
    assert!(
        !said(&updated).contains("r0tated"),
        "a secret value was shown"
    );
    assert_eq!(
        served_eventually(port, "bye r0tated-t0ken-value"),
        "bye r0tated-t0ken-value"
    );
    let updated = apply(&[]);
    assert!(updated.status.success(), "{}", said(&updated));
    assert_eq!(
        served_eventually(port, "bye s3cr3t-t0ken-value"),
        "bye s3cr3t-t0ken-value"
    );

    // An update that never becomes ready fails, and the old version keeps serving.
    let broken = web_challenge(port, "bye", "").replace(
        "  image: busybox:latest\n  target",
        "  image: busybox:no-such-tag\n  target",
    );
    repo.write("web.yaml", broken);
    let failed = apply(&[]);
    assert!(!failed.status.success(), "{}", said(&failed));
    assert!(
        said(&failed).contains("the old version keeps serving"),
        "{}",
        said(&failed)
    );
    assert_eq!(page(port, "index.html"), "bye s3cr3t-t0ken-value");

    // Stopped: scaled to zero, kept.
    repo.write("web.yaml", web_challenge(port, "bye", "  state: stopped\n"));
    let stopped = apply(&[]);
    assert!(stopped.status.success(), "{}", said(&stopped));
    assert_eq!(cluster.get(&ns, "deployment/web", "{.spec.replicas}"), "0");
    let planned = plan();
    assert!(
        planned.contains("1 unchanged"),
        "stopped is settled: {planned}"
    );
    let started = Instant::now();
    while !cluster
        .get(&ns, "pods", "{.items[*].metadata.name}")
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the pods do not end: {}",
            said(&cluster.kubectl(&["get", "pods", "-n", &ns, "-o", "wide"]))
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    repo.write("web.yaml", web_challenge(port, "bye", ""));
    let started = apply(&[]);
    assert!(started.status.success(), "{}", said(&started));
    assert_eq!(
        served_eventually(port, "bye s3cr3t-t0ken-value"),
        "bye s3cr3t-t0ken-value"
    );

    // Removed from the repo: an orphan without --prune, gone with it.
    std::fs::remove_file(repo.path().join("web.yaml")).unwrap();
    repo.write(
        "other.yaml",
        crate::support::util::challenge(
            "other",
            "  target: kubernetes\n  command: [sleep, \"3600\"]\n",
        ),
    );
    assert!(plan().contains("Challenge/web    orphan"), "{}", plan());
    // The one object this instance owned goes: a prune of everything is asked for by name.
    let pruned = apply(&["--prune", "--allow-empty"]);
    assert!(pruned.status.success(), "{}", said(&pruned));
    for what in ["deployment/web", "service/web", "secret/web-env"] {
        assert!(!cluster.exists(&ns, what), "{what} is left");
    }
}

#[test]
fn a_challenge_moves_from_docker_to_kubernetes_in_one_step_and_docker_is_emptied_only_once_it_runs()
{
    let Some(cluster) = cluster() else { return };
    let port = node_port(&cluster.instance.name) + 1;
    let repo = Repo::new();
    let script = "mkdir -p /www && echo moved > /www/index.html && exec httpd -f -p 8080 -h /www";
    repo.write(
        "web.yaml",
        crate::support::util::challenge(
            "web",
            &format!(
                "  command: [sh, -c, '{script}']\n  ports: [{{container: 8080, host: {port}}}]\n"
            ),
        ),
    );
    let on_docker = cluster.berth_with(&["apply", "--wait", "60s"], repo.path(), &[]);
    assert!(on_docker.status.success(), "{}", said(&on_docker));
    let containers = || {
        crate::support::engine::docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=berth.instance={}", cluster.instance.name),
            "--filter",
            "label=berth.kind=Challenge",
            // berth's own containers, not the pods' (a kubelet on this engine copies pod labels).
            "--filter",
            "label=berth.slot",
        ])
    };
    assert!(!containers().is_empty());
    assert_eq!(page(port, "index.html"), "moved");

    // The agent's defaultTarget sends it to the cluster: one step, made there first.
    let to_cluster = [("BERTH_DEFAULT_TARGET", "kubernetes")];
    let planned = stdout(&cluster.berth_with(&["plan"], repo.path(), &to_cluster));
    assert!(
        planned.contains("Challenge/web  create  moves from docker to kubernetes: made there first, removed from docker once it runs"),
        "{planned}"
    );
    assert!(
        planned.contains("1 to create, 0 to update, 0 to delete"),
        "{planned}"
    );
    let json = stdout(&cluster.berth_with(&["plan", "--format", "json"], repo.path(), &to_cluster));
    assert!(
        json.contains("\"engine\": \"kubernetes\"") && json.contains("\"from\": \"docker\""),
        "{json}"
    );
    let moved = cluster.berth_with(&["apply", "--wait", "60s"], repo.path(), &to_cluster);
    assert!(moved.status.success(), "{}", said(&moved));
    assert!(said(&moved).contains("ready in"), "{}", said(&moved));
    assert!(containers().is_empty(), "the Docker containers are left");
    assert_eq!(
        cluster.get(
            &cluster.challenges(),
            "pods",
            "{.items[*].status.containerStatuses[*].restartCount}"
        ),
        "0",
        "removing the Docker copy touched the pod (a kubelet on this engine labels its containers as the pod)"
    );
    assert!(cluster.exists(&cluster.challenges(), "deployment/web"));
    assert_eq!(served_eventually(port, "moved"), "moved");
    let again = stdout(&cluster.berth_with(&["plan"], repo.path(), &to_cluster));
    assert!(again.contains("1 unchanged"), "{again}");

    // And back: the NodePort holds the host port, so the cluster's copy goes first.
    let planned = stdout(&cluster.berth_with(&["plan"], repo.path(), &[]));
    assert!(
        planned.contains("moves from kubernetes to docker: removed from kubernetes first"),
        "{planned}"
    );
    let back = cluster.berth_with(&["apply", "--wait", "60s"], repo.path(), &[]);
    assert!(back.status.success(), "{}", said(&back));
    assert!(!containers().is_empty());
    assert!(!cluster.exists(&cluster.challenges(), "deployment/web"));
    assert_eq!(served_eventually(port, "moved"), "moved");
}

#[test]
fn a_challenge_follows_its_namespace_and_never_touches_a_stagings_objects_beside_it() {
    let Some(cluster) = cluster() else { return };
    let name = &cluster.instance.name;
    let port = node_port(name) + 2;
    let shared = cluster.challenges();
    let repo = Repo::new();
    // A staging that owns the namespace the challenges go to, with objects named like the
    // challenge's.
    repo.write(
        "site.yaml",
        staging("web", &shared, "  tag: latest\n  manifests: site\n"),
    )
    .write(
        "site/extra.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web-extra}\ndata: {a: b}\n",
    );
    let staged = cluster.berth_with(&["apply", "--wait", "60s"], repo.path(), &[]);
    assert!(staged.status.success(), "{}", said(&staged));
    let script = "mkdir -p /www && echo here > /www/index.html && exec httpd -f -p 8080 -h /www";
    repo.write(
        "web.yaml",
        crate::support::util::challenge(
            "web",
            &format!("  target: kubernetes\n  command: [sh, -c, '{script}']\n  ports: [{{container: 8080, host: {port}}}]\n"),
        ),
    );
    let applied = cluster.berth_with(&["apply", "--wait", "60s"], repo.path(), &[]);
    assert!(applied.status.success(), "{}", said(&applied));
    assert_eq!(served_eventually(port, "here"), "here");
    assert!(
        cluster.exists(&shared, "configmap/web-extra"),
        "the challenge removed a staging's object: {}",
        said(&applied)
    );

    // The challenge namespace changes: the copy moves, freeing its NodePort for the new one.
    let moved_to = format!("{name}-elsewhere");
    let moved = cluster.berth_with(
        &["apply", "--wait", "60s"],
        repo.path(),
        &[("BERTH_CHALLENGE_NAMESPACE", moved_to.as_str())],
    );
    assert!(moved.status.success(), "{}", said(&moved));
    assert!(cluster.exists(&moved_to, "deployment/web"));
    assert!(
        !cluster.exists(&shared, "deployment/web"),
        "the old copy is left"
    );
    assert!(cluster.exists(&shared, "configmap/web-extra"));
    assert_eq!(served_eventually(port, "here"), "here");
}

#[test]
fn two_agents_elect_one_leader_and_after_kill_9_the_standby_takes_over_without_applying_twice() {
    use crate::support::agent::{Agent, applied};
    use crate::support::engine::web;
    use crate::support::gitserver::{GitDaemon, Origin};
    use crate::support::net::free_port;
    let Some(cluster) = cluster() else { return };
    let name = cluster.instance.name.clone();
    let lease_namespace = format!("{name}-agents");
    cluster.namespace_to_clean(&lease_namespace);
    let origin = Origin::new(&[("web.yaml", &web("web", free_port(), ""))]);
    let first_revision = origin.bare_git(&["rev-parse", "main"]);
    let daemon = GitDaemon::start(&origin);
    let lease = Duration::from_secs(6);
    let extra = format!(
        "kube: {{kubeconfig: {}}}\nleaderElection: {{namespace: {lease_namespace}, lease: agents, leaseDuration: 6s}}\n",
        cluster.kubeconfig.display()
    );
    let mut agents = [
        Agent::start(&cluster.instance, &daemon.url(), &extra),
        Agent::start(&cluster.instance, &daemon.url(), &extra),
    ];
    let readyz = |agent: &Agent| agent.request("GET", "/readyz", &[], b"");

    // Exactly one leads and applies; the other says it stands by, and refuses webhooks.
    eventually(
        "one agent leads and one stands by",
        Duration::from_secs(60),
        || {
            let answers: Vec<(u16, String)> = agents.iter().map(readyz).collect();
            let ready = answers.iter().filter(|(code, _)| *code == 200).count();
            let standing_by = answers
                .iter()
                .filter(|(code, body)| *code == 503 && body.contains("standby"))
                .count();
            ready == 1 && standing_by == 1
        },
    );
    let leader = usize::from(readyz(&agents[0]).0 != 200);
    let standby = 1 - leader;
    // Readiness follows the pass; the status commit is pushed just after it.
    agents[leader].wait_for("the leader's status pushed", || {
        applied(&origin, &first_revision)
    });
    let running = cluster.instance.containers("web");
    assert_eq!(running.len(), 1, "{running:?}");
    let (code, answer) = agents[standby].api("POST", "/api/v1/reconcile");
    assert_eq!(code, 503, "{answer}");
    assert!(answer.contains("standby"), "{answer}");
    let holder = cluster.get(&lease_namespace, "lease/agents", "{.spec.holderIdentity}");
    assert!(
        holder.ends_with(&format!("-{}", agents[leader].pid())),
        "the Lease names the leader: {holder}"
    );

    // kill -9 the leader: the standby takes the Lease once it runs out, runs a full pass, and
    // finds nothing to change (the container is the same one).
    agents[leader].kill9();
    let killed = Instant::now();
    eventually(
        "the standby takes over",
        lease + Duration::from_secs(20),
        || readyz(&agents[standby]).0 == 200,
    );
    eprintln!(
        "failover: ready {:.1}s after kill -9",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(cluster.instance.containers("web"), running, "applied twice");
    assert!(
        agents[standby].log().contains("took the lead"),
        "{}",
        agents[standby].log()
    );

    // The new leader follows the repo from here.
    let next = origin.commit(
        &[(
            "web.yaml",
            Some(&web("web", free_port(), "  env: {MODE: two}\n")),
        )],
        "a change after the failover",
    );
    let (code, _) = agents[standby].api("POST", "/api/v1/reconcile");
    assert_eq!(code, 202);
    agents[standby].wait_for("the change applied by the new leader", || {
        applied(&origin, &next)
    });

    // An agent of another instance joining the same Lease would stand by for ever: it is refused
    // at start, and says why.
    let intruder = Agent::configure("intruder", &daemon.url(), "", &extra);
    let output = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["agent", "--config"])
        .arg(intruder.config_path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", said(&output));
    assert!(
        said(&output).contains(&format!("held by an agent of instance \"{name}\"")),
        "{}",
        said(&output)
    );
}

#[test]
fn without_a_docker_engine_challenges_on_kubernetes_still_apply() {
    let Some(cluster) = cluster() else { return };
    let repo = Repo::new();
    repo.write(
        "cluster.yaml",
        crate::support::util::challenge("up", "  target: kubernetes\n  state: stopped\n"),
    )
    .write("host.yaml", crate::support::util::challenge("host", ""));
    // A pod without the Docker socket.
    let applied = cluster.berth_with(
        &["apply"],
        repo.path(),
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    );
    let text = said(&applied);
    assert!(
        text.contains("Challenge/up") && text.contains("scaled to 0"),
        "{text}"
    );
    assert!(
        cluster.exists(&cluster.challenges(), "deployment/up"),
        "{text}"
    );
    assert!(
        text.contains("Challenge/host") && text.contains("not answering"),
        "{text}"
    );
}

/// Issue 18: a challenge on the cluster is walled by a NetworkPolicy (in: its own ports only;
/// out: the internet but no cluster range, DNS, and the challenges it names; nothing with
/// `egress: false`) and runs with the security context it declared, with escalation off and
/// NET_RAW dropped. This test bed's network plugin does not enforce NetworkPolicy, so the
/// objects are checked as applied; the pod must still run and serve under its context.
#[test]
fn a_challenge_on_kubernetes_is_walled_by_a_network_policy_and_runs_in_its_security_context() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.challenges();
    let port = node_port(&cluster.instance.name);
    let repo = Repo::new();
    repo.write(
        "web.yaml",
        crate::support::util::challenge(
            "web",
            &format!("  target: kubernetes\n  command: [sh, -c, 'echo walled > /www/index.html && exec httpd -f -p 8080 -h /www']\n  ports: [{{container: 8080, host: {port}}}]\n  security:\n    capabilities: {{add: [SYS_ADMIN]}}\n    readOnlyRootFilesystem: true\n    user: \"1000:1000\"\n    tmpfs: [{{path: /www, size: 1Mi}}]\n  network:\n    allowConnectTo: [Challenge/db]\n"),
        ),
    )
    .write(
        "offline.yaml",
        crate::support::util::challenge(
            "offline",
            "  target: kubernetes\n  command: [sleep, \"3600\"]\n  network: {egress: false}\n",
        ),
    );
    let applied = cluster.berth_with(&["apply", "--wait", "90s"], repo.path(), &[]);
    assert!(applied.status.success(), "{}", said(&applied));
    assert_eq!(served_eventually(port, "walled"), "walled");

    let policy = |name: &str, path: &str| cluster.get(&ns, &format!("networkpolicy/{name}"), path);
    assert_eq!(
        policy("web", "{.spec.policyTypes}"),
        "[\"Ingress\",\"Egress\"]"
    );
    assert_eq!(policy("web", "{.spec.ingress[0].ports[0].port}"), "8080");
    assert_eq!(
        policy("web", "{.spec.podSelector.matchLabels.berth\\.name}"),
        "web"
    );
    let egress = policy("web", "{.spec.egress}");
    for expected in [
        "\"cidr\":\"0.0.0.0/0\"",
        "\"10.0.0.0/8\"",
        "\"172.16.0.0/12\"",
        "\"berth.name\":\"db\"",
        "\"k8s-app\":\"kube-dns\"",
    ] {
        assert!(
            egress.contains(expected),
            "{expected} missing from {egress}"
        );
    }
    assert_eq!(
        policy("offline", "{.spec.egress}"),
        "",
        "egress: false lets nothing out"
    );
    assert_eq!(
        policy("offline", "{.spec.policyTypes}"),
        "[\"Ingress\",\"Egress\"]"
    );

    let context = |field: &str| {
        cluster.get(
            &ns,
            "deployment/web",
            &format!("{{.spec.template.spec.containers[0].securityContext.{field}}}"),
        )
    };
    assert_eq!(context("allowPrivilegeEscalation"), "false");
    assert_eq!(context("capabilities.drop"), "[\"NET_RAW\"]");
    assert_eq!(context("capabilities.add"), "[\"SYS_ADMIN\"]");
    assert_eq!(context("readOnlyRootFilesystem"), "true");
    assert_eq!(context("runAsUser"), "1000");
    assert_eq!(
        cluster.get(
            &ns,
            "deployment/web",
            "{.spec.template.spec.volumes[0].emptyDir.medium}"
        ),
        "Memory"
    );
    let planned = stdout(&cluster.berth_with(&["plan"], repo.path(), &[]));
    assert!(planned.contains("2 unchanged"), "{planned}");

    // Removed with prune: the policy goes with the challenge.
    std::fs::remove_file(repo.path().join("web.yaml")).unwrap();
    let pruned = cluster.berth_with(&["apply", "--prune"], repo.path(), &[]);
    assert!(pruned.status.success(), "{}", said(&pruned));
    assert!(!cluster.exists(&ns, "networkpolicy/web"));
}

/// A flag file on Kubernetes: a key of the challenge's Secret, mounted at its path, which the
/// challenge's own (non-root) user reads and serves.
#[test]
fn a_flag_file_on_kubernetes_is_read_by_the_challenges_user() {
    let Some(cluster) = cluster() else { return };
    let port = node_port(&format!("{}-flagfile", cluster.instance.name));
    let repo = Repo::new();
    let script = "mkdir -p /tmp/www && cp /home/ctf/flag.txt /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www";
    repo.write(
        "flagged.yaml",
        crate::support::util::challenge(
            "flagged",
            &format!(
                "  target: kubernetes\n  command: [sh, -c, '{script}']\n  security: {{user: \"1000:1000\"}}\n  secretFiles: [{{path: /home/ctf/flag.txt, secret: {{env: BERTH_IT_TOKEN}}}}]\n  ports: [{{container: 8080, host: {port}}}]\n  healthcheck: {{tcp: 8080, interval: 1s}}\n"
            ),
        ),
    );
    let applied = cluster.berth_with(&["apply", "--wait", "90s"], repo.path(), &[]);
    let text = said(&applied);
    assert!(applied.status.success(), "{text}");
    assert!(!text.contains("s3cr3t"), "a secret value was shown: {text}");
    assert_eq!(
        served_eventually(port, "s3cr3t-t0ken-value"),
        "s3cr3t-t0ken-value"
    );
    let pruned = cluster.berth_with(
        &["apply", "--prune", "--allow-empty"],
        Repo::new().path(),
        &[],
    );
    assert!(pruned.status.success(), "{}", said(&pruned));
}

/// A solver on the cluster: a pod of its own beside the challenge's, reaching it through its
/// Service, is the Deployment's health. Healthy while it gets the flag; Degraded with its reason
/// and its last lines when the jail breaks though the port still answers; its pods never count
/// as the challenge's and none is left once the apply ends. While a run's pod exists, so does its
/// own NetworkPolicy, and neither is left. (This cluster serves no pod logs, so the solver checks
/// the flag itself, and the last lines come from the termination message. It does not enforce
/// NetworkPolicy either: that the policy walls the pod in to the challenge's pods alone is the
/// unit test's in `kube::solve`.)
#[test]
fn a_solver_on_kubernetes_runs_in_a_pod_of_its_own_and_a_broken_jail_is_degraded() {
    let Some(cluster) = cluster() else { return };
    let jail = |serves: &str| {
        crate::support::util::challenge(
            "jail",
            &format!(
                "  target: kubernetes\n  command: [sh, -c, 'mkdir -p /tmp/w && {serves} > /tmp/w/flag && exec httpd -f -p 8080 -h /tmp/w']\n  secretFiles: [{{path: /flag.txt, secret: {{env: BERTH_IT_TOKEN}}}}]\n  ports: [{{container: 8080}}]\n  healthcheck:\n    solve: {{image: busybox:latest, command: [sh, -c, 'wget -q -O - http://$CHALLENGE_HOST:$CHALLENGE_PORT/flag | grep s3cr3t-t0ken || {{ echo no flag in the page; exit 1; }}'], interval: 2s, timeout: 30s}}\n"
            ),
        )
    };
    let solvers = |kind: &str| -> Vec<String> {
        let listed = cluster.kubectl(&[
            "get",
            kind,
            "-n",
            &cluster.challenges(),
            "-l",
            "berth.kind=ChallengeSolver",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ]);
        String::from_utf8_lossy(&listed.stdout)
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let solver_pods = || solvers("pods").join(" ");
    let repo = Repo::new();
    repo.write("jail.yaml", jail("cat /flag.txt"));
    // Runs are watched while the apply waits for them: a pod seen without its policy, and still
    // there after the policies were listed, ran unwalled (a policy is made before its pod and
    // deleted after it is gone).
    let applied = std::thread::scope(|scope| {
        let apply =
            scope.spawn(|| cluster.berth_with(&["apply", "--wait", "120s"], repo.path(), &[]));
        let mut walled = 0;
        while !apply.is_finished() {
            for pod in solvers("pods") {
                if solvers("networkpolicies").contains(&pod) {
                    walled += 1;
                } else {
                    assert!(
                        !solvers("pods").contains(&pod),
                        "solver pod {pod} ran without its NetworkPolicy"
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(walled > 0, "no solver run was seen while the apply waited");
        apply.join().unwrap()
    });
    let text = said(&applied);
    assert!(applied.status.success(), "{text}");
    assert!(text.contains("0 failed, 0 unhealthy"), "{text}");
    assert!(solver_pods().trim().is_empty(), "left: {}", solver_pods());
    assert_eq!(solvers("networkpolicies"), Vec::<String>::new(), "left");

    // The jail breaks: the port still answers, the solver no longer gets the flag.
    repo.write("jail.yaml", jail("echo flag{not-the-real-one}"));
    let broken = cluster.berth_with(&["apply", "--wait", "120s"], repo.path(), &[]);
    let text = said(&broken);
    assert!(
        text.contains("its solver failed: exited with code 1; last lines: no flag in the page"),
        "{text}"
    );
    assert!(
        !text.contains("s3cr3t-t0ken-value"),
        "a secret value was shown: {text}"
    );
    assert!(solver_pods().trim().is_empty(), "left: {}", solver_pods());
    assert_eq!(solvers("networkpolicies"), Vec::<String>::new(), "left");

    // A berth killed while a run goes leaves its pod and policy; the challenge's prune takes
    // them (before, they stayed: the cleanup came only with a next run, which a pruned
    // challenge never has).
    repo.write("jail.yaml", jail("cat /flag.txt"));
    let mut killed = cluster
        .berth_command(&["apply", "--wait", "120s"], repo.path(), &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("berth runs");
    let seen = Instant::now();
    // A run's policy is made before its pod: the kill comes as soon as the run has begun.
    while solvers("networkpolicies").is_empty() {
        assert!(
            seen.elapsed() < Duration::from_secs(120),
            "no solver run began"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert!(!solvers("networkpolicies").is_empty(), "a run was left");
    let pruned = cluster.berth_with(
        &["apply", "--prune", "--allow-empty"],
        Repo::new().path(),
        &[],
    );
    assert!(pruned.status.success(), "{}", said(&pruned));
    assert!(solver_pods().trim().is_empty(), "left: {}", solver_pods());
    assert_eq!(solvers("networkpolicies"), Vec::<String>::new(), "left");
}

/// Issue 19, item 21: a leader cut off from the API server stops leading (it cannot confirm its
/// Lease), the standby takes over once the Lease runs out, and the old leader, when the API
/// server is back, is a standby in the election again: it leads once the new leader dies.
#[test]
fn a_leader_cut_off_from_the_api_server_steps_down_the_standby_takes_over_and_it_stays_in_the_election()
 {
    use crate::support::agent::{Agent, applied};
    use crate::support::engine::web;
    use crate::support::gitserver::{GitDaemon, Origin};
    use crate::support::net::free_port;
    let Some(cluster) = cluster() else { return };
    let name = cluster.instance.name.clone();
    let lease_namespace = format!("{name}-cut-agents");
    cluster.namespace_to_clean(&lease_namespace);
    let (proxy, fronted) = cluster.fronted();
    let origin = Origin::new(&[("web.yaml", &web("web", free_port(), ""))]);
    let revision = origin.bare_git(&["rev-parse", "main"]);
    let daemon = GitDaemon::start(&origin);
    let election = |kubeconfig: &Path| {
        format!(
            "kube: {{kubeconfig: {}}}\nleaderElection: {{namespace: {lease_namespace}, lease: agents, leaseDuration: 6s}}\n",
            kubeconfig.display()
        )
    };
    let readyz = |agent: &Agent| agent.request("GET", "/readyz", &[], b"").0;
    // The one that will be cut off leads first.
    let cut = Agent::start(&cluster.instance, &daemon.url(), &election(fronted.path()));
    cut.wait_for("the first leader's pass", || applied(&origin, &revision));
    let mut standby = Agent::start(
        &cluster.instance,
        &daemon.url(),
        &election(&cluster.kubeconfig),
    );
    eventually("the second stands by", Duration::from_secs(30), || {
        readyz(&standby) == 503
    });
    assert_eq!(readyz(&cut), 200);

    proxy.set_open(false);
    let cut_at = Instant::now();
    eventually("the standby takes over", Duration::from_secs(60), || {
        readyz(&standby) == 200
    });
    let took_over = cut_at.elapsed();
    eventually(
        "the cut-off leader stands by",
        Duration::from_secs(30),
        || readyz(&cut) == 503,
    );
    eprintln!(
        "cut off: the standby ready {:.1}s after the cut (Lease 6s); the old leader stood by {:.1}s after it",
        took_over.as_secs_f64(),
        cut_at.elapsed().as_secs_f64()
    );

    // The API server is back: the old leader is in the election still, as a standby, and takes
    // the lead again once the new leader dies.
    proxy.set_open(true);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(readyz(&cut), 503, "{}", cut.log());
    standby.kill9();
    cut.wait_for("the old leader leads again", || readyz(&cut) == 200);
}

/// Issue 20, item 15 on the cluster: a named volume is a claim that keeps its data across an
/// update, and a folder of the repo is a ConfigMap named by its content, mounted read-only with
/// its files (nested ones too) at their paths; a changed file rolls the pods onto a new copy and
/// the old copy goes; the claim goes only with the challenge.
#[test]
fn a_challenge_on_kubernetes_keeps_its_volume_in_a_claim_and_a_repo_folder_in_a_config_map() {
    let Some(cluster) = cluster() else { return };
    let name = cluster.instance.name.clone();
    let ns = cluster.challenges();
    let port = node_port(&name);
    // A volume on the host for the claim (no provisioner here), bound to this claim alone.
    let volume = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        volume.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let pv = format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {name}-store-pv\n  labels: {{berth.instance: {name}}}\nspec:\n  capacity: {{storage: 64Mi}}\n  accessModes: [ReadWriteOnce]\n  persistentVolumeReclaimPolicy: Retain\n  claimRef: {{namespace: {ns}, name: store.data}}\n  hostPath: {{path: {}}}\n",
        volume.path().display()
    );
    let pv_file = volume.path().join("pv.yaml");
    std::fs::write(&pv_file, pv).unwrap();
    let made = cluster.kubectl(&["apply", "-f", pv_file.to_str().unwrap()]);
    assert!(made.status.success(), "{}", said(&made));
    let script = "mkdir -p /srv && cp -r /www/. /srv/ && echo start >> /data/starts && cp /data/starts /srv/starts && exec httpd -f -p 8080 -h /srv";
    let repo = Repo::new();
    repo.write(
        "store.yaml",
        crate::support::util::challenge(
            "store",
            &format!("  target: kubernetes\n  command: [sh, -c, '{script}']\n  ports: [{{container: 8080, host: {port}}}]\n  healthcheck: {{tcp: 8080, interval: 1s}}\n  volumes:\n    - {{name: data, path: /data, size: 64Mi}}\n    - {{from: store/www, path: /www}}\n"),
        ),
    )
    .write("store/www/index.html", "version one\n")
    .write("store/www/deep/page.html", "nested\n");
    let apply = |extra: &[&str]| {
        let mut args = vec!["apply", "--wait", "90s"];
        args.extend(extra);
        cluster.berth_with(&args, repo.path(), &[])
    };
    let created = apply(&[]);
    assert!(created.status.success(), "{}", said(&created));
    assert_eq!(served_eventually(port, "version one"), "version one");
    assert_eq!(page(port, "deep/page.html"), "nested");
    assert_eq!(page(port, "starts"), "start");
    assert_eq!(
        cluster.get(&ns, "pvc/store.data", "{.status.phase}"),
        "Bound"
    );
    let maps = || {
        cluster.get(
            &ns,
            "configmaps",
            "{range .items[?(@.metadata.labels.berth\\.folder)]}{.metadata.name} {end}",
        )
    };
    let first_map = maps();
    assert!(first_map.starts_with("store.folder-"), "{first_map}");

    // A changed file: a new copy, the pods roll onto it, the claim's data is still there.
    repo.write("store/www/index.html", "version two\n");
    let plan = stdout(&cluster.berth_with(&["plan"], repo.path(), &[]));
    assert!(plan.contains("Challenge/store  update"), "{plan}");
    let updated = apply(&[]);
    assert!(updated.status.success(), "{}", said(&updated));
    assert_eq!(served_eventually(port, "version two"), "version two");
    eventually(
        "the data outlives the update",
        Duration::from_secs(30),
        || page(port, "starts") == "start\nstart",
    );
    let second_map = maps();
    assert!(
        second_map.starts_with("store.folder-") && second_map != first_map,
        "the old copy is left: {first_map} → {second_map}"
    );

    // Pruned: the claim goes with the challenge, and the copy.
    std::fs::remove_file(repo.path().join("store.yaml")).unwrap();
    std::fs::remove_dir_all(repo.path().join("store")).unwrap();
    let pruned = apply(&["--prune", "--allow-empty"]);
    assert!(pruned.status.success(), "{}", said(&pruned));
    assert!(
        said(&pruned).contains("PersistentVolumeClaim/store.data"),
        "{}",
        said(&pruned)
    );
    // Deleted: gone, or going once no pod holds it (the cluster's protection of a claim in use
    // keeps it until the pods have stopped, which a loaded cluster may take its time over).
    eventually("the claim is deleted", Duration::from_secs(60), || {
        !cluster.exists(&ns, "pvc/store.data")
            || !cluster
                .get(&ns, "pvc/store.data", "{.metadata.deletionTimestamp}")
                .is_empty()
    });
    assert_eq!(maps(), "");
    cluster.kubectl(&["delete", "pv", &format!("{name}-store-pv"), "--wait=false"]);
}
