//! The KVM accelerator: in-kernel irqchip and PIT, vCPUs on `kvm-ioctls`, ioeventfd and
//! irqfd for the device processes' data path.

use std::sync::{Arc, Mutex};

mod migration;
mod portable;

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_config, kvm_pit_state2,
    kvm_regs, kvm_segment, kvm_userspace_memory_region, CpuId, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::msi_routes::MsiRoutes;
use super::{
    AccelError, AccelKind, Accelerator, IoEventAddress, IoHandler, Vcpu, VcpuExit, VcpuKicker,
};
use crate::arch::boot::{EntryState, Segment};
use crate::arch::layout;
use crate::devices::interrupt::{InterruptError, IrqChip};
use crate::memory::{DeviceMemory, MemoryManager};
use migration::read_irqchips;

/// The TSS area KVM needs on Intel hosts: three pages in the 32-bit hole, below the BIOS.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The real-time signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// kvmclock and the other paravirtual MSRs: a reset must turn them off, or KVM keeps
/// writing the old kernel's clock page into the new boot's memory.
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;

/// Local APIC register offsets used to program LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// A VM on KVM.
pub struct KvmAccel {
    kvm: Kvm,
    vm: Arc<VmFd>,
    supported_cpuid: CpuId,
    /// Power-on state of the in-kernel irqchip and PIT, restored on reset.
    initial_irqchips: Vec<kvm_bindings::kvm_irqchip>,
    initial_pit: kvm_pit_state2,
    /// kvmclock as it stood when the VM was paused, restored on resume so that the guest
    /// clock does not jump by the time spent paused (as QEMU's kvmclock device does).
    paused_clock: Mutex<Option<kvm_bindings::kvm_clock_data>>,
    /// MSI routes; KVM's routing table is rebuilt from them (plus the default IOAPIC and
    /// PIC routes) whenever they change.
    msi_routes: MsiRoutes,
    /// Serialises table rebuilds.
    routing_lock: Mutex<()>,
    /// Device memory (framebuffers) in memory slots after RAM's: the mapping, and where
    /// the guest sees it.
    device_memory: Mutex<Vec<(Arc<DeviceMemory>, Option<u64>)>>,
    first_device_slot: u32,
    /// The RAM slots (dirty logging switches their flags).
    ram_slots: Vec<migration::RamSlot>,
    /// MSRs KVM lists for saving (KVM_GET_MSR_INDEX_LIST).
    msr_indices: Arc<Vec<u32>>,
    /// KVM's XSAVE area fits the 4 KiB `kvm_xsave` (no KVM_CAP_XSAVE2 beyond it).
    xsave_fits: bool,
}

