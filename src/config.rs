//! The agent's configuration: one YAML file, every setting also an environment variable
//! (`BERTH_…`, which wins over the file), and the secrets it names read once at start.
//!
//! Pure apart from [`AgentConfig::load`] and [`Secrets::read`]: [`AgentConfig::from_text`] takes the
//! file's text and an environment lookup, so every rule is unit-tested without touching the process.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::descriptor::values::{CronExpr, Duration};
use crate::descriptor::{Name, yaml};

/// The agent's config file (`berth agent --config`) as a JSON Schema, for editors: `agent.json`.
pub fn schema() -> Value {
    crate::descriptor::schema::root_schema::<AgentConfig>("agent.json", "berth agent config")
}

/// The default schedule: every three minutes.
pub const DEFAULT_SCHEDULE: &str = "*/3 * * * *";

/// Every environment variable the agent reads, the setting it overrides (a JSON pointer into the
/// config file) and the setting's type. The README's table is checked against this list.
pub const ENVIRONMENT: &[(&str, &str, EnvType)] = &[
    ("BERTH_INSTANCE", "/instance", EnvType::Text),
    ("BERTH_REPO_URL", "/repo/url", EnvType::Text),
    ("BERTH_REPO_BRANCH", "/repo/branch", EnvType::Text),
    ("BERTH_REPO_WEB_URL", "/repo/webUrl", EnvType::Text),
    ("BERTH_REPO_USERNAME", "/repo/auth/username", EnvType::Text),
    (
        "BERTH_REPO_TOKEN_FILE",
        "/repo/auth/tokenFile",
        EnvType::Text,
    ),
    (
        "BERTH_REPO_PASSWORD_FILE",
        "/repo/auth/passwordFile",
        EnvType::Text,
    ),
    (
        "BERTH_REPO_SSH_KEY_FILE",
        "/repo/auth/sshKeyFile",
        EnvType::Text,
    ),
    (
        "BERTH_REPO_KNOWN_HOSTS_FILE",
        "/repo/auth/knownHostsFile",
        EnvType::Text,
    ),
    ("BERTH_SCHEDULE", "/schedule", EnvType::Text),
    ("BERTH_LISTEN", "/listen", EnvType::Text),
    (
        "BERTH_WEBHOOK_SECRET_FILE",
        "/webhook/secretFile",
        EnvType::Text,
    ),
    (
        "BERTH_WEBHOOK_MAX_BODY",
        "/webhook/maxBody",
        EnvType::Integer,
    ),
    (
        "BERTH_WEBHOOK_MAX_CONCURRENT",
        "/webhook/maxConcurrent",
        EnvType::Integer,
    ),
    (
        "BERTH_HTTP_MAX_CONNECTIONS",
        "/http/maxConnections",
        EnvType::Integer,
    ),
    (
        "BERTH_HTTP_HEADER_TIMEOUT",
        "/http/headerTimeout",
        EnvType::Text,
    ),
    (
        "BERTH_HTTP_BODY_TIMEOUT",
        "/http/bodyTimeout",
        EnvType::Text,
    ),
    (
        "BERTH_HTTP_HEALTH_LISTEN",
        "/http/healthListen",
        EnvType::Text,
    ),
    ("BERTH_API_TOKEN_FILE", "/api/tokenFile", EnvType::Text),
    (
        "BERTH_API_VIEWER_TOKEN_FILE",
        "/api/viewerTokenFile",
        EnvType::Text,
    ),
    (
        "BERTH_HTTP_SECURE_COOKIES",
        "/http/secureCookies",
        EnvType::Bool,
    ),
    ("BERTH_STATUS_BRANCH", "/statusBranch", EnvType::Text),
    ("BERTH_PRUNE", "/prune", EnvType::Bool),
    ("BERTH_PRUNE_ALLOW_EMPTY", "/pruneAllowEmpty", EnvType::Bool),
    ("BERTH_MIN_INTERVAL", "/minInterval", EnvType::Text),
    ("BERTH_DRIFT_CHECK", "/driftCheck", EnvType::Bool),
    ("BERTH_CONCURRENCY", "/concurrency", EnvType::Integer),
    ("BERTH_WAIT", "/wait", EnvType::Text),
    ("BERTH_STATE_DIR", "/stateDir", EnvType::Text),
    ("BERTH_KUBECONFIG", "/kube/kubeconfig", EnvType::Text),
    ("BERTH_KUBE_CONTEXT", "/kube/context", EnvType::Text),
    (
        "BERTH_CHALLENGE_NAMESPACE",
        "/kube/challengeNamespace",
        EnvType::Text,
    ),
    (
        "BERTH_NODE_PORT_RANGE",
        "/kube/nodePortRange",
        EnvType::Text,
    ),
    ("BERTH_DEFAULT_TARGET", "/defaultTarget", EnvType::Text),
    ("BERTH_ALLOW_PRIVILEGED", "/allowPrivileged", EnvType::Bool),
    (
        "BERTH_LEADER_ELECTION_NAMESPACE",
        "/leaderElection/namespace",
        EnvType::Text,
    ),
    (
        "BERTH_PIPELINES_WORKERS",
        "/pipelines/workers",
        EnvType::Integer,
    ),
    (
        "BERTH_PIPELINES_LOG_CAP",
        "/pipelines/logCap",
        EnvType::Integer,
    ),
    (
        "BERTH_PIPELINES_WORKSPACE_LIMIT",
        "/pipelines/workspaceLimit",
        EnvType::Text,
    ),
    (
        "BERTH_INSTANCES_HOST_PORTS",
        "/instances/hostPorts",
        EnvType::Text,
    ),
    (
        "BERTH_INSTANCES_FLAG_KEY_FILE",
        "/instances/flagKeyFile",
        EnvType::Text,
    ),
    ("BERTH_INSTANCES_HOST", "/instances/host", EnvType::Text),
];

