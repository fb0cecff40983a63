//! Accelerators: what runs guest instructions. `kvm` uses the host kernel; `emu` (a later
//! issue) is our own software CPU. Both plug into the same machine through these traits,
//! and both send port and MMIO accesses through one [`IoHandler`].

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot::EntryState;
use crate::devices::IrqChip;
use crate::memory::DeviceMemory;

pub mod emu;
pub mod eventfds;
pub mod kvm;
pub mod msi_routes;
pub mod qtest;

/// The accelerators this build knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelKind {
    Kvm,
    Emu,
    /// No CPU: a test drives the machine over the `-qtest` socket.
    Qtest,
}

impl AccelKind {
    pub fn name(self) -> &'static str {
        match self {
            AccelKind::Kvm => "kvm",
            AccelKind::Emu => "emu",
            AccelKind::Qtest => "qtest",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("could not open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (12 is needed)")]
    KvmApiVersion(i32),
    #[error("KVM lacks the {0} capability")]
    MissingCap(&'static str),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("accelerator '{0}' is not available in this build")]
    Unavailable(&'static str),
    #[error("{0} vCPUs requested, but this accelerator supports at most {1}")]
    TooManyVcpus(u32, u32),
    #[error("emu: {0}")]
    Emu(String),
    #[error("qtest: {0}")]
    Qtest(String),
    #[error("{0} is not supported by this accelerator")]
    Unsupported(&'static str),
    #[error("device memory: {0}")]
    DeviceMemory(String),
    /// A snapshot that cannot be encoded or read back.
    #[error("snapshot: {0}")]
    Snapshot(String),
}

impl AccelError {
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> AccelError {
        move |source| AccelError::Kvm { what, source }
    }
}

/// Where guest port and MMIO accesses go: the machine's buses.
pub trait IoHandler: Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]);
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why [`Vcpu::run`] returned to the vCPU thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// Another thread kicked this vCPU (pause, stop, reset): look at the run request.
    Interrupted,
    /// The guest triple-faulted: the machine resets, as a PC does.
    TripleFault,
    /// The vCPU cannot continue; the string says why.
    InternalError(String),
}

/// An address a guest write to which signals an eventfd without leaving the accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEventAddress {
    Pio(u16),
    Mmio(u64),
}

/// One virtual CPU. It lives on its own thread; other threads reach it only through
/// its [`VcpuKicker`].
pub trait Vcpu: Send {
    fn id(&self) -> u32;
    /// Put the vCPU in its power-on state: the boot CPU enters the guest with `entry`,
    /// the others wait for INIT/SIPI.
    fn reset(&mut self, entry: Option<&EntryState>) -> Result<(), AccelError>;
    /// Called first on the thread that will run this vCPU, so that kicks reach it.
    fn bind_to_current_thread(&mut self);
    /// Run until something needs the vCPU thread's attention. Port and MMIO exits are
    /// dispatched to `io` inside.
    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit, AccelError>;
    /// A handle that makes a running [`Vcpu::run`] return [`VcpuExit::Interrupted`].
    fn kicker(&self) -> Arc<dyn VcpuKicker>;
    /// The instruction pointer, for diagnostics and queries.
    fn instruction_pointer(&mut self) -> Result<u64, AccelError>;
    /// A register dump for diagnostics (format close to QEMU's `info registers`).
    fn dump_registers(&mut self) -> String;
    /// Queue an NMI for this vCPU (QMP inject-nmi), called on the vCPU's own thread.
    fn inject_nmi(&mut self) -> Result<(), AccelError> {
        Err(AccelError::Unsupported("NMI injection into one vCPU"))
    }
    /// Whether the vCPU waits in HLT for an interrupt (QMP query-cpus' `halted`).
    fn is_halted(&mut self) -> bool {
        false
    }
    /// The registers that say how the vCPU translates virtual addresses (QMP memsave).
    fn paging_registers(&mut self) -> Result<PagingRegisters, AccelError>;
    /// The vCPU's whole state for a snapshot, in the accelerator's encoding; called on the
    /// vCPU's thread between runs.
    fn save_state(&mut self) -> Result<Vec<u8>, AccelError> {
        Err(AccelError::Unsupported("saving vCPU state"))
    }
    /// Take the state [`Vcpu::save_state`] gave (on another machine, maybe).
    fn restore_state(&mut self, state: &[u8]) -> Result<(), AccelError> {
        let _ = state;
        Err(AccelError::Unsupported("restoring vCPU state"))
    }
}

