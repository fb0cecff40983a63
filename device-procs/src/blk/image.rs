//! The image a disk serves: a raw file (read and written with pread/pwrite straight from
//! guest memory, the fast path) or a format chain through imago (qcow2 over qcow2 or raw
//! backing images), built from fds only. Also the I/O counters and the live snapshot.
//!
//! imago never opens anything here: every layer is built from a file we were given and
//! every backing image is attached explicitly (`DenyImplicitOpenGate` refuses any file the
//! headers name). imago serves encrypted qcow2 images' stored bytes as they are: legacy AES
//! images (crypt_method 1) are opened and marked ([`CountedFile::encrypted`],
//! [`Chain::encrypted`]) so that the request layer decrypts and encrypts around imago (see
//! [`super::crypt`]); LUKS images are refused.

use std::fmt;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::storage::drivers::CommonStorageHelper;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, Storage, StorageOpenOptions};
use ipc::blk::{BackingImage, Counters, ImageFormat};

use super::config::SECTOR_SIZE;

/// Most images in a chain (the top and its backing images).
pub const MAX_CHAIN: usize = 64;

/// A format layer over one of our files.
pub type Layer = FormatAccess<CountedFile>;
/// A backing image, shared between the layer above and (after a snapshot) the old top.
pub type Backing = Arc<Layer>;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("Attach carries {got} fds but the chain has {want} images (the image and {backing} backing images)", want = backing + 1)]
    FdCount { got: usize, backing: usize },
    #[error("a chain of {0} images is longer than the {MAX_CHAIN} allowed")]
    TooLong(usize),
    #[error("{what}: not a qcow2 image (bad magic)")]
    NotQcow2 { what: String },
    #[error("{what}: qcow2 version {version} is not supported (2 or 3)")]
    Version { what: String, version: u32 },
    #[error("{what}: encrypted qcow2 images ({method}) are not supported (only legacy AES, crypt_method 1)")]
    Encrypted { what: String, method: &'static str },
    #[error("{what}: a raw image has no backing file, but {count} backing images were passed")]
    RawWithBacking { what: String, count: usize },
    #[error("{what}: the image names backing file '{named}' but {passed}")]
    BackingMismatch {
        what: String,
        named: String,
        passed: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("only qcow2 overlays can be snapshot targets, not {0}")]
    OverlayFormat(&'static str),
    #[error("the overlay holds {overlay} bytes but the disk {disk}")]
    OverlaySize { overlay: u64, disk: u64 },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("shrinking a disk under a running guest is not supported")]
    Shrink,
    #[error("only image files can grow")]
    NotAFile,
    #[error("the disk has no encrypted image")]
    NotEncrypted,
    #[error("the disk cannot be resized while a block migration copies it")]
    Migrating,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// I/O counters, bumped with relaxed atomics on the data path.
#[derive(Debug, Default)]
pub struct IoCounters {
    rd_bytes: AtomicU64,
    wr_bytes: AtomicU64,
    rd_operations: AtomicU64,
    wr_operations: AtomicU64,
    flush_operations: AtomicU64,
    rd_total_time_ns: AtomicU64,
    wr_total_time_ns: AtomicU64,
    flush_total_time_ns: AtomicU64,
    wr_highest_offset: AtomicU64,
    discard_operations: AtomicU64,
    discard_bytes: AtomicU64,
    discard_total_time_ns: AtomicU64,
}

fn since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl IoCounters {
    pub fn read(&self, bytes: u64, start: Instant) {
        self.rd_operations.fetch_add(1, Ordering::Relaxed);
        self.rd_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.rd_total_time_ns
            .fetch_add(since(start), Ordering::Relaxed);
    }

    pub fn write(&self, offset: u64, bytes: u64, start: Instant) {
        self.wr_operations.fetch_add(1, Ordering::Relaxed);
        self.wr_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.wr_total_time_ns
            .fetch_add(since(start), Ordering::Relaxed);
        self.written(offset, bytes);
    }

    pub fn flush(&self, start: Instant) {
        self.flush_operations.fetch_add(1, Ordering::Relaxed);
        self.flush_total_time_ns
            .fetch_add(since(start), Ordering::Relaxed);
    }

    pub fn discard(&self, offset: u64, bytes: u64, start: Instant) {
        self.discard_operations.fetch_add(1, Ordering::Relaxed);
        self.discard_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.discard_total_time_ns
            .fetch_add(since(start), Ordering::Relaxed);
        self.written(offset, bytes);
    }

    fn written(&self, offset: u64, bytes: u64) {
        if bytes > 0 {
            self.wr_highest_offset
                .fetch_max(offset.saturating_add(bytes), Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> Counters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            rd_bytes: g(&self.rd_bytes),
            wr_bytes: g(&self.wr_bytes),
            rd_operations: g(&self.rd_operations),
            wr_operations: g(&self.wr_operations),
            flush_operations: g(&self.flush_operations),
            rd_total_time_ns: g(&self.rd_total_time_ns),
            wr_total_time_ns: g(&self.wr_total_time_ns),
            flush_total_time_ns: g(&self.flush_total_time_ns),
            wr_highest_offset: g(&self.wr_highest_offset),
            discard_operations: g(&self.discard_operations),
            discard_bytes: g(&self.discard_bytes),
            discard_total_time_ns: g(&self.discard_total_time_ns),
        }
    }
}

/// imago storage: one of our files (imago's file driver on it), counting the I/O that
/// the format layer does. `sync` is fdatasync.
#[derive(Debug)]
pub struct CountedFile {
    inner: imago::file::File,
    /// The same open file, for fdatasync.
    fd: File,
    name: String,
    counters: Arc<IoCounters>,
    /// The data clusters of this (qcow2) image are AES-encrypted.
    encrypted: bool,
    /// Tells this file from the others of a chain (which image holds a mapping).
    id: u64,
}

/// The next [`CountedFile`]'s id.
static NEXT_FILE_ID: AtomicU64 = AtomicU64::new(1);

impl CountedFile {
    /// `file`, known as `name` in messages; `writable` as it was opened.
    pub fn new(file: File, name: &str, writable: bool) -> Result<Self, ImageError> {
        let fd = file.try_clone().map_err(io_err(name))?;
        let inner =
            imago::file::File::from_open_file(file, StorageOpenOptions::new().write(writable))
                .map_err(io_err(name))?;
        Ok(CountedFile {
            inner,
            fd,
            name: name.to_string(),
            counters: Arc::default(),
            encrypted: false,
            id: NEXT_FILE_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// This file's id, unique in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn counters(&self) -> &Arc<IoCounters> {
        &self.counters
    }

    /// Whether the data stored in this file is AES-encrypted (a qcow2 image with
    /// crypt_method 1): what imago maps to it must be decrypted after reading.
    pub fn encrypted(&self) -> bool {
        self.encrypted
    }
}

impl fmt::Display for CountedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Storage for CountedFile {
    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }

    fn req_align(&self) -> usize {
        self.inner.req_align()
    }

    fn zero_align(&self) -> usize {
        self.inner.zero_align()
    }

    fn discard_align(&self) -> usize {
        self.inner.discard_align()
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let (start, len) = (Instant::now(), bufv.len());
        // SAFETY: our caller keeps the contract of `Storage::pure_readv`, which is the
        // inner driver's too.
        unsafe { self.inner.pure_readv(bufv, offset) }?;
        self.counters.read(len, start);
        Ok(())
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let (start, len) = (Instant::now(), bufv.len());
        // SAFETY: as for pure_readv.
        unsafe { self.inner.pure_writev(bufv, offset) }?;
        self.counters.write(offset, len, start);
        Ok(())
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let start = Instant::now();
        // SAFETY: as for pure_readv.
        unsafe { self.inner.pure_write_zeroes(offset, length) }?;
        self.counters.write(offset, length, start);
        Ok(())
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let start = Instant::now();
        // SAFETY: as for pure_readv.
        unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }?;
        self.counters.write(offset, length, start);
        Ok(())
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        let start = Instant::now();
        // SAFETY: as for pure_readv.
        unsafe { self.inner.pure_discard(offset, length) }?;
        self.counters.discard(offset, length, start);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn sync(&self) -> io::Result<()> {
        let start = Instant::now();
        self.fd.sync_data()?;
        self.counters.flush(start);
        Ok(())
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        // SAFETY: our caller keeps the contract of `Storage::invalidate_cache`.
        unsafe { self.inner.invalidate_cache() }
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        self.inner.get_storage_helper()
    }

    fn resize(
        &self,
        new_size: u64,
        prealloc_mode: imago::storage::PreallocateMode,
    ) -> io::Result<()> {
        self.inner.resize(new_size, prealloc_mode)
    }
}

/// What a qcow2 header says (the parts we check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub crypt_method: u32,
    pub size: u64,
    pub cluster_bits: u32,
}

/// qcow2's legacy AES encryption.
pub const CRYPT_AES: u32 = 1;

const QCOW2_MAGIC: u32 = 0x5146_49fb;

/// Read and check the fixed part of a qcow2 header: magic, version, cluster size, and no
/// encryption but legacy AES.
pub fn check_qcow2_header(file: &File, what: &str) -> Result<Qcow2Header, ImageError> {
    let mut h = [0u8; 48];
    file.read_exact_at(&mut h, 0).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ImageError::NotQcow2 {
                what: what.to_string(),
            }
        } else {
            io_err(what)(e)
        }
    })?;
    let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let be64 = |at: usize| (u64::from(be32(at)) << 32) | u64::from(be32(at + 4));
    if be32(0) != QCOW2_MAGIC {
        return Err(ImageError::NotQcow2 {
            what: what.to_string(),
        });
    }
    let header = Qcow2Header {
        version: be32(4),
        crypt_method: be32(32),
        size: be64(24),
        cluster_bits: be32(20),
    };
    if !(2..=3).contains(&header.version) {
        return Err(ImageError::Version {
            what: what.to_string(),
            version: header.version,
        });
    }
    // As QEMU: 512-byte to 2 MiB clusters.
    if !(9..=21).contains(&header.cluster_bits) {
        return Err(io_err(what)(io::Error::other(format!(
            "cluster_bits {} is not 9 to 21",
            header.cluster_bits
        ))));
    }
    if header.crypt_method != 0 && header.crypt_method != CRYPT_AES {
        let method = match header.crypt_method {
            2 => "LUKS, crypt_method 2",
            _ => "unknown crypt_method",
        };
        return Err(ImageError::Encrypted {
            what: what.to_string(),
            method,
        });
    }
    check_header_extensions(file, what, &header)?;
    Ok(header)
}