/// How an environment variable's text becomes a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvType {
    /// Taken as written.
    Text,
    /// `true`/`false`/`1`/`0`/`yes`/`no`.
    Bool,
    /// A whole number.
    Integer,
}

/// The agent's settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// Name of this berth instance; instances sharing an engine never touch each other's objects.
    #[serde(default = "default_instance")]
    pub instance: Name,
    /// The config repo to follow.
    pub repo: RepoConfig,
    /// When to fetch and reconcile, as a 5-field cron expression.
    #[serde(default = "default_schedule")]
    pub schedule: CronExpr,
    /// Address of the HTTP server (webhooks, health, metrics, API); no server when absent.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// How long and how many clients the HTTP server serves.
    #[serde(default)]
    pub http: HttpConfig,
    /// Webhook settings; webhooks are refused when absent.
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// API settings; the API is refused when absent.
    #[serde(default)]
    pub api: Option<ApiConfig>,
    /// Branch status is committed to; `""` commits under `.berth/status/` on the followed branch.
    #[serde(default = "default_status_branch")]
    pub status_branch: String,
    /// Delete what the repo no longer declares.
    #[serde(default)]
    pub prune: bool,
    /// Let a prune delete every object the instance owns; without it, a revision that would is
    /// held (nothing deleted) and status says why.
    #[serde(default)]
    pub prune_allow_empty: bool,
    /// Shortest time between two passes, unless a webhook announces a commit not seen yet:
    /// triggers arriving sooner wait and are served by one pass.
    #[serde(default = "default_min_interval")]
    pub min_interval: Duration,
    /// Compare with the engine on every trigger, even when the revision did not move.
    #[serde(default = "default_true")]
    pub drift_check: bool,
    /// Most steps applied at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// How long the agent keeps re-checking objects that are still becoming healthy (a pass never
    /// waits for them).
    #[serde(default = "default_wait")]
    pub wait: Duration,
    /// Where the agent keeps its clone.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The Kubernetes cluster Stagings go to; without it, `KUBECONFIG`, `~/.kube/config` or the
    /// pod's service account, and with none of those Stagings are skipped.
    #[serde(default)]
    pub kube: Option<KubeConfig>,
    /// Leader election among agents following the same repo (replicas of a Deployment): only the
    /// holder of a Lease applies; none when absent.
    #[serde(default)]
    pub leader_election: Option<LeaderElectionConfig>,
    /// Where a Challenge without a `target` runs: `docker` (the default) or `kubernetes`.
    #[serde(default)]
    pub default_target: crate::descriptor::model::Engine,
    /// How Pipeline runs are carried out.
    #[serde(default)]
    pub pipelines: PipelinesConfig,
    /// Where per-team instances of instanced Challenges are published, and the key of their flags.
    #[serde(default)]
    pub instances: InstancesConfig,
    /// Limits for containers whose descriptor leaves them out (never unlimited: what is not set
    /// here takes the built-in value).
    #[serde(default)]
    pub defaults: crate::descriptor::security::Defaults,
    /// Accept Challenges with `security.privileged: true`; refused at validation otherwise.
    #[serde(default)]
    pub allow_privileged: bool,
}

