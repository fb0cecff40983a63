//! `vmm-blk`'s error policies (QEMU's rerror/werror) and legacy AES-encrypted qcow2 images,
//! through a real vring in a memfd with the process supervised by this test (which plays
//! the vmm on the control channel). Host errors are real ENOSPC on a small tmpfs (skipped
//! where mounting one fails) or injected with the `VMM_BLK_TEST_FAIL_READS`/`_WRITES` test
//! hooks. Encrypted images are made and checked with qemu-img and qemu-io. Needs root (the
//! sandbox, the tmpfs) and qemu-utils.

mod common;

use common::Dir;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ipc::blk::{
    AttachConfig, BackingImage, BlkChannel, BlkEvent, BlkReply, BlkRequest, ErrorAction,
    ErrorPolicy, ImageChain, ImageFormat,
};
use ipc::{DeviceKind, Message};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BIN: &str = env!("CARGO_BIN_EXE_vmm-blk");
const T: Duration = Duration::from_secs(30);
const QSIZE: u16 = 16;
/// Guest addresses: headers, data (1 MiB per request slot), status bytes.
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x10_0000;
const STATUS: u64 = 0x3_0000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const MIB: u64 = 1 << 20;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// How long a held request is watched for not completing.
const HELD: Duration = Duration::from_millis(500);

/// A 1 MiB tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf) -> Option<Tmpfs> {
        std::fs::create_dir_all(&at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
            .arg(&at)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(at)),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    /// Fill the file system with a file `filler` until it is full.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = File::create(&path).unwrap();
        let chunk = vec![0xeeu8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(n) if n > 0 => continue,
                Ok(_) => break,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                    break;
                }
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: the sandbox of a vmm-blk still exiting may hold the file.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?}: {text}");
    text
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A copy of `fd` numbered 10 or above, closed on exec.
fn high_fd(fd: &impl AsFd) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC on an open fd returns a new fd that we own.
    let n = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    assert!(n >= 10);
    // SAFETY: just created, owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(n) }
}

fn rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

/// vmm-blk supervised by this test.
struct Supervised {
    child: Child,
    ch: BlkChannel,
    socket: PathBuf,
}

impl Supervised {
    /// Start it with `env` added to its environment (the test hooks).
    fn start(dir: &Dir, env: &[(&str, &str)]) -> Supervised {
        let socket = dir.path("vhost.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let control = high_fd(&theirs);
        let listener_fd = high_fd(&listener);
        let (c, l): (RawFd, RawFd) = (control.as_raw_fd(), listener_fd.as_raw_fd());
        let mut cmd = Command::new(BIN);
        cmd.stdin(Stdio::null());
        cmd.env_remove("VMM_BLK_TEST_FAIL_READS");
        cmd.env_remove("VMM_BLK_TEST_FAIL_WRITES");
        cmd.envs(env.iter().copied());
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
        let child = cmd.spawn().unwrap();
        let mut ch = BlkChannel::new(ours);
        ch.hello(DeviceKind::Block, DeviceKind::Block, T).unwrap();
        Supervised { child, ch, socket }
    }

    /// Attach `files` (the image and its backing images); the Attached reply.
    fn attach(
        &mut self,
        format: ImageFormat,
        backing: Vec<BackingImage>,
        files: &[&File],
        read: ErrorAction,
        write: ErrorAction,
    ) -> Result<(u64, bool), String> {
        let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        let req = BlkRequest::AttachChain {
            config: AttachConfig {
                readonly: false,
                serial: "pol".into(),
                num_queues: 1,
                queue_size: QSIZE,
                error_policy: ErrorPolicy { read, write },
            },
            chain: ImageChain { format, backing },
        };
        match self.ch.call(req, &fds, T) {
            Ok((BlkReply::Attached { size, encrypted }, _)) => Ok((size, encrypted)),
            Ok((other, _)) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        }
    }

    fn call(&mut self, req: BlkRequest) -> Result<BlkReply, String> {
        self.ch
            .call(req, &[], T)
            .map(|(r, _)| r)
            .map_err(|e| e.to_string())
    }

    /// The next event, waiting at most `timeout`.
    fn event(&mut self, timeout: Duration) -> Option<BlkEvent> {
        if let Some((ev, _)) = self.ch.take_event() {
            return Some(ev);
        }
        match self.ch.recv(Some(timeout)) {
            Ok((Message::Event(ev), _)) => Some(ev),
            Ok((other, _)) => panic!("unexpected control message {other:?}"),
            Err(ipc::IpcError::Frame(ipc::FrameError::TimedOut)) => None,
            Err(e) => panic!("control socket: {e}"),
        }
    }

    /// The next event, which must be a RequestFailed.
    fn failed(&mut self) -> (bool, ErrorAction, bool, String) {
        match self.event(T) {
            Some(BlkEvent::RequestFailed {
                write,
                action,
                nospace,
                reason,
            }) => (write, action, nospace, reason),
            other => panic!("expected RequestFailed, got {other:?}"),
        }
    }

    fn no_event(&mut self) {
        assert_eq!(self.event(Duration::from_millis(200)), None);
    }

    /// Close the control socket and wait for the process to exit.
    fn stop(mut self) {
        drop(self.ch);
        let deadline = Instant::now() + T;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert!(s.success(), "vmm-blk: {s}");
                break;
            }
            assert!(Instant::now() < deadline, "vmm-blk did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Guest RAM: a memfd, mapped here and passed to vmm-blk.
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

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
}

/// A virtio-blk driver on one queue; requests go into slots 0 to 4 (descriptors, header,
/// 1 MiB of data and status byte each), submitted and waited for separately.
struct Driver {
    _fe: Frontend,
    mem: GuestMemoryMmap,
    q: MockSplitQueue<'static, GuestMemoryMmap>,
    call: EventFd,
    kick: EventFd,
    avail: u16,
}

impl Driver {
    fn connect(socket: &Path) -> Driver {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(guest_memory(8 << 20)));
        let q = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        let mut fe = Frontend::connect(socket, 1).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let region = mem.iter().next().unwrap();
        let features = fe.get_features().unwrap();
        fe.set_owner().unwrap();
        fe.set_features(
            features
                & (1 << VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()),
        )
        .unwrap();
        fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG)
            .unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
            .unwrap();
        fe.set_vring_num(0, QSIZE).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host + q.desc_table_addr().0,
                used_ring_addr: host + USED,
                avail_ring_addr: host + AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        Driver {
            _fe: fe,
            mem: mem.clone(),
            q,
            call,
            kick,
            avail: 0,
        }
    }

