//! General-purpose user-level instructions: arithmetic and logic with exact flags, shifts
//! and rotates, multiply/divide, bit operations, moves and conversions, near branches,
//! stack operations and string instructions.
//!
//! Privileged and mode-dependent instructions (PUSHF/POPF, CLI/STI, segment loads, far
//! branches, IN/OUT/INS/OUTS, INT, ...) belong to the core: [`execute`] returns None for
//! them, and for the SSE instructions that share a mnemonic with a string instruction
//! (MOVSD/CMPSD with XMM operands).

pub mod alu;
mod control;
mod string;
#[cfg(test)]
mod tests;

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use crate::access::{
    effective_address, memory_segment, operand_size, read_operand, write_operand, DataAccess,
};
use crate::exception::{ExResult, Exception};
use crate::state::{CpuState, AF, CF, DF, OF, PF, SF, STATUS_FLAGS, ZF};

use alu::{mask, sign_extend, ShiftOp};

/// Runs `instr` if it is one of this group's instructions. Returns None otherwise (the core
/// then tries the next group).
pub fn execute<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> Option<ExResult<()>> {
    use Mnemonic as Mn;
    let mnemonic = instr.mnemonic();
    if fast_register_form(state, instr, mnemonic) {
        return Some(Ok(()));
    }
    if mnemonic == Mn::Mov {
        if let Some(r) = fast_memory_mov(state, mem, instr) {
            return Some(r);
        }
    }
    let result = match mnemonic {
        Mn::Mov => {
            if !gpr_operands_only(instr) {
                return None;
            }
            mov(state, mem, instr)
        }
        Mn::Add => binary(state, mem, instr, BinaryOp::Add),
        Mn::Or => binary(state, mem, instr, BinaryOp::Or),
        Mn::Adc => binary(state, mem, instr, BinaryOp::Adc),
        Mn::Sbb => binary(state, mem, instr, BinaryOp::Sbb),
        Mn::And => binary(state, mem, instr, BinaryOp::And),
        Mn::Sub => binary(state, mem, instr, BinaryOp::Sub),
        Mn::Xor => binary(state, mem, instr, BinaryOp::Xor),
        Mn::Cmp => compare(state, mem, instr, false),
        Mn::Test => compare(state, mem, instr, true),
        Mn::Inc => unary(state, mem, instr, UnaryOp::Inc),
        Mn::Dec => unary(state, mem, instr, UnaryOp::Dec),
        Mn::Neg => unary(state, mem, instr, UnaryOp::Neg),
        Mn::Not => unary(state, mem, instr, UnaryOp::Not),
        Mn::Rol => shift(state, mem, instr, ShiftOp::Rol),
        Mn::Ror => shift(state, mem, instr, ShiftOp::Ror),
        Mn::Rcl => shift(state, mem, instr, ShiftOp::Rcl),
        Mn::Rcr => shift(state, mem, instr, ShiftOp::Rcr),
        Mn::Shl | Mn::Sal => shift(state, mem, instr, ShiftOp::Shl),
        Mn::Shr => shift(state, mem, instr, ShiftOp::Shr),
        Mn::Sar => shift(state, mem, instr, ShiftOp::Sar),
        Mn::Shld => double_shift(state, mem, instr, true),
        Mn::Shrd => double_shift(state, mem, instr, false),
        Mn::Mul => multiply_wide(state, mem, instr, false),
        Mn::Imul => {
            if instr.op_count() == 1 {
                multiply_wide(state, mem, instr, true)
            } else {
                imul_truncating(state, mem, instr)
            }
        }
        Mn::Div => divide(state, mem, instr, false),
        Mn::Idiv => divide(state, mem, instr, true),
        Mn::Movzx => movzx(state, mem, instr, false),
        Mn::Movsx | Mn::Movsxd => movzx(state, mem, instr, true),
        Mn::Movnti => mov(state, mem, instr),
        Mn::Lea => {
            let ea = effective_address(state, instr);
            write_operand(state, mem, instr, 0, ea)
        }
        Mn::Xchg => xchg(state, mem, instr),
        Mn::Cmpxchg => cmpxchg(state, mem, instr),
        Mn::Cmpxchg8b => cmpxchg8b(state, mem, instr),
        Mn::Cmpxchg16b => cmpxchg16b(state, mem, instr),
        Mn::Xadd => xadd(state, mem, instr),
        Mn::Bswap => bswap(state, instr),
        Mn::Cbw => sign_extend_accumulator(state, 1),
        Mn::Cwde => sign_extend_accumulator(state, 2),
        Mn::Cdqe => sign_extend_accumulator(state, 4),
        Mn::Cwd => sign_into_rdx(state, 2),
        Mn::Cdq => sign_into_rdx(state, 4),
        Mn::Cqo => sign_into_rdx(state, 8),
        Mn::Bt => bit_test(state, mem, instr, BitOp::Test),
        Mn::Bts => bit_test(state, mem, instr, BitOp::Set),
        Mn::Btr => bit_test(state, mem, instr, BitOp::Reset),
        Mn::Btc => bit_test(state, mem, instr, BitOp::Complement),
        Mn::Bsf | Mn::Bsr | Mn::Popcnt | Mn::Lzcnt | Mn::Tzcnt => bit_scan(state, mem, instr),
        Mn::Clc => flag_op(state, CF, Some(false)),
        Mn::Stc => flag_op(state, CF, Some(true)),
        Mn::Cmc => flag_op(state, CF, None),
        Mn::Cld => flag_op(state, DF, Some(false)),
        Mn::Std => flag_op(state, DF, Some(true)),
        Mn::Lahf => {
            let ah = (state.rflags & (SF | ZF | AF | PF | CF)) | 2;
            state.write_gpr(Register::AH, ah);
            Ok(())
        }
        Mn::Sahf => {
            let ah = state.read_gpr(Register::AH).unwrap_or(0);
            let bits = SF | ZF | AF | PF | CF;
            state.rflags = (state.rflags & !bits) | (ah & bits);
            Ok(())
        }
        Mn::Nop
        | Mn::Reservednop
        | Mn::Endbr32
        | Mn::Endbr64
        | Mn::Rdsspd
        | Mn::Rdsspq
        | Mn::Prefetch
        | Mn::Prefetchw
        | Mn::Prefetchwt1
        | Mn::Prefetchnta
        | Mn::Prefetcht0
        | Mn::Prefetcht1
        | Mn::Prefetcht2
        | Mn::Prefetchit0
        | Mn::Prefetchit1
        | Mn::Lfence
        | Mn::Sfence
        | Mn::Mfence => Ok(()),
        Mn::Xlatb => xlat(state, mem, instr),
        Mn::Aaa | Mn::Aas | Mn::Daa | Mn::Das | Mn::Aam | Mn::Aad | Mn::Salc => {
            decimal_adjust(state, instr)
        }
        // Near branches and the stack.
        Mn::Jo
        | Mn::Jno
        | Mn::Jb
        | Mn::Jae
        | Mn::Je
        | Mn::Jne
        | Mn::Jbe
        | Mn::Ja
        | Mn::Js
        | Mn::Jns
        | Mn::Jp
        | Mn::Jnp
        | Mn::Jl
        | Mn::Jge
        | Mn::Jle
        | Mn::Jg => {
            if alu::condition(instr.condition_code(), state.rflags) {
                control::jump(state, instr.near_branch_target())
            } else {
                Ok(())
            }
        }
        Mn::Jmp => return control::jmp(state, mem, instr),
        Mn::Call => return control::call(state, mem, instr),
        Mn::Ret => control::ret(state, mem, instr),
        Mn::Loop | Mn::Loope | Mn::Loopne | Mn::Jcxz | Mn::Jecxz | Mn::Jrcxz => {
            control::loop_branch(state, instr)
        }
        Mn::Push => return control::push_op(state, mem, instr),
        Mn::Pop => return control::pop_op(state, mem, instr),
        Mn::Pusha | Mn::Pushad => control::push_all(state, mem, instr),
        Mn::Popa | Mn::Popad => control::pop_all(state, mem, instr),
        Mn::Enter => control::enter(state, mem, instr),
        Mn::Leave => control::leave(state, mem, instr),
        // String instructions (INS/OUTS are the core's).
        Mn::Movsb | Mn::Movsw | Mn::Movsq | Mn::Stosb | Mn::Stosw | Mn::Stosd | Mn::Stosq => {
            string::execute(state, mem, instr)
        }
        Mn::Lodsb | Mn::Lodsw | Mn::Lodsd | Mn::Lodsq | Mn::Scasb | Mn::Scasw | Mn::Scasd => {
            string::execute(state, mem, instr)
        }
        Mn::Scasq | Mn::Cmpsb | Mn::Cmpsw | Mn::Cmpsq => string::execute(state, mem, instr),
        Mn::Movsd | Mn::Cmpsd => {
            // Shared with SSE2's MOVSD/CMPSD: only the string forms are ours.
            if !is_string_operand(instr.op0_kind()) && !is_string_operand(instr.op1_kind()) {
                return None;
            }
            string::execute(state, mem, instr)
        }
        m if alu::is_setcc(m) => {
            let on = alu::condition(instr.condition_code(), state.rflags);
            write_operand(state, mem, instr, 0, on as u64)
        }
        m if alu::is_cmov(m) => cmov(state, mem, instr),
        _ => return None,
    };
    Some(result)
}

