//! Live migration of the stock guest under emu: two vmm processes on one host. A shell
//! loop counting in the guest goes on counting on the destination, the guest's uptime goes
//! on from where it was (its clock does not jump), and its wall clock stays the host's.
//! Its balloon moves too: inflated to 256 MiB on the source, the destination keeps the
//! target (and takes none of the released memory back), and deflates it on command.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use vmm_tests::console::{stock_linux_args, GuestConsole};
use vmm_tests::netns::NetNs;
use vmm_tests::qmp::Qmp;
use vmm_tests::transfer::{data, guest_sum, paced_sender, sha256};
use vmm_tests::{guest_program_disk, wait_until, TempDir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(180);
const HOST: &str = "10.9.0.1";
const GUEST: &str = "10.9.0.2";
const GUEST_IP: [u8; 4] = [10, 9, 0, 2];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

#[test]
fn the_stock_guest_moves_and_its_shell_goes_on() {
    let dir = TempDir::new("emu-migrate");
    let (qa, qb, mig) = (dir.join("a.qmp"), dir.join("b.qmp"), dir.join("mig.sock"));
    let qmp_a = format!("unix:{},server=on,wait=off", qa.display());
    let qmp_b = format!("unix:{},server=on,wait=off", qb.display());
    let uri = format!("unix:{}", mig.display());
    let balloon = "virtio-balloon-pci,id=balloon0";
    let mut a = GuestConsole::boot_stock_linux(&["-qmp", &qmp_a, "-device", balloon]);
    a.wait_for("GUEST-READY", BOOT_TIMEOUT);
    a.wait_for("# ", CMD_TIMEOUT);
    let started = a.run(
        "(i=0; while true; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/count; \
         done) & sleep 1; echo started",
        CMD_TIMEOUT,
    );
    assert!(started.contains("started"), "{started}");
    let mut qa = Qmp::connect(&qa);
    qa.ok("balloon", Some(json!({ "value": 256u64 << 20 })));
    wait_until("the balloon to inflate", CMD_TIMEOUT, || {
        qa.ok("query-balloon", None)["actual"] == json!(256u64 << 20)
    });
    let before = count_and_uptime(&mut a);
    let args = stock_linux_args(&["-qmp", &qmp_b, "-device", balloon, "-incoming", &uri]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut b = GuestConsole::spawn(&args);
    wait_until("the destination's monitor", CMD_TIMEOUT, || qb.exists());
    let mut qb = Qmp::connect(&qb);
    qa.ok("migrate", Some(json!({ "uri": uri })));
    wait_until("the migration", CMD_TIMEOUT, || {
        let s = qa.ok("query-migrate", None)["status"].clone();
        assert_ne!(s, "failed", "{}", qa.ok("query-migrate", None));
        s == "completed"
    });
    eprintln!("{}", qa.ok("query-migrate", None));
    assert_eq!(qb.ok("query-status", None)["status"], "running");
    assert_eq!(qa.ok("query-status", None)["status"], "postmigrate");
    let after = count_and_uptime(&mut b);
    std::thread::sleep(Duration::from_secs(1));
    let later = count_and_uptime(&mut b);
    // The balloon came along: its target and the guest's answer; the memory it holds was
    // not sent (holes travel as zero pages, and stay holes).
    assert_eq!(
        qb.ok("query-balloon", None),
        json!({"actual": 256u64 << 20})
    );
    let info = qa.ok("query-migrate", None);
    assert!(
        info["ram"]["normal"].as_u64().unwrap() * 4096 < 256 << 20,
        "the ballooned memory was not sent: {info}"
    );
    let total = b.run("grep MemTotal /proc/meminfo", CMD_TIMEOUT);
    qb.ok("balloon", Some(json!({ "value": 512u64 << 20 })));
    wait_until(
        "the balloon to deflate on the destination",
        CMD_TIMEOUT,
        || qb.ok("query-balloon", None)["actual"] == json!(512u64 << 20),
    );
    let grown = b.run("grep MemTotal /proc/meminfo", CMD_TIMEOUT);
    assert_ne!(total, grown, "the guest has its memory back");
    eprintln!("(count, uptime, wall clock): before {before:?}, after {after:?}, later {later:?}");
    assert!(
        after.0 >= before.0 && later.0 > after.0,
        "the loop goes on counting"
    );
    assert!(
        after.1 >= before.1 && after.1 < before.1 + 60.0,
        "uptime goes on from where it was"
    );
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        later.2.abs_diff(host) <= 5,
        "the guest's wall clock is the host's: {} vs {host}",
        later.2
    );
}

/// The guest's counter, its uptime in seconds, and its wall clock (epoch seconds).
fn count_and_uptime(console: &mut GuestConsole) -> (u64, f64, u64) {
    let out = console.run(
        "echo N $(cat /tmp/count) $(cut -d' ' -f1 /proc/uptime) $(date +%s)",
        CMD_TIMEOUT,
    );
    let line = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("N "))
        .unwrap_or_else(|| panic!("no figures in {out:?}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.len(), 3, "{line}");
    (
        f[0].parse().unwrap(),
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
    )
}

/// A guest rewriting 32 MiB of memory with page-stamped, generation-numbered patterns
/// (checking every page after each pass) and a loop writing its virtio-blk disk through
/// vmm-blk (reading each block back direct) both go on across the move with nothing lost,
/// though the disk's vmm-blk is killed (-9) once before the migration (logging is armed on
/// its successor) and once halfway through it (logging re-armed on the restart);
/// the destination's vmm-blk takes the image's lock only once the source let go of it.
#[test]
fn memory_and_disk_writers_move_with_nothing_lost() {
    let dir = TempDir::new("emu-migrate-blk");
    let (program, len) = guest_program_disk(&dir, "memstamp", 0);
    let data = dir.join("data.img");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let (qa, qb, mig) = (dir.join("a.qmp"), dir.join("b.qmp"), dir.join("mig.sock"));
    let qmp_a = format!("unix:{},server=on,wait=off", qa.display());
    let qmp_b = format!("unix:{},server=on,wait=off", qb.display());
    let uri = format!("unix:{}", mig.display());
    let prog = format!("file={},format=raw,if=none,id=prog", program.display());
    let disk = format!("file={},format=raw,if=none,id=data", data.display());
    let devices = [
        "-drive",
        &prog,
        "-device",
        "virtio-blk-pci,drive=prog,id=vprog",
        "-drive",
        &disk,
        "-device",
        "virtio-blk-pci,drive=data,id=vdata",
    ];
    let mut args_a = vec!["-qmp", qmp_a.as_str()];
    args_a.extend_from_slice(&devices);
    let mut a = GuestConsole::boot_stock_linux(&args_a);
    a.wait_for("GUEST-READY", BOOT_TIMEOUT);
    a.wait_for("# ", CMD_TIMEOUT);
    a.install_program("/dev/vda", len, "memstamp", CMD_TIMEOUT);
    let started = a.run(
        "/tmp/memstamp 32 40 > /tmp/stamp.log 2>&1 & \
         (i=0; while true; do i=$((i+1)); j=$((i % 16)); printf '%01048576d' $i > /tmp/w; \
          dd if=/tmp/w of=/dev/vdb bs=1048576 seek=$j count=1 oflag=direct 2>/dev/null; \
          a=$(md5sum < /tmp/w); \
          b=$(dd if=/dev/vdb bs=1048576 skip=$j count=1 iflag=direct 2>/dev/null | md5sum); \
          if [ \"$a\" = \"$b\" ]; then echo $i > /tmp/disk.ok; else echo $i >> /tmp/disk.bad; fi; \
          done) & sleep 2; echo started",
        CMD_TIMEOUT,
    );
    assert!(started.contains("started"), "{started}");
    let mut qa = Qmp::connect(&qa);
    let before = a.run("tail -n1 /tmp/stamp.log; cat /tmp/disk.ok", CMD_TIMEOUT);
    eprintln!("before: {before:?}");
    let mut args_b = vec!["-qmp", qmp_b.as_str(), "-incoming", uri.as_str()];
    args_b.extend_from_slice(&devices);
    let args_b = stock_linux_args(&args_b);
    let args_b: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let mut b = GuestConsole::spawn(&args_b);
    wait_until("the destination's monitor", CMD_TIMEOUT, || qb.exists());
    let mut qb = Qmp::connect(&qb);
    // The data disk's vmm-blk dies before the migration: the migration arms logging on the
    // process that replaced it.
    // SAFETY: kill(2) of the vmm-blk process, as a crash would end it.
    assert_eq!(
        unsafe { libc::kill(data_blk(&mut qa) as i32, libc::SIGKILL) },
        0
    );
    let restarted = qa.wait_event("__org.vmm_DEVICE_PROCESS_RESTARTED");
    assert_eq!(restarted["data"]["device"], "vdata", "{restarted}");
    // Slow enough that the data disk's vmm-blk can be killed while pages still go.
    qa.ok("migrate_set_speed", Some(json!({ "value": 24u64 << 20 })));
    let blk = data_blk(&mut qa);
    qa.ok("migrate", Some(json!({ "uri": uri })));
    wait_until("the bulk pass to be under way", CMD_TIMEOUT, || {
        let info = qa.ok("query-migrate", None);
        info["status"] == "active" && info["ram"]["transferred"].as_u64() > Some(8 << 20)
    });
    // The disk's process dies mid-migration: it is restarted, its writes are logged
    // again, and the migration ends with nothing lost.
    // SAFETY: kill(2) of the vmm-blk process, as a crash would end it.
    assert_eq!(unsafe { libc::kill(blk as i32, libc::SIGKILL) }, 0);
    let restarted = qa.wait_event("__org.vmm_DEVICE_PROCESS_RESTARTED");
    assert_eq!(restarted["data"]["device"], "vdata", "{restarted}");
    let at_restart = qa.ok("query-migrate", None);
    assert_eq!(at_restart["status"], "active", "{at_restart}");
    qa.ok("migrate_set_speed", Some(json!({ "value": 1u64 << 30 })));
    wait_until("the migration", CMD_TIMEOUT, || {
        let info = qa.ok("query-migrate", None);
        assert_ne!(info["status"], "failed", "{info}");
        info["status"] == "completed"
    });
    eprintln!("{}", qa.ok("query-migrate", None));
    assert_eq!(qb.ok("query-status", None)["status"], "running");
    std::thread::sleep(Duration::from_secs(3));
    let after = b.run(
        "tail -n1 /tmp/stamp.log; cat /tmp/disk.ok; cat /tmp/disk.bad 2>/dev/null | head -3; echo checked",
        CMD_TIMEOUT,
    );
    eprintln!("after: {after:?}");
    assert!(after.contains("checked"), "{after}");
    assert!(!after.contains("STAMP-BAD"), "memory lost: {after}");
    let pass = |text: &str| {
        text.lines()
            .rev()
            .filter_map(|l| l.trim().strip_prefix("STAMP-PASS "))
            .find_map(|n| n.parse::<u64>().ok())
    };
    let disk_count = |text: &str| {
        text.lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .next()
    };
    assert!(
        pass(&after) > pass(&before),
        "the memory writer goes on: {before:?} -> {after:?}"
    );
    assert!(
        disk_count(&after) > disk_count(&before),
        "the disk writer goes on: {before:?} -> {after:?}"
    );
    // Nothing read back differed from what was written.
    let bad = b.run("cat /tmp/disk.bad 2>/dev/null | wc -l", CMD_TIMEOUT);
    assert_eq!(bad.trim(), "0", "disk blocks read back wrong: {bad}");
}

/// The pid of the data disk's vmm-blk.
fn data_blk(qmp: &mut Qmp<std::os::unix::net::UnixStream>) -> u64 {
    let procs = qmp.ok("__org.vmm_query-device-processes", None);
    procs
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["program"] == "vmm-blk" && p["drive"] == "data")
        .and_then(|p| p["pid"].as_u64())
        .unwrap_or_else(|| panic!("no vmm-blk for the data disk: {procs}"))
}

/// A TCP transfer from a host in a test namespace to the guest, through vmm-net, goes on
/// across the move: the source's card is on `tap0`, the destination's on `tap1`, both on
/// one bridge. The guest announces itself once it runs on the destination, so the bridge
/// learns its address on `tap1` at once (a gratuitous ARP, seen on `tap1`), and what
/// arrived is what was sent. The
/// card's filter, set by the guest's driver, came along.
#[test]
fn a_tcp_transfer_through_vmm_net_goes_on_across_the_move() {
    let ns = NetNs::new("emig");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", &format!("{HOST}/24"), "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    for tap in ["tap0", "tap1"] {
        ns.tap(tap, None, false);
        ns.ip(&["link", "set", tap, "master", "br0"]);
    }
    let dir = TempDir::new("emu-migrate-net");
    let (qa, qb, mig) = (dir.join("a.qmp"), dir.join("b.qmp"), dir.join("mig.sock"));
    let qmp_a = format!("unix:{},server=on,wait=off", qa.display());
    let qmp_b = format!("unix:{},server=on,wait=off", qb.display());
    let uri = format!("unix:{}", mig.display());
    let nic = "virtio-net-pci,netdev=n0,id=nic0";
    let mut a = GuestConsole::boot_stock_linux_in(
        &ns,
        &[
            "-qmp",
            &qmp_a,
            "-netdev",
            "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device",
            nic,
        ],
    );
    a.wait_for("GUEST-READY", BOOT_TIMEOUT);
    a.wait_for("# ", CMD_TIMEOUT);
    let up = a.run(
        &format!("ip link set eth0 up; ip addr add {GUEST}/24 dev eth0; ping -c 2 -W 5 {HOST}"),
        CMD_TIMEOUT,
    );
    assert!(up.contains("2 packets received"), "{up}");
    let mut qa = Qmp::connect(&qa);
    let filter = qa.ok("query-rx-filter", None);

    // Host to guest: 24 MiB, paced so that it spans the move.
    let total = 24usize << 20;
    let payload = data(total, 11);
    let sum = sha256(&payload);
    a.send("nc -l -p 5002 < /dev/null > /tmp/in &\n");
    std::thread::sleep(Duration::from_millis(500));
    let (sender, sent) = paced_sender(&ns, (GUEST, 5002), payload, CMD_TIMEOUT);
    wait_until("the transfer to start", CMD_TIMEOUT, || {
        sent.load(Ordering::Relaxed) >= 2 << 20
    });

    let tap1 = ns.packet_socket("tap1");
    let mut b = GuestConsole::boot_stock_linux_in(
        &ns,
        &[
            "-qmp",
            &qmp_b,
            "-netdev",
            "tap,id=n0,ifname=tap1,script=no,downscript=no",
            "-device",
            nic,
            "-incoming",
            &uri,
        ],
    );
    wait_until("the destination's monitor", CMD_TIMEOUT, || qb.exists());
    let mut qb = Qmp::connect(&qb);
    qa.ok("migrate", Some(json!({ "uri": uri })));
    wait_until("the migration", CMD_TIMEOUT, || {
        let info = qa.ok("query-migrate", None);
        assert_ne!(info["status"], "failed", "{info}");
        info["status"] == "completed"
    });
    let at_switch = sent.load(Ordering::Relaxed);
    eprintln!(
        "{} bytes sent at the switch; {}",
        at_switch,
        qa.ok("query-migrate", None)
    );
    assert!(
        at_switch < total as u64,
        "the transfer spans the move ({at_switch} of {total} bytes sent)"
    );
    // The guest announced itself from the destination: a gratuitous ARP (sender and
    // target both its address) came out of tap1.
    let garp = tap1.recv_matching(Duration::from_secs(10), |f| {
        f.len() >= 42
            && f[12..14] == [0x08, 0x06]
            && f[6..12] == GUEST_MAC
            && f[28..32] == GUEST_IP
            && f[38..42] == GUEST_IP
    });
    assert!(garp.is_some(), "no gratuitous ARP from the destination");
    assert_eq!(qb.ok("query-rx-filter", None), filter, "the filter moved");
    sender.join().unwrap();
    let out = b.run("wait; ls -l /tmp/in; sha256sum /tmp/in", CMD_TIMEOUT);
    assert_eq!(guest_sum(&out), sum, "host to guest across the move: {out}");
}
