//! The config repo as the agent sees it, through git2: a clone in the state folder, fetched on every
//! trigger, checked out at the revision being applied, and the status tree committed and pushed.
//!
//! Every function here blocks; the agent calls them from `spawn_blocking`. Status is published
//! statelessly: each attempt lays the status files over the remote branch's current tip and pushes
//! a commit with that tip as parent, so a rejected push (someone else pushed) is fetched, rebased
//! (the files laid again over the new tip) and retried, and nothing local can go stale.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use git2::build::TreeUpdateBuilder;
use git2::{
    AutotagOption, Cred, CredentialType, FetchOptions, FileMode, ObjectType, Oid, PushOptions,
    RemoteCallbacks, Repository, Signature,
};

use crate::config::{AgentConfig, Secret, Secrets};

/// The remote's name in the agent's clone.
const REMOTE: &str = "origin";

/// How often a rejected status push is rebased and retried.
const PUSH_ATTEMPTS: usize = 5;

/// Longest a fetch may take from its first byte to its last.
const FETCH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

/// Why the repo could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The git server could not be reached or refused us; try again later.
    #[error("cannot fetch {url}: {reason}")]
    Unreachable {
        /// The repo URL.
        url: String,
        /// What git said (never with credentials).
        reason: String,
    },
    /// The followed branch does not exist on the server.
    #[error("{url} has no branch \"{branch}\"; push one, or set repo.branch")]
    NoBranch {
        /// The repo URL.
        url: String,
        /// The branch.
        branch: String,
    },
    /// The status commit could not be pushed (the fetch may well work: read-only credentials).
    #[error("cannot push status to {url}: {reason}")]
    Push {
        /// The repo URL.
        url: String,
        /// What git said (never with credentials).
        reason: String,
    },
    /// Something local went wrong (disk, a corrupt clone).
    #[error("git: {0}")]
    Local(String),
    /// The server is not the one known (its SSH host key), or it refused berth's credentials:
    /// a setting to fix, which no retry fixes.
    #[error("cannot fetch {url}: {reason}")]
    Refused {
        /// The repo URL.
        url: String,
        /// Which, and what to do.
        reason: String,
    },
}

impl From<git2::Error> for SourceError {
    fn from(error: git2::Error) -> Self {
        SourceError::Local(error.message().to_string())
    }
}

/// Where status lives: its own branch, or a folder on the followed branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusTarget {
    /// The branch status commits go to.
    pub branch: String,
    /// Folder inside that branch holding `status/` (`""` on a status branch, `.berth` on the followed one).
    pub folder: String,
}

/// The agent's clone of the config repo.
#[derive(Debug, Clone)]
pub struct Source {
    dir: PathBuf,
    url: String,
    branch: String,
    status: StatusTarget,
    username: Option<String>,
    password: Option<Secret>,
    ssh_key: Option<PathBuf>,
    known_hosts: Option<PathBuf>,
    instance: String,
    /// The repository itself when `repo.url` is a local path: status goes straight into its
    /// branch, since git cannot push to a working tree's repository.
    local: Option<PathBuf>,
}

/// What publishing status did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// The remote already had exactly these files.
    Unchanged,
    /// A commit was pushed, after this many rejected attempts.
    Pushed {
        /// The commit.
        commit: String,
        /// Rejected pushes that were rebased and retried.
        retries: usize,
        /// Time spent making the status tree (blobs and trees, in memory).
        made: std::time::Duration,
        /// Time spent packing the new objects (deflated whole, no delta search: [`crate::pack`]).
        packed: std::time::Duration,
        /// Time until the commit was stored in the clone (tree, pack written and indexed, commit).
        stored: std::time::Duration,
    },
}

impl Source {
    /// The clone for `config`, kept under its state folder.
    pub fn new(config: &AgentConfig, secrets: &Secrets) -> Source {
        let auth = config.repo.auth.clone().unwrap_or_default();
        let status = match config.status_branch.as_str() {
            "" => StatusTarget {
                branch: config.repo.branch.clone(),
                folder: ".berth".into(),
            },
            branch => StatusTarget {
                branch: branch.to_string(),
                folder: String::new(),
            },
        };
        Source {
            dir: config.state_dir.join("repo"),
            url: config.repo.url.clone(),
            branch: config.repo.branch.clone(),
            status,
            username: auth.username,
            password: secrets.repo_password.clone(),
            ssh_key: auth.ssh_key_file,
            known_hosts: auth.known_hosts_file,
            instance: config.instance.to_string(),
            local: config.local_repo(),
        }
    }

    /// The working tree the revision being applied is checked out in.
    pub fn workdir(&self) -> &Path {
        &self.dir
    }

    /// Where status is written.
    pub fn status_target(&self) -> &StatusTarget {
        &self.status
    }

