//! The local APIC of one vCPU, owned by that vCPU's thread: xAPIC registers over MMIO,
//! x2APIC registers over MSRs 0x800..0x8ff, IA32_APIC_BASE, and the APIC timer in one-shot,
//! periodic and TSC-deadline modes. Messages from other CPUs and the IOAPIC arrive through
//! the [`ApicInbox`] and are merged into IRR by [`LocalApic::poll`].
//!
//! The timer counts at a 1 GHz bus clock (like KVM), so with divide-by-1 one tick is one
//! guest nanosecond; deadlines are kept in guest nanoseconds so periodic reloads never drift.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::clock::VirtualClock;
use crate::router::{ApicInbox, ApicMessage, ApicRouter, DeliveryMode, Destination};

/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// First and last x2APIC register MSRs.
pub const MSR_X2APIC_FIRST: u32 = 0x800;
pub const MSR_X2APIC_LAST: u32 = 0x8ff;

/// Default xAPIC MMIO base.
pub const APIC_DEFAULT_BASE: u64 = 0xfee0_0000;
/// Size of the xAPIC MMIO window.
pub const APIC_MMIO_SIZE: u64 = 0x1000;

const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_EXTD: u64 = 1 << 10;
const APIC_BASE_ENABLE: u64 = 1 << 11;
/// Physical-address bits of the base (MAXPHYADDR 46 is plenty for the check).
const APIC_BASE_ADDR_MASK: u64 = 0x0000_3fff_ffff_f000;

/// Version register: version 0x14, max LVT entry 5 (six LVTs), no EOI-broadcast suppression.
const APIC_VERSION: u32 = 0x0005_0014;

// Register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16).
const REG_ID: u32 = 0x20;
const REG_VERSION: u32 = 0x30;
const REG_TPR: u32 = 0x80;
const REG_APR: u32 = 0x90;
const REG_PPR: u32 = 0xa0;
const REG_EOI: u32 = 0xb0;
const REG_RRD: u32 = 0xc0;
const REG_LDR: u32 = 0xd0;
const REG_DFR: u32 = 0xe0;
const REG_SVR: u32 = 0xf0;
const REG_ISR: u32 = 0x100;
const REG_TMR: u32 = 0x180;
const REG_IRR: u32 = 0x200;
const REG_ESR: u32 = 0x280;
const REG_CMCI: u32 = 0x2f0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_ERROR: u32 = 0x370;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;
const REG_SELF_IPI: u32 = 0x3f0;
/// Bytes of the architectural register page.
const REGISTER_PAGE: usize = 0x400;

const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const NUM_LVT: usize = 6;
const LVT_MASKED: u32 = 1 << 16;
const LVT_DELIVERY_MODE_MASK: u32 = 7 << 8;
const LVT_MODE_EXTINT: u32 = 7 << 8;
const LVT_TIMER_MODE_MASK: u32 = 3 << 17;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
const LVT_TIMER_TSC_DEADLINE: u32 = 2 << 17;
/// Writable bits of each LVT (timer, thermal, perf, LINT0, LINT1, error).
const LVT_WRITABLE: [u32; NUM_LVT] = [
    0x0007_10ff,
    0x0001_07ff,
    0x0001_07ff,
    0x0001_a7ff,
    0x0001_a7ff,
    0x0001_00ff,
];

const SVR_ENABLE: u32 = 1 << 8;
/// ESR "received illegal vector" and "send illegal vector".
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

/// Timer counting modes (LVT timer bits 18:17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

/// A 256-bit vector register (ISR/TMR/IRR) as eight 32-bit words, as the guest reads them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct VectorSet([u32; 8]);

impl VectorSet {
    fn set(&mut self, vector: u8) {
        self.0[usize::from(vector >> 5)] |= 1 << (vector & 31);
    }
    fn clear(&mut self, vector: u8) {
        self.0[usize::from(vector >> 5)] &= !(1 << (vector & 31));
    }
    fn contains(&self, vector: u8) -> bool {
        self.0[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
    }
    fn highest(&self) -> Option<u8> {
        (0..8).rev().find_map(|i| {
            let word = self.0[i];
            (word != 0).then(|| (i as u32 * 32 + 31 - word.leading_zeros()) as u8)
        })
    }
}

/// A local APIC's registers and pending events: what a snapshot keeps of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LapicState {
    apic_base: u64,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: VectorSet,
    tmr: VectorSet,
    irr: VectorSet,
    /// ESR as last latched by a write, and the errors collected since.
    esr: u32,
    esr_pending: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; NUM_LVT],
    timer_initial: u32,
    timer_divide: u32,
    /// Guest ns at which the current one-shot/periodic count started.
    timer_start_ns: u64,
    /// Guest ns of the next timer expiry, if armed.
    timer_next_ns: Option<u64>,
    tsc_deadline: u64,
    nmi_pending: bool,
    init_pending: bool,
    sipi_pending: Option<u8>,
    extint_pending: bool,
}

/// One vCPU's local APIC.
pub struct LocalApic {
    id: u32,
    bsp: bool,
    inbox: Arc<ApicInbox>,
    router: Arc<ApicRouter>,
    clock: Arc<VirtualClock>,
    /// Everything a snapshot keeps, in one place so that none of it is left behind.
    regs: LapicState,
}

