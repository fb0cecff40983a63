//! The migration dirty log of the device processes' vhost-user backends, driven by the
//! `vhost` crate's frontend the way a migrating vmm drives it (QEMU's order): LOG_SHMFD
//! negotiated, SET_LOG_BASE with a memfd, SET_FEATURES with VHOST_F_LOG_ALL, and
//! SET_VRING_ADDR again with VHOST_VRING_F_LOG; then a request that makes the backend
//! write guest memory. The log must then hold exactly the pages written (the data and the
//! used ring), one bit per 4 KiB page: `log[page / 8]` bit `page % 8`.
//!
//! vmm-blk runs as the real process (standalone, in its sandbox: needs root, as in CI) on
//! a raw image (pread straight into guest memory, marked by hand) and on a qcow2 image
//! made by qemu-img (imago's I/O vectors). vmm-net's (a frame copied into the RX buffers
//! and the header written by hand), vmm-scsi's and virtio-input's backends (writes through
//! vm-memory) are served in this process by the daemon code the processes run
//! (`vhost_daemon::serve_one`).

mod common;

use common::daemon::Daemon;
use common::Dir;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use device_procs::display::input::{InputBackend, InputEvent, ABS_X, EV_ABS};
use device_procs::net::backend::NetBackend;
use device_procs::net::port::{Port, QueuedPort};
use device_procs::scsi::backend::ScsiBackend;
use device_procs::scsi::bus::Bus;
use device_procs::scsi::cdrom::Medium;
use device_procs::vhost_daemon::{self, Served};
use ipc::display::InputKind;
use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserVirtioFeatures, VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, Listener, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const T: Duration = Duration::from_secs(20);
const PAGE: u64 = 0x1000;
/// 1 MiB of guest RAM: 256 pages, a 32-byte log.
const MEM_SIZE: usize = 1 << 20;
/// The log memfd (larger than needed, as a frontend may make it).
const LOG_SIZE: u64 = 4096;
const QSIZE: u16 = 16;
/// The ring: descriptors, avail ring and used ring in pages of their own, so that the log
/// tells them apart.
const RING: u64 = 0x1_0000;
const USED_PAGE: u64 = RING / PAGE + 2;

fn memfd(name: &str, size: u64) -> File {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create with a valid C string; the new fd is ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned by nothing else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).unwrap();
    file
}

/// Guest RAM: a memfd, mapped here and shared with the backend.
fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(memfd("guest-ram", MEM_SIZE as u64), 0)),
    )])
    .unwrap()
}

/// The frontend's dirty log: a memfd, one bit per guest page.
struct Log(File);

impl Log {
    fn new() -> Log {
        Log(memfd("dirty-log", LOG_SIZE))
    }

    /// Hand it to the backend (as QEMU does when a migration starts).
    fn send(&self, fe: &Frontend) {
        fe.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: LOG_SIZE,
                mmap_offset: 0,
                mmap_handle: self.0.as_raw_fd(),
            }),
        )
        .unwrap();
    }

    /// The pages whose bits are set, in order.
    fn dirty_pages(&self) -> Vec<u64> {
        let mut log = vec![0u8; LOG_SIZE as usize];
        self.0.read_exact_at(&mut log, 0).unwrap();
        (0..LOG_SIZE * 8)
            .filter(|page| log[(page / 8) as usize] & (1 << (page % 8)) != 0)
            .collect()
    }

    /// What a frontend does once it has sent the pages.
    fn clear(&self) {
        self.0
            .write_all_at(&vec![0u8; LOG_SIZE as usize], 0)
            .unwrap();
    }
}

/// A split ring laid out at `RING`: descriptors, then the avail ring and the used ring a
/// page apart.
struct Ring<'m> {
    mem: &'m GuestMemoryMmap,
    next_desc: u16,
    avail_idx: u16,
}

