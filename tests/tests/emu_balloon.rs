//! The balloon end to end under emu: the stock guest's virtio_balloon driver with 512 MiB.
//! `balloon` to 256 MiB takes memory from the guest (MemTotal and MemFree drop), and it
//! leaves the host: the guest-RAM memfd's allocated size, the vmm's RSS and the RSS of
//! every device process mapping guest RAM (vmm-blk's, which wrote the guest's page cache) drop by about as much; BALLOON_CHANGE and
//! query-balloon follow. Back to 512 MiB the guest uses 400 MiB again; statistics come once
//! polling is on; `system_reset` empties the balloon. A balloon hot-plugged with
//! `device_add` and free page reporting takes back a buffer the guest frees without any
//! `balloon` command, and with deflate-on-oom a program that needs more than the balloon
//! left gets it.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::console::GuestConsole;
use vmm_tests::qmp::Qmp;
use vmm_tests::{guest_program_disk, guest_ram_allocated, guest_ram_mappers, rss, TempDir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;
/// The stock guest's RAM (`stock_linux_args`).
const RAM: u64 = 512 * MIB;

struct Vm {
    console: GuestConsole,
    qmp: Qmp<UnixStream>,
    /// A second monitor connection that only collects events.
    events: Qmp<UnixStream>,
    pid: u32,
    _dir: TempDir,
}

/// The stock guest with memtouch on a disk of `disk_size` bytes (vmm-blk serves it), two
/// monitor connections, and `extra` for the vmm; memtouch copied to /tmp once it is up.
fn boot(tag: &str, disk_size: u64, extra: &[&str]) -> Vm {
    let dir = TempDir::new(tag);
    let (disk, len) = guest_program_disk(&dir, "memtouch", disk_size);
    let qmp_sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let drive = format!("file={},format=raw,if=none,id=prog", disk.display());
    let mut args = vec![
        "-qmp",
        &qmp_arg,
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=prog",
    ];
    args.extend_from_slice(extra);
    let mut console = GuestConsole::boot_stock_linux(&args);
    let pid = console.pid().expect("the vmm's pid");
    let mut qmp = Qmp::unix(&qmp_sock);
    qmp.negotiate();
    let mut events = Qmp::unix(&qmp_sock);
    events.negotiate();
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);
    console.install_program("/dev/vda", len, "memtouch", CMD_TIMEOUT);
    Vm {
        console,
        qmp,
        events,
        pid,
        _dir: dir,
    }
}

impl Vm {
    /// A field of the guest's /proc/meminfo, in bytes.
    fn meminfo(&mut self, field: &str) -> u64 {
        let out = self
            .console
            .run(&format!("grep '^{field}:' /proc/meminfo"), CMD_TIMEOUT);
        out.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{field}:")))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("no {field} in {out:?}"))
    }

    /// Set the target and wait for the guest's `actual` to reach it (BALLOON_CHANGE, one
    /// a second at most, the last one carrying it).
    fn balloon(&mut self, target: u64) {
        let asked = Instant::now();
        assert_eq!(
            self.qmp
                .request("balloon", Some(json!({ "value": target }))),
            json!({"return": {}})
        );
        let deadline = Instant::now() + CMD_TIMEOUT;
        loop {
            let e = self.events.wait_event("BALLOON_CHANGE");
            if e["data"]["actual"] == json!(target) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "actual never reached {target}: {e}"
            );
        }
        assert_eq!(self.qmp.ok("query-balloon", None)["actual"], json!(target));
        eprintln!("balloon to {} MiB: {:?}", target / MIB, asked.elapsed());
    }

    /// Run memtouch in the guest; its output.
    fn memtouch(&mut self, mib: u64) -> String {
        self.console
            .run(&format!("/tmp/memtouch {mib}"), CMD_TIMEOUT)
    }
}

/// `a` fell by at least `at_least` on the way to `b`.
fn dropped(what: &str, a: u64, b: u64, at_least: u64) {
    eprintln!("{what}: {} MiB -> {} MiB", a / MIB, b / MIB);
    assert!(
        b + at_least <= a,
        "{what} should drop by {} MiB or more: {} MiB -> {} MiB",
        at_least / MIB,
        a / MIB,
        b / MIB
    );
}

