//! bochs-display and virtio-tablet-pci through the qtest harness, driven as the guest's
//! drivers would: the PCI identity, the EDID, DISPI and extension registers in BAR2, a
//! mode set from test code and pixels written through BAR0 showing up in `screendump`
//! (page flips and absurd modes too), and a VNC client's pointer event arriving in the
//! tablet's event queue as absolute coordinates; VNC over TCP with its addresses; RFB
//! 3.3 and 3.7 clients, an exclusive client, QEMU extended key events and LED state.

use std::time::Duration;

use serde_json::json;
use vmm_tests::display::{Handshake, Image, RawClient};
use vmm_tests::libqos::blk::wait_used;
use vmm_tests::libqos::pci::{self, BarAllocator};
use vmm_tests::libqos::virtio::VirtioPciDevice;
use vmm_tests::libqos::virtqueue::{Buffer, GuestAlloc};
use vmm_tests::qmp::Qmp;
use vmm_tests::qtest::Qtest;
use vmm_tests::TempDir;

const RAM: u64 = 128 << 20;
const MEM: &str = "128M";
const TIMEOUT: Duration = Duration::from_secs(10);
const DISPI: u64 = 0x500;
const EXT: u64 = 0x600;

struct Rig {
    qt: Qtest,
    qmp: Qmp<std::os::unix::net::UnixStream>,
    dir: TempDir,
}

fn start(tag: &str, devices: &[&str]) -> Rig {
    let dir = TempDir::new(tag);
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let vnc_arg = format!("unix:{}", dir.join("vnc.sock").display());
    let mut args = vec!["-qmp", qmp_arg.as_str(), "-vnc", vnc_arg.as_str()];
    for d in devices {
        args.extend(["-device", d]);
    }
    let qt = Qtest::start(MEM, &args).unwrap();
    let qmp = Qmp::connect(&sock);
    Rig { qt, qmp, dir }
}

impl Rig {
    fn screendump(&mut self) -> Image {
        let path = self.dir.join("screen.ppm");
        let r = self.qmp.request(
            "screendump",
            Some(json!({"filename": path.display().to_string()})),
        );
        assert_eq!(r, json!({"return": {}}), "screendump");
        Image::read_ppm(&path)
    }
}

