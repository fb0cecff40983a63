//! The emu accelerator: our software x86-64 CPU (the `emu` crate) behind the same
//! [`Accelerator`] and [`Vcpu`] traits as KVM. Here the interrupt controllers and timers
//! that KVM keeps in the kernel are the emu crate's models: the IOAPIC, PIC and PIT sit on
//! the machine's buses like any device, and each vCPU owns its local APIC.
//!
//! ioeventfd and irqfd keep their meaning: a guest write to a registered address signals
//! the eventfd from the vCPU thread, and a thread waits on the irqfds and raises their GSIs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use emu::clock::VirtualClock;
use emu::cpu::{Cpu, RunExit};
use emu::ioapic::Ioapic;
use emu::lapic::LocalApic;
use emu::pic::Pic;
use emu::pit::Pit;
use emu::ram::{GuestRam, RamRegion};
use emu::router::{ApicInbox, ApicRouter};
use vmm_sys_util::eventfd::EventFd;

use super::eventfds::{IoEventTable, IrqFdRouter};
use super::msi_routes::{MsiRoutes, FIRST_MSI_GSI, MAX_MSI_ROUTES};
use super::{
    AccelError, AccelKind, Accelerator, IoEventAddress, IoHandler, Vcpu, VcpuExit, VcpuKicker,
};
use crate::arch::boot::{EntryState, Segment as BootSegment};
use crate::arch::layout;
use crate::devices::interrupt::{InterruptError, IrqChip};
use crate::devices::{Bus, BusDevice};
use crate::memory::{DeviceMemory, MemoryManager};
use emu::portable::PortablePlatform;
use emu::router::ApicMessage;

use super::{PlatformSection, Saved, VcpuSection};

/// Most vCPUs the emu accelerator runs.
pub const EMU_MAX_VCPUS: u32 = 8;

/// What a snapshot keeps of [`Platform`]: guest time and the interrupt controllers.
#[derive(serde::Serialize, serde::Deserialize)]
struct PlatformSnapshot {
    guest_ns: u64,
    ioapic: emu::ioapic::IoapicState,
    pic: Pic,
    pit: emu::pit::PitState,
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, AccelError> {
    postcard::to_stdvec(value).map_err(|e| AccelError::Snapshot(e.to_string()))
}

fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, AccelError> {
    postcard::from_bytes(bytes).map_err(|e| AccelError::Snapshot(e.to_string()))
}

/// The platform models shared by all vCPUs and devices.
struct Platform {
    clock: Arc<VirtualClock>,
    router: Arc<ApicRouter>,
    ioapic: Mutex<Ioapic>,
    pic: Mutex<Pic>,
    pit: Mutex<Pit>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Platform {
    fn set_irq(&self, gsi: u32, level: bool) {
        lock(&self.ioapic).set_irq(gsi, level);
        if gsi < 16 {
            lock(&self.pic).set_irq(gsi, level);
        }
    }
}

/// Device interrupt lines drive the IOAPIC (and the PIC for ISA lines).
struct EmuIrqChip(Arc<Platform>);

impl IrqChip for EmuIrqChip {
    fn set_irq_level(&self, gsi: u32, level: bool) -> Result<(), InterruptError> {
        if gsi >= layout::IOAPIC_NUM_PINS {
            return Err(InterruptError::InvalidGsi(gsi));
        }
        self.0.set_irq(gsi, level);
        Ok(())
    }
}

pub struct EmuAccel {
    ram: Arc<GuestRam>,
    platform: Arc<Platform>,
    ioevents: Arc<IoEventTable>,
    irqfds: IrqFdRouter,
    msi_routes: Arc<MsiRoutes>,
    stop_threads: Arc<AtomicBool>,
    trace: bool,
}

impl EmuAccel {
    /// `trace` logs every executed instruction (`-d in_asm`).
    pub fn new(mem: &MemoryManager, num_cpus: u32, trace: bool) -> Result<Self, AccelError> {
        let regions = mem
            .host_regions()
            .into_iter()
            .map(|(gpa, len, host)| RamRegion {
                gpa: gpa.0,
                len,
                host: host as *mut u8,
            })
            .collect();
        // SAFETY: the regions are live mappings owned by the MemoryManager, which the
        // machine keeps alive for as long as the accelerator and its vCPUs exist.
        let ram = Arc::new(unsafe { GuestRam::new(regions) });
        let clock = Arc::new(VirtualClock::new());
        let router = ApicRouter::new(num_cpus.max(1) as usize);
        let platform = Arc::new(Platform {
            ioapic: Mutex::new(Ioapic::new(router.clone())),
            pic: Mutex::new(Pic::new()),
            pit: Mutex::new(Pit::new(clock.clone())),
            clock,
            router,
        });
        let weak = Arc::downgrade(&platform);
        platform.router.set_eoi_listener(Box::new(move |vector| {
            if let Some(p) = weak.upgrade() {
                lock(&p.ioapic).end_of_interrupt(vector);
            }
        }));
        let weak = Arc::downgrade(&platform);
        let msi_routes = Arc::new(MsiRoutes::default());
        let routes = msi_routes.clone();
        let irqfds = IrqFdRouter::new(
            "emu-irqfd",
            FIRST_MSI_GSI + MAX_MSI_ROUTES,
            Arc::new(move |gsi| match weak.upgrade() {
                Some(p) if gsi < FIRST_MSI_GSI => {
                    p.set_irq(gsi, true);
                    p.set_irq(gsi, false);
                    true
                }
                Some(p) => {
                    // An MSI route: delivered straight to the local APICs.
                    if let Some(msg) = routes
                        .get(gsi)
                        .and_then(|(address, data)| ApicMessage::from_msi(address, data))
                    {
                        p.router.deliver(msg);
                    }
                    true
                }
                None => false,
            }),
        )
        .map_err(|e| AccelError::Emu(e.to_string()))?;
        let accel = EmuAccel {
            ram,
            platform,
            ioevents: Arc::new(IoEventTable::new()),
            irqfds,
            msi_routes,
            stop_threads: Arc::new(AtomicBool::new(false)),
            trace,
        };
        accel.start_timer_thread()?;
        Ok(accel)
    }

