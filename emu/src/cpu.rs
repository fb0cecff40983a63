//! One virtual CPU: the fetch/decode/execute loop, event delivery at instruction
//! boundaries, HLT and wait-for-SIPI sleeping, and debugging aids (trace, history, dump).
//!
//! The run loop executes instructions in batches; between batches (and right after any
//! instruction that touched MMIO/ports, wrote an MSR, or changed IF) it polls the local
//! APIC (inbox messages, timer expiry) and the stop flag. A deliverable interrupt is taken
//! at the next instruction boundary where IF=1 and no interrupt shadow is active.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};

use crate::clock::VirtualClock;
use crate::decode::DecodeCache;
use crate::exception::Exception;
use crate::exec::fast::Fast;
use crate::exec::system::SystemState;
use crate::interrupt::{self, Escalation, EventKind};
use crate::lapic::{LapicState, LocalApic};
use crate::mmu::Mmu;
use crate::ram::GuestRam;
use crate::router::ApicInbox;
use crate::state::*;
use crate::IoBus;

/// Instructions per batch between polls of the APIC and the stop flag. Compiled code runs
/// a batch in tens of microseconds (interpreted code in a few hundred), which bounds the
/// latency of interrupts from other threads; each batch ends in the run loop, which costs
/// about as much as a few hundred compiled instructions, so batches are long.
const BATCH: u32 = 16384;
/// Executed blocks kept for [`Cpu::dump`] (each a run of consecutive instructions).
const HISTORY: usize = 64;
/// Instructions [`Cpu::dump`] shows from the history.
const HISTORY_SHOWN: usize = 64;

/// `count` instructions executed straight from linear address `lin`.
#[derive(Debug, Clone, Copy, Default)]
struct HistoryEntry {
    lin: u64,
    bitness: u32,
    count: u32,
}

/// Why [`Cpu::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunExit {
    /// The stop flag was set.
    Stopped,
    /// A fault while delivering a double fault: the machine should reset.
    TripleFault,
    /// The emulator cannot continue.
    Fatal(String),
}

/// One CPU's state as a snapshot keeps it: the registers, the local APIC, and what is
/// pending between instructions. Times are guest times (the clock is restored first).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuSnapshot {
    pub regs: CpuState,
    pub lapic: LapicState,
    tsc_offset: u64,
    kvm_system_time: u64,
    kvm_wall_clock: u64,
    kvmclock_version: u32,
    halted: bool,
    shadow: bool,
    nmi_blocked: bool,
    software_interrupt: Option<crate::exec::system::SoftwareInterrupt>,
    waiting_for_sipi: bool,
    nmi_pending: bool,
    irq_pending: bool,
}

/// A vCPU's state in the form another accelerator takes it (KVM's model of an x86 CPU):
/// the registers, the local APIC as its register page, the TSC's value, and the events
/// between instructions. What only this emulator has (decodes, compiled code, a software
/// interrupt half delivered) is not in it: a vCPU is exported between instructions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortableCpu {
    pub regs: CpuState,
    pub apic_base: u64,
    /// The local APIC's architectural register page (see [`LocalApic::register_page`]).
    pub apic_page: Vec<u8>,
    pub tsc: u64,
    /// kvmclock's MSRs (MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_WALL_CLOCK_NEW).
    pub kvm_system_time: u64,
    pub kvm_wall_clock: u64,
    pub halted: bool,
    pub waiting_for_sipi: bool,
    /// Interrupts blocked for one instruction (STI, MOV SS).
    pub interrupt_shadow: bool,
    pub nmi_pending: bool,
    pub nmi_blocked: bool,
}

/// One virtual x86-64 CPU.
pub struct Cpu {
    id: u32,
    state: CpuState,
    mmu: Mmu,
    sys: SystemState,
    cache: DecodeCache,
    inbox: Option<Arc<ApicInbox>>,
    trace: bool,
    /// The last blocks executed (linear address, bitness, instructions run), a ring.
    history: [HistoryEntry; HISTORY],
    history_pos: usize,
    instructions: u64,
    waiting_for_sipi: bool,
    nmi_pending: bool,
    irq_pending: bool,
    /// `state_mut` handed out the registers: resync the MMU before running.
    resync: bool,
    /// The clock's pause count this vCPU has told its guest about.
    seen_resumes: u64,
    /// The [`crate::ram::GuestRam::map_epoch`] this CPU's translations are from.
    seen_map_epoch: u64,
    /// Guest RIP samples (one per batch) for finding where guest time goes.
    profile: Option<std::collections::HashMap<u64, u64>>,
    profile_samples: u64,
    /// Entries into compiled code, and the instructions it ran (see
    /// [`Cpu::compiled_runs`]).
    compiled_runs: u64,
    compiled_instructions: u64,
}

impl Cpu {
    pub fn new(
        id: u32,
        ram: Arc<GuestRam>,
        io: Arc<dyn IoBus>,
        lapic: LocalApic,
        clock: Arc<VirtualClock>,
    ) -> Self {
        let mut cpu = Cpu {
            id,
            state: CpuState::power_on(),
            mmu: Mmu::new(ram, io, lapic),
            sys: SystemState::new(clock, id),
            cache: DecodeCache::new(),
            inbox: None,
            trace: false,
            history: [HistoryEntry::default(); HISTORY],
            history_pos: 0,
            instructions: 0,
            waiting_for_sipi: false,
            nmi_pending: false,
            irq_pending: false,
            resync: true,
            seen_resumes: 0,
            seen_map_epoch: 0,
            profile: None,
            profile_samples: 0,
            compiled_runs: 0,
            compiled_instructions: 0,
        };
        if std::env::var_os("EMU_PROFILE").is_some() {
            cpu.set_profile(true);
        }
        cpu.reset();
        cpu
    }

    /// The inbox of this CPU's local APIC, so HLT can sleep until a message arrives
    /// (without it HLT polls every millisecond).
    pub fn set_inbox(&mut self, inbox: Arc<ApicInbox>) {
        self.inbox = Some(inbox);
    }

