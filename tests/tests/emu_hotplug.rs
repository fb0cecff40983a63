//! PCI hot-plug end to end under emu: the stock guest boots with no disk; HMP drive_add and
//! QMP device_add give it one it finds (acpiphp) and reads; device_del asks it to eject the
//! disk, DEVICE_DELETED follows, the disk is gone from the guest and its vmm-blk process has
//! exited.

use std::time::{Duration, Instant};

use serde_json::json;
use vmm_tests::console::GuestConsole;
use vmm_tests::qmp::Qmp;
use vmm_tests::{repo_root, TempDir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(120);
const PATTERN: &str = "hot-plugged-disk-content-42";

#[test]
fn a_disk_comes_and_goes_while_the_guest_runs() {
    let guest = repo_root().join("target/guest");
    let kernel = guest.join("vmlinuz");
    let initrd = guest.join("initramfs.img");
    assert!(
        kernel.exists() && initrd.exists(),
        "run scripts/guest-assets"
    );
    let dir = TempDir::new("emu-hotplug");
    let img = dir.join("hot.raw");
    let mut data = vec![0u8; 8 << 20];
    data[..PATTERN.len()].copy_from_slice(PATTERN.as_bytes());
    std::fs::write(&img, data).unwrap();
    let qmp_sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let mut console = GuestConsole::spawn(&[
        "-accel",
        "emu",
        "-m",
        "512",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        kernel.to_str().unwrap(),
        "-initrd",
        initrd.to_str().unwrap(),
        "-append",
        "console=ttyS0",
        "-serial",
        "stdio",
        "-qmp",
        &qmp_arg,
    ]);
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);
    let mut qmp = Qmp::connect(&qmp_sock);
    let none = console.run("ls /sys/block | grep -c vd; true", CMD_TIMEOUT);
    assert!(
        none.lines().any(|l| l.trim() == "0"),
        "a disk before the plug: {none}"
    );

    let added = qmp.hmp(&format!(
        "drive_add 0 file={},if=none,id=hot0,format=raw",
        img.display()
    ));
    assert_eq!(added, "OK\r\n");
    let plugged = Instant::now();
    qmp.ok(
        "device_add",
        Some(json!({"driver": "virtio-blk-pci", "drive": "hot0", "id": "hotdisk"})),
    );
    let seen = console.run(
        "i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done; \
         head -c 27 /dev/vda; echo",
        CMD_TIMEOUT,
    );
    assert!(
        seen.contains(PATTERN),
        "the guest reads the new disk: {seen}"
    );
    eprintln!("device_add to a readable /dev/vda: {:?}", plugged.elapsed());

    let procs = qmp.ok("__org.vmm_query-device-processes", None);
    let pid = procs[0]["pid"].as_u64().expect("the disk's process") as i32;
    let asked = Instant::now();
    qmp.ok("device_del", Some(json!({"id": "hotdisk"})));
    let deleted = qmp.wait_event("DEVICE_DELETED");
    eprintln!("device_del to DEVICE_DELETED: {:?}", asked.elapsed());
    assert_eq!(deleted["data"]["device"], "hotdisk", "{deleted}");
    let gone = console.run("sleep 1; ls /sys/block | grep -c vd; true", CMD_TIMEOUT);
    assert!(
        gone.lines().any(|l| l.trim() == "0"),
        "the disk is still there: {gone}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the vmm-blk process {pid} is still running"
    );
    let again = qmp.request("device_del", Some(json!({"id": "hotdisk"})));
    assert_eq!(again["error"]["class"], "DeviceNotFound", "{again}");
    console.send("poweroff -f\n");
    assert_eq!(console.wait_exit(CMD_TIMEOUT), Some(0));
}
