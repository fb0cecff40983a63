//! `vmm-blk` in standalone mode, driven by the `vhost` crate's frontend: the features and
//! configuration it offers, a read and a write through a real vring in a memfd shared with
//! it, serving one frontend after another, image locking, SIGTERM, and command-line
//! errors. The sandbox needs root (namespaces, pivot_root), as in CI.

#[allow(dead_code)] // Of what the tests share, only the daemon serves here.
mod common;

use common::daemon::Daemon;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BIN: &str = env!("CARGO_BIN_EXE_vmm-blk");
const T: Duration = Duration::from_secs(20);
/// 1 MiB and a partial sector: 2048 sectors are served.
const IMAGE_LEN: usize = (1 << 20) + 100;
const SECTORS: u64 = 2048;

/// A temp directory with an image where sector n holds byte n % 251, removed on drop.
struct Setup {
    dir: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmm-blk-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let image: Vec<u8> = (0..IMAGE_LEN).map(|i| ((i / 512) % 251) as u8).collect();
        std::fs::write(dir.join("disk.img"), image).unwrap();
        Setup { dir }
    }
    fn image(&self) -> PathBuf {
        self.dir.join("disk.img")
    }
    fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Run vmm-blk to completion; its status and stderr.
fn run(args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn offered(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

#[test]
fn features_config_and_reconnection() {
    let setup = Setup::new();
    let socket = setup.socket("blk.sock");
    let mut d = Daemon::start(&setup.image(), &socket, &["--num-queues", "2"]);
    let open_fds = |d: &Daemon| {
        std::fs::read_dir(format!("/proc/{}/fd", d.child.id()))
            .unwrap()
            .count()
    };
    let mut fds_after_first = 0;
    for round in 0..4 {
        let mut fe = d.connect(&socket);
        let features = fe.get_features().unwrap();
        assert!(offered(features, VIRTIO_F_VERSION_1), "{features:#x}");
        assert!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0,
            "{features:#x}"
        );
        fe.set_owner().unwrap();
        fe.set_features(features).unwrap();
        let protocol = fe.get_protocol_features().unwrap();
        assert!(
            protocol.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ)
        );
        fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ)
            .unwrap();
        assert_eq!(fe.get_queue_num().unwrap(), 2);
        let (_, config) = fe
            .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
            .unwrap();
        assert_eq!(config.len(), 60);
        let capacity = u64::from_le_bytes(config[0..8].try_into().unwrap());
        assert_eq!(capacity, SECTORS, "round {round}");
        let blk_size = u32::from_le_bytes(config[20..24].try_into().unwrap());
        assert_eq!(blk_size, 512);
        let num_queues = u16::from_le_bytes(config[34..36].try_into().unwrap());
        assert_eq!(num_queues, 2);
        // While a connection is served, the earlier ones' fds are all closed.
        match round {
            0 => fds_after_first = open_fds(&d),
            _ => assert_eq!(open_fds(&d), fds_after_first, "fds leak across connections"),
        }
        // The frontend goes away; the next round is a new connection.
        drop(fe);
    }
    assert!(
        d.wait(Duration::from_millis(100)).is_none(),
        "vmm-blk exited"
    );
}

#[test]
fn a_second_instance_on_the_same_image_is_refused() {
    let setup = Setup::new();
    let mut first = Daemon::start(&setup.image(), &setup.socket("a.sock"), &[]);
    let _fe = first.connect(&setup.socket("a.sock"));
    let image = setup.image().display().to_string();
    let other = setup.socket("b.sock").display().to_string();
    for extra in [None, Some("--readonly")] {
        let mut args = vec!["--socket", &other, "--image", &image];
        args.extend(extra);
        let (status, stderr) = run(&args);
        assert_eq!(status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains("lock"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(!setup.socket("b.sock").exists());
    }
    // Readers share an image.
    drop(_fe);
    drop(first);
    let _r1 = Daemon::start(&setup.image(), &setup.socket("r1.sock"), &["--readonly"]);
    let _r2 = Daemon::start(&setup.image(), &setup.socket("r2.sock"), &["--readonly"]);
}

#[test]
fn bad_arguments_and_missing_images_are_one_line_errors() {
    let setup = Setup::new();
    let socket = setup.socket("s.sock").display().to_string();
    let missing = setup.dir.join("missing.img").display().to_string();
    for (args, expect) in [
        (vec!["--socket", socket.as_str()], "--image"),
        (vec!["--image"], "--image"),
        (vec!["--bogus"], "--bogus"),
        (
            vec!["--socket", &socket, "--image", &missing],
            "cannot open image",
        ),
        (
            vec![
                "--socket",
                &socket,
                "--image",
                &missing,
                "--num-queues",
                "x",
            ],
            "--num-queues",
        ),
    ] {
        let (status, stderr) = run(&args);
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.starts_with("vmm-blk: "), "{stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn sigterm_exits_cleanly() {
    let setup = Setup::new();
    let socket = setup.socket("t.sock");
    let mut d = Daemon::start(&setup.image(), &socket, &[]);
    let _fe = d.connect(&socket);
    // SAFETY: kill with a pid we started and a signal number.
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) }, 0);
    let status = d.wait(T).expect("vmm-blk did not exit on SIGTERM");
    assert!(status.success(), "{status} (signal {:?})", status.signal());
}

