//! A supervised `vmm-blk` (control socket at fd 3, vhost-user listener at fd 4, as the vmm
//! starts it) and a virtio-blk driver on one vring in a memfd: what the format and block
//! migration tests drive it with.

use super::Dir;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ipc::blk::{
    AttachConfig, BackingImage, BlkChannel, BlkReply, BlkRequest, ImageChain, ImageFormat,
};
use ipc::DeviceKind;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const BIN: &str = env!("CARGO_BIN_EXE_vmm-blk");
pub const T: Duration = Duration::from_secs(30);
pub const QSIZE: u16 = 16;
/// Guest addresses: headers, data (up to 1 MiB), status bytes.
pub const HDR: u64 = 0x1_0000;
pub const DATA: u64 = 0x10_0000;
pub const STATUS: u64 = 0x3_0000;
/// Our own ring layout (the mock queue packs the used ring into a 16-entry avail ring).
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;

pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-img {args:?}: {text}");
    text
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A copy of `fd` numbered 10 or above, closed on exec.
pub fn high_fd(fd: &impl AsFd) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC on an open fd returns a new fd that we own.
    let n = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    assert!(n >= 10);
    // SAFETY: just created, owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(n) }
}

/// vmm-blk supervised by this test: its control channel and vhost-user socket.
pub struct Supervised {
    pub child: Child,
    pub ch: BlkChannel,
    pub socket: PathBuf,
}

