//! Applying 50 stagings of 5 objects each to a real Kubernetes 1.20 API server: berth against one
//! `kubectl apply --server-side` of the same rendered manifests, in the same run, on the same
//! cluster (`tests/testbed/kube-up.sh`, which the bench starts when it is not up).
//!
//! - berth: load + connect + observe + plan + apply in process (concurrency 8), as `berth apply`
//!   runs: 50 Staging descriptors sharing one manifests folder (two ConfigMaps, a ServiceAccount,
//!   a ClusterIP Service and a Deployment at `replicas: 0`, so no pod runs), in namespaces
//!   `bench-berth-0..49`;
//! - kubectl: the same 50 × (Namespace + 5 objects), rendered by the bench into one file, in
//!   namespaces `bench-kubectl-0..49`, applied by ONE `kubectl apply --server-side
//!   --field-manager=bench -f FILE` process (with its own, at first empty, discovery cache).
//!
//! Each is timed from absent namespaces (initial) and again with nothing to change (no-op, the
//! median of 3 runs, berth's and kubectl's alternating). A berth pass connects afresh, as a
//! `berth apply` does, so each one includes its one discovery; kubectl's no-op runs find its cache
//! warm. The issue's targets: kubectl/berth ≥ 3× on the initial apply, and a no-op pass within
//! 50 ms besides the list calls. So berth's no-op pass is also split (median of 3), on engines
//! already connected: load, the whole `reconcile::plan`, and its stages run one by one as `plan`
//! runs them, the list calls (`Engines::observe`) apart from the rest, berth's own part. Each run
//! and the initial steps' times go to stderr. The bench deletes every `bench-berth-*` and
//! `bench-kubectl-*` namespace (and any of instance `bench`) before and after, and waits until
//! they are gone.
//!
//! Then 100 Challenges with `target: kubernetes` (a Deployment and a ClusterIP Service each, in
//! namespace `bench-challenges`, stopped so that no pod runs): berth's initial apply, its no-op
//! pass (median of 3) and the same split, beside one `kubectl get` of the Deployments, Services
//! and Secrets a no-op pass must read, the floor of any tool that compares.
//!
//! Last, one staging of 5,000 ConfigMaps: its initial apply, and its no-op pass split the same
//! way, beside one `kubectl get` of the ConfigMaps.
//!
//! Needs root (for kube-up.sh), a Docker Engine and `kubectl`. Run: `cargo bench --bench stagings`.

#[path = "support/common.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth::apply::Outcome;
use berth::backend::Engines;
use berth::backend::kube::Access;
use berth::descriptor::LoadOptions;
use berth::plan::Policy;
use berth::reconcile::{self, ApplyOptions, Observer};

const STAGINGS: usize = 50;
const CHALLENGES: usize = 100;
const CONCURRENCY: usize = 8;
const INSTANCE: &str = "bench";
const TAG: &str = "latest";
const NOOP_RUNS: usize = 3;

