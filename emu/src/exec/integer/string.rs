//! MOVS/STOS/LODS/SCAS/CMPS with REP/REPE/REPNE.
//!
//! rSI, rDI and rCX are sized by the address size; the source segment can be overridden,
//! the destination is always ES. REP MOVS/STOS copy in bulk (page-bounded chunks through
//! `read_bytes`/`write_bytes`) when that is indistinguishable from element-wise execution;
//! any chunk that faults is redone element by element, so a fault leaves the registers at
//! the faulting iteration and the instruction restarts there. A long REP yields after a
//! work budget by pointing RIP back at itself, so the core can take interrupts.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::alu::{self, mask};
use crate::access::{memory_segment, DataAccess};
use crate::exception::ExResult;
use crate::state::{CpuState, DF, ES, FS, STATUS_FLAGS, ZF};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Movs,
    Stos,
    Lods,
    Scas,
    Cmps,
}

/// Largest bulk chunk (also bounded by the page of each offset).
const CHUNK: usize = 4096;
/// Work units a REP runs before yielding (one per element, one per 16 bulk elements).
const BUDGET: u64 = 1 << 16;

struct Operation {
    kind: Kind,
    /// Element size in bytes.
    size: usize,
    /// Address-size mask for rSI/rDI/rCX.
    amask: u64,
    src_seg: usize,
}

pub(super) fn execute<M: DataAccess>(
    state: &mut CpuState,
    mem: &mut M,
    instr: &Instruction,
) -> ExResult<()> {
    use Mnemonic as Mn;
    let (kind, size) = match instr.mnemonic() {
        Mn::Movsb => (Kind::Movs, 1),
        Mn::Movsw => (Kind::Movs, 2),
        Mn::Movsd => (Kind::Movs, 4),
        Mn::Movsq => (Kind::Movs, 8),
        Mn::Stosb => (Kind::Stos, 1),
        Mn::Stosw => (Kind::Stos, 2),
        Mn::Stosd => (Kind::Stos, 4),
        Mn::Stosq => (Kind::Stos, 8),
        Mn::Lodsb => (Kind::Lods, 1),
        Mn::Lodsw => (Kind::Lods, 2),
        Mn::Lodsd => (Kind::Lods, 4),
        Mn::Lodsq => (Kind::Lods, 8),
        Mn::Scasb => (Kind::Scas, 1),
        Mn::Scasw => (Kind::Scas, 2),
        Mn::Scasd => (Kind::Scas, 4),
        Mn::Scasq => (Kind::Scas, 8),
        Mn::Cmpsb => (Kind::Cmps, 1),
        Mn::Cmpsw => (Kind::Cmps, 2),
        Mn::Cmpsd => (Kind::Cmps, 4),
        _ => (Kind::Cmps, 8),
    };
    let mut asize = 8;
    for i in 0..instr.op_count() {
        match instr.op_kind(i) {
            OpKind::MemorySegSI | OpKind::MemoryESDI | OpKind::MemorySegDI => asize = 2,
            OpKind::MemorySegESI | OpKind::MemoryESEDI | OpKind::MemorySegEDI => asize = 4,
            _ => {}
        }
    }
    let op = Operation {
        kind,
        size,
        amask: mask(asize),
        src_seg: memory_segment(instr),
    };
    let rep = instr.has_rep_prefix() || instr.has_repne_prefix();
    if !rep {
        return step(state, mem, &op);
    }
    // For CMPS/SCAS: F3 repeats while equal, F2 while not equal.
    let until_zf = match kind {
        Kind::Scas | Kind::Cmps => Some(instr.has_repne_prefix()),
        _ => None,
    };
    let mut budget = BUDGET;
    let mut bulk_ok = matches!(kind, Kind::Movs | Kind::Stos);
    loop {
        let count = state.gpr[1] & op.amask;
        if count == 0 {
            return Ok(());
        }
        if budget == 0 {
            // Resume later: the core re-executes this instruction.
            let ip_mask = match state.bitness() {
                64 => u64::MAX,
                32 => 0xffff_ffff,
                _ => 0xffff,
            };
            state.rip = state.rip.wrapping_sub(instr.len() as u64) & ip_mask;
            return Ok(());
        }
        if bulk_ok && count > 1 {
            match bulk(state, mem, &op, count) {
                Bulk::Done(done) => {
                    set_sized(state, 1, count - done, op.amask);
                    budget = budget.saturating_sub(done / 16 + 1);
                    continue;
                }
                Bulk::Unsuitable => {}
                // Redo element by element to find the faulting iteration.
                Bulk::Faulted => bulk_ok = false,
            }
        }
        step(state, mem, &op)?;
        set_sized(state, 1, count - 1, op.amask);
        budget -= 1;
        if let Some(stop_on_zero_flag) = until_zf {
            if (state.rflags & ZF != 0) == stop_on_zero_flag {
                return Ok(());
            }
        }
    }
}

/// Write register `index` under the address-size mask (32-bit writes zero-extend).
#[inline(always)]
fn set_sized(state: &mut CpuState, index: usize, value: u64, amask: u64) {
    state.gpr[index] = if amask == 0xffff {
        (state.gpr[index] & !0xffff) | (value & 0xffff)
    } else {
        value & amask
    };
}

