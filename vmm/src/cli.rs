//! The QEMU-compatible command line. Options are single-dash long names with a value in the
//! next argument (`-m 512`), and `--name` works too, as in QEMU. Every error names the
//! option and the bad value, and the binary prints it on one line and exits with status 1.

use crate::accel::AccelKind;
use crate::chardev::{self, ChardevSpec};
use crate::config::{KernelConfig, MonitorConfig, MonitorEndpoint, VmConfig};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{option}: {message}")]
pub struct CliError {
    /// The option as the user wrote it, with its value where there was one.
    pub option: String,
    pub message: String,
}

fn err(option: &str, value: Option<&str>, message: impl Into<String>) -> CliError {
    CliError {
        option: match value {
            Some(v) => format!("{option} {v}"),
            None => option.to_string(),
        },
        message: message.into(),
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    Run(Box<VmConfig>),
    Help,
    Version,
}

/// Options that take a value.
const WITH_VALUE: &[&str] = &[
    "m",
    "smp",
    "kernel",
    "initrd",
    "append",
    "accel",
    "name",
    "uuid",
    "serial",
    "display",
    "vnc",
    "incoming",
    "vga",
    "balloon",
    "pidfile",
    "device",
    "drive",
    "netdev",
    "net",
    "nic",
    "add-fd",
    "machine",
    "M",
    "decompress-kernel",
    "d",
    "qmp",
    "chardev",
    "mon",
    "monitor",
    "qtest",
];
/// Options that are flags.
const FLAGS: &[&str] = &[
    "S",
    "no-shutdown",
    "no-reboot",
    "nodefaults",
    "daemonize",
    "enable-kvm",
    "nographic",
    "h",
    "help",
    "version",
];

/// Parse the arguments after the program name.
pub fn parse_args<I, S>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let args: Vec<String> = args.into_iter().map(|s| s.as_ref().to_string()).collect();
    let mut cfg = VmConfig::default();
    let mut serials: Vec<String> = Vec::new();
    let mut nographic = false;
    let mut accel: Vec<AccelKind> = Vec::new();
    let mut kernel: Option<String> = None;
    let mut initrd: Option<String> = None;
    let mut append: Option<String> = None;
    let mut chardevs: Vec<(String, ChardevSpec)> = Vec::new();
    let mut mons: Vec<(String, String, bool)> = Vec::new();
    let mut legacy = crate::netdev::legacy::LegacyNet::default();
    let mut i = 0;
    while i < args.len() {
        let raw = &args[i];
        i += 1;
        let Some(name) = raw.strip_prefix("--").or_else(|| raw.strip_prefix('-')) else {
            return Err(err(
                raw,
                None,
                "unexpected argument: disk images are given with -drive",
            ));
        };
        let opt = format!("-{name}");
        if FLAGS.contains(&name) {
            match name {
                "S" => cfg.start_paused = true,
                "no-shutdown" => cfg.no_shutdown = true,
                "no-reboot" => cfg.no_reboot = true,
                "nodefaults" => cfg.nodefaults = true,
                "daemonize" => cfg.daemonize = true,
                "enable-kvm" => accel.push(AccelKind::Kvm),
                "nographic" => nographic = true,
                "h" | "help" => return Ok(Command::Help),
                "version" => return Ok(Command::Version),
                _ => unreachable_flag(name),
            }
            continue;
        }
        if !WITH_VALUE.contains(&name) {
            return Err(err(&opt, None, "invalid option"));
        }
        let Some(value) = args.get(i) else {
            return Err(err(&opt, None, "requires an argument"));
        };
        i += 1;
        let v = value.as_str();
        match name {
            "m" => cfg.memory_size = parse_memory(v).map_err(|m| err(&opt, Some(v), m))?,
            "smp" => cfg.cpus = parse_smp(v).map_err(|m| err(&opt, Some(v), m))?,
            "kernel" => kernel = Some(non_empty(&opt, v)?),
            "initrd" => initrd = Some(non_empty(&opt, v)?),
            "append" => append = Some(v.to_string()),
            "accel" => accel.extend(parse_accel(v).map_err(|m| err(&opt, Some(v), m))?),
            "machine" | "M" => {
                if let Some(a) = parse_machine(v).map_err(|m| err(&opt, Some(v), m))? {
                    accel.extend(a);
                }
            }
            "name" => {
                let (n, p) = parse_name(v).map_err(|m| err(&opt, Some(v), m))?;
                cfg.name = n;
                cfg.process_name = p;
            }
            "uuid" => {
                if !is_uuid(v) {
                    return Err(err(&opt, Some(v), "not a valid UUID"));
                }
                cfg.uuid = Some(v.to_ascii_lowercase());
            }
            "serial" => {
                if serials.len() == 4 {
                    return Err(err(&opt, Some(v), "at most 4 serial ports are supported"));
                }
                crate::chardev::parse_chardev(v).map_err(|e| err(&opt, Some(v), e.to_string()))?;
                serials.push(v.to_string());
            }
            "display" => {
                let kind = v.split(',').next().unwrap_or("");
                if let Some(vnc) = kind.strip_prefix("vnc=") {
                    let rest = v
                        .split_once(',')
                        .map_or(String::new(), |(_, r)| format!(",{r}"));
                    cfg.vnc = crate::vnc::parse_vnc(&format!("{vnc}{rest}"))
                        .map_err(|m| err(&opt, Some(v), m))?;
                } else if kind != "none" {
                    return Err(err(
                        &opt,
                        Some(v),
                        format!("display '{kind}' is not supported (only 'none' and 'vnc=')"),
                    ));
                }
            }
            "vnc" => cfg.vnc = crate::vnc::parse_vnc(v).map_err(|m| err(&opt, Some(v), m))?,
            "incoming" => {
                if v != "defer" {
                    crate::migration::uri::MigrationUri::parse(v)
                        .map_err(|e| err(&opt, Some(v), e.to_string()))?;
                }
                cfg.incoming = Some(v.to_string());
            }
            // QEMU 1.1's spelling of `-device virtio-balloon-pci`.
            "balloon" => match v.split(',').next().unwrap_or("") {
                "virtio" => {
                    let opts = v
                        .split_once(',')
                        .map_or(String::new(), |(_, o)| format!(",{o}"));
                    cfg.devices.push((
                        format!("{opt} {v}"),
                        crate::device_manager::parse_device(&format!("virtio-balloon-pci{opts}"))
                            .map_err(|e| err(&opt, Some(v), e.to_string()))?,
                    ))
                }
                "none" => {}
                other => {
                    return Err(err(
                        &opt,
                        Some(v),
                        format!("unknown balloon device '{other}' (only 'virtio' and 'none')"),
                    ))
                }
            },
            "vga" => match v {
                // The standard VGA's display interface, without the VGA.
                "std" => cfg.devices.push((
                    format!("{opt} {v}"),
                    crate::device_manager::parse_device("bochs-display")
                        .map_err(|e| err(&opt, Some(v), e.to_string()))?,
                )),
                "none" => {}
                _ => {
                    return Err(err(
                        &opt,
                        Some(v),
                        format!("VGA type '{v}' is not supported (only 'std' and 'none')"),
                    ))
                }
            },
            "pidfile" => cfg.pidfile = Some(non_empty(&opt, v)?),
            "device" => {
                let driver = v.split(',').next().unwrap_or("");
                if driver == "isa-debug-exit" {
                    let opts = v.split_once(',').map(|(_, o)| o).unwrap_or("");
                    let dev = crate::devices::debug_exit::parse_debug_exit_device(opts)
                        .map_err(|e| err(&opt, Some(v), e.to_string()))?;
                    cfg.debug_exit = Some(dev);
                } else {
                    let dev = crate::device_manager::parse_device(v)
                        .map_err(|e| err(&opt, Some(v), e.to_string()))?;
                    cfg.devices.push((format!("{opt} {v}"), dev));
                }
            }
            "add-fd" => {
                let mut fd = None;
                let mut set = None;
                for part in v.split(',') {
                    match part.split_once('=') {
                        Some(("fd", n)) => fd = n.parse::<i32>().ok(),
                        Some(("set", n)) => set = n.parse::<u32>().ok(),
                        Some(("opaque", _)) => {}
                        _ => return Err(err(&opt, Some(v), format!("Invalid parameter '{part}'"))),
                    }
                }
                match (fd, set) {
                    (Some(fd), Some(set)) => cfg.fd_sets.push((fd, set)),
                    (None, _) => {
                        return Err(err(
                            &opt,
                            Some(v),
                            "fd option is required and must be a number",
                        ))
                    }
                    (_, None) => {
                        return Err(err(
                            &opt,
                            Some(v),
                            "set option is required and must be a number",
                        ))
                    }
                }
            }
            "netdev" => {
                let netdev =
                    crate::netdev::parse(v).map_err(|e| err(&opt, Some(v), e.to_string()))?;
                if cfg.netdevs.iter().any(|(_, n)| n.id == netdev.id) {
                    return Err(err(
                        &opt,
                        Some(v),
                        format!("Duplicate ID '{}' for netdev", netdev.id),
                    ));
                }
                cfg.netdevs.push((format!("{opt} {v}"), netdev));
            }
            "net" => legacy.net(v).map_err(|m| err(&opt, Some(v), m))?,
            "nic" => legacy.nic(v).map_err(|m| err(&opt, Some(v), m))?,
            "drive" => {
                let drive = crate::drive::parse_drive(v, cfg.drives.len())
                    .map_err(|e| err(&opt, Some(v), e.to_string()))?;
                cfg.drives.push((format!("{opt} {v}"), drive));
            }
            "d" => {
                for item in v.split(',') {
                    match item {
                        "in_asm" | "exec" => cfg.trace_instructions = true,
                        // Register dumps on faults are always on.
                        "cpu" | "int" | "cpu_reset" | "guest_errors" | "unimp" => {}
                        other => {
                            return Err(err(&opt, Some(v), format!("unknown log item '{other}'")))
                        }
                    }
                }
            }
            "decompress-kernel" => {
                cfg.decompress_kernel = Some(parse_on_off(v).map_err(|m| err(&opt, Some(v), m))?)
            }
            "qmp" => {
                let spec =
                    chardev::parse_chardev(v).map_err(|e| err(&opt, Some(v), e.to_string()))?;
                let endpoint = monitor_endpoint(spec).map_err(|m| err(&opt, Some(v), m))?;
                cfg.monitors.push(MonitorConfig {
                    option: format!("{opt} {v}"),
                    endpoint,
                });
            }
            "chardev" => {
                let (id, spec) = chardev::parse_chardev_option(v)
                    .map_err(|e| err(&opt, Some(v), e.to_string()))?;
                if chardevs.iter().any(|(existing, _)| *existing == id) {
                    return Err(err(&opt, Some(v), format!("duplicate chardev id '{id}'")));
                }
                chardevs.push((id, spec));
            }
            "mon" => {
                let (id, control) = parse_mon(v).map_err(|m| err(&opt, Some(v), m))?;
                mons.push((v.to_string(), id, control));
            }
            "monitor" => {
                let spec =
                    chardev::parse_chardev(v).map_err(|e| err(&opt, Some(v), e.to_string()))?;
                let endpoint = monitor_endpoint(spec).map_err(|m| err(&opt, Some(v), m))?;
                cfg.hmp_monitors.push(MonitorConfig {
                    option: format!("{opt} {v}"),
                    endpoint,
                });
            }
            "qtest" => {
                let endpoint = crate::accel::qtest::parse_endpoint(v)
                    .map_err(|e| err(&opt, Some(v), e.to_string()))?;
                cfg.qtest = Some(endpoint);
            }
            _ => return Err(err(&opt, None, "invalid option")),
        }
    }
    // -qtest implies -accel qtest, and needs it.
    if cfg.qtest.is_some() {
        if accel.is_empty() {
            accel.push(AccelKind::Qtest);
        } else if accel != [AccelKind::Qtest] {
            return Err(err("-qtest", None, "only works with -accel qtest"));
        }
    }

    if cfg.daemonize
        && serials
            .iter()
            .any(|s| s == "stdio" || s.starts_with("stdio,"))
    {
        return Err(err(
            "-serial",
            Some("stdio"),
            "stdio cannot be used with -daemonize",
        ));
    }
    for (value, id, control) in mons {
        let Some((_, spec)) = chardevs.iter().find(|(c, _)| *c == id) else {
            return Err(err(
                "-mon",
                Some(&value),
                format!("chardev '{id}' not found"),
            ));
        };
        let endpoint = monitor_endpoint(spec.clone()).map_err(|m| err("-mon", Some(&value), m))?;
        let monitor = MonitorConfig {
            option: format!("-mon {value}"),
            endpoint,
        };
        if control {
            cfg.monitors.push(monitor);
        } else {
            cfg.hmp_monitors.push(monitor);
        }
    }
    let stdio_monitors = cfg
        .monitors
        .iter()
        .chain(&cfg.hmp_monitors)
        .filter(|m| m.endpoint == MonitorEndpoint::Stdio)
        .count();
    if stdio_monitors > 0 {
        if cfg.daemonize {
            return Err(err(
                "-qmp",
                Some("stdio"),
                "stdio cannot be used with -daemonize",
            ));
        }
        if stdio_monitors > 1
            || nographic
            || serials
                .iter()
                .any(|s| s == "stdio" || s.starts_with("stdio,"))
        {
            return Err(err(
                "-qmp",
                Some("stdio"),
                "cannot use stdio by multiple character devices",
            ));
        }
    }
    if cfg.daemonize && nographic {
        return Err(err("-nographic", None, "cannot be used with -daemonize"));
    }
    if serials.is_empty() && !cfg.nodefaults {
        // QEMU gives the machine a COM1; with no display, -nographic puts it on stdio.
        serials.push(if nographic { "stdio" } else { "null" }.to_string());
    }
    cfg.serials = serials;
    legacy.finish(&mut cfg).map_err(|m| err("-net", None, m))?;
    for (option, device) in &cfg.devices {
        if let Some(id) = device.properties.get("chardev") {
            if !chardevs.iter().any(|(c, _)| c == id) {
                return Err(err(
                    "-device",
                    Some(option.trim_start_matches("-device ")),
                    format!(
                        "Property '{}.chardev' can't find value '{id}'",
                        device.driver
                    ),
                ));
            }
        }
    }
    cfg.chardevs = chardevs;
    if !accel.is_empty() {
        cfg.accel = Some(accel);
    }
    match kernel {
        Some(path) => {
            cfg.kernel = Some(KernelConfig {
                path,
                initrd,
                cmdline: append.unwrap_or_default(),
            })
        }
        None => {
            if initrd.is_some() {
                return Err(err("-initrd", None, "only allowed with -kernel"));
            }
            if append.is_some() {
                return Err(err("-append", None, "only allowed with -kernel"));
            }
        }
    }
    Ok(Command::Run(Box::new(cfg)))
}

