//! SSE floating-point kernels, executed by the host CPU.
//!
//! Each kernel runs the guest's instruction on host XMM registers between an LDMXCSR of
//! the guest's control bits (rounding, DAZ, FTZ; every exception masked, flags cleared)
//! and an STMXCSR that collects the exception flags; the host's MXCSR is restored before
//! the asm block ends. This gives bit-exact IEEE results, x86 NaN propagation, integer
//! indefinite values and exception flags without a software float library. The emu
//! accelerator therefore needs an x86-64 host.

use core::arch::asm;
use core::arch::x86_64::__m128i;

/// Guest MXCSR control bits with every exception masked and the flags cleared.
fn host_control(mxcsr: u32) -> u32 {
    (mxcsr & 0xffc0) | 0x1f80
}

fn to_vec(v: u128) -> __m128i {
    // SAFETY: u128 and __m128i are both 16 plain bytes; every bit pattern is valid.
    unsafe { core::mem::transmute::<u128, __m128i>(v) }
}

fn from_vec(v: __m128i) -> u128 {
    // SAFETY: as in `to_vec`.
    unsafe { core::mem::transmute::<__m128i, u128>(v) }
}

/// Runs `insn x, y` (plus an optional immediate suffix) under the guest's MXCSR.
macro_rules! run2 {
    ($insn:literal, $suffix:literal, $a:expr, $b:expr, $mxcsr:expr) => {{
        let mut x = to_vec($a);
        let y = to_vec($b);
        let mut csr: u32 = host_control($mxcsr);
        let mut saved: u32 = 0;
        // SAFETY: the block only touches the two named XMM registers and the two local
        // u32 slots it is given pointers to; it restores the host MXCSR before it ends.
        unsafe {
            asm!(
                "stmxcsr [{saved}]",
                "ldmxcsr [{csr}]",
                concat!($insn, " {x}, {y}", $suffix),
                "stmxcsr [{csr}]",
                "ldmxcsr [{saved}]",
                saved = in(reg) core::ptr::addr_of_mut!(saved),
                csr = in(reg) core::ptr::addr_of_mut!(csr),
                x = inout(xmm_reg) x,
                y = in(xmm_reg) y,
                options(nostack, preserves_flags),
            );
        }
        (from_vec(x), csr & 0x3f)
    }};
}

macro_rules! kernels {
    ($($name:ident => $insn:literal,)*) => {
        /// Two-operand SSE instructions of the form `op xmm1, xmm2`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum Kernel { $($name,)* }

        /// Runs `kernel` with destination `a` and source `b`; returns the new destination
        /// and the MXCSR exception flags raised.
        pub(crate) fn binary(kernel: Kernel, a: u128, b: u128, mxcsr: u32) -> (u128, u32) {
            match kernel { $(Kernel::$name => run2!($insn, "", a, b, mxcsr),)* }
        }
    };
}

kernels! {
    Addss => "addss", Addsd => "addsd", Addps => "addps", Addpd => "addpd",
    Subss => "subss", Subsd => "subsd", Subps => "subps", Subpd => "subpd",
    Mulss => "mulss", Mulsd => "mulsd", Mulps => "mulps", Mulpd => "mulpd",
    Divss => "divss", Divsd => "divsd", Divps => "divps", Divpd => "divpd",
    Minss => "minss", Minsd => "minsd", Minps => "minps", Minpd => "minpd",
    Maxss => "maxss", Maxsd => "maxsd", Maxps => "maxps", Maxpd => "maxpd",
    Sqrtss => "sqrtss", Sqrtsd => "sqrtsd", Sqrtps => "sqrtps", Sqrtpd => "sqrtpd",
    Rcpss => "rcpss", Rcpps => "rcpps", Rsqrtss => "rsqrtss", Rsqrtps => "rsqrtps",
    Cvtss2sd => "cvtss2sd", Cvtsd2ss => "cvtsd2ss", Cvtps2pd => "cvtps2pd",
    Cvtpd2ps => "cvtpd2ps", Cvtdq2ps => "cvtdq2ps", Cvtdq2pd => "cvtdq2pd",
    Cvtps2dq => "cvtps2dq", Cvttps2dq => "cvttps2dq", Cvtpd2dq => "cvtpd2dq",
    Cvttpd2dq => "cvttpd2dq",
}

