//! Where a queue pair's frames go: a [`Port`]. A tap queue and a datagram socket move
//! frames straight between guest memory and the kernel (readv/writev); a stream socket
//! and the user network have a thread of their own that fills and drains a
//! [`QueuedPort`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::tap::{self, Tap};

/// One end of a queue pair's frames.
pub trait Port: Send + Sync {
    /// Readable when frames from the host wait.
    fn rx_fd(&self) -> RawFd;
    /// After [`Port::send`] said it would block: the fd, and the events on it, that say
    /// it may go on (None: it never blocks, and such a frame is dropped).
    fn tx_wait(&self) -> Option<(RawFd, EventSet)> {
        None
    }
    /// The fd of [`Port::tx_wait`] fired.
    fn tx_woken(&self) {}
    /// Frames carry the virtio-net header (a tap with IFF_VNET_HDR); otherwise the device
    /// adds and strips it.
    fn vnet_hdr(&self) -> bool {
        false
    }
    /// The next frame from the host into `iovs`: its length, `None` when there is none.
    /// An error drops that frame (it did not fit, say). The iovecs point into guest
    /// memory, written behind vm-memory's back: the caller logs the bytes for a migration
    /// (`NetBackend::receive_one`).
    fn recv(&self, iovs: &[libc::iovec]) -> io::Result<Option<usize>>;
    /// One frame to the host: `None` when the port would block (the frame is not taken).
    fn send(&self, iovs: &[libc::iovec]) -> io::Result<Option<usize>>;
    /// The virtio-net features the driver accepted (taps set their offloads).
    fn set_features(&self, _features: u64) {}
    /// Attach (the host may send to this queue) or detach a multiqueue tap's queue.
    fn set_attached(&self, _attached: bool) {}
}

impl Port for Tap {
    fn rx_fd(&self) -> RawFd {
        self.fd()
    }

    fn vnet_hdr(&self) -> bool {
        Tap::vnet_hdr(self)
    }

    fn recv(&self, iovs: &[libc::iovec]) -> io::Result<Option<usize>> {
        self.read(iovs)
    }

    fn send(&self, iovs: &[libc::iovec]) -> io::Result<Option<usize>> {
        // A tap never blocks a writer: the host drops what it cannot queue.
        Ok(Some(self.write(iovs)?.unwrap_or(0)))
    }

    fn set_features(&self, features: u64) {
        if !Tap::vnet_hdr(self) {
            return;
        }
        if let Err(e) = self.set_offload(tap::offloads_for(features)) {
            tracing::warn!("{e}");
        }
    }

    fn set_attached(&self, attached: bool) {
        if !self.multi_queue() {
            return;
        }
        if let Err(e) = Tap::set_attached(self, attached) {
            tracing::warn!("{e}");
        }
    }
}

/// A datagram socket connected to its peer: a datagram is a frame.
pub struct DgramPort {
    socket: OwnedFd,
}

impl DgramPort {
    pub fn new(socket: OwnedFd) -> io::Result<Self> {
        set_nonblocking(socket.as_raw_fd())?;
        Ok(DgramPort { socket })
    }
}