const UD: Exception = Exception::InvalidOpcode;

fn is_string_operand(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::MemorySegSI
            | OpKind::MemorySegESI
            | OpKind::MemorySegRSI
            | OpKind::MemorySegDI
            | OpKind::MemorySegEDI
            | OpKind::MemorySegRDI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI
    )
}

/// (index in `gpr`, width) of a 32- or 64-bit general-purpose register.
#[inline(always)]
fn wide_gpr(reg: Register) -> Option<(usize, usize)> {
    let r = reg as u32;
    if r >= Register::RAX as u32 && r <= Register::R15 as u32 {
        Some(((r - Register::RAX as u32) as usize, 8))
    } else if r >= Register::EAX as u32 && r <= Register::R15D as u32 {
        Some(((r - Register::EAX as u32) as usize, 4))
    } else {
        None
    }
}

/// Fast path for the hottest register-only forms (MOV, ALU ops, CMP/TEST, INC/DEC and
/// SHL/SHR/SAR/ROL/ROR with a 32/64-bit register destination and a register or immediate
/// source or count), which skips the
/// generic operand helpers. Returns false, having changed nothing, for any other form;
/// the semantics (exact flags, 32-bit zero extension) are those of the generic path.
#[inline(always)]
fn fast_register_form(state: &mut CpuState, instr: &Instruction, mn: Mnemonic) -> bool {
    use Mnemonic as Mn;
    if instr.op0_kind() != OpKind::Register || instr.has_lock_prefix() {
        return false;
    }
    let Some((dst, size)) = wide_gpr(instr.op0_register()) else {
        return false;
    };
    let m = mask(size);
    let a = state.gpr[dst] & m;
    let rf = state.rflags;
    if matches!(mn, Mn::Inc | Mn::Dec) {
        if instr.op_count() != 1 {
            return false;
        }
        let (r, f) = if mn == Mn::Inc {
            alu::inc(a, size, rf)
        } else {
            alu::dec(a, size, rf)
        };
        state.gpr[dst] = r;
        set_status(state, f);
        return true;
    }
    if instr.op_count() != 2 {
        return false;
    }
    let shift_op = match mn {
        Mn::Shl | Mn::Sal => Some(ShiftOp::Shl),
        Mn::Shr => Some(ShiftOp::Shr),
        Mn::Sar => Some(ShiftOp::Sar),
        Mn::Rol => Some(ShiftOp::Rol),
        Mn::Ror => Some(ShiftOp::Ror),
        _ => None,
    };
    if let Some(op) = shift_op {
        let count = match instr.op1_kind() {
            OpKind::Immediate8 => instr.immediate(1),
            OpKind::Register if instr.op1_register() == Register::CL => state.gpr[1] & 0xff,
            _ => return false,
        };
        let (r, f) = alu::shift(op, a, count, size, rf);
        state.gpr[dst] = r & m;
        set_status(state, f);
        return true;
    }
    let src = match instr.op1_kind() {
        OpKind::Register => match wide_gpr(instr.op1_register()) {
            Some((i, s)) if s == size => state.gpr[i],
            _ => return false,
        },
        OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => instr.immediate(1),
        _ => return false,
    } & m;
    let cf = rf & CF != 0;
    let (r, f) = match mn {
        Mn::Mov => {
            state.gpr[dst] = src;
            return true;
        }
        Mn::Add => alu::add(a, src, false, size, rf),
        Mn::Adc => alu::add(a, src, cf, size, rf),
        Mn::Sub => alu::sub(a, src, false, size, rf),
        Mn::Sbb => alu::sub(a, src, cf, size, rf),
        Mn::And => alu::logic(a & src, size, rf),
        Mn::Or => alu::logic(a | src, size, rf),
        Mn::Xor => alu::logic(a ^ src, size, rf),
        Mn::Cmp => {
            state.rflags = alu::sub(a, src, false, size, rf).1;
            return true;
        }
        Mn::Test => {
            state.rflags = alu::logic(a & src, size, rf).1;
            return true;
        }
        _ => return false,
    };
    state.gpr[dst] = r;
    set_status(state, f);
    true
}

