//! The migration stream: a magic and a version, then records (a tag, a length, the
//! payload): the header the destination checks before it loads anything, RAM pages (zero
//! pages as flags), one section per device, and an end marker carrying a CRC-32 of every
//! byte before it. A truncated, corrupted or foreign stream is refused with a clear error.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::disk::{DiskInfo, CHUNK_SIZE, TRANSFER_CHUNKS};

pub const MAGIC: &[u8; 8] = b"VMM-MIG\n";
/// Bumped when the format changes; a destination refuses any other.
pub const VERSION: u32 = 1;
/// Guest pages as the stream counts them.
pub const PAGE_SIZE: usize = 4096;
/// At most this many pages in one RAM record (1 MiB).
pub const MAX_RUN_PAGES: u32 = 256;
/// The longest record a destination accepts (a full RAM record and its flags, or a
/// device section).
const MAX_RECORD: u32 = 64 << 20;

const TAG_HEADER: u8 = 1;
const TAG_RAM: u8 = 2;
const TAG_SECTION: u8 = 3;
const TAG_END: u8 = 4;
const TAG_DISKS: u8 = 5;
const TAG_DISK: u8 = 6;

/// A RAM page's flag in a RAM record.
const PAGE_ZERO: u8 = 0;
const PAGE_DATA: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("migration stream: {0}")]
    Io(#[from] io::Error),
    #[error("not a migration stream (bad magic)")]
    Magic,
    #[error("migration stream version {0} is not supported (this vmm reads version {VERSION})")]
    Version(u32),
    #[error("the migration stream ends early")]
    Truncated,
    #[error("unknown record {0} in the migration stream")]
    UnknownRecord(u8),
    #[error("a record of {0} bytes in the migration stream is too long")]
    RecordTooLong(u32),
    #[error("malformed {what} record: {message}")]
    Malformed { what: &'static str, message: String },
    #[error("the migration stream is corrupt (checksum {got:#010x}, expected {want:#010x})")]
    Checksum { got: u32, want: u32 },
}

/// What the destination checks against its own configuration before it loads a byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub ram_size: u64,
    pub vcpus: u32,
    /// The accelerator's name (`emu`, `kvm`): vCPU state is in its encoding.
    pub accel: String,
    /// Every device that carries state, as `kind id` in a fixed order.
    pub devices: Vec<String>,
    /// The guest was running when the migration started (the destination resumes it).
    pub running: bool,
}

/// One record read back.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    Header(Header),
    /// `count` pages from page `first` (guest-RAM memfd order): `None` for a zero page.
    Ram {
        first: u64,
        pages: Vec<Option<Vec<u8>>>,
    },
    Section {
        name: String,
        state: Vec<u8>,
    },
    /// The disks whose contents follow (block migration), before any of their chunks.
    Disks(Vec<DiskInfo>),
    /// Chunks of disk `disk` (its index in [`Record::Disks`]) from chunk `first`: `None`
    /// for a chunk of zeroes.
    Disk {
        disk: u32,
        first: u64,
        chunks: Vec<Option<Vec<u8>>>,
    },
    /// The end marker, its checksum verified.
    End,
}