    /// Takes the state folder for this process: fails when another agent holds it. Then removes
    /// the lock files git leaves when a process is killed mid-write (`index.lock`, `*.lock` under
    /// refs): with the folder held, they are stale, and left alone they would block every pass.
    /// Keep the returned file open for as long as the agent runs.
    pub fn take_state_folder(&self) -> Result<std::fs::File, SourceError> {
        let state = self.dir.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(state)
            .map_err(|e| SourceError::Local(format!("cannot create {}: {e}", state.display())))?;
        let path = state.join("agent.lock");
        let file = std::fs::File::create(&path)
            .map_err(|e| SourceError::Local(format!("cannot open {}: {e}", path.display())))?;
        file.try_lock().map_err(|_| {
            SourceError::Local(format!(
                "another berth agent uses {}; give each agent its own stateDir",
                state.display()
            ))
        })?;
        let mut stale = Vec::new();
        let mut folders = vec![self.dir.join(".git")];
        while let Some(folder) = folders.pop() {
            let Ok(entries) = std::fs::read_dir(&folder) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.ends_with("objects") {
                    continue;
                }
                match entry.file_type() {
                    Ok(kind) if kind.is_dir() => folders.push(path),
                    Ok(_) if path.extension().is_some_and(|e| e == "lock") => stale.push(path),
                    _ => {}
                }
            }
        }
        for path in stale {
            tracing::warn!(path = %path.display(), "removing a lock left by a killed agent");
            let _ = std::fs::remove_file(path);
        }
        Ok(file)
    }

    /// Opens the clone, making it when missing. Making it needs no network: the first fetch fills it.
    /// A clone that is there but cannot be opened is an error, never made again over itself.
    fn open(&self) -> Result<Repository, SourceError> {
        match Repository::open(&self.dir) {
            Ok(repo) => {
                if repo.find_remote(REMOTE)?.url() != Some(self.url.as_str()) {
                    repo.remote_set_url(REMOTE, &self.url)?;
                }
                Ok(repo)
            }
            Err(error) if self.dir.join(".git").exists() => Err(SourceError::Local(format!(
                "the clone in {} cannot be opened: {}",
                self.dir.display(),
                error.message()
            ))),
            Err(_) => {
                std::fs::create_dir_all(&self.dir).map_err(|e| {
                    SourceError::Local(format!("cannot create {}: {e}", self.dir.display()))
                })?;
                let repo = Repository::init(&self.dir)?;
                repo.remote(REMOTE, &self.url)?;
                Ok(repo)
            }
        }
    }

    fn callbacks(&self) -> RemoteCallbacks<'_> {
        let mut callbacks = RemoteCallbacks::new();
        let mut attempts = 0;
        callbacks.credentials(move |_url, username_from_url, allowed| {
            attempts += 1;
            if attempts > 3 {
                // An ssh login name is no secret: saying which one was refused is what helps. Over
                // https the name in a URL may be a token, so only a configured one is named.
                let why = match &self.ssh_key {
                    Some(key) => format!(
                        "the server refused the SSH key {} for user {}; authorize its public key there, or fix repo.auth",
                        key.display(),
                        self.username.as_deref().or(username_from_url).unwrap_or("git")
                    ),
                    None => match &self.username {
                        Some(user) => format!("the server refused the credentials of user {user}; check repo.auth"),
                        None => "the server refused the credentials; check repo.auth".to_string(),
                    },
                };
                return Err(git2::Error::from_str(&why));
            }
            if allowed.contains(CredentialType::SSH_KEY)
                && let Some(key) = &self.ssh_key
            {
                let user = self
                    .username
                    .as_deref()
                    .or(username_from_url)
                    .unwrap_or("git");
                return Cred::ssh_key(user, None, key, None);
            }
            if allowed.contains(CredentialType::USERNAME) {
                return Cred::username(self.username.as_deref().unwrap_or("git"));
            }
            if allowed.contains(CredentialType::USER_PASS_PLAINTEXT)
                && let Some(password) = &self.password
            {
                let user = self
                    .username
                    .as_deref()
                    .or(username_from_url)
                    .unwrap_or("git");
                return Cred::userpass_plaintext(user, password.expose());
            }
            Err(git2::Error::from_str(
                "the server asks for credentials; set repo.auth",
            ))
        });
        if let Some(known_hosts) = self.known_hosts.clone() {
            callbacks.certificate_check(move |cert, host| {
                let Some(hostkey) = cert.as_hostkey().and_then(|k| k.hostkey()) else {
                    return Ok(git2::CertificateCheckStatus::CertificatePassthrough);
                };
                if known_host(&known_hosts, host, hostkey) {
                    Ok(git2::CertificateCheckStatus::CertificateOk)
                } else {
                    Err(git2::Error::from_str(&format!(
                        "the SSH host key of {host} is not in {}",
                        known_hosts.display()
                    )))
                }
            });
        }
        callbacks
    }

    /// A failed network operation: the server's fault or the network's ([`SourceError::Unreachable`]),
    /// or, when git failed on its own objects or refs, the clone's ([`SourceError::Local`]).
    fn unreachable(&self, error: &git2::Error) -> SourceError {
        use git2::ErrorClass as Class;
        if let Some(reason) = self.refusal(error) {
            return SourceError::Refused {
                url: crate::git_url::redact(&self.url),
                reason,
            };
        }
        match error.class() {
            Class::Reference
            | Class::Zlib
            | Class::Repository
            | Class::Config
            | Class::Odb
            | Class::Index
            | Class::Object
            | Class::Tree
            | Class::FetchHead
            | Class::Filesystem
            | Class::Sha1 => SourceError::Local(error.message().to_string()),
            _ => SourceError::Unreachable {
                url: crate::git_url::redact(&self.url),
                reason: error.message().to_string(),
            },
        }
    }

    /// What to say when `error` is the server's host key unknown, or berth's credentials
    /// refused: settings to fix, not a network to wait for.
    fn refusal(&self, error: &git2::Error) -> Option<String> {
        let message = error.message();
        let host_key = message.contains("hostkey") || message.contains("host key");
        if host_key {
            return Some(match &self.known_hosts {
                Some(file) => format!(
                    "the server's SSH host key is not in {} (repo.auth.knownHostsFile); add the server's key there once you have checked it",
                    file.display()
                ),
                None => "the server's SSH host key is not known; set repo.auth.knownHostsFile (BERTH_REPO_KNOWN_HOSTS_FILE) to a known_hosts file that lists it".to_string(),
            });
        }
        if message.contains("refused the SSH key")
            || message.contains("refused the credentials")
            || message.contains("asks for credentials")
        {
            return Some(message.to_string());
        }
        // libssh2's words for a key the server did not take.
        if message.contains("rejected authentication") || message.contains("authenticat") {
            let user = self
                .username
                .clone()
                .or_else(|| crate::git_url::login_user(&self.url))
                .unwrap_or_else(|| "git".into());
            return Some(match &self.ssh_key {
                Some(key) => format!(
                    "the server refused the SSH key {} for user {user}; authorize its public key there, or fix repo.auth",
                    key.display()
                ),
                None => format!(
                    "the server refused user {user}; set repo.auth (a key, a token or a password)"
                ),
            });
        }
        None
    }

    /// Whether the clone is whole: it opens, and the followed branch's last fetched commit and
    /// every object of its tree can be read. `Err(why)` when not. A clone not made yet is whole.
    pub fn check_clone(&self) -> Result<(), BrokenClone> {
        if !self.dir.join(".git").exists() {
            return Ok(());
        }
        let message = |e: git2::Error| e.message().to_string();
        let repo = Repository::open(&self.dir).map_err(|e| BrokenClone::Unopenable(message(e)))?;
        repo.find_remote(REMOTE)
            .map_err(|e| BrokenClone::NoRemote(message(e)))?;
        repo.index().map_err(|e| BrokenClone::Index(message(e)))?;
        let tip = match repo.find_reference(&tracking_ref(&self.branch)) {
            Ok(tip) => tip,
            Err(error) if error.code() == git2::ErrorCode::NotFound => return Ok(()),
            Err(error) => return Err(BrokenClone::BranchRef(message(error))),
        };
        let tree = tip
            .peel_to_commit()
            .and_then(|commit| commit.tree())
            .map_err(|e| BrokenClone::Tip(message(e)))?;
        let odb = repo
            .odb()
            .map_err(|e| BrokenClone::Unopenable(message(e)))?;
        let mut broken = None;
        tree.walk(git2::TreeWalkMode::PreOrder, |_, entry| {
            // A submodule's commit lives in another repository, never in this clone.
            if entry.kind() == Some(ObjectType::Commit) {
                return git2::TreeWalkResult::Ok;
            }
            match odb.read_header(entry.id()) {
                Ok(_) => git2::TreeWalkResult::Ok,
                Err(error) => {
                    broken = Some(BrokenClone::Object {
                        id: entry.id().to_string(),
                        why: message(error),
                    });
                    git2::TreeWalkResult::Abort
                }
            }
        })
        .map_err(|e| {
            broken
                .take()
                .unwrap_or_else(|| BrokenClone::Tip(message(e)))
        })?;
        broken.map_or(Ok(()), Err)
    }

    /// Whether `revision` is `tip` or one of its ancestors in the clone.
    pub fn is_ancestor_or_tip(&self, revision: &str, tip: &str) -> Result<bool, SourceError> {
        let repo = self.open()?;
        let (revision, tip) = (Oid::from_str(revision)?, Oid::from_str(tip)?);
        Ok(revision == tip || repo.graph_descendant_of(tip, revision)?)
    }

    /// Moves a damaged clone aside, to `repo.damaged` beside it (replacing an older one, kept for
    /// a post-mortem), so the next fetch clones afresh. Returns where it went.
    pub fn set_aside(&self) -> Result<PathBuf, SourceError> {
        let aside = self.dir.with_extension("damaged");
        if aside.exists() {
            std::fs::remove_dir_all(&aside).map_err(|e| {
                SourceError::Local(format!("cannot remove {}: {e}", aside.display()))
            })?;
        }
        std::fs::rename(&self.dir, &aside).map_err(|e| {
            SourceError::Local(format!("cannot move {} aside: {e}", self.dir.display()))
        })?;
        Ok(aside)
    }

    /// Fetches the followed branch and returns its tip. The status branch is fetched only when
    /// status is read and when a push of it is rejected: the agent is its main writer.
    pub fn fetch(&self) -> Result<String, SourceError> {
        let repo = self.open()?;
        let advertised = self.fetch_refspecs(&repo, &[tracking_refspec(&self.branch)])?;
        if advertised == 0 {
            // An empty answer (`0000`) is a server with nothing to say: an empty repository, or
            // one in trouble. It is not the branch being deleted.
            return Err(SourceError::Unreachable {
                url: crate::git_url::redact(&self.url),
                reason: "the server advertised no branches at all (an empty repository, or a server fault)".into(),
            });
        }
        let tip = repo
            .find_reference(&tracking_ref(&self.branch))
            .map_err(|_| SourceError::NoBranch {
                url: crate::git_url::redact(&self.url),
                branch: self.branch.clone(),
            })?;
        Ok(tip.peel_to_commit()?.id().to_string())
    }

    /// Fetches `refspecs`; returns how many refs the server advertised.
    fn fetch_refspecs(&self, repo: &Repository, refspecs: &[String]) -> Result<usize, SourceError> {
        let mut remote = repo.find_remote(REMOTE)?;
        let mut callbacks = self.callbacks();
        // A server that drips bytes never trips the network timeout: the transfer has a deadline.
        let deadline = std::time::Instant::now() + FETCH_DEADLINE;
        callbacks.transfer_progress(move |_| std::time::Instant::now() < deadline);
        callbacks.sideband_progress(move |_| std::time::Instant::now() < deadline);
        let mut options = FetchOptions::new();
        options
            .remote_callbacks(callbacks)
            .download_tags(AutotagOption::None)
            // A branch deleted on the server must stop resolving here too, or passes would go on
            // reporting "unchanged" from a tracking ref that no longer means anything.
            .prune(git2::FetchPrune::On);
        // A branch missing on the server (a status branch not made yet) is not an error.
        remote.fetch(refspecs, Some(&mut options), None).map_err(
            |e| match std::time::Instant::now() >= deadline {
                true => SourceError::Unreachable {
                    url: crate::git_url::redact(&self.url),
                    reason: format!(
                        "the fetch took longer than {}s and was stopped",
                        FETCH_DEADLINE.as_secs()
                    ),
                },
                false => self.unreachable(&e),
            },
        )?;
        Ok(remote.list().map_or(0, <[_]>::len))
    }

    /// Checks `revision` out into the working tree, exactly: changed files rewritten, removed ones
    /// deleted, stray ones (from a crash mid-checkout) cleaned.
    pub fn checkout(&self, revision: &str) -> Result<(), SourceError> {
        let repo = self.open()?;
        let commit = repo.find_commit(Oid::from_str(revision)?)?;
        crate::large_files::checkout(&repo, &commit.tree()?)?;
        repo.set_head_detached(commit.id())?;
        Ok(())
    }

    /// The id of `revision`'s tree without the `.berth` folder: two revisions with the same
    /// content id differ only in berth's own status commits, which must never trigger a pass.
    pub fn content_id(&self, revision: &str) -> Result<String, SourceError> {
        let repo = self.open()?;
        let tree = repo.find_commit(Oid::from_str(revision)?)?.tree()?;
        if tree.get_name(".berth").is_none() {
            return Ok(tree.id().to_string());
        }
        let mut builder = repo.treebuilder(Some(&tree))?;
        builder.remove(".berth")?;
        Ok(builder.write()?.to_string())
    }

    /// Fetches the status branch and returns its status files: paths relative to the status tree
    /// (`status/agent.yaml`, …) and their text. Empty when there is no status yet.
    pub fn status_files(&self) -> Result<BTreeMap<String, String>, SourceError> {
        let repo = self.open()?;
        if self.status.branch != self.branch {
            self.fetch_refspecs(&repo, &[tracking_refspec(&self.status.branch)])?;
        }
        read_status_files(
            &repo,
            &tracking_ref(&self.status.branch),
            &self.status.folder,
        )
    }

    /// Commits `files` (paths relative to the status tree) on the status branch and pushes,
    /// rebasing and retrying when the push is rejected. YAML files under `status/` not in `files`
    /// (objects that are gone) are removed; anything else on the branch is kept.
    pub fn publish_status(
        &self,
        files: &BTreeMap<String, String>,
        message: &str,
    ) -> Result<Published, SourceError> {
        let repo = self.open()?;
        let tracking = tracking_ref(&self.status.branch);
        let signature = Signature::now("berth", &format!("berth@{}", self.instance))?;
        let mut retries = 0;
        loop {
            let base = repo
                .find_reference(&tracking)
                .ok()
                .and_then(|r| r.peel_to_commit().ok());
            let building = std::time::Instant::now();
            let Some(NewTree {
                tree,
                pack,
                made,
                packed,
            }) = build_tree(&repo, base.as_ref(), &self.status.folder, files)?
            else {
                return Ok(Published::Unchanged);
            };
            store_pack(&repo.path().join("objects/pack"), &pack)
                .map_err(|e| SourceError::Local(format!("cannot write a pack: {e}")))?;
            let odb = repo.odb()?;
            odb.refresh()?;
            let tree = repo.find_tree(tree)?;
            let parents: Vec<&git2::Commit> = base.iter().collect();
            let commit = repo.commit(None, &signature, &signature, message, &tree, &parents)?;
            let stored = building.elapsed();
            match self.push(&repo, commit, &self.status.branch) {
                Ok(()) => {
                    repo.reference(&tracking, commit, true, "berth: status pushed")?;
                    // Each status commit adds a pack: months of passes would leave thousands,
                    // and every object lookup reads each pack's index.
                    if let Err(error) = repack_if_piled_up(&repo) {
                        tracing::warn!(%error, "could not repack the clone; it keeps working, only slower");
                    }
                    return Ok(Published::Pushed {
                        commit: commit.to_string(),
                        retries,
                        made,
                        packed,
                        stored,
                    });
                }
                Err(PushError::Rejected(why)) if retries + 1 < PUSH_ATTEMPTS => {
                    tracing::info!(%why, "status push rejected; fetching and rebasing");
                    retries += 1;
                    self.fetch_refspecs(&repo, &[tracking_refspec(&self.status.branch)])?;
                }
                Err(PushError::Rejected(why)) => {
                    return Err(SourceError::Push {
                        url: crate::git_url::redact(&self.url),
                        reason: format!("rejected {PUSH_ATTEMPTS} times: {why}"),
                    });
                }
                Err(PushError::Failed(error)) => {
                    return Err(SourceError::Push {
                        url: crate::git_url::redact(&self.url),
                        reason: error.message().to_string(),
                    });
                }
            }
        }
    }

    /// Commits `state` for the descriptor `key` on the followed branch, changing only its
    /// `state:` line (see [`crate::descriptor::edit`]), authored by the agent with a
    /// `Requested-by:` trailer naming `requested_by`, and pushes it. A push the branch refuses
    /// (a protected branch) goes to `side_branch` instead, for a pull request; one refused
    /// because the branch moved is made again on its new tip.
    pub fn commit_state(
        &self,
        key: &crate::descriptor::ObjectRef,
        state: crate::descriptor::edit::WantedState,
        requested_by: &str,
        side_branch: &str,
    ) -> Result<Committed, SourceError> {
        let repo = self.open()?;
        let signature = Signature::now("berth", &format!("berth@{}", self.instance))?;
        let message = format!(
            "{key}: {} (from the console)\n\nRequested-by: {requested_by}\n",
            state.as_str()
        );
        for _ in 0..PUSH_ATTEMPTS {
            self.fetch_refspecs(&repo, &[tracking_refspec(&self.branch)])?;
            let tip = repo
                .find_reference(&tracking_ref(&self.branch))?
                .peel_to_commit()?;
            let tree = tip.tree()?;
            let Some((file, text, mode)) = declaring_file(&repo, &tree, key)? else {
                return Ok(Committed::Refused(format!(
                    "no file on {} declares {key}",
                    self.branch
                )));
            };
            let changed = match crate::descriptor::edit::set_state(&text, key, state) {
                Ok(changed) => changed,
                Err(why) => return Ok(Committed::Refused(format!("{file}: {why}"))),
            };
            if changed == text {
                return Ok(Committed::Unchanged);
            }
            let blob = repo.blob(changed.as_bytes())?;
            let mut update = TreeUpdateBuilder::new();
            // The file keeps its mode (an executable bit stays).
            let mode = match mode == i32::from(FileMode::BlobExecutable) {
                true => FileMode::BlobExecutable,
                false => FileMode::Blob,
            };
            update.upsert(file.as_str(), blob, mode);
            let new_tree = repo.find_tree(update.create_updated(&repo, &tree)?)?;
            let commit = repo.commit(None, &signature, &signature, &message, &new_tree, &[&tip])?;
            match self.push(&repo, commit, &self.branch) {
                Ok(()) => {
                    return Ok(Committed::Pushed {
                        commit: commit.to_string(),
                        branch: self.branch.clone(),
                        file,
                    });
                }
                Err(PushError::Rejected(why)) => {
                    self.fetch_refspecs(&repo, &[tracking_refspec(&self.branch)])?;
                    let moved = repo
                        .find_reference(&tracking_ref(&self.branch))?
                        .peel_to_commit()?
                        .id()
                        != tip.id();
                    if moved {
                        continue;
                    }
                    return match self.push(&repo, commit, side_branch) {
                        Ok(()) => Ok(Committed::ToSideBranch {
                            commit: commit.to_string(),
                            branch: side_branch.to_string(),
                            refused: why,
                            file,
                        }),
                        Err(PushError::Rejected(again)) => Err(SourceError::Push {
                            url: crate::git_url::redact(&self.url),
                            reason: format!("{why}; and to {side_branch}: {again}"),
                        }),
                        Err(PushError::Failed(error)) => Err(SourceError::Push {
                            url: crate::git_url::redact(&self.url),
                            reason: error.message().to_string(),
                        }),
                    };
                }
                Err(PushError::Failed(error)) => {
                    return Err(SourceError::Push {
                        url: crate::git_url::redact(&self.url),
                        reason: error.message().to_string(),
                    });
                }
            }
        }
        Err(SourceError::Push {
            url: crate::git_url::redact(&self.url),
            reason: format!(
                "{} moved {PUSH_ATTEMPTS} times while the change was pushed",
                self.branch
            ),
        })
    }

    /// Pushes `commit` to `branch` of the remote (or moves it in a local repository).
    fn push(&self, repo: &Repository, commit: Oid, branch: &str) -> Result<(), PushError> {
        // Push the commit through a private ref, so no local branch is ever checked out or moved.
        let local = format!("refs/berth/push/{branch}");
        repo.reference(&local, commit, true, "berth: a commit to push")
            .map_err(PushError::Failed)?;
        if let Some(path) = &self.local {
            return self.update_local_branch(path, &local, commit, branch);
        }
        let mut remote = repo.find_remote(REMOTE).map_err(PushError::Failed)?;
        let rejection = std::cell::RefCell::new(None);
        let mut callbacks = self.callbacks();
        callbacks.push_update_reference(|_, status| {
            *rejection.borrow_mut() = status.map(String::from);
            Ok(())
        });
        let mut options = PushOptions::new();
        options.remote_callbacks(callbacks);
        let result = remote.push(
            &[format!("{local}:refs/heads/{branch}")],
            Some(&mut options),
        );
        drop(options);
        match (result, rejection.into_inner()) {
            (Ok(()), None) => Ok(()),
            (Ok(()), Some(why)) => Err(PushError::Rejected(why)),
            (Err(error), _) if is_rejection(&error) => {
                Err(PushError::Rejected(error.message().to_string()))
            }
            (Err(error), _) => Err(PushError::Failed(error)),
        }
    }
}

