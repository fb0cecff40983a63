//! Which chunks of the disk the guest changed, for block migration (`migrate blk:true`):
//! turned on before the bulk pass reads the disk, each pass takes (and clears) the set of
//! chunks written since, and the last one is taken once the queue has stopped. A chunk is
//! marked after its write completed, so a bulk read that raced the write is sent again.

use std::sync::Mutex;

/// The dirty-chunk set; off until [`DirtyChunks::start`].
#[derive(Debug)]
pub struct DirtyChunks {
    state: Mutex<Option<Tracking>>,
}

#[derive(Debug)]
struct Tracking {
    chunk_size: u64,
    /// Chunks the disk has (a mark past them is cut there).
    chunks: u64,
    /// One bit per chunk.
    bits: Vec<u64>,
}

impl Default for DirtyChunks {
    fn default() -> Self {
        Self::new()
    }
}

impl DirtyChunks {
    pub fn new() -> Self {
        DirtyChunks {
            state: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Tracking>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start tracking a disk of `capacity` bytes in chunks of `chunk_size` bytes (a power
    /// of two, at least a sector), from an empty set.
    pub fn start(&self, chunk_size: u64, capacity: u64) -> Result<(), String> {
        if !chunk_size.is_power_of_two() || chunk_size < 512 {
            return Err(format!("a chunk of {chunk_size} bytes"));
        }
        let chunks = capacity.div_ceil(chunk_size);
        let words = usize::try_from(chunks.div_ceil(64))
            .map_err(|_| format!("a disk of {capacity} bytes"))?;
        *self.lock() = Some(Tracking {
            chunk_size,
            chunks,
            bits: vec![0; words],
        });
        Ok(())
    }

    /// The disk grew to `capacity` bytes: its new chunks are dirty (the destination has
    /// not seen them).
    pub fn grow(&self, capacity: u64) {
        let old = match self.lock().as_ref() {
            Some(t) => t.chunks * t.chunk_size,
            None => return,
        };
        if let Some(t) = self.lock().as_mut() {
            t.chunks = t.chunks.max(capacity.div_ceil(t.chunk_size));
            let words = usize::try_from(t.chunks.div_ceil(64)).unwrap_or(t.bits.len());
            t.bits.resize(words.max(t.bits.len()), 0);
        }
        self.mark(old, capacity.saturating_sub(old));
    }

    pub fn stop(&self) {
        *self.lock() = None;
    }

    pub fn is_tracking(&self) -> bool {
        self.lock().is_some()
    }

    /// The guest changed `len` bytes at `offset` (a write, a discard, zeroes).
    pub fn mark(&self, offset: u64, len: u64) {
        let mut guard = self.lock();
        let Some(t) = guard.as_mut() else {
            return;
        };
        if len == 0 || t.chunks == 0 {
            return;
        }
        let first = offset / t.chunk_size;
        let last = (offset.saturating_add(len - 1) / t.chunk_size).min(t.chunks - 1);
        for c in first..=last {
            t.bits[(c / 64) as usize] |= 1 << (c % 64);
        }
    }

    /// The chunks marked since tracking started or they were last taken (indices in
    /// order); the set is empty afterwards.
    pub fn take(&self) -> Vec<u64> {
        let mut guard = self.lock();
        let Some(t) = guard.as_mut() else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        for (w, word) in t.bits.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                taken.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_mark_the_chunks_they_touch_and_a_take_empties_the_set() {
        let d = DirtyChunks::new();
        d.mark(0, 4096);
        assert!(d.take().is_empty(), "nothing is kept while off");
        d.start(1 << 20, 128 << 20).unwrap();
        d.mark(0, 512);
        d.mark((1 << 20) - 512, 1024);
        d.mark(100 << 20, 1);
        d.mark(5 << 20, 0);
        assert_eq!(d.take(), [0, 1, 100]);
        assert!(d.take().is_empty());
        // Past the end (a hostile offset cannot make it allocate): cut at the last chunk.
        d.mark(u64::MAX - 10, 10);
        d.mark(127 << 20, u64::MAX);
        assert_eq!(d.take(), [127]);
        // A resize: the new chunks are dirty.
        d.grow(130 << 20);
        assert_eq!(d.take(), [128, 129]);
        d.stop();
        assert!(!d.is_tracking());
        assert!(d.take().is_empty());
        assert!(d.start(1000, 1 << 20).is_err());
        assert!(d.start(256, 1 << 20).is_err());
    }
}
