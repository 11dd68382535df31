//! The walls, tried as an attacker would on the real Docker Engine: a player with a shell in one
//! challenge, and an outsider's pipeline step (and the build it makes), try every address and
//! port of every other berth container; what a challenge declares in `security:` and the limits
//! nobody declared are read back from inside the container; privileged needs the agent's consent.
//!
//! What the host's firewall must do (close the host's own services to berth's bridges) is the
//! operator's part and is not tried here; the README names the rule.

use std::process::Command;

use crate::support::engine::{docker, engine};
use crate::support::net::free_port;
use crate::support::util::{Repo, berth, stdout};

/// Every address of every container of `instance` but those of `except` (a challenge's name).
fn addresses_of_others(instance: &str, except: &str) -> Vec<String> {
    let ids = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=berth.instance={instance}"),
    ]);
    let mut addresses = Vec::new();
    for id in ids.split_whitespace() {
        let name = docker(&[
            "inspect",
            "--format",
            "{{index .Config.Labels \"berth.name\"}}",
            id,
        ]);
        if name == except {
            continue;
        }
        let found = docker(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            id,
        ]);
        addresses.extend(found.split_whitespace().map(str::to_string));
    }
    addresses
}

/// Runs `script` with `sh -c` in the running container of `challenge`'s slot `slot`.
fn shell_in(
    instance: &crate::support::engine::Instance,
    challenge: &str,
    slot: &str,
    script: &str,
) -> String {
    let id = &instance.containers(challenge)[slot].0;
    let output = Command::new("docker")
        .args(["exec", id, "sh", "-c", script])
        .output()
        .expect("docker CLI runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A shell script that tries `port`s on every address, printing `REACHED address:port` for each
/// that answers.
fn probe(addresses: &[String], ports: &[u16]) -> String {
    let targets: Vec<String> = addresses
        .iter()
        .flat_map(|a| ports.iter().map(move |p| format!("{a}:{p}")))
        .collect();
    format!(
        "for t in {}; do nc -w 1 ${{t%:*}} ${{t#*:}} </dev/null >/dev/null 2>&1 && echo REACHED $t; done; echo probed",
        targets.join(" ")
    )
}

/// The capability bounding set a process printed (`grep CapBnd /proc/self/status`): bit 13 is
/// NET_RAW, bit 21 SYS_ADMIN, bit 0 CHOWN.
fn bounding_set(printed: &str) -> u64 {
    printed
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:\t"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no CapBnd in {printed}"))
}

/// Serves `/www` on 8080 and a "flag" on 9000 that is never published.
const TWO_PORTS: &str = "  command: [sh, -c, \"mkdir -p /secret && echo flag > /secret/index.html && httpd -p 9000 -h /secret && exec httpd -f -p 8080 -h /www\"]\n";

#[test]
fn a_shell_in_one_challenge_reaches_no_other_challenge_on_any_address_or_port() {
    let Some(instance) = engine() else { return };
    let (alpha_port, beta_port) = (free_port(), free_port());
    let repo = Repo::new();
    let challenge = |name: &str, rest: &str| {
        format!(
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: {name}}}\nspec:\n  image: busybox:latest\n{TWO_PORTS}{rest}"
        )
    };
    repo.write(
        "alpha.yaml",
        challenge("alpha", &format!("  ports: [{{container: 8080, host: {alpha_port}}}]\n")),
    )
    .write(
        "beta.yaml",
        challenge("beta", &format!("  ports: [{{container: 8080, host: {beta_port}}}]\n")),
    )
    .write(
        "gamma.yaml",
        challenge(
            "gamma",
            "  sidecars:\n    - {name: db, image: \"busybox:latest\", command: [httpd, -f, -p, \"5432\", -h, /www]}\n",
        ),
    )
    .write("delta.yaml", challenge("delta", "  replicas: 2\n"));
    let applied = instance.apply(&repo, &[]);
    assert_eq!(applied.status.code(), Some(0), "{}", stdout(&applied));

    // No berth container stays on the engine's default bridge.
    let ids = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=berth.instance={}", instance.name),
    ]);
    for id in ids.split_whitespace() {
        let networks = docker(&[
            "inspect",
            "--format",
            "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}",
            id,
        ]);
        assert!(
            !networks.split_whitespace().any(|n| n == "bridge") && !networks.is_empty(),
            "a container is on the default bridge: {networks}"
        );
    }

    // A challenge's own containers reach each other: the sidecar by name, the other replica by
    // address. (This is also what shows the probe works.)
    let from_gamma = shell_in(
        &instance,
        "gamma",
        "main-1",
        &probe(&["db".into()], &[5432]),
    );
    assert!(from_gamma.contains("REACHED db:5432"), "{from_gamma}");
    let delta_two = docker(&[
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &instance.containers("delta")["main-2"].0,
    ]);
    let from_delta = shell_in(
        &instance,
        "delta",
        "main-1",
        &probe(std::slice::from_ref(&delta_two), &[9000]),
    );
    assert!(
        from_delta.contains(&format!("REACHED {delta_two}:9000")),
        "{from_delta}"
    );

    // Nobody reaches another challenge, on any of its addresses, on any port it listens on.
    for (attacker, slot) in [
        ("alpha", "main-1"),
        ("gamma", "main-1"),
        ("gamma", "sidecar-db"),
        ("delta", "main-1"),
    ] {
        let others = addresses_of_others(&instance.name, attacker);
        assert!(others.len() >= 3, "{others:?}");
        let seen = shell_in(
            &instance,
            attacker,
            slot,
            &probe(&others, &[8080, 9000, 5432]),
        );
        assert!(seen.contains("probed"), "{seen}");
        assert!(
            !seen.contains("REACHED"),
            "{attacker}/{slot} reached another challenge:\n{seen}"
        );
    }

    // The published ports still answer from the host.
    for port in [alpha_port, beta_port] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "port {port} does not answer from the host"
        );
    }
}

