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

/// MXCSR underflow mask (UM) and flush-to-zero (FTZ) bits.
const UNDERFLOW_MASK: u32 = 1 << 11;
const FLUSH_TO_ZERO: u32 = 1 << 15;

/// Guest MXCSR control bits with every exception masked and the flags cleared. FTZ only
/// applies while underflow is masked; with it unmasked a tiny result must stay visible so
/// the caller can raise #XM for it.
fn host_control(mxcsr: u32) -> u32 {
    let mut control = (mxcsr & 0xffc0) | 0x1f80;
    if mxcsr & UNDERFLOW_MASK == 0 {
        control &= !FLUSH_TO_ZERO;
    }
    control
}

const PRE_COMPUTATION: u32 = 0x07;
const OVERFLOW: u32 = 0x08;
const UNDERFLOW: u32 = 0x10;
const PRECISION: u32 = 0x20;

/// How a kernel that can overflow or underflow computes each lane.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Arith {
    AddSub,
    Mul,
    Div,
    /// Double to single precision.
    Narrow,
}

/// For the kernels that can overflow or underflow: the operation class, the scalar
/// kernel that computes one lane, the source and result lane widths and the lane count.
fn lane_shape(kernel: Kernel) -> Option<(Arith, Kernel, usize, usize, usize)> {
    use Arith::*;
    use Kernel as K;
    Some(match kernel {
        K::Addss | K::Subss | K::Mulss | K::Divss => (arith(kernel), kernel, 32, 32, 1),
        K::Addsd | K::Subsd | K::Mulsd | K::Divsd => (arith(kernel), kernel, 64, 64, 1),
        K::Addps => (AddSub, K::Addss, 32, 32, 4),
        K::Subps => (AddSub, K::Subss, 32, 32, 4),
        K::Mulps => (Mul, K::Mulss, 32, 32, 4),
        K::Divps => (Div, K::Divss, 32, 32, 4),
        K::Addpd => (AddSub, K::Addsd, 64, 64, 2),
        K::Subpd => (AddSub, K::Subsd, 64, 64, 2),
        K::Mulpd => (Mul, K::Mulsd, 64, 64, 2),
        K::Divpd => (Div, K::Divsd, 64, 64, 2),
        K::Cvtsd2ss => (Narrow, K::Cvtsd2ss, 64, 32, 1),
        K::Cvtpd2ps => (Narrow, K::Cvtsd2ss, 64, 32, 2),
        _ => return None,
    })
}

fn arith(kernel: Kernel) -> Arith {
    match kernel {
        Kernel::Mulss | Kernel::Mulsd => Arith::Mul,
        Kernel::Divss | Kernel::Divsd => Arith::Div,
        _ => Arith::AddSub,
    }
}

fn lane(v: u128, bits: usize, i: usize) -> u128 {
    (v >> (i * bits)) & ((1u128 << bits) - 1)
}

fn mantissa_bits(bits: usize) -> usize {
    if bits == 32 {
        23
    } else {
        52
    }
}

/// A nonzero value with a zero exponent field.
fn is_denormal(v: u128, bits: usize) -> bool {
    let m = mantissa_bits(bits);
    let exponent = (v >> m) & ((1u128 << (bits - 1 - m)) - 1);
    exponent == 0 && v & ((1u128 << m) - 1) != 0
}

/// `v` scaled by a power of two into [1, 2) (sign kept), exactly; zero, infinities and
/// NaNs are returned unchanged.
fn normalize(v: u128, bits: usize) -> u128 {
    let m = mantissa_bits(bits);
    let exponent_mask = (1u128 << (bits - 1 - m)) - 1;
    let bias = exponent_mask >> 1;
    let sign = v & (1u128 << (bits - 1));
    let exponent = (v >> m) & exponent_mask;
    let mut fraction = v & ((1u128 << m) - 1);
    if exponent == exponent_mask || (exponent == 0 && fraction == 0) {
        return v;
    }
    if exponent == 0 {
        // Denormal: shift the leading one into the implicit bit's place.
        let top = 127 - fraction.leading_zeros() as usize;
        fraction = (fraction << (m - top)) & ((1u128 << m) - 1);
    }
    sign | (bias << m) | fraction
}

/// True if `kernel` wrote a nonzero denormal into one of its result lanes: a tiny result,
/// which signals underflow when UM is unmasked even if it is exact.
fn tiny_result(kernel: Kernel, result: u128) -> bool {
    match lane_shape(kernel) {
        Some((_, _, _, bits, count)) => {
            (0..count).any(|i| is_denormal(lane(result, bits, i), bits))
        }
        None => false,
    }
}

