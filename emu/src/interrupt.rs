//! Delivery of exceptions and interrupts through the IVT (real mode) or the IDT
//! (protected and long mode), and the double-fault rules.
//!
//! The caller sets `state.rip` to the address to return to (the faulting instruction for
//! faults, the next one for traps and interrupts) before calling [`deliver`]. Every
//! memory access of the delivery happens before any register changes, so a fault while
//! delivering leaves the state as it was and the caller can escalate (#DF, triple fault).

use crate::exception::{ExResult, Exception};
use crate::exec::system::{fetch_descriptor, parse_descriptor};
use crate::mmu::{is_canonical, Mmu};
use crate::state::*;

/// What raised the event (decides DPL checks and the EXT bit of error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A processor exception.
    Exception,
    /// An external interrupt from the local APIC or PIC.
    External,
    Nmi,
    /// INT n / INT3 / INTO: the gate's DPL must be >= CPL.
    Software,
    /// INT1 (ICEBP): like a software interrupt without the DPL check.
    Icebp,
}

impl EventKind {
    fn ext(self) -> u16 {
        match self {
            EventKind::External | EventKind::Nmi | EventKind::Exception => 1,
            _ => 0,
        }
    }
}

/// The outcome of delivering an exception with the double-fault rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escalation {
    Delivered,
    /// A fault while delivering #DF: the CPU shuts down.
    TripleFault,
}

/// Deliver an exception, escalating to #DF or a triple fault as the SDM's table says.
pub fn deliver_exception(state: &mut CpuState, mmu: &mut Mmu, ex: Exception) -> Escalation {
    let mut current = ex;
    let mut kind = EventKind::Exception;
    loop {
        if let Exception::PageFault { address, .. } = current {
            state.cr2 = address;
        }
        let result = deliver(state, mmu, current.vector(), current.error_code(), kind);
        mmu.sync(state);
        let second = match result {
            Ok(()) => return Escalation::Delivered,
            Err(e) => e,
        };
        if current == Exception::DoubleFault {
            return Escalation::TripleFault;
        }
        let first_pf = matches!(current, Exception::PageFault { .. });
        let double = (current.is_contributory() && second.is_contributory())
            || (first_pf
                && (second.is_contributory() || matches!(second, Exception::PageFault { .. })));
        current = if double {
            Exception::DoubleFault
        } else {
            second
        };
        kind = EventKind::Exception;
    }
}

/// Deliver an external interrupt, NMI or software interrupt; faults during delivery are
/// delivered in turn (with the double-fault rules).
pub fn deliver_event(
    state: &mut CpuState,
    mmu: &mut Mmu,
    vector: u8,
    kind: EventKind,
) -> Escalation {
    let result = deliver(state, mmu, vector, None, kind);
    mmu.sync(state);
    match result {
        Ok(()) => Escalation::Delivered,
        Err(e) => deliver_exception(state, mmu, e),
    }
}

/// Deliver one event. On error nothing has changed.
pub fn deliver(
    state: &mut CpuState,
    mmu: &mut Mmu,
    vector: u8,
    error_code: Option<u32>,
    kind: EventKind,
) -> ExResult<()> {
    if !state.protected_mode() {
        return deliver_real(state, mmu, vector);
    }
    if state.long_mode() {
        deliver_long(state, mmu, vector, error_code, kind)
    } else {
        deliver_protected(state, mmu, vector, error_code, kind)
    }
}

fn deliver_real(state: &mut CpuState, mmu: &mut Mmu, vector: u8) -> ExResult<()> {
    let off = u64::from(vector) * 4;
    if off + 3 > u64::from(state.idtr.limit) {
        return Err(Exception::GeneralProtection(0));
    }
    let entry = mmu.read_linear(state.idtr.base.wrapping_add(off), 4, false)?;
    let ss = state.seg[SS];
    let sp = state.gpr[4];
    let push_at = |k: u64| ss.base.wrapping_add(sp.wrapping_sub(2 * k) & 0xffff);
    mmu.write_linear(push_at(1), 2, state.rflags & 0xffff, false)?;
    mmu.write_linear(push_at(2), 2, u64::from(state.seg[CS].selector), false)?;
    mmu.write_linear(push_at(3), 2, state.rip & 0xffff, false)?;
    state.gpr[4] = (sp & !0xffff) | (sp.wrapping_sub(6) & 0xffff);
    state.rflags &= !(IF | TF | AC | RF);
    let cs = (entry >> 16) as u16;
    state.seg[CS].selector = cs;
    state.seg[CS].base = u64::from(cs) << 4;
    state.rip = entry & 0xffff;
    Ok(())
}