/// The feature name table's header extension type, and the size of one entry.
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const FEATURE_ENTRY: u32 = 48;

/// Walk the header extensions (they end by the end of the first cluster) and refuse what
/// imago would trip on: a feature name table that is not a whole number of entries
/// (qemu-img never writes one; QEMU ignores the rest, imago panics).
fn check_header_extensions(
    file: &File,
    what: &str,
    header: &Qcow2Header,
) -> Result<(), ImageError> {
    let bad = |why: String| io_err(what)(io::Error::new(io::ErrorKind::InvalidData, why));
    let mut at = if header.version >= 3 {
        let mut len = [0u8; 4];
        file.read_exact_at(&mut len, 100).map_err(io_err(what))?;
        u64::from(u32::from_be_bytes(len))
    } else {
        72
    };
    let cluster_end = 1u64 << header.cluster_bits;
    while at + 8 <= cluster_end {
        let mut ext = [0u8; 8];
        if file.read_exact_at(&mut ext, at).is_err() {
            // A file that ends inside the header: imago says so.
            return Ok(());
        }
        let kind = u32::from_be_bytes([ext[0], ext[1], ext[2], ext[3]]);
        let len = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
        if kind == 0 {
            return Ok(());
        }
        if kind == EXT_FEATURE_TABLE && len % FEATURE_ENTRY != 0 {
            return Err(bad(format!(
                "a feature name table of {len} bytes (not whole {FEATURE_ENTRY}-byte entries)"
            )));
        }
        at += 8 + u64::from(len).next_multiple_of(8);
    }
    Ok(())
}

