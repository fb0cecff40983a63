//! KVM through the vmm library with tiny guests: ioeventfd and irqfd (the data path that
//! vhost-user devices will use: guest kick -> eventfd, eventfd -> guest IRQ), and pausing,
//! resuming and resetting the vCPUs.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use vm_memory::{Bytes, GuestAddress};
use vmm::accel::kvm::KvmAccel;
use vmm::accel::{Accelerator, IoEventAddress, IoHandler};
use vmm::arch::boot::setup_long_mode;
use vmm::control::MachineControl;
use vmm::cpu::CpuManager;
use vmm::memory::MemoryManager;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_tests::guest::LOAD_ADDR;
use vmm_tests::require_kvm;

/// The port test guests report progress on.
const MARKER_PORT: u16 = 0x80;

/// Records what reaches the vmm's buses.
#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<Access>>,
    cv: Condvar,
}

#[derive(Debug, Clone, PartialEq)]
enum Access {
    Pio(u16, Vec<u8>),
    Mmio(u64, Vec<u8>),
}

impl IoHandler for Recorder {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .push(Access::Pio(port, data.to_vec()));
        self.cv.notify_all();
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .push(Access::Mmio(addr, data.to_vec()));
        self.cv.notify_all();
    }
}

impl Recorder {
    fn wait_marker(&self, value: u8, timeout: Duration) -> Vec<Access> {
        let deadline = Instant::now() + timeout;
        let mut log = self.log.lock().unwrap();
        loop {
            if log.contains(&Access::Pio(MARKER_PORT, vec![value])) {
                return log.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "guest never reported marker {value}; saw {log:?}"
            );
            log = self.cv.wait_timeout(log, left).unwrap().0;
        }
    }
}

fn marker(a: &mut CodeAssembler, value: u8) {
    a.mov(dx, MARKER_PORT as u32).unwrap();
    a.mov(al, value as u32).unwrap();
    a.out(dx, al).unwrap();
}

fn hang(a: &mut CodeAssembler) {
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    a.hlt().unwrap();
    a.jmp(l).unwrap();
}

struct TestVm {
    mm: MemoryManager,
    accel: Arc<KvmAccel>,
}

impl TestVm {
    fn new() -> Self {
        let mm = MemoryManager::new(16 << 20).unwrap();
        let accel = Arc::new(KvmAccel::new(&mm).unwrap());
        TestVm { mm, accel }
    }

    fn start(&self, code: &[u8], io: Arc<Recorder>) -> CpuManager {
        let mem = self.mm.guest_memory();
        mem.write_slice(code, GuestAddress(LOAD_ADDR)).unwrap();
        let entry = setup_long_mode(mem, GuestAddress(LOAD_ADDR)).unwrap();
        let vcpu = self.accel.create_vcpu(0, 1, io.clone()).unwrap();
        let (control, _rx) = MachineControl::new();
        let cpus = CpuManager::start(vec![vcpu], io, control).unwrap();
        cpus.reset(&entry).unwrap();
        cpus.resume();
        cpus
    }
}

#[test]
fn ioeventfd_fires_on_mmio_write() {
    require_kvm!();
    let vm = TestVm::new();
    let any = EventFd::new(EFD_NONBLOCK).unwrap();
    let matching = EventFd::new(EFD_NONBLOCK).unwrap();
    vm.accel
        .register_ioevent(&any, IoEventAddress::Mmio(0xd000_0000), None)
        .unwrap();
    vm.accel
        .register_ioevent(&matching, IoEventAddress::Mmio(0xd000_0008), Some(0x55))
        .unwrap();

    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rbx, 0xd000_0000u64).unwrap();
    a.mov(dword_ptr(rbx), 0x1234u32).unwrap();
    a.mov(dword_ptr(rbx + 8), 0x54u32).unwrap(); // no match: exits to the vmm
    a.mov(dword_ptr(rbx + 8), 0x55u32).unwrap(); // match: only the eventfd
    marker(&mut a, 1);
    hang(&mut a);
    let io = Arc::new(Recorder::default());
    let mut cpus = vm.start(&a.assemble(LOAD_ADDR).unwrap(), io.clone());
    let log = io.wait_marker(1, Duration::from_secs(30));
    cpus.shutdown();

    assert_eq!(any.read().unwrap(), 1, "the plain ioeventfd fired once");
    assert_eq!(
        matching.read().unwrap(),
        1,
        "the datamatch ioeventfd fired once"
    );
    let mmio: Vec<_> = log
        .iter()
        .filter(|a| matches!(a, Access::Mmio(..)))
        .collect();
    assert_eq!(
        mmio,
        vec![&Access::Mmio(0xd000_0008, 0x54u32.to_le_bytes().to_vec())],
        "only the non-matching write left KVM"
    );
    vm.accel
        .unregister_ioevent(&any, IoEventAddress::Mmio(0xd000_0000), None)
        .unwrap();
}

const VECTOR: u64 = 0x40;

