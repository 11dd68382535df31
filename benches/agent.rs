//! The agent at 1,000 descriptors: the real `berth agent` binary following a repo served by
//! `git daemon` on loopback, applying to the real Docker Engine. Measured in one run:
//!
//! - fetch when nothing is new: berth's in-process fetch (git2) against `git fetch` by the CLI, on
//!   the same repo and server;
//! - the initial pass (1,000 objects) and its status commit (1,000 new status files);
//! - a no-op pass with drift checking on (fetch, hash compare, one engine list call), and the
//!   engine's list call alone;
//! - a one-file change: the pass, and signed webhook received → container replaced;
//! - the agent's RSS, idle and peak (`VmRSS`, `VmHWM`).
//!
//! The repo holds 1,000 challenges: 990 `state: stopped` (created, not started: a thousand running
//! containers would measure the machine, not berth) and 10 running. Needs Docker, `busybox:latest`
//! (`tests/testbed/busybox-image.sh`) and git. Run: `cargo bench --bench agent`.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/common.rs"]
mod common;

use berth::config::{AgentConfig, Secrets};
use berth::source::Source;

const OBJECTS: usize = 1000;
const RUNNING: usize = 10;
const INSTANCE: &str = "bench-agent";
const SECRET: &str = "bench-webhook-secret";
const TOKEN: &str = "bench-api-token";

fn challenge(i: usize, env: &str) -> String {
    let state = if i < RUNNING { "running" } else { "stopped" };
    format!(
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: c-{i:04}}}\nspec:\n  state: {state}\n  image: busybox:latest\n  command: [sleep, \"3600\"]\n  env: {{ROUND: \"{env}\"}}\n"
    )
}

/// The agent's JSON log, read line by line as it is written.
struct Log {
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
}

impl Log {
    /// Reads until a line with `message`, returning its fields.
    fn until(&mut self, message: &str) -> serde_json::Value {
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if value["message"] == message {
                return value;
            }
        }
        panic!("the agent's log ended before {message:?}");
    }
}

