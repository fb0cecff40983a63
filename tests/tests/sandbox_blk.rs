//! The sandbox of a real `vmm-blk` (and of a `vmm-scsi`, the other process kind) started
//! by the vmm (see `device_procs::sandbox`): the
//! process the vmm reports (the outer one) and the one that serves (the inner one, PID 1
//! of its own PID namespace) run under seccomp with no_new_privs and no capabilities, in
//! namespaces and a root of their own; the inner one holds only its sockets and what it
//! was handed, and its self-test (VMM_SANDBOX_SELFTEST=1) shows that opening a host file
//! and creating a socket fail. A kill -9 of the outer process takes the inner one with it,
//! and the vmm starts a new pair; a quit stops both through SIGTERM.
//!
//! Needs root (namespaces, pivot_root), like the vmm's device processes.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_tests::qmp::Qmp;
use vmm_tests::{wait_until, TempDir};

const T: Duration = Duration::from_secs(20);
const QUERY_PROCESSES: &str = "__org.vmm_query-device-processes";

/// The self-test lines of `program`: a host file is not there without seccomp and cannot
/// be opened under it, and no socket can be made.
fn probes(program: &str) -> [String; 3] {
    [
        format!(
            "{program}: sandbox self-test: without seccomp: open(\"/etc/passwd\") failed: \
             No such file or directory"
        ),
        format!(
            "{program}: sandbox self-test: open(\"/etc/passwd\") failed: Operation not permitted"
        ),
        format!("{program}: sandbox self-test: socket(AF_INET) failed: Operation not permitted"),
    ]
}

/// A vmm with one device process and no guest (qtest accelerator): a virtio-blk disk, or
/// with `cdrom` a virtio-scsi controller with a CD-ROM; the sandbox self-test on, stderr in
/// a file.
struct Vmm {
    child: Option<Child>,
    _qtest: UnixStream,
    qmp: Qmp<UnixStream>,
    image: PathBuf,
    stderr: PathBuf,
    _dir: TempDir,
}

impl Vmm {
    fn start() -> Vmm {
        Self::start_with(false)
    }

    fn start_with(cdrom: bool) -> Vmm {
        let dir = TempDir::new("sandbox-blk");
        let image = dir.join("disk.raw");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let qtest_sock = dir.join("qtest.sock");
        let qmp_sock = dir.join("qmp.sock");
        let stderr = dir.join("vmm.stderr");
        let listener = UnixListener::bind(&qtest_sock).unwrap();
        listener.set_nonblocking(true).unwrap();
        let drive = format!("file={},if=none,id=d0,format=raw", image.display());
        let devices: Vec<String> = if cdrom {
            vec![
                "-device".into(),
                "virtio-scsi-pci,id=scsi0".into(),
                "-drive".into(),
                format!("{drive},media=cdrom"),
                "-device".into(),
                "scsi-cd,drive=d0,id=cd0".into(),
            ]
        } else {
            vec![
                "-drive".into(),
                drive,
                "-device".into(),
                "virtio-blk-pci,drive=d0,id=disk0".into(),
            ]
        };
        let mut child = Command::new(vmm_tests::vmm_binary())
            .args(["-accel", "qtest", "-qtest"])
            .arg(format!("unix:{}", qtest_sock.display()))
            .args(["-m", "128M", "-nodefaults", "-display", "none"])
            .args(&devices)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
            .env("VMM_SANDBOX_SELFTEST", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + T;
        let qtest = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept the vmm's qtest connection: {e}"),
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the vmm exited ({status}): {}",
                    vmm_tests::read_file(&stderr)
                );
            }
            assert!(Instant::now() < deadline, "the vmm did not connect");
            std::thread::sleep(Duration::from_millis(10));
        };
        let qmp = Qmp::connect(&qmp_sock);
        Vmm {
            child: Some(child),
            _qtest: qtest,
            qmp,
            image,
            stderr,
            _dir: dir,
        }
    }

    /// The one device process as `__org.vmm_query-device-processes` reports it.
    fn process(&mut self) -> Value {
        let list = self.qmp.ok(QUERY_PROCESSES, None);
        let list = list.as_array().cloned().unwrap_or_default();
        assert_eq!(list.len(), 1, "{list:?}");
        list[0].clone()
    }

    /// The pid the vmm reports for the disk's process, once it runs.
    fn outer_pid(&mut self) -> u32 {
        let p = self.process();
        assert_eq!(p["state"], "running", "{p}");
        let pid = p["pid"].as_u64().expect("a pid");
        u32::try_from(pid).expect("a pid")
    }

    fn stderr(&self) -> String {
        vmm_tests::read_file(&self.stderr)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The only child of `pid` (the inner process of the sandbox), once there is one.
fn inner_of(outer: u32) -> u32 {
    let mut children = Vec::new();
    wait_until("the inner process", T, || {
        children = children_of(outer);
        !children.is_empty()
    });
    assert_eq!(children.len(), 1, "children of {outer}: {children:?}");
    children[0]
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Some thread of process `pid` has not exited yet. (A thread-group leader shows as a
/// zombie while its other threads are still exiting, holding the process's files.)
fn alive(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.starts_with(" Z"))
        })
    })
}

