//! Privileged and mode-dependent instructions: control and debug registers, descriptor
//! tables, segment loads, far transfers, IRET, software interrupts, SYSCALL/SYSRET,
//! SYSENTER/SYSEXIT, MSRs, CPUID, the TSC, HLT, interrupt-flag handling and port I/O.
//!
//! Semantics follow the Intel SDM. Not modelled: task switches (task gates, far jumps to
//! a TSS, IRET with NT set: #GP), call gates (#GP), virtual-8086 mode, the TSS I/O
//! permission bitmap (port access from CPL > IOPL is #GP), debug-register breakpoints.

use std::sync::Arc;

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

use crate::access::{self, effective_address, memory_segment, read_operand, write_operand};
use crate::clock::VirtualClock;
use crate::exception::{ExResult, Exception};
use crate::mmu::{is_canonical, Mmu};
use crate::state::*;

/// Per-CPU state the system instructions and the run loop share, beside [`CpuState`].
pub struct SystemState {
    pub clock: Arc<VirtualClock>,
    pub apic_id: u32,
    pub num_cpus: u32,
    /// Added to the host-derived TSC (guest writes to IA32_TSC set it).
    pub tsc_offset: u64,
    /// MSR_KVM_SYSTEM_TIME_NEW value (GPA | enable bit).
    pub kvm_system_time: u64,
    pub kvm_wall_clock: u64,
    /// Version written into the last pvclock structure (even).
    pub kvmclock_version: u32,
    /// HLT executed: sleep until an event.
    pub halted: bool,
    /// Interrupts are blocked until after the next instruction (STI, MOV SS, POP SS).
    pub shadow: bool,
    /// NMIs are blocked until the next IRET.
    pub nmi_blocked: bool,
    /// Something that can unmask or raise an interrupt happened: recheck soon.
    pub recheck: bool,
    /// A software interrupt (INT n, INT3, INTO, INT1) to deliver after the instruction.
    pub software_interrupt: Option<SoftwareInterrupt>,
}

/// A software-initiated interrupt, delivered with RIP after the instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SoftwareInterrupt {
    pub vector: u8,
    /// INT n / INT3 / INTO check the gate's DPL against CPL; INT1 does not.
    pub check_dpl: bool,
}

impl SystemState {
    pub fn new(clock: Arc<VirtualClock>, apic_id: u32) -> Self {
        SystemState {
            clock,
            apic_id,
            num_cpus: 1,
            tsc_offset: 0,
            kvm_system_time: 0,
            kvm_wall_clock: 0,
            kvmclock_version: 0,
            halted: false,
            shadow: false,
            nmi_blocked: false,
            recheck: false,
            software_interrupt: None,
        }
    }

    /// The guest's TSC.
    pub fn tsc(&self) -> u64 {
        self.clock.tsc().wrapping_add(self.tsc_offset)
    }
}

// ---------------------------------------------------------------------------------------
// Descriptors and segment loads
// ---------------------------------------------------------------------------------------

/// Decode an 8-byte segment descriptor into a segment-register cache.
pub fn parse_descriptor(raw: u64, selector: u16) -> Segment {
    let hi = (raw >> 32) as u32;
    let lo = raw as u32;
    let mut limit = (lo & 0xffff) | (hi & 0xf_0000);
    let g = hi & (1 << 23) != 0;
    if g {
        limit = (limit << 12) | 0xfff;
    }
    Segment {
        selector,
        base: u64::from((lo >> 16) | ((hi & 0xff) << 16) | (hi & 0xff00_0000)),
        limit,
        type_: ((hi >> 8) & 0xf) as u8,
        s: hi & (1 << 12) != 0,
        dpl: ((hi >> 13) & 3) as u8,
        present: hi & (1 << 15) != 0,
        avl: hi & (1 << 20) != 0,
        l: hi & (1 << 21) != 0,
        db: hi & (1 << 22) != 0,
        g,
    }
}

/// Read the descriptor `selector` names. Returns (raw descriptor, its linear address).
/// Beyond the table limit: #GP(selector).
pub fn fetch_descriptor(state: &CpuState, mmu: &mut Mmu, selector: u16) -> ExResult<(u64, u64)> {
    let index = u64::from(selector & !7);
    let (base, limit) = if selector & 4 != 0 {
        if !state.ldtr.present || state.ldtr.selector & !3 == 0 {
            return Err(Exception::GeneralProtection(selector & !3));
        }
        (state.ldtr.base, u64::from(state.ldtr.limit))
    } else {
        (state.gdtr.base, u64::from(state.gdtr.limit))
    };
    if index + 7 > limit {
        return Err(Exception::GeneralProtection(selector & !3));
    }
    let addr = base.wrapping_add(index);
    Ok((mmu.read_linear(addr, 8, false)?, addr))
}

/// Read a 16-byte system descriptor (LDT/TSS in long mode) from the GDT.
fn fetch_system_descriptor(
    state: &CpuState,
    mmu: &mut Mmu,
    selector: u16,
) -> ExResult<(Segment, u64, u64)> {
    if selector & 4 != 0 {
        return Err(Exception::GeneralProtection(selector & !3));
    }
    let (raw, addr) = fetch_descriptor(state, mmu, selector)?;
    let mut seg = parse_descriptor(raw, selector);
    if state.long_mode() {
        if u64::from(selector & !7) + 15 > u64::from(state.gdtr.limit) {
            return Err(Exception::GeneralProtection(selector & !3));
        }
        let high = mmu.read_linear(addr.wrapping_add(8), 8, false)?;
        seg.base |= (high & 0xffff_ffff) << 32;
    }
    Ok((seg, raw, addr))
}

/// Set the accessed bit of a code/data descriptor in memory.
fn set_accessed(mmu: &mut Mmu, addr: u64, raw: u64) -> ExResult<()> {
    if raw & (1 << 40) == 0 {
        mmu.write_linear(
            addr.wrapping_add(5),
            1,
            ((raw >> 40) as u8 | 1).into(),
            false,
        )?;
    }
    Ok(())
}

/// A null selector loaded into a data segment register: unusable.
fn null_segment(selector: u16) -> Segment {
    Segment {
        selector,
        present: false,
        ..Default::default()
    }
}

/// Load DS/ES/FS/GS/SS with the checks of MOV/POP/LxS (not CS).
pub fn load_segment(
    state: &mut CpuState,
    mmu: &mut Mmu,
    seg: usize,
    selector: u16,
) -> ExResult<()> {
    if !state.protected_mode() || state.flag(VM) {
        let s = &mut state.seg[seg];
        s.selector = selector;
        s.base = u64::from(selector) << 4;
        // The other cached attributes stay (unreal mode), as on hardware.
        s.present = true;
        return Ok(());
    }
    let cpl = state.cpl();
    let rpl = (selector & 3) as u8;
    if selector & !3 == 0 {
        if seg == SS && !(state.code64() && cpl != 3 && rpl == cpl) {
            return Err(Exception::GeneralProtection(0));
        }
        state.seg[seg] = null_segment(selector);
        if seg == SS {
            state.seg[SS].dpl = cpl;
            state.seg[SS].db = true;
        }
        return Ok(());
    }
    let (raw, addr) = fetch_descriptor(state, mmu, selector)?;
    let d = parse_descriptor(raw, selector);
    let code = d.type_ & 8 != 0;
    let err = selector & !3;
    if seg == SS {
        if rpl != cpl || !d.s || code || d.type_ & 2 == 0 || d.dpl != cpl {
            return Err(Exception::GeneralProtection(err));
        }
        if !d.present {
            return Err(Exception::StackFault(err));
        }
    } else {
        if !d.s || (code && d.type_ & 2 == 0) {
            return Err(Exception::GeneralProtection(err));
        }
        let conforming_code = code && d.type_ & 4 != 0;
        if !conforming_code && d.dpl < cpl.max(rpl) {
            return Err(Exception::GeneralProtection(err));
        }
        if !d.present {
            return Err(Exception::SegmentNotPresent(err));
        }
    }
    set_accessed(mmu, addr, raw)?;
    let mut d = d;
    d.type_ |= 1;
    state.seg[seg] = d;
    Ok(())
}

