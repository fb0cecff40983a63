//! `-netdev tap`: the vmm opens the tap (`ifname=`, through /dev/net/tun, created if
//! missing, one fd per queue with `queues=`) or takes the fds management opened (`fd=`,
//! `fds=`), checks each is a tap, and runs the up script as QEMU does. The `vmm-net`
//! process gets the fds and sets them up for its data path.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::{FdSource, NetdevError, NetdevOptions, PreparedNetdev};

/// `linux/if_tun.h`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNGETFEATURES: libc::c_ulong = 0x8004_54cf;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// QEMU's default scripts.
const DEFAULT_SCRIPT: &str = "/etc/qemu-ifup";
const DEFAULT_DOWNSCRIPT: &str = "/etc/qemu-ifdown";
/// Most queue pairs a netdev may have.
pub const MAX_QUEUES: u64 = 16;

/// struct ifreq, as far as the tun ioctls use it.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(flags: libc::c_short) -> Self {
        IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        }
    }

    fn name(&self) -> String {
        let len = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..len]).into_owned()
    }
}

/// What TUNGETIFF says of an fd: the interface name and its flags.
pub struct TapInfo {
    pub name: String,
    pub vnet_hdr: bool,
}

/// Check that `fd` is a tap.
pub fn inspect(fd: &OwnedFd) -> Result<TapInfo, NetdevError> {
    let mut req = IfReq::new(0);
    // SAFETY: TUNGETIFF writes a struct ifreq into `req`, which is large enough.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, &mut req) } < 0 {
        return Err(NetdevError::Other(format!(
            "Unable to query TUNGETIFF on FD {}: {}",
            fd.as_raw_fd(),
            strerror(io::Error::last_os_error())
        )));
    }
    if req.flags & IFF_TAP == 0 {
        return Err(NetdevError::Other(format!(
            "FD {} is a tun, not a tap",
            fd.as_raw_fd()
        )));
    }
    Ok(TapInfo {
        name: req.name(),
        vnet_hdr: req.flags & IFF_VNET_HDR != 0,
    })
}

/// The error text alone, as C's strerror gives it.
fn strerror(e: io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// Open tap `name` (created if missing) as one queue of `queues`.
fn open(name: &str, vnet_hdr: bool, queues: u64) -> Result<OwnedFd, NetdevError> {
    let fail = |e: io::Error| {
        NetdevError::Other(format!(
            "could not configure /dev/net/tun ({name}): {}",
            strerror(e)
        ))
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| NetdevError::Other(format!("could not open /dev/net/tun: {}", strerror(e))))?;
    let mut req = IfReq::new(IFF_TAP | IFF_NO_PI);
    if vnet_hdr {
        req.flags |= IFF_VNET_HDR;
    }
    if queues > 1 {
        req.flags |= IFF_MULTI_QUEUE;
    }
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(fail(io::Error::from_raw_os_error(libc::EINVAL)));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads (and updates) the struct ifreq we pass.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    Ok(OwnedFd::from(file))
}

/// Whether this host's taps take the virtio-net header.
fn host_has_vnet_hdr() -> bool {
    let Ok(file) = std::fs::File::open("/dev/net/tun") else {
        return false;
    };
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes an unsigned int.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNGETFEATURES, &mut features) };
    r >= 0 && features & IFF_VNET_HDR as libc::c_uint != 0
}

/// Run a tap script (`script=`, `downscript=`) with the interface name, as QEMU does.
pub fn run_script(script: &str, ifname: &str) -> Result<(), NetdevError> {
    let status = std::process::Command::new(script)
        .arg(ifname)
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| {
            NetdevError::Other(format!(
                "could not launch network script {script}: {}",
                strerror(e)
            ))
        })?;
    if status.success() {
        return Ok(());
    }
    // QEMU prints the raw wait status.
    let raw = std::os::unix::process::ExitStatusExt::into_raw(status);
    Err(NetdevError::Other(format!(
        "network script {script} failed with status {raw}"
    )))
}

/// A script option: `no` (or empty) for none, else the path (the default if not given).
fn script(opts: &NetdevOptions, key: &str, default: &str) -> Option<String> {
    match opts.get(key) {
        Some("no") | Some("") => None,
        Some(path) => Some(path.to_string()),
        None => Some(default.to_string()),
    }
}

