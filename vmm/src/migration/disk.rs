//! Block migration (`migrate` with `blk: true` or `inc: true`): the disks' contents travel
//! in the stream, for a destination with its own, empty images. The `vmm-blk` process of
//! each disk does the disk I/O, since it owns the image: it marks the chunks the guest
//! writes in a bitmap we share ([`ChunkBitmap`], set up by the device manager), reads
//! chunks into a buffer we share on the source and writes them from it on the destination
//! ([`DiskIo`]). The stream names the disks first ([`DiskInfo`]); the destination checks
//! them (size, backing file, lock) and answers before a chunk is sent.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::memory::DeviceMemory;

/// Chunks of 1 MiB, as QEMU's block migration sends them.
pub const CHUNK_SIZE: u64 = 1 << 20;
/// At most this many chunks in one read, write or stream record.
pub const TRANSFER_CHUNKS: u32 = 8;
/// How long a disk's I/O is retried while its process restarts.
const RESTART_GRACE: Duration = Duration::from_secs(15);

/// How the disks move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockMode {
    /// Shared storage: no disk contents in the stream.
    Shared,
    /// `blk`: every chunk of every writable disk.
    Full,
    /// `inc`: what each disk's top image holds over a backing file both sides have.
    Incremental,
}

/// One disk as the stream announces it, before any of its chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The drive's id (`-drive id=`).
    pub drive: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Only the top image's chunks come: the destination's image must have the same
    /// backing file.
    pub incremental: bool,
    /// The source's backing file, for an incremental migration.
    pub backing: Option<BackingId>,
}

/// What tells one backing file from another without trusting its name: its length and a
/// checksum of its first and last MiB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingId {
    /// The name the overlay records (for messages).
    pub filename: String,
    pub length: u64,
    pub crc: u32,
}

impl BackingId {
    /// Read from the open backing file.
    pub fn read(file: &std::fs::File, filename: &str) -> std::io::Result<BackingId> {
        use std::os::unix::fs::FileExt;
        let length = file.metadata()?.len();
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; CHUNK_SIZE.min(length) as usize];
        file.read_exact_at(&mut buf, 0)?;
        crc.update(&buf);
        let tail = length - buf.len() as u64;
        file.read_exact_at(&mut buf, tail)?;
        crc.update(&buf);
        Ok(BackingId {
            filename: filename.to_string(),
            length,
            crc: crc.finalize(),
        })
    }

    /// The same file's contents (names may differ: a copy in another directory is fine).
    pub fn same_file(&self, other: &BackingId) -> bool {
        self.length == other.length && self.crc == other.crc
    }
}

/// A disk's I/O, done by its device process: the buffer holds up to [`TRANSFER_CHUNKS`]
/// chunks, chunk `i` of a call at `i * CHUNK_SIZE`.
pub trait DiskIo: Send {
    /// Read `count` chunks from chunk `first` into `buffer`; which were all zeroes.
    fn read_chunks(
        &self,
        buffer: BorrowedFd<'_>,
        first: u64,
        count: u32,
    ) -> Result<Vec<bool>, String>;
    /// Write `zero.len()` chunks from chunk `first` out of `buffer` (zeroes where set).
    fn write_chunks(
        &self,
        buffer: BorrowedFd<'_>,
        first: u64,
        zero: Vec<bool>,
    ) -> Result<(), String>;
}