impl<'m> Ring<'m> {
    fn new(mem: &'m GuestMemoryMmap) -> Ring<'m> {
        Ring {
            mem,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn desc_addr() -> u64 {
        RING
    }

    fn avail_addr() -> u64 {
        RING + PAGE
    }

    fn used_addr() -> u64 {
        RING + 2 * PAGE
    }

    /// Make a chain of buffers (address, length, device-writable) available.
    fn push(&mut self, bufs: &[(u64, u32, bool)]) {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            let next = (index + 1) % QSIZE;
            let last = i + 1 == bufs.len();
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
            d[14..16].copy_from_slice(&(if last { 0 } else { next }).to_le_bytes());
            self.mem
                .write_slice(&d, GuestAddress(Self::desc_addr() + 16 * u64::from(index)))
                .unwrap();
            self.next_desc = next;
        }
        let slot = Self::avail_addr() + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The entry before the index, as a driver's write barrier orders them.
        fence(Ordering::SeqCst);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(Self::avail_addr() + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        u16::from_le(
            self.mem
                .read_obj(GuestAddress(Self::used_addr() + 2))
                .unwrap(),
        )
    }

    /// Used element `i`: the head and the length written.
    fn used(&self, i: u16) -> (u32, u32) {
        let at = Self::used_addr() + 4 + 8 * u64::from(i % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// The ring's addresses in this process, with or without VHOST_VRING_F_LOG.
    fn config(&self, log: bool) -> VringConfigData {
        let host = self.mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: if log {
                VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
            } else {
                0
            },
            desc_table_addr: host + Self::desc_addr(),
            used_ring_addr: host + Self::used_addr(),
            avail_ring_addr: host + Self::avail_addr(),
            // The used ring's guest address, where a kernel vhost would log from.
            log_addr: log.then_some(Self::used_addr()),
        }
    }
}

/// Wait for the used-buffer notification.
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

/// A frontend on one queue of a backend, logging like a migrating vmm.
struct Session<'m> {
    fe: Frontend,
    features: u64,
    queue: usize,
    ring: Ring<'m>,
    log: Log,
    call: EventFd,
    kick: EventFd,
}

impl<'m> Session<'m> {
    /// Negotiate `wanted` of the offered features (not LOG_ALL yet: a vmm sets it when a
    /// migration starts) and LOG_SHMFD with `protocol`, share `mem`, and start queue
    /// `queue` on an empty ring.
    fn start(
        mut fe: Frontend,
        mem: &'m GuestMemoryMmap,
        wanted: u64,
        protocol: VhostUserProtocolFeatures,
        queue: usize,
    ) -> Session<'m> {
        let offered = fe.get_features().unwrap();
        assert_ne!(
            offered & vhost_daemon::LOG_ALL,
            0,
            "VHOST_F_LOG_ALL offered"
        );
        let features = offered
            & (wanted
                | 1 << VIRTIO_F_VERSION_1
                | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        fe.set_owner().unwrap();
        fe.set_features(features).unwrap();
        let offered = fe.get_protocol_features().unwrap();
        assert!(offered.contains(VhostUserProtocolFeatures::LOG_SHMFD));
        fe.set_protocol_features(protocol | VhostUserProtocolFeatures::LOG_SHMFD)
            .unwrap();
        let region = mem.iter().next().unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
            .unwrap();
        let ring = Ring::new(mem);
        fe.set_vring_num(queue, QSIZE).unwrap();
        fe.set_vring_addr(queue, &ring.config(false)).unwrap();
        fe.set_vring_base(queue, 0).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        fe.set_vring_call(queue, &call).unwrap();
        fe.set_vring_kick(queue, &kick).unwrap();
        fe.set_vring_enable(queue, true).unwrap();
        Session {
            fe,
            features,
            queue,
            ring,
            log: Log::new(),
            call,
            kick,
        }
    }

    /// Start logging, in QEMU's order (vhost_migration_log): the log, LOG_ALL, and the
    /// ring's addresses again with VHOST_VRING_F_LOG.
    fn start_logging(&mut self) {
        self.log.send(&self.fe);
        self.fe
            .set_features(self.features | vhost_daemon::LOG_ALL)
            .unwrap();
        self.fe
            .set_vring_addr(self.queue, &self.ring.config(true))
            .unwrap();
        // Nothing written yet but, perhaps, the used ring's flags: vhost-user-backend runs
        // a ring's handler once when the ring starts, and an empty ring turns
        // notifications on (which is logged if that comes after SET_LOG_BASE).
        let logged = self.log.dirty_pages();
        assert!(logged.iter().all(|&p| p == USED_PAGE), "{logged:x?}");
    }

    /// Make `bufs` available, kick, and wait for the used-buffer notification.
    fn run(&mut self, bufs: &[(u64, u32, bool)]) {
        self.ring.push(bufs);
        self.kick.write(1).unwrap();
        wait_readable(&self.call);
    }

    /// The pages the backend logged.
    fn dirty_pages(&self) -> Vec<u64> {
        self.log.dirty_pages()
    }
}

/// Serve `backend` in this process as its device process does, one connection; the
/// frontend connected to it.
fn serve_here<B: Served + Send + Sync>(
    dir: &Dir,
    backend: Arc<B>,
) -> (Frontend, JoinHandle<Result<(), vhost_daemon::DaemonError>>) {
    let path = dir.path("vhost.sock");
    let mut listener = Listener::from(UnixListener::bind(&path).unwrap());
    let server = std::thread::spawn(move || vhost_daemon::serve_one(&backend, &mut listener));
    (Frontend::connect(&path, 8).unwrap(), server)
}

/// Every page of `addr..addr + len`.
fn pages(addr: u64, len: u64) -> Vec<u64> {
    (addr / PAGE..=(addr + len - 1) / PAGE).collect()
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v.dedup();
    v
}

/// An image where sector n holds byte n % 251 (2048 sectors).
fn patterned_image(dir: &Dir) -> PathBuf {
    let image: Vec<u8> = (0..1usize << 20).map(|i| ((i / 512) % 251) as u8).collect();
    let path = dir.path("disk.img");
    std::fs::write(&path, image).unwrap();
    path
}

fn blk_header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

/// A read into two data buffers (one across a page boundary) logs exactly their pages,
/// the status byte's and the used ring's; a write logs only the status byte's and the
/// used ring's (the data is read from the guest).
fn blk_reads_and_writes_are_logged(image: &Path, extra: &[&str], dir: &Dir) {
    let socket = dir.path("blk.sock");
    let _process = Daemon::start(image, &socket, extra);
    let mem = guest_memory();
    let fe = Frontend::connect(&socket, 1).unwrap();
    let mut s = Session::start(fe, &mem, 0, VhostUserProtocolFeatures::CONFIG, 0);

    const HDR: u64 = 0x3_0000;
    const DATA1: u64 = 0x5_0e00; // 1024 bytes: pages 0x50 and 0x51
    const DATA2: u64 = 0x7_0000; // 512 bytes: page 0x70
    const STATUS: u64 = 0x9_0800;
    // A request before there is a log (its writes are logged nowhere).
    blk_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    s.run(&[(HDR, 16, false), (DATA2, 512, true), (STATUS, 1, true)]);
    assert_eq!(s.ring.used(0), (0, 513));

    s.start_logging();
    blk_header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    s.run(&[
        (HDR, 16, false),
        (DATA1, 1024, true),
        (DATA2, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(s.ring.used_idx(), 2);
    assert_eq!(s.ring.used(1), (3, 1024 + 512 + 1));
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
    let mut data = vec![0u8; 1536];
    mem.read_slice(&mut data[..1024], GuestAddress(DATA1))
        .unwrap();
    mem.read_slice(&mut data[1024..], GuestAddress(DATA2))
        .unwrap();
    for (i, chunk) in data.chunks(512).enumerate() {
        assert!(chunk.iter().all(|&b| b == 3 + i as u8), "sector {}", 3 + i);
    }
    assert_eq!(
        s.dirty_pages(),
        sorted(vec![0x50, 0x51, 0x70, STATUS / PAGE, USED_PAGE]),
        "data, status and used ring pages"
    );

    s.log.clear();
    blk_header(&mem, HDR, VIRTIO_BLK_T_OUT, 9);
    mem.write_slice(&[0x5au8; 512], GuestAddress(DATA2))
        .unwrap();
    s.run(&[(HDR, 16, false), (DATA2, 512, false), (STATUS, 1, true)]);
    assert_eq!(s.ring.used(2), (7, 1));
    assert_eq!(
        s.dirty_pages(),
        [USED_PAGE, STATUS / PAGE],
        "a write only logs its status byte and the used ring"
    );
}

#[test]
fn vmm_blk_logs_preads_into_guest_memory() {
    let dir = Dir::new("dirty-log-raw");
    let image = patterned_image(&dir);
    blk_reads_and_writes_are_logged(&image, &[], &dir);
}

#[test]
fn vmm_blk_logs_reads_through_a_format() {
    let dir = Dir::new("dirty-log-qcow2");
    let raw = patterned_image(&dir);
    let qcow2 = dir.path("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    blk_reads_and_writes_are_logged(&qcow2, &["--format", "qcow2"], &dir);
}

/// A frame from the port lands in the RX buffers through raw pointers (the port copies
/// it, the header is written by hand): exactly the bytes written are logged, across
/// pages and across the chains of a mergeable frame, and not the buffers' unused rest.
#[test]
fn vmm_net_logs_received_frames() {
    let dir = Dir::new("dirty-log-net");
    let port = Arc::new(QueuedPort::new(8).unwrap());
    let backend =
        Arc::new(NetBackend::new(vec![port.clone() as Arc<dyn Port>], 256, false, false).unwrap());
    let (fe, server) = serve_here(&dir, backend);
    let mem = guest_memory();
    let mut s = Session::start(
        fe,
        &mem,
        1 << VIRTIO_NET_F_MRG_RXBUF,
        VhostUserProtocolFeatures::MQ,
        0,
    );
    s.start_logging();

    // One 12 KiB buffer from 0x5_0ff8: the 12-byte header goes across pages 0x50 and
    // 0x51, the 5000-byte frame from 0x5_1004 to 0x5_238c; page 0x53 stays clean.
    let frame: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
    port.push_rx(&frame);
    s.run(&[(0x5_0ff8, 0x3000, true)]);
    assert_eq!(s.ring.used(0), (0, 12 + 5000));
    let mut got = vec![0u8; 5000];
    mem.read_slice(&mut got, GuestAddress(0x5_1004)).unwrap();
    assert_eq!(got, frame);
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(0x5_0ff8 + 10)).unwrap(),
        1,
        "num_buffers"
    );
    assert_eq!(s.dirty_pages(), [USED_PAGE, 0x50, 0x51, 0x52]);

    // A mergeable frame over two chains of 1 KiB (header and 1012 bytes, then 488
    // bytes); the third chain is not needed.
    s.log.clear();
    let frame = vec![0xa5u8; 1500];
    port.push_rx(&frame);
    s.ring.push(&[(0x6_0000, 1024, true)]);
    s.ring.push(&[(0x8_0000, 1024, true)]);
    s.run(&[(0xa_0000, 1024, true)]);
    assert_eq!(s.ring.used_idx(), 3);
    assert_eq!((s.ring.used(1).1, s.ring.used(2).1), (1024, 488));
    assert_eq!(s.dirty_pages(), [USED_PAGE, 0x60, 0x80]);

    drop(s);
    server.join().unwrap().unwrap();
}

/// virtio-input writes an event with `write_slice`: logged by vm-memory itself (here an
/// event across a page boundary).
#[test]
fn virtio_input_logs_events() {
    let dir = Dir::new("dirty-log-input");
    let backend = Arc::new(InputBackend::new(InputKind::Tablet).unwrap());
    let (fe, server) = serve_here(&dir, backend.clone());
    let mem = guest_memory();
    let mut s = Session::start(fe, &mem, 0, VhostUserProtocolFeatures::MQ, 0);
    s.start_logging();
    backend.push(&[InputEvent::new(EV_ABS, ABS_X, 0x1234)]);
    s.run(&[(0x5_0ffc, 8, true)]);
    assert_eq!(s.ring.used(0), (0, 8));
    let mut event = [0u8; 8];
    mem.read_slice(&mut event, GuestAddress(0x5_0ffc)).unwrap();
    assert_eq!(event, [3, 0, 0, 0, 0x34, 0x12, 0, 0]);
    assert_eq!(s.dirty_pages(), [USED_PAGE, 0x50, 0x51]);
    drop(s);
    server.join().unwrap().unwrap();
}

/// vmm-scsi writes its response and a READ's data with `write_slice`: logged by vm-memory.
#[test]
fn vmm_scsi_logs_read_data_and_responses() {
    let dir = Dir::new("dirty-log-scsi");
    let medium = memfd("cd", 0);
    for b in 0..4u8 {
        medium
            .write_all_at(&[b + 1; 2048], u64::from(b) * 2048)
            .unwrap();
    }
    let bus = Arc::new(Bus::new(None));
    bus.add_cdrom(0, 0, "cd0", "", Some(Medium::new(medium).unwrap()))
        .unwrap();
    let backend = Arc::new(ScsiBackend::new(bus, 1, 128).unwrap());
    let (fe, server) = serve_here(&dir, backend);
    let mem = guest_memory();
    // The first request queue (after the control and event queues).
    let mut s = Session::start(fe, &mem, 0, VhostUserProtocolFeatures::CONFIG, 2);

    const REQ: u64 = 0x3_0000;
    const RESP: u64 = 0x4_0fc0; // 108 bytes: pages 0x40 and 0x41
    const DATA: u64 = 0x6_0c00; // 2048 bytes: pages 0x60 and 0x61
    let request = |cdb: &[u8]| {
        let mut req = [0u8; 19 + 32];
        req[0] = 1; // target 0
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    };
    // Past the power-on unit attention (before the log).
    request(&[0x03, 0, 0, 0, 18]);
    s.run(&[(REQ, 51, false), (RESP, 108, true), (DATA, 18, true)]);

    s.start_logging();
    // READ(10) of block 2.
    request(&[0x28, 0, 0, 0, 0, 2, 0, 0, 1, 0]);
    s.run(&[(REQ, 51, false), (RESP, 108, true), (DATA, 2048, true)]);
    assert_eq!(s.ring.used(1), (3, 108 + 2048));
    let mut resp = [0u8; 12];
    mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
    assert_eq!((resp[10], resp[11]), (0, 0), "GOOD, VIRTIO_SCSI_S_OK");
    let mut data = vec![0u8; 2048];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert!(data.iter().all(|&b| b == 3));
    assert_eq!(
        s.dirty_pages(),
        sorted([pages(RESP, 108), pages(DATA, 2048), vec![USED_PAGE]].concat())
    );
    drop(s);
    server.join().unwrap().unwrap();
}

/// A log too small for guest RAM (one byte: 8 pages of 256) is refused, and vhost-user-
/// backend then ends the connection without a reply: the frontend gets an error, not a
/// hang, and the device process serves the next connection.
#[test]
fn a_log_too_small_for_guest_ram_ends_the_connection() {
    let dir = Dir::new("dirty-log-small");
    let backend = Arc::new(InputBackend::new(InputKind::Keyboard).unwrap());
    let (fe, server) = serve_here(&dir, backend);
    let mem = guest_memory();
    let s = Session::start(fe, &mem, 0, VhostUserProtocolFeatures::MQ, 0);
    let small = memfd("small-log", 1);
    let sent = s.fe.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: 1,
            mmap_offset: 0,
            mmap_handle: small.as_raw_fd(),
        }),
    );
    assert!(sent.is_err(), "refused");
    server.join().unwrap().unwrap();
}
