//! The control plane between the vmm and its device processes: length-framed,
//! postcard-encoded messages on unix sockets, with file descriptors passed alongside by
//! SCM_RIGHTS ([`frame`]), and a typed conversation on top ([`channel`]): a versioned
//! hello, requests with ids and replies, unsolicited events, and timeouts. Each device
//! kind brings its own request, reply and event types.

pub mod blk;
pub mod channel;
pub mod display;
pub mod frame;
pub mod net;
pub mod scsi;

pub use channel::{
    Channel, DeviceKind, Hello, IpcError, Message, RemoteError, ViolationHook, PROTOCOL_VERSION,
};
pub use frame::{FrameError, MAX_FDS, MAX_FRAME};
