//! The four kinds of device process, each as the smallest machine that has one: what to
//! put on the command line, what QMP command makes the vmm call it, and which virtio
//! function it serves. For tests that treat every kind alike (hostile processes, the
//! sandbox's escape checks).

use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Blk,
    Scsi,
    Net,
    Display,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Blk, Kind::Scsi, Kind::Net, Kind::Display];

    pub fn program(self) -> &'static str {
        match self {
            Kind::Blk => "vmm-blk",
            Kind::Scsi => "vmm-scsi",
            Kind::Net => "vmm-net",
            Kind::Display => "vmm-display",
        }
    }

    /// The name events and `__org.vmm_query-device-processes` give the process: the
    /// device's id (`dev0`), the netdev's for a net process, `display` for the display.
    pub fn process_label(self) -> &'static str {
        match self {
            Kind::Blk | Kind::Scsi => "dev0",
            Kind::Net => "n0",
            Kind::Display => "display",
        }
    }

    /// A QMP command that makes the vmm call the process.
    pub fn control_call(self) -> &'static str {
        match self {
            Kind::Blk => "query-blockstats",
            Kind::Scsi => "query-block",
            Kind::Net => "__org.vmm_query-netdev-stats",
            Kind::Display => "query-vnc",
        }
    }

    /// The virtio device id of the function it serves.
    pub fn virtio_id(self) -> u16 {
        match self {
            Kind::Blk => 2,
            Kind::Scsi => 8,
            Kind::Net => 1,
            Kind::Display => 18,
        }
    }

    /// Arguments for a machine with one such process serving a device with id `dev0`;
    /// files (a disk image, a VNC socket) go in `dir`. The net process gets a UDP socket
    /// on loopback (the vmm makes it; the process keeps no network of its own).
    pub fn args(self, dir: &Path) -> Vec<String> {
        let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match self {
            Kind::Blk => {
                let img = dir.join("disk.raw");
                if let Err(e) = std::fs::write(&img, vec![0u8; 1 << 20]) {
                    panic!("cannot write {}: {e}", img.display());
                }
                let drive = format!("file={},if=none,id=d0,format=raw", img.display());
                strings(&[
                    "-drive",
                    &drive,
                    "-device",
                    "virtio-blk-pci,drive=d0,id=dev0",
                ])
            }
            Kind::Scsi => strings(&["-device", "virtio-scsi-pci,id=dev0"]),
            Kind::Net => {
                let netdev = format!(
                    "socket,id=n0,udp=127.0.0.1:{},localaddr=127.0.0.1:{}",
                    free_udp_port(),
                    free_udp_port()
                );
                strings(&[
                    "-netdev",
                    &netdev,
                    "-device",
                    "virtio-net-pci,netdev=n0,id=dev0",
                ])
            }
            Kind::Display => {
                let vnc = format!("unix:{}", dir.join("vnc.sock").display());
                strings(&["-vnc", &vnc, "-device", "virtio-keyboard-pci,id=dev0"])
            }
        }
    }
}

/// A qtest machine with one process of `kind`, `env` in the vmm's environment, a QMP
/// socket and the files in `dir`: the harness and the connected monitor.
pub fn machine(
    kind: Kind,
    dir: &crate::TempDir,
    env: &[(&str, &str)],
) -> (
    crate::qtest::Qtest,
    crate::qmp::Qmp<std::os::unix::net::UnixStream>,
) {
    let qmp_sock = dir.join("qmp.sock");
    let mut args = vec![
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", qmp_sock.display()),
    ];
    args.extend(kind.args(dir.path()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let qt = crate::qtest::Qtest::start_env("128M", &args, env)
        .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    (qt, crate::qmp::Qmp::connect(&qmp_sock))
}

/// A UDP port on loopback that was free a moment ago.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or(47000)
}
