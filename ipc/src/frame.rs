//! Length-framed messages on a unix stream socket, with file descriptors alongside.
//!
//! A frame is a 4-byte little-endian payload length and the payload. Any fds travel as
//! SCM_RIGHTS ancillary data on the first `sendmsg` of the frame; the receiver collects
//! every fd that arrives while it reads the frame, so they stay with their message. The
//! length is checked against [`MAX_FRAME`] before anything is allocated, and a frame may
//! carry at most [`MAX_FDS`] fds: a peer cannot make us allocate or hold without bound.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Largest payload accepted (and sent).
pub const MAX_FRAME: usize = 1 << 20;
/// Most fds one frame may carry.
pub const MAX_FDS: usize = 16;
const HEADER: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("socket I/O: {0}")]
    Io(#[source] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("a frame carried more than {MAX_FDS} file descriptors")]
    TooManyFds,
    #[error("timed out")]
    TimedOut,
    #[error("the peer stopped in the middle of a frame")]
    Stalled,
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FrameError::TimedOut,
            _ => FrameError::Io(e),
        }
    }
}

/// Send one frame with `fds` attached.
pub fn send_frame(
    sock: &UnixStream,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), FrameError> {
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(payload.len()));
    }
    if fds.len() > MAX_FDS {
        return Err(FrameError::TooManyFds);
    }
    let mut bytes = Vec::with_capacity(HEADER + payload.len());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = retry_interrupted(|| sendmsg_with_fds(sock, &bytes, &raw))?;
    (&*sock).write_all(&bytes[sent..])?;
    Ok(())
}

/// Receive one frame: its payload and the fds that came with it. The socket's read
/// timeout bounds the whole frame, not each read: a peer that starts a frame and then
/// trickles it (or stops) gets [`FrameError::Stalled`].
pub fn recv_frame(sock: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), FrameError> {
    let limit = sock.read_timeout().ok().flatten();
    let started = std::time::Instant::now();
    // A read in the middle of a frame: a timeout there, or the whole frame taking longer
    // than the limit, is the peer stalling.
    let stalled = |e: FrameError| match e {
        FrameError::TimedOut => FrameError::Stalled,
        e => e,
    };
    let past_limit = || limit.is_some_and(|l| started.elapsed() > l);
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = retry_interrupted(|| recvmsg_with_fds(sock, &mut header[got..], &mut fds))
            .map_err(|e| if got == 0 { e } else { stalled(e) })?;
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Closed
            } else {
                FrameError::Truncated
            });
        }
        got += n;
        if got < HEADER && past_limit() {
            return Err(FrameError::Stalled);
        }
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = retry_interrupted(|| recvmsg_with_fds(sock, &mut payload[got..], &mut fds))
            .map_err(stalled)?;
        if n == 0 {
            return Err(FrameError::Truncated);
        }
        got += n;
        if got < len && past_limit() {
            return Err(FrameError::Stalled);
        }
    }
    Ok((payload, fds))
}

/// Room for MAX_FDS descriptors in a control message, in u64 units for alignment.
const CONTROL_WORDS: usize = 16;
const _: () = assert!(CONTROL_WORDS * 8 >= 16 + MAX_FDS * 4);

