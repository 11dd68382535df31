//! Pipeline runs through the agent's queue: the real `berth agent` binary, a source repo served by
//! `git daemon` on loopback, steps on the real Docker Engine. Measured in one run:
//!
//! - **webhook → first step**: from a signed push webhook sent to the first line the step printed
//!   reaching the run's log (so the step's process started), median of 5 pushes; beside it the
//!   engine's own `docker run --rm busybox true`, the container start the target excludes;
//! - **20 queued runs** of a small pipeline (clone, one step that hashes the checkout and waits 1 s)
//!   at 4 workers, against a shell script doing the same `git clone` + `docker run` one after
//!   another; and each berth run's own duration against the script's per-run floor;
//! - **agent memory** with 1,000 finished runs in its database (written through berth's own run
//!   store before the agent starts), idle and while serving all of them through the API;
//! - **a 500 MB file in the source** (`BERTH_BENCH_LARGE_FILE_MB` to change it): `berth run`
//!   clones it over `git daemon`, checks it out and copies the workspace into the run's volume,
//!   against the git CLI's `clone` plus `docker cp` of the same folder; berth's peak resident and
//!   anonymous memory, sampled from `/proc` every 20 ms.
//!
//! Needs Docker, `busybox:latest` (`tests/testbed/busybox-image.sh`) and git.
//! Run: `cargo bench --bench pipelines`.

#[path = "support/common.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth::queue::store::RunStore;
use berth::queue::{Cause, NewRun, RunState};

const INSTANCE: &str = "bench-pipelines";
const SECRET: &str = "bench-webhook-secret";
const TOKEN: &str = "bench-api-token";
const STEP: &str =
    "find . -type f -exec sha256sum {} + > /tmp/sums && echo step-started && sleep 1";
const RUNS: usize = 20;
const WORKERS: usize = 4;

fn pipeline(url: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {{name: small}}\nspec:\n  source: {{url: \"{url}\"}}\n  triggers: {{push: {{}}}}\n  image: busybox:latest\n  concurrency: {WORKERS}\n  steps:\n    - {{name: check, run: \"{STEP}\"}}\n"
    )
}

fn api(port: u16, method: &str, path: &str) -> (u16, String) {
    let auth = format!("Bearer {TOKEN}");
    common::http(port, method, path, &[("Authorization", &auth)], b"")
}

fn runs(port: u16) -> Vec<serde_json::Value> {
    let (_, body) = api(port, "GET", "/api/v1/runs?limit=1000");
    serde_json::from_str(&body).unwrap_or_default()
}

/// Waits until `done` holds, polling every `every`; panics after 5 minutes.
fn until(every: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(every);
    }
}

