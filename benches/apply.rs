//! Applying N challenges: berth against `docker-compose up -d` and the raw Docker API floor, side
//! by side on the same engine, for N = 10, 30 and 50 (each a busybox `httpd` on its own host port).
//!
//! - berth: load + observe + plan + apply in process (`--wait 0s`, concurrency 8), as `berth apply` runs;
//! - docker-compose: `docker-compose up -d` on an equivalent compose file, run as a command;
//! - raw floor: the same walled containers berth makes (a network with inter-container traffic
//!   off, then create and start each with no-new-privileges, NET_RAW dropped, an init and the
//!   default limits), through the API at concurrency 8, with nothing else.
//!
//! Then a stop-first update of one challenge on a fixed host port, berth beside docker-compose:
//! from the apply to the new version serving, and how long the port answered nothing.
//!
//! With `BERTH_BENCH_LARGE=1` it also applies 1,000 challenges, 200 of them with a sidecar, and
//! reports the time and the process's peak memory.
//!
//! Each is timed from an empty engine state (initial) and right after (no-op). Needs a Docker Engine
//! and `busybox:latest` (`tests/testbed/busybox-image.sh`). Run: `cargo bench --bench apply`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use berth::descriptor::LoadOptions;
use berth::plan::Policy;
use berth::reconcile::{self, ApplyOptions};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, NetworkCreateRequest, PortBinding};
use bollard::query_parameters::CreateContainerOptions;
use futures_util::StreamExt;

const CONCURRENCY: usize = 8;

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn write_repo(dir: &Path, ports: &[u16]) {
    for (i, port) in ports.iter().enumerate() {
        let text = format!(
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: web-{i}}}\nspec:\n  image: busybox:latest\n  command: [httpd, -f, -p, \"8080\", -h, /www]\n  ports:\n    - {{container: 8080, host: {port}}}\n"
        );
        std::fs::write(dir.join(format!("web-{i}.yaml")), text).unwrap();
    }
}

fn write_compose(path: &Path, ports: &[u16]) {
    let mut text = String::from("version: \"3\"\nservices:\n");
    for (i, port) in ports.iter().enumerate() {
        text.push_str(&format!(
            "  web-{i}:\n    image: busybox:latest\n    command: [httpd, -f, -p, \"8080\", -h, /www]\n    ports: [\"{port}:8080\"]\n"
        ));
    }
    std::fs::write(path, text).unwrap();
}

