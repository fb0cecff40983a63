//! Shared mappings of memfds the vmm hands a device process: the display's VRAM and
//! scanout page, and block migration's dirty-chunk bitmap and chunk buffer.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicU64;

/// A shared mapping of an fd, unmapped on drop.
pub struct SharedMapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: shared memory that every user accesses with copies or atomics; the pointer stays
// valid until Drop.
unsafe impl Send for SharedMapping {}
// SAFETY: as above.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Map `len` bytes of `fd` from its start (read-only unless `writable`). The fd must
    /// hold at least `len` bytes: a mapping past its end would fault when touched.
    pub fn new(fd: &OwnedFd, len: usize, writable: bool) -> io::Result<Self> {
        check_size(fd, len as u64)?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of an fd we hold; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMapping {
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping as 64-bit words for atomic access (a bitmap both sides share).
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: mmap returns page-aligned memory, valid for `len` bytes while self lives;
        // every access through the slice is atomic.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<AtomicU64>(), self.len / 8) }
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Fail on an fd smaller than `len`, or on an empty mapping.
fn check_size(fd: &OwnedFd, len: u64) -> io::Result<()> {
    // SAFETY: fstat fills the struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on an fd we hold.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if (st.st_size as u64) < len || len == 0 {
        return Err(io::Error::other(format!(
            "a shared fd of {} bytes, expected {len}",
            st.st_size
        )));
    }
    Ok(())
}

/// A memfd of `len` bytes, as the vmm would share it (for tests).
#[cfg(test)]
pub fn test_memfd(len: u64) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a static name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"test-shared".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: we own the new fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our fd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
    fd
}
