//! QMP run control against the stock Linux guest under emu: `stop` pauses the guest and
//! `cont` resumes it with its clock caught up with the host's (no drift across a pause), `pmemsave` saves a page the guest wrote, `system_reset`
//! reboots to GUEST-READY, and `system_powerdown` presses the ACPI power button, which
//! the initramfs answers by powering off (the vmm then exits with status 0).

use std::time::{Duration, Instant};

use serde_json::json;
use vmm_tests::console::GuestConsole;
use vmm_tests::qmp::Qmp;
use vmm_tests::TempDir;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// The guest's uptime in seconds, from /proc/uptime.
fn uptime(console: &mut GuestConsole) -> f64 {
    let out = console.run("cat /proc/uptime", CMD_TIMEOUT);
    out.lines()
        .find_map(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no uptime in {out:?}"))
}

#[test]
fn run_control_against_a_live_linux_guest() {
    let dir = TempDir::new("emu-qmp");
    let socket = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", socket.display());
    let mut console = GuestConsole::boot_stock_linux(&["-qmp", &qmp_arg]);
    let mut qmp = Qmp::connect(&socket);
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);

    // stop pauses the guest; after cont its clock has kept up with the host's: a 3 s pause
    // shows in its uptime as 3 s, not as a lag behind the host.
    let before = uptime(&mut console);
    let host_start = Instant::now();
    qmp.execute_with_event("stop", None, "STOP");
    assert_eq!(qmp.status()["status"], "paused");
    std::thread::sleep(Duration::from_secs(3));
    qmp.execute_with_event("cont", None, "RESUME");
    let after = uptime(&mut console);
    let host_elapsed = host_start.elapsed().as_secs_f64();
    let guest_elapsed = after - before;
    assert!(
        (guest_elapsed - host_elapsed).abs() < 0.5,
        "guest uptime moved {guest_elapsed:.2} s while the host moved {host_elapsed:.2} s \
         across a 3 s stop"
    );
    let messages = console.run("dmesg | grep -c -i 'soft lockup'; true", CMD_TIMEOUT);
    assert!(
        messages.lines().any(|l| l.trim() == "0"),
        "the pause looked like a lockup: {messages}"
    );
    // ... and then runs on at the host's pace.
    let before = uptime(&mut console);
    std::thread::sleep(Duration::from_secs(2));
    let after = uptime(&mut console);
    assert!(after - before >= 1.9, "uptime {before} -> {after} over 2 s");

    // pmemsave of a page the guest wrote through /dev/mem.
    let address = 0x0010_0000u64 - 0x1000; // a free page below 1 MiB
    let words = [0x1122_3344u32, 0xdead_beef, 0x0bad_cafe, 0x5566_7788];
    for (i, w) in words.iter().enumerate() {
        let out = console.run(
            &format!("devmem {:#x} 32 {w:#x}", address + 4 * i as u64),
            CMD_TIMEOUT,
        );
        assert!(!out.contains("devmem:"), "devmem failed: {out}");
    }
    let file = dir.join("page.bin");
    qmp.ok(
        "pmemsave",
        Some(json!({ "val": address, "size": 16, "filename": file.to_str().unwrap() })),
    );
    let saved = std::fs::read(&file).unwrap();
    let expected: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(saved, expected);

    // system_reset: RESET, and the guest boots to GUEST-READY again.
    let event = qmp.execute_with_event("system_reset", None, "RESET");
    assert_eq!(
        event["data"],
        json!({ "guest": false, "reason": "host-qmp-system-reset" })
    );
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);

    // system_powerdown: POWERDOWN, the guest powers off, SHUTDOWN, and the vmm exits 0.
    qmp.execute_with_event("system_powerdown", None, "POWERDOWN");
    console.wait_for("power button pressed, powering off", CMD_TIMEOUT);
    let shutdown = qmp.wait_event("SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        json!({ "guest": true, "reason": "guest-shutdown" })
    );
    assert_eq!(console.wait_exit(CMD_TIMEOUT), Some(0));
}
