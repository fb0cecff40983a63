//! KVM's vCPU state in the emulator's portable form ([`emu::cpu::PortableCpu`]) and back:
//! how a guest saved under one accelerator loads under the other. Both run one machine
//! model, so the registers map one to one; the FPU/SSE state goes through the XSAVE
//! area's legacy (FXSAVE) region, the local APIC through its architectural register page,
//! the MSRs by index; the platform's chips field by field, the PIT's load times between
//! guest time and the host's monotonic clock (KVM's PIT runs on it).

use emu::cpu::PortableCpu;
use emu::portable::{PortableIoapic, PortablePic, PortablePitChannel, PortablePlatform};
use emu::state::{CpuState, DescriptorTable, Segment, X87State, CS, DS, ES, FS, GS, SS};
use kvm_bindings::{
    kvm_debugregs, kvm_dtable, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pic_state, kvm_pit_channel_state, kvm_pit_state2, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_UNINITIALIZED,
};

use super::migration::VcpuState;
use crate::accel::AccelError;

// MSRs both models keep.
const MSR_TSC: u32 = 0x10;
const MSR_SPEC_CTRL: u32 = 0x48;
const MSR_SYSENTER_CS: u32 = 0x174;
const MSR_SYSENTER_ESP: u32 = 0x175;
const MSR_SYSENTER_EIP: u32 = 0x176;
const MSR_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_VAR_FIRST: u32 = 0x200;
const MSR_MTRR_FIXED: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
];
const MSR_PAT: u32 = 0x277;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_FMASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_TSC_AUX: u32 = 0xc000_0103;
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// XSAVE header's XSTATE_BV: x87 and SSE state present.
const XSTATE_X87_SSE: u64 = 0b11;
const XSAVE_HEADER: usize = 512;

fn to_segment(s: &kvm_segment) -> Segment {
    Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        type_: s.type_,
        s: s.s != 0,
        dpl: s.dpl,
        present: s.present != 0 && s.unusable == 0,
        l: s.l != 0,
        db: s.db != 0,
        g: s.g != 0,
        avl: s.avl != 0,
    }
}

fn from_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(!s.present),
        padding: 0,
    }
}

fn to_table(t: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: t.base,
        limit: t.limit,
    }
}

fn from_table(t: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: t.base,
        limit: t.limit,
        ..Default::default()
    }
}

