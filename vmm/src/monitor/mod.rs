//! The QMP monitor: the `qmp` crate's server on its own tokio runtime, with a dispatcher
//! that hands each command to the main thread (which owns the [`Machine`]) as a
//! [`MachineRequest::Monitor`] and waits for its reply. Commands that only touch the
//! connection (getfd, closefd) or the schema (query-commands) are answered in place.
//!
//! [`Machine`]: crate::machine::Machine

pub mod balloon;
pub mod block;
pub mod command;
pub mod devices;
pub mod display;
pub mod hmp;
pub mod hmp_console;
pub mod info;
pub mod memory;
pub mod migration;
pub mod net;
pub mod qom;
pub mod run_control;

use std::fmt;
use std::net::TcpListener as StdTcpListener;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qmp::{ConnectionContext, Dispatcher, EventSender, QmpError, Schema, Server, ServerConfig};
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use crate::chardev::SocketAddress;
use crate::config::{MonitorConfig, MonitorEndpoint};
use crate::control::{MachineControl, MachineJob, MachineRequest};
use crate::machine::{Machine, MachineExit};

pub use devices::QUERY_DEVICE_PROCESSES;

/// How long `quit` waits for its reply to reach the client before the process exits.
const QUIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the main thread waits for a reply to be handed to its connection before it
/// carries on (and may emit events that must come after the reply).
const REPLY_HANDOFF_TIMEOUT: Duration = Duration::from_millis(100);
/// How long the runtime may take to wind down its connections at exit.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("the QMP command schema: {0}")]
    Schema(#[from] qmp::schema::SchemaError),
    #[error("cannot start the QMP runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("{option}: failed to listen on '{address}': {source}")]
    Listen {
        option: String,
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{option}: failed to accept the first client on '{address}': {source}")]
    Accept {
        option: String,
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// One QMP command on its way to the main thread, with the way back for its reply.
pub struct MonitorCall {
    pub command: String,
    pub args: Map<String, Value>,
    reply: oneshot::Sender<Result<Value, QmpError>>,
    /// Signalled (or dropped) by the dispatcher once it holds the reply.
    handed_off: std::sync::mpsc::Receiver<()>,
    /// For `quit`: completes once the reply has been written to the client.
    flushed: Option<oneshot::Receiver<()>>,
    /// A file named `fd:NAME` in the arguments: the descriptor getfd stored under NAME on
    /// this connection (taken from it, as QEMU's monitor_get_fd does).
    pub fd: Option<std::os::fd::OwnedFd>,
    /// Descriptors passed with getfd that the command names (netdev_add's `fd=`, `fds=`),
    /// by name, taken from the connection.
    pub fds: Vec<(String, std::os::fd::OwnedFd)>,
}

impl MonitorCall {
    /// A call, the receiver of its reply, and the sender that tells the main thread the
    /// reply has been taken.
    pub fn new(
        command: &str,
        args: Map<String, Value>,
    ) -> (
        Self,
        oneshot::Receiver<Result<Value, QmpError>>,
        std::sync::mpsc::SyncSender<()>,
    ) {
        let (reply, receiver) = oneshot::channel();
        let (handed_off_tx, handed_off) = std::sync::mpsc::sync_channel(1);
        let call = MonitorCall {
            command: command.to_string(),
            args,
            reply,
            handed_off,
            flushed: None,
            fd: None,
            fds: Vec::new(),
        };
        (call, receiver, handed_off_tx)
    }

    /// Takes the "reply written" signal of a `quit`.
    pub fn take_flushed(&mut self) -> Option<oneshot::Receiver<()>> {
        self.flushed.take()
    }

    /// Sends the reply, and waits (briefly) until the dispatcher has it, so that events the
    /// main thread emits next follow the reply on the wire, as QEMU's single-threaded
    /// monitor orders them. A client that went away meanwhile is not an error.
    pub fn reply(self, result: Result<Value, QmpError>) {
        if self.reply.send(result).is_ok() {
            let _ = self.handed_off.recv_timeout(REPLY_HANDOFF_TIMEOUT);
        }
    }

    /// A string argument the schema has already checked for type.
    pub fn str_arg(&self, name: &str) -> Option<&str> {
        self.args.get(name).and_then(Value::as_str)
    }
}

impl fmt::Debug for MonitorCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MonitorCall")
            .field("command", &self.command)
            .field("args", &self.args)
            .finish_non_exhaustive()
    }
}

/// A call runs on the main thread against the machine.
impl MachineJob for MonitorCall {
    fn run(self: Box<Self>, machine: &mut Machine) -> Option<MachineExit> {
        command::execute(machine, *self)
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// Two calls are the same request when they name the same command with the same
/// arguments (the reply channels are not comparable).
impl PartialEq for MonitorCall {
    fn eq(&self, other: &Self) -> bool {
        self.command == other.command && self.args == other.args
    }
}

/// The seed's schema for the commands of the table ([`command::all`]), with the
/// arguments of those the seed lacks or has otherwise: query-commands and CommandNotFound
/// tell the truth.
pub fn implemented_schema() -> Result<Schema, MonitorError> {
    let mut schema = Schema::seed()?;
    for spec in command::all().filter_map(|c| c.spec) {
        schema.insert(spec());
    }
    schema.retain(|name| command::find(name).is_some());
    Ok(schema)
}

/// Runs commands on behalf of every monitor connection.
struct MachineDispatcher {
    control: MachineControl,
    /// query-commands' answer, fixed at start.
    command_names: Vec<String>,
}

impl MachineDispatcher {
    fn fd_name(args: &Map<String, Value>) -> Result<&str, QmpError> {
        args.get("fdname")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::generic("Parameter 'fdname' is missing"))
    }
}

impl Dispatcher for MachineDispatcher {
    async fn dispatch(
        &self,
        ctx: &mut ConnectionContext,
        command: &str,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        match command {
            "getfd" => {
                ctx.getfd(Self::fd_name(&args)?)?;
                return Ok(Value::Object(Map::new()));
            }
            "closefd" => {
                ctx.closefd(Self::fd_name(&args)?)?;
                return Ok(Value::Object(Map::new()));
            }
            "query-commands" => {
                let list = self
                    .command_names
                    .iter()
                    .map(|name| serde_json::json!({ "name": name }))
                    .collect();
                return Ok(Value::Array(list));
            }
            _ => {}
        }
        // Commands that open a file take `fd:NAME` for a descriptor passed with getfd.
        let file_arg = command::find(command).and_then(|c| c.file_arg);
        let fd_name = file_arg
            .and_then(|a| args.get(a))
            .and_then(Value::as_str)
            .and_then(|v| v.strip_prefix("fd:"))
            .map(str::to_string);
        let (mut call, reply, handed_off) = MonitorCall::new(command, args);
        // Named descriptors a command uses are taken from this connection now (those it
        // does not have are the command's to report).
        if let Some(names) = command::find(command).and_then(|c| c.fd_names) {
            for name in names(&call.args) {
                if let Ok(fd) = ctx.take_fd(&name) {
                    call.fds.push((name, fd));
                }
            }
        }
        if let Some(name) = fd_name {
            call.fd = Some(ctx.take_fd(&name)?);
        }
        if command == "quit" {
            call.flushed = Some(ctx.close_after_reply());
        }
        self.control.request(MachineRequest::Run(Box::new(call)));
        let result = reply
            .await
            .unwrap_or_else(|_| Err(QmpError::generic("The machine is shutting down")));
        // Acknowledge from a task that runs only after this connection's task has queued
        // the reply and gone back to reading: the runtime has one worker, so the spawned
        // task waits behind it.
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            let _ = handed_off.try_send(());
        });
        result
    }
}

