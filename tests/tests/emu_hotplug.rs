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

    // Twenty more cycles: no process, descriptor or memory is left behind in the vmm.
    let vmm = console.pid().expect("the vmm's pid");
    let fds = || std::fs::read_dir(format!("/proc/{vmm}/fd")).map_or(0, |d| d.count());
    let rss_kib = || {
        std::fs::read_to_string(format!("/proc/{vmm}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (fds_before, rss_before) = (fds(), rss_kib());
    for n in 1..=20 {
        let drive = format!(
            "drive_add 0 file={},if=none,id=cycle{n},format=raw",
            img.display()
        );
        assert_eq!(qmp.hmp(&drive), "OK\r\n", "cycle {n}");
        let id = format!("cycle-disk{n}");
        qmp.ok(
            "device_add",
            Some(json!({"driver": "virtio-blk-pci", "drive": format!("cycle{n}"), "id": id})),
        );
        let seen = console.run(
            "i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done; \
             head -c 27 /dev/vda; echo",
            CMD_TIMEOUT,
        );
        assert!(seen.contains(PATTERN), "cycle {n}: {seen}");
        qmp.ok("device_del", Some(json!({"id": id})));
        let deleted = qmp.wait_event("DEVICE_DELETED");
        assert_eq!(deleted["data"]["device"], json!(id));
        let gone = console.run(
            "i=0; while [ -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done; \
             ls /sys/block | grep -c vd; true",
            CMD_TIMEOUT,
        );
        assert!(gone.lines().any(|l| l.trim() == "0"), "cycle {n}: {gone}");
    }
    let procs = qmp.ok("__org.vmm_query-device-processes", None);
    assert_eq!(procs, json!([]), "processes left: {procs}");
    let (fds_after, rss_after) = (fds(), rss_kib());
    eprintln!("vmm fds {fds_before} -> {fds_after}, RSS {rss_before} -> {rss_after} KiB");
    assert!(
        fds_after <= fds_before + 2,
        "fds {fds_before} -> {fds_after}"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew by {} KiB over 20 cycles",
        rss_after - rss_before
    );
    let health = console.run("echo alive-$((6*7))", CMD_TIMEOUT);
    assert!(health.contains("alive-42"), "{health}");
    console.send("poweroff -f\n");
    assert_eq!(console.wait_exit(CMD_TIMEOUT), Some(0));
}
