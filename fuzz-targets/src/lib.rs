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
    ("virtio_blk_chain", virtio_blk_chain),
    ("socket_frames", socket_frames),
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

/// A guest's virtio-blk request: the first 8 descriptors of the queue's table (16 bytes
/// each: address, length, flags, next) and what lies in guest memory where they point (the
/// header, the data, the discard ranges), processed by vmm-blk against a 64 KiB raw disk.
/// Addresses fall in 2 MiB (guest RAM is the first 1 MiB): some point outside RAM.
pub fn virtio_blk_chain(data: &[u8]) {
    use device_procs::blk::request::{process, Disk, GuestMem};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::{Bytes, GuestAddress};

    const DESCS: usize = 8;
    const RAM: usize = 1 << 20;
    let (table, contents) = data.split_at(data.len().min(DESCS * 16));
    let Ok(mem) = GuestMem::from_ranges(&[(GuestAddress(0), RAM)]) else {
        return;
    };
    // The guest's bytes from the start of RAM's second half (the ring sits below).
    let _ = mem.write_slice(
        &contents[..contents.len().min(RAM / 2)],
        GuestAddress(RAM as u64 / 2),
    );
    let Some(file) = memfd(&[0x5a; 64 * 1024]) else {
        return;
    };
    let Ok(disk) = Disk::new(file, false, "fuzz") else {
        return;
    };
    let q = MockSplitQueue::new(&mem, DESCS as u16);
    for (i, d) in table.chunks_exact(16).enumerate() {
        let word = |at: usize, n: usize| {
            d[at..at + n]
                .iter()
                .rev()
                .fold(0u64, |v, b| v << 8 | u64::from(*b))
        };
        let desc = Descriptor::new(
            word(0, 8) % (2 << 20),
            word(8, 4) as u32,
            word(12, 2) as u16,
            word(14, 2) as u16,
        );
        let _ = q.desc_table().store(i as u16, RawDescriptor::from(desc));
    }
    let _ = q.avail().ring().ref_at(0).map(|r| r.store(0u16.to_le()));
    q.avail().idx().store(1u16.to_le());
    let Ok(mut queue) = q.create_queue::<Queue>() else {
        return;
    };
    let Ok(mut chains) = queue.iter(&mem) else {
        return;
    };
    if let Some(chain) = chains.next() {
        let _ = process(&disk, chain);
    }
}

/// Bytes on a unix socket from a peer that does not follow the protocol: the control
/// channel's frames (length-prefixed; each payload decoded as a block message) read until
/// the end, and a local migration's offer as the destination reads it.
pub fn socket_frames(data: &[u8]) {
    use ipc::channel::Message;
    use std::os::unix::net::UnixStream;
    // The data fits the socket's buffer (a few hundred KiB): the write does not block.
    let data = &data[..data.len().min(64 * 1024)];
    for which in 0..2 {
        let Ok((mut ours, theirs)) = UnixStream::pair() else {
            return;
        };
        if ours.write_all(data).is_err() {
            return;
        }
        drop(ours.shutdown(std::net::Shutdown::Write));
        if which == 0 {
            while let Ok((payload, _fds)) = ipc::frame::recv_frame(&theirs) {
                let _ = postcard::from_bytes::<
                    Message<ipc::blk::BlkRequest, ipc::blk::BlkReply, ipc::blk::BlkEvent>,
                >(&payload);
            }
        } else {
            let _ = vmm::migration::local::offered(&theirs);
            let _ = vmm::migration::local::receive_offer(&theirs);
        }
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