impl Supervised {
    pub fn start(dir: &Dir) -> Supervised {
        let socket = dir.path("vhost.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let control = high_fd(&theirs);
        let listener_fd = high_fd(&listener);
        let (c, l): (RawFd, RawFd) = (control.as_raw_fd(), listener_fd.as_raw_fd());
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
        let child = cmd.spawn().unwrap();
        let mut ch = BlkChannel::new(ours);
        ch.hello(DeviceKind::Block, DeviceKind::Block, T).unwrap();
        Supervised { child, ch, socket }
    }

    pub fn attach(
        &mut self,
        format: ImageFormat,
        backing: Vec<BackingImage>,
        files: &[&File],
    ) -> Result<u64, String> {
        let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        let req = BlkRequest::AttachChain {
            config: AttachConfig {
                readonly: false,
                serial: "fmt".into(),
                num_queues: 1,
                queue_size: QSIZE,
                error_policy: Default::default(),
            },
            chain: ImageChain { format, backing },
        };
        match self.ch.call(req, &fds, T) {
            Ok((BlkReply::Attached { size, .. }, _)) => Ok(size),
            Ok((other, _)) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn call(&mut self, req: BlkRequest, fds: &[&File]) -> Result<BlkReply, String> {
        let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        self.ch
            .call(req, &fds, T)
            .map(|(r, _)| r)
            .map_err(|e| e.to_string())
    }

    pub fn stats(&mut self) -> ipc::blk::BlockStats {
        match self.call(BlkRequest::Stats, &[]) {
            Ok(BlkReply::Stats(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    /// Close the control socket and wait for the process (and its sandbox) to exit.
    pub fn stop(mut self) {
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
        // The inner process of the sandbox dies with the outer one; give it a moment to
        // close the images.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Guest RAM for the test: a memfd, mapped here and passed to vmm-blk.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
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

pub fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
}

/// A virtio-blk driver on one queue of `QSIZE`, up to five requests in flight.
pub struct Driver {
    _fe: Frontend,
    pub mem: GuestMemoryMmap,
    q: MockSplitQueue<'static, GuestMemoryMmap>,
    call: EventFd,
    kick: EventFd,
    avail: u16,
}

impl Driver {
    pub fn connect(socket: &Path) -> Driver {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(guest_memory(4 << 20)));
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

    pub fn capacity(&mut self) -> u64 {
        let (_, config) = self
            ._fe
            .get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8])
            .unwrap();
        u64::from_le_bytes(config[..8].try_into().unwrap())
    }

    /// Submit the requests (type, sector, data address, data length; the data is
    /// device-readable for writes and the range payload) together and wait for all; their
    /// status bytes.
    pub fn batch(&mut self, reqs: &[(u32, u64, u64, u32)]) -> Vec<u8> {
        assert!(reqs.len() * 3 <= QSIZE as usize);
        let (r, w, n) = (0, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT);
        for (i, &(kind, sector, data, len)) in reqs.iter().enumerate() {
            let hdr = HDR + 16 * i as u64;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            let status = STATUS + i as u64;
            self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
            let at = 3 * i as u16;
            let dflags = if kind == VIRTIO_BLK_T_IN { w } else { r };
            let chain = if len == 0 {
                vec![desc(hdr, 16, r | n, at + 1), desc(status, 1, w, 0)]
            } else {
                vec![
                    desc(hdr, 16, r | n, at + 1),
                    desc(data, len, dflags | n, at + 2),
                    desc(status, 1, w, 0),
                ]
            };
            for (j, d) in chain.iter().enumerate() {
                self.q.desc_table().store(at + j as u16, *d).unwrap();
            }
            let slot = GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail % QSIZE));
            self.mem.write_obj(u16::to_le(at), slot).unwrap();
            self.avail = self.avail.wrapping_add(1);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .write_obj(u16::to_le(self.avail), GuestAddress(AVAIL + 2))
            .unwrap();
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + T;
        while u16::from_le(self.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap()) != self.avail
        {
            assert!(Instant::now() < deadline, "requests not completed");
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one pollfd we own.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let _ = self.call.read();
        }
        (0..reqs.len())
            .map(|i| {
                self.mem
                    .read_obj::<u8>(GuestAddress(STATUS + i as u64))
                    .unwrap()
            })
            .collect()
    }

    pub fn ok(&mut self, reqs: &[(u32, u64, u64, u32)]) {
        let status = self.batch(reqs);
        assert!(
            status.iter().all(|&s| s == VIRTIO_BLK_S_OK as u8),
            "{status:?} for {reqs:?}"
        );
    }

    pub fn write(&mut self, sector: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
        self.ok(&[(VIRTIO_BLK_T_OUT, sector, DATA, data.len() as u32)]);
    }

    pub fn read(&mut self, sector: u64, len: usize) -> Vec<u8> {
        self.ok(&[(VIRTIO_BLK_T_IN, sector, DATA, len as u32)]);
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        buf
    }

    pub fn flush(&mut self) {
        self.ok(&[(VIRTIO_BLK_T_FLUSH, 0, 0, 0)]);
    }

    /// A discard or write-zeroes range request.
    pub fn range(&mut self, kind: u32, sector: u64, sectors: u32, flags: u32) {
        let mut r = [0u8; 16];
        r[0..8].copy_from_slice(&sector.to_le_bytes());
        r[8..12].copy_from_slice(&sectors.to_le_bytes());
        r[12..16].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&r, GuestAddress(DATA)).unwrap();
        self.ok(&[(kind, 0, DATA, 16)]);
    }
}

pub fn rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

/// `len` bytes of a pattern that depends on `seed` and the position.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32 / 512)
                .wrapping_mul(31)
                .wrapping_add(seed.wrapping_mul(7)) as u8
                | 1
        })
        .collect()
}

pub fn check_clean(image: &Path) {
    let out = qemu_img(&["check", p(image)]);
    assert!(out.contains("No errors were found"), "{out}");
}

/// `qemu-img compare` of a qcow2 image with the expected raw contents.
pub fn compare(dir: &Dir, image: &Path, expected: &[u8]) {
    compare_format(dir, image, "qcow2", expected)
}

/// `qemu-img compare` of an image of `format` with the expected raw contents.
pub fn compare_format(dir: &Dir, image: &Path, format: &str, expected: &[u8]) {
    let raw = dir.path("expected.raw");
    std::fs::write(&raw, expected).unwrap();
    let out = qemu_img(&["compare", "-f", format, "-F", "raw", p(image), p(&raw)]);
    assert!(out.contains("Images are identical"), "{out}");
}
