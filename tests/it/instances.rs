//! Per-team instances on the real Docker Engine and the test cluster, driven the way a CTF
//! platform's backend drives them: the agent's API with its token, teams spawning, renewing and
//! killing, flags checked, the agent killed with `kill -9` and started again, and specs changed
//! under live instances.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::support::agent::{API_TOKEN, Agent, applied};
use crate::support::engine::{Instance, docker, engine, write_refused};
use crate::support::gitserver::{GitDaemon, Origin};
use crate::support::net::http_with_head;
use crate::support::util::eventually;

/// A range of host ports of its own for each test's agent, below the kernel's outgoing ports.
fn host_ports() -> (u16, u16) {
    static NEXT: AtomicU16 = AtomicU16::new(21000);
    let first = NEXT.fetch_add(100, Ordering::SeqCst);
    (first, first + 99)
}

/// An agent following `origin`, its instances on a range of their own, published on 127.0.0.1.
fn agent(instance: &Instance, daemon: &GitDaemon) -> Agent {
    let (first, last) = host_ports();
    Agent::start(
        instance,
        &daemon.url(),
        &format!("prune: true\ninstances: {{hostPorts: {first}-{last}, host: 127.0.0.1}}\n"),
    )
}

/// [`agent`] following `origin`, served by the git daemon returned with it, once its first pass
/// is applied.
fn docker_agent(instance: &Instance, origin: &Origin) -> (GitDaemon, Agent) {
    let revision = origin.bare_git(&["rev-parse", "main"]);
    let daemon = GitDaemon::start(origin);
    let agent = agent(instance, &daemon);
    agent.wait_for("the first pass", || applied(origin, &revision));
    (daemon, agent)
}

/// An instanced challenge: busybox's httpd serving `/` (the flag from `$FLAG` as its index, or
/// the file system root when the flag is a file).
fn instanced(name: &str, instanced: &str, extra: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: {name}}}\nspec:\n  image: busybox:latest\n  command: [sh, -c, 'mkdir -p /www 2>/dev/null; echo \"$FLAG\" > /www/index.html 2>/dev/null; exec httpd -f -p 8080 -h /']\n  ports: [{{container: 8080}}]\n  healthcheck: {{tcp: 8080, interval: 1s}}\n  instanced:\n{instanced}{extra}"
    )
}

/// One API call with the token: the status code, the `Retry-After` header, and the JSON body.
fn call(agent: &Agent, method: &str, path: &str, body: &str) -> (u16, Option<String>, Value) {
    let bearer = format!("Bearer {API_TOKEN}");
    let (code, head, body) = http_with_head(
        agent.port,
        method,
        path,
        &[("Authorization", &bearer)],
        body.as_bytes(),
    );
    let retry_after = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("retry-after")
            .then(|| value.trim().to_string())
    });
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    (code, retry_after, json)
}

fn spawn(agent: &Agent, challenge: &str, team: &str) -> (u16, Value) {
    let (code, _, json) = call(
        agent,
        "POST",
        &format!("/api/v1/challenges/{challenge}/instances"),
        &format!(r#"{{"team": "{team}"}}"#),
    );
    (code, json)
}

fn port_of(instance: &Value) -> u16 {
    instance["endpoints"][0]["port"]
        .as_u64()
        .unwrap_or_else(|| panic!("no endpoint: {instance}")) as u16
}

/// `GET path` on a host port, as a team connects: the body, or `None` when nothing answers
/// within 3 s. A NodePort the cluster's proxy has not yet routed is held by a socket that takes
/// the connection and never answers, so the read has a deadline.
fn fetch(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(3)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n")?;
    (crate::support::net::status_code(head) == 200).then(|| body.trim().to_string())
}

fn fetched_eventually(port: u16, path: &str) -> String {
    let mut answer = None;
    eventually(
        &format!("port {port} answers {path}"),
        Duration::from_secs(20),
        || {
            answer = fetch(port, path);
            answer.is_some()
        },
    );
    answer.unwrap()
}

/// The instance containers running for `challenge`, by name.
fn containers(instance: &Instance, challenge: &str) -> BTreeSet<String> {
    docker(&[
        "ps",
        "--format",
        "{{.Names}}",
        "--filter",
        &format!("label=berth.instance={}", instance.name),
        "--filter",
        &format!("label=berth.name={challenge}"),
        "--filter",
        "label=berth.slot=instance",
    ])
    .lines()
    .map(str::to_string)
    .collect()
}

fn container_of(instance: &Instance, id: &str) -> String {
    docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=berth.instance={}", instance.name),
        "--filter",
        &format!("label=berth.team-instance={id}"),
    ])
}

fn check_flag(agent: &Agent, challenge: &str, team: &str, flag: &str) -> Value {
    let (code, _, json) = call(
        agent,
        "POST",
        &format!("/api/v1/challenges/{challenge}/flags/check"),
        &serde_json::json!({ "team": team, "flag": flag }).to_string(),
    );
    assert_eq!(code, 200, "{json}");
    json
}