/// Guest RAM for the test: a memfd, mapped here and passed to vmm-blk.
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

fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
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
    fd.read().unwrap();
}

/// Negotiate (no EVENT_IDX: every completion notifies), share `mem` and set up queue 0
/// as `q` lays it out, starting at avail index `base`. The call and kick eventfds.
fn set_up_vring(
    fe: &mut Frontend,
    mem: &GuestMemoryMmap,
    q: &MockSplitQueue<GuestMemoryMmap>,
    base: u16,
) -> (EventFd, EventFd) {
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let region = mem.iter().next().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_owner().unwrap();
    fe.set_features(
        features & (1 << VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()),
    )
    .unwrap();
    fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG)
        .unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
        .unwrap();
    fe.set_vring_num(0, 16).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 16,
            queue_size: 16,
            flags: 0,
            desc_table_addr: host + q.desc_table_addr().0,
            used_ring_addr: host + q.used_addr().0,
            avail_ring_addr: host + q.avail_addr().0,
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, base).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    (call, kick)
}

#[test]
fn requests_through_a_shared_memory_vring() {
    let setup = Setup::new();
    let socket = setup.socket("io.sock");
    let mut d = Daemon::start(&setup.image(), &socket, &["--serial", "vmm-blk-test"]);
    let mut fe = d.connect(&socket);

    let mem = guest_memory(1 << 20);
    let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let features = fe.get_features().unwrap();
    let (call, kick) = set_up_vring(&mut fe, &mem, &q, 0);

    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    let (r, w, n) = (0, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT);
    let used_elem = |i: u16| q.used().ring().ref_at(i as usize).unwrap().load();
    let status = || mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap();

    // 1. Read sectors 3 and 4.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    q.add_desc_chains(
        &[
            desc(HDR, 16, r | n, 1),
            desc(DATA, 1024, w | n, 2),
            desc(STATUS, 1, w, 0),
        ],
        0,
    )
    .unwrap();
    kick.write(1).unwrap();
    wait_readable(&call);
    assert_eq!(u16::from_le(q.used().idx().load()), 1);
    assert_eq!((used_elem(0).id(), used_elem(0).len()), (0, 1025));
    assert_eq!(status(), VIRTIO_BLK_S_OK as u8);
    let mut buf = vec![0u8; 1024];
    mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 3) && buf[512..].iter().all(|&b| b == 4));

    // 2. Write sector 7, in two data buffers.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 7);
    mem.write_slice(&[0xa5u8; 512], GuestAddress(DATA)).unwrap();
    q.add_desc_chains(
        &[
            desc(HDR, 16, r | n, 4),
            desc(DATA, 256, r | n, 5),
            desc(DATA + 256, 256, r | n, 6),
            desc(STATUS, 1, w, 0),
        ],
        3,
    )
    .unwrap();
    kick.write(1).unwrap();
    wait_readable(&call);
    assert_eq!(u16::from_le(q.used().idx().load()), 2);
    assert_eq!((used_elem(1).id(), used_elem(1).len()), (3, 1));
    assert_eq!(status(), VIRTIO_BLK_S_OK as u8);
    let image = std::fs::read(setup.image()).unwrap();
    assert!(image[7 * 512..8 * 512].iter().all(|&b| b == 0xa5));
    assert!(image[8 * 512..9 * 512].iter().all(|&b| b == 8));

    // 3. GET_ID.
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    q.add_desc_chains(
        &[
            desc(HDR, 16, r | n, 8),
            desc(DATA, 20, w | n, 9),
            desc(STATUS, 1, w, 0),
        ],
        7,
    )
    .unwrap();
    kick.write(1).unwrap();
    wait_readable(&call);
    assert_eq!((used_elem(2).id(), used_elem(2).len()), (7, 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"vmm-blk-test\0\0\0\0\0\0\0\0");

    // 4. A malicious chain (data outside guest memory) fails alone; the device serves on.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    q.add_desc_chains(
        &[
            desc(HDR, 16, r | n, 11),
            desc(0xffff_0000_0000, 512, w | n, 12),
            desc(STATUS, 1, w, 0),
        ],
        10,
    )
    .unwrap();
    kick.write(1).unwrap();
    wait_readable(&call);
    assert_eq!((used_elem(3).id(), used_elem(3).len()), (10, 1));
    assert_ne!(status(), VIRTIO_BLK_S_OK as u8);
    assert!(d.wait(Duration::from_millis(50)).is_none(), "vmm-blk died");
    assert_eq!(fe.get_features().unwrap(), features);

    // 5. FLUSH, WRITE_ZEROES and DISCARD (fdatasync and fallocate in the sandbox).
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    q.add_desc_chains(&[desc(HDR, 16, r | n, 14), desc(STATUS, 1, w, 0)], 13)
        .unwrap();
    kick.write(1).unwrap();
    wait_readable(&call);
    assert_eq!((used_elem(4).id(), used_elem(4).len()), (13, 1));
    assert_eq!(status(), VIRTIO_BLK_S_OK as u8);
    for (i, (kind, sector, sectors)) in [
        (VIRTIO_BLK_T_WRITE_ZEROES, 7u64, 1u32),
        (VIRTIO_BLK_T_DISCARD, 16, 16),
    ]
    .into_iter()
    .enumerate()
    {
        header(&mem, HDR, kind, 0);
        let mut range = [0u8; 16];
        range[0..8].copy_from_slice(&sector.to_le_bytes());
        range[8..12].copy_from_slice(&sectors.to_le_bytes());
        mem.write_slice(&range, GuestAddress(DATA)).unwrap();
        let at = 3 * i as u16;
        q.add_desc_chains(
            &[
                desc(HDR, 16, r | n, at + 1),
                desc(DATA, 16, r | n, at + 2),
                desc(STATUS, 1, w, 0),
            ],
            at,
        )
        .unwrap();
        kick.write(1).unwrap();
        wait_readable(&call);
        assert_eq!(u16::from_le(q.used().idx().load()), 6 + i as u16);
        assert_eq!(status(), VIRTIO_BLK_S_OK as u8, "request type {kind}");
    }
    let image = std::fs::read(setup.image()).unwrap();
    assert!(image[7 * 512..8 * 512].iter().all(|&b| b == 0));
    assert_eq!(image.len(), IMAGE_LEN);
    assert!(d.wait(Duration::from_millis(50)).is_none(), "vmm-blk died");
}

