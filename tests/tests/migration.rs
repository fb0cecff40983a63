//! Live migration between two vmm processes under emu, with a tiny guest that counts in
//! memory and stamps a 16 MiB buffer page by page with the count, checking every page
//! against the count before each report: a page lost or stale on the destination prints
//! `BAD`. Precopy over unix, tcp and exec (save to a file and restore, twice), the counter
//! going on from where it stopped, the events in order and query-migrate's figures;
//! a destination with other RAM refuses and the source runs on; cancel; and a negative
//! control: with the CPU's dirty log switched off (a test-only switch) the checker finds
//! the loss.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::migration::*;
use vmm_tests::qmp::Qmp;
use vmm_tests::{read_file, wait_until, TempDir};

const TIMEOUT: Duration = Duration::from_secs(120);

/// MIGRATION events on `qmp` until `last`; their statuses in order.
fn statuses_until(qmp: &mut Qmp<UnixStream>, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        let e = qmp.wait_event("MIGRATION");
        let s = e["data"]["status"].as_str().unwrap_or("").to_string();
        seen.push(s.clone());
        if s == last || s == "failed" || s == "cancelled" || s == "completed" {
            break;
        }
    }
    seen
}

fn status(qmp: &mut Qmp<UnixStream>) -> String {
    qmp.ok("query-status", None)["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Migrate `src` to `dst` (listening at `uri`) and check that the guest goes on there
/// with every page right.
fn migrate_and_check(src: &mut Vm, dst: &mut Vm, uri: &str) -> Value {
    let before = wait_counts(&src.serial, 2);
    assert_eq!(
        src.qmp.request("migrate", Some(json!({ "uri": uri }))),
        json!({"return": {}})
    );
    let seen = statuses_until(&mut src.events, "completed");
    assert_eq!(seen, ["setup", "active", "completed"], "MIGRATION events");
    let info = src.qmp.ok("query-migrate", None);
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(status(&mut src.qmp), "postmigrate");
    let ram = &info["ram"];
    assert_eq!(ram["total"], 32u64 << 20, "{info}");
    assert_eq!(ram["remaining"], 0, "{info}");
    let pages = ram["normal"].as_u64().unwrap() + ram["duplicate"].as_u64().unwrap();
    assert!(pages >= 8192, "every page at least once: {info}");
    assert!(
        ram["transferred"].as_u64().unwrap() >= ram["normal"].as_u64().unwrap() * 4096,
        "{info}"
    );
    assert!(ram["dirty-sync-count"].as_u64().unwrap() >= 1, "{info}");
    assert!(info["downtime"].as_u64().is_some() && info["total-time"].as_u64().is_some());
    // The source stopped for good: its reports end.
    let last_source = *counts(&src.serial).last().unwrap();
    assert!(last_source >= *before.last().unwrap());
    wait_until("the destination to run", TIMEOUT, || {
        status(&mut dst.qmp) == "running"
    });
    // The destination goes on counting from where the source stopped, every page right.
    let after = wait_counts(&dst.serial, 2);
    assert!(
        after[0] > last_source,
        "the count goes on: source {last_source:#x}, destination {:#x}",
        after[0]
    );
    info
}

#[test]
fn a_counting_guest_moves_over_unix_and_tcp_and_goes_on() {
    let dir = TempDir::new("migrate-unix");
    let kernel = counting_guest(&dir);
    let mig = dir.join("mig.sock");
    let incoming = format!("unix:{}", mig.display());
    let mut a = vm(&dir, "a", &kernel, &[]);
    let mut b = vm(&dir, "b", &kernel, &["-incoming", &incoming]);
    assert_eq!(status(&mut b.qmp), "inmigrate");
    let info = migrate_and_check(&mut a, &mut b, &incoming);
    eprintln!("unix: {info}");

    // And on again, over tcp, to a third.
    let port = 20000 + (std::process::id() % 20000) as u16;
    let tcp = format!("tcp:127.0.0.1:{port}");
    let mut c = vm(&dir, "c", &kernel, &["-incoming", &tcp]);
    b.qmp.ok(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "events", "state": true}]})),
    );
    let info = migrate_and_check(&mut b, &mut c, &tcp);
    eprintln!("tcp: {info}");
}

