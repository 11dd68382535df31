//! The `berth` command line: parses flags, calls the library, maps outcomes to exit codes.

/// `println!` for output a reader may stop reading (`berth plan | head`): a closed pipe ends the
/// command quietly, as it does for other Unix tools, instead of a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// `print!` with [`outln!`]'s handling of a closed pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if write!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

use std::path::PathBuf;
use std::process::ExitCode;

use berth::apply::{Outcome, StepReport};
use berth::descriptor::{self, LoadOptions, load::DEFAULT_MAX_FILE_SIZE};
use berth::plan::{Action, Policy};
use berth::printable;
use berth::reconcile::{self, ApplyOptions, Observer, PassError};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

/// berth makes running infrastructure match a git repository of YAML descriptors.
#[derive(Parser)]
#[command(name = "berth", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every descriptor under DIR and report every problem with its file, line and column.
    ///
    /// Exit codes: 0 all valid, 1 problems found, 2 DIR missing or unreadable.
    Validate {
        /// The config repo's folder.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ProblemFormat::Text)]
        format: ProblemFormat,
        #[command(flatten)]
        load: LoadFlags,
    },
    /// Say what `apply` would change on the Docker Engine, and why.
    ///
    /// Exit codes: 0 nothing would change, 2 something would, 1 an error (invalid repo, engine unreachable).
    Plan {
        /// The config repo's folder.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Output format: text, a markdown table for pull requests, or JSON.
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
        /// Plan against the state an agent committed to the repo's status branch instead of a
        /// Docker Engine: no engine needed, for pull-request checks.
        #[arg(long)]
        against_status: bool,
        #[command(flatten)]
        status: StatusBranchFlags,
        #[command(flatten)]
        target: TargetFlags,
        #[command(flatten)]
        load: LoadFlags,
    },
    /// Make the Docker Engine match the repo: create, update, start, stop (and with --prune, delete).
    ///
    /// Exit codes: 0 every step succeeded, 1 a step failed or an error stopped the run.
    Apply {
        /// The config repo's folder.
        #[arg(default_value = ".")]
        dir: PathBuf,
        #[command(flatten)]
        target: TargetFlags,
        #[command(flatten)]
        load: LoadFlags,
        /// Longest time to wait for new containers, and a challenge's rollout on Kubernetes, to
        /// become healthy (0s: do not wait).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        wait: std::time::Duration,
        /// Most steps applied at once.
        #[arg(long, env = "BERTH_CONCURRENCY", default_value_t = 8)]
        concurrency: usize,
        /// Longest wait for another berth applying to the same instance on this engine.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        lock_wait: std::time::Duration,
    },
    /// Run as a long-lived agent: follow a git repo, reconcile on a schedule, webhook, file change or
    /// API call, and commit status back to the repo.
    ///
    /// Every setting of the config file is also an environment variable (see the README). Stops
    /// cleanly on SIGTERM or SIGINT (exit 0); exit 1 when the configuration is wrong.
    Agent {
        /// The agent config file (YAML).
        #[arg(long, env = "BERTH_CONFIG")]
        config: Option<PathBuf>,
        /// Log format.
        #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Print the status an agent committed to the repo.
    ///
    /// Exit codes: 0 printed, 1 no status found or unreadable.
    Status {
        #[command(flatten)]
        location: StatusFlags,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ProblemFormat::Text)]
        format: ProblemFormat,
    },
    /// Run a pipeline in the foreground, without an agent, streaming its log (as `gitlab-runner
    /// exec` or `act` do): clone its source (or take its context from DIR), run its steps in a
    /// container on the Docker Engine, and build the image it produces.
    ///
    /// Exit codes: 0 the run succeeded, 1 it failed, timed out or could not run.
    Run {
        /// The config repo's folder.
        dir: PathBuf,
        /// The pipeline's name.
        pipeline: String,
        /// The source commit (or branch or tag) to build; the source's `ref`, or DIR's HEAD.
        #[arg(long)]
        commit: Option<String>,
        /// Where to keep the run's log (capped, secrets masked).
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// Most bytes of log kept; the head and the tail are kept, the middle dropped.
        #[arg(long, default_value_t = berth::run::DEFAULT_LOG_CAP)]
        log_cap: usize,
        #[command(flatten)]
        target: TargetFlags,
    },
    /// List a running agent's pipeline runs, newest first.
    ///
    /// Exit codes: 0 listed, 1 the agent refused or could not be reached.
    Runs {
        /// Only this pipeline's runs.
        pipeline: Option<String>,
        /// Most runs listed.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Output format.
        #[arg(long, value_enum, default_value_t = RunsFormat::Text)]
        format: RunsFormat,
        #[command(flatten)]
        agent: AgentFlags,
    },
    /// Print a run's log from a running agent; with --follow, until the run ends.
    ///
    /// Exit codes: 0 printed, 1 no such run, or the agent refused or could not be reached.
    Logs {
        /// The run's number (`berth runs` lists them).
        run: i64,
        /// Keep printing while the run runs.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        agent: AgentFlags,
    },
    /// List a running agent's per-team instances, or spawn, renew or kill one.
    ///
    /// Exit codes: 0 done, 1 the agent refused (the reason is printed) or could not be reached.
    #[command(args_conflicts_with_subcommands = true)]
    Instances {
        #[command(subcommand)]
        action: Option<InstancesAction>,
        /// Only this challenge's instances.
        challenge: Option<String>,
        /// Only this team's instances.
        #[arg(long)]
        team: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = RunsFormat::Text)]
        format: RunsFormat,
        #[command(flatten)]
        agent: AgentFlags,
    },
    /// Write the JSON Schemas of the descriptor kinds (generated from berth's own types).
    Schema {
        /// Folder to write the schema files to.
        #[arg(long, default_value = "schema")]
        out: PathBuf,
    },
    /// Print a shell completion script for berth to stdout.
    ///
    /// For example `berth completions bash > /usr/share/bash-completion/completions/berth`.
    Completions {
        /// The shell the script is for.
        shell: clap_complete::Shell,
    },
    /// Print berth's man page (roff) to stdout, or write it and a page per subcommand to a folder.
    ///
    /// `berth man --out /usr/share/man/man1` writes berth.1, berth-validate.1 and the others.
    Man {
        /// Folder to write every page to, instead of printing berth.1.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// What `berth instances` does besides listing.
#[derive(Subcommand)]
enum InstancesAction {
    /// Spawn a team's instance of an instanced challenge, and print where it answers.
    Spawn {
        /// The challenge.
        challenge: String,
        /// The team, as the CTF platform names it.
        #[arg(long)]
        team: String,
        #[command(flatten)]
        agent: AgentFlags,
    },
    /// Give an instance another ttl from now, up to its maxLifetime.
    Renew {
        /// The instance's id.
        id: String,
        #[command(flatten)]
        agent: AgentFlags,
    },
    /// Remove an instance now.
    Kill {
        /// The instance's id.
        id: String,
        #[command(flatten)]
        agent: AgentFlags,
    },
}

#[derive(clap::Args)]
struct AgentFlags {
    /// The agent's API, as its `listen` address.
    #[arg(long, env = "BERTH_AGENT", default_value = "http://127.0.0.1:8700")]
    agent: String,
    /// A file holding the agent's API token (its `api.tokenFile`); required.
    #[arg(long, env = "BERTH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl AgentFlags {
    fn api(&self) -> Result<berth::client::AgentApi, String> {
        let file = self
            .token_file
            .as_ref()
            .ok_or("give the agent's API token as a file, with --token-file or BERTH_TOKEN_FILE")?;
        let token = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        berth::client::AgentApi::new(&self.agent, &token).map_err(|e| e.to_string())
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum RunsFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct StatusBranchFlags {
    /// The branch status is committed to; "" when it lives under .berth/status/ on --branch.
    #[arg(long, env = "BERTH_STATUS_BRANCH", default_value = "berth-status")]
    status_branch: String,
    /// The followed branch (where status lives when --status-branch is "").
    #[arg(long, env = "BERTH_REPO_BRANCH", default_value = "main")]
    branch: String,
}

#[derive(clap::Args)]
struct StatusFlags {
    /// A folder inside a clone of the config repo, or the repo's URL.
    #[arg(long, default_value = ".")]
    repo: String,
    #[command(flatten)]
    branches: StatusBranchFlags,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct LoadFlags {
    /// Largest descriptor file berth reads, in bytes.
    #[arg(long, env = "BERTH_MAX_FILE_SIZE", default_value_t = DEFAULT_MAX_FILE_SIZE)]
    max_file_size: u64,
    /// Where a Challenge without a `target` runs: docker or kubernetes.
    #[arg(long, env = "BERTH_DEFAULT_TARGET", default_value = "docker", value_parser = parse_engine)]
    default_target: berth::plan::Engine,
    /// The cluster's NodePort range, FIRST-LAST: host ports of Challenges on Kubernetes must be in it.
    #[arg(long, env = "BERTH_NODE_PORT_RANGE", default_value = "30000-32767", value_parser = berth::config::node_port_range)]
    node_port_range: std::ops::RangeInclusive<u16>,
    /// Accept Challenges with `security.privileged: true` (refused otherwise).
    #[arg(long, env = "BERTH_ALLOW_PRIVILEGED")]
    allow_privileged: bool,
    /// The Kubernetes version Staging charts are rendered for, as `helm template --kube-version`
    /// (`validate`, a plan against status); a cluster berth is connected to tells its own.
    #[arg(long, env = "BERTH_KUBE_VERSION")]
    kube_version: Option<String>,
    /// What that cluster serves (`apps/v1`, `policy/v1beta1/PodDisruptionBudget`), as
    /// `helm template --api-versions`; with --kube-version.
    #[arg(
        long,
        env = "BERTH_API_VERSIONS",
        value_delimiter = ',',
        requires = "kube_version"
    )]
    api_versions: Vec<String>,
}

fn parse_engine(text: &str) -> Result<berth::plan::Engine, String> {
    match text {
        "docker" => Ok(berth::plan::Engine::Docker),
        "kubernetes" => Ok(berth::plan::Engine::Kubernetes),
        _ => Err("expected docker or kubernetes".into()),
    }
}

impl LoadFlags {
    fn options(&self) -> LoadOptions {
        LoadOptions {
            default_target: self.default_target,
            node_ports: self.node_port_range.clone(),
            instance_ports: berth::descriptor::load::DEFAULT_INSTANCE_PORTS,
            max_file_size: self.max_file_size,
            walls: berth::descriptor::security::Walls {
                allow_privileged: self.allow_privileged,
                ..Default::default()
            },
            keep_descriptors: true,
            cluster: self.kube_version.as_ref().map(|kube_version| {
                std::sync::Arc::new(berth::descriptor::manifests::ClusterFacts {
                    kube_version: kube_version.clone(),
                    api_versions: self.api_versions.clone(),
                })
            }),
        }
    }
}

#[derive(clap::Args)]
struct TargetFlags {
    /// Name of this berth instance; instances sharing an engine never touch each other's objects.
    #[arg(long, env = "BERTH_INSTANCE", default_value = "default", value_parser = parse_instance)]
    instance: String,
    /// Also delete what this instance owns that the repo no longer declares.
    #[arg(long, env = "BERTH_PRUNE")]
    prune: bool,
    /// Let a prune delete every object this instance owns (held otherwise: one commit that
    /// removed every descriptor is more often a mistake than a wish).
    #[arg(long, env = "BERTH_PRUNE_ALLOW_EMPTY", requires = "prune")]
    allow_empty: bool,
    /// The namespace Challenges on Kubernetes run in.
    #[arg(long, env = "BERTH_CHALLENGE_NAMESPACE", default_value = "berth-challenges", value_parser = parse_instance)]
    challenge_namespace: String,
    /// The most a pipeline run may write to disk (its workspace and its container's own layer).
    #[arg(long, env = "BERTH_PIPELINES_WORKSPACE_LIMIT", default_value = "4Gi")]
    workspace_limit: berth::descriptor::values::Size,
}

fn parse_instance(text: &str) -> Result<String, String> {
    text.parse::<berth::descriptor::Name>()
        .map(|n| n.to_string())
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    text.parse::<berth::descriptor::values::Duration>()
        .map(|d| d.0)
}

#[derive(Clone, Copy, ValueEnum)]
enum PlanFormat {
    Text,
    Markdown,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProblemFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // libgit2's first use starts OpenSSL and reads the system's certificates, a good part of a
    // short command's time: only commands that may fetch or clone pay for it (`apply` only when
    // the repo has pipelines, once it is loaded).
    let may_use_git = matches!(
        cli.command,
        Command::Agent { .. }
            | Command::Status { .. }
            | Command::Run { .. }
            | Command::Plan {
                against_status: true,
                ..
            }
    );
    if may_use_git {
        berth::source::set_network_timeouts();
    }
    match cli.command {
        Command::Validate { dir, format, load } => {
            // Validating needs no descriptor kept whole, only their problems.
            let options = LoadOptions {
                keep_descriptors: false,
                ..load.options()
            };
            validate(&dir, format, &options)
        }
        Command::Plan {
            dir,
            format,
            against_status: true,
            status,
            target,
            load,
        } => plan_against_status(&dir, format, &status, &target, &load.options()),
        Command::Plan {
            dir,
            format,
            target,
            load,
            ..
        } => run_async(plan(&dir, format, &target, &load.options())),
        Command::Agent { config, log_format } => agent(config.as_deref(), log_format),
        Command::Status { location, format } => status(&location, format),
        Command::Apply {
            dir,
            target,
            load,
            wait,
            concurrency,
            lock_wait,
        } => {
            let options = ApplyOptions {
                concurrency,
                lock_wait,
                policy: Policy {
                    prune: target.prune,
                    allow_empty: target.allow_empty,
                    held: None,
                    now: None,
                },
                runs: None,
            };
            run_async(apply(&dir, &target, &load.options(), wait, &options))
        }
        Command::Schema { out } => write_schemas(&out),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "berth", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            ExitCode::SUCCESS
        }
        Command::Man { out } => man_pages(out.as_deref()),
        Command::Runs {
            pipeline,
            limit,
            format,
            agent,
        } => run_async(list_runs(pipeline, limit, format, agent)),
        Command::Logs { run, follow, agent } => run_async(print_logs(run, follow, agent)),
        Command::Instances {
            action,
            challenge,
            team,
            format,
            agent,
        } => run_async(instances(action, challenge, team, format, agent)),
        Command::Run {
            dir,
            pipeline,
            commit,
            log_file,
            log_cap,
            target,
        } => run_async(run_pipeline(
            &dir,
            &pipeline,
            commit.as_deref(),
            log_file.as_deref(),
            log_cap,
            &target,
        )),
    }
}

/// The man page on stdout, or every page (one per subcommand too) written to `out`.
fn man_pages(out: Option<&std::path::Path>) -> ExitCode {
    let written = match out {
        Some(dir) => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), dir))
            .map_err(|e| format!("cannot write the man pages to {}: {e}", dir.display())),
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut page)
                .map(|()| out!("{}", String::from_utf8_lossy(&page)))
                .map_err(|e| format!("cannot render the man page: {e}"))
        }
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("berth: {error}");
            ExitCode::from(2)
        }
    }
}

