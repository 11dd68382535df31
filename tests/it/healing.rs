//! Issue 19: status that never lies and an agent that heals itself, against the real agent, real
//! git servers (`git daemon`, a local repository) and the real Docker Engine. A rejection stays in
//! status for as long as it is the tip; a status push that is always refused leaves applying and
//! readiness alone; a damaged clone is set aside and cloned afresh; a revision that would prune
//! everything is held; passes are rate-limited and a webhook delivery is taken once.

use std::time::{Duration, Instant};

use crate::support::agent::{
    Agent, applied, container_ids, github_push, send_github_delivery, served_web, sign,
};
use crate::support::engine::{docker, engine, web};
use crate::support::gitserver::{GitDaemon, Origin};
use crate::support::net::free_port;
use crate::support::net::git;

/// Whether the status branch's agent.yaml says `revision` was rejected.
fn rejected(origin: &Origin, revision: &str) -> bool {
    origin
        .show("berth-status:status/agent.yaml")
        .is_some_and(|s| {
            s.contains(&format!("lastAttemptedRevision: {revision}"))
                && s.contains("result: rejected")
        })
}

/// Asks for a pass and waits until one more has ended.
fn one_more_pass(agent: &Agent) {
    let before = agent.passes_total();
    agent.reconcile();
    agent.wait_for("one more pass", || agent.passes_total() > before);
}

#[test]
fn a_rejected_tip_stays_rejected_across_reconciles_drift_passes_and_a_restart() {
    let Some(instance) = engine() else { return };
    let port = free_port();
    let (origin, daemon, first) = served_web(port);
    let mut agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the first revision applied", || applied(&origin, &first));

    let broken = web("web", port, "").replace(&format!("host: {port}"), "host: abc");
    let bad = origin.commit(&[("challenges/web.yaml", Some(&broken))], "Break the port");
    agent.reconcile();
    agent.wait_for("the rejection recorded", || rejected(&origin, &bad));

    let still_rejected = |agent: &Agent, when: &str| {
        let text = origin.show("berth-status:status/agent.yaml").unwrap();
        assert!(rejected(&origin, &bad), "{when}: {text}");
        assert!(
            text.contains(&format!("lastAppliedRevision: {first}")),
            "{when}: {text}"
        );
        assert!(text.contains("is not an integer"), "{when}: {text}");
        assert!(
            text.contains(&format!("revision {} rejected (1 problem(s))", &bad[..12])),
            "{when}: {text}"
        );
        let (_, api) = agent.api("GET", "/api/v1/status");
        assert!(api.contains("\"result\": \"rejected\""), "{when}: {api}");
        assert!(api.contains(&bad), "{when}: {api}");
        assert_eq!(agent.request("GET", "/readyz", &[], b"").0, 200, "{when}");
    };
    // Plain reconciles: passes over what runs, which is the last good revision.
    for _ in 0..3 {
        one_more_pass(&agent);
    }
    still_rejected(&agent, "after reconciles");

    // A drift pass that has work to do: the container removed by hand is made again from the
    // applied revision, and status still says the tip was rejected.
    let made_again_after_removal = |agent: &Agent, when: &str| {
        for id in container_ids(&instance, "web") {
            docker(&["rm", "-f", &id]);
        }
        agent.wait_for(&format!("the container made again {when}"), || {
            one_more_pass(agent);
            !container_ids(&instance, "web").is_empty()
        });
    };
    made_again_after_removal(&agent, "");
    still_rejected(&agent, "after a drift pass");

    // A restart reads the tip again and keeps saying so.
    agent.kill9();
    agent.spawn();
    agent.wait_for("the first pass after the restart", || {
        agent.passes_total() >= 1
    });
    one_more_pass(&agent);
    still_rejected(&agent, "after a restart");
    // What runs is still kept converged after the restart.
    made_again_after_removal(&agent, "after the restart");
    still_rejected(&agent, "after a drift pass after the restart");

    let fixed = origin.commit(
        &[(
            "challenges/web.yaml",
            Some(&web("web", port, "  env: {FIXED: \"1\"}\n")),
        )],
        "Fix the port",
    );
    agent.reconcile();
    agent.wait_for("the fix applied", || applied(&origin, &fixed));
    let text = origin.show("berth-status:status/agent.yaml").unwrap();
    assert!(
        text.contains("result: applied") && !text.contains("problems"),
        "{text}"
    );
}

