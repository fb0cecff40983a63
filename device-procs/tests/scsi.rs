//! `vmm-scsi` as the vmm's supervisor starts it (control socket at fd 3, listening
//! vhost-user socket at fd 4). The test plays the vmm on the control channel (hello,
//! AttachController, AddCdrom, InsertMedium, Eject, Query, Reset) and the guest's
//! virtio-scsi driver on real vrings in a memfd shared over vhost-user: INQUIRY, unit
//! attentions, READ CAPACITY, READ(10) content, the lock, the tray, task management, and
//! malformed requests that must not stop the process. The sandbox needs root, as in CI.

mod common;

use common::Dir;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ipc::scsi::{ScsiChannel, ScsiEvent, ScsiReply, ScsiRequest};
use ipc::{DeviceKind, IpcError, Message};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BIN: &str = env!("CARGO_BIN_EXE_vmm-scsi");
const T: Duration = Duration::from_secs(20);
const QUEUE_SIZE: u16 = 16;

/// virtio-scsi response codes and SCSI status.
const S_OK: u8 = 0;
const S_OVERRUN: u8 = 1;
const S_BAD_TARGET: u8 = 3;
const S_FAILURE: u8 = 9;
const GOOD: u8 = 0;
const CHECK_CONDITION: u8 = 2;

/// An ISO 9660 image holding one file with `text` (genisoimage or xorriso), or, where
/// neither is installed, a plain image of 300 blocks where block n starts with `text`
/// and n.
fn make_image(dir: &Path, name: &str, text: &str) -> PathBuf {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("readme.txt"), text).unwrap();
    let iso = dir.join(format!("{name}.iso"));
    for (tool, args) in [
        ("genisoimage", vec!["-quiet", "-V", name, "-o"]),
        (
            "xorriso",
            vec!["-as", "mkisofs", "-quiet", "-V", name, "-o"],
        ),
    ] {
        let ok = Command::new(tool)
            .args(&args)
            .arg(&iso)
            .arg(&src)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return iso;
        }
    }
    eprintln!("neither genisoimage nor xorriso is installed: using a plain image instead");
    let mut image = Vec::new();
    for n in 0..300u32 {
        let mut block = vec![0u8; 2048];
        let tag = format!("{text} {n}");
        block[..tag.len()].copy_from_slice(tag.as_bytes());
        image.extend_from_slice(&block);
    }
    std::fs::write(&iso, image).unwrap();
    iso
}

/// A copy of `fd` numbered 10 or above, closed on exec.
fn high_fd(fd: &impl AsFd) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC on an open fd returns a new fd that we own.
    let n = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    assert!(n >= 10);
    // SAFETY: just created, owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(n) }
}

/// A running vmm-scsi with `control` at fd 3 and `listener` at fd 4, killed on drop.
struct Process {
    child: Child,
}