/// Element layout of CMPxx.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CmpWidth {
    Ss,
    Sd,
    Ps,
    Pd,
}

macro_rules! compare_with {
    ($insn:literal, $imm:expr, $a:expr, $b:expr, $mxcsr:expr) => {
        match $imm & 7 {
            0 => run2!($insn, ", 0", $a, $b, $mxcsr),
            1 => run2!($insn, ", 1", $a, $b, $mxcsr),
            2 => run2!($insn, ", 2", $a, $b, $mxcsr),
            3 => run2!($insn, ", 3", $a, $b, $mxcsr),
            4 => run2!($insn, ", 4", $a, $b, $mxcsr),
            5 => run2!($insn, ", 5", $a, $b, $mxcsr),
            6 => run2!($insn, ", 6", $a, $b, $mxcsr),
            _ => run2!($insn, ", 7", $a, $b, $mxcsr),
        }
    };
}

/// CMPSS/CMPSD/CMPPS/CMPPD with predicate `imm & 7` (legacy encodings ignore the rest).
pub(crate) fn compare(width: CmpWidth, imm: u8, a: u128, b: u128, mxcsr: u32) -> (u128, u32) {
    match width {
        CmpWidth::Ss => compare_with!("cmpss", imm, a, b, mxcsr),
        CmpWidth::Sd => compare_with!("cmpsd", imm, a, b, mxcsr),
        CmpWidth::Ps => compare_with!("cmpps", imm, a, b, mxcsr),
        CmpWidth::Pd => compare_with!("cmppd", imm, a, b, mxcsr),
    }
}

/// The scalar compares that set EFLAGS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Comis {
    Comiss,
    Comisd,
    Ucomiss,
    Ucomisd,
}

macro_rules! run_comis {
    ($insn:literal, $a:expr, $b:expr, $mxcsr:expr) => {{
        let x = to_vec($a);
        let y = to_vec($b);
        let mut csr: u32 = host_control($mxcsr);
        let mut saved: u32 = 0;
        let (zf, pf, cf): (u8, u8, u8);
        // SAFETY: as in `run2!`; the flags it changes are declared by omitting
        // preserves_flags.
        unsafe {
            asm!(
                "stmxcsr [{saved}]",
                "ldmxcsr [{csr}]",
                concat!($insn, " {x}, {y}"),
                "setz {zf}",
                "setp {pf}",
                "setc {cf}",
                "stmxcsr [{csr}]",
                "ldmxcsr [{saved}]",
                saved = in(reg) core::ptr::addr_of_mut!(saved),
                csr = in(reg) core::ptr::addr_of_mut!(csr),
                x = in(xmm_reg) x,
                y = in(xmm_reg) y,
                zf = out(reg_byte) zf,
                pf = out(reg_byte) pf,
                cf = out(reg_byte) cf,
                options(nostack),
            );
        }
        (zf != 0, pf != 0, cf != 0, csr & 0x3f)
    }};
}

/// Returns (ZF, PF, CF, MXCSR flags).
pub(crate) fn compare_flags(kind: Comis, a: u128, b: u128, mxcsr: u32) -> (bool, bool, bool, u32) {
    match kind {
        Comis::Comiss => run_comis!("comiss", a, b, mxcsr),
        Comis::Comisd => run_comis!("comisd", a, b, mxcsr),
        Comis::Ucomiss => run_comis!("ucomiss", a, b, mxcsr),
        Comis::Ucomisd => run_comis!("ucomisd", a, b, mxcsr),
    }
}

