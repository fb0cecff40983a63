//! virtio-blk requests: parsing a descriptor chain the guest built, executing it on the
//! raw image, and writing the status byte.
//!
//! Everything here is guest input. A chain that is malformed (no 16-byte header, data
//! buffers in the wrong direction, a device-readable descriptor after a device-writable
//! one, addresses outside guest RAM, sectors past the end of the disk) fails with
//! VIRTIO_BLK_S_IOERR; an unknown request type with VIRTIO_BLK_S_UNSUPP. The status goes
//! into the last byte of the chain when that byte is device-writable; a chain without one
//! is completed with a used length of 0 and not executed. Nothing in this module panics
//! on what the guest wrote, and data moves with pread/pwrite straight between the image
//! and guest memory (through a bounce buffer for encrypted images, see [`super::crypt`]).
//!
//! A request that fails because of the host (the image's I/O: EIO, ENOSPC, ...) is not
//! completed here: [`run`] hands it back as a [`Failure`] so that the caller applies the
//! drive's error policy (report, ignore, or hold it for a retry).

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use imago::io_buffers::{IoVector, IoVectorMut};
use ipc::blk::{BlockStats, ImageFormat};

use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR_SIZE};
use super::crypt::{self, Key};
use super::dirty::DirtyChunks;
use super::image::{Chain, Image, ImageError, IoCounters, Layer};
use crate::vhost_daemon::mark_dirty;
/// Guest memory as the backend maps it, with the migration dirty log.
pub use crate::vhost_daemon::GuestMem;

/// A piece of guest memory as vm-memory hands it out (writes through it are logged).
type GuestSlice<'m> = vm_memory::VolatileSlice<'m, BitmapMmapRegion>;

/// Bytes of the request header (type, reserved/ioprio, sector).
const HEADER_LEN: usize = 16;
/// Bytes of one discard / write-zeroes range.
const RANGE_LEN: usize = 16;

/// Why one request failed. The guest sees only the status byte; the message is for the log
/// (and, for host I/O errors, for the vmm).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the chain does not end in a device-writable status byte inside guest memory")]
    NoStatus,
    #[error("the chain is cut short (a loop, more descriptors than the queue, a next index beyond the table, or an unreadable descriptor)")]
    BrokenChain,
    #[error("the chain's device-readable part holds {0} bytes, less than the 16-byte header")]
    ShortHeader(usize),
    #[error("a device-readable descriptor follows a device-writable one")]
    Misordered,
    #[error("descriptor {addr:#x}+{len:#x} is not inside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("{kind} request: {bytes} data bytes {what}")]
    Direction {
        kind: &'static str,
        bytes: u64,
        what: &'static str,
    },
    #[error("{len} data bytes is not a whole number of 512-byte sectors")]
    Unaligned { len: u64 },
    #[error("sector {sector} + {len} bytes is past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    #[error("{kind} range flags {flags:#x} are not supported")]
    UnsupportedFlags { kind: &'static str, flags: u32 },
    #[error("{kind} payload of {bytes} bytes is not 1 to {max} 16-byte ranges")]
    BadRanges {
        kind: &'static str,
        bytes: u64,
        max: u32,
    },
    #[error("{kind} range of {sectors} sectors exceeds the {max}-sector limit")]
    RangeTooLong {
        kind: &'static str,
        sectors: u32,
        max: u32,
    },
    #[error("the disk is encrypted and its key has not been given yet")]
    NoKey,
    #[error("{op} at byte {offset} of the image: {source}")]
    Host {
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

impl RequestError {
    /// The status byte the guest gets.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags { .. } => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }

    /// An error of the host's image, not of the guest's request.
    pub fn is_host(&self) -> bool {
        matches!(self, RequestError::Host { .. })
    }

    /// A host error of a request that reads (for the error policy: `rerror`, not `werror`).
    pub fn is_read(&self) -> bool {
        matches!(self, RequestError::Host { op: "read", .. })
    }

    /// The host error's errno, if it has one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RequestError::Host { source, .. } => source.raw_os_error().or(
                // imago may rebuild an error and keep only its kind.
                (source.kind() == io::ErrorKind::StorageFull).then_some(libc::ENOSPC),
            ),
            _ => None,
        }
    }
}

/// Test hook: make reads or writes fail on the host with an errno, a number of times or
/// for good (see `supervised::TEST_HOOK_FAIL_READS`).
#[derive(Debug)]
pub struct Fault {
    errno: i32,
    /// Failures left; u64::MAX: every request.
    left: AtomicU64,
}

impl Fault {
    /// Parse `eio`, `enospc` or an errno number, optionally followed by `:COUNT` (fail
    /// that many requests, then work again).
    pub fn parse(spec: &str) -> Result<Fault, String> {
        let (name, count) = match spec.split_once(':') {
            Some((n, c)) => (
                n,
                c.parse::<u64>()
                    .map_err(|_| format!("'{spec}': the count after ':' is not a number"))?,
            ),
            None => (spec, u64::MAX),
        };
        let errno = match name {
            "eio" => libc::EIO,
            "enospc" => libc::ENOSPC,
            n => n
                .parse::<i32>()
                .map_err(|_| format!("'{spec}': eio, enospc or an errno number"))?,
        };
        Ok(Fault {
            errno,
            left: AtomicU64::new(count),
        })
    }

    /// Whether this request fails (and counts it).
    fn strikes(&self) -> bool {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match n {
                0 => None,
                u64::MAX => Some(u64::MAX),
                n => Some(n - 1),
            })
            .is_ok()
    }

    fn check(f: &Option<Fault>, op: &'static str, offset: u64) -> Result<(), RequestError> {
        match f {
            Some(f) if f.strikes() => Err(RequestError::Host {
                op,
                offset,
                source: io::Error::from_raw_os_error(f.errno),
            }),
            _ => Ok(()),
        }
    }
}

/// The key of an encrypted chain, and the lock that keeps its writes apart (they rewrite
/// whole clusters).
#[derive(Debug, Default)]
struct Crypto {
    key: RwLock<Option<Key>>,
    writes: Mutex<()>,
}

/// The image a disk serves, its size and its counters.
#[derive(Debug)]
pub struct Disk {
    /// Requests hold the read lock while they run; what changes the image (a snapshot, a
    /// resize, a discard in a format image) takes the write lock, which drains them first.
    image: RwLock<Image>,
    /// Size in sectors (a partial last sector is not served, as in QEMU); grows with
    /// [`Disk::grow`] while requests run.
    capacity: AtomicU64,
    readonly: bool,
    /// GET_ID's answer: the serial, cut to 20 bytes and padded with zeroes.
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// The guest's successful requests.
    stats: IoCounters,
    /// The chunks the guest changed while a block migration tracks them.
    dirty: DirtyChunks,
    /// Set when an image of the chain is encrypted: no request is served without a key.
    crypto: Option<Crypto>,
    /// Test hooks: injected host errors of reads and writes.
    fail_reads: Option<Fault>,
    fail_writes: Option<Fault>,
}

