//! What a hostile user and a careless operator tried, against the real Docker Engine, by the
//! behaviour each test holds (each test's comment says which attack first broke it):
//!
//! - **one apply at a time:** `two_applies_at_once_converge_with_one_network_each`,
//!   `a_held_lock_is_waited_for_then_refused_clearly`,
//!   `a_berth_removes_only_its_own_lock_container`,
//!   `a_lock_of_another_machine_with_this_host_name_is_not_taken_over`;
//! - **an update that fails leaves the old version running:**
//!   `a_failed_stop_first_update_leaves_the_old_version_running`,
//!   `an_update_that_crashes_on_start_keeps_the_old_version`,
//!   `a_removed_secret_file_fails_the_apply_and_keeps_the_running_container`,
//!   `a_dependency_that_is_unchanged_but_unhealthy_holds_back_its_dependents`;
//! - **failures say why:** `crash_loops_show_exit_code_and_log_and_one_shots_are_done`,
//!   `an_engine_that_vanishes_mid_apply_is_transient_not_a_failure`,
//!   `a_one_shot_stopped_by_berth_starts_again_when_set_running`;
//! - **secrets are applied and never shown:** `a_rotated_secret_is_applied_without_showing_it`,
//!   `a_secret_printed_by_a_crash_loop_is_masked_in_the_diagnosis`,
//!   `a_rotated_secret_is_applied_after_the_digest_key_was_removed`;
//! - **berth touches only what it owns:**
//!   `a_foreign_container_on_a_duplicate_network_is_not_removed`,
//!   `descriptor_labels_cannot_use_berths_own_label_keys`.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::engine::{Instance, docker, engine, web};
use crate::support::net::free_port;
use crate::support::proxy::EngineProxy;
use crate::support::util::{Repo, stdout};

/// A challenge with a sidecar, so it has a network of its own.
fn with_sidecar(name: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: {name}}}\nspec:\n  image: busybox:latest\n  command: [sleep, \"3600\"]\n  sidecars:\n    - {{name: store, image: \"busybox:latest\", command: [sleep, \"3600\"]}}\n"
    )
}

fn networks_named(instance: &Instance, challenge: &str) -> usize {
    docker(&[
        "network",
        "ls",
        "-q",
        "--filter",
        &format!("label=berth.instance={}", instance.name),
        "--filter",
        &format!("label=berth.name={challenge}"),
    ])
    .lines()
    .count()
}

/// Makes a second network named as the challenge's own, with berth's labels, as two unlocked
/// applies used to; the CLI checks for duplicates, the engine's API does not unless asked.
/// Returns its id.
fn duplicate_network(instance: &Instance, challenge: &str) -> String {
    let name = format!("berth-{}-{challenge}-walled", instance.name);
    let request = format!(
        r#"{{"Name":"{name}","CheckDuplicate":false,"Labels":{{"berth.instance":"{}","berth.kind":"Challenge","berth.name":"{challenge}"}}}}"#,
        instance.name
    );
    let created = Command::new("curl")
        .args([
            "-sf",
            "--unix-socket",
            "/var/run/docker.sock",
            "-H",
            "Content-Type: application/json",
            "-d",
            &request,
            "http://localhost/networks/create",
        ])
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", text(&created));
    let created: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    created["Id"].as_str().unwrap().to_string()
}

/// A repo with the challenge `vault`, whose `FLAG` is read from a file holding `value`; the
/// file's folder (removed on drop) and the file's path come with it.
fn vault_repo(value: &str) -> (tempfile::TempDir, std::path::PathBuf, Repo) {
    let secrets = tempfile::tempdir().unwrap();
    let flag = secrets.path().join("flag");
    std::fs::write(&flag, value).unwrap();
    let repo = Repo::new();
    repo.write(
        "vault.yaml",
        format!(
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: vault}}\nspec:\n  image: busybox:latest\n  command: [sleep, \"3600\"]\n  secretEnv:\n    FLAG: {{file: {}}}\n",
            flag.display()
        ),
    );
    (secrets, flag, repo)
}

