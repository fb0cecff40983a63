//! vhost-user-blk interop in both directions, each with the stock guest:
//! - QEMU 7.2 (TCG) as the frontend to a standalone `vmm-blk`;
//! - our vmm (emu) as the frontend to `qemu-storage-daemon --export type=vhost-user-blk`.
//!
//! In each, the guest reads known content from /dev/vda and writes new content, and the
//! host finds the write in the image after the guest powered off.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vmm_tests::console::GuestConsole;
use vmm_tests::{repo_root, wait_until, workspace_binary, TempDir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(120);
const PATTERN: &str = "interop-known-content-abcdef";
const WRITTEN: &str = "written-by-the-guest-0042";

fn image(path: &Path) {
    let mut data = vec![0u8; 32 << 20];
    data[1 << 20..(1 << 20) + PATTERN.len()].copy_from_slice(PATTERN.as_bytes());
    std::fs::write(path, data).unwrap();
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Read the pattern, write ours two MiB in, sync, power off.
fn exercise_disk(console: &mut GuestConsole) {
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);
    let read = console.run(
        "dd if=/dev/vda bs=1M skip=1 count=1 2>/dev/null | head -c 28; echo",
        CMD_TIMEOUT,
    );
    assert!(read.contains(PATTERN), "read back: {read:?}");
    let write = console.run(
        &format!(
            "printf {WRITTEN} | dd of=/dev/vda bs=1M seek=2 conv=fsync 2>/dev/null; echo rc=$?"
        ),
        CMD_TIMEOUT,
    );
    assert!(write.contains("rc=0"), "write: {write:?}");
    console.send("poweroff -f\n");
    assert!(
        console.wait_exit(CMD_TIMEOUT).is_some(),
        "the emulator did not exit"
    );
}

fn assert_written(path: &Path) {
    let data = std::fs::read(path).unwrap();
    assert_eq!(
        &data[2 << 20..(2 << 20) + WRITTEN.len()],
        WRITTEN.as_bytes(),
        "the guest's write is not in the image"
    );
}

fn guest_files() -> (String, String) {
    let guest = repo_root().join("target/guest");
    let kernel = guest.join("vmlinuz");
    let initrd = guest.join("initramfs.img");
    assert!(
        kernel.exists() && initrd.exists(),
        "run scripts/guest-assets"
    );
    (
        kernel.to_string_lossy().into_owned(),
        initrd.to_string_lossy().into_owned(),
    )
}

#[test]
fn qemu_boots_with_a_standalone_vmm_blk() {
    let (kernel, initrd) = guest_files();
    let dir = TempDir::new("blk-interop-qemu");
    let disk = dir.join("disk.img");
    image(&disk);
    let sock = dir.join("vu.sock");
    let _daemon = Killed(
        Command::new(workspace_binary("vmm-blk"))
            .arg("--socket")
            .arg(&sock)
            .arg("--image")
            .arg(&disk)
            .stdin(Stdio::null())
            .spawn()
            .expect("start vmm-blk"),
    );
    wait_until("vmm-blk's socket", Duration::from_secs(10), || {
        sock.exists()
    });
    let chardev = format!("socket,id=vu,path={}", sock.display());
    let mut console = GuestConsole::spawn_program(
        Path::new("qemu-system-x86_64"),
        &[
            "-accel",
            "tcg",
            "-m",
            "512",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-kernel",
            &kernel,
            "-initrd",
            &initrd,
            "-append",
            "console=ttyS0",
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa",
            "node,memdev=mem",
            "-chardev",
            &chardev,
            "-device",
            "vhost-user-blk-pci,chardev=vu",
        ],
    );
    exercise_disk(&mut console);
    assert_written(&disk);
}

#[test]
fn our_vmm_uses_qemu_storage_daemon() {
    let dir = TempDir::new("blk-interop-qsd");
    let disk = dir.join("disk.img");
    image(&disk);
    let sock = dir.join("qsd.sock");
    let _daemon = Killed(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                disk.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("start qemu-storage-daemon (Debian qemu-system-common)"),
    );
    wait_until(
        "qemu-storage-daemon's socket",
        Duration::from_secs(10),
        || sock.exists(),
    );
    let chardev = format!("socket,id=vu,path={}", sock.display());
    let mut console = GuestConsole::boot_stock_linux(&[
        "-chardev",
        &chardev,
        "-device",
        "vhost-user-blk-pci,chardev=vu,id=vu0",
    ]);
    exercise_disk(&mut console);
    assert_written(&disk);
}