/// The code segment a gate points to, and the CPL the handler runs at.
fn gate_code_segment(
    state: &CpuState,
    mmu: &mut Mmu,
    selector: u16,
    ext: u16,
) -> ExResult<(Segment, u8)> {
    if selector & !3 == 0 {
        return Err(Exception::GeneralProtection(ext));
    }
    let (raw, _) = fetch_descriptor(state, mmu, selector)?;
    let cs = parse_descriptor(raw, selector);
    let err = (selector & !3) | ext;
    if !cs.s || cs.type_ & 8 == 0 || cs.dpl > state.cpl() {
        return Err(Exception::GeneralProtection(err));
    }
    if !cs.present {
        return Err(Exception::SegmentNotPresent(err));
    }
    let conforming = cs.type_ & 4 != 0;
    let new_cpl = if conforming { state.cpl() } else { cs.dpl };
    Ok((cs, new_cpl))
}

fn deliver_long(
    state: &mut CpuState,
    mmu: &mut Mmu,
    vector: u8,
    error_code: Option<u32>,
    kind: EventKind,
) -> ExResult<()> {
    let ext = kind.ext();
    let idt_err = (u16::from(vector) << 3) | 2 | ext;
    let off = u64::from(vector) * 16;
    if off + 15 > u64::from(state.idtr.limit) {
        return Err(Exception::GeneralProtection(idt_err));
    }
    let lo = mmu.read_linear(state.idtr.base.wrapping_add(off), 8, false)?;
    let hi = mmu.read_linear(state.idtr.base.wrapping_add(off + 8), 8, false)?;
    let gate_type = (lo >> 40) & 0xf;
    let gate_dpl = ((lo >> 45) & 3) as u8;
    if gate_type != 0xe && gate_type != 0xf {
        return Err(Exception::GeneralProtection(idt_err));
    }
    if kind == EventKind::Software && gate_dpl < state.cpl() {
        return Err(Exception::GeneralProtection(idt_err));
    }
    if lo & (1 << 47) == 0 {
        return Err(Exception::SegmentNotPresent(idt_err));
    }
    let target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | ((hi & 0xffff_ffff) << 32);
    let selector = (lo >> 16) as u16;
    let ist = (lo >> 32) & 7;
    let (mut cs, new_cpl) = gate_code_segment(state, mmu, selector, ext)?;
    if !cs.l || cs.db {
        return Err(Exception::GeneralProtection((selector & !3) | ext));
    }
    let old_cpl = state.cpl();
    let tss_read = |mmu: &mut Mmu, state: &CpuState, offset: u64| -> ExResult<u64> {
        if offset + 7 > u64::from(state.tr.limit) {
            return Err(Exception::InvalidTss(state.tr.selector & !3));
        }
        mmu.read_linear(state.tr.base.wrapping_add(offset), 8, false)
    };
    let mut rsp = if ist != 0 {
        tss_read(mmu, state, 0x24 + (ist - 1) * 8)?
    } else if new_cpl < old_cpl {
        tss_read(mmu, state, 4 + 8 * u64::from(new_cpl))?
    } else {
        state.gpr[4]
    };
    if !is_canonical(rsp) {
        return Err(Exception::StackFault(0));
    }
    rsp &= !0xf;
    let mut frame = [0u64; 6];
    let mut n = 0;
    frame[n] = u64::from(state.seg[SS].selector);
    n += 1;
    frame[n] = state.gpr[4];
    n += 1;
    frame[n] = state.rflags;
    n += 1;
    frame[n] = u64::from(state.seg[CS].selector);
    n += 1;
    frame[n] = state.rip;
    n += 1;
    if let Some(code) = error_code {
        frame[n] = u64::from(code);
        n += 1;
    }
    let new_rsp = rsp.wrapping_sub(8 * n as u64);
    if !is_canonical(new_rsp) {
        return Err(Exception::StackFault(0));
    }
    let user_stack = new_cpl == 3;
    for (i, v) in frame[..n].iter().enumerate() {
        mmu.write_linear(rsp.wrapping_sub(8 * (i as u64 + 1)), 8, *v, user_stack)?;
    }
    // Commit.
    if new_cpl != old_cpl {
        state.seg[SS] = Segment {
            selector: u16::from(new_cpl),
            dpl: new_cpl,
            db: true,
            present: false,
            ..Default::default()
        };
    }
    cs.selector = (selector & !3) | u16::from(new_cpl);
    cs.type_ |= 1;
    state.seg[CS] = cs;
    state.gpr[4] = new_rsp;
    state.rip = target;
    state.rflags &= !(TF | NT | RF | VM);
    if gate_type == 0xe {
        state.rflags &= !IF;
    }
    Ok(())
}