/// The shared manifests folder `shop`: five objects, `${tag}` substituted by berth.
const MANIFESTS: &[(&str, &str)] = &[
    (
        "config.yaml",
        "apiVersion: v1
kind: ConfigMap
metadata:
  name: shop-config
data:
  TAG: \"${tag}\"
  MODE: staging
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: shop-pages
data:
  index.html: \"<h1>shop</h1>\"
",
    ),
    (
        "serviceaccount.yaml",
        "apiVersion: v1
kind: ServiceAccount
metadata:
  name: shop
",
    ),
    (
        "service.yaml",
        "apiVersion: v1
kind: Service
metadata:
  name: shop
spec:
  type: ClusterIP
  selector:
    app: shop
  ports:
    - name: http
      port: 80
      targetPort: 8080
      protocol: TCP
",
    ),
    (
        "deployment.yaml",
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: shop
spec:
  replicas: 0
  selector:
    matchLabels:
      app: shop
  template:
    metadata:
      labels:
        app: shop
    spec:
      serviceAccountName: shop
      terminationGracePeriodSeconds: 1
      containers:
        - name: web
          image: busybox:${tag}
          imagePullPolicy: IfNotPresent
          command: [httpd, -f, -p, \"8080\", -h, /www]
          ports:
            - containerPort: 8080
              protocol: TCP
          envFrom:
            - configMapRef:
                name: shop-config
",
    ),
];

fn berth_namespace(i: usize) -> String {
    format!("bench-berth-{i}")
}

fn kubectl_namespace(i: usize) -> String {
    format!("bench-kubectl-{i}")
}

/// The repo: `shop/` and one Staging descriptor per namespace under `stagings/`.
fn write_repo(dir: &Path) {
    let shop = dir.join("shop");
    std::fs::create_dir_all(&shop).unwrap();
    for (file, text) in MANIFESTS {
        std::fs::write(shop.join(file), text).unwrap();
    }
    let stagings = dir.join("stagings");
    std::fs::create_dir_all(&stagings).unwrap();
    for i in 0..STAGINGS {
        let text = format!(
            "apiVersion: berth/v1\nkind: Staging\nmetadata: {{name: s-{i}}}\nspec:\n  namespace: {}\n  tag: {TAG}\n  manifests: shop\n",
            berth_namespace(i)
        );
        std::fs::write(stagings.join(format!("s-{i}.yaml")), text).unwrap();
    }
}

/// The kubectl peer's input: the same objects rendered by hand, each namespace first.
fn write_rendered(path: &Path) {
    let mut text = String::new();
    for i in 0..STAGINGS {
        let ns = kubectl_namespace(i);
        text.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"
        ));
        for (_, file) in MANIFESTS {
            for doc in file.split("---\n") {
                let doc = doc.replace("${tag}", TAG).replacen(
                    "\nmetadata:\n",
                    &format!("\nmetadata:\n  namespace: {ns}\n"),
                    1,
                );
                text.push_str("---\n");
                text.push_str(&doc);
            }
        }
        text.push_str("---\n");
    }
    std::fs::write(path, text).unwrap();
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("kubectl");
    command
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

fn run(mut command: Command) -> Duration {
    let start = Instant::now();
    let output = command.output().unwrap();
    let elapsed = start.elapsed();
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let said = String::from_utf8_lossy(&output.stderr);
    if !said.trim().is_empty() {
        eprintln!("stagings bench: {command:?} said: {}", said.trim());
    }
    elapsed
}

/// The bench's namespaces that exist (or are being deleted): by name, and any of instance `bench`.
fn bench_namespaces(kubeconfig: &Path) -> Vec<String> {
    let mut command = kubectl(
        kubeconfig,
        &[
            "get",
            "namespace",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name} {.metadata.labels.berth\.instance}{"\n"}{end}"#,
        ],
    );
    let output = command.stdout(Stdio::piped()).output().unwrap();
    assert!(
        output.status.success(),
        "kubectl get namespace failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (name, instance) = line.split_once(' ').unwrap_or((line, ""));
            let ours = name.starts_with("bench-berth-")
                || name.starts_with("bench-kubectl-")
                || instance == INSTANCE;
            ours.then(|| name.to_string())
        })
        .collect()
}

/// Deletes every namespace of this bench at once, and waits until all are gone. The wait is a
/// poll of one list: `kubectl delete --wait` gets each namespace under kubectl's client-side
/// limit of 5 requests a second, 36 s for 100 names even when none exists.
fn delete_namespaces(kubeconfig: &Path) -> Duration {
    let start = Instant::now();
    let names = bench_namespaces(kubeconfig);
    if !names.is_empty() {
        let mut args = vec!["delete", "namespace", "--ignore-not-found", "--wait=false"];
        args.extend(names.iter().map(String::as_str));
        run(kubectl(kubeconfig, &args));
    }
    loop {
        let left = bench_namespaces(kubeconfig);
        if left.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "namespaces still there after 300s: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// ConfigMaps in the one large staging.
const BIG_MAPS: usize = 5000;

/// Its namespace, one of the bench's (deleted with them).
const BIG_NAMESPACE: &str = "bench-berth-big";

/// A repo of one staging whose manifests are [`BIG_MAPS`] ConfigMaps, in files of 1,000.
fn write_big_staging(dir: &Path) {
    let maps = dir.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    for file in 0..BIG_MAPS.div_ceil(1000) {
        let documents: Vec<String> = (file * 1000..((file + 1) * 1000).min(BIG_MAPS))
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings-{i}\ndata:\n  index: \"{i}\"\n  level: \"${{overrides.LEVEL}}\"\n"
                )
            })
            .collect();
        std::fs::write(
            maps.join(format!("part-{file}.yaml")),
            documents.join("---\n"),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("big.yaml"),
        format!(
            "apiVersion: berth/v1\nkind: Staging\nmetadata: {{name: big}}\nspec:\n  namespace: {BIG_NAMESPACE}\n  manifests: maps\n  overrides:\n    app: {{LEVEL: info}}\n"
        ),
    )
    .unwrap();
}

