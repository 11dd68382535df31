//! A Docker build context read from a folder of the config repo: which files it holds (with
//! `.dockerignore` honoured), a digest of their content, and the tar the engine builds from.
//!
//! The digest is what makes builds content-addressed: the image is tagged by it, so an unchanged
//! context never rebuilds, and it is part of the challenge's spec hash, so a changed file is an update.
//! The tar is deterministic (sorted, zero times and owners) so the same context gives the same bytes.
//!
//! Memory is bounded by design, not by the context: files are hashed and archived a buffer at a
//! time, and [`BuildContext::into_stream`] hands the engine the tar as it is written, through a
//! channel of a few chunks, so a context of gigabytes costs the agent about a megabyte.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use sha2::{Digest, Sha256};

/// Why a build context could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// A file or folder of it could not be read, or the tar written: what was tried, and why.
    #[error("cannot {what}: {source}")]
    Io {
        /// `read site/index.html`, `add www to the build context`, …
        what: String,
        /// The system's reason.
        source: std::io::Error,
    },
    /// A file changed size while it was read: a tar of it would shift every later entry.
    #[error("{0} changed while it was read")]
    Changed(String),
    /// Its `.dockerignore` does not parse.
    #[error(".dockerignore: {0}")]
    Ignore(ignore::Error),
}

impl ContextError {
    /// The error of an I/O failure while doing `what`.
    fn io(what: String) -> impl FnOnce(std::io::Error) -> ContextError {
        move |source| ContextError::Io { what, source }
    }
}

/// One entry of a build context.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir,
    File { executable: bool, size: u64 },
    Symlink(PathBuf),
}

/// The files of a build context, sorted by path.
#[derive(Debug, Clone)]
pub struct BuildContext {
    root: PathBuf,
    entries: Vec<(String, Entry)>,
}

impl BuildContext {
    /// Lists the context at `root`, leaving out what `.dockerignore` excludes. The Dockerfile and
    /// `.dockerignore` are always kept, as Docker keeps them.
    pub fn read(root: &Path, dockerfile: &str) -> Result<BuildContext, ContextError> {
        let ignore = dockerignore(root)?;
        let mut entries = Vec::new();
        collect(root, root, &ignore, dockerfile, &mut entries)?;
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(BuildContext {
            root: root.to_path_buf(),
            entries,
        })
    }

