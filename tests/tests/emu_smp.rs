//! SMP under emu, end to end with `-smp 4`: the stock guest brings up four CPUs (nproc and
//! query-cpus agree, each vCPU with its own host thread), four parallel sha256sum loops give
//! the right digests, a static C program (`tests/guest/smp_stress.c`, built here with the
//! host's gcc) makes LOCK XADD, CMPXCHG and spinlock-protected increments from four CPUs with
//! exact totals and x86's store order, `stop` freezes every vCPU and `cont` resumes them all,
//! `inject-nmi` reaches every CPU, and guest time follows the host's: `sleep 5` takes 5 s,
//! and a pause leaves no drift.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use vmm_tests::console::GuestConsole;
use vmm_tests::qmp::Qmp;
use vmm_tests::{repo_root, TempDir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const CMD_TIMEOUT: Duration = Duration::from_secs(300);
const CPUS: usize = 4;

/// Build the stress program (static, so the initramfs needs no libraries).
fn build_stress(dir: &TempDir) -> PathBuf {
    let out = dir.join("smp_stress");
    let src = repo_root().join("tests/guest/smp_stress.c");
    let status = Command::new("cc")
        .args(["-static", "-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("a C compiler (scripts/test installs gcc and libc6-dev)");
    assert!(status.success(), "building {}", src.display());
    out
}

fn host_sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Each vCPU's (pc, halted) from query-cpus.
fn cpu_states(qmp: &mut Qmp<std::os::unix::net::UnixStream>) -> Vec<(u64, bool)> {
    qmp.ok("query-cpus", None)
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["pc"].as_u64().unwrap(), c["halted"].as_bool().unwrap()))
        .collect()
}

fn host_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The guest's `date +%s` and the host's time, read around it.
fn guest_date(console: &mut GuestConsole) -> (u64, u64, u64) {
    let before = host_seconds();
    let out = console.run("date +%s", CMD_TIMEOUT);
    let after = host_seconds();
    let guest = out
        .lines()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("date printed no number: {out:?}"));
    (before, guest, after)
}

#[test]
fn four_cpus_share_work_locks_and_time() {
    let dir = TempDir::new("emu-smp");
    let stress = build_stress(&dir);
    let program = std::fs::read(&stress).unwrap();
    let digest = host_sha256(&stress);
    // The program goes in on a raw disk, padded to whole sectors.
    let disk = dir.join("prog.raw");
    let mut image = program.clone();
    image.resize(program.len().next_multiple_of(1 << 20), 0);
    std::fs::write(&disk, image).unwrap();
    let drive = format!("file={},format=raw,if=virtio,readonly=on", disk.display());
    let qmp_sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let smp = CPUS.to_string();
    let mut console =
        GuestConsole::boot_stock_linux(&["-smp", &smp, "-drive", &drive, "-qmp", &qmp_arg]);
    let mut qmp = Qmp::connect(&qmp_sock);
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);

    // Four CPUs, in the guest and in QMP, each vCPU on its own host thread.
    let nproc = console.run("nproc; grep -c ^processor /proc/cpuinfo", CMD_TIMEOUT);
    let counts: Vec<&str> = nproc.lines().map(str::trim).collect();
    assert!(
        counts.iter().filter(|l| **l == "4").count() == 2,
        "nproc and /proc/cpuinfo: {nproc}"
    );
    let cpus = qmp.ok("query-cpus", None);
    let cpus = cpus.as_array().unwrap();
    assert_eq!(cpus.len(), CPUS, "{cpus:?}");
    let mut threads: Vec<u64> = cpus
        .iter()
        .map(|c| c["thread_id"].as_u64().unwrap())
        .collect();
    threads.sort_unstable();
    threads.dedup();
    assert_eq!(threads.len(), CPUS, "thread ids: {cpus:?}");
    for (i, c) in cpus.iter().enumerate() {
        assert_eq!(c["CPU"], Value::from(i), "{c}");
        assert_eq!(c["current"], Value::from(i == 0), "{c}");
    }

    // The program, from the disk.
    let copy = console.run(
        &format!(
            "head -c {} /dev/vda > /tmp/smp_stress; chmod +x /tmp/smp_stress; \
             sha256sum /tmp/smp_stress",
            program.len()
        ),
        CMD_TIMEOUT,
    );
    assert!(copy.contains(&digest), "copy: {copy}");

    // Four parallel sha256sum loops.
    let sums = console.run(
        "for j in 1 2 3 4; do (for k in 1 2 3; do sha256sum /tmp/smp_stress; done > /tmp/s$j) & \
         done; wait; cat /tmp/s1 /tmp/s2 /tmp/s3 /tmp/s4 | sort | uniq -c",
        CMD_TIMEOUT,
    );
    assert!(
        sums.contains(&format!("12 {digest}")),
        "parallel sha256sum: {sums}"
    );

    // Lock-protected increments from four CPUs.
    let stress_out = console.run("/tmp/smp_stress 4 20000", CMD_TIMEOUT);
    assert!(stress_out.contains("SMP-OK"), "smp_stress: {stress_out}");
    eprintln!("smp_stress: {}", stress_out.trim());

    // stop freezes every vCPU (while each one spins, pinned to it), cont resumes them all.
    console.run(
        "for j in 0 1 2 3; do taskset -c $j sh -c 'while :; do :; done' & \
         echo $! >> /tmp/spinners; done; sleep 1",
        CMD_TIMEOUT,
    );
    let moving = |qmp: &mut Qmp<_>| {
        let a = cpu_states(qmp);
        std::thread::sleep(Duration::from_millis(300));
        let b = cpu_states(qmp);
        a.iter().zip(&b).filter(|(x, y)| x.0 != y.0).count()
    };
    assert_eq!(moving(&mut qmp), CPUS, "every spinning vCPU moves");
    qmp.execute_with_event("stop", None, "STOP");
    assert_eq!(moving(&mut qmp), 0, "a vCPU moved while stopped");
    std::thread::sleep(Duration::from_secs(3));
    qmp.execute_with_event("cont", None, "RESUME");
    assert_eq!(moving(&mut qmp), CPUS, "every vCPU resumed");
    console.run("kill $(cat /tmp/spinners); true", CMD_TIMEOUT);

    // inject-nmi reaches every CPU (an NMI IPI to all, as QEMU sends it): each one reports
    // an NMI for which no handler claims responsibility.
    qmp.ok("inject-nmi", None);
    let nmis = console.run(
        "sleep 1; dmesg | grep -c 'NMI received for unknown reason'",
        CMD_TIMEOUT,
    );
    assert!(
        nmis.lines().any(|l| l.trim() == CPUS.to_string()),
        "NMIs seen by the CPUs: {nmis}"
    );

    // Guest time follows the host's across that pause, and runs at its pace.
    let (before, guest, after) = guest_date(&mut console);
    assert!(
        guest + 1 >= before && guest <= after + 1,
        "guest date {guest}, host {before}..{after} after a 3 s stop"
    );
    let start = Instant::now();
    let slept = console.run("sleep 5; echo slept-$((2+3))", CMD_TIMEOUT);
    let took = start.elapsed();
    assert!(slept.contains("slept-5"), "{slept}");
    assert!(
        took >= Duration::from_millis(4900) && took < Duration::from_millis(6500),
        "sleep 5 took {took:?} of host time"
    );
    eprintln!("sleep 5 took {took:?}");

    console.send("poweroff -f\n");
    assert_eq!(console.wait_exit(CMD_TIMEOUT), Some(0));
}
