//! Runs a sequence on the emu interpreter, the same way the CPU core does: `rip` is set to
//! the next instruction before the instruction group runs, the integer group is asked
//! first, then the SSE group.

use emu::access::DataAccess;
use emu::decode::Op;
use emu::exception::{ExResult, Exception};
use emu::exec::fast::Fast;
use emu::jit::{Exit, Jit, TestMemory};
use emu::state::{
    CpuState, Segment, CR0_ET, CR0_MP, CR0_NE, CR0_PE, CR0_PG, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_PAE,
    CS, EFER_LMA, EFER_LME, RFLAGS_FIXED, STATUS_FLAGS,
};
use iced_x86::Instruction;

use super::flags;
use super::gen::Init;
use super::native::{DATA_ADDR, DATA_SIZE};

/// The data buffer, mapped at the same address as on the host. Segment bases are zero
/// (64-bit mode, and the generator never uses FS/GS), so the offset is the address.
pub struct BufferMemory {
    pub bytes: Vec<u8>,
}

impl BufferMemory {
    fn range(&self, addr: u64, len: usize, write: bool) -> ExResult<std::ops::Range<usize>> {
        let canonical = ((addr as i64) << 16 >> 16) as u64 == addr;
        if !canonical {
            return Err(Exception::GeneralProtection(0));
        }
        let start = addr.wrapping_sub(DATA_ADDR);
        if addr < DATA_ADDR || start + len as u64 > DATA_SIZE as u64 {
            return Err(Exception::PageFault {
                error_code: 4 | if write { 2 } else { 0 },
                address: addr,
            });
        }
        Ok(start as usize..start as usize + len)
    }
}

impl DataAccess for BufferMemory {
    fn read(&mut self, _seg: usize, offset: u64, size: usize) -> ExResult<u64> {
        let r = self.range(offset, size, false)?;
        let mut b = [0u8; 8];
        b[..size].copy_from_slice(&self.bytes[r]);
        Ok(u64::from_le_bytes(b))
    }

    fn write(&mut self, _seg: usize, offset: u64, size: usize, value: u64) -> ExResult<()> {
        let r = self.range(offset, size, true)?;
        self.bytes[r].copy_from_slice(&value.to_le_bytes()[..size]);
        Ok(())
    }

