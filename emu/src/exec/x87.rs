//! The x87 floating-point unit, plus EMMS.
//!
//! State lives in `state.x87` as FXSAVE keeps it: physical registers R0..R7 in the 80-bit
//! format, TOP, the full tag word and the status word. Register stack management (TOP,
//! tags, stack overflow/underflow with their masked responses, pending-exception #MF) is
//! done here; the arithmetic itself runs on the host's x87 unit ([`host`]), so 80-bit
//! results, precision and rounding control, NaN rules and the condition/exception flags
//! are those of real hardware, and FLD/FST of m80 copy the bits unchanged.
//!
//! Known gaps: FBLD/FBSTP and the MMX instructions return None. With an exception
//! unmasked, the destination is left unchanged for invalid/denormal/zero-divide (as the
//! hardware does) but overflow/underflow write the masked result rather than the
//! exponent-biased one. FOP is not recorded (always 0); FIP/FDP are.

mod host;

use iced_x86::{Instruction, MemorySize, Mnemonic, OpKind, Register};

use crate::access::{effective_address, memory_segment, read_operand, write_operand, DataAccess};
use crate::exception::{ExResult, Exception};
use crate::exec::sse::classify_tag;
use crate::state::{CpuState, AF, CF, CR0_EM, CR0_MP, CR0_NE, CR0_TS, OF, PF, SF, ZF};

use host::{Io, Kernel};

/// An 80-bit register value, little-endian (64-bit significand, then sign and exponent).
type Reg = [u8; 10];

// Status word bits.
const IE: u16 = 1 << 0;
const DE: u16 = 1 << 1;
const ZE: u16 = 1 << 2;
const STACK_FAULT: u16 = 1 << 6;
const ES: u16 = 1 << 7;
const C0: u16 = 1 << 8;
const C1: u16 = 1 << 9;
const C2: u16 = 1 << 10;
const C3: u16 = 1 << 14;
const BUSY: u16 = 1 << 15;
const CONDITION: u16 = C0 | C1 | C2 | C3;
const TOP_BITS: u16 = 7 << 11;

/// The "real indefinite" QNaN produced by masked invalid operations.
const INDEFINITE: Reg = [0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff];

/// Executes an x87 instruction (or EMMS), or returns None if `instr` is not one.
pub fn execute<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> Option<ExResult<()>> {
    use Mnemonic as K;
    let m = instr.mnemonic();
    let kind = match m {
        K::Wait => return Some(fwait(state)),
        // Non-waiting control instructions: no pending-exception check.
        K::Fninit
        | K::Fnclex
        | K::Fnstcw
        | K::Fnstsw
        | K::Fnstenv
        | K::Fnsave
        | K::Fldcw
        | K::Fldenv
        | K::Frstor
        | K::Emms
        | K::Fneni
        | K::Fndisi
        | K::Fsetpm => Class::Control,
        K::Finit | K::Fclex | K::Fstcw | K::Fstsw | K::Fstenv | K::Fsave => Class::Waiting,
        K::Fld
        | K::Fst
        | K::Fstp
        | K::Fstpnce
        | K::Fild
        | K::Fist
        | K::Fistp
        | K::Fisttp
        | K::Fld1
        | K::Fldz
        | K::Fldpi
        | K::Fldl2t
        | K::Fldl2e
        | K::Fldlg2
        | K::Fldln2
        | K::Fxch
        | K::Fadd
        | K::Faddp
        | K::Fiadd
        | K::Fsub
        | K::Fsubp
        | K::Fisub
        | K::Fsubr
        | K::Fsubrp
        | K::Fisubr
        | K::Fmul
        | K::Fmulp
        | K::Fimul
        | K::Fdiv
        | K::Fdivp
        | K::Fidiv
        | K::Fdivr
        | K::Fdivrp
        | K::Fidivr
        | K::Fchs
        | K::Fabs
        | K::Fsqrt
        | K::Frndint
        | K::Fsin
        | K::Fcos
        | K::Fsincos
        | K::Fptan
        | K::Fpatan
        | K::F2xm1
        | K::Fyl2x
        | K::Fyl2xp1
        | K::Fxtract
        | K::Fscale
        | K::Fprem
        | K::Fprem1
        | K::Fxam
        | K::Ftst
        | K::Fcom
        | K::Fcomp
        | K::Fcompp
        | K::Fucom
        | K::Fucomp
        | K::Fucompp
        | K::Ficom
        | K::Ficomp
        | K::Fcomi
        | K::Fcomip
        | K::Fucomi
        | K::Fucomip
        | K::Fcmovb
        | K::Fcmove
        | K::Fcmovbe
        | K::Fcmovu
        | K::Fcmovnb
        | K::Fcmovne
        | K::Fcmovnbe
        | K::Fcmovnu
        | K::Ffree
        | K::Ffreep
        | K::Fincstp
        | K::Fdecstp
        | K::Fnop => Class::Compute,
        _ => return None,
    };
    if state.cr0 & (CR0_EM | CR0_TS) != 0 {
        return Some(Err(Exception::DeviceNotAvailable));
    }
    if kind != Class::Control {
        if let Err(e) = check_pending(state) {
            return Some(Err(e));
        }
    }
    if kind == Class::Compute {
        state.x87.fip = instr.ip();
        if instr.op_count() > 0 && instr.op_kind(0) == OpKind::Memory {
            state.x87.fdp = effective_address(state, instr);
        }
    }
    Some(dispatch(state, mem, instr, m))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Control,
    Waiting,
    Compute,
}

