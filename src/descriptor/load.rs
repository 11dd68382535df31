//! Loading a config repo: every descriptor under a folder, or every problem that stops it.
//!
//! The loader walks the folder (skipping hidden entries such as `.git`, `.berth` and `.github`,
//! and paths in `.berthignore`), reads each YAML file within limits, checks each document against
//! its kind's schema and the semantic rules, and returns the typed descriptors with all problems at
//! once, each placed at a file, line and column.
//!
//! YAML files inside the folders descriptors use as build contexts, manifests or charts are assets
//! (a staging's Kubernetes manifests), not descriptors, and are set aside. But a file that looks like
//! a descriptor (`apiVersion: berth/…`) is never set aside: it is read, and the overlap is a problem
//! at the folder's path. A descriptor the loader skipped would look deleted, and pruning would
//! remove what it describes.
//!
//! What is plainly not berth's never rejects a revision: a document whose `apiVersion` is not
//! berth's and whose `kind` is none of berth's (a Kubernetes object left outside any staging's
//! folder), and the files of a Helm chart folder (one with `Chart.yaml`) that no staging uses, are
//! skipped with a warning at their place. Removing the last staging of a folder must not stop every
//! other change. A document that names berth's API, or one of its kinds, is never skipped.
//!
//! Positions are found lazily: files are parsed once without them, and only a file that has a problem
//! is parsed again to place it. So a clean repo of thousands of files keeps no position tables and no
//! parsed trees alive, only the typed descriptors.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ignore::gitignore::Gitignore;
use serde_json::Value;

use super::manifests;
use super::model::{API_VERSION, ChallengeSpec, Envelope, PipelineSpec, StagingSpec};
use super::schema::{self, MAX_VIOLATIONS, Violation};
use super::semantic;
use super::yaml::{self, Position, Wanted};
use super::{ContentDigest, Descriptor, FolderCopy, Kind, Problem, Spec, spec_hash};
use crate::build_context::BuildContext;

/// `errno` for "too many levels of symbolic links" on Linux.
const ELOOP: i32 = 40;

/// Default largest descriptor file: 4 MiB.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 4 << 20;

/// The host ports per-team instances take unless the agent says otherwise: below the range
/// Linux takes outgoing ports from (`net.ipv4.ip_local_port_range`, from 32768), where a port may
/// be taken the moment an instance needs it.
pub const DEFAULT_INSTANCE_PORTS: std::ops::RangeInclusive<u16> = 20000..=29999;

/// The NodePort range of a Kubernetes API server unless its `--service-node-port-range` says
/// otherwise.
pub const DEFAULT_NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

/// How the loader treats files, and where Challenges go.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Largest file, in bytes, the loader reads; a larger one is a problem.
    pub max_file_size: u64,
    /// Where a Challenge without a `target` runs (the agent's `defaultTarget`).
    pub default_target: super::model::Engine,
    /// The cluster's NodePort range: a host port of a Challenge on Kubernetes must be in it.
    pub node_ports: std::ops::RangeInclusive<u16>,
    /// The host ports per-team instances take (the agent's `instances.hostPorts`): a Challenge
    /// on Docker publishes none of them.
    pub instance_ports: std::ops::RangeInclusive<u16>,
    /// The agent's limits for what descriptors leave out, and whether privileged is allowed.
    pub walls: super::security::Walls,
    /// Whether the valid descriptors are kept, to plan and apply; `berth validate` keeps only
    /// what the checks across descriptors read of each, so its memory does not follow the size
    /// of the repo's documents.
    pub keep_descriptors: bool,
    /// The cluster Staging charts are rendered for, when one is known.
    pub cluster: Option<Arc<super::manifests::ClusterFacts>>,
}

impl LoadOptions {
    /// How Stagings are rendered under these options.
    pub fn rendering(&self) -> super::manifests::Rendering {
        super::manifests::Rendering {
            max_file_size: self.max_file_size,
            cluster: self.cluster.clone(),
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            default_target: super::model::Engine::Docker,
            node_ports: DEFAULT_NODE_PORTS,
            instance_ports: DEFAULT_INSTANCE_PORTS,
            walls: Default::default(),
            keep_descriptors: true,
            cluster: None,
        }
    }
}

/// Why loading could not even start: nothing here is the repo's fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The folder is missing or unreadable.
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The path is not a folder.
    #[error("{} is not a folder", .0.display())]
    NotAFolder(PathBuf),
}

/// A loaded config repo.
#[derive(Debug)]
pub struct Loaded {
    /// The repo's root, canonical.
    pub root: PathBuf,
    /// How its Stagings were rendered: one rendered again later (its tag known) is rendered the
    /// same way.
    pub rendering: super::manifests::Rendering,
    /// How many valid descriptors of each kind there are, whether they were kept or not.
    pub valid: BTreeMap<Kind, usize>,
    /// Valid descriptors, sorted by kind and name.
    pub descriptors: Vec<Descriptor>,
    /// Every problem, sorted by file, line and column. The repo is valid when this is empty.
    pub problems: Vec<Problem>,
    /// What was skipped because it is plainly not berth's (a Kubernetes object outside any
    /// staging's folder, a Helm chart no staging uses): said, never a reason to refuse the
    /// revision. A document that names berth's API is never among these.
    pub warnings: Vec<Problem>,
}

impl Loaded {
    /// Whether the repo has no problem.
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }

    /// `12 descriptors valid (4 Challenge, 3 Pipeline, 5 Staging)`.
    pub fn summary(&self) -> String {
        let counts: Vec<String> = Kind::ALL
            .iter()
            .map(|kind| format!("{} {kind}", self.valid.get(kind).copied().unwrap_or(0)))
            .collect();
        let n: usize = self.valid.values().sum();
        format!(
            "{n} descriptor{} valid ({})",
            if n == 1 { "" } else { "s" },
            counts.join(", ")
        )
    }
}

/// Loads every descriptor under `dir`.
pub fn load(dir: &Path, options: &LoadOptions) -> Result<Loaded, LoadError> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    load_with_readers(dir, options, cores.min(MAX_READERS))
}

/// [`load`], with at most `readers` threads reading files.
fn load_with_readers(
    dir: &Path,
    options: &LoadOptions,
    readers: usize,
) -> Result<Loaded, LoadError> {
    let root = dir.canonicalize().map_err(|source| LoadError::Unreadable {
        path: dir.to_path_buf(),
        source,
    })?;
    if !root.is_dir() {
        return Err(LoadError::NotAFolder(dir.to_path_buf()));
    }
    let mut loader = Loader::new(root, options.clone());
    let berthignore = manifests::berthignore(&loader.root);
    let mut visited = HashSet::from([loader.root.clone()]);
    let root = loader.root.clone();
    loader.walk(&root, &berthignore, &mut visited)?;
    loader.read_files(readers);
    loader.set_asset_files_aside();
    loader.report_manifest_problems();
    loader.check_repo();
    Ok(loader.finish())
}

