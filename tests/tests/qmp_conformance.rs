//! QMP conformance against the real binaries, after QEMU's tests/qtest/qmp-test.c: the
//! greeting, the negotiation rules, every kind of malformed input before and after
//! negotiation (each followed by a check that the connection still works), id echo of
//! every JSON type, and the error classes and descriptions. QEMU 7.2 (Debian's
//! qemu-system-x86, installed by scripts/test) receives the same bytes and its replies
//! are the reference: ours must be identical. It runs under emu and, where /dev/kvm can
//! run the tiny guest, under kvm. Then, on our vmm alone: 100 clients on one monitor
//! socket all get an event, and a client that stops reading stalls neither the others
//! nor the guest.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::guest::hanging_guest;
use vmm_tests::qmp::Qmp;
use vmm_tests::{kvm_available, spawn_vmm, wait_until, TempDir};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Inputs that are errors before negotiation, after it, or both (each is sent alone).
const MALFORMED: &[&[u8]] = &[
    br#"{"execute": }"#,
    br#"{"execute" "query-status"}"#,
    b"[1, 2]",
    // A bare number or keyword ends only at a delimiter, in QEMU's lexer as in ours.
    b"42\n",
    br#""text""#,
    b"null\n",
    br#"{"execute": 1}"#,
    br#"{"arguments": {}}"#,
    br#"{"execute": "query-status", "bogus": 1}"#,
    br#"{"execute": "query-status", "arguments": []}"#,
    br#"{"execute": "query-status", "arguments": {"x": 1}}"#,
    br#"{"execute": "no-such-command"}"#,
    br#"{"execute": "memsave", "arguments": {"val": "zero", "size": 1, "filename": "/nonexistent/x"}}"#,
    br#"{"execute": "memsave", "arguments": {"size": 1, "filename": "/nonexistent/x"}}"#,
    br#"{"execute": "human-monitor-command", "arguments": {"command-line": 1}}"#,
    br#"{"execute": "getfd", "arguments": {"fdname": "fd0"}}"#,
    br#"{"execute": "closefd", "arguments": {"fdname": "fd0"}}"#,
    br#"{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}}"#,
    br#"{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}"#,
];

/// `id` values of every JSON type.
const IDS: &[&str] = &[
    "1",
    "-7",
    "1.5",
    r#""text""#,
    "true",
    "null",
    "[1, \"a\", {}]",
    r#"{"nested": {"x": [1]}}"#,
];