/// What the vmm does when a device process dies: start another, connect, and set the
/// queue up again from the guest-visible used index. A request made while nobody served
/// the queue is then processed.
#[test]
fn a_restarted_process_resumes_the_queue() {
    let setup = Setup::new();
    let socket = setup.socket("re.sock");
    let mem = guest_memory(1 << 20);
    let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    let (r, w, n) = (0, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT);
    let read = |sector: u64, at: u16| {
        header(&mem, HDR, VIRTIO_BLK_T_IN, sector);
        q.add_desc_chains(
            &[
                desc(HDR, 16, r | n, at + 1),
                desc(DATA, 512, w | n, at + 2),
                desc(STATUS, 1, w, 0),
            ],
            at,
        )
        .unwrap();
    };

    let mut first = Daemon::start(&setup.image(), &socket, &[]);
    let mut fe = first.connect(&socket);
    let (call, kick) = set_up_vring(&mut fe, &mem, &q, 0);
    read(5, 0);
    kick.write(1).unwrap();
    wait_readable(&call);
    assert_eq!(u16::from_le(q.used().idx().load()), 1);

    // kill -9; the guest queues another request meanwhile.
    drop(first);
    drop(fe);
    read(6, 3);
    // (Daemon::start waits for the socket to appear.)
    std::fs::remove_file(&socket).unwrap();
    let mut second = Daemon::start(&setup.image(), &socket, &[]);
    let mut fe = second.connect(&socket);
    let used = u16::from_le(q.used().idx().load());
    let (call, kick) = set_up_vring(&mut fe, &mem, &q, used);
    kick.write(1).unwrap();
    wait_readable(&call);
    assert_eq!(u16::from_le(q.used().idx().load()), 2);
    let elem = q.used().ring().ref_at(1).unwrap().load();
    assert_eq!((elem.id(), elem.len()), (3, 513));
    let mut buf = [0u8; 512];
    mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, [6u8; 512]);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
}