/// The running QMP server and its runtime.
pub struct Monitor {
    runtime: tokio::runtime::Runtime,
    events: EventSender,
    /// Unix socket files we created, removed at exit as QEMU does.
    socket_paths: Vec<PathBuf>,
}

impl Monitor {
    /// Opens every configured monitor. Listening sockets are bound (and with `wait=on`
    /// their first client accepted) before this returns, so clients may connect as soon
    /// as the machine starts.
    pub fn start(configs: &[MonitorConfig], control: MachineControl) -> Result<Self, MonitorError> {
        let schema = implemented_schema()?;
        let command_names = schema.names().map(str::to_string).collect();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("qmp")
            .enable_all()
            .build()
            .map_err(MonitorError::Runtime)?;
        let events = EventSender::default();
        let dispatcher = Arc::new(MachineDispatcher {
            control,
            command_names,
        });
        let server =
            Server::with_events(ServerConfig::default(), schema, dispatcher, events.clone());
        let mut monitor = Monitor {
            runtime,
            events,
            socket_paths: Vec::new(),
        };
        for (index, config) in configs.iter().enumerate() {
            monitor.open(&server, config, &format!("monitor{index}"))?;
        }
        Ok(monitor)
    }

    fn open(
        &mut self,
        server: &Server<MachineDispatcher>,
        config: &MonitorConfig,
        monitor_id: &str,
    ) -> Result<(), MonitorError> {
        let _context = self.runtime.enter();
        let (address, wait) = match &config.endpoint {
            MonitorEndpoint::Stdio => {
                server.spawn_stdio(monitor_id);
                return Ok(());
            }
            MonitorEndpoint::Listen { address, wait } => (address, *wait),
        };
        let address_text = match address {
            SocketAddress::Unix(path) => path.display().to_string(),
            SocketAddress::Tcp { host, port } => format!("{host}:{port}"),
        };
        let listen_error = |source| MonitorError::Listen {
            option: config.option.clone(),
            address: address_text.clone(),
            source,
        };
        let accept_error = |source| MonitorError::Accept {
            option: config.option.clone(),
            address: address_text.clone(),
            source,
        };
        match address {
            SocketAddress::Unix(path) => {
                remove_stale_socket(path);
                let listener = StdUnixListener::bind(path).map_err(listen_error)?;
                self.socket_paths.push(path.clone());
                if wait {
                    let (stream, _) = listener.accept().map_err(accept_error)?;
                    stream.set_nonblocking(true).map_err(accept_error)?;
                    let stream = tokio::net::UnixStream::from_std(stream).map_err(accept_error)?;
                    server.spawn_unix_stream(stream, monitor_id);
                }
                listener.set_nonblocking(true).map_err(listen_error)?;
                let listener =
                    tokio::net::UnixListener::from_std(listener).map_err(listen_error)?;
                server.spawn_unix_listener(listener, monitor_id);
            }
            SocketAddress::Tcp { host, port } => {
                let host = if host.is_empty() {
                    "0.0.0.0"
                } else {
                    host.as_str()
                };
                let listener = StdTcpListener::bind((host, *port)).map_err(listen_error)?;
                if wait {
                    let (stream, _) = listener.accept().map_err(accept_error)?;
                    stream.set_nonblocking(true).map_err(accept_error)?;
                    let _ = stream.set_nodelay(true);
                    let stream = tokio::net::TcpStream::from_std(stream).map_err(accept_error)?;
                    let (reader, writer) = stream.into_split();
                    server.spawn_stream(reader, writer, monitor_id);
                }
                listener.set_nonblocking(true).map_err(listen_error)?;
                let listener = tokio::net::TcpListener::from_std(listener).map_err(listen_error)?;
                server.spawn_tcp_listener(listener, monitor_id);
            }
        }
        Ok(())
    }