impl Process {
    fn spawn(control: UnixStream, listener: &UnixListener) -> Process {
        let control = high_fd(&control);
        let listener = high_fd(listener);
        let (c, l): (RawFd, RawFd) = (control.as_raw_fd(), listener.as_raw_fd());
        let mut cmd = Command::new(BIN);
        cmd.stdin(Stdio::null());
        // SAFETY: the closure runs in the child before exec and only calls dup2, which is
        // async-signal-safe, on fds that exist there (10 and above, so never 3 or 4).
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(c, 3) < 0 || libc::dup2(l, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Process {
            child: cmd.spawn().unwrap(),
        }
    }

    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start vmm-scsi and say hello; the process, the channel and the vhost-user socket path.
fn start(dir: &Dir) -> (Process, ScsiChannel, PathBuf) {
    let socket = dir.0.join("vhost.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let process = Process::spawn(theirs, &listener);
    drop(listener);
    let mut ch = ScsiChannel::new(ours);
    let hello = ch
        .hello(DeviceKind::Block, DeviceKind::Block, T)
        .expect("hello");
    // It serves as PID 1 of its own PID namespace.
    assert_eq!(hello.pid, 1);
    (process, ch, socket)
}

fn remote_error(result: Result<(ScsiReply, Vec<OwnedFd>), IpcError>) -> String {
    match result {
        Err(IpcError::Remote(e)) => e.0,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

/// Guest RAM for the test: a memfd, mapped here and passed to vmm-scsi.
fn guest_memory(size: usize) -> GuestMemoryMmap {
    let name = std::ffi::CString::new("guest-ram").unwrap();
    // SAFETY: memfd_create with a valid C string; the new fd is ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned by nothing else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size as u64).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

fn wait_readable(fd: &EventFd) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one pollfd we own.
    let n = unsafe { libc::poll(&mut pfd, 1, T.as_millis() as i32) };
    assert_eq!(n, 1, "no used-buffer notification");
    let _ = fd.read();
}

/// Negotiate (no EVENT_IDX: every completion notifies) and share `mem`.
fn negotiate(fe: &mut Frontend, mem: &GuestMemoryMmap) {
    let features = fe.get_features().unwrap();
    assert!(features & (1 << VIRTIO_F_VERSION_1) != 0, "{features:#x}");
    fe.set_owner().unwrap();
    fe.set_features(
        features & (1 << VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()),
    )
    .unwrap();
    fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ)
        .unwrap();
    let region = mem.iter().next().unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
        .unwrap();
}

/// One virtqueue the test drives: a chain at a time, written at descriptor 0.
struct Vq<'m> {
    mem: &'m GuestMemoryMmap,
    q: MockSplitQueue<'m, GuestMemoryMmap>,
    call: EventFd,
    kick: EventFd,
    next: u16,
}

impl<'m> Vq<'m> {
    /// Lay queue `index` out at `base` and hand it to the backend.
    fn new(fe: &mut Frontend, mem: &'m GuestMemoryMmap, index: usize, base: u64) -> Vq<'m> {
        let q = MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE);
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        fe.set_vring_num(index, QUEUE_SIZE).unwrap();
        fe.set_vring_addr(
            index,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: host + q.desc_table_addr().0,
                used_ring_addr: host + q.used_addr().0,
                avail_ring_addr: host + q.avail_addr().0,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(index, 0).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        fe.set_vring_call(index, &call).unwrap();
        fe.set_vring_kick(index, &kick).unwrap();
        fe.set_vring_enable(index, true).unwrap();
        Vq {
            mem,
            q,
            call,
            kick,
            next: 0,
        }
    }

    /// Make `descs` (linked in order) available, kick, and wait for the used element:
    /// its used length.
    fn run(&mut self, descs: &[(u64, u32, bool)]) -> u32 {
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let d = Descriptor::new(addr, len, flags as u16, i as u16 + 1);
            self.q
                .desc_table()
                .store(i as u16, RawDescriptor::from(d))
                .unwrap();
        }
        let slot = self.next % QUEUE_SIZE;
        self.mem
            .write_obj(
                0u16.to_le(),
                self.q.avail_addr().unchecked_add(4 + 2 * u64::from(slot)),
            )
            .unwrap();
        self.next = self.next.wrapping_add(1);
        self.mem
            .write_obj(self.next.to_le(), self.q.avail_addr().unchecked_add(2))
            .unwrap();
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + T;
        while u16::from_le(self.q.used().idx().load()) != self.next {
            assert!(Instant::now() < deadline, "the request was not completed");
            wait_readable(&self.call);
        }
        let elem = self
            .q
            .used()
            .ring()
            .ref_at(usize::from(slot))
            .unwrap()
            .load();
        assert_eq!(elem.id(), 0);
        elem.len()
    }
}

const REQ: u64 = 0x1_0000;
const RESP: u64 = 0x1_1000;
const DATA: u64 = 0x2_0000;
const REQ_LEN: u32 = 51;
const RESP_LEN: u32 = 108;

/// A decoded virtio_scsi_cmd_resp and the data-in bytes.
#[derive(Debug)]
struct Resp {
    used: u32,
    response: u8,
    status: u8,
    /// Sense key, ASC, ASCQ.
    sense: (u8, u8, u8),
    resid: u32,
    data: Vec<u8>,
}

/// The guest's side of virtio-scsi commands.
struct Guest<'m> {
    mem: &'m GuestMemoryMmap,
    requests: Vq<'m>,
}

fn lun(target: u8, lun: u8) -> [u8; 8] {
    [1, target, 0x40, lun, 0, 0, 0, 0]
}

impl Guest<'_> {
    fn write_req(&self, lun: [u8; 8], cdb: &[u8]) {
        let mut req = [0u8; REQ_LEN as usize];
        req[..8].copy_from_slice(&lun);
        req[8..16].copy_from_slice(&0x1234u64.to_le_bytes());
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        self.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        self.mem
            .write_slice(&[0xaau8; RESP_LEN as usize], GuestAddress(RESP))
            .unwrap();
    }

    fn read_resp(&self, used: u32, data_len: u32) -> Resp {
        let mut r = [0u8; RESP_LEN as usize];
        self.mem.read_slice(&mut r, GuestAddress(RESP)).unwrap();
        let got = used.saturating_sub(RESP_LEN).min(data_len);
        let mut data = vec![0u8; got as usize];
        self.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        let sense_len = u32::from_le_bytes(r[0..4].try_into().unwrap());
        let sense = if sense_len >= 14 {
            (r[12 + 2], r[12 + 12], r[12 + 13])
        } else {
            (0, 0, 0)
        };
        Resp {
            used,
            response: r[11],
            status: r[10],
            sense,
            resid: u32::from_le_bytes(r[4..8].try_into().unwrap()),
            data,
        }
    }

    /// A command with `data_in` bytes of data-in buffer.
    fn cmd_at(&mut self, lun: [u8; 8], cdb: &[u8], data_in: u32) -> Resp {
        self.write_req(lun, cdb);
        let mut descs = vec![(REQ, REQ_LEN, false), (RESP, RESP_LEN, true)];
        if data_in > 0 {
            descs.push((DATA, data_in, true));
        }
        let used = self.requests.run(&descs);
        self.read_resp(used, data_in)
    }

    fn cmd(&mut self, cdb: &[u8], data_in: u32) -> Resp {
        self.cmd_at(lun(0, 0), cdb, data_in)
    }

    /// TEST UNIT READY until GOOD (at most 5 times): the unit attentions on the way.
    fn ready(&mut self) -> Vec<(u8, u8, u8)> {
        let mut seen = Vec::new();
        for _ in 0..5 {
            let r = self.cmd(&[0x00], 0);
            assert_eq!(r.response, S_OK);
            if r.status == GOOD {
                return seen;
            }
            assert_eq!(r.status, CHECK_CONDITION);
            assert_eq!(r.sense.0, 6, "not a unit attention: {r:?}");
            seen.push(r.sense);
        }
        panic!("not ready after {seen:?}");
    }

    fn read10(&mut self, lba: u32, blocks: u16) -> Resp {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        self.cmd(&cdb, u32::from(blocks) * 2048)
    }
}

/// The next event on the channel (when no call is in flight).
fn next_event(ch: &mut ScsiChannel) -> ScsiEvent {
    match ch.recv(Some(T)).expect("an event") {
        (Message::Event(ev), _) => ev,
        (other, _) => panic!("expected an event, got {other:?}"),
    }
}

fn tray(id: &str, open: bool) -> ScsiEvent {
    ScsiEvent::TrayMoved {
        id: id.into(),
        tray_open: open,
    }
}

#[test]
fn a_cdrom_through_the_control_channel_and_a_shared_memory_vring() {
    let dir = Dir::new("vmm-scsi-cd");
    let iso1 = make_image(&dir.0, "FIRST", "the first disc");
    let iso2 = make_image(&dir.0, "SECOND", "the second disc, a different one");
    let image1 = std::fs::read(&iso1).unwrap();
    let image2 = std::fs::read(&iso2).unwrap();
    let (mut process, mut ch, socket) = start(&dir);

    // Before AttachController, and a bad one.
    let err = remote_error(ch.call(ScsiRequest::Query, &[], T));
    assert!(err.contains("no controller"), "{err}");
    let err = remote_error(ch.call(
        ScsiRequest::AttachController {
            num_queues: 1,
            queue_size: 100,
        },
        &[],
        T,
    ));
    assert!(err.contains("queue size"), "{err}");
    let (reply, _) = ch
        .call(
            ScsiRequest::AttachController {
                num_queues: 1,
                queue_size: 128,
            },
            &[],
            T,
        )
        .unwrap();
    assert_eq!(reply, ScsiReply::Attached);

    // An empty drive at target 0, LUN 0; refused requests.
    let add = ScsiRequest::AddCdrom {
        target: 0,
        lun: 0,
        id: "cd0".into(),
        serial: "QM0001".into(),
    };
    let (reply, _) = ch.call(add.clone(), &[], T).unwrap();
    assert_eq!(reply, ScsiReply::Added { size: None });
    let err = remote_error(ch.call(add, &[], T));
    assert!(err.contains("already"), "{err}");
    let f1 = File::open(&iso1).unwrap();
    let err = remote_error(ch.call(
        ScsiRequest::InsertMedium { target: 9, lun: 0 },
        &[f1.as_fd()],
        T,
    ));
    assert!(err.contains("no device at target 9"), "{err}");
    let err = remote_error(ch.call(ScsiRequest::InsertMedium { target: 0, lun: 0 }, &[], T));
    assert!(err.contains("exactly one fd"), "{err}");
    let (reply, _) = ch.call(ScsiRequest::Query, &[], T).unwrap();
    let ScsiReply::Luns(luns) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(luns.len(), 1);
    assert!(!luns[0].inserted && !luns[0].tray_open && !luns[0].locked);

    // QMP change: the tray opens and closes on the new medium.
    let (reply, _) = ch
        .call(
            ScsiRequest::InsertMedium { target: 0, lun: 0 },
            &[f1.as_fd()],
            T,
        )
        .unwrap();
    assert_eq!(
        reply,
        ScsiReply::Inserted {
            size: image1.len() as u64
        }
    );
    assert_eq!(ch.take_event().map(|e| e.0), Some(tray("cd0", true)));
    assert_eq!(ch.take_event().map(|e| e.0), Some(tray("cd0", false)));

    // The guest.
    let mut fe = Frontend::connect(&socket, 3).unwrap();
    let mem = guest_memory(1 << 20);
    negotiate(&mut fe, &mem);
    assert_eq!(fe.get_queue_num().unwrap(), 3);
    let (_, config) = fe
        .get_config(0, 36, VhostUserConfigFlags::empty(), &[0u8; 36])
        .unwrap();
    let le32 = |at: usize| u32::from_le_bytes(config[at..at + 4].try_into().unwrap());
    assert_eq!(le32(0), 1, "num_queues");
    assert_eq!(le32(4), 126, "seg_max");
    assert_eq!((le32(20), le32(24)), (96, 32), "sense and CDB sizes");
    assert_eq!(
        u16::from_le_bytes([config[30], config[31]]),
        255,
        "max_target"
    );
    assert_eq!(le32(32), 16383, "max_lun");
    let mut control = Vq::new(&mut fe, &mem, 0, 0x4_0000);
    let requests = Vq::new(&mut fe, &mem, 2, 0x5_0000);
    let mut g = Guest {
        mem: &mem,
        requests,
    };

    // INQUIRY: a removable CD-ROM; VPD page 0x83 carries the drive id.
    let r = g.cmd(&[0x12, 0, 0, 0, 96], 96);
    assert_eq!((r.response, r.status), (S_OK, GOOD));
    assert_eq!(r.data.len(), 36);
    assert_eq!((r.data[0], r.data[1]), (5, 0x80));
    assert_eq!(&r.data[8..27], b"QEMU    QEMU CD-ROM");
    assert_eq!((r.used, r.resid), (RESP_LEN + 36, 60));
    let r = g.cmd(&[0x12, 1, 0x83, 0, 96], 96);
    assert_eq!(&r.data[8..], b"cd0");
    let r = g.cmd(&[0x12, 1, 0x80, 0, 96], 96);
    assert_eq!(&r.data[4..], b"QM0001");

    // Unit attentions (power on, then the medium change), then ready.
    assert_eq!(g.ready(), vec![(6, 0x29, 0), (6, 0x28, 0)]);
    let r = g.cmd(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    let blocks1 = image1.len() as u32 / 2048;
    assert_eq!(r.data[..4], (blocks1 - 1).to_be_bytes());
    assert_eq!(r.data[4..8], 2048u32.to_be_bytes());
    let r = g.read10(16, 2);
    assert_eq!((r.response, r.status, r.resid), (S_OK, GOOD, 0));
    assert_eq!(r.data, image1[16 * 2048..18 * 2048]);
    if image1[16 * 2048 + 1..16 * 2048 + 6] == *b"CD001" {
        eprintln!("reading an ISO 9660 image");
    }
    // GET EVENT STATUS NOTIFICATION: new media, once.
    let gesn = [0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0];
    assert_eq!(g.cmd(&gesn, 8).data[4..6], [2, 2]);
    assert_eq!(g.cmd(&gesn, 8).data[4..6], [0, 2]);

    // The guest locks the medium: eject is refused and becomes an eject request.
    assert_eq!(g.cmd(&[0x1e, 0, 0, 0, 1, 0], 0).status, GOOD);
    let eject = |force| ScsiRequest::Eject {
        target: 0,
        lun: 0,
        force,
    };
    let (reply, _) = ch.call(eject(false), &[], T).unwrap();
    assert_eq!(reply, ScsiReply::Locked);
    assert!(ch.take_event().is_none());
    assert_eq!(g.cmd(&gesn, 8).data[4..6], [1, 2]);
    assert_eq!(g.ready(), vec![]);
    let (reply, _) = ch.call(ScsiRequest::Query, &[], T).unwrap();
    let ScsiReply::Luns(luns) = reply else {
        panic!("{reply:?}")
    };
    assert!(luns[0].inserted && luns[0].locked && !luns[0].tray_open);
    assert_eq!(luns[0].size, image1.len() as u64);

    // Forced: the tray opens, the drive is empty.
    let (reply, _) = ch.call(eject(true), &[], T).unwrap();
    assert_eq!(reply, ScsiReply::Ejected);
    assert_eq!(ch.take_event().map(|e| e.0), Some(tray("cd0", true)));
    assert_eq!(
        g.cmd(&gesn, 8).data[4..6],
        [3, 1],
        "media removal, tray open"
    );
    let r = g.cmd(&[0x00], 0);
    assert_eq!((r.status, r.sense), (CHECK_CONDITION, (6, 0x3a, 0)));
    let r = g.cmd(&[0x00], 0);
    assert_eq!((r.status, r.sense), (CHECK_CONDITION, (2, 0x3a, 0)));
    let r = g.read10(16, 1);
    assert_eq!((r.status, r.sense), (CHECK_CONDITION, (2, 0x3a, 0)));
    assert_eq!((r.used, r.resid), (RESP_LEN, 2048));
    let (reply, _) = ch.call(ScsiRequest::Query, &[], T).unwrap();
    let ScsiReply::Luns(luns) = reply else {
        panic!("{reply:?}")
    };
    assert!(!luns[0].inserted && !luns[0].locked && luns[0].tray_open);

    // Another medium: the tray closes on it; unit attentions; its content.
    let f2 = File::open(&iso2).unwrap();
    let (reply, _) = ch
        .call(
            ScsiRequest::InsertMedium { target: 0, lun: 0 },
            &[f2.as_fd()],
            T,
        )
        .unwrap();
    assert_eq!(
        reply,
        ScsiReply::Inserted {
            size: image2.len() as u64
        }
    );
    assert_eq!(ch.take_event().map(|e| e.0), Some(tray("cd0", false)));
    assert_eq!(g.ready(), vec![(6, 0x3a, 0), (6, 0x28, 0)]);
    let r = g.read10(0, 1);
    assert_eq!(r.data, image2[..2048]);
    let r = g.read10(16, 2);
    assert_eq!(r.data, image2[16 * 2048..18 * 2048]);
    assert_ne!(image1[16 * 2048..18 * 2048], image2[16 * 2048..18 * 2048]);

    // The guest opens and closes the tray (START STOP UNIT, LoEj): DEVICE_TRAY_MOVED.
    assert_eq!(g.cmd(&[0x1b, 0, 0, 0, 0x02, 0], 0).status, GOOD);
    assert_eq!(next_event(&mut ch), tray("cd0", true));
    assert_eq!(g.cmd(&[0x00], 0).sense, (2, 0x3a, 0));
    assert_eq!(g.cmd(&[0x1b, 0, 0, 0, 0x03, 0], 0).status, GOOD);
    assert_eq!(next_event(&mut ch), tray("cd0", false));
    assert_eq!(g.ready(), vec![]);

    // A system reset: unlocked, POWER ON unit attention.
    assert_eq!(g.cmd(&[0x1e, 0, 0, 0, 1, 0], 0).status, GOOD);
    let (reply, _) = ch.call(ScsiRequest::Reset, &[], T).unwrap();
    assert_eq!(reply, ScsiReply::Reset);
    assert_eq!(g.ready(), vec![(6, 0x29, 0)]);
    let (reply, _) = ch.call(ScsiRequest::Query, &[], T).unwrap();
    let ScsiReply::Luns(luns) = reply else {
        panic!("{reply:?}")
    };
    assert!(!luns[0].locked);

    // Other LUNs and targets: REPORT LUNS, INQUIRY of a missing LUN, a missing target.
    let r = g.cmd(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], 64);
    assert_eq!(r.data, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let r = g.cmd_at(lun(0, 3), &[0x12, 0, 0, 0, 36], 36);
    assert_eq!((r.status, r.data[0]), (GOOD, 0x7f));
    let r = g.cmd_at(lun(0, 3), &[0x00], 0);
    assert_eq!((r.status, r.sense), (CHECK_CONDITION, (5, 0x25, 0)));
    let r = g.cmd_at(lun(7, 0), &[0x12, 0, 0, 0, 36], 36);
    assert_eq!((r.response, r.used), (S_BAD_TARGET, RESP_LEN));
    let r = g.cmd_at([2, 0, 0, 0, 0, 0, 0, 0], &[0x12, 0, 0, 0, 36], 36);
    assert_eq!(r.response, S_BAD_TARGET);
    // Unknown commands.
    let r = g.cmd(&[0xee, 0, 0, 0, 0, 0], 0);
    assert_eq!((r.status, r.sense), (CHECK_CONDITION, (5, 0x20, 0)));

    // Task management on the control queue: a LUN reset, and one of a missing target.
    const TMF_REQ: u64 = 0x3_0000;
    const TMF_RESP: u64 = 0x3_1000;
    let mut tmf = [0u8; 24];
    tmf[4..8].copy_from_slice(&5u32.to_le_bytes()); // LOGICAL UNIT RESET
    tmf[8..16].copy_from_slice(&lun(0, 0));
    mem.write_slice(&tmf, GuestAddress(TMF_REQ)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(TMF_RESP)).unwrap();
    let used = control.run(&[(TMF_REQ, 24, false), (TMF_RESP, 1, true)]);
    assert_eq!(used, 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(TMF_RESP)).unwrap(), 0);
    assert_eq!(g.ready(), vec![(6, 0x29, 0)]);
    tmf[8..16].copy_from_slice(&lun(9, 0));
    mem.write_slice(&tmf, GuestAddress(TMF_REQ)).unwrap();
    control.run(&[(TMF_REQ, 24, false), (TMF_RESP, 1, true)]);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(TMF_RESP)).unwrap(),
        S_BAD_TARGET
    );
    // Asynchronous notification query: no events.
    let mut an = [0u8; 16];
    an[0] = 1;
    an[4..12].copy_from_slice(&lun(0, 0));
    mem.write_slice(&an, GuestAddress(TMF_REQ)).unwrap();
    assert_eq!(control.run(&[(TMF_REQ, 16, false), (TMF_RESP, 5, true)]), 5);

    // Malformed requests fail alone; the process serves on.
    // A request header cut short (no room for the CDB).
    g.write_req(lun(0, 0), &[0x12, 0, 0, 0, 36]);
    let used = g
        .requests
        .run(&[(REQ, 20, false), (RESP, RESP_LEN, true), (DATA, 36, true)]);
    assert_eq!(g.read_resp(used, 36).response, S_FAILURE);
    // Data buffers in both directions.
    let used = g.requests.run(&[
        (REQ, REQ_LEN, false),
        (DATA + 0x8000, 16, false),
        (RESP, RESP_LEN, true),
        (DATA, 36, true),
    ]);
    assert_eq!(g.read_resp(used, 36).response, S_FAILURE);
    // A data-in command with a data-out buffer.
    let used = g.requests.run(&[
        (REQ, REQ_LEN, false),
        (DATA, 36, false),
        (RESP, RESP_LEN, true),
    ]);
    assert_eq!(g.read_resp(used, 0).response, S_OVERRUN);
    // A READ larger than its buffer.
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[8] = 2;
    g.write_req(lun(0, 0), &cdb);
    let used = g.requests.run(&[
        (REQ, REQ_LEN, false),
        (RESP, RESP_LEN, true),
        (DATA, 2048, true),
    ]);
    assert_eq!(g.read_resp(used, 2048).response, S_OVERRUN);
    // No room for the response; a readable buffer after a writable one; a buffer outside
    // guest memory: nothing is written.
    g.write_req(lun(0, 0), &[0x12, 0, 0, 0, 36]);
    for descs in [
        vec![(REQ, REQ_LEN, false), (RESP, 50, true)],
        vec![
            (REQ, REQ_LEN, false),
            (RESP, RESP_LEN, true),
            (DATA, 36, false),
        ],
        vec![
            (REQ, REQ_LEN, false),
            (RESP, RESP_LEN, true),
            (0xffff_0000_0000, 36, true),
        ],
        vec![(REQ, REQ_LEN, false)],
    ] {
        assert_eq!(g.requests.run(&descs), 0, "{descs:?}");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(RESP)).unwrap(), 0xaa);
    }
    assert!(process.alive(), "vmm-scsi died");
    let r = g.cmd(&[0x12, 0, 0, 0, 36], 36);
    assert_eq!((r.response, r.status, r.data[0]), (S_OK, GOOD, 5));

    // A second frontend connection finds the device again (the state is kept).
    drop(fe);
    let mut fe = Frontend::connect(&socket, 3).unwrap();
    negotiate(&mut fe, &mem);
    let requests = Vq::new(&mut fe, &mem, 2, 0x6_0000);
    let mut g = Guest {
        mem: &mem,
        requests,
    };
    let r = g.read10(16, 1);
    assert_eq!(
        (r.status, r.data),
        (GOOD, image2[16 * 2048..17 * 2048].to_vec())
    );

    // The vmm goes away: so does the device process, cleanly.
    drop(ch);
    let status = process
        .wait(T)
        .expect("vmm-scsi outlived its control socket");
    assert!(status.success(), "{status}");
}