#[test]
fn a_guest_saved_with_exec_restores_twice() {
    let dir = TempDir::new("migrate-exec");
    let kernel = counting_guest(&dir);
    let file = dir.join("saved.vmm");
    let mut a = vm(&dir, "a", &kernel, &[]);
    wait_counts(&a.serial, 2);
    let save = format!("exec:cat > {}", file.display());
    assert_eq!(
        a.qmp.request("migrate", Some(json!({ "uri": save }))),
        json!({"return": {}})
    );
    assert_eq!(
        statuses_until(&mut a.events, "completed").last().unwrap(),
        "completed"
    );
    let saved = *counts(&a.serial).last().unwrap();
    drop(a);
    let restore = format!("exec:cat {}", file.display());
    for name in ["b", "c"] {
        let b = vm(&dir, name, &kernel, &["-incoming", &restore]);
        let after = wait_counts(&b.serial, 2);
        assert!(after[0] > saved, "{name}: {:#x} after {saved:#x}", after[0]);
        assert!(
            after[0] < saved + (64 << 20),
            "{name}: restored from the file, not started afresh"
        );
    }
}

#[test]
fn refused_failed_and_cancelled_migrations_leave_the_source_running() {
    let dir = TempDir::new("migrate-faults");
    let kernel = counting_guest(&dir);
    let mut a = vm(&dir, "a", &kernel, &[]);
    wait_counts(&a.serial, 1);

    // QEMU's errors before anything starts.
    let err = |qmp: &mut Qmp<UnixStream>, uri: &str| {
        qmp.request("migrate", Some(json!({ "uri": uri })))["error"]["desc"].clone()
    };
    assert_eq!(
        err(&mut a.qmp, "bogus:x"),
        "Parameter 'uri' expects a valid migration protocol"
    );
    assert_eq!(
        err(&mut a.qmp, "fd:nope"),
        "File descriptor named 'nope' has not been found"
    );

    // A destination with other RAM refuses; the source fails and runs on.
    let mig = dir.join("mig.sock");
    let uri = format!("unix:{}", mig.display());
    let mut small = vm(&dir, "small", &kernel, &["-incoming", &uri, "-m", "16"]);
    a.qmp.ok("migrate", Some(json!({ "uri": uri })));
    assert_eq!(
        statuses_until(&mut a.events, "failed").last().unwrap(),
        "failed"
    );
    let info = a.qmp.ok("query-migrate", None);
    assert!(
        info["error-desc"].as_str().unwrap_or("").contains("RAM"),
        "{info}"
    );
    assert_eq!(status(&mut a.qmp), "running");
    let _ = small.child.wait();
    let n = counts(&a.serial).len();
    wait_counts(&a.serial, n + 1);

    // Nobody listening: failed, running on.
    a.qmp.ok("migrate", Some(json!({ "uri": uri })));
    assert_eq!(
        statuses_until(&mut a.events, "failed").last().unwrap(),
        "failed"
    );
    assert_eq!(status(&mut a.qmp), "running");

    // Cancelled while slow (1 MiB/s), running on.
    let mut b = vm(&dir, "b", &kernel, &["-incoming", &uri]);
    a.qmp
        .ok("migrate_set_speed", Some(json!({ "value": 1 << 20 })));
    a.qmp.ok("migrate", Some(json!({ "uri": uri })));
    wait_until("an active migration", TIMEOUT, || {
        a.qmp.ok("query-migrate", None)["status"] == "active"
    });
    assert_eq!(
        a.qmp.request("migrate", Some(json!({ "uri": uri })))["error"]["desc"],
        "There's a migration process in progress"
    );
    a.qmp.ok("migrate_cancel", None);
    assert_eq!(
        statuses_until(&mut a.events, "cancelled").last().unwrap(),
        "cancelled"
    );
    assert_eq!(status(&mut a.qmp), "running");
    let _ = b.child.wait();

    // And then a migration that works.
    a.qmp.ok(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": 1u64 << 30 })),
    );
    let mut c = vm(&dir, "c", &kernel, &["-incoming", &uri]);
    migrate_and_check(&mut a, &mut c, &uri);
}

