//! Helpers shared by the integration tests: paths, the `berth` binary, scratch repos.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The crate's root folder.
pub fn crate_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fixture folder under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    crate_root().join("tests/fixtures").join(name)
}

/// Runs the `berth` binary built for these tests.
pub fn berth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .output()
        .expect("berth runs")
}

/// Standard output as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A scratch config repo in a temporary folder.
pub struct Repo {
    dir: tempfile::TempDir,
}

impl Repo {
    /// An empty repo.
    pub fn new() -> Repo {
        Repo {
            dir: tempfile::tempdir().expect("temporary folder"),
        }
    }

    /// The repo's folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file, creating its folders.
    pub fn write(&self, relative: &str, content: impl AsRef<[u8]>) -> &Repo {
        let path = self.path().join(relative);
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("create folders");
        std::fs::write(path, content).expect("write file");
        self
    }

    /// Makes a symlink at `relative` pointing at `target`.
    pub fn symlink(&self, relative: &str, target: impl AsRef<Path>) -> &Repo {
        let path = self.path().join(relative);
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("create folders");
        std::os::unix::fs::symlink(target, path).expect("symlink");
        self
    }
}

/// A minimal valid challenge descriptor.
pub fn challenge(name: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: Challenge\nmetadata:\n  name: {name}\nspec:\n  image: busybox:latest\n{extra_spec}"
    )
}

/// Polls `check` until it holds; fails, saying `what`, when `limit` passes first.
pub(crate) fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}