macro_rules! run_from_int {
    ($insn:literal, $reg:literal, $a:expr, $v:expr, $mxcsr:expr) => {{
        let mut x = to_vec($a);
        let v: u64 = $v;
        let mut csr: u32 = host_control($mxcsr);
        let mut saved: u32 = 0;
        // SAFETY: as in `run2!`.
        unsafe {
            asm!(
                "stmxcsr [{saved}]",
                "ldmxcsr [{csr}]",
                concat!($insn, " {x}, ", $reg),
                "stmxcsr [{csr}]",
                "ldmxcsr [{saved}]",
                saved = in(reg) core::ptr::addr_of_mut!(saved),
                csr = in(reg) core::ptr::addr_of_mut!(csr),
                x = inout(xmm_reg) x,
                v = in(reg) v,
                options(nostack, preserves_flags),
            );
        }
        (from_vec(x), csr & 0x3f)
    }};
}

/// CVTSI2SS/CVTSI2SD of a 32-bit (`wide` false) or 64-bit integer into the low element of `a`.
pub(crate) fn from_int(double: bool, wide: bool, a: u128, value: u64, mxcsr: u32) -> (u128, u32) {
    match (double, wide) {
        (false, false) => run_from_int!("cvtsi2ss", "{v:e}", a, value, mxcsr),
        (false, true) => run_from_int!("cvtsi2ss", "{v}", a, value, mxcsr),
        (true, false) => run_from_int!("cvtsi2sd", "{v:e}", a, value, mxcsr),
        (true, true) => run_from_int!("cvtsi2sd", "{v}", a, value, mxcsr),
    }
}

/// Float-to-integer conversions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ToInt {
    Cvtss2si,
    Cvttss2si,
    Cvtsd2si,
    Cvttsd2si,
}

macro_rules! run_to_int {
    ($insn:literal, $reg:literal, $a:expr, $mxcsr:expr) => {{
        let x = to_vec($a);
        let mut v: u64 = 0;
        let mut csr: u32 = host_control($mxcsr);
        let mut saved: u32 = 0;
        // SAFETY: as in `run2!`.
        unsafe {
            asm!(
                "stmxcsr [{saved}]",
                "ldmxcsr [{csr}]",
                concat!($insn, " ", $reg, ", {x}"),
                "stmxcsr [{csr}]",
                "ldmxcsr [{saved}]",
                saved = in(reg) core::ptr::addr_of_mut!(saved),
                csr = in(reg) core::ptr::addr_of_mut!(csr),
                x = in(xmm_reg) x,
                v = inout(reg) v,
                options(nostack, preserves_flags),
            );
        }
        (v, csr & 0x3f)
    }};
}

/// Converts the low element of `a` to a 32-bit (zero-extended) or 64-bit integer.
pub(crate) fn to_int(kind: ToInt, wide: bool, a: u128, mxcsr: u32) -> (u64, u32) {
    match (kind, wide) {
        (ToInt::Cvtss2si, false) => run_to_int!("cvtss2si", "{v:e}", a, mxcsr),
        (ToInt::Cvtss2si, true) => run_to_int!("cvtss2si", "{v}", a, mxcsr),
        (ToInt::Cvttss2si, false) => run_to_int!("cvttss2si", "{v:e}", a, mxcsr),
        (ToInt::Cvttss2si, true) => run_to_int!("cvttss2si", "{v}", a, mxcsr),
        (ToInt::Cvtsd2si, false) => run_to_int!("cvtsd2si", "{v:e}", a, mxcsr),
        (ToInt::Cvtsd2si, true) => run_to_int!("cvtsd2si", "{v}", a, mxcsr),
        (ToInt::Cvttsd2si, false) => run_to_int!("cvttsd2si", "{v:e}", a, mxcsr),
        (ToInt::Cvttsd2si, true) => run_to_int!("cvttsd2si", "{v}", a, mxcsr),
    }
}