fn docker_cli(args: &[&str]) -> String {
    let output = Command::new("docker").args(args).output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn remove_labelled(label: &str) {
    for (list, remove) in [
        (vec!["ps", "-aq", "--filter", label], vec!["rm", "-f"]),
        (
            vec!["network", "ls", "-q", "--filter", label],
            vec!["network", "rm"],
        ),
    ] {
        let ids = docker_cli(&list);
        if !ids.is_empty() {
            let mut args = remove;
            args.extend(ids.split_whitespace());
            docker_cli(&args);
        }
    }
}

async fn berth_apply(dir: &Path, instance: &str) -> Duration {
    let start = Instant::now();
    // The same pass `berth apply` runs: load, connect, observe, resolve, diff, apply.
    let loaded = reconcile::load(dir, &LoadOptions::default()).unwrap();
    let engines = reconcile::connect(instance, &Default::default())
        .await
        .unwrap();
    let options = ApplyOptions {
        concurrency: CONCURRENCY,
        lock_wait: Duration::from_secs(60),
        policy: Policy::default(),
        runs: None,
    };
    let desired = reconcile::desired(&loaded);
    let applied = reconcile::apply(desired, &engines, &loaded.root, &options, |_| {})
        .await
        .unwrap();
    let elapsed = start.elapsed();
    let failed: Vec<_> = applied
        .reports
        .iter()
        .filter(|r| !matches!(r.outcome, berth::apply::Outcome::Done(_)))
        .map(|r| format!("{}: {:?}", r.step.key, r.outcome))
        .collect();
    assert!(failed.is_empty(), "berth apply failed: {failed:?}");
    elapsed
}

async fn raw_floor(docker: &Docker, ports: &[u16], label: &str) -> Duration {
    let start = Instant::now();
    let network = "raw-bench-walled";
    docker
        .create_network(NetworkCreateRequest {
            name: network.into(),
            labels: Some(HashMap::from([(label.to_string(), "1".to_string())])),
            options: Some(HashMap::from([(
                "com.docker.network.bridge.enable_icc".to_string(),
                "false".to_string(),
            )])),
            ..Default::default()
        })
        .await
        .unwrap();
    let jobs = ports.iter().enumerate().map(|(i, port)| {
        let docker = docker.clone();
        let labels = HashMap::from([(label.to_string(), "1".to_string())]);
        async move {
            let bindings = HashMap::from([(
                "8080/tcp".to_string(),
                Some(vec![PortBinding {
                    host_ip: None,
                    host_port: Some(port.to_string()),
                }]),
            )]);
            let body = ContainerCreateBody {
                image: Some("busybox:latest".into()),
                cmd: Some(vec![
                    "httpd".into(),
                    "-f".into(),
                    "-p".into(),
                    "8080".into(),
                    "-h".into(),
                    "/www".into(),
                ]),
                labels: Some(labels),
                exposed_ports: Some(vec!["8080/tcp".into()]),
                host_config: Some(HostConfig {
                    port_bindings: Some(bindings),
                    network_mode: Some(network.into()),
                    security_opt: Some(vec!["no-new-privileges".into()]),
                    cap_drop: Some(vec!["NET_RAW".into()]),
                    init: Some(true),
                    nano_cpus: Some(1_000_000_000),
                    memory: Some(512 << 20),
                    memory_swap: Some(512 << 20),
                    pids_limit: Some(512),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let name = format!("raw-bench-{i}");
            let options = CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            };
            docker.create_container(Some(options), body).await.unwrap();
            docker
                .start_container(
                    &name,
                    None::<bollard::query_parameters::StartContainerOptions>,
                )
                .await
                .unwrap();
        }
    });
    futures_util::stream::iter(jobs)
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    start.elapsed()
}

fn compose(file: &Path, project: &str, args: &[&str]) -> Duration {
    let start = Instant::now();
    let status = Command::new("docker-compose")
        .args(["-p", project, "-f", file.to_str().unwrap()])
        .args(args)
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "docker-compose {args:?} failed");
    start.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let status = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/testbed/busybox-image.sh"
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(reconcile::connect("bench", &Default::default()))
        .expect("a Docker Engine answers");
    let docker = runtime
        .block_on(Docker::connect_with_defaults().unwrap().negotiate_version())
        .unwrap();
    println!(
        "{:<34} {:>10} {:>10}",
        "apply N busybox httpd challenges", "initial", "no-op"
    );
    for n in [10usize, 30, 50] {
        let ports = free_ports(n);
        let dir = tempfile::tempdir().unwrap();
        write_repo(dir.path(), &ports);
        let compose_dir = tempfile::tempdir().unwrap();
        let compose_file = compose_dir.path().join("compose.yml");
        write_compose(&compose_file, &ports);

        let instance = format!("bench{n}");
        let label = format!("label=berth.instance={instance}");
        remove_labelled(&label);
        let berth_initial = runtime.block_on(berth_apply(dir.path(), &instance));
        let berth_noop = runtime.block_on(berth_apply(dir.path(), &instance));
        remove_labelled(&label);

        let project = format!("berthbench{n}");
        compose(&compose_file, &project, &["down", "--remove-orphans"]);
        let compose_initial = compose(&compose_file, &project, &["up", "-d"]);
        let compose_noop = compose(&compose_file, &project, &["up", "-d"]);
        compose(&compose_file, &project, &["down", "--remove-orphans"]);

        let raw_label = "berth-raw-bench";
        remove_labelled(&format!("label={raw_label}"));
        let raw = runtime.block_on(raw_floor(&docker, &ports, raw_label));
        remove_labelled(&format!("label={raw_label}"));

        println!("N = {n}");
        println!(
            "  {:<32} {:>8.0}ms {:>8.1}ms",
            "berth apply",
            ms(berth_initial),
            ms(berth_noop)
        );
        println!(
            "  {:<32} {:>8.0}ms {:>8.1}ms",
            "docker-compose up -d",
            ms(compose_initial),
            ms(compose_noop)
        );
        println!(
            "  {:<32} {:>8.0}ms {:>10}",
            "raw API floor (create+start)",
            ms(raw),
            "-"
        );
        println!(
            "  berth/floor {:.2}x   compose/berth initial {:.1}x   compose/berth no-op {:.0}x",
            ms(berth_initial) / ms(raw),
            ms(compose_initial) / ms(berth_initial),
            ms(compose_noop) / ms(berth_noop)
        );
    }
    stop_first(&runtime);
    if std::env::var("BERTH_BENCH_LARGE").as_deref() == Ok("1") {
        large(&runtime);
    }
}

/// One challenge whose page says `version`, on host port `port`, as a CTF writes a busybox
/// service: a shell that writes its page, then `httpd` as PID 1 (which ignores SIGTERM).
fn versioned_challenge(version: &str, port: u16) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: web}}\nspec:\n  image: busybox:latest\n  command: [sh, -c, \"mkdir -p /www && echo $VERSION > /www/index.html && exec httpd -f -p 8080 -h /www\"]\n  env: {{VERSION: {version}}}\n  ports:\n    - {{container: 8080, host: {port}}}\n"
    )
}

