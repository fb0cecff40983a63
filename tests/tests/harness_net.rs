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
        let ns = NetNs::new("hnet");
        ns.tap("tap0", None, false);
        let dir = TempDir::new("harness-net");
        let sock = dir.join("qmp.sock");
        let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
        let mut qt = Qtest::start(MEM, &["-qmp", &qmp_arg]).unwrap();
        let mut qmp = Qmp::connect(&sock);
        let tap = ns.open_tap("tap0");
        qmp.send_with_fd("getfd", Some(json!({"fdname": "tap"})), tap.as_raw_fd());
        assert_eq!(qmp.message()["return"], json!({}), "getfd");
        drop(tap);
        qmp.ok(
            "netdev_add",
            Some(json!({"type": "tap", "id": "n0", "fd": "tap"})),
        );
        qmp.ok(
            "device_add",
            Some(json!({"driver": "virtio-net-pci", "netdev": "n0", "id": "nic0"})),
        );
        let mut alloc = GuestAlloc::for_ram(RAM);
        let net = NetDevice::init(&mut qt, RAM, &mut alloc, features)
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
            let addr = self
                .rx_buffers
                .iter()
                .find(|(h, _)| *h == used.id)
                .map(|(_, a)| *a)
                .expect("a buffer we posted");
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
