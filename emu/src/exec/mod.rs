//! Instruction semantics, one module per group. Each group's `execute` returns None for
//! instructions it does not implement; the core's dispatcher tries the groups in turn.

pub mod fast;
pub mod integer;
pub mod sse;
pub mod system;
pub mod x87;

use iced_x86::Instruction;

use crate::exception::{ExResult, Exception};
use crate::mmu::Mmu;
use crate::state::CpuState;
use system::SystemState;

/// Run one decoded instruction: the system group first (it owns the mode-dependent
/// forms of MOV/PUSH/POP/JMP/CALL), then integer, SSE and x87; #UD if nobody knows it.
/// After a system instruction the MMU's snapshot of the translation state is refreshed.
/// `may_be_system` false skips the system group (the decode cache ends blocks after
/// system instructions, so only a block's last instruction can be one).
#[inline]
pub fn execute(
    state: &mut CpuState,
    mmu: &mut Mmu,
    sys: &mut SystemState,
    instr: &Instruction,
    may_be_system: bool,
) -> ExResult<()> {
    // Matching the Ok case alone keeps the common path from copying the error payload.
    if may_be_system && system::handles(instr.code()) {
        if let Some(r) = system::execute(state, mmu, sys, instr) {
            mmu.sync(state);
            return r;
        }
    }
    match integer::execute(state, mmu, instr) {
        Some(Ok(())) => return Ok(()),
        Some(Err(e)) => return Err(e),
        None => {}
    }
    match sse::execute(state, mmu, instr) {
        Some(Ok(())) => return Ok(()),
        Some(Err(e)) => return Err(e),
        None => {}
    }
    match x87::execute(state, mmu, instr) {
        Some(Ok(())) => return Ok(()),
        Some(Err(e)) => return Err(e),
        None => {}
    }
    Err(Exception::InvalidOpcode)
}