impl Source {
    /// Status into a local repository: its objects fetched from the clone, then its branch moved
    /// from the commit the status was built on to `commit`, only if it still points there (as a
    /// push would). A branch checked out in that repository's working tree is never moved.
    fn update_local_branch(
        &self,
        path: &Path,
        from: &str,
        commit: Oid,
        branch: &str,
    ) -> Result<(), PushError> {
        let target = Repository::open(path).map_err(PushError::Failed)?;
        let branch = format!("refs/heads/{branch}");
        if !target.is_bare()
            && target
                .head()
                .ok()
                .and_then(|head| head.name().map(String::from))
                .as_deref()
                == Some(branch.as_str())
        {
            return Err(PushError::Failed(git2::Error::from_str(&format!(
                "{branch} is checked out in {}; berth does not move a checked-out branch under its working tree: set statusBranch to a branch of its own",
                path.display()
            ))));
        }
        let incoming = "refs/berth/incoming/commit";
        let mut remote = target
            .remote_anonymous(&self.dir.to_string_lossy())
            .map_err(PushError::Failed)?;
        remote
            .fetch(&[format!("+{from}:{incoming}")], None, None)
            .map_err(PushError::Failed)?;
        let _ = target.find_reference(incoming).and_then(|mut r| r.delete());
        let parent = target
            .find_commit(commit)
            .map_err(PushError::Failed)?
            .parent_ids()
            .next();
        let moved = match (parent, target.find_reference(&branch).ok()) {
            (Some(parent), Some(_)) => {
                target.reference_matching(&branch, commit, true, parent, "berth: status")
            }
            (None, None) => target.reference(&branch, commit, false, "berth: status"),
            // The branch appeared, went away or moved since the status was built on it.
            _ => return Err(PushError::Rejected(format!("{branch} moved"))),
        };
        match moved {
            Ok(_) => Ok(()),
            Err(error) if is_rejection(&error) || error.code() == git2::ErrorCode::Exists => {
                Err(PushError::Rejected(error.message().to_string()))
            }
            Err(error) => Err(PushError::Failed(error)),
        }
    }
}