impl LocalApic {
    pub fn new(
        apic_id: u32,
        bsp: bool,
        inbox: Arc<ApicInbox>,
        router: Arc<ApicRouter>,
        clock: Arc<VirtualClock>,
    ) -> Self {
        let mut apic = Self {
            id: apic_id,
            bsp,
            inbox,
            router,
            clock,
            regs: LapicState {
                apic_base: 0,
                tpr: 0,
                ldr: 0,
                dfr: 0xffff_ffff,
                svr: 0xff,
                isr: VectorSet::default(),
                tmr: VectorSet::default(),
                irr: VectorSet::default(),
                esr: 0,
                esr_pending: 0,
                icr_low: 0,
                icr_high: 0,
                lvt: [LVT_MASKED; NUM_LVT],
                timer_initial: 0,
                timer_divide: 0,
                timer_start_ns: 0,
                timer_next_ns: None,
                tsc_deadline: 0,
                nmi_pending: false,
                init_pending: false,
                sipi_pending: None,
                extint_pending: false,
            },
        };
        apic.reset();
        apic
    }

    /// Power-on state: enabled in xAPIC mode at the default base, software-disabled.
    pub fn reset(&mut self) {
        self.regs.apic_base =
            APIC_DEFAULT_BASE | APIC_BASE_ENABLE | if self.bsp { APIC_BASE_BSP } else { 0 };
        self.init_reset();
        self.regs.nmi_pending = false;
        self.regs.init_pending = false;
        self.regs.sipi_pending = None;
        self.regs.extint_pending = false;
    }

    /// The state after an INIT: every register but the id and IA32_APIC_BASE reset.
    pub fn init_reset(&mut self) {
        self.regs.tpr = 0;
        self.regs.ldr = if self.x2apic() { self.x2apic_ldr() } else { 0 };
        self.regs.dfr = 0xffff_ffff;
        self.regs.svr = 0xff;
        self.regs.isr = VectorSet::default();
        self.regs.tmr = VectorSet::default();
        self.regs.irr = VectorSet::default();
        self.regs.esr = 0;
        self.regs.esr_pending = 0;
        self.regs.icr_low = 0;
        self.regs.icr_high = 0;
        self.regs.lvt = [LVT_MASKED; NUM_LVT];
        self.regs.timer_initial = 0;
        self.regs.timer_divide = 0;
        self.regs.timer_start_ns = 0;
        self.regs.timer_next_ns = None;
        self.regs.tsc_deadline = 0;
        self.publish_routing();
    }

    pub fn apic_id(&self) -> u32 {
        self.id
    }

    fn hw_enabled(&self) -> bool {
        self.regs.apic_base & APIC_BASE_ENABLE != 0
    }

    fn x2apic(&self) -> bool {
        self.hw_enabled() && self.regs.apic_base & APIC_BASE_EXTD != 0
    }

    fn sw_enabled(&self) -> bool {
        self.regs.svr & SVR_ENABLE != 0
    }

    fn x2apic_ldr(&self) -> u32 {
        ((self.id >> 4) << 16) | (1 << (self.id & 0xf))
    }

    /// The registers and pending events, for a snapshot (the inbox drained first).
    pub fn save(&mut self) -> LapicState {
        if self.inbox.has_work() {
            self.drain_inbox();
        }
        self.regs.clone()
    }

    /// Take a snapshot's registers (times are guest times: the clock is restored first),
    /// and tell the router where this APIC now listens.
    pub fn restore(&mut self, s: &LapicState) {
        self.regs = s.clone();
        self.publish_routing();
    }

    /// The registers as the architectural xAPIC register page (each 32-bit register at
    /// its MMIO offset, 16-byte strides; 1 KiB), the form KVM keeps a local APIC in. The
    /// timer's current count is read now; pending events other than the IRR stay behind.
    pub fn register_page(&mut self) -> Vec<u8> {
        if self.inbox.has_work() {
            self.drain_inbox();
        }
        let mut page = vec![0u8; REGISTER_PAGE];
        for reg in (0..REGISTER_PAGE as u32).step_by(16) {
            let value = match reg {
                // The page holds the xAPIC form of the ID, as KVM's does.
                REG_ID => self.id << 24,
                REG_ICR_LOW => self.regs.icr_low,
                _ => self.read_register(reg).unwrap_or(0),
            };
            page[reg as usize..reg as usize + 4].copy_from_slice(&value.to_le_bytes());
        }
        page
    }