/// How the agent carries out Pipeline runs.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelinesConfig {
    /// Most runs at once, over all pipelines (each pipeline's `concurrency` limits its own).
    #[serde(default = "default_workers")]
    #[schemars(range(min = 1, max = 64))]
    pub workers: u32,
    /// Largest log kept per run, in bytes; a longer log keeps its head and tail.
    #[serde(default = "default_log_cap")]
    #[schemars(range(min = 1024))]
    pub log_cap: usize,
    /// The most a run may write to disk: its workspace (the source as copied in, and what the
    /// steps add) and its container's own layer; `4Gi` by default. A source over it never
    /// starts; steps that write past it are stopped and the run fails, saying so.
    #[serde(default = "default_workspace_limit")]
    pub workspace_limit: crate::descriptor::values::Size,
}

impl Default for PipelinesConfig {
    fn default() -> PipelinesConfig {
        PipelinesConfig {
            workers: default_workers(),
            log_cap: default_log_cap(),
            workspace_limit: default_workspace_limit(),
        }
    }
}

/// Per-team instances: where they are published and the key of their flags.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstancesConfig {
    /// The host ports instances are published on, as `FIRST-LAST`; `20000-29999` by default,
    /// below the range Linux takes outgoing ports from (`net.ipv4.ip_local_port_range`, from
    /// 32768), where a port may be taken the moment an instance needs it.
    #[serde(default)]
    #[schemars(regex(pattern = r"^[0-9]{1,5}-[0-9]{1,5}$"))]
    pub host_ports: Option<String>,
    /// A file holding the key flags are derived from; `instance-flags.key` in the state folder,
    /// made at random on first use, unless set. Agents under leader election need the same one.
    #[serde(default)]
    pub flag_key_file: Option<PathBuf>,
    /// The host name teams connect to, as the API's endpoints give it; this machine's host name
    /// unless set.
    #[serde(default)]
    pub host: Option<String>,
}

impl InstancesConfig {
    /// The host ports instances are published on.
    pub fn host_ports(&self) -> std::ops::RangeInclusive<u16> {
        self.host_ports
            .as_deref()
            .and_then(|range| node_port_range(range).ok())
            .unwrap_or(crate::descriptor::load::DEFAULT_INSTANCE_PORTS)
    }
}

/// The largest workspace of a pipeline run, when the agent's settings name none: 4 GiB.
pub const DEFAULT_WORKSPACE_LIMIT: u64 = 4 << 30;

fn default_workers() -> u32 {
    2
}

fn default_workspace_limit() -> crate::descriptor::values::Size {
    crate::descriptor::values::Size {
        bytes: DEFAULT_WORKSPACE_LIMIT,
    }
}

fn default_log_cap() -> usize {
    crate::run::DEFAULT_LOG_CAP
}

/// Which Lease the agents elect their leader with.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaderElectionConfig {
    /// The namespace of the Lease (the agents' own).
    pub namespace: Name,
    /// The Lease's name; `berth-agent` by default.
    #[serde(default = "default_lease")]
    pub lease: Name,
    /// How long a Lease holds without renewal; a standby takes over this long after the leader
    /// dies. 15s by default.
    #[serde(default = "default_lease_duration")]
    pub lease_duration: Duration,
}

fn default_lease() -> Name {
    "berth-agent".parse().expect("a valid name")
}

fn default_lease_duration() -> Duration {
    Duration(std::time::Duration::from_secs(15))
}

/// How to reach the Kubernetes cluster.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeConfig {
    /// A kubeconfig file.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The context to use in it; its current context when absent.
    #[serde(default)]
    pub context: Option<String>,
    /// The namespace Challenges with `target: kubernetes` run in; `berth-challenges` by default.
    /// berth makes it when it is missing.
    #[serde(default)]
    pub challenge_namespace: Option<Name>,
    /// The cluster's NodePort range (its API server's `--service-node-port-range`), as `FIRST-LAST`;
    /// `30000-32767` by default. A host port of a Challenge on Kubernetes must be in it.
    #[serde(default)]
    #[schemars(regex(pattern = r"^[0-9]{1,5}-[0-9]{1,5}$"))]
    pub node_port_range: Option<String>,
}

/// A port range as `FIRST-LAST` (a cluster's NodePorts, instances' host ports), checked.
pub fn node_port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>, NotAPortRange> {
    let parsed = text.split_once('-').and_then(|(first, last)| {
        Some((
            first.trim().parse::<u16>().ok()?,
            last.trim().parse::<u16>().ok()?,
        ))
    });
    match parsed {
        Some((first, last)) if first >= 1 && first <= last => Ok(first..=last),
        _ => Err(NotAPortRange(text.into())),
    }
}

