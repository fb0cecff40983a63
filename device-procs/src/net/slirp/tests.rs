//! libslirp through [`UserNet`]: frames from a test "guest" in, slirp's frames out.

use super::*;
use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const ETH_IPV4: u16 = 0x0800;
const ETH_ARP: u16 = 0x0806;
const ETH_IPV6: u16 = 0x86dd;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const WAIT: Duration = Duration::from_secs(5);

// ---- frame building ----

/// The one's-complement sum of big-endian 16-bit words, not yet folded.
fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).unwrap();
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = fold(sum16(&p));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// The sum of the IPv4 pseudo header for TCP and UDP checksums.
fn pseudo4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    sum16(&src.octets()) + sum16(&dst.octets()) + u32::from(proto) + len as u32
}

fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let c = fold(pseudo4(src, dst, 17, len) + sum16(&u));
    u[6..8].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 17, &u)
}

fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, seq: u32, flags: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    let c = fold(pseudo4(src, dst, 6, t.len()) + sum16(&t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 6, &t)
}

fn icmp_echo(id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut i = vec![8, 0, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&seq.to_be_bytes());
    i.extend_from_slice(data);
    let c = fold(sum16(&i));
    i[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(GUEST_IP, HOST_IP, 1, &i)
}

fn arp(op: u16, dst: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&GUEST_MAC);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa.octets());
    eth(dst, ETH_ARP, &a)
}

/// A DHCPDISCOVER, padded to slirp's full `struct bootp_t` (236 + 312 bytes).
fn dhcp_discover(xid: u32) -> Vec<u8> {
    let mut b = vec![0u8; 548];
    b[..4].copy_from_slice(&[1, 1, 6, 0]);
    b[4..8].copy_from_slice(&xid.to_be_bytes());
    b[28..34].copy_from_slice(&GUEST_MAC);
    b[236..240].copy_from_slice(&[99, 130, 83, 99]);
    b[240..244].copy_from_slice(&[53, 1, 1, 255]);
    let ip = udp(Ipv4Addr::UNSPECIFIED, 68, Ipv4Addr::BROADCAST, 67, &b);
    eth([0xff; 6], ETH_IPV4, &ip)
}

/// An ICMPv6 router solicitation from the guest's link-local address to all routers.
fn router_solicitation() -> Vec<u8> {
    let src = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0x00ff, 0xfe12, 0x3456);
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
    let mut icmp = vec![133, 0, 0, 0, 0, 0, 0, 0, 1, 1];
    icmp.extend_from_slice(&GUEST_MAC);
    let pseudo = sum16(&src.octets()) + sum16(&dst.octets()) + icmp.len() as u32 + 58;
    let c = fold(pseudo + sum16(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&u16::try_from(icmp.len()).unwrap().to_be_bytes());
    ip.extend_from_slice(&[58, 255]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&icmp);
    eth([0x33, 0x33, 0, 0, 0, 2], ETH_IPV6, &ip)
}

// ---- frame parsing ----

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

struct Ip<'a> {
    proto: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    payload: &'a [u8],
}

fn parse_ipv4(frame: &[u8]) -> Option<Ip<'_>> {
    if frame.len() < 34 || ethertype(frame) != ETH_IPV4 {
        return None;
    }
    let ip = &frame[14..];
    let hl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(fold(sum16(&ip[..hl])), 0, "bad IPv4 header checksum");
    let addr = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
    Some(Ip {
        proto: ip[9],
        src: addr(12),
        dst: addr(16),
        payload: &ip[hl..total],
    })
}

struct Arp {
    op: u16,
    sha: [u8; 6],
    spa: Ipv4Addr,
    tha: [u8; 6],
    tpa: Ipv4Addr,
}