    /// Take a register page ([`LocalApic::register_page`]'s form) and the APIC base MSR:
    /// the timer goes on from the page's current count, from now.
    pub fn load_register_page(&mut self, apic_base: u64, page: &[u8]) -> Result<(), String> {
        if page.len() < REGISTER_PAGE {
            return Err(format!(
                "a local APIC page of {} bytes, not {REGISTER_PAGE}",
                page.len()
            ));
        }
        let reg = |offset: u32| {
            let o = offset as usize;
            u32::from_le_bytes([page[o], page[o + 1], page[o + 2], page[o + 3]])
        };
        let vectors = |base: u32| VectorSet(std::array::from_fn(|i| reg(base + 16 * i as u32)));
        let r = &mut self.regs;
        r.apic_base = apic_base;
        r.tpr = reg(REG_TPR) & 0xff;
        r.ldr = reg(REG_LDR);
        r.dfr = reg(REG_DFR);
        r.svr = reg(REG_SVR);
        r.isr = vectors(REG_ISR);
        r.tmr = vectors(REG_TMR);
        r.irr = vectors(REG_IRR);
        r.esr = reg(REG_ESR);
        r.esr_pending = 0;
        r.icr_low = reg(REG_ICR_LOW);
        r.icr_high = reg(REG_ICR_HIGH);
        for (i, lvt) in r.lvt.iter_mut().enumerate() {
            *lvt = reg(REG_LVT_TIMER + 16 * i as u32);
        }
        r.timer_initial = reg(REG_TIMER_INITIAL);
        r.timer_divide = reg(REG_TIMER_DIVIDE) & 0xb;
        r.tsc_deadline = 0;
        r.nmi_pending = false;
        r.init_pending = false;
        r.sipi_pending = None;
        r.extint_pending = false;
        let current = reg(REG_TIMER_CURRENT);
        let now = self.clock.now_ns();
        let divisor = self.timer_divisor();
        let done = u64::from(self.regs.timer_initial.saturating_sub(current));
        self.regs.timer_start_ns = now.saturating_sub(done * divisor);
        self.regs.timer_next_ns = (current != 0 && self.timer_mode() != TimerMode::TscDeadline)
            .then(|| now + u64::from(current) * divisor);
        self.publish_routing();
        Ok(())
    }

    fn publish_routing(&self) {
        self.router.update_apic(
            self.id,
            self.hw_enabled(),
            self.x2apic(),
            self.regs.ldr,
            self.regs.dfr,
        );
    }

    /// Some(base) while enabled in xAPIC mode: MMIO there belongs to this APIC.
    pub fn mmio_base(&self) -> Option<u64> {
        (self.hw_enabled() && !self.x2apic()).then_some(self.regs.apic_base & APIC_BASE_ADDR_MASK)
    }

    /// The raw IA32_APIC_BASE value.
    pub fn apic_base(&self) -> u64 {
        self.regs.apic_base
    }

    // ---- priority and interrupt acceptance ----

    fn ppr(&self) -> u32 {
        let isr_class = self.regs.isr.highest().map_or(0, |v| u32::from(v) & 0xf0);
        let tpr_class = self.regs.tpr & 0xf0;
        if tpr_class >= isr_class {
            self.regs.tpr & 0xff
        } else {
            isr_class
        }
    }

