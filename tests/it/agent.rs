//! `berth agent` end to end: the real binary following a real git server (`git daemon`, or
//! `git http-backend` behind lighttpd with basic auth), applying to the real Docker Engine, and
//! committing status back, driven the way users drive it: pushes, signed webhooks, API calls,
//! SIGTERM and `kill -9`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::support::agent::{
    Agent, WEBHOOK_SECRET, applied, container_ids, github_push, send_github, served_web, sign,
};
use crate::support::engine::{docker, engine, web};
use crate::support::gitserver::{GitDaemon, GitHttp, HTTP_PASSWORD, HTTP_USER, Origin};
use crate::support::net::free_port;
use crate::support::net::git;
use crate::support::util::stdout;

/// Waits until `/readyz` answers 503 because the repo cannot be fetched.
fn wait_until_fetching_fails(agent: &Agent) {
    agent.wait_for("not ready", || {
        let (code, body) = agent.request("GET", "/readyz", &[], b"");
        code == 503 && body.contains("cannot fetch")
    });
}

#[test]
fn a_push_and_a_signed_github_webhook_replace_the_container_and_status_lands() {
    let Some(instance) = engine() else { return };
    let port = free_port();
    let (origin, daemon, first) = served_web(port);
    let agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the first revision applied", || applied(&origin, &first));
    let before = container_ids(&instance, "web");
    assert_eq!(before.len(), 1);
    assert_eq!(agent.request("GET", "/healthz", &[], b"").0, 200);
    assert_eq!(agent.request("GET", "/readyz", &[], b"").0, 200);

    // The status branch holds the object's status.
    let web_status = origin
        .show("berth-status:status/challenge/web.yaml")
        .unwrap();
    assert!(web_status.contains("phase: Running"), "{web_status}");
    assert!(
        web_status.contains(&format!("revision: {first}")),
        "{web_status}"
    );
    assert!(
        web_status.contains(&format!("- {port}/tcp")),
        "{web_status}"
    );

    // A push, then a webhook with a bad signature: refused, and nothing happens.
    let second = origin.commit(
        &[(
            "challenges/web.yaml",
            Some(&web("web", port, "  env: {GREETING: hello}\n")),
        )],
        "Greet",
    );
    let body = github_push(&second, "main");
    let passes = agent.passes("applied");
    let (code, text) = send_github(&agent, &body, &sign("something else"));
    assert_eq!(code, 401, "{text}");
    let (code, _) = send_github(&agent, &body, "");
    assert_eq!(code, 401);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.passes("applied"), passes);
    assert_eq!(
        container_ids(&instance, "web"),
        before,
        "a refused webhook changes nothing"
    );
    let (_, metrics) = agent.api("GET", "/metrics");
    assert!(
        metrics.contains(
            "berth_webhook_requests_total{provider=\"github\",result=\"unauthorized\"} 2"
        ),
        "{metrics}"
    );

    // A push to another branch is acknowledged and ignored.
    let (code, text) = send_github(
        &agent,
        &github_push(&second, "feature"),
        &sign(&github_push(&second, "feature")),
    );
    assert_eq!(
        (code, text.trim()),
        (
            200,
            "ignored: push to feature; berth follows main of its config repo, and no pipeline builds this push"
        )
    );

    // The signed webhook: 202 at once, then the container is replaced.
    let (code, _) = send_github(&agent, &body, &sign(&body));
    assert_eq!(code, 202);
    agent.wait_for("the second revision applied", || applied(&origin, &second));
    let after = container_ids(&instance, "web");
    assert_eq!(after.len(), 1);
    assert_ne!(after, before, "the container was replaced");
    let web_status = origin
        .show("berth-status:status/challenge/web.yaml")
        .unwrap();
    assert!(
        web_status.contains("message: \"updated: env changed: GREETING\""),
        "{web_status}"
    );

    // The pass does not wait for health: a requeued check records the new container settling.
    agent.wait_for("the new container healthy in status", || {
        origin
            .show("berth-status:status/challenge/web.yaml")
            .is_some_and(|s| s.contains("health: Healthy"))
    });
    // One commit per pass that changed something; the status commits never trigger a pass.
    let status_commits = origin.bare_git(&["rev-list", "--count", "berth-status"]);
    let unchanged = agent.passes("unchanged");
    agent.reconcile();
    agent.wait_for("an unchanged pass", || {
        agent.passes("unchanged") > unchanged
    });
    assert_eq!(
        origin.bare_git(&["rev-list", "--count", "berth-status"]),
        status_commits
    );
    assert_eq!(agent.passes("applied"), passes + 1);

    // The status API and `berth status` show the same.
    let (code, json) = agent.api("GET", "/api/v1/status");
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["agent"]["lastAppliedRevision"], second.as_str());
    assert_eq!(json["objects"][0]["phase"], "Running");
    assert_eq!(
        agent.request("GET", "/api/v1/status", &[], b"").0,
        401,
        "the API needs the token"
    );
    let printed = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["status", "--repo", &daemon.url()])
        .output()
        .unwrap();
    let table = stdout(&printed);
    assert!(printed.status.success(), "{table}");
    assert!(
        table.contains("Challenge/web") && table.contains("Running") && table.contains("Healthy"),
        "{table}"
    );

    // A pull request that moves the port: `plan --against-status` says so with no engine at all.
    let review = tempfile::tempdir().unwrap();
    git(review.path(), &["clone", "-q", &daemon.url(), "pr"]);
    let pr = review.path().join("pr");
    std::fs::write(
        pr.join("challenges/web.yaml"),
        web("web", port + 1, "  env: {GREETING: hello}\n"),
    )
    .unwrap();
    let plan = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "plan",
            "--against-status",
            "--format",
            "markdown",
            "--instance",
            &instance.name,
        ])
        .arg(&pr)
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    let text = stdout(&plan);
    assert_eq!(
        plan.status.code(),
        Some(2),
        "{text}{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    assert!(
        text.contains(&format!("ports changed: {port}→{}", port + 1)),
        "{text}"
    );

    // SIGTERM: a clean exit.
    let mut agent = agent;
    assert!(agent.terminate().success());
}