/// Most threads reading a repo's files at once.
const MAX_READERS: usize = 8;

/// Fewest files worth a reader of their own: below it, a thread costs more than it saves.
const FILES_PER_READER: usize = 64;

/// Files a reader takes at a time: few enough to keep the readers even, enough that taking them
/// costs nothing.
const FILES_PER_TAKE: usize = 8;

/// Where a problem stands, before positions are known.
#[derive(Debug, Clone)]
enum Place {
    At(Position),
    Node {
        doc: usize,
        pointer: String,
        at_key: bool,
    },
}

#[derive(Debug)]
struct Pending {
    file: usize,
    place: Place,
    identity: Option<(String, Option<String>)>,
    message: String,
    /// A second place the message refers to ("also defined at …").
    also: Option<(usize, Place)>,
}

#[derive(Clone)]
struct SourceFile {
    relative: String,
    path: PathBuf,
    /// `(kind, name)` of each document, as far as they could be read.
    identities: Vec<Option<(String, Option<String>)>>,
    /// False for files already reported as unreadable (a link out of the repo, a loop).
    readable: bool,
    /// Whether some document in it looks like a descriptor: then it is never set aside as an asset.
    holds_descriptor: bool,
    /// Problems reported in it so far.
    problems: usize,
    /// Whether it could not be read (too large, not UTF-8): what it holds is unknown.
    unread: bool,
}

impl SourceFile {
    fn new(relative: String, path: PathBuf, readable: bool) -> SourceFile {
        SourceFile {
            relative,
            path,
            identities: Vec::new(),
            readable,
            holds_descriptor: false,
            problems: 0,
            unread: false,
        }
    }
}

/// Where a descriptor names a folder it builds from or deploys.
struct AssetUse {
    /// The path as written.
    written: String,
    file: usize,
    doc: usize,
    pointer: String,
}

/// A valid descriptor (or only what the checks across descriptors read of it, when the
/// descriptors are not kept) and the document it came from.
struct Candidate {
    facts: semantic::RepoFacts,
    /// Boxed: a candidate kept without its descriptor is then small.
    descriptor: Option<Box<Descriptor>>,
    file: usize,
    doc: usize,
}

struct Loader {
    root: PathBuf,
    options: LoadOptions,
    files: Vec<SourceFile>,
    pending: Vec<Pending>,
    candidates: Vec<Candidate>,
    /// Every `Kind/name` some document declares, valid or not: references to them are not "missing".
    declared: HashSet<(Kind, String)>,
    /// Folders descriptors build from or deploy (canonical, relative to the root, `""` for the
    /// root), and where they are named: their YAML files are not descriptors.
    asset_folders: HashMap<String, Vec<AssetUse>>,
    /// Problems in a staging's manifests: reported after asset files are set aside, since they
    /// are in those files.
    manifest_problems: Vec<((usize, usize), Pending)>,
    /// What is skipped as plainly not berth's, placed as problems are.
    warnings: Vec<Pending>,
    /// Files descriptors use as input (a chart's `valuesFiles`), relative to the root: not
    /// descriptors.
    asset_files: HashSet<String>,
    /// Folders holding a `Chart.yaml` (relative to the root): Helm charts, whose templates are
    /// not descriptors whether or not a staging uses them.
    chart_folders: Vec<String>,
}

impl Loader {
    fn new(root: PathBuf, options: LoadOptions) -> Loader {
        Loader {
            root,
            options,
            files: Vec::new(),
            pending: Vec::new(),
            candidates: Vec::new(),
            declared: HashSet::new(),
            asset_folders: HashMap::new(),
            manifest_problems: Vec::new(),
            warnings: Vec::new(),
            asset_files: HashSet::new(),
            chart_folders: Vec::new(),
        }
    }

    /// Reads every file found, on every core: each worker takes the next few files not yet
    /// taken into a shard of its own, so a worker that drew the costly ones (stagings rendering
    /// their manifests) does not hold the others up, and the shards are merged. What a file gives
    /// does not depend on any other file.
    fn read_files(&mut self, readers: usize) {
        let count = self.files.len();
        let workers = readers.min(count.div_ceil(FILES_PER_READER)).max(1);
        if workers == 1 {
            (0..count).for_each(|file| self.read_file(file));
            return;
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let shards: Vec<(Loader, Vec<usize>)> = std::thread::scope(|scope| {
            let readers: Vec<_> = (0..workers)
                .map(|_| {
                    let mut shard = self.shard();
                    let next = &next;
                    scope.spawn(move || {
                        let mut read = Vec::new();
                        loop {
                            let first = next.fetch_add(FILES_PER_TAKE, Ordering::Relaxed);
                            if first >= count {
                                break (shard, read);
                            }
                            for file in first..(first + FILES_PER_TAKE).min(count) {
                                shard.read_file(file);
                                read.push(file);
                            }
                        }
                    })
                })
                .collect();
            readers
                .into_iter()
                .map(|reader| reader.join().expect("a reader of the repo panicked"))
                .collect()
        });
        for (shard, read) in shards {
            self.absorb(shard, read.into_iter(), count);
        }
        // In the order of the walk again, as one reader would have left them, so what is
        // reported first (and kept under a file's cap) does not depend on the threads.
        for uses in self.asset_folders.values_mut() {
            uses.sort_by_key(|used| (used.file, used.doc));
        }
        // A manifest's problems, by the staging (file and document) that rendered it.
        self.manifest_problems.sort_by_key(|(origin, _)| *origin);
        self.candidates.sort_by_cached_key(|c| (c.file, c.doc));
    }

    /// A loader with this one's root, options and files, and nothing read yet.
    fn shard(&self) -> Loader {
        let mut shard = Loader::new(self.root.clone(), self.options.clone());
        // Whole copies: what the walk already said of a file (an unreadable one's problem)
        // comes back with it.
        shard.files = self.files.clone();
        shard
    }

    /// Takes what `shard` read of `read` (the first `walked` files are this loader's too; files
    /// it added after them, manifests with problems, are added here as well).
    fn absorb(&mut self, shard: Loader, read: impl Iterator<Item = usize>, walked: usize) {
        let Loader {
            files,
            pending,
            candidates,
            declared,
            asset_folders,
            manifest_problems,
            warnings,
            asset_files,
            ..
        } = shard;
        let mut files: Vec<Option<SourceFile>> = files.into_iter().map(Some).collect();
        for file in read {
            if let Some(read) = files[file].take() {
                self.files[file] = read;
            }
        }
        // Files the shard added are found here by their path, or added.
        let mut index_of = |file: usize, files: &mut Vec<Option<SourceFile>>| -> usize {
            if file < walked {
                return file;
            }
            let added = files[file].take();
            let relative = added.as_ref().map(|f| f.relative.clone());
            match self
                .files
                .iter()
                .position(|f| Some(&f.relative) == relative.as_ref())
            {
                Some(known) => known,
                None => {
                    self.files.push(added.expect("a file added once"));
                    self.files.len() - 1
                }
            }
        };
        let mut moved = HashMap::new();
        for (origin, mut problem) in manifest_problems {
            problem.file = *moved
                .entry(problem.file)
                .or_insert_with(|| index_of(problem.file, &mut files));
            self.manifest_problems.push((origin, problem));
        }
        self.pending.extend(pending);
        self.warnings.extend(warnings);
        // The first shard's candidates are taken as they are, not copied.
        match self.candidates.is_empty() {
            true => self.candidates = candidates,
            false => self.candidates.extend(candidates),
        }
        self.declared.extend(declared);
        self.asset_files.extend(asset_files);
        for (folder, uses) in asset_folders {
            self.asset_folders.entry(folder).or_default().extend(uses);
        }
    }

    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .replace('\\', "/")
    }

