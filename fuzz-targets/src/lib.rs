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
    ("hmp_line", hmp_line),
    ("scsi_cdb", scsi_cdb),
    ("vhost_user_messages", vhost_user_messages),
    ("virtio_balloon", virtio_balloon),
    ("virtio_net_chain", virtio_net_chain),
    ("virtio_input", virtio_input),
    ("rfb_client", rfb_client),
    ("kernel_loader", kernel_loader),
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

/// A human monitor client's text: line by line as the console reads it (each trimmed,
/// lossily decoded), split into words and the arguments of its command parsed, as
/// `human-monitor-command` does before it touches the machine.
pub fn hmp_line(data: &[u8]) {
    for line in data.split(|b| *b == b'\n') {
        let text = String::from_utf8_lossy(line);
        let _ = vmm::monitor::hmp::check(text.trim());
    }
}

/// SCSI commands from a guest, as vmm-scsi serves them: a controller with a CD-ROM (LUN
/// 0, a 64-block medium unless the first byte's bit 0 says none) and an empty drive (LUN
/// 1), its queues in 1 MiB of guest memory. The first byte also picks EVENT_IDX (bit 1)
/// and, with bit 2, the sense and CDB sizes the driver writes (the next two bytes). Then
/// 24-byte records, each one request put on its queue and served:
///
/// - byte 0: the unit (bits 0-1: LUN 0, LUN 1, a missing target, a bad LUN field), how
///   the chain is laid out (bits 2-3: plainly, buffers split in two, a device-readable
///   buffer after a writable one, through an indirect table), the control queue instead
///   (bit 4: a task management function or an event query), a short response buffer
///   (bit 5: byte 7 is its length);
/// - bytes 1-2 and 3-4: the data-out and data-in buffer sizes (little endian);
/// - bytes 8-23: the CDB (or the control request's type and subtype).
pub fn scsi_cdb(data: &[u8]) {
    use device_procs::scsi::backend::{GuestMem, ScsiBackend};
    use device_procs::scsi::bus::Bus;
    use device_procs::scsi::cdrom::Medium;
    use vhost_user_backend::VhostUserBackend;
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
    use vmm_sys_util::epoll::EventSet;

    const RING_SIZE: u16 = 64;
    const REQ: u64 = 0x8000;
    const DATA_OUT: u64 = 0x2_0000;
    const DATA_IN: u64 = 0x4_0000;
    const RESP: u64 = 0x6_0000;
    const INDIRECT: u64 = 0x3000;
    const RECORD: usize = 24;

    let Some((&setup, mut rest)) = data.split_first() else {
        return;
    };
    let medium = if setup & 1 == 0 {
        let blocks: Vec<u8> = (0..64 * 2048u32).map(|i| (i / 2048) as u8).collect();
        memfd(&blocks).and_then(|f| Medium::new(f).ok())
    } else {
        None
    };
    let bus = std::sync::Arc::new(Bus::new(None));
    if bus.add_cdrom(0, 0, "cd0", "QM00001", medium).is_err()
        || bus.add_cdrom(0, 1, "cd1", "", None).is_err()
    {
        return;
    }
    let Ok(backend) = ScsiBackend::new(bus, 1, RING_SIZE) else {
        return;
    };
    let Ok(mem) = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]) else {
        return;
    };
    let atomic = GuestMemoryAtomic::new(mem);
    let _ = backend.update_memory(atomic.clone());
    let event_idx = setup & 2 != 0;
    backend.set_event_idx(event_idx);
    let (mut sense_size, mut cdb_size) = (96u64, 32u64);
    if setup & 4 != 0 {
        let (sizes, tail) = rest.split_at(rest.len().min(2));
        rest = tail;
        let sizes = [
            sizes.first().copied().unwrap_or(0),
            sizes.get(1).copied().unwrap_or(0),
        ];
        if backend
            .set_config(20, &u32::from(sizes[0]).to_le_bytes())
            .is_ok()
        {
            sense_size = u64::from(sizes[0]);
        }
        if backend
            .set_config(24, &u32::from(sizes[1]).to_le_bytes())
            .is_ok()
        {
            cdb_size = u64::from(sizes[1]);
        }
    }
    let Some(vrings) = ready_vrings(&atomic, 3, RING_SIZE, event_idx) else {
        return;
    };
    let guard = atomic.memory();
    let mem = &*guard;
    let all: Vec<_> = vrings.iter().map(|(v, _)| v.clone()).collect();
    for record in rest.chunks(RECORD) {
        let mut r = [0u8; RECORD];
        r[..record.len()].copy_from_slice(record);
        let flags = r[0];
        let data_out = u64::from(u16::from_le_bytes([r[1], r[2]]));
        let data_in = u64::from(u16::from_le_bytes([r[3], r[4]]));
        let lun: [u8; 8] = match flags & 3 {
            0 => [1, 0, 0, 0, 0, 0, 0, 0],
            1 => [1, 0, 0, 1, 0, 0, 0, 0],
            2 => [1, 3, 0, 0, 0, 0, 0, 0],
            _ => [r[5], r[6], 0x40 | (r[7] & 0x3f), r[7], 0, 0, 0, 0],
        };
        let control = flags & 0x10 != 0;
        let (queue, request, resp_len) = if control {
            // type, subtype, lun, tag (a TMF; an event query reads 16 of these bytes).
            let mut req = u32::from(r[8] & 3).to_le_bytes().to_vec();
            req.extend_from_slice(&u32::from(r[9]).to_le_bytes());
            req.extend_from_slice(&lun);
            req.extend_from_slice(&[0; 8]);
            (0usize, req, u64::from(r[10] & 7))
        } else {
            let mut req = lun.to_vec();
            req.extend_from_slice(&[0; 11]); // tag, task attribute, priority, crn
            let mut cdb = r[8..24].to_vec();
            cdb.resize(cdb_size as usize, 0);
            req.extend_from_slice(&cdb);
            let resp = if flags & 0x20 != 0 {
                u64::from(r[7])
            } else {
                12 + sense_size
            };
            (2usize, req, resp)
        };
        let _ = mem.write_slice(&request, GuestAddress(REQ));
        let req_len = request.len() as u64;
        let (r_, w) = (false, true);
        let mut bufs: Vec<(u64, u64, bool)> = vec![(REQ, req_len, r_)];
        let plain_tail = |bufs: &mut Vec<(u64, u64, bool)>| {
            if data_out > 0 {
                bufs.push((DATA_OUT, data_out, r_));
            }
            bufs.push((RESP, resp_len, w));
            if data_in > 0 {
                bufs.push((DATA_IN, data_in, w));
            }
        };
        let layout = (flags >> 2) & 3;
        match layout {
            1 => {
                bufs = vec![
                    (REQ, 7.min(req_len), r_),
                    (REQ + 7, req_len.saturating_sub(7), r_),
                ];
                if data_out > 0 {
                    bufs.push((DATA_OUT, data_out, r_));
                }
                bufs.push((RESP, resp_len, w));
                if data_in > 0 {
                    bufs.push((DATA_IN, data_in / 2, w));
                    bufs.push((DATA_IN + data_in / 2, data_in - data_in / 2, w));
                }
            }
            2 => {
                bufs.push((RESP, resp_len, w));
                bufs.push((DATA_OUT, data_out.max(1), r_));
            }
            _ => plain_tail(&mut bufs),
        }
        let ring = vrings[queue].1;
        ring.put_chain(mem, &bufs, (layout == 3).then_some(INDIRECT));
        let _ = backend.handle_event(queue as u16, EventSet::IN, &all, queue);
    }
}