#[inline(always)]
fn advance(state: &mut CpuState, index: usize, op: &Operation, elements: u64) {
    let delta = (op.size as u64).wrapping_mul(elements);
    let v = if state.rflags & DF != 0 {
        state.gpr[index].wrapping_sub(delta)
    } else {
        state.gpr[index].wrapping_add(delta)
    };
    set_sized(state, index, v, op.amask);
}

/// One iteration; registers and flags change only after its accesses succeeded.
fn step<M: DataAccess>(state: &mut CpuState, mem: &mut M, op: &Operation) -> ExResult<()> {
    let si = state.gpr[6] & op.amask;
    let di = state.gpr[7] & op.amask;
    let m = mask(op.size);
    match op.kind {
        Kind::Movs => {
            let v = mem.read(op.src_seg, si, op.size)?;
            mem.write(ES, di, op.size, v)?;
            advance(state, 6, op, 1);
            advance(state, 7, op, 1);
        }
        Kind::Stos => {
            mem.write(ES, di, op.size, state.gpr[0] & m)?;
            advance(state, 7, op, 1);
        }
        Kind::Lods => {
            let v = mem.read(op.src_seg, si, op.size)?;
            write_accumulator(state, v, op.size);
            advance(state, 6, op, 1);
        }
        Kind::Scas => {
            let v = mem.read(ES, di, op.size)?;
            let f = alu::sub(state.gpr[0], v, false, op.size, state.rflags).1;
            state.rflags = (state.rflags & !STATUS_FLAGS) | (f & STATUS_FLAGS);
            advance(state, 7, op, 1);
        }
        Kind::Cmps => {
            let a = mem.read(op.src_seg, si, op.size)?;
            let b = mem.read(ES, di, op.size)?;
            let f = alu::sub(a, b, false, op.size, state.rflags).1;
            state.rflags = (state.rflags & !STATUS_FLAGS) | (f & STATUS_FLAGS);
            advance(state, 6, op, 1);
            advance(state, 7, op, 1);
        }
    }
    Ok(())
}

fn write_accumulator(state: &mut CpuState, v: u64, size: usize) {
    let old = state.gpr[0];
    state.gpr[0] = match size {
        1 => (old & !0xff) | (v & 0xff),
        2 => (old & !0xffff) | (v & 0xffff),
        4 => v & 0xffff_ffff,
        _ => v,
    };
}

/// Segment base for the overlap check (64-bit code ignores all but FS/GS bases).
fn linear_base(state: &CpuState, seg: usize) -> u64 {
    if state.code64() && seg < FS {
        0
    } else {
        state.seg.get(seg).map_or(0, |s| s.base)
    }
}

/// Elements (at most `room` bytes' worth) that fit between `offset` and the end of its
/// page in the direction of travel.
fn page_room(offset: u64, size: usize, down: bool) -> u64 {
    let within = offset & 0xfff;
    if down {
        within / size as u64 + 1
    } else {
        (0x1000 - within) / size as u64
    }
}

enum Bulk {
    /// This many elements were done (registers updated except rCX).
    Done(u64),
    /// Too little room for a chunk here; nothing changed.
    Unsuitable,
    /// An access faulted; nothing changed.
    Faulted,
}

/// Copy or fill up to a chunk in one go.
fn bulk<M: DataAccess>(state: &mut CpuState, mem: &mut M, op: &Operation, count: u64) -> Bulk {
    let down = state.rflags & DF != 0;
    let size = op.size;
    let es = size as u64;
    let si = state.gpr[6] & op.amask;
    let di = state.gpr[7] & op.amask;
    let mut n = count
        .min((CHUNK / size) as u64)
        .min(page_room(di, size, down));
    if op.kind == Kind::Movs {
        n = n.min(page_room(si, size, down));
        // Element-wise copying smears overlapping data forward (or backward with DF=1);
        // a chunk must not read what it writes.
        let src = linear_base(state, op.src_seg).wrapping_add(si);
        let dst = linear_base(state, ES).wrapping_add(di);
        let distance = if down {
            src.wrapping_sub(dst)
        } else {
            dst.wrapping_sub(src)
        };
        if distance != 0 && distance < n * es {
            n = distance / es;
        }
    }
    if n < 2 {
        return Bulk::Unsuitable;
    }
    let bytes = (n * es) as usize;
    let span = (n - 1) * es;
    let di_start = if down { di.wrapping_sub(span) } else { di };
    let mut buf = [0u8; CHUNK];
    let chunk = &mut buf[..bytes];
    if op.kind == Kind::Movs {
        let si_start = if down { si.wrapping_sub(span) } else { si };
        if mem.read_bytes(op.src_seg, si_start, chunk).is_err() {
            return Bulk::Faulted;
        }
    } else {
        let pattern = state.gpr[0].to_le_bytes();
        for element in chunk.chunks_exact_mut(size) {
            element.copy_from_slice(&pattern[..size]);
        }
    }
    if mem.write_bytes(ES, di_start, chunk).is_err() {
        return Bulk::Faulted;
    }
    if op.kind == Kind::Movs {
        advance(state, 6, op, n);
    }
    advance(state, 7, op, n);
    Bulk::Done(n)
}
