//! A relay between a vhost-user frontend we did not write (QEMU) and our daemon.
//!
//! QEMU enables and disables rings (VHOST_USER_SET_VRING_ENABLE) as soon as it has read
//! the backend's features, before it sends them back with SET_FEATURES; rust-vmm's vhost
//! crate refuses that message until PROTOCOL_FEATURES is acked, and drops the connection.
//! So a standalone backend serves each connection through this relay, which holds those
//! early messages (answering them if asked to), and passes them on right after
//! SET_FEATURES. Everything else, fds included, passes unchanged in both directions. The
//! daemon side is a connection to a listener on an abstract address inside the sandbox's
//! own network namespace: nothing outside can reach it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::Listener;

use crate::hostile::{Hostile, Mode};
use crate::vhost_daemon::{serve_one, DaemonError, Served};

/// vhost-user message header: request, flags, payload size (all u32 LE).
const HEADER_LEN: usize = 12;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// The largest payload the protocol has (a memory table with its regions), with room.
const MAX_PAYLOAD: usize = 4096 * 4;
const MAX_FDS: usize = 32;

/// Serve frontends on `public` one after another, each through a relay.
pub fn serve_relayed<B: Served>(backend: Arc<B>, public: UnixListener) -> Result<(), DaemonError> {
    let (inner, address) = abstract_listener().map_err(|e| DaemonError::Daemon(e.to_string()))?;
    let mut inner = Listener::from(inner);
    loop {
        let (front, _) = public
            .accept()
            .map_err(|e| DaemonError::Accept(e.to_string()))?;
        let back = connect(&address).map_err(|e| DaemonError::Daemon(e.to_string()))?;
        spawn_relay(front, back, None).map_err(|e| DaemonError::Daemon(e.to_string()))?;
        serve_one(&backend, &mut inner)?;
    }
}

/// For a hostile test mode (see [`crate::hostile`]), made before the sandbox forbids
/// making sockets: the daemon's listener and a connection to it already waiting.
pub struct PreparedRelay {
    inner: UnixListener,
    back: UnixStream,
}

impl PreparedRelay {
    pub fn new() -> io::Result<Self> {
        let (inner, address) = abstract_listener()?;
        let back = connect(&address)?;
        Ok(PreparedRelay { inner, back })
    }
}

/// Serve the first frontend on `public` through a relay that turns `hostile` on the
/// vhost-user protocol, then the next ones directly.
pub fn serve_hostile<B: Served>(
    backend: Arc<B>,
    public: UnixListener,
    prepared: PreparedRelay,
    hostile: Hostile,
) -> Result<(), DaemonError> {
    let (front, _) = public
        .accept()
        .map_err(|e| DaemonError::Accept(e.to_string()))?;
    spawn_relay(front, prepared.back, Some(hostile))
        .map_err(|e| DaemonError::Daemon(e.to_string()))?;
    serve_one(&backend, &mut Listener::from(prepared.inner))?;
    crate::vhost_daemon::serve(backend, public)
}

/// A unix socket listening on a kernel-chosen abstract address: the listener and its
/// address.
fn abstract_listener() -> io::Result<(UnixListener, (libc::sockaddr_un, libc::socklen_t))> {
    let fd = unix_socket()?;
    // SAFETY: sockaddr_un is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let family_len = std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t;
    // SAFETY: binding with only the family asks for an autobound abstract address.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            family_len,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on the socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 1) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`.
    if unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            &mut addr as *mut _ as *mut libc::sockaddr,
            &mut len,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok((UnixListener::from(fd), (addr, len)))
}

