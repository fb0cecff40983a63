//! The sandbox a device process enters before it serves: new mount, PID, ipc, uts and
//! (except for the net process) net namespaces; the root pivoted into an empty, read-only
//! tmpfs; no_new_privs; every capability dropped; limits on open files, processes, and
//! private and total memory; and, for the real device programs, a seccomp allowlist that
//! kills the process on any other system call (see [`crate::seccomp`]). After `enter`, the
//! process holds only the fds it already had (its sockets, and what the vmm passes it over
//! them) and cannot open host files or reach the network.
//!
//! # Two processes
//!
//! A process cannot move itself into a new PID namespace, and once it has unshared one it
//! can no longer start threads. So [`enter`] unshares the namespaces (PID included), does
//! the mount work, sets no_new_privs and the limits and drops the capabilities, and then
//! forks:
//!
//! - the **inner** process is PID 1 of the new PID namespace. `enter` returns in it, and
//!   it does all the work (with threads). It dies with the outer process
//!   (PR_SET_PDEATHSIG(SIGKILL), checked through a pidfd of the outer process because
//!   `getppid` is 0 across the namespace boundary), and a SIGTERM or SIGINT it has no
//!   handler for ends it as it would any other process (the kernel ignores signals that
//!   a namespace's init has left at SIG_DFL).
//! - the **outer** process is the one the vmm started (its supervisor holds a pidfd to it
//!   and reports its pid). It never returns from `enter`: it closes every fd above 2,
//!   installs a tiny seccomp allowlist of its own (wait, kill the inner process, signals,
//!   exit; anything else kills it), forwards SIGTERM and SIGINT to the inner process, and
//!   exits with its exit status, or 128 + the signal that killed it. It shares the inner
//!   process's mount, ipc, uts and net namespaces (so its root is the same empty tmpfs),
//!   no_new_privs, limits and empty capability sets; only its own PID namespace is the
//!   host's (`/proc/PID/ns/pid_for_children` is the new one).
//!
//! The inner process reports PID 1 in its `ipc` hello; the vmm uses the pid of the process
//! it started. A kill -9 of the outer process ends the inner one a moment later, not
//! before the outer one can be reaped: whoever reuses what the inner process held (a
//! standalone `vmm-blk`'s image lock) may have to wait for it to go.
//!
//! # Self-test hook
//!
//! With `VMM_SANDBOX_SELFTEST=1` in its environment (the supervisor passes the vmm's
//! environment on), the inner process proves on stderr that it cannot reach host files or
//! the network, one line per probe:
//!
//! ```text
//! vmm-blk: sandbox self-test: without seccomp: open("/etc/passwd") failed: No such file or directory (os error 2)
//! vmm-blk: sandbox self-test: open("/etc/passwd") failed: Operation not permitted (os error 1)
//! vmm-blk: sandbox self-test: socket(AF_INET) failed: Operation not permitted (os error 1)
//! ```
//!
//! The first probe runs after pivot_root and the capability drop but before the seccomp
//! filter (the empty root has no /etc); the other two run under the filter, which answers
//! file opening and socket creation with EPERM (see [`crate::seccomp`]), and only when the
//! profile has one. A probe that works prints `SUCCEEDED` instead of `failed: ...`.

use std::ffi::CString;
use std::io;

use crate::seccomp;

/// What a kind of process keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    /// Keep the host network namespace (the net process's backend needs its tap fd's
    /// namespace; it is handed fds, so this is only for what remains).
    pub keep_network: bool,
    /// RLIMIT_NOFILE: the most fds the process may hold.
    pub max_files: u64,
    /// RLIMIT_NPROC. The kernel counts it per user and does not apply it to root (uid 0 in
    /// the initial user namespace), which is how device processes run today: there the
    /// seccomp filter's "threads only" rule on clone is what stops new processes.
    pub max_processes: u64,
    /// RLIMIT_DATA: private writable memory (heap, thread stacks). Guest RAM is a shared
    /// mapping and does not count.
    pub max_data: u64,
    /// RLIMIT_AS: all mappings, guest RAM included.
    pub max_address_space: u64,
    /// The seccomp allowlist, if any.
    pub seccomp: Option<seccomp::Kind>,
}

const GIB: u64 = 1 << 30;