/// vhost-user messages from a peer that breaks the protocol. The first byte's bit 0 picks
/// the side: clear, the bytes are a frontend's requests to vmm-blk's backend (vmm-scsi's
/// with bit 1) (each
/// message sent with the fds its request carries: eventfds for the ring notifiers, memfds
/// of the sizes a memory table names, a socket for the backend channel); set, they are a
/// backend's replies to the vmm's frontend, which connects (negotiation, configuration),
/// then writes the configuration, starts a queue, stops it for a migration, restarts it,
/// starts dirty logging and resets, each step reading its reply from the bytes.
pub fn vhost_user_messages(data: &[u8]) {
    // A peer that went away must be an error, not a signal (the fuzzer's main is C's, so
    // Rust's runtime does not ignore SIGPIPE).
    static NO_SIGPIPE: std::sync::Once = std::sync::Once::new();
    // SAFETY: setting a signal's disposition to SIG_IGN; no handler runs.
    NO_SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let rest = &rest[..rest.len().min(32 * 1024)];
    if which & 1 == 0 {
        vhost_backend_reads(rest, which & 2 != 0);
    } else if which & 2 == 0 {
        vhost_frontend_reads(rest, &[]);
    } else {
        // A le16 length, the replies, then the backend's requests on its channel.
        let len = rest
            .get(..2)
            .map_or(0, |l| usize::from(u16::from_le_bytes([l[0], l[1]])));
        let rest = rest.get(2..).unwrap_or(&[]);
        let (replies, requests) = rest.split_at(len.min(rest.len()));
        vhost_frontend_reads(replies, requests);
    }
}

/// The frontend's side of [`vhost_user_messages`]: vmm-blk's backend (one 64 KiB disk, one
/// queue), or with `scsi` vmm-scsi's (one request queue, a CD-ROM), serves one connection
/// whose requests are `data`.
fn vhost_backend_reads(data: &[u8], scsi: bool) {
    use device_procs::blk::backend::BlkBackend;
    use device_procs::blk::request::Disk;
    use device_procs::scsi::backend::ScsiBackend;
    use device_procs::scsi::bus::Bus;
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex, OnceLock};
    use vhost::vhost_user::Listener;

    // One listening socket for the whole run; each input is one connection to it.
    static LISTENER: OnceLock<Option<Mutex<(Listener, std::path::PathBuf)>>> = OnceLock::new();
    let listener = LISTENER.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("vmm-fuzz-vhost-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).ok()?;
        Some(Mutex::new((Listener::from(listener), path)))
    });
    let Some(listener) = listener else {
        return;
    };
    let mut listener = listener.lock().unwrap_or_else(|e| e.into_inner());
    let Some(file) = memfd(&[0x5a; 64 * 1024]) else {
        return;
    };
    if scsi {
        let bus = Arc::new(Bus::new(None));
        let medium = device_procs::scsi::cdrom::Medium::new(file).ok();
        if bus.add_cdrom(0, 0, "cd0", "", medium).is_err() {
            return;
        }
        if let Ok(backend) = ScsiBackend::new(bus, 1, 128) {
            vhost_serve(&Arc::new(backend), &mut listener, data);
        }
        return;
    }
    let Ok(disk) = Disk::new(file, false, "fuzz") else {
        return;
    };
    if let Ok(backend) = BlkBackend::new(disk, 1, 128, Default::default(), None) {
        vhost_serve(&Arc::new(backend), &mut listener, data);
    }
}

