//! Checkouts whose memory does not follow the size of the files checked out.
//!
//! libgit2 reads a blob whole into memory before it writes it to the working tree (its pack
//! backend cannot stream), so a 500 MB file in a config repo or in a pipeline's source would
//! cost the agent 500 MB at every checkout. Here the blobs of at least [`STREAMED_FROM`] bytes
//! are written first, a buffer at a time: inflated straight from the pack file they arrived in
//! (or read as a stream when loose), each checked against its id once written. libgit2's
//! checkout then does the rest, from a baseline that already holds those blobs, so it finds them
//! in place and never loads them: libgit2 takes its baseline from `HEAD`, so `HEAD` points at a
//! stand-in commit (the previous tree with the streamed blobs in it) while it runs, and the
//! caller points it at the real commit after. A large blob stored as a delta of another (rare:
//! git does not delta files this large by default) is left to libgit2.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use git2::build::{CheckoutBuilder, TreeUpdateBuilder};
use git2::{ObjectType, Oid, Repository, Tree, TreeWalkMode, TreeWalkResult};

/// Blobs of at least this many bytes are streamed rather than read whole.
pub const STREAMED_FROM: usize = 8 << 20;

/// A large blob of a tree: where it goes, what it is, and whether it is executable.
struct LargeBlob {
    path: String,
    id: Oid,
    mode: i32,
}

/// Checks `tree` out into the working tree of `repo`, exactly (changed files rewritten, removed
/// ones deleted, stray ones cleaned), with its large blobs streamed. `HEAD` is left at a stand-in
/// commit when a blob was streamed: the caller points it where it belongs.
pub fn checkout(repo: &Repository, tree: &Tree) -> Result<(), git2::Error> {
    let before = repo.head().ok().and_then(|head| head.target());
    let checked_out = checkout_streamed(repo, tree);
    // A failure after `HEAD` moved to the stand-in puts it back: nothing may take the stand-in
    // for a revision.
    if checked_out.is_err()
        && let Some(before) = before
    {
        let _ = repo.set_head_detached(before);
    }
    checked_out
}

fn checkout_streamed(repo: &Repository, tree: &Tree) -> Result<(), git2::Error> {
    let workdir = repo
        .workdir()
        .ok_or_else(|| git2::Error::from_str("the repository has no working tree"))?
        .to_path_buf();
    let large = large_blobs(repo, tree)?;
    let mut baseline = TreeUpdateBuilder::new();
    let mut streamed = 0;
    for blob in &large {
        let Some(path) = inside(&workdir, &blob.path) else {
            // libgit2 refuses such a path itself, with its own error.
            continue;
        };
        if write_streamed(repo, blob.id, &path, blob.mode == 0o100755)? {
            let mode = match blob.mode {
                0o100755 => git2::FileMode::BlobExecutable,
                _ => git2::FileMode::Blob,
            };
            baseline.upsert(&blob.path, blob.id, mode);
            streamed += 1;
        }
    }
    if streamed > 0 {
        let before = match repo.head().ok().and_then(|head| head.peel_to_tree().ok()) {
            Some(before) => before,
            None => repo.find_tree(repo.treebuilder(None)?.write()?)?,
        };
        // A file or link where a streamed blob's folder now is goes first: a tree cannot hold
        // both.
        let mut in_the_way = TreeUpdateBuilder::new();
        for blob in &large {
            let mut prefix = String::new();
            for part in blob
                .path
                .split('/')
                .collect::<Vec<_>>()
                .split_last()
                .map_or(&[][..], |(_, folders)| folders)
            {
                prefix = if prefix.is_empty() {
                    part.to_string()
                } else {
                    format!("{prefix}/{part}")
                };
                if let Ok(entry) = before.get_path(Path::new(&prefix))
                    && entry.kind() != Some(ObjectType::Tree)
                {
                    in_the_way.remove(&prefix);
                }
            }
        }
        let before = repo.find_tree(in_the_way.create_updated(repo, &before)?)?;
        let stand_in = repo.find_tree(baseline.create_updated(repo, &before)?)?;
        let signature = git2::Signature::new("berth", "berth@localhost", &git2::Time::new(0, 0))?;
        let commit = repo.commit(
            None,
            &signature,
            &signature,
            "berth: a checkout's baseline, its large files already written",
            &stand_in,
            &[],
        )?;
        repo.set_head_detached(commit)?;
        // libgit2 compares with `HEAD` only once an index exists (a fresh clone has none).
        if !repo.path().join("index").exists() {
            repo.index()?.write()?;
        }
    }
    let mut options = CheckoutBuilder::new();
    options.force().remove_untracked(true);
    repo.checkout_tree(tree.as_object(), Some(&mut options))?;
    if streamed > 0 {
        index_streamed(repo, &workdir, &large)?;
    }
    Ok(())
}

