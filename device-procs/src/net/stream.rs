//! The thread behind a stream socket: frames with a 4-byte big-endian length before each
//! (QEMU's `socket` and `stream` netdevs, and passt), in both directions between the
//! socket and a [`QueuedPort`]. A listening socket serves one peer at a time: when it
//! leaves, the next one is accepted.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use super::port::{set_nonblocking, QueuedPort};

/// The largest frame the stream carries (QEMU's NET_BUFSIZE is 4096 + 65536).
pub const MAX_FRAME: usize = 4096 + 65536;
/// Bytes waiting to be written before the device stops taking frames from the guest.
const WRITE_BACKLOG: usize = 1 << 20;

/// What the stream tells whoever watches it (the vmm, through the control channel).
pub enum StreamEvent<'a> {
    /// A listening socket accepted `peer`: `fd` is the connection.
    Connected {
        peer: String,
        fd: BorrowedFd<'a>,
    },
    Disconnected,
}

pub type StreamEvents = Box<dyn Fn(StreamEvent<'_>) + Send>;

/// The socket: listening for a peer, or connected to one.
pub struct StreamSocket {
    pub listener: Option<OwnedFd>,
    pub connection: Option<OwnedFd>,
}

/// Serve `socket` for `port` on a new thread.
pub fn spawn(port: Arc<QueuedPort>, socket: StreamSocket, events: StreamEvents) -> io::Result<()> {
    for fd in socket.listener.iter().chain(&socket.connection) {
        set_nonblocking(fd.as_raw_fd())?;
    }
    let mut stream = Stream {
        port,
        listener: socket.listener,
        connection: socket.connection,
        events,
        read_buf: Vec::new(),
        write_buf: VecDeque::new(),
    };
    std::thread::Builder::new()
        .name("stream".into())
        .spawn(move || stream.run())
        .map(drop)
}

struct Stream {
    port: Arc<QueuedPort>,
    listener: Option<OwnedFd>,
    connection: Option<OwnedFd>,
    events: StreamEvents,
    /// Bytes read but not yet a whole frame.
    read_buf: Vec<u8>,
    /// Length-prefixed frames not yet written.
    write_buf: VecDeque<u8>,
}

impl Stream {
    fn run(&mut self) {
        loop {
            let Some(conn) = self.connection.as_ref().map(|c| c.as_raw_fd()) else {
                self.wait_for_peer();
                continue;
            };
            self.take_frames();
            let reading = self.port.rx_has_room();
            let mut fds = [
                pollfd(conn, if reading { libc::POLLIN } else { 0 }),
                pollfd(self.port.wake.as_raw_fd(), libc::POLLIN),
            ];
            if !self.write_buf.is_empty() {
                fds[0].events |= libc::POLLOUT;
            }
            // Not reading because the guest is behind: look again a little later.
            let timeout = if reading { -1 } else { 10 };
            // SAFETY: two valid pollfds.
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) } < 0 {
                continue;
            }
            let revents = fds[0].revents;
            if revents & libc::POLLOUT != 0 && !self.flush() {
                self.disconnected();
                continue;
            }
            if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !self.fill() {
                self.disconnected();
            }
        }
    }

    /// Without a connection: accept the next peer, or (a connecting socket whose peer
    /// left) drop what the guest sends.
    fn wait_for_peer(&mut self) {
        let Some(listener) = self.listener.as_ref().map(|l| l.as_raw_fd()) else {
            let mut fds = [pollfd(self.port.wake.as_raw_fd(), libc::POLLIN)];
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
            drop(self.port.take_tx());
            return;
        };
        let mut fds = [
            pollfd(listener, libc::POLLIN),
            pollfd(self.port.wake.as_raw_fd(), libc::POLLIN),
        ];
        // SAFETY: two valid pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if fds[1].revents != 0 {
            // No peer: what the guest sends is lost, as on an unplugged cable.
            drop(self.port.take_tx());
        }
        if fds[0].revents == 0 {
            return;
        }
        match accept(listener) {
            Ok((fd, peer)) => {
                tracing::info!("stream: connection from {peer}");
                (self.events)(StreamEvent::Connected {
                    peer,
                    fd: fd.as_fd(),
                });
                self.connection = Some(fd);
            }
            Err(e) => {
                tracing::warn!("stream: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn disconnected(&mut self) {
        tracing::info!("stream: the peer went away");
        self.connection = None;
        self.read_buf.clear();
        self.write_buf.clear();
        (self.events)(StreamEvent::Disconnected);
    }

    /// Frames from the guest into the write buffer, while it has room.
    fn take_frames(&mut self) {
        if self.write_buf.len() >= WRITE_BACKLOG {
            return;
        }
        let mut frames = self.port.take_tx();
        while let Some(frame) = frames.pop_front() {
            self.write_buf
                .extend((frame.len() as u32).to_be_bytes().iter().chain(&frame));
            if self.write_buf.len() >= WRITE_BACKLOG {
                break;
            }
        }
        if !frames.is_empty() {
            self.port.requeue_tx(frames);
        }
        self.flush();
    }

    /// Write what is buffered; false if the connection broke.
    fn flush(&mut self) -> bool {
        let Some(conn) = &self.connection else {
            return true;
        };
        while !self.write_buf.is_empty() {
            let (a, b) = self.write_buf.as_slices();
            let iovs = [iovec(a), iovec(b)];
            // SAFETY: the iovecs point into `write_buf`, which is not touched meanwhile.
            let n = unsafe { libc::writev(conn.as_raw_fd(), iovs.as_ptr(), 2) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted;
            }
            self.write_buf.drain(..n as usize);
        }
        true
    }

    /// Read what is there and queue whole frames for the guest; false if the connection
    /// ended or broke the framing.
    fn fill(&mut self) -> bool {
        let Some(conn) = &self.connection else {
            return true;
        };
        let mut chunk = vec![0u8; 65536];
        // SAFETY: reading into `chunk`, which has room for its length.
        let n = unsafe { libc::read(conn.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
        if n == 0 {
            return false;
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            return e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted;
        }
        self.read_buf.extend_from_slice(&chunk[..n as usize]);
        let mut at = 0;
        while self.read_buf.len() - at >= 4 {
            let len = u32::from_be_bytes([
                self.read_buf[at],
                self.read_buf[at + 1],
                self.read_buf[at + 2],
                self.read_buf[at + 3],
            ]) as usize;
            if len > MAX_FRAME {
                tracing::warn!("stream: a {len}-byte frame: the peer breaks the framing");
                return false;
            }
            if self.read_buf.len() - at - 4 < len {
                break;
            }
            self.port.push_rx(&self.read_buf[at + 4..at + 4 + len]);
            at += 4 + len;
        }
        self.read_buf.drain(..at);
        true
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn iovec(buf: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }
}

/// Accept a connection: its fd and who it is from (`tcp:HOST:PORT`, or `unix:` and the
/// peer's path if it has one).
fn accept(listener: RawFd) -> io::Result<(OwnedFd, String)> {
    // SAFETY: sockaddr_storage is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: accept4 writes at most `len` bytes of address into `addr`.
    let fd = unsafe {
        libc::accept4(
            listener,
            &mut addr as *mut libc::sockaddr_storage as *mut libc::sockaddr,
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((fd, peer_name(&addr)))
}

/// A socket address as `info network` shows a peer.
pub fn peer_name(addr: &libc::sockaddr_storage) -> String {
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in, which fits in the storage.
            let a = unsafe { &*(addr as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            format!("tcp:{ip}:{}", u16::from_be(a.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, a sockaddr_in6.
            let a = unsafe { &*(addr as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            format!("tcp:[{ip}]:{}", u16::from_be(a.sin6_port))
        }
        _ => "unix:".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;

    fn wait(mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("timed out");
    }

    #[test]
    fn frames_cross_a_connected_stream_both_ways() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let port = Arc::new(QueuedPort::new(64).unwrap());
        let socket = StreamSocket {
            listener: None,
            connection: Some(OwnedFd::from(ours)),
        };
        spawn(port.clone(), socket, Box::new(|_| {})).unwrap();
        // Two frames in one write, the second split.
        let mut bytes = Vec::new();
        for f in [&b"first"[..], &b"second frame"[..]] {
            bytes.extend_from_slice(&(f.len() as u32).to_be_bytes());
            bytes.extend_from_slice(f);
        }
        theirs.write_all(&bytes[..12]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        theirs.write_all(&bytes[12..]).unwrap();
        let mut got = Vec::new();
        wait(|| {
            let mut buf = [0u8; 64];
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            if let Ok(Some(n)) = crate::net::port::Port::recv(&*port, &[iov]) {
                got.push(buf[..n].to_vec());
            }
            got.len() == 2
        });
        assert_eq!(got, vec![b"first".to_vec(), b"second frame".to_vec()]);

        let mut frame = *b"to the peer";
        let iov = libc::iovec {
            iov_base: frame.as_mut_ptr().cast(),
            iov_len: frame.len(),
        };
        crate::net::port::Port::send(&*port, &[iov]).unwrap();
        let mut out = [0u8; 15];
        theirs.read_exact(&mut out).unwrap();
        assert_eq!(&out[..4], &11u32.to_be_bytes());
        assert_eq!(&out[4..], b"to the peer");
    }

    #[test]
    fn a_listener_serves_one_peer_after_another() {
        let dir = std::env::temp_dir().join(format!("vmm-net-stream-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let listener = std::os::unix::net::UnixListener::bind(&dir).unwrap();
        let port = Arc::new(QueuedPort::new(64).unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let socket = StreamSocket {
            listener: Some(OwnedFd::from(listener)),
            connection: None,
        };
        spawn(
            port.clone(),
            socket,
            Box::new(move |e| {
                log.lock().unwrap().push(match e {
                    StreamEvent::Connected { peer, .. } => peer,
                    StreamEvent::Disconnected => "gone".into(),
                })
            }),
        )
        .unwrap();
        for _ in 0..2 {
            let mut peer = UnixStream::connect(&dir).unwrap();
            peer.write_all(&[0, 0, 0, 2, b'h', b'i']).unwrap();
            wait(|| {
                let mut buf = [0u8; 8];
                let iov = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: 8,
                };
                matches!(crate::net::port::Port::recv(&*port, &[iov]), Ok(Some(2)))
            });
        }
        wait(|| seen.lock().unwrap().len() >= 3);
        assert_eq!(seen.lock().unwrap()[..3], ["unix:", "gone", "unix:"]);
        let _ = std::fs::remove_file(&dir);
    }
}