/// A port range as written that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "port range \"{0}\" is not FIRST-LAST with 1 <= FIRST <= LAST <= 65535, such as 30000-32767"
)]
pub struct NotAPortRange(pub String);

/// The repo to follow.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RepoConfig {
    /// `https://…`, `http://…`, `ssh://…`, `git@host:path`, `git://…`, `file://…` or a local path.
    pub url: String,
    /// The branch to follow.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// Credentials, by reference to files.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// The repo's web view (`https://git.example.org/ops/ctf`): the console links a problem to
    /// `WEBURL/blob/REVISION/FILE#LLINE` there.
    #[serde(default)]
    pub web_url: Option<String>,
}

/// Credentials for the repo: a token, a user and password, or an SSH key; each read from a file.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    /// User name for HTTP(S) (default `git`) or SSH (default from the URL, else `git`).
    pub username: Option<String>,
    /// File holding an access token, sent as the HTTP password.
    pub token_file: Option<PathBuf>,
    /// File holding the HTTP password.
    pub password_file: Option<PathBuf>,
    /// Private key for SSH.
    pub ssh_key_file: Option<PathBuf>,
    /// `known_hosts` file the SSH server's key must be listed in.
    pub known_hosts_file: Option<PathBuf>,
}

/// Webhook settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookConfig {
    /// File holding the shared secret.
    pub secret_file: PathBuf,
    /// Largest body accepted, in bytes; larger deliveries get 413.
    #[serde(default = "default_max_body")]
    pub max_body: usize,
    /// Most deliveries whose bodies are read at once; more get 503 with `Retry-After`. With
    /// `maxBody`, this bounds the memory webhooks can hold.
    #[serde(default = "default_max_concurrent_webhooks")]
    pub max_concurrent: usize,
}

/// Limits on the HTTP server's clients, so slow or idle ones cannot hold the agent's memory and
/// file descriptors.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpConfig {
    /// Most client connections open at once; further clients wait in the kernel's queue. Never
    /// more than half the process's open-file limit, so git and the engine keep the other half.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Longest wait for a request's headers, and how long an idle kept-alive connection stays open.
    #[serde(default = "default_http_timeout")]
    pub header_timeout: Duration,
    /// Longest time to receive a request's body and answer it; slower clients get 408.
    #[serde(default = "default_http_timeout")]
    pub body_timeout: Duration,
    /// A second address serving only `/healthz` and `/readyz`, with slots of its own and a
    /// one-second timeout: probes answered there within a second whatever floods `listen`.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// Marks the console's cookies `Secure`: set it when the agent is served through TLS (a
    /// proxy in front of it), so a browser never sends them in the clear.
    #[serde(default)]
    pub secure_cookies: bool,
}

impl Default for HttpConfig {
    fn default() -> HttpConfig {
        HttpConfig {
            max_connections: default_max_connections(),
            header_timeout: default_http_timeout(),
            body_timeout: default_http_timeout(),
            health_listen: None,
            secure_cookies: false,
        }
    }
}

/// API settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiConfig {
    /// File holding the bearer token.
    pub token_file: PathBuf,
    /// File holding the viewer token: the web console, read only.
    #[serde(default)]
    pub viewer_token_file: Option<PathBuf>,
}

fn default_instance() -> Name {
    "default".parse().expect("valid name")
}
fn default_schedule() -> CronExpr {
    DEFAULT_SCHEDULE.parse().expect("valid schedule")
}
fn default_status_branch() -> String {
    "berth-status".into()
}
fn default_true() -> bool {
    true
}
fn default_concurrency() -> usize {
    8
}
fn default_min_interval() -> Duration {
    "1s".parse().expect("valid duration")
}
fn default_wait() -> Duration {
    "60s".parse().expect("valid duration")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/berth")
}
fn default_branch() -> String {
    "main".into()
}
fn default_max_body() -> usize {
    1 << 20
}
fn default_max_concurrent_webhooks() -> usize {
    8
}
fn default_max_connections() -> usize {
    // Far more than webhooks, the API and a scraper need; each idle connection costs about 25 KiB.
    256
}
fn default_http_timeout() -> Duration {
    "10s".parse().expect("valid duration")
}