#[test]
fn a_status_push_that_is_always_refused_leaves_applying_and_readiness_alone() {
    let Some(instance) = engine() else { return };
    let port = free_port();
    let (origin, daemon, _first) = served_web(port);
    // Fetches work; every push is refused (as read-only credentials would have it).
    origin.bare_git(&["config", "daemon.receivepack", "false"]);
    let agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the challenge running", || {
        !container_ids(&instance, "web").is_empty()
    });
    agent.wait_for("ready", || {
        agent.request("GET", "/readyz", &[], b"").0 == 200
    });
    agent.wait_for("the failing push shown", || {
        agent
            .api("GET", "/api/v1/status")
            .1
            .contains("\"statusPush\"")
    });
    let (_, api) = agent.api("GET", "/api/v1/status");
    assert!(api.contains("cannot push status to"), "{api}");
    assert!(!api.contains("cannot fetch"), "{api}");

    // Pushes back off on their own, and no pass is run to push (once the challenge is healthy,
    // so that no requeued check runs one either).
    agent.wait_for("the challenge healthy", || {
        agent
            .api("GET", "/api/v1/status")
            .1
            .contains("\"health\": \"Healthy\"")
    });
    let passes = agent.passes_total();
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        agent.passes_total() <= passes + 1,
        "passes ran to push status"
    );
    let failed = agent.counter("berth_status_pushes_total{result=\"failed\"}");
    assert!(
        (2..=5).contains(&failed),
        "{failed} failed pushes in about 7 s"
    );
    assert!(agent.log().contains("status not pushed"), "{}", agent.log());
    assert_eq!(agent.request("GET", "/readyz", &[], b"").0, 200);

    // Applying goes on.
    let running = container_ids(&instance, "web");
    origin.commit(
        &[(
            "challenges/web.yaml",
            Some(&web("web", port, "  env: {NEXT: \"1\"}\n")),
        )],
        "Next",
    );
    agent.reconcile();
    agent.wait_for("the next revision running", || {
        let now = container_ids(&instance, "web");
        !now.is_empty() && now != running
    });

    // Once pushes are allowed again, a retry (not a pass) lands status.
    origin.bare_git(&["config", "daemon.receivepack", "true"]);
    let deadline = Instant::now() + Duration::from_secs(70);
    while origin.show("berth-status:status/agent.yaml").is_none() {
        assert!(
            Instant::now() < deadline,
            "status never landed: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.wait_for("the failure cleared", || {
        !agent
            .api("GET", "/api/v1/status")
            .1
            .contains("\"statusPush\"")
    });
}

#[test]
fn with_a_local_working_tree_as_the_repo_status_is_written_into_its_branch() {
    let Some(instance) = engine() else { return };
    let port = free_port();
    let origin = Origin::new(&[("challenges/web.yaml", &web("web", port, ""))]);
    let work = origin.work();
    let head = git(&work, &["rev-parse", "HEAD"]);
    let agent = Agent::start(&instance, work.to_str().unwrap(), "");
    let status = || {
        let output = std::process::Command::new("git")
            .current_dir(&work)
            .args(["show", "berth-status:status/agent.yaml"])
            .output()
            .unwrap();
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    };
    agent.wait_for("status in the local repository", || {
        status().is_some_and(|s| s.contains(&format!("lastAppliedRevision: {head}")))
    });
    assert!(!container_ids(&instance, "web").is_empty());
    // The working tree and its branch are as the person left them.
    assert_eq!(git(&work, &["rev-parse", "HEAD"]), head);
    assert_eq!(git(&work, &["status", "--porcelain"]), "");
    assert_eq!(agent.request("GET", "/readyz", &[], b"").0, 200);
    assert!(
        !agent
            .api("GET", "/api/v1/status")
            .1
            .contains("\"statusPush\"")
    );
}

