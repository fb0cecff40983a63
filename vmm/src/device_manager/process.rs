//! The life of a device process, the same for every kind (block, SCSI, net, display):
//! spawn and hello ([`start`]), the kind's own setup request, the vhost-user connection
//! ([`reconnect`] replays it on a new process), watching (the [`SupervisedDevice`] trait
//! the watcher thread drives), the restart budget with its back-off ([`RestartBudget`]),
//! the QMP events that report all this, and teardown ([`Supervision::stop`]).

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipc::{Channel, DeviceKind, FrameError, IpcError, Message};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{lock, DeviceError, SETUP_TIMEOUT, STOP_GRACE};
use crate::supervisor::{self, DeviceProcess};
use crate::virtio::pci::VirtioPciDevice;

/// Downstream QMP names (the spec's `__RFQDN_` extension prefix) for device processes.
pub const EVENT_PROCESS_EXITED: &str = "__org.vmm_DEVICE_PROCESS_EXITED";
pub const EVENT_PROCESS_RESTARTED: &str = "__org.vmm_DEVICE_PROCESS_RESTARTED";
pub const EVENT_PROCESS_FAILED: &str = "__org.vmm_DEVICE_PROCESS_FAILED";
/// A device process broke the control protocol: it is stopped and not restarted (it may be
/// compromised); the guest keeps running without that device's backend.
pub const EVENT_PROCESS_MISBEHAVED: &str = "__org.vmm_DEVICE_PROCESS_MISBEHAVED";

/// Restarts allowed within [`RESTART_WINDOW`] before a device is marked failed.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// The wait before the n-th restart in the window: 0, 100 ms, 200 ms, 400 ms, ...
fn restart_backoff(recent: usize) -> Duration {
    match recent {
        0 => Duration::ZERO,
        n => Duration::from_millis(100 << (n - 1).min(6)),
    }
}

/// The restarts of one device process: how many fell in the last [`RESTART_WINDOW`], and
/// how many in all.
#[derive(Debug, Default)]
pub struct RestartBudget {
    recent: Vec<Instant>,
    total: u64,
}

impl RestartBudget {
    /// Account for one more restart: the back-off to wait before it, or `None` when the
    /// process has crashed too often and must be marked failed.
    pub fn next(&mut self) -> Option<Duration> {
        let now = Instant::now();
        self.recent
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if self.recent.len() >= MAX_RESTARTS {
            return None;
        }
        let backoff = restart_backoff(self.recent.len());
        self.recent.push(now);
        self.total += 1;
        Some(backoff)
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

/// The state of a device process, as `__org.vmm_query-device-processes` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    Running,
    /// Crashed too often, or broke the control protocol; the device no longer has a
    /// backend.
    Failed,
}

impl ProcessState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessState::Running => "running",
            ProcessState::Failed => "failed",
        }
    }
}

/// One row of `__org.vmm_query-device-processes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub device: String,
    /// What the process serves: a drive, the drives of a controller, a netdev.
    pub serves: String,
    pub program: &'static str,
    pub pid: u32,
    pub state: ProcessState,
    pub restarts: u64,
}

/// What the supervisor keeps of every device process, whatever its kind.
pub struct Supervision {
    /// For logs: `vmm-blk[d0]`.
    pub name: String,
    /// For events and queries: the device's id, or `name` without one.
    pub device: String,
    pub program: &'static str,
    pub process: DeviceProcess,
    pub state: ProcessState,
    pub restarts: RestartBudget,
    /// The control socket reached end of file (the process is going away).
    pub control_closed: bool,
    /// Unplugged: its process is being stopped on purpose, and is not to be restarted.
    pub removed: bool,
    /// Stopped on purpose to be replaced (why, for the log and the events): the restart
    /// that follows is no crash and costs nothing of the budget.
    pub planned: Option<&'static str>,
}

impl Supervision {
    pub fn new(
        name: &str,
        id: Option<&str>,
        program: &'static str,
        process: DeviceProcess,
    ) -> Self {
        Supervision {
            name: name.to_string(),
            device: id.unwrap_or(name).to_string(),
            program,
            process,
            state: ProcessState::Running,
            restarts: RestartBudget::default(),
            control_closed: false,
            removed: false,
            planned: None,
        }
    }

