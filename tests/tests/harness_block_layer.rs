//! The block layer through the harness: qcow2 disks on backing chains that qemu-img made,
//! query-block and query-blockstats against what the driver did, live snapshots
//! (blockdev-snapshot-sync) while writes go on, and resizing a qcow2 disk.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use vmm_tests::libqos::blk::{self, BlkDevice, BlkOptions, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN};
use vmm_tests::libqos::blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
use vmm_tests::libqos::virtqueue::{Buffer, GuestAlloc};
use vmm_tests::qmp::Qmp;
use vmm_tests::qtest::Qtest;
use vmm_tests::{qemu_img, TempDir};

const RAM: u64 = 128 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

/// A machine with one disk on queue 0 and QMP alongside.
struct Disk {
    qt: Qtest,
    qmp: Qmp<std::os::unix::net::UnixStream>,
    blk: BlkDevice,
    hdr: u64,
    status: u64,
    data: u64,
}

impl Disk {
    fn start(dir: &TempDir, drive: &str) -> Disk {
        Disk::start_with(dir, drive, &[])
    }

    fn start_with(dir: &TempDir, drive: &str, extra: &[&str]) -> Disk {
        let qmp_sock = dir.join("qmp.sock");
        let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
        let mut args = vec![
            "-drive",
            drive,
            "-device",
            "virtio-blk-pci,drive=d0,id=disk0",
            "-qmp",
            &qmp_arg,
        ];
        args.extend_from_slice(extra);
        let mut qt = Qtest::start("128M", &args).unwrap();
        let mut mem = GuestAlloc::for_ram(RAM);
        let blk = BlkDevice::init(&mut qt, RAM, &mut mem, BlkOptions::default())
            .unwrap_or_else(|e| panic!("{e}; vmm stderr:\n{}", qt.stderr()));
        let hdr = mem.alloc(16, 16).unwrap();
        let status = mem.alloc(1, 1).unwrap();
        let data = mem.alloc(1 << 20, 4096).unwrap();
        let qmp = Qmp::connect(&qmp_sock);
        Disk {
            qt,
            qmp,
            blk,
            hdr,
            status,
            data,
        }
    }

    fn request(&mut self, kind: u32, sector: u64, len: usize) -> u8 {
        self.qt
            .memwrite(self.hdr, &blk::header(kind, sector))
            .unwrap();
        self.qt.memset(self.status, 1, 0xff).unwrap();
        let mut chain = vec![Buffer::readable(self.hdr, 16)];
        if len > 0 {
            chain.push(if kind == VIRTIO_BLK_T_IN {
                Buffer::writable(self.data, len as u32)
            } else {
                Buffer::readable(self.data, len as u32)
            });
        }
        chain.push(Buffer::writable(self.status, 1));
        let vq = &mut self.blk.queues[0];
        vq.add_chain(&mut self.qt, &chain).unwrap();
        vq.kick(&mut self.qt).unwrap();
        blk::wait_used(&mut self.qt, vq, TIMEOUT).unwrap();
        self.qt.memread(self.status, 1).unwrap()[0]
    }

    fn write(&mut self, sector: u64, bytes: &[u8]) {
        self.qt.memwrite(self.data, bytes).unwrap();
        assert_eq!(
            self.request(VIRTIO_BLK_T_OUT, sector, bytes.len()),
            VIRTIO_BLK_S_OK
        );
    }

    fn read(&mut self, sector: u64, len: usize) -> Vec<u8> {
        assert_eq!(self.request(VIRTIO_BLK_T_IN, sector, len), VIRTIO_BLK_S_OK);
        self.qt.memread(self.data, len).unwrap()
    }

    fn flush(&mut self) {
        assert_eq!(self.request(VIRTIO_BLK_T_FLUSH, 0, 0), VIRTIO_BLK_S_OK);
    }

    fn qmp_ok(&mut self, command: &str, args: Value) -> Value {
        self.qmp.ok(command, Some(args))
    }

    fn qmp_err(&mut self, command: &str, args: Value) -> String {
        let reply = self.qmp.request(command, Some(args));
        reply["error"]["desc"]
            .as_str()
            .unwrap_or_else(|| panic!("{command} should fail: {reply}"))
            .to_string()
    }

