//! Git pack files written plainly, with their index: each object stored whole, no delta search.
//!
//! A status commit stores a thousand small files that were never seen before, in one pack.
//! libgit2's pack builder, which has no switch for it, tried each against ten neighbours for a
//! delta, and that search was most of the commit's time; its indexer then read the pack back,
//! inflating and hashing every object again, for ids the in-memory repository had already
//! made. Here each object is stored in a zlib stream at level 0, as `git -c core.compression=0`
//! would (deflating even at level 1 cost 6.7 µs a small file, 1.0 µs stored), and the index is
//! written from the ids and offsets known as the pack is written. The clone's repack
//! (`source::repack_if_piled_up`) compresses and finds the deltas later, among all objects;
//! pushes build their own pack. The formats are git's `Documentation/gitformat-pack.txt`: pack
//! version 2 and index version 2.

use std::collections::HashSet;

use flate2::{Compress, Compression, FlushCompress, Status};
use git2::{ObjectType, Oid};

/// A pack being written: its header, its objects so far (each once: git refuses a pack that
/// holds one twice) with where each starts, and one deflate stream reused for each.
pub struct PlainPack {
    bytes: Vec<u8>,
    added: HashSet<Oid>,
    entries: Vec<Entry>,
    deflate: Compress,
}

/// One object's place in the pack, for the index.
struct Entry {
    id: Oid,
    offset: u64,
    crc32: u32,
}

/// A finished pack and its index, and the name git files them under (`pack-NAME.pack`,
/// `pack-NAME.idx`): the hex of the pack's checksum.
pub struct FinishedPack {
    /// The `.pack` file's bytes.
    pub pack: Vec<u8>,
    /// The `.idx` file's bytes.
    pub index: Vec<u8>,
    /// The pack's checksum in hex.
    pub name: String,
}

/// Bytes of the header: `PACK`, the version, the count of objects.
const HEADER_LEN: usize = 12;

impl PlainPack {
    /// An empty pack.
    pub fn new() -> Self {
        let mut bytes = Vec::with_capacity(64 << 10);
        bytes.extend_from_slice(b"PACK");
        bytes.extend_from_slice(&2u32.to_be_bytes());
        bytes.extend_from_slice(&0u32.to_be_bytes());
        Self {
            bytes,
            added: HashSet::new(),
            entries: Vec::new(),
            // Stored, not compressed: see the module's doc.
            deflate: Compress::new(Compression::none(), true),
        }
    }

    /// Adds object `id`, whole, unless the pack holds it already (two status folders can hold
    /// the same file, so the same tree). `kind` is a commit, tree, blob or tag; `id` must be its
    /// id, as libgit2 made it: the index is written from it.
    pub fn add(&mut self, id: Oid, kind: ObjectType, data: &[u8]) {
        if !self.added.insert(id) {
            return;
        }
        let code: u8 = match kind {
            ObjectType::Commit => 1,
            ObjectType::Tree => 2,
            ObjectType::Blob => 3,
            ObjectType::Tag => 4,
            ObjectType::Any => unreachable!("an object in a pack has a kind"),
        };
        let start = self.bytes.len();
        // The kind and the size, seven bits a byte after the first's four, lowest first.
        let mut size = data.len();
        let mut byte = (code << 4) | (size & 0x0f) as u8;
        size >>= 4;
        while size != 0 {
            self.bytes.push(byte | 0x80);
            byte = (size & 0x7f) as u8;
            size >>= 7;
        }
        self.bytes.push(byte);
        self.deflate.reset();
        loop {
            // Deflate's worst case is a few bytes over its input; ask for room enough at once.
            self.bytes.reserve(data.len() + 64);
            let read = usize::try_from(self.deflate.total_in()).unwrap_or(usize::MAX);
            let status = self
                .deflate
                .compress_vec(&data[read..], &mut self.bytes, FlushCompress::Finish)
                .expect("deflating bytes in memory cannot fail");
            if status == Status::StreamEnd {
                break;
            }
        }
        self.entries.push(Entry {
            id,
            offset: start as u64,
            crc32: crc32fast::hash(&self.bytes[start..]),
        });
    }

    /// The pack (its count set in the header, its SHA-1 after) and its index.
    pub fn finish(mut self) -> FinishedPack {
        let objects = u32::try_from(self.entries.len()).expect("a status pack holds few objects");
        self.bytes[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&objects.to_be_bytes());
        let checksum = openssl::sha::sha1(&self.bytes);
        self.bytes.extend_from_slice(&checksum);
        let index = index_of(&mut self.entries, &checksum);
        FinishedPack {
            pack: self.bytes,
            index,
            name: hex::encode(checksum),
        }
    }
}

