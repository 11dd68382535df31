//! A real `berth agent` process for a test ([`Agent`]: its config, its HTTP API, its log, killed
//! on drop), plain HTTP to it, and signed GitHub webhook deliveries.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::engine::{Instance, web};
use crate::support::gitserver::{GitDaemon, Origin};
use crate::support::net::{free_port, http};

pub(crate) const WEBHOOK_SECRET: &str = "whsec-3b8e1f0a";
pub(crate) const API_TOKEN: &str = "api-token-71c2d9";
/// The console's read-only token of every test agent.
pub(crate) const VIEWER_TOKEN: &str = "viewer-token-5e0a41";

/// A running `berth agent`, killed on drop.
pub(crate) struct Agent {
    pub(crate) child: Option<Child>,
    /// Extra environment for the agent process.
    pub(crate) env: Vec<(String, String)>,
    /// A command and its arguments that run the agent (e.g. `prlimit --nofile=40`); none when empty.
    pub(crate) launcher: Vec<String>,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) port: u16,
    pub(crate) config: PathBuf,
}

impl Agent {
    /// Starts an agent for `instance` following `url`. `extra` is appended to the config file.
    pub(crate) fn start(instance: &Instance, url: &str, extra: &str) -> Agent {
        Agent::start_with(&instance.name, url, "", extra)
    }

    /// [`Agent::start`] with `repo_extra` added to the `repo:` section (credentials).
    pub(crate) fn start_with(instance: &str, url: &str, repo_extra: &str, extra: &str) -> Agent {
        let mut agent = Agent::configure(instance, url, repo_extra, extra);
        agent.spawn();
        agent
    }

    /// An agent's config and folder, not started yet: set [`Agent::env`] or
    /// [`Agent::launcher`], then [`Agent::spawn`].
    pub(crate) fn configure(instance: &str, url: &str, repo_extra: &str, extra: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(
            dir.path().join("webhook-secret"),
            format!("{WEBHOOK_SECRET}\n"),
        )
        .unwrap();
        std::fs::write(dir.path().join("api-token"), API_TOKEN).unwrap();
        std::fs::write(dir.path().join("viewer-token"), VIEWER_TOKEN).unwrap();
        let config = dir.path().join("agent.yaml");
        let text = format!(
            "instance: {instance}\nrepo:\n  url: {url}\n  branch: main\n{repo_extra}listen: 127.0.0.1:{port}\nwebhook: {{secretFile: {dir}/webhook-secret, maxBody: 4096}}\napi: {{tokenFile: {dir}/api-token, viewerTokenFile: {dir}/viewer-token}}\nstateDir: {dir}/state\nwait: 20s\n# Passes come from webhooks and API calls in these tests, not the clock.\nschedule: '0 0 1 1 *'\n{extra}",
            dir = dir.path().display(),
        );
        std::fs::write(&config, text).unwrap();
        Agent {
            child: None,
            env: Vec::new(),
            launcher: Vec::new(),
            dir,
            port,
            config,
        }
    }

