//! What berth ships besides the binary, tested as users take it (issue 12):
//!
//! - the container image (`packaging/container/Dockerfile`), built here from local base images
//!   (`tests/testbed/base-images.sh`, Debian packages, no registry) and run on the real Docker
//!   Engine: `berth --version`, `berth validate` on the sample repo, the unprivileged user;
//! - the Kubernetes manifests (`packaging/kubernetes/`), rendered by `kubectl kustomize`, applied to
//!   the real API server, their RBAC checked verb by verb with `kubectl auth can-i`, and the pods
//!   started from the image;
//! - the shell completions and the man page generated from the CLI definition.
//!
//! The image and cluster tests skip loudly without an engine, and fail instead under
//! `BERTH_REQUIRE_DOCKER=1` / `BERTH_REQUIRE_KUBE=1`, as the `docker` and `kube` modules do.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::support::cluster::{Cluster, cluster};
use crate::support::engine::engine;
use crate::support::util::{berth, crate_root, stdout};

/// The image the tests build and run; also what `packaging/kubernetes/deployment.yaml` names.
const IMAGE: &str = "berth:local";
/// The unprivileged user the image runs as.
const UID: u32 = 10001;

fn said(output: &Output) -> String {
    format!(
        "{}{}",
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs")
}

/// Builds the image once per test run: the base images (made when missing), then the Dockerfile.
/// Docker's layer cache makes a build with unchanged sources take seconds; a change to `src/`
/// rebuilds berth alone, a change to `Cargo.lock` every crate (about 10 minutes on 2 cores).
fn image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let root = crate_root();
        let started = Instant::now();
        for script in [
            "tests/testbed/base-images.sh",
            "packaging/container/build.sh",
        ] {
            let output = Command::new("bash")
                .arg(root.join(script))
                .args((script.ends_with("build.sh")).then_some(IMAGE))
                .current_dir(&root)
                .stdin(Stdio::null())
                .output()
                .expect("bash runs");
            if !output.status.success() {
                let said = said(&output);
                let tail: Vec<&str> = said.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(format!("{script} failed:\n{}", tail.join("\n")));
            }
        }
        eprintln!(
            "built {IMAGE} in {:.0?} ({} bytes)",
            started.elapsed(),
            stdout(&docker(&["image", "inspect", "-f", "{{.Size}}", IMAGE])).trim()
        );
        Ok(())
    });
    if let Err(why) = built {
        panic!("the image {IMAGE} could not be built: {why}");
    }
    IMAGE
}

/// `docker run --rm` of the image with `args` (options first, then `--`, then berth's arguments).
fn run_image(options: &[&str], args: &[&str]) -> Output {
    let mut command = vec!["run", "--rm", "--network", "none"];
    command.extend(options);
    command.push(IMAGE);
    command.extend(args);
    docker(&command)
}

