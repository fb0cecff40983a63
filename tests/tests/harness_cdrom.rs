//! The CD-ROM through the harness: a virtio-scsi controller (vmm-scsi) driven by a small
//! SCSI initiator over libqos, against QMP eject and change. Each command's effect on the
//! medium is checked the way a guest sees it: TEST UNIT READY's sense, READ(10)'s data.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use vmm_tests::libqos::blk;
use vmm_tests::libqos::pci::{self, BarAllocator};
use vmm_tests::libqos::virtio::{VirtioPciDevice, VIRTIO_F_VERSION_1};
use vmm_tests::libqos::virtqueue::{Buffer, GuestAlloc, Virtqueue};
use vmm_tests::qmp::Qmp;
use vmm_tests::qtest::Qtest;
use vmm_tests::TempDir;

const RAM: u64 = 128 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);
const REQ_LEN: u32 = 51; // struct virtio_scsi_cmd_req with a 32-byte CDB
const RESP_LEN: u32 = 108; // struct virtio_scsi_cmd_resp with 96 bytes of sense
const GOOD: u8 = 0;
const CHECK_CONDITION: u8 = 2;

/// An ISO 9660 image whose file holds `text`.
fn iso(dir: &TempDir, name: &str, text: &str) -> String {
    let src = dir.join(&format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), text).unwrap();
    let out = dir.join(&format!("{name}.iso"));
    let ok = Command::new("genisoimage")
        .args(["-quiet", "-V", name, "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("genisoimage")
        .success();
    assert!(ok);
    out.display().to_string()
}

struct Initiator {
    qt: Qtest,
    qmp: Qmp<std::os::unix::net::UnixStream>,
    requests: Virtqueue,
    req: u64,
    resp: u64,
    data: u64,
    _dir: TempDir,
}

impl Initiator {
    /// Run `cdb` on target 0 LUN 0; returns (SCSI status, sense key, ASC, data read).
    fn command(&mut self, cdb: &[u8], read_len: u32) -> (u8, u8, u8, Vec<u8>) {
        let mut req = vec![0u8; REQ_LEN as usize];
        req[0] = 1; // lun[0] = 1, lun[1] = target 0, lun[2..4] = LUN 0
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        self.qt.memwrite(self.req, &req).unwrap();
        self.qt.memset(self.resp, RESP_LEN as usize, 0xff).unwrap();
        let mut chain = vec![
            Buffer::readable(self.req, REQ_LEN),
            Buffer::writable(self.resp, RESP_LEN),
        ];
        if read_len > 0 {
            chain.push(Buffer::writable(self.data, read_len));
        }
        self.requests.add_chain(&mut self.qt, &chain).unwrap();
        self.requests.kick(&mut self.qt).unwrap();
        blk::wait_used(&mut self.qt, &mut self.requests, TIMEOUT).unwrap();
        let resp = self.qt.memread(self.resp, RESP_LEN as usize).unwrap();
        let status = resp[10];
        let (key, asc) = if status == CHECK_CONDITION {
            (resp[12 + 2] & 0x0f, resp[12 + 12])
        } else {
            (0, 0)
        };
        let data = if read_len > 0 {
            self.qt.memread(self.data, read_len as usize).unwrap()
        } else {
            Vec::new()
        };
        (status, key, asc, data)
    }

    /// TEST UNIT READY until it stops reporting unit attentions; its last (status, key, asc).
    fn settle(&mut self) -> (u8, u8, u8) {
        for _ in 0..8 {
            let (s, k, a, _) = self.command(&[0x00; 6], 0);
            if !(s == CHECK_CONDITION && k == 6) {
                return (s, k, a);
            }
        }
        panic!("unit attentions do not end");
    }

    /// The primary volume descriptor (sector 16, 2048 bytes) holds "CD001" and the label.
    fn volume_label(&mut self) -> String {
        let cdb = [0x28, 0, 0, 0, 0, 16, 0, 0, 1, 0];
        let (s, _, _, data) = self.command(&cdb, 2048);
        assert_eq!(s, GOOD, "READ(10)");
        assert_eq!(&data[1..6], b"CD001");
        String::from_utf8_lossy(&data[40..72]).trim().to_string()
    }

    fn cd(&mut self) -> Value {
        self.qmp
            .ok("query-block", None)
            .as_array()
            .and_then(|l| l.iter().find(|b| b["device"] == "cd0").cloned())
            .expect("cd0")
    }
}

fn start(dir: TempDir, iso: &str) -> Initiator {
    let qmp_sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let drive = format!("file={iso},if=none,id=cd0,media=cdrom,format=raw");
    let mut qt = Qtest::start(
        "128M",
        &[
            "-device",
            "virtio-scsi-pci,id=scsi0",
            "-drive",
            &drive,
            "-device",
            "scsi-cd,drive=cd0,id=cdrom0",
            "-qmp",
            &qmp_arg,
        ],
    )
    .unwrap();
    let f = pci::enumerate_bus0(&mut qt)
        .unwrap()
        .into_iter()
        .find(|f| f.vendor_id == 0x1af4 && f.device_id == 0x1048)
        .expect("a virtio-scsi function");
    let mut bars = BarAllocator::for_ram(RAM);
    let mut dev = VirtioPciDevice::new(&mut qt, f, Some(&mut bars)).unwrap();
    dev.negotiate(&mut qt, VIRTIO_F_VERSION_1).unwrap();
    dev.enable_msix(&mut qt, 0x4060).unwrap();
    let mut mem = GuestAlloc::for_ram(RAM);
    // Queues: control, event, then the request queue.
    let _control = dev.setup_queue(&mut qt, &mut mem, 0, 64, Some(1)).unwrap();
    let _event = dev.setup_queue(&mut qt, &mut mem, 1, 64, Some(2)).unwrap();
    let requests = dev.setup_queue(&mut qt, &mut mem, 2, 64, Some(3)).unwrap();
    dev.driver_ok(&mut qt).unwrap();
    let qmp = Qmp::connect(&qmp_sock);
    Initiator {
        qt,
        qmp,
        requests,
        req: mem.alloc(64, 64).unwrap(),
        resp: mem.alloc(128, 64).unwrap(),
        data: mem.alloc(4096, 4096).unwrap(),
        _dir: dir,
    }
}

#[test]
fn eject_and_change_as_the_initiator_sees_them() {
    let dir = TempDir::new("harness-cdrom");
    let first = iso(&dir, "FIRST", "one");
    let second = iso(&dir, "SECOND", "two");
    let mut i = start(dir, &first);
    assert_eq!(i.settle(), (GOOD, 0, 0));
    assert_eq!(i.volume_label(), "FIRST");

    // Eject: NOT READY, MEDIUM NOT PRESENT (3Ah); the tray shows open.
    i.qmp.ok("eject", Some(json!({"device": "cd0"})));
    assert_eq!(i.settle(), (CHECK_CONDITION, 2, 0x3a));
    let info = i.cd();
    assert_eq!(info["tray_open"], true, "{info}");
    assert!(info.get("inserted").is_none(), "{info}");

    // Change: a unit attention, then the new disc.
    i.qmp
        .ok("change", Some(json!({"device": "cd0", "target": second})));
    assert_eq!(i.settle(), (GOOD, 0, 0));
    assert_eq!(i.volume_label(), "SECOND");
    assert_eq!(i.cd()["inserted"]["file"], json!(second));

    // PREVENT ALLOW MEDIUM REMOVAL (prevent): eject needs force.
    let (s, _, _, _) = i.command(&[0x1e, 0, 0, 0, 1, 0], 0);
    assert_eq!(s, GOOD);
    assert_eq!(i.cd()["locked"], true);
    let refused = i.qmp.request("eject", Some(json!({"device": "cd0"})));
    assert!(
        refused["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("is locked and force was not specified")),
        "{refused}"
    );
    assert_eq!(i.volume_label(), "SECOND", "still in");
    i.qmp
        .ok("eject", Some(json!({"device": "cd0", "force": true})));
    assert_eq!(i.settle(), (CHECK_CONDITION, 2, 0x3a));
    // A change to a file that is not there leaves the drive as it was.
    let missing = i.qmp.request(
        "change",
        Some(json!({"device": "cd0", "target": "/nonexistent.iso"})),
    );
    assert!(missing.get("error").is_some(), "{missing}");
    assert_eq!(i.settle(), (CHECK_CONDITION, 2, 0x3a));

    // The CD-ROM is no PCI function: device_del says so and leaves it; its controller is.
    let del = i.qmp.request("device_del", Some(json!({"id": "cdrom0"})));
    assert!(
        del["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("device_del its controller instead")),
        "{del}"
    );
    assert_eq!(i.settle(), (CHECK_CONDITION, 2, 0x3a));
    i.qmp.ok("device_del", Some(json!({"id": "scsi0"})));
}