/// What a console change to a descriptor's state did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    /// A commit was pushed to the followed branch: the next pass applies it.
    Pushed {
        /// The commit.
        commit: String,
        /// The followed branch.
        branch: String,
        /// The descriptor's file.
        file: String,
    },
    /// The followed branch refused the push (a protected branch): the commit went to a branch
    /// of its own, for a pull request.
    ToSideBranch {
        /// The commit.
        commit: String,
        /// The branch it went to.
        branch: String,
        /// What the followed branch's server said.
        refused: String,
        /// The descriptor's file.
        file: String,
    },
    /// The descriptor already says so.
    Unchanged,
    /// It cannot be changed that way: why.
    Refused(String),
}

/// Largest descriptor file the console changes.
const MAX_EDITED_FILE: usize = 1024 * 1024;

/// The one YAML file of `tree` that declares `key`, with its text and mode, as the loader reads
/// a repo: hidden files and folders (`.berth`, status) are not looked in, nor files over
/// [`MAX_EDITED_FILE`]. `Err` with the reason when two files declare it.
fn declaring_file(
    repo: &Repository,
    tree: &git2::Tree<'_>,
    key: &crate::descriptor::ObjectRef,
) -> Result<Option<(String, String, i32)>, SourceError> {
    let mut found = Vec::new();
    let name = key.name.as_str();
    tree.walk(git2::TreeWalkMode::PreOrder, |folder, entry| {
        let Some(file) = entry.name() else {
            return git2::TreeWalkResult::Skip;
        };
        if file.starts_with('.') {
            return git2::TreeWalkResult::Skip;
        }
        let lower = file.to_ascii_lowercase();
        if entry.kind() != Some(ObjectType::Blob)
            || entry.filemode() == i32::from(FileMode::Link)
            || !(lower.ends_with(".yaml") || lower.ends_with(".yml"))
        {
            return git2::TreeWalkResult::Ok;
        }
        let Ok(blob) = repo.find_blob(entry.id()) else {
            return git2::TreeWalkResult::Ok;
        };
        if blob.size() > MAX_EDITED_FILE {
            return git2::TreeWalkResult::Ok;
        }
        let Ok(text) = std::str::from_utf8(blob.content()) else {
            return git2::TreeWalkResult::Ok;
        };
        if !text.contains(name) {
            return git2::TreeWalkResult::Ok;
        }
        let declared = crate::descriptor::yaml::parse(text, false)
            .documents
            .iter()
            .any(|d| d.value["kind"] == key.kind.as_str() && d.value["metadata"]["name"] == name);
        if declared {
            found.push((
                format!("{folder}{file}"),
                text.to_string(),
                entry.filemode(),
            ));
        }
        git2::TreeWalkResult::Ok
    })?;
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => Err(SourceError::Local(format!(
            "{key} is declared in {} and {}; change it by hand",
            found[0].0, found[1].0
        ))),
    }
}