/// The FXSAVE region's bytes (the first 512 of the XSAVE area).
fn legacy_region(xsave: &kvm_xsave) -> Vec<u8> {
    xsave.region[..128]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// An x87 register's tag from its contents: 00 valid, 01 zero, 10 special.
fn tag_of(reg: &[u8; 10]) -> u16 {
    let exponent = u16::from_le_bytes([reg[8], reg[9]]) & 0x7fff;
    let mantissa = u64::from_le_bytes(reg[..8].try_into().unwrap_or([0; 8]));
    match (exponent, mantissa) {
        (0, 0) => 0b01,
        (0, _) | (0x7fff, _) => 0b10,
        (_, m) if m >> 63 == 0 => 0b10,
        _ => 0b00,
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// x87, MXCSR and XMM from an FXSAVE region into `regs`.
fn load_fxsave(fx: &[u8], regs: &mut CpuState) {
    let fsw = u16_at(fx, 2);
    let top = ((fsw >> 11) & 7) as u8;
    let mut x87 = X87State {
        fcw: u16_at(fx, 0),
        fsw: fsw & !(7 << 11),
        top,
        fop: u16_at(fx, 6),
        fip: u64_at(fx, 8),
        fdp: u64_at(fx, 16),
        ..X87State::default()
    };
    let abridged = fx[4];
    let mut ftw = 0u16;
    for st in 0..8usize {
        // ST(i) is physical register (TOP + i) mod 8.
        let physical = (usize::from(top) + st) % 8;
        let at = 32 + 16 * st;
        let mut reg = [0u8; 10];
        reg.copy_from_slice(&fx[at..at + 10]);
        x87.regs[physical] = reg;
    }
    for (physical, reg) in x87.regs.iter().enumerate() {
        let tag = if abridged & (1 << physical) == 0 {
            0b11
        } else {
            tag_of(reg)
        };
        ftw |= tag << (2 * physical);
    }
    x87.ftw = ftw;
    regs.x87 = x87;
    regs.mxcsr = u32_at(fx, 24);
    for (i, xmm) in regs.xmm.iter_mut().enumerate() {
        let at = 160 + 16 * i;
        *xmm = u128::from_le_bytes(fx[at..at + 16].try_into().unwrap_or([0; 16]));
    }
}

/// An XSAVE area holding `regs`' x87, MXCSR and XMM state (nothing beyond SSE: the
/// emulator has no AVX state).
fn store_fxsave(regs: &CpuState) -> kvm_xsave {
    let mut fx = vec![0u8; 4096];
    let x = &regs.x87;
    fx[0..2].copy_from_slice(&x.fcw.to_le_bytes());
    let fsw = (x.fsw & !(7 << 11)) | (u16::from(x.top & 7) << 11);
    fx[2..4].copy_from_slice(&fsw.to_le_bytes());
    fx[4] = (0..8).fold(0u8, |acc, r| {
        if (x.ftw >> (2 * r)) & 3 != 3 {
            acc | (1 << r)
        } else {
            acc
        }
    });
    fx[6..8].copy_from_slice(&x.fop.to_le_bytes());
    fx[8..16].copy_from_slice(&x.fip.to_le_bytes());
    fx[16..24].copy_from_slice(&x.fdp.to_le_bytes());
    fx[24..28].copy_from_slice(&regs.mxcsr.to_le_bytes());
    fx[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    for st in 0..8usize {
        let physical = (usize::from(x.top) + st) % 8;
        let at = 32 + 16 * st;
        fx[at..at + 10].copy_from_slice(&x.regs[physical]);
    }
    for (i, xmm) in regs.xmm.iter().enumerate() {
        let at = 160 + 16 * i;
        fx[at..at + 16].copy_from_slice(&xmm.to_le_bytes());
    }
    fx[XSAVE_HEADER..XSAVE_HEADER + 8].copy_from_slice(&XSTATE_X87_SSE.to_le_bytes());
    let mut xsave = kvm_xsave::default();
    for (word, bytes) in xsave.region.iter_mut().zip(fx.chunks_exact(4)) {
        *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    xsave
}

/// The MSRs of the emulator's model, by index.
fn msr_list(p: &PortableCpu) -> Vec<(u32, u64)> {
    let m = &p.regs.msr;
    let mut list = vec![
        (MSR_TSC, p.tsc),
        (MSR_SPEC_CTRL, m.spec_ctrl),
        (MSR_SYSENTER_CS, m.sysenter_cs),
        (MSR_SYSENTER_ESP, m.sysenter_esp),
        (MSR_SYSENTER_EIP, m.sysenter_eip),
        (MSR_MISC_ENABLE, m.misc_enable),
        (MSR_PAT, m.pat),
        (MSR_MTRR_DEF_TYPE, m.mtrr_def_type),
        (MSR_STAR, m.star),
        (MSR_LSTAR, m.lstar),
        (MSR_CSTAR, m.cstar),
        (MSR_FMASK, m.fmask),
        (MSR_KERNEL_GS_BASE, m.kernel_gs_base),
        (MSR_TSC_AUX, m.tsc_aux),
        (MSR_KVM_WALL_CLOCK_NEW, p.kvm_wall_clock),
        (MSR_KVM_SYSTEM_TIME_NEW, p.kvm_system_time),
    ];
    list.extend(MSR_MTRR_FIXED.iter().copied().zip(m.mtrr_fixed));
    list.extend((MSR_MTRR_VAR_FIRST..).zip(m.mtrr_var));
    list
}

/// KVM's state in the portable form. An exception KVM holds in flight cannot be carried
/// (the emulator would have to re-raise it mid-instruction): refused; an interrupt in
/// flight goes back to the local APIC's IRR, to be delivered again.
pub(super) fn to_portable(s: &VcpuState) -> Result<PortableCpu, AccelError> {
    if s.events.exception.injected != 0 || s.events.exception.pending != 0 {
        return Err(AccelError::Snapshot(
            "a vCPU with an exception in flight cannot move to another accelerator".into(),
        ));
    }
    let r = &s.regs;
    let sr = &s.sregs;
    let mut seg = [Segment::default(); 6];
    seg[ES] = to_segment(&sr.es);
    seg[CS] = to_segment(&sr.cs);
    seg[SS] = to_segment(&sr.ss);
    seg[DS] = to_segment(&sr.ds);
    seg[FS] = to_segment(&sr.fs);
    seg[GS] = to_segment(&sr.gs);
    let mut regs = CpuState {
        gpr: [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        rip: r.rip,
        rflags: r.rflags,
        seg,
        ldtr: to_segment(&sr.ldt),
        tr: to_segment(&sr.tr),
        gdtr: to_table(&sr.gdt),
        idtr: to_table(&sr.idt),
        cr0: sr.cr0,
        cr2: sr.cr2,
        cr3: sr.cr3,
        cr4: sr.cr4,
        cr8: sr.cr8,
        efer: sr.efer,
        xcr0: s
            .xcrs
            .xcrs
            .iter()
            .take(s.xcrs.nr_xcrs as usize)
            .find(|x| x.xcr == 0)
            .map_or(1, |x| x.value),
        dr: [
            s.debugregs.db[0],
            s.debugregs.db[1],
            s.debugregs.db[2],
            s.debugregs.db[3],
            0,
            0,
            s.debugregs.dr6,
            s.debugregs.dr7,
        ],
        ..CpuState::default()
    };
    load_fxsave(&legacy_region(&s.xsave), &mut regs);
    let msr = |index: u32| s.msrs.iter().find(|m| m.index == index).map(|m| m.data);
    let mut p = PortableCpu {
        regs,
        apic_base: sr.apic_base,
        apic_page: s.lapic.regs.iter().map(|&b| b as u8).collect(),
        tsc: msr(MSR_TSC).unwrap_or(0),
        kvm_system_time: msr(MSR_KVM_SYSTEM_TIME_NEW).unwrap_or(0),
        kvm_wall_clock: msr(MSR_KVM_WALL_CLOCK_NEW).unwrap_or(0),
        halted: s.mp_state.mp_state == KVM_MP_STATE_HALTED,
        waiting_for_sipi: s.mp_state.mp_state == KVM_MP_STATE_UNINITIALIZED,
        interrupt_shadow: s.events.interrupt.shadow != 0,
        nmi_pending: s.events.nmi.pending != 0 || s.events.nmi.injected != 0,
        nmi_blocked: s.events.nmi.masked != 0,
    };
    let m = &mut p.regs.msr;
    for (index, value) in [
        (MSR_SPEC_CTRL, &mut m.spec_ctrl),
        (MSR_SYSENTER_CS, &mut m.sysenter_cs),
        (MSR_SYSENTER_ESP, &mut m.sysenter_esp),
        (MSR_SYSENTER_EIP, &mut m.sysenter_eip),
        (MSR_MISC_ENABLE, &mut m.misc_enable),
        (MSR_PAT, &mut m.pat),
        (MSR_MTRR_DEF_TYPE, &mut m.mtrr_def_type),
        (MSR_STAR, &mut m.star),
        (MSR_LSTAR, &mut m.lstar),
        (MSR_CSTAR, &mut m.cstar),
        (MSR_FMASK, &mut m.fmask),
        (MSR_KERNEL_GS_BASE, &mut m.kernel_gs_base),
        (MSR_TSC_AUX, &mut m.tsc_aux),
    ] {
        if let Some(v) = msr(index) {
            *value = v;
        }
    }
    for (slot, index) in m.mtrr_fixed.iter_mut().zip(MSR_MTRR_FIXED) {
        *slot = msr(index).unwrap_or(*slot);
    }
    for (slot, index) in m.mtrr_var.iter_mut().zip(MSR_MTRR_VAR_FIRST..) {
        *slot = msr(index).unwrap_or(*slot);
    }
    if s.events.interrupt.injected != 0 && s.events.interrupt.soft == 0 {
        // Undo the acknowledge: the vector is requested again (IRR), no longer in service
        // (ISR), as if KVM had not taken it yet.
        let vector = usize::from(s.events.interrupt.nr);
        let byte = (vector / 32) * 16 + (vector % 32) / 8;
        let bit = 1u8 << (vector % 8);
        if let Some(irr) = p.apic_page.get_mut(0x200 + byte) {
            *irr |= bit;
        }
        if let Some(isr) = p.apic_page.get_mut(0x100 + byte) {
            *isr &= !bit;
        }
    }
    Ok(p)
}

/// The portable state as KVM takes it; `listed` are the MSRs this KVM saves (the others of
/// the emulator's model are left out).
pub(super) fn from_portable(p: &PortableCpu, listed: &[u32]) -> Result<VcpuState, AccelError> {
    if p.apic_page.len() != 1024 {
        return Err(AccelError::Snapshot(format!(
            "a local APIC page of {} bytes",
            p.apic_page.len()
        )));
    }
    let g = &p.regs.gpr;
    let regs = kvm_regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: g[4],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: p.regs.rip,
        rflags: p.regs.rflags,
    };
    let r = &p.regs;
    let sregs = kvm_sregs {
        cs: from_segment(&r.seg[CS]),
        ds: from_segment(&r.seg[DS]),
        es: from_segment(&r.seg[ES]),
        fs: from_segment(&r.seg[FS]),
        gs: from_segment(&r.seg[GS]),
        ss: from_segment(&r.seg[SS]),
        tr: from_segment(&r.tr),
        ldt: from_segment(&r.ldtr),
        gdt: from_table(&r.gdtr),
        idt: from_table(&r.idtr),
        cr0: r.cr0,
        cr2: r.cr2,
        cr3: r.cr3,
        cr4: r.cr4,
        cr8: r.cr8,
        efer: r.efer,
        apic_base: p.apic_base,
        interrupt_bitmap: [0; 4],
    };
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = r.xcr0.max(1);
    let debugregs = kvm_debugregs {
        db: [r.dr[0], r.dr[1], r.dr[2], r.dr[3]],
        dr6: r.dr[6],
        dr7: r.dr[7],
        ..Default::default()
    };
    let mut lapic = kvm_lapic_state::default();
    for (dst, src) in lapic.regs.iter_mut().zip(&p.apic_page) {
        *dst = *src as _;
    }
    let mut events = kvm_vcpu_events::default();
    events.interrupt.shadow = u8::from(p.interrupt_shadow);
    events.nmi.pending = u8::from(p.nmi_pending);
    events.nmi.masked = u8::from(p.nmi_blocked);
    // KVM_VCPUEVENT_VALID_NMI_PENDING and _SHADOW: those fields are meant.
    events.flags = 0x1 | 0x4;
    let mp_state = kvm_mp_state {
        mp_state: if p.waiting_for_sipi {
            KVM_MP_STATE_UNINITIALIZED
        } else if p.halted {
            KVM_MP_STATE_HALTED
        } else {
            KVM_MP_STATE_RUNNABLE
        },
    };
    let msrs = msr_list(p)
        .into_iter()
        .filter(|(index, _)| listed.contains(index))
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Ok(VcpuState {
        regs,
        sregs,
        xsave: store_fxsave(r),
        xcrs,
        msrs,
        lapic,
        mp_state,
        events,
        debugregs,
    })
}

/// CLOCK_MONOTONIC in ns: the clock of KVM's PIT (`count_load_time`).
fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn pic_to_portable(p: &kvm_pic_state) -> PortablePic {
    PortablePic {
        last_level: p.last_irr,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        vector_base: p.irq_base,
        read_isr: p.read_reg_select != 0,
        poll: p.poll != 0,
        special_mask: p.special_mask != 0,
        init_state: p.init_state,
        auto_eoi: p.auto_eoi != 0,
        rotate_on_auto_eoi: p.rotate_on_auto_eoi != 0,
        special_fully_nested: p.special_fully_nested_mode != 0,
        needs_icw4: p.init4 != 0,
        elcr: p.elcr,
        elcr_mask: p.elcr_mask,
    }
}

fn pic_from_portable(p: &PortablePic) -> kvm_pic_state {
    kvm_pic_state {
        last_irr: p.last_level,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        irq_base: p.vector_base,
        read_reg_select: u8::from(p.read_isr),
        poll: u8::from(p.poll),
        special_mask: u8::from(p.special_mask),
        init_state: p.init_state,
        auto_eoi: u8::from(p.auto_eoi),
        rotate_on_auto_eoi: u8::from(p.rotate_on_auto_eoi),
        special_fully_nested_mode: u8::from(p.special_fully_nested),
        init4: u8::from(p.needs_icw4),
        elcr: p.elcr,
        elcr_mask: p.elcr_mask,
    }
}

/// KVM's platform (PICs and IOAPIC as KVM_GET_IRQCHIP gives them, in [`IRQCHIPS`]'
/// order; the PIT; kvmclock) in the portable form.
pub(super) fn platform_to_portable(
    irqchips: &[kvm_irqchip],
    pit: &kvm_pit_state2,
    clock_ns: u64,
) -> Result<PortablePlatform, AccelError> {
    let [master, slave, ioapic] = irqchips else {
        return Err(AccelError::Snapshot("not KVM's three irqchips".into()));
    };
    // SAFETY: `pic` is the member KVM fills for the PIC chip ids, `ioapic` for the IOAPIC
    // (checked by the caller's order); every bit pattern is valid for these integers.
    let (master, slave, io) = unsafe { (master.chip.pic, slave.chip.pic, ioapic.chip.ioapic) };
    let entries = std::array::from_fn(|pin| {
        // SAFETY: `bits` covers the whole 64-bit entry; any value is valid.
        unsafe { io.redirtbl[pin].bits }
    });
    let now = monotonic_ns();
    let channels = std::array::from_fn(|i| {
        let c = &pit.channels[i];
        let elapsed = u64::try_from(now.saturating_sub(c.count_load_time)).unwrap_or(0);
        PortablePitChannel {
            count: c.count.clamp(1, 0x10000),
            load_ns: Some(clock_ns.saturating_sub(elapsed)),
            latched_count: (c.count_latched != 0).then_some(c.latched_count),
            latched_state: c.count_latched,
            latched_status: (c.status_latched != 0).then_some(c.status),
            read_state: c.read_state,
            write_state: c.write_state,
            write_low: c.write_latch,
            access: c.rw_mode,
            mode: c.mode,
            bcd: c.bcd != 0,
            gate: c.gate != 0,
        }
    });
    Ok(PortablePlatform {
        guest_ns: clock_ns,
        pic: [pic_to_portable(&master), pic_to_portable(&slave)],
        ioapic: PortableIoapic {
            id: io.id,
            select: io.ioregsel,
            entries,
            lines: io.irr,
        },
        pit: channels,
    })
}

/// The portable platform in KVM's form, over `current` (this VM's irqchips, whose other
/// fields, such as the IOAPIC's base, stay); the PIT's load times are made host times.
pub(super) fn platform_from_portable(
    p: &PortablePlatform,
    current: &[kvm_irqchip],
) -> Result<(Vec<kvm_irqchip>, kvm_pit_state2), AccelError> {
    let [master, slave, ioapic] = current else {
        return Err(AccelError::Snapshot("not KVM's three irqchips".into()));
    };
    let (mut master, mut slave, mut ioapic) = (*master, *slave, *ioapic);
    master.chip.pic = pic_from_portable(&p.pic[0]);
    slave.chip.pic = pic_from_portable(&p.pic[1]);
    // SAFETY: reading the IOAPIC member of the IOAPIC chip's state (plain integers).
    let mut io = unsafe { ioapic.chip.ioapic };
    io.id = p.ioapic.id;
    io.ioregsel = p.ioapic.select;
    io.irr = p.ioapic.lines;
    for (entry, bits) in io.redirtbl.iter_mut().zip(p.ioapic.entries) {
        entry.bits = bits;
    }
    ioapic.chip.ioapic = io;
    let now = monotonic_ns();
    let mut pit = kvm_pit_state2::default();
    for (c, s) in pit.channels.iter_mut().zip(&p.pit) {
        let since = s.load_ns.map_or(0, |at| p.guest_ns.saturating_sub(at));
        *c = kvm_pit_channel_state {
            count: s.count.clamp(1, 0x10000),
            latched_count: s.latched_count.unwrap_or(0),
            count_latched: if s.latched_count.is_some() {
                s.latched_state
            } else {
                0
            },
            status_latched: u8::from(s.latched_status.is_some()),
            status: s.latched_status.unwrap_or(0),
            read_state: s.read_state,
            write_state: s.write_state,
            write_latch: s.write_low,
            rw_mode: s.access,
            mode: s.mode,
            bcd: u8::from(s.bcd),
            gate: u8::from(s.gate),
            count_load_time: now.saturating_sub(i64::try_from(since).unwrap_or(i64::MAX)),
        };
    }
    Ok((vec![master, slave, ioapic], pit))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state made under the emulator goes to KVM's form and back unchanged: registers,
    /// segments, x87 (TOP and tags included), SSE, MSRs, the APIC page, the events.
    #[test]
    fn the_portable_form_goes_to_kvm_and_back() {
        let mut regs = CpuState {
            gpr: std::array::from_fn(|i| 0x1111 * (i as u64 + 1)),
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x246,
            ..CpuState::default()
        };
        regs.seg[CS] = Segment {
            selector: 0x10,
            limit: 0xffff_ffff,
            type_: 0xb,
            s: true,
            present: true,
            l: true,
            g: true,
            ..Segment::default()
        };
        regs.seg[FS].base = 0x7f00_0000_1000;
        regs.gdtr = DescriptorTable {
            base: 0x1000,
            limit: 0x7f,
        };
        regs.cr0 = 0x8005_0033;
        regs.cr3 = 0x2000;
        regs.cr4 = 0x6f0;
        regs.efer = 0xd01;
        regs.xcr0 = 3;
        regs.dr[7] = 0x400;
        regs.dr[6] = 0xffff_0ff0;
        regs.xmm[3] = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
        regs.mxcsr = 0x1f80;
        regs.x87.top = 6;
        regs.x87.regs[6] = [0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f]; // 1.0
        regs.x87.regs[7] = [0; 10]; // +0
        regs.x87.ftw = 0x5fff & !(0b11 << 12) | (0b01 << 14);
        regs.x87.fcw = 0x37f;
        regs.msr.lstar = 0xffff_ffff_8180_0000;
        regs.msr.pat = 0x0007_0406_0007_0406;
        regs.msr.mtrr_var[2] = 0x8000_0006;
        let mut page = vec![0u8; 1024];
        page[0x20..0x24].copy_from_slice(&(1u32 << 24).to_le_bytes());
        page[0xf0..0xf4].copy_from_slice(&0x1ffu32.to_le_bytes());
        let p = PortableCpu {
            regs,
            apic_base: 0xfee0_0900,
            apic_page: page,
            tsc: 123_456_789,
            kvm_system_time: 0x5001,
            kvm_wall_clock: 0x6000,
            halted: true,
            waiting_for_sipi: false,
            interrupt_shadow: true,
            nmi_pending: true,
            nmi_blocked: false,
        };
        let all: Vec<u32> = msr_list(&p).into_iter().map(|(i, _)| i).collect();
        let kvm = from_portable(&p, &all).unwrap();
        assert_eq!(kvm.mp_state.mp_state, KVM_MP_STATE_HALTED);
        assert_eq!(kvm.regs.rsp, 0x1111 * 5);
        let back = to_portable(&kvm).unwrap();
        assert_eq!(back, p);
        // MSRs this KVM does not list are left out.
        let few = from_portable(&p, &[MSR_LSTAR]).unwrap();
        assert_eq!(few.msrs.len(), 1);
        assert!(from_portable(
            &PortableCpu {
                apic_page: vec![0; 4],
                ..p.clone()
            },
            &all
        )
        .is_err());
    }

    /// An interrupt KVM had in flight goes back to the APIC's IRR; an exception in flight
    /// refuses.
    #[test]
    fn events_in_flight() {
        let p = PortableCpu {
            regs: CpuState::default(),
            apic_base: 0xfee0_0900,
            apic_page: vec![0; 1024],
            tsc: 0,
            kvm_system_time: 0,
            kvm_wall_clock: 0,
            halted: false,
            waiting_for_sipi: false,
            interrupt_shadow: false,
            nmi_pending: false,
            nmi_blocked: false,
        };
        let mut kvm = from_portable(&p, &[]).unwrap();
        kvm.events.interrupt.injected = 1;
        kvm.events.interrupt.nr = 0x31;
        kvm.lapic.regs[0x110 + 2] = 1 << 1;
        let back = to_portable(&kvm).unwrap();
        assert_eq!(back.apic_page[0x210 + 2], 1 << 1, "IRR bit 0x31");
        assert_eq!(back.apic_page[0x110 + 2], 0, "ISR bit 0x31 cleared");
        kvm.events.exception.injected = 1;
        assert!(to_portable(&kvm).is_err());
    }

    /// The platform goes to KVM's form and back: both PICs, the IOAPIC, and the PIT with
    /// its load times through the host's clock (within a millisecond).
    #[test]
    fn the_platform_goes_to_kvm_and_back() {
        let pic = PortablePic {
            irr: 0x01,
            imr: 0xfb,
            isr: 0x02,
            vector_base: 0x20,
            init_state: 0,
            needs_icw4: true,
            auto_eoi: true,
            elcr: 0x08,
            elcr_mask: 0xf8,
            ..PortablePic::default()
        };
        let mut entries = [0x1_0000u64; 24];
        entries[4] = 0x0100_0000_0000_0024;
        let channel = PortablePitChannel {
            count: 0x10000,
            load_ns: Some(9_000_000_000),
            latched_count: Some(0x1234),
            latched_state: 3,
            latched_status: None,
            read_state: 3,
            write_state: 3,
            write_low: 0,
            access: 3,
            mode: 2,
            bcd: false,
            gate: true,
        };
        let p = PortablePlatform {
            guest_ns: 10_000_000_000,
            pic: [
                pic,
                PortablePic {
                    vector_base: 0x28,
                    ..pic
                },
            ],
            ioapic: PortableIoapic {
                id: 0,
                select: 0x10,
                entries,
                lines: 1 << 4,
            },
            pit: [channel; 3],
        };
        let current: Vec<kvm_irqchip> = [0, 1, 2]
            .map(|chip_id| kvm_irqchip {
                chip_id,
                ..Default::default()
            })
            .to_vec();
        let (chips, pit) = platform_from_portable(&p, &current).unwrap();
        let back = platform_to_portable(&chips, &pit, p.guest_ns).unwrap();
        let load = back.pit[0].load_ns.unwrap();
        assert!(load.abs_diff(9_000_000_000) < 1_000_000, "{load}");
        let mut expected = p.clone();
        for c in expected.pit.iter_mut() {
            c.load_ns = Some(load);
        }
        for c in &back.pit {
            assert!(c.load_ns.unwrap().abs_diff(load) < 1_000_000);
        }
        let mut back = back;
        for c in back.pit.iter_mut() {
            c.load_ns = Some(load);
        }
        assert_eq!(back, expected);
        assert!(platform_from_portable(&p, &current[..2]).is_err());
    }
}