/// Serve one connection of `backend` on `listener` (and its path): a peer that sends the
/// messages of `data` and reads the replies.
fn vhost_serve<B: device_procs::vhost_daemon::Served>(
    backend: &std::sync::Arc<B>,
    listener: &mut (vhost::vhost_user::Listener, std::path::PathBuf),
    data: &[u8],
) {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let Ok(client) = UnixStream::connect(&listener.1) else {
        return;
    };
    let Ok(reader) = client.try_clone() else {
        return;
    };
    let frames = vhost_frames(data);
    // The peer: every message, then the end; then it takes the replies until the backend
    // hangs up (a thread: the backend does not read until it is served below).
    let peer = std::thread::spawn(move || {
        for (bytes, fds) in &frames {
            let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
            if client.send_with_fds(&[&bytes[..]], &raw).is_err() {
                break;
            }
        }
        let _ = client.shutdown(std::net::Shutdown::Write);
        let _ = std::io::copy(&mut &client, &mut std::io::sink());
    });
    if device_procs::vhost_daemon::serve_one(backend, &mut listener.0).is_err() {
        let _ = reader.shutdown(std::net::Shutdown::Both);
    }
    let _ = peer.join();
}

/// `data` cut into vhost-user messages by their headers' sizes, each with the fds its
/// request carries.
fn vhost_frames(mut data: &[u8]) -> Vec<(Vec<u8>, Vec<OwnedFd>)> {
    const SET_MEM_TABLE: u32 = 5;
    const SET_LOG_BASE: u32 = 6;
    const SET_LOG_FD: u32 = 7;
    const SET_VRING_KICK: u32 = 12;
    const SET_VRING_ERR: u32 = 14;
    const SET_BACKEND_REQ_FD: u32 = 21;
    const ADD_MEM_REG: u32 = 37;
    /// Largest memfd made for a region or a log: a bigger one gets none.
    const MAX_SHARED: u64 = 16 << 20;
    let le32 = |b: &[u8], at: usize| {
        b.get(at..at + 4)
            .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let le64 = |b: &[u8], at: usize| u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32;
    // A memfd of `size + offset` bytes (what the backend maps).
    let shared = |size: u64, offset: u64| {
        size.checked_add(offset)
            .filter(|n| *n <= MAX_SHARED)
            .and_then(memfd_of_len)
    };
    let mut frames = Vec::new();
    while !data.is_empty() {
        let body_len = le32(data, 8) as usize;
        let len = data.len().min(12usize.saturating_add(body_len));
        let (msg, rest) = data.split_at(len);
        data = rest;
        let body = msg.get(12..).unwrap_or(&[]);
        let mut fds = Vec::new();
        match le32(msg, 0) {
            SET_MEM_TABLE => {
                let regions = (le32(body, 0) as usize).min(8);
                for r in 0..regions {
                    let at = 8 + 32 * r;
                    fds.extend(shared(le64(body, at + 8), le64(body, at + 24)));
                }
            }
            ADD_MEM_REG => fds.extend(shared(le64(body, 16), le64(body, 32))),
            SET_LOG_BASE => fds.extend(shared(le64(body, 0), le64(body, 8))),
            SET_VRING_KICK..=SET_VRING_ERR if le64(body, 0) & 0x100 == 0 => fds.extend(eventfd()),
            SET_LOG_FD => fds.extend(eventfd()),
            SET_BACKEND_REQ_FD => {
                // The other end is dropped: the backend's requests on it fail.
                if let Ok((ours, _)) = std::os::unix::net::UnixStream::pair() {
                    fds.push(OwnedFd::from(ours));
                }
            }
            _ => {}
        }
        frames.push((msg.to_vec(), fds));
    }
    frames
}

/// The backend's side of [`vhost_user_messages`]: the vmm's frontend of a one-queue block
/// device reads `data` as the backend's replies, through the exchanges a device goes
/// through; if they give it a backend channel, the vmm's end of that channel reads
/// `requests` (the backend's requests: configuration changes and the like) meanwhile.
fn vhost_frontend_reads(data: &[u8], requests: &[u8]) {
    use std::os::unix::net::UnixStream;
    use std::sync::OnceLock;

    // Guest RAM (a memfd, as the frontend shares it): only its layout matters here.
    static RAM: OnceLock<Option<vmm::memory::MemoryManager>> = OnceLock::new();
    let Some(ram) = RAM.get_or_init(|| vmm::memory::MemoryManager::new(2 << 20).ok()) else {
        return;
    };
    let Ok((ours, mut peer)) = UnixStream::pair() else {
        return;
    };
    // 32 KiB at most: one write that the socket's buffer takes whole.
    if peer.write_all(data).is_err() {
        return;
    }
    let _ = peer.shutdown(std::net::Shutdown::Write);
    // Once connected: the end of the backend channel the frontend sent (with
    // SET_BACKEND_REQ_FD) gets the requests.
    let mut channel = || {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        if requests.is_empty() || peer.set_nonblocking(true).is_err() {
            return;
        }
        let mut buf = vec![0u8; 4096];
        loop {
            let mut fds = [-1; 4];
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: the iovec is `buf`, which lives through the call.
            let Ok((n, nfds)) = (unsafe { peer.recv_with_fds(&mut iov, &mut fds) }) else {
                return;
            };
            // SAFETY: fds received with the message: ours alone.
            let mut fds = fds[..nfds]
                .iter()
                .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) });
            if let Some(fd) = fds.next() {
                let mut end = UnixStream::from(fd);
                // Small: the socket's buffer takes it whole.
                let _ = end.write_all(&requests[..requests.len().min(16 * 1024)]);
                let _ = end.shutdown(std::net::Shutdown::Write);
                return;
            }
            if n == 0 {
                return;
            }
        }
    };
    vhost_frontend_exchanges(ours, ram.guest_memory(), &mut channel);
}

