//! Live migration over QMP and HMP: the seed's `migrate`, `migrate_cancel`,
//! `migrate_set_speed`, `migrate_set_downtime`, `client_migrate_info` and `query-migrate`,
//! with QEMU 7.2's `migrate-set-parameters`, `query-migrate-parameters`,
//! `migrate-set-capabilities`, `query-migrate-capabilities` and `migrate-incoming` beside
//! them; HMP `migrate`, `migrate_cancel`, `migrate_set_speed`, `migrate_set_downtime` and
//! `info migrate`.

use qmp::schema::{ArgType, CommandSpec, ParamSpec};
use qmp::{ErrorClass, QmpError};
use serde_json::{json, Map, Value};

use super::command::{Command, CommandContext};
use crate::machine::Machine;
use crate::migration::disk::BlockMode;
use crate::migration::{lock, MAX_DOWNTIME_LIMIT_MS};

pub const COMMANDS: &[Command] = &[
    Command::machine("migrate", migrate)
        .with_fd_names(|args| {
            args.get("uri")
                .and_then(Value::as_str)
                .and_then(|u| u.strip_prefix("fd:"))
                .map(str::to_string)
                .into_iter()
                .collect()
        })
        .with_spec(|| {
            CommandSpec::new(
                "migrate",
                vec![
                    ParamSpec::required("uri", ArgType::String),
                    ParamSpec::optional("blk", ArgType::Boolean),
                    ParamSpec::optional("inc", ArgType::Boolean),
                    ParamSpec::optional("detach", ArgType::Boolean),
                    ParamSpec::optional("resume", ArgType::Boolean),
                ],
            )
        }),
    Command::machine("migrate_cancel", |ctx| {
        ctx.machine.migration().request_cancel();
        Ok(json!({}))
    }),
    Command::machine("migrate_set_speed", |ctx| {
        let value = ctx
            .call
            .args
            .get("value")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        set_bandwidth(ctx.machine, value.max(0) as u64);
        Ok(json!({}))
    })
    .with_spec(|| {
        CommandSpec::new(
            "migrate_set_speed",
            vec![ParamSpec::required("value", ArgType::Integer)],
        )
    }),
    Command::machine("migrate_set_downtime", |ctx| {
        let secs = ctx
            .call
            .args
            .get("value")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        set_downtime_seconds(ctx.machine, secs).map(|()| json!({}))
    })
    .with_spec(|| {
        CommandSpec::new(
            "migrate_set_downtime",
            vec![ParamSpec::required("value", ArgType::Number)],
        )
    }),
    Command::machine("query-migrate", |ctx| Ok(query_migrate(ctx.machine))),
    Command::machine("migrate-set-parameters", set_parameters).with_spec(|| {
        CommandSpec::new(
            "migrate-set-parameters",
            vec![
                ParamSpec::optional("max-bandwidth", ArgType::Integer),
                ParamSpec::optional("downtime-limit", ArgType::Integer),
            ],
        )
    }),
    Command::machine("query-migrate-parameters", |ctx| {
        let p = *lock(&ctx.machine.migration().params);
        Ok(json!({
            "max-bandwidth": p.max_bandwidth,
            "downtime-limit": p.downtime_limit_ms,
            // The auto-converge steps this vmm takes (QEMU's defaults, fixed here).
            "cpu-throttle-initial": 20,
            "cpu-throttle-increment": 10,
            "max-cpu-throttle": 99,
            "throttle-trigger-threshold": 50,
        }))
    })
    .with_spec(|| CommandSpec::no_args("query-migrate-parameters")),
    Command::machine("migrate-set-capabilities", set_capabilities).with_spec(|| {
        CommandSpec::new(
            "migrate-set-capabilities",
            vec![ParamSpec::required(
                "capabilities",
                ArgType::Array(Box::new(ArgType::Object)),
            )],
        )
    }),
    Command::machine("query-migrate-capabilities", |ctx| {
        let caps = ctx.machine.migration().caps;
        Ok(json!([
            {"capability": "auto-converge", "state": caps.auto_converge},
            {"capability": "events", "state": caps.events},
            {"capability": "x-local", "state": caps.x_local},
        ]))
    })
    .with_spec(|| CommandSpec::no_args("query-migrate-capabilities")),
    Command::machine("client_migrate_info", client_migrate_info),
    Command::machine("migrate-incoming", |ctx| {
        let uri = ctx.str_arg("uri").unwrap_or_default().to_string();
        ctx.machine
            .migrate_incoming(&uri)
            .map(|()| json!({}))
            .map_err(QmpError::generic)
    })
    .with_spec(|| {
        CommandSpec::new(
            "migrate-incoming",
            vec![ParamSpec::required("uri", ArgType::String)],
        )
    }),
];

fn set_bandwidth(machine: &Machine, bytes_per_second: u64) {
    lock(&machine.migration().params).max_bandwidth = bytes_per_second;
}