/// Records the streamed blobs in the index with their files' stat data, as a checkout that
/// wrote them would (libgit2 left them out: it found them in place), so the index matches the
/// tree and the next checkout need not hash them.
fn index_streamed(
    repo: &Repository,
    workdir: &Path,
    large: &[LargeBlob],
) -> Result<(), git2::Error> {
    let mut index = repo.index()?;
    for blob in large {
        let Some(path) = inside(workdir, &blob.path) else {
            continue;
        };
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        index.add(&index_entry(&meta, blob))?;
    }
    index.write()
}

#[cfg(unix)]
fn index_entry(meta: &std::fs::Metadata, blob: &LargeBlob) -> git2::IndexEntry {
    use std::os::unix::fs::MetadataExt;
    // The index keeps 32 bits of each, as git does.
    let time =
        |seconds: i64, nanoseconds: i64| git2::IndexTime::new(seconds as i32, nanoseconds as u32);
    git2::IndexEntry {
        ctime: time(meta.ctime(), meta.ctime_nsec()),
        mtime: time(meta.mtime(), meta.mtime_nsec()),
        dev: meta.dev() as u32,
        ino: meta.ino() as u32,
        mode: blob.mode as u32,
        uid: meta.uid(),
        gid: meta.gid(),
        file_size: meta.len() as u32,
        id: blob.id,
        flags: blob.path.len().min(0xfff) as u16,
        flags_extended: 0,
        path: blob.path.as_bytes().to_vec(),
    }
}

#[cfg(not(unix))]
fn index_entry(meta: &std::fs::Metadata, blob: &LargeBlob) -> git2::IndexEntry {
    git2::IndexEntry {
        ctime: git2::IndexTime::new(0, 0),
        mtime: git2::IndexTime::new(0, 0),
        dev: 0,
        ino: 0,
        mode: blob.mode as u32,
        uid: 0,
        gid: 0,
        file_size: meta.len() as u32,
        id: blob.id,
        flags: blob.path.len().min(0xfff) as u16,
        flags_extended: 0,
        path: blob.path.as_bytes().to_vec(),
    }
}

/// The regular files of `tree` of at least [`STREAMED_FROM`] bytes.
fn large_blobs(repo: &Repository, tree: &Tree) -> Result<Vec<LargeBlob>, git2::Error> {
    let odb = repo.odb()?;
    let mut found = Vec::new();
    let mut failed = None;
    tree.walk(TreeWalkMode::PreOrder, |folder, entry| {
        let mode = entry.filemode();
        if entry.kind() != Some(ObjectType::Blob) || !(mode == 0o100644 || mode == 0o100755) {
            return TreeWalkResult::Ok;
        }
        match odb.read_header(entry.id()) {
            Ok((size, _)) if size >= STREAMED_FROM => found.push(LargeBlob {
                path: format!("{folder}{}", entry.name().unwrap_or_default()),
                id: entry.id(),
                mode,
            }),
            Ok(_) => {}
            Err(error) => {
                failed = Some(error);
                return TreeWalkResult::Abort;
            }
        }
        TreeWalkResult::Ok
    })?;
    match failed {
        Some(error) => Err(error),
        None => Ok(found),
    }
}

/// Where the tree path `relative` goes under `workdir`, when it is a plain relative path (no
/// `..`, no `.git`, nothing absolute). Pure.
fn inside(workdir: &Path, relative: &str) -> Option<PathBuf> {
    let mut path = workdir.to_path_buf();
    for component in Path::new(relative).components() {
        match component {
            Component::Normal(name) if !is_git_folder(&name.to_string_lossy()) => path.push(name),
            _ => return None,
        }
    }
    Some(path)
}

