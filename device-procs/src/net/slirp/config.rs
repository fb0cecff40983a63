//! `-netdev user`'s options, parsed with QEMU 7.2's rules and words: [`UserConfig`] and
//! its [`HostForward`] rules.

use std::fmt;
use std::net::Ipv4Addr;

use super::{SlirpError, MTU_MAX, MTU_MIN};

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

    pub(super) fn mask(&self) -> Ipv4Addr {
        let bits = u32::from(self.prefix_len.min(32));
        Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
    }

    /// QEMU's consistency checks, in QEMU's order and with its texts.
    pub(super) fn validate(&self) -> Result<(), SlirpError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.host, Ipv4Addr::new(10, 0, 2, 2));

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
}
