//! The interactive human monitor on the real binary (emu, tiny guest): `-monitor stdio`
//! runs commands line by line and `quit` ends the vmm with status 0; `-monitor unix:`
//! serves a client, and `-mon chardev=...` (readline is QEMU's default mode) likewise.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmm_tests::guest::hanging_guest;
use vmm_tests::{spawn_vmm, vmm_binary, wait_until, wait_with_timeout, TempDir};

const TIMEOUT: Duration = Duration::from_secs(30);
const BANNER: &str = "QEMU 7.2.0 monitor - type 'help' for more information\r\n";

#[test]
fn monitor_stdio_runs_commands_and_quits() {
    let dir = TempDir::new("hmp-stdio");
    let kernel = hanging_guest(&dir, "");
    let mut child = Command::new(vmm_binary())
        .args([
            "-accel",
            "emu",
            "-m",
            "32",
            "-nodefaults",
            "-kernel",
            &kernel,
        ])
        .args(["-name", "hmpguest", "-monitor", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"info status\nstop\ninfo status\ninfo name\nbogus\nquit\n")
        .unwrap();
    let done = wait_with_timeout(child, TIMEOUT);
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
    assert_eq!(
        done.stdout,
        format!(
            "{BANNER}(qemu) VM status: running\r\n(qemu) (qemu) VM status: paused\r\n\
             (qemu) hmpguest\r\n(qemu) unknown command: 'bogus'\r\n(qemu) "
        )
    );
}

/// Read until the prompt; returns what came before it.
fn until_prompt(reader: &mut impl BufRead) -> String {
    let mut out = Vec::new();
    while !out.ends_with(b"(qemu) ") {
        let mut byte = [0u8; 1];
        if reader.read(&mut byte).unwrap() == 0 {
            break;
        }
        out.push(byte[0]);
    }
    String::from_utf8_lossy(&out)
        .trim_end_matches("(qemu) ")
        .to_string()
}

fn talk(socket: &std::path::Path) {
    let stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    assert_eq!(until_prompt(&mut reader), BANNER);
    writer.write_all(b"info kvm\n").unwrap();
    assert_eq!(until_prompt(&mut reader), "kvm support: disabled\r\n");
    writer.write_all(b"help stop\n").unwrap();
    assert_eq!(until_prompt(&mut reader), "stop|s  -- stop emulation\r\n");
    writer.write_all(b"info qtree-lite\n").unwrap();
    let tree = until_prompt(&mut reader);
    for expected in [
        "bus: main-system-bus\r\n",
        "  dev: i8042, id \"\"\r\n",
        "  dev: mc146818rtc, id \"\"\r\n",
        "    bus: pci.0\r\n",
        "      dev: Host bridge, id \"\"\r\n        addr = 00.0\r\n",
    ] {
        assert!(tree.contains(expected), "{expected:?} not in:\n{tree}");
    }
    // No drives yet: nothing, as QEMU prints for a machine without any.
    writer.write_all(b"info block\n").unwrap();
    assert_eq!(until_prompt(&mut reader), "");
}

#[test]
fn monitor_on_unix_sockets_serves_clients_in_turn() {
    let dir = TempDir::new("hmp-unix");
    let kernel = hanging_guest(&dir, "");
    let direct = dir.join("hmp.sock");
    let via_mon = dir.join("mon.sock");
    let monitor_arg = format!("unix:{},server=on,wait=off", direct.display());
    let chardev_arg = format!("socket,id=h,path={},server=on,wait=off", via_mon.display());
    let child = spawn_vmm(&[
        "-accel",
        "emu",
        "-m",
        "32",
        "-nodefaults",
        "-kernel",
        &kernel,
        "-monitor",
        &monitor_arg,
        "-chardev",
        &chardev_arg,
        "-mon",
        "chardev=h",
    ]);
    wait_until("the monitor sockets", TIMEOUT, || {
        direct.exists() && via_mon.exists()
    });
    // One client after another on the same socket, and the -mon one.
    talk(&direct);
    talk(&direct);
    talk(&via_mon);
    // quit from the console: the vmm exits 0 and removes its socket files.
    let stream = UnixStream::connect(&direct).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    assert_eq!(until_prompt(&mut reader), BANNER);
    writer.write_all(b"quit\n").unwrap();
    let done = wait_with_timeout(child, TIMEOUT);
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
    assert!(!direct.exists(), "the -monitor socket is removed at exit");
    assert!(!via_mon.exists(), "the -mon socket is removed at exit");
}