fn versioned_compose(version: &str, port: u16) -> String {
    format!(
        "version: \"3\"\nservices:\n  web:\n    image: busybox:latest\n    command: [sh, -c, \"mkdir -p /www && echo $$VERSION > /www/index.html && exec httpd -f -p 8080 -h /www\"]\n    environment: {{VERSION: {version}}}\n    ports: [\"{port}:8080\"]\n"
    )
}

/// What a prober saw of a port while an update ran: when `wanted` was first served (from the
/// start), and the longest time nothing answered.
struct Served {
    new_version_after: Duration,
    longest_down: Duration,
}

/// Probes `port` every 10 ms from now until `wanted` is served (at most 60 s).
fn probe_until(port: u16, wanted: &str) -> std::thread::JoinHandle<Served> {
    let wanted = wanted.to_string();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let start = Instant::now();
        let mut last_answer = Instant::now();
        let mut longest_down = Duration::ZERO;
        while start.elapsed() < Duration::from_secs(60) {
            let answer = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                let mut text = String::new();
                s.read_to_string(&mut text)?;
                Ok(text)
            });
            match answer {
                Ok(text) if text.contains("200") => {
                    longest_down = longest_down.max(last_answer.elapsed());
                    last_answer = Instant::now();
                    if text.contains(&wanted) {
                        return Served {
                            new_version_after: start.elapsed(),
                            longest_down,
                        };
                    }
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{wanted} was not served within 60 s");
    })
}

/// A stop-first update (a challenge on a fixed host port) from the apply to the new version
/// serving, and how long the port was down: berth (its containers run under an init, so the old
/// one stops at once) beside `docker-compose up -d` of the same change (PID 1 ignores SIGTERM,
/// so the engine waits its 10 s grace period).
fn stop_first(runtime: &tokio::runtime::Runtime) {
    let port = free_ports(1)[0];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("web.yaml");
    let instance = "benchstopfirst";
    let label = format!("label=berth.instance={instance}");
    remove_labelled(&label);
    std::fs::write(&file, versioned_challenge("v1", port)).unwrap();
    runtime.block_on(berth_apply(dir.path(), instance));
    probe_until(port, "v1").join().unwrap();
    std::fs::write(&file, versioned_challenge("v2", port)).unwrap();
    let prober = probe_until(port, "v2");
    runtime.block_on(berth_apply(dir.path(), instance));
    let berth = prober.join().unwrap();
    remove_labelled(&label);

    let compose_dir = tempfile::tempdir().unwrap();
    let compose_file = compose_dir.path().join("compose.yml");
    let project = "berthbenchstopfirst";
    std::fs::write(&compose_file, versioned_compose("v1", port)).unwrap();
    compose(&compose_file, project, &["up", "-d"]);
    probe_until(port, "v1").join().unwrap();
    std::fs::write(&compose_file, versioned_compose("v2", port)).unwrap();
    let prober = probe_until(port, "v2");
    compose(&compose_file, project, &["up", "-d"]);
    let peer = prober.join().unwrap();
    compose(&compose_file, project, &["down", "--remove-orphans"]);

    println!("stop-first update of one challenge on a host port (apply to new version served)");
    for (who, served) in [("berth apply", berth), ("docker-compose up -d", peer)] {
        println!(
            "  {:<32} {:>8.0}ms   port down at most {:.0}ms",
            who,
            ms(served.new_version_after),
            ms(served.longest_down)
        );
    }
}

/// 1,000 challenges on one engine, 200 with a sidecar (their own networks): the walls at a CTF's
/// scale, with the daemon's configuration unchanged.
fn large(runtime: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..1000 {
        let sidecar = match i % 5 {
            0 => {
                "  sidecars: [{name: db, image: \"busybox:latest\", command: [sleep, \"86400\"]}]\n"
            }
            _ => "",
        };
        std::fs::write(
            dir.path().join(format!("c{i}.yaml")),
            format!("apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: c{i}}}\nspec:\n  image: busybox:latest\n  command: [sleep, \"86400\"]\n{sidecar}"),
        )
        .unwrap();
    }
    let instance = "benchlarge";
    let label = format!("label=berth.instance={instance}");
    remove_labelled(&label);
    let initial = runtime.block_on(berth_apply(dir.path(), instance));
    let noop = runtime.block_on(berth_apply(dir.path(), instance));
    let networks = docker_cli(&["network", "ls", "-q", "--filter", &label])
        .lines()
        .count();
    let peak = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .map(str::to_string)
        .unwrap_or_default();
    println!("1,000 challenges, 200 with a sidecar ({networks} networks)");
    println!(
        "  initial {:.1}s, no-op {:.0}ms; bench process peak {}",
        initial.as_secs_f64(),
        ms(noop),
        peak.trim_start_matches("VmHWM:").trim()
    );
    // Printed first: removing 1,200 containers takes the engine a long while.
    remove_labelled(&label);
}