fn spawn_apply(instance: &Instance, repo: &Repo) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "apply",
            repo.path().to_str().unwrap(),
            "--instance",
            &instance.name,
            "--wait",
            "0s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Fetches `http://127.0.0.1:PORT/`, retrying for a few seconds while the server starts.
fn serves(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n");
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1") {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Issue 8, item 2: two applies at once on one instance both succeed (the second waits for the
/// first's lock in the engine), every challenge gets exactly one network, and a duplicate network
/// left from before the lock existed is cleaned up by the next apply.
#[test]
fn two_applies_at_once_converge_with_one_network_each() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    for i in 0..4 {
        repo.write(&format!("c{i}.yaml"), with_sidecar(&format!("c{i}")));
    }
    let first = spawn_apply(&instance, &repo);
    let second = spawn_apply(&instance, &repo);
    let (first, second) = (
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    );
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    for i in 0..4 {
        assert_eq!(networks_named(&instance, &format!("c{i}")), 1, "c{i}");
    }
    assert!(
        docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("name=berth-{}-lock", instance.name)
        ])
        .is_empty(),
        "the lock is released"
    );

    // A duplicate made behind berth's back, as two unlocked applies used to make.
    duplicate_network(&instance, "c0");
    assert_eq!(networks_named(&instance, "c0"), 2);
    let plan = instance.berth("plan", &repo, &[]);
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    repo.write("c0.yaml", with_sidecar("c0").replace("3600", "3601"));
    let output = instance.berth("apply", &repo, &["--wait", "0s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(networks_named(&instance, "c0"), 1, "the duplicate is gone");
    assert_eq!(instance.containers("c0").len(), 2, "main and sidecar");
}

/// Issue 8, item 2: a lock held by another live berth makes apply wait, then refuse with a clear
/// message naming the holder and how to remove a stale lock.
#[test]
fn a_held_lock_is_waited_for_then_refused_clearly() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write("c.yaml", with_sidecar("c"));
    // The anchor image exists once any apply has run.
    assert_eq!(
        instance
            .berth("apply", &repo, &["--wait", "0s"])
            .status
            .code(),
        Some(0)
    );
    let lock = format!("berth-{}-lock", instance.name);
    docker(&[
        "create",
        "--name",
        &lock,
        "--label",
        &format!("berth.instance={}", instance.name),
        "--label",
        "berth.lock-holder=elsewhere:1",
        "--label",
        "berth.lock-since=2026-01-01T00:00:00Z",
        "berth-anchor:1",
        "/berth-anchor",
    ]);
    repo.write("c.yaml", with_sidecar("c").replace("3600", "3602"));
    let output = instance.berth("apply", &repo, &["--wait", "0s", "--lock-wait", "2s"]);
    assert_eq!(output.status.code(), Some(1));
    let said = text(&output);
    assert!(said.contains("another berth (elsewhere:1"), "{said}");
    assert!(said.contains(&format!("docker rm -f {lock}")), "{said}");
    docker(&["rm", "-f", &lock]);
    assert_eq!(
        instance
            .berth("apply", &repo, &["--wait", "0s"])
            .status
            .code(),
        Some(0)
    );
}