/// Check and parse the code segment of a far JMP/CALL target at privilege `cpl`.
fn far_code_segment(state: &CpuState, mmu: &mut Mmu, selector: u16) -> ExResult<Segment> {
    let cpl = state.cpl();
    let err = selector & !3;
    if err == 0 {
        return Err(Exception::GeneralProtection(0));
    }
    let (raw, addr) = fetch_descriptor(state, mmu, selector)?;
    let d = parse_descriptor(raw, selector);
    if !d.s || d.type_ & 8 == 0 {
        // Call gates, task gates and TSSs are not modelled.
        tracing::warn!(
            selector,
            "far transfer through a system descriptor is not supported"
        );
        return Err(Exception::GeneralProtection(err));
    }
    let rpl = (selector & 3) as u8;
    if d.type_ & 4 != 0 {
        if d.dpl > cpl {
            return Err(Exception::GeneralProtection(err));
        }
    } else if rpl > cpl || d.dpl != cpl {
        return Err(Exception::GeneralProtection(err));
    }
    if !d.present {
        return Err(Exception::SegmentNotPresent(err));
    }
    if state.long_mode() && d.l && d.db {
        return Err(Exception::GeneralProtection(err));
    }
    set_accessed(mmu, addr, raw)?;
    let mut d = d;
    d.type_ |= 1;
    d.selector = (selector & !3) | u16::from(cpl);
    Ok(d)
}

/// Check and parse the code segment a far RET/IRET returns to (RPL = new CPL).
fn return_code_segment(state: &CpuState, mmu: &mut Mmu, selector: u16) -> ExResult<Segment> {
    let cpl = state.cpl();
    let rpl = (selector & 3) as u8;
    let err = selector & !3;
    if err == 0 {
        return Err(Exception::GeneralProtection(0));
    }
    let (raw, addr) = fetch_descriptor(state, mmu, selector)?;
    let d = parse_descriptor(raw, selector);
    if !d.s || d.type_ & 8 == 0 || rpl < cpl {
        return Err(Exception::GeneralProtection(err));
    }
    if d.type_ & 4 != 0 {
        if d.dpl > rpl {
            return Err(Exception::GeneralProtection(err));
        }
    } else if d.dpl != rpl {
        return Err(Exception::GeneralProtection(err));
    }
    if !d.present {
        return Err(Exception::SegmentNotPresent(err));
    }
    if state.long_mode() && d.l && d.db {
        return Err(Exception::GeneralProtection(err));
    }
    set_accessed(mmu, addr, raw)?;
    let mut d = d;
    d.type_ |= 1;
    Ok(d)
}

/// Check and parse the stack segment a return to an outer ring loads.
fn return_stack_segment(
    state: &CpuState,
    mmu: &mut Mmu,
    selector: u16,
    new_cpl: u8,
    to_64bit: bool,
) -> ExResult<Segment> {
    let err = selector & !3;
    if err == 0 {
        if to_64bit && new_cpl != 3 && (selector & 3) as u8 == new_cpl {
            let mut s = null_segment(selector);
            s.dpl = new_cpl;
            s.db = true;
            return Ok(s);
        }
        return Err(Exception::GeneralProtection(0));
    }
    let (raw, addr) = fetch_descriptor(state, mmu, selector)?;
    let d = parse_descriptor(raw, selector);
    if (selector & 3) as u8 != new_cpl
        || !d.s
        || d.type_ & 8 != 0
        || d.type_ & 2 == 0
        || d.dpl != new_cpl
    {
        return Err(Exception::GeneralProtection(err));
    }
    if !d.present {
        return Err(Exception::StackFault(err));
    }
    set_accessed(mmu, addr, raw)?;
    let mut d = d;
    d.type_ |= 1;
    Ok(d)
}

/// After a return to an outer ring, data segments the new CPL may not use become null.
fn nullify_data_segments(state: &mut CpuState) {
    let cpl = state.cpl();
    for seg in [ES, DS, FS, GS] {
        let s = state.seg[seg];
        let conforming_code = s.type_ & 0xc == 0xc;
        if s.present && !conforming_code && s.dpl < cpl {
            let mut n = null_segment(0);
            // FS/GS keep their 64-bit base in long mode.
            n.base = if state.long_mode() { s.base } else { 0 };
            state.seg[seg] = n;
        }
    }
}

/// A flat segment for SYSCALL/SYSRET/SYSENTER/SYSEXIT.
fn flat_segment(selector: u16, code: bool, dpl: u8, long: bool) -> Segment {
    Segment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        type_: if code { 0xb } else { 0x3 },
        s: true,
        dpl,
        present: true,
        l: code && long,
        db: !(code && long),
        g: true,
        avl: false,
    }
}

// ---------------------------------------------------------------------------------------
// Instruction dispatch
// ---------------------------------------------------------------------------------------

fn require_cpl0(state: &CpuState) -> ExResult<()> {
    if state.cpl() != 0 {
        Err(Exception::GeneralProtection(0))
    } else {
        Ok(())
    }
}

fn io_allowed(state: &CpuState) -> ExResult<()> {
    let iopl = ((state.rflags & IOPL) >> 12) as u8;
    if state.protected_mode() && (state.cpl() > iopl || state.flag(VM)) {
        Err(Exception::GeneralProtection(0))
    } else {
        Ok(())
    }
}

fn size_mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// Operand size of a stack-using instruction from its stack pointer increment.
fn stack_size(instr: &Instruction) -> usize {
    instr.stack_pointer_increment().unsigned_abs() as usize
}

