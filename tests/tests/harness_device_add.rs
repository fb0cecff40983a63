//! Adding a disk at run time, as QEMU 1.1's management did it: HMP `drive_add` for the
//! backend, then QMP `device_add virtio-blk-pci`. The function appears in PCI configuration
//! space at once (its vmm-blk process runs before the reply) and serves the image; bad
//! requests get QEMU 7.2's errors and change nothing. (The guest's ACPI notification and
//! device_del come with the hot-plug controller.)

use serde_json::json;
use vmm_tests::libqos::blk::{self, BlkDevice, BlkOptions, VIRTIO_BLK_T_IN};
use vmm_tests::libqos::virtqueue::{Buffer, GuestAlloc};
use vmm_tests::qmp::Qmp;
use vmm_tests::qtest::Qtest;
use vmm_tests::TempDir;

const RAM: u64 = 128 << 20;

#[test]
fn drive_add_and_device_add_plug_a_working_disk() {
    let dir = TempDir::new("device-add");
    let img = dir.join("hot.raw");
    std::fs::write(&img, vec![0x3cu8; 1 << 20]).unwrap();
    let qmp_sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let mut qt = Qtest::start("128M", &["-qmp", &qmp_arg]).unwrap();
    let mut qmp = Qmp::connect(&qmp_sock);

    let added = qmp.hmp(&format!(
        "drive_add 0 file={},if=none,id=hot0,format=raw",
        img.display()
    ));
    assert_eq!(added, "OK\r\n");
    let again = qmp.hmp(&format!(
        "drive_add 0 file={},if=none,id=hot0,format=raw",
        img.display()
    ));
    assert_eq!(again, "Duplicate ID 'hot0' for drive\r\n");

    let err = |qmp: &mut Qmp<_>, args: serde_json::Value| -> String {
        let r = qmp.request("device_add", Some(args));
        r["error"]["desc"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(
        err(&mut qmp, json!({"driver": "nosuch"})),
        "'nosuch' is not a valid device model name"
    );
    assert_eq!(
        err(
            &mut qmp,
            json!({"driver": "virtio-blk-pci", "drive": "nope"})
        ),
        "Property 'virtio-blk-device.drive' can't find value 'nope'"
    );
    assert_eq!(
        err(
            &mut qmp,
            json!({"driver": "virtio-blk-pci", "drive": "hot0", "bus": "pci.7"})
        ),
        "Bus 'pci.7' not found"
    );
    assert_eq!(
        err(
            &mut qmp,
            json!({"driver": "virtio-blk-pci", "drive": "hot0", "foo": "1"})
        ),
        "Property 'virtio-blk-pci.foo' not found"
    );
    assert_eq!(
        err(&mut qmp, json!({"driver": "virtio-blk-pci"})),
        "drive property not set"
    );
    qmp.ok(
        "device_add",
        Some(json!({"driver": "virtio-blk-pci", "drive": "hot0", "id": "disk1", "addr": "0x6"})),
    );
    assert_eq!(
        err(
            &mut qmp,
            json!({"driver": "virtio-blk-pci", "drive": "hot0", "id": "disk1"})
        ),
        "Duplicate device ID 'disk1'"
    );
    let pci = qmp.ok("query-pci", None);
    let devices = pci[0]["devices"].as_array().cloned().unwrap_or_default();
    assert!(
        devices
            .iter()
            .any(|d| d["slot"] == 6 && d["qdev_id"] == "disk1"),
        "{pci}"
    );

    // The function works: read the image's content through it.
    let mut mem = GuestAlloc::for_ram(RAM);
    let mut disk = BlkDevice::init(&mut qt, RAM, &mut mem, BlkOptions::default()).unwrap();
    let hdr = mem.alloc(16, 16).unwrap();
    let data = mem.alloc(512, 512).unwrap();
    let status = mem.alloc(1, 1).unwrap();
    qt.memwrite(hdr, &blk::header(VIRTIO_BLK_T_IN, 0)).unwrap();
    let vq = &mut disk.queues[0];
    vq.add_chain(
        &mut qt,
        &[
            Buffer::readable(hdr, 16),
            Buffer::writable(data, 512),
            Buffer::writable(status, 1),
        ],
    )
    .unwrap();
    vq.kick(&mut qt).unwrap();
    blk::wait_used(&mut qt, vq, std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(qt.memread(status, 1).unwrap(), [0]);
    assert_eq!(qt.memread(data, 512).unwrap(), vec![0x3cu8; 512]);
}
