//! `berth run`: a pipeline run in the foreground against the real Docker Engine: the workspace
//! copied into a volume, the steps as execs in one container, the log streamed with secrets
//! masked and capped, the timeout, the produced image, and a source cloned from a real git
//! repository. Each test is its own instance; its images and containers go when it ends.

use crate::support::engine::{docker, engine};
use crate::support::gitserver::Origin;
use crate::support::util::{Repo, stdout};

fn pipeline(name: &str, extra: &str, steps: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {{name: {name}}}\nspec:\n  image: busybox:latest\n{extra}  steps:\n{steps}"
    )
}

/// What a challenge serves on host port `port`, trimmed; empty when nothing answers.
fn served(port: u16) -> String {
    let output = std::process::Command::new("curl")
        .args(["-s", "-m", "3", &format!("http://127.0.0.1:{port}/")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn a_run_streams_its_steps_masks_secrets_and_produces_a_labelled_image() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    let image = format!("{}-app", instance.name);
    repo.write(
        "app.yaml",
        pipeline(
            "app",
            &format!("  context: src\n  secretEnv: {{TOKEN: {{env: BERTH_IT_FLAG}}}}\n  produces: \"{image}:{{commit}}\"\n"),
            "    - {name: test, run: \"echo token=$TOKEN; test -f main.sh\"}\n    - {name: package, run: \"echo built > out.txt\"}\n",
        ),
    )
    .write("src/main.sh", "echo hi\n")
    .write("src/Dockerfile", "FROM busybox:latest\nCOPY out.txt /out.txt\nCMD [\"cat\", \"/out.txt\"]\n");
    let output = instance.berth("run", &repo, &["app"]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("== step test\ntoken=***\n"), "{text}");
    assert!(
        !text.contains("it-secret"),
        "the secret value was shown:\n{text}"
    );
    assert!(text.contains("step package: exit code 0"), "{text}");
    assert!(
        text.contains("succeeded in") && text.contains(&format!("produced {image}:local")),
        "{text}"
    );
    // The image holds what the steps made, and carries the ownership labels.
    assert_eq!(docker(&["run", "--rm", &format!("{image}:local")]), "built");
    let labels = docker(&[
        "image",
        "inspect",
        &format!("{image}:local"),
        "--format",
        "{{index .Config.Labels \"berth.name\"}} {{index .Config.Labels \"berth.kind\"}}",
    ]);
    assert_eq!(labels, "app Pipeline");
    // Nothing of the run is left: no container, no volume.
    let filter = format!("label=berth.instance={}", instance.name);
    assert_eq!(docker(&["ps", "-aq", "--filter", &filter]), "");
    assert_eq!(docker(&["volume", "ls", "-q", "--filter", &filter]), "");
}

#[test]
fn a_failing_step_stops_the_run_with_its_exit_code() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write(
        "p.yaml",
        pipeline(
            "fails",
            "",
            "    - {name: test, run: \"echo checking; exit 3\"}\n    - {name: never, run: \"echo SHOULD-NOT-RUN\"}\n",
        ),
    );
    let output = instance.berth("run", &repo, &["fails"]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("== step test exited with code 3"), "{text}");
    assert!(text.contains("failed at step test (exit code 3)"), "{text}");
    assert!(
        !text.contains("SHOULD-NOT-RUN") && !text.contains("step never"),
        "{text}"
    );
}

#[test]
fn a_run_past_its_timeout_is_killed() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write(
        "p.yaml",
        pipeline(
            "slow",
            "  timeout: 2s\n",
            "    - {name: wait, run: \"echo started; sleep 60\"}\n",
        ),
    );
    let started = std::time::Instant::now();
    let output = instance.berth("run", &repo, &["slow"]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "not killed: {text}"
    );
    assert!(
        text.contains("timed out after 2s (its timeout); the container was killed"),
        "{text}"
    );
    assert!(text.contains("step wait: killed"), "{text}");
}

#[test]
fn a_long_log_keeps_its_head_and_tail() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write(
        "p.yaml",
        pipeline("loud", "", "    - {name: talk, run: \"seq 1 100000\"}\n"),
    );
    let log = tempfile::NamedTempFile::new().unwrap();
    let output = instance.berth(
        "run",
        &repo,
        &[
            "loud",
            "--log-cap",
            "8192",
            "--log-file",
            log.path().to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "{}", stdout(&output));
    let kept = std::fs::read_to_string(log.path()).unwrap();
    assert!(kept.len() < 9000, "{} bytes kept", kept.len());
    assert!(kept.starts_with("== step talk\n1\n2\n3\n"), "{kept:.200}");
    assert!(
        kept.ends_with("99999\n100000\n"),
        "…{}",
        &kept[kept.len() - 100..]
    );
    assert!(kept.contains("bytes of output dropped here"));
}