    /// QMP quit (its SHUTDOWN event comes before the reply), and the vmm exits 0: every
    /// device process has flushed and stopped.
    fn quit(&mut self) {
        self.qmp.send("quit", None);
        assert!(self.qt.wait_exit(TIMEOUT).unwrap().success());
    }

    fn block_info(&mut self) -> Value {
        let list = self.qmp.ok("query-block", None);
        list.as_array()
            .and_then(|l| l.iter().find(|b| b["device"] == "d0").cloned())
            .expect("d0 in query-block")
    }
}

fn base_with_pattern(path: &Path) -> Vec<u8> {
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn a_qcow2_overlay_reads_its_backing_file_and_keeps_writes_to_itself() {
    let dir = TempDir::new("block-qcow2");
    let base = dir.join("base.raw");
    let base_data = base_with_pattern(&base);
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]);
    let drive = format!("file={},format=qcow2,if=none,id=d0", top.display());
    let mut d = Disk::start(&dir, &drive);
    assert_eq!(d.blk.capacity, (4 << 20) / 512);
    assert_eq!(d.read(8, 4096), base_data[4096..8192]);
    let mine = vec![0xa5u8; 65536];
    d.write(100, &mine);
    assert_eq!(d.read(100, 65536), mine);
    d.flush();

    let info = d.block_info();
    let inserted = &info["inserted"];
    assert_eq!(inserted["drv"], "qcow2");
    assert_eq!(inserted["file"], json!(top.display().to_string()));
    assert_eq!(inserted["backing_file_depth"], 1);
    assert!(
        inserted["backing_file"]
            .as_str()
            .is_some_and(|b| b.ends_with("base.raw")),
        "{inserted}"
    );
    assert_eq!(inserted["image"]["backing-image"]["format"], "raw");
    assert_eq!(inserted["encrypted"], false);

    d.quit();
    // The base is untouched; the overlay is a clean image with the guest's data.
    assert_eq!(std::fs::read(&base).unwrap(), base_data);
    qemu_img(&["check", "-q", "-f", "qcow2", top.to_str().unwrap()]);
    let mut expected = base_data.clone();
    expected[100 * 512..100 * 512 + 65536].copy_from_slice(&mine);
    let flat = dir.join("flat.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        top.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&flat).unwrap(), expected);
}

#[test]
fn query_blockstats_counts_what_the_driver_did() {
    let dir = TempDir::new("block-stats");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let drive = format!("file={},format=raw,if=none,id=d0", img.display());
    let mut d = Disk::start(&dir, &drive);
    d.write(0, &[1u8; 4096]);
    d.write(2048, &[2u8; 8192]);
    d.read(0, 4096);
    d.read(8, 512);
    d.read(16, 1024);
    d.flush();
    let all = d.qmp.ok("query-blockstats", None);
    let s = all
        .as_array()
        .and_then(|l| l.iter().find(|b| b["device"] == "d0"))
        .map(|b| b["stats"].clone())
        .expect("d0 in query-blockstats");
    assert_eq!(s["wr_operations"], 2, "{s}");
    assert_eq!(s["wr_bytes"], 4096 + 8192);
    assert_eq!(s["rd_operations"], 3);
    assert_eq!(s["rd_bytes"], 4096 + 512 + 1024);
    assert_eq!(s["flush_operations"], 1);
    assert_eq!(s["wr_highest_offset"], 2048 * 512 + 8192);
    assert!(s["wr_total_time_ns"].as_u64().unwrap_or(0) > 0);
    assert!(s["rd_total_time_ns"].as_u64().unwrap_or(0) > 0);
}