    /// The PIT's IRQ0 needs a clock of its own: a thread sleeps until its next deadline.
    fn start_timer_thread(&self) -> Result<(), AccelError> {
        let platform = Arc::downgrade(&self.platform);
        let stop = self.stop_threads.clone();
        std::thread::Builder::new()
            .name("emu-pit".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(p) = platform.upgrade() else { return };
                    let (edges, next) = {
                        let mut pit = lock(&p.pit);
                        (pit.poll(), pit.next_deadline())
                    };
                    // Several edges due after a long gap coalesce into one, as a late
                    // interrupt would on hardware.
                    if edges > 0 {
                        // ISA IRQ0 is GSI 2 on the IOAPIC (the MADT's override).
                        lock(&p.ioapic).set_irq(2, true);
                        lock(&p.ioapic).set_irq(2, false);
                        lock(&p.pic).set_irq(0, true);
                        lock(&p.pic).set_irq(0, false);
                    }
                    drop(p);
                    let now = Instant::now();
                    let sleep = next
                        .map(|d| d.saturating_duration_since(now))
                        .unwrap_or(std::time::Duration::from_millis(10))
                        .min(std::time::Duration::from_millis(10));
                    std::thread::sleep(sleep);
                }
            })
            .map_err(|e| AccelError::Emu(format!("start the PIT thread: {e}")))?;
        Ok(())
    }

    /// The guest clock, for pausing with the VM.
    pub fn clock(&self) -> &Arc<VirtualClock> {
        &self.platform.clock
    }
}

impl Drop for EmuAccel {
    fn drop(&mut self) {
        self.stop_threads.store(true, Ordering::Relaxed);
    }
}

/// The vmm's buses as the emu CPU's I/O, with registered ioeventfds checked first.
struct EmuIo {
    io: Arc<dyn IoHandler + Send>,
    ioevents: Arc<IoEventTable>,
}

impl emu::IoBus for EmuIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.io.pio_read(port, data)
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if !self.ioevents.signal(IoEventAddress::Pio(port), data) {
            self.io.pio_write(port, data)
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.io.mmio_read(addr, data)
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.ioevents.signal(IoEventAddress::Mmio(addr), data) {
            self.io.mmio_write(addr, data)
        }
    }
}

/// Bus adapters for the platform models.
struct IoapicDevice(Arc<Platform>);
impl BusDevice for IoapicDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0.ioapic).read_mmio(offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0.ioapic).write_mmio(offset, data)
    }
}

/// A platform model reached through byte-wide I/O ports.
trait PortModel: Send {
    fn read_port(&mut self, port: u16) -> u8;
    fn write_port(&mut self, port: u16, value: u8);
}