#[test]
fn a_source_repository_is_cloned_at_the_commit_asked_for() {
    let Some(instance) = engine() else { return };
    let origin = Origin::new(&[("VERSION", "one\n")]);
    let first = origin.bare_git(&["rev-parse", "main"]);
    origin.commit(&[("VERSION", Some("two\n"))], "Two");
    let repo = Repo::new();
    repo.write(
        "p.yaml",
        pipeline(
            "versioned",
            &format!(
                "  source: {{url: \"file://{}\", ref: main}}\n",
                origin.bare().display()
            ),
            "    - {name: show, run: \"cat VERSION; test ! -e .git\"}\n",
        ),
    );
    let latest = instance.berth("run", &repo, &["versioned"]);
    assert!(latest.status.success(), "{}", stdout(&latest));
    assert!(
        stdout(&latest).contains("== step show\ntwo\n"),
        "{}",
        stdout(&latest)
    );
    let older = instance.berth("run", &repo, &["versioned", "--commit", &first]);
    assert!(older.status.success(), "{}", stdout(&older));
    assert!(
        stdout(&older).contains("== step show\none\n"),
        "{}",
        stdout(&older)
    );
    assert!(
        stdout(&older).contains(&format!("at {}", &first[..12])),
        "{}",
        stdout(&older)
    );
}

#[test]
fn apply_runs_a_pipeline_and_rolls_what_uses_its_image_in_the_same_pass() {
    let Some(instance) = engine() else { return };
    let port = crate::support::net::free_port();
    let repo = Repo::new();
    let image = format!("{}-site", instance.name);
    repo.write(
        "site.yaml",
        pipeline(
            "site",
            &format!("  context: site\n  produces: \"{image}:{{commit}}\"\n"),
            "    - {name: render, run: \"mkdir -p www && cat page.txt > www/index.html\"}\n",
        ),
    )
    .write("site/page.txt", "version one\n")
    .write(
        "site/Dockerfile",
        "FROM busybox:latest\nCOPY www /www\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .write(
        "web.yaml",
        format!(
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: web}}\nspec:\n  image: {{fromPipeline: site}}\n  ports: [{{container: 8080, host: {port}}}]\n"
        ),
    );
    let fetch = || served(port);
    let first = instance.berth("apply", &repo, &["--wait", "30s"]);
    let text = stdout(&first);
    assert!(first.status.success(), "{text}");
    assert!(text.contains("Pipeline/site  create  done"), "{text}");
    assert!(text.contains("Challenge/web  create  done"), "{text}");
    // Regression: the pipeline was counted both created and, after the second round, unchanged.
    assert!(
        text.contains(
            "applied: 2 created, 0 updated, 0 deleted, 0 started, 0 stopped, 0 unchanged"
        ),
        "{text}"
    );
    assert_eq!(fetch(), "version one");
    // A change in the pipeline's folder runs it again, and the challenge follows in one apply.
    repo.write("site/page.txt", "version two\n");
    let plan = stdout(&instance.berth("plan", &repo, &[]));
    assert!(plan.contains("Pipeline/site  update"), "{plan}");
    let second = instance.berth("apply", &repo, &["--wait", "30s"]);
    let text = stdout(&second);
    assert!(second.status.success(), "{text}");
    assert!(text.contains("Challenge/web  update  done"), "{text}");
    assert_eq!(fetch(), "version two");
    let settled = stdout(&instance.berth("plan", &repo, &[]));
    assert!(settled.contains("2 unchanged"), "{settled}");
    // Old products are collected: the newest three are kept.
    for version in ["three", "four"] {
        repo.write("site/page.txt", format!("version {version}\n"));
        let applied = instance.berth("apply", &repo, &["--wait", "30s"]);
        assert!(applied.status.success(), "{}", stdout(&applied));
    }
    assert_eq!(fetch(), "version four");
    let filter = format!("label=berth.instance={}", instance.name);
    let images = docker(&[
        "images",
        "-q",
        "--filter",
        &filter,
        "--filter",
        "label=berth.name=site",
    ]);
    assert_eq!(images.lines().count(), 3, "{images}");
}

