//! The QMP monitor against the real `vmm` binary and a tiny KVM guest: greeting and
//! negotiation, run control with its events and states, queries, errors, the several
//! ways to open a monitor, quit, and the python `qemu.qmp` client.

use std::io::Write;
use std::process::Child;
use std::time::Duration;

use serde_json::{json, Value};
use vmm_tests::guest::{hanging_guest, Asm};
use vmm_tests::qmp::Qmp;
use vmm_tests::{read_file, require_kvm, spawn_vmm, wait_until, wait_with_timeout, TempDir};

const TIMEOUT: Duration = Duration::from_secs(30);

/// A guest that prints `text` and halts.
/// A guest that prints "off\n", then enters ACPI S5.
fn poweroff_guest(dir: &TempDir) -> String {
    use iced_x86::code_asm::*;
    let mut g = Asm::new();
    g.print("off\n");
    g.a.mov(dx, 0x600u32).unwrap();
    g.a.mov(al, (5u32 << 2) | 0x20).unwrap(); // SLP_TYP=5 (our _S5), SLP_EN
    g.a.out(dx, al).unwrap();
    g.hang();
    write_guest(dir, g)
}

fn write_guest(dir: &TempDir, g: Asm) -> String {
    let path = dir.join("guest.elf");
    std::fs::write(&path, g.elf()).unwrap();
    path.to_str().unwrap().to_string()
}

fn status(name: &str, running: bool) -> Value {
    json!({ "status": name, "singlestep": false, "running": running })
}

struct Vm {
    child: Child,
    dir: TempDir,
    socket: std::path::PathBuf,
    serial: std::path::PathBuf,
}

/// Start the vmm with a unix QMP monitor, a file serial, and `extra` options.
fn start_vm(tag: &str, kernel: impl FnOnce(&TempDir) -> String, extra: &[&str]) -> Vm {
    let dir = TempDir::new(tag);
    let kernel = kernel(&dir);
    let socket = dir.join("qmp.sock");
    let serial = dir.join("serial.out");
    let qmp_arg = format!("unix:{},server=on,wait=off", socket.display());
    let serial_arg = format!("file:{}", serial.display());
    let mut args = vec![
        "-accel",
        "kvm",
        "-m",
        "32",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        &kernel,
        "-serial",
        &serial_arg,
        "-qmp",
        &qmp_arg,
    ];
    args.extend_from_slice(extra);
    let child = spawn_vmm(&args);
    Vm {
        child,
        dir,
        socket,
        serial,
    }
}

impl Vm {
    /// quit: SHUTDOWN, the reply, EOF, and exit status 0.
    fn quit<S: std::io::Read + Write>(self, qmp: &mut Qmp<S>) {
        let event = qmp.execute_with_event("quit", None, "SHUTDOWN");
        assert_eq!(
            event["data"],
            json!({ "guest": false, "reason": "host-qmp-quit" })
        );
        assert!(qmp.next_message().is_none(), "EOF after the quit reply");
        let done = wait_with_timeout(self.child, TIMEOUT);
        assert_eq!(done.status.code(), Some(0), "stderr: {}", done.stderr);
        assert!(!self.socket.exists(), "the socket file is removed at exit");
        drop(self.dir);
    }
}

