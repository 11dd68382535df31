//! The loader against every failure mode it promises to report, each at its exact place.

use berth::descriptor::{self, LoadOptions, Problem};

use crate::support::util::{Repo, challenge, crate_root, fixture};

fn problems_of(dir: &std::path::Path, options: &LoadOptions) -> Vec<Problem> {
    descriptor::load(dir, options).expect("loads").problems
}

/// `(fixture, file, line, column, words the message must contain)`: one case per failure mode,
/// and each fixture has exactly this one problem.
const CASES: &[(&str, &str, usize, usize, &[&str])] = &[
    (
        "unknown-field",
        "c.yaml",
        6,
        3,
        &[
            "unknown field \"prots\"",
            "expected one of:",
            "ports",
            "env",
        ],
    ),
    (
        "wrong-type",
        "c.yaml",
        8,
        13,
        &["spec.ports[0].host: \"abc\" is not an integer"],
    ),
    (
        "bad-duration",
        "c.yaml",
        6,
        36,
        &[
            "spec.healthcheck.interval",
            "\"10 minutes\" is not a duration",
            "30s",
        ],
    ),
    (
        "bad-size",
        "c.yaml",
        7,
        13,
        &["spec.resources.memory", "\"64MB\" is not a size", "256Mi"],
    ),
    (
        "bad-name",
        "c.yaml",
        4,
        9,
        &[
            "metadata.name",
            "\"Web_101\" is not a valid name",
            "DNS-1123",
        ],
    ),
    (
        "bad-cron",
        "p.yaml",
        7,
        15,
        &["spec.triggers.schedule", "6 fields, expected 5"],
    ),
    (
        "kube-challenge-port-outside-node-range",
        "c.yaml",
        7,
        33,
        &[
            "spec.ports[0].host: 8080 is outside the cluster's NodePort range 30000-32767",
            "expose the port with a LoadBalancer Service or an Ingress",
        ],
    ),
    (
        "kube-challenge-one-shot",
        "c.yaml",
        7,
        12,
        &["spec.restart: a challenge on kubernetes is a Deployment"],
    ),
    (
        "push-without-source",
        "p.yaml",
        7,
        11,
        &["spec.triggers.push", "use onChange: true"],
    ),
    (
        "bad-port",
        "c.yaml",
        7,
        29,
        &["spec.ports[0].host: 70000 is not a port; expected 1 to 65535"],
    ),
    (
        "inline-secret",
        "c.yaml",
        7,
        11,
        &[
            "spec.secretEnv.FLAG",
            "must not be written inline",
            "{file: PATH} or {env: NAME}",
        ],
    ),
    (
        "duplicate-name",
        "b.yaml",
        5,
        9,
        &["duplicate Challenge/web", "also defined at a.yaml:3:18"],
    ),
    (
        "missing-dependency",
        "c.yaml",
        5,
        15,
        &["metadata.dependsOn[0]", "Challenge/db does not exist"],
    ),
    (
        "missing-pipeline",
        "c.yaml",
        5,
        25,
        &[
            "spec.image.fromPipeline",
            "Pipeline/web-image does not exist",
        ],
    ),
    (
        "missing-sidecar-pipeline",
        "c.yaml",
        8,
        29,
        &[
            "spec.sidecars[0].image.fromPipeline",
            "Pipeline/admin-bot does not exist",
        ],
    ),
    (
        "dependency-cycle",
        "c.yaml",
        12,
        15,
        &["dependency cycle: Challenge/a → Challenge/b → Challenge/a"],
    ),
    (
        "staging-shared-namespace",
        "s.yaml",
        9,
        19,
        &[
            "spec.namespace: shared is also the namespace of Staging/a",
            "at s.yaml:4:19",
        ],
    ),
    (
        // Issue 19, item 15: a value that would add a key (or a document) is refused at the
        // variable that carried it.
        "manifest-value-changes-shape",
        "m/settings.yaml",
        6,
        18,
        &["the value of ${overrides.GREETING} changes the manifest's shape"],
    ),
    (
        "duplicate-step-name",
        "build.yaml",
        10,
        13,
        &["spec.steps[2].name: \"test\" is also the name of spec.steps[0]"],
    ),
    (
        // Refused here rather than looked up on the network at run time.
        "malformed-source-url",
        "build.yaml",
        6,
        10,
        &["spec.source.url: ", "is not a clone URL"],
    ),
    (
        "image-name-too-long",
        "web.yaml",
        5,
        10,
        &["spec.image: the image name is", "at most 255"],
    ),
    (
        "node-port-clash",
        "web.yaml",
        9,
        31,
        &["is a NodePort, and Service/shop of Staging/shop (shop/svc.yaml:1) asks for it too"],
    ),
    (
        "manifest-undefined-variable",
        "m/c.yaml",
        6,
        9,
        &["${overrides.HOSTNAME} is not defined; add HOSTNAME to spec.overrides.app"],
    ),
    (
        // Hostile finding: the 150 documents, first read as descriptors, used up the file's
        // problem count, so the typo was dropped, the staging vanished and prune deleted it.
        "manifest-problem-after-many-documents",
        "m/all.yaml",
        749,
        12,
        &["${overrides.TYPO} is not defined"],
    ),
    (
        "host-port-clash",
        "c.yaml",
        14,
        31,
        &["host port 10001/tcp is also claimed by Challenge/a at c.yaml:6:33"],
    ),
    (
        "context-outside",
        "c.yaml",
        5,
        20,
        &["spec.build.context", "\"../elsewhere\" leaves the repo"],
    ),
    (
        "context-missing",
        "c.yaml",
        6,
        14,
        &[
            "spec.build.context",
            "folder \"challenges/web\" does not exist",
        ],
    ),
    (
        "manifests-absolute",
        "s.yaml",
        7,
        14,
        &["spec.manifests", "\"/etc/kubernetes\" is an absolute path"],
    ),
    (
        "unknown-kind",
        "d.yaml",
        2,
        7,
        &[
            "unknown kind \"Deployment\"",
            "expected one of: Challenge, Pipeline, Staging",
        ],
    ),
    (
        "unknown-api-version",
        "c.yaml",
        1,
        13,
        &["unknown apiVersion \"berth/v2\"", "expected \"berth/v1\""],
    ),
    ("yaml-syntax", "c.yaml", 6, 8, &["YAML syntax error"]),
    (
        "duplicate-key",
        "c.yaml",
        6,
        3,
        &["duplicate key \"image\" (first at line 5)"],
    ),
    (
        "missing-field",
        "s.yaml",
        5,
        3,
        &["spec: missing required field \"namespace\""],
    ),
    ("not-utf8", "c.yaml", 6, 22, &["not valid UTF-8"]),
    ("alias-bomb", "c.yaml", 11, 12, &["alias bomb"]),
    (
        "deep-nesting",
        "c.yaml",
        69,
        129,
        &["nesting is deeper than 64 levels"],
    ),
    (
        "not-a-mapping",
        "c.yaml",
        1,
        1,
        &["a descriptor must be a mapping"],
    ),
    (
        "context-holds-descriptors",
        "challenges/web.yaml",
        6,
        14,
        &[
            "spec.build.context: build context \"challenges\" holds descriptor challenges/web.yaml",
            "move the build files to a folder of their own",
        ],
    ),
    (
        "manifests-hold-descriptor",
        "stagings/shop.yaml",
        7,
        14,
        &[
            "spec.manifests: manifests folder \"stagings/deploy\" holds descriptor stagings/deploy/web.yaml",
            "move the manifests to a folder of their own",
        ],
    ),
    (
        "bad-env-name",
        "c.yaml",
        8,
        5,
        &[
            "spec.env: \"PATH=/evil:/bin\" is not a valid name",
            "letters, digits and _, not starting with a digit",
        ],
    ),
    (
        "memory-below-engine-minimum",
        "c.yaml",
        7,
        13,
        &[
            "spec.resources.memory: \"1k\" is below the smallest memory limit the engine accepts",
            "write at least 6Mi",
        ],
    ),
    (
        "size-overflow",
        "c.yaml",
        7,
        13,
        &[
            "spec.resources.memory: \"99999999999999999999Gi\" is too large",
            "the largest size is 8388607Ti",
        ],
    ),
    (
        "secret-map-value",
        "c.yaml",
        7,
        18,
        &[
            "spec.secretEnv.FLAG: a secret value must not be written inline",
            "is not shown",
            "{file: PATH} or {env: NAME}",
        ],
    ),
    (
        "too-many-documents",
        "c.yaml",
        1001,
        1,
        &["more than 1000 documents in one file; split it into smaller files"],
    ),
];