impl Profile {
    /// Namespaces, pivot_root, capabilities and limits for a block device process. Without
    /// a seccomp filter (stand-ins in tests make arbitrary system calls to probe the
    /// sandbox); `vmm-blk` adds its allowlist with [`Profile::with_seccomp`].
    pub const BLOCK: Profile = Profile {
        keep_network: false,
        max_files: 256,
        // Threads: one per queue (up to 64), the vhost-user and control threads, spare.
        max_processes: 128,
        max_data: GIB,
        // Guest RAM is mapped whole: up to 1 TiB of it, plus room for the rest.
        max_address_space: 1024 * GIB + 64 * GIB,
        seccomp: None,
    };

    /// `vmm-net` over fds it is given (taps, sockets): no network of its own.
    pub const NET: Profile = Profile {
        keep_network: false,
        max_files: 256,
        // Threads: one per queue pair (up to 16), the vhost-user, control and socket
        // threads, spare.
        max_processes: 64,
        max_data: GIB,
        max_address_space: 1024 * GIB + 64 * GIB,
        seccomp: Some(seccomp::Kind::Net),
    };

    /// `vmm-net` for `-netdev user`: libslirp makes host sockets, so the process keeps
    /// the host's network namespace and may create sockets (still no files).
    pub const NET_USER: Profile = Profile {
        keep_network: true,
        max_files: 1024,
        seccomp: Some(seccomp::Kind::NetUser),
        ..Profile::NET
    };

    /// Standalone `vmm-net`: its relay for foreign frontends (see
    /// [`crate::vhost_relay`]) makes unix sockets inside the sandbox's own network
    /// namespace.
    pub const NET_STANDALONE: Profile = Profile {
        seccomp: Some(seccomp::Kind::NetRelay),
        ..Profile::NET
    };

    /// `vmm-display`: VNC clients on the listener and sockets it is given, the
    /// framebuffer mapped read-only, screendumps written to files it is given.
    pub const DISPLAY: Profile = Profile {
        keep_network: false,
        max_files: 1024,
        // Two threads per client, the accept, control and refresh threads, spare.
        max_processes: 512,
        max_data: 4 * GIB,
        max_address_space: 64 * GIB,
        seccomp: Some(seccomp::Kind::Display),
    };