#[test]
fn an_invalid_commit_is_rejected_while_the_old_container_runs_then_a_fix_applies() {
    let Some(instance) = engine() else { return };
    let port = free_port();
    let (origin, daemon, first) = served_web(port);
    let agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the first revision applied", || applied(&origin, &first));
    let running = container_ids(&instance, "web");

    let broken = web("web", port, "").replace(&format!("host: {port}"), "host: abc");
    let bad = origin.commit(&[("challenges/web.yaml", Some(&broken))], "Break the port");
    agent.reconcile();
    agent.wait_for("the rejection recorded", || {
        origin
            .show("berth-status:status/agent.yaml")
            .is_some_and(|s| s.contains(&format!("lastAttemptedRevision: {bad}")))
    });
    let agent_status = origin.show("berth-status:status/agent.yaml").unwrap();
    assert!(agent_status.contains("result: rejected"), "{agent_status}");
    assert!(
        agent_status.contains(&format!("lastAppliedRevision: {first}")),
        "{agent_status}"
    );
    assert!(
        agent_status.contains("file: challenges/web.yaml"),
        "{agent_status}"
    );
    assert!(agent_status.contains("line: 8"), "{agent_status}");
    assert!(agent_status.contains("is not an integer"), "{agent_status}");
    assert_eq!(
        container_ids(&instance, "web"),
        running,
        "the last good revision keeps running"
    );
    let ready = agent.request("GET", "/readyz", &[], b"");
    assert_eq!(
        ready.0, 200,
        "an invalid revision is not a transient failure"
    );

    let fixed = origin.commit(
        &[(
            "challenges/web.yaml",
            Some(&web("web", port, "  env: {FIXED: \"yes\"}\n")),
        )],
        "Fix the port",
    );
    agent.reconcile();
    agent.wait_for("the fix applied", || applied(&origin, &fixed));
    let agent_status = origin.show("berth-status:status/agent.yaml").unwrap();
    assert!(agent_status.contains("result: applied"), "{agent_status}");
    assert!(!agent_status.contains("problems"), "{agent_status}");
    assert_ne!(container_ids(&instance, "web"), running);
}