impl Disk {
    /// Serve the raw image `file` (its size is taken now).
    pub fn new(file: File, readonly: bool, serial: &str) -> io::Result<Disk> {
        Disk::with_image(Image::raw(file), readonly, serial).map_err(io::Error::other)
    }

    /// Serve `image` (its size is taken now).
    pub fn with_image(mut image: Image, readonly: bool, serial: &str) -> Result<Disk, ImageError> {
        let size = image.size()?;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let crypto = image.encrypted().then(Crypto::default);
        Ok(Disk {
            image: RwLock::new(image),
            capacity: AtomicU64::new(size / SECTOR_SIZE),
            readonly,
            serial: id,
            stats: IoCounters::default(),
            dirty: DirtyChunks::new(),
            crypto,
            fail_reads: None,
            fail_writes: None,
        })
    }

    /// Whether an image of the chain is encrypted: requests fail until [`Disk::set_key`].
    pub fn encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    /// The password of the encrypted images (it replaces an earlier one). Refused for a
    /// disk without encrypted images.
    pub fn set_key(&self, password: &str) -> Result<(), ImageError> {
        let Some(crypto) = &self.crypto else {
            return Err(ImageError::NotEncrypted);
        };
        // New requests wait for the key while this runs; one holding the old key finishes.
        *crypto.key.write().unwrap_or_else(|e| e.into_inner()) = Some(Key::from_password(password));
        Ok(())
    }

    /// Test hook: make reads and writes fail on the host (see [`Fault`]).
    pub fn inject_faults(&mut self, reads: Option<Fault>, writes: Option<Fault>) {
        self.fail_reads = reads;
        self.fail_writes = writes;
    }

    /// The key, if the disk is encrypted; NoKey while it has none.
    pub(super) fn key(&self) -> Result<Option<Key>, RequestError> {
        match &self.crypto {
            None => Ok(None),
            Some(c) => match &*c.key.read().unwrap_or_else(|e| e.into_inner()) {
                Some(k) => Ok(Some(k.clone())),
                None => Err(RequestError::NoKey),
            },
        }
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    pub(super) fn image(&self) -> RwLockReadGuard<'_, Image> {
        self.image.read().unwrap_or_else(|e| e.into_inner())
    }

    fn image_mut(&self) -> RwLockWriteGuard<'_, Image> {
        self.image.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Grow the disk to `size` bytes (whole sectors): the image is extended first, so a
    /// request that sees the new capacity finds the bytes there. Returns the new size.
    pub fn grow(&self, size: u64) -> Result<u64, ImageError> {
        if self.readonly {
            return Err(ImageError::ReadOnly);
        }
        if self.dirty.is_tracking() {
            return Err(ImageError::Migrating);
        }
        let sectors = size / SECTOR_SIZE;
        let mut image = self.image_mut();
        if sectors < self.capacity() {
            return Err(ImageError::Shrink);
        }
        image.grow(sectors * SECTOR_SIZE)?;
        self.capacity.store(sectors, Ordering::Release);
        Ok(sectors * SECTOR_SIZE)
    }

    /// A guest write (or zeroes) of `len` bytes at `offset` completed.
    fn wrote(&self, offset: u64, len: u64, start: Instant) {
        self.stats.write(offset, len, start);
        self.dirty.mark(offset, len);
    }

    /// A guest discard completed.
    fn discarded(&self, offset: u64, len: u64, start: Instant) {
        self.stats.discard(offset, len, start);
        self.dirty.mark(offset, len);
    }

    /// The chunks the guest changes, for block migration.
    pub fn dirty_chunks(&self) -> &DirtyChunks {
        &self.dirty
    }

    /// Live snapshot: drain the requests in flight (and hold new ones), flush, and put
    /// `overlay` on top of the chain. On an error the chain is unchanged.
    pub fn snapshot(&self, overlay: File, format: ImageFormat) -> Result<(), ImageError> {
        if self.readonly {
            return Err(ImageError::ReadOnly);
        }
        let mut image = self.image_mut();
        image.flush().map_err(|source| ImageError::Io {
            what: "flushing the current image".into(),
            source,
        })?;
        let new = image.with_overlay(overlay, format, self.capacity() * SECTOR_SIZE)?;
        let old = std::mem::replace(&mut *image, new);
        drop(image);
        drop(old);
        Ok(())
    }

    /// The guest's requests, and the I/O on the top image's file.
    pub fn stats(&self) -> BlockStats {
        BlockStats {
            stats: self.stats.get(),
            parent: Some(self.image().file_counters()),
        }
    }

    /// Write everything out before the process ends (QEMU flushes every drive at exit):
    /// without it a format's cached metadata would be lost with the process. Requests
    /// still running finish first (the write lock drains them).
    pub fn flush_for_exit(&self) {
        if self.readonly {
            return;
        }
        let image = self.image.write().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = image.flush() {
            tracing::error!("flushing the image at exit failed: {e}");
        }
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Byte offset of `len` bytes at `sector`, if they lie inside the disk.
    fn range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        let out = || RequestError::OutOfRange {
            sector,
            len,
            capacity: self.capacity(),
        };
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out)?;
        let end = offset.checked_add(len).ok_or_else(out)?;
        if end > self.capacity() * SECTOR_SIZE {
            return Err(out());
        }
        Ok(offset)
    }
}

/// What to put in the used ring for one chain.
#[derive(Debug)]
pub struct Completion {
    /// The chain's head descriptor index.
    pub head: u16,
    /// Bytes written into the chain (data and status byte).
    pub used_len: u32,
    /// The status written, or None when the chain had no writable status byte.
    pub status: Option<u8>,
    /// Why the request failed, if it did.
    pub error: Option<RequestError>,
}

/// A guest buffer: address and length.
type Segment = (GuestAddress, u64);

/// A request taken off a queue: its head and its descriptors, read once (so that it can be
/// held and run again later, as an error policy of `stop` needs).
#[derive(Debug, Clone)]
pub struct Request {
    head: u16,
    descs: Vec<Descriptor>,
}

impl Request {
    pub fn new<M>(chain: DescriptorChain<M>) -> Request
    where
        M: Deref<Target = GuestMem> + Clone,
    {
        Request {
            head: chain.head_index(),
            // The iterator stops by itself at the end of the chain, after `queue_size`
            // descriptors (a loop), at an unreadable descriptor or a bad indirect table:
            // whatever it yields is all there is.
            descs: chain.collect(),
        }
    }

