//! PCI hot-plug end to end under emu: the stock guest boots with its one disk (vda);
//! HMP drive_add and QMP device_add give it a second one (vdb) it finds (acpiphp) and reads;
//! device_del asks it to eject the disk, DEVICE_DELETED follows, the disk is gone from the
//! guest and its vmm-blk process has exited. Twenty cycles leak nothing; a disk the guest has
//! mounted and is reading goes as the guest's own eject decides. The same scenario runs
//! through the python client (qemu.qmp), starting with a device_add under -S.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vmm_tests::console::GuestConsole;
use vmm_tests::qmp::Qmp;
use vmm_tests::{repo_root, TempDir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(120);
const PATTERN: &str = "hot-plugged-disk-content-42";

/// Wait for /dev/vdb, then print its first bytes.
const READ_VDB: &str =
    "i=0; while [ ! -b /dev/vdb ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; \
     head -c 27 /dev/vdb; echo";
/// Wait for /dev/vdb to go, then count the guest's disks.
const COUNT_AFTER_VDB: &str =
    "i=0; while [ -b /dev/vdb ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; \
     ls /sys/block | grep -c vd; true";

/// An 8 MiB raw image that starts with [`PATTERN`].
fn hot_image(dir: &TempDir) -> std::path::PathBuf {
    let img = dir.join("hot.raw");
    let mut data = vec![0u8; 8 << 20];
    data[..PATTERN.len()].copy_from_slice(PATTERN.as_bytes());
    std::fs::write(&img, data).unwrap();
    img
}

/// Boot the stock guest under emu with one 1 MiB disk (vda) and a QMP socket; `extra`
/// arguments go last. Returns the console and the QMP socket's path.
fn boot(dir: &TempDir, extra: &[&str]) -> (GuestConsole, std::path::PathBuf) {
    let boot_disk = dir.join("boot.raw");
    std::fs::write(&boot_disk, vec![0u8; 1 << 20]).unwrap();
    let boot_drive = format!("file={},format=raw,if=virtio", boot_disk.display());
    let qmp_sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let mut args = vec!["-drive", &boot_drive, "-qmp", &qmp_arg];
    args.extend_from_slice(extra);
    let console = GuestConsole::boot_stock_linux(&args);
    (console, qmp_sock)
}

#[test]
fn a_disk_comes_and_goes_while_the_guest_runs() {
    let dir = TempDir::new("emu-hotplug");
    let img = hot_image(&dir);
    let (mut console, qmp_sock) = boot(&dir, &[]);
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);
    let mut qmp = Qmp::connect(&qmp_sock);
    let one = console.run("ls /sys/block | grep -c vd; true", CMD_TIMEOUT);
    assert!(
        one.lines().any(|l| l.trim() == "1"),
        "not just the boot disk before the plug: {one}"
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
    let seen = console.run(READ_VDB, CMD_TIMEOUT);
    assert!(
        seen.contains(PATTERN),
        "the guest reads the new disk: {seen}"
    );
    eprintln!("device_add to a readable /dev/vdb: {:?}", plugged.elapsed());

    let procs = qmp.ok("__org.vmm_query-device-processes", None);
    let pid = procs
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["device"] == "hotdisk")
        .and_then(|p| p["pid"].as_u64())
        .expect("the disk's process");
    let asked = Instant::now();
    qmp.ok("device_del", Some(json!({"id": "hotdisk"})));
    let deleted = qmp.wait_event("DEVICE_DELETED");
    eprintln!("device_del to DEVICE_DELETED: {:?}", asked.elapsed());
    assert_eq!(deleted["data"]["device"], "hotdisk", "{deleted}");
    let gone = console.run(COUNT_AFTER_VDB, CMD_TIMEOUT);
    assert!(
        gone.lines().any(|l| l.trim() == "1"),
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
        let seen = console.run(READ_VDB, CMD_TIMEOUT);
        assert!(seen.contains(PATTERN), "cycle {n}: {seen}");
        qmp.ok("device_del", Some(json!({"id": id})));
        let deleted = qmp.wait_event("DEVICE_DELETED");
        assert_eq!(deleted["data"]["device"], json!(id));
        let gone = console.run(COUNT_AFTER_VDB, CMD_TIMEOUT);
        assert!(gone.lines().any(|l| l.trim() == "1"), "cycle {n}: {gone}");
    }
    let procs = qmp.ok("__org.vmm_query-device-processes", None);
    assert_eq!(
        procs.as_array().map(Vec::len),
        Some(1),
        "processes beyond the boot disk's: {procs}"
    );
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

    // A disk the guest has mounted and is reading: acpiphp stops the driver (in-flight
    // requests complete or fail inside the guest) before the eject, and only the eject makes
    // the vmm stop the process.
    let fs = dir.join("fs.ext2");
    let files = dir.join("fs");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("big"), vec![0x5au8; 4 << 20]).unwrap();
    let mkfs = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext2", "-d"])
        .arg(&files)
        .arg(&fs)
        .arg("16M")
        .status()
        .expect("mke2fs (scripts/test installs e2fsprogs)");
    assert!(mkfs.success());
    let drive = format!(
        "drive_add 0 file={},if=none,id=fs0,format=raw",
        fs.display()
    );
    assert_eq!(qmp.hmp(&drive), "OK\r\n");
    qmp.ok(
        "device_add",
        Some(json!({"driver": "virtio-blk-pci", "drive": "fs0", "id": "fsdisk"})),
    );
    let mounted = console.run(
        "i=0; while [ ! -b /dev/vdb ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; \
         mkdir -p /mnt && mount -t ext2 -o ro /dev/vdb /mnt && \
         (while true; do cat /mnt/big > /dev/null; \
          dd if=/dev/vdb of=/dev/null bs=64k count=64 iflag=direct 2>/dev/null; done) & \
         sleep 1; echo reader=$!; wc -c < /mnt/big",
        CMD_TIMEOUT,
    );
    assert!(mounted.contains("4194304"), "mount and read: {mounted}");
    let reader = mounted
        .lines()
        .find_map(|l| l.trim().strip_prefix("reader="))
        .map(str::to_string)
        .expect("the reader's pid");
    qmp.ok("device_del", Some(json!({"id": "fsdisk"})));
    let deleted = qmp.wait_event("DEVICE_DELETED");
    assert_eq!(deleted["data"]["device"], "fsdisk", "{deleted}");
    let after = console.run(
        &format!("kill {reader}; umount -l /mnt; echo alive-$((6*7)); {COUNT_AFTER_VDB}"),
        CMD_TIMEOUT,
    );
    assert!(
        after.contains("alive-42"),
        "the guest after the eject: {after}"
    );
    assert!(after.lines().any(|l| l.trim() == "1"), "{after}");
    let procs = qmp.ok("__org.vmm_query-device-processes", None);
    assert_eq!(procs.as_array().map(Vec::len), Some(1), "{procs}");

    console.send("poweroff -f\n");
    assert_eq!(console.wait_exit(CMD_TIMEOUT), Some(0));
}