/// One status commit, as the console's history lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The commit.
    pub commit: String,
    /// When it was made (RFC 3339).
    pub when: String,
    /// Its subject: `berth: status of REVISION (RESULT)`.
    pub subject: String,
    /// The status files it changed, relative to the status tree: `status/challenge/web.yaml`.
    pub changed: Vec<String>,
    /// The phase `only` says at this commit, when a file was asked for.
    pub phase: Option<String>,
}

/// The newest `limit` status commits of `branch` in the clone at `dir` (as last fetched or
/// pushed), with the status files each changed under `folder`; only those that changed `only`
/// when it is given. Reads the clone; never fetches.
pub fn status_history(
    dir: &Path,
    target: &StatusTarget,
    only: Option<&str>,
    limit: usize,
) -> Result<Vec<HistoryEntry>, SourceError> {
    let repo = Repository::open(dir)?;
    let Ok(tip) = repo.find_reference(&tracking_ref(&target.branch)) else {
        return Ok(Vec::new());
    };
    let mut walk = repo.revwalk()?;
    walk.push(tip.peel_to_commit()?.id())?;
    let prefix = match target.folder.as_str() {
        "" => String::new(),
        folder => format!("{folder}/"),
    };
    let mut entries = Vec::new();
    // Only the status files (or the one asked for) are compared: the rest of each tree is skipped.
    let mut options = git2::DiffOptions::new();
    options.pathspec(match only {
        Some(file) => format!("{prefix}{file}"),
        None => format!("{prefix}status/"),
    });
    // Bounded: a long history with few changes of one object is not read to its root.
    for id in walk.take(limit.saturating_mul(20)) {
        let commit = repo.find_commit(id?)?;
        let tree = commit.tree()?;
        let parent = commit.parents().next().map(|p| p.tree()).transpose()?;
        let diff = repo.diff_tree_to_tree(parent.as_ref(), Some(&tree), Some(&mut options))?;
        let changed: Vec<String> = diff
            .deltas()
            .filter_map(|d| d.new_file().path().or(d.old_file().path()))
            .filter_map(|p| p.to_str()?.strip_prefix(&prefix).map(str::to_string))
            .filter(|p| p.starts_with("status/"))
            .collect();
        if changed.is_empty() || only.is_some_and(|file| !changed.iter().any(|c| c == file)) {
            continue;
        }
        let phase = only.and_then(|file| {
            let blob = tree
                .get_path(Path::new(&format!("{prefix}{file}")))
                .ok()?
                .to_object(&repo)
                .ok()?
                .peel_to_blob()
                .ok()?;
            let text = std::str::from_utf8(blob.content()).ok()?;
            let phase = text.lines().find_map(|l| l.strip_prefix("phase: "))?;
            Some(phase.trim().to_string())
        });
        entries.push(HistoryEntry {
            commit: commit.id().to_string(),
            when: chrono::DateTime::from_timestamp(commit.time().seconds(), 0)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            subject: commit.summary().unwrap_or_default().to_string(),
            changed,
            phase,
        });
        if entries.len() >= limit {
            break;
        }
    }
    Ok(entries)
}

/// Packs the clone holds before they are written again as one.
pub const MAX_PACKS: usize = 32;

