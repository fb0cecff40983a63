//! The ACPI PCI hot-plug registers (`vmm/src/devices/pci_hotplug.rs`) through the qtest
//! harness, as the guest's AML uses them: PCIU and PCID read as nothing pending and clear when
//! read, RMV names slots 1 to 31, and a B0EJ write (what a slot's `_EJ0` does) takes the device
//! in that slot off the bus without raising the GED interrupt. Driven by QMP: device_add sets
//! PCIU and raises the GED, device_del sets PCID and raises it, the guest's eject brings
//! DEVICE_DELETED, and query-pci and HMP `info pci` follow every step at once.

use std::time::{Duration, Instant};

use serde_json::json;
use vmm::arch::layout;
use vmm::devices::pci_hotplug::{B0EJ_OFFSET, PCID_OFFSET, PCIU_OFFSET, RMV_OFFSET, SEL_OFFSET};
use vmm_tests::libqos::pci::{self, PciAddress};
use vmm_tests::qmp::Qmp;
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

/// A machine with a virtio-blk-pci disk in slot 5, and `extra` arguments.
fn start_with(dir: &TempDir, extra: &[&str]) -> Qtest {
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("file={},if=none,id=d0,format=raw", img.display());
    let device = format!("virtio-blk-pci,drive=d0,id=disk0,addr={SLOT}");
    let mut args = vec!["-drive", &drive, "-device", &device];
    args.extend_from_slice(extra);
    Qtest::start("128M", &args).unwrap()
}

fn start(dir: &TempDir) -> Qtest {
    start_with(dir, &[])
}

/// Did the GED interrupt fire since the last look?
/// Whether the GED line goes up. The report travels on the qtest socket, which the QMP
/// reply may overtake: wait for it rather than look at what has arrived so far.
fn ged_raised(qt: &mut Qtest) -> bool {
    qt.wait_irq(layout::GED_GSI, Duration::from_secs(5)).is_ok()
}