/// What [`open_layer`] found out about an image besides its layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerInfo {
    /// Legacy AES-encrypted (qcow2 crypt_method 1).
    pub encrypted: bool,
    /// Bytes of a cluster (qcow2), or of a sector (raw: no clusters).
    pub cluster_size: u64,
    /// The [`CountedFile::id`] of the image's file.
    pub file_id: u64,
}

/// Open one layer over `file`: qcow2 (with `backing` attached, or explicitly none) or raw.
fn open_layer(
    file: File,
    format: ImageFormat,
    name: &str,
    writable: bool,
    backing: Option<Backing>,
) -> Result<(Layer, Arc<IoCounters>, LayerInfo), ImageError> {
    let mut info = LayerInfo {
        encrypted: false,
        cluster_size: SECTOR_SIZE,
        file_id: 0,
    };
    if format == ImageFormat::Qcow2 {
        let header = check_qcow2_header(&file, name)?;
        info.encrypted = header.crypt_method == CRYPT_AES;
        info.cluster_size = 1 << header.cluster_bits;
    }
    let mut storage = CountedFile::new(file, name, writable)?;
    storage.encrypted = info.encrypted;
    info.file_id = storage.id();
    let counters = storage.counters().clone();
    let layer = match format {
        ImageFormat::Qcow2 => {
            let qcow2 = Qcow2::<CountedFile, Backing>::builder(storage)
                .write(writable)
                .backing(backing)
                .open(DenyImplicitOpenGate::default())
                .map_err(io_err(name))?;
            FormatAccess::new(qcow2)
        }
        ImageFormat::Raw => FormatAccess::new(
            Raw::builder(storage)
                .write(writable)
                .open(DenyImplicitOpenGate::default())
                .map_err(io_err(name))?,
        ),
    };
    Ok((layer, counters, info))
}