    fn file_problem(&mut self, relative: String, path: PathBuf, message: String) {
        self.files.push(SourceFile::new(relative, path, false));
        let file = self.files.len() - 1;
        self.report(Pending {
            file,
            place: Place::At(Position { line: 1, column: 1 }),
            identity: None,
            message,
            also: None,
        });
    }

    /// Records a problem. A file's problems are bounded: past [`MAX_VIOLATIONS`], one more says
    /// that there are more, so a hostile file cannot make an unbounded list.
    fn report(&mut self, mut pending: Pending) {
        let file = &mut self.files[pending.file];
        file.problems += 1;
        if file.problems > MAX_VIOLATIONS + 1 {
            return;
        }
        if file.problems == MAX_VIOLATIONS + 1 {
            pending.message = format!(
                "more than {MAX_VIOLATIONS} problems in this file; fix these and validate again to see the rest"
            );
            pending.also = None;
        }
        self.pending.push(pending);
    }

    fn walk(
        &mut self,
        dir: &Path,
        ignore: &Gitignore,
        visited: &mut HashSet<PathBuf>,
    ) -> Result<(), LoadError> {
        let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Unreadable {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name();
            // Hidden entries are tools' business, not descriptors: `.git`, `.berth` (status an
            // agent commits), `.github/workflows`, `.gitlab-ci.yml`.
            if name.as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            let relative = self.relative(&path);
            // `WEB.YAML` is as much a descriptor as `web.yaml`: skipping it would look like a deletion.
            let is_yaml = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
            if file_type.is_symlink() {
                let target = path.canonicalize();
                let target_is_dir = target.as_ref().is_ok_and(|t| t.is_dir());
                if ignore
                    .matched_path_or_any_parents(&path, target_is_dir)
                    .is_ignore()
                {
                    continue;
                }
                match target {
                    Err(error) if is_yaml || error.raw_os_error() == Some(ELOOP) => {
                        self.broken_link(relative, path, &error)
                    }
                    Err(_) => {}
                    Ok(_) if !(is_yaml || target_is_dir) => {}
                    Ok(target) if !target.starts_with(&self.root) => {
                        let message = format!(
                            "symlink points outside the repo (to {}); berth reads only files inside the repo",
                            target.display()
                        );
                        self.file_problem(relative, path, message);
                    }
                    Ok(target) if target_is_dir => {
                        if !visited.insert(target.clone()) {
                            let shown = match self.relative(&target) {
                                empty if empty.is_empty() => ".".to_string(),
                                shown => shown,
                            };
                            let message = format!(
                                "symlink loop: this link leads back to {shown}, which is already read; remove the link"
                            );
                            self.file_problem(relative, path, message);
                            continue;
                        }
                        self.walk(&path, ignore, visited)?;
                    }
                    Ok(_) => self.files.push(SourceFile::new(relative, path, true)),
                }
            } else if file_type.is_dir() {
                if ignore.matched_path_or_any_parents(&path, true).is_ignore() {
                    continue;
                }
                if let Ok(canonical) = path.canonicalize() {
                    visited.insert(canonical);
                }
                if path.join("Chart.yaml").is_file() {
                    self.chart_folders.push(relative.clone());
                }
                self.walk(&path, ignore, visited)?;
            } else if file_type.is_file()
                && is_yaml
                && !ignore.matched_path_or_any_parents(&path, false).is_ignore()
            {
                self.files.push(SourceFile::new(relative, path, true));
            }
        }
        Ok(())
    }

    fn broken_link(&mut self, relative: String, path: PathBuf, error: &std::io::Error) {
        let message = if error.raw_os_error() == Some(ELOOP) {
            "symlink loop: the link never resolves to a file; remove it or point it at a file"
                .to_string()
        } else {
            "symlink points to nothing; remove it or fix its target".to_string()
        };
        self.file_problem(relative, path, message);
    }