/// FWAIT: #NM with CR0.TS and CR0.MP; delivers a pending unmasked exception.
fn fwait(state: &mut CpuState) -> ExResult<()> {
    if state.cr0 & (CR0_TS | CR0_MP) == (CR0_TS | CR0_MP) {
        return Err(Exception::DeviceNotAvailable);
    }
    check_pending(state)
}

/// A pending unmasked exception (FSW.ES) is reported as #MF before the next waiting
/// instruction. Without CR0.NE (legacy FERR# reporting) it is ignored.
fn check_pending(state: &CpuState) -> ExResult<()> {
    if state.x87.fsw & ES != 0 && state.cr0 & CR0_NE != 0 {
        return Err(Exception::FloatingPoint);
    }
    Ok(())
}

/// Recomputes ES/B from the exception flags and masks.
fn update_summary(state: &mut CpuState) {
    let x = &mut state.x87;
    if x.fsw & !x.fcw & 0x3f != 0 {
        x.fsw |= ES | BUSY;
    } else {
        x.fsw &= !(ES | BUSY);
    }
}

/// Physical register number of ST(i).
fn phys(state: &CpuState, i: usize) -> usize {
    (usize::from(state.x87.top) + i) & 7
}

fn tag(state: &CpuState, p: usize) -> u16 {
    (state.x87.ftw >> (2 * p)) & 3
}

fn set_tag(state: &mut CpuState, p: usize, t: u16) {
    state.x87.ftw = (state.x87.ftw & !(3 << (2 * p))) | (t << (2 * p));
}

/// ST(i), or None when the register is empty.
fn st(state: &CpuState, i: usize) -> Option<Reg> {
    let p = phys(state, i);
    (tag(state, p) != 3).then_some(state.x87.regs[p])
}

fn set_st(state: &mut CpuState, i: usize, value: Reg) {
    let p = phys(state, i);
    state.x87.regs[p] = value;
    set_tag(state, p, classify_tag(&value));
}

fn pop(state: &mut CpuState) {
    let p = phys(state, 0);
    set_tag(state, p, 3);
    state.x87.top = state.x87.top.wrapping_add(1) & 7;
}

/// Pushes `value`; on stack overflow loads the indefinite if IE is masked.
fn push(state: &mut CpuState, value: Reg) {
    let top = state.x87.top.wrapping_add(7) & 7;
    let p = usize::from(top);
    if tag(state, p) != 3 {
        if !stack_fault(state, true) {
            return;
        }
        state.x87.top = top;
        set_st(state, 0, INDEFINITE);
        return;
    }
    state.x87.top = top;
    set_st(state, 0, value);
}

