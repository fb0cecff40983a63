//! Networking end to end under emu: the stock guest's virtio-net card on a tap in a
//! namespace the test makes (the vmm runs inside it), served by vmm-net. Ping both ways,
//! TCP transfers checked by sha256 both ways, set_link off and on as the guest sees it, a
//! tap passed libvirt's way (getfd, netdev_add tap,fd=), a second card plugged and
//! unplugged ten times without leaks, and a transfer that survives three kill -9 of its
//! vmm-net process.

use std::io::Write;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::console::GuestConsole;
use vmm_tests::netns::NetNs;
use vmm_tests::qmp::Qmp;
use vmm_tests::transfer::{connect_retry, data, guest_sum, receive_all, sha256};
use vmm_tests::TempDir;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(180);
const HOST: &str = "10.9.0.1";
const GUEST: &str = "10.9.0.2";

/// A namespace with tap `tap0` at HOST/24, and the stock guest on it with its first card
/// (`nic0`, netdev `n0`) at GUEST; a QMP socket. `extra` goes to the vmm.
fn boot(
    tag: &str,
    extra: &[&str],
) -> (
    NetNs,
    GuestConsole,
    Qmp<std::os::unix::net::UnixStream>,
    TempDir,
) {
    let ns = NetNs::new(tag);
    ns.tap("tap0", Some(&format!("{HOST}/24")), false);
    let dir = TempDir::new(tag);
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let mut args = vec![
        "-qmp",
        &qmp_arg,
        "-netdev",
        "tap,id=n0,ifname=tap0,script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=n0,id=nic0",
    ];
    args.extend_from_slice(extra);
    let mut console = GuestConsole::boot_stock_linux_in(&ns, &args);
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);
    let qmp = Qmp::connect(&sock);
    let up = console.run(
        &format!(
            "ip link set eth0 up; ip addr add {GUEST}/24 dev eth0; cat /sys/class/net/eth0/carrier"
        ),
        CMD_TIMEOUT,
    );
    assert!(up.lines().any(|l| l.trim() == "1"), "eth0 carrier: {up}");
    (ns, console, qmp, dir)
}

/// A listener in the namespace (the socket lives there; accept from any thread).
fn listen(ns: &NetNs, port: u16) -> TcpListener {
    ns.enter(move || TcpListener::bind((HOST, port)).expect("listen in the namespace"))
}

fn vmm_net_pid(qmp: &mut Qmp<std::os::unix::net::UnixStream>, netdev: &str) -> u64 {
    let procs = qmp.ok("__org.vmm_query-device-processes", None);
    procs
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["program"] == "vmm-net" && p["drive"] == netdev)
        .and_then(|p| p["pid"].as_u64())
        .unwrap_or_else(|| panic!("no vmm-net for {netdev}: {procs}"))
}