/// Mnemonics this group owns outright (MOV/PUSH/POP/JMP/CALL only in some forms; see
/// [`is_system_code`]). Must list every mnemonic [`execute`] matches.
const SYSTEM_MNEMONICS: &[Mnemonic] = {
    use Mnemonic as M;
    &[
        M::Lds,
        M::Les,
        M::Lfs,
        M::Lgs,
        M::Lss,
        M::Retf,
        M::Iret,
        M::Iretd,
        M::Iretq,
        M::Int,
        M::Int3,
        M::Into,
        M::Int1,
        M::Syscall,
        M::Sysret,
        M::Sysretq,
        M::Sysenter,
        M::Sysexit,
        M::Sysexitq,
        M::Swapgs,
        M::Rdmsr,
        M::Wrmsr,
        M::Cpuid,
        M::Rdtsc,
        M::Rdtscp,
        M::Hlt,
        M::Pause,
        M::Wbinvd,
        M::Invd,
        M::Clflush,
        M::Clflushopt,
        M::Cli,
        M::Sti,
        M::Pushf,
        M::Pushfd,
        M::Pushfq,
        M::Popf,
        M::Popfd,
        M::Popfq,
        M::In,
        M::Out,
        M::Insb,
        M::Insw,
        M::Insd,
        M::Outsb,
        M::Outsw,
        M::Outsd,
        M::Lgdt,
        M::Lidt,
        M::Sgdt,
        M::Sidt,
        M::Lldt,
        M::Ltr,
        M::Sldt,
        M::Str,
        M::Smsw,
        M::Lmsw,
        M::Clts,
        M::Invlpg,
        M::Lar,
        M::Lsl,
        M::Verr,
        M::Verw,
        M::Ud0,
        M::Ud1,
        M::Ud2,
        M::Invpcid,
        M::Rdrand,
        M::Rdseed,
        M::Rdpid,
        M::Xgetbv,
        M::Xsetbv,
        M::Monitor,
        M::Mwait,
        M::Rdpmc,
        M::Vmcall,
        M::Vmmcall,
    ]
};

/// Whether this group implements `code` (decided once per opcode form).
fn is_system_code(code: Code) -> bool {
    let m = code.mnemonic();
    let name = format!("{code:?}");
    match m {
        Mnemonic::Mov => name.contains("cr") || name.contains("dr") || name.contains("Sreg"),
        Mnemonic::Push | Mnemonic::Pop => ["_ES", "_CS", "_SS", "_DS", "_FS", "_GS"]
            .iter()
            .any(|s| name.ends_with(s)),
        Mnemonic::Jmp | Mnemonic::Call => {
            code.is_jmp_far()
                || code.is_call_far()
                || code.is_jmp_far_indirect()
                || code.is_call_far_indirect()
        }
        _ => SYSTEM_MNEMONICS.contains(&m),
    }
}

/// A bitmap over `Code`, so the dispatcher skips this group with one bit test.
static SYSTEM_CODES: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();

/// Whether `execute` may handle this instruction form (cheap pre-filter).
#[inline]
pub fn handles(code: Code) -> bool {
    let map = SYSTEM_CODES.get_or_init(|| {
        let mut map = vec![0u64; Code::values().len().div_ceil(64)];
        for c in Code::values() {
            if is_system_code(c) {
                map[c as usize / 64] |= 1 << (c as usize % 64);
            }
        }
        map
    });
    map.get(code as usize / 64)
        .is_some_and(|w| w & (1 << (code as usize % 64)) != 0)
}

/// Returns None if `instr` is not a system instruction.
pub fn execute(
    state: &mut CpuState,
    mmu: &mut Mmu,
    sys: &mut SystemState,
    instr: &Instruction,
) -> Option<ExResult<()>> {
    use Mnemonic as M;
    let result = match instr.mnemonic() {
        M::Mov => {
            let r0 = if instr.op_kind(0) == OpKind::Register {
                instr.op_register(0)
            } else {
                Register::None
            };
            let r1 = if instr.op_kind(1) == OpKind::Register {
                instr.op_register(1)
            } else {
                Register::None
            };
            if r0.is_cr() || r1.is_cr() {
                mov_cr(state, mmu, sys, r0, r1)
            } else if r0.is_dr() || r1.is_dr() {
                mov_dr(state, r0, r1)
            } else if r0.is_segment_register() {
                mov_to_sreg(state, mmu, sys, instr, r0)
            } else if r1.is_segment_register() {
                let sel = state.seg[CpuState::seg_index(r1).unwrap_or(DS)].selector;
                write_operand(state, mmu, instr, 0, u64::from(sel))
            } else {
                return None;
            }
        }
        M::Push
            if instr.op_kind(0) == OpKind::Register
                && instr.op_register(0).is_segment_register() =>
        {
            let idx = CpuState::seg_index(instr.op_register(0)).unwrap_or(DS);
            let sel = u64::from(state.seg[idx].selector);
            access::push(state, mmu, sel, stack_size(instr))
        }
        M::Pop
            if instr.op_kind(0) == OpKind::Register
                && instr.op_register(0).is_segment_register() =>
        {
            pop_sreg(state, mmu, sys, instr)
        }
        M::Lds | M::Les | M::Lfs | M::Lgs | M::Lss => load_far_pointer(state, mmu, sys, instr),
        M::Jmp if is_far(instr) => far_jmp_call(state, mmu, instr, false),
        M::Call if is_far(instr) => far_jmp_call(state, mmu, instr, true),
        M::Retf => far_ret(state, mmu, instr),
        M::Iret | M::Iretd | M::Iretq => iret(state, mmu, sys, instr),
        M::Int => {
            sys.software_interrupt = Some(SoftwareInterrupt {
                vector: instr.immediate8(),
                check_dpl: true,
            });
            Ok(())
        }
        M::Int3 => {
            sys.software_interrupt = Some(SoftwareInterrupt {
                vector: 3,
                check_dpl: true,
            });
            Ok(())
        }
        M::Into => {
            if state.flag(OF) {
                sys.software_interrupt = Some(SoftwareInterrupt {
                    vector: 4,
                    check_dpl: true,
                });
            }
            Ok(())
        }
        M::Int1 => {
            sys.software_interrupt = Some(SoftwareInterrupt {
                vector: 1,
                check_dpl: false,
            });
            Ok(())
        }
        M::Syscall => syscall(state),
        M::Sysret | M::Sysretq => sysret(state, instr),
        M::Sysenter => sysenter(state),
        M::Sysexit | M::Sysexitq => sysexit(state, instr),
        M::Swapgs => {
            if !state.code64() {
                Err(Exception::InvalidOpcode)
            } else {
                require_cpl0(state).map(|()| {
                    std::mem::swap(&mut state.seg[GS].base, &mut state.msr.kernel_gs_base);
                })
            }
        }
        M::Rdmsr => require_cpl0(state).and_then(|()| {
            let msr = state.gpr[1] as u32;
            crate::msr::read(state, mmu, sys, msr).map(|v| {
                state.gpr[0] = v & 0xffff_ffff;
                state.gpr[2] = v >> 32;
            })
        }),
        M::Wrmsr => require_cpl0(state).and_then(|()| {
            let msr = state.gpr[1] as u32;
            let value = (state.gpr[0] & 0xffff_ffff) | (state.gpr[2] << 32);
            sys.recheck = true;
            crate::msr::write(state, mmu, sys, msr, value)
        }),
        M::Cpuid => {
            let r = crate::cpuid::cpuid(
                state.gpr[0] as u32,
                state.gpr[1] as u32,
                sys.apic_id,
                sys.num_cpus,
            );
            state.gpr[0] = u64::from(r[0]);
            state.gpr[3] = u64::from(r[1]);
            state.gpr[1] = u64::from(r[2]);
            state.gpr[2] = u64::from(r[3]);
            Ok(())
        }
        M::Rdtsc | M::Rdtscp => {
            if state.cr4 & CR4_TSD != 0 && state.cpl() != 0 {
                Err(Exception::GeneralProtection(0))
            } else {
                let tsc = sys.tsc();
                state.gpr[0] = tsc & 0xffff_ffff;
                state.gpr[2] = tsc >> 32;
                if instr.mnemonic() == M::Rdtscp {
                    state.gpr[1] = state.msr.tsc_aux & 0xffff_ffff;
                }
                Ok(())
            }
        }
        M::Hlt => require_cpl0(state).map(|()| {
            sys.halted = true;
        }),
        M::Pause | M::Wbinvd | M::Invd | M::Clflush | M::Clflushopt => {
            if matches!(instr.mnemonic(), M::Wbinvd | M::Invd) {
                require_cpl0(state)
            } else {
                Ok(())
            }
        }
        M::Cli => cli_sti(state, sys, false),
        M::Sti => cli_sti(state, sys, true),
        M::Pushf | M::Pushfd | M::Pushfq => {
            let flags = state.rflags & !(VM | RF);
            access::push(state, mmu, flags, stack_size(instr))
        }
        M::Popf | M::Popfd | M::Popfq => popf(state, mmu, sys, instr),
        M::In => port_in(state, mmu, instr),
        M::Out => port_out(state, mmu, instr),
        M::Insb | M::Insw | M::Insd => ins(state, mmu, instr),
        M::Outsb | M::Outsw | M::Outsd => outs(state, mmu, instr),
        M::Lgdt | M::Lidt => load_descriptor_table(state, mmu, instr),
        M::Sgdt | M::Sidt => store_descriptor_table(state, mmu, instr),
        M::Lldt => lldt(state, mmu, instr),
        M::Ltr => ltr(state, mmu, instr),
        M::Sldt | M::Str => {
            let sel = if instr.mnemonic() == M::Sldt {
                state.ldtr.selector
            } else {
                state.tr.selector
            };
            write_operand(state, mmu, instr, 0, u64::from(sel))
        }
        M::Smsw => write_operand(state, mmu, instr, 0, state.cr0 & 0xffff_ffff),
        M::Lmsw => require_cpl0(state).and_then(|()| {
            let v = read_operand(state, mmu, instr, 0)? & 0xf;
            // LMSW can set PE but not clear it.
            let new = (state.cr0 & !0xe) | v | (state.cr0 & CR0_PE);
            state.cr0 = new;
            Ok(())
        }),
        M::Clts => require_cpl0(state).map(|()| state.cr0 &= !CR0_TS),
        M::Invlpg => require_cpl0(state).map(|()| {
            let seg = memory_segment(instr);
            let base = if state.code64() && seg < FS {
                0
            } else {
                state.seg[seg].base
            };
            mmu.flush_page(base.wrapping_add(effective_address(state, instr)));
        }),
        M::Lar | M::Lsl => lar_lsl(state, mmu, instr),
        M::Verr | M::Verw => verr_verw(state, mmu, instr),
        M::Ud0 | M::Ud1 | M::Ud2 => Err(Exception::InvalidOpcode),
        // Not advertised in CPUID.
        M::Invpcid
        | M::Rdrand
        | M::Rdseed
        | M::Rdpid
        | M::Xgetbv
        | M::Xsetbv
        | M::Monitor
        | M::Mwait
        | M::Rdpmc
        | M::Vmcall
        | M::Vmmcall => Err(Exception::InvalidOpcode),
        _ => return None,
    };
    Some(result)
}