    /// The same profile with seccomp allowlist `kind`.
    pub const fn with_seccomp(self, kind: seccomp::Kind) -> Profile {
        Profile {
            seccomp: Some(kind),
            ..self
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox: {step}: {source}")]
    Step {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
}

fn check(step: &'static str, r: libc::c_int) -> Result<(), SandboxError> {
    if r < 0 {
        Err(SandboxError::Step {
            step,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

/// The environment variable that turns on the self-test probes (see the module docs).
pub const SELFTEST_ENV: &str = "VMM_SANDBOX_SELFTEST";

/// Enter the sandbox. Call once, after taking the inherited sockets and before serving;
/// single-threaded (unshare(CLONE_NEWNS) refuses a process that shares its fs state, and
/// the fork must not happen with other threads around). Returns in the inner process only
/// (see the module docs); the outer process stays in here until the inner one ends.
pub fn enter(profile: Profile) -> Result<(), SandboxError> {
    let selftest = std::env::var_os(SELFTEST_ENV).is_some_and(|v| v == "1");
    let program = program_name();
    // Read while /proc is still there.
    let last_cap = last_capability();
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !profile.keep_network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare takes flags only.
    check("unshare", unsafe { libc::unshare(flags) })?;
    // Once, for both processes: they share the mount namespace.
    pivot_into_empty_root()?;
    // SAFETY: prctl with integer arguments.
    check("no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    // Inherited by both. RLIMIT_NPROC is not applied to root, which the device processes
    // are, so it does not stop the fork below.
    for (step, resource, value) in [
        ("RLIMIT_NOFILE", libc::RLIMIT_NOFILE, profile.max_files),
        ("RLIMIT_NPROC", libc::RLIMIT_NPROC, profile.max_processes),
        ("RLIMIT_DATA", libc::RLIMIT_DATA, profile.max_data),
        ("RLIMIT_AS", libc::RLIMIT_AS, profile.max_address_space),
    ] {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads the struct we pass.
        check(step, unsafe { libc::setrlimit(resource, &limit) })?;
    }
    drop_capabilities(last_cap)?;
    split()?;
    // The inner process, PID 1 of the new namespace, from here on.
    if selftest {
        probe_open(&program, "without seccomp: ");
        probe_processes(&program);
    }
    if let Some(kind) = profile.seccomp {
        seccomp::install(kind)?;
        if selftest {
            probe_open(&program, "");
            probe_socket(&program);
        }
    }
    Ok(())
}

/// Other processes: the empty root has no /proc, and the PID namespace holds only us.
fn probe_processes(program: &str) {
    // SAFETY: open with a valid C string; a returned fd is ours and closed by report.
    let fd = unsafe { libc::open(c"/proc/1/status".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    report(program, "without seccomp: open(\"/proc/1/status\")", fd);
}

/// The program's name for the self-test lines.
fn program_name() -> String {
    std::env::args_os()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(std::path::Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "device process".into())
}

fn probe_open(program: &str, stage: &str) {
    // SAFETY: open with a valid C string; a returned fd is ours and closed below.
    let fd = unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    report(program, &format!("{stage}open(\"/etc/passwd\")"), fd);
}

fn probe_socket(program: &str) {
    // SAFETY: socket takes integers; a returned fd is ours and closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    report(program, "socket(AF_INET)", fd);
}

fn report(program: &str, what: &str, fd: libc::c_int) {
    if fd >= 0 {
        // SAFETY: the probe's own fd.
        unsafe { libc::close(fd) };
        eprintln!("{program}: sandbox self-test: {what} SUCCEEDED");
    } else {
        let e = io::Error::last_os_error();
        eprintln!("{program}: sandbox self-test: {what} failed: {e}");
    }
}

/// Fork into the outer and the inner process. Returns in the inner one, which is PID 1 of
/// the namespace unshared before; the outer one runs [`outer`] and never returns.
fn split() -> Result<(), SandboxError> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let outer_fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    check("pidfd_open", outer_fd as libc::c_int)?;
    let outer_fd = outer_fd as libc::c_int;
    // SIGCHLD, SIGTERM and SIGINT are blocked from before the fork, so that the outer
    // process takes every one of them with sigwaitinfo; SIGCHLD at its default (an
    // inherited SIG_IGN would reap the inner process for us).
    let waited = signal_set(&[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT]);
    // SAFETY: an all-zero sigset_t is a valid buffer for pthread_sigmask to fill.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: pthread_sigmask reads `waited` and writes `old`; signal takes integers.
    unsafe {
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &waited, &mut old);
        if r != 0 {
            libc::close(outer_fd);
            return Err(SandboxError::Step {
                step: "block signals",
                source: io::Error::from_raw_os_error(r),
            });
        }
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
    }
    // SAFETY: this process is single-threaded (documented for `enter`), so the child
    // may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: restoring the mask we saved; closing our own fd.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            libc::close(outer_fd);
        }
        return Err(SandboxError::Step {
            step: "fork",
            source: e,
        });
    }
    if pid > 0 {
        outer(pid, waited);
    }
    // SAFETY: prctl, poll and close on our own fd; pthread_sigmask reads the saved mask.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        check(
            "PR_SET_PDEATHSIG",
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
        )?;
        // The outer process may have died before the prctl: then nobody would kill us.
        let mut pfd = libc::pollfd {
            fd: outer_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut pfd, 1, 0) > 0 {
            libc::_exit(1);
        }
        libc::close(outer_fd);
    }
    exit_on_termination_signals()
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

extern "C" fn exit_on_signal(sig: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + sig) }
}

/// As PID 1 of its namespace, the inner process would ignore a SIGTERM or SIGINT left at
/// SIG_DFL: those end it with status 128 + the signal instead, as they would end any other
/// process. (vmm-blk blocks both and takes them in a thread; that is unaffected.)
fn exit_on_termination_signals() -> Result<(), SandboxError> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: sigaction reads and writes the structs we pass; the handler only calls
        // _exit.
        unsafe {
            let mut current: libc::sigaction = std::mem::zeroed();
            check(
                "sigaction",
                libc::sigaction(sig, std::ptr::null(), &mut current),
            )?;
            if current.sa_sigaction != libc::SIG_DFL {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = exit_on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            check(
                "sigaction",
                libc::sigaction(sig, &action, std::ptr::null_mut()),
            )?;
        }
    }
    Ok(())
}

/// The outer process: close every fd above stderr (the inner process has them), install
/// its own seccomp allowlist, then forward SIGTERM and SIGINT to `inner` until it ends,
/// and exit with its status. `waited` is blocked.
fn outer(inner: libc::pid_t, waited: libc::sigset_t) -> ! {
    // SAFETY: close_range takes integers; the fds above 2 are copies the inner process
    // also holds, and this process never returns to code that owns them.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r < 0 {
        // Before Linux 5.9: the fds are below RLIMIT_NOFILE, which is small.
        for fd in 3..1024 {
            // SAFETY: as above.
            unsafe { libc::close(fd) };
        }
    }
    if let Err(e) = seccomp::install_outer(inner) {
        eprintln!("{}: {e}", program_name());
        // SAFETY: killing and reaping our own child, then exiting.
        unsafe {
            libc::kill(inner, libc::SIGKILL);
            libc::waitpid(inner, std::ptr::null_mut(), 0);
            libc::_exit(1);
        }
    }
    // From here on only the system calls `seccomp::install_outer` allows, and no
    // allocation.
    loop {
        // SAFETY: sigwaitinfo reads the set; a null siginfo pointer is allowed.
        let sig = unsafe { libc::sigwaitinfo(&waited, std::ptr::null_mut()) };
        if sig == libc::SIGTERM || sig == libc::SIGINT {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(inner, sig) };
        } else if sig == libc::SIGCHLD {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid writes the status we pass.
            let r = unsafe { libc::waitpid(inner, &mut status, libc::WNOHANG) };
            let code = if r == inner {
                if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else if libc::WIFSIGNALED(status) {
                    128 + libc::WTERMSIG(status)
                } else {
                    continue;
                }
            } else if r < 0 {
                // ECHILD: it is gone and we cannot know how.
                1
            } else {
                continue;
            };
            // SAFETY: exiting.
            unsafe { libc::_exit(code) };
        }
    }
}

