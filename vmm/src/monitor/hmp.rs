//! A small HMP (human monitor) for QMP's human-monitor-command: the commands that have a
//! QMP counterpart here, with QEMU 7.2's output text (lines end in "\r\n").

use qmp::QmpError;
use serde_json::{json, Value};

use super::command::{Command, CommandContext};
use super::devices::query_pci;
use super::info::{mice, query_version, NULL_UUID};
use super::memory::{dump_physical, dump_virtual, DumpRange};
use super::run_control::query_status;
use crate::accel::AccelKind;
use crate::machine::{Machine, MachineExit};

pub const COMMANDS: &[Command] = &[Command::machine(
    "human-monitor-command",
    human_monitor_command,
)];

/// QMP human-monitor-command: one HMP line, its output as the reply.
fn human_monitor_command(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let line = ctx.str_arg("command-line").unwrap_or("").to_string();
    let cpu = ctx
        .call
        .args
        .get("cpu-index")
        .map(|v| v.as_i64().unwrap_or(-1));
    let (text, exit) = run(ctx.machine, &line, cpu)?;
    ctx.exit = exit;
    Ok(json!(text))
}

/// The commands `help` lists, as QEMU 7.2 prints them (sorted by name).
const HELP: &[(&str, &str)] = &[
    (
        "balloon",
        "balloon target -- request VM to change its memory allocation (in MB)",
    ),
    ("cont", "cont|c  -- resume emulation"),
    ("cpu", "cpu index -- set the default CPU"),
    ("help", "help|? [cmd] -- show the help"),
    (
        "info",
        "info [subcommand] -- show various information about the system state",
    ),
    (
        "memsave",
        "memsave addr size file -- save to disk virtual memory dump starting at 'addr' of size 'size'",
    ),
    (
        "migrate",
        "migrate [-d] [-b] [-i] [-r] uri -- migrate to URI (using -d to not wait for completion)\n\t\t\t -b for migration without shared storage with full copy of disk\n\t\t\t -i for migration without shared storage with incremental copy of disk (base image shared between src and destination)\n\t\t\t -r to resume a paused migration",
    ),
    (
        "migrate_cancel",
        "migrate_cancel  -- cancel the current VM migration",
    ),
    (
        "migrate_incoming",
        "migrate_incoming uri -- Continue an incoming migration from an -incoming defer",
    ),
    (
        "migrate_set_downtime",
        "migrate_set_downtime value -- set maximum tolerated downtime (in seconds) for migrations",
    ),
    (
        "migrate_set_speed",
        "migrate_set_speed value -- set maximum speed (in bytes) for migrations. Defaults to MB if no size suffix is specified, ie. B/K/M/G/T",
    ),
    (
        "netdev_add",
        "netdev_add [user|tap|socket|stream|dgram|vde|bridge|hubport|netmap|vhost-user],id=str[,prop=value][,...] -- add host network device",
    ),
    ("netdev_del", "netdev_del id -- remove host network device"),
    (
        "pmemsave",
        "pmemsave addr size file -- save to disk physical memory dump starting at 'addr' of size 'size'",
    ),
    (
        "expire_password",
        "expire_password protocol time [-d display] -- set spice/vnc password expire-time",
    ),
    (
        "mouse_button",
        "mouse_button state -- change mouse button state (1=L, 2=M, 4=R)",
    ),
    (
        "mouse_move",
        "mouse_move dx dy [dz] -- send mouse move events",
    ),
    ("quit", "quit|q  -- quit the emulator"),
    (
        "screendump",
        "screendump filename [-f format] [device [head]] -- save screen from head 'head' of display device 'device'in specified format 'format' as image 'filename'.Currently only 'png' and 'ppm' formats are supported.",
    ),
    (
        "sendkey",
        "sendkey keys [hold_ms] -- send keys to the VM (e.g. 'sendkey ctrl-alt-f1', default hold time=100 ms)",
    ),
    (
        "set_link",
        "set_link name on|off -- change the link status of a network adapter",
    ),
    (
        "set_password",
        "set_password protocol password [-d display] [action-if-connected] -- set spice/vnc password",
    ),
    ("stop", "stop|s  -- stop emulation"),
    ("system_powerdown", "system_powerdown  -- send system power down event"),
    ("system_reset", "system_reset  -- reset the system"),
];