/// The backing file name a qcow2 image records, if any (`None` for raw images).
pub fn recorded_backing(
    file: &File,
    format: ImageFormat,
    name: &str,
) -> Result<Option<(String, Option<String>)>, ImageError> {
    if format != ImageFormat::Qcow2 {
        return Ok(None);
    }
    check_qcow2_header(file, name)?;
    let storage = CountedFile::new(file.try_clone().map_err(io_err(name))?, name, false)?;
    let qcow2 = Qcow2::<CountedFile, Backing>::open_image(storage, false).map_err(io_err(name))?;
    Ok(qcow2
        .implicit_backing_file()
        .map(|f| (f.clone(), qcow2.implicit_backing_format().cloned())))
}

/// The image a disk serves.
#[derive(Debug)]
pub enum Image {
    /// A raw file: pread/pwrite on it directly.
    Raw {
        file: File,
        counters: Arc<IoCounters>,
    },
    /// A format chain.
    Format(Chain),
}

/// A top layer of some format over optional backing layers.
#[derive(Debug)]
pub struct Chain {
    pub top: Layer,
    pub format: ImageFormat,
    /// The top's file (the same open file as the layer's), for reopening it read-only.
    pub file: File,
    pub backing: Option<Backing>,
    pub counters: Arc<IoCounters>,
    pub name: String,
    /// The top image and its cluster size.
    pub info: LayerInfo,
    /// Some image of the chain is encrypted: requests go through [`super::crypt`].
    pub encrypted: bool,
}

