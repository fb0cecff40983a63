//! Linear-to-physical translation (segmentation and paging), a software TLB, and the
//! CPU's view of the physical address space (RAM, its local APIC page, other MMIO).
//!
//! [`Mmu`] implements [`DataAccess`] for instruction semantics. It keeps a snapshot of
//! the state translation depends on (segment caches, CPL, CR0/CR3/CR4/EFER), refreshed by
//! the core with [`Mmu::sync`] whenever a system instruction or an event changes it; the
//! integer/SSE/x87 groups never do.
//!
//! The TLB is direct-mapped and keyed by 4 KiB virtual page; large pages are entered as
//! 4 KiB fragments that remember their page size so INVLPG drops every fragment. Each entry
//! holds the permissions for user and supervisor accesses and whether the dirty bit is
//! already set, so a hit needs no walk; anything a hit cannot prove allowed goes to the
//! walker, which raises the precise fault or sets A/D bits and refills.

use std::sync::Arc;

use crate::access::DataAccess;
use crate::exception::{ExResult, Exception};
use crate::lapic::LocalApic;
use crate::ram::{self, GuestRam, PAGE_SIZE};
use crate::state::{
    CpuState, Segment, CR0_PG, CR0_WP, CR4_PAE, CR4_PGE, CR4_PSE, CS, EFER_LMA, EFER_NXE, SS,
};
use crate::IoBus;

/// Number of TLB entries (direct-mapped).
pub(crate) const TLB_ENTRIES: usize = 2048;
/// Physical address bits the CPU reports (CPUID 0x80000008).
pub const PHYS_ADDR_BITS: u32 = 40;
const PHYS_MASK: u64 = ((1u64 << PHYS_ADDR_BITS) - 1) & !0xfff;

// Page-fault error code bits.
pub const PF_PRESENT: u32 = 1 << 0;
pub const PF_WRITE: u32 = 1 << 1;
pub const PF_USER: u32 = 1 << 2;
pub const PF_RSVD: u32 = 1 << 3;
pub const PF_FETCH: u32 = 1 << 4;

// Page-table entry bits.
const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_G: u64 = 1 << 8;
const PTE_NX: u64 = 1 << 63;

// TLB permission bits.
const T_UR: u8 = 1 << 0;
const T_UW: u8 = 1 << 1;
const T_UX: u8 = 1 << 2;
const T_SW: u8 = 1 << 3;
const T_SX: u8 = 1 << 4;
const T_DIRTY: u8 = 1 << 5;
const T_GLOBAL: u8 = 1 << 6;
/// The page is RAM (`host` is set): compiled code's lookup requires it with the
/// permission bits, in one test.
const T_RAM: u8 = 1 << 7;

/// The kind of a memory access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Execute,
}

/// `repr(C)`: compiled blocks read these fields at fixed offsets (see `crate::jit`).
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct TlbEntry {
    /// Virtual page number, or `u64::MAX` when empty.
    pub(crate) tag: u64,
    /// Host address of the page, null for MMIO.
    pub(crate) host: *mut u8,
    /// Physical page address.
    pub(crate) pa: u64,
    /// Global RAM page index (code tracking).
    pub(crate) page: u32,
    pub(crate) perms: u8,
    /// Virtual page-number mask of the mapping's page size (for INVLPG).
    pub(crate) size_mask: u64,
}

pub(crate) const EMPTY: TlbEntry = TlbEntry {
    tag: u64::MAX,
    host: std::ptr::null_mut(),
    pa: 0,
    page: 0,
    perms: 0,
    size_mask: u64::MAX,
};

/// A completed translation of one byte address.
#[derive(Debug, Clone, Copy)]
pub struct Translation {
    pub pa: u64,
    /// Host pointer of the byte, null for MMIO.
    pub host: *mut u8,
    /// Global RAM page index (meaningless for MMIO).
    pub page: usize,
}

/// Segmentation, paging and the physical address space of one CPU.
pub struct Mmu {
    pub ram: Arc<GuestRam>,
    pub io: Arc<dyn IoBus>,
    pub lapic: LocalApic,
    tlb: Box<[TlbEntry]>,
    // Snapshot of the translation-relevant state.
    seg: [Segment; 6],
    code64: bool,
    protected: bool,
    cpl: u8,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    /// An access reached the local APIC or device MMIO (the run loop rechecks interrupts).
    pub mmio_touched: bool,
    /// This CPU wrote to a page holding decoded code: the running block may be stale.
    /// (Other CPUs' writes are seen at the next block lookup, through the page
    /// generation; cross-modifying code needs that synchronization anyway.)
    pub code_written: bool,
    /// Compiled blocks by linear RIP, for compiled code to go on to the next block
    /// without returning to the run loop (see `crate::jit`).
    jumps: Box<[JumpEntry]>,
    /// Bumped whenever what a RIP maps to may have changed (TLB flushes, mode changes):
    /// entries of older epochs are dead.
    jump_epoch: u32,
}

// SAFETY: the raw pointers in the TLB point into the shared guest RAM mapping, which the
// Arc<GuestRam> held here keeps alive; moving the Mmu to another thread does not change
// what they point to, and one thread uses a given Mmu at a time.
unsafe impl Send for Mmu {}

impl Mmu {
    pub fn new(ram: Arc<GuestRam>, io: Arc<dyn IoBus>, lapic: LocalApic) -> Self {
        let mut mmu = Mmu {
            ram,
            io,
            lapic,
            tlb: vec![EMPTY; TLB_ENTRIES].into_boxed_slice(),
            seg: [Segment::default(); 6],
            code64: false,
            protected: false,
            cpl: 0,
            cr0: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            mmio_touched: false,
            code_written: false,
            jumps: vec![EMPTY_JUMP; JUMP_ENTRIES].into_boxed_slice(),
            jump_epoch: 1,
        };
        mmu.sync(&CpuState::power_on());
        mmu
    }

