//! Process behaviour of the `vmm` binary with a tiny KVM guest: -daemonize and -pidfile,
//! orderly exit on SIGTERM (also with a closed stderr, under emu), and serial output on a
//! unix socket chardev.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vmm_tests::guest::hanging_guest;
use vmm_tests::{require_kvm, run_vmm, spawn_vmm, wait_until, wait_with_timeout, TempDir};

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn daemonize_writes_a_pidfile_and_sigterm_ends_it_cleanly() {
    require_kvm!();
    let dir = TempDir::new("daemon");
    let kernel = hanging_guest(&dir, "up\n");
    let pidfile = dir.join("vmm.pid");
    let serial = dir.join("serial.out");
    let serial_arg = format!("file:{}", serial.display());
    let done = run_vmm(
        &[
            "-accel",
            "kvm",
            "-m",
            "32",
            "-nodefaults",
            "-display",
            "none",
            "-kernel",
            &kernel,
            "-serial",
            &serial_arg,
            "-daemonize",
            "-pidfile",
            pidfile.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(
        done.status.code(),
        Some(0),
        "parent exits 0 once the child runs: {}",
        done.stderr
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid), "the daemon {pid} is running");
    wait_until("guest output", Duration::from_secs(30), || {
        std::fs::read_to_string(&serial).unwrap_or_default() == "up\n"
    });
    // A second instance may not take the same pidfile.
    let second = run_vmm(
        &[
            "-accel",
            "kvm",
            "-m",
            "32",
            "-kernel",
            &kernel,
            "-pidfile",
            pidfile.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(second.status.code(), Some(1));
    assert!(second.stderr.contains("PID file"), "{}", second.stderr);

    // SAFETY: sending SIGTERM to the daemon we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_until("the daemon to exit", Duration::from_secs(30), || {
        !alive(pid)
    });
    assert!(!pidfile.exists(), "the pidfile is removed at exit");
}

#[test]
fn sigterm_exits_with_status_0_and_says_why() {
    require_kvm!();
    let dir = TempDir::new("sigterm");
    let kernel = hanging_guest(&dir, "x");
    let serial = dir.join("serial.out");
    let serial_arg = format!("file:{}", serial.display());
    let child = spawn_vmm(&[
        "-accel",
        "kvm",
        "-m",
        "32",
        "-nodefaults",
        "-kernel",
        &kernel,
        "-serial",
        &serial_arg,
    ]);
    wait_until("guest output", Duration::from_secs(30), || {
        std::fs::read_to_string(&serial).unwrap_or_default() == "x"
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let done = wait_with_timeout(child, Duration::from_secs(30));
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
    assert!(
        done.stderr.contains("terminating on signal 15"),
        "{}",
        done.stderr
    );
}

#[test]
fn serial_on_a_unix_socket_server() {
    require_kvm!();
    let dir = TempDir::new("unixserial");
    let kernel = hanging_guest(&dir, "over the socket\n");
    let sock = dir.join("serial.sock");
    // The old spelling; the guest's output waits for no one (wait=off), so connect first
    // by starting the vmm paused-free and retrying until the socket exists.
    let serial_arg = format!("unix:{},server=on,wait=on", sock.display());
    let child = spawn_vmm(&[
        "-accel",
        "kvm",
        "-m",
        "32",
        "-nodefaults",
        "-kernel",
        &kernel,
        "-serial",
        &serial_arg,
    ]);
    wait_until("the socket", Duration::from_secs(30), || sock.exists());
    let mut stream = UnixStream::connect(&sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !got.ends_with(b"socket\n") {
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "socket closed early; got {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"over the socket\n");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let done = wait_with_timeout(child, Duration::from_secs(30));
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
    assert!(!sock.exists(), "the listening socket is removed at exit");
}

/// A management program may close our stderr (a dead log pipe). SIGTERM must still end
/// the vmm with status 0: before `report!`, the signal thread panicked writing its
/// message and the vmm hung.
#[test]
fn sigterm_with_a_closed_stderr_still_exits() {
    let dir = TempDir::new("sigterm-stderr");
    let kernel = hanging_guest(&dir, "y");
    let serial = dir.join("serial.out");
    let serial_arg = format!("file:{}", serial.display());
    let mut child = std::process::Command::new(vmm_tests::vmm_binary())
        .args([
            "-accel",
            "emu",
            "-m",
            "32",
            "-nodefaults",
            "-kernel",
            &kernel,
        ])
        .args(["-serial", &serial_arg])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("guest output", Duration::from_secs(30), || {
        std::fs::read_to_string(&serial).unwrap_or_default() == "y"
    });
    drop(child.stderr.take());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let done = wait_with_timeout(child, Duration::from_secs(30));
    assert_eq!(done.status.code(), Some(0));
}