    /// Number of CPUs in the machine (CPUID topology and HTT).
    pub fn set_cpu_count(&mut self, n: u32) {
        self.sys.num_cpus = n.max(1);
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn state(&self) -> &CpuState {
        &self.state
    }

    /// Mutable registers (e.g. to load the boot entry state). The MMU snapshot and the
    /// TLB are refreshed before the next instruction runs.
    pub fn state_mut(&mut self) -> &mut CpuState {
        self.resync = true;
        &mut self.state
    }

    pub fn lapic(&mut self) -> &mut LocalApic {
        &mut self.mmu.lapic
    }

    /// Power-on reset: architectural state, local APIC, TLB and decode cache.
    pub fn reset(&mut self) {
        self.state = CpuState::power_on();
        self.state.msr.misc_enable = 1; // fast strings
        self.state.msr.mtrr_def_type = 0xc06; // MTRRs on, default write-back
        self.mmu.lapic.reset();
        self.sys.halted = false;
        self.sys.shadow = false;
        self.sys.nmi_blocked = false;
        self.sys.tsc_offset = 0;
        self.sys.kvm_system_time = 0;
        self.sys.kvm_wall_clock = 0;
        self.sys.software_interrupt = None;
        self.waiting_for_sipi = false;
        self.nmi_pending = false;
        self.irq_pending = false;
        self.mmu.sync(&self.state);
        self.mmu.flush_all();
        self.cache.flush();
        self.resync = true;
    }

    /// The state a snapshot keeps (call it between runs, on the CPU's thread).
    pub fn save(&mut self) -> CpuSnapshot {
        CpuSnapshot {
            regs: self.state.clone(),
            lapic: self.mmu.lapic.save(),
            tsc_offset: self.sys.tsc_offset,
            kvm_system_time: self.sys.kvm_system_time,
            kvm_wall_clock: self.sys.kvm_wall_clock,
            kvmclock_version: self.sys.kvmclock_version,
            halted: self.sys.halted,
            shadow: self.sys.shadow,
            nmi_blocked: self.sys.nmi_blocked,
            software_interrupt: self.sys.software_interrupt,
            waiting_for_sipi: self.waiting_for_sipi,
            nmi_pending: self.nmi_pending,
            irq_pending: self.irq_pending,
        }
    }

    /// Take a snapshot's state; translations and decodes start afresh.
    pub fn restore(&mut self, s: &CpuSnapshot) {
        self.state = s.regs.clone();
        self.mmu.lapic.restore(&s.lapic);
        self.sys.tsc_offset = s.tsc_offset;
        self.sys.kvm_system_time = s.kvm_system_time;
        self.sys.kvm_wall_clock = s.kvm_wall_clock;
        self.sys.kvmclock_version = s.kvmclock_version;
        self.sys.halted = s.halted;
        self.sys.shadow = s.shadow;
        self.sys.nmi_blocked = s.nmi_blocked;
        self.sys.software_interrupt = s.software_interrupt;
        self.sys.recheck = true;
        self.waiting_for_sipi = s.waiting_for_sipi;
        self.nmi_pending = s.nmi_pending;
        self.irq_pending = s.irq_pending;
        self.mmu.sync(&self.state);
        self.mmu.flush_all();
        self.cache.flush();
        self.resync = true;
    }

    /// The state in [`PortableCpu`]'s form.
    pub fn export(&mut self) -> PortableCpu {
        PortableCpu {
            regs: self.state.clone(),
            apic_base: self.mmu.lapic.apic_base(),
            apic_page: self.mmu.lapic.register_page(),
            tsc: self.sys.tsc(),
            kvm_system_time: self.sys.kvm_system_time,
            kvm_wall_clock: self.sys.kvm_wall_clock,
            halted: self.sys.halted,
            waiting_for_sipi: self.waiting_for_sipi,
            interrupt_shadow: self.sys.shadow,
            nmi_pending: self.nmi_pending,
            nmi_blocked: self.sys.nmi_blocked,
        }
    }

    /// Take a [`PortableCpu`] (saved under another accelerator, say); translations and
    /// decodes start afresh.
    pub fn import(&mut self, p: &PortableCpu) -> Result<(), String> {
        self.mmu
            .lapic
            .load_register_page(p.apic_base, &p.apic_page)?;
        self.state = p.regs.clone();
        self.sys.tsc_offset = p.tsc.wrapping_sub(self.sys.clock.tsc());
        self.sys.kvm_system_time = p.kvm_system_time;
        self.sys.kvm_wall_clock = p.kvm_wall_clock;
        self.sys.halted = p.halted;
        self.sys.shadow = p.interrupt_shadow;
        self.sys.nmi_blocked = p.nmi_blocked;
        self.sys.software_interrupt = None;
        self.sys.recheck = true;
        self.waiting_for_sipi = p.waiting_for_sipi;
        self.nmi_pending = p.nmi_pending;
        self.irq_pending = false;
        self.mmu.sync(&self.state);
        self.mmu.flush_all();
        self.cache.flush();
        self.resync = true;
        Ok(())
    }

    /// Put the CPU in the wait-for-SIPI state of an application processor: `run` then
    /// sleeps until INIT/SIPI arrive through the local APIC; SIPI starts it in real mode
    /// at vector << 12.
    pub fn wait_for_sipi(&mut self) {
        self.waiting_for_sipi = true;
    }

    /// Compile blocks after `threshold` entries, or never (None). The default comes from
    /// the environment (see [`crate::jit`]).
    pub fn set_jit_threshold(&mut self, threshold: Option<u16>) {
        self.cache.set_jit_threshold(threshold);
        self.mmu.invalidate_jumps();
    }

    /// Entries into compiled code from the run loop.
    pub fn compiled_runs(&self) -> u64 {
        self.compiled_runs
    }

    /// Instructions that ran as compiled code.
    pub fn compiled_instructions(&self) -> u64 {
        self.compiled_instructions
    }

    /// Log every executed instruction (tracing target "emu::trace", level trace).
    pub fn set_trace(&mut self, on: bool) {
        self.trace = on;
    }

    /// Sample the guest RIP once per batch of instructions (also enabled by the
    /// EMU_PROFILE environment variable); the top addresses of every 16384 samples are
    /// logged, and [`Cpu::profile_report`] gives those of the current interval.
    pub fn set_profile(&mut self, on: bool) {
        self.profile = on.then(std::collections::HashMap::new);
    }

    /// The most sampled guest RIPs, most frequent first.
    pub fn profile_report(&self) -> String {
        let Some(p) = &self.profile else {
            return String::new();
        };
        let total: u64 = p.values().sum();
        let mut v: Vec<_> = p.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        let mut out = format!(
            "cpu {} rip samples: {total}, instructions: {}\n",
            self.id, self.instructions
        );
        for (rip, n) in v.into_iter().take(25) {
            let _ = writeln!(
                out,
                "  {rip:016x} {n:8} {:5.1}%",
                *n as f64 * 100.0 / total.max(1) as f64
            );
        }
        out
    }

    /// Whether the CPU waits for an interrupt: in HLT, or an AP waiting for its SIPI.
    pub fn is_halted(&self) -> bool {
        self.sys.halted || self.waiting_for_sipi
    }

    pub fn instruction_count(&self) -> u64 {
        self.instructions
    }

    /// Rewrite the kvmclock structure (after a resume or migration).
    pub fn refresh_kvmclock(&mut self) {
        crate::msr::refresh_kvmclock(&mut self.mmu, &mut self.sys);
    }

    /// Execute until `stop` is set (returns `Stopped`) or the CPU shuts down.
    pub fn run(&mut self, stop: &AtomicBool) -> RunExit {
        if self.resync {
            self.mmu.sync(&self.state);
            self.mmu.flush_all();
            self.resync = false;
        }
        let resumes = self.sys.clock.resumes();
        if resumes != self.seen_resumes {
            self.seen_resumes = resumes;
            crate::msr::mark_guest_stopped(&mut self.mmu, &self.sys);
        }
        loop {
            if stop.load(Ordering::Relaxed) {
                return RunExit::Stopped;
            }
            let epoch = self.mmu.ram.map_epoch();
            if epoch != self.seen_map_epoch {
                // A device region (a framebuffer BAR) moved: translations to it are stale.
                self.seen_map_epoch = epoch;
                self.mmu.flush_all();
            }
            self.poll_events();
            if self.waiting_for_sipi {
                self.sleep();
                continue;
            }
            if self.sys.halted {
                let wake = self.nmi_pending || (self.irq_pending && self.state.flag(IF));
                if !wake {
                    self.sleep();
                    continue;
                }
                self.sys.halted = false;
            }
            if let Err(exit) = self.deliver_events() {
                return exit;
            }
            self.sys.recheck = false;
            self.mmu.mmio_touched = false;
            let mut executed = 0u32;
            while executed < BATCH {
                match self.run_block(BATCH - executed) {
                    // A fault was delivered: count it so a fault loop still polls.
                    Ok(n) => executed += n.max(1),
                    Err(exit) => return exit,
                }
                if self.sys.halted || self.sys.recheck || self.mmu.mmio_touched {
                    break;
                }
                if self.irq_pending && !self.sys.shadow && self.state.flag(IF) {
                    if let Err(exit) = self.deliver_events() {
                        return exit;
                    }
                }
            }
            if let Some(p) = &mut self.profile {
                *p.entry(self.state.rip).or_default() += 1;
                self.profile_samples += 1;
                if self.profile_samples.is_multiple_of(1 << 14) {
                    tracing::info!("{}", self.profile_report());
                    // Each report covers the interval since the previous one.
                    if let Some(p) = &mut self.profile {
                        p.clear();
                    }
                }
            }
        }
    }

    /// Take APIC messages, timer expiry, INIT/SIPI/NMI; refresh `irq_pending`.
    fn poll_events(&mut self) {
        let lapic = &mut self.mmu.lapic;
        lapic.poll();
        if lapic.take_init() {
            self.init();
        }
        if self.waiting_for_sipi {
            if let Some(vector) = self.mmu.lapic.take_sipi() {
                self.start_from_sipi(vector);
            }
            return;
        }
        if self.mmu.lapic.take_nmi() {
            self.nmi_pending = true;
        }
        self.irq_pending = self.mmu.lapic.has_interrupt();
    }

    /// INIT: registers to their INIT values, APIC reset, wait for SIPI.
    fn init(&mut self) {
        let msrs = self.state.msr;
        self.state = CpuState::power_on();
        // INIT keeps the MTRRs and a few other MSRs.
        self.state.msr.mtrr_def_type = msrs.mtrr_def_type;
        self.state.msr.mtrr_fixed = msrs.mtrr_fixed;
        self.state.msr.mtrr_var = msrs.mtrr_var;
        self.state.msr.misc_enable = msrs.misc_enable;
        self.mmu.lapic.init_reset();
        self.sys.halted = false;
        self.sys.shadow = false;
        self.sys.nmi_blocked = false;
        self.nmi_pending = false;
        self.waiting_for_sipi = true;
        self.mmu.sync(&self.state);
        self.mmu.flush_all();
    }

    fn start_from_sipi(&mut self, vector: u8) {
        self.waiting_for_sipi = false;
        let sel = u16::from(vector) << 8;
        self.state.seg[CS] = Segment::real_mode(sel, true);
        self.state.rip = 0;
        self.sys.halted = false;
        self.mmu.sync(&self.state);
        self.mmu.flush_all();
    }

    /// Sleep until the inbox has work, the APIC timer is due, or a kick.
    fn sleep(&mut self) {
        let deadline = self.mmu.lapic.next_deadline();
        match &self.inbox {
            Some(inbox) => inbox.wait(deadline),
            None => {
                let max = Instant::now() + Duration::from_millis(1);
                let until = deadline.map_or(max, |d| d.min(max));
                if let Some(d) = until.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        }
    }

    /// Deliver a pending NMI or interrupt if the CPU accepts one now.
    fn deliver_events(&mut self) -> Result<(), RunExit> {
        if self.sys.shadow {
            return Ok(());
        }
        if self.nmi_pending && !self.sys.nmi_blocked {
            self.nmi_pending = false;
            self.sys.nmi_blocked = true;
            self.sys.halted = false;
            let e = interrupt::deliver_event(&mut self.state, &mut self.mmu, 2, EventKind::Nmi);
            return self.escalate(e);
        }
        if self.irq_pending && self.state.flag(IF) {
            let vector = self.mmu.lapic.acknowledge();
            self.irq_pending = self.mmu.lapic.has_interrupt();
            if let Some(vector) = vector {
                self.sys.halted = false;
                let e = interrupt::deliver_event(
                    &mut self.state,
                    &mut self.mmu,
                    vector,
                    EventKind::External,
                );
                return self.escalate(e);
            }
        }
        Ok(())
    }

    fn escalate(&mut self, e: Escalation) -> Result<(), RunExit> {
        match e {
            Escalation::Delivered => Ok(()),
            Escalation::TripleFault => {
                tracing::error!(cpu = self.id, "triple fault\n{}", self.dump());
                Err(RunExit::TripleFault)
            }
        }
    }

    fn raise(&mut self, ex: Exception) -> Result<(), RunExit> {
        if self.trace {
            tracing::trace!(target: "emu::trace", cpu = self.id, "exception {ex:?} at {:#x}", self.state.rip);
        }
        let e = interrupt::deliver_exception(&mut self.state, &mut self.mmu, ex);
        self.escalate(e)
    }

    /// Execute up to `budget` instructions of the block at RIP, stopping early where an
    /// event may need attention (a deliverable interrupt, HLT, MMIO/port access, an MSR
    /// write, a write to the block's code page, a branch). Faults are delivered here.
    /// Returns the number of instructions completed.
    #[inline]
    fn run_block(&mut self, budget: u32) -> Result<u32, RunExit> {
        enum Pending {
            None,
            Fault(Exception),
            Software(crate::exec::system::SoftwareInterrupt, u64),
        }
        let rip = self.state.rip;
        let bitness = self.state.bitness();
        let lin = self.state.seg[CS].base.wrapping_add(rip);
        let (block, jit) = match self.cache.block(&mut self.mmu, rip, bitness) {
            Ok(b) => b,
            Err(e) => {
                self.note_history(lin, bitness, 1);
                self.raise(e)?;
                return Ok(0);
            }
        };
        let mut done = 0u32;
        let mut pending = Pending::None;
        let last = block.instrs.len().saturating_sub(1);
        self.mmu.code_written = false;
        let trace = self.trace;
        // The interrupt shadow of STI/MOV SS covers the next instruction only. Only system
        // instructions set it, and they end blocks, so clearing it here and before each
        // generic instruction clears it before every instruction.
        self.sys.shadow = false;
        // A block that branches back to its own start (a tight loop) runs again without a
        // lookup, as long as nothing that a lookup or the run loop would notice happened.
        loop {
            let pass_start = done;
            let mut last_fast = false;
            // A pass the budget may stop inside the block computes every form's flags (the
            // dead-flag pass assumed the block runs to its end or a branch out).
            let force_flags = ((budget - done) as usize) <= last;
            // The budget may end the pass early; everything else that ends it is checked
            // after the instructions that can cause it (`Op::exits`).
            let n = block.ops.len().min((budget - done) as usize);
            // Compiled code runs the block when the budget allows all of it; the
            // interpreter goes on from where it stopped, if it did.
            let mut from = 0;
            if let (Some(code), Some(jit), false, true) =
                (block.code(), jit, trace, n == block.ops.len())
            {
                if let Some(view) = self.mmu.jit_view() {
                    let mut ctx = crate::jit::JitCtx::from_view(&view);
                    // Compiled code may go on into other compiled blocks (and loop in
                    // place) while the budget lasts: nothing that the checks below look
                    // at changes in compiled code (no MMIO, no code writes, no change to
                    // IF or the pending set).
                    ctx.budget = u64::from(budget - done);
                    let before = ctx.budget;
                    self.compiled_runs += 1;
                    // SAFETY: the code was compiled by this CPU's Jit for this block and
                    // the context is this CPU's TLB, jump cache and RAM bitmaps.
                    let exit = unsafe { jit.run(code, &mut self.state, &mut ctx) };
                    done += (before - ctx.budget) as u32;
                    self.compiled_instructions += before - ctx.budget;
                    match exit {
                        crate::jit::Exit::Done => {
                            from = n;
                            last_fast = true;
                        }
                        crate::jit::Exit::Interpret(k) if ctx.exit_block == block.ip() => {
                            from = k as usize;
                        }
                        crate::jit::Exit::Interpret(_) => {
                            // Another block left for the interpreter: RIP is at the
                            // instruction; the next lookup starts there.
                            from = n;
                        }
                    }
                }
            }
            let ops = block.instrs[..n].iter().zip(&block.ops[..n]);
            for (index, (instr, op)) in ops.enumerate().skip(from) {
                let fast = &op.fast;
                let start = self.state.rip;
                let next = start.wrapping_add(u64::from(op.len));
                if trace {
                    tracing::trace!(target: "emu::trace", cpu = self.id, "{:04x}:{:016x} {}", self.state.seg[CS].selector, start, instr);
                }
                let result = match fast {
                    Fast::Generic => {
                        last_fast = false;
                        self.sys.shadow = false;
                        self.state.rip = match bitness {
                            64 => instr.next_ip(),
                            32 => instr.next_ip() & 0xffff_ffff,
                            _ => instr.next_ip() & 0xffff,
                        };
                        let r = crate::exec::execute(
                            &mut self.state,
                            &mut self.mmu,
                            &mut self.sys,
                            instr,
                            index == last,
                        );
                        if r.is_ok() {
                            if let Some(si) = self.sys.software_interrupt.take() {
                                done += 1;
                                pending = Pending::Software(si, start);
                                break;
                            }
                            if self.sys.halted {
                                done += 1;
                                break;
                            }
                        }
                        r
                    }
                    // Fast forms exist only for 64-bit code.
                    f => {
                        last_fast = true;
                        self.state.rip = next;
                        crate::exec::fast::execute(f, &mut self.state, &mut self.mmu, force_flags)
                    }
                };
                match result {
                    Ok(()) => done += 1,
                    Err(ex) => {
                        if !ex.is_trap() {
                            self.state.rip = start;
                        }
                        pending = Pending::Fault(ex);
                        break;
                    }
                }
                // Interrupts need no check here: IF and the pending set only change through
                // system instructions, which end blocks, or MMIO, which stops this one. A
                // taken branch, a REP instruction to resume, MMIO or a write to code stops it.
                if op.exits
                    && index + 1 < n
                    && (self.state.rip != next || self.mmu.mmio_touched || self.mmu.code_written)
                {
                    break;
                }
            }
            let ran = done - pass_start + u32::from(matches!(pending, Pending::Fault(_)));
            // (Field by field: `block` still borrows the decode cache.) Compiled code that
            // went on to other blocks is recorded as this block alone: the ring shows where
            // each pass started, not every block it chained through.
            self.history[self.history_pos] = HistoryEntry {
                lin,
                bitness,
                count: ran.clamp(1, block.ops.len().max(1) as u32),
            };
            self.history_pos = (self.history_pos + 1) % HISTORY;
            let again = matches!(pending, Pending::None)
                && last_fast
                && done < budget
                && self.state.rip == rip
                && !self.mmu.mmio_touched
                && !self.mmu.code_written
                && !(self.irq_pending && self.state.flag(IF))
                && (block.page == crate::decode::UNCACHED
                    || self.mmu.ram.generation(block.page as usize) == block.generation);
            if !again {
                break;
            }
        }
        self.instructions += u64::from(done);
        match pending {
            Pending::None => {}
            Pending::Fault(ex) => {
                // Whatever the instruction changed in the mode, re-snapshot it.
                self.mmu.sync(&self.state);
                self.raise(ex)?;
            }
            Pending::Software(si, start) => {
                let kind = if si.check_dpl {
                    EventKind::Software
                } else {
                    EventKind::Icebp
                };
                let r = interrupt::deliver(&mut self.state, &mut self.mmu, si.vector, None, kind);
                self.mmu.sync(&self.state);
                if let Err(ex) = r {
                    // A fault while delivering INT n points at the INT instruction.
                    self.state.rip = start;
                    self.raise(ex)?;
                }
            }
        }
        Ok(done)
    }

    #[inline(always)]
    fn note_history(&mut self, lin: u64, bitness: u32, count: u32) {
        self.history[self.history_pos] = HistoryEntry {
            lin,
            bitness,
            count,
        };
        self.history_pos = (self.history_pos + 1) % HISTORY;
    }

    /// Execute up to `n` instructions (delivering pending events in between), stopping
    /// early at HLT. For tests and debugging; `run` is the normal entry.
    pub fn step_n(&mut self, n: u64) -> Result<(), RunExit> {
        if self.resync {
            self.mmu.sync(&self.state);
            self.mmu.flush_all();
            self.resync = false;
        }
        let mut left = n;
        while left > 0 {
            self.poll_events();
            if self.sys.halted || self.waiting_for_sipi {
                return Ok(());
            }
            self.deliver_events()?;
            self.sys.recheck = false;
            self.mmu.mmio_touched = false;
            let done = self.run_block(left.min(u64::from(u32::MAX)) as u32)?;
            // A faulting instruction counts as a step.
            left -= u64::from(done.max(1)).min(left);
        }
        Ok(())
    }

    /// Registers in a format close to QEMU's `-d cpu`, then the last executed
    /// instructions (disassembled from current memory contents).
    pub fn dump(&self) -> String {
        let s = &self.state;
        let mut out = String::new();
        let g = &s.gpr;
        let _ = writeln!(
            out,
            "CPU#{} RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}",
            self.id, g[0], g[3], g[1], g[2]
        );
        let _ = writeln!(
            out,
            "RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}",
            g[6], g[7], g[5], g[4]
        );
        for i in (8..16).step_by(4) {
            let _ = writeln!(
                out,
                "R{:<2}={:016x} R{:<2}={:016x} R{:<2}={:016x} R{:<2}={:016x}",
                i,
                g[i],
                i + 1,
                g[i + 1],
                i + 2,
                g[i + 2],
                i + 3,
                g[i + 3]
            );
        }
        let flag_chars: String = [
            (OF, 'O'),
            (DF, 'D'),
            (IF, 'I'),
            (TF, 'T'),
            (SF, 'S'),
            (ZF, 'Z'),
            (AF, 'A'),
            (PF, 'P'),
            (CF, 'C'),
        ]
        .iter()
        .map(|&(f, c)| if s.flag(f) { c } else { '-' })
        .collect();
        let _ = writeln!(
            out,
            "RIP={:016x} RFL={:08x} [{}] CPL={} II={} HLT={} INSNS={}",
            s.rip,
            s.rflags,
            flag_chars,
            s.cpl(),
            u8::from(self.sys.shadow),
            u8::from(self.sys.halted),
            self.instructions
        );
        let seg_line = |name: &str, seg: &Segment| {
            let attr = (u32::from(seg.type_) << 8)
                | (u32::from(seg.s) << 12)
                | (u32::from(seg.dpl) << 13)
                | (u32::from(seg.present) << 15)
                | (u32::from(seg.avl) << 20)
                | (u32::from(seg.l) << 21)
                | (u32::from(seg.db) << 22)
                | (u32::from(seg.g) << 23);
            format!(
                "{:<3}={:04x} {:016x} {:08x} {:08x}\n",
                name, seg.selector, seg.base, seg.limit, attr
            )
        };
        for (i, name) in ["ES", "CS", "SS", "DS", "FS", "GS"].iter().enumerate() {
            out.push_str(&seg_line(name, &s.seg[i]));
        }
        out.push_str(&seg_line("LDT", &s.ldtr));
        out.push_str(&seg_line("TR", &s.tr));
        let _ = writeln!(out, "GDT=     {:016x} {:08x}", s.gdtr.base, s.gdtr.limit);
        let _ = writeln!(out, "IDT=     {:016x} {:08x}", s.idtr.base, s.idtr.limit);
        let _ = writeln!(
            out,
            "CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x}",
            s.cr0, s.cr2, s.cr3, s.cr4
        );
        let _ = writeln!(
            out,
            "DR6={:016x} DR7={:016x} EFER={:016x} KGSBASE={:016x}",
            s.dr[6], s.dr[7], s.efer, s.msr.kernel_gs_base
        );
        // Expand the block history into instructions, oldest first.
        let mut executed: Vec<(u64, u32, Instruction, usize, [u8; 15])> = Vec::new();
        for k in 0..HISTORY {
            let e = self.history[(self.history_pos + k) % HISTORY];
            if e.bitness == 0 {
                continue;
            }
            let mut lin = e.lin;
            for _ in 0..e.count {
                let mut bytes = [0u8; 15];
                let got = self.mmu.debug_read(lin, &mut bytes);
                let mut decoder =
                    Decoder::with_ip(e.bitness, &bytes[..got], lin, DecoderOptions::NONE);
                let instr = decoder.decode();
                executed.push((lin, e.bitness, instr, got, bytes));
                if got == 0 || instr.is_invalid() {
                    break;
                }
                lin = lin.wrapping_add(instr.len() as u64);
            }
        }
        let skip = executed.len().saturating_sub(HISTORY_SHOWN);
        let _ = writeln!(
            out,
            "Last {} instructions (oldest first):",
            executed.len() - skip
        );
        let mut formatter = IntelFormatter::new();
        for (lin, _, instr, got, bytes) in &executed[skip..] {
            if *got == 0 {
                let _ = writeln!(out, "  {lin:016x}  <not mapped>");
                continue;
            }
            let mut text = String::new();
            formatter.format(instr, &mut text);
            let hex: String = bytes[..instr.len().min(*got)]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let _ = writeln!(out, "  {lin:016x}  {hex:<30} {text}");
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::Mutex;

    use super::*;
    use crate::router::ApicRouter;

    /// Port writes are recorded; everything else reads as all-ones.
    #[derive(Default)]
    pub struct TestIo {
        pub writes: Mutex<Vec<(u16, Vec<u8>)>>,
    }

    impl IoBus for TestIo {
        fn pio_read(&self, _port: u16, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn pio_write(&self, port: u16, data: &[u8]) {
            self.writes.lock().unwrap().push((port, data.to_vec()));
        }
        fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
    }

    pub fn lapic(clock: &Arc<VirtualClock>) -> (LocalApic, Arc<ApicInbox>) {
        let router = ApicRouter::new(1);
        let inbox = router.inbox(0);
        (
            LocalApic::new(0, true, inbox.clone(), router, clock.clone()),
            inbox,
        )
    }

    pub fn cpu(ram_size: usize) -> (Cpu, Arc<GuestRam>, Arc<TestIo>) {
        let ram = crate::ram::test_util::ram(ram_size);
        let clock = Arc::new(VirtualClock::new());
        let (lapic, inbox) = lapic(&clock);
        let io = Arc::new(TestIo::default());
        let mut cpu = Cpu::new(0, ram.clone(), io.clone(), lapic, clock);
        cpu.set_inbox(inbox);
        (cpu, ram, io)
    }

    pub const PML4: u64 = 0x10000;

    /// Identity-map the first 1 GiB with 2 MiB pages (tables at 0x10000..0x13000).
    pub fn identity_map(ram: &GuestRam) {
        ram.write_u64(PML4, 8, 0x11000 | 7);
        ram.write_u64(0x11000, 8, 0x12000 | 7);
        for i in 0..512u64 {
            ram.write_u64(0x12000 + i * 8, 8, (i << 21) | 0x87);
        }
    }

    /// 64-bit ring-0 state with paging through `PML4`.
    pub fn long_mode(state: &mut CpuState) {
        state.cr0 = CR0_PE | CR0_PG | CR0_WP | CR0_ET;
        state.cr4 = CR4_PAE | CR4_PGE;
        state.cr3 = PML4;
        state.efer = EFER_LME | EFER_LMA | EFER_NXE | EFER_SCE;
        state.seg[CS] = crate::exec::system::parse_descriptor(0x00af_9b00_0000_ffff, 0x10);
        for seg in [ES, SS, DS, FS, GS] {
            state.seg[seg] = crate::exec::system::parse_descriptor(0x00cf_9300_0000_ffff, 0x18);
        }
    }
}

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::*;

    use super::test_util::*;
    use super::*;

    fn load(ram: &GuestRam, addr: u64, bytes: &[u8]) {
        assert!(ram.write_bytes(addr, bytes));
    }

    fn asm64(addr: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        f(&mut a).unwrap();
        a.assemble(addr).unwrap()
    }

    /// A 64-bit CPU at a loop: rax += rbx; rbx = rbx * 3 + 1; [0x5000] = rax.
    fn looping_cpu() -> (Cpu, Arc<GuestRam>) {
        let (mut a, ram, _) = cpu(4 << 20);
        identity_map(&ram);
        long_mode(a.state_mut());
        a.state_mut().rip = 0x4000;
        load(
            &ram,
            0x4000,
            &asm64(0x4000, |c| {
                let mut top = c.create_label();
                c.set_label(&mut top)?;
                c.add(rax, rbx)?;
                c.lea(rbx, ptr(rbx + rbx * 2 + 1))?;
                c.mov(qword_ptr(0x5000), rax)?;
                c.jmp(top)
            }),
        );
        (a, ram)
    }

    /// A snapshot taken mid-program and restored into a second CPU on the same RAM makes
    /// it go on exactly as the first does.
    #[test]
    fn a_restored_snapshot_runs_on_identically() {
        let (mut a, ram) = looping_cpu();
        a.step_n(1000).unwrap();
        let snap = a.save();
        let clock = Arc::new(VirtualClock::new());
        let (lapic, inbox) = lapic(&clock);
        let mut b = Cpu::new(0, ram.clone(), Arc::new(TestIo::default()), lapic, clock);
        b.set_inbox(inbox);
        b.restore(&snap);
        assert_eq!(b.save(), snap, "a restored CPU saves the same");
        a.step_n(500).unwrap();
        let expected_rax = a.state().gpr[0];
        // b runs on the RAM a left: put back what a changed since the snapshot.
        ram.write_u64(0x5000, 8, snap.regs.gpr[0]);
        b.step_n(500).unwrap();
        assert_eq!(b.state().gpr[0], expected_rax);
        assert_eq!(b.state().rip, a.state().rip);
    }

    /// The portable form (what KVM would take) carries a CPU mid-program, local APIC and
    /// its running timer included, to a second CPU that goes on the same.
    #[test]
    fn an_exported_cpu_imports_and_runs_on_identically() {
        let (mut a, ram) = looping_cpu();
        // The APIC on, a one-shot timer counting (masked), a priority set.
        let apic = a.lapic();
        assert_eq!(
            apic.write_msr(crate::lapic::MSR_APIC_BASE, 0xfee0_0900),
            Some(Ok(()))
        );
        apic.write_mmio(0xf0, &0x1ffu32.to_le_bytes());
        apic.write_mmio(0x80, &0x20u32.to_le_bytes());
        apic.write_mmio(0x320, &0x1_0040u32.to_le_bytes());
        apic.write_mmio(0x3e0, &0xbu32.to_le_bytes());
        apic.write_mmio(0x380, &1_000_000_000u32.to_le_bytes());
        a.step_n(1000).unwrap();
        let exported = a.export();
        let clock = Arc::new(VirtualClock::new());
        // The destination's guest clock is well on (its platform is restored first).
        clock.set_now_ns(10_000_000_000);
        let (lapic, inbox) = lapic(&clock);
        let mut b = Cpu::new(0, ram.clone(), Arc::new(TestIo::default()), lapic, clock);
        b.set_inbox(inbox);
        b.import(&exported).unwrap();
        let again = b.export();
        assert_eq!(again.regs, exported.regs);
        assert_eq!(again.apic_base, exported.apic_base);
        let reg = |p: &[u8], o: usize| u32::from_le_bytes(p[o..o + 4].try_into().unwrap());
        for o in [0x20, 0x80, 0xd0, 0xe0, 0xf0, 0x320, 0x380, 0x3e0] {
            assert_eq!(
                reg(&again.apic_page, o),
                reg(&exported.apic_page, o),
                "{o:#x}"
            );
        }
        let (before, after) = (
            reg(&exported.apic_page, 0x390),
            reg(&again.apic_page, 0x390),
        );
        assert!(
            before > 0 && after <= before && after > before / 2,
            "{before} {after}"
        );
        assert!(b
            .import(&PortableCpu {
                apic_page: vec![0; 8],
                ..exported.clone()
            })
            .is_err());
        a.step_n(500).unwrap();
        b.step_n(500).unwrap();
        assert_eq!(b.state().gpr[0], a.state().gpr[0]);
        assert_eq!(b.state().rip, a.state().rip);
    }

    /// Every store reaches the dirty bitmap while logging is on, interpreted or compiled
    /// (compiled stores leave for the interpreter), and nothing else is marked.
    #[test]
    fn dirty_logging_sees_interpreted_and_compiled_stores() {
        for threshold in [None, Some(1)] {
            let (mut cpu, ram, _) = cpu(4 << 20);
            cpu.set_jit_threshold(threshold);
            identity_map(&ram);
            long_mode(cpu.state_mut());
            cpu.state_mut().rip = 0x4000;
            cpu.state_mut().gpr[3] = 0x20_0000;
            // Forever: [rbx] = rax over the 16 pages from 2 MiB, round and round.
            load(
                &ram,
                0x4000,
                &asm64(0x4000, |c| {
                    let mut top = c.create_label();
                    let mut next = c.create_label();
                    c.set_label(&mut top)?;
                    c.mov(qword_ptr(rbx), rax)?;
                    c.add(rbx, 4096)?;
                    c.cmp(rbx, 0x21_0000)?;
                    c.jb(next)?;
                    c.mov(rbx, 0x20_0000u64)?;
                    c.set_label(&mut next)?;
                    c.jmp(top)
                }),
            );
            // Warm up (the loop compiled, its pages in the TLB), then log from a clean
            // bitmap.
            cpu.step_n(400).unwrap();
            ram.set_dirty_logging(true);
            let compiled = cpu.compiled_runs();
            cpu.step_n(400).unwrap();
            if threshold.is_some() {
                assert!(cpu.compiled_runs() > compiled, "the loop ran compiled");
            }
            let bits = ram.take_dirty(1024);
            let dirty = |page: usize| bits[page / 64] & (1 << (page % 64)) != 0;
            for page in 0x200..0x210 {
                assert!(dirty(page), "page {page:#x} (jit {threshold:?})");
            }
            assert!(
                !dirty(0x100) && !dirty(0x210),
                "untouched pages (jit {threshold:?})"
            );
            assert!(
                ram.take_dirty(1024).iter().all(|w| *w == 0),
                "taken: cleared"
            );
            ram.set_dirty_logging(false);
        }
    }

    #[test]
    fn real_to_protected_to_long_mode() {
        let (mut cpu, ram, _) = cpu(4 << 20);
        identity_map(&ram);
        // GDT at 0x8100: null, 32-bit code 0x08, data 0x10, 64-bit code 0x18.
        for (i, d) in [
            0u64,
            0x00cf_9a00_0000_ffff,
            0x00cf_9200_0000_ffff,
            0x00af_9a00_0000_ffff,
        ]
        .iter()
        .enumerate()
        {
            ram.write_u64(0x8100 + 8 * i as u64, 8, *d);
        }
        // GDT pointer at 0x80f0.
        ram.write_u64(0x80f0, 2, 31);
        ram.write_u64(0x80f2, 4, 0x8100);

        let mut a = CodeAssembler::new(16).unwrap();
        a.cli().unwrap();
        a.lgdt(ptr(0x80f0)).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 1).unwrap();
        a.mov(cr0, eax).unwrap();
        // jmp dword 0x08:0x8200
        a.db(&[0x66, 0xea, 0x00, 0x82, 0x00, 0x00, 0x08, 0x00])
            .unwrap();
        load(&ram, 0x8000, &a.assemble(0x0).unwrap());

        let mut a = CodeAssembler::new(32).unwrap();
        a.mov(ax, 0x10).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(ss, ax).unwrap();
        a.mov(eax, cr4).unwrap();
        a.or(eax, 0x20).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(eax, PML4 as u32).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(ecx, 0xc000_0080u32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, 0x100).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32 as i32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.db(&[0xea, 0x00, 0x83, 0x00, 0x00, 0x18, 0x00]).unwrap();
        load(&ram, 0x8200, &a.assemble(0x8200).unwrap());

        load(
            &ram,
            0x8300,
            &asm64(0x8300, |a| {
                a.mov(rax, 0x1234_5678_9abc_u64)?;
                a.hlt()
            }),
        );

        // Start like an AP after SIPI vector 8.
        cpu.state_mut().seg[CS] = Segment::real_mode(0x800, true);
        cpu.state_mut().rip = 0;
        cpu.step_n(100).unwrap();
        let s = cpu.state();
        assert!(cpu.sys.halted, "reached HLT:\n{}", cpu.dump());
        assert_eq!(s.gpr[0], 0x1234_5678_9abc);
        assert!(s.long_mode() && s.code64());
        assert_eq!(s.seg[CS].selector, 0x18);
    }

    #[test]
    fn syscall_sysret_round_trip() {
        let (mut cpu, ram, _) = cpu(4 << 20);
        identity_map(&ram);
        let s = cpu.state_mut();
        long_mode(s);
        // STAR: kernel CS 0x10 (SS 0x18), user base 0x20 (SS 0x28, CS64 0x30).
        s.msr.star = (0x20u64 << 48) | (0x10u64 << 32);
        s.msr.lstar = 0x5000;
        s.msr.fmask = IF | DF;
        s.rflags |= IF;
        s.rip = 0x4000;
        load(
            &ram,
            0x4000,
            &asm64(0x4000, |a| {
                a.syscall()?;
                a.mov(rbx, 7u64)?;
                a.hlt()
            }),
        );
        load(
            &ram,
            0x5000,
            &asm64(0x5000, |a| {
                a.mov(rdx, 0x42u64)?;
                a.sysretq()
            }),
        );
        cpu.step_n(1).unwrap();
        assert_eq!(cpu.state().rip, 0x5000);
        assert_eq!(cpu.state().seg[CS].selector, 0x10);
        assert_eq!(cpu.state().seg[SS].selector, 0x18);
        assert!(!cpu.state().flag(IF), "FMASK cleared IF");
        assert_eq!(cpu.state().gpr[1], 0x4002, "RCX = return address");
        cpu.step_n(2).unwrap();
        let s = cpu.state();
        assert_eq!(s.seg[CS].selector, 0x33);
        assert_eq!(s.seg[SS].selector, 0x2b);
        assert_eq!(s.cpl(), 3);
        assert!(s.flag(IF), "RFLAGS restored from R11");
        assert_eq!(s.rip, 0x4002);
        assert_eq!(s.gpr[2], 0x42);
    }

    /// A 64-bit IDT, GDT and TSS in RAM for delivery tests.
    fn setup_idt(ram: &GuestRam, state: &mut CpuState, vector: u8, ist: u64, handler: u64) {
        let gdt = 0x1000u64;
        let tss = 0x2000u64;
        let idt = 0x3000u64;
        ram.write_u64(gdt + 0x10, 8, 0x00af_9b00_0000_ffff); // kernel CS
        ram.write_u64(gdt + 0x18, 8, 0x00cf_9300_0000_ffff); // kernel SS
        ram.write_u64(gdt + 0x28, 8, 0x00cf_f300_0000_ffff); // user SS
        ram.write_u64(gdt + 0x30, 8, 0x00af_fb00_0000_ffff); // user CS
        state.gdtr = DescriptorTable {
            base: gdt,
            limit: 0x7f,
        };
        // TSS: RSP0 = 0x9000, IST1 = 0xa000.
        ram.write_u64(tss + 4, 8, 0x9000);
        ram.write_u64(tss + 0x24, 8, 0xa000);
        state.tr = Segment {
            selector: 0x40,
            base: tss,
            limit: 0x67,
            type_: 0xb,
            present: true,
            ..Default::default()
        };
        let gate_lo = (handler & 0xffff)
            | (0x10 << 16)
            | (ist << 32)
            | (0x8e << 40)
            | ((handler & 0xffff_0000) << 32);
        ram.write_u64(idt + u64::from(vector) * 16, 8, gate_lo);
        ram.write_u64(idt + u64::from(vector) * 16 + 8, 8, handler >> 32);
        state.idtr = DescriptorTable {
            base: idt,
            limit: 0xfff,
        };
    }

    fn to_user(state: &mut CpuState) {
        state.seg[CS] = crate::exec::system::parse_descriptor(0x00af_fb00_0000_ffff, 0x33);
        state.seg[SS] = crate::exec::system::parse_descriptor(0x00cf_f300_0000_ffff, 0x2b);
    }

    #[test]
    fn interrupt_from_user_uses_ist_and_rsp0() {
        let (mut cpu, ram, _) = cpu(4 << 20);
        identity_map(&ram);
        let s = cpu.state_mut();
        long_mode(s);
        setup_idt(&ram, s, 0x30, 1, 0x6000);
        setup_idt(&ram, s, 0x31, 0, 0x6100);
        to_user(s);
        s.rip = 0x7000;
        s.gpr[4] = 0x7ff8;
        s.rflags = RFLAGS_FIXED | IF | CF;
        cpu.resync = false;
        cpu.mmu.sync(&cpu.state);

        let e = interrupt::deliver_event(&mut cpu.state, &mut cpu.mmu, 0x30, EventKind::External);
        assert_eq!(e, Escalation::Delivered);
        let s = cpu.state();
        assert_eq!(s.rip, 0x6000);
        assert_eq!(s.seg[CS].selector, 0x10);
        assert_eq!(s.seg[SS].selector, 0, "SS is null with RPL 0");
        assert_eq!(s.gpr[4], 0xa000 - 40, "IST1 stack, five words");
        assert!(!s.flag(IF), "interrupt gate clears IF");
        let frame: Vec<u64> = (0..5)
            .map(|i| ram.read_u64(0xa000 - 40 + 8 * i, 8).unwrap())
            .collect();
        assert_eq!(
            frame,
            vec![0x7000, 0x33, RFLAGS_FIXED | IF | CF, 0x7ff8, 0x2b]
        );

        // Without IST, a privilege change loads RSP0.
        to_user(&mut cpu.state);
        cpu.state.gpr[4] = 0x7ff8;
        cpu.state.rip = 0x7000;
        cpu.mmu.sync(&cpu.state);
        let e = interrupt::deliver_event(&mut cpu.state, &mut cpu.mmu, 0x31, EventKind::External);
        assert_eq!(e, Escalation::Delivered);
        assert_eq!(cpu.state.gpr[4], 0x9000 - 40);

        // IRETQ returns to ring 3.
        load(&ram, 0x6100, &asm64(0x6100, |a| a.iretq()));
        cpu.step_n(1).unwrap();
        let s = cpu.state();
        assert_eq!((s.rip, s.cpl(), s.gpr[4]), (0x7000, 3, 0x7ff8));
        assert_eq!(s.seg[SS].selector, 0x2b);
    }

    #[test]
    fn software_interrupt_checks_gate_dpl() {
        let (mut cpu, ram, _) = cpu(4 << 20);
        identity_map(&ram);
        let s = cpu.state_mut();
        long_mode(s);
        setup_idt(&ram, s, 0x80, 0, 0x6000); // DPL 0 gate
        setup_idt(&ram, s, 13, 0, 0x6100);
        to_user(s);
        s.rip = 0x7000;
        s.gpr[4] = 0x7ff8;
        load(&ram, 0x7000, &asm64(0x7000, |a| a.int(0x80)));
        cpu.step_n(1).unwrap();
        assert_eq!(cpu.state().rip, 0x6100, "#GP instead of the DPL-0 gate");
        let err = ram.read_u64(0x9000 - 48, 8).unwrap();
        assert_eq!(err, (0x80 << 3) | 2, "error code names the IDT entry");
        let rip = ram.read_u64(0x9000 - 40, 8).unwrap();
        assert_eq!(rip, 0x7000, "#GP is a fault: RIP of the INT");
    }

    #[test]
    fn fault_during_double_fault_is_a_triple_fault() {
        let (mut cpu, ram, _) = cpu(4 << 20);
        identity_map(&ram);
        let s = cpu.state_mut();
        long_mode(s);
        s.idtr = DescriptorTable { base: 0, limit: 0 };
        s.rip = 0x4000;
        load(&ram, 0x4000, &asm64(0x4000, |a| a.ud2()));
        assert_eq!(cpu.step_n(1), Err(RunExit::TripleFault));
    }

    /// Run the program at 0x4000 in long mode until HLT, compiled (every block at once) or
    /// interpreted: the final state, the RAM below 1 MiB, the instruction count and how
    /// many of them ran compiled.
    fn run_program(code: &[u8], threshold: Option<u16>) -> (CpuState, Vec<u8>, u64, u64) {
        let (mut cpu, ram, _) = cpu(4 << 20);
        cpu.set_jit_threshold(threshold);
        identity_map(&ram);
        let s = cpu.state_mut();
        long_mode(s);
        s.seg[FS].base = 0x8000;
        s.rip = 0x4000;
        load(&ram, 0x4000, code);
        for i in 0..128u64 {
            ram.write_u64(0x9000 + i * 8, 8, i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        cpu.step_n(1_000_000).unwrap();
        assert!(cpu.is_halted(), "the program ends at its HLT");
        let mut mem = vec![0u8; 1 << 20];
        assert!(ram.read_bytes(0, &mut mem));
        let compiled = cpu.compiled_instructions();
        (cpu.state().clone(), mem, cpu.instruction_count(), compiled)
    }

    /// A loop with every kind of compiled form (loads, read-modify-writes, an ADC chain,
    /// SETcc/CMOVcc, CALL/RET/PUSH/POP, a branch taken mid-block, FS-relative memory and a
    /// store to the page of the code itself) leaves exactly the interpreter's state.
    #[test]
    fn compiled_blocks_match_the_interpreter() {
        let code = asm64(0x4000, |a| {
            let mut top = a.create_label();
            let mut skip = a.create_label();
            let mut f = a.create_label();
            a.mov(rsp, 0x80000u64)?;
            a.mov(rsi, 0x9000u64)?;
            a.mov(rdi, 0x9200u64)?;
            a.mov(ecx, 64u32)?;
            a.xor(edx, edx)?;
            a.set_label(&mut top)?;
            a.mov(rax, qword_ptr(rsi + rdx * 8))?;
            a.adc(rax, qword_ptr(rdi + rdx * 8 + 8))?;
            a.mov(qword_ptr(rdi + rdx * 8), rax)?;
            a.setc(bl)?;
            a.movzx(r8d, bl)?;
            a.add(r9, r8)?;
            a.bt(eax, 3)?;
            a.jc(skip)?;
            a.add(dword_ptr(rsi + 0x300), eax)?;
            a.shl(word_ptr(rsi + rdx * 2 + 0x380), 3)?;
            a.set_label(&mut skip)?;
            a.call(f)?;
            a.inc(rdx)?;
            a.dec(rcx)?;
            a.jnz(top)?;
            // A block that loops on itself (in place, in compiled code), with an exit in
            // the middle of its pass and code after the loop branch.
            let mut again = a.create_label();
            let mut out = a.create_label();
            a.mov(ecx, 3000u32)?;
            a.set_label(&mut again)?;
            a.add(r9, rcx)?;
            a.adc(r10, 0)?;
            a.cmp(r9, 0x7fff_0000)?;
            a.ja(out)?;
            a.dec(ecx)?;
            a.jnz(again)?;
            a.xor(r9, 5)?;
            a.set_label(&mut out)?;
            a.mov(byte_ptr(0x4fff), 0x90u32)?;
            a.hlt()?;
            a.set_label(&mut f)?;
            a.push(rbx)?;
            a.imul_3(r10, rax, 3)?;
            a.cmovc(r11, r10)?;
            a.xor(r10, qword_ptr(rsi))?;
            // (The same offset without FS: a compiled access that forgot the base would
            // hit in the TLB rather than leave for the interpreter.)
            a.add(r10, qword_ptr(rdx * 8 + 0x1000))?;
            a.add(r10, qword_ptr(rdx * 8 + 0x1000).fs())?;
            a.mov(qword_ptr(rdx * 8 + 0x1400).fs(), r10)?;
            a.movsxd(r12, dword_ptr(rsi + rdx * 4))?;
            a.sub(r13, r12)?;
            a.sbb(r14d, r12d)?;
            a.lea(r15, qword_ptr(r15 + r14 * 2 + 5))?;
            a.mov(qword_ptr(rsp - 0x100), r13)?;
            // Accesses that cross a page: the interpreter's.
            a.add(r13, qword_ptr(rsi + 0xffc))?;
            a.mov(dword_ptr(rsi + 0xffe), r13d)?;
            a.bswap(r13)?;
            a.ror(r13, 7)?;
            a.pop(rbx)?;
            a.ret()
        });
        let (interpreted, mem_i, count_i, compiled_i) = run_program(&code, None);
        let (compiled, mem_c, count_c, compiled_c) = run_program(&code, Some(0));
        assert_eq!(compiled_i, 0);
        assert!(
            compiled_c * 10 > count_c * 9,
            "{compiled_c} of {count_c} instructions ran compiled"
        );
        assert_eq!(compiled, interpreted);
        assert_eq!(count_c, count_i, "instruction count");
        assert!(mem_c == mem_i, "memory differs");
        assert_eq!(mem_c[0x4fff], 0x90, "the store to the code page was done");
    }

    /// Compiled blocks go on to each other through the jump cache, keyed by RIP: when the
    /// page under a RIP is remapped (INVLPG), the next call runs the new page's code.
    #[test]
    fn chained_blocks_follow_a_remapped_page() {
        let (mut cpu, ram, _) = cpu(8 << 20);
        cpu.set_jit_threshold(Some(0));
        identity_map(&ram);
        let s = cpu.state_mut();
        long_mode(s);
        s.rip = 0x4000;
        s.gpr[4] = 0x80000;
        let ret_with = |v: u32| {
            asm64(0x20_0000, |a| {
                a.mov(eax, v)?;
                a.ret()
            })
        };
        load(&ram, 0x20_0000, &ret_with(1));
        load(&ram, 0x40_0000, &ret_with(2));
        let code = asm64(0x4000, |a| {
            let mut l1 = a.create_label();
            let mut l2 = a.create_label();
            a.mov(ecx, 100u32)?;
            a.set_label(&mut l1)?;
            a.call(0x20_0000u64)?;
            a.add(ebx, eax)?;
            a.dec(ecx)?;
            a.jnz(l1)?;
            // Linear 2 MiB..4 MiB now maps physical 4 MiB.
            a.mov(rax, 0x40_0087u64)?;
            a.mov(qword_ptr(0x12008), rax)?;
            a.invlpg(byte_ptr(0x20_0000))?;
            a.mov(ecx, 100u32)?;
            a.set_label(&mut l2)?;
            a.call(0x20_0000u64)?;
            a.add(edx, eax)?;
            a.dec(ecx)?;
            a.jnz(l2)?;
            a.hlt()
        });
        load(&ram, 0x4000, &code);
        cpu.step_n(100_000).unwrap();
        assert!(cpu.is_halted());
        assert!(cpu.compiled_runs() > 0);
        assert_eq!(cpu.state().gpr[3], 100, "before the remap");
        assert_eq!(cpu.state().gpr[2], 200, "after the remap");
    }

    #[test]
    fn self_modifying_code_is_seen() {
        for threshold in [None, Some(0)] {
            self_modifying_code_is_seen_with(threshold);
        }
    }

    fn self_modifying_code_is_seen_with(threshold: Option<u16>) {
        let (mut cpu, ram, _) = cpu(4 << 20);
        cpu.set_jit_threshold(threshold);
        identity_map(&ram);
        let s = cpu.state_mut();
        long_mode(s);
        s.rip = 0x4000;
        // mov eax, 1 ; mov byte [0x4001], 2 ; jmp 0x4000
        load(
            &ram,
            0x4000,
            &asm64(0x4000, |a| {
                let mut start = a.create_label();
                a.set_label(&mut start)?;
                a.mov(eax, 1u32)?;
                a.mov(byte_ptr(0x4001), 2u32)?;
                a.jmp(start)
            }),
        );
        cpu.step_n(1).unwrap();
        assert_eq!(cpu.state().gpr[0], 1);
        cpu.step_n(3).unwrap();
        assert_eq!(cpu.state().rip, 0x4005);
        assert_eq!(cpu.state().gpr[0], 2, "the rewritten immediate was decoded");
        // A device write (DMA) invalidates too.
        ram.write_u64(0x4001, 1, 3);
        cpu.state_mut().rip = 0x4000;
        cpu.step_n(1).unwrap();
        assert_eq!(cpu.state().gpr[0], 3);
    }

    /// A block's dead-flag pass skips the flags of the ADD (the CMP overwrites them), but a
    /// run the budget stops right after the ADD shows them exactly.
    #[test]
    fn stepping_into_a_block_shows_the_flags_it_would_skip() {
        use crate::state::{CF, STATUS_FLAGS, ZF};
        let (mut cpu, ram, _) = cpu(4 << 20);
        identity_map(&ram);
        let s = cpu.state_mut();
        long_mode(s);
        s.rip = 0x4000;
        s.gpr[0] = u64::MAX;
        s.gpr[3] = 1;
        s.gpr[1] = 5;
        load(
            &ram,
            0x4000,
            &asm64(0x4000, |a| {
                a.add(rax, rbx)?;
                a.cmp(rax, rcx)?;
                a.add(rax, rbx)?;
                a.hlt()
            }),
        );
        cpu.step_n(1).unwrap();
        assert_eq!(cpu.state().gpr[0], 0);
        assert_eq!(
            cpu.state().rflags & (ZF | CF),
            ZF | CF,
            "the first ADD's flags"
        );
        // The rest as one block: the CMP's flags are dead (the second ADD overwrites them).
        cpu.step_n(3).unwrap();
        assert!(cpu.sys.halted);
        assert_eq!(cpu.state().gpr[0], 1);
        assert_eq!(cpu.state().rflags & STATUS_FLAGS, 0, "the last ADD's flags");
    }

    #[test]
    fn kvmclock_msr_writes_the_time_structure() {
        let (mut cpu, ram, _) = cpu(4 << 20);
        identity_map(&ram);
        let s = cpu.state_mut();
        long_mode(s);
        s.rip = 0x4000;
        s.gpr[1] = 0x4b56_4d01;
        s.gpr[0] = 0x8000 | 1;
        s.gpr[2] = 0;
        load(&ram, 0x4000, &asm64(0x4000, |a| a.wrmsr()));
        cpu.step_n(1).unwrap();
        let version = ram.read_u64(0x8000, 4).unwrap();
        assert!(version != 0 && version % 2 == 0);
        assert_eq!(ram.read_u64(0x8000 + 24, 4), Some(0x8000_0000), "mul");
        assert_eq!(ram.read_u64(0x8000 + 28, 1), Some(1), "shift");
        assert_eq!(ram.read_u64(0x8000 + 29, 1), Some(1), "TSC stable flag");
        // After a pause, the next run tells the guest (PVCLOCK_GUEST_STOPPED), once.
        let clock = cpu.sys.clock.clone();
        clock.pause();
        clock.resume();
        let stop = AtomicBool::new(true);
        assert!(matches!(cpu.run(&stop), RunExit::Stopped));
        assert_eq!(ram.read_u64(0x8000 + 29, 1), Some(3), "guest stopped flag");
        ram.write_bytes(0x8000 + 29, &[1]);
        assert!(matches!(cpu.run(&stop), RunExit::Stopped));
        assert_eq!(ram.read_u64(0x8000 + 29, 1), Some(1), "told only once");
    }

    #[test]
    fn port_io_then_hlt() {
        let (mut cpu, ram, io) = cpu(4 << 20);
        identity_map(&ram);
        let s = cpu.state_mut();
        long_mode(s);
        s.rip = 0x4000;
        load(
            &ram,
            0x4000,
            &asm64(0x4000, |a| {
                a.mov(al, 0x41u32)?;
                a.mov(dx, 0x3f8u32)?;
                a.out(dx, al)?;
                a.hlt()
            }),
        );
        cpu.step_n(10).unwrap();
        assert_eq!(io.writes.lock().unwrap().as_slice(), &[(0x3f8, vec![0x41])]);
        assert!(cpu.sys.halted);
    }

    #[test]
    fn hlt_wakes_on_a_posted_interrupt_and_run_stops_on_request() {
        let (mut cpu, ram, _) = cpu(4 << 20);
        identity_map(&ram);
        let inbox = cpu.inbox.clone().unwrap();
        let s = cpu.state_mut();
        long_mode(s);
        setup_idt(&ram, s, 0x40, 0, 0x6000);
        s.rip = 0x4000;
        s.gpr[4] = 0x8000;
        s.rflags |= IF;
        // sti; hlt; (interrupt) -> handler: mov ebx, 0x99; hlt
        load(&ram, 0x4000, &asm64(0x4000, |a| a.hlt()));
        load(
            &ram,
            0x6000,
            &asm64(0x6000, |a| {
                a.mov(ebx, 0x99u32)?;
                a.hlt()
            }),
        );
        // Software-enable the APIC so it accepts fixed interrupts.
        cpu.lapic().write_mmio(0xf0, &0x1ffu32.to_le_bytes());
        let stop = Arc::new(AtomicBool::new(false));
        let poster = {
            let stop = stop.clone();
            let inbox = inbox.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                inbox.post(crate::router::DeliveryMode::Fixed, 0x40, false);
                std::thread::sleep(Duration::from_millis(50));
                stop.store(true, Ordering::SeqCst);
                inbox.kick();
            })
        };
        assert_eq!(cpu.run(&stop), RunExit::Stopped);
        poster.join().unwrap();
        let handler_rbx = cpu.state().gpr[3];
        assert_eq!(handler_rbx, 0x99, "handler ran:\n{}", cpu.dump());
        assert!(cpu.sys.halted);
        assert!(cpu.dump().contains("RIP="));
    }

    /// Measures interpreter speed on a tight loop: `cargo test -p emu --release -- --ignored mips --nocapture`.
    #[test]
    #[ignore]
    fn mips_benchmark() {
        let (mut cpu, ram, _) = cpu(4 << 20);
        identity_map(&ram);
        let s = cpu.state_mut();
        long_mode(s);
        s.rip = 0x4000;
        load(
            &ram,
            0x4000,
            &asm64(0x4000, |a| {
                let mut top = a.create_label();
                a.set_label(&mut top)?;
                a.add(rax, 1)?;
                a.mov(qword_ptr(0x9000), rax)?;
                a.dec(rcx)?;
                a.jmp(top)
            }),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let timer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(2));
                stop.store(true, Ordering::SeqCst);
            })
        };
        let start = Instant::now();
        assert_eq!(cpu.run(&stop), RunExit::Stopped);
        let secs = start.elapsed().as_secs_f64();
        timer.join().unwrap();
        let mips = cpu.instruction_count() as f64 / secs / 1e6;
        eprintln!(
            "{} instructions in {secs:.2}s: {mips:.1} MIPS",
            cpu.instruction_count()
        );
        assert!(cpu.instruction_count() > 1_000_000);
    }

    #[test]
    fn application_processor_starts_on_init_sipi() {
        let (mut cpu, ram, _) = cpu(4 << 20);
        let inbox = cpu.inbox.clone().unwrap();
        cpu.wait_for_sipi();
        // mov ax, 0x1234 ; hlt at 0x9000 (vector 9)
        load(&ram, 0x9000, &[0xb8, 0x34, 0x12, 0xf4]);
        cpu.step_n(5).unwrap();
        assert_eq!(cpu.state().gpr[0], 0, "nothing runs before SIPI");
        inbox.post(crate::router::DeliveryMode::Init, 0, false);
        inbox.post(crate::router::DeliveryMode::StartUp, 9, false);
        cpu.step_n(5).unwrap();
        let s = cpu.state();
        assert_eq!(s.seg[CS].selector, 0x900);
        assert_eq!(s.gpr[0] & 0xffff, 0x1234);
        assert!(cpu.sys.halted);
    }
}