    /// Take a fresh snapshot of the state translation depends on.
    pub fn sync(&mut self, s: &CpuState) {
        if s.code64() != self.code64
            || s.cr0 != self.cr0
            || s.cr3 != self.cr3
            || s.cr4 != self.cr4
            || s.efer != self.efer
        {
            self.invalidate_jumps();
        }
        self.seg = s.seg;
        self.code64 = s.code64();
        self.protected = s.protected_mode();
        self.cpl = s.cpl();
        self.cr0 = s.cr0;
        self.cr3 = s.cr3;
        self.cr4 = s.cr4;
        self.efer = s.efer;
    }

    /// Drop every TLB entry, global ones included.
    pub fn flush_all(&mut self) {
        self.invalidate_jumps();
        self.tlb.fill(EMPTY);
    }

    /// Drop non-global entries (MOV CR3).
    pub fn flush_non_global(&mut self) {
        self.invalidate_jumps();
        let keep_global = self.cr4 & CR4_PGE != 0;
        for e in self.tlb.iter_mut() {
            if !keep_global || e.perms & T_GLOBAL == 0 {
                *e = EMPTY;
            }
        }
    }

    /// INVLPG: drop the translations of the page containing `linear`.
    pub fn flush_page(&mut self, linear: u64) {
        self.invalidate_jumps();
        let vpn = linear >> 12;
        for e in self.tlb.iter_mut() {
            if e.tag != u64::MAX && (e.tag & e.size_mask) == (vpn & e.size_mask) {
                *e = EMPTY;
            }
        }
    }

    fn paging(&self) -> bool {
        self.cr0 & CR0_PG != 0
    }

    /// Truncate a linear address outside long mode.
    #[inline]
    fn wrap_linear(&self, linear: u64) -> u64 {
        if self.efer & EFER_LMA != 0 {
            linear
        } else {
            linear & 0xffff_ffff
        }
    }

    // ---------------------------------------------------------------------------------
    // Translation
    // ---------------------------------------------------------------------------------

    /// Translate a linear address for an access by a user (CPL 3, not an implicit
    /// supervisor access) or supervisor.
    #[inline]
    pub fn translate(&mut self, linear: u64, access: Access, user: bool) -> ExResult<Translation> {
        let vpn = linear >> 12;
        let e = &self.tlb[(vpn as usize) & (TLB_ENTRIES - 1)];
        if e.tag == vpn {
            let need = required_perms(access, user);
            if e.perms & need == need {
                let off = linear & 0xfff;
                return Ok(Translation {
                    pa: e.pa | off,
                    host: if e.host.is_null() {
                        e.host
                    } else {
                        // SAFETY: host is a page base inside the RAM mapping.
                        unsafe { e.host.add(off as usize) }
                    },
                    page: e.page as usize,
                });
            }
        }
        self.translate_slow(linear, access, user)
    }

    fn translate_slow(&mut self, linear: u64, access: Access, user: bool) -> ExResult<Translation> {
        let (pa_page, perms, size_mask) = if self.paging() {
            self.walk(linear, access, user)?
        } else {
            (
                linear & !0xfff,
                T_UR | T_UW | T_UX | T_SW | T_SX | T_DIRTY,
                u64::MAX,
            )
        };
        let vpn = linear >> 12;
        let mut entry = TlbEntry {
            tag: vpn,
            host: std::ptr::null_mut(),
            pa: pa_page,
            page: 0,
            perms,
            size_mask,
        };
        let is_apic = self.lapic.mmio_base() == Some(pa_page);
        if !is_apic {
            if let Some(loc) = self.ram.locate(pa_page) {
                if loc.remaining >= PAGE_SIZE {
                    entry.host = loc.host;
                    entry.page = loc.page as u32;
                    entry.perms |= T_RAM;
                }
            }
        }
        // Compiled code takes a tag match as proof that the address is canonical.
        if is_canonical(linear) {
            self.tlb[(vpn as usize) & (TLB_ENTRIES - 1)] = entry;
        }
        let off = linear & 0xfff;
        Ok(Translation {
            pa: pa_page | off,
            host: if entry.host.is_null() {
                entry.host
            } else {
                // SAFETY: inside the page found above.
                unsafe { entry.host.add(off as usize) }
            },
            page: entry.page as usize,
        })
    }

    fn read_pte(&self, addr: u64, size: usize) -> u64 {
        // Page tables outside RAM read as not present.
        self.ram.read_u64(addr, size).unwrap_or(0)
    }

    /// Atomically OR `bits` into the page-table entry at `addr`.
    fn set_pte_bits(&self, addr: u64, size: usize, old: u64, bits: u64) {
        if old & bits == bits {
            return;
        }
        let mut cur = old;
        loop {
            match self.ram.compare_exchange(addr, size, cur, cur | bits) {
                Some(v) if v == cur => return,
                Some(v) => {
                    if v & PTE_P == 0 || v & bits == bits {
                        return;
                    }
                    cur = v;
                }
                None => return,
            }
        }
    }