/// Wait until `f` holds, polling.
fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_balloon_takes_memory_from_the_guest_and_the_host_gets_it() {
    // The program's disk is 384 MiB: reading it fills the page cache through vmm-blk.
    let mut vm = boot(
        "emu-balloon",
        384 * MIB,
        &["-device", "virtio-balloon-pci,id=balloon0"],
    );
    let out = vm.console.run(
        "cat /dev/vda > /dev/null; echo 3 > /proc/sys/vm/drop_caches; echo dropped",
        CMD_TIMEOUT,
    );
    assert!(out.contains("dropped"), "{out}");
    assert_eq!(vm.qmp.ok("query-balloon", None), json!({"actual": RAM}));
    // Every device process that maps guest RAM (vmm-blk's sandboxed worker here).
    let mappers = guest_ram_mappers(vm.pid);
    assert!(
        mappers.iter().any(|(_, name)| name == "vmm-blk"),
        "vmm-blk maps guest RAM: {mappers:?}"
    );
    let mapper_rss: Vec<u64> = mappers.iter().map(|(pid, _)| rss(*pid)).collect();
    let total = vm.meminfo("MemTotal");
    let free = vm.meminfo("MemFree");
    let (vmm_rss, allocated) = (rss(vm.pid), guest_ram_allocated(vm.pid));

    // To 256 MiB: the guest gives 256 MiB up, and the host gets it.
    vm.balloon(256 * MIB);
    dropped("guest MemTotal", total, vm.meminfo("MemTotal"), 250 * MIB);
    dropped("guest MemFree", free, vm.meminfo("MemFree"), 240 * MIB);
    dropped(
        "guest-RAM memfd allocated",
        allocated,
        guest_ram_allocated(vm.pid),
        200 * MIB,
    );
    dropped("vmm RSS", vmm_rss, rss(vm.pid), 200 * MIB);
    for ((pid, name), before) in mappers.iter().zip(mapper_rss) {
        dropped(&format!("{name} ({pid}) RSS"), before, rss(*pid), 200 * MIB);
    }
    let counters = vm.qmp.ok("__org.vmm_query-balloon-counters", None);
    assert!(
        counters["released"].as_u64().unwrap() >= 256 * MIB,
        "{counters}"
    );
    assert_eq!(counters["refused"], 0, "{counters}");

    // Statistics once polling is on, in query-balloon and in guest-stats.
    let path = "/machine/peripheral/balloon0";
    assert_eq!(
        vm.qmp.request(
            "qom-set",
            Some(json!({"path": path, "property": "guest-stats-polling-interval", "value": 1}))
        ),
        json!({"return": {}})
    );
    // Fresh figures: the guest's total without the balloon's pages.
    let mut stats = Value::Null;
    eventually("fresh guest statistics", CMD_TIMEOUT, || {
        stats = vm.qmp.ok(
            "qom-get",
            Some(json!({"path": path, "property": "guest-stats"})),
        );
        stats["last-update"].as_u64().unwrap_or(0) > 0
            && stats["stats"]["stat-total-memory"]
                .as_u64()
                .is_some_and(|total| total < RAM - 200 * MIB)
    });
    assert!(
        stats["stats"]["stat-free-memory"].as_u64().unwrap() < 200 * MIB,
        "{stats}"
    );
    let info = vm.qmp.ok("query-balloon", None);
    for field in [
        "actual",
        "mem_swapped_in",
        "mem_swapped_out",
        "major_page_faults",
        "minor_page_faults",
        "free_mem",
        "total_mem",
    ] {
        assert!(info.get(field).is_some(), "{field} in {info}");
    }
    assert!(info["free_mem"].as_u64().unwrap() < info["total_mem"].as_u64().unwrap());

    // Back to 512 MiB: the guest uses it all again.
    let allocated = guest_ram_allocated(vm.pid);
    vm.balloon(RAM);
    let back = vm.meminfo("MemTotal");
    assert!(back + MIB >= total, "MemTotal back: {total} -> {back}");
    let out = vm.memtouch(400);
    assert!(out.contains("MEMTOUCH-OK 400"), "{out}");
    let touched = guest_ram_allocated(vm.pid);
    assert!(
        touched >= allocated + 100 * MIB,
        "the pages came back on touch: {} MiB -> {} MiB",
        allocated / MIB,
        touched / MIB
    );

    // A reset empties the balloon: the guest boots with all its memory.
    vm.balloon(256 * MIB);
    assert_eq!(vm.qmp.request("system_reset", None), json!({"return": {}}));
    vm.console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    vm.console.wait_for("# ", CMD_TIMEOUT);
    let after_reset = vm.meminfo("MemTotal");
    assert!(
        after_reset + MIB >= total,
        "MemTotal after the reset: {total} -> {after_reset}"
    );
    assert_eq!(vm.qmp.ok("query-balloon", None)["actual"], json!(RAM));
    assert_eq!(vm.qmp.hmp("info balloon"), "balloon: actual=512\r\n");
}