#[test]
fn greeting_negotiation_run_control_and_queries() {
    require_kvm!();
    let vm = start_vm("qmp-basic", |d| hanging_guest(d, "up\n"), &[]);
    let mut qmp = Qmp::unix(&vm.socket);

    let greeting = qmp.message();
    assert_eq!(greeting["QMP"]["version"]["qemu"]["major"], 7);
    assert_eq!(greeting["QMP"]["version"]["qemu"]["minor"], 2);
    assert!(greeting["QMP"]["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("vmm "));
    assert!(greeting["QMP"]["capabilities"].is_array());

    let before = qmp.execute("query-status", None);
    assert_eq!(before["error"]["class"], "CommandNotFound");
    assert_eq!(
        before["error"]["desc"],
        "Expecting capabilities negotiation with 'qmp_capabilities'"
    );
    qmp.send("qmp_capabilities", None);
    assert_eq!(qmp.message(), json!({ "return": {} }));

    wait_until("guest output", TIMEOUT, || read_file(&vm.serial) == "up\n");
    assert_eq!(qmp.status(), status("running", true));

    qmp.execute_with_event("stop", None, "STOP");
    assert_eq!(qmp.status(), status("paused", false));
    // A second stop: {} and no event (the reply comes next).
    assert_eq!(qmp.execute("stop", None), json!({ "return": {} }));
    assert_eq!(qmp.status(), status("paused", false));

    qmp.execute_with_event("cont", None, "RESUME");
    assert_eq!(qmp.status(), status("running", true));
    // cont while running: {} and no event.
    assert_eq!(qmp.execute("cont", None), json!({ "return": {} }));

    let commands = qmp.execute("query-commands", None)["return"].clone();
    let mut names: Vec<&str> = commands
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    let mut expected = vec![
        "closefd",
        "cont",
        "getfd",
        "qmp_capabilities",
        "query-commands",
        "query-cpus-fast",
        "query-kvm",
        "query-mice",
        "query-pci",
        "query-chardev",
        "query-cpus",
        "inject-nmi",
        "cpu",
        "memsave",
        "pmemsave",
        "human-monitor-command",
        "query-name",
        "query-status",
        "query-uuid",
        "query-version",
        "quit",
        "stop",
        "system_powerdown",
        "system_reset",
        "__org.vmm_query-device-processes",
        "block_resize",
        "query-block",
        "blockdev-snapshot-sync",
        "query-blockstats",
        "block_passwd",
        "eject",
        "change",
        "device_add",
        "device_del",
        "netdev_add",
        "netdev_del",
        "set_link",
        "query-rx-filter",
        "__org.vmm_query-netdev-stats",
        "screendump",
        "set_password",
        "expire_password",
        "change-vnc-password",
        "add_client",
        "query-vnc",
        "query-spice",
        "balloon",
        "query-balloon",
        "__org.vmm_query-balloon-counters",
        "qom-get",
        "qom-set",
        "migrate",
        "migrate_cancel",
        "migrate_set_speed",
        "migrate_set_downtime",
        "client_migrate_info",
        "query-migrate",
        "migrate-set-parameters",
        "query-migrate-parameters",
        "migrate-set-capabilities",
        "query-migrate-capabilities",
        "migrate-incoming",
    ];
    expected.sort_unstable();
    assert_eq!(names, expected);

    let unknown = qmp.execute("nonexistent", None);
    assert_eq!(
        unknown["error"],
        json!({ "class": "CommandNotFound", "desc": "The command nonexistent has not been found" })
    );
    // An id is echoed, and the connection keeps working after errors.
    qmp.send_raw(br#"{"execute": "query-status", "id": ["x", 1]}"#);
    let reply = qmp.message();
    assert_eq!(reply["id"], json!(["x", 1]));
    assert_eq!(reply["return"], status("running", true));

    let version = qmp.execute("query-version", None)["return"].clone();
    assert_eq!(
        version["qemu"],
        json!({ "major": 7, "minor": 2, "micro": 0 })
    );
    assert!(version["package"].as_str().unwrap().starts_with("vmm "));
    assert_eq!(
        qmp.execute("query-kvm", None)["return"],
        json!({ "enabled": true, "present": true })
    );
    assert_eq!(qmp.execute("query-name", None)["return"], json!({}));
    assert_eq!(
        qmp.execute("query-uuid", None)["return"],
        json!({ "UUID": "00000000-0000-0000-0000-000000000000" })
    );
    let cpus = qmp.execute("query-cpus-fast", None)["return"].clone();
    let cpus = cpus.as_array().unwrap();
    assert_eq!(cpus.len(), 1);
    assert_eq!(cpus[0]["cpu-index"], 0);
    assert_eq!(cpus[0]["target"], "x86_64");
    let tid = cpus[0]["thread-id"].as_i64().unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", vm.child.id()))
        .expect("the reported thread id is a thread of the vmm");
    assert_eq!(comm.trim(), "vcpu0");

    // getfd without an fd, closefd of an unknown name.
    let getfd = qmp.execute("getfd", Some(json!({ "fdname": "fd1" })));
    assert_eq!(
        getfd["error"]["desc"],
        "No file descriptor supplied via SCM_RIGHTS"
    );
    let closefd = qmp.execute("closefd", Some(json!({ "fdname": "fd1" })));
    assert_eq!(
        closefd["error"]["desc"],
        "File descriptor named 'fd1' not found"
    );

    vm.quit(&mut qmp);
}

#[test]
fn start_paused_then_cont_runs_the_guest() {
    require_kvm!();
    let vm = start_vm(
        "qmp-prelaunch",
        |d| hanging_guest(d, "ran\n"),
        &[
            "-S",
            "-name",
            "vm1",
            "-uuid",
            "12345678-9abc-def0-1234-56789abcdef0",
        ],
    );
    let mut qmp = Qmp::unix(&vm.socket);
    qmp.negotiate();
    assert_eq!(qmp.status(), status("prelaunch", false));
    // stop in prelaunch: {} and no event, still prelaunch.
    assert_eq!(qmp.execute("stop", None), json!({ "return": {} }));
    assert_eq!(qmp.status(), status("prelaunch", false));
    assert_eq!(
        qmp.execute("query-name", None)["return"],
        json!({ "name": "vm1" })
    );
    assert_eq!(
        qmp.execute("query-uuid", None)["return"],
        json!({ "UUID": "12345678-9abc-def0-1234-56789abcdef0" })
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(read_file(&vm.serial), "", "the guest does not run under -S");

    qmp.execute_with_event("cont", None, "RESUME");
    wait_until("guest output after cont", TIMEOUT, || {
        read_file(&vm.serial) == "ran\n"
    });
    assert_eq!(qmp.status(), status("running", true));
    vm.quit(&mut qmp);
}

#[test]
fn system_reset_reboots_and_emits_reset() {
    require_kvm!();
    let vm = start_vm("qmp-reset", |d| hanging_guest(d, "boot\n"), &[]);
    let mut qmp = Qmp::unix(&vm.socket);
    qmp.negotiate();
    wait_until("first boot", TIMEOUT, || read_file(&vm.serial) == "boot\n");

    let reset = qmp.execute_with_event("system_reset", None, "RESET");
    assert_eq!(
        reset["data"],
        json!({ "guest": false, "reason": "host-qmp-system-reset" })
    );
    wait_until("second boot", TIMEOUT, || {
        read_file(&vm.serial) == "boot\nboot\n"
    });
    assert_eq!(qmp.status(), status("running", true));

    // From paused, a reset leaves the VM in prelaunch until cont.
    qmp.execute_with_event("stop", None, "STOP");
    qmp.execute_with_event("system_reset", None, "RESET");
    assert_eq!(qmp.status(), status("prelaunch", false));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(read_file(&vm.serial), "boot\nboot\n");
    qmp.execute_with_event("cont", None, "RESUME");
    wait_until("third boot", TIMEOUT, || {
        read_file(&vm.serial) == "boot\nboot\nboot\n"
    });

    qmp.execute_with_event("system_powerdown", None, "POWERDOWN");
    vm.quit(&mut qmp);
}

#[test]
fn guest_poweroff_under_no_shutdown_needs_a_reset() {
    require_kvm!();
    let vm = start_vm("qmp-noshutdown", poweroff_guest, &["-S", "-no-shutdown"]);
    let mut qmp = Qmp::unix(&vm.socket);
    qmp.negotiate();
    qmp.execute_with_event("cont", None, "RESUME");
    let shutdown = qmp.wait_event("SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        json!({ "guest": true, "reason": "guest-shutdown" })
    );
    qmp.wait_event("STOP");
    assert_eq!(qmp.status(), status("shutdown", false));
    let cont = qmp.execute("cont", None);
    assert_eq!(
        cont["error"],
        json!({ "class": "GenericError", "desc": "Resetting the Virtual Machine is required" })
    );
    qmp.execute_with_event("system_reset", None, "RESET");
    assert_eq!(qmp.status(), status("prelaunch", false));
    qmp.execute_with_event("cont", None, "RESUME");
    qmp.wait_event("SHUTDOWN");
    qmp.wait_event("STOP");
    assert_eq!(read_file(&vm.serial), "off\noff\n");
    vm.quit(&mut qmp);
}

#[test]
fn guest_poweroff_sends_shutdown_and_exits() {
    require_kvm!();
    let vm = start_vm("qmp-poweroff", poweroff_guest, &["-S"]);
    let mut qmp = Qmp::unix(&vm.socket);
    qmp.negotiate();
    qmp.execute_with_event("cont", None, "RESUME");
    let shutdown = qmp.wait_event("SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        json!({ "guest": true, "reason": "guest-shutdown" })
    );
    assert!(qmp.next_message().is_none(), "EOF when the vmm exits");
    let done = wait_with_timeout(vm.child, TIMEOUT);
    assert_eq!(done.status.code(), Some(0), "stderr: {}", done.stderr);
}

fn free_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn several_monitors_chardev_mon_and_tcp_all_get_events() {
    require_kvm!();
    let dir = TempDir::new("qmp-multi");
    let chardev_socket = dir.join("mon.sock");
    let port = free_tcp_port();
    let chardev_arg = format!(
        "socket,id=mon0,path={},server=on,wait=off",
        chardev_socket.display()
    );
    let tcp_arg = format!("tcp:127.0.0.1:{port},server,nowait");
    let vm = start_vm(
        "qmp-multi-vm",
        |d| hanging_guest(d, "x"),
        &[
            "-chardev",
            &chardev_arg,
            "-mon",
            "chardev=mon0,mode=control",
            "-qmp",
            &tcp_arg,
        ],
    );
    let mut first = Qmp::unix(&vm.socket);
    let mut second = Qmp::unix(&chardev_socket);
    let mut third = Qmp::tcp(port);
    first.negotiate();
    second.negotiate();
    third.negotiate();
    // A connection that has not negotiated gets no events.
    let mut quiet = Qmp::unix(&vm.socket);
    quiet.message();

    second.execute_with_event("stop", None, "STOP");
    assert_eq!(first.wait_event("STOP")["event"], "STOP");
    assert_eq!(third.wait_event("STOP")["event"], "STOP");
    third.execute_with_event("cont", None, "RESUME");
    first.wait_event("RESUME");
    second.wait_event("RESUME");
    quiet.send("query-status", None);
    assert_eq!(quiet.message()["error"]["class"], "CommandNotFound");

    vm.quit(&mut first);
    assert!(!chardev_socket.exists());
}

#[test]
fn bad_monitor_options_fail_with_one_line() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["-qmp", "unix:/nonexistent-dir/q.sock,server=on,wait=off"],
            "-qmp unix:/nonexistent-dir/q.sock,server=on,wait=off",
        ),
        (&["-mon", "chardev=nope,mode=control"], "-mon chardev=nope"),
        (&["-qmp", "file:/tmp/x"], "-qmp file:/tmp/x"),
    ];
    let dir = TempDir::new("qmp-badopt");
    let kernel = hanging_guest(&dir, "x");
    for (options, expected) in cases {
        let mut args = vec!["-m", "32", "-nodefaults", "-kernel", &kernel];
        args.extend_from_slice(options);
        let done = wait_with_timeout(spawn_vmm(&args), TIMEOUT);
        assert_eq!(done.status.code(), Some(1), "{options:?}: {}", done.stderr);
        let line = done.stderr.trim_end();
        assert!(!line.contains('\n'), "one line: {line}");
        assert!(line.starts_with(&format!("vmm: {expected}")), "{line}");
    }
}

const PYTHON_CLIENT: &str = r#"
import asyncio, sys
from qemu.qmp import QMPClient

async def main(path):
    qmp = QMPClient('test')
    events = []
    async def collect():
        async for event in qmp.events:
            events.append(event['event'])
    await qmp.connect(path)
    task = asyncio.create_task(collect())
    status = await qmp.execute('query-status')
    assert status['status'] == 'running', status
    assert await qmp.execute('stop') == {}
    assert (await qmp.execute('query-status'))['status'] == 'paused'
    assert await qmp.execute('cont') == {}
    for _ in range(100):
        if 'RESUME' in events:
            break
        await asyncio.sleep(0.05)
    assert events[:2] == ['STOP', 'RESUME'], events
    version = await qmp.execute('query-version')
    assert version['qemu']['major'] == 7, version
    task.cancel()
    await qmp.disconnect()
    print('PY-OK')

asyncio.run(main(sys.argv[1]))
"#;

#[test]
fn python_qemu_qmp_client() {
    require_kvm!();
    let has_qmp = std::process::Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_qmp {
        eprintln!("SKIP: python3 with qemu.qmp is not installed (scripts/test installs it)");
        return;
    }
    let vm = start_vm("qmp-python", |d| hanging_guest(d, "x"), &[]);
    let script = vm.dir.join("client.py");
    std::fs::write(&script, PYTHON_CLIENT).unwrap();
    wait_until("the monitor socket", TIMEOUT, || vm.socket.exists());
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&vm.socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("PY-OK"),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut qmp = Qmp::unix(&vm.socket);
    qmp.negotiate();
    vm.quit(&mut qmp);
}