/// Issue 8, item 3: an update that must stop the old container first (a published host port)
/// and then cannot start the new one restarts the old one: the old version keeps serving.
#[test]
fn a_failed_stop_first_update_leaves_the_old_version_running() {
    let Some(instance) = engine() else { return };
    let port = free_port();
    let repo = Repo::new();
    repo.write("web.yaml", web("web", port, ""));
    assert_eq!(instance.apply(&repo, &[]).status.code(), Some(0));
    let (old_id, _) = instance.containers("web")["main-1"].clone();
    assert!(serves(port));

    // The engine creates this container, but its command cannot run: without an init the engine
    // cannot start it; with one (the default), the init starts and exits at once.
    repo.write(
        "web.yaml",
        web("web", port, "").replace("command: [httpd,", "command: [/no/such/binary,"),
    );
    let output = instance.apply(&repo, &[]);
    assert_eq!(output.status.code(), Some(1));
    let said = stdout(&output);
    // The engine may have restarted it before berth looked (then its exit code is reset and the
    // restart count says why); either way the reason and the command's own error are shown.
    assert!(
        (said.contains("did not stay up: exited with code 127")
            || said.contains("did not stay up: crash loop: restarted"))
            && said.contains("/no/such/binary"),
        "{said}"
    );
    assert!(said.contains("the old container keeps running"), "{said}");
    let containers = instance.containers("web");
    assert_eq!(containers.len(), 1, "the failed new container is removed");
    assert_eq!(containers["main-1"], (old_id.clone(), true), "old one runs");
    assert!(serves(port), "the old version serves again");

    // A missing image fails before anything is touched.
    repo.write(
        "web.yaml",
        web("web", port, "").replace("busybox:latest", "berth-test/surely-missing:nope"),
    );
    assert_eq!(instance.apply(&repo, &[]).status.code(), Some(1));
    assert_eq!(instance.containers("web")["main-1"], (old_id, true));
    assert!(serves(port));
}

/// Issue 8, item 7: a crash-looping sidecar fails the apply with its exit code and log; a
/// one-shot that completes is done (not restarted, not planned again); the summary does not
/// count failures as created.
#[test]
fn crash_loops_show_exit_code_and_log_and_one_shots_are_done() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write("loop.yaml", "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: loop}\nspec:\n  image: busybox:latest\n  command: [sleep, \"3600\"]\n  sidecars:\n    - {name: db, image: \"busybox:latest\", command: [sh, -c, \"echo db cannot open its data; exit 3\"]}\n")
        .write("once.yaml", "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: once}\nspec:\n  image: busybox:latest\n  restart: \"no\"\n  command: [sh, -c, \"echo seeded\"]\n");
    let output = instance.berth("apply", &repo, &["--wait", "6s"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let said = stdout(&output);
    assert!(said.contains("Challenge/loop"), "{said}");
    assert!(said.contains("sidecar-db is Degraded"), "{said}");
    // Between restarts the engine reports the code (3); once it runs again, only the restarts.
    assert!(
        said.contains("exited with code 3") || said.contains("crash loop: restarted"),
        "{said}"
    );
    assert!(said.contains("db cannot open its data"), "{said}");
    assert!(
        said.contains("applied: 1 created"),
        "only the one-shot counts as created: {said}"
    );
    assert!(
        !said.contains("Challenge/once: "),
        "the one-shot is fine: {said}"
    );

    let plan = instance.berth("plan", &repo, &[]);
    let planned = stdout(&plan);
    assert!(
        planned.contains("Challenge/once  noop"),
        "a completed one-shot is not started again: {planned}"
    );
    assert!(
        planned.contains("Challenge/loop  noop    sidecar-db is Degraded"),
        "an unhealthy challenge is never unchanged and healthy: {planned}"
    );
    assert!(planned.contains("1 unhealthy"), "{planned}");
    assert_eq!(plan.status.code(), Some(0), "{planned}");
    let again = instance.berth("apply", &repo, &["--wait", "0s"]);
    assert_eq!(
        again.status.code(),
        Some(1),
        "still unhealthy: {}",
        text(&again)
    );
}

/// Issue 8, item 8: a changed secret value replaces the container; the plan names the secret,
/// never its value, and the digest in the engine's labels is keyed (not a plain hash).
#[test]
fn a_rotated_secret_is_applied_without_showing_it() {
    let Some(instance) = engine() else { return };
    let (_secrets, flag, repo) = vault_repo("flag{first}\n");
    assert_eq!(
        instance
            .berth("apply", &repo, &["--wait", "0s"])
            .status
            .code(),
        Some(0)
    );
    let plan = instance.berth("plan", &repo, &[]);
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));

    std::fs::write(&flag, "flag{second}\n").unwrap();
    let plan = instance.berth("plan", &repo, &["--format", "json"]);
    let said = text(&plan);
    assert_eq!(plan.status.code(), Some(2), "{said}");
    assert!(said.contains("secret FLAG changed"), "{said}");
    assert!(!said.contains("flag{"), "{said}");
    let output = instance.berth("apply", &repo, &["--wait", "0s"]);
    assert!(!text(&output).contains("flag{"));
    let (id, running) = instance.containers("vault")["main-1"].clone();
    assert!(running);
    let env = docker(&["inspect", "--format", "{{json .Config.Env}}", &id]);
    assert!(env.contains("FLAG=flag{second}"), "{env}");
    let labels = docker(&["inspect", "--format", "{{json .Config.Labels}}", &id]);
    assert!(!labels.contains("flag{"), "{labels}");
    use sha2::Digest;
    let plain = hex::encode(sha2::Sha256::digest(b"flag{second}"));
    assert!(
        !labels.contains(&plain[..24]),
        "the digest is keyed: {labels}"
    );
}