/// What the frontend side of [`vhost_user_messages`] does on `stream` (a connection to a
/// block device's backend), with guest RAM `memory`: connect, write and read the
/// configuration, start a queue, stop it for a migration and start it again, start dirty
/// logging, reset; `connected` runs once it has connected. Errors end it. Public for the
/// seeds, which record a real backend's replies to it.
pub fn vhost_frontend_exchanges(
    stream: std::os::unix::net::UnixStream,
    memory: &vmm::memory::GuestMemoryMmap,
    connected: &mut dyn FnMut(),
) {
    use std::sync::Arc;
    use vmm::virtio::vhost_user::{LogShare, VhostUserDevice};
    use vmm::virtio::{Activation, QueueSetup, VirtioBackend};
    use vmm_sys_util::eventfd::EventFd;

    let Ok(mut dev) = VhostUserDevice::connect("fuzz", 2, stream, 1, 128, 60, memory.clone())
    else {
        return;
    };
    connected();
    dev.write_config(20, &[1]);
    let _ = dev.refresh_config();
    let (Ok(kick), Ok(call)) = (
        EventFd::new(libc::EFD_NONBLOCK),
        EventFd::new(libc::EFD_NONBLOCK),
    ) else {
        return;
    };
    let activation = Activation {
        features: vmm::virtio::VIRTIO_F_VERSION_1,
        queues: vec![QueueSetup {
            index: 0,
            size: 128,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            kick,
            call,
        }],
        memory,
        resume: false,
    };
    if dev.activate(activation).is_err() {
        return;
    }
    let _ = dev.save_state();
    dev.resume_after_save();
    if let Some(log) = memfd_of_len(4096) {
        let _ = dev.set_logging(Some(LogShare {
            fd: Arc::new(log),
            size: 4096,
        }));
    }
    dev.reset();
}

/// A chain as the fuzz input describes it, its buffers placed in guest memory: 3 bytes
/// per buffer, the length (le16) and flags (bit 0: device-writable; bit 1: at an address
/// outside RAM; bit 2: the next `length` input bytes are its contents; bit 3: the last
/// buffer of the chain), 8 buffers at most. Buffers go one after the other from `*next`
/// (wrapping back to `area` before `end`). The buffers, as [`Ring::put_chain`] takes them.
fn chain_from<M>(
    input: &mut &[u8],
    mem: &M,
    next: &mut u64,
    area: u64,
    end: u64,
) -> Vec<(u64, u64, bool)>
where
    M: vm_memory::Bytes<vm_memory::GuestAddress>,
{
    let mut bufs = Vec::new();
    while bufs.len() < 8 && input.len() >= 3 {
        let len = u64::from(u16::from_le_bytes([input[0], input[1]]));
        let flags = input[2];
        *input = &input[3..];
        if *next + len > end {
            *next = area;
        }
        let addr = if flags & 2 != 0 { end + 0x1000 } else { *next };
        if flags & 4 != 0 {
            let n = input.len().min(len as usize);
            let _ = mem.write_slice(&input[..n], vm_memory::GuestAddress(addr));
            *input = &input[n..];
        }
        *next = (*next + len).next_multiple_of(8);
        bufs.push((addr, len, flags & 1 != 0));
        if flags & 8 != 0 {
            break;
        }
    }
    bufs
}

/// An eventfd for a queue's notifications.
fn queue_eventfd() -> Option<vmm_sys_util::eventfd::EventFd> {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).ok()
}

/// The balloon's queues as a guest drives them: `virtio-balloon` (in the vmm) over 2 MiB
/// of guest RAM. The first byte: deflate-on-oom (bit 0) and free page reporting (bit 1)
/// offered; the driver takes the stats queue (bit 2), reporting (bit 3) and EVENT_IDX
/// (bit 4). Then records: a byte (bits 0-1: the queue, in the driver's numbering; bit 2:
/// the device's stats timer fires after; bit 3: the driver writes `actual`, the next four
/// bytes; bit 4: management sets a target, the next four bytes in KiB) and a chain (see
/// [`chain_from`]), put on that queue and notified. Then the queries, a snapshot and its
/// restore, and a reset.
pub fn virtio_balloon(data: &[u8]) {
    use std::sync::{Arc, Mutex, OnceLock};
    use vmm::virtio::balloon::VirtioBalloon;
    use vmm::virtio::{Activation, QueueSetup, VirtioBackend};

    const RAM: u64 = 2 << 20;
    const DATA: u64 = 0x8000;
    const RING_SIZE: u16 = 16;
    // The accelerator only hears of released ranges: one without a test or vCPUs.
    static ACCEL: OnceLock<Option<Arc<dyn vmm::accel::Accelerator>>> = OnceLock::new();
    let Some(accel) = ACCEL.get_or_init(|| {
        let ram = vmm::memory::MemoryManager::new(RAM).ok()?;
        let accel = vmm::accel::qtest::QtestAccel::new(&ram, None).ok()?;
        Some(Arc::new(accel) as Arc<dyn vmm::accel::Accelerator>)
    }) else {
        return;
    };
    let Some((&setup, mut input)) = data.split_first() else {
        return;
    };
    // The memfd-backed RAM the vmm has: inflated pages are punched out of it.
    let Ok(ram) = vmm::memory::MemoryManager::new(RAM) else {
        return;
    };
    let memory = ram.guest_memory().clone();
    let events = Arc::new(Mutex::new(qmp::server::EventSender::default()));
    let mut balloon = VirtioBalloon::new(
        memory.clone(),
        accel.clone(),
        setup & 1 != 0,
        setup & 2 != 0,
        events,
    );
    let mut features = vmm::virtio::VIRTIO_F_VERSION_1;
    for (bit, feature) in [(2, 1), (3, 5), (4, 29)] {
        if setup & (1 << bit) != 0 {
            features |= 1 << feature;
        }
    }
    let rings: Vec<Ring> = (0..4).map(|i| Ring::new(i * 0x1000, RING_SIZE)).collect();
    let mut queues = Vec::new();
    for (index, ring) in rings.iter().enumerate() {
        let (Some(kick), Some(call)) = (queue_eventfd(), queue_eventfd()) else {
            return;
        };
        queues.push(QueueSetup {
            index,
            size: ring.size,
            desc: ring.desc,
            avail: ring.avail,
            used: ring.used,
            kick,
            call,
        });
    }
    let activation = Activation {
        features,
        queues,
        memory: &memory,
        resume: false,
    };
    if balloon.activate(activation).is_err() {
        return;
    }
    let mut next = DATA;
    while let Some((&head, rest)) = input.split_first() {
        input = rest;
        let mut word = || {
            let (w, rest) = input.split_at(input.len().min(4));
            input = rest;
            let mut b = [0u8; 4];
            b[..w.len()].copy_from_slice(w);
            u32::from_le_bytes(b)
        };
        if head & 8 != 0 {
            balloon.write_config(4, &word().to_le_bytes());
        }
        if head & 16 != 0 {
            balloon.set_target(u64::from(word()) << 10);
        }
        let queue = usize::from(head & 3);
        let bufs = chain_from(&mut input, &memory, &mut next, DATA, RAM);
        rings[queue].put_chain(&memory, &bufs, None);
        balloon.queue_notify(queue);
        if head & 4 != 0 {
            balloon.request_stats();
        }
        let mut config = [0u8; 8];
        balloon.read_config(0, &mut config);
    }
    let _ = balloon.query(true);
    let _ = balloon.guest_stats();
    let _ = balloon.actual();
    if let Ok(state) = balloon.save_state() {
        let _ = balloon.restore_state(&state);
    }
    balloon.reset();
}