/// Fast path for MOV (the caller checked the mnemonic) between a 32/64-bit general-purpose
/// register and memory. None, having changed nothing, for any other form.
#[inline(always)]
fn fast_memory_mov<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> Option<ExResult<()>> {
    match (instr.op0_kind(), instr.op1_kind()) {
        (OpKind::Register, OpKind::Memory) => {
            let (dst, size) = wide_gpr(instr.op0_register())?;
            let seg = memory_segment(instr);
            let ea = effective_address(state, instr);
            Some(mem.read(seg, ea, size).map(|v| {
                state.gpr[dst] = v & mask(size);
            }))
        }
        (OpKind::Memory, OpKind::Register) => {
            let (src, size) = wide_gpr(instr.op1_register())?;
            let seg = memory_segment(instr);
            let ea = effective_address(state, instr);
            Some(mem.write(seg, ea, size, state.gpr[src] & mask(size)))
        }
        _ => None,
    }
}

/// True when every register operand is a general-purpose register (MOV to segment,
/// control and debug registers is the core's).
fn gpr_operands_only(instr: &Instruction) -> bool {
    (0..instr.op_count()).all(|i| {
        instr.op_kind(i) != OpKind::Register
            || crate::state::gpr_info(instr.op_register(i)).is_some()
    })
}