#[test]
fn status_on_the_followed_branch_is_committed_there_and_never_triggers_a_pass() {
    let Some(instance) = engine() else { return };
    let (origin, daemon, first) = served_web(free_port());
    let agent = Agent::start(&instance, &daemon.url(), "statusBranch: \"\"\n");
    agent.wait_for("status committed on main", || {
        origin
            .show("main:.berth/status/agent.yaml")
            .is_some_and(|s| s.contains(&format!("lastAppliedRevision: {first}")))
    });
    assert!(
        origin
            .show("main:.berth/status/challenge/web.yaml")
            .is_some()
    );
    assert_eq!(origin.bare_git(&["rev-list", "--count", "main"]), "2");
    // The agent fetches its own status commit: same content, so no pass applies anything.
    agent.reconcile();
    agent.wait_for("an unchanged pass", || agent.passes("unchanged") >= 1);
    agent.reconcile();
    agent.wait_for("a second unchanged pass", || agent.passes("unchanged") >= 2);
    assert_eq!(agent.passes("applied"), 1);
    assert_eq!(origin.bare_git(&["rev-list", "--count", "main"]), "2");
    let status = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["status", "--status-branch", "", "--repo"])
        .arg(origin.bare())
        .output()
        .unwrap();
    assert!(
        stdout(&status).contains("Challenge/web"),
        "{}",
        stdout(&status)
    );
}

#[test]
fn over_authenticated_http_a_rejected_status_push_is_rebased_and_retried() {
    let Some(instance) = engine() else { return };
    let origin = Origin::new(&[("challenges/web.yaml", &web("web", free_port(), ""))]);
    let Some(server) = GitHttp::start(&origin) else {
        return;
    };
    let first = origin.bare_git(&["rev-parse", "main"]);
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("password");
    std::fs::write(&password_file, format!("{HTTP_PASSWORD}\n")).unwrap();
    let auth = format!(
        "  auth: {{username: {HTTP_USER}, passwordFile: {}}}\n",
        password_file.display()
    );
    let agent = Agent::start_with(&instance.name, &server.url(), &auth, "");
    agent.wait_for("the first revision applied", || applied(&origin, &first));

    // Someone else pushes to the status branch: the agent's next push is rejected.
    let other = tempfile::tempdir().unwrap();
    git(
        other.path(),
        &[
            "clone",
            "-q",
            "-b",
            "berth-status",
            origin.bare().to_str().unwrap(),
            "notes",
        ],
    );
    let notes = other.path().join("notes");
    std::fs::write(
        notes.join("status/NOTES.md"),
        "Maintenance window on Friday.\n",
    )
    .unwrap();
    git(&notes, &["add", "-A"]);
    git(&notes, &["commit", "-q", "-m", "A note beside the status"]);
    git(&notes, &["push", "-q", "origin", "berth-status"]);
    let theirs = git(&notes, &["rev-parse", "HEAD"]);

    let second = origin.commit(
        &[("challenges/web.yaml", Some(&web("web", free_port(), "")))],
        "Move the port",
    );
    agent.reconcile();
    agent.wait_for("the second revision's status", || applied(&origin, &second));
    assert!(
        agent
            .log()
            .contains("status push rejected; fetching and rebasing"),
        "{}",
        agent.log()
    );
    assert_eq!(
        origin.show("berth-status:status/NOTES.md").as_deref(),
        Some("Maintenance window on Friday.\n"),
        "the other writer's file survives the rebase"
    );
    origin.bare_git(&["merge-base", "--is-ancestor", &theirs, "berth-status"]);
    assert!(
        !agent.log().contains(HTTP_PASSWORD),
        "the password never reaches the log"
    );
}