/// A guest's virtio-net traffic, both halves: the control queue that the vmm serves
/// (`VirtioNet`: RX modes, MAC tables, VLANs, queue pairs, announcements) and the data
/// queues that vmm-net serves (`NetBackend`), with the filter the control queue set
/// between them. The first byte: the NIC's queue pairs (bits 0-1, plus one), whether the
/// port carries the virtio-net header (bit 2), offloads (bit 3), MRG_RXBUF (bit 4) and
/// EVENT_IDX (bit 5) taken by the driver. Then records: a byte (bits 0-1: the control
/// queue, the RX ring, the TX ring, or a frame from the host: a length byte and that many
/// bytes; bit 2: the link goes down, bit 3: up) and, but for a frame, a chain (see
/// [`chain_from`]), put on that queue and notified.
pub fn virtio_net_chain(data: &[u8]) {
    use device_procs::net::backend::NetBackend;
    use device_procs::vhost_daemon::GuestMem;
    use std::sync::{Arc, Mutex};
    use vhost_user_backend::VhostUserBackend;
    use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
    use vmm::virtio::net::{FilterSink, VirtioNet};
    use vmm::virtio::{Activation, QueueSetup, VirtioBackend};
    use vmm_sys_util::epoll::EventSet;

    const RAM: u64 = 1 << 20;
    const DATA: u64 = 0x8000;
    const RING_SIZE: u16 = 64;
    let Some((&setup, mut input)) = data.split_first() else {
        return;
    };
    let pairs = u16::from(setup & 3) + 1;
    let port = Arc::new(FuzzPort {
        vnet_hdr: setup & 4 != 0,
        frames: Mutex::default(),
        rx_fd: eventfd(),
    });
    let Ok(backend) = NetBackend::new(
        vec![port.clone() as Arc<dyn device_procs::net::port::Port>],
        RING_SIZE,
        setup & 8 != 0,
        setup & 8 != 0,
    ) else {
        return;
    };
    let backend = Arc::new(backend);
    // The vmm's NIC (its control queue) and vmm-net's data queues share guest memory.
    let Ok(vmm_mem) = vmm::memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)])
    else {
        return;
    };
    let filter_to = backend.clone();
    let sink = FilterSink {
        events: Arc::new(Mutex::new(qmp::server::EventSender::default())),
        name: Some("nic0".into()),
        path: "/machine/peripheral/nic0/virtio-backend".into(),
        backend: Some(Box::new(move |f| filter_to.set_filter(f))),
    };
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let mut nic = VirtioNet::new("nic0", None, mac, pairs, true, sink, vmm_mem.clone());
    // Control queue features: CTRL_VQ 17, CTRL_RX 18, CTRL_VLAN 19, GUEST_ANNOUNCE 21,
    // MQ 22, CTRL_MAC_ADDR 23.
    let mut features = vmm::virtio::VIRTIO_F_VERSION_1
        | [17u64, 18, 19, 21, 22, 23]
            .iter()
            .fold(0, |f, b| f | 1 << b);
    if setup & 0x10 != 0 {
        features |= 1 << 15;
    }
    if setup & 8 != 0 {
        features |= [0u64, 1, 7, 8, 9, 11, 12, 13]
            .iter()
            .fold(0, |f, b| f | 1 << b);
    }
    if setup & 0x20 != 0 {
        features |= 1 << 29;
    }
    let ctrl_ring = Ring::new(0x3000, RING_SIZE);
    let ctrl_index = 2 * usize::from(pairs);
    let (Some(kick), Some(call)) = (queue_eventfd(), queue_eventfd()) else {
        return;
    };
    let activation = Activation {
        features,
        queues: vec![QueueSetup {
            index: ctrl_index,
            size: RING_SIZE,
            desc: ctrl_ring.desc,
            avail: ctrl_ring.avail,
            used: ctrl_ring.used,
            kick,
            call,
        }],
        memory: &vmm_mem,
        resume: false,
    };
    if nic.activate(activation).is_err() {
        return;
    }
    // vmm-net maps the same guest RAM as the frontend shares it.
    let Ok(mem) = GuestMem::from_ranges(&[(GuestAddress(0), RAM as usize)]) else {
        return;
    };
    let atomic = GuestMemoryAtomic::new(mem);
    backend.acked_features(features);
    backend.set_event_idx(setup & 0x20 != 0);
    let _ = backend.update_memory(atomic.clone());
    let Some(vrings) = ready_vrings(&atomic, 2, RING_SIZE, setup & 0x20 != 0) else {
        return;
    };
    let all: Vec<_> = vrings.iter().map(|(v, _)| v.clone()).collect();
    let guard = atomic.memory();
    let net_mem = &*guard;
    let mut next = DATA;
    while let Some((&head, rest)) = input.split_first() {
        input = rest;
        if head & 4 != 0 {
            backend.set_link(false);
            nic.set_link(false);
        }
        if head & 8 != 0 {
            backend.set_link(true);
            nic.set_link(true);
        }
        match head & 3 {
            0 => {
                let bufs = chain_from(&mut input, &vmm_mem, &mut next, DATA, RAM);
                ctrl_ring.put_chain(&vmm_mem, &bufs, None);
                nic.queue_notify(ctrl_index);
            }
            3 => {
                let len = input.first().map_or(0, |n| usize::from(*n) * 8);
                let frame = input.get(1..).unwrap_or(&[]);
                let frame = &frame[..frame.len().min(len)];
                port.frames
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_back(frame.to_vec());
                input = &input[(1 + frame.len()).min(input.len())..];
                let _ = backend.handle_event(0, EventSet::IN, &all, 0);
            }
            ring => {
                let ring = usize::from(ring - 1);
                let bufs = chain_from(&mut input, net_mem, &mut next, DATA, RAM);
                vrings[ring].1.put_chain(net_mem, &bufs, None);
                let _ = backend.handle_event(ring as u16, EventSet::IN, &all, 0);
            }
        }
    }
    let _ = nic.query_rx_filter("nic0");
    let _ = backend.info();
    for queue in 0..2 {
        let _ = backend.stop_vring(queue);
    }
    if let Ok(state) = nic.save_state() {
        let _ = nic.restore_state(&state);
    }
    nic.reset();
}