    fn read_bytes(&mut self, _seg: usize, offset: u64, buf: &mut [u8]) -> ExResult<()> {
        let r = self.range(offset, buf.len(), false)?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write_bytes(&mut self, _seg: usize, offset: u64, buf: &[u8]) -> ExResult<()> {
        let r = self.range(offset, buf.len(), true)?;
        self.bytes[r].copy_from_slice(buf);
        Ok(())
    }

    fn compare_exchange(
        &mut self,
        seg: usize,
        offset: u64,
        size: usize,
        expected: u64,
        new: u64,
    ) -> ExResult<u64> {
        self.range(offset, size, true)?;
        let old = self.read(seg, offset, size)?;
        if old == expected {
            self.write(seg, offset, size, new)?;
        }
        Ok(old)
    }

    fn compare_exchange16(
        &mut self,
        seg: usize,
        offset: u64,
        expected: u128,
        new: u128,
    ) -> ExResult<u128> {
        let mut b = [0u8; 16];
        self.range(offset, 16, true)?;
        self.read_bytes(seg, offset, &mut b)?;
        let old = u128::from_le_bytes(b);
        if old == expected {
            self.write_bytes(seg, offset, &new.to_le_bytes())?;
        }
        Ok(old)
    }
}

/// 64-bit flat user mode, as the host runs the sequence.
pub fn initial_state(init: &Init) -> CpuState {
    let mut s = CpuState::power_on();
    s.efer = EFER_LME | EFER_LMA;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    let data = Segment {
        selector: 0x2b,
        base: 0,
        limit: 0xffff_ffff,
        type_: 3,
        s: true,
        dpl: 3,
        present: true,
        l: false,
        db: true,
        g: true,
        avl: false,
    };
    for seg in s.seg.iter_mut() {
        *seg = data;
    }
    s.seg[CS] = Segment {
        selector: 0x33,
        type_: 0xb,
        l: true,
        db: false,
        ..data
    };
    s.gpr = init.gpr;
    s.rflags = RFLAGS_FIXED | (1 << 9) | init.rflags;
    s.mxcsr = init.mxcsr;
    s.xmm = init.xmm;
    s
}

/// State after one instruction, for locating the first divergent instruction.
#[derive(Clone)]
pub struct Snapshot {
    pub state: CpuState,
    pub data: Vec<u8>,
    pub undefined_flags: u64,
}

pub struct Outcome {
    pub state: CpuState,
    pub data: Vec<u8>,
    /// Index of the faulting instruction and its exception; state is as before it.
    pub fault: Option<(usize, Exception)>,
    /// Index and mnemonic of an instruction no group implements.
    pub unimplemented: Option<(usize, String)>,
    /// Status flags undefined at the end (written last by an instruction that leaves them
    /// undefined).
    pub undefined_flags: u64,
    /// One snapshot per completed instruction, when asked for.
    pub steps: Vec<Snapshot>,
}

/// One instruction through the instruction groups, as the core's dispatcher does.
///
/// An instruction that the decode cache lowers to a fast form runs both ways: the fast
/// form must leave exactly the state, memory and fault of the generic path (which the
/// caller then checks against the host CPU).
fn execute(
    state: &mut CpuState,
    mem: &mut BufferMemory,
    instr: &Instruction,
) -> Option<ExResult<()>> {
    let fast = emu::exec::fast::lower(instr, 64);
    let before = (fast != Fast::Generic).then(|| (state.clone(), mem.bytes.clone()));
    let generic = emu::exec::integer::execute(state, mem, instr)
        .or_else(|| emu::exec::sse::execute(state, mem, instr));
    if let Some((mut fast_state, bytes)) = before {
        let mut fast_mem = BufferMemory { bytes };
        let r = emu::exec::fast::execute(&fast, &mut fast_state, &mut fast_mem, false);
        assert_eq!(Some(r), generic, "fast form {fast:?} of `{instr}`: result");
        assert_eq!(
            &fast_state, state,
            "fast form {fast:?} of `{instr}`: registers"
        );
        assert!(
            fast_mem.bytes == mem.bytes,
            "fast form {fast:?} of `{instr}`: memory"
        );
    }
    generic
}

/// One instruction to its end: an implementation may run a REP instruction in chunks,
/// leaving RIP at the instruction to resume it, and the core then simply executes it again.
/// None if no group implements it; on a fault RIP is back at the instruction.
fn step(state: &mut CpuState, mem: &mut BufferMemory, instr: &Instruction) -> Option<ExResult<()>> {
    for _ in 0..10_000 {
        state.rip = instr.next_ip();
        match execute(state, mem, instr)? {
            Err(e) => {
                state.rip = instr.ip();
                return Some(Err(e));
            }
            Ok(()) if state.rip != instr.ip() => break,
            Ok(()) => {}
        }
    }
    Some(Ok(()))
}

/// The fast forms of a straight-line sequence after the dead-flag pass, as one decoded
/// block holds them; None if the sequence branches (a block stops at a taken branch).
fn block_forms(instrs: &[Instruction]) -> Option<Vec<Fast>> {
    if instrs
        .iter()
        .any(|i| i.flow_control() != iced_x86::FlowControl::Next)
    {
        return None;
    }
    let mut fasts: Vec<Fast> = instrs
        .iter()
        .map(|i| emu::exec::fast::lower(i, 64))
        .collect();
    emu::exec::fast::prune_dead_flags(&mut fasts);
    Some(fasts)
}

pub fn run(init: &Init, instrs: &[Instruction], snapshots: bool) -> Outcome {
    let mut state = initial_state(init);
    let mut mem = BufferMemory {
        bytes: init.data.clone(),
    };
    let mut undefined = 0u64;
    let mut fault = None;
    let mut unimplemented = None;
    let mut steps = Vec::new();
    'seq: for (i, instr) in instrs.iter().enumerate() {
        let (written, undef) = flags::effect(instr, &state);
        match step(&mut state, &mut mem, instr) {
            None => {
                unimplemented = Some((i, format!("{:?}", instr.mnemonic()).to_lowercase()));
                break 'seq;
            }
            Some(Err(e)) => {
                fault = Some((i, e));
                break 'seq;
            }
            Some(Ok(())) => {}
        }
        undefined = (undefined & !written) | (undef & STATUS_FLAGS);
        if snapshots {
            steps.push(Snapshot {
                state: state.clone(),
                data: mem.bytes.clone(),
                undefined_flags: undefined,
            });
        }
    }
    if unimplemented.is_none() {
        check_as_one_block(init, instrs, fault.map(|(i, _)| i), &state, &mem.bytes);
    }
    Outcome {
        state,
        data: mem.bytes,
        fault,
        unimplemented,
        undefined_flags: undefined,
        steps,
    }
}

