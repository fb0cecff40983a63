//! SSE and SSE2 (legacy encodings only), plus LDMXCSR/STMXCSR and FXSAVE/FXRSTOR.
//!
//! Integer SIMD, moves, shuffles and bitwise operations are computed in Rust on `u128`
//! lanes and are bit-exact. Floating-point arithmetic, comparisons and conversions run the
//! same instruction on the host CPU (see [`float`]) with the guest's MXCSR rounding, DAZ
//! and FTZ settings loaded and every exception masked, so results, NaN propagation and
//! the MXCSR exception flags match real hardware. Exceptions the guest left unmasked raise
//! #XM (or #UD without CR4.OSXMMEXCPT) after the flags are recorded with the hardware's
//! precedence (see `record_flags` and [`float::guest_flags`]), without writing the
//! destination.
//!
//! An instruction belongs to this group by its mnemonic alone, so that every operand form
//! (XMM, general-purpose register, memory) is handled.
//!
//! MMX-register forms are not implemented (they return None): 64-bit glibc and the
//! kernel do not use them.

mod float;

use iced_x86::{Code, EncodingKind, Instruction, Mnemonic, OpKind, Register};

use crate::access::{effective_address, memory_segment, read_operand, write_operand, DataAccess};
use crate::exception::{ExResult, Exception};
use crate::state::{
    CpuState, AF, CF, CR0_EM, CR0_TS, CR4_OSFXSR, CR4_OSXMMEXCPT, FS, OF, PF, SF, ZF,
};

use float::{CmpWidth, Kernel};

/// The MXCSR bits this CPU implements (reported in the FXSAVE area); writing any other bit
/// with LDMXCSR or FXRSTOR raises #GP(0).
pub const MXCSR_MASK: u32 = 0xffff;

/// Executes an SSE/SSE2 instruction, or returns None if `instr` is not one this module owns.
pub fn execute<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> Option<ExResult<()>> {
    if instr.encoding() != EncodingKind::Legacy {
        return None;
    }
    // MMX-register forms share mnemonics with the SSE2 ones; they are not implemented.
    for op in 0..instr.op_count() {
        if instr.op_kind(op) == OpKind::Register && instr.op_register(op).is_mm() {
            return None;
        }
    }
    // MOVSD and CMPSD are also string instructions (the integer group's).
    if matches!(instr.code(), Code::Movsd_m32_m32 | Code::Cmpsd_m32_m32) {
        return None;
    }
    let mnemonic = instr.mnemonic();
    match mnemonic {
        Mnemonic::Movnti => return Some(movnti(state, mem, instr)),
        Mnemonic::Fxsave | Mnemonic::Fxsave64 => return Some(fxsave(state, mem, instr)),
        Mnemonic::Fxrstor | Mnemonic::Fxrstor64 => return Some(fxrstor(state, mem, instr)),
        _ => {}
    }
    let run = handler::<M>(mnemonic)?;
    if let Err(e) = check_available(state) {
        return Some(Err(e));
    }
    Some(run(state, mem, instr))
}

/// #UD without OSFXSR or with CR0.EM; #NM while CR0.TS is set (lazy FPU switching).
fn check_available(state: &CpuState) -> ExResult<()> {
    if state.cr0 & CR0_EM != 0 || state.cr4 & CR4_OSFXSR == 0 {
        return Err(Exception::InvalidOpcode);
    }
    if state.cr0 & CR0_TS != 0 {
        return Err(Exception::DeviceNotAvailable);
    }
    Ok(())
}

fn xmm_index(reg: Register) -> usize {
    (reg as usize).wrapping_sub(Register::XMM0 as usize) & 15
}

/// XMM register number of operand `op` (which must be an XMM register).
fn xreg(instr: &Instruction, op: u32) -> usize {
    xmm_index(instr.op_register(op))
}

/// Linear address of `seg:offset`, used for alignment checks only.
fn linear_address(state: &CpuState, seg: usize, offset: u64) -> u64 {
    if state.code64() && seg < FS {
        offset
    } else {
        state.seg[seg].base.wrapping_add(offset)
    }
}

/// Instructions whose 16-byte memory operand may be misaligned.
fn unaligned_ok(mnemonic: Mnemonic) -> bool {
    matches!(
        mnemonic,
        Mnemonic::Movups | Mnemonic::Movupd | Mnemonic::Movdqu | Mnemonic::Lddqu
    )
}

fn check_alignment(state: &CpuState, instr: &Instruction, seg: usize, ea: u64) -> ExResult<()> {
    if instr.memory_size().size() == 16
        && !unaligned_ok(instr.mnemonic())
        && linear_address(state, seg, ea) & 15 != 0
    {
        return Err(Exception::GeneralProtection(0));
    }
    Ok(())
}

