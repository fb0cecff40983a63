//! Kernel and initrd loading for direct Linux boot.
//!
//! A kernel is parsed once into a [`BootImage`]: the segments to copy into guest RAM, the
//! entry point, and the setup header, kept so that a reset reloads the kernel.
//!
//! Accepted images:
//! - a bzImage, entered through the 64-bit boot protocol at its `startup_64`, or, with
//!   `decompress`, unpacked on the host (gzip, xz or zstd payload) and loaded as the ELF
//!   vmlinux inside it, which skips the guest's own decompressor;
//! - an ELF64 x86-64 image, loaded at its physical addresses and entered in 64-bit mode at
//!   `e_entry`.
//!
//! A kernel read from a file is not held in memory: its segments are read from the file
//! (or, for a bzImage unpacked on the host, from its entry in the [`cache`]) each time
//! they are loaded, straight into guest RAM. The file stays open, so a kernel replaced by
//! a new file (or a cache entry evicted) meanwhile changes nothing; one rewritten in place
//! is what a reset then loads, or fails to.

pub mod cache;
mod unpack;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use linux_loader::loader::bootparam::setup_header;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::arch::boot::{InitrdPlacement, KERNEL_HDR_MAGIC};
use crate::arch::layout;
use crate::memory::GuestMemoryMmap;
use unpack::{decompress_into, decompress_payload};

