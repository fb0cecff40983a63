//! virtio-net-pci and its vmm-net process through the qtest harness, driven as the guest's
//! driver would: the tap is opened by the test in a namespace of its own and passed in
//! libvirt's way (getfd, netdev_add tap,fd=NAME, device_add). Frames cross the tap both
//! ways (seen with a raw packet socket on the tap), the offloads the driver takes reach
//! the tap (TUNSETOFFLOAD), the control queue changes the RX filter, set_link takes the
//! link down and up, and malformed chains fail alone.

use std::os::fd::AsRawFd;
use std::time::Duration;

use serde_json::{json, Value};
use vmm_tests::libqos::net::{self, NetDevice, HDR_LEN};
use vmm_tests::libqos::virtqueue::{Buffer, Descriptor, GuestAlloc, VRING_DESC_F_WRITE};
use vmm_tests::netns::{is_test_frame, test_frame, NetNs, PacketSocket};
use vmm_tests::qmp::Qmp;
use vmm_tests::qtest::Qtest;
use vmm_tests::TempDir;

const RAM: u64 = 128 << 20;
const MEM: &str = "128M";
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for something that must not happen.
const QUIET: Duration = Duration::from_millis(700);
/// A guest-physical address far outside RAM and every MMIO window.
const OUTSIDE_RAM: u64 = 0xffff_0000_0000;
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
const RX_BUFFER: u32 = 2048;

struct Rig {
    qt: Qtest,
    qmp: Qmp<std::os::unix::net::UnixStream>,
    net: NetDevice,
    alloc: GuestAlloc,
    packets: PacketSocket,
    ns: NetNs,
    /// Guest addresses of the RX buffers posted, by head.
    rx_buffers: Vec<(u16, u64)>,
    _dir: TempDir,
}

impl Rig {
    /// A machine whose card sits on a tap of a new namespace, brought up accepting
    /// `features`; `rx` RX buffers posted.
    fn start(features: u64, rx: usize) -> Rig {
        Rig::start_pairs(features, rx, 1)
    }

    /// [`Rig::start`] with `pairs` queue pairs: a multiqueue tap (one fd per pair, passed
    /// as `fds=`) and `mq=on`; the first pair's RX buffers posted.
    fn start_pairs(features: u64, rx: usize, pairs: u16) -> Rig {
        let ns = NetNs::new("hnet");
        ns.tap("tap0", None, pairs > 1);
        let dir = TempDir::new("harness-net");
        let sock = dir.join("qmp.sock");
        let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
        let mut qt = Qtest::start(MEM, &["-qmp", &qmp_arg]).unwrap();
        let mut qmp = Qmp::connect(&sock);
        let mut names = Vec::new();
        for pair in 0..pairs {
            let tap = ns.open_tap_queue("tap0", pairs > 1);
            let name = format!("tap{pair}");
            qmp.send_with_fd("getfd", Some(json!({"fdname": name})), tap.as_raw_fd());
            assert_eq!(qmp.message()["return"], json!({}), "getfd");
            names.push(name);
        }
        let (netdev, nic) = if pairs > 1 {
            (
                json!({"type": "tap", "id": "n0", "fds": names.join(":")}),
                json!({"driver": "virtio-net-pci", "netdev": "n0", "id": "nic0", "mq": "on"}),
            )
        } else {
            (
                json!({"type": "tap", "id": "n0", "fd": "tap0"}),
                json!({"driver": "virtio-net-pci", "netdev": "n0", "id": "nic0"}),
            )
        };
        qmp.ok("netdev_add", Some(netdev));
        qmp.ok("device_add", Some(nic));
        let mut alloc = GuestAlloc::for_ram(RAM);
        let net = NetDevice::init_pairs(&mut qt, RAM, &mut alloc, features, pairs)
            .unwrap_or_else(|e| panic!("{e}; vmm stderr:\n{}", qt.stderr()));
        let packets = ns.packet_socket("tap0");
        let mut rig = Rig {
            qt,
            qmp,
            net,
            alloc,
            packets,
            ns,
            rx_buffers: Vec::new(),
            _dir: dir,
        };
        rig.post_rx(rx);
        rig
    }

