//! Driving a guest's serial console: the vmm runs with `-serial stdio` on pipes, a thread
//! collects everything the guest prints, and commands are run between unique markers.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A running vmm whose COM1 is on this process's pipes.
pub struct GuestConsole {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    output: Arc<(Mutex<String>, Condvar)>,
    /// Bytes of `output` already consumed by `wait_for`.
    consumed: usize,
    next_marker: u32,
}

impl GuestConsole {
    /// Start the vmm with `args` (which must include `-serial stdio`).
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_program(&crate::vmm_binary(), args)
    }

    /// Boot the stock guest (`target/guest`, built by `scripts/guest-assets`) under emu with
    /// 512 MiB and COM1 on the console, and `extra` arguments after those.
    pub fn boot_stock_linux(extra: &[&str]) -> Self {
        let args = stock_linux_args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::spawn(&args)
    }

    /// [`GuestConsole::boot_stock_linux`] with the vmm inside network namespace `ns`.
    pub fn boot_stock_linux_in(ns: &crate::netns::NetNs, extra: &[&str]) -> Self {
        let vmm = crate::vmm_binary();
        let vmm = vmm.display().to_string();
        let mut args: Vec<String> = ns.wrap(&vmm).into_iter().map(str::to_string).collect();
        args.extend(stock_linux_args(extra));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::spawn_program(std::path::Path::new("ip"), &args)
    }

    /// Start another emulator (QEMU, as an interop peer) the same way.
    pub fn spawn_program(program: &std::path::Path, args: &[&str]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("vmm stdout");
        let output = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                let (lock, cv) = &*sink;
                lock.lock().unwrap().push_str(&text);
                cv.notify_all();
            }
            sink.1.notify_all();
        });
        GuestConsole {
            child: Some(child),
            stdin,
            output,
            consumed: 0,
            next_marker: 0,
        }
    }

    /// The emulator's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Everything the guest printed so far.
    pub fn transcript(&self) -> String {
        self.output.0.lock().unwrap().clone()
    }

    /// Wait until `needle` appears after what was consumed; returns the text up to and
    /// including it and consumes it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.output;
        let mut out = lock.lock().unwrap();
        loop {
            if let Some(pos) = out[self.consumed..].find(needle) {
                let end = self.consumed + pos + needle.len();
                let text = out[self.consumed..end].to_string();
                self.consumed = end;
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let tail: String = out
                    .chars()
                    .rev()
                    .take(3000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                panic!("timed out after {timeout:?} waiting for {needle:?}; console tail:\n{tail}");
            }
            out = cv
                .wait_timeout(out, left.min(Duration::from_millis(200)))
                .unwrap()
                .0;
        }
    }

    /// Type `text` into the console.
    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("console stdin");
        stdin
            .write_all(text.as_bytes())
            .expect("write to the console");
        stdin.flush().expect("flush the console");
    }

    /// Run a shell command in the guest and return its output (without the echo).
    pub fn run(&mut self, command: &str, timeout: Duration) -> String {
        self.next_marker += 1;
        let n = self.next_marker;
        // The quotes keep the echoed command line from matching the markers.
        self.send(&format!(
            "echo CMD''BEGIN-{n}; {command}; echo CMD''END-{n}\n"
        ));
        // Not "CMDBEGIN-n\n": a kernel message may land between the marker and its newline.
        // Markers only grow, so no later one can be mistaken for this one.
        self.wait_for(&format!("CMDBEGIN-{n}"), timeout);
        let end = format!("CMDEND-{n}");
        let text = self.wait_for(&end, timeout);
        let text = text.strip_suffix(end.as_str()).unwrap_or(&text);
        text.strip_prefix('\n').unwrap_or(text).to_string()
    }

    /// Copy a program of `len` bytes from the start of disk `device` (a disk made by
    /// [`crate::guest_program_disk`]) to `/tmp/NAME` in the guest, executable.
    pub fn install_program(&mut self, device: &str, len: u64, name: &str, timeout: Duration) {
        let copy = self.run(
            &format!("head -c {len} {device} > /tmp/{name}; chmod +x /tmp/{name}; echo copied"),
            timeout,
        );
        assert!(copy.contains("copied"), "{copy}");
    }

    /// Wait for the vmm to exit and return its status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!("the vmm did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The vmm arguments that boot the stock guest under emu (asset check included), then
/// `extra`.
pub fn stock_linux_args(extra: &[&str]) -> Vec<String> {
    let guest = crate::repo_root().join("target/guest");
    let kernel = guest.join("vmlinuz");
    let initrd = guest.join("initramfs.img");
    assert!(
        kernel.exists() && initrd.exists(),
        "guest assets are missing: run scripts/guest-assets (scripts/test does)"
    );
    let mut args: Vec<String> = [
        "-accel",
        "emu",
        "-m",
        "512",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        &kernel.display().to_string(),
        "-initrd",
        &initrd.display().to_string(),
        "-append",
        "console=ttyS0",
        "-serial",
        "stdio",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

impl Drop for GuestConsole {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