/// Issue 9, item 4: an engine that stops answering mid-apply is transient, in words that say
/// what to do, never a failure of the object and never a pull from a registry.
#[test]
fn an_engine_that_vanishes_mid_apply_is_transient_not_a_failure() {
    let Some(instance) = engine() else { return };
    let proxy = EngineProxy::start();
    let repo = Repo::new();
    repo.write("slow.yaml", "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: slow}\nspec:\n  build: {context: slow}\n")
        .write("slow/Dockerfile", "FROM busybox:latest\nRUN sleep 4\nCMD [\"sleep\", \"3600\"]\n");
    let child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "apply",
            repo.path().to_str().unwrap(),
            "--instance",
            &instance.name,
            "--wait",
            "0s",
        ])
        .env("DOCKER_HOST", proxy.url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    proxy.set_open(false);
    let output = child.wait_with_output().unwrap();
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("TRANSIENT"), "{said}");
    assert!(
        said.contains(&format!(
            "the Docker Engine at {} is not answering",
            proxy.url()
        )),
        "{said}"
    );
    assert!(!said.contains("FAILED"), "{said}");
    assert!(!said.contains("pull"), "{said}");
    proxy.set_open(true);
    let output = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "apply",
            repo.path().to_str().unwrap(),
            "--instance",
            &instance.name,
            "--wait",
            "0s",
        ])
        .env("DOCKER_HOST", proxy.url())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(instance.containers("slow").len(), 1);
}

/// Attack on issue 8, item 7: a crash-looping container that prints its secret (a flag echoed at
/// boot, a password in a connection error) put the value into `apply`'s failure, the plan and so
/// the committed status, through the "last log lines" of the diagnosis. Secret values in log
/// lines must be masked as `<secret>`.
#[test]
fn a_secret_printed_by_a_crash_loop_is_masked_in_the_diagnosis() {
    let Some(instance) = engine() else { return };
    let secrets = tempfile::tempdir().unwrap();
    let flag = secrets.path().join("flag");
    std::fs::write(&flag, "flag{leaked-by-logs}").unwrap();
    let repo = Repo::new();
    repo.write(
        "leaky.yaml",
        format!(
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: leaky}}\nspec:\n  image: busybox:latest\n  command: [sh, -c, \"echo booting with $FLAG; exit 3\"]\n  secretEnv:\n    FLAG: {{file: {}}}\n",
            flag.display()
        ),
    );
    let output = instance.berth("apply", &repo, &["--wait", "5s"]);
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("booting with <secret>"), "{said}");
    assert!(!said.contains("leaked-by-logs"), "{said}");
    for format in ["text", "json", "markdown"] {
        let plan = instance.berth("plan", &repo, &["--format", format]);
        let planned = text(&plan);
        let shown = match format {
            "markdown" => "booting with &lt;secret&gt;",
            _ => "booting with <secret>",
        };
        assert!(planned.contains(shown), "{planned}");
        assert!(!planned.contains("leaked-by-logs"), "{planned}");
    }
}

