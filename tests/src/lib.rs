//! Shared helpers for the integration tests: building tiny guest images, finding and
//! running the `vmm` binary, and temporary directories.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub mod console;
pub mod device_echo;
pub mod device_kinds;
pub mod display;
pub mod fault_suite;
pub mod guest;
pub mod guest_fuzz;
pub mod libqos;
pub mod migration;
pub mod netns;
pub mod qmp;
pub mod qtest;
pub mod rng;
pub mod transfer;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The `vmm` binary of this build (target/<profile>/vmm, next to the test's deps dir).
/// `scripts/test` builds it before running the tests.
pub fn vmm_binary() -> PathBuf {
    workspace_binary("vmm")
}

/// A binary of this workspace's build (`vmm`, `vmm-blk`, ...), beside the test's deps dir.
pub fn workspace_binary(name: &str) -> PathBuf {
    let bin = profile_dir().join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --bins` (scripts/test does)",
        bin.display()
    );
    bin
}

/// Where [`vmm_binary`] expects the binary, without checking that it is there.
pub fn vmm_binary_path() -> PathBuf {
    profile_dir().join("vmm")
}

/// target/<profile>: the parent of a test's deps dir, or a program's own dir (the
/// `guest-fuzz` binary).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        dir.to_path_buf()
    }
}

/// Can this machine run KVM guests? If not, the caller prints a SKIP line and returns.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Skip the current test (with a visible reason) when /dev/kvm is absent.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_available() {
            eprintln!("SKIP: /dev/kvm is not available on this machine");
            return;
        }
    };
}

/// Build `tests/guest/NAME.c` (static) into a raw disk image of at least `min_size` bytes
/// (sparse past the program), for a stock guest to copy the program from with
/// `head -c LEN /dev/vdX`. Returns the image and the program's length.
pub fn guest_program_disk(dir: &TempDir, name: &str, min_size: u64) -> (PathBuf, u64) {
    let program = dir.join(name);
    let src = repo_root().join(format!("tests/guest/{name}.c"));
    let status = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&program)
        .arg(&src)
        .status()
        .expect("a C compiler (scripts/test installs gcc and libc6-dev)");
    assert!(status.success(), "building {}", src.display());
    let len = std::fs::metadata(&program).expect("the program").len();
    let disk = dir.join(&format!("{name}.img"));
    std::fs::copy(&program, &disk).expect("copy the program into its disk");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .expect("the program's disk");
    f.set_len(len.next_multiple_of(1 << 20).max(min_size))
        .expect("size the program's disk");
    (disk, len)
}

/// Allocated bytes of the vmm's guest-RAM memfd (pid `pid`), read through /proc.
pub fn guest_ram_allocated(pid: u32) -> u64 {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the vmm's fds")
        .flatten()
    {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy().contains("memfd:vmm-guest-ram") {
            let meta = std::fs::metadata(entry.path()).expect("the memfd");
            return std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        }
    }
    panic!("no guest-RAM memfd in /proc/{pid}/fd");
}

/// The processes below `root` (device processes, their sandboxed workers) that map the
/// guest-RAM memfd: pid and name.
pub fn guest_ram_mappers(root: u32) -> Vec<(u32, String)> {
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the ")" that ends the name: state, then the parent's pid.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let below_root = |mut pid: u32| {
        while let Some(p) = parent(pid) {
            if p == root {
                return true;
            }
            if p <= 1 {
                return false;
            }
            pid = p;
        }
        false
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if maps.contains("memfd:vmm-guest-ram") && below_root(pid) {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            found.push((pid, name.trim().to_string()));
        }
    }
    found
}

/// The resident set of process `pid` in bytes (VmRSS).
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        Self::try_new(tag).expect("create temp dir")
    }

    /// [`TempDir::new`] without the panic.
    pub fn try_new(tag: &str) -> std::io::Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmm-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Poll `f` every 20 ms until it is true; panic naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file's text, or "" while it does not exist yet (guest output files).
pub fn read_file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The result of a finished vmm run.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Start the vmm with `args` (stdin null, stdout/stderr captured).
pub fn spawn_vmm(args: &[&str]) -> Child {
    Command::new(vmm_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm")
}

/// Wait for `child` for at most `timeout`; kill it and panic if it does not finish.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Finished {
    let start = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().expect("wait for vmm") {
            let out = child.wait_with_output().expect("collect vmm output");
            return Finished {
                status: out.status,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            };
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect vmm output");
            panic!(
                "vmm did not finish within {timeout:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run the vmm to completion.
pub fn run_vmm(args: &[&str], timeout: Duration) -> Finished {
    wait_with_timeout(spawn_vmm(args), timeout)
}

/// Run `qemu-img` (Debian's qemu-utils) with `args`, which must succeed: its standard
/// output.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (Debian's qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