/// Address-size mask of the memory operand (for offsets computed beyond the operand).
fn address_mask(state: &CpuState, instr: &Instruction) -> u64 {
    let base = instr.memory_base();
    let reg = if base != Register::None {
        base
    } else {
        instr.memory_index()
    };
    let size = match reg {
        Register::RIP => 8,
        Register::EIP => 4,
        Register::None => match instr.memory_displ_size() {
            2 => 2,
            4 => 4,
            8 => 8,
            _ => (state.bitness() / 8) as usize,
        },
        r => r.size(),
    };
    mask(size)
}

#[inline(always)]
fn set_status(state: &mut CpuState, rflags: u64) {
    state.rflags = (state.rflags & !STATUS_FLAGS) | (rflags & STATUS_FLAGS);
}

/// Read-modify-write of operand 0. `f` maps the old value to (new value, new RFLAGS).
/// LOCKed memory forms retry through compare_exchange so they are atomic on shared RAM;
/// flags and registers change only after the memory write succeeded.
#[inline(always)]
fn modify<M: DataAccess, F: Fn(u64) -> (u64, u64)>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    size: usize,
    f: F,
) -> ExResult<u64> {
    match instr.op0_kind() {
        OpKind::Register => {
            let reg = instr.op0_register();
            let old = state.read_gpr(reg).ok_or(UD)?;
            let (new, flags) = f(old);
            state.write_gpr(reg, new);
            set_status(state, flags);
            Ok(old)
        }
        OpKind::Memory => {
            let seg = memory_segment(instr);
            let ea = effective_address(state, instr);
            let mut old = mem.read(seg, ea, size)?;
            if instr.has_lock_prefix() {
                loop {
                    let (new, flags) = f(old);
                    let found = mem.compare_exchange(seg, ea, size, old, new & mask(size))?;
                    if found == old {
                        set_status(state, flags);
                        return Ok(old);
                    }
                    old = found;
                }
            }
            let (new, flags) = f(old);
            mem.write(seg, ea, size, new & mask(size))?;
            set_status(state, flags);
            Ok(old)
        }
        _ => Err(UD),
    }
}

#[derive(Clone, Copy)]
enum BinaryOp {
    Add,
    Or,
    Adc,
    Sbb,
    And,
    Sub,
    Xor,
}

fn binary<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    op: BinaryOp,
) -> ExResult<()> {
    let size = operand_size(instr, 0);
    let src = read_operand(state, mem, instr, 1)?;
    let rf = state.rflags;
    let cf = rf & CF != 0;
    match op {
        BinaryOp::Add => modify(state, mem, instr, size, |a| {
            alu::add(a, src, false, size, rf)
        }),
        BinaryOp::Adc => modify(state, mem, instr, size, |a| alu::add(a, src, cf, size, rf)),
        BinaryOp::Sub => modify(state, mem, instr, size, |a| {
            alu::sub(a, src, false, size, rf)
        }),
        BinaryOp::Sbb => modify(state, mem, instr, size, |a| alu::sub(a, src, cf, size, rf)),
        BinaryOp::And => modify(state, mem, instr, size, |a| alu::logic(a & src, size, rf)),
        BinaryOp::Or => modify(state, mem, instr, size, |a| alu::logic(a | src, size, rf)),
        BinaryOp::Xor => modify(state, mem, instr, size, |a| alu::logic(a ^ src, size, rf)),
    }
    .map(|_| ())
}

fn compare<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    test: bool,
) -> ExResult<()> {
    let size = operand_size(instr, 0);
    let a = read_operand(state, mem, instr, 0)?;
    let b = read_operand(state, mem, instr, 1)?;
    let rf = state.rflags;
    state.rflags = if test {
        alu::logic(a & b, size, rf).1
    } else {
        alu::sub(a, b, false, size, rf).1
    };
    Ok(())
}

#[derive(Clone, Copy)]
enum UnaryOp {
    Inc,
    Dec,
    Neg,
    Not,
}

fn unary<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    op: UnaryOp,
) -> ExResult<()> {
    let size = operand_size(instr, 0);
    let rf = state.rflags;
    match op {
        UnaryOp::Inc => modify(state, mem, instr, size, |a| alu::inc(a, size, rf)),
        UnaryOp::Dec => modify(state, mem, instr, size, |a| alu::dec(a, size, rf)),
        UnaryOp::Neg => modify(state, mem, instr, size, |a| alu::sub(0, a, false, size, rf)),
        UnaryOp::Not => modify(state, mem, instr, size, |a| (!a & mask(size), rf)),
    }
    .map(|_| ())
}