/// A guest that installs a handler for VECTOR (optionally routing IOAPIC pin `ioapic_gsi`
/// to it), enables its local APIC, reports marker 1 and halts with interrupts on; the
/// handler reports marker 2.
fn interrupt_guest(vm: &TestVm, ioapic_gsi: Option<u32>) -> Vec<u8> {
    const IDT: u64 = 0x5000;
    const IDTR: u64 = 0x5ff0;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut handler = a.create_label();
    a.mov(rax, IDTR).unwrap();
    a.lidt(ptr(rax)).unwrap();
    if let Some(gsi) = ioapic_gsi {
        // IOAPIC pin -> VECTOR, fixed, edge, active high, unmasked, to APIC 0.
        a.mov(rbx, 0xfec0_0000u64).unwrap();
        a.mov(dword_ptr(rbx), 0x10 + 2 * gsi).unwrap();
        a.mov(dword_ptr(rbx + 0x10), VECTOR as u32).unwrap();
        a.mov(dword_ptr(rbx), 0x11 + 2 * gsi).unwrap();
        a.mov(dword_ptr(rbx + 0x10), 0u32).unwrap();
    }
    // Software-enable the local APIC.
    a.mov(rbx, 0xfee0_0000u64).unwrap();
    a.mov(dword_ptr(rbx + 0xf0), 0x1ffu32).unwrap();
    marker(&mut a, 1);
    a.sti().unwrap();
    hang(&mut a);
    a.set_label(&mut handler).unwrap();
    marker(&mut a, 2);
    a.mov(rbx, 0xfee0_0000u64).unwrap();
    a.mov(dword_ptr(rbx + 0xb0), 0u32).unwrap(); // EOI
    a.iretq().unwrap();
    let result = a
        .assemble_options(
            LOAD_ADDR,
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .unwrap();
    let handler_addr = result.label_ip(&handler).unwrap();

    let mem = vm.mm.guest_memory();
    // A 64-bit interrupt gate for VECTOR, selector 0x08 (the boot GDT's code segment).
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(handler_addr as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&0x08u16.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((handler_addr >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((handler_addr >> 32) as u32).to_le_bytes());
    mem.write_slice(&gate, GuestAddress(IDT + VECTOR * 16))
        .unwrap();
    let mut idtr = [0u8; 10];
    idtr[0..2].copy_from_slice(&(256u16 * 16 - 1).to_le_bytes());
    idtr[2..10].copy_from_slice(&IDT.to_le_bytes());
    mem.write_slice(&idtr, GuestAddress(IDTR)).unwrap();
    result.inner.code_buffer
}

/// Run `code`, then signal `fd` once the guest waits, and require the handler to run.
fn fire_and_wait(vm: &TestVm, code: &[u8], fd: &EventFd) {
    let io = Arc::new(Recorder::default());
    let mut cpus = vm.start(code, io.clone());
    io.wait_marker(1, Duration::from_secs(30));
    // Give the guest a moment to reach STI/HLT, then fire the eventfd from this thread.
    std::thread::sleep(Duration::from_millis(100));
    fd.write(1).unwrap();
    io.wait_marker(2, Duration::from_secs(30));
    cpus.shutdown();
}

#[test]
fn irqfd_interrupt_reaches_the_guest_handler() {
    require_kvm!();
    const GSI: u32 = 5;
    let vm = TestVm::new();
    let code = interrupt_guest(&vm, Some(GSI));
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    vm.accel.register_irqfd(&irqfd, GSI).unwrap();
    fire_and_wait(&vm, &code, &irqfd);
    vm.accel.unregister_irqfd(&irqfd, GSI).unwrap();
}

/// The virtio data path under KVM: a queue's call eventfd is an irqfd on an MSI route, so
/// the interrupt reaches the guest with no vmm thread.
#[test]
fn msi_route_irqfd_reaches_the_guest_handler() {
    require_kvm!();
    let vm = TestVm::new();
    let code = interrupt_guest(&vm, None);
    // Fixed delivery of VECTOR to APIC 0, edge.
    let gsi = vm.accel.add_msi_route(0xfee0_0000, VECTOR as u32).unwrap();
    assert!(gsi >= 24, "MSI routes come after the IOAPIC pins");
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    vm.accel.register_irqfd(&irqfd, gsi).unwrap();
    fire_and_wait(&vm, &code, &irqfd);
    vm.accel.unregister_irqfd(&irqfd, gsi).unwrap();
    vm.accel.remove_msi_route(gsi).unwrap();
}

#[test]
fn pause_stops_the_guest_and_resume_restarts_it() {
    require_kvm!();
    const COUNTER: u64 = 0x30_0000;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.mov(rbx, COUNTER).unwrap();
    marker(&mut a, 1);
    a.set_label(&mut top).unwrap();
    a.inc(qword_ptr(rbx)).unwrap();
    a.jmp(top).unwrap();
    let vm = TestVm::new();
    let io = Arc::new(Recorder::default());
    let mut cpus = vm.start(&a.assemble(LOAD_ADDR).unwrap(), io.clone());
    io.wait_marker(1, Duration::from_secs(30));
    let mem = vm.mm.guest_memory();
    let read = || mem.read_obj::<u64>(GuestAddress(COUNTER)).unwrap();

    let wait_for_progress = |from: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while read() == from {
            assert!(Instant::now() < deadline, "the guest makes no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for_progress(0);
    for _ in 0..3 {
        cpus.pause();
        let frozen = read();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(read(), frozen, "a paused vCPU does not run");
        cpus.resume();
        wait_for_progress(frozen);
    }

    // A reset puts the vCPU back at the entry point: it reports marker 1 again.
    io.log.lock().unwrap().clear();
    let entry = setup_long_mode(mem, GuestAddress(LOAD_ADDR)).unwrap();
    cpus.reset(&entry).unwrap();
    cpus.resume();
    io.wait_marker(1, Duration::from_secs(30));
    cpus.shutdown();
}