impl KvmAccel {
    pub fn new(mem: &MemoryManager) -> Result<Self, AccelError> {
        let kvm = Kvm::new().map_err(AccelError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(AccelError::KvmApiVersion(version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::Ioeventfd, "IOEVENTFD"),
            (Cap::Irqfd, "IRQFD"),
            (Cap::UserMemory, "USER_MEMORY"),
            (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
            (Cap::Pit2, "PIT2"),
            (Cap::ExtCpuid, "EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(AccelError::MissingCap(name));
            }
        }
        let vm = kvm.create_vm().map_err(AccelError::kvm("create the VM"))?;
        if kvm.check_extension(Cap::SetTssAddr) {
            vm.set_tss_address(KVM_TSS_ADDRESS)
                .map_err(AccelError::kvm("set the TSS address"))?;
        }
        vm.create_irq_chip()
            .map_err(AccelError::kvm("create the in-kernel irqchip"))?;
        let pit_config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit_config)
            .map_err(AccelError::kvm("create the in-kernel PIT"))?;
        let mut ram_slots = Vec::new();
        for (slot, (gpa, size, host, offset)) in mem.host_regions_in_memfd().into_iter().enumerate()
        {
            let slot = migration::RamSlot {
                slot: slot as u32,
                gpa: gpa.0,
                size,
                host,
                first_page: offset / 4096,
            };
            let region = kvm_userspace_memory_region {
                slot: slot.slot,
                guest_phys_addr: slot.gpa,
                memory_size: slot.size,
                userspace_addr: slot.host,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by the MemoryManager, which the
            // machine keeps alive for as long as this VM exists.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(AccelError::kvm("register guest memory"))?;
            ram_slots.push(slot);
        }
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(AccelError::kvm("list the MSRs to save"))?
            .as_slice()
            .to_vec();
        let xsave_size = kvm.check_extension_int(Cap::Xsave2);
        let xsave_fits = xsave_size <= std::mem::size_of::<kvm_bindings::kvm_xsave>() as i32;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(AccelError::kvm("get the supported CPUID"))?;
        let mut initial_irqchips = read_irqchips(&vm)?;
        for chip in initial_irqchips.iter_mut() {
            if chip.chip_id != KVM_IRQCHIP_IOAPIC {
                // KVM's PICs come up unmasked with vector base 0, and ISA GSIs reach them
                // as well as the IOAPIC. A hardware-reduced ACPI guest never programs the
                // PIC, so mask it as firmware would: otherwise IRQ n arrives as vector n.
                // Writing a Copy union field is safe; `pic` is the member KVM uses for
                // the PIC chip ids.
                chip.chip.pic.imr = 0xff;
                vm.set_irqchip(chip)
                    .map_err(AccelError::kvm("mask the PIC"))?;
            }
        }
        let initial_pit = vm
            .get_pit2()
            .map_err(AccelError::kvm("read the PIT state"))?;
        install_kick_handler()?;
        Ok(Self {
            kvm,
            vm: Arc::new(vm),
            supported_cpuid,
            initial_irqchips,
            initial_pit,
            paused_clock: Mutex::new(None),
            msi_routes: MsiRoutes::default(),
            routing_lock: Mutex::new(()),
            device_memory: Mutex::new(Vec::new()),
            first_device_slot: ram_slots.len() as u32,
            ram_slots,
            msr_indices: Arc::new(msr_indices),
            xsave_fits,
        })
    }

    /// Give KVM the routing table: every IOAPIC pin (and the PIC's for 0..16), as KVM's
    /// default table has them, then the MSI routes.
    fn push_routing(&self) -> Result<(), AccelError> {
        let _serial = self.routing_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut entries = Vec::new();
        let irqchip = |gsi: u32, chip: u32, pin: u32| {
            let mut e = kvm_bindings::kvm_irq_routing_entry {
                gsi,
                type_: kvm_bindings::KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip = kvm_bindings::kvm_irq_routing_irqchip { irqchip: chip, pin };
            e
        };
        for gsi in 0..layout::IOAPIC_NUM_PINS {
            entries.push(irqchip(gsi, kvm_bindings::KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 16 {
                let chip = if gsi < 8 {
                    kvm_bindings::KVM_IRQCHIP_PIC_MASTER
                } else {
                    kvm_bindings::KVM_IRQCHIP_PIC_SLAVE
                };
                entries.push(irqchip(gsi, chip, gsi % 8));
            }
        }
        for (gsi, address, data) in self.msi_routes.all() {
            let mut e = kvm_bindings::kvm_irq_routing_entry {
                gsi,
                type_: kvm_bindings::KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi = kvm_bindings::kvm_irq_routing_msi {
                address_lo: address as u32,
                address_hi: (address >> 32) as u32,
                data,
                ..Default::default()
            };
            entries.push(e);
        }
        let routing = kvm_bindings::KvmIrqRouting::from_entries(&entries)
            .map_err(|_| AccelError::Unsupported("a GSI routing table this large"))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(AccelError::kvm("KVM_SET_GSI_ROUTING"))
    }

    fn vcpu_cpuid(&self, id: u32, num_vcpus: u32) -> CpuId {
        let mut cpuid = self.supported_cpuid.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => {
                    // Initial APIC id, logical processor count, hypervisor present.
                    e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (num_vcpus.min(255) << 16);
                    e.ecx |= 1 << 31;
                    if num_vcpus > 1 {
                        e.edx |= 1 << 28;
                    }
                }
                0xb | 0x1f => e.edx = id,
                _ => {}
            }
        }
        cpuid
    }
}

impl IrqChip for KvmAccel {
    fn set_irq_level(&self, gsi: u32, level: bool) -> Result<(), InterruptError> {
        self.vm
            .set_irq_line(gsi, level)
            .map_err(|e| InterruptError::SetLevel {
                gsi,
                source: std::io::Error::from_raw_os_error(e.errno()),
            })
    }
}

/// The VM's irqchip as a device-facing [`IrqChip`].
struct KvmIrqChip(Arc<VmFd>);

impl IrqChip for KvmIrqChip {
    fn set_irq_level(&self, gsi: u32, level: bool) -> Result<(), InterruptError> {
        self.0
            .set_irq_line(gsi, level)
            .map_err(|e| InterruptError::SetLevel {
                gsi,
                source: std::io::Error::from_raw_os_error(e.errno()),
            })
    }
}

fn kvm_ioevent_addr(addr: IoEventAddress) -> kvm_ioctls::IoEventAddress {
    match addr {
        IoEventAddress::Pio(p) => kvm_ioctls::IoEventAddress::Pio(u64::from(p)),
        IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    }
}

impl Accelerator for KvmAccel {
    fn kind(&self) -> AccelKind {
        AccelKind::Kvm
    }

    fn max_vcpus(&self) -> u32 {
        self.kvm.get_max_vcpus().min(255) as u32
    }

    fn create_vcpu(
        &self,
        id: u32,
        num_vcpus: u32,
        _io: Arc<dyn IoHandler + Send>,
    ) -> Result<Box<dyn Vcpu>, AccelError> {
        let fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(AccelError::kvm("create a vCPU"))?;
        fd.set_cpuid2(&self.vcpu_cpuid(id, num_vcpus))
            .map_err(AccelError::kvm("set the vCPU's CPUID"))?;
        // LINT0 takes the PIC's ExtINT, LINT1 is NMI, as PC firmware leaves them.
        let mut lapic = fd
            .get_lapic()
            .map_err(AccelError::kvm("read the local APIC"))?;
        set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic)
            .map_err(AccelError::kvm("program the local APIC"))?;
        let kicker = Arc::new(KvmKicker {
            target: Mutex::new(None),
        });
        Ok(Box::new(KvmVcpu {
            id,
            fd,
            initial_lapic: lapic,
            kicker,
            msr_indices: self.msr_indices.clone(),
            xsave_fits: self.xsave_fits,
        }))
    }

    fn irq_chip(&self) -> Arc<dyn IrqChip> {
        Arc::new(KvmIrqChip(self.vm.clone()))
    }

    fn add_msi_route(&self, address: u64, data: u32) -> Result<u32, AccelError> {
        let gsi = self
            .msi_routes
            .add(address, data)
            .map_err(|_| AccelError::Unsupported("more MSI routes"))?;
        if let Err(e) = self.push_routing() {
            let _ = self.msi_routes.remove(gsi);
            return Err(e);
        }
        Ok(gsi)
    }

    fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), AccelError> {
        self.msi_routes
            .set(gsi, address, data)
            .map_err(|_| AccelError::Unsupported("changing a GSI that is not an MSI route"))?;
        self.push_routing()
    }

    fn remove_msi_route(&self, gsi: u32) -> Result<(), AccelError> {
        self.msi_routes
            .remove(gsi)
            .map_err(|_| AccelError::Unsupported("removing a GSI that is not an MSI route"))?;
        self.push_routing()
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<(), AccelError> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        self.vm
            .signal_msi(msi)
            .map(|_| ())
            .map_err(AccelError::kvm("KVM_SIGNAL_MSI"))
    }

    fn pause(&self) {
        let mut saved = self.paused_clock.lock().unwrap_or_else(|e| e.into_inner());
        if saved.is_some() {
            return; // already paused: keep the first reading
        }
        match self.vm.get_clock() {
            Ok(clock) => *saved = Some(clock),
            Err(e) => tracing::warn!("KVM_GET_CLOCK at pause: {e}; the guest clock will jump"),
        }
    }

    fn resume(&self) {
        let saved = self
            .paused_clock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(clock) = saved {
            // Only the clock value goes back; the flags of a reading do not apply to a set.
            let restore = kvm_bindings::kvm_clock_data {
                clock: clock.clock,
                ..Default::default()
            };
            if let Err(e) = self.vm.set_clock(&restore) {
                tracing::warn!("KVM_SET_CLOCK at resume: {e}; the guest clock will jump");
            }
        }
    }

    fn add_device_memory(&self, memory: Arc<DeviceMemory>) -> Result<u32, AccelError> {
        let mut regions = self.device_memory.lock().unwrap_or_else(|e| e.into_inner());
        regions.push((memory, None));
        Ok(regions.len() as u32 - 1)
    }

    fn move_device_memory(&self, handle: u32, gpa: Option<u64>) -> Result<(), AccelError> {
        let mut regions = self.device_memory.lock().unwrap_or_else(|e| e.into_inner());
        let Some((memory, at)) = regions.get_mut(handle as usize) else {
            return Err(AccelError::DeviceMemory(format!(
                "no device memory {handle}"
            )));
        };
        let slot = self.first_device_slot + handle;
        if at.take().is_some() {
            let region = kvm_userspace_memory_region {
                slot,
                ..Default::default()
            };
            // SAFETY: a size of 0 deletes the slot; no memory is handed to KVM.
            unsafe { self.vm.set_user_memory_region(region) }
                .map_err(AccelError::kvm("remove device memory"))?;
        }
        if let Some(gpa) = gpa {
            let region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: gpa,
                memory_size: memory.len() as u64,
                userspace_addr: memory.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the mapping lives as long as `memory`, which this accelerator keeps
            // for as long as the VM exists.
            unsafe { self.vm.set_user_memory_region(region) }
                .map_err(AccelError::kvm("map device memory"))?;
            *at = Some(gpa);
        }
        Ok(())
    }

    fn start_dirty_log(&self) -> Result<(), AccelError> {
        let result = self.set_ram_logging(true);
        if result.is_err() {
            let _ = self.set_ram_logging(false);
        }
        result
    }

    fn take_dirty_log(&self, pages: usize) -> Result<Vec<u64>, AccelError> {
        self.take_ram_log(pages)
    }

    fn stop_dirty_log(&self) {
        if let Err(e) = self.set_ram_logging(false) {
            tracing::warn!("KVM: cannot stop the dirty log: {e}");
        }
    }

    fn save_platform(&self) -> Result<Vec<u8>, AccelError> {
        self.save_kvm_platform()
    }

    fn restore_platform(&self, state: &[u8]) -> Result<(), AccelError> {
        self.restore_kvm_platform(state)
    }

    fn reset(&self) -> Result<(), AccelError> {
        self.load_irqchips_and_pit(&self.initial_irqchips, &self.initial_pit)
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), AccelError> {
        let a = kvm_ioevent_addr(addr);
        match datamatch {
            Some(v) => self.vm.register_ioevent(fd, &a, v),
            None => self.vm.register_ioevent(fd, &a, kvm_ioctls::NoDatamatch),
        }
        .map_err(AccelError::kvm("register an ioeventfd"))
    }

    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), AccelError> {
        let a = kvm_ioevent_addr(addr);
        match datamatch {
            Some(v) => self.vm.unregister_ioevent(fd, &a, v),
            None => self.vm.unregister_ioevent(fd, &a, kvm_ioctls::NoDatamatch),
        }
        .map_err(AccelError::kvm("unregister an ioeventfd"))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), AccelError> {
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(AccelError::kvm("register an irqfd"))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), AccelError> {
        self.vm
            .unregister_irqfd(fd, gsi)
            .map_err(AccelError::kvm("unregister an irqfd"))
    }
}

fn set_lvt_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let bytes: Vec<u8> = lapic.regs[reg..reg + 4].iter().map(|b| *b as u8).collect();
    let mut v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    v = (v & !0x700) | (mode << 8);
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[reg + i] = *b as _;
    }
}