/// Offset of the setup header in a bzImage.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// xloadflags: the kernel has a 64-bit entry point at `startup_64` (+0x200).
const XLF_KERNEL_64: u16 = 1 << 0;
/// The 64-bit entry is 0x200 bytes into the protected-mode code.
const STARTUP_64_OFFSET: u64 = 0x200;
/// Largest kernel image file we read.
const MAX_KERNEL_FILE: u64 = 512 << 20;
/// Largest initrd we read into memory (one that is not a regular file).
const MAX_INITRD_FILE: u64 = 4 << 30;
/// Largest decompressed payload we accept.
const MAX_DECOMPRESSED: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("could not read kernel '{path}': {source}")]
    ReadKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read initrd '{path}': {source}")]
    ReadInitrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel '{0}' is neither a bzImage nor an ELF64 x86-64 image")]
    UnknownFormat(String),
    #[error("bzImage is truncated or its setup header is invalid")]
    BadSetupHeader,
    #[error(
        "bzImage boot protocol {0:#x} is too old: 2.12 or later is needed for the 64-bit entry"
    )]
    ProtocolTooOld(u16),
    #[error("bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear)")]
    No64BitEntry,
    #[error("bzImage payload is empty or out of bounds")]
    BadPayload,
    #[error("bzImage payload uses an unsupported compression (magic {0:02x?})")]
    UnsupportedCompression([u8; 4]),
    #[error("failed to decompress the bzImage payload: {0}")]
    Decompress(#[source] std::io::Error),
    #[error("could not write the unpacked kernel: {0}")]
    WriteUnpacked(#[source] std::io::Error),
    #[error("the decompressed payload is larger than {limit} bytes (the guest's RAM, or 1 GiB)")]
    DecompressedTooLarge { limit: u64 },
    #[error("invalid ELF image: {0}")]
    BadElf(&'static str),
    #[error("kernel needs guest RAM up to {needed:#x}, but RAM below 4 GiB ends at {have:#x}; give more memory with -m")]
    KernelTooLarge { needed: u64, have: u64 },
    #[error("could not read the kernel's segments from its file: {0}")]
    ReadSegments(#[source] std::io::Error),
    #[error("could not read the initrd from its file: {0}")]
    ReadInitrdFile(#[source] std::io::Error),
    #[error("failed to write the kernel to guest memory at {addr:#x}: {source}")]
    WriteKernel {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("initrd of {size} bytes does not fit in guest RAM between {low:#x} and {high:#x}; give more memory with -m")]
    InitrdTooLarge { size: u64, low: u64, high: u64 },
    #[error("failed to write the initrd to guest memory at {addr:#x}: {source}")]
    WriteInitrd {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// A piece of the kernel to place in guest RAM: `data`, then zeroes up to `mem_size`.
#[derive(Debug, Clone)]
pub struct Segment {
    pub addr: u64,
    pub data: SegmentData,
    pub mem_size: u64,
}

/// Where a segment's bytes come from.
#[derive(Debug, Clone)]
pub enum SegmentData {
    /// Held in memory (a kernel parsed from bytes).
    Bytes(Vec<u8>),
    /// `len` bytes at `offset` of a file kept open, read again on every (re)load: the vmm
    /// holds no copy of a kernel of tens of MiB.
    File {
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
}

impl SegmentData {
    pub fn len(&self) -> u64 {
        match self {
            SegmentData::Bytes(b) => b.len() as u64,
            SegmentData::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How the kernel image was interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// bzImage, entered at its decompressor's `startup_64`.
    BzImage,
    /// bzImage whose payload was decompressed on the host and loaded as an ELF.
    DecompressedBzImage,
    /// A plain ELF64 image.
    Elf,
}

/// A parsed kernel, ready to be (re)loaded into guest memory.
#[derive(Debug, Clone)]
pub struct BootImage {
    pub kind: KernelKind,
    pub entry: GuestAddress,
    pub setup_header: Option<setup_header>,
    pub segments: Vec<Segment>,
    /// Highest guest-physical address the kernel needs while it boots (for bzImages this
    /// includes the decompressor's working space).
    pub end: u64,
}

impl BootImage {
    /// Parse the kernel file at `path`, for a guest with `ram_size` bytes of RAM. An ELF
    /// is read from the file on each load; a bzImage to unpack on the host goes through the
    /// kernel cache (see [`cache`]) unless it is turned off or unusable.
    pub fn from_file(path: &str, decompress: bool, ram_size: u64) -> Result<Self, LoaderError> {
        let read_error = |source| LoaderError::ReadKernel {
            path: path.to_string(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        let meta = file.metadata().map_err(read_error)?;
        let len = meta.len();
        let mut magic = [0u8; 4];
        // Only a regular file can be read again at each load; anything else (a pipe, a
        // directory to refuse) is read once, here.
        if meta.is_file() && file.read_exact_at(&mut magic, 0).is_ok() && magic == *b"\x7fELF" {
            return parse_elf_file(Arc::new(file), 0, len, KernelKind::Elf, None);
        }
        let bytes = read_limited(file, len, MAX_KERNEL_FILE).map_err(read_error)?;
        if decompress {
            if let Some(cache) = cache::KernelCache::from_env() {
                if let Some(image) = Self::through_cache(&cache, &bytes, ram_size)? {
                    return Ok(image);
                }
            }
        }
        Self::parse_for_ram(&bytes, decompress, ram_size).map_err(|e| match e {
            LoaderError::UnknownFormat(_) => LoaderError::UnknownFormat(path.to_string()),
            other => other,
        })
    }

    /// A bzImage's unpacked kernel from `cache` (unpacked into it now if it is not there).
    /// None if `bytes` is not a bzImage or the cache cannot be used (said in the log): the
    /// caller unpacks it in memory.
    pub fn through_cache(
        cache: &cache::KernelCache,
        bytes: &[u8],
        ram_size: u64,
    ) -> Result<Option<Self>, LoaderError> {
        if !is_bzimage(bytes) {
            return Ok(None);
        }
        let (hdr, pm_code) = bzimage_parts(bytes)?;
        let payload = bzimage_payload(&hdr, pm_code)?;
        let limit = ram_size.min(MAX_DECOMPRESSED);
        let entry = match cache.vmlinux(bytes, |out| decompress_into(payload, limit, out)) {
            Ok(entry) => entry,
            // Writing into the cache failed (a full disk): not the image's fault.
            Err(cache::CacheError::Image(LoaderError::WriteUnpacked(e))) => {
                tracing::warn!(
                    "kernel cache {}: {e}; unpacking the kernel in memory",
                    cache.dir().display()
                );
                return Ok(None);
            }
            Err(cache::CacheError::Image(e)) => return Err(e),
            Err(e) => {
                tracing::warn!("{e}; unpacking the kernel in memory");
                return Ok(None);
            }
        };
        if entry.len > limit {
            return Err(LoaderError::DecompressedTooLarge { limit });
        }
        let file = Arc::new(entry.file);
        parse_elf_file(
            file,
            entry.offset,
            entry.len,
            KernelKind::DecompressedBzImage,
            Some(hdr),
        )
        .map(Some)
    }

    /// Parse a kernel image held in memory.
    pub fn parse(bytes: &[u8], decompress: bool) -> Result<Self, LoaderError> {
        Self::parse_for_ram(bytes, decompress, MAX_DECOMPRESSED)
    }

    /// Parse a kernel image held in memory, for a guest with `ram_size` bytes of RAM: a
    /// payload that decompresses to more than that (or to more than 1 GiB) cannot be
    /// loaded, and is refused as soon as decompressing it gets there, so that a small
    /// compressed payload never makes the vmm allocate gigabytes.
    pub fn parse_for_ram(
        bytes: &[u8],
        decompress: bool,
        ram_size: u64,
    ) -> Result<Self, LoaderError> {
        if bytes.starts_with(b"\x7fELF") {
            return parse_elf(bytes, KernelKind::Elf, None);
        }
        if is_bzimage(bytes) {
            return parse_bzimage(bytes, decompress, ram_size.min(MAX_DECOMPRESSED));
        }
        Err(LoaderError::UnknownFormat(String::new()))
    }

    /// The command-line limit from the setup header (without the NUL).
    pub fn cmdline_limit(&self) -> usize {
        match self.setup_header {
            Some(hdr) if hdr.version >= 0x0206 && hdr.cmdline_size > 0 => hdr.cmdline_size as usize,
            Some(_) => 255,
            None => layout::CMDLINE_MAX_SIZE - 1,
        }
    }

    /// Highest address (exclusive) where an initrd may end.
    pub fn initrd_limit(&self) -> u64 {
        match self.setup_header {
            Some(hdr) if hdr.initrd_addr_max != 0 => u64::from(hdr.initrd_addr_max) + 1,
            Some(_) => 0x3800_0000,
            None => 1 << 32,
        }
    }

    /// Copy the kernel into guest memory. Checks first that it fits under `low_ram_end`.
    pub fn load(&self, mem: &GuestMemoryMmap, low_ram_end: u64) -> Result<(), LoaderError> {
        if self.end > low_ram_end {
            return Err(LoaderError::KernelTooLarge {
                needed: self.end,
                have: low_ram_end,
            });
        }
        for seg in &self.segments {
            match &seg.data {
                SegmentData::Bytes(data) => {
                    mem.write_slice(data, GuestAddress(seg.addr))
                        .map_err(|source| LoaderError::WriteKernel {
                            addr: seg.addr,
                            source,
                        })?
                }
                SegmentData::File { file, offset, len } => {
                    copy_from_file(mem, file, *offset, seg.addr, *len).map_err(|e| match e {
                        CopyError::Read(source) => LoaderError::ReadSegments(source),
                        CopyError::Write { addr, source } => {
                            LoaderError::WriteKernel { addr, source }
                        }
                    })?
                }
            }
            let bss = seg.mem_size - seg.data.len();
            if bss > 0 {
                let start = seg.addr + seg.data.len();
                write_zeroes(mem, start, bss).map_err(|source| LoaderError::WriteKernel {
                    addr: start,
                    source,
                })?;
            }
        }
        Ok(())
    }
}

fn write_zeroes(
    mem: &GuestMemoryMmap,
    mut addr: u64,
    mut len: u64,
) -> Result<(), vm_memory::GuestMemoryError> {
    let zeroes = vec![0u8; 1 << 20];
    while len > 0 {
        let n = len.min(zeroes.len() as u64);
        mem.write_slice(&zeroes[..n as usize], GuestAddress(addr))?;
        addr += n;
        len -= n;
    }
    Ok(())
}

/// Why [`copy_from_file`] failed.
enum CopyError {
    Read(std::io::Error),
    Write {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// Copy `len` bytes at `offset` of `file` to guest memory at `addr`, a MiB at a time.
fn copy_from_file(
    mem: &GuestMemoryMmap,
    file: &File,
    offset: u64,
    addr: u64,
    len: u64,
) -> Result<(), CopyError> {
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset + done)
            .map_err(CopyError::Read)?;
        mem.write_slice(&buf[..n], GuestAddress(addr + done))
            .map_err(|source| CopyError::Write {
                addr: addr + done,
                source,
            })?;
        done += n as u64;
    }
    Ok(())
}

/// The whole of `file` (`len` bytes long), which must not be longer than `limit`.
fn read_limited(file: File, len: u64, limit: u64) -> std::io::Result<Vec<u8>> {
    if len > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("file is {len} bytes, more than the {limit} accepted"),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn is_bzimage(bytes: &[u8]) -> bool {
    bytes.len() >= 0x206 && bytes[0x202..0x206] == KERNEL_HDR_MAGIC.to_le_bytes()
}

/// A bzImage's setup header (checked for a 64-bit entry) and its protected-mode code.
fn bzimage_parts(bytes: &[u8]) -> Result<(setup_header, &[u8]), LoaderError> {
    let hdr_len = std::mem::size_of::<setup_header>();
    let hdr_bytes = bytes
        .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + hdr_len)
        .ok_or(LoaderError::BadSetupHeader)?;
    let hdr = setup_header::from_slice(hdr_bytes)
        .copied()
        .ok_or(LoaderError::BadSetupHeader)?;
    if hdr.version < 0x020c {
        return Err(LoaderError::ProtocolTooOld(hdr.version));
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoaderError::No64BitEntry);
    }
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        hdr.setup_sects as usize
    };
    let pm_start = (setup_sects + 1) * 512;
    let pm_code = bytes
        .get(pm_start..)
        .filter(|c| !c.is_empty())
        .ok_or(LoaderError::BadSetupHeader)?;
    Ok((hdr, pm_code))
}

/// The compressed kernel inside a bzImage's protected-mode code.
fn bzimage_payload<'a>(hdr: &setup_header, pm_code: &'a [u8]) -> Result<&'a [u8], LoaderError> {
    pm_code
        .get(hdr.payload_offset as usize..)
        .and_then(|p| p.get(..hdr.payload_length as usize))
        .filter(|p| !p.is_empty())
        .ok_or(LoaderError::BadPayload)
}

fn parse_bzimage(bytes: &[u8], decompress: bool, limit: u64) -> Result<BootImage, LoaderError> {
    let (hdr, pm_code) = bzimage_parts(bytes)?;
    if decompress {
        let vmlinux = decompress_payload(bzimage_payload(&hdr, pm_code)?, limit)?;
        return parse_elf(&vmlinux, KernelKind::DecompressedBzImage, Some(hdr));
    }

    // The decompressor runs from where we load it and unpacks the kernel at its preferred
    // address (or its aligned load address); it needs init_size bytes there.
    let load = layout::HIMEM_START.0;
    let align = u64::from(hdr.kernel_alignment.max(1)).next_power_of_two();
    let run_base = load.next_multiple_of(align).max(hdr.pref_address);
    // pref_address is the image's word: an address near the top would wrap.
    let run_end = run_base
        .checked_add(u64::from(hdr.init_size))
        .ok_or(LoaderError::BadSetupHeader)?;
    let end = (load + pm_code.len() as u64).max(run_end);
    Ok(BootImage {
        kind: KernelKind::BzImage,
        entry: GuestAddress(load + STARTUP_64_OFFSET),
        setup_header: Some(hdr),
        segments: vec![Segment {
            addr: load,
            data: SegmentData::Bytes(pm_code.to_vec()),
            mem_size: pm_code.len() as u64,
        }],
        end,
    })
}

/// `N` bytes of `b` at `off`, an offset the image itself gave (so any number).
fn field<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], LoaderError> {
    off.checked_add(N)
        .and_then(|end| b.get(off..end))
        .and_then(|s| s.try_into().ok())
        .ok_or(LoaderError::BadElf("truncated header"))
}

fn le16(b: &[u8], off: usize) -> Result<u16, LoaderError> {
    field(b, off).map(u16::from_le_bytes)
}

fn le32(b: &[u8], off: usize) -> Result<u32, LoaderError> {
    field(b, off).map(u32::from_le_bytes)
}

fn le64(b: &[u8], off: usize) -> Result<u64, LoaderError> {
    field(b, off).map(u64::from_le_bytes)
}

const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;

/// A PT_LOAD segment: `file_size` bytes at `offset` of the image go to `addr`, then zeroes
/// up to `mem_size`.
struct Load {
    addr: u64,
    offset: u64,
    file_size: u64,
    mem_size: u64,
}

/// What an ELF64 x86-64 image declares: its entry, its PT_LOAD segments, and the end of the
/// highest. `head` holds the image's start (at least its headers); `len` is its full length.
struct ElfLayout {
    entry: u64,
    loads: Vec<Load>,
    end: u64,
}

fn elf_layout(head: &[u8], len: u64) -> Result<ElfLayout, LoaderError> {
    if head.len() < 64 || &head[..4] != b"\x7fELF" {
        return Err(LoaderError::BadElf("missing ELF magic"));
    }
    if head[4] != 2 {
        return Err(LoaderError::BadElf("not a 64-bit ELF"));
    }
    if head[5] != 1 {
        return Err(LoaderError::BadElf("not little-endian"));
    }
    if le16(head, 18)? != EM_X86_64 {
        return Err(LoaderError::BadElf("not an x86-64 ELF"));
    }
    let entry = le64(head, 24)?;
    let phoff = le64(head, 32)? as usize;
    let phentsize = le16(head, 54)? as usize;
    let phnum = le16(head, 56)? as usize;
    if phentsize < 56 {
        return Err(LoaderError::BadElf("program header entries are too small"));
    }
    let mut loads = Vec::new();
    let mut end = 0u64;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(
                i.checked_mul(phentsize)
                    .ok_or(LoaderError::BadElf("program header overflow"))?,
            )
            .ok_or(LoaderError::BadElf("program header overflow"))?;
        if le32(head, ph)? != PT_LOAD {
            continue;
        }
        let load = Load {
            offset: le64(head, ph + 8)?,
            addr: le64(head, ph + 24)?,
            file_size: le64(head, ph + 32)?,
            mem_size: le64(head, ph + 40)?,
        };
        if load.file_size > load.mem_size {
            return Err(LoaderError::BadElf(
                "segment file size exceeds its memory size",
            ));
        }
        if !matches!(load.offset.checked_add(load.file_size), Some(e) if e <= len) {
            return Err(LoaderError::BadElf("segment lies outside the file"));
        }
        let seg_end = load
            .addr
            .checked_add(load.mem_size)
            .ok_or(LoaderError::BadElf("segment address overflows"))?;
        if load.addr < layout::HIMEM_START.0 {
            return Err(LoaderError::BadElf(
                "segment below 1 MiB would overwrite boot data",
            ));
        }
        end = end.max(seg_end);
        loads.push(load);
    }
    if loads.is_empty() {
        return Err(LoaderError::BadElf("no loadable segments"));
    }
    if !loads
        .iter()
        .any(|l| (l.addr..l.addr + l.mem_size).contains(&entry))
    {
        return Err(LoaderError::BadElf(
            "entry point is outside every loadable segment",
        ));
    }
    Ok(ElfLayout { entry, loads, end })
}

impl ElfLayout {
    fn into_image(
        self,
        kind: KernelKind,
        hdr: Option<setup_header>,
        mut data: impl FnMut(&Load) -> SegmentData,
    ) -> BootImage {
        BootImage {
            kind,
            entry: GuestAddress(self.entry),
            setup_header: hdr,
            segments: self
                .loads
                .iter()
                .map(|l| Segment {
                    addr: l.addr,
                    data: data(l),
                    mem_size: l.mem_size,
                })
                .collect(),
            end: self.end,
        }
    }
}

/// An ELF image held in memory; its segments are copied out of `bytes`.
fn parse_elf(
    bytes: &[u8],
    kind: KernelKind,
    hdr: Option<setup_header>,
) -> Result<BootImage, LoaderError> {
    let layout = elf_layout(bytes, bytes.len() as u64)?;
    Ok(layout.into_image(kind, hdr, |l| {
        // In bounds: elf_layout checked offset + file_size against the length.
        SegmentData::Bytes(bytes[l.offset as usize..(l.offset + l.file_size) as usize].to_vec())
    }))
}

/// Most of an ELF's start that is read to find its headers (a linker puts them first).
const ELF_HEAD: u64 = 64 << 10;

/// An ELF image of `len` bytes at `base` in `file`; its segments stay in the file.
fn parse_elf_file(
    file: Arc<File>,
    base: u64,
    len: u64,
    kind: KernelKind,
    hdr: Option<setup_header>,
) -> Result<BootImage, LoaderError> {
    let mut head = vec![0u8; len.min(ELF_HEAD) as usize];
    file.read_exact_at(&mut head, base)
        .map_err(LoaderError::ReadSegments)?;
    let layout = elf_layout(&head, len)?;
    Ok(layout.into_image(kind, hdr, |l| SegmentData::File {
        file: file.clone(),
        offset: base + l.offset,
        len: l.file_size,
    }))
}

/// An initrd, placed at the top of low RAM on each (re)load. One given as a file is read
/// from it each time rather than held in memory.
#[derive(Debug, Clone)]
pub struct Initrd {
    data: SegmentData,
}

impl Initrd {
    pub fn from_file(path: &str) -> Result<Self, LoaderError> {
        let read_error = |source| LoaderError::ReadInitrd {
            path: path.to_string(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        let meta = file.metadata().map_err(read_error)?;
        if !meta.is_file() {
            // Not one to read again at each load (a pipe), or not one at all (a directory).
            let data = read_limited(file, meta.len(), MAX_INITRD_FILE).map_err(read_error)?;
            return Ok(Self::from_bytes(data));
        }
        Ok(Self {
            data: SegmentData::File {
                file: Arc::new(file),
                offset: 0,
                len: meta.len(),
            },
        })
    }

    pub fn from_bytes(data: Vec<u8>) -> Self {
        Self {
            data: SegmentData::Bytes(data),
        }
    }

    /// Place the initrd as high as possible below `min(low_ram_end, limit)` and above
    /// `kernel_end`, and copy it there.
    pub fn load(
        &self,
        mem: &GuestMemoryMmap,
        kernel_end: u64,
        low_ram_end: u64,
        limit: u64,
    ) -> Result<InitrdPlacement, LoaderError> {
        let size = self.data.len();
        let high = low_ram_end.min(limit);
        let low = kernel_end.next_multiple_of(4096);
        let addr = high
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= low)
            .ok_or(LoaderError::InitrdTooLarge { size, low, high })?;
        match &self.data {
            SegmentData::Bytes(data) => mem
                .write_slice(data, GuestAddress(addr))
                .map_err(|source| LoaderError::WriteInitrd { addr, source })?,
            SegmentData::File { file, offset, len } => {
                copy_from_file(mem, file, *offset, addr, *len).map_err(|e| match e {
                    CopyError::Read(source) => LoaderError::ReadInitrdFile(source),
                    CopyError::Write { addr, source } => LoaderError::WriteInitrd { addr, source },
                })?
            }
        }
        Ok(InitrdPlacement {
            addr: GuestAddress(addr),
            size,
        })
    }
}

/// A minimal ELF64 executable: `code` as one RWX PT_LOAD segment at `paddr` (also the
/// entry point), followed by `bss` zeroed bytes. What the tests and tiny hand-made guests boot.
pub fn elf64_image(paddr: u64, code: &[u8], bss: u64) -> Vec<u8> {
    const HEADERS: usize = 64 + 56;
    let mut b = vec![0u8; HEADERS];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // ELFCLASS64
    b[5] = 1; // little-endian
    b[6] = 1; // EV_CURRENT
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
    b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    b[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    b[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = 64;
    b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
    b[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    b[ph + 8..ph + 16].copy_from_slice(&(HEADERS as u64).to_le_bytes()); // p_offset
    b[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
    b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
    b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    b[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).saturating_add(bss).to_le_bytes());
    b.extend_from_slice(code);
    b
}

/// A minimal bzImage (boot protocol 2.15, 64-bit entry, one setup sector) around a
/// compressed `payload` that unpacks to an ELF kernel: what the tests boot and the fuzz
/// corpora start from.
pub fn bzimage_image(payload: &[u8]) -> Vec<u8> {
    let setup_sects = 1usize;
    let mut b = vec![0u8; (setup_sects + 1) * 512];
    b[0x1f1] = setup_sects as u8;
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x211] = 1; // LOADED_HIGH
    b[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    b[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
    b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    b[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes()); // payload_offset
    b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
    b[0x260..0x264].copy_from_slice(&0x20_0000u32.to_le_bytes()); // init_size
    b.extend_from_slice(&[0x90u8; 0x100]);
    b.extend_from_slice(payload);
    b
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap()
    }

    #[test]
    fn elf_loads_segments_and_clears_bss() {
        let m = mem();
        m.write_slice(&[0xaa; 16], GuestAddress(0x20_0004)).unwrap();
        let img = BootImage::parse(
            &elf64_image(0x20_0000, &[0xf4, 0x90, 0x90, 0x90], 16),
            false,
        )
        .unwrap();
        assert_eq!(img.kind, KernelKind::Elf);
        assert_eq!(img.entry, GuestAddress(0x20_0000));
        assert_eq!(img.end, 0x20_0014);
        img.load(&m, 32 << 20).unwrap();
        let mut buf = [0u8; 20];
        m.read_slice(&mut buf, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&buf[..4], &[0xf4, 0x90, 0x90, 0x90]);
        assert!(buf[4..].iter().all(|b| *b == 0));
    }

    #[test]
    fn bad_elves_are_refused() {
        let good = elf64_image(0x20_0000, &[0xf4], 0);
        let mut truncated = good.clone();
        truncated.truncate(0x70);
        assert!(matches!(
            BootImage::parse(&truncated, false),
            Err(LoaderError::BadElf(_))
        ));
        let mut elf32 = good.clone();
        elf32[4] = 1;
        assert!(matches!(
            BootImage::parse(&elf32, false),
            Err(LoaderError::BadElf(_))
        ));
        assert!(matches!(
            BootImage::parse(&elf64_image(0x1000, &[0xf4], 0), false),
            Err(LoaderError::BadElf(_))
        ));
        let mut bad_entry = good;
        bad_entry[24..32].copy_from_slice(&0x50_0000u64.to_le_bytes());
        assert!(BootImage::parse(&bad_entry, false).is_err());
        assert!(matches!(
            BootImage::parse(b"not a kernel at all", false),
            Err(LoaderError::UnknownFormat(_))
        ));
    }

    #[test]
    fn kernel_larger_than_ram_is_refused() {
        let m = mem();
        let img = BootImage::parse(&elf64_image(0x20_0000, &[0xf4], 64 << 20), false).unwrap();
        assert!(matches!(
            img.load(&m, 32 << 20),
            Err(LoaderError::KernelTooLarge { .. })
        ));
    }

    /// A synthetic bzImage whose payload is a gzip-compressed tiny ELF.
    fn fake_bzimage() -> Vec<u8> {
        use std::io::Write;
        let elf = elf64_image(0x100_0000, &[0xf4; 32], 0x1000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&elf).unwrap();
        bzimage_image(&gz.finish().unwrap())
    }

    #[test]
    fn bzimage_is_entered_at_startup_64() {
        let img = BootImage::parse(&fake_bzimage(), false).unwrap();
        assert_eq!(img.kind, KernelKind::BzImage);
        assert_eq!(img.entry, GuestAddress(0x10_0200));
        assert_eq!(img.segments[0].addr, 0x10_0000);
        assert_eq!(img.end, 0x120_0000);
        assert_eq!(img.cmdline_limit(), 2047);
        let m = mem();
        img.load(&m, 32 << 20).unwrap();
        assert!(img.load(&m, 16 << 20).is_err());
    }

    #[test]
    fn bzimage_payload_is_decompressed_on_the_host() {
        let img = BootImage::parse(&fake_bzimage(), true).unwrap();
        assert_eq!(img.kind, KernelKind::DecompressedBzImage);
        assert_eq!(img.entry, GuestAddress(0x100_0000));
        assert!(img.setup_header.is_some());
        let m = mem();
        img.load(&m, 32 << 20).unwrap();
        let b: u8 = m.read_obj(GuestAddress(0x100_0000)).unwrap();
        assert_eq!(b, 0xf4);
    }

    #[test]
    fn a_payload_larger_than_the_guest_ram_is_refused_while_it_decompresses() {
        let image = fake_bzimage();
        assert!(BootImage::parse_for_ram(&image, true, 1 << 20).is_ok());
        assert!(matches!(
            BootImage::parse_for_ram(&image, true, 100),
            Err(LoaderError::DecompressedTooLarge { limit: 100 })
        ));
        // A preferred address at the top of the address space does not wrap.
        let mut wraps = image;
        wraps[0x258..0x260].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            BootImage::parse(&wraps, false),
            Err(LoaderError::BadSetupHeader)
        ));
    }

    #[test]
    fn an_unpacked_kernel_comes_from_the_cache_and_reloads_after_eviction() {
        let dir = std::env::temp_dir().join(format!("vmm-loader-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = cache::KernelCache::new(dir.clone(), cache::DEFAULT_MAX_BYTES);
        let image = fake_bzimage();
        let first = BootImage::through_cache(&cache, &image, 32 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(first.kind, KernelKind::DecompressedBzImage);
        assert_eq!(first.entry, GuestAddress(0x100_0000));
        assert!(matches!(first.segments[0].data, SegmentData::File { .. }));
        let again = BootImage::through_cache(&cache, &image, 32 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(again.end, first.end);
        // Too large for this guest's RAM, even when found in the cache.
        assert!(matches!(
            BootImage::through_cache(&cache, &image, 100),
            Err(LoaderError::DecompressedTooLarge { limit: 100 })
        ));
        // Not a bzImage: not for the cache.
        let elf = elf64_image(0x20_0000, &[0xf4], 0);
        assert!(BootImage::through_cache(&cache, &elf, 32 << 20)
            .unwrap()
            .is_none());
        // The entry goes; a reset still loads the kernel it opened.
        std::fs::remove_dir_all(&dir).unwrap();
        let m = mem();
        m.write_slice(&[0xaa; 64], GuestAddress(0x100_0000))
            .unwrap();
        first.load(&m, 32 << 20).unwrap();
        let mut buf = [0u8; 64];
        m.read_slice(&mut buf, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(&buf[..32], &[0xf4; 32]);
        assert!(buf[32..].iter().all(|b| *b == 0));
    }

    #[test]
    fn an_elf_file_is_read_at_each_load_not_held() {
        let path = std::env::temp_dir().join(format!("vmm-loader-elf-{}", std::process::id()));
        std::fs::write(&path, elf64_image(0x20_0000, &[0xf4, 0x90], 16)).unwrap();
        let img = BootImage::from_file(path.to_str().unwrap(), true, 32 << 20).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(img.kind, KernelKind::Elf);
        assert!(matches!(
            img.segments[0].data,
            SegmentData::File { len: 2, .. }
        ));
        let m = mem();
        img.load(&m, 32 << 20).unwrap();
        let mut buf = [0xffu8; 18];
        m.read_slice(&mut buf, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&buf[..2], &[0xf4, 0x90]);
        assert!(buf[2..].iter().all(|b| *b == 0));
        let rd = std::env::temp_dir().join(format!("vmm-loader-initrd-{}", std::process::id()));
        std::fs::write(&rd, vec![7u8; 5000]).unwrap();
        let initrd = Initrd::from_file(rd.to_str().unwrap()).unwrap();
        std::fs::remove_file(&rd).unwrap();
        let p = initrd.load(&m, 0x20_0000, 32 << 20, u64::MAX).unwrap();
        assert_eq!(p.size, 5000);
        let b: u8 = m.read_obj(GuestAddress(p.addr.0 + 4999)).unwrap();
        assert_eq!(b, 7);
    }

    #[test]
    fn bzimage_with_bad_payload_is_refused() {
        let mut b = fake_bzimage();
        b[0x24c..0x250].copy_from_slice(&0x10_0000u32.to_le_bytes());
        assert!(matches!(
            BootImage::parse(&b, true),
            Err(LoaderError::BadPayload)
        ));
        let mut b = fake_bzimage();
        let pm = 1024 + 0x100;
        b[pm] = 0x42;
        assert!(matches!(
            BootImage::parse(&b, true),
            Err(LoaderError::UnsupportedCompression(_))
        ));
        let mut b = fake_bzimage();
        b[0x236] = 0;
        assert!(matches!(
            BootImage::parse(&b, false),
            Err(LoaderError::No64BitEntry)
        ));
    }

    #[test]
    fn initrd_goes_high_and_too_large_is_refused() {
        let m = mem();
        let rd = Initrd::from_bytes(vec![7u8; 5000]);
        let p = rd.load(&m, 0x20_0000, 32 << 20, u64::MAX).unwrap();
        assert_eq!(p.addr, GuestAddress((32 << 20) - 8192));
        assert_eq!(p.size, 5000);
        let big = Initrd::from_bytes(vec![0u8; 31 << 20]);
        assert!(matches!(
            big.load(&m, 0x20_0000, 32 << 20, u64::MAX),
            Err(LoaderError::InitrdTooLarge { .. })
        ));
    }
}
