//! The architectural state of one x86-64 CPU, and register access with x86's write rules
//! (32-bit writes zero-extend, 8/16-bit writes merge, AH..BH are bits 8..16).

use iced_x86::Register;
use serde::{Deserialize, Serialize};

// RFLAGS bits.
pub const CF: u64 = 1 << 0;
pub const PF: u64 = 1 << 2;
pub const AF: u64 = 1 << 4;
pub const ZF: u64 = 1 << 6;
pub const SF: u64 = 1 << 7;
pub const TF: u64 = 1 << 8;
pub const IF: u64 = 1 << 9;
pub const DF: u64 = 1 << 10;
pub const OF: u64 = 1 << 11;
pub const IOPL: u64 = 3 << 12;
pub const NT: u64 = 1 << 14;
pub const RF: u64 = 1 << 16;
pub const VM: u64 = 1 << 17;
pub const AC: u64 = 1 << 18;
pub const VIF: u64 = 1 << 19;
pub const VIP: u64 = 1 << 20;
pub const ID: u64 = 1 << 21;
/// The arithmetic status flags.
pub const STATUS_FLAGS: u64 = CF | PF | AF | ZF | SF | OF;
/// Bit 1 always reads as one.
pub const RFLAGS_FIXED: u64 = 1 << 1;

// CR0 bits.
pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_EM: u64 = 1 << 2;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_AM: u64 = 1 << 18;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;

// CR4 bits.
pub const CR4_VME: u64 = 1 << 0;
pub const CR4_PVI: u64 = 1 << 1;
pub const CR4_TSD: u64 = 1 << 2;
pub const CR4_DE: u64 = 1 << 3;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_MCE: u64 = 1 << 6;
pub const CR4_PGE: u64 = 1 << 7;
pub const CR4_PCE: u64 = 1 << 8;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const CR4_UMIP: u64 = 1 << 11;
pub const CR4_FSGSBASE: u64 = 1 << 16;
pub const CR4_PCIDE: u64 = 1 << 17;
pub const CR4_OSXSAVE: u64 = 1 << 18;
pub const CR4_SMEP: u64 = 1 << 20;
pub const CR4_SMAP: u64 = 1 << 21;

// EFER bits.
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;

/// Segment register indices, in encoding order.
pub const ES: usize = 0;
pub const CS: usize = 1;
pub const SS: usize = 2;
pub const DS: usize = 3;
pub const FS: usize = 4;
pub const GS: usize = 5;

/// A segment register with its hidden descriptor cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    /// Limit in bytes (already scaled by G).
    pub limit: u32,
    /// Descriptor type (4 bits).
    pub type_: u8,
    /// S: code/data segment (true) or system segment.
    pub s: bool,
    pub dpl: u8,
    pub present: bool,
    /// L: 64-bit code segment.
    pub l: bool,
    /// D/B: 32-bit default operand size / stack size.
    pub db: bool,
    pub g: bool,
    pub avl: bool,
}

impl Segment {
    /// A real-mode segment for `selector` (base = selector << 4, 64 KiB limit).
    pub fn real_mode(selector: u16, code: bool) -> Self {
        Segment {
            selector,
            base: u64::from(selector) << 4,
            limit: 0xffff,
            type_: if code { 0xb } else { 0x3 },
            s: true,
            dpl: 0,
            present: true,
            ..Default::default()
        }
    }
}

/// GDTR / IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// The x87 unit, stored as FXSAVE keeps it: eight 80-bit registers in physical order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct X87State {
    /// Physical registers R0..R7, 80-bit extended format (little-endian).
    pub regs: [[u8; 10]; 8],
    pub fcw: u16,
    /// Status word without TOP (bits 11..14), which lives in `top`.
    pub fsw: u16,
    pub top: u8,
    /// Full tag word (2 bits per register: 00 valid, 01 zero, 10 special, 11 empty).
    pub ftw: u16,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
}

impl Default for X87State {
    fn default() -> Self {
        // FNINIT state.
        X87State {
            regs: [[0; 10]; 8],
            fcw: 0x37f,
            fsw: 0,
            top: 0,
            ftw: 0xffff,
            fop: 0,
            fip: 0,
            fdp: 0,
        }
    }
}

/// Model-specific registers the CPU keeps (those with behaviour live with their owner).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub tsc_aux: u64,
    pub pat: u64,
    pub misc_enable: u64,
    pub mtrr_def_type: u64,
    pub mtrr_fixed: [u64; 11],
    pub mtrr_var: [u64; 16],
    pub spec_ctrl: u64,
}

/// The register file of one CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuState {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15 (encoding order).
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS.
    pub seg: [Segment; 6],
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub ldtr: Segment,
    pub tr: Segment,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub xcr0: u64,
    pub dr: [u64; 8],
    pub xmm: [u128; 16],
    pub mxcsr: u32,
    pub x87: X87State,
    pub msr: Msrs,
}

impl Default for CpuState {
    fn default() -> Self {
        Self::power_on()
    }
}

impl CpuState {
    /// The architectural state after RESET: real mode at F000:FFF0.
    pub fn power_on() -> Self {
        let mut seg = [Segment::real_mode(0, false); 6];
        seg[CS] = Segment {
            base: 0xffff_0000,
            ..Segment::real_mode(0xf000, true)
        };
        CpuState {
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: RFLAGS_FIXED,
            seg,
            gdtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            ldtr: Segment {
                type_: 2,
                present: true,
                limit: 0xffff,
                ..Default::default()
            },
            tr: Segment {
                type_: 0xb,
                present: true,
                limit: 0xffff,
                ..Default::default()
            },
            cr0: CR0_ET | CR0_CD | CR0_NW,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            xcr0: 1,
            dr: [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400],
            xmm: [0; 16],
            mxcsr: 0x1f80,
            x87: X87State::default(),
            msr: Msrs {
                pat: 0x0007_0406_0007_0406,
                ..Default::default()
            },
        }
    }