/// Reads the memory operand (up to 16 bytes, zero-extended).
fn read_memory<M: DataAccess>(
    state: &CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<u128> {
    let size = instr.memory_size().size().min(16);
    let seg = memory_segment(instr);
    let ea = effective_address(state, instr);
    check_alignment(state, instr, seg, ea)?;
    let mut buf = [0u8; 16];
    mem.read_bytes(seg, ea, &mut buf[..size])?;
    Ok(u128::from_le_bytes(buf))
}

/// Writes the low bytes of `value` to the memory operand.
fn write_memory<M: DataAccess>(
    state: &CpuState,
    mem: &mut M,
    instr: &Instruction,
    value: u128,
) -> ExResult<()> {
    let size = instr.memory_size().size().min(16);
    let seg = memory_segment(instr);
    let ea = effective_address(state, instr);
    check_alignment(state, instr, seg, ea)?;
    mem.write_bytes(seg, ea, &value.to_le_bytes()[..size])
}

/// Source operand `op`: an XMM register, a general-purpose register or memory of the
/// instruction's memory size, zero-extended to 128 bits.
fn source<M: DataAccess>(
    state: &CpuState,
    mem: &mut M,
    instr: &Instruction,
    op: u32,
) -> ExResult<u128> {
    match instr.op_kind(op) {
        OpKind::Register => {
            let reg = instr.op_register(op);
            if reg.is_xmm() {
                Ok(state.xmm[xmm_index(reg)])
            } else {
                state
                    .read_gpr(reg)
                    .map(u128::from)
                    .ok_or(Exception::InvalidOpcode)
            }
        }
        OpKind::Memory => read_memory(state, mem, instr),
        _ => Err(Exception::InvalidOpcode),
    }
}

/// Writes a full or partial value to operand 0 when it is memory, or the full 128 bits to
/// the XMM register.
fn store_dest<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    value: u128,
) -> ExResult<()> {
    match instr.op_kind(0) {
        OpKind::Register if instr.op_register(0).is_xmm() => {
            state.xmm[xreg(instr, 0)] = value;
            Ok(())
        }
        OpKind::Memory => write_memory(state, mem, instr, value),
        _ => Err(Exception::InvalidOpcode),
    }
}

const LOW64: u128 = u64::MAX as u128;
const LOW32: u128 = u32::MAX as u128;

macro_rules! lanes {
    ($split:ident, $join:ident, $t:ty, $n:expr) => {
        fn $split(v: u128) -> [$t; $n] {
            core::array::from_fn(|i| (v >> (i * <$t>::BITS as usize)) as $t)
        }
        fn $join(a: [$t; $n]) -> u128 {
            a.iter().enumerate().fold(0u128, |acc, (i, &x)| {
                acc | (u128::from(x) << (i * <$t>::BITS as usize))
            })
        }
    };
}
lanes!(bytes, join_bytes, u8, 16);
lanes!(words, join_words, u16, 8);
lanes!(dwords, join_dwords, u32, 4);
lanes!(qwords, join_qwords, u64, 2);

fn map_b(a: u128, b: u128, f: impl Fn(u8, u8) -> u8) -> u128 {
    let (x, y) = (bytes(a), bytes(b));
    join_bytes(core::array::from_fn(|i| f(x[i], y[i])))
}
fn map_w(a: u128, b: u128, f: impl Fn(u16, u16) -> u16) -> u128 {
    let (x, y) = (words(a), words(b));
    join_words(core::array::from_fn(|i| f(x[i], y[i])))
}
fn map_d(a: u128, b: u128, f: impl Fn(u32, u32) -> u32) -> u128 {
    let (x, y) = (dwords(a), dwords(b));
    join_dwords(core::array::from_fn(|i| f(x[i], y[i])))
}
fn map_q(a: u128, b: u128, f: impl Fn(u64, u64) -> u64) -> u128 {
    let (x, y) = (qwords(a), qwords(b));
    join_qwords(core::array::from_fn(|i| f(x[i], y[i])))
}

fn mask_b(c: bool) -> u8 {
    if c {
        u8::MAX
    } else {
        0
    }
}
fn mask_w(c: bool) -> u16 {
    if c {
        u16::MAX
    } else {
        0
    }
}
fn mask_d(c: bool) -> u32 {
    if c {
        u32::MAX
    } else {
        0
    }
}

/// Interleaves the low (`high` false) or high halves of `a` and `b` in lanes of
/// `bits` bits: a0 b0 a1 b1 ...
fn unpack(a: u128, b: u128, bits: usize, high: bool) -> u128 {
    let n = 128 / bits;
    let mask = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    let base = if high { n / 2 } else { 0 };
    let mut out = 0u128;
    for i in 0..n / 2 {
        let x = (a >> ((base + i) * bits)) & mask;
        let y = (b >> ((base + i) * bits)) & mask;
        out |= x << (2 * i * bits);
        out |= y << ((2 * i + 1) * bits);
    }
    out
}

fn sat_i8(v: i16) -> u8 {
    v.clamp(i16::from(i8::MIN), i16::from(i8::MAX)) as i8 as u8
}
fn sat_u8(v: i16) -> u8 {
    v.clamp(0, 255) as u8
}
fn sat_i16(v: i32) -> u16 {
    v.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16 as u16
}