    fn data(slot: u16) -> u64 {
        DATA + u64::from(slot) * MIB
    }

    /// Submit a request in `slot` (type, sector, data length; a write's data is what the
    /// slot's data buffer holds).
    fn submit(&mut self, slot: u16, kind: u32, sector: u64, len: u32) {
        let (r, w, n) = (0, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT);
        let hdr = HDR + 16 * u64::from(slot);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let status = STATUS + u64::from(slot);
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let at = 3 * slot;
        let dflags = if kind == VIRTIO_BLK_T_IN { w } else { r };
        let chain = if len == 0 {
            vec![desc(hdr, 16, r | n, at + 1), desc(status, 1, w, 0)]
        } else {
            vec![
                desc(hdr, 16, r | n, at + 1),
                desc(Self::data(slot), len, dflags | n, at + 2),
                desc(status, 1, w, 0),
            ]
        };
        for (j, d) in chain.iter().enumerate() {
            self.q.desc_table().store(at + j as u16, *d).unwrap();
        }
        let entry = GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail % QSIZE));
        self.mem.write_obj(u16::to_le(at), entry).unwrap();
        self.avail = self.avail.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .write_obj(u16::to_le(self.avail), GuestAddress(AVAIL + 2))
            .unwrap();
        self.kick.write(1).unwrap();
    }

    fn used(&self) -> u16 {
        u16::from_le(self.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap())
    }

    /// Wait until the used index reaches `idx` (false after `timeout`).
    fn wait_used(&mut self, idx: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.used() != idx {
            if Instant::now() >= deadline {
                return false;
            }
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one pollfd we own.
            unsafe { libc::poll(&mut pfd, 1, 20) };
            let _ = self.call.read();
        }
        true
    }

    fn status(&self, slot: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUS + u64::from(slot)))
            .unwrap()
    }

    /// Run one request in slot 0 to completion; its status.
    fn one(&mut self, kind: u32, sector: u64, len: u32) -> u8 {
        self.submit(0, kind, sector, len);
        let idx = self.avail;
        assert!(self.wait_used(idx, T), "request not completed");
        self.status(0)
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.mem
            .write_slice(data, GuestAddress(Self::data(0)))
            .unwrap();
        self.one(VIRTIO_BLK_T_OUT, sector, data.len() as u32)
    }

    fn read(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        self.mem
            .write_slice(&vec![0xccu8; len], GuestAddress(Self::data(0)))
            .unwrap();
        let status = self.one(VIRTIO_BLK_T_IN, sector, len as u32);
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(Self::data(0)))
            .unwrap();
        (status, buf)
    }

    fn slot_data(&self, slot: u16, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(Self::data(slot)))
            .unwrap();
        buf
    }
}