    /// Walk the page tables. Returns (physical 4 KiB page, TLB perms, size mask).
    fn walk(&self, linear: u64, access: Access, user: bool) -> ExResult<(u64, u8, u64)> {
        let nxe = self.efer & EFER_NXE != 0;
        let fault = |bits: u32| -> Exception {
            let mut code = bits;
            if user {
                code |= PF_USER;
            }
            if access == Access::Write {
                code |= PF_WRITE;
            }
            if access == Access::Execute && nxe {
                code |= PF_FETCH;
            }
            Exception::PageFault {
                error_code: code,
                address: linear,
            }
        };
        // (entry address, entry size, entry value) of every level used.
        let mut used: [(u64, usize, u64); 5] = [(0, 0, 0); 5];
        let mut n_used = 0usize;
        let mut writable = true;
        let mut usr = true;
        let mut nx = false;
        let pa_page;
        let size_mask;
        let global;
        let rsvd_nx = if nxe { 0 } else { PTE_NX };
        // Reserved physical-address bits 40..51 in 64-bit entries.
        let addr_rsvd: u64 = ((1u64 << 52) - 1) & !((1u64 << PHYS_ADDR_BITS) - 1);

        if self.efer & EFER_LMA != 0 || self.cr4 & CR4_PAE != 0 {
            let long = self.efer & EFER_LMA != 0;
            let mut table;
            let mut level;
            if long {
                table = self.cr3 & PHYS_MASK;
                level = 4;
            } else {
                // PAE: the PDPTE selected by bits 30..31.
                let pdpte_addr = (self.cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8;
                let pdpte = self.read_pte(pdpte_addr, 8);
                if pdpte & PTE_P == 0 {
                    return Err(fault(0));
                }
                if pdpte & (addr_rsvd | 0x1e6 | PTE_NX) != 0 {
                    return Err(fault(PF_PRESENT | PF_RSVD));
                }
                table = pdpte & PHYS_MASK;
                level = 2;
            }
            loop {
                let shift = 12 + 9 * (level - 1);
                let idx = (linear >> shift) & 0x1ff;
                let addr = table + idx * 8;
                let pte = self.read_pte(addr, 8);
                if pte & PTE_P == 0 {
                    return Err(fault(0));
                }
                let mut rsvd = addr_rsvd | rsvd_nx;
                let large = pte & PTE_PS != 0 && (level == 2 || level == 3);
                if level == 4 && long {
                    rsvd |= PTE_PS;
                }
                if large {
                    // Bits 13..(shift-1) of a large-page address are reserved.
                    rsvd |= ((1u64 << shift) - 1) & !0x1fff;
                }
                if level == 3 && large && !long {
                    rsvd |= PTE_PS;
                }
                if pte & rsvd != 0 {
                    return Err(fault(PF_PRESENT | PF_RSVD));
                }
                used[n_used] = (addr, 8, pte);
                n_used += 1;
                writable &= pte & PTE_RW != 0;
                usr &= pte & PTE_US != 0;
                nx |= pte & PTE_NX != 0 && nxe;
                if level == 1 || large {
                    let page_mask = (1u64 << shift) - 1;
                    pa_page = ((pte & PHYS_MASK & !page_mask) | (linear & page_mask)) & !0xfff;
                    size_mask = !(page_mask >> 12);
                    global = pte & PTE_G != 0;
                    break;
                }
                table = pte & PHYS_MASK;
                level -= 1;
            }
        } else {
            // 32-bit paging.
            let pde_addr = (self.cr3 & 0xffff_f000) + ((linear >> 22) & 0x3ff) * 4;
            let pde = self.read_pte(pde_addr, 4);
            if pde & PTE_P == 0 {
                return Err(fault(0));
            }
            used[0] = (pde_addr, 4, pde);
            n_used = 1;
            writable &= pde & PTE_RW != 0;
            usr &= pde & PTE_US != 0;
            if pde & PTE_PS != 0 && self.cr4 & CR4_PSE != 0 {
                // 4 MiB page (PSE-36 bits 13..16 give address bits 32..35).
                let high = ((pde >> 13) & 0xf) << 32;
                pa_page = (pde & 0xffc0_0000) | high | (linear & 0x3f_f000);
                size_mask = !0x3ff;
                global = pde & PTE_G != 0;
            } else {
                let pte_addr = (pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4;
                let pte = self.read_pte(pte_addr, 4);
                if pte & PTE_P == 0 {
                    return Err(fault(0));
                }
                used[1] = (pte_addr, 4, pte);
                n_used = 2;
                writable &= pte & PTE_RW != 0;
                usr &= pte & PTE_US != 0;
                pa_page = pte & 0xffff_f000;
                size_mask = u64::MAX;
                global = pte & PTE_G != 0;
            }
        }

        // Permission checks.
        let wp = self.cr0 & CR0_WP != 0;
        match access {
            Access::Read => {
                if user && !usr {
                    return Err(fault(PF_PRESENT));
                }
            }
            Access::Write => {
                if (user && !usr) || (!writable && (user || wp)) {
                    return Err(fault(PF_PRESENT));
                }
            }
            Access::Execute => {
                if nx || (user && !usr) {
                    return Err(fault(PF_PRESENT));
                }
            }
        }

        // Accessed bits on every level; dirty on the leaf for writes.
        for (i, &(addr, size, val)) in used[..n_used].iter().enumerate() {
            let mut bits = PTE_A;
            if i == n_used - 1 && access == Access::Write {
                bits |= PTE_D;
            }
            self.set_pte_bits(addr, size, val, bits);
        }
        let leaf = used[n_used - 1].2;
        let dirty = leaf & PTE_D != 0 || access == Access::Write;

        let mut perms = 0u8;
        if usr {
            perms |= T_UR;
            if writable {
                perms |= T_UW;
            }
            if !nx {
                perms |= T_UX;
            }
        }
        if writable || !wp {
            perms |= T_SW;
        }
        if !nx {
            perms |= T_SX;
        }
        if dirty {
            perms |= T_DIRTY;
        }
        if global && self.cr4 & CR4_PGE != 0 {
            perms |= T_GLOBAL;
        }
        Ok((pa_page, perms, size_mask))
    }

    // ---------------------------------------------------------------------------------
    // Physical accesses outside RAM
    // ---------------------------------------------------------------------------------

    fn mmio_read(&mut self, pa: u64, buf: &mut [u8]) {
        self.mmio_touched = true;
        if let Some(base) = self.lapic.mmio_base() {
            if pa & !0xfff == base {
                self.lapic.read_mmio(pa - base, buf);
                return;
            }
        }
        self.io.mmio_read(pa, buf);
    }

    fn mmio_write(&mut self, pa: u64, buf: &[u8]) {
        self.mmio_touched = true;
        if let Some(base) = self.lapic.mmio_base() {
            if pa & !0xfff == base {
                self.lapic.write_mmio(pa - base, buf);
                return;
            }
        }
        self.io.mmio_write(pa, buf);
    }

    // ---------------------------------------------------------------------------------
    // Linear accesses
    // ---------------------------------------------------------------------------------

    /// Read a 1/2/4/8-byte value at a linear address.
    #[inline]
    pub fn read_linear(&mut self, linear: u64, size: usize, user: bool) -> ExResult<u64> {
        let linear = self.wrap_linear(linear);
        if (linear & 0xfff) as usize + size <= 0x1000 {
            let t = self.translate(linear, Access::Read, user)?;
            if !t.host.is_null() {
                // SAFETY: the access stays within one RAM page.
                return Ok(unsafe { ram::load_host(t.host, size) });
            }
            let mut b = [0u8; 8];
            self.mmio_read(t.pa, &mut b[..size]);
            return Ok(u64::from_le_bytes(b));
        }
        let mut b = [0u8; 8];
        self.read_linear_bytes(linear, &mut b[..size], user, Access::Read)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Write a 1/2/4/8-byte value at a linear address.
    #[inline]
    pub fn write_linear(
        &mut self,
        linear: u64,
        size: usize,
        value: u64,
        user: bool,
    ) -> ExResult<()> {
        let linear = self.wrap_linear(linear);
        if (linear & 0xfff) as usize + size <= 0x1000 {
            let t = self.translate(linear, Access::Write, user)?;
            if !t.host.is_null() {
                // SAFETY: the access stays within one RAM page.
                unsafe { ram::store_host(t.host, size, value) };
                self.code_written |= self.ram.note_write(t.page);
                return Ok(());
            }
            self.mmio_write(t.pa, &value.to_le_bytes()[..size]);
            return Ok(());
        }
        self.write_linear_bytes(linear, &value.to_le_bytes()[..size], user)
    }

    /// Read bytes at a linear address (`access` is Read or Execute).
    pub fn read_linear_bytes(
        &mut self,
        linear: u64,
        buf: &mut [u8],
        user: bool,
        access: Access,
    ) -> ExResult<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let lin = self.wrap_linear(linear.wrapping_add(done as u64));
            let n = (buf.len() - done).min(0x1000 - (lin & 0xfff) as usize);
            let t = self.translate(lin, access, user)?;
            if t.host.is_null() {
                self.mmio_read(t.pa, &mut buf[done..done + n]);
            } else {
                // SAFETY: within one RAM page.
                unsafe { std::ptr::copy_nonoverlapping(t.host, buf[done..].as_mut_ptr(), n) };
            }
            done += n;
        }
        Ok(())
    }

    /// Write bytes at a linear address: all pages are translated (and may fault) before
    /// any byte is written.
    pub fn write_linear_bytes(&mut self, linear: u64, buf: &[u8], user: bool) -> ExResult<()> {
        let mut pieces: [(Translation, usize, usize); 3] = [(
            Translation {
                pa: 0,
                host: std::ptr::null_mut(),
                page: 0,
            },
            0,
            0,
        ); 3];
        let mut n_pieces = 0;
        let mut done = 0usize;
        // Up to 512 bytes (FXSAVE) spans at most 2 pages; larger buffers are chunked.
        if buf.len() > 0x1000 {
            while done < buf.len() {
                let n = (buf.len() - done).min(0x800);
                self.write_linear_bytes(
                    linear.wrapping_add(done as u64),
                    &buf[done..done + n],
                    user,
                )?;
                done += n;
            }
            return Ok(());
        }
        while done < buf.len() {
            let lin = self.wrap_linear(linear.wrapping_add(done as u64));
            let n = (buf.len() - done).min(0x1000 - (lin & 0xfff) as usize);
            let t = self.translate(lin, Access::Write, user)?;
            pieces[n_pieces] = (t, done, n);
            n_pieces += 1;
            done += n;
        }
        for &(t, start, n) in &pieces[..n_pieces] {
            if t.host.is_null() {
                self.mmio_write(t.pa, &buf[start..start + n]);
            } else {
                // SAFETY: within one RAM page.
                unsafe { std::ptr::copy_nonoverlapping(buf[start..].as_ptr(), t.host, n) };
                self.code_written |= self.ram.note_write(t.page);
            }
        }
        Ok(())
    }

    /// Locked compare-exchange at a linear address.
    pub fn compare_exchange_linear(
        &mut self,
        linear: u64,
        size: usize,
        expected: u64,
        new: u64,
        user: bool,
    ) -> ExResult<u64> {
        let linear = self.wrap_linear(linear);
        let t = self.translate(linear, Access::Write, user)?;
        if (linear & 0xfff) as usize + size <= 0x1000 && !t.host.is_null() {
            let generation = self.ram.generation(t.page);
            if let Some(old) = self.ram.compare_exchange(t.pa, size, expected, new) {
                self.code_written |= self.ram.generation(t.page) != generation;
                return Ok(old);
            }
        }
        // Split across pages or MMIO: not atomic against other CPUs, but correct alone.
        let mask = if size == 8 {
            u64::MAX
        } else {
            (1u64 << (size * 8)) - 1
        };
        let old = self.read_linear(linear, size, user)?;
        self.translate(linear.wrapping_add(size as u64 - 1), Access::Write, user)?;
        if old == expected & mask {
            self.write_linear(linear, size, new, user)?;
        }
        Ok(old)
    }

    // ---------------------------------------------------------------------------------
    // Segmentation
    // ---------------------------------------------------------------------------------

    fn segment_fault(seg: usize) -> Exception {
        if seg == SS {
            Exception::StackFault(0)
        } else {
            Exception::GeneralProtection(0)
        }
    }

    /// Segment-relative offset to linear address with the mode's checks.
    #[inline]
    pub fn linear_address(
        &self,
        seg: usize,
        offset: u64,
        size: usize,
        access: Access,
    ) -> ExResult<u64> {
        if self.code64 {
            let lin = if seg >= 4 {
                offset.wrapping_add(self.seg[seg].base)
            } else {
                offset
            };
            let last = lin.wrapping_add(size.max(1) as u64 - 1);
            if !is_canonical(lin) || !is_canonical(last) {
                return Err(Self::segment_fault(seg));
            }
            return Ok(lin);
        }
        let s = &self.seg[seg];
        if self.protected {
            if !s.present {
                return Err(Self::segment_fault(seg));
            }
            let code = s.type_ & 8 != 0;
            match access {
                Access::Write if code || s.type_ & 2 == 0 => {
                    return Err(Self::segment_fault(seg));
                }
                Access::Read if code && s.type_ & 2 == 0 && seg != CS => {
                    return Err(Self::segment_fault(seg));
                }
                _ => {}
            }
        }
        let last = offset.wrapping_add(size.max(1) as u64 - 1);
        let expand_down = s.type_ & 0xc == 0x4 && s.s;
        if expand_down && self.protected {
            let upper = if s.db { 0xffff_ffffu64 } else { 0xffff };
            if offset <= u64::from(s.limit) || last > upper {
                return Err(Self::segment_fault(seg));
            }
        } else if last > u64::from(s.limit) {
            return Err(Self::segment_fault(seg));
        }
        Ok(s.base.wrapping_add(offset) & 0xffff_ffff)
    }

    fn user(&self) -> bool {
        self.cpl == 3
    }

    /// Fetch instruction bytes at CS:offset; returns how many bytes could be fetched
    /// (at least one, or the fault of the first byte). Fetches stop at a fault on a later
    /// page, or at the CS limit, so the decoder sees only reachable bytes.
    pub fn fetch(&mut self, offset: u64, buf: &mut [u8]) -> ExResult<usize> {
        let first = self.linear_address(CS, offset, 1, Access::Execute)?;
        let user = self.user();
        let mut got = 0usize;
        while got < buf.len() {
            let lin = if got == 0 {
                first
            } else {
                match self.linear_address(CS, offset.wrapping_add(got as u64), 1, Access::Execute) {
                    Ok(l) => l,
                    Err(_) => break,
                }
            };
            let n = (buf.len() - got).min(0x1000 - (lin & 0xfff) as usize);
            match self.translate(self.wrap_linear(lin), Access::Execute, user) {
                Ok(t) => {
                    if t.host.is_null() {
                        self.mmio_read(t.pa, &mut buf[got..got + n]);
                    } else {
                        // SAFETY: within one RAM page.
                        unsafe {
                            std::ptr::copy_nonoverlapping(t.host, buf[got..].as_mut_ptr(), n)
                        };
                    }
                }
                Err(e) if got == 0 => return Err(e),
                Err(_) => break,
            }
            got += n;
        }
        Ok(got)
    }

    /// Translate CS:offset for execution (the decode cache key).
    #[inline]
    pub fn fetch_translate(&mut self, offset: u64) -> ExResult<Translation> {
        let lin = self.linear_address(CS, offset, 1, Access::Execute)?;
        let user = self.user();
        self.translate(self.wrap_linear(lin), Access::Execute, user)
    }

    /// Read guest memory at a linear address for debugging output, without touching the
    /// TLB or MMIO (only accessed bits may be set by the walk). Returns the bytes read,
    /// stopping at the first unmapped or non-RAM page.
    pub fn debug_read(&self, linear: u64, buf: &mut [u8]) -> usize {
        let mut done = 0usize;
        while done < buf.len() {
            let lin = self.wrap_linear(linear.wrapping_add(done as u64));
            let n = (buf.len() - done).min(0x1000 - (lin & 0xfff) as usize);
            let pa = if self.paging() {
                match self.walk(lin, Access::Read, false) {
                    Ok((page, _, _)) => page | (lin & 0xfff),
                    Err(_) => break,
                }
            } else {
                lin
            };
            if !self.ram.read_bytes(pa, &mut buf[done..done + n]) {
                break;
            }
            done += n;
        }
        done
    }

    /// Current CPL as seen by the snapshot.
    pub fn cpl(&self) -> u8 {
        self.cpl
    }
}

/// What compiled blocks need to reach RAM through this CPU's TLB (see `crate::jit`).
/// One entry of the jump cache: the compiled block at a linear RIP, valid while its key
/// (epoch and CPL) is current and its code page keeps its generation. `repr(C)`: compiled
/// code reads it.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct JumpEntry {
    pub rip: u64,
    /// Where compiled code enters the block from another one.
    pub entry: *const u8,
    /// Global RAM page index of the code, and its generation when compiled.
    pub page: u32,
    pub generation: u32,
    pub key: u32,
    pub _pad: u32,
}