/// Writes every object reachable from the clone's refs and HEAD as one pack, then removes the
/// packs and loose objects it had, when more than [`MAX_PACKS`] packs have piled up. Returns
/// whether it repacked.
///
/// The new pack is complete before anything is removed, so a crash at any point leaves a clone
/// with every object (at worst twice).
pub fn repack_if_piled_up(repo: &Repository) -> Result<bool, git2::Error> {
    let objects = repo.path().join("objects");
    let packs = objects.join("pack");
    let listed = |extension: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&packs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == extension))
            .collect()
    };
    let old_packs = listed("pack");
    if old_packs.len() <= MAX_PACKS {
        return Ok(false);
    }
    let old_indexes = listed("idx");
    let loose: Vec<std::path::PathBuf> = std::fs::read_dir(&objects)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 2 && n.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .collect();
    let mut walk = repo.revwalk()?;
    walk.push_glob("*")?;
    if repo.head().is_ok() {
        walk.push_head()?;
    }
    let mut builder = repo.packbuilder()?;
    builder.insert_walk(&mut walk)?;
    builder.write(&packs, 0o444)?;
    let Some(kept) = builder.name().map(|name| format!("pack-{name}")) else {
        return Err(git2::Error::from_str("the new pack has no name"));
    };
    for path in old_packs.iter().chain(&old_indexes) {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if stem != kept {
            let _ = std::fs::remove_file(path);
        }
    }
    for folder in loose {
        let _ = std::fs::remove_dir_all(folder);
    }
    repo.odb()?.refresh()?;
    tracing::info!(packs = old_packs.len(), "repacked the clone into one pack");
    Ok(true)
}

enum PushError {
    Rejected(String),
    Failed(git2::Error),
}

fn is_rejection(error: &git2::Error) -> bool {
    matches!(
        error.code(),
        git2::ErrorCode::NotFastForward | git2::ErrorCode::Modified
    ) || error.message().contains("fast-forward")
}

fn tracking_ref(branch: &str) -> String {
    format!("refs/remotes/{REMOTE}/{branch}")
}

fn tracking_refspec(branch: &str) -> String {
    format!("+refs/heads/{branch}:{}", tracking_ref(branch))
}

/// Reads the status files under `folder` of the commit `reference` points at.
pub fn read_status_files(
    repo: &Repository,
    reference: &str,
    folder: &str,
) -> Result<BTreeMap<String, String>, SourceError> {
    let mut files = BTreeMap::new();
    let Ok(reference) = repo.find_reference(reference) else {
        return Ok(files);
    };
    let tree = reference.peel_to_commit()?.tree()?;
    for entry in status_tree(repo, &tree, folder)?.entries {
        if entry.kind == Some(ObjectType::Blob) {
            let blob = repo.find_blob(entry.id)?;
            files.insert(
                entry.path,
                String::from_utf8_lossy(blob.content()).into_owned(),
            );
        }
    }
    Ok(files)
}

/// What a status update touches in a tree: the trees on the way to the status folder
/// (`folder/status`) and everything under it.
struct StatusTree {
    /// The root, `folder` (when there is one) and the status folder, as far as they exist.
    trees_on_the_way: Vec<Oid>,
    /// Every entry under the status folder.
    entries: Vec<StatusEntry>,
}

struct StatusEntry {
    /// The path relative to the status tree's root: `status/challenge/web.yaml`.
    path: String,
    kind: Option<ObjectType>,
    id: Oid,
}

fn status_tree(
    repo: &Repository,
    tree: &git2::Tree,
    folder: &str,
) -> Result<StatusTree, SourceError> {
    let mut found = StatusTree {
        trees_on_the_way: vec![tree.id()],
        entries: Vec::new(),
    };
    if !folder.is_empty()
        && let Ok(entry) = tree.get_path(Path::new(folder))
    {
        found.trees_on_the_way.push(entry.id());
    }
    let status_path = join(folder, crate::status::STATUS_FOLDER);
    let Ok(status) = tree.get_path(Path::new(&status_path)) else {
        return Ok(found);
    };
    found.trees_on_the_way.push(status.id());
    repo.find_tree(status.id())?
        .walk(git2::TreeWalkMode::PreOrder, |parent, entry| {
            found.entries.push(StatusEntry {
                path: format!(
                    "{}/{parent}{}",
                    crate::status::STATUS_FOLDER,
                    entry.name().unwrap_or_default()
                ),
                kind: entry.kind(),
                id: entry.id(),
            });
            git2::TreeWalkResult::Ok
        })?;
    Ok(found)
}

fn join(folder: &str, path: &str) -> String {
    match folder {
        "" => path.to_string(),
        folder => format!("{folder}/{path}"),
    }
}

/// A status tree made in memory: its id, the pack of its new objects, and how long making and
/// packing took.
struct NewTree {
    tree: Oid,
    pack: crate::pack::FinishedPack,
    made: std::time::Duration,
    packed: std::time::Duration,
}

/// Makes the status tree (`base`'s tree with `files` laid over it) in a repository that lives
/// only in memory, so a thousand files cost a thousand hashes rather than a thousand object-store
/// lookups on disk, and returns it with its new objects as one pack and the times making and
/// packing took. `None`: `base` already holds exactly `files`.
fn build_tree(
    disk: &Repository,
    base: Option<&git2::Commit>,
    folder: &str,
    files: &BTreeMap<String, String>,
) -> Result<Option<NewTree>, SourceError> {
    // The new trees list objects that exist only on disk (the base's other files); checking each
    // one would cost the lookups this function avoids. Every object written here is made here.
    git2::opts::strict_object_creation(false);
    let memory = Repository::from_odb(git2::Odb::new()?)?;
    let odb = memory.odb()?;
    odb.add_new_mempack_backend(1)?;
    let making = std::time::Instant::now();
    let base_tree = match base {
        Some(commit) => {
            Some(memory.find_tree(copy_trees(disk, &memory, commit.tree_id(), folder)?)?)
        }
        None => None,
    };
    let tree = overlay(&memory, base_tree.as_ref(), folder, files)?;
    if base_tree.as_ref().map(|t| t.id()) == Some(tree) {
        return Ok(None);
    }
    let made = making.elapsed();
    let packing = std::time::Instant::now();
    // The pack holds the blobs of `files` and the trees on the way to them: the blobs that
    // exist in memory are the ones made here; any other is the base's, already on disk.
    let mut pack = crate::pack::PlainPack::new();
    let new = status_tree(&memory, &memory.find_tree(tree)?, folder)?;
    for id in new.trees_on_the_way {
        pack.add(id, ObjectType::Tree, odb.read(id)?.data());
    }
    for entry in new.entries {
        let Some(kind @ (ObjectType::Blob | ObjectType::Tree)) = entry.kind else {
            continue;
        };
        match odb.read(entry.id) {
            Ok(object) => pack.add(entry.id, kind, object.data()),
            Err(e) if kind == ObjectType::Blob && e.code() == git2::ErrorCode::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    let pack = pack.finish();
    Ok(Some(NewTree {
        tree,
        pack,
        made,
        packed: packing.elapsed(),
    }))
}

/// Puts `pack` and its index into the clone's pack folder as git does: each written under a
/// temporary name and renamed, the index last, so no reader finds an index without its pack.
fn store_pack(folder: &Path, pack: &crate::pack::FinishedPack) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(folder)?;
    for (extension, bytes) in [("pack", &pack.pack), ("idx", &pack.index)] {
        let mut file = tempfile::Builder::new()
            .prefix("tmp_status_")
            .tempfile_in(folder)?;
        file.write_all(bytes)?;
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o444))?;
        file.persist(folder.join(format!("pack-{}.{extension}", pack.name)))
            .map_err(|e| e.error)?;
    }
    Ok(())
}

