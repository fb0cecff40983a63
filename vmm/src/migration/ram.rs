//! Guest RAM as the migration stream numbers it: 4 KiB pages in the order of the guest-RAM
//! memfd (low RAM, then RAM above 4 GiB), read and written through the vmm's mapping.
//! Holes of the memfd (pages never written, or given back by the balloon) are found with
//! SEEK_DATA and sent as zero pages without being read: reading a hole through the mapping
//! would allocate it.

use std::os::fd::AsRawFd;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::stream::PAGE_SIZE;
use crate::memory::{release_pages, GuestMemoryMmap};

/// One RAM region: where it sits in the memfd and in guest-physical space.
#[derive(Debug, Clone, Copy)]
struct Span {
    first_page: u64,
    pages: u64,
    gpa: u64,
}

/// The guest's RAM, page by page.
#[derive(Clone)]
pub struct RamPages {
    memory: GuestMemoryMmap,
    spans: Vec<Span>,
    pages: u64,
}

impl RamPages {
    pub fn new(memory: GuestMemoryMmap) -> Self {
        let mut spans: Vec<Span> = memory
            .iter()
            .map(|r| Span {
                first_page: r.file_offset().map_or(0, |f| f.start()) / PAGE_SIZE as u64,
                pages: r.len() / PAGE_SIZE as u64,
                gpa: r.start_addr().0,
            })
            .collect();
        spans.sort_by_key(|s| s.first_page);
        let pages = spans
            .iter()
            .map(|s| s.first_page + s.pages)
            .max()
            .unwrap_or(0);
        RamPages {
            memory,
            spans,
            pages,
        }
    }

    /// How many pages the stream numbers.
    pub fn count(&self) -> u64 {
        self.pages
    }

    /// The guest-physical address of page `page`, if it is RAM.
    pub fn gpa(&self, page: u64) -> Option<u64> {
        self.spans
            .iter()
            .find(|s| page >= s.first_page && page < s.first_page + s.pages)
            .map(|s| s.gpa + (page - s.first_page) * PAGE_SIZE as u64)
    }

    /// The page at guest-physical address `gpa`, if it is RAM.
    pub fn page_of(&self, gpa: u64) -> Option<u64> {
        self.spans
            .iter()
            .find(|s| gpa >= s.gpa && gpa < s.gpa + s.pages * PAGE_SIZE as u64)
            .map(|s| s.first_page + (gpa - s.gpa) / PAGE_SIZE as u64)
    }

    /// Read page `page` into `buf`; false if it is not RAM.
    pub fn read(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> bool {
        self.gpa(page)
            .is_some_and(|gpa| self.memory.read_slice(buf, GuestAddress(gpa)).is_ok())
    }

    /// Write page `page`; false if it is not RAM.
    pub fn write(&self, page: u64, data: &[u8]) -> bool {
        data.len() == PAGE_SIZE
            && self
                .gpa(page)
                .is_some_and(|gpa| self.memory.write_slice(data, GuestAddress(gpa)).is_ok())
    }

    /// Make `count` pages from `page` read as zeroes (punched out: they take no memory).
    pub fn zero(&self, page: u64, count: u64) -> bool {
        (page..page + count).all(|p| {
            self.gpa(p)
                .is_some_and(|gpa| release_pages(&self.memory, gpa, PAGE_SIZE as u64).is_ok())
        })
    }

    /// An empty bitmap of every page.
    pub fn bitmap(&self) -> Vec<u64> {
        vec![0u64; self.pages.div_ceil(64) as usize]
    }

    /// Mark in `bits` the pages the vmm itself wrote through its mapping since the last
    /// call (its virtio devices, loaders: vm-memory marks them), clearing its log.
    pub fn take_vmm_dirty(&self, bits: &mut [u64]) {
        for r in self.memory.iter() {
            let first = r.file_offset().map_or(0, |f| f.start()) / PAGE_SIZE as u64;
            // The region's own bitmap (the mapping's), not the trait's slice of it.
            let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = r;
            for page in set_bits(mapping.bitmap().get_and_reset()) {
                mark(bits, first + page);
            }
        }
    }

    /// One bit per page that holds data in the memfd (the rest are holes: zero).
    pub fn allocated(&self) -> Vec<u64> {
        let mut bits = self.bitmap();
        let Some(fd) = self
            .memory
            .iter()
            .find_map(|r| r.file_offset().map(|f| f.file().as_raw_fd()))
        else {
            // Not a memfd (tests): every page may hold data.
            bits.iter_mut().for_each(|w| *w = u64::MAX);
            return bits;
        };
        let end = self.pages * PAGE_SIZE as u64;
        let mut offset = 0u64;
        while offset < end {
            // SAFETY: lseek on a descriptor the mapping keeps open; no memory is touched.
            let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: no data after `offset`.
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let (data, hole) = (data as u64, if hole < 0 { end } else { hole as u64 });
            for page in data / PAGE_SIZE as u64..hole.div_ceil(PAGE_SIZE as u64).min(self.pages) {
                mark(&mut bits, page);
            }
            offset = hole.max(data + 1);
        }
        bits
    }
}

/// The indices of the bits set in `words` (bit i of word w is w * 64 + i).
pub fn set_bits(words: impl IntoIterator<Item = u64>) -> impl Iterator<Item = u64> {
    words.into_iter().enumerate().flat_map(|(w, mut word)| {
        std::iter::from_fn(move || {
            (word != 0).then(|| {
                let bit = u64::from(word.trailing_zeros());
                word &= word - 1;
                w as u64 * 64 + bit
            })
        })
    })
}

/// Set `page`'s bit in `bits` (a page past its end is ignored).
pub fn mark(bits: &mut [u64], page: u64) {
    if let Some(word) = bits.get_mut((page / 64) as usize) {
        *word |= 1 << (page % 64);
    }
}

/// Whether `page`'s bit is set in `bits`.
pub fn is_marked(bits: &[u64], page: u64) -> bool {
    bits.get((page / 64) as usize)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

/// Whether a page is all zeroes.
pub fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryManager;

    #[test]
    fn holes_are_found_and_pages_move() {
        let m = MemoryManager::new(16 << 20).unwrap();
        let ram = RamPages::new(m.guest_memory().clone());
        assert_eq!(ram.count(), 4096);
        let page = [0x5au8; PAGE_SIZE];
        assert!(ram.write(10, &page));
        assert!(ram.write(4095, &page));
        assert!(!ram.write(4096, &page), "past RAM");
        let bits = ram.allocated();
        let set = |p: u64| is_marked(&bits, p);
        assert!(set(10) && set(4095));
        assert!(!set(11) && !set(2000), "holes");
        let mut buf = [0u8; PAGE_SIZE];
        assert!(ram.read(10, &mut buf));
        assert_eq!(buf, page);
        assert!(ram.zero(10, 1));
        assert!(ram.read(10, &mut buf));
        assert!(is_zero(&buf));
        assert!(!is_zero(&page));
        // The vmm's own writes are logged (the test's writes above included).
        let take = || {
            let mut bits = ram.bitmap();
            ram.take_vmm_dirty(&mut bits);
            bits
        };
        assert_ne!(take()[0] & (1 << 10), 0);
        assert!(take().iter().all(|w| *w == 0), "taken: cleared");
        assert!(ram.write(4095, &page));
        assert_eq!(take()[63], 1 << 63);
        assert_eq!(
            set_bits([0b101, 1 << 63]).collect::<Vec<_>>(),
            [0, 2, 127],
            "bit indices"
        );
    }
}
