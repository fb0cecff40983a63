//! A safe wrapper around libslirp, the user-mode network stack behind QEMU's
//! `-netdev user`.
//!
//! [`UserConfig`] holds the `-netdev user` options we support (parsed with QEMU's rules and
//! error texts by [`UserConfig::from_options`] and [`HostForward::parse`]); [`UserNet`] owns
//! one slirp instance: frames from the guest go in through [`UserNet::input`], frames for the
//! guest come out through the `on_frame` callback, and [`UserNet::poll`] drives slirp's host
//! sockets and timers.
//!
//! IPv6 is supported with QEMU's fixed defaults (prefix `fec0::/64`, host `fec0::2`, DNS
//! `fec0::3`); host forwarding is IPv4 only, as in QEMU 7.2.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use libslirp_sys as sys;

/// The SlirpConfig version we hand to `slirp_new`. Version 4 would make libslirp read the
/// `init_completed` and `timer_new_opaque` callbacks, which libslirp-sys's `SlirpCb` lacks
/// (it would read past the struct), so 3 is the highest we can use.
const SLIRP_CONFIG_VERSION: u32 = 3;

/// libslirp's MTU bounds (`IF_MTU_MIN`, `IF_MTU_MAX`); outside them `slirp_new` fails.
const MTU_MIN: usize = 68;
const MTU_MAX: usize = 65521;

/// QEMU's fixed IPv6 network for `-netdev user` (no `ipv6-prefix=` support yet).
const IPV6_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0);
const IPV6_PREFIX_LEN: u8 = 64;
const IPV6_HOST: Ipv6Addr = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 2);
const IPV6_DNS: Ipv6Addr = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 3);

#[derive(Debug, thiserror::Error)]
pub enum SlirpError {
    /// A hostfwd rule that does not parse; the texts are QEMU's.
    #[error("Invalid host forwarding rule '{rule}' ({reason})")]
    BadHostForward { rule: String, reason: &'static str },
    /// slirp could not bind the host side of a forwarding rule.
    #[error("Could not set up host forwarding rule '{0}'")]
    HostForwardSetup(String),
    /// An inconsistent network configuration; the texts are QEMU's.
    #[error("{0}")]
    Config(&'static str),
    #[error("Invalid parameter '{0}'")]
    UnknownOption(String),
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    BadBool(String),
    #[error("'{0}' parameter cannot contain a NUL byte")]
    Nul(&'static str),
    #[error("MTU {0} is outside libslirp's range {MTU_MIN}-{MTU_MAX}")]
    Mtu(usize),
    #[error("libslirp refused the configuration")]
    Init,
    #[error("poll: {0}")]
    Poll(#[source] io::Error),
}

/// One `hostfwd=` rule: connections to `host_addr:host_port` on the host are forwarded to
/// `guest_addr:guest_port` in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostForward {
    pub udp: bool,
    /// `UNSPECIFIED` listens on every host address.
    pub host_addr: Ipv4Addr,
    /// 0 lets the kernel pick a port.
    pub host_port: u16,
    /// `UNSPECIFIED` means the first DHCP address (`dhcp_start`), as in QEMU.
    pub guest_addr: Ipv4Addr,
    pub guest_port: u16,
}

impl HostForward {
    /// Parses QEMU's `[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT` the way QEMU 7.2's
    /// `slirp_hostfwd()` does (ports in C `strtol` base 0, addresses in `inet_aton` forms),
    /// with its error texts.
    pub fn parse(rule: &str) -> Result<Self, SlirpError> {
        let bad = |reason| SlirpError::BadHostForward {
            rule: rule.to_string(),
            reason,
        };
        let (proto, rest) = rule.split_once(':').ok_or_else(|| bad("No : separators"))?;
        let udp = match proto {
            "" | "tcp" => false,
            "udp" => true,
            _ => return Err(bad("Bad protocol name")),
        };
        let (host, rest) = rest
            .split_once(':')
            .ok_or_else(|| bad("Missing : separator"))?;
        let host_addr = if host.is_empty() {
            Ipv4Addr::UNSPECIFIED
        } else {
            inet_aton(host).ok_or_else(|| bad("Bad host address"))?
        };
        let (host_port, rest) = rest
            .split_once('-')
            .ok_or_else(|| bad("Bad host port separator"))?;
        let host_port = c_strtol(host_port)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| bad("Bad host port"))?;
        let (guest, guest_port) = rest
            .split_once(':')
            .ok_or_else(|| bad("Missing guest address"))?;
        let guest_addr = if guest.is_empty() {
            Ipv4Addr::UNSPECIFIED
        } else {
            inet_aton(guest).ok_or_else(|| bad("Bad guest address"))?
        };
        let guest_port = c_strtol(guest_port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("Bad guest port"))?;
        Ok(HostForward {
            udp,
            host_addr,
            host_port,
            guest_addr,
            guest_port,
        })
    }
}

/// The rule in QEMU's syntax (unspecified addresses left empty): how errors name it.
impl fmt::Display for HostForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = |a: Ipv4Addr| {
            if a.is_unspecified() {
                String::new()
            } else {
                a.to_string()
            }
        };
        write!(
            f,
            "{}:{}:{}-{}:{}",
            if self.udp { "udp" } else { "tcp" },
            addr(self.host_addr),
            self.host_port,
            addr(self.guest_addr),
            self.guest_port
        )
    }
}