fn is_far(instr: &Instruction) -> bool {
    matches!(instr.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32)
        || instr.is_jmp_far_indirect()
        || instr.is_call_far_indirect()
}

// ---- control and debug registers ----

fn cr_number(reg: Register) -> usize {
    reg as usize - Register::CR0 as usize
}

fn mov_cr(
    state: &mut CpuState,
    mmu: &mut Mmu,
    sys: &mut SystemState,
    r0: Register,
    r1: Register,
) -> ExResult<()> {
    require_cpl0(state)?;
    if r1.is_cr() {
        // MOV reg, CRn
        let v = match cr_number(r1) {
            0 => state.cr0,
            2 => state.cr2,
            3 => state.cr3,
            4 => state.cr4,
            8 => state.cr8,
            _ => return Err(Exception::InvalidOpcode),
        };
        state.write_gpr(r0, v);
        return Ok(());
    }
    let value = state.read_gpr(r1).unwrap_or(0);
    match cr_number(r0) {
        0 => write_cr0(state, mmu, value),
        2 => {
            state.cr2 = value;
            Ok(())
        }
        3 => {
            let mask = if state.long_mode() {
                (1u64 << crate::mmu::PHYS_ADDR_BITS) - 1
            } else {
                0xffff_ffff
            };
            state.cr3 = value & mask & !0xfe7;
            mmu.sync(state);
            mmu.flush_non_global();
            Ok(())
        }
        4 => write_cr4(state, mmu, value),
        8 => {
            if value & !0xf != 0 {
                return Err(Exception::GeneralProtection(0));
            }
            state.cr8 = value;
            let tpr = (value as u32) << 4;
            if mmu.lapic.mmio_base().is_some() {
                mmu.lapic.write_mmio(0x80, &tpr.to_le_bytes());
            } else {
                let _ = mmu.lapic.write_msr(0x808, u64::from(tpr));
            }
            sys.recheck = true;
            Ok(())
        }
        _ => Err(Exception::InvalidOpcode),
    }
}

/// MOV to CR0 with its mode checks (also used by tests and LMSW-like paths).
pub fn write_cr0(state: &mut CpuState, mmu: &mut Mmu, value: u64) -> ExResult<()> {
    if value >> 32 != 0 {
        return Err(Exception::GeneralProtection(0));
    }
    let value = value | CR0_ET;
    if value & CR0_PG != 0 && value & CR0_PE == 0 {
        return Err(Exception::GeneralProtection(0));
    }
    if value & CR0_NW != 0 && value & CR0_CD == 0 {
        return Err(Exception::GeneralProtection(0));
    }
    let old = state.cr0;
    let enabling_paging = value & CR0_PG != 0 && old & CR0_PG == 0;
    let disabling_paging = value & CR0_PG == 0 && old & CR0_PG != 0;
    if enabling_paging && state.efer & EFER_LME != 0 {
        if state.cr4 & CR4_PAE == 0 || state.seg[CS].l {
            return Err(Exception::GeneralProtection(0));
        }
        state.efer |= EFER_LMA;
    }
    if disabling_paging && state.long_mode() {
        if state.code64() {
            return Err(Exception::GeneralProtection(0));
        }
        state.efer &= !EFER_LMA;
    }
    state.cr0 = value;
    mmu.sync(state);
    if (old ^ value) & (CR0_PG | CR0_WP | CR0_PE) != 0 {
        mmu.flush_all();
    }
    Ok(())
}

/// CR4 bits this CPU supports (the rest are reserved: #GP).
const CR4_SUPPORTED: u64 = CR4_VME
    | CR4_PVI
    | CR4_TSD
    | CR4_DE
    | CR4_PSE
    | CR4_PAE
    | CR4_MCE
    | CR4_PGE
    | CR4_PCE
    | CR4_OSFXSR
    | CR4_OSXMMEXCPT;

pub fn write_cr4(state: &mut CpuState, mmu: &mut Mmu, value: u64) -> ExResult<()> {
    if value & !CR4_SUPPORTED != 0 {
        return Err(Exception::GeneralProtection(0));
    }
    if state.long_mode() && value & CR4_PAE == 0 {
        return Err(Exception::GeneralProtection(0));
    }
    let old = state.cr4;
    state.cr4 = value;
    mmu.sync(state);
    if (old ^ value) & (CR4_PGE | CR4_PAE | CR4_PSE) != 0 {
        mmu.flush_all();
    }
    Ok(())
}