#[test]
fn every_fixture_reports_its_one_problem_at_its_place() {
    let mut failures = Vec::new();
    for (case, file, line, column, words) in CASES {
        let problems = problems_of(
            &fixture(&format!("invalid/{case}")),
            &LoadOptions::default(),
        );
        let ok = problems.len() == 1
            && !problems[0].message.contains("do-not-echo-me")
            && problems[0].file == *file
            && (problems[0].line, problems[0].column) == (*line, *column)
            && words.iter().all(|w| problems[0].message.contains(w));
        if !ok {
            failures.push(format!(
                "{case}: expected {file}:{line}:{column} with {words:?}, got {problems:#?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_failure_mode_has_a_fixture_and_a_case() {
    let mut folders: Vec<String> = std::fs::read_dir(fixture("invalid"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    // file-too-large is checked with a small limit in its own test.
    let mut cases: Vec<String> = CASES
        .iter()
        .map(|c| c.0.to_string())
        .chain(["file-too-large".to_string()])
        .collect();
    cases.sort();
    assert_eq!(folders, cases);
}

#[test]
fn a_file_over_the_size_limit_is_one_problem() {
    let problems = problems_of(
        &fixture("invalid/file-too-large"),
        &LoadOptions {
            max_file_size: 2048,
            ..LoadOptions::default()
        },
    );
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(
        (
            problems[0].file.as_str(),
            problems[0].line,
            problems[0].column
        ),
        ("big.yaml", 1, 1)
    );
    assert!(
        problems[0].message.contains("larger than the 2 KiB limit"),
        "{}",
        problems[0].message
    );
    assert!(problems_of(&fixture("invalid/file-too-large"), &LoadOptions::default()).is_empty());
}

#[test]
fn the_sample_repo_is_valid() {
    let loaded =
        descriptor::load(&crate_root().join("sample-repo"), &LoadOptions::default()).unwrap();
    assert_eq!(loaded.problems, vec![]);
    assert_eq!(
        loaded.summary(),
        "8 descriptors valid (4 Challenge, 2 Pipeline, 2 Staging)"
    );
}

#[test]
fn a_symlink_out_of_the_repo_is_refused() {
    let outside = Repo::new();
    outside.write("secret.yaml", challenge("leak", ""));
    let repo = Repo::new();
    repo.write("ok.yaml", challenge("ok", ""))
        .symlink("linked.yaml", outside.path().join("secret.yaml"));
    let problems = problems_of(repo.path(), &LoadOptions::default());
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(
        (problems[0].file.as_str(), problems[0].line),
        ("linked.yaml", 1)
    );
    assert!(
        problems[0]
            .message
            .contains("symlink points outside the repo")
    );
}

#[test]
fn symlink_loops_are_reported_not_followed() {
    let repo = Repo::new();
    repo.write("ok.yaml", challenge("ok", ""))
        .symlink("a.yaml", "b.yaml")
        .symlink("b.yaml", "a.yaml")
        .symlink("nested/back", "..");
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let summary: Vec<(String, bool)> = problems
        .iter()
        .map(|p| (p.file.clone(), p.message.starts_with("symlink loop")))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a.yaml".into(), true),
            ("b.yaml".into(), true),
            ("nested/back".into(), true)
        ]
    );
}

#[test]
fn a_build_context_through_a_symlink_out_of_the_repo_is_refused() {
    let outside = Repo::new();
    outside.write("Dockerfile", "FROM busybox");
    let repo = Repo::new();
    repo.symlink("ctx", outside.path())
        .write("c.yaml", "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: web}\nspec:\n  build: {context: ctx}\n");
    let problems = problems_of(repo.path(), &LoadOptions::default());
    assert!(
        problems.iter().any(|p| p.file == "c.yaml"
            && p.line == 5
            && p.message
                .contains("\"ctx\" is a symlink that points outside the repo")),
        "{problems:#?}"
    );
}

#[test]
fn every_problem_is_reported_at_once_sorted_by_file_and_line() {
    let repo = Repo::new();
    repo.write("b.yaml", challenge("b", "  prots: []\n  replicas: many\n"))
        .write("a.yaml", challenge("a", "  ports: [{container: 0}]\n"))
        .write("c.yaml", "kind: Challenge\n");
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let places: Vec<(&str, usize)> = problems.iter().map(|p| (p.file.as_str(), p.line)).collect();
    assert_eq!(
        places,
        vec![
            ("a.yaml", 7),
            ("b.yaml", 7),
            ("b.yaml", 8),
            ("c.yaml", 1),
            ("c.yaml", 1),
            ("c.yaml", 1)
        ]
    );
    assert!(
        problems[3..]
            .iter()
            .any(|p| p.message.contains("missing required field \"apiVersion\""))
    );
}

#[test]
fn berthignore_and_asset_folders_are_not_read_as_descriptors() {
    let repo = Repo::new();
    repo.write(".berthignore", "drafts/\n")
        .write("drafts/broken.yaml", "{ not yaml")
        .write(
            "deploy/app/deployment.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\n",
        )
        .write(
            "s.yaml",
            "apiVersion: berth/v1\nkind: Staging\nmetadata: {name: s}\nspec: {namespace: s, tag: v1, manifests: deploy/app}\n",
        )
        .write("empty.yml", "---\n---\n");
    let loaded = descriptor::load(repo.path(), &LoadOptions::default()).unwrap();
    assert_eq!(loaded.problems, vec![]);
    assert_eq!(
        loaded.summary(),
        "1 descriptor valid (0 Challenge, 0 Pipeline, 1 Staging)"
    );
}

#[test]
fn spec_hashes_follow_the_build_context() {
    let repo = Repo::new();
    repo.write("web/Dockerfile", "FROM busybox:latest\n")
        .write("web/index.html", "v1")
        .write("c.yaml", "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: web}\nspec:\n  build: {context: web}\n");
    let hash = || {
        descriptor::load(repo.path(), &LoadOptions::default())
            .unwrap()
            .descriptors[0]
            .spec_hash
            .clone()
    };
    let first = hash();
    assert_eq!(hash(), first, "unchanged context, unchanged hash");
    repo.write("web/index.html", "v2");
    assert_ne!(
        hash(),
        first,
        "a changed file in the context changes the hash"
    );
}

/// Found by fuzzing: a file with lone CR line breaks. YAML (and editors) count a lone CR as a
/// line break, so positions must too, including the position of a UTF-8 error.
#[test]
fn lone_carriage_returns_count_as_line_breaks() {
    let repo = Repo::new();
    repo.write("cr.yaml", b"apiVersion: berth/v1\rkind: Challenge\rmetadata: {name: web}\rspec:\r  image: busybox\r  prots: []\r".as_slice())
        .write("bad.yaml", b"a: 1\r\nb: 2\rc: \"\xe9\"\n".as_slice());
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let places: Vec<(&str, usize, usize)> = problems
        .iter()
        .map(|p| (p.file.as_str(), p.line, p.column))
        .collect();
    assert_eq!(
        places,
        vec![("bad.yaml", 3, 5), ("cr.yaml", 6, 3)],
        "{problems:#?}"
    );
}

/// `(file, line, column, message)` of each problem, for exact comparisons.
fn places(problems: &[Problem]) -> Vec<(String, usize, usize, String)> {
    problems
        .iter()
        .map(|p| (p.file.clone(), p.line, p.column, p.message.clone()))
        .collect()
}

/// Issue 8, item 1: a build context that covered the folder of descriptors made the loader skip
/// every descriptor in it, silently: `0 descriptors valid`, and prune deleted what they describe.
/// Now a file that looks like a descriptor is always read, whatever its case, its YAML or its
/// missing `apiVersion`, and the folder's path is the problem; other YAML stays an asset.
#[test]
fn descriptors_inside_asset_folders_are_read_and_reported() {
    let repo = Repo::new();
    repo.write("challenges/Dockerfile", "FROM busybox:latest\n")
        .write("challenges/web.yaml", challenge("web", ""))
        .write("challenges/UPPER.YAML", challenge("upper", ""))
        .write(
            "challenges/broken.yaml",
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: broken\n",
        )
        .write("challenges/kind-only.yaml", "kind: Challenge\nmetadata: {name: k}\nspec: {image: busybox}\n")
        .write("challenges/compose.yaml", "services: {web: {image: busybox}}\n")
        .write(
            "other.yaml",
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: other}\nspec:\n  build: {context: challenges/.}\n",
        );
    let loaded = descriptor::load(repo.path(), &LoadOptions::default()).unwrap();
    let names: Vec<&str> = loaded
        .descriptors
        .iter()
        .map(|d| d.metadata.name.as_str())
        .collect();
    assert_eq!(names, ["upper", "web"], "{:#?}", loaded.problems);
    let found: Vec<(String, usize, usize)> = loaded
        .problems
        .iter()
        .map(|p| (p.file.clone(), p.line, p.column))
        .collect();
    assert_eq!(
        found,
        [
            ("challenges/broken.yaml".to_string(), 4, 1),
            ("challenges/kind-only.yaml".to_string(), 1, 1),
            ("other.yaml".to_string(), 5, 20),
        ],
        "{:#?}",
        loaded.problems
    );
    assert_eq!(
        loaded.problems[2].message,
        "spec.build.context: build context \"challenges/.\" holds descriptor challenges/UPPER.YAML and 3 more; move the build files to a folder of their own"
    );

    // The repo's root holds every descriptor, the one naming it included.
    let root = Repo::new();
    root.write("Dockerfile", "FROM busybox:latest\n").write(
        "c.yaml",
        "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: web}\nspec:\n  build: {context: ./}\n",
    );
    assert_eq!(
        places(&problems_of(root.path(), &LoadOptions::default())),
        [(
            "c.yaml".to_string(),
            5,
            20,
            "spec.build.context: build context \"./\" holds descriptor c.yaml; move the build files to a folder of their own".to_string()
        )]
    );
}

/// Issue 8, item 5: a key with `=`, a space or nothing at all passed as a variable name, and set
/// a surprising variable or failed at apply. Every map of variables checks its keys, each at the
/// key, and a name under `secretEnv` is not shown.
#[test]
fn variable_names_are_checked_in_every_map_of_variables() {
    let repo = Repo::new();
    repo.write("ctx/Dockerfile", "FROM busybox:latest\n")
        .write(
            "c.yaml",
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: web}\nspec:\n  build: {context: ctx, args: {\"A B\": x}}\n  env: {\"\": x, GOOD_1: y}\n  secretEnv: {\"flag{x}\": {env: X}}\n  sidecars:\n    - name: db\n      image: busybox:latest\n      env: {1X: x}\n      secretEnv: {\"X=Y\": {env: X}}\n",
        )
        .write(
            "p.yaml",
            "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {name: p}\nspec:\n  source: {url: \"https://example.org/a.git\"}\n  image: {build: {context: ctx, args: {\"-x\": y}}}\n  steps:\n    - {name: s, run: make, env: {\"PATH=/evil:/bin\": z}}\n",
        );
    let rule = "is not a valid name: a variable name is letters, digits and _, not starting with a digit (POSIX), e.g. LOG_LEVEL";
    let hidden = "spec.secretEnv: a name is not valid (what is written there is not shown, as it may be a secret): a variable name is letters";
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let expected: Vec<(&str, usize, usize, String)> = vec![
        ("c.yaml", 5, 32, format!("spec.build.args: \"A B\" {rule}")),
        ("c.yaml", 6, 9, format!("spec.env: \"\" {rule}")),
        ("c.yaml", 7, 15, hidden.to_string()),
        (
            "c.yaml",
            11,
            13,
            format!("spec.sidecars[0].env: \"1X\" {rule}"),
        ),
        (
            "c.yaml",
            12,
            19,
            "spec.sidecars[0].secretEnv: a name is not valid".to_string(),
        ),
        (
            "p.yaml",
            6,
            40,
            format!("spec.image.build.args: \"-x\" {rule}"),
        ),
        (
            "p.yaml",
            8,
            34,
            format!("spec.steps[0].env: \"PATH=/evil:/bin\" {rule}"),
        ),
    ];
    assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    for (problem, (file, line, column, words)) in problems.iter().zip(&expected) {
        assert_eq!(
            (problem.file.as_str(), problem.line, problem.column),
            (*file, *line, *column),
            "{problem:#?}"
        );
        assert!(problem.message.starts_with(words), "{problem:#?}");
        assert!(!problem.message.contains("flag{x}") && !problem.message.contains("X=Y"));
    }
}

/// Issue 8, item 6: values Docker refuses (`memory: 1k`, a zero interval, `pids: 0`, …) passed
/// validate and failed at apply. Each is now a problem at its value, all in one pass.
#[test]
fn values_the_engine_refuses_are_problems_at_their_values() {
    let repo = Repo::new();
    repo.write(
        "c.yaml",
        challenge(
            "web",
            "  replicas: 0\n  resources: {cpus: 0, memory: 5Mi, pids: 0}\n  ports: [{container: 0}, {container: 80, host: 65536}]\n  healthcheck: {tcp: 80, interval: 0s, timeout: 0ms, retries: 0}\n  sidecars:\n    - {name: db, image: busybox, resources: {cpus: 1025, memory: 6Mi, pids: -1}}\n",
        ),
    )
    .write(
        "p.yaml",
        "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {name: p}\nspec:\n  source: {url: \"https://example.org/a.git\"}\n  image: busybox\n  steps: [{name: s, run: make}]\n  timeout: 0s\n  concurrency: 65\n",
    );
    let found: Vec<(String, usize, usize, String)> =
        places(&problems_of(repo.path(), &LoadOptions::default()));
    let expected = [
        (
            "c.yaml",
            7,
            13,
            "spec.replicas: 0 is out of range; expected 1 to 100",
        ),
        (
            "c.yaml",
            8,
            21,
            "spec.resources.cpus: 0 is out of range; expected 0.01 to 1024",
        ),
        (
            "c.yaml",
            8,
            32,
            "spec.resources.memory: \"5Mi\" is below the smallest memory limit the engine accepts; write at least 6Mi",
        ),
        (
            "c.yaml",
            8,
            43,
            "spec.resources.pids: 0 is out of range; expected 1 to 4194304",
        ),
        (
            "c.yaml",
            9,
            23,
            "spec.ports[0].container: 0 is not a port; expected 1 to 65535",
        ),
        (
            "c.yaml",
            9,
            49,
            "spec.ports[1].host: 65536 is not a port; expected 1 to 65535",
        ),
        (
            "c.yaml",
            10,
            36,
            "spec.healthcheck.interval: \"0s\" is too short; write at least 1ms",
        ),
        (
            "c.yaml",
            10,
            49,
            "spec.healthcheck.timeout: \"0ms\" is too short; write at least 1ms",
        ),
        (
            "c.yaml",
            10,
            63,
            "spec.healthcheck.retries: 0 is out of range; expected 1 to 100",
        ),
        (
            "c.yaml",
            12,
            52,
            "spec.sidecars[0].resources.cpus: 1025 is out of range; expected 0.01 to 1024",
        ),
        (
            "c.yaml",
            12,
            77,
            "spec.sidecars[0].resources.pids: -1 is out of range; expected 1 to 4194304",
        ),
        (
            "p.yaml",
            8,
            12,
            "spec.timeout: \"0s\" is too short; write at least 1ms",
        ),
        (
            "p.yaml",
            9,
            16,
            "spec.concurrency: 65 is out of range; expected 1 to 64",
        ),
    ];
    let expected: Vec<(String, usize, usize, String)> = expected
        .iter()
        .map(|(f, l, c, m)| (f.to_string(), *l, *c, m.to_string()))
        .collect();
    assert_eq!(found, expected);
}

/// Issue 8, item 15: `memory: 99999999999999999999Gi` was reported at the document's first line,
/// and not at all when the document had another problem; so were numbers past what the types
/// hold. Every one is now reported with the others, each at its value.
#[test]
fn out_of_range_numbers_are_placed_at_their_values_beside_other_problems() {
    let repo = Repo::new();
    repo.write(
        "c.yaml",
        challenge(
            "web",
            "  prots: []\n  resources: {memory: 99999999999999999999Gi, pids: 99999999999999999999999}\n  ports: [{container: 80, host: 1e400}]\n  healthcheck: {tcp: 80, interval: 99999999999d}\n",
        ),
    )
    .write("whole.yaml", challenge("whole", "  replicas: 2.0\n"));
    let found = places(&problems_of(repo.path(), &LoadOptions::default()));
    let at: Vec<(&str, usize, usize)> = found
        .iter()
        .map(|(f, l, c, _)| (f.as_str(), *l, *c))
        .collect();
    assert_eq!(
        at,
        [
            ("c.yaml", 7, 3),
            ("c.yaml", 8, 23),
            ("c.yaml", 8, 53),
            ("c.yaml", 9, 33),
            ("c.yaml", 10, 36),
            ("whole.yaml", 7, 13),
        ],
        "{found:#?}"
    );
    for (problem, words) in found[1..].iter().zip([
        "\"99999999999999999999Gi\" is too large",
        "spec.resources.pids: 1e+23 is out of range",
        "spec.ports[0].host: \"1e400\" is not an integer",
        "\"99999999999d\" is too long; the longest duration is 106751d",
        "spec.replicas: invalid type: floating point `2.0`",
    ]) {
        assert!(problem.3.contains(words), "{problem:?}");
    }
}

/// Issue 8, item 16: a file within the size limit could still hold unbounded work (a million
/// empty documents cost 215 MB); the count of problems per file is bounded too, and says so.
#[test]
fn a_file_reports_a_bounded_number_of_problems() {
    let fields: String = (0..150).map(|i| format!("  unknown{i}: 1\n")).collect();
    let repo = Repo::new();
    repo.write("c.yaml", challenge("web", &fields));
    let problems = problems_of(repo.path(), &LoadOptions::default());
    assert_eq!(problems.len(), 101, "{problems:#?}");
    assert!(
        problems.iter().any(|p| p.message
            == "more than 100 problems in this file; fix these and validate again to see the rest"),
        "{problems:#?}"
    );
}

/// Issue 8, item 16: nodes per file are bounded wherever they come from, and the problem stands
/// at the first node past the limit.
#[test]
fn a_file_of_too_many_nodes_is_one_problem_at_the_node_past_the_limit() {
    let items: String = "- 1\n".repeat(100_000);
    let repo = Repo::new();
    repo.write("c.yaml", format!("list:\n{items}"));
    assert_eq!(
        places(&problems_of(repo.path(), &LoadOptions::default())),
        [(
            "c.yaml".to_string(),
            100_000,
            3,
            "more than 100000 YAML nodes in one file; split it into smaller files".to_string()
        )]
    );
    let flow = format!("list: [{}]\n", vec!["1"; 10_001].join(", "));
    repo.write("c.yaml", flow);
    assert_eq!(
        places(&problems_of(repo.path(), &LoadOptions::default())),
        [(
            "c.yaml".to_string(),
            1,
            6 + 3 * 10_000,
            "a flow collection ([…] or {…}) with more than 10000 entries; write it in block style, one entry per line".to_string()
        )]
    );
}

fn staging_doc(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Staging\nmetadata: {{name: {name}}}\nspec:\n  namespace: {name}\n{extra}"
    )
}

/// Removing the last staging of a folder must not stop every other change: a Kubernetes object
/// outside any staging's folder and a Helm chart no staging uses are skipped with a warning at
/// their place. A document that names berth's API, or one of its kinds, is never skipped.
#[test]
fn what_is_plainly_not_berths_is_a_warning_and_a_berth_typo_stays_a_problem() {
    let repo = Repo::new();
    repo.write("web.yaml", challenge("web", ""))
        .write(
            "guestbook/frontend.yaml",
            "# kept from upstream\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: frontend}\nspec: {replicas: 1}\n",
        )
        .write("charts/podinfo/Chart.yaml", "apiVersion: v2\nname: podinfo\nversion: 6.0.0\n")
        .write("charts/podinfo/values.yaml", "replicaCount: 1\nimage: {tag: \"\"}\n")
        .write(
            "charts/podinfo/templates/deployment.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {{ .Release.Name }}\nspec:\n  replicas: {{ .Values.replicaCount }}\n",
        );
    let loaded = descriptor::load(repo.path(), &LoadOptions::default()).unwrap();
    assert!(loaded.is_valid(), "{:?}", loaded.problems);
    assert_eq!(loaded.descriptors.len(), 1);
    let warnings: Vec<(String, usize, usize)> = loaded
        .warnings
        .iter()
        .map(|w| (w.file.clone(), w.line, w.column))
        .collect();
    assert_eq!(
        warnings,
        vec![
            ("charts/podinfo/Chart.yaml".to_string(), 1, 1),
            ("guestbook/frontend.yaml".to_string(), 2, 13),
        ]
    );
    assert!(
        loaded.warnings[0]
            .message
            .contains("Helm chart that no Staging uses")
    );
    assert!(
        loaded.warnings[1]
            .message
            .contains("not a berth descriptor (Deployment of apiVersion apps/v1)")
    );
    // `berth validate` says both and exits 0.
    let output = crate::support::util::berth(&["validate", repo.path().to_str().unwrap()]);
    let text = crate::support::util::stdout(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains(
            "guestbook/frontend.yaml:2:13: Deployment/frontend: skipped: not a berth descriptor"
        ),
        "{text}"
    );
    assert!(text.contains("1 descriptor valid"), "{text}");

    // A typo in a berth kind, or berth's kind under another apiVersion, is never skipped.
    repo.write(
        "typo.yaml",
        "apiVersion: berth/v1\nkind: Challange\nmetadata: {name: typo}\nspec: {}\n",
    )
    .write(
        "other.yaml",
        "apiVersion: v1\nkind: Challenge\nmetadata: {name: other}\nspec: {image: x}\n",
    )
    .write(
        "cased.yaml",
        "apiVersion: Berth/v1\nkind: challenge\nmetadata: {name: cased}\nspec: {image: x}\n",
    )
    .write(
        "bare.yaml",
        "apiVersion: apps/v1\nkind: staging\nmetadata: {name: bare}\nspec: {}\n",
    )
    // Unreadable, in an unused chart: what it holds is unknown, so it is not set aside.
    .write("charts/podinfo/odd.yaml", vec![0xffu8; 16]);
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let files: Vec<&str> = problems.iter().map(|p| p.file.as_str()).collect();
    for file in [
        "typo.yaml",
        "other.yaml",
        "cased.yaml",
        "bare.yaml",
        "charts/podinfo/odd.yaml",
    ] {
        assert!(files.contains(&file), "{file} was skipped: {problems:?}");
    }
}

/// `tag` is needed only where a manifest reads `${tag}`: without one, reading it is a problem
/// at the variable's place. `.berthignore` holds inside a manifests folder too.
#[test]
fn a_staging_needs_a_tag_only_where_its_manifests_read_one() {
    let repo = Repo::new();
    repo.write(
        "guestbook.yaml",
        staging_doc("guestbook", "  manifests: guestbook\n"),
    )
    .write(
        "guestbook/redis.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: redis}\nspec:\n  ports: [{port: 6379}]\n",
    )
    .write(
        "guestbook/all-in-one/guestbook-all-in-one.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: redis}\nspec:\n  ports: [{port: 6379}]\n",
    )
    .write("guestbook/.berthignore", "all-in-one/\n");
    let loaded = descriptor::load(repo.path(), &LoadOptions::default()).unwrap();
    assert!(loaded.is_valid(), "{:?}", loaded.problems);
    repo.write("shop.yaml", staging_doc("shop", "  manifests: shop\n"))
        .write(
            "shop/cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  image: \"shop:${tag}\"\n",
        );
    let problems = problems_of(repo.path(), &LoadOptions::default());
    assert_eq!(
        places(&problems),
        vec![(
            "shop/cm.yaml".to_string(),
            5,
            16,
            "${tag} is read here, but the Staging sets no spec.tag; add one (a tag, or {fromPipeline: NAME}), or write $${ for a literal ${".to_string()
        )]
    );
}

/// A chart staging's `values` and `valuesFiles` are checked where they are written; a `tag`
/// that reaches no part of the chart is a warning.
#[test]
fn chart_values_are_checked_at_their_place_and_an_unread_tag_is_a_warning() {
    let repo = Repo::new();
    repo.write("chart/Chart.yaml", "apiVersion: v2\nname: demo\nversion: 0.1.0\n")
        .write("chart/templates/cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {image: {{ .Values.image.tag | quote }}}\n")
        .write(
            "demo.yaml",
            staging_doc(
                "demo",
                "  tag: v1\n  chart: chart\n  valuesFiles: [values/missing.yaml]\n  values:\n    image: {tag: \"${overrides.NOPE}\"}\n",
            ),
        )
        .write(
            "plain.yaml",
            staging_doc("plain", "  manifests: plain\n  values: {a: b}\n"),
        )
        .write("plain/cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: p}\n");
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let found: Vec<(String, usize, usize)> = problems
        .iter()
        .map(|p| (p.file.clone(), p.line, p.column))
        .collect();
    assert_eq!(
        found,
        vec![
            ("demo.yaml".to_string(), 8, 17),
            ("demo.yaml".to_string(), 10, 18),
            ("plain.yaml".to_string(), 7, 11),
        ],
        "{problems:?}"
    );
    assert!(
        problems[0]
            .message
            .contains("file \"values/missing.yaml\" does not exist"),
        "{problems:?}"
    );
    assert!(
        problems[1]
            .message
            .contains("${overrides.NOPE} is not defined"),
        "{problems:?}"
    );
    assert!(
        problems[2].message.contains("values are for a chart"),
        "{problems:?}"
    );
    // Fixed, the tag that no template and no value reads is a warning at spec.tag.
    repo.write(
        "demo.yaml",
        staging_doc(
            "demo",
            "  tag: v1\n  chart: chart\n  values:\n    image: {tag: stable}\n",
        ),
    )
    .write("plain.yaml", staging_doc("plain", "  manifests: plain\n"));
    let loaded = descriptor::load(repo.path(), &LoadOptions::default()).unwrap();
    assert!(loaded.is_valid(), "{:?}", loaded.problems);
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert_eq!(
        (loaded.warnings[0].file.as_str(), loaded.warnings[0].line),
        ("demo.yaml", 6)
    );
    assert!(
        loaded.warnings[0]
            .message
            .contains("spec.tag reaches no part of chart chart")
    );
}

/// A stop waits through the engine's API, whose requests end at 120s; a part of a second would
/// be no wait at all.
#[test]
fn a_stop_timeout_is_a_second_to_a_hundred() {
    let repo = Repo::new();
    repo.write("long.yaml", challenge("long", "  stopTimeout: 5m\n"))
        .write("short.yaml", challenge("short", "  stopTimeout: 500ms\n"))
        .write("fine.yaml", challenge("fine", "  stopTimeout: 30s\n"));
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let found: Vec<(&str, &str)> = problems
        .iter()
        .map(|p| (p.file.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(
        found,
        vec![
            (
                "long.yaml",
                "spec.stopTimeout: 300s is out of range; write 1s to 100s"
            ),
            (
                "short.yaml",
                "spec.stopTimeout: 0.5s is out of range; write 1s to 100s"
            ),
        ]
    );
}

/// A `helm.sh/hook` event Helm does not know is a problem at the annotations, never a skip: the
/// object it is on would be pruned without a word.
#[test]
fn an_unknown_hook_event_is_a_problem_at_its_annotations() {
    let repo = Repo::new();
    repo.write("s.yaml", staging_doc("hooks", "  manifests: m\n"))
        .write(
            "m/job.yaml",
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: migrate\n  annotations:\n    helm.sh/hook: pre-instal\nspec: {}\n",
        );
    let problems = problems_of(repo.path(), &LoadOptions::default());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        (problems[0].file.as_str(), problems[0].line),
        ("m/job.yaml", 6)
    );
    assert!(
        problems[0]
            .message
            .contains("\"pre-instal\" is no event Helm knows"),
        "{problems:?}"
    );
}

/// A secret file's path is a file's absolute path, given once; on Docker, where it is copied in
/// before the start, a read-only root cannot take it.
#[test]
fn secret_files_are_absolute_single_and_need_a_writable_root_on_docker() {
    let repo = Repo::new();
    repo.write(
        "paths.yaml",
        challenge(
            "paths",
            "  secretFiles:\n    - {path: flag.txt, secret: {env: F}}\n    - {path: /flag.txt, secret: {env: F}}\n    - {path: //./flag.txt, secret: {env: F}}\n    - {path: /a/../etc/passwd, secret: {env: F}}\n",
        ),
    )
    .write(
        "hidden.yaml",
        challenge(
            "hidden",
            "  security: {tmpfs: [{path: /run/secrets, size: 1Mi}]}\n  secretFiles: [{path: /run/secrets/flag, secret: {env: F}}, {path: /run/flag, secret: {env: F}}, {path: /run/flag/x, secret: {env: F}}]\n",
        ),
    )
    .write(
        "sealed.yaml",
        challenge(
            "sealed",
            "  security: {readOnlyRootFilesystem: true}\n  secretFiles: [{path: /flag.txt, secret: {env: F}}]\n",
        ),
    );
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let found: Vec<(&str, &str)> = problems
        .iter()
        .map(|p| (p.file.as_str(), p.message.as_str()))
        .collect();
    let expected = [
        (
            "hidden.yaml",
            "is under the tmpfs at /run/secrets, which would hide it",
        ),
        (
            "hidden.yaml",
            "/run/flag/x and /run/flag are the same file, or one is inside the other",
        ),
        ("paths.yaml", "\"flag.txt\" is not a file's absolute path"),
        (
            "paths.yaml",
            "//./flag.txt and /flag.txt are the same file, or one is inside the other",
        ),
        (
            "paths.yaml",
            "\"/a/../etc/passwd\" is not a file's absolute path",
        ),
        ("sealed.yaml", "a read-only root file system refuses"),
    ];
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    for ((file, message), (want_file, words)) in found.iter().zip(expected) {
        assert_eq!(*file, want_file, "{found:#?}");
        assert!(message.contains(words), "{message} lacks {words}");
    }
}

#[test]
fn an_instanced_challenge_is_one_container_or_pod_on_ports_of_its_own_with_one_way_to_its_flag() {
    let repo = Repo::new();
    repo.write(
        "fine.yaml",
        challenge(
            "fine",
            "  ports: [{container: 1337}]\n  instanced: {ttl: 30m, pool: 2, flag: {file: /flag.txt, format: \"flag{%s}\"}}\n",
        ),
    )
    .write(
        "shape.yaml",
        challenge(
            "shape",
            "  target: kubernetes\n  replicas: 2\n  ports: [{container: 1337, host: 31337}]\n  instanced:\n    ttl: 30m\n    maxLifetime: 10m\n",
        ),
    )
    .write(
        "flags.yaml",
        challenge(
            "flags",
            "  ports: [{container: 1337}]\n  instanced:\n    ttl: 1m\n    pool: 1\n    flag: {env: FLAG, format: \"flag{%s_%s}\"}\n",
        ),
    )
    .write(
        "cluster.yaml",
        challenge(
            "cluster",
            "  target: kubernetes\n  network: {egress: false}\n  security: {readOnlyRootFilesystem: true}\n  ports: [{container: 1337}]\n  instanced:\n    ttl: 1m\n    pool: 1\n    flag: {file: /flag.txt}\n",
        ),
    )
    .write(
        "link.yaml",
        challenge(
            "link",
            "  target: kubernetes\n  network: {allowConnectTo: [Challenge/solo]}\n",
        ),
    )
    .write(
        "solo.yaml",
        challenge(
            "solo",
            "  target: kubernetes\n  ports: [{container: 1337}]\n  instanced: {ttl: 1m}\n",
        ),
    )
    .write(
        "portless.yaml",
        challenge(
            "portless",
            "  network: {egress: false}\n  instanced:\n    ttl: 1m\n    flag: {env: FLAG, file: flag.txt}\n",
        ),
    );
    let problems = problems_of(repo.path(), &LoadOptions::default());
    // On Kubernetes, a closed egress and a read-only root are fine (a NetworkPolicy closes it,
    // the flag is a mounted Secret); a pool is not, as a pod's flag cannot come later.
    let expected = [
        ("cluster.yaml", 13, "a pod's flag is fixed when it starts"),
        (
            "flags.yaml",
            10,
            "a started container's environment cannot change",
        ),
        ("flags.yaml", 11, "needs exactly one %s"),
        ("link.yaml", 8, "Challenge/solo is instanced"),
        ("portless.yaml", 7, "keep egress"),
        (
            "portless.yaml",
            9,
            "a team reaches its instance through its ports",
        ),
        ("portless.yaml", 10, "set exactly one of env and file"),
        (
            "portless.yaml",
            10,
            "\"flag.txt\" is not a file's absolute path",
        ),
        ("shape.yaml", 9, "NodePorts on kubernetes"),
        ("shape.yaml", 11, "2 replicas would be one per team each"),
        ("shape.yaml", 12, "maxLifetime: shorter than ttl"),
    ];
    problems_are(&problems, &expected);
}

#[test]
fn volumes_are_folders_of_their_own_on_docker() {
    let repo = Repo::new();
    repo.write(
        "paths.yaml",
        challenge(
            "paths",
            "  volumes:\n    - {name: data, path: data}\n    - {name: logs, path: /var/log}\n    - {name: more, path: /var/log/app}\n  security: {tmpfs: [{path: /tmp, size: 1Mi}]}\n  sidecars:\n    - name: db\n      image: busybox:latest\n      volumes: [{name: data, path: /tmp/db}]\n      security: {tmpfs: [{path: /tmp, size: 1Mi}]}\n",
        ),
    )
    .write(
        "cluster.yaml",
        challenge(
            "cluster",
            "  target: kubernetes\n  ports: [{container: 80}]\n  instanced: {ttl: 1m}\n  volumes: [{name: data, path: /data}]\n",
        ),
    )
    .write(
        "secret.yaml",
        challenge(
            "secret",
            "  secretFiles: [{path: /srv/flag, secret: {env: F}}]\n  volumes: [{name: srv, path: /srv}, {name: run, path: /run}]\n",
        ),
    )
    .write(
        "teams.yaml",
        challenge(
            "teams",
            "  ports: [{container: 80}]\n  instanced: {ttl: 1m, pool: 1, flag: {file: /flag}}\n  volumes: [{name: data, path: /data}, {name: run, path: /run}]\n  sidecars: [{name: db, image: busybox, volumes: [{name: data, path: /var/lib/db}]}]\n",
        ),
    );
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let expected = [
        ("paths.yaml", 8, "\"data\" is not a folder's absolute path"),
        (
            "paths.yaml",
            10,
            "/var/log/app and /var/log are the same folder, or one is inside the other",
        ),
        (
            "paths.yaml",
            15,
            "/tmp/db and the tmpfs at /tmp would hide one another",
        ),
        ("secret.yaml", 8, "/srv/flag is inside it"),
        ("teams.yaml", 9, "/run holds /run/berth-flag"),
        ("teams.yaml", 10, "so data cannot be shared"),
    ];
    problems_are(&problems, &expected);
}

#[test]
fn a_fixed_host_port_in_the_instances_range_is_refused_on_docker_only() {
    let repo = Repo::new();
    repo.write(
        "fixed.yaml",
        challenge("fixed", "  ports: [{container: 80, host: 20500}]\n"),
    )
    .write(
        "outside.yaml",
        challenge("outside", "  ports: [{container: 80, host: 19999}]\n"),
    );
    let problems = problems_of(repo.path(), &LoadOptions::default());
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(
        (problems[0].file.as_str(), problems[0].line),
        ("fixed.yaml", 7)
    );
    assert!(
        problems[0]
            .message
            .contains("20500 is in the range per-team instances take"),
        "{}",
        problems[0].message
    );
    // An agent that gives instances another range takes 20500.
    let moved = LoadOptions {
        instance_ports: 40000..=40999,
        ..LoadOptions::default()
    };
    assert!(problems_of(repo.path(), &moved).is_empty());
}

/// `problems` are `expected`, in order: each at its file and line, its message holding the words.
fn problems_are(problems: &[berth::descriptor::Problem], expected: &[(&str, usize, &str)]) {
    let found: Vec<(&str, usize, &str)> = problems
        .iter()
        .map(|p| (p.file.as_str(), p.line, p.message.as_str()))
        .collect();
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    for (found, (file, line, words)) in found.iter().zip(expected) {
        assert_eq!(
            (found.0, found.1),
            (*file, *line),
            "{found:?} is not {words}"
        );
        assert!(found.2.contains(words), "{} lacks {words}", found.2);
    }
}

#[test]
fn a_sidecar_waits_only_for_other_sidecars_of_its_challenge_and_never_in_a_circle() {
    let repo = Repo::new();
    repo.write(
        "shop.yaml",
        challenge(
            "shop",
            "  sidecars:\n    - {name: db, image: busybox:latest, dependsOn: [cache]}\n    - {name: cache, image: busybox:latest, dependsOn: [queue]}\n    - {name: queue, image: busybox:latest, dependsOn: [db, queue, mail]}\n    - {name: web, image: busybox:latest, dependsOn: [db], healthcheck: {interval: 1s}}\n",
        ),
    )
    .write(
        "cluster.yaml",
        challenge(
            "cluster",
            "  target: kubernetes\n  sidecars:\n    - {name: db, image: busybox:latest}\n    - {name: app, image: busybox:latest, dependsOn: [db]}\n",
        ),
    );
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let expected = [
        ("cluster.yaml", 10, "a pod's containers start together"),
        ("shop.yaml", 8, "db → cache → queue → db is a circle"),
        (
            "shop.yaml",
            10,
            "\"queue\" a sidecar cannot wait for itself",
        ),
        (
            "shop.yaml",
            10,
            "\"mail\" names no sidecar of this challenge",
        ),
        ("shop.yaml", 11, "set exactly one of tcp and http"),
    ];
    problems_are(&problems, &expected);
}

#[test]
fn a_volume_is_a_named_volume_or_a_folder_of_the_repo_and_never_both() {
    let repo = Repo::new();
    repo.write("shop/initdb/01.sql", "SELECT 1;\n").write(
        "shop.yaml",
        challenge(
            "shop",
            "  volumes:\n    - {from: shop/initdb, path: /seed}\n    - {name: data, from: shop/initdb, path: /both}\n    - {path: /neither}\n    - {from: ../outside, path: /out}\n    - {from: shop/initdb/01.sql, path: /file}\n",
        ),
    );
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let expected = [
        ("shop.yaml", 9, "set exactly one of name"),
        ("shop.yaml", 10, "set exactly one of name"),
        ("shop.yaml", 11, "outside"),
        ("shop.yaml", 12, "is not a folder"),
    ];
    problems_are(&problems, &expected);
}

#[test]
fn a_solver_needs_a_port_to_reach_and_one_kind_of_check() {
    let repo = Repo::new();
    let solve = "  healthcheck:\n    solve: {image: solver:1, expectFlag: true}\n";
    repo.write("portless.yaml", challenge("portless", solve))
        .write(
            "cluster.yaml",
            challenge(
                "cluster",
                &format!("  target: kubernetes\n  ports: [{{container: 80}}]\n  secretEnv: {{FLAG: {{env: F}}}}\n{solve}"),
            ),
        )
        .write(
            "both.yaml",
            challenge(
                "both",
                "  ports: [{container: 80}]\n  healthcheck: {tcp: 80, solve: {image: solver:1}}\n",
            ),
        );
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let expected = [
        ("both.yaml", 8, "set exactly one of tcp, http and solve"),
        (
            "portless.yaml",
            8,
            "the solver reaches the challenge on its first port",
        ),
    ];
    problems_are(&problems, &expected);
}

#[test]
fn a_sidecars_ports_are_checked_as_the_main_containers_are() {
    let repo = Repo::new();
    repo.write(
        "xss.yaml",
        challenge(
            "xss",
            "  ports: [{container: 80, host: 10080}]\n  sidecars:\n    - name: bot\n      image: busybox:latest\n      ports: [{container: 3000, host: 10080}]\n    - name: admin\n      image: busybox:latest\n      ports: [{container: 80, host: 10081}]\n",
        ),
    )
    .write(
        "other.yaml",
        challenge("other", "  ports: [{container: 80, host: 10081}]\n"),
    )
    .write(
        "cluster.yaml",
        challenge(
            "cluster",
            "  target: kubernetes\n  ports: [{container: 8080}]\n  sidecars:\n    - {name: bot, image: busybox:latest, ports: [{container: 8080}]}\n",
        ),
    )
    .write(
        "teams.yaml",
        challenge(
            "teams",
            "  ports: [{container: 80}]\n  instanced: {ttl: 1m}\n  sidecars:\n    - {name: bot, image: busybox:latest, ports: [{container: 3000}]}\n",
        ),
    );
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let expected = [
        (
            "cluster.yaml",
            10,
            "the containers of a pod share one network",
        ),
        (
            "teams.yaml",
            10,
            "an instance publishes its main container's ports only",
        ),
        (
            "xss.yaml",
            11,
            "also claimed by another container of this challenge",
        ),
        (
            "xss.yaml",
            14,
            "host port 10081/tcp is also claimed by Challenge/other",
        ),
    ];
    problems_are(&problems, &expected);
}

#[test]
fn a_sidecar_has_an_image_or_a_build_and_builds_on_docker_only() {
    let repo = Repo::new();
    repo.write("bot/Dockerfile", "FROM busybox:latest\n").write(
        "xss.yaml",
        challenge(
            "xss",
            "  sidecars:\n    - {name: neither}\n    - {name: both, image: busybox:latest, build: {context: bot}}\n    - {name: lost, build: {context: nowhere}}\n    - {name: bot, build: {context: bot}}\n",
        ),
    )
    .write(
        "cluster.yaml",
        challenge(
            "cluster",
            "  target: kubernetes\n  sidecars:\n    - {name: bot, build: {context: bot}}\n",
        ),
    );
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let expected = [
        ("cluster.yaml", 9, "a cluster cannot build from the repo"),
        ("xss.yaml", 8, "set exactly one of image and build"),
        ("xss.yaml", 9, "set exactly one of image and build"),
        ("xss.yaml", 10, "\"nowhere\""),
    ];
    problems_are(&problems, &expected);
}

#[test]
fn a_folder_copied_in_holds_plain_files_within_what_its_engine_takes() {
    let repo = Repo::new();
    repo.write("linked/ok.sql", "SELECT 1;\n")
        .write("big/blob.bin", "x".repeat(1_100_000))
        .write("plain/ok.sql", "SELECT 1;\n")
        .write(
            "linked.yaml",
            challenge("linked", "  volumes: [{from: linked, path: /seed}]\n"),
        )
        .write(
            "big.yaml",
            challenge(
                "big",
                "  target: kubernetes\n  volumes: [{from: big, path: /seed}]\n",
            ),
        )
        .write(
            "jail.yaml",
            challenge(
                "jail",
                "  ports: [{container: 1337}]\n  instanced: {ttl: 1m}\n  security: {capabilities: {add: [SYS_ADMIN]}}\n  volumes: [{from: plain, path: /seed}]\n",
            ),
        );
    std::os::unix::fs::symlink("../plain/ok.sql", repo.path().join("linked/escape.sql")).unwrap();
    let problems = problems_of(repo.path(), &LoadOptions::default());
    let expected = [
        ("big.yaml", 8, "on kubernetes a folder goes in a ConfigMap"),
        ("jail.yaml", 10, "could remount it writable for all"),
        ("linked.yaml", 7, "holds a symbolic link, escape.sql"),
    ];
    problems_are(&problems, &expected);
}