    pub fn head(&self) -> u16 {
        self.head
    }
}

/// What running a request came to.
#[derive(Debug)]
pub enum Outcome {
    /// Completed (successfully or not): its status byte is written.
    Done(Completion),
    /// The host failed it: nothing is written yet; the error policy decides.
    Failed(Failure),
}

/// A request the host failed, not completed yet.
#[derive(Debug)]
pub struct Failure {
    pub head: u16,
    pub error: RequestError,
    status_addr: GuestAddress,
    /// The device-writable data bytes (a read's buffer).
    data_len: u64,
}

impl Failure {
    /// Complete it: with VIRTIO_BLK_S_IOERR, or as a success (`ignore`: the guest's
    /// buffer holds whatever it holds, as in QEMU).
    pub fn complete(self, mem: &GuestMem, ignore: bool) -> Completion {
        let (status, data_len) = if ignore {
            (VIRTIO_BLK_S_OK as u8, self.data_len)
        } else {
            (self.error.status(), 0)
        };
        Completion {
            head: self.head,
            used_len: write_status(mem, self.status_addr, status, data_len),
            status: Some(status),
            error: Some(self.error),
        }
    }
}

/// Execute the request in `chain` on `disk` and write its status byte (host errors are
/// reported to the guest).
pub fn process<M>(disk: &Disk, chain: DescriptorChain<M>) -> Completion
where
    M: Deref<Target = GuestMem> + Clone,
{
    let mem = chain.memory().clone();
    match run(disk, &mem, &Request::new(chain)) {
        Outcome::Done(c) => c,
        Outcome::Failed(f) => f.complete(&mem, false),
    }
}

/// Execute `req` on `disk` with guest memory `mem`; the status byte is written unless the
/// host failed it.
pub fn run(disk: &Disk, mem: &GuestMem, req: &Request) -> Outcome {
    let head = req.head;
    // A last descriptor that still points on means the iterator gave up: none of the chain
    // is trusted, not even a status byte in it.
    if req.descs.last().is_some_and(|d| d.has_next()) {
        return Outcome::Done(Completion {
            head,
            used_len: 0,
            status: None,
            error: Some(RequestError::BrokenChain),
        });
    }
    process_descriptors(disk, mem, head, &req.descs)
}

/// Write the status byte; the used length (0 if the byte could not be written).
fn write_status(mem: &GuestMem, at: GuestAddress, status: u8, data_len: u64) -> u32 {
    match mem.write_obj(status, at) {
        // At most u32::MAX bytes in a chain (the iterator checks the sum), so this fits.
        Ok(()) => u32::try_from(data_len + 1).unwrap_or(u32::MAX),
        Err(_) => 0,
    }
}

fn process_descriptors(disk: &Disk, mem: &GuestMem, head: u16, descs: &[Descriptor]) -> Outcome {
    let mut readable: Vec<Segment> = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    let mut misordered = false;
    for d in descs {
        let seg = (d.addr(), u64::from(d.len()));
        if d.is_write_only() {
            writable.push(seg);
        } else {
            misordered |= !writable.is_empty();
            readable.push(seg);
        }
    }
    // The status byte: the last byte of the chain, if the device may write it.
    let status_addr = match descs.last() {
        Some(d) if d.is_write_only() && d.len() > 0 => d
            .addr()
            .checked_add(u64::from(d.len()) - 1)
            .filter(|a| GuestMemoryBackend::check_range(mem, *a, 1)),
        _ => None,
    };
    let Some(status_addr) = status_addr else {
        return Outcome::Done(Completion {
            head,
            used_len: 0,
            status: None,
            error: Some(RequestError::NoStatus),
        });
    };
    // The data part of the writable buffers is everything before the status byte.
    if let Some(last) = writable.last_mut() {
        last.1 -= 1;
        if last.1 == 0 {
            writable.pop();
        }
    }
    let result = if misordered {
        Err(RequestError::Misordered)
    } else {
        execute(disk, mem, &readable, &writable)
    };
    let (status, data_len, error) = match result {
        Ok(n) => (VIRTIO_BLK_S_OK as u8, n, None),
        Err(error) if error.is_host() => {
            return Outcome::Failed(Failure {
                head,
                error,
                status_addr,
                data_len: total(&writable),
            })
        }
        Err(e) => (e.status(), 0, Some(e)),
    };
    Outcome::Done(Completion {
        head,
        used_len: write_status(mem, status_addr, status, data_len),
        status: Some(status),
        error,
    })
}