fn mov_dr(state: &mut CpuState, r0: Register, r1: Register) -> ExResult<()> {
    require_cpl0(state)?;
    if r1.is_dr() {
        let n = r1 as usize - Register::DR0 as usize;
        let n = if n == 4 || n == 5 { n + 2 } else { n };
        let v = *state.dr.get(n).ok_or(Exception::InvalidOpcode)?;
        state.write_gpr(r0, v);
    } else {
        let n = r0 as usize - Register::DR0 as usize;
        let n = if n == 4 || n == 5 { n + 2 } else { n };
        let v = state.read_gpr(r1).unwrap_or(0);
        let v = match n {
            6 => (v & 0xe00f) | 0xffff_0ff0,
            7 => (v & !0xd800) | 0x400,
            _ => v,
        };
        *state.dr.get_mut(n).ok_or(Exception::InvalidOpcode)? = v;
    }
    Ok(())
}

// ---- segment registers ----

fn mov_to_sreg(
    state: &mut CpuState,
    mmu: &mut Mmu,
    sys: &mut SystemState,
    instr: &Instruction,
    reg: Register,
) -> ExResult<()> {
    let seg = CpuState::seg_index(reg).ok_or(Exception::InvalidOpcode)?;
    if seg == CS {
        return Err(Exception::InvalidOpcode);
    }
    let sel = read_operand(state, mmu, instr, 1)? as u16;
    load_segment(state, mmu, seg, sel)?;
    if seg == SS {
        sys.shadow = true;
    }
    Ok(())
}

fn pop_sreg(
    state: &mut CpuState,
    mmu: &mut Mmu,
    sys: &mut SystemState,
    instr: &Instruction,
) -> ExResult<()> {
    let seg = CpuState::seg_index(instr.op_register(0)).ok_or(Exception::InvalidOpcode)?;
    let size = stack_size(instr);
    let sel = access::peek(state, mmu, 0, size)? as u16;
    // The stack pointer moves with the width of the SS in force before the load.
    let mask = stack_mask(state);
    load_segment(state, mmu, seg, sel)?;
    let rsp = state.gpr[4];
    state.gpr[4] = (rsp & !mask) | (rsp.wrapping_add(size as u64) & mask);
    if seg == SS {
        sys.shadow = true;
    }
    Ok(())
}

fn load_far_pointer(
    state: &mut CpuState,
    mmu: &mut Mmu,
    sys: &mut SystemState,
    instr: &Instruction,
) -> ExResult<()> {
    let seg = match instr.mnemonic() {
        Mnemonic::Lds => DS,
        Mnemonic::Les => ES,
        Mnemonic::Lfs => FS,
        Mnemonic::Lgs => GS,
        _ => SS,
    };
    let size = instr.op_register(0).size();
    let ea = effective_address(state, instr);
    let mseg = memory_segment(instr);
    let offset = mmu_read(mmu, mseg, ea, size)?;
    let sel = mmu_read(mmu, mseg, ea.wrapping_add(size as u64), 2)? as u16;
    load_segment(state, mmu, seg, sel)?;
    state.write_gpr(instr.op_register(0), offset);
    if seg == SS {
        sys.shadow = true;
    }
    Ok(())
}

fn mmu_read(mmu: &mut Mmu, seg: usize, offset: u64, size: usize) -> ExResult<u64> {
    access::DataAccess::read(mmu, seg, offset, size)
}

// ---- far transfers ----

fn far_target(state: &CpuState, mmu: &mut Mmu, instr: &Instruction) -> ExResult<(u16, u64, usize)> {
    match instr.op0_kind() {
        OpKind::FarBranch16 => Ok((
            instr.far_branch_selector(),
            u64::from(instr.far_branch16()),
            2,
        )),
        OpKind::FarBranch32 => Ok((
            instr.far_branch_selector(),
            u64::from(instr.far_branch32()),
            4,
        )),
        _ => {
            let size = match instr.code() {
                Code::Jmp_m1616 | Code::Call_m1616 => 2,
                Code::Jmp_m1632 | Code::Call_m1632 => 4,
                _ => 8,
            };
            let ea = effective_address(state, instr);
            let seg = memory_segment(instr);
            let offset = mmu_read(mmu, seg, ea, size)?;
            let sel = mmu_read(mmu, seg, ea.wrapping_add(size as u64), 2)? as u16;
            Ok((sel, offset, size))
        }
    }
}

fn far_jmp_call(
    state: &mut CpuState,
    mmu: &mut Mmu,
    instr: &Instruction,
    call: bool,
) -> ExResult<()> {
    let (sel, offset, size) = far_target(state, mmu, instr)?;
    if !state.protected_mode() || state.flag(VM) {
        if call {
            let cs = u64::from(state.seg[CS].selector);
            let ip = state.rip;
            push_pair(state, mmu, cs, ip, size)?;
        }
        state.seg[CS].selector = sel;
        state.seg[CS].base = u64::from(sel) << 4;
        state.rip = offset & size_mask(size);
        return Ok(());
    }
    let cs = far_code_segment(state, mmu, sel)?;
    let target = if cs.l && state.long_mode() {
        offset
    } else {
        offset & size_mask(size.min(4))
    };
    if !(cs.l && state.long_mode()) && target > u64::from(cs.limit) {
        return Err(Exception::GeneralProtection(0));
    }
    if cs.l && state.long_mode() && !is_canonical(target) {
        return Err(Exception::GeneralProtection(0));
    }
    if call {
        let old_cs = u64::from(state.seg[CS].selector);
        let ip = state.rip;
        push_pair(state, mmu, old_cs, ip, size)?;
    }
    state.seg[CS] = cs;
    state.rip = target;
    Ok(())
}

/// Push CS then IP (each `size` bytes) so that a fault leaves RSP unchanged.
fn push_pair(state: &mut CpuState, mmu: &mut Mmu, cs: u64, ip: u64, size: usize) -> ExResult<()> {
    let saved = state.gpr[4];
    let r = access::push(state, mmu, cs, size).and_then(|()| access::push(state, mmu, ip, size));
    if r.is_err() {
        state.gpr[4] = saved;
    }
    r
}

fn far_ret(state: &mut CpuState, mmu: &mut Mmu, instr: &Instruction) -> ExResult<()> {
    let size = match instr.code() {
        Code::Retfw | Code::Retfw_imm16 => 2,
        Code::Retfd | Code::Retfd_imm16 => 4,
        _ => 8,
    };
    let imm = if instr.op_count() > 0 {
        u64::from(instr.immediate16())
    } else {
        0
    };
    let ip = access::peek(state, mmu, 0, size)? & size_mask(size);
    let sel = access::peek(state, mmu, size as u64, size)? as u16;
    let sp_mask = stack_mask(state);
    if !state.protected_mode() || state.flag(VM) {
        state.seg[CS].selector = sel;
        state.seg[CS].base = u64::from(sel) << 4;
        state.rip = ip;
        let rsp = state.gpr[4];
        state.gpr[4] = (rsp & !sp_mask) | (rsp.wrapping_add(2 * size as u64 + imm) & sp_mask);
        return Ok(());
    }
    let cs = return_code_segment(state, mmu, sel)?;
    let new_cpl = (sel & 3) as u8;
    if new_cpl == state.cpl() {
        state.seg[CS] = cs;
        state.rip = ip;
        let rsp = state.gpr[4];
        state.gpr[4] = (rsp & !sp_mask) | (rsp.wrapping_add(2 * size as u64 + imm) & sp_mask);
        return Ok(());
    }
    // Return to an outer ring: SS:RSP follow the immediate.
    let new_sp = access::peek(state, mmu, 2 * size as u64 + imm, size)?;
    let ss_sel = access::peek(state, mmu, 3 * size as u64 + imm, size)? as u16;
    let to64 = cs.l && state.long_mode();
    let ss = return_stack_segment(state, mmu, ss_sel, new_cpl, to64)?;
    state.seg[CS] = cs;
    state.seg[SS] = ss;
    state.rip = ip;
    state.gpr[4] = new_sp.wrapping_add(imm);
    nullify_data_segments(state);
    Ok(())
}