/// Why the configuration cannot be used. Messages name the file, line and column, or the
/// environment variable, and never a secret's value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl AgentConfig {
    /// Reads `path` (when given) and the process environment.
    pub fn load(path: Option<&Path>) -> Result<AgentConfig, ConfigError> {
        let (name, text) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(format!(
                        "{}: cannot read the agent config: {e}",
                        path.display()
                    ))
                })?;
                (path.display().to_string(), text)
            }
            None => ("(environment)".to_string(), String::new()),
        };
        AgentConfig::from_text(&name, &text, |var| std::env::var(var).ok())
    }

    /// Parses the config file's `text` (named `file` in messages), then applies the environment.
    pub fn from_text(
        file: &str,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<AgentConfig, ConfigError> {
        let stream = yaml::parse(text, true);
        if let Some(fatal) = stream.fatal {
            return Err(ConfigError(format!(
                "{file}:{}:{}: {}",
                fatal.at.line, fatal.at.column, fatal.message
            )));
        }
        let mut document = stream.documents.into_iter().next();
        if let Some(problem) = document.as_ref().and_then(|d| d.problems.first()) {
            return Err(ConfigError(format!(
                "{file}:{}:{}: {}",
                problem.at.line, problem.at.column, problem.message
            )));
        }
        let mut value = match document.as_mut().map(|d| d.value.take()) {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(value @ Value::Object(_)) => value,
            Some(_) => {
                return Err(ConfigError(format!(
                    "{file}:1:1: the agent config must be a mapping of settings (instance, repo, schedule, …)"
                )));
            }
        };
        let mut from_env = Vec::new();
        for (var, pointer, kind) in ENVIRONMENT {
            let Some(text) = env(var) else { continue };
            let setting = match kind {
                EnvType::Text => Value::String(text),
                EnvType::Bool => match text.to_ascii_lowercase().as_str() {
                    "1" | "true" | "yes" => Value::Bool(true),
                    "0" | "false" | "no" | "" => Value::Bool(false),
                    _ => {
                        return Err(ConfigError(format!(
                            "{var}={text:?} is not a boolean; use true or false"
                        )));
                    }
                },
                EnvType::Integer => match text.parse::<u64>() {
                    Ok(n) => Value::from(n),
                    Err(_) => {
                        return Err(ConfigError(format!("{var}={text:?} is not a whole number")));
                    }
                },
            };
            set_pointer(&mut value, pointer, setting);
            from_env.push((*pointer, *var));
        }
        let config: AgentConfig = serde_path_to_error::deserialize(&value).map_err(|error| {
            let pointer = to_pointer(error.path());
            let place = from_env
                .iter()
                .find(|(p, _)| pointer.starts_with(p))
                .map(|(_, var)| format!("{var} (environment)"))
                .or_else(|| {
                    let positions = &document.as_ref()?.positions;
                    let mut at = pointer.as_str();
                    loop {
                        if let Some(found) = positions.get(at) {
                            let p = found.key.unwrap_or(found.value);
                            return Some(format!("{file}:{}:{}", p.line, p.column));
                        }
                        at = &at[..at.rfind('/')?];
                    }
                })
                .unwrap_or_else(|| file.to_string());
            let setting = pointer.trim_start_matches('/').replace('/', ".");
            let setting = if setting.is_empty() {
                String::new()
            } else {
                format!("{setting}: ")
            };
            ConfigError(format!("{place}: {setting}{}", error.inner()))
        })?;
        config.check(file, &from_env)?;
        Ok(config)
    }

    /// Checks what the types cannot; `from_env` names the settings the environment gave, so an
    /// error names the variable, not the file.
    fn check(&self, file: &str, from_env: &[(&str, &str)]) -> Result<(), ConfigError> {
        let place = |pointer: &str| {
            from_env
                .iter()
                .find(|(p, _)| *p == pointer)
                .map_or(file.to_string(), |(_, var)| format!("{var} (environment)"))
        };
        let branches = [
            ("/repo/branch", "repo.branch", &self.repo.branch),
            ("/statusBranch", "statusBranch", &self.status_branch),
        ];
        for (pointer, setting, branch) in branches {
            let written_on_followed = pointer == "/statusBranch" && branch.is_empty();
            if !written_on_followed && !is_branch_name(branch) {
                return Err(ConfigError(format!(
                    "{}: {setting}: {branch:?} is not a branch name git accepts: a name such as main or berth-status, without refs/, `..`, spaces or any of ~^:?*[\\",
                    place(pointer)
                )));
            }
        }
        if let Some(auth) = &self.repo.auth {
            let given = [
                auth.token_file.is_some(),
                auth.password_file.is_some(),
                auth.ssh_key_file.is_some(),
            ];
            if given.iter().filter(|g| **g).count() > 1 {
                return Err(ConfigError(format!(
                    "{file}: repo.auth: give one of tokenFile, passwordFile or sshKeyFile"
                )));
            }
        }
        if self.status_branch == self.repo.branch {
            return Err(ConfigError(format!(
                "{file}: statusBranch is the followed branch \"{}\"; use statusBranch: \"\" to write status under .berth/status/ on it",
                self.repo.branch
            )));
        }
        let at_least_one = [
            ("concurrency", self.concurrency),
            ("http.maxConnections", self.http.max_connections),
            (
                "webhook.maxConcurrent",
                self.webhook.as_ref().map_or(1, |w| w.max_concurrent),
            ),
        ];
        for (setting, value) in at_least_one {
            if value == 0 {
                return Err(ConfigError(format!("{file}: {setting} must be at least 1")));
            }
        }
        if let Some(range) = self
            .kube
            .as_ref()
            .and_then(|k| k.node_port_range.as_deref())
        {
            node_port_range(range)
                .map_err(|why| ConfigError(format!("{file}: kube.nodePortRange: {why}")))?;
        }
        if let Some(range) = &self.instances.host_ports {
            node_port_range(range)
                .map_err(|why| ConfigError(format!("{file}: instances.hostPorts: {why}")))?;
        }
        for (setting, value) in [
            ("http.headerTimeout", self.http.header_timeout),
            ("http.bodyTimeout", self.http.body_timeout),
        ] {
            if value.0.is_zero() {
                return Err(ConfigError(format!(
                    "{file}: {setting} must be longer than 0s"
                )));
            }
        }
        Ok(())
    }

    /// How the agent loads the repo: where Challenges go, and the cluster's NodePort range.
    pub fn load_options(&self) -> crate::descriptor::LoadOptions {
        let node_ports = self
            .kube
            .as_ref()
            .and_then(|k| k.node_port_range.as_deref())
            .and_then(|range| node_port_range(range).ok())
            .unwrap_or(crate::descriptor::load::DEFAULT_NODE_PORTS);
        crate::descriptor::LoadOptions {
            default_target: self.default_target,
            node_ports,
            instance_ports: self.instances.host_ports(),
            walls: crate::descriptor::security::Walls {
                defaults: self.defaults.clone().completed(),
                allow_privileged: self.allow_privileged,
            },
            ..Default::default()
        }
    }

    /// The local folder `repo.url` names, when it names one (a path or `file://`): the agent watches it.
    pub fn local_repo(&self) -> Option<PathBuf> {
        let url = &self.repo.url;
        if let Some(path) = url.strip_prefix("file://") {
            return Some(PathBuf::from(path));
        }
        let is_url = url.contains("://") || scp_like(url);
        (!is_url).then(|| PathBuf::from(url))
    }
}