/// The value of `field` in /proc/PID/status.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn assert_confined(pid: u32, what: &str) {
    assert_eq!(
        status_field(pid, "Seccomp"),
        "2",
        "{what} {pid}: seccomp filter"
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{what} {pid}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let value = status_field(pid, caps);
        assert!(
            u64::from_str_radix(&value, 16) == Ok(0),
            "{what} {pid}: {caps} {value}"
        );
    }
}

fn ns(pid: &str, name: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{name}")).unwrap()
}

/// (dev, ino) of a process's root directory.
fn root_of(pid: &str) -> (u64, u64) {
    let m = std::fs::metadata(format!("/proc/{pid}/root")).unwrap();
    (m.dev(), m.ino())
}

fn fds(pid: u32) -> Vec<(i32, String)> {
    let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect();
    fds.sort();
    fds
}

#[test]
fn the_block_process_runs_sandboxed_in_two_processes() {
    assert_sandboxed(Vmm::start(), "vmm-blk");
}

#[test]
fn the_cdrom_process_runs_sandboxed_in_two_processes() {
    assert_sandboxed(Vmm::start_with(true), "vmm-scsi");
}

/// Everything the sandbox promises, for the one device process of `vmm` (`program`).
fn assert_sandboxed(mut vmm: Vmm, program: &str) {
    let outer = vmm.outer_pid();
    let inner = inner_of(outer);
    let (outer_s, inner_s) = (outer.to_string(), inner.to_string());

    // Seccomp, no_new_privs, no capabilities: both.
    assert_confined(outer, "outer");
    assert_confined(inner, "inner");

    // Namespaces: both are in new mount, ipc, uts and net namespaces (the same ones);
    // the inner process is PID 1 of a new PID namespace, the outer one's
    // pid_for_children. (A process cannot leave its own PID namespace: the outer one is
    // in ours.)
    for name in ["mnt", "ipc", "uts", "net"] {
        assert_ne!(ns(&inner_s, name), ns("self", name), "{name}");
        assert_eq!(ns(&outer_s, name), ns(&inner_s, name), "{name}");
    }
    assert_ne!(ns(&inner_s, "pid"), ns("self", "pid"));
    assert_eq!(ns(&outer_s, "pid_for_children"), ns(&inner_s, "pid"));
    assert_eq!(ns(&outer_s, "pid"), ns("self", "pid"));
    let nspid = status_field(inner, "NSpid");
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "NSpid {nspid}");

    // Their root is not ours (an empty tmpfs), and it is the same one.
    assert_ne!(root_of(&inner_s), root_of("self"));
    assert_eq!(root_of(&outer_s), root_of(&inner_s));

    // Limits (sandbox::Profile::BLOCK).
    let limits = std::fs::read_to_string(format!("/proc/{inner}/limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        nofile.split_whitespace().collect::<Vec<_>>()[3..5],
        ["256", "256"],
        "{nofile}"
    );

    // The outer process keeps only stdin, stdout and stderr.
    let outer_fds: Vec<i32> = fds(outer).into_iter().map(|(fd, _)| fd).collect();
    assert_eq!(outer_fds, [0, 1, 2]);
    // The inner one: those, its two sockets, and what the backend made or was handed
    // (sockets, eventfds, epoll, guest memory memfds, the image). Nothing else names a
    // file of the host.
    let inner_fds = fds(inner);
    let numbers: Vec<i32> = inner_fds.iter().map(|(fd, _)| *fd).collect();
    assert_eq!(numbers[..5], [0, 1, 2, 3, 4], "{inner_fds:?}");
    let image = vmm.image.canonicalize().unwrap();
    let stderr = vmm.stderr.canonicalize().unwrap();
    let mut images = 0;
    for (fd, target) in &inner_fds {
        let ok = match fd {
            0 | 1 => target == "/dev/null",
            2 => Path::new(target) == stderr,
            3 | 4 => target.starts_with("socket:["),
            _ if Path::new(target) == image => {
                images += 1;
                true
            }
            _ => {
                target.starts_with("socket:[")
                    || target.starts_with("anon_inode:")
                    || target.starts_with("/memfd:")
            }
        };
        assert!(ok, "inner fd {fd} -> {target}; all: {inner_fds:?}");
    }
    assert_eq!(images, 1, "the image fd: {inner_fds:?}");

    // The self-test: a host file cannot be opened (not there without seccomp, EPERM
    // under it), a socket cannot be made.
    let [without, open, socket] = probes(program);
    wait_until("the self-test lines", T, || vmm.stderr().contains(&socket));
    let text = vmm.stderr();
    for line in [&without, &open, &socket] {
        assert!(text.contains(line.as_str()), "missing {line:?} in: {text}");
    }
    assert!(!text.contains("SUCCEEDED"), "{text}");

    // quit: the vmm sends the outer process SIGTERM, which it forwards; both end
    // without the vmm having to kill them.
    vmm.qmp.send("quit", None);
    let mut child = vmm.child.take().unwrap();
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the vmm did not quit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}: {}", vmm.stderr());
    assert!(!alive(outer) && !alive(inner));
    let text = vmm.stderr();
    assert!(!text.contains("did not stop"), "{text}");
}