/// Records a stack overflow/underflow; returns true if IE is masked (so the caller
/// continues with the indefinite value).
fn stack_fault(state: &mut CpuState, overflow: bool) -> bool {
    let x = &mut state.x87;
    x.fsw |= IE | STACK_FAULT;
    if overflow {
        x.fsw |= C1;
    } else {
        x.fsw &= !C1;
    }
    update_summary(state);
    state.x87.fcw & IE != 0
}

/// Folds a host status word into the guest's. `conditions` copies C0..C3. Returns false
/// when an unmasked invalid, denormal or zero-divide exception means the destination must
/// not be written.
fn absorb(state: &mut CpuState, sw: u16, conditions: bool) -> bool {
    let x = &mut state.x87;
    x.fsw |= sw & 0x3f;
    if conditions {
        x.fsw = (x.fsw & !CONDITION) | (sw & CONDITION);
    }
    let unmasked = sw & !x.fcw & (IE | DE | ZE);
    update_summary(state);
    unmasked == 0
}

/// Register number of an ST(i) operand.
fn st_number(reg: Register) -> usize {
    (reg as usize).wrapping_sub(Register::ST0 as usize) & 7
}

fn seg_ea(state: &CpuState, instr: &Instruction) -> (usize, u64) {
    (memory_segment(instr), effective_address(state, instr))
}