    fn accept_fixed(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.regs.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
            return;
        }
        self.regs.irr.set(vector);
        if level {
            self.regs.tmr.set(vector);
        } else {
            self.regs.tmr.clear(vector);
        }
    }

    /// A fixed interrupt is deliverable: its priority class is above PPR's.
    pub fn has_interrupt(&self) -> bool {
        match self.regs.irr.highest() {
            Some(v) => u32::from(v) & 0xf0 > self.ppr() & 0xf0,
            None => false,
        }
    }

    /// INTA: moves the highest deliverable IRR vector to ISR and returns it.
    pub fn acknowledge(&mut self) -> Option<u8> {
        if !self.has_interrupt() {
            return None;
        }
        let vector = self.regs.irr.highest()?;
        self.regs.irr.clear(vector);
        self.regs.isr.set(vector);
        Some(vector)
    }

    fn end_of_interrupt(&mut self) {
        if let Some(vector) = self.regs.isr.highest() {
            self.regs.isr.clear(vector);
            if self.regs.tmr.contains(vector) {
                self.router.end_of_interrupt(vector);
            }
        }
    }

    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.regs.nmi_pending)
    }

    pub fn take_init(&mut self) -> bool {
        std::mem::take(&mut self.regs.init_pending)
    }

    pub fn take_sipi(&mut self) -> Option<u8> {
        self.regs.sipi_pending.take()
    }

    /// The CPU should fetch a vector from the 8259: an ExtINT message arrived, or LINT0 is
    /// in ExtINT mode (or the APIC is disabled, which passes INTR straight through) and the
    /// PIC's output is asserted.
    pub fn extint_requested(&mut self) -> bool {
        if std::mem::take(&mut self.regs.extint_pending) {
            return true;
        }
        if !self.inbox.extint_line() {
            return false;
        }
        // A hardware-disabled APIC passes INTR straight to the CPU.
        if !self.hw_enabled() {
            return true;
        }
        let lint0 = self.regs.lvt[LVT_LINT0];
        lint0 & LVT_MASKED == 0 && lint0 & LVT_DELIVERY_MODE_MASK == LVT_MODE_EXTINT
    }

    // ---- timer ----

    fn timer_mode(&self) -> TimerMode {
        match self.regs.lvt[LVT_TIMER] & LVT_TIMER_MODE_MASK {
            LVT_TIMER_PERIODIC => TimerMode::Periodic,
            LVT_TIMER_TSC_DEADLINE => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    /// Bus clocks per timer tick from the divide configuration register.
    fn timer_divisor(&self) -> u64 {
        let code = (self.regs.timer_divide & 3) | ((self.regs.timer_divide & 8) >> 1);
        if code == 7 {
            1
        } else {
            2 << code
        }
    }

    /// Guest ns per full count (bus clock 1 GHz).
    fn timer_period_ns(&self) -> u64 {
        u64::from(self.regs.timer_initial) * self.timer_divisor()
    }

    fn start_count(&mut self) {
        let now = self.clock.now_ns();
        self.regs.timer_start_ns = now;
        self.regs.timer_next_ns =
            (self.regs.timer_initial != 0).then(|| now + self.timer_period_ns());
    }

    fn timer_current_count(&self) -> u32 {
        if self.timer_mode() == TimerMode::TscDeadline || self.regs.timer_next_ns.is_none() {
            return 0;
        }
        let period = self.timer_period_ns();
        if period == 0 {
            return 0;
        }
        let elapsed = self.clock.now_ns().saturating_sub(self.regs.timer_start_ns);
        let elapsed = match self.timer_mode() {
            TimerMode::Periodic => elapsed % period,
            _ if elapsed >= period => return 0,
            _ => elapsed,
        };
        let ticks = elapsed / self.timer_divisor();
        self.regs.timer_initial.saturating_sub(ticks as u32)
    }

    fn fire_timer(&mut self) {
        let lvt = self.regs.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.accept_fixed(lvt as u8, false);
        }
    }

    fn poll_timer(&mut self) {
        let Some(next) = self.regs.timer_next_ns else {
            return;
        };
        let now = self.clock.now_ns();
        if now < next {
            return;
        }
        self.fire_timer();
        match self.timer_mode() {
            TimerMode::Periodic => {
                let period = self.timer_period_ns().max(1);
                // Skip missed periods but stay on the original grid.
                let missed = (now - next) / period;
                let next = next + (missed + 1) * period;
                self.regs.timer_start_ns = next - period;
                self.regs.timer_next_ns = Some(next);
            }
            TimerMode::OneShot => self.regs.timer_next_ns = None,
            TimerMode::TscDeadline => {
                self.regs.tsc_deadline = 0;
                self.regs.timer_next_ns = None;
            }
        }
    }

    /// Host time of the next timer expiry.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.regs
            .timer_next_ns
            .map(|ns| self.clock.host_deadline(ns))
    }

    /// Drains the inbox into IRR / pending NMI, INIT, SIPI, ExtINT and fires an expired
    /// timer. Call it when the inbox has work, after a timer deadline, and before checking
    /// for interrupts.
    pub fn poll(&mut self) {
        if self.inbox.has_work() {
            self.drain_inbox();
        }
        self.poll_timer();
    }

    fn drain_inbox(&mut self) {
        let got = self.inbox.take();
        if self.sw_enabled() {
            for word in 0..4 {
                let mut bits = got.fixed[word];
                while bits != 0 {
                    let bit = bits.trailing_zeros();
                    bits &= bits - 1;
                    let vector = (word as u32 * 64 + bit) as u8;
                    self.accept_fixed(vector, got.level[word] & (1 << bit) != 0);
                }
            }
        }
        self.regs.nmi_pending |= got.nmi;
        self.regs.init_pending |= got.init;
        if got.sipi.is_some() {
            self.regs.sipi_pending = got.sipi;
        }
        self.regs.extint_pending |= got.extint;
    }

    // ---- register file ----

    fn write_lvt(&mut self, index: usize, value: u32) {
        let mut value = value & LVT_WRITABLE[index];
        if !self.sw_enabled() {
            value |= LVT_MASKED;
        }
        if index == LVT_TIMER {
            let old_mode = self.timer_mode();
            self.regs.lvt[index] = value;
            let new_mode = self.timer_mode();
            if old_mode != new_mode
                && (old_mode == TimerMode::TscDeadline || new_mode == TimerMode::TscDeadline)
            {
                self.regs.timer_initial = 0;
                self.regs.tsc_deadline = 0;
                self.regs.timer_next_ns = None;
            }
            return;
        }
        self.regs.lvt[index] = value;
    }

    fn write_svr(&mut self, value: u32) {
        self.regs.svr = value & 0x1ff;
        if !self.sw_enabled() {
            for lvt in self.regs.lvt.iter_mut() {
                *lvt |= LVT_MASKED;
            }
        }
    }

    fn write_timer_initial(&mut self, value: u32) {
        if self.timer_mode() == TimerMode::TscDeadline {
            return;
        }
        self.regs.timer_initial = value;
        self.start_count();
    }

    fn write_timer_divide(&mut self, value: u32) {
        // Keep the current count running at the new rate from now on.
        let current = self.timer_current_count();
        self.regs.timer_divide = value & 0xb;
        if self.regs.timer_next_ns.is_some() && self.timer_mode() != TimerMode::TscDeadline {
            let now = self.clock.now_ns();
            let done = u64::from(self.regs.timer_initial - current.min(self.regs.timer_initial));
            self.regs.timer_start_ns = now.saturating_sub(done * self.timer_divisor());
            self.regs.timer_next_ns = Some(now + u64::from(current) * self.timer_divisor());
        }
    }

    fn write_tsc_deadline(&mut self, value: u64) {
        if self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        self.regs.tsc_deadline = value;
        self.regs.timer_next_ns = (value != 0).then_some(value);
    }

    /// Reads register `reg` (xAPIC offset); None for a hole.
    fn read_register(&self, reg: u32) -> Option<u32> {
        let value = match reg {
            REG_ID => {
                if self.x2apic() {
                    self.id
                } else {
                    self.id << 24
                }
            }
            REG_VERSION => APIC_VERSION,
            REG_TPR => self.regs.tpr,
            REG_APR => 0,
            REG_PPR => self.ppr(),
            REG_EOI | REG_RRD => 0,
            REG_LDR => self.regs.ldr,
            REG_DFR => self.regs.dfr,
            REG_SVR => self.regs.svr,
            0x100..=0x170 => self.regs.isr.0[((reg - REG_ISR) >> 4) as usize],
            0x180..=0x1f0 => self.regs.tmr.0[((reg - REG_TMR) >> 4) as usize],
            0x200..=0x270 => self.regs.irr.0[((reg - REG_IRR) >> 4) as usize],
            REG_ESR => self.regs.esr,
            REG_CMCI => LVT_MASKED,
            REG_ICR_LOW => self.regs.icr_low & !(1 << 12),
            REG_ICR_HIGH => self.regs.icr_high,
            REG_LVT_TIMER..=REG_LVT_ERROR => self.regs.lvt[((reg - REG_LVT_TIMER) >> 4) as usize],
            REG_TIMER_INITIAL => self.regs.timer_initial,
            REG_TIMER_CURRENT => self.timer_current_count(),
            REG_TIMER_DIVIDE => self.regs.timer_divide,
            _ => return None,
        };
        Some(value)
    }

    /// Writes register `reg` (xAPIC offset); false for a hole or read-only register.
    fn write_register(&mut self, reg: u32, value: u32) -> bool {
        match reg {
            REG_ID => {
                if self.x2apic() {
                    return false;
                }
                // xAPIC ids are writable on some parts; ignore to keep routing simple.
            }
            REG_TPR => self.regs.tpr = value & 0xff,
            REG_EOI => self.end_of_interrupt(),
            REG_LDR => {
                if self.x2apic() {
                    return false;
                }
                self.regs.ldr = value & 0xff00_0000;
                self.publish_routing();
            }
            REG_DFR => {
                if self.x2apic() {
                    return false;
                }
                self.regs.dfr = value | 0x0fff_ffff;
                self.publish_routing();
            }
            REG_SVR => self.write_svr(value),
            REG_ESR => {
                self.regs.esr = std::mem::take(&mut self.regs.esr_pending);
            }
            REG_CMCI => {}
            REG_ICR_LOW => {
                self.regs.icr_low = value & !(1 << 12);
                self.send_ipi(value, self.regs.icr_high >> 24);
            }
            REG_ICR_HIGH => {
                if self.x2apic() {
                    return false;
                }
                self.regs.icr_high = value & 0xff00_0000;
            }
            REG_LVT_TIMER..=REG_LVT_ERROR => {
                self.write_lvt(((reg - REG_LVT_TIMER) >> 4) as usize, value)
            }
            REG_TIMER_INITIAL => self.write_timer_initial(value),
            REG_TIMER_DIVIDE => self.write_timer_divide(value),
            REG_SELF_IPI if self.x2apic() => {
                self.accept_fixed(value as u8, false);
            }
            REG_VERSION | REG_APR | REG_PPR | REG_RRD | 0x100..=0x270 | REG_TIMER_CURRENT => {
                return false
            }
            _ => return false,
        }
        true
    }

    /// Sends the IPI described by ICR bits 0..19 to `dest`.
    fn send_ipi(&mut self, icr_low: u32, dest: u32) {
        let vector = icr_low as u8;
        let level_assert = icr_low & (1 << 14) != 0;
        let level_trigger = icr_low & (1 << 15) != 0;
        let mode = match (icr_low >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => {
                // INIT level de-assert only synchronises arbitration ids.
                if level_trigger && !level_assert {
                    return;
                }
                DeliveryMode::Init
            }
            6 => DeliveryMode::StartUp,
            _ => return,
        };
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            self.regs.esr_pending |= ESR_SEND_ILLEGAL_VECTOR;
            return;
        }
        let logical = icr_low & (1 << 11) != 0;
        let dest = match (icr_low >> 18) & 3 {
            0 if logical => Destination::Logical(dest),
            0 => Destination::Physical(dest),
            1 => Destination::OnlySelf { source: self.id },
            2 => Destination::AllIncludingSelf,
            _ => Destination::AllExcludingSelf { source: self.id },
        };
        self.router.deliver(ApicMessage {
            dest,
            mode,
            vector,
            level_triggered: false,
        });
        // A self-IPI must be visible at the next instruction boundary.
        if self.inbox.has_work() {
            self.drain_inbox();
        }
    }

    /// xAPIC MMIO read at `offset` within the APIC page (any width; registers are 32-bit
    /// at 16-byte strides).
    pub fn read_mmio(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let reg = (offset & 0xff0) as u32;
        let Some(value) = self.read_register(reg) else {
            return;
        };
        let bytes = value.to_le_bytes();
        let start = (offset & 0xf) as usize;
        for (i, out) in data.iter_mut().enumerate() {
            if let Some(b) = bytes.get(start + i) {
                *out = *b;
            }
        }
    }

    /// xAPIC MMIO write at `offset` (32-bit writes at register offsets; others ignored).
    pub fn write_mmio(&mut self, offset: u64, data: &[u8]) {
        if offset & 0xf != 0 || data.len() < 4 {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let reg = (offset & 0xff0) as u32;
        if reg == REG_SELF_IPI {
            return;
        }
        self.write_register(reg, value);
    }

    /// RDMSR: None if `msr` is not the APIC's, Some(Err) for #GP.
    pub fn read_msr(&mut self, msr: u32) -> Option<Result<u64, ()>> {
        match msr {
            MSR_APIC_BASE => Some(Ok(self.regs.apic_base)),
            MSR_TSC_DEADLINE => Some(Ok(if self.timer_mode() == TimerMode::TscDeadline {
                self.regs.tsc_deadline
            } else {
                0
            })),
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => Some(self.read_x2apic(msr)),
            _ => None,
        }
    }

    fn read_x2apic(&mut self, msr: u32) -> Result<u64, ()> {
        if !self.x2apic() {
            return Err(());
        }
        let reg = (msr - MSR_X2APIC_FIRST) << 4;
        match reg {
            REG_ICR_LOW => Ok(u64::from(self.regs.icr_high) << 32 | u64::from(self.regs.icr_low)),
            REG_DFR | REG_ICR_HIGH | REG_EOI | REG_SELF_IPI | REG_APR | REG_RRD => Err(()),
            _ => self.read_register(reg).map(u64::from).ok_or(()),
        }
    }

    /// WRMSR: None if `msr` is not the APIC's, Some(Err) for #GP.
    pub fn write_msr(&mut self, msr: u32, value: u64) -> Option<Result<(), ()>> {
        match msr {
            MSR_APIC_BASE => Some(self.write_apic_base(value)),
            MSR_TSC_DEADLINE => {
                self.write_tsc_deadline(value);
                Some(Ok(()))
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => Some(self.write_x2apic(msr, value)),
            _ => None,
        }
    }

    fn write_x2apic(&mut self, msr: u32, value: u64) -> Result<(), ()> {
        if !self.x2apic() {
            return Err(());
        }
        let reg = (msr - MSR_X2APIC_FIRST) << 4;
        match reg {
            REG_ICR_LOW => {
                let low = value as u32;
                self.regs.icr_low = low & !(1 << 12);
                self.regs.icr_high = (value >> 32) as u32;
                self.send_ipi(low, self.regs.icr_high);
                Ok(())
            }
            REG_EOI | REG_ESR if value != 0 => Err(()),
            REG_SELF_IPI if value >> 8 != 0 => Err(()),
            _ if value >> 32 != 0 => Err(()),
            _ => {
                if self.write_register(reg, value as u32) {
                    Ok(())
                } else {
                    Err(())
                }
            }
        }
    }

    fn write_apic_base(&mut self, value: u64) -> Result<(), ()> {
        let reserved = !(APIC_BASE_ADDR_MASK | APIC_BASE_BSP | APIC_BASE_EXTD | APIC_BASE_ENABLE);
        if value & reserved != 0 {
            return Err(());
        }
        let old_enabled = self.hw_enabled();
        let old_x2 = self.x2apic();
        let new_enabled = value & APIC_BASE_ENABLE != 0;
        let new_extd = value & APIC_BASE_EXTD != 0;
        // Invalid: EXTD without EN; x2APIC straight back to xAPIC; disabled straight to x2APIC.
        if (new_extd && !new_enabled)
            || (old_x2 && new_enabled && !new_extd)
            || (!old_enabled && new_extd)
        {
            return Err(());
        }
        // The BSP flag is read-only.
        let bsp = self.regs.apic_base & APIC_BASE_BSP;
        self.regs.apic_base = (value & !APIC_BASE_BSP) | bsp;
        if old_enabled && !new_enabled {
            self.init_reset();
        } else if !old_x2 && self.x2apic() {
            self.regs.ldr = self.x2apic_ldr();
        }
        self.publish_routing();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(n: usize) -> (Arc<ApicRouter>, Arc<VirtualClock>, Vec<LocalApic>) {
        let router = ApicRouter::new(n);
        let clock = Arc::new(VirtualClock::new_manual());
        let apics = (0..n as u32)
            .map(|id| LocalApic::new(id, id == 0, router.inbox(id), router.clone(), clock.clone()))
            .collect();
        (router, clock, apics)
    }

    fn wr(apic: &mut LocalApic, reg: u64, value: u32) {
        apic.write_mmio(reg, &value.to_le_bytes());
    }

    fn rd(apic: &mut LocalApic, reg: u64) -> u32 {
        let mut buf = [0u8; 4];
        apic.read_mmio(reg, &mut buf);
        u32::from_le_bytes(buf)
    }

    fn enable(apic: &mut LocalApic) {
        wr(apic, 0xf0, 0x1ff);
    }

    #[test]
    fn reset_state() {
        let (_r, _c, mut apics) = setup(2);
        let a = &mut apics[1];
        assert_eq!(a.mmio_base(), Some(APIC_DEFAULT_BASE));
        assert_eq!(rd(a, 0x20), 1 << 24);
        assert_eq!(rd(a, 0x30), 0x0005_0014);
        assert_eq!(rd(a, 0xf0), 0xff);
        assert_eq!(rd(a, 0x350), LVT_MASKED);
        assert_eq!(a.read_msr(MSR_APIC_BASE), Some(Ok(0xfee0_0800)));
        assert_eq!(apics[0].read_msr(MSR_APIC_BASE), Some(Ok(0xfee0_0900)));
        assert_eq!(apics[0].read_msr(0x10), None);
    }

    #[test]
    fn priority_irr_isr_eoi() {
        let (_r, _c, mut apics) = setup(1);
        let a = &mut apics[0];
        enable(a);
        a.accept_fixed(0x31, false);
        a.accept_fixed(0x52, false);
        assert_eq!(rd(a, 0x200 + 0x10), 1 << 0x11);
        assert_eq!(rd(a, 0x200 + 0x20), 1 << 0x12);
        wr(a, 0x80, 0x50);
        assert!(!a.has_interrupt());
        wr(a, 0x80, 0x40);
        assert_eq!(a.acknowledge(), Some(0x52));
        assert_eq!(rd(a, 0x100 + 0x20), 1 << 0x12);
        assert_eq!(rd(a, 0xa0), 0x50);
        // 0x31 is below the in-service class.
        assert!(!a.has_interrupt());
        assert_eq!(a.acknowledge(), None);
        wr(a, 0xb0, 0);
        assert_eq!(rd(a, 0xa0), 0x40);
        assert!(!a.has_interrupt());
        wr(a, 0x80, 0);
        assert_eq!(a.acknowledge(), Some(0x31));
        wr(a, 0xb0, 0);
        assert_eq!(rd(a, 0x100 + 0x10), 0);
        assert!(!a.has_interrupt());
    }

    #[test]
    fn level_eoi_reaches_listener_and_disabled_apic_drops_fixed() {
        let (router, _c, mut apics) = setup(1);
        let seen = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let s = seen.clone();
        router.set_eoi_listener(Box::new(move |v| {
            s.store(u32::from(v), std::sync::atomic::Ordering::SeqCst)
        }));
        let msg = ApicMessage {
            dest: Destination::Physical(0),
            mode: DeliveryMode::Fixed,
            vector: 0x61,
            level_triggered: true,
        };
        router.deliver(msg);
        apics[0].poll();
        assert!(
            !apics[0].has_interrupt(),
            "software-disabled APIC drops fixed"
        );
        enable(&mut apics[0]);
        router.deliver(msg);
        apics[0].poll();
        assert_eq!(rd(&mut apics[0], 0x180 + 0x30), 1 << 1);
        assert_eq!(apics[0].acknowledge(), Some(0x61));
        wr(&mut apics[0], 0xb0, 0);
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 0x61);
    }

    #[test]
    fn one_shot_and_periodic_timer() {
        let (_r, clock, mut apics) = setup(1);
        let a = &mut apics[0];
        enable(a);
        wr(a, 0x3e0, 0xb); // divide by 1
        wr(a, 0x320, 0x40);
        wr(a, 0x380, 1000);
        assert!(a.next_deadline().is_some());
        clock.advance(400);
        assert_eq!(rd(a, 0x390), 600);
        a.poll();
        assert!(!a.has_interrupt());
        clock.advance(600);
        a.poll();
        assert_eq!(a.acknowledge(), Some(0x40));
        wr(a, 0xb0, 0);
        assert_eq!(rd(a, 0x390), 0);
        assert!(a.next_deadline().is_none());

        // Periodic, divide by 2: period 2000 ns.
        wr(a, 0x3e0, 0x0);
        wr(a, 0x320, 0x40 | LVT_TIMER_PERIODIC);
        wr(a, 0x380, 1000);
        clock.advance(2500);
        a.poll();
        assert_eq!(a.acknowledge(), Some(0x40));
        wr(a, 0xb0, 0);
        // No drift: the next expiry is at 4000 from the start, i.e. 1500 from now.
        assert_eq!(rd(a, 0x390), 750);
        clock.advance(1499);
        a.poll();
        assert!(!a.has_interrupt());
        clock.advance(1);
        a.poll();
        assert!(a.has_interrupt());
    }

    #[test]
    fn tsc_deadline_timer() {
        let (_r, clock, mut apics) = setup(1);
        let a = &mut apics[0];
        enable(a);
        // Writes are ignored outside TSC-deadline mode.
        a.write_msr(MSR_TSC_DEADLINE, 100).unwrap().unwrap();
        assert!(a.next_deadline().is_none());
        wr(a, 0x320, 0xec | LVT_TIMER_TSC_DEADLINE);
        a.write_msr(MSR_TSC_DEADLINE, clock.tsc() + 5000)
            .unwrap()
            .unwrap();
        assert_eq!(a.read_msr(MSR_TSC_DEADLINE), Some(Ok(5000)));
        clock.advance(4999);
        a.poll();
        assert!(!a.has_interrupt());
        clock.advance(1);
        a.poll();
        assert_eq!(a.acknowledge(), Some(0xec));
        assert_eq!(a.read_msr(MSR_TSC_DEADLINE), Some(Ok(0)));
        // Writing 0 disarms.
        a.write_msr(MSR_TSC_DEADLINE, clock.tsc() + 10)
            .unwrap()
            .unwrap();
        a.write_msr(MSR_TSC_DEADLINE, 0).unwrap().unwrap();
        clock.advance(100);
        a.poll();
        assert!(a.next_deadline().is_none());
        assert!(!a.regs.irr.contains(0xec));
    }

    #[test]
    fn masked_timer_does_not_interrupt() {
        let (_r, clock, mut apics) = setup(1);
        let a = &mut apics[0];
        enable(a);
        wr(a, 0x3e0, 0xb);
        wr(a, 0x320, 0x40 | LVT_MASKED);
        wr(a, 0x380, 10);
        clock.advance(10);
        a.poll();
        assert!(!a.has_interrupt());
    }

    #[test]
    fn x2apic_msrs_and_gp_rules() {
        let (_r, _c, mut apics) = setup(18);
        let a = &mut apics[17];
        assert_eq!(a.read_msr(0x802), Some(Err(())), "x2APIC MSRs need EXTD");
        // Disabled -> x2APIC directly is invalid.
        assert_eq!(a.write_msr(MSR_APIC_BASE, 0xfee0_0400), Some(Err(())));
        a.write_msr(MSR_APIC_BASE, 0xfee0_0c00).unwrap().unwrap();
        assert_eq!(a.mmio_base(), None);
        assert_eq!(a.read_msr(0x802), Some(Ok(17)));
        assert_eq!(a.read_msr(0x80d), Some(Ok((1 << 16) | (1 << 1))));
        assert_eq!(a.read_msr(0x80e), Some(Err(())), "no DFR in x2APIC");
        assert_eq!(a.write_msr(0x80d, 0), Some(Err(())), "LDR is read-only");
        assert_eq!(a.write_msr(0x80b, 1), Some(Err(())), "EOI must be 0");
        a.write_msr(0x80f, 0x1ff).unwrap().unwrap();
        a.write_msr(0x808, 0x20).unwrap().unwrap();
        assert_eq!(a.read_msr(0x808), Some(Ok(0x20)));
        a.write_msr(0x83f, 0x45).unwrap().unwrap();
        assert_eq!(a.acknowledge(), Some(0x45));
        a.write_msr(0x80b, 0).unwrap().unwrap();
        // x2APIC -> xAPIC directly is invalid.
        assert_eq!(a.write_msr(MSR_APIC_BASE, 0xfee0_0800), Some(Err(())));
    }

    #[test]
    fn ipis_between_two_apics() {
        let (_r, _c, mut apics) = setup(2);
        let (first, rest) = apics.split_at_mut(1);
        let (a, b) = (&mut first[0], &mut rest[0]);
        enable(a);
        enable(b);
        // xAPIC fixed IPI to APIC 1.
        wr(a, 0x310, 1 << 24);
        wr(a, 0x300, 0x0000_0033);
        assert_eq!(rd(a, 0x300) & (1 << 12), 0);
        assert!(b.inbox.has_work());
        b.poll();
        assert_eq!(b.acknowledge(), Some(0x33));
        // INIT + SIPI.
        wr(a, 0x300, 0x0000_4500);
        wr(a, 0x300, 0x0000_4608);
        b.poll();
        assert!(b.take_init());
        assert_eq!(b.take_sipi(), Some(0x08));
        // NMI to all but self.
        wr(a, 0x300, 0x000c_0400);
        a.poll();
        b.poll();
        assert!(!a.take_nmi());
        assert!(b.take_nmi());
        // x2APIC on both, ICR as one MSR.
        a.write_msr(MSR_APIC_BASE, 0xfee0_0d00).unwrap().unwrap();
        b.write_msr(MSR_APIC_BASE, 0xfee0_0c00).unwrap().unwrap();
        a.write_msr(0x830, (1u64 << 32) | 0x77).unwrap().unwrap();
        b.poll();
        assert_eq!(b.acknowledge(), Some(0x77));
        // Logical cluster 0, member bit 1 -> APIC 1.
        a.write_msr(0x830, (2u64 << 32) | (1 << 11) | 0x78)
            .unwrap()
            .unwrap();
        b.poll();
        assert!(b.regs.irr.contains(0x78));
        // Self shorthand.
        a.write_msr(0x830, (1 << 18) | 0x79).unwrap().unwrap();
        assert!(a.regs.irr.contains(0x79));
    }

    #[test]
    fn extint_through_lint0() {
        let (router, _c, mut apics) = setup(1);
        let a = &mut apics[0];
        enable(a);
        router.inbox(0).set_extint_line(true);
        a.poll();
        assert!(!a.extint_requested(), "LINT0 masked");
        wr(a, 0x350, 0x700);
        assert!(a.extint_requested());
        router.inbox(0).set_extint_line(false);
        assert!(!a.extint_requested());
    }
}