/// The slots query-pci lists, with their qdev ids.
fn pci_slots(qmp: &mut Qmp<std::os::unix::net::UnixStream>) -> Vec<(u64, String)> {
    let pci = qmp.ok("query-pci", None);
    pci[0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["slot"].as_u64().unwrap(),
                d["qdev_id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
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

#[test]
fn device_add_and_device_del_go_through_the_registers() {
    const HOT: u8 = 7;
    let dir = TempDir::new("hotplug-qmp");
    let qmp_sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let mut qt = start_with(&dir, &["-qmp", &qmp_arg]);
    let mut qmp = Qmp::connect(&qmp_sock);
    qt.irq_intercept_in("ioapic").unwrap();
    let img = dir.join("hot.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let drive_add = format!(
        "drive_add 0 file={},if=none,id=hot0,format=raw",
        img.display()
    );
    assert_eq!(qmp.hmp(&drive_add), "OK\r\n");
    let before = pci_slots(&mut qmp);

    // A plug: the function is on the bus, PCIU names its slot until read, the GED fired.
    qmp.ok(
        "device_add",
        Some(json!({"driver": "virtio-blk-pci", "drive": "hot0", "id": "hp", "addr": HOT})),
    );
    assert_eq!(vendor_id(&mut qt, HOT), VIRTIO_VENDOR_ID);
    assert!(ged_raised(&mut qt), "device_add did not raise the GED");
    assert_eq!(qt.inl(port(PCIU_OFFSET)).unwrap(), 1 << HOT);
    assert_eq!(
        qt.inl(port(PCIU_OFFSET)).unwrap(),
        0,
        "PCIU clears when read"
    );
    assert_eq!(qt.inl(port(PCID_OFFSET)).unwrap(), 0);
    let mut expected = before.clone();
    expected.push((u64::from(HOT), "hp".into()));
    assert_eq!(pci_slots(&mut qmp), expected);
    let info = qmp.hmp("info pci");
    assert!(
        info.contains(&format!("Bus  0, device   {HOT}, function 0:")),
        "{info}"
    );
    assert!(info.contains("id \"hp\""), "{info}");

    // An unplug request: PCID names the slot until read, the GED fired, and the device stays
    // until the guest ejects it; asking again is QEMU's error.
    qmp.ok("device_del", Some(json!({"id": "hp"})));
    assert!(ged_raised(&mut qt), "device_del did not raise the GED");
    assert_eq!(qt.inl(port(PCID_OFFSET)).unwrap(), 1 << HOT);
    assert_eq!(
        qt.inl(port(PCID_OFFSET)).unwrap(),
        0,
        "PCID clears when read"
    );
    assert_eq!(qt.inl(port(PCIU_OFFSET)).unwrap(), 0);
    let again = qmp.request("device_del", Some(json!({"id": "hp"})));
    assert_eq!(
        again["error"]["desc"], "Device hp is already in the process of unplug",
        "{again}"
    );
    assert_eq!(vendor_id(&mut qt, HOT), VIRTIO_VENDOR_ID);
    assert_eq!(pci_slots(&mut qmp), expected);

    // The guest's eject: DEVICE_DELETED, and the function, its process and its drive are gone.
    qt.outl(port(B0EJ_OFFSET), 1 << HOT).unwrap();
    let deleted = qmp.wait_event("DEVICE_DELETED");
    assert_eq!(
        deleted["data"],
        json!({"device": "hp", "path": "/machine/peripheral/hp"})
    );
    assert_eq!(vendor_id(&mut qt, HOT), 0xffff);
    assert_eq!(pci_slots(&mut qmp), before);
    assert!(!qmp.hmp("info pci").contains("id \"hp\""));
    let processes = qmp.ok("__org.vmm_query-device-processes", None);
    assert!(
        processes
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["device"] != "hp"),
        "{processes}"
    );
    // Its process was stopped on purpose: no crash report and no restart follow.
    std::thread::sleep(Duration::from_millis(500));
    qmp.send("query-status", None);
    loop {
        let msg = qmp.message();
        if msg.get("event").is_none() {
            break;
        }
        assert!(
            !msg["event"].as_str().unwrap().contains("DEVICE_PROCESS"),
            "after the unplug: {msg}"
        );
    }
    // The drive went with the device, as in QEMU 1.1: its id is free again.
    assert_eq!(qmp.hmp(&drive_add), "OK\r\n");
    let gone = qmp.request("device_del", Some(json!({"id": "hp"})));
    assert_eq!(gone["error"]["class"], "DeviceNotFound", "{gone}");

    // A device given at start-up is on a hot-plug slot too (as on QEMU's PIIX4 bus 0), so
    // device_del asks the guest to release it.
    qmp.ok("device_del", Some(json!({"id": "disk0"})));
    assert_eq!(qt.inl(port(PCID_OFFSET)).unwrap(), 1 << SLOT);
    qt.outl(port(B0EJ_OFFSET), 1 << SLOT).unwrap();
    let deleted = qmp.wait_event("DEVICE_DELETED");
    assert_eq!(deleted["data"]["device"], "disk0");
    wait_for_empty_slot(&mut qt, SLOT);
}

/// Under a paused machine device_add and device_del work; the guest is told through the
/// registers, which it reads when it runs.
#[test]
fn device_add_while_paused() {
    let dir = TempDir::new("hotplug-paused");
    let qmp_sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let mut qt = start_with(&dir, &["-qmp", &qmp_arg, "-S"]);
    let mut qmp = Qmp::connect(&qmp_sock);
    let status = qmp.ok("query-status", None);
    assert_eq!(status["running"], false, "{status}");
    let img = dir.join("hot.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let drive_add = format!(
        "drive_add 0 file={},if=none,id=hot0,format=raw",
        img.display()
    );
    assert_eq!(qmp.hmp(&drive_add), "OK\r\n");
    qmp.ok(
        "device_add",
        Some(json!({"driver": "virtio-blk-pci", "drive": "hot0", "id": "hp", "addr": 9})),
    );
    assert_eq!(vendor_id(&mut qt, 9), VIRTIO_VENDOR_ID);
    qmp.ok("cont", None);
    assert_eq!(qt.inl(port(PCIU_OFFSET)).unwrap(), 1 << 9);
    qmp.ok("stop", None);
    qmp.ok("device_del", Some(json!({"id": "hp"})));
    qmp.ok("cont", None);
    assert_eq!(qt.inl(port(PCID_OFFSET)).unwrap(), 1 << 9);
    qt.outl(port(B0EJ_OFFSET), 1 << 9).unwrap();
    assert_eq!(qmp.wait_event("DEVICE_DELETED")["data"]["device"], "hp");
}