/// The version 2 index of a pack's `entries`: its ids in order with a fan-out table over their
/// first byte, each one's CRC-32 and offset (offsets past 2 GiB in a table of their own), the
/// pack's checksum and the index's own.
fn index_of(entries: &mut [Entry], pack_checksum: &[u8; 20]) -> Vec<u8> {
    entries.sort_unstable_by_key(|entry| entry.id);
    let mut index = Vec::with_capacity(1072 + entries.len() * 28 + 40);
    index.extend_from_slice(b"\xfftOc");
    index.extend_from_slice(&2u32.to_be_bytes());
    // The fan-out: for each first byte, how many ids start with it or a lower one.
    let mut starting_with = [0u32; 256];
    for entry in entries.iter() {
        starting_with[usize::from(entry.id.as_bytes()[0])] += 1;
    }
    let mut below = 0u32;
    for count in starting_with {
        below += count;
        index.extend_from_slice(&below.to_be_bytes());
    }
    for entry in entries.iter() {
        index.extend_from_slice(entry.id.as_bytes());
    }
    for entry in entries.iter() {
        index.extend_from_slice(&entry.crc32.to_be_bytes());
    }
    let mut large = Vec::new();
    for entry in entries.iter() {
        let small = match u32::try_from(entry.offset) {
            Ok(offset) if offset < 0x8000_0000 => offset,
            _ => {
                large.push(entry.offset);
                0x8000_0000 | (large.len() as u32 - 1)
            }
        };
        index.extend_from_slice(&small.to_be_bytes());
    }
    for offset in large {
        index.extend_from_slice(&offset.to_be_bytes());
    }
    index.extend_from_slice(pack_checksum);
    let own = openssl::sha::sha1(&index);
    index.extend_from_slice(&own);
    index
}

impl Default for PlainPack {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A bare repository with `pack` and its index in its pack folder.
    fn repo_with(pack: &FinishedPack) -> (tempfile::TempDir, git2::Repository) {
        let dir = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init_bare(dir.path()).unwrap();
        let folder = dir.path().join("objects/pack");
        std::fs::write(folder.join(format!("pack-{}.pack", pack.name)), &pack.pack).unwrap();
        std::fs::write(folder.join(format!("pack-{}.idx", pack.name)), &pack.index).unwrap();
        (dir, repo)
    }

    #[test]
    fn git_verifies_a_plain_pack_and_its_index_and_libgit2_reads_each_object() {
        // Sizes around each boundary of the size's encoding, and one that deflate cannot shrink
        // (larger than one stored block).
        let noise: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut blobs: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"x".to_vec(),
            vec![b'a'; 15],
            vec![b'b'; 16],
            vec![b'c'; 2047],
            vec![b'd'; 2048],
            b"phase: Running\nimage: sha256:0123\n".repeat(400),
            noise,
        ];
        // Enough ids that the fan-out table has runs and gaps.
        blobs.extend((0..300).map(|i| format!("name: c-{i:04}\n").into_bytes()));
        let scratch = tempfile::tempdir().unwrap();
        let scratch = git2::Repository::init_bare(scratch.path()).unwrap();
        let mut tree = scratch.treebuilder(None).unwrap();
        let mut pack = PlainPack::new();
        let mut ids = Vec::new();
        for (i, blob) in blobs.iter().enumerate() {
            let id = scratch.blob(blob).unwrap();
            pack.add(id, ObjectType::Blob, blob);
            tree.insert(format!("{i}.yaml"), id, 0o100644).unwrap();
            ids.push(id);
        }
        // A file met twice (the same status in two folders) is packed once.
        pack.add(ids[1], ObjectType::Blob, &blobs[1]);
        let tree_id = tree.write().unwrap();
        let tree_bytes = scratch
            .odb()
            .unwrap()
            .read(tree_id)
            .unwrap()
            .data()
            .to_vec();
        pack.add(tree_id, ObjectType::Tree, &tree_bytes);
        let pack = pack.finish();
        let (dir, repo) = repo_with(&pack);

        let verify = Command::new("git")
            .args(["verify-pack", "-v"])
            .arg(
                dir.path()
                    .join(format!("objects/pack/pack-{}.idx", pack.name)),
            )
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stderr)
        );
        let listed = String::from_utf8_lossy(&verify.stdout);
        assert!(
            listed.contains(&format!("non delta: {} objects", blobs.len() + 1)),
            "{listed}"
        );
        for (blob, id) in blobs.iter().zip(&ids) {
            assert_eq!(repo.find_blob(*id).unwrap().content(), &blob[..]);
        }
        assert_eq!(repo.find_tree(tree_id).unwrap().len(), blobs.len());
    }

    #[test]
    fn offsets_past_two_gibibytes_go_to_the_large_offset_table() {
        let id = |byte: u8| Oid::from_bytes(&[byte; 20]).unwrap();
        let mut entries = vec![
            Entry {
                id: id(0xee),
                offset: 12,
                crc32: 7,
            },
            Entry {
                id: id(0x01),
                offset: 3 << 30,
                crc32: 9,
            },
        ];
        let index = index_of(&mut entries, &[0xab; 20]);
        let at = |offset: usize, len: usize| &index[offset..offset + len];
        let fanout = 8;
        // One id starts with 0x01, both with 0xee or below.
        assert_eq!(at(fanout, 4), 0u32.to_be_bytes());
        assert_eq!(at(fanout + 4, 4), 1u32.to_be_bytes());
        assert_eq!(at(fanout + 0xee * 4, 4), 2u32.to_be_bytes());
        assert_eq!(at(fanout + 255 * 4, 4), 2u32.to_be_bytes());
        let ids = fanout + 1024;
        assert_eq!(at(ids, 20), [0x01; 20]);
        let crcs = ids + 40;
        assert_eq!(at(crcs, 4), 9u32.to_be_bytes());
        let offsets = crcs + 8;
        assert_eq!(at(offsets, 4), 0x8000_0000u32.to_be_bytes());
        assert_eq!(at(offsets + 4, 4), 12u32.to_be_bytes());
        assert_eq!(at(offsets + 8, 8), (3u64 << 30).to_be_bytes());
        assert_eq!(at(offsets + 16, 20), [0xab; 20]);
        assert_eq!(index.len(), offsets + 16 + 40);
    }
}
