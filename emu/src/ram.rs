//! Guest RAM as the CPU sees it: host pointers into the vmm's shared mapping, plain and
//! atomic accesses, and the per-page bookkeeping that lets the decoded-instruction cache
//! notice self-modifying code.
//!
//! Every 4 KiB page of RAM has a "holds decoded code" bit and a generation counter. The
//! decoder sets the bit before it reads instruction bytes; any write through the CPU or a
//! device ([`GuestRam::note_external_write`]) to a page whose bit is set clears the bit and
//! bumps the generation, so cached decodes of that page no longer match.
//!
//! Dirty logging (live migration): while it is on, every write through the CPU or a device
//! sets the page's bit in a dirty bitmap that the migration takes and clears pass by pass;
//! compiled code sends its stores through the interpreter meanwhile (see
//! [`GuestRam::dirty_logging`]). While it is off it costs one relaxed load per write.
//!
//! Locked accesses use host atomics when the guest address is naturally aligned. x86 also
//! allows unaligned locked accesses (split locks); those fall back to one global mutex,
//! which keeps them atomic against each other but not against plain racing stores — the
//! same guarantee real hardware gives only with a bus lock, and rare enough in practice.

use std::any::Any;
use std::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering,
};
use std::sync::{Arc, Mutex};

/// Bytes per guest page.
pub const PAGE_SIZE: u64 = 4096;

/// One contiguous block of guest-physical RAM and where the vmm mapped it.
#[derive(Debug, Clone, Copy)]
pub struct RamRegion {
    pub gpa: u64,
    pub len: u64,
    pub host: *mut u8,
}

/// A region plus the index of its first page in the global page numbering.
struct Region {
    gpa: u64,
    len: u64,
    host: *mut u8,
    first_page: usize,
}

/// Device memory regions (memory BARs backed by host memory, such as a framebuffer) one
/// [`GuestRam`] can hold besides RAM.
pub const MAX_DEVICE_REGIONS: usize = 4;
/// Largest device memory region: 256 MiB (bochs-display's largest VRAM).
pub const MAX_DEVICE_REGION_SIZE: u64 = 256 << 20;
const DEVICE_REGION_PAGES: usize = (MAX_DEVICE_REGION_SIZE / PAGE_SIZE) as usize;
/// `DeviceRegion::gpa` of a region the guest does not see (its BAR is not decoded).
const UNMAPPED: u64 = u64::MAX;

/// Memory the guest sees where a device's BAR is decoded: it moves when the guest moves
/// the BAR. Its pages have page indices of their own (after RAM's), so code tracking
/// works there as in RAM.
struct DeviceRegion {
    gpa: AtomicU64,
    /// 0: the slot is free.
    len: AtomicU64,
    host: AtomicPtr<u8>,
    first_page: usize,
}

/// Where a guest-physical address lives in RAM.
#[derive(Debug, Clone, Copy)]
pub struct RamLocation {
    /// Host address of the byte.
    pub host: *mut u8,
    /// Global page index (for code tracking).
    pub page: usize,
    /// Bytes from this address to the end of its region.
    pub remaining: u64,
}

/// The guest's RAM, shared by every vCPU thread.
pub struct GuestRam {
    regions: Vec<Region>,
    /// One bit per page: decoded code was taken from it.
    code: Vec<AtomicU64>,
    /// Per-page generation, bumped when a code page is written.
    generations: Vec<AtomicU32>,
    /// Serializes locked accesses that are not naturally aligned.
    split_lock: Mutex<()>,
    device_regions: [DeviceRegion; MAX_DEVICE_REGIONS],
    /// What keeps the device regions' mappings alive.
    device_mappings: Mutex<Vec<Arc<dyn Any + Send + Sync>>>,
    /// Bumped when a device region moves: CPUs drop their translations.
    map_epoch: AtomicU64,
    /// One bit per page written since the bitmap was last taken, while `logging`.
    dirty: Vec<AtomicU64>,
    logging: AtomicBool,
}