fn shift<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    op: ShiftOp,
) -> ExResult<()> {
    let size = operand_size(instr, 0);
    let count = read_operand(state, mem, instr, 1)?;
    let rf = state.rflags;
    let limit = if size == 8 { 0x3f } else { 0x1f };
    if count & limit == 0 && instr.op0_kind() == OpKind::Memory {
        // Nothing changes; the operand is still read.
        read_operand(state, mem, instr, 0)?;
        return Ok(());
    }
    modify(state, mem, instr, size, |a| {
        alu::shift(op, a, count, size, rf)
    })
    .map(|_| ())
}

fn double_shift<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    left: bool,
) -> ExResult<()> {
    let size = operand_size(instr, 0);
    let src = read_operand(state, mem, instr, 1)?;
    let count = read_operand(state, mem, instr, 2)?;
    let rf = state.rflags;
    let limit = if size == 8 { 0x3f } else { 0x1f };
    if count & limit == 0 && instr.op0_kind() == OpKind::Memory {
        read_operand(state, mem, instr, 0)?;
        return Ok(());
    }
    modify(state, mem, instr, size, |d| {
        alu::double_shift(left, d, src, count, size, rf)
    })
    .map(|_| ())
}

/// Register of the given size in encoding slot `index` (0 = AL/AX/EAX/RAX, 2 = DL/DX/...).
fn sized_gpr(index: usize, size: usize) -> Register {
    let base = match size {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    };
    // AL..BL, AX..R15W, EAX..R15D and RAX..R15 are contiguous in iced's numbering for the
    // slots used here (0..=3).
    match (base, index) {
        (Register::AL, 2) => Register::DL,
        (Register::AL, _) => Register::AL,
        (Register::AX, 2) => Register::DX,
        (Register::AX, _) => Register::AX,
        (Register::EAX, 2) => Register::EDX,
        (Register::EAX, _) => Register::EAX,
        (_, 2) => Register::RDX,
        _ => Register::RAX,
    }
}

/// MUL and one-operand IMUL: rDX:rAX = rAX * src (AX = AL * src for bytes).
fn multiply_wide<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    signed: bool,
) -> ExResult<()> {
    let size = operand_size(instr, 0);
    let src = read_operand(state, mem, instr, 0)?;
    let m = mask(size);
    let a = state.gpr[0] & m;
    let bits = size * 8;
    let (low, high, overflow) = if signed {
        let p = i128::from(sign_extend(a, size) as i64) * i128::from(sign_extend(src, size) as i64);
        let low = p as u64 & m;
        let high = (p >> bits) as u64 & m;
        (low, high, i128::from(sign_extend(low, size) as i64) != p)
    } else {
        let p = u128::from(a) * u128::from(src & m);
        let low = p as u64 & m;
        let high = (p >> bits) as u64 & m;
        (low, high, high != 0)
    };
    if size == 1 {
        state.write_gpr(Register::AX, (high << 8) | low);
    } else {
        state.write_gpr(sized_gpr(0, size), low);
        state.write_gpr(sized_gpr(2, size), high);
    }
    let mut f = state.rflags & !(CF | OF);
    if overflow {
        f |= CF | OF;
    }
    state.rflags = f;
    Ok(())
}

/// Two- and three-operand IMUL: the product truncated to the destination size.
fn imul_truncating<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<()> {
    let size = operand_size(instr, 0);
    let (a, b) = if instr.op_count() == 3 {
        (
            read_operand(state, mem, instr, 1)?,
            read_operand(state, mem, instr, 2)?,
        )
    } else {
        (
            read_operand(state, mem, instr, 0)?,
            read_operand(state, mem, instr, 1)?,
        )
    };
    let p = i128::from(sign_extend(a, size) as i64) * i128::from(sign_extend(b, size) as i64);
    let low = p as u64 & mask(size);
    let overflow = i128::from(sign_extend(low, size) as i64) != p;
    write_operand(state, mem, instr, 0, low)?;
    let mut f = state.rflags & !(CF | OF);
    if overflow {
        f |= CF | OF;
    }
    state.rflags = f;
    Ok(())
}