fn main() {
    if !common::engine_answers() {
        return;
    }
    common::remove_instance(INSTANCE);
    let work = tempfile::tempdir().unwrap();
    let served = work.path().join("served");
    std::fs::create_dir_all(&served).unwrap();

    // The source: a small project.
    let source = work.path().join("source");
    std::fs::create_dir_all(source.join("src")).unwrap();
    for i in 0..20 {
        std::fs::write(
            source.join(format!("src/file{i}.txt")),
            "x".repeat(4096 * (i + 1)),
        )
        .unwrap();
    }
    std::fs::write(source.join("README"), "a small project\n").unwrap();
    common::git(work.path(), &["init", "-q", "-b", "main", "source"]);
    common::git(&source, &["add", "-A"]);
    common::git(&source, &["commit", "-q", "-m", "first"]);
    common::git(
        &served,
        &["clone", "-q", "--bare", source.to_str().unwrap(), "app.git"],
    );
    common::git(
        &source,
        &[
            "remote",
            "add",
            "served",
            served.join("app.git").to_str().unwrap(),
        ],
    );

    // The config repo: one pipeline building that source.
    let (daemon, daemon_port) = common::git_daemon(&served);
    let _daemon = common::KilledOnDrop(daemon);
    let app_url = format!("git://127.0.0.1:{daemon_port}/app.git");
    let config = work.path().join("config");
    std::fs::create_dir_all(config.join("pipelines")).unwrap();
    std::fs::write(config.join("pipelines/small.yaml"), pipeline(&app_url)).unwrap();
    common::git(work.path(), &["init", "-q", "-b", "main", "config"]);
    common::git(&config, &["add", "-A"]);
    common::git(&config, &["commit", "-q", "-m", "pipeline"]);
    common::git(
        &served,
        &[
            "clone",
            "-q",
            "--bare",
            config.to_str().unwrap(),
            "infra.git",
        ],
    );
    let config_url = format!("git://127.0.0.1:{daemon_port}/infra.git");

    // 1,000 finished runs already in the store, as an agent that ran for months would have them.
    let state = work.path().join("agent");
    std::fs::create_dir_all(state.join("state")).unwrap();
    {
        let store = RunStore::open(&state.join("state/runs.db")).unwrap();
        // Two pipelines: the store keeps the newest 500 finished runs of each.
        for i in 0..1000 {
            store
                .enqueue(
                    &NewRun {
                        pipeline: format!("history-{}", i % 2),
                        cause: Cause::Manual,
                        commit: Some(format!("{i:040x}")),
                        branch: Some("main".into()),
                        delivery: None,
                        spec_hash: Some("0123456789abcdef".into()),
                    },
                    false,
                )
                .unwrap();
            let run = store.start_next(1, |_| 1).unwrap().unwrap();
            store
                .finish(
                    run.id,
                    RunState::Succeeded,
                    "Pipeline/history at 000000000000: succeeded in 12.0s",
                    Some("history:000000000000"),
                    &[],
                    12_000,
                )
                .unwrap();
        }
    }

    let (agent_config, port) = common::agent_config(
        &state,
        INSTANCE,
        &config_url,
        (SECRET, TOKEN),
        &format!("pipelines: {{workers: {WORKERS}}}\n"),
    );
    let (_agent, pid) = common::start_agent(&agent_config);
    until(Duration::from_millis(50), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && api(port, "GET", "/readyz").0 == 200
    });
    std::thread::sleep(Duration::from_secs(2));
    let idle = common::rss_kib(pid, "VmRSS:");
    let started = Instant::now();
    let listed = runs(port).len();
    let listing = started.elapsed();
    println!("\nagent memory with 1,000 finished runs in its database");
    println!("  idle RSS                          {:>8} KiB", idle);
    println!(
        "  GET /api/v1/runs?limit=1000       {:>8.1} ms ({listed} runs), RSS after {} KiB",
        listing.as_secs_f64() * 1000.0,
        common::rss_kib(pid, "VmRSS:")
    );

    // Webhook received → first step's process started.
    // Each run store keeps its logs in a folder named by its id: `runs/STORE/ID.log`.
    let log_of = |id: i64| {
        std::fs::read_dir(state.join("state/runs"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path().join(format!("{id}.log")))
            .find(|path| path.exists())
            .unwrap_or_default()
    };
    let mut to_step = Vec::new();
    let mut queued_to_start = Vec::new();
    let mut alone = Vec::new();
    for round in 0..5 {
        std::fs::write(source.join("README"), format!("round {round}\n")).unwrap();
        common::git(&source, &["commit", "-qam", "round"]);
        common::git(&source, &["push", "-q", "served", "main"]);
        let commit = common::git(&source, &["rev-parse", "HEAD"]);
        let body = format!(
            r#"{{"ref":"refs/heads/main","after":"{commit}","repository":{{"clone_url":"{app_url}"}}}}"#
        );
        let signature = format!(
            "sha256={}",
            berth::webhook::sign(SECRET.as_bytes(), body.as_bytes())
        );
        let sent = Instant::now();
        let (code, answer) = common::http(
            port,
            "POST",
            "/hooks/github",
            &[
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", &signature),
            ],
            body.as_bytes(),
        );
        assert_eq!(code, 202, "{answer}");
        let id: i64 = answer
            .lines()
            .find(|l| l.ends_with("queued for Pipeline/small"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no run queued: {answer}"));
        until(Duration::from_millis(1), || {
            std::fs::read_to_string(log_of(id)).is_ok_and(|l| l.contains("step-started"))
        });
        to_step.push(sent.elapsed().as_secs_f64() * 1000.0);
        until(Duration::from_millis(20), || {
            runs(port)
                .iter()
                .any(|r| r["id"] == id && r["state"] == "succeeded")
        });
        let run = runs(port).into_iter().find(|r| r["id"] == id).unwrap();
        let at = |field: &str| {
            chrono::DateTime::parse_from_rfc3339(run[field].as_str().unwrap()).unwrap()
        };
        queued_to_start.push((at("startedAt") - at("queuedAt")).num_milliseconds() as f64);
        alone.push(run["durationMs"].as_f64().unwrap());
    }
    let container_start = common::median(
        (0..5)
            .map(|_| {
                let started = Instant::now();
                docker(&["run", "--rm", "busybox:latest", "true"]);
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect(),
    );
    println!("\nsigned webhook sent → the first step's first line in the run's log (median of 5)");
    println!(
        "  berth                             {:>8.1} ms (queued → worker took it: {:.0} ms; includes the clone, the volume, the container and the copy)",
        common::median(to_step),
        common::median(queued_to_start)
    );
    println!(
        "  docker run --rm busybox true      {container_start:>8.1} ms (the container start alone)"
    );

    // 20 queued runs at 4 workers, against a shell script doing the same one after another.
    let before: Vec<i64> = runs(port).iter().filter_map(|r| r["id"].as_i64()).collect();
    let started = Instant::now();
    for _ in 0..RUNS {
        let (code, body) = api(port, "POST", "/api/v1/pipelines/small/runs");
        assert_eq!(code, 201, "{body}");
    }
    until(Duration::from_millis(50), || {
        let all = runs(port);
        let ours: Vec<&serde_json::Value> = all
            .iter()
            .filter(|r| !before.contains(&r["id"].as_i64().unwrap()))
            .collect();
        assert!(
            ours.iter().all(|r| r["state"] != "failed"),
            "a run failed: {ours:?}"
        );
        ours.len() == RUNS && ours.iter().all(|r| r["state"] == "succeeded")
    });
    let berth_total = started.elapsed().as_secs_f64();
    let per_run: Vec<f64> = runs(port)
        .iter()
        .filter(|r| !before.contains(&r["id"].as_i64().unwrap()))
        .map(|r| r["durationMs"].as_f64().unwrap())
        .collect();
    let script = work.path().join("peer.sh");
    std::fs::write(
        &script,
        format!(
            "set -e\nfor i in $(seq 1 {RUNS}); do\n  rm -rf \"$1/ws\"\n  git clone -q {app_url} \"$1/ws\"\n  docker run --rm -v \"$1/ws:/workspace\" -w /workspace busybox:latest sh -c '{STEP}' >/dev/null\ndone\n"
        ),
    )
    .unwrap();
    let peer_dir = work.path().join("peer");
    std::fs::create_dir_all(&peer_dir).unwrap();
    let started = Instant::now();
    let peer = Command::new("bash")
        .arg(&script)
        .arg(&peer_dir)
        .status()
        .unwrap();
    assert!(peer.success());
    let peer_total = started.elapsed().as_secs_f64();
    let floor = peer_total * 1000.0 / RUNS as f64;
    let mean = per_run.iter().sum::<f64>() / per_run.len() as f64;
    println!("\n{RUNS} runs of a small pipeline (clone + one step: hash the checkout, wait 1 s)");
    println!(
        "  berth, {WORKERS} workers (queued by API)     {berth_total:>8.1} s  ({:.1}× the script)",
        peer_total / berth_total
    );
    println!("  shell script, one after another   {peer_total:>8.1} s");
    let alone = common::median(alone);
    println!(
        "  one run alone: berth {alone:.0} ms (median of the 5 webhook runs) vs the script's clone + docker run {floor:.0} ms: {:+.0}%",
        (alone / floor - 1.0) * 100.0
    );
    println!(
        "  one run, {WORKERS} at once on this machine: berth {mean:.0} ms (mean): {:+.0}%",
        (mean / floor - 1.0) * 100.0
    );

    common::remove_instance(INSTANCE);
    large_source(&served, daemon_port, work.path());
    common::remove_instance(INSTANCE);
}

/// A source with one large file, run with `berth run` and with the git CLI and `docker cp`.
fn large_source(served: &std::path::Path, daemon_port: u16, work: &std::path::Path) {
    let megabytes: usize = std::env::var("BERTH_BENCH_LARGE_FILE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let source = work.join("large");
    std::fs::create_dir_all(&source).unwrap();
    // Incompressible, as a real asset or archive is.
    let mut file = std::fs::File::create(source.join("asset.bin")).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..megabytes {
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        std::io::Write::write_all(&mut file, &block).unwrap();
    }
    drop(file);
    common::git(work, &["init", "-q", "-b", "main", "large"]);
    common::git(&source, &["add", "-A"]);
    common::git(&source, &["commit", "-q", "-m", "large"]);
    common::git(
        served,
        &[
            "clone",
            "-q",
            "--bare",
            source.to_str().unwrap(),
            "large.git",
        ],
    );
    let url = format!("git://127.0.0.1:{daemon_port}/large.git");
    let config = work.join("large-config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("large.yaml"),
        format!("apiVersion: berth/v1\nkind: Pipeline\nmetadata: {{name: large}}\nspec:\n  source: {{url: \"{url}\"}}\n  image: busybox:latest\n  steps:\n    - {{name: size, run: \"ls -l asset.bin\"}}\n"),
    )
    .unwrap();

    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "run",
            config.to_str().unwrap(),
            "large",
            "--instance",
            INSTANCE,
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (mut peak_resident, mut peak_anonymous) = (0, 0);
    while child.try_wait().unwrap().is_none() {
        peak_resident = peak_resident.max(common::rss_kib(child.id(), "VmHWM:"));
        peak_anonymous = peak_anonymous.max(common::rss_kib(child.id(), "RssAnon:"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let berth_seconds = started.elapsed().as_secs_f64();

    // The peer: the git CLI's clone, then the folder copied into a container's volume.
    let started = Instant::now();
    let clone = work.join("large-clone");
    common::git(work, &["clone", "-q", &url, clone.to_str().unwrap()]);
    docker(&["volume", "create", "berth-bench-large"]);
    docker(&[
        "create",
        "--name",
        "berth-bench-large",
        "-v",
        "berth-bench-large:/workspace",
        "busybox:latest",
        "true",
    ]);
    docker(&[
        "cp",
        &format!("{}/.", clone.display()),
        "berth-bench-large:/workspace",
    ]);
    let peer_seconds = started.elapsed().as_secs_f64();
    let _ = Command::new("docker")
        .args(["rm", "-f", "berth-bench-large"])
        .output();
    let _ = Command::new("docker")
        .args(["volume", "rm", "berth-bench-large"])
        .output();

    println!("\na source with one {megabytes} MB file: clone, checkout, workspace into the volume");
    println!(
        "  berth run                      {berth_seconds:>8.1} s  peak resident {:>5} MiB, peak anonymous {:>4} MiB",
        peak_resident / 1024,
        peak_anonymous / 1024
    );
    println!("  git clone + docker cp          {peer_seconds:>8.1} s");
}

fn docker(args: &[&str]) {
    let status = Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "docker {args:?}");
}