/// Loads a memory operand (float32/64/80, int16/32/64) as an 80-bit value. Returns the
/// value and the host status word of the conversion.
fn load_memory<M: DataAccess>(
    state: &CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<(Reg, u16)> {
    let (seg, ea) = seg_ea(state, instr);
    let kernel = match instr.memory_size() {
        MemorySize::Float80 => {
            let mut r = [0u8; 10];
            mem.read_bytes(seg, ea, &mut r)?;
            return Ok((r, 0));
        }
        MemorySize::Float32 => Kernel::LoadF32,
        MemorySize::Float64 => Kernel::LoadF64,
        MemorySize::Int16 => Kernel::LoadI16,
        MemorySize::Int32 => Kernel::LoadI32,
        MemorySize::Int64 => Kernel::LoadI64,
        _ => return Err(Exception::InvalidOpcode),
    };
    let size = instr.memory_size().size();
    let raw = mem.read(seg, ea, size)?;
    let io = host::exec(kernel, Io::new(state.x87.fcw).with_m(raw));
    Ok((io.r0(), io.sw))
}

fn dispatch<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    m: Mnemonic,
) -> ExResult<()> {
    use Mnemonic as K;
    match m {
        K::Fninit | K::Finit => {
            initialize(state);
            Ok(())
        }
        K::Fnclex | K::Fclex => {
            state.x87.fsw &= !(0xff | BUSY);
            Ok(())
        }
        K::Fldcw => {
            let cw = read_operand(state, mem, instr, 0)? as u16;
            state.x87.fcw = cw;
            update_summary(state);
            Ok(())
        }
        K::Fnstcw | K::Fstcw => {
            let cw = state.x87.fcw;
            write_operand(state, mem, instr, 0, u64::from(cw))
        }
        K::Fnstsw | K::Fstsw => {
            let sw = status_word(state);
            write_operand(state, mem, instr, 0, u64::from(sw))
        }
        K::Fnstenv | K::Fstenv => {
            let (seg, ea) = seg_ea(state, instr);
            let env = environment(state, instr.memory_size().size());
            mem.write_bytes(seg, ea, &env)?;
            state.x87.fcw |= 0x3f;
            update_summary(state);
            Ok(())
        }
        K::Fldenv => {
            let (seg, ea) = seg_ea(state, instr);
            let size = instr.memory_size().size();
            let mut env = [0u8; 28];
            mem.read_bytes(seg, ea, &mut env[..size.min(28)])?;
            load_environment(state, &env, size);
            Ok(())
        }
        K::Fnsave | K::Fsave => {
            let (seg, ea) = seg_ea(state, instr);
            let env_size = if instr.memory_size().size() >= 108 {
                28
            } else {
                14
            };
            let mut area = environment(state, env_size);
            for i in 0..8 {
                area.extend_from_slice(&state.x87.regs[phys(state, i)]);
            }
            mem.write_bytes(seg, ea, &area)?;
            initialize(state);
            Ok(())
        }
        K::Frstor => {
            let (seg, ea) = seg_ea(state, instr);
            let env_size = if instr.memory_size().size() >= 108 {
                28
            } else {
                14
            };
            let mut area = vec![0u8; env_size + 80];
            mem.read_bytes(seg, ea, &mut area)?;
            let mut env = [0u8; 28];
            env[..env_size].copy_from_slice(&area[..env_size]);
            load_environment(state, &env, env_size);
            for i in 0..8 {
                let p = phys(state, i);
                state.x87.regs[p].copy_from_slice(&area[env_size + 10 * i..env_size + 10 * i + 10]);
            }
            retag(state);
            update_summary(state);
            Ok(())
        }
        K::Emms => {
            state.x87.ftw = 0xffff;
            Ok(())
        }
        K::Fneni | K::Fndisi | K::Fsetpm | K::Fnop => Ok(()),
        K::Fld => fld(state, mem, instr),
        K::Fst | K::Fstp | K::Fstpnce => fst(state, mem, instr, m != K::Fst),
        K::Fild => fld(state, mem, instr),
        K::Fist | K::Fistp | K::Fisttp => fist(state, mem, instr, m),
        K::Fld1 => load_constant(state, Kernel::Fld1),
        K::Fldz => load_constant(state, Kernel::Fldz),
        K::Fldpi => load_constant(state, Kernel::Fldpi),
        K::Fldl2t => load_constant(state, Kernel::Fldl2t),
        K::Fldl2e => load_constant(state, Kernel::Fldl2e),
        K::Fldlg2 => load_constant(state, Kernel::Fldlg2),
        K::Fldln2 => load_constant(state, Kernel::Fldln2),
        K::Fxch => fxch(state, instr),
        K::Fadd | K::Faddp | K::Fiadd => arith(state, mem, instr, Kernel::Add),
        K::Fsub | K::Fsubp | K::Fisub => arith(state, mem, instr, Kernel::Sub),
        K::Fsubr | K::Fsubrp | K::Fisubr => arith(state, mem, instr, Kernel::Subr),
        K::Fmul | K::Fmulp | K::Fimul => arith(state, mem, instr, Kernel::Mul),
        K::Fdiv | K::Fdivp | K::Fidiv => arith(state, mem, instr, Kernel::Div),
        K::Fdivr | K::Fdivrp | K::Fidivr => arith(state, mem, instr, Kernel::Divr),
        K::Fchs | K::Fabs => sign_op(state, m == K::Fchs),
        K::Fsqrt => unary(state, Kernel::Fsqrt),
        K::Frndint => unary(state, Kernel::Frndint),
        K::Fsin => unary(state, Kernel::Fsin),
        K::Fcos => unary(state, Kernel::Fcos),
        K::F2xm1 => unary(state, Kernel::F2xm1),
        K::Fptan => unary_push(state, Kernel::Fptan),
        K::Fsincos => unary_push(state, Kernel::Fsincos),
        K::Fxtract => unary_push(state, Kernel::Fxtract),
        K::Fscale => two_operand(state, Kernel::Fscale, false),
        K::Fprem => two_operand(state, Kernel::Fprem, false),
        K::Fprem1 => two_operand(state, Kernel::Fprem1, false),
        K::Fyl2x => two_operand(state, Kernel::Fyl2x, true),
        K::Fyl2xp1 => two_operand(state, Kernel::Fyl2xp1, true),
        K::Fpatan => two_operand(state, Kernel::Fpatan, true),
        K::Fxam => fxam(state),
        K::Ftst => {
            let Some(a) = st(state, 0) else {
                stack_fault(state, false);
                state.x87.fsw |= C0 | C2 | C3;
                return Ok(());
            };
            let io = host::exec(Kernel::Ftst, Io::new(state.x87.fcw).with_a(&a));
            absorb(state, io.sw, true);
            Ok(())
        }
        K::Fcom | K::Fcomp | K::Ficom | K::Ficomp => compare(state, mem, instr, Kernel::Fcom),
        K::Fucom | K::Fucomp => compare(state, mem, instr, Kernel::Fucom),
        K::Fcompp | K::Fucompp => {
            let kernel = if m == K::Fcompp {
                Kernel::Fcom
            } else {
                Kernel::Fucom
            };
            compare_registers(state, 1, kernel, false);
            pop(state);
            pop(state);
            Ok(())
        }
        K::Fcomi | K::Fcomip | K::Fucomi | K::Fucomip => {
            let kernel = if matches!(m, K::Fcomi | K::Fcomip) {
                Kernel::Fcom
            } else {
                Kernel::Fucom
            };
            let i = st_number(instr.op_register(1));
            compare_registers(state, i, kernel, true);
            if matches!(m, K::Fcomip | K::Fucomip) {
                pop(state);
            }
            Ok(())
        }
        K::Fcmovb
        | K::Fcmove
        | K::Fcmovbe
        | K::Fcmovu
        | K::Fcmovnb
        | K::Fcmovne
        | K::Fcmovnbe
        | K::Fcmovnu => fcmov(state, instr, m),
        K::Ffree | K::Ffreep => {
            let p = phys(state, st_number(instr.op_register(0)));
            set_tag(state, p, 3);
            if m == K::Ffreep {
                pop(state);
            }
            Ok(())
        }
        K::Fincstp => {
            state.x87.top = state.x87.top.wrapping_add(1) & 7;
            state.x87.fsw &= !C1;
            Ok(())
        }
        K::Fdecstp => {
            state.x87.top = state.x87.top.wrapping_add(7) & 7;
            state.x87.fsw &= !C1;
            Ok(())
        }
        _ => Err(Exception::InvalidOpcode),
    }
}