/// DIV/IDIV: #DE on a zero divisor or a quotient that does not fit.
fn divide<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    signed: bool,
) -> ExResult<()> {
    let size = operand_size(instr, 0);
    let m = mask(size);
    let divisor = read_operand(state, mem, instr, 0)? & m;
    if divisor == 0 {
        return Err(Exception::DivideError);
    }
    let bits = size * 8;
    let (low, high) = if size == 1 {
        (state.gpr[0] & 0xff, (state.gpr[0] >> 8) & 0xff)
    } else {
        (state.gpr[0] & m, state.gpr[2] & m)
    };
    let dividend = (u128::from(high) << bits) | u128::from(low);
    let (quotient, remainder) = if signed {
        // Sign-extend the 2*bits-wide dividend.
        let shift = 128 - 2 * bits;
        let n = ((dividend << shift) as i128) >> shift;
        let d = i128::from(sign_extend(divisor, size) as i64);
        let q = n.checked_div(d).ok_or(Exception::DivideError)?;
        let r = n.checked_rem(d).ok_or(Exception::DivideError)?;
        let min = -(1i128 << (bits - 1));
        let max = (1i128 << (bits - 1)) - 1;
        if q < min || q > max {
            return Err(Exception::DivideError);
        }
        (q as u64 & m, r as u64 & m)
    } else {
        let d = u128::from(divisor);
        let q = dividend / d;
        if q > u128::from(m) {
            return Err(Exception::DivideError);
        }
        (q as u64, (dividend % d) as u64)
    };
    if size == 1 {
        state.write_gpr(Register::AX, (remainder << 8) | quotient);
    } else {
        state.write_gpr(sized_gpr(0, size), quotient);
        state.write_gpr(sized_gpr(2, size), remainder);
    }
    Ok(())
}

fn mov<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    if instr.op0_kind() == OpKind::Register && instr.op1_kind() == OpKind::Register {
        let v = state.read_gpr(instr.op1_register()).ok_or(UD)?;
        state.write_gpr(instr.op0_register(), v);
        return Ok(());
    }
    let v = read_operand(state, mem, instr, 1)?;
    write_operand(state, mem, instr, 0, v)
}

fn movzx<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    signed: bool,
) -> ExResult<()> {
    let v = read_operand(state, mem, instr, 1)?;
    let v = if signed {
        sign_extend(v, operand_size(instr, 1))
    } else {
        v
    };
    write_operand(state, mem, instr, 0, v)
}

fn xchg<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let (mem_op, reg_op) = match (instr.op0_kind(), instr.op1_kind()) {
        (OpKind::Register, OpKind::Register) => {
            let a = state.read_gpr(instr.op0_register()).ok_or(UD)?;
            let b = state.read_gpr(instr.op1_register()).ok_or(UD)?;
            state.write_gpr(instr.op0_register(), b);
            state.write_gpr(instr.op1_register(), a);
            return Ok(());
        }
        (OpKind::Memory, _) => (0, 1),
        _ => (1, 0),
    };
    let reg = instr.op_register(reg_op);
    let value = state.read_gpr(reg).ok_or(UD)?;
    let size = operand_size(instr, mem_op);
    let seg = memory_segment(instr);
    let ea = effective_address(state, instr);
    // XCHG with memory is always locked.
    let mut old = mem.read(seg, ea, size)?;
    loop {
        let found = mem.compare_exchange(seg, ea, size, old, value)?;
        if found == old {
            break;
        }
        old = found;
    }
    state.write_gpr(reg, old);
    Ok(())
}

fn cmpxchg<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let size = operand_size(instr, 0);
    let src = read_operand(state, mem, instr, 1)?;
    let acc_reg = sized_gpr(0, size);
    let acc = state.gpr[0] & mask(size);
    let rf = state.rflags;
    let old = if instr.op0_kind() == OpKind::Register {
        let reg = instr.op0_register();
        let old = state.read_gpr(reg).ok_or(UD)?;
        if old == acc {
            state.write_gpr(reg, src);
        }
        old
    } else {
        let seg = memory_segment(instr);
        let ea = effective_address(state, instr);
        mem.compare_exchange(seg, ea, size, acc, src)?
    };
    if old != acc {
        state.write_gpr(acc_reg, old);
    }
    state.rflags = alu::sub(acc, old, false, size, rf).1;
    Ok(())
}

fn cmpxchg8b<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<()> {
    let expected = (state.gpr[2] << 32) | (state.gpr[0] & 0xffff_ffff);
    let new = (state.gpr[1] << 32) | (state.gpr[3] & 0xffff_ffff);
    let seg = memory_segment(instr);
    let ea = effective_address(state, instr);
    let found = mem.compare_exchange(seg, ea, 8, expected, new)?;
    if found == expected {
        state.rflags |= ZF;
    } else {
        state.rflags &= !ZF;
        state.gpr[0] = found & 0xffff_ffff;
        state.gpr[2] = found >> 32;
    }
    Ok(())
}

fn cmpxchg16b<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<()> {
    let expected = (u128::from(state.gpr[2]) << 64) | u128::from(state.gpr[0]);
    let new = (u128::from(state.gpr[1]) << 64) | u128::from(state.gpr[3]);
    let seg = memory_segment(instr);
    let ea = effective_address(state, instr);
    if ea & 15 != 0 {
        return Err(Exception::GeneralProtection(0));
    }
    let found = mem.compare_exchange16(seg, ea, expected, new)?;
    if found == expected {
        state.rflags |= ZF;
    } else {
        state.rflags &= !ZF;
        state.gpr[0] = found as u64;
        state.gpr[2] = (found >> 64) as u64;
    }
    Ok(())
}

