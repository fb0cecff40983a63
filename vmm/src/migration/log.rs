//! The dirty log that device processes write while a migration runs (vhost-user's
//! LOG_SHMFD): one shared memfd with a bit per 4 KiB guest-physical page, set atomically
//! by every backend's writes to guest memory. The source takes and clears it pass by pass.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use super::ram::{mark, set_bits, RamPages};
use super::stream::PAGE_SIZE;
use crate::memory::DeviceMemory;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot create the dirty log: {0}")]
    Create(String),
}

/// The shared log: a memfd mapped here as the framebuffer's is ([`DeviceMemory`]).
pub struct DeviceDirtyLog {
    memory: DeviceMemory,
}

impl DeviceDirtyLog {
    /// A log covering guest-physical addresses below `end`.
    pub fn new(end: u64) -> Result<Self, LogError> {
        let pages = end.div_ceil(PAGE_SIZE as u64);
        let bytes = pages.div_ceil(8).next_multiple_of(PAGE_SIZE as u64);
        let memory = DeviceMemory::new("vmm-dirty-log", bytes as usize)
            .map_err(|e| LogError::Create(e.to_string()))?;
        Ok(DeviceDirtyLog { memory })
    }

    /// The memfd the backends map (SET_LOG_BASE), and its size.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.memory.file().as_fd()
    }

    pub fn size(&self) -> u64 {
        self.memory.len() as u64
    }

    /// Mark in `bits` the pages logged since the last call, in `ram`'s (the stream's) page
    /// order, clearing the log.
    pub fn take(&self, ram: &RamPages, bits: &mut [u64]) {
        let base = self.memory.as_ptr().cast::<AtomicU64>();
        let words = (0..self.memory.len() / 8).map(|w| {
            // SAFETY: w < len / 8, inside the page-aligned mapping that lives as long as
            // self; the backends and we access it only atomically.
            unsafe { &*base.add(w) }.swap(0, Ordering::AcqRel)
        });
        for gpa_page in set_bits(words) {
            if let Some(page) = ram.page_of(gpa_page * PAGE_SIZE as u64) {
                mark(bits, page);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryManager;
    use std::os::fd::AsRawFd;

    #[test]
    fn bits_set_through_the_memfd_come_back_as_stream_pages() {
        let m = MemoryManager::new(16 << 20).unwrap();
        let ram = RamPages::new(m.guest_memory().clone());
        let log = DeviceDirtyLog::new(16 << 20).unwrap();
        // A backend's write: byte page/8, bit page%8, through its own mapping.
        // SAFETY (test): a fresh shared mapping of the log's memfd, unmapped below.
        let other = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                log.size() as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                log.fd().as_raw_fd(),
                0,
            )
        } as *mut u8;
        assert_ne!(other as *mut libc::c_void, libc::MAP_FAILED);
        // SAFETY (test): inside the mapping.
        unsafe { *other.add(100 / 8) |= 1 << (100 % 8) };
        let take = || {
            let mut bits = ram.bitmap();
            log.take(&ram, &mut bits);
            bits
        };
        assert_eq!(take()[1], 1 << (100 - 64));
        assert!(take().iter().all(|w| *w == 0), "taken: cleared");
        // SAFETY (test): the mapping above.
        unsafe { libc::munmap(other.cast(), log.size() as usize) };
    }
}
