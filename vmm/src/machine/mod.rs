//! The [`Machine`]: guest RAM, the accelerator, the vCPUs, the PC devices and the boot
//! image, put together from a [`VmConfig`], and the main loop that carries out the
//! guest's requests (reset, power-off, debug exit) and the QMP monitor's commands, keeping
//! the run state and its events as QEMU 7.2 does. Its side of live migration is in
//! [`migration`].

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use qmp::{EventSender, QmpError};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use vm_memory::GuestAddress;

use crate::accel::{self, AccelError, AccelKind, Accelerator, IoHandler};
use crate::arch::acpi::{self, AcpiConfig};
use crate::arch::boot::{self, EntryState};
use crate::arch::layout;
use crate::chardev::{self, Chardev};
use crate::config::VmConfig;
use crate::control::{MachineControl, MachineRequest, ResetCause};
use crate::cpu::{CpuError, CpuManager};
use crate::device_manager::DeviceManager;
use crate::devices::acpi::{AcpiPmDevice, GedDevice};
use crate::devices::debug_exit::DebugExit;
use crate::devices::i8042::{I8042CommandPort, I8042};
use crate::devices::pci_hotplug::PciHotplug;
use crate::devices::rtc::Rtc;
use crate::devices::serial::Serial;
use crate::devices::{Bus, IrqChip, IrqLine};
use crate::loader::{BootImage, Initrd, LoaderError};
use crate::memory::{MemoryError, MemoryManager};
use crate::migration::MigrationState;
use crate::pci::{PciBus, PciConfigIo, PciConfigMmio, PciWindow, PCI_CONFIG_IO_LEN};
use crate::runstate::RunState;
use crate::snapshot::Snapshottable;

