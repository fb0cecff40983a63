//! Removable media end to end under emu: a virtio-scsi CD-ROM served by `vmm-scsi`, with
//! QEMU's command line. The guest mounts the ISO and reads it; a mounted (so locked)
//! medium refuses `eject` without `force`; `change` puts another ISO in and the guest
//! reads the new content; query-block reports tray, lock and medium truthfully at each
//! step, and DEVICE_TRAY_MOVED reports the tray's moves.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use vmm_tests::console::GuestConsole;
use vmm_tests::qmp::Qmp;
use vmm_tests::TempDir;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// An ISO 9660 image holding hello.txt with `text`.
fn iso(dir: &TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let src = dir.join(&format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), text).unwrap();
    let out = dir.join(&format!("{name}.iso"));
    let status = Command::new("genisoimage")
        .args(["-quiet", "-V", name, "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("genisoimage (Debian's genisoimage; scripts/test installs it)");
    assert!(status.success());
    out
}

fn cd_info(qmp: &mut Qmp<std::os::unix::net::UnixStream>) -> Value {
    qmp.ok("query-block", None)
        .as_array()
        .and_then(|l| l.iter().find(|b| b["device"] == "cd0").cloned())
        .expect("cd0 in query-block")
}

fn file_of(info: &Value) -> Option<String> {
    info["inserted"]["file"].as_str().map(str::to_string)
}

#[test]
fn the_guest_reads_a_cd_and_its_replacement() {
    let dir = TempDir::new("emu-cdrom");
    let first = iso(&dir, "first", "content of the first disc");
    let second = iso(&dir, "second", "content of the second disc");
    let qmp_sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let drive = format!(
        "file={},if=none,id=cd0,media=cdrom,format=raw",
        first.display()
    );
    let mut console = GuestConsole::boot_stock_linux(&[
        "-device",
        "virtio-scsi-pci,id=scsi0",
        "-drive",
        &drive,
        "-device",
        "scsi-cd,drive=cd0,id=cd",
        "-drive",
        "if=none,id=cd1,media=cdrom",
        "-device",
        "scsi-cd,drive=cd1",
        "-qmp",
        &qmp_arg,
    ]);
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);
    let mut qmp = Qmp::connect(&qmp_sock);

    let info = cd_info(&mut qmp);
    assert_eq!(info["removable"], true, "{info}");
    assert_eq!(info["tray_open"], false, "{info}");
    assert_eq!(info["tray-open"], false, "{info}");
    assert_eq!(file_of(&info), Some(first.display().to_string()));
    // The empty drive: no medium, until change gives it one.
    let blocks = qmp.ok("query-block", None);
    let empty = blocks
        .as_array()
        .and_then(|l| l.iter().find(|b| b["device"] == "cd1").cloned())
        .expect("cd1");
    assert!(empty.get("inserted").is_none(), "{empty}");
    assert_eq!(empty["removable"], true);
    qmp.ok(
        "change",
        Some(json!({"device": "cd1", "target": first.display().to_string()})),
    );

    let read = console.run(
        "mkdir -p /cd && mount -t iso9660 -o ro /dev/sr0 /cd && cat /cd/hello.txt; echo",
        CMD_TIMEOUT,
    );
    assert!(read.contains("content of the first disc"), "{read}");
    // Mounted: the guest locked the medium.
    assert_eq!(cd_info(&mut qmp)["locked"], true);
    let refused = qmp.request("eject", Some(json!({"device": "cd0"})));
    assert_eq!(
        refused["error"]["desc"],
        "Device 'cd0' is locked and force was not specified, wait for tray to open and try again",
        "{refused}"
    );
    assert!(
        file_of(&cd_info(&mut qmp)).is_some(),
        "the medium is still in"
    );

    let umount = console.run("umount /cd; echo rc=$?", CMD_TIMEOUT);
    assert!(umount.contains("rc=0"), "{umount}");
    assert_eq!(cd_info(&mut qmp)["locked"], false);
    qmp.ok(
        "change",
        Some(json!({"device": "cd0", "target": second.display().to_string()})),
    );
    let info = cd_info(&mut qmp);
    assert_eq!(file_of(&info), Some(second.display().to_string()));
    assert_eq!(info["tray_open"], false);

    // The guest sees the medium change (unit attention) and reads the new disc.
    let read = console.run(
        "sleep 1; mount -t iso9660 -o ro /dev/sr0 /cd || { sleep 2; mount -t iso9660 -o ro \
         /dev/sr0 /cd; }; cat /cd/hello.txt; echo; umount /cd",
        CMD_TIMEOUT,
    );
    assert!(read.contains("content of the second disc"), "{read}");

    // The controller's process dies: it is restarted with the same disc, and the guest
    // reads on.
    let procs = qmp.ok("__org.vmm_query-device-processes", None);
    let scsi = procs
        .as_array()
        .and_then(|l| l.iter().find(|p| p["program"] == "vmm-scsi").cloned())
        .expect("the vmm-scsi process");
    let pid = scsi["pid"].as_u64().unwrap_or(0) as i32;
    // SAFETY: kill(2) on the pid the vmm reported; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let restarted = qmp.wait_event("__org.vmm_DEVICE_PROCESS_RESTARTED");
    assert_eq!(restarted["data"]["device"], "scsi0", "{restarted}");
    let read = console.run(
        "mount -t iso9660 -o ro /dev/sr0 /cd || { sleep 2; mount -t iso9660 -o ro /dev/sr0 \
         /cd; }; cat /cd/hello.txt; echo; umount /cd",
        CMD_TIMEOUT,
    );
    assert!(
        read.contains("content of the second disc"),
        "after the restart: {read}"
    );

    // Eject: the tray opens and the drive is empty.
    qmp.ok("eject", Some(json!({"device": "cd0"})));
    let info = cd_info(&mut qmp);
    assert_eq!(info["tray_open"], true, "{info}");
    assert!(info.get("inserted").is_none(), "{info}");
    let empty = console.run("cat /dev/sr0 > /dev/null 2>&1; echo rc=$?", CMD_TIMEOUT);
    assert!(!empty.contains("rc=0"), "reading an empty drive: {empty}");

    // Errors: a non-removable or unknown device, an unreadable image.
    let missing = qmp.request(
        "change",
        Some(json!({"device": "cd0", "target": "/nonexistent/x.iso"})),
    );
    assert!(
        missing["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("/nonexistent/x.iso")),
        "{missing}"
    );
    let unknown = qmp.request("eject", Some(json!({"device": "nope"})));
    assert_eq!(unknown["error"]["class"], "DeviceNotFound");

    console.send("poweroff -f\n");
    assert_eq!(console.wait_exit(CMD_TIMEOUT), Some(0));
    assert!(Path::new(&first).exists() && Path::new(&second).exists());
}