#[test]
fn a_damaged_clone_is_set_aside_cloned_afresh_and_applied() {
    let Some(instance) = engine() else { return };
    let port = free_port();
    let (origin, daemon, first) = served_web(port);
    let mut agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the first revision applied", || applied(&origin, &first));
    let clone = agent.dir.path().join("state/repo");

    // Every pack cut in half, as a full disk or a crash mid-write leaves them.
    let packs = clone.join(".git/objects/pack");
    for entry in std::fs::read_dir(&packs).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "pack") {
            let file = std::fs::OpenOptions::new().write(true).open(&path);
            let file = match file {
                Ok(file) => file,
                Err(_) => {
                    let mut permissions = std::fs::metadata(&path).unwrap().permissions();
                    #[allow(clippy::permissions_set_readonly_false)]
                    permissions.set_readonly(false);
                    std::fs::set_permissions(&path, permissions).unwrap();
                    std::fs::OpenOptions::new().write(true).open(&path).unwrap()
                }
            };
            let size = file.metadata().unwrap().len();
            file.set_len(size / 2).unwrap();
        }
    }
    let second = origin.commit(
        &[(
            "challenges/web.yaml",
            Some(&web("web", port, "  env: {STEP: \"2\"}\n")),
        )],
        "Step 2",
    );
    agent.reconcile();
    agent.wait_for("the next revision applied from a fresh clone", || {
        applied(&origin, &second)
    });
    let log = agent.log();
    assert!(log.contains("damaged clone"), "{log}");
    assert!(log.contains("recovered"), "{log}");
    assert!(
        clone.with_extension("damaged").exists(),
        "kept for a post-mortem"
    );
    assert!(agent.passes("broken") >= 1);

    // A clone whose HEAD is gone, found at start: the agent heals it and applies.
    agent.kill9();
    std::fs::remove_file(clone.join(".git/HEAD")).unwrap();
    let third = origin.commit(
        &[(
            "challenges/web.yaml",
            Some(&web("web", port, "  env: {STEP: \"3\"}\n")),
        )],
        "Step 3",
    );
    agent.spawn();
    agent.wait_for("the third revision applied", || applied(&origin, &third));
    assert_eq!(container_ids(&instance, "web").len(), 1);
}

#[test]
fn a_revision_that_would_prune_everything_is_held_and_says_why() {
    let Some(instance) = engine() else { return };
    let port = free_port();
    let (origin, daemon, first) = served_web(port);
    let agent = Agent::start(&instance, &daemon.url(), "prune: true\n");
    agent.wait_for("the first revision applied", || applied(&origin, &first));
    let running = container_ids(&instance, "web");

    // One commit that removed the whole folder.
    let emptied = origin.commit(&[("challenges/web.yaml", None)], "Remove challenges/");
    agent.reconcile();
    agent.wait_for("the emptied revision looked at", || {
        applied(&origin, &emptied)
    });
    let text = origin.show("berth-status:status/agent.yaml").unwrap();
    assert!(text.contains("would delete all 1 objects"), "{text}");
    assert!(text.contains("pruneAllowEmpty"), "{text}");
    let object = origin
        .show("berth-status:status/challenge/web.yaml")
        .unwrap();
    assert!(object.contains("kept"), "{object}");
    assert_eq!(container_ids(&instance, "web"), running, "nothing deleted");
    assert!(agent.log().contains("deletes held"), "{}", agent.log());

    // One commit that replaced every challenge with a new one: the new one is made, and the
    // hold lasts through the passes after it, though the new one now counts as owned.
    let replaced = origin.commit(
        &[(
            "challenges/fresh.yaml",
            Some(&crate::support::util::challenge(
                "fresh",
                "  command: [sleep, \"3600\"]\n",
            )),
        )],
        "Replace every challenge",
    );
    agent.reconcile();
    agent.wait_for("the new challenge made", || {
        applied(&origin, &replaced) && !container_ids(&instance, "fresh").is_empty()
    });
    for _ in 0..3 {
        one_more_pass(&agent);
    }
    assert_eq!(
        container_ids(&instance, "web"),
        running,
        "deleted on a later pass"
    );
    let text = origin.show("berth-status:status/agent.yaml").unwrap();
    assert!(text.contains("would delete all 1 objects"), "{text}");
}