/// A monitor's endpoint (QMP or human) from a chardev description: stdio or a listening
/// socket.
fn monitor_endpoint(spec: ChardevSpec) -> Result<MonitorEndpoint, String> {
    match spec {
        ChardevSpec::Stdio { .. } => Ok(MonitorEndpoint::Stdio),
        ChardevSpec::Socket {
            address,
            server: true,
            wait,
            ..
        } => Ok(MonitorEndpoint::Listen { address, wait }),
        ChardevSpec::Socket { server: false, .. } => {
            Err("a monitor socket must listen (add server=on)".into())
        }
        _ => Err("a monitor needs stdio or a unix or tcp socket".into()),
    }
}

/// `-mon chardev=ID[,mode=control|readline][,pretty=on|off]`: returns the chardev id and
/// whether it is a QMP (control) monitor rather than a human (readline) one.
fn parse_mon(v: &str) -> Result<(String, bool), String> {
    let mut id = None;
    let mut mode = "readline";
    for (k, val) in key_values(v) {
        match k {
            "chardev" => id = Some(val.to_string()),
            "mode" => mode = val,
            "pretty" => {
                if parse_on_off(val)? {
                    return Err("pretty=on is not supported".into());
                }
            }
            other => return Err(format!("unknown property '{other}'")),
        }
    }
    let control = match mode {
        "control" => true,
        "readline" => false,
        other => {
            return Err(format!(
                "invalid mode '{other}' (expected control or readline)"
            ))
        }
    };
    let id = id
        .filter(|i| !i.is_empty())
        .ok_or_else(|| "chardev= is required".to_string())?;
    Ok((id, control))
}