/// An admin bot as CTFs run one: a sidecar whose image a Pipeline builds. The challenge waits
/// for the bot's first image, runs it beside the main container, and rolls when the bot is
/// built again.
#[test]
fn a_sidecar_runs_the_image_a_pipeline_produced_and_rolls_when_it_is_built_again() {
    let Some(instance) = engine() else { return };
    let port = crate::support::net::free_port();
    let repo = Repo::new();
    repo.write(
        "bot.yaml",
        pipeline(
            "bot",
            &format!("  context: bot\n  produces: \"{}-bot:{{commit}}\"\n", instance.name),
            "    - {name: render, run: \"mkdir -p www && cat page.txt > www/index.html\"}\n",
        ),
    )
    .write("bot/page.txt", "bot one\n")
    .write("bot/Dockerfile", "FROM busybox:latest\nCOPY www /www\n")
    .write(
        "web.yaml",
        format!(
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: web}}\nspec:\n  image: busybox:latest\n  command: [httpd, -f, -p, \"8080\", -h, /www]\n  sidecars:\n    - name: admin\n      image: {{fromPipeline: bot}}\n      command: [httpd, -f, -p, \"8081\", -h, /www]\n      ports: [{{container: 8081, host: {port}}}]\n"
        ),
    );
    let fetch = || served(port);
    let plan = stdout(&instance.berth("plan", &repo, &[]));
    assert!(
        plan.contains("waits for Pipeline/bot to produce an image"),
        "{plan}"
    );
    let first = instance.berth("apply", &repo, &["--wait", "30s"]);
    let text = stdout(&first);
    assert!(first.status.success(), "{text}");
    assert!(text.contains("Challenge/web  create  done"), "{text}");
    assert_eq!(fetch(), "bot one");

    repo.write("bot/page.txt", "bot two\n");
    let second = instance.berth("apply", &repo, &["--wait", "30s"]);
    let text = stdout(&second);
    assert!(second.status.success(), "{text}");
    assert!(text.contains("Challenge/web  update  done"), "{text}");
    assert_eq!(fetch(), "bot two");
    let settled = stdout(&instance.berth("plan", &repo, &[]));
    assert!(settled.contains("2 unchanged"), "{settled}");
}

/// Hostile findings: a secret reached the summary through a failed build's last lines; a
/// context could leave a cloned source for the host's files; a run could take over an image
/// berth did not make.
#[test]
fn a_run_keeps_secrets_the_host_and_foreign_images_out_of_reach() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write(
        "leak.yaml",
        pipeline(
            "leak",
            &format!("  context: src\n  secretEnv: {{TOKEN: {{env: BERTH_IT_FLAG}}}}\n  produces: \"{}-leak:{{commit}}\"\n", instance.name),
            "    - {name: keep, run: \"echo $TOKEN > tok.txt\"}\n",
        ),
    )
    .write("src/Dockerfile", "FROM busybox:latest\nCOPY . /w\nRUN cat /w/tok.txt; exit 7\n");
    let output = instance.berth("run", &repo, &["leak"]);
    let text = format!(
        "{}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("error: build of the workspace"), "{text}");
    assert!(!text.contains("it-secret"), "the secret was shown:\n{text}");

    let origin = Origin::new(&[("README", "source\n")]);
    repo.write(
        "escape.yaml",
        pipeline(
            "escape",
            &format!(
                "  source: {{url: \"file://{}\", ref: main}}\n  context: ../../../../etc\n",
                origin.bare().display()
            ),
            "    - {name: look, run: \"ls\"}\n",
        ),
    );
    let output = instance.berth("run", &repo, &["escape"]);
    let text = format!(
        "{}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("spec.context:") && text.contains("leaves the repo"),
        "{text}"
    );

    repo.write(
        "taker.yaml",
        pipeline(
            "taker",
            "  produces: \"busybox:latest\"\n",
            "    - {name: noop, run: \"true\"}\n",
        ),
    );
    let before = docker(&["image", "inspect", "busybox:latest", "--format", "{{.Id}}"]);
    let output = instance.berth("run", &repo, &["taker"]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("image busybox:latest exists and was not produced by berth"),
        "{text}"
    );
    assert_eq!(
        docker(&["image", "inspect", "busybox:latest", "--format", "{{.Id}}"]),
        before
    );
}

#[test]
fn steps_run_in_an_image_built_from_a_folder_of_the_repo() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write(
        "p.yaml",
        "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {name: tooled}\nspec:\n  context: src\n  image: {build: {context: tools}}\n  steps:\n    - {name: use-tool, run: \"greet\"}\n",
    )
    .write("src/README", "x\n")
    .write(
        "tools/Dockerfile",
        "FROM busybox:latest\nCOPY greet /bin/greet\nRUN chmod +x /bin/greet\n",
    )
    .write("tools/greet", "#!/bin/sh\necho hello from the tool image\n");
    for attempt in ["built", "found by its context's digest"] {
        let output = instance.berth("run", &repo, &["tooled"]);
        let text = stdout(&output);
        assert!(output.status.success(), "{attempt}: {text}");
        assert!(
            text.contains("== step use-tool\nhello from the tool image\n"),
            "{attempt}: {text}"
        );
    }
    let step_images = || {
        let filter = format!("label=berth.instance={}", instance.name);
        docker(&[
            "images",
            "-q",
            "--filter",
            &filter,
            "--filter",
            "label=berth.step-image=tooled",
        ])
    };
    let images = step_images();
    assert_eq!(images.lines().count(), 1, "built once: {images}");
    // A changed folder builds a new step image, and the old one goes.
    repo.write(
        "tools/greet",
        "#!/bin/sh\necho hello from the new tool image\n",
    );
    let output = instance.berth("run", &repo, &["tooled"]);
    assert!(
        stdout(&output).contains("hello from the new tool image"),
        "{}",
        stdout(&output)
    );
    let images = step_images();
    assert_eq!(
        images.lines().count(),
        1,
        "the old step image was kept: {images}"
    );
}