impl PortModel for Pic {
    fn read_port(&mut self, port: u16) -> u8 {
        Pic::read_port(self, port)
    }
    fn write_port(&mut self, port: u16, value: u8) {
        Pic::write_port(self, port, value)
    }
}

impl PortModel for Pit {
    fn read_port(&mut self, port: u16) -> u8 {
        Pit::read_port(self, port)
    }
    fn write_port(&mut self, port: u16, value: u8) {
        Pit::write_port(self, port, value)
    }
}

/// Ports `base..` of the PIC (0x20, 0xa0, ELCR 0x4d0) or the PIT (0x40, gate 0x61),
/// split into byte accesses.
struct PortDevice {
    platform: Arc<Platform>,
    base: u16,
    with_model: WithModel,
}

/// Runs a closure on one platform model under its lock.
type WithModel = fn(&Platform, &mut dyn FnMut(&mut dyn PortModel));

impl BusDevice for PortDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let port = self.base + offset as u16;
        (self.with_model)(&self.platform, &mut |model| {
            for (i, b) in data.iter_mut().enumerate() {
                *b = model.read_port(port + i as u16);
            }
        });
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let port = self.base + offset as u16;
        (self.with_model)(&self.platform, &mut |model| {
            for (i, b) in data.iter().enumerate() {
                model.write_port(port + i as u16, *b);
            }
        });
    }
}

fn with_pic(p: &Platform, f: &mut dyn FnMut(&mut dyn PortModel)) {
    f(&mut *lock(&p.pic))
}

fn with_pit(p: &Platform, f: &mut dyn FnMut(&mut dyn PortModel)) {
    f(&mut *lock(&p.pit))
}

impl Accelerator for EmuAccel {
    fn kind(&self) -> AccelKind {
        AccelKind::Emu
    }

    fn max_vcpus(&self) -> u32 {
        EMU_MAX_VCPUS
    }

    fn inject_nmi_all(&self) -> bool {
        self.platform.router.deliver(emu::router::ApicMessage {
            dest: emu::router::Destination::AllIncludingSelf,
            mode: emu::router::DeliveryMode::Nmi,
            vector: 0,
            level_triggered: false,
        });
        true
    }

    fn create_vcpu(
        &self,
        id: u32,
        num_vcpus: u32,
        io: Arc<dyn IoHandler + Send>,
    ) -> Result<Box<dyn Vcpu>, AccelError> {
        let inbox = self.platform.router.inbox(id);
        let lapic = LocalApic::new(
            id,
            id == 0,
            inbox.clone(),
            self.platform.router.clone(),
            self.platform.clock.clone(),
        );
        let bus: Arc<dyn emu::IoBus> = Arc::new(EmuIo {
            io,
            ioevents: self.ioevents.clone(),
        });
        let mut cpu = Cpu::new(
            id,
            self.ram.clone(),
            bus,
            lapic,
            self.platform.clock.clone(),
        );
        cpu.set_trace(self.trace);
        // HLT sleeps on the inbox, where kicks and interrupts arrive.
        cpu.set_inbox(inbox.clone());
        cpu.set_cpu_count(num_vcpus);
        let kicker = Arc::new(EmuKicker {
            stop: Arc::new(AtomicBool::new(false)),
            inbox,
        });
        Ok(Box::new(EmuVcpu {
            id,
            cpu: Box::new(cpu),
            kicker,
        }))
    }

    fn irq_chip(&self) -> Arc<dyn IrqChip> {
        Arc::new(EmuIrqChip(self.platform.clone()))
    }

    fn add_msi_route(&self, address: u64, data: u32) -> Result<u32, AccelError> {
        self.msi_routes
            .add(address, data)
            .map_err(|e| AccelError::Emu(e.to_string()))
    }

    fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), AccelError> {
        self.msi_routes
            .set(gsi, address, data)
            .map_err(|e| AccelError::Emu(e.to_string()))
    }

    fn remove_msi_route(&self, gsi: u32) -> Result<(), AccelError> {
        self.msi_routes
            .remove(gsi)
            .map_err(|e| AccelError::Emu(e.to_string()))
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<(), AccelError> {
        let msg = emu::router::ApicMessage::from_msi(address, data).ok_or(
            AccelError::Unsupported("an MSI whose address or delivery mode is not an interrupt"),
        )?;
        self.platform.router.deliver(msg);
        Ok(())
    }

    fn register_platform_devices(&self, pio: &Bus, mmio: &Bus) -> Result<(), AccelError> {
        let err = |what: &'static str| {
            move |e: crate::devices::bus::BusError| AccelError::Emu(format!("{what}: {e}"))
        };
        let p = &self.platform;
        mmio.insert(
            Arc::new(Mutex::new(IoapicDevice(p.clone()))),
            layout::IOAPIC_START.0,
            layout::IOAPIC_SIZE,
        )
        .map_err(err("place the IOAPIC"))?;
        let ports: [(u16, u64, WithModel); 5] = [
            (0x20, 2, with_pic),
            (0xa0, 2, with_pic),
            (0x4d0, 2, with_pic),
            (0x40, 4, with_pit),
            (0x61, 1, with_pit),
        ];
        for (base, len, with_model) in ports {
            let dev = PortDevice {
                platform: p.clone(),
                base,
                with_model,
            };
            pio.insert(Arc::new(Mutex::new(dev)), u64::from(base), len)
                .map_err(err("place the PIC and PIT ports"))?;
        }
        Ok(())
    }

    fn add_device_memory(&self, memory: Arc<DeviceMemory>) -> Result<u32, AccelError> {
        let (host, len) = (memory.as_ptr(), memory.len() as u64);
        // SAFETY: the mapping lives as long as `memory`, which the GuestRam keeps.
        let slot = unsafe { self.ram.add_device_region(host, len, memory) }
            .map_err(|e| AccelError::DeviceMemory(format!("{e:?}")))?;
        Ok(slot as u32)
    }

    fn move_device_memory(&self, handle: u32, gpa: Option<u64>) -> Result<(), AccelError> {
        self.ram.move_device_region(handle as usize, gpa);
        Ok(())
    }

    fn ram_changed(&self, gpa: u64, len: u64) {
        self.ram.note_external_write(gpa, len);
    }

    fn start_dirty_log(&self) -> Result<(), AccelError> {
        // A test-only switch: the CPU's writes go unlogged, so that a migration test can
        // show that its checker sees lost pages.
        let unlogged = std::env::var("VMM_TEST_NO_DIRTY_LOG").is_ok_and(|v| v == "cpu");
        self.ram.set_dirty_logging(!unlogged);
        Ok(())
    }

    fn take_dirty_log(&self, pages: usize) -> Result<Vec<u64>, AccelError> {
        Ok(self.ram.take_dirty(pages))
    }

    fn stop_dirty_log(&self) {
        self.ram.set_dirty_logging(false);
    }

    fn save_platform(&self) -> Result<Vec<u8>, AccelError> {
        let p = &self.platform;
        let guest_ns = p.clock.now_ns();
        let (ioapic, pic, pit) = (lock(&p.ioapic), lock(&p.pic), lock(&p.pit));
        PlatformSection {
            accel: AccelKind::Emu.name().into(),
            native: encode(&PlatformSnapshot {
                guest_ns,
                ioapic: ioapic.save(),
                pic: pic.clone(),
                pit: pit.save(),
            })?,
            portable: Some(PortablePlatform {
                guest_ns,
                pic: pic.export(),
                ioapic: ioapic.export(),
                pit: pit.export(),
            }),
        }
        .encode()
    }

    fn restore_platform(&self, state: &[u8]) -> Result<(), AccelError> {
        let section = PlatformSection::decode(state)?;
        let p = &self.platform;
        match section.for_accel(AccelKind::Emu)? {
            Saved::Native(native) => {
                let s: PlatformSnapshot = decode(native)?;
                p.clock.set_now_ns(s.guest_ns);
                lock(&p.ioapic).restore(&s.ioapic);
                *lock(&p.pic) = s.pic;
                lock(&p.pit).restore(&s.pit);
            }
            Saved::Portable(s) => {
                p.clock.set_now_ns(s.guest_ns);
                lock(&p.ioapic).import(&s.ioapic);
                lock(&p.pic).import(&s.pic);
                lock(&p.pit).import(&s.pit);
            }
        }
        Ok(())
    }

    fn reset(&self) -> Result<(), AccelError> {
        let p = &self.platform;
        *lock(&p.ioapic) = Ioapic::new(p.router.clone());
        *lock(&p.pic) = Pic::new();
        *lock(&p.pit) = Pit::new(p.clock.clone());
        Ok(())
    }

    fn pause(&self) {
        self.platform.clock.pause();
    }

    fn resume(&self) {
        self.platform.clock.resume();
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), AccelError> {
        self.ioevents
            .register(fd, addr, datamatch)
            .map_err(|e| AccelError::Emu(e.to_string()))
    }

    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), AccelError> {
        self.ioevents
            .unregister(fd, addr, datamatch)
            .map_err(|e| AccelError::Emu(e.to_string()))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), AccelError> {
        self.irqfds
            .register(fd, gsi)
            .map_err(|e| AccelError::Emu(e.to_string()))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), AccelError> {
        self.irqfds
            .unregister(fd, gsi)
            .map_err(|e| AccelError::Emu(e.to_string()))
    }
}

