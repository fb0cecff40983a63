//! The ACPI PCI hot-plug registers (`vmm/src/devices/pci_hotplug.rs`) through the qtest
//! harness, as the guest's AML uses them: PCIU and PCID read as nothing pending and clear when
//! read, RMV names slots 1 to 31, and a B0EJ write (what a slot's `_EJ0` does) takes the device
//! in that slot off the bus without raising the GED interrupt. Raising the GED for a plug or an
//! unplug request is tested at the unit level: nothing reachable from here calls `plug` or
//! `request_unplug` until device_add and device_del do.

use std::time::{Duration, Instant};

use vmm::arch::layout;
use vmm::devices::pci_hotplug::{B0EJ_OFFSET, PCID_OFFSET, PCIU_OFFSET, RMV_OFFSET, SEL_OFFSET};
use vmm_tests::libqos::pci::{self, PciAddress};
use vmm_tests::qtest::{IrqEvent, Qtest};
use vmm_tests::TempDir;

const TIMEOUT: Duration = Duration::from_secs(10);
const VIRTIO_VENDOR_ID: u16 = 0x1af4;
const SLOT: u8 = 5;

fn port(offset: u64) -> u16 {
    layout::PCI_HOTPLUG_PORT + offset as u16
}

fn vendor_id(qt: &mut Qtest, slot: u8) -> u16 {
    pci::config_readw(qt, PciAddress::new(0, slot, 0), 0).unwrap()
}

/// Wait for slot `slot` to read as empty (the eject is carried out by the machine's thread).
fn wait_for_empty_slot(qt: &mut Qtest, slot: u8) {
    let deadline = Instant::now() + TIMEOUT;
    while vendor_id(qt, slot) != 0xffff {
        assert!(
            Instant::now() < deadline,
            "slot {slot} still holds a device {TIMEOUT:?} after the eject"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A machine with a virtio-blk-pci disk in slot 5.
fn start(dir: &TempDir) -> Qtest {
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("file={},if=none,id=d0,format=raw", img.display());
    let device = format!("virtio-blk-pci,drive=d0,id=disk0,addr={SLOT}");
    Qtest::start("128M", &["-drive", &drive, "-device", &device]).unwrap()
}

#[test]
fn registers_read_as_nothing_pending_and_clear() {
    let dir = TempDir::new("hotplug-regs");
    let mut qt = start(&dir);
    // Nothing was plugged or asked to leave since power-on, and reading changes nothing.
    for _ in 0..2 {
        assert_eq!(qt.inl(port(PCIU_OFFSET)).unwrap(), 0);
        assert_eq!(qt.inl(port(PCID_OFFSET)).unwrap(), 0);
    }
    assert_eq!(qt.inl(port(RMV_OFFSET)).unwrap(), 0xffff_fffe);
    assert_eq!(qt.inl(port(SEL_OFFSET)).unwrap(), 0);
    assert_eq!(qt.inl(port(B0EJ_OFFSET)).unwrap(), 0, "B0EJ reads as zero");
    // Only 32-bit accesses reach the registers.
    assert_eq!(qt.inw(port(PCIU_OFFSET)).unwrap(), 0xffff);
    // Writes to the read-only registers are ignored.
    qt.outl(port(PCIU_OFFSET), 0xffff_ffff).unwrap();
    qt.outl(port(PCID_OFFSET), 0xffff_ffff).unwrap();
    assert_eq!(qt.inl(port(PCIU_OFFSET)).unwrap(), 0);
    assert_eq!(qt.inl(port(PCID_OFFSET)).unwrap(), 0);
    assert_eq!(vendor_id(&mut qt, SLOT), VIRTIO_VENDOR_ID);
}

#[test]
fn b0ej_takes_the_device_off_the_bus() {
    let dir = TempDir::new("hotplug-eject");
    let mut qt = start(&dir);
    qt.irq_intercept_in("ioapic").unwrap();
    assert_eq!(vendor_id(&mut qt, SLOT), VIRTIO_VENDOR_ID);

    // With another bus selected the eject register does nothing (only bus 0 has hot-plug);
    // a B0EJ write for slot 0 (the host bridge) and for an empty slot is ignored too.
    qt.outl(port(SEL_OFFSET), 1).unwrap();
    assert_eq!(qt.inl(port(RMV_OFFSET)).unwrap(), 0);
    qt.outl(port(B0EJ_OFFSET), 1 << SLOT).unwrap();
    qt.outl(port(SEL_OFFSET), 0).unwrap();
    qt.outl(port(B0EJ_OFFSET), 1 | (1 << 9)).unwrap();
    // An eject is carried out by the machine's thread: give a wrong one time to happen.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vendor_id(&mut qt, SLOT), VIRTIO_VENDOR_ID);
    assert_eq!(
        vendor_id(&mut qt, 0),
        vmm::pci::host_bridge::HOST_BRIDGE_VENDOR_ID
    );

    // What the slot's _EJ0 does.
    qt.outl(port(B0EJ_OFFSET), 1 << SLOT).unwrap();
    wait_for_empty_slot(&mut qt, SLOT);
    assert_eq!(
        pci::config_readl(&mut qt, PciAddress::new(0, SLOT, 0), 0x08).unwrap(),
        u32::MAX,
        "every register of the ejected function reads as all ones"
    );
    // The host bridge stayed, and nothing else appeared.
    let functions = pci::enumerate_bus0(&mut qt).unwrap();
    assert_eq!(
        functions.iter().map(|f| f.addr).collect::<Vec<_>>(),
        vec![PciAddress::new(0, 0, 0)]
    );
    // The eject completes a request of the guest's; the guest is not interrupted for it.
    assert!(
        !qt.take_irqs()
            .unwrap()
            .contains(&IrqEvent::Raise(layout::GED_GSI)),
        "the eject raised the GED interrupt"
    );
    assert_eq!(qt.inl(port(PCIU_OFFSET)).unwrap(), 0);
    assert_eq!(qt.inl(port(PCID_OFFSET)).unwrap(), 0);
    // Ejecting the now empty slot again is harmless, and the machine goes on.
    qt.outl(port(B0EJ_OFFSET), 1 << SLOT).unwrap();
    assert_eq!(vendor_id(&mut qt, SLOT), 0xffff);
    assert_eq!(
        vendor_id(&mut qt, 0),
        vmm::pci::host_bridge::HOST_BRIDGE_VENDOR_ID
    );
}