/// Run a socket call again when a signal interrupted it before it did anything (EINTR):
/// the vmm's own signals (vCPU kicks, child exits) must not fail a control message.
fn retry_interrupted<T>(mut f: impl FnMut() -> Result<T, FrameError>) -> Result<T, FrameError> {
    loop {
        match f() {
            Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn sendmsg_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> Result<usize, FrameError> {
    if fds.is_empty() {
        return Ok((&*sock).write(bytes)?);
    }
    let mut control = [0u64; CONTROL_WORDS];
    let fd_bytes = std::mem::size_of_val(fds);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: a zeroed msghdr is valid; it points at `iov` and `control`, which outlive
    // the call, and CMSG_FIRSTHDR/CMSG_DATA stay inside `control` (checked size above).
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(fd_bytes as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(sent as usize)
}

/// One recvmsg: bytes into `buf`, fds appended to `fds` (close-on-exec). An fd beyond
/// MAX_FDS for the frame, or a truncated control message, is an error; every fd received
/// is owned (and so closed) either way.
fn recvmsg_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, FrameError> {
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; it points at `iov` and `control`, which outlive
    // the call.
    let (n, flags) = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // Take ownership of every fd the kernel installed before judging anything.
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        (n as usize, msg.msg_flags)
    };
    if flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
        return Err(FrameError::TooManyFds);
    }
    Ok(n)
}

/// Read exactly `buf.len()` bytes (for tests that write raw frames).
#[cfg(test)]
pub(crate) fn read_exact(sock: &UnixStream, buf: &mut [u8]) -> io::Result<()> {
    use std::io::Read;
    (&*sock).read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe() writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe() just created both and nothing else owns them.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn frames_carry_payload_and_working_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, w) = pipe();
        send_frame(&a, b"hello", &[w.as_fd()]).unwrap();
        drop(w);
        let (payload, fds) = recv_frame(&b).unwrap();
        assert_eq!(payload, b"hello");
        assert_eq!(fds.len(), 1);
        // The received fd is the pipe's write end: bytes written there come out of `r`.
        let mut file = std::fs::File::from(fds.into_iter().next().unwrap());
        file.write_all(b"x").unwrap();
        let mut byte = [0u8];
        std::fs::File::from(r).read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        // An empty payload and no fds.
        send_frame(&a, b"", &[]).unwrap();
        let (payload, fds) = recv_frame(&b).unwrap();
        assert!(payload.is_empty() && fds.is_empty());
    }

    #[test]
    fn a_frame_split_across_writes_arrives_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let mut frame = 6u32.to_le_bytes().to_vec();
            frame.extend_from_slice(b"abcdef");
            for byte in frame {
                (&a).write_all(&[byte]).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            a
        });
        let (payload, _) = recv_frame(&b).unwrap();
        assert_eq!(payload, b"abcdef");
        drop(writer.join().unwrap());
    }

    #[test]
    fn oversized_truncated_and_closed_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        // A header claiming 4 GiB: refused before allocating.
        (&a).write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(recv_frame(&b), Err(FrameError::TooLarge(_))));
        // Half a header, then EOF.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[1, 0]).unwrap();
        drop(a);
        assert!(matches!(recv_frame(&b), Err(FrameError::Truncated)));
        // A header promising more payload than comes.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&10u32.to_le_bytes()).unwrap();
        (&a).write_all(b"abc").unwrap();
        drop(a);
        assert!(matches!(recv_frame(&b), Err(FrameError::Truncated)));
        // A clean close between frames.
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(recv_frame(&b), Err(FrameError::Closed)));
        // Sending too much is refused locally.
        let (a, _b) = UnixStream::pair().unwrap();
        let big = vec![0u8; MAX_FRAME + 1];
        assert!(matches!(
            send_frame(&a, &big, &[]),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn too_many_fds_are_refused_and_closed() {
        let (a, _b) = UnixStream::pair().unwrap();
        let pipes: Vec<_> = (0..=MAX_FDS).map(|_| pipe()).collect();
        let fds: Vec<BorrowedFd<'_>> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
        assert!(matches!(
            send_frame(&a, b"x", &fds),
            Err(FrameError::TooManyFds)
        ));
    }

    #[test]
    fn a_peer_that_sends_too_many_fds_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let pipes: Vec<_> = (0..=MAX_FDS).map(|_| pipe()).collect();
        let raw: Vec<RawFd> = pipes.iter().map(|(r, _)| r.as_raw_fd()).collect();
        // A raw frame with MAX_FDS + 1 fds, as a misbehaving peer would send it.
        let mut frame = 1u32.to_le_bytes().to_vec();
        frame.push(b'x');
        assert_eq!(sendmsg_with_fds(&a, &frame, &raw).unwrap(), frame.len());
        assert!(matches!(recv_frame(&b), Err(FrameError::TooManyFds)));
    }

    #[test]
    fn a_read_timeout_is_reported() {
        let (_a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        assert!(matches!(recv_frame(&b), Err(FrameError::TimedOut)));
    }

    #[test]
    fn a_frame_trickled_past_the_timeout_is_stalled() {
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        // A header for 64 bytes, then one byte every 30 ms: each read is quick, the frame
        // is not.
        let t = std::thread::spawn(move || {
            let _ = a.write_all(&64u32.to_le_bytes());
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(30));
                if a.write_all(b"x").is_err() {
                    break;
                }
            }
        });
        let started = std::time::Instant::now();
        assert!(matches!(recv_frame(&b), Err(FrameError::Stalled)));
        assert!(started.elapsed() < Duration::from_millis(400));
        drop(b);
        t.join().unwrap();
        // Half a header and then nothing.
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        a.write_all(&[1, 0]).unwrap();
        assert!(matches!(recv_frame(&b), Err(FrameError::Stalled)));
    }

    #[test]
    fn raw_reads_see_the_header() {
        let (a, b) = UnixStream::pair().unwrap();
        send_frame(&a, b"zz", &[]).unwrap();
        let mut raw = [0u8; 6];
        read_exact(&b, &mut raw).unwrap();
        assert_eq!(raw, [2, 0, 0, 0, b'z', b'z']);
    }
}