/// Run one well-ordered request; the number of data bytes written into guest memory.
fn execute(
    disk: &Disk,
    mem: &GuestMem,
    readable: &[Segment],
    writable: &[Segment],
) -> Result<u64, RequestError> {
    for &(addr, len) in readable.iter().chain(writable) {
        if !GuestMemoryBackend::check_range(mem, addr, len as usize) {
            return Err(RequestError::OutsideMemory {
                addr: addr.raw_value(),
                len: len as u32,
            });
        }
    }
    let mut header = [0u8; HEADER_LEN];
    let readable_len = total(readable);
    if readable_len < HEADER_LEN as u64 {
        return Err(RequestError::ShortHeader(readable_len as usize));
    }
    gather(mem, readable, &mut header)?;
    let data_in = skip(readable, HEADER_LEN as u64);
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let in_len = total(&data_in);
    let out_len = total(writable);
    match kind {
        VIRTIO_BLK_T_IN => {
            if in_len != 0 {
                return Err(direction(
                    "read",
                    in_len,
                    "are device-readable; a read's data must be device-writable",
                ));
            }
            let offset = sector_range(disk, sector, out_len)?;
            let key = disk.key()?;
            Fault::check(&disk.fail_reads, "read", offset)?;
            let start = Instant::now();
            match (&*disk.image(), key) {
                (Image::Raw { file, counters }, _) => {
                    read_file(file, mem, writable, offset)?;
                    counters.read(out_len, start);
                }
                (Image::Format(c), Some(key)) => {
                    read_encrypted(&c.top, &key, mem, writable, offset, out_len)?
                }
                (Image::Format(c), None) => read_layer(&c.top, mem, writable, offset)?,
            }
            disk.stats.read(out_len, start);
            Ok(out_len)
        }
        VIRTIO_BLK_T_OUT => {
            if out_len != 0 {
                return Err(direction(
                    "write",
                    out_len,
                    "are device-writable; a write's data must be device-readable",
                ));
            }
            if disk.readonly {
                return Err(RequestError::ReadOnly);
            }
            let offset = sector_range(disk, sector, in_len)?;
            let key = disk.key()?;
            Fault::check(&disk.fail_writes, "write", offset)?;
            let start = Instant::now();
            match (&*disk.image(), key) {
                (Image::Raw { file, counters }, _) => {
                    write_file(file, mem, &data_in, offset)?;
                    counters.write(offset, in_len, start);
                }
                (Image::Format(c), Some(key)) => {
                    let slices = volatile_slices(mem, &data_in)?;
                    write_encrypted(disk, c, &key, offset, in_len, |buf, at| {
                        copy_from_slices(&slices, at - offset, buf)
                    })?
                }
                (Image::Format(c), None) => write_layer(&c.top, mem, &data_in, offset)?,
            }
            disk.wrote(offset, in_len, start);
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            disk.key()?;
            let start = Instant::now();
            if !disk.readonly {
                disk.image().flush().map_err(|source| RequestError::Host {
                    op: "flush",
                    offset: 0,
                    source,
                })?;
            }
            disk.stats.flush(start);
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let n = out_len.min(disk.serial.len() as u64) as usize;
            scatter(mem, writable, &disk.serial[..n])?;
            Ok(n as u64)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            let name = if discard { "discard" } else { "write-zeroes" };
            if disk.readonly {
                return Err(RequestError::ReadOnly);
            }
            let key = disk.key()?;
            let count = in_len / RANGE_LEN as u64;
            if !in_len.is_multiple_of(RANGE_LEN as u64)
                || count == 0
                || count > MAX_DISCARD_SEGMENTS.into()
            {
                return Err(RequestError::BadRanges {
                    kind: name,
                    bytes: in_len,
                    max: MAX_DISCARD_SEGMENTS,
                });
            }
            // At most MAX_DISCARD_SEGMENTS (a handful) ranges, checked just above.
            let mut ranges = vec![0u8; in_len as usize];
            gather(mem, &data_in, &mut ranges)?;
            for r in ranges.chunks_exact(RANGE_LEN) {
                let sector = u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
                let sectors = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
                let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
                let allowed = if discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(RequestError::UnsupportedFlags { kind: name, flags });
                }
                if sectors > MAX_DISCARD_SECTORS {
                    return Err(RequestError::RangeTooLong {
                        kind: name,
                        sectors,
                        max: MAX_DISCARD_SECTORS,
                    });
                }
                let len = u64::from(sectors) * SECTOR_SIZE;
                let offset = disk.range(sector, len)?;
                let start = Instant::now();
                match (discard, &key) {
                    // Advisory: an encrypted chain keeps its data (imago would leave
                    // clusters whose zeroes read as garbage once decrypted).
                    (true, Some(_)) => disk.discarded(offset, len, start),
                    (true, None) => {
                        discard_format_or_raw(disk, offset, len)?;
                        disk.discarded(offset, len, start);
                    }
                    (false, Some(key)) => {
                        if let Image::Format(c) = &*disk.image() {
                            write_encrypted(disk, c, key, offset, len, |buf, _| {
                                buf.fill(0);
                                Ok(())
                            })
                            .map_err(|e| match e {
                                RequestError::Host { source, .. } => RequestError::Host {
                                    op: "write-zeroes",
                                    offset,
                                    source,
                                },
                                e => e,
                            })?;
                        }
                        disk.wrote(offset, len, start);
                    }
                    (false, None) => {
                        zeroes(disk, offset, len, flags != 0)?;
                        disk.wrote(offset, len, start);
                    }
                }
            }
            Ok(0)
        }
        other => Err(RequestError::UnsupportedType(other)),
    }
}

fn direction(kind: &'static str, bytes: u64, what: &'static str) -> RequestError {
    RequestError::Direction { kind, bytes, what }
}

/// A read or write of `len` bytes at `sector`: whole sectors inside the disk.
fn sector_range(disk: &Disk, sector: u64, len: u64) -> Result<u64, RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Unaligned { len });
    }
    disk.range(sector, len)
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.1).sum()
}

/// The segments after the first `n` bytes.
fn skip(segs: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segs.len());
    for &(addr, len) in segs {
        if n >= len {
            n -= len;
            continue;
        }
        // Inside a descriptor that check_range accepted, so no overflow.
        out.push((addr.unchecked_add(n), len - n));
        n = 0;
    }
    out
}

/// Fill `buf` from the start of `segs`.
fn gather(mem: &GuestMem, segs: &[Segment], buf: &mut [u8]) -> Result<(), RequestError> {
    let mut done = 0;
    for &(addr, len) in segs {
        if done == buf.len() {
            break;
        }
        let n = (len as usize).min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], addr)
            .map_err(|_| RequestError::OutsideMemory {
                addr: addr.raw_value(),
                len: len as u32,
            })?;
        done += n;
    }
    Ok(())
}

/// Copy `data` to the start of `segs`.
fn scatter(mem: &GuestMem, segs: &[Segment], data: &[u8]) -> Result<(), RequestError> {
    let mut done = 0;
    for &(addr, len) in segs {
        if done == data.len() {
            break;
        }
        let n = (len as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + n], addr)
            .map_err(|_| RequestError::OutsideMemory {
                addr: addr.raw_value(),
                len: len as u32,
            })?;
        done += n;
    }
    Ok(())
}

/// The host memory of `segs`, piece by piece (a segment may span memory regions): each
/// piece's guest address, host address and length.
fn for_each_host_buffer(
    mem: &GuestMem,
    segs: &[Segment],
    mut f: impl FnMut(GuestAddress, *mut u8, usize) -> Result<(), RequestError>,
) -> Result<(), RequestError> {
    for &(addr, len) in segs {
        let outside = || RequestError::OutsideMemory {
            addr: addr.raw_value(),
            len: len as u32,
        };
        let mut at = addr;
        for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
            let slice = slice.map_err(|_| outside())?;
            let guard = slice.ptr_guard_mut();
            f(at, guard.as_ptr(), slice.len())?;
            // Inside a segment that check_range accepted, so no overflow.
            at = at.unchecked_add(slice.len() as u64);
        }
    }
    Ok(())
}