/// Why a device memory region could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRegionError {
    /// All [`MAX_DEVICE_REGIONS`] are taken.
    NoSlot,
    /// Empty, not page-aligned, or larger than [`MAX_DEVICE_REGION_SIZE`].
    BadSize(u64),
}

// SAFETY: the host pointers stay valid for the life of the GuestRam (the constructor's
// contract) and all accesses through them are either atomics or racy plain accesses that
// model the guest's own data races on shared memory.
unsafe impl Send for GuestRam {}
// SAFETY: as above; no interior state is accessed without atomics or the mutex.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// # Safety
    /// Every region's `host..host+len` must be a valid read/write mapping that outlives
    /// the returned value, and regions must not overlap in guest-physical space.
    pub unsafe fn new(mut regions: Vec<RamRegion>) -> Self {
        regions.sort_by_key(|r| r.gpa);
        let mut pages = 0usize;
        let regions: Vec<Region> = regions
            .into_iter()
            .map(|r| {
                let region = Region {
                    gpa: r.gpa,
                    len: r.len,
                    host: r.host,
                    first_page: pages,
                };
                pages += r.len.div_ceil(PAGE_SIZE) as usize;
                region
            })
            .collect();
        let device_regions = std::array::from_fn(|i| DeviceRegion {
            gpa: AtomicU64::new(UNMAPPED),
            len: AtomicU64::new(0),
            host: AtomicPtr::new(std::ptr::null_mut()),
            first_page: pages + i * DEVICE_REGION_PAGES,
        });
        pages += MAX_DEVICE_REGIONS * DEVICE_REGION_PAGES;
        GuestRam {
            regions,
            code: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            generations: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            split_lock: Mutex::new(()),
            device_regions,
            device_mappings: Mutex::new(Vec::new()),
            map_epoch: AtomicU64::new(0),
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            logging: AtomicBool::new(false),
        }
    }

    /// Add `len` bytes of host memory at `host` as a device region, not yet visible to
    /// the guest ([`GuestRam::move_device_region`] places it). Returns its slot.
    ///
    /// # Safety
    /// `host..host+len` must be a valid read/write mapping for as long as `keep_alive`
    /// lives; the GuestRam keeps `keep_alive` until it is dropped.
    pub unsafe fn add_device_region(
        &self,
        host: *mut u8,
        len: u64,
        keep_alive: Arc<dyn Any + Send + Sync>,
    ) -> Result<usize, DeviceRegionError> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) || len > MAX_DEVICE_REGION_SIZE {
            return Err(DeviceRegionError::BadSize(len));
        }
        let mut mappings = self
            .device_mappings
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let slot = self
            .device_regions
            .iter()
            .position(|r| r.len.load(Ordering::Acquire) == 0)
            .ok_or(DeviceRegionError::NoSlot)?;
        let r = &self.device_regions[slot];
        r.host.store(host, Ordering::Release);
        r.len.store(len, Ordering::Release);
        mappings.push(keep_alive);
        Ok(slot)
    }

    /// Show device region `slot` to the guest at `gpa`, or hide it (`None`). Every CPU
    /// drops its translations before its next batch of instructions
    /// ([`GuestRam::map_epoch`]). The caller keeps regions from overlapping RAM or each
    /// other (the PCI bus does, for BARs).
    pub fn move_device_region(&self, slot: usize, gpa: Option<u64>) {
        if let Some(r) = self.device_regions.get(slot) {
            r.gpa.store(gpa.unwrap_or(UNMAPPED), Ordering::Release);
            self.map_epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Changes whenever a device region moves.
    #[inline]
    pub fn map_epoch(&self) -> u64 {
        self.map_epoch.load(Ordering::Acquire)
    }

    /// Total number of RAM pages (the range of global page indices).
    pub fn page_count(&self) -> usize {
        self.generations.len()
    }

    /// Look up the host location of `gpa`, or None if it is not RAM.
    #[inline]
    pub fn locate(&self, gpa: u64) -> Option<RamLocation> {
        // Few regions (below and above the 32-bit hole): a linear scan is fastest.
        for r in &self.regions {
            let off = gpa.wrapping_sub(r.gpa);
            if off < r.len {
                return Some(RamLocation {
                    // SAFETY: off < len, inside the mapping.
                    host: unsafe { r.host.add(off as usize) },
                    page: r.first_page + (off / PAGE_SIZE) as usize,
                    remaining: r.len - off,
                });
            }
        }
        self.locate_device(gpa)
    }

    #[cold]
    fn locate_device(&self, gpa: u64) -> Option<RamLocation> {
        for r in &self.device_regions {
            let base = r.gpa.load(Ordering::Acquire);
            if base == UNMAPPED {
                continue;
            }
            let len = r.len.load(Ordering::Acquire);
            let off = gpa.wrapping_sub(base);
            if off < len {
                let host = r.host.load(Ordering::Acquire);
                return Some(RamLocation {
                    // SAFETY: off < len, inside the region's mapping (add_device_region's
                    // contract), which device_mappings keeps alive.
                    host: unsafe { host.add(off as usize) },
                    page: r.first_page + (off / PAGE_SIZE) as usize,
                    remaining: len - off,
                });
            }
        }
        None
    }

    /// Host pointer of `len` bytes at `gpa` if all of them are RAM of one region.
    pub fn host_range(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let loc = self.locate(gpa)?;
        (loc.remaining >= len).then_some(loc.host)
    }

    // ---- Code tracking ----

    /// Generation of a page (see the module doc).
    #[inline]
    pub fn generation(&self, page: usize) -> u32 {
        self.generations
            .get(page)
            .map_or(0, |g| g.load(Ordering::Acquire))
    }

    /// The code-page bitmap (one bit per page, in 64-bit words) for compiled blocks, which
    /// test a page's bit before an inline store and leave stores to code pages to
    /// [`GuestRam::note_write`].
    pub(crate) fn code_bits(&self) -> *const u64 {
        // AtomicU64 has the layout of u64.
        self.code.as_ptr() as *const u64
    }

    /// The per-page generations, for compiled code that checks a page still holds the
    /// code it was compiled from.
    pub(crate) fn generations_ptr(&self) -> *const u32 {
        // AtomicU32 has the layout of u32.
        self.generations.as_ptr() as *const u32
    }

    /// Mark a page as holding decoded code. Call before reading its bytes.
    pub fn mark_code(&self, page: usize) {
        if let Some(word) = self.code.get(page / 64) {
            word.fetch_or(1 << (page % 64), Ordering::SeqCst);
        }
    }

    /// Start (clearing the bitmap) or stop dirty logging.
    pub fn set_dirty_logging(&self, on: bool) {
        if on {
            for w in &self.dirty {
                w.store(0, Ordering::Relaxed);
            }
        }
        self.logging.store(on, Ordering::SeqCst);
    }

    /// Whether writes are being logged: compiled code must not store on its own.
    #[inline]
    pub fn dirty_logging(&self) -> bool {
        self.logging.load(Ordering::Relaxed)
    }

    /// The dirty bits of the first `pages` pages (RAM, in global page order), cleared as
    /// they are taken.
    pub fn take_dirty(&self, pages: usize) -> Vec<u64> {
        let words = pages.div_ceil(64).min(self.dirty.len());
        let mut out: Vec<u64> = self.dirty[..words]
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect();
        if let Some(last) = out.last_mut() {
            if !pages.is_multiple_of(64) && words == pages.div_ceil(64) {
                // Bits past `pages` (device regions) stay for nobody: drop them.
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        out
    }

    /// A write reached `page`: log it, and invalidate decodes of it if it held code.
    #[inline]
    pub fn note_write(&self, page: usize) -> bool {
        if self.logging.load(Ordering::Relaxed) {
            if let Some(w) = self.dirty.get(page / 64) {
                w.fetch_or(1u64 << (page % 64), Ordering::Relaxed);
            }
        }
        let Some(word) = self.code.get(page / 64) else {
            return false;
        };
        let bit = 1u64 << (page % 64);
        if word.load(Ordering::SeqCst) & bit == 0 {
            return false;
        }
        word.fetch_and(!bit, Ordering::SeqCst);
        if let Some(g) = self.generations.get(page) {
            g.fetch_add(1, Ordering::SeqCst);
        }
        true
    }

    /// Devices (DMA, the loader) wrote `len` bytes at `gpa`.
    pub fn note_external_write(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa & !(PAGE_SIZE - 1);
        let mut page_gpa = first;
        while page_gpa < gpa.saturating_add(len) {
            if let Some(loc) = self.locate(page_gpa) {
                self.note_write(loc.page);
            }
            page_gpa = match page_gpa.checked_add(PAGE_SIZE) {
                Some(v) => v,
                None => break,
            };
        }
    }

    // ---- Plain accesses ----

    /// Read bytes at `gpa`; false if any part is not RAM.
    pub fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let mut done = 0usize;
        while done < buf.len() {
            let Some(loc) = self.locate(gpa + done as u64) else {
                return false;
            };
            let n = (buf.len() - done).min(loc.remaining as usize);
            // SAFETY: loc.host..+n lies inside one region's mapping.
            unsafe { std::ptr::copy_nonoverlapping(loc.host, buf[done..].as_mut_ptr(), n) };
            done += n;
        }
        true
    }

    /// Write bytes at `gpa` (with code tracking); false if any part is not RAM.
    pub fn write_bytes(&self, gpa: u64, buf: &[u8]) -> bool {
        let mut done = 0usize;
        while done < buf.len() {
            let Some(loc) = self.locate(gpa + done as u64) else {
                return false;
            };
            let n = (buf.len() - done).min(loc.remaining as usize);
            // SAFETY: loc.host..+n lies inside one region's mapping.
            unsafe { std::ptr::copy_nonoverlapping(buf[done..].as_ptr(), loc.host, n) };
            self.note_external_write(gpa + done as u64, n as u64);
            done += n;
        }
        true
    }

    /// Read a little-endian value of 1/2/4/8 bytes; None if not (entirely) RAM.
    pub fn read_u64(&self, gpa: u64, size: usize) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read_bytes(gpa, &mut b[..size])
            .then(|| u64::from_le_bytes(b))
    }

    /// Write a little-endian value of 1/2/4/8 bytes; false if not (entirely) RAM.
    pub fn write_u64(&self, gpa: u64, size: usize, value: u64) -> bool {
        self.write_bytes(gpa, &value.to_le_bytes()[..size])
    }

    /// Atomic compare-exchange of a 1/2/4/8-byte value at `gpa`. Returns the old value, or
    /// None if the range is not RAM of one region.
    pub fn compare_exchange(&self, gpa: u64, size: usize, expected: u64, new: u64) -> Option<u64> {
        let loc = self.locate(gpa)?;
        if loc.remaining < size as u64 {
            return None;
        }
        // SAFETY: the range is inside the mapping (checked above).
        let old = unsafe { compare_exchange_host(loc.host, size, expected, new, &self.split_lock) };
        if old == expected {
            self.note_write(loc.page);
            if (gpa & (PAGE_SIZE - 1)) + size as u64 > PAGE_SIZE {
                self.note_write(loc.page + 1);
            }
        }
        Some(old)
    }

    /// Atomic 16-byte compare-exchange (CMPXCHG16B); None if not RAM.
    pub fn compare_exchange16(&self, gpa: u64, expected: u128, new: u128) -> Option<u128> {
        let loc = self.locate(gpa)?;
        if loc.remaining < 16 {
            return None;
        }
        // SAFETY: the range is inside the mapping.
        let old = unsafe { compare_exchange16_host(loc.host, expected, new, &self.split_lock) };
        if old == expected {
            self.note_write(loc.page);
            if (gpa & (PAGE_SIZE - 1)) + 16 > PAGE_SIZE {
                self.note_write(loc.page + 1);
            }
        }
        Some(old)
    }
}

/// Unaligned-safe plain load of `size` bytes from a host pointer.
///
/// # Safety
/// `p..p+size` must be valid for reads.
#[inline]
pub unsafe fn load_host(p: *const u8, size: usize) -> u64 {
    // SAFETY: the caller guarantees validity; read_unaligned has no alignment needs.
    unsafe {
        match size {
            1 => u64::from(*p),
            2 => u64::from(u16::from_le(std::ptr::read_unaligned(p as *const u16))),
            4 => u64::from(u32::from_le(std::ptr::read_unaligned(p as *const u32))),
            _ => u64::from_le(std::ptr::read_unaligned(p as *const u64)),
        }
    }
}

/// Unaligned-safe plain store of `size` bytes to a host pointer.
///
/// # Safety
/// `p..p+size` must be valid for writes.
#[inline]
pub unsafe fn store_host(p: *mut u8, size: usize, value: u64) {
    // SAFETY: the caller guarantees validity; write_unaligned has no alignment needs.
    unsafe {
        match size {
            1 => *p = value as u8,
            2 => std::ptr::write_unaligned(p as *mut u16, (value as u16).to_le()),
            4 => std::ptr::write_unaligned(p as *mut u32, (value as u32).to_le()),
            _ => std::ptr::write_unaligned(p as *mut u64, value.to_le()),
        }
    }
}

/// Compare-exchange on host memory: atomics when aligned, the split-lock mutex otherwise.
///
/// # Safety
/// `p..p+size` must be valid for reads and writes.
pub unsafe fn compare_exchange_host(
    p: *mut u8,
    size: usize,
    expected: u64,
    new: u64,
    split_lock: &Mutex<()>,
) -> u64 {
    let aligned = (p as usize).is_multiple_of(size);
    // SAFETY: aligned pointers inside the mapping can be viewed as atomics of that size;
    // other threads only access this memory through atomics or racy plain accesses.
    unsafe {
        if aligned {
            match size {
                1 => {
                    let a = &*(p as *const AtomicU8);
                    return match a.compare_exchange(
                        expected as u8,
                        new as u8,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    ) {
                        Ok(v) | Err(v) => u64::from(v),
                    };
                }
                2 => {
                    let a = &*(p as *const AtomicU16);
                    return match a.compare_exchange(
                        expected as u16,
                        new as u16,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    ) {
                        Ok(v) | Err(v) => u64::from(v),
                    };
                }
                4 => {
                    let a = &*(p as *const AtomicU32);
                    return match a.compare_exchange(
                        expected as u32,
                        new as u32,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    ) {
                        Ok(v) | Err(v) => u64::from(v),
                    };
                }
                _ => {
                    let a = &*(p as *const AtomicU64);
                    return match a.compare_exchange(
                        expected,
                        new,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    ) {
                        Ok(v) | Err(v) => v,
                    };
                }
            }
        }
        let _guard = split_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = load_host(p, size);
        let mask = if size == 8 {
            u64::MAX
        } else {
            (1u64 << (size * 8)) - 1
        };
        if old == expected & mask {
            store_host(p, size, new);
        }
        old
    }
}

/// 16-byte compare-exchange on host memory, under the split-lock mutex (Rust has no
/// stable 128-bit atomic; CMPXCHG16B is rare enough for a lock).
///
/// # Safety
/// `p..p+16` must be valid for reads and writes.
pub unsafe fn compare_exchange16_host(
    p: *mut u8,
    expected: u128,
    new: u128,
    split_lock: &Mutex<()>,
) -> u128 {
    let _guard = split_lock.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: the caller guarantees validity of 16 bytes.
    unsafe {
        let old = u128::from_le(std::ptr::read_unaligned(p as *const u128));
        if old == expected {
            std::ptr::write_unaligned(p as *mut u128, new.to_le());
        }
        old
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// A GuestRam over a leaked heap buffer, for tests.
    pub fn ram(size: usize) -> std::sync::Arc<GuestRam> {
        let buf: &'static mut [u8] = Box::leak(vec![0u8; size].into_boxed_slice());
        // SAFETY: the buffer is leaked, so it lives forever.
        std::sync::Arc::new(unsafe {
            GuestRam::new(vec![RamRegion {
                gpa: 0,
                len: size as u64,
                host: buf.as_mut_ptr(),
            }])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_writes_and_cmpxchg() {
        let ram = test_util::ram(0x4000);
        assert!(ram.write_u64(0xffe, 4, 0xdead_beef));
        assert_eq!(ram.read_u64(0xffe, 4), Some(0xdead_beef));
        assert_eq!(ram.read_u64(0x4000, 1), None);
        assert_eq!(ram.compare_exchange(0x100, 8, 0, 5), Some(0));
        assert_eq!(ram.compare_exchange(0x100, 8, 0, 6), Some(5));
        assert_eq!(ram.read_u64(0x100, 8), Some(5));
        // Unaligned locked op takes the mutex path.
        assert_eq!(ram.compare_exchange(0x101, 4, 0, 7), Some(0));
        assert_eq!(ram.read_u64(0x101, 4), Some(7));
        assert_eq!(ram.compare_exchange16(0x200, 0, 1 << 100), Some(0));
        assert_eq!(ram.compare_exchange16(0x200, 0, 1), Some(1 << 100));
    }

    #[test]
    fn device_regions_appear_where_they_are_moved() {
        let ram = test_util::ram(0x4000);
        let buf = Arc::new(Mutex::new(vec![0u8; 0x2000]));
        let host = buf.lock().unwrap().as_mut_ptr();
        // SAFETY: the vector lives as long as `buf`, which the GuestRam keeps.
        let slot = unsafe { ram.add_device_region(host, 0x2000, buf.clone()) }.unwrap();
        assert_eq!(ram.read_u64(0x10_0000, 4), None, "not mapped yet");
        let epoch = ram.map_epoch();
        ram.move_device_region(slot, Some(0x10_0000));
        assert_ne!(ram.map_epoch(), epoch);
        assert!(ram.write_u64(0x10_1ffc, 4, 0x1234_5678));
        assert_eq!(buf.lock().unwrap()[0x1ffc..], [0x78, 0x56, 0x34, 0x12]);
        assert_eq!(ram.read_u64(0x10_2000, 4), None, "past its end");
        let page = ram.locate(0x10_1000).unwrap().page;
        assert!(page >= 4 && page < ram.page_count(), "pages of its own");
        ram.move_device_region(slot, Some(0x20_0000));
        assert_eq!(ram.read_u64(0x10_1ffc, 4), None);
        assert_eq!(ram.read_u64(0x20_1ffc, 4), Some(0x1234_5678));
        ram.move_device_region(slot, None);
        assert_eq!(ram.read_u64(0x20_1ffc, 4), None);
        // SAFETY: as above.
        let bad = unsafe { ram.add_device_region(host, 0x1001, buf.clone()) };
        assert_eq!(bad, Err(DeviceRegionError::BadSize(0x1001)));
    }

    #[test]
    fn code_page_writes_bump_generation() {
        let ram = test_util::ram(0x4000);
        let g0 = ram.generation(1);
        ram.write_u64(0x1000, 1, 1);
        assert_eq!(ram.generation(1), g0, "not code yet");
        ram.mark_code(1);
        ram.write_u64(0x1008, 1, 1);
        assert_eq!(ram.generation(1), g0 + 1);
        ram.mark_code(2);
        ram.note_external_write(0x1ff0, 0x20);
        assert_eq!(ram.generation(2), 1);
    }
}
