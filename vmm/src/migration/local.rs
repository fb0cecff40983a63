//! Local migration (capability `x-local`, both sides on one host, over a unix socket): the
//! guest's memory and its host resources move as file descriptors instead of being copied.
//! Before the stream, the source sends an offer: this handoff's version and a list of what
//! it hands over (the guest RAM memfd, the framebuffer memfd, each disk's image, each
//! tap), the fds themselves going along by SCM_RIGHTS in ipc frames. The destination
//! checks the offer against itself, then the stream carries only the devices' state: no
//! page is copied, so the guest's downtime does not depend on how fast it writes memory.
//! This is how a vmm is replaced by a new binary under a running guest.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};

/// What starts a local offer on the socket (instead of the stream's magic).
pub const LOCAL_MAGIC: &[u8; 8] = b"VMM-LCL\n";
/// The handoff's version: a destination refuses any other.
pub const LOCAL_VERSION: u32 = 1;
/// Test hook: a destination with this variable set to a number claims that version, to
/// play a vmm of another version.
pub const TEST_HOOK_LOCAL_VERSION: &str = "VMM_TEST_LOCAL_VERSION";
/// Most resources one offer hands over.
const MAX_ITEMS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("local migration: {0}")]
    Io(#[from] std::io::Error),
    #[error("local migration: {0}")]
    Frame(#[from] ipc::frame::FrameError),
    #[error("local migration: a malformed offer: {0}")]
    Malformed(String),
    #[error("local migration version {got} is not this vmm's ({want})")]
    Version { got: u32, want: u32 },
}

/// One resource the source hands over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalItem {
    /// The guest RAM memfd.
    Ram,
    /// The display adapter's VRAM memfd.
    Vram,
    /// The top image of drive `drive`.
    Image { drive: String },
    /// Tap `queue` of netdev `netdev`.
    Tap { netdev: String, queue: u16 },
}

/// The offer's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Offer {
    version: u32,
    items: Vec<LocalItem>,
}

/// The resources a destination received, in the source's order.
pub type LocalFds = Vec<(LocalItem, OwnedFd)>;

/// The source's side: send the offer and its fds, before the stream.
pub fn send_offer(socket: &UnixStream, fds: &[(LocalItem, OwnedFd)]) -> Result<(), LocalError> {
    let offer = Offer {
        version: LOCAL_VERSION,
        items: fds.iter().map(|(item, _)| item.clone()).collect(),
    };
    let payload = postcard::to_stdvec(&offer).map_err(|e| LocalError::Malformed(e.to_string()))?;
    (&*socket).write_all(LOCAL_MAGIC)?;
    ipc::frame::send_frame(socket, &payload, &[])?;
    for group in fds.chunks(ipc::frame::MAX_FDS) {
        let borrowed: Vec<_> = group.iter().map(|(_, fd)| fd.as_fd()).collect();
        ipc::frame::send_frame(socket, b"fds", &borrowed)?;
    }
    Ok(())
}

/// Whether the source opens with a local offer (waits for its first bytes; reads none).
pub fn offered(socket: &UnixStream) -> Result<bool, LocalError> {
    let mut first = [0u8; 8];
    loop {
        // SAFETY: recv writes at most first.len() bytes into our buffer; MSG_PEEK leaves
        // them (and any fds) on the socket.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                first.as_mut_ptr().cast(),
                first.len(),
                libc::MSG_PEEK | libc::MSG_WAITALL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        return Ok(n as usize == first.len() && &first == LOCAL_MAGIC);
    }
}

/// The destination's side: take the offer and its fds, refusing another version (or the
/// one [`TEST_HOOK_LOCAL_VERSION`] names).
pub fn receive_offer(socket: &UnixStream) -> Result<LocalFds, LocalError> {
    let mut magic = [0u8; 8];
    (&*socket).read_exact(&mut magic)?;
    if &magic != LOCAL_MAGIC {
        return Err(LocalError::Malformed("no offer".into()));
    }
    let (payload, fds) = ipc::frame::recv_frame(socket)?;
    if !fds.is_empty() {
        return Err(LocalError::Malformed("fds with the offer itself".into()));
    }
    let offer: Offer =
        postcard::from_bytes(&payload).map_err(|e| LocalError::Malformed(e.to_string()))?;
    let ours = std::env::var(TEST_HOOK_LOCAL_VERSION)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LOCAL_VERSION);
    if offer.version != ours {
        return Err(LocalError::Version {
            got: offer.version,
            want: ours,
        });
    }
    if offer.items.len() > MAX_ITEMS {
        return Err(LocalError::Malformed(format!(
            "{} resources",
            offer.items.len()
        )));
    }
    let mut got: Vec<OwnedFd> = Vec::with_capacity(offer.items.len());
    while got.len() < offer.items.len() {
        let (payload, fds) = ipc::frame::recv_frame(socket)?;
        if payload != b"fds" || fds.is_empty() || got.len() + fds.len() > offer.items.len() {
            return Err(LocalError::Malformed("a frame of fds does not fit".into()));
        }
        got.extend(fds);
    }
    Ok(offer.items.into_iter().zip(got).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_carries_its_fds_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let items: Vec<(LocalItem, OwnedFd)> = (0..20)
            .map(|i| {
                let (x, _) = UnixStream::pair().unwrap();
                let item = if i == 0 {
                    LocalItem::Ram
                } else {
                    LocalItem::Tap {
                        netdev: format!("n{i}"),
                        queue: 0,
                    }
                };
                (item, OwnedFd::from(x))
            })
            .collect();
        send_offer(&a, &items).unwrap();
        assert!(offered(&b).unwrap());
        let got = receive_offer(&b).unwrap();
        assert_eq!(got.len(), 20);
        assert_eq!(got[0].0, LocalItem::Ram);
        assert_eq!(got[19].0, items[19].0);
        // A plain stream is no offer.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"VMM-MIG\n").unwrap();
        assert!(!offered(&b).unwrap());
    }
}