/// A raw image of `size` bytes (sparse) on `fs`, attached with `policy` to a new vmm-blk.
fn on_tmpfs(
    dir: &Dir,
    fs: &Tmpfs,
    size: u64,
    read: ErrorAction,
    write: ErrorAction,
) -> (Supervised, Driver, PathBuf) {
    let img = fs.0.join("disk.img");
    let f = File::create(&img).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let mut s = Supervised::start(dir, &[]);
    assert_eq!(
        s.attach(ImageFormat::Raw, vec![], &[&rw(&img)], read, write),
        Ok((size, false))
    );
    let d = Driver::connect(&s.socket);
    (s, d, img)
}

#[test]
fn werror_stop_holds_an_enospc_write_until_resume() {
    let dir = Dir::new("vmm-blk-pol-stop");
    let Some(fs) = Tmpfs::mount(dir.path("mnt")) else {
        return;
    };
    let (mut s, mut d, img) = on_tmpfs(&dir, &fs, 8 * MIB, ErrorAction::Report, ErrorAction::Stop);
    // Fits before the file system is full.
    assert_eq!(d.write(0, &[0x11; 4096]), OK);
    let filler = fs.fill();

    // A write that needs new blocks: held, not completed, and the vmm is told once.
    d.mem
        .write_slice(&[0x5a; 65536], GuestAddress(Driver::data(1)))
        .unwrap();
    let before = d.used();
    d.submit(1, VIRTIO_BLK_T_OUT, 4096, 65536);
    let (write, action, nospace, reason) = s.failed();
    assert!(write && nospace, "{reason}");
    assert_eq!(action, ErrorAction::Stop);
    assert!(reason.contains("No space left"), "{reason}");
    assert!(
        !d.wait_used(before + 1, HELD),
        "the failed write was completed"
    );
    assert_eq!(d.status(1), 0xff);
    // From now on every request is held, even one that would work; no new event.
    d.submit(2, VIRTIO_BLK_T_IN, 0, 4096);
    d.submit(3, VIRTIO_BLK_T_FLUSH, 0, 0);
    assert!(!d.wait_used(before + 1, HELD));
    s.no_event();

    // Space again, and the vmm resumes: the held requests run in order.
    std::fs::remove_file(filler).unwrap();
    assert_eq!(
        s.call(BlkRequest::Resume),
        Ok(BlkReply::Resumed { retried: 3 })
    );
    assert!(d.wait_used(before + 3, T));
    assert_eq!((d.status(1), d.status(2), d.status(3)), (OK, OK, OK));
    assert_eq!(d.slot_data(2, 4096), vec![0x11; 4096]);
    s.no_event();
    // Running normally again.
    assert_eq!(d.write(16, &[0x22; 512]), OK);
    assert_eq!(
        s.call(BlkRequest::Resume),
        Ok(BlkReply::Resumed { retried: 0 })
    );
    drop(d);
    s.stop();
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[4096 * 512..4096 * 512 + 65536], &[0x5a; 65536][..]);
    assert_eq!(&bytes[16 * 512..17 * 512], &[0x22; 512][..]);
}

#[test]
fn werror_report_and_ignore_on_enospc() {
    for (policy, status) in [(ErrorAction::Report, IOERR), (ErrorAction::Ignore, OK)] {
        let dir = Dir::new("vmm-blk-pol-rep");
        let Some(fs) = Tmpfs::mount(dir.path("mnt")) else {
            return;
        };
        let (mut s, mut d, _img) = on_tmpfs(&dir, &fs, 8 * MIB, ErrorAction::Report, policy);
        let filler = fs.fill();
        assert_eq!(d.write(2048, &[0x5a; 65536]), status, "{policy:?}");
        assert_eq!(
            s.failed(),
            (true, policy, true, "No space left on device".into())
        );
        // Every failure is told (no rate limit).
        assert_eq!(d.write(4096, &[0x5a; 65536]), status, "{policy:?}");
        assert_eq!(s.failed().1, policy);
        // A guest mistake is no host error: IOERR whatever the policy, and no event.
        assert_eq!(d.write(16 * 2048, &[1; 512]), IOERR);
        s.no_event();
        std::fs::remove_file(filler).unwrap();
        assert_eq!(d.write(2048, &[0x5a; 65536]), OK);
        drop(d);
        s.stop();
    }
}

