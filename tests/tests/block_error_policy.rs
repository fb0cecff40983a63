//! I/O error policies through the harness, with errors injected by vmm-blk's test hook
//! (`VMM_BLK_TEST_FAIL_WRITES=enospc:1`: the first guest write fails with ENOSPC; the vmm
//! passes its environment on). `werror=stop` holds the write, emits BLOCK_IO_ERROR, stops
//! the VM in the io-error state with io-status `nospace`, and `cont` carries the write out;
//! `werror=report` fails it with an I/O error status; `werror=ignore` completes it; with EIO
//! (`eio:1`) `werror=stop` shows io-status `failed`, and `rerror=stop` does the same for a
//! read (`VMM_BLK_TEST_FAIL_READS`).
//! This binary holds only this test, since the hook is set in the environment.

use std::time::Duration;

use serde_json::Value;
use vmm_tests::libqos::blk::VIRTIO_BLK_S_OK;
use vmm_tests::libqos::blk::{
    self, BlkDevice, BlkOptions, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vmm_tests::libqos::virtqueue::{Buffer, GuestAlloc};
use vmm_tests::qmp::Qmp;
use vmm_tests::qtest::Qtest;
use vmm_tests::TempDir;

const RAM: u64 = 128 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

struct Rig {
    qt: Qtest,
    qmp: Qmp<std::os::unix::net::UnixStream>,
    blk: BlkDevice,
    hdr: u64,
    status: u64,
    data: u64,
    img: std::path::PathBuf,
    _dir: TempDir,
}

fn start(werror: &str) -> Rig {
    start_with(&format!("werror={werror}"))
}

/// A rig whose drive has the given policy options (`werror=...,rerror=...`).
fn start_with(policy: &str) -> Rig {
    let dir = TempDir::new("error-policy");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let qmp_sock = dir.join("qmp.sock");
    let drive = format!("file={},format=raw,if=none,id=d0,{policy}", img.display());
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let mut qt = Qtest::start(
        "128M",
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0",
            "-qmp",
            &qmp_arg,
        ],
    )
    .unwrap();
    let mut mem = GuestAlloc::for_ram(RAM);
    let blk = BlkDevice::init(&mut qt, RAM, &mut mem, BlkOptions::default()).unwrap();
    let qmp = Qmp::connect(&qmp_sock);
    Rig {
        qt,
        qmp,
        blk,
        hdr: mem.alloc(16, 16).unwrap(),
        status: mem.alloc(1, 1).unwrap(),
        data: mem.alloc(4096, 4096).unwrap(),
        img,
        _dir: dir,
    }
}

impl Rig {
    /// Queue and kick a 4 KiB write of `byte` at sector 8.
    fn submit_write(&mut self, byte: u8) {
        self.qt.memwrite(self.data, &[byte; 4096]).unwrap();
        self.submit(VIRTIO_BLK_T_OUT, Buffer::readable(self.data, 4096));
    }

    /// Queue and kick a 4 KiB read at sector 8.
    fn submit_read(&mut self) {
        self.submit(VIRTIO_BLK_T_IN, Buffer::writable(self.data, 4096));
    }

    /// Queue and kick a request of `kind` at sector 8 with its data buffer.
    fn submit(&mut self, kind: u32, data: Buffer) {
        self.qt.memwrite(self.hdr, &blk::header(kind, 8)).unwrap();
        self.qt.memset(self.status, 1, 0xff).unwrap();
        let vq = &mut self.blk.queues[0];
        vq.add_chain(
            &mut self.qt,
            &[
                Buffer::readable(self.hdr, 16),
                data,
                Buffer::writable(self.status, 1),
            ],
        )
        .unwrap();
        vq.kick(&mut self.qt).unwrap();
    }

    fn wait_status(&mut self) -> u8 {
        blk::wait_used(&mut self.qt, &mut self.blk.queues[0], TIMEOUT).unwrap();
        self.qt.memread(self.status, 1).unwrap()[0]
    }

    fn image_byte(&self) -> u8 {
        std::fs::read(&self.img).unwrap()[8 * 512]
    }

    fn event(&mut self, name: &str) -> Value {
        self.qmp.wait_event(name)
    }
}