/// Packs signed words (or dwords) of `a` then `b` with saturation.
fn pack(a: u128, b: u128, kind: Mnemonic) -> u128 {
    match kind {
        Mnemonic::Packssdw => {
            let (x, y) = (dwords(a), dwords(b));
            join_words(core::array::from_fn(|i| {
                let v = if i < 4 { x[i] } else { y[i - 4] };
                sat_i16(v as i32)
            }))
        }
        _ => {
            let (x, y) = (words(a), words(b));
            let sat = if kind == Mnemonic::Packuswb {
                sat_u8
            } else {
                sat_i8
            };
            join_bytes(core::array::from_fn(|i| {
                let v = if i < 8 { x[i] } else { y[i - 8] };
                sat(v as i16)
            }))
        }
    }
}

/// Logical or arithmetic shift of each lane by `count` (counts >= lane width saturate).
fn shift(a: u128, count: u64, bits: u32, kind: ShiftKind) -> u128 {
    match bits {
        16 => {
            let c = count.min(16) as u32;
            let v = words(a).map(|x| match kind {
                ShiftKind::Left => x.checked_shl(c).unwrap_or(0),
                ShiftKind::Right => x.checked_shr(c).unwrap_or(0),
                ShiftKind::Arith => ((x as i16) >> c.min(15)) as u16,
            });
            join_words(v)
        }
        32 => {
            let c = count.min(32) as u32;
            let v = dwords(a).map(|x| match kind {
                ShiftKind::Left => x.checked_shl(c).unwrap_or(0),
                ShiftKind::Right => x.checked_shr(c).unwrap_or(0),
                ShiftKind::Arith => ((x as i32) >> c.min(31)) as u32,
            });
            join_dwords(v)
        }
        _ => {
            let c = count.min(64) as u32;
            let v = qwords(a).map(|x| match kind {
                ShiftKind::Left => x.checked_shl(c).unwrap_or(0),
                ShiftKind::Right => x.checked_shr(c).unwrap_or(0),
                ShiftKind::Arith => ((x as i64) >> c.min(63)) as u64,
            });
            join_qwords(v)
        }
    }
}

#[derive(Clone, Copy)]
enum ShiftKind {
    Left,
    Right,
    Arith,
}

fn imm8(instr: &Instruction) -> u8 {
    instr.immediate8()
}

/// Binary operations `dest = f(dest, src)` on an XMM destination.
fn binary<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    f: impl Fn(u128, u128) -> u128,
) -> ExResult<()> {
    let src = source(state, mem, instr, 1)?;
    let d = xreg(instr, 0);
    state.xmm[d] = f(state.xmm[d], src);
    Ok(())
}

/// The integer operation for a mnemonic, if it is a plain `dest = f(dest, src)` one.
fn integer_op(m: Mnemonic) -> Option<fn(u128, u128) -> u128> {
    use Mnemonic as K;
    Some(match m {
        K::Paddb => |a, b| map_b(a, b, u8::wrapping_add),
        K::Paddw => |a, b| map_w(a, b, u16::wrapping_add),
        K::Paddd => |a, b| map_d(a, b, u32::wrapping_add),
        K::Paddq => |a, b| map_q(a, b, u64::wrapping_add),
        K::Psubb => |a, b| map_b(a, b, u8::wrapping_sub),
        K::Psubw => |a, b| map_w(a, b, u16::wrapping_sub),
        K::Psubd => |a, b| map_d(a, b, u32::wrapping_sub),
        K::Psubq => |a, b| map_q(a, b, u64::wrapping_sub),
        K::Paddsb => |a, b| map_b(a, b, |x, y| (x as i8).saturating_add(y as i8) as u8),
        K::Paddsw => |a, b| map_w(a, b, |x, y| (x as i16).saturating_add(y as i16) as u16),
        K::Psubsb => |a, b| map_b(a, b, |x, y| (x as i8).saturating_sub(y as i8) as u8),
        K::Psubsw => |a, b| map_w(a, b, |x, y| (x as i16).saturating_sub(y as i16) as u16),
        K::Paddusb => |a, b| map_b(a, b, u8::saturating_add),
        K::Paddusw => |a, b| map_w(a, b, u16::saturating_add),
        K::Psubusb => |a, b| map_b(a, b, u8::saturating_sub),
        K::Psubusw => |a, b| map_w(a, b, u16::saturating_sub),
        K::Pcmpeqb => |a, b| map_b(a, b, |x, y| mask_b(x == y)),
        K::Pcmpeqw => |a, b| map_w(a, b, |x, y| mask_w(x == y)),
        K::Pcmpeqd => |a, b| map_d(a, b, |x, y| mask_d(x == y)),
        K::Pcmpgtb => |a, b| map_b(a, b, |x, y| mask_b(x as i8 > y as i8)),
        K::Pcmpgtw => |a, b| map_w(a, b, |x, y| mask_w(x as i16 > y as i16)),
        K::Pcmpgtd => |a, b| map_d(a, b, |x, y| mask_d(x as i32 > y as i32)),
        K::Pand | K::Andps | K::Andpd => |a, b| a & b,
        K::Pandn | K::Andnps | K::Andnpd => |a, b| !a & b,
        K::Por | K::Orps | K::Orpd => |a, b| a | b,
        K::Pxor | K::Xorps | K::Xorpd => |a, b| a ^ b,
        K::Pminub => |a, b| map_b(a, b, u8::min),
        K::Pmaxub => |a, b| map_b(a, b, u8::max),
        K::Pminsw => |a, b| map_w(a, b, |x, y| (x as i16).min(y as i16) as u16),
        K::Pmaxsw => |a, b| map_w(a, b, |x, y| (x as i16).max(y as i16) as u16),
        K::Pavgb => |a, b| map_b(a, b, |x, y| ((u16::from(x) + u16::from(y) + 1) >> 1) as u8),
        K::Pavgw => |a, b| map_w(a, b, |x, y| ((u32::from(x) + u32::from(y) + 1) >> 1) as u16),
        K::Pmullw => |a, b| map_w(a, b, |x, y| (x as i16).wrapping_mul(y as i16) as u16),
        K::Pmulhw => |a, b| {
            map_w(a, b, |x, y| {
                ((i32::from(x as i16) * i32::from(y as i16)) >> 16) as u16
            })
        },
        K::Pmulhuw => |a, b| map_w(a, b, |x, y| ((u32::from(x) * u32::from(y)) >> 16) as u16),
        K::Pmuludq => |a, b| map_q(a, b, |x, y| (x & 0xffff_ffff) * (y & 0xffff_ffff)),
        K::Pmaddwd => |a, b| {
            let (x, y) = (words(a), words(b));
            join_dwords(core::array::from_fn(|i| {
                let lo = i32::from(x[2 * i] as i16) * i32::from(y[2 * i] as i16);
                let hi = i32::from(x[2 * i + 1] as i16) * i32::from(y[2 * i + 1] as i16);
                lo.wrapping_add(hi) as u32
            }))
        },
        K::Psadbw => |a, b| {
            let (x, y) = (bytes(a), bytes(b));
            let sum =
                |r: core::ops::Range<usize>| r.map(|i| u64::from(x[i].abs_diff(y[i]))).sum::<u64>();
            join_qwords([sum(0..8), sum(8..16)])
        },
        K::Punpcklbw => |a, b| unpack(a, b, 8, false),
        K::Punpcklwd => |a, b| unpack(a, b, 16, false),
        K::Punpckldq | K::Unpcklps => |a, b| unpack(a, b, 32, false),
        K::Punpcklqdq | K::Unpcklpd => |a, b| unpack(a, b, 64, false),
        K::Punpckhbw => |a, b| unpack(a, b, 8, true),
        K::Punpckhwd => |a, b| unpack(a, b, 16, true),
        K::Punpckhdq | K::Unpckhps => |a, b| unpack(a, b, 32, true),
        K::Punpckhqdq | K::Unpckhpd => |a, b| unpack(a, b, 64, true),
        K::Packsswb => |a, b| pack(a, b, Mnemonic::Packsswb),
        K::Packssdw => |a, b| pack(a, b, Mnemonic::Packssdw),
        K::Packuswb => |a, b| pack(a, b, Mnemonic::Packuswb),
        _ => return None,
    })
}