/// Attack on issue 8, item 1: a berth removed its lock *by name* when it finished, and a takeover
/// removed the lock it had found dead by name too. A lock that another berth holds by then (taken
/// over, or freshly taken after a dead holder's lock was removed) was removed with it, so two
/// applies could run at once. Each berth must remove only the lock container it made or found.
#[test]
fn a_berth_removes_only_its_own_lock_container() {
    let Some(instance) = engine() else { return };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let engines = runtime
        .block_on(berth::reconcile::connect(
            &instance.name,
            &Default::default(),
        ))
        .unwrap();
    let held = runtime.block_on(engines.lock(Duration::ZERO)).unwrap();
    // Meanwhile the lock changed hands (another berth took it over, believing this one dead).
    let lock = format!("berth-{}-lock", instance.name);
    docker(&["rm", "-f", &lock]);
    let other = docker(&[
        "create",
        "--name",
        &lock,
        "--label",
        &format!("berth.instance={}", instance.name),
        "--label",
        "berth.lock-holder=elsewhere:1",
        "berth-anchor:1",
        "/berth-anchor",
    ]);
    runtime.block_on(held.release());
    let left = docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("name={lock}"),
    ]);
    assert_eq!(left, other, "the other berth's lock is kept");
    let refused = runtime.block_on(engines.lock(Duration::ZERO));
    assert!(
        refused.is_err(),
        "the lock is still held by the other berth"
    );
}

/// Attack on issue 8, item 1: a lock was taken over whenever its holder's host name was this
/// host's and no process of its pid ran here. Host names repeat (`localhost`, `ubuntu`, cloud
/// images' defaults) across machines that drive one engine, and berths in containers see other
/// pid namespaces, so a live apply's lock was taken over and two applies ran at once. Only a
/// holder of this very boot and pid namespace whose process is gone is dead.
#[test]
fn a_lock_of_another_machine_with_this_host_name_is_not_taken_over() {
    let Some(instance) = engine() else { return };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let engines = runtime
        .block_on(berth::reconcile::connect(
            &instance.name,
            &Default::default(),
        ))
        .unwrap();
    // Makes the anchor image.
    runtime.block_on(async { engines.lock(Duration::ZERO).await.unwrap().release().await });
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let lock = format!("berth-{}-lock", instance.name);
    // A live berth on another machine named like this one, whose pid does not exist here.
    let pid = 4_194_000;
    docker(&[
        "create",
        "--name",
        &lock,
        "--label",
        &format!("berth.instance={}", instance.name),
        "--label",
        &format!("berth.lock-holder={}:{pid}", host.trim()),
        "--label",
        &format!("berth.lock-process=00000000-0000-4000-8000-000000000000/4026531836/{pid}/1"),
        "berth-anchor:1",
        "/berth-anchor",
    ]);
    let taken = runtime.block_on(engines.lock(Duration::ZERO));
    assert!(taken.is_err(), "another machine's live lock was taken over");

    // The same holder, of this boot and pid namespace, is dead here: taken over.
    docker(&["rm", "-f", &lock]);
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let namespace = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let namespace = namespace.to_string_lossy();
    let namespace = namespace.trim_start_matches("pid:[").trim_end_matches(']');
    docker(&[
        "create",
        "--name",
        &lock,
        "--label",
        &format!("berth.instance={}", instance.name),
        "--label",
        &format!("berth.lock-holder={}:{pid}", host.trim()),
        "--label",
        &format!("berth.lock-process={}/{namespace}/{pid}/1", boot.trim()),
        "berth-anchor:1",
        "/berth-anchor",
    ]);
    let taken = runtime.block_on(engines.lock(Duration::ZERO));
    assert!(taken.is_ok(), "a dead holder's lock is taken over");
    runtime.block_on(taken.unwrap().release());
}

