//! A device process that breaks the control protocol is treated as compromised: the vmm
//! stops it for good, reports it, and the VM keeps running.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::qmp::Qmp;
use vmm_tests::qtest::Qtest;
use vmm_tests::TempDir;

fn processes(qmp: &mut Qmp<std::os::unix::net::UnixStream>) -> Vec<Value> {
    qmp.execute("__org.vmm_query-device-processes", None)["return"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_backend_sending_garbage_is_dropped_and_the_vm_runs_on() {
    // The vmm passes its environment to vmm-blk, whose test hook then sends an undecodable
    // control message 1.5 s after it is attached. This test binary holds only this test.
    std::env::set_var("VMM_BLK_TEST_BAD_RPC", "1500");
    let dir = TempDir::new("device-faults");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let qmp_sock = dir.join("qmp.sock");
    let drive = format!("file={},if=none,id=d0,format=raw", img.display());
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let mut qt = Qtest::start(
        "128M",
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,id=disk0",
            "-qmp",
            &qmp_arg,
        ],
    )
    .unwrap();
    let mut qmp = Qmp::connect(&qmp_sock);
    let before = processes(&mut qmp);
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["state"], "running");
    let pid = before[0]["pid"].as_u64().unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let event = loop {
        assert!(Instant::now() < deadline, "no MISBEHAVED event");
        let msg = qmp.message();
        if msg["event"] == "__org.vmm_DEVICE_PROCESS_MISBEHAVED" {
            break msg;
        }
    };
    assert_eq!(event["data"]["device"], "disk0");
    assert_eq!(event["data"]["pid"].as_u64(), Some(pid));

    let after = processes(&mut qmp);
    assert_eq!(after[0]["state"], "failed");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the misbehaving process is still there"
    );
    // Not restarted: no new process appears, and the VM is still running and answering.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(processes(&mut qmp)[0]["pid"].as_u64(), Some(pid));
    assert_eq!(processes(&mut qmp)[0]["state"], "failed");
    let status = qmp.execute("query-status", None);
    assert_eq!(status["return"]["status"], json!("running"), "{status}");
    assert!(qt.readl(0).is_ok(), "the harness still talks to the vmm");
}