/// Writes records and keeps the running checksum.
pub struct StreamWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
    /// Bytes written so far (query-migrate's `transferred`).
    pub bytes: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Start a stream on `inner`: the magic and the version.
    pub fn new(inner: W) -> io::Result<Self> {
        let mut w = StreamWriter {
            inner,
            crc: crc32fast::Hasher::new(),
            bytes: 0,
        };
        w.put(MAGIC)?;
        w.put(&VERSION.to_le_bytes())?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_all(bytes)?;
        self.crc.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    fn record(&mut self, tag: u8, payload: &[&[u8]]) -> io::Result<()> {
        let len: usize = payload.iter().map(|p| p.len()).sum();
        let len = u32::try_from(len).map_err(|_| io::Error::other("record too long"))?;
        self.put(&[tag])?;
        self.put(&len.to_le_bytes())?;
        for p in payload {
            self.put(p)?;
        }
        Ok(())
    }

    pub fn header(&mut self, header: &Header) -> io::Result<()> {
        let bytes = postcard::to_stdvec(header).map_err(io::Error::other)?;
        self.record(TAG_HEADER, &[&bytes])
    }

    /// Pages from page `first`, each `None` (zero) or its 4 KiB.
    pub fn ram(&mut self, first: u64, pages: &[Option<&[u8]>]) -> io::Result<()> {
        let count = u32::try_from(pages.len())
            .ok()
            .filter(|&n| n <= MAX_RUN_PAGES)
            .ok_or_else(|| io::Error::other("too many pages in one record"))?;
        let flags: Vec<u8> = pages
            .iter()
            .map(|p| if p.is_some() { PAGE_DATA } else { PAGE_ZERO })
            .collect();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(pages.len() + 1);
        let head: Vec<u8> = first
            .to_le_bytes()
            .into_iter()
            .chain(count.to_le_bytes())
            .chain(flags)
            .collect();
        parts.push(&head);
        for page in pages.iter().flatten() {
            if page.len() != PAGE_SIZE {
                return Err(io::Error::other("a RAM page is not 4 KiB"));
            }
            parts.push(page);
        }
        self.record(TAG_RAM, &parts)
    }

    pub fn disks(&mut self, disks: &[DiskInfo]) -> io::Result<()> {
        let bytes = postcard::to_stdvec(disks).map_err(io::Error::other)?;
        self.record(TAG_DISKS, &[&bytes])
    }

    /// Chunks of disk `disk` from chunk `first`, each `None` (zeroes) or its bytes (a
    /// whole chunk, or less for the disk's last).
    pub fn disk_chunks(
        &mut self,
        disk: u32,
        first: u64,
        chunks: &[Option<&[u8]>],
    ) -> io::Result<()> {
        let count = u32::try_from(chunks.len())
            .ok()
            .filter(|&n| n <= TRANSFER_CHUNKS)
            .ok_or_else(|| io::Error::other("too many chunks in one record"))?;
        let mut head: Vec<u8> = disk
            .to_le_bytes()
            .into_iter()
            .chain(first.to_le_bytes())
            .chain(count.to_le_bytes())
            .collect();
        for chunk in chunks {
            let len = chunk.map_or(0, <[u8]>::len) as u64;
            if len > CHUNK_SIZE || chunk.is_some_and(<[u8]>::is_empty) {
                return Err(io::Error::other("a disk chunk of a wrong size"));
            }
            head.extend_from_slice(&(len as u32).to_le_bytes());
        }
        let mut parts: Vec<&[u8]> = vec![&head];
        parts.extend(chunks.iter().flatten());
        self.record(TAG_DISK, &parts)
    }

    pub fn section(&mut self, name: &str, state: &[u8]) -> io::Result<()> {
        let name_len = u32::try_from(name.len()).map_err(io::Error::other)?;
        self.record(
            TAG_SECTION,
            &[&name_len.to_le_bytes(), name.as_bytes(), state],
        )
    }

    /// The end marker with the checksum of everything before it; flushes.
    pub fn end(&mut self) -> io::Result<()> {
        let crc = self.crc.clone().finalize();
        self.inner.write_all(&[TAG_END])?;
        self.inner.write_all(&4u32.to_le_bytes())?;
        self.inner.write_all(&crc.to_le_bytes())?;
        self.bytes += 9;
        self.inner.flush()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Reads records, checking the magic, the version and at the end the checksum.
pub struct StreamReader<R: Read> {
    inner: R,
    crc: crc32fast::Hasher,
    pub bytes: u64,
}

impl<R: Read> StreamReader<R> {
    pub fn new(inner: R) -> Result<Self, StreamError> {
        let mut r = StreamReader {
            inner,
            crc: crc32fast::Hasher::new(),
            bytes: 0,
        };
        let mut magic = [0u8; 8];
        r.take(&mut magic)?;
        if &magic != MAGIC {
            return Err(StreamError::Magic);
        }
        let mut version = [0u8; 4];
        r.take(&mut version)?;
        let version = u32::from_le_bytes(version);
        if version != VERSION {
            return Err(StreamError::Version(version));
        }
        Ok(r)
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<(), StreamError> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => StreamError::Truncated,
            _ => StreamError::Io(e),
        })?;
        self.crc.update(buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// The next record.
    pub fn next_record(&mut self) -> Result<Record, StreamError> {
        let expected = self.crc.clone().finalize();
        let mut head = [0u8; 5];
        self.take(&mut head)?;
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if len > MAX_RECORD {
            return Err(StreamError::RecordTooLong(len));
        }
        let mut payload = vec![0u8; len as usize];
        self.take(&mut payload)?;
        match head[0] {
            TAG_HEADER => postcard::from_bytes(&payload)
                .map(Record::Header)
                .map_err(|e| malformed("header", e)),
            TAG_RAM => ram_record(&payload),
            TAG_DISKS => postcard::from_bytes(&payload)
                .map(Record::Disks)
                .map_err(|e| malformed("disks", e)),
            TAG_DISK => disk_record(&payload),
            TAG_SECTION => {
                let (len, rest) = payload
                    .split_first_chunk::<4>()
                    .ok_or_else(|| malformed("section", "no name"))?;
                let len = u32::from_le_bytes(*len) as usize;
                if len > rest.len() {
                    return Err(malformed("section", "name past the record"));
                }
                let (name, state) = rest.split_at(len);
                let name = String::from_utf8(name.to_vec()).map_err(|e| malformed("section", e))?;
                Ok(Record::Section {
                    name,
                    state: state.to_vec(),
                })
            }
            TAG_END => {
                let got = payload
                    .first_chunk::<4>()
                    .map(|b| u32::from_le_bytes(*b))
                    .filter(|_| payload.len() == 4)
                    .ok_or_else(|| malformed("end", "not a checksum"))?;
                if got != expected {
                    return Err(StreamError::Checksum {
                        got: expected,
                        want: got,
                    });
                }
                Ok(Record::End)
            }
            other => Err(StreamError::UnknownRecord(other)),
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

fn malformed(what: &'static str, e: impl std::fmt::Display) -> StreamError {
    StreamError::Malformed {
        what,
        message: e.to_string(),
    }
}

fn ram_record(payload: &[u8]) -> Result<Record, StreamError> {
    let (first, rest) = payload
        .split_first_chunk::<8>()
        .ok_or_else(|| malformed("RAM", "too short"))?;
    let (count, rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| malformed("RAM", "too short"))?;
    let count = u32::from_le_bytes(*count);
    if count > MAX_RUN_PAGES || count as usize > rest.len() {
        return Err(malformed("RAM", format!("{count} pages")));
    }
    let (flags, mut data) = rest.split_at(count as usize);
    let mut pages = Vec::with_capacity(count as usize);
    for &flag in flags {
        match flag {
            PAGE_ZERO => pages.push(None),
            PAGE_DATA => {
                if data.len() < PAGE_SIZE {
                    return Err(malformed("RAM", "a page past the record"));
                }
                let (page, rest) = data.split_at(PAGE_SIZE);
                pages.push(Some(page.to_vec()));
                data = rest;
            }
            other => return Err(malformed("RAM", format!("page flag {other}"))),
        }
    }
    if !data.is_empty() {
        return Err(malformed("RAM", "bytes after the last page"));
    }
    Ok(Record::Ram {
        first: u64::from_le_bytes(*first),
        pages,
    })
}

fn disk_record(payload: &[u8]) -> Result<Record, StreamError> {
    let short = || malformed("disk", "too short");
    let (disk, rest) = payload.split_first_chunk::<4>().ok_or_else(short)?;
    let (first, rest) = rest.split_first_chunk::<8>().ok_or_else(short)?;
    let (count, mut rest) = rest.split_first_chunk::<4>().ok_or_else(short)?;
    let count = u32::from_le_bytes(*count);
    if count > TRANSFER_CHUNKS {
        return Err(malformed("disk", format!("{count} chunks")));
    }
    let mut lens = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (len, r) = rest.split_first_chunk::<4>().ok_or_else(short)?;
        let len = u32::from_le_bytes(*len) as u64;
        if len > CHUNK_SIZE {
            return Err(malformed("disk", format!("a chunk of {len} bytes")));
        }
        lens.push(len as usize);
        rest = r;
    }
    let mut chunks = Vec::with_capacity(count as usize);
    for len in lens {
        if len == 0 {
            chunks.push(None);
            continue;
        }
        if rest.len() < len {
            return Err(malformed("disk", "a chunk past the record"));
        }
        let (data, r) = rest.split_at(len);
        chunks.push(Some(data.to_vec()));
        rest = r;
    }
    if !rest.is_empty() {
        return Err(malformed("disk", "bytes after the last chunk"));
    }
    Ok(Record::Disk {
        disk: u32::from_le_bytes(*disk),
        first: u64::from_le_bytes(*first),
        chunks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            ram_size: 64 << 20,
            vcpus: 1,
            accel: "emu".into(),
            devices: vec!["serial 0".into()],
            running: true,
        }
    }

    fn disks() -> Vec<DiskInfo> {
        vec![DiskInfo {
            drive: "disk0".into(),
            size: 5 << 20,
            incremental: false,
            backing: None,
        }]
    }

    fn sample() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.header(&header()).unwrap();
        let page = vec![0xab; PAGE_SIZE];
        w.ram(7, &[None, Some(&page), None]).unwrap();
        w.disks(&disks()).unwrap();
        w.disk_chunks(0, 3, &[Some(&[7u8; 600][..]), None]).unwrap();
        w.section("serial 0", b"state").unwrap();
        w.end().unwrap();
        let counted = w.bytes;
        let bytes = w.into_inner();
        assert_eq!(counted, bytes.len() as u64);
        bytes
    }

    #[test]
    fn records_come_back_as_written() {
        let bytes = sample();
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        assert_eq!(r.next_record().unwrap(), Record::Header(header()));
        match r.next_record().unwrap() {
            Record::Ram { first, pages } => {
                assert_eq!(first, 7);
                assert_eq!(pages.len(), 3);
                assert!(pages[0].is_none() && pages[2].is_none());
                assert_eq!(pages[1].as_deref(), Some(&[0xab; PAGE_SIZE][..]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.next_record().unwrap(), Record::Disks(disks()));
        assert_eq!(
            r.next_record().unwrap(),
            Record::Disk {
                disk: 0,
                first: 3,
                chunks: vec![Some(vec![7u8; 600]), None]
            }
        );
        assert_eq!(
            r.next_record().unwrap(),
            Record::Section {
                name: "serial 0".into(),
                state: b"state".to_vec()
            }
        );
        assert_eq!(r.next_record().unwrap(), Record::End);
    }

    #[test]
    fn foreign_truncated_and_corrupt_streams_are_refused() {
        let bytes = sample();
        assert!(matches!(
            StreamReader::new(&b"QEVM\0\0\0\x03xxxx"[..]),
            Err(StreamError::Magic)
        ));
        let mut other = bytes.clone();
        other[8] = 9;
        assert!(matches!(
            StreamReader::new(&other[..]),
            Err(StreamError::Version(9))
        ));
        // Cut anywhere: an error, never a panic or a clean end.
        for cut in 0..bytes.len() {
            let read_all = || -> Result<(), StreamError> {
                let mut r = StreamReader::new(&bytes[..cut])?;
                while r.next_record()? != Record::End {}
                Ok(())
            };
            assert!(read_all().is_err(), "cut at {cut}");
        }
        // One flipped bit in a page: the checksum catches it.
        let mut flipped = bytes.clone();
        let at = bytes.len() - 200;
        flipped[at] ^= 1;
        let mut r = StreamReader::new(&flipped[..]).unwrap();
        let err = loop {
            match r.next_record() {
                Ok(Record::End) => panic!("a corrupt stream was accepted"),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert!(matches!(err, StreamError::Checksum { .. }), "{err}");
    }
}