impl Port for DgramPort {
    fn rx_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn recv(&self, iovs: &[libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: msghdr is plain data; all zeroes is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iovs.len();
        // SAFETY: the iovecs point into guest memory the caller keeps mapped; recvmsg
        // writes within them and into `msg`.
        let n = unsafe { libc::recvmsg(self.rx_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(io::Error::other(
                "a datagram larger than the guest's buffers",
            ));
        }
        Ok(Some(n as usize))
    }

    fn send(&self, iovs: &[libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: as in recv; sendmsg only reads the buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iovs.len();
        // SAFETY: see above.
        let n = unsafe { libc::sendmsg(self.rx_fd(), &msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            // A datagram the host cannot take now is lost, as on a wire.
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::ECONNREFUSED | libc::ENOBUFS) => Ok(Some(0)),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }
}

/// Frames queued between the device and a thread that talks to the host (the stream
/// socket's, or the user network's): bounded both ways.
pub struct QueuedPort {
    rx: Mutex<VecDeque<Vec<u8>>>,
    /// Readable while `rx` holds frames.
    rx_event: EventFd,
    tx: Mutex<VecDeque<Vec<u8>>>,
    /// Wakes the host-side thread: frames to send, or room again in `rx`.
    pub wake: EventFd,
    /// Readable once the host-side thread took frames from a full `tx`.
    tx_room: EventFd,
    limit: usize,
    /// Frames from the host dropped because the guest was not taking them.
    pub rx_overflow: AtomicU64,
}

impl QueuedPort {
    /// Up to `limit` frames each way.
    pub fn new(limit: usize) -> io::Result<Self> {
        Ok(QueuedPort {
            rx: Mutex::new(VecDeque::new()),
            rx_event: EventFd::new(libc::EFD_NONBLOCK)?,
            tx: Mutex::new(VecDeque::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            tx_room: EventFd::new(libc::EFD_NONBLOCK)?,
            limit,
            rx_overflow: AtomicU64::new(0),
        })
    }

    /// A frame from the host for the guest; dropped (and counted) when the guest is
    /// `limit` frames behind.
    pub fn push_rx(&self, frame: &[u8]) {
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        if rx.len() >= self.limit {
            self.rx_overflow.fetch_add(1, Ordering::Relaxed);
            return;
        }
        rx.push_back(frame.to_vec());
        let _ = self.rx_event.write(1);
    }

    /// Room for more frames for the guest (the host-side thread stops reading without).
    pub fn rx_has_room(&self) -> bool {
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).len() < self.limit
    }

    /// The frames the guest sent, oldest first.
    pub fn take_tx(&self) -> VecDeque<Vec<u8>> {
        let _ = self.wake.read();
        let frames = std::mem::take(&mut *self.tx.lock().unwrap_or_else(|e| e.into_inner()));
        if frames.len() >= self.limit {
            let _ = self.tx_room.write(1);
        }
        frames
    }

    /// A frame the host-side thread could not send yet goes back to the front.
    pub fn requeue_tx(&self, mut frames: VecDeque<Vec<u8>>) {
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        frames.append(&mut tx);
        *tx = frames;
    }
}

impl Port for QueuedPort {
    fn rx_fd(&self) -> RawFd {
        self.rx_event.as_raw_fd()
    }

    fn recv(&self, iovs: &[libc::iovec]) -> io::Result<Option<usize>> {
        let frame = {
            let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
            let frame = rx.pop_front();
            if rx.is_empty() {
                let _ = self.rx_event.read();
            }
            if rx.len() + 1 == self.limit {
                // The host-side thread may have stopped reading: there is room again.
                let _ = self.wake.write(1);
            }
            frame
        };
        let Some(frame) = frame else {
            return Ok(None);
        };
        let copied = copy_to_iovecs(&frame, iovs);
        if copied < frame.len() {
            return Err(io::Error::other(format!(
                "a {}-byte frame does not fit the guest's {copied}-byte buffers",
                frame.len()
            )));
        }
        Ok(Some(copied))
    }

    fn send(&self, iovs: &[libc::iovec]) -> io::Result<Option<usize>> {
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if tx.len() >= self.limit {
            return Ok(None);
        }
        let frame = copy_from_iovecs(iovs);
        let len = frame.len();
        tx.push_back(frame);
        let _ = self.wake.write(1);
        Ok(Some(len))
    }

    fn tx_wait(&self) -> Option<(RawFd, EventSet)> {
        Some((self.tx_room.as_raw_fd(), EventSet::IN))
    }

    fn tx_woken(&self) {
        let _ = self.tx_room.read();
    }
}

/// Copy `data` into the buffers `iovs`; how much fitted.
fn copy_to_iovecs(data: &[u8], iovs: &[libc::iovec]) -> usize {
    let mut done = 0;
    for iov in iovs {
        if done == data.len() {
            break;
        }
        let n = iov.iov_len.min(data.len() - done);
        // SAFETY: the iovec points into guest memory the caller keeps mapped, with room
        // for `iov_len` bytes; `data[done..done + n]` is in bounds.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr().add(done), iov.iov_base as *mut u8, n)
        };
        done += n;
    }
    done
}

/// The bytes of `iovs`, in order.
fn copy_from_iovecs(iovs: &[libc::iovec]) -> Vec<u8> {
    let mut out = Vec::with_capacity(iovs.iter().map(|i| i.iov_len).sum());
    for iov in iovs {
        // SAFETY: the iovec points into guest memory the caller keeps mapped, with
        // `iov_len` readable bytes.
        let bytes = unsafe { std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len) };
        out.extend_from_slice(bytes);
    }
    out
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd the caller owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }
    }

    #[test]
    fn queued_frames_cross_both_ways_and_overflow_is_counted() {
        let port = QueuedPort::new(2).unwrap();
        port.push_rx(b"one");
        port.push_rx(b"two");
        port.push_rx(b"three");
        assert_eq!(port.rx_overflow.load(Ordering::Relaxed), 1);
        let (mut a, mut b) = ([0u8; 2], [0u8; 8]);
        let n = port.recv(&[iov(&mut a), iov(&mut b)]).unwrap();
        assert_eq!(n, Some(3));
        assert_eq!((&a, &b[..1]), (b"on", &b"e"[..]));
        let mut small = [0u8; 2];
        assert!(port.recv(&[iov(&mut small)]).is_err(), "too big: dropped");
        assert_eq!(port.recv(&[iov(&mut b)]).unwrap(), None);

        let mut frame = *b"hello";
        assert_eq!(port.send(&[iov(&mut frame)]).unwrap(), Some(5));
        assert_eq!(port.send(&[iov(&mut frame)]).unwrap(), Some(5));
        assert_eq!(port.send(&[iov(&mut frame)]).unwrap(), None, "full");
        let sent = port.take_tx();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0], b"hello");
    }

    #[test]
    fn datagrams_are_frames() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let port = DgramPort::new(OwnedFd::from(a)).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(port.recv(&[iov(&mut buf)]).unwrap(), None);
        b.send(b"frame-1").unwrap();
        assert_eq!(port.recv(&[iov(&mut buf)]).unwrap(), Some(7));
        b.send(&[7u8; 32]).unwrap();
        assert!(port.recv(&[iov(&mut buf)]).is_err(), "truncated");
        let mut out = *b"abc";
        assert_eq!(port.send(&[iov(&mut out)]).unwrap(), Some(3));
        let mut got = [0u8; 8];
        assert_eq!(b.recv(&mut got).unwrap(), 3);
    }
}