/// The `info` subcommands, with their help lines.
const INFO_HELP: &[(&str, &str)] = &[
    ("balloon", "info balloon  -- show balloon information"),
    ("chardev", "info chardev  -- show the character devices"),
    ("block", "info block  -- show the block devices"),
    ("cpus", "info cpus  -- show infos for each CPU"),
    ("kvm", "info kvm  -- show KVM information"),
    ("mice", "info mice  -- show which guest mouse is receiving events"),
    ("migrate", "info migrate  -- show migration status"),
    ("name", "info name  -- show the current VM name"),
    ("network", "info network  -- show the network state"),
    ("pci", "info pci  -- show PCI info"),
    (
        "qtree-lite",
        "info qtree-lite  -- show the device tree: buses, devices, their ports, memory and interrupts",
    ),
    (
        "registers",
        "info registers [-a|vcpu] -- show the cpu registers (-a: show register info for all cpus; vcpu: specific vCPU to query; show the current CPU's registers if no argument is specified)",
    ),
    ("status", "info status  -- show the current VM status (running|paused)"),
    ("uuid", "info uuid  -- show the current VM UUID"),
    ("vnc", "info vnc  -- show the vnc server status"),
    ("version", "info version  -- show the version of QEMU"),
];

/// Runs one HMP command line. `cpu` is human-monitor-command's cpu-index (the current
/// CPU for this command only). Returns the text and how the machine must exit, if it must.
pub fn run(
    machine: &mut Machine,
    line: &str,
    cpu: Option<i64>,
) -> Result<(String, Option<MachineExit>), QmpError> {
    let current = match cpu {
        Some(index) => match usize::try_from(index) {
            Ok(i) if i < machine.cpus().num_vcpus() => i,
            _ => {
                return Err(QmpError::generic(
                    "Parameter 'cpu-index' expects a CPU number",
                ))
            }
        },
        None => machine.current_cpu() as usize,
    };
    let mut exit = None;
    let text = execute(machine, line, current, &mut exit);
    Ok((text.replace('\n', "\r\n"), exit))
}