fn unix_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() with constant arguments returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket() just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn connect(address: &(libc::sockaddr_un, libc::socklen_t)) -> io::Result<UnixStream> {
    let fd = unix_socket()?;
    // SAFETY: the address came from getsockname on the listener.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &address.0 as *const _ as *const libc::sockaddr,
            address.1,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// One vhost-user message and the fds that came with it.
struct Msg {
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Msg {
    fn field(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.header[at],
            self.header[at + 1],
            self.header[at + 2],
            self.header[at + 3],
        ])
    }

    fn request(&self) -> u32 {
        self.field(0)
    }

    fn flags(&self) -> u32 {
        self.field(4)
    }

    fn new(request: u32, flags: u32, payload: Vec<u8>) -> Msg {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        header[8..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Msg {
            header,
            payload,
            fds: Vec::new(),
        }
    }
}

/// Relay `front` (the frontend) and `back` (our daemon) on two threads; each ends when its
/// source does, and shuts the other side down.
fn spawn_relay(front: UnixStream, back: UnixStream, hostile: Option<Hostile>) -> io::Result<()> {
    let front_writer = Arc::new(Mutex::new(front.try_clone()?));
    let back_reader = back.try_clone()?;
    let front_for_replies = front_writer.clone();
    std::thread::Builder::new()
        .name("relay-reply".into())
        .spawn(move || {
            while let Ok(Some(msg)) = recv(back_reader.as_raw_fd()) {
                tracing::trace!("reply {} (flags {:#x})", msg.request(), msg.flags());
                let front = front_for_replies.lock().unwrap_or_else(|e| e.into_inner());
                if send(front.as_raw_fd(), &msg).is_err() {
                    break;
                }
            }
            let front = front_for_replies.lock().unwrap_or_else(|e| e.into_inner());
            let _ = front.shutdown(std::net::Shutdown::Both);
        })?;
    std::thread::Builder::new()
        .name("relay-request".into())
        .spawn(move || {
            relay_requests(&front, &back, &front_writer, hostile);
            let _ = back.shutdown(std::net::Shutdown::Both);
        })?;
    Ok(())
}

/// Frontend to daemon, holding ring enables that come before SET_FEATURES; once
/// `hostile` is active, requests are answered wrongly or not at all instead.
fn relay_requests(
    front: &UnixStream,
    back: &UnixStream,
    front_writer: &Mutex<UnixStream>,
    hostile: Option<Hostile>,
) {
    let mut acked = false;
    let mut held: Vec<Msg> = Vec::new();
    while let Ok(Some(msg)) = recv(front.as_raw_fd()) {
        let request = msg.request();
        match hostile.filter(Hostile::active).map(|h| h.mode) {
            Some(Mode::VhostSilent) => continue,
            Some(Mode::VhostGarbage) => {
                // A reply, but to another request.
                let wrong = Msg::new(
                    request.wrapping_add(1),
                    FLAG_VERSION | FLAG_REPLY,
                    0u64.to_le_bytes().to_vec(),
                );
                let front = front_writer.lock().unwrap_or_else(|e| e.into_inner());
                if send(front.as_raw_fd(), &wrong).is_err() {
                    return;
                }
                continue;
            }
            _ => {}
        }
        tracing::trace!(
            "request {request} (flags {:#x}, {} bytes, {} fds)",
            msg.flags(),
            msg.payload.len(),
            msg.fds.len()
        );
        if request == SET_VRING_ENABLE && !acked {
            if msg.flags() & FLAG_NEED_REPLY != 0 {
                let ack = Msg::new(
                    request,
                    FLAG_VERSION | FLAG_REPLY,
                    0u64.to_le_bytes().to_vec(),
                );
                let front = front_writer.lock().unwrap_or_else(|e| e.into_inner());
                if send(front.as_raw_fd(), &ack).is_err() {
                    return;
                }
            }
            // Passed on after SET_FEATURES, without asking for a reply.
            let flags = msg.flags() & !FLAG_NEED_REPLY;
            held.retain(|m| m.payload.get(..4) != msg.payload.get(..4));
            held.push(Msg::new(request, flags, msg.payload));
            continue;
        }
        let features_acked = request == SET_FEATURES
            && msg.payload.get(..8).is_some_and(|v| {
                let mut b = [0u8; 8];
                b.copy_from_slice(v);
                u64::from_le_bytes(b) & PROTOCOL_FEATURES != 0
            });
        if send(back.as_raw_fd(), &msg).is_err() {
            return;
        }
        if features_acked && !acked {
            acked = true;
            for m in held.drain(..) {
                if send(back.as_raw_fd(), &m).is_err() {
                    return;
                }
            }
        }
    }
}

/// The next message on `fd`, or None at end of file.
fn recv(fd: RawFd) -> io::Result<Option<Msg>> {
    let mut header = [0u8; HEADER_LEN];
    let mut cmsg = vec![0u8; cmsg_space(MAX_FDS)];
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    };
    // SAFETY: msghdr is plain data; all zeroes is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.len();
    // SAFETY: recvmsg writes within the header buffer and the control buffer we pass.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Ok(None);
    }
    let fds = received_fds(&msg);
    let mut got = n as usize;
    while got < HEADER_LEN {
        got += read_some(fd, &mut header[got..])?;
    }
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::other(format!(
            "a {size}-byte vhost-user payload"
        )));
    }
    let mut payload = vec![0u8; size];
    let mut got = 0;
    while got < size {
        got += read_some(fd, &mut payload[got..])?;
    }
    Ok(Some(Msg {
        header,
        payload,
        fds,
    }))
}

fn read_some(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reading into `buf`, which has room for its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        n => Ok(n as usize),
    }
}

