//! The qtest device harness against the real vmm: a CPU-less machine driven over the
//! qtest protocol (port I/O, MMIO, guest memory, interrupts), with the libqos PCI driver.

use std::time::Duration;

use serde_json::json;
use vmm_tests::libqos::pci::{self, PciAddress};
use vmm_tests::qmp::Qmp;
use vmm_tests::qtest::{IrqEvent, Qtest, QtestError};

const SHORT: Duration = Duration::from_secs(5);

fn start(extra: &[&str]) -> Qtest {
    Qtest::start("128M", extra).unwrap()
}

#[test]
fn pci_enumeration_finds_the_host_bridge() {
    let mut qt = start(&[]);
    let functions = pci::enumerate_bus0(&mut qt).unwrap();
    let bridge = functions
        .iter()
        .find(|f| f.addr == PciAddress::new(0, 0, 0))
        .expect("a function at 00:00.0");
    // vmm/src/pci/host_bridge.rs: Red Hat's generic PCIe host bridge ids, class 06/00.
    assert_eq!(
        (bridge.vendor_id, bridge.device_id),
        (
            vmm::pci::host_bridge::HOST_BRIDGE_VENDOR_ID,
            vmm::pci::host_bridge::HOST_BRIDGE_DEVICE_ID
        )
    );
    assert_eq!((bridge.class, bridge.subclass), (0x06, 0x00));
    assert_eq!(
        pci::find_device(&mut qt, 0x1b36, 0x0008).unwrap().as_ref(),
        Some(bridge)
    );
    // Empty slots read as all ones.
    assert!(pci::PciFunction::probe(&mut qt, PciAddress::new(0, 31, 0))
        .unwrap()
        .is_none());
    // The same identity through the ECAM window: an MMIO read outside RAM.
    let ecam = vmm::arch::layout::PCI_MMCONFIG_START.0;
    assert_eq!(
        qt.readl(ecam).unwrap(),
        u32::from(bridge.vendor_id) | (u32::from(bridge.device_id) << 16)
    );
    // The host bridge has no BARs and its capability walk terminates.
    assert_eq!(pci::probe_bars(&mut qt, bridge.addr).unwrap(), vec![]);
    pci::capabilities(&mut qt, bridge.addr).unwrap();
}

#[test]
fn guest_memory_round_trips() {
    let mut qt = start(&[]);
    qt.writel(0x10_0000, 0xdead_beef).unwrap();
    assert_eq!(qt.readl(0x10_0000).unwrap(), 0xdead_beef);
    assert_eq!(qt.readw(0x10_0002).unwrap(), 0xdead);
    assert_eq!(qt.readb(0x10_0000).unwrap(), 0xef);
    qt.writeq(0x10_0008, 0x0123_4567_89ab_cdef).unwrap();
    assert_eq!(qt.readq(0x10_0008).unwrap(), 0x0123_4567_89ab_cdef);

    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    qt.memwrite(0x20_0000, &pattern).unwrap();
    assert_eq!(qt.memread(0x20_0000, pattern.len()).unwrap(), pattern);
    qt.memset(0x20_0010, 16, 0xab).unwrap();
    let back = qt.memread(0x20_0000, 48).unwrap();
    assert_eq!(&back[..16], &pattern[..16]);
    assert_eq!(&back[16..32], &[0xab; 16]);
    assert_eq!(&back[32..], &pattern[32..48]);

    // The last bytes of RAM are reachable; a bulk read past them is refused.
    let last = (128 << 20) - 4;
    qt.writel(last, 0x5555_aaaa).unwrap();
    assert_eq!(qt.readl(last).unwrap(), 0x5555_aaaa);
    assert!(matches!(qt.memread(last, 8), Err(QtestError::Fail { .. })));
}