fn stack_mask(state: &CpuState) -> u64 {
    if state.code64() {
        u64::MAX
    } else if state.seg[SS].db {
        0xffff_ffff
    } else {
        0xffff
    }
}

// ---- IRET ----

fn iret(
    state: &mut CpuState,
    mmu: &mut Mmu,
    sys: &mut SystemState,
    instr: &Instruction,
) -> ExResult<()> {
    let size = match instr.mnemonic() {
        Mnemonic::Iret => 2,
        Mnemonic::Iretd => 4,
        _ => 8,
    };
    let ip = access::peek(state, mmu, 0, size)?;
    let cs_sel = access::peek(state, mmu, size as u64, size)? as u16;
    let flags = access::peek(state, mmu, 2 * size as u64, size)?;
    let sp_mask = stack_mask(state);

    if !state.protected_mode() {
        let rsp = state.gpr[4];
        state.gpr[4] = (rsp & !sp_mask) | (rsp.wrapping_add(3 * size as u64) & sp_mask);
        state.seg[CS].selector = cs_sel;
        state.seg[CS].base = u64::from(cs_sel) << 4;
        state.rip = ip & size_mask(size);
        set_flags_from_pop(state, flags, size, true);
        sys.nmi_blocked = false;
        sys.recheck = true;
        return Ok(());
    }
    if state.flag(NT) && !state.long_mode() {
        tracing::warn!("IRET with NT set (task return) is not supported");
        return Err(Exception::GeneralProtection(0));
    }
    if state.flag(VM) || (flags & VM != 0 && state.cpl() == 0 && size == 4 && !state.long_mode()) {
        tracing::warn!("virtual-8086 mode is not supported");
        return Err(Exception::GeneralProtection(0));
    }
    let cs = return_code_segment(state, mmu, cs_sel)?;
    let new_cpl = (cs_sel & 3) as u8;
    let old_cpl = state.cpl();
    let to64 = cs.l && state.long_mode();
    let ip = if to64 {
        ip
    } else {
        ip & size_mask(size.min(4))
    };
    if to64 && !is_canonical(ip) {
        return Err(Exception::GeneralProtection(0));
    }
    if !to64 && ip > u64::from(cs.limit) {
        return Err(Exception::GeneralProtection(0));
    }
    let pops_stack = state.code64() || new_cpl != old_cpl;
    if pops_stack {
        let new_sp = access::peek(state, mmu, 3 * size as u64, size)?;
        let ss_sel = access::peek(state, mmu, 4 * size as u64, size)? as u16;
        let ss = if new_cpl == old_cpl && ss_sel & !3 == 0 && to64 {
            return_stack_segment(state, mmu, ss_sel, new_cpl, true)?
        } else {
            return_stack_segment(state, mmu, ss_sel, new_cpl, to64)?
        };
        set_flags_from_pop(state, flags, size, false);
        state.seg[CS] = cs;
        state.seg[SS] = ss;
        state.rip = ip;
        state.gpr[4] = if size == 2 {
            (state.gpr[4] & !0xffff) | (new_sp & 0xffff)
        } else if size == 4 {
            new_sp & 0xffff_ffff
        } else {
            new_sp
        };
        if new_cpl > old_cpl {
            nullify_data_segments(state);
        }
    } else {
        set_flags_from_pop(state, flags, size, false);
        state.seg[CS] = cs;
        state.rip = ip;
        let rsp = state.gpr[4];
        state.gpr[4] = (rsp & !sp_mask) | (rsp.wrapping_add(3 * size as u64) & sp_mask);
    }
    sys.nmi_blocked = false;
    sys.recheck = true;
    Ok(())
}

/// Apply popped flags with the privilege rules of POPF/IRET. Must be called while CPL is
/// still the old one.
fn set_flags_from_pop(state: &mut CpuState, popped: u64, size: usize, real: bool) {
    let cpl = state.cpl();
    let iopl = ((state.rflags & IOPL) >> 12) as u8;
    let mut changeable = CF | PF | AF | ZF | SF | TF | DF | OF | NT | AC | ID | RF;
    if real || cpl == 0 {
        changeable |= IOPL | IF;
    } else if cpl <= iopl {
        changeable |= IF;
    }
    if cpl == 0 && size > 2 && !real {
        changeable |= VIF | VIP;
    }
    if size == 2 {
        changeable &= 0xffff;
    }
    state.rflags = (state.rflags & !changeable) | (popped & changeable) | RFLAGS_FIXED;
}

fn popf(
    state: &mut CpuState,
    mmu: &mut Mmu,
    sys: &mut SystemState,
    instr: &Instruction,
) -> ExResult<()> {
    let size = stack_size(instr);
    let flags = access::pop(state, mmu, size)?;
    let real = !state.protected_mode();
    set_flags_from_pop(state, flags & !RF, size, real);
    state.rflags &= !RF;
    sys.recheck = true;
    Ok(())
}

fn cli_sti(state: &mut CpuState, sys: &mut SystemState, set: bool) -> ExResult<()> {
    let iopl = ((state.rflags & IOPL) >> 12) as u8;
    if state.protected_mode() && state.cpl() > iopl {
        return Err(Exception::GeneralProtection(0));
    }
    if set {
        if !state.flag(IF) {
            sys.shadow = true;
        }
        state.rflags |= IF;
        sys.recheck = true;
    } else {
        state.rflags &= !IF;
    }
    Ok(())
}

// ---- SYSCALL / SYSRET / SYSENTER / SYSEXIT ----

fn syscall(state: &mut CpuState) -> ExResult<()> {
    // Intel: SYSCALL exists only in 64-bit mode.
    if state.efer & EFER_SCE == 0 || !state.code64() {
        return Err(Exception::InvalidOpcode);
    }
    let sel = ((state.msr.star >> 32) & 0xffff) as u16;
    state.gpr[1] = state.rip;
    state.gpr[11] = state.rflags & !RF;
    state.rip = state.msr.lstar;
    state.rflags = (state.rflags & !(state.msr.fmask & 0xffff_ffff) & !RF) | RFLAGS_FIXED;
    state.seg[CS] = flat_segment(sel & !3, true, 0, true);
    state.seg[SS] = flat_segment((sel & !3).wrapping_add(8), false, 0, true);
    Ok(())
}