pub(crate) const JUMP_ENTRIES: usize = 4096;

pub(crate) const EMPTY_JUMP: JumpEntry = JumpEntry {
    rip: u64::MAX,
    entry: std::ptr::null(),
    page: 0,
    generation: 0,
    key: 0,
    _pad: 0,
};

/// The jump-cache slot of a linear RIP (compiled code computes the same).
pub(crate) fn jump_slot(rip: u64) -> usize {
    ((rip ^ (rip >> 10)) as usize) & (JUMP_ENTRIES - 1)
}

pub(crate) struct JitView {
    pub tlb: *const TlbEntry,
    pub code_bits: *const u64,
    pub jumps: *const JumpEntry,
    pub generations: *const u32,
    pub jump_key: u32,
    pub need_read: u8,
    pub need_write: u8,
    /// Writes are logged: compiled stores leave for the interpreter, which logs them.
    pub dirty_logging: bool,
    pub fs_base: u64,
    pub gs_base: u64,
}

impl Mmu {
    /// The TLB, the code-page bitmap, the permission bits this CPL needs and the FS/GS
    /// bases: what a compiled block's inline memory accesses use, exactly as
    /// [`Mmu::fast_host`] does. None outside 64-bit code.
    pub(crate) fn jit_view(&self) -> Option<JitView> {
        if !self.code64 {
            return None;
        }
        let (need_read, need_write) = jit_needs(self.cpl == 3);
        Some(JitView {
            tlb: self.tlb.as_ptr(),
            code_bits: self.ram.code_bits(),
            jumps: self.jumps.as_ptr(),
            generations: self.ram.generations_ptr(),
            jump_key: self.jump_key(),
            need_read,
            need_write,
            dirty_logging: self.ram.dirty_logging(),
            fs_base: self.seg[crate::state::FS].base,
            gs_base: self.seg[crate::state::GS].base,
        })
    }
}