#[test]
fn without_the_cpu_dirty_log_the_checker_finds_the_loss() {
    let dir = TempDir::new("migrate-negative");
    let kernel = counting_guest(&dir);
    let mig = dir.join("mig.sock");
    let uri = format!("unix:{}", mig.display());
    let mut a = vm_with_env(&dir, "a", &kernel, &[], &[("VMM_TEST_NO_DIRTY_LOG", "cpu")]);
    let b = vm(&dir, "b", &kernel, &["-incoming", &uri]);
    wait_counts(&a.serial, 2);
    a.qmp.ok("migrate", Some(json!({ "uri": uri })));
    assert_eq!(
        statuses_until(&mut a.events, "completed").last().unwrap(),
        "completed"
    );
    wait_until("the checker on the destination", TIMEOUT, || {
        read_file(&b.serial).contains("BAD")
    });
}

#[test]
fn a_destination_killed_mid_stream_and_a_cancel_after_the_stop_leave_the_source_running() {
    let dir = TempDir::new("migrate-kill");
    let kernel = counting_guest(&dir);
    let mig = dir.join("mig.sock");
    let uri = format!("unix:{}", mig.display());
    let mut a = vm(&dir, "a", &kernel, &[]);
    wait_counts(&a.serial, 1);

    // The destination dies while the bulk pass crawls at 1 MiB/s.
    let mut b = vm(&dir, "b", &kernel, &["-incoming", &uri]);
    a.qmp
        .ok("migrate_set_speed", Some(json!({ "value": 1 << 20 })));
    a.qmp.ok("migrate", Some(json!({ "uri": uri })));
    wait_until("an active migration", TIMEOUT, || {
        a.qmp.ok("query-migrate", None)["ram"]["transferred"]
            .as_u64()
            .is_some_and(|t| t > 2 << 20)
    });
    let _ = b.child.kill();
    assert_eq!(
        statuses_until(&mut a.events, "failed").last().unwrap(),
        "failed"
    );
    assert_eq!(status(&mut a.qmp), "running");
    let n = counts(&a.serial).len();
    wait_counts(&a.serial, n + 1);

    // A downtime limit so large that the source stops at once, then sends the rest at
    // 1 MiB/s: cancelled while stopped, it runs again where it was.
    let _c = vm(&dir, "c", &kernel, &["-incoming", &uri]);
    a.qmp.ok(
        "migrate-set-parameters",
        Some(json!({ "downtime-limit": 2_000_000 })),
    );
    a.qmp.ok("migrate", Some(json!({ "uri": uri })));
    wait_until("the source to stop for the last part", TIMEOUT, || {
        status(&mut a.qmp) == "finish-migrate"
    });
    a.qmp.ok("migrate_cancel", None);
    assert_eq!(
        statuses_until(&mut a.events, "cancelled").last().unwrap(),
        "cancelled"
    );
    wait_until("the source to run again", TIMEOUT, || {
        status(&mut a.qmp) == "running"
    });
    let n = counts(&a.serial).len();
    wait_counts(&a.serial, n + 1);

    // And a migration that works after all that.
    a.qmp.ok(
        "migrate-set-parameters",
        Some(json!({ "downtime-limit": 300, "max-bandwidth": 1u64 << 30 })),
    );
    let mut d = vm(&dir, "d", &kernel, &["-incoming", &uri]);
    migrate_and_check(&mut a, &mut d, &uri);
}

/// Under KVM (kvm-pvm here): KVM logs the guest's writes and holds its vCPU and platform
/// state; the counting guest moves to another vmm and goes on from where it stopped, every
/// page right, twice over.
#[test]
fn under_kvm_the_counting_guest_moves_and_goes_on() {
    vmm_tests::require_kvm!();
    let dir = TempDir::new("migrate-kvm");
    let kernel = counting_guest(&dir);
    let mig = dir.join("mig.sock");
    let incoming = format!("unix:{}", mig.display());
    let mut a = vm_on("kvm", &dir, "a", &kernel, &[], &[]);
    let mut b = vm_on("kvm", &dir, "b", &kernel, &["-incoming", &incoming], &[]);
    let info = migrate_and_check(&mut a, &mut b, &incoming);
    eprintln!("kvm: {info}");
    let mig2 = dir.join("mig2.sock");
    let incoming = format!("unix:{}", mig2.display());
    let mut c = vm_on("kvm", &dir, "c", &kernel, &["-incoming", &incoming], &[]);
    b.qmp.ok(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "events", "state": true}]})),
    );
    migrate_and_check(&mut b, &mut c, &incoming);
}

