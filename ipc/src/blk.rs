//! The control protocol of `vmm-blk`, the block device process.
//!
//! The data path is vhost-user-blk on the process's second socket; this channel only sets the
//! disk up and asks about it. The vmm opens (and locks) the image itself and hands the open
//! file over with [`BlkRequest::Attach`]: the device process never opens a path.

use serde::{Deserialize, Serialize};

use crate::channel::Channel;

/// What the vmm asks of a block device process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlkRequest {
    /// Serve the raw image passed as the one fd of this message. Sent once, before the vmm
    /// connects to the vhost-user socket; the reply says the disk is ready to be served.
    Attach(AttachConfig),
    /// Grow the disk to `size` bytes (rounded down to whole sectors) and tell the driver
    /// through a configuration change. Shrinking is refused.
    Resize { size: u64 },
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
}

/// Replies to [`BlkRequest`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlkReply {
    /// The image is being served; it holds `size` bytes.
    Attached { size: u64 },
    /// The disk now holds `size` bytes.
    Resized { size: u64 },
}

/// Unsolicited reports from a block device process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlkEvent {
    /// An I/O error the guest saw as VIRTIO_BLK_S_IOERR.
    IoError { write: bool, message: String },
}

/// The vmm's end of a block process's control socket.
pub type BlkChannel = Channel<BlkRequest, BlkReply, BlkEvent>;