/// A vCPU's or the platform's section of a migration: the state in its accelerator's own
/// encoding, and in the portable form another accelerator takes (None where it cannot be
/// expressed, as an exception KVM holds in flight). Both accelerators run one machine
/// model, so a guest saved under emu loads under KVM and the reverse.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct StateSection<P> {
    /// The accelerator that saved it (`emu`, `kvm`).
    pub accel: String,
    pub native: Vec<u8>,
    pub portable: Option<P>,
}

/// A vCPU's section (registers, FPU/SSE, MSRs, local APIC, events).
pub type VcpuSection = StateSection<::emu::cpu::PortableCpu>;
/// The platform's section (guest time, interrupt controllers, PIT).
pub type PlatformSection = StateSection<::emu::portable::PortablePlatform>;

/// A section's state: ours to load as it is, or another accelerator's in portable form.
pub enum Saved<'a, P> {
    Native(&'a [u8]),
    Portable(&'a P),
}

impl<P: serde::Serialize + serde::de::DeserializeOwned> StateSection<P> {
    pub fn encode(&self) -> Result<Vec<u8>, AccelError> {
        postcard::to_stdvec(self).map_err(|e| AccelError::Snapshot(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, AccelError> {
        postcard::from_bytes(bytes).map_err(|e| AccelError::Snapshot(e.to_string()))
    }

    /// What an accelerator of kind `own` loads from this section.
    pub fn for_accel(&self, own: AccelKind) -> Result<Saved<'_, P>, AccelError> {
        if self.accel == own.name() {
            return Ok(Saved::Native(&self.native));
        }
        self.portable.as_ref().map(Saved::Portable).ok_or_else(|| {
            AccelError::Snapshot(format!(
                "the state saved under {} cannot be loaded under {}",
                self.accel,
                own.name()
            ))
        })
    }
}

/// The control registers that select and root a vCPU's address translation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagingRegisters {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// Interrupts a vCPU that is inside [`Vcpu::run`], or makes its next run return at once.
pub trait VcpuKicker: Send + Sync {
    fn kick(&self);
    /// Called by the vCPU thread before its vCPU is dropped: later kicks do nothing.
    fn retire(&self);
}

/// A VM-wide accelerator instance.
pub trait Accelerator: Send + Sync {
    fn kind(&self) -> AccelKind;
    fn max_vcpus(&self) -> u32;
    /// Create vCPU `id` of `num_vcpus`. `io` is the machine's buses (the emu CPU keeps it;
    /// KVM receives its exits through [`Vcpu::run`] instead).
    fn create_vcpu(
        &self,
        id: u32,
        num_vcpus: u32,
        io: Arc<dyn IoHandler + Send>,
    ) -> Result<Box<dyn Vcpu>, AccelError>;
    /// Put the accelerator's own platform devices (the emu's IOAPIC, PIC and PIT; nothing
    /// for KVM, which keeps them in the kernel) on the machine's buses.
    fn register_platform_devices(
        &self,
        _pio: &crate::devices::Bus,
        _mmio: &crate::devices::Bus,
    ) -> Result<(), AccelError> {
        Ok(())
    }
    /// The VM stops (guest time should stop with it) or resumes.
    fn pause(&self) {}
    fn resume(&self) {}
    /// The interrupt controller that device interrupt lines drive.
    fn irq_chip(&self) -> Arc<dyn IrqChip>;
    /// Send an NMI to every vCPU through the accelerator's own interrupt routing.
    /// Returns false when it has none, and each vCPU must take the NMI itself
    /// ([`Vcpu::inject_nmi`]).
    fn inject_nmi_all(&self) -> bool {
        false
    }
    /// Deliver a message-signalled interrupt: the 32-bit write of `data` to `address` that
    /// a device's MSI or MSI-X entry describes.
    fn signal_msi(&self, address: u64, data: u32) -> Result<(), AccelError>;
    /// A GSI that delivers the MSI `address`/`data` (an MSI route), for irqfds: then a
    /// device's interrupts reach the guest without a vmm thread. `Unsupported` where the
    /// accelerator has no routes; the device then relays its interrupts itself.
    fn add_msi_route(&self, address: u64, data: u32) -> Result<u32, AccelError> {
        let _ = (address, data);
        Err(AccelError::Unsupported("MSI routes"))
    }
    /// Point MSI route `gsi` at a new message.
    fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), AccelError> {
        let _ = (gsi, address, data);
        Err(AccelError::Unsupported("MSI routes"))
    }
    fn remove_msi_route(&self, gsi: u32) -> Result<(), AccelError> {
        let _ = gsi;
        Err(AccelError::Unsupported("MSI routes"))
    }
    /// Let the guest reach `memory` as RAM once [`Accelerator::move_device_memory`] places
    /// it (a framebuffer BAR): its accesses then never leave the accelerator. Returns the
    /// region's handle. `Unsupported` where the accelerator cannot, and the device then
    /// serves the BAR's accesses itself.
    fn add_device_memory(&self, memory: Arc<DeviceMemory>) -> Result<u32, AccelError> {
        let _ = memory;
        Err(AccelError::Unsupported("device memory"))
    }
    /// Show device memory `handle` to the guest at `gpa`, or hide it (`None`).
    fn move_device_memory(&self, handle: u32, gpa: Option<u64>) -> Result<(), AccelError> {
        let _ = (handle, gpa);
        Err(AccelError::Unsupported("device memory"))
    }
    /// Guest RAM at `gpa..gpa+len` changed behind the CPU's back (the balloon punched it
    /// out, and it reads as zeroes now): a CPU that caches decoded code forgets that range.
    fn ram_changed(&self, gpa: u64, len: u64) {
        let _ = (gpa, len);
    }
    /// Start logging the guest's writes to RAM (live migration), from a clean log.
    fn start_dirty_log(&self) -> Result<(), AccelError> {
        Err(AccelError::Unsupported("dirty logging"))
    }
    /// The RAM pages written since the log started or was last taken, one bit per 4 KiB
    /// page in the guest-RAM memfd's order (`pages` of them), cleared as they are taken.
    fn take_dirty_log(&self, pages: usize) -> Result<Vec<u64>, AccelError> {
        let _ = pages;
        Err(AccelError::Unsupported("dirty logging"))
    }
    fn stop_dirty_log(&self) {}
    /// VM-wide state (guest time, interrupt controllers, PIT) for a snapshot, taken while
    /// the vCPUs are parked.
    fn save_platform(&self) -> Result<Vec<u8>, AccelError> {
        Err(AccelError::Unsupported("saving the platform state"))
    }
    /// Take what [`Accelerator::save_platform`] gave, before the vCPUs' own state.
    fn restore_platform(&self, state: &[u8]) -> Result<(), AccelError> {
        let _ = state;
        Err(AccelError::Unsupported("restoring the platform state"))
    }
    /// Reset VM-wide state (irqchip, PIT) to power-on values.
    fn reset(&self) -> Result<(), AccelError>;
    /// Signal `fd` when the guest writes to `addr` (optionally only `datamatch`).
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), AccelError>;
    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), AccelError>;
    /// Raise `gsi` (an edge) whenever `fd` is signalled.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), AccelError>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), AccelError>;
}