/// The host kernel for a floating-point `dest = op(dest, src)` instruction.
fn float_kernel(m: Mnemonic) -> Option<Kernel> {
    use Mnemonic as K;
    Some(match m {
        K::Addss => Kernel::Addss,
        K::Addsd => Kernel::Addsd,
        K::Addps => Kernel::Addps,
        K::Addpd => Kernel::Addpd,
        K::Subss => Kernel::Subss,
        K::Subsd => Kernel::Subsd,
        K::Subps => Kernel::Subps,
        K::Subpd => Kernel::Subpd,
        K::Mulss => Kernel::Mulss,
        K::Mulsd => Kernel::Mulsd,
        K::Mulps => Kernel::Mulps,
        K::Mulpd => Kernel::Mulpd,
        K::Divss => Kernel::Divss,
        K::Divsd => Kernel::Divsd,
        K::Divps => Kernel::Divps,
        K::Divpd => Kernel::Divpd,
        K::Minss => Kernel::Minss,
        K::Minsd => Kernel::Minsd,
        K::Minps => Kernel::Minps,
        K::Minpd => Kernel::Minpd,
        K::Maxss => Kernel::Maxss,
        K::Maxsd => Kernel::Maxsd,
        K::Maxps => Kernel::Maxps,
        K::Maxpd => Kernel::Maxpd,
        K::Sqrtss => Kernel::Sqrtss,
        K::Sqrtsd => Kernel::Sqrtsd,
        K::Sqrtps => Kernel::Sqrtps,
        K::Sqrtpd => Kernel::Sqrtpd,
        K::Rcpss => Kernel::Rcpss,
        K::Rcpps => Kernel::Rcpps,
        K::Rsqrtss => Kernel::Rsqrtss,
        K::Rsqrtps => Kernel::Rsqrtps,
        K::Cvtss2sd => Kernel::Cvtss2sd,
        K::Cvtsd2ss => Kernel::Cvtsd2ss,
        K::Cvtps2pd => Kernel::Cvtps2pd,
        K::Cvtpd2ps => Kernel::Cvtpd2ps,
        K::Cvtdq2ps => Kernel::Cvtdq2ps,
        K::Cvtdq2pd => Kernel::Cvtdq2pd,
        K::Cvtps2dq => Kernel::Cvtps2dq,
        K::Cvttps2dq => Kernel::Cvttps2dq,
        K::Cvtpd2dq => Kernel::Cvtpd2dq,
        K::Cvttpd2dq => Kernel::Cvttpd2dq,
        _ => return None,
    })
}