fn run_async<T>(future: impl std::future::Future<Output = T>) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(future)
}

/// Loads `dir` and connects to the engines, printing why when either cannot be done.
async fn load_and_connect(
    dir: &std::path::Path,
    flags: &TargetFlags,
    options: &LoadOptions,
) -> Result<(descriptor::Loaded, berth::backend::Engines), ExitCode> {
    let access = berth::backend::kube::Access {
        challenge_namespace: Some(flags.challenge_namespace.clone()),
        ..Default::default()
    };
    let engines = reconcile::connect(&flags.instance, &access).await;
    // Charts are rendered for the cluster they go to. Without engines the repo is still loaded,
    // so its problems come first.
    let connected = match &engines {
        Ok(engines) => engines.cluster_facts().await,
        Err(_) => None,
    };
    let options = LoadOptions {
        cluster: connected.or_else(|| options.cluster.clone()),
        ..options.clone()
    };
    let loaded = reconcile::load(dir, &options).map_err(unplannable)?;
    let mut engines = engines.map_err(|e| unplannable(e.into()))?;
    engines.set_workspace_limit(flags.workspace_limit);
    Ok((loaded, engines))
}

/// Prints why a repo cannot be planned: its problems as `validate` prints them, or the error.
fn unplannable(error: PassError) -> ExitCode {
    if let PassError::Invalid(problems) = &error {
        for problem in problems {
            outln!("{problem}");
        }
    }
    eprintln!("berth: {error}");
    ExitCode::from(1)
}