    /// The bytes of its files together (what the tar carries, besides headers).
    pub fn size(&self) -> u64 {
        self.entries
            .iter()
            .map(|(_, entry)| match entry {
                Entry::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }

    /// Paths in the context, relative to its root.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(path, _)| path.as_str())
    }

    /// Its files (not folders or links), by path from its root, each with whether it is
    /// executable and its size.
    pub fn files(&self) -> Vec<(String, bool, u64)> {
        self.entries
            .iter()
            .filter_map(|(path, entry)| match entry {
                Entry::File { executable, size } => Some((path.clone(), *executable, *size)),
                _ => None,
            })
            .collect()
    }

    /// Hex SHA-256 over every path, its type, executable bit and content.
    pub fn digest(&self) -> Result<String, ContextError> {
        let mut hasher = Sha256::new();
        for (path, entry) in &self.entries {
            hasher.update(path.as_bytes());
            hasher.update([0]);
            match entry {
                Entry::Dir => hasher.update(b"d"),
                Entry::File { executable, size } => {
                    hasher.update(if *executable { b"x" } else { b"f" });
                    hasher.update(size.to_le_bytes());
                    let mut content = self.open(path, *size)?;
                    std::io::copy(&mut content, &mut HashWriter(&mut hasher))
                        .map_err(ContextError::io(format!("read {path}")))?;
                    if content.limit() != 0 {
                        return Err(ContextError::Changed(path.clone()));
                    }
                }
                Entry::Symlink(target) => {
                    hasher.update(b"l");
                    hasher.update(target.to_string_lossy().as_bytes());
                }
            }
            hasher.update([0]);
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// The context as an uncompressed tar, as the engine's build endpoint takes it.
    pub fn tar(&self) -> Result<Vec<u8>, ContextError> {
        self.write_tar(Vec::new())
    }

    /// Writes the context as an uncompressed tar into `out`, a buffer at a time.
    pub fn write_tar<W: Write>(&self, out: W) -> Result<W, ContextError> {
        let mut builder = tar::Builder::new(out);
        for (path, entry) in &self.entries {
            let mut header = tar::Header::new_gnu();
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            let result = match entry {
                Entry::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(0o755);
                    header.set_size(0);
                    builder.append_data(&mut header, path, std::io::empty())
                }
                Entry::File { executable, size } => {
                    let mut content = self.open(path, *size)?;
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(if *executable { 0o755 } else { 0o644 });
                    header.set_size(*size);
                    let appended = builder.append_data(&mut header, path, &mut content);
                    if appended.is_ok() && content.limit() != 0 {
                        // A shorter file would shift every later entry of the archive.
                        return Err(ContextError::Changed(path.clone()));
                    }
                    appended
                }
                Entry::Symlink(target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    builder.append_link(&mut header, path, target)
                }
            };
            result.map_err(ContextError::io(format!("add {path} to the build context")))?;
        }
        builder
            .into_inner()
            .map_err(ContextError::io("finish the build context".into()))
    }

    /// The tar as a stream of chunks, written on a blocking thread as the reader takes them:
    /// at most [`STREAM_CHUNKS`] chunks of [`STREAM_CHUNK`] bytes are in memory at once. `keep`
    /// lives as long as the writing (the clone the context is in). A failure to read ends the
    /// stream with an error, so the engine never gets a tar cut short as if it were whole.
    pub fn into_stream<K: Send + 'static>(
        self,
        keep: K,
    ) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_CHUNKS);
        tokio::task::spawn_blocking(move || {
            let _keep = keep;
            let mut out = ChunkWriter {
                sender,
                held: None,
                chunk: Vec::with_capacity(STREAM_CHUNK),
            };
            let written = self.write_tar(&mut out).and_then(|out| {
                out.finish()
                    .map_err(ContextError::io("hand the context on".into()))
            });
            if let Err(why) = written {
                // What was held back is never sent: after a failure the tar writer still ends
                // the archive, and the engine must not see a clean end of a partial one.
                let _ = out
                    .sender
                    .blocking_send(Err(std::io::Error::other(why.to_string())));
            }
        });
        received(receiver)
    }

    /// Opens a file of the context, to be read up to the `size` it had when listed.
    fn open(&self, path: &str, size: u64) -> Result<std::io::Take<std::fs::File>, ContextError> {
        std::fs::File::open(self.root.join(path))
            .map(|file| file.take(size))
            .map_err(ContextError::io(format!("read {path}")))
    }
}

/// What comes through `receiver`, as a stream that ends when every sender is gone.
pub fn received<T: Send + 'static>(
    receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(receiver, |mut receiver| async move {
        let item = receiver.recv().await?;
        Some((item, receiver))
    })
}

/// Bytes of one chunk of a streamed context.
const STREAM_CHUNK: usize = 256 * 1024;
/// Chunks of a streamed context that wait for the reader at most (one more is held back).
const STREAM_CHUNKS: usize = 4;

/// Hands what is written on, a chunk at a time, through a bounded channel: writing waits while
/// the reader is behind, and fails once the reader is gone. The last full chunk is held back
/// until the next one fills or the writing ends well, so nothing written after a failure (the
/// end-of-archive blocks a tar writer adds when it is dropped) ever goes out.
struct ChunkWriter {
    sender: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
    held: Option<Vec<u8>>,
    chunk: Vec<u8>,
}