/// The end state, memory and fault of a sequence.
pub type Ending = (CpuState, Vec<u8>, Option<(usize, Exception)>);

/// The sequence as compiled code (`emu::jit`) runs it, as one block, with the interpreter
/// going on wherever the compiled code stops (a form it does not compile, or a memory
/// access that needs the interpreter: a fault, a page-crossing access). None when the
/// sequence branches or nothing of it compiles.
pub fn run_compiled(init: &Init, instrs: &[Instruction]) -> Option<Ending> {
    let fasts = block_forms(instrs)?;
    let ops: Vec<Op> = instrs
        .iter()
        .zip(&fasts)
        .map(|(i, f)| Op::new(i, *f))
        .collect();
    let mut jit = Jit::new(0)?;
    let (code, _) = jit.compile(instrs, &ops).ok()??;
    let mut state = initial_state(init);
    let mut mem = BufferMemory {
        bytes: init.data.clone(),
    };
    // SAFETY: the buffer is DATA_SIZE bytes (a page multiple) and outlives the run; it is
    // not otherwise touched while the compiled code runs.
    let view = unsafe { TestMemory::new(DATA_ADDR, mem.bytes.as_mut_ptr(), DATA_SIZE) };
    // SAFETY: code from this Jit; the context describes the buffer above.
    let mut ctx = view.ctx(instrs.len() as u64);
    let from = match unsafe { jit.run(code, &mut state, &mut ctx) } {
        Exit::Done => instrs.len(),
        Exit::Interpret(k) => k as usize,
    };
    // Every instruction before the exit ran once, as the budget shows.
    assert_eq!(
        instrs.len() as u64 - ctx.budget,
        from as u64,
        "instructions run"
    );
    for (i, instr) in instrs.iter().enumerate().skip(from) {
        if let Err(e) = step(&mut state, &mut mem, instr)? {
            return Some((state, mem.bytes, Some((i, e))));
        }
    }
    Some((state, mem.bytes, None))
}

/// The sequence as the decode cache runs it, as one block after the dead-flag pass
/// (`fast::prune_dead_flags`): where it ends (at its end or before a faulting instruction),
/// registers, every flag and memory must be exactly those of the instruction-by-instruction
/// run. Sequences with branches are left out (a block stops at a taken one).
fn check_as_one_block(
    init: &Init,
    instrs: &[Instruction],
    fault_at: Option<usize>,
    expected: &CpuState,
    expected_data: &[u8],
) {
    let Some(fasts) = block_forms(instrs) else {
        return;
    };
    let mut state = initial_state(init);
    let mut mem = BufferMemory {
        bytes: init.data.clone(),
    };
    for (i, (instr, fast)) in instrs.iter().zip(&fasts).enumerate() {
        for _ in 0..10_000 {
            state.rip = instr.next_ip();
            let r = if *fast == Fast::Generic {
                emu::exec::integer::execute(&mut state, &mut mem, instr)
                    .or_else(|| emu::exec::sse::execute(&mut state, &mut mem, instr))
            } else {
                Some(emu::exec::fast::execute(fast, &mut state, &mut mem, false))
            };
            if fault_at == Some(i) {
                // The fault leaves what the instruction did before it (MXCSR flags of an
                // unmasked SSE exception, say) and RIP at the instruction.
                assert!(
                    matches!(r, Some(Err(_))),
                    "`{instr}` as part of a block: {r:?}"
                );
                state.rip = instr.ip();
                break;
            }
            assert!(
                matches!(r, Some(Ok(()))),
                "`{instr}` as part of a block: {r:?}"
            );
            if state.rip != instr.ip() {
                break;
            }
        }
        if fault_at == Some(i) {
            break;
        }
    }
    assert_eq!(
        &state, expected,
        "the sequence as one block (flags pruned: {fasts:?})"
    );
    assert!(
        mem.bytes == expected_data,
        "the sequence as one block: memory"
    );
}