/// Retry `f` while a device process restarts (its I/O fails until the new one is up),
/// for at most [`RESTART_GRACE`]; `cancelled` stops the wait.
pub fn with_restarts<T>(
    cancelled: &dyn Fn() -> bool,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= RESTART_GRACE || cancelled() => return Err(e),
            Err(e) => {
                tracing::warn!("block migration: {e}; retrying while the device restarts");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// The bitmap a disk's device process marks the chunks the guest changes in: a memfd we
/// keep, so marks survive a crash of the process and its successor gets the same one.
pub struct ChunkBitmap {
    memory: DeviceMemory,
    chunks: u64,
    /// Chunks the bulk pass starts with (the process marked them at once).
    pub initial: AtomicU64,
}

impl ChunkBitmap {
    /// A bitmap for a disk of `size` bytes.
    pub fn new(size: u64) -> Result<ChunkBitmap, String> {
        let chunks = size.div_ceil(CHUNK_SIZE);
        let bytes = (chunks.div_ceil(64) * 8).max(8).next_multiple_of(4096);
        let memory = DeviceMemory::new("vmm-disk-bitmap", bytes as usize)
            .map_err(|e| format!("cannot create the disk's dirty bitmap: {e}"))?;
        Ok(ChunkBitmap {
            memory,
            chunks,
            initial: AtomicU64::new(0),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.memory.file().as_fd()
    }

    fn words(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: the mapping is page-aligned and `len` bytes long while self lives; the
        // process and we only access it atomically.
        unsafe {
            std::slice::from_raw_parts(
                self.memory.as_ptr().cast::<AtomicU64>(),
                self.memory.len() / 8,
            )
        }
    }

    /// The chunks marked since the last take, in order; cleared.
    pub fn take(&self) -> Vec<u64> {
        let mut set = Vec::new();
        for (w, word) in self.words().iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let chunk = w as u64 * 64 + u64::from(bits.trailing_zeros());
                if chunk < self.chunks {
                    set.push(chunk);
                }
                bits &= bits - 1;
            }
        }
        set
    }

    /// How many chunks are marked now (not cleared).
    pub fn count(&self) -> u64 {
        self.words()
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }
}

/// One disk of an outgoing block migration.
pub struct SourceDisk {
    pub info: DiskInfo,
    pub bitmap: Arc<ChunkBitmap>,
    pub io: Box<dyn DiskIo>,
}

/// The buffer chunks pass through between us and the device processes.
pub struct TransferBuffer {
    memory: DeviceMemory,
}

impl TransferBuffer {
    pub fn new() -> Result<TransferBuffer, String> {
        let len = (CHUNK_SIZE * u64::from(TRANSFER_CHUNKS)) as usize;
        DeviceMemory::new("vmm-disk-transfer", len)
            .map(|memory| TransferBuffer { memory })
            .map_err(|e| format!("cannot create the disk transfer buffer: {e}"))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.memory.file().as_fd()
    }

    /// Chunk `i`'s first `len` bytes.
    pub fn chunk(&self, i: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.memory.read(i * CHUNK_SIZE as usize, &mut v);
        v
    }

    pub fn set_chunk(&self, i: usize, data: &[u8]) {
        self.memory.write(i * CHUNK_SIZE as usize, data);
    }
}

/// Bytes of chunk `chunk` of a disk of `size` bytes (the last may be short).
pub fn chunk_len(chunk: u64, size: u64) -> u64 {
    size.saturating_sub(chunk * CHUNK_SIZE).min(CHUNK_SIZE)
}

/// Runs of consecutive chunks in `chunks` (sorted), at most [`TRANSFER_CHUNKS`] long: the
/// first chunk and the count of each.
pub fn runs(chunks: &[u64]) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for &c in chunks {
        match out.last_mut() {
            Some((first, n)) if *first + u64::from(*n) == c && *n < TRANSFER_CHUNKS => *n += 1,
            _ => out.push((c, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_group_into_runs_of_at_most_one_transfer() {
        assert_eq!(runs(&[]), []);
        assert_eq!(runs(&[0, 1, 2, 5, 7, 8]), [(0, 3), (5, 1), (7, 2)]);
        let many: Vec<u64> = (10..30).collect();
        assert_eq!(runs(&many), [(10, 8), (18, 8), (26, 4)]);
        assert_eq!(chunk_len(5, 5 * CHUNK_SIZE + 512), 512);
        assert_eq!(chunk_len(0, 5 * CHUNK_SIZE + 512), CHUNK_SIZE);
        assert_eq!(chunk_len(9, 5 * CHUNK_SIZE), 0);
    }

    #[test]
    fn the_bitmap_is_taken_and_cleared_and_cut_at_the_disk() {
        let b = ChunkBitmap::new(100 * CHUNK_SIZE + 1).unwrap();
        let words = b.words();
        words[0].fetch_or(0b1010, Ordering::AcqRel);
        words[1].fetch_or(1 << 36 | 1 << 37, Ordering::AcqRel); // chunks 100 and 101
        assert_eq!(b.count(), 4);
        assert_eq!(b.take(), [1, 3, 100], "chunk 101 is past the disk");
        assert_eq!(b.count(), 0);
        assert!(b.take().is_empty());
    }

    #[test]
    fn a_backing_file_is_known_by_its_contents() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("vmm-backing-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, byte: u8| {
            let path = dir.join(name);
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(&vec![byte; 3 << 20]).unwrap();
            std::fs::File::open(&path).unwrap()
        };
        let a = BackingId::read(&write("a", 1), "a").unwrap();
        let copy = BackingId::read(&write("copy", 1), "elsewhere/a").unwrap();
        let other = BackingId::read(&write("b", 2), "a").unwrap();
        assert!(a.same_file(&copy));
        assert!(!a.same_file(&other));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