fn xadd<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let size = operand_size(instr, 0);
    let src_reg = instr.op1_register();
    let src = state.read_gpr(src_reg).ok_or(UD)?;
    let rf = state.rflags;
    if instr.op0_kind() == OpKind::Register {
        // SRC := DEST first, then DEST := sum (matters when both are the same register).
        let dst_reg = instr.op0_register();
        let d = state.read_gpr(dst_reg).ok_or(UD)?;
        let (sum, f) = alu::add(d, src, false, size, rf);
        state.write_gpr(src_reg, d);
        state.write_gpr(dst_reg, sum);
        set_status(state, f);
        return Ok(());
    }
    let old = modify(state, mem, instr, size, |d| {
        alu::add(d, src, false, size, rf)
    })?;
    state.write_gpr(src_reg, old);
    Ok(())
}

fn bswap(state: &mut CpuState, instr: &Instruction) -> ExResult<()> {
    let reg = instr.op0_register();
    let v = state.read_gpr(reg).ok_or(UD)?;
    let r = match reg.size() {
        8 => v.swap_bytes(),
        4 => u64::from((v as u32).swap_bytes()),
        // BSWAP of a 16-bit register is undefined; Intel parts clear it.
        _ => 0,
    };
    state.write_gpr(reg, r);
    Ok(())
}

/// CBW/CWDE/CDQE: sign-extend the low half of the accumulator into all of it.
fn sign_extend_accumulator(state: &mut CpuState, from: usize) -> ExResult<()> {
    let v = sign_extend(state.gpr[0] & mask(from), from);
    state.write_gpr(sized_gpr(0, from * 2), v);
    Ok(())
}

/// CWD/CDQ/CQO: fill rDX with the accumulator's sign.
fn sign_into_rdx(state: &mut CpuState, size: usize) -> ExResult<()> {
    let negative = state.gpr[0] & alu::sign_bit(size) != 0;
    state.write_gpr(sized_gpr(2, size), if negative { u64::MAX } else { 0 });
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BitOp {
    Test,
    Set,
    Reset,
    Complement,
}

/// BT/BTS/BTR/BTC. A register bit offset on a memory operand addresses memory beyond
/// the operand (signed, in operand-size units).
fn bit_test<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
    op: BitOp,
) -> ExResult<()> {
    let size = operand_size(instr, 0);
    let bits = (size * 8) as u64;
    let offset = read_operand(state, mem, instr, 1)?;
    let apply = |v: u64, bit: u64| -> u64 {
        match op {
            BitOp::Test => v,
            BitOp::Set => v | (1 << bit),
            BitOp::Reset => v & !(1 << bit),
            BitOp::Complement => v ^ (1 << bit),
        }
    };
    let old = if instr.op0_kind() == OpKind::Register {
        let bit = offset & (bits - 1);
        let reg = instr.op0_register();
        let v = state.read_gpr(reg).ok_or(UD)?;
        if op != BitOp::Test {
            state.write_gpr(reg, apply(v, bit));
        }
        (v >> bit) & 1
    } else {
        let seg = memory_segment(instr);
        let mut ea = effective_address(state, instr);
        let bit = if instr.op1_kind() == OpKind::Register {
            let signed = sign_extend(offset, size) as i64;
            let units = signed >> bits.trailing_zeros();
            ea = ea.wrapping_add((units as u64).wrapping_mul(size as u64))
                & address_mask(state, instr);
            (signed as u64) & (bits - 1)
        } else {
            offset & (bits - 1)
        };
        let mut v = mem.read(seg, ea, size)?;
        match op {
            BitOp::Test => {}
            _ if instr.has_lock_prefix() => loop {
                let found = mem.compare_exchange(seg, ea, size, v, apply(v, bit))?;
                if found == v {
                    break;
                }
                v = found;
            },
            _ => mem.write(seg, ea, size, apply(v, bit))?,
        }
        (v >> bit) & 1
    };
    state.set_flag(CF, old != 0);
    Ok(())
}

/// BSF/BSR/POPCNT/LZCNT/TZCNT.
fn bit_scan<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let size = operand_size(instr, 0);
    let bits = (size * 8) as u32;
    let src = read_operand(state, mem, instr, 1)? & mask(size);
    match instr.mnemonic() {
        Mnemonic::Bsf | Mnemonic::Bsr => {
            if src == 0 {
                // The destination keeps its value (what Intel and AMD parts do).
                state.rflags |= ZF;
                return Ok(());
            }
            let index = if instr.mnemonic() == Mnemonic::Bsf {
                src.trailing_zeros()
            } else {
                63 - src.leading_zeros()
            };
            write_operand(state, mem, instr, 0, u64::from(index))?;
            state.rflags &= !ZF;
        }
        Mnemonic::Popcnt => {
            write_operand(state, mem, instr, 0, u64::from(src.count_ones()))?;
            state.rflags &= !STATUS_FLAGS;
            state.set_flag(ZF, src == 0);
        }
        mn => {
            let count = if mn == Mnemonic::Lzcnt {
                src.leading_zeros() - (64 - bits)
            } else {
                src.trailing_zeros().min(bits)
            };
            write_operand(state, mem, instr, 0, u64::from(count))?;
            state.set_flag(CF, src == 0);
            state.set_flag(ZF, count == 0);
        }
    }
    Ok(())
}

