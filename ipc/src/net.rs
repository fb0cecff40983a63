//! The control protocol of `vmm-net`, the network device process (one per netdev).
//!
//! The data path is vhost-user-net on the process's second socket; this channel sets the
//! netdev up and carries what the vmm keeps itself: the link state (`set_link`), and the
//! RX filter the guest set through the control queue, which stays in the vmm as in QEMU
//! and Cloud Hypervisor. Every fd the process serves (taps, sockets) arrives with
//! [`NetRequest::Attach`]: it opens nothing.

use serde::{Deserialize, Serialize};

use crate::channel::Channel;

/// What the vmm asks of a net device process.
///
/// New variants go at the end: postcard numbers them in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetRequest {
    /// Set the netdev up. Sent once, first, with the backend's fds (see [`Backend`]);
    /// replied to with [`NetReply::Attached`], after which the vmm may connect to the
    /// vhost-user socket.
    Attach(NetConfig),
    /// The link is up or down (QMP set_link, or the netdev deleted under its NIC): while
    /// it is down, frames from the guest are dropped and none are delivered to it.
    SetLink { up: bool },
    /// The guest's RX filter (from the control queue): frames it did not ask for are not
    /// delivered. (The queue pairs the guest uses need no message: the vmm enables and
    /// disables their rings over vhost-user, and the tap queues of disabled ones are
    /// detached.)
    SetRxFilter(RxFilter),
    /// The counters ([`NetReply::Info`]).
    Query,
}

/// A netdev.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub id: String,
    pub backend: Backend,
    /// Queue pairs (taps give one fd per pair; other backends have one).
    pub queue_pairs: u16,
    /// Largest queue the vhost-user frontend may set up.
    pub queue_size: u16,
}

/// Where the frames go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backend {
    /// Taps, one fd per queue pair. `vnet_hdr`: opened with IFF_VNET_HDR, so the guest's
    /// virtio-net header (and with it the offloads) passes through.
    Tap { vnet_hdr: bool },
    /// QEMU's `user` network (libslirp), with QEMU's options as given (`net=`, `host=`,
    /// `hostfwd=`, `restrict=`, ...). No fds: the process keeps the host's network
    /// namespace and makes its own sockets.
    User { options: Vec<(String, String)> },
    /// A stream socket carrying frames with a 4-byte big-endian length before each (QEMU's
    /// `socket` and `stream`, passt): one fd, connected, or listening when `listening`
    /// (then the first peer to connect is served, and the next after it leaves).
    Stream { listening: bool },
    /// A datagram socket, connected to its peer: one frame per datagram (QEMU's
    /// `socket,udp=` and `dgram`). One fd.
    Dgram,
}

/// What the guest accepts, as the control queue set it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxFilter {
    pub promiscuous: bool,
    pub all_multicast: bool,
    pub all_unicast: bool,
    pub no_multicast: bool,
    pub no_unicast: bool,
    pub no_broadcast: bool,
    /// The device's own address.
    pub mac: [u8; 6],
    /// Extra unicast and multicast addresses.
    pub unicast: Vec<[u8; 6]>,
    pub multicast: Vec<[u8; 6]>,
    /// VLAN ids the guest accepts (none: VLAN filtering is off, all pass).
    pub vlans: Option<Vec<u16>>,
}

/// Replies to [`NetRequest`]s. Errors (a bad option, a missing fd, an fd that is not a
/// tap, a hostfwd that cannot bind) are [`crate::RemoteError`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetReply {
    /// Ready; `features` are the virtio-net feature bits the backend serves, and
    /// `description` what `info network` says of it (`net=10.0.2.0,restrict=off`).
    Attached {
        features: u64,
        description: String,
    },
    Done,
    Info(NetInfo),
}

/// A netdev's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInfo {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames dropped: too large for the guest's buffers, refused by its RX filter, or
    /// while the link is down.
    pub rx_dropped: u64,
    /// Frames dropped: link down, the host side refused them, or malformed chains.
    pub tx_dropped: u64,
}

/// What a net device process reports unasked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetEvent {
    /// A listening stream backend accepted `peer`; the connection's fd comes with this
    /// event, so that a restarted process goes on with it.
    StreamConnected { peer: String },
    /// The stream's peer went away (a listening backend waits for the next one).
    StreamDisconnected,
}

/// The vmm's end of the channel to a net device process.
pub type NetChannel = Channel<NetRequest, NetReply, NetEvent>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let config = NetConfig {
            id: "n0".into(),
            backend: Backend::User {
                options: vec![("hostfwd".into(), "tcp::5555-:22".into())],
            },
            queue_pairs: 1,
            queue_size: 256,
        };
        for request in [
            NetRequest::Attach(config),
            NetRequest::SetLink { up: false },
            NetRequest::SetRxFilter(RxFilter {
                multicast: vec![[1, 0, 0x5e, 0, 0, 1]],
                vlans: Some(vec![5]),
                ..RxFilter::default()
            }),
            NetRequest::Query,
        ] {
            let bytes = postcard::to_stdvec(&request).unwrap();
            let back: NetRequest = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back, request);
        }
    }
}