fn unreachable_flag(name: &str) {
    tracing::error!("flag -{name} is listed but not handled");
}

fn non_empty(opt: &str, v: &str) -> Result<String, CliError> {
    if v.is_empty() {
        Err(err(opt, None, "an empty path is not valid"))
    } else {
        Ok(v.to_string())
    }
}

fn parse_on_off(v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err("expected 'on' or 'off'".into()),
    }
}

/// Split `a=b,c=d` into pairs; a bare first item is returned under the key `""`.
fn key_values(v: &str) -> Vec<(&str, &str)> {
    v.split(',')
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, item)| match item.split_once('=') {
            Some((k, val)) => (k, val),
            None if i == 0 => ("", item),
            None => (item, "on"),
        })
        .collect()
}

/// A size with an optional k/M/G/T suffix; plain numbers are MiB, as QEMU's `-m` reads them.
pub fn parse_size(v: &str, default_unit: u64) -> Result<u64, String> {
    let v = v.trim();
    let (num, unit) = match v.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((idx, _)) => (&v[..idx], &v[idx..]),
        None => (v, ""),
    };
    let mult: u64 = match unit {
        "" => default_unit,
        "B" | "b" => 1,
        "k" | "K" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        _ => return Err(format!("unknown size suffix '{unit}'")),
    };
    if num.is_empty() {
        return Err("missing number".into());
    }
    let bytes = if let Some((int, frac)) = num.split_once('.') {
        let int: u64 = int
            .parse()
            .map_err(|_| format!("'{num}' is not a number"))?;
        let frac_val: f64 = format!("0.{frac}")
            .parse()
            .map_err(|_| format!("'{num}' is not a number"))?;
        int.checked_mul(mult)
            .and_then(|b| b.checked_add((frac_val * mult as f64) as u64))
    } else {
        let n: u64 = num
            .parse()
            .map_err(|_| format!("'{num}' is not a number"))?;
        n.checked_mul(mult)
    };
    bytes.ok_or_else(|| "size is too large".to_string())
}