/// Whether one lane's result, rounded to the destination precision with an unbounded
/// exponent, is inexact. Operands are scaled by powers of two so that the host computes
/// the same significand without overflowing or underflowing.
fn inexact_unbounded(
    class: Arith,
    scalar: Kernel,
    bits: usize,
    overflow: bool,
    (a, b): (u128, u128),
    mxcsr: u32,
) -> bool {
    match class {
        Arith::Mul | Arith::Div => {
            let (a, b) = (normalize(a, bits), normalize(b, bits));
            binary(scalar, a, b, mxcsr).1 & PRECISION != 0
        }
        Arith::Narrow => binary(scalar, 0, normalize(b, 64), mxcsr).1 & PRECISION != 0,
        // A tiny sum or difference is always exact: both operands are multiples of the
        // smallest denormal.
        Arith::AddSub if !overflow => false,
        Arith::AddSub => {
            // Scaled down by 4 the sum no longer overflows; if the scaling itself loses
            // bits, the operands are too far apart for the sum to be exact.
            let (quarter, multiply) = if bits == 32 {
                (u128::from(0.25f32.to_bits()), Kernel::Mulss)
            } else {
                (u128::from(0.25f64.to_bits()), Kernel::Mulsd)
            };
            let (a, fa) = binary(multiply, a, quarter, mxcsr);
            let (b, fb) = binary(multiply, b, quarter, mxcsr);
            (fa | fb | binary(scalar, a, b, mxcsr).1) & PRECISION != 0
        }
    }
}

/// Exception flags of `kernel` applied to `a` and `b` as the hardware reports them under
/// the guest's masks, given `flags` and `result` from the all-masked host run. With OE
/// or UE unmasked, a lane that overflows or is tiny delivers no rounded result: it
/// signals UE even when exact, and PE only if its result is inexact with an unbounded
/// exponent (Intel SDM vol. 1, 4.9.1.6 and 11.5.2.5). Those lanes are recomputed one at
/// a time; everything else keeps the masked run's flags.
pub(crate) fn guest_flags(
    kernel: Kernel,
    a: u128,
    b: u128,
    mxcsr: u32,
    result: u128,
    flags: u32,
) -> u32 {
    let unmasked = !(mxcsr >> 7) & 0x3f;
    let Some((class, scalar, src_bits, dst_bits, count)) = lane_shape(kernel) else {
        return flags;
    };
    if flags & PRE_COMPUTATION & unmasked != 0 {
        return flags;
    }
    let overflow_trap = unmasked & OVERFLOW != 0 && flags & OVERFLOW != 0;
    let underflow_trap =
        unmasked & UNDERFLOW != 0 && (flags & UNDERFLOW != 0 || tiny_result(kernel, result));
    if !overflow_trap && !underflow_trap {
        return flags;
    }
    (0..count).fold(0, |acc, i| {
        let (x, y) = (lane(a, src_bits, i), lane(b, src_bits, i));
        let (r, f) = if class == Arith::Narrow {
            binary(scalar, 0, y, mxcsr)
        } else {
            binary(scalar, x, y, mxcsr)
        };
        let tiny = f & UNDERFLOW != 0 || is_denormal(lane(r, dst_bits, 0), dst_bits);
        let trapped = if f & OVERFLOW != 0 && unmasked & OVERFLOW != 0 {
            OVERFLOW
        } else if tiny && unmasked & UNDERFLOW != 0 {
            UNDERFLOW
        } else {
            return acc | f;
        };
        let inexact =
            if inexact_unbounded(class, scalar, src_bits, trapped == OVERFLOW, (x, y), mxcsr) {
                PRECISION
            } else {
                0
            };
        acc | (f & PRE_COMPUTATION) | trapped | inexact
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_scales_into_one_to_two() {
        let f64_bits = |x: f64| u128::from(x.to_bits());
        let f32_bits = |x: f32| u128::from(x.to_bits());
        assert_eq!(normalize(f64_bits(12.0), 64), f64_bits(1.5));
        assert_eq!(normalize(f64_bits(-0.375), 64), f64_bits(-1.5));
        // Denormals: 3 units of the last place become 1.5.
        assert_eq!(normalize(3, 64), f64_bits(1.5));
        assert_eq!(normalize(3, 32), f32_bits(1.5));
        assert_eq!(
            normalize(f32_bits(f32::INFINITY), 32),
            f32_bits(f32::INFINITY)
        );
        assert_eq!(normalize(f32_bits(-0.0), 32), f32_bits(-0.0));
    }

    #[test]
    fn tiny_results_are_found_in_computed_lanes_only() {
        // addss computes lane 0 only; a denormal in lane 1 is the old destination.
        assert!(!tiny_result(Kernel::Addss, 1 << 32));
        assert!(tiny_result(Kernel::Addss, 1));
        assert!(tiny_result(Kernel::Cvtpd2ps, 1 << 32));
        assert!(tiny_result(Kernel::Addpd, 1 << 64));
        assert!(!tiny_result(Kernel::Minpd, 1));
    }
}