#[test]
fn a_drive_with_a_medium_from_power_on_and_sigterm() {
    let dir = Dir::new("vmm-scsi-power-on");
    let iso = make_image(&dir.0, "BOOT", "present from the start");
    let size = std::fs::metadata(&iso).unwrap().len();
    let (mut process, mut ch, _socket) = start(&dir);
    ch.call(
        ScsiRequest::AttachController {
            num_queues: 2,
            queue_size: 64,
        },
        &[],
        T,
    )
    .unwrap();
    let f = File::open(&iso).unwrap();
    let (reply, _) = ch
        .call(
            ScsiRequest::AddCdrom {
                target: 1,
                lun: 0,
                id: "cd1".into(),
                serial: String::new(),
            },
            &[f.as_fd()],
            T,
        )
        .unwrap();
    assert_eq!(reply, ScsiReply::Added { size: Some(size) });
    // No tray moved.
    assert!(ch.take_event().is_none());
    let (reply, _) = ch.call(ScsiRequest::Query, &[], T).unwrap();
    let ScsiReply::Luns(luns) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!((luns[0].target, luns[0].lun, luns[0].size), (1, 0, size));
    assert!(luns[0].inserted && !luns[0].tray_open);
    // An eject that is not refused.
    let (reply, _) = ch
        .call(
            ScsiRequest::Eject {
                target: 1,
                lun: 0,
                force: false,
            },
            &[],
            T,
        )
        .unwrap();
    assert_eq!(reply, ScsiReply::Ejected);
    assert_eq!(ch.take_event().map(|e| e.0), Some(tray("cd1", true)));

    // SAFETY: kill with a pid we started and a signal number.
    assert_eq!(
        unsafe { libc::kill(process.child.id() as i32, libc::SIGTERM) },
        0
    );
    let status = process.wait(T).expect("vmm-scsi did not exit on SIGTERM");
    assert!(status.success(), "{status}");
}

#[test]
fn started_by_hand_it_says_so() {
    // Without a descriptor 3: one that another test of this binary opens at the same moment
    // would otherwise be inherited, and the program would rightly take it for the vmm's.
    let out = Command::new("sh")
        .args(["-c", "exec 3>&- \"$0\"", BIN])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("started by the vmm"), "{stderr}");
    let out = Command::new(BIN).arg("--bogus").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("vmm-scsi: ") && stderr.contains("--bogus"),
        "{stderr}"
    );
}
