//! QMP commands carried out on the main thread against the [`Machine`], with QEMU 7.2's
//! reply shapes and errors. Events of synchronous actions are emitted before the reply.

use qmp::{GreetingInfo, QmpError};
use serde_json::{json, Value};

use super::MonitorCall;
use crate::accel::AccelKind;
use crate::machine::{Machine, MachineExit};

/// The UUID QEMU reports when none was given.
const NULL_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// Runs one command and replies. Returns how the machine must exit, if it must.
pub fn execute(machine: &mut Machine, mut call: MonitorCall) -> Option<MachineExit> {
    let mut exit = None;
    let result = match call.command.as_str() {
        "quit" => {
            machine.emit_shutdown(false, "host-qmp-quit");
            machine.set_quit_flush(call.take_flushed());
            exit = Some(MachineExit::Shutdown);
            Ok(json!({}))
        }
        "stop" => {
            machine.stop();
            Ok(json!({}))
        }
        "cont" => machine.cont().map(|()| json!({})),
        "system_reset" => match machine.host_reset() {
            Ok(outcome) => {
                exit = outcome;
                Ok(json!({}))
            }
            Err(e) => Err(QmpError::generic(e.to_string())),
        },
        "system_powerdown" => {
            machine.emit("POWERDOWN", None);
            machine.power_button();
            Ok(json!({}))
        }
        "query-status" => Ok(query_status(machine)),
        "query-version" => Ok(query_version()),
        "query-kvm" => Ok(json!({
            "enabled": machine.accel_kind() == AccelKind::Kvm,
            "present": kvm_present(),
        })),
        "query-name" => Ok(match &machine.config().name {
            Some(name) => json!({ "name": name }),
            None => json!({}),
        }),
        "query-uuid" => Ok(json!({
            "UUID": machine.config().uuid.as_deref().unwrap_or(NULL_UUID),
        })),
        "query-cpus-fast" => Ok(query_cpus_fast(machine)),
        other => Err(QmpError::command_not_found(other)),
    };
    call.reply(result);
    exit
}

fn query_status(machine: &Machine) -> Value {
    let state = machine.run_state();
    json!({
        "status": state.as_str(),
        "singlestep": false,
        "running": state.is_running(),
    })
}

/// The QEMU version whose command set we implement, and our own package name.
fn query_version() -> Value {
    let info = GreetingInfo::default();
    json!({
        "qemu": { "major": info.major, "minor": info.minor, "micro": info.micro },
        "package": info.package,
    })
}

/// Whether KVM could be used on this host (QEMU's `present`).
fn kvm_present() -> bool {
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
