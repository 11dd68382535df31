//! What the benches share: git, a free port and one HTTP request (the tests' own, from
//! `tests/it/support/net.rs`), a `git daemon` on loopback, process memory,
//! medians and clean-up of an instance's containers. Included by each bench with `#[path]`.
#![allow(dead_code)]

#[path = "../../tests/it/support/net.rs"]
mod net;
#[allow(unused_imports)] // Each bench takes what it needs of them.
pub use net::{free_port, git, http};

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A field of `/proc/PID/status` in KiB (`VmRSS:`, `VmHWM:`, `RssAnon:`).
pub fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The median.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Whether a Docker Engine answers; says so when none does.
pub fn engine_answers() -> bool {
    let answers = Command::new("docker")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !answers {
        eprintln!("no Docker Engine answers; this benchmark needs one");
    }
    answers
}

/// Removes every container of berth instance `instance`.
pub fn remove_instance(instance: &str) {
    let ids = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=berth.instance={instance}"),
        ])
        .output()
        .unwrap();
    let ids = String::from_utf8_lossy(&ids.stdout).into_owned();
    let ids: Vec<&str> = ids.split_whitespace().collect();
    for chunk in ids.chunks(200) {
        Command::new("docker")
            .args(["rm", "-f"])
            .args(chunk)
            .output()
            .unwrap();
    }
}

/// Writes an agent's webhook secret, API token and config into `state` (its state folder is
/// `state/state`), following `url` on a free port, with `extra` settings appended; returns the
/// config's path and the port.
pub fn agent_config(
    state: &Path,
    instance: &str,
    url: &str,
    (secret, token): (&str, &str),
    extra: &str,
) -> (PathBuf, u16) {
    std::fs::write(state.join("secret"), secret).unwrap();
    std::fs::write(state.join("token"), token).unwrap();
    let port = free_port();
    let config = state.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "instance: {instance}\nrepo: {{url: \"{url}\"}}\nlisten: 127.0.0.1:{port}\nwebhook: {{secretFile: {s}/secret}}\napi: {{tokenFile: {s}/token}}\nstateDir: {s}/state\nschedule: '0 0 1 1 *'\n{extra}",
            s = state.display()
        ),
    )
    .unwrap();
    (config, port)
}

/// `berth agent` on `config`, its output thrown away, killed when the guard goes; and its pid.
pub fn start_agent(config: &Path) -> (KilledOnDrop, u32) {
    let agent = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["agent", "--config"])
        .arg(config)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = agent.id();
    (KilledOnDrop(agent), pid)
}

/// A child process killed when this goes, even when the bench panics.
pub struct KilledOnDrop(pub Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `git daemon` serving the bare repos under `served` on a free loopback port, with push allowed.
pub fn git_daemon(served: &Path) -> (Child, u16) {
    let exec_path = PathBuf::from(git(served, &["--exec-path"]));
    let daemon_port = free_port();
    let daemon = Command::new(exec_path.join("git-daemon"))
        .args([
            "--reuseaddr",
            "--export-all",
            "--enable=receive-pack",
            "--listen=127.0.0.1",
        ])
        .arg(format!("--port={daemon_port}"))
        .arg(format!("--base-path={}", served.display()))
        .arg(served)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while TcpStream::connect(("127.0.0.1", daemon_port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    (daemon, daemon_port)
}

/// The test cluster (`tests/testbed/kube-up.sh`, started when it is not up): its kubeconfig.
pub fn test_cluster() -> PathBuf {
    let up = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/testbed/kube-up.sh"
        ))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(up.status.success(), "kube-up.sh failed");
    PathBuf::from(
        String::from_utf8_lossy(&up.stdout)
            .lines()
            .last()
            .expect("kube-up.sh prints the kubeconfig path last")
            .trim(),
    )
}
