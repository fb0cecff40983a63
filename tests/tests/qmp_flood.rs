//! A hostile monitor client: connections opened in a loop on the `-qmp` socket, each
//! sending `qmp_capabilities` and a few `device_add` naming a missing drive, and closed
//! without reading a byte. The vmm's memory and fds stay bounded while it goes on and
//! after, and a well-behaved client is served throughout.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::json;
use vmm_tests::guest::hanging_guest;
use vmm_tests::qmp::Qmp;
use vmm_tests::{rss, spawn_vmm, wait_until, TempDir};

/// Open fds of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_connection_flood_costs_a_bounded_amount() {
    let dir = TempDir::new("qmp-flood");
    let kernel = hanging_guest(&dir, "up\n");
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let vmm = KillOnDrop(spawn_vmm(&[
        "-accel",
        "emu",
        "-m",
        "32",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-kernel",
        &kernel,
        "-qmp",
        &qmp_arg,
    ]));
    let pid = vmm.0.id();
    wait_until("the monitor socket", Duration::from_secs(30), || {
        sock.exists()
    });
    let mut good = Qmp::connect(&sock);
    let (rss_before, fds_before) = (rss(pid), fds(pid));

    let payload = {
        let mut p = b"{\"execute\": \"qmp_capabilities\"}\n".to_vec();
        for i in 0..4 {
            let cmd = json!({"execute": "device_add",
                "arguments": {"driver": "virtio-blk-pci", "drive": format!("missing{i}")}});
            p.extend_from_slice(format!("{cmd}\n").as_bytes());
        }
        p
    };
    let flooder = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let (mut opened, start) = (0u64, Instant::now());
            while start.elapsed() < Duration::from_secs(6) {
                // Beyond the cap the connect waits in the backlog, or is refused.
                let Ok(mut s) = UnixStream::connect(&sock) else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
                let _ = s.write_all(&payload);
                opened += 1;
            }
            opened
        })
    };
    let (mut rss_peak, mut fds_peak) = (0, 0);
    let mut answered = 0;
    while !flooder.is_finished() {
        rss_peak = rss_peak.max(rss(pid));
        fds_peak = fds_peak.max(fds(pid));
        // The well-behaved client is served all along.
        assert_eq!(good.ok("query-status", None)["status"], "prelaunch");
        answered += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let opened = flooder.join().unwrap();
    // Once the flood stops, the connections it left go away.
    wait_until(
        "the flood's connections to close",
        Duration::from_secs(30),
        || fds(pid) <= fds_before + 4,
    );
    let (rss_after, fds_after) = (rss(pid), fds(pid));
    eprintln!(
        "{opened} connections opened; RSS {} -> peak {} -> {} KiB; fds {fds_before} -> peak \
         {fds_peak} -> {fds_after}; the good client answered {answered} times",
        rss_before >> 10,
        rss_peak >> 10,
        rss_after >> 10
    );
    assert!(opened > 500, "the flood ran ({opened} connections)");
    // At most 256 connections at once, one fd each.
    assert!(fds_peak < fds_before + 300, "fds peaked at {fds_peak}");
    assert!(
        rss_peak < rss_before + (64 << 20),
        "RSS grew from {rss_before} to {rss_peak}"
    );
    assert_eq!(good.ok("query-status", None)["status"], "prelaunch");
    let mut late = Qmp::connect(&sock);
    assert_eq!(late.ok("query-status", None)["status"], "prelaunch");
}

/// The vmm, killed when the test ends, passed or failed.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