    /// Replace the process with a new one that takes what the device holds now (new host
    /// resources): the old one is killed and the watcher starts its successor, as after a
    /// crash but for `why`.
    pub fn replace(&mut self, why: &'static str) {
        self.planned = Some(why);
        self.process.signal_kill();
    }

    pub fn running(&self) -> bool {
        self.state == ProcessState::Running
    }

    /// Teardown: the process is stopped on purpose (SIGTERM, then SIGKILL after a grace
    /// period) and its exit is not to be taken for a crash.
    pub fn stop(&mut self) {
        self.removed = true;
        self.process.terminate(STOP_GRACE);
    }

    /// A new process took over.
    pub fn replaced(&mut self, process: DeviceProcess) {
        // The old process is gone; dropping its handle reaps nothing more.
        self.process = process;
        self.control_closed = false;
    }

    /// The row for `__org.vmm_query-device-processes`.
    pub fn info(&self, serves: String) -> ProcessInfo {
        ProcessInfo {
            device: self.device.clone(),
            serves,
            program: self.program,
            pid: self.process.pid(),
            state: self.state,
            restarts: self.restarts.total(),
        }
    }
}

/// A control message that breaks the protocol: the process may be compromised.
#[derive(Debug)]
pub struct Misbehaved(pub String);

/// Where the watcher's reports go: QMP events, and requests to the machine.
pub trait WatchSink {
    fn emit(&self, name: &str, data: serde_json::Value);
    fn machine(&self) -> &crate::control::MachineControl;
}

/// A device with a process behind it, as the watcher thread drives it.
pub trait SupervisedDevice: Send {
    fn supervision(&self) -> &Supervision;
    fn supervision_mut(&mut self) -> &mut Supervision;
    /// The control socket, watched for events.
    fn control_fd(&self) -> RawFd;
    /// A message (or end of file) is waiting on the control socket: read and act on it.
    fn control_message(&mut self, sink: &dyn WatchSink) -> Result<(), Misbehaved>;
    /// Start a new process set up as the one that ended, and replay the vhost-user setup.
    fn respawn(&mut self) -> Result<(), DeviceError>;
    /// What the process serves, for `__org.vmm_query-device-processes`.
    fn serves(&self) -> String;
    /// A new process took over: anything to report besides the restart.
    fn after_restart(&self, _sink: &dyn WatchSink) {}
}

pub type SharedSupervised = Arc<Mutex<dyn SupervisedDevice>>;

/// Start device program `program` (with `args`) for `name` and exchange hellos as kind
/// `kind`: the process and its control channel, ready for the kind's setup request.
pub fn start<Req, Rep, Ev>(
    name: &str,
    program: &str,
    args: &[&str],
    kind: DeviceKind,
) -> Result<(DeviceProcess, Channel<Req, Rep, Ev>), DeviceError>
where
    Req: Serialize + DeserializeOwned,
    Rep: Serialize + DeserializeOwned,
    Ev: Serialize + DeserializeOwned,
{
    let program = supervisor::device_program(program)?;
    let mut process = DeviceProcess::spawn(name, &program, args)?;
    let socket = process
        .control
        .try_clone()
        .map_err(|e| ipc_error(name, IpcError::Socket(e)))?;
    let verdict = process.verdict().clone();
    let mut control =
        Channel::new(socket).strict(Box::new(move |reason: &str| verdict.convict(reason)));
    control
        .hello(kind, kind, SETUP_TIMEOUT)
        .map_err(|e| setup_failure(&mut process, e))?;
    Ok((process, control))
}