impl Mmu {
    /// Every jump-cache entry is dead from now on.
    pub(crate) fn invalidate_jumps(&mut self) {
        self.jump_epoch = self.jump_epoch.wrapping_add(1);
        if self.jump_epoch >= 1 << 29 {
            // The key would wrap: really empty the cache.
            self.jumps.fill(EMPTY_JUMP);
            self.jump_epoch = 1;
        }
    }

    fn jump_key(&self) -> u32 {
        (self.jump_epoch << 2) | u32::from(self.cpl)
    }

    /// Compiled code for the block at `rip` (in the current mode and mappings, at this
    /// CPL) enters at `entry`; its code is on RAM page `page` at `generation`.
    pub(crate) fn remember_jump(&mut self, rip: u64, entry: *const u8, page: u32, generation: u32) {
        let key = self.jump_key();
        self.jumps[jump_slot(rip)] = JumpEntry {
            rip,
            entry,
            page,
            generation,
            key,
            _pad: 0,
        };
    }
}

/// The permission bits (the RAM bit included) compiled code needs in a TLB entry to read
/// and to write, for a user or a supervisor access.
pub(crate) fn jit_needs(user: bool) -> (u8, u8) {
    (
        required_perms(Access::Read, user) | T_RAM,
        required_perms(Access::Write, user) | T_RAM,
    )
}