/// The `-netdev user` options we support.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserConfig {
    /// `net=`: the guest network (default 10.0.2.0/24).
    pub net: Ipv4Addr,
    pub prefix_len: u8,
    /// `host=`: slirp's own address, which also stands for the host's loopback (default .2).
    pub host: Ipv4Addr,
    /// `dhcpstart=`: the first address DHCP hands out (default .15).
    pub dhcp_start: Ipv4Addr,
    /// `dns=`: slirp's DNS forwarder (default .3).
    pub dns: Ipv4Addr,
    /// `restrict=on`: the guest reaches nothing but forwarded ports and slirp's services.
    pub restrict: bool,
    /// `hostname=`: the name DHCP gives the guest.
    pub hostname: Option<String>,
    /// `domainname=`: the DNS domain DHCP gives the guest.
    pub domainname: Option<String>,
    /// `ipv6=` (on by default, as in QEMU), on QEMU's fixed fec0::/64 network.
    pub ipv6: bool,
    /// `hostfwd=` rules, set up in order when the stack starts.
    pub hostfwd: Vec<HostForward>,
    /// The interface MTU (and MRU) slirp uses towards the guest.
    pub mtu: usize,
}

impl Default for UserConfig {
    fn default() -> Self {
        UserConfig {
            net: Ipv4Addr::new(10, 0, 2, 0),
            prefix_len: 24,
            host: Ipv4Addr::new(10, 0, 2, 2),
            dhcp_start: Ipv4Addr::new(10, 0, 2, 15),
            dns: Ipv4Addr::new(10, 0, 2, 3),
            restrict: false,
            hostname: None,
            domainname: None,
            ipv6: true,
            hostfwd: Vec::new(),
            mtu: 1500,
        }
    }
}

impl UserConfig {
    /// Builds a configuration from `-netdev user` options (without `type=`; `id=` is
    /// ignored): `net`, `host`, `dhcpstart`, `dns`, `restrict`, `hostname`, `domainname`,
    /// `ipv6` and repeated `hostfwd`. Follows QEMU 7.2's `net_slirp_init()`: `net=` without
    /// a mask takes the classful mask (so `10.0.2.0` is a /8) and moves the default host,
    /// DHCP and DNS addresses into the network; errors carry QEMU's texts.
    pub fn from_options<'a, I>(opts: I) -> Result<Self, SlirpError>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let mut config = UserConfig::default();
        let (mut net, mut host, mut dhcp, mut dns) = (None, None, None, None);
        let mut hostfwd = Vec::new();
        for (key, value) in opts {
            match key {
                "id" => {}
                "net" => net = Some(value),
                "host" => host = Some(value),
                "dhcpstart" => dhcp = Some(value),
                "dns" => dns = Some(value),
                "restrict" => config.restrict = parse_bool(key, value)?,
                "ipv6" => config.ipv6 = parse_bool(key, value)?,
                "hostname" => config.hostname = Some(value.to_string()),
                "domainname" => config.domainname = Some(value.to_string()),
                "hostfwd" => hostfwd.push(value),
                _ => return Err(SlirpError::UnknownOption(key.to_string())),
            }
        }

        if let Some(vnet) = net {
            let (addr, mask) = parse_net(vnet)?;
            config.net = addr & mask;
            config.prefix_len = u8::try_from(u32::from(mask).leading_ones()).unwrap_or(32);
            let inside = |low: u32| config.net | Ipv4Addr::from(low & !u32::from(mask));
            config.host = inside(0x0202);
            config.dhcp_start = inside(0x020f);
            config.dns = inside(0x0203);
        }
        if let Some(host) = host {
            config.host = inet_aton(host).ok_or(SlirpError::Config("Failed to parse host"))?;
        }
        if let Some(dns) = dns {
            config.dns = inet_aton(dns).ok_or(SlirpError::Config("Failed to parse DNS"))?;
        }
        if let Some(dhcp) = dhcp {
            config.dhcp_start =
                inet_aton(dhcp).ok_or(SlirpError::Config("Failed to parse DHCP start address"))?;
        }
        config.validate()?;
        for rule in hostfwd {
            config.hostfwd.push(HostForward::parse(rule)?);
        }
        Ok(config)
    }

    fn mask(&self) -> Ipv4Addr {
        let bits = u32::from(self.prefix_len.min(32));
        Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
    }

    /// QEMU's consistency checks, in QEMU's order and with its texts.
    fn validate(&self) -> Result<(), SlirpError> {
        if self.prefix_len > 32 {
            return Err(SlirpError::Config(
                "Invalid netmask provided (must be in range 4-32)",
            ));
        }
        let mask = self.mask();
        let net = self.net & mask;
        let inside = |a: Ipv4Addr| a & mask == net;
        if !inside(self.host) {
            return Err(SlirpError::Config("Host doesn't belong to network"));
        }
        if !inside(self.dns) {
            return Err(SlirpError::Config("DNS doesn't belong to network"));
        }
        if self.dns == self.host {
            return Err(SlirpError::Config("DNS must be different from host"));
        }
        if !inside(self.dhcp_start) {
            return Err(SlirpError::Config("DHCP doesn't belong to network"));
        }
        if self.dhcp_start == self.host || self.dhcp_start == self.dns {
            // QEMU's wording (it means "DHCP must be different from host and DNS").
            return Err(SlirpError::Config(
                "DNS must be different from host and DNS",
            ));
        }
        match &self.domainname {
            Some(d) if d.is_empty() => {
                return Err(SlirpError::Config("'domainname' parameter cannot be empty"))
            }
            Some(d) if d.len() > 255 => {
                return Err(SlirpError::Config(
                    "'domainname' parameter cannot exceed 255 bytes",
                ))
            }
            _ => {}
        }
        if self.hostname.as_ref().is_some_and(|h| h.len() > 255) {
            return Err(SlirpError::Config(
                "'vhostname' parameter cannot exceed 255 bytes",
            ));
        }
        if !(MTU_MIN..=MTU_MAX).contains(&self.mtu) {
            return Err(SlirpError::Mtu(self.mtu));
        }
        Ok(())
    }
}

