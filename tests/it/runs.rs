//! The agent's pipeline runs end to end: the real `berth agent` with its run queue, pipeline
//! sources on a real git server (`git daemon` on loopback), signed webhooks, the API and the
//! `berth runs` / `berth logs` commands, and the real Docker Engine running the steps; `kill -9`
//! of the agent mid-run.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::agent::{Agent, applied, sign};
use crate::support::engine::{Instance, docker, engine};
use crate::support::gitserver::{GitDaemon, Origin};
use crate::support::net::free_port;

/// A push event as GitHub sends it for the repository at `url`.
fn push_to(url: &str, commit: &str) -> String {
    push_of_branch(url, "main", commit)
}

/// A push event as GitHub sends it for `branch` of the repository at `url`.
fn push_of_branch(url: &str, branch: &str, commit: &str) -> String {
    format!(
        r#"{{"ref":"refs/heads/{branch}","before":"0000000000000000000000000000000000000000","after":"{commit}",
"repository":{{"id":7,"name":"app","full_name":"ops/app","clone_url":"{url}","default_branch":"main"}},
"pusher":{{"name":"octocat"}},"head_commit":{{"id":"{commit}"}}}}"#
    )
}

/// Sends a signed GitHub push for `url` at `commit` with the delivery id `delivery`.
fn deliver(agent: &Agent, url: &str, commit: &str, delivery: &str) -> (u16, String) {
    deliver_body(agent, push_to(url, commit), delivery)
}

fn deliver_body(agent: &Agent, body: String, delivery: &str) -> (u16, String) {
    agent.request(
        "POST",
        "/hooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", delivery),
            ("X-Hub-Signature-256", &sign(&body)),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
}