/// The negative control under KVM: with KVM's dirty log switched off (the test-only
/// switch), the checker on the destination finds the pages that were not sent again.
#[test]
fn under_kvm_without_the_dirty_log_the_checker_sees_loss() {
    vmm_tests::require_kvm!();
    let dir = TempDir::new("migrate-kvm-nolog");
    let kernel = counting_guest(&dir);
    let mig = dir.join("mig.sock");
    let incoming = format!("unix:{}", mig.display());
    let off = [("VMM_TEST_NO_DIRTY_LOG", "cpu")];
    let mut a = vm_on("kvm", &dir, "a", &kernel, &[], &off);
    let b = vm_on("kvm", &dir, "b", &kernel, &["-incoming", &incoming], &[]);
    wait_counts(&a.serial, 2);
    a.qmp.ok("migrate", Some(json!({ "uri": incoming })));
    assert_eq!(
        statuses_until(&mut a.events, "completed").last().unwrap(),
        "completed"
    );
    wait_until("the checker to find the loss", TIMEOUT, || {
        read_file(&b.serial).contains("BAD")
    });
}

/// Auto-converge: a guest that rewrites its 16 MiB faster than a 16 MiB/s link carries
/// it (with a 1 ms downtime limit, so it can never fit) has its vCPUs throttled step by
/// step, as query-migrate's `cpu-throttle-percentage` shows, and counts at the speed the
/// throttle leaves it (at 50% and beyond it used to stop counting at all: the kicks that
/// end each run came faster than the sleeps let it run); cancelled, it runs at full speed
/// again and the throttle is gone.
#[test]
fn auto_converge_throttles_a_fast_writer_and_cancel_lifts_it() {
    let dir = TempDir::new("migrate-converge");
    let kernel = counting_guest(&dir);
    let mig = dir.join("mig.sock");
    let uri = format!("unix:{}", mig.display());
    let mut a = vm(&dir, "a", &kernel, &[]);
    let _b = vm(&dir, "b", &kernel, &["-incoming", &uri]);
    wait_counts(&a.serial, 1);
    let full = count_rate(&a.serial);
    a.qmp.ok(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "auto-converge", "state": true}]})),
    );
    a.qmp.ok(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": 16u64 << 20, "downtime-limit": 1 })),
    );
    a.qmp.ok("migrate", Some(json!({ "uri": uri })));
    let mut steps = Vec::new();
    wait_until("a throttle of 50% or more", TIMEOUT, || {
        let info = a.qmp.ok("query-migrate", None);
        assert!(
            info["status"] == "setup" || info["status"] == "active",
            "{info}"
        );
        let t = info["cpu-throttle-percentage"].as_u64().unwrap_or(0);
        if steps.last() != Some(&t) {
            steps.push(t);
        }
        t >= 50
    });
    assert_eq!(steps[..3], [0, 20, 30], "QEMU's steps: {steps:?}");
    let throttled = count_rate(&a.serial);
    a.qmp.ok("migrate_cancel", None);
    assert_eq!(
        statuses_until(&mut a.events, "cancelled").last().unwrap(),
        "cancelled"
    );
    let info = a.qmp.ok("query-migrate", None);
    assert!(info.get("cpu-throttle-percentage").is_none(), "{info}");
    let again = count_rate(&a.serial);
    eprintln!("counts per second: {full:.0} before, {throttled:.0} throttled, {again:.0} after");
    assert!(
        throttled < full * 0.75,
        "throttled at 50%+: {throttled:.0} against {full:.0}"
    );
    assert!(
        again > throttled * 1.3,
        "the throttle is lifted: {again:.0} against {throttled:.0}"
    );
}