/// QEMU's boolean option values (`qapi_bool_parse`).
fn parse_bool(key: &str, value: &str) -> Result<bool, SlirpError> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(SlirpError::BadBool(key.to_string())),
    }
}

/// `net=ADDR[/PREFIX|/MASK]` as QEMU 7.2 parses it; without a mask the classful one.
fn parse_net(vnet: &str) -> Result<(Ipv4Addr, Ipv4Addr), SlirpError> {
    let unparsable = SlirpError::Config("Failed to parse netmask");
    let Some((addr, mask)) = vnet.split_once('/') else {
        let addr = inet_aton(vnet).ok_or(unparsable)?;
        let a = u32::from(addr);
        let mask = CLASSFUL_MASKS
            .iter()
            .find(|&&(bits, value, _)| a & bits == value)
            .map_or(0xffff_fff0, |&(_, _, mask)| mask);
        return Ok((addr, Ipv4Addr::from(mask)));
    };
    let addr = inet_aton(addr).ok_or(unparsable)?;
    let mask = match decimal_prefix(mask) {
        Some(shift) if (4..=32).contains(&shift) => Ipv4Addr::from(u32::MAX << (32 - shift)),
        Some(_) => {
            return Err(SlirpError::Config(
                "Invalid netmask provided (must be in range 4-32)",
            ))
        }
        None => {
            let m = inet_aton(mask).ok_or(SlirpError::Config(
                "Failed to parse netmask (trailing chars)",
            ))?;
            // Our configuration keeps a prefix length, so the mask must be contiguous.
            if u32::from(m).leading_ones() + u32::from(m).trailing_zeros() != 32 {
                return Err(SlirpError::Config(
                    "Failed to parse netmask (not a contiguous mask)",
                ));
            }
            m
        }
    };
    Ok((addr, mask))
}

/// QEMU's masks for `net=` without one, first match wins: (address bits, their value,
/// mask). Anything else (multicast and reserved) gets a /28.
const CLASSFUL_MASKS: [(u32, u32, u32); 6] = [
    (0x8000_0000, 0, 0xff00_0000),           // class A
    (0xfff0_0000, 0xac10_0000, 0xfff0_0000), // 172.16.0.0/12
    (0xc000_0000, 0x8000_0000, 0xffff_0000), // class B
    (0xffff_0000, 0xc0a8_0000, 0xffff_0000), // 192.168.0.0/16
    (0xffff_0000, 0xc612_0000, 0xfffe_0000), // 198.18.0.0/15
    (0xe000_0000, 0xe000_0000, 0xffff_ff00), // QEMU's "class C" test
];