/// Does the host CPU advertise hardware virtualization (vmx or svm)?
pub fn host_has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// Create the first accelerator of `choices` that works; `None` means auto (kvm only
/// where the CPU shows vmx or svm, emu otherwise). `qtest` is where the qtest accelerator
/// finds its test.
pub fn create_accelerator(
    choices: Option<&[AccelKind]>,
    mem: &crate::memory::MemoryManager,
    num_vcpus: u32,
    trace: bool,
    qtest: Option<&qtest::QtestEndpoint>,
) -> Result<Arc<dyn Accelerator>, AccelError> {
    let auto = [if host_has_hw_virt() {
        AccelKind::Kvm
    } else {
        AccelKind::Emu
    }];
    let choices = choices.unwrap_or(&auto);
    let mut last_err = AccelError::Unavailable("none");
    for (i, kind) in choices.iter().enumerate() {
        let result: Result<Arc<dyn Accelerator>, AccelError> = match kind {
            AccelKind::Kvm => kvm::KvmAccel::new(mem).map(|a| Arc::new(a) as Arc<dyn Accelerator>),
            AccelKind::Emu => emu::EmuAccel::new(mem, num_vcpus, trace)
                .map(|a| Arc::new(a) as Arc<dyn Accelerator>),
            AccelKind::Qtest => {
                qtest::QtestAccel::new(mem, qtest).map(|a| Arc::new(a) as Arc<dyn Accelerator>)
            }
        };
        match result {
            Ok(a) => return Ok(a),
            Err(e) => {
                if i + 1 < choices.len() {
                    tracing::warn!(
                        "accelerator {} is not usable ({e}); trying the next one",
                        kind.name()
                    );
                }
                last_err = e;
            }
        }
    }
    Err(last_err)
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::Mutex;

    use super::*;

    /// An accelerator without vCPUs that records what devices ask of it.
    #[derive(Default)]
    pub struct RecordingAccel {
        pub msis: Mutex<Vec<(u64, u32)>>,
        pub ioevents: Mutex<Vec<(IoEventAddress, Option<u32>)>>,
        /// With `routes` set, MSI routes work and irqfds on them are recorded.
        pub routes: Option<super::msi_routes::MsiRoutes>,
        pub irqfds: Mutex<Vec<u32>>,
        /// The ranges [`Accelerator::ram_changed`] was told about.
        pub ram_changes: Mutex<Vec<(u64, u64)>>,
    }

    impl RecordingAccel {
        pub fn msis(&self) -> Vec<(u64, u32)> {
            self.msis.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
    }

    struct NoIrqChip;
    impl IrqChip for NoIrqChip {
        fn set_irq_level(
            &self,
            _gsi: u32,
            _level: bool,
        ) -> Result<(), crate::devices::interrupt::InterruptError> {
            Ok(())
        }
    }

    impl Accelerator for RecordingAccel {
        fn kind(&self) -> AccelKind {
            AccelKind::Emu
        }
        fn max_vcpus(&self) -> u32 {
            0
        }
        fn create_vcpu(
            &self,
            _id: u32,
            _num_vcpus: u32,
            _io: Arc<dyn IoHandler + Send>,
        ) -> Result<Box<dyn Vcpu>, AccelError> {
            Err(AccelError::Unsupported("vCPUs in a test accelerator"))
        }
        fn irq_chip(&self) -> Arc<dyn IrqChip> {
            Arc::new(NoIrqChip)
        }
        fn signal_msi(&self, address: u64, data: u32) -> Result<(), AccelError> {
            self.msis
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((address, data));
            Ok(())
        }
        fn ram_changed(&self, gpa: u64, len: u64) {
            self.ram_changes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((gpa, len));
        }
        fn reset(&self) -> Result<(), AccelError> {
            Ok(())
        }
        fn register_ioevent(
            &self,
            _fd: &EventFd,
            addr: IoEventAddress,
            datamatch: Option<u32>,
        ) -> Result<(), AccelError> {
            self.ioevents
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((addr, datamatch));
            Ok(())
        }
        fn unregister_ioevent(
            &self,
            _fd: &EventFd,
            addr: IoEventAddress,
            datamatch: Option<u32>,
        ) -> Result<(), AccelError> {
            self.ioevents
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|e| *e != (addr, datamatch));
            Ok(())
        }
        fn register_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<(), AccelError> {
            self.irqfds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(gsi);
            Ok(())
        }
        fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<(), AccelError> {
            self.irqfds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|g| *g != gsi);
            Ok(())
        }
        fn add_msi_route(&self, address: u64, data: u32) -> Result<u32, AccelError> {
            let routes = self
                .routes
                .as_ref()
                .ok_or(AccelError::Unsupported("routes"))?;
            routes
                .add(address, data)
                .map_err(|_| AccelError::Unsupported("more routes"))
        }
        fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), AccelError> {
            let routes = self
                .routes
                .as_ref()
                .ok_or(AccelError::Unsupported("routes"))?;
            routes
                .set(gsi, address, data)
                .map_err(|_| AccelError::Unsupported("no route"))
        }
        fn remove_msi_route(&self, gsi: u32) -> Result<(), AccelError> {
            let routes = self
                .routes
                .as_ref()
                .ok_or(AccelError::Unsupported("routes"))?;
            routes
                .remove(gsi)
                .map_err(|_| AccelError::Unsupported("no route"))
        }
    }
}