#[test]
fn a_live_snapshot_loses_no_write_and_shows_in_query_block() {
    let dir = TempDir::new("block-snapshot");
    let base = dir.join("disk.raw");
    std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
    let drive = format!("file={},format=raw,if=none,id=d0", base.display());
    let mut d = Disk::start(&dir, &drive);
    for i in 0..16u64 {
        d.write(i * 8, &[i as u8 + 1; 4096]);
    }
    // Bad snapshots change nothing.
    let text = dir.join("notes.txt");
    std::fs::write(&text, b"not an image").unwrap();
    let err = d.qmp_err(
        "blockdev-snapshot-sync",
        json!({"device": "d0", "snapshot-file": text.display().to_string()}),
    );
    assert!(err.contains("not an image"), "{err}");
    assert_eq!(std::fs::read(&text).unwrap(), b"not an image");
    let raw_snap = dir.join("snap.raw");
    let err = d.qmp_err(
        "blockdev-snapshot-sync",
        json!({"device": "d0", "snapshot-file": raw_snap.display().to_string(), "format": "raw"}),
    );
    assert!(err.contains("qcow2"), "{err}");
    assert!(!raw_snap.exists());
    let err = d.qmp_err(
        "blockdev-snapshot-sync",
        json!({"device": "nope", "snapshot-file": raw_snap.display().to_string()}),
    );
    assert_eq!(err, "Cannot find device='nope' nor node-name=''");

    let snap = dir.join("snap.qcow2");
    d.qmp_ok(
        "blockdev-snapshot-sync",
        json!({"device": "d0", "snapshot-file": snap.display().to_string(), "format": "qcow2"}),
    );
    // Writes after the switch go to the overlay; everything written before reads back.
    for i in 16..32u64 {
        d.write(i * 8, &[i as u8 + 1; 4096]);
    }
    for i in 0..32u64 {
        assert_eq!(d.read(i * 8, 4096), vec![i as u8 + 1; 4096], "block {i}");
    }
    let info = d.block_info();
    assert_eq!(info["inserted"]["file"], json!(snap.display().to_string()));
    assert_eq!(info["inserted"]["drv"], "qcow2");
    assert!(
        info["inserted"]["backing_file"]
            .as_str()
            .is_some_and(|b| b.ends_with("disk.raw")),
        "{info}"
    );
    d.flush();
    d.quit();

    // The base holds exactly the writes from before the snapshot.
    let base_now = std::fs::read(&base).unwrap();
    for i in 0..32u64 {
        let at = (i * 8 * 512) as usize;
        let want = if i < 16 { i as u8 + 1 } else { 0 };
        assert!(
            base_now[at..at + 4096].iter().all(|b| *b == want),
            "base block {i}"
        );
    }
    qemu_img(&["check", "-q", "-f", "qcow2", snap.to_str().unwrap()]);
    let chain = qemu_img(&["info", "--backing-chain", snap.to_str().unwrap()]);
    assert!(chain.contains("disk.raw"), "{chain}");
}

#[test]
fn a_qcow2_disk_grows_live() {
    let dir = TempDir::new("block-grow");
    let img = dir.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    let drive = format!("file={},format=qcow2,if=none,id=d0", img.display());
    let mut d = Disk::start(&dir, &drive);
    d.qmp_ok("block_resize", json!({"device": "d0", "size": 16 << 20}));
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let capacity = d.blk.dev.config_readq(&mut d.qt, 0).unwrap();
        if capacity == (16 << 20) / 512 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "capacity {capacity}");
        std::thread::sleep(Duration::from_millis(10));
    }
    d.write((12 << 20) / 512, &[7u8; 4096]);
    assert_eq!(d.read((12 << 20) / 512, 4096), vec![7u8; 4096]);
    let info = d.block_info();
    assert_eq!(info["inserted"]["image"]["virtual-size"], 16 << 20);
    d.quit();
    qemu_img(&["check", "-q", "-f", "qcow2", img.to_str().unwrap()]);
}

