//! The committed JSON Schemas are what the Rust types generate, and they accept the sample repo.

use crate::support::util::{berth, crate_root};

#[test]
fn committed_schemas_are_up_to_date() {
    let out = tempfile::tempdir().unwrap();
    let output = berth(&["schema", "--out", out.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0));
    // Every file it writes (the agent's config schema too, which editors use for the packaged
    // config), and no committed file it no longer writes.
    let names = |dir: &std::path::Path| -> std::collections::BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let written = names(out.path());
    assert!(written.contains("agent.json"), "{written:?}");
    assert_eq!(
        written,
        names(&crate_root().join("schema")),
        "schema/ holds other files than `berth schema` writes"
    );
    for file in &written {
        let generated = std::fs::read_to_string(out.path().join(file)).unwrap();
        let committed =
            std::fs::read_to_string(crate_root().join("schema").join(file)).unwrap_or_default();
        assert!(
            generated == committed,
            "schema/{file} is stale: run `cargo run -- schema --out schema` and commit"
        );
    }
}

#[test]
fn sample_files_point_editors_at_their_schema() {
    let sample = crate_root().join("sample-repo");
    let mut stack = vec![sample.clone()];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(
                    text.starts_with("# yaml-language-server: $schema="),
                    "{} has no schema line",
                    path.display()
                );
                let target = text
                    .lines()
                    .next()
                    .unwrap()
                    .split_once("$schema=")
                    .unwrap()
                    .1;
                if !target.starts_with("https://") {
                    assert!(
                        path.parent().unwrap().join(target).is_file(),
                        "{} points at a missing schema",
                        path.display()
                    );
                }
                seen += 1;
            }
        }
    }
    assert!(seen >= 8);
}