fn deliver_protected(
    state: &mut CpuState,
    mmu: &mut Mmu,
    vector: u8,
    error_code: Option<u32>,
    kind: EventKind,
) -> ExResult<()> {
    let ext = kind.ext();
    let idt_err = (u16::from(vector) << 3) | 2 | ext;
    let off = u64::from(vector) * 8;
    if off + 7 > u64::from(state.idtr.limit) {
        return Err(Exception::GeneralProtection(idt_err));
    }
    let raw = mmu.read_linear(state.idtr.base.wrapping_add(off), 8, false)?;
    let gate_type = (raw >> 40) & 0xf;
    let gate_dpl = ((raw >> 45) & 3) as u8;
    let size: u64 = match gate_type {
        0x6 | 0x7 => 2,
        0xe | 0xf => 4,
        _ => {
            if gate_type == 0x5 {
                tracing::warn!(vector, "task gates are not supported");
            }
            return Err(Exception::GeneralProtection(idt_err));
        }
    };
    if kind == EventKind::Software && gate_dpl < state.cpl() {
        return Err(Exception::GeneralProtection(idt_err));
    }
    if raw & (1 << 47) == 0 {
        return Err(Exception::SegmentNotPresent(idt_err));
    }
    let mut target = (raw & 0xffff) | ((raw >> 32) & 0xffff_0000);
    if size == 2 {
        target &= 0xffff;
    }
    let selector = (raw >> 16) as u16;
    let (mut cs, new_cpl) = gate_code_segment(state, mmu, selector, ext)?;
    if target > u64::from(cs.limit) {
        return Err(Exception::GeneralProtection(ext));
    }
    let old_cpl = state.cpl();
    let mut frame = [0u64; 6];
    let mut n = 0;
    let (ss, sp) = if new_cpl < old_cpl {
        // Inner stack from the 32-bit TSS.
        let esp_off = 4 + 8 * u64::from(new_cpl);
        if esp_off + 5 > u64::from(state.tr.limit) {
            return Err(Exception::InvalidTss(state.tr.selector & !3));
        }
        let esp = mmu.read_linear(state.tr.base.wrapping_add(esp_off), 4, false)?;
        let ss_sel = mmu.read_linear(state.tr.base.wrapping_add(esp_off + 4), 2, false)? as u16;
        let ts = Exception::InvalidTss(ss_sel & !3);
        if ss_sel & !3 == 0 || (ss_sel & 3) as u8 != new_cpl {
            return Err(ts);
        }
        let (ss_raw, _) = fetch_descriptor(state, mmu, ss_sel).map_err(|_| ts)?;
        let mut ss = parse_descriptor(ss_raw, ss_sel);
        if !ss.s || ss.type_ & 8 != 0 || ss.type_ & 2 == 0 || ss.dpl != new_cpl {
            return Err(ts);
        }
        if !ss.present {
            return Err(Exception::StackFault(ss_sel & !3));
        }
        ss.type_ |= 1;
        frame[n] = u64::from(state.seg[SS].selector);
        n += 1;
        frame[n] = state.gpr[4];
        n += 1;
        (ss, esp)
    } else {
        (state.seg[SS], state.gpr[4])
    };
    frame[n] = state.rflags;
    n += 1;
    frame[n] = u64::from(state.seg[CS].selector);
    n += 1;
    frame[n] = state.rip;
    n += 1;
    if let Some(code) = error_code {
        frame[n] = u64::from(code);
        n += 1;
    }
    let sp_mask: u64 = if ss.db { 0xffff_ffff } else { 0xffff };
    for (i, v) in frame[..n].iter().enumerate() {
        let off = sp.wrapping_sub(size * (i as u64 + 1)) & sp_mask;
        if off.wrapping_add(size - 1) > u64::from(ss.limit) && ss.type_ & 4 == 0 {
            return Err(Exception::StackFault(0));
        }
        let lin = ss.base.wrapping_add(off) & 0xffff_ffff;
        mmu.write_linear(lin, size as usize, *v, new_cpl == 3)?;
    }
    let new_sp = sp.wrapping_sub(size * n as u64) & sp_mask;
    // Commit.
    if new_cpl != old_cpl {
        state.seg[SS] = ss;
        state.gpr[4] = new_sp;
    } else {
        state.gpr[4] = (state.gpr[4] & !sp_mask) | new_sp;
    }
    cs.selector = (selector & !3) | u16::from(new_cpl);
    cs.type_ |= 1;
    state.seg[CS] = cs;
    state.rip = target;
    state.rflags &= !(TF | NT | RF | VM);
    if gate_type & 1 == 0 {
        state.rflags &= !IF;
    }
    Ok(())
}