fn sysret(state: &mut CpuState, instr: &Instruction) -> ExResult<()> {
    if state.efer & EFER_SCE == 0 || !state.code64() {
        return Err(Exception::InvalidOpcode);
    }
    require_cpl0(state)?;
    let base = ((state.msr.star >> 48) & 0xffff) as u16;
    let to64 = instr.code() == Code::Sysretq;
    if to64 && !is_canonical(state.gpr[1]) {
        return Err(Exception::GeneralProtection(0));
    }
    if to64 {
        state.seg[CS] = flat_segment(base.wrapping_add(16) | 3, true, 3, true);
        state.rip = state.gpr[1];
    } else {
        state.seg[CS] = flat_segment(base | 3, true, 3, false);
        state.rip = state.gpr[1] & 0xffff_ffff;
    }
    state.rflags = (state.gpr[11] & 0x3c_7fd7) | RFLAGS_FIXED;
    // SS keeps its flat cache; only the selector comes from STAR.
    let mut ss = flat_segment(base.wrapping_add(8) | 3, false, 3, false);
    ss.dpl = 3;
    state.seg[SS] = ss;
    Ok(())
}

fn sysenter(state: &mut CpuState) -> ExResult<()> {
    let cs = (state.msr.sysenter_cs & 0xfffc) as u16;
    if !state.protected_mode() || cs == 0 {
        return Err(Exception::GeneralProtection(0));
    }
    let long = state.long_mode();
    state.rflags &= !(VM | IF | RF);
    state.seg[CS] = flat_segment(cs, true, 0, long);
    state.seg[SS] = flat_segment(cs.wrapping_add(8), false, 0, false);
    state.rip = if long {
        state.msr.sysenter_eip
    } else {
        state.msr.sysenter_eip & 0xffff_ffff
    };
    state.gpr[4] = if long {
        state.msr.sysenter_esp
    } else {
        state.msr.sysenter_esp & 0xffff_ffff
    };
    Ok(())
}

fn sysexit(state: &mut CpuState, instr: &Instruction) -> ExResult<()> {
    let cs = (state.msr.sysenter_cs & 0xfffc) as u16;
    if !state.protected_mode() || cs == 0 {
        return Err(Exception::GeneralProtection(0));
    }
    require_cpl0(state)?;
    if instr.code() == Code::Sysexitq {
        state.seg[CS] = flat_segment(cs.wrapping_add(32) | 3, true, 3, true);
        state.seg[SS] = flat_segment(cs.wrapping_add(40) | 3, false, 3, false);
        state.rip = state.gpr[2];
        state.gpr[4] = state.gpr[1];
    } else {
        state.seg[CS] = flat_segment(cs.wrapping_add(16) | 3, true, 3, false);
        state.seg[SS] = flat_segment(cs.wrapping_add(24) | 3, false, 3, false);
        state.rip = state.gpr[2] & 0xffff_ffff;
        state.gpr[4] = state.gpr[1] & 0xffff_ffff;
    }
    Ok(())
}

// ---- port I/O ----

fn port_in(state: &mut CpuState, mmu: &mut Mmu, instr: &Instruction) -> ExResult<()> {
    io_allowed(state)?;
    let reg = instr.op_register(0);
    let port = if instr.op_kind(1) == OpKind::Immediate8 {
        u16::from(instr.immediate8())
    } else {
        state.gpr[2] as u16
    };
    let size = reg.size();
    let mut buf = [0u8; 4];
    mmu.io.pio_read(port, &mut buf[..size]);
    state.write_gpr(reg, u64::from(u32::from_le_bytes(buf)));
    Ok(())
}

fn port_out(state: &mut CpuState, mmu: &mut Mmu, instr: &Instruction) -> ExResult<()> {
    io_allowed(state)?;
    let reg = instr.op_register(1);
    let port = if instr.op_kind(0) == OpKind::Immediate8 {
        u16::from(instr.immediate8())
    } else {
        state.gpr[2] as u16
    };
    let size = reg.size();
    let value = state.read_gpr(reg).unwrap_or(0) as u32;
    mmu.io.pio_write(port, &value.to_le_bytes()[..size]);
    mmu.mmio_touched = true;
    Ok(())
}

/// Address-size mask of a string operand kind.
fn string_mask(kind: OpKind) -> u64 {
    match kind {
        OpKind::MemoryESDI | OpKind::MemorySegSI => 0xffff,
        OpKind::MemoryESEDI | OpKind::MemorySegESI => 0xffff_ffff,
        _ => u64::MAX,
    }
}

fn update_index(state: &mut CpuState, reg: usize, mask: u64, size: usize) {
    let v = state.gpr[reg];
    let step = if state.flag(DF) {
        (size as u64).wrapping_neg()
    } else {
        size as u64
    };
    let new = v.wrapping_add(step) & mask;
    state.gpr[reg] = if mask == 0xffff_ffff {
        new
    } else {
        (v & !mask) | new
    };
}

fn ins(state: &mut CpuState, mmu: &mut Mmu, instr: &Instruction) -> ExResult<()> {
    io_allowed(state)?;
    let size = match instr.mnemonic() {
        Mnemonic::Insb => 1,
        Mnemonic::Insw => 2,
        _ => 4,
    };
    let mask = string_mask(instr.op0_kind());
    let rep = instr.has_rep_prefix() || instr.has_repne_prefix();
    let port = state.gpr[2] as u16;
    loop {
        if rep && state.gpr[1] & mask == 0 {
            return Ok(());
        }
        let mut buf = [0u8; 4];
        // The destination is checked before the port is read.
        let di = state.gpr[7] & mask;
        access::DataAccess::read(mmu, ES, di, size)?;
        mmu.io.pio_read(port, &mut buf[..size]);
        access::DataAccess::write(mmu, ES, di, size, u64::from(u32::from_le_bytes(buf)))?;
        update_index(state, 7, mask, size);
        if !rep {
            return Ok(());
        }
        let c = state.gpr[1];
        state.gpr[1] = (c & !mask) | (c.wrapping_sub(1) & mask);
        if mask == 0xffff_ffff {
            state.gpr[1] &= 0xffff_ffff;
        }
    }
}

fn outs(state: &mut CpuState, mmu: &mut Mmu, instr: &Instruction) -> ExResult<()> {
    io_allowed(state)?;
    let size = match instr.mnemonic() {
        Mnemonic::Outsb => 1,
        Mnemonic::Outsw => 2,
        _ => 4,
    };
    let mask = string_mask(instr.op1_kind());
    let seg = memory_segment(instr);
    let rep = instr.has_rep_prefix() || instr.has_repne_prefix();
    let port = state.gpr[2] as u16;
    loop {
        if rep && state.gpr[1] & mask == 0 {
            return Ok(());
        }
        let v = access::DataAccess::read(mmu, seg, state.gpr[6] & mask, size)? as u32;
        mmu.io.pio_write(port, &v.to_le_bytes()[..size]);
        update_index(state, 6, mask, size);
        if !rep {
            return Ok(());
        }
        let c = state.gpr[1];
        state.gpr[1] = (c & !mask) | (c.wrapping_sub(1) & mask);
        if mask == 0xffff_ffff {
            state.gpr[1] &= 0xffff_ffff;
        }
    }
}

// ---- descriptor tables ----

