//! Run control: quit, stop, cont, resets, the power button, NMIs and the run state, with
//! QEMU 7.2's replies and events (emitted before the reply).

use qmp::QmpError;
use serde_json::{json, Value};

use super::command::{Command, CommandContext};
use crate::machine::{Machine, MachineExit};

pub const COMMANDS: &[Command] = &[
    Command::machine("quit", quit),
    Command::machine("stop", stop),
    Command::machine("cont", cont),
    Command::machine("system_reset", system_reset),
    Command::machine("system_powerdown", system_powerdown),
    Command::machine("query-status", |ctx| Ok(query_status(ctx.machine))),
    Command::machine("inject-nmi", inject_nmi),
];

fn quit(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    ctx.machine.emit_shutdown(false, "host-qmp-quit");
    ctx.machine.set_quit_flush(ctx.call.take_flushed());
    ctx.exit = Some(MachineExit::Shutdown);
    Ok(json!({}))
}

fn stop(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    ctx.machine.stop();
    Ok(json!({}))
}

fn cont(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    ctx.machine.cont().map(|()| json!({}))
}

fn system_reset(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    match ctx.machine.host_reset() {
        Ok(outcome) => {
            ctx.exit = outcome;
            Ok(json!({}))
        }
        Err(e) => Err(QmpError::generic(e.to_string())),
    }
}

fn system_powerdown(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    ctx.machine.emit("POWERDOWN", None);
    ctx.machine.power_button();
    Ok(json!({}))
}

fn inject_nmi(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    ctx.machine.inject_nmi();
    Ok(json!({}))
}

pub(super) fn query_status(machine: &Machine) -> Value {
    let state = machine.run_state();
    json!({
        "status": state.as_str(),
        "singlestep": false,
        "running": state.is_running(),
    })
}
