//! The sandbox a device process enters before it serves: new mount, ipc, uts and
//! (except for the net process) net namespaces; the root pivoted into an empty, read-only
//! tmpfs; no_new_privs; every capability dropped; limits on open files, processes, and
//! private and total memory; and, for the real device programs, a seccomp allowlist that
//! kills the process on any other system call (see [`crate::seccomp`]). After `enter`, the
//! process holds only the fds it already had (its sockets, and what the vmm passes it over
//! them) and cannot open host files or reach the network.

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

/// Enter the sandbox. Call once, after taking the inherited sockets and before serving;
/// single-threaded (unshare(CLONE_NEWNS) refuses a process that shares its fs state).
pub fn enter(profile: Profile) -> Result<(), SandboxError> {
    // No CLONE_NEWPID: unsharing it puts only later children in the new namespace, not
    // this process, and once it is unshared the kernel refuses to create threads
    // (clone(CLONE_THREAD) fails with EINVAL), which the device processes need. They start
    // no processes (the seccomp filter allows threads only).
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !profile.keep_network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare takes flags only.
    check("unshare", unsafe { libc::unshare(flags) })?;
    pivot_into_empty_root()?;
    // SAFETY: prctl with integer arguments.
    check("no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
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
    drop_capabilities()?;
    if let Some(kind) = profile.seccomp {
        seccomp::install(kind)?;
    }
    Ok(())
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

/// Clear the bounding set, the ambient set, and the effective, permitted and
/// inheritable sets.
fn drop_capabilities() -> Result<(), SandboxError> {
    // The kernel's last capability number.
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(63);
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
