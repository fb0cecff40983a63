//! The fds a device process starts with. The vmm's supervisor places the control socket
//! (postcard RPC, see the `ipc` crate) at fd 3 and a listening vhost-user socket at fd 4
//! (the vmm connects to it, again after a restart); besides stdin/stdout (/dev/null) and
//! stderr (the vmm's log), nothing else is open.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

/// The control socket's fd in a device process.
pub const CONTROL_FD: RawFd = 3;
/// The vhost-user socket's fd in a device process.
pub const VHOST_USER_FD: RawFd = 4;

#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("fd {0} is not open: this program is started by the vmm, not by hand")]
    Missing(RawFd),
    #[error("fd {0} is not a unix socket")]
    NotASocket(RawFd),
}

/// Take ownership of the control socket and the vhost-user listener. Call once, first thing.
pub fn inherited_sockets() -> Result<(UnixStream, UnixListener), InheritError> {
    let control = adopt(CONTROL_FD)?;
    let listener = adopt(VHOST_USER_FD)?;
    // SAFETY: `adopt` checked the fd is an open socket and transfers its ownership here.
    let listener =
        unsafe { UnixListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(listener)) };
    Ok((control, listener))
}

fn adopt(fd: RawFd) -> Result<UnixStream, InheritError> {
    // SAFETY: fstat only writes the stat buffer we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; an invalid fd gives EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(InheritError::Missing(fd));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(InheritError::NotASocket(fd));
    }
    // Keep it from leaking into anything this process might exec.
    // SAFETY: F_SETFD on an fd we just checked is open.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the supervisor handed this process the fd and nothing else owns it; this
    // function is called once per fd.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}