/// The permission bits of a dirty RAM page that everybody may read, write and run (for
/// TLBs built by tests).
pub(crate) const T_ALL_RAM: u8 = T_UR | T_UW | T_UX | T_SW | T_SX | T_DIRTY | T_RAM;

/// The TLB permission bits an access needs (a write also needs the dirty bit set).
#[inline(always)]
fn required_perms(access: Access, user: bool) -> u8 {
    match (access, user) {
        (Access::Read, true) => T_UR,
        (Access::Read, false) => 0,
        (Access::Write, true) => T_UW | T_DIRTY,
        (Access::Write, false) => T_SW | T_DIRTY,
        (Access::Execute, true) => T_UX,
        (Access::Execute, false) => T_SX,
    }
}

/// Bits 48..63 are copies of bit 47.
#[inline]
pub fn is_canonical(addr: u64) -> bool {
    ((addr as i64) << 16 >> 16) as u64 == addr
}

impl Mmu {
    /// The host address of a data access in 64-bit code that stays inside one RAM page
    /// whose TLB entry already allows it: the common case, kept small enough to inline.
    /// None sends the access down the full path (segments, page walk, MMIO, faults).
    #[inline(always)]
    fn fast_host(
        &self,
        seg: usize,
        offset: u64,
        size: usize,
        write: bool,
    ) -> Option<(*mut u8, usize)> {
        if !self.code64 {
            return None;
        }
        let lin = if seg >= 4 {
            offset.wrapping_add(self.seg[seg].base)
        } else {
            offset
        };
        if (lin & 0xfff) as usize + size > 0x1000 || !is_canonical(lin) {
            return None;
        }
        let vpn = lin >> 12;
        let e = &self.tlb[(vpn as usize) & (TLB_ENTRIES - 1)];
        let access = if write { Access::Write } else { Access::Read };
        let need = required_perms(access, self.cpl == 3);
        if e.tag != vpn || e.host.is_null() || e.perms & need != need {
            return None;
        }
        // SAFETY: host is a page base inside the RAM mapping and lin & 0xfff < 0x1000.
        Some((
            unsafe { e.host.add((lin & 0xfff) as usize) },
            e.page as usize,
        ))
    }

    #[inline(never)]
    fn read_slow(&mut self, seg: usize, offset: u64, size: usize) -> ExResult<u64> {
        let lin = self.linear_address(seg, offset, size, Access::Read)?;
        let user = self.user();
        self.read_linear(lin, size, user)
    }

    #[inline(never)]
    fn write_slow(&mut self, seg: usize, offset: u64, size: usize, value: u64) -> ExResult<()> {
        let lin = self.linear_address(seg, offset, size, Access::Write)?;
        let user = self.user();
        self.write_linear(lin, size, value, user)
    }
}

impl DataAccess for Mmu {
    #[inline(always)]
    fn read(&mut self, seg: usize, offset: u64, size: usize) -> ExResult<u64> {
        match self.fast_host(seg, offset, size, false) {
            // SAFETY: fast_host checked that the access stays within one RAM page.
            Some((host, _)) => Ok(unsafe { ram::load_host(host, size) }),
            None => self.read_slow(seg, offset, size),
        }
    }

    #[inline(always)]
    fn write(&mut self, seg: usize, offset: u64, size: usize, value: u64) -> ExResult<()> {
        match self.fast_host(seg, offset, size, true) {
            Some((host, page)) => {
                // SAFETY: fast_host checked that the access stays within one RAM page.
                unsafe { ram::store_host(host, size, value) };
                self.code_written |= self.ram.note_write(page);
                Ok(())
            }
            None => self.write_slow(seg, offset, size, value),
        }
    }