/// The python client library drives the same scenario: device_add under -S (the guest finds
/// the disk when it boots), device_del waiting on DEVICE_DELETED, and a second cycle while
/// the guest runs.
#[test]
fn python_client_hot_plugs_from_prelaunch() {
    let python_ok = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        python_ok,
        "python3 with qemu.qmp is required (scripts/test installs it)"
    );
    let dir = TempDir::new("emu-hotplug-py");
    let img = hot_image(&dir);
    let (mut console, qmp_sock) = boot(&dir, &["-S"]);
    let deadline = Instant::now() + CMD_TIMEOUT;
    while !qmp_sock.exists() {
        assert!(Instant::now() < deadline, "no QMP socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut script = Command::new("python3")
        .arg(repo_root().join("tests/python/hotplug.py"))
        .arg(&qmp_sock)
        .arg(&img)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_script = script.stdin.take().unwrap();
    let mut from_script = BufReader::new(script.stdout.take().unwrap()).lines();
    let mut expect = |want: &str| {
        let line = from_script.next().and_then(Result::ok).unwrap_or_default();
        assert_eq!(line, want, "the python client stopped early");
    };

    // Plugged before the guest ran: it finds the disk as it boots.
    expect("PLUGGED");
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);
    let seen = console.run(READ_VDB, CMD_TIMEOUT);
    assert!(seen.contains(PATTERN), "{seen}");
    writeln!(to_script, "GO").unwrap();
    expect("DELETED");
    let gone = console.run(COUNT_AFTER_VDB, CMD_TIMEOUT);
    assert!(gone.lines().any(|l| l.trim() == "1"), "{gone}");

    // Once more while the guest runs.
    writeln!(to_script, "GO").unwrap();
    expect("PLUGGED");
    let seen = console.run(READ_VDB, CMD_TIMEOUT);
    assert!(seen.contains(PATTERN), "{seen}");
    writeln!(to_script, "GO").unwrap();
    expect("DELETED");
    let gone = console.run(COUNT_AFTER_VDB, CMD_TIMEOUT);
    assert!(gone.lines().any(|l| l.trim() == "1"), "{gone}");
    expect("PY-OK");
    assert!(script.wait().unwrap().success());

    let mut qmp = Qmp::connect(&qmp_sock);
    let procs = qmp.ok("__org.vmm_query-device-processes", None);
    assert_eq!(procs.as_array().map(Vec::len), Some(1), "{procs}");
    console.send("poweroff -f\n");
    assert_eq!(console.wait_exit(CMD_TIMEOUT), Some(0));
}