/// The fds and the description of a tap netdev.
pub fn prepare(
    opts: &NetdevOptions,
    fds: &mut dyn FdSource,
) -> Result<PreparedNetdev, NetdevError> {
    let conflicting = [
        "ifname",
        "script",
        "downscript",
        "vnet_hdr",
        "helper",
        "queues",
    ];
    if opts.has("helper") || opts.has("br") {
        return Err(NetdevError::Other(
            "the bridge helper is not supported: open the tap and pass it with fd=".into(),
        ));
    }
    if opts.has("fd") {
        if conflicting.iter().any(|k| opts.has(k)) || opts.has("fds") || opts.has("vhostfds") {
            return Err(NetdevError::Other(
                "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and \
                 vhostfds= are invalid with fd="
                    .into(),
            ));
        }
        return from_fds(&[opts.get("fd").unwrap_or_default()], fds);
    }
    if let Some(list) = opts.get("fds") {
        if conflicting.iter().any(|k| opts.has(k)) || opts.has("vhostfd") {
            return Err(NetdevError::Other(
                "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, and vhostfd= \
                 are invalid with fds="
                    .into(),
            ));
        }
        let names: Vec<&str> = list.split(':').collect();
        return from_fds(&names, fds);
    }
    let queues = opts.number("queues")?.unwrap_or(1);
    if queues == 0 || queues > MAX_QUEUES {
        return Err(NetdevError::Other(format!(
            "queues={queues}: a tap has 1 to {MAX_QUEUES} queues"
        )));
    }
    let vnet_hdr = match opts.flag("vnet_hdr") {
        Some(true) if !host_has_vnet_hdr() => {
            return Err(NetdevError::Other(
                "vnet_hdr=1 requested, but no kernel support for IFF_VNET_HDR available".into(),
            ))
        }
        Some(v) => v,
        None => host_has_vnet_hdr(),
    };
    // Without a name the kernel picks one (tapN); the first queue tells which.
    let mut name = opts.get("ifname").unwrap_or("").to_string();
    let mut taps = Vec::with_capacity(queues as usize);
    for _ in 0..queues {
        let fd = open(&name, vnet_hdr, queues)?;
        if name.is_empty() {
            name = inspect(&fd)?.name;
        }
        taps.push(fd);
    }
    let up = script(opts, "script", DEFAULT_SCRIPT);
    if let Some(up) = &up {
        run_script(up, &name)?;
    }
    let down = script(opts, "downscript", DEFAULT_DOWNSCRIPT);
    let info = format!(
        "ifname={name},script={},downscript={}",
        up.as_deref().unwrap_or("no"),
        down.as_deref().unwrap_or("no")
    );
    Ok(PreparedNetdev {
        backend: ipc::net::Backend::Tap { vnet_hdr },
        fds: taps,
        queue_pairs: queues as u16,
        info,
        downscript: down.map(|d| (d, name)),
    })
}

/// Taps management opened and passed in.
fn from_fds(names: &[&str], fds: &mut dyn FdSource) -> Result<PreparedNetdev, NetdevError> {
    if names.is_empty() || names.len() as u64 > MAX_QUEUES {
        return Err(NetdevError::Other(format!(
            "fds=: a tap has 1 to {MAX_QUEUES} queues"
        )));
    }
    let mut taps = Vec::with_capacity(names.len());
    let mut vnet = Vec::with_capacity(names.len());
    for name in names {
        let fd = fds.take(name)?;
        vnet.push(inspect(&fd)?.vnet_hdr);
        taps.push(fd);
    }
    let info = format!("fd={}", taps[0].as_raw_fd());
    Ok(PreparedNetdev {
        backend: ipc::net::Backend::Tap {
            vnet_hdr: vnet.iter().all(|v| *v),
        },
        queue_pairs: taps.len() as u16,
        fds: taps,
        info,
        downscript: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoFds;
    impl FdSource for NoFds {
        fn take(&mut self, name: &str) -> Result<OwnedFd, NetdevError> {
            if name == "file" {
                return Ok(OwnedFd::from(
                    std::fs::File::open("/proc/self/status").unwrap(),
                ));
            }
            Err(NetdevError::Other(format!(
                "File descriptor named '{name}' has not been found"
            )))
        }
    }

    #[test]
    fn fd_and_its_conflicts() {
        let opts = super::super::parse("tap,id=t,fd=x,ifname=tap0").unwrap();
        let e = prepare(&opts, &mut NoFds).err().unwrap();
        assert!(e.to_string().starts_with("ifname=, script="), "{e}");
        let opts = super::super::parse("tap,id=t,fd=nosuch").unwrap();
        assert_eq!(
            prepare(&opts, &mut NoFds).err().unwrap().to_string(),
            "File descriptor named 'nosuch' has not been found"
        );
        let opts = super::super::parse("tap,id=t,fd=file").unwrap();
        let e = prepare(&opts, &mut NoFds).err().unwrap().to_string();
        assert!(
            e.starts_with("Unable to query TUNGETIFF on FD ")
                && e.ends_with(": Inappropriate ioctl for device"),
            "{e}"
        );
    }
}