impl Image {
    /// A raw image file.
    pub fn raw(file: File) -> Image {
        Image::Raw {
            file,
            counters: Arc::default(),
        }
    }

    /// Build the chain from its files, top first. A raw top without backing images is
    /// served by the fast path; anything else through imago.
    pub fn open(
        format: ImageFormat,
        backing: &[BackingImage],
        files: Vec<File>,
        writable: bool,
    ) -> Result<Image, ImageError> {
        if files.len() != backing.len() + 1 {
            return Err(ImageError::FdCount {
                got: files.len(),
                backing: backing.len(),
            });
        }
        if files.len() > MAX_CHAIN {
            return Err(ImageError::TooLong(files.len()));
        }
        let formats: Vec<ImageFormat> = std::iter::once(format)
            .chain(backing.iter().map(|b| b.format))
            .collect();
        let names: Vec<String> = std::iter::once("the image".to_string())
            .chain(
                backing
                    .iter()
                    .enumerate()
                    .map(|(i, b)| format!("backing image {} ('{}')", i + 1, b.filename)),
            )
            .collect();
        // Each image's recorded backing file must be the next one passed, by name.
        for (i, file) in files.iter().enumerate() {
            let recorded = recorded_backing(file, formats[i], &names[i])?;
            match (recorded, backing.get(i)) {
                (None, None) => {}
                (None, Some(_)) if formats[i] == ImageFormat::Raw => {
                    return Err(ImageError::RawWithBacking {
                        what: names[i].clone(),
                        count: backing.len() - i,
                    })
                }
                (None, Some(b)) => {
                    return Err(ImageError::BackingMismatch {
                        what: names[i].clone(),
                        named: String::new(),
                        passed: format!("backing image '{}' was passed", b.filename),
                    })
                }
                (Some((named, _)), None) => {
                    return Err(ImageError::BackingMismatch {
                        what: names[i].clone(),
                        named,
                        passed: "no backing image was passed".into(),
                    })
                }
                (Some((named, _)), Some(b)) if named != b.filename => {
                    return Err(ImageError::BackingMismatch {
                        what: names[i].clone(),
                        named,
                        passed: format!("'{}' was passed", b.filename),
                    })
                }
                (Some(_), Some(_)) => {}
            }
        }
        let mut files = files;
        if format == ImageFormat::Raw && backing.is_empty() {
            let Some(file) = files.pop() else {
                return Err(ImageError::FdCount { got: 0, backing: 0 });
            };
            return Ok(Image::raw(file));
        }
        // Bottom up: each layer gets the one below as its backing image.
        let mut below: Option<Backing> = None;
        let mut encrypted = false;
        while files.len() > 1 {
            let i = files.len() - 1;
            let Some(file) = files.pop() else { break };
            let (layer, _, info) = open_layer(file, formats[i], &names[i], false, below.take())?;
            encrypted |= info.encrypted;
            tracing::info!(
                "backing image {i}: {} ({})",
                backing[i - 1].filename,
                formats[i].name()
            );
            below = Some(Arc::new(layer));
        }
        let Some(file) = files.pop() else {
            return Err(ImageError::FdCount {
                got: 0,
                backing: backing.len(),
            });
        };
        Self::top(file, format, &names[0], writable, below, encrypted)
    }

    /// The chain with `file` on top of `backing`; `encrypted`: an image in `backing` is.
    fn top(
        file: File,
        format: ImageFormat,
        name: &str,
        writable: bool,
        backing: Option<Backing>,
        encrypted: bool,
    ) -> Result<Image, ImageError> {
        let keep = file.try_clone().map_err(io_err(name))?;
        let (top, counters, info) = open_layer(file, format, name, writable, backing.clone())?;
        Ok(Image::Format(Chain {
            top,
            format,
            file: keep,
            backing,
            counters,
            name: name.to_string(),
            info,
            encrypted: encrypted || info.encrypted,
        }))
    }