    fn post_rx(&mut self, count: usize) {
        for _ in 0..count {
            let addr = self.alloc.alloc(u64::from(RX_BUFFER), 64).unwrap();
            let head = self
                .net
                .rx
                .add_chain(&mut self.qt, &[Buffer::writable(addr, RX_BUFFER)])
                .unwrap();
            self.rx_buffers.push((head, addr));
        }
        self.net.rx.kick(&mut self.qt).unwrap();
    }

    /// Put `frame` (after a zero virtio-net header) on the TX queue; wait for it to come
    /// back used.
    fn transmit(&mut self, frame: &[u8]) {
        let addr = self.alloc.alloc((HDR_LEN + frame.len()) as u64, 8).unwrap();
        let mut bytes = vec![0u8; HDR_LEN];
        bytes.extend_from_slice(frame);
        self.qt.memwrite(addr, &bytes).unwrap();
        self.net
            .tx
            .add_chain(&mut self.qt, &[Buffer::readable(addr, bytes.len() as u32)])
            .unwrap();
        self.net.tx.kick(&mut self.qt).unwrap();
        let used = net::wait(&mut self.qt, &mut self.net.tx, TIMEOUT)
            .unwrap_or_else(|| panic!("TX not completed; vmm stderr:\n{}", self.qt.stderr()));
        assert_eq!(used.len, 0, "TX chains are completed with nothing written");
    }

    /// The next test frame with `marker` the guest receives (others the host sends are
    /// passed over, their buffers posted again): its header and the frame.
    fn receive(&mut self, marker: &[u8], timeout: Duration) -> Option<(Vec<u8>, Vec<u8>)> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let used = net::wait(&mut self.qt, &mut self.net.rx, left)?;
            // A head comes back to the driver when used: forget it.
            let at = self
                .rx_buffers
                .iter()
                .position(|(h, _)| *h == used.id)
                .expect("a buffer we posted");
            let (_, addr) = self.rx_buffers.remove(at);
            let data = self.qt.memread(addr, used.len as usize).unwrap();
            if is_test_frame(&data[HDR_LEN..], marker) {
                return Some((data[..HDR_LEN].to_vec(), data[HDR_LEN..].to_vec()));
            }
            self.post_rx(1);
        }
    }

    /// The test frame with `marker` does not reach the guest.
    fn not_received(&mut self, marker: &[u8]) -> bool {
        self.receive(marker, QUIET).is_none()
    }

    fn host_frame(&self, marker: &[u8]) -> Vec<u8> {
        test_frame(self.net.mac, HOST_MAC, marker)
    }

    fn sent_to_host(&self, marker: &[u8]) -> Option<Vec<u8>> {
        self.packets
            .recv_matching(TIMEOUT, |f| is_test_frame(f, marker))
    }
}