/// Whether git accepts `name` as a branch (`refs/heads/NAME` is a valid reference name), given
/// short: not `refs/…`, not an option.
fn is_branch_name(name: &str) -> bool {
    !name.starts_with("refs/")
        && !name.starts_with('-')
        && git2::Reference::is_valid_name(&format!("refs/heads/{name}"))
}

/// `git@host:path`: a host before the first colon, no slash before it.
fn scp_like(url: &str) -> bool {
    match url.split_once(':') {
        Some((host, _)) => !host.is_empty() && !host.contains('/'),
        None => false,
    }
}

fn set_pointer(root: &mut Value, pointer: &str, setting: Value) {
    let mut node = root;
    let mut parts = pointer.trim_start_matches('/').split('/').peekable();
    while let Some(part) = parts.next() {
        if !node.is_object() {
            *node = Value::Object(Default::default());
        }
        let map = node.as_object_mut().expect("made an object");
        if parts.peek().is_none() {
            map.insert(part.to_string(), setting);
            return;
        }
        node = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
}

fn to_pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut pointer = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Map { key } => pointer.push_str(&format!("/{key}")),
            Segment::Seq { index } => pointer.push_str(&format!("/{index}")),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    pointer
}

/// A secret read from a file. Shown as `<secret>`, so it cannot end up in a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret held in memory.
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret file, without its trailing line break.
    pub fn read(path: &Path, what: &str) -> Result<Secret, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "cannot read the {what} from {}: {e}",
                path.display()
            ))
        })?;
        let value = text.trim_end_matches(['\r', '\n']).to_string();
        if value.is_empty() {
            return Err(ConfigError(format!("{} ({what}) is empty", path.display())));
        }
        Ok(Secret(value))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

/// The secrets the configuration names, read at start so a missing file stops the agent at once.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// HTTP password or token for the repo.
    pub repo_password: Option<Secret>,
    /// The webhook secret.
    pub webhook: Option<Secret>,
    /// The API bearer token.
    pub api_token: Option<Secret>,
    /// The console's read-only token.
    pub viewer_token: Option<Secret>,
}