fn print_plan(plan: &berth::plan::Plan, format: PlanFormat) -> ExitCode {
    match format {
        PlanFormat::Text => out!("{}", plan.render_text()),
        PlanFormat::Markdown => out!("{}", plan.render_markdown()),
        PlanFormat::Json => outln!("{}", plan.render_json()),
    }
    if plan.has_changes() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn status_location(repo: &str, flags: &StatusBranchFlags) -> berth::source::StatusLocation {
    berth::source::StatusLocation {
        repo: repo.to_string(),
        status_branch: flags.status_branch.clone(),
        branch: flags.branch.clone(),
    }
}

/// The agent's way into the config repo at `url`, from the `BERTH_REPO_*` environment. When that
/// environment names the agent's repo (`BERTH_REPO_URL`), its credentials go only to that
/// repo's server, never to another URL typed on the command line.
fn repo_credentials(
    url: &str,
) -> Result<Option<berth::source::Source>, berth::config::ConfigError> {
    if let Ok(agents) = std::env::var("BERTH_REPO_URL")
        && !berth::git_url::same_server(&agents, url)
    {
        return Ok(None);
    }
    repo_source(url).map(Some)
}

fn repo_source(url: &str) -> Result<berth::source::Source, berth::config::ConfigError> {
    let config = berth::config::AgentConfig::from_text("(environment)", "", |var| match var {
        "BERTH_REPO_URL" => Some(url.to_string()),
        _ => std::env::var(var).ok(),
    })?;
    let secrets = berth::config::Secrets::read(&config)?;
    Ok(berth::source::Source::new(&config, &secrets))
}

/// Reads committed status, printing why when there is none.
fn read_status(
    location: &berth::source::StatusLocation,
    credentials: Option<&berth::source::Source>,
) -> Result<berth::status::StatusSet, ExitCode> {
    let files = berth::source::committed_status(location, credentials).map_err(|error| {
        eprintln!("berth: {error}");
        ExitCode::from(1)
    })?;
    if files.is_empty() {
        let place = match location.status_branch.as_str() {
            "" => format!(".berth/status/ on branch {}", location.branch),
            branch => format!("branch {branch} (local or origin's)"),
        };
        eprintln!(
            "berth: no status found in {place} of {}; has an agent run, and was the branch fetched?",
            location.repo
        );
        return Err(ExitCode::from(1));
    }
    berth::status::StatusSet::parse(files.iter().map(|(p, t)| (p.as_str(), t.as_str()))).map_err(
        |error| {
            eprintln!("berth: {error}");
            ExitCode::from(1)
        },
    )
}

fn status(flags: &StatusFlags, format: ProblemFormat) -> ExitCode {
    // A URL is fetched with the agent's own credentials (`BERTH_REPO_SSH_KEY_FILE`,
    // `BERTH_REPO_KNOWN_HOSTS_FILE`, `BERTH_REPO_TOKEN_FILE`, …), as the agent fetches it.
    let credentials = match std::path::Path::new(&flags.repo).exists() {
        true => None,
        false => match repo_credentials(&flags.repo) {
            Ok(source) => source,
            Err(error) => {
                eprintln!("berth: {error}");
                return ExitCode::from(2);
            }
        },
    };
    let location = status_location(&flags.repo, &flags.branches);
    let status = match read_status(&location, credentials.as_ref()) {
        Ok(status) => status,
        Err(code) => return code,
    };
    match format {
        ProblemFormat::Text => out!("{}", berth::status::render_table(&status)),
        ProblemFormat::Json => out!("{}", berth::server::status_json(&status)),
    }
    ExitCode::SUCCESS
}

fn plan_against_status(
    dir: &std::path::Path,
    format: PlanFormat,
    branches: &StatusBranchFlags,
    flags: &TargetFlags,
    options: &LoadOptions,
) -> ExitCode {
    let loaded = match reconcile::load(dir, options) {
        Ok(loaded) => loaded,
        Err(error) => return unplannable(error),
    };
    let status = match read_status(&status_location(&dir.display().to_string(), branches), None) {
        Ok(status) => status,
        Err(code) => return code,
    };
    if status.agent.instance != flags.instance {
        eprintln!(
            "berth: the committed status is instance {}'s, not {}; pass --instance {}",
            status.agent.instance, flags.instance, status.agent.instance
        );
        return ExitCode::from(1);
    }
    let desired = reconcile::desired(&loaded);
    let policy = Policy {
        prune: flags.prune,
        allow_empty: flags.allow_empty,
        held: None,
        now: None,
    };
    run_async(async {
        match reconcile::plan(desired, Observer::Status(&status), policy).await {
            Ok(planned) => print_plan(&planned.plan, format),
            Err(error) => unplannable(error.into()),
        }
    })
}

fn agent(config: Option<&std::path::Path>, log_format: LogFormat) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal; and a logged value from outside (a file name, an
    // engine's message) can never move the cursor or forge a line.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(EscapedStderr { colours });
    match log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    let config = match berth::config::AgentConfig::load(config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("berth: {error}");
            return ExitCode::from(1);
        }
    };
    // Passes run one at a time, so one thread for blocking git work is enough; and the threads
    // share one malloc arena, so none holds memory of its own while the agent idles.
    berth::heap::share_one_arena();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(async move {
        let shutdown = async {
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
            }
        };
        match berth::agent::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(%error, "agent cannot start");
                ExitCode::from(1)
            }
        }
    });
    // A git operation the agent stopped waiting for (a server that drips bytes) must not hold
    // the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