    /// Long mode is active (IA-32e).
    pub fn long_mode(&self) -> bool {
        self.efer & EFER_LMA != 0
    }

    /// Executing 64-bit code (long mode and CS.L).
    pub fn code64(&self) -> bool {
        self.long_mode() && self.seg[CS].l
    }

    /// Protected mode (CR0.PE), including long mode.
    pub fn protected_mode(&self) -> bool {
        self.cr0 & CR0_PE != 0
    }

    /// The code bitness the decoder should use: 16, 32 or 64.
    pub fn bitness(&self) -> u32 {
        if self.code64() {
            64
        } else if self.protected_mode() && self.seg[CS].db {
            32
        } else {
            16
        }
    }

    /// Current privilege level.
    pub fn cpl(&self) -> u8 {
        if !self.protected_mode() {
            0
        } else {
            self.seg[CS].selector as u8 & 3
        }
    }

    pub fn flag(&self, mask: u64) -> bool {
        self.rflags & mask != 0
    }

    pub fn set_flag(&mut self, mask: u64, on: bool) {
        if on {
            self.rflags |= mask;
        } else {
            self.rflags &= !mask;
        }
    }

    /// Read a general-purpose register of any width (8/16/32/64-bit, AH..BH included).
    /// Returns None for registers that are not general-purpose.
    pub fn read_gpr(&self, reg: Register) -> Option<u64> {
        let (index, width, high8) = gpr_info(reg)?;
        let v = self.gpr[index];
        Some(match (width, high8) {
            (1, true) => (v >> 8) & 0xff,
            (1, false) => v & 0xff,
            (2, _) => v & 0xffff,
            (4, _) => v & 0xffff_ffff,
            _ => v,
        })
    }

    /// Write a general-purpose register with x86 rules. Returns false for a register that
    /// is not general-purpose.
    pub fn write_gpr(&mut self, reg: Register, value: u64) -> bool {
        let Some((index, width, high8)) = gpr_info(reg) else {
            return false;
        };
        let old = self.gpr[index];
        self.gpr[index] = match (width, high8) {
            (1, true) => (old & !0xff00) | ((value & 0xff) << 8),
            (1, false) => (old & !0xff) | (value & 0xff),
            (2, _) => (old & !0xffff) | (value & 0xffff),
            (4, _) => value & 0xffff_ffff,
            _ => value,
        };
        true
    }

    /// Segment register index (ES..GS) for an iced segment register.
    pub fn seg_index(reg: Register) -> Option<usize> {
        match reg {
            Register::ES => Some(ES),
            Register::CS => Some(CS),
            Register::SS => Some(SS),
            Register::DS => Some(DS),
            Register::FS => Some(FS),
            Register::GS => Some(GS),
            _ => None,
        }
    }
}

/// (index in `gpr`, width in bytes, is AH/CH/DH/BH) for a general-purpose register.
pub fn gpr_info(reg: Register) -> Option<(usize, u8, bool)> {
    use Register as R;
    let r = reg as u32;
    let between = |lo: R, hi: R| r >= lo as u32 && r <= hi as u32;
    if between(R::AL, R::BL) {
        Some(((r - R::AL as u32) as usize, 1, false))
    } else if between(R::AH, R::BH) {
        Some(((r - R::AH as u32) as usize, 1, true))
    } else if between(R::SPL, R::R15L) {
        Some(((r - R::SPL as u32) as usize + 4, 1, false))
    } else if between(R::AX, R::R15W) {
        Some(((r - R::AX as u32) as usize, 2, false))
    } else if between(R::EAX, R::R15D) {
        Some(((r - R::EAX as u32) as usize, 4, false))
    } else if between(R::RAX, R::R15) {
        Some(((r - R::RAX as u32) as usize, 8, false))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_widths_follow_x86_rules() {
        let mut s = CpuState::power_on();
        s.gpr[0] = 0x1122_3344_5566_7788;
        assert_eq!(s.read_gpr(Register::AL), Some(0x88));
        assert_eq!(s.read_gpr(Register::AH), Some(0x77));
        assert_eq!(s.read_gpr(Register::AX), Some(0x7788));
        assert_eq!(s.read_gpr(Register::EAX), Some(0x5566_7788));
        s.write_gpr(Register::AH, 0xab);
        assert_eq!(s.gpr[0], 0x1122_3344_5566_ab88);
        s.write_gpr(Register::AX, 0xcdef);
        assert_eq!(s.gpr[0], 0x1122_3344_5566_cdef);
        s.write_gpr(Register::EAX, 0x1);
        assert_eq!(s.gpr[0], 1, "32-bit writes zero-extend");
        s.write_gpr(Register::SIL, 0x5a);
        assert_eq!(s.gpr[6] & 0xff, 0x5a);
        s.write_gpr(Register::R15L, 0x7);
        assert_eq!(s.gpr[15] & 0xff, 7);
        s.write_gpr(Register::R9W, 0x1234);
        assert_eq!(s.gpr[9], 0x1234);
        assert_eq!(s.read_gpr(Register::XMM0), None);
    }

    #[test]
    fn power_on_is_real_mode_at_the_reset_vector() {
        let s = CpuState::power_on();
        assert_eq!(s.bitness(), 16);
        assert_eq!(s.seg[CS].base + s.rip, 0xffff_fff0);
        assert_eq!(s.cpl(), 0);
    }
}