/// Whether some file system may take `name` for `.git`: any case, trailing dots or spaces, and
/// the short name `git~1`, as git's own path checks refuse them. Pure.
fn is_git_folder(name: &str) -> bool {
    name.trim_end_matches(['.', ' '])
        .eq_ignore_ascii_case(".git")
        || name.eq_ignore_ascii_case("git~1")
}

/// Writes blob `id` to `path`, streamed, and checks it against its id. Whatever stands in the
/// way (a stale symlink or file where the tree has a folder, a folder where it has this file)
/// is removed first, so nothing is ever written through a link. `false` when the blob cannot be
/// streamed (a delta): libgit2 then writes it.
fn write_streamed(
    repo: &Repository,
    id: Oid,
    path: &Path,
    executable: bool,
) -> Result<bool, git2::Error> {
    let io = |what: &str, e: std::io::Error| {
        git2::Error::from_str(&format!("cannot {what} {}: {e}", path.display()))
    };
    let workdir = repo.workdir().expect("checked by the caller");
    clear_the_way(workdir, path).map_err(|e| io("make the folders of", e))?;
    let odb = repo.odb()?;
    let mut content: Box<dyn Read> = match odb.reader(id) {
        Ok((loose, _, _)) => Box::new(loose),
        Err(_) => match packed(repo, id)? {
            Some(packed) => packed,
            None => return Ok(false),
        },
    };
    let mode = if executable { 0o755 } else { 0o644 };
    // Unchanged since the last checkout: nothing to write but its mode.
    if Oid::hash_file(ObjectType::Blob, path).ok() == Some(id) {
        set_mode(path, mode).map_err(|e| io("set the mode of", e))?;
        return Ok(true);
    }
    let _ = std::fs::remove_file(path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    let mut file = options.open(path).map_err(|e| io("write", e))?;
    let copied = std::io::copy(&mut content, &mut file).and_then(|_| file.flush());
    drop(file);
    if let Err(error) = copied {
        // No half-written file is left to pass for the whole one.
        let _ = std::fs::remove_file(path);
        return Err(io("write", error));
    }
    if Oid::hash_file(ObjectType::Blob, path)? != id {
        let _ = std::fs::remove_file(path);
        return Err(git2::Error::from_str(&format!(
            "{} does not match its blob {id} once written: the pack is damaged",
            path.display()
        )));
    }
    Ok(true)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

/// Makes every folder between `workdir` and `path` a real folder (a symlink or file in the way
/// is removed) and removes a folder standing at `path` itself.
fn clear_the_way(workdir: &Path, path: &Path) -> std::io::Result<()> {
    let relative = path.strip_prefix(workdir).expect("under the working tree");
    let mut at = workdir.to_path_buf();
    let parts: Vec<_> = relative.components().collect();
    for (index, part) in parts.iter().enumerate() {
        at.push(part);
        let last = index + 1 == parts.len();
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if last && meta.is_dir() => std::fs::remove_dir_all(&at)?,
            Ok(meta) if last && meta.file_type().is_symlink() => std::fs::remove_file(&at)?,
            Ok(meta) if !last && !meta.is_dir() => {
                std::fs::remove_file(&at)?;
                std::fs::create_dir(&at)?;
            }
            Err(error) if !last && error.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&at)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The content of the packed blob `id`, inflated from its pack as it is read; `None` when it is
/// stored as a delta or is in no pack.
fn packed(repo: &Repository, id: Oid) -> Result<Option<Box<dyn Read>>, git2::Error> {
    let packs = repo.path().join("objects").join("pack");
    let listed = std::fs::read_dir(&packs)
        .map_err(|e| git2::Error::from_str(&format!("cannot list {}: {e}", packs.display())))?;
    for index in listed.flatten().map(|e| e.path()) {
        if index.extension().is_none_or(|e| e != "idx") {
            continue;
        }
        let pack = index.with_extension("pack");
        // An index whose pack is gone (a crash between their writes or removals) is not one
        // libgit2 reads either; whatever this reader cannot read is left to libgit2.
        if !pack.is_file() {
            continue;
        }
        match pack_offset(&index, id) {
            Ok(Some(offset)) => return Ok(packed_blob(&pack, offset).unwrap_or(None)),
            Ok(None) => continue,
            Err(_) => return Ok(None),
        }
    }
    Ok(None)
}

/// Where object `id` starts in the pack that the version-2 index `index` describes, if it is in
/// it.
fn pack_offset(index: &Path, id: Oid) -> std::io::Result<Option<u64>> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut file = BufReader::new(File::open(index)?);
    let mut header = [0u8; 8];
    file.read_exact(&mut header)?;
    if header != [0xff, b't', b'O', b'c', 0, 0, 0, 2] {
        return Err(bad("not a version 2 pack index"));
    }
    let mut fanout = [0u8; 256 * 4];
    file.read_exact(&mut fanout)?;
    let count_before = |byte: usize| -> u64 {
        if byte == 0 {
            return 0;
        }
        let at = (byte - 1) * 4;
        u64::from(u32::from_be_bytes(
            fanout[at..at + 4].try_into().expect("4 bytes"),
        ))
    };
    let total = count_before(256);
    let wanted = id.as_bytes();
    let (mut low, mut high) = (
        count_before(usize::from(wanted[0])),
        count_before(usize::from(wanted[0]) + 1),
    );
    let names = 8 + 256 * 4;
    let mut name = [0u8; 20];
    let mut position = None;
    while low < high {
        let middle = low + (high - low) / 2;
        file.seek(SeekFrom::Start(names + middle * 20))?;
        file.read_exact(&mut name)?;
        match name.as_slice().cmp(wanted) {
            std::cmp::Ordering::Equal => {
                position = Some(middle);
                break;
            }
            std::cmp::Ordering::Less => low = middle + 1,
            std::cmp::Ordering::Greater => high = middle,
        }
    }
    let Some(position) = position else {
        return Ok(None);
    };
    let offsets = names + total * 20 + total * 4;
    let mut word = [0u8; 4];
    file.seek(SeekFrom::Start(offsets + position * 4))?;
    file.read_exact(&mut word)?;
    let small = u32::from_be_bytes(word);
    if small & 0x8000_0000 == 0 {
        return Ok(Some(u64::from(small)));
    }
    let mut large = [0u8; 8];
    file.seek(SeekFrom::Start(
        offsets + total * 4 + u64::from(small & 0x7fff_ffff) * 8,
    ))?;
    file.read_exact(&mut large)?;
    Ok(Some(u64::from_be_bytes(large)))
}

/// The blob at `offset` of `pack`, inflated as it is read; `None` when it is stored as a delta.
fn packed_blob(pack: &Path, offset: u64) -> std::io::Result<Option<Box<dyn Read>>> {
    let mut file = BufReader::new(File::open(pack)?);
    file.seek(SeekFrom::Start(offset))?;
    let mut byte = [0u8; 1];
    file.read_exact(&mut byte)?;
    let kind = (byte[0] >> 4) & 7;
    let mut size = u64::from(byte[0] & 0x0f);
    let mut shift = 4;
    while byte[0] & 0x80 != 0 {
        file.read_exact(&mut byte)?;
        if shift > 63 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "an object size past 64 bits",
            ));
        }
        size |= u64::from(byte[0] & 0x7f) << shift;
        shift += 7;
    }
    // 3 is a whole blob; 6 and 7 are deltas, which need their base.
    if kind != 3 {
        return Ok(None);
    }
    Ok(Some(Box::new(
        flate2::bufread::ZlibDecoder::new(file).take(size),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) -> String {
        let output = std::process::Command::new("git")
            .current_dir(dir)
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .output()
            .expect("git runs");
        assert!(output.status.success(), "git {args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    }

    /// A blob past the threshold, different for each `seed`.
    fn large(seed: u8) -> Vec<u8> {
        (0..STREAMED_FROM + 4096)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Large files come out of packs and loose objects exactly, executable bits kept; a changed
    /// one is rewritten, a removed one deleted, a small one written by libgit2 as before, and a
    /// stale symlink where the new tree has a folder is replaced, never written through.
    #[test]
    fn large_files_are_checked_out_exactly_from_packs_and_loose_objects() {
        let source = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let dir = source.path();
        git(dir, &["init", "-q"]);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("data/one.bin"), large(1)).unwrap();
        std::fs::write(dir.join("tool.bin"), large(2)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join("tool.bin"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        std::fs::write(dir.join("small.txt"), "small\n").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.join("link")).unwrap();
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-qm", "first"]);
        git(dir, &["repack", "-qad"]);

        // As berth fetches: into a new repository, the objects kept as the pack they came in.
        let clone = tempfile::tempdir().unwrap();
        git(clone.path(), &["init", "-q"]);
        git(
            clone.path(),
            &[
                "-c",
                "fetch.unpackLimit=1",
                "fetch",
                "-q",
                dir.to_str().unwrap(),
                "main",
            ],
        );
        let repo = Repository::open(clone.path()).unwrap();
        let first = git(clone.path(), &["rev-parse", "FETCH_HEAD"]);
        assert!(
            std::fs::read_dir(clone.path().join(".git/objects/pack"))
                .unwrap()
                .count()
                >= 2,
            "the fetch left no pack"
        );
        // The second commit's objects arrive loose (a fetch of few objects unpacks them): a
        // changed large file, one removed, and a folder where a symlink was.
        std::fs::write(dir.join("data/one.bin"), large(3)).unwrap();
        std::fs::remove_file(dir.join("tool.bin")).unwrap();
        std::fs::remove_file(dir.join("link")).unwrap();
        std::fs::create_dir(dir.join("link")).unwrap();
        std::fs::write(dir.join("link/inner.bin"), large(4)).unwrap();
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-qm", "second"]);
        git(
            clone.path(),
            &[
                "-c",
                "fetch.unpackLimit=1000",
                "fetch",
                "-q",
                dir.to_str().unwrap(),
                "main",
            ],
        );
        let second = git(clone.path(), &["rev-parse", "FETCH_HEAD"]);
        let at = |revision: &str| {
            let commit = repo.find_commit(Oid::from_str(revision).unwrap()).unwrap();
            checkout(&repo, &commit.tree().unwrap()).unwrap();
            repo.set_head_detached(commit.id()).unwrap();
        };
        at(&first);
        let work = clone.path();
        assert_eq!(std::fs::read(work.join("data/one.bin")).unwrap(), large(1));
        assert_eq!(std::fs::read(work.join("tool.bin")).unwrap(), large(2));
        assert_eq!(
            std::fs::read_to_string(work.join("small.txt")).unwrap(),
            "small\n"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(work.join("tool.bin"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o111, 0o111, "the executable bit is lost");
        }
        assert!(
            std::fs::symlink_metadata(work.join("link"))
                .unwrap()
                .file_type()
                .is_symlink()
        );

        at(&second);
        assert_eq!(std::fs::read(work.join("data/one.bin")).unwrap(), large(3));
        assert!(!work.join("tool.bin").exists(), "a removed file stays");
        assert!(
            std::fs::symlink_metadata(work.join("link"))
                .unwrap()
                .is_dir()
        );
        assert_eq!(
            std::fs::read(work.join("link/inner.bin")).unwrap(),
            large(4)
        );
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "something was written through the old symlink"
        );
        // Back again, and nothing is left over.
        at(&first);
        assert_eq!(std::fs::read(work.join("data/one.bin")).unwrap(), large(1));
        assert!(
            std::fs::symlink_metadata(work.join("link"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(git(work, &["status", "--porcelain"]), "");
    }

    #[test]
    fn only_plain_relative_paths_go_into_the_working_tree() {
        let root = Path::new("/clone");
        assert_eq!(
            inside(root, "a/b.bin"),
            Some(PathBuf::from("/clone/a/b.bin"))
        );
        assert_eq!(inside(root, "../x"), None);
        assert_eq!(inside(root, "a/../../x"), None);
        assert_eq!(inside(root, "/etc/passwd"), None);
        assert_eq!(inside(root, ".GIT/config"), None);
        assert_eq!(inside(root, "a/.git/hooks/x"), None);
        assert_eq!(inside(root, ".git./config"), None);
        assert_eq!(inside(root, ".Git  /config"), None);
        assert_eq!(inside(root, "GIT~1/config"), None);
        assert_eq!(
            inside(root, ".github/workflows/ci.yml"),
            Some(PathBuf::from("/clone/.github/workflows/ci.yml"))
        );
    }
}