/// Attach a fresh raw image of 1 MiB with the test hooks `env` and the policy.
fn injected(
    dir: &Dir,
    env: &[(&str, &str)],
    read: ErrorAction,
    write: ErrorAction,
) -> (Supervised, Driver) {
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![0x42u8; MIB as usize]).unwrap();
    let mut s = Supervised::start(dir, env);
    s.attach(ImageFormat::Raw, vec![], &[&rw(&img)], read, write)
        .unwrap();
    let d = Driver::connect(&s.socket);
    (s, d)
}

#[test]
fn werror_enospc_reports_eio_and_stops_on_enospc() {
    // QEMU's default werror=enospc: EIO is reported to the guest...
    let dir = Dir::new("vmm-blk-pol-enospc");
    let (mut s, mut d) = injected(
        &dir,
        &[("VMM_BLK_TEST_FAIL_WRITES", "eio:1")],
        ErrorAction::Report,
        ErrorAction::Enospc,
    );
    assert_eq!(d.write(0, &[1; 512]), IOERR);
    assert_eq!(
        s.failed(),
        (
            true,
            ErrorAction::Report,
            false,
            "Input/output error".into()
        )
    );
    assert_eq!(d.write(0, &[1; 512]), OK);
    // ...and reads are not concerned by werror.
    assert_eq!(d.read(0, 512), (OK, vec![1; 512]));
    drop(d);
    s.stop();

    // ...while ENOSPC stops; a retry that fails again stops anew (a new event).
    let dir = Dir::new("vmm-blk-pol-enospc2");
    let (mut s, mut d) = injected(
        &dir,
        &[("VMM_BLK_TEST_FAIL_WRITES", "enospc:2")],
        ErrorAction::Report,
        ErrorAction::Enospc,
    );
    d.mem
        .write_slice(&[7; 512], GuestAddress(Driver::data(0)))
        .unwrap();
    d.submit(0, VIRTIO_BLK_T_OUT, 3, 512);
    assert_eq!(
        s.failed(),
        (
            true,
            ErrorAction::Stop,
            true,
            "No space left on device".into()
        )
    );
    assert!(!d.wait_used(1, HELD));
    assert_eq!(
        s.call(BlkRequest::Resume),
        Ok(BlkReply::Resumed { retried: 1 })
    );
    assert_eq!(s.failed().1, ErrorAction::Stop);
    assert!(!d.wait_used(1, HELD));
    assert_eq!(
        s.call(BlkRequest::Resume),
        Ok(BlkReply::Resumed { retried: 1 })
    );
    assert!(d.wait_used(1, T));
    assert_eq!(d.status(0), OK);
    assert_eq!(d.read(3, 512), (OK, vec![7; 512]));
    s.no_event();
    drop(d);
    s.stop();
}

#[test]
fn rerror_report_ignore_and_stop() {
    let dir = Dir::new("vmm-blk-pol-rerror");
    let fail = [("VMM_BLK_TEST_FAIL_READS", "eio:1")];
    // report: IOERR and the event.
    let (mut s, mut d) = injected(&dir, &fail, ErrorAction::Report, ErrorAction::Stop);
    assert_eq!(d.read(0, 512).0, IOERR);
    assert_eq!(
        s.failed(),
        (
            false,
            ErrorAction::Report,
            false,
            "Input/output error".into()
        )
    );
    // werror does not apply to reads; writes work.
    assert_eq!(d.write(0, &[3; 512]), OK);
    assert_eq!(d.read(0, 512), (OK, vec![3; 512]));
    drop(d);
    s.stop();
    // ignore: success for the guest (its buffer is left as it was), and the event.
    let (mut s, mut d) = injected(&dir, &fail, ErrorAction::Ignore, ErrorAction::Report);
    assert_eq!(d.read(0, 512), (OK, vec![0xcc; 512]));
    assert_eq!(s.failed().1, ErrorAction::Ignore);
    drop(d);
    s.stop();
    // stop: held until resumed, then read for real.
    let (mut s, mut d) = injected(&dir, &fail, ErrorAction::Stop, ErrorAction::Report);
    d.submit(0, VIRTIO_BLK_T_IN, 1, 512);
    assert_eq!(
        s.failed(),
        (false, ErrorAction::Stop, false, "Input/output error".into())
    );
    assert!(!d.wait_used(1, HELD));
    assert_eq!(
        s.call(BlkRequest::Resume),
        Ok(BlkReply::Resumed { retried: 1 })
    );
    assert!(d.wait_used(1, T));
    assert_eq!(d.status(0), OK);
    assert_eq!(d.slot_data(0, 512), vec![0x42; 512]);
    drop(d);
    s.stop();
}