/// A fresh tmpfs becomes `/`; the old root is detached, so no host path is reachable.
fn pivot_into_empty_root() -> Result<(), SandboxError> {
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let (none, root, tmpfs, old) = (c("none"), c("/"), c("tmpfs"), c("old"));
    let base = c("/tmp");
    // SAFETY: mount/chdir/mkdir/pivot_root/umount2 with valid C strings; they only act on
    // this process's (new) mount namespace.
    unsafe {
        // Nothing we do here may propagate back to the host's mounts.
        check(
            "make / private",
            libc::mount(
                none.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
        )?;
        // The new root: a small tmpfs mounted over /tmp in our namespace only.
        check(
            "mount the new root",
            libc::mount(
                tmpfs.as_ptr(),
                base.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c("size=64k,mode=0700").as_ptr().cast(),
            ),
        )?;
        check("chdir to the new root", libc::chdir(base.as_ptr()))?;
        check("mkdir old", libc::mkdir(old.as_ptr(), 0o700))?;
        check(
            "pivot_root",
            libc::syscall(libc::SYS_pivot_root, c(".").as_ptr(), old.as_ptr()) as libc::c_int,
        )?;
        check("chdir /", libc::chdir(root.as_ptr()))?;
        check(
            "detach the old root",
            libc::umount2(c("/old").as_ptr(), libc::MNT_DETACH),
        )?;
        check("rmdir old", libc::rmdir(c("/old").as_ptr()))?;
        // Read-only from here on.
        check(
            "remount read-only",
            libc::mount(
                none.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            ),
        )?;
    }
    Ok(())
}

/// The kernel's last capability number (63 if /proc does not say).
fn last_capability() -> libc::c_ulong {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(63)
}

/// Clear the bounding set, the ambient set, and the effective, permitted and
/// inheritable sets.
fn drop_capabilities(last: libc::c_ulong) -> Result<(), SandboxError> {
    for cap in 0..=last {
        // SAFETY: prctl with integer arguments; EINVAL for an unknown cap is ignored.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a v3 header and two data structs, which we pass.
    check("capset", unsafe {
        libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int
    })
}