#[test]
fn passes_are_min_interval_apart_and_a_webhook_delivery_is_taken_once() {
    let Some(instance) = engine() else { return };
    let port = free_port();
    let (origin, daemon, first) = served_web(port);
    let agent = Agent::start(&instance, &daemon.url(), "minInterval: 2s\n");
    agent.wait_for("the first revision applied", || applied(&origin, &first));

    // A flood of authenticated reconciles: each is accepted, and they share few passes.
    let before = agent.passes_total();
    let started = Instant::now();
    for _ in 0..300 {
        assert_eq!(agent.api("POST", "/api/v1/reconcile").0, 202);
    }
    std::thread::sleep(Duration::from_secs(3));
    let seconds = started.elapsed().as_secs();
    let passes = agent.passes_total() - before;
    assert!(
        (1..=seconds / 2 + 2).contains(&passes),
        "{passes} passes in {seconds} s with minInterval 2s"
    );

    // A new commit announced by a webhook is not held back, and its delivery is taken once.
    let second = origin.commit(
        &[(
            "challenges/web.yaml",
            Some(&web("web", port, "  env: {HOOKED: \"1\"}\n")),
        )],
        "Hooked",
    );
    let body = github_push(&second, "main");
    let signature = sign(&body);
    let deliver = || {
        send_github_delivery(
            &agent,
            &body,
            &signature,
            "5f1c0e2a-d6a1-11ed-9d8b-0242ac120002",
        )
    };
    let (code, text) = deliver();
    assert_eq!(code, 202, "{text}");
    agent.wait_for("the pushed commit applied", || applied(&origin, &second));
    for _ in 0..20 {
        let (code, text) = deliver();
        assert_eq!((code, text.starts_with("duplicate")), (200, true), "{text}");
    }
    let hooks = |result: &str| {
        agent.counter(&format!(
            "berth_webhook_requests_total{{provider=\"github\",result=\"{result}\"}}"
        ))
    };
    assert_eq!((hooks("accepted"), hooks("duplicate")), (1, 20));
}

#[test]
fn after_the_digest_key_is_removed_the_cli_and_the_agent_agree_on_one_new_key() {
    let Some(instance) = engine() else { return };
    let secrets = tempfile::tempdir().unwrap();
    let flag = secrets.path().join("flag");
    std::fs::write(&flag, "flag{one-key}").unwrap();
    let vault = format!(
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: vault}}\nspec:\n  image: busybox:latest\n  command: [sleep, \"3600\"]\n  secretEnv:\n    FLAG: {{file: {}}}\n",
        flag.display()
    );
    let origin = Origin::new(&[("challenges/vault.yaml", &vault)]);
    let first = origin.bare_git(&["rev-parse", "main"]);
    let daemon = GitDaemon::start(&origin);
    let agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the vault applied", || applied(&origin, &first));
    let running = || instance.containers("vault")["main-1"].0.clone();
    let cli_apply = || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .args([
                "apply",
                origin.work().to_str().unwrap(),
                "--instance",
                &instance.name,
            ])
            .args(["--wait", "0s"])
            .env_remove("KUBECONFIG")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0), "{output:?}");
    };

    docker(&[
        "volume",
        "rm",
        "-f",
        &format!("berth-{}-key", instance.name),
    ]);
    let mut seen = vec![running()];
    for _ in 0..5 {
        cli_apply();
        seen.push(running());
        one_more_pass(&agent);
        seen.push(running());
    }
    seen.dedup();
    assert!(
        seen.len() <= 2,
        "{} replacements in ten alternating passes",
        seen.len() - 1
    );
    let env = docker(&["inspect", "--format", "{{json .Config.Env}}", &running()]);
    assert!(env.contains("FLAG=flag{one-key}"), "{env}");
}

/// A git server that accepts a connection and then sends one byte a second, for ever: never
/// silent long enough for a network timeout.
fn dripping_git_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                // A pkt-line of 4095 bytes announced, then its bytes one by one.
                let _ = std::io::Write::write_all(&mut stream, b"0fff");
                while std::io::Write::write_all(&mut stream, b"a").is_ok() {
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }
    });
    port
}

#[test]
fn sigterm_ends_the_agent_within_ten_seconds_while_a_git_server_drips_bytes() {
    let Some(instance) = engine() else { return };
    let port = dripping_git_server();
    let mut agent = Agent::start(&instance, &format!("git://127.0.0.1:{port}/infra.git"), "");
    // The first pass is fetching by now, and would be for as long as the server drips.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.passes_total(), 0, "{}", agent.log());
    let asked = Instant::now();
    let status = agent.terminate();
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "SIGTERM took {took:?}: {}",
        agent.log()
    );
    assert!(status.success(), "{status:?}");
    assert!(
        agent
            .log()
            .contains("stopping before the pass in progress ended"),
        "{}",
        agent.log()
    );
}
