//! virtio-balloon-pci through the qtest harness, driven as the guest's driver would:
//! inflate buffers punch their pages out of the guest-RAM memfd (its allocated size goes
//! down, the pages read as zeroes), deflated pages come back on touch, free page reporting
//! releases what it reports, page numbers outside RAM are ignored, statistics reach
//! query-balloon, `balloon` sets the target the driver reads, and the driver's `actual`
//! gives BALLOON_CHANGE.

use std::time::Duration;

use serde_json::json;
use vmm_tests::libqos::blk::wait_used;
use vmm_tests::libqos::pci::{self, BarAllocator};
use vmm_tests::libqos::virtio::VirtioPciDevice;
use vmm_tests::libqos::virtqueue::{Buffer, GuestAlloc};
use vmm_tests::qmp::Qmp;
use vmm_tests::qtest::Qtest;
use vmm_tests::{guest_ram_allocated as allocated, TempDir};

const RAM: u64 = 128 << 20;
const MEM: &str = "128M";
const TIMEOUT: Duration = Duration::from_secs(10);
const STATS_VQ: u64 = 1 << 1;
const REPORTING: u64 = 1 << 5;
const VERSION_1: u64 = 1 << 32;
/// What else the test writes meanwhile (rings, lists) may allocate a few pages.
const SLACK: u64 = 64 << 10;