struct Monitor {
    child: Child,
    qmp: Qmp<UnixStream>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_arg(path: &std::path::Path) -> String {
    format!("unix:{},server=on,wait=off", path.display())
}

fn start_ours(dir: &TempDir, accel: &str) -> Monitor {
    let kernel = hanging_guest(dir, "");
    let socket = dir.join("vmm.sock");
    let qmp_arg = unix_arg(&socket);
    let child = spawn_vmm(&[
        "-accel",
        accel,
        "-m",
        "64",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-kernel",
        &kernel,
        "-qmp",
        &qmp_arg,
    ]);
    wait_until("our monitor socket", TIMEOUT, || socket.exists());
    Monitor {
        child,
        qmp: Qmp::unix(&socket),
    }
}

fn start_qemu(dir: &TempDir) -> Monitor {
    let socket = dir.join("qemu.sock");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-S", "-qmp", &unix_arg(&socket)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "qemu-system-x86_64 (Debian's qemu-system-x86) is required; scripts/test installs it",
        );
    wait_until("QEMU's monitor socket", TIMEOUT, || socket.exists());
    Monitor {
        child,
        qmp: Qmp::unix(&socket),
    }
}

/// The reply to `bytes` (events skipped).
fn reply(qmp: &mut Qmp<UnixStream>, bytes: &[u8]) -> Value {
    qmp.send_raw(bytes);
    loop {
        let msg = qmp.message();
        if msg.get("event").is_none() {
            return msg;
        }
    }
}

/// Send `bytes` to both and require the same reply; then check that both still answer.
fn same_reply(ours: &mut Monitor, qemu: &mut Monitor, bytes: &[u8], phase: &str) -> Value {
    let theirs = reply(&mut qemu.qmp, bytes);
    let mine = reply(&mut ours.qmp, bytes);
    assert_eq!(
        mine,
        theirs,
        "{phase}: input {}",
        String::from_utf8_lossy(bytes)
    );
    mine
}

fn conformance(accel: &str) {
    let dir = TempDir::new(&format!("qmp-conformance-{accel}"));
    let mut ours = start_ours(&dir, accel);
    let mut qemu = start_qemu(&dir);

    // Greeting: the same shape, QEMU's version numbers, our name in package.
    let mine = ours.qmp.message();
    let theirs = qemu.qmp.message();
    // Debian's 7.2 carries stable updates (7.2.N); we implement 7.2's command set.
    for part in ["major", "minor"] {
        assert_eq!(
            mine["QMP"]["version"]["qemu"][part],
            theirs["QMP"]["version"]["qemu"][part]
        );
    }
    assert!(mine["QMP"]["version"]["qemu"]["micro"].is_u64());
    assert_eq!(mine["QMP"]["capabilities"], theirs["QMP"]["capabilities"]);
    assert!(mine["QMP"]["version"]["package"]
        .as_str()
        .is_some_and(|p| p.contains("vmm")));

    // Before negotiation.
    for bytes in MALFORMED {
        same_reply(&mut ours, &mut qemu, bytes, "before negotiation");
    }
    let before = same_reply(
        &mut ours,
        &mut qemu,
        br#"{"execute": "query-status"}"#,
        "before",
    );
    assert_eq!(
        before["error"]["desc"],
        "Expecting capabilities negotiation with 'qmp_capabilities'"
    );
    same_reply(
        &mut ours,
        &mut qemu,
        br#"{'execute': 'qmp_capabilities'}"#,
        "negotiate",
    );
    let again = same_reply(
        &mut ours,
        &mut qemu,
        br#"{"execute": "qmp_capabilities"}"#,
        "second negotiation",
    );
    assert_eq!(
        again["error"]["desc"],
        "Capabilities negotiation is already complete, command ignored"
    );

    // After negotiation.
    for bytes in MALFORMED {
        same_reply(&mut ours, &mut qemu, bytes, "after negotiation");
        let status = same_reply(
            &mut ours,
            &mut qemu,
            br#"{"execute": "query-status"}"#,
            "still working",
        );
        assert_eq!(status["return"]["status"], "prelaunch");
    }
    // Two objects in one write get two replies; one split across writes gets one.
    for qmp in [&mut ours.qmp, &mut qemu.qmp] {
        qmp.send_raw(br#"{"execute": "query-name"}{"execute": "query-kvm"}"#);
        assert!(qmp.message()["return"].is_object());
        assert!(qmp.message()["return"]["enabled"].is_boolean());
        qmp.send_raw(br#"{"execute": "query-"#);
        std::thread::sleep(Duration::from_millis(50));
        qmp.send_raw(br#"name"}"#);
        assert_eq!(qmp.message(), json!({ "return": {} }));
    }
    // id echo, on replies and on errors.
    for id in IDS {
        let ok = format!(r#"{{"execute": "query-name", "id": {id}}}"#);
        let r = same_reply(&mut ours, &mut qemu, ok.as_bytes(), "id echo");
        assert_eq!(r["id"], serde_json::from_str::<Value>(id).unwrap());
        let err = format!(r#"{{"execute": "no-such-command", "id": {id}}}"#);
        same_reply(&mut ours, &mut qemu, err.as_bytes(), "id echo on an error");
    }
}

#[test]
fn conformance_with_qemu_under_emu() {
    conformance("emu");
}

#[test]
fn conformance_with_qemu_under_kvm() {
    if !kvm_available() {
        eprintln!("SKIP: /dev/kvm is not usable here");
        return;
    }
    conformance("kvm");
}

#[test]
fn hundred_clients_get_events_and_a_stalled_client_blocks_nobody() {
    let dir = TempDir::new("qmp-many");
    // Its own connection stays open and unnegotiated; Drop kills the vmm at the end.
    let _ours = start_ours(&dir, "emu");
    let socket = dir.join("vmm.sock");

    // A client that sends commands and never reads: its replies pile up.
    let mut stalled = UnixStream::connect(&socket).unwrap();
    stalled
        .write_all(br#"{"execute": "qmp_capabilities"}"#)
        .unwrap();
    stalled
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let big = format!(
        r#"{{"execute": "query-name", "id": "{}"}}"#,
        "x".repeat(4000)
    );
    for _ in 0..2000 {
        if stalled.write_all(big.as_bytes()).is_err() {
            break; // the vmm stopped reading it, or dropped it: both fine
        }
    }

    let mut clients: Vec<Qmp<UnixStream>> = (0..100).map(|_| Qmp::connect(&socket)).collect();
    // Round trips on every client stay quick while the stalled one is stuck.
    let start = Instant::now();
    for qmp in clients.iter_mut() {
        assert_eq!(qmp.status()["status"], "prelaunch");
    }
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "100 round trips took {:?}",
        start.elapsed()
    );
    // cont: RESUME reaches all 100 (and the guest runs).
    clients[0].execute_with_event("cont", None, "RESUME");
    for (i, qmp) in clients.iter_mut().enumerate().skip(1) {
        let event = qmp.wait_event("RESUME");
        assert!(
            event["timestamp"]["seconds"].is_u64(),
            "client {i}: {event}"
        );
    }
    assert_eq!(clients[1].status()["status"], "running");
    // stop: STOP reaches all 100.
    clients[99].execute_with_event("stop", None, "STOP");
    for qmp in clients.iter_mut().take(99) {
        qmp.wait_event("STOP");
    }
    let mut buf = [0u8; 1];
    stalled.set_nonblocking(true).unwrap();
    let _ = stalled.read(&mut buf);
    drop(stalled);
}
