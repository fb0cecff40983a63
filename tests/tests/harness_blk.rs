//! virtio-blk-pci and its vmm-blk process through the qtest harness, as a guest driver
//! would use them: multi-segment reads and writes checked against the image on the host,
//! flush and GET_ID, a read-only disk, malformed descriptor chains, two queues, and a long
//! run of verified requests while the vmm-blk process is killed and restarted.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_tests::libqos::blk::{
    self, BlkDevice, BlkOptions, SECTOR_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use vmm_tests::libqos::virtqueue::{
    Buffer, Descriptor, GuestAlloc, UsedElem, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vmm_tests::qmp::Qmp;
use vmm_tests::qtest::Qtest;
use vmm_tests::rng::Rng;
use vmm_tests::TempDir;

const RAM: u64 = 128 << 20;
const MEM: &str = "128M";
/// Generous: a restarted vmm-blk takes some milliseconds, plus its back-off.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Scratch data area per queue.
const DATA_AREA: u64 = 4 << 20;
/// A guest-physical address far outside RAM (128 MiB here) and every MMIO window.
const OUTSIDE_RAM: u64 = 0xffff_0000_0000;
const QUERY_PROCESSES: &str = "__org.vmm_query-device-processes";

/// Per-queue guest buffers for one request at a time.
#[derive(Clone, Copy)]
struct Scratch {
    hdr: u64,
    status: u64,
    data: u64,
}

/// A machine with one virtio-blk-pci disk, brought up to DRIVER_OK.
struct Rig {
    qt: Qtest,
    blk: BlkDevice,
    scratch: Vec<Scratch>,
    img: PathBuf,
    _dir: TempDir,
}

impl Rig {
    /// `drive_opts` and `device_opts` are appended to -drive and -device.
    fn start(
        image: &[u8],
        drive_opts: &str,
        device_opts: &str,
        extra: &[&str],
        opts: BlkOptions,
    ) -> Rig {
        let dir = TempDir::new("harness-blk");
        let img = dir.join("disk.raw");
        std::fs::write(&img, image).unwrap();
        let drive = format!(
            "file={},if=none,id=d0,format=raw{drive_opts}",
            img.display()
        );
        let device = format!("virtio-blk-pci,drive=d0{device_opts}");
        let mut args = vec!["-drive", &drive, "-device", &device];
        args.extend_from_slice(extra);
        let mut qt = Qtest::start(MEM, &args).unwrap();
        let mut mem = GuestAlloc::for_ram(RAM);
        let blk = BlkDevice::init(&mut qt, RAM, &mut mem, opts)
            .unwrap_or_else(|e| panic!("{e}; vmm stderr:\n{}", qt.stderr()));
        let scratch = (0..blk.queues.len())
            .map(|_| Scratch {
                hdr: mem.alloc(16, 16).unwrap(),
                status: mem.alloc(1, 1).unwrap(),
                data: mem.alloc(DATA_AREA, 4096).unwrap(),
            })
            .collect();
        Rig {
            qt,
            blk,
            scratch,
            img,
            _dir: dir,
        }
    }

    fn simple(image: &[u8]) -> Rig {
        Rig::start(image, "", "", &[], BlkOptions::default())
    }

    /// `len` bytes split into `nsegs` buffers of uneven sizes, placed in the queue's data
    /// area in reverse order with gaps, so a device that assumes contiguity reads garbage.
    fn segments(&self, q: usize, len: usize, nsegs: usize) -> Vec<(u64, usize)> {
        let stride = (len / nsegs + 4096).next_multiple_of(4096) as u64;
        assert!(stride * nsegs as u64 <= DATA_AREA);
        let base = self.scratch[q].data;
        (0..nsegs)
            .map(|i| {
                let start = len * i / nsegs;
                let end = len * (i + 1) / nsegs;
                let slot = (nsegs - 1 - i) as u64;
                (base + slot * stride + (i as u64 % 7), end - start)
            })
            .collect()
    }

    /// Put a request on queue `q` and kick: header, data segments, status byte.
    fn submit(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        segs: &[(u64, usize)],
        device_writes: bool,
    ) -> u16 {
        let s = self.scratch[q];
        self.qt.memwrite(s.hdr, &blk::header(kind, sector)).unwrap();
        self.qt.writeb(s.status, 0xff).unwrap();
        let mut bufs = vec![Buffer::readable(s.hdr, 16)];
        for &(addr, len) in segs {
            bufs.push(Buffer {
                addr,
                len: len as u32,
                device_writes,
            });
        }
        bufs.push(Buffer::writable(s.status, 1));
        let vq = &mut self.blk.queues[q];
        let head = vq.add_chain(&mut self.qt, &bufs).unwrap();
        vq.kick(&mut self.qt).unwrap();
        head
    }

    /// Wait for `head` to come back on queue `q`; its used element.
    fn complete(&mut self, q: usize, head: u16) -> UsedElem {
        let used = blk::wait_used(&mut self.qt, &mut self.blk.queues[q], TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}; vmm stderr:\n{}", self.qt.stderr()));
        assert_eq!(used.id, head, "used element of another chain");
        used
    }

    fn status(&mut self, q: usize) -> u8 {
        self.qt.readb(self.scratch[q].status).unwrap()
    }

    /// Write `data` at `sector` in `nsegs` segments; the status.
    fn write(&mut self, q: usize, sector: u64, data: &[u8], nsegs: usize) -> u8 {
        let segs = self.segments(q, data.len(), nsegs);
        let mut at = 0;
        for &(addr, len) in &segs {
            self.qt.memwrite(addr, &data[at..at + len]).unwrap();
            at += len;
        }
        let head = self.submit(q, VIRTIO_BLK_T_OUT, sector, &segs, false);
        let used = self.complete(q, head);
        let status = self.status(q);
        if status == VIRTIO_BLK_S_OK {
            assert_eq!(used.len, 1, "a write's used length is the status byte");
        }
        status
    }

    /// Read `len` bytes at `sector` in `nsegs` segments; the status and the data.
    fn read(&mut self, q: usize, sector: u64, len: usize, nsegs: usize) -> (u8, Vec<u8>) {
        let segs = self.segments(q, len, nsegs);
        for &(addr, n) in &segs {
            self.qt.memset(addr, n, 0xa5).unwrap();
        }
        let head = self.submit(q, VIRTIO_BLK_T_IN, sector, &segs, true);
        let used = self.complete(q, head);
        let status = self.status(q);
        if status == VIRTIO_BLK_S_OK {
            assert_eq!(used.len as usize, len + 1, "data and status byte");
        }
        let mut out = Vec::with_capacity(len);
        for &(addr, n) in &segs {
            out.extend(self.qt.memread(addr, n).unwrap());
        }
        (status, out)
    }

    /// A hand-made chain on queue `q`; its used element, or None if the device does not
    /// return it within a second.
    fn raw(&mut self, q: usize, descs: &[Descriptor]) -> Option<UsedElem> {
        let vq = &mut self.blk.queues[q];
        let head = vq.add_raw_chain(&mut self.qt, descs).unwrap();
        vq.kick(&mut self.qt).unwrap();
        match blk::wait_used(&mut self.qt, vq, Duration::from_secs(1)) {
            Ok(used) => {
                assert_eq!(used.id, head);
                Some(used)
            }
            Err(blk::BlkError::Timeout { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.img).unwrap()
    }

    /// A valid write and read-back after a refused request: the queue still works.
    fn still_works(&mut self, model: &mut [u8], seed: u64) {
        let sector = 8 + seed % 32;
        let mut data = vec![0u8; 1024];
        Rng::new(seed).fill(&mut data);
        assert_eq!(self.write(0, sector, &data, 2), VIRTIO_BLK_S_OK);
        let (status, back) = self.read(0, sector, data.len(), 3);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(back == data, "read back after a refused request");
        let at = (sector * SECTOR_SIZE) as usize;
        model[at..at + data.len()].copy_from_slice(&data);
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
    Descriptor {
        addr,
        len,
        flags,
        next,
    }
}

/// An image whose every byte is known.
fn initial_image(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(13).wrapping_add(i as u32 >> 9) as u8)
        .collect()
}

/// Pattern `kind` for a request at `sector`.
fn pattern(kind: usize, sector: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    match kind % 4 {
        0 => v.fill(0x5a ^ sector as u8),
        1 => v
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i as u64 + sector) as u8),
        2 => Rng::new(sector).fill(&mut v),
        _ => {
            // Each sector stamped with its number, then 0xff.
            for (i, s) in v.chunks_mut(SECTOR_SIZE as usize).enumerate() {
                s.fill(0xff);
                s[..8].copy_from_slice(&(sector + i as u64).to_le_bytes());
            }
        }
    }
    v
}

#[test]
fn writes_4_mib_of_patterns_and_reads_them_back() {
    let start = Instant::now();
    const DISK: usize = 8 << 20;
    let mut model = initial_image(DISK);
    let mut rig = Rig::simple(&model);
    let capacity = rig.blk.capacity;
    assert_eq!(capacity, (DISK as u64) / SECTOR_SIZE);
    let kib = |n: usize| n << 10;
    // (sector, bytes, segments): 4 MiB in all.
    let mut requests: Vec<(u64, usize, usize)> = Vec::new();
    // 2 MiB from the start, 64 KiB requests of 8 segments.
    for i in 0..32 {
        requests.push((i * 128, kib(64), 8));
    }
    // 1 MiB ending exactly at the end of the disk, 128 KiB requests of 8 segments.
    for i in 0..8 {
        requests.push((capacity - 2048 + i * 256, kib(128), 8));
    }
    // 1 MiB of overlapping 4 KiB requests of 1 to 3 segments in the middle, and the last
    // sectors on their own.
    for i in 0..256 {
        requests.push((6000 + i * 5, kib(4), 1 + i as usize % 3));
    }
    requests.push((capacity - 1, 512, 1));
    requests.push((capacity - 3, kib(3) / 2, 3));
    let total: usize = requests.iter().map(|r| r.1).sum();
    assert!(total >= 4 << 20, "{total}");

    for (k, &(sector, len, nsegs)) in requests.iter().enumerate() {
        let data = pattern(k, sector, len);
        assert_eq!(
            rig.write(0, sector, &data, nsegs),
            VIRTIO_BLK_S_OK,
            "write {k}"
        );
        let at = (sector * SECTOR_SIZE) as usize;
        model[at..at + len].copy_from_slice(&data);
    }
    // Every request's range reads back as the model says (later writes overlap earlier).
    for (k, &(sector, len, nsegs)) in requests.iter().enumerate() {
        let (status, data) = rig.read(0, sector, len, nsegs.max(2));
        assert_eq!(status, VIRTIO_BLK_S_OK, "read {k}");
        let at = (sector * SECTOR_SIZE) as usize;
        assert!(
            data == model[at..at + len],
            "request {k} at sector {sector} reads back wrong"
        );
    }
    // The whole disk, in 512 KiB reads of 8 segments.
    for chunk in 0..DISK / kib(512) {
        let sector = (chunk * kib(512)) as u64 / SECTOR_SIZE;
        let (status, data) = rig.read(0, sector, kib(512), 8);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(
            data == model[chunk * kib(512)..(chunk + 1) * kib(512)],
            "chunk {chunk}"
        );
    }
    let img = rig.image();
    assert_eq!(img.len(), DISK);
    if let Some(i) = (0..DISK).find(|&i| img[i] != model[i]) {
        panic!(
            "the image differs from the model at byte {i} (sector {})",
            i / 512
        );
    }
    eprintln!("4 MiB written and checked in {:?}", start.elapsed());
}

#[test]
fn flush_and_get_id() {
    let model = initial_image(1 << 20);
    let mut rig = Rig::start(
        &model,
        "",
        ",serial=SER-0042",
        &[],
        BlkOptions {
            features: VIRTIO_BLK_F_FLUSH,
            ..Default::default()
        },
    );
    assert_ne!(
        rig.blk.offered & VIRTIO_BLK_F_FLUSH,
        0,
        "VIRTIO_BLK_F_FLUSH offered"
    );
    assert_ne!(rig.blk.features & VIRTIO_BLK_F_FLUSH, 0);
    let data = pattern(2, 5, 4096);
    assert_eq!(rig.write(0, 5, &data, 2), VIRTIO_BLK_S_OK);
    // FLUSH: header and status only.
    let head = rig.submit(0, VIRTIO_BLK_T_FLUSH, 0, &[], false);
    let used = rig.complete(0, head);
    assert_eq!(rig.status(0), VIRTIO_BLK_S_OK, "flush status");
    assert_eq!(used.len, 1);
    assert_eq!(&rig.image()[5 * 512..5 * 512 + 4096], &data[..]);
    // GET_ID: 20 bytes, the serial padded with zeroes.
    let segs = rig.segments(0, 20, 1);
    rig.qt.memset(segs[0].0, 20, 0xcc).unwrap();
    let head = rig.submit(0, VIRTIO_BLK_T_GET_ID, 0, &segs, true);
    let used = rig.complete(0, head);
    assert_eq!(rig.status(0), VIRTIO_BLK_S_OK, "GET_ID status");
    assert_eq!(used.len, 21);
    let mut want = [0u8; 20];
    want[..8].copy_from_slice(b"SER-0042");
    assert_eq!(rig.qt.memread(segs[0].0, 20).unwrap(), want);
    // A flush after GET_ID still works, on a second request in a row.
    let head = rig.submit(0, VIRTIO_BLK_T_FLUSH, 0, &[], false);
    rig.complete(0, head);
    assert_eq!(rig.status(0), VIRTIO_BLK_S_OK);
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let model = initial_image(1 << 20);
    let mut rig = Rig::start(
        &model,
        ",readonly=on",
        "",
        &[],
        BlkOptions {
            features: VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH,
            ..Default::default()
        },
    );
    assert_ne!(
        rig.blk.offered & VIRTIO_BLK_F_RO,
        0,
        "VIRTIO_BLK_F_RO offered"
    );
    assert_ne!(rig.blk.features & VIRTIO_BLK_F_RO, 0);
    let data = pattern(0, 3, 2048);
    assert_eq!(rig.write(0, 3, &data, 1), VIRTIO_BLK_S_IOERR);
    assert_eq!(rig.write(0, 0, &data, 4), VIRTIO_BLK_S_IOERR);
    let (status, back) = rig.read(0, 3, 2048, 2);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert!(back == model[3 * 512..3 * 512 + 2048]);
    let (status, back) = rig.read(0, 2040, 4096, 8);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert!(back == model[2040 * 512..]);
    let head = rig.submit(0, VIRTIO_BLK_T_FLUSH, 0, &[], false);
    rig.complete(0, head);
    assert_eq!(rig.status(0), VIRTIO_BLK_S_OK);
    assert!(rig.image() == model, "a read-only image changed");
}

/// Start a rig for the malformed-chain tests: 1 MiB, a 16-entry queue.
fn malformed_rig() -> (Rig, Vec<u8>) {
    let model = initial_image(1 << 20);
    let rig = Rig::start(
        &model,
        "",
        "",
        &[],
        BlkOptions {
            queue_size: 16,
            ..Default::default()
        },
    );
    assert_eq!(rig.blk.queues[0].size(), 16);
    (rig, model)
}

/// Header, status and data buffers for hand-made chains, apart from the ones
/// [`Rig::still_works`] uses.
fn raw_buffers(rig: &Rig) -> (u64, u64, u64) {
    let base = rig.scratch[0].data + DATA_AREA / 2;
    (base, base + 64, base + 4096)
}

/// The refused request came back with IOERR in `status`.
fn assert_ioerr(rig: &mut Rig, used: Option<UsedElem>, status: u64, what: &str) {
    let used = used.unwrap_or_else(|| panic!("{what}: no used element"));
    assert_eq!(
        rig.qt.readb(status).unwrap(),
        VIRTIO_BLK_S_IOERR,
        "{what}: status"
    );
    assert_eq!(used.len, 1, "{what}: only the status byte is written");
}

#[test]
fn malformed_headers_and_directions_are_refused() {
    let (mut rig, mut model) = malformed_rig();
    let (hdr, st, data) = raw_buffers(&rig);
    const R: u16 = VRING_DESC_F_NEXT;
    const W: u16 = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE;
    const WEND: u16 = VRING_DESC_F_WRITE;
    rig.qt.memset(data, 8192, 0x77).unwrap();
    let reset = |rig: &mut Rig| {
        rig.qt.writeb(st, 0xff).unwrap();
    };

    // A header shorter than 16 bytes, on a read and on a write.
    rig.qt
        .memwrite(hdr, &blk::header(VIRTIO_BLK_T_IN, 1))
        .unwrap();
    reset(&mut rig);
    let used = rig.raw(
        0,
        &[
            desc(hdr, 8, R, 1),
            desc(data, 512, W, 2),
            desc(st, 1, WEND, 0),
        ],
    );
    assert_ioerr(&mut rig, used, st, "8-byte read header");
    assert_eq!(
        rig.qt.memread(data, 512).unwrap(),
        vec![0x77; 512],
        "data untouched"
    );
    rig.still_works(&mut model, 1);
    rig.qt
        .memwrite(hdr, &blk::header(VIRTIO_BLK_T_OUT, 1))
        .unwrap();
    reset(&mut rig);
    let used = rig.raw(
        0,
        &[
            desc(hdr, 15, R, 1),
            desc(data, 512, R, 2),
            desc(st, 1, WEND, 0),
        ],
    );
    assert_ioerr(&mut rig, used, st, "15-byte write header");
    rig.still_works(&mut model, 2);

    // A read whose data buffer is device-readable.
    rig.qt.memset(data, 512, 0x77).unwrap();
    rig.qt
        .memwrite(hdr, &blk::header(VIRTIO_BLK_T_IN, 2))
        .unwrap();
    reset(&mut rig);
    let used = rig.raw(
        0,
        &[
            desc(hdr, 16, R, 1),
            desc(data, 512, R, 2),
            desc(st, 1, WEND, 0),
        ],
    );
    assert_ioerr(&mut rig, used, st, "read into a device-readable buffer");
    assert_eq!(
        rig.qt.memread(data, 512).unwrap(),
        vec![0x77; 512],
        "data untouched"
    );
    rig.still_works(&mut model, 3);
    // A write whose data buffer is device-writable.
    rig.qt
        .memwrite(hdr, &blk::header(VIRTIO_BLK_T_OUT, 2))
        .unwrap();
    reset(&mut rig);
    let used = rig.raw(
        0,
        &[
            desc(hdr, 16, R, 1),
            desc(data, 512, W, 2),
            desc(st, 1, WEND, 0),
        ],
    );
    assert_ioerr(&mut rig, used, st, "write from a device-writable buffer");
    rig.still_works(&mut model, 4);
    // A write with a device-readable buffer after a device-writable one.
    reset(&mut rig);
    let used = rig.raw(
        0,
        &[
            desc(hdr, 16, R, 1),
            desc(data + 4096, 8, W, 2),
            desc(data, 512, R, 3),
            desc(st, 1, WEND, 0),
        ],
    );
    assert_ioerr(&mut rig, used, st, "readable after writable");
    rig.still_works(&mut model, 5);

    // A write without a status descriptor, and with a device-readable one: nothing to
    // report the status in, so nothing may be written to the disk.
    rig.qt
        .memwrite(hdr, &blk::header(VIRTIO_BLK_T_OUT, 3))
        .unwrap();
    let used = rig.raw(0, &[desc(hdr, 16, R, 1), desc(data, 512, 0, 0)]);
    if let Some(u) = used {
        assert_eq!(u.len, 0, "no status byte: nothing written");
    }
    rig.still_works(&mut model, 6);
    reset(&mut rig);
    let used = rig.raw(
        0,
        &[
            desc(hdr, 16, R, 1),
            desc(data, 512, R, 2),
            desc(st, 1, 0, 0),
        ],
    );
    if let Some(u) = used {
        assert_eq!(u.len, 0, "read-only status byte: nothing written");
    }
    assert_eq!(
        rig.qt.readb(st).unwrap(),
        0xff,
        "a device-readable status byte stays"
    );
    rig.still_works(&mut model, 7);
    // Flush and GET_ID without a status byte too.
    rig.qt
        .memwrite(hdr, &blk::header(VIRTIO_BLK_T_GET_ID, 0))
        .unwrap();
    let used = rig.raw(0, &[desc(hdr, 16, R, 1), desc(data, 20, WEND, 0)]);
    if let Some(u) = used {
        assert!(u.len <= 20);
    }
    rig.still_works(&mut model, 8);

    assert!(rig.image() == model, "a refused request reached the image");
}

#[test]
fn descriptors_outside_guest_ram_are_refused() {
    let (mut rig, mut model) = malformed_rig();
    let (hdr, st, data) = raw_buffers(&rig);
    const R: u16 = VRING_DESC_F_NEXT;
    const W: u16 = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE;
    const WEND: u16 = VRING_DESC_F_WRITE;
    for (what, kind, flags) in [("write", VIRTIO_BLK_T_OUT, R), ("read", VIRTIO_BLK_T_IN, W)] {
        rig.qt.memwrite(hdr, &blk::header(kind, 4)).unwrap();
        // The data buffer far outside RAM.
        rig.qt.writeb(st, 0xff).unwrap();
        let used = rig.raw(
            0,
            &[
                desc(hdr, 16, R, 1),
                desc(OUTSIDE_RAM, 512, flags, 2),
                desc(st, 1, WEND, 0),
            ],
        );
        assert_ioerr(&mut rig, used, st, &format!("{what} data outside RAM"));
        rig.still_works(&mut model, 10);
        // Straddling the end of RAM.
        rig.qt.writeb(st, 0xff).unwrap();
        let used = rig.raw(
            0,
            &[
                desc(hdr, 16, R, 1),
                desc(RAM - 256, 512, flags, 2),
                desc(st, 1, WEND, 0),
            ],
        );
        assert_ioerr(
            &mut rig,
            used,
            st,
            &format!("{what} data straddling the end of RAM"),
        );
        rig.still_works(&mut model, 11);
        // A second segment outside RAM after a good one.
        rig.qt.writeb(st, 0xff).unwrap();
        let used = rig.raw(
            0,
            &[
                desc(hdr, 16, R, 1),
                desc(data, 512, flags, 2),
                desc(OUTSIDE_RAM, 512, flags, 3),
                desc(st, 1, WEND, 0),
            ],
        );
        assert_ioerr(
            &mut rig,
            used,
            st,
            &format!("{what} second segment outside RAM"),
        );
        rig.still_works(&mut model, 12);
        // The status byte outside RAM: nowhere to report, so the request must not run.
        rig.qt.memwrite(data, &[0x3c; 512]).unwrap();
        let used = rig.raw(
            0,
            &[
                desc(hdr, 16, R, 1),
                desc(data, 512, flags, 2),
                desc(OUTSIDE_RAM, 1, WEND, 0),
            ],
        );
        if let Some(u) = used {
            assert_eq!(
                u.len, 0,
                "{what} with the status outside RAM: nothing written"
            );
        }
        rig.still_works(&mut model, 13);
        // The header outside RAM.
        rig.qt.writeb(st, 0xff).unwrap();
        let used = rig.raw(
            0,
            &[
                desc(OUTSIDE_RAM, 16, R, 1),
                desc(data, 512, flags, 2),
                desc(st, 1, WEND, 0),
            ],
        );
        assert_ioerr(&mut rig, used, st, &format!("{what} header outside RAM"));
        rig.still_works(&mut model, 14);
    }
    assert!(rig.image() == model, "a refused request reached the image");
}

#[test]
fn sectors_beyond_the_end_are_refused() {
    let (mut rig, mut model) = malformed_rig();
    let capacity = rig.blk.capacity;
    assert_eq!(capacity, 2048);
    let data = vec![0xe1; 1024];
    for sector in [
        capacity,
        capacity - 1,
        capacity + 1000,
        u64::MAX / 512,
        u64::MAX,
    ] {
        assert_eq!(
            rig.write(0, sector, &data, 2),
            VIRTIO_BLK_S_IOERR,
            "write at {sector}"
        );
        let (status, _) = rig.read(0, sector, 1024, 2);
        assert_eq!(status, VIRTIO_BLK_S_IOERR, "read at {sector}");
        rig.still_works(&mut model, sector);
    }
    // Not a whole number of sectors.
    assert_eq!(rig.write(0, 10, &data[..700], 2), VIRTIO_BLK_S_IOERR);
    rig.still_works(&mut model, 20);
    // The last sectors themselves work.
    assert_eq!(rig.write(0, capacity - 2, &data, 2), VIRTIO_BLK_S_OK);
    model[(capacity as usize - 2) * 512..].copy_from_slice(&data);
    assert!(rig.image() == model, "a refused request reached the image");
}

#[test]
fn looping_chains_are_refused() {
    let (mut rig, mut model) = malformed_rig();
    let (hdr, st, data) = raw_buffers(&rig);
    const R: u16 = VRING_DESC_F_NEXT;
    const W: u16 = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE;
    rig.qt.memwrite(data, &[0x99; 4096]).unwrap();
    // A write whose status descriptor points back at the data descriptor.
    rig.qt
        .memwrite(hdr, &blk::header(VIRTIO_BLK_T_OUT, 6))
        .unwrap();
    rig.qt.writeb(st, 0xff).unwrap();
    let used = rig.raw(
        0,
        &[
            desc(hdr, 16, R, 1),
            desc(data, 512, R, 2),
            desc(st, 1, W, 1),
        ],
    );
    if let Some(u) = used {
        assert!(u.len <= 1);
    }
    rig.still_works(&mut model, 30);
    // A descriptor that points at itself.
    rig.qt.writeb(st, 0xff).unwrap();
    let used = rig.raw(0, &[desc(hdr, 16, R, 1), desc(data, 512, R, 1)]);
    if let Some(u) = used {
        assert_eq!(u.len, 0);
    }
    rig.still_works(&mut model, 31);
    // A read that loops through its header.
    rig.qt
        .memwrite(hdr, &blk::header(VIRTIO_BLK_T_IN, 6))
        .unwrap();
    rig.qt.writeb(st, 0xff).unwrap();
    let used = rig.raw(
        0,
        &[
            desc(hdr, 16, R, 1),
            desc(data, 512, W, 2),
            desc(st, 1, W, 0),
        ],
    );
    if used.is_some() {
        assert_ne!(rig.qt.readb(st).unwrap(), VIRTIO_BLK_S_OK);
    }
    rig.still_works(&mut model, 32);
    assert!(rig.image() == model, "a looping request reached the image");
}

/// Every descriptor of the 16-entry queue in one write, the last pointing back at the
/// head: a chain longer than the queue. Taken as it is after 16 descriptors it looks like
/// a well-formed 7 KiB write.
#[test]
fn chains_longer_than_the_queue_are_refused() {
    let (mut rig, mut model) = malformed_rig();
    let (hdr, st, data) = raw_buffers(&rig);
    const R: u16 = VRING_DESC_F_NEXT;
    const W: u16 = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE;
    rig.qt.memwrite(data, &[0x99; 14 * 512]).unwrap();
    rig.qt
        .memwrite(hdr, &blk::header(VIRTIO_BLK_T_OUT, 100))
        .unwrap();
    rig.qt.writeb(st, 0xff).unwrap();
    let mut chain = vec![desc(hdr, 16, R, 1)];
    for i in 0..14u16 {
        chain.push(desc(data + u64::from(i) * 512, 512, R, i + 2));
    }
    chain.push(desc(st, 1, W, 0));
    assert_eq!(chain.len(), 16);
    let used = rig.raw(0, &chain);
    if let Some(u) = used {
        assert!(u.len <= 1);
        let status = rig.qt.readb(st).unwrap();
        assert!(
            status == VIRTIO_BLK_S_IOERR || status == 0xff,
            "status {status}"
        );
    }
    rig.still_works(&mut model, 40);
    assert!(
        rig.image() == model,
        "a chain longer than the queue reached the image"
    );
}

/// A write whose status descriptor still has NEXT, pointing beyond the 16-entry table: the
/// chain is broken, though its first three descriptors look like a well-formed write.
#[test]
fn a_next_index_beyond_the_queue_is_refused() {
    let (mut rig, mut model) = malformed_rig();
    let (hdr, st, data) = raw_buffers(&rig);
    const R: u16 = VRING_DESC_F_NEXT;
    const W: u16 = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE;
    rig.qt.memwrite(data, &[0x98; 512]).unwrap();
    rig.qt
        .memwrite(hdr, &blk::header(VIRTIO_BLK_T_OUT, 101))
        .unwrap();
    rig.qt.writeb(st, 0xff).unwrap();
    let used = rig.raw(
        0,
        &[
            desc(hdr, 16, R, 1),
            desc(data, 512, R, 2),
            desc(st, 1, W, 0x7fff),
        ],
    );
    if let Some(u) = used {
        assert!(u.len <= 1);
        let status = rig.qt.readb(st).unwrap();
        assert!(
            status == VIRTIO_BLK_S_IOERR || status == 0xff,
            "status {status}"
        );
    }
    rig.still_works(&mut model, 41);
    assert!(
        rig.image() == model,
        "a chain cut short at a bad next index reached the image"
    );
}

#[test]
fn two_queues_serve_requests_side_by_side() {
    let mut model = initial_image(2 << 20);
    let mut rig = Rig::start(
        &model,
        "",
        ",num-queues=2",
        &[],
        BlkOptions {
            features: VIRTIO_BLK_F_MQ,
            ..Default::default()
        },
    );
    assert_ne!(
        rig.blk.offered & VIRTIO_BLK_F_MQ,
        0,
        "VIRTIO_BLK_F_MQ offered"
    );
    assert_eq!(
        rig.blk
            .dev
            .config_readw(&mut rig.qt, blk::config::NUM_QUEUES)
            .unwrap(),
        2
    );
    assert_eq!(rig.blk.queues.len(), 2);
    for round in 0..50u64 {
        // One write in flight on each queue at once, then cross-read on the other.
        let mut heads = Vec::new();
        let mut written = Vec::new();
        for q in 0..2 {
            let sector = round * 40 + q as u64 * 20;
            let data = pattern((round as usize) + q, sector, 8192);
            let segs = rig.segments(q, data.len(), 4);
            let mut at = 0;
            for &(addr, len) in &segs {
                rig.qt.memwrite(addr, &data[at..at + len]).unwrap();
                at += len;
            }
            heads.push(rig.submit(q, VIRTIO_BLK_T_OUT, sector, &segs, false));
            written.push((sector, data));
        }
        for (q, head) in heads.into_iter().enumerate().rev() {
            rig.complete(q, head);
            assert_eq!(rig.status(q), VIRTIO_BLK_S_OK, "write on queue {q}");
        }
        for (q, (sector, data)) in written.into_iter().enumerate() {
            let (status, back) = rig.read(1 - q, sector, data.len(), 3);
            assert_eq!(status, VIRTIO_BLK_S_OK);
            assert!(
                back == data,
                "round {round}: queue {q}'s write read on the other queue"
            );
            let at = (sector * 512) as usize;
            model[at..at + data.len()].copy_from_slice(&data);
        }
    }
    assert!(rig.image() == model);
}

fn device_processes(qmp: &mut Qmp<UnixStream>) -> Vec<Value> {
    qmp.ok(QUERY_PROCESSES, None).as_array().cloned().unwrap()
}

/// The vmm-blk pid, once it is running and not `not`.
fn running_pid(qmp: &mut Qmp<UnixStream>, not: &[u64]) -> u64 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let p = device_processes(qmp);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_ne!(p[0]["state"], "failed", "{p:?}");
        let pid = p[0]["pid"].as_u64().unwrap();
        if p[0]["state"] == "running" && !not.contains(&pid) {
            return pid;
        }
        assert!(Instant::now() < deadline, "no new vmm-blk process: {p:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill9(pid: u64) {
    // SAFETY: a plain kill(2) of the vmm-blk process this test's vmm started.
    assert_eq!(
        unsafe { libc::kill(pid as i32, libc::SIGKILL) },
        0,
        "kill -9 {pid}"
    );
}

/// 10,000 writes of unique data to pseudo-random sectors, each read back and compared,
/// while vmm-blk is killed with SIGKILL four times at different points of a request.
#[test]
fn requests_survive_vmm_blk_restarts() {
    const DISK: usize = 4 << 20;
    const OPS: usize = 10_000;
    let start = Instant::now();
    let dir = TempDir::new("harness-blk-qmp");
    let qmp_path = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
    let mut model = initial_image(DISK);
    let mut rig = Rig::start(
        &model,
        "",
        ",id=disk0",
        &["-qmp", &qmp_arg],
        BlkOptions::default(),
    );
    let mut qmp = Qmp::connect(&qmp_path);
    let p = device_processes(&mut qmp);
    assert_eq!(p[0]["device"], "disk0", "{p:?}");
    assert_eq!(p[0]["drive"], "d0");
    assert_eq!(p[0]["program"], "vmm-blk");
    assert_eq!(p[0]["restarts"], 0);
    let first_pid = running_pid(&mut qmp, &[]);
    let mut killed: Vec<u64> = Vec::new();
    // Op at which to kill, and where in the op: 0 after the write's kick, 1 before the
    // read is submitted, 2 after the read's kick, 3 after the write is in the ring but
    // before its kick.
    let kills = [(1500, 0), (4000, 1), (6500, 2), (9000, 3)];
    let mut rng = Rng::new(42);
    let capacity = (DISK as u64) / SECTOR_SIZE;
    for op in 0..OPS {
        let when = kills.iter().find(|k| k.0 == op).map(|k| k.1);
        // Asked before the op, so that the kill lands right at its point.
        let victim = when.map(|_| running_pid(&mut qmp, &killed));
        let mut kill_now = || {
            let pid = victim.unwrap();
            kill9(pid);
            killed.push(pid);
        };
        let sectors = 1 + rng.below(8);
        let sector = rng.below(capacity - sectors + 1);
        let len = (sectors * SECTOR_SIZE) as usize;
        let mut data = vec![0u8; len];
        Rng::new((op as u64) << 32 | sector).fill(&mut data);
        data[..8].copy_from_slice(&(op as u64).to_le_bytes());
        let nsegs = 1 + op % 3;

        // The write.
        let segs = rig.segments(0, len, nsegs);
        let mut at = 0;
        for &(addr, n) in &segs {
            rig.qt.memwrite(addr, &data[at..at + n]).unwrap();
            at += n;
        }
        let head = if when == Some(3) {
            let s = rig.scratch[0];
            rig.qt
                .memwrite(s.hdr, &blk::header(VIRTIO_BLK_T_OUT, sector))
                .unwrap();
            rig.qt.writeb(s.status, 0xff).unwrap();
            let mut bufs = vec![Buffer::readable(s.hdr, 16)];
            bufs.extend(segs.iter().map(|&(a, n)| Buffer::readable(a, n as u32)));
            bufs.push(Buffer::writable(s.status, 1));
            let head = rig.blk.queues[0].add_chain(&mut rig.qt, &bufs).unwrap();
            kill_now();
            rig.blk.queues[0].kick(&mut rig.qt).unwrap();
            head
        } else {
            rig.submit(0, VIRTIO_BLK_T_OUT, sector, &segs, false)
        };
        if when == Some(0) {
            kill_now();
        }
        rig.complete(0, head);
        assert_eq!(rig.status(0), VIRTIO_BLK_S_OK, "op {op}: write status");
        let at = (sector * SECTOR_SIZE) as usize;
        model[at..at + len].copy_from_slice(&data);
        if when == Some(1) {
            kill_now();
        }

        // The read-back.
        let segs = rig.segments(0, len, 4 - nsegs);
        for &(addr, n) in &segs {
            rig.qt.memset(addr, n, 0xa5).unwrap();
        }
        let head = rig.submit(0, VIRTIO_BLK_T_IN, sector, &segs, true);
        if when == Some(2) {
            kill_now();
        }
        let used = rig.complete(0, head);
        assert_eq!(rig.status(0), VIRTIO_BLK_S_OK, "op {op}: read status");
        assert_eq!(used.len as usize, len + 1, "op {op}");
        let mut back = Vec::with_capacity(len);
        for &(addr, n) in &segs {
            back.extend(rig.qt.memread(addr, n).unwrap());
        }
        assert!(
            back == data,
            "op {op}: sector {sector} x{sectors} reads back wrong"
        );
    }
    let elapsed = start.elapsed();

    let last_pid = running_pid(&mut qmp, &killed);
    let p = device_processes(&mut qmp);
    assert_eq!(p[0]["restarts"], 4, "{p:?}");
    assert_eq!(p[0]["state"], "running");
    assert_ne!(last_pid, first_pid);
    assert_eq!(killed.len(), 4);
    let img = rig.image();
    if let Some(i) = (0..DISK).find(|&i| img[i] != model[i]) {
        panic!(
            "the image differs from the model at byte {i} (sector {})",
            i / 512
        );
    }
    eprintln!("{OPS} verified write+read pairs with 4 restarts in {elapsed:?}");
}