/// FNINIT: default control word, everything empty; the register contents stay.
fn initialize(state: &mut CpuState) {
    let regs = state.x87.regs;
    state.x87 = crate::state::X87State {
        regs,
        ..Default::default()
    };
}

/// The status word with TOP merged in.
fn status_word(state: &CpuState) -> u16 {
    (state.x87.fsw & !TOP_BITS) | (u16::from(state.x87.top & 7) << 11)
}

/// Recomputes the tags of non-empty registers from their contents.
fn retag(state: &mut CpuState) {
    for p in 0..8 {
        if tag(state, p) != 3 {
            let t = classify_tag(&state.x87.regs[p]);
            set_tag(state, p, t);
        }
    }
}

/// The FSTENV image: 28 bytes (32-bit protected-mode layout) or 14 bytes (16-bit).
fn environment(state: &CpuState, size: usize) -> Vec<u8> {
    let x = &state.x87;
    let sw = status_word(state);
    let mut env = Vec::with_capacity(size + 80);
    if size >= 28 {
        for v in [x.fcw, sw, x.ftw] {
            env.extend_from_slice(&v.to_le_bytes());
            env.extend_from_slice(&0xffffu16.to_le_bytes());
        }
        env.extend_from_slice(&(x.fip as u32).to_le_bytes());
        env.extend_from_slice(&0u16.to_le_bytes());
        env.extend_from_slice(&(x.fop & 0x7ff).to_le_bytes());
        env.extend_from_slice(&(x.fdp as u32).to_le_bytes());
        env.extend_from_slice(&0u16.to_le_bytes());
        env.extend_from_slice(&0xffffu16.to_le_bytes());
    } else {
        for v in [x.fcw, sw, x.ftw, x.fip as u16, 0, x.fdp as u16, 0] {
            env.extend_from_slice(&v.to_le_bytes());
        }
    }
    env
}

fn load_environment(state: &mut CpuState, env: &[u8; 28], size: usize) {
    let word = |i: usize| u16::from_le_bytes([env[i], env[i + 1]]);
    let dword = |i: usize| u32::from_le_bytes([env[i], env[i + 1], env[i + 2], env[i + 3]]);
    let (cw, sw, tw) = if size >= 28 {
        (word(0), word(4), word(8))
    } else {
        (word(0), word(2), word(4))
    };
    let x = &mut state.x87;
    x.fcw = cw;
    x.fsw = sw & !TOP_BITS;
    x.top = ((sw >> 11) & 7) as u8;
    x.ftw = tw;
    if size >= 28 {
        x.fip = u64::from(dword(12));
        x.fop = word(18) & 0x7ff;
        x.fdp = u64::from(dword(20));
    } else {
        x.fip = u64::from(word(6));
        x.fdp = u64::from(word(10));
    }
    retag(state);
    update_summary(state);
}