/// qemu-io on an AES-encrypted qcow2 (password "pw"), or on a plain qcow2 over one.
fn qemu_io(image: &Path, backing_encrypted: bool, cmds: &[&str]) -> String {
    let opts = if backing_encrypted {
        format!(
            "driver=qcow2,file.filename={},backing.encrypt.key-secret=s0",
            p(image)
        )
    } else {
        format!(
            "driver=qcow2,file.filename={},encrypt.format=aes,encrypt.key-secret=s0",
            p(image)
        )
    };
    let mut args = vec!["--object", "secret,id=s0,data=pw", "--image-opts", &opts];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed"),
        "{cmds:?}: {out}"
    );
    out
}

fn create_aes(path: &Path, size: &str) {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=pw",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s0",
            p(path),
            size,
        ],
    );
}

#[test]
fn an_aes_image_from_qemu_is_served_after_set_key() {
    let dir = Dir::new("vmm-blk-pol-aes");
    let img = dir.path("enc.qcow2");
    create_aes(&img, "4M");
    qemu_io(&img, false, &["write -P 0x5a 0 64k", "write -P 0x33 1M 4k"]);

    let mut s = Supervised::start(&dir, &[]);
    assert_eq!(
        s.attach(
            ImageFormat::Qcow2,
            vec![],
            &[&rw(&img)],
            ErrorAction::Report,
            ErrorAction::Enospc
        ),
        Ok((4 * MIB, true))
    );
    let mut d = Driver::connect(&s.socket);
    // No key yet: every request fails, and that is no host error (no event).
    assert_eq!(d.read(0, 512).0, IOERR);
    assert_eq!(d.write(0, &[1; 512]), IOERR);
    assert_eq!(d.one(VIRTIO_BLK_T_FLUSH, 0, 0), IOERR);
    s.no_event();
    assert_eq!(
        s.call(BlkRequest::SetKey {
            password: "pw".into()
        }),
        Ok(BlkReply::KeySet)
    );
    // What qemu-io wrote, decrypted; the rest of a cluster QEMU allocated (it encrypted
    // zeroes there) and unallocated clusters read as zeroes.
    assert_eq!(d.read(0, 65536), (OK, vec![0x5a; 65536]));
    let (st, got) = d.read(2048, 8192);
    assert_eq!(st, OK);
    assert_eq!(&got[..4096], &[0x33; 4096][..]);
    assert_eq!(&got[4096..], &[0; 4096][..]);
    assert_eq!(d.read(3 * 2048, 4096), (OK, vec![0; 4096]));

    // Writes: inside an allocated cluster, part of an unallocated one, across clusters,
    // and write-zeroes over written data.
    assert_eq!(d.write(10, &[0xa7; 512]), OK);
    assert_eq!(d.write(1536 * 2, &[0x61; 4096]), OK);
    assert_eq!(d.write(5 * 1024 - 8, &[0x62; 69632]), OK);
    d.mem
        .write_slice(
            &[40u8, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0],
            GuestAddress(Driver::data(0)),
        )
        .unwrap();
    assert_eq!(d.one(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16), OK);
    assert_eq!(d.one(VIRTIO_BLK_T_FLUSH, 0, 0), OK);
    assert_eq!(d.read(10, 512), (OK, vec![0xa7; 512]));
    assert_eq!(d.read(40, 4096), (OK, vec![0; 4096]));
    assert_eq!(d.read(1536 * 2, 4096), (OK, vec![0x61; 4096]));
    assert_eq!(d.read(5 * 1024 - 8, 69632), (OK, vec![0x62; 69632]));
    drop(d);
    s.stop();

    // QEMU reads back what we wrote, and the image is consistent.
    qemu_io(
        &img,
        false,
        &[
            "read -P 0x5a 0 5120",
            "read -P 0xa7 5120 512",
            "read -P 0x5a 5632 14848",
            "read -P 0 20480 4096",
            "read -P 0x5a 24576 40960",
            "read -P 0x33 1M 4k",
            "read -P 0 1052672 60k",
            "read -P 0x61 1536k 4k",
            "read -P 0 1540k 60k",
            "read -P 0x62 2617344 69632",
            "read -P 0 2686976 1507328",
        ],
    );
    let opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s0",
        p(&img)
    );
    let out = run(
        "qemu-img",
        &[
            "check",
            "--object",
            "secret,id=s0,data=pw",
            "--image-opts",
            &opts,
        ],
    );
    assert!(out.contains("No errors were found"), "{out}");
    // The data really is encrypted: no cluster of the file holds the plain bytes.
    let raw = std::fs::read(&img).unwrap();
    assert!(!raw.windows(512).any(|w| w == [0x62; 512]));
}

