//! The tiny counting guest the migration tests move: it counts in memory and stamps a
//! 16 MiB buffer page by page, so that a page lost or stale on a destination prints `BAD`;
//! and a vmm running it, with its monitor.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use iced_x86::code_asm::*;
use serde_json::json;

use crate::guest::Asm;
use crate::qmp::Qmp;
use crate::{read_file, vmm_binary, wait_until, TempDir};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The guest's 4096-page buffer.
const BUF: u64 = 0x40_0000;

/// The counting guest: it counts in R14 and stamps page `count % 4096` of a 16 MiB buffer
/// with the count, keeping in R15 the sum of every page's stamp (adding the new stamp and
/// taking off the one it overwrote, as read from memory). Registers always move with the
/// vCPU; so a page that reaches the destination stale makes the sum differ for good. Every
/// 2^20 counts it checks the sum and each page's place (stamp % 4096 is its index) and
/// reports `C xxxxxxxx`, or `BAD` and stops.
pub fn counting_guest(dir: &TempDir) -> String {
    let mut g = Asm::new();
    let a = &mut g.a;
    let mut top = a.create_label();
    let mut check = a.create_label();
    let mut next = a.create_label();
    let mut bad = a.create_label();
    a.xor(r14d, r14d).unwrap();
    a.xor(r15d, r15d).unwrap();
    a.set_label(&mut top).unwrap();
    a.inc(r14).unwrap();
    a.mov(rcx, r14).unwrap();
    a.and(rcx, 0xfff).unwrap();
    a.shl(rcx, 12).unwrap();
    a.mov(rdx, BUF).unwrap();
    a.sub(r15, qword_ptr(rdx + rcx)).unwrap();
    a.mov(qword_ptr(rdx + rcx), r14).unwrap();
    a.add(r15, r14).unwrap();
    a.test(r14d, 0xf_ffff).unwrap();
    a.jnz(top).unwrap();
    // The check: every page in its place, and the sum as kept.
    a.xor(ebx, ebx).unwrap();
    a.xor(esi, esi).unwrap();
    a.mov(rdx, BUF).unwrap();
    a.set_label(&mut check).unwrap();
    a.mov(rdi, rbx).unwrap();
    a.shl(rdi, 12).unwrap();
    a.mov(rax, qword_ptr(rdx + rdi)).unwrap();
    a.add(rsi, rax).unwrap();
    a.test(rax, rax).unwrap();
    a.jz(next).unwrap();
    a.and(rax, 0xfff).unwrap();
    a.cmp(rax, rbx).unwrap();
    a.jne(bad).unwrap();
    a.set_label(&mut next).unwrap();
    a.inc(rbx).unwrap();
    a.cmp(rbx, 4096).unwrap();
    a.jb(check).unwrap();
    a.cmp(rsi, r15).unwrap();
    a.jne(bad).unwrap();
    g.print("C ");
    g.a.mov(rax, r14).unwrap();
    g.print_eax_hex();
    g.print("\n");
    g.a.jmp(top).unwrap();
    g.a.set_label(&mut bad).unwrap();
    g.print("BAD\n");
    g.hang();
    let path = dir.join("counter.elf");
    std::fs::write(&path, g.elf()).unwrap();
    path.to_str().unwrap().to_string()
}

pub struct Vm {
    pub child: Child,
    pub qmp: Qmp<UnixStream>,
    /// A second monitor connection that only collects events (those sent before a
    /// command's reply included).
    pub events: Qmp<UnixStream>,
    pub serial: PathBuf,
    /// The vmm's stderr (shown if the test fails).
    pub log: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {}:\n{}", self.log.display(), read_file(&self.log));
        }
    }
}

/// A vmm running the counting guest under emu; `extra` goes last (-incoming, -m).
pub fn vm(dir: &TempDir, name: &str, kernel: &str, extra: &[&str]) -> Vm {
    vm_with_env(dir, name, kernel, extra, &[])
}

pub fn vm_with_env(
    dir: &TempDir,
    name: &str,
    kernel: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Vm {
    vm_on("emu", dir, name, kernel, extra, env)
}

/// A vmm running the counting guest under `accel`.
pub fn vm_on(
    accel: &str,
    dir: &TempDir,
    name: &str,
    kernel: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Vm {
    let sock = dir.join(&format!("{name}.qmp"));
    let serial = dir.join(&format!("{name}.out"));
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let serial_arg = format!("file:{}", serial.display());
    let log = dir.join(&format!("{name}.log"));
    let mut args = vec![
        "-accel",
        accel,
        "-m",
        "32",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        kernel,
        "-serial",
        &serial_arg,
        "-qmp",
        &qmp_arg,
    ];
    args.extend_from_slice(extra);
    let child = Command::new(vmm_binary())
        .args(&args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("the vmm's log"))
        .spawn()
        .expect("spawn vmm");
    wait_until("the monitor socket", TIMEOUT, || sock.exists());
    let mut qmp = Qmp::connect(&sock);
    let events = Qmp::connect(&sock);
    qmp.ok(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "events", "state": true}]})),
    );
    Vm {
        child,
        qmp,
        events,
        serial,
        log,
    }
}

/// The counts a guest reported so far; panics on BAD.
pub fn counts(serial: &Path) -> Vec<u64> {
    let text = read_file(serial);
    assert!(
        !text.contains("BAD"),
        "a page did not hold its count:\n{text}"
    );
    text.lines()
        .filter_map(|l| l.strip_prefix("C "))
        .filter_map(|h| u64::from_str_radix(h.trim(), 16).ok())
        .collect()
}

pub fn wait_counts(serial: &Path, n: usize) -> Vec<u64> {
    let mut c = Vec::new();
    wait_until("the guest's reports", TIMEOUT, || {
        c = counts(serial);
        c.len() >= n
    });
    c
}

/// The inode of the guest-RAM memfd a process holds.
pub fn guest_ram_inode(pid: u32) -> u64 {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy().contains("memfd:vmm-guest-ram") {
            return std::fs::metadata(entry.path()).unwrap().ino();
        }
    }
    panic!("no guest-RAM memfd in /proc/{pid}/fd");
}

/// Every process holding an fd of, or mapping, inode `ino` of a memfd.
pub fn holders(ino: u64) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let has_fd = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                let memfd = std::fs::read_link(fd.path())
                    .is_ok_and(|t| t.to_string_lossy().contains("memfd:"));
                memfd && std::fs::metadata(fd.path()).is_ok_and(|m| m.ino() == ino)
            });
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        let mapped = maps
            .lines()
            .any(|l| l.contains("memfd:") && l.split_whitespace().nth(4) == Some(&ino.to_string()));
        if has_fd || mapped {
            found.push(pid);
        }
    }
    found
}

/// The parent of `pid`.
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn in_tree(mut pid: u32, root: u32) -> bool {
    loop {
        if pid == root {
            return true;
        }
        match parent(pid) {
            Some(p) if p > 1 => pid = p,
            _ => return false,
        }
    }
}

/// The downtime, in microseconds, that a source of a local migration reports in its log
/// (`vmm: local migration completed (downtime N ms, US us): ...`) before it exits.
pub fn handover_downtime_us(log: &str) -> u64 {
    log.split("local migration completed (downtime ")
        .nth(1)
        .and_then(|rest| rest.split(", ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|us| us.parse().ok())
        .unwrap_or_else(|| panic!("no downtime in the source's log:\n{log}"))
}