fn parse_arp(frame: &[u8]) -> Option<Arp> {
    if frame.len() < 42 || ethertype(frame) != ETH_ARP {
        return None;
    }
    let a = &frame[14..];
    let mac = |o: usize| <[u8; 6]>::try_from(&a[o..o + 6]).unwrap();
    let ip = |o: usize| Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]);
    Some(Arp {
        op: u16::from_be_bytes([a[6], a[7]]),
        sha: mac(8),
        spa: ip(14),
        tha: mac(18),
        tpa: ip(24),
    })
}

/// (source port, destination port, flags) of a TCP segment.
fn parse_tcp(seg: &[u8]) -> (u16, u16, u8) {
    (
        u16::from_be_bytes([seg[0], seg[1]]),
        u16::from_be_bytes([seg[2], seg[3]]),
        seg[13],
    )
}

// ---- a guest ----

/// A UserNet and the frames it sent, as a guest sees them.
struct Guest {
    net: UserNet,
    rx: Arc<Mutex<VecDeque<Vec<u8>>>>,
}

impl Guest {
    fn new(config: &UserConfig) -> Self {
        let rx = Arc::new(Mutex::new(VecDeque::new()));
        let sink = rx.clone();
        let net = UserNet::new(
            config,
            Box::new(move |f| sink.lock().unwrap().push_back(f.to_vec())),
        )
        .unwrap();
        Guest { net, rx }
    }