/// The fds of an SCM_RIGHTS control message.
fn received_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: walking the control messages recvmsg filled in, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let len = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    // The kernel just installed these fds for us; nothing else owns them.
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    fds
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((fds * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Send `msg` (header and payload in one message, with its fds).
fn send(fd: RawFd, msg: &Msg) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + msg.payload.len());
    bytes.extend_from_slice(&msg.header);
    bytes.extend_from_slice(&msg.payload);
    let mut cmsg = vec![0u8; cmsg_space(msg.fds.len())];
    let mut sent = 0;
    while sent < bytes.len() {
        let mut iov = libc::iovec {
            iov_base: bytes[sent..].as_mut_ptr().cast(),
            iov_len: bytes.len() - sent,
        };
        // SAFETY: msghdr is plain data; all zeroes is valid.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        // The fds go with the first part only.
        if sent == 0 && !msg.fds.is_empty() {
            hdr.msg_control = cmsg.as_mut_ptr().cast();
            hdr.msg_controllen = cmsg.len();
            // SAFETY: the control buffer has room for one SCM_RIGHTS message with our fds.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&hdr);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len =
                    libc::CMSG_LEN((msg.fds.len() * std::mem::size_of::<RawFd>()) as u32) as usize;
                let data = libc::CMSG_DATA(c) as *mut RawFd;
                for (i, f) in msg.fds.iter().enumerate() {
                    std::ptr::write_unaligned(data.add(i), f.as_raw_fd());
                }
            }
        }
        // SAFETY: sendmsg reads the buffer and control data `hdr` points to.
        let n = unsafe { libc::sendmsg(fd, &hdr, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        sent += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enable(index: u32, num: u32, flags: u32) -> Msg {
        let mut payload = index.to_le_bytes().to_vec();
        payload.extend_from_slice(&num.to_le_bytes());
        Msg::new(SET_VRING_ENABLE, flags, payload)
    }

    #[test]
    fn a_hostile_relay_answers_wrongly_or_not_at_all() {
        let now = std::time::Instant::now();
        for mode in [Mode::VhostGarbage, Mode::VhostSilent] {
            let (front_peer, front) = UnixStream::pair().unwrap();
            let (back, back_peer) = UnixStream::pair().unwrap();
            spawn_relay(front, back, Some(Hostile { mode, from: now })).unwrap();
            // GET_FEATURES (1): nothing reaches the daemon either way.
            send(
                front_peer.as_raw_fd(),
                &Msg::new(1, FLAG_VERSION, Vec::new()),
            )
            .unwrap();
            front_peer
                .set_read_timeout(Some(std::time::Duration::from_millis(200)))
                .unwrap();
            let answer = recv(front_peer.as_raw_fd());
            match mode {
                Mode::VhostGarbage => {
                    let reply = answer.unwrap().unwrap();
                    assert_eq!(
                        (reply.request(), reply.flags()),
                        (2, FLAG_VERSION | FLAG_REPLY)
                    );
                }
                _ => assert!(answer.is_err(), "a silent relay answered"),
            }
            back_peer
                .set_read_timeout(Some(std::time::Duration::from_millis(50)))
                .unwrap();
            assert!(
                recv(back_peer.as_raw_fd()).is_err(),
                "{mode:?} passed a request on"
            );
        }
    }

    #[test]
    fn early_ring_enables_wait_for_set_features() {
        let (front_peer, front) = UnixStream::pair().unwrap();
        let (back, back_peer) = UnixStream::pair().unwrap();
        spawn_relay(front, back, None).unwrap();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let mut call = Msg::new(13, FLAG_VERSION, 0u64.to_le_bytes().to_vec());
        call.fds.push(OwnedFd::from(file));
        send(front_peer.as_raw_fd(), &call).unwrap();
        send(
            front_peer.as_raw_fd(),
            &enable(0, 0, FLAG_VERSION | FLAG_NEED_REPLY),
        )
        .unwrap();
        send(front_peer.as_raw_fd(), &enable(1, 0, FLAG_VERSION)).unwrap();
        // The early enable is answered by the relay.
        let ack = recv(front_peer.as_raw_fd()).unwrap().unwrap();
        assert_eq!(ack.request(), SET_VRING_ENABLE);
        assert_eq!(ack.flags(), FLAG_VERSION | FLAG_REPLY);
        // The daemon sees the call fd, then SET_FEATURES, then the two enables.
        let got = recv(back_peer.as_raw_fd()).unwrap().unwrap();
        assert_eq!((got.request(), got.fds.len()), (13, 1));
        let features = Msg::new(
            SET_FEATURES,
            FLAG_VERSION,
            PROTOCOL_FEATURES.to_le_bytes().to_vec(),
        );
        send(front_peer.as_raw_fd(), &features).unwrap();
        let order: Vec<(u32, u32)> = (0..3)
            .map(|_| {
                let m = recv(back_peer.as_raw_fd()).unwrap().unwrap();
                (m.request(), m.flags())
            })
            .collect();
        assert_eq!(
            order,
            vec![
                (SET_FEATURES, FLAG_VERSION),
                (SET_VRING_ENABLE, FLAG_VERSION),
                (SET_VRING_ENABLE, FLAG_VERSION)
            ]
        );
        // Later enables pass straight through; replies go back.
        send(front_peer.as_raw_fd(), &enable(0, 1, FLAG_VERSION)).unwrap();
        assert_eq!(
            recv(back_peer.as_raw_fd()).unwrap().unwrap().request(),
            SET_VRING_ENABLE
        );
        send(
            back_peer.as_raw_fd(),
            &Msg::new(1, FLAG_VERSION | FLAG_REPLY, vec![0; 8]),
        )
        .unwrap();
        assert_eq!(recv(front_peer.as_raw_fd()).unwrap().unwrap().request(), 1);
        drop(front_peer);
        assert!(
            recv(back_peer.as_raw_fd()).unwrap().is_none(),
            "closed behind the frontend"
        );
    }
}