/// A network port for [`virtio_net_chain`]: frames from the host are the fuzz input's,
/// frames to the host are taken and dropped.
struct FuzzPort {
    vnet_hdr: bool,
    frames: std::sync::Mutex<std::collections::VecDeque<Vec<u8>>>,
    rx_fd: Option<OwnedFd>,
}

impl device_procs::net::port::Port for FuzzPort {
    fn rx_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.rx_fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    fn recv(&self, iovs: &[libc::iovec]) -> std::io::Result<Option<usize>> {
        let Some(frame) = self
            .frames
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
        else {
            return Ok(None);
        };
        // Scattered into the iovecs as readv would, cut to their room.
        let mut done = 0;
        for iov in iovs {
            let n = iov.iov_len.min(frame.len() - done);
            // SAFETY: the caller's iovecs are writable buffers of `iov_len` bytes (guest
            // memory it mapped, or its own), live for this call; `n` is within both.
            unsafe {
                std::ptr::copy_nonoverlapping(frame[done..].as_ptr(), iov.iov_base.cast(), n)
            };
            done += n;
            if done == frame.len() {
                break;
            }
        }
        Ok(Some(done))
    }

    fn send(&self, iovs: &[libc::iovec]) -> std::io::Result<Option<usize>> {
        Ok(Some(iovs.iter().map(|i| i.iov_len).sum()))
    }
}

/// A guest's virtio-input queues: the vmm's configuration space (select and subselect
/// written, the answer read) and vmm-display's event and status queues. The first byte:
/// the device kind (bits 0-1: tablet, keyboard, mouse) and EVENT_IDX (bit 2). Then
/// records: a byte (bits 0-1: a configuration write of the next two bytes, read back; an
/// event buffer chain; a status chain; events from the VNC client, the next byte's
/// number of 8-byte events) and, for a queue, a chain (see [`chain_from`]).
pub fn virtio_input(data: &[u8]) {
    use device_procs::display::input::{InputBackend, InputEvent};
    use device_procs::vhost_daemon::GuestMem;
    use ipc::display::InputKind;
    use vhost_user_backend::VhostUserBackend;
    use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
    use vmm::virtio::VirtioBackend;
    use vmm_sys_util::epoll::EventSet;

    const RAM: u64 = 1 << 20;
    const DATA: u64 = 0x8000;
    const RING_SIZE: u16 = 64;
    const INJECT: u16 = 3;
    let Some((&setup, mut input)) = data.split_first() else {
        return;
    };
    let kind = match setup & 3 {
        0 => InputKind::Tablet,
        1 => InputKind::Keyboard,
        _ => InputKind::Mouse,
    };
    let mut config = vmm::virtio::input::VirtioInput::new(kind);
    let Ok(backend) = InputBackend::new(kind) else {
        return;
    };
    let event_idx = setup & 4 != 0;
    let Ok(mem) = GuestMem::from_ranges(&[(GuestAddress(0), RAM as usize)]) else {
        return;
    };
    let atomic = GuestMemoryAtomic::new(mem);
    backend.set_event_idx(event_idx);
    let _ = backend.update_memory(atomic.clone());
    let Some(vrings) = ready_vrings(&atomic, 2, RING_SIZE, event_idx) else {
        return;
    };
    let all: Vec<_> = vrings.iter().map(|(v, _)| v.clone()).collect();
    let guard = atomic.memory();
    let mem = &*guard;
    let mut next = DATA;
    while let Some((&head, rest)) = input.split_first() {
        input = rest;
        match head & 3 {
            0 => {
                let (w, rest) = input.split_at(input.len().min(2));
                input = rest;
                config.write_config(u64::from(head >> 2 & 1), w);
                let mut answer = [0u8; 136];
                config.read_config(0, &mut answer);
            }
            3 => {
                let n = input.first().map_or(0, |n| usize::from(*n));
                let bytes = input.get(1..).unwrap_or(&[]);
                let bytes = &bytes[..bytes.len().min(8 * n)];
                let events: Vec<InputEvent> = bytes
                    .chunks_exact(8)
                    .map(|e| {
                        InputEvent::new(
                            u16::from_le_bytes([e[0], e[1]]),
                            u16::from_le_bytes([e[2], e[3]]),
                            u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                        )
                    })
                    .collect();
                input = &input[(1 + bytes.len()).min(input.len())..];
                backend.push(&events);
                let _ = backend.handle_event(INJECT, EventSet::IN, &all, 0);
            }
            queue => {
                let queue = usize::from(queue - 1);
                let bufs = chain_from(&mut input, mem, &mut next, DATA, RAM);
                vrings[queue].1.put_chain(mem, &bufs, None);
                let _ = backend.handle_event(queue as u16, EventSet::IN, &all, 0);
            }
        }
    }
    let _ = backend.leds();
    config.reset();
}