    /// Polls until `want` picks a frame slirp sent, answering slirp's ARP requests for
    /// the guest on the way (slirp holds IPv4 frames until it knows the guest's MAC).
    fn wait_for<T>(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&[u8]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let frames: Vec<Vec<u8>> = self.rx.lock().unwrap().drain(..).collect();
            for f in frames {
                if let Some(a) = parse_arp(&f) {
                    if a.op == 1 && a.tpa == GUEST_IP {
                        self.net.input(&arp(2, a.sha, GUEST_IP, a.sha, a.spa));
                        continue;
                    }
                }
                if let Some(t) = want(&f) {
                    return Some(t);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            self.net.poll(&[], Duration::from_millis(10)).unwrap();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---- tests ----

#[test]
fn dhcp_discover_gets_an_offer() {
    let mut g = Guest::new(&UserConfig::default());
    g.net.input(&dhcp_discover(0x1234_5678));
    let offer = g
        .wait_for(WAIT, |f| {
            let ip = parse_ipv4(f)?;
            let u = ip.payload;
            (ip.proto == 17 && u[..4] == [0, 67, 0, 68]).then(|| u[8..].to_vec())
        })
        .expect("no DHCP reply");
    assert_eq!(offer[0], 2, "BOOTREPLY");
    assert_eq!(offer[4..8], 0x1234_5678u32.to_be_bytes());
    assert_eq!(offer[16..20], GUEST_IP.octets(), "yiaddr");
    assert_eq!(offer[28..34], GUEST_MAC);
    assert_eq!(offer[236..240], [99, 130, 83, 99]);
    let mut options = BTreeMap::new();
    let mut i = 240;
    while i < offer.len() && offer[i] != 255 {
        if offer[i] == 0 {
            i += 1;
            continue;
        }
        let len = usize::from(offer[i + 1]);
        options.insert(offer[i], offer[i + 2..i + 2 + len].to_vec());
        i += 2 + len;
    }
    assert_eq!(options[&53], [2], "DHCPOFFER");
    assert_eq!(options[&1], [255, 255, 255, 0], "subnet mask");
    assert_eq!(options[&3], HOST_IP.octets(), "router");
    assert_eq!(options[&6], DNS_IP.octets(), "DNS");
}

#[test]
fn arp_and_ping_to_the_host_address() {
    let mut g = Guest::new(&UserConfig::default());
    g.net.input(&arp(1, [0xff; 6], GUEST_IP, [0; 6], HOST_IP));
    let reply = g
        .wait_for(WAIT, |f| {
            parse_arp(f)
                .filter(|a| a.op == 2)
                .map(|a| (f[..6].to_vec(), a))
        })
        .expect("no ARP reply");
    let (dst, a) = reply;
    assert_eq!(dst, GUEST_MAC);
    assert_eq!((a.spa, a.tpa, a.tha), (HOST_IP, GUEST_IP, GUEST_MAC));
    let host_mac = a.sha;

    g.net
        .input(&eth(host_mac, ETH_IPV4, &icmp_echo(0x77, 3, b"ping!")));
    let echo = g
        .wait_for(WAIT, |f| {
            let ip = parse_ipv4(f)?;
            (ip.proto == 1 && ip.src == HOST_IP && ip.dst == GUEST_IP).then(|| ip.payload.to_vec())
        })
        .expect("no echo reply");
    assert_eq!(echo[0], 0, "echo reply");
    assert_eq!(fold(sum16(&echo)), 0, "ICMP checksum");
    assert_eq!(echo[4..8], [0, 0x77, 0, 3]);
    assert_eq!(&echo[8..], b"ping!");
}

#[test]
fn hostfwd_connection_reaches_the_guest() {
    let port = free_port();
    let rule = format!("tcp:127.0.0.1:{port}-:8080");
    let config = UserConfig {
        hostfwd: vec![HostForward::parse(&rule).unwrap()],
        ..UserConfig::default()
    };
    let mut g = Guest::new(&config);
    let info = g.net.connection_info();
    assert!(info.contains("TCP[HOST_FORWARD]"), "{info}");
    assert!(info.contains(&port.to_string()), "{info}");

    let _client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let syn = g
        .wait_for(WAIT, |f| {
            let ip = parse_ipv4(f)?;
            (ip.proto == 6 && ip.dst == GUEST_IP).then(|| (ip.src, parse_tcp(ip.payload)))
        })
        .expect("no SYN to the guest");
    let (src, (_, dport, flags)) = syn;
    assert_eq!(src, HOST_IP);
    assert_eq!(dport, 8080);
    assert_eq!(flags & (TCP_SYN | TCP_ACK), TCP_SYN);
}

/// A guest SYN to port `port` of the host address; whether the host's listener on
/// 127.0.0.1:`port` accepted, and the guest-bound TCP flags seen meanwhile.
fn guest_connects_to_host(restrict: bool) -> (bool, Vec<u8>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut g = Guest::new(&UserConfig {
        restrict,
        ..UserConfig::default()
    });
    // Teach slirp the guest's MAC and learn slirp's.
    g.net.input(&arp(1, [0xff; 6], GUEST_IP, [0; 6], HOST_IP));
    let host_mac = g
        .wait_for(WAIT, |f| parse_arp(f).filter(|a| a.op == 2).map(|a| a.sha))
        .unwrap();
    g.net.input(&eth(
        host_mac,
        ETH_IPV4,
        &tcp(GUEST_IP, 40000, HOST_IP, port, 1000, TCP_SYN),
    ));
    let mut flags = Vec::new();
    let mut accepted = false;
    let deadline = Instant::now() + Duration::from_secs(if restrict { 1 } else { 5 });
    while Instant::now() < deadline && !accepted {
        if let Some(f) = g.wait_for(Duration::from_millis(20), |f| {
            let ip = parse_ipv4(f)?;
            (ip.proto == 6 && ip.dst == GUEST_IP).then(|| parse_tcp(ip.payload))
        }) {
            assert_eq!((f.0, f.1), (port, 40000));
            flags.push(f.2);
        }
        match listener.accept() {
            Ok(_) => accepted = true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
    }
    (accepted, flags)
}

#[test]
fn guest_syn_to_host_address_connects_to_host_loopback() {
    let (accepted, _) = guest_connects_to_host(false);
    assert!(accepted, "the host listener saw no connection");
}

#[test]
fn restrict_refuses_guest_connections() {
    let (accepted, flags) = guest_connects_to_host(true);
    assert!(!accepted, "restrict=on let the guest connect");
    assert!(
        flags.iter().any(|f| f & TCP_RST != 0),
        "no RST to the guest: {flags:?}"
    );
}

#[test]
fn hostfwd_on_a_busy_port_names_the_rule() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let rule = format!("tcp:127.0.0.1:{port}-:22");
    let config = UserConfig {
        hostfwd: vec![HostForward::parse(&rule).unwrap()],
        ..UserConfig::default()
    };
    let err = UserNet::new(&config, Box::new(|_| {})).err().unwrap();
    assert_eq!(
        err.to_string(),
        format!("Could not set up host forwarding rule '{rule}'")
    );
}

#[test]
fn ipv6_router_solicitation_gets_an_advertisement() {
    let is_ra = |f: &[u8]| {
        (f.len() > 54 && ethertype(f) == ETH_IPV6 && f[20] == 58 && f[54] == 134).then_some(())
    };
    let mut g = Guest::new(&UserConfig::default());
    g.net.input(&router_solicitation());
    assert!(g.wait_for(WAIT, is_ra).is_some(), "no router advertisement");

    let mut g = Guest::new(&UserConfig {
        ipv6: false,
        ..UserConfig::default()
    });
    g.net.input(&router_solicitation());
    assert!(g.wait_for(Duration::from_millis(300), is_ra).is_none());
}

#[test]
fn poll_reports_extra_fds_and_fires_timers() {
    static FIRED: AtomicUsize = AtomicUsize::new(0);
    unsafe extern "C" fn fire(_: *mut c_void) {
        FIRED.fetch_add(1, Ordering::SeqCst);
    }
    let mut g = Guest::new(&UserConfig::default());
    let (mut a, b) = UnixStream::pair().unwrap();
    assert_eq!(
        g.net
            .poll(&[b.as_raw_fd()], Duration::from_millis(20))
            .unwrap(),
        [false]
    );
    a.write_all(b"x").unwrap();
    assert_eq!(
        g.net
            .poll(&[b.as_raw_fd()], Duration::from_secs(1))
            .unwrap(),
        [true]
    );

    // A timer the way slirp makes one: poll() wakes for it, and it fires once.
    let opaque = g.net.shared.as_ptr().cast();
    // SAFETY: the callbacks get the instance's own opaque, as libslirp passes it.
    let timer = unsafe { timer_new(Some(fire), ptr::null_mut(), opaque) };
    assert!(!timer.is_null());
    // SAFETY: as above.
    unsafe { timer_mod(timer, now_ns() / 1_000_000 + 50, opaque) };
    let start = Instant::now();
    while FIRED.load(Ordering::SeqCst) == 0 && start.elapsed() < Duration::from_secs(2) {
        g.net.poll(&[], Duration::from_secs(2)).unwrap();
    }
    assert_eq!(FIRED.load(Ordering::SeqCst), 1);
    assert!(start.elapsed() >= Duration::from_millis(45));
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "poll slept past the timer"
    );
    g.net.poll(&[], Duration::from_millis(20)).unwrap();
    assert_eq!(FIRED.load(Ordering::SeqCst), 1, "timers are one-shot");
    // A freed timer never fires.
    // SAFETY: as above.
    unsafe {
        timer_mod(timer, 0, opaque);
        timer_free(timer, opaque);
    }
    g.net.poll(&[], Duration::from_millis(20)).unwrap();
    assert_eq!(FIRED.load(Ordering::SeqCst), 1);
}

#[test]
fn usernet_moves_to_another_thread() {
    let mut g = Guest::new(&UserConfig::default());
    g.net.input(&arp(1, [0xff; 6], GUEST_IP, [0; 6], HOST_IP));
    let g = std::thread::spawn(move || {
        let got = g.rx.lock().unwrap().len();
        assert_eq!(got, 1, "the ARP reply");
        g
    })
    .join()
    .unwrap();
    drop(g);
}