#[test]
fn killing_the_outer_process_ends_the_inner_one_and_the_vmm_starts_another() {
    let mut vmm = Vmm::start();
    let outer = vmm.outer_pid();
    let inner = inner_of(outer);
    // SAFETY: kill with a pid and a signal number; the pid is the vmm's child, alive.
    assert_eq!(unsafe { libc::kill(outer as i32, libc::SIGKILL) }, 0);
    wait_until("the inner process to die with the outer one", T, || {
        !alive(inner)
    });

    let mut restarted = Value::Null;
    wait_until("the vmm to start a new process", T, || {
        restarted = vmm.process();
        restarted["state"] == "running" && restarted["pid"].as_u64() != Some(u64::from(outer))
    });
    assert_eq!(restarted["restarts"], 1, "{restarted}");
    let new_outer = vmm.outer_pid();
    let new_inner = inner_of(new_outer);
    assert_ne!(new_inner, inner);
    assert_confined(new_outer, "outer");
    assert_confined(new_inner, "inner");
    wait_until("the new process's self-test", T, || {
        vmm.stderr().matches(probes("vmm-blk")[2].as_str()).count() == 2
    });
    assert!(!vmm.stderr().contains("SUCCEEDED"), "{}", vmm.stderr());
}

/// A process that keeps crashing is restarted with a growing back-off, each step reported
/// (EXITED, then RESTARTED with the new pid), until the sixth crash within a minute: then
/// FAILED, the device is marked failed, and the VM runs on.
#[test]
fn a_process_that_keeps_crashing_is_marked_failed() {
    let mut vmm = Vmm::start();
    let mut outer = vmm.outer_pid();
    for round in 1..=6u64 {
        // SAFETY: kill with a pid and a signal number; the pid is the vmm's child, alive.
        assert_eq!(unsafe { libc::kill(outer as i32, libc::SIGKILL) }, 0);
        let exited = vmm.qmp.wait_event("__org.vmm_DEVICE_PROCESS_EXITED");
        assert_eq!(exited["data"]["device"], "disk0", "{exited}");
        assert_eq!(exited["data"]["pid"], u64::from(outer), "{exited}");
        if round <= 5 {
            let restarted = vmm.qmp.wait_event("__org.vmm_DEVICE_PROCESS_RESTARTED");
            assert_eq!(restarted["data"]["restarts"], round, "{restarted}");
            let pid = restarted["data"]["pid"].as_u64().expect("a pid");
            assert_ne!(pid, u64::from(outer), "{restarted}");
            outer = u32::try_from(pid).expect("a pid");
        } else {
            let failed = vmm.qmp.wait_event("__org.vmm_DEVICE_PROCESS_FAILED");
            assert_eq!(failed["data"]["device"], "disk0", "{failed}");
            assert_eq!(failed["data"]["restarts"], 5, "{failed}");
        }
    }
    let p = vmm.process();
    assert_eq!(p["state"], "failed", "{p}");
    assert_eq!(p["restarts"], 5, "{p}");
    let status = vmm.qmp.ok("query-status", None);
    assert_eq!(status["running"], true, "the VM runs on: {status}");
}
