//! Executable memory for compiled blocks: one anonymous mapping per CPU, filled by bump
//! allocation and emptied as a whole when it runs out (the decode cache then forgets every
//! compiled block and compiles the hot ones again).

/// 32 MiB: the stock kernel's boot compiles a few MiB.
pub const DEFAULT_SIZE: usize = 32 << 20;

pub struct Arena {
    base: *mut u8,
    size: usize,
    used: usize,
}

// SAFETY: the mapping belongs to the Arena alone; one thread uses it at a time.
unsafe impl Send for Arena {}

impl Arena {
    pub fn new(size: usize) -> std::io::Result<Arena> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arena {
            base: base as *mut u8,
            size,
            used: 0,
        })
    }

    /// Where the next [`Arena::install`] puts its code.
    pub fn next_offset(&self) -> usize {
        self.used.next_multiple_of(16)
    }

    /// Copy `code` in, at [`Arena::next_offset`]; its offset, or None when full.
    pub fn install(&mut self, code: &[u8]) -> Option<super::Code> {
        let start = self.next_offset();
        let end = start.checked_add(code.len())?;
        if end > self.size {
            return None;
        }
        // SAFETY: start..end lies inside the mapping, which nothing executes while the
        // owning CPU thread writes it.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.base.add(start), code.len()) };
        self.used = end;
        Some(super::Code(u32::try_from(start).ok()?))
    }

    pub fn reset(&mut self) {
        self.used = 0;
    }

    /// Host address of the code at `offset`.
    pub fn address(&self, offset: u32) -> *const u8 {
        self.base.wrapping_add(offset as usize)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
    }
}