#[test]
fn two_teams_get_their_own_ports_and_flags_reach_only_their_own_and_are_held_to_the_limits() {
    let Some(instance) = engine() else { return };
    let origin = Origin::new(&[
        (
            "heap.yaml",
            &instanced(
                "heap",
                "    ttl: 5m\n    maxLifetime: 6m\n    max: 2\n    flag: {env: FLAG, format: \"flag{heap_%s}\"}\n",
                "",
            ),
        ),
        (
            "plain.yaml",
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: plain}\nspec:\n  image: busybox:latest\n  command: [sleep, \"600\"]\n",
        ),
    ]);
    let (_daemon, agent) = docker_agent(&instance, &origin);

    let (code, red) = spawn(&agent, "heap", "red team");
    assert_eq!(code, 201, "{red}");
    let (code, blue) = spawn(&agent, "heap", "blue");
    assert_eq!(code, 201, "{blue}");
    assert_eq!(red["team"], "red team");
    assert_eq!(red["state"], "live");
    assert_ne!(port_of(&red), port_of(&blue), "two instances on one port");
    assert_eq!(red["endpoints"][0]["host"], "127.0.0.1");
    assert_eq!(red["endpoints"][0]["protocol"], "tcp");

    // Each answers on its own port with its own team's flag.
    let red_flag = fetched_eventually(port_of(&red), "/www/index.html");
    let blue_flag = fetched_eventually(port_of(&blue), "/www/index.html");
    assert!(red_flag.starts_with("flag{heap_"), "{red_flag}");
    assert_ne!(red_flag, blue_flag);

    // A shell in red's instance reaches nothing of blue's, on any address.
    let red_container = container_of(&instance, red["id"].as_str().unwrap());
    let blue_container = container_of(&instance, blue["id"].as_str().unwrap());
    let blue_address = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &blue_container,
    ]);
    let reach = docker(&[
        "exec",
        &red_container,
        "sh",
        "-c",
        &format!(
            "printf 'GET /www/index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {blue_address} 8080; echo rc=$?"
        ),
    ]);
    assert!(
        !reach.contains(&blue_flag) && reach.contains("rc=1"),
        "red reached blue's instance: {reach}"
    );

    // Flags: the team's own is correct; another team's is caught as shared, and says whose.
    assert_eq!(
        check_flag(&agent, "heap", "red team", &red_flag),
        serde_json::json!({ "correct": true })
    );
    assert_eq!(
        check_flag(&agent, "heap", "blue", &red_flag),
        serde_json::json!({ "correct": false, "sharedFrom": "red team" })
    );
    assert_eq!(
        check_flag(&agent, "heap", "blue", "flag{heap_guess}"),
        serde_json::json!({ "correct": false })
    );

    // Limits: one live instance per team (409, with the one it has), two for the challenge
    // (503 with Retry-After), and 404 for what is not instanced.
    let (code, again) = spawn(&agent, "heap", "red team");
    assert_eq!(code, 409, "{again}");
    assert_eq!(again["instances"][0]["id"], red["id"]);
    let (code, retry_after, full) = call(
        &agent,
        "POST",
        "/api/v1/challenges/heap/instances",
        r#"{"team": "green"}"#,
    );
    assert_eq!(code, 503, "{full}");
    assert!(retry_after.is_some_and(|s| s.parse::<u64>().is_ok()));
    for challenge in ["plain", "nothing"] {
        let (code, answer) = spawn(&agent, challenge, "red team");
        assert_eq!(code, 404, "{challenge}: {answer}");
    }
    // A platform that numbers its teams sends a number: it is that team.
    let (code, _, numbered) = call(
        &agent,
        "POST",
        "/api/v1/challenges/heap/instances",
        r#"{"team": 17}"#,
    );
    assert_eq!(code, 503, "{numbered}");
    assert_eq!(
        check_flag(&agent, "heap", "17", &red_flag),
        serde_json::json!({ "correct": false, "sharedFrom": "red team" })
    );
    let (code, bad) = spawn(&agent, "heap", "line\nbreak");
    assert_eq!(code, 400, "{bad}");
    let (code, _, bad) = call(&agent, "POST", "/api/v1/challenges/heap/instances", "{}");
    assert_eq!(code, 400, "{bad}");

    // Without the token, nothing.
    let (code, _) = agent.request(
        "POST",
        "/api/v1/challenges/heap/instances",
        &[],
        br#"{"team": "x"}"#,
    );
    assert_eq!(code, 401);

    // Renewal moves the expiry on, never past renewableUntil.
    let id = red["id"].as_str().unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let (code, _, renewed) = call(&agent, "POST", &format!("/api/v1/instances/{id}/renew"), "");
    assert_eq!(code, 200, "{renewed}");
    let expiry = |v: &Value, field: &str| {
        chrono::DateTime::parse_from_rfc3339(v[field].as_str().unwrap()).unwrap()
    };
    assert!(expiry(&renewed, "expiresAt") > expiry(&red, "expiresAt"));
    assert!(expiry(&renewed, "expiresAt") <= expiry(&renewed, "renewableUntil"));

    // Lists by team and challenge; one by id.
    let (code, _, listed) = call(&agent, "GET", "/api/v1/instances?team=blue", "");
    assert_eq!(code, 200);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], blue["id"]);
    let (code, _, one) = call(&agent, "GET", &format!("/api/v1/instances/{id}"), "");
    assert_eq!((code, &one["team"]), (200, &Value::from("red team")));

    // A kill removes it at once, and frees the team's place.
    let (code, _, _) = call(&agent, "DELETE", &format!("/api/v1/instances/{id}"), "");
    assert_eq!(code, 204);
    assert!(
        container_of(&instance, id).is_empty(),
        "its container stays"
    );
    let (code, _, _) = call(&agent, "GET", &format!("/api/v1/instances/{id}"), "");
    assert_eq!(code, 404);
    let (code, again) = spawn(&agent, "heap", "red team");
    assert_eq!(code, 201, "{again}");
    // The same team gets the same flag in a new instance.
    assert_eq!(
        fetched_eventually(port_of(&again), "/www/index.html"),
        red_flag
    );

    // Status counts them as of the last pass, and never names a team.
    agent.reconcile();
    let mut committed = String::new();
    eventually(
        "status counts the instances",
        Duration::from_secs(20),
        || {
            committed = origin
                .show("berth-status:status/challenge/heap.yaml")
                .unwrap_or_default();
            committed.contains("instances:\n  live: 2\n  pooled: 0")
        },
    );
    assert!(!committed.contains("red team") && !committed.contains(&red_flag));

    // Neither status nor metrics name a team or hold a flag.
    let (_, status) = agent.api("GET", "/api/v1/status");
    let (_, metrics) = agent.api("GET", "/metrics");
    for said in [&status, &metrics] {
        assert!(!said.contains("red team") && !said.contains("blue\""));
        assert!(!said.contains(&red_flag) && !said.contains(&blue_flag));
    }
    assert!(
        metrics.contains("berth_instance_spawns_total{challenge=\"heap\",result=\"created\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("berth_instance_spawns_total{challenge=\"heap\",result=\"team_limit\"} 1")
    );

    // The command line: a list, a refusal with the agent's reason, and a kill.
    let berth = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("instances")
            .args(args)
            .arg("--agent")
            .arg(format!("http://127.0.0.1:{}", agent.port))
            .arg("--token-file")
            .arg(agent.dir.path().join("api-token"))
            .output()
            .unwrap()
    };
    let listed = berth(&["heap"]);
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{table}");
    assert!(
        table.contains("red team") && table.contains("blue"),
        "{table}"
    );
    assert!(
        table.contains(&format!("127.0.0.1:{}/tcp", port_of(&blue))),
        "{table}"
    );
    let refused = berth(&["spawn", "heap", "--team", "green"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("503"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let killed = berth(&["kill", blue["id"].as_str().unwrap()]);
    assert!(killed.status.success(), "{killed:?}");
    let spawned = berth(&["spawn", "heap", "--team", "green"]);
    assert!(spawned.status.success(), "{spawned:?}");
    assert!(String::from_utf8_lossy(&spawned.stdout).contains("green"));
}

#[test]
fn instances_go_on_time_and_a_pooled_one_is_claimed_with_its_teams_flag_and_refilled() {
    let Some(instance) = engine() else { return };
    let origin = Origin::new(&[
        (
            "short.yaml",
            &instanced("short", "    ttl: 3s\n    flag: {env: FLAG}\n", ""),
        ),
        (
            "warm.yaml",
            &instanced(
                "warm",
                "    ttl: 5m\n    pool: 1\n    flag: {file: /flag.txt, format: \"CTF{%s}\"}\n",
                "  security: {user: \"1000:1000\"}\n",
            ),
        ),
    ]);
    let (_daemon, agent) = docker_agent(&instance, &origin);

    // Reaped within 10 s of its expiry: here within the reaper's second.
    let (code, short) = spawn(&agent, "short", "t1");
    assert_eq!(code, 201, "{short}");
    let id = short["id"].as_str().unwrap().to_string();
    let expires = chrono::DateTime::parse_from_rfc3339(short["expiresAt"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    eventually("the instance is reaped", Duration::from_secs(20), || {
        container_of(&instance, &id).is_empty()
    });
    let late = chrono::Utc::now() - expires;
    assert!(
        late < chrono::Duration::seconds(10),
        "reaped {late} after its expiry"
    );
    let (code, _, _) = call(&agent, "GET", &format!("/api/v1/instances/{id}"), "");
    assert_eq!(code, 404);

    // The pool holds one started instance with no flag yet.
    eventually("the pool is filled", Duration::from_secs(30), || {
        containers(&instance, "warm").len() == 1
    });
    let (_, _, listed) = call(&agent, "GET", "/api/v1/instances?challenge=warm", "");
    assert_eq!(listed[0]["state"], "pooled", "{listed}");
    assert!(listed[0]["team"].is_null());
    let pooled_port = port_of(&listed[0]);
    assert_eq!(
        fetch(pooled_port, "/flag.txt"),
        None,
        "a pooled instance has a flag"
    );

    // A claim takes it, and its team's flag is there, readable by the challenge's user only
    // through its group, and not writable by it.
    let (code, claimed) = spawn(&agent, "warm", "t1");
    assert_eq!(code, 201, "{claimed}");
    assert_eq!(claimed["id"], listed[0]["id"]);
    assert_eq!(port_of(&claimed), pooled_port);
    let flag = fetched_eventually(pooled_port, "/flag.txt");
    assert!(flag.starts_with("CTF{") && flag.len() == 37, "{flag}");
    assert_eq!(check_flag(&agent, "warm", "t1", &flag)["correct"], true);
    let container = container_of(&instance, claimed["id"].as_str().unwrap());
    let mode = docker(&[
        "exec",
        &container,
        "stat",
        "-L",
        "-c",
        "%a %u %g",
        "/flag.txt",
    ]);
    assert_eq!(mode, "440 0 1000");
    // It is not in the container's own layer: a link into a memory-backed volume of its own,
    // mounted read-only.
    assert_eq!(
        docker(&["exec", &container, "readlink", "/flag.txt"]),
        "/run/berth-flag/flag"
    );
    assert!(write_refused(&container, "/flag.txt"));

    // A restart of its container empties that volume; the flag is written again.
    docker(&["restart", "-t", "1", &container]);
    assert_eq!(fetched_eventually(pooled_port, "/flag.txt"), flag);

    // And the pool is refilled behind it.
    eventually("the pool is refilled", Duration::from_secs(30), || {
        containers(&instance, "warm").len() == 2
    });
    let (_, metrics) = agent.api("GET", "/metrics");
    assert!(
        metrics.contains("berth_instance_spawns_total{challenge=\"warm\",result=\"claimed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("berth_instance_kills_total{challenge=\"short\",result=\"expired\"} 1")
    );
}

#[test]
fn kill_9_with_20_live_instances_keeps_them_all_respawns_a_lost_one_and_reaps_them_on_time() {
    let Some(instance) = engine() else { return };
    // A ttl long enough that a loaded machine spawns all 20 and restarts the agent before any
    // expires, short enough to watch them go.
    let origin = Origin::new(&[(
        "many.yaml",
        &instanced(
            "many",
            "    ttl: 90s\n    max: 30\n    flag: {env: FLAG}\n",
            "",
        ),
    )]);
    let revision = origin.bare_git(&["rev-parse", "main"]);
    let daemon = GitDaemon::start(&origin);
    let mut agent = agent(&instance, &daemon);
    agent.wait_for("the first pass", || applied(&origin, &revision));
    let spawned: Vec<Value> = (0..20)
        .map(|team| {
            let (code, json) = spawn(&agent, "many", &format!("team-{team}"));
            assert_eq!(code, 201, "{json}");
            json
        })
        .collect();
    let ports: BTreeSet<u16> = spawned.iter().map(port_of).collect();
    assert_eq!(ports.len(), 20, "ports shared");
    let before = containers(&instance, "many");
    assert_eq!(before.len(), 20);

    agent.kill9();
    // While the agent is down: one instance's container is removed by hand, and a container
    // that looks like an instance but has no record appears.
    let lost = spawned[3]["id"].as_str().unwrap();
    docker(&["rm", "-f", &container_of(&instance, lost)]);
    let halted = spawned[5]["id"].as_str().unwrap();
    docker(&["stop", "-t", "1", &container_of(&instance, halted)]);
    docker(&[
        "run",
        "-d",
        "--name",
        &format!("berth-{}-many-stray", instance.name),
        "--label",
        &format!("berth.instance={}", instance.name),
        "--label",
        "berth.kind=Challenge",
        "--label",
        "berth.name=many",
        "--label",
        "berth.slot=instance",
        "--label",
        "berth.team-instance=0000000000000000",
        "--label",
        "berth.spec-hash=0",
        "busybox:latest",
        "sleep",
        "600",
    ]);
    agent.spawn();

    eventually(
        "the stray is removed and the lost one respawned",
        Duration::from_secs(30),
        || containers(&instance, "many").len() == 20 && !container_of(&instance, lost).is_empty(),
    );
    let (_, _, listed) = call(&agent, "GET", "/api/v1/instances?challenge=many", "");
    let ids: BTreeSet<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    let spawned_ids: BTreeSet<&str> = spawned.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids, spawned_ids,
        "instances lost or made up across the restart"
    );
    // The respawned one is back on its port, with its team's flag.
    let lost_port = port_of(&spawned[3]);
    let flag = fetched_eventually(lost_port, "/www/index.html");
    assert_eq!(check_flag(&agent, "many", "team-3", &flag)["correct"], true);
    assert!(agent.log().contains("respawning it"), "{}", agent.log());
    // The one stopped by hand runs again, on its port.
    fetched_eventually(port_of(&spawned[5]), "/www/index.html");

    // Each goes within 10 s of its expiry.
    let last_expiry = spawned
        .iter()
        .map(|i| {
            chrono::DateTime::parse_from_rfc3339(i["expiresAt"].as_str().unwrap())
                .unwrap()
                .with_timezone(&chrono::Utc)
        })
        .max()
        .unwrap();
    let wait = (last_expiry - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    eventually("all are reaped", wait + Duration::from_secs(10), || {
        containers(&instance, "many").is_empty()
    });
}

#[test]
fn a_changed_spec_keeps_or_replaces_live_instances_and_removing_it_removes_them() {
    let Some(instance) = engine() else { return };
    let keep = |mode: &str| {
        instanced(
            "keeper",
            &format!("    ttl: 5m\n    flag: {{env: FLAG, format: \"{mode}{{%s}}\"}}\n"),
            &format!("  env: {{MODE: {mode}}}\n"),
        )
    };
    let replace = |mode: &str| {
        instanced(
            "roller",
            "    ttl: 5m\n    onUpdate: replace\n    flag: {env: FLAG}\n",
            &format!("  env: {{MODE: {mode}}}\n"),
        )
    };
    let origin = Origin::new(&[
        ("keeper.yaml", &keep("one")),
        ("roller.yaml", &replace("one")),
    ]);
    let (_daemon, agent) = docker_agent(&instance, &origin);
    let (_, kept) = spawn(&agent, "keeper", "t1");
    let (_, rolled) = spawn(&agent, "roller", "t1");
    let rolled_flag = fetched_eventually(port_of(&rolled), "/www/index.html");
    let kept_container = container_of(&instance, kept["id"].as_str().unwrap());
    let rolled_container = container_of(&instance, rolled["id"].as_str().unwrap());

    let changed = origin.commit(
        &[
            ("keeper.yaml", Some(&keep("two"))),
            ("roller.yaml", Some(&replace("two"))),
        ],
        "a new version of both",
    );
    agent.reconcile();
    agent.wait_for("the change applied", || applied(&origin, &changed));

    // keep: the live one runs on as it was; a new spawn gets the new version.
    assert_eq!(
        container_of(&instance, kept["id"].as_str().unwrap()),
        kept_container
    );
    let (_, newer) = spawn(&agent, "keeper", "t2");
    assert_ne!(newer["version"], kept["version"]);
    // Its flags changed format; the old instance's flag, in the old one, is still its team's.
    let old_flag = fetched_eventually(port_of(&kept), "/www/index.html");
    assert!(old_flag.starts_with("one{"), "{old_flag}");
    assert_eq!(
        check_flag(&agent, "keeper", "t1", &old_flag)["correct"],
        true
    );
    let new_flag = fetched_eventually(port_of(&newer), "/www/index.html");
    assert!(new_flag.starts_with("two{"), "{new_flag}");
    // replace: the live one is replaced by the new version, on its port, with its flag.
    eventually(
        "the live instance is replaced",
        Duration::from_secs(30),
        || {
            let now = container_of(&instance, rolled["id"].as_str().unwrap());
            !now.is_empty() && now != rolled_container
        },
    );
    let (_, _, now) = call(
        &agent,
        "GET",
        &format!("/api/v1/instances/{}", rolled["id"].as_str().unwrap()),
        "",
    );
    assert_ne!(now["version"], rolled["version"]);
    assert_eq!(now["expiresAt"], rolled["expiresAt"]);
    assert_eq!(
        fetched_eventually(port_of(&rolled), "/www/index.html"),
        rolled_flag
    );
    let mode = docker(&[
        "exec",
        &container_of(&instance, rolled["id"].as_str().unwrap()),
        "sh",
        "-c",
        "echo $MODE",
    ]);
    assert_eq!(mode, "two");

    // Removed from the repo (prune on): its instances go, records too.
    let removed = origin.commit(&[("keeper.yaml", None)], "keeper is retired");
    agent.reconcile();
    agent.wait_for("the removal applied", || applied(&origin, &removed));
    eventually(
        "keeper's instances are gone",
        Duration::from_secs(20),
        || {
            containers(&instance, "keeper").is_empty()
                && call(&agent, "GET", "/api/v1/instances?challenge=keeper", "").2
                    == serde_json::json!([])
        },
    );
    assert_eq!(containers(&instance, "roller").len(), 1);
    let (code, _) = spawn(&agent, "keeper", "t3");
    assert_eq!(code, 404);
}

#[test]
fn a_stopped_instanced_challenge_takes_no_spawns_and_its_instances_go() {
    let Some(instance) = engine() else { return };
    let running = instanced("gate", "    ttl: 5m\n", "");
    let origin = Origin::new(&[("gate.yaml", &running)]);
    let (_daemon, agent) = docker_agent(&instance, &origin);
    let (code, live) = spawn(&agent, "gate", "t1");
    assert_eq!(code, 201, "{live}");
    let stopped = origin.commit(
        &[(
            "gate.yaml",
            Some(&running.replace("spec:\n", "spec:\n  state: stopped\n")),
        )],
        "gate closes",
    );
    agent.reconcile();
    agent.wait_for("the stop applied", || applied(&origin, &stopped));
    let (code, refused) = spawn(&agent, "gate", "t2");
    assert_eq!(code, 409, "{refused}");
    assert!(containers(&instance, "gate").is_empty());
    let status = origin
        .show("berth-status:status/challenge/gate.yaml")
        .unwrap();
    assert!(status.contains("phase: Stopped"), "{status}");
    eventually("its records go", Duration::from_secs(10), || {
        call(&agent, "GET", "/api/v1/instances?challenge=gate", "").2 == serde_json::json!([])
    });
}

#[test]
fn a_version_whose_image_fails_takes_no_spawns_and_the_one_before_goes_on_serving() {
    let Some(instance) = engine() else { return };
    let built = |run: &str| {
        format!(
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: forge}}\nspec:\n  build: {{context: forge}}\n  ports: [{{container: 8080}}]\n  instanced: {{ttl: 5m, flag: {{env: FLAG}}}}\n  env: {{RUN: \"{run}\"}}\n"
        )
    };
    let origin = Origin::new(&[
        ("forge.yaml", &built("one")),
        (
            "forge/Dockerfile",
            "FROM busybox:latest\nRUN false\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\"]\n",
        ),
    ]);
    let revision = origin.bare_git(&["rev-parse", "main"]);
    let daemon = GitDaemon::start(&origin);
    let agent = agent(&instance, &daemon);
    agent.wait_for("the first pass", || {
        applied(&origin, &revision)
            || origin
                .show("berth-status:status/challenge/forge.yaml")
                .is_some()
    });
    // Its image does not build: no spawn, and status says why.
    eventually("status shows the failure", Duration::from_secs(60), || {
        origin
            .show("berth-status:status/challenge/forge.yaml")
            .is_some_and(|s| s.contains("phase: Failure"))
    });
    let (code, refused) = spawn(&agent, "forge", "t1");
    assert_eq!(code, 503, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("not ready"),
        "{refused}"
    );

    // Fixed: it serves.
    let fixed = origin.commit(
        &[(
            "forge/Dockerfile",
            Some("FROM busybox:latest\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\"]\n"),
        )],
        "the build works",
    );
    agent.reconcile();
    agent.wait_for("the fix applied", || applied(&origin, &fixed));
    let (code, live) = spawn(&agent, "forge", "t1");
    assert_eq!(code, 201, "{live}");

    // Broken again: the plan's failure is shown, and spawns get the version that works.
    let broken = origin.commit(
        &[(
            "forge/Dockerfile",
            Some("FROM busybox:latest\nRUN exit 3\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\"]\n"),
        )],
        "a build that fails",
    );
    agent.reconcile();
    eventually(
        "status shows the new failure",
        Duration::from_secs(60),
        || {
            origin
                .show("berth-status:status/challenge/forge.yaml")
                .is_some_and(|s| s.contains("phase: Failure"))
                && origin
                    .show("berth-status:status/agent.yaml")
                    .is_some_and(|s| s.contains(&format!("lastAttemptedRevision: {broken}")))
        },
    );
    let (code, second) = spawn(&agent, "forge", "t2");
    assert_eq!(code, 201, "{second}");
    assert_eq!(second["version"], live["version"]);
}

#[test]
fn an_instance_with_a_sidecar_gets_its_own_and_reaches_no_other_teams() {
    let Some(instance) = engine() else { return };
    let challenge = "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: shop}\nspec:\n  image: busybox:latest\n  command: [sh, -c, 'mkdir -p /www; until printf \"GET /token HTTP/1.0\\r\\n\\r\\n\" | nc db 9000 > /www/db.txt && grep -q token /www/db.txt; do sleep 0.2; done; exec httpd -f -p 8080 -h /']\n  ports: [{container: 8080}]\n  instanced: {ttl: 5m}\n  sidecars:\n    - name: db\n      image: busybox:latest\n      command: [sh, -c, 'mkdir -p /srv; echo token-$HOSTNAME > /srv/token; exec httpd -f -p 9000 -h /srv']\n";
    let origin = Origin::new(&[("shop.yaml", challenge)]);
    let (_daemon, agent) = docker_agent(&instance, &origin);
    let (code, first) = spawn(&agent, "shop", "t1");
    assert_eq!(code, 201, "{first}");
    let (code, second) = spawn(&agent, "shop", "t2");
    assert_eq!(code, 201, "{second}");

    // Each main container reached its own database by name.
    let first_token = fetched_eventually(port_of(&first), "/www/db.txt");
    let second_token = fetched_eventually(port_of(&second), "/www/db.txt");
    assert!(first_token.contains("token-"), "{first_token}");
    assert_ne!(first_token, second_token, "two instances share a database");

    // Team 1's main container reaches no container of team 2's, its database included.
    let second_db = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=berth.instance={}", instance.name),
        "--filter",
        &format!(
            "label=berth.team-instance={}",
            second["id"].as_str().unwrap()
        ),
        "--filter",
        "label=berth.slot=instance-sidecar",
    ]);
    let address = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &second_db,
    ]);
    let first_main = container_of(&instance, first["id"].as_str().unwrap());
    let first_main = first_main.lines().find(|id| {
        docker(&[
            "inspect",
            "-f",
            "{{index .Config.Labels \"berth.slot\"}}",
            id,
        ]) == "instance"
    });
    let reach = docker(&[
        "exec",
        first_main.unwrap(),
        "sh",
        "-c",
        &format!("printf 'GET /token HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {address} 9000; echo rc=$?"),
    ]);
    assert!(
        reach.contains("rc=1") && !reach.contains("token-"),
        "{reach}"
    );

    // A kill takes the database and the instance's network along.
    let id = first["id"].as_str().unwrap();
    let (code, _, _) = call(&agent, "DELETE", &format!("/api/v1/instances/{id}"), "");
    assert_eq!(code, 204);
    assert!(container_of(&instance, id).is_empty(), "its sidecar stays");
    let networks = instance.network_names();
    assert!(!networks.contains(id), "its network stays: {networks}");
}

/// An agent following `origin` (served by the git daemon returned with it) that runs challenges
/// and their instances on the test cluster, once its first pass is applied.
fn kube_agent(cluster: &crate::support::cluster::Cluster, origin: &Origin) -> (GitDaemon, Agent) {
    let revision = origin.bare_git(&["rev-parse", "main"]);
    let daemon = GitDaemon::start(origin);
    let agent = Agent::start(
        &cluster.instance,
        &daemon.url(),
        &format!(
            "prune: true\nkube: {{kubeconfig: {}, challengeNamespace: {}}}\ninstances: {{host: 127.0.0.1}}\n",
            cluster.kubeconfig.display(),
            cluster.challenges()
        ),
    );
    agent.wait_for("the first pass", || applied(origin, &revision));
    (daemon, agent)
}

/// `kubectl get KIND -l SELECTOR -o jsonpath=…` in the test's challenge namespace, trimmed.
fn labelled(
    cluster: &crate::support::cluster::Cluster,
    kind: &str,
    selector: &str,
    jsonpath: &str,
) -> String {
    let output = cluster.kubectl(&[
        "get",
        "-n",
        &cluster.challenges(),
        kind,
        "-l",
        selector,
        "-o",
        &format!("jsonpath={jsonpath}"),
    ]);
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The pods of `challenge`'s instances on the cluster, by name, but those on their way out.
fn pods(cluster: &crate::support::cluster::Cluster, challenge: &str) -> BTreeSet<String> {
    let selector = format!(
        "berth.instance={},berth.name={challenge},berth.team-instance",
        cluster.instance.name
    );
    let names = labelled(
        cluster,
        "pods",
        &selector,
        "{range .items[*]}{.metadata.deletionTimestamp}|{.metadata.name} {end}",
    );
    names
        .split_whitespace()
        .filter_map(|pod| pod.strip_prefix('|'))
        .map(str::to_string)
        .collect()
}

/// On the cluster each team's instance is a pod of its own behind a NodePort of its own, with
/// its team's flag; the challenge's NetworkPolicy selects every one of them (the test cluster has
/// no network plugin that enforces it: that it keeps teams apart is the plugin's part, and the
/// policy's shape is checked by the unit tests). Limits, renewals, a pool without flags, a
/// replacement on the same port, kills, expiry and removal work as on Docker.
#[test]
fn on_kubernetes_each_team_gets_a_pod_behind_a_node_port_of_its_own_replaced_on_its_port_and_removed()
 {
    let Some(cluster) = crate::support::cluster::cluster() else {
        return;
    };
    let ns = cluster.challenges();
    let heap = |mode: &str| {
        instanced(
            "heap",
            "    ttl: 5m\n    onUpdate: replace\n    flag: {env: FLAG, format: \"k8s{%s}\"}\n",
            &format!("  target: kubernetes\n  env: {{MODE: {mode}}}\n"),
        )
    };
    let origin = Origin::new(&[
        ("heap.yaml", &heap("one")),
        (
            "warm.yaml",
            &instanced(
                "warm",
                "    ttl: 5m\n    pool: 1\n",
                "  target: kubernetes\n",
            ),
        ),
        (
            "short.yaml",
            &instanced(
                "short",
                "    ttl: 3s\n    flag: {env: FLAG}\n",
                "  target: kubernetes\n",
            ),
        ),
    ]);
    let (_daemon, agent) = kube_agent(&cluster, &origin);
    // The pass made the walls and no workload of its own.
    assert_eq!(
        cluster.get(
            &ns,
            "networkpolicy/heap",
            "{.spec.podSelector.matchLabels.berth\\.name}"
        ),
        "heap"
    );
    assert!(
        cluster
            .get(&ns, "deployment/heap", "{.metadata.name}")
            .is_empty()
    );

    // Two teams: a pod and a NodePort each, each answering with its own team's flag.
    let (code, first) = spawn(&agent, "heap", "t1");
    assert_eq!(code, 201, "{first}");
    let (code, second) = spawn(&agent, "heap", "t2");
    assert_eq!(code, 201, "{second}");
    let (one, two) = (port_of(&first), port_of(&second));
    assert_ne!(one, two);
    assert!((30000..=32767).contains(&one), "{first}");
    let flag_one = fetched_eventually(one, "/www/index.html");
    let flag_two = fetched_eventually(two, "/www/index.html");
    assert!(
        flag_one.starts_with("k8s{") && flag_one != flag_two,
        "{flag_one} {flag_two}"
    );
    assert_eq!(check_flag(&agent, "heap", "t1", &flag_one)["correct"], true);
    let shared = check_flag(&agent, "heap", "t1", &flag_two);
    assert_eq!(shared["sharedFrom"], "t2", "{shared}");
    let id = first["id"].as_str().unwrap();
    let pod = labelled(
        &cluster,
        "pods",
        &format!("berth.team-instance={id}"),
        "{.items[0].metadata.name}",
    );
    assert!(pod.starts_with(&format!("inst-heap-{id}-")), "{pod}");
    assert_eq!(pods(&cluster, "heap").len(), 2);
    // The team's name is the store's alone, never the cluster's.
    let everything = String::from_utf8_lossy(
        &cluster
            .kubectl(&[
                "get",
                "-n",
                &ns,
                "pods,services,networkpolicies",
                "-o",
                "yaml",
            ])
            .stdout,
    )
    .to_string();
    assert!(
        !everything.contains("t1\n") && !everything.contains(": t1"),
        "a team's name is on the cluster"
    );
    // Nor is a flag in a pod's spec: it comes from the instance's own Secret.
    assert!(!everything.contains(&flag_one), "a flag is in a pod's spec");
    // Each instance has its own policy besides the challenge's, and its pod is no Challenge's:
    // a shared Service or another challenge's allowConnectTo never selects it.
    assert_eq!(
        cluster.get(
            &ns,
            &format!("networkpolicy/inst-heap-{id}"),
            "{.spec.podSelector.matchLabels.berth\\.team-instance}"
        ),
        id
    );
    assert_eq!(
        cluster.get(
            &ns,
            &format!("pod/{pod}"),
            "{.metadata.labels.berth\\.kind}"
        ),
        "ChallengeInstance"
    );

    // Limits and renewals as on Docker.
    let (code, _) = spawn(&agent, "heap", "t1");
    assert_eq!(code, 409);
    let (code, _, renewed) = call(&agent, "POST", &format!("/api/v1/instances/{id}/renew"), "");
    assert_eq!(code, 200, "{renewed}");
    assert!(renewed["expiresAt"].as_str() >= first["expiresAt"].as_str());

    // The pool holds a started pod, claimed at once with its NodePort.
    let mut pooled = Value::Null;
    eventually("the pool is filled", Duration::from_secs(60), || {
        pooled = call(&agent, "GET", "/api/v1/instances?challenge=warm", "").2;
        pooled[0]["state"] == "pooled"
    });
    let (code, claimed) = spawn(&agent, "warm", "t1");
    assert_eq!(code, 201, "{claimed}");
    assert_eq!(claimed["id"], pooled[0]["id"]);
    assert_eq!(port_of(&claimed), port_of(&pooled[0]));
    assert_eq!(fetched_eventually(port_of(&claimed), "/www/index.html"), "");

    // Expiry: the pod goes within the reaper's round.
    let (code, short) = spawn(&agent, "short", "t1");
    assert_eq!(code, 201, "{short}");
    eventually("the short one is reaped", Duration::from_secs(20), || {
        pods(&cluster, "short").is_empty()
    });

    // A new version with onUpdate: replace: a new pod on the same NodePort, with the same flag.
    let changed = origin.commit(&[("heap.yaml", Some(&heap("two")))], "heap two");
    agent.reconcile();
    agent.wait_for("the change applied", || applied(&origin, &changed));
    eventually("the instance is replaced", Duration::from_secs(90), || {
        let now = call(&agent, "GET", &format!("/api/v1/instances/{id}"), "").2;
        now["version"] != first["version"] && pods(&cluster, "heap").len() == 2
    });
    assert_eq!(fetched_eventually(one, "/www/index.html"), flag_one);
    let replaced = labelled(
        &cluster,
        "pods",
        &format!("berth.team-instance={id}"),
        "{range .items[*]}{.metadata.deletionTimestamp}|{.spec.containers[0].env[?(@.name==\"MODE\")].value} {end}",
    );
    let running: Vec<&str> = replaced
        .split_whitespace()
        .filter_map(|pod| pod.strip_prefix('|'))
        .collect();
    assert_eq!(running, ["two"], "{replaced}");

    // A kill takes the pod and its Service.
    let second_id = second["id"].as_str().unwrap();
    let (code, _, _) = call(
        &agent,
        "DELETE",
        &format!("/api/v1/instances/{second_id}"),
        "",
    );
    assert_eq!(code, 204);
    eventually("the killed one is gone", Duration::from_secs(30), || {
        pods(&cluster, "heap").len() == 1
            && labelled(
                &cluster,
                "services",
                &format!("berth.team-instance={second_id}"),
                "{.items[*].metadata.name}",
            )
            .is_empty()
    });

    // Removed from the repo (prune on): its instances go with it.
    let removed = origin.commit(&[("heap.yaml", None)], "heap is retired");
    agent.reconcile();
    agent.wait_for("the removal applied", || applied(&origin, &removed));
    eventually("heap's instances are gone", Duration::from_secs(30), || {
        pods(&cluster, "heap").is_empty()
            && call(&agent, "GET", "/api/v1/instances?challenge=heap", "").2
                == serde_json::json!([])
    });
    assert_eq!(spawn(&agent, "heap", "t3").0, 404);
}

/// A folder of the repo mounted into an instanced challenge is the same read-only copy in every
/// team's instance (their named volumes are their own).
#[test]
fn every_instance_mounts_the_one_read_only_copy_of_a_repo_folder() {
    let Some(instance) = engine() else { return };
    let challenge = "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: pages}\nspec:\n  image: busybox:latest\n  command: [httpd, -f, -p, \"8080\", -h, /www]\n  ports: [{container: 8080}]\n  instanced: {ttl: 5m}\n  volumes: [{from: pages/www, path: /www}]\n";
    let origin = Origin::new(&[
        ("pages.yaml", challenge),
        ("pages/www/index.html", "the same for every team\n"),
    ]);
    let (_daemon, agent) = docker_agent(&instance, &origin);
    for team in ["t1", "t2"] {
        let (code, spawned) = spawn(&agent, "pages", team);
        assert_eq!(code, 201, "{spawned}");
        assert_eq!(
            fetched_eventually(port_of(&spawned), "/index.html").trim(),
            "the same for every team"
        );
        let main = container_of(&instance, spawned["id"].as_str().unwrap());
        let main = main.lines().next().unwrap().to_string();
        assert!(
            crate::support::engine::write_refused(&main, "/www/index.html"),
            "team {team} could change the page"
        );
    }
}

/// Binds each pending claim of `challenge`'s instances to a volume on the host made for it
/// alone (the test cluster has no provisioner), in `store`; the names of the claims bound.
fn bind_instance_claims(
    cluster: &crate::support::cluster::Cluster,
    challenge: &str,
    store: &std::path::Path,
) -> BTreeSet<String> {
    let selector = format!(
        "berth.instance={},berth.name={challenge},berth.team-instance",
        cluster.instance.name
    );
    let pending = labelled(
        cluster,
        "pvc",
        &selector,
        "{range .items[?(@.status.phase==\"Pending\")]}{.metadata.name} {end}",
    );
    let ns = cluster.challenges();
    let mut bound = BTreeSet::new();
    for claim in pending.split_whitespace() {
        let path = store.join(claim);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let pv = format!(
            "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {name}-{claim}\n  labels: {{berth.instance: {name}}}\nspec:\n  capacity: {{storage: 16Mi}}\n  accessModes: [ReadWriteOnce]\n  persistentVolumeReclaimPolicy: Retain\n  claimRef: {{namespace: {ns}, name: {claim}}}\n  hostPath: {{path: {}}}\n",
            path.display(),
            name = cluster.instance.name,
        );
        let file = store.join(format!("{claim}.yaml"));
        std::fs::write(&file, pv).unwrap();
        let made = cluster.kubectl(&["apply", "-f", file.to_str().unwrap()]);
        assert!(made.status.success(), "{made:?}");
        bound.insert(claim.to_string());
    }
    bound
}

/// Issue 20 on the cluster: a per-team instance keeps its named volume in a claim of its own,
/// made before its pod, mounted again by the pod that replaces it (the data outlives the
/// update), and deleted with the instance; no team sees another's data. A folder of the repo is
/// the challenge's one ConfigMap, which every instance mounts read-only.
#[test]
fn on_kubernetes_each_instance_keeps_its_volume_in_a_claim_of_its_own_and_shares_the_folder() {
    let Some(cluster) = crate::support::cluster::cluster() else {
        return;
    };
    let ns = cluster.challenges();
    let vault = |round: &str| {
        format!(
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: vault}}\nspec:\n  target: kubernetes\n  image: busybox:latest\n  command: [sh, -c, 'echo {round} >> /data/starts; mkdir -p /srv; cp /data/starts /srv/starts; cp /www/page /srv/page; exec httpd -f -p 8080 -h /srv']\n  ports: [{{container: 8080}}]\n  healthcheck: {{tcp: 8080, interval: 1s}}\n  volumes:\n    - {{name: data, path: /data, size: 16Mi}}\n    - {{from: vault/www, path: /www}}\n  instanced: {{ttl: 5m, onUpdate: replace}}\n"
        )
    };
    // Another challenge stays, so that retiring vault is not a prune of everything (held).
    let origin = Origin::new(&[
        ("vault.yaml", &vault("one")),
        ("vault/www/page", "shared page\n"),
        (
            "idle.yaml",
            &instanced("idle", "    ttl: 5m\n", "  target: kubernetes\n"),
        ),
    ]);
    let (_daemon, agent) = kube_agent(&cluster, &origin);
    // The challenge has no claim of its own; its folder's copy is made by the pass.
    assert!(!cluster.exists(&ns, "pvc/vault.data"));
    let folder = cluster.get(
        &ns,
        "configmaps",
        "{range .items[?(@.metadata.labels.berth\\.name==\"vault\")]}{.metadata.name} {end}",
    );
    assert!(folder.trim().starts_with("vault.folder-"), "{folder}");

    // Each team's spawn waits on a claim of its own, which the test binds as a provisioner would.
    let store = tempfile::tempdir().unwrap();
    let mut spawned = Vec::new();
    let mut claims = BTreeSet::new();
    for team in ["t1", "t2"] {
        let port = agent.port;
        let asked = std::thread::spawn(move || {
            let bearer = format!("Bearer {API_TOKEN}");
            let body = format!(r#"{{"team": "{team}"}}"#);
            let (code, _, body) = http_with_head(
                port,
                "POST",
                "/api/v1/challenges/vault/instances",
                &[("Authorization", &bearer)],
                body.as_bytes(),
            );
            (
                code,
                serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
            )
        });
        eventually(
            &format!("{team}'s claim is made"),
            Duration::from_secs(60),
            || {
                claims.extend(bind_instance_claims(&cluster, "vault", store.path()));
                claims.len() == spawned.len() + 1
            },
        );
        let (code, instance) = asked.join().unwrap();
        assert_eq!(code, 201, "{instance}");
        spawned.push(instance);
    }
    let id = |instance: &Value| instance["id"].as_str().unwrap().to_string();
    let expected: BTreeSet<String> = spawned
        .iter()
        .map(|i| format!("inst-vault-{}.data", id(i)))
        .collect();
    assert_eq!(claims, expected);
    for instance in &spawned {
        let port = port_of(instance);
        assert_eq!(fetched_eventually(port, "/page"), "shared page");
        // Each team's data is its own: one start each, never the other's.
        assert_eq!(fetched_eventually(port, "/starts"), "one");
    }

    // A new version replaces each pod; the new one mounts the same claim, so the data stays.
    let changed = origin.commit(&[("vault.yaml", Some(&vault("two")))], "vault two");
    agent.reconcile();
    agent.wait_for("the change applied", || applied(&origin, &changed));
    let first = &spawned[0];
    eventually("t1's instance is replaced", Duration::from_secs(90), || {
        let now = call(
            &agent,
            "GET",
            &format!("/api/v1/instances/{}", id(first)),
            "",
        )
        .2;
        now["version"] != first["version"] && now["state"] == "live"
    });
    eventually(
        "the replacement reads the data the first pod wrote",
        Duration::from_secs(30),
        || fetch(port_of(first), "/starts").as_deref() == Some("one\ntwo"),
    );

    // A kill deletes that instance's claim; the other team's stays.
    let second = &spawned[1];
    let (code, _, _) = call(
        &agent,
        "DELETE",
        &format!("/api/v1/instances/{}", id(second)),
        "",
    );
    assert_eq!(code, 204);
    // Deleted: gone, or going once its pod has stopped (the cluster keeps a claim in use).
    let deleted = |claim: &str| {
        !cluster.exists(&ns, claim)
            || !cluster
                .get(&ns, claim, "{.metadata.deletionTimestamp}")
                .is_empty()
    };
    let killed = format!("pvc/inst-vault-{}.data", id(second));
    eventually(
        "the killed instance's claim is deleted",
        Duration::from_secs(60),
        || deleted(&killed),
    );
    let kept = format!("pvc/inst-vault-{}.data", id(first));
    assert!(!deleted(&kept), "the other team's claim went too");

    // Retired from the repo: every instance goes, claims and all.
    let removed = origin.commit(&[("vault.yaml", None)], "vault is retired");
    agent.reconcile();
    agent.wait_for("the removal applied", || applied(&origin, &removed));
    eventually(
        "vault's claims are deleted",
        Duration::from_secs(60),
        || deleted(&kept),
    );
    for claim in &claims {
        cluster.kubectl(&[
            "delete",
            "pv",
            &format!("{}-{claim}", cluster.instance.name),
            "--wait=false",
        ]);
    }
}

/// What the API says of the health of the instance `spawned` (`null` without a solve check).
fn health_of(agent: &Agent, spawned: &Value) -> Value {
    let id = spawned["id"].as_str().unwrap();
    call(agent, "GET", &format!("/api/v1/instances/{id}"), "").2["health"].clone()
}

/// Waits until the solver of the instance `spawned` finds it Degraded; what the API says why.
fn degraded(agent: &Agent, spawned: &Value) -> String {
    eventually(
        "the instance shows as Degraded",
        Duration::from_secs(120),
        || health_of(agent, spawned)["state"] == "Degraded",
    );
    let said = health_of(agent, spawned)["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(said.contains("its solver failed"), "{said}");
    said
}

/// Issue 20, solvers for per-team instances (Docker): each team's instance is solved by the
/// challenge's `healthcheck.solve`, expecting that team's own flag, and the health it finds is
/// the instance's alone: a team whose jail breaks (here its page is removed) shows as Degraded,
/// with the solver's words and no flag in them, in the API and counted in status, while the
/// other team's stays Healthy.
#[test]
fn each_teams_instance_is_solved_with_its_own_flag_and_a_broken_one_shows_alone() {
    let Some(instance) = engine() else { return };
    let origin = Origin::new(&[(
        "heap.yaml",
        &instanced(
            "heap",
            "    ttl: 5m\n    flag: {env: FLAG, format: \"solve{%s}\"}\n",
            "",
        )
        .replace(
            "  healthcheck: {tcp: 8080, interval: 1s}\n",
            "  healthcheck:\n    solve: {image: busybox:latest, command: [sh, -c, 'wget -q -O - http://$CHALLENGE_HOST:$CHALLENGE_PORT/www/index.html'], interval: 1s, timeout: 10s, expectFlag: true}\n",
        ),
    )]);
    let (_daemon, agent) = docker_agent(&instance, &origin);
    let (code, red) = spawn(&agent, "heap", "red");
    assert_eq!(code, 201, "{red}");
    let (code, blue) = spawn(&agent, "heap", "blue");
    assert_eq!(code, 201, "{blue}");
    let health = |spawned: &Value| health_of(&agent, spawned);
    for spawned in [&red, &blue] {
        eventually(
            "the solver finds the team's flag",
            Duration::from_secs(60),
            || health(spawned)["state"] == "Healthy",
        );
    }

    // Red's page goes: red's solver fails, blue's still finds blue's flag.
    let red_flag = fetched_eventually(port_of(&red), "/www/index.html");
    let red_container = container_of(&instance, red["id"].as_str().unwrap());
    let red_container = red_container.lines().next().unwrap();
    docker(&["exec", red_container, "rm", "/www/index.html"]);
    let said = degraded(&agent, &red);
    assert!(
        !said.contains(&red_flag),
        "a flag in what the API says: {said}"
    );
    assert_eq!(health(&blue)["state"], "Healthy");
    // `berth instances` shows each one's health in its row.
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["instances", "heap", "--agent"])
        .arg(format!("http://127.0.0.1:{}", agent.port))
        .arg("--token-file")
        .arg(agent.dir.path().join("api-token"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(
        table.starts_with("ID") && table.contains("HEALTH"),
        "{table}"
    );
    let row = |team: &str| {
        table
            .lines()
            .find(|line| line.split_whitespace().nth(2) == Some(team))
            .unwrap_or_else(|| panic!("no row of {team}: {table}"))
            .to_string()
    };
    assert!(row("red").contains("Degraded"), "{table}");
    assert!(row("blue").contains("Healthy"), "{table}");

    // Status counts the degraded instance without waiting for a pass: a change of the counts
    // asks for a status push.
    eventually(
        "status counts the degraded instance",
        Duration::from_secs(30),
        || {
            origin
                .show("berth-status:status/challenge/heap.yaml")
                .unwrap_or_default()
                .contains("instances:\n  live: 2\n  pooled: 0\n  degraded: 1")
        },
    );
    // The challenge itself is ready for instances: its own solver state is theirs, never a
    // Progressing that waits for a run no container of its own would make.
    let committed = origin
        .show("berth-status:status/challenge/heap.yaml")
        .unwrap_or_default();
    assert!(committed.contains("\nhealth: Healthy\n"), "{committed}");
}

/// Issue 20, solvers for per-team instances on the cluster: each team's instance is solved by a
/// pod of its own that reaches it through the instance's Service. A team whose instance serves
/// its flag is Healthy; one whose jail is broken (here the page never holds the flag) is
/// Degraded, with the solver's words. (This cluster serves no pod logs, so the check judges by
/// the solver's exit code: `expectFlag` needs logs, as the solvers' README section says.)
#[test]
fn on_kubernetes_each_teams_instance_is_solved_through_its_own_service() {
    let Some(cluster) = crate::support::cluster::cluster() else {
        return;
    };
    let solved = |name: &str, writes: &str| {
        format!(
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: {name}}}\nspec:\n  target: kubernetes\n  image: busybox:latest\n  command: [sh, -c, 'mkdir -p /tmp/w; {writes} > /tmp/w/page; exec httpd -f -p 8080 -h /tmp/w']\n  ports: [{{container: 8080}}]\n  healthcheck:\n    solve: {{image: busybox:latest, command: [sh, -c, 'wget -q -O - http://$CHALLENGE_HOST:$CHALLENGE_PORT/page | grep -q \"team{{\" || {{ echo no flag on the page; exit 1; }}'], interval: 2s, timeout: 30s}}\n  instanced:\n    ttl: 5m\n    flag: {{env: FLAG, format: \"team{{%s}}\"}}\n"
        )
    };
    let origin = Origin::new(&[
        ("jail.yaml", &solved("jail", "echo \"$FLAG\"")),
        ("cracked.yaml", &solved("cracked", "echo nothing here")),
    ]);
    let (_daemon, agent) = kube_agent(&cluster, &origin);
    let (code, whole) = spawn(&agent, "jail", "t1");
    assert_eq!(code, 201, "{whole}");
    let (code, broken) = spawn(&agent, "cracked", "t1");
    assert_eq!(code, 201, "{broken}");
    let health = |spawned: &Value| health_of(&agent, spawned);
    eventually("the whole jail is solved", Duration::from_secs(120), || {
        health(&whole)["state"] == "Healthy"
    });
    degraded(&agent, &broken);
    // Each run's pod is deleted when it ends; none is taken for a team's instance.
    assert_eq!(pods(&cluster, "jail").len(), 1);
}
