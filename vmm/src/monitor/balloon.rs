//! The memory balloon: balloon and query-balloon over QMP, HMP's `balloon` (MiB) and
//! `info balloon`, with QEMU 7.2's errors.

use qmp::schema::{ArgType, CommandSpec, ParamSpec};
use qmp::{ErrorClass, QmpError};
use serde_json::{json, Value};

use super::command::{Command, CommandContext};
use crate::device_manager::NO_BALLOON;
use crate::machine::Machine;

pub const COMMANDS: &[Command] = &[
    Command::machine("balloon", balloon).with_spec(|| {
        CommandSpec::new(
            "balloon",
            vec![ParamSpec::required("value", ArgType::Integer)],
        )
    }),
    Command::machine("query-balloon", |ctx| query_balloon(ctx.machine)),
    Command::machine(QUERY_BALLOON_COUNTERS, |ctx| balloon_counters(ctx.machine))
        .with_spec(|| CommandSpec::no_args(QUERY_BALLOON_COUNTERS)),
];

/// Our downstream query: what the balloon released and what it refused.
pub const QUERY_BALLOON_COUNTERS: &str = "__org.vmm_query-balloon-counters";

fn no_balloon() -> QmpError {
    QmpError::new(ErrorClass::DeviceNotActive, NO_BALLOON)
}

/// Leave the guest `target` bytes (QEMU refuses 0 and below, and clamps above its RAM).
fn set_target(machine: &Machine, target: i64) -> Result<(), QmpError> {
    if machine.devices().query_balloon().is_none() {
        return Err(no_balloon());
    }
    if target <= 0 {
        return Err(QmpError::generic("Parameter 'target' expects a size"));
    }
    machine
        .devices()
        .set_balloon(target as u64)
        .map_err(|e| e.map_or_else(no_balloon, |e| QmpError::generic(e.to_string())))
}

fn balloon(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let value = ctx
        .call
        .args
        .get("value")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    set_target(ctx.machine, value).map(|()| json!({}))
}

/// Bytes released (inflate and free page reporting), pages deflated, buffers and page
/// numbers refused, statistics reports received.
fn balloon_counters(machine: &Machine) -> Result<Value, QmpError> {
    let c = machine
        .devices()
        .balloon_counters()
        .ok_or_else(no_balloon)?;
    Ok(json!({
        "released": c.released,
        "deflated": c.deflated,
        "refused": c.refused,
        "stats-updates": c.stats_updates,
    }))
}

fn query_balloon(machine: &Machine) -> Result<Value, QmpError> {
    machine.devices().query_balloon().ok_or_else(no_balloon)
}

/// HMP `balloon MIB`, its argument read as QEMU reads a size in MiB (`M`), with its words.
pub fn hmp_balloon(machine: &Machine, args: &[&str]) -> String {
    let mib = match balloon_mib(args) {
        Ok(mib) => mib,
        Err(text) => return text,
    };
    match set_target(machine, mib.saturating_mul(1 << 20)) {
        Ok(()) => String::new(),
        Err(e) => format!("Error: {}\n", e.desc),
    }
}

/// `balloon`'s argument, a size in MiB; the error text QEMU prints for a bad one.
pub(super) fn balloon_mib(args: &[&str]) -> Result<i64, String> {
    let hint = super::hmp::usage_hint("balloon");
    match args {
        [] => Err(format!("unexpected end of expression\n{hint}")),
        [_, _, ..] => Err(format!(
            "balloon: extraneous characters at the end of line\n{hint}"
        )),
        [arg] => {
            let negative = arg.strip_prefix('-');
            let text = negative.unwrap_or(arg);
            let end = text
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(text.len());
            match (text[..end].parse::<i64>(), text[end..].chars().next()) {
                (Err(_), Some(bad)) => Err(format!("invalid char '{bad}' in expression\n{hint}")),
                (Err(_), None) => Err(format!("unexpected end of expression\n{hint}")),
                (Ok(_), Some(_)) => Err(format!(
                    "balloon: extraneous characters at the end of line\n{hint}"
                )),
                (Ok(_), None) if negative.is_some() => {
                    Err(format!("enter a positive value\n{hint}"))
                }
                (Ok(n), None) => Ok(n),
            }
        }
    }
}

/// HMP `info balloon`: `actual` in MiB.
pub fn hmp_info_balloon(machine: &Machine) -> String {
    match query_balloon(machine) {
        Ok(info) => format!(
            "balloon: actual={}\n",
            info["actual"].as_u64().unwrap_or(0) >> 20
        ),
        Err(e) => format!("Error: {}\n", e.desc),
    }
}