/// QEMU reads the prefix with `strtol(.., 10)` and takes it if nothing trails it.
fn decimal_prefix(s: &str) -> Option<i64> {
    let t = s.trim_start_matches(is_c_space);
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() {
        // No digits: strtol leaves `end` at the start, so only "" counts (as 0).
        return s.is_empty().then_some(0);
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v = digits.bytes().fold(0i64, |v, b| {
        v.saturating_mul(10).saturating_add(i64::from(b - b'0'))
    });
    Some(if neg { -v } else { v })
}

fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// C's `strtoul`/`strtol` with base 0 on a prefix of `s`: the value (saturated) and the
/// length consumed, 0 when there are no digits.
fn strtol_prefix(s: &str) -> (i64, usize) {
    let b = s.as_bytes();
    let mut i = b.iter().take_while(|&&c| is_c_space(c as char)).count();
    let mut neg = false;
    if let Some(&c) = b.get(i) {
        if c == b'-' || c == b'+' {
            neg = c == b'-';
            i += 1;
        }
    }
    let (radix, start) = if b.get(i) == Some(&b'0')
        && matches!(b.get(i + 1), Some(b'x' | b'X'))
        && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    {
        (16, i + 2)
    } else if b.get(i) == Some(&b'0') {
        (8, i)
    } else {
        (10, i)
    };
    let digits = b[start..]
        .iter()
        .take_while(|&&c| (c as char).is_digit(radix))
        .count();
    if digits == 0 {
        return (0, 0);
    }
    let v = b[start..start + digits].iter().fold(0i64, |v, &c| {
        let d = (c as char).to_digit(radix).map_or(0, i64::from);
        v.saturating_mul(i64::from(radix)).saturating_add(d)
    });
    (if neg { -v } else { v }, start + digits)
}

/// `strtol(s, &end, 0)` accepted only when `*end == '\0'` (so "" is 0, as in QEMU).
fn c_strtol(s: &str) -> Option<i64> {
    let (v, used) = strtol_prefix(s);
    (used == s.len()).then_some(v)
}

/// glibc's `inet_aton`: 1 to 4 dot-separated parts in C number syntax (`10.0.2.15`,
/// `127.1`, `0x7f.1`), then the end or whitespace (after which anything is ignored).
fn inet_aton(s: &str) -> Option<Ipv4Addr> {
    let mut parts: Vec<u32> = Vec::with_capacity(4);
    let mut rest = s;
    let last = loop {
        if !rest.as_bytes().first().is_some_and(u8::is_ascii_digit) {
            return None;
        }
        let (v, used) = strtol_prefix(rest);
        let v = u32::try_from(v).ok()?;
        rest = &rest[used..];
        match rest.strip_prefix('.') {
            Some(after) => {
                if parts.len() > 2 || v > 0xff {
                    return None;
                }
                parts.push(v);
                rest = after;
            }
            None => break v,
        }
    };
    if rest.chars().next().is_some_and(|c| !is_c_space(c)) {
        return None;
    }
    let limit = match parts.len() {
        0 => u32::MAX,
        1 => 0xff_ffff,
        2 => 0xffff,
        _ => 0xff,
    };
    if last > limit {
        return None;
    }
    let high = parts
        .iter()
        .enumerate()
        .fold(0u32, |acc, (i, &p)| acc | (p << (24 - 8 * i)));
    Some(Ipv4Addr::from(high | last))
}

/// libslirp keeps process-wide state (its clock `curtime`, a one-time init) without locking,
/// so every call into libslirp, from any instance, holds this lock.
static SLIRP_LOCK: Mutex<()> = Mutex::new(());

fn slirp_lock() -> MutexGuard<'static, ()> {
    SLIRP_LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where slirp's frames for the guest go.
pub type FrameSink = Box<dyn FnMut(&[u8]) + Send>;

/// A timer slirp created; one-shot like QEMU's.
struct Timer {
    cb: sys::SlirpTimerCb,
    cb_opaque: *mut c_void,
    /// Milliseconds on [`now_ns`]'s clock; `None` while disarmed.
    expire_ms: Option<i64>,
}

/// What slirp's callbacks reach through their opaque pointer. Only shared references to it
/// ever exist (libslirp holds the pointer while we do), so its mutable parts are cells.
struct Shared {
    on_frame: RefCell<FrameSink>,
    timers: RefCell<BTreeMap<usize, Timer>>,
    next_timer: Cell<usize>,
}

impl Shared {
    fn next_deadline_ms(&self) -> Option<i64> {
        let timers = self.timers.try_borrow().ok()?;
        timers.values().filter_map(|t| t.expire_ms).min()
    }
}

/// A user-mode network: one libslirp instance and its callbacks.
///
/// Callbacks run inside `input`, `poll` and `add_hostfwd`; `on_frame` must not call into
/// another `UserNet` (all instances share one lock).
pub struct UserNet {
    slirp: NonNull<sys::Slirp>,
    /// A leaked `Box<Shared>`, freed in `Drop` after `slirp_cleanup`.
    shared: NonNull<Shared>,
}

// SAFETY: a UserNet exclusively owns its Slirp and its Shared state (the raw pointers are
// not shared with anything but that Slirp). libslirp has no thread affinity (no thread-local
// state, no main context), its process-wide state is guarded by SLIRP_LOCK, the callback
// it may run (`on_frame`) is Send, and the timer opaques are the Slirp's own pointers. So the
// whole may move to another thread; it is not Sync (methods are not safe to run concurrently
// on one instance and the cells are not thread-safe).
unsafe impl Send for UserNet {}

impl UserNet {
    /// Starts the stack and sets up `config.hostfwd`. `on_frame` gets every ethernet frame
    /// slirp sends to the guest.
    pub fn new(config: &UserConfig, on_frame: FrameSink) -> Result<Self, SlirpError> {
        config.validate()?;
        let cstring = |name, s: &Option<String>| {
            s.as_deref()
                .map(|s| CString::new(s).map_err(|_| SlirpError::Nul(name)))
                .transpose()
        };
        let hostname = cstring("hostname", &config.hostname)?;
        let domainname = cstring("domainname", &config.domainname)?;
        let opt_ptr = |s: &Option<CString>| s.as_ref().map_or(ptr::null(), |s| s.as_ptr());

        let mask = config.mask();
        let cfg = sys::SlirpConfig {
            version: SLIRP_CONFIG_VERSION,
            restricted: c_int::from(config.restrict),
            in_enabled: true,
            vnetwork: (config.net & mask).into(),
            vnetmask: mask.into(),
            vhost: config.host.into(),
            in6_enabled: config.ipv6,
            vprefix_addr6: IPV6_PREFIX.into(),
            vprefix_len: IPV6_PREFIX_LEN,
            vhost6: IPV6_HOST.into(),
            vhostname: opt_ptr(&hostname),
            tftp_server_name: ptr::null(),
            tftp_path: ptr::null(),
            bootfile: ptr::null(),
            vdhcp_start: config.dhcp_start.into(),
            vnameserver: config.dns.into(),
            vnameserver6: IPV6_DNS.into(),
            vdnssearch: ptr::null_mut(),
            vdomainname: opt_ptr(&domainname),
            if_mtu: config.mtu,
            if_mru: config.mtu,
            disable_host_loopback: false,
            enable_emu: false,
            outbound_addr: ptr::null(),
            outbound_addr6: ptr::null(),
            disable_dns: false,
            disable_dhcp: false,
        };

        let shared = NonNull::from(Box::leak(Box::new(Shared {
            on_frame: RefCell::new(on_frame),
            timers: RefCell::new(BTreeMap::new()),
            next_timer: Cell::new(1),
        })));
        let slirp = {
            let _lock = slirp_lock();
            // SAFETY: cfg and the strings it points to live across the call (slirp copies
            // the strings); CALLBACKS is a static, and `shared` stays allocated until Drop,
            // after slirp_cleanup, so both outlive the instance.
            unsafe { sys::slirp_new(&cfg, &CALLBACKS, shared.as_ptr().cast()) }
        };
        let Some(slirp) = NonNull::new(slirp) else {
            // SAFETY: `shared` came from Box::leak above and slirp_new failed, so nothing
            // else refers to it.
            drop(unsafe { Box::from_raw(shared.as_ptr()) });
            return Err(SlirpError::Init);
        };
        let mut net = UserNet { slirp, shared };
        for fwd in &config.hostfwd {
            net.add_hostfwd(fwd)?;
        }
        Ok(net)
    }

    fn shared(&self) -> &Shared {
        // SAFETY: `shared` is valid until Drop, and only shared references to it exist.
        unsafe { self.shared.as_ref() }
    }

    /// Adds a forwarding rule (as HMP `hostfwd_add` does); fails if the host side cannot
    /// be bound.
    pub fn add_hostfwd(&mut self, fwd: &HostForward) -> Result<(), SlirpError> {
        let _lock = slirp_lock();
        // SAFETY: self.slirp is a live instance; the arguments are plain values.
        let rc = unsafe {
            sys::slirp_add_hostfwd(
                self.slirp.as_ptr(),
                c_int::from(fwd.udp),
                fwd.host_addr.into(),
                c_int::from(fwd.host_port),
                fwd.guest_addr.into(),
                c_int::from(fwd.guest_port),
            )
        };
        if rc < 0 {
            return Err(SlirpError::HostForwardSetup(fwd.to_string()));
        }
        Ok(())
    }

    /// Removes the rule listening on `host_addr:host_port` (HMP `hostfwd_remove`); false if
    /// there is none.
    pub fn remove_hostfwd(&mut self, udp: bool, host_addr: Ipv4Addr, host_port: u16) -> bool {
        let _lock = slirp_lock();
        // SAFETY: self.slirp is a live instance; the arguments are plain values.
        let rc = unsafe {
            sys::slirp_remove_hostfwd(
                self.slirp.as_ptr(),
                c_int::from(udp),
                host_addr.into(),
                c_int::from(host_port),
            )
        };
        rc == 0
    }

    /// A frame from the guest.
    pub fn input(&mut self, frame: &[u8]) {
        let Ok(len) = c_int::try_from(frame.len()) else {
            tracing::warn!("dropping a {}-byte frame from the guest", frame.len());
            return;
        };
        let _lock = slirp_lock();
        // SAFETY: the frame is valid for `len` bytes during the call; slirp copies it.
        unsafe { sys::slirp_input(self.slirp.as_ptr(), frame.as_ptr(), len) };
    }

    /// Waits up to `timeout` for slirp's sockets or for any of `extra` to be readable,
    /// services slirp's sockets and expired timers, and says which of `extra` are readable
    /// (or hung up or in error, so that a read will not block). The wait is shorter when
    /// slirp or a timer needs it (at most a second), so callers loop.
    pub fn poll(&mut self, extra: &[RawFd], timeout: Duration) -> Result<Vec<bool>, SlirpError> {
        let mut timeout_ms = u32::try_from(timeout.as_nanos().div_ceil(1_000_000))
            .unwrap_or(u32::MAX)
            .min(i32::MAX as u32);
        if let Some(deadline) = self.shared().next_deadline_ms() {
            let left = deadline.saturating_sub(now_ns() / 1_000_000).max(0);
            timeout_ms = timeout_ms.min(u32::try_from(left).unwrap_or(u32::MAX));
        }

        let mut fds: Vec<libc::pollfd> = Vec::new();
        {
            let _lock = slirp_lock();
            // SAFETY: `fds` outlives the call and add_poll only pushes to it.
            unsafe {
                sys::slirp_pollfds_fill(
                    self.slirp.as_ptr(),
                    &mut timeout_ms,
                    Some(add_poll),
                    ptr::addr_of_mut!(fds).cast(),
                )
            };
        }
        let first_extra = fds.len();
        fds.extend(extra.iter().map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));

        let wait = c_int::try_from(timeout_ms).unwrap_or(c_int::MAX);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        let error = (n < 0).then(io::Error::last_os_error);
        {
            let _lock = slirp_lock();
            // SAFETY: `fds` outlives the call and get_revents only reads it.
            unsafe {
                sys::slirp_pollfds_poll(
                    self.slirp.as_ptr(),
                    c_int::from(error.is_some()),
                    Some(get_revents),
                    ptr::addr_of_mut!(fds).cast(),
                )
            };
            self.run_timers();
        }
        match error {
            Some(e) if e.kind() == io::ErrorKind::Interrupted => Ok(vec![false; extra.len()]),
            Some(e) => Err(SlirpError::Poll(e)),
            None => Ok(fds[first_extra..]
                .iter()
                .map(|p| {
                    p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
                })
                .collect()),
        }
    }

    /// Fires expired timers; the caller holds SLIRP_LOCK. A callback may free or re-arm any
    /// timer, so each is looked up again just before it fires.
    fn run_timers(&self) {
        let now_ms = now_ns() / 1_000_000;
        let due: Vec<usize> = match self.shared().timers.try_borrow() {
            Ok(timers) => timers
                .iter()
                .filter(|(_, t)| t.expire_ms.is_some_and(|e| e <= now_ms))
                .map(|(&id, _)| id)
                .collect(),
            Err(_) => return,
        };
        for id in due {
            let fire = {
                let Ok(mut timers) = self.shared().timers.try_borrow_mut() else {
                    return;
                };
                match timers.get_mut(&id) {
                    Some(t) if t.expire_ms.is_some_and(|e| e <= now_ms) => {
                        t.expire_ms = None;
                        t.cb.map(|cb| (cb, t.cb_opaque))
                    }
                    _ => None,
                }
            };
            if let Some((cb, cb_opaque)) = fire {
                // SAFETY: slirp gave us this callback and its opaque in timer_new and has
                // not freed the timer; no borrow of the timer list is held across the call.
                unsafe { cb(cb_opaque) };
            }
        }
    }

    /// `slirp_connection_info`: the table HMP `info usernet` prints.
    pub fn connection_info(&self) -> String {
        let _lock = slirp_lock();
        // SAFETY: self.slirp is a live instance.
        let text = unsafe { sys::slirp_connection_info(self.slirp.as_ptr()) };
        if text.is_null() {
            return String::new();
        }
        // SAFETY: libslirp returns a NUL-terminated string allocated with g_malloc, which we
        // own and free once copied.
        unsafe {
            let info = CStr::from_ptr(text).to_string_lossy().into_owned();
            g_free(text.cast());
            info
        }
    }
}