/// The run number in an answer such as `run 3 queued for Pipeline/site`.
fn queued_run(answer: &str, pipeline: &str) -> i64 {
    let line = answer
        .lines()
        .find(|l| l.ends_with(&format!("queued for Pipeline/{pipeline}")))
        .unwrap_or_else(|| panic!("no run of {pipeline} queued: {answer}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Run `id` as the API shows it.
fn run(agent: &Agent, id: i64) -> serde_json::Value {
    let (code, body) = agent.api("GET", &format!("/api/v1/runs/{id}"));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn state(agent: &Agent, id: i64) -> String {
    run(agent, id)["state"].as_str().unwrap().to_string()
}

/// `berth` with the agent's address and token file.
fn berth_at(agent: &Agent, args: &[&str]) -> std::process::Output {
    let token = agent.dir.path().join("api-token");
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .arg("--agent")
        .arg(format!("http://127.0.0.1:{}", agent.port))
        .arg("--token-file")
        .arg(&token)
        .output()
        .unwrap()
}

/// A source repo with a page and a Dockerfile that serves it, on `git daemon`.
fn site_source(page: &str) -> (Origin, GitDaemon) {
    let origin = Origin::new(&[
        ("page.txt", page),
        (
            "Dockerfile",
            "FROM busybox:latest\nCOPY www /www\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
        ),
    ]);
    let daemon = GitDaemon::start(&origin);
    (origin, daemon)
}

/// A config repo with the pipeline `site` (built from `source` on pushes matching `push`,
/// producing `produces`) and the challenge `web` running its image on `port`.
fn site_config(source: &str, push: &str, produces: &str, port: u16) -> Origin {
    Origin::new(&[
        (
            "pipelines/site.yaml",
            &format!(
                "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {{name: site}}\nspec:\n  source: {{url: \"{source}\", ref: main}}\n  triggers: {{push: {push}}}\n  image: busybox:latest\n  produces: \"{produces}\"\n  steps:\n    - {{name: render, run: \"mkdir -p www && cat page.txt > www/index.html && echo rendered\"}}\n"
            ),
        ),
        (
            "challenges/web.yaml",
            &format!(
                "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: web}}\nspec:\n  image: {{fromPipeline: site}}\n  ports: [{{container: 8080, host: {port}}}]\n"
            ),
        ),
    ])
}

/// The running containers of `instance`'s agents' runs.
fn running_agent_runs(instance: &Instance) -> String {
    let label = format!("label=berth.instance={}", instance.name);
    docker(&[
        "ps",
        "-q",
        "--filter",
        &label,
        "--filter",
        "label=berth.run=agent",
    ])
}

/// The run containers of `instance` on the engine, running or not.
fn run_containers(instance: &Instance) -> String {
    let label = format!("label=berth.instance={}", instance.name);
    docker(&[
        "ps",
        "-aq",
        "--filter",
        &label,
        "--filter",
        "label=berth.run",
    ])
}

fn fetch(port: u16) -> String {
    let output = Command::new("curl")
        .args(["-s", "-m", "3", &format!("http://127.0.0.1:{port}/")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn metric(agent: &Agent, line_start: &str) -> Option<String> {
    let (_, metrics) = agent.api("GET", "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line_start))
        .map(|v| v.trim().to_string())
}

#[test]
fn a_push_to_a_pipelines_source_builds_it_and_the_challenge_rolls_to_the_new_image() {
    let Some(instance) = engine() else { return };
    let (source, source_daemon) = site_source("version one\n");
    let port = free_port();
    let image = format!("{}-site", instance.name);
    let config = site_config(
        &source_daemon.url(),
        "{branches: [main]}",
        &format!("{image}:{{commit}}"),
        port,
    );
    let first = config.bare_git(&["rev-parse", "main"]);
    let config_daemon = GitDaemon::start(&config);
    let agent = Agent::start(&instance, &config_daemon.url(), "");

    // The first pass asks for the image; the run's end brings the challenge up on it.
    agent.wait_for("the first build served", || fetch(port) == "version one");
    agent.wait_for("the revision applied", || applied(&config, &first));

    // A push to the source, announced by a signed webhook, queues a run of that commit.
    let second = source.commit(&[("page.txt", Some("version two\n"))], "Two");
    let (code, answer) = deliver(&agent, &source_daemon.url(), &second, "delivery-2");
    assert_eq!(code, 202, "{answer}");
    let id = queued_run(&answer, "site");
    // The provider delivers again (a timeout on its side): nothing is built twice.
    let (code, again) = deliver(&agent, &source_daemon.url(), &second, "delivery-2");
    assert_eq!(code, 200, "{again}");
    assert!(again.starts_with("duplicate"), "{again}");
    // Another delivery of the same commit: its run is the one queued.
    let (code, again) = deliver(&agent, &source_daemon.url(), &second, "delivery-2b");
    assert_eq!(code, 202, "{again}");
    assert!(
        again.contains(&format!("a duplicate of run {id}")),
        "{again}"
    );
    agent.wait_for("the second build served", || fetch(port) == "version two");

    let shown = run(&agent, id);
    assert_eq!(shown["state"], "succeeded", "{shown}");
    assert_eq!(shown["cause"], "push");
    assert_eq!(shown["commit"], second.as_str());
    assert_eq!(
        shown["image"],
        format!("{image}:{}", &second[..12]).as_str()
    );
    assert_eq!(shown["steps"][0]["exitCode"], 0, "{shown}");

    // The command line shows the runs and the log.
    let listed = berth_at(&agent, &["runs", "site"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with(&id.to_string())
                && l.contains("succeeded")
                && l.contains("push")),
        "{text}"
    );
    let logs = berth_at(&agent, &["logs", &id.to_string()]);
    let log = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.status.success(), "{log}");
    assert!(log.contains("== step render\nrendered\n"), "{log}");
    assert!(log.contains(&format!("at {second}")), "{log}");
    let missing = berth_at(&agent, &["logs", "999999"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no run 999999"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // Metrics count the runs, and status in git holds the run history (never the log).
    assert_eq!(
        metric(
            &agent,
            "berth_pipeline_runs_total{pipeline=\"site\",result=\"succeeded\"} "
        )
        .as_deref(),
        Some("2")
    );
    assert_eq!(
        metric(&agent, "berth_pipeline_queue_depth ").as_deref(),
        Some("0")
    );
    agent.wait_for("the run in status", || {
        config
            .show("berth-status:status/pipeline/site.yaml")
            .is_some_and(|s| {
                s.contains(&format!("commit: {second}")) && s.contains("state: succeeded")
            })
    });
    let status = config
        .show("berth-status:status/pipeline/site.yaml")
        .unwrap();
    assert!(
        !status.contains("rendered"),
        "a log line reached git:\n{status}"
    );
    // The push to the config repo's branch name from another repo did not start a pass of its
    // own beyond the webhook's; the challenge runs the newest image by id.
    let running = docker(&[
        "ps",
        "--filter",
        &format!("label=berth.instance={}", instance.name),
        "--filter",
        "label=berth.name=web",
        "--format",
        "{{.Image}}",
    ]);
    assert_eq!(running.lines().count(), 1, "{running}");
}

#[test]
fn kill_9_during_a_run_then_a_restart_marks_it_interrupted_and_retries_it_once() {
    let Some(instance) = engine() else { return };
    let config = Origin::new(&[(
        "pipelines/slow.yaml",
        "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {name: slow}\nspec:\n  context: pipelines\n  image: busybox:latest\n  steps:\n    - {name: wait, run: \"echo started; sleep 4; echo finished\"}\n",
    )]);
    let daemon = GitDaemon::start(&config);
    let mut agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the first pass", || agent.log().contains("pass done"));
    let (code, body) = agent.api("POST", "/api/v1/pipelines/slow/runs");
    assert_eq!(code, 201, "{body}");
    let id: i64 = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_i64()
        .unwrap();
    agent.wait_for("the step started", || {
        let log = std::fs::read_to_string(run_log(&agent, id));
        log.is_ok_and(|l| l.contains("started"))
    });
    agent.kill9();
    let left = running_agent_runs(&instance);
    assert_eq!(
        left.lines().count(),
        1,
        "the killed agent's run container: {left}"
    );

    agent.spawn();
    agent.wait_for("the interrupted run retried and done", || {
        let (_, body) = agent.api("GET", "/api/v1/runs?pipeline=slow");
        let runs: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
        runs.iter()
            .any(|r| r["retryOf"] == id && r["state"] == "succeeded")
    });
    let old = run(&agent, id);
    assert_eq!(old["state"], "interrupted", "{old}");
    let (_, body) = agent.api("GET", "/api/v1/runs?pipeline=slow");
    let runs: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(runs.len(), 2, "one retry, nothing lost or doubled: {body}");
    let retry = &runs[0];
    assert_eq!(
        (retry["attempt"].as_i64(), retry["cause"].as_str()),
        (Some(2), Some("retry"))
    );
    let log =
        String::from_utf8_lossy(&berth_at(&agent, &["logs", &id.to_string()]).stdout).into_owned();
    assert!(log.contains("the agent stopped during this run"), "{log}");
    // The killed agent's container was removed by the new one, not left to sleep out its time.
    assert_eq!(run_containers(&instance), "", "run containers left");
}

#[test]
fn a_newer_commit_supersedes_queued_runs_and_cancel_running_stops_the_running_one() {
    let Some(instance) = engine() else { return };
    let (source, source_daemon) = site_source("one\n");
    let url = source_daemon.url();
    let pipeline = |name: &str, extra: &str| {
        format!(
            "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {{name: {name}}}\nspec:\n  source: {{url: \"{url}\"}}\n  triggers: {{push: {{}}}}\n  image: busybox:latest\n{extra}  steps:\n    - {{name: wait, run: \"echo waiting; sleep 60\"}}\n"
        )
    };
    let config = Origin::new(&[
        ("pipelines/slow.yaml", &pipeline("slow", "")),
        (
            "pipelines/eager.yaml",
            &pipeline("eager", "  cancelRunning: true\n"),
        ),
    ]);
    let daemon = GitDaemon::start(&config);
    let agent = Agent::start(&instance, &daemon.url(), "pipelines: {workers: 3}\n");
    agent.wait_for("the first pass", || agent.log().contains("pass done"));
    let running = |id: i64| {
        agent.wait_for(&format!("run {id} running"), || {
            state(&agent, id) == "running"
        });
    };

    let c1 = source.commit(&[("page.txt", Some("c1\n"))], "c1");
    let (_, answer) = deliver(&agent, &url, &c1, "d1");
    let (slow1, eager1) = (queued_run(&answer, "slow"), queued_run(&answer, "eager"));
    running(slow1);
    running(eager1);

    let c2 = source.commit(&[("page.txt", Some("c2\n"))], "c2");
    let (_, answer) = deliver(&agent, &url, &c2, "d2");
    let (slow2, eager2) = (queued_run(&answer, "slow"), queued_run(&answer, "eager"));
    // `slow` runs one at a time: the newer commit waits. `eager` stops the older one.
    agent.wait_for("eager's older run cancelled", || {
        state(&agent, eager1) == "cancelled"
    });
    assert!(
        run(&agent, eager1)["message"]
            .as_str()
            .unwrap()
            .contains(&format!("superseded by run {eager2}")),
        "{}",
        run(&agent, eager1)
    );
    running(eager2);
    assert_eq!(state(&agent, slow2), "queued");

    let c3 = source.commit(&[("page.txt", Some("c3\n"))], "c3");
    let (_, answer) = deliver(&agent, &url, &c3, "d3");
    let (slow3, eager3) = (queued_run(&answer, "slow"), queued_run(&answer, "eager"));
    agent.wait_for("eager's second run cancelled", || {
        state(&agent, eager2) == "cancelled"
    });
    let superseded = run(&agent, slow2);
    assert_eq!(superseded["state"], "cancelled", "{superseded}");
    assert!(
        superseded["message"]
            .as_str()
            .unwrap()
            .contains(&format!("superseded by run {slow3}")),
        "{superseded}"
    );
    assert_eq!(
        state(&agent, slow1),
        "running",
        "without cancelRunning it runs on"
    );

    // A person cancels the running one; the newest commit's run takes its place.
    let (code, body) = agent.api("POST", &format!("/api/v1/runs/{slow1}/cancel"));
    assert_eq!(code, 202, "{body}");
    agent.wait_for("slow's run cancelled", || {
        state(&agent, slow1) == "cancelled"
    });
    running(slow3);
    assert_eq!(run(&agent, slow3)["commit"], c3.as_str());
    let (code, _) = agent.api("POST", &format!("/api/v1/runs/{slow1}/cancel"));
    assert_eq!(code, 409, "an ended run cannot be cancelled again");

    // Follow a running run's log from another process, then cancel it: the follower ends.
    let token = agent.dir.path().join("api-token");
    let follower = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["logs", &slow3.to_string(), "--follow", "--agent"])
        .arg(format!("http://127.0.0.1:{}", agent.port))
        .arg("--token-file")
        .arg(&token)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    agent.wait_for("the step's first line", || {
        std::fs::read_to_string(run_log(&agent, slow3)).is_ok_and(|l| l.contains("waiting"))
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    running(eager3);
    for id in [slow3, eager3] {
        let (code, body) = agent.api("POST", &format!("/api/v1/runs/{id}/cancel"));
        assert_eq!(code, 202, "{body}");
    }
    let followed = follower.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&followed.stdout);
    assert!(followed.status.success(), "{text}");
    assert!(text.contains("waiting\n"), "{text}");
    assert!(text.contains("== cancelled: killed"), "{text}");
    agent.wait_for("every run ended", || {
        [slow3, eager3]
            .iter()
            .all(|id| state(&agent, *id) == "cancelled")
    });
    agent.wait_for("no run container left", || {
        run_containers(&instance).is_empty()
    });
}

/// Where the agent keeps run `id`'s log: `state/runs/STORE/ID.log`, in the one folder of its
/// run store.
fn run_log(agent: &Agent, id: i64) -> std::path::PathBuf {
    let runs = agent.dir.path().join("state/runs");
    std::fs::read_dir(&runs)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join(format!("{id}.log")))
        .find(|path| path.exists())
        .unwrap_or_else(|| runs.join(format!("{id}.log")))
}

/// A pipeline named `name` building the config repo's `ctx` folder (no source).
fn local_pipeline(name: &str, extra: &str, run: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {{name: {name}}}\nspec:\n  context: ctx\n  image: busybox:latest\n{extra}  steps:\n    - {{name: s1, run: \"{run}\"}}\n"
    )
}

/// A pipeline named `name` whose source is `url`.
fn source_pipeline(name: &str, url: &str, extra: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {{name: {name}}}\nspec:\n  source: {{url: \"{url}\", ref: main}}\n  image: busybox:latest\n{extra}  steps:\n    - {{name: s1, run: \"true\"}}\n"
    )
}

fn generic_push(agent: &Agent, body: &str, delivery: &str) -> (u16, String) {
    let signed = crate::support::agent::sign(body);
    let hex = signed.trim_start_matches("sha256=");
    agent.request(
        "POST",
        "/hooks/generic",
        &[
            ("X-Signature", hex),
            ("X-Delivery", delivery),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
}

/// Hostile finding: a manual run (or a generic/GitHub push) whose `commit` has a multi-byte
/// character across byte 12 panicked the request in `RunStore::enqueue`
/// (`&commit[..commit.len().min(12)]`, src/queue/store.rs): the client got a reset connection
/// and the agent log a panic with a backtrace.
#[test]
fn a_commit_with_multibyte_characters_is_answered_without_a_panic() {
    let Some(instance) = engine() else { return };
    let source = Origin::new(&[("Dockerfile", "FROM busybox:latest\n")]);
    let source_daemon = GitDaemon::start(&source);
    let config = Origin::new(&[
        ("ctx/f", "x\n"),
        (
            "pipelines/app.yaml",
            &source_pipeline("app", &source_daemon.url(), "  triggers: {push: {}}\n"),
        ),
    ]);
    let daemon = GitDaemon::start(&config);
    let agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the first pass", || agent.log().contains("pass done"));
    let body = r#"{"commit": "aéééééé"}"#;
    let bearer = "Bearer ".to_string()
        + &std::fs::read_to_string(agent.dir.path().join("api-token")).unwrap();
    let (code, answer) = agent.request(
        "POST",
        "/api/v1/pipelines/app/runs",
        &[("Authorization", &bearer)],
        body.as_bytes(),
    );
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer.contains("not a commit, branch or tag name"),
        "{answer}"
    );
    let push = format!(
        r#"{{"branch":"main","commit":"aéééééé","repository":"{}"}}"#,
        source_daemon.url()
    );
    let (code, answer) = generic_push(&agent, &push, "utf8-1");
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("not a commit id"), "{answer}");
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}

/// Hostile finding: pushes that name no commit (the generic webhook's `commit` is optional)
/// were neither deduplicated nor superseded (`run.commit != new.commit` is false for None vs
/// None in `queue::admit`): five deliveries for one branch built the same tip five times.
#[test]
fn pushes_without_a_commit_to_one_branch_queue_one_run() {
    let Some(instance) = engine() else { return };
    let source = Origin::new(&[("Dockerfile", "FROM busybox:latest\n")]);
    let source_daemon = GitDaemon::start(&source);
    let config = Origin::new(&[(
        "pipelines/app.yaml",
        &source_pipeline("app", &source_daemon.url(), "  triggers: {push: {}}\n")
            .replace("run: \"true\"", "run: \"sleep 5\""),
    )]);
    let daemon = GitDaemon::start(&config);
    let agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the first pass", || agent.log().contains("pass done"));
    let push = format!(
        r#"{{"branch":"main","repository":"{}"}}"#,
        source_daemon.url()
    );
    for n in 0..5 {
        let (code, answer) = generic_push(&agent, &push, &format!("no-commit-{n}"));
        assert_eq!(code, 202, "{answer}");
    }
    let (_, body) = agent.api("GET", "/api/v1/runs?pipeline=app");
    let runs: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let live = runs
        .iter()
        .filter(|r| r["state"] == "queued" || r["state"] == "running")
        .count();
    assert!(live <= 2, "one running and at most one queued: {body}");
}

/// Hostile finding: a pipeline's source on another host was cloned with the config repo's
/// credentials (`pipeline_workspace(.., Some(&credentials))` in src/queue/workers.rs with
/// `Source::callbacks`, which never looks at the URL): a descriptor naming any HTTP server that
/// answers 401 received `Authorization: Basic <repo.auth username:password>`.
#[test]
fn a_pipeline_source_on_another_host_never_gets_the_config_repos_password() {
    let Some(instance) = engine() else { return };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(String::new()));
    let heard = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten().take(10) {
            let mut stream = stream;
            let mut buffer = [0u8; 8192];
            let n = stream.read(&mut buffer).unwrap_or(0);
            heard
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buffer[..n]));
            let _ = stream.write_all(
                b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let config = Origin::new(&[(
        "pipelines/foreign.yaml",
        &source_pipeline("foreign", &format!("http://127.0.0.1:{port}/other.git"), ""),
    )]);
    let daemon = GitDaemon::start(&config);
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("repo-password");
    std::fs::write(&password, "ConfigRepoPassw0rd").unwrap();
    let agent = Agent::start_with(
        &instance.name,
        &daemon.url(),
        &format!(
            "  auth: {{username: bot, passwordFile: {}}}\n",
            password.display()
        ),
        "",
    );
    agent.wait_for("the first pass", || agent.log().contains("pass done"));
    let (code, body) = agent.api("POST", "/api/v1/pipelines/foreign/runs");
    assert_eq!(code, 201, "{body}");
    agent.wait_for("the run ended", || agent.log().contains("run ended"));
    let leaked = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        "bot:ConfigRepoPassw0rd",
    );
    assert!(
        !seen.lock().unwrap().contains(&leaked),
        "the config repo's password went to another host"
    );
}

/// Hostile finding: a run clones its source while holding the checkout lock for reading
/// (src/queue/workers.rs `execute`), with no timeout and no way to cancel. A source whose server
/// accepts and never answers wedged the agent: the next pass waited for the lock for good (a new
/// config revision never applied, /readyz still 200), `POST /runs/{id}/cancel` said 202 and
/// changed nothing, the pipeline's `timeout` did not apply, SIGTERM did not stop the agent, and
/// after `kill -9` the retry hung again (and the run a person cancelled was retried).
#[test]
fn a_source_that_never_answers_blocks_neither_passes_nor_cancel() {
    let Some(instance) = engine() else { return };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let config = Origin::new(&[
        ("ctx/f", "x\n"),
        (
            "pipelines/hang.yaml",
            &source_pipeline(
                "hang",
                &format!("git://127.0.0.1:{port}/x.git"),
                "  timeout: 10s\n",
            ),
        ),
    ]);
    let daemon = GitDaemon::start(&config);
    let agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the first pass", || agent.log().contains("pass done"));
    let (code, body) = agent.api("POST", "/api/v1/pipelines/hang/runs");
    assert_eq!(code, 201, "{body}");
    std::thread::sleep(Duration::from_secs(2));
    let second = config.commit(&[("ctx/g", Some("y\n"))], "two");
    let (code, _) = agent.api("POST", "/api/v1/reconcile");
    assert_eq!(code, 202);
    agent.wait_for("the new revision applied despite the hanging clone", || {
        crate::support::agent::applied(&config, &second)
    });
    // The pipeline's timeout covers the clone.
    agent.wait_for("the hanging run timed out", || state(&agent, 1) == "failed");
    let message = run(&agent, 1)["message"].as_str().unwrap().to_string();
    assert!(message.contains("timed out after 10s"), "{message}");
    // A person's cancel stops a clone that hangs, at once.
    let (code, body) = agent.api("POST", "/api/v1/pipelines/hang/runs");
    assert_eq!(code, 201, "{body}");
    agent.wait_for("the second run cloning", || state(&agent, 2) == "running");
    let (code, _) = agent.api("POST", "/api/v1/runs/2/cancel");
    assert_eq!(code, 202);
    // Before its 10 s timeout could end it as failed.
    agent.wait_for("the cancelled run ended", || {
        state(&agent, 2) == "cancelled"
    });
}

/// Hostile finding: an agent starting on an instance removed every `berth.run=agent` container
/// of the instance (`remove_runs_of(Runner::Agent)` in `Pipelines::start`), including the live
/// runs of another agent of that instance with another stateDir; the other agent recorded its
/// run as `failed ... exit code 137`, a pipeline failure, not retried.
#[test]
fn a_second_agent_of_the_instance_leaves_the_first_ones_running_runs_alone() {
    let Some(instance) = engine() else { return };
    let config = Origin::new(&[
        ("ctx/f", "x\n"),
        (
            "pipelines/slow.yaml",
            &local_pipeline("slow", "", "echo started; sleep 20; echo finished"),
        ),
    ]);
    let daemon = GitDaemon::start(&config);
    let first = Agent::start(&instance, &daemon.url(), "");
    first.wait_for("the first pass", || first.log().contains("pass done"));
    let (code, body) = first.api("POST", "/api/v1/pipelines/slow/runs");
    assert_eq!(code, 201, "{body}");
    first.wait_for("the step started", || {
        std::fs::read_to_string(run_log(&first, 1)).is_ok_and(|l| l.contains("started"))
    });
    let second = Agent::start(&instance, &daemon.url(), "");
    second.wait_for("the second agent's first pass", || {
        second.log().contains("pass done")
    });
    let left = running_agent_runs(&instance);
    assert_eq!(
        left.lines().count(),
        1,
        "the first agent's run container: {left}"
    );
    let (_, body) = first.api("GET", "/api/v1/runs/1");
    assert!(
        body.contains("\"running\"") || body.contains("\"succeeded\""),
        "{body}"
    );
}

/// A producing pipeline whose step fails is a Failure that names its log, and is not run again
/// by the passes that follow (a broken build must not loop); a fix in its folder runs it again.
#[test]
fn a_failing_build_is_a_failure_once_and_a_fix_builds_again() {
    let Some(instance) = engine() else { return };
    let image = format!("{}-tool", instance.name);
    let config = Origin::new(&[
        (
            "pipelines/tool.yaml",
            &format!(
                "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {{name: tool}}\nspec:\n  context: tool\n  image: busybox:latest\n  produces: \"{image}:{{commit}}\"\n  steps:\n    - {{name: test, run: \"sh check.sh\"}}\n"
            ),
        ),
        ("tool/check.sh", "echo checking; exit 4\n"),
        (
            "tool/Dockerfile",
            "FROM busybox:latest\nCOPY check.sh /check.sh\n",
        ),
    ]);
    let daemon = GitDaemon::start(&config);
    let agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the failure in status", || {
        config
            .show("berth-status:status/pipeline/tool.yaml")
            .is_some_and(|s| s.contains("phase: Failure"))
    });
    let status = config
        .show("berth-status:status/pipeline/tool.yaml")
        .unwrap();
    assert!(
        status.contains("exit code 4") && status.contains("berth logs 1"),
        "{status}"
    );
    // Passes that follow (each a drift check) do not run it again.
    let before = agent.log().matches("pass done").count();
    for _ in 0..3 {
        let (code, _) = agent.api("POST", "/api/v1/reconcile");
        assert_eq!(code, 202);
        let seen = agent.log().matches("pass done").count();
        agent.wait_for("the pass asked for", || {
            agent.log().matches("pass done").count() > seen
        });
    }
    assert!(agent.log().matches("pass done").count() >= before + 3);
    let (_, body) = agent.api("GET", "/api/v1/runs?pipeline=tool");
    let runs: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(runs.len(), 1, "the broken build ran again: {body}");
    // A fix to its folder is a new spec: it builds.
    let fixed = config.commit(&[("tool/check.sh", Some("echo checking; exit 0\n"))], "fix");
    let (code, _) = agent.api("POST", "/api/v1/reconcile");
    assert_eq!(code, 202);
    agent.wait_for("the fixed build", || {
        config
            .show("berth-status:status/pipeline/tool.yaml")
            .is_some_and(|s| s.contains("phase: Running") && s.contains(&fixed[..12]))
    });
}

/// Issue 18: a signed push of an unreviewed branch built and moved `app:latest`, which anything
/// using the tag by name then ran. A branch's build now gets a tag of its own, the product tag
/// stays on the build of `ref`, and consumers keep running that.
#[test]
fn a_push_of_another_branch_builds_under_its_own_tag_and_never_moves_the_product() {
    let Some(instance) = engine() else { return };
    let (source, source_daemon) = site_source("version one\n");
    let port = free_port();
    let image = format!("{}-site", instance.name);
    let config = site_config(&source_daemon.url(), "{}", &format!("{image}:latest"), port);
    let first = config.bare_git(&["rev-parse", "main"]);
    let config_daemon = GitDaemon::start(&config);
    let agent = Agent::start(&instance, &config_daemon.url(), "");
    agent.wait_for("the first build served", || fetch(port) == "version one");
    agent.wait_for("the revision applied", || applied(&config, &first));
    let product = || {
        docker(&[
            "image",
            "inspect",
            "--format",
            "{{.Id}}",
            &format!("{image}:latest"),
        ])
    };
    let before = product();
    assert!(before.starts_with("sha256:"), "{before}");

    // An outsider's branch: its commit is on `evil` only.
    let main_tip = source.bare_git(&["rev-parse", "main"]);
    let evil = source.commit(&[("page.txt", Some("owned\n"))], "Evil");
    source.bare_git(&["update-ref", "refs/heads/evil", &evil]);
    source.bare_git(&["update-ref", "refs/heads/main", &main_tip]);
    let (code, answer) = deliver_body(
        &agent,
        push_of_branch(&source_daemon.url(), "evil", &evil),
        "delivery-evil",
    );
    assert_eq!(code, 202, "{answer}");
    let id = queued_run(&answer, "site");
    agent.wait_for("the branch's run ended", || {
        !matches!(state(&agent, id).as_str(), "queued" | "running")
    });
    let shown = run(&agent, id);
    assert_eq!(shown["state"], "succeeded", "{shown}");
    let branch_tag = format!("{image}:branch-evil-{}", &evil[..12]);
    assert_eq!(shown["image"], branch_tag.as_str(), "{shown}");
    let built = docker(&["image", "inspect", "--format", "{{.Id}}", &branch_tag]);
    assert!(built.starts_with("sha256:") && built != before, "{built}");
    assert_eq!(product(), before, "the branch's build moved {image}:latest");
    // The passes the run's end wakes do not roll the challenge to it.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fetch(port), "version one");
}

/// Issue 19, item 12: followers that stop reading hold their slots only while their run runs;
/// once it ends, the next follower is served, not told the slots are taken.
#[test]
fn followers_that_do_not_read_give_their_slots_back_when_the_run_ends() {
    let Some(instance) = engine() else { return };
    // Output enough to fill a reader's socket buffers many times over, for a few seconds.
    let config = Origin::new(&[
        ("ctx/f", "x\n"),
        (
            "pipelines/loud.yaml",
            &local_pipeline(
                "loud",
                "",
                "for i in 1 2 3 4 5 6; do head -c 4000000 /dev/zero | tr '\\\\0' a; sleep 1; done; echo done",
            ),
        ),
    ]);
    let daemon = GitDaemon::start(&config);
    let agent = Agent::start(&instance, &daemon.url(), "pipelines: {logCap: 1048576}\n");
    agent.wait_for("the first pass", || agent.log().contains("pass done"));
    let (code, body) = agent.api("POST", "/api/v1/pipelines/loud/runs");
    assert_eq!(code, 201, "{body}");
    agent.wait_for("the run running", || state(&agent, 1) == "running");
    let request = format!(
        "GET /api/v1/runs/1/logs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        crate::support::agent::API_TOKEN
    );
    // Sixteen followers, as many as there are slots, none of which reads.
    let silent: Vec<std::net::TcpStream> = (0..16)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let (code, busy) = agent.api("GET", "/api/v1/runs/1/logs");
    assert_eq!(code, 503, "all slots taken while it runs: {busy}");
    agent.wait_for("the run ended", || state(&agent, 1) == "succeeded");
    let (code, log) = agent.api("GET", "/api/v1/runs/1/logs");
    assert_eq!(code, 200, "{log}");
    assert!(log.contains("done"), "the whole log, from the file");
    // A new run, followed: a slot is free although the silent ones are still connected.
    let (code, body) = agent.api("POST", "/api/v1/pipelines/loud/runs");
    assert_eq!(code, 201, "{body}");
    agent.wait_for("the second run running", || state(&agent, 2) == "running");
    let mut follower = std::net::TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    follower
        .write_all(request.replace("runs/1/", "runs/2/").as_bytes())
        .unwrap();
    let mut head = [0u8; 12];
    follower.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
    drop(silent);
}
