//! Real git servers on loopback for the agent's tests: `git daemon` (anonymous fetch and push)
//! and `git http-backend` behind Debian's lighttpd with basic auth. No git is mocked.
//!
//! lighttpd is installed by `.ci/run`. Where it is missing, the tests that need it skip loudly,
//! unless `BERTH_REQUIRE_GIT_HTTP=1` (set by `.ci/run`), which makes them fail instead.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::net::git;
use crate::support::net::free_port;

/// A config repo: a bare repo served under `root()` as `infra.git`, and a working clone the test
/// commits to and pushes from, as a person would.
pub struct Origin {
    dir: tempfile::TempDir,
}

impl Origin {
    /// A repo whose first commit holds `files`.
    pub fn new(files: &[(&str, &str)]) -> Origin {
        let origin = Origin {
            dir: tempfile::tempdir().expect("temporary folder"),
        };
        std::fs::create_dir_all(origin.root()).unwrap();
        git(
            &origin.root(),
            &["init", "-q", "--bare", "-b", "main", "infra.git"],
        );
        git(&origin.bare(), &["config", "http.receivepack", "true"]);
        git(origin.dir.path(), &["init", "-q", "-b", "main", "work"]);
        git(
            &origin.work(),
            &["remote", "add", "origin", origin.bare().to_str().unwrap()],
        );
        let files: Vec<(&str, Option<&str>)> = files.iter().map(|(p, t)| (*p, Some(*t))).collect();
        origin.commit(&files, "first revision");
        origin
    }

    /// The folder the servers serve.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("served")
    }

    /// The bare repo.
    pub fn bare(&self) -> PathBuf {
        self.root().join("infra.git")
    }

    /// The working clone.
    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// Writes (`Some`) or deletes (`None`) files, commits, pushes to main; returns the commit id.
    pub fn commit(&self, files: &[(&str, Option<&str>)], message: &str) -> String {
        let work = self.work();
        for (path, text) in files {
            let full = work.join(path);
            match text {
                Some(text) => {
                    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
                    std::fs::write(&full, text).unwrap();
                }
                None => std::fs::remove_file(&full).unwrap(),
            }
        }
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", message]);
        git(&work, &["push", "-q", "origin", "main"]);
        git(&work, &["rev-parse", "HEAD"])
    }

    /// A file at a revision of the bare repo (`berth-status:status/agent.yaml`), if there.
    pub fn show(&self, spec: &str) -> Option<String> {
        let output = Command::new("git")
            .arg("--git-dir")
            .arg(self.bare())
            .args(["show", spec])
            .output()
            .expect("git runs");
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// git in the bare repo.
    pub fn bare_git(&self, args: &[&str]) -> String {
        git(&self.bare(), args)
    }
}