impl Drop for UserNet {
    fn drop(&mut self) {
        {
            let _lock = slirp_lock();
            // SAFETY: the instance is live and never used again; its timer_free callbacks
            // still find `shared`, which is freed only below.
            unsafe { sys::slirp_cleanup(self.slirp.as_ptr()) };
        }
        // SAFETY: `shared` came from Box::leak in new() and libslirp, now gone, was the only
        // other holder of the pointer.
        drop(unsafe { Box::from_raw(self.shared.as_ptr()) });
    }
}

#[link(name = "glib-2.0")]
extern "C" {
    /// Frees what libslirp allocates for us (the connection_info text).
    fn g_free(mem: *mut c_void);
}

/// libslirp keeps a pointer to this for the instance's lifetime, hence a static.
static CALLBACKS: sys::SlirpCb = sys::SlirpCb {
    send_packet: Some(send_packet),
    guest_error: Some(guest_error),
    clock_get_ns: Some(clock_get_ns),
    timer_new: Some(timer_new),
    timer_free: Some(timer_free),
    timer_mod: Some(timer_mod),
    register_poll_fd: Some(register_poll_fd),
    unregister_poll_fd: Some(unregister_poll_fd),
    notify: Some(notify),
};

/// Runs a callback body without letting a panic unwind into C.
fn no_unwind<R>(fallback: R, body: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// # Safety
/// `opaque` is the `Shared` pointer given to slirp_new, still alive.
unsafe fn shared<'a>(opaque: *mut c_void) -> &'a Shared {
    // SAFETY: per the function's contract.
    unsafe { &*opaque.cast::<Shared>() }
}

unsafe extern "C" fn send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    no_unwind(-1, || {
        // SAFETY: slirp passes its opaque (our Shared) and a frame of `len` bytes.
        let (shared, frame) = unsafe {
            (
                shared(opaque),
                std::slice::from_raw_parts(buf.cast::<u8>(), len),
            )
        };
        match shared.on_frame.try_borrow_mut() {
            Ok(mut on_frame) => on_frame(frame),
            Err(_) => tracing::warn!("slirp sent a frame from inside on_frame; dropped"),
        }
        isize::try_from(len).unwrap_or(isize::MAX)
    })
}