#[test]
fn isa_debug_exit_sets_the_exit_status() {
    let mut qt = start(&["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    // The vmm may exit before it answers.
    let _ = qt.outb(0xf4, 3);
    let status = qt.wait_exit(SHORT).unwrap();
    assert_eq!(status.code(), Some((3 << 1) | 1));
}

#[test]
fn bad_commands_fail_and_the_session_goes_on() {
    let mut qt = start(&[]);
    for bad in [
        "",
        "frobnicate 1 2",
        "outb 0x80",
        "outb 0x10000 1",
        "inb 0x80 0x1",
        "writeb 0x1000 0x100",
        "readl nonsense",
        "read 0x100000 0x7fffffffffffffff",
        "write 0x100000 2 0x1",
        "memset 0xc0000000 4 0",
        "irq_intercept_in lapic",
    ] {
        match qt.command(bad) {
            Err(QtestError::Fail { reason, .. }) => assert!(!reason.is_empty(), "{bad:?}"),
            other => panic!("{bad:?}: expected FAIL, got {other:?}"),
        }
    }
    // A very long line is refused as a whole and the session goes on.
    let long = format!("write 0x100000 1 0x{}", "0".repeat(40 << 20));
    assert!(matches!(qt.command(&long), Err(QtestError::Fail { .. })));
    qt.writel(0x10_0000, 7).unwrap();
    assert_eq!(qt.readl(0x10_0000).unwrap(), 7);
    // Unclaimed ports and MMIO read as all ones.
    assert_eq!(qt.inb(0x80).unwrap(), 0xff);
    assert_eq!(qt.readl(0xd000_0000).unwrap(), 0xffff_ffff);
}

#[test]
fn serial_interrupts_are_intercepted() {
    // COM1 at 0x3f8 on GSI 4 pulses its line (an edge): enabling the transmitter-empty
    // interrupt gives one at once, and so does every byte sent once it is acknowledged.
    let mut qt = start(&["-serial", "null"]);
    qt.outb(0x3f9, 0x02).unwrap(); // IER: THR empty, before interception: not reported
    assert!(qt.take_irqs().unwrap().is_empty());
    qt.inb(0x3fa).unwrap(); // IIR: acknowledge
    qt.outb(0x3f9, 0x00).unwrap();
    qt.irq_intercept_in("ioapic").unwrap();
    qt.outb(0x3fc, 0x08).unwrap(); // MCR: OUT2
    qt.outb(0x3f9, 0x02).unwrap();
    qt.wait_irq(4, SHORT).unwrap();
    // Reading IIR acknowledges the interrupt, so the next byte can raise another.
    assert_eq!(qt.inb(0x3fa).unwrap() & 0x0f, 0x02);
    qt.outb(0x3f8, b'x').unwrap();
    qt.wait_irq(4, SHORT).unwrap();
    // Each edge is a raise and then a lower; the line ends low.
    assert!(!qt.get_irq(4).unwrap());
    let lowers = qt
        .take_irqs()
        .unwrap()
        .into_iter()
        .filter(|e| *e == IrqEvent::Lower(4))
        .count();
    assert_eq!(lowers, 2);
}

#[test]
fn qmp_works_alongside() {
    let dir = vmm_tests::TempDir::new("qtest-qmp");
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let mut qt = start(&["-qmp", &qmp_arg]);
    let mut qmp = Qmp::connect(&sock);
    let status = qmp.ok("query-status", None);
    assert_eq!(status["status"], json!("running"));
    qmp.ok("stop", None);
    // The harness keeps working while the VM is stopped, and after a reset.
    qt.writel(0x10_0000, 0x1234).unwrap();
    qmp.ok("system_reset", None);
    assert_eq!(qt.readl(0x10_0000).unwrap(), 0x1234);
    let kvm = qmp.ok("query-kvm", None);
    assert_eq!(kvm["enabled"], json!(false));
    qmp.ok("quit", None);
    assert_eq!(qt.wait_exit(SHORT).unwrap().code(), Some(0));
}

#[test]
fn closing_the_connection_ends_the_vmm() {
    let mut qt = start(&[]);
    qt.outb(0x80, 0).unwrap();
    qt.disconnect().unwrap();
    assert!(qt.wait_exit(SHORT).unwrap().success());
}

#[test]
fn a_vmm_that_cannot_start_is_reported() {
    match Qtest::start("1", &[]) {
        Err(QtestError::VmmExited { status, stderr }) => {
            assert_eq!(status.code(), Some(1));
            assert!(stderr.contains("-m"), "{stderr}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a 1 MiB machine started"),
    }
}