fn offloads_on(ns: &NetNs) -> (bool, bool) {
    let out = ns.exec(&["ethtool", "-k", "tap0"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let on = |feature: &str| {
        text.lines()
            .any(|l| l.trim_start().starts_with(feature) && l.contains(": on"))
    };
    (on("tx-checksumming:"), on("tcp-segmentation-offload:"))
}

#[test]
fn features_are_offered_and_the_offloads_reach_the_tap() {
    let wanted = net::VIRTIO_NET_F_MAC
        | net::VIRTIO_NET_F_STATUS
        | net::VIRTIO_NET_F_CTRL_VQ
        | net::VIRTIO_NET_F_MRG_RXBUF
        | net::VIRTIO_NET_F_CSUM
        | net::VIRTIO_NET_F_GUEST_CSUM
        | net::VIRTIO_NET_F_GUEST_TSO4
        | net::VIRTIO_NET_F_GUEST_TSO6
        | net::VIRTIO_NET_F_HOST_TSO4
        | net::VIRTIO_RING_F_EVENT_IDX;
    let mut rig = Rig::start(wanted, 8);
    assert_eq!(
        rig.net.features & wanted,
        wanted,
        "offered: {:#x}",
        rig.net.offered
    );
    assert_eq!(rig.net.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert!(rig.net.link_up(&mut rig.qt));
    assert_eq!(
        offloads_on(&rig.ns),
        (true, true),
        "TUNSETOFFLOAD with checksums and TSO"
    );

    // A driver that takes no offloads: the tap hands over plain frames only.
    let plain = net::VIRTIO_NET_F_MAC | net::VIRTIO_NET_F_CTRL_VQ;
    let rig2 = Rig::start(plain, 8);
    assert_eq!(rig2.net.features & net::VIRTIO_NET_F_GUEST_CSUM, 0);
    assert_eq!(offloads_on(&rig2.ns), (false, false));
}

#[test]
fn frames_cross_the_tap_both_ways() {
    let mut rig = Rig::start(net::VIRTIO_NET_F_MAC | net::VIRTIO_NET_F_MRG_RXBUF, 16);
    for i in 0..20u8 {
        let frame = test_frame([0xff; 6], rig.net.mac, &[b'T', b'X', i, 1, 2, 3]);
        rig.transmit(&frame);
        let got = rig
            .sent_to_host(&[b'T', b'X', i])
            .expect("the frame on the tap");
        assert_eq!(got[..frame.len()], frame[..]);
    }
    for i in 0..10u8 {
        let frame = rig.host_frame(&[b'R', b'X', i, 9, 9]);
        rig.packets.send(&frame);
        let (hdr, data) = rig
            .receive(&[b'R', b'X', i], TIMEOUT)
            .expect("the frame in the guest");
        assert_eq!(&data[..frame.len()], &frame[..]);
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
    }
    let info = rig.qmp.hmp("info network");
    assert!(
        info.contains("nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56")
            && info.contains(" \\ n0: index=0,type=tap,fd="),
        "{info}"
    );
}

#[test]
fn the_control_queue_sets_the_filter() {
    let mut rig = Rig::start(
        net::VIRTIO_NET_F_MAC | net::VIRTIO_NET_F_CTRL_VQ | net::VIRTIO_NET_F_CTRL_RX,
        32,
    );
    let Rig { qt, net, alloc, .. } = &mut rig;
    assert_eq!(
        net.command(qt, alloc, net::CTRL_RX, net::CTRL_RX_PROMISC, &[0]),
        net::VIRTIO_NET_OK
    );
    let event = rig.qmp.wait_event("NIC_RX_FILTER_CHANGED");
    assert_eq!(
        event["data"],
        json!({"name": "nic0", "path": "/machine/peripheral/nic0/virtio-backend"})
    );
    let mut table = 0u32.to_le_bytes().to_vec();
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&[1, 0, 0x5e, 0, 0, 1]);
    let Rig { qt, net, alloc, .. } = &mut rig;
    assert_eq!(
        net.command(qt, alloc, net::CTRL_MAC, net::CTRL_MAC_TABLE_SET, &table),
        net::VIRTIO_NET_OK
    );
    assert_eq!(net.command(qt, alloc, 77, 0, &[0]), net::VIRTIO_NET_ERR);
    assert_eq!(
        net.command(qt, alloc, net::CTRL_RX, net::CTRL_RX_PROMISC, &[]),
        net::VIRTIO_NET_ERR,
        "a command without its data"
    );
    let filter = rig.qmp.ok("query-rx-filter", Some(json!({"name": "nic0"})));
    let f = &filter[0];
    assert_eq!(f["promiscuous"], false);
    assert_eq!(f["main-mac"], "52:54:00:12:34:56");
    assert_eq!(f["multicast-table"], json!(["01:00:5e:00:00:01"]));
    // Only one event until the query re-armed it.
    let Rig { qt, net, alloc, .. } = &mut rig;
    assert_eq!(
        net.command(qt, alloc, net::CTRL_RX, net::CTRL_RX_ALLMULTI, &[0]),
        net::VIRTIO_NET_OK
    );
    let again = rig.qmp.wait_event("NIC_RX_FILTER_CHANGED");
    assert_eq!(again["data"]["name"], "nic0");

    // The backend applies it: another host's unicast frame is not delivered; ours, a
    // broadcast and the listed multicast are.
    let stranger = test_frame([0x52, 0, 0, 0, 0, 1], HOST_MAC, b"FILTERED");
    rig.packets.send(&stranger);
    assert!(
        rig.not_received(b"FILTERED"),
        "a frame for another MAC got through"
    );
    for (dest, marker) in [
        (rig.net.mac, &b"OURS"[..]),
        ([0xff; 6], &b"BCAST"[..]),
        ([1, 0, 0x5e, 0, 0, 1], &b"MCAST"[..]),
    ] {
        rig.packets.send(&test_frame(dest, HOST_MAC, marker));
        assert!(rig.receive(marker, TIMEOUT).is_some(), "{marker:?}");
    }
    assert_eq!(
        rig.qmp
            .request("query-rx-filter", Some(json!({"name": "n0"})))["error"]["desc"],
        "net client(n0) isn't a NIC"
    );
    assert_eq!(
        rig.qmp
            .request("query-rx-filter", Some(json!({"name": "x"})))["error"]["desc"],
        "invalid net client name: x"
    );
}

#[test]
fn set_link_takes_the_link_down_and_up() {
    let mut rig = Rig::start(
        net::VIRTIO_NET_F_MAC | net::VIRTIO_NET_F_STATUS | net::VIRTIO_NET_F_CTRL_VQ,
        16,
    );
    // Interrupts from the setup are not the ones we look for.
    while rig.qt.wait_msi(Duration::from_millis(50)).is_ok() {}
    rig.qmp
        .ok("set_link", Some(json!({"name": "nic0", "up": false})));
    assert!(!rig.net.link_up(&mut rig.qt));
    let (_, data) = rig.qt.wait_msi(TIMEOUT).expect("a configuration interrupt");
    assert_eq!(data, 0x5000, "vector 0: configuration change");
    let frame = test_frame([0xff; 6], rig.net.mac, b"DOWN");
    rig.transmit(&frame);
    assert!(
        rig.packets
            .recv_matching(QUIET, |f| is_test_frame(f, b"DOWN"))
            .is_none(),
        "a frame crossed a link that is down"
    );
    rig.packets.send(&rig.host_frame(b"NOTHING"));
    assert!(rig.not_received(b"NOTHING"));

    // The netdev's name works too.
    rig.qmp
        .ok("set_link", Some(json!({"name": "n0", "up": true})));
    assert!(rig.net.link_up(&mut rig.qt));
    let frame = test_frame([0xff; 6], rig.net.mac, b"UPAGAIN");
    rig.transmit(&frame);
    assert!(rig.sent_to_host(b"UPAGAIN").is_some());
    let unknown = rig
        .qmp
        .request("set_link", Some(json!({"name": "nosuch", "up": true})));
    assert_eq!(
        unknown["error"],
        json!({"class": "DeviceNotFound", "desc": "Device 'nosuch' not found"})
    );
}

#[test]
fn malformed_chains_fail_alone() {
    let mut rig = Rig::start(net::VIRTIO_NET_F_MAC | net::VIRTIO_NET_F_MRG_RXBUF, 0);
    let buf = rig.alloc.alloc(4096, 64).unwrap();
    let bad_tx = [
        // A device-writable buffer in a TX chain.
        vec![Descriptor {
            addr: buf,
            len: 64,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        }],
        // Shorter than the virtio-net header.
        vec![Descriptor {
            addr: buf,
            len: 4,
            flags: 0,
            next: 0,
        }],
        // Outside guest RAM.
        vec![Descriptor {
            addr: OUTSIDE_RAM,
            len: 64,
            flags: 0,
            next: 0,
        }],
    ];
    for chain in &bad_tx {
        rig.net.tx.add_raw_chain(&mut rig.qt, chain).unwrap();
        rig.net.tx.kick(&mut rig.qt).unwrap();
        let used = net::wait(&mut rig.qt, &mut rig.net.tx, TIMEOUT).expect("completed");
        assert_eq!(used.len, 0);
    }
    // RX chains the device cannot use: readable, too short, outside RAM.
    let bad_rx = [
        (buf, 2048, 0),
        (buf, 4, VRING_DESC_F_WRITE),
        (OUTSIDE_RAM, 2048, VRING_DESC_F_WRITE),
    ];
    for (addr, len, flags) in bad_rx {
        let d = Descriptor {
            addr,
            len,
            flags,
            next: 0,
        };
        rig.net.rx.add_raw_chain(&mut rig.qt, &[d]).unwrap();
    }
    rig.net.rx.kick(&mut rig.qt).unwrap();
    for _ in 0..3 {
        let used = net::wait(&mut rig.qt, &mut rig.net.rx, TIMEOUT).expect("given back");
        assert_eq!(used.len, 0);
    }
    // Good chains go on working.
    rig.post_rx(4);
    let frame = rig.host_frame(b"STILL-OK");
    rig.packets.send(&frame);
    assert!(rig.receive(b"STILL-OK", TIMEOUT).is_some());
    let out = test_frame([0xff; 6], rig.net.mac, b"TX-OK");
    rig.transmit(&out);
    assert!(rig.sent_to_host(b"TX-OK").is_some());
    let procs = rig.qmp.ok("__org.vmm_query-device-processes", None);
    let row = procs
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["program"] == "vmm-net")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(row["state"], "running", "{procs}");
    assert_eq!(row["restarts"], 0, "{procs}");
}

/// The netdev's row of `__org.vmm_query-netdev-stats`.
fn netdev_stats(qmp: &mut Qmp<std::os::unix::net::UnixStream>) -> Value {
    let stats = qmp.ok("__org.vmm_query-netdev-stats", None);
    stats
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["id"] == "n0"))
        .cloned()
        .unwrap_or_else(|| panic!("no row for n0: {stats}"))
}

