//! The emu accelerator: our software x86-64 CPU (the `emu` crate) behind the same
//! [`Accelerator`] and [`Vcpu`] traits as KVM. Here the interrupt controllers and timers
//! that KVM keeps in the kernel are the emu crate's models: the IOAPIC, PIC and PIT sit on
//! the machine's buses like any device, and each vCPU owns its local APIC.
//!
//! ioeventfd and irqfd keep their meaning: a guest write to a registered address signals
//! the eventfd from the vCPU thread, and a thread waits on the irqfds and raises their GSIs.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
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

use super::{
    AccelError, AccelKind, Accelerator, IoEventAddress, IoHandler, Vcpu, VcpuExit, VcpuKicker,
};
use crate::arch::boot::{EntryState, Segment as BootSegment};
use crate::arch::layout;
use crate::devices::interrupt::{InterruptError, IrqChip};
use crate::devices::{Bus, BusDevice};
use crate::memory::MemoryManager;

/// Most vCPUs the emu accelerator runs.
pub const EMU_MAX_VCPUS: u32 = 8;

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

/// A registered ioeventfd.
struct IoEvent {
    addr: IoEventAddress,
    datamatch: Option<u32>,
    fd: EventFd,
}

/// Registered irqfds, served by one thread.
#[derive(Default)]
struct IrqFds {
    list: Mutex<Vec<(EventFd, u32)>>,
}

pub struct EmuAccel {
    ram: Arc<GuestRam>,
    platform: Arc<Platform>,
    ioevents: Arc<RwLock<Vec<IoEvent>>>,
    irqfds: Arc<IrqFds>,
    /// Wakes the irqfd thread when the list changes.
    irqfd_wake: Arc<EventFd>,
    irqfd_thread: OnceLock<()>,
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
        let irqfd_wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| AccelError::Emu(format!("eventfd for the irqfd thread: {e}")))?;
        let accel = EmuAccel {
            ram,
            platform,
            ioevents: Arc::new(RwLock::new(Vec::new())),
            irqfds: Arc::new(IrqFds::default()),
            irqfd_wake: Arc::new(irqfd_wake),
            irqfd_thread: OnceLock::new(),
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

    fn ensure_irqfd_thread(&self) -> Result<(), AccelError> {
        if self.irqfd_thread.get().is_some() {
            return Ok(());
        }
        let irqfds = self.irqfds.clone();
        let wake = self.irqfd_wake.clone();
        let platform = Arc::downgrade(&self.platform);
        let stop = self.stop_threads.clone();
        std::thread::Builder::new()
            .name("emu-irqfd".into())
            .spawn(move || irqfd_loop(irqfds, wake, platform, stop))
            .map_err(|e| AccelError::Emu(format!("start the irqfd thread: {e}")))?;
        let _ = self.irqfd_thread.set(());
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
        let _ = self.irqfd_wake.write(1);
    }
}

fn irqfd_loop(
    irqfds: Arc<IrqFds>,
    wake: Arc<EventFd>,
    platform: std::sync::Weak<Platform>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let mut pollfds = vec![libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let gsis: Vec<u32> = {
            let list = lock(&irqfds.list);
            for (fd, _) in list.iter() {
                pollfds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            list.iter().map(|(_, g)| *g).collect()
        };
        // SAFETY: pollfds is a valid array for the duration of the call.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 1000) };
        if n <= 0 {
            continue;
        }
        if pollfds[0].revents != 0 {
            let _ = wake.read();
        }
        let Some(p) = platform.upgrade() else { return };
        let list = lock(&irqfds.list);
        for (i, pfd) in pollfds.iter().enumerate().skip(1) {
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            if let Some((fd, gsi)) = list.get(i - 1) {
                if fd.read().is_ok() && gsis.get(i - 1) == Some(gsi) {
                    p.set_irq(*gsi, true);
                    p.set_irq(*gsi, false);
                }
            }
        }
    }
}

/// The vmm's buses as the emu CPU's I/O, with registered ioeventfds checked first.
struct EmuIo {
    io: Arc<dyn IoHandler + Send>,
    ioevents: Arc<RwLock<Vec<IoEvent>>>,
}

impl EmuIo {
    fn ioevent(&self, addr: IoEventAddress, data: &[u8]) -> bool {
        let events = self.ioevents.read().unwrap_or_else(|e| e.into_inner());
        if events.is_empty() {
            return false;
        }
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(b);
        for e in events.iter() {
            let hit = e.addr == addr
                && match e.datamatch {
                    None => true,
                    Some(v) => data.len() == 4 && value == u64::from(v),
                };
            if hit {
                if let Err(err) = e.fd.write(1) {
                    tracing::warn!("ioeventfd write failed: {err}");
                }
                return true;
            }
        }
        false
    }
}

impl emu::IoBus for EmuIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.io.pio_read(port, data)
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if !self.ioevent(IoEventAddress::Pio(port), data) {
            self.io.pio_write(port, data)
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.io.mmio_read(addr, data)
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.ioevent(IoEventAddress::Mmio(addr), data) {
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
        let fd = fd
            .try_clone()
            .map_err(|e| AccelError::Emu(format!("duplicate an ioeventfd: {e}")))?;
        self.ioevents
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(IoEvent {
                addr,
                datamatch,
                fd,
            });
        Ok(())
    }

    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), AccelError> {
        let mut events = self.ioevents.write().unwrap_or_else(|e| e.into_inner());
        let before = events.len();
        events.retain(|e| !(e.addr == addr && e.datamatch == datamatch && same_file(&e.fd, fd)));
        if events.len() == before {
            return Err(AccelError::Emu("no such ioeventfd".into()));
        }
        Ok(())
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), AccelError> {
        if gsi >= layout::IOAPIC_NUM_PINS {
            return Err(AccelError::Emu(format!("GSI {gsi} is out of range")));
        }
        let fd = fd
            .try_clone()
            .map_err(|e| AccelError::Emu(format!("duplicate an irqfd: {e}")))?;
        lock(&self.irqfds.list).push((fd, gsi));
        self.ensure_irqfd_thread()?;
        let _ = self.irqfd_wake.write(1);
        Ok(())
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), AccelError> {
        let mut list = lock(&self.irqfds.list);
        let before = list.len();
        list.retain(|(f, g)| !(*g == gsi && same_file(f, fd)));
        if list.len() == before {
            return Err(AccelError::Emu("no such irqfd".into()));
        }
        drop(list);
        let _ = self.irqfd_wake.write(1);
        Ok(())
    }
}

/// Do two eventfds refer to the same open file?
fn same_file(a: &EventFd, b: &EventFd) -> bool {
    let stat = |fd: i32| {
        // SAFETY: fstat on a valid descriptor into a zeroed stat buffer.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            (libc::fstat(fd, &mut st) == 0).then_some((st.st_dev, st.st_ino))
        }
    };
    let (sa, sb) = (stat(a.as_raw_fd()), stat(b.as_raw_fd()));
    sa.is_some() && sa == sb
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