/// Completed writes to a qcow2 disk survive a kill -9 of its process: the format's metadata
/// reached the file before each write completed, and the restarted process finds it.
#[test]
fn qcow2_writes_survive_a_killed_process() {
    let dir = TempDir::new("block-qcow2-kill");
    let img = dir.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let drive = format!("file={},format=qcow2,if=none,id=d0", img.display());
    let mut d = Disk::start(&dir, &drive);
    for i in 0..32u64 {
        // Scattered, so that most writes allocate a cluster.
        d.write(i * 256, &[i as u8 + 1; 4096]);
    }
    let procs = d.qmp_ok("__org.vmm_query-device-processes", json!({}));
    let pid = procs[0]["pid"].as_u64().expect("a pid");
    // SAFETY: kill(2) on a pid we were told about; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let procs = d.qmp_ok("__org.vmm_query-device-processes", json!({}));
        if procs[0]["restarts"] == 1 && procs[0]["state"] == "running" {
            assert_ne!(procs[0]["pid"].as_u64(), Some(pid));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no restart: {procs}");
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..32u64 {
        assert_eq!(d.read(i * 256, 4096), vec![i as u8 + 1; 4096], "block {i}");
    }
    d.quit();
    qemu_img(&["check", "-q", "-f", "qcow2", img.to_str().unwrap()]);
}

/// An image that management opened and passed (`-add-fd`, `file=/dev/fdset/N`) is served
/// without the vmm ever opening its path: here the path is gone before the vmm starts.
#[test]
fn an_image_passed_as_a_descriptor_is_never_opened_by_path() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let dir = TempDir::new("block-fdset");
    let path = dir.join("disk.raw");
    std::fs::write(&path, vec![0x11u8; 1 << 20]).unwrap();
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    let fd = image.as_raw_fd();
    // Let the vmm inherit it (std opens files close-on-exec).
    // SAFETY: clearing FD_CLOEXEC on a descriptor this test owns.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let add_fd = format!("fd={fd},set=3");
    let mut d = Disk::start_with(
        &dir,
        "file=/dev/fdset/3,format=raw,if=none,id=d0",
        &["-add-fd", &add_fd],
    );
    assert_eq!(d.read(0, 512), vec![0x11u8; 512]);
    d.write(16, &[0x22u8; 4096]);
    d.flush();
    let mut back = vec![0u8; 4096];
    image.read_exact_at(&mut back, 16 * 512).unwrap();
    assert_eq!(back, vec![0x22u8; 4096]);
    let info = d.block_info();
    assert_eq!(info["inserted"]["file"], "/dev/fdset/3");
    // A snapshot needs a name for its backing file: refused, nothing changes.
    let err = d.qmp_err(
        "blockdev-snapshot-sync",
        json!({"device": "d0", "snapshot-file": dir.join("s.qcow2").display().to_string()}),
    );
    assert!(err.contains("file descriptor"), "{err}");
    d.quit();
}

/// system_reset puts the disk back to its power-on state (status 0, queues stopped); a
/// driver that sets it up again finds the data.
#[test]
fn a_system_reset_resets_the_disk_and_it_works_again() {
    let dir = TempDir::new("block-reset");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("file={},format=raw,if=none,id=d0", img.display());
    let mut d = Disk::start(&dir, &drive);
    d.write(8, &[0x77u8; 4096]);
    d.qmp_ok("system_reset", json!({}));
    assert_eq!(
        d.blk.dev.status(&mut d.qt).unwrap(),
        0,
        "device status after reset"
    );
    let mut mem = GuestAlloc::for_ram(RAM);
    // Fresh rings elsewhere in guest memory, as a rebooted guest would allocate.
    mem.alloc(32 << 20, 4096).unwrap();
    d.blk = BlkDevice::init(&mut d.qt, RAM, &mut mem, BlkOptions::default()).unwrap();
    d.hdr = mem.alloc(16, 16).unwrap();
    d.status = mem.alloc(1, 1).unwrap();
    d.data = mem.alloc(1 << 20, 4096).unwrap();
    assert_eq!(d.read(8, 4096), vec![0x77u8; 4096]);
    d.quit();
}