/// The guest's counting speed, from the arrival times of its next reports.
fn count_rate(serial: &Path) -> f64 {
    let mut seen: Vec<(Instant, u64)> = Vec::new();
    let mut known = counts(serial).len();
    let deadline = Instant::now() + TIMEOUT;
    while seen.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the guest stopped reporting: {seen:?}"
        );
        let c = counts(serial);
        if c.len() > known {
            known = c.len();
            seen.push((Instant::now(), *c.last().unwrap()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (t0, c0) = seen[0];
    let (t1, c1) = seen[seen.len() - 1];
    (c1.wrapping_sub(c0) & 0xffff_ffff) as f64 / (t1 - t0).as_secs_f64()
}

/// Across accelerators: the counting guest saved under emu loads under KVM (kvm-pvm here),
/// goes on counting with every page right, and moves back to emu and goes on again.
#[test]
fn the_counting_guest_moves_from_emu_to_kvm_and_back() {
    vmm_tests::require_kvm!();
    let dir = TempDir::new("migrate-cross");
    let kernel = counting_guest(&dir);
    let to_kvm = format!("unix:{}", dir.join("to-kvm.sock").display());
    let to_emu = format!("unix:{}", dir.join("to-emu.sock").display());
    let mut a = vm_on("emu", &dir, "a", &kernel, &[], &[]);
    let mut b = vm_on("kvm", &dir, "b", &kernel, &["-incoming", &to_kvm], &[]);
    let info = migrate_and_check(&mut a, &mut b, &to_kvm);
    eprintln!("emu to kvm: {info}");
    let mut c = vm_on("emu", &dir, "c", &kernel, &["-incoming", &to_emu], &[]);
    b.qmp.ok(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "events", "state": true}]})),
    );
    let info = migrate_and_check(&mut b, &mut c, &to_emu);
    eprintln!("kvm to emu: {info}");
}

/// migrate_cancel while the source is still connecting (setup): a destination whose listen
/// queue is full drops the source's SYNs, so the connection hangs; the cancel ends it at
/// once and the source runs on.
#[test]
fn a_cancel_while_connecting_ends_the_setup_at_once() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let dir = TempDir::new("migrate-setup");
    let kernel = counting_guest(&dir);
    let mut a = vm(&dir, "a", &kernel, &[]);
    wait_counts(&a.serial, 1);
    // A listener with a backlog of 0, its queue filled by two connections never accepted.
    // SAFETY: socket() with constant arguments; the fd is owned at once.
    let listener =
        unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0)) };
    let listener_std = std::net::TcpListener::from(listener);
    let bound = bind_loopback(&listener_std);
    // SAFETY: listen(2) on a bound socket we own.
    assert_eq!(unsafe { libc::listen(listener_std.as_raw_fd(), 0) }, 0);
    let _queued: Vec<_> = (0..2)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&bound, Duration::from_millis(300)).ok()
        })
        .collect();
    let uri = format!("tcp:127.0.0.1:{}", bound.port());
    a.qmp.ok("migrate", Some(json!({ "uri": uri })));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(a.qmp.ok("query-migrate", None)["status"], "setup");
    let asked = Instant::now();
    a.qmp.ok("migrate_cancel", None);
    assert_eq!(
        statuses_until(&mut a.events, "cancelled"),
        ["setup", "cancelled"]
    );
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "cancelled in {:?}",
        asked.elapsed()
    );
    assert_eq!(status(&mut a.qmp), "running");
    let n = counts(&a.serial).len();
    wait_counts(&a.serial, n + 1);
}

/// Bind `socket` (not listening yet) to 127.0.0.1 on a free port; the address it got.
fn bind_loopback(socket: &std::net::TcpListener) -> std::net::SocketAddr {
    use std::os::fd::AsRawFd;
    // SAFETY: sockaddr_in is plain data.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as u16;
    sin.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: bind(2) with a valid sockaddr_in of its size.
    let r = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            &sin as *const libc::sockaddr_in as *const libc::sockaddr,
            len,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    socket.local_addr().expect("the bound address")
}