    /// Reads one file's text within the size limit; a problem otherwise.
    fn read_text(&self, path: &Path) -> Result<String, (Position, String)> {
        let start = Position { line: 1, column: 1 };
        let limit = self.options.max_file_size;
        let file =
            std::fs::File::open(path).map_err(|e| (start, format!("cannot read file: {e}")))?;
        let mut bytes = Vec::new();
        file.take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| (start, format!("cannot read file: {e}")))?;
        if bytes.len() as u64 > limit {
            return Err((
                start,
                format!(
                    "file is larger than the {} limit; split it into smaller files or raise --max-file-size",
                    human_size(limit)
                ),
            ));
        }
        String::from_utf8(bytes).map_err(|error| {
            let valid = &error.as_bytes()[..error.utf8_error().valid_up_to()];
            let valid = std::str::from_utf8(valid).expect("valid prefix");
            // Lines as YAML counts them: CR LF, a lone CR and LF each end one.
            let normalized = valid.replace("\r\n", "\n").replace('\r', "\n");
            let line = normalized.matches('\n').count() + 1;
            let column = normalized
                .rsplit('\n')
                .next()
                .map_or(0, |l| l.chars().count())
                + 1;
            (
                Position { line, column },
                "file is not valid UTF-8; save it as UTF-8".to_string(),
            )
        })
    }

    fn read_file(&mut self, file: usize) {
        if !self.files[file].readable {
            return;
        }
        let path = self.files[file].path.clone();
        let text = match self.read_text(&path) {
            Ok(text) => text,
            Err((at, message)) => {
                // Nothing in it could be seen: it may hold a descriptor, so no warning path may
                // set it aside.
                self.files[file].unread = true;
                self.report(Pending {
                    file,
                    place: Place::At(at),
                    identity: None,
                    message,
                    also: None,
                });
                return;
            }
        };
        let stream = yaml::read(&text, reading(), &mut BTreeMap::new());
        for (doc, document) in stream.documents.into_iter().enumerate() {
            self.read_document(file, doc, document);
        }
        if let Some(fatal) = stream.fatal {
            // The rest of the file was not read: it may still be a descriptor.
            if names_berth_api(&text) {
                self.files[file].holds_descriptor = true;
            }
            self.report(Pending {
                file,
                place: Place::At(fatal.at),
                identity: None,
                message: fatal.message,
                also: None,
            });
        }
    }

    fn read_document(&mut self, file: usize, doc: usize, document: yaml::Document) {
        let value = document.value;
        let identity = identity(&value);
        self.files[file].identities.push(identity.clone());
        for problem in document.problems {
            self.report(Pending {
                file,
                place: Place::At(problem.at),
                identity: identity.clone(),
                message: problem.message,
                also: None,
            });
        }
        if value.is_null() {
            return;
        }
        if looks_like_descriptor(&value) {
            self.files[file].holds_descriptor = true;
            self.note_asset_folders(file, doc, &value);
        }
        if !value.is_object() {
            self.report(Pending {
                file,
                place: Place::At(document.start),
                identity: None,
                message: "a descriptor must be a mapping with apiVersion, kind, metadata and spec"
                    .into(),
                also: None,
            });
            return;
        }
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .and_then(|k| k.parse::<Kind>().ok());
        if let (Some(kind), Some((_, Some(name)))) = (kind, &identity) {
            self.declared.insert((kind, name.clone()));
        }
        if kind.is_none()
            && let Some(Value::String(version)) = value.get("apiVersion")
            && !may_be_berths(version, value.get("kind"))
        {
            // A Kubernetes object outside any staging's folder (its staging removed, or a file
            // of another tool): one problem that says what to do, not one per schema rule.
            let what = value
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("object");
            self.warnings.push(Pending {
                file,
                place: Place::Node {
                    doc,
                    pointer: "/apiVersion".into(),
                    at_key: false,
                },
                identity: identity.clone(),
                message: format!(
                    "skipped: not a berth descriptor ({what} of apiVersion {version}); if it is a Kubernetes manifest, name its folder in a Staging's spec.manifests, or list the file in .berthignore"
                ),
                also: None,
            });
            return;
        }
        let violations = schema::check(kind, &value);
        if !violations.is_empty() || kind.is_none() {
            self.push_violations(file, doc, &identity, violations);
            return;
        }
        let kind = kind.expect("checked above");
        let line = document.start.line;
        let relative = self.files[file].relative.clone();
        match typed(kind, value, relative, line) {
            Ok(mut descriptor) => {
                // The target is settled here, so everything after sees where a Challenge runs;
                // Docker, the usual engine, is left unwritten, so its spec hash stays as it was.
                if let Spec::Challenge(spec) = &mut descriptor.spec {
                    let target = spec.target.unwrap_or(self.options.default_target);
                    spec.target = (target != super::model::Engine::Docker).then_some(target);
                }
                let violations = semantic::check_descriptor(&self.root, &descriptor, &self.options);
                if !violations.is_empty() {
                    self.push_violations(file, doc, &identity, violations);
                    return;
                }
                // Limits nobody wrote come from the agent's defaults, here, so they are part of
                // the spec hash: a change of defaults is a change the plan shows.
                let defaults = &self.options.walls.defaults;
                match &mut descriptor.spec {
                    Spec::Challenge(spec) => spec.settle_limits(defaults),
                    Spec::Pipeline(spec) => spec.settle_limits(defaults),
                    Spec::Staging(spec) => {
                        if let (Some(chart), Some(_)) = (&spec.chart, &spec.tag)
                            && !manifests::chart_reads_tag(&self.root, chart, spec)
                        {
                            self.warnings.push(Pending {
                                file,
                                place: Place::Node {
                                    doc,
                                    pointer: "/spec/tag".into(),
                                    at_key: false,
                                },
                                identity: identity.clone(),
                                message: format!(
                                    "spec.tag reaches no part of chart {chart}: no template reads .Values.tag and no string of spec.values holds ${{tag}}, so changing it changes nothing; pass it where the chart reads its image tag, e.g. values: {{image: {{tag: \"${{tag}}\"}}}}"
                                ),
                                also: None,
                            });
                        }
                    }
                }
                if !self.render(&mut descriptor, &identity, (file, doc)) {
                    return;
                }
                let facts = semantic::RepoFacts::of(&descriptor);
                // Hashes read build contexts and copied folders; they matter only to a plan.
                let descriptor = self.options.keep_descriptors.then(|| {
                    self.hash(&mut descriptor);
                    Box::new(descriptor)
                });
                self.candidates.push(Candidate {
                    facts,
                    descriptor,
                    file,
                    doc,
                });
            }
            Err(violation) => self.push_violations(file, doc, &identity, vec![violation]),
        }
    }

    fn push_violations(
        &mut self,
        file: usize,
        doc: usize,
        identity: &Option<(String, Option<String>)>,
        violations: Vec<Violation>,
    ) {
        for violation in violations {
            self.report(Pending {
                file,
                place: Place::Node {
                    doc,
                    pointer: violation.pointer,
                    at_key: violation.at_key,
                },
                identity: identity.clone(),
                message: violation.message,
                also: None,
            });
        }
    }

    /// Renders a Staging's manifests (or its chart); false when they have problems, which are
    /// kept by `origin` (the staging's file and document) and reported at their own files.
    fn render(
        &mut self,
        descriptor: &mut Descriptor,
        identity: &Option<(String, Option<String>)>,
        origin: (usize, usize),
    ) -> bool {
        let Spec::Staging(spec) = &descriptor.spec else {
            return true;
        };
        match manifests::render(&self.root, spec, &self.options.rendering()) {
            Ok(rendered) => {
                descriptor.manifests = Some(rendered);
                true
            }
            Err(problems) => {
                for problem in problems {
                    let file = match self.files.iter().position(|f| f.relative == problem.file) {
                        Some(file) => file,
                        None => {
                            let path = self.root.join(&problem.file);
                            self.files
                                .push(SourceFile::new(problem.file.clone(), path, true));
                            self.files.len() - 1
                        }
                    };
                    let pending = Pending {
                        file,
                        place: Place::At(problem.at),
                        identity: identity.clone(),
                        message: problem.message,
                        also: None,
                    };
                    self.manifest_problems.push((origin, pending));
                }
                false
            }
        }
    }

    /// Reads the build context (once per load) and hashes the descriptor with its digest.
    fn hash(&self, descriptor: &mut Descriptor) {
        // The semantic checks proved the folders exist; an unreadable file still changes the
        // hash rather than failing the load.
        let digest_of = |folder: &str, dockerfile: &str| match BuildContext::read(
            &self.root.join(folder),
            dockerfile,
        )
        .and_then(|c| c.digest())
        {
            Ok(digest) => ContentDigest::Read(digest),
            Err(why) => ContentDigest::Unreadable(why.to_string()),
        };
        if let Spec::Challenge(spec) = &descriptor.spec {
            if let Some(build) = &spec.build {
                descriptor.build_digest = Some(digest_of(&build.context, &build.dockerfile));
            }
            // A sidecar built from a folder changes with its files, as the main container does.
            for sidecar in &spec.sidecars {
                if let Some(build) = &sidecar.build {
                    let digest = digest_of(&build.context, &build.dockerfile);
                    descriptor
                        .sidecar_builds
                        .insert(sidecar.name.to_string(), digest);
                }
            }
            // A folder a volume copies in changes the challenge when its files change.
            let folders = spec
                .volumes
                .iter()
                .chain(spec.sidecars.iter().flat_map(|s| &s.volumes))
                .filter_map(|v| v.from.as_deref());
            for folder in folders {
                let read = BuildContext::read(&self.root.join(folder), "")
                    .and_then(|context| Ok((context.digest()?, context.files())));
                let copy = match read {
                    Ok((digest, files)) => FolderCopy {
                        digest: ContentDigest::Read(digest),
                        files,
                    },
                    Err(why) => FolderCopy {
                        digest: ContentDigest::Unreadable(why.to_string()),
                        files: Vec::new(),
                    },
                };
                descriptor.folders.insert(folder.to_string(), copy);
            }
        }
        // A Pipeline that builds from a folder of this repo runs again when the folder changes,
        // and so does one whose step image is built from a folder that changed.
        if let Spec::Pipeline(spec) = &descriptor.spec {
            let mut digests = Vec::new();
            if spec.source.is_none() {
                digests.push(digest_of(&spec.context, "Dockerfile"));
            }
            if let crate::descriptor::model::StepImage::Build(image) = &spec.image {
                digests.push(digest_of(&image.build.context, &image.build.dockerfile));
            }
            let joined = digests
                .iter()
                .map(ContentDigest::hashed)
                .collect::<Vec<_>>()
                .join("+");
            descriptor.build_digest = match digests.iter().all(|d| d.short().is_ok()) {
                _ if digests.is_empty() => None,
                true => Some(ContentDigest::Read(joined)),
                false => Some(ContentDigest::Unreadable(joined)),
            };
        }
        let mut digest = descriptor
            .build_digest
            .as_ref()
            .map_or(String::new(), |d| d.hashed().to_string());
        for (folder, copy) in &descriptor.folders {
            digest.push_str(&format!("+{folder}:{}", copy.digest.hashed()));
        }
        for (sidecar, build) in &descriptor.sidecar_builds {
            digest.push_str(&format!("+sidecar {sidecar}:{}", build.hashed()));
        }
        let rendered = match &descriptor.manifests {
            Some(Ok(manifests)) => {
                serde_json::to_string(&manifests.iter().map(|m| &m.object).collect::<Vec<_>>())
                    .expect("JSON serializes")
            }
            Some(Err(why)) => why.to_string(),
            None => String::new(),
        };
        descriptor.spec_hash = spec_hash(
            descriptor.kind(),
            &descriptor.metadata,
            &descriptor.spec,
            &[&digest, &rendered],
        );
    }

    fn note_asset_folders(&mut self, file: usize, doc: usize, value: &Value) {
        let Some(spec) = value.get("spec") else {
            return;
        };
        // A chart's values files are its input, not descriptors.
        for written in spec
            .get("valuesFiles")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if let Ok(canonical) = self.root.join(written).canonicalize()
                && canonical.starts_with(&self.root)
                && canonical.is_file()
            {
                let relative = self.relative(&canonical);
                self.asset_files.insert(relative);
            }
        }
        for (pointer, written) in folders_named(spec) {
            // Folders only: a path to a file is reported by the semantic checks.
            if let Ok(canonical) = self.root.join(written).canonicalize()
                && canonical.starts_with(&self.root)
                && canonical.is_dir()
            {
                let folder = self.relative(&canonical);
                self.asset_folders
                    .entry(folder)
                    .or_default()
                    .push(AssetUse {
                        written: written.to_string(),
                        file,
                        doc,
                        pointer,
                    });
            }
        }
    }

    /// Sets aside the files inside asset folders (a staging's Kubernetes manifests are not
    /// descriptors), except those that hold descriptors: those stay, and each folder that holds
    /// one is a problem at its path.
    fn set_asset_files_aside(&mut self) {
        self.set_unused_charts_aside();
        if self.asset_folders.is_empty() {
            return;
        }
        let mut aside = HashSet::new();
        // The descriptor files inside each asset folder.
        let mut overlaps: HashMap<&str, Vec<usize>> = HashMap::new();
        for (index, file) in self.files.iter().enumerate() {
            let canonical = file
                .path
                .canonicalize()
                .unwrap_or_else(|_| file.path.clone());
            let relative = self.relative(&canonical);
            // Looked up by the folders the file is in, so the cost does not grow with the
            // number of asset folders.
            let folders = std::iter::once("")
                .chain(relative.match_indices('/').map(|(at, _)| &relative[..at]));
            for (folder, _) in folders.filter_map(|f| self.asset_folders.get_key_value(f)) {
                if file.holds_descriptor {
                    overlaps.entry(folder.as_str()).or_default().push(index);
                } else {
                    aside.insert(index);
                }
            }
        }
        let problems: Vec<Pending> = overlaps
            .iter()
            .flat_map(|(folder, overlap)| {
                self.asset_folders[*folder]
                    .iter()
                    .map(|used| self.overlap_problem(used, overlap))
            })
            .collect();
        self.set_aside(&aside);
        for problem in problems {
            self.report(problem);
        }
    }

    /// Forgets what was read from the files `aside` as descriptors: they are assets. What was
    /// counted against one while it was read so is gone with it; its count must go too, or the
    /// problems found in it as a manifest would be dropped as over the limit (and a staging with
    /// a broken manifest would vanish, and be pruned).
    fn set_aside(&mut self, aside: &HashSet<usize>) {
        self.pending.retain(|p| !aside.contains(&p.file));
        self.warnings.retain(|p| !aside.contains(&p.file));
        self.candidates.retain(|c| !aside.contains(&c.file));
        for file in aside {
            self.files[*file].problems = 0;
        }
    }

    /// Sets aside the files of Helm charts that no staging uses (their templates are Go
    /// templates, their `values.yaml` no descriptor), with one warning per chart. A file in one
    /// that holds a berth descriptor stays a descriptor.
    fn set_unused_charts_aside(&mut self) {
        let values_files: HashSet<usize> = (0..self.files.len())
            .filter(|&i| {
                let file = &self.files[i];
                !file.holds_descriptor && !file.unread && self.asset_files.contains(&file.relative)
            })
            .collect();
        self.set_aside(&values_files);
        let unused: Vec<String> = self
            .chart_folders
            .iter()
            .filter(|folder| !self.asset_folders.contains_key(folder.as_str()))
            .cloned()
            .collect();
        if unused.is_empty() {
            return;
        }
        let inside = |relative: &str| {
            unused.iter().any(|folder| {
                relative
                    .strip_prefix(folder.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
            })
        };
        let aside: HashSet<usize> = (0..self.files.len())
            .filter(|&index| {
                let file = &self.files[index];
                !file.holds_descriptor && !file.unread && inside(&file.relative)
            })
            .collect();
        self.set_aside(&aside);
        for folder in unused {
            let relative = format!("{folder}/Chart.yaml");
            let path = self.root.join(&relative);
            self.files.push(SourceFile::new(relative, path, false));
            self.warnings.push(Pending {
                file: self.files.len() - 1,
                place: Place::At(Position { line: 1, column: 1 }),
                identity: None,
                message: format!(
                    "skipped: {folder} is a Helm chart that no Staging uses (name it in a Staging's spec.chart to deploy it)"
                ),
                also: None,
            });
        }
    }

    /// Reports the problems found in staging manifests, which asset files do not hide.
    fn report_manifest_problems(&mut self) {
        for (_, problem) in std::mem::take(&mut self.manifest_problems) {
            self.report(problem);
        }
    }

    /// The problem at `used`: its folder holds the descriptor files `overlap` (at least one).
    fn overlap_problem(&self, used: &AssetUse, overlap: &[usize]) -> Pending {
        let (what, content) = match used.pointer.as_str() {
            "/spec/manifests" => ("manifests folder", "manifests"),
            "/spec/chart" => ("chart folder", "chart"),
            volume if volume.ends_with("/from") => ("volume folder", "files"),
            _ => ("build context", "build files"),
        };
        let more = match overlap.len() {
            1 => String::new(),
            n => format!(" and {} more", n - 1),
        };
        let message = format!(
            "{}: {what} \"{}\" holds descriptor {}{more}; move the {content} to a folder of their own",
            schema::dotted(&used.pointer),
            used.written,
            self.files[overlap[0]].relative,
        );
        Pending {
            file: used.file,
            place: Place::Node {
                doc: used.doc,
                pointer: used.pointer.clone(),
                at_key: false,
            },
            identity: self.files[used.file]
                .identities
                .get(used.doc)
                .cloned()
                .flatten(),
            message,
            also: None,
        }
    }

    fn check_repo(&mut self) {
        let descriptors: Vec<&semantic::RepoFacts> =
            self.candidates.iter().map(|c| &c.facts).collect();
        for problem in semantic::check_repo(&descriptors, &self.declared) {
            let at = &self.candidates[problem.at];
            let identity = Some((
                at.facts.key().kind.to_string(),
                Some(at.facts.key().name.to_string()),
            ));
            let also = problem.also.map(|(other, pointer)| {
                let other = &self.candidates[other];
                (
                    other.file,
                    Place::Node {
                        doc: other.doc,
                        pointer,
                        at_key: false,
                    },
                )
            });
            self.report(Pending {
                file: at.file,
                place: Place::Node {
                    doc: at.doc,
                    pointer: problem.pointer,
                    at_key: false,
                },
                identity,
                message: problem.message,
                also,
            });
        }
        let invalid: HashSet<usize> = self.pending.iter().map(|p| p.file).collect();
        self.candidates.retain(|c| !invalid.contains(&c.file));
    }

    fn finish(self) -> Loaded {
        // Parse again only the files that have something to place, recording the positions of
        // only the nodes to place: by file, by document.
        let mut needed: BTreeMap<usize, BTreeMap<usize, Wanted>> = BTreeMap::new();
        for pending in self.pending.iter().chain(&self.warnings) {
            for (file, place) in std::iter::once((pending.file, &pending.place))
                .chain(pending.also.iter().map(|(f, p)| (*f, p)))
            {
                if let Place::Node { doc, pointer, .. } = place {
                    needed
                        .entry(file)
                        .or_default()
                        .entry(*doc)
                        .or_default()
                        .insert(pointer);
                }
            }
        }
        for (file, wanted) in needed.iter_mut() {
            if let Ok(text) = self.read_text(&self.files[*file].path) {
                yaml::read(&text, reading(), wanted);
            }
        }
        let start = Position { line: 1, column: 1 };
        let place = |file: usize, place: &Place| -> (Position, String) {
            match place {
                Place::At(at) => (*at, String::new()),
                Place::Node {
                    doc,
                    pointer,
                    at_key,
                } => {
                    let at = needed
                        .get(&file)
                        .and_then(|docs| docs.get(doc))
                        .and_then(|wanted| wanted.locate(pointer, *at_key))
                        .unwrap_or(start);
                    // The path shown stops where a secret starts.
                    let path = schema::secret_part(pointer).unwrap_or_else(|| pointer.clone());
                    (at, path)
                }
            }
        };
        let to_problem = |pending: &Pending| {
            let (at, path) = place(pending.file, &pending.place);
            let mut message = pending.message.clone();
            if let Some((file, other)) = &pending.also {
                let (other_at, _) = place(*file, other);
                message.push_str(&format!(
                    " at {}:{}:{}",
                    self.files[*file].relative, other_at.line, other_at.column
                ));
            }
            let (kind, name) = pending
                .identity
                .clone()
                .map_or((None, None), |(k, n)| (Some(k), n));
            Problem {
                file: self.files[pending.file].relative.clone(),
                line: at.line,
                column: at.column,
                kind,
                name,
                path,
                message,
            }
        };
        let sorted = |pending: &[Pending]| {
            let mut problems: Vec<Problem> = pending.iter().map(to_problem).collect();
            problems.sort_by(|a, b| {
                (&a.file, a.line, a.column, &a.message)
                    .cmp(&(&b.file, b.line, b.column, &b.message))
            });
            problems.dedup();
            problems
        };
        let problems = sorted(&self.pending);
        let warnings = sorted(&self.warnings);
        // Sorted by key before the candidates are unwrapped. The order is total (keys, then
        // places), so an unstable sort in place is as good, and needs no scratch space: the
        // candidates are large.
        let mut candidates = self.candidates;
        candidates.sort_unstable_by(|a, b| {
            (a.facts.key(), a.file, a.doc).cmp(&(b.facts.key(), b.file, b.doc))
        });
        let mut valid = BTreeMap::new();
        for candidate in &candidates {
            *valid.entry(candidate.facts.key().kind).or_insert(0) += 1;
        }
        let descriptors: Vec<Descriptor> = candidates
            .into_iter()
            .filter_map(|c| c.descriptor.map(|d| *d))
            .collect();
        Loaded {
            root: self.root,
            rendering: self.options.rendering(),
            valid,
            descriptors,
            problems,
            warnings,
        }
    }
}