/// MXCSR flags of the exceptions detected before computing (invalid, denormal operand,
/// divide by zero) and after it (overflow, underflow, precision).
const PRE_COMPUTATION: u32 = 0x07;

/// Records the MXCSR exception flags the host reported with every exception masked, the
/// way the hardware does with the guest's masks (Intel SDM vol. 1, 11.5.1): if any lane
/// raised an unmasked pre-computation exception, only the pre-computation flags are set
/// and nothing is computed; otherwise all flags are set (see [`float::guest_flags`] for
/// lanes that overflow or underflow with those exceptions unmasked). Any unmasked exception raises
/// #XM (#UD without CR4.OSXMMEXCPT) and the caller leaves the destination unchanged.
fn record_flags(state: &mut CpuState, flags: u32) -> ExResult<()> {
    let flags = flags & 0x3f;
    let unmasked = !(state.mxcsr >> 7) & 0x3f;
    let raised = if flags & PRE_COMPUTATION & unmasked != 0 {
        flags & PRE_COMPUTATION
    } else {
        flags
    };
    state.mxcsr |= raised;
    if raised & unmasked != 0 {
        return Err(if state.cr4 & CR4_OSXMMEXCPT != 0 {
            Exception::SimdFloatingPoint
        } else {
            Exception::InvalidOpcode
        });
    }
    Ok(())
}

/// How an instruction of this group runs once its mnemonic is known to be owned.
type Handler<M> = fn(&mut CpuState, &mut M, &Instruction) -> ExResult<()>;

/// The handler for `m`, or None if this group does not own the mnemonic. Ownership is
/// decided here, before any operand is looked at, so that every form of an instruction
/// (register, memory, general-purpose register) reaches the same handler.
fn handler<M: DataAccess>(m: Mnemonic) -> Option<Handler<M>> {
    if integer_op(m).is_some() {
        return Some(|s, mem, i| match integer_op(i.mnemonic()) {
            Some(f) => binary(s, mem, i, f),
            None => Err(Exception::InvalidOpcode),
        });
    }
    if float_kernel(m).is_some() {
        return Some(|s, mem, i| match float_kernel(i.mnemonic()) {
            Some(kernel) => float_binary(s, mem, i, kernel),
            None => Err(Exception::InvalidOpcode),
        });
    }
    use Mnemonic as K;
    Some(match m {
        K::Movaps
        | K::Movapd
        | K::Movdqa
        | K::Movups
        | K::Movupd
        | K::Movdqu
        | K::Lddqu
        | K::Movntps
        | K::Movntpd
        | K::Movntdq => move_full,
        K::Movss => |s, mem, i| move_scalar(s, mem, i, LOW32),
        K::Movsd => |s, mem, i| move_scalar(s, mem, i, LOW64),
        K::Movd | K::Movq => move_int,
        K::Movlps | K::Movlpd => |s, mem, i| move_half(s, mem, i, false),
        K::Movhps | K::Movhpd => |s, mem, i| move_half(s, mem, i, true),
        K::Movhlps => |s, mem, i| binary(s, mem, i, |a, b| (a & !LOW64) | (b >> 64)),
        K::Movlhps => |s, mem, i| binary(s, mem, i, |a, b| (a & LOW64) | (b << 64)),
        K::Maskmovdqu => maskmovdqu,
        K::Pmovmskb => |s, _, i| movmsk(s, i, 8),
        K::Movmskps => |s, _, i| movmsk(s, i, 32),
        K::Movmskpd => |s, _, i| movmsk(s, i, 64),
        K::Pshufd | K::Pshuflw | K::Pshufhw | K::Shufps | K::Shufpd => shuffle,
        K::Pextrw => pextrw,
        K::Pinsrw => pinsrw,
        K::Pslldq | K::Psrldq => |s, _, i| {
            byte_shift(s, i);
            Ok(())
        },
        K::Psllw => |s, mem, i| shift_op(s, mem, i, 16, ShiftKind::Left),
        K::Pslld => |s, mem, i| shift_op(s, mem, i, 32, ShiftKind::Left),
        K::Psllq => |s, mem, i| shift_op(s, mem, i, 64, ShiftKind::Left),
        K::Psrlw => |s, mem, i| shift_op(s, mem, i, 16, ShiftKind::Right),
        K::Psrld => |s, mem, i| shift_op(s, mem, i, 32, ShiftKind::Right),
        K::Psrlq => |s, mem, i| shift_op(s, mem, i, 64, ShiftKind::Right),
        K::Psraw => |s, mem, i| shift_op(s, mem, i, 16, ShiftKind::Arith),
        K::Psrad => |s, mem, i| shift_op(s, mem, i, 32, ShiftKind::Arith),
        K::Cmpss => |s, mem, i| float_compare(s, mem, i, CmpWidth::Ss),
        K::Cmpsd => |s, mem, i| float_compare(s, mem, i, CmpWidth::Sd),
        K::Cmpps => |s, mem, i| float_compare(s, mem, i, CmpWidth::Ps),
        K::Cmppd => |s, mem, i| float_compare(s, mem, i, CmpWidth::Pd),
        K::Comiss => |s, mem, i| ordered_compare(s, mem, i, float::Comis::Comiss),
        K::Comisd => |s, mem, i| ordered_compare(s, mem, i, float::Comis::Comisd),
        K::Ucomiss => |s, mem, i| ordered_compare(s, mem, i, float::Comis::Ucomiss),
        K::Ucomisd => |s, mem, i| ordered_compare(s, mem, i, float::Comis::Ucomisd),
        K::Cvtsi2ss => |s, mem, i| convert_from_int(s, mem, i, false),
        K::Cvtsi2sd => |s, mem, i| convert_from_int(s, mem, i, true),
        K::Cvtss2si => |s, mem, i| convert_to_int(s, mem, i, float::ToInt::Cvtss2si),
        K::Cvttss2si => |s, mem, i| convert_to_int(s, mem, i, float::ToInt::Cvttss2si),
        K::Cvtsd2si => |s, mem, i| convert_to_int(s, mem, i, float::ToInt::Cvtsd2si),
        K::Cvttsd2si => |s, mem, i| convert_to_int(s, mem, i, float::ToInt::Cvttsd2si),
        K::Ldmxcsr => ldmxcsr,
        K::Stmxcsr => |s, mem, i| {
            let value = s.mxcsr;
            write_operand(s, mem, i, 0, u64::from(value))
        },
        _ => return None,
    })
}

