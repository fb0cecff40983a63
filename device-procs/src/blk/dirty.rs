//! Which chunks of the disk the guest changed, for block migration (`migrate blk:true`):
//! a bitmap in a memfd the vmm shares, turned on before the bulk pass reads the disk; the
//! vmm takes (and clears) the bits of each pass, and the last ones once the queues have
//! stopped. A chunk is marked after its write completed, so a read that raced the write is
//! sent again. The bitmap lives in the vmm's memfd: marks survive a crash of this process,
//! and a restarted one is handed the same bitmap.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::RwLock;

use crate::shared_map::SharedMapping;

/// The dirty-chunk set; off until [`DirtyChunks::start`].
#[derive(Default)]
pub struct DirtyChunks {
    state: RwLock<Option<Tracking>>,
}

impl std::fmt::Debug for DirtyChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyChunks")
            .field("tracking", &self.is_tracking())
            .finish()
    }
}

struct Tracking {
    chunk_size: u64,
    /// Chunks the disk has (a mark past them is cut there).
    chunks: u64,
    /// One bit per chunk, shared with the vmm.
    bits: SharedMapping,
}

/// Bytes of bitmap that `chunks` chunks need (whole 64-bit words).
pub fn bitmap_bytes(chunks: u64) -> u64 {
    chunks.div_ceil(64) * 8
}

impl DirtyChunks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start tracking a disk of `capacity` bytes in chunks of `chunk_size` bytes (a power
    /// of two, at least a sector), marking into the bitmap `fd`.
    pub fn start(&self, chunk_size: u64, capacity: u64, fd: &OwnedFd) -> Result<(), String> {
        if !chunk_size.is_power_of_two() || chunk_size < 512 {
            return Err(format!("a chunk of {chunk_size} bytes"));
        }
        let chunks = capacity.div_ceil(chunk_size);
        let bytes = usize::try_from(bitmap_bytes(chunks).max(8))
            .map_err(|_| format!("a disk of {capacity} bytes"))?;
        let bits = SharedMapping::new(fd, bytes, true)
            .map_err(|e| format!("cannot map the dirty bitmap: {e}"))?;
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Some(Tracking {
            chunk_size,
            chunks,
            bits,
        });
        Ok(())
    }

    pub fn stop(&self) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn is_tracking(&self) -> bool {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The guest changed `len` bytes at `offset` (a write, a discard, zeroes).
    pub fn mark(&self, offset: u64, len: u64) {
        let guard = self.state.read().unwrap_or_else(|e| e.into_inner());
        let Some(t) = guard.as_ref() else {
            return;
        };
        if len == 0 || t.chunks == 0 {
            return;
        }
        let first = offset / t.chunk_size;
        let last = (offset.saturating_add(len - 1) / t.chunk_size).min(t.chunks - 1);
        t.mark_chunks(first, last + 1);
    }

    /// Mark chunks `first..end` (cut at the disk's last); how many that was.
    pub fn mark_chunks(&self, first: u64, end: u64) -> u64 {
        let guard = self.state.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(t) => t.mark_chunks(first, end.min(t.chunks)),
            None => 0,
        }
    }
}

impl Tracking {
    fn mark_chunks(&self, first: u64, end: u64) -> u64 {
        let words = self.bits.words();
        for c in first..end {
            if let Some(word) = words.get((c / 64) as usize) {
                word.fetch_or(1 << (c % 64), Ordering::AcqRel);
            }
        }
        end.saturating_sub(first)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::shared_map::test_memfd;

    /// The set chunks, cleared (as the vmm takes them).
    pub fn take(map: &SharedMapping) -> Vec<u64> {
        let mut taken = Vec::new();
        for (w, word) in map.words().iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                taken.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        taken
    }

    #[test]
    fn writes_mark_the_chunks_they_touch_in_the_shared_bitmap() {
        let fd = test_memfd(4096);
        let vmm = SharedMapping::new(&fd, 4096, true).unwrap();
        let d = DirtyChunks::new();
        d.mark(0, 4096);
        assert!(take(&vmm).is_empty(), "nothing is marked while off");
        d.start(1 << 20, 128 << 20, &fd).unwrap();
        d.mark(0, 512);
        d.mark((1 << 20) - 512, 1024);
        d.mark(100 << 20, 1);
        d.mark(5 << 20, 0);
        assert_eq!(take(&vmm), [0, 1, 100]);
        assert!(take(&vmm).is_empty());
        // Past the end (a hostile offset cannot write past the bitmap): cut at the last.
        d.mark(u64::MAX - 10, 10);
        d.mark(127 << 20, u64::MAX);
        assert_eq!(take(&vmm), [127]);
        assert_eq!(d.mark_chunks(126, 1000), 2);
        assert_eq!(take(&vmm), [126, 127]);
        d.stop();
        assert!(!d.is_tracking());
        d.mark(0, 1);
        assert!(take(&vmm).is_empty());
        assert!(d.start(1000, 1 << 20, &fd).is_err());
        assert!(d.start(256, 1 << 20, &fd).is_err());
        // A bitmap too small for the disk is refused.
        assert!(d.start(512, 1 << 30, &fd).is_err());
    }
}