fn install_kick_handler() -> Result<(), AccelError> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), noop) {
            result = Err(AccelError::Kvm {
                what: "install the vCPU kick signal handler",
                source: kvm_ioctls::Error::new(e.errno()),
            });
        }
    });
    result
}

/// Raw pointer to a vCPU's `kvm_run.immediate_exit` and its thread.
struct KickTarget {
    immediate_exit: *mut u8,
    thread: libc::pthread_t,
}

// SAFETY: the pointer refers to the vCPU's kvm_run mapping, which stays mapped until the
// vCPU thread calls `retire()` under the same mutex; the pthread_t is only signalled
// while that thread is alive for the same reason.
unsafe impl Send for KickTarget {}

struct KvmKicker {
    target: Mutex<Option<KickTarget>>,
}

impl VcpuKicker for KvmKicker {
    fn kick(&self) {
        let guard = self.target.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = guard.as_ref() {
            // SAFETY: see KickTarget; the mapping is alive while we hold the lock.
            unsafe { std::ptr::write_volatile(t.immediate_exit, 1) };
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            // SAFETY: the thread is alive (it retires under this lock before exiting).
            unsafe { libc::pthread_kill(t.thread, kick_signal()) };
        }
    }

    fn retire(&self) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

pub struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    initial_lapic: kvm_lapic_state,
    kicker: Arc<KvmKicker>,
    msr_indices: Arc<Vec<u32>>,
    xsave_fits: bool,
}