    pub(crate) fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let berth = env!("CARGO_BIN_EXE_berth");
        let mut command = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(berth);
                command
            }
            None => Command::new(berth),
        };
        let child = command
            .args(["agent", "--config"])
            .arg(&self.config)
            .env("BERTH_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("berth agent starts");
        self.child = Some(child);
        self.wait_for("the HTTP server", || {
            TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    /// The agent's config file.
    pub(crate) fn config_path(&self) -> &std::path::Path {
        &self.config
    }

    /// The agent's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Polls `done` for up to 60 s; fails with the agent's log when it never holds.
    pub(crate) fn wait_for(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; agent log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        http(self.port, method, path, headers, body)
    }

    pub(crate) fn api(&self, method: &str, path: &str) -> (u16, String) {
        let bearer = format!("Bearer {API_TOKEN}");
        self.request(method, path, &[("Authorization", &bearer)], b"")
    }

    pub(crate) fn reconcile(&self) {
        let (code, _) = self.api("POST", "/api/v1/reconcile");
        assert_eq!(code, 202);
    }

    /// `berth_passes_total` for one result.
    pub(crate) fn passes(&self, result: &str) -> u64 {
        self.counter(&format!("berth_passes_total{{result=\"{result}\"}}"))
    }

    /// Passes ended so far, whatever their result.
    pub(crate) fn passes_total(&self) -> u64 {
        let (_, metrics) = self.api("GET", "/metrics");
        metrics
            .lines()
            .filter(|line| line.starts_with("berth_passes_total{"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// A counter of `/metrics`, by its whole name and labels (`berth_x_total{result="y"}`).
    pub(crate) fn counter(&self, series: &str) -> u64 {
        let (_, metrics) = self.api("GET", "/metrics");
        let prefix = format!("{series} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0, |n| n.trim().parse().unwrap())
    }

    pub(crate) fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub(crate) fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        child.wait().unwrap()
    }
}

impl Drop for Agent {
    /// A test that failed shows the agent's log: what it did is most of why.
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let mut from = log.len().saturating_sub(LOG_SHOWN);
            while !log.is_char_boundary(from) {
                from += 1;
            }
            let tail = &log[from..];
            eprintln!("the agent's log, its last {} bytes:\n{tail}", tail.len());
        }
    }
}

/// How much of an agent's log a failed test shows.
const LOG_SHOWN: usize = 12_000;

/// A push event as GitHub sends it (trimmed to the fields a receiver reads, same shape).
pub(crate) fn github_push(commit: &str, branch: &str) -> String {
    format!(
        r#"{{"ref":"refs/heads/{branch}","before":"0000000000000000000000000000000000000000","after":"{commit}",
"repository":{{"id":1296269,"name":"infra","full_name":"ops/infra","private":true,"default_branch":"main"}},
"pusher":{{"name":"octocat","email":"octocat@github.com"}},"sender":{{"login":"octocat","id":1}},
"created":false,"deleted":false,"forced":false,"compare":"https://github.com/ops/infra/compare/abc...def",
"commits":[{{"id":"{commit}","message":"Change the challenge","author":{{"name":"Octo Cat","email":"octocat@github.com"}}}}],
"head_commit":{{"id":"{commit}","message":"Change the challenge"}}}}"#
    )
}

/// Sends a GitHub push with a delivery id of its own, as GitHub gives each delivery.
pub(crate) fn send_github(agent: &Agent, body: &str, signature: &str) -> (u16, String) {
    static SENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let sent = SENT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    send_github_delivery(
        agent,
        body,
        signature,
        &format!("72d3162e-cc78-11e3-81ab-{sent:012}"),
    )
}

/// Sends a GitHub push with the delivery id `delivery` (a redelivery keeps its id).
pub(crate) fn send_github_delivery(
    agent: &Agent,
    body: &str,
    signature: &str,
    delivery: &str,
) -> (u16, String) {
    agent.request(
        "POST",
        "/hooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", delivery),
            ("X-Hub-Signature-256", signature),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
}

pub(crate) fn sign(body: &str) -> String {
    format!(
        "sha256={}",
        berth::webhook::sign(WEBHOOK_SECRET.as_bytes(), body.as_bytes())
    )
}

/// A repo with one web challenge on `port`, served by `git daemon`, and its first revision.
pub(crate) fn served_web(port: u16) -> (Origin, GitDaemon, String) {
    let origin = Origin::new(&[("challenges/web.yaml", &web("web", port, ""))]);
    let first = origin.bare_git(&["rev-parse", "main"]);
    let daemon = GitDaemon::start(&origin);
    (origin, daemon, first)
}

/// Whether the status branch's agent.yaml says `revision` was applied.
pub(crate) fn applied(origin: &Origin, revision: &str) -> bool {
    origin
        .show("berth-status:status/agent.yaml")
        .is_some_and(|s| s.contains(&format!("lastAppliedRevision: {revision}")))
}

pub(crate) fn container_ids(instance: &Instance, name: &str) -> Vec<String> {
    instance
        .containers(name)
        .values()
        .filter(|(_, running)| *running)
        .map(|(id, _)| id.clone())
        .collect()
}
