//! The device-process supervisor with a stand-in device (`device-echo`, built from
//! tests/src/bin): the child holds exactly stdin/stdout/stderr and its two sockets, talks
//! `ipc` on the control socket, is seen exiting through its pidfd, stops on SIGTERM, and
//! dies when its parent dies.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmm::supervisor::DeviceProcess;
use vmm_tests::device_echo::{Reply, Request};
use vmm_tests::wait_until;

const T: Duration = Duration::from_secs(10);

fn program() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_device-echo"))
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

#[test]
fn a_device_gets_exactly_its_sockets_and_speaks_ipc() {
    let mut dev = DeviceProcess::spawn("echo", &program(), &[]).unwrap();
    let mut ch: ipc::Channel<Request, Reply, ()> =
        ipc::Channel::new(dev.control.try_clone().unwrap());
    let hello = ch
        .hello(ipc::DeviceKind::Block, ipc::DeviceKind::Block, T)
        .unwrap();
    assert_eq!(hello.pid, dev.pid());
    let (reply, _) = ch.call(Request::Echo("hi".into()), &[], T).unwrap();
    assert_eq!(reply, Reply::Echo("hi".into()));
    // stdin, stdout, stderr, control, vhost-user (and the fd read_dir itself opens).
    let (reply, _) = ch.call(Request::OpenFds, &[], T).unwrap();
    let Reply::OpenFds(fds) = reply else {
        panic!("{reply:?}");
    };
    assert_eq!(&fds[..5], &[0, 1, 2, 3, 4], "{fds:?}");
    assert!(
        fds.len() <= 6,
        "only read_dir's own fd beyond those: {fds:?}"
    );
    // An exit is seen through the pidfd, with its status.
    ch.send(
        &ipc::Message::Request {
            id: 99,
            body: Request::Exit(7),
        },
        &[],
    )
    .unwrap();
    let status = dev.wait_exit(T).expect("the pidfd reports the exit");
    assert_eq!(status.code(), Some(7));
}

#[test]
fn terminate_stops_a_device() {
    let mut dev = DeviceProcess::spawn("echo", &program(), &[]).unwrap();
    let pid = dev.pid();
    assert!(alive(pid));
    assert!(dev.wait_exit(Duration::from_millis(100)).is_none());
    let status = dev.terminate(T).expect("an exit status");
    assert!(!status.success());
    assert!(!alive(pid));
}

#[test]
fn a_device_dies_with_its_parent() {
    let mut parent = Command::new(program())
        .arg("--spawn-child")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(parent.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let child: u32 = line.trim().parse().unwrap();
    assert!(alive(child));
    parent.kill().unwrap();
    parent.wait().unwrap();
    // The child was the parent's; once the parent is gone it is reparented and reaped
    // by init, so "gone" means kill(0) fails or it is a zombie about to be reaped.
    wait_until("the child to die with its parent", T, || {
        !alive(child)
            || std::fs::read_to_string(format!("/proc/{child}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    });
}

#[test]
fn a_missing_program_is_a_clear_error() {
    let err = vmm::supervisor::device_program("no-such-device").unwrap_err();
    assert!(err.to_string().contains("no-such-device"), "{err}");
}

#[test]
fn a_sandboxed_device_cannot_reach_host_files_or_the_network() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut dev = DeviceProcess::spawn("echo", &program(), &["--sandbox"]).unwrap();
    let mut ch: ipc::Channel<Request, Reply, ()> =
        ipc::Channel::new(dev.control.try_clone().unwrap());
    ch.hello(ipc::DeviceKind::Block, ipc::DeviceKind::Block, T)
        .unwrap();
    // Before the sandbox check, prove the requests themselves work from here.
    assert!(std::fs::File::open("/etc/passwd").is_ok());
    assert!(std::net::TcpStream::connect(&addr).is_ok());
    // The control socket still works inside.
    let (reply, _) = ch
        .call(Request::Echo("inside".into()), &[], T)
        .expect("the device failed to enter its sandbox (it needs root: namespaces, pivot_root)");
    assert_eq!(reply, Reply::Echo("inside".into()));
    let own_binary = program().display().to_string();
    // The root is an empty tmpfs: not even /dev/null exists.
    for path in [
        "/etc/passwd",
        "/proc/self/status",
        own_binary.as_str(),
        "/dev/null",
    ] {
        let (reply, _) = ch.call(Request::TryOpen(path.into()), &[], T).unwrap();
        assert!(
            matches!(reply, Reply::Outcome(Err(_))),
            "{path} opened inside the sandbox: {reply:?}"
        );
    }
    let (reply, _) = ch.call(Request::TryConnect(addr), &[], T).unwrap();
    assert!(
        matches!(reply, Reply::Outcome(Err(_))),
        "connected from inside the sandbox: {reply:?}"
    );
    dev.terminate(T);
}
