//! One queue of a tap, as the vmm handed it over: the ioctls the data path needs
//! (virtio-net header size, offloads, attaching and detaching a queue of a multiqueue tap)
//! and frames moved with readv/writev straight between the tap and guest memory.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// `linux/if_tun.h`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

/// TUNSETOFFLOAD bits.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// The virtio-net header with VERSION_1 (struct virtio_net_hdr_v1): the tap writes and
/// reads the first 10 bytes and skips num_buffers.
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("fd {fd} is not a tap: TUNGETIFF: {source}")]
    NotATap {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} is a tun, not a tap")]
    Tun { fd: RawFd },
    #[error("could not configure /dev/net/tun ({name}): {source}")]
    Open {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// struct ifreq, as far as the tun ioctls use it.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// One queue of a tap.
pub struct Tap {
    fd: OwnedFd,
    name: String,
    flags: libc::c_short,
}

impl Tap {
    /// Open the tap `name` (created if missing), with the virtio-net header if `vnet_hdr`,
    /// as one queue of a multiqueue tap if `multi_queue`.
    pub fn open(name: &str, vnet_hdr: bool, multi_queue: bool) -> Result<Self, TapError> {
        let open_error = |source| TapError::Open {
            name: name.to_string(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(open_error)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        if vnet_hdr {
            req.flags |= IFF_VNET_HDR;
        }
        if multi_queue {
            req.flags |= IFF_MULTI_QUEUE;
        }
        let bytes = name.as_bytes();
        if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(open_error(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: TUNSETIFF reads (and updates) the struct ifreq we pass.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(open_error(io::Error::last_os_error()));
        }
        Tap::new(OwnedFd::from(file))
    }

    /// Take a tap fd: it must be a tap (TUNGETIFF), and is made non-blocking. With a
    /// virtio-net header its size is set to [`VNET_HDR_LEN`].
    pub fn new(fd: OwnedFd) -> Result<Self, TapError> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a struct ifreq into `req`, which is large enough.
        if unsafe { libc::ioctl(raw, TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::NotATap {
                fd: raw,
                source: io::Error::last_os_error(),
            });
        }
        if req.flags & IFF_TAP == 0 {
            return Err(TapError::Tun { fd: raw });
        }
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        let tap = Tap {
            fd,
            name,
            flags: req.flags,
        };
        // SAFETY: F_GETFL/F_SETFL on an fd we own.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(tap.error("O_NONBLOCK", io::Error::last_os_error()));
        }
        if tap.vnet_hdr() {
            let size = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int from the pointer.
            if unsafe { libc::ioctl(raw, TUNSETVNETHDRSZ, &size) } < 0 {
                return Err(tap.error("TUNSETVNETHDRSZ", io::Error::last_os_error()));
            }
        }
        Ok(tap)
    }

    fn error(&self, what: &'static str, source: io::Error) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            source,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opened with IFF_VNET_HDR: frames carry the virtio-net header.
    pub fn vnet_hdr(&self) -> bool {
        self.flags & IFF_VNET_HDR != 0
    }

    pub fn multi_queue(&self) -> bool {
        self.flags & IFF_MULTI_QUEUE != 0
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The offloads the guest can take (TUN_F_* bits): the host may then hand it
    /// unchecksummed and segmentation-offloaded frames.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes the flags as its argument.
        if unsafe { libc::ioctl(self.fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(self.error("TUNSETOFFLOAD", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Attach this queue to its multiqueue tap (the host steers flows to it) or detach it.
    pub fn set_attached(&self, attached: bool) -> Result<(), TapError> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: if attached {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads a struct ifreq from the pointer.
        if unsafe { libc::ioctl(self.fd(), TUNSETQUEUE, &mut req) } < 0 {
            return Err(self.error("TUNSETQUEUE", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// One frame from the host into `iovs`: its length, or None when there is none.
    pub fn read(&self, iovs: &[libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: the iovecs point into guest memory mapped for as long as the caller
        // holds the memory guard; readv writes within them only.
        let n = unsafe { libc::readv(self.fd(), iovs.as_ptr(), iovs.len() as libc::c_int) };
        result(n)
    }

    /// One frame to the host from `iovs`.
    pub fn write(&self, iovs: &[libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: as in `read`; writev only reads the buffers.
        let n = unsafe { libc::writev(self.fd(), iovs.as_ptr(), iovs.len() as libc::c_int) };
        result(n)
    }
}

/// A readv/writev result: EAGAIN is `None`.
fn result(n: isize) -> io::Result<Option<usize>> {
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The TUN_F_* offloads for the virtio-net features the driver accepted (QEMU's
/// tap_set_offload): checksums first, segmentation only with them.
pub fn offloads_for(features: u64) -> u32 {
    use virtio_bindings::virtio_net::*;
    let has = |bit: u32| features & (1u64 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    for (bit, flag) in [
        (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
        (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
        (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
        (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
    ] {
        if has(bit) {
            flags |= flag;
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net::*;

    #[test]
    fn offloads_follow_the_guest_features() {
        assert_eq!(
            offloads_for(1 << VIRTIO_NET_F_GUEST_TSO4),
            0,
            "no csum, no tso"
        );
        assert_eq!(offloads_for(1 << VIRTIO_NET_F_GUEST_CSUM), TUN_F_CSUM);
        let all = [
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
        ]
        .iter()
        .fold(0u64, |f, b| f | 1 << b);
        assert_eq!(
            offloads_for(all),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
        );
    }

    #[test]
    fn a_file_is_not_a_tap() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let err = Tap::new(OwnedFd::from(file)).err().unwrap();
        assert!(err.to_string().contains("is not a tap"), "{err}");
    }
}