fn load_descriptor_table(state: &mut CpuState, mmu: &mut Mmu, instr: &Instruction) -> ExResult<()> {
    require_cpl0(state)?;
    let ea = effective_address(state, instr);
    let seg = memory_segment(instr);
    let limit = mmu_read(mmu, seg, ea, 2)? as u16;
    let base = if state.code64() {
        mmu_read(mmu, seg, ea.wrapping_add(2), 8)?
    } else {
        let b = mmu_read(mmu, seg, ea.wrapping_add(2), 4)?;
        if instr.code() == Code::Lgdt_m1632_16 || instr.code() == Code::Lidt_m1632_16 {
            b & 0x00ff_ffff
        } else {
            b
        }
    };
    let table = DescriptorTable { base, limit };
    if instr.mnemonic() == Mnemonic::Lgdt {
        state.gdtr = table;
    } else {
        state.idtr = table;
    }
    Ok(())
}

fn store_descriptor_table(
    state: &mut CpuState,
    mmu: &mut Mmu,
    instr: &Instruction,
) -> ExResult<()> {
    let table = if instr.mnemonic() == Mnemonic::Sgdt {
        state.gdtr
    } else {
        state.idtr
    };
    let ea = effective_address(state, instr);
    let seg = memory_segment(instr);
    let mut buf = [0u8; 10];
    buf[..2].copy_from_slice(&table.limit.to_le_bytes());
    buf[2..].copy_from_slice(&table.base.to_le_bytes());
    let len = if state.code64() { 10 } else { 6 };
    access::DataAccess::write_bytes(mmu, seg, ea, &buf[..len])
}

fn lldt(state: &mut CpuState, mmu: &mut Mmu, instr: &Instruction) -> ExResult<()> {
    if !state.protected_mode() {
        return Err(Exception::InvalidOpcode);
    }
    require_cpl0(state)?;
    let sel = read_operand(state, mmu, instr, 0)? as u16;
    if sel & !3 == 0 {
        state.ldtr = null_segment(sel);
        return Ok(());
    }
    let (seg, _, _) = fetch_system_descriptor(state, mmu, sel)?;
    if seg.s || seg.type_ != 2 {
        return Err(Exception::GeneralProtection(sel & !3));
    }
    if !seg.present {
        return Err(Exception::SegmentNotPresent(sel & !3));
    }
    state.ldtr = seg;
    Ok(())
}

fn ltr(state: &mut CpuState, mmu: &mut Mmu, instr: &Instruction) -> ExResult<()> {
    if !state.protected_mode() {
        return Err(Exception::InvalidOpcode);
    }
    require_cpl0(state)?;
    let sel = read_operand(state, mmu, instr, 0)? as u16;
    if sel & !3 == 0 {
        return Err(Exception::GeneralProtection(0));
    }
    let (mut seg, raw, addr) = fetch_system_descriptor(state, mmu, sel)?;
    let available = if state.long_mode() {
        seg.type_ == 9
    } else {
        seg.type_ == 9 || seg.type_ == 1
    };
    if seg.s || !available {
        return Err(Exception::GeneralProtection(sel & !3));
    }
    if !seg.present {
        return Err(Exception::SegmentNotPresent(sel & !3));
    }
    // Mark the TSS busy.
    mmu.write_linear(
        addr.wrapping_add(5),
        1,
        u64::from((raw >> 40) as u8 | 2),
        false,
    )?;
    seg.type_ |= 2;
    state.tr = seg;
    Ok(())
}

fn lar_lsl(state: &mut CpuState, mmu: &mut Mmu, instr: &Instruction) -> ExResult<()> {
    if !state.protected_mode() {
        return Err(Exception::InvalidOpcode);
    }
    let sel = read_operand(state, mmu, instr, 1)? as u16;
    let valid = (|| -> ExResult<Option<u64>> {
        if sel & !3 == 0 {
            return Ok(None);
        }
        let (raw, _) = match fetch_descriptor(state, mmu, sel) {
            Ok(v) => v,
            Err(Exception::GeneralProtection(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let d = parse_descriptor(raw, sel);
        if !d.s {
            let ok_types: &[u8] = if instr.mnemonic() == Mnemonic::Lsl {
                if state.long_mode() {
                    &[2, 9, 0xb]
                } else {
                    &[1, 2, 3, 9, 0xb]
                }
            } else if state.long_mode() {
                &[2, 9, 0xb, 0xc]
            } else {
                &[1, 2, 3, 4, 5, 9, 0xb, 0xc]
            };
            if !ok_types.contains(&d.type_) {
                return Ok(None);
            }
        }
        let conforming = d.s && d.type_ & 0xc == 0xc;
        if !conforming && d.dpl < state.cpl().max((sel & 3) as u8) {
            return Ok(None);
        }
        Ok(Some(if instr.mnemonic() == Mnemonic::Lsl {
            u64::from(d.limit)
        } else {
            (raw >> 32) & 0x00f0_ff00
        }))
    })()?;
    match valid {
        Some(v) => {
            state.rflags |= ZF;
            state.write_gpr(instr.op_register(0), v);
        }
        None => state.rflags &= !ZF,
    }
    Ok(())
}

fn verr_verw(state: &mut CpuState, mmu: &mut Mmu, instr: &Instruction) -> ExResult<()> {
    if !state.protected_mode() {
        return Err(Exception::InvalidOpcode);
    }
    let sel = read_operand(state, mmu, instr, 0)? as u16;
    let ok = sel & !3 != 0
        && match fetch_descriptor(state, mmu, sel) {
            Ok((raw, _)) => {
                let d = parse_descriptor(raw, sel);
                let code = d.type_ & 8 != 0;
                let conforming = code && d.type_ & 4 != 0;
                let priv_ok = conforming || d.dpl >= state.cpl().max((sel & 3) as u8);
                let type_ok = if instr.mnemonic() == Mnemonic::Verr {
                    !code || d.type_ & 2 != 0
                } else {
                    !code && d.type_ & 2 != 0
                };
                d.s && priv_ok && type_ok
            }
            Err(Exception::GeneralProtection(_)) => false,
            Err(e) => return Err(e),
        };
    state.set_flag(ZF, ok);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefilter_selects_system_forms_only() {
        assert!(handles(Code::Mov_cr_r64));
        assert!(handles(Code::Mov_Sreg_r32m16));
        assert!(handles(Code::Pushq_FS));
        assert!(handles(Code::Popw_SS));
        assert!(handles(Code::Jmp_m1664));
        assert!(handles(Code::Jmp_ptr1632));
        assert!(handles(Code::Wrmsr));
        assert!(handles(Code::Iretq));
        assert!(!handles(Code::Mov_r64_rm64));
        assert!(!handles(Code::Push_r64));
        assert!(!handles(Code::Jmp_rel32_64));
        assert!(!handles(Code::Call_rm64));
        assert!(!handles(Code::Add_rm64_imm8));
    }

    #[test]
    fn descriptor_parsing() {
        let cs = parse_descriptor(0x00af_9b00_0000_ffff, 0x10);
        assert!(cs.l && !cs.db && cs.present && cs.s && cs.g);
        assert_eq!((cs.limit, cs.type_, cs.dpl), (0xffff_ffff, 0xb, 0));
        let d = parse_descriptor(0x40cf_f312_3456_0fff, 0x2b);
        assert_eq!(d.base, 0x4012_3456);
        assert_eq!(d.dpl, 3);
        assert!(d.db);
    }
}