/// How the loader reads YAML: positions only when asked, and no key named inside a secret.
fn reading() -> yaml::Reading<'static> {
    yaml::Reading {
        all_positions: false,
        secret_fields: schema::secret_fields(),
    }
}

/// Whether a document looks like a descriptor, valid or not: its `apiVersion` is berth's, or it
/// names one of berth's kinds and no `apiVersion` at all.
fn looks_like_descriptor(value: &Value) -> bool {
    match value.get("apiVersion") {
        Some(Value::String(version)) => is_berth_api(version),
        Some(_) => false,
        None => value
            .get("kind")
            .and_then(Value::as_str)
            .is_some_and(|kind| kind.parse::<Kind>().is_ok()),
    }
}

/// Whether a document may have been meant as berth's, however mistyped: an `apiVersion` that
/// names berth in any case or form (`Berth/v1`, `berth`), or a `kind` that is berth's in any case
/// (`challenge`). Such a document is never skipped as another tool's: it is checked, and its
/// mistake is a problem. Pure.
fn may_be_berths(version: &str, kind: Option<&Value>) -> bool {
    version.to_ascii_lowercase().contains("berth")
        || kind.and_then(Value::as_str).is_some_and(|kind| {
            Kind::ALL
                .iter()
                .any(|k| k.as_str().eq_ignore_ascii_case(kind.trim()))
        })
}

