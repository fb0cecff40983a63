//! Live migration under KVM: the guest's writes logged by KVM itself
//! (`KVM_MEM_LOG_DIRTY_PAGES` on every RAM slot, read and cleared with
//! `KVM_GET_DIRTY_LOG`), each vCPU's state as KVM holds it (registers, special registers,
//! XSAVE area, XCRs, MSRs, local APIC, MP state, pending events, debug registers), and the
//! VM's own (the in-kernel PICs and IOAPIC, the PIT, and kvmclock so that guest time goes
//! on from where it stopped). The state is KVM's encoding: it loads under KVM only.

use kvm_bindings::{
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
};
use serde::{Deserialize, Serialize};

use super::{portable, KvmAccel, KvmVcpu};
use crate::accel::AccelError;
use crate::accel::{AccelKind, PlatformSection, Saved, VcpuSection};
use crate::migration::ram::{mark, set_bits};

const PAGE_SIZE: u64 = 4096;

/// A RAM slot: where KVM has it, and where its pages are in the guest-RAM memfd.
#[derive(Clone, Copy, Debug)]
pub(super) struct RamSlot {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub host: u64,
    /// Its first page's index in the memfd (the order the migration stream numbers).
    pub first_page: u64,
}

impl RamSlot {
    fn region(&self, log: bool) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.host,
            flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        }
    }
}