fn parse_memory(v: &str) -> Result<u64, String> {
    let mut size = None;
    for (k, val) in key_values(v) {
        match k {
            "" | "size" => size = Some(parse_size(val, 1 << 20)?),
            "slots" | "maxmem" => {
                return Err(format!("'{k}' (memory hot-plug) is not supported"));
            }
            other => return Err(format!("unknown property '{other}'")),
        }
    }
    let size = size.ok_or("missing size")?;
    if size == 0 {
        return Err("RAM size must not be zero".into());
    }
    if size < crate::memory::MIN_RAM_SIZE {
        return Err(format!(
            "RAM size must be at least {} MiB",
            crate::memory::MIN_RAM_SIZE >> 20
        ));
    }
    if size > crate::memory::MAX_RAM_SIZE {
        return Err(format!(
            "RAM size must be at most {} GiB",
            crate::memory::MAX_RAM_SIZE >> 30
        ));
    }
    if !size.is_multiple_of(4096) {
        return Err("RAM size must be a multiple of 4 KiB".into());
    }
    Ok(size)
}

/// Most vCPUs the machine model supports (xAPIC ids in the MADT are 8-bit).
pub const MAX_CPUS: u32 = 255;

fn parse_smp(v: &str) -> Result<u32, String> {
    let mut cpus = None;
    let mut topo = [None::<u32>; 4]; // sockets, dies, cores, threads
    let mut maxcpus = None;
    for (k, val) in key_values(v) {
        let n: u32 = val
            .parse()
            .map_err(|_| format!("'{val}' is not a number"))?;
        match k {
            "" | "cpus" => cpus = Some(n),
            "sockets" => topo[0] = Some(n),
            "dies" => topo[1] = Some(n),
            "cores" => topo[2] = Some(n),
            "threads" => topo[3] = Some(n),
            "maxcpus" => maxcpus = Some(n),
            other => return Err(format!("unknown property '{other}'")),
        }
    }
    if topo.contains(&Some(0)) {
        return Err("topology values must be at least 1".into());
    }
    let product = if topo.iter().any(Option::is_some) {
        Some(
            topo.iter()
                .map(|t| u64::from(t.unwrap_or(1)))
                .product::<u64>(),
        )
    } else {
        None
    };
    let n = match (cpus, product) {
        (Some(c), _) => u64::from(c),
        (None, Some(p)) => p,
        (None, None) => return Err("missing number of CPUs".into()),
    };
    if n == 0 {
        return Err("the number of CPUs must be at least 1".into());
    }
    if let Some(p) = product {
        if p < n {
            return Err(format!("topology ({p} CPUs) is smaller than cpus={n}"));
        }
    }
    if let Some(m) = maxcpus {
        if u64::from(m) != n {
            return Err("CPU hot-plug (maxcpus different from cpus) is not supported".into());
        }
    }
    if n > u64::from(MAX_CPUS) {
        return Err(format!("at most {MAX_CPUS} CPUs are supported"));
    }
    Ok(n as u32)
}