/// Whether an `apiVersion` is berth's, at any version (`berth/v1`, `berth/v2`…).
fn is_berth_api(version: &str) -> bool {
    let family = |version: &str| {
        version
            .split_once('/')
            .map(|(family, _)| family.to_string())
    };
    family(version).is_some_and(|f| Some(f) == family(API_VERSION))
}

/// Whether the text says `apiVersion: berth/…` anywhere, quoted or not: for files whose YAML
/// could not be read to the end.
fn names_berth_api(text: &str) -> bool {
    text.match_indices("apiVersion").any(|(at, key)| {
        let rest = text[at + key.len()..].trim_start_matches(['"', '\'']);
        let Some(value) = rest.trim_start().strip_prefix(':') else {
            return false;
        };
        let value = value.trim_start().trim_start_matches(['"', '\'']);
        is_berth_api(
            value
                .split([' ', '"', '\'', ',', '}', '\n'])
                .next()
                .unwrap_or_default(),
        )
    })
}

/// `(kind, name)` as far as a raw document says them.
fn identity(value: &Value) -> Option<(String, Option<String>)> {
    let kind = value.get("kind")?.as_str()?.to_string();
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_string);
    Some((kind, name))
}

/// The typed descriptor of a document that matches its schema. Where the types are stricter than
/// the schema (a whole number written `2.0`), the problem is placed at the value.
fn typed(kind: Kind, value: Value, file: String, line: usize) -> Result<Descriptor, Violation> {
    fn parts<S: serde::de::DeserializeOwned>(
        value: Value,
    ) -> Result<(super::Metadata, S), Violation> {
        // Tracking the path costs an allocation per key: only a document the types refuse pays
        // for finding where.
        if let Ok(envelope) = <Envelope<S> as serde::Deserialize>::deserialize(&value) {
            return Ok((envelope.metadata, envelope.spec));
        }
        let envelope: Envelope<S> = serde_path_to_error::deserialize(value).map_err(|error| {
            let mut pointer = String::new();
            for segment in error.path().iter() {
                match segment {
                    serde_path_to_error::Segment::Map { key } => {
                        pointer.push('/');
                        pointer.push_str(&yaml::escaped(key));
                    }
                    serde_path_to_error::Segment::Seq { index } => {
                        pointer.push_str(&format!("/{index}"));
                    }
                    _ => {}
                }
            }
            let message = match schema::secret_part(&pointer) {
                Some(shown) => schema::secret_message(&shown),
                None => format!("{}: {}", schema::dotted(&pointer), error.inner()),
            };
            Violation {
                pointer,
                at_key: false,
                message,
            }
        })?;
        Ok((envelope.metadata, envelope.spec))
    }
    let (metadata, spec) = match kind {
        Kind::Challenge => {
            parts::<ChallengeSpec>(value).map(|(m, s)| (m, Spec::Challenge(Box::new(s))))?
        }
        Kind::Pipeline => parts::<PipelineSpec>(value).map(|(m, s)| (m, Spec::Pipeline(s)))?,
        Kind::Staging => parts::<StagingSpec>(value).map(|(m, s)| (m, Spec::Staging(s)))?,
    };
    Ok(Descriptor {
        metadata,
        spec,
        file,
        line,
        spec_hash: String::new(),
        build_digest: None,
        folders: BTreeMap::new(),
        sidecar_builds: BTreeMap::new(),
        manifests: None,
    })
}