impl KvmVcpu {
    fn set_boot_msrs(&self) -> Result<(), AccelError> {
        let entries = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, 1),
            // MTRRs enabled, default type write-back.
            (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
            (MSR_KVM_SYSTEM_TIME, 0),
            (MSR_KVM_SYSTEM_TIME_NEW, 0),
            (MSR_KVM_ASYNC_PF_EN, 0),
            (MSR_KVM_STEAL_TIME, 0),
            (MSR_KVM_PV_EOI_EN, 0),
        ];
        let list: Vec<kvm_msr_entry> = entries
            .iter()
            .map(|(index, data)| kvm_msr_entry {
                index: *index,
                data: *data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&list).map_err(|_| AccelError::Kvm {
            what: "build the MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(AccelError::kvm("set the boot MSRs"))?;
        if written != list.len() {
            // Some hosts lack an MSR (say, the PV ones); the rest were applied.
            tracing::debug!(
                "vcpu{}: KVM accepted {written} of {} boot MSRs",
                self.id,
                list.len()
            );
        }
        Ok(())
    }
}

fn kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present as u8,
        dpl: s.dpl,
        db: s.db as u8,
        s: s.s as u8,
        l: s.l as u8,
        g: s.g as u8,
        avl: s.avl as u8,
        unusable: (!s.present) as u8,
        padding: 0,
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn reset(&mut self, entry: Option<&EntryState>) -> Result<(), AccelError> {
        self.fd
            .set_lapic(&self.initial_lapic)
            .map_err(AccelError::kvm("reset the local APIC"))?;
        self.set_boot_msrs()?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(AccelError::kvm("reset the FPU"))?;
        let Some(st) = entry else {
            // Application processors wait for INIT/SIPI from the boot CPU.
            return self
                .fd
                .set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_UNINITIALIZED,
                })
                .map_err(AccelError::kvm("put the vCPU in wait-for-SIPI"));
        };
        let mut sregs = self.fd.get_sregs().map_err(AccelError::kvm("read sregs"))?;
        sregs.cs = kvm_segment(&st.cs);
        sregs.ds = kvm_segment(&st.ds);
        sregs.es = kvm_segment(&st.es);
        sregs.fs = kvm_segment(&st.fs);
        sregs.gs = kvm_segment(&st.gs);
        sregs.ss = kvm_segment(&st.ss);
        sregs.tr = kvm_segment(&st.tr);
        sregs.ldt = kvm_segment(&st.ldt);
        sregs.gdt.base = st.gdt_base;
        sregs.gdt.limit = st.gdt_limit;
        sregs.idt.base = st.idt_base;
        sregs.idt.limit = st.idt_limit;
        sregs.cr0 = st.cr0;
        sregs.cr2 = 0;
        sregs.cr3 = st.cr3;
        sregs.cr4 = st.cr4;
        sregs.cr8 = 0;
        sregs.efer = st.efer;
        sregs.interrupt_bitmap = [0; 4];
        self.fd
            .set_sregs(&sregs)
            .map_err(AccelError::kvm("set sregs"))?;
        let regs = kvm_regs {
            rip: st.rip,
            rsp: st.rsp,
            rbp: st.rsp,
            rsi: st.rsi,
            rflags: st.rflags,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(AccelError::kvm("set registers"))?;
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(AccelError::kvm("make the vCPU runnable"))
    }