unsafe extern "C" fn guest_error(msg: *const c_char, _opaque: *mut c_void) {
    no_unwind((), || {
        if msg.is_null() {
            return;
        }
        // SAFETY: slirp passes a NUL-terminated message.
        let msg = unsafe { CStr::from_ptr(msg) };
        tracing::warn!("slirp: guest error: {}", msg.to_string_lossy());
    })
}

fn now_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec)
}

unsafe extern "C" fn clock_get_ns(_opaque: *mut c_void) -> i64 {
    now_ns()
}

unsafe extern "C" fn timer_new(
    cb: sys::SlirpTimerCb,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    no_unwind(ptr::null_mut(), || {
        // SAFETY: slirp passes its opaque, our Shared.
        let shared = unsafe { shared(opaque) };
        let Ok(mut timers) = shared.timers.try_borrow_mut() else {
            return ptr::null_mut();
        };
        let id = shared.next_timer.get();
        shared.next_timer.set(id.wrapping_add(1).max(1));
        timers.insert(
            id,
            Timer {
                cb,
                cb_opaque,
                expire_ms: None,
            },
        );
        // The handle is the timer's id (never 0), not an address.
        id as *mut c_void
    })
}

unsafe extern "C" fn timer_free(timer: *mut c_void, opaque: *mut c_void) {
    no_unwind((), || {
        // SAFETY: slirp passes its opaque, our Shared.
        let shared = unsafe { shared(opaque) };
        if let Ok(mut timers) = shared.timers.try_borrow_mut() {
            timers.remove(&(timer as usize));
        }
    })
}