fn human_size(bytes: u64) -> String {
    super::values::Size { bytes }
        .to_string()
        .replace("Ki", " KiB")
        .replace("Mi", " MiB")
        .replace("Gi", " GiB")
}

/// The folders a descriptor's `spec` names (a build context, manifests, a chart, the folders
/// volumes copy in, the main container's and each sidecar's), with the JSON pointer each is
/// written at. Walked field by field: a pointer string is made only for a folder found.
fn folders_named(spec: &Value) -> Vec<(String, &str)> {
    fn text(found: Option<&Value>) -> Option<&str> {
        found.and_then(Value::as_str)
    }
    fn context(holder: &Value) -> Option<&Value> {
        holder.get("build")?.get("context")
    }
    let mut named = Vec::new();
    if let Some(written) = text(context(spec)) {
        named.push(("/spec/build/context".to_string(), written));
    }
    for field in ["manifests", "chart"] {
        if let Some(written) = text(spec.get(field)) {
            named.push((format!("/spec/{field}"), written));
        }
    }
    if let Some(written) = text(spec.get("image").and_then(context)) {
        named.push(("/spec/image/build/context".to_string(), written));
    }
    let sidecars = spec
        .get("sidecars")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for (index, sidecar) in sidecars.iter().enumerate() {
        if let Some(written) = text(context(sidecar)) {
            named.push((format!("/spec/sidecars/{index}/build/context"), written));
        }
    }
    volume_folders(spec, "/spec", &mut named);
    for (index, sidecar) in sidecars.iter().enumerate() {
        volume_folders(sidecar, &format!("/spec/sidecars/{index}"), &mut named);
    }
    named
}