    fn bind_to_current_thread(&mut self) {
        let run = self.fd.get_kvm_run();
        let immediate_exit = std::ptr::addr_of_mut!(run.immediate_exit);
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        *self.kicker.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(KickTarget {
            immediate_exit,
            thread,
        });
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit, AccelError> {
        loop {
            match self.fd.run() {
                Ok(KvmExit::IoIn(port, data)) => io.pio_read(port, data),
                Ok(KvmExit::IoOut(port, data)) => io.pio_write(port, data),
                Ok(KvmExit::MmioRead(addr, data)) => io.mmio_read(addr, data),
                Ok(KvmExit::MmioWrite(addr, data)) => io.mmio_write(addr, data),
                Ok(KvmExit::Shutdown) => return Ok(VcpuExit::TripleFault),
                Ok(KvmExit::Intr) => {
                    self.fd.set_kvm_immediate_exit(0);
                    return Ok(VcpuExit::Interrupted);
                }
                Ok(KvmExit::Hlt) => {
                    // Only without an in-kernel irqchip; ours always has one.
                    return Ok(VcpuExit::InternalError("unexpected HLT exit".into()));
                }
                Ok(KvmExit::FailEntry(reason, cpu)) => {
                    return Ok(VcpuExit::InternalError(format!(
                        "KVM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
                    )))
                }
                Ok(KvmExit::InternalError) => {
                    let suberror = self.fd.get_kvm_run().__bindgen_anon_1;
                    // SAFETY: the union's `internal` member is the active one for this exit.
                    let sub = unsafe { suberror.internal.suberror };
                    let what = match sub {
                        1 => " (instruction emulation failed)",
                        2 => " (simultaneous exceptions)",
                        3 => " (unexpected exit during event delivery)",
                        _ => "",
                    };
                    return Ok(VcpuExit::InternalError(format!(
                        "KVM internal error, suberror {sub}{what}"
                    )));
                }
                Ok(KvmExit::SystemEvent(kind, _)) => {
                    return Ok(VcpuExit::InternalError(format!(
                        "unexpected system event {kind}"
                    )))
                }
                Ok(other) => {
                    return Ok(VcpuExit::InternalError(format!(
                        "unexpected exit {other:?}"
                    )))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    return Ok(VcpuExit::Interrupted);
                }
                Err(e) => {
                    return Err(AccelError::Kvm {
                        what: "run the vCPU",
                        source: e,
                    })
                }
            }
        }
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }

    fn inject_nmi(&mut self) -> Result<(), AccelError> {
        self.fd.nmi().map_err(AccelError::kvm("inject an NMI"))
    }

    fn paging_registers(&mut self) -> Result<super::PagingRegisters, AccelError> {
        let s = self
            .fd
            .get_sregs()
            .map_err(AccelError::kvm("read special registers"))?;
        Ok(super::PagingRegisters {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        })
    }

    fn save_state(&mut self) -> Result<Vec<u8>, AccelError> {
        self.save_kvm_state()
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), AccelError> {
        self.restore_kvm_state(state)
    }

    fn is_halted(&mut self) -> bool {
        self.fd
            .get_mp_state()
            .map(|s| s.mp_state == kvm_bindings::KVM_MP_STATE_HALTED)
            .unwrap_or(false)
    }

    fn instruction_pointer(&mut self) -> Result<u64, AccelError> {
        Ok(self
            .fd
            .get_regs()
            .map_err(AccelError::kvm("read registers"))?
            .rip)
    }

    fn dump_registers(&mut self) -> String {
        let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return format!("CPU#{}: registers unavailable", self.id);
        };
        format!(
            "CPU#{id}\nRAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\n\
             RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}\n\
             R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}\n\
             R12={:016x} R13={:016x} R14={:016x} R15={:016x}\n\
             RIP={:016x} RFL={:08x}\n\
             CS ={:04x} {:016x} SS ={:04x} {:016x}\n\
             CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x} EFER={:016x}",
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            r.rsp,
            r.r8,
            r.r9,
            r.r10,
            r.r11,
            r.r12,
            r.r13,
            r.r14,
            r.r15,
            r.rip,
            r.rflags,
            s.cs.selector,
            s.cs.base,
            s.ss.selector,
            s.ss.base,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            id = self.id
        )
    }
}