/// PSLLDQ/PSRLDQ: whole-register byte shifts.
fn byte_shift(state: &mut CpuState, instr: &Instruction) {
    let count = u32::from(imm8(instr));
    let d = xreg(instr, 0);
    let v = state.xmm[d];
    state.xmm[d] = if count > 15 {
        0
    } else if instr.mnemonic() == Mnemonic::Pslldq {
        v << (count * 8)
    } else {
        v >> (count * 8)
    };
}

fn move_full<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<()> {
    let value = source(state, mem, instr, 1)?;
    store_dest(state, mem, instr, value)
}

/// MOVSS/MOVSD: register to register merges the low element; a load zero-extends; a
/// store writes the low element.
fn move_scalar<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    low: u128,
) -> ExResult<()> {
    let value = source(state, mem, instr, 1)? & low;
    match (instr.op_kind(0), instr.op_kind(1)) {
        (OpKind::Register, OpKind::Register) => {
            let d = xreg(instr, 0);
            state.xmm[d] = (state.xmm[d] & !low) | value;
            Ok(())
        }
        _ => store_dest(state, mem, instr, value),
    }
}

/// MOVD/MOVQ in every direction between XMM, general-purpose registers and memory.
fn move_int<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let dest_is_xmm = instr.op_kind(0) == OpKind::Register && instr.op_register(0).is_xmm();
    if dest_is_xmm {
        let width = match instr.op_kind(1) {
            OpKind::Register if !instr.op_register(1).is_xmm() => instr.op_register(1).size(),
            OpKind::Memory => instr.memory_size().size(),
            _ => 8,
        };
        let mask = if width == 4 { LOW32 } else { LOW64 };
        let value = source(state, mem, instr, 1)? & mask;
        state.xmm[xreg(instr, 0)] = value;
        Ok(())
    } else {
        let value = state.xmm[xreg(instr, 1)];
        write_operand(state, mem, instr, 0, value as u64)
    }
}

/// MOVLPS/MOVHPS/MOVLPD/MOVHPD: load or store one 64-bit half.
fn move_half<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    high: bool,
) -> ExResult<()> {
    let shift = if high { 64 } else { 0 };
    if instr.op_kind(0) == OpKind::Memory {
        let value = (state.xmm[xreg(instr, 1)] >> shift) & LOW64;
        write_memory(state, mem, instr, value)
    } else {
        let value = read_memory(state, mem, instr)? & LOW64;
        let d = xreg(instr, 0);
        state.xmm[d] = (state.xmm[d] & !(LOW64 << shift)) | (value << shift);
        Ok(())
    }
}

/// MASKMOVDQU: byte-masked store to DS:rDI (segment overridable).
fn maskmovdqu<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<()> {
    let (src, mask) = match instr.op_count() {
        3 => (xreg(instr, 1), xreg(instr, 2)),
        _ => (xreg(instr, 0), xreg(instr, 1)),
    };
    let addr_mask = match instr.op_kind(0) {
        OpKind::MemorySegDI => 0xffff,
        OpKind::MemorySegEDI => 0xffff_ffff,
        _ => u64::MAX,
    };
    let seg = CpuState::seg_index(instr.memory_segment()).unwrap_or(crate::state::DS);
    let base = state.gpr[7];
    let data = bytes(state.xmm[src]);
    let select = bytes(state.xmm[mask]);
    for i in 0..16 {
        if select[i] & 0x80 != 0 {
            let addr = base.wrapping_add(i as u64) & addr_mask;
            mem.write(seg, addr, 1, u64::from(data[i]))?;
        }
    }
    Ok(())
}