fn execute(
    machine: &mut Machine,
    line: &str,
    current: usize,
    exit: &mut Option<MachineExit>,
) -> String {
    let words = match split_words(line) {
        Ok(words) => words,
        Err(e) => return e,
    };
    let Some((name, args)) = words.split_first() else {
        return String::new();
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match name.as_str() {
        "info" => info(machine, &args, current),
        "help" | "?" => help(args.first().copied()),
        "stop" | "s" => {
            machine.stop();
            String::new()
        }
        "quit" | "q" => {
            machine.emit_shutdown(false, "host-qmp-quit");
            *exit = Some(MachineExit::Shutdown);
            String::new()
        }
        "cont" | "c" => error_text(machine.cont()),
        "netdev_add" => super::net::hmp_netdev_add(machine, &args),
        "netdev_del" => super::net::hmp_netdev_del(machine, &args),
        "set_link" => super::net::hmp_set_link(machine, &args),
        "screendump" => super::display::hmp_screendump(machine, &args),
        "balloon" => super::balloon::hmp_balloon(machine, &args),
        "migrate" => super::migration::hmp_migrate(machine, &args),
        "migrate_cancel" => {
            machine.migration().request_cancel();
            String::new()
        }
        "migrate_incoming" => match args.first() {
            Some(uri) => match machine.migrate_incoming(uri) {
                Ok(()) => String::new(),
                Err(e) => format!("Error: {e}\n"),
            },
            None => format!(
                "migrate_incoming: string expected\n{}",
                usage_hint("migrate_incoming")
            ),
        },
        "migrate_set_speed" => super::migration::hmp_migrate_set_speed(machine, &args),
        "migrate_set_downtime" => super::migration::hmp_migrate_set_downtime(machine, &args),
        "change" if args.first() == Some(&"vnc") => {
            super::display::hmp_change_vnc(machine, &args[1..])
        }
        "set_password" => super::display::hmp_set_password(machine, &args),
        "expire_password" => super::display::hmp_expire_password(machine, &args),
        "sendkey" => super::display::hmp_sendkey(machine, &args),
        "mouse_move" => super::display::hmp_mouse_move(machine, &args),
        "mouse_button" => super::display::hmp_mouse_button(machine, &args),
        // `drive_add ADDR OPTIONS`: a drive backend for device_add (QEMU 1.1's way; the
        // address is ignored for if=none, as QEMU does).
        "drive_add" => match args.as_slice() {
            [_, opts] => drive_add(machine, opts),
            _ => "drive_add: usage: drive_add [[<domain>:]<bus>:]<slot> [file=file][,if=type][,...]\n".to_string(),
        },
        "system_reset" => match machine.host_reset() {
            Ok(outcome) => {
                *exit = outcome;
                String::new()
            }
            Err(e) => format!("Error: {e}\n"),
        },
        "system_powerdown" => {
            machine.emit("POWERDOWN", None);
            machine.power_button();
            String::new()
        }
        // QEMU's HMP passthrough runs each line in a fresh monitor, so `cpu` only checks.
        "cpu" => match integer_arg("cpu", args.first().copied()) {
            Err(e) => e,
            Ok(index) if usize::try_from(index).is_ok_and(|i| i < machine.cpus().num_vcpus()) => {
                String::new()
            }
            Ok(_) => "invalid CPU index\n".to_string(),
        },
        "memsave" | "pmemsave" => match dump_range(name, &args) {
            Err(e) => e,
            Ok(range) if name == "memsave" => {
                error_text(dump_virtual(machine, current as i64, &range))
            }
            Ok(range) => error_text(dump_physical(machine, &range)),
        },
        other => format!("unknown command: '{other}'\n"),
    }
}

/// What [`run`] says of `line` before it touches a machine: the error text of a line whose
/// quotes do not close, or of a command whose arguments do not parse, in QEMU's words;
/// None when it parses. The checks are the ones the commands themselves make, so this is
/// all of the parsing a monitor client's text reaches, without the side effects of
/// running it (the fuzz target `hmp_line` drives it).
pub fn check(line: &str) -> Option<String> {
    let words = match split_words(line) {
        Ok(words) => words,
        Err(e) => return Some(e),
    };
    let (name, args) = words.split_first()?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    check_arguments(name, &args).err()
}

/// The argument parsing of command `name`, as [`execute`] does it.
fn check_arguments(name: &str, args: &[&str]) -> Result<(), String> {
    use super::{balloon, display, migration};
    match (name, args) {
        ("help" | "?", _) => {
            help(args.first().copied());
        }
        ("info", ["registers", which, ..]) if *which != "-a" => {
            integer_arg("info", Some(which))?;
        }
        ("netdev_add", _) => {
            crate::netdev::parse(&args.join(" ")).map_err(|e| format!("Error: {e}\n"))?;
        }
        ("screendump", _) => {
            display::screendump_args(args)?;
        }
        ("balloon", _) => {
            balloon::balloon_mib(args)?;
        }
        ("migrate_set_speed", _) => {
            migration::speed_bytes(args)?;
        }
        ("sendkey", _) => {
            display::sendkey_scancodes(args)?;
        }
        ("mouse_move", _) => {
            display::mouse_move_args(args)?;
        }
        ("mouse_button", _) => {
            display::mouse_button_state(args)?;
        }
        ("drive_add", [_, opts]) => {
            crate::drive::parse_drive(opts, 0).map_err(|e| format!("{e}\n"))?;
        }
        ("cpu", _) => {
            integer_arg("cpu", args.first().copied())?;
        }
        ("memsave" | "pmemsave", _) => {
            dump_range(name, args)?;
        }
        _ => {}
    }
    Ok(())
}

/// QEMU's text for a failed command: "Error: DESC".
fn error_text(result: Result<(), QmpError>) -> String {
    match result {
        Ok(()) => String::new(),
        Err(e) => format!("Error: {}\n", e.desc),
    }
}

pub(super) fn usage_hint(command: &str) -> String {
    format!("Try \"help {command}\" for more information\n")
}

/// Words separated by blanks; double quotes group a word (with \" and \\ escapes).
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return Ok(words);
        };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("unterminated string\n".to_string()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => word.push(c),
                        None => return Err("unterminated string\n".to_string()),
                    },
                    Some(c) => word.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        words.push(word);
    }
}