fn options() -> ApplyOptions {
    ApplyOptions {
        concurrency: CONCURRENCY,
        lock_wait: Duration::from_secs(30),
        policy: Policy::default(),
        runs: None,
    }
}

/// One `berth apply` pass, timed from load to done, and how long each of its steps took.
async fn berth_apply(dir: &Path, access: &Access) -> (Duration, Vec<Duration>) {
    let (elapsed, applied) = berth_pass(dir, access).await;
    let stagings = applied
        .planned
        .desired
        .objects
        .iter()
        .filter(|o| o.hold.is_none())
        .count();
    assert_eq!(stagings, STAGINGS, "every staging is planned, none held");
    (elapsed, applied.reports.iter().map(|r| r.elapsed).collect())
}

/// One `berth apply` pass of the repo in `dir`, as the CLI runs it: load, connect, apply.
async fn berth_pass(dir: &Path, access: &Access) -> (Duration, reconcile::Applied) {
    let start = Instant::now();
    let loaded = reconcile::load(dir, &LoadOptions::default()).unwrap();
    let engines = reconcile::connect(INSTANCE, access).await.unwrap();
    let desired = reconcile::desired(&loaded);
    let applied = reconcile::apply(desired, &engines, &loaded.root, &options(), |_| {})
        .await
        .unwrap();
    let elapsed = start.elapsed();
    let failed: Vec<_> = applied
        .reports
        .iter()
        .filter(|r| !matches!(r.outcome, Outcome::Done(_)))
        .map(|r| format!("{}: {:?}", r.step.key, r.outcome))
        .collect();
    assert!(failed.is_empty(), "berth apply failed: {failed:#?}");
    (elapsed, applied)
}

/// One pass of the challenges in `dir`: its time and how many steps changed something.
async fn challenges_apply(dir: &Path, access: &Access) -> (Duration, usize) {
    let (elapsed, applied) = berth_pass(dir, access).await;
    (elapsed, applied.reports.len())
}

/// The no-op pass split, on engines already connected (discovery done): load + desired, the whole
/// `reconcile::plan`, and then the stages of `plan` run one by one as it runs them, so that the
/// list calls (`Engines::observe`) and the rest, berth's own part, are timed within one pass.
async fn berth_split(dir: &Path, engines: &Engines) -> [Duration; 4] {
    let start = Instant::now();
    let loaded = reconcile::load(dir, &LoadOptions::default()).unwrap();
    let mut desired = reconcile::desired(&loaded);
    let load = start.elapsed();

    let policy = options().policy;
    let copy = desired.clone();
    let start = Instant::now();
    let planned = reconcile::plan(copy, Observer::Engines(engines), policy.clone())
        .await
        .unwrap();
    let plan = start.elapsed();
    let changes: Vec<_> = planned
        .plan
        .steps
        .iter()
        .filter(|s| s.action.changes())
        .collect();
    assert!(changes.is_empty(), "a no-op plan has changes: {changes:#?}");

    let start = Instant::now();
    engines.hold_unserved(&mut desired);
    engines.seal(&mut desired).await.unwrap();
    let sealed = start.elapsed();
    let start = Instant::now();
    let mut observed = engines.observe().await.unwrap();
    let observe = start.elapsed();
    let start = Instant::now();
    engines.diagnose(&mut observed, &desired).await;
    reconcile::resolve(&mut desired, &observed);
    let policy = Policy {
        now: Some(chrono::Utc::now()),
        ..policy
    };
    let staged = berth::plan::diff(&desired.objects, &observed, policy);
    let own = sealed + start.elapsed();
    assert_eq!(staged.steps.len(), planned.plan.steps.len());
    assert!(!staged.has_changes());
    [load, plan, observe, own]
}

fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let bench_start = Instant::now();
    let kubeconfig = common::test_cluster();
    // berth reads the same kubeconfig KUBECONFIG names for kubectl: the process's own environment
    // cannot be changed here (`std::env::set_var` is unsafe in edition 2024, and the crate forbids
    // unsafe code), so it is named through `Access`, as `--kubeconfig` does.
    let access = Access {
        kubeconfig: Some(kubeconfig.clone()),
        ..Access::default()
    };

    let dir = tempfile::tempdir().unwrap();
    write_repo(dir.path());
    let kubectl_dir = tempfile::tempdir().unwrap();
    let rendered = kubectl_dir.path().join("rendered.yaml");
    write_rendered(&rendered);
    let cache = kubectl_dir.path().join("cache");
    let kubectl_apply = || {
        kubectl(
            &kubeconfig,
            &[
                "apply",
                "--server-side",
                "--field-manager=bench",
                "--cache-dir",
                cache.to_str().unwrap(),
                "-f",
                rendered.to_str().unwrap(),
            ],
        )
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let cleared = delete_namespaces(&kubeconfig);
    eprintln!(
        "stagings bench: leftover namespaces deleted in {:.1}s",
        cleared.as_secs_f64()
    );

    let (berth_initial, steps) = runtime.block_on(berth_apply(dir.path(), &access));
    assert_eq!(
        steps.len(),
        STAGINGS,
        "the initial pass creates every staging"
    );
    eprintln!(
        "stagings bench: berth's initial steps (one a staging, {CONCURRENCY} at once): median {:.0}ms, slowest {:.0}ms, {:.0}ms in all",
        ms(median(steps.clone())),
        ms(steps.iter().max().copied().unwrap_or_default()),
        ms(steps.iter().sum())
    );
    let kubectl_initial = run(kubectl_apply());

    let mut berth_noops = Vec::new();
    let mut kubectl_noops = Vec::new();
    for _ in 0..NOOP_RUNS {
        let (elapsed, steps) = runtime.block_on(berth_apply(dir.path(), &access));
        assert!(steps.is_empty(), "a no-op pass applies nothing");
        berth_noops.push(elapsed);
        kubectl_noops.push(run(kubectl_apply()));
    }

    let engines = runtime
        .block_on(reconcile::connect(INSTANCE, &access))
        .unwrap();
    // One plan first, so discovery is done before the split is timed.
    runtime.block_on(berth_split(dir.path(), &engines));
    let splits: Vec<[Duration; 4]> = (0..NOOP_RUNS)
        .map(|_| runtime.block_on(berth_split(dir.path(), &engines)))
        .collect();
    let part = |i: usize| median(splits.iter().map(|s| s[i]).collect());
    let (load, plan, observe, own) = (part(0), part(1), part(2), part(3));

    // 100 Challenges on Kubernetes.
    let challenges_dir = tempfile::tempdir().unwrap();
    for i in 0..CHALLENGES {
        std::fs::write(
            challenges_dir.path().join(format!("c-{i}.yaml")),
            format!(
                "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: c-{i}}}\nspec:\n  target: kubernetes\n  state: stopped\n  image: busybox:latest\n  command: [httpd, -f, -p, \"8080\"]\n  env: {{CHALLENGE: c-{i}}}\n  ports: [{{container: 8080}}]\n  healthcheck: {{tcp: 8080}}\n"
            ),
        )
        .unwrap();
    }
    let challenge_access = Access {
        challenge_namespace: Some("bench-challenges".into()),
        ..access.clone()
    };
    let (challenges_initial, created) =
        runtime.block_on(challenges_apply(challenges_dir.path(), &challenge_access));
    assert_eq!(
        created, CHALLENGES,
        "the initial pass creates every challenge"
    );
    let challenge_noops: Vec<Duration> = (0..NOOP_RUNS)
        .map(|_| {
            let (elapsed, changed) =
                runtime.block_on(challenges_apply(challenges_dir.path(), &challenge_access));
            assert_eq!(changed, 0, "a no-op pass applies nothing");
            elapsed
        })
        .collect();
    let challenge_engines = runtime
        .block_on(reconcile::connect(INSTANCE, &challenge_access))
        .unwrap();
    runtime.block_on(berth_split(challenges_dir.path(), &challenge_engines));
    let challenge_splits: Vec<[Duration; 4]> = (0..NOOP_RUNS)
        .map(|_| runtime.block_on(berth_split(challenges_dir.path(), &challenge_engines)))
        .collect();
    let challenge_part = |i: usize| median(challenge_splits.iter().map(|s| s[i]).collect());
    let kubectl_reads = median(
        (0..NOOP_RUNS)
            .map(|_| {
                run(kubectl(
                    &kubeconfig,
                    &[
                        "get",
                        "deployments,services,secrets",
                        "-n",
                        "bench-challenges",
                        "-l",
                        "berth.instance=bench",
                        "-o",
                        "json",
                    ],
                ))
            })
            .collect(),
    );

    // One staging of 5,000 ConfigMaps (five files of 1,000 documents): the plan's own work must
    // not grow with the square of a staging's objects.
    let big_dir = tempfile::tempdir().unwrap();
    write_big_staging(big_dir.path());
    let (big_initial, _) = runtime.block_on(berth_pass(big_dir.path(), &access));
    let big_engines = runtime
        .block_on(reconcile::connect(INSTANCE, &access))
        .unwrap();
    runtime.block_on(berth_split(big_dir.path(), &big_engines));
    let big_splits: Vec<[Duration; 4]> = (0..NOOP_RUNS)
        .map(|_| runtime.block_on(berth_split(big_dir.path(), &big_engines)))
        .collect();
    let big_part = |i: usize| median(big_splits.iter().map(|s| s[i]).collect());
    let big_reads = median(
        (0..NOOP_RUNS)
            .map(|_| {
                run(kubectl(
                    &kubeconfig,
                    &["get", "configmaps", "-n", BIG_NAMESPACE, "-o", "json"],
                ))
            })
            .collect(),
    );

    let cleaned = delete_namespaces(&kubeconfig);

    eprintln!(
        "stagings bench: no-op runs (ms): berth {:.1?}, kubectl {:.1?}; split (load, plan, list calls, own): {:.1?}",
        berth_noops.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        kubectl_noops.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        splits.iter().map(|s| s.map(ms)).collect::<Vec<_>>()
    );
    let berth_noop = median(berth_noops);
    let kubectl_noop = median(kubectl_noops);
    println!(
        "{:<40} {:>10} {:>10}",
        format!("apply {STAGINGS} stagings × 5 objects"),
        "initial",
        "no-op"
    );
    println!(
        "  {:<38} {:>8.0}ms {:>8.1}ms",
        format!("berth apply (concurrency {CONCURRENCY})"),
        ms(berth_initial),
        ms(berth_noop)
    );
    println!(
        "  {:<38} {:>8.0}ms {:>8.1}ms",
        "kubectl apply --server-side",
        ms(kubectl_initial),
        ms(kubectl_noop)
    );
    println!(
        "  kubectl/berth: initial {:.1}x (target ≥ 3x)   no-op {:.1}x",
        ms(kubectl_initial) / ms(berth_initial),
        ms(kubectl_noop) / ms(berth_noop)
    );
    println!(
        "  berth no-op, engines connected: plan {:.1}ms; its stages apart: list calls {:.1}ms + berth's own {:.1}ms (target ≤ 50ms); load {:.1}ms",
        ms(plan),
        ms(observe),
        ms(own),
        ms(load)
    );
    println!(
        "\n{CHALLENGES} challenges on kubernetes (Deployment + Service, stopped)\n  berth apply: initial {:.0}ms, no-op {:.1}ms (connect and discovery included)\n  berth no-op, engines connected: plan {:.1}ms; list calls {:.1}ms + berth's own {:.1}ms; load {:.1}ms\n  kubectl get deployments,services,secrets -o json (the reads alone): {:.1}ms",
        ms(challenges_initial),
        ms(median(challenge_noops)),
        ms(challenge_part(1)),
        ms(challenge_part(2)),
        ms(challenge_part(3)),
        ms(challenge_part(0)),
        ms(kubectl_reads)
    );
    println!(
        "\none staging of {BIG_MAPS} ConfigMaps\n  berth apply: initial {:.1}s\n  berth no-op, engines connected: plan {:.1}ms; list calls {:.1}ms + berth's own {:.1}ms (target ≤ 1s); load {:.1}ms\n  kubectl get configmaps -o json (the reads alone): {:.1}ms",
        big_initial.as_secs_f64(),
        ms(big_part(1)),
        ms(big_part(2)),
        ms(big_part(3)),
        ms(big_part(0)),
        ms(big_reads)
    );
    println!(
        "  (no-op: median of {NOOP_RUNS}; split on connected engines; namespaces deleted in {:.1}s; bench took {:.1}s)",
        cleaned.as_secs_f64(),
        bench_start.elapsed().as_secs_f64()
    );
}