/// CMOVcc: the source is always read, and a 32-bit destination is zero-extended even when
/// the condition is false.
fn cmov<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let v = read_operand(state, mem, instr, 1)?;
    let reg = instr.op0_register();
    if alu::condition(instr.condition_code(), state.rflags) {
        state.write_gpr(reg, v);
    } else if reg.size() == 4 {
        let old = state.read_gpr(reg).ok_or(UD)?;
        state.write_gpr(reg, old);
    }
    Ok(())
}

fn flag_op(state: &mut CpuState, flag: u64, value: Option<bool>) -> ExResult<()> {
    match value {
        Some(on) => state.set_flag(flag, on),
        None => state.rflags ^= flag,
    }
    Ok(())
}

fn xlat<M: DataAccess>(state: &mut CpuState, mem: &mut M, instr: &Instruction) -> ExResult<()> {
    let base = state.read_gpr(instr.memory_base()).unwrap_or(0);
    let ea = base.wrapping_add(state.gpr[0] & 0xff) & mask(instr.memory_base().size().max(2));
    let v = mem.read(memory_segment(instr), ea, 1)?;
    state.write_gpr(Register::AL, v);
    Ok(())
}

/// The BCD adjustments (32-bit and 16-bit code only; iced rejects them in 64-bit code).
fn decimal_adjust(state: &mut CpuState, instr: &Instruction) -> ExResult<()> {
    let al = state.gpr[0] & 0xff;
    let ah = (state.gpr[0] >> 8) & 0xff;
    let af = state.rflags & AF != 0;
    let cf = state.rflags & CF != 0;
    let rf = state.rflags;
    match instr.mnemonic() {
        Mnemonic::Aaa | Mnemonic::Aas => {
            let adjust = al & 0xf > 9 || af;
            let ax = state.gpr[0] & 0xffff;
            let ax = if !adjust {
                ax
            } else if instr.mnemonic() == Mnemonic::Aaa {
                ax.wrapping_add(0x106)
            } else {
                let new_al = al.wrapping_sub(6) & 0xff;
                let new_ah = ah.wrapping_sub(1) & 0xff;
                (new_ah << 8) | new_al
            };
            let ax = ax & 0xff0f;
            state.write_gpr(Register::AX, ax);
            let mut f = (rf & !(AF | CF)) | if adjust { AF | CF } else { 0 };
            // SF/ZF/PF are undefined; reflect AL like current parts.
            f = (f & !(SF | ZF | PF)) | (alu::szp(ax & 0xff, 1) & (ZF | PF));
            state.rflags = f;
        }
        Mnemonic::Daa | Mnemonic::Das => {
            let daa = instr.mnemonic() == Mnemonic::Daa;
            let mut new_al = al;
            let mut new_cf = false;
            let mut new_af = false;
            if al & 0xf > 9 || af {
                if daa {
                    new_al = (al + 6) & 0xff;
                    new_cf = cf || al + 6 > 0xff;
                } else {
                    new_al = al.wrapping_sub(6) & 0xff;
                    new_cf = cf || al < 6;
                }
                new_af = true;
            }
            if al > 0x99 || cf {
                new_al = if daa {
                    (new_al + 0x60) & 0xff
                } else {
                    new_al.wrapping_sub(0x60) & 0xff
                };
                new_cf = true;
            }
            state.write_gpr(Register::AL, new_al);
            let mut f = (rf & !STATUS_FLAGS) | alu::szp(new_al, 1);
            if new_cf {
                f |= CF;
            }
            if new_af {
                f |= AF;
            }
            state.rflags = f;
        }
        Mnemonic::Aam => {
            let base = u64::from(instr.immediate8());
            if base == 0 {
                return Err(Exception::DivideError);
            }
            let new_al = al % base;
            state.write_gpr(Register::AX, ((al / base) << 8) | new_al);
            state.rflags = (rf & !STATUS_FLAGS) | alu::szp(new_al, 1);
        }
        Mnemonic::Aad => {
            let base = u64::from(instr.immediate8());
            let new_al = (al + ah * base) & 0xff;
            state.write_gpr(Register::AX, new_al);
            state.rflags = (rf & !STATUS_FLAGS) | alu::szp(new_al, 1);
        }
        _ => {
            // SALC
            state.write_gpr(Register::AL, if cf { 0xff } else { 0 });
        }
    }
    Ok(())
}