impl ChunkWriter {
    fn send(&self, bytes: Vec<u8>) -> std::io::Result<()> {
        self.sender
            .blocking_send(Ok(bytes::Bytes::from(bytes)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the reader is gone"))
    }

    /// Sends what is held and what is written: the writing ended well.
    fn finish(&mut self) -> std::io::Result<()> {
        if let Some(held) = self.held.take() {
            self.send(held)?;
        }
        let last = std::mem::take(&mut self.chunk);
        if !last.is_empty() {
            self.send(last)?;
        }
        Ok(())
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let taken = buf.len().min(STREAM_CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&buf[..taken]);
        if self.chunk.len() == STREAM_CHUNK {
            let full = std::mem::replace(&mut self.chunk, Vec::with_capacity(STREAM_CHUNK));
            if let Some(held) = self.held.replace(full) {
                self.send(held)?;
            }
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Feeds what is written into a hash.
struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `.dockerignore` as a matcher. Docker anchors every pattern at the context's root (`foo` means
/// `./foo`, not any `foo`), so each pattern is anchored before it is given to the gitignore matcher.
fn dockerignore(root: &Path) -> Result<Gitignore, ContextError> {
    let mut builder = GitignoreBuilder::new(root);
    let path = root.join(".dockerignore");
    if let Ok(text) = std::fs::read_to_string(&path) {
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (negate, pattern) = match line.strip_prefix('!') {
                Some(rest) => ("!", rest.trim()),
                None => ("", line),
            };
            let pattern = pattern.trim_start_matches("./").trim_start_matches('/');
            builder
                .add_line(None, &format!("{negate}/{pattern}"))
                .map_err(ContextError::Ignore)?;
        }
    }
    builder.build().map_err(ContextError::Ignore)
}

fn collect(
    root: &Path,
    dir: &Path,
    ignore: &Gitignore,
    dockerfile: &str,
    entries: &mut Vec<(String, Entry)>,
) -> Result<(), ContextError> {
    let read =
        std::fs::read_dir(dir).map_err(ContextError::io(format!("read {}", dir.display())))?;
    for item in read {
        let item = item.map_err(ContextError::io(format!("read {}", dir.display())))?;
        let path = item.path();
        let relative = path
            .strip_prefix(root)
            .expect("walk stays under root")
            .to_string_lossy()
            .replace('\\', "/");
        let file_type = item
            .file_type()
            .map_err(ContextError::io(format!("stat {relative}")))?;
        // Git's own files are never part of a context: in a clone they change with every fetch
        // and status commit, which would make every build and digest new.
        if item.file_name() == ".git" {
            continue;
        }
        let always_kept = relative == dockerfile || relative == ".dockerignore";
        if !always_kept
            && ignore
                .matched_path_or_any_parents(&path, file_type.is_dir())
                .is_ignore()
        {
            continue;
        }
        if file_type.is_symlink() {
            let target = std::fs::read_link(&path)
                .map_err(ContextError::io(format!("read link {relative}")))?;
            entries.push((relative, Entry::Symlink(target)));
        } else if file_type.is_dir() {
            entries.push((relative, Entry::Dir));
            collect(root, &path, ignore, dockerfile, entries)?;
        } else if file_type.is_file() {
            let metadata = item
                .metadata()
                .map_err(ContextError::io(format!("stat {relative}")))?;
            let executable = executable(&metadata);
            let size = metadata.len();
            entries.push((relative, Entry::File { executable, size }));
        }
    }
    Ok(())
}

#[cfg(unix)]
fn executable(metadata: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    metadata.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn executable(_: &std::fs::Metadata) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        dir
    }

    #[test]
    fn dockerignore_patterns_are_anchored_and_negatable() {
        let dir = context(&[
            ("Dockerfile", "FROM busybox"),
            (
                ".dockerignore",
                "secret.txt\n*.log\n!keep.log\nnode_modules\n",
            ),
            ("secret.txt", "x"),
            ("app.log", "x"),
            ("keep.log", "x"),
            ("sub/secret.txt", "x"),
            ("node_modules/a.js", "x"),
            ("src/main.sh", "x"),
        ]);
        let read = BuildContext::read(dir.path(), "Dockerfile").unwrap();
        let paths: Vec<_> = read.paths().collect();
        assert_eq!(
            paths,
            vec![
                ".dockerignore",
                "Dockerfile",
                "keep.log",
                "src",
                "src/main.sh",
                "sub",
                "sub/secret.txt"
            ]
        );
    }

    #[test]
    fn digest_follows_content_not_time() {
        let dir = context(&[("Dockerfile", "FROM busybox"), ("a.txt", "one")]);
        let first = BuildContext::read(dir.path(), "Dockerfile")
            .unwrap()
            .digest()
            .unwrap();
        std::fs::write(dir.path().join("a.txt"), "one").unwrap();
        assert_eq!(
            BuildContext::read(dir.path(), "Dockerfile")
                .unwrap()
                .digest()
                .unwrap(),
            first
        );
        std::fs::write(dir.path().join("a.txt"), "two").unwrap();
        assert_ne!(
            BuildContext::read(dir.path(), "Dockerfile")
                .unwrap()
                .digest()
                .unwrap(),
            first
        );
    }

    #[test]
    fn tar_holds_the_kept_files() {
        let dir = context(&[
            ("Dockerfile", "FROM busybox"),
            (".dockerignore", "big\n"),
            ("big", "x"),
            ("run.sh", "echo"),
        ]);
        let bytes = BuildContext::read(dir.path(), "Dockerfile")
            .unwrap()
            .tar()
            .unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, vec![".dockerignore", "Dockerfile", "run.sh"]);
    }
}