/// A snapshot into a file that management created and passed with getfd
/// (`snapshot-file: "fd:NAME"`): the vmm writes the overlay through the descriptor.
#[test]
fn a_snapshot_into_a_descriptor_passed_with_getfd() {
    use std::os::fd::AsRawFd;
    let dir = TempDir::new("block-getfd");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("file={},format=raw,if=none,id=d0", img.display());
    let mut d = Disk::start(&dir, &drive);
    d.write(0, &[1u8; 4096]);
    let snap = dir.join("snap.qcow2");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&snap)
        .unwrap();
    d.qmp
        .send_with_fd("getfd", Some(json!({"fdname": "snapfd"})), file.as_raw_fd());
    assert_eq!(d.qmp.message(), json!({"return": {}}));
    let err = d.qmp_err(
        "blockdev-snapshot-sync",
        json!({"device": "d0", "snapshot-file": "fd:nosuch"}),
    );
    assert_eq!(err, "File descriptor named 'nosuch' has not been found");
    d.qmp_ok(
        "blockdev-snapshot-sync",
        json!({"device": "d0", "snapshot-file": "fd:snapfd"}),
    );
    d.write(8, &[2u8; 4096]);
    assert_eq!(d.read(0, 4096), vec![1u8; 4096]);
    d.flush();
    d.quit();
    // Our copy shares the open file description, and with it the vmm's image locks.
    drop(file);
    let chain = qemu_img(&["info", "--backing-chain", snap.to_str().unwrap()]);
    assert!(chain.contains("disk.raw"), "{chain}");
    qemu_img(&["check", "-q", "-f", "qcow2", snap.to_str().unwrap()]);
}

/// Resizing a read-only disk is refused, and the image stays as it was.
#[test]
fn a_read_only_disk_refuses_a_resize() {
    let dir = TempDir::new("block-ro-resize");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let drive = format!(
        "file={},format=raw,if=none,id=d0,readonly=on",
        img.display()
    );
    let mut d = Disk::start(&dir, &drive);
    let err = d.qmp_err("block_resize", json!({"device": "d0", "size": 4 << 20}));
    assert!(err.contains("read-only"), "{err}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    d.quit();
}

/// An encrypted (legacy AES) qcow2 refuses I/O until block_passwd gives its key; then the
/// driver reads what qemu-io wrote. A non-removable disk refuses eject.
#[test]
fn block_passwd_unlocks_an_encrypted_disk() {
    let dir = TempDir::new("block-passwd");
    let img = dir.join("secret.qcow2");
    let img_s = img.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=pw",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s0",
        img_s,
        "4M",
    ]);
    let opts =
        format!("driver=qcow2,file.filename={img_s},encrypt.format=aes,encrypt.key-secret=s0");
    let out = Command::new("qemu-io")
        .args([
            "--object",
            "secret,id=s0,data=pw",
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x5a 0 64k",
        ])
        .output()
        .expect("qemu-io");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drive = format!("file={img_s},format=qcow2,if=none,id=d0");
    let mut d = Disk::start(&dir, &drive);
    assert_eq!(d.block_info()["inserted"]["encrypted"], true);
    assert_eq!(
        d.request(VIRTIO_BLK_T_IN, 0, 512),
        blk::VIRTIO_BLK_S_IOERR,
        "locked"
    );
    let err = d.qmp_err("eject", json!({"device": "d0"}));
    assert_eq!(err, "Device 'd0' is not removable");
    let unknown = d.qmp.request(
        "block_passwd",
        Some(json!({"device": "x", "password": "pw"})),
    );
    assert_eq!(unknown["error"]["class"], "DeviceNotFound", "{unknown}");
    d.qmp_ok("block_passwd", json!({"device": "d0", "password": "pw"}));
    assert_eq!(d.read(0, 512), vec![0x5a; 512]);
    d.quit();
}

/// block_passwd on a disk that is not encrypted gets QEMU's error, and the disk serves on.
#[test]
fn block_passwd_on_a_plain_disk_is_refused() {
    let dir = TempDir::new("passwd-plain");
    let img = dir.join("plain.raw");
    std::fs::write(&img, vec![0x11u8; 1 << 20]).unwrap();
    let drive = format!("file={},format=raw,if=none,id=d0", img.display());
    let mut d = Disk::start(&dir, &drive);
    assert_eq!(d.block_info()["inserted"]["encrypted"], false);
    let err = d.qmp_err("block_passwd", json!({"device": "d0", "password": "pw"}));
    assert_eq!(err, "Device 'd0' is not encrypted");
    assert_eq!(d.read(0, 512), vec![0x11; 512]);
    d.quit();
}