/// pread the raw image at `offset` into guest memory.
fn read_file(
    file: &File,
    mem: &GuestMem,
    segs: &[Segment],
    offset: u64,
) -> Result<(), RequestError> {
    let fd = file.as_raw_fd();
    let mut pos = offset;
    for_each_host_buffer(mem, segs, |gpa, ptr, len| {
        let mut done = 0;
        while done < len {
            let at = pos + done as u64;
            // SAFETY: `ptr..ptr + len` is host memory of a guest RAM mapping that `mem`
            // keeps alive for this call; pread writes at most `len - done` bytes from
            // `ptr + done`.
            let r =
                unsafe { libc::pread64(fd, ptr.add(done).cast(), len - done, at as libc::off64_t) };
            if r > 0 {
                // Straight into guest memory, behind vm-memory's back: log it for a
                // migration (`done + r <= len`, inside the piece).
                mark_dirty(mem, gpa.unchecked_add(done as u64), r as usize);
            }
            if r < 0 {
                let source = io::Error::last_os_error();
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(RequestError::Host {
                    op: "read",
                    offset: at,
                    source,
                });
            }
            if r == 0 {
                return Err(RequestError::Host {
                    op: "read",
                    offset: at,
                    source: io::Error::new(io::ErrorKind::UnexpectedEof, "the image shrank"),
                });
            }
            done += r as usize;
        }
        pos += len as u64;
        Ok(())
    })
}

/// pwrite guest memory to the raw image at `offset`.
fn write_file(
    file: &File,
    mem: &GuestMem,
    segs: &[Segment],
    offset: u64,
) -> Result<(), RequestError> {
    let fd = file.as_raw_fd();
    let mut pos = offset;
    for_each_host_buffer(mem, segs, |_, ptr, len| {
        let mut done = 0;
        while done < len {
            let at = pos + done as u64;
            // SAFETY: `ptr..ptr + len` is host memory of a guest RAM mapping that `mem`
            // keeps alive for this call; pwrite reads at most `len - done` bytes from
            // `ptr + done`.
            let r = unsafe {
                libc::pwrite64(fd, ptr.add(done).cast(), len - done, at as libc::off64_t)
            };
            if r < 0 {
                let source = io::Error::last_os_error();
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(RequestError::Host {
                    op: "write",
                    offset: at,
                    source,
                });
            }
            if r == 0 {
                return Err(RequestError::Host {
                    op: "write",
                    offset: at,
                    source: io::Error::new(io::ErrorKind::WriteZero, "the image took no bytes"),
                });
            }
            done += r as usize;
        }
        pos += len as u64;
        Ok(())
    })
}

/// The host memory of `segs` as vm-memory slices.
fn volatile_slices<'m>(
    mem: &'m GuestMem,
    segs: &[Segment],
) -> Result<Vec<GuestSlice<'m>>, RequestError> {
    let mut slices = Vec::with_capacity(segs.len());
    for &(addr, len) in segs {
        for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
            slices.push(slice.map_err(|_| RequestError::OutsideMemory {
                addr: addr.raw_value(),
                len: len as u32,
            })?);
        }
    }
    Ok(slices)
}

/// Read through a format layer at `offset` into guest memory.
fn read_layer(
    layer: &Layer,
    mem: &GuestMem,
    segs: &[Segment],
    offset: u64,
) -> Result<(), RequestError> {
    let slices = volatile_slices(mem, segs)?;
    // The guard marks every slice dirty in the migration log when it drops, after the
    // read (imago assumes a mutable vector is all written).
    let (bufv, _guard) = IoVectorMut::from_volatile_slice(slices.iter());
    layer
        .readv(bufv, offset)
        .map_err(|source| RequestError::Host {
            op: "read",
            offset,
            source,
        })
}

/// Read through a chain with encrypted images at `offset` into guest memory (through a
/// buffer: the data is decrypted on the way).
fn read_encrypted(
    top: &Layer,
    key: &Key,
    mem: &GuestMem,
    segs: &[Segment],
    offset: u64,
    len: u64,
) -> Result<(), RequestError> {
    let host = |source| RequestError::Host {
        op: "read",
        offset,
        source,
    };
    // A chain holds at most u32::MAX bytes.
    let mut buf = vec![0u8; len as usize];
    crypt::read(top, key, &mut buf, offset).map_err(host)?;
    scatter(mem, segs, &buf)
}

/// Write `len` bytes at `offset` of a chain with encrypted images, whole clusters at a
/// time (see [`crypt::write`]); `fill` gives the data. One such write at a time: they
/// rewrite the clusters they touch.
pub(super) fn write_encrypted(
    disk: &Disk,
    chain: &Chain,
    key: &Key,
    offset: u64,
    len: u64,
    fill: impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> Result<(), RequestError> {
    let host = |op| move |source| RequestError::Host { op, offset, source };
    let _one = disk
        .crypto
        .as_ref()
        .map(|c| c.writes.lock().unwrap_or_else(|e| e.into_inner()));
    crypt::write(
        &chain.top,
        key,
        chain.info.encrypted,
        chain.info.cluster_size,
        offset,
        len,
        fill,
    )
    .map_err(host("write"))?;
    chain.top.flush().map_err(host("write metadata"))
}

/// Copy bytes `at..at + buf.len()` of the guest buffers `slices` into `buf`.
fn copy_from_slices(slices: &[GuestSlice<'_>], mut at: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    for s in slices {
        if done == buf.len() {
            break;
        }
        let len = s.len() as u64;
        if at >= len {
            at -= len;
            continue;
        }
        let n = ((len - at) as usize).min(buf.len() - done);
        let sub = s.subslice(at as usize, n).map_err(io::Error::other)?;
        sub.copy_to(&mut buf[done..done + n]);
        done += n;
        at = 0;
    }
    Ok(())
}

/// Write guest memory through a format layer at `offset`.
fn write_layer(
    layer: &Layer,
    mem: &GuestMem,
    segs: &[Segment],
    offset: u64,
) -> Result<(), RequestError> {
    let slices = volatile_slices(mem, segs)?;
    let (bufv, _guard) = IoVector::from_volatile_slice(slices.iter());
    layer
        .writev(bufv, offset)
        .map_err(|source| RequestError::Host {
            op: "write",
            offset,
            source,
        })?;
    // The format's metadata (new clusters' mappings and refcounts) goes to the file before
    // the guest hears the write is done: the file's page cache survives this process, so a
    // restart after kill -9 still finds every completed write (no fdatasync: only a guest
    // flush asks for stable storage).
    layer.flush().map_err(|source| RequestError::Host {
        op: "write metadata",
        offset,
        source,
    })
}

/// Discard a range. Advisory: where the image cannot, the request still succeeds.
fn discard_format_or_raw(disk: &Disk, offset: u64, len: u64) -> Result<(), RequestError> {
    if let Image::Raw { file, counters } = &*disk.image() {
        let start = Instant::now();
        discard_range(file, offset, len)?;
        counters.discard(offset, len, start);
        return Ok(());
    }
    // Discarding breaks the format's data mappings: no request may run beside it.
    let mut image = disk.image_mut();
    let Image::Format(c) = &mut *image else {
        return Ok(());
    };
    match c.top.discard_to_any(offset, len) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
        Err(source) => Err(RequestError::Host {
            op: "discard",
            offset,
            source,
        }),
    }
}