#[test]
fn a_plain_overlay_over_an_aes_image() {
    let dir = Dir::new("vmm-blk-pol-aes-chain");
    let base = dir.path("enc.qcow2");
    create_aes(&base, "2M");
    qemu_io(&base, false, &["write -P 0x5a 0 128k"]);
    let top = dir.path("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "enc.qcow2",
            "-F",
            "qcow2",
            p(&top),
            "2M",
        ],
    );
    let mut s = Supervised::start(&dir, &[]);
    let backing = vec![BackingImage {
        format: ImageFormat::Qcow2,
        filename: "enc.qcow2".into(),
    }];
    assert_eq!(
        s.attach(
            ImageFormat::Qcow2,
            backing,
            &[&rw(&top), &File::open(&base).unwrap()],
            ErrorAction::Report,
            ErrorAction::Enospc
        ),
        Ok((2 * MIB, true))
    );
    assert!(s
        .call(BlkRequest::SetKey {
            password: "pw".into()
        })
        .is_ok());
    let mut d = Driver::connect(&s.socket);
    assert_eq!(d.read(100, 4096), (OK, vec![0x5a; 4096]));
    // Part of a cluster: the rest comes from the backing image, decrypted, into the
    // (unencrypted) top.
    assert_eq!(d.write(8, &[0x77; 1024]), OK);
    assert_eq!(d.one(VIRTIO_BLK_T_FLUSH, 0, 0), OK);
    drop(d);
    s.stop();
    qemu_io(
        &top,
        true,
        &[
            "read -P 0x5a 0 4096",
            "read -P 0x77 4096 1024",
            "read -P 0x5a 5120 125952",
            "read -P 0 128k 1920k",
        ],
    );
    // The base is untouched.
    qemu_io(&base, false, &["read -P 0x5a 0 128k"]);
}

#[test]
fn set_key_is_refused_for_a_plain_disk() {
    let dir = Dir::new("vmm-blk-pol-nokey");
    let (mut s, d) = injected(&dir, &[], ErrorAction::Report, ErrorAction::Enospc);
    let err = s
        .call(BlkRequest::SetKey {
            password: "pw".into(),
        })
        .unwrap_err();
    assert!(err.contains("no encrypted image"), "{err}");
    drop(d);
    s.stop();
}

#[test]
fn standalone_refuses_an_encrypted_image() {
    let dir = Dir::new("vmm-blk-pol-aes-standalone");
    let img = dir.path("enc.qcow2");
    create_aes(&img, "1M");
    let socket = dir.path("sa.sock");
    let out = Command::new(BIN)
        .args([
            "--socket",
            p(&socket),
            "--image",
            p(&img),
            "--format",
            "qcow2",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("encrypted"), "{stderr}");
}

#[test]
fn stopping_the_ring_drops_held_requests_and_rewinds_to_them() {
    let dir = Dir::new("vmm-blk-pol-rewind");
    let (mut s, mut d) = injected(
        &dir,
        &[("VMM_BLK_TEST_FAIL_WRITES", "enospc")],
        ErrorAction::Report,
        ErrorAction::Stop,
    );
    assert_eq!(d.read(0, 512), (OK, vec![0x42; 512]));
    d.submit(1, VIRTIO_BLK_T_OUT, 0, 512);
    assert_eq!(s.failed().1, ErrorAction::Stop);
    d.submit(2, VIRTIO_BLK_T_IN, 0, 512);
    assert!(!d.wait_used(2, HELD));
    // GET_VRING_BASE (a reset): the ring goes back to the first held request, which a
    // frontend going on from there would submit again.
    assert_eq!(d._fe.get_vring_base(0).unwrap(), 1);
    assert_eq!(
        s.call(BlkRequest::Resume),
        Ok(BlkReply::Resumed { retried: 0 })
    );
    assert_eq!(d.used(), 1);
    drop(d);
    s.stop();
}