/// An integer argument: decimal, or hex with 0x; errors in QEMU's words.
fn integer_arg(command: &str, arg: Option<&str>) -> Result<i64, String> {
    let Some(text) = arg else {
        return Err(format!(
            "unexpected end of expression\n{}",
            usage_hint(command)
        ));
    };
    let (digits, radix) = match text.strip_prefix("0x").or(text.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if let Some(bad) = digits.chars().find(|c| !c.is_digit(radix)) {
        return Err(format!(
            "invalid char '{bad}' in expression\n{}",
            usage_hint(command)
        ));
    }
    // An address may use all 64 bits.
    u64::from_str_radix(digits, radix)
        .map(|v| v as i64)
        .map_err(|_| format!("number too large\n{}", usage_hint(command)))
}

fn dump_range<'a>(command: &str, args: &[&'a str]) -> Result<DumpRange<'a>, String> {
    let addr = integer_arg(command, args.first().copied())? as u64;
    let size = integer_arg(command, args.get(1).copied())?;
    let filename = args
        .get(2)
        .ok_or_else(|| format!("{command}: string expected\n{}", usage_hint(command)))?;
    Ok(DumpRange {
        addr,
        size,
        filename,
    })
}

fn help(command: Option<&str>) -> String {
    let lines: Vec<&str> = match command {
        None => HELP.iter().map(|(_, line)| *line).collect(),
        Some("info") => INFO_HELP.iter().map(|(_, line)| *line).collect(),
        Some(name) => {
            let name = match name {
                "c" => "cont",
                "s" => "stop",
                "?" => "help",
                other => other,
            };
            match HELP.iter().find(|(n, _)| *n == name) {
                Some((_, line)) => vec![*line],
                None => return format!("unknown command: '{name}'\n"),
            }
        }
    };
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn info(machine: &Machine, args: &[&str], current: usize) -> String {
    let Some(&what) = args.first() else {
        return help(Some("info"));
    };
    match what {
        "status" => {
            let status = query_status(machine);
            let running = status["running"] == true;
            let mut text = format!("VM status: {}", if running { "running" } else { "paused" });
            if !running && status["status"] != "paused" {
                text += &format!(" ({})", status["status"].as_str().unwrap_or(""));
            }
            text + "\n"
        }
        "version" => {
            // QEMU prints the version and the package with nothing between them.
            let v = query_version();
            format!(
                "{}.{}.{}{}\n",
                v["qemu"]["major"],
                v["qemu"]["minor"],
                v["qemu"]["micro"],
                v["package"].as_str().unwrap_or("")
            )
        }
        "kvm" => {
            let enabled = machine.accel_kind() == AccelKind::Kvm;
            let state = if enabled { "enabled" } else { "disabled" };
            format!("kvm support: {state}\n")
        }
        "vnc" => super::display::hmp_info_vnc(machine),
        "balloon" => super::balloon::hmp_info_balloon(machine),
        "migrate" => super::migration::hmp_info_migrate(machine),
        "mice" => mice(machine)
            .iter()
            .map(|m| {
                let mark = if m.current { '*' } else { ' ' };
                format!("{mark} Mouse #{}: {}\n", m.index, m.name)
            })
            .collect(),
        "name" => match &machine.config().name {
            Some(name) => format!("{name}\n"),
            None => String::new(),
        },
        "uuid" => format!(
            "{}\n",
            machine.config().uuid.as_deref().unwrap_or(NULL_UUID)
        ),
        "cpus" => machine
            .cpus()
            .thread_ids()
            .into_iter()
            .map(|(index, thread)| {
                let mark = if index as usize == current { '*' } else { ' ' };
                format!("{mark} CPU #{index}: thread_id={thread}\n")
            })
            .collect(),
        "chardev" => machine
            .chardevs()
            .iter()
            .map(|c| format!("{}: filename={}\n", c.label(), c.filename()))
            .collect(),
        "pci" => info_pci(&query_pci(machine)),
        "network" => super::net::hmp_info_network(machine, args),
        // Block devices arrive with the device-process issue; until then there are none,
        // and QEMU prints nothing for a machine without drives either.
        "block" => String::new(),
        "qtree-lite" => info_qtree_lite(machine),
        "registers" => info_registers(machine, args.get(1).copied(), current),
        other => format!("unknown command: 'info {other}'\n"),
    }
}

/// `info qtree-lite`: QEMU's `info qtree` layout, with each device's resources but not
/// every qdev property.
fn info_qtree_lite(machine: &Machine) -> String {
    use crate::arch::layout;
    let mut out = String::from("bus: main-system-bus\n  type System\n");
    let mut dev = |name: &str, id: &str, lines: &[String]| {
        out += &format!("  dev: {name}, id \"{id}\"\n");
        for line in lines {
            out += &format!("    {line}\n");
        }
    };
    dev(
        "i8042",
        "",
        &[
            format!(
                "ioport {:#06x}, {:#06x}",
                layout::I8042_DATA_PORT,
                layout::I8042_CMD_PORT
            ),
            format!(
                "irq {} (keyboard), {} (mouse)",
                layout::I8042_KBD_GSI,
                layout::I8042_AUX_GSI
            ),
        ],
    );
    for chardev in machine.chardevs() {
        let Some(index) = chardev
            .label()
            .strip_prefix("serial")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let (Some(port), Some(gsi)) = (
            layout::SERIAL_PORTS.get(index),
            layout::SERIAL_GSIS.get(index),
        ) else {
            continue;
        };
        dev(
            "isa-serial",
            chardev.label(),
            &[
                format!("chardev = \"{}\"", chardev.label()),
                format!("ioport {port:#06x}, irq {gsi}"),
            ],
        );
    }
    dev(
        "mc146818rtc",
        "",
        &[format!(
            "ioport {:#06x}, irq {}",
            layout::CMOS_PORT,
            layout::RTC_GSI
        )],
    );
    dev(
        "acpi-ged",
        "",
        &[format!(
            "mmio {:016x}/{:016x}, irq {}",
            layout::GED_START.0,
            layout::GED_SIZE,
            layout::GED_GSI
        )],
    );
    dev(
        "acpi-pm",
        "",
        &[format!(
            "ioport {:#06x}/{:#x}",
            layout::ACPI_PM_PORT,
            layout::ACPI_PM_PORT_LEN
        )],
    );
    if let Some((base, size)) = machine.config().debug_exit {
        dev(
            "isa-debug-exit",
            "",
            &[format!("iobase = {base:#x}, iosize = {size:#x}")],
        );
    }
    dev(
        "pci-host",
        "",
        &[
            format!(
                "ioport {:#06x}, {:#06x}",
                layout::PCI_CONFIG_ADDRESS_PORT,
                layout::PCI_CONFIG_DATA_PORT
            ),
            format!(
                "mmio {:016x}/{:016x} (ECAM)",
                layout::PCI_MMCONFIG_START.0,
                layout::PCI_MMCONFIG_SIZE
            ),
        ],
    );
    out += "    bus: pci.0\n      type PCI\n";
    let buses = query_pci(machine);
    let devices = buses[0]["devices"].as_array().cloned().unwrap_or_default();
    let int = |v: &Value| v.as_i64().unwrap_or(0);
    for d in devices {
        let desc = d["class_info"]["desc"].as_str().unwrap_or("PCI device");
        out += &format!(
            "      dev: {desc}, id \"{}\"\n        addr = {:02x}.{}\n        \
             vendor_id = {:#06x}, device_id = {:#06x}\n",
            d["qdev_id"].as_str().unwrap_or(""),
            int(&d["slot"]),
            int(&d["function"]),
            int(&d["id"]["vendor"]),
            int(&d["id"]["device"]),
        );
        for region in d["regions"].as_array().into_iter().flatten() {
            out += &format!(
                "        bar {}: {} {:#x}/{:#x}\n",
                int(&region["bar"]),
                region["type"].as_str().unwrap_or("memory"),
                int(&region["address"]),
                int(&region["size"])
            );
        }
    }
    out
}

fn info_registers(machine: &Machine, which: Option<&str>, current: usize) -> String {
    let snapshots = machine.cpus().snapshots();
    let chosen: Vec<usize> = match which {
        None => vec![current],
        Some("-a") => (0..snapshots.len()).collect(),
        Some(text) => match integer_arg("info", Some(text)) {
            Ok(i) if usize::try_from(i).is_ok_and(|i| i < snapshots.len()) => vec![i as usize],
            Ok(i) => return format!("CPU#{i} not available\n"),
            Err(e) => return e,
        },
    };
    chosen
        .into_iter()
        .filter_map(|i| snapshots.get(i))
        .map(|s| format!("\n{}\n", s.registers))
        .collect()
}

/// `info pci` from query-pci's answer, laid out as QEMU 7.2 does.
fn info_pci(buses: &Value) -> String {
    let mut out = String::new();
    let devices = buses
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|bus| bus["devices"].as_array().cloned().unwrap_or_default());
    let int = |v: &Value| v.as_i64().unwrap_or(0);
    for dev in devices {
        out += &format!(
            "  Bus {:2}, device {:3}, function {}:\n    ",
            int(&dev["bus"]),
            int(&dev["slot"]),
            int(&dev["function"])
        );
        match dev["class_info"]["desc"].as_str() {
            Some(desc) => out += desc,
            None => out += &format!("Class {:04}", int(&dev["class_info"]["class"])),
        }
        let id = &dev["id"];
        out += &format!(
            ": PCI device {:04x}:{:04x}\n",
            int(&id["vendor"]),
            int(&id["device"])
        );
        if id.get("subsystem").is_some() && id.get("subsystem-vendor").is_some() {
            out += &format!(
                "      PCI subsystem {:04x}:{:04x}\n",
                int(&id["subsystem-vendor"]),
                int(&id["subsystem"])
            );
        }
        if let Some(irq) = dev.get("irq") {
            let pin = (b'A' + (int(&dev["irq_pin"]) as u8).saturating_sub(1)) as char;
            out += &format!("      IRQ {}, pin {pin}\n", int(irq));
        }
        for region in dev["regions"].as_array().into_iter().flatten() {
            let addr = int(&region["address"]) as u64;
            let last = addr
                .wrapping_add(int(&region["size"]) as u64)
                .wrapping_sub(1);
            out += &format!("      BAR{}: ", int(&region["bar"]));
            if region["type"] == "io" {
                out += &format!("I/O at 0x{addr:04x} [0x{last:04x}].\n");
            } else {
                let bits = if region["mem_type_64"] == true {
                    64
                } else {
                    32
                };
                let prefetch = if region["prefetch"] == true {
                    " prefetchable"
                } else {
                    ""
                };
                out += &format!("{bits} bit{prefetch} memory at 0x{addr:08x} [0x{last:08x}].\n");
            }
        }
        out += &format!("      id \"{}\"\n", dev["qdev_id"].as_str().unwrap_or(""));
    }
    out
}