/// A VNC client's bytes, as vmm-display's RFB server reads them: the handshake
/// (ProtocolVersion, security, ClientInit) and then its messages (SetPixelFormat,
/// SetEncodings, FramebufferUpdateRequest, KeyEvent, PointerEvent, ClientCutText, QEMU's
/// extended key event), while the server sends updates of a 64x48 screen in the encodings
/// the client chose. The first byte: password authentication (bit 0: the client cannot
/// know the challenge's answer), and the guest's virtio-input tablet, keyboard and mouse
/// (bits 1-3) that input goes to (else to the PS/2 devices through the vmm).
pub fn rfb_client(data: &[u8]) {
    use device_procs::display::input::{InputBackend, Inputs};
    use device_procs::display::screen::Framebuffer;
    use device_procs::display::vnc::VncServer;
    use device_procs::display::Display;
    use device_procs::shared_map::SharedMapping;
    use device_procs::vhost_daemon::GuestMem;
    use ipc::display::{
        DisplayEvent, Expiry, InputKind, Mode, PixelFormat, Scanout, VncAuth, VncConfig,
        SCANOUT_PAGE_SIZE,
    };
    use std::os::unix::net::UnixStream;
    use std::sync::{mpsc, Arc, Mutex, OnceLock};
    use vhost_user_backend::VhostUserBackend;

    const WIDTH: u32 = 64;
    const HEIGHT: u32 = 48;
    // The guest's screen: a 64x48 mode with a pattern, shared by every input (the shadow
    // copy takes it in once).
    static DISPLAY: OnceLock<Option<Arc<Display>>> = OnceLock::new();
    let Some(display) = DISPLAY.get_or_init(|| {
        let vram_len = u64::from(WIDTH * HEIGHT * 4);
        let (vram, page) = (
            memfd_of_len(vram_len)?,
            memfd_of_len(SCANOUT_PAGE_SIZE as u64)?,
        );
        let vram_map = SharedMapping::new(&vram, vram_len as usize, true).ok()?;
        let page_map = SharedMapping::new(&page, SCANOUT_PAGE_SIZE, true).ok()?;
        for i in 0..(WIDTH * HEIGHT) as usize {
            let pixel = ((i * 7) as u32 & 0xff) << 16 | ((i / 64) as u32 & 0xff) << 8 | 0x40;
            // SAFETY: pixel i of a mapping of WIDTH * HEIGHT pixels, alive here.
            unsafe {
                vram_map
                    .as_ptr()
                    .cast::<u32>()
                    .add(i)
                    .write_unaligned(pixel)
            };
        }
        // SAFETY: the page stays mapped while the view is used (here only).
        let scanout = unsafe { Scanout::new(page_map.as_ptr()) };
        scanout.publish(Some(Mode {
            width: WIDTH,
            height: HEIGHT,
            stride: WIDTH * 4,
            format: PixelFormat::Xrgb8888,
            offset: 0,
        }));
        let framebuffer = Framebuffer::map(&page, Some((&vram, vram_len))).ok()?;
        let display = Arc::new(Display::new(framebuffer));
        display.refresh();
        Some(display)
    }) else {
        return;
    };
    let Some((&setup, stream)) = data.split_first() else {
        return;
    };
    let inputs = Arc::new(Inputs::default());
    for (bit, kind) in [
        (2, InputKind::Tablet),
        (4, InputKind::Keyboard),
        (8, InputKind::Mouse),
    ] {
        if setup & bit == 0 {
            continue;
        }
        let Ok(device) = InputBackend::new(kind) else {
            return;
        };
        // The driver set it up: input goes to it.
        let _ = device.update_memory(vm_memory::GuestMemoryAtomic::new(GuestMem::new()));
        inputs.add(Arc::new(device));
    }
    let password = setup & 1 != 0;
    let config = VncConfig {
        auth: if password {
            VncAuth::Password
        } else {
            VncAuth::None
        },
        host: String::new(),
        service: String::new(),
        family: "unix".into(),
        name: "fuzz".into(),
        password: password.then(|| "secret".into()),
        expiry: Expiry::Never,
    };
    let (done, finished) = mpsc::channel();
    let done = Mutex::new(done);
    let events = Arc::new(move |event: DisplayEvent| {
        if matches!(event, DisplayEvent::Disconnected(_)) {
            let _ = done.lock().unwrap_or_else(|e| e.into_inner()).send(());
        }
    });
    let server = VncServer::new(display.clone(), inputs, &config, events);
    let Ok((ours, mut peer)) = UnixStream::pair() else {
        return;
    };
    // 32 KiB at most: one write the socket's buffer takes whole; the server's replies are
    // never read (updates past the buffer fail once the client is dropped).
    if peer
        .write_all(&stream[..stream.len().min(32 * 1024)])
        .is_err()
    {
        return;
    }
    let _ = peer.shutdown(std::net::Shutdown::Write);
    server.add_client(ours, false);
    let _ = finished.recv_timeout(std::time::Duration::from_secs(5));
    server.disconnect_all();
}

