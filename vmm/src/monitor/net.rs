//! Network: netdev_add, netdev_del, set_link and query-rx-filter over QMP, and HMP's
//! netdev_add, netdev_del, set_link and `info network`, with QEMU 7.2's replies and words.

use std::os::fd::OwnedFd;

use qmp::schema::{ArgType, CommandSpec, ParamSpec};
use qmp::QmpError;
use serde_json::{json, Map, Value};

use super::command::{Command, CommandContext};
use crate::device_manager::DeviceError;
use crate::machine::Machine;
use crate::netdev::{self, FdSource, InheritedFds, NetdevError};

pub const COMMANDS: &[Command] = &[
    Command::machine("netdev_add", netdev_add).with_fd_names(fd_names),
    Command::machine("netdev_del", netdev_del),
    Command::machine("set_link", set_link),
    // QEMU 7.2's, which the seed predates.
    Command::machine("query-rx-filter", query_rx_filter).with_spec(|| {
        CommandSpec::new(
            "query-rx-filter",
            vec![ParamSpec::optional("name", ArgType::String)],
        )
    }),
    Command::machine(QUERY_NETDEV_STATS, |ctx| {
        Ok(Value::Array(ctx.machine.devices().netdev_stats()))
    })
    .with_spec(|| CommandSpec::no_args(QUERY_NETDEV_STATS)),
];

/// Each netdev's frame and byte counts, and the frames vmm-net dropped (too large for the
/// guest's buffers, refused by its RX filter, link down, malformed chains). Frames a tap
/// drops while the guest posts no buffers are the host's to count (`ip -s link`).
pub const QUERY_NETDEV_STATS: &str = "__org.vmm_query-netdev-stats";

/// The getfd names a netdev_add refers to: a tap's `fd=` or `fds=`, a socket's `fd=`, a
/// stream's or dgram's address of type fd. None when `fd=` comes with options it excludes
/// (QEMU refuses those before it looks the fd up, and leaves it with the connection).
fn fd_names(args: &Map<String, Value>) -> Vec<String> {
    let text = |key: &str| args.get(key).and_then(Value::as_str);
    let excluded = [
        "ifname",
        "script",
        "downscript",
        "vnet_hdr",
        "helper",
        "queues",
    ];
    if text("fd").is_some() && excluded.iter().any(|k| args.contains_key(*k)) {
        return Vec::new();
    }
    let mut names: Vec<String> = text("fd").into_iter().map(str::to_string).collect();
    if let Some(fds) = text("fds") {
        names.extend(fds.split(':').map(str::to_string));
    }
    for key in ["addr", "local"] {
        if let Some(addr) = args.get(key) {
            if addr.get("type").and_then(Value::as_str) == Some("fd") {
                names.extend(addr.get("str").and_then(Value::as_str).map(str::to_string));
            }
        }
    }
    names
}

/// The descriptors a QMP call brought, by name.
struct CallFds(Vec<(String, OwnedFd)>);

impl FdSource for CallFds {
    fn take(&mut self, name: &str) -> Result<OwnedFd, NetdevError> {
        match self.0.iter().position(|(n, _)| n == name) {
            Some(i) => Ok(self.0.remove(i).1),
            None => Err(NetdevError::Other(format!(
                "File descriptor named '{name}' has not been found"
            ))),
        }
    }
}

fn error(e: DeviceError) -> QmpError {
    match e {
        DeviceError::NotFound(name) => QmpError::device_not_found(&name),
        other => QmpError::generic(other.to_string()),
    }
}

fn netdev_add(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let opts = netdev::from_qmp(&ctx.call.args).map_err(|e| QmpError::generic(e.to_string()))?;
    let mut fds = CallFds(std::mem::take(&mut ctx.call.fds));
    ctx.machine
        .devices_mut()
        .add_netdev(&opts, &mut fds)
        .map(|()| json!({}))
        .map_err(error)
}

fn netdev_del(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let id = ctx.call.str_arg("id").unwrap_or("").to_string();
    ctx.machine
        .devices_mut()
        .del_netdev(&id)
        .map(|()| json!({}))
        .map_err(error)
}

