//! Per-team instances through the agent's API: the real `berth agent` binary following a local
//! config repo, instances on the real Docker Engine. Measured in one run, each beside the docker
//! CLI doing the same work by hand (what a home-grown spawner script does):
//!
//! - **spawn → endpoint answering**, a fresh instance: from the `POST …/instances` to the 201, and
//!   to the instance's port answering HTTP, median of 10 spawns; beside it `docker run -d -p` of
//!   the same container and the same wait;
//! - **pooled claim**: from the `POST` to the 201 for a challenge with a warm pool, median of 10
//!   claims (the pool refilled between them); the target is ≤ 20 ms;
//! - **300 teams at once**: 300 spawns sent together (`BERTH_BENCH_TEAMS` to change it), all
//!   answered, no host port twice, the time until every instance answers, and the agent's peak
//!   resident memory (`VmHWM`); beside it 300 `docker run -d -p` with 8 at a time.
//!
//! - **on the cluster**, 100 teams at once (`BERTH_BENCH_KUBE_TEAMS`) on a challenge with
//!   `target: kubernetes`: all answered, no NodePort twice, the time until every pod answers on its
//!   NodePort, the agent's peak memory; beside it ONE `kubectl apply` of the same 100 pods and
//!   NodePort Services, and the same wait. The test cluster (`tests/testbed/kube-up.sh`) is started
//!   when it is not up; `BERTH_BENCH_KUBE=0` skips this part, `BERTH_BENCH_DOCKER=0` the rest.
//!
//! Needs Docker and `busybox:latest` (`tests/testbed/busybox-image.sh`), and root and `kubectl`
//! for the cluster. Run: `cargo bench --bench instances`.

#[path = "support/common.rs"]
mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const INSTANCE: &str = "bench-instances";
const TOKEN: &str = "bench-api-token";
const FIRST_PORT: u16 = 23000;
const SERVE: &str =
    "mkdir -p /www; echo \"$FLAG\" > /www/index.html; exec httpd -f -p 8080 -h /www";

fn challenge(name: &str, instanced: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: {name}}}\nspec:\n  image: busybox:latest\n  command: [sh, -c, '{SERVE}']\n  ports: [{{container: 8080}}]\n  instanced:\n{instanced}"
    )
}

fn spawn(port: u16, challenge: &str, team: &str) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {TOKEN}");
    let (code, body) = common::http(
        port,
        "POST",
        &format!("/api/v1/challenges/{challenge}/instances"),
        &[("Authorization", &auth)],
        format!(r#"{{"team": "{team}"}}"#).as_bytes(),
    );
    (code, serde_json::from_str(&body).unwrap_or_default())
}

fn api_get(port: u16, path: &str) -> serde_json::Value {
    let auth = format!("Bearer {TOKEN}");
    let (_, body) = common::http(port, "GET", path, &[("Authorization", &auth)], b"");
    serde_json::from_str(&body).unwrap_or_default()
}

fn endpoint(instance: &serde_json::Value) -> u16 {
    instance["endpoints"][0]["port"].as_u64().unwrap_or(0) as u16
}

/// Waits until the host port answers an HTTP request.
fn until_answers(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n");
            let mut answer = [0u8; 12];
            if stream.read(&mut answer).is_ok_and(|n| n >= 12) && answer.starts_with(b"HTTP/1.") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "port {port} never answered");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `teams` spawns of challenge `fresh` sent together, and every endpoint waited for.
struct Crowd {
    /// How many were created (201).
    created: usize,
    /// Their endpoints' ports, each once.
    ports: BTreeSet<u16>,
    /// Until the API answered them all.
    answered: Duration,
    /// Until every endpoint answered.
    serving: Duration,
}

