//! `vmm-blk` as the vmm's supervisor starts it: control socket at fd 3, listening
//! vhost-user socket at fd 4. This test plays the vmm: hello, Attach with the image fd
//! (and refused Attach requests), vhost-user connections one after another, and exit when
//! the control socket closes.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipc::blk::{AttachConfig, BlkChannel, BlkReply, BlkRequest};
use ipc::{DeviceKind, IpcError};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;

const BIN: &str = env!("CARGO_BIN_EXE_vmm-blk");
const T: Duration = Duration::from_secs(20);

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A copy of `fd` numbered 10 or above, closed on exec.
fn high_fd(fd: &impl AsFd) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC on an open fd returns a new fd that we own.
    let n = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    assert!(n >= 10);
    // SAFETY: just created, owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(n) }
}

/// Start vmm-blk with `control` at fd 3 and `listener` at fd 4.
fn spawn(control: UnixStream, listener: &UnixListener) -> Child {
    let control = high_fd(&control);
    let listener = high_fd(listener);
    let (c, l): (RawFd, RawFd) = (control.as_raw_fd(), listener.as_raw_fd());
    let mut cmd = Command::new(BIN);
    cmd.stdin(Stdio::null());
    // SAFETY: the closure runs in the child before exec and only calls dup2, which is
    // async-signal-safe, on fds that exist there (10 and above, so never 3 or 4).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(c, 3) < 0 || libc::dup2(l, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn attach(readonly: bool) -> BlkRequest {
    BlkRequest::Attach(AttachConfig {
        readonly,
        serial: "sup".into(),
        num_queues: 1,
        queue_size: 128,
        error_policy: Default::default(),
    })
}

#[test]
fn hello_attach_serve_and_exit_with_the_control_socket() {
    let dir = Dir(std::env::temp_dir().join(format!("vmm-blk-sup-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let image = dir.0.join("disk.img");
    std::fs::write(&image, vec![0u8; 64 * 1024 + 7]).unwrap();
    let socket = dir.0.join("vhost.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut child = spawn(theirs, &listener);
    drop(listener);

    let mut ch = BlkChannel::new(ours);
    let hello = ch
        .hello(DeviceKind::Block, DeviceKind::Block, T)
        .expect("hello");
    // It serves as PID 1 of its own PID namespace (see `device_procs::sandbox`).
    assert_eq!(hello.pid, 1);

    // Refused: no fd; a read-only fd for a writable disk; a bad queue size.
    let err = ch.call(attach(false), &[], T).unwrap_err();
    assert!(err.to_string().contains("exactly one fd"), "{err}");
    let ro = File::open(&image).unwrap();
    let err = ch.call(attach(false), &[ro.as_fd()], T).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    let bad = BlkRequest::Attach(AttachConfig {
        readonly: false,
        serial: String::new(),
        num_queues: 1,
        queue_size: 100,
        error_policy: Default::default(),
    });
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let err = ch.call(bad, &[rw.as_fd()], T).unwrap_err();
    assert!(err.to_string().contains("queue size"), "{err}");

    // Accepted: a read-only disk (the partial last sector is not served).
    let (reply, _) = ch.call(attach(true), &[ro.as_fd()], T).unwrap();
    assert_eq!(
        reply,
        BlkReply::Attached {
            size: 64 * 1024,
            encrypted: false
        }
    );
    let err = ch.call(attach(true), &[ro.as_fd()], T).unwrap_err();
    assert!(
        matches!(&err, IpcError::Remote(e) if e.0.contains("already attached")),
        "{err}"
    );

    for _ in 0..2 {
        let mut fe = Frontend::connect(&socket, 1).unwrap();
        let features = fe.get_features().unwrap();
        assert!(features & (1 << VIRTIO_BLK_F_RO) != 0, "{features:#x}");
        fe.set_owner().unwrap();
        fe.set_features(features).unwrap();
        fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG)
            .unwrap();
        let (_, config) = fe
            .get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8])
            .unwrap();
        assert_eq!(u64::from_le_bytes(config[..8].try_into().unwrap()), 128);
    }

    // The vmm goes away: so does the device process, cleanly.
    drop(ch);
    let status = wait_exit(&mut child, T).expect("vmm-blk outlived its control socket");
    assert!(status.success(), "{status}");
}

#[test]
fn started_by_hand_it_says_so() {
    // Without a descriptor 3 (another test of this binary may have one open right now).
    let out = Command::new("sh")
        .args(["-c", "exec 3>&- \"$0\"", BIN])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("started by the vmm"), "{stderr}");
}