fn fld<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    if instr.op_kind(0) == OpKind::Register {
        let i = st_number(instr.op_register(0));
        match st(state, i) {
            Some(v) => push(state, v),
            None => {
                if stack_fault(state, false) {
                    push(state, INDEFINITE);
                }
            }
        }
        return Ok(());
    }
    let (value, sw) = load_memory(state, mem, instr)?;
    if absorb(state, sw, false) {
        state.x87.fsw &= !C1;
        push(state, value);
    }
    Ok(())
}

fn fst<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    pop_after: bool,
) -> ExResult<()> {
    let value = match st(state, 0) {
        Some(v) => v,
        None => {
            if !stack_fault(state, false) {
                return Ok(());
            }
            INDEFINITE
        }
    };
    if instr.op_kind(0) == OpKind::Register {
        let i = st_number(instr.op_register(0));
        set_st(state, i, value);
    } else {
        let (seg, ea) = seg_ea(state, instr);
        let kernel = match instr.memory_size() {
            MemorySize::Float80 => {
                mem.write_bytes(seg, ea, &value)?;
                None
            }
            MemorySize::Float32 => Some(Kernel::StoreF32),
            MemorySize::Float64 => Some(Kernel::StoreF64),
            _ => return Err(Exception::InvalidOpcode),
        };
        if let Some(kernel) = kernel {
            let io = host::exec(kernel, Io::new(state.x87.fcw).with_a(&value));
            let size = instr.memory_size().size();
            if io.sw & !state.x87.fcw & IE != 0 {
                absorb(state, io.sw, false);
                return Ok(());
            }
            mem.write(seg, ea, size, io.m())?;
            absorb(state, io.sw, false);
            state.x87.fsw = (state.x87.fsw & !C1) | (io.sw & C1);
        }
    }
    if pop_after {
        pop(state);
    }
    Ok(())
}

fn fist<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    m: Mnemonic,
) -> ExResult<()> {
    let value = match st(state, 0) {
        Some(v) => v,
        None => {
            if !stack_fault(state, false) {
                return Ok(());
            }
            INDEFINITE
        }
    };
    let truncate = m == Mnemonic::Fisttp;
    let kernel = match (instr.memory_size(), truncate) {
        (MemorySize::Int16, false) => Kernel::StoreI16,
        (MemorySize::Int32, false) => Kernel::StoreI32,
        (MemorySize::Int64, false) => Kernel::StoreI64,
        (MemorySize::Int16, true) => Kernel::TruncI16,
        (MemorySize::Int32, true) => Kernel::TruncI32,
        (MemorySize::Int64, true) => Kernel::TruncI64,
        _ => return Err(Exception::InvalidOpcode),
    };
    let io = host::exec(kernel, Io::new(state.x87.fcw).with_a(&value));
    if io.sw & !state.x87.fcw & IE != 0 {
        absorb(state, io.sw, false);
        return Ok(());
    }
    let (seg, ea) = seg_ea(state, instr);
    mem.write(seg, ea, instr.memory_size().size(), io.m())?;
    absorb(state, io.sw, false);
    state.x87.fsw = (state.x87.fsw & !C1) | (io.sw & C1);
    if m != Mnemonic::Fist {
        pop(state);
    }
    Ok(())
}

fn load_constant(state: &mut CpuState, kernel: Kernel) -> ExResult<()> {
    let io = host::exec(kernel, Io::new(state.x87.fcw));
    state.x87.fsw &= !C1;
    push(state, io.r0());
    Ok(())
}

fn fxch(state: &mut CpuState, instr: &Instruction) -> ExResult<()> {
    let i = if instr.op_count() >= 2 {
        st_number(instr.op_register(1))
    } else {
        1
    };
    let (a, b) = match (st(state, 0), st(state, i)) {
        (Some(a), Some(b)) => (a, b),
        (a, b) => {
            if !stack_fault(state, false) {
                return Ok(());
            }
            (a.unwrap_or(INDEFINITE), b.unwrap_or(INDEFINITE))
        }
    };
    set_st(state, 0, b);
    set_st(state, i, a);
    state.x87.fsw &= !C1;
    Ok(())
}