mod migration;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("{0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    Accel(#[from] AccelError),
    #[error("{0}")]
    Loader(#[from] LoaderError),
    #[error("{0}")]
    Boot(#[from] boot::BootError),
    #[error("{0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error("{0}")]
    Cpu(#[from] CpuError),
    #[error("{0}")]
    Pci(#[from] crate::pci::PciError),
    #[error("could not place {what} on the bus: {source}")]
    Bus {
        what: &'static str,
        #[source]
        source: crate::devices::bus::BusError,
    },
    #[error("-serial {spec}: {source}")]
    Chardev {
        spec: String,
        #[source]
        source: chardev::ChardevError,
    },
    #[error("{option}: {source}")]
    Device {
        option: String,
        #[source]
        source: crate::device_manager::DeviceError,
    },
    #[error("no kernel given: use -kernel (this machine has no firmware)")]
    NoKernel,
    #[error("{requested} vCPUs requested, but the {accel} accelerator supports at most {max}")]
    TooManyVcpus {
        requested: u32,
        accel: &'static str,
        max: u32,
    },
}

/// How the machine's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineExit {
    /// Power-off, or reset under -no-reboot, or a host signal: exit status 0.
    Shutdown,
    /// An incoming migration failed (QEMU's destination exits with status 1).
    MigrationFailed,
    /// The guest wrote to isa-debug-exit: exit status `(value << 1) | 1`.
    DebugExit(u32),
    /// A vCPU hit an error it could not recover from.
    InternalError,
}

impl MachineExit {
    /// The process exit status QEMU would give.
    pub fn exit_code(self) -> i32 {
        match self {
            MachineExit::Shutdown => 0,
            MachineExit::DebugExit(v) => ((v << 1) | 1) as i32 & 0xff,
            MachineExit::InternalError | MachineExit::MigrationFailed => 1,
        }
    }
}

/// The machine's buses, as the vCPUs see them.
pub struct MachineIo {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
}

impl IoHandler for MachineIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            tracing::trace!("unhandled port read {port:#x} ({} bytes)", data.len());
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if !self.pio.write(u64::from(port), data) {
            tracing::trace!("unhandled port write {port:#x} {data:02x?}");
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            tracing::debug!("unhandled MMIO read {addr:#x} ({} bytes)", data.len());
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.mmio.write(addr, data) {
            tracing::debug!("unhandled MMIO write {addr:#x} {data:02x?}");
        }
    }
}

/// What is needed to (re)load the guest's boot image.
struct BootSource {
    kernel: BootImage,
    initrd: Option<Initrd>,
    cmdline: String,
}

/// A PC machine.
pub struct Machine {
    config: VmConfig,
    memory: MemoryManager,
    accel: Arc<dyn Accelerator>,
    cpus: CpuManager,
    io: Arc<MachineIo>,
    /// None under qtest without -kernel.
    boot: Option<BootSource>,
    acpi: AcpiConfig,
    chardevs: Vec<Chardev>,
    /// The monitor's current CPU (QMP `cpu`), the default of memsave and HMP commands.
    current_cpu: u32,
    pci: Arc<Mutex<PciBus>>,
    devices: DeviceManager,
    ged: Arc<Mutex<GedDevice>>,
    /// The ACPI PCI hot-plug registers: device_add and device_del tell the guest through it.
    pci_hotplug: Arc<Mutex<PciHotplug>>,
    requests: Receiver<MachineRequest>,
    control: MachineControl,
    run_state: RunState,
    /// QMP events; emitting with no monitor attached reaches nobody.
    events: EventSender,
    /// A monitor is attached: a vCPU failure stops the VM instead of exiting.
    has_monitor: bool,
    /// From `quit`: completes once its reply has been written.
    quit_flush: Option<oneshot::Receiver<()>>,
    /// Live migration: parameters, capabilities, the last outgoing one's progress.
    migration: MigrationState,
    /// The guest ran when the outgoing migration started (it runs again if that fails).
    migration_was_running: bool,
    /// A destination runs its guest once loaded (no -S).
    incoming_autostart: bool,
    /// `-incoming defer` and no `migrate-incoming` yet.
    incoming_deferred: bool,
    /// A local migration's handoff, kept from its offer until the state arrives.
    incoming_local: Option<crate::migration::local::LocalFds>,
    /// The devices whose state moves with the guest, by section name.
    snapshot_devices: Vec<(String, Arc<Mutex<dyn Snapshottable>>)>,
}

impl Machine {
    /// Build the machine and load the guest. The vCPUs stay stopped until [`Machine::start`].
    pub fn new(config: VmConfig) -> Result<Self, MachineError> {
        // Only a qtest machine, driven by its test, starts with no guest loaded.
        let qtest = config.accel.as_deref() == Some(&[AccelKind::Qtest]);
        if config.kernel.is_none() && !qtest {
            return Err(MachineError::NoKernel);
        }
        let memory = MemoryManager::new(config.memory_size)?;
        let accel = accel::create_accelerator(
            config.accel.as_deref(),
            &memory,
            config.cpus,
            config.trace_instructions,
            config.qtest.as_ref(),
        )?;
        let max = accel.max_vcpus();
        if config.cpus > max {
            return Err(MachineError::TooManyVcpus {
                requested: config.cpus,
                accel: accel.kind().name(),
                max,
            });
        }
        // The emu CPU wants the host to unpack the kernel; KVM runs the decompressor fast.
        let decompress = config
            .decompress_kernel
            .unwrap_or(accel.kind() == AccelKind::Emu);
        let boot = match &config.kernel {
            Some(kernel_cfg) => Some(BootSource {
                kernel: BootImage::from_file(&kernel_cfg.path, decompress, config.memory_size)?,
                initrd: kernel_cfg
                    .initrd
                    .as_deref()
                    .map(Initrd::from_file)
                    .transpose()?,
                cmdline: kernel_cfg.cmdline.clone(),
            }),
            None => None,
        };

        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let irq_chip = accel.irq_chip();
        let (control, requests) = MachineControl::new();
        accel.register_platform_devices(&pio, &mmio)?;

        let mut chardevs = Vec::new();
        let mut serial_ports = Vec::new();
        // The devices whose state moves with the guest (live migration), by section name.
        let mut snapshot_devices: Vec<(String, Arc<Mutex<dyn Snapshottable>>)> = Vec::new();
        for (i, spec_str) in config.serials.iter().enumerate() {
            let spec =
                chardev::parse_chardev(spec_str).map_err(|source| MachineError::Chardev {
                    spec: spec_str.clone(),
                    source,
                })?;
            if matches!(spec, chardev::ChardevSpec::None) {
                continue;
            }
            let chardev = Chardev::open(&spec, &format!("serial{i}")).map_err(|source| {
                MachineError::Chardev {
                    spec: spec_str.clone(),
                    source,
                }
            })?;
            let port = layout::SERIAL_PORTS[i];
            let gsi = layout::SERIAL_GSIS[i];
            let serial = Serial::new(
                IrqLine::new(irq_chip.clone(), gsi),
                Box::new(chardev.writer()),
            );
            let serial = Arc::new(Mutex::new(serial));
            snapshot_devices.push((format!("serial {i}"), serial.clone()));
            chardev.set_input(Arc::new(crate::devices::serial::SerialInput::new(
                serial.clone(),
            )));
            pio.insert(serial, u64::from(port), 8)
                .map_err(|source| MachineError::Bus {
                    what: "a serial port",
                    source,
                })?;
            serial_ports.push((port, gsi));
            chardevs.push(chardev);
        }

        // Data and command ports separately: 0x61 between them belongs to the PIT.
        let i8042 = Arc::new(Mutex::new(I8042::new(
            control.clone(),
            IrqLine::new(irq_chip.clone(), layout::I8042_KBD_GSI),
            IrqLine::new(irq_chip.clone(), layout::I8042_AUX_GSI),
        )));
        snapshot_devices.push(("i8042".into(), i8042.clone()));
        pio.insert(i8042.clone(), u64::from(layout::I8042_DATA_PORT), 1)
            .map_err(|source| MachineError::Bus {
                what: "the i8042",
                source,
            })?;
        pio.insert(
            Arc::new(Mutex::new(I8042CommandPort::new(i8042.clone()))),
            u64::from(layout::I8042_CMD_PORT),
            1,
        )
        .map_err(|source| MachineError::Bus {
            what: "the i8042",
            source,
        })?;

        let rtc = Arc::new(Mutex::new(Rtc::new(IrqLine::new(
            irq_chip.clone(),
            layout::RTC_GSI,
        ))));
        snapshot_devices.push(("rtc".into(), rtc.clone()));
        pio.insert(rtc, u64::from(layout::CMOS_PORT), 2)
            .map_err(|source| MachineError::Bus {
                what: "the RTC",
                source,
            })?;

        let acpi_pm = Arc::new(Mutex::new(AcpiPmDevice::new(control.clone())));
        snapshot_devices.push(("acpi-pm".into(), acpi_pm.clone()));
        pio.insert(
            acpi_pm,
            u64::from(layout::ACPI_PM_PORT),
            u64::from(layout::ACPI_PM_PORT_LEN),
        )
        .map_err(|source| MachineError::Bus {
            what: "the ACPI PM registers",
            source,
        })?;
        let ged = Arc::new(Mutex::new(GedDevice::new(IrqLine::new(
            irq_chip.clone(),
            layout::GED_GSI,
        ))));
        mmio.insert(ged.clone(), layout::GED_START.0, layout::GED_SIZE)
            .map_err(|source| MachineError::Bus {
                what: "the ACPI GED",
                source,
            })?;
        snapshot_devices.push(("ged".into(), ged.clone()));
        let pci_hotplug = Arc::new(Mutex::new(PciHotplug::new(ged.clone(), control.clone())));
        snapshot_devices.push(("pci-hotplug".into(), pci_hotplug.clone()));
        pio.insert(
            pci_hotplug.clone(),
            u64::from(layout::PCI_HOTPLUG_PORT),
            u64::from(layout::PCI_HOTPLUG_PORT_LEN),
        )
        .map_err(|source| MachineError::Bus {
            what: "the ACPI PCI hot-plug registers",
            source,
        })?;

        if let Some((iobase, iosize)) = config.debug_exit {
            pio.insert(
                Arc::new(Mutex::new(DebugExit::new(control.clone()))),
                u64::from(iobase),
                u64::from(iosize),
            )
            .map_err(|source| MachineError::Bus {
                what: "isa-debug-exit",
                source,
            })?;
        }

        let pci_mmio64 = PciWindow {
            start: memory.pci_mmio64_start(),
            size: layout::PCI_MMIO64_SIZE,
        };
        let pci = Arc::new(Mutex::new(PciBus::new(
            mmio.clone(),
            pio.clone(),
            pci_mmio64,
            irq_chip.clone() as Arc<dyn IrqChip>,
        )?));
        let config_io = Arc::new(Mutex::new(PciConfigIo::new(pci.clone())));
        snapshot_devices.push(("pci-config-io".into(), config_io.clone()));
        let bridge = pci.lock().unwrap_or_else(|e| e.into_inner()).host_bridge();
        if let Some(bridge) = bridge {
            snapshot_devices.push(("pci-host-bridge".into(), bridge));
        }
        pio.insert(
            config_io,
            u64::from(layout::PCI_CONFIG_ADDRESS_PORT),
            PCI_CONFIG_IO_LEN,
        )
        .map_err(|source| MachineError::Bus {
            what: "the PCI config ports",
            source,
        })?;
        mmio.insert(
            Arc::new(Mutex::new(PciConfigMmio::new(pci.clone()))),
            layout::PCI_MMCONFIG_START.0,
            layout::PCI_MMCONFIG_SIZE,
        )
        .map_err(|source| MachineError::Bus {
            what: "the PCI ECAM",
            source,
        })?;

        let mut devices = DeviceManager::new(
            accel.clone(),
            memory.guest_memory().clone(),
            pci.clone(),
            control.clone(),
        );
        devices.set_chardevs(config.chardevs.clone());
        // A migration's destination takes its disks' locks only at the switchover.
        devices.set_images_inactive(config.incoming.is_some());
        devices.set_keyboard(i8042);
        devices.set_vnc(config.vnc.clone());
        for &(fd, set) in &config.fd_sets {
            crate::drive::add_fd(fd, set).map_err(|reason| MachineError::Device {
                option: format!("-add-fd fd={fd},set={set}"),
                source: crate::device_manager::DeviceError::Resize(reason),
            })?;
        }
        for (option, drive) in &config.drives {
            devices
                .add_drive(drive.clone())
                .map_err(|source| MachineError::Device {
                    option: option.clone(),
                    source,
                })?;
        }
        for (option, netdev) in &config.netdevs {
            devices
                .add_netdev(netdev, &mut crate::netdev::InheritedFds)
                .map_err(|source| MachineError::Device {
                    option: option.clone(),
                    source,
                })?;
        }
        for (option, device) in &config.devices {
            devices
                .add_device(device)
                .map_err(|source| MachineError::Device {
                    option: option.clone(),
                    source,
                })?;
        }
        devices
            .start_display()
            .map_err(|source| MachineError::Device {
                option: "-vnc".into(),
                source,
            })?;

        let acpi = AcpiConfig {
            num_cpus: config.cpus,
            serial_ports,
            pci_mmio64: (pci_mmio64.start, pci_mmio64.size),
        };

        let io = Arc::new(MachineIo { pio, mmio });
        let mut vcpus = Vec::new();
        for id in 0..config.cpus {
            vcpus.push(accel.create_vcpu(id, config.cpus, io.clone())?);
        }
        let cpus = CpuManager::start(vcpus, io.clone(), control.clone())?;

        let machine = Machine {
            config,
            memory,
            accel,
            cpus,
            io,
            boot,
            acpi,
            chardevs,
            current_cpu: 0,
            pci,
            devices,
            ged,
            pci_hotplug,
            requests,
            control,
            run_state: RunState::Prelaunch,
            events: EventSender::default(),
            has_monitor: false,
            quit_flush: None,
            migration: MigrationState::default(),
            migration_was_running: false,
            incoming_autostart: true,
            incoming_deferred: false,
            incoming_local: None,
            snapshot_devices,
        };
        if let Some(entry) = machine.load_guest()? {
            machine.cpus.reset(&entry)?;
        }
        // Guest time stands still until the VM first runs.
        machine.accel.pause();
        Ok(machine)
    }

    /// Copy the kernel, initrd, command line, ACPI tables and boot structures into guest
    /// RAM, and return the boot vCPU's entry state (None: there is no guest to load).
    fn load_guest(&self) -> Result<Option<EntryState>, MachineError> {
        let Some(boot_source) = &self.boot else {
            return Ok(None);
        };
        let mem = self.memory.guest_memory();
        let low_end = self.memory.low_ram_end();
        let kernel = &boot_source.kernel;
        kernel.load(mem, low_end)?;
        let cmdline_len = boot::write_cmdline(mem, &boot_source.cmdline, kernel.cmdline_limit())?;
        let initrd = match &boot_source.initrd {
            Some(rd) => Some(rd.load(mem, kernel.end, low_end, kernel.initrd_limit())?),
            None => None,
        };
        let rsdp = acpi::create_acpi_tables(mem, &self.acpi)?;
        let e820 = boot::e820_map(self.memory.ranges());
        let params = boot::build_boot_params(&boot::BootParamsConfig {
            setup_header: kernel.setup_header,
            cmdline_addr: layout::CMDLINE_START,
            cmdline_len,
            initrd,
            e820: &e820,
            rsdp_addr: Some(rsdp),
        })?;
        boot::write_boot_params(mem, &params)?;
        Ok(Some(boot::setup_long_mode(mem, kernel.entry)?))
    }

    pub fn accel_kind(&self) -> AccelKind {
        self.accel.kind()
    }

    pub fn cpus(&self) -> &CpuManager {
        &self.cpus
    }

    pub fn control(&self) -> MachineControl {
        self.control.clone()
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The machine's character devices, for query-chardev.
    pub fn chardevs(&self) -> &[Chardev] {
        &self.chardevs
    }

    pub fn current_cpu(&self) -> u32 {
        self.current_cpu
    }

    /// Make vCPU `index` the monitor's current CPU; false if there is no such vCPU.
    pub fn set_current_cpu(&mut self, index: u32) -> bool {
        if (index as usize) < self.cpus.num_vcpus() {
            self.current_cpu = index;
            return true;
        }
        false
    }

    /// QMP inject-nmi: an NMI to every vCPU, as QEMU does on x86.
    pub fn inject_nmi(&self) {
        if !self.accel.inject_nmi_all() {
            self.cpus.inject_nmi();
        }
    }

    pub fn run_state(&self) -> RunState {
        self.run_state
    }

    /// Attach the QMP monitor's event sender; from now on a vCPU failure leaves the VM in
    /// the internal-error state for the monitor to inspect instead of exiting.
    pub fn attach_monitor(&mut self, events: EventSender) {
        self.devices.set_events(events.clone());
        self.events = events;
        self.has_monitor = true;
    }

    /// Send a QMP event to every negotiated monitor client.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let data = match data {
            Some(Value::Object(map)) => Some(map),
            _ => None,
        };
        self.events.emit(name, data);
    }

    /// The SHUTDOWN event, which precedes every exit and every -no-shutdown stop.
    pub fn emit_shutdown(&self, guest: bool, reason: &str) {
        self.emit(
            "SHUTDOWN",
            Some(json!({ "guest": guest, "reason": reason })),
        );
    }

    fn emit_reset(&self, guest: bool, reason: &str) {
        self.emit("RESET", Some(json!({ "guest": guest, "reason": reason })));
    }

    pub fn set_quit_flush(&mut self, flushed: Option<oneshot::Receiver<()>>) {
        self.quit_flush = flushed;
    }

    /// The `quit` reply's "written" signal, for the process to wait on before it exits.
    pub fn take_quit_flush(&mut self) -> Option<oneshot::Receiver<()>> {
        self.quit_flush.take()
    }

    /// Let the vCPUs run for the first time (without -S).
    pub fn start(&mut self) {
        self.run_state = RunState::Running;
        self.accel.resume();
        self.cpus.resume();
    }

    /// QMP `stop`: a running VM pauses (vCPUs and guest clock) and STOP is sent; a VM that
    /// is not running is left as it is, silently.
    pub fn stop(&mut self) {
        if self.run_state == RunState::InMigrate {
            // QEMU: the guest stays stopped once its migration arrives.
            self.incoming_autostart = false;
            return;
        }
        self.stop_into(RunState::Paused);
    }

    /// Live migration's parameters, capabilities and progress.
    pub fn migration(&self) -> &MigrationState {
        &self.migration
    }

    pub fn migration_mut(&mut self) -> &mut MigrationState {
        &mut self.migration
    }

    /// Stop into `state` (QEMU's vm_stop): only a running VM changes state and says STOP.
    fn stop_into(&mut self, state: RunState) {
        if !self.run_state.is_running() {
            return;
        }
        self.cpus.pause();
        self.accel.pause();
        self.run_state = state;
        self.emit("STOP", None);
    }

    /// QMP `cont`: prelaunch and paused resume (with RESUME); a running VM stays as it is;
    /// shutdown and internal-error need a reset first.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        if self.run_state.needs_reset() {
            return Err(QmpError::generic(
                "Resetting the Virtual Machine is required",
            ));
        }
        if self.run_state.is_running() {
            return Ok(());
        }
        if self.run_state == RunState::InMigrate {
            // QEMU: the guest runs once its migration has arrived.
            self.incoming_autostart = true;
            return Ok(());
        }
        if let Some((drive, file)) = self.devices.missing_key() {
            return Err(QmpError::generic(format!(
                "'{drive}' ({file}) is encrypted"
            )));
        }
        // Requests that an error policy held are carried out again (QEMU resets the I/O
        // status and the devices retry).
        self.devices.resume_held_requests();
        self.emit("RESUME", None);
        self.run_state = RunState::Running;
        self.accel.resume();
        self.cpus.resume();
        Ok(())
    }

    /// QMP `system_reset`. Under -no-reboot it powers off instead, as QEMU does; the
    /// returned exit says so.
    pub fn host_reset(&mut self) -> Result<Option<MachineExit>, MachineError> {
        if self.config.no_reboot {
            return Ok(self.power_off(false, "host-qmp-system-reset"));
        }
        self.reset_with_event(false, "host-qmp-system-reset")?;
        Ok(None)
    }

    /// Reset, send RESET, and let the vCPUs go on only if the VM was running; a stopped VM
    /// waits in prelaunch.
    fn reset_with_event(&mut self, guest: bool, reason: &str) -> Result<(), MachineError> {
        let next = self.run_state.after_reset();
        self.reset()?;
        self.emit_reset(guest, reason);
        self.run_state = next;
        if next.is_running() {
            self.cpus.resume();
        }
        Ok(())
    }

    /// The VM powers off: SHUTDOWN, then exit, or under -no-shutdown stop in the shutdown
    /// state.
    fn power_off(&mut self, guest: bool, reason: &str) -> Option<MachineExit> {
        self.emit_shutdown(guest, reason);
        if !self.config.no_shutdown {
            return Some(MachineExit::Shutdown);
        }
        // The vCPUs may be running even when the state says otherwise (a stale request).
        self.stop_into(RunState::Shutdown);
        self.cpus.pause();
        self.run_state = RunState::Shutdown;
        tracing::info!("guest powered off under -no-shutdown: vCPUs stopped");
        None
    }

    /// A machine reset: every vCPU and the irqchip to power-on state, and the boot image
    /// loaded again. RAM outside the image keeps its contents, as on a real PC.
    pub fn reset(&mut self) -> Result<(), MachineError> {
        self.cpus.pause();
        self.accel.reset()?;
        self.devices.reset();
        if let Some(entry) = self.load_guest()? {
            self.cpus.reset(&entry)?;
        }
        Ok(())
    }

    /// Press the ACPI power button.
    pub fn power_button(&self) {
        let mut ged = self.ged.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = ged.notify(crate::devices::acpi::GedEvent::PowerButton) {
            tracing::warn!("power button: {e}");
        }
    }

    /// Carry out guest, host and monitor requests until the machine should exit.
    pub fn run(&mut self) -> Result<MachineExit, MachineError> {
        loop {
            let Ok(req) = self.requests.recv() else {
                return Ok(MachineExit::Shutdown);
            };
            if let Some(exit) = self.handle_request(req)? {
                return Ok(exit);
            }
        }
    }

    fn handle_request(&mut self, req: MachineRequest) -> Result<Option<MachineExit>, MachineError> {
        match req {
            MachineRequest::Reset(cause) => {
                if self.config.no_reboot {
                    tracing::info!("guest reset ({cause:?}) under -no-reboot: powering off");
                    return Ok(self.power_off(true, "guest-reset"));
                }
                tracing::info!("guest reset ({cause:?})");
                self.reset_with_event(true, "guest-reset")?;
            }
            MachineRequest::Shutdown => return Ok(self.power_off(true, "guest-shutdown")),
            MachineRequest::DebugExit(v) => return Ok(Some(MachineExit::DebugExit(v))),
            MachineRequest::InternalError => {
                if !self.has_monitor {
                    self.cpus.pause();
                    return Ok(Some(MachineExit::InternalError));
                }
                // Keep the VM for the monitor to inspect; system_reset recovers it.
                self.stop_into(RunState::InternalError);
                self.cpus.pause();
                self.run_state = RunState::InternalError;
            }
            MachineRequest::BlockIoErrorStop => self.stop_into(RunState::IoError),
            MachineRequest::Quit => {
                self.emit_shutdown(false, "host-signal");
                return Ok(Some(MachineExit::Shutdown));
            }
            MachineRequest::PciEject { slot } => self.pci_eject(slot),
            MachineRequest::Run(job) => return Ok(job.run(self)),
        }
        Ok(None)
    }

    /// The guest ejected the device in PCI `slot` (through `_EJ0`): the function leaves the
    /// bus, so the slot reads as empty and is free for another device. This is only the bus's
    /// half of an unplug: completing a device_del (the device's process, its drive and id,
    /// the DEVICE_DELETED event) is the device manager's part.
    fn pci_eject(&mut self, slot: u8) {
        // The device manager unplugs the function and stops its process.
        match self.devices.remove_slot(slot) {
            Some((id, path)) => {
                tracing::info!(slot, "PCI device ejected by the guest");
                let mut data = serde_json::Map::new();
                if let Some(id) = id {
                    data.insert("device".into(), serde_json::Value::String(id));
                }
                data.insert("path".into(), serde_json::Value::String(path));
                self.emit("DEVICE_DELETED", Some(serde_json::Value::Object(data)));
            }
            None => tracing::debug!(slot, "guest eject of an empty slot"),
        }
    }

    /// Stop the vCPUs and release the devices.
    pub fn shutdown(&mut self) {
        self.cpus.shutdown();
        self.devices.shutdown();
        self.chardevs.clear();
    }

    /// Unused until the QMP issue wires queries in; keeps ResetCause in the public API.
    pub fn io(&self) -> &Arc<MachineIo> {
        &self.io
    }

    pub fn devices_mut(&mut self) -> &mut DeviceManager {
        &mut self.devices
    }

    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    pub fn pci(&self) -> &Arc<Mutex<PciBus>> {
        &self.pci
    }

    /// The ACPI PCI hot-plug registers, through which a device added to or leaving bus 0 is
    /// announced to the guest.
    pub fn pci_hotplug(&self) -> &Arc<Mutex<PciHotplug>> {
        &self.pci_hotplug
    }

    pub fn memory(&self) -> &MemoryManager {
        &self.memory
    }

    /// The RSDP address the guest was given.
    pub fn rsdp_address(&self) -> GuestAddress {
        layout::RSDP_POINTER
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[allow(dead_code)]
fn _reset_cause_is_public(_: ResetCause) {}
