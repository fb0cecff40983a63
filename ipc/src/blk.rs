//! The control protocol of `vmm-blk`, the block device process.
//!
//! The data path is vhost-user-blk on the process's second socket; this channel only sets the
//! disk up and asks about it. The vmm opens (and locks) the image itself and hands the open
//! file over with [`BlkRequest::Attach`]: the device process never opens a path.

use serde::{Deserialize, Serialize};

use crate::channel::Channel;

/// What the vmm asks of a block device process.
///
/// New variants go at the end: postcard numbers them in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlkRequest {
    /// Serve the raw image passed as the one fd of this message. Sent once, before the vmm
    /// connects to the vhost-user socket; the reply says the disk is ready to be served.
    /// The same as [`BlkRequest::AttachChain`] with [`ImageChain::raw`].
    Attach(AttachConfig),
    /// Grow the disk to `size` bytes (rounded down to whole sectors) and tell the driver
    /// through a configuration change. Shrinking is refused.
    Resize { size: u64 },
    /// Serve an image of any format with its backing chain. The message carries
    /// `1 + chain.backing.len()` fds in chain order: the image itself (read-write unless
    /// `config.readonly`), then each backing image (read-only), the top's backing first.
    /// Replied to with [`BlkReply::Attached`]. Encrypted qcow2 images are refused.
    AttachChain {
        config: AttachConfig,
        chain: ImageChain,
    },
    /// The I/O statistics: [`BlkReply::Stats`].
    Stats,
    /// Live snapshot: the one fd of this message is a new, empty overlay (opened
    /// read-write) of the given format, whose backing file is the current top image. The
    /// device drains the requests in flight, flushes, puts the overlay on top of the
    /// current chain (which is only read from then on) and goes on; nothing written is lost.
    /// Replied to with [`BlkReply::SnapshotTaken`]; on an error the old chain is served on,
    /// unchanged. Only [`ImageFormat::Qcow2`] overlays exist.
    Snapshot { format: ImageFormat },
    /// The password of the encrypted images (qcow2 legacy AES: the key is the password's
    /// bytes, zero-padded or cut to 16, as QEMU's qcow2 does). A wrong key is not
    /// detectable in that format; QEMU accepts any.
    SetKey { password: String },
    /// Carry out again the requests held by an error policy of `Stop` (the VM continues).
    Resume,
    /// Block migration: mark every chunk of `chunk_size` bytes (a power of two, at least
    /// 512) that the guest changes from now on in a bitmap the vmm shares: the one fd of
    /// this message, a memfd of at least `ceil(chunks / 64) * 8` bytes (bit `c % 64` of
    /// little-endian word `c / 64` for chunk `c`), set atomically; the vmm takes bits by
    /// swapping words to zero. The bitmap outlives the process, so a restarted one is sent
    /// the same memfd and nothing marked is lost. `initial` chunks are marked at once (what
    /// the bulk pass sends). Replied to with [`BlkReply::Tracking`].
    TrackDirty {
        chunk_size: u64,
        initial: InitialChunks,
    },
    /// Stop tracking: [`BlkReply::Tracking`] with `size` 0.
    StopTracking,
    /// Block migration's source: read `count` chunks from chunk `first` into the buffer
    /// that is the one fd of this message (a memfd of at least `count * chunk_size`
    /// bytes), chunk `i` at `i * chunk_size`; the last chunk of the disk may be shorter.
    /// Replied to with [`BlkReply::ChunksRead`].
    ReadChunks {
        chunk_size: u64,
        first: u64,
        count: u32,
    },
    /// Block migration's destination: write `zero.len()` chunks from chunk `first`, out of
    /// the buffer laid out as for [`BlkRequest::ReadChunks`]; a chunk whose `zero` is set
    /// becomes zeroes (its bytes in the buffer are not read). Replied to with
    /// [`BlkReply::ChunksWritten`].
    WriteChunks {
        chunk_size: u64,
        first: u64,
        zero: Vec<bool>,
    },
}

/// Which chunks [`BlkRequest::TrackDirty`] marks before the guest writes any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InitialChunks {
    /// None (a test, or a pass that only follows the guest).
    None,
    /// Every chunk of the disk (`migrate blk:true`).
    All,
    /// The chunks the top image holds data or zeroes for, not its backing images
    /// (`migrate inc:true`): for qcow2 its allocated clusters, for raw what is not a hole.
    Top,
}

/// An image format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageFormat {
    #[default]
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name QEMU gives the format (`format=` of `-drive`, `-F` of qemu-img).
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// The format of the top image and its backing images, in chain order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageChain {
    pub format: ImageFormat,
    pub backing: Vec<BackingImage>,
}

