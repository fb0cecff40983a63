//! The supervisor of the device processes: it starts each one (found beside the `vmm`
//! binary) with exactly two sockets — control at fd 3, a listening vhost-user socket at
//! fd 4 — plus
//! stdin/stdout on /dev/null and our stderr for its log, ties its life to ours
//! (PR_SET_PDEATHSIG, checked after it is set), and watches it through a pidfd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the child finds its sockets (see `device_procs::inherit`).
const CONTROL_FD: RawFd = 3;
const VHOST_USER_FD: RawFd = 4;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot find the device program {0}: {1}")]
    Program(PathBuf, #[source] io::Error),
    #[error("cannot create the sockets for {0}: {1}")]
    Sockets(String, #[source] io::Error),
    #[error("cannot start {0}: {1}")]
    Spawn(String, #[source] io::Error),
    #[error("cannot watch {0} (pidfd_open): {1}")]
    Pidfd(String, #[source] io::Error),
}

/// A device program beside the running `vmm` binary (or the test binary's directory).
pub fn device_program(name: &str) -> Result<PathBuf, SupervisorError> {
    let exe = std::env::current_exe().map_err(|e| SupervisorError::Program(name.into(), e))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let path = dir.join(name);
    std::fs::metadata(&path).map_err(|e| SupervisorError::Program(path.clone(), e))?;
    Ok(path)
}

/// Whether a device process was caught breaking a protocol (control or vhost-user) or
/// leaving a request unanswered, and why. Whoever catches it convicts it, which kills it
/// at once (a compromised process gets no more time); the watcher then reports it and
/// does not start another. Shared by the control channel, the vhost-user frontend and
/// the watcher, none of which need the others to act.
pub struct Verdict {
    pidfd: OwnedFd,
    reason: Mutex<Option<String>>,
}

impl Verdict {
    /// Record the first reason and kill the process.
    pub fn convict(&self, reason: &str) {
        let mut held = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_none() {
            *held = Some(reason.to_string());
        }
        drop(held);
        // SAFETY: pidfd_send_signal on our pidfd with a null siginfo and no flags; the
        // pidfd names this process even once it has been reaped (then it fails, harmlessly).
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }

    /// Why the process was convicted, if it was.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A running device process and our ends of its sockets.
pub struct DeviceProcess {
    name: String,
    child: Child,
    pidfd: OwnedFd,
    verdict: Arc<Verdict>,
    pub control: UnixStream,
    /// The vhost-user listener the child accepts on; we keep it so that a respawned child
    /// gets the same socket, and connect to it with [`DeviceProcess::connect_vhost_user`].
    vhost_listener: VhostUserListener,
}

/// A unix socket listening on an autobound abstract address: no file on disk, nothing for
/// a sandboxed child to open, and the vhost-user crates accept it as a `Listener`.
pub struct VhostUserListener {
    fd: OwnedFd,
    address: libc::sockaddr_un,
    address_len: libc::socklen_t,
}

impl VhostUserListener {
    pub fn new() -> io::Result<Self> {
        // SAFETY: socket() with constant arguments returns a new fd or -1.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket() just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
        let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        address.sun_family = libc::AF_UNIX as libc::sa_family_t;
        // Binding with only the family asks the kernel for a unique abstract name.
        let family_len = std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t;
        // SAFETY: `address` is a valid sockaddr_un and `family_len` does not exceed it.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &address as *const libc::sockaddr_un as *const libc::sockaddr,
                family_len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen on the socket we own.
        if unsafe { libc::listen(fd.as_raw_fd(), 4) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut address_len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: getsockname writes at most `address_len` bytes into `address`.
        let r = unsafe {
            libc::getsockname(
                fd.as_raw_fd(),
                &mut address as *mut libc::sockaddr_un as *mut libc::sockaddr,
                &mut address_len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VhostUserListener {
            fd,
            address,
            address_len,
        })
    }

    /// The listening socket, to hand to a device process.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }

    /// A new connection to the listener (queued until the child accepts it).
    pub fn connect(&self) -> io::Result<UnixStream> {
        // SAFETY: as in `new`.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket() just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `address`/`address_len` came from getsockname on the listener.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &self.address as *const libc::sockaddr_un as *const libc::sockaddr,
                self.address_len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(UnixStream::from(fd))
    }
}

impl DeviceProcess {
    /// Start `program` with `args`.
    pub fn spawn(name: &str, program: &Path, args: &[&str]) -> Result<Self, SupervisorError> {
        let (control, child_control) =
            UnixStream::pair().map_err(|e| SupervisorError::Sockets(name.into(), e))?;
        let vhost_listener =
            VhostUserListener::new().map_err(|e| SupervisorError::Sockets(name.into(), e))?;
        let control_fd = child_control.as_raw_fd();
        let vhost_fd = vhost_listener.fd.as_raw_fd();
        let parent = std::process::id() as libc::pid_t;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls on fds that exist in the child.
        unsafe {
            command.pre_exec(move || child_setup(control_fd, vhost_fd, parent));
        }
        let child = command
            .spawn()
            .map_err(|e| SupervisorError::Spawn(name.into(), e))?;
        // Our copy of the child's control end closes here.
        drop(child_control);
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(SupervisorError::Pidfd(name.into(), e));
        }
        // SAFETY: pidfd_open just returned this fd; nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let verdict = match pidfd.try_clone() {
            Ok(fd) => Arc::new(Verdict {
                pidfd: fd,
                reason: Mutex::new(None),
            }),
            Err(e) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(SupervisorError::Pidfd(name.into(), e));
            }
        };
        Ok(DeviceProcess {
            name: name.to_string(),
            child,
            pidfd,
            verdict,
            control,
            vhost_listener,
        })
    }

    /// Connect to the child's vhost-user socket.
    pub fn connect_vhost_user(&self) -> Result<UnixStream, SupervisorError> {
        self.vhost_listener
            .connect()
            .map_err(|e| SupervisorError::Sockets(self.name.clone(), e))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where a protocol violation by this process is recorded (see [`Verdict`]).
    pub fn verdict(&self) -> &Arc<Verdict> {
        &self.verdict
    }

    /// The pidfd: readable once the process has exited (for a poll loop).
    pub fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    /// Wait up to `timeout` for the process to exit; its exit status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n > 0 {
                return self.child.wait().ok();
            }
            if n == 0 || left.is_zero() {
                return None;
            }
            // EINTR: poll again with what is left.
        }
    }

    /// Kill the process (SIGKILL) without waiting for it: whoever watches its pidfd reaps
    /// it.
    pub fn signal_kill(&self) {
        // SAFETY: signalling our own child's pid (not reaped yet: its handle is ours).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
    }

    /// Kill the process (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Ask the process to stop (SIGTERM), and kill it if it has not within `grace`.
    /// Returns its exit status.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // SAFETY: signalling our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        if let Some(status) = self.wait_exit(grace) {
            return Some(status);
        }
        tracing::warn!(device = %self.name, "did not stop within {grace:?}: killing it");
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// In the child between fork and exec: sockets to fds 3 and 4, every other fd above 2
/// closed, and death with the parent. Only async-signal-safe calls.
fn child_setup(control: RawFd, vhost: RawFd, parent: libc::pid_t) -> io::Result<()> {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // SAFETY: plain fd and process syscalls in the child; the fds exist (inherited).
    unsafe {
        // Move both out of the way first, so that neither clobbers the other at 3/4.
        let control_high = check(libc::fcntl(control, libc::F_DUPFD_CLOEXEC, 64))?;
        let vhost_high = check(libc::fcntl(vhost, libc::F_DUPFD_CLOEXEC, 64))?;
        check(libc::dup2(control_high, CONTROL_FD))?;
        check(libc::dup2(vhost_high, VHOST_USER_FD))?;
        // dup2 clears FD_CLOEXEC on the new fds. Everything above them closes at exec:
        // marked close-on-exec rather than closed now, so std's exec-error pipe still
        // works (CLOSE_RANGE_CLOEXEC, Linux 5.11; plain close before that).
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        let first = VHOST_USER_FD as libc::c_uint + 1;
        let r = libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC);
        if r < 0 {
            check(libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) as libc::c_int)?;
        }
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        // The parent may have died before the prctl: then nobody would kill us.
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
    Ok(())
}
