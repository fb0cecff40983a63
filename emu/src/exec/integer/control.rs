//! Near branches and stack instructions.

use iced_x86::{Code, Instruction, MemorySize, OpKind, Register};

use super::alu::mask;
use super::UD;
use crate::access::{effective_address, memory_segment, operand_size, peek, pop, push, DataAccess};
use crate::exception::{ExResult, Exception};
use crate::state::{CpuState, CS, SS, ZF};

/// Stack-pointer width mask: RSP in 64-bit code, else SS.B picks ESP or SP.
pub(super) fn stack_mask(state: &CpuState) -> u64 {
    if state.code64() {
        u64::MAX
    } else if state.seg[SS].db {
        0xffff_ffff
    } else {
        0xffff
    }
}

/// Stack pointer with `delta` added, merged under the stack width.
fn moved_sp(state: &CpuState, delta: u64) -> u64 {
    let m = stack_mask(state);
    let rsp = state.gpr[4];
    (rsp & !m) | (rsp.wrapping_add(delta) & m)
}

/// A near branch target must be canonical in 64-bit code and within CS's limit elsewhere;
/// the branch then faults with RIP still at the branch.
fn check_target(state: &CpuState, target: u64) -> ExResult<()> {
    let ok = if state.code64() {
        ((target as i64) << 16) >> 16 == target as i64
    } else {
        target <= u64::from(state.seg[CS].limit)
    };
    if ok {
        Ok(())
    } else {
        Err(Exception::GeneralProtection(0))
    }
}

pub(super) fn jump(state: &mut CpuState, target: u64) -> ExResult<()> {
    check_target(state, target)?;
    state.rip = target;
    Ok(())
}

fn is_far_memory(instr: &Instruction) -> bool {
    matches!(
        instr.memory_size(),
        MemorySize::SegPtr16 | MemorySize::SegPtr32 | MemorySize::SegPtr64
    )
}