fn set_link(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let name = ctx.call.str_arg("name").unwrap_or("").to_string();
    let up = ctx.bool_arg("up", true);
    ctx.machine
        .devices_mut()
        .set_link(&name, up)
        .map(|()| json!({}))
        .map_err(error)
}

fn query_rx_filter(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let name = ctx.call.str_arg("name");
    ctx.machine.devices().query_rx_filter(name).map_err(error)
}

/// HMP usage errors, as QEMU words them.
fn usage(command: &str, message: &str) -> String {
    format!("{message}\nTry \"help {command}\" for more information\n")
}

/// HMP `netdev_add TYPE,id=ID,...`.
pub fn hmp_netdev_add(machine: &mut Machine, args: &[&str]) -> String {
    let text = args.join(" ");
    if text == "help" || text == "?" {
        return "Available netdev backend types:\nsocket\nstream\ndgram\nhubport\ntap\nuser\n\
                l2tpv3\nvde\nbridge\nvhost-user\nvhost-vdpa\n"
            .to_string();
    }
    let opts = match netdev::parse(&text) {
        Ok(opts) => opts,
        // QEMU's option parser reports these on stderr; the monitor only points at help.
        Err(NetdevError::BadId) => {
            crate::report!("Parameter 'id' expects an identifier");
            crate::report!(
                "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."
            );
            return usage("netdev_add", "").trim_start().to_string();
        }
        Err(e) => return format!("Error: {e}\n"),
    };
    if machine.devices().has_netdev(&opts.id) {
        crate::report!("Duplicate ID '{}' for netdev", opts.id);
        return usage("netdev_add", "").trim_start().to_string();
    }
    match machine.devices_mut().add_netdev(&opts, &mut InheritedFds) {
        Ok(()) => String::new(),
        Err(e) => format!("Error: {e}\n"),
    }
}

/// HMP `netdev_del ID`.
pub fn hmp_netdev_del(machine: &mut Machine, args: &[&str]) -> String {
    match args {
        [] => usage("netdev_del", "netdev_del: string expected"),
        [id] => match machine.devices_mut().del_netdev(id) {
            Ok(()) => String::new(),
            Err(e) => format!("Error: {e}\n"),
        },
        _ => usage(
            "netdev_del",
            "netdev_del: extraneous characters at the end of line",
        ),
    }
}

/// HMP `set_link NAME on|off`.
pub fn hmp_set_link(machine: &mut Machine, args: &[&str]) -> String {
    let up = match args {
        [] => return usage("set_link", "set_link: string expected"),
        [_, "on"] => true,
        [_, "off"] => false,
        [_, _, _, ..] => {
            return usage(
                "set_link",
                "set_link: extraneous characters at the end of line",
            )
        }
        _ => return usage("set_link", "Expected 'on' or 'off'"),
    };
    match machine.devices_mut().set_link(args[0], up) {
        Ok(()) => String::new(),
        Err(e) => format!("Error: {e}\n"),
    }
}

/// HMP `info network`.
pub fn hmp_info_network(machine: &Machine, args: &[&str]) -> String {
    if args.len() > 1 {
        return usage(
            "info network",
            "network: extraneous characters at the end of line",
        );
    }
    // The device manager writes QEMU's "\r\n"; HMP adds its own "\r" to each "\n".
    machine.devices().info_network().replace("\r\n", "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fds_a_netdev_names() {
        let args = |v: Value| v.as_object().cloned().unwrap();
        assert_eq!(fd_names(&args(json!({"fd": "a"}))), vec!["a"]);
        assert_eq!(fd_names(&args(json!({"fds": "a:b"}))), vec!["a", "b"]);
        assert!(fd_names(&args(json!({"fd": "a", "ifname": "t"}))).is_empty());
        assert_eq!(
            fd_names(&args(json!({"addr": {"type": "fd", "str": "s"}}))),
            vec!["s"]
        );
    }
}
