//! Block migration's disk I/O: whole chunks read into (on the source) or written from (on
//! the destination) a buffer the vmm shares, and which chunks the top image holds (what
//! `migrate inc:true` sends). The guest's requests go on beside it: a chunk the guest
//! writes while it is read is marked dirty after the write and read again later.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use imago::Mapping;
use ipc::blk::InitialChunks;

use super::config::SECTOR_SIZE;
use super::crypt;
use super::image::{Chain, Image};
use super::request::{self, Disk, RequestError};
use crate::shared_map::SharedMapping;

/// At most this many bytes of chunks in one request (the vmm's buffer).
pub const MAX_TRANSFER: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("a chunk of {0} bytes (a power of two from 512 bytes to 64 MiB)")]
    ChunkSize(u64),
    #[error("{count} chunks of {chunk_size} bytes are more than one transfer holds")]
    TooMany { count: u64, chunk_size: u64 },
    #[error("chunk {chunk} lies past the end of the disk ({size} bytes)")]
    OutOfRange { chunk: u64, size: u64 },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("cannot map the transfer buffer: {0}")]
    Buffer(io::Error),
    #[error("{op} of the chunk at byte {offset}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Request(#[from] RequestError),
}

/// Check a chunk size and count and map the buffer that holds them.
fn map_buffer(
    fd: &OwnedFd,
    chunk_size: u64,
    count: u64,
    writable: bool,
) -> Result<SharedMapping, ChunkError> {
    if !chunk_size.is_power_of_two() || !(SECTOR_SIZE..=MAX_TRANSFER).contains(&chunk_size) {
        return Err(ChunkError::ChunkSize(chunk_size));
    }
    let bytes = count
        .checked_mul(chunk_size)
        .filter(|b| *b <= MAX_TRANSFER && *b > 0)
        .ok_or(ChunkError::TooMany { count, chunk_size })?;
    SharedMapping::new(fd, bytes as usize, writable).map_err(ChunkError::Buffer)
}

/// Byte offset and length of chunk `chunk` of a disk of `size` bytes (the last may be
/// short).
fn chunk_range(chunk: u64, chunk_size: u64, size: u64) -> Result<(u64, u64), ChunkError> {
    let offset = chunk
        .checked_mul(chunk_size)
        .filter(|o| *o < size)
        .ok_or(ChunkError::OutOfRange { chunk, size })?;
    Ok((offset, chunk_size.min(size - offset)))
}