fn main() {
    if !common::engine_answers() {
        return;
    }
    common::remove_instance(INSTANCE);
    let work = tempfile::tempdir().unwrap();
    let served = work.path().join("served");
    let source_dir = work.path().join("source");
    std::fs::create_dir_all(source_dir.join("challenges")).unwrap();
    for i in 0..OBJECTS {
        std::fs::write(
            source_dir.join(format!("challenges/c-{i:04}.yaml")),
            challenge(i, "1"),
        )
        .unwrap();
    }
    common::git(work.path(), &["init", "-q", "-b", "main", "source"]);
    common::git(&source_dir, &["add", "-A"]);
    common::git(&source_dir, &["commit", "-q", "-m", "1,000 challenges"]);
    std::fs::create_dir_all(&served).unwrap();
    // The repo the agent follows, and one for the status commits alone, so the agent starts from
    // no status.
    for name in ["infra.git", "status-bench.git"] {
        common::git(
            &served,
            &["clone", "-q", "--bare", source_dir.to_str().unwrap(), name],
        );
    }
    common::git(
        &source_dir,
        &[
            "remote",
            "add",
            "served",
            served.join("infra.git").to_str().unwrap(),
        ],
    );

    let (mut daemon, daemon_port) = common::git_daemon(&served);
    let url = format!("git://127.0.0.1:{daemon_port}/infra.git");
    println!(
        "repo: {OBJECTS} challenges ({RUNNING} running, the rest stopped), served by git daemon on loopback\n"
    );

    // Fetch with nothing new: berth (git2, in process) against the git CLI.
    let source = source_of(&url, &work.path().join("fetch-state"));
    let head = source.fetch().unwrap();
    let berth_fetch: Vec<f64> = (0..20)
        .map(|_| {
            let started = Instant::now();
            let tip = source.fetch().unwrap();
            source.content_id(&tip).unwrap();
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    common::git(work.path(), &["clone", "-q", &url, "cli-clone"]);
    let cli_clone = work.path().join("cli-clone");
    let cli_fetch: Vec<f64> = (0..20)
        .map(|_| {
            let started = Instant::now();
            common::git(&cli_clone, &["fetch", "-q", "origin"]);
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    println!("fetch, nothing new (median of 20)");
    println!(
        "  berth (git2, + content id) {:>8.1} ms",
        common::median(berth_fetch.clone())
    );
    println!(
        "  git fetch (CLI)            {:>8.1} ms",
        common::median(cli_fetch.clone())
    );

    status_commits(
        &format!("git://127.0.0.1:{daemon_port}/status-bench.git"),
        work.path(),
    );

    // The agent.
    let state = work.path().join("agent");
    std::fs::create_dir_all(&state).unwrap();
    let (agent_config, port) =
        common::agent_config(&state, INSTANCE, &url, (SECRET, TOKEN), "wait: 30s\n");
    let started = Instant::now();
    let mut agent: Child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["agent", "--log-format", "json", "--config"])
        .arg(&agent_config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = agent.id();
    let mut log = Log {
        lines: std::io::BufReader::new(agent.stderr.take().unwrap()).lines(),
    };
    // A pass ends ("pass done"), then its status is pushed.
    let first = log.until("pass done");
    let pushed = log.until("status pushed");
    let initial = started.elapsed();
    println!(
        "\ninitial pass, {OBJECTS} objects created: {:.1} s (pass {} ms)",
        initial.as_secs_f64(),
        first["took_ms"]
    );
    println!(
        "status write-back, {} files: tree made (in memory) {:.1} ms; packed {:.1} ms; commit stored in the clone (all of it) {:.1} ms; with the push {} ms",
        pushed["files"],
        pushed["tree_ms"].as_f64().unwrap_or(f64::NAN),
        pushed["pack_ms"].as_f64().unwrap_or(f64::NAN),
        pushed["commit_ms"].as_f64().unwrap_or(f64::NAN),
        pushed["took_ms"]
    );

    std::thread::sleep(Duration::from_secs(3));
    let idle = common::rss_kib(pid, "VmRSS:");
    let idle_anonymous = common::rss_kib(pid, "RssAnon:");

    // No-op passes (drift checking on: fetch, compare, one engine list call).
    let auth = format!("Bearer {TOKEN}");
    let mut noop = Vec::new();
    for _ in 0..15 {
        assert_eq!(
            common::http(
                port,
                "POST",
                "/api/v1/reconcile",
                &[("Authorization", &auth)],
                b""
            )
            .0,
            202
        );
        let done = log.until("pass done");
        assert_eq!(done["result"], "unchanged", "{done}");
        noop.push(done["took_ms"].as_f64().unwrap());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let list: Vec<f64> = runtime.block_on(async {
        let backend = berth::reconcile::connect(INSTANCE, &Default::default())
            .await
            .unwrap();
        let mut times = Vec::new();
        for _ in 0..15 {
            let started = Instant::now();
            backend.observe().await.unwrap();
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times
    });
    let (noop, list) = (common::median(noop), common::median(list));
    println!(
        "\nno-op pass, drift check on (median of 15): {noop:.0} ms; engine list call alone {list:.1} ms; berth's part {:.1} ms",
        noop - list
    );

    // One file changes; a signed webhook announces it.
    std::fs::write(source_dir.join("challenges/c-0000.yaml"), challenge(0, "2")).unwrap();
    common::git(
        &source_dir,
        &["commit", "-q", "-am", "Change one challenge"],
    );
    common::git(&source_dir, &["push", "-q", "served", "main"]);
    let commit = common::git(&source_dir, &["rev-parse", "HEAD"]);
    let old = runtime.block_on(running_id("c-0000"));
    let body =
        format!(r#"{{"ref":"refs/heads/main","after":"{commit}","pusher":{{"name":"bench"}}}}"#);
    let signature = format!(
        "sha256={}",
        berth::webhook::sign(SECRET.as_bytes(), body.as_bytes())
    );
    let sent = Instant::now();
    let code = common::http(
        port,
        "POST",
        "/hooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &signature),
        ],
        body.as_bytes(),
    )
    .0;
    assert_eq!(code, 202);
    let replaced = runtime.block_on(async {
        loop {
            let now = running_id("c-0000").await;
            if now.is_some() && now != old {
                return sent.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let changed = log.until("pass done");
    println!(
        "\none-file change: webhook → container replaced {:.0} ms; the pass {} ms (incl. waiting for the new container to run)",
        replaced.as_secs_f64() * 1000.0,
        changed["took_ms"]
    );
    let _ = (head, &daemon);
    let peak = common::rss_kib(pid, "VmHWM:");
    println!(
        "\nagent RSS: idle {:.1} MiB (anonymous memory {:.1} MiB; the rest is the mapped binary), peak {:.1} MiB",
        idle as f64 / 1024.0,
        idle_anonymous as f64 / 1024.0,
        peak as f64 / 1024.0
    );

    let _ = agent.kill();
    let _ = agent.wait();
    let _ = daemon.kill();
    let _ = daemon.wait();
    common::remove_instance(INSTANCE);
}

/// The id of the running container of challenge `name`, if one runs.
async fn running_id(name: &str) -> Option<String> {
    let docker = bollard::Docker::connect_with_local_defaults().unwrap();
    let mut filters = std::collections::HashMap::new();
    filters.insert(
        "label".to_string(),
        vec![
            format!("berth.instance={INSTANCE}"),
            format!("berth.name={name}"),
        ],
    );
    filters.insert("status".to_string(), vec!["running".to_string()]);
    let options = bollard::query_parameters::ListContainersOptions {
        all: false,
        filters: Some(filters),
        ..Default::default()
    };
    let list = docker.list_containers(Some(options)).await.ok()?;
    list.first()?.id.clone()
}

/// berth's clone of `url`, kept in `state`, as an agent with no other settings has it.
fn source_of(url: &str, state: &std::path::Path) -> Source {
    let config = AgentConfig::from_text(
        "bench",
        &format!("repo: {{url: \"{url}\"}}\nstateDir: {}\n", state.display()),
        |_| None,
    )
    .unwrap();
    Source::new(&config, &Secrets::default())
}

/// A status file as the agent writes one for a running challenge (about 640 bytes), for object
/// `i` after pass `round`.
fn status_file(i: usize, round: usize) -> String {
    format!(
        "# Written by berth; edits are overwritten on the next pass.\nkind: Challenge\nname: c-{i:04}\nphase: Running\nhealth: Healthy\nrevision: {:040x}\nspecHash: {:032x}\nmessage: \"created: container missing\"\nlastTransition: \"2026-12-06T11:{:02}:00Z\"\nparts:\n  - id: main-1\n    hash: {:016x}\n    state: running\n    health: Healthy\n    spec:\n      replicas: 1\n      image: \"busybox:latest\"\n      command:\n        - sleep\n        - \"3600\"\n      env:\n        ROUND: \"{round}\"\n      resources:\n        cpus: 1.0\n        memory: 512Mi\n        pids: 512\n      restart: unlessStopped\n      walls: challenges\n",
        round * 7919 + 1,
        i * 104_729 + round,
        round % 60,
        i * 31 + round
    )
}

/// The status commit of 1,001 changed files, ten times: berth in process (tree made in memory,
/// its new objects stored as one pack, the commit; then pushed) against the git CLI adding and
/// committing the same files in a worktree.
fn status_commits(url: &str, work: &std::path::Path) {
    const ROUNDS: usize = 10;
    let source = source_of(url, &work.join("status-state"));
    source.fetch().unwrap();
    let files = |round: usize| -> std::collections::BTreeMap<String, String> {
        let mut files: std::collections::BTreeMap<String, String> = (0..OBJECTS)
            .map(|i| {
                (
                    format!("status/challenge/c-{i:04}.yaml"),
                    status_file(i, round),
                )
            })
            .collect();
        files.insert("status/agent.yaml".to_string(), format!("round: {round}\n"));
        files
    };
    let (mut made, mut packed, mut stored) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        match source
            .publish_status(&files(round), "bench: status")
            .unwrap()
        {
            berth::source::Published::Pushed {
                made: m,
                packed: p,
                stored: s,
                ..
            } => {
                made.push(m.as_secs_f64() * 1000.0);
                packed.push(p.as_secs_f64() * 1000.0);
                stored.push(s.as_secs_f64() * 1000.0);
            }
            berth::source::Published::Unchanged => panic!("round {round} changed every file"),
        }
    }
    let worktree = work.join("cli-status");
    std::fs::create_dir_all(worktree.join("status/challenge")).unwrap();
    common::git(work, &["init", "-q", "-b", "berth-status", "cli-status"]);
    let cli: Vec<f64> = (0..ROUNDS)
        .map(|round| {
            for (path, text) in files(round) {
                std::fs::write(worktree.join(path), text).unwrap();
            }
            let started = Instant::now();
            common::git(&worktree, &["add", "-A"]);
            common::git(&worktree, &["commit", "-q", "-m", "bench: status"]);
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    println!(
        "\nstatus commit of {} changed files (median of {ROUNDS})",
        OBJECTS + 1
    );
    println!(
        "  berth, stored in the clone  {:>8.1} ms (tree made {:.1} ms, packed {:.1} ms)",
        common::median(stored),
        common::median(made),
        common::median(packed)
    );
    println!(
        "  git add -A && git commit    {:>8.1} ms",
        common::median(cli)
    );
}
