//! Fuzz targets: each takes bytes an attacker controls and feeds them to one of our
//! parsers, the way the vmm or a device process would. A target must never panic, hang or
//! allocate without bound, whatever the bytes; it returns nothing (what the parser says
//! does not matter, only that it says it).
//!
//! `fuzz/` (cargo-fuzz, libFuzzer) runs them with coverage guidance: `scripts/fuzz`.
//! `tests/corpus.rs` replays every corpus file (`fuzz/corpus/TARGET/`) on each test run,
//! so an input that once crashed stays fixed.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};

/// A fuzz target: it takes any bytes.
pub type Target = fn(&[u8]);

/// Every target, by name (the corpus directory and the cargo-fuzz binary have it too).
pub const TARGETS: &[(&str, Target)] = &[
    ("qmp_stream", qmp_stream),
    ("migration_stream", migration_stream),
    ("ipc_messages", ipc_messages),
    ("qcow2_image", qcow2_image),
    ("cli_args", cli_args),
];

/// A QMP client's bytes, fed in two pieces (split where the first byte says), through
/// the JSON stream, the session (negotiation, `execute`, `id`, OOB) and the argument
/// checks against the seed schema.
pub fn qmp_stream(data: &[u8]) {
    let Ok(schema) = qmp::Schema::seed() else {
        return;
    };
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut stream = qmp::stream::JsonStream::new(qmp::stream::StreamLimits::default());
    let mut session = qmp::protocol::Session::new(data.len().is_multiple_of(2));
    for piece in [&data[..split], &data[split..]] {
        for item in stream.feed_collect(piece) {
            let _ = session.handle(item, &schema);
        }
    }
}

/// A migration stream from a malicious source: every record until the end or an error.
pub fn migration_stream(data: &[u8]) {
    use vmm::migration::stream::{Record, StreamReader};
    let Ok(mut reader) = StreamReader::new(data) else {
        return;
    };
    // Each record consumes at least its 5-byte head: this ends.
    while let Ok(record) = reader.next_record() {
        if record == Record::End {
            break;
        }
    }
}

/// A control message from a compromised process (or vmm), for every kind of device and
/// both directions, as the channel decodes it.
pub fn ipc_messages(data: &[u8]) {
    use ipc::channel::Message;
    let _ = postcard::from_bytes::<
        Message<ipc::blk::BlkRequest, ipc::blk::BlkReply, ipc::blk::BlkEvent>,
    >(data);
    let _ = postcard::from_bytes::<
        Message<ipc::scsi::ScsiRequest, ipc::scsi::ScsiReply, ipc::scsi::ScsiEvent>,
    >(data);
    let _ = postcard::from_bytes::<
        Message<ipc::net::NetRequest, ipc::net::NetReply, ipc::net::NetEvent>,
    >(data);
    let _ = postcard::from_bytes::<
        Message<
            ipc::display::DisplayRequest,
            ipc::display::DisplayReply,
            ipc::display::DisplayEvent,
        >,
    >(data);
}

/// A qcow2 image as the attacker wrote it (header, L1/L2 and refcount tables, its data):
/// opened by vmm-blk's image layer, its allocation walked (`inc`'s set), and its first
/// chunks read through the chain.
pub fn qcow2_image(data: &[u8]) {
    use device_procs::blk::image::Image;
    use ipc::blk::{ImageFormat, InitialChunks};
    let Some(file) = memfd(data) else {
        return;
    };
    let Ok(image) = Image::open(ImageFormat::Qcow2, &[], vec![file], false) else {
        return;
    };
    let Ok(disk) = device_procs::blk::request::Disk::with_image(image, true, "fuzz") else {
        return;
    };
    let chunk = 64 * 1024;
    let (Some(bitmap), Some(buffer)) = (memfd_of_len(4096), memfd_of_len(4 * chunk)) else {
        return;
    };
    // Images of up to 16 MiB are walked whole; larger ones (the header says so, the file
    // need not hold it) only at the start.
    if disk.capacity() * 512 <= 16 << 20 {
        let _ = disk.track_chunks(&bitmap, 1 << 20, InitialChunks::Top);
        disk.dirty_chunks().stop();
    }
    let chunks = (disk.capacity() * 512).div_ceil(chunk).min(4) as u32;
    if chunks > 0 {
        let _ = disk.read_chunks(&buffer, chunk, 0, chunks);
    }
}

/// The vmm's command line: the bytes, split at NUL or newline, as arguments.
pub fn cli_args(data: &[u8]) {
    let args: Vec<String> = data
        .split(|b| *b == 0 || *b == b'\n')
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let _ = vmm::cli::parse_args(args);
}

/// A memfd holding `data`, as a `File`.
fn memfd(data: &[u8]) -> Option<std::fs::File> {
    let mut file = std::fs::File::from(memfd_of_len(0)?);
    file.write_all(data).ok()?;
    Some(file)
}

/// An empty memfd of `len` bytes.
fn memfd_of_len(len: u64) -> Option<OwnedFd> {
    // SAFETY: memfd_create with a static name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = std::fs::File::from(fd);
    file.set_len(len).ok()?;
    Some(file.into())
}