fn drive_add(machine: &mut Machine, opts: &str) -> String {
    let index = machine.devices().drive_count();
    let drive = match crate::drive::parse_drive(opts, index) {
        Ok(d) => d,
        Err(e) => return format!("{e}\n"),
    };
    if drive.interface != crate::drive::DriveInterface::None {
        return "Only if=none is supported for drives added at run time\n".to_string();
    }
    match machine.devices_mut().add_drive(drive) {
        Ok(()) => "OK\n".to_string(),
        Err(e) => format!("{e}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn words_and_quotes() {
        assert_eq!(
            split_words(r#" memsave 0x10  16 "/tmp/a b" "#).unwrap(),
            vec!["memsave", "0x10", "16", "/tmp/a b"]
        );
        assert!(split_words("info \"x").is_err());
        assert!(split_words("").unwrap().is_empty());
    }

    #[test]
    fn integers_and_qemu_errors() {
        assert_eq!(integer_arg("cpu", Some("0x1f")), Ok(31));
        assert_eq!(integer_arg("cpu", Some("12")), Ok(12));
        assert_eq!(
            integer_arg("cpu", Some("x")),
            Err("invalid char 'x' in expression\nTry \"help cpu\" for more information\n".into())
        );
        assert_eq!(
            integer_arg("cpu", None),
            Err("unexpected end of expression\nTry \"help cpu\" for more information\n".into())
        );
        assert_eq!(
            dump_range("memsave", &["0", "16"]).err().unwrap(),
            "memsave: string expected\nTry \"help memsave\" for more information\n"
        );
    }

    #[test]
    fn lines_are_checked_without_a_machine() {
        assert_eq!(check("info status"), None);
        assert_eq!(check(""), None);
        assert_eq!(check("sendkey ctrl-alt-f1 200"), None);
        assert_eq!(check("info \"x"), Some("unterminated string\n".into()));
        assert_eq!(
            check("balloon abc"),
            Some(
                "invalid char 'a' in expression\nTry \"help balloon\" for more information\n"
                    .into()
            )
        );
        assert_eq!(
            check("sendkey frob"),
            Some("invalid parameter: frob\n".into())
        );
        assert_eq!(
            check("mouse_button x"),
            Some("mouse_button: integer expected\n".into())
        );
        assert!(check("migrate_set_speed 5x").is_some());
        assert!(check("screendump").is_some());
        assert!(check("netdev_add user,id=h2,restrict=maybe").is_some());
    }

    #[test]
    fn help_lines() {
        assert_eq!(help(Some("cpu")), "cpu index -- set the default CPU\n");
        assert_eq!(help(Some("c")), "cont|c  -- resume emulation\n");
        assert_eq!(help(Some("foo")), "unknown command: 'foo'\n");
        assert!(help(None).starts_with(
            "balloon target -- request VM to change its memory allocation (in MB)\n\
             cont|c  -- resume emulation\ncpu index"
        ));
        assert!(help(Some("info")).contains("info pci  -- show PCI info\n"));
    }

    #[test]
    fn info_pci_matches_qemu_layout() {
        // QEMU 7.2's query-pci devices of `-machine pc` and its `info pci` text for them.
        let buses = json!([{ "bus": 0, "devices": [
            {"irq_pin": 0, "bus": 0, "qdev_id": "", "slot": 1,
             "class_info": {"class": 257, "desc": "IDE controller"},
             "id": {"device": 28688, "subsystem-vendor": 6900, "vendor": 32902, "subsystem": 4352},
             "function": 1, "regions": [{"bar": 4, "size": 16, "address": -1, "type": "io"}]},
            {"irq_pin": 1, "bus": 0, "qdev_id": "", "irq": 0, "slot": 1,
             "class_info": {"class": 1664, "desc": "Bridge"},
             "id": {"device": 28947, "subsystem-vendor": 6900, "vendor": 32902, "subsystem": 4352},
             "function": 3, "regions": [
                {"bar": 2, "type": "memory", "address": 0xfebf_0000u64, "size": 0x1000,
                 "prefetch": true, "mem_type_64": true}]},
        ]}]);
        assert_eq!(
            info_pci(&buses),
            "  Bus  0, device   1, function 1:\n    IDE controller: PCI device 8086:7010\n      \
             PCI subsystem 1af4:1100\n      BAR4: I/O at 0xffffffffffffffff [0x000e].\n      \
             id \"\"\n  Bus  0, device   1, function 3:\n    Bridge: PCI device 8086:7113\n      \
             PCI subsystem 1af4:1100\n      IRQ 0, pin A\n      \
             BAR2: 64 bit prefetchable memory at 0xfebf0000 [0xfebf0fff].\n      id \"\"\n"
        );
    }
}
