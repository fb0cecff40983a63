//! `vmm-scsi` behind QEMU 7.2's `vhost-user-scsi-pci`, with the stock Debian 6.1 guest
//! (virtio_scsi, sr_mod, cdrom, isofs from `scripts/guest-assets`) under TCG: the guest
//! finds a removable CD-ROM, mounts the ISO and reads it; the vmm's `eject` is refused
//! while the guest has it mounted (locked) and works once unmounted; a `change` to another
//! ISO is seen by the guest; the guest's cdrom driver opens and closes the tray
//! (DEVICE_TRAY_MOVED events). This test plays the vmm on the control channel.
//!
//! Skipped, with a message, without qemu-system-x86_64, the guest assets
//! (`scripts/guest-assets`) or an ISO maker (genisoimage or xorriso).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipc::scsi::{ScsiChannel, ScsiEvent, ScsiReply, ScsiRequest};
use ipc::{DeviceKind, Message};

const BIN: &str = env!("CARGO_BIN_EXE_vmm-scsi");
const T: Duration = Duration::from_secs(20);
const BOOT: Duration = Duration::from_secs(60);

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An ISO 9660 image with readme.txt holding `text`, or None without a tool.
fn make_iso(dir: &Path, name: &str, text: &str) -> Option<PathBuf> {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).ok()?;
    std::fs::write(src.join("readme.txt"), text).ok()?;
    let iso = dir.join(format!("{name}.iso"));
    for (tool, args) in [
        ("genisoimage", vec!["-quiet", "-V", name, "-o"]),
        (
            "xorriso",
            vec!["-as", "mkisofs", "-quiet", "-V", name, "-o"],
        ),
    ] {
        let ok = Command::new(tool)
            .args(&args)
            .arg(&iso)
            .arg(&src)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(iso);
        }
    }
    None
}

/// A copy of `fd` numbered 10 or above, closed on exec.
fn high_fd(fd: &impl AsFd) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC on an open fd returns a new fd that we own.
    let n = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    assert!(n >= 10);
    // SAFETY: just created, owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(n) }
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// vmm-scsi with `control` at fd 3 and `listener` at fd 4.
fn spawn_scsi(control: UnixStream, listener: &UnixListener) -> Killed {
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
    Killed(cmd.spawn().unwrap())
}

/// The guest's serial console: everything it printed, and its input.
struct Console {
    out: Arc<Mutex<String>>,
    input: ChildStdin,
    /// Where the next `expect` starts looking.
    seen: usize,
}

