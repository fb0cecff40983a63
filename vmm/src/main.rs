//! `vmm`: the central VMM process. See `vmm -h` and the README.

fn main() {
    // A panic is a bug: the process ends at once (the device processes die with it)
    // rather than going on with a thread gone and the locks it held.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    raise_fd_limit();
    let code = vmm::launch::main_entry(std::env::args().skip(1));
    std::process::exit(code);
}

/// Take the hard limit on open files as the soft one: the vmm holds a few fds per device,
/// per monitor connection (at most 256 per socket) and per descriptor a client passes (at
/// most 64 per connection), more than the usual soft limit of 1024 in the worst case. The
/// device processes set their own, lower limits in their sandbox.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write the one struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