impl ImageChain {
    /// A raw image (raw images have no backing file).
    pub fn raw() -> Self {
        ImageChain::default()
    }
}

/// One backing image of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingImage {
    pub format: ImageFormat,
    /// The backing file name as the image above records it (not resolved): logged, and
    /// checked against the header of the image above.
    pub filename: String,
}

/// QEMU's `BlockDeviceStats` counters (the QEMU 1.1 set, plus discards).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
    /// The offset after the greatest byte written (writes, write-zeroes and discards, as
    /// QEMU counts it).
    pub wr_highest_offset: u64,
    pub discard_operations: u64,
    pub discard_bytes: u64,
    pub discard_total_time_ns: u64,
}

/// What [`BlkRequest::Stats`] returns, shaped like QEMU's `BlockStats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    /// The guest's requests that completed successfully (write-zeroes count as writes,
    /// as in QEMU's virtio-blk), since the process started.
    pub stats: Counters,
    /// The I/O the format layer did on the top image's file (data and metadata; for raw,
    /// the guest's requests again). Restarts from zero when a snapshot puts a new file on
    /// top.
    pub parent: Option<Counters>,
}

/// How to serve an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachConfig {
    /// Refuse writes (VIRTIO_BLK_F_RO); the fd was opened read-only too.
    pub readonly: bool,
    /// The serial number that GET_ID returns (at most 20 bytes are used).
    pub serial: String,
    /// Number of request queues (VIRTIO_BLK_F_MQ when above 1).
    pub num_queues: u16,
    /// Size of each queue the backend accepts.
    pub queue_size: u16,
    /// What a failed guest read or write does (`-drive rerror=`/`werror=`).
    pub error_policy: ErrorPolicy,
}

/// QEMU's `rerror`/`werror` actions for a request the host could not carry out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorAction {
    /// The guest sees VIRTIO_BLK_S_IOERR (QEMU's default for reads).
    #[default]
    Report,
    /// The guest sees success; the error is only reported to the vmm.
    Ignore,
    /// The request is held (not completed) and the vmm stops the VM; after
    /// [`BlkRequest::Resume`] it is carried out again.
    Stop,
    /// `Stop` for ENOSPC, `Report` for anything else (QEMU's default for writes).
    Enospc,
}

/// The actions for reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorPolicy {
    pub read: ErrorAction,
    pub write: ErrorAction,
}

impl Default for ErrorPolicy {
    /// QEMU's defaults: `rerror=report`, `werror=enospc`.
    fn default() -> Self {
        ErrorPolicy {
            read: ErrorAction::Report,
            write: ErrorAction::Enospc,
        }
    }
}

/// Replies to [`BlkRequest`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlkReply {
    /// The image is being served; it holds `size` bytes. `encrypted`: an image (or a
    /// backing image) is encrypted and every request fails until [`BlkRequest::SetKey`].
    Attached { size: u64, encrypted: bool },
    /// The disk now holds `size` bytes.
    Resized { size: u64 },
    /// The answer to [`BlkRequest::Stats`].
    Stats(BlockStats),
    /// The overlay of a [`BlkRequest::Snapshot`] is the top image now.
    SnapshotTaken,
    /// [`BlkRequest::SetKey`] opened the encrypted images.
    KeySet,
    /// [`BlkRequest::Resume`]: the held requests were carried out again (`retried`).
    Resumed { retried: u32 },
    /// Tracking is on for a disk of `size` bytes with `marked` chunks marked at once, or
    /// off (`size` 0).
    Tracking { size: u64, marked: u64 },
    /// [`BlkRequest::ReadChunks`]: which of the chunks read were all zeroes.
    ChunksRead { zero: Vec<bool> },
    /// [`BlkRequest::WriteChunks`] is done.
    ChunksWritten,
}

/// Unsolicited reports from a block device process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlkEvent {
    /// An I/O error the guest saw as VIRTIO_BLK_S_IOERR.
    IoError { write: bool, message: String },
    /// A request failed and the error policy acted (QMP's BLOCK_IO_ERROR): `action` is
    /// what happened to it (never `Enospc`: that resolves to `Stop` or `Report`). With
    /// `Stop` the process holds the request, and every later failing one, until
    /// [`BlkRequest::Resume`].
    RequestFailed {
        write: bool,
        action: ErrorAction,
        nospace: bool,
        reason: String,
    },
}

/// The vmm's end of a block process's control socket.
pub type BlkChannel = Channel<BlkRequest, BlkReply, BlkEvent>;