#[test]
fn wrong_credentials_leave_the_agent_up_and_not_ready_without_showing_the_password() {
    let Some(instance) = engine() else { return };
    let origin = Origin::new(&[("challenges/web.yaml", &web("web", free_port(), ""))]);
    let Some(server) = GitHttp::start(&origin) else {
        return;
    };
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("password");
    std::fs::write(&password_file, "not-the-password-5d1e\n").unwrap();
    let auth = format!(
        "  auth: {{username: {HTTP_USER}, passwordFile: {}}}\n",
        password_file.display()
    );
    let agent = Agent::start_with(&instance.name, &server.url(), &auth, "");
    wait_until_fetching_fails(&agent);
    assert_eq!(agent.request("GET", "/healthz", &[], b"").0, 200);
    assert!(
        !agent.log().contains("not-the-password-5d1e"),
        "{}",
        agent.log()
    );
    assert!(container_ids(&instance, "web").is_empty());
}

#[test]
fn when_the_git_server_goes_down_the_agent_stays_up_and_recovers() {
    let Some(instance) = engine() else { return };
    let port = free_port();
    let (origin, mut daemon, first) = served_web(port);
    let agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the first revision applied", || applied(&origin, &first));
    let running = container_ids(&instance, "web");

    daemon.stop();
    agent.reconcile();
    wait_until_fetching_fails(&agent);
    assert_eq!(agent.request("GET", "/healthz", &[], b"").0, 200);
    assert_eq!(
        container_ids(&instance, "web"),
        running,
        "what runs is left alone"
    );

    let second = origin.commit(
        &[(
            "challenges/web.yaml",
            Some(&web("web", port, "  env: {AFTER: outage}\n")),
        )],
        "Change during the outage",
    );
    daemon.restart();
    // No trigger needed: the agent retries with backoff.
    agent.wait_for("the change applied after the outage", || {
        applied(&origin, &second)
    });
    agent.wait_for("ready again", || {
        agent.request("GET", "/readyz", &[], b"").0 == 200
    });
    assert_ne!(container_ids(&instance, "web"), running);
}

/// Regression: a clone left with git's lock files by a killed agent blocked every later pass.
#[test]
fn kill_9_during_a_pass_then_a_restart_converges_without_duplicates() {
    let Some(instance) = engine() else { return };
    let names: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    let files: Vec<(String, String)> = names
        .iter()
        .map(|n| (format!("challenges/{n}.yaml"), web(n, free_port(), "")))
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    let origin = Origin::new(&files);
    let first = origin.bare_git(&["rev-parse", "main"]);
    let daemon = GitDaemon::start(&origin);
    let mut agent = Agent::start(&instance, &daemon.url(), "concurrency: 1\n");
    agent.wait_for("the first step", || agent.log().contains(" step "));
    agent.kill9();
    let made: usize = names.iter().map(|n| instance.containers(n).len()).sum();
    assert!(
        made < names.len(),
        "killed mid-pass: {made} of {} made",
        names.len()
    );

    // What git leaves when a writer is killed mid-write: lock files that block the next writer.
    let clone = agent.dir.path().join("state/repo/.git");
    std::fs::write(clone.join("index.lock"), "").unwrap();
    std::fs::create_dir_all(clone.join("refs/remotes/origin")).unwrap();
    std::fs::write(clone.join("refs/remotes/origin/main.lock"), "").unwrap();

    // A second agent on the same state folder while the first runs is refused.
    agent.spawn();
    let second = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["agent", "--config"])
        .arg(&agent.config)
        .env("BERTH_LISTEN", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another berth agent uses"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    agent.wait_for("the revision applied after the restart", || {
        applied(&origin, &first)
    });
    for name in &names {
        let containers = instance.containers(name);
        assert_eq!(containers.len(), 1, "{name}: {containers:?}");
        assert!(containers.values().all(|(_, running)| *running), "{name}");
    }
    let all = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=berth.instance={}", instance.name),
    ]);
    assert_eq!(all.lines().count(), names.len(), "no duplicates");
}