impl Secrets {
    /// Reads every secret file `config` names.
    pub fn read(config: &AgentConfig) -> Result<Secrets, ConfigError> {
        let auth = config.repo.auth.clone().unwrap_or_default();
        let repo_password = match (&auth.token_file, &auth.password_file) {
            (Some(path), _) => Some(Secret::read(path, "repo token")?),
            (None, Some(path)) => Some(Secret::read(path, "repo password")?),
            (None, None) => None,
        };
        let webhook = match &config.webhook {
            Some(webhook) => Some(Secret::read(&webhook.secret_file, "webhook secret")?),
            None => None,
        };
        let api_token = match &config.api {
            Some(api) => Some(Secret::read(&api.token_file, "API token")?),
            None => None,
        };
        let viewer_token = match config
            .api
            .as_ref()
            .and_then(|a| a.viewer_token_file.as_ref())
        {
            Some(path) => Some(Secret::read(path, "viewer token")?),
            None => None,
        };
        Ok(Secrets {
            repo_password,
            webhook,
            api_token,
            viewer_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<AgentConfig, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        AgentConfig::from_text("agent.yaml", text, |var| env.get(var).cloned())
    }

    #[test]
    fn where_challenges_go_and_the_leader_election_come_from_the_file_or_the_environment() {
        let text =
            "repo: {url: /r}\ndefaultTarget: kubernetes\nkube: {nodePortRange: 20000-20100}\n";
        let config = parse(text, &[]).unwrap();
        let options = config.load_options();
        assert_eq!(options.default_target, crate::plan::Engine::Kubernetes);
        assert_eq!(options.node_ports, 20000..=20100);
        assert!(config.leader_election.is_none());
        let elected = parse(
            "repo: {url: /r}\n",
            &[("BERTH_LEADER_ELECTION_NAMESPACE", "berth")],
        )
        .unwrap();
        let election = elected.leader_election.unwrap();
        assert_eq!(
            (election.namespace.as_str(), election.lease.as_str()),
            ("berth", "berth-agent")
        );
        let error = parse("repo: {url: /r}\nkube: {nodePortRange: 9-1}\n", &[]).unwrap_err();
        assert!(error.to_string().contains("kube.nodePortRange"), "{error}");
    }

    #[test]
    fn the_documented_example_parses_with_its_defaults() {
        let config = parse(
            "instance: ctf\nrepo:\n  url: https://git.example.org/ops/infra.git\n  auth: {tokenFile: /etc/berth/git-token}\nlisten: 127.0.0.1:8700\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.instance.to_string(), "ctf");
        assert_eq!(config.repo.branch, "main");
        assert_eq!(config.schedule.to_string(), DEFAULT_SCHEDULE);
        assert_eq!(config.status_branch, "berth-status");
        assert!(config.drift_check && !config.prune);
        assert_eq!(config.listen, Some("127.0.0.1:8700".parse().unwrap()));
        assert_eq!(config.local_repo(), None);
    }

    #[test]
    fn the_sample_repos_example_config_is_valid_and_every_variable_is_documented() {
        let config = parse(include_str!("../sample-repo/agent.yaml"), &[]).unwrap();
        assert_eq!(config.status_branch, "berth-status");
        let readme = include_str!("../README.md");
        for (var, _, _) in ENVIRONMENT {
            assert!(
                readme.contains(&format!("`{var}`")),
                "README does not document {var}"
            );
        }
    }

    #[test]
    fn the_environment_wins_over_the_file_and_can_stand_alone() {
        let config = parse(
            "repo: {url: /srv/infra}\nprune: false\n",
            &[
                ("BERTH_PRUNE", "true"),
                ("BERTH_REPO_BRANCH", "prod"),
                ("BERTH_CONCURRENCY", "3"),
            ],
        )
        .unwrap();
        assert!(config.prune);
        assert_eq!(config.repo.branch, "prod");
        assert_eq!(config.concurrency, 3);
        assert_eq!(config.local_repo(), Some(PathBuf::from("/srv/infra")));
        let only_env = parse("", &[("BERTH_REPO_URL", "git@host:ops/infra.git")]).unwrap();
        assert_eq!(only_env.local_repo(), None);
    }

    #[test]
    fn a_mistake_in_the_file_is_placed_at_its_line_and_column() {
        let error = parse("repo:\n  url: /srv/infra\n  brnach: main\n", &[]).unwrap_err();
        assert!(error.0.starts_with("agent.yaml:3:3: repo"), "{}", error.0);
        assert!(error.0.contains("unknown field `brnach`"), "{}", error.0);
        let error = parse("repo: {url: /x}\nschedule: '* * *'\n", &[]).unwrap_err();
        assert!(
            error.0.starts_with("agent.yaml:2:1: schedule: "),
            "{}",
            error.0
        );
        assert!(error.0.contains("expected 5"), "{}", error.0);
    }

    #[test]
    fn a_mistake_in_the_environment_names_the_variable() {
        let error = parse("repo: {url: /x}\n", &[("BERTH_LISTEN", "localhost")]).unwrap_err();
        assert!(
            error.0.starts_with("BERTH_LISTEN (environment): listen: "),
            "{}",
            error.0
        );
        let error = parse("repo: {url: /x}\n", &[("BERTH_PRUNE", "maybe")]).unwrap_err();
        assert!(error.0.contains("BERTH_PRUNE"), "{}", error.0);
    }

    #[test]
    fn conflicting_settings_are_refused() {
        let two_secrets = "repo: {url: /x, auth: {tokenFile: /a, sshKeyFile: /b}}\n";
        assert!(
            parse(two_secrets, &[])
                .unwrap_err()
                .0
                .contains("give one of")
        );
        let same_branch = "repo: {url: /x}\nstatusBranch: main\n";
        assert!(
            parse(same_branch, &[])
                .unwrap_err()
                .0
                .contains("statusBranch: \"\"")
        );
        assert!(
            parse("", &[])
                .unwrap_err()
                .0
                .contains("missing field `repo`")
        );
    }

    #[test]
    fn the_http_servers_limits_have_defaults_and_refuse_zero() {
        let config = parse("repo: {url: /x}\n", &[]).unwrap();
        assert_eq!(config.http.max_connections, 256);
        assert_eq!(config.http.header_timeout.0.as_secs(), 10);
        let config = parse(
            "repo: {url: /x}\nwebhook: {secretFile: /s}\n",
            &[
                ("BERTH_HTTP_MAX_CONNECTIONS", "64"),
                ("BERTH_HTTP_BODY_TIMEOUT", "2s"),
                ("BERTH_WEBHOOK_MAX_CONCURRENT", "3"),
            ],
        )
        .unwrap();
        assert_eq!(config.http.max_connections, 64);
        assert_eq!(config.http.body_timeout.0.as_secs(), 2);
        assert_eq!(config.webhook.unwrap().max_concurrent, 3);
        for (text, setting) in [
            ("http: {maxConnections: 0}", "http.maxConnections"),
            ("http: {headerTimeout: 0s}", "http.headerTimeout"),
            (
                "webhook: {secretFile: /s, maxConcurrent: 0}",
                "webhook.maxConcurrent",
            ),
        ] {
            let error = parse(&format!("repo: {{url: /x}}\n{text}\n"), &[]).unwrap_err();
            assert!(error.0.contains(setting), "{}", error.0);
        }
    }

    #[test]
    fn branch_names_follow_gits_rules_and_errors_name_the_variable() {
        let base = "repo: {url: /srv/infra}\n";
        for (var, bad) in [
            ("BERTH_STATUS_BRANCH", "..bad..ref"),
            ("BERTH_REPO_BRANCH", "refs/heads/../../x"),
            ("BERTH_REPO_BRANCH", "main branch"),
            ("BERTH_STATUS_BRANCH", "-delete"),
            ("BERTH_STATUS_BRANCH", "status.lock"),
        ] {
            let error = parse(base, &[(var, bad)]).unwrap_err();
            assert!(
                error.0.starts_with(&format!("{var} (environment): ")),
                "{}",
                error.0
            );
            assert!(error.0.contains("not a branch name"), "{}", error.0);
        }
        let error = parse("repo: {url: /srv/infra, branch: \"a..b\"}\n", &[]).unwrap_err();
        assert!(
            error.0.starts_with("agent.yaml: repo.branch"),
            "{}",
            error.0
        );
        // Names people use are taken, and "" still means status on the followed branch.
        for good in ["main", "release/2026", "feature-x", "v1.2"] {
            assert!(
                parse(base, &[("BERTH_REPO_BRANCH", good)]).is_ok(),
                "{good}"
            );
        }
        assert!(parse(base, &[("BERTH_STATUS_BRANCH", "")]).is_ok());
    }

    #[test]
    fn secrets_are_never_shown() {
        let secret = Secret("hunter2".into());
        assert_eq!(format!("{secret:?}"), "<secret>");
        let secrets = Secrets {
            webhook: Some(secret),
            ..Default::default()
        };
        assert!(!format!("{secrets:?}").contains("hunter2"));
    }
}