/// Copies into `memory` the trees a status update walks through: the root, `folder`, and the
/// status folder with its subfolders. Blobs are not copied: only new ones are ever read.
fn copy_trees(
    disk: &Repository,
    memory: &Repository,
    root: Oid,
    folder: &str,
) -> Result<Oid, SourceError> {
    let (disk_odb, memory_odb) = (disk.odb()?, memory.odb()?);
    let old = status_tree(disk, &disk.find_tree(root)?, folder)?;
    let subtrees = old
        .entries
        .iter()
        .filter(|entry| entry.kind == Some(ObjectType::Tree))
        .map(|entry| entry.id);
    for id in old.trees_on_the_way.into_iter().chain(subtrees) {
        memory_odb.write(ObjectType::Tree, disk_odb.read(id)?.data())?;
    }
    Ok(root)
}

/// `base` with `files` laid over `folder` and stale files under `folder/status` removed.
fn overlay(
    repo: &Repository,
    base: Option<&git2::Tree>,
    folder: &str,
    files: &BTreeMap<String, String>,
) -> Result<Oid, SourceError> {
    let mut update = TreeUpdateBuilder::new();
    if let Some(base) = base {
        for entry in status_tree(repo, base, folder)?.entries {
            // berth owns the YAML files under `status/`; a note someone keeps there stays.
            if entry.kind == Some(ObjectType::Blob)
                && entry.path.ends_with(".yaml")
                && !files.contains_key(&entry.path)
            {
                update.remove(join(folder, &entry.path));
            }
        }
    }
    for (path, text) in files {
        let blob = repo.blob(text.as_bytes())?;
        update.upsert(join(folder, path), blob, FileMode::Blob);
    }
    let empty;
    let base = match base {
        Some(base) => base,
        None => {
            empty = repo.find_tree(repo.treebuilder(None)?.write()?)?;
            &empty
        }
    };
    Ok(update.create_updated(repo, base)?)
}

/// Whether `known_hosts` lists `host` with exactly `key` (the raw key blob the server sent).
fn known_host(known_hosts: &Path, host: &str, key: &[u8]) -> bool {
    let Ok(text) = std::fs::read_to_string(known_hosts) else {
        return false;
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(key);
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .any(|line| {
            let mut fields = line.split_whitespace();
            let (Some(hosts), Some(_kind), Some(blob)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return false;
            };
            hosts.split(',').any(|h| {
                h == host
                    || h.strip_prefix('[')
                        .is_some_and(|h| h.starts_with(&format!("{host}]")))
            }) && blob == encoded
        })
}

/// How long libgit2 waits to connect to a git server, and for each read or write after.
pub const CONNECT_TIMEOUT_MS: i32 = 15_000;
/// See [`CONNECT_TIMEOUT_MS`]: a server that accepts and never answers is given up after this.
pub const SERVER_TIMEOUT_MS: i32 = 60_000;

/// Bytes of a pack file libgit2 maps at once (1 GiB by default on 64-bit).
const MWINDOW_SIZE: usize = 8 << 20;
/// Bytes of pack files libgit2 keeps mapped in all (8 GiB by default on 64-bit).
const MWINDOW_MAPPED_LIMIT: usize = 32 << 20;

/// Bounds every git network operation of this process (the config repo's fetch and push,
/// pipeline sources' clones): without it a server that accepts a connection and never answers
/// holds a fetch, and the agent's loop, for ever. Call once, before any git work.
pub fn set_network_timeouts() {
    // SAFETY: libgit2's global options are not synchronized; this runs in `main` before any
    // use of libgit2, so no thread is in it.
    #[allow(unsafe_code)]
    let set = unsafe {
        git2::opts::set_server_connect_timeout_in_milliseconds(CONNECT_TIMEOUT_MS)
            .and_then(|()| git2::opts::set_server_timeout_in_milliseconds(SERVER_TIMEOUT_MS))
            .and_then(|()| git2::opts::set_mwindow_size(MWINDOW_SIZE))
            .and_then(|()| git2::opts::set_mwindow_mapped_limit(MWINDOW_MAPPED_LIMIT))
    };
    if let Err(error) = set {
        tracing::warn!(%error, "cannot bound git's network timeouts");
    }
}

/// Where committed status is looked for by `berth status` and `berth plan --against-status`.
#[derive(Debug, Clone)]
pub struct StatusLocation {
    /// A folder inside a clone, or a repo URL.
    pub repo: String,
    /// The status branch; `""` for status kept under `.berth/` on `branch`.
    pub status_branch: String,
    /// The followed branch (used when `status_branch` is `""`).
    pub branch: String,
}

/// Reads committed status files. In a clone, the status branch is looked for as a local branch,
/// then as `origin`'s; a URL is fetched into a temporary repo. Paths are relative to the status
/// tree (`status/agent.yaml`, …).
pub fn committed_status(
    location: &StatusLocation,
    credentials: Option<&Source>,
) -> Result<BTreeMap<String, String>, SourceError> {
    let (branch, folder) = match location.status_branch.as_str() {
        "" => (location.branch.as_str(), ".berth"),
        branch => (branch, ""),
    };
    let path = Path::new(&location.repo);
    if path.exists() {
        let repo = Repository::discover(path).map_err(|e| {
            SourceError::Local(format!(
                "{} is not in a git repo: {}",
                path.display(),
                e.message()
            ))
        })?;
        for reference in [format!("refs/heads/{branch}"), tracking_ref(branch)] {
            let files = read_status_files(&repo, &reference, folder)?;
            if !files.is_empty() {
                return Ok(files);
            }
        }
        return Ok(BTreeMap::new());
    }
    let temporary = tempfile::tempdir()
        .map_err(|e| SourceError::Local(format!("cannot make a temporary folder: {e}")))?;
    let repo = Repository::init_bare(temporary.path())?;
    let mut remote = repo.remote_anonymous(&location.repo)?;
    // The agent's credentials (`BERTH_REPO_*`: a key, known hosts, a token) go to the config
    // repo's own server only.
    let mut options = git2::FetchOptions::new();
    if let Some(credentials) =
        credentials.filter(|c| crate::git_url::same_server(&c.url, &location.repo))
    {
        options.remote_callbacks(credentials.callbacks());
    }
    remote
        .fetch(&[tracking_refspec(branch)], Some(&mut options), None)
        .map_err(|e| match credentials.map(|c| c.unreachable(&e)) {
            Some(SourceError::Refused { reason, .. }) => SourceError::Refused {
                url: crate::git_url::redact(&location.repo),
                reason,
            },
            _ => SourceError::Unreachable {
                url: crate::git_url::redact(&location.repo),
                reason: e.message().to_string(),
            },
        })?;
    read_status_files(&repo, &tracking_ref(branch), folder)
}

/// The workspace of a pipeline run: the files of its `context` folder, and the clone they are
/// in (removed once the workspace, and every stream of it, is gone).
pub struct Workspace {
    /// The files.
    pub context: crate::build_context::BuildContext,
    clone: Option<std::sync::Arc<tempfile::TempDir>>,
}

impl Workspace {
    /// The workspace as a tar, streamed as it is read (see [`crate::build_context::BuildContext::into_stream`]).
    pub fn stream(
        &self,
    ) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
        self.context.clone().into_stream(self.clone.clone())
    }
}

