//! Our QMP replies against QEMU 7.2's: `tests/python/compare_qemu.py` sends one command
//! sequence to both (QEMU from Debian's qemu-system-x86, which scripts/test installs) and
//! requires the same reply shapes, and identical error replies, for every command that
//! both implement.

use std::process::{Command, Stdio};
use std::time::Duration;

use vmm_tests::guest::hanging_guest;
use vmm_tests::{repo_root, spawn_vmm, wait_until, TempDir};

const TIMEOUT: Duration = Duration::from_secs(60);
const UUID: &str = "6c9ef2c4-5a9f-4d4b-9a55-2cbbd7f0b3a1";

#[test]
fn reply_shapes_match_qemu_7_2() {
    let dir = TempDir::new("qmp-vs-qemu");
    let kernel = hanging_guest(&dir, "");
    let ours = dir.join("vmm.sock");
    let theirs = dir.join("qemu.sock");
    let common = ["-m", "64", "-nodefaults", "-display", "none", "-S"];
    let common_named = ["-name", "cmp", "-uuid", UUID];

    // The same drives on both sides, each on its own image files (they are locked): a
    // qcow2 disk over a raw backing file on a virtio-blk-pci device, and a raw drive no
    // device uses.
    let drives = |side: &str| -> Vec<String> {
        let base = dir.join(&format!("{side}-base.raw"));
        let disk = dir.join(&format!("{side}-disk.qcow2"));
        let spare = dir.join(&format!("{side}-spare.img"));
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        std::fs::write(&spare, vec![0u8; 1 << 20]).unwrap();
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&disk)
            .status()
            .expect("qemu-img (Debian's qemu-utils)");
        assert!(made.success());
        vec![
            "-drive".into(),
            format!("file={},format=qcow2,if=none,id=d0", disk.display()),
            "-device".into(),
            "virtio-blk-pci,drive=d0,id=disk0".into(),
            "-drive".into(),
            format!("file={},format=raw,if=none,id=d1", spare.display()),
        ]
    };
    let mut our_drives = drives("ours");
    let mut their_drives = drives("theirs");
    // A display adapter and a VNC server with password authentication on each side.
    for (side, args) in [("ours", &mut our_drives), ("theirs", &mut their_drives)] {
        args.extend([
            "-device".into(),
            "bochs-display".into(),
            "-vnc".into(),
            format!(
                "unix:{},password=on",
                dir.join(&format!("{side}.vnc")).display()
            ),
        ]);
    }

    let ours_arg = format!("unix:{},server=on,wait=off", ours.display());
    let mut args = vec!["-accel", "emu", "-kernel", &kernel];
    args.extend(common);
    args.extend(common_named);
    args.extend(["-qmp", &ours_arg]);
    args.extend(our_drives.iter().map(String::as_str));
    let mut vmm = spawn_vmm(&args);

    let theirs_arg = format!("unix:{},server=on,wait=off", theirs.display());
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg"])
        .args(common)
        .args(common_named)
        .args(["-qmp", &theirs_arg])
        .args(&their_drives)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "qemu-system-x86_64 (Debian's qemu-system-x86) is required; scripts/test installs it",
        );
    wait_until("both monitor sockets", TIMEOUT, || {
        ours.exists() && theirs.exists()
    });

    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/compare_qemu.py"))
        .arg(&ours)
        .arg(&theirs)
        .arg(dir.path())
        .output()
        .unwrap();
    let _ = vmm.kill();
    let _ = qemu.kill();
    let _ = vmm.wait();
    let _ = qemu.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("SHAPES-OK"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
