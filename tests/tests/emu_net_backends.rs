//! The other netdev backends end to end under emu: `user` (DHCP gives 10.0.2.15, a
//! hostfwd port reaches a guest `nc -l`, the guest reaches a host server through
//! 10.0.2.2), two guests cabled by `-netdev stream` exchanging a file, passt (Debian's)
//! as a stream backend: its DHCP and its way to the host, and vhost-user
//! both ways with a standalone vmm-net: our vmm as the frontend (`-netdev vhost-user`),
//! and QEMU 7.2 as the frontend.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_tests::console::GuestConsole;
use vmm_tests::netns::NetNs;
use vmm_tests::transfer::guest_sum;
use vmm_tests::{workspace_binary, TempDir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(180);

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn ready(console: &mut GuestConsole) {
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);
}

#[test]
fn the_user_network_gives_dhcp_hostfwd_and_the_host() {
    let fwd = free_port();
    let host_port = free_port();
    let server = TcpListener::bind(("127.0.0.1", host_port)).unwrap();
    let host_side = std::thread::spawn(move || {
        let (mut c, _) = server.accept().expect("the guest reaches the host");
        let mut buf = [0u8; 32];
        let n = c.read(&mut buf).unwrap();
        c.write_all(b"pong-from-host\n").unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    let netdev = format!("user,id=u0,hostfwd=tcp:127.0.0.1:{fwd}-:7000");
    let mut console = GuestConsole::boot_stock_linux(&[
        "-netdev",
        &netdev,
        "-device",
        "virtio-net-pci,netdev=u0,id=nic0",
    ]);
    ready(&mut console);
    let out = console.run(
        "ip link set eth0 up; udhcpc -i eth0 -q -n 2>&1 | tail -1; ip -4 addr show eth0",
        CMD_TIMEOUT,
    );
    assert!(out.contains("inet 10.0.2.15/24"), "DHCP: {out}");
    let out = console.run(
        &format!("echo ping-from-guest | nc 10.0.2.2 {host_port}"),
        CMD_TIMEOUT,
    );
    assert!(out.contains("pong-from-host"), "{out}");
    assert_eq!(host_side.join().unwrap(), "ping-from-guest\n");

    console.send("nc -l -p 7000 < /dev/null > /tmp/fwd &\n");
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        // The guest's listener may not be up yet: slirp then closes the connection at once.
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", fwd)) {
            s.write_all(b"through-hostfwd\n").unwrap();
            drop(s);
            let got = console.run("sleep 1; cat /tmp/fwd", CMD_TIMEOUT);
            if got.contains("through-hostfwd") {
                break;
            }
            console.send("nc -l -p 7000 < /dev/null > /tmp/fwd &\n");
        }
        assert!(Instant::now() < deadline, "hostfwd never reached the guest");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn two_guests_cabled_by_a_stream_exchange_a_file() {
    let dir = TempDir::new("stream");
    let sock = dir.join("cable.sock");
    let server = format!(
        "stream,id=s0,server=on,addr.type=unix,addr.path={}",
        sock.display()
    );
    let client = format!(
        "stream,id=s0,server=off,addr.type=unix,addr.path={}",
        sock.display()
    );
    let device = "virtio-net-pci,netdev=s0";
    let mut a = GuestConsole::boot_stock_linux(&["-netdev", &server, "-device", device]);
    let deadline = Instant::now() + CMD_TIMEOUT;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the server never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut b = GuestConsole::boot_stock_linux(&[
        "-netdev",
        &client,
        "-device",
        &format!("{device},mac=52:54:00:12:34:99"),
    ]);
    ready(&mut a);
    ready(&mut b);
    a.run(
        "ip link set eth0 up; ip addr add 10.7.0.1/24 dev eth0",
        CMD_TIMEOUT,
    );
    b.run(
        "ip link set eth0 up; ip addr add 10.7.0.2/24 dev eth0",
        CMD_TIMEOUT,
    );
    let out = a.run("ping -c 3 -W 5 10.7.0.2", CMD_TIMEOUT);
    assert!(out.contains("3 packets received"), "{out}");
    a.run(
        "dd if=/dev/urandom of=/tmp/file bs=64k count=64 2>/dev/null",
        CMD_TIMEOUT,
    );
    let sum = guest_sum(&a.run("sha256sum /tmp/file", CMD_TIMEOUT));
    // The receiver's stdin never ends: busybox nc stops when either side does, and a
    // receiver that closed its side would end the sender's nc.
    b.send("sleep 600 | nc -l -p 9000 > /tmp/file &\n");
    std::thread::sleep(Duration::from_secs(1));
    a.run("nc 10.7.0.2 9000 < /tmp/file", CMD_TIMEOUT);
    let got = b.run(
        "while pidof nc > /dev/null; do sleep 0.2; done; killall sleep; \
         ls -l /tmp/file; sha256sum /tmp/file",
        CMD_TIMEOUT,
    );
    assert_eq!(guest_sum(&got), sum, "{got}");
}

/// A standalone vmm-net on tap `tap` of `ns`, serving vhost-user on `sock`.
fn standalone_vmm_net(ns: &NetNs, tap: &str, sock: &std::path::Path) -> Child {
    let bin = workspace_binary("vmm-net");
    let bin = bin.display().to_string();
    let sock_arg = sock.display().to_string();
    let mut args = ns.wrap(&bin);
    args.extend(["--socket", &sock_arg, "--tap", tap]);
    let child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .spawn()
        .expect("standalone vmm-net");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "vmm-net never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn our_vmm_drives_a_backend_it_did_not_start() {
    let ns = NetNs::new("vuser");
    ns.tap("tapv", Some("10.8.0.1/24"), false);
    let dir = TempDir::new("vhost-user-net");
    let sock = dir.join("net.sock");
    let _backend = Killed(standalone_vmm_net(&ns, "tapv", &sock));
    let chardev = format!("socket,id=c0,path={}", sock.display());
    let mut console = GuestConsole::boot_stock_linux(&[
        "-chardev",
        &chardev,
        "-netdev",
        "vhost-user,id=n0,chardev=c0",
        "-device",
        "virtio-net-pci,netdev=n0",
    ]);
    ready(&mut console);
    let out = console.run(
        "ip link set eth0 up; ip addr add 10.8.0.2/24 dev eth0; ping -c 3 -W 5 10.8.0.1",
        CMD_TIMEOUT,
    );
    assert!(out.contains("3 packets received"), "{out}");
}

#[test]
fn qemu_drives_a_standalone_vmm_net() {
    let ns = NetNs::new("vqemu");
    ns.tap("tapq", Some("10.8.1.1/24"), false);
    let dir = TempDir::new("qemu-vmm-net");
    let sock = dir.join("net.sock");
    let _backend = Killed(standalone_vmm_net(&ns, "tapq", &sock));
    let guest = vmm_tests::repo_root().join("target/guest");
    let kernel = guest.join("vmlinuz").display().to_string();
    let initrd = guest.join("initramfs.img").display().to_string();
    let chardev = format!("socket,id=c0,path={}", sock.display());
    let mut console = GuestConsole::spawn_program(
        std::path::Path::new("qemu-system-x86_64"),
        &[
            "-accel",
            "tcg",
            "-m",
            "512",
            "-nodefaults",
            "-display",
            "none",
            // vhost-user needs guest RAM in shared memory it can hand over.
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa",
            "node,memdev=mem",
            "-kernel",
            &kernel,
            "-initrd",
            &initrd,
            "-append",
            "console=ttyS0",
            "-serial",
            "stdio",
            "-chardev",
            &chardev,
            "-netdev",
            "vhost-user,id=n0,chardev=c0",
            // vectors=0: QEMU 7.2 under TCG crashes setting up MSI-X notifiers for a
            // vhost-user card (msix_set_vector_notifiers); with INTx it runs.
            "-device",
            "virtio-net-pci,netdev=n0,vectors=0",
        ],
    );
    ready(&mut console);
    let out = console.run(
        "ip link set eth0 up; ip addr add 10.8.1.2/24 dev eth0; ping -c 3 -W 5 10.8.1.1",
        CMD_TIMEOUT,
    );
    assert!(out.contains("3 packets received"), "{out}");
    let out = ns.exec(&["ping", "-c", "3", "-W", "5", "10.8.1.2"]);
    assert!(
        out.status.success(),
        "host to guest: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn passt_serves_a_guest_over_a_stream() {
    // passt copies the address and route of its namespace's interface to the guest
    // (DHCP), and takes connections to the gateway address to its host's loopback.
    let ns = NetNs::new("passt");
    ns.ip(&["link", "add", "pt0", "type", "veth", "peer", "name", "pt1"]);
    ns.ip(&["addr", "add", "10.88.0.1/24", "dev", "pt0"]);
    ns.ip(&["link", "set", "pt0", "up"]);
    ns.ip(&["link", "set", "pt1", "up"]);
    ns.ip(&["route", "add", "default", "via", "10.88.0.254"]);
    let dir = TempDir::new("passt");
    // passt gives up root (it becomes nobody) before it binds its socket.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.join("passt.sock");
    let sock_arg = sock.display().to_string();
    let _passt = Killed(ns.spawn(&["passt", "--foreground", "--stderr", "--socket", &sock_arg]));
    let deadline = Instant::now() + CMD_TIMEOUT;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "passt never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (server, port) = ns.enter(|| {
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    });
    let host_side = std::thread::spawn(move || {
        let (mut c, _) = server.accept().expect("the guest reaches the host");
        let mut buf = [0u8; 32];
        let n = c.read(&mut buf).unwrap();
        c.write_all(b"pong-from-passt-host\n").unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    let netdev = format!("stream,id=p0,server=off,addr.type=unix,addr.path={sock_arg}");
    let mut console = GuestConsole::boot_stock_linux(&[
        "-netdev",
        &netdev,
        "-device",
        "virtio-net-pci,netdev=p0",
    ]);
    ready(&mut console);
    let out = console.run(
        "ip link set eth0 up; udhcpc -i eth0 -q -n 2>&1 | tail -1; ip -4 addr show eth0",
        CMD_TIMEOUT,
    );
    assert!(out.contains("inet 10.88.0.1/24"), "DHCP from passt: {out}");
    // Debian 12's passt (2023-03) did not pass the host's close on to the guest in our
    // runs, so nc may never end: it runs in the background and its output is read.
    console.run(
        &format!("(echo ping-through-passt | nc 10.88.0.254 {port} > /tmp/pong 2>&1 &)"),
        CMD_TIMEOUT,
    );
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        let out = console.run("cat /tmp/pong", CMD_TIMEOUT);
        if out.contains("pong-from-passt-host") {
            break;
        }
        assert!(Instant::now() < deadline, "no answer through passt: {out}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(host_side.join().unwrap(), "ping-through-passt\n");
}