/// PMOVMSKB/MOVMSKPS/MOVMSKPD: sign bits of each lane into a general-purpose register.
fn movmsk(state: &mut CpuState, instr: &Instruction, bits: usize) -> ExResult<()> {
    let v = state.xmm[xreg(instr, 1)];
    let n = 128 / bits;
    let mut mask = 0u64;
    for i in 0..n {
        if (v >> ((i + 1) * bits - 1)) & 1 != 0 {
            mask |= 1 << i;
        }
    }
    if state.write_gpr(instr.op_register(0), mask) {
        Ok(())
    } else {
        Err(Exception::InvalidOpcode)
    }
}

fn shuffle<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let src = source(state, mem, instr, 1)?;
    let imm = usize::from(imm8(instr));
    let d = xreg(instr, 0);
    let dest = state.xmm[d];
    state.xmm[d] = match instr.mnemonic() {
        Mnemonic::Pshufd => {
            let s = dwords(src);
            join_dwords(core::array::from_fn(|i| s[(imm >> (2 * i)) & 3]))
        }
        Mnemonic::Pshuflw => {
            let s = words(src);
            join_words(core::array::from_fn(|i| {
                if i < 4 {
                    s[(imm >> (2 * i)) & 3]
                } else {
                    s[i]
                }
            }))
        }
        Mnemonic::Pshufhw => {
            let s = words(src);
            join_words(core::array::from_fn(|i| {
                if i < 4 {
                    s[i]
                } else {
                    s[4 + ((imm >> (2 * (i - 4))) & 3)]
                }
            }))
        }
        Mnemonic::Shufps => {
            let (a, b) = (dwords(dest), dwords(src));
            join_dwords([
                a[imm & 3],
                a[(imm >> 2) & 3],
                b[(imm >> 4) & 3],
                b[(imm >> 6) & 3],
            ])
        }
        _ => {
            let (a, b) = (qwords(dest), qwords(src));
            join_qwords([a[imm & 1], b[(imm >> 1) & 1]])
        }
    };
    Ok(())
}

fn pextrw<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let word = words(state.xmm[xreg(instr, 1)])[usize::from(imm8(instr) & 7)];
    write_operand(state, mem, instr, 0, u64::from(word))
}

fn pinsrw<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let value = read_operand(state, mem, instr, 1)? as u16;
    let d = xreg(instr, 0);
    let mut w = words(state.xmm[d]);
    w[usize::from(imm8(instr) & 7)] = value;
    state.xmm[d] = join_words(w);
    Ok(())
}

fn shift_op<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    bits: u32,
    kind: ShiftKind,
) -> ExResult<()> {
    let count = if instr.op_kind(1) == OpKind::Immediate8 {
        u64::from(imm8(instr))
    } else {
        source(state, mem, instr, 1)? as u64
    };
    let d = xreg(instr, 0);
    state.xmm[d] = shift(state.xmm[d], count, bits, kind);
    Ok(())
}

/// The part of the destination a scalar/packed float instruction writes.
fn float_binary<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    kernel: Kernel,
) -> ExResult<()> {
    let src = source(state, mem, instr, 1)?;
    let d = xreg(instr, 0);
    let (result, flags) = float::binary(kernel, state.xmm[d], src, state.mxcsr);
    let flags = float::guest_flags(kernel, state.xmm[d], src, state.mxcsr, result, flags);
    record_flags(state, flags)?;
    state.xmm[d] = result;
    Ok(())
}

fn float_compare<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    width: CmpWidth,
) -> ExResult<()> {
    let src = source(state, mem, instr, 1)?;
    let d = xreg(instr, 0);
    let (result, flags) = float::compare(width, imm8(instr), state.xmm[d], src, state.mxcsr);
    record_flags(state, flags)?;
    state.xmm[d] = result;
    Ok(())
}

/// COMISS/COMISD/UCOMISS/UCOMISD: ZF/PF/CF from the comparison, OF/SF/AF cleared.
fn ordered_compare<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    kind: float::Comis,
) -> ExResult<()> {
    let src = source(state, mem, instr, 1)?;
    let a = state.xmm[xreg(instr, 0)];
    let (zf, pf, cf, flags) = float::compare_flags(kind, a, src, state.mxcsr);
    record_flags(state, flags)?;
    state.rflags &= !(ZF | PF | CF | OF | SF | AF);
    state.set_flag(ZF, zf);
    state.set_flag(PF, pf);
    state.set_flag(CF, cf);
    Ok(())
}

fn convert_from_int<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    double: bool,
) -> ExResult<()> {
    let wide = match instr.op_kind(1) {
        OpKind::Register => instr.op_register(1).size() == 8,
        _ => instr.memory_size().size() == 8,
    };
    let value = read_operand(state, mem, instr, 1)?;
    let d = xreg(instr, 0);
    let (result, flags) = float::from_int(double, wide, state.xmm[d], value, state.mxcsr);
    record_flags(state, flags)?;
    state.xmm[d] = result;
    Ok(())
}

fn convert_to_int<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    kind: float::ToInt,
) -> ExResult<()> {
    let src = source(state, mem, instr, 1)?;
    let wide = instr.op_register(0).size() == 8;
    let (value, flags) = float::to_int(kind, wide, src, state.mxcsr);
    record_flags(state, flags)?;
    if state.write_gpr(instr.op_register(0), value) {
        Ok(())
    } else {
        Err(Exception::InvalidOpcode)
    }
}