/// A kernel image as `-kernel` names it: parsed (a bzImage entered at its 64-bit entry,
/// or with the first byte's bit 0 its payload decompressed on the host and loaded as the
/// ELF inside; or an ELF vmlinux), then loaded as a machine boots it into 64 MiB of guest
/// RAM: the segments, an initrd above them, the command line within the kernel's limit,
/// the zero page with the setup header.
pub fn kernel_loader(data: &[u8]) {
    use std::sync::OnceLock;
    use vm_memory::GuestAddress;
    use vmm::arch::boot::{build_boot_params, write_boot_params, write_cmdline, BootParamsConfig};
    use vmm::loader::{BootImage, Initrd};

    const RAM: u64 = 64 << 20;
    // Shared by every input: what was loaded before does not matter.
    static MEM: OnceLock<Option<vmm::memory::GuestMemoryMmap>> = OnceLock::new();
    let Some(mem) = MEM.get_or_init(|| {
        vmm::memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).ok()
    }) else {
        return;
    };
    let Some((&setup, image)) = data.split_first() else {
        return;
    };
    let Ok(kernel) = BootImage::parse_for_ram(image, setup & 1 != 0, RAM) else {
        return;
    };
    if kernel.load(mem, RAM).is_err() {
        return;
    }
    let initrd = Initrd::from_bytes(vec![0x1f; 4096])
        .load(mem, kernel.end, RAM, kernel.initrd_limit())
        .ok();
    let Ok(cmdline_len) = write_cmdline(mem, "console=ttyS0 root=/dev/vda", kernel.cmdline_limit())
    else {
        return;
    };
    let e820 = vmm::arch::boot::e820_map(&vmm::memory::ram_ranges(RAM));
    let config = BootParamsConfig {
        setup_header: kernel.setup_header,
        cmdline_addr: vmm::arch::layout::CMDLINE_START,
        cmdline_len,
        initrd,
        e820: &e820,
        rsdp_addr: None,
    };
    if let Ok(params) = build_boot_params(&config) {
        let _ = write_boot_params(mem, &params);
    }
}

/// `count` queues of `size` entries, 4 KiB apart from guest address 0, set up, ready and
/// enabled as a driver leaves them at DRIVER_OK: each backend vring with its [`Ring`].
fn ready_vrings<M>(
    atomic: &M,
    count: u64,
    size: u16,
    event_idx: bool,
) -> Option<Vec<(vhost_user_backend::VringRwLock<M>, Ring)>>
where
    M: vm_memory::GuestAddressSpace + Clone + 'static,
{
    use vhost_user_backend::{VringRwLock, VringT};
    let mut vrings = Vec::new();
    for i in 0..count {
        let vring = VringRwLock::new(atomic.clone(), size).ok()?;
        let ring = Ring::new(i * 0x1000, size);
        vring.set_queue_size(size);
        vring
            .set_queue_info(ring.desc, ring.avail, ring.used)
            .ok()?;
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vrings.push((vring, ring));
    }
    Some(vrings)
}

/// A split virtqueue of `size` entries from guest address `desc`: the descriptor table,
/// the available ring, then the used ring, as a driver lays them out. Fuzz targets put
/// their chains on it; each chain starts again at descriptor 0 (the device is done with
/// the last one by then).
#[derive(Debug, Clone, Copy)]
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl Ring {
    fn new(desc: u64, size: u16) -> Ring {
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        Ring {
            size,
            desc,
            avail,
            used,
        }
    }

    /// Buffers `(address, length, device-writable)` as a chain from descriptor 0 (or, with
    /// `indirect`, in a table there that descriptor 0 points at), made available.
    fn put_chain<M>(&self, mem: &M, bufs: &[(u64, u64, bool)], indirect: Option<u64>)
    where
        M: vm_memory::Bytes<vm_memory::GuestAddress>,
    {
        use vm_memory::GuestAddress;
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        const INDIRECT: u16 = 4;
        let table = indirect.unwrap_or(self.desc);
        let n = bufs.len().min(usize::from(self.size));
        for (i, &(addr, len, writable)) in bufs[..n].iter().enumerate() {
            let mut flags = if writable { WRITE } else { 0 };
            if i + 1 < n {
                flags |= NEXT;
            }
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&(len as u32).to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            let _ = mem.write_slice(&d, GuestAddress(table + 16 * i as u64));
        }
        if let Some(table) = indirect {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&table.to_le_bytes());
            d[8..12].copy_from_slice(&(16 * n as u32).to_le_bytes());
            d[12..14].copy_from_slice(&INDIRECT.to_le_bytes());
            let _ = mem.write_slice(&d, GuestAddress(self.desc));
        }
        self.push(mem, 0);
    }

    /// Make the chain at `head` available: the next entry of the available ring.
    fn push<M>(&self, mem: &M, head: u16)
    where
        M: vm_memory::Bytes<vm_memory::GuestAddress>,
    {
        use vm_memory::GuestAddress;
        let idx = mem
            .read_obj::<u16>(GuestAddress(self.avail + 2))
            .map_or(0, u16::from_le);
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        let _ = mem.write_obj(head.to_le(), GuestAddress(slot));
        let _ = mem.write_obj(idx.wrapping_add(1).to_le(), GuestAddress(self.avail + 2));
    }
}

/// A new eventfd.
fn eventfd() -> Option<OwnedFd> {
    // SAFETY: eventfd with valid flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    // SAFETY: a new fd that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
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
