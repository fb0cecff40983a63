//! What the machine is: version, name, UUID, KVM, vCPUs, character devices and mice.

use qmp::schema::CommandSpec;
use qmp::{GreetingInfo, QmpError};
use serde_json::{json, Value};

use super::command::{Command, CommandContext};
use crate::accel::AccelKind;
use crate::machine::Machine;

/// The UUID QEMU reports when none was given.
pub(super) const NULL_UUID: &str = "00000000-0000-0000-0000-000000000000";

pub const COMMANDS: &[Command] = &[
    Command::machine("query-version", |_| Ok(query_version())),
    Command::machine("query-kvm", |ctx| {
        Ok(json!({
            "enabled": ctx.machine.accel_kind() == AccelKind::Kvm,
            "present": kvm_present(),
        }))
    }),
    Command::machine("query-name", |ctx| {
        Ok(match &ctx.machine.config().name {
            Some(name) => json!({ "name": name }),
            None => json!({}),
        })
    }),
    Command::machine("query-uuid", |ctx| {
        Ok(json!({
            "UUID": ctx.machine.config().uuid.as_deref().unwrap_or(NULL_UUID),
        }))
    }),
    Command::machine("query-mice", |ctx| Ok(query_mice(ctx.machine))),
    // QEMU 7.2's, which the seed predates.
    Command::machine("query-cpus-fast", |ctx| Ok(query_cpus_fast(ctx.machine)))
        .with_spec(|| CommandSpec::no_args("query-cpus-fast")),
    // Documented by the seed without a command table entry.
    Command::machine("query-cpus", |ctx| Ok(query_cpus(ctx.machine)))
        .with_spec(|| CommandSpec::no_args("query-cpus")),
    Command::machine("cpu", set_cpu),
    Command::machine("query-chardev", |ctx| Ok(query_chardev(ctx.machine))),
];

/// The QEMU version whose command set we implement, and our own package name.
pub(super) fn query_version() -> Value {
    let info = GreetingInfo::default();
    json!({
        "qemu": { "major": info.major, "minor": info.minor, "micro": info.micro },
        "package": info.package,
    })
}

/// Whether KVM could be used on this host (QEMU's `present`).
pub(super) fn kvm_present() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// QEMU 7.2's query-cpus-fast for a pc machine with one vCPU per socket (its default
/// topology for `-smp N`).
fn query_cpus_fast(machine: &Machine) -> Value {
    let cpus = machine
        .cpus()
        .thread_ids()
        .into_iter()
        .map(|(index, thread_id)| {
            json!({
                "cpu-index": index,
                "qom-path": format!("/machine/unattached/device[{index}]"),
                "thread-id": thread_id,
                "props": { "core-id": 0, "thread-id": 0, "socket-id": index },
                "target": "x86_64",
            })
        })
        .collect();
    Value::Array(cpus)
}

/// QMP `cpu`: choose the monitor's current CPU.
fn set_cpu(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let index = ctx
        .call
        .args
        .get("index")
        .and_then(Value::as_i64)
        .unwrap_or(-1);
    match u32::try_from(index) {
        Ok(index) if ctx.machine.set_current_cpu(index) => Ok(json!({})),
        _ => Err(QmpError::generic("Invalid CPU index")),
    }
}

/// The seed's query-cpus: every vCPU's pc and halt state, and which one is current.
fn query_cpus(machine: &Machine) -> Value {
    let current = machine.current_cpu();
    let cpus = machine.cpus();
    let list = cpus
        .thread_ids()
        .into_iter()
        .zip(cpus.snapshots())
        .map(|((index, thread_id), state)| {
            json!({
                "CPU": index,
                "current": index == current,
                "halted": state.halted,
                "pc": state.pc,
                "thread_id": thread_id,
            })
        })
        .collect();
    Value::Array(list)
}

/// QMP query-chardev: each backend's label, QEMU-style filename, and whether its front
/// end (the device) is open.
pub(super) fn query_chardev(machine: &Machine) -> Value {
    let list = machine
        .chardevs()
        .iter()
        .map(|c| {
            json!({
                "label": c.label(),
                "filename": c.filename(),
                "frontend-open": true,
            })
        })
        .collect();
    Value::Array(list)
}

/// A pointing device as query-mice and `info mice` show it.
pub struct MouseInfo {
    pub name: &'static str,
    pub index: u32,
    pub current: bool,
    pub absolute: bool,
    /// Its driver set it up (the newest such is current).
    pub active: bool,
}

/// The machine's mice: the i8042's PS/2 mouse, which every pc machine has, and the
/// virtio ones. The indices are QEMU 7.2's input-handler indices on the same machine (the
/// PS/2 keyboard's handlers come first, then the PS/2 mouse's, then each virtio-input
/// device's in creation order), so management software sees the same numbers from both.
pub fn mice(machine: &Machine) -> Vec<MouseInfo> {
    machine.devices().mice()
}

fn query_mice(machine: &Machine) -> Value {
    json!(mice(machine)
        .iter()
        .map(|m| json!({
            "name": m.name,
            "index": m.index,
            "current": m.current,
            "absolute": m.absolute,
        }))
        .collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_qemu_7_2_and_us() {
        let v = query_version();
        assert_eq!(v["qemu"], json!({"major": 7, "minor": 2, "micro": 0}));
        assert!(v["package"].as_str().unwrap().starts_with("vmm "));
    }
}