impl Crowd {
    fn spawn(port: u16, teams: usize) -> Crowd {
        let started = Instant::now();
        let spawned: Vec<(u16, serde_json::Value)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..teams)
                .map(|team| scope.spawn(move || spawn(port, "fresh", &format!("crowd-{team}"))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let answered = started.elapsed();
        for (code, answer) in spawned.iter().filter(|(code, _)| *code != 201).take(3) {
            println!("  refused: {code} {answer}");
        }
        let created: Vec<&serde_json::Value> = spawned
            .iter()
            .filter(|(code, _)| *code == 201)
            .map(|(_, instance)| instance)
            .collect();
        let ports: BTreeSet<u16> = created.iter().map(|i| endpoint(i)).collect();
        for port in &ports {
            until_answers(*port);
        }
        Crowd {
            created: created.len(),
            ports,
            answered,
            serving: started.elapsed(),
        }
    }
}

fn docker(args: &[&str]) -> String {
    let output = Command::new("docker").args(args).output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// What the docker CLI does for one instance by hand: a container of the same image, command and
/// limits, published on `port`.
fn docker_run(name: &str, port: u16) -> Command {
    let mut command = Command::new("docker");
    command
        .args(["run", "-d", "--name", name, "--label"])
        .arg(format!("berth.instance={INSTANCE}-peer"))
        .args(["-p", &format!("{port}:8080"), "-e", "FLAG=flag{peer}"])
        .args(["--memory", "512m", "--pids-limit", "512", "--cpus", "1"])
        .args(["busybox:latest", "sh", "-c", SERVE])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

fn remove_everything() {
    common::remove_instance(INSTANCE);
    common::remove_instance(&format!("{INSTANCE}-peer"));
    let networks = docker(&[
        "network",
        "ls",
        "-q",
        "--filter",
        &format!("label=berth.instance={INSTANCE}"),
    ]);
    for network in networks.split_whitespace() {
        docker(&["network", "rm", network]);
    }
    // Pooled instances' flag volumes, named, outlive their containers' `docker rm -f`.
    let volumes = docker(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("label=berth.instance={INSTANCE}"),
    ]);
    for volume in volumes.split_whitespace() {
        docker(&["volume", "rm", "-f", volume]);
    }
}

fn main() {
    if !common::engine_answers() {
        return;
    }
    if std::env::var("BERTH_BENCH_DOCKER").as_deref() == Ok("0") {
        on_the_cluster();
        return;
    }
    let teams: usize = std::env::var("BERTH_BENCH_TEAMS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300);
    remove_everything();
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("fresh.yaml"),
        challenge(
            "fresh",
            &format!(
                "    ttl: 30m\n    max: {}\n    flag: {{env: FLAG}}\n",
                teams + 20
            ),
        ),
    )
    .unwrap();
    std::fs::write(
        repo.join("warm.yaml"),
        challenge(
            "warm",
            "    ttl: 30m\n    max: 50\n    pool: 3\n    flag: {file: /www/flag.txt}\n",
        ),
    )
    .unwrap();
    common::git(work.path(), &["init", "-q", "-b", "main", "repo"]);
    common::git(&repo, &["add", "-A"]);
    common::git(&repo, &["commit", "-q", "-m", "instanced challenges"]);
    let state = work.path().join("agent");
    std::fs::create_dir_all(&state).unwrap();
    let last_port = FIRST_PORT + 1999;
    let (config, port) = common::agent_config(
        &state,
        INSTANCE,
        repo.to_str().unwrap(),
        ("unused-webhook-secret", TOKEN),
        &format!("instances: {{hostPorts: {FIRST_PORT}-{last_port}, host: 127.0.0.1}}\n"),
    );
    let (_agent, pid) = common::start_agent(&config);
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        || spawn(port, "fresh", "probe").0 != 201
    {
        assert!(Instant::now() < deadline, "the agent never took a spawn");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A fresh instance: to the API's answer, and to the port answering.
    let mut answered = Vec::new();
    let mut serving = Vec::new();
    for team in 0..10 {
        let started = Instant::now();
        let (code, instance) = spawn(port, "fresh", &format!("single-{team}"));
        assert_eq!(code, 201, "{instance}");
        answered.push(started.elapsed().as_secs_f64() * 1000.0);
        until_answers(endpoint(&instance));
        serving.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let mut by_hand = Vec::new();
    for run in 0..10 {
        let host_port = FIRST_PORT + 2000 + run;
        let started = Instant::now();
        assert!(
            docker_run(&format!("{INSTANCE}-peer-single-{run}"), host_port)
                .status()
                .unwrap()
                .success()
        );
        until_answers(host_port);
        by_hand.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    println!("\nspawn of a fresh instance (median of 10)");
    println!(
        "  berth: API answered {:>8.1} ms, endpoint answering {:>8.1} ms",
        common::median(answered),
        common::median(serving.clone())
    );
    println!(
        "  docker run -d -p, endpoint answering        {:>8.1} ms",
        common::median(by_hand)
    );

    // A pooled claim: to the API's answer (the instance is running already).
    let mut claims = Vec::new();
    for team in 0..10 {
        let deadline = Instant::now() + Duration::from_secs(60);
        while api_get(port, "/api/v1/instances?challenge=warm")
            .as_array()
            .is_none_or(|all| all.iter().filter(|i| i["state"] == "pooled").count() < 3)
        {
            assert!(Instant::now() < deadline, "the pool never refilled");
            std::thread::sleep(Duration::from_millis(50));
        }
        let started = Instant::now();
        let (code, instance) = spawn(port, "warm", &format!("claim-{team}"));
        claims.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(code, 201, "{instance}");
    }
    println!("\npooled claim, to the API's answer (median of 10; target <= 20 ms)");
    println!(
        "  berth                                        {:>8.1} ms",
        common::median(claims.clone())
    );
    println!(
        "  slowest of 10                                {:>8.1} ms",
        claims.iter().copied().fold(0.0, f64::max)
    );

    // Many teams at once.
    let crowd = Crowd::spawn(port, teams);
    let (created, ports, all_answered, all_serving) =
        (crowd.created, crowd.ports, crowd.answered, crowd.serving);
    let peak = common::rss_kib(pid, "VmHWM:");
    let now = common::rss_kib(pid, "VmRSS:");
    println!("\n{teams} teams spawning at once");
    println!(
        "  berth: {created} created ({} distinct host ports), all answered by the API {:>6.1} s, all endpoints answering {:>6.1} s",
        ports.len(),
        all_answered.as_secs_f64(),
        all_serving.as_secs_f64()
    );
    println!("  agent peak RSS {} KiB, now {} KiB", peak, now);

    let started = Instant::now();
    let ports: Vec<u16> = (0..teams as u16).map(|n| FIRST_PORT + 2100 + n).collect();
    for chunk in ports.chunks(8) {
        let mut running: Vec<_> = chunk
            .iter()
            .map(|port| {
                docker_run(&format!("{INSTANCE}-peer-{port}"), *port)
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in &mut running {
            child.wait().unwrap();
        }
    }
    for port in &ports {
        until_answers(*port);
    }
    println!(
        "  docker run -d -p, 8 at a time: all endpoints answering {:>6.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(_agent);
    remove_everything();
    if std::env::var("BERTH_BENCH_KUBE").as_deref() != Ok("0") {
        on_the_cluster();
    }
}

const KUBE_INSTANCE: &str = "bench-kube-instances";

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let output = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Deletes the bench's namespaces on the cluster and waits until they are gone.
fn remove_from_cluster(kubeconfig: &std::path::Path) {
    for ns in [
        format!("{KUBE_INSTANCE}-challenges"),
        format!("{KUBE_INSTANCE}-kubectl"),
    ] {
        kubectl(
            kubeconfig,
            &[
                "delete",
                "namespace",
                &ns,
                "--ignore-not-found",
                "--wait=true",
            ],
        );
    }
}

/// 100 teams at once on the cluster, beside one `kubectl apply` of the same pods and Services.
fn on_the_cluster() {
    let teams: usize = std::env::var("BERTH_BENCH_KUBE_TEAMS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let kubeconfig = common::test_cluster();
    remove_from_cluster(&kubeconfig);
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let mut text = challenge(
        "fresh",
        &format!(
            "    ttl: 30m\n    max: {}\n    flag: {{env: FLAG}}\n",
            teams + 5
        ),
    );
    text.push_str("  target: kubernetes\n  healthcheck: {tcp: 8080, interval: 1s}\n");
    std::fs::write(repo.join("fresh.yaml"), text).unwrap();
    common::git(work.path(), &["init", "-q", "-b", "main", "repo"]);
    common::git(&repo, &["add", "-A"]);
    common::git(&repo, &["commit", "-q", "-m", "an instanced challenge"]);
    let state = work.path().join("agent");
    std::fs::create_dir_all(&state).unwrap();
    let (config, port) = common::agent_config(
        &state,
        KUBE_INSTANCE,
        repo.to_str().unwrap(),
        ("unused-webhook-secret", TOKEN),
        &format!(
            "kube: {{kubeconfig: {}, challengeNamespace: {KUBE_INSTANCE}-challenges}}\ninstances: {{host: 127.0.0.1}}\n",
            kubeconfig.display()
        ),
    );
    let (agent, pid) = common::start_agent(&config);
    let deadline = Instant::now() + Duration::from_secs(180);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        || spawn(port, "fresh", "probe").0 != 201
    {
        assert!(Instant::now() < deadline, "the agent never took a spawn");
        std::thread::sleep(Duration::from_millis(500));
    }
    let crowd = Crowd::spawn(port, teams);
    let (created, ports, all_answered, all_serving) =
        (crowd.created, crowd.ports, crowd.answered, crowd.serving);
    let peak = common::rss_kib(pid, "VmHWM:");
    println!("\n{teams} teams spawning at once on the cluster");
    println!(
        "  berth: {created} created ({} distinct NodePorts), all answered by the API {:>6.1} s, all endpoints answering {:>6.1} s",
        ports.len(),
        all_answered.as_secs_f64(),
        all_serving.as_secs_f64()
    );
    println!("  agent peak RSS {peak} KiB");
    drop(agent);
    remove_from_cluster(&kubeconfig);

    // The same pods and NodePort Services by hand, in one apply.
    let ns = format!("{KUBE_INSTANCE}-kubectl");
    let mut manifests = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n");
    for team in 0..teams {
        manifests.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: team-{team}, namespace: {ns}, labels: {{team: t{team}}}}}\nspec:\n  automountServiceAccountToken: false\n  enableServiceLinks: false\n  containers:\n    - name: main\n      image: busybox:latest\n      imagePullPolicy: IfNotPresent\n      command: [sh, -c, '{SERVE}']\n      env: [{{name: FLAG, value: 'flag{{peer}}'}}]\n      readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: team-{team}, namespace: {ns}}}\nspec:\n  type: NodePort\n  selector: {{team: t{team}}}\n  ports: [{{port: 8080, targetPort: 8080}}]\n"
        ));
    }
    let file = work.path().join("by-hand.yaml");
    std::fs::write(&file, manifests).unwrap();
    let started = Instant::now();
    kubectl(&kubeconfig, &["apply", "-f", file.to_str().unwrap()]);
    let ports = kubectl(
        &kubeconfig,
        &[
            "get",
            "services",
            "-n",
            &ns,
            "-o",
            "jsonpath={.items[*].spec.ports[0].nodePort}",
        ],
    );
    for port in ports.split_whitespace() {
        until_answers(port.parse().unwrap());
    }
    println!(
        "  one kubectl apply of {teams} pods and NodePort Services: all endpoints answering {:>6.1} s",
        started.elapsed().as_secs_f64()
    );
    remove_from_cluster(&kubeconfig);
}