/// What is broken in a clone (a truncated pack, a deleted `HEAD`): it is moved aside and made
/// again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokenClone {
    /// The repository or its object store does not open.
    #[error("{0}")]
    Unopenable(String),
    /// The remote is gone from its configuration.
    #[error("no remote {REMOTE}: {0}")]
    NoRemote(String),
    /// The index does not read.
    #[error("the index: {0}")]
    Index(String),
    /// The followed branch's ref does not read.
    #[error("the branch's ref: {0}")]
    BranchRef(String),
    /// The branch's last fetched commit, or its tree, does not read.
    #[error("{0}")]
    Tip(String),
    /// An object of the tree is missing or unreadable.
    #[error("{id}: {why}")]
    Object {
        /// The object's id.
        id: String,
        /// git's reason.
        why: String,
    },
}

/// Why a pipeline run's workspace could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// A commit was asked for, but the context is the config repo's folder as it is.
    #[error(
        "--commit needs spec.source: without one, the context is taken from the repo folder as it is"
    )]
    CommitWithoutSource,
    /// No temporary folder to clone into.
    #[error("cannot make a folder to clone into: {0}")]
    NoFolder(String),
    /// The source could not be fetched.
    #[error("cannot clone {url}: {why}")]
    Clone {
        /// The source's URL, with any password left out.
        url: String,
        /// git's reason.
        why: String,
    },
    /// The source has no such commit, branch or tag.
    #[error("{url} has no commit, branch or tag {wanted}")]
    NoSuchRevision {
        /// The source's URL, with any password left out.
        url: String,
        /// What was asked for.
        wanted: String,
    },
    /// What was asked for is no commit.
    #[error("{wanted} in {url} is not a commit: {why}")]
    NotACommit {
        /// The source's URL, with any password left out.
        url: String,
        /// What was asked for.
        wanted: String,
        /// git's reason.
        why: String,
    },
    /// The commit could not be read or checked out.
    #[error("cannot check out {wanted} of {url}: {why}")]
    CheckOut {
        /// The source's URL, with any password left out.
        url: String,
        /// What was asked for.
        wanted: String,
        /// git's reason.
        why: String,
    },
    /// `spec.context` is no folder of the source.
    #[error("spec.context: {0}")]
    Context(crate::descriptor::RepoPathError),
    /// The context's files could not be read.
    #[error("cannot read the context {context}: {source}")]
    ContextFiles {
        /// `spec.context`.
        context: String,
        /// Why.
        source: crate::build_context::ContextError,
    },
}

/// The workspace of a pipeline run (its `context` folder), and the commit it is at.
///
/// Without `source`, the config repo at `root` is the source (its commit is `HEAD` of the git
/// repository holding it, or `local` for a plain folder). With one, the source is cloned into a
/// temporary folder and checked out at `commit`, or else at its `ref`. `.dockerignore` in the
/// context is honoured; `.git` is never part of it.
pub fn pipeline_workspace(
    root: &Path,
    spec: &crate::descriptor::PipelineSpec,
    commit: Option<&str>,
    credentials: Option<&Source>,
) -> Result<(Workspace, String), WorkspaceError> {
    let mut clone = None;
    let (base, commit) = match &spec.source {
        None if commit.is_some() => {
            return Err(WorkspaceError::CommitWithoutSource);
        }
        None => {
            let head = Repository::discover(root)
                .ok()
                .and_then(|repo| Some(repo.head().ok()?.peel_to_commit().ok()?.id().to_string()));
            let commit = commit
                .map(str::to_string)
                .or(head)
                .unwrap_or_else(|| "local".into());
            (root.to_path_buf(), commit)
        }
        Some(source) => {
            let folder =
                tempfile::tempdir().map_err(|e| WorkspaceError::NoFolder(e.to_string()))?;
            let folder = clone.insert(folder);
            let shown = crate::git_url::redact(&source.url);
            // A fetch into a new repository, not a clone: a clone checks out its default branch
            // with libgit2, which reads every file whole (see `large_files`).
            let repo = Repository::init(folder.path())
                .map_err(|e| WorkspaceError::NoFolder(e.message().into()))?;
            let mut options = git2::FetchOptions::new();
            // The config repo's credentials go to its own server only: a descriptor must not be
            // able to send them anywhere else.
            if let Some(credentials) =
                credentials.filter(|c| crate::git_url::same_server(&c.url, &source.url))
            {
                options.remote_callbacks(credentials.callbacks());
            }
            repo.remote("origin", &source.url)
                .and_then(|mut remote| {
                    remote.fetch(
                        &[
                            "+HEAD:refs/remotes/origin/HEAD",
                            "+refs/heads/*:refs/remotes/origin/*",
                            "+refs/tags/*:refs/tags/*",
                        ],
                        Some(&mut options),
                        None,
                    )
                })
                .map_err(|e| WorkspaceError::Clone {
                    url: shown.clone(),
                    why: e.message().into(),
                })?;
            let wanted = commit.unwrap_or(&source.reference);
            let object = repo
                .revparse_single(wanted)
                .or_else(|_| repo.revparse_single(&format!("origin/{wanted}")))
                .map_err(|_| WorkspaceError::NoSuchRevision {
                    url: shown.clone(),
                    wanted: wanted.into(),
                })?;
            let found = object
                .peel_to_commit()
                .map_err(|e| WorkspaceError::NotACommit {
                    url: shown.clone(),
                    wanted: wanted.into(),
                    why: e.message().into(),
                })?;
            let tree = found.tree().map_err(|e| WorkspaceError::CheckOut {
                url: shown.clone(),
                wanted: wanted.into(),
                why: e.message().into(),
            })?;
            crate::large_files::checkout(&repo, &tree).map_err(|e| WorkspaceError::CheckOut {
                url: shown.clone(),
                wanted: wanted.into(),
                why: e.message().into(),
            })?;
            let _ = std::fs::remove_dir_all(folder.path().join(".git"));
            (folder.path().to_path_buf(), found.id().to_string())
        }
    };
    // The same rule as for a folder of the config repo: no way out of the clone.
    let base = base.canonicalize().unwrap_or(base);
    let folder =
        crate::descriptor::repo_folder(&base, &spec.context).map_err(WorkspaceError::Context)?;
    let context =
        crate::build_context::BuildContext::read(&folder, "Dockerfile").map_err(|source| {
            WorkspaceError::ContextFiles {
                context: spec.context.clone(),
                source,
            }
        })?;
    let workspace = Workspace {
        context,
        clone: clone.map(std::sync::Arc::new),
    };
    Ok((workspace, commit))
}