/// Make a range read as zeroes (unmapping it where the guest allows).
pub(super) fn zeroes(disk: &Disk, offset: u64, len: u64, unmap: bool) -> Result<(), RequestError> {
    let host = |source| RequestError::Host {
        op: "write-zeroes",
        offset,
        source,
    };
    let start = Instant::now();
    if let Image::Raw { file, counters } = &*disk.image() {
        write_zeroes(file, offset, len, unmap)?;
        counters.write(offset, len, start);
        return Ok(());
    }
    if !unmap {
        if let Image::Format(c) = &*disk.image() {
            return c.top.write_zeroes(offset, len).map_err(host);
        }
    }
    // Unmapping breaks the format's data mappings: no request may run beside it.
    let mut image = disk.image_mut();
    match &mut *image {
        Image::Raw { file, .. } => write_zeroes(file, offset, len, unmap),
        Image::Format(c) => c.top.discard_to_zero(offset, len).map_err(host),
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on our own fd with integer arguments.
    let r = unsafe {
        libc::fallocate64(
            file.as_raw_fd(),
            mode,
            offset as libc::off64_t,
            len as libc::off64_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The file system cannot do this kind of fallocate.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// Punch a hole. Discard is advisory: where the file system cannot punch holes the request
/// still succeeds and the data stays (as QEMU does).
fn discard_range(file: &File, offset: u64, len: u64) -> Result<(), RequestError> {
    match fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => Ok(()),
        Err(e) if unsupported(&e) => Ok(()),
        Err(source) => Err(RequestError::Host {
            op: "discard",
            offset,
            source,
        }),
    }
}

/// Make a range read as zeroes: punch a hole if the guest allows unmapping, else
/// FALLOC_FL_ZERO_RANGE, else write zeroes.
fn write_zeroes(file: &File, offset: u64, len: u64, unmap: bool) -> Result<(), RequestError> {
    let modes = if unmap {
        [
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        ]
    } else {
        [libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE; 2]
    };
    for mode in modes {
        match fallocate(file, mode, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => continue,
            Err(source) => {
                return Err(RequestError::Host {
                    op: "write-zeroes",
                    offset,
                    source,
                })
            }
        }
    }
    static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROES.len() as u64) as usize;
        file.write_all_at(&ZEROES[..n], offset + done)
            .map_err(|source| RequestError::Host {
                op: "write-zeroes",
                offset: offset + done,
                source,
            })?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicU32, Ordering};
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    const MEM_SIZE: usize = 0x10_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    // Guest addresses for headers, data and status bytes.
    const HDR: u64 = 0x4_0000;
    const DATA: u64 = 0x5_0000;
    const STATUS: u64 = 0x8_0000;

    struct Image {
        path: std::path::PathBuf,
    }
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// A temp image of `sectors` sectors where sector n is filled with byte n.
    fn image(sectors: u64, readonly: bool) -> (Disk, Image) {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmm-blk-request-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = File::create(&path).unwrap();
        for s in 0..sectors {
            f.write_all(&[s as u8; 512]).unwrap();
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(&path)
            .unwrap();
        (
            Disk::new(f, readonly, "serial-123").unwrap(),
            Image { path },
        )
    }

    fn memory() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn header(mem: &GuestMem, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Put `descs` in a queue as one chain (NEXT flags and indices filled in), pop it and
    /// process it.
    fn run(disk: &Disk, mem: &GuestMem, descs: &[RawDescriptor]) -> Completion {
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let q = MockSplitQueue::new(mem, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        process(disk, chain)
    }

    fn status(mem: &GuestMem) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn read_sectors_into_guest_memory() {
        let (disk, _img) = image(8, false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_IN, 2);
        // Two data buffers: sector 2 and sector 3.
        let c = run(
            &disk,
            &mem,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(DATA + 0x1000, 512, W),
                desc(STATUS, 1, W),
            ],
        );
        assert!(c.error.is_none(), "{:?}", c.error);
        assert_eq!(c.status, Some(VIRTIO_BLK_S_OK as u8));
        assert_eq!(c.used_len, 1025);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        let mut buf = [0u8; 512];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert_eq!(buf, [2u8; 512]);
        mem.read_slice(&mut buf, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(buf, [3u8; 512]);
    }

    #[test]
    fn write_then_read_back_from_the_file() {
        let (disk, img) = image(8, false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_OUT, 5);
        mem.write_slice(&[0xabu8; 1024], GuestAddress(DATA))
            .unwrap();
        let c = run(
            &disk,
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 1024, 0), desc(STATUS, 1, W)],
        );
        assert!(c.error.is_none(), "{:?}", c.error);
        assert_eq!(c.used_len, 1);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        let bytes = std::fs::read(&img.path).unwrap();
        assert_eq!(&bytes[5 * 512..7 * 512], &[0xabu8; 1024][..]);
        assert_eq!(&bytes[4 * 512..5 * 512], &[4u8; 512][..]);
        assert_eq!(&bytes[7 * 512..8 * 512], &[7u8; 512][..]);
    }

    /// While a block migration tracks them, a guest write marks its chunk, a read does
    /// not, and a failed request marks nothing.
    #[test]
    fn writes_mark_their_chunks_for_block_migration() {
        let (disk, _img) = image(8, false);
        let mem = memory();
        let fd = crate::shared_map::test_memfd(8);
        let bitmap = crate::shared_map::SharedMapping::new(&fd, 8, true).unwrap();
        disk.dirty_chunks().start(1024, 8 * 512, &fd).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 5);
        let c = run(
            &disk,
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 1024, 0), desc(STATUS, 1, W)],
        );
        assert!(c.error.is_none(), "{:?}", c.error);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let c = run(
            &disk,
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
        );
        assert!(c.error.is_none(), "{:?}", c.error);
        header(&mem, VIRTIO_BLK_T_OUT, 8);
        run(
            &disk,
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8, "past the end");
        // Sectors 5 and 6: bytes 2560..3584, chunks 2 and 3.
        assert_eq!(super::super::dirty::tests::take(&bitmap), [2, 3]);
    }

    #[test]
    fn header_and_data_in_one_descriptor() {
        // Drivers may merge the header with the data (no ANY_LAYOUT assumptions).
        let (disk, img) = image(4, false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_OUT, 1);
        mem.write_slice(&[0x5au8; 512], GuestAddress(HDR + 16))
            .unwrap();
        let c = run(&disk, &mem, &[desc(HDR, 16 + 512, 0), desc(STATUS, 1, W)]);
        assert!(c.error.is_none(), "{:?}", c.error);
        assert_eq!(
            &std::fs::read(&img.path).unwrap()[512..1024],
            &[0x5au8; 512][..]
        );
    }

    #[test]
    fn injected_faults_parse_and_count() {
        let f = Fault::parse("enospc:2").unwrap();
        assert_eq!(f.errno, libc::ENOSPC);
        assert!(f.strikes() && f.strikes() && !f.strikes());
        let f = Fault::parse("eio").unwrap();
        assert_eq!(f.errno, libc::EIO);
        assert!((0..1000).all(|_| f.strikes()));
        assert_eq!(Fault::parse("28:1").unwrap().errno, 28);
        assert!(Fault::parse("nope").is_err());
        assert!(Fault::parse("eio:x").is_err());
    }

    #[test]
    fn flush_and_get_id() {
        let (disk, _img) = image(4, false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let c = run(&disk, &mem, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]);
        assert!(c.error.is_none(), "{:?}", c.error);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);

        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xeeu8; 20], GuestAddress(DATA)).unwrap();
        let c = run(
            &disk,
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 20, W), desc(STATUS, 1, W)],
        );
        assert!(c.error.is_none(), "{:?}", c.error);
        assert_eq!(c.used_len, 21);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..10], b"serial-123");
        assert_eq!(&id[10..], &[0u8; 10]);
    }

    fn range(mem: &GuestMem, sector: u64, sectors: u32, flags: u32) {
        let mut r = [0u8; 16];
        r[0..8].copy_from_slice(&sector.to_le_bytes());
        r[8..12].copy_from_slice(&sectors.to_le_bytes());
        r[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&r, GuestAddress(DATA)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_read_back_as_zeroes() {
        let (disk, img) = image(16, false);
        let mem = memory();
        let chain = [desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)];

        header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range(&mem, 2, 2, 0);
        let c = run(&disk, &mem, &chain);
        assert!(c.error.is_none(), "{:?}", c.error);
        range(&mem, 4, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let c = run(&disk, &mem, &chain);
        assert!(c.error.is_none(), "{:?}", c.error);

        // A discard of whole file-system blocks punches a hole: the bytes read as zero
        // where hole punching works, and keep their data where it does not (both fine).
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        range(&mem, 8, 8, 0);
        let c = run(&disk, &mem, &chain);
        assert!(c.error.is_none(), "{:?}", c.error);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);

        let bytes = std::fs::read(&img.path).unwrap();
        assert_eq!(bytes.len(), 16 * 512, "the size is kept");
        assert_eq!(&bytes[512..1024], &[1u8; 512][..]);
        assert!(bytes[2 * 512..5 * 512].iter().all(|&b| b == 0));
        assert_eq!(&bytes[5 * 512..6 * 512], &[5u8; 512][..]);

        // Flags a discard may not carry, and two ranges, are refused.
        range(&mem, 8, 1, 1);
        let c = run(&disk, &mem, &chain);
        assert_eq!(c.status, Some(VIRTIO_BLK_S_UNSUPP as u8));
        let c = run(
            &disk,
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 32, 0), desc(STATUS, 1, W)],
        );
        assert!(matches!(c.error, Some(RequestError::BadRanges { .. })));
        // Past the end.
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        range(&mem, 15, 2, 0);
        let c = run(&disk, &mem, &chain);
        assert!(matches!(c.error, Some(RequestError::OutOfRange { .. })));
    }

    #[test]
    fn a_read_only_disk_refuses_writes() {
        let (disk, img) = image(4, true);
        let mem = memory();
        for kind in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            header(&mem, kind, 0);
            range(&mem, 0, 1, 0);
            let c = run(
                &disk,
                &mem,
                &[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)],
            );
            assert!(matches!(c.error, Some(RequestError::ReadOnly)), "{kind}");
            assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        }
        assert_eq!(&std::fs::read(&img.path).unwrap()[..512], &[0u8; 512][..]);
        // Reads still work.
        header(&mem, VIRTIO_BLK_T_IN, 3);
        let c = run(
            &disk,
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
        );
        assert!(c.error.is_none(), "{:?}", c.error);
    }

    #[test]
    fn out_of_range_and_unaligned_requests_fail() {
        let (disk, _img) = image(4, false);
        let mem = memory();
        let read = [desc(HDR, 16, 0), desc(DATA, 1024, W), desc(STATUS, 1, W)];
        for sector in [3, 4, u64::MAX / 512, u64::MAX] {
            header(&mem, VIRTIO_BLK_T_IN, sector);
            let c = run(&disk, &mem, &read);
            assert!(
                matches!(c.error, Some(RequestError::OutOfRange { .. })),
                "sector {sector}: {:?}",
                c.error
            );
            assert_eq!(c.used_len, 1);
            assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        }
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let c = run(
            &disk,
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 100, W), desc(STATUS, 1, W)],
        );
        assert!(matches!(
            c.error,
            Some(RequestError::Unaligned { len: 100 })
        ));
        // The last sector exactly is fine.
        header(&mem, VIRTIO_BLK_T_IN, 2);
        assert!(run(&disk, &mem, &read).error.is_none());
    }

    #[test]
    fn a_partial_last_sector_is_not_served() {
        let path = std::env::temp_dir().join(format!("vmm-blk-odd-{}.img", std::process::id()));
        std::fs::write(&path, vec![1u8; 3 * 512 + 100]).unwrap();
        let disk = Disk::new(File::open(&path).unwrap(), true, "").unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(disk.capacity(), 3);
    }

    #[test]
    fn wrong_directions_fail() {
        let (disk, img) = image(4, false);
        let mem = memory();
        // A read whose data buffer is device-readable.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let c = run(
            &disk,
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
        );
        assert!(matches!(c.error, Some(RequestError::Direction { .. })));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        // A write whose data buffer is device-writable.
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let c = run(
            &disk,
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
        );
        assert!(matches!(c.error, Some(RequestError::Direction { .. })));
        assert_eq!(&std::fs::read(&img.path).unwrap()[..512], &[0u8; 512][..]);
        // A writable header: no readable bytes at all.
        let c = run(&disk, &mem, &[desc(HDR, 16, W), desc(STATUS, 1, W)]);
        assert!(matches!(c.error, Some(RequestError::ShortHeader(0))));
        // Readable after writable.
        let c = run(
            &disk,
            &mem,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(DATA, 512, 0),
                desc(STATUS, 1, W),
            ],
        );
        assert!(matches!(c.error, Some(RequestError::Misordered)));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn a_short_header_fails() {
        let (disk, _img) = image(4, false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let c = run(&disk, &mem, &[desc(HDR, 15, 0), desc(STATUS, 1, W)]);
        assert!(matches!(c.error, Some(RequestError::ShortHeader(15))));
        assert_eq!(c.used_len, 1);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        // A header split over two descriptors is fine.
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let c = run(
            &disk,
            &mem,
            &[desc(HDR, 8, 0), desc(HDR + 8, 8, 0), desc(STATUS, 1, W)],
        );
        assert!(c.error.is_none(), "{:?}", c.error);
    }

    #[test]
    fn without_a_writable_status_byte_nothing_is_written_or_executed() {
        let (disk, img) = image(4, false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        mem.write_slice(&[9u8; 512], GuestAddress(DATA)).unwrap();
        // Status read-only, status empty, status outside memory, data without status.
        for last in [
            desc(STATUS, 1, 0),
            desc(STATUS, 0, W),
            desc(MEM_SIZE as u64, 1, W),
            desc(u64::MAX, 1, W),
        ] {
            let c = run(&disk, &mem, &[desc(HDR, 16, 0), desc(DATA, 512, 0), last]);
            assert_eq!(c.used_len, 0);
            assert_eq!(c.status, None);
            assert_eq!(status(&mem), 0xff);
        }
        let c = run(&disk, &mem, &[desc(HDR, 16, 0), desc(DATA, 512, 0)]);
        assert_eq!((c.used_len, c.status), (0, None));
        assert_eq!(&std::fs::read(&img.path).unwrap()[..512], &[0u8; 512][..]);
    }

    #[test]
    fn buffers_outside_guest_memory_fail() {
        let (disk, _img) = image(4, false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        for (addr, len) in [
            (MEM_SIZE as u64 - 256, 512),
            (0x1_0000_0000, 512),
            (u64::MAX - 100, 512),
        ] {
            let c = run(
                &disk,
                &mem,
                &[desc(HDR, 16, 0), desc(addr, len, W), desc(STATUS, 1, W)],
            );
            assert!(
                matches!(c.error, Some(RequestError::OutsideMemory { .. })),
                "{addr:#x}: {:?}",
                c.error
            );
            assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        }
        // A header outside memory.
        let c = run(
            &disk,
            &mem,
            &[desc(u64::MAX - 8, 16, 0), desc(STATUS, 1, W)],
        );
        assert!(matches!(c.error, Some(RequestError::OutsideMemory { .. })));
    }

    #[test]
    fn unknown_types_are_unsupported() {
        let (disk, _img) = image(4, false);
        let mem = memory();
        for kind in [2, 3, 14, 0x8000_0000, u32::MAX] {
            header(&mem, kind, 0);
            let c = run(&disk, &mem, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]);
            assert_eq!(c.status, Some(VIRTIO_BLK_S_UNSUPP as u8), "{kind}");
            assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP as u8);
        }
    }

    /// Chains written straight into the descriptor table, without the mock's fixing up.
    fn run_raw(disk: &Disk, mem: &GuestMem, table: &[RawDescriptor]) -> Completion {
        let q = MockSplitQueue::new(mem, 16);
        for (i, d) in table.iter().enumerate() {
            q.desc_table().store(i as u16, *d).unwrap();
        }
        q.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        q.avail().idx().store(1u16.to_le());
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(mem).unwrap().next().unwrap();
        process(disk, chain)
    }

    fn linked(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(
            addr,
            len,
            flags | VRING_DESC_F_NEXT as u16,
            next,
        ))
    }

    #[test]
    fn looped_and_broken_chains_end_without_panicking() {
        let (disk, _img) = image(4, false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        // 0 -> 1 -> 0 -> ...: the iterator gives up after queue-size descriptors, and the
        // last one it saw still points on: nothing of the chain is used, not even for a
        // status byte.
        let c = run_raw(
            &disk,
            &mem,
            &[linked(HDR, 16, 0, 1), linked(STATUS, 1, W, 0)],
        );
        assert_eq!((c.used_len, c.status), (0, None));
        assert!(matches!(c.error, Some(RequestError::BrokenChain)));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
        // A self-loop of a readable descriptor: no status byte.
        let c = run_raw(&disk, &mem, &[linked(HDR, 16, 0, 0)]);
        assert_eq!((c.used_len, c.status), (0, None));
        // A next index past the table.
        let c = run_raw(&disk, &mem, &[linked(HDR, 16, 0, 200)]);
        assert_eq!((c.used_len, c.status), (0, None));
        // An indirect table outside memory, and one of a bad length.
        for (addr, len) in [(u64::MAX - 64, 32), (DATA, 17), (DATA, 0)] {
            let c = run_raw(
                &disk,
                &mem,
                &[desc(addr, len, VRING_DESC_F_INDIRECT as u16)],
            );
            assert_eq!((c.used_len, c.status), (0, None));
        }
    }

    #[test]
    fn an_indirect_chain_works() {
        let (disk, _img) = image(4, false);
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_IN, 1);
        let table = 0x9_0000u64;
        let entries = [
            linked(HDR, 16, 0, 1),
            linked(DATA, 512, W, 2),
            desc(STATUS, 1, W),
        ];
        for (i, d) in entries.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let c = run_raw(
            &disk,
            &mem,
            &[desc(table, 48, VRING_DESC_F_INDIRECT as u16)],
        );
        assert!(c.error.is_none(), "{:?}", c.error);
        assert_eq!(c.used_len, 513);
        let mut buf = [0u8; 512];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert_eq!(buf, [1u8; 512]);
    }

    #[test]
    fn random_chains_never_panic() {
        let (disk, _img) = image(4, false);
        let mem = memory();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let n = (next() % 5 + 1) as usize;
            let mut table = Vec::new();
            for _ in 0..n {
                let r = next();
                let addr = match r % 4 {
                    0 => HDR,
                    1 => DATA,
                    2 => STATUS,
                    _ => next(),
                };
                let len = match (r >> 8) % 4 {
                    0 => 16,
                    1 => 512,
                    2 => 1,
                    _ => next() as u32,
                };
                let flags = (r >> 16) as u16 & 0x7;
                let next_idx = (r >> 32) as u16 % 8;
                table.push(RawDescriptor::from(Descriptor::new(
                    addr, len, flags, next_idx,
                )));
            }
            header(&mem, (next() % 16) as u32, next() % 8);
            let c = run_raw(&disk, &mem, &table);
            assert_eq!(c.status.is_none(), c.used_len == 0);
        }
    }
}