#[test]
fn registers_edid_and_a_mode_set_from_test_code() {
    let mut rig = start("harness-display", &["bochs-display,vgamem=4M,id=vga0"]);
    // The adapter stays: its VRAM is mapped for the accelerator and vmm-display.
    let r = rig.qmp.request("device_del", Some(json!({"id": "vga0"})));
    assert_eq!(
        r["error"]["desc"], "Device 'vga0' does not support hotplugging",
        "{r}"
    );
    let qt = &mut rig.qt;
    let f = pci::enumerate_bus0(qt)
        .unwrap()
        .into_iter()
        .find(|f| f.vendor_id == 0x1234 && f.device_id == 0x1111)
        .expect("a bochs-display function");
    assert_eq!((f.class, f.subclass, f.revision), (0x03, 0x80, 2));
    let bars = pci::assign_bars(qt, f.addr, &mut BarAllocator::for_ram(RAM)).unwrap();
    pci::enable(qt, f.addr, false, true, false).unwrap();
    let vram = bars.iter().find(|b| b.index == 0).unwrap();
    let mmio = bars.iter().find(|b| b.index == 2).unwrap();
    assert_eq!((vram.size, vram.prefetchable), (4 << 20, true));
    assert_eq!(mmio.size, 4096);
    let (fb, regs) = (vram.address, mmio.address);

    // EDID: the header, a valid checksum, the preferred mode in the first timing.
    let edid = qt.memread(regs, 128);
    let edid = match edid {
        Ok(bytes) => bytes,
        // MMIO is read a byte at a time where the harness has no bulk path.
        Err(_) => (0..128).map(|i| qt.readb(regs + i).unwrap()).collect(),
    };
    assert_eq!(edid[..8], [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    assert_eq!(edid.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    let width = u32::from(edid[56]) | u32::from(edid[58] >> 4) << 8;
    assert_eq!(width, 1280);
    // DISPI: the ID the driver checks, VRAM in 64 KiB units; the extension registers.
    assert_eq!(qt.readw(regs + DISPI).unwrap() & 0xfff0, 0xb0c0);
    assert_eq!(qt.readw(regs + DISPI + 2 * 10).unwrap(), 64);
    assert_eq!(qt.readl(regs + EXT).unwrap(), 8);
    assert_eq!(qt.readl(regs + EXT + 4).unwrap(), 0x1e1e_1e1e);

    // No mode yet: screendump shows QEMU's blank 640x480.
    let blank = rig.screendump();
    assert_eq!((blank.width, blank.height), (640, 480));
    assert!(blank.rgb.iter().all(|b| *b == 0));

    // A 64x64 mode set as Linux's driver does, two pages tall.
    let qt = &mut rig.qt;
    let dispi = |qt: &mut Qtest, index: u64, value: u16| {
        qt.writew(regs + DISPI + 2 * index, value).unwrap();
    };
    for (index, value) in [
        (4, 0),
        (3, 32),
        (1, 64),
        (2, 64),
        (5, 0),
        (6, 64),
        (7, 128),
        (8, 0),
        (9, 0),
        (4, 0x41),
    ] {
        dispi(qt, index, value);
    }
    assert_eq!(qt.readw(regs + DISPI + 2).unwrap(), 64, "XRES reads back");
    // Page 0: the pattern; page 1: white.
    for y in 0..64u32 {
        for x in 0..64u32 {
            let [r, g, b] = vmm_tests::display::pattern(x, y);
            let px = u32::from(r) << 16 | u32::from(g) << 8 | u32::from(b);
            qt.writel(fb + u64::from(y * 64 + x) * 4, px).unwrap();
            qt.writel(fb + 64 * 64 * 4 + u64::from(y * 64 + x) * 4, 0xffffff)
                .unwrap();
        }
    }
    rig.screendump()
        .assert_same(&Image::pattern(64, 64), "page 0 through BAR0");
    // A page flip: the Y offset moves the scanout to page 1.
    dispi(&mut rig.qt, 9, 64);
    let flipped = rig.screendump();
    assert!(flipped.rgb.iter().all(|b| *b == 0xff), "page 1 is white");

    // Absurd modes show nothing and break nothing.
    for (index, value) in [(1u64, 0u16), (1, 65535), (3, 7)] {
        dispi(&mut rig.qt, 9, 0);
        dispi(&mut rig.qt, 1, 64);
        dispi(&mut rig.qt, 3, 32);
        dispi(&mut rig.qt, index, value);
        let shown = rig.screendump();
        assert_eq!(
            (shown.width, shown.height),
            (640, 480),
            "register {index} = {value}"
        );
    }
    dispi(&mut rig.qt, 3, 32);
    dispi(&mut rig.qt, 1, 64);
    rig.screendump()
        .assert_same(&Image::pattern(64, 64), "the mode back");
}

#[test]
fn a_vnc_pointer_event_arrives_in_the_tablet_event_queue() {
    let mut rig = start("harness-tablet", &["virtio-tablet-pci"]);
    let qt = &mut rig.qt;
    let f = pci::enumerate_bus0(qt)
        .unwrap()
        .into_iter()
        .find(|f| f.vendor_id == 0x1af4 && f.device_id == 0x1052)
        .expect("a virtio-input function");
    assert_eq!((f.class, f.subclass), (0x09, 0x80));
    let mut bars = BarAllocator::for_ram(RAM);
    let mut dev = VirtioPciDevice::new(qt, f, Some(&mut bars)).unwrap();
    dev.reset(qt).unwrap();
    dev.negotiate(qt, 1 << 32).unwrap();
    dev.enable_msix(qt, 0x5000).unwrap();
    // The name, through the select/subsel protocol.
    let (cfg, _) = dev.device_cfg.expect("a device configuration");
    qt.writeb(cfg, 1).unwrap();
    qt.writeb(cfg + 1, 0).unwrap();
    let size = qt.readb(cfg + 2).unwrap();
    let name: Vec<u8> = (0..u64::from(size))
        .map(|i| qt.readb(cfg + 8 + i).unwrap())
        .collect();
    assert_eq!(name, b"QEMU Virtio Tablet");
    let mut alloc = GuestAlloc::for_ram(RAM);
    let mut events = dev.setup_queue(qt, &mut alloc, 0, 0, Some(1)).unwrap();
    let _status = dev.setup_queue(qt, &mut alloc, 1, 0, Some(2)).unwrap();
    dev.driver_ok(qt).unwrap();
    let mut buffers = Vec::new();
    for _ in 0..8 {
        let addr = alloc.alloc(8, 8).unwrap();
        let head = events.add_chain(qt, &[Buffer::writable(addr, 8)]).unwrap();
        buffers.push((head, addr));
    }
    events.kick(qt).unwrap();

    // A client clicks at (320, 240) of the 640x480 screen (no display adapter: blank).
    let mut client = RawClient::connect(&rig.dir.join("vnc.sock"));
    assert!(matches!(
        client.handshake(None),
        Handshake::Ready {
            width: 640,
            height: 480,
            ..
        }
    ));
    client.write(&[5, 1, 0x01, 0x40, 0x00, 0xf0]);
    let mut got = Vec::new();
    while got.len() < 4 {
        let used = wait_used(qt, &mut events, TIMEOUT).expect("an event");
        assert_eq!(used.len, 8);
        let addr = buffers.iter().find(|(h, _)| *h == used.id).unwrap().1;
        let b = qt.memread(addr, 8).unwrap();
        got.push((
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        ));
    }
    let half = 320 * 0x7fff / 640;
    assert_eq!(
        got,
        [
            (3, 0, half),
            (3, 1, 240 * 0x7fff / 480),
            (1, 0x110, 1),
            (0, 0, 0)
        ]
    );

    // QEMU's LED state pseudo-encoding: the state at once, then the guest's changes (the
    // PS/2 keyboard's set-LEDs command, 0xED, through the i8042).
    let led_state = |client: &mut RawClient| {
        let head = client.read_exact(4);
        assert_eq!((head[0], u16::from_be_bytes([head[2], head[3]])), (0, 1));
        let rect = client.read_exact(12);
        assert_eq!(i32::from_be_bytes(rect[8..12].try_into().unwrap()), -261);
        client.read_exact(1)[0]
    };
    client.write(&[2, 0, 0, 1]);
    client.write(&(-261i32).to_be_bytes());
    assert_eq!(led_state(&mut client), 0);
    qt.outb(0x60, 0xed).unwrap();
    qt.outb(0x60, 0x04).unwrap();
    assert_eq!(led_state(&mut client), 4, "caps lock");
}

#[test]
fn vnc_over_tcp_reports_its_addresses() {
    // A free port, as QEMU's `-vnc 127.0.0.1:N` would listen on 5900 + N.
    let port = {
        let probe = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = probe.local_addr().unwrap().port();
        if port < 5900 {
            eprintln!("skipping: the free port {port} is below 5900");
            return;
        }
        port
    };
    let dir = TempDir::new("harness-vnc-tcp");
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let vnc_arg = format!("127.0.0.1:{}", port - 5900);
    let _qt = Qtest::start(MEM, &["-qmp", &qmp_arg, "-vnc", &vnc_arg]).unwrap();
    let mut qmp = Qmp::connect(&sock);
    let info = qmp.ok("query-vnc", None);
    assert_eq!(
        info,
        json!({"enabled": true, "host": "127.0.0.1", "service": port.to_string(),
               "family": "ipv4", "auth": "none", "clients": []})
    );
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut version = [0u8; 12];
    std::io::Read::read_exact(&mut c, &mut version).unwrap();
    assert_eq!(&version, b"RFB 003.008\n");
    let local = c.local_addr().unwrap().port().to_string();
    let e = qmp.wait_event("VNC_CONNECTED");
    assert_eq!(
        e["data"],
        json!({
            "server": {"auth": "none", "family": "ipv4", "service": port.to_string(),
                       "host": "127.0.0.1", "websocket": false},
            "client": {"family": "ipv4", "service": local, "host": "127.0.0.1",
                       "websocket": false},
        })
    );
    let clients = qmp.ok("query-vnc", None)["clients"].clone();
    assert_eq!(clients[0]["service"], json!(local), "{clients}");
    let text = qmp.hmp("info vnc");
    assert!(
        text.starts_with(&format!(
            "default:\r\n  Server: 127.0.0.1:{port} (ipv4)\r\n    Auth: none (Sub: none)\r\n  Client: 127.0.0.1:{local} (ipv4)\r\n"
        )),
        "{text}"
    );
}

#[test]
fn rfb_3_3_and_3_7_clients_and_an_exclusive_one() {
    let rig = start("harness-rfb", &[]);
    let path = rig.dir.join("vnc.sock");
    // Up to ServerInit with version `version` and security None: 3.3 is told the type
    // (a u32), 3.7 and 3.8 choose it, and only 3.8 gets a SecurityResult for None.
    let init = |version: &[u8; 12], shared: u8| {
        let mut c = RawClient::connect(&path);
        assert_eq!(c.read_exact(12), b"RFB 003.008\n");
        c.write(version);
        if version == b"RFB 003.003\n" {
            assert_eq!(c.read_exact(4), [0, 0, 0, 1]);
        } else {
            assert_eq!(c.read_exact(2), [1, 1]);
            c.write(&[1]);
        }
        if version == b"RFB 003.008\n" {
            assert_eq!(
                c.read_exact(4),
                [0; 4],
                "3.8's SecurityResult, even for None"
            );
        }
        c.write(&[shared]);
        let server_init = c.read_exact(24);
        assert_eq!(
            server_init[..4],
            [0x02, 0x80, 0x01, 0xe0],
            "640x480 ({version:?})"
        );
        let name_len = u32::from_be_bytes(server_init[20..24].try_into().unwrap());
        assert_eq!(c.read_exact(name_len as usize), b"QEMU");
        c
    };
    let mut old = init(b"RFB 003.003\n", 1);
    let mut middle = init(b"RFB 003.007\n", 1);
    // An exclusive client (shared flag 0) has the others dropped, as QEMU's default
    // share policy (allow-exclusive) does.
    let mut exclusive = init(b"RFB 003.008\n", 0);
    assert!(old.closed() && middle.closed(), "shared clients dropped");
    exclusive.write(&[3, 0, 0, 0, 0, 0, 0x02, 0x80, 0x01, 0xe0]);
    assert_eq!(
        exclusive.read_exact(4)[0],
        0,
        "the exclusive client is served"
    );
    // QEMU's extended key events: announced when asked for, then a raw scancode (0x1e,
    // the A key) reaches the PS/2 keyboard, which the guest reads from port 0x60.
    exclusive.read_exact(12 + 640 * 480 * 4);
    exclusive.write(&[2, 0, 0, 1]);
    exclusive.write(&(-258i32).to_be_bytes());
    let head = exclusive.read_exact(16);
    assert_eq!(i32::from_be_bytes(head[12..16].try_into().unwrap()), -258);
    exclusive.write(&[255, 0, 0, 1, 0, 0, 0, 0x61, 0, 0, 0, 0x1e]);
    let mut qt = rig.qt;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while qt.inb(0x64).unwrap() & 1 == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no key reached the i8042"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(qt.inb(0x60).unwrap(), 0x1e, "set 1 make code of A");
    // A version we do not speak is refused.
    let mut bad = RawClient::connect(&path);
    bad.read_exact(12);
    bad.write(b"RFB 004.000\n");
    assert!(bad.closed());
}
