//! Network namespaces for network tests (the tests run as root): each test makes its own,
//! with its taps, and sends traffic only inside it. [`NetNs::enter`] runs code on a
//! thread that joined the namespace, so sockets it makes (a raw packet socket on a tap,
//! say) live there.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A network namespace, deleted on drop.
pub struct NetNs {
    name: String,
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("vmmt-{tag}-{}-{n}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&run("ip", &all).stdout).into_owned()
    }

    /// A command inside the namespace, to completion; its output.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        Command::new("ip")
            .args(&all)
            .output()
            .unwrap_or_else(|e| panic!("ip {all:?}: {e}"))
    }

    /// A command inside the namespace, started (stdin null, output to ours).
    pub fn spawn(&self, args: &[&str]) -> Child {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        Command::new("ip")
            .args(&all)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("ip {all:?}: {e}"))
    }

    /// The arguments that run `program` inside the namespace.
    pub fn wrap<'a>(&'a self, program: &'a str) -> Vec<&'a str> {
        vec!["netns", "exec", &self.name, program]
    }

    /// Add tap `name` (multiqueue if `multi_queue`) with address `addr` (CIDR), up.
    pub fn tap(&self, name: &str, addr: Option<&str>, multi_queue: bool) {
        let mut args = vec!["tuntap", "add", name, "mode", "tap"];
        if multi_queue {
            args.push("multi_queue");
        }
        self.ip(&args);
        if let Some(addr) = addr {
            self.ip(&["addr", "add", addr, "dev", name]);
        }
        // No IPv6 chatter (router solicitations, MLD) from the host side.
        let sysctl = format!("net.ipv6.conf.{name}.disable_ipv6=1");
        let _ = self.exec(&["sysctl", "-q", "-w", &sysctl]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// Move the calling thread into the namespace.
    fn join_thread(path: &str) {
        let ns = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on an fd we hold; it moves only this thread.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// Run `f` on a thread inside the namespace.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                Self::join_thread(&path);
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Start `f` on a thread inside the namespace (a client that runs beside the test).
    pub fn spawn_inside<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::thread::JoinHandle<R> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            Self::join_thread(&path);
            f()
        })
    }

    /// Open tap `name` in the namespace the way management does (libvirt): IFF_TAP,
    /// IFF_NO_PI, IFF_VNET_HDR. The fd, to pass to the vmm.
    pub fn open_tap(&self, name: &str) -> OwnedFd {
        self.open_tap_queue(name, false)
    }

    /// [`NetNs::open_tap`], one queue of a multiqueue tap (IFF_MULTI_QUEUE) when
    /// `multi_queue`.
    pub fn open_tap_queue(&self, name: &str, multi_queue: bool) -> OwnedFd {
        let name = name.to_string();
        self.enter(move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("/dev/net/tun");
            #[repr(C)]
            struct IfReq {
                name: [u8; 16],
                flags: i16,
                _pad: [u8; 22],
            }
            let mut req = IfReq {
                name: [0; 16],
                flags: 0x0002 | 0x1000 | 0x4000 | if multi_queue { 0x0100 } else { 0 },
                _pad: [0; 22],
            };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            // SAFETY: TUNSETIFF reads the struct ifreq we pass.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), 0x4004_54ca, &mut req) };
            assert_eq!(
                r,
                0,
                "TUNSETIFF {name}: {}",
                std::io::Error::last_os_error()
            );
            OwnedFd::from(file)
        })
    }

    /// A raw packet socket on interface `ifname` of the namespace: frames written to it
    /// go out of the interface (for a tap: to the vmm), frames the interface receives
    /// (from the vmm) can be read from it.
    pub fn packet_socket(&self, ifname: &str) -> PacketSocket {
        let ifname = ifname.to_string();
        self.enter(move || PacketSocket::open(&ifname))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// An AF_PACKET socket bound to one interface.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn open(ifname: &str) -> PacketSocket {
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket() with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: just created, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(ifname).expect("interface name");
        // SAFETY: if_nametoindex reads the C string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert!(index > 0, "no interface {ifname}");
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = index as i32;
        // SAFETY: binding with a valid sockaddr_ll of the given size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            r,
            0,
            "bind to {ifname}: {}",
            std::io::Error::last_os_error()
        );
        PacketSocket { fd }
    }

    /// Send an Ethernet frame out of the interface.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: writing `frame` on our socket.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame the interface received that `want` accepts, within `timeout`.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        want: impl Fn(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
                continue;
            }
            // SAFETY: reading into `buf`, which has room for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 && want(&buf[..n as usize]) {
                return Some(buf[..n as usize].to_vec());
            }
        }
    }
}

/// An Ethernet frame with our test ethertype (0x88b5, local experimental) and `payload`.
pub fn test_frame(dest: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = dest.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(payload);
    f
}

/// Whether `frame` carries the test ethertype and starts its payload with `marker`.
pub fn is_test_frame(frame: &[u8], marker: &[u8]) -> bool {
    frame.len() >= 14 + marker.len()
        && frame[12..14] == [0x88, 0xb5]
        && frame[14..].starts_with(marker)
}
