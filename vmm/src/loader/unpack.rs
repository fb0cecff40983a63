//! Unpacking a bzImage's payload (gzip, xz or zstd), into memory or into a writer (the
//! kernel cache's file), never past a limit: a small payload must not make the vmm
//! allocate or write gigabytes.

use std::io::{Read, Write};

use super::LoaderError;

/// Decompress `payload` into memory, refusing more than `limit` bytes of output.
pub(super) fn decompress_payload(payload: &[u8], limit: u64) -> Result<Vec<u8>, LoaderError> {
    let mut out = Vec::new();
    decompress_into(
        payload,
        limit,
        &mut GrowingVec {
            out: &mut out,
            cap: limit,
        },
    )?;
    Ok(out)
}

/// Decompress `payload` (gzip, xz or zstd, by its magic) into `out`, refusing more than
/// `limit` bytes of output: checked before each piece is written, so a small payload never
/// makes the vmm allocate or write gigabytes.
pub(super) fn decompress_into(
    payload: &[u8],
    limit: u64,
    out: &mut dyn Write,
) -> Result<(), LoaderError> {
    let mut magic = [0u8; 4];
    let n = payload.len().min(4);
    magic[..n].copy_from_slice(&payload[..n]);
    let mut out = Bounded {
        out,
        written: 0,
        limit,
    };
    match magic {
        [0x1f, 0x8b, _, _] => read_bounded(flate2::read::GzDecoder::new(payload), &mut out),
        [0xfd, b'7', b'z', b'X'] => decompress_xz(payload, &mut out),
        [0x28, 0xb5, 0x2f, 0xfd] => {
            let decoder = zstd::stream::read::Decoder::new(payload)
                .map_err(LoaderError::Decompress)?
                .single_frame();
            read_bounded(decoder, &mut out)
        }
        other => Err(LoaderError::UnsupportedCompression(other)),
    }
}

/// Decompressed output on its way to `out`, counted against `limit` before it is written.
struct Bounded<'a> {
    out: &'a mut dyn Write,
    written: u64,
    limit: u64,
}

impl Bounded<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), LoaderError> {
        let written = self.written + bytes.len() as u64;
        if written > self.limit {
            return Err(LoaderError::DecompressedTooLarge { limit: self.limit });
        }
        self.out
            .write_all(bytes)
            .map_err(LoaderError::WriteUnpacked)?;
        self.written = written;
        Ok(())
    }
}

/// A Vec as a writer that grows in steps (half what it holds, at least 1 MiB) that never
/// take its capacity past `cap` bytes: a buffer that doubles would allocate up to twice
/// the limit.
struct GrowingVec<'a> {
    out: &'a mut Vec<u8>,
    cap: u64,
}

impl Write for GrowingVec<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.capacity() - self.out.len() < buf.len() {
            let room = self.cap.saturating_sub(self.out.len() as u64);
            let step = (self.out.len() as u64 / 2)
                .max(1 << 20)
                .min(room)
                .max(buf.len() as u64);
            self.out.reserve_exact(step as usize);
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Read `reader` to its end into `out`.
fn read_bounded(mut reader: impl Read, out: &mut Bounded<'_>) -> Result<(), LoaderError> {
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => out.put(&chunk[..n])?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LoaderError::Decompress(e)),
        }
    }
}

/// Decode the first xz stream of `payload` into `out`. The kernel's build appends the
/// uncompressed size after the stream, which a streaming decoder would take for a corrupt
/// second stream, so decoding stops at the end of the first.
fn decompress_xz(payload: &[u8], out: &mut Bounded<'_>) -> Result<(), LoaderError> {
    use xz2::stream::{Action, Status, Stream};
    let failed = |e| LoaderError::Decompress(std::io::Error::other(e));
    let mut stream = Stream::new_stream_decoder(u64::MAX, 0).map_err(failed)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let (consumed, produced) = (stream.total_in(), stream.total_out());
        let input = payload.get(consumed as usize..).unwrap_or_default();
        let status = stream
            .process(input, &mut buf, Action::Finish)
            .map_err(failed)?;
        let n = (stream.total_out() - produced) as usize;
        out.put(&buf[..n])?;
        if status == Status::StreamEnd {
            return Ok(());
        }
        if stream.total_in() == consumed && n == 0 {
            return Err(LoaderError::Decompress(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "truncated xz stream",
            )));
        }
    }
}