/// FADD/FSUB/FSUBR/FMUL/FDIV/FDIVR in all forms: `dest = dest op src`, where the forms
/// with one memory operand have dest ST(0); the P forms pop afterwards.
fn arith<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    kernel: Kernel,
) -> ExResult<()> {
    let (dest, src, mut sw) = if instr.op_kind(0) == OpKind::Memory {
        let (v, sw) = load_memory(state, mem, instr)?;
        (0, Some(v), sw)
    } else if instr.op_count() >= 2 {
        let src = st_number(instr.op_register(1));
        (st_number(instr.op_register(0)), st(state, src), 0)
    } else {
        (1, st(state, 0), 0)
    };
    let pops = matches!(
        instr.mnemonic(),
        Mnemonic::Faddp
            | Mnemonic::Fsubp
            | Mnemonic::Fsubrp
            | Mnemonic::Fmulp
            | Mnemonic::Fdivp
            | Mnemonic::Fdivrp
    );
    let result = match (st(state, dest), src) {
        (Some(a), Some(b)) => {
            let io = host::exec(kernel, Io::new(state.x87.fcw).with_a(&a).with_b(&b));
            sw |= io.sw;
            if absorb(state, sw, false) {
                state.x87.fsw = (state.x87.fsw & !C1) | (io.sw & C1);
                Some(io.r0())
            } else {
                None
            }
        }
        _ => stack_fault(state, false).then_some(INDEFINITE),
    };
    if let Some(r) = result {
        set_st(state, dest, r);
    }
    if pops {
        pop(state);
    }
    Ok(())
}

fn sign_op(state: &mut CpuState, negate: bool) -> ExResult<()> {
    let Some(mut v) = st(state, 0) else {
        if stack_fault(state, false) {
            set_st(state, 0, INDEFINITE);
        }
        return Ok(());
    };
    if negate {
        v[9] ^= 0x80;
    } else {
        v[9] &= 0x7f;
    }
    set_st(state, 0, v);
    state.x87.fsw &= !C1;
    Ok(())
}

/// ST(0) = op(ST(0)).
fn unary(state: &mut CpuState, kernel: Kernel) -> ExResult<()> {
    let Some(a) = st(state, 0) else {
        if stack_fault(state, false) {
            set_st(state, 0, INDEFINITE);
        }
        return Ok(());
    };
    let io = host::exec(kernel, Io::new(state.x87.fcw).with_a(&a));
    if absorb(state, io.sw, true) {
        set_st(state, 0, io.r0());
    }
    Ok(())
}

/// FPTAN/FSINCOS/FXTRACT: ST(0) is replaced and one more value pushed (unless C2 reports
/// an out-of-range operand for FPTAN/FSINCOS).
fn unary_push(state: &mut CpuState, kernel: Kernel) -> ExResult<()> {
    let Some(a) = st(state, 0) else {
        if stack_fault(state, false) {
            set_st(state, 0, INDEFINITE);
            push(state, INDEFINITE);
        }
        return Ok(());
    };
    if st(state, 7).is_some() {
        if stack_fault(state, true) {
            set_st(state, 0, INDEFINITE);
            push(state, INDEFINITE);
        }
        return Ok(());
    }
    let io = host::exec(kernel, Io::new(state.x87.fcw).with_a(&a));
    if !absorb(state, io.sw, true) {
        return Ok(());
    }
    if kernel != Kernel::Fxtract && io.sw & C2 != 0 {
        return Ok(());
    }
    set_st(state, 0, io.r1());
    push(state, io.r0());
    Ok(())
}