fn host(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> ChunkError {
    move |source| ChunkError::Io { op, offset, source }
}

impl Disk {
    fn size_bytes(&self) -> u64 {
        self.capacity() * SECTOR_SIZE
    }

    /// Read `count` chunks from chunk `first` into the buffer `fd`; which were all zeroes.
    pub fn read_chunks(
        &self,
        fd: &OwnedFd,
        chunk_size: u64,
        first: u64,
        count: u32,
    ) -> Result<Vec<bool>, ChunkError> {
        let buffer = map_buffer(fd, chunk_size, count.into(), true)?;
        let size = self.size_bytes();
        let key = self.key()?;
        let mut zero = Vec::with_capacity(count as usize);
        for i in 0..u64::from(count) {
            let (offset, len) = chunk_range(first + i, chunk_size, size)?;
            // SAFETY: chunk i lies inside the mapping (map_buffer sized it for `count`
            // chunks); the vmm leaves the buffer alone until we reply.
            let buf = unsafe {
                std::slice::from_raw_parts_mut(
                    buffer.as_ptr().add((i * chunk_size) as usize),
                    len as usize,
                )
            };
            match (&*self.image(), &key) {
                (Image::Raw { file, .. }, _) => file
                    .read_exact_at(buf, offset)
                    .map_err(host("read", offset))?,
                (Image::Format(c), Some(key)) => {
                    crypt::read(&c.top, key, buf, offset).map_err(host("read", offset))?
                }
                (Image::Format(c), None) => c
                    .top
                    .read(&mut *buf, offset)
                    .map_err(host("read", offset))?,
            }
            zero.push(buf.iter().all(|b| *b == 0));
        }
        Ok(zero)
    }

    /// Write `zero.len()` chunks from chunk `first` out of the buffer `fd` (zeroes where
    /// `zero` says so).
    pub fn write_chunks(
        &self,
        fd: &OwnedFd,
        chunk_size: u64,
        first: u64,
        zero: &[bool],
    ) -> Result<(), ChunkError> {
        if self.readonly() {
            return Err(ChunkError::ReadOnly);
        }
        let buffer = map_buffer(fd, chunk_size, zero.len() as u64, false)?;
        let size = self.size_bytes();
        let key = self.key()?;
        for (i, &is_zero) in zero.iter().enumerate() {
            let (offset, len) = chunk_range(first + i as u64, chunk_size, size)?;
            if is_zero {
                // A fresh image reads as zeroes already: punching a hole in a hole still
                // costs a journal commit on some file systems.
                if !self.reads_as_zeroes(offset, len)? {
                    request::zeroes(self, offset, len, true)?;
                }
                continue;
            }
            // SAFETY: as in read_chunks; only read here.
            let data = unsafe {
                std::slice::from_raw_parts(
                    buffer.as_ptr().add(i * chunk_size as usize),
                    len as usize,
                )
            };
            match (&*self.image(), &key) {
                (Image::Raw { file, .. }, _) => file
                    .write_all_at(data, offset)
                    .map_err(host("write", offset))?,
                (Image::Format(c), Some(key)) => {
                    request::write_encrypted(self, c, key, offset, len, |buf, at| {
                        let from = (at - offset) as usize;
                        buf.copy_from_slice(&data[from..from + buf.len()]);
                        Ok(())
                    })?
                }
                (Image::Format(c), None) => {
                    c.top.write(data, offset).map_err(host("write", offset))?;
                    c.top.flush().map_err(host("write metadata", offset))?;
                }
            }
        }
        Ok(())
    }

    /// Whether `offset..offset + len` is known to read as zeroes without reading it: a
    /// hole of a raw file, or unallocated (or zero) clusters all the way down a chain.
    fn reads_as_zeroes(&self, offset: u64, len: u64) -> Result<bool, ChunkError> {
        let probe = |e| host("probe", offset)(e);
        match &*self.image() {
            Image::Raw { file, .. } => Ok(data_extents_in(file, offset, offset + len)
                .map_err(probe)?
                .is_empty()),
            Image::Format(c) => {
                let mut at = offset;
                while at < offset + len {
                    let (mapping, n) = c.top.get_mapping(at, offset + len - at).map_err(probe)?;
                    match mapping {
                        Mapping::Zero { .. } | Mapping::Eof { .. } => {}
                        _ => return Ok(false),
                    }
                    if n == 0 {
                        break;
                    }
                    at += n;
                }
                Ok(true)
            }
        }
    }

    /// Start tracking into the bitmap `fd` and mark the `initial` chunks; how many those
    /// were.
    pub fn track_chunks(
        &self,
        fd: &OwnedFd,
        chunk_size: u64,
        initial: InitialChunks,
    ) -> Result<u64, String> {
        let size = self.size_bytes();
        self.dirty_chunks().start(chunk_size, size, fd)?;
        let marked = match initial {
            InitialChunks::None => 0,
            InitialChunks::All => self.dirty_chunks().mark_chunks(0, u64::MAX),
            InitialChunks::Top => {
                let mut marked = 0;
                let ranges = match &*self.image() {
                    Image::Raw { file, .. } => data_extents(file, size),
                    Image::Format(c) => top_extents(c, size),
                }
                .map_err(|e| format!("cannot find what the top image holds: {e}"));
                let ranges = match ranges {
                    Ok(r) => r,
                    Err(e) => {
                        self.dirty_chunks().stop();
                        return Err(e);
                    }
                };
                for (offset, len) in ranges {
                    let end = (offset + len).div_ceil(chunk_size);
                    marked += self.dirty_chunks().mark_chunks(offset / chunk_size, end);
                }
                marked
            }
        };
        Ok(marked)
    }
}

/// The byte ranges of a raw file that are not holes (SEEK_DATA / SEEK_HOLE), up to `size`.
fn data_extents(file: &std::fs::File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    data_extents_in(file, 0, size)
}

/// [`data_extents`] between `from` and `to`.
fn data_extents_in(file: &std::fs::File, from: u64, to: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence| {
        // SAFETY: lseek on an fd we hold; the result is checked.
        let r = unsafe { libc::lseek64(fd, offset as libc::off64_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after the offset.
            if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            }
        } else {
            Ok(Some(r as u64))
        }
    };
    let mut extents = Vec::new();
    let mut at = from;
    while at < to {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= to {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(to).min(to);
        extents.push((data, hole - data));
        at = hole;
    }
    Ok(extents)
}

/// The byte ranges for which the top image of `chain` holds data or explicit zeroes (what
/// its backing images do not decide), up to `size`.
fn top_extents(chain: &Chain, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let top_file = chain.info.file_id;
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut at = 0;
    while at < size {
        let (mapping, len) = chain.top.get_mapping(at, size - at)?;
        if len == 0 {
            break;
        }
        let in_top = match mapping {
            Mapping::Raw { storage, .. } => storage.id() == top_file,
            Mapping::Zero { explicit, .. } => explicit,
            Mapping::Special { layer, .. } => std::ptr::eq(layer, &chain.top),
            Mapping::Eof { .. } => break,
            _ => true,
        };
        if in_top {
            match extents.last_mut() {
                Some((o, l)) if *o + *l == at => *l += len,
                _ => extents.push((at, len)),
            }
        }
        at += len;
    }
    Ok(extents)
}