#[test]
fn a_guest_on_a_tap_pings_transfers_and_loses_its_link() {
    let (ns, mut console, mut qmp, _dir) = boot("enet", &[]);

    // Ping both ways.
    let out = console.run(&format!("ping -c 3 -W 5 {HOST}"), CMD_TIMEOUT);
    assert!(out.contains("3 packets received"), "guest to host: {out}");
    let out = ns.exec(&["ping", "-c", "3", "-W", "5", GUEST]);
    assert!(
        out.status.success(),
        "host to guest: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Guest to host: 16 MiB, checked by sha256.
    console.run(
        "dd if=/dev/urandom of=/tmp/out bs=64k count=256 2>/dev/null",
        CMD_TIMEOUT,
    );
    let sum = guest_sum(&console.run("sha256sum /tmp/out", CMD_TIMEOUT));
    let receiver = receive_all(listen(&ns, 5001), Arc::new(AtomicU64::new(0)));
    console.run(&format!("nc {HOST} 5001 < /tmp/out"), CMD_TIMEOUT);
    let got = receiver.join().unwrap();
    assert_eq!(got.len(), 16 << 20);
    assert_eq!(sha256(&got), sum, "guest to host");

    // Host to guest.
    let payload = data(16 << 20, 7);
    console.send("nc -l -p 5002 < /dev/null > /tmp/in &\n");
    std::thread::sleep(Duration::from_millis(500));
    let sent = payload.clone();
    let sender = ns.spawn_inside(move || {
        let mut stream = connect_retry((GUEST, 5002), CMD_TIMEOUT);
        stream.write_all(&sent).unwrap();
    });
    sender.join().unwrap();
    let out = console.run("wait; ls -l /tmp/in; sha256sum /tmp/in", CMD_TIMEOUT);
    assert_eq!(guest_sum(&out), sha256(&payload), "host to guest: {out}");

    // set_link off: the guest loses carrier and nothing gets through; on: back.
    qmp.ok("set_link", Some(json!({"name": "nic0", "up": false})));
    let carrier = console.run("sleep 1; cat /sys/class/net/eth0/carrier", CMD_TIMEOUT);
    assert!(
        carrier.lines().any(|l| l.trim() == "0"),
        "carrier after off: {carrier}"
    );
    let out = console.run(&format!("ping -c 2 -W 1 {HOST}; true"), CMD_TIMEOUT);
    assert!(out.contains("0 packets received"), "ping while down: {out}");
    qmp.ok("set_link", Some(json!({"name": "nic0", "up": true})));
    let carrier = console.run("sleep 1; cat /sys/class/net/eth0/carrier", CMD_TIMEOUT);
    assert!(
        carrier.lines().any(|l| l.trim() == "1"),
        "carrier after on: {carrier}"
    );
    let out = console.run(&format!("ping -c 3 -W 5 {HOST}"), CMD_TIMEOUT);
    assert!(out.contains("3 packets received"), "ping after on: {out}");

    // libvirt's way: a tap the test opened, passed with getfd.
    ns.tap("tap1", Some("10.9.1.1/24"), false);
    let tap = ns.open_tap("tap1");
    qmp.send_with_fd("getfd", Some(json!({"fdname": "tapfd"})), tap.as_raw_fd());
    assert_eq!(qmp.message()["return"], json!({}), "getfd");
    drop(tap);
    qmp.ok(
        "netdev_add",
        Some(json!({"type": "tap", "id": "n1", "fd": "tapfd"})),
    );
    qmp.ok(
        "device_add",
        Some(json!({"driver": "virtio-net-pci", "netdev": "n1", "id": "nic1"})),
    );
    let out = console.run(
        "i=0; while [ ! -e /sys/class/net/eth1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; \
         ip link set eth1 up; ip addr add 10.9.1.2/24 dev eth1; ping -c 3 -W 5 10.9.1.1",
        CMD_TIMEOUT,
    );
    assert!(
        out.contains("3 packets received"),
        "the card on the passed tap: {out}"
    );
    let filter = qmp.ok("query-rx-filter", None);
    let names: Vec<&str> = filter
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names, ["nic0", "nic1"]);
    assert_eq!(
        filter[0]["promiscuous"], false,
        "the driver set its filter: {filter}"
    );
    let info = qmp.hmp("info network");
    assert!(
        info.contains("nic1: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:57"),
        "{info}"
    );
}