/// Where git keeps its helper programs (`git-daemon`, `git-http-backend`).
fn git_exec_path() -> PathBuf {
    let output = Command::new("git").arg("--exec-path").output().unwrap();
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited at start: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `git daemon` serving an origin's root, anonymously, with pushes allowed.
pub struct GitDaemon {
    child: Option<Child>,
    root: PathBuf,
    /// The port it listens on.
    pub port: u16,
}

impl GitDaemon {
    /// Starts a daemon on a free port.
    pub fn start(origin: &Origin) -> GitDaemon {
        let mut daemon = GitDaemon {
            child: None,
            root: origin.root(),
            port: free_port(),
        };
        daemon.restart();
        daemon
    }

    /// The repo's URL.
    pub fn url(&self) -> String {
        format!("git://127.0.0.1:{}/infra.git", self.port)
    }

    /// Stops the daemon (the server "goes down").
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        // `git daemon` would run `git-daemon` as a child that outlives a kill of `git`.
        let mut child = Command::new(git_exec_path().join("git-daemon"))
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg("--enable=receive-pack")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .arg(format!("--base-path={}", self.root.display()))
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon starts");
        wait_for_port(self.port, &mut child, "git daemon");
        self.child = Some(child);
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `git http-backend` behind lighttpd, every request needing basic auth.
pub struct GitHttp {
    child: Child,
    _config: tempfile::TempDir,
    /// The port it listens on.
    pub port: u16,
}

/// The user and password lighttpd accepts.
pub const HTTP_USER: &str = "berth";
/// The password lighttpd accepts.
pub const HTTP_PASSWORD: &str = "pw-9f2c41e7";

impl GitHttp {
    /// Starts lighttpd serving `origin`; `None` (after a loud message) when lighttpd is missing.
    pub fn start(origin: &Origin) -> Option<GitHttp> {
        let lighttpd = ["/usr/sbin/lighttpd", "/usr/bin/lighttpd"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(lighttpd) = lighttpd else {
            assert!(
                std::env::var("BERTH_REQUIRE_GIT_HTTP").as_deref() != Ok("1"),
                "BERTH_REQUIRE_GIT_HTTP=1 but lighttpd is not installed (apt-get install lighttpd)"
            );
            eprintln!(
                "\n*** SKIPPED: lighttpd is not installed; set BERTH_REQUIRE_GIT_HTTP=1 to make this a failure ***\n"
            );
            return None;
        };
        let exec_path = Command::new("git").arg("--exec-path").output().unwrap();
        let exec_path = String::from_utf8_lossy(&exec_path.stdout)
            .trim()
            .to_string();
        let config = tempfile::tempdir().unwrap();
        let port = free_port();
        let users = config.path().join("users");
        std::fs::write(&users, format!("{HTTP_USER}:{HTTP_PASSWORD}\n")).unwrap();
        let text = format!(
            r#"server.document-root = "{dir}"
server.bind = "127.0.0.1"
server.port = {port}
server.modules += ("mod_auth", "mod_authn_file", "mod_alias", "mod_setenv", "mod_cgi")
server.errorlog = "{dir}/error.log"
alias.url = ("/git" => "{exec_path}/git-http-backend")
$HTTP["url"] =~ "^/git" {{
  cgi.assign = ("" => "")
  setenv.set-environment = ("GIT_PROJECT_ROOT" => "{root}", "GIT_HTTP_EXPORT_ALL" => "1")
  auth.backend = "plain"
  auth.backend.plain.userfile = "{users}"
  auth.require = ("" => ("method" => "basic", "realm" => "git", "require" => "valid-user"))
}}
"#,
            dir = config.path().display(),
            root = origin.root().display(),
            users = users.display(),
        );
        let file = config.path().join("lighttpd.conf");
        std::fs::write(&file, text).unwrap();
        let mut child = Command::new(lighttpd)
            .arg("-D")
            .arg("-f")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("lighttpd starts");
        wait_for_port(port, &mut child, "lighttpd");
        Some(GitHttp {
            child,
            _config: config,
            port,
        })
    }

    /// The repo's URL (no credentials in it).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/git/infra.git", self.port)
    }
}

impl Drop for GitHttp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// OpenSSH's `sshd` on loopback serving the origin over `ssh://`, with a host key and a client
/// key of its own: the test's user logs in with the key only.
pub struct GitSsh {
    child: Child,
    dir: tempfile::TempDir,
    /// The port it listens on.
    pub port: u16,
}

impl GitSsh {
    /// Starts sshd; `None` (after a loud message) when it is missing, as for lighttpd.
    pub fn start() -> Option<GitSsh> {
        if !Path::new("/usr/sbin/sshd").exists() {
            assert!(
                std::env::var("BERTH_REQUIRE_GIT_HTTP").as_deref() != Ok("1"),
                "BERTH_REQUIRE_GIT_HTTP=1 but sshd is not installed (apt-get install openssh-server)"
            );
            eprintln!(
                "\n*** SKIPPED: sshd is not installed; set BERTH_REQUIRE_GIT_HTTP=1 to make this a failure ***\n"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        for key in ["host_key", "user_key"] {
            let made = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.path().join(key))
                .status()
                .unwrap();
            assert!(made.success(), "ssh-keygen");
        }
        std::fs::copy(
            dir.path().join("user_key.pub"),
            dir.path().join("authorized_keys"),
        )
        .unwrap();
        // sshd's privilege separation needs this folder.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port();
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile {d}/sshd.pid\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("sshd.log")).unwrap())
            .spawn()
            .expect("sshd starts");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "sshd did not listen: {}",
                std::fs::read_to_string(dir.path().join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(GitSsh { child, dir, port })
    }

    /// The `ssh://` URL of the repo at `path`, for the user the tests run as.
    pub fn url(&self, path: &Path) -> String {
        // The account the tests run as (`USER` may be unset, or not this account, under CI).
        let user = Command::new("id")
            .arg("-un")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "root".into());
        format!("ssh://{user}@127.0.0.1:{}{}", self.port, path.display())
    }

    /// The client's private key.
    pub fn key(&self) -> PathBuf {
        self.dir.path().join("user_key")
    }

    /// A known_hosts file that holds the server's host key.
    pub fn known_hosts(&self) -> PathBuf {
        let path = self.dir.path().join("known_hosts");
        let key = std::fs::read_to_string(self.dir.path().join("host_key.pub")).unwrap();
        std::fs::write(&path, format!("[127.0.0.1]:{} {key}", self.port)).unwrap();
        path
    }
}

impl Drop for GitSsh {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
