//! The real single-node Kubernetes cluster of `tests/testbed/`, for one test at a time
//! ([`Cluster`]), and what its NodePorts serve.
//!
//! Without a cluster the tests that need one skip loudly, unless `BERTH_REQUIRE_KUBE=1` (set by
//! `.ci/run`), which makes them fail instead. When the cluster's binaries are cached (or the
//! variable is set), the first test starts the cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::support::engine::{Instance, engine};
use crate::support::proxy::EngineProxy;
use crate::support::util::{Repo, crate_root, stdout};

/// The cluster, for one test at a time.
pub(crate) struct Cluster {
    pub(crate) kubeconfig: PathBuf,
    pub(crate) instance: Instance,
    pub(crate) _serial: MutexGuard<'static, ()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let selector = format!("berth.instance={}", self.instance.name);
        self.kubectl(&["delete", "namespace", "-l", &selector, "--wait=false"]);
        self.kubectl(&["delete", "pv", "-l", &selector, "--wait=false"]);
    }
}

pub(crate) fn kubeconfig() -> Option<PathBuf> {
    static STARTED: OnceLock<Option<PathBuf>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            let required = std::env::var("BERTH_REQUIRE_KUBE").as_deref() == Ok("1");
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|c| c.join("berth/kube-v1.20.2-oom0/bin/kube-apiserver"));
            if !required && !cache.is_some_and(|c| c.is_file()) {
                eprintln!(
                    "\n*** SKIPPED: no Kubernetes test cluster is built; run tests/testbed/kube-up.sh once, or set BERTH_REQUIRE_KUBE=1 to build it and make this a failure ***\n"
                );
                return None;
            }
            let output = Command::new("bash")
                .arg(crate_root().join("tests/testbed/kube-up.sh"))
                .output()
                .expect("bash runs");
            let path = String::from_utf8_lossy(&output.stdout)
                .lines()
                .last()
                .map(PathBuf::from);
            match path {
                Some(path) if output.status.success() && path.is_file() => Some(path),
                _ => {
                    let said = String::from_utf8_lossy(&output.stderr);
                    assert!(
                        !required,
                        "BERTH_REQUIRE_KUBE=1 but the test cluster did not start:\n{said}"
                    );
                    eprintln!("\n*** SKIPPED: the test cluster did not start:\n{said} ***\n");
                    None
                }
            }
        })
        .clone()
}

/// The cluster and a berth instance of this test's own; `None` (after a loud message) without.
pub(crate) fn cluster() -> Option<Cluster> {
    static SERIAL: Mutex<()> = Mutex::new(());
    let instance = engine()?;
    let kubeconfig = kubeconfig()?;
    let serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Some(Cluster {
        kubeconfig,
        instance,
        _serial: serial,
    })
}

impl Cluster {
    pub(crate) fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .expect("kubectl runs")
    }

    /// A TCP front to the API server the test can cut, as if the server stopped answering, and a
    /// kubeconfig that goes through it.
    pub(crate) fn fronted(&self) -> (EngineProxy, tempfile::NamedTempFile) {
        let proxy = EngineProxy::to_tcp("127.0.0.1:6443".parse().unwrap());
        let text = std::fs::read_to_string(&self.kubeconfig).unwrap();
        let fronted = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            fronted.path(),
            text.replace(
                "https://127.0.0.1:6443",
                &format!("https://127.0.0.1:{}", proxy.port),
            ),
        )
        .unwrap();
        (proxy, fronted)
    }

    /// `kubectl get … -o jsonpath=…`, trimmed; empty when the object is missing.
    /// Makes namespace `ns`, not berth's, labelled only so that the test's cleanup takes it.
    pub(crate) fn namespace_to_clean(&self, ns: &str) {
        let made = self.kubectl(&["create", "namespace", ns]);
        assert!(made.status.success(), "{}", said(&made));
        self.kubectl(&[
            "label",
            "namespace",
            ns,
            &format!("berth.instance={}", self.instance.name),
        ]);
    }

    pub(crate) fn get(&self, namespace: &str, what: &str, jsonpath: &str) -> String {
        let output = self.kubectl(&[
            "get",
            "-n",
            namespace,
            what,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ]);
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    pub(crate) fn exists(&self, namespace: &str, what: &str) -> bool {
        self.kubectl(&["get", "-n", namespace, what, "-o", "name"])
            .status
            .success()
    }

    /// Runs berth against the cluster (and `kubeconfig` instead of the admin one, when given).
    pub(crate) fn berth(
        &self,
        args: &[&str],
        repo: &Path,
        kubeconfig: Option<&Path>,
        path: Option<&str>,
    ) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_berth"));
        command
            .args(args)
            .arg(repo)
            .args(["--instance", &self.instance.name])
            .env("KUBECONFIG", kubeconfig.unwrap_or(&self.kubeconfig))
            .env("BERTH_IT_TOKEN", "s3cr3t-t0ken-value");
        if let Some(path) = path {
            command.env("PATH", path);
        }
        command.output().expect("berth runs")
    }

    pub(crate) fn apply(&self, repo: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["apply", "--wait", "90s"];
        args.extend(extra);
        self.berth(&args, repo, None, None)
    }

    /// Prunes everything the test's instance made, with an empty repo.
    pub(crate) fn remove_everything(&self) {
        let cleaned = self.apply(Repo::new().path(), &["--prune", "--allow-empty"]);
        assert!(cleaned.status.success(), "{}", said(&cleaned));
    }

    pub(crate) fn plan(&self, repo: &Path) -> String {
        stdout(&self.berth(&["plan"], repo, None, None))
    }
}

pub(crate) fn fetch(port: u16) -> String {
    let started = Instant::now();
    loop {
        let output = Command::new("curl")
            .args([
                "-s",
                "-m",
                "3",
                &format!("http://127.0.0.1:{port}/index.html"),
            ])
            .output()
            .expect("curl runs");
        if output.status.success() || started.elapsed() > Duration::from_secs(20) {
            return String::from_utf8_lossy(&output.stdout).trim().to_string();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A NodePort (30000-32767) of this instance's own.
pub(crate) fn node_port(instance: &str) -> u16 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    instance.hash(&mut hasher);
    30000 + (hasher.finish() % 2700) as u16
}

impl Cluster {
    /// The challenge namespace of this test's instance.
    pub(crate) fn challenges(&self) -> String {
        format!("{}-challenges", self.instance.name)
    }

    /// `berth ARGS REPO` with this instance's challenge namespace and `env`.
    pub(crate) fn berth_with(&self, args: &[&str], repo: &Path, env: &[(&str, &str)]) -> Output {
        self.berth_command(args, repo, env)
            .output()
            .expect("berth runs")
    }

    /// The command [`Cluster::berth_with`] runs, for a test that starts it itself.
    pub(crate) fn berth_command(
        &self,
        args: &[&str],
        repo: &Path,
        env: &[(&str, &str)],
    ) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_berth"));
        command
            .args(args)
            .arg(repo)
            .args(["--instance", &self.instance.name])
            .env("BERTH_CHALLENGE_NAMESPACE", self.challenges())
            .env("KUBECONFIG", &self.kubeconfig)
            .env("BERTH_IT_TOKEN", "s3cr3t-t0ken-value")
            .envs(env.iter().copied());
        command
    }
}

pub(crate) fn said(output: &Output) -> String {
    format!(
        "{}{}",
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    )
}
