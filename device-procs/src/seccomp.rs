//! Per-process-kind seccomp allowlists. A system call outside the list kills the whole
//! process (SIGSYS); the supervisor sees it die and restarts it.
//!
//! Three filters are stacked (the kernel runs them all and the most severe answer wins:
//! kill, then an errno, then allow). The first makes `clone3` fail with ENOSYS, because
//! its flags live in memory where a filter cannot see them; glibc then falls back to
//! `clone`, whose flags the allowlist checks (threads only, no new processes). The second
//! answers the system calls that open files or create, bind or connect sockets with EPERM
//! ([`DENIED`]): none of them could succeed in the sandbox anyway, and an error rather
//! than a kill lets the sandbox self-test (see [`crate::sandbox`]) show they fail. The
//! third is the allowlist itself, which lets the [`DENIED`] calls through to that answer.
//!
//! The outer process of the sandbox (see [`crate::sandbox`]) has an allowlist of its own,
//! [`install_outer`].

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The process kinds with an allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `vmm-blk`: vhost-user-blk on a raw image fd.
    Block,
    /// `vmm-net` on taps and sockets it was given.
    Net,
    /// `vmm-net` for the user network: it makes host sockets of its own.
    NetUser,
    /// Standalone `vmm-net`: unix sockets for its relay, nothing else.
    NetRelay,
    /// `vmm-display`: VNC on sockets it was given.
    Display,
    /// The outer process of any sandbox (see [`install_outer`]).
    Outer,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: cannot build the {kind:?} filter: {source}")]
    Build {
        kind: Kind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("seccomp: cannot install the {kind:?} filter: {source}")]
    Install {
        kind: Kind,
        #[source]
        source: seccompiler::Error,
    },
    #[error("seccomp: no allowlist for this architecture")]
    Arch,
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Install `kind`'s filters on the calling thread (and so on every thread it starts
/// later). Call after `no_new_privs`, before starting threads.
pub fn install(kind: Kind) -> Result<(), SeccompError> {
    let arch = target_arch()?;
    let build = |source| SeccompError::Build { kind, source };
    let install = |source| SeccompError::Install { kind, source };

    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(build)?;
    let allow = SeccompFilter::new(
        rules(kind).map_err(build)?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(build)?;
    let denied: &[i64] = match kind {
        Kind::NetUser | Kind::NetRelay => DENIED_FILES,
        _ => DENIED,
    };
    let deny = SeccompFilter::new(
        denied.iter().map(|&s| (s, vec![])).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(build)?;
    let clone3: BpfProgram = clone3.try_into().map_err(build)?;
    let deny: BpfProgram = deny.try_into().map_err(build)?;
    let allow: BpfProgram = allow.try_into().map_err(build)?;
    // The allowlist last: installing a filter takes prctl and seccomp, which it forbids.
    seccompiler::apply_filter(&clone3).map_err(install)?;
    seccompiler::apply_filter(&deny).map_err(install)?;
    seccompiler::apply_filter(&allow).map_err(install)?;
    Ok(())
}

/// Opening files and making sockets: answered with EPERM (the allowlists let them through
/// to that answer). `vmm-blk` makes none of these calls; it accepts on the listener it
/// was given and works on fds it was handed.
pub const DENIED: &[i64] = &[
    #[cfg(target_arch = "x86_64")]
    libc::SYS_open,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_creat,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_open_by_handle_at,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
];

/// Opening files only: what the user network's process is denied (it makes sockets).
pub const DENIED_FILES: &[i64] = &[
    #[cfg(target_arch = "x86_64")]
    libc::SYS_open,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_creat,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_open_by_handle_at,
];

/// The outer process of the sandbox: it waits for the inner process `inner`, forwards
/// SIGTERM and SIGINT to it, and exits. Anything else kills it (and so, through
/// PR_SET_PDEATHSIG, the inner process).
pub fn install_outer(inner: libc::pid_t) -> Result<(), SeccompError> {
    let kind = Kind::Outer;
    let arch = target_arch()?;
    let build = |source| SeccompError::Build { kind, source };
    let filter = SeccompFilter::new(
        outer_rules(inner).map_err(build)?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(build)?;
    let filter: BpfProgram = filter.try_into().map_err(build)?;
    seccompiler::apply_filter(&filter).map_err(|source| SeccompError::Install { kind, source })
}

fn outer_rules(inner: libc::pid_t) -> Built<Rules> {
    let mut rules: Rules = [
        // sigwaitinfo
        libc::SYS_rt_sigtimedwait,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        // waitpid
        libc::SYS_wait4,
        libc::SYS_waitid,
        libc::SYS_exit_group,
        libc::SYS_exit,
    ]
    .iter()
    .map(|&s| (s, vec![]))
    .collect();
    // Signals to the inner process only.
    rules.insert(
        libc::SYS_kill,
        vec![SeccompRule::new(vec![eq(0, inner as u32 as u64)?])?],
    );
    Ok(rules)
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err(SeccompError::Arch)
    }
}

type Built<T> = Result<T, seccompiler::BackendError>;

/// Argument `arg` (32-bit) equals `value`.
fn eq(arg: u8, value: u64) -> Built<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// The bits `mask` of argument `arg` (64-bit) equal `value`.
fn masked(arg: u8, mask: u64, value: u64) -> Built<SeccompCondition> {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
}

/// One rule per value: argument `arg` is any of `values`.
fn any_of(arg: u8, values: &[u64]) -> Built<Vec<SeccompRule>> {
    values
        .iter()
        .map(|&v| SeccompRule::new(vec![eq(arg, v)?]))
        .collect()
}

fn rules(kind: Kind) -> Built<Rules> {
    match kind {
        Kind::Block => block_rules(),
        Kind::Net => net_rules(false),
        Kind::NetUser => net_rules(true),
        Kind::NetRelay => relay_rules(),
        Kind::Display => display_rules(),
        Kind::Outer => outer_rules(0),
    }
}

/// What `vmm-blk` does after entering its sandbox: the vhost-user protocol on unix
/// sockets (messages with fds), mapping guest memory, epoll and eventfds for the queues,
/// pread/pwrite/fdatasync/fallocate on the image, threads, signals for SIGTERM, and the
/// memory allocator. Found with `strace -f` on the integration tests (both modes).
fn block_rules() -> Built<Rules> {
    let always = [
        // I/O on fds we hold: sockets, eventfds, the image, stderr.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        // The format layer (imago's file driver): vectored I/O, and the file system's block
        // size for its zeroing and discard alignment.
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fstatfs,
        libc::SYS_lseek,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_close,
        // Unix sockets: vhost-user and control messages (with SCM_RIGHTS), accept.
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_accept4,
        libc::SYS_shutdown,
        // Queue notifications.
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        // Guest memory and the allocator (mmap and mprotect below).
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_mremap,
        // Threads.
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
        libc::SYS_sigaltstack,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_clock_gettime,
        // Growing the image (block_resize): its size, then ftruncate.
        libc::SYS_statx,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_ftruncate,
        // std::thread::sleep (time-outs and back-offs).
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
        // Signals: SIGTERM and SIGINT are blocked and taken with sigtimedwait.
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigtimedwait,
        // Answered with ENOSYS by the other filter; here it only has to pass.
        libc::SYS_clone3,
    ];
    let mut rules: Rules = always.iter().chain(DENIED).map(|&s| (s, vec![])).collect();

    // No executable memory.
    let no_exec = || -> Built<Vec<SeccompRule>> {
        Ok(vec![SeccompRule::new(vec![masked(
            2,
            libc::PROT_EXEC as u64,
            0,
        )?])?])
    };
    rules.insert(libc::SYS_mmap, no_exec()?);
    rules.insert(libc::SYS_mprotect, no_exec()?);
    // Threads, never processes.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![masked(0, thread, thread)?])?],
    );
    // Signals to our own threads only (abort() on a panic).
    rules.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![eq(
            0,
            u64::from(std::process::id()),
        )?])?],
    );
    rules.insert(
        libc::SYS_fcntl,
        any_of(
            1,
            &[
                libc::F_GETFD as u64,
                libc::F_GETFL as u64,
                libc::F_DUPFD_CLOEXEC as u64,
            ],
        )?,
    );
    // send() on connected sockets (no destination address).
    rules.insert(
        libc::SYS_sendto,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            4,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::Eq,
            0,
        )?])?],
    );
    // Reading a socket's receive timeout back (std does, around the backend channel's
    // requests to the frontend).
    rules.insert(
        libc::SYS_getsockopt,
        vec![SeccompRule::new(vec![eq(1, libc::SOL_SOCKET as u64)?])?],
    );
    // The control channel's receive timeout.
    rules.insert(
        libc::SYS_setsockopt,
        vec![SeccompRule::new(vec![
            eq(1, libc::SOL_SOCKET as u64)?,
            eq(2, libc::SO_RCVTIMEO as u64)?,
        ])?],
    );
    // Thread names.
    rules.insert(libc::SYS_prctl, any_of(0, &[libc::PR_SET_NAME as u64])?);
    Ok(rules)
}