/// The folders the volumes of `holder` (written at `at`) copy in (`from:`).
fn volume_folders<'v>(holder: &'v Value, at: &str, named: &mut Vec<(String, &'v str)>) {
    let volumes = holder.get("volumes").and_then(Value::as_array);
    for (index, volume) in volumes.into_iter().flatten().enumerate() {
        if let Some(written) = volume.get("from").and_then(Value::as_str) {
            named.push((format!("{at}/volumes/{index}/from"), written));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repo of a few hundred files with every kind of problem a reader can find: schema and
    /// semantic problems, a name declared twice in files far apart, a file past the cap on
    /// problems, manifests with a problem of their own, a file that is not berth's.
    fn mixed_repo(dir: &Path) {
        std::fs::create_dir_all(dir.join("deploy")).unwrap();
        std::fs::write(
            dir.join("deploy/app.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: app}\ndata: {level: \"${overrides.MISSING}\"}\n",
        )
        .unwrap();
        for i in 0..300 {
            let text = match i % 7 {
                0 => format!(
                    "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: bad-{i}}}\nspec:\n  image: busybox:latest\n  ports: [{{container: 99999}}]\n"
                ),
                1 => format!(
                    "apiVersion: berth/v1\nkind: Staging\nmetadata: {{name: stage-{i}}}\nspec:\n  namespace: stage-{i}\n  manifests: deploy\n"
                ),
                2 => "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: stray}\n".into(),
                _ => format!(
                    "apiVersion: berth/v1\nkind: Challenge\nmetadata: {{name: c-{i}}}\nspec:\n  image: busybox:latest\n  ports: [{{container: 80, host: {}}}]\n",
                    20000 + i
                ),
            };
            std::fs::write(dir.join(format!("f-{i:03}.yaml")), text).unwrap();
        }
        // The same name in the first file and the last, and one file past the cap.
        std::fs::write(
            dir.join("a-first.yaml"),
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: twice}\nspec: {image: busybox:latest}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("z-last.yaml"),
            "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: twice}\nspec: {image: busybox:latest}\n",
        )
        .unwrap();
        let many: String = (0..150).map(|i| format!("---\nkind: Nope{i}\n")).collect();
        std::fs::write(dir.join("m-many.yaml"), many).unwrap();
    }

    #[test]
    fn validating_without_keeping_descriptors_finds_exactly_the_same_problems() {
        let dir = tempfile::tempdir().unwrap();
        mixed_repo(dir.path());
        // Every check across descriptors, each tripped once.
        let cross = [
            (
                "x-deps.yaml",
                "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: needs, dependsOn: [Pipeline/gone]}\nspec: {image: busybox:latest}\n",
            ),
            (
                "x-pipe.yaml",
                "apiVersion: berth/v1\nkind: Pipeline\nmetadata: {name: quiet}\nspec:\n  context: deploy\n  image: busybox:latest\n  steps: [{name: s, run: 'true'}]\n",
            ),
            (
                "x-uses.yaml",
                "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: uses}\nspec: {image: {fromPipeline: quiet}}\n",
            ),
            (
                "x-port-1.yaml",
                "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: port-1}\nspec: {image: busybox:latest, ports: [{container: 80, host: 8081}]}\n",
            ),
            (
                "x-port-2.yaml",
                "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: port-2}\nspec: {image: busybox:latest, ports: [{container: 81, host: 8081}]}\n",
            ),
            (
                "xm/svc.yaml",
                "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: NodePort\n  ports: [{port: 80, nodePort: 30080}]\n",
            ),
            (
                "x-ns-1.yaml",
                "apiVersion: berth/v1\nkind: Staging\nmetadata: {name: ns-1}\nspec: {namespace: shared, manifests: xm}\n",
            ),
            (
                "x-ns-2.yaml",
                "apiVersion: berth/v1\nkind: Staging\nmetadata: {name: ns-2}\nspec: {namespace: shared, manifests: xm}\n",
            ),
            (
                "x-node.yaml",
                "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: node}\nspec: {image: busybox:latest, target: kubernetes, ports: [{container: 80, host: 30080}]}\n",
            ),
            (
                "x-a.yaml",
                "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: ring-a, dependsOn: [Challenge/ring-b]}\nspec: {image: busybox:latest}\n",
            ),
            (
                "x-b.yaml",
                "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: ring-b, dependsOn: [Challenge/ring-a]}\nspec: {image: busybox:latest}\n",
            ),
            (
                "x-team.yaml",
                "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: team}\nspec:\n  image: busybox:latest\n  target: kubernetes\n  ports: [{container: 80}]\n  instanced: {ttl: 10m}\n",
            ),
            (
                "x-reach.yaml",
                "apiVersion: berth/v1\nkind: Challenge\nmetadata: {name: reach}\nspec: {image: busybox:latest, target: kubernetes, network: {allowConnectTo: [Challenge/team]}}\n",
            ),
        ];
        std::fs::create_dir_all(dir.path().join("xm")).unwrap();
        for (file, text) in cross {
            std::fs::write(dir.path().join(file), text).unwrap();
        }
        let kept = load(dir.path(), &LoadOptions::default()).unwrap();
        for wanted in [
            "Pipeline/gone does not exist",
            "produces no image",
            "is also claimed by",
            "is also the namespace of",
            "is a NodePort, and Service/web of Staging/ns-1",
            "dependency cycle",
            "is instanced",
            "duplicate Challenge/twice",
        ] {
            assert!(
                kept.problems.iter().any(|p| p.message.contains(wanted)),
                "{wanted}: {:?}",
                kept.problems
            );
        }
        let validated = load(
            dir.path(),
            &LoadOptions {
                keep_descriptors: false,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        assert_eq!(validated.problems, kept.problems);
        assert_eq!(validated.warnings, kept.warnings);
        assert_eq!(validated.valid, kept.valid);
        assert_eq!(validated.summary(), kept.summary());
        assert!(validated.descriptors.is_empty());
        assert_eq!(kept.descriptors.len(), kept.valid.values().sum::<usize>());
    }

    #[test]
    fn reading_on_several_threads_finds_exactly_what_one_reader_finds() {
        let dir = tempfile::tempdir().unwrap();
        mixed_repo(dir.path());
        let options = LoadOptions::default();
        let alone = load_with_readers(dir.path(), &options, 1).unwrap();
        assert!(alone.problems.len() > 100, "{}", alone.problems.len());
        assert!(!alone.warnings.is_empty());
        assert!(
            alone.problems.iter().any(|p| p.file == "deploy/app.yaml"),
            "a manifest's problem is found"
        );
        for readers in [2, 3, 8] {
            let together = load_with_readers(dir.path(), &options, readers).unwrap();
            assert_eq!(together.problems, alone.problems, "{readers} readers");
            assert_eq!(together.warnings, alone.warnings, "{readers} readers");
            assert_eq!(together.descriptors, alone.descriptors, "{readers} readers");
        }
    }
}