/// Operations on ST(0) and ST(1): FSCALE/FPREM/FPREM1 replace ST(0); FYL2X/FYL2XP1/FPATAN
/// replace ST(1) and pop.
fn two_operand(state: &mut CpuState, kernel: Kernel, pops: bool) -> ExResult<()> {
    let dest = usize::from(pops);
    let result = match (st(state, 0), st(state, 1)) {
        (Some(a), Some(b)) => {
            let io = host::exec(kernel, Io::new(state.x87.fcw).with_a(&a).with_b(&b));
            absorb(state, io.sw, true).then_some(io.r0())
        }
        _ => stack_fault(state, false).then_some(INDEFINITE),
    };
    if let Some(r) = result {
        set_st(state, dest, r);
    }
    if pops && result.is_some() {
        pop(state);
    }
    Ok(())
}

fn fxam(state: &mut CpuState) -> ExResult<()> {
    let p = phys(state, 0);
    let sign = if state.x87.regs[p][9] & 0x80 != 0 {
        C1
    } else {
        0
    };
    let x = &mut state.x87;
    if (x.ftw >> (2 * p)) & 3 == 3 {
        x.fsw = (x.fsw & !CONDITION) | C3 | C0 | sign;
        return Ok(());
    }
    let io = host::exec(Kernel::Fxam, Io::new(x.fcw).with_a(&x.regs[p]));
    x.fsw = (x.fsw & !CONDITION) | (io.sw & CONDITION);
    Ok(())
}

/// FCOM/FCOMP/FICOM/FICOMP/FUCOM/FUCOMP with a register or memory source.
fn compare<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    kernel: Kernel,
) -> ExResult<()> {
    let m = instr.mnemonic();
    let pops = matches!(m, Mnemonic::Fcomp | Mnemonic::Ficomp | Mnemonic::Fucomp);
    if instr.op_kind(0) == OpKind::Memory {
        let (b, sw) = load_memory(state, mem, instr)?;
        compare_values(state, st(state, 0), Some(b), sw, kernel, false);
    } else {
        let i = match instr.op_count() {
            0 => 1,
            n => st_number(instr.op_register(n - 1)),
        };
        compare_registers(state, i, kernel, false);
    }
    if pops {
        pop(state);
    }
    Ok(())
}

fn compare_registers(state: &mut CpuState, i: usize, kernel: Kernel, eflags: bool) {
    let (a, b) = (st(state, 0), st(state, i));
    compare_values(state, a, b, 0, kernel, eflags);
}

/// Compares; the result goes to C0/C2/C3 or (FCOMI forms) to ZF/PF/CF.
fn compare_values(
    state: &mut CpuState,
    a: Option<Reg>,
    b: Option<Reg>,
    load_sw: u16,
    kernel: Kernel,
    eflags: bool,
) {
    let codes = match (a, b) {
        (Some(a), Some(b)) => {
            let io = host::exec(kernel, Io::new(state.x87.fcw).with_a(&a).with_b(&b));
            let sw = io.sw | load_sw;
            if !absorb(state, sw, false) {
                return;
            }
            io.sw & (C0 | C2 | C3)
        }
        _ => {
            if !stack_fault(state, false) {
                return;
            }
            C0 | C2 | C3
        }
    };
    state.x87.fsw &= !C1;
    if eflags {
        state.rflags &= !(ZF | PF | CF | OF | SF | AF);
        state.set_flag(ZF, codes & C3 != 0);
        state.set_flag(PF, codes & C2 != 0);
        state.set_flag(CF, codes & C0 != 0);
    } else {
        state.x87.fsw = (state.x87.fsw & !(C0 | C2 | C3)) | codes;
    }
}

fn fcmov(state: &mut CpuState, instr: &Instruction, m: Mnemonic) -> ExResult<()> {
    use Mnemonic as K;
    let (cf, zf, pf) = (state.flag(CF), state.flag(ZF), state.flag(PF));
    let take = match m {
        K::Fcmovb => cf,
        K::Fcmove => zf,
        K::Fcmovbe => cf || zf,
        K::Fcmovu => pf,
        K::Fcmovnb => !cf,
        K::Fcmovne => !zf,
        K::Fcmovnbe => !cf && !zf,
        _ => !pf,
    };
    let i = st_number(instr.op_register(1));
    match (st(state, 0), st(state, i)) {
        (Some(_), Some(v)) => {
            if take {
                set_st(state, 0, v);
            }
        }
        _ => {
            if stack_fault(state, false) && take {
                set_st(state, 0, INDEFINITE);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