/// Target of a JMP/CALL, with the operand size (the return address size for CALL).
/// None for far forms, which the core handles.
fn branch_target<M: DataAccess>(
    state: &CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> Option<ExResult<(u64, usize)>> {
    match instr.op0_kind() {
        OpKind::NearBranch16 => Some(Ok((instr.near_branch_target(), 2))),
        OpKind::NearBranch32 => Some(Ok((instr.near_branch_target(), 4))),
        OpKind::NearBranch64 => Some(Ok((instr.near_branch_target(), 8))),
        OpKind::Register => {
            let reg = instr.op0_register();
            Some(state.read_gpr(reg).ok_or(UD).map(|v| (v, reg.size())))
        }
        OpKind::Memory if !is_far_memory(instr) => {
            let size = instr.memory_size().size();
            let seg = memory_segment(instr);
            let ea = effective_address(state, instr);
            Some(mem.read(seg, ea, size).map(|v| (v, size)))
        }
        _ => None,
    }
}

pub(super) fn jmp<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> Option<ExResult<()>> {
    let target = branch_target(state, mem, instr)?;
    Some(target.and_then(|(target, _)| jump(state, target)))
}

pub(super) fn call<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> Option<ExResult<()>> {
    let target = branch_target(state, mem, instr)?;
    Some(target.and_then(|(target, size)| {
        check_target(state, target)?;
        push(state, mem, instr.next_ip() & mask(size), size)?;
        state.rip = target;
        Ok(())
    }))
}

pub(super) fn ret<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<()> {
    let (size, release) = match instr.code() {
        Code::Retnw => (2, 0),
        Code::Retnd => (4, 0),
        Code::Retnq => (8, 0),
        Code::Retnw_imm16 => (2, instr.immediate16()),
        Code::Retnd_imm16 => (4, instr.immediate16()),
        Code::Retnq_imm16 => (8, instr.immediate16()),
        _ => return Err(UD),
    };
    let target = peek(state, mem, 0, size)?;
    check_target(state, target)?;
    state.gpr[4] = moved_sp(state, size as u64 + u64::from(release));
    state.rip = target;
    Ok(())
}

/// LOOP/LOOPE/LOOPNE decrement the count register (sized by the address size) and branch;
/// JCXZ/JECXZ/JRCXZ only test it.
pub(super) fn loop_branch(state: &mut CpuState, instr: &Instruction) -> ExResult<()> {
    use Code as C;
    let (count_size, kind) = match instr.code() {
        C::Loop_rel8_16_CX | C::Loop_rel8_32_CX => (2, 0),
        C::Loop_rel8_16_ECX | C::Loop_rel8_32_ECX | C::Loop_rel8_64_ECX => (4, 0),
        C::Loop_rel8_16_RCX | C::Loop_rel8_64_RCX => (8, 0),
        C::Loope_rel8_16_CX | C::Loope_rel8_32_CX => (2, 1),
        C::Loope_rel8_16_ECX | C::Loope_rel8_32_ECX | C::Loope_rel8_64_ECX => (4, 1),
        C::Loope_rel8_16_RCX | C::Loope_rel8_64_RCX => (8, 1),
        C::Loopne_rel8_16_CX | C::Loopne_rel8_32_CX => (2, 2),
        C::Loopne_rel8_16_ECX | C::Loopne_rel8_32_ECX | C::Loopne_rel8_64_ECX => (4, 2),
        C::Loopne_rel8_16_RCX | C::Loopne_rel8_64_RCX => (8, 2),
        C::Jcxz_rel8_16 | C::Jcxz_rel8_32 => (2, 3),
        C::Jecxz_rel8_16 | C::Jecxz_rel8_32 | C::Jecxz_rel8_64 => (4, 3),
        C::Jrcxz_rel8_16 | C::Jrcxz_rel8_64 => (8, 3),
        _ => return Err(UD),
    };
    let m = mask(count_size);
    let zf = state.rflags & ZF != 0;
    let count = state.gpr[1] & m;
    let taken = if kind == 3 {
        count == 0
    } else {
        let next = count.wrapping_sub(1) & m;
        let taken = next != 0
            && match kind {
                1 => zf,
                2 => !zf,
                _ => true,
            };
        if taken {
            // Check before committing so that a faulting branch leaves rCX alone.
            check_target(state, instr.near_branch_target())?;
        }
        let reg = match count_size {
            2 => Register::CX,
            4 => Register::ECX,
            _ => Register::RCX,
        };
        state.write_gpr(reg, next);
        taken
    };
    if taken {
        jump(state, instr.near_branch_target())?;
    }
    Ok(())
}

fn is_segment(reg: Register) -> bool {
    CpuState::seg_index(reg).is_some()
}

pub(super) fn push_op<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> Option<ExResult<()>> {
    let result = match instr.op0_kind() {
        OpKind::Register => {
            let reg = instr.op0_register();
            if is_segment(reg) {
                return None;
            }
            match state.read_gpr(reg) {
                Some(v) => push(state, mem, v, reg.size()),
                None => Err(UD),
            }
        }
        OpKind::Memory => {
            let size = instr.memory_size().size();
            let ea = effective_address(state, instr);
            mem.read(memory_segment(instr), ea, size)
                .and_then(|v| push(state, mem, v, size))
        }
        _ => {
            let size = operand_size(instr, 0);
            crate::access::read_operand(state, mem, instr, 0)
                .and_then(|v| push(state, mem, v & mask(size), size))
        }
    };
    Some(result)
}

pub(super) fn pop_op<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> Option<ExResult<()>> {
    let result = match instr.op0_kind() {
        OpKind::Register => {
            let reg = instr.op0_register();
            if is_segment(reg) {
                return None;
            }
            pop(state, mem, reg.size()).map(|v| {
                state.write_gpr(reg, v);
            })
        }
        OpKind::Memory => pop_to_memory(state, mem, instr),
        _ => Err(UD),
    };
    Some(result)
}

/// POP r/m: an RSP-based address is computed after the increment; RSP changes only once
/// the store succeeded.
fn pop_to_memory<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<()> {
    let size = instr.memory_size().size();
    let value = peek(state, mem, 0, size)?;
    let old_sp = state.gpr[4];
    let new_sp = moved_sp(state, size as u64);
    state.gpr[4] = new_sp;
    let ea = effective_address(state, instr);
    state.gpr[4] = old_sp;
    mem.write(memory_segment(instr), ea, size, value)?;
    state.gpr[4] = new_sp;
    Ok(())
}

/// PUSHA/PUSHAD (not in 64-bit code).
pub(super) fn push_all<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<()> {
    let size = if instr.mnemonic() == iced_x86::Mnemonic::Pushad {
        4
    } else {
        2
    };
    let m = stack_mask(state);
    let sp = state.gpr[4] & m;
    let values = [0usize, 1, 2, 3, 4, 5, 6, 7].map(|i| state.gpr[i] & mask(size));
    for (n, value) in values.iter().enumerate() {
        let at = sp.wrapping_sub(((n + 1) * size) as u64) & m;
        mem.write(SS, at, size, *value)?;
    }
    state.gpr[4] = moved_sp(state, (8 * size as u64).wrapping_neg());
    Ok(())
}

/// POPA/POPAD: the saved SP is skipped.
pub(super) fn pop_all<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<()> {
    let size = if instr.mnemonic() == iced_x86::Mnemonic::Popad {
        4
    } else {
        2
    };
    let mut values = [0u64; 8];
    for (n, value) in values.iter_mut().enumerate() {
        *value = peek(state, mem, (n * size) as u64, size)?;
    }
    const REGS16: [Register; 8] = [
        Register::DI,
        Register::SI,
        Register::BP,
        Register::SP,
        Register::BX,
        Register::DX,
        Register::CX,
        Register::AX,
    ];
    const REGS32: [Register; 8] = [
        Register::EDI,
        Register::ESI,
        Register::EBP,
        Register::ESP,
        Register::EBX,
        Register::EDX,
        Register::ECX,
        Register::EAX,
    ];
    let regs = if size == 4 { &REGS32 } else { &REGS16 };
    for (reg, value) in regs.iter().zip(values.iter()) {
        if !matches!(reg, Register::SP | Register::ESP) {
            state.write_gpr(*reg, *value);
        }
    }
    state.gpr[4] = moved_sp(state, 8 * size as u64);
    Ok(())
}

/// ENTER imm16, imm8 with full nesting-level support.
pub(super) fn enter<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<()> {
    let size = match instr.code() {
        Code::Enterw_imm16_imm8 => 2,
        Code::Enterd_imm16_imm8 => 4,
        _ => 8,
    };
    let alloc = u64::from(instr.immediate16());
    let level = u64::from(instr.immediate8_2nd() & 31);
    let m = stack_mask(state);
    let mut sp = state.gpr[4] & m;
    let mut bp = state.gpr[5] & m;
    sp = sp.wrapping_sub(size as u64) & m;
    mem.write(SS, sp, size, state.gpr[5] & mask(size))?;
    let frame = sp;
    if level > 0 {
        for _ in 1..level {
            bp = bp.wrapping_sub(size as u64) & m;
            let v = mem.read(SS, bp, size)?;
            sp = sp.wrapping_sub(size as u64) & m;
            mem.write(SS, sp, size, v)?;
        }
        sp = sp.wrapping_sub(size as u64) & m;
        mem.write(SS, sp, size, frame)?;
    }
    sp = sp.wrapping_sub(alloc) & m;
    // rBP takes the frame pointer at the operand size.
    let bp_reg = match size {
        2 => Register::BP,
        4 => Register::EBP,
        _ => Register::RBP,
    };
    state.write_gpr(bp_reg, frame);
    state.gpr[4] = (state.gpr[4] & !m) | sp;
    Ok(())
}

/// LEAVE: rSP = rBP, then pop rBP.
pub(super) fn leave<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<()> {
    let size = match instr.code() {
        Code::Leavew => 2,
        Code::Leaved => 4,
        _ => 8,
    };
    let m = stack_mask(state);
    let sp = state.gpr[5] & m;
    let value = mem.read(SS, sp, size)?;
    state.gpr[4] = (state.gpr[4] & !m) | (sp.wrapping_add(size as u64) & m);
    let bp_reg = match size {
        2 => Register::BP,
        4 => Register::EBP,
        _ => Register::RBP,
    };
    state.write_gpr(bp_reg, value);
    Ok(())
}