/// The tun ioctls the data path makes on a tap it was given (QEMU's list without
/// TUNSETIFF, which opens one).
const TUN_IOCTLS: &[u64] = &[
    0x8004_54d2, // TUNGETIFF
    0x4004_54d8, // TUNSETVNETHDRSZ
    0x4004_54d0, // TUNSETOFFLOAD
    0x4004_54d9, // TUNSETQUEUE
    0x8004_54cf, // TUNGETFEATURES
];

/// What `vmm-net` does after entering its sandbox: the block process's calls for
/// vhost-user, threads and memory (see [`block_rules`]), readv/writev between taps and
/// guest memory, datagrams, a stream socket's poll loop, and the tun ioctls. With
/// `sockets` (the user network), libslirp's host sockets too. Found with `strace -f` on
/// the integration tests.
fn net_rules(sockets: bool) -> Built<Rules> {
    let mut rules = block_rules()?;
    for s in [
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fstatfs,
        libc::SYS_lseek,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_ftruncate,
    ] {
        rules.remove(&s);
    }
    for s in [
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_poll,
        libc::SYS_ppoll,
        // The TX coalescing timer.
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
    ] {
        rules.insert(s, vec![]);
    }
    rules.insert(libc::SYS_ioctl, any_of(1, TUN_IOCTLS)?);
    rules.insert(
        libc::SYS_fcntl,
        any_of(
            1,
            &[
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_DUPFD_CLOEXEC as u64,
            ],
        )?,
    );
    if sockets {
        for s in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_sendto,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_uname,
            // libslirp accepts hostfwd connections with accept(2).
            libc::SYS_accept,
            // glib (under libslirp) asks, once.
            libc::SYS_getppid,
        ] {
            rules.insert(s, vec![]);
        }
        // libslirp asks how much a socket holds.
        rules.insert(
            libc::SYS_ioctl,
            any_of(1, &[TUN_IOCTLS, &[libc::FIONREAD, libc::FIONBIO]].concat())?,
        );
    }
    Ok(rules)
}