struct EmuKicker {
    stop: Arc<AtomicBool>,
    inbox: Arc<ApicInbox>,
}

impl VcpuKicker for EmuKicker {
    fn kick(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.inbox.kick();
    }
    fn retire(&self) {}
}

pub struct EmuVcpu {
    id: u32,
    cpu: Box<Cpu>,
    kicker: Arc<EmuKicker>,
}

fn emu_segment(s: &BootSegment) -> emu::state::Segment {
    emu::state::Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        type_: s.type_,
        s: s.s,
        dpl: s.dpl,
        present: s.present,
        l: s.l,
        db: s.db,
        g: s.g,
        avl: s.avl,
    }
}

impl Vcpu for EmuVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn save_state(&mut self) -> Result<Vec<u8>, AccelError> {
        VcpuSection {
            accel: AccelKind::Emu.name().into(),
            native: encode(&self.cpu.save())?,
            portable: Some(self.cpu.export()),
        }
        .encode()
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), AccelError> {
        let section = VcpuSection::decode(state)?;
        match section.for_accel(AccelKind::Emu)? {
            Saved::Native(native) => {
                let snapshot: emu::cpu::CpuSnapshot = decode(native)?;
                self.cpu.restore(&snapshot);
            }
            Saved::Portable(p) => self.cpu.import(p).map_err(AccelError::Snapshot)?,
        }
        Ok(())
    }

    fn bind_to_current_thread(&mut self) {}

    fn reset(&mut self, entry: Option<&EntryState>) -> Result<(), AccelError> {
        self.cpu.reset();
        let Some(e) = entry else {
            self.cpu.wait_for_sipi();
            return Ok(());
        };
        let st = self.cpu.state_mut();
        st.rip = e.rip;
        st.gpr[4] = e.rsp;
        st.gpr[5] = e.rsp;
        st.gpr[6] = e.rsi;
        st.rflags = e.rflags;
        use emu::state::{CS, DS, ES, FS, GS, SS};
        st.seg[CS] = emu_segment(&e.cs);
        st.seg[DS] = emu_segment(&e.ds);
        st.seg[ES] = emu_segment(&e.es);
        st.seg[FS] = emu_segment(&e.fs);
        st.seg[GS] = emu_segment(&e.gs);
        st.seg[SS] = emu_segment(&e.ss);
        st.tr = emu_segment(&e.tr);
        st.ldtr = emu_segment(&e.ldt);
        st.gdtr = emu::state::DescriptorTable {
            base: e.gdt_base,
            limit: e.gdt_limit,
        };
        st.idtr = emu::state::DescriptorTable {
            base: e.idt_base,
            limit: e.idt_limit,
        };
        st.cr0 = e.cr0;
        st.cr3 = e.cr3;
        st.cr4 = e.cr4;
        st.efer = e.efer;
        st.msr.misc_enable = 1;
        st.msr.mtrr_def_type = (1 << 11) | 6;
        Ok(())
    }

    fn run(&mut self, _io: &dyn IoHandler) -> Result<VcpuExit, AccelError> {
        let exit = self.cpu.run(&self.kicker.stop);
        // Clear only after returning: a kick that raced with entry is then still seen.
        self.kicker.stop.store(false, Ordering::SeqCst);
        Ok(match exit {
            RunExit::Stopped => VcpuExit::Interrupted,
            RunExit::TripleFault => VcpuExit::TripleFault,
            RunExit::Fatal(msg) => VcpuExit::InternalError(msg),
        })
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }

    fn instruction_pointer(&mut self) -> Result<u64, AccelError> {
        Ok(self.cpu.state().rip)
    }

    fn is_halted(&mut self) -> bool {
        self.cpu.is_halted()
    }

    fn paging_registers(&mut self) -> Result<super::PagingRegisters, AccelError> {
        let s = self.cpu.state();
        Ok(super::PagingRegisters {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        })
    }

    fn dump_registers(&mut self) -> String {
        self.cpu.dump()
    }
}