#[test]
fn error_policies_stop_report_and_ignore() {
    std::env::set_var("VMM_BLK_TEST_FAIL_WRITES", "enospc:1");

    // stop: held, the VM stops, cont carries the write out.
    let mut r = start("stop");
    r.submit_write(0xab);
    let e = r.event("BLOCK_IO_ERROR");
    assert_eq!(e["data"]["device"], "d0", "{e}");
    assert_eq!(e["data"]["operation"], "write");
    assert_eq!(e["data"]["action"], "stop");
    assert_eq!(e["data"]["nospace"], true);
    r.event("STOP");
    let status = r.qmp.ok("query-status", None);
    assert_eq!(status["status"], "io-error", "{status}");
    let info = r.qmp.ok("query-block", None);
    assert_eq!(info[0]["io-status"], "nospace", "{info}");
    // Held: no completion while stopped.
    std::thread::sleep(Duration::from_millis(300));
    assert!(r.blk.queues[0].pop_used(&mut r.qt).unwrap().is_none());
    r.qmp.ok("cont", None);
    assert_eq!(r.wait_status(), VIRTIO_BLK_S_OK);
    assert_eq!(r.image_byte(), 0xab);
    let info = r.qmp.ok("query-block", None);
    assert_eq!(info[0]["io-status"], "ok", "{info}");
    assert_eq!(r.qmp.ok("query-status", None)["status"], "running");
    drop(r);

    // report: an error status, the event, and the VM runs on.
    let mut r = start("report");
    r.submit_write(0xcd);
    assert_eq!(r.wait_status(), VIRTIO_BLK_S_IOERR);
    let e = r.event("BLOCK_IO_ERROR");
    assert_eq!(e["data"]["action"], "report", "{e}");
    assert_eq!(r.qmp.ok("query-status", None)["status"], "running");
    assert_eq!(r.image_byte(), 0);
    drop(r);

    // ignore: the guest hears of success.
    let mut r = start("ignore");
    r.submit_write(0xef);
    assert_eq!(r.wait_status(), VIRTIO_BLK_S_OK);
    let e = r.event("BLOCK_IO_ERROR");
    assert_eq!(e["data"]["action"], "ignore", "{e}");
    assert_eq!(r.qmp.ok("query-status", None)["status"], "running");
    drop(r);

    // stop on an error other than ENOSPC: io-status `failed`, and cont retries the write.
    std::env::set_var("VMM_BLK_TEST_FAIL_WRITES", "eio:1");
    let mut r = start("stop");
    r.submit_write(0x5a);
    let e = r.event("BLOCK_IO_ERROR");
    assert_eq!(e["data"]["action"], "stop", "{e}");
    assert_ne!(e["data"]["nospace"], true, "{e}");
    r.event("STOP");
    assert_eq!(r.qmp.ok("query-status", None)["status"], "io-error");
    let info = r.qmp.ok("query-block", None);
    assert_eq!(info[0]["io-status"], "failed", "{info}");
    r.qmp.ok("cont", None);
    assert_eq!(r.wait_status(), VIRTIO_BLK_S_OK);
    assert_eq!(r.image_byte(), 0x5a);
    let info = r.qmp.ok("query-block", None);
    assert_eq!(info[0]["io-status"], "ok", "{info}");
    drop(r);

    // rerror=stop: a failing read stops the VM the same way, and cont reads the disk.
    std::env::remove_var("VMM_BLK_TEST_FAIL_WRITES");
    std::env::set_var("VMM_BLK_TEST_FAIL_READS", "eio:1");
    let mut r = start_with("rerror=stop");
    r.submit_read();
    let e = r.event("BLOCK_IO_ERROR");
    assert_eq!(e["data"]["operation"], "read", "{e}");
    assert_eq!(e["data"]["action"], "stop", "{e}");
    r.event("STOP");
    assert_eq!(r.qmp.ok("query-status", None)["status"], "io-error");
    let info = r.qmp.ok("query-block", None);
    assert_eq!(info[0]["io-status"], "failed", "{info}");
    r.qmp.ok("cont", None);
    assert_eq!(r.wait_status(), VIRTIO_BLK_S_OK);
    assert_eq!(r.qmp.ok("query-status", None)["status"], "running");
}
