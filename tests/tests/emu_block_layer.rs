//! The block layer end to end under emu, in one boot of the stock guest: query-blockstats
//! counts the guest's direct I/O exactly; a qcow2 disk that qemu-img made gets a file system; a live snapshot is taken while the guest writes files
//! in a loop, and the checksums the guest took before show that no write was lost; a live
//! resize shows in /sys/block/vda/size; `qemu-img check` is clean on both images afterwards.

use std::time::Duration;

use serde_json::json;
use vmm_tests::console::GuestConsole;
use vmm_tests::qmp::Qmp;
use vmm_tests::{qemu_img, TempDir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(300);

fn vda_stats(qmp: &mut Qmp<std::os::unix::net::UnixStream>) -> serde_json::Value {
    qmp.ok("query-blockstats", None)[0]["stats"].clone()
}

#[test]
fn qcow2_snapshot_and_resize_with_a_live_guest() {
    let dir = TempDir::new("emu-block-layer");
    let disk = dir.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "64M"]);
    let snap = dir.join("snap.qcow2");
    let qmp_sock = dir.join("qmp.sock");
    let drive = format!("file={},format=qcow2,if=virtio", disk.display());
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let mut console = GuestConsole::boot_stock_linux(&["-drive", &drive, "-qmp", &qmp_arg]);
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);
    let mut qmp = Qmp::connect(&qmp_sock);

    // query-blockstats against what the guest did, with direct I/O so that its page cache
    // neither adds nor hides requests.
    let before = vda_stats(&mut qmp);
    let dd = console.run(
        "dd if=/dev/vda of=/dev/null bs=64k count=32 iflag=direct 2>/dev/null; \
         dd if=/dev/zero of=/dev/vda bs=64k count=16 seek=100 oflag=direct 2>/dev/null; \
         echo rc=$?",
        CMD_TIMEOUT,
    );
    assert!(dd.contains("rc=0"), "{dd}");
    let after = vda_stats(&mut qmp);
    let delta = |k: &str| after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
    assert_eq!(delta("wr_bytes"), 16 * 65536, "{after}");
    assert!(delta("rd_bytes") >= 32 * 65536, "{after}");
    assert!(
        delta("rd_bytes") < 40 * 65536,
        "reads beyond the guest's: {after}"
    );
    assert_eq!(
        after["wr_highest_offset"].as_u64(),
        Some(116 * 65536),
        "{after}"
    );

    let mkfs = console.run(
        "mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt; echo rc=$?",
        CMD_TIMEOUT,
    );
    assert!(mkfs.contains("rc=0"), "{mkfs}");
    // A writer in the background: 100 files of random data, each checksummed as written.
    // It says when it has written a few (the echoed command line does not contain the
    // computed marker), and the snapshot comes then, while most are still to be written.
    console.send(
        "(i=0; while [ $i -lt 100 ]; do dd if=/dev/urandom of=/mnt/f$i bs=16k count=4 \
         2>/dev/null; sha256sum /mnt/f$i >> /mnt/sums; sync; \
         [ $i -eq 3 ] && echo WRITING-$((i*1)); i=$((i+1)); done; \
         echo WRITER-$((100+2))) &\n",
    );
    console.wait_for("WRITING-3", CMD_TIMEOUT);
    qmp.ok(
        "blockdev-snapshot-sync",
        Some(json!({"device": "virtio0", "snapshot-file": snap.display().to_string()})),
    );
    assert!(
        !console.transcript().contains("WRITER-102"),
        "the writer finished before the snapshot: make it write more"
    );
    // The console echoes the command line: wait for the computed marker, then the job.
    console.wait_for("WRITER-102", CMD_TIMEOUT);
    console.run("wait", CMD_TIMEOUT);
    // Unmounting drops the page cache: the checksums are checked against the disk.
    let check = console.run(
        "umount /mnt && mount -t ext4 /dev/vda /mnt && wc -l < /mnt/sums && \
         sha256sum -c /mnt/sums | grep -c ': OK'; echo rc=$?",
        CMD_TIMEOUT,
    );
    let counts: Vec<&str> = check
        .lines()
        .map(str::trim)
        .filter(|l| *l == "100")
        .collect();
    assert_eq!(counts.len(), 2, "100 sums, 100 OK: {check}");

    qmp.ok(
        "block_resize",
        Some(json!({"device": "virtio0", "size": 128 << 20})),
    );
    let size = console.run("sleep 1; cat /sys/block/vda/size", CMD_TIMEOUT);
    assert!(
        size.lines()
            .any(|l| l.trim() == ((128u64 << 20) / 512).to_string()),
        "after the resize: {size}"
    );
    let info = qmp.ok("query-block", None);
    assert_eq!(
        info[0]["inserted"]["file"],
        json!(snap.display().to_string())
    );

    let umount = console.run("umount /mnt; echo rc=$?", CMD_TIMEOUT);
    assert!(umount.contains("rc=0"), "{umount}");
    console.send("poweroff -f\n");
    assert_eq!(console.wait_exit(CMD_TIMEOUT), Some(0));
    qemu_img(&["check", "-q", "-f", "qcow2", disk.to_str().unwrap()]);
    qemu_img(&["check", "-q", "-f", "qcow2", snap.to_str().unwrap()]);
    let chain = qemu_img(&["info", "--backing-chain", snap.to_str().unwrap()]);
    assert!(chain.contains("disk.qcow2"), "{chain}");
}