fn ldmxcsr<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let value = read_operand(state, mem, instr, 0)? as u32;
    if value & !MXCSR_MASK != 0 {
        return Err(Exception::GeneralProtection(0));
    }
    state.mxcsr = value;
    Ok(())
}

fn movnti<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let value = read_operand(state, mem, instr, 1)?;
    write_operand(state, mem, instr, 0, value)
}

/// The FXSAVE area's tag byte: one bit per physical register, set when not empty.
fn abridged_tags(ftw: u16) -> u8 {
    (0..8).fold(0u8, |acc, i| {
        if (ftw >> (2 * i)) & 3 != 3 {
            acc | (1 << i)
        } else {
            acc
        }
    })
}

/// Full tag (valid 0, zero 1, special 2) for an 80-bit register's contents.
pub(crate) fn classify_tag(reg: &[u8; 10]) -> u16 {
    let exponent = u16::from_le_bytes([reg[8], reg[9]]) & 0x7fff;
    let mut m = [0u8; 8];
    m.copy_from_slice(&reg[..8]);
    let mantissa = u64::from_le_bytes(m);
    if exponent == 0 && mantissa == 0 {
        1
    } else if exponent == 0x7fff || exponent == 0 || mantissa >> 63 == 0 {
        2
    } else {
        0
    }
}

/// Checks for FXSAVE/FXRSTOR: #NM on CR0.TS or CR0.EM; #GP(0) for a misaligned area.
fn fx_area(state: &CpuState, instr: &Instruction) -> ExResult<(usize, u64)> {
    if state.cr0 & (CR0_EM | CR0_TS) != 0 {
        return Err(Exception::DeviceNotAvailable);
    }
    let seg = memory_segment(instr);
    let ea = effective_address(state, instr);
    if linear_address(state, seg, ea) & 15 != 0 {
        return Err(Exception::GeneralProtection(0));
    }
    Ok((seg, ea))
}

fn fxsave<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let (seg, ea) = fx_area(state, instr)?;
    let x = &state.x87;
    let mut area = [0u8; 512];
    area[0..2].copy_from_slice(&x.fcw.to_le_bytes());
    let fsw = (x.fsw & !0x3800) | (u16::from(x.top & 7) << 11);
    area[2..4].copy_from_slice(&fsw.to_le_bytes());
    area[4] = abridged_tags(x.ftw);
    area[6..8].copy_from_slice(&x.fop.to_le_bytes());
    if instr.mnemonic() == Mnemonic::Fxsave64 {
        area[8..16].copy_from_slice(&x.fip.to_le_bytes());
        area[16..24].copy_from_slice(&x.fdp.to_le_bytes());
    } else {
        area[8..12].copy_from_slice(&(x.fip as u32).to_le_bytes());
        area[16..20].copy_from_slice(&(x.fdp as u32).to_le_bytes());
    }
    area[24..28].copy_from_slice(&state.mxcsr.to_le_bytes());
    area[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
    for i in 0..8 {
        let phys = (usize::from(x.top) + i) & 7;
        area[32 + 16 * i..42 + 16 * i].copy_from_slice(&x.regs[phys]);
    }
    let count = if state.code64() { 16 } else { 8 };
    for i in 0..count {
        area[160 + 16 * i..176 + 16 * i].copy_from_slice(&state.xmm[i].to_le_bytes());
    }
    mem.write_bytes(seg, ea, &area)
}

fn fxrstor<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let (seg, ea) = fx_area(state, instr)?;
    let mut area = [0u8; 512];
    mem.read_bytes(seg, ea, &mut area)?;
    let u16_at = |o: usize| u16::from_le_bytes([area[o], area[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([area[o], area[o + 1], area[o + 2], area[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
    let mxcsr = u32_at(24);
    if mxcsr & !MXCSR_MASK != 0 {
        return Err(Exception::GeneralProtection(0));
    }
    let fsw = u16_at(2);
    let top = ((fsw >> 11) & 7) as u8;
    let x = &mut state.x87;
    x.fcw = u16_at(0);
    x.fsw = fsw & !0x3800;
    x.top = top;
    x.fop = u16_at(6) & 0x7ff;
    if instr.mnemonic() == Mnemonic::Fxrstor64 {
        x.fip = u64_at(8);
        x.fdp = u64_at(16);
    } else {
        x.fip = u64::from(u32_at(8));
        x.fdp = u64::from(u32_at(16));
    }
    for i in 0..8 {
        let phys = (usize::from(top) + i) & 7;
        x.regs[phys].copy_from_slice(&area[32 + 16 * i..42 + 16 * i]);
    }
    let tags = area[4];
    x.ftw = (0..8).fold(0u16, |acc, p| {
        let tag = if tags & (1 << p) == 0 {
            3
        } else {
            classify_tag(&x.regs[p])
        };
        acc | (tag << (2 * p))
    });
    state.mxcsr = mxcsr;
    let count = if state.code64() { 16 } else { 8 };
    for i in 0..count {
        let mut b = [0u8; 16];
        b.copy_from_slice(&area[160 + 16 * i..176 + 16 * i]);
        state.xmm[i] = u128::from_le_bytes(b);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
