//! The `berth` binary as users and CI scripts call it: output formats and exit codes.

use crate::util::{Repo, berth, challenge, crate_root, fixture, stdout};

#[test]
fn validate_prints_a_summary_and_exits_zero_on_a_valid_repo() {
    let sample = crate_root().join("sample-repo");
    let output = berth(&["validate", sample.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        stdout(&output),
        "8 descriptors valid (4 Challenge, 2 Pipeline, 2 Staging)\n"
    );
}

#[test]
fn validate_prints_one_line_per_problem_and_exits_one() {
    let dir = fixture("invalid/wrong-type");
    let output = berth(&["validate", dir.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stdout(&output),
        "c.yaml:8:13: Challenge/web: spec.ports[0].host: \"abc\" is not an integer\n"
    );
}

#[test]
fn validate_json_lists_problems_with_pointer_paths() {
    let repo = Repo::new();
    repo.write("c.yaml", challenge("web", "  prots: []\n"));
    let output = berth(&[
        "validate",
        "--format",
        "json",
        repo.path().to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let problems: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(problems[0]["file"], "c.yaml");
    assert_eq!(problems[0]["line"], 7);
    assert_eq!(problems[0]["column"], 3);
    assert_eq!(problems[0]["kind"], "Challenge");
    assert_eq!(problems[0]["name"], "web");
    assert_eq!(problems[0]["path"], "/spec/prots");
}

#[test]
fn validate_exits_two_when_the_folder_is_missing() {
    let output = berth(&["validate", "/surely/not/here"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read /surely/not/here"));
}

#[test]
fn validate_never_echoes_an_inline_secret() {
    let dir = fixture("invalid/inline-secret");
    for format in ["text", "json"] {
        let output = berth(&["validate", "--format", format, dir.to_str().unwrap()]);
        assert!(!String::from_utf8_lossy(&output.stdout).contains("do-not-commit-me"));
        assert!(!String::from_utf8_lossy(&output.stderr).contains("do-not-commit-me"));
    }
}

#[test]
fn help_and_version_explain_themselves() {
    let output = berth(&["--version"]);
    assert_eq!(
        stdout(&output),
        format!("berth {}\n", env!("CARGO_PKG_VERSION"))
    );
    for command in [
        &["--help"][..],
        &["validate", "--help"],
        &["schema", "--help"],
    ] {
        let output = berth(command);
        assert_eq!(output.status.code(), Some(0), "{command:?}");
        assert!(stdout(&output).contains("Usage: berth"), "{command:?}");
    }
}