/// Attack on issue 8, item 2: removing a duplicate network removed *every* container attached
/// to it, berth's or not, so a debugging container someone had connected to the challenge's
/// network was deleted. berth never touches what it does not own: a foreign container is only
/// disconnected, and kept.
#[test]
fn a_foreign_container_on_a_duplicate_network_is_not_removed() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write("c0.yaml", with_sidecar("c0"));
    let output = instance.berth("apply", &repo, &["--wait", "0s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let duplicate = duplicate_network(&instance, "c0");
    let duplicate = duplicate.as_str();
    // Someone's debugging container, not berth's, joins the duplicate.
    let foreign = format!("atk-foreign-{}", instance.name);
    docker(&[
        "run",
        "-d",
        "--name",
        &foreign,
        "busybox:latest",
        "sleep",
        "3600",
    ]);
    docker(&["network", "connect", duplicate, &foreign]);
    let before = docker(&["ps", "-q", "--filter", &format!("name={foreign}")]);
    assert!(!before.is_empty(), "the foreign container runs");
    repo.write("c0.yaml", with_sidecar("c0").replace("3600", "3601"));
    let output = instance.berth("apply", &repo, &["--wait", "0s"]);
    let kept = docker(&["ps", "-q", "--filter", &format!("name={foreign}")]);
    docker(&["rm", "-f", &foreign]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(networks_named(&instance, "c0"), 1, "the duplicate is gone");
    assert!(
        !kept.is_empty(),
        "the foreign container was removed: {}",
        text(&output)
    );
}

/// Attack on issue 8, item 8: without the digest key a plan could not compare digests and said
/// "unchanged", and apply did nothing, so a rotated secret was silently never applied. A part
/// whose digests cannot be checked must be replaced. (Issue 19, item 5: the key lives in a volume,
/// which `docker container prune` leaves alone; here it is removed by hand.)
#[test]
fn a_rotated_secret_is_applied_after_the_digest_key_was_removed() {
    let Some(instance) = engine() else { return };
    let (_secrets, flag, repo) = vault_repo("flag{before-prune}");
    let output = instance.berth("apply", &repo, &["--wait", "0s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let key = format!("berth-{}-key", instance.name);
    // A container prune leaves it; only its removal loses it.
    docker(&[
        "container",
        "prune",
        "-f",
        "--filter",
        &format!("label=berth.instance={}", instance.name),
    ]);
    assert!(!docker(&["volume", "ls", "-q", "--filter", &format!("name={key}")]).is_empty());
    docker(&["volume", "rm", "-f", &key]);
    std::fs::write(&flag, "flag{after-prune}").unwrap();
    let plan = instance.berth("plan", &repo, &[]);
    assert_eq!(plan.status.code(), Some(2), "{}", text(&plan));
    let output = instance.berth("apply", &repo, &["--wait", "0s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let (id, _) = instance.containers("vault")["main-1"].clone();
    let env = docker(&["inspect", "--format", "{{json .Config.Env}}", &id]);
    assert!(env.contains("FLAG=flag{after-prune}"), "{env}");
    let plan = instance.berth("plan", &repo, &[]);
    assert_eq!(plan.status.code(), Some(0), "settled: {}", text(&plan));
}

/// Issue 8, item 3, the class: an update whose new container starts and then exits at once
/// (stop-first because of a host port, and start-first without one) leaves the old version
/// running instead of replacing it with a crash loop.
#[test]
fn an_update_that_crashes_on_start_keeps_the_old_version() {
    let Some(instance) = engine() else { return };
    let port = free_port();
    let repo = Repo::new();
    let internal = "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: inner}\nspec:\n  image: busybox:latest\n  command: [sleep, \"3600\"]\n";
    repo.write("web.yaml", web("web", port, ""))
        .write("inner.yaml", internal);
    assert_eq!(instance.apply(&repo, &[]).status.code(), Some(0));
    let (web_id, _) = instance.containers("web")["main-1"].clone();
    let (inner_id, _) = instance.containers("inner")["main-1"].clone();

    let crash = "[sh, -c, \"echo cannot read config; exit 2\"]";
    repo.write(
        "web.yaml",
        web("web", port, "").replace("[httpd, -f, -p, \"8080\", -h, /www]", crash),
    )
    .write("inner.yaml", internal.replace("[sleep, \"3600\"]", crash));
    let output = instance.berth("apply", &repo, &["--wait", "0s"]);
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("did not stay up"), "{said}");
    assert!(said.contains("cannot read config"), "{said}");
    assert_eq!(instance.containers("web")["main-1"], (web_id, true));
    assert_eq!(instance.containers("inner")["main-1"], (inner_id, true));
    assert_eq!(instance.containers("web").len(), 1);
    assert!(serves(port), "the old version serves");
}

/// Attack 2, secrets: a secret file removed from a running challenge (rotated away, a typo in a
/// deploy script) was not seen at all: `seal` left the part's digests unknown, unknown digests are
/// not compared, so `plan` said `noop` with exit 0 and `apply` succeeded while the challenge could
/// no longer be made again. It must be a change whose apply fails naming the file, never a
/// value, and the running container must be kept.
#[test]
fn a_removed_secret_file_fails_the_apply_and_keeps_the_running_container() {
    let Some(instance) = engine() else { return };
    let (_secrets, flag, repo) = vault_repo("flag{kept-secret}");
    let output = instance.berth("apply", &repo, &["--wait", "0s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let before = instance.containers("vault");

    std::fs::remove_file(&flag).unwrap();
    let plan = instance.berth("plan", &repo, &[]);
    let planned = text(&plan);
    assert_eq!(plan.status.code(), Some(2), "{planned}");
    assert!(
        planned.contains(&format!(
            "secret FLAG: cannot read secret file {}",
            flag.display()
        )),
        "{planned}"
    );
    for attempt in [&[][..], &["--prune"][..]] {
        let mut args = vec!["--wait", "0s"];
        args.extend(attempt);
        let output = instance.berth("apply", &repo, &args);
        let said = text(&output);
        assert_eq!(output.status.code(), Some(1), "{said}");
        assert!(
            said.contains(&format!(
                "failed: Challenge/vault: secret FLAG: cannot read secret file {}",
                flag.display()
            )),
            "{said}"
        );
        assert!(!said.contains("kept-secret"), "{said}");
        assert_eq!(
            instance.containers("vault"),
            before,
            "the running container is kept"
        );
    }

    std::fs::write(&flag, "flag{kept-secret}").unwrap();
    let plan = instance.berth("plan", &repo, &[]);
    assert_eq!(plan.status.code(), Some(0), "settled: {}", text(&plan));
}

/// Attack 2, `dependsOn`: a dependency whose step fails skips its dependents, but a dependency
/// that needs no change and is unhealthy (a seed job that exited with code 3, a crash-looping
/// database) did not hold anything back: its dependents were applied as if it were ready. A
/// dependency that is not ready holds back its dependents, the same in either case.
#[test]
fn a_dependency_that_is_unchanged_but_unhealthy_holds_back_its_dependents() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write("seed.yaml", "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: seed}\nspec:\n  image: busybox:latest\n  restart: \"no\"\n  command: [sh, -c, \"echo cannot seed; exit 3\"]\n");
    let output = instance.berth("apply", &repo, &["--wait", "3s"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    repo.write("app.yaml", "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: app, dependsOn: [Challenge/seed]}\nspec:\n  image: busybox:latest\n  command: [sleep, \"3600\"]\n");
    let plan = instance.berth("plan", &repo, &[]);
    assert!(
        stdout(&plan).contains("Challenge/seed  noop    main-1 is Degraded: exited with code 3"),
        "{}",
        text(&plan)
    );
    let output = instance.berth("apply", &repo, &["--wait", "0s"]);
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("failed: Challenge/app: dependency Challenge/seed is unhealthy"),
        "{said}"
    );
    assert!(instance.containers("app").is_empty(), "{said}");

    repo.write("seed.yaml", "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: seed}\nspec:\n  image: busybox:latest\n  restart: \"no\"\n  command: [sh, -c, \"echo seeded\"]\n");
    let output = instance.berth("apply", &repo, &["--wait", "5s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(instance.containers("app").len(), 1);
}

/// Attack 2, labels: a descriptor's `metadata.labels` were merged under berth's own, so
/// `berth.instance` or `berth.spec-hash` were overwritten silently, but a `berth.*` label berth
/// sets only sometimes was taken as berth's: `berth.secret-digests` on a challenge without
/// secrets made every update see its unchanged containers as old ones of the same name, and each
/// apply then removed one of the challenge's containers (main-1, then the sidecar, in turn) while
/// saying "done". Labels starting with `berth.` are refused, each at its key.
#[test]
fn descriptor_labels_cannot_use_berths_own_label_keys() {
    let repo = Repo::new();
    repo.write("forged.yaml", "apiVersion: berth/v1\nkind: Challenge\nmetadata:\n  name: forged\n  labels:\n    track: web\n    berth.instance: someone-else\n    berth.secret-digests: \"{}\"\nspec:\n  image: busybox:latest\n  command: [sleep, \"3600\"]\n  sidecars:\n    - {name: db, image: \"busybox:latest\", command: [sleep, \"3600\"]}\n");
    let output = crate::support::util::berth(&["validate", repo.path().to_str().unwrap()]);
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("forged.yaml:7:5: Challenge/forged: metadata.labels.berth.instance: labels starting with \"berth.\" are berth's own"), "{said}");
    assert!(
        said.contains("forged.yaml:8:5: Challenge/forged: metadata.labels.berth.secret-digests:"),
        "{said}"
    );
    assert!(!said.contains("track"), "{said}");
    let Some(instance) = engine() else { return };
    let output = instance.berth("apply", &repo, &["--wait", "0s"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(instance.containers("forged").is_empty());
}

/// Attack 2, one-shots: a `restart: "no"` challenge that runs long (a job, a listener meant to
/// run once) and is set to `state: stopped` is stopped by berth, and then looks exactly like a
/// one-shot that completed: set back to `state: running`, the plan says `noop` (healthy when it
/// exited 0 on SIGTERM, "Degraded: exited with code 137" when it was killed) and no apply starts
/// it again. The engine does not say whether a container exited by itself or was
/// stopped, so a one-shot's state is part of its template: switching it recreates the container.
#[test]
fn a_one_shot_stopped_by_berth_starts_again_when_set_running() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    let spec = |state: &str| {
        format!(
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: job}}\nspec:\n  image: busybox:latest\n  restart: \"no\"\n  state: {state}\n  command: [sh, -c, \"trap 'exit 0' TERM; sleep 3600 & wait\"]\n"
        )
    };
    repo.write("job.yaml", spec("running"));
    let output = instance.berth("apply", &repo, &["--wait", "0s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    repo.write("job.yaml", spec("stopped"));
    let output = instance.berth("apply", &repo, &["--wait", "0s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(!instance.containers("job")["main-1"].1, "stopped");
    repo.write("job.yaml", spec("running"));
    let plan = instance.berth("plan", &repo, &[]);
    assert_eq!(plan.status.code(), Some(2), "{}", text(&plan));
    let output = instance.berth("apply", &repo, &["--wait", "0s"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(instance.containers("job")["main-1"].1, "{}", text(&output));
}