#[test]
fn a_pipeline_step_and_the_image_it_builds_reach_no_challenge_and_run_within_limits() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write(
        "target.yaml",
        format!("apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: target}}\nspec:\n  image: busybox:latest\n{TWO_PORTS}"),
    );
    let applied = instance.apply(&repo, &[]);
    assert_eq!(applied.status.code(), Some(0), "{}", stdout(&applied));
    let target = addresses_of_others(&instance.name, "");
    assert_eq!(target.len(), 1, "{target:?}");
    let target = &target[0];
    let attack = format!(
        "if nc -w 2 {target} 9000 </dev/null; then echo REACHED; exit 1; fi; if nc -w 2 {target} 8080 </dev/null; then echo REACHED; exit 1; fi"
    );
    let image = format!("{}-outsider", instance.name);
    repo.write(
        "outsider.yaml",
        format!(
            "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {{name: outsider}}\nspec:\n  image: busybox:latest\n  context: src\n  produces: \"{image}:{{commit}}\"\n  steps:\n    - name: reach\n      run: \"{attack}\"\n    - name: look\n      run: \"grep NoNewPrivs /proc/self/status; grep CapBnd /proc/self/status; echo pids=$(cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids.max 2>/dev/null); echo memory=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null)\"\n"
        ),
    )
    .write(
        "src/Dockerfile",
        format!("FROM busybox:latest\nRUN {attack}\nCMD [\"true\"]\n"),
    );
    let run = instance.berth("run", &repo, &["outsider"]);
    let log = stdout(&run);
    let _ = docker(&["rmi", "-f", &format!("{image}:local")]);
    assert!(run.status.success(), "{log}");
    assert!(!log.contains("REACHED"), "{log}");
    assert!(log.contains("== building"), "the build ran: {log}");
    // no-new-privileges, NET_RAW (bit 13) gone, and the step defaults: 1,024 processes, 2 GiB.
    assert!(log.contains("NoNewPrivs:\t1"), "{log}");
    let bounding = bounding_set(&log);
    assert_eq!(
        bounding & (1 << 13),
        0,
        "NET_RAW is still there: {bounding:x}"
    );
    assert!(log.contains("pids=1024"), "{log}");
    assert!(log.contains(&format!("memory={}", 2u64 << 30)), "{log}");
}

#[test]
fn what_a_challenge_declares_in_security_and_the_limits_it_left_out_hold_inside_it() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write(
        "jail.yaml",
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: jail}\nspec:\n  image: busybox:latest\n  command: [sleep, \"3600\"]\n  resources: {memory: 96Mi}\n  security:\n    capabilities: {add: [SYS_ADMIN], drop: [CHOWN]}\n    readOnlyRootFilesystem: true\n    user: \"1000:1000\"\n    tmpfs: [{path: /scratch, size: 8Mi}]\n    ulimits: {nofile: 256, nproc: 64}\n",
    );
    let applied = instance.apply(&repo, &[]);
    assert_eq!(applied.status.code(), Some(0), "{}", stdout(&applied));
    let seen = shell_in(
        &instance,
        "jail",
        "main-1",
        "id -u; id -g; ulimit -n; ulimit -u; touch /x 2>/dev/null && echo root-writable; touch /scratch/x && echo scratch-writable; grep -E 'NoNewPrivs|CapBnd' /proc/self/status; cat /proc/1/cmdline | tr '\\0' ' '; echo; cat /sys/fs/cgroup/pids/pids.max; cat /sys/fs/cgroup/memory/memory.limit_in_bytes; cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us",
    );
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(&lines[..4], ["1000", "1000", "256", "64"], "{seen}");
    assert!(!seen.contains("root-writable"), "{seen}");
    assert!(seen.contains("scratch-writable"), "{seen}");
    assert!(seen.contains("NoNewPrivs:\t1"), "{seen}");
    let bounding = bounding_set(&seen);
    assert_ne!(bounding & (1 << 21), 0, "SYS_ADMIN was added: {bounding:x}");
    assert_eq!(bounding & (1 << 13), 0, "NET_RAW is dropped: {bounding:x}");
    assert_eq!(bounding & 1, 0, "CHOWN is dropped: {bounding:x}");
    // An init runs as PID 1 (signals reach the challenge; zombies are reaped).
    assert!(seen.contains("docker-init"), "{seen}");
    // What it declared (memory), and the defaults for what it did not: 512 processes, 1 CPU.
    assert!(lines.contains(&"512"), "{seen}");
    assert!(
        lines.contains(&(96u64 << 20).to_string().as_str()),
        "{seen}"
    );
    assert!(lines.contains(&"100000"), "{seen}");
}

