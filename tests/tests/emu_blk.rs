//! End to end under emu: the stock guest finds virtio-blk disks served by `vmm-blk`
//! processes, reads known content, makes and fills a filesystem, and powers off; the host
//! then finds the image's filesystem clean with the guest's file in it. A second, read-only
//! disk refuses writes.

use std::process::Command;
use std::time::Duration;

use vmm_tests::console::GuestConsole;
use vmm_tests::TempDir;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(120);
const PATTERN: &str = "vmm-blk-known-content-0123456789";
const DISK_SIZE: u64 = 64 << 20;

fn image_with_pattern(path: &std::path::Path) {
    let mut data = vec![0u8; DISK_SIZE as usize];
    data[1 << 20..(1 << 20) + PATTERN.len()].copy_from_slice(PATTERN.as_bytes());
    std::fs::write(path, data).unwrap();
}

#[test]
fn guest_makes_a_filesystem_on_a_vmm_blk_disk() {
    let dir = TempDir::new("emu-blk");
    let disk = dir.join("disk.img");
    let ro = dir.join("ro.img");
    image_with_pattern(&disk);
    image_with_pattern(&ro);
    // The if=virtio shorthand for the first disk (vda), -drive if=none plus -device for the
    // read-only second one (vdb): drives' own devices are created first.
    let drive = format!("file={},format=raw,if=virtio,serial=SER123", disk.display());
    let ro_drive = format!(
        "file={},format=raw,if=none,id=ro0,readonly=on",
        ro.display()
    );
    let mut console = GuestConsole::boot_stock_linux(&[
        "-drive",
        &drive,
        "-drive",
        &ro_drive,
        "-device",
        "virtio-blk-pci,drive=ro0,id=disk1",
    ]);
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);

    let size = console.run("cat /sys/block/vda/size", CMD_TIMEOUT);
    assert!(
        size.lines()
            .any(|l| l.trim() == (DISK_SIZE / 512).to_string()),
        "/sys/block/vda/size: {size:?}"
    );
    let serial = console.run("cat /sys/block/vda/serial; echo", CMD_TIMEOUT);
    assert!(serial.contains("SER123"), "serial: {serial:?}");
    let read = console.run(
        "dd if=/dev/vda bs=1M skip=1 count=1 2>/dev/null | head -c 32; echo",
        CMD_TIMEOUT,
    );
    assert!(read.contains(PATTERN), "read back: {read:?}");

    let ro_flag = console.run("cat /sys/block/vdb/ro", CMD_TIMEOUT);
    assert!(
        ro_flag.lines().any(|l| l.trim() == "1"),
        "vdb ro: {ro_flag:?}"
    );
    let ro_write = console.run(
        "dd if=/dev/zero of=/dev/vdb bs=512 count=1 seek=2048 2>&1; echo rc=$?",
        CMD_TIMEOUT,
    );
    assert!(
        !ro_write.contains("rc=0"),
        "a write to the read-only disk succeeded: {ro_write:?}"
    );

    let mkfs = console.run("mke2fs -q /dev/vda; echo rc=$?", CMD_TIMEOUT);
    assert!(mkfs.contains("rc=0"), "mke2fs: {mkfs:?}");
    let mount = console.run(
        "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo hello-from-guest > /mnt/file \
         && sync && umount /mnt; echo rc=$?",
        CMD_TIMEOUT,
    );
    assert!(mount.contains("rc=0"), "mount/write/umount: {mount:?}");
    console.send("poweroff -f\n");
    assert_eq!(console.wait_exit(CMD_TIMEOUT), Some(0));

    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /file"])
        .arg(&disk)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout).trim(),
        "hello-from-guest"
    );
    // The read-only image is untouched.
    let ro_data = std::fs::read(&ro).unwrap();
    assert_eq!(
        &ro_data[1 << 20..(1 << 20) + PATTERN.len()],
        PATTERN.as_bytes()
    );
}