/// A request during setup, with fds, and its reply: an error the process reports is
/// returned as [`DeviceError::Ipc`].
pub fn setup_call<Req, Rep, Ev>(
    name: &str,
    channel: &mut Channel<Req, Rep, Ev>,
    request: Req,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<Rep, DeviceError>
where
    Req: Serialize + DeserializeOwned,
    Rep: Serialize + DeserializeOwned,
    Ev: Serialize + DeserializeOwned,
{
    channel
        .call(request, fds, SETUP_TIMEOUT)
        .map(|(reply, _)| reply)
        .map_err(|e| ipc_error(name, e))
}

pub fn ipc_error(name: &str, source: IpcError) -> DeviceError {
    DeviceError::Ipc {
        name: name.to_string(),
        source,
    }
}

/// A reply that is not the one the request calls for.
pub fn unexpected(name: &str, request: &str, reply: &impl std::fmt::Debug) -> DeviceError {
    ipc_error(
        name,
        IpcError::Remote(ipc::RemoteError(format!(
            "answered {request} with {reply:?}"
        ))),
    )
}

/// Why a device process failed its handshake: its exit, if it died (a clearer reason than
/// the reset connection), else the IPC error.
pub fn setup_failure(process: &mut DeviceProcess, source: IpcError) -> DeviceError {
    match process.wait_exit(Duration::from_millis(200)) {
        Some(status) => DeviceError::ExitedDuringSetup {
            name: process.name().to_string(),
            status,
        },
        None => ipc_error(process.name(), source),
    }
}

/// What the vhost-user frontend calls when `process` breaks the protocol or goes silent:
/// the process is convicted (killed, and reported by the watcher, never restarted).
pub fn violation_hook(process: &DeviceProcess) -> crate::virtio::vhost_user::ViolationHook {
    let verdict = process.verdict().clone();
    Arc::new(move |reason: &str| verdict.convict(reason))
}

/// Point the vhost-user frontend of `function` at the new `process` and replay what the
/// driver had set up, so the queues go on from the indices the guest sees.
pub fn reconnect(
    name: &str,
    function: &Mutex<VirtioPciDevice>,
    process: &DeviceProcess,
) -> Result<(), DeviceError> {
    let stream = process.connect_vhost_user()?;
    let mut function = lock(function);
    let backend = function
        .backend_mut()
        .as_vhost_user()
        .ok_or_else(|| DeviceError::NotRestartable(name.to_string()))?;
    backend.on_violation(violation_hook(process));
    backend.reconnect(stream)?;
    Ok(())
}

/// Read one message from a device's control channel: an event for the kind to act on,
/// `None` for end of file (recorded) or nothing after all, and [`Misbehaved`] for anything
/// that breaks the protocol.
pub fn receive_event<Req, Rep, Ev>(
    channel: &mut Channel<Req, Rep, Ev>,
    supervision: &mut Supervision,
) -> Result<Option<Ev>, Misbehaved>
where
    Req: Serialize + DeserializeOwned,
    Rep: Serialize + DeserializeOwned,
    Ev: Serialize + DeserializeOwned,
{
    // The watcher may have woken for a reply that a call (holding the device) took
    // meanwhile: without a message waiting now, there is none to wait for.
    if !readable_now(channel.socket()) {
        return Ok(None);
    }
    match channel.recv(Some(Duration::from_millis(100))) {
        Ok((Message::Event(event), _)) => Ok(Some(event)),
        Ok(_) => Err(Misbehaved("a message that is not an event".into())),
        Err(IpcError::Frame(FrameError::Closed)) => {
            // The process is exiting; its pidfd tells the rest.
            supervision.control_closed = true;
            Ok(None)
        }
        Err(IpcError::Frame(FrameError::TimedOut)) => Ok(None),
        Err(e) => Err(Misbehaved(e.to_string())),
    }
}

/// Whether `socket` has something to read (or has closed) right now.
fn readable_now(socket: &std::os::unix::net::UnixStream) -> bool {
    let mut fd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(socket),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we pass; a zero timeout never blocks.
    unsafe { libc::poll(&mut fd, 1, 0) > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_backs_off_and_runs_out() {
        let mut budget = RestartBudget::default();
        let waits: Vec<_> = std::iter::from_fn(|| budget.next()).collect();
        assert_eq!(
            waits,
            [0, 100, 200, 400, 800].map(Duration::from_millis).to_vec()
        );
        assert_eq!(budget.total(), 5);
        assert!(budget.next().is_none());
    }
}