/// What `vmm-display` does: [`net_rules`] without the tun ioctls, plus accepting
/// clients, asking sockets about their peers and types, and socket timeouts. It makes no
/// sockets and opens no files.
fn display_rules() -> Built<Rules> {
    let mut rules = net_rules(false)?;
    rules.remove(&libc::SYS_ioctl);
    for s in [
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_getpeername,
        libc::SYS_getsockname,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_shutdown,
        libc::SYS_sendto,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_getrandom,
    ] {
        rules.insert(s, vec![]);
    }
    Ok(rules)
}

/// Standalone `vmm-net`'s: [`net_rules`] and unix sockets only (the relay's listener
/// and connection, inside the sandbox's network namespace).
fn relay_rules() -> Built<Rules> {
    let mut rules = net_rules(false)?;
    rules.insert(libc::SYS_socket, any_of(0, &[libc::AF_UNIX as u64])?);
    for s in [
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_connect,
        libc::SYS_getsockname,
    ] {
        rules.insert(s, vec![]);
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile() {
        let arch = target_arch().unwrap();
        for kind in [
            Kind::Block,
            Kind::Net,
            Kind::NetUser,
            Kind::NetRelay,
            Kind::Outer,
        ] {
            let filter = SeccompFilter::new(
                rules(kind).unwrap(),
                SeccompAction::KillProcess,
                SeccompAction::Allow,
                arch,
            )
            .unwrap();
            let prog: BpfProgram = filter.try_into().unwrap();
            assert!(
                prog.len() < 4096,
                "BPF programs are limited to 4096 instructions"
            );
        }
    }

    #[test]
    fn the_denied_calls_reach_their_errno_through_the_block_allowlist() {
        let rules = rules(Kind::Block).unwrap();
        for s in DENIED {
            assert_eq!(rules.get(s).map(Vec::len), Some(0), "syscall {s}");
        }
    }
}