#[test]
fn cards_come_and_go_without_leaks() {
    let (ns, mut console, mut qmp, _dir) = boot("ehot", &[]);
    let vmm = console.pid().expect("the vmm's pid");
    let fds = || std::fs::read_dir(format!("/proc/{vmm}/fd")).map_or(0, |d| d.count());
    let children = || {
        std::fs::read_dir(format!("/proc/{vmm}/task"))
            .map(|tasks| {
                tasks
                    .flatten()
                    .map(|t| {
                        std::fs::read_to_string(t.path().join("children"))
                            .unwrap_or_default()
                            .split_whitespace()
                            .count()
                    })
                    .sum::<usize>()
            })
            .unwrap_or(0)
    };
    ns.tap("tap1", Some("10.9.1.1/24"), false);
    let (fds_before, children_before) = (fds(), children());
    for n in 1..=10 {
        qmp.ok(
            "netdev_add",
            Some(json!({"type": "tap", "id": "hot", "ifname": "tap1",
                        "script": "no", "downscript": "no"})),
        );
        qmp.ok(
            "device_add",
            Some(json!({"driver": "virtio-net-pci", "netdev": "hot", "id": "hotnic"})),
        );
        let out = console.run(
            "i=0; while [ ! -e /sys/class/net/eth1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; \
             ls /sys/class/net",
            CMD_TIMEOUT,
        );
        assert!(out.contains("eth1"), "cycle {n}: {out}");
        qmp.ok("device_del", Some(json!({"id": "hotnic"})));
        let deleted = qmp.wait_event("DEVICE_DELETED");
        assert_eq!(deleted["data"]["device"], "hotnic", "cycle {n}");
        let out = console.run(
            "i=0; while [ -e /sys/class/net/eth1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; \
             ls /sys/class/net",
            CMD_TIMEOUT,
        );
        assert!(!out.contains("eth1"), "cycle {n}: {out}");
        qmp.ok("netdev_del", Some(json!({"id": "hot"})));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while (fds(), children()) != (fds_before, children_before) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(children(), children_before, "a vmm-net process is left");
    assert_eq!(fds(), fds_before, "descriptors leaked");
    // The first card still works.
    let out = console.run(&format!("ping -c 2 -W 5 {HOST}"), CMD_TIMEOUT);
    assert!(out.contains("2 packets received"), "{out}");
    // netdev_del under a card: the card stays, link down, until it goes.
    qmp.ok("netdev_del", Some(json!({"id": "n0"})));
    let carrier = console.run("sleep 1; cat /sys/class/net/eth0/carrier", CMD_TIMEOUT);
    assert!(carrier.lines().any(|l| l.trim() == "0"), "{carrier}");
    let info = qmp.hmp("info network");
    assert!(
        info.contains(" \\ n0: index=0,type=tap,ifname=tap0"),
        "{info}"
    );
    let again = qmp.request("netdev_del", Some(json!({"id": "n0"})));
    assert_eq!(again["error"]["class"], "DeviceNotFound", "{again}");
}

#[test]
fn a_transfer_survives_three_kills_of_vmm_net() {
    let (ns, mut console, mut qmp, _dir) = boot("ekill", &[]);
    console.run(
        "dd if=/dev/urandom of=/tmp/out bs=64k count=512 2>/dev/null",
        CMD_TIMEOUT,
    );
    let sum = guest_sum(&console.run(
        "for i in 1 2 3 4 5 6; do cat /tmp/out; done | sha256sum",
        CMD_TIMEOUT,
    ));
    let flaps_before = console.run("cat /sys/class/net/eth0/carrier_changes", CMD_TIMEOUT);
    let total: u64 = 6 * (32 << 20);
    let progress = Arc::new(AtomicU64::new(0));
    let receiver = receive_all(listen(&ns, 5003), progress.clone());
    console.send(&format!(
        "(for i in 1 2 3 4 5 6; do cat /tmp/out; done | nc {HOST} 5003; echo SENT-DONE) &\n"
    ));
    let mut killed = Vec::new();
    for share in [10, 35, 60] {
        let deadline = Instant::now() + CMD_TIMEOUT;
        while progress.load(Ordering::Relaxed) < total * share / 100 {
            assert!(
                Instant::now() < deadline,
                "the transfer stalled at {share}%"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = vmm_net_pid(&mut qmp, "n0");
        // SAFETY: kill(2) of the vmm-net process, as a crash would end it.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        killed.push(pid);
        let restarted = qmp.wait_event("__org.vmm_DEVICE_PROCESS_RESTARTED");
        assert_eq!(restarted["data"]["device"], "n0", "{restarted}");
    }
    console.wait_for("SENT-DONE", CMD_TIMEOUT);
    let got = receiver.join().unwrap();
    assert_eq!(got.len() as u64, total, "bytes received");
    assert_eq!(sha256(&got), sum, "the data after three restarts");
    let pid = vmm_net_pid(&mut qmp, "n0");
    assert!(!killed.contains(&pid));
    let procs: Value = qmp.ok("__org.vmm_query-device-processes", None);
    let row = procs
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["drive"] == "n0")
        .cloned()
        .unwrap();
    assert_eq!(
        (row["restarts"].as_u64(), row["state"].as_str()),
        (Some(3), Some("running"))
    );
    // No link flap: the guest never lost carrier.
    let flaps = console.run("cat /sys/class/net/eth0/carrier_changes", CMD_TIMEOUT);
    assert_eq!(flaps.trim(), flaps_before.trim(), "carrier changes");
}