/// Issue 18: `berth run` printed a step's escape sequences raw, so the viewer's terminal obeyed
/// them (OSC 52 writes the clipboard, CSI clears the screen). They are shown escaped now, in the
/// foreground and in the kept log alike.
#[test]
fn a_steps_escape_sequences_are_shown_escaped_never_obeyed() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write(
        "noisy.yaml",
        pipeline(
            "noisy",
            "  context: .\n",
            "    - {name: paint, run: \"printf '\\\\033]52;c;ZXZpbA==\\\\007\\\\033[2Jcleared\\\\r\\\\n\\\\342\\\\200\\\\256rtl\\\\n'\"}\n",
        ),
    );
    let output = instance.berth("run", &repo, &["noisy"]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        !output.stdout.contains(&0x1b) && !output.stdout.contains(&b'\r'),
        "a control character reached the terminal: {text:?}"
    );
    assert!(
        text.contains("\\x1b]52;c;ZXZpbA==\\x07\\x1b[2Jcleared\\r\n\\u{202e}rtl"),
        "{text}"
    );
}

/// `pipelines.workspaceLimit` bounds what a run writes to disk, however it writes it: a source
/// over the limit never starts; a step that fills the workspace volume, or its container's own
/// layer, fast and ends, or slowly and keeps going, fails the run with the limit named.
#[test]
fn a_run_that_writes_past_the_workspace_limit_fails_saying_so() {
    let Some(instance) = engine() else { return };
    let repo = Repo::new();
    repo.write("src/big.bin", vec![7u8; 3 << 20])
        .write("work/readme.txt", "small\n")
        .write(
            "large.yaml",
            pipeline(
                "large",
                "  context: src\n",
                "    - {name: never, run: \"echo SHOULD-NOT-RUN\"}\n",
            ),
        )
        .write(
            "volume.yaml",
            pipeline(
                "volume",
                "  context: work\n",
                "    - {name: fill, run: \"dd if=/dev/zero of=filler bs=1048576 count=24\"}\n    - {name: never, run: \"echo SHOULD-NOT-RUN\"}\n",
            ),
        )
        .write(
            "layer.yaml",
            pipeline(
                "layer",
                "  context: work\n",
                "    - {name: fill, run: \"dd if=/dev/zero of=/filler bs=1048576 count=24\"}\n",
            ),
        )
        .write("stepimg/Dockerfile", "FROM busybox:latest\nVOLUME /data\n")
        .write(
            "declared.yaml",
            "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {name: declared}\nspec:\n  image: {build: {context: stepimg}}\n  context: work\n  steps:\n    - {name: fill, run: \"dd if=/dev/zero of=/data/filler bs=1048576 count=24\"}\n",
        )
        .write(
            "slow.yaml",
            pipeline(
                "slow",
                "  context: work\n  timeout: 90s\n",
                "    - {name: fill, run: \"dd if=/dev/zero of=filler bs=1048576 count=24; echo written; sleep 80\"}\n",
            ),
        );
    let limit = ["--workspace-limit", "2Mi"];
    let output = instance.berth("run", &repo, &[&["large"][..], &limit].concat());
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("holds 3.0 MiB, over pipelines.workspaceLimit (2.0 MiB)"),
        "{text}"
    );
    assert!(!text.contains("SHOULD-NOT-RUN"), "{text}");
    // The workspace, the container's own layer, a `VOLUME` its image declares; fast or slow.
    for pipeline in ["volume", "layer", "declared", "slow"] {
        let output = instance.berth("run", &repo, &[&[pipeline][..], &limit].concat());
        let text = stdout(&output);
        assert_eq!(output.status.code(), Some(1), "{pipeline}: {text}");
        assert!(
            text.contains("to disk, over pipelines.workspaceLimit (2.0 MiB): killed"),
            "{pipeline}: {text}"
        );
        assert!(
            !text.contains("SHOULD-NOT-RUN") && !text.contains("timed out"),
            "{pipeline}: {text}"
        );
    }
    // Nothing of the runs is left: no container (the meters too), no volume.
    let filter = format!("label=berth.instance={}", instance.name);
    assert_eq!(docker(&["ps", "-aq", "--filter", &filter]), "");
    assert_eq!(docker(&["volume", "ls", "-q", "--filter", &filter]), "");
}