/// The tap's count of frames it dropped on their way to the guest (its TX side).
fn tap_tx_dropped(ns: &NetNs) -> u64 {
    let out = ns.exec(&["cat", "/sys/class/net/tap0/statistics/tx_dropped"]);
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn oversize_frames_and_a_flood_are_dropped_and_counted() {
    // Without mergeable buffers a frame must fit one chain.
    let mut rig = Rig::start(net::VIRTIO_NET_F_MAC, 0);
    let small = rig.alloc.alloc(128, 64).unwrap();
    let head = rig
        .net
        .rx
        .add_chain(&mut rig.qt, &[Buffer::writable(small, 128)])
        .unwrap();
    rig.rx_buffers.push((head, small));
    rig.net.rx.kick(&mut rig.qt).unwrap();
    let mut big = b"TOO-BIG".to_vec();
    big.resize(1000, 0xab);
    rig.packets.send(&rig.host_frame(&big));
    rig.packets.send(&rig.host_frame(b"FITS"));
    // The large frame is dropped, not cut to the buffer; the next one takes the buffer.
    let (_, frame) = rig.receive(b"FITS", TIMEOUT).expect("the frame that fits");
    assert_eq!(frame, rig.host_frame(b"FITS"));
    let stats = netdev_stats(&mut rig.qmp);
    assert!(stats["rx-dropped"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(stats["rx-frames"], 1, "{stats}");

    // A flood while the guest has no buffers: the host drops what the tap cannot queue,
    // and the machine answers all along.
    rig.ns.ip(&["link", "set", "tap0", "txqueuelen", "64"]);
    let dropped_before = tap_tx_dropped(&rig.ns);
    let start = std::time::Instant::now();
    for i in 0..5000u32 {
        let mut payload = b"FLOOD".to_vec();
        payload.extend_from_slice(&i.to_le_bytes());
        rig.packets.send(&rig.host_frame(&payload));
        if i % 1000 == 0 {
            assert_eq!(rig.qmp.ok("query-status", None)["status"], "running");
        }
    }
    assert!(tap_tx_dropped(&rig.ns) > dropped_before + 1000);
    assert!(start.elapsed() < Duration::from_secs(30));
    // Once the guest posts buffers, what the tap kept arrives, then newer frames.
    rig.post_rx(16);
    for _ in 0..16 {
        let used = net::wait(&mut rig.qt, &mut rig.net.rx, TIMEOUT).expect("flood frames");
        rig.rx_buffers.retain(|(h, _)| *h != used.id);
    }
    rig.packets.send(&rig.host_frame(b"AFTER-FLOOD"));
    rig.post_rx(64);
    assert!(rig.receive(b"AFTER-FLOOD", TIMEOUT).is_some());
    let out = test_frame([0xff; 6], rig.net.mac, b"TX-AFTER-FLOOD");
    rig.transmit(&out);
    assert!(rig.sent_to_host(b"TX-AFTER-FLOOD").is_some());
    let stats = netdev_stats(&mut rig.qmp);
    assert!(stats["rx-frames"].as_u64().unwrap() > 2, "{stats}");
    assert_eq!(stats["tx-frames"], 1, "{stats}");
}

/// An IPv4/UDP frame from source port `port` (the tap picks a queue by flow) carrying
/// `marker`.
fn udp_frame(dest: [u8; 6], port: u16, marker: &[u8]) -> Vec<u8> {
    let mut f = dest.to_vec();
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + marker.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[10, 99, 0, 1, 10, 99, 0, 2]);
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&(8 + marker.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(marker);
    f
}

/// Which pair's RX queue each frame with one of `markers` arrives on (0 or 1), within
/// `timeout`; buffers used are posted again.
fn arrivals(rig: &mut Rig, rx1: &mut Vec<(u16, u64)>, markers: &[Vec<u8>]) -> Vec<usize> {
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut seen = Vec::new();
    while seen.len() < markers.len() && std::time::Instant::now() < deadline {
        for pair in 0..2 {
            let vq = if pair == 0 {
                &mut rig.net.rx
            } else {
                &mut rig.net.more_pairs[0].0
            };
            let Some(used) = net::wait(&mut rig.qt, vq, Duration::from_millis(20)) else {
                continue;
            };
            let buffers = if pair == 0 { &rig.rx_buffers } else { &*rx1 };
            let addr = buffers
                .iter()
                .find(|(h, _)| *h == used.id)
                .map(|(_, a)| *a)
                .expect("a buffer we posted");
            let data = rig.qt.memread(addr, used.len as usize).unwrap();
            let payload = &data[HDR_LEN..];
            if markers.iter().any(|m| payload.ends_with(m)) {
                seen.push(pair);
            }
            let vq = if pair == 0 {
                &mut rig.net.rx
            } else {
                &mut rig.net.more_pairs[0].0
            };
            let head = vq
                .add_chain(&mut rig.qt, &[Buffer::writable(addr, RX_BUFFER)])
                .unwrap();
            vq.kick(&mut rig.qt).unwrap();
            if pair == 0 {
                rig.rx_buffers.retain(|(h, _)| *h != used.id);
                rig.rx_buffers.push((head, addr));
            } else {
                rx1.retain(|(h, _)| *h != used.id);
                rx1.push((head, addr));
            }
        }
    }
    seen
}

#[test]
fn queue_pairs_follow_the_control_queue() {
    let features = net::VIRTIO_NET_F_MAC
        | net::VIRTIO_NET_F_MRG_RXBUF
        | net::VIRTIO_NET_F_CTRL_VQ
        | net::VIRTIO_NET_F_MQ;
    let mut rig = Rig::start_pairs(features, 32, 2);
    assert_eq!(
        rig.net.features & net::VIRTIO_NET_F_MQ,
        net::VIRTIO_NET_F_MQ
    );
    // max_virtqueue_pairs in the configuration space.
    assert_eq!(rig.net.dev.config_readw(&mut rig.qt, 8).unwrap(), 2);
    let mut rx1 = Vec::new();
    for _ in 0..32 {
        let addr = rig.alloc.alloc(u64::from(RX_BUFFER), 64).unwrap();
        let vq = &mut rig.net.more_pairs[0].0;
        let head = vq
            .add_chain(&mut rig.qt, &[Buffer::writable(addr, RX_BUFFER)])
            .unwrap();
        rx1.push((head, addr));
    }
    rig.net.more_pairs[0].0.kick(&mut rig.qt).unwrap();
    let ack = rig.net.command(
        &mut rig.qt,
        &mut rig.alloc,
        net::CTRL_MQ,
        net::CTRL_MQ_VQ_PAIRS_SET,
        &2u16.to_le_bytes(),
    );
    assert_eq!(ack, net::VIRTIO_NET_OK);
    // A frame sent on the second pair reaches the tap.
    let addr = rig.alloc.alloc(256, 8).unwrap();
    let mut bytes = vec![0u8; HDR_LEN];
    bytes.extend_from_slice(&test_frame([0xff; 6], rig.net.mac, b"PAIR-1-TX"));
    rig.qt.memwrite(addr, &bytes).unwrap();
    let tx1 = &mut rig.net.more_pairs[0].1;
    tx1.add_chain(&mut rig.qt, &[Buffer::readable(addr, bytes.len() as u32)])
        .unwrap();
    tx1.kick(&mut rig.qt).unwrap();
    assert!(net::wait(&mut rig.qt, tx1, TIMEOUT).is_some());
    assert!(rig.sent_to_host(b"PAIR-1-TX").is_some());
    // Flows from the host spread over both pairs.
    let markers: Vec<Vec<u8>> = (0..16)
        .map(|i| format!("FLOW-{i:02}").into_bytes())
        .collect();
    for (i, m) in markers.iter().enumerate() {
        rig.packets
            .send(&udp_frame(rig.net.mac, 1000 + 7 * i as u16, m));
    }
    let seen = arrivals(&mut rig, &mut rx1, &markers);
    assert_eq!(seen.len(), markers.len(), "{seen:?}");
    assert!(seen.contains(&0) && seen.contains(&1), "{seen:?}");
    // Back to one pair: the second pair's tap queue is detached (frames that were on
    // their way to it may be lost), and then every flow comes on the first.
    let ack = rig.net.command(
        &mut rig.qt,
        &mut rig.alloc,
        net::CTRL_MQ,
        net::CTRL_MQ_VQ_PAIRS_SET,
        &1u16.to_le_bytes(),
    );
    assert_eq!(ack, net::VIRTIO_NET_OK);
    for round in 0..2 {
        let markers: Vec<Vec<u8>> = (0..16)
            .map(|i| format!("ONE-{round}-{i:02}").into_bytes())
            .collect();
        for (i, m) in markers.iter().enumerate() {
            rig.packets
                .send(&udp_frame(rig.net.mac, 1000 + 7 * i as u16, m));
        }
        let seen = arrivals(&mut rig, &mut rx1, &markers);
        assert!(seen.iter().all(|&p| p == 0), "{seen:?}");
        if round == 1 {
            assert_eq!(seen.len(), markers.len(), "{seen:?}");
        }
    }
}

#[test]
fn the_old_net_options_make_cards_and_their_backends() {
    // `-net nic` with `-net user`, and `-nic user`: two cards, each on a user network.
    let dir = TempDir::new("harness-net-legacy");
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let mut qt = Qtest::start(
        MEM,
        &[
            "-qmp",
            &qmp_arg,
            "-net",
            "nic,model=virtio,macaddr=52:54:00:aa:bb:cc",
            "-net",
            "user,net=10.0.5.0/24",
            "-nic",
            "user,model=virtio-net-pci",
        ],
    )
    .unwrap();
    let mut qmp = Qmp::connect(&sock);
    let info = qmp.hmp("info network");
    assert_eq!(
        info.matches("type=nic,model=virtio-net-pci").count(),
        2,
        "{info}"
    );
    assert_eq!(info.matches("type=user").count(), 2, "{info}");
    assert!(info.contains("macaddr=52:54:00:aa:bb:cc"), "{info}");
    assert!(info.contains("net=10.0.5.0"), "{info}");
    // The first card reaches its user network: the gateway answers ARP.
    let mut alloc = GuestAlloc::for_ram(RAM);
    let mut net = NetDevice::init(&mut qt, RAM, &mut alloc, net::VIRTIO_NET_F_MAC)
        .unwrap_or_else(|e| panic!("{e}; vmm stderr:\n{}", qt.stderr()));
    assert_eq!(net.mac, [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);
    arp_the_gateway(&mut qt, &mut net, &mut alloc, [10, 0, 5]);
}

/// Ask the gateway of a user network `net`.0/24 for its MAC (ARP), and check its answer.
fn arp_the_gateway(qt: &mut Qtest, net: &mut NetDevice, alloc: &mut GuestAlloc, prefix: [u8; 3]) {
    let rx = alloc.alloc(2048, 64).unwrap();
    net.rx.add_chain(qt, &[Buffer::writable(rx, 2048)]).unwrap();
    net.rx.kick(qt).unwrap();
    let ip = |last: u8| [prefix[0], prefix[1], prefix[2], last];
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&net.mac);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&net.mac);
    arp.extend_from_slice(&ip(15));
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&ip(2));
    let tx = alloc.alloc(128, 8).unwrap();
    let mut bytes = vec![0u8; HDR_LEN];
    bytes.extend_from_slice(&arp);
    qt.memwrite(tx, &bytes).unwrap();
    net.tx
        .add_chain(qt, &[Buffer::readable(tx, bytes.len() as u32)])
        .unwrap();
    net.tx.kick(qt).unwrap();
    let used = net::wait(qt, &mut net.rx, TIMEOUT).expect("an ARP reply");
    let reply = qt.memread(rx, used.len as usize).unwrap();
    let frame = &reply[HDR_LEN..];
    assert_eq!(frame[..6], net.mac);
    assert_eq!(frame[12..14], [0x08, 0x06], "{frame:02x?}");
    assert_eq!(frame[20..22], [0, 2], "an ARP reply: {frame:02x?}");
    assert_eq!(frame[28..32], ip(2), "from the gateway: {frame:02x?}");
}

#[test]
fn a_card_on_the_user_network_sizes_rollback_and_restart() {
    let dir = TempDir::new("harness-net-sizes");
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let mut qt = Qtest::start(MEM, &["-qmp", &qmp_arg, "-netdev", "user,id=u0"]).unwrap();
    let mut qmp = Qmp::connect(&sock);
    for (key, value, error) in [
        (
            "rx_queue_size",
            100,
            "Invalid rx_queue_size (= 100), must be a power of 2 between 256 and 1024.",
        ),
        (
            "rx_queue_size",
            2048,
            "Invalid rx_queue_size (= 2048), must be a power of 2 between 256 and 1024.",
        ),
        (
            "tx_queue_size",
            128,
            "Invalid tx_queue_size (= 128), must be a power of 2 between 256 and 1024",
        ),
    ] {
        let reply = qmp.request(
            "device_add",
            Some(json!({"driver": "virtio-net-pci", "netdev": "u0", "id": "nic0", key: value})),
        );
        assert_eq!(reply["error"]["desc"], error, "{reply}");
    }
    // A card that cannot have its slot (the host bridge's) rolls back after its vhost-user
    // connection was made: the netdev stays free, its process serves the next card.
    let reply = qmp.request(
        "device_add",
        Some(json!({"driver": "virtio-net-pci", "netdev": "u0", "id": "nic0", "addr": "0"})),
    );
    assert!(reply["error"]["desc"].as_str().is_some(), "{reply}");
    let card = json!({"driver": "virtio-net-pci", "netdev": "u0", "id": "nic0",
                      "rx_queue_size": 1024, "tx_queue_size": 512});
    qmp.ok("device_add", Some(card));
    let pci = qmp.ok("query-pci", None);
    let card = pci[0]["devices"]
        .as_array()
        .and_then(|devices| devices.iter().find(|d| d["qdev_id"] == "nic0"))
        .cloned()
        .unwrap_or_else(|| panic!("no nic0 in {pci}"));
    assert_eq!(card["class_info"]["class"], 0x0200, "{card}");
    assert_eq!(card["id"]["vendor"], 0x1af4, "{card}");
    assert_eq!(card["id"]["device"], 0x1041, "{card}");
    let mut alloc = GuestAlloc::for_ram(RAM);
    let mut net = NetDevice::init(&mut qt, RAM, &mut alloc, net::VIRTIO_NET_F_MAC)
        .unwrap_or_else(|e| panic!("{e}; vmm stderr:\n{}", qt.stderr()));
    assert_eq!(net.rx.layout.size, 1024);
    assert_eq!(net.tx.layout.size, 512);
    assert_eq!(net.ctrl.layout.size, 64);
    arp_the_gateway(&mut qt, &mut net, &mut alloc, [10, 0, 2]);

    // The user network's process killed: it restarts, says its state is lost, and the
    // card goes on with the new one.
    let procs = qmp.ok("__org.vmm_query-device-processes", None);
    let pid = procs
        .as_array()
        .and_then(|rows| rows.iter().find(|p| p["program"] == "vmm-net"))
        .and_then(|p| p["pid"].as_i64())
        .unwrap_or_else(|| panic!("no vmm-net in {procs}"));
    // SAFETY: kill(2) on the pid the vmm reported for its child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let lost = qmp.wait_event("__org.vmm_NETDEV_STATE_LOST");
    assert_eq!(lost["data"]["netdev"], "u0", "{lost}");
    arp_the_gateway(&mut qt, &mut net, &mut alloc, [10, 0, 2]);
}
