//! Guest RAM: one memfd, mapped into the vmm and shareable with device processes, laid out
//! around the 32-bit PCI hole. The [`MemoryManager`] owns the memfd and the mapping.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout;

/// The guest memory mapping used throughout the vmm.
/// Every write the vmm itself makes through it (its virtio devices, the loaders, an
/// incoming migration) is marked in a dirty bitmap per region, for live migration.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Smallest RAM we accept: enough for the boot structures and a tiny kernel.
pub const MIN_RAM_SIZE: u64 = 2 << 20;
/// Largest RAM we accept: 1 TiB, so RAM and the 64-bit PCI window fit in 41 address bits.
pub const MAX_RAM_SIZE: u64 = 1 << 40;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("RAM size {0} bytes is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("RAM size {size} is out of range ({min}..={max} bytes)")]
    OutOfRange { size: u64, min: u64, max: u64 },
    #[error("failed to create the guest memory memfd: {0}")]
    CreateMemfd(#[source] memfd::Error),
    #[error("failed to size the guest memory memfd to {size} bytes: {source}")]
    SizeMemfd {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to seal the guest memory memfd: {0}")]
    Seal(#[source] memfd::Error),
    #[error("failed to duplicate the guest memory fd: {0}")]
    DupFd(#[source] std::io::Error),
    #[error("failed to map device memory: {0}")]
    MapDevice(#[source] std::io::Error),
    #[error("failed to map guest memory: {0}")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// One contiguous range of guest RAM and where it lives in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    pub guest_addr: GuestAddress,
    pub size: u64,
    pub file_offset: u64,
}

/// Split `ram_size` bytes of RAM around the 32-bit hole: everything up to the hole first,
/// the rest from 4 GiB.
pub fn ram_ranges(ram_size: u64) -> Vec<RamRange> {
    let low = ram_size.min(layout::MEM_32BIT_GAP_START.0);
    let mut ranges = vec![RamRange {
        guest_addr: GuestAddress(0),
        size: low,
        file_offset: 0,
    }];
    if ram_size > low {
        ranges.push(RamRange {
            guest_addr: layout::RAM_64BIT_START,
            size: ram_size - low,
            file_offset: low,
        });
    }
    ranges
}

/// Owner of guest RAM.
pub struct MemoryManager {
    ram_size: u64,
    ranges: Vec<RamRange>,
    memfd: memfd::Memfd,
    guest_memory: GuestMemoryMmap,
}

impl MemoryManager {
    /// Create `ram_size` bytes of guest RAM backed by a sealed memfd.
    pub fn new(ram_size: u64) -> Result<Self, MemoryError> {
        if !(MIN_RAM_SIZE..=MAX_RAM_SIZE).contains(&ram_size) {
            return Err(MemoryError::OutOfRange {
                size: ram_size,
                min: MIN_RAM_SIZE,
                max: MAX_RAM_SIZE,
            });
        }
        if !ram_size.is_multiple_of(4096) {
            return Err(MemoryError::Unaligned(ram_size));
        }
        let memfd = memfd::MemfdOptions::default()
            .close_on_exec(true)
            .allow_sealing(true)
            .create("vmm-guest-ram")
            .map_err(MemoryError::CreateMemfd)?;
        memfd
            .as_file()
            .set_len(ram_size)
            .map_err(|source| MemoryError::SizeMemfd {
                size: ram_size,
                source,
            })?;
        // Other processes get this fd; nobody may change its size under the guest.
        memfd
            .add_seals(&[
                memfd::FileSeal::SealShrink,
                memfd::FileSeal::SealGrow,
                memfd::FileSeal::SealSeal,
            ])
            .map_err(MemoryError::Seal)?;
        let ranges = ram_ranges(ram_size);
        let mut mappings = Vec::new();
        for r in &ranges {
            let file = memfd.as_file().try_clone().map_err(MemoryError::DupFd)?;
            mappings.push((
                r.guest_addr,
                r.size as usize,
                Some(FileOffset::new(file, r.file_offset)),
            ));
        }
        let guest_memory =
            GuestMemoryMmap::from_ranges_with_files(mappings.iter()).map_err(MemoryError::Map)?;
        Ok(Self {
            ram_size,
            ranges,
            memfd,
            guest_memory,
        })
    }

    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// End (exclusive) of the RAM below the 32-bit hole.
    pub fn low_ram_end(&self) -> u64 {
        self.ranges[0].size
    }

    /// First address past all RAM.
    pub fn ram_end(&self) -> u64 {
        self.ranges
            .last()
            .map(|r| r.guest_addr.0 + r.size)
            .unwrap_or(0)
    }

    /// Start of the 64-bit PCI MMIO window: past RAM and past 4 GiB, 1 GiB aligned.
    pub fn pci_mmio64_start(&self) -> u64 {
        self.ram_end()
            .max(layout::RAM_64BIT_START.0)
            .next_multiple_of(1 << 30)
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.guest_memory
    }

    /// The memfd, for sharing guest RAM with another process.
    pub fn memfd(&self) -> &File {
        self.memfd.as_file()
    }

    /// [`MemoryManager::host_regions`] with each region's offset in the guest-RAM memfd
    /// (where a migration numbers its pages).
    pub fn host_regions_in_memfd(&self) -> Vec<(GuestAddress, u64, u64, u64)> {
        self.guest_memory
            .iter()
            .map(|r| {
                let offset = r.file_offset().map_or(0, |f| f.start());
                (r.start_addr(), r.len(), r.as_ptr() as u64, offset)
            })
            .collect()
    }

    /// Host virtual address and size of each mapped region, for KVM memory slots.
    pub fn host_regions(&self) -> Vec<(GuestAddress, u64, u64)> {
        self.guest_memory
            .iter()
            .map(|r| {
                let host = r.as_ptr() as u64;
                (r.start_addr(), r.len(), host)
            })
            .collect()
    }

    /// Zero all guest RAM (used before loading a fresh boot image is not needed on reset,
    /// but tests use it to start from a known state).
    pub fn zero(&self) -> std::io::Result<()> {
        // Punching a hole releases the pages; reading them back gives zeroes.
        let fd = self.memfd.as_file().as_fd();
        punch_hole(fd, 0, self.ram_size)
    }

    /// Give the host back the whole 4 KiB pages of guest RAM in `gpa..gpa+len` (a balloon
    /// inflating, free page reporting): they are punched out of the memfd, so they leave
    /// every process that maps it, and read as zeroes when touched again. Parts outside
    /// RAM are left alone. The bytes released.
    pub fn release(&self, gpa: u64, len: u64) -> std::io::Result<u64> {
        release_pages(&self.guest_memory, gpa, len)
    }

    /// Bytes of the memfd the host has allocated (what `release` gives back).
    pub fn allocated(&self) -> std::io::Result<u64> {
        let meta = self.memfd.as_file().metadata()?;
        Ok(std::os::unix::fs::MetadataExt::blocks(&meta) * 512)
    }

    /// Local migration's destination: guest RAM becomes the source's memfd `new`, at the
    /// same host addresses (every pointer into guest memory stays valid), and every fd of
    /// ours that named the old memfd names the new one, so that device processes given
    /// the memory table from now on map it. Call before anything runs on this RAM.
    pub fn adopt(&self, new: &OwnedFd) -> std::io::Result<()> {
        check_memfd_size(new, self.ram_size)?;
        for r in self.guest_memory.iter() {
            let offset = r.file_offset().map_or(0, |f| f.start());
            remap_shared(r.as_ptr(), r.len() as usize, new, offset)?;
        }
        for r in self.guest_memory.iter() {
            if let Some(f) = r.file_offset() {
                replace_fd(f.file().as_raw_fd(), new)?;
            }
        }
        replace_fd(self.memfd.as_file().as_raw_fd(), new)
    }
}

/// Fail unless `fd` holds exactly `len` bytes.
fn check_memfd_size(fd: &OwnedFd, len: u64) -> std::io::Result<()> {
    let size = File::from(fd.try_clone()?).metadata()?.len();
    if size != len {
        return Err(std::io::Error::other(format!(
            "the source's memory is {size} bytes, this VM's {len}"
        )));
    }
    Ok(())
}

/// Map `len` bytes of `fd` from `offset` over the mapping at `ptr`, in place.
fn remap_shared(ptr: *mut u8, len: usize, fd: &OwnedFd, offset: u64) -> std::io::Result<()> {
    // SAFETY: `ptr..ptr + len` is a shared mapping we own (guest RAM or device memory);
    // MAP_FIXED replaces it atomically with the same size and protection, so every pointer
    // into it stays valid. Nothing runs on this memory yet (a destination before restore).
    let got = unsafe {
        libc::mmap(
            ptr.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if got == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Make our fd `target` (owned by a `File` we keep) name what `new` names.
fn replace_fd(target: std::os::fd::RawFd, new: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: dup3 atomically replaces what fd `target` refers to; `target` stays owned by
    // the File that held it, and stays close-on-exec.
    if unsafe { libc::dup3(new.as_raw_fd(), target, libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Guest pages, as a balloon and free page reporting count them.
pub const PAGE_SIZE: u64 = 4096;

/// [`MemoryManager::release`] on the mapping `memory` (each region is a window of the
/// guest-RAM memfd): the whole pages of `gpa..gpa+len` punched out; the bytes released.
pub fn release_pages(memory: &GuestMemoryMmap, gpa: u64, len: u64) -> std::io::Result<u64> {
    let end = gpa.saturating_add(len);
    let mut released = 0;
    for r in memory.iter() {
        let start = r.start_addr().0;
        let stop = start + r.len();
        let from = gpa.max(start).next_multiple_of(PAGE_SIZE);
        let to = end.min(stop) / PAGE_SIZE * PAGE_SIZE;
        if from >= to {
            continue;
        }
        let Some(file) = r.file_offset() else {
            continue;
        };
        let offset = file.start() + (from - start);
        punch_hole(file.file().as_fd(), offset, to - from)?;
        released += to - from;
    }
    Ok(released)
}

/// Memory that a device shows the guest through a memory BAR (a framebuffer): a memfd of
/// its own, mapped shared here, so that a device process can map the same pages.
pub struct DeviceMemory {
    memfd: memfd::Memfd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared memory that every user accesses with plain racy loads and
// stores (as the guest does); the pointer stays valid until Drop.
unsafe impl Send for DeviceMemory {}
// SAFETY: as above.
unsafe impl Sync for DeviceMemory {}

impl DeviceMemory {
    /// `len` bytes (a multiple of 4 KiB), zeroed, in a memfd named `name`.
    pub fn new(name: &str, len: usize) -> Result<Self, MemoryError> {
        if len == 0 || !len.is_multiple_of(4096) {
            return Err(MemoryError::Unaligned(len as u64));
        }
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .create(name)
            .map_err(MemoryError::CreateMemfd)?;
        memfd
            .as_file()
            .set_len(len as u64)
            .map_err(|source| MemoryError::SizeMemfd {
                size: len as u64,
                source,
            })?;
        memfd
            .add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
            .map_err(MemoryError::Seal)?;
        // SAFETY: a fresh shared mapping of a memfd we own, sized above; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(memfd.as_file()),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::MapDevice(std::io::Error::last_os_error()));
        }
        Ok(DeviceMemory {
            memfd,
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The memfd, to share with a device process.
    pub fn file(&self) -> &File {
        self.memfd.as_file()
    }

    /// Copy out `buf.len()` bytes at `offset` (clipped to the end).
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.len.saturating_sub(offset));
        // SAFETY: offset..offset+n is inside the mapping; the guest may write it at the
        // same time, which only makes the copy's contents racy.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), buf.as_mut_ptr(), n) };
        n
    }

    /// Local migration's destination: this memory becomes the source's memfd `new` (of the
    /// same size), mapped at the same address; our memfd fd names it from now on.
    pub fn adopt(&self, new: &OwnedFd) -> std::io::Result<()> {
        check_memfd_size(new, self.len as u64)?;
        remap_shared(self.ptr, self.len, new, 0)?;
        replace_fd(self.memfd.as_file().as_raw_fd(), new)
    }

    /// Copy `buf` in at `offset` (clipped to the end).
    pub fn write(&self, offset: usize, buf: &[u8]) -> usize {
        let n = buf.len().min(self.len.saturating_sub(offset));
        // SAFETY: as in `read`.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.add(offset), n) };
        n
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Free `len` bytes of `fd` from `offset` (they read as zeroes afterwards).
fn punch_hole(fd: std::os::fd::BorrowedFd<'_>, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a valid fd with in-range arguments has no memory-safety effects.
    let ret = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn released_pages_leave_the_memfd_and_come_back_zeroed() {
        let m = MemoryManager::new(16 << 20).unwrap();
        let mem = m.guest_memory();
        let before = m.allocated().unwrap();
        mem.write_slice(&vec![0xab; 4 << 20], GuestAddress(1 << 20))
            .unwrap();
        let written = m.allocated().unwrap();
        assert!(written >= before + (4 << 20), "{before} -> {written}");
        // Only whole pages: the partial ones at both ends stay.
        assert_eq!(
            m.release((1 << 20) - 100, (4 << 20) + 200).unwrap(),
            4 << 20
        );
        let released = m.allocated().unwrap();
        assert!(released + (4 << 20) <= written, "{written} -> {released}");
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(2 << 20)).unwrap();
        assert_eq!(b, [0; 4], "released pages read as zeroes");
        mem.write_slice(&[1], GuestAddress(2 << 20)).unwrap();
        assert!(
            m.allocated().unwrap() > released,
            "touched again: allocated again"
        );
        // Outside RAM: nothing.
        assert_eq!(m.release(1 << 40, 1 << 20).unwrap(), 0);
        assert_eq!(m.release(0, 100).unwrap(), 0, "no whole page");
        // Across the 32-bit hole: the pages on both sides, none of the hole.
        let big = MemoryManager::new(4 << 30).unwrap();
        let hole = layout::MEM_32BIT_GAP_START.0;
        let span = (layout::RAM_64BIT_START.0 - hole) + 2 * 8192;
        assert_eq!(big.release(hole - 8192, span).unwrap(), 2 * 8192);
    }

    #[test]
    fn small_ram_is_one_range() {
        let r = ram_ranges(512 << 20);
        assert_eq!(
            r,
            vec![RamRange {
                guest_addr: GuestAddress(0),
                size: 512 << 20,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn large_ram_is_split_around_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].size, 3 << 30);
        assert_eq!(r[1].guest_addr, GuestAddress(4 << 30));
        assert_eq!(r[1].size, 1 << 30);
        assert_eq!(r[1].file_offset, 3 << 30);
    }

    #[test]
    fn memfd_backs_guest_ram_above_and_below_the_hole() {
        use std::os::unix::fs::FileExt;
        let mm = MemoryManager::new((3 << 30) + (8 << 20)).unwrap();
        let mem = mm.guest_memory();
        mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(4 << 30))
            .unwrap();
        let mut buf = [0u8; 4];
        mm.memfd().read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0x1234_5678);
        mm.memfd().read_exact_at(&mut buf, 3 << 30).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert!(mem.read_obj::<u32>(GuestAddress(3 << 30)).is_err());
        assert_eq!(mm.ram_end(), (4 << 30) + (8 << 20));
        assert_eq!(mm.pci_mmio64_start(), 5 << 30);
        mm.zero().unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(
            MemoryManager::new(0),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            MemoryManager::new((4 << 20) + 1),
            Err(MemoryError::Unaligned(_))
        ));
        assert!(MemoryManager::new(MAX_RAM_SIZE * 2).is_err());
    }
}
