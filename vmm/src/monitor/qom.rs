//! qom-get and qom-set: the device properties management tools read and write by QOM path
//! (QEMU 7.2's commands; the balloon's statistics are read this way).

use qmp::schema::{ArgType, CommandSpec, ParamSpec};
use qmp::{ErrorClass, QmpError};
use serde_json::{json, Value};

use super::command::{Command, CommandContext};
use crate::device_manager::QomError;

pub const COMMANDS: &[Command] = &[
    Command::machine("qom-get", qom_get).with_spec(|| {
        CommandSpec::new(
            "qom-get",
            vec![
                ParamSpec::required("path", ArgType::String),
                ParamSpec::required("property", ArgType::String),
            ],
        )
    }),
    Command::machine("qom-set", qom_set).with_spec(|| {
        CommandSpec::new(
            "qom-set",
            vec![
                ParamSpec::required("path", ArgType::String),
                ParamSpec::required("property", ArgType::String),
                ParamSpec::required("value", ArgType::Any),
            ],
        )
    }),
];

fn to_qmp(e: QomError) -> QmpError {
    match e {
        QomError::NotFound(_) => QmpError::new(ErrorClass::DeviceNotFound, e.to_string()),
        _ => QmpError::generic(e.to_string()),
    }
}

fn qom_get(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let path = ctx.str_arg("path").unwrap_or_default();
    let property = ctx.str_arg("property").unwrap_or_default();
    ctx.machine
        .devices()
        .qom_get(path, property)
        .map_err(to_qmp)
}

fn qom_set(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let path = ctx.str_arg("path").unwrap_or_default().to_string();
    let property = ctx.str_arg("property").unwrap_or_default().to_string();
    let value = ctx.call.args.get("value").cloned().unwrap_or(Value::Null);
    ctx.machine
        .devices_mut()
        .qom_set(&path, &property, &value)
        .map(|()| json!({}))
        .map_err(to_qmp)
}