fn parse_accel_name(name: &str) -> Result<AccelKind, String> {
    match name {
        "kvm" => Ok(AccelKind::Kvm),
        "emu" | "tcg" => Ok(AccelKind::Emu),
        "qtest" => Ok(AccelKind::Qtest),
        other => Err(format!(
            "invalid accelerator '{other}' (expected kvm, emu or qtest)"
        )),
    }
}

fn parse_accel(v: &str) -> Result<Vec<AccelKind>, String> {
    let mut parts = v.split(',');
    let names = parts.next().unwrap_or("");
    if let Some(extra) = parts.next() {
        return Err(format!("unknown accelerator property '{extra}'"));
    }
    names.split(':').map(parse_accel_name).collect()
}

fn parse_machine(v: &str) -> Result<Option<Vec<AccelKind>>, String> {
    let mut accel = None;
    for (k, val) in key_values(v) {
        match k {
            "" | "type" => match val {
                "pc" | "q35" | "vmm" => {}
                other => {
                    return Err(format!(
                        "unsupported machine type '{other}' (use pc or q35)"
                    ))
                }
            },
            "accel" => accel = Some(parse_accel(val)?),
            other => return Err(format!("unknown machine property '{other}'")),
        }
    }
    Ok(accel)
}

fn parse_name(v: &str) -> Result<(Option<String>, Option<String>), String> {
    let mut name = None;
    let mut process = None;
    for (k, val) in key_values(v) {
        match k {
            "" | "guest" => name = Some(val.to_string()),
            "process" => process = Some(val.to_string()),
            "debug-threads" => {
                parse_on_off(val)?;
            }
            other => return Err(format!("unknown property '{other}'")),
        }
    }
    Ok((name, process))
}