async fn plan(
    dir: &std::path::Path,
    format: PlanFormat,
    flags: &TargetFlags,
    options: &LoadOptions,
) -> ExitCode {
    let (loaded, engines) = match load_and_connect(dir, flags, options).await {
        Ok(ready) => ready,
        Err(code) => return code,
    };
    let desired = reconcile::desired(&loaded);
    let policy = Policy {
        prune: flags.prune,
        allow_empty: flags.allow_empty,
        held: None,
        now: None,
    };
    match reconcile::plan(desired, Observer::Engines(&engines), policy).await {
        Ok(planned) => print_plan(&planned.plan, format),
        Err(error) => unplannable(error.into()),
    }
}

async fn apply(
    dir: &std::path::Path,
    flags: &TargetFlags,
    options: &LoadOptions,
    wait: std::time::Duration,
    apply_options: &ApplyOptions,
) -> ExitCode {
    let (loaded, mut engines) = match load_and_connect(dir, flags, options).await {
        Ok(ready) => ready,
        Err(code) => return code,
    };
    // A challenge on Kubernetes is waited for as long as a container on Docker.
    engines.set_rollout_wait(wait);
    // An apply runs the solvers that are due (a plan only reads what they found).
    engines.run_solvers();
    let desired = reconcile::desired(&loaded);
    // Only pipelines clone (see `main`); nothing has used libgit2 yet.
    if desired.pipelines().next().is_some() {
        berth::source::set_network_timeouts();
    }
    let width = desired
        .objects
        .iter()
        .map(|o| o.key.to_string().len())
        .max()
        .unwrap_or(0);
    let print = |report: &StepReport| {
        let verdict = match &report.outcome {
            Outcome::Done(_) => "done".to_string(),
            other => other.as_str().to_uppercase(),
        };
        outln!(
            "{:<width$}  {:<7} {verdict}: {} ({:.1}s)",
            report.step.key.to_string(),
            report.step.action.as_str(),
            printable::field(report.outcome.detail()),
            report.elapsed.as_secs_f64()
        );
    };
    let mut applied =
        match reconcile::apply(desired, &engines, &loaded.root, apply_options, print).await {
            Ok(applied) => applied,
            Err(error) => return unplannable(error.into()),
        };
    let unhealthy = match wait.is_zero() {
        true => reconcile::unhealthy(&applied.planned, &applied.observed, false),
        false => reconcile::settle(&mut applied, &engines, wait).await,
    };
    // Runs of solvers this apply started and did not wait out go with it.
    engines.stop_solvers().await;
    let done = |action: Action| {
        applied
            .reports
            .iter()
            .filter(|r| r.step.action == action && matches!(r.outcome, Outcome::Done(_)))
            .count()
    };
    let failures: Vec<&StepReport> = applied
        .reports
        .iter()
        .filter(|r| !matches!(r.outcome, Outcome::Done(_)))
        .collect();
    // After a pipeline produced, the pass planned again: what it changed in the first round is
    // unchanged in the second, and counted once, as what it did.
    let changed: std::collections::HashSet<_> = applied
        .reports
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Done(_)))
        .map(|r| &r.step.key)
        .collect();
    let unchanged = applied
        .planned
        .plan
        .steps
        .iter()
        .filter(|s| s.action == Action::Noop && !s.unhealthy && !changed.contains(&s.key))
        .count();
    // Archives and restores (of stagings) are counted when there are any.
    let staged: String = [(Action::Archive, "archived"), (Action::Restore, "restored")]
        .into_iter()
        .filter(|(action, _)| done(*action) > 0)
        .map(|(action, word)| format!(", {} {word}", done(action)))
        .collect();
    outln!(
        "applied: {} created, {} updated, {} deleted, {} started, {} stopped, {} unchanged{staged}; {} failed, {} unhealthy",
        done(Action::Create),
        done(Action::Update),
        done(Action::Delete),
        done(Action::Start),
        done(Action::Stop),
        unchanged,
        failures.len(),
        unhealthy.len(),
    );
    if let Some(held) = &applied.planned.plan.held {
        outln!("deletes held: {held}");
    }
    for step in applied
        .planned
        .plan
        .steps
        .iter()
        .filter(|s| matches!(s.action, Action::Orphan | Action::Skip | Action::Wait))
    {
        outln!(
            "{}: {}",
            step.key,
            printable::field(&step.reasons.join("; "))
        );
    }
    for failure in &failures {
        outln!(
            "failed: {}: {}",
            failure.step.key,
            printable::field(failure.outcome.detail())
        );
    }
    for (key, why) in &unhealthy {
        outln!("unhealthy: {key}: {}", printable::field(&why.why));
    }
    if failures.is_empty() && unhealthy.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn validate(dir: &std::path::Path, format: ProblemFormat, options: &LoadOptions) -> ExitCode {
    let loaded = match descriptor::load(dir, options) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("berth: {error}");
            return ExitCode::from(2);
        }
    };
    match format {
        ProblemFormat::Json => {
            // Standard output stays the array of problems; what was skipped goes beside it.
            for warning in &loaded.warnings {
                eprintln!("{warning}");
            }
            outln!(
                "{}",
                serde_json::to_string_pretty(&loaded.problems).expect("problems serialize")
            );
        }
        ProblemFormat::Text if loaded.is_valid() => {
            for warning in &loaded.warnings {
                outln!("{warning}");
            }
            outln!("{}", loaded.summary());
        }
        ProblemFormat::Text => {
            for problem in loaded.warnings.iter().chain(&loaded.problems) {
                outln!("{problem}");
            }
            let n = loaded.problems.len();
            eprintln!("{n} problem{} found", if n == 1 { "" } else { "s" });
        }
    }
    if loaded.is_valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn write_schemas(out: &std::path::Path) -> ExitCode {
    if let Err(error) = std::fs::create_dir_all(out) {
        eprintln!("berth: cannot create {}: {error}", out.display());
        return ExitCode::from(2);
    }
    let agent = ("agent.json", berth::config::schema());
    for (file, schema) in descriptor::schema::generate().into_iter().chain([agent]) {
        let path = out.join(file);
        let text = serde_json::to_string_pretty(&schema).expect("schemas serialize") + "\n";
        if let Err(error) = std::fs::write(&path, text) {
            eprintln!("berth: cannot write {}: {error}", path.display());
            return ExitCode::from(2);
        }
        outln!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}

/// `berth run`: one pipeline run in the foreground.
async fn run_pipeline(
    dir: &std::path::Path,
    pipeline: &str,
    commit: Option<&str>,
    log_file: Option<&std::path::Path>,
    log_cap: usize,
    flags: &TargetFlags,
) -> ExitCode {
    use std::io::Write as _;
    let loaded = match reconcile::load(dir, &LoadOptions::default()) {
        Ok(loaded) => loaded,
        Err(error) => return unplannable(error),
    };
    let found = loaded.descriptors.iter().find_map(|d| match &d.spec {
        descriptor::Spec::Pipeline(spec) if d.metadata.name.as_str() == pipeline => {
            Some((&d.metadata.name, spec))
        }
        _ => None,
    });
    let Some((name, spec)) = found else {
        eprintln!("berth: no Pipeline {pipeline} in {}", dir.display());
        return ExitCode::from(1);
    };
    use berth::backend::docker::run::{RunOptions, RunSource, Runner};
    let source = RunSource {
        pipeline: name.clone(),
        spec: spec.clone(),
        root: loaded.root.clone(),
        wanted: commit.map(str::to_string),
        credentials: None,
    };
    let deadline = std::time::Instant::now() + spec.timeout.0;
    let request = match source.prepare(deadline, None).await {
        Ok(request) => request,
        Err(why) => {
            eprintln!("berth: Pipeline/{pipeline}: {why}");
            return ExitCode::from(1);
        }
    };
    let ownership = berth::backend::Ownership::new(&flags.instance);
    let mut docker = match berth::backend::docker::DockerBackend::connect(&ownership).await {
        Ok(docker) => docker,
        Err(error) => {
            eprintln!("berth: {error}");
            return ExitCode::from(1);
        }
    };
    docker.set_workspace_limit(flags.workspace_limit);
    let mut log = berth::run::RunLog::new(log_cap, request.secrets.values().cloned());
    let mut stdout = std::io::stdout();
    let report = docker
        .run_pipeline(
            request,
            &mut log,
            |bytes| {
                let _ = stdout.write_all(bytes);
                let _ = stdout.flush();
            },
            RunOptions {
                runner: Runner::Foreground,
                spec_hash: String::new(),
                cancel: None,
                owner: None,
                branch: None,
            },
        )
        .await;
    if let Some(path) = log_file
        && let Err(error) = std::fs::write(path, log.contents())
    {
        eprintln!("berth: cannot write the log to {}: {error}", path.display());
    }
    for step in &report.steps {
        let code = step
            .exit_code
            .map_or("killed".to_string(), |c| format!("exit code {c}"));
        outln!(
            "step {}: {code} in {:.1}s",
            step.name,
            step.duration.as_secs_f64()
        );
    }
    outln!("{}", report.summary());
    match report.result {
        berth::run::RunResult::Succeeded => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}

/// `berth runs`.
async fn list_runs(
    pipeline: Option<String>,
    limit: usize,
    format: RunsFormat,
    agent: AgentFlags,
) -> ExitCode {
    let api = match agent.api() {
        Ok(api) => api,
        Err(why) => return failed(&why),
    };
    let mut path = format!("/api/v1/runs?limit={limit}");
    if let Some(pipeline) = &pipeline {
        path.push_str(&format!("&pipeline={pipeline}"));
    }
    let mut body = Vec::new();
    if let Err(why) = api.get(&path, |piece| body.extend_from_slice(piece)).await {
        return failed(&why);
    }
    if let RunsFormat::Json = format {
        out!("{}", String::from_utf8_lossy(&body));
        return ExitCode::SUCCESS;
    }
    let runs: Vec<berth::queue::Run> = match serde_json::from_slice(&body) {
        Ok(runs) => runs,
        Err(error) => {
            return failed(format!("the agent's answer is not a list of runs: {error}"));
        }
    };
    outln!(
        "{:>6}  {:<11}  {:<20}  {:<8}  {:<12}  {:>8}  RESULT",
        "RUN",
        "STATE",
        "PIPELINE",
        "CAUSE",
        "COMMIT",
        "TOOK"
    );
    for run in runs {
        let commit = run.commit.as_deref().unwrap_or("-");
        let took = run
            .duration_ms
            .map_or("-".to_string(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        let result = run
            .image
            .clone()
            .or(run.message.clone())
            .unwrap_or_default();
        let result: String = printable::field(&result).chars().take(80).collect();
        outln!(
            "{:>6}  {:<11}  {:<20}  {:<8}  {:<12}  {:>8}  {result}",
            run.id,
            run.state.as_str(),
            run.pipeline,
            run.cause.as_str(),
            berth::git_url::short(commit),
            took
        );
    }
    ExitCode::SUCCESS
}

/// `berth instances`: the list, or what a subcommand asks, as the agent answers it.
async fn instances(
    action: Option<InstancesAction>,
    challenge: Option<String>,
    team: Option<String>,
    format: RunsFormat,
    agent: AgentFlags,
) -> ExitCode {
    use berth::client::query_value;
    use hyper::Method;
    let (method, path, body, agent) = match action {
        None => {
            let mut query = Vec::new();
            if let Some(challenge) = &challenge {
                query.push(format!("challenge={}", query_value(challenge)));
            }
            if let Some(team) = &team {
                query.push(format!("team={}", query_value(team)));
            }
            let path = format!("/api/v1/instances?{}", query.join("&"));
            (Method::GET, path, Vec::new(), agent)
        }
        Some(InstancesAction::Spawn {
            challenge,
            team,
            agent,
        }) => (
            Method::POST,
            format!("/api/v1/challenges/{}/instances", query_value(&challenge)),
            serde_json::json!({ "team": team }).to_string().into_bytes(),
            agent,
        ),
        Some(InstancesAction::Renew { id, agent }) => (
            Method::POST,
            format!("/api/v1/instances/{}/renew", query_value(&id)),
            Vec::new(),
            agent,
        ),
        Some(InstancesAction::Kill { id, agent }) => (
            Method::DELETE,
            format!("/api/v1/instances/{}", query_value(&id)),
            Vec::new(),
            agent,
        ),
    };
    let api = match agent.api() {
        Ok(api) => api,
        Err(why) => return failed(&why),
    };
    let mut answer = Vec::new();
    let listing = method == Method::GET;
    let killing = method == Method::DELETE;
    if let Err(why) = api
        .send(method, &path, body, |piece| answer.extend_from_slice(piece))
        .await
    {
        return failed(&why);
    }
    if let RunsFormat::Json = format {
        out!("{}", String::from_utf8_lossy(&answer));
        return ExitCode::SUCCESS;
    }
    if killing {
        outln!("removed");
        return ExitCode::SUCCESS;
    }
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
    let instances = match answer {
        serde_json::Value::Array(instances) => instances,
        one => vec![one],
    };
    if listing {
        outln!(
            "{:<16}  {:<20}  {:<20}  {:<8}  {:<11}  {:<25}  EXPIRES",
            "ID",
            "CHALLENGE",
            "TEAM",
            "STATE",
            "HEALTH",
            "ENDPOINTS"
        );
    }
    for instance in instances {
        let text = |field: &str| printable::field(instance[field].as_str().unwrap_or("-"));
        let endpoints: Vec<String> = instance["endpoints"]
            .as_array()
            .map(|all| {
                all.iter()
                    .map(|e| {
                        format!(
                            "{}:{}/{}",
                            printable::field(e["host"].as_str().unwrap_or("")),
                            e["port"],
                            e["protocol"].as_str().unwrap_or("tcp")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        // What its solver found; `-` for a challenge without a solve check.
        let health = printable::field(instance["health"]["state"].as_str().unwrap_or("-"));
        outln!(
            "{:<16}  {:<20}  {:<20}  {:<8}  {:<11}  {:<25}  {}",
            text("id"),
            text("challenge"),
            text("team"),
            text("state"),
            health,
            endpoints.join(","),
            text("expiresAt")
        );
    }
    ExitCode::SUCCESS
}

/// `berth logs`.
async fn print_logs(run: i64, follow: bool, agent: AgentFlags) -> ExitCode {
    use std::io::Write as _;
    let api = match agent.api() {
        Ok(api) => api,
        Err(why) => return failed(&why),
    };
    let path = format!("/api/v1/runs/{run}/logs?follow={follow}");
    let mut stdout = std::io::stdout();
    // Kept escaped by the agent; escaped again here for a log an older one kept.
    let mut stream = printable::TextStream::default();
    let answered = api
        .get(&path, |piece| {
            let shown = stream.push(piece);
            if stdout
                .write_all(shown.as_bytes())
                .and_then(|()| stdout.flush())
                .is_err()
            {
                std::process::exit(0);
            }
        })
        .await;
    match answered {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => failed(&why),
    }
}

/// Standard error for the text log, one event at a time, escaped by [`printable::log_line`].
struct EscapedStderr {
    colours: bool,
}

/// One event of the text log, written to standard error whole when the formatter is done.
struct EscapedEvent {
    line: Vec<u8>,
    colours: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for EscapedStderr {
    type Writer = EscapedEvent;
    fn make_writer(&'a self) -> EscapedEvent {
        EscapedEvent {
            line: Vec::new(),
            colours: self.colours,
        }
    }
}

impl std::io::Write for EscapedEvent {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EscapedEvent {
    fn drop(&mut self) {
        use std::io::Write as _;
        let text = String::from_utf8_lossy(&self.line);
        let _ = std::io::stderr().write_all(printable::log_line(&text, self.colours).as_bytes());
    }
}

fn failed(why: impl std::fmt::Display) -> ExitCode {
    eprintln!("berth: {why}");
    ExitCode::from(1)
}