#[test]
fn a_commit_in_a_local_repo_is_applied_without_any_other_trigger() {
    let Some(instance) = engine() else { return };
    let port = free_port();
    let origin = Origin::new(&[("challenges/web.yaml", &web("web", port, ""))]);
    let first = origin.bare_git(&["rev-parse", "main"]);
    // The agent follows the bare repo by path, so it watches it.
    let agent = Agent::start(&instance, origin.bare().to_str().unwrap(), "");
    agent.wait_for("the first revision applied", || applied(&origin, &first));
    let running = container_ids(&instance, "web");
    let second = origin.commit(
        &[(
            "challenges/web.yaml",
            Some(&web("web", port, "  env: {SAVED: \"1\"}\n")),
        )],
        "Save",
    );
    agent.wait_for("the commit applied", || applied(&origin, &second));
    assert_ne!(container_ids(&instance, "web"), running);
    assert!(agent.log().contains("file-change"), "{}", agent.log());
}

#[test]
fn webhook_endpoints_check_each_providers_signature_and_limit_bodies() {
    // No engine or git server needed: the HTTP server answers whatever the passes find.
    let agent = Agent::start_with("hooks", "git://127.0.0.1:9/nothing.git", "", "");
    let push = br#"{"ref":"refs/heads/main","after":"bffeb74224043ba2feb48d137756c8a9331c449a","checkout_sha":"bffeb74224043ba2feb48d137756c8a9331c449a","pusher":{"login":"gitea"},"user_username":"jsmith"}"#;
    let hex = berth::webhook::sign(WEBHOOK_SECRET.as_bytes(), push);
    type Header<'a> = (&'a str, &'a str);
    let cases: [(&str, Header, &str, Header); 3] = [
        (
            "gitlab",
            ("X-Gitlab-Token", WEBHOOK_SECRET),
            "X-Gitlab-Event",
            ("X-Gitlab-Token", "guess"),
        ),
        (
            "gitea",
            ("X-Gitea-Signature", &hex),
            "X-Gitea-Event",
            ("X-Gitea-Signature", "00ff"),
        ),
        (
            "generic",
            ("X-Signature", &hex),
            "X-Generic-Unused",
            ("X-Signature", ""),
        ),
    ];
    for (provider, good, event_header, bad) in cases {
        let event = if provider == "gitlab" {
            "Push Hook"
        } else {
            "push"
        };
        let path = format!("/hooks/{provider}");
        let (code, body) = agent.request("POST", &path, &[good, (event_header, event)], push);
        assert_eq!(code, 202, "{provider}: {body}");
        let (code, _) = agent.request("POST", &path, &[bad, (event_header, event)], push);
        assert_eq!(code, 401, "{provider} with a bad signature");
        let (code, _) = agent.request("POST", &path, &[(event_header, event)], push);
        assert_eq!(code, 401, "{provider} with no signature");
    }
    // A body over the limit (4 KiB in these tests) is refused before anything reads it.
    let big = vec![b' '; 5000];
    let (code, _) = agent.request("POST", "/hooks/generic", &[("X-Signature", "00")], &big);
    assert_eq!(code, 413);
    assert_eq!(agent.request("POST", "/hooks/bitbucket", &[], b"{}").0, 404);
    // Only health answers without the token.
    assert_eq!(agent.request("POST", "/api/v1/reconcile", &[], b"").0, 401);
    assert_eq!(
        agent
            .request("GET", "/metrics", &[("Authorization", "Bearer wrong")], b"")
            .0,
        401
    );
    assert_eq!(agent.request("GET", "/healthz", &[], b"").0, 200);
    let (_, metrics) = agent.api("GET", "/metrics");
    for line in [
        "berth_webhook_requests_total{provider=\"gitlab\",result=\"accepted\"} 1",
        "berth_webhook_requests_total{provider=\"gitea\",result=\"unauthorized\"} 2",
        "berth_webhook_requests_total{provider=\"generic\",result=\"too_large\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    assert!(!agent.log().contains(WEBHOOK_SECRET), "{}", agent.log());
}

#[test]
fn under_systemd_ready_is_sent_once_the_first_pass_is_done() {
    let Some(instance) = engine() else { return };
    let (origin, daemon, first) = served_web(free_port());
    let sockets = tempfile::tempdir().unwrap();
    let path = sockets.path().join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut agent = Agent::start(&instance, &daemon.url(), "");
    // Restart it the way systemd starts a Type=notify service.
    agent.kill9();
    agent
        .env
        .push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    let logged_before = agent.log().len();
    agent.spawn();
    let mut message = [0u8; 256];
    let n = systemd.recv(&mut message).expect("a notification");
    let text = String::from_utf8_lossy(&message[..n]).into_owned();
    assert!(text.contains("READY=1"), "{text}");
    // The restarted agent's first pass ended before it said so. (Its status push may be retried
    // a moment later: the killed agent's push can still hold the branch on the server.)
    let log = agent.log();
    assert!(
        log[logged_before..].contains("pass done"),
        "READY=1 comes after the first pass:\n{log}"
    );
    agent.wait_for("the first pass's status", || applied(&origin, &first));
    let status = agent.terminate();
    assert!(status.success());
    let n = systemd.recv(&mut message).expect("a notification");
    assert!(String::from_utf8_lossy(&message[..n]).contains("STOPPING=1"));
}

/// Issue 8, item 4: after a rejected revision, drift correction rebuilds from the applied
/// revision's build context, not from the rejected one's files in the checkout.
#[test]
fn drift_correction_after_a_rejection_builds_from_the_applied_revision() {
    let Some(instance) = engine() else { return };
    let svc = "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: svc}\nspec:\n  build: {context: svc}\n";
    let origin = Origin::new(&[
        ("challenges/svc.yaml", svc),
        (
            "svc/Dockerfile",
            "FROM busybox:latest\nRUN echo good > /word\nCMD [\"sleep\", \"3600\"]\n",
        ),
    ]);
    let first = origin.bare_git(&["rev-parse", "main"]);
    let daemon = GitDaemon::start(&origin);
    let agent = Agent::start(&instance, &daemon.url(), "driftCheck: true\n");
    agent.wait_for("the first revision applied", || applied(&origin, &first));

    // A rejected revision that also changes the build context.
    let bad = origin.commit(
        &[
            (
                "challenges/svc.yaml",
                Some(&svc.replace("context: svc", "context: svc, nope: 1")),
            ),
            (
                "svc/Dockerfile",
                Some("FROM busybox:latest\nRUN echo rejected > /word\nCMD [\"sleep\", \"3600\"]\n"),
            ),
        ],
        "Break it",
    );
    agent.reconcile();
    agent.wait_for("the rejection recorded", || {
        origin
            .show("berth-status:status/agent.yaml")
            .is_some_and(|s| s.contains(&format!("lastAttemptedRevision: {bad}")))
    });
    // Someone removes the container and its image by hand; drift correction must rebuild.
    let filter = format!("label=berth.instance={}", instance.name);
    for id in docker(&["ps", "-aq", "--filter", &filter]).split_whitespace() {
        docker(&["rm", "-f", id]);
    }
    for id in docker(&["images", "-q", "--filter", &filter]).split_whitespace() {
        docker(&["rmi", "-f", id]);
    }
    agent.reconcile();
    agent.wait_for("the container made again", || {
        container_ids(&instance, "svc").len() == 1
    });
    let id = &container_ids(&instance, "svc")[0];
    let mut word = String::new();
    for _ in 0..50 {
        word = docker(&["exec", id, "cat", "/word"]);
        if !word.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(word, "good", "built from the applied revision");
}

/// Issue 8, item 9: a followed branch deleted on the server keeps what runs, and says so in
/// `/readyz`, in the committed status and in the log.
#[test]
fn a_deleted_branch_is_visible_and_what_runs_is_kept() {
    let Some(instance) = engine() else { return };
    let (origin, daemon, first) = served_web(free_port());
    let agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the first revision applied", || applied(&origin, &first));
    let running = container_ids(&instance, "web");

    origin.bare_git(&["update-ref", "-d", "refs/heads/main"]);
    agent.reconcile();
    agent.wait_for("the agent not ready", || {
        agent.request("GET", "/readyz", &[], b"").0 == 503
    });
    let ready = agent.request("GET", "/readyz", &[], b"");
    assert!(ready.1.contains("has no branch \"main\""), "{}", ready.1);
    agent.wait_for("the status says so", || {
        origin
            .show("berth-status:status/agent.yaml")
            .is_some_and(|s| s.contains("has no branch"))
    });
    assert!(agent.log().contains("the followed branch is gone"));
    assert_eq!(
        container_ids(&instance, "web"),
        running,
        "what runs is kept"
    );
}

/// Makes a file immutable (even to root) until dropped, so a checkout over it fails as a broken
/// disk or clone would.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: PathBuf) -> Immutable {
        let status = Command::new("chattr")
            .arg("+i")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "chattr +i {}", path.display());
        Immutable(path)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// Issue 9, item 4: a checkout that cannot be written is reported as such (`broken`, with what
/// to do), what runs is left alone, and it is not retried as a network error would be; once the
/// disk is fixed, the next trigger applies.
#[test]
fn a_checkout_that_cannot_be_written_is_broken_not_retried_and_what_runs_stays() {
    let Some(instance) = engine() else { return };
    let port = free_port();
    let (origin, daemon, first) = served_web(port);
    let agent = Agent::start(&instance, &daemon.url(), "");
    agent.wait_for("the first revision applied", || applied(&origin, &first));
    // Settled, so no requeued check is pending to start a pass of its own.
    agent.wait_for("the container healthy in status", || {
        origin
            .show("berth-status:status/challenge/web.yaml")
            .is_some_and(|s| s.contains("health: Healthy"))
    });
    let running = container_ids(&instance, "web");

    let file = agent.dir.path().join("state/repo/challenges/web.yaml");
    let guard = Immutable::set(file);
    let second = origin.commit(
        &[(
            "challenges/web.yaml",
            Some(&web("web", port, "  env: {STEP: \"2\"}\n")),
        )],
        "Step",
    );
    agent.reconcile();
    agent.wait_for("the broken checkout recorded", || {
        origin
            .show("berth-status:status/agent.yaml")
            .is_some_and(|s| s.contains("result: broken"))
    });
    let status = origin.show("berth-status:status/agent.yaml").unwrap();
    assert!(status.contains("cannot be written or read"), "{status}");
    assert!(status.contains("clone afresh"), "{status}");
    let (code, body) = agent.request("GET", "/readyz", &[], b"");
    assert_eq!(code, 503, "{body}");
    assert_eq!(container_ids(&instance, "web"), running, "what runs stays");
    // No backoff retries: the count of broken passes stays at one while nothing else happens.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(agent.passes("broken"), 1);

    drop(guard);
    agent.reconcile();
    agent.wait_for("the fix applied", || applied(&origin, &second));
    assert_ne!(container_ids(&instance, "web"), running);
}

#[test]
fn five_hundred_status_commits_leave_a_clone_of_few_packs_that_git_finds_whole() {
    use berth::config::{AgentConfig, Secrets};
    use berth::source::{MAX_PACKS, Source};
    let origin = Origin::new(&[("README.md", "a config repo\n")]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "instance: months\nrepo: {{url: {}, branch: main}}\nstateDir: {}/state\n",
            origin.bare().display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let config = AgentConfig::load(Some(&config)).unwrap();
    let source = Source::new(&config, &Secrets::read(&config).unwrap());
    source.fetch().unwrap();
    // Months of passes, each changing what status says. Two folders that hold the same file
    // are the same tree: each pass's pack must hold it once, or git refuses the pack.
    for pass in 0..500 {
        let files = std::collections::BTreeMap::from([
            (
                "status/challenge/web.yaml".to_string(),
                format!("pass: {pass}\n"),
            ),
            (
                "status/pipeline/same.yaml".to_string(),
                "same\n".to_string(),
            ),
            ("status/staging/same.yaml".to_string(), "same\n".to_string()),
        ]);
        source
            .publish_status(&files, &format!("status of pass {pass}"))
            .unwrap();
    }
    let clone = dir.path().join("state/repo");
    let packs = std::fs::read_dir(clone.join(".git/objects/pack"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
        .count();
    assert!(packs <= MAX_PACKS + 1, "{packs} packs after 500 passes");
    let fsck = Command::new("git")
        .args(["fsck", "--full", "--no-dangling"])
        .current_dir(&clone)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    assert_eq!(
        git(
            &clone,
            &[
                "show",
                "refs/remotes/origin/berth-status:status/challenge/web.yaml"
            ]
        ),
        "pass: 499"
    );
    assert_eq!(
        origin.bare_git(&["rev-list", "--count", "berth-status"]),
        "500"
    );
    assert_eq!(
        origin.bare_git(&["show", "berth-status:status/staging/same.yaml"]),
        "same"
    );
}

/// `berth status --repo ssh://…` fetches with the agent's own key and known_hosts
/// (`BERTH_REPO_SSH_KEY_FILE`, `BERTH_REPO_KNOWN_HOSTS_FILE`), against a real sshd; without a
/// known host it says that the host key is the trouble.
#[test]
fn status_over_ssh_takes_the_agents_key_and_known_hosts() {
    let Some(ssh) = crate::support::gitserver::GitSsh::start() else {
        return;
    };
    let origin = Origin::new(&[(
        "web.yaml",
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: web}\nspec: {image: busybox:latest}\n",
    )]);
    let url = ssh.url(&origin.bare());
    let status = |env: &[(&str, &std::path::Path)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_berth"));
        command.args(["status", "--repo", &url]);
        for (var, value) in env {
            command.env(var, value);
        }
        command.output().unwrap()
    };
    let key = ssh.key();
    let known = ssh.known_hosts();
    let output = status(&[
        ("BERTH_REPO_SSH_KEY_FILE", &key),
        ("BERTH_REPO_KNOWN_HOSTS_FILE", &known),
    ]);
    let said = String::from_utf8_lossy(&output.stderr).to_string();
    // The fetch got through: the repo simply has no status branch yet.
    assert!(
        said.contains("no status found in branch berth-status"),
        "{said}"
    );
    let empty = tempfile::NamedTempFile::new().unwrap();
    let output = status(&[
        ("BERTH_REPO_SSH_KEY_FILE", &key),
        ("BERTH_REPO_KNOWN_HOSTS_FILE", empty.path()),
    ]);
    let said = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!output.status.success());
    assert!(
        said.contains("the server's SSH host key is not in")
            && said.contains("repo.auth.knownHostsFile"),
        "{said}"
    );
    // The login name is no secret: the URL shows it.
    assert!(said.contains(&url), "{said}");
    // A key the server does not know: refused, and the user it was refused for is named.
    let stranger = tempfile::tempdir().unwrap();
    let other = stranger.path().join("other_key");
    assert!(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&other)
            .status()
            .unwrap()
            .success()
    );
    let output = status(&[
        ("BERTH_REPO_SSH_KEY_FILE", &other),
        ("BERTH_REPO_KNOWN_HOSTS_FILE", &known),
    ]);
    let said = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!output.status.success());
    assert!(
        said.contains("refused the SSH key") && said.contains("for user"),
        "{said}"
    );
}