fn is_uuid(v: &str) -> bool {
    let groups: Vec<&str> = v.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

pub const HELP: &str = "\
usage: vmm [options]

Machine:
  -m SIZE              guest RAM (MiB by default; k/M/G/T suffixes; default 128M)
  -smp N               number of vCPUs (or cpus=N,sockets=,cores=,threads=)
  -accel A[:B]         accelerator: kvm, emu (alias tcg); a list is tried in order.
                       Default: kvm when the CPU shows vmx/svm, else emu.
                       qtest: no CPU; a test drives the machine over -qtest
  -enable-kvm          same as -accel kvm
  -machine pc[,accel=A]
  -name NAME           guest name (guest=NAME,process=PROCNAME)
  -uuid UUID           system UUID
Boot:
  -kernel FILE         bzImage or ELF64 kernel (required but under qtest: there is no
                       firmware)
  -initrd FILE         initial ramdisk
  -append CMDLINE      kernel command line
  -decompress-kernel on|off
                       unpack a bzImage's payload on the host and boot the vmlinux
                       directly (default: on under emu, off under kvm)
Devices:
  -serial DEV          stdio, file:PATH, unix:PATH,server=on,wait=off, pty, null, none
  -device isa-debug-exit[,iobase=N,iosize=N]
  -display none        no display
  -vga std|none        std: a bochs-display
  -vnc [HOST]:N|unix:PATH|none[,password=on]
                       VNC server on TCP port 5900+N or a unix socket (vmm-display)
  -display vnc=...     the same as -vnc ...
  -balloon virtio|none virtio: a virtio-balloon-pci
  -nographic           no display; COM1 on stdio
  -nodefaults          no default devices (no COM1)
Diagnostics:
  -d in_asm            emu: log every executed instruction (target emu::trace)
  -qtest unix:PATH     connect to a test's socket and take qtest commands from it
                       (implies -accel qtest; unix:PATH,server=on,wait=off listens)
Monitor:
  -qmp DEV             QMP monitor: unix:PATH,server=on,wait=off, tcp:HOST:PORT,server=on,
                       wait=off, or stdio; repeatable
  -chardev socket,id=ID,path=PATH|host=H,port=N,server=on,wait=off
  -mon chardev=ID[,mode=control|readline]
                       a monitor on a -chardev: QMP (control) or human (readline)
  -monitor DEV         interactive human monitor (HMP): stdio, unix:PATH,server=on,
                       wait=off or tcp:HOST:PORT,server=on,wait=off
                       QMP monitor on a -chardev
Run control:
  -S                   do not start the vCPUs
  -no-shutdown         stop instead of exiting when the guest powers off
  -no-reboot           exit instead of resetting when the guest reboots
  -daemonize           detach once the machine is running
  -pidfile FILE        write the process id to FILE
  -version, -h
";

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<VmConfig, CliError> {
        match parse_args(args)? {
            Command::Run(c) => Ok(*c),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = run(&[]).unwrap();
        assert_eq!(c.memory_size, 128 << 20);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.serials, vec!["null".to_string()]);
        assert!(c.accel.is_none());
        assert!(c.kernel.is_none());
    }

    #[test]
    fn balloon_option() {
        let c = run(&["-balloon", "virtio,deflate-on-oom=on"]).unwrap();
        let (origin, device) = &c.devices[0];
        assert_eq!(origin, "-balloon virtio,deflate-on-oom=on");
        assert_eq!(device.driver, "virtio-balloon-pci");
        assert_eq!(device.properties["deflate-on-oom"], "on");
        assert!(run(&["-balloon", "none"]).unwrap().devices.is_empty());
        let e = run(&["-balloon", "xen"]).unwrap_err().to_string();
        assert!(e.contains("unknown balloon device 'xen'"), "{e}");
    }

    #[test]
    fn full_command_line() {
        let c = run(&[
            "-m",
            "1G",
            "-smp",
            "2",
            "-kernel",
            "/k",
            "-initrd",
            "/i",
            "-append",
            "console=ttyS0",
            "-accel",
            "kvm:emu",
            "-name",
            "guest=vm1,process=p",
            "-uuid",
            "12345678-9ABC-def0-1234-56789abcdef0",
            "-serial",
            "file:/tmp/out",
            "-serial",
            "unix:/tmp/s,server,nowait",
            "-S",
            "-no-shutdown",
            "--no-reboot",
            "-nodefaults",
            "-display",
            "none",
            "-pidfile",
            "/tmp/pid",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
        ])
        .unwrap();
        assert_eq!(c.memory_size, 1 << 30);
        assert_eq!(c.cpus, 2);
        let k = c.kernel.unwrap();
        assert_eq!(
            (k.path.as_str(), k.initrd.as_deref(), k.cmdline.as_str()),
            ("/k", Some("/i"), "console=ttyS0")
        );
        assert_eq!(c.accel, Some(vec![AccelKind::Kvm, AccelKind::Emu]));
        assert_eq!(c.name.as_deref(), Some("vm1"));
        assert_eq!(c.process_name.as_deref(), Some("p"));
        assert_eq!(
            c.uuid.as_deref(),
            Some("12345678-9abc-def0-1234-56789abcdef0")
        );
        assert_eq!(c.serials.len(), 2);
        assert!(c.start_paused && c.no_shutdown && c.no_reboot && c.nodefaults);
        assert_eq!(c.pidfile.as_deref(), Some("/tmp/pid"));
        assert_eq!(c.debug_exit, Some((0xf4, 4)));
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512").unwrap(), 512 << 20);
        assert_eq!(parse_memory("512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory("2G").unwrap(), 2 << 30);
        assert_eq!(parse_memory("size=1.5G").unwrap(), 3 << 29);
        assert!(parse_memory("0").is_err());
        assert!(parse_memory("1k").is_err());
        assert!(parse_memory("2T").is_err());
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("12X").is_err());
        assert!(parse_memory("99999999999999999999").is_err());
    }

    #[test]
    fn smp_values() {
        assert_eq!(parse_smp("4").unwrap(), 4);
        assert_eq!(parse_smp("cpus=2,sockets=1,cores=2,threads=1").unwrap(), 2);
        assert_eq!(parse_smp("sockets=2,cores=2").unwrap(), 4);
        assert!(parse_smp("0").is_err());
        assert!(parse_smp("256").is_err());
        assert!(parse_smp("cpus=4,cores=2").is_err());
        assert!(parse_smp("x").is_err());
        assert!(parse_smp("2,maxcpus=4").is_err());
    }

    #[test]
    fn errors_name_the_option() {
        let e = run(&["-m", "0"]).unwrap_err();
        assert_eq!(e.option, "-m 0");
        assert_eq!(e.to_string(), "-m 0: RAM size must not be zero");
        let e = run(&["-frobnicate"]).unwrap_err();
        assert_eq!(e.to_string(), "-frobnicate: invalid option");
        let e = run(&["-m"]).unwrap_err();
        assert_eq!(e.to_string(), "-m: requires an argument");
        let e = run(&["-smp", "0"]).unwrap_err();
        assert!(e.to_string().starts_with("-smp 0: "));
        let e = run(&["-accel", "xen"]).unwrap_err();
        assert!(e.to_string().contains("xen"));
        let e = run(&["-uuid", "nope"]).unwrap_err();
        assert!(e.to_string().starts_with("-uuid nope"));
        let e = run(&["-serial", "bogus"]).unwrap_err();
        assert!(e.to_string().starts_with("-serial bogus"));
        let e = run(&["-device", "e1000"]).unwrap_err();
        assert!(e
            .to_string()
            .contains("'e1000' is not a valid device model name"));
        let e = run(&["-display", "gtk"]).unwrap_err();
        assert!(e.to_string().starts_with("-display gtk"));
        assert!(run(&["disk.img"]).is_err());
        assert!(run(&["-initrd", "/i"]).is_err());
        assert!(run(&["-daemonize", "-serial", "stdio"]).is_err());
        for e in [
            run(&["-m", "0"]).unwrap_err(),
            run(&["-frobnicate"]).unwrap_err(),
        ] {
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn serial_defaults() {
        assert_eq!(
            run(&["-nographic"]).unwrap().serials,
            vec!["stdio".to_string()]
        );
        assert!(run(&["-nodefaults"]).unwrap().serials.is_empty());
    }

    #[test]
    fn accel_spellings() {
        assert_eq!(
            run(&["-enable-kvm"]).unwrap().accel,
            Some(vec![AccelKind::Kvm])
        );
        assert_eq!(
            run(&["-accel", "tcg"]).unwrap().accel,
            Some(vec![AccelKind::Emu])
        );
        assert_eq!(
            run(&["-machine", "pc,accel=kvm:emu"]).unwrap().accel,
            Some(vec![AccelKind::Kvm, AccelKind::Emu])
        );
        assert!(run(&["-machine", "virt"]).is_err());
    }

    #[test]
    fn qtest_options() {
        use crate::accel::qtest::QtestEndpoint;
        let c = run(&["-qtest", "unix:/tmp/q"]).unwrap();
        assert_eq!(c.accel, Some(vec![AccelKind::Qtest]));
        assert_eq!(c.qtest, Some(QtestEndpoint::Connect("/tmp/q".into())));
        let c = run(&["-accel", "qtest", "-qtest", "/tmp/q"]).unwrap();
        assert_eq!(c.accel, Some(vec![AccelKind::Qtest]));
        assert_eq!(
            run(&["-accel", "qtest"]).unwrap().accel,
            Some(vec![AccelKind::Qtest])
        );
        let e = run(&["-accel", "emu", "-qtest", "/tmp/q"]).unwrap_err();
        assert_eq!(e.option, "-qtest");
        let e = run(&["-qtest", "tcp:localhost:1"]).unwrap_err();
        assert_eq!(e.option, "-qtest tcp:localhost:1");
    }

    #[test]
    fn qmp_monitors() {
        let c = run(&[
            "-qmp",
            "unix:/tmp/q.sock,server=on,wait=off",
            "-qmp",
            "tcp:127.0.0.1:4444,server,nowait",
            "-chardev",
            "socket,id=m,path=/tmp/m.sock,server=on,wait=off",
            "-mon",
            "chardev=m,mode=control",
            "-qmp",
            "unix:/tmp/w.sock,server",
        ])
        .unwrap();
        let endpoints: Vec<MonitorEndpoint> =
            c.monitors.iter().map(|m| m.endpoint.clone()).collect();
        let unix = |p: &str, wait| MonitorEndpoint::Listen {
            address: chardev::SocketAddress::Unix(p.into()),
            wait,
        };
        assert_eq!(
            endpoints,
            vec![
                unix("/tmp/q.sock", false),
                MonitorEndpoint::Listen {
                    address: chardev::SocketAddress::Tcp {
                        host: "127.0.0.1".into(),
                        port: 4444
                    },
                    wait: false
                },
                unix("/tmp/w.sock", true),
                unix("/tmp/m.sock", false),
            ]
        );
        assert_eq!(c.monitors[3].option, "-mon chardev=m,mode=control");
        assert_eq!(
            run(&["-qmp", "stdio", "-nodefaults"]).unwrap().monitors[0].endpoint,
            MonitorEndpoint::Stdio
        );
    }

    #[test]
    fn qmp_errors_name_the_option() {
        let e = run(&["-qmp", "file:/x"]).unwrap_err();
        assert!(e.to_string().starts_with("-qmp file:/x: "), "{e}");
        let e = run(&["-qmp", "unix:/x"]).unwrap_err();
        assert!(e.to_string().contains("server=on"), "{e}");
        let e = run(&["-mon", "chardev=nope,mode=control"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "-mon chardev=nope,mode=control: chardev 'nope' not found"
        );
        let e = run(&["-chardev", "null,id=m", "-mon", "chardev=m"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("needs stdio or a unix or tcp socket"),
            "{e}"
        );
        let e = run(&["-monitor", "stdio", "-serial", "stdio"]).unwrap_err();
        assert!(e.to_string().contains("multiple character devices"), "{e}");
        let e = run(&["-qmp", "stdio", "-nographic"]).unwrap_err();
        assert!(e.to_string().starts_with("-qmp stdio: "), "{e}");
        let e = run(&["-chardev", "null,id=a", "-chardev", "null,id=a"]).unwrap_err();
        assert!(e.to_string().contains("duplicate chardev id 'a'"), "{e}");
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse_args(["-h"]).unwrap(), Command::Help);
        assert_eq!(parse_args(["--version"]).unwrap(), Command::Version);
    }
}