impl Console {
    /// Wait for `pattern` after what was already matched; the text up to it.
    fn expect(&mut self, pattern: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let out = self.out.lock().unwrap();
                if let Some(at) = out[self.seen..].find(pattern) {
                    let text = out[self.seen..self.seen + at].to_owned();
                    self.seen += at + pattern.len();
                    return text;
                }
                if Instant::now() > deadline {
                    panic!(
                        "no {pattern:?} on the console; it shows:\n{}",
                        &out[self.seen.saturating_sub(4000)..]
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run a shell command in the guest; its output and exit status.
    fn run(&mut self, cmd: &str) -> (String, i32) {
        // The marker is split so that the echoed command line does not match.
        writeln!(self.input, "{cmd}; echo @@DO''NE-$?-").unwrap();
        self.input.flush().unwrap();
        let out = self.expect("@@DONE-", T * 3);
        let status = self.expect("-", T);
        (out, status.trim().parse().unwrap_or(-1))
    }
}

fn next_event(ch: &mut ScsiChannel) -> ScsiEvent {
    match ch.recv(Some(T)).expect("an event") {
        (Message::Event(ev), _) => ev,
        (other, _) => panic!("expected an event, got {other:?}"),
    }
}

fn tray(open: bool) -> ScsiEvent {
    ScsiEvent::TrayMoved {
        id: "cd0".into(),
        tray_open: open,
    }
}

#[test]
fn a_linux_guest_under_qemu_uses_the_cdrom() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let kernel = root.join("target/guest/vmlinuz");
    let initrd = root.join("target/guest/initramfs.img");
    if !kernel.exists() || !initrd.exists() {
        eprintln!("skipped: no guest assets (run scripts/guest-assets)");
        return;
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no qemu-system-x86_64");
        return;
    }
    let dir = Dir(std::env::temp_dir().join(format!("vmm-scsi-qemu-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (Some(iso1), Some(iso2)) = (
        make_iso(&dir.0, "FIRST", "text of the first disc\n"),
        make_iso(&dir.0, "SECOND", "the second disc speaks\n"),
    ) else {
        eprintln!("skipped: neither genisoimage nor xorriso is installed");
        return;
    };

    // The vmm's part: start vmm-scsi, one LUN with the first disc from power-on.
    let socket = dir.0.join("scsi.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let _scsi = spawn_scsi(theirs, &listener);
    drop(listener);
    let mut ch = ScsiChannel::new(ours);
    ch.hello(DeviceKind::Block, DeviceKind::Block, T).unwrap();
    ch.call(
        ScsiRequest::AttachController {
            num_queues: 1,
            queue_size: 128,
        },
        &[],
        T,
    )
    .unwrap();
    let f1 = File::open(&iso1).unwrap();
    let add = ScsiRequest::AddCdrom {
        target: 0,
        lun: 0,
        id: "cd0".into(),
        serial: String::new(),
    };
    ch.call(add, &[f1.as_fd()], T).unwrap();

    let qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35,accel=tcg,memory-backend=mem", "-m", "512M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1"])
        .arg("-chardev")
        .arg(format!("socket,id=vus,path={}", socket.display()))
        .args(["-device", "vhost-user-scsi-pci,chardev=vus,num_queues=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut qemu = Killed(qemu);
    let out = Arc::new(Mutex::new(String::new()));
    let mut stdout = qemu.0.stdout.take().unwrap();
    std::thread::spawn({
        let out = out.clone();
        move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    let mut con = Console {
        out,
        input: qemu.0.stdin.take().unwrap(),
        seen: 0,
    };
    con.expect("GUEST-READY", BOOT);
    // No prompt and no echo in the output.
    con.run("export PS1=''; stty -echo 2>/dev/null");
    let (_, rc) = con
        .run("for i in $(seq 100); do [ -b /dev/sr0 ] && break; sleep 0.2; done; [ -b /dev/sr0 ]");
    assert_eq!(rc, 0, "no /dev/sr0");
    let (dmesg, _) = con.run("dmesg | grep -i -e sr0 -e 'scsi 0:0:0:0' -e 'sr 0:0:0:0'");
    eprintln!("guest: {dmesg}");
    assert!(dmesg.contains("CD-ROM"), "{dmesg}");
    let (removable, _) = con.run("cat /sys/block/sr0/removable");
    assert_eq!(removable.trim(), "1");

    // The guest mounts the disc: the medium is locked.
    let (text, rc) =
        con.run("mkdir -p /mnt && mount -t iso9660 -o ro /dev/sr0 /mnt && cat /mnt/readme.txt");
    assert_eq!(rc, 0, "{text}");
    assert!(text.contains("text of the first disc"), "{text}");
    let eject = |force| ScsiRequest::Eject {
        target: 0,
        lun: 0,
        force,
    };
    let (reply, _) = ch.call(eject(false), &[], T).unwrap();
    assert_eq!(reply, ScsiReply::Locked);

    // Unmounted, it is unlocked: eject works, and the guest finds no medium.
    let (_, rc) = con.run("umount /mnt");
    assert_eq!(rc, 0);
    let (reply, _) = ch.call(eject(false), &[], T).unwrap();
    assert_eq!(reply, ScsiReply::Ejected);
    assert_eq!(ch.take_event().map(|e| e.0), Some(tray(true)));
    let (out, rc) = con.run("dd if=/dev/sr0 of=/dev/null bs=2048 count=1");
    assert_ne!(rc, 0, "{out}");

    // QMP change: the second disc.
    let f2 = File::open(&iso2).unwrap();
    let (reply, _) = ch
        .call(
            ScsiRequest::InsertMedium { target: 0, lun: 0 },
            &[f2.as_fd()],
            T,
        )
        .unwrap();
    assert!(matches!(reply, ScsiReply::Inserted { .. }), "{reply:?}");
    assert_eq!(ch.take_event().map(|e| e.0), Some(tray(false)));
    let (text, rc) =
        con.run("mount -t iso9660 -o ro /dev/sr0 /mnt && cat /mnt/readme.txt; umount /mnt");
    assert_eq!(rc, 0, "{text}");
    assert!(text.contains("the second disc speaks"), "{text}");

    // The guest's own eject and close (busybox has no eject: the cdrom driver's
    // autoeject on release, then its autoclose on open, send START STOP UNIT).
    let (out, rc) = con.run(
        "echo 1 >/proc/sys/dev/cdrom/autoeject && dd if=/dev/sr0 of=/dev/null bs=2048 count=1; \
         echo 0 >/proc/sys/dev/cdrom/autoeject",
    );
    assert_eq!(rc, 0, "{out}");
    assert_eq!(next_event(&mut ch), tray(true));
    let (out, rc) = con.run("dd if=/dev/sr0 of=/dev/null bs=2048 count=1");
    assert_eq!(rc, 0, "{out}");
    assert_eq!(next_event(&mut ch), tray(false));
    let (text, rc) =
        con.run("mount -t iso9660 -o ro /dev/sr0 /mnt && cat /mnt/readme.txt; umount /mnt");
    assert_eq!(rc, 0, "{text}");
    assert!(text.contains("the second disc speaks"), "{text}");
}