unsafe extern "C" fn timer_mod(timer: *mut c_void, expire_time: i64, opaque: *mut c_void) {
    no_unwind((), || {
        // SAFETY: slirp passes its opaque, our Shared.
        let shared = unsafe { shared(opaque) };
        if let Ok(mut timers) = shared.timers.try_borrow_mut() {
            if let Some(t) = timers.get_mut(&(timer as usize)) {
                t.expire_ms = Some(expire_time);
            }
        }
    })
}

/// poll() re-collects slirp's sockets every round (slirp_pollfds_fill), so there is nothing
/// to register.
unsafe extern "C" fn register_poll_fd(_fd: c_int, _opaque: *mut c_void) {}

unsafe extern "C" fn unregister_poll_fd(_fd: c_int, _opaque: *mut c_void) {}

/// slirp asks to be polled again soon; our caller polls in a loop anyway.
unsafe extern "C" fn notify(_opaque: *mut c_void) {}

const POLL_FLAGS: [(c_int, libc::c_short); 5] = [
    (sys::SLIRP_POLL_IN, libc::POLLIN),
    (sys::SLIRP_POLL_OUT, libc::POLLOUT),
    (sys::SLIRP_POLL_PRI, libc::POLLPRI),
    (sys::SLIRP_POLL_ERR, libc::POLLERR),
    (sys::SLIRP_POLL_HUP, libc::POLLHUP),
];

unsafe extern "C" fn add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    no_unwind(-1, || {
        // SAFETY: poll() passes its `Vec<pollfd>`, not otherwise borrowed during the call.
        let fds = unsafe { &mut *opaque.cast::<Vec<libc::pollfd>>() };
        let Ok(idx) = c_int::try_from(fds.len()) else {
            return -1;
        };
        let events = POLL_FLAGS
            .iter()
            .filter(|(s, _)| events & s != 0)
            .fold(0, |acc, (_, p)| acc | p);
        fds.push(libc::pollfd {
            fd,
            events,
            revents: 0,
        });
        idx
    })
}

unsafe extern "C" fn get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    no_unwind(0, || {
        // SAFETY: poll() passes its `Vec<pollfd>`, not otherwise borrowed during the call.
        let fds = unsafe { &*opaque.cast::<Vec<libc::pollfd>>() };
        let Some(p) = usize::try_from(idx).ok().and_then(|i| fds.get(i)) else {
            return 0;
        };
        POLL_FLAGS
            .iter()
            .filter(|(_, f)| p.revents & f != 0)
            .fold(0, |acc, (s, _)| acc | s)
    })
}