#[test]
fn inflate_deflate_reporting_stats_and_the_target() {
    let dir = TempDir::new("harness-balloon");
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let mut qt = Qtest::start(
        MEM,
        &[
            "-qmp",
            &qmp_arg,
            "-device",
            "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
        ],
    )
    .unwrap();
    let mut qmp = Qmp::connect(&sock);
    let pid = qt.pid().expect("the vmm's pid");

    let f = pci::enumerate_bus0(&mut qt)
        .unwrap()
        .into_iter()
        .find(|f| f.vendor_id == 0x1af4 && f.device_id == 0x1045)
        .expect("a virtio-balloon function");
    let mut bars = BarAllocator::for_ram(RAM);
    let mut dev = VirtioPciDevice::new(&mut qt, f, Some(&mut bars)).unwrap();
    dev.reset(&mut qt).unwrap();
    let features = dev
        .negotiate(&mut qt, VERSION_1 | STATS_VQ | REPORTING)
        .unwrap();
    assert_eq!(features & (STATS_VQ | REPORTING), STATS_VQ | REPORTING);
    dev.enable_msix(&mut qt, 0x5000).unwrap();
    let mut alloc = GuestAlloc::for_ram(RAM);
    let mut queues: Vec<_> = (0..4)
        .map(|i| {
            dev.setup_queue(&mut qt, &mut alloc, i, 0, Some(i + 1))
                .unwrap()
        })
        .collect();
    dev.driver_ok(&mut qt).unwrap();

    // 4 MiB of guest RAM at 64 MiB, written so the host allocates it.
    let base: u64 = 64 << 20;
    qt.memset(base, 4 << 20, 0xab).unwrap();
    let written = allocated(pid);

    // Inflate: the 1024 pages' numbers, plus junk outside RAM and a duplicate.
    let mut pfns: Vec<u32> = (0..1024).map(|i| (base >> 12) as u32 + i).collect();
    pfns.extend([u32::MAX, 0x10_0000, (base >> 12) as u32]);
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    let list = alloc.alloc(bytes.len() as u64, 8).unwrap();
    qt.memwrite(list, &bytes).unwrap();
    queues[0]
        .add_chain(&mut qt, &[Buffer::readable(list, bytes.len() as u32)])
        .unwrap();
    queues[0].kick(&mut qt).unwrap();
    wait_used(&mut qt, &mut queues[0], TIMEOUT).expect("the inflate buffer comes back");
    let inflated = allocated(pid);
    assert!(
        inflated + (4 << 20) <= written + SLACK,
        "4 MiB released: {written} -> {inflated}"
    );
    assert_eq!(qt.memread(base + (2 << 20), 4).unwrap(), [0; 4], "zeroes");

    // Deflate: nothing to do until the guest touches the pages again.
    queues[1]
        .add_chain(&mut qt, &[Buffer::readable(list, 4096)])
        .unwrap();
    queues[1].kick(&mut qt).unwrap();
    wait_used(&mut qt, &mut queues[1], TIMEOUT).expect("the deflate buffer comes back");
    qt.memset(base, 4 << 20, 0xcd).unwrap();
    assert!(
        allocated(pid) + SLACK >= inflated + (4 << 20),
        "touched: allocated again"
    );

    // Free page reporting: a writable buffer naming 2 MiB of free memory.
    let free = base + (8 << 20);
    qt.memset(free, 2 << 20, 0x11).unwrap();
    let before = allocated(pid);
    queues[3]
        .add_chain(&mut qt, &[Buffer::writable(free, 2 << 20)])
        .unwrap();
    queues[3].kick(&mut qt).unwrap();
    wait_used(&mut qt, &mut queues[3], TIMEOUT).expect("the report comes back");
    assert!(
        allocated(pid) + (2 << 20) <= before + SLACK,
        "reported pages released"
    );

    // Statistics: (tag, value) pairs, kept by tag. guest-stats shows every statistic by
    // QEMU's names; query-balloon shows the seed's once polling is on.
    let path = "/machine/peripheral/balloon0";
    let set = |qmp: &mut Qmp<_>, value: serde_json::Value| {
        qmp.request(
            "qom-set",
            Some(json!({"path": path, "property": "guest-stats-polling-interval", "value": value})),
        )
    };
    let get = |qmp: &mut Qmp<_>, path: &str, property: &str| {
        qmp.request("qom-get", Some(json!({"path": path, "property": property})))
    };
    let stats_buffer = |qt: &mut Qtest, queue: &mut _, at: u64, entries: &[(u16, u64)]| {
        let mut stats = Vec::new();
        for (tag, value) in entries {
            stats.extend_from_slice(&tag.to_le_bytes());
            stats.extend_from_slice(&value.to_le_bytes());
        }
        qt.memwrite(at, &stats).unwrap();
        let queue: &mut vmm_tests::libqos::virtqueue::Virtqueue = queue;
        queue
            .add_chain(qt, &[Buffer::readable(at, stats.len() as u32)])
            .unwrap();
        queue.kick(qt).unwrap();
    };
    let at = alloc.alloc(64, 8).unwrap();
    stats_buffer(
        &mut qt,
        &mut queues[2],
        at,
        &[(4, 123_456), (5, 999_999), (0, 7)],
    );
    let mut guest_stats = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while guest_stats["last-update"].as_u64().unwrap_or(0) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no stats: {guest_stats}"
        );
        std::thread::sleep(Duration::from_millis(50));
        guest_stats = get(&mut qmp, path, "guest-stats")["return"].clone();
    }
    assert_eq!(guest_stats["stats"]["stat-free-memory"], 123_456);
    assert_eq!(
        qmp.ok("query-balloon", None),
        json!({"actual": RAM}),
        "no polling: actual only, as QEMU 7.2"
    );
    assert_eq!(set(&mut qmp, json!(1)), json!({"return": {}}));
    let info = qmp.ok("query-balloon", None);
    assert_eq!(info["free_mem"], 123_456, "{info}");
    assert_eq!(info["total_mem"], 999_999);
    assert_eq!(info["mem_swapped_in"], 7);
    assert!(
        info.get("major_page_faults").is_none(),
        "not reported: absent"
    );
    // The timer hands the buffer back every interval; the driver refills it.
    wait_used(&mut qt, &mut queues[2], Duration::from_secs(5)).expect("handed back by the timer");
    stats_buffer(&mut qt, &mut queues[2], at, &[(4, 222), (6, 333)]);
    wait_used(&mut qt, &mut queues[2], Duration::from_secs(5)).expect("and again");
    let guest_stats = get(&mut qmp, path, "guest-stats")["return"].clone();
    assert_eq!(
        guest_stats["stats"]["stat-free-memory"], 222,
        "{guest_stats}"
    );
    assert_eq!(guest_stats["stats"]["stat-available-memory"], 333);
    assert_eq!(guest_stats["stats"]["stat-total-memory"], 999_999);
    assert_eq!(
        guest_stats["stats"]["stat-swap-out"],
        u64::MAX,
        "never reported"
    );
    assert_eq!(guest_stats["stats"].as_object().unwrap().len(), 10);
    assert!(guest_stats["last-update"].as_u64().unwrap() > 1_700_000_000);
    // By a partial path too, and the virtio device under the function.
    assert_eq!(
        get(&mut qmp, "balloon0", "guest-stats-polling-interval"),
        json!({"return": 1})
    );
    assert_eq!(
        get(&mut qmp, &format!("{path}/virtio-backend"), "type"),
        json!({"return": "virtio-balloon-device"})
    );
    // QEMU 7.2's errors.
    let generic = |desc: &str| json!({"class": "GenericError", "desc": desc});
    assert_eq!(
        set(&mut qmp, json!(-1))["error"],
        generic("timer value must be greater than zero")
    );
    assert_eq!(
        set(&mut qmp, json!(1u64 << 32))["error"],
        generic("timer value is too big")
    );
    assert_eq!(
        set(&mut qmp, json!("x"))["error"],
        generic("Invalid parameter type for 'guest-stats-polling-interval', expected: integer")
    );
    assert_eq!(
        get(&mut qmp, path, "nope")["error"],
        generic("Property 'virtio-balloon-pci.nope' not found")
    );
    assert_eq!(
        get(&mut qmp, "/machine/peripheral/nope", "type")["error"],
        json!({"class": "DeviceNotFound", "desc": "Device '/machine/peripheral/nope' not found"})
    );
    let r = qmp.request(
        "qom-set",
        Some(json!({"path": path, "property": "guest-stats", "value": 1})),
    );
    assert_eq!(
        r["error"],
        generic("Property 'virtio-balloon-device.guest-stats' is not writable")
    );
    assert_eq!(
        set(&mut qmp, json!(0)),
        json!({"return": {}}),
        "polling off"
    );

    // Malformed buffers: refused and counted, nothing released.
    let refused = |qmp: &mut Qmp<_>| {
        qmp.ok("__org.vmm_query-balloon-counters", None)["refused"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(refused(&mut qmp), 2, "the two page numbers outside RAM");
    let before = allocated(pid);
    qt.memset(base, 4 << 20, 0x5a).unwrap();
    let touched = allocated(pid);
    for (queue, buffer) in [
        (0, Buffer::writable(list, 8)), // an inflate list the device should write
        (0, Buffer::readable(list, 6)), // not whole page numbers
        (0, Buffer::readable(RAM + 4096, 8)), // a list outside RAM
        (0, Buffer::readable(list, 1 << 20)), // longer than any list
        (3, Buffer::readable(base, 2 << 20)), // a report the device may not write
        (3, Buffer::writable(RAM - 4096, 8192)), // a report running past RAM
    ] {
        queues[queue].add_chain(&mut qt, &[buffer]).unwrap();
        queues[queue].kick(&mut qt).unwrap();
        wait_used(&mut qt, &mut queues[queue], TIMEOUT).expect("a refused buffer comes back");
    }
    assert_eq!(refused(&mut qmp), 8);
    // A flood: the inflate queue filled with lists naming only pages outside RAM, kicked
    // once. Every list comes back, every page number is counted, nothing is touched.
    let junk: Vec<u8> = (0..256u32)
        .flat_map(|i| (0x10_0000 + i).to_le_bytes())
        .collect();
    let junk_at = alloc.alloc(junk.len() as u64, 8).unwrap();
    qt.memwrite(junk_at, &junk).unwrap();
    for _ in 0..64 {
        queues[0]
            .add_chain(&mut qt, &[Buffer::readable(junk_at, junk.len() as u32)])
            .unwrap();
    }
    queues[0].kick(&mut qt).unwrap();
    for _ in 0..64 {
        wait_used(&mut qt, &mut queues[0], TIMEOUT).expect("every list comes back");
    }
    assert_eq!(refused(&mut qmp), 8 + 64 * 256);
    assert!(
        allocated(pid) + SLACK >= touched,
        "{before} -> {touched}: nothing released"
    );

    // The target the driver reads, and the driver's answer.
    assert_eq!(
        qmp.request("balloon", Some(json!({"value": 64 << 20}))),
        json!({"return": {}})
    );
    let num_pages = dev.config_readl(&mut qt, 0).unwrap();
    assert_eq!(num_pages, 16384, "64 MiB of 128 MiB in 4 KiB pages");
    let (cfg, _) = dev.device_cfg.unwrap();
    qt.writel(cfg + 4, 16384).unwrap();
    let e = qmp.wait_event("BALLOON_CHANGE");
    assert_eq!(e["data"], json!({"actual": 64u64 << 20}));
    assert_eq!(qmp.ok("query-balloon", None)["actual"], 64u64 << 20);
    assert_eq!(qmp.hmp("info balloon"), "balloon: actual=64\r\n");

    // QEMU's errors and clamping.
    let r = qmp.request("balloon", Some(json!({"value": 0})));
    assert_eq!(
        r["error"]["desc"], "Parameter 'target' expects a size",
        "{r}"
    );
    assert_eq!(
        qmp.request("balloon", Some(json!({"value": 1u64 << 40}))),
        json!({"return": {}})
    );
    assert_eq!(
        dev.config_readl(&mut qt, 0).unwrap(),
        0,
        "clamped to the RAM"
    );
}

#[test]
fn without_a_balloon_the_commands_say_so() {
    let dir = TempDir::new("harness-no-balloon");
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let _qt = Qtest::start(MEM, &["-qmp", &qmp_arg]).unwrap();
    let mut qmp = Qmp::connect(&sock);
    let want = json!({"class": "DeviceNotActive", "desc": "No balloon device has been activated"});
    assert_eq!(qmp.request("query-balloon", None)["error"], want);
    assert_eq!(
        qmp.request("balloon", Some(json!({"value": 1 << 20})))["error"],
        want
    );
    assert_eq!(
        qmp.hmp("info balloon"),
        "Error: No balloon device has been activated\r\n"
    );
}
