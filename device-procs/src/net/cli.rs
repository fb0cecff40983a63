//! `vmm-net`'s command line: nothing (or `--host-network`) when the vmm starts it, or a
//! standalone vhost-user-net daemon over taps.

use std::path::PathBuf;

pub const USAGE: &str = "\
usage: vmm-net --socket PATH (--tap NAME | --tap-fd N)... [--queue-size N] [--no-vnet-hdr]
       vmm-net [--host-network]

Standalone: serve a vhost-user-net device on the unix socket PATH (for QEMU's
`-chardev socket,path=PATH -netdev vhost-user,chardev=...`), its frames on the tap NAME
(opened, and created if missing, with IFF_VNET_HDR; several --tap or --tap-fd give a
multiqueue device, one tap queue per queue pair) or on the inherited tap fd N.
--queue-size is the largest ring the frontend may set up (1024, QEMU's largest
rx_queue_size and tx_queue_size). --no-vnet-hdr opens taps without the virtio-net
header (no offloads).

Without --socket the program is the vmm's network device process: it takes its sockets
at fds 3 and 4 and its netdev over the control socket. --host-network keeps the host's
network namespace (for `-netdev user`). VMM_LOG sets the log filter (tracing EnvFilter
syntax; default warn).";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("{0} needs a value (see --help)")]
    MissingValue(String),
    #[error("{option}: '{value}' is not a number")]
    BadNumber { option: String, value: String },
    #[error("unexpected argument '{0}' (see --help)")]
    Unexpected(String),
    #[error("--socket needs at least one --tap or --tap-fd")]
    NoTap,
    #[error("--tap and --tap-fd need --socket (standalone mode)")]
    NoSocket,
}

/// A tap to serve: by name (opened here) or an inherited fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    Name(String),
    Fd(i32),
}

/// Standalone mode's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standalone {
    pub socket: PathBuf,
    pub taps: Vec<TapSource>,
    pub queue_size: u16,
    pub vnet_hdr: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Help,
    Supervised { host_network: bool },
    Standalone(Standalone),
}

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Mode, CliError> {
    let mut args = args.into_iter();
    let mut socket = None;
    let mut taps = Vec::new();
    let mut queue_size = 1024u16;
    let mut vnet_hdr = true;
    let mut host_network = false;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| CliError::MissingValue(name.to_string()))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(Mode::Help),
            "--socket" => socket = Some(PathBuf::from(value("--socket")?)),
            "--tap" => taps.push(TapSource::Name(value("--tap")?)),
            "--tap-fd" => {
                let v = value("--tap-fd")?;
                let fd = v.parse().map_err(|_| CliError::BadNumber {
                    option: arg.clone(),
                    value: v.clone(),
                })?;
                taps.push(TapSource::Fd(fd));
            }
            "--queue-size" => {
                let v = value("--queue-size")?;
                queue_size = v.parse().map_err(|_| CliError::BadNumber {
                    option: arg.clone(),
                    value: v.clone(),
                })?;
            }
            "--no-vnet-hdr" => vnet_hdr = false,
            "--host-network" => host_network = true,
            _ => return Err(CliError::Unexpected(arg)),
        }
    }
    match socket {
        Some(_) if taps.is_empty() => Err(CliError::NoTap),
        Some(socket) => Ok(Mode::Standalone(Standalone {
            socket,
            taps,
            queue_size,
            vnet_hdr,
        })),
        None if !taps.is_empty() => Err(CliError::NoSocket),
        None => Ok(Mode::Supervised { host_network }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Mode, CliError> {
        parse(s.split_whitespace().map(str::to_string))
    }

    #[test]
    fn modes_and_errors() {
        assert_eq!(
            parse_str("").unwrap(),
            Mode::Supervised {
                host_network: false
            }
        );
        assert_eq!(
            parse_str("--host-network").unwrap(),
            Mode::Supervised { host_network: true }
        );
        let Mode::Standalone(s) = parse_str("--socket /tmp/s --tap t0 --tap-fd 5").unwrap() else {
            panic!("standalone");
        };
        assert_eq!(s.taps, vec![TapSource::Name("t0".into()), TapSource::Fd(5)]);
        assert_eq!(parse_str("--socket /tmp/s"), Err(CliError::NoTap));
        assert_eq!(parse_str("--tap t0"), Err(CliError::NoSocket));
        assert!(matches!(
            parse_str("--tap-fd x"),
            Err(CliError::BadNumber { .. })
        ));
        assert_eq!(
            parse_str("--bogus"),
            Err(CliError::Unexpected("--bogus".into()))
        );
        assert_eq!(
            parse_str("--socket"),
            Err(CliError::MissingValue("--socket".into()))
        );
    }
}
