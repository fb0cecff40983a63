//! The sandbox of every device process kind (vmm-blk, vmm-scsi, vmm-net, vmm-display), as
//! an attacker who took one over would meet it: its self-test (VMM_SANDBOX_SELFTEST=1)
//! shows it cannot open host files, see other processes or make a network socket; its
//! namespaces, seccomp mode and capabilities are checked from outside; and a system call
//! outside its allowlist (the `forbidden-call` hostile mode, ptrace) kills it, after which
//! the vmm reports it as misbehaved, does not start it again, and the VM runs on.
//!
//! Needs root (namespaces, pivot_root), like the vmm's device processes.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::device_kinds::{machine, Kind};
use vmm_tests::qmp::Qmp;
use vmm_tests::{wait_until, TempDir};

const T: Duration = Duration::from_secs(20);

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// The inner process of a sandbox: the outer one's only child.
fn inner_of(outer: u32) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children")).unwrap_or_default();
    let pids: Vec<u32> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(pids.len(), 1, "children of {outer}: {children:?}");
    pids[0]
}

fn ns(pid: &str, name: &str) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{name}")).unwrap()
}

fn escape(kind: Kind) {
    let dir = TempDir::new("sandbox-escape");
    let hostile = format!("{}:forbidden-call@1500", kind.program());
    let env = [
        ("VMM_SANDBOX_SELFTEST", "1"),
        ("VMM_TEST_HOSTILE", hostile.as_str()),
    ];
    let (mut qt, mut qmp) = machine(kind, &dir, &env);
    let program = kind.program();
    let row = |qmp: &mut Qmp<std::os::unix::net::UnixStream>| -> Value {
        let all = qmp.execute("__org.vmm_query-device-processes", None)["return"].clone();
        all.as_array()
            .and_then(|a| a.iter().find(|p| p["program"] == program).cloned())
            .unwrap_or_else(|| panic!("no {program} in {all}"))
    };
    let outer = row(&mut qmp)["pid"].as_u64().unwrap() as u32;

    // From outside, while it serves: its own namespaces (the net one too: it has only
    // the socket it was given), PID 1 of its own PID namespace, seccomp in filter mode,
    // no_new_privs, no capabilities.
    let inner = inner_of(outer);
    let inner_s = inner.to_string();
    for name in ["mnt", "ipc", "uts", "net", "pid"] {
        assert_ne!(
            ns(&inner_s, name),
            ns("self", name),
            "{program}: {name} namespace"
        );
    }
    let nspid = status_field(inner, "NSpid");
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "NSpid {nspid}");
    for pid in [outer, inner] {
        assert_eq!(status_field(pid, "Seccomp"), "2", "{program} {pid}");
        assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{program} {pid}");
        for caps in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            let v = status_field(pid, caps);
            assert_eq!(
                u64::from_str_radix(&v, 16),
                Ok(0),
                "{program} {pid} {caps} {v}"
            );
        }
    }

    // From inside: the self-test lines.
    let line =
        |probe: &str, outcome: &str| format!("{program}: sandbox self-test: {probe} {outcome}");
    let expected = [
        line(
            "without seccomp: open(\"/etc/passwd\")",
            "failed: No such file or directory (os error 2)",
        ),
        line(
            "without seccomp: open(\"/proc/1/status\")",
            "failed: No such file or directory (os error 2)",
        ),
        line(
            "open(\"/etc/passwd\")",
            "failed: Operation not permitted (os error 1)",
        ),
        line(
            "socket(AF_INET)",
            "failed: Operation not permitted (os error 1)",
        ),
    ];
    wait_until("the self-test lines", T, || {
        expected.iter().all(|l| qt.stderr().contains(l.as_str()))
    });

    // The forbidden call: SIGSYS, reported as misbehaviour, not restarted.
    let deadline = Instant::now() + T;
    let event = loop {
        assert!(
            Instant::now() < deadline,
            "no MISBEHAVED event: {}",
            qt.stderr()
        );
        let msg = qmp.message();
        if msg["event"] == "__org.vmm_DEVICE_PROCESS_MISBEHAVED" {
            break msg;
        }
    };
    assert_eq!(event["data"]["device"], kind.process_label(), "{event}");
    assert_eq!(
        event["data"]["pid"].as_u64(),
        Some(u64::from(outer)),
        "{event}"
    );
    let reason = event["data"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("seccomp"), "{reason}");
    let text = qt.stderr();
    assert!(!text.contains("SUCCEEDED"), "{text}");
    assert!(
        !text.contains("the seccomp filter let it through"),
        "{text}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let after = row(&mut qmp);
    assert_eq!(after["state"], "failed", "{after}");
    assert_eq!(
        after["pid"].as_u64(),
        Some(u64::from(outer)),
        "restarted: {after}"
    );
    assert!(!std::path::Path::new(&format!("/proc/{inner}")).exists());
    let status = qmp.execute("query-status", None);
    assert_eq!(status["return"]["status"], json!("running"), "{status}");
    assert!(qt.readl(0).is_ok());
}

#[test]
fn blk_cannot_escape() {
    escape(Kind::Blk);
}

#[test]
fn scsi_cannot_escape() {
    escape(Kind::Scsi);
}

#[test]
fn net_cannot_escape() {
    escape(Kind::Net);
}

#[test]
fn display_cannot_escape() {
    escape(Kind::Display);
}