#[test]
fn container_image_runs_berth_version_and_validate_as_an_unprivileged_user() {
    let Some(_instance) = engine() else { return };
    image();

    let version = run_image(&[], &["--version"]);
    assert!(version.status.success(), "{}", said(&version));
    assert_eq!(
        stdout(&version),
        format!("berth {}\n", env!("CARGO_PKG_VERSION"))
    );

    // The sample repo, read-only, as a user would mount a checkout.
    let sample = crate_root().join("sample-repo");
    let mount = format!("{}:/repo:ro", sample.display());
    let validated = run_image(&["-v", &mount], &["validate", "/repo"]);
    assert!(validated.status.success(), "{}", said(&validated));
    assert_eq!(
        stdout(&validated),
        "8 descriptors valid (4 Challenge, 2 Pipeline, 2 Staging)\n"
    );
    let broken = crate_root().join("tests/fixtures/invalid/wrong-type");
    let mount = format!("{}:/repo:ro", broken.display());
    let refused = run_image(&["-v", &mount], &["validate", "/repo"]);
    assert_eq!(refused.status.code(), Some(1), "{}", said(&refused));
    assert!(
        stdout(&refused).starts_with("c.yaml:8:13: Challenge/web: spec.ports[0].host"),
        "{}",
        said(&refused)
    );

    // The user, as configured and as the kernel sees it: files berth writes belong to uid 10001.
    let user = docker(&["image", "inspect", "-f", "{{.Config.User}}", IMAGE]);
    assert_eq!(stdout(&user).trim(), format!("{UID}:{UID}"));
    let out = tempfile::tempdir().expect("temporary folder");
    std::fs::set_permissions(
        out.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .expect("chmod");
    let mount = format!("{}:/out", out.path().display());
    let written = run_image(&["-v", &mount], &["schema", "--out", "/out/schema"]);
    assert!(written.status.success(), "{}", said(&written));
    let schema = out.path().join("schema/agent.json");
    let owner = std::fs::metadata(&schema).expect("berth wrote the schema");
    assert_eq!(
        (owner.uid(), owner.gid()),
        (UID, UID),
        "berth ran as another user"
    );
    // Its state folder is its own; the rest of the file system is not.
    let state = run_image(&[], &["schema", "--out", "/var/lib/berth/schema"]);
    assert!(state.status.success(), "{}", said(&state));
    let elsewhere = run_image(&[], &["schema", "--out", "/usr/share/schema"]);
    assert!(!elsewhere.status.success(), "{}", said(&elsewhere));
    assert!(
        said(&elsewhere).contains("ermission denied"),
        "{}",
        said(&elsewhere)
    );
}

#[test]
fn shell_completions_and_man_page_come_from_the_cli_definition() {
    let subcommands = [
        "validate",
        "plan",
        "apply",
        "agent",
        "status",
        "run",
        "runs",
        "logs",
        "schema",
        "completions",
        "man",
    ];
    let bash = berth(&["completions", "bash"]);
    assert!(bash.status.success(), "{}", said(&bash));
    let script = stdout(&bash);
    assert!(script.contains("complete -F _berth"), "{script}");
    for subcommand in subcommands {
        assert!(
            script.contains(&format!("berth,{subcommand})")),
            "bash completion lacks {subcommand}"
        );
    }
    // The script is bash that loads: `complete -p berth` then names its function.
    let loaded = Command::new("bash")
        .args(["-c", &format!("{script}\ncomplete -p berth")])
        .output()
        .expect("bash runs");
    assert!(
        stdout(&loaded).contains("_berth"),
        "bash did not load the completion: {}",
        said(&loaded)
    );
    let zsh = berth(&["completions", "zsh"]);
    assert!(stdout(&zsh).starts_with("#compdef berth"), "{}", said(&zsh));
    let unknown = berth(&["completions", "tcsh"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", said(&unknown));

    let man = berth(&["man"]);
    assert!(man.status.success(), "{}", said(&man));
    let page = stdout(&man);
    assert!(page.contains(".TH berth 1"), "{page}");
    for subcommand in subcommands {
        assert!(
            page.contains(&format!("berth\\-{subcommand}(1)")),
            "the man page lacks {subcommand}"
        );
    }
    // What `man` shows a reader.
    let dir = tempfile::tempdir().expect("temporary folder");
    let file = dir.path().join("berth.1");
    std::fs::write(&file, &page).expect("write the page");
    let rendered = Command::new("man")
        .arg("-l")
        .arg(&file)
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .output()
        .expect("man runs (Debian's man-db, installed by .ci/run)");
    let text = String::from_utf8_lossy(&rendered.stdout);
    assert!(rendered.status.success(), "{}", said(&rendered));
    assert!(text.contains("NAME"), "{text}");
    assert!(
        text.contains("berth - A git-driven reconciliation agent"),
        "{text}"
    );

    // Every page, the subcommands' too, for /usr/share/man/man1.
    let pages = dir.path().join("man1");
    let written = berth(&["man", "--out", pages.to_str().unwrap()]);
    assert!(written.status.success(), "{}", said(&written));
    for subcommand in subcommands {
        let page = std::fs::read_to_string(pages.join(format!("berth-{subcommand}.1")))
            .unwrap_or_else(|e| panic!("no page for {subcommand}: {e}"));
        assert!(
            page.contains(&format!(".TH berth-{subcommand} 1")),
            "{page}"
        );
    }
    let validate = std::fs::read_to_string(pages.join("berth-validate.1")).unwrap();
    assert!(validate.contains("max\\-file\\-size"), "{validate}");
}

/// The agent config the manifests put in the ConfigMap is one berth accepts: the agent gets past
/// parsing and the schema, and stops only at the token files, which exist only in the pod.
#[test]
fn kubernetes_agent_config_is_valid() {
    let config = crate_root().join("packaging/kubernetes/agent.yaml");
    let output = berth(&["agent", "--config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{}", said(&output));
    let said = said(&output);
    assert!(said.contains("/etc/berth/secrets/"), "{said}");
    assert!(
        !said.contains("agent.yaml:"),
        "the config has a problem: {said}"
    );
}

/// Deletes what a test applied from the manifests, however the test ends.
struct Applied<'a> {
    cluster: &'a Cluster,
    cluster_scoped: Vec<&'static str>,
}

impl Drop for Applied<'_> {
    fn drop(&mut self) {
        for what in &self.cluster_scoped {
            self.cluster
                .kubectl(&["delete", "--ignore-not-found", what]);
        }
        self.cluster.kubectl(&[
            "delete",
            "namespace",
            "berth",
            "berth-challenges",
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

/// Writes `text` to a file in `dir` and returns its path as text.
fn file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().expect("has a parent")).expect("create folders");
    std::fs::write(&path, text).expect("write file");
    path.display().to_string()
}

/// `to` as a path relative to the folder `from`: kustomize takes no absolute path for a base.
fn relative(from: &Path, to: &Path) -> String {
    let up = from.components().skip(1).map(|_| "..").collect::<Vec<_>>();
    format!(
        "{}/{}",
        up.join("/"),
        to.strip_prefix("/").expect("an absolute path").display()
    )
}

fn can_i(cluster: &Cluster, verb: &str, resource: &str, namespace: Option<&str>) -> bool {
    let mut args = vec![
        "auth",
        "can-i",
        "--as=system:serviceaccount:berth:berth",
        verb,
        resource,
    ];
    match namespace {
        Some(namespace) => args.extend(["-n", namespace]),
        None => args.push("--all-namespaces"),
    }
    let output = cluster.kubectl(&args);
    match stdout(&output).trim() {
        "yes" => true,
        "no" => false,
        _ => panic!("kubectl auth can-i {verb} {resource}: {}", said(&output)),
    }
}

/// What the ServiceAccount may do, as (verb, resource, namespace; None: every namespace).
type Rights = &'static [(&'static str, &'static str, Option<&'static str>)];

/// Every verb berth uses: stagings in namespaces it makes at run time (any name), Kubernetes
/// challenges in berth-challenges, its Lease in berth.
const GRANTED: Rights = &[
    ("create", "namespaces", None),
    ("get", "namespaces", None),
    ("list", "namespaces", None),
    ("patch", "namespaces", None),
    ("delete", "namespaces", None),
    ("list", "deployments.apps", None),
    ("create", "deployments.apps", Some("staging-any")),
    ("patch", "deployments.apps", Some("staging-any")),
    ("get", "deployments.apps", Some("staging-any")),
    ("delete", "deployments.apps", Some("staging-any")),
    ("patch", "statefulsets.apps", Some("staging-any")),
    ("patch", "daemonsets.apps", Some("staging-any")),
    ("list", "replicasets.apps", None),
    ("list", "pods", None),
    ("patch", "services", Some("staging-any")),
    ("list", "services", None),
    ("delete", "configmaps", Some("staging-any")),
    ("patch", "persistentvolumeclaims", Some("staging-any")),
    ("patch", "serviceaccounts", Some("staging-any")),
    ("patch", "ingresses.networking.k8s.io", Some("staging-any")),
    ("patch", "jobs.batch", Some("staging-any")),
    ("delete", "cronjobs.batch", Some("staging-any")),
    ("watch", "deployments.apps", Some("berth-challenges")),
    ("update", "deployments.apps", Some("berth-challenges")),
    ("create", "secrets", Some("berth-challenges")),
    ("get", "secrets", Some("berth-challenges")),
    ("delete", "secrets", Some("berth-challenges")),
    (
        "patch",
        "networkpolicies.networking.k8s.io",
        Some("berth-challenges"),
    ),
    (
        "list",
        "networkpolicies.networking.k8s.io",
        Some("berth-challenges"),
    ),
    ("watch", "pods", Some("berth-challenges")),
    // Per-team instances and solvers' runs are pods in the challenge namespace.
    ("create", "pods", Some("berth-challenges")),
    ("delete", "pods", Some("berth-challenges")),
    ("get", "pods/log", Some("berth-challenges")),
    // What RBAC cannot narrow to namespaces made at run time: it reaches kube-system too, which
    // is why packaging/README.md asks for admission control there.
    ("create", "deployments.apps", Some("kube-system")),
    ("get", "leases.coordination.k8s.io", Some("berth")),
    ("create", "leases.coordination.k8s.io", Some("berth")),
    ("update", "leases.coordination.k8s.io", Some("berth")),
];

/// What berth must not have.
const REFUSED: Rights = &[
    ("get", "secrets", Some("kube-system")),
    ("list", "secrets", Some("kube-system")),
    ("list", "secrets", None),
    ("watch", "secrets", None),
    ("patch", "secrets", Some("staging-any")),
    ("update", "leases.coordination.k8s.io", Some("kube-system")),
    (
        "create",
        "leases.coordination.k8s.io",
        Some("kube-node-lease"),
    ),
    ("create", "pods", Some("kube-system")),
    ("create", "pods/exec", Some("staging-any")),
    ("get", "nodes", None),
    ("patch", "nodes", None),
    (
        "create",
        "clusterrolebindings.rbac.authorization.k8s.io",
        None,
    ),
    (
        "create",
        "rolebindings.rbac.authorization.k8s.io",
        Some("staging-any"),
    ),
    ("bind", "clusterroles.rbac.authorization.k8s.io", None),
    (
        "escalate",
        "roles.rbac.authorization.k8s.io",
        Some("staging-any"),
    ),
    ("impersonate", "users", None),
    ("impersonate", "serviceaccounts", Some("kube-system")),
    (
        "create",
        "customresourcedefinitions.apiextensions.k8s.io",
        None,
    ),
    ("*", "*", None),
    ("update", "deployments.apps", Some("staging-any")),
];

#[test]
fn kubernetes_manifests_apply_and_grant_least_privilege() {
    let Some(cluster) = cluster() else { return };
    let root = crate_root();
    let rendered = Command::new("kubectl")
        .args(["kustomize"])
        .arg(root.join("packaging/kubernetes"))
        .output()
        .expect("kubectl runs");
    assert!(rendered.status.success(), "{}", said(&rendered));
    let rendered = stdout(&rendered);
    for kind in [
        "kind: Namespace",
        "kind: ServiceAccount",
        "kind: ClusterRole\n",
        "kind: Role\n",
        "kind: Deployment",
        "kind: Service\n",
        "kind: ConfigMap",
    ] {
        assert!(rendered.contains(kind), "the render lacks {kind}");
    }
    assert!(!rendered.contains("- '*'") && !rendered.contains("- \"*\""));
    for setting in [
        "replicas: 2",
        "imagePullPolicy: IfNotPresent",
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop:\n            - ALL",
        "path: /readyz",
        "path: /healthz",
        "secretName: berth-tokens",
        "port: 8700",
    ] {
        assert!(rendered.contains(setting), "the render lacks {setting:?}");
    }
    assert!(
        !rendered.contains("docker.sock"),
        "the Docker socket is mounted"
    );
    assert!(
        !rendered.contains("kind: Secret\n"),
        "the manifests make a Secret"
    );
    // A namespace an earlier run deleted may still be going.
    let started = Instant::now();
    for namespace in ["berth", "berth-challenges"] {
        loop {
            let phase = cluster.kubectl(&[
                "get",
                "namespace",
                namespace,
                "-o",
                "jsonpath={.status.phase}",
            ]);
            if !phase.status.success() {
                break;
            }
            assert!(
                stdout(&phase) == "Terminating" && started.elapsed() < Duration::from_secs(120),
                "the namespace {namespace} exists on the test cluster ({}); this test makes it and deletes it",
                stdout(&phase)
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let applied = Applied {
        cluster: &cluster,
        cluster_scoped: vec![
            "clusterrole/berth-stagings",
            "clusterrolebinding/berth-stagings",
            "clusterrole/berth-staging-secrets",
            "clusterrolebinding/berth-staging-secrets",
        ],
    };
    // Applied through an overlay that points the agent at a git server on the pod's own loopback,
    // where none listens, so that no pod ever sends traffic anywhere, and that mounts no
    // ServiceAccount token (on this test bed the API server listens on the host's loopback, not
    // where pods reach it). The RBAC objects are the base's, unchanged.
    let dir = tempfile::tempdir().expect("temporary folder");
    let overlay = dir.path().join("overlay");
    file(
        &overlay,
        "kustomization.yaml",
        &format!(
            "resources: [{}]\npatches:\n  - path: repo.yaml\nconfigMapGenerator:\n  - {{name: berth-agent, namespace: berth, behavior: replace, files: [agent.yaml]}}\n",
            relative(&overlay, &root.join("packaging/kubernetes"))
        ),
    );
    // Without the API server in reach, an agent that elects a leader cannot start (and the
    // kubelet restarts it): the overlay's config is the base's without the election.
    let base_config =
        std::fs::read_to_string(root.join("packaging/kubernetes/agent.yaml")).expect("agent.yaml");
    let without_election: String = base_config
        .lines()
        .filter(|line| !line.starts_with("leaderElection:"))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_ne!(
        without_election, base_config,
        "the base config elects a leader"
    );
    file(&overlay, "agent.yaml", &without_election);
    file(
        &overlay,
        "repo.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: berth, namespace: berth}\nspec:\n  template:\n    spec:\n      terminationGracePeriodSeconds: 1\n      automountServiceAccountToken: false\n      containers:\n        - name: berth\n          env: [{name: BERTH_REPO_URL, value: \"git://127.0.0.1:1/none\"}]\n",
    );
    image();
    let output = cluster.kubectl(&[
        "apply",
        "--server-side",
        "-k",
        &overlay.display().to_string(),
    ]);
    assert!(output.status.success(), "{}", said(&output));

    let wrong: Vec<String> = GRANTED
        .iter()
        .map(|right| (right, true))
        .chain(REFUSED.iter().map(|right| (right, false)))
        .filter(|((verb, resource, namespace), expected)| {
            can_i(&cluster, verb, resource, *namespace) != *expected
        })
        .map(|((verb, resource, namespace), expected)| {
            format!(
                "{} {verb} {resource} in {}",
                if expected { "cannot" } else { "can" },
                namespace.unwrap_or("every namespace")
            )
        })
        .collect();
    assert!(wrong.is_empty(), "berth's ServiceAccount {wrong:?}");

    // The pods start from the local image as the unprivileged user, on a read-only root file
    // system without capabilities, once the Secret the user makes exists, and stay up: the
    // liveness probe (/healthz) passes. They are not Ready: /readyz waits for a clone.
    let output = cluster.kubectl(&[
        "-n",
        "berth",
        "create",
        "secret",
        "generic",
        "berth-tokens",
        "--from-literal=git-token=not-a-token",
        "--from-literal=webhook-secret=not-a-secret",
        "--from-literal=api-token=not-a-token",
    ]);
    assert!(output.status.success(), "{}", said(&output));
    let pods = || {
        stdout(&cluster.kubectl(&[
            "-n",
            "berth",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=berth",
            "-o",
            "jsonpath={range .items[*]}{.status.containerStatuses[0].state.running.startedAt} {.status.containerStatuses[0].restartCount}{\"\\n\"}{end}",
        ]))
    };
    let started = Instant::now();
    loop {
        let seen = pods();
        let running: Vec<&str> = seen.lines().filter(|l| !l.starts_with(' ')).collect();
        if running.len() == 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the pods did not start: {seen}\n{}",
            said(&cluster.kubectl(&["-n", "berth", "describe", "pods"]))
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // Two liveness periods after the first check.
    std::thread::sleep(Duration::from_secs(30));
    let seen = pods();
    assert!(
        seen.lines().all(|line| line.ends_with(" 0")),
        "a pod restarted (liveness failed or berth exited): {seen}\n{}",
        said(&cluster.kubectl(&["-n", "berth", "describe", "pods"]))
    );
    let user = cluster.kubectl(&[
        "-n",
        "berth",
        "get",
        "pods",
        "-o",
        "jsonpath={.items[0].spec.securityContext.runAsUser}",
    ]);
    assert_eq!(stdout(&user), UID.to_string());
    let ready = cluster.kubectl(&[
        "-n",
        "berth",
        "get",
        "pods",
        "-o",
        "jsonpath={.items[*].status.containerStatuses[0].ready}",
    ]);
    assert_eq!(
        stdout(&ready),
        "false false",
        "Ready without a repo to clone?"
    );

    // The opt-in component for Stagings that carry Secrets: it is what makes kube-system's
    // Secrets readable, which is why the base leaves it out.
    let component = dir.path().join("with-secrets");
    file(
        &component,
        "kustomization.yaml",
        &format!(
            "resources: [{}]\ncomponents: [{}]\n",
            relative(&component, &root.join("packaging/kubernetes")),
            relative(
                &component,
                &root.join("packaging/kubernetes/staging-secrets")
            )
        ),
    );
    let output = cluster.kubectl(&[
        "apply",
        "--server-side",
        "-k",
        &component.display().to_string(),
    ]);
    assert!(output.status.success(), "{}", said(&output));
    assert!(can_i(&cluster, "patch", "secrets", Some("staging-any")));
    assert!(can_i(&cluster, "get", "secrets", Some("kube-system")));
    drop(applied);
}
