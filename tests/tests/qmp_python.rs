//! The real QMP clients against the vmm (emu, so no /dev/kvm is needed): python
//! `qemu.qmp` runs every command of the QMP issue and passes a pipe fd with getfd,
//! checked through the vmm's /proc/PID/fd; `qmp-shell` runs query-status from a pipe.
//! Both come from pip (`scripts/test` installs them).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmm_tests::guest::hanging_guest;
use vmm_tests::{repo_root, spawn_vmm, wait_until, wait_with_timeout, TempDir};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A hanging guest (hlt; jmp .-3 at 0x200000) under emu with a QMP socket.
fn start(dir: &TempDir, extra: &[&str]) -> (std::process::Child, std::path::PathBuf) {
    let kernel = hanging_guest(dir, "");
    let socket = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", socket.display());
    let mut args = vec![
        "-accel",
        "emu",
        "-m",
        "32",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        &kernel,
        "-qmp",
        &qmp_arg,
    ];
    args.extend_from_slice(extra);
    let child = spawn_vmm(&args);
    wait_until("the monitor socket", TIMEOUT, || socket.exists());
    (child, socket)
}

fn require_python_qmp() {
    let ok = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python3 with qemu.qmp is required (scripts/test installs it with pip)"
    );
}

#[test]
fn python_client_runs_every_command_and_passes_an_fd() {
    require_python_qmp();
    let dir = TempDir::new("qmp-python-all");
    let (child, socket) = start(
        &dir,
        &[
            "-name",
            "pyguest",
            "-uuid",
            "6c9ef2c4-5a9f-4d4b-9a55-2cbbd7f0b3a1",
        ],
    );
    let script = repo_root().join("tests/python/qmp_commands.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&socket)
        .arg(child.id().to_string())
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("PY-OK"),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The script ended with quit: the vmm exits 0.
    let done = wait_with_timeout(child, TIMEOUT);
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
}

#[test]
fn qmp_shell_runs_query_status_non_interactively() {
    let dir = TempDir::new("qmp-shell");
    let (mut child, socket) = start(&dir, &["-S"]);
    let mut shell = Command::new("qmp-shell")
        .arg(&socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qmp-shell is required (scripts/test installs qemu.qmp with pip)");
    shell
        .stdin
        .take()
        .unwrap()
        .write_all(b"query-status\n")
        .unwrap();
    let out = shell.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            r#"{"return": {"singlestep": false, "status": "prelaunch", "running": false}}"#
        ) || stdout.contains(r#""status": "prelaunch""#),
        "qmp-shell printed:\n{stdout}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