#[test]
fn a_hot_plugged_balloon_takes_freed_memory_back_and_deflates_on_oom() {
    let mut vm = boot("emu-balloon-hotplug", 0, &[]);
    assert_eq!(
        vm.qmp.request("query-balloon", None)["error"]["class"],
        "DeviceNotActive"
    );
    assert_eq!(
        vm.qmp.request(
            "device_add",
            Some(json!({
                "driver": "virtio-balloon-pci",
                "id": "balloon1",
                "free-page-reporting": "on",
                "deflate-on-oom": "on",
            }))
        ),
        json!({"return": {}})
    );
    let bound = vm.console.run(
        "for i in $(seq 150); do ls /sys/bus/virtio/drivers/virtio_balloon | grep -q virtio && break; \
         sleep 0.2; done; ls /sys/bus/virtio/drivers/virtio_balloon",
        CMD_TIMEOUT,
    );
    assert!(bound.contains("virtio"), "the driver binds: {bound}");
    assert_eq!(vm.qmp.ok("query-balloon", None), json!({"actual": RAM}));

    // Free page reporting: a 200 MiB buffer the guest frees goes back to the host with no
    // balloon command.
    let before = guest_ram_allocated(vm.pid);
    vm.console.send("/tmp/memtouch 200 5\n");
    vm.console.wait_for("MEMTOUCH-OK 200", CMD_TIMEOUT);
    let held = guest_ram_allocated(vm.pid);
    eprintln!(
        "memfd allocated: {} MiB, holding 200 MiB: {} MiB",
        before / MIB,
        held / MIB
    );
    let mut now = held;
    eventually("the freed buffer reported", CMD_TIMEOUT, || {
        now = guest_ram_allocated(vm.pid);
        now + 150 * MIB <= held
    });
    eprintln!("after the program exits: {} MiB", now / MIB);
    vm.console.wait_for("# ", CMD_TIMEOUT);
    assert_eq!(vm.qmp.ok("query-balloon", None), json!({"actual": RAM}));

    // Deflate on OOM: with the balloon holding 384 MiB, a program that needs 256 MiB gets
    // it from the balloon instead of being killed.
    vm.balloon(128 * MIB);
    let out = vm.memtouch(256);
    assert!(out.contains("MEMTOUCH-OK 256"), "{out}");
    let actual = vm.qmp.ok("query-balloon", None)["actual"].as_u64().unwrap();
    eprintln!("actual after the program: {} MiB", actual / MIB);
    assert!(
        actual >= (128 + 150) * MIB,
        "the balloon deflated for the program: {} MiB",
        actual / MIB
    );
    let counters = vm.qmp.ok("__org.vmm_query-balloon-counters", None);
    assert!(counters["deflated"].as_u64().unwrap() > 0, "{counters}");
    assert_eq!(counters["refused"], 0, "{counters}");
}