    /// Sends events to every negotiated client.
    pub fn events(&self) -> EventSender {
        self.events.clone()
    }

    /// Winds the monitor down at exit. `flushed` (from `quit`) is awaited first, so the
    /// client that asked gets its reply before the connection closes; then every client's
    /// queued events are written.
    pub fn shutdown(self, flushed: Option<oneshot::Receiver<()>>) {
        // The timer must be made inside the runtime.
        let _ = self.runtime.block_on(async {
            tokio::time::timeout(QUIT_FLUSH_TIMEOUT, async {
                if let Some(flushed) = flushed {
                    let _ = flushed.await;
                }
                // Then every client gets what is queued for it (the SHUTDOWN of a guest
                // that powered off, say) before its connection closes, as QEMU flushes
                // at exit.
                for done in self.events.close_all() {
                    let _ = done.await;
                }
            })
            .await
        });
        self.runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
        for path in &self.socket_paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A socket file left by an earlier run would make bind fail; QEMU removes it too.
/// Anything that is not a socket is left alone (bind then reports the problem).
fn remove_stale_socket(path: &std::path::Path) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_lists_exactly_the_implemented_commands() {
        let schema = implemented_schema().unwrap();
        let mut names: Vec<&str> = schema.names().collect();
        names.sort_unstable();
        let mut expected: Vec<&str> = command::all().map(|c| c.name).collect();
        expected.sort_unstable();
        assert_eq!(names, expected);
        assert!(schema.get("getfd").unwrap().params[0].name == "fdname");
    }

    #[test]
    fn calls_carry_their_reply() {
        let (call, mut reply, handed_off) = MonitorCall::new("stop", Map::new());
        assert_eq!(call.command, "stop");
        handed_off.try_send(()).unwrap();
        call.reply(Ok(Value::Object(Map::new())));
        assert_eq!(reply.try_recv().unwrap(), Ok(serde_json::json!({})));
    }
}