#[derive(Serialize, Deserialize)]
struct PlatformState {
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
    /// kvmclock's value when the VM stopped.
    clock: u64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, AccelError> {
    postcard::to_stdvec(value).map_err(|e| AccelError::Snapshot(e.to_string()))
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, AccelError> {
    postcard::from_bytes(bytes).map_err(|e| AccelError::Snapshot(e.to_string()))
}

/// The in-kernel interrupt controllers, in the order they are saved.
const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// The state of each in-kernel interrupt controller.
pub(super) fn read_irqchips(vm: &kvm_ioctls::VmFd) -> Result<Vec<kvm_irqchip>, AccelError> {
    IRQCHIPS
        .iter()
        .map(|&chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(AccelError::kvm("read the irqchip state"))?;
            Ok(chip)
        })
        .collect()
}

fn too_many_msrs() -> AccelError {
    AccelError::Kvm {
        what: "build the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    }
}

/// A test-only switch (as under emu): the guest's writes go unlogged, so that a migration
/// test can show that its checker sees lost pages.
fn unlogged_for_test() -> bool {
    std::env::var("VMM_TEST_NO_DIRTY_LOG").is_ok_and(|v| v == "cpu")
}

impl KvmAccel {
    /// Load interrupt controller and PIT states (power-on ones at a reset, saved ones on
    /// a migration's destination).
    pub(super) fn load_irqchips_and_pit(
        &self,
        chips: &[kvm_irqchip],
        pit: &kvm_pit_state2,
    ) -> Result<(), AccelError> {
        for chip in chips {
            self.vm
                .set_irqchip(chip)
                .map_err(AccelError::kvm("load the irqchip state"))?;
        }
        self.vm
            .set_pit2(pit)
            .map_err(AccelError::kvm("load the PIT state"))
    }

    /// Turn KVM's dirty log on or off for every RAM slot (turning it on clears it).
    pub(super) fn set_ram_logging(&self, on: bool) -> Result<(), AccelError> {
        let on = on && !unlogged_for_test();
        for slot in &self.ram_slots {
            // SAFETY: the same live mapping the slot had (owned by the MemoryManager, which
            // outlives the VM); only the flags change.
            unsafe { self.vm.set_user_memory_region(slot.region(on)) }
                .map_err(AccelError::kvm("switch the dirty log of a RAM slot"))?;
        }
        Ok(())
    }

    /// KVM's dirty bits of every slot, in the memfd's page order, cleared as read.
    pub(super) fn take_ram_log(&self, pages: usize) -> Result<Vec<u64>, AccelError> {
        let mut bits = vec![0u64; pages.div_ceil(64)];
        if unlogged_for_test() {
            return Ok(bits);
        }
        for slot in &self.ram_slots {
            let log = self
                .vm
                .get_dirty_log(slot.slot, slot.size as usize)
                .map_err(AccelError::kvm("KVM_GET_DIRTY_LOG"))?;
            let slot_pages = slot.size / PAGE_SIZE;
            for page_in_slot in set_bits(log).take_while(|&p| p < slot_pages) {
                mark(&mut bits, slot.first_page + page_in_slot);
            }
        }
        Ok(bits)
    }

    /// The interrupt controllers, the PIT and the clock (the VM is paused: its clock is
    /// the one read at the pause).
    pub(super) fn save_kvm_platform(&self) -> Result<Vec<u8>, AccelError> {
        let irqchips = read_irqchips(&self.vm)?;
        let pit = self
            .vm
            .get_pit2()
            .map_err(AccelError::kvm("read the PIT state"))?;
        let paused = *self.paused_clock.lock().unwrap_or_else(|e| e.into_inner());
        let clock = match paused {
            Some(c) => c.clock,
            None => {
                self.vm
                    .get_clock()
                    .map_err(AccelError::kvm("KVM_GET_CLOCK"))?
                    .clock
            }
        };
        let portable = portable::platform_to_portable(&irqchips, &pit, clock).ok();
        PlatformSection {
            accel: AccelKind::Kvm.name().into(),
            native: encode(&PlatformState {
                irqchips,
                pit,
                clock,
            })?,
            portable,
        }
        .encode()
    }

    /// Take the saved platform; the clock is set when the VM resumes.
    pub(super) fn restore_kvm_platform(&self, state: &[u8]) -> Result<(), AccelError> {
        let section = PlatformSection::decode(state)?;
        let s: PlatformState = match section.for_accel(AccelKind::Kvm)? {
            Saved::Native(native) => decode(native)?,
            Saved::Portable(p) => {
                let (irqchips, pit) =
                    portable::platform_from_portable(p, &read_irqchips(&self.vm)?)?;
                PlatformState {
                    irqchips,
                    pit,
                    clock: p.guest_ns,
                }
            }
        };
        if s.irqchips.len() != IRQCHIPS.len()
            || s.irqchips
                .iter()
                .zip(IRQCHIPS)
                .any(|(c, id)| c.chip_id != id)
        {
            return Err(AccelError::Snapshot(
                "the irqchips saved are not KVM's three".into(),
            ));
        }
        self.load_irqchips_and_pit(&s.irqchips, &s.pit)?;
        let clock = kvm_bindings::kvm_clock_data {
            clock: s.clock,
            ..Default::default()
        };
        *self.paused_clock.lock().unwrap_or_else(|e| e.into_inner()) = Some(clock);
        Ok(())
    }
}

impl KvmVcpu {
    /// Every MSR KVM reports that this vCPU can read, with its value: those it refuses are
    /// left out (a host may list one it cannot read on this CPU).
    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>, AccelError> {
        let mut pending: Vec<kvm_msr_entry> = self
            .msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut read = Vec::new();
        while !pending.is_empty() {
            let mut msrs = Msrs::from_entries(&pending).map_err(|_| too_many_msrs())?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(AccelError::kvm("read the MSRs"))?;
            read.extend_from_slice(&msrs.as_slice()[..n]);
            // KVM stops at the first MSR it cannot read: skip it, go on after it.
            pending.drain(..(n + 1).min(pending.len()));
        }
        Ok(read)
    }

    pub(super) fn save_kvm_state(&mut self) -> Result<Vec<u8>, AccelError> {
        if !self.xsave_fits {
            return Err(AccelError::Unsupported(
                "saving a vCPU whose XSAVE area is larger than 4 KiB",
            ));
        }
        let fd = &self.fd;
        // The MP state first: reading it makes KVM settle pending APIC events.
        let mp_state = fd
            .get_mp_state()
            .map_err(AccelError::kvm("read the MP state"))?;
        let state = VcpuState {
            regs: fd.get_regs().map_err(AccelError::kvm("read registers"))?,
            sregs: fd
                .get_sregs()
                .map_err(AccelError::kvm("read special registers"))?,
            xsave: fd.get_xsave().map_err(AccelError::kvm("read XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(AccelError::kvm("read XCRs"))?,
            msrs: self.read_msrs()?,
            lapic: fd
                .get_lapic()
                .map_err(AccelError::kvm("read the local APIC"))?,
            mp_state,
            events: fd
                .get_vcpu_events()
                .map_err(AccelError::kvm("read the pending events"))?,
            debugregs: fd
                .get_debug_regs()
                .map_err(AccelError::kvm("read the debug registers"))?,
        };
        let portable = portable::to_portable(&state).ok();
        VcpuSection {
            accel: AccelKind::Kvm.name().into(),
            native: encode(&state)?,
            portable,
        }
        .encode()
    }

    /// Load a saved state, in the order KVM needs: special registers (the APIC base among
    /// them) before the local APIC, MSRs before the events, the MP state last.
    pub(super) fn restore_kvm_state(&mut self, state: &[u8]) -> Result<(), AccelError> {
        if !self.xsave_fits {
            return Err(AccelError::Unsupported(
                "restoring a vCPU whose XSAVE area is larger than 4 KiB",
            ));
        }
        let section = VcpuSection::decode(state)?;
        let s: VcpuState = match section.for_accel(AccelKind::Kvm)? {
            Saved::Native(native) => decode(native)?,
            Saved::Portable(p) => portable::from_portable(p, &self.msr_indices)?,
        };
        let fd = &self.fd;
        fd.set_sregs(&s.sregs)
            .map_err(AccelError::kvm("restore special registers"))?;
        fd.set_regs(&s.regs)
            .map_err(AccelError::kvm("restore registers"))?;
        // SAFETY: KVM's XSAVE area on this host fits the 4 KiB struct (`xsave_fits`, from
        // KVM_CAP_XSAVE2), so KVM reads no further than the struct we pass.
        unsafe { fd.set_xsave(&s.xsave) }.map_err(AccelError::kvm("restore XSAVE"))?;
        fd.set_xcrs(&s.xcrs)
            .map_err(AccelError::kvm("restore XCRs"))?;
        let msrs = Msrs::from_entries(&s.msrs).map_err(|_| too_many_msrs())?;
        let written = fd
            .set_msrs(&msrs)
            .map_err(AccelError::kvm("restore the MSRs"))?;
        if written != s.msrs.len() {
            let refused = s.msrs.get(written).map_or(0, |m| m.index);
            return Err(AccelError::Snapshot(format!(
                "KVM refused MSR {refused:#x} ({written} of {} restored)",
                s.msrs.len()
            )));
        }
        fd.set_lapic(&s.lapic)
            .map_err(AccelError::kvm("restore the local APIC"))?;
        fd.set_vcpu_events(&s.events)
            .map_err(AccelError::kvm("restore the pending events"))?;
        fd.set_debug_regs(&s.debugregs)
            .map_err(AccelError::kvm("restore the debug registers"))?;
        fd.set_mp_state(s.mp_state)
            .map_err(AccelError::kvm("restore the MP state"))
    }
}
