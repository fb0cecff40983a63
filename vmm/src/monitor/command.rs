//! The table of QMP commands: every command this monitor implements, from every domain
//! module, with its handler. `query-commands` and the argument schema are built from it,
//! so what the monitor says it has is what it has.

use qmp::schema::CommandSpec;
use qmp::QmpError;
use serde_json::Value;

use super::{
    balloon, block, devices, display, hmp, info, memory, migration, net, qom, run_control,
    MonitorCall,
};
use crate::machine::{Machine, MachineExit};

/// A command run on the main thread, which owns the machine.
pub type Handler = fn(&mut CommandContext<'_>) -> Result<Value, QmpError>;

/// The names of descriptors passed with getfd that a command's arguments refer to.
pub type FdNames = fn(&serde_json::Map<String, Value>) -> Vec<String>;

/// What a handler works with.
pub struct CommandContext<'a> {
    pub machine: &'a mut Machine,
    pub call: &'a mut MonitorCall,
    /// Set by a handler whose command ends the machine's run (quit, a reset under
    /// -no-reboot).
    pub exit: Option<MachineExit>,
}

impl CommandContext<'_> {
    /// A string argument the schema has already checked for type.
    pub fn str_arg(&self, name: &str) -> Option<&str> {
        self.call.str_arg(name)
    }

    /// A boolean argument, `default` when absent.
    pub fn bool_arg(&self, name: &str, default: bool) -> bool {
        self.call
            .args
            .get(name)
            .and_then(Value::as_bool)
            .unwrap_or(default)
    }
}

/// Where a command runs.
pub enum Run {
    /// On the main thread, against the machine.
    Machine(Handler),
    /// In the connection that received it (getfd, closefd, query-commands,
    /// qmp_capabilities): it concerns that connection only.
    Connection,
}

/// One QMP command.
pub struct Command {
    pub name: &'static str,
    pub run: Run,
    /// The argument that names a file, which may be `fd:NAME` for a descriptor passed
    /// with getfd on the same connection.
    pub file_arg: Option<&'static str>,
    /// The arguments, where the seed has none for this command or QEMU 7.2's differ.
    pub spec: Option<fn() -> CommandSpec>,
    /// The names of descriptors passed with getfd that the arguments refer to.
    pub fd_names: Option<FdNames>,
}

impl Command {
    /// A command run against the machine, with the seed's arguments.
    pub const fn machine(name: &'static str, handler: Handler) -> Self {
        Command {
            name,
            run: Run::Machine(handler),
            file_arg: None,
            spec: None,
            fd_names: None,
        }
    }

    /// A command the connection answers itself.
    pub const fn connection(name: &'static str) -> Self {
        Command {
            name,
            run: Run::Connection,
            file_arg: None,
            spec: None,
            fd_names: None,
        }
    }

    /// Its arguments are `spec`'s rather than the seed's.
    pub const fn with_spec(self, spec: fn() -> CommandSpec) -> Self {
        Command {
            spec: Some(spec),
            ..self
        }
    }

    /// The arguments name descriptors passed with getfd, as `names` finds them.
    pub const fn with_fd_names(self, names: FdNames) -> Self {
        Command {
            fd_names: Some(names),
            ..self
        }
    }

    /// Argument `arg` names a file and may be `fd:NAME`.
    pub const fn with_file_arg(self, arg: &'static str) -> Self {
        Command {
            file_arg: Some(arg),
            ..self
        }
    }
}

/// The commands the connection itself answers.
const CONNECTION: &[Command] = &[
    Command::connection("qmp_capabilities"),
    Command::connection("query-commands"),
    Command::connection("getfd"),
    Command::connection("closefd"),
];

/// Every domain's table.
const TABLES: &[&[Command]] = &[
    CONNECTION,
    run_control::COMMANDS,
    info::COMMANDS,
    memory::COMMANDS,
    devices::COMMANDS,
    block::COMMANDS,
    net::COMMANDS,
    display::COMMANDS,
    balloon::COMMANDS,
    migration::COMMANDS,
    qom::COMMANDS,
    hmp::COMMANDS,
];

/// Every command.
pub fn all() -> impl Iterator<Item = &'static Command> {
    TABLES.iter().flat_map(|t| t.iter())
}

/// The command named `name`.
pub fn find(name: &str) -> Option<&'static Command> {
    all().find(|c| c.name == name)
}

/// Run `call` against the machine and reply. Returns how the machine must exit, if it
/// must.
pub fn execute(machine: &mut Machine, mut call: MonitorCall) -> Option<MachineExit> {
    let handler = match find(&call.command).map(|c| &c.run) {
        Some(Run::Machine(handler)) => *handler,
        _ => {
            let error = QmpError::command_not_found(&call.command);
            call.reply(Err(error));
            return None;
        }
    };
    let mut ctx = CommandContext {
        machine,
        call: &mut call,
        exit: None,
    };
    let result = handler(&mut ctx);
    let exit = ctx.exit;
    call.reply(result);
    exit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_is_in_one_table_once() {
        let mut names: Vec<&str> = all().map(|c| c.name).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "a command is in two tables");
    }
}