fn set_downtime_seconds(machine: &Machine, secs: f64) -> Result<(), QmpError> {
    let ms = secs * 1000.0;
    if !(0.0..=MAX_DOWNTIME_LIMIT_MS as f64).contains(&ms) {
        return Err(downtime_range());
    }
    lock(&machine.migration().params).downtime_limit_ms = ms as u64;
    Ok(())
}

fn downtime_range() -> QmpError {
    QmpError::generic(
        "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms",
    )
}

/// `blk` copies the disks; `inc` (as in QEMU, with or without `blk`) only what their top
/// images hold over a shared backing file.
fn block_mode(blk: bool, inc: bool) -> BlockMode {
    match (blk, inc) {
        (_, true) => BlockMode::Incremental,
        (true, false) => BlockMode::Full,
        (false, false) => BlockMode::Shared,
    }
}

fn migrate(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let block = block_mode(ctx.bool_arg("blk", false), ctx.bool_arg("inc", false));
    if ctx.bool_arg("resume", false) {
        return Err(QmpError::generic(
            "Cannot resume if there is no paused migration",
        ));
    }
    let uri = ctx.str_arg("uri").unwrap_or_default().to_string();
    let fd = uri
        .strip_prefix("fd:")
        .and_then(|name| ctx.call.fds.iter().position(|(n, _)| n == name))
        .map(|i| ctx.call.fds.remove(i).1);
    ctx.machine
        .migrate(&uri, fd, block)
        .map(|()| json!({}))
        .map_err(QmpError::generic)
}

fn query_migrate(machine: &Machine) -> Value {
    lock(&machine.migration().progress).to_json()
}

fn set_parameters(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let args = &ctx.call.args;
    let downtime = args.get("downtime-limit").and_then(Value::as_i64);
    if downtime.is_some_and(|d| !(0..=MAX_DOWNTIME_LIMIT_MS as i64).contains(&d)) {
        return Err(downtime_range());
    }
    let bandwidth = args.get("max-bandwidth").and_then(Value::as_i64);
    if bandwidth.is_some_and(|b| b < 0) {
        return Err(QmpError::generic(
            "Parameter 'max_bandwidth' expects an integer in the range of 0 to 18446744073709551615 bytes/second",
        ));
    }
    let mut p = lock(&ctx.machine.migration().params);
    if let Some(d) = downtime {
        p.downtime_limit_ms = d as u64;
    }
    if let Some(b) = bandwidth {
        p.max_bandwidth = b as u64;
    }
    Ok(json!({}))
}

/// QEMU 7.2's capability names: those this vmm has, and the rest it knows but refuses.
const QEMU_CAPABILITIES: &[&str] = &[
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "compress",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "block",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
];

fn set_capabilities(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    if ctx.machine.migration().status().is_active() {
        return Err(QmpError::generic("There's a migration process in progress"));
    }
    let list = ctx
        .call
        .args
        .get("capabilities")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut caps = ctx.machine.migration().caps;
    for entry in &list {
        let name = entry
            .get("capability")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::generic("Parameter 'capability' is missing"))?;
        let state = entry
            .get("state")
            .and_then(Value::as_bool)
            .ok_or_else(|| QmpError::generic("Parameter 'state' is missing"))?;
        match name {
            "events" => caps.events = state,
            "auto-converge" => caps.auto_converge = state,
            "x-local" => caps.x_local = state,
            // Always on here: the destination answers on the connection.
            "return-path" if state => {}
            _ if !state && QEMU_CAPABILITIES.contains(&name) => {}
            _ if QEMU_CAPABILITIES.contains(&name) => {
                return Err(QmpError::generic(format!(
                    "Migration capability '{name}' is not supported by this vmm"
                )))
            }
            _ => {
                return Err(QmpError::generic(format!(
                    "Parameter 'capability' does not accept value '{name}'"
                )))
            }
        }
    }
    ctx.machine.migration_mut().caps = caps;
    Ok(json!({}))
}

/// Recorded for VNC (clients would be told where to go); SPICE is not in use, as QEMU
/// says when it has none.
fn client_migrate_info(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let args = ctx.call.args.clone();
    match args.get("protocol").and_then(Value::as_str) {
        Some("spice") => Err(QmpError::new(
            ErrorClass::DeviceNotActive,
            "SPICE is not in use",
        )),
        Some("vnc") => {
            ctx.machine.migration_mut().client_info = Some(Value::Object(args));
            Ok(json!({}))
        }
        _ => Err(QmpError::generic("Parameter 'protocol' expects 'spice'")),
    }
}