    fn read_bytes(&mut self, seg: usize, offset: u64, buf: &mut [u8]) -> ExResult<()> {
        let lin = self.linear_address(seg, offset, buf.len(), Access::Read)?;
        let user = self.user();
        self.read_linear_bytes(lin, buf, user, Access::Read)
    }

    fn write_bytes(&mut self, seg: usize, offset: u64, buf: &[u8]) -> ExResult<()> {
        let lin = self.linear_address(seg, offset, buf.len(), Access::Write)?;
        let user = self.user();
        self.write_linear_bytes(lin, buf, user)
    }

    fn compare_exchange(
        &mut self,
        seg: usize,
        offset: u64,
        size: usize,
        expected: u64,
        new: u64,
    ) -> ExResult<u64> {
        let lin = self.linear_address(seg, offset, size, Access::Write)?;
        let user = self.user();
        self.compare_exchange_linear(lin, size, expected, new, user)
    }

    fn compare_exchange16(
        &mut self,
        seg: usize,
        offset: u64,
        expected: u128,
        new: u128,
    ) -> ExResult<u128> {
        let lin = self.wrap_linear(self.linear_address(seg, offset, 16, Access::Write)?);
        let user = self.user();
        // CMPXCHG16B requires 16-byte alignment, so it never crosses a page.
        if lin & 0xf != 0 {
            return Err(Exception::GeneralProtection(0));
        }
        let t = self.translate(lin, Access::Write, user)?;
        if !t.host.is_null() {
            let generation = self.ram.generation(t.page);
            if let Some(old) = self.ram.compare_exchange16(t.pa, expected, new) {
                self.code_written |= self.ram.generation(t.page) != generation;
                return Ok(old);
            }
        }
        let mut b = [0u8; 16];
        self.mmio_read(t.pa, &mut b);
        let old = u128::from_le_bytes(b);
        if old == expected {
            self.mmio_write(t.pa, &new.to_le_bytes());
        }
        Ok(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VirtualClock;
    use crate::cpu::test_util::{lapic, TestIo};
    use crate::ram::test_util::ram;
    use crate::state::{CR0_PE, EFER_LME};

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;

    /// 4-level tables: 0x40_0000.. mapped by PT (4 KiB pages), 0x20_0000 a 2 MiB page.
    fn setup() -> (Mmu, Arc<GuestRam>) {
        let ram = ram(16 << 20);
        let clock = Arc::new(VirtualClock::new());
        let (apic, _) = lapic(&clock);
        let mut mmu = Mmu::new(ram.clone(), Arc::new(TestIo::default()), apic);
        ram.write_u64(PML4, 8, PDPT | 7);
        ram.write_u64(PDPT, 8, PD | 7);
        ram.write_u64(PD + 8, 8, 0x80_0000 | 0x87); // 2M page at 0x20_0000 -> 0x80_0000
        ram.write_u64(PD + 16, 8, PT | 7); // 0x40_0000..0x60_0000
        ram.write_u64(PT, 8, 0x10_0000 | 3); // 0x40_0000: supervisor RW
        ram.write_u64(PT + 8, 8, 0x10_1000 | 5); // 0x40_1000: user read-only
        ram.write_u64(PT + 16, 8, 0x10_2000 | 7 | PTE_NX); // 0x40_2000: user RW, NX
        let mut s = CpuState::power_on();
        s.cr0 = CR0_PE | CR0_PG | CR0_WP;
        s.cr4 = CR4_PAE | CR4_PGE;
        s.cr3 = PML4;
        s.efer = EFER_LMA | EFER_LME | EFER_NXE;
        mmu.sync(&s);
        (mmu, ram)
    }

    fn pf(mmu: &mut Mmu, addr: u64, access: Access, user: bool) -> Option<u32> {
        match mmu.translate(addr, access, user) {
            Err(Exception::PageFault {
                error_code,
                address,
            }) => {
                assert_eq!(address, addr);
                Some(error_code)
            }
            Err(e) => panic!("unexpected {e:?}"),
            Ok(_) => None,
        }
    }

    #[test]
    fn walks_and_large_pages() {
        let (mut mmu, ram) = setup();
        assert_eq!(
            mmu.translate(0x40_0123, Access::Read, false).unwrap().pa,
            0x10_0123
        );
        assert_eq!(
            mmu.translate(0x2f_f010, Access::Read, true).unwrap().pa,
            0x8f_f010
        );
        // Accessed bits on every level; dirty only after a write.
        assert_ne!(ram.read_u64(PML4, 8).unwrap() & PTE_A, 0);
        assert_ne!(ram.read_u64(PT, 8).unwrap() & PTE_A, 0);
        assert_eq!(ram.read_u64(PT, 8).unwrap() & PTE_D, 0);
        mmu.write_linear(0x40_0010, 4, 0xabcd, false).unwrap();
        assert_ne!(ram.read_u64(PT, 8).unwrap() & PTE_D, 0);
        assert_eq!(ram.read_u64(0x10_0010, 4), Some(0xabcd));
    }

    #[test]
    fn fault_error_codes() {
        let (mut mmu, _) = setup();
        // Not present.
        assert_eq!(pf(&mut mmu, 0x40_3000, Access::Read, false), Some(0));
        assert_eq!(
            pf(&mut mmu, 0x40_3000, Access::Write, true),
            Some(PF_WRITE | PF_USER)
        );
        // User access to a supervisor page.
        assert_eq!(
            pf(&mut mmu, 0x40_0000, Access::Read, true),
            Some(PF_PRESENT | PF_USER)
        );
        // Write to read-only: user, and supervisor with CR0.WP.
        assert_eq!(
            pf(&mut mmu, 0x40_1000, Access::Write, true),
            Some(PF_PRESENT | PF_WRITE | PF_USER)
        );
        assert_eq!(
            pf(&mut mmu, 0x40_1000, Access::Write, false),
            Some(PF_PRESENT | PF_WRITE)
        );
        // NX.
        assert_eq!(
            pf(&mut mmu, 0x40_2000, Access::Execute, true),
            Some(PF_PRESENT | PF_USER | PF_FETCH)
        );
        assert_eq!(pf(&mut mmu, 0x40_2000, Access::Read, true), None);
        // Reserved bit (address bit above MAXPHYADDR).
        mmu.ram.write_u64(PT + 24, 8, (1u64 << 45) | 0x3000 | 1);
        assert_eq!(
            pf(&mut mmu, 0x40_3000, Access::Read, false),
            Some(PF_PRESENT | PF_RSVD)
        );
    }

    #[test]
    fn supervisor_write_to_read_only_without_wp() {
        let (mut mmu, _) = setup();
        let mut s = CpuState::power_on();
        s.cr0 = CR0_PE | CR0_PG;
        s.cr4 = CR4_PAE;
        s.cr3 = PML4;
        s.efer = EFER_LMA | EFER_LME | EFER_NXE;
        mmu.sync(&s);
        assert!(mmu.translate(0x40_1000, Access::Write, false).is_ok());
    }

    #[test]
    fn tlb_flushes() {
        let (mut mmu, ram) = setup();
        assert_eq!(
            mmu.translate(0x40_0000, Access::Read, false).unwrap().pa,
            0x10_0000
        );
        ram.write_u64(PT, 8, 0x20_0000 | 3);
        // Stale until flushed, as on hardware.
        assert_eq!(
            mmu.translate(0x40_0000, Access::Read, false).unwrap().pa,
            0x10_0000
        );
        mmu.flush_page(0x40_0fff);
        assert_eq!(
            mmu.translate(0x40_0000, Access::Read, false).unwrap().pa,
            0x20_0000
        );
        // Global entries survive a CR3 reload, others do not.
        ram.write_u64(PT + 32, 8, 0x30_0000 | 3 | PTE_G); // 0x40_4000
        assert_eq!(
            mmu.translate(0x40_4000, Access::Read, false).unwrap().pa,
            0x30_0000
        );
        ram.write_u64(PT + 32, 8, 0x31_0000 | 3 | PTE_G);
        ram.write_u64(PT, 8, 0x21_0000 | 3);
        mmu.flush_non_global();
        assert_eq!(
            mmu.translate(0x40_4000, Access::Read, false).unwrap().pa,
            0x30_0000
        );
        assert_eq!(
            mmu.translate(0x40_0000, Access::Read, false).unwrap().pa,
            0x21_0000
        );
        mmu.flush_all();
        assert_eq!(
            mmu.translate(0x40_4000, Access::Read, false).unwrap().pa,
            0x31_0000
        );
        // INVLPG on a 2 MiB page drops every 4 KiB fragment of it.
        assert_eq!(
            mmu.translate(0x3f_f000, Access::Read, false).unwrap().pa,
            0x9f_f000
        );
        ram.write_u64(PD + 8, 8, 0xa0_0000 | 0x87);
        mmu.flush_page(0x20_0000);
        assert_eq!(
            mmu.translate(0x3f_f000, Access::Read, false).unwrap().pa,
            0xbf_f000
        );
    }

    #[test]
    fn legacy_32bit_paging_and_page_crossing_accesses() {
        let (mut mmu, ram) = setup();
        // 32-bit paging: PD at 0x5000; 4 MiB page at 0 -> 0xc0_0000; 4 KiB pages at 4 MiB.
        ram.write_u64(0x5000, 4, 0xc0_0000 | 0x83);
        ram.write_u64(0x5004, 4, 0x6000 | 3);
        ram.write_u64(0x6000, 4, 0x7000 | 3);
        ram.write_u64(0x6004, 4, 0x9000 | 3);
        let mut s = CpuState::power_on();
        s.cr0 = CR0_PE | CR0_PG;
        s.cr4 = CR4_PSE;
        s.cr3 = 0x5000;
        mmu.sync(&s);
        mmu.flush_all();
        assert_eq!(
            mmu.translate(0x12_3456, Access::Read, false).unwrap().pa,
            0xd2_3456
        );
        // An 8-byte write across 0x40_0ffc..0x40_1004 lands on two physical pages.
        mmu.write_linear(0x40_0ffc, 8, 0x1122_3344_5566_7788, false)
            .unwrap();
        assert_eq!(ram.read_u64(0x7ffc, 4), Some(0x5566_7788));
        assert_eq!(ram.read_u64(0x9000, 4), Some(0x1122_3344));
        assert_eq!(
            mmu.read_linear(0x40_0ffc, 8, false).unwrap(),
            0x1122_3344_5566_7788
        );
        // A crossing write whose second page faults writes nothing.
        assert!(mmu.write_linear(0x40_1ffe, 4, u64::MAX, false).is_err());
        assert_eq!(ram.read_u64(0x9ffe, 2), Some(0));
    }

    #[test]
    fn non_canonical_and_segment_limits() {
        let (mut mmu, _) = setup();
        let mut s = CpuState::power_on();
        crate::cpu::test_util::long_mode(&mut s);
        s.cr3 = PML4;
        mmu.sync(&s);
        assert_eq!(
            DataAccess::read(&mut mmu, crate::state::DS, 0x8000_0000_0000, 1),
            Err(Exception::GeneralProtection(0))
        );
        assert_eq!(
            DataAccess::read(&mut mmu, crate::state::SS, 0x8000_0000_0000, 1),
            Err(Exception::StackFault(0))
        );
        // Real mode: 64 KiB limit.
        let s = CpuState::power_on();
        mmu.sync(&s);
        assert_eq!(
            DataAccess::read(&mut mmu, crate::state::DS, 0xffff, 2),
            Err(Exception::GeneralProtection(0))
        );
    }
}
