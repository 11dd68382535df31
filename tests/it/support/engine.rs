//! The real Docker Engine for a test: a berth instance of its own ([`Instance`], cleaned up on
//! drop), the `docker` CLI, a free host port, and a challenge descriptor that serves a page.
//!
//! No image can be pulled here: the harness makes `busybox:latest` from Debian's static busybox
//! (`tests/testbed/busybox-image.sh`). Without an engine the tests that need one skip loudly,
//! unless `BERTH_REQUIRE_DOCKER=1` (set by `.ci/run`), which makes them fail instead.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::support::util::{Repo, crate_root, stdout};

/// A berth instance of its own for one test, cleaned up on drop.
pub struct Instance {
    /// The instance's name.
    pub name: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let filter = format!("label=berth.instance={}", self.name);
        for (list, remove) in [
            (vec!["ps", "-aq", "--filter", &filter], vec!["rm", "-f"]),
            (
                vec!["network", "ls", "-q", "--filter", &filter],
                vec!["network", "rm"],
            ),
            (vec!["images", "-q", "--filter", &filter], vec!["rmi", "-f"]),
            // Pipeline runs an agent killed mid-run left (their containers went above).
            (
                vec!["volume", "ls", "-q", "--filter", &filter],
                vec!["volume", "rm", "-f"],
            ),
        ] {
            let ids = docker(&list);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = remove.clone();
                args.extend(ids);
                docker(&args);
            }
        }
    }
}

/// Runs the docker CLI and returns its trimmed output.
pub fn docker(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI runs");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A fresh instance when an engine answers; `None` (after a loud message) when it does not.
pub fn engine() -> Option<Instance> {
    static BUSYBOX: Once = Once::new();
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let answers = Command::new("docker")
        .args(["version", "--format", "{{.Server.APIVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !answers {
        assert!(
            std::env::var("BERTH_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "BERTH_REQUIRE_DOCKER=1 but no Docker Engine answers"
        );
        eprintln!(
            "\n*** SKIPPED: no Docker Engine answers; set BERTH_REQUIRE_DOCKER=1 to make this a failure ***\n"
        );
        return None;
    }
    // The script probes the image rather than trusting its name, and makes it again when it lacks
    // what the tests run (issue 8, item 17).
    BUSYBOX.call_once(|| {
        let status = Command::new("bash")
            .arg(busybox_script())
            .status()
            .expect("bash runs");
        assert!(
            status.success(),
            "no busybox:latest with what the tests need; tests/testbed/busybox-image.sh said why above"
        );
    });
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    Some(Instance {
        name: format!("it{}-{n}", std::process::id()),
    })
}

/// The script that makes (or checks) the test bed's busybox image.
pub fn busybox_script() -> std::path::PathBuf {
    crate_root().join("tests/testbed/busybox-image.sh")
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

impl Instance {
    pub fn berth(&self, command: &str, repo: &Repo, extra: &[&str]) -> Output {
        let mut args = vec![
            command,
            repo.path().to_str().unwrap(),
            "--instance",
            &self.name,
        ];
        args.extend(extra);
        // No Kubernetes cluster for these: stagings are skipped, as on a host without one.
        Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(&args)
            .env("BERTH_IT_FLAG", "ctf{it-secret}")
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("HOME", "/nonexistent/berth-it-home")
            .output()
            .unwrap()
    }

    pub fn apply(&self, repo: &Repo, extra: &[&str]) -> Output {
        let mut args = vec!["--wait", "20s"];
        args.extend(extra);
        let output = self.berth("apply", repo, &args);
        eprintln!(
            "--- apply\n{}{}",
            stdout(&output),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// The names of this instance's networks, one a line.
    pub fn network_names(&self) -> String {
        docker(&[
            "network",
            "ls",
            "--format",
            "{{.Name}}",
            "--filter",
            &format!("label=berth.instance={}", self.name),
        ])
    }

    /// `slot name → (id, running)` of this instance's containers for one challenge.
    pub fn containers(&self, challenge: &str) -> BTreeMap<String, (String, bool)> {
        let listed = docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=berth.instance={}", self.name),
            "--filter",
            &format!("label=berth.name={challenge}"),
            // Not a build's intermediate containers, which carry the image's labels.
            "--filter",
            "label=berth.slot",
            "--format",
            "{{.Label \"berth.slot\"}} {{.ID}} {{.State}}",
        ]);
        listed
            .lines()
            .map(|line| {
                let parts: Vec<&str> = line.split_whitespace().collect();
                (
                    parts[0].to_string(),
                    (parts[1].to_string(), parts[2] == "running"),
                )
            })
            .collect()
    }

    /// Engine events that change something, for this instance, between two times.
    pub(crate) fn writes_between(&self, since: f64, until: f64) -> Vec<String> {
        let events = docker(&[
            "events",
            "--since",
            &format!("{since:.3}"),
            "--until",
            &format!("{until:.3}"),
            "--filter",
            &format!("label=berth.instance={}", self.name),
            "--format",
            "{{.Type}} {{.Action}}",
        ]);
        events
            .lines()
            .filter(|e| !e.contains("exec_") && !e.contains("health_status"))
            .map(str::to_string)
            .collect()
    }
}

/// A challenge serving HTTP on `port`.
pub fn web(name: &str, port: u16, extra: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: {name}}}\nspec:\n  image: busybox:latest\n  command: [httpd, -f, -p, \"8080\", -h, /www]\n  ports:\n    - {{container: 8080, host: {port}}}\n{extra}"
    )
}

/// Whether appending to `path` in the container fails (a read-only mount, a file the process may
/// not write); what the shell said is printed when it did not.
pub fn write_refused(container: &str, path: &str) -> bool {
    let said = docker(&[
        "exec",
        container,
        "sh",
        "-c",
        &format!("echo x >> {path} 2>/dev/null; echo rc=$?"),
    ]);
    let refused = said.ends_with("rc=1") || said.ends_with("rc=2");
    if !refused {
        eprintln!("writing {path} in {container}: {said}");
    }
    refused
}