#[cfg(test)]
mod tests {
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
                (ip.proto == 1 && ip.src == HOST_IP && ip.dst == GUEST_IP)
                    .then(|| ip.payload.to_vec())
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
    fn hostfwd_parse_follows_qemu() {
        let fwd = HostForward::parse("tcp::5555-:22").unwrap();
        assert_eq!(
            fwd,
            HostForward {
                udp: false,
                host_addr: Ipv4Addr::UNSPECIFIED,
                host_port: 5555,
                guest_addr: Ipv4Addr::UNSPECIFIED,
                guest_port: 22,
            }
        );
        assert_eq!(fwd.to_string(), "tcp::5555-:22");
        let fwd = HostForward::parse("udp:127.1:0x10-10.0.2.20:010").unwrap();
        assert!(fwd.udp);
        assert_eq!(fwd.host_addr, Ipv4Addr::LOCALHOST);
        assert_eq!((fwd.host_port, fwd.guest_port), (16, 8));
        assert_eq!(fwd.guest_addr, Ipv4Addr::new(10, 0, 2, 20));
        assert_eq!(fwd.to_string(), "udp:127.0.0.1:16-10.0.2.20:8");
        // Empty protocol is tcp; empty host port is 0 (strtol of ""), as in QEMU.
        let fwd = HostForward::parse(":127.0.0.1:-:22").unwrap();
        assert!(!fwd.udp);
        assert_eq!(fwd.host_port, 0);

        for (rule, reason) in [
            ("tcp", "No : separators"),
            ("sctp::1-:2", "Bad protocol name"),
            ("tcp:1", "Missing : separator"),
            ("tcp:host:1-:2", "Bad host address"),
            ("tcp:1.2.3.256:1-:2", "Bad host address"),
            ("tcp::1", "Bad host port separator"),
            ("tcp::x-:2", "Bad host port"),
            ("tcp::65536-:2", "Bad host port"),
            ("tcp::1-2", "Missing guest address"),
            ("tcp::1-guest:2", "Bad guest address"),
            ("tcp::1-:0", "Bad guest port"),
            ("tcp::1-:", "Bad guest port"),
            ("tcp::1-:22x", "Bad guest port"),
        ] {
            let err = HostForward::parse(rule).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("Invalid host forwarding rule '{rule}' ({reason})")
            );
        }
    }

    #[test]
    fn inet_aton_matches_glibc() {
        let ok = [
            ("10.0.2.15", [10, 0, 2, 15]),
            ("127.1", [127, 0, 0, 1]),
            ("10.0.513", [10, 0, 2, 1]),
            ("0x7f.0.0.01", [127, 0, 0, 1]),
            ("167772687", [10, 0, 2, 15]),
            ("1.2.3.4 trailing", [1, 2, 3, 4]),
        ];
        for (s, want) in ok {
            assert_eq!(inet_aton(s), Some(Ipv4Addr::from(want)), "{s}");
        }
        for s in [
            "",
            "1.",
            ".1",
            "1..2",
            "08.1.1.1",
            "1.2.3.4.5",
            "256.1",
            "1.2.3.4x",
            " 1.2.3.4",
        ] {
            assert_eq!(inet_aton(s), None, "{s}");
        }
    }

    #[test]
    fn from_options_follows_qemu() {
        let c = UserConfig::from_options([]).unwrap();
        assert_eq!(c, UserConfig::default());

        let c = UserConfig::from_options([
            ("id", "n0"),
            ("net", "192.168.76.0/255.255.255.0"),
            ("restrict", "on"),
            ("hostname", "guest"),
            ("hostfwd", "tcp::2222-:22"),
            ("hostfwd", "udp::5353-:53"),
        ])
        .unwrap();
        assert_eq!((c.net, c.prefix_len), (Ipv4Addr::new(192, 168, 76, 0), 24));
        assert_eq!(c.host, Ipv4Addr::new(192, 168, 76, 2));
        assert_eq!(c.dhcp_start, Ipv4Addr::new(192, 168, 76, 15));
        assert_eq!(c.dns, Ipv4Addr::new(192, 168, 76, 3));
        assert!(c.restrict);
        assert_eq!(c.hostname.as_deref(), Some("guest"));
        assert_eq!(c.hostfwd.len(), 2);

        let c = UserConfig::from_options([("net", "10.0.2.0/24"), ("dhcpstart", "10.0.2.100")])
            .unwrap();
        assert_eq!((c.net, c.prefix_len), (Ipv4Addr::new(10, 0, 2, 0), 24));
        assert_eq!(c.dhcp_start, Ipv4Addr::new(10, 0, 2, 100));
        // Without a mask QEMU takes the classful one: 10/8 here.
        let c = UserConfig::from_options([("net", "10.0.2.0")]).unwrap();
        assert_eq!((c.net, c.prefix_len), (Ipv4Addr::new(10, 0, 0, 0), 8));
        assert_eq!(c.host, HOST_IP);

        for (opts, message) in [
            (vec![("net", "bogus")], "Failed to parse netmask"),
            (
                vec![("net", "10.0.2.0/33")],
                "Invalid netmask provided (must be in range 4-32)",
            ),
            (
                vec![("net", "10.0.2.0/24x")],
                "Failed to parse netmask (trailing chars)",
            ),
            (vec![("host", "10.0.3.2")], "Host doesn't belong to network"),
            (vec![("host", "x")], "Failed to parse host"),
            (vec![("dns", "10.0.2.2")], "DNS must be different from host"),
            (vec![("dns", "1.1.1.1")], "DNS doesn't belong to network"),
            (
                vec![("dhcpstart", "10.0.2.3")],
                "DNS must be different from host and DNS",
            ),
            (
                vec![("dhcpstart", "10.1.2.3")],
                "DHCP doesn't belong to network",
            ),
            (
                vec![("domainname", "")],
                "'domainname' parameter cannot be empty",
            ),
            (
                vec![("restrict", "maybe")],
                "Parameter 'restrict' expects 'on' or 'off'",
            ),
            (vec![("smb", "/tmp")], "Invalid parameter 'smb'"),
            (
                vec![("hostfwd", "tcp:5555")],
                "Invalid host forwarding rule 'tcp:5555' (Missing : separator)",
            ),
        ] {
            let err = UserConfig::from_options(opts).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
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
}
