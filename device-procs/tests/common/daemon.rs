//! A standalone `vmm-blk` for the tests that drive one over vhost-user.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

const BIN: &str = env!("CARGO_BIN_EXE_vmm-blk");
const T: Duration = Duration::from_secs(20);

/// A running vmm-blk, killed on drop.
pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    pub fn start(image: &Path, socket: &Path, extra: &[&str]) -> Daemon {
        let child = Command::new(BIN)
            .arg("--socket")
            .arg(socket)
            .arg("--image")
            .arg(image)
            .args(extra)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut d = Daemon { child };
        let deadline = Instant::now() + T;
        while !socket.exists() {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("vmm-blk exited early ({status}): {}", d.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no socket at {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    pub fn connect(&mut self, socket: &Path) -> Frontend {
        let fe = Frontend::connect(socket, 1).unwrap();
        // The socket is bound before the sandbox is entered: make sure the first request
        // is answered (it is, once the process serves), else show why it died.
        if let Err(e) = fe.get_features() {
            panic!("get_features: {e}; vmm-blk: {}", self.stderr_if_exited());
        }
        fe
    }

    pub fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    pub fn stderr_if_exited(&mut self) -> String {
        match self.wait(Duration::from_secs(2)) {
            Some(status) => format!("exited {status}: {}", self.stderr()),
            None => "still running".into(),
        }
    }

    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    /// kill -9, and wait until the process that served (the inner process of the
    /// sandbox, which PR_SET_PDEATHSIG kills a moment after the one we started) is gone
    /// too: it holds the image lock until then.
    fn drop(&mut self) {
        let inner = children(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + T;
        while inner.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The children of process `pid` (from /proc).
fn children(pid: u32) -> Vec<u32> {
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