    /// Whether an image of the chain is encrypted (and so needs a key).
    pub fn encrypted(&self) -> bool {
        matches!(self, Image::Format(c) if c.encrypted)
    }

    /// The disk's size in bytes.
    pub fn size(&mut self) -> Result<u64, ImageError> {
        match self {
            // Seeking to the end works for regular files and block devices alike.
            Image::Raw { file, .. } => file.seek(SeekFrom::End(0)).map_err(io_err("the image")),
            Image::Format(c) => Ok(c.top.size()),
        }
    }

    /// Counters of the I/O on the top image's file.
    pub fn file_counters(&self) -> Counters {
        match self {
            Image::Raw { counters, .. } => counters.get(),
            Image::Format(c) => c.counters.get(),
        }
    }

    /// Everything written so far on stable storage: the format's caches written out, then
    /// fdatasync.
    pub fn flush(&self) -> io::Result<()> {
        match self {
            Image::Raw { file, counters } => {
                let start = Instant::now();
                file.sync_data()?;
                counters.flush(start);
                Ok(())
            }
            Image::Format(c) => {
                c.top.flush()?;
                c.top.sync()
            }
        }
    }

    /// Grow to `size` bytes (a whole number of sectors).
    pub fn grow(&mut self, size: u64) -> Result<(), ImageError> {
        match self {
            Image::Raw { file, .. } => {
                let meta = file.metadata().map_err(io_err("the image"))?;
                if !meta.is_file() {
                    return Err(ImageError::NotAFile);
                }
                if meta.len() < size {
                    file.set_len(size).map_err(io_err("the image"))?;
                }
                Ok(())
            }
            Image::Format(c) => {
                if size < c.top.size() {
                    return Err(ImageError::Shrink);
                }
                let mode = if c.backing.is_some() {
                    // The grown part must not show the backing image's bytes.
                    imago::format::PreallocateMode::Zero
                } else {
                    imago::format::PreallocateMode::None
                };
                c.top
                    .resize_grow(size, mode)
                    .and_then(|()| c.top.flush())
                    .map_err(io_err(c.name.clone()))
            }
        }
    }

    /// The chain with `overlay` (a qcow2 image whose backing file is our top) on top, our
    /// top opened read-only beneath it. Call with the requests drained and after
    /// [`Image::flush`]; `self` is not changed, so on an error it serves on.
    pub fn with_overlay(
        &self,
        overlay: File,
        format: ImageFormat,
        disk_size: u64,
    ) -> Result<Image, ImageError> {
        if format != ImageFormat::Qcow2 {
            return Err(ImageError::OverlayFormat(format.name()));
        }
        let what = "the overlay";
        let header = check_qcow2_header(&overlay, what)?;
        // A partial last sector is not served, so only whole sectors must agree.
        if header.size / SECTOR_SIZE != disk_size / SECTOR_SIZE {
            return Err(ImageError::OverlaySize {
                overlay: header.size,
                disk: disk_size,
            });
        }
        if recorded_backing(&overlay, format, what)?.is_none() {
            return Err(ImageError::BackingMismatch {
                what: what.into(),
                named: String::new(),
                passed: "it must name the current top image".into(),
            });
        }
        let (file, old_format, old_backing, old_name) = match self {
            Image::Raw { file, .. } => (file, ImageFormat::Raw, None, "the old top".to_string()),
            Image::Format(c) => (&c.file, c.format, c.backing.clone(), c.name.clone()),
        };
        let file = file.try_clone().map_err(io_err(old_name.as_str()))?;
        let (below, _, _) = open_layer(file, old_format, &old_name, false, old_backing)?;
        Self::top(
            overlay,
            format,
            what,
            true,
            Some(Arc::new(below)),
            self.encrypted(),
        )
    }
}