#[test]
fn privileged_needs_the_agents_consent_and_is_always_shown_in_the_plan() {
    let repo = Repo::new();
    repo.write(
        "nsjail.yaml",
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: nsjail}\nspec:\n  image: busybox:latest\n  security:\n    privileged: true\n",
    )
    .write(
        "offline.yaml",
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: offline}\nspec:\n  image: busybox:latest\n  network: {egress: false}\n  ports: [{container: 80, host: 10080}]\n",
    );
    let dir = repo.path().to_str().unwrap();
    let refused = berth(&["validate", dir]);
    let said = stdout(&refused);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(
        said.contains("nsjail.yaml:7:17: Challenge/nsjail: spec.security.privileged: a privileged container can take over the host, so it needs the agent's consent"),
        "{said}"
    );
    assert!(
        said.contains("offline.yaml:7:33: Challenge/offline: spec.ports[0].host: on docker, a challenge with network.egress: false is on an internal network"),
        "{said}"
    );
    std::fs::remove_file(repo.path().join("offline.yaml")).unwrap();
    let allowed = berth(&["validate", dir, "--allow-privileged"]);
    assert_eq!(allowed.status.code(), Some(0), "{}", stdout(&allowed));
    let Some(instance) = engine() else { return };
    let plan = instance.berth("plan", &repo, &["--allow-privileged"]);
    assert!(
        stdout(&plan).contains("runs privileged: main-1 (allowed by the agent's allowPrivileged)"),
        "{}",
        stdout(&plan)
    );
}

#[test]
fn a_challenge_without_egress_is_on_an_internal_network_of_its_own_kind() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write(
        "offline.yaml",
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: offline}\nspec:\n  image: busybox:latest\n  command: [sleep, \"3600\"]\n  network: {egress: false}\n",
    )
    .write(
        "online.yaml",
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: online}\nspec:\n  image: busybox:latest\n  command: [sleep, \"3600\"]\n",
    );
    let applied = instance.apply(&repo, &[]);
    assert_eq!(applied.status.code(), Some(0), "{}", stdout(&applied));
    let network_of = |challenge: &str| {
        docker(&[
            "inspect",
            "--format",
            "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}}{{end}}",
            &instance.containers(challenge)["main-1"].0,
        ])
    };
    let internal =
        |network: &str| docker(&["network", "inspect", "--format", "{{.Internal}}", network]);
    let (offline, online) = (network_of("offline"), network_of("online"));
    assert_eq!(internal(&offline), "true", "{offline}");
    assert_eq!(internal(&online), "false", "{online}");
    // Turning egress back on moves it, and the plan says why.
    repo.write(
        "offline.yaml",
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: offline}\nspec:\n  image: busybox:latest\n  command: [sleep, \"3600\"]\n",
    );
    let plan = instance.berth("plan", &repo, &[]);
    assert!(
        stdout(&plan).contains("Challenge/offline  update  network changed: egress off→egress on; walls changed: challenges-offline→challenges"),
        "{}",
        stdout(&plan)
    );
    let applied = instance.apply(&repo, &[]);
    assert_eq!(applied.status.code(), Some(0), "{}", stdout(&applied));
    assert_eq!(network_of("offline"), online);
}

/// Issue 18: a newline in a file name forged a line in what `berth validate` printed.
#[test]
fn a_newline_in_a_file_name_cannot_forge_a_line() {
    let repo = Repo::new();
    repo.write(
        "bad\nok.yaml: Challenge/x: looks fine.yaml",
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: x}\nspec: {}\n",
    );
    let output = berth(&["validate", repo.path().to_str().unwrap()]);
    let said = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.lines().all(|l| !l.starts_with("ok.yaml")),
        "a forged line: {said}"
    );
    assert!(
        said.contains("bad\\nok.yaml: Challenge/x: looks fine.yaml:"),
        "{said}"
    );
}