/// HMP `migrate [-d] [-b] [-i] URI`.
pub fn hmp_migrate(machine: &mut Machine, args: &[&str]) -> String {
    let flags: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| a.starts_with('-'))
        .collect();
    let Some(uri) = args.iter().copied().find(|a| !a.starts_with('-')) else {
        return format!(
            "migrate: string expected\n{}",
            super::hmp::usage_hint("migrate")
        );
    };
    let has = |c: char| flags.iter().any(|f| !f.starts_with("--") && f.contains(c));
    match machine.migrate(uri, None, block_mode(has('b'), has('i'))) {
        Ok(()) => String::new(),
        Err(e) => format!("Error: {e}\n"),
    }
}

/// HMP `migrate_set_speed VALUE` (bytes per second, with QEMU's B/K/M/G suffixes; a bare
/// number is MiB, as QEMU's `o` argument takes it).
pub fn hmp_migrate_set_speed(machine: &Machine, args: &[&str]) -> String {
    match speed_bytes(args) {
        Ok(bytes) => {
            set_bandwidth(machine, bytes);
            String::new()
        }
        Err(text) => text,
    }
}

/// `migrate_set_speed`'s argument in bytes per second; the error text for a bad one.
pub(super) fn speed_bytes(args: &[&str]) -> Result<u64, String> {
    let invalid = || {
        format!(
            "invalid size\n{}",
            super::hmp::usage_hint("migrate_set_speed")
        )
    };
    let Some(text) = args.first() else {
        return Err(format!(
            "migrate_set_speed: value expected\n{}",
            super::hmp::usage_hint("migrate_set_speed")
        ));
    };
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let shift = match unit.to_ascii_lowercase().as_str() {
        "b" => 0,
        "k" => 10,
        "" | "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(invalid()),
    };
    digits
        .parse::<u64>()
        .map(|n| n.saturating_mul(1 << shift))
        .map_err(|_| invalid())
}

/// HMP `migrate_set_downtime SECONDS`.
pub fn hmp_migrate_set_downtime(machine: &Machine, args: &[&str]) -> String {
    match args.first().and_then(|a| a.parse::<f64>().ok()) {
        Some(secs) => match set_downtime_seconds(machine, secs) {
            Ok(()) => String::new(),
            Err(e) => format!("Error: {}\n", e.desc),
        },
        None => format!(
            "migrate_set_downtime: number expected\n{}",
            super::hmp::usage_hint("migrate_set_downtime")
        ),
    }
}

/// HMP `info migrate`, in QEMU's layout.
pub fn hmp_info_migrate(machine: &Machine) -> String {
    let caps = machine.migration().caps;
    let mut out = format!(
        "capabilities: auto-converge: {} events: {} x-local: {}\n",
        on_off(caps.auto_converge),
        on_off(caps.events),
        on_off(caps.x_local)
    );
    let info = query_migrate(machine);
    let Some(status) = info.get("status").and_then(Value::as_str) else {
        return out;
    };
    out.push_str(&format!("Migration status: {status}\n"));
    let num = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(0);
    let top = info.as_object().cloned().unwrap_or_default();
    if let Some(t) = top.get("total-time") {
        out.push_str(&format!("total time: {} ms\n", t.as_u64().unwrap_or(0)));
    }
    if let Some(d) = top.get("expected-downtime") {
        out.push_str(&format!(
            "expected downtime: {} ms\n",
            d.as_u64().unwrap_or(0)
        ));
    }
    if let Some(d) = top.get("downtime") {
        out.push_str(&format!("downtime: {} ms\n", d.as_u64().unwrap_or(0)));
    }
    if let Some(s) = top.get("setup-time") {
        out.push_str(&format!("setup: {} ms\n", s.as_u64().unwrap_or(0)));
    }
    if let Some(Value::Object(ram)) = top.get("ram") {
        out.push_str(&format!(
            "transferred ram: {} kbytes\nthroughput: {:.2} mbps\nremaining ram: {} kbytes\n\
             total ram: {} kbytes\nduplicate: {} pages\nnormal: {} pages\nnormal bytes: {} kbytes\n\
             dirty sync count: {}\n",
            num(ram, "transferred") >> 10,
            ram.get("mbps").and_then(Value::as_f64).unwrap_or(0.0),
            num(ram, "remaining") >> 10,
            num(ram, "total") >> 10,
            num(ram, "duplicate"),
            num(ram, "normal"),
            num(ram, "normal-bytes") >> 10,
            num(ram, "dirty-sync-count"),
        ));
    }
    if let Some(Value::Object(disk)) = top.get("disk") {
        out.push_str(&format!(
            "transferred disk: {} kbytes\nremaining disk: {} kbytes\ntotal disk: {} kbytes\n",
            num(disk, "transferred") >> 10,
            num(disk, "remaining") >> 10,
            num(disk, "total") >> 10,
        ));
    }
    if let Some(e) = top.get("error-desc").and_then(Value::as_str) {
        out.push_str(&format!("error description: {e}\n"));
    }
    out
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}
